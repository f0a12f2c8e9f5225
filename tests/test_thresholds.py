"""Stability thresholds against the edge that torch's own optimizers show on a 1-D quadratic."""

import logging
import math

import pytest
import torch
from torch import nn

from dynamics.data import TensorLoader
from dynamics.trainer import TrainConfig, Trainer
from probes import SharpnessProbe, stability_thresholds


def _final_size(curvature: float, lr: float, **sgd) -> float:
    """Run torch.optim.SGD for 2000 steps on f(x) = curvature·x²/2 from x = 1 and return |x|."""
    x = torch.ones(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([x], lr=lr, **sgd)
    for _ in range(2000):
        optimizer.zero_grad()
        (0.5 * curvature * x.square()).sum().backward()
        optimizer.step()
    return x.abs().item()


@pytest.mark.parametrize("sgd, kind", [
    ({}, "2/h"),
    ({"momentum": 0.9}, "(2+2β)/h"),
    ({"momentum": 0.9, "dampening": 0.5}, "(2+2β)/(h(1-d))"),
    ({"momentum": 0.9, "nesterov": True}, "(2+2β)/(h(1+2β))"),
    ({"momentum": 0.5, "nesterov": True}, "(2+2β)/(h(1+2β))"),
])
def test_threshold_is_the_edge_of_torch_sgd(sgd, kind):
    """SGD converges 2% below the threshold and diverges 2% above it. Nesterov and dampened
    SGD used to get the heavy-ball edge (2+2β)/h: 38 at h = 0.1 and β = 0.9, where
    Nesterov's edge is 13.6 and the dampened one's 76."""
    lr = 0.1
    thresholds = stability_thresholds(lr, sgd.get("momentum", 0.0), sgd.get("nesterov", False),
                                      sgd.get("dampening", 0.0))
    assert _final_size(0.98 * thresholds[kind], lr, **sgd) < 1e-6
    assert _final_size(1.02 * thresholds[kind], lr, **sgd) > 1e6


def test_skipped_step_keeps_every_kind():
    """A step size of 0 (a skipped step) used to drop the momentum row."""
    assert stability_thresholds(0.0, 0.9) == {"2/h": math.inf, "(2+2β)/h": math.inf}


def _train_with_probe(optimizer_class, caplog, probe_momentum=0.0, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    inputs, targets = torch.randn(32, 4), torch.randint(0, 3, (32,))
    optimizer = optimizer_class(model.parameters(), lr=0.05, **options)
    probe = SharpnessProbe(inputs, targets, momentum=probe_momentum)
    with caplog.at_level(logging.WARNING, logger="probes.sharpness"):
        result = Trainer(model, nn.CrossEntropyLoss(), TensorLoader(inputs, targets, 16), TensorLoader(inputs, targets, 16),
                         optimizer, TrainConfig(1, progress=False), [probe]).fit()
    return {row["threshold_kind"]: row["threshold"] for row in result.recorder.rows("sharpness")}


def test_probe_reads_momentum_from_the_optimizer(caplog):
    """The probe used its constructor's momentum (0 by default), so SGD with momentum 0.9 got
    only a 2/h row, and Nesterov SGD the heavy-ball edge."""
    rows = _train_with_probe(torch.optim.SGD, caplog, momentum=0.9)
    assert rows == pytest.approx({"2/h": 40.0, "(2+2β)/h": 76.0})
    rows = _train_with_probe(torch.optim.SGD, caplog, probe_momentum=0.5, momentum=0.9, nesterov=True)
    assert rows == pytest.approx({"2/h": 40.0, "(2+2β)/(h(1+2β))": 76.0 / 2.8})
    assert "differs from the optimizer's β=0.9" in caplog.text


def test_probe_warns_for_unknown_optimizer(caplog):
    rows = _train_with_probe(torch.optim.RMSprop, caplog)
    assert set(rows) == {"2/h"}
    assert "knows no stability threshold for RMSprop" in caplog.text



def _warnings_with_groups(caplog, make_groups) -> str:
    """Train one epoch over the groups that ``make_groups(model)`` returns and return the probe's warnings.

    The optimizer is Adam when a group sets ``betas``, else SGD.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    inputs, targets = torch.randn(32, 4), torch.randint(0, 3, (32,))
    groups = make_groups(model)
    optimizer_class = torch.optim.Adam if any("betas" in group for group in groups) else torch.optim.SGD
    optimizer = optimizer_class(groups, lr=0.05)
    loader = TensorLoader(inputs, targets, 16)
    with caplog.at_level(logging.WARNING, logger="probes.sharpness"):
        Trainer(model, nn.CrossEntropyLoss(), loader, loader, optimizer, TrainConfig(1, progress=False),
                [SharpnessProbe(inputs, targets)]).fit()
    return caplog.text


def test_probe_warns_for_differing_groups(caplog):
    """Groups with other step sizes got the first group's thresholds without a word."""
    text = _warnings_with_groups(caplog, lambda model: [{"params": model[0].parameters(), "lr": 0.01},
                                                        {"params": model[2].parameters()}])
    assert "param_groups differ in lr [0.01, 0.05]; the thresholds use the first group's" in text


def _by_dimension(model):
    """Return a weight group with weight decay and a bias group without, the usual split."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    return [{"params": weights, "weight_decay": 5e-4}, {"params": biases}]


def _frozen_group(model):
    """Return the trained parameters, and a frozen layer in a group of step size 0."""
    model[0].requires_grad_(False)
    return [{"params": model[2].parameters()}, {"params": model[0].parameters(), "lr": 0.0}]


def _list_betas(model):
    return [{"params": model[0].parameters(), "betas": [0.9, 0.999]}, {"params": model[2].parameters()}]


def _frozen_first(model):
    """Return a frozen layer in a first group with another step size, and the trained parameters."""
    model[0].requires_grad_(False)
    return [{"params": model[0].parameters(), "lr": 0.5}, {"params": model[2].parameters()}]


def test_probe_warns_for_frozen_first_group(caplog):
    """The thresholds come from the first group even when it is frozen, so its step size must match."""
    assert "param_groups differ in lr [0.5, 0.05]" in _warnings_with_groups(caplog, _frozen_first)


def _tensor_lr(model):
    return [{"params": model[0].parameters(), "lr": torch.tensor(0.05)}, {"params": model[2].parameters()}]


@pytest.mark.parametrize("make_groups", [_by_dimension, _frozen_group, _list_betas, _tensor_lr])
def test_probe_quiet_for_equal_groups(caplog, make_groups):
    """Groups that differ only in weight decay share one threshold. A frozen group (no row
    of the Hessian), betas written as a list, and a float32 tensor step size of 0.05
    against the float 0.05 used to get the warning."""
    assert "param_groups differ" not in _warnings_with_groups(caplog, make_groups)


def test_probe_warns_once_across_resume(caplog):
    """The warning flags were not in the probe's state_dict, so a resumed run warned again."""
    first = SharpnessProbe(torch.randn(4, 4), torch.randint(0, 3, (4,)))
    first._warned_groups = first._warned_momentum = first._warned_stateless = True
    resumed = SharpnessProbe(torch.randn(4, 4), torch.randint(0, 3, (4,)))
    resumed.load_state_dict(first.state_dict())
    assert resumed._warned_groups
    assert resumed._warned_momentum
    assert resumed._warned_stateless
