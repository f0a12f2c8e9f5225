"""Stability thresholds that λ_max is compared with.

For gradient descent with step size h on a quadratic, iterates diverge along an
eigendirection whose eigenvalue exceeds 2/h. Heavy-ball momentum β moves that edge
to (2 + 2β)/h. Here h is the step actually taken: for δ-GClip, h_t = η·c_t.

``torch.optim.SGD`` has two variants with other edges. With dampening d the buffer
adds (1 − d)·g, which is heavy ball with step h(1 − d): the edge is (2 + 2β)/(h(1 − d)).
With ``nesterov=True`` the step is h(g + β·b) for the updated buffer b; on a quadratic
the iteration matrix has an eigenvalue −1 at hλ(1 + 2β) = 2 + 2β, so the edge is
(2 + 2β)/(h(1 + 2β)): 2/h at β = 0, and 38/(28h) at β = 0.9.
"""

from __future__ import annotations

import math


def stability_thresholds(effective_lr: float, momentum: float = 0.0, nesterov: bool = False,
                         dampening: float = 0.0) -> dict[str, float]:
    """Return the thresholds keyed by kind: ``2/h`` always, and when β > 0 the momentum edge.

    The momentum kind is ``(2+2β)/h`` for heavy ball, ``(2+2β)/(h(1-d))`` with dampening
    d > 0 and ``(2+2β)/(h(1+2β))`` for Nesterov, as ``torch.optim.SGD`` defines them (see
    the module docstring). Every momentum kind starts with "(2+2β)/". A step size h ≤ 0
    (a skipped step) gives every kind the value inf.
    """
    kind = "(2+2β)/h"
    factor = 1.0
    if nesterov:
        kind, factor = "(2+2β)/(h(1+2β))", 1.0 + 2.0 * momentum
    elif dampening:
        kind, factor = "(2+2β)/(h(1-d))", 1.0 - dampening
    thresholds = {"2/h": 2.0 / effective_lr if effective_lr > 0 else math.inf}
    if momentum > 0:
        # Dampening 1 adds no gradient to the buffer: no edge at all.
        thresholds[kind] = (2.0 + 2.0 * momentum) / (effective_lr * factor) if effective_lr * factor > 0 else math.inf
    return thresholds


def eos_deviation(lambda_max: float, threshold: float) -> float:
    """Return |λ_max − threshold|, the distance from the edge of stability."""
    return abs(lambda_max - threshold)


def adam_threshold(effective_lr: float, beta1: float) -> float:
    """Return (2 + 2β1) / (h(1 − β1)), the edge for Adam's preconditioned sharpness.

    Adam with momentum β1 on a quadratic is stable along an eigendirection of
    P^-1/2 H P^-1/2 below this value (Cohen et al., 2022, "Adaptive gradient methods
    at the edge of stability"); at β1 = 0.9 it is 38/h.
    """
    if not effective_lr > 0:
        return math.inf
    return (2.0 + 2.0 * beta1) / (effective_lr * (1.0 - beta1))


def adam_preconditioner(optimizer, params) -> "torch.Tensor | None":
    """Return the flat diagonal of Adam's P = sqrt(v̂) + ε for ``params``, or None before any step.

    v̂ is the bias-corrected second moment ``exp_avg_sq / (1 − β2^t)`` read from the
    optimizer's own state, with its own ε, as the next Adam step would use it. In a
    group with ``amsgrad=True``, v̂ is ``max_exp_avg_sq / (1 − β2^t)``, because AMSGrad
    divides by the running maximum of the second moment.

    Raises ValueError for a parameter that is in none of the optimizer's ``param_groups``.
    """
    import torch

    pieces = []
    for index, p in enumerate(params):
        group = _param_group(optimizer, p, index)
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        step = float(state["step"])
        beta2, eps = group["betas"][1], group["eps"]
        moment = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        second = moment / (1.0 - beta2**step)
        pieces.append((second.sqrt() + eps).reshape(-1).to(torch.float64))
    return torch.cat(pieces)


def _param_group(optimizer, param, index: int) -> dict:
    """Return the parameter group of ``optimizer`` that contains ``param`` (``params[index]``)."""
    for group in optimizer.param_groups:
        if any(q is param for q in group["params"]):
            return group
    raise ValueError(
        f"params[{index}] (shape {tuple(param.shape)}) is not in the optimizer's param_groups, so the optimizer "
        "has no second moment for it. Pass only parameters that the optimizer updates"
    )
