"""kdfast.data: the embedded digits split, the CIFAR pickle and MNIST idx readers (on tiny files
written here in the exact formats), and the errors for missing paths and bad files."""
import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from kdfast import data


# ============================================================================================ digits
def test_digits_split_sizes_labels_and_determinism():
    train = data.load("digits", split="train")
    test = data.load("digits", split="test")
    assert len(train) == 1347 and len(test) == 450
    assert train.images.shape == (1347, 1, 16, 16) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64 and set(train.labels.tolist()) == set(range(10))
    # stratified: every class has round(25%) of its images in the test split
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    assert test.labels.bincount().tolist() == [int(round(0.25 * c)) for c in per_class]
    # fixed: the same indices every time, disjoint and covering the 1,797 images
    tr_idx, te_idx = data.digits_split_indices()
    tr2, te2 = data.digits_split_indices()
    assert np.array_equal(tr_idx, tr2) and np.array_equal(te_idx, te2)
    assert len(np.intersect1d(tr_idx, te_idx)) == 0 and len(tr_idx) + len(te_idx) == 1797
    again = data.load("digits", split="test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    # normalised with the training split's statistics
    assert abs(train.images.mean().item()) < 1e-4 and abs(train.images.std().item() - 1) < 1e-3
    lo, hi = train.clamp_range
    assert train.images.min() >= lo.item() - 1e-5 and train.images.max() <= hi.item() + 1e-5


def test_digits_sizes_unnormalised_and_index():
    native = data.load("digits", image_size=8, normalize=False)
    assert native.images.shape[1:] == (1, 8, 8)
    from sklearn.datasets import load_digits

    d = load_digits()
    tr_idx, _ = data.digits_split_indices()
    # native size, no normalisation: exactly the sklearn pixels / 16
    assert torch.allclose(native.images[:, 0], torch.from_numpy(d.images[tr_idx] / 16).float())
    assert torch.equal(native.labels, torch.from_numpy(d.target[tr_idx]))
    big = data.load("digits", split="test", image_size=32, return_index=True)
    x, y, i = big[5]
    assert x.shape == (1, 32, 32) and i == 5 and y == big.labels[5]


def test_digits_loaders_reproducible():
    tr1, te1 = data.loaders("digits", batch_size=100, seed=3)
    tr2, _ = data.loaders("digits", batch_size=100, seed=3)
    xb1, yb1 = next(iter(tr1))
    xb2, yb2 = next(iter(tr2))
    assert xb1.shape == (100, 1, 16, 16) and torch.equal(yb1, yb2) and torch.equal(xb1, xb2)
    assert sum(len(b[1]) for b in te1) == 450


def test_augment_keeps_shape_and_content_statistics():
    tr, _ = data.loaders("digits", batch_size=64, augment=True, seed=0)
    x, y = next(iter(tr))
    assert x.shape == (64, 1, 16, 16) and y.shape == (64,)
    lo, hi = tr.dataset.clamp_range
    assert x.min() >= lo.item() - 1e-5 and x.max() <= hi.item() + 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "imagenet"}, "name must be one of"),
        ({"name": "digits", "split": "val"}, "split must be one of"),
        ({"name": "digits", "image_size": 0}, "image_size"),
        ({"name": "cifar10"}, "root is required"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load(**kwargs)


# ============================================================================================ CIFAR
def _cifar_batch(n, rng, label_key, num_classes):
    return {
        b"batch_label": b"synthetic",
        label_key: rng.randint(0, num_classes, size=n).tolist(),
        b"data": rng.randint(0, 256, size=(n, 3072)).astype(np.uint8),
        b"filenames": [b"x.png"] * n,
    }


def _write_cifar10(directory, rng):
    os.makedirs(directory, exist_ok=True)
    batches = {}
    for name, n in [*[(f"data_batch_{i}", 3) for i in range(1, 6)], ("test_batch", 4)]:
        batches[name] = _cifar_batch(n, rng, b"labels", 10)
        with open(os.path.join(directory, name), "wb") as fh:
            pickle.dump(batches[name], fh, protocol=2)
    return batches


def test_cifar10_reader_matches_file_contents(tmp_path):
    rng = np.random.RandomState(0)
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py", rng)
    # the parent directory and the batch directory both work
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        train = data.load("cifar10", root=root, split="train", normalize=False)
        assert train.images.shape == (15, 3, 32, 32) and train.num_classes == 10
        want = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
        assert torch.allclose(train.images, torch.from_numpy(want).float() / 255)
        want_y = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
        assert train.labels.tolist() == want_y
    test = data.load("cifar10", root=tmp_path, split="test", image_size=16)
    assert test.images.shape == (4, 3, 16, 16)
    # normalised with the CIFAR-10 constants
    raw = data.load("cifar10", root=tmp_path, split="test", normalize=False)
    norm = data.load("cifar10", root=tmp_path, split="test")
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    assert torch.allclose(norm.images, (raw.images - mean) / std, atol=1e-6)


def test_cifar100_reader_and_archive(tmp_path):
    rng = np.random.RandomState(1)
    train = _cifar_batch(5, rng, b"fine_labels", 100)
    test = _cifar_batch(2, rng, b"fine_labels", 100)
    tar_path = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for name, batch in (("train", train), ("test", test)):
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    ds = data.load("cifar100", root=tmp_path, split="train", normalize=False)  # from the unextracted archive
    assert ds.images.shape == (5, 3, 32, 32) and ds.num_classes == 100
    assert ds.labels.tolist() == train[b"fine_labels"]
    assert torch.allclose(ds.images.flatten(1), torch.from_numpy(train[b"data"]).float() / 255)


def test_cifar_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("cifar10", root=tmp_path / "nope")
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="data_batch_1, data_batch_2.*test_batch"):
        data.load("cifar10", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="train, test"):
        data.load("cifar100", root=tmp_path, split="test")


