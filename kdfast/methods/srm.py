"""SRM: knowledge distillation by sparse representation matching.

Tran, Gabbouj, Iosifidis, "Knowledge Distillation By Sparse Representation Matching", arXiv 2103.17012
(2021); official code viebboy/SRM (``cifar100/code/Layers.py``, ``Utility.py``, ``Runners.py``), whose
computations this module follows:

* per pixel of a teacher feature x (D channels), codes ``s = sigmoid(C^T x + b)`` over K = m D codewords
  (dictionary C (D, K), scalar intercept b), kept at their k = max(1, int(D m r)) largest entries
  (``s_hat``); the reconstruction is ``C s_hat``;
* labels: the image label is the spatial mean of ``s_hat`` (N, K), the pixel label the codeword of the
  largest code (N, H, W).

The hot path, ``kdfast.ops.sparse_codes``, returns only the k winners per pixel; :func:`reconstruct`
and :func:`labels` work from them (k per pixel), never from a dense (N, H, W, K) tensor.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..distill import Auxiliary, Distiller, FeatureTap, Stage, StagedRun, evaluate, split_batch, unwrap_model
from ..losses import KDLoss


def num_codewords(channels: int, multiplier: float = 2.0) -> int:
    """K = int(m D), the official code's ``nb_codeword = int(in_dim * codeword_multiplier)``."""
    return max(1, int(channels * multiplier))


def sparsity(channels: int, multiplier: float = 2.0, ratio: float = 0.02) -> int:
    """k = max(1, int(D m r)): the official code's ``sparsity`` (0 becomes 1)."""
    return max(1, int(channels * multiplier * ratio))


