"""What every method module shares: the demo-section contract and the digits-experiment helpers.

A method's ``demo_section(ctx)`` receives a :class:`DemoContext` (the tour's trained teacher, the
digits data, the seeds and a time budget) and returns a :class:`DemoSection` (a markdown section,
its numbers and its figures). Experiments (``run_experiment``) use the helpers below so that every
method trains its teacher, seeds its runs and reports mean ± std the same way.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

# One colour per method across every plot of the demo and the experiments (matplotlib's tab10).
METHOD_COLOURS = {
    "teacher": "C7", "ce": "C0", "kd": "C1", "kd_nst": "C2", "kd_at": "C3", "kr": "C4", "bss": "C5",
    "dafl": "C6", "dfad": "C8", "rdskd": "C9", "srm": "C2", "noise": "C3",
}


def colour(method: str) -> str:
    return METHOD_COLOURS.get(method, "C7")


@dataclass
class DemoContext:
    """What the tour hands each method's section."""

    teacher: nn.Module                 # trained, eval mode, frozen, on ``device``
    teacher_name: str                  # kdfast.models name of the teacher (e.g. "vgg8")
    model_kwargs: Dict[str, Any]       # num_classes, in_channels, width_mult used for the teacher
    train_set: Any                     # kdfast.data.ImageDataset (digits, train split)
    test_set: Any                      # kdfast.data.ImageDataset (digits, test split)
    device: torch.device
    seeds: List[int]                   # one fine-tuning run per seed
    out_dir: str                       # the demo's output directory (figures go here)
    budget_s: float                    # seconds this section should stay within on 2 CPU cores
    tiny: bool = False                 # the seconds-long test configuration


@dataclass
class DemoSection:
    """One section of the demo report."""

    name: str                          # registry name
    title: str                         # section heading
    markdown: str                      # body (no heading)
    results: Dict[str, Any] = field(default_factory=dict)  # JSON-serialisable numbers
    figures: List[str] = field(default_factory=list)       # file names inside out_dir
    time_s: float = 0.0


# ------------------------------------------------------------------------------------------ data
def digits(image_size: int = 16, train_subset: Optional[int] = None, test_subset: Optional[int] = None):
    """(train_set, test_set): the embedded digits data, optionally a fixed random subset of each."""
    from .. import data

    train = subset(data.load("digits", split="train", image_size=image_size), train_subset)
    test = subset(data.load("digits", split="test", image_size=image_size), test_subset)
    return train, test


def subset(dataset, n: Optional[int], seed: int = 1234):
    """A fixed random subset of ``n`` items of a kdfast.data.ImageDataset (the whole set if n is None)."""
    if n is None or n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].sort().values
    sub = copy.copy(dataset)
    sub.images, sub.labels = dataset.images[idx], dataset.labels[idx]
    return sub


def fraction_subset(dataset, fraction: float, seed: int = 0):
    """A class-stratified subset with ``fraction`` of each class (at least one image per class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1:
        return dataset
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(dataset.num_classes):
        idx = (dataset.labels == c).nonzero().flatten()
        n = max(1, round(fraction * idx.numel()))
        keep.append(idx[torch.randperm(idx.numel(), generator=g)[:n]])
    keep = torch.cat(keep).sort().values
    sub = copy.copy(dataset)
    sub.images, sub.labels = dataset.images[keep], dataset.labels[keep]
    return sub


def loader(dataset, batch_size: int = 64, shuffle: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g)


# ------------------------------------------------------------------------------------------ models
def train_supervised(model: nn.Module, train_set, test_set, *, epochs: int, lr: float = 0.05, seed: int = 0,
                     batch_size: int = 64, device="cpu") -> List[Dict[str, Any]]:
    """Train ``model`` with cross-entropy (SGD 0.9, wd 5e-4, cosine); returns the epoch history."""
    from ..distill import Distiller

    trainer = Distiller(None, model, {"ce": nn.CrossEntropyLoss()}, optimizer="sgd", lr=lr, momentum=0.9,
                        weight_decay=5e-4, schedule="cosine", epochs=epochs, device=device, seed=seed,
                        progress=False)
    try:
        history = trainer.fit(loader(train_set, batch_size, seed=seed), eval_loader=loader(test_set, 256, False))
    finally:
        trainer.close()
    return history


def train_teacher(train_set, test_set, *, name: str = "vgg8", width: float = 0.25, epochs: int = 12,
                  lr: float = 0.05, seed: int = 0, device="cpu"):
    """(teacher, model_kwargs, test accuracy): a kdfast.models network trained with CE, frozen, eval mode."""
    from .. import models
    from ..distill import evaluate, seed_everything

    kwargs = {"num_classes": train_set.num_classes, "in_channels": train_set.in_channels, "width_mult": width}
    seed_everything(seed)
    teacher = models.build(name, **kwargs)
    train_supervised(teacher, train_set, test_set, epochs=epochs, lr=lr, seed=seed, device=device)
    teacher.eval().requires_grad_(False)
    acc = evaluate(teacher, loader(test_set, 256, False), device=device)["accuracy"]
    return teacher, kwargs, acc


def accuracy(model: nn.Module, dataset, device="cpu") -> float:
    """Top-1 test accuracy in [0, 1]."""
    from ..distill import evaluate

    return evaluate(model, loader(dataset, 256, False), device=device)["accuracy"]


# ------------------------------------------------------------------------------------------ statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """``"97.41 ± 1.34"`` (values scaled, e.g. fractions to %)."""
    m, s = mean_std([scale * v for v in values])
    return f"{m:.{digits}f}" if len(values) < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"


def paired_differences(a: Sequence[float], b: Sequence[float]) -> List[float]:
    """a_i - b_i for runs paired by seed."""
    if len(a) != len(b):
        raise ValueError(f"paired runs need the same number of seeds, got {len(a)} and {len(b)}")
    return [float(x) - float(y) for x, y in zip(a, b)]


# ------------------------------------------------------------------------------------------ output
def json_safe(value):
    """Replace non-finite floats by None (JSON has no NaN/Infinity) in nested dicts/lists/tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    return value


def write_json(path: str, results: Dict[str, Any]) -> None:
    """Strict JSON (NaN/inf written as null)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(json_safe(results), fh, indent=1, allow_nan=False, default=str)


def write_report(out_dir: str, markdown: str, results: Dict[str, Any]) -> None:
    """``report.md`` and ``results.json`` in ``out_dir`` (created)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown)
    write_json(os.path.join(out_dir, "results.json"), results)


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
