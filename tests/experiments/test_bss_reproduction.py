"""kdfast.experiments.bss, ``--budget full``: the reproduction protocol (validation-tuned KD baseline, runs that
resume from the store and from their checkpoints, verdicts per claim) on a seconds-long configuration."""
import dataclasses
import json

import pytest

from kdfast.experiments import bss, common, protocol


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("KDFAST_CACHE", str(tmp_path / "cache"))
    train, test = common.digits(train_subset=300, test_subset=90)
    return bss.ReproductionConfig.tiny(), train, test


def _accuracies(results):
    return {r["key"]: r["accuracy"] for r in results["runs"]}


def test_reproduction_reports_verdicts_and_a_killed_run_continues_exactly(tmp_path, monkeypatch, tiny):
    cfg, train, test = tiny
    whole = bss.reproduce(cfg, str(tmp_path / "whole"), "cpu", dataset="digits", train=train, test=test)
    text = bss.render_reproduction(whole)
    for f in ("50%", "100%"):
        assert f"BSS beats KD at {f} of the data" in text
    assert "advantage over KD grows as data shrinks" in text and "Convergence" in text and "BSS / KD" in text
    verdicts = [c["verdict"] for c in whole["claims"]["bss_vs_kd"].values()] + [
        whole["claims"]["grows_as_data_shrinks"]["verdict"]]
    assert set(verdicts) <= {protocol.REPRODUCED, protocol.NOT_REPRODUCED, protocol.INCONCLUSIVE}
    assert all(f"**{v}**" in text for v in verdicts)
    assert {(r["method"], r["fraction"], r["seed"]) for r in whole["runs"]} == {
        (m, f, s) for m in ("ce", "kd", "bss") for f in cfg.fractions for s in cfg.seeds}
    for r in whole["runs"]:  # the curve ends at the last epoch with the reported accuracy
        assert r["curve"][-1] == [r["epochs"], r["accuracy"]] and r["resumed_from_epoch"] is None
    for name in ("accuracy_vs_data.png", "training_curves.png", "bss_samples.png"):
        assert (tmp_path / "whole" / name).stat().st_size > 0
    common.write_report(str(tmp_path / "whole"), text, whole)
    saved = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert bss.render_reproduction(saved) == text  # the report renders the same from results.json

    # the convergence note names the cells with a run still moving, and says whether BSS − KD stands
    moving = json.loads(json.dumps(saved))
    for r in moving["runs"]:
        r["curve"] = [[1, 0.5], [2, 0.5]]
    first = cfg.fractions[0]
    moving["convergence"][str(first)]["all_converged"] = False
    ce = next(r for r in moving["runs"] if r["method"] == "ce" and r["fraction"] == first)
    ce["curve"] = [[1, 0.4], [2, 0.5]]
    assert ("for the comparisons with CE at 50%: not every run of those converged. Every KD and BSS run converged"
            in bss.render_reproduction(moving))
    next(r for r in moving["runs"] if r["method"] == "bss" and r["fraction"] == first)["curve"] = [[1, 0.4], [2, 0.5]]
    assert "**Budget too small** for CE at 50%, BSS at 50%: not every run there converged" in bss.render_reproduction(
        moving)

    # kill the experiment in the second epoch of its first CE run (after the epoch-1 checkpoint) ...
    calls = {"n": 0}
    accuracy = common.accuracy

    def killed_at_the_fifth_evaluation(*args, **kwargs):
        # the cached teacher's test accuracy, 2 tuning runs, the first CE run's epoch 1, then its epoch 2
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return accuracy(*args, **kwargs)

    monkeypatch.setattr(common, "accuracy", killed_at_the_fifth_evaluation)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        bss.reproduce(cfg, str(out), "cpu", dataset="digits", train=train, test=test)
    monkeypatch.setattr(common, "accuracy", accuracy)
    assert sorted(protocol.RunStore(str(out)).keys()) == sorted(whole["tuning"]["runs"])
    # ... the same command continues: tuning from the store, the cut run from its checkpoint, the same numbers
    again = bss.reproduce(cfg, str(out), "cpu", dataset="digits", train=train, test=test)
    cut = next(r for r in again["runs"] if r["key"] == f"ce-f{cfg.fractions[0]:g}-s{cfg.seeds[0]}")
    assert cut["resumed_from_epoch"] == 1
    assert _accuracies(again) == _accuracies(whole)

    # a finished experiment re-run trains nothing
    monkeypatch.setattr(bss, "_train_run", lambda *a, **k: pytest.fail("a stored run was trained again"))
    third = bss.reproduce(cfg, str(out), "cpu", dataset="digits", train=train, test=test)
    assert _accuracies(third) == _accuracies(whole) and third["kd_setting"] == whole["kd_setting"]
    # ... and its runs are never mixed with those of another protocol
    with pytest.raises(ValueError, match=r"another protocol \(it differs in epochs\)"):
        bss.reproduce(dataclasses.replace(cfg, epochs=(2, 3)), str(out), "cpu", dataset="digits", train=train, test=test)


