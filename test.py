"""Evaluate a model on a dataset's validation images: P, R, mAP@0.5, mAP@0.5:0.95 per class, COCO JSON + pycocotools.

    python test.py --cfg cfg/yolov3-tiny.cfg --data data/coco128.data --weights weights/yolov3-tiny.weights

train.py calls test() in-process after every epoch with its EMA model and its own dataloader.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
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

from models import WeightsError, load_eval_model  # noqa: E402
from utils.boxes import clip_coords, scale_coords, xywh2xyxy  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.coco import CocoJson, find_coco_annotations  # noqa: E402
from utils.data_config import DatasetError, check_dataset, load_data_config  # noqa: E402
from utils.datasets import create_dataloader  # noqa: E402
from utils.metrics import IOU_THRESHOLDS, APResult, ConfusionMatrix, ap_per_class, match_predictions  # noqa: E402
from utils.nms import import_in_background, non_max_suppression  # noqa: E402
from utils.parse_config import ConfigError  # noqa: E402
from utils.torch_utils import (HALF_CHOICES, cudnn_benchmark, de_parallel, inference_dtype,  # noqa: E402
                               pin_memory_for, select_device, set_cuda_device, time_synchronized)

COCO_DATA_NAMES = ('coco.data', 'coco2014.data', 'coco2017.data')  # as the original: --save-json is implied


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


def _half_dtype(half: str | bool, device: torch.device) -> torch.dtype:
    """inference_dtype of --half (True/False as 'on'/'off'), its refusals as EvalError."""
    half = ('on' if half else 'off') if isinstance(half, bool) else half
    try:
        return inference_dtype(half, device)
    except ValueError as e:
        raise EvalError(str(e)) from None


def _model_stride(model: nn.Module) -> int:
    """Largest [yolo] stride of a Darknet model (32 for the YOLOv3 family)."""
    m = de_parallel(model)
    strides = [m.module_list[i].stride for i in getattr(m, 'yolo_layers', [])]
    return int(max(strides)) if strides else 32


class EvalRun(NamedTuple):
    """What the batch loop of one evaluation gathers."""
    stats: list[tuple]  # per image with labels or detections: (correct (n, 10), conf (n,), cls (n,), target cls (m,))
    loss: torch.Tensor  # (3,) summed val box, obj, cls loss (zeros without compute_loss)
    seen: int  # images evaluated
    t_inf: float  # seconds of inference
    t_nms: float  # seconds of NMS


class Summary(NamedTuple):
    """Metrics over the whole set."""
    mp: float  # mean precision at PR_SCORE
    mr: float  # mean recall at PR_SCORE
    map50: float  # mAP@0.5
    map: float  # mAP@0.5:0.95
    mf1: float  # mean F1
    maps: np.ndarray  # (nc,) per-class mAP@0.5:0.95 (the mean for classes without targets)
    nt: np.ndarray  # (nc,) targets per class
    res: APResult | None  # per-class results, None when no image had targets


def class_names(data: dict, model: nn.Module, single_cls: bool) -> list[str]:
    """Row labels: 'object' for --single-cls, the dataset's names, else those the checkpoint carries (a data file
    without names gets load_data_config's placeholders 'class0', 'class1', ...)."""
    if single_cls:
        return ['object']
    names, nc = list(data['names']), int(data['nc'])
    carried = getattr(de_parallel(model), 'names', None)
    if names == [f'class{i}' for i in range(nc)] and carried is not None and len(carried) == nc:
        return list(carried)
    return names


def val_loader(data: dict, imgsz: int, batch_size: int, model: nn.Module, single_cls: bool,
               workers: int) -> torch.utils.data.DataLoader:
    """The validation loader of the original: rectangular batches padded by half a stride, not shuffled."""
    loader, _ = create_dataloader(data['valid'], imgsz, batch_size, stride=_model_stride(model), pad=0.5, rect=True,
                                  single_cls=single_cls, shuffle=False, workers=workers, nc=int(data['nc']),
                                  prefix='test: ', pin_memory=pin_memory_for(next(model.parameters()).device))
    return loader


def coco_json(data: dict, dataloader: torch.utils.data.DataLoader, names: list[str], single_cls: bool,
              coco_gt: str | Path | None) -> CocoJson:
    """COCO JSON writer: against --coco-gt, COCO's annotations found beside the images, or the labels."""
    gt_file = Path(coco_gt) if coco_gt else None
    if gt_file is None and not single_cls and isinstance(data.get('valid'), str):
        gt_file = find_coco_annotations(data['valid'])
    return CocoJson(list(getattr(dataloader.dataset, 'img_files', [])), names, gt_file)


