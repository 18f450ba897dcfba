"""Distiller: the knowledge-distillation training loop (single process, DDP via torchrun, AMP, exact resume).

Design notes (peers: torchdistill, RepDistiller, mdistiller):
* Losses are named and weighted like RepDistiller's ``γ·CE + α·KD + β·other`` and torchdistill's
  weighted sum of sub-terms; each loss module declares which inputs it takes (``kdfast_inputs``), so
  the trainer needs no per-method code.
* Intermediate features come from forward hooks (:class:`~kdfast.distill.FeatureTap`), as in
  torchdistill's ForwardHookManager, not from models that return feature lists (RepDistiller, mdistiller).
* Multi-GPU is torch DDP under ``torchrun`` (torchdistill does the same; RepDistiller/mdistiller have none).
* Unlike the peers, checkpoints are atomic and a resumed run reproduces the uninterrupted run exactly
  (same seed, CPU): the data order is a pure function of (seed, epoch) and the RNG states are restored.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset,
                              RandomSampler, SequentialSampler)

from .checkpoint import (CHECKPOINT_FORMAT, atomic_save, capture_rng_state, config_differences, describe,
                         load_checkpoint, restore_rng_state, seed_everything)
from .optim import Auxiliary, OptimizerSpec, check_grad_clip
from .sources import is_batch_source
from .tap import FeatureTap, as_name_list, unwrap_model

STUDENT = "student"  # the name of the student's optimizer among the trainables
LOGITS = "logits"
FEATURES = "features"
_KINDS = (LOGITS, FEATURES)
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def loss_kind(module: nn.Module) -> Optional[str]:
    """``"logits"``, ``"features"`` or None (a task loss called as ``loss(student_logits, targets)``)."""
    kind = getattr(module, "kdfast_inputs", None)
    if kind is not None and kind not in _KINDS:
        raise ValueError(
            f"{type(module).__name__}.kdfast_inputs must be 'logits' or 'features', got {kind!r}"
        )
    return kind


def split_batch(batch) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A batch is ``(inputs, targets)`` or ``(inputs, targets, index)``; returns (inputs, targets, index)."""
    if isinstance(batch, (list, tuple)):
        if len(batch) == 2:
            return batch[0], batch[1], None
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        raise ValueError(f"a batch must be (inputs, targets) or (inputs, targets, index), got {len(batch)} items")
    raise TypeError(
        f"a batch must be a tuple (inputs, targets) or (inputs, targets, index), got {type(batch).__name__}"
    )


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that items are ``(inputs, target, index)`` (for teacher-logit caching)."""

    def __init__(self, dataset: Dataset):
        if isinstance(dataset, IterableDataset):
            raise TypeError("IndexedDataset needs a map-style dataset (with __getitem__ and __len__)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if isinstance(item, (list, tuple)):
            return (*item, index)
        return item, index


@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None, amp: Optional[str] = None) -> Dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` over ``loader``.

    Batches are ``(inputs, targets[, index])``. The model is put in eval mode and its previous mode is
    restored. Returns ``{"accuracy": fraction in [0, 1], "loss": mean CE, "count": samples}``.
    """
    if device is None:
        device = next(iter(model.parameters())).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for batch in loader:
            inputs, targets, _ = split_batch(batch)
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(inputs)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
            correct += (logits.argmax(dim=1) == targets).sum()
            count += targets.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"accuracy": correct.item() / count, "loss": loss_sum.item() / count, "count": count}


def autocast(device: Union[str, torch.device], amp: Optional[str]):
    """The autocast context of the engine's forward passes: ``amp`` None (off: float32), "bf16" or
    "fp16" on ``device``'s type. Methods run their own extra forwards under it (BSS's attack, the
    data-free generators) so that they follow the run's ``amp`` setting."""
    device = torch.device(device)
    if amp is not None and amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if amp is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


class _StudentWithLosses(nn.Module):
    """The trainable part: the student plus the loss modules (HintLoss regressors have parameters).

    One module so that DDP wraps (and synchronises the gradients of) both, and the whole loss is computed
    inside the DDP forward.
    """

    def __init__(self, student: nn.Module, losses: nn.ModuleDict):
        super().__init__()
        self.student = student
        self.losses = losses
        self.kinds: Dict[str, Optional[str]] = {}
        self.student_tap: Optional[FeatureTap] = None
        self.student_layers: Dict[str, List[str]] = {}
        self.amp: Optional[str] = None
        self._student_call = [student]  # torch.compile'd forward (not registered: same parameters)

    def forward(self, inputs, targets, teacher_logits, teacher_features, weights):
        device = inputs.device
        if self.student_tap is not None:
            self.student_tap.clear()
        with autocast(device, self.amp):
            logits = self._student_call[0](inputs)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"the student must return a logits Tensor, got {type(logits).__name__}")
        student_features = self.student_tap.feature_dict if self.student_tap is not None else {}
        # Losses in float32 outside autocast: KD/feature losses are reductions sensitive to bf16/fp16.
        with torch.autocast(device_type=device.type, enabled=False):
            logits32 = logits.float()
            total = logits32.new_zeros(())
            parts = {}
            for name, module in self.losses.items():
                kind = self.kinds[name]
                if kind is None:
                    value = module(logits32, targets)
                elif kind == LOGITS:
                    value = module(logits32, teacher_logits, targets)
                else:
                    s_feats = [to_float(student_features[n]) for n in self.student_layers[name]]
                    value = module(s_feats, teacher_features[name])
                if not isinstance(value, torch.Tensor) or value.dim() != 0:
                    raise ValueError(
                        f"loss {name!r} ({type(module).__name__}) must return a scalar Tensor, got "
                        f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
                    )
                parts[name] = value
                total = total + weights[name] * value
        return logits, total, parts


def to_float(x):
    """``x`` as float32 if it is a reduced-precision floating tensor (bf16/fp16 under autocast), else
    ``x`` itself: losses are computed in float32. TypeError for anything but a Tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"a tapped feature must be a Tensor, got {type(x).__name__} (tap a layer that returns one)")
    return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x


@dataclass
class StepTensors:
    """One training step's tensors, handed to :meth:`Distiller.extra_losses`."""

    inputs: torch.Tensor                        # the batch's inputs, on the engine's device
    targets: Any                                # its targets (on the device when a Tensor)
    index: Optional[torch.Tensor]               # dataset indices (batches (inputs, targets, index)), else None
    teacher_logits: Optional[torch.Tensor]      # float32, no grad; None without a teacher
    teacher_features: Dict[str, List[torch.Tensor]]  # {feature loss name: [teacher features]}
    student_logits: torch.Tensor                # with grad


