"""The KR experiment (Liu et al., CVPR-W 2019): does Knowledge Representing beat KD for a small student,
converge faster, combine with KD, and leave the student's weights sparser than L1 and L2 penalties?

``kdfast experiment kr`` (issue 22's protocol): the reference ResNet-26 teacher
(:func:`kdfast.experiments.protocol.reference_teacher`) and ResNet-8 students at two capacities, the
paper's (width 1: 77,754 parameters on one input channel, the nearest kdfast ResNet-8 to the paper's
0.09 M) and a smaller one (width 0.25: 5,142 parameters); CE, KD (T and alpha chosen on a validation
split), KR (CE + knowledge aggregation + sparse recoding), KR + KD; CE with an L1 and with an L2 weight
penalty at the paper's capacity for the sparsity comparison (the paper's Fig. 2/4). Test accuracy after
every round (a tenth of the training part, on a fixed class-stratified 2,000-image test subset) gives the
convergence curves; the reported accuracy of a run is on every test image; paired differences by seed
with 95 % intervals give a verdict per claim. Every run goes through a
:class:`~kdfast.experiments.protocol.RunStore` with engine checkpoints, so an interrupted experiment
re-run with the same command continues where it stopped.

The paper's equations are unavailable and it has no public code: every setting below that the text does
not state is an interpretation, named in :data:`INTERPRETATIONS` and in the report. The method itself:
:mod:`kdfast.methods.kr`. The tour's compact section (:func:`demo_section`) keeps its own weak student.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..distill import Distiller, mix_seed
from ..losses import KDLoss
from ..methods.kr import PAPER, TITLE, build
from . import common, protocol

NAME = "kr"

# ------------------------------------------------------------------------------------------ the protocol
#: Student capacities: name -> ResNet-8 width multiplier.
CAPACITIES = {"paper": 1.0, "low": 0.25}
#: Methods per capacity (the L1/L2 baselines of the sparsity comparison only at the paper's capacity).
METHODS = {"paper": ("ce", "kd", "kr", "kr_kd", "l1", "l2"), "low": ("ce", "kd", "kr", "kr_kd")}
LABELS = {"ce": "CE", "kd": "KD (tuned)", "kr": "KR", "kr_kd": "KR + KD", "l1": "CE + L1", "l2": "CE + L2"}
COLOURS = {"ce": "C0", "kd": "C1", "kr": "C4", "kr_kd": "C3", "l1": "C2", "l2": "C8"}
#: The teacher's residual blocks aggregated for the student's three stages, k = 3 per group (the paper's
#: CIFAR-10 k): blocks 1-3 of each 4-block ResNet-26 stage, at the student stage's resolution (block 0 of
#: stages 2 and 3 is the strided transition block).
TEACHER_LAYERS = [f"layer{stage}.{block}" for stage in (1, 2, 3) for block in (1, 2, 3)]
STUDENT_LAYERS = ["layer1", "layer2", "layer3"]
#: The student's optimiser, the paper's Eq. 10 (Algorithm 1: Eq. 9 aggregates the teacher's knowledge,
#: Eq. 10 trains the student): SGD lr 0.01, momentum 0.9, weight decay 1e-5, lr x0.1 at two steps.
STUDENT_SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5, "gamma": 0.1}
#: The aggregators' SGD, the paper's Eq. 9: lr 0.1 with the same steps (momentum 0.9, weight decay 1e-5).
AGGREGATOR_LR = 0.1
#: The two lr steps at 30k and 48k iterations; the paper gives no total, read as 64k (the CIFAR ResNet
#: schedule of He et al., 2016): steps at 47 % and 75 % of every run.
MILESTONE_FRACTIONS = (30 / 64, 48 / 64)
#: KD's grid, scored on the validation split: T x alpha of Hinton KD (T^2-scaled soft term).
KD_GRID = tuple({"T": t, "alpha": a} for t in (2.0, 4.0, 8.0) for a in (0.5, 0.9))
#: Penalty strengths of the sparsity baselines: L2 as SGD weight decay 5e-4 (He et al.'s CIFAR value), L1
#: as ``5e-5 * sum |w|`` over conv and linear weights (its pull equals that L2's at |w| = 0.1).
L2_WEIGHT_DECAY = 5e-4
L1_COEFFICIENT = 5e-5

INTERPRETATIONS = [
    "The aggregation loss: sum over groups of w_l * MSE(aggregated_l, student_l) / E_l, E_l the frozen teacher's "
    "feature energy of the group at the student's resolution, w_l its residual's std in the same units, "
    "normalised to sum to 1 (`kdfast.methods.kr.aggregation_loss`); aggregation weight 1.",
    "The aggregator: per teacher block a 1x1 convolution to the student's channels (and average pooling to its "
    "resolution where they differ), summed with softmax weights and rescaled to the group's own energy (the "
    "paper's transport \"preserving equal total measure\"), so that it cannot shrink with the student; the "
    "paper's identity-mapping layers are not described further.",
    "Which teacher layers: blocks 1-3 of each ResNet-26 stage for the student's matching stage (k = 3).",
    "Sparse recoding: kdfast's rule with its defaults (boost 2, damp 0.9, shrink 0, tau_rate 0.01); the paper "
    "gives the rule's shape (boost dominant, smooth inactive gradients around a learnable threshold initialised "
    "at the mean |w|), not its constants.",
    "Optimisers: the student on Eq. 10 (SGD lr 0.01), the aggregators on Eq. 9 (SGD lr 0.1), as Algorithm 1 "
    "pairs them; every baseline student uses the same SGD; steps at 30k/48k read as 47 %/75 % of a 64k schedule.",
    "KR = CE + aggregation + sparse recoding; KR + KD replaces CE by Hinton KD with the tuned T and alpha (the "
    "paper combines KR with KDGAN).",
    "Batch size (see Setting) and no augmentation: not stated by the paper for the student.",
]


@dataclass
class ExperimentConfig:
    """One budget of the experiment."""

    seeds: tuple = (0, 1, 2)
    # 20 rounds of a tenth (2 passes): the lr steps after rounds 9 and 15 and the convergence window (the
    # points from 80 % of the schedule, protocol.convergence) starts after round 16, past the last drop;
    # with 9 rounds of a quarter the window held the drop's jump.
    rounds: int = 20                 # training rounds per run; test accuracy after each
    rounds_per_pass: int = 10        # a round is this fraction of the training part (a tenth: 5,400 images)
    tune_rounds: int = 10            # rounds of each KD tuning run (on the training part, scored on validation)
    curve_images: Optional[int] = 2000     # the per-round curve on this many test images (None: all)
    kd_grid: tuple = KD_GRID
    batch_size: int = 128
    teacher_epochs: Optional[int] = None   # None: protocol.REFERENCE_TEACHER's
    train_subset: Optional[int] = None     # images of the training split read (None: all)
    test_subset: Optional[int] = None
    capacities: Dict[str, float] = field(default_factory=lambda: dict(CAPACITIES))

    @classmethod
    def quick(cls, dataset: str = "fashion-mnist") -> "ExperimentConfig":
        train, test = common.quick_subsets(dataset, "quick")
        return cls(seeds=(0, 1), rounds=4, rounds_per_pass=4, tune_rounds=2,
                   kd_grid=({"T": 4.0, "alpha": 0.9}, {"T": 2.0, "alpha": 0.5}), teacher_epochs=3,
                   train_subset=train, test_subset=test)


def _config(budget: str, dataset: str) -> ExperimentConfig:
    return ExperimentConfig.quick(dataset) if budget == "quick" else ExperimentConfig()


def milestones(rounds: int) -> List[int]:
    """The rounds after which the lr steps down (:data:`MILESTONE_FRACTIONS` of ``rounds``, rounded half up,
    kept inside the run and distinct)."""
    steps = [min(rounds - 1, max(1, int(math.floor(f * rounds + 0.5)))) for f in MILESTONE_FRACTIONS]
    return sorted({m for m in steps if 0 < m < rounds})


# ------------------------------------------------------------------------------------------ data in rounds
class RoundSource:
    """The training part in rounds: round r is chunk ``r % rounds_per_pass`` of a random permutation of all
    images drawn once per pass (``r // rounds_per_pass``) from ``seed``, in batches ``(inputs, targets,
    index)`` (index: the image's position in ``dataset``). An engine batch source
    (:mod:`kdfast.distill.sources`): an "epoch" of the engine is one round, so the lr schedule, the
    evaluations and the checkpoints count rounds, and a resumed round replays the same batches."""

    def __init__(self, dataset, rounds_per_pass: int, batch_size: int, seed: int):
        for name, value in (("rounds_per_pass", rounds_per_pass), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RoundSource: {name} must be a positive int, got {value!r}")
        if rounds_per_pass > len(dataset):
            raise ValueError(f"RoundSource: rounds_per_pass ({rounds_per_pass}) exceeds the {len(dataset)} images")
        self.images, self.labels = dataset.images, dataset.labels
        self.rounds_per_pass, self.batch_size, self.seed = rounds_per_pass, batch_size, int(seed)
        self.chunk = math.ceil(len(dataset) / rounds_per_pass)
        self.steps_per_epoch = math.ceil(self.chunk / batch_size)

    def indices(self, round_: int) -> torch.Tensor:
        """The images of round ``round_`` (0-based), in training order."""
        n = self.labels.shape[0]
        g = torch.Generator().manual_seed(mix_seed(self.seed, round_ // self.rounds_per_pass, 7))
        order = torch.randperm(n, generator=g)
        part = round_ % self.rounds_per_pass
        chunk = order[part * self.chunk:(part + 1) * self.chunk]
        if chunk.numel() < self.chunk:  # the last chunk of a pass is topped up from the pass's start
            chunk = torch.cat([chunk, order[:self.chunk - chunk.numel()]])
        return chunk

    def batches(self, epoch: int, generator: torch.Generator):
        idx = self.indices(epoch)
        for start in range(0, idx.numel(), self.batch_size):
            i = idx[start:start + self.batch_size]
            yield self.images[i], self.labels[i], i

    def __len__(self) -> int:
        return self.steps_per_epoch


# ------------------------------------------------------------------------------------------ engines
class StoredLogitsDistiller(Distiller):
    """Hinton KD with the teacher's logits computed once for the whole training part (no augmentation,
    so they are exact): ``teacher_forward`` looks them up by the batch's index instead of running the
    teacher at every step."""

    def __init__(self, teacher, student, losses, *, teacher_logits: torch.Tensor, **kwargs):
        super().__init__(teacher, student, losses, **kwargs)
        self.stored_logits = teacher_logits.to(self.device)

    @torch.no_grad()
    def teacher_forward(self, inputs, index=None):
        if index is None:
            raise ValueError("StoredLogitsDistiller needs batches (inputs, targets, index)")
        return self.stored_logits[index.to(self.device)], {}


class L1Distiller(Distiller):
    """Cross-entropy plus ``coefficient * sum |w|`` over the student's conv and linear weights."""

    def __init__(self, student, *, coefficient: float, **kwargs):
        super().__init__(None, student, {"ce": nn.CrossEntropyLoss()}, **kwargs)
        if not coefficient > 0:
            raise ValueError(f"coefficient must be > 0, got {coefficient!r}")
        self.coefficient = float(coefficient)

    def extra_losses(self, step):
        return {"l1": (self.coefficient, sum(p.abs().sum() for p in penalised_weights(self.student)))}


