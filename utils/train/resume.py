"""Every resume decision of train.py, beside the one checkpoint dict a run saves and the code that reads it back.

    train_checkpoint()   the dict of weights/last.pt, best.pt, epoch_K.pt: every key in one literal
    restore()            a checkpoint's optimizer, schedule, scaler, EMA, loop state and RNG back into a new run
    resolve_resume()     --resume [last.pt]: the saved options and hyperparameters (None when that run finished)
    auto_resume()        --resume auto: resume this folder's unfinished run of the same options, else start fresh
    elastic_resume()     under torchrun: a restarted worker group continues this launch's last.pt

File I/O (atomic save, weights_only load, RNG state, reading a run's plain values) is utils/checkpoint.py's.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.checkpoint import (
    CheckpointError,
    model_checkpoint,
    plain,
    read_run,
    rng_state,
    run_paths,
    set_rng_state,
)
from utils.eval.metrics import fitness
from utils.logs import LOGGER
from utils.torch_utils import de_parallel, init_seeds, optimizer_state_cpu
from utils.train import distributed as du
from utils.train.engine import LoopState, Parts

# a results.txt row: epoch, mem, 4 train losses, targets, img_size, P, R, mAP@0.5, mAP@0.5:0.95, F1, 3 val losses
RESULTS_FIELDS, MAP50_FIELD, MAP_FIELD = 16, 10, 11
AUTO_RESUME_FREE = ('device', 'workers', 'save_period_min', 'resume')  # may change between a crash and its resume


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


# ------------------------------------------------------------------------------------------------------------------
# the checkpoint: saved in one literal, read back in one function

def _cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict on the CPU in NCHW (contiguous) layout, whatever device and memory format training used."""
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def train_checkpoint(parts: Parts, hyp: dict, opt: argparse.Namespace, epoch: int, state: LoopState,
                     progress: Progress, results: str = '', agents: list[str] | None = None,
                     loader_generator: torch.Generator | None = None) -> dict:
    """Everything --resume needs, as tensors and plain values (torch.load(weights_only=True) reads it back).

    state.batch 0: saved after epoch (trained, tested, its results.txt row written); else inside epoch at an optimizer
    step, state.batch the next batch to train and state.mloss the running mean losses of the batches before it.
    """
    inside = state.batch > 0
    return {**model_checkpoint(parts.ema.ema),  # 'model' (the EMA: what test.py, detect.py use), cfg, names, ...
            'model_train': _cpu(de_parallel(parts.model).state_dict()),  # the raw weights training continues from
            'optimizer': optimizer_state_cpu(parts.optimizer),  # loads anywhere, GPU run or not
            'lr_scheduler': parts.scheduler.state_dict(),
            'scaler': parts.scaler.state_dict(),
            'ema_updates': parts.ema.updates,
            'hyp': dict(hyp), 'opt': plain(vars(opt)), 'seed': opt.seed,
            'epoch': epoch,
            'batch': state.batch if inside else None,
            'mloss': state.mloss.detach().float().cpu() if inside else None,
            'last_opt_step': state.last_opt_step, 'accumulate': state.accumulate, 'img_size': state.img_size,
            'gr': state.gr,
            'best_fitness': progress.best_fitness, 'best_epoch': progress.best_epoch,
            'maps': None if progress.maps is None else torch.from_numpy(np.asarray(progress.maps, dtype=np.float64)),
            'training_results': results,  # results.txt of the epochs trained
            'rng': rng_state(loader_generator),  # python, numpy, torch, CUDA per device, the loader's generator
            'elastic_agents': list(agents or [])}  # the torchrun agents of this launch (elastic_resume)


@dataclass(frozen=True)
class Resumed:
    """Where a run continues: the epoch, the loop state (state.batch > 0: inside that epoch), the tests' progress so
    far and the results.txt text of the epochs already trained."""
    epoch: int
    state: LoopState
    progress: Progress
    results: str


