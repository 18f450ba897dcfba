"""kdfast.experiments.kd: the Sadhukhan et al. reproduction behind ``kdfast experiment kd`` (resume, tuning on
the validation split, eps units, verdicts). The tour's section is tested by tests/cli/test_cli.py."""
import copy
import json
import os

import pytest
import torch
from torch import nn

from kdfast import attacks
from kdfast.experiments import common, kd
from kdfast.methods import kd as method


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny ``kdfast experiment kd`` run (digits, ResNet-8 teacher) shared by the tests below."""
    out, cache = tmp_path_factory.mktemp("kd-run"), tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDFAST_CACHE", str(cache))
        res = kd.run(str(out), budget="quick", seeds=[4, 5], config=kd.ReproductionConfig.tiny())
    return out, res, cache


def test_paper_cites_the_icip_2020_authors():
    assert method.PAPER.startswith("Sadhukhan, Saha, Mukhopadhyay, Patra, \"Knowledge Distillation Inspired")
    assert kd.PAPER == method.PAPER and kd.TITLE == method.TITLE


def test_run_records_the_command_and_every_recipe(tiny_run):
    out, res, _ = tiny_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["run"]["command"] == (f"kdfast experiment kd --dataset digits --budget quick --seeds 4,5 "
                                       f"--out {out} --device cpu")
    assert list(saved["runs"]) == ["ce", "kd", "kd_nst", "kd_at", "kd_fsp"]  # the experiment adds KD+FSP
    assert [r["seed"] for r in saved["runs"]["kd"]] == [4, 5]
    run = saved["runs"]["kd"][0]
    assert run["attack"]["n_fgsm"] == 60 and set(run["attack"]["pgd"]) == {"2", "3"}
    # the curve: 2 evaluations per epoch on a 100-image test subset, the last at the end of the schedule
    assert len(run["curve"]) == 4 and saved["data"]["curve_images"] == 100
    assert run["curve_epochs"][-1] == 2.0 and run["curve_epochs"][1] == 1.0
    assert all(a < b for a, b in zip(run["curve_epochs"], run["curve_epochs"][1:]))
    assert run["history"][-1]["lr"] < 0.05 * saved["config"]["lr"]  # per-step cosine: near 0 at the last step
    assert 0.0 <= run["attack"]["fgsm_unmoved"] <= 1.0
    for name in ("report.md", "robustness.png", "training_curves.png", "student_kd.pt"):
        assert (out / name).is_file()
    assert (out / "report.md").read_text().startswith("# Tucker-2 + KD fine-tuning on digits")
    # validation split carved from the training set; the test set untouched by training and tuning
    assert saved["data"]["validation"] + saved["data"]["train_part"] == saved["data"]["train"]
    assert saved["tuning"]["scored_on"] == "validation" and saved["tuning"]["n_validation"] == saved["data"]["validation"]
    assert all(r["kd_setting"] == saved["tuning"]["best"] for rs in saved["runs"].values() for r in rs)
    # KD+FSP: the tuned KD term plus the FSP weight chosen on the validation split
    assert saved["tuning_fsp"]["scored_on"] == "validation"
    assert saved["runs"]["kd_fsp"][0]["options"] == {**saved["tuning"]["best"], **saved["tuning_fsp"]["best"]}
    # the report describes the recipes with the weights they ran with, not the method's defaults
    best, fsp = saved["tuning"]["best"], saved["tuning_fsp"]["best"]["fsp_weight"]
    report = (out / "report.md").read_text()
    assert f"{best['alpha']:g} T^2 KL(T={best['temperature']:g})" in report
    assert f"KD + {fsp:g} x FSP" in report and "lambda = 1 as in the paper" not in report


def test_rerun_skips_finished_runs_and_resumes_from_engine_checkpoints(tiny_run, monkeypatch):
    out, _, cache = tiny_run
    monkeypatch.setenv("KDFAST_CACHE", str(cache))
    before = json.loads((out / "results.json").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    with monkeypatch.context() as mp:
        mp.setattr(kd, "build", no_training)
        again = kd.run(str(out), budget="quick", seeds=[4, 5], config=kd.ReproductionConfig.tiny())
    assert json.dumps(again["runs"], sort_keys=True) == json.dumps(before["runs"], sort_keys=True)
    # a run killed after its last epoch but before its record was written: the engine resumes at the end
    os.remove(out / "runs" / "kd-seed4.json")
    third = kd.run(str(out), budget="quick", seeds=[4, 5], config=kd.ReproductionConfig.tiny())
    rerun, old = third["runs"]["kd"][0], before["runs"]["kd"][0]
    assert rerun["resumed_from"] is not None and rerun["resumed_from"][0] == 2
    assert rerun["curve"] == old["curve"] and rerun["clean"] == old["clean"]


def test_tuning_scores_on_the_validation_split_only(monkeypatch):
    from kdfast import models

    torch.manual_seed(0)
    train, test = common.digits(16, 64, 40)
    train, val = kd.protocol.validation_split(train, 0.25, seed=0)
    teacher = models.build("resnet8", num_classes=10, in_channels=1, width_mult=0.5).eval().requires_grad_(False)
    student0, _ = kd._decompose(teacher, 0.5, (1, 16, 16))
    cfg = kd.ReproductionConfig.tiny(epochs=1, kd_grid=({"temperature": 2.0, "alpha": 0.5},
                                                        {"temperature": 4.0, "alpha": 0.9},
                                                        {"temperature": 8.0, "alpha": 0.9}))
    scores = iter([0.3, 0.7, 0.5])
    seen = []

    def spy(model, dataset, device="cpu"):
        seen.append(dataset)
        assert dataset is not test, "tuning evaluated the test set"
        return next(scores)

    monkeypatch.setattr(kd.common, "accuracy", spy)
    out = kd.tune_kd(teacher, student0, train, val, cfg)
    assert all(d is val for d in seen) and len(seen) == 3
    assert out["best"] == {"temperature": 4.0, "alpha": 0.9}
    assert [r["val_accuracy"] for r in out["table"]] == [0.3, 0.7, 0.5]


def test_pixel_eps_becomes_eps_over_std_in_normalised_units():
    assert torch.allclose(kd.normalised_eps(4 / 255, (0.5, 0.25)), torch.tensor([8 / 255, 16 / 255]))
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        kd.normalised_eps(-1 / 255, (0.5,))
    with pytest.raises(ValueError, match="std must hold one positive value per channel"):
        kd.normalised_eps(1 / 255, (0.0,))
    # on Fashion-MNIST-like normalisation an FGSM step of eps/std moves the pixels by exactly eps
    data = common.digits(16, None, 20)[1]
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    eps = 4 / 255
    x, y = data.images, data.labels
    x_f = attacks.fgsm(model, x, y, kd.normalised_eps(eps, data.std), clamp=data.clamp_range)
    moved = ((x_f - x) * torch.tensor(data.std).view(1, -1, 1, 1)).abs()
    assert moved.max() <= eps + 1e-6 and moved.max() >= eps - 1e-6


def test_pgd_with_early_exit_is_kdfast_pgd_stopped_at_the_first_fooling_iterate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)).double()
    x = torch.rand(64, 1, 16, 16, dtype=torch.float64)
    y = model(x).argmax(1).detach()  # every image correct before the attack
    y[:8] = (y[:8] + 1) % 10          # ... but these eight
    clamp = (torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    eps = torch.tensor([0.03], dtype=torch.float64)
    robust, passes = kd.pgd_robust(model, x, y, eps, 5, clamp, torch.Generator().manual_seed(3),
                                   robust=model(x).argmax(1) == y)
    final = attacks.pgd(model, x, y, [0.03], steps=5, clamp=clamp, generator=torch.Generator().manual_seed(3))
    pgd_ok = model(final).argmax(1) == y
    assert not robust[:8].any() and bool((robust <= pgd_ok).all())  # never more robust than attacks.pgd
    assert 0 < robust.sum() < 56 and passes < 5 * 56                 # the attack bites, and images left early


def _synthetic(res, diffs, curve):
    """A copy of ``res`` with three seeds whose runs have KD = CE + diffs["kd"], feature recipe = KD + diffs[m]
    (points, per seed) on every metric, and the fine-tuning ``curve`` for every run."""
    out = copy.deepcopy(res)
    cfg = out["config"]
    for m in out["runs"]:
        out["runs"][m] = [copy.deepcopy(out["runs"][m][0]) for _ in range(3)]
        for i, r in enumerate(out["runs"][m]):
            base = 0.5 + (0.0 if m == "ce" else diffs["kd"][i] / 100) + (diffs.get(m, [0] * 9)[i] / 100
                                                                           if m not in ("ce", "kd") else 0.0)
            r["clean"], r["curve"] = base, list(curve)
            r["attack"]["fgsm"] = [base] * len(cfg["eps"])
            r["attack"]["pgd"] = {str(s): [base] * len(cfg["eps"]) for s in cfg["pgd_steps"]}
    out["runs"]["kd_fsp"][1]["attack"] = None  # a diverged run
    out["claims"] = kd.claims(out["runs"], cfg)
    return out


def test_report_states_each_claims_verdict(tiny_run):
    _, res, _ = tiny_run
    res = json.loads(json.dumps(common.json_safe(res)))
    fake = _synthetic(res, {"kd": [2.0, 3.0, 2.5], "kd_nst": [-1.0, 1.5, 0.5], "kd_at": [-2.0, -2.5, -2.2]},
                      [0.50, 0.60])
    verdicts = {(c["a"], c["metric"]): c["verdict"] for c in fake["claims"]}
    assert verdicts[("kd", "clean")] == "reproduced" and verdicts[("kd", "pgd3@8/255")] == "reproduced"
    assert verdicts[("kd_nst", "clean")] == "inconclusive" and verdicts[("kd_at", "fgsm@2/255")] == "not reproduced"
    assert verdicts[("kd_fsp", "clean")] == "inconclusive"
    text = kd.render_reproduction(fake)
    assert "| KD beats CE | clean | +2.50 | [+1.26, +3.74] | reproduced |" in text
    assert "| KD+AT beats KD | PGD-2 8/255 | -2.23 |" in text
    assert "| KD+FSP beats KD | clean | — | — | inconclusive (1 run(s) diverged) |" in text
    assert "- KD beats CE: clean accuracy **reproduced**" in text
    assert "- KD+AT beats KD: clean accuracy **not reproduced**; over all 7 metrics 0 reproduced, 7 not" in text
    assert "**Budget too small**" in text
    converged = kd.render_reproduction(_synthetic(res, {"kd": [2.0, 3.0, 2.5]}, [0.50, 0.501]))
    assert "Every run converged." in converged and "Budget too small" not in converged
    # One recipe still moving: its claim is flagged, the claims between converged recipes are not.
    mixed = _synthetic(res, {"kd": [2.0, 3.0, 2.5]}, [0.50, 0.501])
    mixed["runs"]["kd_nst"][2]["curve"] = [0.50, 0.52]
    text = kd.render_reproduction(mixed)
    assert "- KD beats CE: clean accuracy **reproduced**; over all 7 metrics" in text
    assert "inconclusive; every run of both converged." in text
    assert "not every run of KD+NST converged." in text
    assert "**Budget too small** for the claims that involve KD+NST:" in text


def test_config_checks_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="methods must include 'ce' and 'kd'"):
        kd.ReproductionConfig.tiny(methods=("kd", "kd_at")).check()
    with pytest.raises(ValueError, match="kd_grid must be"):
        kd.ReproductionConfig.tiny(kd_grid=({"temperature": 4.0},)).check()
    with pytest.raises(ValueError, match="budget must be one of"):
        kd.ReproductionConfig.for_budget("huge")
    with pytest.raises(ValueError, match="seeds must be distinct"):
        kd.run(str(tmp_path), seeds=[0, 0])


def test_eval_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert kd._eval_steps(3, 10, 1) == [10, 20, 30]
    assert kd._eval_steps(2, 7, 2) == [4, 7, 10, 14]
    assert kd._eval_steps(1, 3, 5) == [1, 2, 3]  # more points than steps: each step once


def test_schedule_and_curve_settings_are_checked():
    with pytest.raises(ValueError, match="schedule must be one of cosine, cosine_steps"):
        kd.ReproductionConfig.tiny(schedule="step").check()
    with pytest.raises(ValueError, match="evals_per_epoch must be an int >= 1"):
        kd.ReproductionConfig.tiny(evals_per_epoch=0).check()
    with pytest.raises(ValueError, match="curve_images must be None or an int >= 10"):
        kd.ReproductionConfig.tiny(curve_images=5).check()
    for budget in ("quick", "full"):
        kd.ReproductionConfig.for_budget(budget).check()


def test_a_directory_of_finished_runs_refuses_another_protocol(tiny_run):
    out, _, _ = tiny_run
    with pytest.raises(ValueError, match=r"runs of another kd protocol \(settings that differ: epochs\)"):
        kd.run(str(out), budget="quick", seeds=[4, 5], config=kd.ReproductionConfig.tiny(epochs=3))


def test_attack_accuracy_flags_a_zero_gradient_as_masking():
    data = common.digits(16, None, 60)[1]
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    with torch.no_grad():  # a constant classifier: its input gradient is exactly zero
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(10, 0, -1, dtype=torch.float32))
    out = kd.attack_accuracy(model, data, eps=(8 / 255,), pgd_steps=(3,), batch_size=25)
    share = float((data.labels == 0).float().mean())
    assert out["clean"] == pytest.approx(share) and out["fgsm_unmoved"] == pytest.approx(share)
    assert out["fgsm"] == [pytest.approx(share)] and out["pgd"]["3"] == [pytest.approx(share)]
