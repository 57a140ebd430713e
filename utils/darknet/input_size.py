"""Inputs a network cannot take: which sizes work, found on a meta-device copy of the model (shapes only, no
arithmetic, no memory), and the error that names the layer and the smallest size that works.

torch's own errors ("Kernel size can't be greater than actual input size", "Sizes of tensors must match") name neither
the layer nor a size that works; models.Darknet's forward replaces them with InputSizeError when the input's size is
the cause.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.darknet.parse_config import ConfigError


class InputSizeError(ConfigError, RuntimeError):
    """An input of a size the network cannot take (too small for a layer, or a size its layers do not divide evenly),
    naming the layer and the smallest size that works. A RuntimeError too, as torch's own error it replaces."""


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of a models.Darknet built from its cfg on the meta device, in eval mode, cfg warnings not logged again."""
    with torch.device('meta'):
        return type(model)(model.cfg_text, log_cfg=False).eval()


def takes_input(model: nn.Module, img_size: tuple[int, int], twin: nn.Module | None = None) -> bool:
    """Whether a forward pass of the model runs on a (1, channels, h, w) input, tried on its meta-device twin."""
    twin = twin or meta_twin(model)
    try:
        with torch.no_grad():
            twin(torch.zeros(1, int(model.hyperparams.get('channels', 3)), *img_size, device='meta'))
    except RuntimeError:
        return False
    return True


def smallest_input(model: nn.Module, limit: int = 2048, twin: nn.Module | None = None) -> int | None:
    """The smallest square side, a multiple of model.max_stride, that a forward pass takes (None: none up to limit)."""
    twin = twin or meta_twin(model)
    step = model.max_stride
    return next((s for s in range(step, limit + 1, step) if takes_input(model, (s, s), twin)), None)


def input_size_error(model: nn.Module, i: int, img_size: tuple[int, int], err: RuntimeError,
                     twin: nn.Module | None = None) -> InputSizeError:
    """The error for an input that layer i could not take: the cfg line, the layer, torch's reason and the smallest
    input size that works."""
    d = model.module_defs[i]
    h, w = img_size
    limit = max(2048, 2 * h, 2 * w)
    s = smallest_input(model, limit, twin)
    step = model.max_stride
    hint = (f"the smallest input it takes is {s}x{s}; use sides that are multiples of {step}"
            + (f", at least {s}" if s > step else '') if s else f"no square input up to {limit} pixels works")
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return InputSizeError(f"{model.cfg_path}:{d['line']}: layer {i} [{d['type']}] cannot take the {h}x{w} input "
                          f"({reason}): the input is too small for this network or not a size its layers divide "
                          f"evenly; {hint}")
