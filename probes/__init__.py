"""Measurements that attach to a training run as :class:`dynamics.events.Callback` objects."""

from probes.gradients import ClipActivityProbe, GradNormProbe, UpdateMagnitudeProbe, log_bins
from probes.hessian import EigenEstimate, HessianOperator, lanczos_top_eigen, top_eigenvalue
from probes.sharpness import SharpnessProbe, preserved_model_state
from probes.thresholds import eos_deviation, stability_thresholds

__all__ = [
    "ClipActivityProbe",
    "EigenEstimate",
    "GradNormProbe",
    "HessianOperator",
    "SharpnessProbe",
    "UpdateMagnitudeProbe",
    "eos_deviation",
    "lanczos_top_eigen",
    "log_bins",
    "preserved_model_state",
    "stability_thresholds",
    "top_eigenvalue",
]
