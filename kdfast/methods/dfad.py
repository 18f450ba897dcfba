"""DFAD: Data-Free Adversarial Distillation (Fang, Song, Shen, Wang, Chen, Song, arXiv 1912.11006).

A min-max game on the model discrepancy, the mean absolute error of the logits: per iteration the
student takes 5 steps minimising it on detached generated images, then the generator one step
maximising it. As the official code (VainF/Data-Free-Adversarial-Distillation ``DFAD_mnist.py``,
``DFAD_cifar.py``): ``F.l1_loss(s_logit, t_logit)``, averaged over B * K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from ..distill import autocast, unwrap_model
from . import options as T
from .datafree_base import GENERATOR_OPTION_TYPES, Generator, GeneratorDistiller, _Frozen, infer_num_classes, split_options

NAME = "dfad"
TITLE = "DFAD: data-free adversarial distillation (student/generator min-max on the logit MAE)"
PAPER = ("Fang, Song, Shen, Wang, Chen, Song, 'Data-Free Adversarial Distillation', arXiv 1912.11006; "
         "code: VainF/Data-Free-Adversarial-Distillation (DFAD_mnist.py, DFAD_cifar.py)")

STUDENT_STEPS = 5  # student steps per generator step in the official code


def discrepancy(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between student and teacher logits: sum |z_S - z_T| / (B * K)."""
    _checks.logits("s_logits", s_logits)
    _checks.logits("t_logits", t_logits)
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"shape mismatch: s_logits is {tuple(s_logits.shape)} but t_logits is "
                         f"{tuple(t_logits.shape)}; expected the same (B, K)")
    return F.l1_loss(s_logits, t_logits)


# ------------------------------------------------------------------------------------------ engine

#: Official MNIST settings (DFAD_mnist.py): batch 512, 40 epochs x 50 iterations, nz 100, student SGD
#: lr 0.01 momentum 0.9 wd 1e-4, generator Adam lr 1e-3, GeneratorA (ngf 64, default BN eps).
#: Scaled for kdfast's digits and 2 CPU cores: batch 128, ngf 16, 10 epochs; the rest as the code.
#: ``batch_size`` is the noise batch of each of the 6 draws per step; engine keywords pass through.
OPTIONS = {
    "latent_dim": 100, "image_size": 16, "channels": 1, "ngf": 16, "bn_eps_quirk": False, "channels_last": False,
    "batch_size": 128, "collapse_warmup": 1, "steps_per_epoch": 50, "student_steps": STUDENT_STEPS, "lr_g": 1e-3,
}
OPTION_TYPES = {**GENERATOR_OPTION_TYPES, "student_steps": T.POSITIVE_INT, "lr_g": T.POSITIVE}  # check_options
ENGINE_DEFAULTS = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 10}


class DFADDistiller(GeneratorDistiller):
    """DFAD training (DFAD_mnist.py ``train``): per step, ``student_steps`` student updates, each on
    fresh noise, minimising the logit MAE on detached generated images, then one generator update
    maximising it on fresh noise. Each batch holds the (student_steps + 1) noise draws of one step.

    The generator step runs the student with its weights frozen (no weight gradient is computed;
    the official code computes and then discards the student's and the teacher's).
    """

    def __init__(self, teacher, student, *, generator, num_classes, batch_size, steps_per_epoch, gen_lr,
                 student_steps=STUDENT_STEPS, **engine_kwargs):
        self.student_steps = int(student_steps)
        if self.student_steps < 1:
            raise ValueError(f"student_steps must be >= 1, got {student_steps!r}")
        self.draws_per_step = self.student_steps + 1
        super().__init__(teacher, student, generator=generator, num_classes=num_classes, batch_size=batch_size,
                         steps_per_epoch=steps_per_epoch, gen_lr=gen_lr, **engine_kwargs)

    def training_step(self, batch):
        zs = batch.chunk(self.draws_per_step)
        for z in zs[:-1]:
            with torch.no_grad():
                x = self.generate(z)
                t_logits = self.teacher_logits(x)
            s_logits = self.student_logits(x)
            loss_s = discrepancy(s_logits, t_logits)
            self.backward_step(loss_s, "student", update_scaler=False)
        x = self.generate(zs[-1])
        t_logits = self.teacher_logits(x)
        student = unwrap_model(self.student)
        with _Frozen(student):
            s_gen = self.forward_unsynced(student, x)
        loss_g = -discrepancy(s_gen, t_logits)
        self.monitor.update(t_logits, x)
        self.backward_step(loss_g, "generator")
        return {"loss": loss_s.detach(), "parts": {"discrepancy": loss_s.detach(), "generator": loss_g.detach()},
                "logits": s_logits.detach(), "targets": None}

    def forward_unsynced(self, module, x):
        with autocast(self.device, self.amp):
            return module(x).float()


def build(teacher, student, **options) -> DFADDistiller:
    """A DFAD engine with a fresh GeneratorA-style :class:`~kdfast.methods.datafree_base.Generator` (see OPTIONS)."""
    o, engine = split_options(options, OPTIONS, ENGINE_DEFAULTS)
    generator = Generator(o["latent_dim"], o["image_size"], o["channels"], o["ngf"], o["bn_eps_quirk"],
                          o["channels_last"])
    num_classes = infer_num_classes(teacher, generator.image_shape)
    return DFADDistiller(
        teacher, student, generator=generator, num_classes=num_classes, batch_size=o["batch_size"],
        steps_per_epoch=o["steps_per_epoch"], gen_lr=o["lr_g"], student_steps=o["student_steps"],
        collapse_warmup=o["collapse_warmup"], **engine)

