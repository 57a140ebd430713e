"""Training and model checkpoints (.pt): what they hold, saving them atomically, loading them safely.

A model checkpoint (model_checkpoint) holds 'model' (a state_dict), 'cfg' (the cfg text), 'names', 'version', 'seen'.
A training checkpoint (RunCheckpointer; train.py's weights/last.pt, best.pt, epoch_K.pt) adds, all as tensors and
plain values so that torch.load(weights_only=True) reads it:
    model_train, optimizer, scaler, ema_updates      the raw model ('model' is the EMA), optimizer, GradScaler, EMA ramp
    hyp, opt, seed                                   hyperparameters and options (--resume reads them back)
    epoch, batch, mloss                              the last epoch trained, or (batch not None) the next batch inside
                                                     epoch and the running mean losses before it
    last_opt_step, accumulate, img_size, gr          the loop state: burn-in position, multi-scale size
    best_fitness, best_epoch, maps, training_results the tests so far (best.pt, --patience, --image-weights) and
                                                     results.txt
    rng                                              python, numpy, torch, CUDA (per device) and the loader generator
    elastic_agents                                   the torchrun agents of the launch that wrote it
strip_optimizer sets optimizer, model_train and scaler to None at the end of a run.
"""
from __future__ import annotations

import argparse
import pickle
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn as nn

from utils.engine import LoopState
from utils.files import atomic_write
from utils.logs import LOGGER
from utils.metrics import fitness
from utils.torch_utils import ModelEMA, de_parallel, init_seeds, optimizer_state_cpu

