"""schedule="cosine_steps": cosine annealing over every training step (T_max = epochs x batches per
epoch), stepped after each step, for the student and for auxiliaries; it resumes mid-epoch exactly."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.distill import Auxiliary, Distiller
from kdfast.distill.optim import OptimizerSpec

BATCHES, EPOCHS, LR = 5, 3, 0.2  # 30 samples, batch 6


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))


def _loader():
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(30, 1, 6, 6, generator=g), torch.randint(0, 3, (30,), generator=g))
    return DataLoader(data, batch_size=6, shuffle=True)


def _engine(tmp_path=None, **kw):
    torch.manual_seed(0)
    return Distiller(None, _Net(), {"ce": nn.CrossEntropyLoss()}, lr=LR, schedule="cosine_steps", epochs=EPOCHS,
                     device="cpu", seed=5, progress=False, log_every=0,
                     checkpoint_dir=str(tmp_path) if tmp_path else None, resume=tmp_path is not None, **kw)


def _cosine(step, total):
    return LR * (1 + math.cos(math.pi * step / total)) / 2


def test_lr_follows_the_cosine_over_steps_and_ends_at_zero():
    engine = _engine()
    history = engine.fit(_loader())
    total = EPOCHS * BATCHES
    # the epoch record holds the LR its last step used; after the run's last step the LR is 0
    assert [r["lr"] for r in history] == pytest.approx([_cosine((e + 1) * BATCHES - 1, total) for e in range(EPOCHS)])
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert engine.scheduler.last_epoch == total


def test_per_epoch_cosine_is_unchanged():
    torch.manual_seed(0)
    engine = Distiller(None, _Net(), {"ce": nn.CrossEntropyLoss()}, lr=LR, schedule="cosine", epochs=EPOCHS,
                       device="cpu", progress=False)
    history = engine.fit(_loader())
    # the LR each epoch used (stepped after the epoch)
    assert [r["lr"] for r in history] == pytest.approx([LR * (1 + math.cos(math.pi * e / EPOCHS)) / 2
                                                       for e in range(EPOCHS)])


def test_mid_epoch_stop_then_resume_equals_uninterrupted(tmp_path):
    full = _engine()
    full.fit(_loader())
    stop = BATCHES + 2
    first = _engine(tmp_path, max_steps=stop)
    first.fit(_loader())
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["scheduler"]["last_epoch"] == stop  # the step schedule counts the steps taken
    resumed = _engine(tmp_path)
    resumed.fit(_loader())
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    want = full.student.state_dict()
    for k, v in resumed.student.state_dict().items():
        assert torch.equal(v, want[k]), f"{k} differs from the uninterrupted run"


class _WithHead(Distiller):
    """CE on the student plus an auxiliary head trained on the student's detached logits."""

    def training_step(self, batch):
        out = super().training_step(batch)
        loss = F.cross_entropy(self.auxiliary_model("head")(out["logits"].detach()), out["targets"])
        self.backward_step(loss, "head")
        return out


def test_auxiliary_with_cosine_steps_is_stepped_every_step():
    torch.manual_seed(0)
    head = nn.Linear(3, 3)
    engine = _WithHead(None, _Net(), {"ce": nn.CrossEntropyLoss()}, lr=LR, schedule="cosine", epochs=EPOCHS,
                       device="cpu", progress=False,
                       auxiliaries={"head": Auxiliary(head, optimizer="sgd", lr=0.5, schedule="cosine_steps")})
    engine.fit(_loader())
    assert engine.schedulers["head"].last_epoch == EPOCHS * BATCHES
    assert engine.optimizers["head"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert engine.scheduler.last_epoch == EPOCHS  # the student's per-epoch cosine: once per epoch


@pytest.mark.parametrize("steps", [None, 0, 2.5, True])
def test_cosine_steps_needs_the_steps_per_epoch(steps):
    spec = OptimizerSpec(schedule="cosine_steps")
    spec.check()
    optimizer = spec.build_optimizer(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="steps per epoch"):
        spec.build_scheduler(optimizer, 3, steps)
