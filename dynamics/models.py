"""CIFAR-style ResNets with basic blocks (He et al., 2016, section 4.2).

A depth-d network has d = 6n + 2 weighted layers: a 3x3 stem convolution, three
stages of n basic blocks (two 3x3 convolutions each) with 16k, 32k and 64k channels
for width multiplier k, and a linear classifier after global average pooling. Stages
two and three halve the spatial size. Depths 8, 14, 20, 32, 44, 50, 56 and 110 are
of this form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("identity", "projection")


def check_depth(depth: int) -> int:
    """Return n = (depth - 2) / 6, or raise if depth is not of the form 6n + 2."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"invalid ResNet depth={depth!r}: a CIFAR-ResNet has depth 6n+2 with n >= 1 "
            "(8, 14, 20, 32, 44, 50, 56, 110, ...)"
        )
    return (depth - 2) // 6


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    When the block changes the shape, the ``identity`` shortcut subsamples and pads
    the new channels with zeros (option A of He et al., parameter-free, the CIFAR
    default); the ``projection`` shortcut is a strided 1x1 convolution with BN.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.reshapes = stride != 1 or in_channels != out_channels
        self.stride = stride
        self.pad_channels = out_channels - in_channels
        self.projection = None
        if self.reshapes and shortcut == "projection":
            self.projection = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reshapes:
            return x
        if self.projection is not None:
            return self.projection(x)
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def build_trunk(in_channels: int, channels: list[int], blocks_per_stage: int, shortcut: str) -> tuple[nn.Module, nn.Module]:
    """Build a 3x3 conv-BN-ReLU stem and the stages of basic blocks; every stage after the first halves the size."""
    stem = nn.Sequential(
        nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(channels[0]),
        nn.ReLU(inplace=True),
    )
    blocks = []
    previous = channels[0]
    for stage, out_channels in enumerate(channels):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            blocks.append(BasicBlock(previous, out_channels, stride, shortcut))
            previous = out_channels
    return stem, nn.Sequential(*blocks)


class CifarResNet(nn.Module):
    """CIFAR-ResNet of depth 6n+2 and width multiplier k.

    Args:
        depth: number of weighted layers, 6n + 2.
        width: channel multiplier k >= 1; the stages have 16k, 32k and 64k channels.
        in_channels: input image channels (3 for CIFAR, 1 for digits).
        num_classes: size of the output layer.
        shortcut: ``identity`` (zero-padding, default) or ``projection``.

    Any image size works: the classifier follows a global average pool.
    """

    def __init__(
        self,
        depth: int = 20,
        width: int = 1,
        in_channels: int = 3,
        num_classes: int = 10,
        shortcut: str = "identity",
    ) -> None:
        super().__init__()
        blocks_per_stage = check_depth(depth)
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"invalid ResNet width={width!r}: expected an integer multiplier >= 1")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"invalid shortcut={shortcut!r}: expected one of {SHORTCUTS}")
        self.depth, self.width = depth, width

        channels = [16 * width, 32 * width, 64 * width]
        self.stem, self.blocks = build_trunk(in_channels, channels, blocks_per_stage, shortcut)
        self.classifier = nn.Linear(channels[-1], num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (batch, 64k)
        return self.classifier(out)


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016) adapted to 32x32 inputs, as commonly used on CIFAR-10.

    The ImageNet stem (7x7 stride-2 convolution and max pooling) is replaced by one 3x3
    stride-1 convolution, so a 32x32 image reaches the last stage at 4x4. Four stages
    of two basic blocks have 64k, 128k, 256k and 512k channels for width multiplier k.
    Stages two to four halve the spatial size and use projection shortcuts where the
    shape changes. About 11.2M parameters at k = 1 with 10 classes.
    """

    def __init__(self, width: int = 1, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"invalid ResNet-18 width={width!r}: expected an integer multiplier >= 1")
        self.width = width
        channels = [64 * width, 128 * width, 256 * width, 512 * width]
        self.stem, self.blocks = build_trunk(in_channels, channels, 2, "projection")
        self.classifier = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (batch, 512k)
        return self.classifier(out)


MODELS = ("resnet", "resnet18", "mlp")


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a model by registry name: ``resnet`` (:class:`CifarResNet`), ``resnet18`` or ``mlp``.

    ``resnet18`` ignores a ``depth`` keyword, which the study runner passes to every ResNet.
    """
    if name == "resnet":
        return CifarResNet(**kwargs)
    if name == "resnet18":
        kwargs.pop("depth", None)
        return ResNet18(**kwargs)
    if name == "mlp":
        return MLP(**kwargs)
    raise ValueError(f"unknown model {name!r}: known models are {list(MODELS)}")


class MLP(nn.Module):
    """Fully connected network on flattened inputs: Linear, activation, ..., Linear.

    Args:
        in_features: size of a flattened input (64 for 8x8 digits).
        hidden: widths of the hidden layers.
        num_classes: size of the output layer.
        activation: ``tanh`` or ``relu``.
    """

    ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (200, 200), num_classes: int = 10, activation: str = "tanh") -> None:
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"invalid activation={activation!r}: expected one of {sorted(self.ACTIVATIONS)}")
        if not hidden or any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"invalid hidden={hidden!r}: expected one or more integer widths >= 1")
        layers: list[nn.Module] = []
        previous = in_features
        for width in hidden:
            layers += [nn.Linear(previous, width), self.ACTIVATIONS[activation]()]
            previous = width
        layers.append(nn.Linear(previous, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))
