"""Device selection, seeding, timing and small model utilities (conv+BN fusion, parameter/FLOP summary)."""
from __future__ import annotations

import math
import os
import random
import time
from copy import deepcopy

import numpy as np
import torch
import torch.nn as nn


def select_device(device: str = '', batch_size: int | None = None) -> torch.device:
    """Return the torch.device for '--device' strings: '' (CUDA if available), 'cpu', '0', '0,1'."""
    device = str(device).strip().lower().replace('cuda:', '')
    cpu = device == 'cpu'
    if cpu:
        return torch.device('cpu')
    if device:  # restrict to the requested GPUs before CUDA initialises
        os.environ['CUDA_VISIBLE_DEVICES'] = device
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if not torch.cuda.is_available():
        return torch.device('cpu')
    ng = torch.cuda.device_count()
    if batch_size and ng > 1 and batch_size % ng:
        raise ValueError(f"batch size {batch_size} is not a multiple of the GPU count {ng}")
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    return torch.device('cuda', local_rank if local_rank < ng else 0)


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


def time_synchronized() -> float:
    """time.time() after waiting for queued CUDA work, so intervals measure the device."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold an eval-mode BatchNorm2d into the preceding Conv2d; returns a new Conv2d with a bias."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                      padding_mode=conv.padding_mode).to(conv.weight.device)
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((conv_bias - bn.running_mean) * scale + bn.bias)
    return fused


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (total parameters, trainable parameters)."""
    n_p = sum(p.numel() for p in model.parameters())
    n_g = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n_p, n_g


def conv_flops(model: nn.Module, img_size: tuple[int, int] | int = 416) -> float:
    """GFLOPs (2 x multiply-adds) of one forward pass at img_size, counted from Conv2d output shapes."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    macs = 0

    def hook(m: nn.Conv2d, _inp, out):
        nonlocal macs
        k = m.weight[0].numel()  # in/groups * kh * kw
        macs += out.numel() * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    p = next(model.parameters())
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype))
    finally:
        model.train(training)
        for hd in handles:
            hd.remove()
    return 2 * macs / 1e9


def intersect_state_dicts(da: dict, db: dict) -> dict:
    """Entries of da whose key is in db with the same shape."""
    return {k: v for k, v in da.items() if k in db and v.shape == db[k].shape}


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
        bare = de_parallel(model)
        msd = bare.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:  # integer buffers (BN num_batches_tracked) are left alone
                v.lerp_(msd[k].detach().to(v.dtype), 1 - d)  # exact no-op where model == average (frozen)

    def update_attr(self, model: nn.Module, include: tuple[str, ...] = ('names',)) -> None:
        """Copy plain attributes of the model (its class names) onto the EMA copy."""
        bare = de_parallel(model)
        for k in include:
            if hasattr(bare, k):
                setattr(self.ema, k, getattr(bare, k))
