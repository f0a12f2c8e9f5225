"""Benchmark the trainer against a plain PyTorch loop, and the cost of the cheap probes.

Prints ratios measured side by side in one run (absolute times on a shared machine
mean little), with CIFAR-ResNet-20, batch 128, SGD (momentum 0.9, weight decay 5e-4)
and pad-4 crop plus flip augmentation in both loops:

- images per second of our trainer (``Trainer`` with a ``TensorLoader``, no probes)
  divided by those of a plain loop over a standard ``torch.utils.data.DataLoader``
  whose dataset crops and flips each image in ``__getitem__``;
- the step-time overhead of the cheap probes at their default cadence, as a fraction
  of the step time of the same δ-GClip run without them. The cheap probes run every
  step: gradient norm and histogram, clip and δ counters, and RUM with the measured
  displacement.

Each variant trains the same number of epochs, in turns (A, B, C, A, B, C, ...), and
the median epoch time is compared, so slow phases of a shared machine hit every
variant alike. Test evaluation runs after every epoch in both loops, as in a study.
Epoch times of a shared machine vary by a few percent, more than the probes cost, so
the probe overhead is also measured directly: the time spent inside the probes'
callbacks divided by the training time of the same epochs.

    python benchmarks/trainer.py [--data-root DIR] [--images 2560] [--epochs 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynamics.clipping import DeltaGClip  # noqa: E402
from dynamics.data import TensorLoader, load_cifar10_dataset  # noqa: E402
from dynamics.models import CifarResNet  # noqa: E402
from dynamics.trainer import TrainConfig, Trainer, select_device  # noqa: E402
from probes.gradients import ClipActivityProbe, GradNormProbe, UpdateMagnitudeProbe  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class AugmentedImages(Dataset):
    """uint8 NCHW images, normalized, randomly cropped (pad 4) and flipped per item, as torchvision would."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool) -> None:
        self.x, self.y, self.augment = x, y, augment
        self.mean = torch.tensor(MEAN).view(-1, 1, 1)
        self.std = torch.tensor(STD).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.x[index].float().div(255)
        if self.augment:
            padded = nn.functional.pad(image, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            image = padded[:, top : top + 32, left : left + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(2)
        return (image - self.mean) / self.std, self.y[index]


def make_data(data_root: str | None, images: int) -> tuple[torch.Tensor, ...]:
    """Return uint8 train and test images with labels: real CIFAR-10 when a root is given, else random."""
    if data_root:
        data = load_cifar10_dataset(data_root)
        return data.train_x[:images], data.train_y[:images], data.test_x[:1000], data.test_y[:1000]
    generator = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    test_x = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return (train_x, torch.randint(0, 10, (images,), generator=generator), test_x,
            torch.randint(0, 10, (1000,), generator=generator))


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def plain_epoch(model, optimizer, train, test, device) -> None:
    """Train one epoch the way a hand-written loop does, then run a test pass."""
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for inputs, targets in train:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for inputs, targets in test:
            inputs, targets = inputs.to(device), targets.to(device)
            correct += (model(inputs).argmax(1) == targets).sum().item()
    if device.type == "cuda":
        torch.cuda.synchronize()


class TimedProbe:
    """Forward a probe's events and add the seconds spent in them to ``seconds``."""

    def __init__(self, probe) -> None:
        self.probe = probe
        self.seconds = 0.0

    def __getattr__(self, name: str):
        method = getattr(self.probe, name)
        if not name.startswith(("on_", "after_")):
            return method

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


class Variant:
    """A model, optimizer and loop that can train one more epoch when asked."""

    def __init__(self, name: str, data, device: torch.device, workers: int) -> None:
        self.name, self.device = name, device
        train_x, train_y, test_x, test_y = data
        torch.manual_seed(0)
        self.model = CifarResNet(20).to(device)
        self.times: list[float] = []
        self.probes: list[TimedProbe] = []
        if name == "plain":
            self.optimizer = sgd(self.model)
            self.train = DataLoader(AugmentedImages(train_x, train_y, True), batch_size=128, shuffle=True,
                                    num_workers=workers, pin_memory=device.type == "cuda",
                                    persistent_workers=workers > 0)
            self.test = DataLoader(AugmentedImages(test_x, test_y, False), batch_size=1000, num_workers=0)
            return
        optimizer = sgd(self.model)
        if name != "trainer":
            optimizer = DeltaGClip(optimizer, gamma=0.1, delta=0.2)
        if name == "dgclip+probes":
            self.probes = [TimedProbe(p) for p in (GradNormProbe(), ClipActivityProbe(), UpdateMagnitudeProbe())]
        train = TensorLoader(train_x.to(device), train_y.to(device), 128, shuffle=True, augment=True, mean=MEAN, std=STD)
        test = TensorLoader(test_x.to(device), test_y.to(device), 1000, mean=MEAN, std=STD)
        config = TrainConfig(epochs=1, progress=False, log_every=10**9)
        self.trainer = Trainer(self.model, nn.CrossEntropyLoss(), train, test, optimizer, config, self.probes, device)

    def run_epoch(self) -> None:
        started = time.perf_counter()
        if self.name == "plain":
            plain_epoch(self.model, self.optimizer, self.train, self.test, self.device)
        else:
            self.trainer.fit()  # one epoch (and its test pass); model and optimizer carry over
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        self.times.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (default: random images)")
    parser.add_argument("--images", type=int, default=2560, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per variant, after one warm-up epoch")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes of the plain loop (default 0: on a 2-core CPU, workers "
                             "compete with the training threads)")
    args = parser.parse_args()

    device = select_device(args.device)
    data = make_data(args.data_root, args.images)
    variants = [Variant(name, data, device, args.workers) for name in ("plain", "trainer", "dgclip", "dgclip+probes")]
    print(f"CIFAR-ResNet-20, batch 128, {args.images} {'CIFAR-10' if args.data_root else 'random'} images per epoch, "
          f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    for variant in variants:  # warm-up epoch, not timed
        variant.run_epoch()
        variant.times.clear()
        for probe in variant.probes:
            probe.seconds = 0.0
    for _ in range(args.epochs):
        for variant in variants:
            variant.run_epoch()

    median = {v.name: statistics.median(v.times) for v in variants}
    speed = median["plain"] / median["trainer"]
    overhead = median["dgclip+probes"] / median["dgclip"] - 1
    probed = variants[-1]
    probe_seconds = sum(probe.seconds for probe in probed.probes)
    inside = probe_seconds / (sum(probed.times) - probe_seconds)

    print("median epoch time: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in median.items()))
    print(f"trainer images/s divided by plain DataLoader loop images/s: {speed:.3f}  (target >= 0.97)")
    print(f"cheap probes (norm, histogram, counters, RUM), time inside their callbacks: {100 * inside:.2f}% of the "
          "rest of the epoch  (target <= 3%)")
    print(f"cheap probes, epoch time with them / without them - 1: {100 * overhead:+.2f}% (noise of a few % included)")
    print(f"δ-GClip with cheap probes vs plain loop: {median['plain'] / median['dgclip+probes']:.3f}")
    print(json.dumps({"trainer_over_plain": speed, "probe_overhead_inside": inside, "probe_overhead_ab": overhead,
                      "dgclip_probes_over_plain": median["plain"] / median["dgclip+probes"]}))


if __name__ == "__main__":
    main()
