"""Evaluate a model on a dataset's validation images: P, R, mAP@0.5, mAP@0.5:0.95 per class, COCO JSON + pycocotools.

    python test.py --cfg cfg/yolov3-tiny.cfg --data data/coco128.data --weights weights/yolov3-tiny.weights

train.py calls evaluate() in-process after every epoch with its EMA model and its own dataloader; the command line
(run) builds the model and loader from its options and calls the same function.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

if __name__ == '__main__':
    # Before torch loads OpenMP, which reads this once: waiting OpenMP threads sleep instead of spinning, so the
    # loader's workers and other processes on the cores do not stall every op (as detect.py; benchmarks/README.md).
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models import load_eval_model, load_model  # noqa: E402
from utils.boxes import clip_coords, scale_coords, xywh2xyxy  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.darknet.parse_config import ConfigError  # noqa: E402
from utils.darknet.post import MapResult, darknet_model, evaluate_map, map_report  # noqa: E402
from utils.darknet.weights import WeightsError  # noqa: E402
from utils.data.coco import CocoJson, find_coco_annotations  # noqa: E402
from utils.data.config import DatasetError, check_dataset, class_names, load_data_config  # noqa: E402
from utils.data.datasets import DatasetOptions, LoaderOptions, create_dataloader  # noqa: E402
from utils.eval.backends import (  # noqa: E402
    BACKENDS,
    BackendError,
    OrtModel,
    choose_backend,
    runtime_for,
)
from utils.eval.metrics import (  # noqa: E402
    IOU_THRESHOLDS,
    APResult,
    ConfusionMatrix,
    ap_per_class,
    match_predictions,
)
from utils.eval.nms import import_in_background, non_max_suppression  # noqa: E402
from utils.logs import LOGGER, setup_logging, shows_progress  # noqa: E402
from utils.torch_utils import (  # noqa: E402
    HALF_CHOICES,
    cudnn_benchmark,
    de_parallel,
    inference_dtype,
    pin_memory_for,
    select_device,
    set_cuda_device,
    time_synchronized,
)

COCO_DATA_NAMES = ('coco.data', 'coco2014.data', 'coco2017.data')  # --save-json is implied for these


class EvalError(Exception):
    """An option of test.py that cannot work here (e.g. a CUDA --device on a machine without CUDA)."""


def _device(device: str, batch_size: int) -> torch.device:
    """select_device, with its refusals as EvalError so the command line reports them without a traceback; a CUDA
    device becomes the current one before anything opens a context (see set_cuda_device)."""
    try:
        dev = select_device(device, batch_size=batch_size)
    except (RuntimeError, ValueError) as e:
        raise EvalError(str(e)) from None
    set_cuda_device(dev)
    return dev


def _half_dtype(half: str, device: torch.device) -> torch.dtype:
    """inference_dtype of --half, its refusals as EvalError."""
    try:
        return inference_dtype(half, device)
    except ValueError as e:
        raise EvalError(str(e)) from None


def _model_stride(model: nn.Module) -> int:
    """Largest [yolo] stride of a Darknet model (32 for the YOLOv3 family)."""
    m = de_parallel(model)
    strides = [m.module_list[i].stride for i in getattr(m, 'yolo_layers', [])]
    return int(max(strides)) if strides else 32


@dataclass(frozen=True)
class EvalConfig:
    """How evaluate() scores a model and what it logs and writes (train.py and the command line differ here): it
    writes files only where plots or save_json ask for them (then into save_dir, created as needed)."""
    conf_thres: float = 0.001  # detections below this confidence are dropped before NMS
    iou_thres: float = 0.6  # NMS IoU threshold
    multi_label: bool = True  # a box may carry several classes (train.py: off during burn-in)
    merge: bool = True  # merge-NMS: boxes averaged with their overlapping neighbours
    augment: bool = False  # test-time augmentation (flips and scales)
    single_cls: bool = False  # every class counted as one (names must then be ['object'])
    verbose: bool = False  # one table row per class with targets
    plots: bool = False  # test_batch0_{gt,pred}.jpg, PR/P/R/F1 curves and the confusion matrix in save_dir
    save_dir: Path = Path('.')  # where plots and save_json write
    save_json: bool = False  # COCO-format predictions.json, scored by pycocotools
    coco_gt: Path | None = None  # COCO ground truth for save_json (None: written from the labels)
    # runtime of the network (utils/eval/backends.py): 'torch' runs the model as given; 'auto' runs an fp32 model on the
    # CPU in onnxruntime, on a cached export keyed by its tensors (test.py's default; train.py keeps 'torch': its
    # weights change every epoch); 'onnxruntime' insists
    backend: str = 'torch'
    # also Darknet's `detector map` (utils/darknet/post.py): its resize, thresholds, NMS and AP, reported beside
    # the figures above; needs a models.Darknet (run it through darknet_model() for Darknet's fused BatchNorm)
    darknet: bool = False


@dataclass(frozen=True)
class Metrics:
    """P, R, mAP and F1 over the whole set, and per class (summarize() of an evaluation's matches)."""
    mp: float  # mean precision at PR_SCORE
    mr: float  # mean recall at PR_SCORE
    map50: float  # mAP@0.5
    map: float  # mAP@0.5:0.95
    mf1: float  # mean F1
    maps: np.ndarray  # (nc,) per-class mAP@0.5:0.95 (the mean for classes without targets)
    nt: np.ndarray  # (nc,) targets per class
    per_class: APResult | None  # per-class P, R, AP and curves, None when no image had targets


@dataclass(frozen=True)
class EvalResult(Metrics):
    """What evaluate() measured over the whole set: the Metrics, the val losses, the images and the times."""
    loss: tuple[float, float, float]  # val box, obj, cls losses averaged over batches (zeros without compute_loss)
    seen: int  # images evaluated
    times: tuple[float, float, float]  # inference, NMS, total in ms per image
    darknet: MapResult | None = None  # Darknet's mAP@0.50, AP per class, TP/FP/FN (EvalConfig.darknet)

    @property
    def results(self) -> tuple[float, ...]:
        """(P, R, mAP@0.5, mAP@0.5:0.95, F1, val box, val obj, val cls): a results.txt row's metrics."""
        return (self.mp, self.mr, self.map50, self.map, self.mf1, *self.loss)


class EvalRun(NamedTuple):
    """What the batch loop of one evaluation gathers."""
    stats: list[tuple]  # per image with labels or detections: (correct (n, 10), conf (n,), cls (n,), target cls (m,))
    loss: torch.Tensor  # (3,) summed val box, obj, cls loss (zeros without compute_loss)
    seen: int  # images evaluated
    t_inf: float  # seconds of inference
    t_nms: float  # seconds of NMS


def eval_names(data: dict, model: nn.Module, single_cls: bool) -> list[str]:
    """Row labels: 'object' for --single-cls, else utils.data.config.class_names of the dataset's names and those the
    checkpoint carries."""
    if single_cls:
        return ['object']
    carried = getattr(de_parallel(model), 'names', None)
    return class_names(int(data['nc']), data['names'], carried, data.get('path', 'dataset config'))


def val_loader(data: dict, imgsz: int, batch_size: int, model: nn.Module, single_cls: bool,
               workers: int) -> torch.utils.data.DataLoader:
    """The validation loader of the original: rectangular batches padded by half a stride, not shuffled."""
    opts = DatasetOptions(img_size=imgsz, batch_size=batch_size, rect=True, single_cls=single_cls, pad=0.5,
                          stride=_model_stride(model), nc=int(data['nc']), prefix='test: ')
    pin = pin_memory_for(next(model.parameters()).device)
    loader, _ = create_dataloader(data['valid'], opts, LoaderOptions(workers=workers, shuffle=False, pin_memory=pin))
    return loader


def coco_gt_file(data: dict, single_cls: bool, coco_gt: str | Path | None) -> Path | None:
    """Ground truth for --save-json: --coco-gt, else COCO's annotations found beside the images, else None (written
    from the labels)."""
    if coco_gt:
        return Path(coco_gt)
    if not single_cls and isinstance(data.get('valid'), str):
        return find_coco_annotations(data['valid'])
    return None


def image_stats(pred: torch.Tensor, labels: torch.Tensor, tbox: torch.Tensor, iouv: torch.Tensor) -> tuple | None:
    """One image's entry of EvalRun.stats from detections (n, 6), labels (m, 5) [class, xywh] and their boxes (m, 4)
    xyxy in the same pixels; None for an image with neither."""
    if not len(pred):
        if not len(labels):
            return None
        return torch.zeros(0, iouv.numel(), dtype=torch.bool), torch.zeros(0), torch.zeros(0), labels[:, 0].cpu()
    correct = match_predictions(pred, torch.cat((labels[:, 0:1], tbox), 1), iouv)  # (n, 10)
    return correct.cpu(), pred[:, 4].cpu(), pred[:, 5].cpu(), labels[:, 0].cpu()


def eval_runtime(model: nn.Module, cfg: EvalConfig, compute_loss: Callable | None,
                 img_size: int) -> nn.Module | OrtModel:
    """The runner of cfg.backend for the model: the model itself, or onnxruntime on its cached export (an fp32 model
    on the CPU, without augmentation or validation losses; see utils.eval.backends)."""
    if cfg.backend == 'torch':
        return model
    p = next(model.parameters())
    try:
        backend = choose_backend(cfg.backend, p.device, 'off' if p.dtype == torch.float32 else 'on', cfg.augment,
                                 compute_loss is not None)
        return runtime_for(de_parallel(model), backend, img_size, strict=cfg.backend == 'onnxruntime')
    except BackendError as e:
        raise EvalError(str(e)) from None


def eval_batches(model: nn.Module, dataloader: torch.utils.data.DataLoader, cfg: EvalConfig,
                 compute_loss: Callable | None = None, coco: CocoJson | None = None,
                 plot: Callable | None = None) -> EvalRun:
    """Run the model (by cfg.backend's runtime) and NMS (cfg's thresholds) over the loader; match detections to
    labels (and add them to coco); plot(batch_i, imgs, targets, paths, output) is called for each batch when given."""
    import_in_background()  # torchvision, for NMS: its import runs beside the first batch's forward pass

    net = eval_runtime(model, cfg, compute_loss, int(getattr(getattr(dataloader, 'dataset', None), 'img_size', 416)))
    ort = isinstance(net, OrtModel)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype  # dtype: fp16/bf16 with --half
    # rectangular batches change shape nearly every batch: cuDNN would autotune again for most of them
    benchmark = torch.backends.cudnn.benchmark and not getattr(getattr(dataloader, 'dataset', None), 'rect', False)
    iouv = IOU_THRESHOLDS.to(device)
    loss = torch.zeros(3, device=device)
    stats, seen, t_inf, t_nms = [], 0, 0.0, 0.0
    header = ('%20s' + '%13s' * 7) % ('Class', 'Images', 'Targets', 'P', 'R', 'mAP@0.5', 'mAP@0.5:0.95', 'F1')
    bar = tqdm(dataloader, desc=header, file=sys.stdout, disable=not shows_progress())
    for batch_i, (imgs, targets, paths, shapes) in enumerate(bar):
        imgs = imgs.to(device, non_blocking=True).to(dtype) / 255.0  # uint8 (B, 3, H, W) -> [0, 1]
        if device.type == 'cpu' and not ort:  # NHWC input: oneDNN convolutions then skip layout conversions
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device)  # (n, 6) [image, class, x, y, w, h] normalised
        height, width = imgs.shape[2:]  # rectangular batch: H, W multiples of 32
        whwh = torch.tensor([width, height, width, height], device=device, dtype=torch.float32)

        t = time_synchronized(device)
        if ort:
            inf_out, train_out = net(imgs), None  # (B, N, 5 + nc) in input pixels
        else:
            with cudnn_benchmark(benchmark):
                inf_out, train_out = model(imgs, augment=cfg.augment)  # (B, N, 5 + nc) in input pixels; raw maps
        t_inf += time_synchronized(device) - t
        if compute_loss is not None and train_out is not None:
            loss += compute_loss([x.float() for x in train_out], targets)[1][:3]
        import torchvision.ops  # noqa: F401  waits for that import once: start-up, not NMS time per image
        t = time_synchronized(device)
        output = non_max_suppression(inf_out.float(), conf_thres=cfg.conf_thres, iou_thres=cfg.iou_thres,
                                     multi_label=cfg.multi_label, merge=cfg.merge)
        t_nms += time_synchronized(device) - t

        for si, pred in enumerate(output):  # pred: (n, 6) [x1, y1, x2, y2, conf, cls] in letterboxed pixels
            labels = targets[targets[:, 0] == si, 1:]  # (m, 5) [class, x, y, w, h]
            tbox = xywh2xyxy(labels[:, 1:5]) * whwh  # (m, 4) letterboxed pixels
            clip_coords(pred, (height, width))
            seen += 1
            if coco is not None:
                shape0, ratio_pad = shapes[si]
                box = scale_coords(imgs.shape[2:], pred[:, :4].clone(), shape0, ratio_pad).cpu().numpy()
                gbox = scale_coords(imgs.shape[2:], tbox.clone(), shape0, ratio_pad).cpu().numpy()
                coco.add(str(paths[si]), shape0, box, pred[:, 4].cpu().numpy(), pred[:, 5].cpu().numpy(),
                         labels[:, 0].long().tolist(), gbox)
            entry = image_stats(pred, labels, tbox, iouv)
            if entry is not None:
                stats.append(entry)
        if plot is not None:
            plot(batch_i, imgs, targets, paths, output)
    return EvalRun(stats, loss, seen, t_inf, t_nms)


