"""Drawing: labelled boxes, image-batch mosaics, training results, PR and P/R/F1-confidence curves, confusion
matrix, hyperparameter evolution.

matplotlib is imported inside the functions that need it (Agg backend, so headless machines work) to keep
detect.py and test.py quick to start; torch too, so that detect.py's drawing (plot_one_box, class_color) runs in a
process that never imports it (an onnxruntime session).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

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
    import torch  # lazy: see the module docstring

    from utils.boxes import xyxy2xywh
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
    import torch  # lazy: see the module docstring

    from utils.boxes import xywh2xyxy
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


# canvas and plot area (pixels) of the curve plots: width, height, left, top, plot width, plot height
_CURVE = (1500, 900, 90, 40, 900, 780)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MEAN_BGR = (255, 0, 0)  # the mean curve: bold blue, as YOLOv5


def _curve_canvas(xlabel: str, ylabel: str) -> np.ndarray:
    """A white canvas with the [0, 1] x [0, 1] plot area of _CURVE, grid, tick labels and axis titles."""
    w, h, left, top, plot_w, plot_h = _CURVE
    img = np.full((h, w, 3), 255, np.uint8)
    for t in np.linspace(0, 1, 6):  # grid, ticks and tick labels
        gx, gy = int(left + t * plot_w), int(top + (1 - t) * plot_h)
        cv2.line(img, (gx, top), (gx, top + plot_h), (230, 230, 230), 1)
        cv2.line(img, (left, gy), (left + plot_w, gy), (230, 230, 230), 1)
        cv2.putText(img, f'{t:.1f}', (gx - 15, top + plot_h + 25), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f'{t:.1f}', (left - 40, gy + 5), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (left + plot_w, top + plot_h), (0, 0, 0), 1)
    cv2.putText(img, xlabel, (left + plot_w // 2 - 30, h - 20), _FONT, 0.7, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (10, top - 12), _FONT, 0.7, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def _draw_curve(img: np.ndarray, x: np.ndarray, y: np.ndarray, color: Sequence[int], thickness: int) -> None:
    """Draw y(x), both in [0, 1], into the plot area of _CURVE."""
    _, _, left, top, plot_w, plot_h = _CURVE
    pts = np.stack((left + np.clip(x, 0, 1) * plot_w, top + (1 - np.clip(y, 0, 1)) * plot_h), 1).astype(np.int32)
    cv2.polylines(img, [pts], False, tuple(int(c) for c in color), thickness, cv2.LINE_AA)


def _draw_legend(img: np.ndarray, entries: list[tuple[str, Sequence[int], int]]) -> None:
    """Legend right of the plot area: one (text, colour, line thickness) per row."""
    _, _, left, top, plot_w, _ = _CURVE
    for i, (text, color, thick) in enumerate(entries):
        y0 = top + 20 + 24 * i
        cv2.line(img, (left + plot_w + 30, y0 - 5), (left + plot_w + 70, y0 - 5), color, thick, cv2.LINE_AA)
        cv2.putText(img, text, (left + plot_w + 80, y0), _FONT, 0.55, (0, 0, 0), 1, cv2.LINE_AA)


def _class_curves(img: np.ndarray, px: np.ndarray, py: np.ndarray, names: Sequence[str] | None,
                  classes: Sequence[int] | None,
                  values: np.ndarray | None = None) -> list[tuple[str, Sequence[int], int]]:
    """Draw one thin curve per class; returns legend rows 'name [value]' (only for fewer than 21 classes, where a
    per-class legend stays readable; more classes are drawn grey)."""
    legend = []
    for k, y in enumerate(py):
        c = int(classes[k]) if classes is not None else k
        color = class_color(c) if len(py) < 21 else (160, 160, 160)
        _draw_curve(img, px, y, color, 1)
        if len(py) < 21:
            name = names[c] if names is not None and c < len(names) else str(c)
            legend.append((name if values is None else f'{name} {values[k]:.3f}', color, 1))
    return legend


def plot_pr_curve(px: np.ndarray, py: np.ndarray, ap: np.ndarray, save_path: str | os.PathLike = 'pr_curve.png',
                  names: Sequence[str] | None = None, classes: Sequence[int] | None = None) -> Path:
    """Precision-recall curves at IoU 0.5: py (nc, len(px)) per class, ap (nc,) their AP@0.5; the mean in bold.

    Drawn with OpenCV rather than matplotlib: importing matplotlib would add ~0.8 s to every test.py run.
    """
    py = np.asarray(py, dtype=np.float64).reshape(-1, len(px))
    ap = np.asarray(ap, dtype=np.float64).reshape(-1)
    img = _curve_canvas('Recall', 'Precision')
    legend = _class_curves(img, px, py, names, classes, ap)
    if len(py):
        _draw_curve(img, px, py.mean(0), _MEAN_BGR, 3)
        legend.insert(0, (f'all classes {ap.mean():.3f} mAP@0.5', _MEAN_BGR, 3))
    _draw_legend(img, legend)
    cv2.imwrite(str(save_path), img)
    return Path(save_path)


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box filter over a fraction f of the points (odd width, edges padded with the end values), as YOLOv5."""
    nf = round(len(y) * f * 2) // 2 + 1
    pad = nf // 2
    yp = np.concatenate((np.full(pad, y[0]), y, np.full(pad, y[-1])))
    return np.convolve(yp, np.ones(nf) / nf, mode='valid')