def image_stats(pred: torch.Tensor, labels: torch.Tensor, tbox: torch.Tensor, iouv: torch.Tensor) -> tuple | None:
    """One image's entry of EvalRun.stats from detections (n, 6), labels (m, 5) [class, xywh] and their boxes (m, 4)
    xyxy in the same pixels; None for an image with neither."""
    if not len(pred):
        if not len(labels):
            return None
        return torch.zeros(0, iouv.numel(), dtype=torch.bool), torch.zeros(0), torch.zeros(0), labels[:, 0].cpu()
    correct = match_predictions(pred, torch.cat((labels[:, 0:1], tbox), 1), iouv)  # (n, 10)
    return correct.cpu(), pred[:, 4].cpu(), pred[:, 5].cpu(), labels[:, 0].cpu()


def eval_batches(model: nn.Module, dataloader: torch.utils.data.DataLoader, conf_thres: float, iou_thres: float,
                 multi_label: bool = True, merge: bool = True, augment: bool = False,
                 compute_loss: Callable | None = None, coco: CocoJson | None = None,
                 plot: Callable | None = None) -> EvalRun:
    """Run the model and NMS over the loader; match detections to labels (and add them to coco); plot(batch_i,
    imgs, targets, paths, output) is called for each batch when given."""
    import_in_background()  # torchvision, for NMS: its import runs beside the first batch's forward pass

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype  # dtype: fp16/bf16 with --half
    # rectangular batches change shape nearly every batch: cuDNN would autotune again for most of them
    benchmark = torch.backends.cudnn.benchmark and not getattr(getattr(dataloader, 'dataset', None), 'rect', False)
    iouv = IOU_THRESHOLDS.to(device)
    loss = torch.zeros(3, device=device)
    stats, seen, t_inf, t_nms = [], 0, 0.0, 0.0
    header = ('%20s' + '%13s' * 7) % ('Class', 'Images', 'Targets', 'P', 'R', 'mAP@0.5', 'mAP@0.5:0.95', 'F1')
    for batch_i, (imgs, targets, paths, shapes) in enumerate(tqdm(dataloader, desc=header, file=sys.stdout)):
        imgs = imgs.to(device, non_blocking=True).to(dtype) / 255.0  # uint8 (B, 3, H, W) -> [0, 1]
        if device.type == 'cpu':  # NHWC input: oneDNN convolutions then skip layout conversions (~1.5x on CPU)
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device)  # (n, 6) [image, class, x, y, w, h] normalised
        height, width = imgs.shape[2:]  # rectangular batch: H, W multiples of 32
        whwh = torch.tensor([width, height, width, height], device=device, dtype=torch.float32)

        t = time_synchronized(device)
        with cudnn_benchmark(benchmark):
            inf_out, train_out = model(imgs, augment=augment)  # (B, N, 5 + nc) in input pixels; raw maps
        t_inf += time_synchronized(device) - t
        if compute_loss is not None and train_out is not None:
            loss += compute_loss([x.float() for x in train_out], targets)[1][:3]
        import torchvision.ops  # noqa: F401  waits for that import once: start-up, not NMS time per image
        t = time_synchronized(device)
        output = non_max_suppression(inf_out.float(), conf_thres=conf_thres, iou_thres=iou_thres,
                                     multi_label=multi_label, merge=merge)
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


def summarize(stats: list[tuple], nc: int) -> Summary:
    """P, R, mAP@0.5, mAP@0.5:0.95, F1 and per-class mAPs from EvalRun.stats."""
    maps, nt, res = np.zeros(nc), np.zeros(nc, dtype=np.int64), None
    if not stats:
        return Summary(0.0, 0.0, 0.0, 0.0, 0.0, maps, nt, res)
    tp, conf, pcls, tcls = (torch.cat(x, 0).numpy() for x in zip(*stats))
    nt = np.bincount(tcls.astype(np.int64), minlength=nc)
    if not len(tcls):
        return Summary(0.0, 0.0, 0.0, 0.0, 0.0, maps, nt, res)
    res = ap_per_class(tp, conf, pcls, tcls)
    ap50, ap = res.ap[:, 0], res.ap.mean(1)
    maps += ap.mean()
    maps[res.classes] = ap
    return Summary(float(res.p.mean()), float(res.r.mean()), float(ap50.mean()), float(ap.mean()),
                   float(res.f1.mean()), maps, nt, res)


