"""Measurements that attach to a training run as :class:`dynamics.events.Callback` objects."""

from probes.gradients import ClipActivityProbe, GradNormProbe, UpdateMagnitudeProbe, log_bins
from probes.backends import pyhessian_top_eigenvalue
from probes.hessian import (
    EigenEstimate,
    HessianOperator,
    HessianUnsupportedError,
    hutchinson_trace,
    lanczos,
    lanczos_top_eigen,
    power_iteration,
    refined_lower_bound,
    top_eigenvalue,
)
from probes.sharpness import SharpnessProbe
from probes.spread import sharpness_spread
from probes.state import preserved_model_state
from probes.thresholds import adam_preconditioner, adam_threshold, eos_deviation, stability_thresholds

__all__ = [
    "ClipActivityProbe",
    "EigenEstimate",
    "GradNormProbe",
    "HessianOperator",
    "HessianUnsupportedError",
    "SharpnessProbe",
    "UpdateMagnitudeProbe",
    "adam_preconditioner",
    "adam_threshold",
    "eos_deviation",
    "hutchinson_trace",
    "lanczos",
    "lanczos_top_eigen",
    "log_bins",
    "power_iteration",
    "refined_lower_bound",
    "preserved_model_state",
    "pyhessian_top_eigenvalue",
    "sharpness_spread",
    "stability_thresholds",
    "top_eigenvalue",
]
