"""Write the Darknet [yolo] training fixture: cfg variants, seeded inputs and truths, Darknet's own outputs and deltas.

    bash tools/darknet_harness/build.sh /tmp/darknet
    python tools/darknet_harness/make_fixture.py --darknet /tmp/darknet --out tests/fixtures/darknet_yolo

For each case a cfg copy is written to a work folder (3 classes, 160x128, batch 2), `yolo_harness info` reports the
[yolo] geometry, the inputs are designed here (seeded), `yolo_harness run` feeds them to forward_yolo_layer and the
dumps become one compressed .npz per case (keys in tests/fixtures/darknet_yolo/README.md).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # check_fixture.py beside this file, however it is loaded
from check_fixture import iou_xywh  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHARED_CFG = ROOT.parent / 'shared' / 'darknet-cfg'
SHARED_ZOO = ROOT.parent / 'shared' / 'darknet-zoo'  # AlexeyAB/darknet's cfg/ (the YOLOv2 [region] cfgs)
NET_W, NET_H, BATCH, CLASSES = 160, 128, 2, 3
SEED = 15

# Truths in network pixels (cx, cy, w, h, class) on a 160x128 input, and the IoU of the prediction planted at the
# truth's cell and best anchor (0: clear of the truth, None: left random). Anchors (yolov3/v4-tiny) 0:10,14 1:23,27
# 2:37,58 3:81,82 4:135,169 5:344,319, masks 3,4,5 (5x4 head) and 1,2,3 (10x8 head). Why each box is there:
TRUTHS_PX = (
    (
        (85, 60, 96, 115, 0, 0.93),  # best anchor 3, in both masks: a positive on each head; anchor 4 over iou_thresh
        (35, 38, 30, 40, 1, None),  # best anchor 2; anchor 1 over iou_thresh (two anchors of the 10x8 head)
        (98, 66, 120, 110, 2, 0.62),  # best anchor 4: 5x4 head only; anchor 3 over iou_thresh on both heads
        (140, 105, 8, 10, 0, None),  # best anchor 0, in no mask: no positive anywhere
        (60, 100, 50, 50, 1, 0.42),  # best anchor 2; anchors 1 and 3 over iou_thresh (three matches)
        (81, 97, 18, 20, 2, 0.0),  # small, at a cell corner: a positive prediction that does not overlap its truth
    ),
    (
        (20, 22, 70, 75, 0, 0.86),  # with the next box: other classes, same cells and anchors (box deltas averaged)
        (25, 27, 85, 90, 2, None),
        (69, 72, 22, 26, 1, 0.62),  # with the next box: same class, same cell and anchors (box deltas summed)
        (75, 68, 24, 28, 1, None),
        (130, 42, 40, 30, 0, None),  # wide box: best anchor 1, anchor 2 over iou_thresh
    ),
)
# The same boxes with two centres moved onto vertical grid lines of the 10x8 head (x = 112 and 144 px of 160):
# Darknet's cell (int)(x * l.w) in float32 is 7 and 9 there, in float64 6 and 8 (0.7f * 10 rounds up to 7)
TRUTHS_GRID = (
    ((85, 60, 96, 115, 0, 0.93), (112, 38, 30, 40, 1, 0.86)) + TRUTHS_PX[0][2:],
    TRUTHS_PX[1][:3] + ((144, 68, 24, 28, 1, 0.62), TRUTHS_PX[1][4]),
)
# IoU a planted prediction should have with its truth (every value keeps 0.03 from the thresholds the cases use;
# 0 is a box clear of the truth, for dx_box_iou's no-overlap branches; None leaves the slot random)
PLANT_IOUS = (0.93, None, 0.62, 0.86, 0.0, 0.42, None)
THRESHOLDS = (0.5, 0.7, 0.8)  # ignore_thresh / truth_thresh values of the [yolo] cases
REGION_THRESHOLDS = (0.5, 0.6)  # [region] thresh (yolov2's .6) and the 0.5 of its recall count
CLASS_THRESH = 0.25  # compare_yolo_class
SMOOTH_PROB = 0.05  # label_smooth_eps 0.1: non-target y_true, compared with p in averages_yolo_deltas
MARGIN = 0.01


@dataclass(frozen=True)
class Case:
    """One fixture: base cfg, [yolo] keys to set (None removes the key)."""

    name: str
    base: str
    yolo: tuple = ()
    about: str = ''
    truths: tuple = TRUTHS_PX
    conv: tuple = ()  # keys of the [convolutional] before each [yolo]
    iteration: int = 0  # updates done before this batch: Darknet's net.seen is (iteration + 1) * batch
    gaussian: bool = False  # the base cfg's [yolo] sections become [Gaussian_yolo] (x, σx, y, σy, w, σw, h, σh)


V4 = (('iou_thresh', '0.213'),)
# the [yolo] settings of yolov7-tiny.cfg (Darknet's cfg/), and the logistic its head convolutions have
V7 = (('new_coords', '1'), ('scale_x_y', '2.0'), ('iou_thresh', '0.2'), ('iou_normalizer', '0.05'),
      ('cls_normalizer', '0.5'), ('objectness_smooth', '1'), ('max_delta', '2'), ('ignore_thresh', '0.7'),
      ('truth_thresh', '1'), ('iou_loss', 'ciou'))
LOGISTIC = (('activation', 'logistic'),)
CASES = (
    Case('v3tiny_mse', 'yolov3-tiny.cfg', (), 'mse (the cfg default), iou_normalizer 0.75 default'),
    Case('v3tiny_mse_iou_thresh', 'yolov3-tiny.cfg', V4, 'mse with iou_thresh 0.213: averaged box deltas'),
    Case('v3tiny_iou', 'yolov3-tiny.cfg', (('iou_loss', 'iou'),), 'plain iou'),
    Case('v3tiny_giou', 'yolov3-tiny.cfg', (('iou_loss', 'giou'),), 'giou'),
    Case('v3tiny_diou', 'yolov3-tiny.cfg', (('iou_loss', 'diou'),), 'diou'),
    Case('v3tiny_ciou', 'yolov3-tiny.cfg', (('iou_loss', 'ciou'),), 'ciou'),
    Case('v4tiny', 'yolov4-tiny.cfg', V4, 'ciou, scale_x_y 1.05, iou_normalizer 0.07, ignore 0.7, iou_thresh 0.213'),
    Case('v4tiny_no_iou_thresh', 'yolov4-tiny.cfg', (), 'as the shared yolov4-tiny.cfg (no iou_thresh)'),
    Case('v4tiny_no_scale_x_y', 'yolov4-tiny.cfg', V4 + (('scale_x_y', None),), 'scale_x_y removed (1)'),
    Case('v4tiny_label_smooth', 'yolov4-tiny.cfg', V4 + (('label_smooth_eps', '0.1'),), 'label_smooth_eps 0.1'),
    Case('v4tiny_thresholds', 'yolov4-tiny.cfg', V4 + (('ignore_thresh', '0.5'), ('truth_thresh', '0.8')),
         'ignore_thresh 0.5, truth_thresh 0.8 (the truth_thresh branch of the prediction loop)'),
    Case('v4tiny_objectness_smooth', 'yolov4-tiny.cfg', V4 + (('objectness_smooth', '1'), ('truth_thresh', '0.8')),
         'objectness_smooth 1 with truth_thresh 0.8'),
    Case('v4tiny_focal', 'yolov4-tiny.cfg', V4 + (('focal_loss', '1'),), 'focal_loss 1'),
    Case('v4tiny_counters', 'yolov4-tiny.cfg', V4 + (('counters_per_class', '100,20,50'), ('cls_normalizer', '2.0')),
         'counters_per_class 100,20,50 (class multipliers 1, 5, 2) with cls_normalizer 2'),
    Case('v4tiny_normalizers', 'yolov4-tiny.cfg',
         V4 + (('iou_normalizer', '0.5'), ('obj_normalizer', '0.5'), ('max_delta', '0.3')),
         'iou_normalizer 0.5, obj_normalizer 0.5, max_delta 0.3 (clips iou-loss box deltas)'),
    Case('v4tiny_show_details0', 'yolov4-tiny.cfg', V4 + (('show_details', '0'),),
         'show_details 0: cost is the squared delta norm for ciou too'),
    Case('v4tiny_grid_line', 'yolov4-tiny.cfg', V4,
         'as v4tiny with two truth centres on grid lines (x = 112/160, 144/160: cell 7 and 9 in float32, as Darknet)',
         truths=TRUTHS_GRID),
    Case('v4tiny_new_coords', 'yolov4-tiny.cfg', V7, 'new_coords 1 with yolov7-tiny\'s [yolo] keys (ciou, scale_x_y 2, '
         'iou_thresh 0.2, iou_normalizer 0.05, objectness_smooth 1, max_delta 2); inputs in (0, 1)', conv=LOGISTIC),
    Case('v4tiny_new_coords_csp', 'yolov4-tiny.cfg',
         V7 + (('objectness_smooth', '0'), ('obj_normalizer', '4.0'), ('max_delta', '5')),
         'new_coords 1 with yolov4-csp\'s last-head keys (objectness_smooth 0, obj_normalizer 4, max_delta 5)',
         conv=LOGISTIC),
    Case('v3tiny_new_coords_mse', 'yolov3-tiny.cfg', (('new_coords', '1'), ('scale_x_y', '2.0')),
         'new_coords 1 with mse (targets sqrt(w / 4 anchor)), scale_x_y 2', conv=LOGISTIC),
    # [region] (YOLOv2): the yolo keys apply to the [region] section
    # [Gaussian_yolo]: yolov3-tiny's heads made Gaussian (Gaussian_yolov3_BDD.cfg's keys in the second case)
    Case('v3tiny_gaussian', 'yolov3-tiny.cfg', (),
         '[Gaussian_yolo] heads, Darknet defaults (mse: Gaussian likelihood deltas of means and sigmas)', gaussian=True),
    Case('v3tiny_gaussian_giou', 'yolov3-tiny.cfg',
         (('iou_loss', 'giou'), ('iou_thresh', '0.213'), ('iou_normalizer', '0.5'), ('uc_normalizer', '0.7'),
          ('ignore_thresh', '0.5'), ('truth_thresh', '0.8'), ('objectness_smooth', '1'), ('max_delta', '5')),
         "[Gaussian_yolo] with Gaussian_yolov3_BDD's giou, iou_thresh 0.213, iou_normalizer 0.5, and uc_normalizer "
         '0.7, truth_thresh 0.8, objectness_smooth 1, max_delta 5', gaussian=True),
    Case('v2tiny_region', 'yolov2-tiny-voc.cfg', (),
         'yolov2-tiny-voc [region] as in the cfg (bias_match, rescore, softmax, object_scale 5, thresh .6); the '
         'first batch (seen 2 < 12800: every slot also pulled towards its anchor prior at scale .01)'),
    Case('v2tiny_region_seen', 'yolov2-tiny-voc.cfg', (),
         'as v2tiny_region after 6400 updates (seen 12802: no prior pull)', iteration=6400),
    Case('v2tiny_region_variants', 'yolov2-tiny-voc.cfg',
         (('bias_match', '0'), ('rescore', '0'), ('softmax', '0'), ('noobject_scale', '0.5'), ('coord_scale', '2'),
          ('class_scale', '1.5')),
         'bias_match 0 (best anchor by the predicted w, h), rescore 0, softmax 0, noobject_scale 0.5, coord_scale 2, '
         'class_scale 1.5', iteration=6400),
)


# ---------------------------------------------------------------------------------------------------- cfg copies
def split_sections(text: str) -> list:
    """Cfg text -> [[header line, line, ...], ...]; lines before the first header form a section of their own."""
    sections = [[]]
    for line in text.splitlines():
        if line.strip().startswith('['):
            sections.append([])
        sections[-1].append(line)
    return sections


def set_key(lines: list, key: str, value: object) -> list:
    """Lines of one section with `key` set to value (appended if absent) or removed (value None)."""
    pat = re.compile(rf'^\s*{re.escape(key)}\s*=')
    out = [ln for ln in lines if not pat.match(ln)] if value is None else [
        f'{key}={value}' if pat.match(ln) else ln for ln in lines]
    if value is not None and not any(pat.match(ln) for ln in lines):
        end = len(out)
        while end > 1 and not out[end - 1].strip():
            end -= 1
        out.insert(end, f'{key}={value}')
    return out


def case_cfg(case: Case, cfg_dir: Path) -> str:
    """The cfg text of a case: the base cfg at 160x128, batch 2, 3 classes, with the case's [yolo] keys."""
    path = cfg_dir / case.base if (cfg_dir / case.base).is_file() else SHARED_ZOO / case.base
    sections = split_sections(path.read_text())
    last_conv = None
    for k, sec in enumerate(sections):
        head = sec[0].strip() if sec else ''
        if head == '[net]':
            for key, value in (('batch', BATCH), ('subdivisions', 1), ('width', NET_W), ('height', NET_H)):
                sec[:] = set_key(sec, key, value)
        elif head == '[convolutional]':
            last_conv = k
        elif head == '[yolo]':
            if case.gaussian:
                sec[0] = '[Gaussian_yolo]'
            mask = [ln for ln in sec if re.match(r'^\s*mask\s*=', ln)]
            if last_conv is None or len(mask) != 1:
                sys.exit(f'{path}: [yolo] section {k} has no convolution before it or no single mask= line')
            n = len(mask[0].split('=', 1)[1].split('#')[0].split(','))
            sections[last_conv][:] = set_key(sections[last_conv], 'filters',
                                             n * (CLASSES + (9 if case.gaussian else 5)))
            for key, value in case.conv:
                sections[last_conv][:] = set_key(sections[last_conv], key, value)
            sec[:] = set_key(sec, 'classes', CLASSES)
            for key, value in case.yolo:
                sec[:] = set_key(sec, key, value)
        elif head == '[region]':
            num = [ln for ln in sec if re.match(r'^\s*num\s*=', ln)]
            if last_conv is None or len(num) != 1:
                sys.exit(f'{path}: [region] section {k} has no convolution before it or no single num= line')
            n = int(num[0].split('=', 1)[1].split('#')[0])
            sections[last_conv][:] = set_key(sections[last_conv], 'filters', n * (CLASSES + 5))
            sec[:] = set_key(sec, 'classes', CLASSES)
            for key, value in case.yolo:
                sec[:] = set_key(sec, key, value)
    return '\n'.join('\n'.join(sec) for sec in sections) + '\n'


