"""One training epoch (train_one_epoch) and the schedule it follows: cosine LR, burn-in, accumulation, multi-scale.

train.py builds the model, optimizer, loaders and checkpoints; this module runs the batches, after torchvision's
references/detection/engine.py. Nothing here writes files (a stop request or a periodic save ends the pass at an
optimizer step and train.py saves) or talks to other ranks except the one all_reduce per optimizer step that agrees on
the loss check, a stop request and a periodic save.
"""
from __future__ import annotations

import itertools
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils.logs import LOGGER
from utils.torch_utils import ModelEMA, de_parallel
from utils.train import distributed as du
from utils.train.loss import ComputeLoss

GS = 32  # grid size: the largest stride; image sizes must be multiples of it
NBS = 64  # nominal batch size: gradients are accumulated up to it, and the loss is scaled by batch_size / NBS


class NonFiniteLossError(RuntimeError):
    """The loss became inf/nan; training stopped and the last checkpoint was kept."""


class CosineLR:
    """LR factor of epoch x: cosine from 1 at epoch 0 to lrf at `epochs` (a class so it pickles for DDP/tests)."""

    def __init__(self, epochs: int, lrf: float):
        self.epochs, self.lrf = epochs, lrf

    def __call__(self, x: float) -> float:
        return ((1 + math.cos(x * math.pi / self.epochs)) / 2) * (1 - self.lrf) + self.lrf


def n_burn_in(nb: int) -> int:
    """Burn-in (warmup) iterations: max(3 epochs, 500 iterations)."""
    return max(3 * nb, 500)


OPTIMIZER_GROUPS = ('other', 'conv_weight', 'bias')  # build_optimizer's param_group names, in the original's order


def build_optimizer(model: nn.Module, hyp: dict, adam: bool = False) -> torch.optim.Optimizer:
    """SGD (Nesterov) or Adam over three named param groups: 'other' (BatchNorm weights and the rest, no decay),
    'conv_weight' (convolution weights, decayed) and 'bias' (no decay); frozen parameters are left out."""
    params: dict[str, list[nn.Parameter]] = {name: [] for name in OPTIMIZER_GROUPS}
    for name, v in de_parallel(model).named_parameters():
        if not v.requires_grad:
            continue
        kind = 'bias' if name.endswith('.bias') else 'conv_weight' if name.endswith('Conv2d.weight') else 'other'
        params[kind].append(v)
    # every group is kept, an empty one too (no BN weights left after --freeze-layers), so saved states always match
    groups = [{'params': params[k], 'name': k} for k in OPTIMIZER_GROUPS]
    groups[OPTIMIZER_GROUPS.index('conv_weight')]['weight_decay'] = hyp['weight_decay']
    if adam:
        optimizer = torch.optim.Adam(groups, lr=hyp['lr0'])
    else:
        optimizer = torch.optim.SGD(groups, lr=hyp['lr0'], momentum=hyp['momentum'], nesterov=True)
    optimizer.register_load_state_dict_pre_hook(_keep_group_names)
    LOGGER.info(f"Optimizer groups: {len(params['bias'])} .bias, {len(params['conv_weight'])} Conv2d.weight, "
                f"{len(params['other'])} other")
    return optimizer


