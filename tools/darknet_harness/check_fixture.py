"""Self-check of the Darknet [yolo] fixture: shapes, output = Darknet's activation of input, loss = mean cost / batch,
threshold margins, and a per-case summary of which delta entries Darknet set.

    python tools/darknet_harness/check_fixture.py [tests/fixtures/darknet_yolo]

Exits 1 with one line per problem, naming the file.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

FIXTURE_DIR = Path(__file__).resolve().parents[2] / 'tests' / 'fixtures' / 'darknet_yolo'
ENTRY_NAMES = ('x', 'y', 'w', 'h', 'obj', 'cls')
REQUIRED = ('cfg', 'net_wh', 'truth', 'anchors', 'layer_index', 'loss', 'seen', 'iteration')


def yolo_sections(cfg: str, kind: str = 'yolo') -> list:
    """The [yolo] (or [kind]) sections of a cfg text as {key: value string} dicts, in cfg order."""
    sections = []
    for block in re.split(r'^\s*(?=\[)', cfg, flags=re.M):
        if block.startswith(f'[{kind}]'):
            opts = {}
            for line in block.splitlines()[1:]:
                line = line.split('#')[0]
                if '=' in line:
                    key, value = line.split('=', 1)
                    opts[key.strip()] = value.strip()
            sections.append(opts)
    return sections


def darknet_activation(raw: np.ndarray, n: int, scale_x_y: float, new_coords: bool = False) -> np.ndarray:
    """forward_yolo_layer's output for a raw (batch, n*(5+classes), h, w) input, float64 (new_coords: no logistic,
    the head's convolution applied it)."""
    p = raw.astype(np.float64).reshape(raw.shape[0], n, -1, *raw.shape[2:])
    out = p.copy() if new_coords else 1.0 / (1.0 + np.exp(-p))
    out[:, :, 2:4] = p[:, :, 2:4]  # w, h stay raw
    out[:, :, :2] = out[:, :, :2] * scale_x_y - 0.5 * (scale_x_y - 1)
    return out.reshape(raw.shape)


def region_activation(raw: np.ndarray, n: int, softmax: bool) -> np.ndarray:
    """forward_region_layer's output (in the input's layout) for a raw input, float64: logistic objectness,
    softmax classes (softmax=1), everything else raw (get_region_box applies the logistic to x, y itself)."""
    p = raw.astype(np.float64).reshape(raw.shape[0], n, -1, *raw.shape[2:])
    out = p.copy()
    out[:, :, 4] = 1.0 / (1.0 + np.exp(-p[:, :, 4]))
    if softmax:
        e = np.exp(p[:, :, 5:] - p[:, :, 5:].max(2, keepdims=True))
        out[:, :, 5:] = e / e.sum(2, keepdims=True)
    return out.reshape(raw.shape)


def check_region(z: np.lib.npyio.NpzFile, opts: dict, problems: list) -> float:
    """Check a [region] case's single head (shapes, activation, cost = squared delta norm); returns its cost."""
    n, _ = check_shapes(z, 0, opts, problems)
    if problems:
        return float('nan')
    err = np.abs(region_activation(z['input_0'], n, bool(int(opts.get('softmax', 0)))) - z['output_0']).max()
    if err > 2e-6:
        problems.append(f'output_0 differs from the [region] activation of input_0 by {err:.3g}')
    cost = float(z['cost_0'])
    sq = float((z['delta_0'].astype(np.float64) ** 2).sum())
    if abs(cost - sq) > 1e-5 * sq:
        problems.append(f'cost_0 {cost} is not the squared delta norm {sq}')
    counts = ', '.join(f'{key} {v}' for key, v in entry_counts(z['delta_0'], n).items())
    print(f'  [region] (layer {int(z["layer_index"][0])}, {z["input_0"].shape[3]}x{z["input_0"].shape[2]}, '
          f'{n} anchors, seen {int(z["seen"])}): cost {cost:.6g}; nonzero deltas: {counts}')
    return cost


def gaussian_activation(raw: np.ndarray, n: int, scale_x_y: float) -> np.ndarray:
    """forward_gaussian_yolo_layer's output for a raw input, float64: logistic on everything but w, h (entries 4,
    6), scale_x_y on x, y (0, 2)."""
    p = raw.astype(np.float64).reshape(raw.shape[0], n, -1, *raw.shape[2:])
    out = 1.0 / (1.0 + np.exp(-p))
    out[:, :, [4, 6]] = p[:, :, [4, 6]]
    out[:, :, [0, 2]] = out[:, :, [0, 2]] * scale_x_y - 0.5 * (scale_x_y - 1)
    return out.reshape(raw.shape)


