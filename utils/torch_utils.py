"""Device selection (--device rules), seeding, timing, parameter counts, the EMA and the one DDP unwrap."""
from __future__ import annotations

import inspect
import math
import os
import random
import time
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from utils.logs import LOGGER


def select_device(device: str = '', batch_size: int | None = None, local_rank: int = -1) -> torch.device:
    """The torch.device of a '--device' string: '' (CUDA if available), 'cpu', '0', '0,1' (CUDA indices as this
    process sees them; the first of a list in a single process); under torchrun see resolve_device.

    The environment (CUDA_VISIBLE_DEVICES) is left alone: the index is chosen from the list.
    """
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dev, nproc = resolve_device(device, local_rank, int(os.environ.get('LOCAL_WORLD_SIZE', 1)), n_cuda)
    if batch_size and nproc > 1 and batch_size % nproc:
        raise ValueError(f"batch size {batch_size} is not a multiple of the GPU count {nproc}")
    return torch.device(dev)


def resolve_device(spec: str, local_rank: int = -1, local_world_size: int = 1, n_cuda: int = 0) -> tuple[str, int]:
    """The rules of --device as data: (this process's device, processes to start; 0 or 1 = train in this one).

    Without torchrun (local_rank -1) a list of several CUDA indices asks for one process per device. Under torchrun
    process LOCAL_RANK takes the LOCAL_RANK-th device of the list, so the list must have one per process of the node;
    with no list it takes CUDA device LOCAL_RANK.
    """
    spec = str(spec).strip().lower().replace('cuda:', '')
    if spec == 'cpu':
        return 'cpu', 0
    ids = parse_device_list(spec)
    if not n_cuda:
        if ids:
            raise ValueError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        return 'cpu', 0
    bad = [i for i in ids if i >= n_cuda]
    if bad:
        raise ValueError(f"--device {spec}: this machine has {n_cuda} CUDA device(s) (0-{n_cuda - 1}), not {bad}")
    if local_rank < 0:
        return f'cuda:{ids[0] if ids else 0}', len(ids)
    if ids:
        if len(ids) < local_world_size:
            raise ValueError(f"--device {spec} lists {len(ids)} device(s) for {local_world_size} processes on this "
                             f"node (torchrun --nproc_per_node): give one device per process")
        return f'cuda:{ids[local_rank]}', 0
    if local_rank >= n_cuda:
        raise ValueError(f"{local_world_size} processes on this node but {n_cuda} CUDA device(s): start at most "
                         f"{n_cuda} (torchrun --nproc_per_node) or use --device cpu")
    return f'cuda:{local_rank}', 0


def parse_device_list(spec: str) -> list[int]:
    """CUDA indices of a --device string ('' -> [], '0,1' -> [0, 1]); anything else is a clear error."""
    spec = spec.strip().lower().replace('cuda:', '')
    if spec in ('', 'cuda'):
        return []
    try:
        ids = [int(x) for x in spec.split(',') if x.strip() != '']
    except ValueError:
        raise ValueError(f"--device {spec!r}: expected 'cpu' or CUDA indices such as '0' or '0,1'") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"--device {spec!r}: CUDA indices must be distinct and non-negative")
    return ids


def read_cpuinfo() -> str | None:
    """The text of /proc/cpuinfo, or None where there is none (e.g. macOS)."""
    try:
        return Path('/proc/cpuinfo').read_text()
    except OSError:
        return None


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU has native bf16 arithmetic (avx512_bf16 or amx_bf16 in its flags; cpuinfo text, default
    read_cpuinfo()); None when unknown (no /proc/cpuinfo, e.g. macOS)."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
        if cpuinfo is None:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith('flags') or line.startswith('Features'):
            flags.update(line.split(':', 1)[-1].split())
    if not flags:
        return None
    return bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})  # 'bf16': the aarch64 feature name


HALF_CHOICES = ('auto', 'on', 'off', 'fp16', 'bf16')  # --half of test.py and detect.py; bare --half is 'on'