LossSpec = Union[nn.Module, Tuple[nn.Module, Union[float, Callable[[int], float]]]]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Distiller.fit`: where the run stopped and where it can resume from.

    ``epoch`` (1-based, the epoch in progress), ``step`` (optimizer steps done), ``checkpoint`` (the file a
    resumed run starts from, or None when no checkpoint was written yet), ``resume`` (the engine's resume
    setting: with False a re-run starts afresh).
    """

    def __init__(self, epoch: int, step: int, checkpoint: Optional[str], resume, stage: Optional[str] = None):
        self.epoch, self.step, self.checkpoint, self.resume, self.stage = epoch, step, checkpoint, resume, stage
        super().__init__(self.describe())

    def describe(self, how: str = "resume=True") -> str:
        """One line; ``how`` says how the user re-runs (the CLI passes "run the same command")."""
        where = f"interrupted at epoch {self.epoch}, step {self.step}" + (f" of stage {self.stage}" if self.stage else "")
        if self.checkpoint is None:
            return f"{where}; no checkpoint was written yet, so a re-run starts afresh"
        if self.resume is True or self.resume == "force":
            return f"{where}; {how} to resume from {self.checkpoint}"
        return f"{where}; the last checkpoint is {self.checkpoint} (resume from it with resume: true)"


class Distiller:
    """Train ``student`` from ``teacher`` with a weighted sum of named losses.

    Parameters
    ----------
    teacher, student : nn.Module
        The teacher is frozen: always ``eval()``, ``requires_grad_(False)``, run under ``no_grad``.
        ``teacher=None`` is allowed when every loss is a task loss (plain supervised training).
    losses : {name: module or (module, weight)}
        Each module's class attribute ``kdfast_inputs`` says how it is called:
        ``"logits"``: ``loss(student_logits, teacher_logits, targets)``;
        ``"features"``: ``loss(student_feats, teacher_feats)`` (lists of Tensors paired by position);
        absent (e.g. ``nn.CrossEntropyLoss()``): task loss ``loss(student_logits, targets)``.
        ``weight`` is a float or a function ``weight(epoch) -> float`` (0-based epoch; e.g. DKD warm-up).
        Loss modules with parameters (FitNet regressors) are optimised with the student.
    feature_layers : {loss name: (student layers, teacher layers)}
        For every "features" loss: layer names (or ``{"student": [...], "teacher": [...]}``); the i-th
        student layer is paired with the i-th teacher layer. The loss receives lists in that order.
    optimizer : "sgd" | "adam" | callable(params) -> torch.optim.Optimizer
        With ``lr``, ``momentum`` (SGD), ``weight_decay``, ``nesterov`` (SGD). ``params`` for a callable
        is the list of trainable parameters (student, then loss modules).
    schedule : "step" | "cosine" | "cosine_steps" | None | callable(optimizer) -> LR scheduler
        Stepped once per epoch. "step": MultiStepLR(``milestones``, ``gamma``); "cosine":
        CosineAnnealingLR(T_max = epochs). "cosine_steps": CosineAnnealingLR over every training step
        (T_max = epochs x batches per epoch), stepped after each step: the LR reaches 0 at the end.
    epochs : default number of epochs for :meth:`fit`.
    max_steps : default for :meth:`fit`: stop once the student has taken this many optimiser steps in
        all (None: no limit), mid-epoch if need be; a checkpoint is written there and a later run with
        a larger ``max_steps`` (or none) resumes from that step (the LR schedule still counts ``epochs``).
    device : "cpu", "cuda", "cuda:1", ... (default: CUDA if available). Under torchrun with CUDA, each
        process uses ``cuda:LOCAL_RANK``.
    amp : None | "bf16" | "fp16". Autocast for the forward passes (losses are computed in float32).
        "fp16" needs CUDA and uses ``torch.amp.GradScaler``; "bf16" works on CUDA and CPU.
    seed : seeds torch/numpy/random (``seed + rank``) at the start of a fresh run and the data order.
    grad_clip : max gradient norm (None: no clipping).
    checkpoint_dir, checkpoint_every, keep_checkpoints : every ``checkpoint_every`` epochs (and after the
        last) ``<dir>/last.pt`` is written atomically; with ``keep_checkpoints`` also ``epoch_<n>.pt``.
    resume : False | True (``<checkpoint_dir>/last.pt`` if it exists) | "force" | path of a checkpoint.
        A checkpoint records the run's configuration (``run_config``: these arguments, and sections added
        by :meth:`record_config`); resuming with another configuration raises a ValueError naming the keys
        that differ, unless ``resume="force"`` (continue from ``last.pt`` with the new settings). A resumed
        run prints ``resumed from epoch N, step S of PATH`` to stderr; Ctrl-C during :meth:`fit` raises
        :class:`TrainingInterrupted` (a KeyboardInterrupt saying where to resume from).
    log_path : JSON-lines metrics file (rank 0); ``log_every`` steps per step record (0: epoch records only).
    progress : tqdm progress bars (rank 0 only).
    cache_teacher_logits : compute teacher logits once per dataset index and reuse them in later epochs.
        Needs batches ``(inputs, targets, index)`` (wrap the dataset in :class:`IndexedDataset`), no
        feature losses, and a deterministic data pipeline: with random augmentation the cached logits
        belong to a different view of the sample than the one the student sees.
    batch_size, num_workers : used only when ``fit`` is given a Dataset instead of a DataLoader.
    distributed : "auto" (DDP when the env var WORLD_SIZE > 1, i.e. under torchrun) | True | False.
    sync_bn : convert the student's BatchNorm layers to SyncBatchNorm under DDP (CUDA/NCCL only).
    compile : False | True | dict of torch.compile kwargs, applied to the student's forward.
    ddp_kwargs : extra DistributedDataParallel arguments (e.g. ``find_unused_parameters=True`` for a
        student with parameters that some steps do not use).

    Resume and determinism: checkpoints are written at epoch ends only; a run interrupted mid-epoch
    restarts from the last epoch checkpoint and replays the lost steps. The data order depends only on
    (seed, epoch) (DistributedSampler), worker seeds and a ``collate_fn.generator`` (if the collate
    function owns a torch.Generator) are reseeded from (seed, epoch, rank), and the torch/numpy/Python
    RNG states of every rank are restored, so on CPU the resumed run is bit-identical to an uninterrupted
    one (tested). Requirements: the same seed and world size, and no other RNG source (an augmentation
    library with its own global state is not captured). On CUDA the same holds only with deterministic
    kernels (``torch.use_deterministic_algorithms(True)``); otherwise results differ in the last bits.

    auxiliaries : {name: :class:`~kdfast.distill.Auxiliary`}
        Extra trainable modules of a method (a generator, aggregators, dictionaries). Each gets its own
        optimizer and schedule (built like the student's from the Auxiliary's spec), gradient clipping,
        AMP scaling and DDP wrapper, and is checkpointed and resumed with the student. Call one with
        :meth:`auxiliary_model` (DDP-wrapped under torchrun) and update it with
        ``backward_step(loss, name)``; ``optimizers`` / ``schedulers`` map names to them.

    Method hooks (override to change the algorithm; ``kdfast.methods`` uses them):
    :meth:`training_step` (several ``backward_step(loss, name)`` calls per batch for alternating
    optimisation; return ``{"loss", "parts", "logits", "targets"}``), :meth:`before_optimizer_step`
    (edit gradients after unscale, before clipping and step), :meth:`compute_loss`,
    :meth:`teacher_forward`, :meth:`trainable_parameters`, :meth:`build_optimizer`,
    :meth:`build_scheduler`, :meth:`checkpoint_state` / :meth:`load_checkpoint_state`,
    :meth:`extra_losses` (loss terms computed from the step's tensors, added without copying
    :meth:`compute_loss`),
    :meth:`on_epoch_start` / :meth:`on_epoch_end`. ``losses`` may be empty when ``training_step`` is
    overridden. Runs made of stages: :class:`~kdfast.distill.StagedRun`.
    """

    def __init__(
        self,
        teacher: Optional[nn.Module],
        student: nn.Module,
        losses: Mapping[str, LossSpec],
        *,
        feature_layers: Optional[Mapping[str, Any]] = None,
        auxiliaries: Optional[Mapping[str, Auxiliary]] = None,
        optimizer: Union[str, Callable] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        betas: Tuple[float, float] = (0.9, 0.999),
        schedule: Union[None, str, Callable] = None,
        milestones: Optional[Sequence[int]] = None,
        gamma: float = 0.1,
        epochs: int = 1,
        max_steps: Optional[int] = None,
        device: Union[None, str, torch.device] = None,
        amp: Optional[str] = None,
        seed: int = 0,
        grad_clip: Optional[float] = None,
        checkpoint_dir: Optional[str] = None,
        checkpoint_every: int = 1,
        keep_checkpoints: bool = False,
        resume: Union[bool, str] = False,
        log_path: Optional[str] = None,
        log_every: int = 50,
        progress: bool = True,
        cache_teacher_logits: bool = False,
        batch_size: Optional[int] = None,
        num_workers: int = 0,
        distributed: Union[str, bool] = "auto",
        sync_bn: bool = False,
        compile: Union[bool, Mapping[str, Any]] = False,
        ddp_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
        self._setup_run(epochs=epochs, max_steps=max_steps, seed=seed, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                        keep_checkpoints=keep_checkpoints, resume=resume, log_path=log_path, log_every=log_every,
                        progress=progress, batch_size=batch_size, num_workers=num_workers)
        self._setup_devices(device=device, amp=amp, distributed=distributed, sync_bn=sync_bn)
        self._setup_losses(teacher, losses, feature_layers, cache_teacher_logits)
        self._setup_models(teacher, student, sync_bn=sync_bn, compile=compile, ddp_kwargs=ddp_kwargs)
        student_spec = OptimizerSpec(optimizer=optimizer, lr=lr, momentum=momentum, betas=betas,
                                     weight_decay=weight_decay, nesterov=nesterov, schedule=schedule,
                                     milestones=milestones, gamma=gamma)
        self._setup_optimisation(student_spec, grad_clip, auxiliaries or {})
        # What a checkpoint records and a resumed run must match (epochs may grow: fit's epochs is a total).
        self.run_config: Dict[str, Any] = {"engine": describe({
            "class": type(self).__name__,
            "losses": {n: (type(self.loss_modules[n]).__name__, w) for n, w in self.loss_weights.items()},
            "auxiliaries": sorted(self.auxiliaries), "optimizer": optimizer, "lr": lr, "momentum": momentum,
            "weight_decay": weight_decay, "nesterov": nesterov, "betas": betas, "schedule": schedule,
            "milestones": milestones, "gamma": gamma, "seed": seed, "amp": amp, "grad_clip": grad_clip,
            "cache_teacher_logits": cache_teacher_logits})}
        self.resumed_from: Optional[Tuple[int, int, str]] = None  # (epoch, step, path) after a resume

    def record_config(self, section: str, values: Mapping[str, Any]) -> None:
        """Add ``values`` (described: :func:`kdfast.distill.checkpoint.describe`) to what checkpoints record
        as this run's configuration under ``section`` (the YAML file, a method's options); resuming with a
        different configuration stops with the keys that differ, unless ``resume="force"``."""
        self.run_config[section] = describe(dict(values))

    # ------------------------------------------------------------------ construction, part by part
    def _setup_run(self, *, epochs, max_steps, seed, checkpoint_dir, checkpoint_every, keep_checkpoints, resume, log_path,
                   log_every, progress, batch_size, num_workers) -> None:
        """Length of the run, seed, checkpoints, logging and progress bars, Dataset batching."""
        _check_int("epochs", epochs, minimum=1)
        if max_steps is not None:
            _check_int("max_steps", max_steps, minimum=1)
        _check_int("checkpoint_every", checkpoint_every, minimum=1)
        _check_int("log_every", log_every, minimum=0)
        _check_int("seed", seed, minimum=0)
        if not isinstance(resume, (bool, str, os.PathLike)):
            raise TypeError(f"resume must be False, True, 'force' or a checkpoint path, got {resume!r}")
        if (resume is True or resume == "force") and checkpoint_dir is None:
            raise ValueError(f"resume={resume!r} needs checkpoint_dir (or pass resume=<path of a checkpoint>)")
        self.epochs = epochs
        self.max_steps = max_steps
        self.seed = seed
        self.checkpoint_dir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.resume = resume
        self.log_path = os.fspath(log_path) if log_path is not None else None
        self.log_every = log_every
        self.progress = progress
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.stage: Optional[str] = None  # set by StagedRun; recorded in checkpoints
        self.epoch = 0  # completed epochs
        self.step = 0   # optimizer steps of the student (training_step calls)
        self._epoch_batches = 0  # batches of epoch self.epoch already trained (a run stopped by max_steps)
        self._stop_at_step: Optional[int] = None
        self.data_record: Optional[Dict[str, Any]] = None  # the training data's record(), kept in checkpoints
        self.history: List[Dict[str, Any]] = []
        self._loader_generator = torch.Generator()
        self._log_file = None
        self._dataset_len = 0
        self._started = False

    def _setup_devices(self, *, device, amp, distributed, sync_bn) -> None:
        """Process group (torchrun), device, mixed precision."""
        if amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        self.amp = amp
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self._owns_process_group = False
        self._fit_failed = False  # close() meets the other ranks only when no fit() raised
        self.use_ddp = _want_distributed(distributed)
        self.device = _resolve_device(device, self.use_ddp)
        if self.amp == "fp16" and self.device.type != "cuda":
            raise ValueError(f"amp='fp16' needs a CUDA device (GradScaler); use amp='bf16' on {self.device.type}")
        if sync_bn and self.device.type != "cuda":
            raise ValueError("sync_bn=True needs CUDA devices (SyncBatchNorm runs on NCCL); on CPU use a student "
                             "without BatchNorm or accept per-process BN statistics")
        if self.use_ddp:
            self._init_distributed()
        self.is_main = self.rank == 0
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(amp == "fp16"))

    def _setup_losses(self, teacher, losses, feature_layers, cache_teacher_logits) -> None:
        """Named, weighted loss modules, how each is called, and the feature layers they read."""
        self.loss_weights: Dict[str, Union[float, Callable[[int], float]]] = {}
        modules: Dict[str, nn.Module] = {}
        kinds: Dict[str, Optional[str]] = {}
        if not isinstance(losses, Mapping):
            raise ValueError("losses must be a dict {name: loss module or (loss module, weight)}")
        if not losses and type(self).training_step is Distiller.training_step:
            raise ValueError("losses is empty: give at least one loss, or subclass Distiller and override "
                             "training_step to compute the loss yourself")
        for name, spec in losses.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"loss names must be identifiers (letters, digits, _), got {name!r}")
            module, weight = (spec if isinstance(spec, (tuple, list)) else (spec, 1.0))
            if not isinstance(module, nn.Module):
                raise TypeError(f"losses[{name!r}] must be an nn.Module (or (module, weight)), got {type(module).__name__}")
            if not (callable(weight) or isinstance(weight, (int, float))):
                raise TypeError(f"weight of loss {name!r} must be a number or a function of the epoch, got {weight!r}")
            modules[name], kinds[name], self.loss_weights[name] = module, loss_kind(module), weight
        needs_teacher = [n for n, k in kinds.items() if k is not None]
        if needs_teacher and teacher is None:
            raise ValueError(f"teacher is None but losses {needs_teacher} need teacher outputs")
        self.loss_kinds = kinds
        self.loss_modules = modules
        self.student_layers, self.teacher_layers = _parse_feature_layers(feature_layers, kinds)
        if cache_teacher_logits and self.student_layers:
            raise ValueError("cache_teacher_logits=True caches logits only, but feature losses "
                             f"{list(self.student_layers)} need a teacher forward every step")
        self.cache_teacher_logits = cache_teacher_logits
        self._teacher_cache: Optional[torch.Tensor] = None
        self._teacher_cached: Optional[torch.Tensor] = None
        self._current_weights = self.weights_at(0)

    def _setup_models(self, teacher, student, *, sync_bn, compile, ddp_kwargs) -> None:
        """Teacher (frozen), student, feature taps, torch.compile and the DDP wrapper of the trainable part."""
        self.student = student.to(self.device)
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval()
            self.teacher.requires_grad_(False)
        self.losses = nn.ModuleDict(self.loss_modules).to(self.device)
        if self.use_ddp and sync_bn:
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        student_names = sorted({n for names in self.student_layers.values() for n in names})
        teacher_names = sorted({n for names in self.teacher_layers.values() for n in names})
        self.student_tap = FeatureTap(self.student, student_names) if student_names else None
        self.teacher_tap = FeatureTap(self.teacher, teacher_names, detach=True) if teacher_names else None

        self.train_module = _StudentWithLosses(self.student, self.losses)
        self.train_module.kinds = self.loss_kinds
        self.train_module.student_tap = self.student_tap
        self.train_module.student_layers = self.student_layers
        self.train_module.amp = self.amp
        if compile:
            kw = dict(compile) if isinstance(compile, Mapping) else {}
            # Taps are registered above, before compiling, so dynamo traces the hooks.
            self.train_module._student_call[0] = torch.compile(self.student, **kw)
        self._ddp_kwargs = dict(ddp_kwargs or {})
        self.model = self._wrap_ddp(self.train_module)  # what forward/backward goes through

    def _setup_optimisation(self, student_spec: OptimizerSpec, grad_clip, auxiliaries: Mapping[str, Auxiliary]) -> None:
        """The student's optimizer and schedule, and every auxiliary trainable's."""
        student_spec.check()
        check_grad_clip(grad_clip)
        self.grad_clip = grad_clip
        self._student_spec = student_spec
        self.optimizer = self.build_optimizer(self.trainable_parameters())
        self.scheduler = None  # built by fit() (cosine needs the number of epochs)
        if not isinstance(auxiliaries, Mapping):
            raise TypeError(f"auxiliaries must be a dict {{name: Auxiliary}}, got {type(auxiliaries).__name__}")
        self.auxiliaries: Dict[str, Auxiliary] = {}
        self._aux_models: Dict[str, nn.Module] = {}
        self._aux_optimizers: Dict[str, torch.optim.Optimizer] = {}
        self._aux_schedulers: Dict[str, Any] = {}
        student_params = {id(p) for p in self.student.parameters()}
        for name, aux in auxiliaries.items():
            if not isinstance(name, str) or not name.isidentifier() or name == STUDENT:
                raise ValueError(f"auxiliary names must be identifiers other than {STUDENT!r}, got {name!r}")
            if not isinstance(aux, Auxiliary):
                raise TypeError(f"auxiliaries[{name!r}] must be a kdfast.distill.Auxiliary, got {type(aux).__name__}")
            params = [p for p in aux.module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"auxiliary {name!r} has no trainable parameters")
            if any(id(p) in student_params for p in params):
                raise ValueError(f"auxiliary {name!r} shares parameters with the student")
            aux.module.to(self.device)
            self.auxiliaries[name] = aux
            self._aux_models[name] = self._wrap_ddp(aux.module) if aux.ddp else aux.module
            self._aux_optimizers[name] = aux.spec.build_optimizer(params)
            self._aux_schedulers[name] = None  # built by fit(), as the student's

    def _wrap_ddp(self, module: nn.Module) -> nn.Module:
        if not self.use_ddp:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, **self._ddp_kwargs)

    # ------------------------------------------------------------------ trainables by name
    @property
    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        """``{"student": optimizer, <auxiliary name>: optimizer, ...}``."""
        return {STUDENT: self.optimizer, **self._aux_optimizers}

    @property
    def schedulers(self) -> Dict[str, Any]:
        """``{"student": LR scheduler or None, <auxiliary name>: ...}`` (built by :meth:`fit`)."""
        return {STUDENT: self.scheduler, **self._aux_schedulers}

    def auxiliary_model(self, name: str) -> nn.Module:
        """The auxiliary module to call in a training step (DDP-wrapped under torchrun)."""
        if name not in self._aux_models:
            raise KeyError(f"no auxiliary named {name!r}; auxiliaries: {list(self._aux_models)}")
        return self._aux_models[name]

    # ------------------------------------------------------------------ building blocks (overridable)
    def trainable_parameters(self) -> List[nn.Parameter]:
        """Parameters the optimizer updates: the student's, then the loss modules' (e.g. regressors)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.losses.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student (and loss modules) have no trainable parameters")
        return params

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        """The student's optimizer over ``params`` (the Distiller's optimizer/lr/... arguments)."""
        return self._student_spec.build_optimizer(params)

    def build_scheduler(self, optimizer, epochs: int, steps_per_epoch: Optional[int] = None):
        """The student's LR schedule (the Distiller's schedule/milestones/gamma), stepped once per epoch,
        or after every step for ``schedule="cosine_steps"`` (which needs ``steps_per_epoch``)."""
        return self._student_spec.build_scheduler(optimizer, epochs, steps_per_epoch)

    def _scheduler_per_step(self) -> Dict[str, bool]:
        """{trainable name: whether its schedule steps after every training step}."""
        return {STUDENT: self._student_spec.per_step, **{n: a.spec.per_step for n, a in self.auxiliaries.items()}}

    def weights_at(self, epoch: int) -> Dict[str, float]:
        """The loss weights used during ``epoch`` (0-based)."""
        return {n: float(w(epoch) if callable(w) else w) for n, w in self.loss_weights.items()}

    @torch.no_grad()
    def teacher_forward(self, inputs: torch.Tensor, index: Optional[torch.Tensor] = None):
        """Teacher logits (float32) and ``{loss name: [teacher features]}`` for one batch."""
        if self.teacher is None:
            return None, {}
        if self.cache_teacher_logits:
            if index is None:
                raise ValueError("cache_teacher_logits=True needs batches (inputs, targets, index): "
                                 "wrap the dataset in kdfast.distill.IndexedDataset")
            index = index.to(self.device)
            if self._teacher_cached is not None and bool(self._teacher_cached[index].all()):
                return self._teacher_cache[index], {}
        if self.teacher_tap is not None:
            self.teacher_tap.clear()
        self.teacher.eval()
        with autocast(self.device, self.amp):
            logits = self.teacher(inputs)
        logits = logits.float()
        feats = {}
        if self.teacher_tap is not None:
            by_name = self.teacher_tap.feature_dict
            feats = {loss: [to_float(by_name[n]) for n in names] for loss, names in self.teacher_layers.items()}
        if self.cache_teacher_logits:
            self._store_teacher_logits(index, logits)
        return logits, feats

    def _store_teacher_logits(self, index, logits):
        if self._teacher_cache is None:
            n = self._dataset_len
            self._teacher_cache = torch.zeros(n, *logits.shape[1:], device=self.device, dtype=torch.float32)
            self._teacher_cached = torch.zeros(n, dtype=torch.bool, device=self.device)
        if int(index.max()) >= self._teacher_cache.shape[0] or int(index.min()) < 0:
            raise ValueError(f"batch index out of range for a dataset of {self._teacher_cache.shape[0]} samples")
        self._teacher_cache[index] = logits
        self._teacher_cached[index] = True

    def compute_loss(self, batch) -> Dict[str, Any]:
        """Forward teacher and student on one batch.

        Returns ``{"loss": weighted total (with grad), "parts": {name: unweighted loss}, "logits": student
        logits, "targets": targets}``.
        """
        inputs, targets, index = split_batch(batch)
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True) if isinstance(targets, torch.Tensor) else targets
        t_logits, t_feats = self.teacher_forward(inputs, index)
        logits, total, parts = self.model(inputs, targets, t_logits, t_feats, self._current_weights)
        step = StepTensors(inputs=inputs, targets=targets, index=index, teacher_logits=t_logits,
                           teacher_features=t_feats, student_logits=logits)
        for name, term in self.extra_losses(step).items():
            if name in parts:
                raise ValueError(f"extra_losses returned {name!r}, which is already one of the losses {list(parts)}")
            weight, value = term
            if value is None:  # no term this step; recorded as 0 so every epoch record has the same keys
                parts[name] = total.new_zeros(())
                continue
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise ValueError(f"extra loss {name!r} must be a scalar Tensor or None, got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
            total = total + weight * value
            parts[name] = value.detach()
        return {"loss": total, "parts": parts, "logits": logits, "targets": targets}

    def extra_losses(self, step: "StepTensors") -> Dict[str, Tuple[float, Optional[torch.Tensor]]]:
        """Loss terms a method adds to this step, computed from the step's tensors (override; default none).

        Returns ``{name: (weight, value)}``: ``weight * value`` is added to the loss of :meth:`compute_loss`
        and ``value`` is logged as ``loss/<name>`` (value None: no term this step, logged as 0). Called once
        per step, after the teacher and student forwards, outside the DDP forward (a term that runs the
        student again, like BSS's adversarial samples, is still synchronised by the backward). ``step``
        holds the batch on the device and both models' outputs (:class:`StepTensors`)."""
        return {}

    def backward_step(self, loss: torch.Tensor, which: Union[None, str, torch.optim.Optimizer] = None, *,
                      update_scaler: bool = True, retain_graph: bool = False) -> None:
        """Update one trainable from ``loss``: zero_grad, (scaled) backward, unscale,
        :meth:`before_optimizer_step`, gradient clipping, optimizer step, scaler update.

        ``which`` names the trainable ("student", the default, or an auxiliary's name); an optimizer
        object is accepted too. With several optimizer steps per iteration (alternating optimisation),
        pass ``update_scaler=False`` to all but the last call: GradScaler is updated once per iteration.
        """
        name, optimizer = self._trainable(which)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward(retain_graph=retain_graph)  # DDP all-reduces during backward
        self.scaler.unscale_(optimizer)  # a no-op without fp16 AMP; hooks and clipping see true gradients
        self.before_optimizer_step(name, optimizer)
        clip = self.grad_clip if name == STUDENT else (self.auxiliaries[name].grad_clip if name in self.auxiliaries
                                                       else None)
        if clip is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(optimizer)
        if update_scaler:
            self.scaler.update()

    def before_optimizer_step(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Called in :meth:`backward_step` after backward and ``GradScaler.unscale_`` (so after DDP's
        all-reduce, with true gradients) and before clipping and ``optimizer.step()``. ``name`` is the
        trainable being stepped. Override to edit gradients (e.g. KR's sparse recoding)."""

    def _trainable(self, which) -> Tuple[str, torch.optim.Optimizer]:
        if which is None or which == STUDENT:
            return STUDENT, self.optimizer
        if isinstance(which, str):
            if which not in self._aux_optimizers:
                raise KeyError(f"no trainable named {which!r}; trainables: {list(self.optimizers)}")
            return which, self._aux_optimizers[which]
        if isinstance(which, torch.optim.Optimizer):
            for name, opt in self.optimizers.items():
                if opt is which:
                    return name, opt
            return "<external>", which
        raise TypeError(f"backward_step: which must be a trainable name or an optimizer, got {type(which).__name__}")

    def training_step(self, batch) -> Dict[str, Any]:
        """One optimisation step on ``batch``; returns :meth:`compute_loss`'s dict.

        Override for other update rules (e.g. alternating steps with two optimizers): call
        ``self.compute_loss(batch)`` and ``self.backward_step(loss, optimizer)`` as needed.
        """
        out = self.compute_loss(batch)
        self.backward_step(out["loss"])
        return out

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""

    def on_epoch_end(self, epoch: int, record: Dict[str, Any]) -> None:
        """Called after each epoch with its metrics record (before the checkpoint is written)."""

    def checkpoint_state(self) -> Dict[str, Any]:
        """Everything needed to resume (tensors and primitives only). Extend in subclasses."""
        return {
            "student": unwrap_model(self.student).state_dict(),
            "losses": self.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "auxiliaries": {
                name: {"module": aux.module.state_dict(), "optimizer": self._aux_optimizers[name].state_dict(),
                       "scheduler": (self._aux_schedulers[name].state_dict()
                                     if self._aux_schedulers[name] is not None else None)}
                for name, aux in self.auxiliaries.items()
            },
        }

    def load_checkpoint_state(self, ckpt: Mapping[str, Any]) -> None:
        unwrap_model(self.student).load_state_dict(ckpt["student"])
        self.losses.load_state_dict(ckpt["losses"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        saved = ckpt.get("auxiliaries", {})
        if set(saved) != set(self.auxiliaries):
            raise ValueError(f"the checkpoint holds auxiliaries {sorted(saved)}, this run has {sorted(self.auxiliaries)}")
        for name, aux in self.auxiliaries.items():
            aux.module.load_state_dict(saved[name]["module"])
            self._aux_optimizers[name].load_state_dict(saved[name]["optimizer"])
            if self._aux_schedulers[name] is not None and saved[name]["scheduler"] is not None:
                self._aux_schedulers[name].load_state_dict(saved[name]["scheduler"])

    # ------------------------------------------------------------------ fit
    def fit(self, train_loader, epochs: Optional[int] = None, eval_loader=None,
            max_steps: Optional[int] = None) -> List[Dict[str, Any]]:
        """Train until ``epochs`` epochs are completed (default: the constructor's) and return the history.

        ``max_steps`` (default: the constructor's) stops earlier, once ``step`` (optimiser steps in all,
        like ``epochs`` a total) reaches it, even mid-epoch: that epoch's record says ``"partial": True``,
        is evaluated, and a checkpoint is written; resuming with a larger or no ``max_steps`` continues
        from the next batch of that epoch (the data order is a function of (seed, epoch), so the
        already-trained batches are drawn and skipped). The resumed epoch's record averages the losses
        of the batches trained after the resume.

        ``epochs`` is a total, not an increment: after a resume, or a second call, training continues
        from the completed epochs. The LR schedule is built on the first call (cosine uses its ``epochs``).

        ``train_loader`` is a DataLoader (its dataset, batch size, collate_fn, workers, drop_last and
        shuffle flag are kept; its sampler is replaced by a DistributedSampler seeded with ``seed`` so the
        order depends only on (seed, epoch) and is sharded across DDP ranks), a map-style Dataset (then
        ``batch_size`` must be set; shuffled) or a batch source (:mod:`kdfast.distill.sources`, e.g.
        :class:`~kdfast.distill.NoiseSource`: ``steps_per_epoch`` batches drawn from a generator seeded
        from (seed, epoch, rank)). The batch size is per process.
        """
        epochs = self.epochs if epochs is None else epochs
        _check_int("epochs", epochs, minimum=1)
        max_steps = self.max_steps if max_steps is None else max_steps
        if max_steps is not None:
            _check_int("max_steps", max_steps, minimum=1)
        self._stop_at_step = max_steps
        loader, sampler = self._prepare_loader(train_loader)
        describe = getattr(getattr(loader, "dataset", None), "record", None)  # kdfast.data.ImageDataset.record
        if callable(describe):
            self.data_record = describe()
        if sampler is not None:
            self._dataset_len = len(loader.dataset)
        elif self.cache_teacher_logits:
            raise ValueError("cache_teacher_logits=True needs a dataset (batches with an index), not a batch source")
        if sampler is not None and self.cache_teacher_logits and \
                isinstance(getattr(loader.collate_fn, "generator", None), torch.Generator):
            raise ValueError("cache_teacher_logits=True with a random-augmentation collate_fn: cached teacher logits "
                             "would belong to another augmented view than the student sees; disable one of them")
        if self.scheduler is None:
            steps_per_epoch = len(loader) if sampler is not None else loader.steps_per_epoch
            self.scheduler = self.build_scheduler(self.optimizer, epochs, steps_per_epoch)
            for name, aux in self.auxiliaries.items():
                self._aux_schedulers[name] = aux.spec.build_scheduler(self._aux_optimizers[name], epochs,
                                                                      steps_per_epoch)
        resumed = False
        if not self._started:  # a second fit() call continues in-process: no reload, no reseed
            resumed = self._maybe_resume()
            if not resumed:
                seed_everything(self.seed + self.rank)
            self._started = True
        if self.log_path and self.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            if resumed:
                _truncate_log(self.log_path, self.step, self.stage)  # the replayed steps are logged again
            self._log_file = open(self.log_path, "a", encoding="utf-8")
            if resumed:
                self._log({"type": "resume", "epoch": self.epoch, "step": self.step})
        try:
            for epoch in range(self.epoch, epochs):
                if max_steps is not None and self.step >= max_steps:
                    break
                record = self._train_epoch(loader, sampler, epoch, epochs)
                if eval_loader is not None:
                    record.update(self._evaluate_main(eval_loader))
                partial = record.get("partial", False)
                if not partial:
                    self.epoch = epoch + 1
                self.history.append(record)
                if not partial:
                    self.on_epoch_end(epoch, record)
                self._log(record)
                stopped = max_steps is not None and self.step >= max_steps
                if self.checkpoint_dir and (stopped or self.epoch % self.checkpoint_every == 0
                                            or self.epoch == epochs):
                    self.save_checkpoint()
                if partial:
                    break
        except KeyboardInterrupt as exc:  # Ctrl-C: say where the run stopped and where it resumes from
            self._fit_failed = True
            if isinstance(exc, TrainingInterrupted):
                raise
            raise TrainingInterrupted(self.epoch + 1, self.step, self._last_checkpoint(), self.resume,
                                      self.stage) from None
        except BaseException:
            self._fit_failed = True
            raise
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        return self.history

    def _train_epoch(self, loader, sampler, epoch: int, epochs: int) -> Dict[str, Any]:
        self.train_module.train()
        if self.teacher is not None:
            self.teacher.eval()
        if sampler is None:  # a batch source: its own stream per (seed, epoch, rank)
            source_generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _SOURCE_STREAM + self.rank))
            batches = loader.batches(epoch, source_generator)
            return self._run_epoch(batches, loader.steps_per_epoch, epoch, epochs)
        sampler.set_epoch(epoch)
        # Worker seeds (augmentation RNG in DataLoader workers) are drawn from this generator, and a
        # collate_fn that owns a torch.Generator (batch augmentation) is reseeded: both from
        # (seed, epoch, rank), so a resumed epoch replays the same augmentation.
        self._loader_generator.manual_seed(mix_seed(self.seed, epoch, 1 + 2 * self.rank))
        collate_gen = getattr(loader.collate_fn, "generator", None)
        if isinstance(collate_gen, torch.Generator):
            collate_gen.manual_seed(mix_seed(self.seed, epoch, 2 + 2 * self.rank))
        return self._run_epoch(loader, len(loader), epoch, epochs)

    def _run_epoch(self, batches, num_batches: int, epoch: int, epochs: int) -> Dict[str, Any]:
        self._current_weights = self.weights_at(epoch)
        self.on_epoch_start(epoch)
        sums: Dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        steps = 0
        start = time.perf_counter()
        bar = _progress(batches, enabled=self.progress and self.is_main, desc=f"epoch {epoch + 1}/{epochs}",
                        total=num_batches)
        # Resuming a run stopped mid-epoch by max_steps: draw the batches it trained on and skip them
        # (drawing keeps the data order and any collate_fn randomness as in the uninterrupted run).
        skip, self._epoch_batches = self._epoch_batches, 0
        consumed = 0
        per_step = self._scheduler_per_step()
        step_schedulers = [s for n, s in self.schedulers.items() if s is not None and per_step[n]]
        for batch in bar:
            consumed += 1
            if consumed <= skip:
                continue
            out = self.training_step(batch)
            self.step += 1
            steps += 1
            if step_schedulers:  # schedule="cosine_steps": one LR step per training step
                lr_of_step = self._lr()  # the epoch record keeps the LR its last step used
                for scheduler in step_schedulers:
                    scheduler.step()
            with torch.no_grad():
                values = {"loss": out["loss"].detach(), **{f"loss/{k}": v.detach() for k, v in out["parts"].items()}}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0) + v.float()
                targets = out.get("targets")
                if isinstance(targets, torch.Tensor) and targets.dim() == 1 and out.get("logits") is not None:
                    correct += (out["logits"].argmax(dim=1) == targets).sum()
                    seen += targets.shape[0]
            if self.log_every and self.step % self.log_every == 0:
                step_record = {"type": "step", "epoch": epoch, "step": self.step, "lr": self._lr(),
                               **{k: v.item() for k, v in values.items()}}
                self._log(step_record)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{step_record['loss']:.4f}")
            if self._stop_at_step is not None and self.step >= self._stop_at_step and consumed < num_batches:
                self._epoch_batches = consumed  # max_steps reached mid-epoch: recorded in the checkpoint
                break
        if steps == 0:
            raise ValueError("the training loader yielded no batches")
        lr_used = lr_of_step if step_schedulers else self._lr()
        if not self._epoch_batches:  # an epoch schedule counts whole epochs only
            for name, scheduler in self.schedulers.items():
                if scheduler is not None and not per_step[name]:
                    scheduler.step()
        # Epoch means over all ranks (torch.distributed collectives; each rank saw its own shard).
        keys = sorted(sums)
        stats = torch.stack([sums[k] / steps for k in keys] + [correct.double().float(),
                                                               torch.tensor(float(seen), device=self.device)])
        if self.world_size > 1:
            stats = stats.to(self.device)
            dist.all_reduce(stats)
            stats[: len(keys)] /= self.world_size
        stats = stats.tolist()
        bad = [k for i, k in enumerate(keys) if not math.isfinite(stats[i])]
        if bad:
            # Checked once per epoch (not per step) to avoid a device sync every step.
            raise FloatingPointError(f"non-finite training loss in epoch {epoch}: "
                                     + ", ".join(f"{k}={stats[keys.index(k)]}" for k in bad))
        elapsed = time.perf_counter() - start
        record = {"type": "epoch", "epoch": epoch, "step": self.step, "lr": lr_used,
                  **{k: stats[i] for i, k in enumerate(keys)}, "time_s": elapsed}
        if stats[-1] > 0:
            record["train_accuracy"] = stats[-2] / stats[-1]
            record["samples_per_s"] = stats[-1] / elapsed  # all ranks together
        if self._epoch_batches:
            record["partial"] = True
            record["batches"] = self._epoch_batches
        return record

    def _evaluate_main(self, eval_loader) -> Dict[str, Any]:
        # Rank 0 evaluates the whole eval set on the unwrapped student; the others wait.
        result = {}
        if self.is_main:
            metrics = evaluate(unwrap_model(self.student), eval_loader, device=self.device, amp=self.amp)
            result = {"eval_accuracy": metrics["accuracy"], "eval_loss": metrics["loss"]}
        if self.world_size > 1:
            dist.barrier()
        return result

    def evaluate(self, loader) -> Dict[str, float]:
        """Accuracy/loss of the student on ``loader`` (see :func:`kdfast.distill.evaluate`)."""
        return evaluate(unwrap_model(self.student), loader, device=self.device, amp=self.amp)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Optional[str] = None) -> Optional[str]:
        """Write a checkpoint atomically (rank 0 writes; every rank must call it under DDP)."""
        rng = capture_rng_state()
        if self.world_size > 1:
            per_rank = [None] * self.world_size
            dist.all_gather_object(per_rank, rng)
        else:
            per_rank = [rng]
        written = None
        if self.is_main:
            if path is None:
                if self.checkpoint_dir is None:
                    raise ValueError("save_checkpoint needs a path or checkpoint_dir")
                path = os.path.join(self.checkpoint_dir, "last.pt")
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "epoch": self.epoch,
                "step": self.step,
                "seed": self.seed,
                "world_size": self.world_size,
                "rng": per_rank,
                "sampler": {"seed": self.seed, "epoch": self.epoch},
                "stage": self.stage,
                "epoch_batches": self._epoch_batches,  # > 0: stopped by max_steps inside epoch "epoch"
                "data": self.data_record,  # name, input shape, classes, normalisation of the training data
                "history": self.history,
                "config": self.run_config,
                **self.checkpoint_state(),
            }
            atomic_save(ckpt, path)
            if self.keep_checkpoints and self.checkpoint_dir is not None:
                atomic_save(ckpt, os.path.join(self.checkpoint_dir, f"epoch_{self.epoch}.pt"))
            written = path
        if self.world_size > 1:
            dist.barrier()
        return written

    def _maybe_resume(self) -> bool:
        if self.resume is False:
            return False
        force = self.resume == "force"
        if self.resume is True or force:
            path = os.path.join(self.checkpoint_dir, "last.pt")
            if not os.path.isfile(path):
                return False  # nothing to resume: fresh run
        else:
            path = os.fspath(self.resume)
        ckpt = load_checkpoint(path, map_location=self.device)
        changed = self._config_changes(ckpt.get("config"))
        if changed and not force:
            raise ValueError(
                f"{path} was written by a run with another configuration ({'; '.join(changed)}): to start afresh "
                f"use a new checkpoint folder (or delete {os.path.dirname(os.path.abspath(path))}); to continue "
                "that run with the new settings, resume with --override (resume: force / resume='force')")
        if ckpt["seed"] != self.seed:
            warnings.warn(f"resuming {path} written with seed {ckpt['seed']} using seed {self.seed}: "
                          "the data order will differ from the original run")
        try:
            self.load_checkpoint_state(ckpt)
        except RuntimeError as exc:  # load_state_dict: size mismatch / missing / unexpected keys
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            first = next((ln for ln in lines if "size mismatch" in ln), lines[-1] if lines else str(exc))
            raise ValueError(f"{path} holds models of another architecture than this run's ({first[:300]}): use a "
                             "new checkpoint folder for the new architecture") from None
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self._epoch_batches = int(ckpt.get("epoch_batches", 0))
        self.resumed_from = (self.epoch, self.step, path)
        if self.is_main:
            print(f"resumed from epoch {self.epoch}, step {self.step} of {path}"
                  + (f" (stage {self.stage})" if self.stage else "")
                  + (f"; configuration changed: {'; '.join(changed)}" if changed else ""), file=sys.stderr, flush=True)
        # a partial epoch's record is replaced by the record of the whole epoch when it completes
        self.history = [r for r in ckpt.get("history", []) if not r.get("partial")]
        rngs = ckpt["rng"]
        if len(rngs) == self.world_size:
            restore_rng_state(rngs[self.rank])
        else:
            warnings.warn(f"checkpoint written by {len(rngs)} processes, resuming with {self.world_size}: "
                          "RNG states re-seeded, the run is not bit-identical to an uninterrupted one")
            seed_everything(mix_seed(self.seed + self.rank, self.epoch, 0) % (2**31))
        return True

    def _config_changes(self, saved: Optional[Mapping[str, Any]]) -> List[str]:
        """The differences between a checkpoint's recorded configuration and this run's (none for a
        checkpoint without a record). A YAML section, when both have one, speaks for the whole run: the
        engine's keys repeat it."""
        if not saved:
            return []
        sections = [s for s in self.run_config if s in saved]
        if "yaml" in sections:
            sections = ["yaml"]
        return [d for s in sections for d in config_differences(saved[s], self.run_config[s],
                                                                "" if s == "yaml" else f"{s}.")]

    def _last_checkpoint(self) -> Optional[str]:
        """``<checkpoint_dir>/last.pt`` (what a re-run with resume=True starts from), if it exists."""
        if self.checkpoint_dir is None:
            return None
        path = os.path.join(self.checkpoint_dir, "last.pt")
        return path if os.path.isfile(path) else None

    # ------------------------------------------------------------------ helpers
    def _prepare_loader(self, train):
        if is_batch_source(train):
            steps = train.steps_per_epoch
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"a batch source's steps_per_epoch must be a positive int, got {steps!r}")
            return train, None
        if isinstance(train, DataLoader):
            dataset = train.dataset
            if isinstance(dataset, IterableDataset):
                raise ValueError("fit needs a map-style dataset (IterableDataset order cannot be resumed or sharded)")
            if train.batch_size is None or not isinstance(train.batch_sampler, BatchSampler):
                raise ValueError("fit needs a DataLoader with batch_size (custom batch samplers are not supported: "
                                 "the trainer replaces the sampler for DDP sharding and exact resume)")
            shuffle = _sampler_shuffles(train.sampler)
            batch_size, drop_last = train.batch_size, train.drop_last
            kw = dict(num_workers=train.num_workers, collate_fn=train.collate_fn, pin_memory=train.pin_memory,
                      timeout=train.timeout, worker_init_fn=train.worker_init_fn,
                      multiprocessing_context=train.multiprocessing_context,
                      persistent_workers=train.persistent_workers)
            if train.num_workers > 0:
                kw["prefetch_factor"] = train.prefetch_factor
        elif isinstance(train, Dataset) and not isinstance(train, IterableDataset):
            if self.batch_size is None:
                raise ValueError("fit was given a Dataset: set Distiller(batch_size=...) or pass a DataLoader")
            dataset, shuffle, batch_size, drop_last = train, True, self.batch_size, False
            kw = dict(num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        else:
            raise TypeError("train_loader must be a torch DataLoader, a map-style Dataset or a batch source "
                            f"(steps_per_epoch + batches(epoch, generator)), got {type(train).__name__}")
        sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle,
                                     seed=self.seed, drop_last=False)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                            generator=self._loader_generator, **kw)
        return loader, sampler

    def _init_distributed(self) -> None:
        if not dist.is_available():
            raise RuntimeError("distributed training requested but torch.distributed is not available")
        if not dist.is_initialized():
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise RuntimeError(f"distributed training needs the env vars {missing} (launch with torchrun)")
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, init_method="env://")
            self._owns_process_group = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    def close(self) -> None:
        """Remove feature hooks and destroy the process group if this Distiller created it."""
        for tap in (self.student_tap, self.teacher_tap):
            if tap is not None:
                tap.remove()
        # Drop the DDP wrappers (their reducers hold gradient hooks on the parameters): a later stage
        # wraps the same modules anew.
        self.model = self.train_module
        self._aux_models = {name: aux.module for name, aux in self.auxiliaries.items()}
        if self._owns_process_group and dist.is_initialized():
            # A rank that tears gloo down while its peer is still connected makes the peer abort
            # ("terminate called without an active exception", about 1 exit in 5 on 2 CPU cores): meet
            # first. Not after a failed fit(): the other ranks may never arrive.
            if not self._fit_failed:
                dist.barrier()
            dist.destroy_process_group()
            self._owns_process_group = False

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log(self, record: Dict[str, Any]) -> None:
        if self._log_file is None:
            return
        record = {**record, "time": time.time()}
        if self.stage is not None:
            record["stage"] = self.stage
        self._log_file.write(json_record(record) + "\n")
        self._log_file.flush()


# ---------------------------------------------------------------------- module helpers
def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _parse_feature_layers(feature_layers, kinds):
    feature_losses = [n for n, k in kinds.items() if k == FEATURES]
    feature_layers = dict(feature_layers or {})
    unknown = [n for n in feature_layers if n not in kinds]
    if unknown:
        raise ValueError(f"feature_layers names losses {unknown} that are not in losses {list(kinds)}")
    not_features = [n for n in feature_layers if kinds[n] != FEATURES]
    if not_features:
        raise ValueError(f"feature_layers given for {not_features}, which are not feature losses "
                         "(kdfast_inputs = 'features')")
    missing = [n for n in feature_losses if n not in feature_layers]
    if missing:
        raise ValueError(f"feature losses {missing} need feature_layers={{name: (student layers, teacher layers)}}")
    student, teacher = {}, {}
    for name, spec in feature_layers.items():
        if isinstance(spec, Mapping):
            extra = set(spec) - {"student", "teacher"}
            if extra or len(spec) != 2:
                raise ValueError(f"feature_layers[{name!r}] must have exactly the keys 'student' and 'teacher'")
            s, t = spec["student"], spec["teacher"]
        elif isinstance(spec, (tuple, list)) and len(spec) == 2:
            s, t = spec
        else:
            raise ValueError(f"feature_layers[{name!r}] must be (student layers, teacher layers), got {spec!r}")
        s = as_name_list(s, f"feature_layers[{name!r}] student layers")
        t = as_name_list(t, f"feature_layers[{name!r}] teacher layers")
        if len(s) != len(t):
            raise ValueError(f"feature_layers[{name!r}] pairs layers by position but has {len(s)} student and "
                             f"{len(t)} teacher layers")
        student[name], teacher[name] = s, t
    return student, teacher


def _sampler_shuffles(sampler) -> bool:
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler._num_samples is not None:
            raise ValueError("RandomSampler with replacement/num_samples is not supported by fit (use shuffle=True)")
        return True
    if isinstance(sampler, SequentialSampler):
        return False
    if isinstance(sampler, DistributedSampler):
        return sampler.shuffle
    raise ValueError(f"fit does not support the custom sampler {type(sampler).__name__}: the trainer replaces the "
                     "sampler for DDP sharding and exact resume (use shuffle=True/False)")


def _want_distributed(distributed) -> bool:
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed == "auto":
        return env_world > 1 or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
    if isinstance(distributed, bool):
        return distributed
    raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")


def _resolve_device(device, use_ddp: bool) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        if use_ddp and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


_SOURCE_STREAM = 1 << 20  # batch-source streams: _SOURCE_STREAM + rank (loader streams are 1 + 2 rank, 2 + 2 rank)


def mix_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed from (seed, epoch, stream) (splitmix-style), so streams don't collide.

    The engine seeds its data order, worker and batch-source generators with it; a method that needs a
    random stream of its own per step or epoch (BSS's target draws) seeds it with an unused ``stream``
    (the engine uses 0, 1 + 2 rank, 2 + 2 rank and 2**20 + rank)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def _progress(iterable, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but never fail training over a progress bar
        return iterable
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, total=total)


def _truncate_log(path: str, step: int, stage: Optional[str]) -> None:
    """Drop the records of ``stage`` after ``step`` (written before a crash; the resumed run replays them)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by the crash
                continue
            if isinstance(record, dict) and (record.get("stage") != stage or record.get("step", 0) <= step):
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(kept)
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def json_record(record: Mapping[str, Any]) -> str:
    """One JSON line; non-finite floats (a diverged loss) are written as null: JSON has no NaN."""
    safe = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(safe, default=_json_default, allow_nan=False)
