"""Named study presets, ordered by cost: ``quick`` (CPU minutes) then ``paper`` (GPU hours).

``paper`` follows the depth-scaling protocol of the δ-GClip analysis (CIFAR-10,
CIFAR-ResNets 8/20/32/44/50, 100 epochs, batch 128, η = 0.1 decayed x0.1 after
epoch 80, SGD with momentum 0.9 and weight decay 5e-4, γ = 0.1).

``quick`` runs the same comparison on scikit-learn's digits in a few minutes on two
CPU cores. γ stays 0.1: on digits the mini-batch gradient norm of these ResNets is
mostly between 0.1 and 10, so γ/‖g‖ lies between 0.01 and 1. The floor δ = 0.01 then
almost never binds, while δ = 0.2 and δ = 0.9 bind in most epochs, which shows the
floor both inactive and active, as in the CIFAR-10 study.
"""

from __future__ import annotations

from typing import Any

from studies.config import RunConfig, StudyConfig

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
    )
