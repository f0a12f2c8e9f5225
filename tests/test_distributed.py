"""Two CPU processes over gloo: gradient norms, clip decisions and Hessian-vector products across ranks."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dynamics import global_grad_norm
from probes.hessian import HessianOperator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_setup import batch, make_model, shards, tangent  # noqa: E402

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the two ranks and return their saved results."""
    out = tmp_path_factory.mktemp("gloo")
    store = out / "store"  # a file store: nothing listens on the network
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(store), str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)], out


def test_replicated_norm_equals_single_process(ranks):
    results, _ = ranks
    inputs, targets = batch()
    model = make_model()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    expected = global_grad_norm(model.parameters()).item()
    assert results[0]["replicated_norm"] == pytest.approx(expected, rel=1e-6)
    assert results[0]["replicated_norm"] == results[1]["replicated_norm"]  # the same bits on every rank


def test_sharded_norm_equals_concatenated_norm(ranks):
    results, _ = ranks
    expected = torch.cat(shards()).norm().item()
    assert results[0]["sharded_norm"] == pytest.approx(expected, rel=1e-6)
    assert results[1]["sharded_norm"] == results[0]["sharded_norm"]


def test_all_reduced_hvp_equals_union_product(ranks):
    results, _ = ranks
    inputs, targets = batch()
    operator = HessianOperator(make_model(), nn.functional.cross_entropy, inputs, targets, method="double_backward")
    expected = operator(tangent(operator.dim))
    torch.testing.assert_close(results[0]["hvp"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[1]["hvp"], expected, rtol=1e-5, atol=1e-7)
    assert results[0]["sharpness_batch"] == results[1]["sharpness_batch"] == len(targets)  # the union's size


def test_clip_decisions_identical_on_ranks(ranks):
    results, _ = ranks
    steps = [r["steps"] for r in results]
    assert len(steps[0]) == 4  # 2 epochs x (16 images per rank / batch 8)
    for column in ("loss", "grad_norm", "clip_factor", "effective_lr", "clip_active", "delta_active", "rum"):
        assert [row[column] for row in steps[0]] == [row[column] for row in steps[1]], column
    assert any(row["delta_active"] for row in steps[0])  # the floor binds, so the counters are exercised
    assert results[0]["epochs"] == results[1]["epochs"]


def test_only_rank_zero_writes_frames(ranks):
    results, out = ranks
    assert results[1]["written"] == []
    assert {Path(p).name for p in results[0]["written"]} >= {"steps.parquet", "epochs.parquet"}
    assert (out / "frames" / "steps.parquet").is_file()
