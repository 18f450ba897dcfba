"""kdfast.fuse_for_inference: the fused model equals the unfused eval-mode model (float64) on every
kdfast model, teacher and Tucker student, and on a torchvision-style ResNet written here (torchvision
may not be installed); BN is folded, ReLU and the residual add go into the Tucker epilogue where the
graph allows, and what torch.fx cannot trace is refused (strict) or fused child by child."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import randomise_bn
from torch import nn

import kdfast
from kdfast import models
from kdfast.fusion import FusionError, fuse_for_inference
from kdfast.nn import FusedTuckerConv2d, TuckerConv2d


def _assert_fused_equal(model, x, expect_warning=False):
    model = model.eval()
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fuse_for_inference(model)
    assert any("could not trace" in str(w.message) for w in caught) == expect_warning
    with torch.no_grad():
        out = fused(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    return fused


def _types(module):
    return [type(m) for m in module.modules()]


@pytest.mark.parametrize("name", models.available())
@pytest.mark.parametrize("student", [False, True], ids=["teacher", "tucker-student"])
def test_every_kdfast_model(name, student):
    torch.manual_seed(0)
    model = randomise_bn(models.build(name, num_classes=10)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    if student:
        small = {"min_channels": 1, "skip_first": False} if name == "lenet5" else {}  # LeNet5 has 6/16 channels
        model, report = kdfast.decompose(model, ranks=0.5, input_shape=(3, 32, 32), **small)
        assert report.layers
    fused = _assert_fused_equal(model, x, expect_warning=name == "lenet5")
    if name.startswith(("resnet", "vgg")):
        assert nn.BatchNorm2d not in _types(fused)  # every BN followed a conv
    if student and name.startswith("resnet"):
        kinds = {(m.add_residual, m.relu) for m in fused.modules() if isinstance(m, FusedTuckerConv2d)}
        if name == "resnet50_imagenet":  # Bottleneck: only its 3x3 conv2 is decomposed, + BN + ReLU
            assert kinds == {(False, True)}
        else:
            assert kinds == {(False, True), (True, True)}  # conv1 + BN + ReLU; conv2 + BN + shortcut + ReLU
        assert not any(type(m) is TuckerConv2d for m in fused.modules())


# ----------------------------------------------------------------------- torchvision-style ResNet
class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """torchvision.models.resnet.ResNet's structure (7x7 stem, max pool, four stages), narrow."""

    def __init__(self, block, layers, width=16, num_classes=10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("block,layers", [(TVBasicBlock, [2, 2, 2, 2]), (TVBottleneck, [1, 2, 1, 1])],
                         ids=["resnet18-style", "resnet50-style"])
@pytest.mark.parametrize("student", [False, True], ids=["teacher", "tucker-student"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torchvision_style_resnet(block, layers, student, layout):
    torch.manual_seed(0)
    model = randomise_bn(TVResNet(block, layers)).double()
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if student:
        model, _ = kdfast.decompose(model, ranks=0.5, input_shape=(3, 48, 40))
    fused = _assert_fused_equal(model, x)
    assert nn.BatchNorm2d not in _types(fused)
    if student:  # BasicBlock: conv2 + BN + shortcut + ReLU; Bottleneck: the add follows the (dense) 1x1 conv3
        residual = block is TVBasicBlock
        assert any(isinstance(m, FusedTuckerConv2d) and m.add_residual == residual and m.relu for m in fused.modules())


# ----------------------------------------------------------------------- graph shapes and refusals
class TwoUsers(nn.Module):
    """The Tucker output feeds two ops: nothing may be fused into it; a broadcasting 'residual' neither."""

    def __init__(self):
        super().__init__()
        self.t = TuckerConv2d(4, 6, 3, (3, 2), padding=1, dtype=torch.float64)
        self.u = TuckerConv2d(4, 6, 3, (3, 2), padding=1, dtype=torch.float64)
        self.bn = nn.BatchNorm2d(6).double()
        self.offset = nn.Parameter(torch.randn(6, 1, 1, dtype=torch.float64))

    def forward(self, x):
        a = self.t(x)
        b = F.relu(self.bn(self.u(x)) + self.offset)  # BN folded, add of a broadcast tensor, ReLU
        return torch.relu(a) + a * 2 + b


def test_shared_outputs_and_broadcast_residual():
    model = randomise_bn(TwoUsers())
    fused = _assert_fused_equal(model, torch.randn(2, 4, 7, 6, dtype=torch.float64))
    modules = dict(fused.named_modules())
    assert type(modules["t"]) is TuckerConv2d  # a has three users: left alone
    assert isinstance(modules["u"], FusedTuckerConv2d) and modules["u"].add_residual and modules["u"].relu


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.body(x)
        return -self.body(x)


def test_untraceable_model_strict_raises_and_default_fuses_children():
    model = randomise_bn(Untraceable()).double()
    with pytest.raises(FusionError, match="cannot trace Untraceable"):
        fuse_for_inference(model, strict=True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).abs()
    fused = _assert_fused_equal(model, x, expect_warning=True)
    assert nn.BatchNorm2d not in _types(fused)  # folded inside the traceable child


def test_copy_inplace_and_eval_mode():
    model = randomise_bn(models.build("resnet8")).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = kdfast.fuse_for_inference(model)
    assert not fused.training
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fuse_for_inference(model, inplace=True) is not None
    assert not model.training


def test_fused_student_trains_like_the_unfused_one():
    """FusedTuckerConv2d differentiates its epilogue (ATen ops) and keeps the convolution's backward."""
    torch.manual_seed(0)
    model, _ = kdfast.decompose(randomise_bn(models.build("resnet8")).double(), ranks=0.5)
    fused = fuse_for_inference(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model.eval()
    ref = model(x).square().sum()
    out = fused(x).square().sum()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    out.backward()
    assert all(p.grad is not None for p in fused.parameters() if p.requires_grad)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse_for_inference("resnet20")
    with pytest.raises(TypeError, match="inplace and strict must be bools"):
        fuse_for_inference(nn.Conv2d(1, 1, 1), inplace=1)