# a results.txt row: epoch, mem, 4 train losses, targets, img_size, P, R, mAP@0.5, mAP@0.5:0.95, F1, 3 val losses
RESULTS_FIELDS, MAP50_FIELD, MAP_FIELD = 16, 10, 11


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
    return {'model': {k: v.detach().cpu() for k, v in m.state_dict().items()}, 'cfg': m.cfg_text,
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


def restore_rng(saved: dict | None, loader_generator: torch.Generator, rank: int, opt: argparse.Namespace,
                start_epoch: int) -> None:
    """RNG streams of a resumed run: rank 0 (or the one process, rank -1) gets the saved ones back, other ranks
    fresh ones of their own, distinct per rank and per resume point."""
    if not saved:
        return
    if rank <= 0:  # the saved states are rank 0's
        set_rng_state(saved, loader_generator)
    else:
        init_seeds(opt.seed + 1 + rank + 1000 * start_epoch, deterministic=opt.deterministic)
        loader_generator.manual_seed(opt.seed + 1000 * rank + 1000003 * start_epoch)


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


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: the epoch, the batch inside it (0: its start) and that epoch's running mean
    losses of the batches already trained (None at an epoch's start)."""
    epoch: int = 0
    batch: int = 0
    mloss: torch.Tensor | None = None


@dataclass(frozen=True)
class Progress:
    """What the run's tests have shown so far, kept in checkpoints: the best fitness and its epoch (-1: no test yet)
    for best.pt and --patience, and the last test's per-class mAP@0.5:0.95 (None: no test yet) for --image-weights."""
    best_fitness: float = 0.0
    best_epoch: int = -1
    maps: np.ndarray | None = field(default=None, compare=False)  # (nc,); arrays have no single truth value

    def after_test(self, epoch: int, fi: float, maps: np.ndarray) -> Progress:
        """The progress after epoch's test gave fitness fi (the first test is the best so far whatever its value)."""
        if fi > self.best_fitness or self.best_epoch < 0:
            return Progress(fi, epoch, maps)
        return replace(self, maps=maps)

    def stale(self, epoch: int, patience: int) -> bool:
        """True when patience > 0 and fitness has not improved in the patience epochs up to this one."""
        return patience > 0 and self.best_epoch >= 0 and epoch - self.best_epoch >= patience

    def state(self) -> dict[str, Any]:
        """Checkpoint entries (plain values and a tensor, weights_only-loadable)."""
        maps = None if self.maps is None else torch.from_numpy(np.asarray(self.maps, dtype=np.float64))
        return {'best_fitness': self.best_fitness, 'best_epoch': self.best_epoch, 'maps': maps}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> Progress:
        """The progress a checkpoint saved; one written before best_epoch existed takes its best epoch from the
        results.txt rows it carries (the checkpoint's own epoch if it has none)."""
        maps = ckpt.get('maps')
        maps = None if maps is None else maps.numpy()
        best = float(ckpt.get('best_fitness', 0.0))
        if 'best_epoch' in ckpt:
            return cls(best, int(ckpt['best_epoch']), maps)
        rows = [r.split() for r in (ckpt.get('training_results') or '').splitlines()]
        rows = [r for r in rows if len(r) == RESULTS_FIELDS]
        if not rows:
            return cls(best, int(ckpt.get('epoch', -1)), maps)
        fits = fitness(np.array([[0.0, 0.0, float(r[MAP50_FIELD]), float(r[MAP_FIELD])] for r in rows]))
        return cls(best, int(rows[int(np.argmax(fits))][0].split('/')[0]), maps)


def loop_entries(state: LoopState) -> dict[str, Any]:
    """The loop state a checkpoint keeps (burn-in position: accumulation, loss gr; the multi-scale size)."""
    return {'last_opt_step': state.last_opt_step, 'accumulate': state.accumulate, 'img_size': state.img_size,
            'gr': state.gr}


class TrainParts(Protocol):
    """What a run's checkpoint saves besides the model (train.py's Parts has these and more)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lf: Callable[[int], float]  # the LR factor of an epoch
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None  # rank 0 only


@dataclass(frozen=True)
class Resumed:
    """What restore() gives back: where to continue, the tests' progress so far, the loop state and the results.txt
    text of the epochs already trained."""
    point: ResumePoint
    progress: Progress
    state: LoopState
    results: str


@dataclass
class RunCheckpointer:
    """Saves and restores one training run: the raw model, the EMA model that test.py and detect.py use, optimizer,
    GradScaler, EMA update count, schedule and burn-in position, RNG of every kind, the position inside an epoch,
    progress, options, hyp, class names and the launch's elastic agents (see train.elastic_resume)."""
    model: nn.Module  # the model being trained, without its DDP wrapper
    parts: TrainParts
    hyp: dict
    opt: argparse.Namespace
    loader_generator: torch.Generator | None = None
    agents: list[str] = field(default_factory=list)
    last: Path | None = None  # weights/last.pt: where mid-epoch saves go
    results: Path | None = None  # results.txt, whose text every checkpoint carries

    def checkpoint(self, **entries: Any) -> dict:
        """The checkpoint dict of the run now, with the given entries (epoch, batch, progress, ...) added."""
        results = self.results.read_text() if self.results is not None and self.results.exists() else ''
        return run_checkpoint(self.parts.ema, self.model, self.parts.optimizer, self.parts.scaler, self.hyp,
                              self.opt, training_results=results, elastic_agents=list(self.agents),
                              rng=rng_state(self.loader_generator), **entries)

    def save_epoch_end(self, paths: list[Path], epoch: int, state: LoopState, progress: Progress) -> None:
        """The checkpoint after epoch (trained, tested, its results.txt row written) into each of paths."""
        if not paths:
            return
        ckpt = self.checkpoint(epoch=epoch, **progress.state(), **loop_entries(state))
        for p in paths:
            save_checkpoint(ckpt, p)

    def save_mid_epoch(self, batch: int, state: LoopState, mloss: torch.Tensor, *, epoch: int,
                       progress: Progress) -> None:
        """last.pt at an optimizer step inside epoch (a stop request or --save-period-min): batch is the next batch
        to train, mloss the running mean losses of the batches before it; --resume continues from there exactly."""
        t = time.time()
        ckpt = self.checkpoint(epoch=epoch, batch=batch, mloss=mloss.detach().float().cpu(), **progress.state(),
                               **loop_entries(state))
        save_checkpoint(ckpt, self.last)
        LOGGER.info(f"\nSaved {self.last} at epoch {epoch}, batch {batch} ({time.time() - t:.1f} s)")

    def restore(self, ckpt: dict | None, start: LoopState, rank: int = -1) -> Resumed:
        """--resume: optimizer, scaler, EMA, schedule, burn-in position and RNG back where ckpt was saved, at the end
        of an epoch or (with 'batch') at an optimizer step inside one; the model's own weights are loaded when it is
        built (training_weights). rank: this process's (ranks other than 0 draw fresh RNG streams of their own).
        Without a checkpoint: a new run's start (epoch 0, no tests yet, the start state), nothing changed."""
        if ckpt is None:
            return Resumed(ResumePoint(), Progress(), start, '')
        resumed = restore_training(ckpt, self.parts, start)
        point, progress = resumed.point, resumed.progress
        where = f'epoch {point.epoch}' + (f', batch {point.batch}' if point.batch else '')
        patience = getattr(self.opt, 'patience', 0)
        LOGGER.info(f'Resuming {self.opt.resume} from {where} of {self.opt.epochs} epochs; best fitness '
                    f'{progress.best_fitness:.4f} at epoch {progress.best_epoch}'
                    + (f' (--patience {patience})' if patience else ''))
        restore_rng(ckpt.get('rng'), self.loader_generator, rank, self.opt, resumed.point.epoch)
        return resumed


def run_checkpoint(ema: ModelEMA, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   hyp: dict, opt: argparse.Namespace, **state: Any) -> dict:
    """Everything --resume needs, as tensors and plain values: the EMA model (what test/detect use), the raw model,
    optimizer, GradScaler, EMA update count, hyp, options, seed, cfg text, plus the given state (epoch, ...)."""
    ckpt = model_checkpoint(ema.ema, optimizer=optimizer_state_cpu(optimizer),  # loads anywhere, GPU run or not
                            model_train={k: v.detach().cpu() for k, v in de_parallel(model).state_dict().items()},
                            ema_updates=ema.updates, scaler=scaler.state_dict(), hyp=dict(hyp),
                            opt=plain(vars(opt)), seed=opt.seed, **state)
    for k in ('model', 'model_train'):  # NCHW (contiguous) tensors whatever layout training used
        ckpt[k] = {n: v.contiguous() for n, v in ckpt[k].items()}
    return ckpt


def training_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    """The state_dict training continues from: the raw model's (the EMA model's in checkpoints without one)."""
    return ckpt['model_train'] if ckpt.get('model_train') else ckpt['model']


def restore_training(ckpt: dict, parts: TrainParts, start: LoopState) -> Resumed:
    """Optimizer, scaler, EMA, schedule and burn-in position back where ckpt was saved, at the end of an epoch or
    (with 'batch') at an optimizer step inside one."""
    if ckpt.get('optimizer') is not None:
        parts.optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler'):
        parts.scaler.load_state_dict(ckpt['scaler'])
    if parts.ema is not None:
        parts.ema.ema.load_state_dict(ckpt['model'])
        parts.ema.updates = int(ckpt.get('ema_updates', 0))
    batch = ckpt.get('batch')
    if batch is None:  # an epoch's end: continue with the next epoch at its scheduled LR
        point = ResumePoint(int(ckpt['epoch']) + 1)
        parts.scheduler.last_epoch = point.epoch  # where the scheduler.step() after the saved epoch left it
        for g in parts.optimizer.param_groups:  # no second warmup: ni keeps counting
            g['lr'] = g['initial_lr'] * parts.lf(point.epoch)
    else:  # inside an epoch: the optimizer state holds the LR, momentum and weight decay of that step
        point = ResumePoint(int(ckpt['epoch']), int(batch), ckpt.get('mloss'))
        parts.scheduler.last_epoch = point.epoch
    state = replace(start, last_opt_step=int(ckpt.get('last_opt_step', -1)),
                    accumulate=int(ckpt.get('accumulate', start.accumulate)),
                    img_size=int(ckpt.get('img_size', start.img_size)), gr=ckpt.get('gr'))
    return Resumed(point, Progress.from_checkpoint(ckpt), state, ckpt.get('training_results') or '')


def strip_optimizer(path: str | Path) -> None:
    """Drop the optimizer and training-only state from a checkpoint (for a smaller final file), atomically."""
    ckpt = load_checkpoint(path)
    for k in ('optimizer', 'model_train', 'scaler'):
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
    # the resume decisions read a few plain values, and train() loads the tensors afterwards: a requeued yolov3-spp
    # run would otherwise read its 757 MB last.pt up to three times (--resume auto, --resume, train)
    ckpt = load_checkpoint(path, mmap=True)
    opt = ckpt.get('opt')
    if require_options and (not isinstance(opt, dict) or 'hyp' not in ckpt):
        raise CheckpointError(f'{path}: not a train.py checkpoint (no saved options): a model to start from with '
                              f'--weights, not a run to resume')
    return SavedRun(path, opt if isinstance(opt, dict) else None, ckpt.get('hyp'), int(ckpt.get('epoch', -1)),
                    ckpt.get('batch'), ckpt.get('optimizer') is not None, ckpt.get('elastic_agents'))