def _keep_group_names(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Loading an optimizer state replaces the group dicts: give groups saved without names (checkpoints older than
    the names) the names of this optimizer's groups, which build_optimizer made in the same order."""
    saved = state_dict['param_groups']
    if all('name' in g for g in saved) or len(saved) != len(optimizer.param_groups):
        return state_dict
    named = [{'name': own['name'], **g} if 'name' in own else g for g, own in zip(saved, optimizer.param_groups)]
    return {**state_dict, 'param_groups': named}


def warmup_values(ni: int, n_burn: int, lr_targets: dict[str, float], hyp: dict, batch_size: int) -> dict[str, Any]:
    """Burn-in at integrated batch ni: the LR and weight decay of each named group (lr_targets: group name -> LR to
    reach), momentum, the loss's objectness GIoU ratio gr and the accumulation count.

    As the original: the 'bias' LR falls 0.1 -> its target, the other LRs rise 0 -> target, only 'conv_weight' decays
    (0 -> hyp['weight_decay']), momentum 0.9 -> hyp['momentum'], gr 0 -> 1, accumulate 1 -> NBS / batch_size, all
    linear over n_burn iterations.
    """
    xi = [0, n_burn]
    return {'lr': {k: float(np.interp(ni, xi, [0.1 if k == 'bias' else 0.0, t])) for k, t in lr_targets.items()},
            'weight_decay': {k: float(np.interp(ni, xi, [0.0, hyp['weight_decay'] if k == 'conv_weight' else 0.0]))
                             for k in lr_targets},
            'momentum': float(np.interp(ni, xi, [0.9, hyp['momentum']])),
            'gr': float(np.interp(ni, xi, [0.0, 1.0])),
            'accumulate': max(1, int(np.interp(ni, xi, [1, NBS / batch_size]).round()))}


def multi_scale_size(rng: random.Random, grid_min: int, grid_max: int) -> int:
    """A random training size, a multiple of 32 between grid_min*32 and grid_max*32."""
    return rng.randrange(grid_min, grid_max + 1) * GS


def multi_scale_size_at(seed: int, ni: int, grid_min: int, grid_max: int) -> int:
    """The multi-scale size of integrated batch ni, a function of (seed, ni) alone: every DDP rank and a run resumed
    at any batch draw the same sizes as an uninterrupted run."""
    return multi_scale_size(random.Random(seed * 1_000_003 + ni), grid_min, grid_max)


def resize_batch(imgs: torch.Tensor, img_size: int) -> torch.Tensor:
    """Resize a batch (B, 3, H, W) so its long side is img_size, each side rounded up to a multiple of 32."""
    sf = img_size / max(imgs.shape[2:])
    if sf == 1:
        return imgs
    ns = [math.ceil(x * sf / GS) * GS for x in imgs.shape[2:]]
    return F.interpolate(imgs, size=ns, mode='bilinear', align_corners=False)


@dataclass
class Parts:
    """What set-up builds for the loop: the model (DDP-wrapped under torchrun) and everything that steps with it."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lf: CosineLR  # the schedule's LR factor of an epoch
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None  # rank 0 only: it tests and saves
    compute_loss: Any  # ComputeLoss or DarknetLoss: loss_fn(pred, targets, gr) -> (loss, (4,) items)


@dataclass(frozen=True)
class LoopConfig:
    """What the batch loop needs to know and never changes during a run."""
    hyp: dict[str, float]
    lf: Callable[[float], float]  # LR factor of an epoch (CosineLR)
    n_burn: int  # burn-in iterations
    batch_size: int  # images per optimizer micro-step over all ranks: the loss is scaled by batch_size / NBS
    epochs: int
    amp_dtype: torch.dtype | None = None  # autocast dtype, None for fp32
    channels_last: bool = False
    multi_scale: tuple[int, int] | None = None  # (grid_min, grid_max) for multi-scale training
    distributed: bool = False  # DDP: gradients all-reduced only on optimizer steps (no_sync on micro-steps)
    show: bool = True  # progress bar (rank 0)
    seed: int = 0  # multi-scale sizes are drawn from (seed, ni)
    device: torch.device = torch.device('cpu')  # where the model is: batches go there
    checkpoint_name: str = 'weights/last.pt'  # the checkpoint a non-finite loss error points back to


@dataclass(frozen=True)
class LoopState:
    """Progress carried from batch to batch and epoch to epoch (and saved for --resume)."""
    last_opt_step: int = -1  # integrated batch of the last optimizer step
    accumulate: int = 1  # batches per optimizer step (ramped 1 -> NBS / batch during burn-in)
    img_size: int = 0  # current multi-scale size
    gr: float | None = None  # the loss's objectness GIoU ratio (burn-in ramps it 0 -> 1; None: 1.0)
    batch: int = 0  # the next batch to train inside the epoch: 0 at an epoch's start (and end), else a pause point
    mloss: torch.Tensor | None = field(default=None, compare=False)  # (4,) running mean losses of batches < batch


@dataclass(frozen=True)
class EpochStats:
    """Mean losses of the epoch and the shape of its last batch, as results.txt reports them."""
    mloss: tuple[float, float, float, float]  # GIoU, obj, cls, total
    targets: int
    img_size: int
    stop: bool = False  # a rank asked to stop (SIGTERM, SIGUSR1): agreed at an optimizer step
    first_batch: tuple | None = field(default=None, compare=False)  # the run's very first (imgs, targets, paths)


class RunControl:
    """Stop requests and periodic saves for long runs: SIGTERM / SIGUSR1 (SLURM, spot instances) only set a flag,
    which the loop acts on at its next optimizer step; save_period_s > 0 also asks for a save that often (give it
    on rank 0 only, which saves: its clock decides for every rank). Ctrl-C (SIGINT) keeps its behaviour."""

    SIGNALS = ('SIGTERM', 'SIGUSR1')

    def __init__(self, save_period_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.save_period_s, self.clock = save_period_s, clock
        self.signum: int | None = None  # the signal that asked to stop
        self.last_save = clock()
        self._previous: dict[int, Any] = {}

    @property
    def stop_requested(self) -> bool:
        """True once a stop signal arrived in this process."""
        return self.signum is not None

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """The signal handler: note the request and nothing else (the loop stops at a step boundary)."""
        self.signum = signum

    def save_due(self) -> bool:
        """True when the save period has passed since the last save (or the start)."""
        return self.save_period_s > 0 and self.clock() - self.last_save >= self.save_period_s

    def saved(self) -> None:
        """Restart the save period."""
        self.last_save = self.clock()

    def install(self) -> RunControl:
        """Route SIGTERM and SIGUSR1 to request_stop (main thread only); DataLoader workers forked later inherit the
        handler, so a signal sent to the whole process group does not kill them mid-epoch. Outside the main thread
        (where Python cannot set handlers) signals keep their behaviour."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self.request_stop)
        return self

    def uninstall(self) -> None:
        """Put back the handlers install() replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def progress_row(epoch: int, epochs: int, mem: str, mloss: Iterable[float], targets: int, img_size: int) -> str:
    """The progress bar's line, which also starts each results.txt row."""
    return ('%10s' * 2 + '%10.3g' * 6) % (f'{epoch}/{epochs - 1}', mem, *mloss, targets, img_size)


def memory_used(device: torch.device) -> str:
    """Memory for the progress bar: CUDA memory reserved, or the process's peak RSS on the CPU (GB)."""
    if device.type == 'cuda':
        return f'{torch.cuda.memory_reserved(device) / 1e9:.3g}G'
    try:
        import resource
        return f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.3g}G'  # Linux: KiB
    except ImportError:
        return '0G'


