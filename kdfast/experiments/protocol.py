"""What every reproduction shares: a validation split carved from the training set (baselines are tuned
there, never on the test set), the choice of a setting on it, the convergence test (the last 20 % of a
schedule moves test accuracy by less than a point), a verdict per claim from a paired 95 % interval, and
a store of finished runs so an interrupted experiment continues where it stopped.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import common

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


# ------------------------------------------------------------------------------------------ data
def validation_split(dataset, fraction: float = 0.1, seed: int = 0):
    """(train, validation): a class-stratified ``fraction`` of ``dataset`` held out (at least one image
    per class), the rest kept for training. Both are copies of the kdfast.data.ImageDataset; the same seed
    gives the same split."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in range(dataset.num_classes):
        idx = (dataset.labels == c).nonzero().flatten()
        if idx.numel() < 2:
            raise ValueError(f"class {c} has {idx.numel()} image(s): a validation split needs at least 2 per class")
        n = min(idx.numel() - 1, max(1, round(fraction * idx.numel())))
        held.append(idx[torch.randperm(idx.numel(), generator=g)[:n]])
    held = torch.cat(held).sort().values
    mask = torch.ones(len(dataset), dtype=torch.bool)
    mask[held] = False
    return _take(dataset, mask.nonzero().flatten()), _take(dataset, held)


def _take(dataset, idx: torch.Tensor):
    out = copy.copy(dataset)
    out.images, out.labels = dataset.images[idx], dataset.labels[idx]
    return out


def tune_on_validation(grid: Sequence[Dict[str, Any]], score: Callable[[Dict[str, Any]], float]) -> Dict[str, Any]:
    """Score every setting of ``grid`` (``score(setting)`` returns validation accuracy) and keep the best
    (the first on ties): ``{"best": setting, "table": [{"setting", "val_accuracy"}, ...]}``."""
    if not grid:
        raise ValueError("grid must hold at least one setting")
    table = [{"setting": dict(s), "val_accuracy": float(score(dict(s)))} for s in grid]
    best = max(range(len(table)), key=lambda i: (table[i]["val_accuracy"], -i))
    return {"best": table[best]["setting"], "table": table}


# ------------------------------------------------------------------------------------------ convergence
def convergence(curve: Sequence[float], tail: float = 0.2, tolerance: float = 0.01) -> Dict[str, Any]:
    """Did a run converge? ``curve`` is test accuracy (fractions) at evenly spaced points of the schedule
    (e.g. per epoch, the last point at its end). The run converged when the accuracy moved by less than
    ``tolerance`` (0.01 = one point) over the last ``tail`` of the schedule: max - min over the points
    from the one at or before 80 % to the end. Fewer than two points: undecidable (``converged`` None)."""
    values = [float(v) for v in curve]
    if len(values) < 2:
        return {"moved": None, "converged": None, "points": len(values)}
    n = len(values)
    start = min(n - 2, int(math.floor((1 - tail) * n)) - 1) if n > 2 else 0
    start = max(0, start)
    window = values[start:]
    moved = max(window) - min(window)
    return {"moved": moved, "converged": moved < tolerance, "points": n, "from_point": start}


# ------------------------------------------------------------------------------------------ verdicts
def verdict(interval: Sequence[float], *, higher_is_claimed: bool = True) -> str:
    """The verdict on a claim "A beats B" from the 95 % interval of the paired difference A - B:
    reproduced when the whole interval lies on the claimed side of 0, not reproduced when it lies on the
    other side, inconclusive when it straddles 0 (or is undefined, e.g. one seed)."""
    lo, hi = (float("nan") if v is None else float(v) for v in interval)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if not higher_is_claimed:
        lo, hi = -hi, -lo
    if lo > 0:
        return REPRODUCED
    if hi < 0:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def claim(a: Sequence[float], b: Sequence[float], *, higher_is_claimed: bool = True) -> Dict[str, Any]:
    """Paired summary of A - B (by seed) with its verdict."""
    summary = common.paired_summary(a, b)
    return {**summary, "verdict": verdict(summary["ci95"], higher_is_claimed=higher_is_claimed)}


