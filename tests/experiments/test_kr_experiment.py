"""kdfast.experiments.kr: issue 22's KR protocol on a tiny configuration (resume, verdicts, sparsity, rounds)
and the tour's KR section."""
import json
import math

import pytest
import torch
import torch.nn as nn

from kdfast import models
from kdfast.experiments import common, kr, protocol

TINY = kr.ExperimentConfig(seeds=(0, 1), rounds=2, rounds_per_pass=2, tune_rounds=1,
                           kd_grid=({"T": 4.0, "alpha": 0.9}, {"T": 2.0, "alpha": 0.5}), batch_size=16,
                           teacher_epochs=1, train_subset=60, test_subset=24, curve_images=12,
                           capacities={"paper": 0.25, "low": 0.125})


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setattr(kr, "_config", lambda budget, dataset: kr.ExperimentConfig(**{
        **TINY.__dict__, "capacities": dict(TINY.capacities)}))
    monkeypatch.setenv("KDFAST_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _accuracies(results):
    return {cap: {m: [(r["accuracy"], r["curve"]) for r in rs] for m, rs in ms.items()}
            for cap, ms in results["runs"].items()}


def test_run_tiny_writes_the_report_and_resumes_exactly(tiny, monkeypatch):
    fresh = kr.run(str(tiny / "fresh"), dataset="fashion-mnist", budget="quick")
    for name in ("report.md", "results.json", "kr_curves.png", "kr_sparsity.png", "config.json"):
        assert (tiny / "fresh" / name).exists(), name
    saved = json.loads((tiny / "fresh" / "results.json").read_text())
    assert saved["run"]["command"] == (f"kdfast experiment kr --dataset fashion-mnist --budget quick --seeds 0,1 "
                                       f"--out {tiny / 'fresh'} --device cpu")
    assert set(saved["runs"]) == {"paper", "low"}
    assert set(saved["runs"]["paper"]) == {"ce", "kd", "kr", "kr_kd", "l1", "l2"}
    assert set(saved["runs"]["low"]) == {"ce", "kd", "kr", "kr_kd"}
    assert all(len(r["curve"]) == 2 for ms in saved["runs"].values() for rs in ms.values() for r in rs)
    # the curve is read on a stratified part of the 24 test images (about 12: at least one per class), the
    # reported accuracy on all 24
    n = saved["data"]["curve"]
    assert 10 <= n < 24 and saved["data"]["test"] == 24
    records = [r for ms in saved["runs"].values() for rs in ms.values() for r in rs]
    assert all(abs(n * v - round(n * v)) < 1e-6 for r in records for v in r["curve"])
    assert all(abs(24 * r["accuracy"] - round(24 * r["accuracy"])) < 1e-6 for r in records)
    assert any(abs(n * r["accuracy"] - round(n * r["accuracy"])) > 1e-6 for r in records)
    assert {c["verdict"] for c in saved["claims"]} <= {protocol.REPRODUCED, protocol.NOT_REPRODUCED,
                                                        protocol.INCONCLUSIVE}
    assert saved["tuning"]["paper"]["best"] in [dict(s) for s in TINY.kd_grid]
    report = (tiny / "fresh" / "report.md").read_text()
    for text in ("## Claims", "KR beats KD", "KR + KD beats KD", "fewer rounds than KD", "Hoyer", "## Interpretations",
                 "validation accuracy", "95 % interval"):
        assert text in report, text

    # Interrupt the experiment inside a run (after its first round's checkpoint), then re-run the same command:
    # finished runs are read back, the cut run continues from its checkpoint, and every number equals the
    # uninterrupted experiment's.
    original = kr.RoundSource.batches
    state = {"cut": False}

    def cut_at_round_1(self, epoch, generator):
        if epoch == 1 and not state["cut"]:
            state["cut"] = True
            raise KeyboardInterrupt
        return original(self, epoch, generator)

    monkeypatch.setattr(kr.RoundSource, "batches", cut_at_round_1)
    with pytest.raises(KeyboardInterrupt):
        kr.run(str(tiny / "cut"), dataset="fashion-mnist", budget="quick")
    done = protocol.RunStore(str(tiny / "cut")).keys()
    assert "paper-ce-seed0" not in done and (tiny / "cut" / "checkpoints" / "paper-ce-seed0" / "last.pt").exists()
    monkeypatch.setattr(kr.RoundSource, "batches", original)
    calls = []
    train = kr.train_student
    monkeypatch.setattr(kr, "train_student", lambda *a, **k: calls.append(a[:3]) or train(*a, **k))
    resumed = kr.run(str(tiny / "cut"), dataset="fashion-mnist", budget="quick")
    assert len(done) == 4 and all(k.startswith("tune-") for k in done)  # the KD grid finished before the cut
    assert len(calls) == 20                                              # so only the 20 main runs train
    assert _accuracies(resumed) == _accuracies(fresh)
    assert [c["verdict"] for c in resumed["claims"]] == [c["verdict"] for c in fresh["claims"]]

    # another configuration in the same directory is refused
    monkeypatch.setattr(kr, "_config", lambda budget, dataset: kr.ExperimentConfig(**{**TINY.__dict__, "rounds": 3}))
    with pytest.raises(ValueError, match="holds runs of another configuration.*config"):
        kr.run(str(tiny / "cut"), dataset="fashion-mnist", budget="quick")


def test_run_rejects_bad_arguments(tiny):
    with pytest.raises(ValueError, match="at least 2 seeds"):
        kr.run(str(tiny / "x"), dataset="fashion-mnist", budget="quick", seeds=[0])
    with pytest.raises(ValueError, match="budget must be one of"):
        kr.run(str(tiny / "x"), budget="huge")


def _record(acc, curve, hoyer=0.3):
    return {"accuracy": acc, "curve": curve, "params": 100, "steps": 10, "seconds": 1.0,
            "sparsity": {"hoyer": hoyer, "near_zero": hoyer / 3}}


def test_analyse_gives_a_verdict_per_claim():
    # KR beats KD by about 2 points on every seed, reaches the target 2 rounds earlier and is sparser than L1
    # (not than L2); KR + KD equals KD on average with scatter (inconclusive); KR loses to CE (not reproduced).
    kd = [0.905, 0.91, 0.915]
    runs = {"paper": {
        "kd": [_record(a, [0.5, 0.7, 0.8, a]) for a in kd],
        "kr": [_record(a + 0.02 + 0.001 * i, [0.85, 0.902, 0.91, a + 0.02 + 0.001 * i], 0.5 + 0.01 * i)
               for i, a in enumerate(kd)],
        "kr_kd": [_record(a + d, [0.5, 0.7, 0.8, a + d]) for a, d in zip(kd, (0.01, -0.012, 0.003))],
        "ce": [_record(a + 0.05 + 0.001 * i, [0.5, 0.6, 0.7, a + 0.05 + 0.001 * i]) for i, a in enumerate(kd)],
        "l1": [_record(0.85, [0.8] * 4, 0.4 + 0.011 * i) for i in range(3)],
        "l2": [_record(0.85, [0.8] * 4, 0.6 + 0.012 * i) for i in range(3)],
    }}
    out = kr.analyse(runs)
    verdicts = {(c["claim"], c["capacity"]): c["verdict"] for c in out["claims"]}
    assert verdicts[("KR beats KD", "paper")] == protocol.REPRODUCED
    assert verdicts[("KR + KD beats KD", "paper")] == protocol.INCONCLUSIVE
    assert verdicts[("KR beats CE", "paper")] == protocol.NOT_REPRODUCED
    assert verdicts[("KR reaches the target accuracy in fewer rounds than KD", "paper")] == protocol.REPRODUCED
    assert verdicts[("KR's weights are sparser (Hoyer) than CE + L1's", "paper")] == protocol.REPRODUCED
    assert verdicts[("KR's weights are sparser (Hoyer) than CE + L2's", "paper")] == protocol.NOT_REPRODUCED
    # target: 1 point under the lower mean final accuracy (KD's 0.91) = 0.90
    assert out["speed"]["paper"]["target"] == pytest.approx(0.90)
    assert out["speed"]["paper"]["rounds_to_target"]["kr"] == [2, 2, 2]
    assert out["speed"]["paper"]["rounds_to_target"]["kd"] == [4, 4, 4]
    assert out["speed"]["paper"]["rounds_to_target"]["l1"] == [5, 5, 5]  # never: one round past the end
    assert out["convergence"]["all_converged"] is False  # the KD curves still climb in their last 20 %
    rows = [kr._claim_row(c) for c in out["claims"]]
    assert any("**reproduced**" in row and "| KR beats KD |" in row and "+2.10 points" in row for row in rows)


def test_full_budget_convergence_window_starts_after_the_last_lr_drop():
    # point i of a curve is read after round i + 1; the lr drop after round m first shows at point m
    cfg = kr.ExperimentConfig()
    start = protocol.convergence([0.5] * cfg.rounds)["from_point"]
    assert kr.milestones(cfg.rounds) == [9, 15] and start == 15
    assert kr.milestones(cfg.rounds)[-1] <= start
    assert cfg.rounds / cfg.rounds_per_pass == 2 and cfg.tune_rounds == cfg.rounds_per_pass


def test_rounds_to_reach_and_milestones():
    assert kr.rounds_to_reach([0.1, 0.5, 0.7], 0.5) == 2
    assert kr.rounds_to_reach([0.1, 0.5], 0.9) is None
    assert kr._censored([0.1, 0.5], 0.9) == 3
    assert kr.milestones(10) == [5, 8]      # 30k and 48k of 64k iterations
    assert kr.milestones(4) == [2, 3]
    assert kr.milestones(2) == [1]
    assert kr.milestones(1) == []


def test_weight_sparsity_measures():
    net = nn.Sequential(nn.Conv2d(1, 2, 2, bias=False), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)                          # 8 equal entries: Hoyer 0, none near zero
        net[3].weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 0.0]]))  # one non-zero of 4: Hoyer 1, 3 near zero
    s = kr.weight_sparsity(net)
    assert s["hoyer"] == pytest.approx((0 * 8 + 1 * 4) / 12)
    assert s["near_zero"] == pytest.approx(3 / 12)
    # scale-free: BatchNorm makes a conv's scale irrelevant, and the measures ignore it
    with torch.no_grad():
        net[0].weight.mul_(1e-3)
    assert kr.weight_sparsity(net) == pytest.approx(s)
    assert [p.shape for p in kr.penalised_weights(net)] == [(2, 1, 2, 2), (2, 2)]
    with pytest.raises(ValueError, match="rel must be in"):
        kr.weight_sparsity(net, rel=1.5)


