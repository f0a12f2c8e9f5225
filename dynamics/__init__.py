"""Optimizers (δ-GClip, GClip, δ warm-up), the trainer, models and datasets."""

from dynamics.clipping import DeltaGClip, DeltaWarmup, StepMeasurement, clip_factor, global_grad_norm, measure_step
from dynamics.data import DatasetError, ImageDataset, TensorLoader, load_dataset
from dynamics.events import Callback, Recorder, TrainState
from dynamics.models import CifarResNet, build_model, check_depth
from dynamics.trainer import DivergenceError, TrainConfig, Trainer, TrainResult, select_device

__all__ = [
    "Callback",
    "CifarResNet",
    "DatasetError",
    "DeltaGClip",
    "DeltaWarmup",
    "DivergenceError",
    "ImageDataset",
    "Recorder",
    "StepMeasurement",
    "TensorLoader",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "build_model",
    "check_depth",
    "clip_factor",
    "global_grad_norm",
    "load_dataset",
    "measure_step",
    "select_device",
]