def summarize(stats: list[tuple], nc: int) -> Metrics:
    """P, R, mAP@0.5, mAP@0.5:0.95, F1 and per-class mAPs from EvalRun.stats."""
    maps, nt = np.zeros(nc), np.zeros(nc, dtype=np.int64)
    if not stats:
        return Metrics(0.0, 0.0, 0.0, 0.0, 0.0, maps, nt, None)
    tp, conf, pcls, tcls = (torch.cat(x, 0).numpy() for x in zip(*stats))
    nt = np.bincount(tcls.astype(np.int64), minlength=nc)
    if not len(tcls):
        return Metrics(0.0, 0.0, 0.0, 0.0, 0.0, maps, nt, None)
    res = ap_per_class(tp, conf, pcls, tcls)
    ap50, ap = res.ap[:, 0], res.ap.mean(1)
    maps += ap.mean()
    maps[res.classes] = ap
    return Metrics(float(res.p.mean()), float(res.r.mean()), float(ap50.mean()), float(ap.mean()),
                   float(res.f1.mean()), maps, nt, res)


def log_table(s: Metrics, seen: int, names: list[str], per_class: bool) -> None:
    """The `all` row and, when per_class, one row per class with targets."""
    pf = '%20s' + '%13i' * 2 + '%13.3g' * 5
    LOGGER.info(pf % ('all', seen, s.nt.sum(), s.mp, s.mr, s.map50, s.map, s.mf1))
    if per_class and s.per_class is not None:
        r = s.per_class
        for i, c in enumerate(r.classes):
            LOGGER.info(pf % (names[c], seen, s.nt[c], r.p[i], r.r[i], r.ap[i, 0], r.ap[i].mean(), r.f1[i]))