# ---------------------------------------------------------------------------------------------------- harness I/O
@dataclass(frozen=True)
class Head:
    """Geometry of one [yolo] (or [region]) layer as Darknet built it."""

    index: int
    w: int
    h: int
    n: int
    classes: int
    mask: tuple
    anchors: np.ndarray  # (total, 2) pixels
    kind: str = 'yolo'
    biases: np.ndarray | None = None  # (total, 2) l.biases as Darknet holds them (grid cells for [region])


def harness_info(harness: Path, cfg: Path) -> tuple:
    """(net line values, [Head, ...]) from `yolo_harness info`."""
    out = subprocess.run([str(harness), 'info', str(cfg)], capture_output=True, text=True, check=True).stdout
    net, heads = None, []
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == 'net':
            net = tuple(int(v) for v in f[1:])
        elif f and f[0] in ('yolo', 'region', 'gaussian'):
            index, w, h, n, total, classes = (int(v) for v in f[1:7])
            mask = tuple(int(v) for v in f[8:8 + n])
            biases = np.array([float(v) for v in f[9 + n:]], dtype=np.float32).reshape(total, 2)
            # a [region]'s anchors are in grid cells (absolute=1): its boxes decode as a [yolo]'s with these pixels
            anchors = biases * np.float32([NET_W / w, NET_H / h]) if f[0] == 'region' else biases
            heads.append(Head(index, w, h, n, classes, mask, anchors, f[0], biases))
    if net is None or not heads:
        sys.exit(f'{cfg}: yolo_harness info printed no net/yolo lines:\n{out}')
    return net, heads