@torch.no_grad()
def teacher_logits(teacher: nn.Module, dataset, device="cpu", batch_size: int = 512) -> torch.Tensor:
    """The teacher's logits for every image of ``dataset`` (float32, on the CPU)."""
    teacher.eval()
    out = [teacher(dataset.images[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(dataset), batch_size)]
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ sparsity
def penalised_weights(model: nn.Module) -> List[torch.Tensor]:
    """The conv and linear weights of ``model`` (parameters with two or more dimensions): what the L1 and L2
    baselines penalise and what the sparsity measures read (BatchNorm and biases are left out)."""
    return [p for p in model.parameters() if p.dim() > 1]


@torch.no_grad()
def weight_sparsity(model: nn.Module, rel: float = 0.1) -> Dict[str, float]:
    """Two scale-free sparsity measures of the conv and linear weights (with BatchNorm after every conv,
    a conv's scale does not change the function, so absolute thresholds would only measure how much a
    penalty shrank the scale):

    * ``hoyer``: Hoyer's (JMLR 2004) sparseness per tensor, ``(sqrt(n) - |w|_1 / |w|_2) / (sqrt(n) - 1)``
      (0: every entry of equal magnitude, 1: a single non-zero entry), averaged over tensors weighted by
      their number of entries;
    * ``near_zero``: the share of entries with ``|w| < rel * mean |w|`` of their tensor."""
    if not 0 < rel < 1:
        raise ValueError(f"rel must be in (0, 1), got {rel!r}")
    weights = [p.detach().double().flatten() for p in penalised_weights(model)]
    weights = [w for w in weights if w.numel() > 1]
    if not weights:
        raise ValueError("the model has no conv or linear weight with more than one entry")
    total = sum(w.numel() for w in weights)
    hoyer = near = 0.0
    for w in weights:
        n, l2 = w.numel(), w.norm()
        h = 0.0 if l2 == 0 else float((math.sqrt(n) - w.abs().sum() / l2) / (math.sqrt(n) - 1))
        hoyer += h * n
        a = w.abs()
        near += float((a < rel * a.mean()).sum())
    return {"hoyer": hoyer / total, "near_zero": near / total}


# ------------------------------------------------------------------------------------------ one run
def _student(width: float, data, seed: int) -> nn.Module:
    from .. import models

    torch.manual_seed(10_000 + seed)  # the same initial student for every method of a seed (paired runs)
    return models.build("resnet8", num_classes=data.num_classes, in_channels=data.in_channels, width_mult=width)


def train_student(method: str, width: float, seed: int, cfg: ExperimentConfig, *, train_part, eval_set, teacher,
                  stored_logits: Optional[torch.Tensor], kd: Dict[str, float], rounds: int, device,
                  checkpoint_dir: Optional[str] = None, final_set=None) -> Dict[str, Any]:
    """Train one ResNet-8 student with ``method`` for ``rounds`` rounds; evaluate on ``eval_set`` after each.

    Returns ``{"curve": accuracy per round, "accuracy": the trained student's on ``final_set`` (None: the
    curve's last point), "sparsity", "params", "seconds", ...}``."""
    if method not in LABELS:
        raise ValueError(f"method must be one of {', '.join(LABELS)}, got {method!r}")
    student = _student(width, train_part, seed)
    source = RoundSource(train_part, cfg.rounds_per_pass, cfg.batch_size, seed)
    engine = dict(optimizer="sgd", lr=STUDENT_SGD["lr"], momentum=STUDENT_SGD["momentum"],
                  weight_decay=STUDENT_SGD["weight_decay"], schedule="step", milestones=milestones(rounds),
                  gamma=STUDENT_SGD["gamma"], epochs=rounds, seed=seed, device=device, progress=False,
                  checkpoint_dir=checkpoint_dir, resume=checkpoint_dir is not None)
    if method == "ce":
        d = Distiller(None, student, {"ce": nn.CrossEntropyLoss()}, **engine)
    elif method == "l2":
        d = Distiller(None, student, {"ce": nn.CrossEntropyLoss()}, **{**engine, "weight_decay": L2_WEIGHT_DECAY})
    elif method == "l1":
        d = L1Distiller(student, coefficient=L1_COEFFICIENT, **engine)
    elif method == "kd":
        d = StoredLogitsDistiller(teacher, student, {"kd": KDLoss(kd["T"], alpha=kd["alpha"])},
                                  teacher_logits=stored_logits, **engine)
    else:  # kr, kr_kd
        losses = {"ce": nn.CrossEntropyLoss()} if method == "kr" else {"kd": KDLoss(kd["T"], alpha=kd["alpha"])}
        d = build(teacher, student, losses=losses, teacher_layers=TEACHER_LAYERS, student_layers=STUDENT_LAYERS,
                  k=3, example_input=train_part.images[:2], aggregation_weight=1.0, aggregator_lr=AGGREGATOR_LR,
                  aggregator_momentum=STUDENT_SGD["momentum"], aggregator_weight_decay=STUDENT_SGD["weight_decay"],
                  sparse_recoding=True, **engine)
    try:
        with common.Timer() as timer:
            history = d.fit(source, eval_loader=common.loader(eval_set, 1000, shuffle=False))
    finally:
        d.close()
    curve = [float(r["eval_accuracy"]) for r in history]
    final = curve[-1] if final_set is None else common.accuracy(student, final_set, device=device)
    return {"method": method, "width": width, "seed": seed, "params": sum(p.numel() for p in student.parameters()),
            "curve": curve, "accuracy": final, "sparsity": weight_sparsity(student), "rounds": rounds,
            "steps": rounds * source.steps_per_epoch, "seconds": timer.seconds,
            "aggregation_loss": [float(r["loss/aggregation"]) for r in history if "loss/aggregation" in r]}


# ------------------------------------------------------------------------------------------ analysis
def rounds_to_reach(curve: Sequence[float], target: float) -> Optional[int]:
    """The first round (1-based) whose accuracy is at least ``target``; None when no round reaches it."""
    for i, value in enumerate(curve):
        if float(value) >= target:
            return i + 1
    return None


def _censored(curve, target) -> int:
    reached = rounds_to_reach(curve, target)
    return len(curve) + 1 if reached is None else reached  # a run that never reaches it counts one round past its end


def analyse(runs: Dict[str, Dict[str, List[Dict[str, Any]]]]) -> Dict[str, Any]:
    """Claims with paired 95 % intervals and verdicts, convergence speed and checks, sparsity, from
    ``runs[capacity][method]`` = one record of :func:`train_student` per seed (the same seeds in the same
    order for every method)."""
    acc = {c: {m: [r["accuracy"] for r in rs] for m, rs in ms.items()} for c, ms in runs.items()}
    claims = []

    def add(name, capacity, a, b, values_a, values_b, *, higher=True, unit="accuracy"):
        claims.append({"claim": name, "capacity": capacity, "a": a, "b": b, "measure": unit,
                       **protocol.claim(values_a, values_b, higher_is_claimed=higher)})

    for cap in runs:
        add("KR beats KD", cap, "kr", "kd", acc[cap]["kr"], acc[cap]["kd"])
        add("KR + KD beats KD", cap, "kr_kd", "kd", acc[cap]["kr_kd"], acc[cap]["kd"])
        add("KR beats CE", cap, "kr", "ce", acc[cap]["kr"], acc[cap]["ce"])
    speed = {}
    for cap in runs:
        # A fixed accuracy both methods reach on average: 1 point under the lower of their mean final accuracies,
        # read on the curves' own images (their last points).
        last = {m: [r["curve"][-1] for r in runs[cap][m]] for m in ("kr", "kd")}
        target = min(common.mean_std(last["kr"])[0], common.mean_std(last["kd"])[0]) - 0.01
        rounds = {m: [_censored(r["curve"], target) for r in runs[cap][m]] for m in runs[cap]}
        area = {m: [sum(r["curve"]) / len(r["curve"]) for r in runs[cap][m]] for m in runs[cap]}
        speed[cap] = {"target": target, "rounds_to_target": rounds, "mean_accuracy_over_rounds": area}
        add("KR reaches the target accuracy in fewer rounds than KD", cap, "kr", "kd",
            [float(v) for v in rounds["kr"]], [float(v) for v in rounds["kd"]], higher=False, unit="rounds")
        add("KR's mean test accuracy over the rounds beats KD's", cap, "kr", "kd", area["kr"], area["kd"],
            unit="mean accuracy over rounds")
    sparsity = {c: {m: {k: [r["sparsity"][k] for r in rs] for k in ("hoyer", "near_zero")} for m, rs in ms.items()}
                for c, ms in runs.items()}
    for cap in runs:
        for base in ("l1", "l2"):
            if base in runs[cap]:
                add(f"KR's weights are sparser (Hoyer) than {LABELS[base]}'s", cap, "kr", base,
                    sparsity[cap]["kr"]["hoyer"], sparsity[cap][base]["hoyer"], unit="Hoyer sparseness")
    curves = {f"{LABELS[m]} ({c})": [r["curve"] for r in rs] for c, ms in runs.items() for m, rs in ms.items()}
    rows, every = protocol.tail_table(curves)
    checks = {key: [protocol.convergence(cv) for cv in cvs] for key, cvs in curves.items()}
    return {"accuracy": acc, "claims": claims, "speed": speed, "sparsity": sparsity,
            "convergence": {"rows": rows, "all_converged": every, "runs": checks}}


# ------------------------------------------------------------------------------------------ figures
def _plot_curves(runs, path, title, rounds_per_pass):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = list(runs)
    fig, axes = plt.subplots(1, len(caps), figsize=(6 * len(caps), 4.2), squeeze=False)
    for ax, cap in zip(axes[0], caps):
        for m, rs in runs[cap].items():
            curves = [r["curve"] for r in rs]
            mean = [100 * sum(c) / len(c) for c in zip(*curves)]
            ax.plot(range(1, len(mean) + 1), mean, marker="o", ms=3, label=LABELS[m], color=COLOURS[m])
        params = rs[0]["params"]
        ax.set_title(f"{cap} capacity: ResNet-8, {params:,} parameters", fontsize=9)
        ax.set_xlabel(f"round (1/{rounds_per_pass} of the training part)")
        ax.set_ylabel("test accuracy (%), mean of seeds")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sparsity(runs, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels, colours, stats = [], [], {"hoyer": [], "near_zero": []}
    for cap, ms in runs.items():
        for m, rs in ms.items():
            labels.append(f"{LABELS[m]} ({cap})")
            colours.append(COLOURS[m])
            for k in stats:
                stats[k].append(common.mean_std([r["sparsity"][k] for r in rs]))
    for ax, (k, name) in zip(axes, (("hoyer", "Hoyer sparseness of the conv/linear weights"),
                                    ("near_zero", "share of weights with |w| < 0.1 mean |w| of their tensor"))):
        ax.barh(range(len(labels)), [m for m, _ in stats[k]], xerr=[s for _, s in stats[k]], color=colours)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel(name + " (mean ± std of seeds)", fontsize=8)
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the experiment
def _check_config(out_dir: str, record: Dict[str, Any]) -> None:
    """Refuse to mix runs of two configurations in one output directory (a resumed experiment must use the
    same settings); the first run writes ``config.json``."""
    differ = protocol.settings_differ(os.path.join(out_dir, "config.json"), record)
    if differ:
        raise ValueError(f"{out_dir} holds runs of another configuration (differing: {', '.join(differ)}); "
                         "pass another --out, or delete the directory to start over")


def run(out_dir: str, *, dataset: str = "digits", data_root=None, budget: str = "quick", seeds=None,
        device: str = "cpu") -> dict:
    """``kdfast experiment kr``: issue 22's KR protocol (see the module docstring). "full": seeds 0, 1, 2,
    20 rounds of a tenth of the training part per run (55.5 minutes measured on 2 idle cores), a 6-setting KD
    grid; "quick": seeds 0, 1, 4 rounds
    on a 10,000 / 2,000-image subset (datasets other than digits), a 2-setting grid and a 3-epoch teacher.
    Interrupted runs resume (``<out_dir>/runs``, ``<out_dir>/checkpoints``). Writes report.md, results.json,
    kr_curves.png and kr_sparsity.png."""
    seeds = common.check_run(dataset, budget, seeds, device)
    cfg = _config(budget, dataset)
    if seeds is not None:
        cfg.seeds = tuple(seeds)
    if len(cfg.seeds) < 2:
        raise ValueError(f"seeds must hold at least 2 seeds for paired intervals, got {list(cfg.seeds)}")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    train, test = common.load_data(dataset, data_root, train_subset=cfg.train_subset, test_subset=cfg.test_subset)
    train_part, val = protocol.validation_split(train, 0.1, seed=0)
    curve_set = common.stratified_images(test, cfg.curve_images)
    overrides = {} if cfg.teacher_epochs is None else {"epochs": cfg.teacher_epochs}
    teacher, _, teacher_acc, teacher_info = protocol.reference_teacher(dataset, train_part, test, device=device,
                                                                       **overrides)
    _check_config(out_dir, {"config": asdict(cfg), "dataset": dataset, "teacher": teacher_info["path"],
                            "train": len(train_part), "validation": len(val), "test": len(test)})
    store = protocol.RunStore(out_dir)
    stored = {}

    def logits():
        if "train" not in stored:
            with common.Timer() as t:
                stored["train"] = teacher_logits(teacher, train_part, device)
            stored["seconds"] = t.seconds
        return stored["train"]

    def one(key, method, width, seed, kd, rounds, eval_set, final_set=None):
        def train_it():
            return train_student(method, width, seed, cfg, train_part=train_part, eval_set=eval_set,
                                 teacher=teacher, stored_logits=logits() if method == "kd" else None, kd=kd,
                                 rounds=rounds, device=device, checkpoint_dir=store.checkpoint_dir(key),
                                 final_set=final_set)
        return store.run(key, train_it)

    with common.Timer() as t_all:
        tuning = {}
        for cap, width in cfg.capacities.items():
            tuning[cap] = protocol.tune_on_validation(list(cfg.kd_grid), lambda s, cap=cap, width=width: one(
                f"tune-{cap}-T{s['T']:g}-alpha{s['alpha']:g}", "kd", width, cfg.seeds[0], s, cfg.tune_rounds,
                val)["accuracy"])
        runs = {cap: {m: [] for m in METHODS[cap]} for cap in cfg.capacities}
        for seed in cfg.seeds:  # seeds outermost: an interrupted experiment has whole seeds done
            for cap, width in cfg.capacities.items():
                for m in METHODS[cap]:
                    runs[cap][m].append(one(f"{cap}-{m}-seed{seed}", m, width, seed, tuning[cap]["best"],
                                            cfg.rounds, curve_set, final_set=test))
    results = {"teacher": {"name": protocol.REFERENCE_TEACHER["name"], "accuracy": teacher_acc, **teacher_info,
                           "params": sum(p.numel() for p in teacher.parameters())},
               "config": asdict(cfg), "milestones": milestones(cfg.rounds), "tuning": tuning, "runs": runs,
               **analyse(runs), "interpretations": INTERPRETATIONS, "time_s": t_all.seconds,
               "student_seconds": sum(r["seconds"] for ms in runs.values() for rs in ms.values() for r in rs),
               "tuning_seconds": sum(store.get(f"tune-{c}-T{s['T']:g}-alpha{s['alpha']:g}")["seconds"]
                                     for c in cfg.capacities for s in cfg.kd_grid),
               "teacher_logits_seconds": stored.get("seconds", 0.0),
               "data": {**common.data_info(train, test, dataset, data_root), "train_part": len(train_part),
                        "validation": len(val), "curve": len(curve_set)},
               "run": common.run_record(NAME, out_dir, dataset=dataset, data_root=data_root, budget=budget,
                                        seeds=list(cfg.seeds), device=device)}
    title = f"KR on {dataset}: ResNet-26 teacher, ResNet-8 students"
    _plot_curves(runs, os.path.join(out_dir, "kr_curves.png"), title + ", test accuracy per round",
                 cfg.rounds_per_pass)
    _plot_sparsity(runs, os.path.join(out_dir, "kr_sparsity.png"), title + ", sparsity of the final weights")
    common.write_report(out_dir, render_report(results), results)
    return results


# ------------------------------------------------------------------------------------------ the report
def _pct(v, digits=2):
    return "—" if v is None else f"{100 * v:.{digits}f}"


def _claim_row(c) -> str:
    scale, digits, unit = {"rounds": (1, 2, " rounds"), "Hoyer sparseness": (1, 4, "")}.get(c["measure"], (100, 2, " points"))
    return (f"| {c['claim']} | {c['capacity']} | {c['measure']} | {scale * c['mean']:+.{digits}f}{unit} | "
            f"{common.fmt_ci(c['ci95'], scale, digits)} | **{c['verdict']}** |")


def render_report(r: Dict[str, Any]) -> str:
    cfg, runs, data = r["config"], r["runs"], r["data"]
    seeds = list(cfg["seeds"])
    params = {cap: ms["ce"][0]["params"] for cap, ms in runs.items()}
    steps = {cap: ms["ce"][0]["steps"] for cap, ms in runs.items()}
    t = r["teacher"]
    lines = [
        f"# Knowledge Representing on {data['name']}: KR vs a tuned KD for ResNet-8 students",
        "",
        f"*{PAPER}*. The paper's equations are not available and there is no public code: kdfast's KR is an "
        "interpretation of the paper's text, and so is every setting listed under *Interpretations* below.",
        "",
        f"Command: `{r['run']['command']}`",
        "",
        "## Setting",
        "",
        f"- Data: {data['train_part']:,} training images (the training part of a class-stratified 10 % validation "
        f"split, seed 0), {data['validation']:,} validation images (KD's grid only), {data['test']:,} test images, "
        f"{data['image_size']}x{data['image_size']}, no augmentation.",
        f"- Teacher: {t['name']} ({t['params']:,} parameters), protocol.reference_teacher, test accuracy "
        f"{_pct(t['accuracy'])} %; " + ("read from the cache" if t.get("cached") else
                                       f"trained in {t['train_s'] / 60:.1f} min") +
        " (not counted in the experiment's time).",
        "- Students: ResNet-8 at width 1 (the paper's capacity regime: "
        f"{params.get('paper', 0):,} parameters, the nearest kdfast ResNet-8 to the paper's 0.09 M) and at width "
        f"0.25 (low capacity: {params.get('low', 0):,} parameters).",
        f"- Every student: SGD lr 0.01, momentum 0.9, weight decay 1e-5 (the paper's Eq. 10), batch {cfg['batch_size']}, "
        f"{cfg['rounds']} rounds of 1/{cfg['rounds_per_pass']} of the training part "
        f"({steps.get('paper', 0)} steps), lr x0.1 after rounds {r['milestones']}; KR's aggregators SGD lr 0.1 "
        "(Eq. 9) with the same steps.",
        f"- Seeds {seeds}; each seed gives every method the same initial student and the same batches, so "
        "differences are paired by seed (95 % t intervals).",
        "",
        "## KD tuned on the validation split",
        "",
        f"Each setting trained seed {seeds[0]} for {cfg['tune_rounds']} rounds; the best validation accuracy "
        "is used for KD and KR + KD (never the test set).",
        "",
        "| capacity | T | alpha | validation accuracy (%) |",
        "|---|---|---|---|",
    ]
    for cap, tu in r["tuning"].items():
        for row in tu["table"]:
            best = " **(chosen)**" if row["setting"] == tu["best"] else ""
            lines.append(f"| {cap} | {row['setting']['T']:g} | {row['setting']['alpha']:g} | "
                         f"{_pct(row['val_accuracy'])}{best} |")
    lines += ["", "## Test accuracy after the last round", "",
              "| capacity | method | test accuracy (%) | vs KD (paired, points) | 95 % interval |", "|---|---|---|---|---|"]
    for cap, ms in runs.items():
        kd = r["accuracy"][cap]["kd"]
        for m in ms:
            a = r["accuracy"][cap][m]
            if m == "kd":
                lines.append(f"| {cap} | {LABELS[m]} | {common.fmt_mean_std(a)} | — | — |")
            else:
                p = common.paired_summary(a, kd)
                lines.append(f"| {cap} | {LABELS[m]} | {common.fmt_mean_std(a)} | {100 * p['mean']:+.2f} | "
                             f"{common.fmt_ci(p['ci95'])} |")
    lines += ["", "## Claims", "",
              "Verdict from the paired 95 % interval: *reproduced* when it lies wholly on the claimed side of 0, "
              "*not reproduced* when wholly on the other, *inconclusive* when it straddles 0.", "",
              "| claim | capacity | measure | paired difference (A − B) | 95 % interval | verdict |",
              "|---|---|---|---|---|---|"]
    lines += [_claim_row(c) for c in r["claims"]]
    lines += ["", "## Convergence speed", "",
              "Target: one point under the lower of KR's and KD's mean accuracies after the last round, on the "
              "curve's images (both reach it on average); a run that never reaches it counts one round past its "
              "end.", "",
              "| capacity | target (%) | method | rounds to the target | mean test accuracy over the rounds (%) |",
              "|---|---|---|---|---|"]
    for cap, sp in r["speed"].items():
        for m in runs[cap]:
            rounds = sp["rounds_to_target"][m]
            lines.append(f"| {cap} | {_pct(sp['target'])} | {LABELS[m]} | {', '.join(map(str, rounds))} | "
                         f"{common.fmt_mean_std(sp['mean_accuracy_over_rounds'][m])} |")
    conv = r["convergence"]
    lines += ["", "![test accuracy per round](kr_curves.png)", "",
              "## Did the runs converge?", "",
              "Converged: the last 20 % of the rounds move test accuracy by less than 1 point "
              f"(protocol.convergence), on the curve's {data.get('curve', data['test']):,} test images"
              + (" (a class-stratified subset, the same for every run; the accuracies above are on every test "
                 "image)." if data.get("curve", data["test"]) < data["test"] else "."), "",
              "| method | runs converged | largest move in the last 20 % |", "|---|---|---|", *conv["rows"], "",
              ("Every run converged by this test." if conv["all_converged"] else
               "**Budget too small:** not every run converged by this test, so the accuracies above are not "
               "final ones."),
              "",
              f"The lr steps down after rounds {r['milestones']}, so the last rounds run at 1/100 of the initial lr: "
              "a flat tail says the schedule ended, not that more steps would not help (the paper's schedule is "
              "about 60 times longer).",
              "", "## Sparsity of the final weights (the paper's Fig. 2/4 comparison)", "",
              "Scale-free measures of the conv and linear weights (BatchNorm follows every conv, so a conv's scale "
              "does not change the function): Hoyer's sparseness (0: all entries of equal magnitude, 1: one "
              "non-zero entry) and the share of entries under a tenth of their tensor's mean |w|. CE + L1: "
              f"{L1_COEFFICIENT:g} · Σ|w|; CE + L2: weight decay {L2_WEIGHT_DECAY:g} (the other students: 1e-5).", "",
              "| capacity | method | Hoyer sparseness | near-zero share |", "|---|---|---|---|"]
    for cap, ms in r["sparsity"].items():
        for m, v in ms.items():
            lines.append(f"| {cap} | {LABELS[m]} | {common.fmt_mean_std(v['hoyer'], 1, 4)} | "
                         f"{common.fmt_mean_std(v['near_zero'], 1, 4)} |")
    lines += ["", "![sparsity](kr_sparsity.png)", "", "## Interpretations", ""]
    lines += [f"- {i}" for i in r["interpretations"]]
    lines += ["", "## Time", "",
              f"Students {r['student_seconds'] / 60:.1f} min, KD grid {r['tuning_seconds'] / 60:.1f} min, teacher "
              f"logits {r['teacher_logits_seconds']:.0f} s; the experiment took {r['time_s'] / 60:.1f} min in this "
              "process (runs finished by an earlier, interrupted process are read from `runs/` and not timed "
              "again).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the tour's section
def _block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallNet(nn.Module):
    """Conv-BN-ReLU blocks, global average pooling, linear classifier (the experiment's teacher and weak
    student). ``feature_layers`` lists the block outputs."""

    def __init__(self, channels, strides, num_classes=10, in_channels=1):
        super().__init__()
        chans = [in_channels, *channels]
        self.blocks = nn.Sequential(*[_block(chans[i], chans[i + 1], s) for i, s in enumerate(strides)])
        self.fc = nn.Linear(chans[-1], num_classes)
        self.feature_layers = [f"blocks.{i}" for i in range(len(channels))]

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3)))


