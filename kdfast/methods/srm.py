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

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


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
    rows = F.embedding_bag(indices.reshape(-1, k), dictionary.t(), per_sample_weights=values.reshape(-1, k),
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


def dictionary_loss(dictionaries, teacher_features) -> torch.Tensor:
    """Stage A's objective: sum over layers of MSE(x, C s_hat) (the official ``codeword_epoch_trainer``)."""
    return sum(F.mse_loss(d(f), f) for d, f in zip(dictionaries, teacher_features))


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
