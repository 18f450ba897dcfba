"""The in-memory dataset every kdfast loader returns, and what is done to its images: scaling to
[0, 1], resizing, per-channel statistics, the fixed held-out split, stratified subsets."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    """In-memory images (N, C, H, W) float32 and labels (N,) int64; items are ``(x, y)``, or
    ``(x, y, index)`` with ``return_index=True`` (for methods that keep per-sample state).

    ``name`` is the dataset's own name ("fashion-mnist", "folder", ...), ``root`` where its files
    were read (None for the embedded digits), ``classes`` the class names (index = label).
    ``mean``/``std`` are the per-channel statistics the images were normalised with (pixel
    values in [0, 1] -> (v - mean) / std); ``clamp_range`` is the per-channel (lo, hi) of valid
    normalised inputs. ``selection`` says which subset of the split this is (None: all of it).
    """

    def __init__(self, images, labels, *, name, split, num_classes, mean, std, return_index=False,
                 classes=None, root=None, selection=None):
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.name = name
        self.split = split
        self.num_classes = num_classes
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.return_index = return_index
        self.classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(num_classes))
        if len(self.classes) != num_classes:
            raise ValueError(f"{len(self.classes)} class names for {num_classes} classes")
        self.root = root
        self.selection = dict(selection) if selection else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        if self.return_index:
            return self.images[index], self.labels[index], index
        return self.images[index], self.labels[index]

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    @property
    def clamp_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (lo, hi), shape (C,) each: where pixel values 0 and 1 land after normalisation."""
        mean = torch.tensor(self.mean)
        std = torch.tensor(self.std)
        return (0 - mean) / std, (1 - mean) / std

    def record(self) -> dict:
        """What a model trained on this data expects, as model files and checkpoints store it (plain
        str / int / float / list / None, loadable with ``torch.load(weights_only=True)``)::

            {"name": "fashion-mnist", "root": "/usr/share/datasets/fashion-mnist",
             "image_size": 28, "in_channels": 1, "input_shape": [1, 28, 28], "num_classes": 10,
             "classes": ["T-shirt/top", ...], "mean": [0.286...], "std": [0.353...],
             "selection": None}

        ``image_size`` is None when the images are not square (``input_shape`` is exact).
        ``kdfast.data.load(**kdfast.data.load_arguments(record))`` reloads the same data."""
        c, h, w = (int(s) for s in self.images.shape[1:])
        return {
            "name": self.name,
            "root": self.root,
            "image_size": h if h == w else None,
            "in_channels": c,
            "input_shape": [c, h, w],
            "num_classes": int(self.num_classes),
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "selection": dict(self.selection) if self.selection else None,
        }

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        sel = f", selection={self.selection}" if self.selection else ""
        return (f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, shape=({c}, {h}, {w}), "
                f"classes={self.num_classes}{sel})")


@dataclass(frozen=True)
class Raw:
    """Images as uint8 or float in [0, 1], layout (N, C, H, W), labels, and what the files say about
    the classes (None: numbered)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple | None = None


# =============================================================================================== pixels
def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    return images.to(torch.float32)


def resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear resize to size x size (antialiased when shrinking), clamped to [0, 1]."""
    # Chunked so a 50,000-image CIFAR split never needs two float copies at once.
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=images.dtype)
    for i in range(0, images.shape[0], chunk):
        part = images[i : i + chunk]
        out[i : i + chunk] = F.interpolate(
            part, size=(size, size), mode="bilinear", align_corners=False,
            antialias=size < max(part.shape[2], part.shape[3]),
        ).clamp_(0.0, 1.0)
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of [0, 1] images (N, C, H, W), summed in
    float64 chunk by chunk (no float64 copy of the whole set)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, images.shape[0], 4096):
        part = images[i : i + 4096].to(torch.float64)
        if images.dtype == torch.uint8:
            part /= 255.0
        total += part.sum(dim=(0, 2, 3))
        total_sq += (part * part).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        raise ValueError("cannot compute normalisation statistics of an empty training split")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_(min=0)
    # A constant channel (std 0) would divide by zero: it is left unscaled.
    std = [math.sqrt(v) if v > 1e-12 else 1.0 for v in var.tolist()]
    return tuple(mean.tolist()), tuple(std)


# =============================================================================================== splits
#: Own data given as one pool (a folder without train/ and test/, an .npz with only x and y): this
#: share of each class goes to the test split, drawn with numpy.random.RandomState(HOLDOUT_SEED).
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0


def holdout_split(labels: np.ndarray, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED):
    """(train, test) sorted indices: per class (in label order) a RandomState(seed) permutation and
    the first round(fraction * class size) to test. RandomState's stream is frozen by NumPy, so the
    split is the same on every machine."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    if not train:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def check_selection(subset, fraction, seed) -> None:
    """ValueError naming the argument when subset / fraction / subset_seed are not what they must be."""
    if subset is not None:
        _positive_int("subset", subset)
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be a number in (0, 1] or None, got {fraction!r}")
    if subset is not None and fraction is not None:
        raise ValueError(f"give subset (a number of images) or fraction (a share of each class), not both "
                         f"(got subset={subset!r}, fraction={fraction!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"subset_seed must be an int >= 0, got {seed!r}")


def stratified_indices(labels, *, subset: int | None = None, fraction: float | None = None,
                       seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified random subset: ``fraction`` of each class (rounded, at
    least one image per class), or ``subset`` images in all with each class's share proportional to
    its size (largest remainders; every class keeps one image when ``subset`` >= the number of
    classes). Drawn with numpy.random.RandomState(seed): the same subset on every machine."""
    check_selection(subset, fraction, seed)
    labels = np.asarray(labels)
    n = len(labels)
    if (subset is None and fraction is None) or (subset is not None and subset >= n):
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    if fraction is not None:
        take = np.maximum(1, np.round(fraction * counts)).astype(np.int64)
    else:
        exact = subset * counts / n
        take = np.floor(exact).astype(np.int64)
        if subset >= len(classes):
            take = np.maximum(take, 1)
        # hand out what is left by largest remainder (ties: lower class first)
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        i = 0
        while take.sum() < subset:
            c = order[i % len(order)]
            if take[c] < counts[c]:
                take[c] += 1
            i += 1
        while take.sum() > subset:  # only when the one-per-class floor overshot
            c = int(np.argmax(take))
            take[c] -= 1
    rng = np.random.RandomState(seed)
    keep = []
    for cls, k in zip(classes, take):
        idx = np.flatnonzero(labels == cls)
        keep.append(idx[rng.permutation(len(idx))[: int(k)]])
    return np.sort(np.concatenate(keep))


def stratified_subset(dataset: ImageDataset, *, subset: int | None = None, fraction: float | None = None,
                      seed: int = 0) -> ImageDataset:
    """A copy of ``dataset`` holding a class-stratified random subset (see :func:`stratified_indices`);
    ``dataset.selection`` records what was taken. The whole dataset when both are None."""
    idx = stratified_indices(dataset.labels.numpy(), subset=subset, fraction=fraction, seed=seed)
    if len(idx) == len(dataset):
        return dataset
    out = copy.copy(dataset)
    index = torch.from_numpy(idx)
    out.images, out.labels = dataset.images[index].contiguous(), dataset.labels[index]
    out.selection = {"subset": subset, "fraction": fraction, "seed": seed, "of": len(dataset)}
    return out