def batch_plotter(save_dir: Path, names: list[str], confusion: ConfusionMatrix | None = None,
                  single_cls: bool = False) -> Callable:
    """eval_batches' plot hook: ground truth and predictions of the first batch as test_batch0_{gt,pred}.jpg, and
    every image counted into the confusion matrix when given (detections as class 0 under single_cls)."""
    from utils.eval.plots import output_to_target, plot_images

    def plot(batch_i: int, imgs: torch.Tensor, targets: torch.Tensor, paths: list[str], output: list) -> None:
        if batch_i < 1:
            plot_images(imgs, targets, paths=paths, names=names, fname=save_dir / f'test_batch{batch_i}_gt.jpg')
            plot_images(imgs, output_to_target(output, imgs.shape[3], imgs.shape[2]), paths=paths, names=names,
                        fname=save_dir / f'test_batch{batch_i}_pred.jpg')
        if confusion is not None:
            height, width = imgs.shape[2:]
            whwh = torch.tensor([width, height, width, height], device=targets.device, dtype=torch.float32)
            for si, pred in enumerate(output):  # pred: (n, 6) letterboxed pixels, clipped by eval_batches
                labels = targets[targets[:, 0] == si, 1:]  # (m, 5) [class, xywh] normalised
                if single_cls:
                    pred = torch.cat((pred[:, :5], torch.zeros_like(pred[:, 5:6])), 1)
                confusion.process_batch(pred, torch.cat((labels[:, 0:1], xywh2xyxy(labels[:, 1:5]) * whwh), 1))
    return plot


