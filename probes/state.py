"""Save and restore everything a measurement could disturb in a training run."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag, every buffer and the global RNG on exit.

    Forward passes in train mode update BatchNorm running statistics, and dropout
    draws from the global generator. This block undoes both, so a probe that runs
    inside it leaves the training run as it found it.
    """
    modes = {module: module.training for module in model.modules()}
    # The buffer objects themselves, per module: a forward that assigns a new tensor to a
    # buffer (self.count = self.count + 1) replaces the entry instead of writing into it.
    buffers = [(module, name, buffer, buffer.detach().clone())
               for module in model.modules() for name, buffer in module._buffers.items() if buffer is not None]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for module, name, buffer, saved in buffers:
                module._buffers[name] = buffer
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
