"""RDSKD: Robustness and Diversity Seeking data-free KD (Han, Park, Wang, Liu, ICASSP 2021, arXiv 2011.03749).

The generator seeks authenticity (the teacher is confident), class diversity (balanced classes)
and inter-sample diversity (images far apart relative to how far apart the teacher's outputs are),
with no loss weights (kdfast adds optional ones, 1 by default, to test that claim): each of the first
two losses enters as exp(loss - its value at a reference
iteration), which penalises increments exponentially. The generator is trained first (teacher
frozen), then the student against the frozen generator with KD at T = 10 and the T^2 factor.
Formulas as the official code computes them (PengchaoHan/RDSKD ``generator-train.py``):

* one_hot = CE over both halves' logits against their argmax
* class_diversity = sum_k p_k ln p_k, p = mean softmax over both halves (natural log)
* sample_diversity = 1 / (||x_2 - x_1||_F / ||softmax(z_T2) - softmax(z_T1)||_F + 1e-20), Frobenius
  norms over the whole half-batch tensors (one scalar per batch)
* objective = exp(one_hot - prev one_hot) + exp(class_diversity - prev class_diversity) + sample_diversity,
  prev detached, 0 at the start, refreshed after iteration 1 of each epoch.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from .. import _checks
from ..distill import NoiseSource, Stage, StagedRun
from .dafl import neg_entropy_of_mean, one_hot_loss
from . import options as T
from .datafree_base import GENERATOR_OPTION_TYPES, Generator, GeneratorDistiller, infer_num_classes, split_options

NAME = "rdskd"
TITLE = "RDSKD: robustness- and diversity-seeking data-free KD (two stages, exponential loss increments)"
PAPER = ("Han, Park, Wang, Liu, 'Robustness and Diversity Seeking Data-Free Knowledge Distillation', ICASSP 2021; "
         "code: PengchaoHan/RDSKD (generator-train.py, student-train.py)")

DIVERSITY_EPS = 1e-20  # the code's `1 / (lz + 1 * 1e-20)`


def sample_diversity(t_logits_1: torch.Tensor, t_logits_2: torch.Tensor, x_1: torch.Tensor,
                     x_2: torch.Tensor) -> torch.Tensor:
    """1 / (||x_2 - x_1||_F / ||softmax(z_2) - softmax(z_1)||_F + 1e-20) over the whole half-batches."""
    lz = torch.linalg.vector_norm(x_2 - x_1) / torch.linalg.vector_norm(
        torch.softmax(t_logits_2, dim=1) - torch.softmax(t_logits_1, dim=1))
    return 1.0 / (lz + DIVERSITY_EPS)


def generator_losses(t_logits_1: torch.Tensor, t_logits_2: torch.Tensor, x_1: torch.Tensor,
                     x_2: torch.Tensor) -> Dict[str, torch.Tensor]:
    """RDSKD's three generator losses over the two halves of a batch (logits (B, K), images (B, ...))."""
    _checks.logits("t_logits_1", t_logits_1)
    _checks.logits("t_logits_2", t_logits_2)
    if t_logits_1.shape != t_logits_2.shape:
        raise ValueError(f"the halves must have the same shape: t_logits_1 is {tuple(t_logits_1.shape)} but "
                         f"t_logits_2 is {tuple(t_logits_2.shape)}")
    for name, x in (("x_1", x_1), ("x_2", x_2)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() < 2 or x.shape[0] != t_logits_1.shape[0]:
            raise ValueError(f"{name} must be (B, ...) with B = {t_logits_1.shape[0]} (the logits' batch), "
                             f"got shape {tuple(x.shape)}")
    if x_1.shape != x_2.shape:
        raise ValueError(f"the halves must have the same shape: x_1 is {tuple(x_1.shape)} but x_2 is {tuple(x_2.shape)}")
    logits = torch.cat([t_logits_1, t_logits_2])
    return {
        "one_hot": one_hot_loss(logits),
        "class_diversity": neg_entropy_of_mean(logits),
        "sample_diversity": sample_diversity(t_logits_1, t_logits_2, x_1, x_2),
    }


def generator_objective(losses: Mapping[str, torch.Tensor],
                        previous: Optional[Mapping[str, torch.Tensor]] = None, oh: float = 1.0, cd: float = 1.0,
                        sd: float = 1.0) -> torch.Tensor:
    """oh * exp(one_hot - prev) + cd * exp(class_diversity - prev) + sd * sample_diversity; ``previous``
    holds the reference values of "one_hot" and "class_diversity" (None or missing: 0, the code's start).

    The official objective has no weights (oh = cd = sd = 1, the defaults). The weights exist so that
    RDSKD's claim of robustness to hyper-parameter settings can be tested on the same relative steps as
    DAFL's loss weights (kdfast's data-free experiment); they are the counterparts of DAFL's oh / ie / a.
    """
    previous = previous or {}
    prev_oh = previous.get("one_hot", 0.0)
    prev_cd = previous.get("class_diversity", 0.0)
    prev_oh = prev_oh.detach() if isinstance(prev_oh, torch.Tensor) else prev_oh
    prev_cd = prev_cd.detach() if isinstance(prev_cd, torch.Tensor) else prev_cd
    return (oh * torch.exp(losses["one_hot"] - prev_oh) + cd * torch.exp(losses["class_diversity"] - prev_cd)
            + sd * losses["sample_diversity"])


# ------------------------------------------------------------------------------------------ engine

#: Official MNIST settings (generator-train.py, student-train.py): batch 512, generator 20 epochs x
#: 120 iterations Adam lr 1e-3, student 1000 epochs x 120 iterations Adam lr 2e-3 wd 0, KD T = 10
#: with T^2, latent 100, DAFL-style generator (BN eps 0.8) put in eval mode for the student stage.
#: Scaled for kdfast's digits and 2 CPU cores: batch 128, ngf 16, 4 generator epochs, 20 student
#: epochs; the rest as the code. ``epochs`` (an engine keyword) is the student stage's; engine keywords
#: pass through to both stages' engines, except checkpoint_dir / resume / log_path (the StagedRun's).
#: ``oh`` / ``cd`` / ``sd``: weights of the three generator terms, 1 in the code (:func:`generator_objective`).
OPTIONS = {
    "latent_dim": 100, "image_size": 16, "channels": 1, "ngf": 16, "bn_eps_quirk": True, "channels_last": False,
    "batch_size": 128, "collapse_warmup": 1, "steps_per_epoch": 120, "generator_epochs": 4, "lr_g": 1e-3, "temperature": 10.0,
    "refresh_iteration": 1, "oh": 1.0, "cd": 1.0, "sd": 1.0,
}
OPTION_TYPES = {**GENERATOR_OPTION_TYPES, "generator_epochs": T.POSITIVE_INT, "lr_g": T.POSITIVE,
                "temperature": T.POSITIVE, "refresh_iteration": T.POSITIVE_INT,
                "oh": T.NON_NEGATIVE, "cd": T.NON_NEGATIVE, "sd": T.NON_NEGATIVE}  # checked by check_options
ENGINE_DEFAULTS = {"optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "epochs": 20}
_RUN_KEYS = ("checkpoint_dir", "resume", "log_path")


class RDSKDGeneratorStage(GeneratorDistiller):
    """Stage 1 (generator-train.py): only the generator learns, against the frozen teacher. Each
    batch z is generated in one call and the teacher sees the whole batch in ONE pass (the official
    code makes two, one per half: identical results with an eval-mode teacher); the losses of the two
    halves are combined by :func:`generator_objective`. The reference values ("previous") are
    refreshed after iteration ``refresh_iteration`` of every epoch (the code: ``if i == 1``) and are
    part of the checkpoint, so a resumed run is exact. The student is not touched."""

    def __init__(self, teacher, student, *, refresh_iteration: int = 1, oh: float = 1.0, cd: float = 1.0,
                 sd: float = 1.0, **kwargs):
        super().__init__(teacher, student, **kwargs)
        self.weights = {"oh": float(oh), "cd": float(cd), "sd": float(sd)}
        if self.noise_batch < 2 or self.noise_batch % 2:
            raise ValueError(f"batch_size must be even (two halves), got {self.noise_batch}")
        self.refresh_iteration = int(refresh_iteration)
        self.previous = {}
        self._iteration = 0

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self._iteration = 0

    def training_step(self, batch):
        x = self.generate(batch)
        t_logits = self.teacher_logits(x)
        half = x.shape[0] // 2
        losses = generator_losses(t_logits[:half], t_logits[half:], x[:half], x[half:])
        loss = generator_objective(losses, self.previous, **self.weights)
        self.monitor.update(t_logits, x)
        self.backward_step(loss, "generator")
        if self._iteration == self.refresh_iteration:
            self.previous = {"one_hot": losses["one_hot"].detach(), "class_diversity": losses["class_diversity"].detach()}
        self._iteration += 1
        return {"loss": loss.detach(), "parts": {k: v.detach() for k, v in losses.items()},
                "logits": t_logits.detach(), "targets": None}

    def checkpoint_state(self):
        return {**super().checkpoint_state(), "rdskd_previous": dict(self.previous)}

    def load_checkpoint_state(self, ckpt) -> None:
        super().load_checkpoint_state(ckpt)
        self.previous = {k: v.to(self.device) for k, v in (ckpt.get("rdskd_previous") or {}).items()}


class RDSKDStudentStage(GeneratorDistiller):
    """Stage 2 (student-train.py): the student learns KD at T with the T^2 factor from the teacher on
    images of the frozen, eval-mode generator (generator and teacher under no_grad)."""

    def __init__(self, teacher, student, *, temperature: float = 10.0, **kwargs):
        super().__init__(teacher, student, train_generator=False, **kwargs)
        self.temperature = float(temperature)

    def training_step(self, batch):
        with torch.no_grad():
            x = self.generate(batch)
            t_logits = self.teacher_logits(x)
        return self.kd_student_step(x, t_logits, self.temperature)


def build(teacher, student, **options):
    """RDSKD as a :class:`kdfast.distill.StagedRun`: stage "generator" then stage "student" (see OPTIONS).
    The generator is ``run.generator``."""
    o, engine = split_options(options, OPTIONS, ENGINE_DEFAULTS)
    run_kw = {k: engine.pop(k) for k in _RUN_KEYS if k in engine}
    epochs = engine.pop("epochs")
    generator = Generator(o["latent_dim"], o["image_size"], o["channels"], o["ngf"], o["bn_eps_quirk"],
                          o["channels_last"])
    num_classes = infer_num_classes(teacher, generator.image_shape)
    common = dict(generator=generator, num_classes=num_classes, batch_size=o["batch_size"],
                  steps_per_epoch=o["steps_per_epoch"], **engine)

    def generator_stage():
        return RDSKDGeneratorStage(teacher, student, gen_lr=o["lr_g"], refresh_iteration=o["refresh_iteration"],
                                   oh=o["oh"], cd=o["cd"], sd=o["sd"],
                                   epochs=o["generator_epochs"], collapse_warmup=o["collapse_warmup"], **common)

    def student_stage():
        generator.eval()  # student-train.py: generator.eval() (BN running statistics)
        return RDSKDStudentStage(teacher, student, temperature=o["temperature"], epochs=epochs,
                                 collapse_warmup=o["collapse_warmup"], **common)

    noise = NoiseSource(o["batch_size"], (o["latent_dim"],), o["steps_per_epoch"])
    run = StagedRun([Stage("generator", epochs=o["generator_epochs"], build=generator_stage, train=noise, eval=False),
                     Stage("student", epochs=epochs, build=student_stage, train=noise)], **run_kw)
    run.generator = generator
    return run

