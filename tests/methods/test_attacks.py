"""kdfast.attacks (FGSM, PGD) and kdfast.robustness: loss goes up, perturbations stay in the
eps-ball and the clamp range, the model's modes / requires_grad / .grad are left as they were."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kdfast
from kdfast import attacks


def _model():
    # BatchNorm and Dropout make train/eval mode matter; a nested Sequential gives submodules.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Dropout(0.2), nn.Conv2d(8, 8, 3, padding=1)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def _batch(n=16, c=3, size=7):
    x = torch.rand(n, c, size, size)
    y = torch.randint(0, 5, (n,))
    return x, y


def _loss(model, x, y):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attack_increases_loss_and_stays_in_ball(attack):
    model, (x, y) = _model(), _batch()
    eps = 0.05
    if attack == "fgsm":
        adv = attacks.fgsm(model, x, y, eps)
    else:
        adv = attacks.pgd(model, x, y, eps, steps=5)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert (adv - x).abs().max() <= eps + 1e-6
    assert (adv - x).abs().max() > eps / 2  # it actually moved
    assert _loss(model, adv, y) > _loss(model, x, y)


def test_pgd_beats_or_matches_fgsm_and_respects_per_channel_clamp():
    model, (x, y) = _model(), _batch()
    lo = torch.tensor([0.1, 0.0, 0.2])
    hi = torch.tensor([0.9, 0.5, 1.0])
    x = torch.maximum(torch.minimum(x, hi.view(1, 3, 1, 1)), lo.view(1, 3, 1, 1))
    eps = 0.1
    adv_f = attacks.fgsm(model, x, y, eps, clamp=(lo, hi))
    adv_p = attacks.pgd(model, x, y, eps, steps=10, clamp=(lo, hi), generator=torch.Generator().manual_seed(0))
    for adv in (adv_f, adv_p):
        assert (adv - x).abs().max() <= eps + 1e-6
        assert (adv >= lo.view(1, 3, 1, 1) - 1e-7).all() and (adv <= hi.view(1, 3, 1, 1) + 1e-7).all()
        assert _loss(model, adv, y) > _loss(model, x, y)
    assert _loss(model, adv_p, y) >= _loss(model, adv_f, y) - 1e-4
    # scalar clamp too
    adv = attacks.pgd(model, x, y, 0.5, steps=3, clamp=(0.0, 1.0))
    assert adv.min() >= 0 and adv.max() <= 1


def test_per_channel_eps():
    model, (x, y) = _model(), _batch()
    eps = [0.01, 0.0, 0.1]
    adv = attacks.pgd(model, x, y, eps, steps=4)
    delta = (adv - x).abs().amax(dim=(0, 2, 3))
    assert delta[1] == 0 and delta[0] <= 0.01 + 1e-7 and delta[2] <= 0.1 + 1e-7 and delta[2] > 0.05


def test_eps_zero_returns_x():
    model, (x, y) = _model(), _batch()
    assert torch.equal(attacks.fgsm(model, x, y, 0.0), x)
    assert torch.equal(attacks.pgd(model, x, y, 0, steps=3), x)


def test_pgd_reproducible_with_generator():
    model, (x, y) = _model(), _batch()
    a = attacks.pgd(model, x, y, 0.05, steps=2, generator=torch.Generator().manual_seed(1))
    b = attacks.pgd(model, x, y, 0.05, steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "report"])
def test_modes_flags_and_grads_restored(attack):
    model, (x, y) = _model(), _batch()
    model.train()
    model[1].eval()  # a mixed state: BN in eval inside a training model
    model[0].weight.requires_grad_(False)
    model[6].weight.grad = torch.full_like(model[6].weight, 7.0)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    bn_stats = model[1].running_mean.clone()
    if attack == "fgsm":
        attacks.fgsm(model, x, y, 0.1)
    elif attack == "pgd":
        attacks.pgd(model, x, y, 0.1, steps=2)
    else:
        kdfast.robustness_report(model, [(x, y)], eps=[0, 0.1], pgd_steps=2)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert torch.equal(model[6].weight.grad, torch.full_like(model[6].weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "6.weight")
    assert torch.equal(model[1].running_mean, bn_stats)  # attacked in eval mode: no BN update


def test_modes_restored_when_model_raises():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        attacks.pgd(model, torch.rand(2, 4), torch.tensor([0, 1]), 0.1, steps=1)
    assert model.training and model.lin.training and model.lin.weight.requires_grad


def test_works_under_no_grad():
    model, (x, y) = _model(), _batch()
    with torch.no_grad():
        adv = attacks.fgsm(model, x, y, 0.05)
    assert (adv - x).abs().max() > 0.02


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m, x, y: attacks.fgsm(m, x, y, -0.1), ValueError, "eps must be >= 0"),
        (lambda m, x, y: attacks.fgsm(m, x, y, float("nan")), ValueError, "eps must be finite"),
        (lambda m, x, y: attacks.fgsm(m, x.long(), y, 0.1), TypeError, "floating-point"),
        (lambda m, x, y: attacks.fgsm(m, x, y.float(), 0.1), TypeError, "int64"),
        (lambda m, x, y: attacks.fgsm(m, x, y[:3], 0.1), ValueError, "y must have shape"),
        (lambda m, x, y: attacks.pgd(m, x, y, 0.1, steps=0), ValueError, "steps must be an int >= 1"),
        (lambda m, x, y: attacks.pgd(m, x, y, 0.1, clamp=(1.0, 0.0)), ValueError, "lo <= hi"),
        (lambda m, x, y: attacks.pgd(m, x, y, 0.1, clamp=0.5), ValueError, "pair"),
        (lambda m, x, y: attacks.pgd(m, x, y, [0.1, 0.2]), ValueError, "eps of shape"),
        (lambda m, x, y: attacks.fgsm("model", x, y, 0.1), TypeError, "torch.nn.Module"),
    ],
)
def test_bad_arguments(call, exc, match):
    model, (x, y) = _model(), _batch()
    with pytest.raises(exc, match=match):
        call(model, x, y)


# ============================================================================================ report
def test_robustness_report_table_dict_and_plot(tmp_path):
    torch.manual_seed(0)
    # a linear model on separable data: clean accuracy high, falls under attack
    w = torch.randn(5, 12)
    x = torch.rand(64, 3, 2, 2)
    y = (x.flatten(1) @ w.t()).argmax(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.zero_()
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    rep = kdfast.robustness_report(model, loader, eps=[0, 0.05, 0.3], pgd_steps=5, clamp=(0.0, 1.0), plot=tmp_path / "r.png")
    assert rep.n == 64 and rep.clean == 1.0
    assert rep.fgsm[0] == rep.pgd[0] == rep.clean
    assert rep.pgd[2] < rep.clean and rep.pgd[2] <= rep.pgd[1] + 1e-9
    assert all(p <= f + 1e-9 for f, p in zip(rep.fgsm[1:], rep.pgd[1:]))
    assert rep.step_size == pytest.approx([0.0, 2.5 * 0.05 / 5, 2.5 * 0.3 / 5])
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["eps"] == [0, 0.05, 0.3] and d["clean"] == 1.0 and len(d["pgd"]) == 3
    text = str(rep)
    assert "| eps | clean acc (%) | FGSM acc (%) | PGD acc (%) |" in text and text.count("\n|") == 5
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # std given: eps in pixel units, divided by std per channel for the attack
    rep2 = kdfast.robustness_report(model, loader, eps=[0.1], pgd_steps=5, std=[2.0, 2.0, 2.0], random_start=False)
    rep3 = kdfast.robustness_report(model, loader, eps=[0.05], pgd_steps=5, random_start=False)
    assert rep2.pgd == rep3.pgd and rep2.fgsm == rep3.fgsm and rep2.eps_units.startswith("pixel")


def test_robustness_report_bad_arguments():
    model = nn.Linear(4, 2)
    loader = [(torch.rand(2, 4), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="eps values"):
        kdfast.robustness_report(model, loader, eps=[-1])
    with pytest.raises(ValueError, match="pgd_steps"):
        kdfast.robustness_report(model, loader, pgd_steps=0)
    with pytest.raises(ValueError, match="no samples"):
        kdfast.robustness_report(model, [], eps=[0.1])
    with pytest.raises(TypeError, match="loader must yield"):
        kdfast.robustness_report(model, [torch.rand(2, 4)], eps=[0.1])
