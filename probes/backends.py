"""The ``pyhessian`` backend, wrapped so that it leaves the model as it found it.

pyhessian (Yao et al., 2020) switches the model to eval mode, fills ``.grad`` through
``loss.backward(create_graph=True)``, draws its start vector from the global RNG and
returns the eigenvalue of largest magnitude from power iteration. The wrapper
restores mode, buffers, ``.grad`` and the RNG, and counts the Hessian-vector products.
A negative value is that largest-magnitude eigenvalue, not λ_max, so the wrapper marks
it unconverged and logs a warning.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch
from torch import nn

from probes.hessian import EigenEstimate
from probes.state import preserved_model_state

log = logging.getLogger(__name__)


def pyhessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_iter: int = 100,
    tol: float = 1e-3,
) -> EigenEstimate:
    """Return pyhessian's top eigenvalue (BatchNorm in eval mode, as pyhessian does).

    pyhessian stops when the value changes by less than ``tol`` between iterations,
    which can happen well before it is within ``tol`` of λ_max when λ1/λ2 is near 1.
    So one more product on its vector gives ``residual`` = ‖Hv − θv‖, and ``converged``
    follows the same rule as :func:`probes.hessian.lanczos`: residual ≤ ``tol``·|θ|.
    ``hvp_count`` includes that product. pyhessian's power iteration
    finds the eigenvalue of largest magnitude, which is λ_max only when it is positive.
    A negative value is returned as it is, with ``converged=False`` and a logged warning.
    """
    try:
        import sys

        import pyhessian

        # pyhessian's package namespace re-exports the class ``hessian`` under the
        # module's own name, so the module is taken from sys.modules.
        pyhessian_hessian = sys.modules["pyhessian.hessian"]
    except ImportError as error:
        raise ImportError("the pyhessian backend needs the pyhessian package: pip install pyhessian") from error

    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    count = 0
    original_product = pyhessian_hessian.hessian_vector_product

    def counting_product(*args, **kwargs):
        nonlocal count
        count += 1
        return original_product(*args, **kwargs)

    with preserved_model_state(model, loss_fn):
        for p in params:
            p.grad = None
        pyhessian_hessian.hessian_vector_product = counting_product
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                engine = pyhessian.hessian(model, loss_fn, data=(inputs, targets), cuda=inputs.is_cuda)
                values, vectors = engine.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
                # One more product gives the residual, which pyhessian's relative-change rule never checks.
                product = counting_product(engine.gradsH, engine.params, vectors[0])
        finally:
            pyhessian_hessian.hessian_vector_product = original_product
            for p, grad in zip(params, saved_grads):
                p.grad = grad
    vector = torch.cat([v.reshape(-1) for v in vectors[0]]).to(torch.float64)
    value = float(values[0])
    hv = torch.cat([p.reshape(-1) for p in product]).to(torch.float64)
    residual = (hv - value * vector).norm().item()
    converged = residual <= tol * abs(value)
    if value < 0:
        log.warning(
            "pyhessian returned %.6g, the eigenvalue of largest magnitude, which is not λ_max when negative; "
            "marked converged=False. Use backend='ours' for λ_max", value,
        )
        converged = False
    return EigenEstimate(value, vector, count, residual, converged, method="pyhessian/power")
