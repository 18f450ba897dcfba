"""kdfast.experiments.datafree: the DAFL / DFAD / RDSKD experiment and its tour section."""
import json

import torch

from kdfast.experiments import common
from kdfast.experiments import datafree as exp


def test_tiny_experiment_and_demo_section(tmp_path):
    res = exp.run_config(str(tmp_path / "exp"), exp.tiny_config(), device="cpu", quick=True)
    for name in ("report.md", "results.json", "samples.png", "accuracy_curves.png", "sensitivity.png",
                 "diversity.png"):
        assert (tmp_path / "exp" / name).exists(), name
    assert set(res["methods"]) == set(exp.METHODS) and res["data"]["name"] == "digits"
    json.loads((tmp_path / "exp" / "results.json").read_text())
    train, test = common.digits(16)
    train, test = common.subset(train, 128), common.subset(test, 64)
    teacher, kwargs, _ = common.train_teacher(train, test, epochs=1)
    ctx = common.DemoContext(teacher=teacher, teacher_name="vgg8", model_kwargs=kwargs, train_set=train, test_set=test,
                             device=torch.device("cpu"), seeds=[0], out_dir=str(tmp_path), budget_s=45, tiny=True)
    section = exp.demo_section(ctx)
    assert section.name == "datafree" and (tmp_path / section.figures[0]).exists()
    assert set(section.results["methods"]) == {"kd_noise", "dafl", "dfad", "rdskd"}


def test_mnist_like_data_is_padded_to_32_for_lenet5():
    train, _ = common.digits(16, 8, 8)
    padded = common.pad(train, 32)
    assert padded.images.shape[2:] == (32, 32) and train.images.shape[2:] == (16, 16)
    black = (0 - train.mean[0]) / train.std[0]
    assert torch.all(padded.images[:, :, :8] == black) and torch.equal(padded.images[:, :, 8:24, 8:24], train.images)
