"""kdfast.experiments.protocol: validation split, tuning on it, convergence, verdicts, the run store."""
import math

import pytest
import torch

from kdfast.experiments import protocol


class _Set:
    def __init__(self, n=103, classes=4):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
        self.num_classes = classes

    def __len__(self):
        return len(self.labels)


def test_validation_split_is_stratified_disjoint_and_seeded():
    data = _Set()
    train, val = protocol.validation_split(data, 0.2, seed=3)
    ids_t, ids_v = set(train.images.flatten().tolist()), set(val.images.flatten().tolist())
    assert not ids_t & ids_v and len(ids_t | ids_v) == len(data)
    for c in range(data.num_classes):
        n_c = int((data.labels == c).sum())
        assert int((val.labels == c).sum()) == min(n_c - 1, max(1, round(0.2 * n_c)))
    again = protocol.validation_split(data, 0.2, seed=3)[1]
    other = protocol.validation_split(data, 0.2, seed=4)[1]
    assert torch.equal(again.images, val.images) and not torch.equal(other.images, val.images)
    with pytest.raises(ValueError, match="fraction"):
        protocol.validation_split(data, 1.0)


def test_tune_on_validation_keeps_the_best_and_the_first_on_ties():
    grid = [{"T": 1}, {"T": 4}, {"T": 8}]
    scores = {1: 0.5, 4: 0.7, 8: 0.7}
    out = protocol.tune_on_validation(grid, lambda s: scores[s["T"]])
    assert out["best"] == {"T": 4} and [r["val_accuracy"] for r in out["table"]] == [0.5, 0.7, 0.7]
    with pytest.raises(ValueError):
        protocol.tune_on_validation([], lambda s: 0.0)


def test_convergence_looks_at_the_last_fifth():
    rising = [0.1 * i for i in range(1, 11)]
    assert protocol.convergence(rising)["converged"] is False
    flat_end = [0.5, 0.7, 0.8, 0.85, 0.88, 0.90, 0.905, 0.91, 0.912, 0.913]
    out = protocol.convergence(flat_end)
    assert out["converged"] is True and math.isclose(out["moved"], 0.913 - 0.91)
    assert protocol.convergence([0.9])["converged"] is None
    assert protocol.every_run_converged([flat_end, flat_end]) is True
    assert protocol.every_run_converged([flat_end, rising]) is False
    assert protocol.every_run_converged([flat_end, [0.9]]) is False  # undecidable is not converged
    checks = [protocol.convergence(c) for c in (flat_end, rising, [0.9])]
    assert protocol.converged_cell(checks[:1]) == "yes"
    assert protocol.converged_cell(checks) == "no (1/3)"  # rising and undecidable both count as not converged


@pytest.mark.parametrize("interval, claimed_higher, expected", [
    ((0.01, 0.03), True, "reproduced"), ((-0.03, -0.01), True, "not reproduced"),
    ((-0.01, 0.02), True, "inconclusive"), ((float("nan"), float("nan")), True, "inconclusive"),
    ((-0.03, -0.01), False, "reproduced"), ((None, None), True, "inconclusive")])
def test_verdict(interval, claimed_higher, expected):
    assert protocol.verdict(interval, higher_is_claimed=claimed_higher) == expected


def test_claim_pairs_by_seed():
    out = protocol.claim([0.9, 0.91, 0.92], [0.8, 0.82, 0.81])
    assert out["verdict"] == "reproduced" and math.isclose(out["mean"], (0.1 + 0.09 + 0.11) / 3)


def test_run_store_skips_finished_runs(tmp_path):
    store = protocol.RunStore(tmp_path)
    calls = []
    train = lambda: calls.append(1) or {"accuracy": 0.5, "nan": float("nan")}
    assert store.run("kd-seed0", train)["accuracy"] == 0.5
    again = protocol.RunStore(tmp_path).run("kd-seed0", train)
    assert len(calls) == 1 and again == {"accuracy": 0.5, "nan": None}
    assert store.keys() == ["kd-seed0"]
    assert store.checkpoint_dir("kd-seed0").endswith("checkpoints/kd-seed0")
    with pytest.raises(ValueError, match="key"):
        store.get("../x")


def test_tail_table_says_which_runs_converged():
    rows, every = protocol.tail_table({"kd": [[0.5, 0.9, 0.9, 0.9, 0.9], [0.5, 0.6, 0.7, 0.8, 0.9]]})
    assert rows == ["| kd | 1/2 | 10.00 points |"] and every is False
