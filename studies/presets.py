"""Named study presets, ordered by cost: ``quick`` (CPU minutes) then ``paper`` (GPU hours).

``paper`` follows the depth-scaling protocol of the δ-GClip analysis (CIFAR-10,
CIFAR-ResNets 8/20/32/44/50, 100 epochs, batch 128, η = 0.1 decayed x0.1 after
epoch 80, SGD with momentum 0.9 and weight decay 5e-4, γ = 0.1).

``quick`` runs the same comparison on scikit-learn's digits in a few minutes on two
CPU cores. γ stays 0.1: on digits the mini-batch gradient norm of these ResNets is
mostly between 0.1 and 10, so γ/‖g‖ lies between 0.01 and 1. The floor δ = 0.01 then
almost never binds, while δ = 0.2 and δ = 0.9 bind in most epochs, which shows the
floor both inactive and active, as in the CIFAR-10 study.

The ``width`` study is the depth study's protocol over width multipliers k of the
CIFAR-ResNet (16k, 32k, 64k channels). The ``delta`` study trains ResNet-18 (adapted
to 32x32 inputs) with SGD, Adam, GClip and δ-GClip over the δ sweep: 200 epochs,
batch 128, η = 0.1 for SGD and the clipped methods and 1e-3 for Adam, decayed x0.1
after epochs 100 and 150, weight decay 5e-4, γ = 0.1. Their ``quick`` presets run the
same comparisons on digits with fewer widths, δ values and epochs.

The ``sharpness`` study repeats the edge-of-stability experiment of Cohen et al.
(2021, "Gradient descent on neural networks typically occurs at the edge of
stability"): full-batch gradient descent on a fixed training subset with a tanh MLP
and the squared loss, at several step sizes, with λ_max of the full-batch loss
measured every few steps. Its ``quick`` preset uses 1,000 digits images; at the
default PyTorch initialization λ_max starts near 19, below every 2/η of the preset
(25 to 40), so each run first sharpens and then hovers at 2/η.
"""

from __future__ import annotations

from typing import Any

from studies.config import RunConfig, StudyConfig

