"""Training and model checkpoints (.pt): what they hold, saving them atomically, loading them safely.

A model checkpoint (model_checkpoint) holds 'model' (a state_dict), 'cfg' (the cfg text), 'names', 'version', 'seen'.
A training checkpoint (train.py's weights/last.pt, best.pt, epoch_K.pt) adds the run's state, all as tensors and
plain values so that torch.load(weights_only=True) reads it: its keys are the one literal of
utils/train/resume.py's train_checkpoint. strip_optimizer sets optimizer, model_train, scaler and lr_scheduler to None at
the end of a run.
This module reads and writes files; it decides nothing about resuming (utils/train/resume.py does).
"""
from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from utils.files import atomic_write
from utils.logs import LOGGER
from utils.torch_utils import de_parallel


class CheckpointError(ValueError):
    """A .pt checkpoint that cannot be loaded safely or does not hold a model."""


def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    """torch.save a checkpoint of tensors and plain values atomically (temp file + rename)."""
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Load a .pt checkpoint with weights_only=True; anything else (code, pickled objects) is refused. mmap: map the
    tensors instead of reading them (for a look at the plain values: the options, the epoch)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        if any(s.startswith('Unsupported operand') for s in lines):  # not a pickle stream at all
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (a damaged or foreign file)") from None
        detail = next((s for s in lines if 'GLOBAL' in s or 'global' in s), lines[0] if lines else '')
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain values, and unpickling "
            f"them could run code (loaded with weights_only=True). Only load checkpoints you trust; convert a "
            f"trusted one by extracting its state_dict. Detail: {detail}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise CheckpointError(f"{path}: not a model checkpoint (expected a dict with a 'model' state_dict)")
    return ckpt


