"""Datasets by name: Fashion-MNIST found without arguments (Debian package location, then
$KDFAST_DATA, or root), its own name, normalisation and class names; one error saying how to get a
missing dataset; MNIST's and Fashion-MNIST's files (same names, same format) told apart.

Tests on the real files skip when the Debian package dataset-fashion-mnist is not installed
(`make test` installs it where apt-get exists; `make data` does it by hand)."""
import os

import numpy as np
import pytest
import torch

from kdfast import data
from kdfast.data import named
from own_data_files import class_images

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
REAL = all(os.path.isfile(os.path.join(DEBIAN_DIR, f + ".gz"))
           for f in named.MNIST_FILES["train"] + named.MNIST_FILES["test"])
needs_fashion = pytest.mark.skipif(
    not REAL, reason=f"Fashion-MNIST is not installed in {DEBIAN_DIR}: apt-get install dataset-fashion-mnist "
                     "(or `make data`)")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def _write_mnist_like(directory, first_labels=None, n=10):
    """Four IDX files with MNIST's names; the first labels can be set (they tell the datasets apart)."""
    rng = np.random.RandomState(0)
    os.makedirs(directory, exist_ok=True)
    for split, (img_name, lab_name) in named.MNIST_FILES.items():
        x, _ = class_images(rng, 4, size=28, classes=10)
        y = np.arange(len(x)) % 10
        if first_labels is not None:
            y[: len(first_labels[split])] = first_labels[split]
        data.write_idx(os.path.join(directory, img_name + ".gz"), x[:n])
        data.write_idx(os.path.join(directory, lab_name + ".gz"), y[:n])


# ============================================================================================ the trap
def test_fashion_mnist_has_its_own_name_normalisation_and_classes(tmp_path):
    # Before: only load("mnist", root=...) read these files; the dataset was recorded as "mnist",
    # normalised with MNIST's (0.1307, 0.3081) and its classes were digits.
    _write_mnist_like(tmp_path)
    ds = data.load("fashion-mnist", root=tmp_path)
    assert ds.name == "fashion-mnist" and ds.record()["name"] == "fashion-mnist"
    assert ds.classes == FASHION_CLASSES and ds.num_classes == 10
    assert ds.mean == (0.2860406,) and ds.std == (0.3530242,)
    assert "fashion-mnist" in data.DATASETS and data.NORMALIZATION["mnist"] != data.NORMALIZATION["fashion-mnist"]


def test_the_two_datasets_files_are_told_apart(tmp_path):
    _write_mnist_like(tmp_path / "f", named._FIRST_LABELS["fashion-mnist"])
    with pytest.raises(ValueError, match="are fashion-mnist's .* load them as 'fashion-mnist'"):
        data.load("mnist", root=tmp_path / "f")
    assert data.load("fashion-mnist", root=tmp_path / "f", split="test").name == "fashion-mnist"
    _write_mnist_like(tmp_path / "m", named._FIRST_LABELS["mnist"])
    with pytest.raises(ValueError, match="are mnist's"):
        data.load("fashion-mnist", root=tmp_path / "m", split="test")
    assert data.load("mnist", root=tmp_path / "m").classes == tuple("0123456789")


# ============================================================================================ where
def test_search_order_system_dir_then_kdfast_data_then_root(tmp_path, monkeypatch):
    system, env = tmp_path / "system", tmp_path / "env"
    _write_mnist_like(system, n=10)
    _write_mnist_like(env / "fashion-mnist", n=7)
    _write_mnist_like(tmp_path / "mine", n=5)
    monkeypatch.setitem(named.SYSTEM_ROOTS, "fashion-mnist", [str(system)])
    monkeypatch.setenv("KDFAST_DATA", str(env))
    first = data.load("fashion-mnist")
    assert len(first) == 10 and first.root == str(system)
    monkeypatch.setitem(named.SYSTEM_ROOTS, "fashion-mnist", [str(tmp_path / "not-installed")])
    second = data.load("fashion-mnist")
    assert len(second) == 7 and second.root == str(env / "fashion-mnist")
    assert len(data.load("fashion-mnist", root=tmp_path / "mine")) == 5  # root wins


def test_absent_dataset_is_one_error_that_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(named.SYSTEM_ROOTS, "fashion-mnist", [str(tmp_path / "not-installed")])
    monkeypatch.delenv("KDFAST_DATA", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        data.load("fashion-mnist", split="test")
    message = str(info.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "make data" in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "not-installed") in message and "KDFAST_DATA is not set" in message
    monkeypatch.setenv("KDFAST_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"nor {tmp_path / 'fashion-mnist'};"):
        data.load("fashion-mnist")


def test_cli_robustness_accepts_every_dataset_name():
    from kdfast.cli import main

    parser = main.build_parser()
    for name in data.NAMES:
        assert parser.parse_args(["robustness", "--checkpoint", "m.pt", "--data", name]).data == name


# ============================================================================================ real files
@needs_fashion
def test_real_fashion_mnist_found_without_arguments():
    train = data.load("fashion-mnist")
    test = data.load("fashion-mnist", split="test")
    assert train.root == DEBIAN_DIR and train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    assert train.classes == FASHION_CLASSES
    # normalised with the training split's own statistics: mean ~0, std ~1
    assert abs(train.images.mean().item()) < 1e-3 and abs(train.images.std().item() - 1) < 1e-3


@needs_fashion
def test_hard_coded_statistics_are_the_training_splits():
    raw = named.mnist_family("fashion-mnist", DEBIAN_DIR, "train").images
    mean, std = data.channel_stats(raw)
    assert mean[0] == pytest.approx(0.2860405969887955, abs=1e-12)
    assert std[0] == pytest.approx(0.35302424451492254, abs=1e-9)  # sum-of-squares vs two-pass rounding
    want_mean, want_std = data.NORMALIZATION["fashion-mnist"]
    assert abs(want_mean[0] - mean[0]) < 1e-7 and abs(want_std[0] - std[0]) < 1e-7
    x = raw.double() / 255  # float64 two-pass oracle over all pixels
    assert x.mean().item() == pytest.approx(mean[0], abs=1e-12)
    assert x.std(unbiased=False).item() == pytest.approx(std[0], abs=1e-9)


@needs_fashion
def test_real_fashion_mnist_stratified_subset():
    small = data.load("fashion-mnist", subset=1000)
    assert small.labels.bincount().tolist() == [100] * 10
    assert small.name == "fashion-mnist" and small.record()["selection"]["of"] == 60000
    assert torch.equal(small.images, data.load("fashion-mnist", subset=1000).images)
