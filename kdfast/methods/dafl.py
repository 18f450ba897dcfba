"""DAFL: Data-Free Learning of student networks (Chen et al., ICCV 2019, arXiv 1904.01186).

A generator learns, against the frozen teacher, to produce images the teacher classifies
confidently (one-hot loss), with strong penultimate activations (activation loss) and balanced
classes over the batch (information-entropy loss); the student learns from those images by KD at
T = 1. Formulas and normalisations as the official code computes them (huawei-noah/Efficient-Computing,
``Data-Efficient-Model-Compression/DAFL/DAFL-train.py``):

* one_hot = CE(z_T, argmax z_T)
* activation = -mean |f_T| over the batch AND the feature dimension (the paper's per-sample L1 norm / d)
* info_entropy = sum_k p_k log10 p_k, p = batch mean of softmax(z_T) (log10, no 1/K; minimised)
* generator objective = oh * one_hot + ie * info_entropy + a * activation (MNIST: 1 / 5 / 0.1)
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from .. import _checks
from . import options as T
from .datafree_base import (GENERATOR_OPTION_TYPES, Generator, GeneratorDistiller, PenultimateTap, _kd,
                            infer_num_classes, split_options)

NAME = "dafl"
TITLE = "DAFL: data-free learning with a generator (one-hot, activation, information entropy)"
PAPER = ("Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu, Tian, 'Data-Free Learning of Student Networks', ICCV 2019; "
         "code: huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/DAFL/DAFL-train.py")

LOG10 = 2.302585092994046  # ln(10)


def _batch_features(name: str, x, batch: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] != batch or x.numel() == 0:
        raise ValueError(f"{name} must be (B, ...) with B = {batch} (the logits' batch) and at least one feature, "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def neg_entropy_of_mean(logits: torch.Tensor, log_base: float = 1.0) -> torch.Tensor:
    """sum_k p_k log p_k / log_base with p the batch mean of softmax(logits): minimising it balances
    the classes. ``log_base = ln 10`` gives DAFL's log10, 1.0 RDSKD's natural log.

    p is clamped to the smallest normal float before the log: equal to the official formula wherever
    that is finite, and finite (not 0 * -inf = NaN) when a class's mean probability underflows to 0.
    """
    p = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=1).mean(dim=0)
    return (p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum() / log_base


def one_hot_loss(logits: torch.Tensor) -> torch.Tensor:
    """CE(z, argmax z): the teacher should be confident on generated images (pseudo-labels, no grad)."""
    return F.cross_entropy(logits, logits.detach().argmax(dim=1))


def generator_losses(t_logits: torch.Tensor, t_features: torch.Tensor) -> Dict[str, torch.Tensor]:
    """DAFL's three generator losses from the teacher's logits (B, K) and penultimate features (B, ...)."""
    _checks.logits("t_logits", t_logits)
    _batch_features("t_features", t_features, t_logits.shape[0])
    return {
        "one_hot": one_hot_loss(t_logits),
        "activation": -t_features.abs().mean(),
        "info_entropy": neg_entropy_of_mean(t_logits, LOG10),
    }


def generator_objective(losses: Dict[str, torch.Tensor], oh: float = 1.0, ie: float = 5.0,
                        a: float = 0.1) -> torch.Tensor:
    """oh * one_hot + ie * info_entropy + a * activation (official MNIST weights 1 / 5 / 0.1)."""
    return oh * losses["one_hot"] + ie * losses["info_entropy"] + a * losses["activation"]


# ------------------------------------------------------------------------------------------ engine

#: Official MNIST settings (DAFL-train.py, README): batch 512, 200 epochs x 120 iterations, latent 100,
#: generator Adam lr 0.2, student Adam lr 2e-3, oh / ie / a = 1 / 5 / 0.1, generator widths 128 / 64.
#: Scaled for kdfast's digits (16x16x1, vgg8-0.25 teacher, 1,347 training images) and 2 CPU cores:
#: batch 128, generator widths 32 / 16 (ngf 16), 20 epochs; the rest as the code. ``batch_size`` is the
#: noise batch per step; the engine's keywords (lr, epochs, seed, checkpoint_dir, ...) pass through, with
#: ENGINE_DEFAULTS (the official student optimizer) where not given.
OPTIONS = {
    "latent_dim": 100, "image_size": 16, "channels": 1, "ngf": 16, "bn_eps_quirk": True, "channels_last": False,
    "batch_size": 128, "collapse_warmup": 1, "steps_per_epoch": 120, "lr_g": 0.2, "oh": 1.0, "ie": 5.0, "a": 0.1,
    "feature_layer": None,
}
OPTION_TYPES = {**GENERATOR_OPTION_TYPES, "lr_g": T.POSITIVE, "oh": T.NON_NEGATIVE, "ie": T.NON_NEGATIVE,
                "a": T.NON_NEGATIVE, "feature_layer": T.optional(T.STRING)}  # checked by kdfast.methods.check_options
ENGINE_DEFAULTS = {"optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "epochs": 20}


class DAFLDistiller(GeneratorDistiller):
    """DAFL training (DAFL-train.py): per step, one noise batch z; x = G(z); the generator loss
    oh * one_hot + ie * info_entropy + a * activation on the teacher's logits and penultimate features
    of x; the student's KD at T = 1 (KL, no T^2) against the teacher on x.detach(); both updated from
    the same forward (the official single backward, then optimizer_G.step() and optimizer_S.step()).

    Args: teacher, student; generator (latent_dim attribute); num_classes; batch_size,
    steps_per_epoch (noise per epoch); gen_lr; oh, ie, a; feature_layer (the teacher layer whose input
    is the penultimate feature; default its last nn.Linear); the remaining keywords go to
    :class:`kdfast.distill.Distiller` (student optimizer, lr, epochs, seed, checkpoints, ...).
    """

    def __init__(self, teacher, student, *, generator, num_classes, batch_size, steps_per_epoch, gen_lr,
                 oh=1.0, ie=5.0, a=0.1, feature_layer=None, **engine_kwargs):
        super().__init__(teacher, student, generator=generator, num_classes=num_classes, batch_size=batch_size,
                         steps_per_epoch=steps_per_epoch, gen_lr=gen_lr, **engine_kwargs)
        self.weights = {"oh": float(oh), "ie": float(ie), "a": float(a)}
        self.tap = PenultimateTap(self.teacher, feature_layer)

    def training_step(self, batch):
        x = self.generate(batch)
        t_logits = self.teacher_logits(x)
        losses = generator_losses(t_logits, self.tap.pop().float())
        loss_g = generator_objective(losses, **self.weights)
        self.monitor.update(t_logits, x)
        s_logits = self.student_logits(x.detach())
        loss_s = _kd(s_logits, t_logits.detach(), 1.0, False)
        self.backward_step(loss_s, "student", update_scaler=False)
        self.backward_step(loss_g, "generator")
        parts = {"kd": loss_s.detach(), "generator": loss_g.detach(), **{k: v.detach() for k, v in losses.items()}}
        return {"loss": loss_s.detach(), "parts": parts, "logits": s_logits.detach(), "targets": None}

    def close(self) -> None:
        self.tap.remove()
        super().close()


def build(teacher, student, **options) -> DAFLDistiller:
    """A DAFL engine with a fresh :class:`~kdfast.methods.datafree_base.Generator` (see OPTIONS)."""
    o, engine = split_options(options, OPTIONS, ENGINE_DEFAULTS)
    generator = Generator(o["latent_dim"], o["image_size"], o["channels"], o["ngf"], o["bn_eps_quirk"],
                          o["channels_last"])
    num_classes = infer_num_classes(teacher, generator.image_shape)
    return DAFLDistiller(
        teacher, student, generator=generator, num_classes=num_classes, batch_size=o["batch_size"],
        steps_per_epoch=o["steps_per_epoch"], gen_lr=o["lr_g"], oh=o["oh"], ie=o["ie"], a=o["a"],
        feature_layer=o["feature_layer"], collapse_warmup=o["collapse_warmup"], **engine)