class FiniteGuard:
    """Watches the loss for inf/nan without a host sync per batch: the check is kept on the device and read (and,
    under DDP, agreed across ranks, so no rank stops alone and hangs the others) only when asked, at optimizer
    steps and at the end of an epoch, before a bad gradient can reach the weights."""

    def __init__(self, device: torch.device):
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.batch = torch.full((), -1, dtype=torch.long, device=device)  # first bad batch of this rank
        self.items = torch.zeros(4, device=device)  # its loss items
        # [not stop, not save] on the host, pinned on CUDA so its copy to the device does not block; reused: each
        # agree() reads the reduced flags back before the next one refills it
        self._host_flags = torch.ones(2, pin_memory=device.type == 'cuda')

    def record(self, i: int, loss: torch.Tensor, items: torch.Tensor) -> None:
        """Note batch i's loss (device ops only)."""
        self.batch = torch.where(self.ok, i, self.batch)
        self.items = torch.where(self.ok, items.to(self.items.dtype), self.items)
        self.ok = self.ok & torch.isfinite(loss.detach()).all()

    def check(self, epoch: int, where: str) -> None:
        """Raise NonFiniteLossError when any rank saw a non-finite loss since the start."""
        self.agree(epoch, where)

    def agree(self, epoch: int, where: str, stop: bool = False, save: bool = False) -> tuple[bool, bool]:
        """One all_reduce (MIN) of [finite, not stop, not save] across ranks: raise NonFiniteLossError when any rank
        saw a non-finite loss, else return (any rank asked to stop, a save is due)."""
        if du.is_initialized():
            self._host_flags[0], self._host_flags[1] = float(not stop), float(not save)
            flags = torch.cat([self.ok.float().reshape(1), self._host_flags.to(self.ok.device, non_blocking=True)])
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
            finite, go_on, no_save = flags.tolist()  # the one host read per optimizer step
            stop, save = not go_on, not no_save
        else:
            finite = bool(self.ok.item())
        if finite:
            return stop, save
        if not self.ok.item():
            g, o, c, t = self.items.tolist()
            raise NonFiniteLossError(f'non-finite loss at epoch {epoch}, batch {int(self.batch.item())}: GIoU {g:.4g}, '
                                     f'obj {o:.4g}, cls {c:.4g}, total {t:.4g}; stopped, {where} is the last good '
                                     f'checkpoint')
        raise NonFiniteLossError(f'non-finite loss on another rank at epoch {epoch}; stopped, {where} is the last '
                                 f'good checkpoint')


def burn_in(optimizer: torch.optim.Optimizer, ni: int, epoch: int, cfg: LoopConfig) -> tuple[int, float]:
    """Set the burn-in LRs, weight decays and momentum of integrated batch ni in the optimizer's named groups;
    return (the accumulation count, the loss's gr)."""
    unnamed = [k for k, g in enumerate(optimizer.param_groups) if 'name' not in g]
    if unnamed:
        raise ValueError(f'optimizer param groups {unnamed} have no name: burn-in needs the groups build_optimizer '
                         f'makes ({", ".join(OPTIMIZER_GROUPS)})')
    groups = {g['name']: g for g in optimizer.param_groups}
    w = warmup_values(ni, cfg.n_burn, {k: g['initial_lr'] * cfg.lf(epoch) for k, g in groups.items()}, cfg.hyp,
                      cfg.batch_size)
    for k, g in groups.items():
        g['lr'], g['weight_decay'] = w['lr'][k], w['weight_decay'][k]
        if 'momentum' in g:
            g['momentum'] = w['momentum']
    return w['accumulate'], w['gr']