def confusion_for(model: nn.Module, nc: int, single_cls: bool) -> ConfusionMatrix | None:
    """A confusion matrix of the dataset's classes, or None (with a warning) where the model predicts another
    number of classes, so its rows would not be the dataset's."""
    model_nc = getattr(de_parallel(model), 'nc', nc)
    if model_nc != nc and not single_cls:
        LOGGER.warning(f'no confusion matrix: the model has {model_nc} classes, the dataset {nc}')
        return None
    return ConfusionMatrix(nc)


def save_metric_plots(s: Metrics, confusion: ConfusionMatrix | None, names: list[str], save_dir: Path) -> None:
    """precision_recall_curve.png, P_curve.png, R_curve.png, F1_curve.png (when any image had targets) and
    confusion_matrix.png in save_dir."""
    from utils.eval.plots import plot_confusion_matrix, plot_mc_curve, plot_pr_curve

    r = s.per_class
    if r is not None:
        plot_pr_curve(r.px, r.py, r.ap[:, 0], save_dir / 'precision_recall_curve.png', names, r.classes)
        for y, ylabel, f in ((r.p_curve, 'Precision', 'P_curve.png'), (r.r_curve, 'Recall', 'R_curve.png'),
                             (r.f1_curve(), 'F1', 'F1_curve.png')):
            plot_mc_curve(r.px, y, save_dir / f, ylabel, names, r.classes)
    if confusion is not None:
        plot_confusion_matrix(confusion.normalised(), names, save_dir / 'confusion_matrix.png', confusion.conf,
                              confusion.iou_thres)


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, names: list[str],
             cfg: EvalConfig = EvalConfig(), compute_loss: Callable | None = None) -> EvalResult:
    """Score a model on a validation loader whose classes are `names`: P, R, mAP@0.5, mAP@0.5:0.95, F1, and the
    mean val losses when compute_loss is given. The model runs as it is (its device and dtype) in eval mode and is
    left in the mode it came in. The table and speed line are logged (utils.logs.LOGGER); files are written only
    where cfg asks (plots, save_json: into cfg.save_dir)."""
    nc = len(names)
    save_dir = Path(cfg.save_dir)
    if cfg.plots or cfg.save_json:
        save_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    coco = CocoJson(list(getattr(loader.dataset, 'img_files', [])), names, cfg.coco_gt) if cfg.save_json else None
    confusion = confusion_for(model, nc, cfg.single_cls) if cfg.plots else None
    plot = batch_plotter(save_dir, names, confusion, cfg.single_cls) if cfg.plots else None
    run = eval_batches(model, loader, cfg, compute_loss, coco, plot)
    s = summarize(run.stats, nc)
    log_table(s, run.seen, names, per_class=cfg.verbose and nc > 1)
    if cfg.plots:
        save_metric_plots(s, confusion, names, save_dir)
    n = max(run.seen, 1)
    times = (run.t_inf / n * 1e3, run.t_nms / n * 1e3, (run.t_inf + run.t_nms) / n * 1e3)
    imgsz = getattr(loader.dataset, 'img_size', 0)
    dtype = str(next(model.parameters()).dtype).replace('torch.', '')
    LOGGER.info('Speed: %.1f/%.1f/%.1f ms inference/NMS/total per image at %gx%g, batch size %g, %s'
                % (*times, imgsz, imgsz, loader.batch_size or 0, dtype))
    if coco is not None and run.seen:
        coco.evaluate(save_dir)
    dn = darknet_figures(model, loader.dataset, names, cfg.single_cls) if cfg.darknet else None
    model.train(was_training)
    loss = tuple((run.loss.cpu() / max(len(loader), 1)).tolist())
    return EvalResult(**vars(s), loss=loss, seen=run.seen, times=times, darknet=dn)