def inference_dtype(half: str, device: torch.device) -> torch.dtype:
    """The dtype test.py and detect.py run the network in for --half (box decode and NMS stay fp32 regardless).

    auto (the default): bf16 on a CPU with native bf16 (about fp32's mAP, faster: benchmarks/README.md), fp32
    elsewhere; on: fp16 on CUDA, bf16 on a CPU with native bf16, fp32 with a warning on other CPUs; off: fp32;
    fp16: CUDA only; bf16: anywhere, with a warning where the CPU emulates it.
    """
    if half not in HALF_CHOICES:
        raise ValueError(f"--half {half}: expected one of {', '.join(HALF_CHOICES)}")
    if half == 'off':
        return torch.float32
    if device.type == 'cuda':
        return {'auto': torch.float32, 'on': torch.float16, 'fp16': torch.float16, 'bf16': torch.bfloat16}[half]
    if half == 'fp16':
        raise ValueError(f"--half fp16 needs a CUDA device, not {device.type} (on a CPU with bf16 use --half bf16)")
    native = cpu_has_bf16()  # None (flags unknown) counts as no
    if half == 'bf16':
        if not native:
            LOGGER.warning('--half bf16 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16 in its flags): '
                           'bf16 is emulated there and much slower than fp32; --half off runs fp32')
        return torch.bfloat16
    if native:
        return torch.bfloat16
    if half == 'on':
        LOGGER.warning('--half: this CPU has no bf16 instructions (no avx512_bf16 or amx_bf16 in its flags) and '
              'fp16 needs CUDA; running in fp32')
    return torch.float32


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside a DataParallel / DistributedDataParallel wrapper (or the model itself)."""
    if isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ['CUBLAS_WORKSPACE_CONFIG'] = ':4096:8'


def set_cuda_device(device: torch.device) -> None:
    """Make a CUDA device the process's current one, before anything creates a CUDA context; a no-op for the CPU.

    Without it '--device 1' still opens a context on GPU 0 (the pin-memory thread and calls that take no device use
    the current device), which costs memory there and makes torch.cuda.synchronize() wait on the wrong GPU.
    """
    if device.type == 'cuda':
        torch.cuda.set_device(device)


def pin_memory_for(device: torch.device) -> bool:
    """Whether loaders feeding device should pin their batches: only for CUDA (a CPU run gains nothing, and on a
    GPU machine the pin-memory thread would open a CUDA context)."""
    return device.type == 'cuda'


def use_channels_last(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether training runs the model in channels_last (NHWC): on the CPU (oneDNN's NHWC convolutions are faster
    forward + backward there: benchmarks/README.md), and on CUDA with fp16/bf16 AMP on tensor-core GPUs (compute
    capability >= 7.0), whose cuDNN kernels take NHWC without transposes; fp32 on CUDA keeps NCHW."""
    if device.type == 'cpu':
        return True
    if device.type != 'cuda' or amp_dtype not in (torch.float16, torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(device) >= (7, 0)


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """Set torch.backends.cudnn.benchmark inside the block and restore it after (rectangular validation batches
    change shape nearly every batch: autotuning each new shape costs more than it saves)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def state_to(state: Any, device: torch.device | str) -> Any:
    """A copy of a nested dict/list state (an optimizer's state_dict) with every tensor on device; the original,
    and the live tensors it refers to, are left where they are."""
    if isinstance(state, torch.Tensor):
        return state.detach().to(device, copy=True)
    if isinstance(state, dict):
        return {k: state_to(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(state_to(v, device) for v in state)
    return state


def optimizer_state_cpu(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with its tensors on the CPU, so a GPU run's checkpoint loads anywhere
    (Optimizer.load_state_dict moves each state tensor to its parameter's device and dtype)."""
    return state_to(optimizer.state_dict(), 'cpu')


def ddp_without_buffer_sync() -> dict[str, bool]:
    """DistributedDataParallel keywords that stop it copying rank 0's buffers (BN running stats) to every rank before
    each forward (buffers still start equal): forward_sync_buffers=False where torch has it, else the older
    broadcast_buffers=False (deprecated there)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {'forward_sync_buffers': False} if 'forward_sync_buffers' in params else {'broadcast_buffers': False}


def time_synchronized(device: torch.device | None = None) -> float:
    """time.time() after the queued work of device (a CUDA device; None: the current one, if CUDA is in use), so
    intervals measure the device; the CPU needs no wait."""
    if device is not None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    elif torch.cuda.is_available() and torch.cuda.is_initialized():  # never opens a context just to wait on it
        torch.cuda.synchronize()
    return time.time()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (total parameters, trainable parameters)."""
    n_p = sum(p.numel() for p in model.parameters())
    n_g = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n_p, n_g


class ModelEMA:
    """Exponential moving average of a model's weights and buffers, for testing and saving (updated per optimizer step).

    The decay ramps up as decay * (1 - exp(-updates / tau)) so the average follows the model closely early on.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        bare = de_parallel(model)
        self.ema = deepcopy(bare).eval()
        self.updates = updates  # optimizer steps seen so far (saved in checkpoints so --resume continues the ramp)
        self.decay_max = decay
        self.tau = tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self, updates: int) -> float:
        """Decay used at a given update count."""
        return self.decay_max * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current floating-point state into the average."""
        self.updates += 1
        d = self.decay(self.updates)
        msd = de_parallel(model).state_dict()
        # integer buffers (BN num_batches_tracked) are left alone
        pairs = [(v, msd[k].detach().to(v.dtype)) for k, v in self.ema.state_dict().items()
                 if v.dtype.is_floating_point]
        # one multi-tensor kernel launch per device and dtype instead of one per tensor (~130 for yolov3); lerp as
        # before: the same numbers, and an exact no-op where model == average (frozen layers)
        torch._foreach_lerp_([v for v, _ in pairs], [m for _, m in pairs], 1 - d)

    def update_attr(self, model: nn.Module, include: tuple[str, ...] = ('names',)) -> None:
        """Copy plain attributes of the model (its class names) onto the EMA copy."""
        bare = de_parallel(model)
        for k in include:
            if hasattr(bare, k):
                setattr(self.ema, k, getattr(bare, k))