def print_summary(s: Summary, seen: int, names: list[str], per_class: bool) -> None:
    """The `all` row and, when per_class, one row per class with targets."""
    pf = '%20s' + '%13i' * 2 + '%13.3g' * 5
    print(pf % ('all', seen, s.nt.sum(), s.mp, s.mr, s.map50, s.map, s.mf1))
    if per_class and s.res is not None:
        r = s.res
        for i, c in enumerate(r.classes):
            print(pf % (names[c], seen, s.nt[c], r.p[i], r.r[i], r.ap[i, 0], r.ap[i].mean(), r.f1[i]))


def batch_plotter(save_dir: Path, names: list[str], confusion: ConfusionMatrix | None = None,
                  single_cls: bool = False) -> Callable:
    """eval_batches' plot hook: ground truth and predictions of the first batch as test_batch0_{gt,pred}.jpg, and
    every image counted into the confusion matrix when given (detections as class 0 under single_cls)."""
    from utils.plots import output_to_target, plot_images

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
        print(f'WARNING: no confusion matrix: the model has {model_nc} classes, the dataset {nc}')
        return None
    return ConfusionMatrix(nc)


def save_metric_plots(s: Summary, confusion: ConfusionMatrix | None, names: list[str], save_dir: Path) -> None:
    """precision_recall_curve.png, P_curve.png, R_curve.png, F1_curve.png (when any image had targets) and
    confusion_matrix.png in save_dir."""
    from utils.plots import plot_confusion_matrix, plot_mc_curve, plot_pr_curve

    r = s.res
    if r is not None:
        plot_pr_curve(r.px, r.py, r.ap[:, 0], save_dir / 'precision_recall_curve.png', names, r.classes)
        for y, ylabel, f in ((r.p_curve, 'Precision', 'P_curve.png'), (r.r_curve, 'Recall', 'R_curve.png'),
                             (r.f1_curve(), 'F1', 'F1_curve.png')):
            plot_mc_curve(r.px, y, save_dir / f, ylabel, names, r.classes)
    if confusion is not None:
        plot_confusion_matrix(confusion.normalised(), names, save_dir / 'confusion_matrix.png', confusion.conf,
                              confusion.iou_thres)