def test_cifar_bad_files_are_rejected(tmp_path):
    rng = np.random.RandomState(2)
    _write_cifar10(tmp_path, rng)
    bad = _cifar_batch(4, rng, b"labels", 10)
    bad[b"data"] = bad[b"data"][:, :100]
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump(bad, fh, protocol=2)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        data.load("cifar10", root=tmp_path, split="test")

    class Evil:  # a pickle that would call os.system when unpickled
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil()}, fh)
    with pytest.raises(ValueError, match="not a CIFAR python-pickle batch"):
        data.load("cifar10", root=tmp_path, split="test")


# ============================================================================================ MNIST
def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_mnist_idx_reader(tmp_path, compressed):
    rng = np.random.RandomState(3)
    raw_dir = tmp_path / "MNIST" / "raw"  # torchvision's layout
    raw_dir.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, size=(7, 28, 28)),
        "train-labels-idx1-ubyte": rng.randint(0, 10, size=7),
        "t10k-images-idx3-ubyte": rng.randint(0, 256, size=(3, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.randint(0, 10, size=3),
    }
    for name, arr in arrays.items():
        blob = _idx_bytes(arr)
        if compressed:
            (raw_dir / (name + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (raw_dir / name).write_bytes(blob)
    train = data.load("mnist", root=tmp_path, split="train", normalize=False)
    assert train.images.shape == (7, 1, 28, 28)
    assert torch.allclose(train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 255)
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    test = data.load("mnist", root=raw_dir, split="test", image_size=14)
    assert test.images.shape == (3, 1, 14, 14) and test.mean == (0.1307,)


def test_mnist_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("mnist", root=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"):
        data.load("mnist", root=tmp_path, split="test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((2, 4, 4))))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3)))
    with pytest.raises(ValueError, match="2 images but .* 3 labels"):
        data.load("mnist", root=tmp_path, split="test")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 12)
    with pytest.raises(ValueError, match="bad idx magic"):
        data.load("mnist", root=tmp_path, split="test")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(2))[:-1])
    with pytest.raises(ValueError, match="file holds"):
        data.load("mnist", root=tmp_path, split="test")
