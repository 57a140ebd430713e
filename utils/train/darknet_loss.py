"""Darknet's own [yolo] training loss (AlexeyAB/darknet src/yolo_layer.c), delta for delta.

Darknet does not differentiate a loss: forward_yolo_layer writes a "delta" (truth minus prediction, per output
element) that backward_yolo_layer hands to the layer below unchanged, so e.g. the x, y, objectness and class deltas
skip the sigmoid's derivative. DarknetLoss computes those deltas from the raw [yolo] outputs without autograd and
returns a surrogate whose gradient with respect to every raw output is exactly -delta (scaled as the training loop
needs, see DarknetLoss), and whose printed value is the loss Darknet prints for the batch.

What it reproduces, per [yolo] layer (process_batch, delta_yolo_box, delta_yolo_class, averages_yolo_deltas):
objectness pushed to 0 everywhere except where a prediction overlaps a truth by more than ignore_thresh (with a class
probability over 0.25); each truth assigned to the best of *all* anchors of the layer's `anchors` list (the layer
takes it only when that anchor is in its mask), and with iou_thresh < 1 also to every masked anchor whose
(iou_thresh_kind) IoU with it exceeds iou_thresh; box deltas by iou_loss (mse with the (2 - w*h) weight, or the
analytic iou/giou/diou/ciou gradient, times exp(t) for w and h), iou_normalizer, max_delta; objectness by
obj_normalizer and objectness_smooth; classes by label_smooth_eps, focal_loss, counters_per_class (with
cls_normalizer, which Darknet applies only together with counters_per_class); truth_thresh; scale_x_y and
new_coords (Scaled-YOLOv4/YOLOv7 heads: input already logistic, w, h = 4 t^2 anchor, IoU w/h deltas unscaled) in the
decode. Several truths on one anchor are applied in truth order, as Darknet's loop does. What Darknet decides in
float32 (a truth's cell, its best anchor, the threshold comparisons) is decided in float32 here too.

[region] heads (YOLOv2) are trained by utils/train/darknet_region_loss.py, [Gaussian_yolo] heads by
utils/train/darknet_gaussian_loss.py; DarknetLoss picks each head's.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.boxes import decode_yolo_box
from utils.darknet.parse_config import ConfigError
from utils.torch_utils import de_parallel
from utils.train.darknet_region_loss import (
    RegionLossConfig,
    region_cost,
    region_deltas,
    region_loss_config,
)
from utils.train.loss import refuse_heads

BOX_LOSSES = ('mse', 'iou', 'giou', 'diou', 'ciou')  # iou_loss values
THRESH_KINDS = ('iou', 'giou', 'diou', 'ciou')  # iou_thresh_kind values
# Darknet's defaults (parse_yolo in src/parser.c) for the keys a cfg omits
DEFAULTS = {'iou_loss': 'mse', 'iou_normalizer': 0.75, 'obj_normalizer': 1.0, 'cls_normalizer': 1.0,
            'ignore_thresh': 0.5, 'truth_thresh': 1.0, 'iou_thresh': 1.0, 'iou_thresh_kind': 'iou', 'scale_x_y': 1.0,
            'label_smooth_eps': 0.0, 'max_delta': math.inf, 'objectness_smooth': 0, 'focal_loss': 0, 'show_details': 1,
            'new_coords': 0}
MAX_BOXES = 200  # Darknet's [yolo] max: truths per image beyond it never reach the loss
DARKNET_LR = 0.001  # Darknet's default [net] learning_rate
REFERENCE_LR0 = 0.01  # hyp lr0 at which one optimizer step equals Darknet's step at the cfg's learning_rate
CLASS_MATCH = 0.25  # a prediction is ignored only if some class probability exceeds this (compare_yolo_class)
FOCAL_ALPHA = 0.5


@dataclass(frozen=True)
class YoloLossConfig:
    """The Darknet training keys of one [yolo] layer, with Darknet's defaults filled in."""
    anchors: tuple[tuple[float, float], ...]  # every anchor of the layer's list, pixels
    mask: tuple[int, ...]  # the anchors this layer predicts (its outputs are in this order)
    nc: int
    iou_loss: str = 'mse'
    iou_normalizer: float = 0.75
    obj_normalizer: float = 1.0
    cls_normalizer: float = 1.0
    ignore_thresh: float = 0.5
    truth_thresh: float = 1.0
    iou_thresh: float = 1.0
    iou_thresh_kind: str = 'iou'
    scale_x_y: float = 1.0
    label_smooth_eps: float = 0.0
    max_delta: float = math.inf
    objectness_smooth: int = 0
    focal_loss: int = 0
    class_multipliers: tuple[float, ...] | None = None  # from counters_per_class
    show_details: int = 1  # Darknet's cost formula (1, its default: IoU term + squared non-box deltas)
    new_coords: int = 0  # Scaled-YOLOv4/YOLOv7 head: its input is already logistic; w, h = 4 t^2 anchor