def yolo_float(sec_text: str, key: str, default: float) -> float:
    """A float [yolo] key of the first [yolo] section of a cfg text (all heads of a case share them); the default
    for a cfg without [yolo]."""
    if '[yolo]' not in sec_text:
        return default
    yolo = sec_text.split('[yolo]', 1)[1].split('\n[', 1)[0]
    m = re.search(rf'^\s*{key}\s*=\s*([-+.\deE]+)', yolo, re.M)
    return float(m.group(1)) if m else default


# ---------------------------------------------------------------------------------------------------- inputs
def truth_array(truths_px: tuple, max_boxes: int, truth_size: int) -> np.ndarray:
    """(batch, max_boxes, truth_size) float32 as Darknet's loader fills it: x y w h normalised, class, track id 0."""
    truth = np.zeros((BATCH, max_boxes, truth_size), np.float32)
    for b, boxes in enumerate(truths_px):
        for t, (cx, cy, w, h, c, _) in enumerate(boxes):
            truth[b, t, :5] = cx / NET_W, cy / NET_H, w / NET_W, h / NET_H, c
    return truth


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic, float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


@dataclass(frozen=True)
class Decode:
    """How a case's [yolo] heads decode: scale_x_y, and new_coords (the head's input is then the logistic of the
    designed values: Darknet's yolov4-csp/yolov7 convolution before [yolo] has activation=logistic)."""

    sxy: float = 1.0
    new_coords: bool = False
    thresholds: tuple = THRESHOLDS  # IoU thresholds the case compares with (random slots are kept 0.01 away)


