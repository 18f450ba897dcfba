"""kdfast.experiments.bss: the CE / KD / BSS experiment, its tour section, and ``run`` on a dataset by name."""
import json
import os

import pytest
import torch

from kdfast.experiments import bss, common

FASHION = "/usr/share/datasets/fashion-mnist"


def test_experiment_tiny(tmp_path):
    res = bss._experiment(bss.ExperimentConfig.tiny_config(), str(tmp_path), "cpu")
    text = bss.render_report(res)
    assert {r["method"] for r in res["runs"]} == {"ce", "kd", "bss"}
    assert (tmp_path / "accuracy_vs_data.png").stat().st_size > 0 and (tmp_path / "bss_samples.png").stat().st_size > 0
    assert res["step_cost"]["ratio"] > 0 and "BSS / KD" in text and "Does BSS help here?" in text
    assert res["grid"]["samples"] and all(0 <= s["p_after"][0] <= 1 for s in res["grid"]["samples"])
    lo, hi = res["data"]["clamp"]
    assert lo < 0 < hi
    common.write_json(str(tmp_path / "r.json"), res)  # strict JSON


def test_demo_section_tiny(tmp_path):
    train, test = common.digits(train_subset=192, test_subset=96)
    teacher, kwargs, _ = common.train_teacher(train, test, width=0.125, epochs=1)
    ctx = common.DemoContext(teacher=teacher, teacher_name="vgg8", model_kwargs=kwargs, train_set=train, test_set=test,
                             device=torch.device("cpu"), seeds=[0, 1], out_dir=str(tmp_path), budget_s=45.0, tiny=True)
    section = bss.demo_section(ctx)
    assert section.name == "bss" and "BSS" in section.markdown and section.time_s > 0
    for fig in section.figures:
        assert (tmp_path / fig).exists()


@pytest.fixture
def tiny_quick(monkeypatch, tmp_path):
    tiny = bss.ExperimentConfig.tiny_config()
    monkeypatch.setattr(bss.ExperimentConfig, "quick", classmethod(lambda cls: tiny))
    monkeypatch.setattr(common, "QUICK_SUBSETS", (160, 80))
    monkeypatch.setenv("KDFAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "teachers"


def test_run_records_the_command_and_caches_the_teacher(tmp_path, tiny_quick):
    out = tmp_path / "out"
    res = bss.run(str(out), dataset="digits", budget="quick", seeds=[3])
    saved = json.loads((out / "results.json").read_text())
    assert saved["run"]["command"] == f"kdfast experiment bss --dataset digits --budget quick --seeds 3 --out {out} --device cpu"
    assert saved["run"]["dataset"] == "digits" and saved["run"]["budget"] == "quick" and saved["run"]["seeds"] == [3]
    assert isinstance(saved["run"]["argv"], list)
    assert {r["seed"] for r in res["runs"]} == {3}
    cached = list(tiny_quick.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("digits-1x16px-") and not res["teacher"]["cache"]["cached"]
    again = bss.run(str(tmp_path / "again"), dataset="digits", budget="quick", seeds=[3])
    assert again["teacher"]["cache"]["cached"]
    assert again["teacher"]["test_accuracy"] == res["teacher"]["test_accuracy"]
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in res["runs"]]


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Debian package dataset-fashion-mnist not installed")
def test_run_on_fashion_mnist_adapts_the_models_and_keys_the_cache_by_dataset(tmp_path, tiny_quick):
    res = bss.run(str(tmp_path / "fm"), dataset="fashion-mnist", budget="quick", seeds=[0])
    assert res["data"]["name"] == "fashion-mnist" and res["data"]["train"] == 160 and res["data"]["test"] == 80
    assert "BSS on fashion-mnist" in (tmp_path / "fm" / "report.md").read_text()
    bss.run(str(tmp_path / "dg"), dataset="digits", budget="quick", seeds=[0])
    names = sorted(p.name for p in tiny_quick.iterdir())
    assert len(names) == 2 and names[0].startswith("digits-1x16px-") and names[1].startswith("fashion-mnist-1x28px-")


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "svhn"}, "dataset must be one of digits, fashion-mnist, mnist, cifar10, cifar100"),
    ({"budget": "medium"}, "budget must be one of quick, full"),
    ({"seeds": [0, 0]}, "seeds must be distinct"),
    ({"seeds": "0,1"}, "seeds must be a non-empty list of non-negative ints"),
    ({"dataset": "cifar10"}, "needs data_root"),
])
def test_run_rejects_bad_arguments_before_training(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bss.run(str(tmp_path), **kwargs)