def check_gaussian(z: np.lib.npyio.NpzFile, sections: list, problems: list) -> list:
    """Check a [Gaussian_yolo] case's heads (shapes, activation, cost = squared delta norm); returns the costs."""
    costs = []
    for k, opts in enumerate(sections):
        n, _ = check_shapes(z, k, opts, problems, extra=9)
        if problems:
            return costs
        err = np.abs(gaussian_activation(z[f'input_{k}'], n, float(opts.get('scale_x_y', 1))) - z[f'output_{k}']).max()
        if err > 2e-6:
            problems.append(f'output_{k} differs from the [Gaussian_yolo] activation of input_{k} by {err:.3g}')
        cost, sq = float(z[f'cost_{k}']), float((z[f'delta_{k}'].astype(np.float64) ** 2).sum())
        if abs(cost - sq) > 1e-5 * sq:
            problems.append(f'cost_{k} {cost} is not the squared delta norm {sq}')
        d = z[f'delta_{k}'].reshape(z['truth'].shape[0], n, -1, *z[f'delta_{k}'].shape[2:])
        print(f'  [Gaussian_yolo] head {k} (layer {int(z["layer_index"][k])}): cost {cost:.6g}; nonzero deltas: box '
              f'{np.count_nonzero(d[:, :, 0:8:2])}, sigma {np.count_nonzero(d[:, :, 1:8:2])}, obj '
              f'{np.count_nonzero(d[:, :, 8])}, cls {np.count_nonzero(d[:, :, 9:])}')
        costs.append(cost)
    return costs


def iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of centre-format boxes, broadcast over leading dims; float64."""
    iw = np.minimum(a[..., 0] + a[..., 2] / 2, b[..., 0] + b[..., 2] / 2) - np.maximum(
        a[..., 0] - a[..., 2] / 2, b[..., 0] - b[..., 2] / 2)
    ih = np.minimum(a[..., 1] + a[..., 3] / 2, b[..., 1] + b[..., 3] / 2) - np.maximum(
        a[..., 1] - a[..., 3] / 2, b[..., 1] - b[..., 3] / 2)
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter)


def valid_truths(truth: np.ndarray) -> list:
    """Per image the truth rows Darknet reads: up to the first row whose x is 0."""
    out = []
    for img in truth.astype(np.float64):
        end = int(np.argmax(img[:, 0] == 0)) if (img[:, 0] == 0).any() else len(img)
        out.append(img[:end])
    return out


def check_shapes(z: np.lib.npyio.NpzFile, k: int, opts: dict, problems: list, extra: int = 5) -> tuple:
    """(n, classes) of head k after checking its arrays' shapes against the cfg (extra + classes per anchor)."""
    n, classes = len(z[f'mask_{k}']), int(opts['classes'])
    shape = z[f'input_{k}'].shape
    if len(shape) != 4 or shape[:2] != (z['truth'].shape[0], n * (extra + classes)):
        problems.append(f'input_{k} has shape {shape}, expected (batch, {n * (extra + classes)}, h, w)')
    for key in ('output', 'delta'):
        if z[f'{key}_{k}'].shape != shape or z[f'{key}_{k}'].dtype != np.float32:
            problems.append(f'{key}_{k} is {z[f"{key}_{k}"].dtype} {z[f"{key}_{k}"].shape}, expected float32 {shape}')
    return n, classes


def entry_counts(delta: np.ndarray, n: int) -> dict:
    """Nonzero delta entries per kind (x, y, w, h, obj, cls) and positive / ignored objectness slots."""
    d = delta.reshape(delta.shape[0], n, -1, *delta.shape[2:])
    counts = {name: int(np.count_nonzero(d[:, :, e])) for e, name in enumerate(ENTRY_NAMES[:5])}
    counts['cls'] = int(np.count_nonzero(d[:, :, 5:]))
    counts['obj>0'] = int((d[:, :, 4] > 0).sum())
    counts['obj=0'] = int((d[:, :, 4] == 0).sum())
    return counts


def pred_boxes(output: np.ndarray, n: int, anchors: np.ndarray, net_wh: np.ndarray,
               new_coords: bool = False) -> np.ndarray:
    """Darknet's get_yolo_box for every slot of an output: (batch, n, h, w, 4), anchors (n, 2) pixels."""
    o = output.astype(np.float64).reshape(output.shape[0], n, -1, *output.shape[2:])
    h, w = output.shape[2:]
    x = (np.arange(w) + o[:, :, 0]) / w
    y = (np.arange(h)[:, None] + o[:, :, 1]) / h
    scale = 4 * o[:, :, 2:4] ** 2 if new_coords else np.exp(o[:, :, 2:4])
    bw = scale[:, :, 0] * anchors[None, :, 0, None, None] / net_wh[0]
    bh = scale[:, :, 1] * anchors[None, :, 1, None, None] / net_wh[1]
    return np.stack([x, y, bw, bh], -1)


