"""kdfast.methods.kd: the fine-tuning recipes of the Tucker protocol (CE, KD, KD+NST, KD+AT, KD+FSP) on a
Tucker-decomposed student: each builds the losses it names, reads the stage outputs, and one training step
gives the loss its formula says."""
import copy

import pytest
import torch

import kdfast
from kdfast import losses, methods, models
from kdfast.methods import kd


def _pair():
    torch.manual_seed(0)
    teacher = models.build("resnet8", num_classes=10, in_channels=1).eval().requires_grad_(False)
    student, _ = kdfast.decompose(teacher, ranks=0.5, input_shape=(1, 16, 16))
    return teacher, student


@pytest.mark.parametrize("recipe,names", [("ce", {"ce"}), ("kd", {"kd"}), ("kd_nst", {"kd", "nst"}),
                                          ("kd_at", {"kd", "at"}), ("kd_fsp", {"kd", "fsp"})])
def test_every_recipe_builds_its_losses_and_steps(recipe, names):
    teacher, student = _pair()
    d = methods.build("kd", teacher, student, recipe=recipe, device="cpu", progress=False, lr=0.01)
    assert set(d.losses) == names and set(kd.RECIPES) >= {recipe}
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))
    out = d.training_step((x, y))
    assert torch.isfinite(out["loss"]) and set(out["parts"]) >= names
    d.close()


def _stage_outputs(model, layers, x):
    feats = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o))
             for n, m in model.named_modules() if n in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [feats[n] for n in layers]


def test_kd_fsp_term_is_the_fsp_loss_of_consecutive_stage_outputs():
    teacher, student = _pair()
    layers = kd.feature_layers_for(student)
    assert len(layers) >= 2  # FSP compares consecutive pairs
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    # before the step, in the mode the step runs it (training_step outside fit leaves the mode as it is)
    want = losses.FSPLoss()(_stage_outputs(copy.deepcopy(student), layers, x),
                            _stage_outputs(teacher, layers, x))
    d = methods.build("kd", teacher, student, recipe="kd_fsp", fsp_weight=0.5, device="cpu", progress=False)
    out = d.training_step((x, y))
    torch.testing.assert_close(out["parts"]["fsp"].detach(), want, rtol=1e-5, atol=1e-6)
    kd_alone = out["parts"]["kd"].detach()
    torch.testing.assert_close(out["loss"].detach(), kd_alone + 0.5 * want, rtol=1e-5, atol=1e-6)
    d.close()
