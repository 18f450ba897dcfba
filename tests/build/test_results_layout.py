"""Committed results follow one layout: speed results in benchmarks/results/<device>/ (what
csrc/ops/kernel_paths.cpp's `evidence` entries point into), accuracy experiments in
experiments/results/<experiment>-<dataset>-<budget>/ (what `kdfast experiment` writes by default), or
<experiment>-<dataset>-<budget>-<variant>/ for a run with other options than the default (e.g. more seeds)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks", "results")
EXPERIMENTS = os.path.join(ROOT, "experiments", "results")


def test_speed_results_are_one_folder_per_device():
    entries = sorted(os.listdir(BENCH))
    assert entries, "benchmarks/results/ is empty"
    loose = [e for e in entries if not os.path.isdir(os.path.join(BENCH, e))]
    assert not loose, f"files directly in benchmarks/results/ (put them in benchmarks/results/<device>/): {loose}"
    for device in entries:
        for name in os.listdir(os.path.join(BENCH, device)):
            # <benchmark>[-<threads>][-<variant>].<ext>, lower case, no device in the name (the folder says it)
            assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*\.(md|json|png|txt)", name), f"{device}/{name}"
            assert device not in name, f"{device}/{name} repeats the device"


def test_experiment_results_are_named_experiment_dataset_budget():
    from kdfast import experiments
    from kdfast.experiments.common import BUDGETS, DATASETS

    names = sorted(os.listdir(EXPERIMENTS))
    assert names
    pattern = re.compile(rf"({'|'.join(experiments.available())})-({'|'.join(DATASETS)})-({'|'.join(BUDGETS)})(-[a-z0-9]+)?")
    for name in names:
        assert pattern.fullmatch(name), name
        assert os.path.isfile(os.path.join(EXPERIMENTS, name, "report.md")), name
        assert os.path.isfile(os.path.join(EXPERIMENTS, name, "results.json")), name
