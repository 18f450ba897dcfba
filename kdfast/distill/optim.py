"""Optimizer and LR-schedule specifications, shared by the student and every auxiliary trainable."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn


#: The schedule stepped after every training step instead of once per epoch.
STEPWISE = "cosine_steps"


@dataclass
class OptimizerSpec:
    """How to build one optimizer and its LR schedule.

    ``optimizer``: "sgd" | "adam" | callable(params) -> torch.optim.Optimizer.
    ``schedule``: None | "step" (MultiStepLR(milestones, gamma)) | "cosine" (T_max = epochs) |
    callable(optimizer) -> LR scheduler, each stepped once per epoch; or "cosine_steps": cosine annealing
    over every training step of the run (T_max = epochs x steps per epoch), stepped after each step, so
    the LR falls smoothly to 0 within the last epoch instead of staying at one value per epoch.
    """

    optimizer: Union[str, Callable] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: Union[None, str, Callable] = None
    milestones: Optional[Sequence[int]] = None
    gamma: float = 0.1

    def check(self, where: str = "") -> None:
        prefix = f"{where}: " if where else ""
        if not callable(self.optimizer):
            if self.optimizer not in ("sgd", "adam"):
                raise ValueError(f"{prefix}optimizer must be 'sgd', 'adam' or a callable(params) -> Optimizer, "
                                 f"got {self.optimizer!r}")
            if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr >= 0:
                raise ValueError(f"{prefix}lr must be a non-negative number, got {self.lr!r}")
        sched = self.schedule
        if sched is None or callable(sched) or sched in ("cosine", STEPWISE):
            return
        if sched == "step":
            if self.milestones is None or not all(isinstance(m, int) and m > 0 for m in self.milestones):
                raise ValueError(f"{prefix}schedule='step' needs milestones, a list of positive epoch numbers, "
                                 f"got {self.milestones!r}")
            return
        raise ValueError(f"{prefix}schedule must be 'step', 'cosine', '{STEPWISE}', None or a callable(optimizer) "
                         "-> scheduler, "
                         f"got {sched!r}")

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        if callable(self.optimizer):
            optimizer = self.optimizer(params)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError("the optimizer factory must return a torch.optim.Optimizer, "
                                f"got {type(optimizer).__name__}")
            return optimizer
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   nesterov=self.nesterov)
        return torch.optim.Adam(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)

    @property
    def per_step(self) -> bool:
        """Whether the schedule is stepped after every training step (else once per epoch)."""
        return self.schedule == STEPWISE

    def build_scheduler(self, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: Optional[int] = None):
        if self.schedule is None:
            return None
        if callable(self.schedule):
            return self.schedule(optimizer)
        if self.schedule == "step":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(self.milestones), gamma=self.gamma)
        if self.per_step:
            if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
                raise ValueError(f"schedule={STEPWISE!r} needs the number of steps per epoch (an int >= 1), "
                                 f"got {steps_per_epoch!r}")
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


@dataclass
class Auxiliary:
    """An extra trainable module of a method (KR's aggregators, a data-free generator, SRM dictionaries).

    The engine moves it to the device, wraps it in DDP under torchrun (``ddp=True``), builds its optimizer
    and schedule from ``spec``, unscales (AMP), clips (``grad_clip``) and steps it in
    :meth:`Distiller.backward_step(loss, name) <kdfast.distill.Distiller.backward_step>`, steps its
    schedule at each epoch end and checkpoints/resumes module, optimizer and schedule with the student.
    Keyword arguments other than ``module``, ``grad_clip`` and ``ddp`` are :class:`OptimizerSpec` fields
    (default: Adam, lr 1e-3, no weight decay, no schedule).
    """

    module: nn.Module
    spec: OptimizerSpec = field(default_factory=lambda: OptimizerSpec(optimizer="adam", lr=1e-3, weight_decay=0.0))
    grad_clip: Optional[float] = None
    ddp: bool = True

    def __init__(self, module: nn.Module, *, grad_clip: Optional[float] = None, ddp: bool = True, **spec):
        if not isinstance(module, nn.Module):
            raise TypeError(f"Auxiliary needs an nn.Module, got {type(module).__name__}")
        check_grad_clip(grad_clip)
        defaults = dict(optimizer="adam", lr=1e-3, weight_decay=0.0)
        defaults.update(spec)
        try:
            self.spec = OptimizerSpec(**defaults)
        except TypeError as exc:
            raise TypeError(f"Auxiliary: {exc} (valid options: {', '.join(OptimizerSpec.__dataclass_fields__)}, "
                            "grad_clip, ddp)") from None
        self.spec.check("Auxiliary")
        self.module, self.grad_clip, self.ddp = module, grad_clip, bool(ddp)


def check_grad_clip(grad_clip) -> None:
    if grad_clip is not None and (isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float))
                                  or not grad_clip > 0):
        raise ValueError(f"grad_clip must be None or a positive number, got {grad_clip!r}")
