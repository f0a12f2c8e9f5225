"""Training losses by name. Both reduce with the mean over the batch."""

from __future__ import annotations

import torch
from torch import nn

LOSSES = ("cross_entropy", "mse")


class SquaredLoss(nn.Module):
    """½·mean over the batch of ‖f(x) − onehot(y)‖², the squared loss on class targets.

    The ½ makes the Hessian of a linear model XᵀX/n, the convention of the
    edge-of-stability literature (Cohen et al., 2021).
    """

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
        return 0.5 * (outputs - onehot).square().sum(1).mean()


def build_loss(name: str) -> nn.Module:
    """Build a loss by name: ``cross_entropy`` or ``mse`` (:class:`SquaredLoss`)."""
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    if name == "mse":
        return SquaredLoss()
    raise ValueError(f"unknown loss {name!r}: known losses are {list(LOSSES)}")