def restore(ckpt: dict | None, parts: Parts, start: LoopState, opt: argparse.Namespace,
            loader_generator: torch.Generator | None = None, rank: int = -1) -> Resumed:
    """--resume: optimizer, schedule, scaler, EMA, loop state and RNG back where ckpt was saved, at the end of an epoch
    or (with 'batch') at an optimizer step inside one; the model's own weights are loaded when it is built
    (checkpoint.training_weights). Ranks other than 0 draw fresh RNG streams of their own. Without a checkpoint: a
    new run's start (epoch 0, no tests yet, the start state), nothing changed."""
    if ckpt is None:
        return Resumed(0, start, Progress(), '')
    if ckpt.get('optimizer') is not None:
        parts.optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler'):
        parts.scaler.load_state_dict(ckpt['scaler'])
    if parts.ema is not None:
        parts.ema.ema.load_state_dict(ckpt['model'])
        parts.ema.updates = int(ckpt.get('ema_updates', 0))
    batch = ckpt.get('batch')
    epoch = int(ckpt['epoch']) + (batch is None)  # an epoch's end: continue with the next epoch
    if ckpt.get('lr_scheduler') is not None:
        parts.scheduler.load_state_dict(ckpt['lr_scheduler'])
    else:  # saved before the schedule's state was: rebuild where scheduler.step() after the saved epoch left it
        parts.scheduler.last_epoch = epoch
        if batch is None:  # inside an epoch the optimizer state already holds that step's LR
            for g in parts.optimizer.param_groups:  # no second warmup: ni keeps counting
                g['lr'] = g['initial_lr'] * parts.lf(epoch)
    state = LoopState(last_opt_step=int(ckpt.get('last_opt_step', -1)),
                      accumulate=int(ckpt.get('accumulate', start.accumulate)),
                      img_size=int(ckpt.get('img_size', start.img_size)), gr=ckpt.get('gr'),
                      batch=int(batch or 0), mloss=ckpt.get('mloss') if batch else None)
    progress = Progress.from_checkpoint(ckpt)
    patience = getattr(opt, 'patience', 0)
    LOGGER.info(f'Resuming {opt.resume} from epoch {epoch}' + (f', batch {batch}' if batch else '') +
                f' of {opt.epochs} epochs; best fitness {progress.best_fitness:.4f} at epoch {progress.best_epoch}'
                + (f' (--patience {patience})' if patience else ''))
    _restore_rng(ckpt.get('rng'), loader_generator, rank, opt, epoch)
    return Resumed(epoch, state, progress, ckpt.get('training_results') or '')


def _restore_rng(saved: dict | None, loader_generator: torch.Generator | None, rank: int, opt: argparse.Namespace,
                 start_epoch: int) -> None:
    """RNG streams of a resumed run: rank 0 (or the one process, rank -1) gets the saved ones back, other ranks
    fresh ones of their own, distinct per rank and per resume point."""
    if not saved:
        return
    if rank <= 0:  # the saved states are rank 0's
        set_rng_state(saved, loader_generator)
    else:
        init_seeds(opt.seed + 1 + rank + 1000 * start_epoch, deterministic=opt.deterministic)
        if loader_generator is not None:
            loader_generator.manual_seed(opt.seed + 1000 * rank + 1000003 * start_epoch)


# ------------------------------------------------------------------------------------------------------------------
# whether to resume, and with which options

def resolve_resume(opt: argparse.Namespace, defaults: dict[str, Any]) -> tuple[argparse.Namespace, dict | None]:
    """For --resume: the options and hyperparameters saved in the checkpoint, or None if that run finished.
    defaults: the parser's default options (a checkpoint saved before an option existed gets its default)."""
    ckpt_path = Path(opt.resume) if isinstance(opt.resume, str) else Path(opt.save_dir) / 'weights' / 'last.pt'
    if not ckpt_path.is_file():
        raise CheckpointError(f'{ckpt_path}: nothing to resume (no such checkpoint)')
    run = read_run(ckpt_path)
    if run.finished:
        LOGGER.info(f"{ckpt_path}: this run already finished ({run.epoch + 1}/{run.opt['epochs']} epochs); "
                    f"nothing to resume. To train more: --weights {ckpt_path} --epochs N")
        return opt, None
    new = argparse.Namespace(**{**defaults, **run.opt})
    for k in AUTO_RESUME_FREE[:-1]:  # where and how often to save may change between the crash and the resume
        if getattr(opt, k) != defaults[k]:
            setattr(new, k, getattr(opt, k))
    new.resume = str(ckpt_path)
    new.save_dir = str(ckpt_path.parent.parent)
    return new, run.hyp


def auto_resume(opt: argparse.Namespace, defaults: dict[str, Any],
                hyp: dict[str, float] | None) -> argparse.Namespace | None:
    """--resume auto: the options to run, with opt.resume set to this folder's weights/last.pt when it is an
    unfinished run of the same options (AUTO_RESUME_FREE aside) and hyperparameters (hyp: this command line's, None
    when its file cannot be read), False to start fresh; None when that run finished.

    Starting fresh over an unfinished run of other options first moves its last.pt, best.pt and results.txt aside
    (..._replaced_<time>), so nothing on disk is lost. One line says what was decided and why.
    """
    opt = argparse.Namespace(**vars(opt))
    opt.resume = False
    paths = run_paths(Path(opt.save_dir))
    last = paths['last']
    named = run_paths(Path(opt.save_dir), opt.name)['last'] if opt.name else None
    if not last.is_file() and named is not None and named.is_file():  # --name renames last.pt when a run finishes
        LOGGER.info(f'--resume auto: {named} is a finished run (--name {opt.name}); nothing to train. To train more: '
                    f'--weights {named} --epochs N')
        return None
    if not last.is_file():
        LOGGER.info(f'--resume auto: no {last}, starting a new run')
        return opt
    try:
        run = read_run(last)
    except CheckpointError as e:
        LOGGER.info(f'--resume auto: {e}; {_move_aside(paths)}, starting a new run')
        return opt
    now, saved = plain(vars(opt)), {**defaults, **run.opt}
    changed = [k for k in now if k not in AUTO_RESUME_FREE and not _same_option(k, saved.get(k), now[k])]
    if not changed and hyp is not None and hyp != run.hyp:  # an unreadable file stops the new run with its error
        changed = ['hyp (the file\'s values)']
    if run.finished:
        LOGGER.info(f"--resume auto: {last} is a finished run ({run.epoch + 1}/{saved['epochs']} epochs); nothing "
                    f"to train" + (f" (options differ: {', '.join(changed)})" if changed else '') +
                    f'. To train more: --weights {last} --epochs N')
        return None
    if changed:
        LOGGER.info(f"--resume auto: {last} ({run.where}) is an unfinished run of other options "
                    f"({', '.join(changed)}); {_move_aside(paths)}, starting a new run")
        return opt
    free = [k for k in AUTO_RESUME_FREE[:-1] if not _same_option(k, saved.get(k), now[k])]
    LOGGER.info(f'--resume auto: resuming {last} at {run.where}' +
                (f"; {', '.join(free)} from this command line, not the saved run" if free else ''))
    opt.resume = str(last)
    return opt