def plot_mc_curve(px: np.ndarray, py: np.ndarray, save_path: str | os.PathLike, ylabel: str,
                  names: Sequence[str] | None = None, classes: Sequence[int] | None = None) -> Path:
    """A metric against confidence: py (nc, len(px)) per class; the class mean, smoothed as YOLOv5, in bold with
    its maximum and the confidence where it is reached in the legend."""
    py = np.asarray(py, dtype=np.float64).reshape(-1, len(px))
    img = _curve_canvas('Confidence', ylabel)
    legend = _class_curves(img, px, py, names, classes)
    if len(py):
        y = smooth(py.mean(0))
        _draw_curve(img, px, y, _MEAN_BGR, 3)
        legend.insert(0, (f'all classes {y.max():.2f} at {px[y.argmax()]:.3f}', _MEAN_BGR, 3))
    _draw_legend(img, legend)
    cv2.imwrite(str(save_path), img)
    return Path(save_path)


class MatrixGeometry(NamedTuple):
    """Where plot_confusion_matrix draws the cells: cell (row, col) spans x from left + col * cell, y from
    top + row * cell, cell pixels each."""
    left: int
    top: int
    cell: int
    width: int  # canvas
    height: int
    font_scale: float  # of the tick labels


def matrix_geometry(labels: Sequence[str]) -> MatrixGeometry:
    """Layout of a confusion matrix with these row / column labels (classes, then background)."""
    n = len(labels)
    cell = int(np.clip(1100 // n, 14, 160))
    font_scale = float(np.clip(cell / 35, 0.4, 0.6))
    text_w = max(cv2.getTextSize(t, _FONT, font_scale, 1)[0][0] for t in labels)
    left, top = 50 + text_w + 10, 70
    width = max(left + n * cell + 130, 500)  # the colour bar and its numbers on the right; the title
    height = top + n * cell + 10 + text_w + 60  # rotated column labels, then the axis title
    return MatrixGeometry(left, top, cell, width, height, font_scale)


def blues(v: float) -> tuple[int, int, int]:
    """BGR of v in [0, 1] on a white-to-dark-blue ramp (close to matplotlib's 'Blues', which YOLOv5 uses)."""
    stops = np.array([[255, 251, 247], [214, 174, 107], [107, 48, 8]], dtype=np.float64)  # BGR at 0, 0.5, 1
    v = float(np.clip(v, 0, 1)) * 2
    k = min(int(v), 1)
    return tuple(int(round(x)) for x in stops[k] + (stops[k + 1] - stops[k]) * (v - k))


def _put_rotated(img: np.ndarray, text: str, x_center: int, y_top: int, scale: float) -> None:
    """Black text turned 90 degrees (read bottom to top) with its end at y_top, centred on x_center."""
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, 1)
    patch = np.full((th + base + 4, tw + 4, 3), 255, np.uint8)
    cv2.putText(patch, text, (2, th + 2), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    patch = cv2.rotate(patch, cv2.ROTATE_90_COUNTERCLOCKWISE)  # (tw + 4, th + base + 4)
    y0, x0 = y_top, x_center - patch.shape[1] // 2
    region = img[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]]
    region[:] = np.minimum(region, patch[:region.shape[0], :region.shape[1]])  # dark text over the white canvas


def _draw_cells(img: np.ndarray, array: np.ndarray, g: MatrixGeometry, numbers: bool) -> None:
    """Fill the cells with their colour (blank below 0.005, as YOLOv5) and, when numbers, the value."""
    for (r, c), v in np.ndenumerate(array):
        if v < 0.005:
            continue
        x0, y0 = g.left + c * g.cell, g.top + r * g.cell
        cv2.rectangle(img, (x0, y0), (x0 + g.cell - 1, y0 + g.cell - 1), blues(v), -1)
        if numbers:
            text = f'{v:.2f}'
            scale = min(0.6, 0.8 * g.cell / cv2.getTextSize(text, _FONT, 1.0, 1)[0][0])
            (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
            color = (255, 255, 255) if v > 0.5 else (0, 0, 0)
            cv2.putText(img, text, (x0 + (g.cell - tw) // 2, y0 + (g.cell + th) // 2), _FONT, scale, color, 1,
                        cv2.LINE_AA)


def _draw_colour_bar(img: np.ndarray, g: MatrixGeometry, n: int) -> None:
    """A vertical 0..1 colour bar right of the matrix, as tall as it."""
    x0, y0, h = g.left + n * g.cell + 30, g.top, n * g.cell
    for y in range(h):
        cv2.line(img, (x0, y0 + y), (x0 + 20, y0 + y), blues(1 - y / max(h - 1, 1)), 1)
    cv2.rectangle(img, (x0, y0), (x0 + 20, y0 + h - 1), (0, 0, 0), 1)
    for t in (0.0, 0.5, 1.0):
        cv2.putText(img, f'{t:.1f}', (x0 + 26, int(y0 + (1 - t) * (h - 1)) + 5), _FONT, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)


def plot_confusion_matrix(array: np.ndarray, names: Sequence[str], save_path: str | os.PathLike = 'confusion_matrix.png',
                          conf: float = 0.25, iou: float = 0.45) -> Path:
    """Draw a normalised confusion matrix (nc + 1, nc + 1), rows predicted, columns true, the last of each
    background; the value in each cell for fewer than 30 classes (as YOLOv5), only colours beyond."""
    n = array.shape[0]
    labels = [str(x) for x in names] if len(names) == n - 1 else [str(i) for i in range(n - 1)]
    labels.append('background')
    g = matrix_geometry(labels)
    img = np.full((g.height, g.width, 3), 255, np.uint8)
    _draw_cells(img, np.asarray(array, dtype=np.float64), g, numbers=n - 1 < 30)
    cv2.rectangle(img, (g.left - 1, g.top - 1), (g.left + n * g.cell, g.top + n * g.cell), (0, 0, 0), 1)
    for k, text in enumerate(labels):
        (tw, th), _ = cv2.getTextSize(text, _FONT, g.font_scale, 1)
        mid = g.top + k * g.cell + g.cell // 2
        cv2.putText(img, text, (g.left - 8 - tw, mid + th // 2), _FONT, g.font_scale, (0, 0, 0), 1, cv2.LINE_AA)
        _put_rotated(img, text, g.left + k * g.cell + g.cell // 2, g.top + n * g.cell + 8, g.font_scale)
    _draw_colour_bar(img, g, n)
    cv2.putText(img, 'Confusion matrix', (10, 30), _FONT, 0.7, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f'normalised per true class; conf {conf:g}, IoU {iou:g}', (10, 55), _FONT, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(img, 'True', (g.left + n * g.cell // 2 - 20, g.height - 20), _FONT, 0.7, (0, 0, 0), 1, cv2.LINE_AA)
    _put_rotated(img, 'Predicted', 25, g.top + n * g.cell // 2 - 50, 0.7)
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
    from utils.eval.metrics import fitness

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
