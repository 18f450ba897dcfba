"""The data options of a YAML run (kdfast distill --config): own data, subsets, max_steps; and what a run
records about its data in the model file and the training checkpoint. Each new-user trap of issue 26
is reproduced first (YAML `subset` rejected, Fashion-MNIST recorded as "mnist", image_size None)."""
import os

import numpy as np
import pytest
import torch
import yaml

from kdfast import data, model_file
from kdfast.cli.config import ConfigError, load_config, run_config, validate_config
from own_data_files import write_png_folder

RUN = {
    "seed": 0, "epochs": 2, "device": "cpu", "teacher": None,
    "student": {"name": "resnet8"},
    "losses": {"ce": {"type": "cross_entropy"}},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "log": {"progress": False, "every": 0},
}


def _write(tmp_path, cfg, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_yaml_subset_fraction_and_max_steps_are_accepted():
    # Before: "unknown key 'subset' in data" and "unknown key 'max_steps' in the config".
    cfg = validate_config(dict(RUN, max_steps=5, data={"name": "digits", "subset": 100, "test_fraction": 0.5,
                                                       "subset_seed": 3}))
    assert cfg["max_steps"] == 5 and cfg["data"]["subset"] == 100 and cfg["data"]["fraction"] is None
    assert cfg["data"]["test_fraction"] == 0.5 and cfg["data"]["subset_seed"] == 3


@pytest.mark.parametrize("change, match", [
    ({"data": {"name": "digits", "subset": 0}}, r"data.subset must be >= 1"),
    ({"data": {"name": "digits", "fraction": 1.5}}, r"data.fraction must be in \(0, 1\]"),
    ({"data": {"name": "digits", "test_subset": 5, "test_fraction": 0.5}}, "data.test_subset or data.test_fraction"),
    ({"data": {"name": "digits", "subset": "all"}}, "data.subset must be int or null"),
    ({"data": {"name": "digits", "subset_seed": -1}}, "data.subset_seed must be >= 0"),
    ({"data": {"name": "imagenet"}}, r"data.name must be one of digits, mnist, fashion-mnist, .*folder, npz, idx"),
    ({"data": {"name": "folder"}}, r"data.root is required for data.name 'folder'"),
    ({"data": {"name": "digits"}, "max_steps": 0}, "max_steps must be >= 1"),
])
def test_yaml_data_errors_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(dict(RUN, **change))


def test_yaml_run_on_a_folder_of_images_with_subset_and_max_steps(tmp_path):
    write_png_folder(tmp_path / "images", np.random.RandomState(0), n_per_class=10, size=12, mode="RGB")
    cfg = dict(RUN, max_steps=3, data={"name": "folder", "root": "images", "batch_size": 4, "subset": 15},
               checkpoint={"dir": str(tmp_path / "ck"), "resume": True}, save_student=str(tmp_path / "student.pt"),
               log={"progress": False, "every": 0, "path": str(tmp_path / "log.jsonl")})
    path = _write(tmp_path, cfg)
    loaded = load_config(path)
    assert loaded["data"]["root"] == str(tmp_path / "images")  # relative to the YAML file
    history = run_config(path)
    assert len(history) == 1 and history[0]["partial"] and history[0]["step"] == 3  # 4 batches per epoch
    model, ckpt = model_file.load_model(tmp_path / "student_model.pt")
    rec = ckpt["data"]
    assert rec["name"] == "folder" and rec["root"] == str(tmp_path / "images")
    assert rec["input_shape"] == [3, 12, 12] and rec["image_size"] == 12 and rec["num_classes"] == 3
    assert rec["classes"] == ["cat", "dog", "frog"] and rec["selection"]["subset"] == 15
    assert len(rec["mean"]) == 3 and ckpt["model_kwargs"]["in_channels"] == 3
    training = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert training["data"] == rec and training["step"] == 3 and training["epoch_batches"] == 3
    # the recorded data reloads the test split the model expects
    test = data.load(split="test", **data.load_arguments(rec))
    assert model(test.images[:2]).shape == (2, 3)
    # re-running with a larger max_steps resumes inside the epoch and completes the run
    cfg["max_steps"] = None
    history = run_config(_write(tmp_path, cfg))
    assert [r["epoch"] for r in history] == [0, 1] and history[-1]["step"] == 8
    records = [yaml.safe_load(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(r["type"] == "resume" and r["epoch"] == 0 and r["step"] == 3 for r in records)


def test_model_file_records_fashion_mnist_by_its_name_and_image_size(tmp_path):
    # Before: Fashion-MNIST loaded only as "mnist", was recorded as "mnist", and a YAML-trained model
    # recorded image_size None (so `kdfast decompose` reported MACs at 32x32 for 28x28 images).
    from kdfast.data import named
    rng = np.random.RandomState(1)
    root = tmp_path / "fm"
    root.mkdir()
    for split, (img, lab) in named.MNIST_FILES.items():
        data.write_idx(root / (img + ".gz"), rng.randint(0, 256, size=(12, 28, 28)))
        data.write_idx(root / (lab + ".gz"), np.arange(12) % 10)
    cfg = dict(RUN, epochs=1, data={"name": "fashion-mnist", "root": str(root), "batch_size": 6},
               save_student=str(tmp_path / "s.pt"))
    run_config(_write(tmp_path, cfg))
    rec = model_file.read_checkpoint(tmp_path / "s_model.pt")["data"]
    assert rec["name"] == "fashion-mnist" and rec["image_size"] == 28 and rec["input_shape"] == [1, 28, 28]
    assert rec["classes"][0] == "T-shirt/top" and rec["mean"] == [0.2860406]


def test_engine_checkpoint_without_kdfast_data_records_none(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from kdfast.distill import Distiller

    loader = DataLoader(TensorDataset(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))), batch_size=4)
    engine = Distiller(None, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3)),
                       {"ce": torch.nn.CrossEntropyLoss()}, device="cpu", progress=False,
                       checkpoint_dir=str(tmp_path))
    engine.fit(loader)
    assert torch.load(os.path.join(tmp_path, "last.pt"), weights_only=True)["data"] is None