def margins(z: np.lib.npyio.NpzFile, k: int, n: int, opts: dict) -> dict:
    """Smallest distance of a compared quantity from the threshold Darknet compares it with, for head k."""
    anchors = z['anchors'][z[f'mask_{k}']].astype(np.float64)
    boxes = pred_boxes(z[f'output_{k}'], n, anchors, z['net_wh'], bool(int(opts.get('new_coords', 0))))
    truths = valid_truths(z['truth'])
    best = np.concatenate([iou_xywh(boxes[b][..., None, :], t[None, None, None, :, :4]).max(-1).ravel()
                           for b, t in enumerate(truths) if len(t)])
    probs = z[f'output_{k}'].reshape(z['truth'].shape[0], n, -1, *z[f'output_{k}'].shape[2:])[:, :, 5:]
    no_class = (probs <= 0.25).all(2).ravel()
    # slots over ignore_thresh that compare_yolo_class keeps from being ignored
    over_ignore = best > float(opts.get('ignore_thresh', .5))
    out = {'no-class-match over ignore_thresh (count)': int((no_class & over_ignore).sum())}
    for key in ('ignore_thresh', 'truth_thresh'):
        thr = float(opts.get(key, 1))
        if thr < 1:
            out[key] = float(np.abs(best - thr).min())
    out['class 0.25'] = float(np.abs(probs - 0.25).min())
    h, w = z[f'output_{k}'].shape[2:]
    cells = np.concatenate([np.stack([t[:, 0] * w, t[:, 1] * h], -1).ravel() for t in truths])
    out['cell edge'] = float(np.abs(cells - np.round(cells)).min())
    return out


def anchor_margin(z: np.lib.npyio.NpzFile, opts: dict) -> float:
    """Smallest distance between an IoU of a masked anchor with a truth and iou_thresh (inf without iou_thresh)."""
    thr = float(opts.get('iou_thresh', 1))
    if thr >= 1:
        return float('inf')
    masked = sorted({int(a) for k in range(len(z['layer_index'])) for a in z[f'mask_{k}']})
    wh = z['anchors'][masked].astype(np.float64) / z['net_wh']
    t = np.concatenate([v[:, 2:4] for v in valid_truths(z['truth'])])
    inter = np.minimum(wh[None, :, 0], t[:, None, 0]) * np.minimum(wh[None, :, 1], t[:, None, 1])
    iou = inter / (wh[None, :, 0] * wh[None, :, 1] + t[:, None, 0] * t[:, None, 1] - inter)
    return float(np.abs(iou - thr).min())


def check_case(path: Path) -> list:
    """Problems found in one fixture file; prints its summary."""
    z = np.load(path)
    missing = [k for k in REQUIRED if k not in z.files]
    if missing:
        return [f'{path}: missing keys {missing}']
    problems = []
    heads = yolo_sections(str(z['cfg']))
    costs = []
    print(f'{path.name}: {z["about"] if "about" in z.files else ""}')
    region = yolo_sections(str(z['cfg']), 'region')
    if region:
        costs.append(check_region(z, region[0], problems))
    gaussian = yolo_sections(str(z['cfg']), 'Gaussian_yolo')
    if gaussian:
        costs += check_gaussian(z, gaussian, problems)
    for k, opts in enumerate(heads):
        n, _ = check_shapes(z, k, opts, problems)
        if problems:
            break
        sxy = float(opts.get('scale_x_y', 1))
        err = np.abs(darknet_activation(z[f'input_{k}'], n, sxy, bool(int(opts.get('new_coords', 0))))
                     - z[f'output_{k}']).max()
        if err > 2e-6:
            problems.append(f'output_{k} differs from the activation of input_{k} by {err:.3g}')
        costs.append(float(z[f'cost_{k}']))
        counts = ', '.join(f'{key} {v}' for key, v in entry_counts(z[f'delta_{k}'], n).items())
        marg = ', '.join(f'{key} {v:.3g}' if isinstance(v, float) else f'{key} {v}'
                         for key, v in margins(z, k, n, opts).items())
        print(f'  head {k} (layer {int(z["layer_index"][k])}, {z[f"input_{k}"].shape[3]}x{z[f"input_{k}"].shape[2]},'
              f' mask {z[f"mask_{k}"].tolist()}): cost {costs[-1]:.6g}; nonzero deltas: {counts}; margins: {marg}')
    if not problems:
        expect = np.mean(costs) / z['truth'].shape[0]
        if abs(float(z['loss']) - expect) > 1e-6 * abs(expect):
            problems.append(f'loss {float(z["loss"])} is not mean(cost)/batch = {expect}')
        margin = f', iou_thresh margin {anchor_margin(z, heads[0]):.3g}' if heads else ''
        print(f'  loss {float(z["loss"]):.6g} (mean cost / batch){margin}')
    return [f'{path}: {p}' for p in problems]


def main(argv: list | None = None) -> int:
    """Check every .npz in the folder; 0 when all pass."""
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('folder', nargs='?', type=Path, default=FIXTURE_DIR)
    opt = ap.parse_args(argv)
    files = sorted(opt.folder.glob('*.npz'))
    if not files:
        print(f'{opt.folder}: no .npz files', file=sys.stderr)
        return 1
    problems = [p for f in files for p in check_case(f)]
    for p in problems:
        print(p, file=sys.stderr)
    print(f'{len(files)} cases, {len(problems)} problems')
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
