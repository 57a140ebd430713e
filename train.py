"""Train a YOLOv3 model on a Darknet .data / YAML dataset.

    python train.py --cfg cfg/yolov3-tiny.cfg --data data/coco128.data --weights weights/yolov3-tiny.weights
    python train.py --resume                       # continue the interrupted run in this directory (weights/last.pt)
    python train.py --evolve 10 --epochs 1          # hyperparameter evolution into evolve.txt
    python -m torch.distributed.run --nproc_per_node 2 train.py ...   # DDP (NCCL on CUDA, gloo on the CPU)

Outputs, as the original: results.txt and weights/last.pt, weights/best.pt in the working directory (--save-dir to
put them elsewhere); --name X renames them results_X.txt, weights/last_X.pt, weights/best_X.pt at the end.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from tqdm import tqdm

import test as val  # test.py: test() is called in-process after each epoch
from models import (CheckpointError, Darknet, WeightsError, YOLOLayer, attempt_download, load_checkpoint,
                    load_weights, model_checkpoint, save_checkpoint)
from utils import distributed as du
from utils.data_config import DatasetError, check_dataset, load_data_config
from utils.datasets import create_dataloader
from utils.loss import ComputeLoss
from utils.metrics import fitness
from utils.parse_config import ConfigError
from utils.plots import plot_images, plot_results
from utils.torch_utils import ModelEMA, count_parameters, de_parallel, init_seeds, select_device

ROOT = Path(__file__).resolve().parent
GS = 32  # grid size: the largest stride; image sizes must be multiples of it
NBS = 64  # nominal batch size: gradients are accumulated up to it, and the loss is scaled by batch_size / NBS
RESULTS_HEADER = ('Epoch', 'mem', 'GIoU', 'obj', 'cls', 'total', 'targets', 'img_size')
RESULTS_COLUMNS = RESULTS_HEADER + ('P', 'R', 'mAP@0.5', 'mAP@0.5:0.95', 'F1', 'val GIoU', 'val obj', 'val cls')


class NonFiniteLossError(RuntimeError):
    """The loss became inf/nan; training stopped and the last checkpoint was kept."""


class CosineLR:
    """LR factor of epoch x: cosine from 1 at epoch 0 to lrf at `epochs` (a class so it pickles for DDP/tests)."""

    def __init__(self, epochs: int, lrf: float):
        self.epochs, self.lrf = epochs, lrf

    def __call__(self, x: float) -> float:
        return ((1 + math.cos(x * math.pi / self.epochs)) / 2) * (1 - self.lrf) + self.lrf


# ------------------------------------------------------------------------------------------------------------------
# command line

def get_args_parser() -> argparse.ArgumentParser:
    """The argument parser (the original's flags plus --hyp, --workers, --seed, --amp, DDP and resume options)."""
    p = argparse.ArgumentParser(description='Train YOLOv3 (ultralytics/yolov3 archive port)')
    p.add_argument('--epochs', type=int, default=300, help='number of epochs')
    p.add_argument('--batch-size', type=int, default=16, help='total batch size (all DDP ranks together)')
    p.add_argument('--cfg', type=str, default='cfg/yolov3-spp.cfg', help='model .cfg path')
    p.add_argument('--data', type=str, default='data/coco2017.data', help='dataset .data or .yaml path')
    p.add_argument('--hyp', type=str, default=str(ROOT / 'data' / 'hyp.scratch.yaml'), help='hyperparameter YAML')
    p.add_argument('--multi-scale', action='store_true', help='vary img_size 67%%-150%% every accumulation step')
    p.add_argument('--img-size', nargs='+', type=int, default=[320, 640],
                   help='train min, train max, test sizes (one value: all three); multiples of 32')
    p.add_argument('--rect', action='store_true', help='rectangular training batches')
    p.add_argument('--resume', nargs='?', const=True, default=False,
                   help='resume weights/last.pt of this directory, or the given last.pt')
    p.add_argument('--nosave', action='store_true', help='only save the final checkpoint')
    p.add_argument('--notest', action='store_true', help='only test the final epoch')
    p.add_argument('--evolve', nargs='?', type=int, const=300, default=0,
                   help='evolve hyperparameters for N generations (300 when given bare)')
    p.add_argument('--cache-images', action='store_true', help='cache decoded images in RAM')
    p.add_argument('--weights', type=str, default='weights/yolov3-spp.weights',
                   help="initial weights: Darknet .weights/.conv.N, a .pt checkpoint, or '' for random init")
    p.add_argument('--name', default='', help='rename results.txt to results_name.txt, weights likewise, at the end')
    p.add_argument('--save-dir', type=str, default='.', help='folder for results.txt and weights/ (default: here)')
    p.add_argument('--device', default='', help="cuda device: '0' or '0,1', or 'cpu'")
    p.add_argument('--adam', action='store_true', help='Adam instead of SGD with Nesterov momentum')
    p.add_argument('--single-cls', action='store_true', help='train every class as class 0')
    p.add_argument('--freeze-layers', action='store_true', help='train only the convolutions feeding [yolo] layers')
    p.add_argument('--freeze', type=int, default=0, help='freeze the first N modules of the model')
    p.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm across DDP ranks')
    p.add_argument('--workers', type=int, default=8, help='maximum DataLoader workers per rank')
    p.add_argument('--seed', type=int, default=0, help='global training seed')
    p.add_argument('--deterministic', action='store_true', help='deterministic algorithms (slower)')
    p.add_argument('--amp', choices=('auto', 'off', 'fp16', 'bf16'), default='auto',
                   help='mixed precision: auto = fp16 + GradScaler on CUDA, off on the CPU')
    return p


def parse_opt(args: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (args for tests) and expand --img-size to [min, max, test]."""
    opt = get_args_parser().parse_args(args)
    opt.img_size = list(opt.img_size) + [opt.img_size[-1]] * (3 - len(opt.img_size))
    return opt


def check_img_sizes(img_size: list[int], multi_scale: bool) -> tuple[int, int, int, int, int]:
    """(train size, test size, grid_min, grid_max, ...) from [min, max, test]; sizes must be multiples of 32.

    Returns (imgsz_train, imgsz_test, grid_min, grid_max, multi): the loader makes imgsz_train (the largest) images;
    multi-scale picks sizes grid_min*32 ... grid_max*32; one size given with --multi-scale means 0.67x-1.5x of it.
    """
    if len(img_size) != 3:
        raise ValueError(f'--img-size takes 1 to 3 values (train min, train max, test), got {img_size}')
    imgsz_min, imgsz_max, imgsz_test = img_size
    for s in img_size:
        if s <= 0 or s % GS:
            raise ValueError(f'--img-size {s} must be a positive multiple of {GS} (the grid size)')
    if imgsz_min > imgsz_max:
        raise ValueError(f'--img-size: train min {imgsz_min} is larger than train max {imgsz_max}')
    multi = multi_scale or imgsz_min != imgsz_max
    if multi and imgsz_min == imgsz_max:  # as the original: 320 -> 192..448
        imgsz_min, imgsz_max = imgsz_min // 1.5, imgsz_max // 0.667
    grid_min, grid_max = int(imgsz_min // GS), int(imgsz_max // GS)
    return grid_max * GS, imgsz_test, grid_min, grid_max, multi


def load_hyp(path: str | Path) -> dict[str, float]:
    """Read a hyperparameter YAML; missing keys are an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: hyperparameter file not found')
    hyp = yaml.safe_load(path.read_text())
    required = ('giou', 'cls', 'cls_pw', 'obj', 'obj_pw', 'iou_t', 'lr0', 'lrf', 'momentum', 'weight_decay',
                'fl_gamma', 'hsv_h', 'hsv_s', 'hsv_v', 'degrees', 'translate', 'scale', 'shear')
    if not isinstance(hyp, dict):
        raise ValueError(f'{path}: expected a mapping of hyperparameter: value')
    missing = [k for k in required if k not in hyp]
    if missing:
        raise ValueError(f'{path}: missing hyperparameters {missing}')
    bad = [k for k, v in hyp.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f'{path}: non-numeric values for {bad}')
    return {k: float(v) for k, v in hyp.items()}


# ------------------------------------------------------------------------------------------------------------------
# optimizer, schedule, freezing

def build_optimizer(model: nn.Module, hyp: dict, adam: bool = False,
                    log: Callable[[str], None] = print) -> torch.optim.Optimizer:
    """The original's three groups: 0 = BN and other weights (no decay), 1 = conv weights (decay), 2 = biases."""
    pg0, pg1, pg2 = [], [], []
    for name, v in de_parallel(model).named_parameters():
        if not v.requires_grad:
            continue  # frozen: kept out of the optimizer
        if name.endswith('.bias'):
            pg2.append(v)
        elif name.endswith('Conv2d.weight'):
            pg1.append(v)
        else:
            pg0.append(v)
    # groups given as dicts so an empty one (e.g. no BN weights left after --freeze-layers) keeps the group indices
    groups = [{'params': pg0}, {'params': pg1, 'weight_decay': hyp['weight_decay']}, {'params': pg2}]
    if adam:
        optimizer = torch.optim.Adam(groups, lr=hyp['lr0'])
    else:
        optimizer = torch.optim.SGD(groups, lr=hyp['lr0'], momentum=hyp['momentum'], nesterov=True)
    log(f'Optimizer groups: {len(pg2)} .bias, {len(pg1)} Conv2d.weight, {len(pg0)} other')
    return optimizer


def n_burn_in(nb: int) -> int:
    """Burn-in (warmup) iterations: as the original, max(3 epochs, 500 iterations)."""
    return max(3 * nb, 500)


def warmup_values(ni: int, n_burn: int, lr_targets: list[float], hyp: dict, batch_size: int) -> dict[str, Any]:
    """Burn-in at integrated batch ni: LRs and weight decays of the three groups, momentum, obj GIoU ratio gr,
    accumulation count.

    As the original: bias LR (group 2) falls 0.1 -> its target, other LRs rise 0 -> target, conv weight decay
    (group 1) rises 0 -> hyp['weight_decay'], momentum 0.9 -> hyp['momentum'], gr 0 -> 1, accumulate
    1 -> NBS / batch_size, all linear over n_burn iterations.
    """
    xi = [0, n_burn]
    return {'lr': [float(np.interp(ni, xi, [0.1 if j == 2 else 0.0, t])) for j, t in enumerate(lr_targets)],
            'weight_decay': [float(np.interp(ni, xi, [0.0, hyp['weight_decay'] if j == 1 else 0.0]))
                             for j in range(len(lr_targets))],
            'momentum': float(np.interp(ni, xi, [0.9, hyp['momentum']])),
            'gr': float(np.interp(ni, xi, [0.0, 1.0])),
            'accumulate': max(1, int(np.interp(ni, xi, [1, NBS / batch_size]).round()))}


def multi_scale_size(rng: random.Random, grid_min: int, grid_max: int) -> int:
    """A random training size, a multiple of 32 between grid_min*32 and grid_max*32."""
    return rng.randrange(grid_min, grid_max + 1) * GS


def resize_batch(imgs: torch.Tensor, img_size: int) -> torch.Tensor:
    """Resize a batch (B, 3, H, W) so its long side is img_size, each side rounded up to a multiple of 32."""
    sf = img_size / max(imgs.shape[2:])
    if sf == 1:
        return imgs
    ns = [math.ceil(x * sf / GS) * GS for x in imgs.shape[2:]]
    return F.interpolate(imgs, size=ns, mode='bilinear', align_corners=False)


def freeze_modules(model: Darknet, freeze_layers: bool = False, freeze: int = 0) -> tuple[int, int]:
    """Freeze (requires_grad False) all but the convolutions feeding [yolo] layers, and/or the first `freeze`
    modules; returns (frozen, trainable) parameter counts."""
    keep_only = None
    if freeze_layers:  # as the original: the module before each [yolo] layer (and the [yolo] layers) stay trainable
        heads = [i - 1 for i, m in enumerate(model.module_list) if isinstance(m, YOLOLayer)]
        keep_only = {i for i in range(len(model.module_list)) if i in heads or i - 1 in heads}
    for i, m in enumerate(model.module_list):
        if (keep_only is not None and i not in keep_only) or i < freeze:
            for q in m.parameters():
                q.requires_grad_(False)
    n_all, n_train = count_parameters(model)
    return n_all - n_train, n_train


# ------------------------------------------------------------------------------------------------------------------
# checkpoint state

def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """All RNG states as tensors and plain values (loadable with weights_only=True)."""
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
    """Restore what rng_state() saved."""
    random.setstate(_pystate_from(state['python']))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if loader_generator is not None and 'loader' in state:
        loader_generator.set_state(state['loader'])


def plain(x: Any) -> Any:
    """Options as plain python (paths as strings) for weights_only checkpoints and YAML."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def run_checkpoint(ema: ModelEMA, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   hyp: dict, opt: argparse.Namespace, **state: Any) -> dict:
    """Everything --resume needs, as tensors and plain values: the EMA model (what test/detect use), the raw model,
    optimizer, GradScaler, EMA update count, hyp, options, seed, cfg text, plus the given state (epoch, ...)."""
    ckpt = model_checkpoint(ema.ema, optimizer=optimizer.state_dict(),
                            model_train={k: v.detach().cpu() for k, v in de_parallel(model).state_dict().items()},
                            ema_updates=ema.updates, scaler=scaler.state_dict(), hyp=dict(hyp),
                            opt=plain(vars(opt)), seed=opt.seed, **state)
    for k in ('model', 'model_train'):  # NCHW (contiguous) tensors whatever layout training used
        ckpt[k] = {n: v.contiguous() for n, v in ckpt[k].items()}
    return ckpt


def strip_optimizer(path: str | Path) -> None:
    """Drop the optimizer and training-only state from a checkpoint (for a smaller final file), atomically."""
    ckpt = load_checkpoint(path)
    for k in ('optimizer', 'model_train', 'scaler'):
        ckpt[k] = None
    save_checkpoint(ckpt, path)


def run_paths(save_dir: Path, name: str = '') -> dict[str, Path]:
    """results.txt, weights/last.pt, weights/best.pt under save_dir; with a name, the final (renamed) paths."""
    w = save_dir / 'weights'
    if not name:
        return {'results': save_dir / 'results.txt', 'last': w / 'last.pt', 'best': w / 'best.pt'}
    n = name if name.isnumeric() else '_' + name  # as the original: results_x.txt but results2.txt
    return {'results': save_dir / f'results{n}.txt', 'last': w / f'last{n}.pt', 'best': w / f'best{n}.pt'}


# ------------------------------------------------------------------------------------------------------------------
# training

def build_model(opt: argparse.Namespace, hyp: dict[str, float], nc: int, names: list[str], imgsz: int,
                ckpt: dict | None, log: Callable[[str], None] = print) -> Darknet:
    """The Darknet model of opt.cfg with its starting weights (the resumed checkpoint's raw weights, a .pt's matching
    tensors, or Darknet weights), frozen layers and class names."""
    main_proc = du.env_info().main
    model = Darknet(opt.cfg, img_size=imgsz)
    if model.nc != nc:
        raise ValueError(f"{opt.cfg} has {model.nc} classes but {opt.data} has {nc}"
                         f"{' (--single-cls)' if opt.single_cls else ''}; use a cfg with classes={nc}")
    weights = str(opt.weights or '')
    if ckpt is not None:
        model.load_state_dict(ckpt['model_train'] if ckpt.get('model_train') else ckpt['model'])
    elif weights:
        if main_proc and not weights.endswith('.pt'):
            attempt_download(weights)  # official Darknet files only
        du.barrier()
        load_weights(model, weights, verbose=main_proc)  # .pt: matching tensors; else Darknet weights
    if opt.freeze_layers or opt.freeze:
        frozen, trainable = freeze_modules(model, opt.freeze_layers, opt.freeze)
        log(f'Frozen {frozen:,} parameters, training {trainable:,}')
    model.names = names
    if main_proc:
        model.info(img_size=imgsz)
    return model


def train(hyp: dict[str, float], opt: argparse.Namespace, device: torch.device,
          log: Callable[[str], None] = print, epoch_times: list | None = None) -> tuple[float, ...]:
    """Train as opt says; return the last results (P, R, mAP@0.5, mAP@0.5:0.95, F1, val GIoU, val obj, val cls).

    epoch_times, when given, receives (epoch, training seconds, images) per epoch (for benchmarks; test excluded).
    """
    info = du.env_info()
    main_proc = info.main
    world = info.world_size
    if not main_proc:
        log = _quiet  # rank 0 alone talks
    save_dir = Path(opt.save_dir)
    paths = run_paths(save_dir)
    evolve = bool(opt.evolve)
    cuda = device.type == 'cuda'
    if opt.batch_size % world:
        raise ValueError(f'--batch-size {opt.batch_size} must be a multiple of the number of processes {world}')
    if opt.sync_bn and info.distributed and not cuda:
        raise ValueError('--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation); leave it out '
                         'for DDP on the CPU')
    if opt.sync_bn and not info.distributed:
        log('--sync-bn has no effect in a single process')
    imgsz, imgsz_test, grid_min, grid_max, multi_scale = check_img_sizes(opt.img_size, opt.multi_scale)
    init_seeds(opt.seed + 1 + max(info.rank, 0), deterministic=opt.deterministic)
    ms_rng = random.Random(opt.seed)  # multi-scale sizes: same stream on every rank so DDP shapes match

    # data
    data = load_data_config(opt.data)
    if main_proc:
        check_dataset(data)  # downloads a missing dataset if the config says how
    du.barrier()
    nc = 1 if opt.single_cls else data['nc']
    names = ['object'] if opt.single_cls and data['nc'] != 1 else data['names']

    # model
    ckpt = load_checkpoint(opt.resume) if opt.resume else None
    model = build_model(opt, hyp, nc, names, imgsz, ckpt, log)
    model.to(device)
    # NHWC on the CPU: oneDNN convolutions without layout conversions, about 1.2x faster forward + backward
    channels_last = device.type == 'cpu'
    if channels_last:
        model.to(memory_format=torch.channels_last)

    # optimizer, schedule, AMP
    optimizer = build_optimizer(model, hyp, opt.adam, log)
    lf = CosineLR(opt.epochs, hyp['lrf'])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    amp = opt.amp if opt.amp != 'auto' else ('fp16' if cuda else 'off')
    amp_dtype = {'off': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}[amp]
    autocast = nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model) if main_proc else None
    loss_hyp = {**hyp, 'cls': hyp['cls'] * nc / 80}  # as the original: the class gain was tuned for COCO's 80 classes
    compute_loss = ComputeLoss(model, loss_hyp)  # gr: objectness target = GIoU (burn-in ramps it from 0)

    start_epoch, best_fitness, last_opt_step = 0, 0.0, -1
    if ckpt is not None:  # resume: everything back where the last completed epoch left it
        if ckpt.get('optimizer') is not None:
            optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        if ema is not None:
            ema.ema.load_state_dict(ckpt['model'])
            ema.updates = int(ckpt.get('ema_updates', 0))
        start_epoch = int(ckpt['epoch']) + 1
        best_fitness = float(ckpt.get('best_fitness', 0.0))
        last_opt_step = int(ckpt.get('last_opt_step', -1))
        scheduler.last_epoch = start_epoch - 1
        for g in optimizer.param_groups:  # LR of the epoch we continue with (no second warmup: ni keeps counting)
            g['lr'] = g['initial_lr'] * lf(start_epoch)
        if main_proc:
            paths['results'].write_text(ckpt.get('training_results') or '')
        log(f"Resuming {opt.resume} from epoch {start_epoch} of {opt.epochs}")

    # DDP
    if info.distributed:
        if opt.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            log('Using SyncBatchNorm')
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    bare = de_parallel(model)

    # loaders
    loader, dataset = create_dataloader(data['train'], imgsz, opt.batch_size // world, GS, hyp=hyp, augment=True,
                                        cache=opt.cache_images, rect=opt.rect, rank=info.rank, world_size=world,
                                        workers=opt.workers, single_cls=opt.single_cls, seed=opt.seed, nc=data['nc'],
                                        prefix='train: ')
    nb = len(loader)
    testloader = None
    if main_proc:
        testloader = create_dataloader(data['valid'], imgsz_test, opt.batch_size, GS, hyp=hyp, augment=False,
                                       cache=opt.cache_images, rect=True, rank=-1, workers=opt.workers,
                                       single_cls=opt.single_cls, shuffle=False, nc=data['nc'], prefix='val: ')[0]
    if ckpt is not None and ckpt.get('rng'):
        if main_proc:  # the saved states are rank 0's
            set_rng_state(ckpt['rng'], loader.generator)
        else:  # other ranks: fresh streams of their own, distinct per rank and per resume point
            init_seeds(opt.seed + 1 + info.rank + 1000 * start_epoch, deterministic=opt.deterministic)
            loader.generator.manual_seed(opt.seed + 1000 * info.rank + 1000003 * start_epoch)
        if 'multi_scale' in ckpt['rng']:
            ms_rng.setstate(_pystate_from(ckpt['rng']['multi_scale']))
    del ckpt

    tb = None
    if main_proc and not evolve:
        for f in ([] if opt.resume else list(save_dir.glob('train_batch*.jpg'))):
            f.unlink()
        if not opt.resume and paths['results'].exists():
            paths['results'].unlink()  # as the original: a new run starts a new results.txt
        tb = _tensorboard(save_dir, opt.name, log)

    n_burn = n_burn_in(nb)
    batch_size = loader.batch_size * world  # as the original: at most the number of training images
    accumulate = max(round(NBS / batch_size), 1)
    results = (0.0,) * 8
    t0 = time.time()
    log(f'Image sizes {grid_min * GS if multi_scale else imgsz} - {imgsz} train, {imgsz_test} test; '
        f'{loader.num_workers} dataloader workers; effective batch {batch_size * accumulate} '
        f'({batch_size} x {accumulate} accumulated, {world} process{"es" if world > 1 else ""}); '
        f'AMP {amp}; {n_burn} burn-in iterations')
    log(f'Starting training for {opt.epochs} epochs...')
    img_size = imgsz
    epoch = start_epoch
    for epoch in range(start_epoch, opt.epochs):
        model.train()
        if isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler):
            loader.sampler.set_epoch(epoch)
        mloss = torch.zeros(4, device=device)
        if main_proc:
            log(('\n' + '%10s' * 8) % RESULTS_HEADER)
        pbar = tqdm(enumerate(loader), total=nb, disable=not main_proc, bar_format='{l_bar}{bar:10}{r_bar}')
        s = ''
        t_epoch = time.perf_counter()
        seen: list[str] = []  # this rank's images this epoch (DDP: checked to be disjoint across ranks)
        for i, (imgs, targets, batch_paths, _) in pbar:
            ni = i + nb * epoch  # batches since the start of training
            if info.distributed:
                seen += [str(x) for x in batch_paths]
            imgs = imgs.to(device, non_blocking=True).float() / 255.0  # uint8 (B,3,H,W) -> [0, 1]
            targets = targets.to(device)  # (n, 6) [image, class, x, y, w, h]

            if ni <= n_burn:
                w = warmup_values(ni, n_burn, [g['initial_lr'] * lf(epoch) for g in optimizer.param_groups], hyp,
                                  batch_size)
                compute_loss.gr = w['gr']
                accumulate = w['accumulate']
                for g, lr, wd in zip(optimizer.param_groups, w['lr'], w['weight_decay']):
                    g['lr'], g['weight_decay'] = lr, wd
                    if 'momentum' in g:
                        g['momentum'] = w['momentum']

            if multi_scale:
                if ni % accumulate == 0:  # as the original: a new size every accumulation step
                    img_size = multi_scale_size(ms_rng, grid_min, grid_max)
                imgs = resize_batch(imgs, img_size)

            if channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            with autocast:
                pred = model(imgs)
            loss, loss_items = compute_loss(pred, targets)
            if not _all_finite(loss, device):
                raise NonFiniteLossError(
                    f'non-finite loss at epoch {epoch}, batch {i}: GIoU {loss_items[0]:.4g}, obj {loss_items[1]:.4g}, '
                    f'cls {loss_items[2]:.4g}, total {loss_items[3]:.4g}; stopped, {paths["last"]} is the last good '
                    f'checkpoint')
            scaler.scale(loss * (batch_size / NBS)).backward()  # as the original: scaled to the nominal batch

            if ni - last_opt_step >= accumulate:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                last_opt_step = ni

            if main_proc:
                mloss = (mloss * i + loss_items) / (i + 1)
                s = ('%10s' * 2 + '%10.3g' * 6) % (f'{epoch}/{opt.epochs - 1}', _mem(device), *mloss.tolist(),
                                                   targets.shape[0], imgs.shape[-1])
                pbar.set_description(s)
                if ni == 0 and not evolve:
                    mosaic = plot_images(imgs, targets, batch_paths, fname=save_dir / 'train_batch0.jpg', names=names)
                    if tb is not None:
                        tb.add_image('train_batch0', mosaic, epoch, dataformats='HWC')
        pbar.close()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if epoch_times is not None:
            epoch_times.append((epoch, time.perf_counter() - t_epoch, len(dataset)))

        if info.distributed:
            per_rank = du.all_gather_object(sorted(set(seen)))
            if main_proc:
                shared = set(per_rank[0]).intersection(*per_rank[1:])
                log(f'DDP: distinct images per rank {[len(x) for x in per_rank]}, seen by every rank {len(shared)}')
        scheduler.step()
        final_epoch = epoch + 1 == opt.epochs
        if main_proc:
            ema.update_attr(bare)
            if not opt.notest or final_epoch:
                results, _, _ = val.test(opt.cfg, data, batch_size=opt.batch_size, imgsz=imgsz_test,
                                         model=ema.ema, dataloader=testloader, compute_loss=compute_loss,
                                         save_dir=save_dir, single_cls=opt.single_cls,
                                         multi_label=ni > n_burn, plots=final_epoch and not evolve)
                results = tuple(float(x) for x in results)
            row = s + '%10.4g' * 8 % results + '\n'
            if not evolve:
                with open(paths['results'], 'a') as f:
                    f.write(row)
            if tb is not None:
                tags = ['train/giou_loss', 'train/obj_loss', 'train/cls_loss', 'metrics/precision', 'metrics/recall',
                        'metrics/mAP_0.5', 'metrics/mAP_0.5:0.95', 'metrics/F1', 'val/giou_loss', 'val/obj_loss',
                        'val/cls_loss']
                for x, tag in zip(mloss[:3].tolist() + list(results), tags):
                    tb.add_scalar(tag, x, epoch)
            fi = float(fitness(np.array(results).reshape(1, -1))[0])
            improved = fi > best_fitness
            best_fitness = max(best_fitness, fi)
            if (not opt.nosave) or (final_epoch and not evolve):
                ckpt = run_checkpoint(ema, bare, optimizer, scaler, hyp, opt, epoch=epoch,
                                      best_fitness=best_fitness, last_opt_step=last_opt_step,
                                      training_results=paths['results'].read_text(),
                                      rng={**rng_state(loader.generator),
                                           'multi_scale': _pystate_to(ms_rng.getstate())})
                save_checkpoint(ckpt, paths['last'])
                if improved or not paths['best'].exists():
                    save_checkpoint(ckpt, paths['best'])
                del ckpt
        du.barrier()  # the other ranks wait while rank 0 tests and saves

    if main_proc:
        log(f'{epoch - start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.')
        if not evolve:
            _finish(save_dir, opt, paths, log)
        if tb is not None:
            tb.close()
    du.barrier()
    return results


def _finish(save_dir: Path, opt: argparse.Namespace, paths: dict[str, Path], log: Callable[[str], None]) -> None:
    """Strip the optimizer from the final checkpoints, rename them for --name, plot results.png."""
    for k in ('last', 'best'):
        if paths[k].exists():
            strip_optimizer(paths[k])
    if opt.name:
        named = run_paths(save_dir, opt.name)
        for k in ('results', 'last', 'best'):
            if paths[k].exists():
                os.replace(paths[k], named[k])
        paths = named
    if paths['results'].exists() and paths['results'].read_text().strip():
        try:
            plot_results(paths['results'], save_path=save_dir / 'results.png')
        except ValueError as e:  # a results.txt edited by hand: the run itself is fine
            log(f'WARNING: results.png not plotted: {e}')
    log(f"Results saved to {paths['results']}, weights to {paths['last'].parent}")


def _quiet(_: str) -> None:
    """The log of ranks other than 0."""


def _pystate_to(state: tuple) -> dict:
    """A python random state -> tensors and plain values for a weights_only checkpoint."""
    return {'version': state[0], 'state': torch.tensor(state[1], dtype=torch.int64), 'gauss': state[2]}


def _pystate_from(d: dict) -> tuple:
    """The inverse of _pystate_to."""
    return d['version'], tuple(int(x) for x in d['state'].tolist()), d['gauss']


def _all_finite(loss: torch.Tensor, device: torch.device) -> bool:
    """Whether the loss is finite on every rank (one rank stopping alone would hang the others)."""
    ok = torch.isfinite(loss.detach()).all().float().reshape(1)
    if du.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


def _mem(device: torch.device) -> str:
    """Memory for the progress bar: CUDA memory reserved, or the process's peak RSS on the CPU (GB)."""
    if device.type == 'cuda':
        return f'{torch.cuda.memory_reserved(device) / 1e9:.3g}G'
    try:
        import resource
        return f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.3g}G'  # Linux: KiB
    except ImportError:
        return '0G'


def _tensorboard(save_dir: Path, name: str, log: Callable[[str], None]):
    """A SummaryWriter under save_dir/runs, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log('tensorboard not installed: no scalars logged')
        return None
    log(f'Tensorboard: tensorboard --logdir {save_dir / "runs"}, view at http://localhost:6006/')
    run = time.strftime('%Y%m%d-%H%M%S') + (f'_{name}' if name else '')
    return SummaryWriter(log_dir=str(save_dir / 'runs' / run))


# ------------------------------------------------------------------------------------------------------------------
# entry point

def resolve_resume(opt: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
    """For --resume: the options and hyperparameters saved in the checkpoint, or None if that run finished."""
    ckpt_path = Path(opt.resume) if isinstance(opt.resume, str) else Path(opt.save_dir) / 'weights' / 'last.pt'
    if not ckpt_path.is_file():
        raise CheckpointError(f'{ckpt_path}: nothing to resume (no such checkpoint)')
    ckpt = load_checkpoint(ckpt_path)
    saved = ckpt.get('opt')
    if not isinstance(saved, dict) or 'hyp' not in ckpt:
        raise CheckpointError(f'{ckpt_path}: not a train.py checkpoint (no saved options); use --weights instead')
    if ckpt.get('optimizer') is None or int(ckpt['epoch']) + 1 >= int(saved['epochs']):
        print(f"{ckpt_path}: this run already finished ({int(ckpt['epoch']) + 1}/{saved['epochs']} epochs); "
              f"nothing to resume. To train more: --weights {ckpt_path} --epochs N")
        return opt, None
    defaults = vars(get_args_parser().parse_args([]))
    new = argparse.Namespace(**{**defaults, **saved})
    for k in ('device', 'workers'):  # where to run may change between the crash and the resume
        if getattr(opt, k) != defaults[k]:
            setattr(new, k, getattr(opt, k))
    new.resume = str(ckpt_path)
    new.save_dir = str(ckpt_path.parent.parent)
    return new, ckpt['hyp']


def main(opt: argparse.Namespace) -> int:
    """Run training (or --resume, or --evolve) as the command line says; return the exit status."""
    info = du.env_info()
    try:
        hyp = None
        if opt.resume:
            opt, hyp = resolve_resume(opt)
            if hyp is None:
                return 0
        if hyp is None:
            hyp = load_hyp(opt.hyp)
        device = select_device(opt.device, batch_size=None if info.distributed else opt.batch_size)
        if info.distributed:
            if device.type == 'cpu':
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
            du.init_distributed(device)
            if opt.evolve:
                raise ValueError('--evolve runs one process; do not launch it with torchrun')
        if info.main:
            print(f'train: {plain(vars(opt))}')
            print(f'hyperparameters: {hyp}')
        if opt.evolve:
            from utils.evolve import evolve
            evolve(hyp, opt, device, train)
            return 0
        save_dir = Path(opt.save_dir)
        if info.main:
            save_dir.mkdir(parents=True, exist_ok=True)
            (save_dir / 'hyp.yaml').write_text(yaml.safe_dump(hyp, sort_keys=False))
            (save_dir / 'opt.yaml').write_text(yaml.safe_dump(plain(vars(opt)), sort_keys=False))
        train(hyp, opt, device)
        return 0
    except NonFiniteLossError as e:
        print(f'ERROR: {e}', file=sys.stderr)
        return 1
    except (DatasetError, ConfigError, CheckpointError, WeightsError, FileNotFoundError, ValueError) as e:
        print(f'ERROR: {e}', file=sys.stderr)
        return 2
    finally:
        du.cleanup()


if __name__ == '__main__':
    sys.exit(main(parse_opt()))
