"""Train a CIFAR-ResNet with DDP, δ-GClip and the probes; launch with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --out ddp-frames

Every rank trains on its shard of each epoch (``TensorLoader(rank=..., world_size=...)``)
and DDP averages the gradients. δ-GClip takes ‖g‖ of the averaged gradient, the same
on every rank. The sharpness probe all-reduces its Hessian-vector products over the
ranks' parts of the sharpness batch, and rank 0 writes the frames. The script uses the
digits data, so it runs on CPUs (gloo) as well as GPUs (nccl).
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from dynamics import CifarResNet, DeltaGClip, TensorLoader, TrainConfig, Trainer, load_dataset
from probes import ClipActivityProbe, GradNormProbe, SharpnessProbe, UpdateMagnitudeProbe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ddp-frames", help="directory for the frames (written by rank 0)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if backend == "nccl" else torch.device("cpu")

    data = load_dataset("digits").to(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = CifarResNet(8, in_channels=data.in_channels).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if backend == "nccl" else None)
    optimizer = DeltaGClip(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
                           gamma=0.1, delta=0.2)
    train = TensorLoader(data.train_x, data.train_y, 64, shuffle=True, seed=0, rank=rank, world_size=world)
    test = TensorLoader(data.test_x, data.test_y, 512)
    sharpness_x, sharpness_y = data.train_x[:256], data.train_y[:256]
    part = slice(rank * 256 // world, (rank + 1) * 256 // world)
    probes = [GradNormProbe(), ClipActivityProbe(), UpdateMagnitudeProbe(),
              SharpnessProbe(sharpness_x[part], sharpness_y[part], every_epochs=1, momentum=0.9, max_iter=20)]
    trainer = Trainer(ddp, nn.CrossEntropyLoss(), train, test, optimizer, TrainConfig(epochs=args.epochs), probes,
                      device, run_id=f"ddp-{world}")
    trainer.fit()
    for path in trainer.session.write(args.out):
        print(f"rank {rank} wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
