"""Data and models shared by the distributed worker and the single-process references."""

import torch
from torch import nn


def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator)


def make_model() -> nn.Module:
    """A small tanh MLP (no BatchNorm, whose batch statistics would differ per rank)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def shards():
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(5, generator=generator), torch.randn(7, generator=generator)]


def tangent(dim: int) -> torch.Tensor:
    return torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