def class_multipliers(counters: str, nc: int, max_delta: float) -> tuple[float, ...]:
    """Darknet's per-class delta multipliers from counters_per_class: max count / count, capped at max_delta."""
    counts = [max(int(float(c)), 1) for c in counters.replace(' ', '').split(',') if c]
    if len(counts) != nc:
        raise ValueError(f'counters_per_class has {len(counts)} values for {nc} classes')
    top = max(counts)
    return tuple(min(top / c, max_delta) for c in counts)


# keys a [yolo] section may have that are not the loss's business (data augmentation, NMS, ultralytics' ASFF)
NOT_LOSS_KEYS = {'type', 'line', 'mask', 'anchors', 'classes', 'num', 'jitter', 'random', 'resize', 'nms_kind',
                 'beta_nms', 'from', 'track_history_size', 'sim_thresh', 'dets_for_track', 'dets_for_show',
                 'track_ciou_norm'}


def yolo_loss_config(mdef: dict, where: str) -> YoloLossConfig:
    """The loss settings of one parsed [yolo] section; a key this loss cannot honour is a ConfigError naming where
    (file, line, layer) and the key."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: [yolo] key {key}={mdef.get(key)!r} {why} under --loss darknet")

    if 'map' in mdef:
        raise bad('map', '(a class map file) is not supported')
    if mdef.get('max', MAX_BOXES) != MAX_BOXES:
        raise bad('max', f'(truths per image) other than {MAX_BOXES} is not supported')
    if mdef.get('delta_normalizer', 1.0) != 1.0:  # Darknet's GPU backward scales the delta by it, its CPU one not
        raise bad('delta_normalizer', 'other than 1 is not supported')
    if mdef.get('embedding_layer') is not None:
        raise bad('embedding_layer', "(Darknet's contrastive tracking loss) is not supported")
    for key, allowed in (('iou_loss', BOX_LOSSES), ('iou_thresh_kind', THRESH_KINDS)):
        if key in mdef and mdef[key] not in allowed:  # Darknet would quietly fall back to plain IoU
            raise bad(key, f"is not one of {', '.join(allowed)}")
    if 'num' in mdef and mdef['num'] != len(mdef['anchors']):  # Darknet searches the first num anchors only
        raise bad('num', f"differs from the {len(mdef['anchors'])} anchors listed (Darknet's best-anchor search "
                         f"would use {mdef['num']})")
    unknown = set(mdef) - NOT_LOSS_KEYS - set(DEFAULTS) - {'counters_per_class', 'max', 'delta_normalizer'}
    if unknown:
        key = sorted(unknown)[0]
        raise bad(key, 'is not a key this loss knows')
    values = {k: mdef.get(k, v) for k, v in DEFAULTS.items()}
    nc = int(mdef['classes'])
    mult = None
    if 'counters_per_class' in mdef:
        try:
            mult = class_multipliers(mdef['counters_per_class'], nc, values['max_delta'])
        except ValueError as e:
            raise bad('counters_per_class', f'cannot be used: {e}') from None
    return YoloLossConfig(anchors=tuple(tuple(map(float, a)) for a in mdef['anchors']), mask=tuple(mdef['mask']),
                          nc=nc, class_multipliers=mult, **values)


def _corners(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(top, bottom, left, right) of (..., 4) xywh boxes, as Darknet's to_tblr."""
    return b[..., 1] - b[..., 3] / 2, b[..., 1] + b[..., 3] / 2, b[..., 0] - b[..., 2] / 2, b[..., 0] + b[..., 2] / 2


def darknet_iou(a: torch.Tensor, b: torch.Tensor, kind: str = 'iou') -> torch.Tensor:
    """Darknet's box_iou / box_giou / box_diou / box_ciou of broadcastable (..., 4) xywh boxes (its edge cases:
    IoU 0 without overlap or with an empty union; the plain IoU when the enclosing box is degenerate)."""
    at, ab, al, ar = _corners(a)
    bt, bb, bl, br = _corners(b)
    iw = torch.minimum(ar, br) - torch.maximum(al, bl)
    ih = torch.minimum(ab, bb) - torch.maximum(at, bt)
    inter = torch.where((iw < 0) | (ih < 0), torch.zeros_like(iw), iw * ih)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    iou = torch.where((inter == 0) | (union == 0), torch.zeros_like(inter), inter / union)
    if kind in ('iou', 'mse'):
        return iou
    cw = torch.maximum(ar, br) - torch.minimum(al, bl)
    ch = torch.maximum(ab, bb) - torch.minimum(at, bt)
    if kind == 'giou':
        c = cw * ch
        return torch.where(c == 0, iou, iou - (c - union) / c)
    c = cw * cw + ch * ch
    d = (a[..., 0] - b[..., 0]) ** 2 + (a[..., 1] - b[..., 1]) ** 2
    if kind == 'diou':
        return torch.where(c == 0, iou, iou - (d / c) ** 0.6)
    v = 4 / math.pi ** 2 * (torch.atan(b[..., 2] / b[..., 3]) - torch.atan(a[..., 2] / a[..., 3])) ** 2
    alpha = v / (1 - iou + v + 0.000001)
    return torch.where(c == 0, iou, iou - (d / c + alpha * v))