def weak_student(in_channels=1, num_classes=10) -> SmallNet:
    """About 500 parameters: far below any teacher's capacity (where prior knowledge should matter most)."""
    return SmallNet([4, 8], [1, 2], num_classes, in_channels)


def _run_student(variant, teacher, train_set, test_set, epochs, seed, device, recoding=None):
    """One weak student trained with ``variant`` ("ce", "kd", "kr"); returns accuracy, curve, sparsity."""
    from ..distill import Distiller, evaluate
    from ..losses import KDLoss
    torch.manual_seed(1000 + seed)
    student = weak_student(train_set.in_channels, train_set.num_classes)
    engine = dict(device=device, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", epochs=epochs,
                  seed=seed, progress=False)
    if variant == "ce":
        d = Distiller(None, student, {"ce": nn.CrossEntropyLoss()}, **engine)
    elif variant == "kd":
        d = Distiller(teacher, student, {"kd": KDLoss(4.0, alpha=0.9)}, **engine)
    else:
        t_layers = list(teacher.feature_layers)
        d = build(teacher, student, teacher_layers=t_layers, student_layers=student.feature_layers,
                  k=len(t_layers) // 2 if len(t_layers) % 2 == 0 else None,  # None: near-equal groups
                  example_input=train_set.images[:2], sparse_recoding=recoding if recoding is not None else False,
                  **engine)
    train_eval = common.loader(train_set, 256, shuffle=False)
    curve = []
    engine_end = d.on_epoch_end

    def on_epoch_end(epoch, record):  # the student's train CE after each epoch
        engine_end(epoch, record)
        curve.append(evaluate(d.student, train_eval, device=device)["loss"])

    d.on_epoch_end = on_epoch_end
    with common.Timer() as timer:
        d.fit(common.loader(train_set, 64, seed=seed))
    acc = evaluate(d.student, common.loader(test_set, 256, shuffle=False), device=device)["accuracy"]
    d.close()
    return {"test_accuracy": acc, "train_ce_curve": curve, "near_zero_share": weight_sparsity(student)["near_zero"],
            "seconds": timer.seconds}


