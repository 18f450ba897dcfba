"""Image classification data for kdfast's demo, CLI, experiments and your own runs.

One entry point, :func:`load`, returns an in-memory :class:`ImageDataset` (normalised float32
images (N, C, H, W), int64 labels, class names, the statistics used); :func:`loaders` wraps the
train and test splits in DataLoaders. docs/data.md is the user's guide.

Datasets by name (:mod:`kdfast.data.named`):

* ``"digits"`` (default, embedded): scikit-learn's digits, 1,797 real 8x8 grey-scale handwritten
  digits shipped inside the scikit-learn wheel (``sklearn.datasets.load_digits``; nothing is
  downloaded). Pixels 0..16 are scaled to [0, 1], optionally resized (bilinear, ``image_size``,
  default 16), and normalised with the mean/std of the training split. The split is FIXED:
  stratified per class with ``numpy.random.RandomState(0)`` (a generator whose stream NumPy keeps
  stable), 25% of each class (rounded) to the test split: **1,347 train / 450 test** images.
* ``"fashion-mnist"``: Zalando's Fashion-MNIST (Xiao, Rasul, Vollgraf, arXiv:1708.07747), 60,000 +
  10,000 grey 28x28 images of 10 clothing classes, from its four IDX files. Found without ``root``
  where the Debian package ``dataset-fashion-mnist`` puts them (/usr/share/datasets/fashion-mnist),
  then in ``$KDFAST_DATA/fashion-mnist``.
* ``"mnist"``: the same four IDX file names (raw or ``.gz``) in ``root``, ``root/MNIST/raw/``
  (torchvision's layout) or ``$KDFAST_DATA/mnist``. Normalised with (0.1307, 0.3081).
* ``"cifar10"`` / ``"cifar100"``: the python-pickle archives of
  https://www.cs.toronto.edu/~kriz/cifar.html: a directory holding ``data_batch_1`` ..
  ``data_batch_5`` and ``test_batch`` (CIFAR-10) or ``train`` and ``test`` (CIFAR-100), or their
  parent holding ``cifar-10-batches-py/`` / ``cifar-100-python/``, or the unextracted
  ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``; ``root`` or ``$KDFAST_DATA/<name>``.
  Normalised with the usual per-channel CIFAR constants. The files are unpickled with an unpickler
  that only admits the NumPy array reconstructors and builtin containers.

Your own data (:mod:`kdfast.data.own`): ``"folder"`` (images in class sub-folders), ``"npz"``
(arrays ``x``, ``y``) and ``"idx"`` (a directory of IDX files), each at ``root``. Their per-channel
mean/std are computed from the training split (all of it, before any subset), once per process.

Nothing is downloaded: a missing dataset is one ``FileNotFoundError`` saying where kdfast looked
and how to get the files. ``subset`` / ``fraction`` take a class-stratified, seeded part of a split.

The attacks need the valid input range in the model's (normalised) units:
``dataset.clamp_range`` gives the per-channel ``(lo, hi)`` that pixel values 0 and 1 map to, and
``dataset.std`` converts a pixel-space epsilon into normalised units (see kdfast.robustness).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from . import named, own
from .dataset import (HOLDOUT_FRACTION, HOLDOUT_SEED, ImageDataset, channel_stats, check_selection, holdout_split,
                      resize, stratified_indices, stratified_subset, to_unit_float)
from .idx import read_idx, write_idx
from .named import (CLASSES, DIGITS_DEFAULT_SIZE, DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, NORMALIZATION,
                    SYSTEM_ROOTS, digits_split_indices)

#: Datasets kdfast knows by name.
DATASETS = named.NAMED
#: Formats of your own data (``root`` is the folder / file).
FORMATS = own.FORMATS
#: Everything :func:`load` accepts as ``name``.
NAMES = DATASETS + FORMATS
SPLITS = ("train", "test")

_OWN_STATS: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] = {}


# =============================================================================================== public API
def load(
    name: str = "digits",
    root: str | os.PathLike | None = None,
    split: str = "train",
    image_size: int | None = None,
    normalize: bool = True,
    return_index: bool = False,
    *,
    subset: int | None = None,
    fraction: float | None = None,
    subset_seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageDataset:
    """Loads one split of a dataset into memory.

    Args:
        name: a dataset kdfast knows ("digits", the default and embedded; "mnist", "fashion-mnist",
            "cifar10", "cifar100") or a format of your own data ("folder", "npz", "idx").
        root: where the files are. Optional for the named datasets (looked for in the Debian
            package's directory, then ``$KDFAST_DATA/<name>``); required for your own data.
        split: "train" or "test".
        image_size: resize (bilinear, antialiased when shrinking) to image_size x image_size;
            digits default 16, the others keep their native size.
        normalize: per-channel (v - mean) / std; with False pixels stay in [0, 1] (mean 0, std 1).
        return_index: items are (x, y, index) instead of (x, y).
        subset: keep this many images of the split, class-stratified (see :func:`stratified_subset`).
        fraction: keep this share of each class instead (in (0, 1]).
        subset_seed: seed of the subset's draw (independent of the training seed).
        mean, std: the normalisation to use (e.g. as a model file recorded it); default: the
            dataset's own (computed from the training split for your own data).
    """
    if not isinstance(name, str) or name not in NAMES:
        hint = ""
        if isinstance(name, (str, os.PathLike)) and os.path.exists(os.fspath(name)):
            hint = (f"; {os.fspath(name)!r} is a path: give its format as name and the path as root, "
                    f"e.g. load('folder', root={os.fspath(name)!r})")
        raise ValueError(f"name must be one of {NAMES}, got {name!r}{hint}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    check_selection(subset, fraction, subset_seed)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the normalisation a model was trained with), or neither")
    if name in FORMATS and root is None:
        raise ValueError(f"root is required for {name!r}: {own._EXPECTED[name]}")
    if root is not None:
        root = os.path.abspath(os.fspath(root))
    elif name != "digits":
        root = named.find_root(name, split)

    if name in FORMATS:
        raw = own.read(name, root, split, image_size)
        classes = raw.classes
        num_classes = own.num_classes(name, root, raw)
        size = image_size
    else:
        raw = named.read(name, root, split)
        classes = raw.classes or named.CLASSES.get(name)
        num_classes = named.NUM_CLASSES[name]
        size = image_size or (named.DIGITS_DEFAULT_SIZE if name == "digits" else None)

    images = to_unit_float(raw.images)
    if size is not None and tuple(images.shape[2:]) != (size, size):
        images = resize(images, size)
    channels = images.shape[1]

    if not normalize:
        mean, std = (0.0,) * channels, (1.0,) * channels
    elif mean is not None:
        mean, std = _check_stats(mean, std, channels)
    elif name == "digits":
        mean, std = named.digits_stats(size)
    elif name in NORMALIZATION:
        mean, std = NORMALIZATION[name]
    else:
        mean, std = _own_stats(name, root, size, images if split == "train" else None)
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    images = ((images - m) / s).contiguous()
    dataset = ImageDataset(images, raw.labels, name=name, split=split, num_classes=num_classes, mean=mean, std=std,
                           return_index=return_index, classes=classes, root=root)
    if subset is not None or fraction is not None:
        dataset = stratified_subset(dataset, subset=subset, fraction=fraction, seed=subset_seed)
    return dataset


def loaders(
    name: str = "digits",
    root: str | os.PathLike | None = None,
    batch_size: int = 64,
    test_batch_size: int | None = None,
    image_size: int | None = None,
    normalize: bool = True,
    augment: bool = False,
    return_index: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    *,
    subset: int | None = None,
    fraction: float | None = None,
    test_subset: int | None = None,
    test_fraction: float | None = None,
    subset_seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """(train_loader, test_loader). The train loader shuffles with a generator seeded by ``seed``
    (reproducible epochs); ``augment`` adds random crops (padding 4) and, for CIFAR, horizontal
    flips to training batches (applied to the normalised batch; padding uses the value of pixel
    0, so a padded border is black as in the usual CIFAR recipe). ``subset`` / ``fraction`` select
    part of the training split, ``test_subset`` / ``test_fraction`` part of the test split (class-
    stratified, drawn with ``subset_seed``); the test split is normalised with the training split's
    statistics."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    test_batch_size = test_batch_size or batch_size
    train = load(name, root, "train", image_size, normalize, return_index, subset=subset, fraction=fraction,
                 subset_seed=subset_seed)
    stats = dict(mean=train.mean, std=train.std) if normalize else {}
    test = load(name, root, "test", image_size, normalize, return_index, subset=test_subset, fraction=test_fraction,
                subset_seed=subset_seed, **stats)
    gen = torch.Generator().manual_seed(seed)
    collate = None
    if augment:
        collate = _Augment(train, flip=name.startswith("cifar"), generator=torch.Generator().manual_seed(seed + 1))
    train_loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers, collate_fn=collate
    )
    test_loader = DataLoader(test, batch_size=test_batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, test_loader


def load_arguments(record: dict) -> dict:
    """Keyword arguments of :func:`load` that reload the data an :meth:`ImageDataset.record` describes
    (e.g. the "data" entry of a model file): name, root, image_size and the recorded mean/std. Add
    ``split=`` (and override ``root=`` when the files moved)."""
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise ValueError(f"a data record is a dict with at least a 'name', got {record!r}")
    args = {"name": record["name"], "root": record.get("root"), "image_size": record.get("image_size")}
    if record.get("mean") is not None and record.get("std") is not None:
        args["mean"], args["std"] = tuple(record["mean"]), tuple(record["std"])
    return args


# =============================================================================================== helpers
def _check_stats(mean, std, channels):
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ValueError(f"mean and std must be sequences of numbers, got {mean!r} and {std!r}") from None
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(f"mean and std must have one value per channel ({channels}) and std > 0, "
                         f"got mean={mean}, std={std}")
    return mean, std


def _own_stats(name, root, size, train_images):
    """Per-channel statistics of own data's training split at this size (all of it), once per process;
    keyed by the files' modification time so an edited dataset is measured again."""
    key = (name, root, size, os.path.getmtime(root))
    if key not in _OWN_STATS:
        if train_images is None:
            train_images = to_unit_float(own.read(name, root, "train", size).images)
            if size is not None and tuple(train_images.shape[2:]) != (size, size):
                train_images = resize(train_images, size)
        _OWN_STATS[key] = channel_stats(train_images)
    return _OWN_STATS[key]


class _Augment:
    """collate_fn: default collation, then random crop (pad 4) and optional horizontal flip."""

    def __init__(self, dataset: ImageDataset, flip: bool, generator: torch.Generator, pad: int = 4):
        self.fill = dataset.clamp_range[0].view(1, -1, 1, 1)
        self.flip = flip
        self.pad = pad
        self.generator = generator

    def __call__(self, items):
        batch = torch.utils.data.default_collate(items)
        x = batch[0]
        n, c, h, w = x.shape
        p = self.pad
        padded = self.fill.to(x.dtype).expand(n, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = x
        dy = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * p)
        x = padded.gather(2, rows)
        cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
        x = x.gather(3, cols)
        if self.flip:
            flip = torch.rand(n, generator=self.generator) < 0.5
            x[flip] = x[flip].flip(3)
        return (x, *batch[1:])


__all__ = [
    "CLASSES", "DATASETS", "DIGITS_DEFAULT_SIZE", "DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "FORMATS",
    "HOLDOUT_FRACTION", "HOLDOUT_SEED", "ImageDataset", "NAMES", "NORMALIZATION", "SPLITS", "SYSTEM_ROOTS",
    "channel_stats", "digits_split_indices", "holdout_split", "load", "load_arguments", "loaders", "read_idx",
    "stratified_indices", "stratified_subset", "write_idx",
]