def dx_box_iou(pred: torch.Tensor, truth: torch.Tensor, kind: str) -> torch.Tensor:
    """Darknet's dx_box_iou: (m, 4) d(IoU-kind)/d(x, y, w, h) of pred (m, 4) against truth (m, 4), both xywh.

    Transcribed term by term (including its treatment of non-overlapping boxes), not derived anew: the point is to
    produce the numbers Darknet trains with.
    """
    pt, pb, pl, pr = _corners(pred)
    pt, pb, pl, pr = torch.minimum(pt, pb), torch.maximum(pt, pb), torch.minimum(pl, pr), torch.maximum(pl, pr)
    tt, tb, tl, tr = _corners(truth)
    x = (pb - pt) * (pr - pl)
    xhat = (tb - tt) * (tr - tl)
    ih = torch.minimum(pb, tb) - torch.maximum(pt, tt)
    iw = torch.minimum(pr, tr) - torch.maximum(pl, tl)
    inter = iw * ih
    u = x + xhat - inter
    zero = torch.zeros_like(x)
    dx_t, dx_b, dx_l, dx_r = -(pr - pl), pr - pl, -(pb - pt), pb - pt  # dX/d(t, b, l, r)
    di_t = torch.where(pt > tt, -iw, zero)
    di_b = torch.where(pb < tb, iw, zero)
    di_l = torch.where(pl > tl, -ih, zero)
    di_r = torch.where(pr < tr, ih, zero)
    du = [dx_t - di_t, dx_b - di_b, dx_l - di_l, dx_r - di_r]
    p = [torch.where(u > 0, (u * di - inter * dui) / (u * u), zero) for di, dui in zip((di_t, di_b, di_l, di_r), du)]
    # pred's corners are already ordered, so Darknet's corner-swap selection keeps p as it is
    if kind == 'giou':
        gcw = torch.maximum(pr, tr) - torch.minimum(pl, tl)
        gch = torch.maximum(pb, tb) - torch.minimum(pt, tt)
        gc = gcw * gch
        dc = [torch.where(pt < tt, -gcw, zero), torch.where(pb > tb, gcw, zero),
              torch.where(pl < tl, -gch, zero), torch.where(pr > tr, gch, zero)]
        term = [(gc * dui - u * dci) / (gc * gc) for dui, dci in zip(du, dc)]
        apart = (iw <= 0) | (ih <= 0)
        p = [torch.where(apart, tk, torch.where(gc > 0, pk + tk, pk)) for pk, tk in zip(p, term)]
    g = torch.stack((p[2] + p[3], p[0] + p[1], p[3] - p[2], p[1] - p[0]), -1)  # d/d(x, y, w, h)
    if kind in ('diou', 'ciou'):
        g = _distance_terms(pred, truth, g, (pt, pb, pl, pr), (tt, tb, tl, tr), (iw, ih, inter, u), kind)
    return g


def _distance_terms(pred: torch.Tensor, truth: torch.Tensor, g: torch.Tensor, pc: tuple, tc: tuple, ov: tuple,
                    kind: str) -> torch.Tensor:
    """dx_box_iou's DIoU/CIoU part: the centre-distance (and, for CIoU, aspect-ratio) gradient added to g."""
    (pt, pb, pl, pr), (tt, tb, tl, tr), (iw, ih, inter, u) = pc, tc, ov
    one, zero = torch.ones_like(pt), torch.zeros_like(pt)
    cw = torch.maximum(pred[:, 0] + pred[:, 2] / 2, truth[:, 0] + truth[:, 2] / 2) - \
        torch.minimum(pred[:, 0] - pred[:, 2] / 2, truth[:, 0] - truth[:, 2] / 2)
    ch = torch.maximum(pred[:, 1] + pred[:, 3] / 2, truth[:, 1] + truth[:, 3] / 2) - \
        torch.minimum(pred[:, 1] - pred[:, 3] / 2, truth[:, 1] - truth[:, 3] / 2)
    c = cw * cw + ch * ch
    s = (pred[:, 0] - truth[:, 0]) ** 2 + (pred[:, 1] - truth[:, 1]) ** 2
    # derivatives of the enclosing box's width and height by the prediction's x, y, w, h
    dcw_dx = torch.where(pr > tr, one, zero) - torch.where(pl < tl, one, zero)
    dch_dy = torch.where(pb > tb, one, zero) - torch.where(pt < tt, one, zero)
    dcw_dw = torch.where(pr > tr, 0.5 * one, zero) - torch.where(pl < tl, -0.5 * one, zero)
    dch_dh = torch.where(pb > tb, 0.5 * one, zero) - torch.where(pt < tt, -0.5 * one, zero)
    d = torch.stack(((2 * (truth[:, 0] - pred[:, 0]) * c - 2 * cw * dcw_dx * s) / (c * c),
                     (2 * (truth[:, 1] - pred[:, 1]) * c - 2 * ch * dch_dy * s) / (c * c),
                     2 * cw * dcw_dw * s / (c * c), 2 * ch * dch_dh * s / (c * c)), -1)
    if kind == 'ciou':
        dat = torch.atan(truth[:, 2] / truth[:, 3]) - torch.atan(pred[:, 2] / pred[:, 3])
        ar = 4 / math.pi ** 2 * dat * dat
        alpha = ar / (1 - inter / u + ar + 0.000001)
        d = d + torch.stack((zero, zero, alpha * 8 / math.pi ** 2 * dat * pred[:, 3],
                             -alpha * 8 / math.pi ** 2 * dat * pred[:, 2]), -1)
    apart = ((iw <= 0) | (ih <= 0))[:, None]
    return torch.where(apart, d, torch.where((c > 0)[:, None], g + d, g))