@torch.no_grad()
def test(cfg: str | None, data: str | Path | dict, weights: str | None = None, batch_size: int = 16,
         imgsz: int = 416, conf_thres: float = 0.001, iou_thres: float = 0.6, save_json: bool = False,
         single_cls: bool = False, augment: bool = False, model: nn.Module | None = None,
         dataloader: torch.utils.data.DataLoader | None = None, multi_label: bool = True,
         compute_loss: Callable | None = None, verbose: bool = False, plots: bool = True,
         save_dir: str | Path = '.', device: str = '', coco_gt: str | Path | None = None, merge: bool = True,
         workers: int = 8, half: str | bool = 'auto'
         ) -> tuple[tuple[float, ...], np.ndarray, tuple[float, float, float]]:
    """Evaluate a model (given, or built from cfg + weights) on data's 'valid' images.

    Returns (results, maps, times): results = (P, R, mAP@0.5, mAP@0.5:0.95, F1, val box, val obj, val cls) with the
    losses averaged over batches when compute_loss is given (else 0); maps (nc,) per-class mAP@0.5:0.95;
    times = (inference, NMS, total) in ms per image. half: the precision of the model built here (HALF_CHOICES,
    see utils.torch_utils.inference_dtype: 'auto' is bf16 on a CPU with native bf16); a given model runs as it is.
    """
    dev = _device(device, batch_size) if model is None else None
    if model is not None and half not in ('auto', 'off', False):
        raise EvalError(f'--half {half} applies to a model test() loads, not to a given model (cast that one)')
    dtype = _half_dtype(half, dev) if model is None else None  # refusals before anything is written
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    data = data if isinstance(data, dict) else load_data_config(data)
    if dataloader is None:
        check_dataset(data, splits=('valid',))  # before the model: a wrong path fails at once
    if model is None:
        model = load_eval_model(weights, cfg, imgsz, dev, dtype)
    was_training = model.training
    model.eval()
    nc = 1 if single_cls else int(data['nc'])
    names = class_names(data, model, single_cls)
    if dataloader is None:
        dataloader = val_loader(data, imgsz, batch_size, model, single_cls, workers)
    coco = coco_json(data, dataloader, names, single_cls, coco_gt) if save_json else None

    confusion = confusion_for(model, nc, single_cls) if plots else None
    run = eval_batches(model, dataloader, conf_thres, iou_thres, multi_label, merge, augment, compute_loss, coco,
                       batch_plotter(save_dir, names, confusion, single_cls) if plots else None)
    s = summarize(run.stats, nc)
    print_summary(s, run.seen, names, per_class=verbose and nc > 1)
    if plots:
        save_metric_plots(s, confusion, names, save_dir)
    n = max(run.seen, 1)
    times = (run.t_inf / n * 1e3, run.t_nms / n * 1e3, (run.t_inf + run.t_nms) / n * 1e3)
    print('Speed: %.1f/%.1f/%.1f ms inference/NMS/total per image at %gx%g, batch size %g, %s'
          % (*times, imgsz, imgsz, getattr(dataloader, 'batch_size', None) or batch_size,
             str(next(model.parameters()).dtype).replace('torch.', '')))
    if coco is not None and run.seen:
        coco.evaluate(save_dir)

    model.train(was_training)
    results = (s.mp, s.mr, s.map50, s.map, s.mf1, *(run.loss.cpu() / max(len(dataloader), 1)).tolist())
    return results, s.maps, times


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
    p.add_argument('--save-dir', type=str, default='.', help='folder for plots and JSON files')
    p.add_argument('--coco-gt', type=str, default='', help='COCO ground-truth JSON (default: found or written)')
    p.add_argument('--workers', type=int, default=8, help='dataloader workers (at most)')
    return p


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; --save-json is implied for the COCO data files, as in the original."""
    opt = get_args_parser().parse_args(argv)
    opt.save_json |= Path(opt.data).name in COCO_DATA_NAMES
    return opt


def study(opt: argparse.Namespace, model: nn.Module, data: dict, iou_list: np.ndarray | None = None) -> Path:
    """mAP and time over NMS IoU thresholds -> study.txt (one row each: results, seconds) and study.png."""
    from utils.plots import _pyplot

    x = np.arange(0.4, 0.9, 0.05) if iou_list is None else np.asarray(iou_list)
    save_dir = Path(opt.save_dir)
    loader = val_loader(data, opt.img_size, opt.batch_size, model, opt.single_cls, opt.workers)
    y = []
    for iou in x:
        t = time.time()
        r = test(opt.cfg, data, batch_size=opt.batch_size, imgsz=opt.img_size, conf_thres=opt.conf_thres,
                 iou_thres=float(iou), single_cls=opt.single_cls, augment=opt.augment, model=model,
                 dataloader=loader, plots=False, save_dir=save_dir)[0]
        y.append(r + (time.time() - t,))
    y = np.array(y)
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
    print(f"Study written to {save_dir / 'study.txt'} and {save_dir / 'study.png'}")
    return save_dir / 'study.txt'


def benchmark(opt: argparse.Namespace, model: nn.Module, data: dict, sizes: list[int] | None = None,
              ious: tuple[float, ...] = (0.6, 0.7)) -> Path:
    """mAP and time at image sizes 256-640 and two NMS IoU thresholds -> benchmark.txt."""
    sizes = list(range(256, 640, 128)) if sizes is None else sizes
    y = []
    for s in sizes:
        loader = val_loader(data, s, opt.batch_size, model, opt.single_cls, opt.workers)
        for iou in ious:
            t = time.time()
            r = test(opt.cfg, data, batch_size=opt.batch_size, imgsz=s, conf_thres=opt.conf_thres, iou_thres=iou,
                     single_cls=opt.single_cls, model=model, dataloader=loader, plots=False,
                     save_dir=opt.save_dir)[0]
            y.append((s, iou) + r + (time.time() - t,))
    out = Path(opt.save_dir) / 'benchmark.txt'
    np.savetxt(out, y, fmt='%10.4g', header='img_size iou_thres P R mAP@0.5 mAP@0.5:0.95 F1 box obj cls seconds')
    print(f'Benchmark written to {out}')
    return out


def main(opt: argparse.Namespace) -> int:
    """Run the task asked for; returns the exit status."""
    print(opt)
    import_in_background()  # torchvision, for NMS: its import runs while the data and the model load
    if opt.task == 'test':
        test(opt.cfg, opt.data, opt.weights, opt.batch_size, opt.img_size, opt.conf_thres, opt.iou_thres,
             opt.save_json, opt.single_cls, opt.augment, verbose=True, save_dir=opt.save_dir, device=opt.device,
             coco_gt=opt.coco_gt or None, workers=opt.workers, half=opt.half)
        return 0
    Path(opt.save_dir).mkdir(parents=True, exist_ok=True)
    data = load_data_config(opt.data)
    check_dataset(data, splits=('valid',))
    device = _device(opt.device, opt.batch_size)
    model = load_eval_model(opt.weights, opt.cfg, opt.img_size, device, _half_dtype(opt.half, device))
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
