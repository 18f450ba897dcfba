"""Your own data, in one of three formats (``kdfast.data.load(FORMAT, root=PATH)``):

* ``"folder"``: a folder of images in class sub-folders, ``PATH/<class>/<image>`` (one pool, split by
  kdfast) or ``PATH/train/<class>/...`` and ``PATH/test/<class>/...`` (``val/`` is accepted for
  ``test/``); the layout of torchvision's ImageFolder. Read with Pillow (installed with matplotlib,
  a kdfast dependency; imported only here).
* ``"npz"``: a NumPy ``.npz`` file with arrays ``x`` (images) and ``y`` (integer labels) as one pool,
  or ``x_train``, ``y_train``, ``x_test``, ``y_test``; optionally ``classes`` (the class names).
* ``"idx"``: a directory of IDX files (MNIST's format): one file name each containing
  ``train-images``, ``train-labels``, and ``t10k-images`` / ``test-images``, ``t10k-labels`` /
  ``test-labels`` (raw or .gz; e.g. KMNIST's or EMNIST's files).

A pool is split per class with :func:`kdfast.data.dataset.holdout_split` (20 % to test, fixed seed).
Class indices: folder names in sorted order; for arrays and IDX files the labels themselves (0 ..
largest label).
"""
from __future__ import annotations

import fnmatch
import os

import numpy as np
import torch

from .dataset import Raw, holdout_split, resize
from .idx import read_idx

FORMATS = ("folder", "npz", "idx")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_TEST_FOLDERS = ("test", "val")
# Pillow modes that are one grey channel; anything else is converted to RGB (alpha dropped).
_GREY_MODES = ("1", "L", "I", "I;16", "F")


def read(fmt: str, root: str, split: str, image_size: int | None) -> Raw:
    """One split of own data; ``image_size`` is needed here only when a folder's images differ in size."""
    if not os.path.exists(root):
        raise FileNotFoundError(f"{fmt}: root {root!r} does not exist; expected {_EXPECTED[fmt]}")
    if fmt == "folder":
        return _folder(root, split, image_size)
    if fmt == "npz":
        return _npz(root, split)
    return _idx_dir(root, split)


_EXPECTED = {
    "folder": "a folder with one sub-folder of images per class, or train/ and test/ folders of class sub-folders",
    "npz": "an .npz file with arrays x and y (or x_train, y_train, x_test, y_test)",
    "idx": "a directory with IDX files named *train-images*, *train-labels*, *t10k-images* (or *test-images*) "
           "and *t10k-labels* (or *test-labels*)",
}


def _pool_part(labels: np.ndarray, split: str) -> np.ndarray:
    train, test = holdout_split(labels)
    return train if split == "train" else test


# ============================================================================================ folder
def _class_dirs(directory: str) -> list[str]:
    return sorted(d for d in os.listdir(directory)
                  if not d.startswith(".") and os.path.isdir(os.path.join(directory, d)))


def _folder(root: str, split: str, image_size: int | None) -> Raw:
    if not os.path.isdir(root):
        raise ValueError(f"folder: root {root!r} is a file; expected {_EXPECTED['folder']}")
    top = _class_dirs(root)
    if "train" in top and any(t in top for t in _TEST_FOLDERS):
        test_dir = next(t for t in _TEST_FOLDERS if t in top)
        classes = _class_dirs(os.path.join(root, "train"))
        if not classes:
            raise ValueError(f"folder: {os.path.join(root, 'train')!r} has no class sub-folders")
        if split == "test":
            extra = sorted(set(_class_dirs(os.path.join(root, test_dir))) - set(classes))
            if extra:
                raise ValueError(f"folder: {os.path.join(root, test_dir)!r} has classes that train/ lacks: {extra}")
        directory = os.path.join(root, "train" if split == "train" else test_dir)
        files, labels = _list_images(directory, classes, allow_empty=split == "test")
    else:
        classes = top
        if not classes:
            raise ValueError(f"folder: {root!r} has no sub-folders; expected {_EXPECTED['folder']}")
        files, labels = _list_images(root, classes, allow_empty=False)
        keep = _pool_part(labels, split)
        files, labels = [files[i] for i in keep], labels[keep]
    images = _read_images(files, image_size)
    return Raw(images, torch.from_numpy(labels.astype(np.int64)), tuple(classes))