@dataclass(frozen=True)
class Grid:
    """One [yolo] layer's grid and the network input size, as Darknet's l.w, l.h, net.w, net.h."""
    nx: int
    ny: int
    net_w: float
    net_h: float


@dataclass
class Assigned:
    """Truths assigned to anchors of one layer: m rows in Darknet's processing order."""
    cell: tuple[torch.Tensor, ...]  # (image, mask position, gj, gi), each (m,)
    truth: torch.Tensor  # (m, 4) xywh normalised to the input
    cls: torch.Tensor  # (m,) class
    anchor: torch.Tensor  # (m, 2) the assigned anchor, pixels


def box_delta(cfg: YoloLossConfig, out: torch.Tensor, pred: torch.Tensor, a: Assigned, g: Grid,
              norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """delta_yolo_box for m assigned rows: (delta (m, 4), IoU (m,), GIoU (m,)).

    out (m, >= 4): the layer's outputs there (x, y after sigmoid and scale_x_y, w, h raw); pred (m, 4) the decoded
    boxes (normalised xywh); norm (m,) iou_normalizer times the class multiplier.
    """
    iou, giou = darknet_iou(pred, a.truth), darknet_iou(pred, a.truth, 'giou')
    pred = torch.cat((pred[:, :2], torch.where(pred[:, 2:] == 0, torch.ones_like(pred[:, 2:]), pred[:, 2:])), 1)
    if cfg.iou_loss == 'mse':
        wh = torch.stack((a.truth[:, 2] * g.net_w / a.anchor[:, 0], a.truth[:, 3] * g.net_h / a.anchor[:, 1]), 1)
        twh = torch.sqrt(wh / 4) if cfg.new_coords else torch.log(wh)  # the inverse of the head's w, h decode
        t = torch.cat((torch.stack((a.truth[:, 0] * g.nx - a.cell[3], a.truth[:, 1] * g.ny - a.cell[2]), 1), twh), 1)
        scale = 2 - a.truth[:, 2] * a.truth[:, 3]  # Darknet weighs small boxes up, in the mse loss only
        return (t - out[:, :4]) * (scale * norm)[:, None], iou, giou
    d = dx_box_iou(pred, a.truth, cfg.iou_loss)
    if not cfg.new_coords:  # w, h: times exp(t) only; with new_coords Darknet applies no factor at all
        d = torch.cat((d[:, :2], d[:, 2:] * torch.exp(out[:, 2:4])), 1)
    d = d * norm[:, None]
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    if math.isfinite(cfg.max_delta):
        d = d.clamp(-cfg.max_delta, cfg.max_delta)
    return d, iou, giou


def class_delta_new(cfg: YoloLossConfig, out: torch.Tensor, prev: torch.Tensor, cls: torch.Tensor,
                    mult: torch.Tensor) -> torch.Tensor:
    """delta_yolo_class where the truth's class has no delta yet: all nc deltas of m rows (out, prev (m, nc))."""
    onehot = torch.zeros_like(out)
    onehot[torch.arange(len(cls), device=cls.device), cls] = 1.0
    if cfg.focal_loss:
        pt = out.gather(1, cls[:, None]) + 1e-15
        grad = -(1 - pt) * (2 * pt * torch.log(pt) + pt - 1)
        return (onehot - out) * (FOCAL_ALPHA * grad)
    y = onehot * (1 - cfg.label_smooth_eps) + 0.5 * cfg.label_smooth_eps if cfg.label_smooth_eps else onehot
    d = y - out
    d = torch.where(torch.isfinite(d), d, prev)
    if cfg.class_multipliers is not None:  # cls_normalizer only counts together with counters_per_class
        d = d * torch.where(onehot > 0, (mult[cls] * cfg.cls_normalizer)[:, None], torch.ones_like(d))
    return d


def class_delta_again(cfg: YoloLossConfig, out: torch.Tensor, prev: torch.Tensor, cls: torch.Tensor,
                      mult: torch.Tensor) -> torch.Tensor:
    """delta_yolo_class where the truth's class already has a delta: that one delta (m,) only."""
    y = 1 - cfg.label_smooth_eps + 0.5 * cfg.label_smooth_eps if cfg.label_smooth_eps else 1.0
    d = y - out
    d = torch.where(torch.isfinite(d), d, prev)
    return d * mult[cls] if cfg.class_multipliers is not None else d


def _mask_positions(cfg: YoloLossConfig, device: torch.device) -> torch.Tensor:
    """(total,) position of each anchor of the list in the layer's mask, -1 where the layer does not use it."""
    pos = torch.full((len(cfg.anchors),), -1, dtype=torch.long, device=device)
    for k in reversed(range(len(cfg.mask))):  # the first position wins, as Darknet's int_index
        pos[cfg.mask[k]] = k
    return pos


def _f32(value: float, device: torch.device) -> torch.Tensor:
    """A float cfg threshold as Darknet holds it (a C float), to compare float32 quantities with."""
    return _constant((value,), device, torch.float32)[0]


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small read-only tensor of Python numbers on device, made once: from a list each batch it would be a
    host-to-device copy per layer on CUDA."""
    return torch.tensor(values, dtype=dtype, device=device)


def assign(cfg: YoloLossConfig, truths: torch.Tensor, valid: torch.Tensor, g: Grid) -> Assigned:
    """The anchors of this layer that Darknet's truth loop gives each valid truth of truths (B, T, 5) [x, y, w, h,
    class]: the best of all the list's anchors if masked here, and with iou_thresh < 1 every other masked anchor
    whose iou_thresh_kind IoU exceeds it; rows in truth order, best anchor first."""
    device = truths.device
    b, t = valid.nonzero(as_tuple=True)  # in (image, truth) order
    tr = truths[b, t]  # (m0, 5)
    anchors = _constant(tuple(map(tuple, cfg.anchors)), device, truths.dtype)  # (total, 2) pixels
    # the best anchor, the iou_thresh matches and the cell are decided in float32 as Darknet does (its truths are
    # float32, so tr.float() is exact): in float64 an IoU tie or a centre on a grid line can go the other way
    tr32 = tr.float()
    anchors32 = _constant(tuple(map(tuple, cfg.anchors)), device, torch.float32)
    zero = torch.zeros(len(anchors), 2, dtype=torch.float32, device=device)
    net_wh = _constant((g.net_w, g.net_h), device, torch.float32)
    anchor_boxes = torch.cat((zero, anchors32 / net_wh), 1)[None]  # (1, total, 4), as l.biases / net.w
    shifted = torch.cat((torch.zeros_like(tr32[:, :2]), tr32[:, 2:4]), 1)[:, None]  # (m0, 1, 4) centred truths
    best_n = darknet_iou(anchor_boxes, shifted).argmax(1)  # (m0,) first best on ties, as Darknet's strict '>'
    pos = _mask_positions(cfg, device)
    n_idx = torch.arange(len(anchors), device=device)
    take = (n_idx[None] == best_n[:, None]) & (pos[None] >= 0)  # (m0, total)
    sub = torch.zeros(take.shape, dtype=torch.long, device=device)
    if cfg.iou_thresh < 1.0:
        extra = (pos[None] >= 0) & (n_idx[None] != best_n[:, None]) & \
            (darknet_iou(anchor_boxes, shifted, cfg.iou_thresh_kind) > _f32(cfg.iou_thresh, device))
        take |= extra
        sub = torch.where(extra, n_idx[None] + 1, sub)
    r, n = take.nonzero(as_tuple=True)
    order = torch.argsort(r * (len(anchors) + 1) + sub[r, n], stable=True)
    r, n = r[order], n[order]
    # (int)(truth.x * l.w) in float32 as Darknet: 200/416 on a 52 grid is cell 25 there, 24 in float64; a centre
    # on the right or bottom edge stays in the last cell
    gi = (tr32[r, 0] * g.nx).long().clamp(0, g.nx - 1)
    gj = (tr32[r, 1] * g.ny).long().clamp(0, g.ny - 1)
    return Assigned((b[r], pos[n], gj, gi), tr[r, :4], tr[r, 4].long(), anchors[n])


def cell_ranks(cell: tuple[torch.Tensor, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """(m,) how many earlier rows went to the same (image, anchor, gj, gi) cell: rows of one rank share no cell."""
    key = ((cell[0] * shape[1] + cell[1]) * shape[2] + cell[2]) * shape[3] + cell[3]
    if not len(key):
        return key
    order = torch.argsort(key, stable=True)
    k = key[order]
    idx = torch.arange(len(k), device=k.device)
    start = torch.where(torch.cat((k.new_ones(1, dtype=torch.bool), k[1:] != k[:-1])), idx, torch.zeros_like(idx))
    rank = torch.empty_like(idx)
    rank[order] = idx - torch.cummax(start, 0).values
    return rank


def layer_outputs(cfg: YoloLossConfig, x: torch.Tensor, g: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Darknet's layer output (x, y after sigmoid and scale_x_y; w, h raw; objectness and classes after sigmoid)
    and the predicted boxes (normalised xywh) of raw x (B, na, ny, nx, no), through the model's own decode.

    With new_coords the head's convolution already applied the logistic: Darknet's [yolo] applies none (only
    scale_x_y to x, y), and the deltas are taken with respect to that input, as here."""
    na = x.shape[1]
    anchors = _constant(tuple(tuple(cfg.anchors[m]) for m in cfg.mask), x.device, x.dtype)
    anchors = (anchors / _constant((g.net_w, g.net_h), x.device, x.dtype)).view(1, na, 1, 1, 2)
    xy, wh = decode_yolo_box(x, anchors, cfg.scale_x_y, new_coords=bool(cfg.new_coords))
    yv, xv = torch.meshgrid(torch.arange(g.ny, device=x.device, dtype=x.dtype),
                            torch.arange(g.nx, device=x.device, dtype=x.dtype), indexing='ij')
    grid = torch.stack((xv, yv), 2).view(1, 1, g.ny, g.nx, 2)
    pred = torch.cat(((xy + grid) / _constant((g.nx, g.ny), x.device, x.dtype), wh), -1)  # (B, na, ny, nx, 4)
    out = torch.cat((xy, x[..., 2:4], x[..., 4:] if cfg.new_coords else torch.sigmoid(x[..., 4:])), -1)
    return out, pred