def pred_boxes(raw: np.ndarray, head: Head, dec: Decode) -> np.ndarray:
    """Boxes (batch, n, h, w, 4) normalised that Darknet's get_yolo_box makes of a designed raw head input."""
    p = raw.astype(np.float64).reshape(BATCH, head.n, CLASSES + 5, head.h, head.w)
    xy = sigmoid(p[:, :, :2]) * dec.sxy - 0.5 * (dec.sxy - 1)
    gx = (np.arange(head.w)[None, None] + xy[:, :, 0]) / head.w
    gy = (np.arange(head.h)[None, None, :, None] + xy[:, :, 1]) / head.h
    anchors = head.anchors[list(head.mask)].astype(np.float64)
    scale = 4 * sigmoid(p[:, :, 2:4]) ** 2 if dec.new_coords else np.exp(p[:, :, 2:4])
    bw = scale[:, :, 0] * anchors[None, :, 0, None, None] / NET_W
    bh = scale[:, :, 1] * anchors[None, :, 1, None, None] / NET_H
    return np.stack([gx, gy, bw, bh], -1)


def box_near(rng: np.random.Generator, truth: np.ndarray, target: float, cell: tuple, head: Head):
    """A box whose IoU with truth is within 0.008 of target (0: apart by 0.01 or more) and whose centre lies inside
    cell (i, j), or None."""
    i, j = cell
    n = 20000
    spread = 1.6 * (1 - target) + 0.05
    if truth_cell(truth, head) == (i, j):
        cx = truth[0] + rng.uniform(-spread, spread, n) * truth[2]
        cy = truth[1] + rng.uniform(-spread, spread, n) * truth[3]
    else:
        cx = (i + rng.uniform(0.05, 0.95, n)) / head.w
        cy = (j + rng.uniform(0.05, 0.95, n)) / head.h
    cand = np.stack([cx, cy, truth[2] * np.exp(rng.uniform(-spread, 1.5 * spread, n)),
                     truth[3] * np.exp(rng.uniform(-spread, 1.5 * spread, n))], -1)
    fx, fy = cand[:, 0] * head.w - i, cand[:, 1] * head.h - j
    ok = (fx > 0.05) & (fx < 0.95) & (fy > 0.05) & (fy < 0.95)
    if target:
        ok &= np.abs(iou_xywh(cand, truth[None, :4]) - target) < 0.008
    else:
        gap = np.maximum(np.abs(cand[:, 0] - truth[0]) - (cand[:, 2] + truth[2]) / 2,
                         np.abs(cand[:, 1] - truth[1]) - (cand[:, 3] + truth[3]) / 2)
        ok &= gap > 0.01
    return cand[np.argmax(ok)] if ok.any() else None