def darknet_figures(model: nn.Module, dataset, names: list[str], single_cls: bool) -> MapResult:
    """Darknet's `detector map` of the model over the dataset's images and label files, logged as Darknet prints it."""
    m = de_parallel(model)
    if not hasattr(m, 'module_defs') or single_cls:
        raise EvalError('Darknet\'s mAP (--darknet) needs the PyTorch Darknet model and the cfg\'s own classes '
                        '(not --single-cls)')
    r = evaluate_map(m, dataset.img_files, dataset.label_files)
    w, h = m.hyperparams.get('width', 416), m.hyperparams.get('height', 416)
    LOGGER.info(f"Darknet's detector map ({len(dataset.img_files)} images at {w}x{h}, thresholds 0.005 / NMS 0.45, "
                f"area under each class's precision envelope, mean over all {len(r.ap)} classes):")
    LOGGER.info(map_report(r, names).removesuffix('\n'))
    return r


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of `python test.py` (the original's, plus --save-dir, --coco-gt, --workers)."""
    p = argparse.ArgumentParser(prog='test.py', description='Evaluate a YOLOv3 model: P, R, mAP, COCO metrics.')
    p.add_argument('--cfg', type=str, default='',
                   help='model cfg (default: the cfg saved in a .pt; cfg/yolov3-spp.cfg for .weights)')
    p.add_argument('--data', type=str, default='data/coco2014.data', help='dataset config (.data or .yaml)')
    p.add_argument('--weights', type=str, default='weights/yolov3-spp-ultralytics.pt', help='.weights or .pt')
    p.add_argument('--batch-size', type=int, default=16, help='images per batch')
    p.add_argument('--img-size', type=int, default=512, help='inference size (pixels)')
    p.add_argument('--conf-thres', type=float, default=0.001, help='object confidence threshold')
    p.add_argument('--iou-thres', type=float, default=0.6, help='IoU threshold for NMS')
    p.add_argument('--save-json', action='store_true', help='write COCO-format detections and score them')
    p.add_argument('--task', default='test', choices=('test', 'study', 'benchmark'),
                   help="'test'; 'study': mAP over NMS IoU thresholds; 'benchmark': mAP and time over sizes")
    p.add_argument('--device', default='', help="cuda device, i.e. 0 or 0,1, or 'cpu'")
    p.add_argument('--single-cls', action='store_true', help='treat every class as one')
    p.add_argument('--augment', action='store_true', help='test-time augmentation (flips and scales)')
    p.add_argument('--half', nargs='?', const='on', default='auto', choices=HALF_CHOICES,
                   help='network precision: auto (default: bf16 on a CPU with avx512_bf16/amx_bf16, else fp32), '
                        'bare --half or on (fp16 on CUDA, bf16 on such a CPU), off (fp32), fp16, bf16')
    p.add_argument('--backend', default='auto', choices=BACKENDS,
                   help='runtime of the network: auto (default: onnxruntime on the CPU, on an ONNX export cached in '
                        '$YOLOV3_CACHE or ~/.cache/yolov3/onnx; PyTorch on CUDA), torch, onnxruntime')
    p.add_argument('--save-dir', type=str, default='.', help='folder for plots and JSON files')
    p.add_argument('--coco-gt', type=str, default='', help='COCO ground-truth JSON (default: found or written)')
    p.add_argument('--workers', type=int, default=8, help='dataloader workers (at most)')
    p.add_argument('--darknet', action='store_true',
                   help="also Darknet's `detector map` mAP@0.50 (its resize, thresholds, NMS and AP over all classes), "
                        "printed as Darknet prints it; the model runs in fp32 with Darknet's fused BatchNorm")
    return p


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; --save-json is implied for the COCO data files, as in the original."""
    opt = get_args_parser().parse_args(argv)
    opt.save_json |= Path(opt.data).name in COCO_DATA_NAMES
    return opt


def eval_config(opt: argparse.Namespace, data: dict) -> EvalConfig:
    """The EvalConfig of test.py's options (per-class rows on; the COCO ground truth resolved when --save-json)."""
    return EvalConfig(conf_thres=opt.conf_thres, iou_thres=opt.iou_thres, augment=opt.augment,
                      single_cls=opt.single_cls, verbose=True, plots=True, save_dir=Path(opt.save_dir),
                      save_json=opt.save_json,
                      backend='torch' if opt.darknet else opt.backend, darknet=opt.darknet,
                      coco_gt=coco_gt_file(data, opt.single_cls, opt.coco_gt) if opt.save_json else None)


def load(opt: argparse.Namespace) -> tuple[dict, nn.Module]:
    """(data config, model) of the options: --device and --half are checked before anything is written, the
    dataset before the model loads (a wrong path fails at once)."""
    device = _device(opt.device, opt.batch_size)
    if opt.darknet:
        return load_darknet(opt, device)
    try:  # onnxruntime runs the fp32 export: the PyTorch model is then built in fp32 whatever --half auto would pick
        ort = choose_backend(opt.backend, device, opt.half, opt.augment) == 'onnxruntime'
    except BackendError as e:
        raise EvalError(str(e)) from None
    dtype = torch.float32 if ort else _half_dtype(opt.half, device)
    if opt.backend == 'torch':  # otherwise evaluate() says which runtime it chose
        LOGGER.info(f"Runtime: PyTorch {torch.__version__} {device.type}")
    Path(opt.save_dir).mkdir(parents=True, exist_ok=True)
    data = load_data_config(opt.data)
    check_dataset(data, splits=('valid',))
    return data, load_eval_model(opt.weights, opt.cfg, opt.img_size, device, dtype)


def load_darknet(opt: argparse.Namespace, device: torch.device) -> tuple[dict, nn.Module]:
    """load() for --darknet: the PyTorch model in fp32, BatchNorm fused with Darknet's eps (both the figures above and
    Darknet's use it); options that cannot go with Darknet's mAP are refused."""
    refused = [name for name, on in (('--backend onnxruntime', opt.backend == 'onnxruntime'),
                                     (f'--half {opt.half}', opt.half not in ('auto', 'off')),
                                     ('--single-cls', opt.single_cls), ('--task ' + opt.task, opt.task != 'test'))
               if on]
    if refused:
        raise EvalError(f"--darknet scores the PyTorch model in fp32 as Darknet's detector map: {', '.join(refused)} "
                        f"cannot go with it")
    LOGGER.info(f"Runtime: PyTorch {torch.__version__} {device.type}, fp32 (--darknet)")
    Path(opt.save_dir).mkdir(parents=True, exist_ok=True)
    data = load_data_config(opt.data)
    check_dataset(data, splits=('valid',))
    return data, darknet_model(load_model(opt.weights, opt.cfg or None, opt.img_size, device))


def run(opt: argparse.Namespace) -> EvalResult:
    """`test.py --task test`: the model and validation loader built from the options, evaluated."""
    data, model = load(opt)
    with closing(val_loader(data, opt.img_size, opt.batch_size, model, opt.single_cls, opt.workers)) as loader:
        return evaluate(model, loader, eval_names(data, model, opt.single_cls), eval_config(opt, data))


def study(opt: argparse.Namespace, model: nn.Module, data: dict, iou_list: np.ndarray | None = None) -> Path:
    """mAP and time over NMS IoU thresholds -> study.txt (one row each: results, seconds) and study.png."""
    from utils.eval.plots import _pyplot

    x = np.arange(0.4, 0.9, 0.05) if iou_list is None else np.asarray(iou_list)
    save_dir = Path(opt.save_dir)
    names = eval_names(data, model, opt.single_cls)
    cfg = EvalConfig(conf_thres=opt.conf_thres, augment=opt.augment, single_cls=opt.single_cls, plots=False,
                     save_dir=save_dir, backend=opt.backend)
    y = []
    with closing(val_loader(data, opt.img_size, opt.batch_size, model, opt.single_cls, opt.workers)) as loader:
        for iou in x:
            t = time.time()
            r = evaluate(model, loader, names, replace(cfg, iou_thres=float(iou))).results
            y.append(r + (time.time() - t,))
    y = np.array(y)
    save_dir.mkdir(parents=True, exist_ok=True)  # evaluate() creates no folder when it writes nothing
    np.savetxt(save_dir / 'study.txt', np.column_stack((x, y)), fmt='%10.4g',
               header='iou_thres P R mAP@0.5 mAP@0.5:0.95 F1 box obj cls seconds')
    plt = _pyplot()
    fig, ax = plt.subplots(3, 1, figsize=(6, 6), tight_layout=True)
    for a, col, label in zip(ax, (2, 3, -1), ('mAP@0.5', 'mAP@0.5:0.95', 'time (s)')):
        a.plot(x, y[:, col], marker='.', label=label)
        a.set_xlabel('NMS iou_thres')
        a.set_ylabel(label)
        a.legend()
    fig.savefig(save_dir / 'study.png', dpi=200)
    plt.close(fig)
    LOGGER.info(f"Study written to {save_dir / 'study.txt'} and {save_dir / 'study.png'}")
    return save_dir / 'study.txt'


def benchmark(opt: argparse.Namespace, model: nn.Module, data: dict, sizes: list[int] | None = None,
              ious: tuple[float, ...] = (0.6, 0.7)) -> Path:
    """mAP and time at image sizes 256-640 and two NMS IoU thresholds -> benchmark.txt."""
    sizes = list(range(256, 640, 128)) if sizes is None else sizes
    names = eval_names(data, model, opt.single_cls)
    cfg = EvalConfig(conf_thres=opt.conf_thres, single_cls=opt.single_cls, plots=False, save_dir=Path(opt.save_dir),
                     backend=opt.backend)
    y = []
    for s in sizes:
        with closing(val_loader(data, s, opt.batch_size, model, opt.single_cls, opt.workers)) as loader:
            for iou in ious:
                t = time.time()
                r = evaluate(model, loader, names, replace(cfg, iou_thres=iou)).results
                y.append((s, iou) + r + (time.time() - t,))
    out = Path(opt.save_dir) / 'benchmark.txt'
    out.parent.mkdir(parents=True, exist_ok=True)  # evaluate() creates no folder when it writes nothing
    np.savetxt(out, y, fmt='%10.4g', header='img_size iou_thres P R mAP@0.5 mAP@0.5:0.95 F1 box obj cls seconds')
    LOGGER.info(f'Benchmark written to {out}')
    return out


def main(opt: argparse.Namespace) -> int:
    """Run the task asked for; returns the exit status."""
    setup_logging()
    LOGGER.info(str(opt))
    import_in_background()  # torchvision, for NMS: its import runs while the data and the model load
    if opt.task == 'test':
        run(opt)
        return 0
    data, model = load(opt)
    if opt.task == 'study':
        study(opt, model, data)
    else:
        benchmark(opt, model, data)
    return 0


if __name__ == '__main__':
    args = parse_opt()
    try:
        status = main(args)
    except (EvalError, DatasetError, ConfigError, WeightsError, CheckpointError, FileNotFoundError) as err:
        sys.exit(f'Error: {err}')
    # Everything is written and closed; the interpreter's garbage collections at exit would only walk the objects
    # of torch's and torchvision's modules (as detect.py).
    gc.freeze()
    sys.exit(status)