def _list_images(directory: str, classes: list[str], allow_empty: bool):
    files, labels = [], []
    for index, cls in enumerate(classes):
        cls_dir = os.path.join(directory, cls)
        listed = os.listdir(cls_dir) if os.path.isdir(cls_dir) else []  # a test/ may lack a class
        names = sorted(n for n in listed if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
        if not names and not allow_empty:
            raise ValueError(f"folder: class folder {cls_dir!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        files += [os.path.join(cls_dir, n) for n in names]
        labels += [index] * len(names)
    return files, np.asarray(labels, dtype=np.int64)


def _read_images(files: list[str], image_size: int | None) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError("reading a folder of images needs Pillow (pip install pillow; matplotlib brings it)") from None

    arrays, modes = [], set()
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                modes.add(img.mode)
                arrays.append((path, img.copy()))
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad file
            raise ValueError(f"folder: cannot read {path!r} as an image: {type(exc).__name__}: {exc}") from None
    grey = all(m in _GREY_MODES for m in modes)
    tensors = []
    for path, img in arrays:
        if grey:
            if img.mode in ("I", "I;16"):  # 16-bit grey PNGs
                arr = np.asarray(img.convert("F"), dtype=np.float32) / 65535.0
            elif img.mode == "F":  # float images are taken as [0, 1]
                arr = np.asarray(img, dtype=np.float32)
            else:
                arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            arr = arr[None]
        else:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
        tensors.append((path, torch.from_numpy(np.ascontiguousarray(arr))))
    if not tensors:
        channels = 1 if grey else 3
        size = image_size or 1
        return torch.zeros(0, channels, size, size)
    shapes = {}
    for path, t in tensors:
        shapes.setdefault(tuple(t.shape[1:]), path)
    if len(shapes) > 1:
        if image_size is None:
            (s1, p1), (s2, p2) = list(shapes.items())[:2]
            raise ValueError(f"folder: images differ in size ({p1!r} is {s1[0]}x{s1[1]}, {p2!r} is {s2[0]}x{s2[1]}); "
                             "give image_size to resize them all to one size")
        return torch.cat([resize(t.unsqueeze(0).clamp(0, 1), image_size) for _, t in tensors])
    return torch.stack([t for _, t in tensors]).clamp_(0, 1)


# ============================================================================================ npz
def _npz(root: str, split: str) -> Raw:
    if os.path.isdir(root):
        raise ValueError(f"npz: root {root!r} is a directory; expected {_EXPECTED['npz']}")
    try:
        archive = np.load(root, allow_pickle=False)
        keys = set(archive.files)
    except Exception as exc:  # noqa: BLE001 - not an npz file
        raise ValueError(f"npz: cannot read {root!r} as a NumPy .npz file: {type(exc).__name__}: {exc}") from None
    with archive:
        classes = tuple(str(c) for c in archive["classes"]) if "classes" in keys else None
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            x, y = archive[f"x_{split}"], archive[f"y_{split}"]
            all_labels = np.concatenate([archive["y_train"].ravel(), archive["y_test"].ravel()])
            where = f"{root}: x_{split}, y_{split}"
        elif {"x", "y"} <= keys:
            x, y = archive["x"], archive["y"]
            all_labels = y.ravel()
            where = f"{root}: x, y"
        else:
            raise ValueError(f"npz: {root!r} holds the arrays {sorted(keys)}; expected x and y "
                             "(or x_train, y_train, x_test, y_test)")
    images = _image_array(x, where)
    labels = _label_array(y, len(x), where)
    _check_classes(classes, all_labels, root)
    if "x" in keys and "x_train" not in keys:
        keep = _pool_part(labels, split)
        images, labels = images[keep], labels[keep]
    return Raw(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), classes)


def _image_array(x: np.ndarray, where: str) -> np.ndarray:
    """(N, C, H, W) uint8, or float32 in [0, 1], from (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        last, second = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
        if last and not second:
            x = x.transpose(0, 3, 1, 2)
        elif not last and not second:
            raise ValueError(f"npz: {where}: images of shape {x.shape} have no channel axis of size 1 or 3 "
                             "(expected (N, H, W), (N, H, W, C) or (N, C, H, W))")
        elif last and second and x.shape[1] != x.shape[3]:
            raise ValueError(f"npz: {where}: images of shape {x.shape}: cannot tell (N, H, W, C) from (N, C, H, W)")
        elif last and second:
            x = x.transpose(0, 3, 1, 2)  # (N, 3, W, 3) images are too small to matter: channels last, as saved by NumPy code
    else:
        raise ValueError(f"npz: {where}: images must have 3 or 4 dimensions, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"npz: {where}: integer pixels must be in [0, 255], got [{x.min()}, {x.max()}]")
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise ValueError(f"npz: {where}: float pixels must be finite and in [0, 1] (uint8 for 0..255), "
                             f"got [{np.nanmin(x)}, {np.nanmax(x)}]")
        return x.astype(np.float32)
    raise ValueError(f"npz: {where}: images must be uint8, integer or float, got {x.dtype}")


def _label_array(y: np.ndarray, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"npz: {where}: labels must be {n} integers (one per image), got {y.dtype} {y.shape}")
    if y.size and y.min() < 0:
        raise ValueError(f"npz: {where}: labels must be >= 0, got {y.min()}")
    return y.astype(np.int64)


def _check_classes(classes, all_labels, where):
    if classes is not None and all_labels.size and all_labels.max() >= len(classes):
        raise ValueError(f"{where}: label {all_labels.max()} but only {len(classes)} class names")


# ============================================================================================ idx
_IDX_PATTERNS = {
    ("train", "images"): ("*train-images*", "*train_images*"),
    ("train", "labels"): ("*train-labels*", "*train_labels*"),
    ("test", "images"): ("*t10k-images*", "*test-images*", "*test_images*"),
    ("test", "labels"): ("*t10k-labels*", "*test-labels*", "*test_labels*"),
}


def _idx_file(root: str, split: str, kind: str) -> str:
    names = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n)))
    found = [n for n in names if any(fnmatch.fnmatch(n.lower(), p) for p in _IDX_PATTERNS[(split, kind)])]
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(found)})"
        raise FileNotFoundError(f"idx: {what} in {root!r} named like {' or '.join(_IDX_PATTERNS[(split, kind)])}; "
                                f"expected exactly one ({_EXPECTED['idx']})")
    return os.path.join(root, found[0])


def _idx_dir(root: str, split: str) -> Raw:
    if not os.path.isdir(root):
        raise ValueError(f"idx: root {root!r} is a file; expected {_EXPECTED['idx']}")
    images_path, labels_path = _idx_file(root, split, "images"), _idx_file(root, split, "labels")
    images = read_idx(images_path, (3, 4))
    labels = read_idx(labels_path, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"idx: {images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)  # (N, H, W, C) -> NCHW
    if images.shape[1] not in (1, 3):
        raise ValueError(f"idx: {images_path}: 4-dimensional images must be (N, H, W, C) with C 1 or 3, "
                         f"got C={images.shape[1]}")
    return Raw(torch.from_numpy(np.array(images)), torch.from_numpy(labels))  # a copy: the file's buffer is read-only


def num_classes(fmt: str, root: str, raw: Raw) -> int:
    """The class count of own data: the class names' count, else 1 + the largest label in either split
    (IDX, npz), so both splits agree even when one lacks the last class."""
    if raw.classes is not None:
        return len(raw.classes)
    largest = int(raw.labels.max()) if raw.labels.numel() else -1
    if fmt == "idx":
        for split in ("train", "test"):
            try:
                lab = read_idx(_idx_file(root, split, "labels"), 1)
            except FileNotFoundError:
                continue
            if lab.size:
                largest = max(largest, int(lab.max()))
    elif fmt == "npz":
        with np.load(root, allow_pickle=False) as archive:
            for key in ("y", "y_train", "y_test"):
                if key in archive.files and archive[key].size:
                    largest = max(largest, int(archive[key].max()))
    return largest + 1


__all__ = ["FORMATS", "IMAGE_EXTENSIONS", "num_classes", "read"]
