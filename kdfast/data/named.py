"""The datasets kdfast knows by name: the embedded digits, MNIST, Fashion-MNIST, CIFAR-10/100: where
their files are looked for, how they are read, their normalisation and class names."""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import torch

from .dataset import Raw, resize
from .idx import read_idx

NAMED = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")

# Per-channel mean/std of the training splits of pixels in [0, 1].
NORMALIZATION = {
    # the values the CIFAR literature uses
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # the value the MNIST literature uses (torchvision's examples)
    "mnist": ((0.1307,), (0.3081,)),
    # Computed by kdfast from the Debian package dataset-fashion-mnist (train-images-idx3-ubyte.gz,
    # 60,000 images): mean and population std (ddof=0) of all pixels / 255 in float64 are
    # 0.2860405969887955 and 0.35302424451492254. tests/data/test_datasets_named.py recomputes them
    # from the files when they are installed.
    "fashion-mnist": ((0.2860406,), (0.3530242,)),
}
NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}

CLASSES = {
    "digits": tuple(str(i) for i in range(10)),
    "mnist": tuple(str(i) for i in range(10)),
    # zalandoresearch/fashion-mnist README.md, "Labels"
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"),
    # batches.meta of cifar-10-python.tar.gz
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    # CIFAR-100's fine labels are read from the archive's "meta" file when it is there (numbered otherwise)
}

#: Where each dataset is found when no root is given: these directories in order, then
#: $KDFAST_DATA/<name>. /usr/share/datasets/fashion-mnist is where the Debian package
#: dataset-fashion-mnist installs the four IDX files.
SYSTEM_ROOTS = {"fashion-mnist": ["/usr/share/datasets/fashion-mnist"]}

HOW_TO_GET = {
    "mnist": "put the four IDX files of MNIST ({files}) into a directory and pass it as root",
    "fashion-mnist": "install the Debian package: apt-get install dataset-fashion-mnist (or `make data` in a "
                     "kdfast checkout), or put the four IDX files from "
                     "https://github.com/zalandoresearch/fashion-mnist ({files}) into a directory and pass it as root",
    "cifar10": "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and pass its "
               "directory as root (the archive is read without extracting it)",
    "cifar100": "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and pass its "
                "directory as root (the archive is read without extracting it)",
}


def has_files(name: str, directory: str, split: str) -> bool:
    """Whether ``directory`` holds ``split`` of the named dataset (so it is the one to read)."""
    if not os.path.isdir(directory) and not (name.startswith("cifar") and os.path.isfile(directory)):
        return False
    if name in ("mnist", "fashion-mnist"):
        return all(_find_idx_file(directory, base, name) is not None for base in MNIST_FILES[split])
    try:
        _cifar_sources(name, directory, CIFAR_LAYOUT[name][2 if split == "train" else 3], probe=True)
        return True
    except FileNotFoundError:
        return False


def find_root(name: str, split: str) -> str:
    """The directory of a named dataset when the caller gives none: SYSTEM_ROOTS, then
    $KDFAST_DATA/<name>; FileNotFoundError saying where it looked and how to get the files."""
    places = list(SYSTEM_ROOTS.get(name, []))
    env = os.environ.get("KDFAST_DATA")
    if env:
        places.append(os.path.join(env, name))
    for place in places:
        if has_files(name, place, split):
            return place
    where = places if env else places + [f"$KDFAST_DATA/{name} (KDFAST_DATA is not set)"]
    raise FileNotFoundError(f"{name}: dataset not found: no root given, and not in {' nor '.join(where)}; "
                            f"to get it, {how_to_get(name)}")


def how_to_get(name: str) -> str:
    return HOW_TO_GET[name].format(files=", ".join(MNIST_FILES["train"] + MNIST_FILES["test"]))


def read(name: str, root: str | None, split: str) -> Raw:
    if name == "digits":
        return digits(split)
    if name in ("mnist", "fashion-mnist"):
        return mnist_family(name, root, split)
    return cifar(name, root, split)


# ----------------------------------------------------------------------------------------------- digits
#: Fixed split of the embedded digits data (documented sizes: 1347 train / 450 test).
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
DIGITS_DEFAULT_SIZE = 16


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


def digits(split: str) -> Raw:
    from sklearn.datasets import load_digits

    data = load_digits()
    train_idx, test_idx = digits_split_indices()
    idx = train_idx if split == "train" else test_idx
    images = torch.from_numpy(data.images[idx] / 16.0).to(torch.float32).unsqueeze(1)
    labels = torch.from_numpy(data.target[idx]).to(torch.int64)
    return Raw(images, labels)


_DIGITS_STATS: dict[int, tuple[tuple[float], tuple[float]]] = {}


def digits_stats(size: int) -> tuple[tuple[float], tuple[float]]:
    """Mean/std of the training split's pixels at this size (computed once per size)."""
    if size not in _DIGITS_STATS:
        images = digits("train").images
        if images.shape[2] != size:
            images = resize(images, size)
        _DIGITS_STATS[size] = ((images.mean().item(),), (images.std().item(),))
    return _DIGITS_STATS[size]


