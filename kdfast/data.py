"""Image classification data for kdfast's demo, CLI and benchmarks.

One entry point, :func:`load`, returns an in-memory :class:`ImageDataset` (normalised float32
images (N, C, H, W) and int64 labels); :func:`loaders` wraps the train and test splits in
DataLoaders.

Datasets:

* ``"digits"`` (default, embedded): scikit-learn's digits, 1,797 real 8x8 grey-scale handwritten
  digits shipped inside the scikit-learn wheel (``sklearn.datasets.load_digits``; nothing is
  downloaded). Pixels 0..16 are scaled to [0, 1], optionally resized (bilinear, ``image_size``,
  default 16), and normalised with the mean/std of the training split. The split is FIXED:
  stratified per class with ``numpy.random.RandomState(0)`` (a generator whose stream NumPy keeps
  stable), 25% of each class (rounded) to the test split: **1,347 train / 450 test** images.
* ``"cifar10"`` / ``"cifar100"``: the python-pickle archives of
  https://www.cs.toronto.edu/~kriz/cifar.html at a path the user gives: a directory holding
  ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (CIFAR-10) or ``train`` and ``test``
  (CIFAR-100), or their parent holding ``cifar-10-batches-py/`` / ``cifar-100-python/``, or the
  unextracted ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``. Normalised with the usual
  per-channel CIFAR constants. The files are unpickled with an unpickler that only admits the
  NumPy array reconstructors and builtin containers, so a tampered archive cannot run code.
* ``"mnist"``: the idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or ``.gz``) in the given
  directory or in its ``MNIST/raw/`` (torchvision's layout). Normalised with (0.1307, 0.3081).

Nothing is downloaded: a missing path or file is a ``FileNotFoundError`` naming the files
expected and the places searched.

The attacks need the valid input range in the model's (normalised) units:
``dataset.clamp_range`` gives the per-channel ``(lo, hi)`` that pixel values 0 and 1 map to, and
``dataset.std`` converts a pixel-space epsilon into normalised units (see kdfast.robustness).
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

DATASETS = ("digits", "cifar10", "cifar100", "mnist")
SPLITS = ("train", "test")

#: Fixed split of the embedded digits data (documented sizes: 1347 train / 450 test).
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
DIGITS_DEFAULT_SIZE = 16

# Per-channel mean/std of the training splits (the values the CIFAR/MNIST literature uses).
_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
}
_NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "mnist": 10}


# =============================================================================================== dataset
class ImageDataset(Dataset):
    """In-memory images (N, C, H, W) float32 and labels (N,) int64; items are ``(x, y)``, or
    ``(x, y, index)`` with ``return_index=True`` (for methods that keep per-sample state).

    ``mean``/``std`` are the per-channel statistics the images were normalised with (pixel
    values in [0, 1] -> (v - mean) / std); ``clamp_range`` is the per-channel (lo, hi) of valid
    normalised inputs.
    """

    def __init__(self, images, labels, *, name, split, num_classes, mean, std, return_index=False):
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

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, shape=({c}, {h}, {w}), classes={self.num_classes})"


@dataclass(frozen=True)
class _Raw:
    """Images as uint8 or float in [0, 1], layout (N, C, H, W), and labels."""

    images: torch.Tensor
    labels: torch.Tensor


# =============================================================================================== public API
def load(
    name: str = "digits",
    root: str | os.PathLike | None = None,
    split: str = "train",
    image_size: int | None = None,
    normalize: bool = True,
    return_index: bool = False,
) -> ImageDataset:
    """Loads one split of a dataset into memory.

    Args:
        name: "digits" (embedded, default), "cifar10", "cifar100" or "mnist".
        root: directory of the CIFAR/MNIST files (required for them; unused for digits).
        split: "train" or "test".
        image_size: resize (bilinear, antialiased when shrinking) to image_size x image_size;
            digits default 16, the others keep their native size.
        normalize: per-channel (v - mean) / std; with False pixels stay in [0, 1] (mean 0, std 1).
        return_index: items are (x, y, index) instead of (x, y).
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if name != "digits" and root is None:
        raise ValueError(f"root is required for {name!r}: the directory holding its files ({_expected_files(name)})")

    if name == "digits":
        raw = _digits(split)
        size = image_size or DIGITS_DEFAULT_SIZE
    elif name in ("cifar10", "cifar100"):
        raw = _cifar(name, os.fspath(root), split)
        size = image_size
    else:
        raw = _mnist(os.fspath(root), split)
        size = image_size

    images = _to_unit_float(raw.images)
    if size is not None and tuple(images.shape[2:]) != (size, size):
        images = _resize(images, size)

    if not normalize:
        mean, std = (0.0,) * images.shape[1], (1.0,) * images.shape[1]
    elif name == "digits":
        mean, std = _digits_stats(size)
    else:
        mean, std = _NORMALIZATION[name]
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    images = ((images - m) / s).contiguous()
    return ImageDataset(
        images,
        raw.labels,
        name=name,
        split=split,
        num_classes=_NUM_CLASSES[name],
        mean=mean,
        std=std,
        return_index=return_index,
    )


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
) -> tuple[DataLoader, DataLoader]:
    """(train_loader, test_loader). The train loader shuffles with a generator seeded by ``seed``
    (reproducible epochs); ``augment`` adds random crops (padding 4) and, for CIFAR, horizontal
    flips to training batches (applied to the normalised batch; padding uses the value of pixel
    0, so a padded border is black as in the usual CIFAR recipe)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    test_batch_size = test_batch_size or batch_size
    train = load(name, root, "train", image_size, normalize, return_index)
    test = load(name, root, "test", image_size, normalize, return_index)
    gen = torch.Generator().manual_seed(seed)
    collate = _Augment(train, flip=name.startswith("cifar"), generator=torch.Generator().manual_seed(seed + 1)) if augment else None
    train_loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers, collate_fn=collate
    )
    test_loader = DataLoader(test, batch_size=test_batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, test_loader


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


# =============================================================================================== helpers
def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    return images.to(torch.float32)


def _resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    # Chunked so a 50,000-image CIFAR split never needs two float copies at once.
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=images.dtype)
    for i in range(0, images.shape[0], chunk):
        part = images[i : i + chunk]
        out[i : i + chunk] = F.interpolate(
            part, size=(size, size), mode="bilinear", align_corners=False, antialias=size < part.shape[2]
        ).clamp_(0.0, 1.0)
    return out


# ----------------------------------------------------------------------------------------------- digits
def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into sklearn's digits: per class, a RandomState(0) permutation, the
    first round(25% of the class) to test. Sorted, disjoint, covering all 1,797 images."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    train, test = [], []
    for cls in range(10):
        idx = np.flatnonzero(target == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(DIGITS_TEST_FRACTION * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits(split: str) -> _Raw:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train_idx, test_idx = digits_split_indices()
    idx = train_idx if split == "train" else test_idx
    images = torch.from_numpy(digits.images[idx] / 16.0).to(torch.float32).unsqueeze(1)
    labels = torch.from_numpy(digits.target[idx]).to(torch.int64)
    return _Raw(images, labels)


_DIGITS_STATS: dict[int, tuple[tuple[float], tuple[float]]] = {}


def _digits_stats(size: int) -> tuple[tuple[float], tuple[float]]:
    """Mean/std of the training split's pixels at this size (computed once per size)."""
    if size not in _DIGITS_STATS:
        images = _digits("train").images
        if images.shape[2] != size:
            images = _resize(images, size)
        _DIGITS_STATS[size] = ((images.mean().item(),), (images.std().item(),))
    return _DIGITS_STATS[size]


