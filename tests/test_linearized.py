"""Forward-over-reverse products with the primal pass done once per solve (probes.linearized)."""

import logging

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import probes.linearized as linearized
from probes import HessianOperator
from probes.hessian import solve_mode
from test_sharpness_engine import BatchNormCNN


class BranchOnValue(BatchNormCNN):
    """A model whose Python control flow reads a tensor value: a trace would freeze the branch."""

    def forward(self, x):
        scale = 2.0 if x.mean() > 0 else 0.5
        return super().forward(x * scale)


def _problem(model_class=BatchNormCNN):
    torch.manual_seed(0)
    return model_class().train(), torch.randn(24, 1, 8, 8), torch.randint(0, 3, (24,))


def _dense(model, loss_fn, inputs, targets):
    """Return (gradient, Hessian) of the loss at the current parameters, in float64.

    By ``torch.autograd.functional`` (reverse over reverse), independent of the
    forward-mode path under test. (``torch.func.hessian`` disagrees with finite
    differences on train-mode BatchNorm in torch 2.13, so it is not the reference.)
    """
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def loss_of(flat):
        pieces = torch.split(flat, [p.numel() for p in params])
        state = {name: piece.view_as(p) for name, piece, p in zip(names, pieces, params)}
        return loss_fn(torch.func.functional_call(model, state, (inputs,)), targets)

    flat = torch.cat([p.reshape(-1) for p in params]).double()
    model.double()
    try:
        flat.requires_grad_(True)
        gradient = torch.autograd.grad(loss_of(flat), flat)[0]
        return gradient, torch.autograd.functional.hessian(loss_of, flat.detach())
    finally:
        model.float()


@pytest.mark.parametrize("train_mode", [True, False])
def test_split_product_matches_dense(train_mode):
    """The split product equals H·v from the dense Hessian, and its gradient equals ∇L, in both BatchNorm modes."""
    model, inputs, targets = _problem()
    model.train(train_mode)
    loss_fn = nn.CrossEntropyLoss()
    with solve_mode(model):
        gradient, hessian = _dense(model, loss_fn, inputs.double(), targets)
        operator = HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")
        vector = torch.randn(operator.dim, dtype=torch.float64)
        product = operator(vector)
        found_gradient = operator.gradient()
    assert operator.split_fallback_reason == ""
    torch.testing.assert_close(product, hessian @ vector, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(found_gradient, gradient, rtol=1e-4, atol=1e-6)


def test_split_traced_once_per_signature(monkeypatch):
    """A second solve after an optimizer step reuses the trace and uses the new parameters.
    A change of module mode traces again."""
    traces = []
    original = linearized.split_product
    monkeypatch.setattr(linearized, "split_product", lambda *args: traces.append(1) or original(*args))
    model, inputs, targets = _problem()
    loss_fn = nn.CrossEntropyLoss()
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        with solve_mode(model):
            product = HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")(vector)
            _, hessian = _dense(model, loss_fn, inputs.double(), targets)
        torch.testing.assert_close(product, hessian @ vector, rtol=1e-4, atol=1e-4)
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    assert len(traces) == 1
    model.eval()
    with solve_mode(model):
        HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")(vector)
    assert len(traces) == 2


def test_value_branching_model_falls_back(caplog):
    """A model that branches on a tensor value is not traced, the reason is logged, and the
    plain torch.func product still equals the dense one."""
    model, inputs, targets = _problem(BranchOnValue)
    loss_fn = nn.CrossEntropyLoss()
    with caplog.at_level(logging.INFO, logger="probes.hessian"), solve_mode(model):
        operator = HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")
        vector = torch.randn(operator.dim, dtype=torch.float64)
        product = operator(vector)
        _, hessian = _dense(model, loss_fn, inputs.double(), targets)
    assert "tensor value" in operator.split_fallback_reason
    assert "recompute the primal pass" in caplog.text
    torch.testing.assert_close(product, hessian @ vector, rtol=1e-4, atol=1e-4)


def test_identity_copies_bypassed():
    """Same-dtype ``_to_copy`` and same-shape ``expand`` nodes are bypassed; a real dtype
    conversion and a copy written to in place stay."""
    aten = torch.ops.aten

    def function(x):
        same = aten._to_copy(x, dtype=torch.float32) * 2
        wider = aten._to_copy(x, dtype=torch.float64)
        written = aten._to_copy(x, dtype=torch.float32)
        written.add_(1)
        return same + aten.expand(x, [3, 4]), wider, written

    x = torch.randn(3, 4)
    graph_module = make_fx(function)(x)
    expected = graph_module(x)
    assert linearized._drop_identity_copies(graph_module.graph) == 2
    graph_module.recompile()
    remaining = [node for node in graph_module.graph.nodes if linearized._packet_name(node) == "_to_copy"]
    assert len(remaining) == 2
    for found, value in zip(graph_module(x), expected):
        torch.testing.assert_close(found, value)
