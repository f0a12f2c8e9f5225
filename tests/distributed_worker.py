"""One rank of the two-process gloo checks in test_distributed.py (run as a script, not collected by pytest).

Usage: python distributed_worker.py RANK WORLD_SIZE STORE_FILE OUT_DIR
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dynamics import DeltaGClip, TensorLoader, TrainConfig, Trainer, global_grad_norm  # noqa: E402
from dynamics.session import ProbeSession  # noqa: E402
from distributed_setup import batch, make_model, shards, tangent  # noqa: E402
from probes import ClipActivityProbe, GradNormProbe, SharpnessProbe, UpdateMagnitudeProbe  # noqa: E402
from probes.hessian import HessianOperator  # noqa: E402


def main() -> None:
    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    inputs, targets = batch()
    part = slice(rank * len(targets) // world, (rank + 1) * len(targets) // world)
    results = {}

    # Replicated gradients: DDP averages them, so the local norm is the norm of the mean gradient.
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    nn.functional.cross_entropy(ddp(inputs[part]), targets[part]).backward()
    results["replicated_norm"] = global_grad_norm(model.parameters()).item()

    # Sharded gradients: each rank has a piece of one vector.
    piece = nn.Parameter(torch.zeros_like(shards()[rank]))
    piece.grad = shards()[rank].clone()
    results["sharded_norm"] = global_grad_norm([piece], sharded=True).item()

    # Hessian-vector product of each rank's half, all-reduced into the product of the union.
    model = make_model()
    operator = HessianOperator(model, nn.functional.cross_entropy, inputs[part], targets[part], method="double_backward")
    results["hvp"] = operator(tangent(operator.dim))
    results["sharpness_batch"] = SharpnessProbe(inputs[part], targets[part])._union_batch_size()

    # A few δ-GClip steps under DDP: every rank must record the same clip decisions.
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = DeltaGClip(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), gamma=0.05, delta=0.3)
    train = TensorLoader(inputs, targets, 8, shuffle=True, seed=0, rank=rank, world_size=world)
    test = TensorLoader(inputs, targets, 64)
    probes = [GradNormProbe(), ClipActivityProbe(), UpdateMagnitudeProbe()]
    trainer = Trainer(ddp, nn.CrossEntropyLoss(), train, test, optimizer, TrainConfig(epochs=2, progress=False), probes,
                      run_id="ddp")
    result = trainer.fit()
    results["steps"] = result.recorder.rows("steps")
    results["epochs"] = [{k: v for k, v in row.items() if k != "epoch_time"} for row in result.recorder.rows("epochs")]
    results["written"] = [str(p) for p in trainer.session.write(out / "frames")]
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