# ----------------------------------------------------------------------------------------------- CIFAR
_CIFAR_LAYOUT = {
    # name: (folder inside the archive, archive file, train files, test files, label key)
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    ),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"], b"fine_labels"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR pickles contain: NumPy arrays, dtypes, builtin containers."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR file refers to {module}.{name}, which a CIFAR archive never contains")


def _unpickle(fh, what: str) -> dict:
    try:
        obj = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad file
        raise ValueError(f"{what} is not a CIFAR python-pickle batch: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is not a CIFAR python-pickle batch: expected a dict, got {type(obj).__name__}")
    return obj


def _expected_files(name: str) -> str:
    if name in _CIFAR_LAYOUT:
        folder, archive, train, test = _CIFAR_LAYOUT[name][:4]
        return f"{', '.join(train + test)} (directly, in {folder}/, or the archive {archive})"
    if name == "mnist":
        return ", ".join(_MNIST_FILES["train"] + _MNIST_FILES["test"]) + " (raw or .gz, directly or in MNIST/raw/)"
    return "nothing"


def _cifar_sources(name: str, root: str, files: list[str]):
    """Yields (description, opener) per file: from a directory or the unextracted archive."""
    folder, archive, *_ = _CIFAR_LAYOUT[name]
    if not os.path.exists(root):
        raise FileNotFoundError(f"{name}: root {root!r} does not exist; expected a directory with {_expected_files(name)}")
    for directory in (root, os.path.join(root, folder)):
        if all(os.path.isfile(os.path.join(directory, f)) for f in files):
            return [(os.path.join(directory, f), lambda p=os.path.join(directory, f): open(p, "rb")) for f in files]
    for path in (root, os.path.join(root, archive)):
        if os.path.isfile(path) and tarfile.is_tarfile(path):
            with tarfile.open(path, "r:*") as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                wanted = [f"{folder}/{f}" for f in files]
                missing = [w for w in wanted if w not in members]
                if missing:
                    raise FileNotFoundError(f"{name}: archive {path!r} lacks {', '.join(missing)}")
                # read while the archive is open (nothing is extracted to disk)
                blobs = {w: tar.extractfile(members[w]).read() for w in wanted}
            return [(f"{path}:{w}", lambda b=blobs[w]: io.BytesIO(b)) for w in wanted]
    searched = [root, os.path.join(root, folder), os.path.join(root, archive)]
    raise FileNotFoundError(
        f"{name}: could not find {', '.join(files)} in {searched[0]!r} or {searched[1]!r}, nor the archive "
        f"{searched[2]!r}; expected the python-pickle version of the dataset ({_expected_files(name)})"
    )