def plant(raw: np.ndarray, head: Head, b: int, a: int, box: np.ndarray, dec: Decode):
    """Set the x, y, w, h inputs of anchor slot a so that Darknet decodes box; returns the slot (b, a, j, i), or
    None where new_coords cannot reach the box (w or h over 4 x 0.95 the anchor's)."""
    i, j = int(box[0] * head.w), int(box[1] * head.h)
    s = (np.array([box[0] * head.w - i, box[1] * head.h - j]) + 0.5 * (dec.sxy - 1)) / dec.sxy
    aw, ah = head.anchors[head.mask[a]]
    c0 = a * (CLASSES + 5)
    if dec.new_coords:  # w = 4 t^2 anchor with t the logistic of the designed value
        t = np.sqrt(np.array([box[2] * NET_W / aw, box[3] * NET_H / ah]) / 4)
        if (t > 0.95).any():
            return None
        wh = np.log(t / (1 - t))
    else:
        wh = np.log([box[2] * NET_W / aw, box[3] * NET_H / ah])
    raw[b, c0:c0 + 2, j, i] = np.log(s / (1 - s))
    raw[b, c0 + 2:c0 + 4, j, i] = wh
    return b, a, j, i


def truth_cell(truth: np.ndarray, head: Head) -> tuple:
    """The cell (i, j) Darknet gives a truth: (int)(x * l.w) with x a float32 and the product rounded to float32."""
    x, y = np.float32(truth[0]) * np.float32(head.w), np.float32(truth[1]) * np.float32(head.h)
    return int(x), int(y)


def neighbour(truth: np.ndarray, head: Head) -> tuple:
    """The cell next to the truth's own, across the nearer cell edge (x or y, whichever is closer)."""
    fx, fy = truth[0] * head.w, truth[1] * head.h
    i, j = truth_cell(truth, head)
    dx = -1 if fx - i < 0.5 else 1
    dy = -1 if fy - j < 0.5 else 1
    if min(fx - i, 1 - fx + i) <= min(fy - j, 1 - fy + j) and 0 <= i + dx < head.w:
        return i + dx, j
    return (i, j + dy) if 0 <= j + dy < head.h else (i + dx, j)


def best_anchor(truth: np.ndarray, anchors: np.ndarray) -> int:
    """The anchor Darknet assigns a truth to: best IoU of widths and heights, both centred."""
    wh = anchors.astype(np.float64) / [NET_W, NET_H]
    inter = np.minimum(wh[:, 0], truth[2]) * np.minimum(wh[:, 1], truth[3])
    return int(np.argmax(inter / (wh[:, 0] * wh[:, 1] + truth[2] * truth[3] - inter)))