def _compare(teacher, train_set, test_set, variants, epochs, seeds, device):
    results = {}
    for label, variant, recoding in variants:
        results[label] = [_run_student(variant, teacher, train_set, test_set, epochs, s, device, recoding)
                          for s in seeds]
    return results


def _table(results) -> list:
    lines = ["| student trained with | test accuracy (%) | vs KD (paired, points) | vs KD, 95 % CI (t) | final train CE | "
             "near-zero weights |",
             "|---|---|---|---|---|---|"]
    kd = [r["test_accuracy"] for r in results.get("KD", [])]
    for label, runs in results.items():
        accs = [r["test_accuracy"] for r in runs]
        diff = common.fmt_mean_std(common.paired_differences(accs, kd)) if kd and label != "KD" else "—"
        ci = common.fmt_ci(common.paired_summary(accs, kd)["ci95"]) if kd and label != "KD" else "—"
        ce = common.mean_std([r["train_ce_curve"][-1] for r in runs])[0]
        nz = common.mean_std([r["near_zero_share"] for r in runs])[0]
        lines.append(f"| {label} | {common.fmt_mean_std(accs)} | {diff} | {ci} | {ce:.4f} | {nz:.3f} |")
    return lines


def _plot(results, teacher_acc, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(results)
    for i, name in enumerate(names):
        curves = [r["train_ce_curve"] for r in results[name]]
        mean = [sum(c) / len(c) for c in zip(*curves)]
        ax1.plot(range(1, len(mean) + 1), mean, label=name, color=f"C{i}")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train cross-entropy of the student (mean of seeds)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    stats = [common.mean_std([100 * r["test_accuracy"] for r in results[n]]) for n in names]
    ax2.barh(range(len(names)), [m for m, _ in stats], xerr=[s for _, s in stats], color=[f"C{i}" for i in range(len(names))])
    ax2.set_yticks(range(len(names)), names, fontsize=7)
    ax2.axvline(100 * teacher_acc, color="k", ls="--", lw=1, label="teacher")
    ax2.set_xlim(max(0.0, min(m - s for m, s in stats) - 5), 100)
    ax2.set_xlabel("test accuracy (%), mean ± std over seeds")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def demo_section(ctx: common.DemoContext) -> common.DemoSection:
    """CE vs KD vs KR (with the default sparse recoding) for the weak student, from the tour's teacher."""
    epochs = 1 if ctx.tiny else 6
    variants = [("CE", "ce", None), ("KD", "kd", None), ("KR", "kr", {})]
    with common.Timer() as timer:
        results = _compare(ctx.teacher, ctx.train_set, ctx.test_set, variants, epochs, ctx.seeds, ctx.device)
    _plot(results, common.accuracy(ctx.teacher, ctx.test_set, ctx.device), os.path.join(ctx.out_dir, "kr.png"),
          "KR: weak student from the tour's teacher")
    lines = [
        f"The tour's teacher ({ctx.teacher_name}) distilled into a weak 2-block student "
        f"({sum(p.numel() for p in weak_student().parameters())} parameters), {epochs} epochs per run, seeds "
        f"{ctx.seeds}: CE only, Hinton KD, and KR (KD + knowledge aggregation of the teacher's stage outputs into "
        "the student's two blocks + sparse recoding of the student's gradients with the default setting). "
        "KR is kdfast's interpretation of the paper's text (no public code, equations not available).",
        "",
        *_table(results),
        "",
        "![KR](kr.png)",
        "",
        f"Section time {timer.seconds:.0f} s. `kdfast experiment kr --dataset fashion-mnist --budget full` runs the "
        "reproduction: the reference ResNet-26 teacher, ResNet-8 students at the paper's capacity and a smaller one, "
        "CE / tuned KD / KR / KR + KD over 3 seeds, convergence curves and weight sparsity against L1 and L2.",
    ]
    return common.DemoSection(name=NAME, title=TITLE, markdown="\n".join(lines), results={"runs": results},
                              figures=["kr.png"], time_s=timer.seconds)
