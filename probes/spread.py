"""λ_max across several sharpness batches or start seeds, for error bars."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from probes.hessian import hessian_dim, top_eigenvalue
from probes.state import preserved_model_state


@dataclass
class SharpnessSpread:
    """λ_max per batch (or seed) with their mean, sample standard deviation and count."""

    values: list[float]
    converged: list[bool]
    mean: float
    std: float

    @property
    def count(self) -> int:
        return len(self.values)


def sharpness_spread(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    seeds: Sequence[int] = (0,),
    bn_mode: str = "train",
    **kwargs,
) -> SharpnessSpread:
    """Estimate λ_max on every batch for every start seed, leaving the model as it was.

    Each solve starts from a Gaussian vector drawn from ``torch.Generator().manual_seed(seed)``,
    not from the loss gradient, and that generator also serves the solver's restarts.
    Batch-to-batch spread is the sampling error of a one-batch sharpness; seed-to-seed
    spread on one batch is the estimator's error from its start vector, which shrinks
    with ``tol``. ``kwargs`` go to :func:`probes.hessian.top_eigenvalue`, except
    ``start`` and ``generator``, which the seeds set.
    """
    if bn_mode not in ("train", "eval"):
        raise ValueError(f"invalid bn_mode={bn_mode!r}: expected 'train' (batch statistics) or 'eval' (running "
                         "statistics)")
    if not batches:
        raise ValueError("sharpness_spread needs at least one (inputs, targets) batch")
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError(f"invalid seeds={seeds!r}: expected at least one seed, such as seeds=(0,)")
    for name in ("start", "generator"):
        if name in kwargs:
            raise ValueError(f"sharpness_spread sets {name} from each seed, so it takes no {name}= argument. "
                             "Pass seeds=(...) instead")
    dim = hessian_dim(model, kwargs.get("params"))
    values, converged = [], []
    with preserved_model_state(model, loss_fn):
        model.train(bn_mode == "train")
        for inputs, targets in batches:
            for seed in seeds:
                generator = torch.Generator().manual_seed(seed)
                start = torch.randn(dim, generator=generator, dtype=torch.float64)
                estimate = top_eigenvalue(
                    model, loss_fn, inputs, targets, start=start, generator=generator, warn=False, **kwargs
                )
                values.append(estimate.lambda_max)
                converged.append(estimate.converged)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return SharpnessSpread(values, converged, float(np.mean(values)), std)

