"""kdfast.experiments.srm: the protocol of issue 22 (validation split, the alpha / T grid chosen on it, CE / KD /
AT / SRM and KD trained as long as SRM over seeds, claims with verdicts, convergence, resume) at a tiny size,
and the tour's section."""
import json
import os

import pytest
import torch

from kdfast import models
from kdfast.experiments import common, protocol, srm

KW = {"num_classes": 10, "in_channels": 1}

TINY = {"teacher": {"name": "vgg8", "width": 0.25, "epochs": 1, "lr": 0.05, "seed": 0},
        "student": {"name": "resnet8", "width": 0.5}, "student_images": 96, "curve_images": 40,
        "val_fraction": 0.2,
        "dictionary_epochs": 1, "init_epochs": 1, "epochs": 3, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4,
        "at_beta": 1000.0, "grid": ({"alpha": 0.5, "temperature": 4.0}, {"alpha": 0.75, "temperature": 2.0}),
        "seeds": (0, 1)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny protocol run on digits (module-scoped: about 10 s)."""
    root = tmp_path_factory.mktemp("srm")
    patch = pytest.MonkeyPatch()
    patch.setattr(srm, "_protocol_config", lambda budget: json.loads(json.dumps(TINY)))
    patch.setenv("KDFAST_CACHE", str(root / "cache"))
    try:
        results = srm.run(str(root / "exp"), budget="quick")
    finally:
        patch.undo()
    return root, results


def test_protocol_writes_report_results_and_figures(tiny_run):
    root, results = tiny_run
    out = root / "exp"
    for name in ("report.md", "results.json", "protocol_curves.png", "protocol_grid.png", "srm_pixel_labels.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["run"]["command"] == f"kdfast experiment srm --dataset digits --budget quick --seeds 0,1 --out {out} " \
                                      "--device cpu"
    assert set(saved["accuracy"]) == {"ce", "kd", "kdlong", "at", "srm"}
    assert all(len(saved["accuracy"][m]["accuracy"]) == 2 for m in srm.METHODS)
    assert all(len(r["curve"]) == TINY["epochs"] for m in srm.METHODS if m != "kdlong" for r in saved["runs"][m])
    # the control: KD at its tuned setting for as many epochs as SRM's student (matching + KD stage)
    for r in saved["runs"]["kdlong"]:
        assert len(r["curve"]) == TINY["init_epochs"] + TINY["epochs"]
        assert r["setting"] == saved["tuning"]["kd"]["best"]
    assert "SRM beats KD trained as many epochs" in (out / "report.md").read_text()
    # the curve is read on a 40-image test subset, the reported accuracy on every test image
    assert saved["data"]["curve"] == 40 < saved["data"]["test"]
    assert all(abs(40 * v - round(40 * v)) < 1e-6 for m in srm.METHODS for r in saved["runs"][m] for v in r["curve"])
    assert "on 40 test images (a class-stratified subset" in (out / "report.md").read_text()
    # the teacher trains on the training part of the validation split only
    assert saved["teacher"]["trained_on"] == saved["data"]["train_part"]
    assert saved["data"]["train_part"] + saved["data"]["validation"] == saved["data_info"]["train"]


def test_grid_is_chosen_on_validation_and_the_tuned_run_is_the_first_seed(tiny_run):
    _, results = tiny_run
    for method in ("kd", "srm"):
        table = results["tuning"][method]["table"]
        assert [r["setting"] for r in table] == [dict(s) for s in TINY["grid"]]
        best = max(range(len(table)), key=lambda i: (table[i]["val_accuracy"], -i))
        assert results["tuning"][method]["best"] == table[best]["setting"]
        first = results["runs"][method][0]
        assert first["setting"] == table[best]["setting"] and first["val_accuracy"] == table[best]["val_accuracy"]
        assert all(r["setting"] == table[best]["setting"] for r in results["runs"][method])
    # SRM's stages A and B are shared by the settings of one seed (copied, then loaded, not retrained)
    store = protocol.RunStore(str(tiny_run[0] / "exp"))
    a, b = store.get("srm-a0.5-T4-seed0"), store.get("srm-a0.75-T2-seed0")
    assert a["dictionaries_loss"] == b["dictionaries_loss"] and a["matching_loss"] == b["matching_loss"]
    assert a["selected"]["matching"] == b["selected"]["matching"] and a["curve"] != b["curve"]


def test_official_grid_and_the_full_protocols_codes():
    assert len(srm.OFFICIAL_GRID) == 9
    assert {g["alpha"] for g in srm.OFFICIAL_GRID} == {0.25, 0.5, 0.75}
    assert {g["temperature"] for g in srm.OFFICIAL_GRID} == {2.0, 4.0, 8.0}
    full = srm.PROTOCOL["full"]
    assert full["grid"] == srm.OFFICIAL_GRID and len(full["seeds"]) >= 3
    assert full["student"]["name"] != full["teacher"]["name"]
    teacher = models.build(full["teacher"]["name"], width_mult=full["teacher"]["width"], **KW)
    student = models.build(full["student"]["name"], width_mult=full["student"]["width"], **KW)
    pairs = srm.match_layers(teacher, student, (1, 28, 28))
    assert [srm.active_codes(p["teacher_channels"]) for p in pairs] == [2, 5, 10]


def test_report_states_each_claims_verdict_and_convergence(tiny_run):
    root, results = tiny_run
    report = (root / "exp" / "report.md").read_text()
    for key, name in (("srm-kd", "SRM beats KD"), ("srm-at", "SRM beats AT")):
        claim = results["claims"][key]
        assert claim["verdict"] == protocol.verdict(claim["ci95"])
        assert claim["diffs"] == pytest.approx(common.paired_differences(results["accuracy"]["srm"]["accuracy"],
                                                                         results["accuracy"][key[4:]]["accuracy"]))
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert cells[3] == claim["verdict"]
        both = [protocol.convergence(r["curve"])["converged"] is True
                for m in ("srm", key[4:]) for r in results["runs"][m]]
        assert cells[4] == ("yes" if all(both) else f"no ({sum(both)}/{len(both)})")
    assert results["converged"] == all(protocol.convergence(r["curve"])["converged"]
                                       for m in srm.METHODS for r in results["runs"][m])
    assert ("Budget too small" in report) != results["converged"]


def test_report_renders_a_reproduced_and_a_not_reproduced_claim(tiny_run):
    _, results = tiny_run
    fake = json.loads(json.dumps(common.json_safe(results)))
    fake["claims"]["srm-kd"] = protocol.claim([0.90, 0.91, 0.92], [0.85, 0.86, 0.86])
    fake["claims"]["srm-at"] = protocol.claim([0.80, 0.81, 0.80], [0.85, 0.86, 0.86])
    text = srm._render_protocol(fake)
    assert "| SRM beats KD | +5.33" in text and "| reproduced |" in text and "| not reproduced |" in text


def test_report_names_per_claim_whether_its_runs_converged(tiny_run):
    # one AT run still climbing in its last 20 %: the AT claim says so, the KD claim stands
    _, results = tiny_run
    fake = json.loads(json.dumps(common.json_safe(results)))
    for m in srm.METHODS:
        for r in fake["runs"][m]:
            r["curve"] = [0.5] * 10
    fake["runs"]["at"][0]["curve"] = [0.5] * 8 + [0.55, 0.6]
    text = srm._render_protocol(fake)
    row = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| SRM beats")}
    n = len(fake["runs"]["srm"]) + len(fake["runs"]["at"])
    assert row["SRM beats AT"].rstrip().endswith(f"| no ({n - 1}/{n}) |")
    assert row["SRM beats KD"].rstrip().endswith("| yes |")
    assert "Budget too small" in text


def test_a_rerun_resumes_from_the_store_and_a_cut_run_from_its_checkpoints(tiny_run, monkeypatch):
    root, results = tiny_run
    monkeypatch.setattr(srm, "_protocol_config", lambda budget: json.loads(json.dumps(TINY)))
    monkeypatch.setenv("KDFAST_CACHE", str(root / "cache"))
    store = protocol.RunStore(str(root / "exp"))
    assert "srm-a0.5-T4-seed1" in store.keys() and "kd-a0.75-T2-seed0" in store.keys()
    # a run whose record is lost but whose checkpoints are complete is resumed, not retrained
    os.remove(os.path.join(store.root, "srm-a0.5-T4-seed1.json"))
    os.remove(os.path.join(store.root, "ce-seed1.json"))
    trained = []
    original = srm.PhasedDistiller._run_epoch

    def spy(self, *args, **kwargs):
        trained.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(srm.PhasedDistiller, "_run_epoch", spy)
    again = srm.run(str(root / "exp"), budget="quick")
    assert trained == []  # nothing trained: finished runs from the store, the two others from checkpoints
    for m in srm.METHODS:
        assert again["accuracy"][m]["accuracy"] == results["accuracy"][m]["accuracy"], m
    assert again["teacher"]["cache"]["train_s"] == results["teacher"]["cache"]["train_s"]


def test_demo_section_tiny(tmp_path):
    train, test = common.digits(16, 64, 32)
    teacher = models.build("vgg8", num_classes=10, in_channels=1, width_mult=0.25).eval().requires_grad_(False)
    ctx = common.DemoContext(teacher=teacher, teacher_name="vgg8", model_kwargs={**KW, "width_mult": 0.25},
                             train_set=train, test_set=test, device=torch.device("cpu"), seeds=[0],
                             out_dir=str(tmp_path / "demo"), budget_s=10, tiny=True)
    section = srm.demo_section(ctx)
    assert section.name == "srm" and "Test accuracy" in section.markdown
    assert all((tmp_path / "demo" / f).exists() for f in section.figures)