# Shared by the width and δ-sweep protocols. NOTE: the ResNet-18 protocol's text gives
# γ = 1.0 but its hyperparameter table gives 0.1. 0.1 is used: with γ = 1.0 the floor
# δ = 0.03 could bind only for ‖g‖ > 33, yet the reported runs show it active for 61 epochs.
SGD_PROTOCOL = dict(batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, gamma=0.1)
PAPER_DELTAS = (0.01, 0.03, 0.08, 0.2, 0.45, 0.9)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "depth": {
        "quick": {
            "depths": (8, 14, 20),
            "methods": ("sgd", "gclip", "dgclip"),
            "deltas": (0.01, 0.2, 0.9),
            "base": dict(
                dataset="digits",
                epochs=16,
                milestones=(12,),
                batch_size=128,
                lr=0.1,
                momentum=0.9,
                weight_decay=5e-4,
                gamma=0.1,
                sharpness_every=2,
                sharpness_batch=256,
                sharpness_max_iter=30,
                sharpness_tol=1e-2,
            ),
        },
        "paper": {
            "depths": (8, 20, 32, 44, 50),
            "methods": ("gclip", "dgclip"),
            "deltas": (0.01, 0.03, 0.08, 0.2, 0.45, 0.9),
            "base": dict(
                dataset="cifar10",
                epochs=100,
                milestones=(80,),
                batch_size=128,
                lr=0.1,
                momentum=0.9,
                weight_decay=5e-4,
                gamma=0.1,
                sharpness_every=5,
                sharpness_batch=1024,
                sharpness_max_iter=50,
                sharpness_tol=1e-3,
            ),
        },
    },
    "width": {
        "quick": {
            "widths": (1, 2, 4),
            "methods": ("gclip", "dgclip"),
            "deltas": (0.01, 0.2, 0.9),
            "base": dict(
                SGD_PROTOCOL, dataset="digits", depth=8, epochs=12, milestones=(9,), sharpness_every=0,
                sharpness_batch=256, sharpness_max_iter=30, sharpness_tol=1e-2,
            ),
        },
        "paper": {
            "widths": (1, 2, 4, 8, 10),
            "methods": ("gclip", "dgclip"),
            "deltas": PAPER_DELTAS,
            # NOTE: the width-scaling protocol does not state the depth; 20 is an assumption.
            "base": dict(
                SGD_PROTOCOL, dataset="cifar10", depth=20, epochs=100, milestones=(80,), sharpness_every=10,
                sharpness_batch=1024, sharpness_max_iter=50, sharpness_tol=1e-3,
            ),
        },
    },
    "delta": {
        "quick": {
            "methods": ("sgd", "adam", "gclip", "dgclip"),
            "deltas": (0.01, 0.2, 0.9),
            "adam_lr": 1e-3,
            "base": dict(
                SGD_PROTOCOL, model="resnet18", depth=18, dataset="digits", epochs=6, milestones=(3, 5),
                sharpness_every=0, sharpness_batch=128, sharpness_max_iter=20, sharpness_tol=1e-2,
            ),
        },
        "paper": {
            "methods": ("sgd", "adam", "gclip", "dgclip"),
            "deltas": PAPER_DELTAS,
            "adam_lr": 1e-3,
            "base": dict(
                SGD_PROTOCOL, model="resnet18", depth=18, dataset="cifar10", epochs=200, milestones=(100, 150),
                sharpness_every=10, sharpness_batch=1024, sharpness_max_iter=50, sharpness_tol=1e-3,
            ),
        },
    },
    "sharpness": {
        "quick": {
            "methods": ("sgd",),
            "lrs": (0.05, 0.065, 0.08),
            "base": dict(
                model="mlp",
                hidden=(200, 200),
                activation="tanh",
                loss="mse",
                dataset="digits",
                train_subset=1000,
                batch_size=1000,
                epochs=1500,
                momentum=0.0,
                weight_decay=0.0,
                sharpness_every=0,
                sharpness_every_steps=25,
                sharpness_batch=1000,
                sharpness_max_iter=40,
                sharpness_tol=1e-3,
                log_every=250,
            ),
        },
        "paper": {
            # NOTE: step sizes follow the 2/η = 30..90 range of Cohen et al.'s CIFAR-5k
            # MLP runs; this preset has not been run to completion here.
            "methods": ("sgd",),
            "lrs": (2 / 30, 2 / 60, 2 / 90),
            "base": dict(
                model="mlp",
                hidden=(200, 200),
                activation="tanh",
                loss="mse",
                dataset="cifar10",
                train_subset=5000,
                batch_size=5000,
                epochs=10000,
                momentum=0.0,
                weight_decay=0.0,
                sharpness_every=0,
                sharpness_every_steps=50,
                sharpness_batch=5000,
                sharpness_max_iter=50,
                sharpness_tol=1e-3,
                log_every=500,
            ),
        },
    },
}


def preset_names(study: str) -> list[str]:
    return list(PRESETS.get(study, {}))


def build_study(study: str, preset: str, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Build a study from a preset, then apply ``overrides`` (grid keys or run fields).

    Raises ValueError for an unknown study or preset, naming the known ones, and for
    any value a run config rejects.
    """
    if study not in PRESETS:
        raise ValueError(f"unknown study {study!r}: known studies are {sorted(PRESETS)}")
    if preset not in PRESETS[study]:
        raise ValueError(f"unknown preset {preset!r} for study {study!r}: known presets are {preset_names(study)}")
    spec = PRESETS[study][preset]
    overrides = dict(overrides or {})
    grid = {key: overrides.pop(key, spec.get(key)) for key in ("depths", "widths", "methods", "deltas", "lrs")}
    for delta in grid["deltas"] or ():  # checked here too, because runs check δ only when the grid has dgclip
        if not (isinstance(delta, (int, float)) and 0 <= delta <= 1):
            raise ValueError(f"invalid delta={delta!r}: expected a number in [0, 1] (the floor δ of δ-GClip)")
    adam_lr = overrides.pop("adam_lr", spec.get("adam_lr", 1e-3))
    base = RunConfig(study=study, **{**spec["base"], **overrides})
    return StudyConfig(
        name=study,
        base=base,
        depths=tuple(grid["depths"] or (base.depth,)),
        widths=tuple(grid["widths"] or (base.width,)),
        methods=tuple(grid["methods"] or ("gclip", "dgclip")),
        deltas=tuple(grid["deltas"] or (0.2,)),
        lrs=tuple(grid["lrs"] or ()),
        preset=preset,
        adam_lr=adam_lr,
    )
