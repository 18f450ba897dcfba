"""kdfast.models' torchvision-structured ImageNet ResNets (kdfast/models/imagenet_resnet.py)."""
import pytest
import torch

import kdfast
from kdfast import models


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_param_counts_equal_torchvisions():
    # torchvision.models.resnet18() / resnet50() at 1000 classes (their published parameter counts)
    assert n_params(models.build("resnet18_imagenet")) == 11_689_512
    assert n_params(models.build("resnet50_imagenet")) == 25_557_032


def test_layout_and_output():
    model = models.build("resnet50_imagenet", num_classes=10, width_mult=0.25).eval()
    names = dict(model.named_modules())
    assert names["conv1"].kernel_size == (7, 7) and names["conv1"].stride == (2, 2)
    # V1.5: the stride sits on the Bottleneck's 3x3 conv
    assert names["layer2.0.conv2"].stride == (2, 2) and names["layer2.0.conv1"].stride == (1, 1)
    assert names["layer4.2.conv3"].out_channels == 4 * 128
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_decompose_and_fuse_keep_the_output():
    torch.manual_seed(0)
    model = models.build("resnet18_imagenet", num_classes=10, width_mult=0.25)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # BN statistics
    model.eval()
    student, report = kdfast.decompose(model, ranks=1.0, input_shape=(3, 64, 64))
    assert len(report.layers) == 16  # the 3x3 convs of the 8 blocks (the stem is skipped, 1x1s too)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = kdfast.fuse_for_inference(student)
        torch.testing.assert_close(fused(x), student.eval()(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("blocks", [(2, 2, 2), (0, 2, 2, 2)])
def test_bad_blocks(blocks):
    with pytest.raises(ValueError, match="blocks must be four positive ints"):
        models.imagenet_resnet.ImageNetResNet(models.BasicBlock, blocks)