def plant_truth(rng: np.random.Generator, raws: list, heads: list, truths_px: tuple, bt: tuple, g: int, dec: Decode,
                planted: set) -> None:
    """Plant predictions around truth bt = (b, t) of image b (g-th overall) on every head; adds their slots
    (k, b, a, j, i)."""
    b, t = bt
    truth = np.array(truths_px[b][t][:4], np.float64) / [NET_W, NET_H, NET_W, NET_H]
    cls = truths_px[b][t][4]
    for k, head in enumerate(heads):
        own = truth_cell(truth, head)
        for a in range(head.n):
            best = head.mask[a] == best_anchor(truth, head.anchors)
            target = truths_px[b][t][5] if best else PLANT_IOUS[(g + a + k) % len(PLANT_IOUS)]
            box = None if target is None else box_near(rng, truth, target, own, head)
            if box is None or (k, b, a, own[1], own[0]) in planted:
                continue
            slot = plant(raws[k], head, b, a, box, dec)
            if slot is None:
                continue
            planted.add((k,) + slot)
            if g % 2 == 0:  # a non-target class below 0.05: counted by averages_yolo_deltas under label smoothing
                raws[k][b, a * (CLASSES + 5) + 5 + (cls + 1) % CLASSES, own[1], own[0]] = -3.5
        box = box_near(rng, truth, 0.86 if t == 0 or (g + k) % 2 == 0 else 0.62, neighbour(truth, head), head)
        a = (g + k) % head.n
        slot = None
        if box is not None and (k, b, a, int(box[1] * head.h), int(box[0] * head.w)) not in planted:
            slot = plant(raws[k], head, b, a, box, dec)
        if slot is not None:
            planted.add((k,) + slot)
            if t == 0:  # no class over 0.25: compare_yolo_class fails, so a high IoU does not ignore this slot
                raws[k][b, a * (CLASSES + 5) + 5:(a + 1) * (CLASSES + 5), int(box[1] * head.h),
                        int(box[0] * head.w)] = -4.0


def near_thresholds(raw: np.ndarray, head: Head, dec: Decode, truths: np.ndarray) -> tuple:
    """Masks (batch, n, h, w): best IoU with a truth near an ignore/truth threshold; a class prob near 0.25 or 0.05."""
    boxes = pred_boxes(raw, head, dec)  # (batch, n, h, w, 4)
    best = np.stack([iou_xywh(boxes[b][..., None, :], truths[b][None, None, None]).max(-1) for b in range(BATCH)])
    box_bad = np.min([np.abs(best - thr) for thr in dec.thresholds], 0) < MARGIN
    p = sigmoid(raw.reshape(BATCH, head.n, CLASSES + 5, head.h, head.w)[:, :, 5:])
    cls_bad = ((np.abs(p - CLASS_THRESH) < MARGIN) | (np.abs(p - SMOOTH_PROB) < MARGIN)).any(2)
    return box_bad, cls_bad


def clear_margins(rng: np.random.Generator, raws: list, heads: list, truths_px: tuple, dec: Decode,
                  planted: set) -> None:
    """Redraw random slots whose IoU or class probability sits within MARGIN of a threshold Darknet compares with."""
    truths = [np.array([r[:4] for r in img], np.float32).astype(np.float64) / [NET_W, NET_H, NET_W, NET_H]
              for img in truths_px]
    for _ in range(100):
        redrawn = 0
        for k, head in enumerate(heads):
            box_bad, cls_bad = near_thresholds(raws[k], head, dec, truths)
            for b, a, j, i in zip(*np.nonzero(box_bad | cls_bad)):
                c0 = a * (CLASSES + 5)
                if box_bad[b, a, j, i]:
                    if (k, b, a, j, i) in planted:
                        sys.exit(f'planted slot {(k, b, a, j, i)} lies within {MARGIN} of a threshold')
                    raws[k][b, c0:c0 + 4, j, i] = rng.normal(0, 1.5, 4)
                if cls_bad[b, a, j, i]:
                    raws[k][b, c0 + 5:c0 + 5 + CLASSES, j, i] = rng.normal(0, 1.5, CLASSES)
                redrawn += 1
        if not redrawn:
            return
    sys.exit('could not clear the threshold margins in 100 rounds')


def design_inputs(heads: list, truths_px: tuple, dec: Decode) -> list:
    """Seeded raw inputs, one (batch, n*(5+classes), h, w) float32 array per head, with predictions planted."""
    rng = np.random.default_rng(SEED)
    raws = [rng.normal(0, 1.5, (BATCH, h.n * (CLASSES + 5), h.h, h.w)) for h in heads]
    planted: set = set()
    g = 0
    for b, boxes in enumerate(truths_px):
        for t in range(len(boxes)):
            plant_truth(rng, raws, heads, truths_px, (b, t), g, dec, planted)
            g += 1
    clear_margins(rng, raws, heads, truths_px, dec, planted)
    # new_coords: the head's input is the convolution's logistic output, so every entry lies in (0, 1)
    raws = [sigmoid(r) if dec.new_coords else r for r in raws]
    return [(gaussian_layout(rng, r, h) if h.kind == 'gaussian' else r).astype(np.float32) for r, h in zip(raws, heads)]