def reconstruct(x: torch.Tensor, dictionary: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """SRM's reconstruction ``C s_hat`` of every pixel of x (N, D, H, W): (N, D, H, W).

    A sparse product: per pixel the sum of its k winning codewords weighted by their codes
    (``F.embedding_bag`` over the (N H W, k) indices with the codes as per-sample weights), so neither
    forward nor backward holds anything K-wide per pixel. Differentiable in x, dictionary and bias.
    The result is a channels-last (N, D, H, W) tensor.
    """
    values, indices = ops.sparse_codes(x, dictionary, bias, k)
    n, h, w, _ = values.shape
    # Codeword rows C^T contiguous: embedding_bag reads one row per (pixel, winner).
    rows = F.embedding_bag(indices.reshape(-1, k), dictionary.t().contiguous(), per_sample_weights=values.reshape(-1, k),
                           mode="sum")
    return rows.view(n, h, w, -1).permute(0, 3, 1, 2)


def labels(x: torch.Tensor, dictionary: torch.Tensor, bias: torch.Tensor, k: int):
    """SRM's labels of x (N, D, H, W): ``(image_labels (N, K), pixel_labels (N, H, W) int64)``.

    image_labels = the spatial mean of the masked codes s_hat (each pixel contributes its k codes);
    pixel_labels = the codeword of the largest code (the argmax of s, unchanged by the mask).
    Not differentiable (labels are targets): computed under ``torch.no_grad``.
    """
    with torch.no_grad():
        values, indices = ops.sparse_codes(x, dictionary, bias, k)
        n, h, w, _ = values.shape
        image = values.new_zeros(n, dictionary.shape[1], dtype=torch.float32 if values.dtype in (
            torch.float16, torch.bfloat16) else values.dtype)
        image.scatter_add_(1, indices.reshape(n, -1), values.reshape(n, -1).to(image.dtype))
        image = (image / (h * w)).to(values.dtype)
        return image, indices[..., 0].clone()


class SparseDictionary(nn.Module):
    """A dictionary C (D, K) and a scalar intercept b, initialised as the official code does
    (Kaiming-uniform C, b ~ U(-1, 1)). ``forward(x)`` is the reconstruction ``C s_hat`` (stage A);
    :meth:`labels` gives stage B's targets."""

    def __init__(self, channels: int, codewords: int, k: int):
        super().__init__()
        if not 1 <= k <= codewords:
            raise ValueError(f"k must be in 1..codewords = 1..{codewords}, got {k}")
        self.k = int(k)
        self.dictionary = nn.Parameter(torch.empty(channels, codewords))
        self.bias = nn.Parameter(torch.empty(1))
        nn.init.kaiming_uniform_(self.dictionary)
        nn.init.uniform_(self.bias, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reconstruct(x, self.dictionary, self.bias, self.k)

    def labels(self, x: torch.Tensor):
        return labels(x, self.dictionary, self.bias, self.k)


class CodePredictor(nn.Module):
    """The student's head at one matched layer (the official ``GlobalLocalPred``): its own dictionary
    W (D_s, K) and intercept, codes p = sigmoid(W^T y + b) over all K codewords (dense: both losses
    need every code). ``forward(y) -> (global (N, K) = spatial mean of p, local (N, K, H, W) = p)``."""

    def __init__(self, channels: int, codewords: int):
        super().__init__()
        self.dictionary = nn.Parameter(torch.empty(channels, codewords))
        self.bias = nn.Parameter(torch.empty(1))
        nn.init.kaiming_uniform_(self.dictionary)
        nn.init.uniform_(self.bias, -1.0, 1.0)

    def forward(self, y: torch.Tensor):
        p = torch.sigmoid(torch.einsum("ndhw,dk->nkhw", y, self.dictionary) + self.bias)
        return p.mean(dim=(2, 3)), p


# ------------------------------------------------------------------------------------ layer matching
def feature_shapes(model: nn.Module, layers, input_shape) -> dict:
    """{layer name: (C, H, W)} of the named layers' outputs for one input of ``input_shape`` (C, H, W)
    (a probe forward pass in eval mode, without gradients; the model's mode is restored)."""
    from ..distill.tap import FeatureTap

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with FeatureTap(model, list(layers), detach=True) as tap, torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
            return {name: tuple(f.shape[1:]) for name, f in tap.feature_dict.items()}
    finally:
        model.train(was_training)


def match_layers(teacher: nn.Module, student: nn.Module, input_shape, teacher_layers=None, student_layers=None):
    """Pairs (teacher layer, student layer) of equal spatial size, as the official code pairs its
    layers (DenseNet-121 after trans1 / trans2 / dense4 with the AllCNN blocks of the same size).

    Given both lists, they are paired by position and every pair must have the same spatial size
    (ValueError otherwise: SRM's pixel labels need one teacher pixel per student pixel, and the
    official code never resamples). Otherwise the candidates are the models' ``feature_layers`` (or the
    given list): each teacher layer is paired with the last student layer of the same size (deepest
    first), teacher layers without a same-size student layer are skipped, and an empty result raises.
    Returns a list of dicts with keys teacher, student, teacher_channels, student_channels, size.
    """
    t_layers = list(teacher_layers if teacher_layers is not None else getattr(teacher, "feature_layers", ()))
    s_layers = list(student_layers if student_layers is not None else getattr(student, "feature_layers", ()))
    if not t_layers or not s_layers:
        raise ValueError("SRM needs feature layers: pass teacher_layers and student_layers (module names), "
                         "or use models that list their stage outputs in `feature_layers`")
    t_shapes = feature_shapes(teacher, t_layers, input_shape)
    s_shapes = feature_shapes(student, s_layers, input_shape)
    pairs = []
    if teacher_layers is not None and student_layers is not None:
        if len(t_layers) != len(s_layers):
            raise ValueError(f"teacher_layers and student_layers are paired by position: got {len(t_layers)} "
                             f"and {len(s_layers)} names")
        for t, s in zip(t_layers, s_layers):
            if t_shapes[t][1:] != s_shapes[s][1:]:
                raise ValueError(
                    f"spatial size mismatch: teacher layer {t!r} is {t_shapes[t][1]}x{t_shapes[t][2]} but student "
                    f"layer {s!r} is {s_shapes[s][1]}x{s_shapes[s][2]}; SRM's pixel labels need equal sizes "
                    "(the official code pairs same-size layers and never resamples)")
            pairs.append((t, s))
    else:
        for t in t_layers:
            same = [s for s in s_layers if s_shapes[s][1:] == t_shapes[t][1:]]
            if same and all(p[1] != same[-1] for p in pairs):
                pairs.append((t, same[-1]))
        if not pairs:
            raise ValueError(
                "no teacher and student layers of equal spatial size: teacher "
                + ", ".join(f"{n} {s[1]}x{s[2]}" for n, s in t_shapes.items()) + "; student "
                + ", ".join(f"{n} {s[1]}x{s[2]}" for n, s in s_shapes.items()))
    return [{"teacher": t, "student": s, "teacher_channels": t_shapes[t][0], "student_channels": s_shapes[s][0],
             "size": t_shapes[t][1:]} for t, s in pairs]


# ------------------------------------------------------------------------------------ stage losses
TARGETS = ("global", "local", "global-local")


class DictionarySet(nn.Module):
    """One :class:`SparseDictionary` per teacher layer (stage A's trainable). ``forward(features)``
    returns the reconstructions, :meth:`labels` the (image, pixel) labels of each layer."""

    def __init__(self, dictionaries):
        super().__init__()
        self.layers = nn.ModuleList(dictionaries)

    def forward(self, features):
        return [d(f) for d, f in zip(self.layers, features)]

    def labels(self, features):
        return [d.labels(f) for d, f in zip(self.layers, features)]


def dictionary_loss(reconstructions, features) -> dict:
    """Stage A's objective per layer, MSE(x, C s_hat) (the official ``codeword_epoch_trainer`` sums them)."""
    return {f"mse{i}": F.mse_loss(r, f) for i, (r, f) in enumerate(zip(reconstructions, features))}


class SRMTargetLoss(nn.Module):
    """Stage B's loss (the official ``srm_init_epoch_trainer``), summed over the matched layers:

    * 'global': ``BCE(mean_hw p, image label)`` with the image label the spatial mean of the teacher's
      masked codes;
    * 'local': ``CE(p, pixel label)`` where the student's sigmoid codes p (N, K, H, W) are used as the
      logits of a K-way classification of each pixel (the official code's choice) and the pixel label is
      the teacher's argmax codeword;
    * 'global-local' (default): both.

    ``dictionaries``: the stage-A :class:`SparseDictionary` per layer (frozen here: labels are targets);
    ``student_channels``: D_s per layer. The heads (:class:`CodePredictor`, one per layer with K from its
    dictionary) are this module's trainable parameters, optimised with the student.
    A ``"features"`` loss of :class:`kdfast.distill.Distiller`: ``loss(student_feats, teacher_feats)``.
    """

    kdfast_inputs = "features"

    def __init__(self, dictionaries, student_channels, target: str = "global-local"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        dictionaries = list(dictionaries)
        student_channels = [int(c) for c in student_channels]
        if len(dictionaries) != len(student_channels) or not dictionaries:
            raise ValueError(f"one dictionary per student layer is needed: got {len(dictionaries)} dictionaries "
                             f"and {len(student_channels)} student layers")
        self.target = target
        self.dictionaries = nn.ModuleList(dictionaries).requires_grad_(False)
        self.heads = nn.ModuleList(CodePredictor(c, d.dictionary.shape[1]) for c, d in zip(student_channels, dictionaries))

    def forward(self, student_features, teacher_features) -> torch.Tensor:
        if len(student_features) != len(self.heads) or len(teacher_features) != len(self.heads):
            raise ValueError(f"SRMTargetLoss has {len(self.heads)} layers, got {len(student_features)} student and "
                             f"{len(teacher_features)} teacher feature maps")
        total = 0.0
        with torch.autocast(student_features[0].device.type, enabled=False):
            for s, t, d, head in zip(student_features, teacher_features, self.dictionaries, self.heads):
                if s.shape[2:] != t.shape[2:]:
                    raise ValueError(f"spatial size mismatch: student map {tuple(s.shape[2:])} vs teacher map "
                                     f"{tuple(t.shape[2:])}; SRM pairs layers of equal size")
                image, pixel = d.labels(t.float())
                global_pred, local_pred = head(s.float())
                if self.target in ("global", "global-local"):
                    total = total + F.binary_cross_entropy(global_pred, image)
                if self.target in ("local", "global-local"):
                    total = total + F.cross_entropy(local_pred, pixel)
        return total


# ------------------------------------------------------------------------------------ the method
NAME = "srm"
TITLE = "SRM: sparse representation matching (teacher codewords -> pixel and image labels -> KD)"
PAPER = ("Tran, Gabbouj, Iosifidis, \"Knowledge Distillation By Sparse Representation Matching\", "
         "arXiv 2103.17012 (2021); official code viebboy/SRM (cifar100/code/Layers.py, Utility.py, Runners.py)")

from . import options as T  # noqa: E402

#: Options of :func:`build` (the official CIFAR defaults where they exist; epochs are scaled down
#: defaults for small runs: the official schedule is Adam (1e-3, 10) (1e-4, 60) (1e-5, 30) for the
#: dictionaries, (1e-3, 30) (1e-4, 100) (1e-5, 30) for the heads, (1e-3, 30) (1e-4, 100) (1e-5, 70) for KD).
OPTIONS = {
    "input_shape": None,            # (C, H, W) of one input: needed to match layers (probe forward)
    "teacher_layers": None,         # None: the teacher's feature_layers, matched by spatial size
    "student_layers": None,
    "codeword_multiplier": 2.0,     # m: K = int(m D) codewords per teacher layer
    "sparsity_ratio": 0.02,         # r: k = max(1, int(D m r)) non-zero codes per pixel
    "target": "global-local",       # 'global' | 'local' | 'global-local'
    "dictionary_epochs": 10,
    "dictionary_lr": 1e-3,
    "init_epochs": 10,
    "init_lr": 1e-3,
    "kd_epochs": 20,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "alpha": 0.5,
    "temperature": 4.0,
    "lr_steps": None,               # None: the official phases (OFFICIAL_PHASES, Adam re-created at each);
                                    # a tuple of fractions: LR / 10 there in every stage, optimiser kept
    "val_loader": None,             # a validation split's DataLoader: each stage keeps its best state (official)
    "select_every": "phase",        # score the state at each LR phase's end (official) or every 'epoch'
    "device": "cpu",
    "seed": 0,
    "checkpoint_dir": None,
    "resume": False,
    "progress": False,
}
OPTION_TYPES = {  # checked by kdfast.methods.check_options before build
    "input_shape": T.optional(T.Spec("(C, H, W) of one input (three positive ints)",
                                     lambda v: T.list_of(T.POSITIVE_INT, "").accepts(v) and len(v) == 3)),
    "teacher_layers": T.optional(T.names()), "student_layers": T.optional(T.names()),
    "codeword_multiplier": T.POSITIVE, "sparsity_ratio": T.POSITIVE, "target": T.choice(*TARGETS),
    "dictionary_epochs": T.POSITIVE_INT, "dictionary_lr": T.POSITIVE, "init_epochs": T.POSITIVE_INT,
    "init_lr": T.POSITIVE, "kd_epochs": T.POSITIVE_INT, "lr": T.POSITIVE, "weight_decay": T.NON_NEGATIVE,
    "alpha": T.FRACTION, "temperature": T.POSITIVE,
    "lr_steps": T.optional(T.list_of(T.FRACTION, "a list of fractions in [0, 1] of each stage's epochs", nonempty=False)),
    "val_loader": T.optional(T.Spec("a DataLoader (the validation split)", lambda v: hasattr(v, "__iter__"))),
    "select_every": T.choice("phase", "epoch"),
    "device": T.DEVICE, "seed": T.NON_NEGATIVE_INT, "checkpoint_dir": T.optional(T.PATH), "resume": T.ENGINE_TYPES["resume"],
    "progress": T.BOOL,
}


#: The official learning-rate phases per stage, as fractions of the stage's epochs, from the official
#: (lr, epochs) lists (viebboy/SRM ``cifar100/code/exp_configurations.py``): dictionaries (1e-3, 10)
#: (1e-4, 60) (1e-5, 30); matching (1e-3, 30) (1e-4, 100) (1e-5, 30); KD (1e-3, 30) (1e-4, 100) (1e-5, 70).
#: The official trainer (``Utility.py``) creates a new Adam for each phase, so the moments restart there.
OFFICIAL_PHASES = {"dictionaries": (10 / 100, 70 / 100), "matching": (30 / 160, 130 / 160),
                   "kd": (30 / 200, 130 / 200)}


def lr_milestones(epochs: int, fractions) -> list:
    """The epochs (0 < e < epochs) at ``fractions`` of ``epochs``: where a step schedule divides the LR."""
    return sorted({int(round(f * epochs)) for f in fractions if 0 < int(round(f * epochs)) < epochs})


#: What a stage's model selection scores (``Selection.metric``): the validation accuracy (higher is better;
#: the official KD stage), the stage's own loss on the validation split (lower; the official matching stage)
#: or the epoch's training loss (lower; the official dictionary stage, which has no validation).
SELECT_METRICS = ("val_accuracy", "val_loss", "train_loss")


class Selection:
    """Model selection of one stage, as the official trainers (viebboy/SRM ``cifar100/code/Utility.py``:
    ``knowledge_distil``, ``srm_init``, ``train_codeword``) do it: after the epochs in ``at`` (counts of
    completed epochs; None: after every epoch) the state is scored by ``metric`` (:data:`SELECT_METRICS`)
    and kept when strictly better than the best so far; at the end of the stage the kept state is
    restored. ``loader``: the validation split's loader (needed by the ``val_*`` metrics)."""

    def __init__(self, metric: str, loader=None, at=None):
        if metric not in SELECT_METRICS:
            raise ValueError(f"metric must be one of {SELECT_METRICS}, got {metric!r}")
        if metric != "train_loss" and loader is None:
            raise ValueError(f"selection by {metric!r} needs loader (the validation split's DataLoader)")
        if at is not None:
            at = sorted({int(e) for e in at})
            if not at or at[0] < 1:
                raise ValueError(f"at must be None or a non-empty list of epoch counts >= 1, got {at!r}")
        self.metric, self.loader, self.at = metric, loader, at

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "val_accuracy"


class PhasedDistiller(Distiller):
    """A :class:`~kdfast.distill.Distiller` whose optimisers restart (their state cleared: Adam's moments
    and step count) at the start of each epoch in ``restart_epochs``, as the official SRM code creates a
    new Adam for each LR phase. Checkpoints are taken at epoch ends, so a resumed run restarts at the
    same epochs.

    ``selection`` (a :class:`Selection`, optional): keep the best-scoring state (student, loss modules such
    as SRM's heads, auxiliaries such as the dictionaries) and restore it when :meth:`fit` completes the
    stage. Each scored epoch's record gets ``select_<metric>``; ``selected`` is then ``{"epoch", "score"}``.
    The kept state travels in the checkpoints, so a resumed stage selects as an uninterrupted one."""

    def __init__(self, *args, restart_epochs=(), selection: "Selection | None" = None, **kwargs):
        super().__init__(*args, **kwargs)
        if selection is not None and not isinstance(selection, Selection):
            raise TypeError(f"selection must be a kdfast.methods.srm.Selection or None, got {type(selection).__name__}")
        if selection is not None and selection.metric == "val_loss" and self.cache_teacher_logits:
            raise ValueError("selection by 'val_loss' runs the stage's loss on the validation split, which would "
                             "mix its images into the cached teacher logits: use cache_teacher_logits=False")
        self.restart_epochs = frozenset(int(e) for e in restart_epochs)
        self.selection = selection
        self._best = None  # {"epoch", "score", "state"}
        self.selected = None

    def on_epoch_start(self, epoch: int) -> None:
        if epoch in self.restart_epochs:
            for optimizer in self.optimizers.values():
                optimizer.state.clear()
        super().on_epoch_start(epoch)

    # ---------------------------------------------------------------- model selection
    def _selectable_state(self) -> dict:
        def clone(state):
            return {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()}

        return {"student": clone(unwrap_model(self.student).state_dict()), "losses": clone(self.losses.state_dict()),
                "auxiliaries": {n: clone(a.module.state_dict()) for n, a in self.auxiliaries.items()}}

    def _load_selectable_state(self, state: dict) -> None:
        unwrap_model(self.student).load_state_dict(state["student"])
        self.losses.load_state_dict(state["losses"])
        for name, aux in self.auxiliaries.items():
            aux.module.load_state_dict(state["auxiliaries"][name])

    def validation_loss(self, loader) -> float:
        """The stage's weighted loss on ``loader``, student in eval mode, without gradients (the official
        ``srm_init_evaluator``), averaged over images."""
        module = self.train_module
        was_training = module.training
        module.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for batch in loader:
                    inputs, targets, _ = split_batch(batch)
                    out = self.compute_loss((inputs, targets))
                    total += float(out["loss"]) * inputs.shape[0]
                    count += inputs.shape[0]
        finally:
            module.train(was_training)
        if count == 0:
            raise ValueError("the validation loader yielded no batch")
        return total / count

    def _score(self, record) -> float:
        metric = self.selection.metric
        if metric == "train_loss":
            return float(record["loss"])
        if metric == "val_loss":
            return self.validation_loss(self.selection.loader)
        return float(evaluate(unwrap_model(self.student), self.selection.loader, device=self.device,
                              amp=self.amp)["accuracy"])

    def on_epoch_end(self, epoch: int, record) -> None:
        super().on_epoch_end(epoch, record)
        sel = self.selection
        if sel is None or (sel.at is not None and epoch + 1 not in sel.at):
            return
        score = self._score(record)
        record[f"select_{sel.metric}"] = score
        best = self._best
        if best is None or (score > best["score"] if sel.higher_is_better else score < best["score"]):
            self._best = {"epoch": epoch + 1, "score": score, "state": self._selectable_state()}

    def checkpoint_state(self):
        state = super().checkpoint_state()
        state["selection"] = self._best
        return state

    def load_checkpoint_state(self, ckpt) -> None:
        super().load_checkpoint_state(ckpt)
        self._best = ckpt.get("selection")

    def fit(self, train_loader, epochs=None, eval_loader=None, max_steps=None):
        history = super().fit(train_loader, epochs=epochs, eval_loader=eval_loader, max_steps=max_steps)
        total = self.epochs if epochs is None else epochs
        if self.selection is not None and self._best is not None and self.epoch >= total:
            self._load_selectable_state(self._best["state"])
            self.selected = {"epoch": self._best["epoch"], "score": self._best["score"]}
        return history


class DictionaryLearner(PhasedDistiller):
    """Stage A on the engine: the teacher runs frozen, the student is not trained, and the
    :class:`DictionarySet` (an auxiliary trainable, Adam) minimises the sum over layers of
    MSE(x, C s_hat). ``dictionary_spec``: :class:`~kdfast.distill.Auxiliary` keywords (lr, schedule, ...)."""

    def __init__(self, teacher, student, *, dictionaries: DictionarySet, teacher_layers, dictionary_spec=None,
                 **engine):
        if teacher is None:
            raise ValueError("SRM's dictionary stage needs a teacher")
        super().__init__(teacher, student, {}, auxiliaries={"dictionaries": Auxiliary(dictionaries,
                                                                                      **(dictionary_spec or {}))},
                         **engine)
        self._srm_tap = FeatureTap(self.teacher, list(teacher_layers), detach=True)

    def training_step(self, batch):
        inputs, _, _ = split_batch(batch)
        self.teacher_forward(inputs.to(self.device, non_blocking=True))
        features = [f.float() for f in self._srm_tap.features]
        with torch.autocast(self.device.type, enabled=False):
            parts = dictionary_loss(self.auxiliary_model("dictionaries")(features), features)
            loss = sum(parts.values())
        self.backward_step(loss, "dictionaries")
        return {"loss": loss.detach(), "parts": {k: v.detach() for k, v in parts.items()}, "logits": None,
                "targets": None}

    def close(self) -> None:
        self._srm_tap.remove()
        super().close()


class SRMRun(StagedRun):
    """The three stages of SRM (``build`` returns one): ``dictionaries`` (stage A), ``matching`` (stage B)
    and ``kd`` (stage C). ``pairs``: the matched layers; ``dictionaries``: the teacher's
    :class:`DictionarySet` (trained by stage A, used for the labels of stage B)."""

    def __init__(self, stages, *, pairs, dictionaries, **kwargs):
        super().__init__(stages, **kwargs)
        self.pairs, self.dictionaries = pairs, dictionaries

    @property
    def selected(self) -> dict:
        """{stage: {"epoch", "score"} or None}: the state each finished stage kept (model selection with a
        ``val_loader``; None: its last state)."""
        return {name: getattr(engine, "selected", None) for name, engine in self.engines.items()}


_STUDENT_OPTIMISER_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "nesterov", "schedule", "milestones", "gamma",
                           "epochs")


def build(teacher, student, *, input_shape=None, teacher_layers=None, student_layers=None, codeword_multiplier=2.0,
          sparsity_ratio=0.02, target="global-local", dictionary_epochs=10, dictionary_lr=1e-3, init_epochs=10,
          init_lr=1e-3, kd_epochs=20, lr=1e-3, weight_decay=1e-4, alpha=0.5, temperature=4.0, lr_steps=None,
          val_loader=None, select_every="phase", cache_teacher_logits=False, checkpoint_dir=None, resume=False,
          log_path=None, **engine) -> SRMRun:
    """SRM as the official code runs it, as a :class:`~kdfast.distill.StagedRun` of three engines:

    * ``dictionaries`` (stage A, ``dictionary_epochs``): per matched teacher layer a dictionary of
      K = int(m D) codewords with k = max(1, int(D m r)) codes per pixel, Adam (``dictionary_lr``, no
      weight decay), loss sum of MSE(x, C s_hat); the student is untouched;
    * ``matching`` (stage B, ``init_epochs``): the whole student plus one code predictor per matched
      layer, Adam (``init_lr``, ``weight_decay``), :class:`SRMTargetLoss` with ``target`` ('global',
      'local', 'global-local');
    * ``kd`` (stage C, ``kd_epochs``): heads dropped, Adam (``lr``, ``weight_decay``) on
      ``alpha T^2 KL + (1 - alpha) CE`` (:class:`kdfast.losses.KDLoss`).

    ``lr_steps=None`` (default): each stage runs the official LR phases (:data:`OFFICIAL_PHASES`, LR / 10 at
    each phase, the Adam state cleared there as the official code re-creates its optimiser). A tuple of
    fractions instead drops the LR 10x at those fractions of every stage and keeps the optimiser state
    (kdfast's earlier default was (0.6, 0.85)).

    ``val_loader`` (a DataLoader of a validation split, optional): model selection as the official trainers
    (``Utility.py``), each stage restoring its best state when it ends: the dictionaries by their training
    loss, the matching stage by its loss on the validation split, the KD stage by validation accuracy,
    scored at the end of each LR phase (``select_every="phase"``, official) or after every epoch
    (``"epoch"``, kdfast's option). Without it every stage keeps its last state. ``run.selected`` then
    says which epoch each stage kept. ``cache_teacher_logits=True`` caches the teacher's logits in the KD
    stage only (the other stages need its features; batches must carry an index, see
    :class:`kdfast.distill.IndexedDataset`). ``input_shape`` (C, H, W) of one input is needed to match the layers
    (:func:`match_layers`). Engine keywords (device, seed, amp, progress, ...) apply to every stage;
    ``checkpoint_dir``/``resume`` checkpoint each stage in its own folder and resume where it stopped.
    """
    if input_shape is None:
        raise ValueError("SRM's build needs input_shape=(C, H, W) of one input, to match teacher and student "
                         "layers by spatial size")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    for name, value in (("codeword_multiplier", codeword_multiplier), ("sparsity_ratio", sparsity_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    bad = sorted(set(engine) & set(_STUDENT_OPTIMISER_KEYS))
    if bad:
        raise ValueError(f"SRM sets each stage's optimiser itself (Adam, as the official code): remove {bad}; "
                         "use lr, weight_decay, dictionary_lr, init_lr and lr_steps")
    pairs = match_layers(teacher, student, tuple(input_shape), teacher_layers, student_layers)
    dictionaries = DictionarySet([
        SparseDictionary(p["teacher_channels"], num_codewords(p["teacher_channels"], codeword_multiplier),
                         sparsity(p["teacher_channels"], codeword_multiplier, sparsity_ratio)) for p in pairs])
    t_layers = [p["teacher"] for p in pairs]
    s_layers = [p["student"] for p in pairs]
    s_channels = [p["student_channels"] for p in pairs]

    if select_every not in ("phase", "epoch"):
        raise ValueError(f"select_every must be 'phase' (the official code) or 'epoch', got {select_every!r}")
    official = lr_steps is None
    if not official and (not isinstance(lr_steps, (tuple, list))
                         or not all(isinstance(f, (int, float)) and 0 < f < 1 for f in lr_steps)):
        raise ValueError(f"lr_steps must be None (the official phases) or a tuple of fractions in (0, 1), got {lr_steps!r}")

    def milestones(stage, epochs):
        return lr_milestones(epochs, OFFICIAL_PHASES[stage] if official else lr_steps)

    def adam(stage, epochs, learning_rate, decay):
        return dict(optimizer="adam", lr=learning_rate, weight_decay=decay, schedule="step",
                    milestones=milestones(stage, epochs), gamma=0.1)

    def restarts(stage, epochs):
        return milestones(stage, epochs) if official else ()

    def selection(stage, epochs, metric):
        if val_loader is None:
            return None
        at = None if select_every == "epoch" else milestones(stage, epochs) + [epochs]
        return Selection(metric, None if metric == "train_loss" else val_loader, at)

    def stage_a():
        return DictionaryLearner(teacher, student, dictionaries=dictionaries, teacher_layers=t_layers,
                                 dictionary_spec=adam("dictionaries", dictionary_epochs, dictionary_lr, 0.0),
                                 restart_epochs=restarts("dictionaries", dictionary_epochs),
                                 selection=selection("dictionaries", dictionary_epochs, "train_loss"), **engine)

    def stage_b():
        loss = SRMTargetLoss(dictionaries.layers, s_channels, target)
        return PhasedDistiller(teacher, student, {"srm": loss}, feature_layers={"srm": (s_layers, t_layers)},
                               **adam("matching", init_epochs, init_lr, weight_decay),
                               restart_epochs=restarts("matching", init_epochs),
                               selection=selection("matching", init_epochs, "val_loss"), **engine)

    def stage_c():
        return PhasedDistiller(teacher, student, {"kd": KDLoss(temperature, alpha=alpha)},
                               **adam("kd", kd_epochs, lr, weight_decay), restart_epochs=restarts("kd", kd_epochs),
                               selection=selection("kd", kd_epochs, "val_accuracy"),
                               cache_teacher_logits=cache_teacher_logits, **engine)

    stages = [Stage("dictionaries", dictionary_epochs, stage_a, eval=False),
              Stage("matching", init_epochs, stage_b),
              Stage("kd", kd_epochs, stage_c)]
    return SRMRun(stages, pairs=pairs, dictionaries=dictionaries, checkpoint_dir=checkpoint_dir, resume=resume,
                  log_path=log_path)

