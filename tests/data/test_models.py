"""kdfast.models: shapes on several input sizes, parameter counts against hand-derived formulas and
the published ones, registry behaviour, bad arguments."""
import pytest
import torch

from kdfast import models

RESNET_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet26": 26, "resnet32": 32, "resnet56": 56}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def cifar_resnet_params(depth, num_classes, in_channels=3, widths=(16, 32, 64), stem=None):
    """Parameter count derived by hand from the architecture (convs without bias, BN weight+bias)."""
    n = (depth - 2) // 6
    stem = widths[0] if stem is None else stem
    total = in_channels * stem * 9 + 2 * stem
    in_planes = stem
    for stage, planes in enumerate(widths):
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            total += in_planes * planes * 9 + 2 * planes + planes * planes * 9 + 2 * planes
            if stride != 1 or in_planes != planes:
                total += in_planes * planes + 2 * planes
            in_planes = planes
    return total + widths[-1] * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(RESNET_DEPTHS))
def test_resnet_param_count_matches_architecture(name):
    model = models.build(name, num_classes=100)
    assert n_params(model) == cifar_resnet_params(RESNET_DEPTHS[name], 100)


def test_published_param_counts():
    # He et al. 2016 Table 6 (CIFAR-10): resnet20 0.27M, resnet32 0.46M, resnet56 0.85M; our 1x1
    # projection shortcuts (RepDistiller's option B) add < 1%.
    for name, published in [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6)]:
        assert abs(n_params(models.build(name)) - published) / published < 0.02, name
    # RepDistiller's CIFAR-100 table: resnet8x4 1.23M, resnet32x4 7.43M, vgg8 3.96M, vgg13 9.46M.
    for name, published in [("resnet8x4", 1.23e6), ("resnet32x4", 7.43e6), ("vgg8", 3.96e6), ("vgg13", 9.46e6)]:
        assert abs(n_params(models.build(name, num_classes=100)) - published) / published < 0.01, name
    # LeNet-5 on 3-channel 32x32 input: the widely quoted 62,006.
    assert n_params(models.build("lenet5")) == 62006
    assert n_params(models.build("resnet8x4", num_classes=100)) == cifar_resnet_params(
        8, 100, widths=(64, 128, 256), stem=32
    )


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "vgg8", "resnet8x4"])
@pytest.mark.parametrize("size", [(1, 1), (7, 9), (28, 28), (32, 32), (33, 40)])
def test_any_input_size(name, size):
    model = models.build(name, num_classes=7, in_channels=1, width_mult=0.5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [13, 14, 28, 32, 47])
def test_lenet_sizes(size):
    model = models.build("lenet5", num_classes=5, in_channels=1)
    assert model(torch.randn(3, 1, size, size)).shape == (3, 5)


def test_lenet_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 13x13"):
        models.lenet5()(torch.randn(1, 3, 12, 20))


def test_resnet_layout_and_feature_taps():
    model = models.resnet20()
    names = dict(model.named_children())
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "fc"):
        assert name in names
    assert len(model.layer1) == 3 and model.layer2[0].conv1.stride == (2, 2)
    shapes = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape))
             for n in model.feature_layers]
    model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == {"layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8)}


def test_width_mult_scales_channels():
    model = models.resnet8(width_mult=2)
    assert model.conv1.out_channels == 32 and model.fc.in_features == 128
    assert models.vgg8(width_mult=0.25).classifier.in_features == 128


def test_train_step_and_state_dict_round_trip():
    model = models.build("resnet8", num_classes=3)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    clone = models.build("resnet8", num_classes=3)
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_registry():
    names = models.available()
    assert names == sorted(names)
    for required in ("resnet8", "resnet14", "resnet20", "resnet26", "resnet32", "resnet56", "vgg8", "lenet5"):
        assert required in names
    assert isinstance(models.build("ResNet20"), models.CifarResNet)
    with pytest.raises(ValueError, match="unknown model name 'resnet21'.*resnet20"):
        models.build("resnet21")
    with pytest.raises(TypeError, match="name must be a str"):
        models.build(20)
    with pytest.raises(TypeError):
        models.build("resnet20", not_an_option=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"width_mult": 0}, "width_mult"),
        ({"width_mult": "wide"}, "width_mult"),
    ],
)
def test_bad_arguments(kwargs, match):
    for name in ("resnet8", "vgg8", "lenet5"):
        with pytest.raises(ValueError, match=match):
            models.build(name, **kwargs)


def test_bad_depth():
    with pytest.raises(ValueError, match="depth must be 6n"):
        models.CifarResNet(21)
    with pytest.raises(ValueError, match="depth must be one of"):
        models.VGG(9)


def test_lenet5_and_lenet5_half_match_the_data_free_papers_parameter_counts():
    """DAFL's lenet.py (huawei-noah/Efficient-Computing): LeNet-5 61,706 parameters; LeNet-5-half, every
    width halved, the fully connected layers included (conv 1->3->8, conv3 8->60, fc 60->42->10), 15,738."""
    def count(m):
        return sum(p.numel() for p in m.parameters())
    full = models.build("lenet5", num_classes=10, in_channels=1)
    half = models.build("lenet5", num_classes=10, in_channels=1, width_mult=0.5)
    assert count(full) == 61_706 and count(half) == 15_738
    assert (half.fc1.out_features, half.fc2.out_features) == (60, 42)
    assert half(torch.randn(2, 1, 32, 32)).shape == (2, 10)
