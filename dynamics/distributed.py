"""Helpers for runs under ``torch.distributed`` (for example DDP launched by ``torchrun``).

Every helper is a no-op in a single process, so the same code runs with and
without a process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """Return whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def is_main_process() -> bool:
    """Return whether this process writes files: rank 0, or the only process."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place and return it (unchanged in a single process)."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def sum_over_ranks(count: int, device: torch.device | str, group=None) -> int:
    """Return ``count`` summed over the ranks; in a single process, ``count`` itself without a device sync."""
    if not is_distributed(group):
        return count
    total = torch.tensor(float(count), dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return int(total.item())


def broadcast_from_first(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with the group's first rank's value, so all ranks hold the same bits."""
    if is_distributed(group):
        source = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(tensor, src=source, group=group)
    return tensor
