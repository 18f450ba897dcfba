"""What every experiment shares: the tour's section contract, data by name, teacher training and caching,
seeds and statistics (mean ± std, paired differences with 95 % confidence intervals), strict JSON and the
plotting colours.

A paper's ``demo_section(ctx)`` receives a :class:`DemoContext` (the tour's trained teacher, the digits
data, the seeds and a time budget) and returns a :class:`DemoSection` (a markdown section, its numbers and
its figures). An experiment's ``run(out_dir, *, dataset, data_root, budget, seeds, device)`` uses the
helpers below so that every experiment reads its data, trains its teacher, seeds its runs, reports
mean ± std and records how it was run the same way.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

#: The datasets ``kdfast experiment --dataset`` accepts.
DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100")
#: quick: minutes on 2 CPU cores, shows that everything runs; full: the comparison the report is about.
BUDGETS = ("quick", "full")

# dataset name -> (kdfast.data.load name, default root): the one place that maps experiment datasets to
# loaders. Without a root, kdfast.data finds fashion-mnist where the Debian package puts it, and every
# named dataset in $KDFAST_DATA/<name>.
_LOADERS = {
    "digits": ("digits", None),
    "fashion-mnist": ("fashion-mnist", None),
    "mnist": ("mnist", None),
    "cifar10": ("cifar10", None),
    "cifar100": ("cifar100", None),
}

# One colour per method across every plot of the demo and the experiments (matplotlib's tab10).
METHOD_COLOURS = {
    "teacher": "C7", "ce": "C0", "kd": "C1", "kd_nst": "C2", "kd_at": "C3", "kr": "C4", "bss": "C5",
    "dafl": "C6", "dfad": "C8", "rdskd": "C9", "srm": "C2", "noise": "C3", "kd_fsp": "C5",
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


def check_run(dataset: str, budget: str, seeds, device) -> Optional[List[int]]:
    """Validate an experiment's ``run`` arguments; returns ``seeds`` as a list of ints (None stays None)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch.cuda.is_available() is False")
    if seeds is None:
        return None
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    return [int(s) for s in seeds]


#: Training-set and test-set sizes of the quick budget on the datasets other than digits (fixed random
#: subsets: a quick run takes minutes on 2 CPU cores); the full budget reads every image.
QUICK_SUBSETS = (10000, 2000)


def quick_subsets(dataset: str, budget: str):
    """(training subset, test subset) sizes for ``dataset`` under ``budget`` (None: the whole split)."""
    return QUICK_SUBSETS if budget == "quick" and dataset != "digits" else (None, None)


def load_data(dataset: str, data_root=None, *, image_size: Optional[int] = None, pad_to: Optional[int] = None,
              train_subset: Optional[int] = None, test_subset: Optional[int] = None):
    """(train_set, test_set) of ``dataset`` (one of :data:`DATASETS`) as kdfast.data.ImageDataset.

    ``image_size`` resizes (digits: default 16, the others keep their native 28 or 32); ``pad_to`` pads
    with black (pixel value 0) borders to that size instead (LeNet-5 reads MNIST at 32x32 in the
    data-free papers). ``data_root``: the directory of the files (default: where kdfast.data looks,
    e.g. the Debian package's ``/usr/share/datasets/fashion-mnist``; docs/data.md).
    """
    from .. import data

    if dataset not in _LOADERS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    name, default_root = _LOADERS[dataset]
    root = data_root if data_root is not None else default_root
    kwargs = {} if name == "digits" else {"root": root}
    if name != "digits" and root is None and name not in data.SYSTEM_ROOTS and not os.environ.get("KDFAST_DATA"):
        raise ValueError(f"dataset {dataset!r} needs data_root (--data-root DIR): the directory of its files "
                         "(or set KDFAST_DATA, see docs/data.md)")
    sets = []
    for split, n in (("train", train_subset), ("test", test_subset)):
        ds = data.load(name, split=split, image_size=image_size, **kwargs)
        if dataset != name:
            ds.name = dataset
        if pad_to is not None:
            ds = pad(ds, pad_to)
        sets.append(subset(ds, n))
    return sets[0], sets[1]


def pad(dataset, size: int):
    """A copy of ``dataset`` with its images centred on ``size`` x ``size`` black borders (pixel value 0,
    i.e. ``-mean / std`` after normalisation)."""
    h, w = dataset.images.shape[2:]
    if (h, w) == (size, size):
        return dataset
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    black = (-torch.tensor(dataset.mean) / torch.tensor(dataset.std)).view(1, -1, 1, 1)
    images = black.to(dataset.images.dtype).expand(dataset.images.shape[0], -1, size, size).clone()
    images[:, :, top:top + h, left:left + w] = dataset.images
    out = copy.copy(dataset)
    out.images = images
    return out


def data_info(train_set, test_set, dataset: str, data_root=None) -> Dict[str, Any]:
    """What results.json records about the data."""
    return {"name": dataset, "root": None if data_root is None else os.fspath(data_root), "train": len(train_set),
            "test": len(test_set), "image_size": train_set.image_size, "channels": train_set.in_channels,
            "classes": train_set.num_classes, "mean": list(train_set.mean), "std": list(train_set.std)}


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


