"""Sweeps over depth, width, δ and step size; presets; the run store; the ``eos`` command."""

from studies.config import RunConfig, StudyConfig
from studies.presets import PRESETS, build_study
from studies.store import RunStore

__all__ = ["PRESETS", "RunConfig", "RunStore", "StudyConfig", "build_study"]
