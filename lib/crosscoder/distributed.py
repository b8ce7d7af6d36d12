"""Where a process computes: its device, and its rank's share of the work under torch.distributed."""

from __future__ import annotations

import torch

from crosscoder.config import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    """"auto": the current CUDA device when there is one (under torchrun each rank has set its own,
    cuda:LOCAL_RANK), else the CPU; anything else as torch.device reads it."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    return torch.device(device)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group, (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(batch_size: int, rank: int | None = None, world: int | None = None) -> tuple[int, int, int]:
    """(rank, world, batch_size / world) for a data source serving one rank's share of every global
    batch; rank and world default to the process group's."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    if world < 1 or not 0 <= rank < world or batch_size % world:
        raise ConfigError(f"batch_size {batch_size} must split evenly over world size {world} (rank {rank})")
    return rank, world, batch_size // world