# ----------------------------------------------------------------------------------------------- MNIST, Fashion-MNIST
MNIST_FILES = {
    "train": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
    "test": ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
}
# torchvision's layouts: <root>/MNIST/raw/, <root>/FashionMNIST/raw/
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

# The first 8 training and test labels of each dataset's files (Fashion-MNIST's read from the Debian
# package's files, MNIST's from the MNIST files): tell the two apart, since their files share names.
_FIRST_LABELS = {
    "mnist": {"train": [5, 0, 4, 1, 9, 2, 1, 3], "test": [7, 2, 1, 0, 4, 1, 4, 9]},
    "fashion-mnist": {"train": [9, 0, 0, 3, 0, 2, 7, 2], "test": [9, 2, 1, 1, 6, 1, 4, 6]},
}


def _find_idx_file(root: str, base: str, name: str) -> str | None:
    for directory in (root, os.path.join(root, _TORCHVISION_FOLDER[name], "raw")):
        for fname in (base, base + ".gz"):
            path = os.path.join(directory, fname)
            if os.path.isfile(path):
                return path
    return None


def expected_files(name: str) -> str:
    if name in CIFAR_LAYOUT:
        folder, archive, train, test = CIFAR_LAYOUT[name][:4]
        return f"{', '.join(train + test)} (directly, in {folder}/, or the archive {archive})"
    if name in _TORCHVISION_FOLDER:
        return (", ".join(MNIST_FILES["train"] + MNIST_FILES["test"])
                + f" (raw or .gz, directly or in {_TORCHVISION_FOLDER[name]}/raw/)")
    return "nothing"


def mnist_family(name: str, root: str, split: str) -> Raw:
    if not os.path.exists(root):
        raise FileNotFoundError(f"{name}: root {root!r} does not exist; expected a directory with {expected_files(name)}")
    image_base, label_base = MNIST_FILES[split]
    paths = {b: _find_idx_file(root, b, name) for b in (image_base, label_base)}
    missing = [b for b, p in paths.items() if p is None]
    if missing:
        raw_dir = os.path.join(root, _TORCHVISION_FOLDER[name], "raw")
        raise FileNotFoundError(
            f"{name}: {', '.join(missing)} (or .gz) not found in {root!r} nor {raw_dir!r}; "
            f"expected the idx files {expected_files(name)}"
        )
    images = read_idx(paths[image_base], 3)
    labels = read_idx(paths[label_base], 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{name}: {paths[image_base]} has {images.shape[0]} images but {paths[label_base]} has {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{name}: {paths[label_base]} has label {labels.max()}; expected 0..9")
    other = "fashion-mnist" if name == "mnist" else "mnist"
    if labels[:8].tolist() == _FIRST_LABELS[other][split]:
        # Same file names, same format: only the content tells them apart.
        raise ValueError(f"{name}: the files in {root!r} are {other}'s (their labels begin like {other}'s); "
                         f"load them as {other!r} so they get {other}'s normalisation, class names and name")
    return Raw(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels))


# ----------------------------------------------------------------------------------------------- CIFAR
CIFAR_LAYOUT = {
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


def _cifar_sources(name: str, root: str, files: list[str], probe: bool = False):
    """Yields (description, opener) per file: from a directory or the unextracted archive. With
    ``probe`` only says whether they are there (FileNotFoundError if not)."""
    folder, archive, *_ = CIFAR_LAYOUT[name]
    if not os.path.exists(root):
        raise FileNotFoundError(f"{name}: root {root!r} does not exist; expected a directory with {expected_files(name)}")
    for directory in (root, os.path.join(root, folder)):
        if all(os.path.isfile(os.path.join(directory, f)) for f in files):
            return [(os.path.join(directory, f), lambda p=os.path.join(directory, f): open(p, "rb")) for f in files]
    for path in (root, os.path.join(root, archive)):
        if os.path.isfile(path) and tarfile.is_tarfile(path):
            if probe:
                return []
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
        f"{searched[2]!r}; expected the python-pickle version of the dataset ({expected_files(name)})"
    )


def cifar(name: str, root: str, split: str) -> Raw:
    _folder, _archive, train_files, test_files, label_key = CIFAR_LAYOUT[name]
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
        if lab.size and (lab.min() < 0 or lab.max() >= NUM_CLASSES[name]):
            raise ValueError(f"{what}: labels must be in [0, {NUM_CLASSES[name]}), got [{lab.min()}, {lab.max()}]")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(lab))
    return Raw(torch.cat(images), torch.cat(labels), _cifar100_classes(root) if name == "cifar100" else None)


def _cifar100_classes(root: str):
    """CIFAR-100's fine label names from the extracted "meta" file (None when it is not there)."""
    folder = CIFAR_LAYOUT["cifar100"][0]
    for directory in (root, os.path.join(root, folder)):
        path = os.path.join(directory, "meta")
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                meta = _unpickle(fh, path)
            names = meta.get(b"fine_label_names")
            if isinstance(names, list) and len(names) == 100:
                return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return None
