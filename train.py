"""Train a YOLOv3 model on a Darknet .data / YAML dataset.

    python train.py --cfg cfg/yolov3-tiny.cfg --data data/coco128.data --weights weights/yolov3-tiny.weights
    python train.py --resume                       # continue the interrupted run in this directory (weights/last.pt)
    python train.py ... --resume auto               # requeue scripts: resume this folder's unfinished run, else start
    python train.py --evolve 10 --epochs 1          # hyperparameter evolution into evolve.txt
    python train.py --device 0,1 ...                # one process per GPU (torch's elastic launcher, as torchrun)
    python -m torch.distributed.run --nproc_per_node 2 train.py ...   # DDP (NCCL on CUDA, gloo on the CPU)
    python -m torch.distributed.run --max-restarts 3 --nproc_per_node 2 train.py ...   # restarted workers resume

train() shows the epoch loop: train one epoch (utils/train/engine.py train_one_epoch, the batches), step the schedule, test,
write the results.txt row, save, stop or not. Every resume decision and the checkpoint's keys are utils/train/resume.py's.

Outputs: results.txt and weights/last.pt, weights/best.pt in the working directory (--save-dir to
put them elsewhere); --name X renames them results_X.txt, weights/last_X.pt, weights/best_X.pt at the end.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml

import test as val  # test.py: evaluate() is called in-process after each epoch
from models import Darknet, YOLOLayer
from utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    plain,
    run_paths,
    save_checkpoint,
    strip_optimizer,
    training_weights,
)
from utils.darknet.downloads import attempt_download
from utils.darknet.parse_config import ConfigError
from utils.darknet.weights import WeightsError
from utils.data.config import DatasetError, check_dataset, load_data_config
from utils.data.datasets import DatasetOptions, LoaderOptions, create_dataloader
from utils.data.image_weights import epoch_image_weights
from utils.eval.metrics import fitness
from utils.eval.plots import plot_images, plot_results
from utils.logs import LOGGER, setup_logging
from utils.torch_utils import (
    ModelEMA,
    count_parameters,
    cpu_has_bf16,
    ddp_without_buffer_sync,
    init_seeds,
    pin_memory_for,
    resolve_device,
    set_cuda_device,
    use_channels_last,
)
from utils.train import distributed as du
from utils.train import resume
from utils.train.anchors import check_anchors
from utils.train.darknet_loss import DarknetLoss
from utils.train.engine import (
    GS,
    NBS,
    CosineLR,
    LoopConfig,
    LoopState,
    NonFiniteLossError,
    Parts,
    RunControl,
    build_optimizer,
    memory_used,
    n_burn_in,
    progress_row,
    train_one_epoch,
)
from utils.train.loss import LOSSES, ComputeLoss
from utils.train.resume import Progress
from utils.train.transfer import load_weights

ROOT = Path(__file__).resolve().parent
RESULTS_HEADER = ('Epoch', 'mem', 'GIoU', 'obj', 'cls', 'total', 'targets', 'img_size')
RESULTS_COLUMNS = RESULTS_HEADER + ('P', 'R', 'mAP@0.5', 'mAP@0.5:0.95', 'F1', 'val GIoU', 'val obj', 'val cls')


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
    p.add_argument('--multi-scale', action='store_true',
                   help='with ONE train size (--img-size 416): a random size of 0.67x-1.5x of it (multiples of 32) '
                        'every accumulation step. Two different train sizes (the default 320 640) are multi-scale '
                        'between them with or without this flag (as the original)')
    p.add_argument('--img-size', nargs='+', type=int, default=[320, 640],
                   help='train min, train max, test sizes (one value: all three); multiples of 32')
    p.add_argument('--rect', action='store_true', help='rectangular training batches')
    p.add_argument('--resume', nargs='?', const=True, default=False,
                   help="resume weights/last.pt of this directory, or the given last.pt; 'auto': resume this folder's "
                        "last.pt if it is an unfinished run of the same options, else start fresh (for requeues)")
    p.add_argument('--save-period-min', type=float, default=0.0,
                   help='also save weights/last.pt every M minutes, at an optimizer step, mid-epoch included (0: off)')
    p.add_argument('--nosave', action='store_true', help='only save the final checkpoint')
    p.add_argument('--notest', action='store_true', help='only test the final epoch')
    p.add_argument('--evolve', nargs='?', type=int, const=300, default=0,
                   help='evolve hyperparameters for N generations (300 when given bare)')
    p.add_argument('--cache-images', action='store_true', help='cache decoded images in RAM')
    p.add_argument('--weights', type=str, default='weights/yolov3-spp.weights',
                   help="initial weights: Darknet .weights/.conv.N, a .pt checkpoint, or '' for random init")
    p.add_argument('--name', default='', help='rename results.txt to results_name.txt, weights likewise, at the end')
    p.add_argument('--save-dir', type=str, default='.', help='folder for results.txt and weights/ (default: here)')
    p.add_argument('--device', default='',
                   help="'cpu', a CUDA device '0', or several '0,1' (one training process each); under torchrun "
                        "the devices of local ranks 0, 1, ... in order")
    p.add_argument('--adam', action='store_true', help='Adam instead of SGD with Nesterov momentum')
    p.add_argument('--single-cls', action='store_true', help='train every class as class 0')
    p.add_argument('--no-class-map', action='store_true',
                   help="start new class rows fresh instead of copying the source model's rows for classes of the "
                        "same name")
    p.add_argument('--freeze-layers', action='store_true', help='train only the convolutions feeding [yolo] layers')
    p.add_argument('--freeze', type=int, default=0, help='freeze the first N modules of the model')
    p.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm across DDP ranks')
    p.add_argument('--workers', type=int, default=8, help='maximum DataLoader workers per rank')
    p.add_argument('--seed', type=int, default=0, help='global training seed')
    p.add_argument('--deterministic', action='store_true', help='deterministic algorithms (slower)')
    p.add_argument('--amp', choices=('auto', 'off', 'fp16', 'bf16'), default='auto',
                   help='mixed precision: auto = fp16 + GradScaler on CUDA, bf16 on a CPU with native bf16 '
                        '(avx512_bf16 or amx_bf16), off on other CPUs')
    p.add_argument('--patience', type=int, default=0,
                   help='stop when fitness (0.1 mAP@0.5 + 0.9 mAP@0.5:0.95) has not improved for N epochs (0: off)')
    p.add_argument('--save-period', type=int, default=0,
                   help='also keep weights/epoch_K.pt every N epochs (K = 0, N, 2N, ..., the epoch as results.txt '
                        'counts it): full checkpoints that --resume, test.py and detect.py accept (0: off)')
    p.add_argument('--loss', choices=LOSSES, default='original',
                   help="original: the 2020 port's loss (iou_t matching, GIoU, BCE, hyp gains); darknet: Darknet's own "
                        "[yolo] loss from the cfg's keys (best anchor, iou_loss, normalizers, ignore_thresh, ...)")
    p.add_argument('--image-weights', action='store_true',
                   help="draw each epoch's images with replacement, weighted by their classes' rarity and "
                        "(1 - class mAP)^2 (not with --rect)")
    return p


def option_defaults() -> dict[str, Any]:
    """Every option's default value (what a checkpoint saved before an option existed resumes with)."""
    return vars(get_args_parser().parse_args([]))


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
    if multi and imgsz_min == imgsz_max:  # 320 -> 192..448
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


