"""Distributed (torchrun) set-up: rank and world size from the environment, rank-0 gating, barriers, and the identity
of the elastic launch a process belongs to."""
from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
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
    # device_id binds the NCCL communicator (and barrier()'s work) to this rank's GPU, not to the current device
    # guessed from the rank; gloo on the CPU takes no device
    bound = {'device_id': device} if device.type == 'cuda' else {}
    if 'TORCHELASTIC_RESTART_COUNT' not in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout, **bound)
        return info
    # under torchrun the agent's store outlives a failed attempt with its keys (gloo/NCCL peer addresses): a
    # restarted group reading those would connect to dead processes, so each group gets keys of its own. The restart
    # count cannot name them: in a multi-node group only the agent whose worker failed counts a restart
    store, rank, world_size = next(dist.rendezvous('env://', timeout=timeout))
    prefix = group_prefix(store, rank, world_size, timeout_s)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=world_size, timeout=timeout, **bound)
    return info


def group_prefix(store: dist.Store, rank: int, world_size: int, timeout_s: float = 600.0) -> str:
    """A store prefix that every rank of this group gets and no earlier group on this store had.

    Rank 0 draws a new generation number; each other rank asks for it under a token of its own and acknowledges
    under the new prefix. Earlier groups' keys are still in the store, but rank 0 only stops when every rank has
    acknowledged under the new prefix, and a rank only reads the answer to its own token, so neither can mistake
    a dead rank's key for a live one.
    """
    deadline = time.monotonic() + timeout_s
    if rank != 0:
        token = uuid.uuid4().hex
        store.set(f'yolo_group/ask/{rank}', token)
        store.wait([f'yolo_group/answer/{token}'], timedelta(seconds=timeout_s))
        prefix = store.get(f'yolo_group/answer/{token}').decode()
        store.set(f'{prefix}/ack/{rank}', '1')
        return prefix
    prefix = f"yolo_group/{store.add('yolo_group/generation', 1)}"
    answered: set[str] = set()
    pending = set(range(1, world_size))
    while pending:
        for r in sorted(pending):
            if store.check([f'yolo_group/ask/{r}']):
                token = store.get(f'yolo_group/ask/{r}').decode()
                if token not in answered:  # possibly a dead rank's token: answering it costs nothing
                    store.set(f'yolo_group/answer/{token}', prefix)
                    answered.add(token)
            if store.check([f'{prefix}/ack/{r}']):
                pending.discard(r)
        if time.monotonic() > deadline:
            raise TimeoutError(f'ranks {sorted(pending)} did not join the process group within {timeout_s:.0f} s')
        time.sleep(0.005)
    return prefix


def is_initialized() -> bool:
    """True when a process group exists."""
    return dist.is_available() and dist.is_initialized()


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


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable obj on every rank (obj itself without a group)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def restart_count() -> int:
    """TORCHELASTIC_RESTART_COUNT: 0 on a first attempt or without torchrun.

    Not a per-launch signal: in a multi-node group only the agent whose worker failed counts a restart; the others
    restart their workers for the new membership with their own count (often still 0).
    """
    return int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))


def _proc_start_time(pid: int, proc: Path) -> str | None:
    """Start time of process pid in clock ticks since boot (field 22 of /proc/<pid>/stat), or None without /proc."""
    try:
        stat = (proc / str(pid) / 'stat').read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count fields after its closing one
    return stat.rsplit(')', 1)[1].split()[19]


def agent_key(proc: str | Path = '/proc') -> str:
    """This worker's elastic agent as 'host/boot/pid@start/run_id': the same for every worker one agent starts in
    one launch, restarts included, and different for any other launch, even one with the same --rdzv-id.

    The agent is the worker's parent process (torchrun, or train.py's own launcher): a host's pid with that process's
    start time and the host's boot id never repeat. TORCHELASTIC_RUN_ID separates two launches by one process (the
    launcher called twice). Without /proc the agent's log folder for this run (TORCHELASTIC_ERROR_FILE lies in
    <run log dir>/attempt_N/<local rank>/, made afresh for each agent) takes the start time's place.
    """
    proc, ppid = Path(proc), os.getppid()
    start = _proc_start_time(ppid, proc)
    try:
        boot = (proc / 'sys' / 'kernel' / 'random' / 'boot_id').read_text().strip()
    except OSError:
        boot = '-'
    if start is None:
        error_file = os.environ.get('TORCHELASTIC_ERROR_FILE', '')
        start = str(Path(error_file).parents[2]) if error_file.count(os.sep) >= 3 else '-'
    return f"{socket.gethostname()}/{boot}/{ppid}@{start}/{os.environ.get('TORCHELASTIC_RUN_ID', '-')}"


def launch_agents() -> list[str]:
    """The agent keys of all ranks of the group, sorted, each once ([] without a group): saved in checkpoints so
    that a restarted group recognises its own launch's by any agent it shares with it (collective: every rank calls)."""
    if not is_initialized():
        return []
    return sorted(set(all_gather_object(agent_key())))


def same_launch(saved: Any, agents: list[str]) -> bool:
    """True when a checkpoint's saved agent keys share an agent with this group's (False for a checkpoint without
    keys: a single-process run or one saved before they existed)."""
    return isinstance(saved, (list, tuple)) and bool(set(saved) & set(agents))


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if is_initialized():
        dist.destroy_process_group()
