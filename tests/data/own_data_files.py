"""Tiny own-data files for the tests, written in the exact formats users have: a folder of PNG images
in class sub-folders, an .npz of arrays, a directory of IDX files."""
import os

import numpy as np


def class_images(rng, n_per_class, size=8, channels=1, classes=3):
    """(images uint8 (N, H, W[, C]), labels): class c is brighter with c, so a model can learn it."""
    images, labels = [], []
    for c in range(classes):
        for _ in range(n_per_class[c] if isinstance(n_per_class, (list, tuple)) else n_per_class):
            base = 40 + 80 * c
            shape = (size, size) if channels == 1 else (size, size, channels)
            images.append(np.clip(base + rng.randint(-30, 30, size=shape), 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def write_png_folder(root, rng, n_per_class=5, size=8, mode="L", classes=("cat", "dog", "frog"), split_dirs=False):
    """root/<class>/<i>.png (or root/train/<class>/ and root/test/<class>/ with split_dirs); returns
    {(split or None, class): [uint8 arrays in file-name order]}."""
    from PIL import Image

    written = {}
    splits = ("train", "test") if split_dirs else (None,)
    for split in splits:
        for index, cls in enumerate(classes):
            directory = os.path.join(root, split, cls) if split else os.path.join(root, cls)
            os.makedirs(directory, exist_ok=True)
            arrays = []
            count = n_per_class if split != "test" else max(1, n_per_class // 2)
            for i in range(count):
                shape = (size, size) if mode == "L" else (size, size, 3)
                arr = np.clip(40 + 80 * index + rng.randint(-30, 30, size=shape), 0, 255).astype(np.uint8)
                Image.fromarray(arr, mode=mode).save(os.path.join(directory, f"{i:03d}.png"))
                arrays.append(arr)
            written[(split, cls)] = arrays
    return written


def write_idx_dir(root, rng, prefix="", gz=True, train=12, test=6, size=7):
    from kdfast.data import write_idx

    os.makedirs(root, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, size=(train, size, size)),
        "train-labels-idx1-ubyte": np.arange(train) % 4,
        "t10k-images-idx3-ubyte": rng.randint(0, 256, size=(test, size, size)),
        "t10k-labels-idx1-ubyte": np.arange(test) % 3,  # the test split lacks class 3
    }
    for name, arr in arrays.items():
        write_idx(os.path.join(root, prefix + name + (".gz" if gz else "")), arr)
    return arrays