def _same_option(key: str, saved: Any, now: Any) -> bool:
    """Whether an option has the same value in the saved run and on this command line (folders compared resolved)."""
    if key == 'save_dir' and saved is not None and now is not None:
        return Path(saved).resolve() == Path(now).resolve()
    return saved == now


def _move_aside(paths: dict[str, Path]) -> str:
    """Rename a run's last.pt, best.pt and results.txt to ..._replaced_<time>; say where they went."""
    stamp = time.strftime('%Y%m%d-%H%M%S')
    moved = []
    for p in (paths['last'], paths['best'], paths['results']):
        if p.exists():
            dst = p.with_name(f'{p.stem}_replaced_{stamp}{p.suffix}')
            os.replace(p, dst)
            moved.append(str(dst))
    return f"kept the old run as {', '.join(moved)}"


def elastic_resume(opt: argparse.Namespace) -> argparse.Namespace:
    """Under torchrun, whether this worker group continues weights/last.pt as --resume would: only when the checkpoint
    is this launch's (its saved elastic agents share one with this group's), so a restart after a worker or node loss
    continues and a relaunch of the same command (even with the same --rdzv-id) starts again. Rank 0 alone reads
    last.pt and every rank gets its decision; a collective, called by every rank once the process group exists."""
    if opt.resume or opt.evolve:
        return opt
    last = run_paths(Path(opt.save_dir))['last']
    agents = du.launch_agents()  # a collective: before rank 0 goes its own way
    decision = None
    if du.env_info().main:
        try:
            decision = _elastic_decision(last, agents, du.restart_count())
        except Exception as e:  # noqa: BLE001 - the other ranks wait for an answer: an error must reach them too
            decision = None, f'{last}: cannot decide whether to resume it ({type(e).__name__}: {e})', True
    resume, message, failed = du.broadcast_object(decision)
    if failed:
        raise CheckpointError(message)
    if message:
        LOGGER.info(message)
    if resume:
        readable = du.all_gather_object((socket.gethostname(), os.access(resume, os.R_OK)))
        missing = [f'rank {r} on {host}' for r, (host, ok) in enumerate(readable) if not ok]
        if missing:
            raise CheckpointError(f"{resume}: {', '.join(missing)} cannot read this launch's checkpoint; an elastic "
                                  f"restart needs --save-dir on a filesystem every node shares")
        opt.resume = resume
    return opt


def _elastic_decision(last: Path, agents: list[str], restart: int) -> tuple[str | None, str, bool]:
    """Rank 0's answer for elastic_resume: (checkpoint to resume or None, what to log ('' for nothing), whether the
    message is an error that stops every rank)."""
    # a node whose worker did not fail restarts for the new membership with its own count, possibly 0: the saved
    # agents decide, the count only words the message
    head = f'Elastic restart {restart}' if restart else 'Elastic restart (the worker group re-formed)'
    if not last.is_file():
        return None, (f'{head}: no checkpoint of this launch in {last.parent} yet, starting again'
                      if restart else ''), False
    try:
        run = read_run(last, require_options=False)  # its options are read only once it is this launch's
    except CheckpointError as e:
        if not restart:  # a new launch starts a new run over whatever is there, as without torchrun
            return None, '', False
        return None, f'{head}: {e}; not starting again over it (move it away to start a new run)', True
    if not du.same_launch(run.agents, agents):
        return None, (f"{head}: {last} is another launch's (none of its agents is in this group), starting again"
                      if restart else ''), False
    if run.finished:  # --resume's path then says so and exits 0
        return str(last), f"{head}: this launch's {last} is its finished run", False
    return str(last), f"{head}: resuming this launch's {last} at {run.resumes_at}", False
