"""CIFAR-ResNet shapes, sizes and depth validation."""

import pytest
import torch

from dynamics.models import CifarResNet, build_model


@pytest.mark.parametrize("depth, blocks", [(8, 3), (14, 6), (20, 9), (32, 15), (50, 24), (110, 54)])
def test_depth_sets_block_count(depth, blocks):
    model = CifarResNet(depth)
    assert len(model.blocks) == blocks
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert convs + 1 == depth  # every conv plus the classifier; identity shortcuts add none


def test_resnet20_parameter_count():
    """He et al. report 0.27M parameters for ResNet-20 on CIFAR-10.

    By hand: stem 432 + 32 (BN), stage 1 6*2304 + 6*32, stage 2 4608 + 5*9216 + 6*64,
    stage 3 18432 + 5*36864 + 6*128, classifier 650: 269,722.
    """
    count = sum(p.numel() for p in CifarResNet(20).parameters())
    assert count == 269_722


@pytest.mark.parametrize("depth", [7, 10, 21, 2, 0, 20.0])
def test_invalid_depth_names_valid_form(depth):
    with pytest.raises(ValueError, match=r"6n\+2"):
        CifarResNet(depth)


def test_width_multiplier_scales_channels():
    model = CifarResNet(8, width=2, shortcut="projection")
    assert model.classifier.in_features == 128
    assert model.stem[0].out_channels == 32


@pytest.mark.parametrize("shortcut", ["identity", "projection"])
def test_any_input_channels_and_image_size(shortcut):
    model = CifarResNet(8, in_channels=1, num_classes=7, shortcut=shortcut)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    assert CifarResNet(14, in_channels=3)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_invalid_width_and_unknown_model():
    with pytest.raises(ValueError, match="width=0"):
        CifarResNet(8, width=0)
    with pytest.raises(ValueError, match="known models"):
        build_model("vgg")
