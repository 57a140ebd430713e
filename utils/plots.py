"""Drawing: labelled boxes, image-batch mosaics, training results, PR curve, hyperparameter evolution.

matplotlib is imported inside the functions that need it (Agg backend, so headless machines work) to keep
detect.py and test.py quick to start.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from utils.boxes import xywh2xyxy, xyxy2xywh

# matplotlib's default 'tab10' cycle as BGR, so class colours match between the scripts and the plots
_HEX = ('1f77b4', 'ff7f0e', '2ca02c', 'd62728', '9467bd', '8c564b', 'e377c2', '7f7f7f', 'bcbd22', '17becf',
        'aec7e8', 'ffbb78', '98df8a', 'ff9896', 'c5b0d5', 'c49c94', 'f7b6d2', 'c7c7c7', 'dbdb8d', '9edae5')
PALETTE = [tuple(int(h[i:i + 2], 16) for i in (4, 2, 0)) for h in _HEX]

# results.txt layout written by train.py, one row per epoch: 'epoch/epochs', memory, then these columns
RESULTS_COLUMNS = ('GIoU', 'objectness', 'classification', 'total loss', 'targets', 'img_size',
                   'precision', 'recall', 'mAP@0.5', 'mAP@0.5:0.95', 'F1',
                   'val GIoU', 'val objectness', 'val classification')


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def class_color(c: int) -> tuple[int, int, int]:
    """A fixed BGR colour per class index."""
    return PALETTE[int(c) % len(PALETTE)]


def plot_one_box(xyxy: Sequence[float], img: np.ndarray, color: Sequence[int] | None = None,
                 label: str | None = None, line_thickness: int | None = None) -> None:
    """Draw one xyxy box (in place) on a BGR/RGB uint8 image, with a filled label tag above it."""
    tl = line_thickness or round(0.002 * (img.shape[0] + img.shape[1]) / 2) + 1
    color = tuple(int(v) for v in (color or PALETTE[0]))
    c1, c2 = (int(xyxy[0]), int(xyxy[1])), (int(xyxy[2]), int(xyxy[3]))
    cv2.rectangle(img, c1, c2, color, thickness=tl, lineType=cv2.LINE_AA)
    if label:
        tf = max(tl - 1, 1)
        tw, th = cv2.getTextSize(label, 0, fontScale=tl / 3, thickness=tf)[0]
        top = c1[1] - th - 3 if c1[1] - th - 3 >= 0 else c1[1] + th + 3  # keep the tag inside the image
        cv2.rectangle(img, c1, (c1[0] + tw, top), color, -1, cv2.LINE_AA)
        text_y = c1[1] - 2 if top < c1[1] else top - 2
        cv2.putText(img, label, (c1[0], text_y), 0, tl / 3, (225, 255, 255), thickness=tf, lineType=cv2.LINE_AA)


def output_to_target(output: Sequence[torch.Tensor], width: int, height: int) -> np.ndarray:
    """NMS output (list of (n, 6) [xyxy, conf, cls] in pixels) -> (N, 7) [image, cls, x, y, w, h, conf] normalised."""
    rows = []
    for i, det in enumerate(output):
        if det is None or not len(det):
            continue
        det = det.detach().float().cpu()
        xywh = xyxy2xywh(det[:, :4]) / torch.tensor([width, height, width, height])
        rows.append(torch.cat((torch.full((len(det), 1), float(i)), det[:, 5:6], xywh, det[:, 4:5]), 1))
    return torch.cat(rows).numpy() if rows else np.zeros((0, 7), dtype=np.float32)


def plot_images(images: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray,
                paths: Sequence[str] | None = None, fname: str | os.PathLike | None = 'images.jpg',
                names: Sequence[str] | None = None, max_size: int = 640, max_subplots: int = 16,
                conf_thres: float = 0.3) -> np.ndarray:
    """Mosaic of a batch (B, 3, H, W) RGB (uint8 or float in [0, 1]) with its boxes; targets (n, 6)
    [image, cls, x, y, w, h] normalised (ground truth) or (n, 7) with conf (predictions, drawn above conf_thres).
    Writes fname (jpg) when given and returns the RGB mosaic."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().float().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.size and images.max() <= 1.0:  # float input in [0, 1]
        images = images * 255
    bs, _, h, w = images.shape
    bs = min(bs, max_subplots)
    ns = math.ceil(bs ** 0.5)  # tiles per side
    scale = max_size / max(h, w) / ns * 2  # the whole mosaic stays about 2 * max_size wide
    if scale < 1:
        h, w = math.ceil(scale * h), math.ceil(scale * w)
    mosaic = np.full((ns * h, ns * w, 3), 255, dtype=np.uint8)
    tl = max(1, round(min(h, w) / 200))
    tf = max(tl - 1, 1)
    for i in range(bs):
        x0, y0 = w * (i % ns), h * (i // ns)
        img = images[i].transpose(1, 2, 0).clip(0, 255).astype(np.uint8)
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        mosaic[y0:y0 + h, x0:x0 + w] = img
        t = targets[targets[:, 0] == i] if len(targets) else np.zeros((0, 6))
        if len(t):
            gt = t.shape[1] == 6
            boxes = xywh2xyxy(t[:, 2:6].astype(np.float64)) * [w, h, w, h] + [x0, y0, x0, y0]
            for j, box in enumerate(boxes):
                c = int(t[j, 1])
                name = names[c] if names is not None and c < len(names) else str(c)
                if gt or t[j, 6] > conf_thres:
                    label = name if gt else f'{name} {t[j, 6]:.1f}'
                    # mosaic is RGB: reverse the BGR palette entry
                    plot_one_box(box, mosaic, color=class_color(c)[::-1], label=label, line_thickness=tl)
        if paths is not None:
            label = Path(paths[i]).name[:40]
            th = cv2.getTextSize(label, 0, fontScale=tl / 3, thickness=tf)[0][1]
            cv2.putText(mosaic, label, (x0 + 5, y0 + th + 5), 0, tl / 3, (220, 220, 220), thickness=tf,
                        lineType=cv2.LINE_AA)
        cv2.rectangle(mosaic, (x0, y0), (x0 + w, y0 + h), (255, 255, 255), thickness=2)
    if fname is not None:
        cv2.imwrite(str(fname), cv2.cvtColor(mosaic, cv2.COLOR_RGB2BGR))
    return mosaic


def plot_pr_curve(px: np.ndarray, py: np.ndarray, ap: np.ndarray, save_path: str | os.PathLike = 'pr_curve.png',
                  names: Sequence[str] | None = None, classes: Sequence[int] | None = None) -> Path:
    """Precision-recall curves at IoU 0.5: py (nc, len(px)) per class, ap (nc,) their AP@0.5; the mean in bold.

    Drawn with OpenCV rather than matplotlib: importing matplotlib would add ~0.8 s to every test.py run.
    """
    py = np.asarray(py, dtype=np.float64).reshape(-1, len(px))
    ap = np.asarray(ap, dtype=np.float64).reshape(-1)
    w, h, left, top, plot_w, plot_h = 1500, 900, 90, 40, 900, 780  # canvas and plot area (pixels)
    img = np.full((h, w, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX

    def to_px(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.stack((left + np.clip(x, 0, 1) * plot_w, top + (1 - np.clip(y, 0, 1)) * plot_h), 1).astype(np.int32)

    for t in np.linspace(0, 1, 6):  # grid, ticks and tick labels
        gx, gy = int(left + t * plot_w), int(top + (1 - t) * plot_h)
        cv2.line(img, (gx, top), (gx, top + plot_h), (230, 230, 230), 1)
        cv2.line(img, (left, gy), (left + plot_w, gy), (230, 230, 230), 1)
        cv2.putText(img, f'{t:.1f}', (gx - 15, top + plot_h + 25), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f'{t:.1f}', (left - 40, gy + 5), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (left + plot_w, top + plot_h), (0, 0, 0), 1)
    cv2.putText(img, 'Recall', (left + plot_w // 2 - 30, h - 20), font, 0.7, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, 'Precision', (10, top - 12), font, 0.7, (0, 0, 0), 1, cv2.LINE_AA)

    legend = []
    for k, y in enumerate(py):
        c = int(classes[k]) if classes is not None else k
        color = class_color(c) if len(py) < 21 else (160, 160, 160)  # per-class legend only where readable
        cv2.polylines(img, [to_px(px, y)], False, color, 1, cv2.LINE_AA)
        if len(py) < 21:
            legend.append((f'{names[c] if names is not None and c < len(names) else c} {ap[k]:.3f}', color, 1))
    if len(py):
        cv2.polylines(img, [to_px(px, py.mean(0))], False, (255, 0, 0), 3, cv2.LINE_AA)
        legend.insert(0, (f'all classes {ap.mean():.3f} mAP@0.5', (255, 0, 0), 3))
    for i, (text, color, thick) in enumerate(legend):
        y0 = top + 20 + 24 * i
        cv2.line(img, (left + plot_w + 30, y0 - 5), (left + plot_w + 70, y0 - 5), color, thick, cv2.LINE_AA)
        cv2.putText(img, text, (left + plot_w + 80, y0), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(save_path), img)
    return Path(save_path)


def _read_results(path: Path) -> np.ndarray:
    """results.txt rows -> float array (epochs, columns); 'i/n' epochs and '1.2G' memory become numbers."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith('#'):
            continue
        vals = []
        for tok in line.split():
            tok = tok.split('/')[0]
            m = re.fullmatch(r'([-+0-9.eE]+)[KMGT]?', tok)
            if not m:
                raise ValueError(f"{path}: cannot read '{tok}' as a number in line: {line.strip()}")
            vals.append(float(m.group(1)))
        rows.append(vals)
    if not rows:
        raise ValueError(f"{path}: no result rows")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path}: rows have different numbers of columns")
    return np.array(rows)


def plot_results(files: Sequence[str | os.PathLike] | str | os.PathLike = 'results.txt',
                 save_path: str | os.PathLike = 'results.png', labels: Sequence[str] | None = None) -> Path:
    """Plot every column of one or more results.txt files against epoch into one figure (a subplot per column)."""
    plt = _pyplot()
    files = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
    data = [_read_results(f) for f in files]
    ncol = data[0].shape[1] - 2  # after epoch and memory
    titles = list(RESULTS_COLUMNS) if ncol == len(RESULTS_COLUMNS) else [f'column {k + 2}' for k in range(ncol)]
    cols = 5
    rows = math.ceil(ncol / cols)
    fig, ax = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), tight_layout=True, squeeze=False)
    ax = ax.ravel()
    for fi, (f, d) in enumerate(zip(files, data)):
        label = labels[fi] if labels else f.stem
        epoch = d[:, 0]
        for k in range(min(ncol, d.shape[1] - 2)):
            ax[k].plot(epoch, d[:, k + 2], marker='.', linewidth=2, markersize=6, label=label)
            ax[k].set_title(titles[k])
    for k in range(ncol, len(ax)):
        ax[k].axis('off')
    if len(files) > 1:
        ax[0].legend()
    fig.savefig(save_path, dpi=200)
    plt.close(fig)
    return Path(save_path)


def plot_evolution(hyp_keys: Sequence[str], evolve_path: str | os.PathLike = 'evolve.txt',
                   save_path: str | os.PathLike = 'evolve.png', n_results: int = 8) -> Path:
    """Scatter of fitness against each hyperparameter over an evolve.txt (rows: n_results results, then the
    hyperparameters in hyp_keys order); the best row is marked and its value printed in the title."""
    from utils.metrics import fitness

    plt = _pyplot()
    x = np.loadtxt(evolve_path, ndmin=2)
    if x.shape[1] != n_results + len(hyp_keys):
        raise ValueError(f"{evolve_path}: {x.shape[1]} columns, expected {n_results} results + "
                         f"{len(hyp_keys)} hyperparameters")
    f = fitness(x)
    weights = (f - f.min()) / (f.max() - f.min() + 1e-9)
    best = int(f.argmax())
    cols = 5
    rows = math.ceil(len(hyp_keys) / cols)
    fig, ax = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), tight_layout=True, squeeze=False)
    ax = ax.ravel()
    for k, key in enumerate(hyp_keys):
        y = x[:, n_results + k]
        ax[k].scatter(y, f, c=weights, cmap='viridis', alpha=0.6, edgecolors='none')
        ax[k].plot(y[best], f[best], 'k+', markersize=15)
        ax[k].set_title(f'{key} = {y[best]:.3g}', fontdict={'size': 9})
    for k in range(len(hyp_keys), len(ax)):
        ax[k].axis('off')
    fig.savefig(save_path, dpi=200)
    plt.close(fig)
    return Path(save_path)