def objectness_step(cfg: YoloLossConfig, out: torch.Tensor, pred32: torch.Tensor, truths: torch.Tensor,
                    valid: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """process_batch's loop over predictions: objectness delta to 0, except where the prediction overlaps a truth
    by more than ignore_thresh (and some class probability exceeds 0.25). Writes delta; returns each prediction's
    best IoU (float32) and truth index (B, na, ny, nx) for truth_thresh.

    The IoUs are Darknet's float32 ones (pred32: the float32 decode; truths float32), so that the threshold
    comparisons and the best truth are decided as Darknet decides them."""
    truths = truths.float()
    iou = darknet_iou(pred32[:, :, :, :, None], truths[:, None, None, None, :, :4])  # (B, na, ny, nx, T)
    iou = torch.where(valid[:, None, None, None], iou, torch.zeros_like(iou))
    best_t = iou.argmax(-1) if iou.shape[-1] else torch.zeros(iou.shape[:-1], dtype=torch.long, device=iou.device)
    best_iou = iou.gather(-1, best_t[..., None])[..., 0] if iou.shape[-1] else torch.zeros_like(pred32[..., 0])
    match = (out[..., 5:] > CLASS_MATCH).any(-1)
    best_match = torch.where(match, best_iou, torch.zeros_like(best_iou))
    d_obj = cfg.obj_normalizer * (0 - out[..., 4])
    ignore = best_match > _f32(cfg.ignore_thresh, out.device)
    best_match = best_match.to(out.dtype)
    if cfg.objectness_smooth:
        d_obj = torch.where(ignore, torch.maximum(d_obj, cfg.obj_normalizer * (best_match - out[..., 4])), d_obj)
    else:
        d_obj = torch.where(ignore, torch.zeros_like(d_obj), d_obj)
    delta[..., 4] = d_obj
    return best_iou, best_t


def truth_thresh_step(cfg: YoloLossConfig, out: torch.Tensor, pred: torch.Tensor, truths: torch.Tensor,
                      best: tuple[torch.Tensor, torch.Tensor], delta: torch.Tensor, g: Grid,
                      mult: torch.Tensor) -> None:
    """Predictions whose best IoU with a truth exceeds truth_thresh train as if assigned to it (objectness, class
    and box deltas), as process_batch's first loop does; not counted in the IoU statistics."""
    best_iou, best_t = best
    cell = (best_iou > _f32(cfg.truth_thresh, out.device)).nonzero(as_tuple=True)
    if not len(cell[0]):
        return
    tr = truths[cell[0], best_t[cell]]  # (m, 5)
    cls = tr[:, 4].long()
    anchors = _constant(tuple(tuple(cfg.anchors[m]) for m in cfg.mask), out.device, out.dtype)
    iou_mult = best_iou[cell].to(out.dtype) ** 2
    o = out[cell]
    delta[cell + (4,)] = cfg.obj_normalizer * ((iou_mult if cfg.objectness_smooth else 1.0) - o[:, 4])
    d_cls = class_delta_new(cfg, o[:, 5:], delta[cell][:, 5:], cls, mult)
    if cfg.objectness_smooth:
        rows = torch.arange(len(cls), device=cls.device)
        d_cls[rows, cls] = mult[cls] * (iou_mult - o[rows, 5 + cls])
    delta[cell + (slice(5, None),)] = d_cls
    a = Assigned(cell, tr[:, :4], cls, anchors[cell[1]])
    d_box, _, _ = box_delta(cfg, o, pred[cell], a, g, cfg.iou_normalizer * mult[cls])
    delta[cell + (slice(0, 4),)] += d_box


def truth_step(cfg: YoloLossConfig, out: torch.Tensor, pred: torch.Tensor, a: Assigned, delta: torch.Tensor,
               g: Grid, mult: torch.Tensor) -> torch.Tensor:
    """process_batch's loop over truths: box deltas added, objectness and class deltas set, truth by truth.

    Returns the IoU statistics (3,): count, sum of 1 - IoU, sum of 1 - GIoU.
    """
    cm = mult[a.cls]
    o = out[a.cell]  # (m, no)
    d_box, iou, giou = box_delta(cfg, o, pred[a.cell], a, g, cfg.iou_normalizer * cm)
    delta[..., :4].index_put_(a.cell, d_box, accumulate=True)  # box deltas of one anchor add up
    rank = cell_ranks(a.cell, tuple(delta.shape))
    for r in range(int(rank.max()) + 1 if len(rank) else 0):  # rows of one rank touch distinct cells
        k = (rank == r).nonzero(as_tuple=True)[0]
        cell, cls = tuple(c[k] for c in a.cell), a.cls[k]
        ok = o[k]
        d_obj = cm[k] * cfg.obj_normalizer * (1 - ok[:, 4])
        if cfg.objectness_smooth:  # keeps a delta an earlier step set
            d_obj = torch.where(delta[cell + (4,)] == 0, d_obj, delta[cell + (4,)])
        delta[cell + (4,)] = d_obj
        prev = delta[cell][:, 5:]  # (mk, nc)
        rows = torch.arange(len(k), device=delta.device)
        again = prev[rows, cls] != 0
        kept = prev.clone()  # the truth's class already has a delta: only that one is rewritten
        kept[rows, cls] = class_delta_again(cfg, ok[rows, 5 + cls], prev[rows, cls], cls, mult)
        delta[cell + (slice(5, None),)] = torch.where(again[:, None], kept,
                                                      class_delta_new(cfg, ok[:, 5:], prev, cls, mult))
    return torch.stack((iou.new_tensor(float(len(iou))), (1 - iou).sum(), (1 - giou).sum()))


def average_step(delta: torch.Tensor) -> None:
    """averages_yolo_deltas (with iou_thresh < 1): where objectness has a delta, the box delta is divided by the
    number of classes with a positive delta."""
    k = (delta[..., 5:] > 0).sum(-1)  # (B, na, ny, nx)
    div = torch.where((delta[..., 4] != 0) & (k > 0), k, torch.ones_like(k)).to(delta.dtype)
    delta[..., :4] /= div[..., None]


def layer_deltas(cfg: YoloLossConfig, x: torch.Tensor, truths: torch.Tensor, valid: torch.Tensor,
                 net_wh: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Darknet's deltas (B, na, ny, nx, no) for raw outputs x (same shape) of one [yolo] layer, and the IoU
    statistics (count, sum of 1 - IoU, sum of 1 - GIoU) of its assigned truths.

    truths (B, T, 5): [x, y, w, h, class] per image in Darknet's order (normalised); valid (B, T) marks real rows.
    """
    g = Grid(x.shape[3], x.shape[2], float(net_wh[0]), float(net_wh[1]))
    mult = (_constant(tuple(cfg.class_multipliers), x.device, x.dtype) if cfg.class_multipliers is not None
            else x.new_ones(cfg.nc))
    # Darknet's l.output and decoded boxes are float32: decode in float32 (its comparisons are made on these), then
    # compute the deltas from those very values in x's precision
    out32, pred32 = layer_outputs(cfg, x.float(), g)
    out, pred = out32.to(x.dtype), pred32.to(x.dtype)
    delta = torch.zeros_like(x)
    best = objectness_step(cfg, out, pred32, truths, valid, delta)
    truth_thresh_step(cfg, out, pred, truths, best, delta, g, mult)
    stats = truth_step(cfg, out, pred, assign(cfg, truths, valid, g), delta, g, mult)
    if cfg.iou_thresh < 1.0:
        average_step(delta)
    return delta, stats


def layer_cost(cfg: YoloLossConfig, delta: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Darknet's cost of one layer, split (4,): box, objectness, class, total (show_details 1: obj_normalizer times
    the squared non-box deltas plus, for the IoU losses, iou_normalizer times the mean (1 - IoU or GIoU) of the
    assigned truths; for mse, and with show_details 0, the squared deltas)."""
    sq = delta * delta
    obj, cls = cfg.obj_normalizer * sq[..., 4].sum(), cfg.obj_normalizer * sq[..., 5:].sum()
    if cfg.show_details == 0 or cfg.iou_loss == 'mse':
        total = sq.sum()
    else:
        iou_loss = stats[2] if cfg.iou_loss == 'giou' else stats[1]
        total = cfg.iou_normalizer * iou_loss / stats[0].clamp(min=1) + obj + cls
    return torch.stack((total - obj - cls, obj, cls, total))


def darknet_truths(targets: torch.Tensor, batch_size: int, nc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (n, 6) [image, class, x, y, w, h] as Darknet's truth array: (B, T, 5) [x, y, w, h, class] in label
    order per image, and (B, T) valid. As Darknet: at most MAX_BOXES per image, and a truth with x == 0 ends its
    image's list."""
    if len(targets) and (targets[:, 1].max() >= nc or targets[:, 1].min() < 0):
        raise ValueError(f"label class {int(targets[:, 1].max())} is out of range for a model with {nc} classes "
                         f"(classes must be 0-{nc - 1}); check the labels or the cfg's classes=")
    img = targets[:, 0].long()
    order = torch.argsort(img, stable=True)
    img, rows = img[order], targets[order]
    counts = torch.bincount(img, minlength=batch_size)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(img), device=targets.device) - first[img]
    keep = slot < MAX_BOXES
    t = min(int(counts.max()) if len(img) else 0, MAX_BOXES)
    truths = targets.new_zeros(batch_size, t, 5)
    truths[img[keep], slot[keep]] = torch.cat((rows[keep, 2:6], rows[keep, 1:2]), 1)
    valid = torch.zeros(batch_size, t, dtype=torch.bool, device=targets.device)
    valid[img[keep], slot[keep]] = True
    valid &= torch.cumprod((truths[..., 0] != 0).long(), 1).bool()
    return truths, valid


class DarknetLoss:
    """Darknet's [yolo] loss for a model (train.py --loss darknet); called as ComputeLoss: loss_fn(p, targets, gr)
    -> (loss (1,), items (4,) = box, obj, cls, total, detached); Darknet has no objectness ramp, so gr is unused.

    items are the loss Darknet prints for the batch (each layer's cost averaged over the [yolo] layers, divided by
    the batch size), split into its IoU, objectness and class parts. The gradient of loss with respect to each raw
    output is Darknet's delta, negated, divided by the batch size (Darknet's SGD divides the summed deltas by it)
    and multiplied by the cfg's [net] learning_rate / 0.01: train.py scales the loss by batch size / 64 and
    accumulates 64 images, so at the default lr0 of 0.01 each optimizer step is the step Darknet takes with the
    cfg's learning rate, and lr0 still scales it as for the default loss.
    """

    def __init__(self, model: nn.Module, hyp: dict[str, float] | None = None):
        bare = de_parallel(model)
        refuse_heads(bare, 'darknet', ('region', 'gaussian_yolo'))
        # imported here: those modules build on this one's [yolo] functions
        from utils.train.darknet_gaussian_loss import gaussian_loss_config
        self.configs: list[YoloLossConfig | RegionLossConfig] = []
        for j in bare.yolo_layers:
            d, where = bare.module_defs[j], f"{bare.cfg_path}:{bare.module_defs[j]['line']}: layer {j}"
            if d['type'] == 'region':
                head = bare.module_list[j]
                self.configs.append(region_loss_config(d, head.anchors_grid.tolist(), float(head.stride), where))
            elif d['type'] == 'gaussian_yolo':
                self.configs.append(gaussian_loss_config(d, where))
            else:
                self.configs.append(yolo_loss_config(d, where))
        self.strides = [float(bare.module_list[j].stride) for j in bare.yolo_layers]
        self.nc = int(bare.nc)
        self.grad_scale = float(bare.hyperparams.get('learning_rate', DARKNET_LR)) / REFERENCE_LR0
        self.hyp = dict(hyp or {})
        # Darknet's net.seen ([region] pulls boxes towards their anchor priors while it is below 12800) is the
        # model's own count: images its training forward has seen, this batch included, kept in .weights headers and
        # checkpoints (so fine-tuning Darknet weights or resuming continues it)
        self.model = bare

    def __call__(self, p: list[torch.Tensor], targets: torch.Tensor, gr: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of raw train-mode outputs p (each (bs, na, ny, nx, nc + 5)) for targets (n, 6); gr is ignored."""
        from utils.train.darknet_gaussian_loss import (
            GaussianLossConfig,
            gaussian_cost,
            gaussian_deltas,
        )
        bs = p[0].shape[0]
        seen = int(getattr(self.model, 'seen', 0))
        items = torch.zeros(4, device=p[0].device)
        surrogate = torch.zeros((), device=p[0].device)
        with torch.no_grad():
            truths, valid = darknet_truths(targets.float(), bs, self.nc)
        for cfg, pi, stride in zip(self.configs, p, self.strides):
            with torch.no_grad():
                # float64: Darknet's IoU gradients cancel terms, float32 here would add its own rounding to Darknet's
                x = pi.detach().double()
                if isinstance(cfg, RegionLossConfig):
                    delta = region_deltas(cfg, x, truths.double(), valid, seen)
                    items += region_cost(delta).float()
                elif isinstance(cfg, GaussianLossConfig):
                    delta = gaussian_deltas(cfg, x, truths.double(), valid, (x.shape[3] * stride, x.shape[2] * stride))
                    items += gaussian_cost(delta).float()
                else:
                    delta, stats = layer_deltas(cfg, x, truths.double(), valid,
                                                (x.shape[3] * stride, x.shape[2] * stride))
                    items += layer_cost(cfg, delta, stats).float()
            surrogate = surrogate - (delta.float() * pi.float()).sum()  # d/d(pi) = -delta exactly
        items /= len(p) * bs
        loss = self.grad_scale * (surrogate - surrogate.detach()) / bs + items[3]
        return loss.view(1), items.detach()

