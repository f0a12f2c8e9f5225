"""Save and restore everything a measurement could disturb in a training run."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


BufferSnapshot = list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]


def snapshot_buffers(model: nn.Module) -> BufferSnapshot:
    """Return every buffer of ``model`` with its module, name and a copy of its value, for :func:`restore_buffers`.

    The buffer objects are kept too: a forward that assigns a new tensor to a buffer
    (self.count = self.count + 1) replaces the module's entry instead of writing into it.
    """
    return [(module, name, buffer, buffer.detach().clone())
            for module in model.modules() for name, buffer in module._buffers.items() if buffer is not None]


def restore_buffers(snapshot: BufferSnapshot) -> None:
    """Put back the buffer objects of ``snapshot`` and their saved values."""
    with torch.no_grad():
        for module, name, buffer, saved in snapshot:
            module._buffers[name] = buffer
            buffer.copy_(saved)


@contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag, every buffer and the global RNG on exit.

    Forward passes in train mode update BatchNorm running statistics, and dropout
    draws from the global generator. This block undoes both, so a probe that runs
    inside it leaves the training run as it found it.
    """
    modes = {module: module.training for module in model.modules()}
    buffers = snapshot_buffers(model)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        restore_buffers(buffers)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