def gaussian_layout(rng: np.random.Generator, raw: np.ndarray, head: Head) -> np.ndarray:
    """A designed [yolo]-layout input (x, y, w, h, obj, classes per anchor) as a [Gaussian_yolo] one: the box
    entries at 0, 2, 4, 6, each followed by a random σ input, objectness at 8, classes from 9."""
    p = raw.reshape(BATCH, head.n, CLASSES + 5, head.h, head.w)
    out = np.empty((BATCH, head.n, CLASSES + 9, head.h, head.w))
    out[:, :, 0:8:2] = p[:, :, :4]
    out[:, :, 1:8:2] = rng.normal(0, 1.5, (BATCH, head.n, 4, head.h, head.w))
    out[:, :, 8:] = p[:, :, 4:]
    return out.reshape(BATCH, -1, head.h, head.w)


# ---------------------------------------------------------------------------------------------------- dumps
LOG_RE = re.compile(r'Region (\d+) Avg \(IOU: (\S+)\), count: (\d+)(?:, class_loss = (\S+), iou_loss = (\S+))?, '
                    r'total_loss = (\S+)')


def parse_log(stderr: str, heads: list) -> dict:
    """Darknet's per-layer "v3 (...)" lines: the lines and their avg IoU, count, class/iou/total loss per head."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.lstrip().startswith('v3 (')]
    out = {'darknet_log': np.array('\n'.join(lines))}
    found = {int(m.group(1)): m for m in map(LOG_RE.search, lines) if m}
    for k, head in enumerate(heads):
        m = found.get(head.index)
        if m is None:
            sys.exit(f'no "v3 (" line for layer {head.index} in Darknet output:\n{stderr[-2000:]}')
        out[f'avg_iou_{k}'] = np.float32(m.group(2))
        out[f'count_{k}'] = np.int64(m.group(3))
        out[f'total_loss_{k}'] = np.float32(m.group(6))
        if m.group(4) is not None:
            out[f'class_loss_{k}'] = np.float32(m.group(4))
            out[f'iou_loss_{k}'] = np.float32(m.group(5))
    return out


REGION_RE = re.compile(r'Region Avg IOU: (\S+), Class: (\S+), Obj: (\S+), No Obj: (\S+), Avg Recall: (\S+), +'
                       r'count: (\d+)')


def parse_region_log(stdout: str) -> dict:
    """forward_region_layer's "Region Avg IOU: ..." line: the line, its avg IoU and count (one [region] head)."""
    m = REGION_RE.search(stdout)
    if m is None:
        sys.exit(f'no "Region Avg IOU" line in Darknet output:\n{stdout[-2000:]}')
    return {'darknet_log': np.array(m.group(0)), 'avg_iou_0': np.float32(m.group(1)), 'count_0': np.int64(m.group(6))}


GAUSSIAN_RE = re.compile(r'Region (\d+) Avg IOU: (\S+),.* count: (\d+), class_loss = (\S+), iou_loss = (\S+), '
                         r'uc_loss = (\S+), total_loss = (\S+)')


def parse_gaussian_log(stderr: str, heads: list) -> dict:
    """forward_gaussian_yolo_layer's "Region N Avg IOU: ..." lines: the lines, avg IoU, count and the losses per head
    (printed with %.2f)."""
    found = {int(m.group(1)): m for m in map(GAUSSIAN_RE.search, stderr.splitlines()) if m}
    out = {'darknet_log': np.array('\n'.join(m.group(0) for m in found.values()))}
    for k, head in enumerate(heads):
        m = found.get(head.index)
        if m is None:
            sys.exit(f'no "Region {head.index} Avg IOU" line in Darknet output:\n{stderr[-2000:]}')
        out[f'avg_iou_{k}'], out[f'count_{k}'] = np.float32(m.group(2)), np.int64(m.group(3))
        for key, grp in (('class_loss', 4), ('iou_loss', 5), ('uc_loss', 6), ('total_loss', 7)):
            out[f'{key}_{k}'] = np.float32(m.group(grp))
    return out


def read_result(path: Path) -> dict:
    """result.txt -> {'cost_<layer index>': float, 'loss': float, 'seen': int, ...}."""
    out = {}
    for line in path.read_text().splitlines():
        f = line.split()
        key = f[0] if f[0] != 'cost' else f'cost_{f[1]}'
        out[key] = float(f[-1])
    return out