def test_round_source_covers_the_training_part_once_per_pass():
    train, _ = common.digits(8, 50, 10)
    src = kr.RoundSource(train, 4, 8, seed=3)
    assert src.chunk == 13 and src.steps_per_epoch == 2
    first_pass = torch.cat([src.indices(r) for r in range(4)])
    assert set(first_pass.tolist()) == set(range(50))     # every image once (the last chunk topped up)
    assert not torch.equal(src.indices(0), src.indices(4))  # a new permutation each pass
    assert torch.equal(src.indices(5), kr.RoundSource(train, 4, 8, seed=3).indices(5))
    x, y, i = next(iter(src.batches(0, torch.Generator())))
    assert torch.equal(x, train.images[i]) and torch.equal(y, train.labels[i])
    with pytest.raises(ValueError, match="rounds_per_pass must be a positive int"):
        kr.RoundSource(train, 0, 8, seed=0)


def test_l1_and_stored_logits_engines():
    train, _ = common.digits(8, 32, 10)
    src = kr.RoundSource(train, 1, 16, seed=0)
    batch = next(iter(src.batches(0, torch.Generator())))
    torch.manual_seed(0)
    student = models.build("resnet8", num_classes=10, in_channels=1, width_mult=0.25)
    d = kr.L1Distiller(student, coefficient=0.01, device="cpu", progress=False)
    out = d.compute_loss(batch)
    l1 = sum(p.abs().sum() for p in kr.penalised_weights(student))
    torch.testing.assert_close(out["parts"]["l1"], l1.detach())
    torch.testing.assert_close(out["loss"], out["parts"]["ce"] + 0.01 * l1)
    d.close()
    teacher = models.build("resnet8", num_classes=10, in_channels=1, width_mult=0.25).eval()
    logits = kr.teacher_logits(teacher, train)
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(train.images))
    e = kr.StoredLogitsDistiller(teacher, student, {"kd": kr.KDLoss(4.0, alpha=0.9)}, teacher_logits=logits,
                                 device="cpu", progress=False)
    t_logits, _ = e.teacher_forward(batch[0], batch[2])
    torch.testing.assert_close(t_logits, logits[batch[2]])
    with pytest.raises(ValueError, match="needs batches"):
        e.teacher_forward(batch[0], None)
    e.close()


def test_demo_section_tiny(tmp_path):
    train, test = common.digits(16, 64, 32)
    torch.manual_seed(0)
    teacher = models.build("vgg8", num_classes=10, in_channels=1, width_mult=0.25).eval().requires_grad_(False)
    ctx = common.DemoContext(teacher=teacher, teacher_name="vgg8", model_kwargs={"num_classes": 10, "in_channels": 1,
                                                                                 "width_mult": 0.25},
                             train_set=train, test_set=test, device=torch.device("cpu"), seeds=[0],
                             out_dir=str(tmp_path), budget_s=10, tiny=True)
    section = kr.demo_section(ctx)
    assert section.name == "kr" and "| KR |" in section.markdown
    assert all(math.isfinite(r["test_accuracy"]) for runs in section.results["runs"].values() for r in runs)
    assert all((tmp_path / f).exists() for f in section.figures)
