"""kdfast.data on your own data: a folder of images in class sub-folders, an .npz of arrays, a directory
of IDX files (tiny files written here); statistics computed from the training split; stratified,
seeded subsets; the record a model file keeps and reloading from it."""
import os

import numpy as np
import pytest
import torch

from kdfast import data
from own_data_files import class_images, write_idx_dir, write_png_folder


# ============================================================================================ folder
def test_folder_pool_is_split_per_class_and_read_exactly(tmp_path):
    written = write_png_folder(tmp_path, np.random.RandomState(0), n_per_class=10)
    train = data.load("folder", root=tmp_path, split="train", normalize=False)
    test = data.load("folder", root=tmp_path, split="test", normalize=False)
    assert train.classes == ("cat", "dog", "frog") and train.num_classes == 3 and train.name == "folder"
    assert train.root == str(tmp_path) and train.images.shape == (24, 1, 8, 8) and len(test) == 6
    assert test.labels.bincount().tolist() == [2, 2, 2]  # 20 % of each class
    # the pool split is data.holdout_split of the labels in file order: pixels are exactly the PNGs / 255
    pool = np.stack([a for cls in ("cat", "dog", "frog") for a in written[(None, cls)]])
    labels = np.repeat(np.arange(3), 10)
    tr_idx, te_idx = data.holdout_split(labels)
    assert torch.equal(train.images[:, 0], torch.from_numpy(pool[tr_idx]).float() / 255)
    assert train.labels.tolist() == labels[tr_idx].tolist()
    assert torch.equal(test.images[:, 0], torch.from_numpy(pool[te_idx]).float() / 255)