def run_case(case: Case, harness: Path, work: Path, commit: str) -> dict:
    """Arrays of one fixture case: cfg, truths, per-head input/output/delta/cost, Darknet's printed loss."""
    cfg_text = case_cfg(case, SHARED_CFG)
    d = work / case.name
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / 'case.cfg'
    cfg.write_text(cfg_text)
    (net_w, net_h, batch, max_boxes, truth_size), heads = harness_info(harness, cfg)
    if (net_w, net_h, batch) != (NET_W, NET_H, BATCH):
        sys.exit(f'{cfg}: Darknet built {net_w}x{net_h} batch {batch}, expected {NET_W}x{NET_H} batch {BATCH}')
    region = heads[0].kind == 'region'
    dec = Decode(yolo_float(cfg_text, 'scale_x_y', 1.0), bool(yolo_float(cfg_text, 'new_coords', 0)),
                 REGION_THRESHOLDS if region else THRESHOLDS)
    raws = design_inputs(heads, case.truths, dec)
    truth = truth_array(case.truths, max_boxes, truth_size)
    truth.tofile(d / 'truth.bin')
    for head, raw in zip(heads, raws):
        raw.tofile(d / f'input_{head.index}.bin')
    proc = subprocess.run([str(harness), 'run', str(cfg), str(d), str(case.iteration)], capture_output=True,
                          text=True)
    (d / 'darknet.log').write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f'{cfg}: yolo_harness run failed ({proc.returncode}):\n{proc.stderr[-2000:]}')
    res = read_result(d / 'result.txt')
    arrays = {'cfg': np.array(cfg_text), 'case': np.array(case.name), 'about': np.array(case.about),
              'darknet_commit': np.array(commit), 'net_wh': np.array([NET_W, NET_H], np.int64),
              'truth': truth[..., :5], 'anchors': heads[0].biases,
              'layer_index': np.array([h.index for h in heads], np.int64),
              'loss': np.float32(res['loss']), 'network_cost': np.float32(res['network_cost']),
              'seen': np.int64(res['seen']), 'iteration': np.int64(res['iteration']),
              'total_bbox': np.int64(res['total_bbox']), 'rewritten_bbox': np.int64(res['rewritten_bbox'])}
    for k, (head, raw) in enumerate(zip(heads, raws)):
        shape = raw.shape
        arrays[f'mask_{k}'] = np.array(head.mask, np.int64)
        arrays[f'input_{k}'] = raw
        out = np.fromfile(d / f'output_{head.index}.bin', np.float32)
        if head.kind == 'region':  # Darknet's flattened layout (per image h*w rows of n*(5+classes)) to the input's
            out = out.reshape(BATCH, head.h * head.w, shape[1]).transpose(0, 2, 1)
        arrays[f'output_{k}'] = np.ascontiguousarray(out).reshape(shape)
        arrays[f'delta_{k}'] = np.fromfile(d / f'delta_{head.index}.bin', np.float32).reshape(shape)
        arrays[f'cost_{k}'] = np.float32(res[f'cost_{head.index}'])
    if region:
        arrays.update(parse_region_log(proc.stdout))
    elif heads[0].kind == 'gaussian':
        arrays.update(parse_gaussian_log(proc.stderr, heads))
    else:
        arrays.update(parse_log(proc.stderr, heads))
    return arrays


def darknet_commit(darknet: Path) -> str:
    """The commit hash of the Darknet checkout the harness was built from."""
    return subprocess.run(['git', '-C', str(darknet), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()


def main(argv: list | None = None) -> None:
    """Write one .npz per case into --out."""
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--darknet', type=Path, required=True, help='Darknet checkout that build.sh built')
    ap.add_argument('--harness', type=Path, help='yolo_harness binary (default: DARKNET/yolo_harness)')
    ap.add_argument('--out', type=Path, default=ROOT / 'tests' / 'fixtures' / 'darknet_yolo')
    ap.add_argument('--work', type=Path, help='folder for cfg copies and raw dumps (default: a temporary one)')
    ap.add_argument('--cases', nargs='*', help='case names (default: all)')
    opt = ap.parse_args(argv)
    harness = opt.harness or opt.darknet / 'yolo_harness'
    if not harness.is_file():
        sys.exit(f'{harness}: no harness binary; build it with tools/darknet_harness/build.sh {opt.darknet}')
    names = {c.name for c in CASES}
    unknown = set(opt.cases or ()) - names
    if unknown:
        sys.exit(f'unknown case(s) {sorted(unknown)}; known: {sorted(names)}')
    commit = darknet_commit(opt.darknet)
    opt.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = opt.work or Path(tmp)
        for case in CASES:
            if opt.cases and case.name not in opt.cases:
                continue
            arrays = run_case(case, harness, work, commit)
            tmp_file = opt.out / f'.{case.name}.npz.tmp'
            with open(tmp_file, 'wb') as f:  # written whole, then renamed: a failed run leaves the old file
                np.savez_compressed(f, **arrays)
            os.replace(tmp_file, opt.out / f'{case.name}.npz')
            print(f'{case.name}: loss {float(arrays["loss"]):.6g}, costs '
                  + ', '.join(f'{float(arrays[f"cost_{k}"]):.6g}' for k in range(len(arrays['layer_index']))))


if __name__ == '__main__':
    main()
