"""Robustness numbers that were silently wrong (issue 26): `kdfast robustness` evaluated a model on data it
was not trained for (another dataset, --image-size 2) and reported an accuracy; robustness_report without
std attacked in normalised units (a larger attack than the pixel eps it reports)."""
import pytest
import torch
from torch import nn

import kdfast
from kdfast import data, models
from kdfast import model_file
from kdfast.cli.main import main


def _model_file(tmp_path, in_channels=1, num_classes=10, record=None):
    torch.manual_seed(0)
    model = models.build("lenet5", num_classes=num_classes, in_channels=in_channels)
    test = data.load("digits", split="test")
    record = record if record is not None else model_file.data_record(test, name="digits")
    return model_file.save_model(tmp_path / "m.pt", model, "lenet5",
                                 {"num_classes": num_classes, "in_channels": in_channels}, record)


def _one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdfast robustness: error:"), err
    return lines[0]


ARGS = ["--eps", "0,8/255", "--pgd-steps", "1", "--max-batches", "1"]


def test_model_files_record_the_data_sizes(tmp_path):
    ckpt = model_file.read_checkpoint(_model_file(tmp_path))
    assert ckpt["data"] == {"name": "digits", "root": None, "image_size": 16, "in_channels": 1, "num_classes": 10}
    assert model_file.input_spec(ckpt) == {"in_channels": 1, "image_size": 16, "num_classes": 10}


def test_another_image_size_is_refused_unless_forced(tmp_path, capsys):
    path = _model_file(tmp_path)
    assert main(["robustness", "--checkpoint", path, "--image-size", "2", *ARGS]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "image_size 2 (model file: 16)" in line and "--force" in line
    assert main(["robustness", "--checkpoint", path, "--image-size", "14", "--force", *ARGS]) == 0
    capsys.readouterr()
    # forced onto data the model cannot run on: still one line, not a traceback
    assert main(["robustness", "--checkpoint", path, "--image-size", "2", "--force", *ARGS]) == 2
    assert "LeNet5 needs inputs of at least 13x13" in _one_line(capsys.readouterr().err)


def test_another_dataset_is_refused_naming_channels_and_classes(tmp_path, capsys):
    record = {"name": "cifar100", "root": None, "image_size": 16, "in_channels": 3, "num_classes": 100}
    path = _model_file(tmp_path, in_channels=3, num_classes=100, record=record)
    assert main(["robustness", "--checkpoint", path, "--data", "digits", *ARGS]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "in_channels 1 (model file: 3)" in line and "num_classes 10 (model file: 100)" in line
    assert "trained on 'cifar100'" in line


def test_older_files_are_checked_by_their_model_kwargs(tmp_path, capsys):
    # written before model files recorded the data sizes: in_channels / num_classes come from model_kwargs
    path = _model_file(tmp_path, num_classes=100, record={"name": "digits", "image_size": None, "root": None})
    assert main(["robustness", "--checkpoint", path, *ARGS]) == 2
    assert "num_classes 10 (model file: 100)" in _one_line(capsys.readouterr().err)


# ============================================================================================ the Python API
def _linear_and_data():
    test = data.load("digits", split="test")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 10))
    return model, test


def test_report_takes_the_normalisation_from_the_dataset():
    model, test = _linear_and_data()
    loader = torch.utils.data.DataLoader(test, batch_size=128)
    implicit = kdfast.robustness_report(model, loader, eps=[0, 8 / 255], pgd_steps=2, max_batches=1)
    explicit = kdfast.robustness_report(model, loader, eps=[0, 8 / 255], pgd_steps=2, max_batches=1,
                                        std=test.std, clamp=test.clamp_range)
    assert implicit.eps_units.startswith("pixel") and implicit.to_dict() == explicit.to_dict()
    # the trap: the same eps in normalised units is a larger attack (std of digits < 1)
    normalised = kdfast.robustness_report(model, loader, eps=[0, 8 / 255], pgd_steps=2, max_batches=1,
                                          units="input")
    assert normalised.eps_units == "input"
    assert test.std[0] < 1


def test_report_without_a_known_normalisation_refuses():
    model, test = _linear_and_data()
    batches = [(test.images[:32], test.labels[:32])]  # a plain list: no dataset to read std from
    with pytest.raises(ValueError, match="normalisation is unknown.*pass std= and clamp=.*units='input'"):
        kdfast.robustness_report(model, batches, eps=[8 / 255])
    rep = kdfast.robustness_report(model, batches, eps=[8 / 255], pgd_steps=1, std=test.std, clamp=test.clamp_range)
    assert rep.eps_units.startswith("pixel")
    with pytest.raises(ValueError, match="units must be 'pixel' or 'input'"):
        kdfast.robustness_report(model, batches, eps=[8 / 255], units="normalised")
    with pytest.raises(ValueError, match="std does not apply"):
        kdfast.robustness_report(model, batches, eps=[8 / 255], units="input", std=test.std)