def test_folder_train_test_layout_rgb_and_computed_statistics(tmp_path):
    write_png_folder(tmp_path, np.random.RandomState(1), n_per_class=4, mode="RGB", split_dirs=True)
    raw = data.load("folder", root=tmp_path, normalize=False)
    assert raw.images.shape == (12, 3, 8, 8) and raw.mean == (0.0, 0.0, 0.0)
    train = data.load("folder", root=tmp_path)
    test = data.load("folder", root=tmp_path, split="test")
    # per-channel population mean/std of the training split's [0, 1] pixels, in float64
    x = raw.images.double()
    want_mean = x.mean(dim=(0, 2, 3))
    want_std = ((x - want_mean.view(1, 3, 1, 1)) ** 2).mean(dim=(0, 2, 3)).sqrt()
    assert torch.allclose(torch.tensor(train.mean, dtype=torch.float64), want_mean, atol=1e-9)
    assert torch.allclose(torch.tensor(train.std, dtype=torch.float64), want_std, atol=1e-9)
    assert test.mean == train.mean and test.std == train.std  # the test split uses the training statistics
    assert len(test) == 6 and test.classes == train.classes
    assert abs(train.images.mean().item()) < 1e-5


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="root is required for 'folder'"):
        data.load("folder")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("folder", root=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no sub-folders"):
        data.load("folder", root=tmp_path / "empty")
    write_png_folder(tmp_path / "mixed", np.random.RandomState(2), n_per_class=2)
    from PIL import Image

    for cls in ("cat", "dog", "frog"):  # half of each class: the training split holds both sizes
        for i in range(2):
            Image.fromarray(np.zeros((5, 9), np.uint8)).save(tmp_path / "mixed" / cls / f"big{i}.png")
    with pytest.raises(ValueError, match=r"images differ in size .*give image_size"):
        data.load("folder", root=tmp_path / "mixed")
    resized = data.load("folder", root=tmp_path / "mixed", image_size=6)
    assert resized.images.shape[1:] == (1, 6, 6)
    (tmp_path / "mixed" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png.* as an image"):
        data.load("folder", root=tmp_path / "mixed", image_size=6)
    (tmp_path / "nothing" / "a").mkdir(parents=True)
    (tmp_path / "nothing" / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        data.load("folder", root=tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"is a path: give its format as name.*load\('folder'"):
        data.load(str(tmp_path / "mixed"))


# ============================================================================================ npz
@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npz_pool_layouts(tmp_path, layout):
    rng = np.random.RandomState(3)
    x, y = class_images(rng, 5, size=6, channels=1 if layout == "NHW" else 3)
    stored = {"NHW": x, "NHWC": x, "NCHW": x.transpose(0, 3, 1, 2) if x.ndim == 4 else x}[layout]
    np.savez(tmp_path / "d.npz", x=stored, y=y, classes=np.array(["a", "b", "c"]))
    train = data.load("npz", root=tmp_path / "d.npz", normalize=False)
    test = data.load("npz", root=tmp_path / "d.npz", split="test", normalize=False)
    tr, te = data.holdout_split(y)
    want = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    assert torch.equal(train.images, torch.from_numpy(want[tr]).float() / 255)
    assert test.labels.tolist() == y[te].tolist() and train.classes == ("a", "b", "c")


def test_npz_named_splits_float_pixels_and_errors(tmp_path):
    rng = np.random.RandomState(4)
    x_train = rng.rand(8, 5, 5).astype(np.float32)
    x_test = rng.rand(3, 5, 5).astype(np.float32)
    np.savez(tmp_path / "s.npz", x_train=x_train, y_train=np.arange(8) % 2, x_test=x_test, y_test=np.array([0, 1, 4]))
    train = data.load("npz", root=tmp_path / "s.npz", normalize=False)
    assert torch.equal(train.images[:, 0], torch.from_numpy(x_train))
    assert train.num_classes == 5  # the largest label of either split
    test = data.load("npz", root=tmp_path / "s.npz", split="test", normalize=False)
    assert torch.equal(test.images[:, 0], torch.from_numpy(x_test)) and test.labels.tolist() == [0, 1, 4]

    np.savez(tmp_path / "bad.npz", images=x_train, labels=np.zeros(8, int))
    with pytest.raises(ValueError, match=r"holds the arrays \['images', 'labels'\]; expected x and y"):
        data.load("npz", root=tmp_path / "bad.npz")
    np.savez(tmp_path / "range.npz", x=x_train * 255, y=np.zeros(8, int))
    with pytest.raises(ValueError, match=r"float pixels must be finite and in \[0, 1\]"):
        data.load("npz", root=tmp_path / "range.npz")
    np.savez(tmp_path / "count.npz", x=x_train, y=np.zeros(7, int))
    with pytest.raises(ValueError, match="labels must be 8 integers"):
        data.load("npz", root=tmp_path / "count.npz")
    np.savez(tmp_path / "chan.npz", x=rng.rand(4, 5, 5, 7), y=np.zeros(4, int))
    with pytest.raises(ValueError, match="no channel axis of size 1 or 3"):
        data.load("npz", root=tmp_path / "chan.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="cannot read .* as a NumPy .npz file"):
        data.load("npz", root=tmp_path / "text.npz")


# ============================================================================================ idx
def test_idx_directory_by_path_with_other_file_names(tmp_path):
    arrays = write_idx_dir(tmp_path, np.random.RandomState(5), prefix="kmnist-")
    train = data.load("idx", root=tmp_path, normalize=False)
    assert train.name == "idx" and train.num_classes == 4 and train.images.shape == (12, 1, 7, 7)
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 255)
    test = data.load("idx", root=tmp_path, split="test")
    assert test.num_classes == 4 and test.mean == data.load("idx", root=tmp_path).mean != train.mean
    write_idx_dir(tmp_path, np.random.RandomState(5), prefix="other-", gz=False)
    with pytest.raises(FileNotFoundError, match=r"2 files \(kmnist-train-images-idx3-ubyte.gz, other-train-images"):
        data.load("idx", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no file in .* named like"):
        data.load("idx", root=tmp_path / "..")


# ============================================================================================ subsets
def test_subset_and_fraction_are_stratified_and_seeded():
    full = data.load("digits")
    counts = full.labels.bincount()
    half = data.load("digits", fraction=0.5)
    assert half.labels.bincount().tolist() == [max(1, round(0.5 * c)) for c in counts.tolist()]
    assert half.selection == {"subset": None, "fraction": 0.5, "seed": 0, "of": len(full)}
    small = data.load("digits", subset=100)
    assert len(small) == 100
    per_class = small.labels.bincount().tolist()
    exact = [100 * c / len(full) for c in counts.tolist()]
    assert all(abs(p - e) < 1 for p, e in zip(per_class, exact))  # proportional, largest remainders
    again = data.load("digits", subset=100)
    assert torch.equal(again.images, small.images)
    other = data.load("digits", subset=100, subset_seed=1)
    assert not torch.equal(other.images, small.images)
    # the images are the full split's, and the normalisation is the full split's
    idx = data.stratified_indices(full.labels.numpy(), subset=100, seed=0)
    assert torch.equal(small.images, full.images[torch.from_numpy(idx)]) and small.mean == full.mean
    tiny = data.load("digits", subset=10)
    assert tiny.labels.bincount().tolist() == [1] * 10  # every class keeps one image
    assert len(data.load("digits", subset=10_000)) == len(full)


@pytest.mark.parametrize("kwargs, match", [
    ({"subset": 0}, "subset must be a positive int"),
    ({"subset": 2.5}, "subset must be a positive int"),
    ({"fraction": 0}, r"fraction must be a number in \(0, 1\]"),
    ({"fraction": 1.5}, r"fraction must be a number in \(0, 1\]"),
    ({"subset": 5, "fraction": 0.5}, "not both"),
    ({"subset_seed": -1}, "subset_seed must be an int >= 0"),
    ({"mean": (0.5,)}, "give both mean and std"),
    ({"mean": (0.5, 0.5), "std": (1, 1)}, "one value per channel"),
])
def test_bad_selection_and_statistics_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load("digits", **kwargs)


def test_loaders_subsets_and_test_split_statistics(tmp_path):
    write_png_folder(tmp_path, np.random.RandomState(6), n_per_class=10, mode="RGB")
    train, test = data.loaders("folder", tmp_path, batch_size=4, subset=9, test_fraction=0.5)
    assert len(train.dataset) == 9 and train.dataset.labels.bincount().tolist() == [3, 3, 3]
    assert len(test.dataset) == 3 and test.dataset.mean == train.dataset.mean


# ============================================================================================ records
def test_record_round_trips_through_load_arguments(tmp_path):
    write_png_folder(tmp_path, np.random.RandomState(7), n_per_class=5)
    train = data.load("folder", root=tmp_path, image_size=6, fraction=0.6)
    rec = train.record()
    assert rec["name"] == "folder" and rec["root"] == str(tmp_path) and rec["input_shape"] == [1, 6, 6]
    assert rec["image_size"] == 6 and rec["in_channels"] == 1 and rec["num_classes"] == 3
    assert rec["classes"] == ["cat", "dog", "frog"]
    assert rec["selection"]["fraction"] == 0.6
    saved = tmp_path / "rec.pt"
    torch.save(rec, saved)
    assert torch.load(saved, weights_only=True) == rec  # storable in a model file as is
    test = data.load(split="test", **data.load_arguments(rec))
    assert test.mean == train.mean and test.images.shape[1:] == (1, 6, 6)
    assert torch.equal(test.images, data.load("folder", root=tmp_path, split="test", image_size=6).images)
    with pytest.raises(ValueError, match="a data record is a dict"):
        data.load_arguments({"root": "x"})