def _cifar(name: str, root: str, split: str) -> _Raw:
    _folder, _archive, train_files, test_files, label_key = _CIFAR_LAYOUT[name]
    files = train_files if split == "train" else test_files
    images, labels = [], []
    for what, opener in _cifar_sources(name, root, files):
        with opener() as fh:
            batch = _unpickle(fh, what)
        if b"data" not in batch or label_key not in batch:
            keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
            raise ValueError(f"{what}: expected keys 'data' and {label_key.decode()!r}, found {keys}")
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{what}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if lab.shape != (data.shape[0],):
            raise ValueError(f"{what}: {data.shape[0]} images but {lab.shape} labels")
        if lab.size and (lab.min() < 0 or lab.max() >= _NUM_CLASSES[name]):
            raise ValueError(f"{what}: labels must be in [0, {_NUM_CLASSES[name]}), got [{lab.min()}, {lab.max()}]")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(lab))
    return _Raw(torch.cat(images), torch.cat(labels))


# ----------------------------------------------------------------------------------------------- MNIST
_MNIST_FILES = {
    "train": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
    "test": ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
}


def _find_mnist_file(root: str, base: str) -> str | None:
    for directory in (root, os.path.join(root, "MNIST", "raw")):
        for fname in (base, base + ".gz"):
            path = os.path.join(directory, fname)
            if os.path.isfile(path):
                return path
    return None


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes (type code 0x08) with ``ndim`` dimensions."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an idx header ({len(data)} bytes)")
    zero, type_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code != 0x08 or dims != ndim:
        raise ValueError(
            f"{path}: bad idx magic {data[:4].hex()}; expected 0000 08 {ndim:02x} (unsigned bytes, {ndim} dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise ValueError(f"{path}: header says shape {shape} ({count} bytes) but the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _mnist(root: str, split: str) -> _Raw:
    if not os.path.exists(root):
        raise FileNotFoundError(f"mnist: root {root!r} does not exist; expected a directory with {_expected_files('mnist')}")
    image_base, label_base = _MNIST_FILES[split]
    paths = {b: _find_mnist_file(root, b) for b in (image_base, label_base)}
    missing = [b for b, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"mnist: {', '.join(missing)} (or .gz) not found in {root!r} nor {os.path.join(root, 'MNIST', 'raw')!r}; "
            f"expected the idx files {_expected_files('mnist')}"
        )
    images = _read_idx(paths[image_base], 3)
    labels = _read_idx(paths[label_base], 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"mnist: {paths[image_base]} has {images.shape[0]} images but {paths[label_base]} has {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"mnist: {paths[label_base]} has label {labels.max()}; expected 0..9")
    return _Raw(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels))