def test_kd_grid_is_chosen_on_the_validation_split_never_the_test_set(tmp_path, monkeypatch, tiny):
    cfg, train, _ = tiny
    train_part, validation = protocol.validation_split(train, cfg.validation_fraction, seed=0)
    teacher, kwargs, _, _ = protocol.reference_teacher("digits", train_part, validation, **cfg.teacher)
    evaluated = []
    accuracy = common.accuracy

    def spy(model, dataset, device="cpu"):
        evaluated.append(dataset)
        return accuracy(model, dataset, device=device)

    monkeypatch.setattr(common, "accuracy", spy)
    store = protocol.RunStore(str(tmp_path))
    tuned = bss._tune_kd(teacher, kwargs, train_part, validation, cfg, store, "cpu", bss._clamp_range(train_part))
    assert len(evaluated) == len(cfg.grid()) and all(d is validation for d in evaluated)
    table = tuned["table"]
    assert [row["setting"] for row in table] == cfg.grid()
    assert tuned["best"] == max(table, key=lambda row: row["val_accuracy"])["setting"]
    for key, record in tuned["runs"].items():
        assert key.startswith("tune-kd-") and record["evaluated_on"] == "validation"
        assert record["eval_images"] == len(validation) and record["train_images"] < len(train_part)
    assert sorted(store.keys()) == sorted(tuned["runs"])


def test_bss_and_kd_use_the_tuned_setting(tmp_path, tiny):
    cfg, _, _ = tiny
    from kdfast import models

    teacher, student = models.build("vgg8", width_mult=0.125), models.build("vgg8", width_mult=0.0625)
    setting = {"temperature": 5.0, "kd_scale": 2.0}
    for method in ("kd", "bss"):
        engine = bss._protocol_engine(method, teacher, student, cfg, 4, 0, "cpu", (-1.0, 1.0), setting,
                                        str(tmp_path / method))
        assert engine.weights_at(0)["kd"] == pytest.approx(2.0 * (3 * (1 - 1 / 4) + 1))  # epoch 1 of 4
        assert engine.loss_modules["kd"].temperature == 5.0
        assert engine.run_config["bss_experiment"] == {"method": method, **setting}
    assert bss._protocol_engine("bss", teacher, student, cfg, 4, 0, "cpu", (-1.0, 1.0), setting, None).temperature == 5.0


def test_full_run_records_the_command_and_needs_two_seeds(tmp_path, tiny):
    cfg, _, _ = tiny
    with pytest.raises(ValueError, match="at least 2 seeds"):
        bss.run(str(tmp_path / "one"), dataset="digits", budget="full", seeds=[0])
    res = bss._run_full(str(tmp_path / "full"), dataset="digits", data_root=None, seeds=[0, 1], device="cpu", cfg=cfg)
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    assert saved["run"]["command"] == (f"kdfast experiment bss --dataset digits --budget full --seeds 0,1 "
                                       f"--out {tmp_path / 'full'} --device cpu")
    assert res["protocol"] == "full" and "Verdicts per claim" in (tmp_path / "full" / "report.md").read_text()


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": (3,)}, "one number per fraction"),
    ({"epochs": (1, 3, 3, 3)}, "ints >= 2"),
    ({"tune_fraction": 0.5}, "tune_fraction must be one of the fractions"),
    ({"fractions": (0.0, 0.05, 0.2, 1.0), "tune_fraction": 0.0}, r"fractions must lie in \(0, 1\]"),
    ({"kd_scales": ()}, "at least one value"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bss.ReproductionConfig(**kwargs)


@pytest.mark.parametrize("epochs, points, every", [(30, 10, 3), (12, 10, 2), (4, 10, 1), (3, 10, 1), (7, 3, 7),
                                                   (2, 1, 2)])
def test_evaluations_are_evenly_spaced_and_end_at_the_last_epoch(epochs, points, every):
    assert bss.evaluation_every(epochs, points) == every
