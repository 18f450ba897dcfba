"""Distiller max_steps: a run stops after N optimiser steps (mid-epoch too), writes a checkpoint there,
and a later run with a larger / no limit resumes from that step and ends with exactly the weights of
an uninterrupted run (CPU, same seed): the skipped batches are drawn again, so the data order and the
collate function's random augmentation stay as in the uninterrupted run."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.distill import Distiller

BATCHES_PER_EPOCH = 5  # 30 samples, batch 6


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)  # uses the global RNG: restored from the checkpoint
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.conv(x)).mean(dim=(2, 3))))


class _Jitter:
    """collate_fn with its own generator (the engine reseeds it per epoch), like kdfast.data's augmentation."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, items):
        x, y = torch.utils.data.default_collate(items)
        return x + 0.1 * torch.randn(x.shape, generator=self.generator), y


def _loader():
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(30, 1, 6, 6, generator=g), torch.randint(0, 3, (30,), generator=g))
    return DataLoader(data, batch_size=6, shuffle=True, collate_fn=_Jitter())


def _engine(tmp_path=None, **kw):
    torch.manual_seed(0)
    return Distiller(None, _Net(), {"ce": nn.CrossEntropyLoss()}, lr=0.1, schedule="step", milestones=[2], epochs=3,
                     device="cpu", seed=5, progress=False, log_every=0,
                     checkpoint_dir=str(tmp_path) if tmp_path else None, resume=tmp_path is not None, **kw)


def _weights(engine):
    return {k: v.clone() for k, v in engine.student.state_dict().items()}


def test_max_steps_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    full = _engine()
    full_history = full.fit(_loader())
    assert full.step == 3 * BATCHES_PER_EPOCH

    stop = BATCHES_PER_EPOCH + 2  # the third batch of epoch 2 is not trained
    first = _engine(tmp_path, max_steps=stop)
    history = first.fit(_loader())
    assert first.step == stop and first.epoch == 1
    assert history[-1]["partial"] is True and history[-1]["batches"] == 2 and history[-1]["epoch"] == 1
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_batches"]) == (1, stop, 2)
    assert ckpt["scheduler"]["last_epoch"] == 1  # the schedule counts whole epochs only

    again = _engine(tmp_path, max_steps=stop)  # the same command once more: nothing left to do
    again.fit(_loader())
    assert again.step == stop

    resumed = _engine(tmp_path)  # no limit: resumes inside epoch 2
    history = resumed.fit(_loader())
    assert resumed.step == 3 * BATCHES_PER_EPOCH and resumed.epoch == 3
    assert [r["epoch"] for r in history] == [0, 1, 2] and not any(r.get("partial") for r in history)
    assert history[0]["loss"] == full_history[0]["loss"] and history[2]["loss"] == full_history[2]["loss"]
    want = _weights(full)
    for k, v in _weights(resumed).items():
        assert torch.equal(v, want[k]), f"{k} differs from the uninterrupted run"


def test_max_steps_at_an_epoch_end_and_as_fit_argument(tmp_path):
    engine = _engine(tmp_path)
    history = engine.fit(_loader(), max_steps=BATCHES_PER_EPOCH)
    assert engine.step == BATCHES_PER_EPOCH and engine.epoch == 1 and len(history) == 1
    assert not history[0].get("partial")
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_batches"]) == (1, BATCHES_PER_EPOCH, 0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_max_steps_must_be_a_positive_int(bad):
    with pytest.raises((TypeError, ValueError), match="max_steps"):
        _engine(max_steps=bad)
    with pytest.raises((TypeError, ValueError), match="max_steps"):
        _engine().fit(_loader(), max_steps=bad)
