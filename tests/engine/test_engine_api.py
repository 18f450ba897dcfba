"""What the engine offers methods as public API: the autocast context, to_float, mix_seed and the
``Distiller.extra_losses`` hook (a loss term computed from the step's tensors, without copying compute_loss)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast.distill as distill
from kdfast.distill import Distiller, StepTensors, autocast, mix_seed, to_float


def test_autocast_is_one_implementation():
    from kdfast.distill import trainer
    from kdfast.methods import datafree_base

    assert trainer.autocast is autocast and not hasattr(datafree_base, "_autocast")
    with autocast("cpu", None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="amp must be None, 'bf16' or 'fp16', got 'fp8'"):
        autocast("cpu", "fp8")


def test_to_float_and_mix_seed():
    x = torch.ones(2, dtype=torch.bfloat16)
    assert to_float(x).dtype == torch.float32
    y = torch.ones(2)
    assert to_float(y) is y and to_float(torch.ones(2, dtype=torch.int64)).dtype == torch.int64
    with pytest.raises(TypeError, match="must be a Tensor"):
        to_float([1.0])
    seeds = {mix_seed(s, e, k) for s in range(3) for e in range(3) for k in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)


class _Extra(Distiller):
    """CE plus w * mean squared student logit, computed from the step's tensors."""

    def __init__(self, *args, weight=0.5, skip=False, name="logit_l2", **kwargs):
        self.weight, self.skip, self.name, self.seen = weight, skip, name, []
        super().__init__(*args, **kwargs)

    def extra_losses(self, step: StepTensors):
        self.seen.append(step)
        value = None if self.skip else step.student_logits.square().mean()
        return {self.name: (self.weight, value)}


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))


def test_extra_losses_add_a_term_to_the_step():
    x, y = torch.randn(8, 12, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3
    student, manual = _net(1), _net(1)
    d = _Extra(_net(2), student, {"ce": nn.CrossEntropyLoss()}, lr=0.1, momentum=0.0, weight_decay=0.0,
               device="cpu", progress=False)
    out = d.training_step((x, y))
    step = d.seen[0]
    assert torch.equal(step.inputs, x) and torch.equal(step.targets, y) and step.index is None
    assert step.teacher_logits is not None and step.student_logits.requires_grad
    logits = manual(x)
    loss = F.cross_entropy(logits, y) + 0.5 * logits.square().mean()
    torch.testing.assert_close(out["loss"], loss)
    torch.testing.assert_close(out["parts"]["logit_l2"], logits.square().mean().detach())
    loss.backward()
    with torch.no_grad():
        for p in manual.parameters():
            p -= 0.1 * p.grad
    for a, b in zip(student.parameters(), manual.parameters()):
        torch.testing.assert_close(a, b)


def test_extra_losses_none_adds_nothing_and_logs_zero():
    x, y = torch.randn(4, 12), torch.arange(4) % 3
    d = _Extra(None, _net(1), {"ce": nn.CrossEntropyLoss()}, skip=True, device="cpu", progress=False)
    out = d.compute_loss((x, y))
    torch.testing.assert_close(out["loss"], out["parts"]["ce"])
    assert out["parts"]["logit_l2"] == 0 and d.seen[0].teacher_logits is None


def test_extra_losses_names_must_not_clash():
    d = _Extra(None, _net(1), {"ce": nn.CrossEntropyLoss()}, name="ce", device="cpu", progress=False)
    with pytest.raises(ValueError, match="extra_losses returned 'ce', which is already one of the losses"):
        d.compute_loss((torch.randn(2, 12), torch.tensor([0, 1])))


def test_bss_uses_the_hook_not_a_copy_of_compute_loss():
    from kdfast.methods import bss

    assert "training_step" not in vars(bss.BSSDistiller) and "compute_loss" not in vars(bss.BSSDistiller)
    assert "extra_losses" in vars(bss.BSSDistiller)
    assert {"autocast", "to_float", "mix_seed", "StepTensors"} <= set(distill.__all__)