# ------------------------------------------------------------------------------------------ resume
class RunStore:
    """Finished runs of an experiment, one JSON file each under ``<out_dir>/runs/``, written atomically.
    An experiment asks ``store.get(key)`` before training and ``store.put(key, record)`` after, so a killed
    experiment re-run with the same command skips what finished; ``checkpoint_dir(key)`` is where that
    run's engine keeps its checkpoints (pass it with ``resume=True``) so a run cut mid-way continues
    from its last epoch."""

    def __init__(self, out_dir: str):
        self.root = os.path.join(os.fspath(out_dir), "runs")
        os.makedirs(self.root, exist_ok=True)

    def path(self, key: str) -> str:
        """The JSON file of ``key`` (a plain file name) under ``<out_dir>/runs/``."""
        if not key or any(c in key for c in "/\\") or key.startswith("."):
            raise ValueError(f"key must be a plain file name, got {key!r}")
        return os.path.join(self.root, key + ".json")

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        path = self.path(key)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)

    def put(self, key: str, record: Dict[str, Any]) -> Dict[str, Any]:
        write_atomic(self.path(key), record)
        return record

    def run(self, key: str, train: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        """The stored record of ``key``, or ``train()``'s, stored."""
        done = self.get(key)
        return done if done is not None else self.put(key, train())

    def checkpoint_dir(self, key: str) -> str:
        self.path(key)  # validates the key
        path = os.path.join(os.path.dirname(self.root), "checkpoints", key)
        os.makedirs(path, exist_ok=True)
        return path

    def keys(self) -> List[str]:
        return sorted(f[:-5] for f in os.listdir(self.root) if f.endswith(".json"))


def write_atomic(path: str, record: Dict[str, Any]) -> None:
    """``record`` as JSON at ``path`` through a temporary file and os.replace: an interruption leaves the
    old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(common.json_safe(record), fh, indent=1, allow_nan=False, default=str)
    os.replace(tmp, path)


def settings_differ(path: str, settings: Dict[str, Any]) -> List[str]:
    """The keys in which ``settings`` differ from the ones recorded in the JSON file ``path`` by the run that
    made an output directory (sorted; [] when they agree). The first call records them. Experiments
    refuse to mix stored runs of two settings in one directory with it, each in its own words."""
    settings = json.loads(json.dumps(common.json_safe(settings), default=str))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, settings)
        return []
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    return sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))


def every_run_converged(curves: Sequence[Sequence[float]], tail: float = 0.2) -> bool:
    """Whether every curve (one per run) converged by :func:`convergence`; a curve too short to decide
    counts as not converged."""
    return all(convergence(c, tail)["converged"] is True for c in curves)


def converged_cell(checks: Sequence[Dict[str, Any]]) -> str:
    """A report cell for the runs behind one claim, from their :func:`convergence` results: "yes" when every
    run converged, else "no (k/n)"; a run too short to decide counts as not converged."""
    flags = [c["converged"] is True for c in checks]
    return "yes" if all(flags) else f"no ({sum(flags)}/{len(flags)})"


def tail_table(curves: Dict[str, Sequence[Sequence[float]]], tail: float = 0.2) -> Tuple[List[str], bool]:
    """Markdown rows "| method | runs converged | largest move in the last 20 % |" for curves per method
    (a list of per-seed curves each), and whether every run converged."""
    rows, every = [], True
    for method, runs in curves.items():
        checks = [convergence(c, tail) for c in runs]
        ok = [c["converged"] for c in checks if c["converged"] is not None]
        moved = [c["moved"] for c in checks if c["moved"] is not None]
        every = every and bool(ok) and all(ok)
        rows.append(f"| {method} | {sum(ok)}/{len(checks)} | "
                    f"{(100 * max(moved)):.2f} points |" if moved else f"| {method} | 0/{len(checks)} | — |")
    return rows, every


# ------------------------------------------------------------------------------------------ teachers
# The CIFAR-style ResNet teacher of the supervised reproductions at 28x28 (BSS's official teacher is a
# ResNet-26; Heo et al., AAAI 2019, bhheo/BSS_distillation). Measured on the idle 2-vCPU Xeon: one epoch
# of 54,000 images takes about 1.5 min, so 15 epochs stay within the 30 minutes a teacher may take.
REFERENCE_TEACHER = {"name": "resnet26", "width": 1.0, "epochs": 15, "lr": 0.05, "seed": 0}


def reference_teacher(dataset: str, train_part, test_set, device="cpu", **overrides):
    """The teacher of the supervised reproductions, trained once on the training part of
    :func:`validation_split` (so the validation images stay unseen) and cached:
    ``(teacher, model_kwargs, test_accuracy, info)`` as :func:`common.cached_teacher`."""
    recipe = {**REFERENCE_TEACHER, **overrides}
    return common.cached_teacher(dataset, train_part, test_set, name=recipe["name"], width=recipe["width"],
                                 epochs=recipe["epochs"], lr=recipe["lr"], seed=recipe["seed"], device=device)
