"""Hessian-vector products of a training loss, and the Lanczos estimate of λ_max.

Conventions a reader could get wrong:

- The loss is the training loss with the same reduction as training (the mean over
  the batch). A batch split into chunks is weighted by chunk size, so the product is
  the one of the whole batch.
- λ_max is the largest *algebraic* eigenvalue, not the largest in magnitude: Lanczos
  finds both ends of the spectrum, and the top Ritz value is reported even when the
  most negative eigenvalue is larger in magnitude (power iteration would return that
  one instead).
- Products come from double backward through ``torch.autograd.grad``, which never
  writes ``.grad``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


class HessianOperator:
    """The map v ↦ H v for ``loss_fn(model(inputs), targets)`` at the current parameters.

    Vectors are flat float64 tensors over ``params`` in order. With one chunk the
    gradient graph is built once and reused by every product; with several chunks
    (``chunk_size`` smaller than the batch) each product recomputes the graph chunk
    by chunk, so memory holds one chunk's graph at a time.

    The model is used in whatever mode it is in; callers choose and restore it.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        params: Sequence[torch.Tensor] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)
        self.batch_size = len(targets)
        chunk_size = chunk_size or self.batch_size
        self.chunks = [
            (inputs[start : start + chunk_size], targets[start : start + chunk_size])
            for start in range(0, self.batch_size, chunk_size)
        ]
        self.products = 0
        self._grads: tuple[torch.Tensor, ...] | None = None

    def _chunk_grads(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight = len(targets) / self.batch_size
        loss = self.loss_fn(self.model(inputs), targets) * weight
        return torch.autograd.grad(loss, self.params, create_graph=True)

    def _split(self, vector: torch.Tensor) -> list[torch.Tensor]:
        pieces = torch.split(vector, [p.numel() for p in self.params])
        return [piece.view_as(p).to(p.dtype) for piece, p in zip(pieces, self.params)]

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        self.products += 1
        tangents = self._split(vector)
        if len(self.chunks) == 1:
            if self._grads is None:
                self._grads = self._chunk_grads(*self.chunks[0])
            products = torch.autograd.grad(self._grads, self.params, tangents, retain_graph=True)
            return torch.cat([h.reshape(-1) for h in products]).to(torch.float64)
        total = torch.zeros(self.dim, dtype=torch.float64, device=vector.device)
        for inputs, targets in self.chunks:
            grads = self._chunk_grads(inputs, targets)
            products = torch.autograd.grad(grads, self.params, tangents)
            total += torch.cat([h.reshape(-1) for h in products]).to(torch.float64)
        return total

    def release(self) -> None:
        """Drop the cached gradient graph."""
        self._grads = None


@dataclass
class EigenEstimate:
    """λ_max with what it cost and how far to trust it.

    ``residual`` is ‖H v − λ v‖ for the returned unit vector v (the Lanczos Ritz
    residual β_k·|s_k|, which equals the true residual in exact arithmetic);
    ``lambda_2`` is the second Ritz value, so λ1/λ2 near 1 warns of a small gap.
    """

    lambda_max: float
    vector: torch.Tensor
    hvp_count: int
    residual: float
    converged: bool
    lambda_2: float = math.nan


def lanczos_top_eigen(
    operator: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    max_iter: int = 50,
    tol: float = 1e-3,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> EigenEstimate:
    """Estimate the largest algebraic eigenvalue of a symmetric operator by Lanczos.

    Every new Lanczos vector is reorthogonalized against all previous ones (twice),
    so no spurious copies of converged eigenvalues appear. The iteration stops when
    the Ritz residual of the top Ritz pair is at most ``tol``·|λ|, or after
    ``max_iter`` products; ``converged`` says which. ``start`` (for example the
    previous estimate's eigenvector) seeds the Krylov space; without it a Gaussian
    vector is drawn from ``generator``.
    """
    if max_iter < 1:
        raise ValueError(f"invalid max_iter={max_iter}: expected an integer >= 1")
    if start is None:
        start = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
    q = start.to(device=device, dtype=torch.float64)
    norm = q.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the start vector of Lanczos must be finite and non-zero")
    steps = min(max_iter, dim)
    basis = torch.zeros(steps, dim, dtype=torch.float64, device=device)
    basis[0] = q / norm
    alphas: list[float] = []
    betas: list[float] = []
    theta, ritz, residual, converged = math.nan, None, math.inf, False
    for j in range(steps):
        w = operator(basis[j])
        alpha = torch.dot(basis[j], w)
        w = w - alpha * basis[j]
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        for _ in range(2):  # full reorthogonalization, twice for stability
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = w.norm().item()
        alphas.append(alpha.item())

        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        theta, ritz = values[-1].item(), vectors[:, -1]
        lambda_2 = values[-2].item() if len(values) > 1 else math.nan
        residual = beta * abs(ritz[-1].item())
        scale = max(abs(theta), torch.finfo(torch.float64).tiny)
        if residual <= tol * scale or beta <= 1e-10 * scale or j + 1 == dim:
            converged = True
            break
        if j + 1 < steps:
            basis[j + 1] = w / beta
            betas.append(beta)
    used = len(alphas)
    vector = basis[:used].T @ ritz.to(device)
    vector = vector / vector.norm()
    return EigenEstimate(theta, vector, used, residual, converged, lambda_2)


def top_eigenvalue(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_iter: int = 50,
    tol: float = 1e-3,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    warn: bool = True,
) -> EigenEstimate:
    """Estimate λ_max of the loss Hessian on one batch, in the model's current mode."""
    operator = HessianOperator(model, loss_fn, inputs, targets, chunk_size=chunk_size)
    device = operator.params[0].device
    try:
        estimate = lanczos_top_eigen(operator, operator.dim, max_iter, tol, start, generator, device)
    finally:
        operator.release()
    if warn and not estimate.converged:
        warnings.warn(
            f"λ_max estimate {estimate.lambda_max:.6g} did not converge in {estimate.hvp_count} "
            f"Hessian-vector products (residual {estimate.residual:.3g}, tolerance {tol}·|λ|); "
            "raise max_iter to trust it",
            RuntimeWarning,
            stacklevel=2,
        )
    return estimate
