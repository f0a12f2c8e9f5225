"""Save and restore everything a measurement could disturb in a training run."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


BufferSnapshot = list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]
GeneratorSnapshot = list[tuple[torch.Generator, torch.Tensor]]


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


def model_generators(*roots: object) -> list[torch.Generator]:
    """Return the ``torch.Generator`` objects stored as attributes of the modules of ``roots``, each once.

    A module that draws its noise from its own generator (``torch.bernoulli(p,
    generator=self.generator)``) moves that generator at every forward pass, out of
    reach of the global seeds. A root that is not an ``nn.Module`` (a loss function) is
    skipped.
    NOTE: generators kept elsewhere are not found: inside lists or dicts, as class
    attributes, in plain helper objects, or created during the forward pass. Their draws
    change at every product and move training's stream.
    """
    found: dict[int, torch.Generator] = {}
    for root in roots:
        if not isinstance(root, nn.Module):
            continue
        for module in root.modules():
            for value in vars(module).values():
                if isinstance(value, torch.Generator):
                    found.setdefault(id(value), value)
    return list(found.values())


def snapshot_generators(*roots: object) -> GeneratorSnapshot:
    """Return each generator of :func:`model_generators` with a copy of its state, for :func:`restore_generators`."""
    return [(generator, generator.get_state()) for generator in model_generators(*roots)]


def restore_generators(snapshot: GeneratorSnapshot) -> None:
    """Put the saved states of ``snapshot`` back into their generators."""
    for generator, state in snapshot:
        generator.set_state(state)


def generators_moved(snapshot: GeneratorSnapshot) -> bool:
    """Check whether any generator of ``snapshot`` has drawn since the snapshot was taken."""
    return any(not torch.equal(generator.get_state(), state) for generator, state in snapshot)


@contextmanager
def preserved_model_state(model: nn.Module, loss_fn: object = None) -> Iterator[None]:
    """Restore every module's train/eval flag, every buffer, the generators stored as
    module attributes and the global RNG on exit.

    Forward passes in train mode update BatchNorm running statistics, and dropout
    draws from the global generator or from a module's own. This block undoes all of
    it, so a probe that runs inside it leaves the training run as it found it. A
    ``loss_fn`` that is a module gets its generators restored too.
    """
    modes = {module: module.training for module in model.modules()}
    buffers = snapshot_buffers(model)
    generators = snapshot_generators(model, loss_fn)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        restore_buffers(buffers)
        restore_generators(generators)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