def model_checkpoint(model: nn.Module, **extra: Any) -> dict:
    """A minimal checkpoint dict for a Darknet model: its state_dict, cfg text, class names, Darknet header values."""
    m = de_parallel(model)
    names = getattr(m, 'names', None)
    # NCHW (contiguous) tensors whatever memory format training used
    return {'model': {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, 'cfg': m.cfg_text,
            'names': list(names) if names is not None else None,
            'version': [int(v) for v in m.version], 'seen': int(m.seen), **extra}


# ------------------------------------------------------------------------------------------------------------------
# RNG of every kind, as tensors and plain values (a weights_only load reads them back)

def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python's, numpy's, torch's and every CUDA device's RNG state, and the loader generator's."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': _pystate_to(random.getstate()),
             'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached': float(cached)},
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state['loader'] = loader_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Restore what rng_state() saved (the CUDA states of the devices this machine has)."""
    random.setstate(_pystate_from(state['python']))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    torch.set_rng_state(state['torch'])
    if state.get('cuda') is not None:
        n_dev = torch.cuda.device_count() if torch.cuda.is_available() else 0
        restore_cuda_rng(list(state['cuda']), n_dev, torch.cuda.set_rng_state)
    if loader_generator is not None and 'loader' in state:
        loader_generator.set_state(state['loader'])


def restore_cuda_rng(states: list[torch.Tensor], n_devices: int,
                     set_state: Callable[[torch.Tensor, int], None]) -> int:
    """Put saved CUDA RNG states onto devices 0..n-1 with set_state(state, index), as many as both sides have (a
    checkpoint from N GPUs resumed on M); say what was dropped or left fresh. Returns the number restored."""
    n = min(len(states), n_devices)
    for i in range(n):
        set_state(states[i], i)
    if len(states) > n_devices:
        LOGGER.info(f'Resume: the checkpoint has CUDA RNG states of {len(states)} devices, this process sees '
                    f'{n_devices}: restored {n}, dropped {len(states) - n}')
    elif len(states) < n_devices:
        LOGGER.info(f'Resume: the checkpoint has CUDA RNG states of {len(states)} devices, this process sees '
                    f'{n_devices}: devices {n}-{n_devices - 1} keep fresh seeds')
    return n


def _pystate_to(state: tuple) -> dict:
    """random.getstate() -> tensors and plain values: (version, 625 ints of the Mersenne Twister, gauss_next)."""
    return {'version': state[0], 'state': torch.tensor(state[1], dtype=torch.int64), 'gauss': state[2]}


def _pystate_from(d: dict) -> tuple:
    """The inverse of _pystate_to."""
    return d['version'], tuple(int(x) for x in d['state'].tolist()), d['gauss']


# ------------------------------------------------------------------------------------------------------------------
# where a run stands besides its weights

def plain(x: Any) -> Any:
    """Options as plain python (paths as strings) for weights_only checkpoints and YAML."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def training_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    """The state_dict training continues from: the raw model's (the EMA model's in checkpoints without one)."""
    return ckpt['model_train'] if ckpt.get('model_train') else ckpt['model']


def run_paths(save_dir: Path, name: str = '') -> dict[str, Path]:
    """results.txt, weights/last.pt, weights/best.pt under save_dir; with a name, the final (renamed) paths."""
    w = save_dir / 'weights'
    if not name:
        return {'results': save_dir / 'results.txt', 'last': w / 'last.pt', 'best': w / 'best.pt'}
    n = name if name.isnumeric() else '_' + name  # as the original: results_x.txt but results2.txt
    return {'results': save_dir / f'results{n}.txt', 'last': w / f'last{n}.pt', 'best': w / f'best{n}.pt'}


def strip_optimizer(path: str | Path) -> None:
    """Drop the optimizer and training-only state from a checkpoint (for a smaller final file), atomically."""
    ckpt = load_checkpoint(path)
    for k in ('optimizer', 'model_train', 'scaler', 'lr_scheduler'):
        ckpt[k] = None
    save_checkpoint(ckpt, path)


# ------------------------------------------------------------------------------------------------------------------
# reading a run's checkpoint to decide whether to resume it (--resume, --resume auto, elastic restarts)

@dataclass(frozen=True)
class SavedRun:
    """What a run's checkpoint says about it: the options and hyp to resume with, where it stopped and whether it
    finished, the elastic agents of the launch that wrote it."""
    path: Path
    opt: dict[str, Any] | None  # None: not saved by train.py
    hyp: dict[str, float] | None
    epoch: int
    batch: int | None  # the next batch inside epoch; None: saved at the end of epoch
    has_optimizer: bool  # False once stripped at the end of its run
    agents: Any

    @property
    def finished(self) -> bool:
        """True for a run that trained all its epochs (or was stripped at its end)."""
        return not self.has_optimizer or (self.batch is None and self.epoch + 1 >= int(self.opt['epochs']))

    @property
    def where(self) -> str:
        """Where it was saved: 'epoch E, batch B' inside an epoch, 'epoch E (end)' after one."""
        return f'epoch {self.epoch}' + (f', batch {self.batch}' if self.batch is not None else ' (end)')

    @property
    def resumes_at(self) -> str:
        """Where a resume continues: 'epoch E, batch B' inside an epoch, else 'epoch E+1'."""
        return f'epoch {self.epoch}, batch {self.batch}' if self.batch is not None else f'epoch {self.epoch + 1}'


def read_run(path: str | Path, require_options: bool = True) -> SavedRun:
    """The run a train.py checkpoint saved; CheckpointError naming the file for an unreadable one, or (unless
    require_options is False) for one without the options and hyp of a train.py run."""
    path = Path(path)
    # the resume decisions read a few plain values, and train() loads the tensors afterwards: mapped, a large
    # last.pt is not read in full up to three times (--resume auto, --resume, train)
    ckpt = load_checkpoint(path, mmap=True)
    opt = ckpt.get('opt')
    if require_options and (not isinstance(opt, dict) or 'hyp' not in ckpt):
        raise CheckpointError(f'{path}: not a train.py checkpoint (no saved options): a model to start from with '
                              f'--weights, not a run to resume')
    return SavedRun(path, opt if isinstance(opt, dict) else None, ckpt.get('hyp'), int(ckpt.get('epoch', -1)),
                    ckpt.get('batch'), ckpt.get('optimizer') is not None, ckpt.get('elastic_agents'))
