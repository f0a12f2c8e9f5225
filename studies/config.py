"""Typed configuration of one training run and of a study (a grid of runs)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dynamics.data import DATASETS
from dynamics.losses import LOSSES
from dynamics.models import MODELS, check_depth

METHODS = ("sgd", "gclip", "dgclip")
# A study grid may also name "adam": bare Adam at the study's ``adam_lr`` (method "sgd", optimizer "adam").
GRID_METHODS = ("sgd", "adam", "gclip", "dgclip")
OPTIMIZERS = ("sgd", "adam", "adamw")


def format_number(value: float) -> str:
    """Format a hyperparameter for run ids: 0.2 -> '0.2', 1e-05 -> '1e-05'."""
    return f"{value:g}"


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run; equal configs give equal frames (CPU).

    ``method`` is ``sgd`` (the bare optimizer), ``gclip`` (δ-GClip with δ = 0) or
    ``dgclip`` (δ-GClip with floor ``delta``); ``sgd`` with ``optimizer="adam"`` is bare
    Adam. ``lr`` is η before the step schedule;
    ``milestones`` are epochs after which η is multiplied by ``lr_factor``. The
    sharpness probe measures λ_max every ``sharpness_every`` epochs (0: only after the
    last) and every ``sharpness_every_steps`` optimizer steps (0: never) on a fixed
    batch of ``sharpness_batch`` training images. ``train_subset`` > 0 trains on that
    many training images (a fixed subset); a batch size of at least that size makes
    every epoch one full-batch gradient step. ``depth`` and ``width`` apply to
    ``resnet``, ``width`` to ``resnet18`` (which has depth 18), ``hidden`` and
    ``activation`` to ``mlp``.

    ``channels_last``, ``autocast`` (``bf16``: bfloat16 autocast of forward and loss;
    gradients, their norm and the clip decision stay float32) and ``compile``
    (``torch.compile`` of the model) change speed, not the update rule. Each can
    change results by floating-point rounding, because other kernels run.
    """

    study: str = "depth"
    model: str = "resnet"
    depth: int = 20
    width: int = 1
    dataset: str = "digits"
    data_root: str | None = None
    optimizer: str = "sgd"
    method: str = "dgclip"
    delta: float | None = 0.2
    gamma: float = 0.1
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs: int = 20
    milestones: tuple[int, ...] = ()
    lr_factor: float = 0.1
    seed: int = 0
    device: str = "auto"
    sharpness_every: int = 2
    sharpness_batch: int = 256
    sharpness_max_iter: int = 30
    sharpness_tol: float = 1e-2
    sharpness_every_steps: int = 0
    loss: str = "cross_entropy"
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    train_subset: int = 0
    log_every: int = 1
    max_loss: float = math.inf  # a training loss above this marks the run diverged
    nonfinite: str = "skip"  # a gradient with inf or NaN: "skip" the step, or "raise" (the run fails)
    sharpness_hvp: str = "double_backward"  # a fixed path keeps reruns bitwise identical; "auto" times both
    channels_last: bool = False
    autocast: str = "none"  # "none" or "bf16"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.model == "resnet":
            check_depth(self.depth)
        checks = [
            (self.model != "resnet18" or self.depth == 18, "depth", self.depth, "18 for model 'resnet18'"),
            (self.autocast in ("none", "bf16"), "autocast", self.autocast, "'none' or 'bf16'"),
            (self.model in MODELS, "model", self.model, f"one of {list(MODELS)}"),
            (self.loss in LOSSES, "loss", self.loss, f"one of {list(LOSSES)}"),
            (len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "hidden", self.hidden, "widths >= 1"),
            (self.train_subset >= 0, "train_subset", self.train_subset, "an integer >= 0 (0: all)"),
            (self.sharpness_every_steps >= 0, "sharpness_every_steps", self.sharpness_every_steps, "an integer >= 0"),
            (self.log_every >= 1, "log_every", self.log_every, "an integer >= 1"),
            (self.max_loss > 0, "max_loss", self.max_loss, "a number > 0"),
            (self.nonfinite in ("skip", "raise"), "nonfinite", self.nonfinite, "'skip' or 'raise'"),
            (self.sharpness_hvp in ("auto", "double_backward", "forward_over_reverse"), "sharpness_hvp",
             self.sharpness_hvp, "auto, double_backward or forward_over_reverse"),
            (isinstance(self.width, int) and self.width >= 1, "width", self.width, "an integer >= 1"),
            (self.dataset in DATASETS, "dataset", self.dataset, f"one of {list(DATASETS)}"),
            (self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {list(OPTIMIZERS)}"),
            (self.method in METHODS, "method", self.method, f"one of {list(METHODS)}"),
            (_positive(self.gamma), "gamma", self.gamma, "a finite number > 0"),
            (_positive(self.lr), "lr", self.lr, "a finite number > 0"),
            (0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
             "a finite number >= 0"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1"),
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs", self.epochs, "an integer >= 1"),
            (all(1 <= m <= self.epochs for m in self.milestones), "milestones", self.milestones, f"epochs in 1..{self.epochs}"),
            (len(set(self.milestones)) == len(self.milestones), "milestones", self.milestones, "distinct epochs"),
            (0 < self.lr_factor <= 1, "lr_factor", self.lr_factor, "a number in (0, 1]"),
            (self.sharpness_every >= 0, "sharpness_every", self.sharpness_every, "an integer >= 0"),
            (self.sharpness_batch >= 1, "sharpness_batch", self.sharpness_batch, "an integer >= 1"),
            (isinstance(self.sharpness_max_iter, int) and self.sharpness_max_iter >= 1, "sharpness_max_iter",
             self.sharpness_max_iter, "an integer >= 1 (Hessian-vector products per solve)"),
            (isinstance(self.sharpness_tol, (int, float)) and 0 <= self.sharpness_tol < 1, "sharpness_tol",
             self.sharpness_tol, "a number in [0, 1), the relative residual at which a solve stops"),
        ]
        if self.method == "dgclip":
            delta_ok = self.delta is not None and 0 <= self.delta <= 1
            checks.append((delta_ok, "delta", self.delta, "a number in [0, 1] for method 'dgclip'"))
        elif self.delta is not None:
            checks.append((False, "delta", self.delta, f"None for method {self.method!r}"))
        for ok, name, value, expected in checks:
            if not ok:
                raise ValueError(f"invalid {name}={value!r}: expected {expected}")

    @property
    def run_id(self) -> str:
        """Readable, unique within a study: depth, width, method, δ, step size, seed."""
        if self.model == "mlp":
            parts = ["mlp" + "x".join(str(h) for h in self.hidden), self.optimizer, self.method]
        elif self.model == "resnet18":
            parts = ["resnet18", f"w{self.width}", self.optimizer, self.method]
        else:
            parts = [f"d{self.depth}", f"w{self.width}", self.optimizer, self.method]
        if self.method == "dgclip":
            parts.append(f"delta{format_number(self.delta)}")
        parts += [f"lr{format_number(self.lr)}", f"s{self.seed}"]
        return "-".join(parts)

    @property
    def clip_delta(self) -> float | None:
        """δ given to δ-GClip: 0 for GClip, None for the bare optimizer."""
        return {"sgd": None, "gclip": 0.0}.get(self.method, self.delta)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["milestones"] = list(self.milestones)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        data = dict(data)
        data["milestones"] = tuple(data.get("milestones", ()))
        data["hidden"] = tuple(data.get("hidden", (200, 200)))
        return cls(**data)


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class StudyConfig:
    """A grid: every depth x width x method (one ``dgclip`` run per δ) x step size.

    ``base`` contains the settings shared by every run. The method ``adam`` is bare
    Adam at ``adam_lr`` (the step-size grid applies to the other methods).
    """

    name: str
    base: RunConfig
    depths: tuple[int, ...] = (20,)
    widths: tuple[int, ...] = (1,)
    methods: tuple[str, ...] = ("gclip", "dgclip")
    deltas: tuple[float, ...] = (0.2,)
    lrs: tuple[float, ...] = ()
    preset: str = ""
    adam_lr: float = 1e-3
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in GRID_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"invalid methods={list(self.methods)!r}: expected one or more of {list(GRID_METHODS)}")
        if not _positive(self.adam_lr):
            raise ValueError(f"invalid adam_lr={self.adam_lr!r}: expected a finite number > 0")

    def runs(self) -> list[RunConfig]:
        """Expand the grid into run configs, in a fixed order (depth, width, lr, method, δ)."""
        runs = []
        for depth in self.depths:
            for width in self.widths:
                for lr in self.lrs or (self.base.lr,):
                    for method in self.methods:
                        if method == "adam":
                            if lr == (self.lrs or (self.base.lr,))[0]:  # one Adam run per step-size grid
                                runs.append(replace(self.base, study=self.name, depth=depth, width=width,
                                                    lr=self.adam_lr, optimizer="adam", method="sgd", delta=None))
                            continue
                        deltas = self.deltas if method == "dgclip" else (None,)
                        for delta in deltas:
                            runs.append(
                                replace(self.base, study=self.name, depth=depth, width=width, lr=lr, method=method, delta=delta)
                            )
        ids = [run.run_id for run in runs]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"invalid study grid: runs {repeated} appear twice; remove the repeated method or "
                             "optimizer, or step sizes or δ values that agree to 6 significant digits (run ids "
                             "write them that way)")
        return runs

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "preset": self.preset,
            "depths": list(self.depths),
            "widths": list(self.widths),
            "methods": list(self.methods),
            "deltas": list(self.deltas),
            "lrs": list(self.lrs),
            "base": self.base.to_dict(),
        }
        if "adam" in self.methods:  # only then, so study.json of earlier studies still matches on resume
            data["adam_lr"] = self.adam_lr
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudyConfig":
        """Rebuild a study from :meth:`to_dict` output (a study directory's ``study.json``)."""
        return cls(
            name=data["name"], base=RunConfig.from_dict(data["base"]), depths=tuple(data["depths"]),
            widths=tuple(data["widths"]), methods=tuple(data["methods"]), deltas=tuple(data["deltas"]),
            lrs=tuple(data.get("lrs", ())), preset=data.get("preset", ""), adam_lr=data.get("adam_lr", 1e-3),
        )