def _readable_hyp(path: str | Path) -> dict[str, float] | None:
    """The hyperparameters of path, None when it cannot be read (the run then stops with load_hyp's own error)."""
    try:
        return load_hyp(path)
    except (FileNotFoundError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------------------------
# optimizer, schedule, freezing

def freeze_modules(model: Darknet, freeze_layers: bool = False, freeze: int = 0) -> tuple[int, int]:
    """Freeze (requires_grad False) all but the convolutions feeding [yolo] layers, and/or the first `freeze`
    modules; returns (frozen, trainable) parameter counts."""
    keep_only = None
    if freeze_layers:  # the module before each [yolo] layer (and the [yolo] layers) stay trainable
        heads = [i - 1 for i, m in enumerate(model.module_list) if isinstance(m, YOLOLayer)]
        keep_only = {i for i in range(len(model.module_list)) if i in heads or i - 1 in heads}
    for i, m in enumerate(model.module_list):
        if (keep_only is not None and i not in keep_only) or i < freeze:
            for q in m.parameters():
                q.requires_grad_(False)
    n_all, n_train = count_parameters(model)
    return n_all - n_train, n_train


# ------------------------------------------------------------------------------------------------------------------
# run outputs

def epoch_path(save_dir: Path, epoch: int, name: str = '') -> Path:
    """weights/epoch_K.pt of --save-period under save_dir; with a name (--name, at the end) weights/epoch_K_name.pt."""
    return save_dir / 'weights' / (f'epoch_{epoch}_{name}.pt' if name else f'epoch_{epoch}.pt')


def saves_epoch(opt: argparse.Namespace, epoch: int) -> bool:
    """Whether --save-period keeps weights/epoch_K.pt for this epoch (never during --evolve, which saves nothing)."""
    return opt.save_period > 0 and epoch % opt.save_period == 0 and not opt.evolve


# ------------------------------------------------------------------------------------------------------------------
# training

def build_model(opt: argparse.Namespace, hyp: dict[str, float], nc: int, names: list[str], imgsz: int,
                ckpt: dict | None) -> Darknet:
    """The Darknet model of opt.cfg with its starting weights (the resumed checkpoint's raw weights, a .pt's matching
    tensors, or Darknet weights), frozen layers and class names."""
    main_proc = du.env_info().main
    model = Darknet(opt.cfg, img_size=imgsz)
    if model.nc != nc:
        raise ValueError(f"{opt.cfg} has {model.nc} classes but {opt.data} has {nc}"
                         f"{' (--single-cls)' if opt.single_cls else ''}; use a cfg with classes={nc}")
    weights = str(opt.weights or '')
    if ckpt is not None:
        model.load_state_dict(training_weights(ckpt))
    elif weights:
        if main_proc and not weights.endswith('.pt'):
            attempt_download(weights)  # official Darknet files only
        du.barrier()
        # what fits is loaded; heads for other classes are mapped from the source's rows of the same class names
        load_weights(model, weights, names=names, map_classes=not opt.no_class_map, verbose=main_proc)
    if opt.freeze_layers or opt.freeze:
        frozen, trainable = freeze_modules(model, opt.freeze_layers, opt.freeze)
        LOGGER.info(f'Frozen {frozen:,} parameters, training {trainable:,}')
    model.names = names
    if main_proc:
        model.info(img_size=imgsz)
    return model


AMP_DTYPES = {'off': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}  # autocast dtype of each --amp choice


def resolve_amp(amp: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """The autocast dtype of --amp (auto: fp16 on CUDA, bf16 on a CPU with native bf16, else off; the choice and its
    reason logged in one line), warning where bf16 would be emulated. train() calls it once."""
    if amp == 'auto':
        amp, why = resolve_auto_amp(device)
        LOGGER.info(f'--amp auto: {amp} ({why})')
    if amp == 'bf16' and device.type == 'cpu' and cpu_has_bf16() is False:
        LOGGER.warning('--amp bf16 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16 in its flags): '
                       'bf16 is emulated there and much slower than fp32 (see benchmarks/README.md); use --amp off '
                       'on this CPU')
    return amp, AMP_DTYPES[amp]


def resolve_auto_amp(device: torch.device) -> tuple[str, str]:
    """What --amp auto means on this device, and why."""
    if device.type == 'cuda':
        return 'fp16', 'CUDA: fp16 autocast with a GradScaler'
    has_bf16 = cpu_has_bf16()
    if has_bf16:  # native bf16 matmul/convolution: faster than fp32 at about its mAP (see benchmarks/README.md)
        return 'bf16', 'this CPU has native bf16 (avx512_bf16 or amx_bf16 in its flags): bf16 autocast'
    if has_bf16 is None:
        return 'off', 'CPU flags unknown (no /proc/cpuinfo): fp32'
    return 'off', 'this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in its flags), where bf16 is emulated: fp32'


def check_options(opt: argparse.Namespace, info: du.DistInfo, device: torch.device) -> None:
    """Refuse option combinations that cannot run (one clear error), note the ones that do nothing."""
    if opt.batch_size % info.world_size:
        raise ValueError(f'--batch-size {opt.batch_size} must be a multiple of the number of processes '
                         f'{info.world_size}')
    if opt.sync_bn and info.distributed and device.type != 'cuda':
        raise ValueError('--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation); leave it out '
                         'for DDP on the CPU')
    if opt.sync_bn and not info.distributed:
        LOGGER.info('--sync-bn has no effect in a single process')
    if opt.multi_scale and len(set(opt.img_size[:2])) == 2:
        LOGGER.info(f'--multi-scale changes nothing here: --img-size {opt.img_size[0]} {opt.img_size[1]} (two train '
                    f'sizes) already trains multi-scale between them; the flag widens one size to 0.67x-1.5x of it')
    if opt.image_weights and opt.rect:
        raise ValueError('--image-weights draws images at random but --rect trains fixed batches of similar aspect '
                         'ratio: use one or the other')
    for k in ('patience', 'save_period'):
        if getattr(opt, k) < 0:
            raise ValueError(f"--{k.replace('_', '-')} {getattr(opt, k)}: must be 0 (off) or a number of epochs")
    if opt.save_period_min < 0:
        raise ValueError(f'--save-period-min {opt.save_period_min}: must be 0 (off) or a number of minutes')
    if opt.evolve and (opt.patience or opt.save_period):
        LOGGER.info('--patience and --save-period have no effect with --evolve (it tests only the last epoch, saves '
                    'nothing)')
    elif opt.patience and opt.notest:
        raise ValueError('--patience compares the fitness of each epoch\'s test: leave out --notest')


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """The model with every BatchNorm as SyncBatchNorm (statistics over all DDP ranks), its state unchanged."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    LOGGER.info(f'Using SyncBatchNorm ({sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())} layers)')
    return model


def build_parts(model: Darknet, hyp: dict[str, float], opt: argparse.Namespace, device: torch.device,
                info: du.DistInfo, amp_dtype: torch.dtype | None = None) -> Parts:
    """Optimizer, cosine schedule, GradScaler (on for fp16 autocast), EMA and loss for a model on its device, then the
    DDP wrapper."""
    optimizer = build_optimizer(model, hyp, opt.adam)
    lf = CosineLR(opt.epochs, hyp['lrf'])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model) if info.main else None
    loss_hyp = {**hyp, 'cls': hyp['cls'] * model.nc / 80}  # as the original: the class gain was tuned for 80 classes
    # original: gr sets the objectness target to the GIoU (burn-in ramps it from 0); darknet: the cfg's [yolo] keys
    # (a key it cannot honour raises ConfigError here, before anything is written)
    compute_loss = DarknetLoss(model, loss_hyp) if opt.loss == 'darknet' else ComputeLoss(model, loss_hyp)
    wrapped: nn.Module = model
    if info.distributed:
        if opt.sync_bn:
            wrapped = convert_sync_bn(wrapped)
        # no copy of rank 0's BN running stats to every rank before each forward: only rank 0's are ever used (it
        # alone tests and saves, through its EMA), the other ranks' are never read
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == 'cuda'
                                                      else None, **ddp_without_buffer_sync())
    return Parts(wrapped, optimizer, scheduler, lf, scaler, ema, compute_loss)


def resume_command(last: Path, info: du.DistInfo) -> str:
    """The command that continues this run from last."""
    args = [str(ROOT / 'train.py'), '--resume', str(last.resolve())]
    if info.distributed:  # the same torchrun launch options (nodes, rendezvous) as this run
        return shlex.join([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node',
                           str(du.local_world_size()), *args]) + '  (with the same torchrun options as this run)'
    return shlex.join([sys.executable, *args])


def load_data(opt: argparse.Namespace, info: du.DistInfo) -> tuple[dict, int, list[str]]:
    """The dataset config (rank 0 downloads a missing dataset if it says how), the number of classes trained and
    their names (one 'object' class for --single-cls)."""
    data = load_data_config(opt.data)
    if info.main:
        check_dataset(data)
    du.barrier()
    nc = 1 if opt.single_cls else data['nc']
    return data, nc, ['object'] if opt.single_cls and data['nc'] != 1 else data['names']


def build_loaders(data: dict, hyp: dict, opt: argparse.Namespace, info: du.DistInfo, imgsz: int,
                  imgsz_test: int, pin_memory: bool = False) -> tuple[Any, Any, Any]:
    """(train loader, train dataset, test loader or None): the test loader on rank 0 only, with the per-process
    batch (rank 0 tests alone, so the global batch would be world times larger there); pin_memory
    for loaders feeding a CUDA device (pin_memory_for)."""
    batch = opt.batch_size // info.world_size
    train = DatasetOptions(img_size=imgsz, batch_size=batch, augment=True, hyp=hyp, rect=opt.rect,
                           image_weights=opt.image_weights, cache_images=opt.cache_images, single_cls=opt.single_cls,
                           stride=GS, nc=data['nc'], prefix='train: ', seed=opt.seed)
    loader, dataset = create_dataloader(data['train'], train, LoaderOptions(info.rank, info.world_size, opt.workers,
                                                                            pin_memory=pin_memory))
    testloader = None
    if info.main:
        test = DatasetOptions(img_size=imgsz_test, batch_size=batch, hyp=hyp, rect=True, cache_images=opt.cache_images,
                              single_cls=opt.single_cls, stride=GS, nc=data['nc'], prefix='val: ')
        testloader = create_dataloader(data['valid'], test, LoaderOptions(workers=opt.workers, shuffle=False,
                                                                          pin_memory=pin_memory))[0]
    return loader, dataset, testloader


TB_TAGS = ('train/giou_loss', 'train/obj_loss', 'train/cls_loss', 'metrics/precision', 'metrics/recall',
           'metrics/mAP_0.5', 'metrics/mAP_0.5:0.95', 'metrics/F1', 'val/giou_loss', 'val/obj_loss', 'val/cls_loss')


def test_epoch(parts: Parts, testloader: Any, data: dict, opt: argparse.Namespace, epoch: int, progress: Progress,
               after_burn_in: bool) -> tuple[tuple[float, ...], Progress]:
    """Rank 0 after an epoch: test the EMA model with the val losses (unless --notest before the last epoch); return
    the 8 results (P, R, mAP@0.5, mAP@0.5:0.95, F1, 3 val losses) and the progress with this epoch's fitness. Plots
    at the last epoch and where --patience ends the run unless this epoch improves (not under --evolve)."""
    if opt.notest and epoch + 1 < opt.epochs:
        return (0.0,) * 8, progress
    model = parts.ema.ema
    final = epoch + 1 == opt.epochs or progress.stale(epoch, opt.patience)
    cfg = val.EvalConfig(multi_label=after_burn_in, single_cls=opt.single_cls, plots=final and not opt.evolve,
                         save_dir=Path(opt.save_dir))
    r = val.evaluate(model, testloader, val.eval_names(data, model, opt.single_cls), cfg, parts.compute_loss)
    results = tuple(float(x) for x in r.results)
    fi = float(fitness(np.array(results).reshape(1, -1))[0])
    return results, progress.after_test(epoch, fi, np.asarray(r.maps, dtype=np.float64))


def append_results(save_dir: Path, row: str, results: tuple[float, ...]) -> None:
    """One results.txt line: the epoch's progress row, then P, R, mAP@0.5, mAP@0.5:0.95, F1 and the 3 val losses."""
    with open(run_paths(save_dir)['results'], 'a') as f:
        f.write(row + '%10.4g' * 8 % results + '\n')


def log_scalars(tb: Any, epoch: int, mloss: tuple[float, ...], results: tuple[float, ...]) -> None:
    """TensorBoard scalars of an epoch: the 3 mean training losses and the 8 test results (TB_TAGS)."""
    if tb is not None:
        for x, tag in zip(list(mloss[:3]) + list(results), TB_TAGS):
            tb.add_scalar(tag, x, epoch)


def checkpoint_targets(opt: argparse.Namespace, epoch: int, progress: Progress, stopping: bool = False) -> list[Path]:
    """Where an epoch's checkpoint goes: last.pt (unless --nosave, which keeps only the one a run ends or stops with),
    with best.pt when this epoch is the best so far (or there is no best.pt yet); epoch_K.pt for --save-period.
    --evolve saves nothing."""
    if opt.evolve:
        return []
    save_dir = Path(opt.save_dir)
    paths = run_paths(save_dir)
    targets = []
    if not opt.nosave or stopping or epoch + 1 == opt.epochs or progress.stale(epoch, opt.patience):
        targets.append(paths['last'])
        if progress.best_epoch == epoch or not paths['best'].exists():
            targets.append(paths['best'])
    if saves_epoch(opt, epoch):
        targets.append(epoch_path(save_dir, epoch))
    return targets


def start_outputs(opt: argparse.Namespace, hyp: dict[str, float], info: du.DistInfo) -> Any:
    """Rank 0 of a (non-evolve) run, once model, data and weights have loaded (bad input writes nothing): hyp.yaml and
    opt.yaml, a new run's old outputs cleared; the TensorBoard writer (or None)."""
    if not info.main or opt.evolve:
        return None
    save_dir = Path(opt.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / 'hyp.yaml').write_text(yaml.safe_dump(hyp, sort_keys=False))
    (save_dir / 'opt.yaml').write_text(yaml.safe_dump(plain(vars(opt)), sort_keys=False))
    if not opt.resume:
        for f in save_dir.glob('train_batch*.jpg'):
            f.unlink()
        run_paths(save_dir)['results'].unlink(missing_ok=True)  # a new run starts a new results.txt
    return _tensorboard(save_dir, opt.name)


def train(hyp: dict[str, float], opt: argparse.Namespace, device: torch.device) -> tuple[float, ...]:
    """Train as opt says; return the last results (P, R, mAP@0.5, mAP@0.5:0.95, F1, val GIoU, val obj, val cls)."""
    info, save_dir = du.env_info(), Path(opt.save_dir)
    check_options(opt, info, device)
    imgsz, imgsz_test, grid_min, grid_max, multi_scale = check_img_sizes(opt.img_size, opt.multi_scale)
    init_seeds(opt.seed + 1 + max(info.rank, 0), deterministic=opt.deterministic)
    if device.type == 'cuda':  # autotuned convolutions pay off when the shapes stay the same
        torch.backends.cudnn.benchmark = not (opt.deterministic or multi_scale or opt.rect)
    data, nc, names = load_data(opt, info)
    agents = du.launch_agents()  # every checkpoint names this launch's elastic agents (see resume.elastic_resume)
    ckpt = load_checkpoint(opt.resume) if opt.resume else None
    model = build_model(opt, hyp, nc, names, imgsz, ckpt).to(device)
    amp, amp_dtype = resolve_amp(opt.amp, device)
    # NHWC: oneDNN's convolutions on the CPU, tensor cores under AMP on CUDA (before the DDP wrapper)
    channels_last = use_channels_last(device, amp_dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    parts = build_parts(model, hyp, opt, device, info, amp_dtype)
    loader, dataset, testloader = build_loaders(data, hyp, opt, info, imgsz, imgsz_test, pin_memory_for(device))
    if info.main and not opt.evolve:  # how well the cfg's anchors fit these labels at this size
        check_anchors(dataset, model, imgsz, hyp['iou_t'], data=opt.data, cfg=opt.cfg, loss=opt.loss,
                      pretrained=bool(opt.weights or opt.resume))
    batch_size = loader.batch_size * info.world_size  # at most the number of training images
    paths = run_paths(save_dir)
    # a new run: epoch 0, no tests yet, this state; --resume: where the checkpoint was saved
    start = resume.restore(ckpt, parts, LoopState(accumulate=max(round(NBS / batch_size), 1), img_size=imgsz), opt,
                           loader.generator, info.rank)
    if ckpt is not None and info.main:
        paths['results'].write_text(start.results)
    del ckpt
    first_epoch, state, progress = start.epoch, start.state, start.progress
    tb = start_outputs(opt, hyp, info)
    cfg = LoopConfig(hyp=hyp, lf=parts.lf, n_burn=n_burn_in(len(loader)), batch_size=batch_size, epochs=opt.epochs,
                     amp_dtype=amp_dtype, channels_last=channels_last, distributed=info.distributed,
                     multi_scale=(grid_min, grid_max) if multi_scale else None, show=info.main, seed=opt.seed,
                     device=device, checkpoint_name=str(paths['last']))
    # SIGTERM / SIGUSR1 (SLURM, spot notices) stop the run at an optimizer step with last.pt saved; installed before
    # the loader's workers start, so they inherit the handler and survive a signal sent to the whole process group
    control = None if opt.evolve else RunControl(opt.save_period_min * 60 if info.main else 0).install()
    LOGGER.info(f'Image sizes {grid_min * GS if multi_scale else imgsz} - {imgsz} train, {imgsz_test} test; '
                f'{loader.num_workers} dataloader workers; effective batch {batch_size * state.accumulate} '
                f'({batch_size} x {state.accumulate} accumulated, {info.world_size} process'
                f'{"es" if info.world_size > 1 else ""}); AMP {amp}; {cfg.n_burn} burn-in iterations')
    LOGGER.info(f'Starting training for {opt.epochs} epochs...')
    results, t0, epoch, stats = (0.0,) * 8, time.time(), first_epoch, None
    try:
        for epoch in range(first_epoch, opt.epochs):
            set_epoch_draw(loader.sampler, epoch, epoch_image_weights(dataset.labels, nc, progress.maps)
                           if opt.image_weights else None)
            LOGGER.info(('\n' + '%10s' * 8) % RESULTS_HEADER)
            while True:  # a stop request or --save-period-min pauses the epoch at an optimizer step: save there
                state, stats = train_one_epoch(model=parts.model, loader=loader, optimizer=parts.optimizer,
                                               scaler=parts.scaler, compute_loss=parts.compute_loss, ema=parts.ema,
                                               epoch=epoch, state=state, cfg=cfg, control=control)
                if stats.first_batch is not None and info.main and not opt.evolve:
                    plot_first_batch(save_dir, names, tb, *stats.first_batch)
                if not state.batch:  # the epoch's end
                    break
                if info.main:  # state.batch: the next batch, an exact resume point
                    save_checkpoint(resume.train_checkpoint(parts, hyp, opt, epoch, state, progress,
                                                            _text(paths['results']), agents, loader.generator),
                                    paths['last'])
                    LOGGER.info(f"\nSaved {paths['last']} at epoch {epoch}, batch {state.batch}")
                control.saved()
                if stats.stop:
                    break
            if state.batch:  # stopped inside the epoch, saved there
                break
            parts.scheduler.step()
            if info.main:
                parts.ema.update_attr(model)
                results, progress = test_epoch(parts, testloader, data, opt, epoch, progress,
                                               after_burn_in=(epoch + 1) * len(loader) - 1 > cfg.n_burn)
                if not opt.evolve:
                    append_results(save_dir, progress_row(epoch, opt.epochs, memory_used(device), stats.mloss[:4],
                                                          stats.targets, stats.img_size), results)
                log_scalars(tb, epoch, stats.mloss, results)
                targets = checkpoint_targets(opt, epoch, progress, stopping=stats.stop)  # none: --nosave, --evolve
                if targets:
                    ckpt = resume.train_checkpoint(parts, hyp, opt, epoch, state, progress, _text(paths['results']),
                                                   agents, loader.generator)
                    for path in targets:
                        save_checkpoint(ckpt, path)
            du.barrier()  # the other ranks wait while rank 0 tests and saves
            if info.distributed:  # rank 0's test results, so every rank draws the same image weights and stops together
                progress = du.all_gather_object(progress)[0]
            if stats.stop or stop_early(progress, epoch, opt.patience):
                break
    finally:  # an exception (Ctrl-C, a non-finite loss) leaves the handlers as they were; the workers end here
        if control is not None:
            control.uninstall()
        for ld in (loader, testloader):
            if ld is not None:
                ld.close()
    # a stop after the final epoch's last batch is the run's normal end
    stopped = stats is not None and stats.stop and (state.batch > 0 or epoch + 1 < opt.epochs)
    where = f'in epoch {epoch}, after {state.batch or len(loader)}/{len(loader)} batches' if stopped else None
    _end_of_run(opt, info, control, where, epoch - first_epoch + 1, t0, tb)
    return results


def _text(path: Path) -> str:
    """A file's text, '' when it does not exist (results.txt before the first epoch)."""
    return path.read_text() if path.exists() else ''


def _end_of_run(opt: argparse.Namespace, info: du.DistInfo, control: RunControl | None, stopped: str | None,
                epochs: int, t0: float, tb: Any) -> None:
    """After the loop: a run stopped by a signal (stopped: where) says how to resume it; a finished one strips and
    renames its checkpoints and plots results.png (rank 0)."""
    last = run_paths(Path(opt.save_dir))['last']
    if stopped:
        why = signal.Signals(control.signum).name if control.signum else 'a stop request on another rank'
        LOGGER.info(f'Stopped by {why} {stopped}; saved {last}. Resume with: {resume_command(last, info)}')
    elif info.main:
        LOGGER.info(f'{epochs} epochs completed in {(time.time() - t0) / 3600:.3f} hours.')
        if not opt.evolve:
            _finish(Path(opt.save_dir), opt, run_paths(Path(opt.save_dir)))
    if info.main and tb is not None:
        tb.close()
    du.barrier()


def set_epoch_draw(sampler: Any, epoch: int, image_weights: np.ndarray | None = None) -> None:
    """Prepare the sampler's draw of this epoch: --image-weights' weights (class weights times
    (1 - class mAP) ** 2 from the last test), then the epoch that seeds shuffles and weighted draws."""
    if image_weights is not None:
        sampler.set_weights(image_weights)
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)


def stop_early(progress: Progress, epoch: int, patience: int) -> bool:
    """--patience: True (and one line saying why and which epoch was best) when fitness has not improved for patience
    epochs."""
    if not progress.stale(epoch, patience):
        return False
    LOGGER.info(f'Stopping early after epoch {epoch}: fitness has not improved for {epoch - progress.best_epoch} '
                f'epochs (--patience {patience}); the best was epoch {progress.best_epoch} '
                f'(fitness {progress.best_fitness:.4f}), saved as best.pt')
    return True


def plot_first_batch(save_dir: Path, names: list[str], tb: Any, imgs: torch.Tensor, targets: torch.Tensor,
                     paths: list) -> None:
    """train_batch0.jpg (and its TensorBoard image): the first training batch with its labels."""
    mosaic = plot_images(imgs, targets, paths, fname=save_dir / 'train_batch0.jpg', names=names)
    if tb is not None:
        tb.add_image('train_batch0', mosaic, 0, dataformats='HWC')


def _finish(save_dir: Path, opt: argparse.Namespace, paths: dict[str, Path]) -> None:
    """Strip the optimizer from the final checkpoints (epoch_K.pt stay full), rename them and epoch_K.pt for --name,
    plot results.png."""
    for k in ('last', 'best'):
        if paths[k].exists():
            strip_optimizer(paths[k])
    if opt.name:
        named = run_paths(save_dir, opt.name)
        for k in ('results', 'last', 'best'):
            if paths[k].exists():
                os.replace(paths[k], named[k])
        paths = named
        for epoch in range(opt.epochs):  # --save-period files of this run, renamed as last.pt
            if saves_epoch(opt, epoch) and epoch_path(save_dir, epoch).exists():
                os.replace(epoch_path(save_dir, epoch), epoch_path(save_dir, epoch, opt.name))
    if paths['results'].exists() and paths['results'].read_text().strip():
        try:
            plot_results(paths['results'], save_path=save_dir / 'results.png')
        except ValueError as e:  # a results.txt edited by hand: the run itself is fine
            LOGGER.warning(f'results.png not plotted: {e}')
    LOGGER.info(f"Results saved to {paths['results']}, weights to {paths['last'].parent}")



def _tensorboard(save_dir: Path, name: str):
    """A SummaryWriter under save_dir/runs, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        LOGGER.info('tensorboard not installed: no scalars logged')
        return None
    LOGGER.info(f'Tensorboard: tensorboard --logdir {save_dir / "runs"}, view at http://localhost:6006/')
    run = time.strftime('%Y%m%d-%H%M%S') + (f'_{name}' if name else '')
    return SummaryWriter(log_dir=str(save_dir / 'runs' / run))


# ------------------------------------------------------------------------------------------------------------------
# entry point

def launch(opt: argparse.Namespace, nproc: int) -> int:
    """Train with one process per device on this machine through torch.distributed's elastic launcher (what
    torchrun runs); returns the exit status (rank 0's)."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    print(f'--device {opt.device}: starting {nproc} processes, one per device (as torchrun --standalone '
          f'--nproc_per_node {nproc} train.py ...)')
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend='c10d', rdzv_endpoint='localhost:0', max_restarts=0, monitor_interval=1,
                          start_method='spawn')
    try:
        return int(elastic_launch(config, _worker)(vars(opt))[0])
    except ChildFailedError as e:
        print(f'ERROR: a training process failed: {e}', file=sys.stderr)
        return 1


def _join_group(device: torch.device, info: du.DistInfo) -> None:
    """Join torchrun's process group on device (CPU threads shared among the processes); once per process."""
    if du.is_initialized():
        return
    if device.type == 'cpu':
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
    du.init_distributed(device)


def _worker(opt: dict) -> int:
    """One process of launch(): torchrun's environment is set, so main() trains as rank LOCAL_RANK."""
    return main(argparse.Namespace(**opt))


def main(opt: argparse.Namespace) -> int:
    """Run training (or --resume, or --evolve) as the command line says; return the exit status."""
    info = du.env_info()
    setup_logging(info.rank)  # rank 0 (or the one process) prints; the modules log through utils.logs.LOGGER
    try:
        hyp = None
        n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if info.distributed and opt.resume in (False, 'auto'):
            # rank 0 decides for the whole group whether an elastic restart resumes, so the group comes first, on
            # this command line's device (a restart resumes this launch's run, saved with the same options)
            _join_group(torch.device(resolve_device(opt.device, info.local_rank, du.local_world_size(), n_cuda)[0]),
                        info)
            opt = resume.elastic_resume(opt)
        if opt.resume == 'auto':  # rank 0 alone reads and moves files; the group follows its decision
            opt = du.broadcast_object([resume.auto_resume(opt, option_defaults(), _readable_hyp(opt.hyp))
                                       if info.main else None])[0]
            if opt is None:
                return 0
        if opt.resume:
            opt, hyp = resume.resolve_resume(opt, option_defaults())
            if hyp is None:
                return 0
        if hyp is None:
            hyp = load_hyp(opt.hyp)
        device, nproc = resolve_device(opt.device, info.local_rank, du.local_world_size(), n_cuda)
        if nproc > 1:
            if opt.evolve:
                raise ValueError('--evolve runs one process: give it one --device')
            if opt.batch_size % nproc:
                raise ValueError(f'--batch-size {opt.batch_size} must be a multiple of the {nproc} devices')
            return launch(opt, nproc)
        device = torch.device(device)
        set_cuda_device(device)  # before anything opens a CUDA context: --device 1 must not open one on GPU 0 too
        if not info.distributed and n_cuda > 1 and not str(opt.device).strip():
            print(f'{n_cuda} CUDA devices visible, training on {device} only: --device 0,1,... trains on several')
        if info.distributed:
            _join_group(device, info)
            if opt.evolve:
                raise ValueError('--evolve runs one process; do not launch it with torchrun')
        if info.main:
            print(f'train: {plain(vars(opt))}')
            print(f'hyperparameters: {hyp}')
        if opt.evolve:
            from utils.train.evolve import evolve
            evolve(hyp, opt, device, train)
            return 0
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
