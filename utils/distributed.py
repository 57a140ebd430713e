"""Distributed (torchrun) set-up: rank and world size from the environment, rank-0 gating, barriers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank -1 means a plain single-process run with no process group."""
    rank: int = -1
    local_rank: int = -1
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        """True when launched by torchrun (RANK set)."""
        return self.rank != -1

    @property
    def main(self) -> bool:
        """True on the process that tests, logs, plots and writes checkpoints."""
        return self.rank in (-1, 0)


def env_info() -> DistInfo:
    """Read RANK, LOCAL_RANK and WORLD_SIZE as torchrun sets them; defaults describe a single process."""
    rank = int(os.environ.get('RANK', -1))
    if rank == -1:
        return DistInfo()
    return DistInfo(rank=rank, local_rank=int(os.environ.get('LOCAL_RANK', 0)),
                    world_size=int(os.environ.get('WORLD_SIZE', 1)))


def local_world_size() -> int:
    """Processes on this node as torchrun sets LOCAL_WORLD_SIZE (1 without torchrun)."""
    return int(os.environ.get('LOCAL_WORLD_SIZE', 1))


def init_distributed(device: torch.device, timeout_s: float = 10800.0) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); a no-op for single processes.

    The timeout is long because the other ranks wait at a barrier while rank 0 tests a whole validation set.
    """
    info = env_info()
    if not info.distributed or is_initialized():
        return info
    backend = 'nccl' if device.type == 'cuda' and dist.is_nccl_available() else 'gloo'
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    if attempt is None:
        dist.init_process_group(backend=backend, timeout=timeout)
        return info
    # under torchrun the agent's store outlives a failed attempt with its keys (gloo/NCCL peer addresses): a
    # restarted group reading those would connect to dead processes, so each attempt gets keys of its own
    store, rank, world_size = next(dist.rendezvous('env://', timeout=timeout))
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f'yolo_attempt_{attempt}', store), rank=rank,
                            world_size=world_size, timeout=timeout)
    return info


def is_initialized() -> bool:
    """True when a process group exists."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on rank 0, or in a single-process run."""
    return not is_initialized() or dist.get_rank() == 0


def get_world_size() -> int:
    """Number of processes in the group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    """Wait for every rank; nothing to wait for in a single-process run."""
    if is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order ([obj] without a group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_on_master(save_fn, *args, **kwargs) -> None:
    """Call save_fn(*args, **kwargs) on the main process only."""
    if is_main_process():
        save_fn(*args, **kwargs)


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if is_initialized():
        dist.destroy_process_group()