def train_one_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    compute_loss: ComputeLoss, ema: ModelEMA | None, epoch: int, state: LoopState, cfg: LoopConfig,
                    control: RunControl | None = None) -> tuple[LoopState, EpochStats]:
    """Train the batches of one epoch from batch state.batch (with its running mean losses state.mloss); return the
    state to continue from and the epoch's mean losses.

    An optimizer step (and EMA update) every state.accumulate batches, counted across epochs as the original. At each
    optimizer step the ranks agree on control's stop request and periodic save (one collective, with the loss
    check); either one ends the pass there, before the epoch's last batch, with the returned state.batch > 0: the
    next batch, an exact resume point (no gradients are pending right after an optimizer step). The caller saves and
    stops, or calls again with that state to go on. At the epoch's end state.batch is 0.
    """
    device, start = cfg.device, state.batch
    model.train()
    nb = len(loader)
    last_opt_step, accumulate, img_size = state.last_opt_step, state.accumulate, state.img_size
    gr = 1.0 if state.gr is None else state.gr  # the loss's objectness GIoU ratio, ramped during burn-in
    autocast = nullcontext() if cfg.amp_dtype is None else torch.autocast(device.type, dtype=cfg.amp_dtype)
    guard = FiniteGuard(device)
    mloss = torch.zeros(4, device=device) if state.mloss is None or not start else state.mloss.to(device)
    targets, imgs, first, paused, stop = torch.zeros(0, 6), torch.zeros(0, 3, img_size, img_size), None, 0, False
    sampler = getattr(loader, 'sampler', None)
    if start and hasattr(sampler, 'set_start'):  # the sampler skips the done batches without loading them
        sampler.set_start(start)
        batches = enumerate(loader, start)
    else:
        batches = itertools.islice(enumerate(loader), start, None)
    pbar = tqdm(batches, total=nb, initial=start, disable=not cfg.show, bar_format='{l_bar}{bar:10}{r_bar}')
    for i, (imgs, targets, paths, _) in pbar:
        ni = i + nb * epoch  # batches since the start of training
        imgs = imgs.to(device, non_blocking=True).float() / 255.0  # uint8 (B, 3, H, W) -> [0, 1]
        targets = targets.to(device, non_blocking=True)  # (n, 6) [image, class, x, y, w, h]
        if ni <= cfg.n_burn:
            accumulate, gr = burn_in(optimizer, ni, epoch, cfg)
        if cfg.multi_scale:
            if ni % accumulate == 0:  # a new size every accumulation step
                img_size = multi_scale_size_at(cfg.seed, ni, *cfg.multi_scale)
            imgs = resize_batch(imgs, img_size)
        if cfg.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)

        step = ni - last_opt_step >= accumulate
        # DDP all-reduces gradients in backward(): on micro-steps that would be wasted traffic
        no_sync = model.no_sync() if cfg.distributed and not step else nullcontext()
        with no_sync:
            with autocast:
                pred = model(imgs)
            loss, loss_items = compute_loss(pred, targets, gr)
            scaler.scale(loss * (cfg.batch_size / NBS)).backward()  # as the original: scaled to the nominal batch
        guard.record(i, loss, loss_items)

        save = False
        if step:
            # before the (possibly non-finite) gradients reach the weights; the same collective carries the stop
            # request (any rank's) and the periodic save (rank 0's clock)
            stop, save = guard.agree(epoch, cfg.checkpoint_name, control is not None and control.stop_requested,
                                     control is not None and control.save_due())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            last_opt_step = ni

        mloss = (mloss * i + loss_items) / (i + 1)  # on the device: no sync unless shown
        # reading the losses waits for the GPU: on CUDA refresh the bar every 10 batches so the host can run ahead
        if cfg.show and (device.type != 'cuda' or i % 10 == 0 or i == nb - 1):
            pbar.set_description(progress_row(epoch, cfg.epochs, memory_used(device), mloss.tolist(),
                                              targets.shape[0], imgs.shape[-1]))
        if ni == 0:
            first = (imgs, targets, paths)
        if (stop or save) and i + 1 < nb:  # after the epoch's last batch the end-of-epoch checkpoint takes its place
            paused = i + 1
            break
    pbar.close()
    guard.check(epoch, cfg.checkpoint_name)  # micro-steps after the last optimizer step
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    stats = EpochStats(tuple(mloss.tolist()), int(targets.shape[0]), int(imgs.shape[-1]), stop, first)
    return LoopState(last_opt_step, accumulate, img_size, gr, paused, mloss if paused else None), stats
