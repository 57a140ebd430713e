"""Evaluate a model on a dataset's validation images: P, R, mAP@0.5, mAP@0.5:0.95 per class, COCO JSON + pycocotools.

    python test.py --cfg cfg/yolov3-tiny.cfg --data data/coco128.data --weights weights/yolov3-tiny.weights

train.py calls test() in-process after every epoch with its EMA model and its own dataloader.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from models import CheckpointError, WeightsError, load_model
from utils.boxes import clip_coords, scale_coords, xywh2xyxy
from utils.coco import (CocoGroundTruth, coco80_to_coco91_class, coco_evaluate, find_coco_annotations, image_ids,
                        numeric_image_id, prediction_records)
from utils.data_config import DatasetError, check_dataset, load_data_config
from utils.datasets import create_dataloader
from utils.metrics import IOU_THRESHOLDS, ap_per_class, match_predictions
from utils.nms import non_max_suppression
from utils.parse_config import ConfigError
from utils.torch_utils import select_device, time_synchronized

COCO_DATA_NAMES = ('coco.data', 'coco2014.data', 'coco2017.data')  # as the original: --save-json is implied


class EvalError(Exception):
    """An option of test.py that cannot work here (e.g. a CUDA --device on a machine without CUDA)."""


def _device(device: str, batch_size: int) -> torch.device:
    """select_device, with its refusals as EvalError so the command line reports them without a traceback."""
    try:
        return select_device(device, batch_size=batch_size)
    except (RuntimeError, ValueError) as e:
        raise EvalError(str(e)) from None


def _model_stride(model: nn.Module) -> int:
    """Largest [yolo] stride of a Darknet model (32 for the YOLOv3 family)."""
    m = model.module if hasattr(model, 'module') else model
    strides = [m.module_list[i].stride for i in getattr(m, 'yolo_layers', [])]
    return int(max(strides)) if strides else 32


@torch.no_grad()
def test(cfg: str | None, data: str | Path | dict, weights: str | None = None, batch_size: int = 16,
         imgsz: int = 416, conf_thres: float = 0.001, iou_thres: float = 0.6, save_json: bool = False,
         single_cls: bool = False, augment: bool = False, model: nn.Module | None = None,
         dataloader: torch.utils.data.DataLoader | None = None, multi_label: bool = True,
         compute_loss: Callable | None = None, verbose: bool = False, plots: bool = True,
         save_dir: str | Path = '.', device: str = '', coco_gt: str | Path | None = None, merge: bool = True,
         workers: int = 8) -> tuple[tuple[float, ...], np.ndarray, tuple[float, float, float]]:
    """Evaluate a model (given, or built from cfg + weights) on data's 'valid' images.

    Returns (results, maps, times): results = (P, R, mAP@0.5, mAP@0.5:0.95, F1, val box, val obj, val cls) with the
    losses averaged over batches when compute_loss is given (else 0); maps (nc,) per-class mAP@0.5:0.95;
    times = (inference, NMS, total) in ms per image.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    data = data if isinstance(data, dict) else load_data_config(data)
    if dataloader is None:
        check_dataset(data, splits=('valid',))  # before the model: a wrong path fails at once
    if model is None:
        device = _device(device, batch_size)
        model = load_model(weights, cfg, imgsz, device)
        model.fuse()
    else:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nc = 1 if single_cls else int(data['nc'])
    names = ['object'] if single_cls else list(data['names'])

    if dataloader is None:
        dataloader, _ = create_dataloader(data['valid'], imgsz, batch_size, stride=_model_stride(model), pad=0.5,
                                          rect=True, single_cls=single_cls, shuffle=False, workers=workers,
                                          nc=int(data['nc']), prefix='test: ')
    dataset = dataloader.dataset
    img_files = list(getattr(dataset, 'img_files', []))

    # COCO JSON: COCO's own annotations (91-class ids, numeric file names) or ground truth written from the labels
    gt_file, gt_builder, category_ids, id_of = None, None, None, {}
    if save_json:
        gt_file = Path(coco_gt) if coco_gt else None
        if gt_file is None and not single_cls and isinstance(data.get('valid'), str):
            gt_file = find_coco_annotations(data['valid'])
        if gt_file is None:
            id_of = image_ids(img_files)
            gt_builder = CocoGroundTruth(names)
        elif nc == 80:
            category_ids = coco80_to_coco91_class()
    jdict: list[dict] = []
    eval_ids: list[int] = []

    iouv = IOU_THRESHOLDS.to(device)
    niou = iouv.numel()
    seen = 0
    t_inf = t_nms = 0.0
    loss = torch.zeros(3, device=device)
    stats: list[tuple] = []
    header = ('%20s' + '%13s' * 7) % ('Class', 'Images', 'Targets', 'P', 'R', 'mAP@0.5', 'mAP@0.5:0.95', 'F1')
    for batch_i, (imgs, targets, paths, shapes) in enumerate(tqdm(dataloader, desc=header, file=sys.stdout)):
        imgs = imgs.to(device, non_blocking=True).float() / 255.0  # uint8 (B, 3, H, W) -> [0, 1]
        if device.type == 'cpu':  # NHWC input: oneDNN convolutions then skip layout conversions (~1.5x on CPU)
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device)  # (n, 6) [image, class, x, y, w, h] normalised
        _, _, height, width = imgs.shape  # rectangular batch: H, W multiples of 32
        whwh = torch.tensor([width, height, width, height], device=device, dtype=torch.float32)

        t = time_synchronized()
        inf_out, train_out = model(imgs, augment=augment)  # (B, N, 5 + nc) in input pixels; raw maps
        t_inf += time_synchronized() - t
        if compute_loss is not None and train_out is not None:
            loss += compute_loss([x.float() for x in train_out], targets)[1][:3]

        t = time_synchronized()
        output = non_max_suppression(inf_out.float(), conf_thres=conf_thres, iou_thres=iou_thres,
                                     multi_label=multi_label, merge=merge)
        t_nms += time_synchronized() - t

        for si, pred in enumerate(output):  # pred: (n, 6) [x1, y1, x2, y2, conf, cls] in letterboxed pixels
            labels = targets[targets[:, 0] == si, 1:]  # (m, 5) [class, x, y, w, h]
            nl = len(labels)
            seen += 1
            tbox = xywh2xyxy(labels[:, 1:5]) * whwh  # (m, 4) letterboxed pixels
            clip_coords(pred, (height, width))

            if save_json:
                path = str(paths[si])
                # own ground truth: ids from the dataset's file list (a loader without one: in order of appearance)
                image_id = id_of.setdefault(path, len(id_of) + 1) if gt_builder is not None else numeric_image_id(path)
                if image_id is None:
                    raise DatasetError(f"{path}: COCO annotations need numeric image file names "
                                       f"(e.g. 000000000009.jpg); pass --coco-gt or leave out COCO's file")
                eval_ids.append(image_id)
                shape0, ratio_pad = shapes[si]
                box = scale_coords(imgs[si].shape[1:], pred[:, :4].clone(), shape0, ratio_pad)
                jdict += prediction_records(image_id, box.cpu().numpy(), pred[:, 4].cpu().numpy(),
                                            pred[:, 5].cpu().numpy(), category_ids)
                if gt_builder is not None:
                    gbox = scale_coords(imgs[si].shape[1:], tbox.clone(), shape0, ratio_pad)
                    gt_builder.add_image(image_id, Path(path).name, shape0[0], shape0[1],
                                         labels[:, 0].long().tolist(), gbox.cpu().numpy())

            if not len(pred):
                if nl:
                    stats.append((torch.zeros(0, niou, dtype=torch.bool), torch.zeros(0), torch.zeros(0),
                                  labels[:, 0].cpu()))
                continue
            correct = match_predictions(pred, torch.cat((labels[:, 0:1], tbox), 1), iouv)  # (n, 10)
            stats.append((correct.cpu(), pred[:, 4].cpu(), pred[:, 5].cpu(), labels[:, 0].cpu()))

        if plots and batch_i < 1:
            from utils.plots import output_to_target, plot_images
            plot_images(imgs, targets, paths=paths, names=names, fname=save_dir / f'test_batch{batch_i}_gt.jpg')
            plot_images(imgs, output_to_target(output, width, height), paths=paths, names=names,
                        fname=save_dir / f'test_batch{batch_i}_pred.jpg')

    # statistics over the whole set
    mp = mr = map50 = map_ = mf1 = 0.0
    maps = np.zeros(nc)
    nt = np.zeros(nc, dtype=np.int64)
    res = None
    if stats:
        tp, conf, pcls, tcls = (torch.cat(x, 0).numpy() for x in zip(*stats))
        nt = np.bincount(tcls.astype(np.int64), minlength=nc)
        if len(tcls):
            res = ap_per_class(tp, conf, pcls, tcls)
            ap50, ap = res.ap[:, 0], res.ap.mean(1)
            mp, mr, map50, map_, mf1 = res.p.mean(), res.r.mean(), ap50.mean(), ap.mean(), res.f1.mean()
            maps += map_
            maps[res.classes] = ap
    pf = '%20s' + '%13i' * 2 + '%13.3g' * 5
    print(pf % ('all', seen, nt.sum(), mp, mr, map50, map_, mf1))
    if verbose and nc > 1 and res is not None:
        for i, c in enumerate(res.classes):
            print(pf % (names[c], seen, nt[c], res.p[i], res.r[i], res.ap[i, 0], res.ap[i].mean(), res.f1[i]))
    if plots and res is not None:
        from utils.plots import plot_pr_curve
        plot_pr_curve(res.px, res.py, res.ap[:, 0], save_dir / 'precision_recall_curve.png', names, res.classes)

    n = max(seen, 1)
    times = (t_inf / n * 1e3, t_nms / n * 1e3, (t_inf + t_nms) / n * 1e3)
    print('Speed: %.1f/%.1f/%.1f ms inference/NMS/total per image at %gx%g, batch size %g'
          % (*times, imgsz, imgsz, getattr(dataloader, 'batch_size', None) or batch_size))

    if save_json and seen:
        pred_file = save_dir / 'predictions.json'
        pred_file.write_text(json.dumps(jdict))
        if gt_builder is not None:
            gt_file = gt_builder.save(save_dir / 'ground_truth.json')
            print(f'COCO ground truth written from the labels: {gt_file}')
        print(f'\nCOCO mAP with pycocotools: predictions {pred_file}, ground truth {gt_file}')
        stats_coco = coco_evaluate(gt_file, pred_file, img_ids=sorted(set(eval_ids)))
        print(f'pycocotools: AP@[.5:.95] {stats_coco[0]:.3f}  AP50 {stats_coco[1]:.3f}')

    model.train(was_training)
    results = (float(mp), float(mr), float(map50), float(map_), float(mf1),
               *(loss.cpu() / max(len(dataloader), 1)).tolist())
    return results, maps, times


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
    loader, _ = create_dataloader(data['valid'], opt.img_size, opt.batch_size, stride=_model_stride(model),
                                  pad=0.5, rect=True, single_cls=opt.single_cls, shuffle=False, workers=opt.workers,
                                  nc=int(data['nc']), prefix='test: ')
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
        loader, _ = create_dataloader(data['valid'], s, opt.batch_size, stride=_model_stride(model), pad=0.5,
                                      rect=True, single_cls=opt.single_cls, shuffle=False, workers=opt.workers,
                                      nc=int(data['nc']), prefix='test: ')
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
    if opt.task == 'test':
        test(opt.cfg, opt.data, opt.weights, opt.batch_size, opt.img_size, opt.conf_thres, opt.iou_thres,
             opt.save_json, opt.single_cls, opt.augment, verbose=True, save_dir=opt.save_dir, device=opt.device,
             coco_gt=opt.coco_gt or None, workers=opt.workers)
        return 0
    Path(opt.save_dir).mkdir(parents=True, exist_ok=True)
    data = load_data_config(opt.data)
    check_dataset(data, splits=('valid',))
    device = _device(opt.device, opt.batch_size)
    model = load_model(opt.weights, opt.cfg, opt.img_size, device).fuse()
    if opt.task == 'study':
        study(opt, model, data)
    else:
        benchmark(opt, model, data)
    return 0


if __name__ == '__main__':
    args = parse_opt()
    try:
        sys.exit(main(args))
    except (EvalError, DatasetError, ConfigError, WeightsError, CheckpointError, FileNotFoundError) as err:
        sys.exit(f'Error: {err}')
