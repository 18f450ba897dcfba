"""kdfast.experiments.srm: the SRM / KD / CE experiment with the target ablation, and its tour section."""
import json

import torch

from kdfast import models
from kdfast.experiments import common, srm

KW = {"num_classes": 10, "in_channels": 1}


def test_run_and_demo_section_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(srm, "_config", lambda quick, tiny=False: {
        "teacher_epochs": 1, "dictionary_epochs": 1, "init_epochs": 1, "kd_epochs": 1, "train_subset": 64,
        "test_subset": 32, "seeds": (0,), "batch_size": 32})
    monkeypatch.setenv("KDFAST_CACHE", str(tmp_path / "cache"))
    results = srm.run(str(tmp_path / "exp"), budget="quick")
    for name in ("report.md", "results.json", "srm_curves.png", "srm_pixel_labels.png"):
        assert (tmp_path / "exp" / name).exists(), name
    assert set(results["accuracy"]) == {"srm", "srm_global", "srm_local", "kd", "ce"}
    assert len(results["paired_differences"]["srm-kd"]["differences"]) == 1
    assert results["data"]["train"] == 64 and results["data"]["test"] == 32
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "Paired differences" in report and "SRM, local targets only" in report and "95 % CI" in report
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved["run"]["command"].startswith("kdfast experiment srm --dataset digits --budget quick")

    train, test = common.digits(16, 64, 32)
    teacher = models.build("vgg8", num_classes=10, in_channels=1, width_mult=0.25).eval().requires_grad_(False)
    ctx = common.DemoContext(teacher=teacher, teacher_name="vgg8", model_kwargs={**KW, "width_mult": 0.25},
                             train_set=train, test_set=test, device=torch.device("cpu"), seeds=[0],
                             out_dir=str(tmp_path / "demo"), budget_s=10, tiny=True)
    section = srm.demo_section(ctx)
    assert section.name == "srm" and "Test accuracy" in section.markdown
    assert all((tmp_path / "demo" / f).exists() for f in section.figures)