def stratified_images(dataset, n: Optional[int], seed: int = 0):
    """About ``n`` images of ``dataset``, class-stratified (:func:`fraction_subset` with ``n / len``): the same
    images at every call with the same seed; the whole set when ``n`` is None or not below its size."""
    if n is None or n >= len(dataset):
        return dataset
    return fraction_subset(dataset, n / len(dataset), seed=seed)


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


def cache_dir() -> str:
    """Where experiments keep trained teachers: ``$KDFAST_CACHE/teachers`` (default ``~/.cache/kdfast``)."""
    root = os.environ.get("KDFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kdfast")
    return os.path.join(root, "teachers")


def teacher_key(dataset: str, train_set, name: str, width: float, seed: int, recipe: Dict[str, Any]) -> str:
    """The cache file name of a teacher: dataset (with image size, channels and training-set size),
    architecture, seed and training recipe, so two datasets (or recipes) never share a file. The recipe's
    hash covers the data's normalisation too: a teacher trained on differently normalised inputs (e.g.
    Fashion-MNIST under MNIST's statistics, as kdfast read it before it knew the dataset) is not reused."""
    normalisation = {"mean": [round(float(m), 7) for m in train_set.mean],
                     "std": [round(float(s), 7) for s in train_set.std]}
    recipe_id = hashlib.sha1(json.dumps({**recipe, "data": normalisation}, sort_keys=True).encode()).hexdigest()[:10]
    shape = f"{train_set.in_channels}x{train_set.image_size}px-n{len(train_set)}"
    return f"{dataset}-{shape}-{name}-w{width:g}-seed{seed}-recipe{recipe_id}.pt"


def cached_teacher(dataset: str, train_set, test_set, *, name: str = "vgg8", width: float = 0.25,
                   epochs: int = 12, lr: float = 0.05, seed: int = 0, device="cpu", use_cache: bool = True):
    """:func:`train_teacher`, or the teacher a previous experiment trained with the same dataset,
    architecture, seed and recipe (a kdfast.model_file checkpoint under :func:`cache_dir`).

    Returns (teacher, model_kwargs, test accuracy, {"path": file, "cached": bool, "train_s": seconds})."""
    from .. import model_file

    recipe = {"loss": "ce", "optimizer": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 5e-4,
              "schedule": "cosine", "epochs": epochs, "batch_size": 64}
    path = os.path.join(cache_dir(), teacher_key(dataset, train_set, name, width, seed, recipe))
    if use_cache and os.path.isfile(path):
        teacher, ckpt = model_file.load_model(path, map_location=torch.device(device))
        teacher.eval().requires_grad_(False)
        acc = accuracy(teacher, test_set, device=device)
        return teacher, dict(ckpt["model_kwargs"]), acc, {"path": path, "cached": True, "train_s": 0.0}
    with Timer() as t:
        teacher, kwargs, acc = train_teacher(train_set, test_set, name=name, width=width, epochs=epochs, lr=lr,
                                             seed=seed, device=device)
    if use_cache:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        record = train_set.record() if hasattr(train_set, "record") else {"name": dataset,
                                                                          "image_size": train_set.image_size}
        model_file.save_model(path, teacher, name, kwargs, record,
                              {"role": "teacher", "recipe": recipe, "seed": seed, "test_accuracy": acc})
    return teacher, kwargs, acc, {"path": path, "cached": False, "train_s": t.seconds}


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


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(low, high): the t-distribution confidence interval of the mean of ``values`` (n - 1 degrees of
    freedom); (nan, nan) for fewer than two values."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return math.nan, math.nan
    from scipy import stats  # a dependency of scikit-learn (kdfast.data's digits)

    m, s = mean_std(values)
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * s / math.sqrt(len(values))
    return m - half, m + half


def paired_summary(a: Sequence[float], b: Sequence[float]) -> Dict[str, Any]:
    """Paired differences a - b by seed: {"diffs", "mean", "std", "ci95": [low, high]}."""
    d = paired_differences(a, b)
    m, s = mean_std(d)
    return {"diffs": d, "mean": m, "std": s, "ci95": list(confidence_interval(d))}


def fmt_ci(interval, scale: float = 100.0, digits: int = 2) -> str:
    """``"[-0.41, 2.13]"`` (scaled), or ``"—"`` when undefined (one seed)."""
    lo, hi = interval
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "—"
    return f"[{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def run_record(experiment: str, out_dir: str, *, dataset: str, data_root, budget: str, seeds, device) -> Dict[str, Any]:
    """How an experiment was run, for its results.json: the equivalent ``kdfast experiment`` command line,
    the process's argv, dataset, budget, seeds and device."""
    line = ["kdfast", "experiment", experiment, "--dataset", dataset]
    if data_root is not None:
        line += ["--data-root", os.fspath(data_root)]
    line += ["--budget", budget]
    if seeds is not None:
        line += ["--seeds", ",".join(str(s) for s in seeds)]
    line += ["--out", os.fspath(out_dir), "--device", str(device)]
    return {"experiment": experiment, "command": shlex.join(line), "argv": list(sys.argv), "dataset": dataset,
            "data_root": None if data_root is None else os.fspath(data_root), "budget": budget,
            "seeds": None if seeds is None else list(seeds), "device": str(device)}


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
