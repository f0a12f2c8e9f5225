"""Stability thresholds that λ_max is compared with.

For gradient descent with step size h on a quadratic, iterates diverge along an
eigendirection whose eigenvalue exceeds 2/h. Heavy-ball momentum β moves that edge
to (2 + 2β)/h. Here h is the step actually taken: for δ-GClip, h_t = η·c_t.
"""

from __future__ import annotations

import math


def stability_thresholds(effective_lr: float, momentum: float = 0.0) -> dict[str, float]:
    """Return the thresholds keyed by kind: ``2/h`` always, ``(2+2β)/h`` when β > 0."""
    if not effective_lr > 0:
        return {"2/h": math.inf}
    thresholds = {"2/h": 2.0 / effective_lr}
    if momentum > 0:
        thresholds["(2+2β)/h"] = (2.0 + 2.0 * momentum) / effective_lr
    return thresholds


def eos_deviation(lambda_max: float, threshold: float) -> float:
    """Return |λ_max − threshold|, the distance from the edge of stability."""
    return abs(lambda_max - threshold)
