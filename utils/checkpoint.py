"""Training and model checkpoints (.pt): what they hold, saving them atomically, loading them safely."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils.files import atomic_write
from utils.torch_utils import de_parallel


class CheckpointError(ValueError):
    """A .pt checkpoint that cannot be loaded safely or does not hold a model."""


def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    """torch.save a checkpoint of tensors and plain values atomically (temp file + rename)."""
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str | Path) -> dict:
    """Load a .pt checkpoint with weights_only=True; anything else (code, pickled objects) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain values, and unpickling "
            f"them could run code (loaded with weights_only=True). Only load checkpoints you trust; convert a "
            f"trusted one by extracting its state_dict. Detail: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise CheckpointError(f"{path}: not a model checkpoint (expected a dict with a 'model' state_dict)")
    return ckpt


def model_checkpoint(model: nn.Module, **extra: Any) -> dict:
    """A minimal checkpoint dict for a Darknet model: its state_dict, cfg text, class names, Darknet header values."""
    m = de_parallel(model)
    names = getattr(m, 'names', None)
    return {'model': {k: v.detach().cpu() for k, v in m.state_dict().items()}, 'cfg': m.cfg_text,
            'names': list(names) if names is not None else None,
            'version': [int(v) for v in m.version], 'seen': int(m.seen), **extra}
