"""Darknet's own [Gaussian_yolo] training loss (Gaussian YOLOv3; AlexeyAB/darknet src/gaussian_yolo_layer.c
forward_gaussian_yolo_layer), delta for delta. DarknetLoss (utils/train/darknet_loss.py) calls gaussian_deltas for each
[Gaussian_yolo] head.

Per anchor the head has x, σx, y, σy, w, σw, h, σh, objectness, classes. It trains like [yolo] (ignore_thresh,
truth_thresh, best anchor over the whole list, iou_thresh matches, deltas added up on a slot), with these
differences, all reproduced: the box deltas of mse are those of a Gaussian negative log-likelihood in each
coordinate (mean and σ, weighted by 2 - w·h and iou_normalizer, σ's by uc_normalizer); with an IoU loss the means
take dx_box_iou's gradient and the σs keep the likelihood's; objectness_smooth also sets the class deltas of ignored
slots; delta_gaussian_yolo_class tests the delta of class 0 (not the truth's class) to decide whether a slot
already has class deltas; every slot's eight box deltas are averaged over the classes with a positive delta,
whatever iou_thresh; no focal loss. Cost: the squared delta norm.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from utils.boxes import decode_yolo_box
from utils.train.darknet_loss import (
    CLASS_MATCH,
    Assigned,
    Grid,
    YoloLossConfig,
    _constant,
    _f32,
    assign,
    cell_ranks,
    darknet_iou,
    dx_box_iou,
    yolo_loss_config,
)

SIGMA_CONST = 0.3  # delta_gaussian_yolo_box's constants
EPSI = 1e-9
MU = (0, 2, 4, 6)  # entries of x, y, w, h; their σ follow each


@dataclass(frozen=True)
class GaussianLossConfig(YoloLossConfig):
    """A [Gaussian_yolo] layer's Darknet training keys: [yolo]'s, and uc_normalizer (the σ deltas' weight)."""
    uc_normalizer: float = 1.0


def gaussian_loss_config(mdef: dict, where: str) -> GaussianLossConfig:
    """The loss settings of one parsed [Gaussian_yolo] section; ConfigError (naming where and the key) for a key
    this loss cannot honour."""
    rest = {k: v for k, v in mdef.items() if k != 'uc_normalizer'}
    base = asdict(yolo_loss_config(rest, where))
    return GaussianLossConfig(**base, uc_normalizer=float(mdef.get('uc_normalizer', 1.0)))


def outputs(cfg: GaussianLossConfig, x: torch.Tensor, g: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_gaussian_yolo_layer's output (logistic on x, σx, y, σy, σw, σh, objectness, classes; scale_x_y on x,
    y; w, h raw) and the boxes (B, na, ny, nx, 4) normalised, decoded as the model decodes them."""
    na = x.shape[1]
    anchors = _constant(tuple(tuple(cfg.anchors[m]) for m in cfg.mask), x.device, x.dtype)
    anchors = (anchors / _constant((g.net_w, g.net_h), x.device, x.dtype)).view(1, na, 1, 1, 2)
    xy, wh = decode_yolo_box(x[..., 0:8:2], anchors, cfg.scale_x_y)
    yv, xv = torch.meshgrid(torch.arange(g.ny, device=x.device, dtype=x.dtype),
                            torch.arange(g.nx, device=x.device, dtype=x.dtype), indexing='ij')
    grid = torch.stack((xv, yv), 2).view(1, 1, g.ny, g.nx, 2)
    pred = torch.cat(((xy + grid) / _constant((g.nx, g.ny), x.device, x.dtype), wh), -1)
    out = torch.sigmoid(x)
    out = torch.cat((xy[..., :1], out[..., 1:2], xy[..., 1:2], out[..., 3:4], x[..., 4:5], out[..., 5:6],
                     x[..., 6:7], out[..., 7:]), -1)
    return out, pred


def class_delta(cfg: GaussianLossConfig, out: torch.Tensor, prev: torch.Tensor, cls: torch.Tensor,
                mult: torch.Tensor) -> torch.Tensor:
    """delta_gaussian_yolo_class for m rows: the nc class deltas (out, prev (m, nc)). Where class 0 already has a
    delta only the truth's class is rewritten (times its multiplier); else every class is set (the truth's class
    times multiplier and cls_normalizer, with counters_per_class)."""
    rows = torch.arange(len(cls), device=cls.device)
    onehot = torch.zeros_like(out)
    onehot[rows, cls] = 1.0
    y = onehot * (1 - cfg.label_smooth_eps) + 0.5 * cfg.label_smooth_eps if cfg.label_smooth_eps else onehot
    fresh = y - out
    again = prev.clone()
    again[rows, cls] = fresh[rows, cls]
    if cfg.class_multipliers is not None:
        fresh[rows, cls] *= mult[cls] * cfg.cls_normalizer
        again[rows, cls] *= mult[cls]
    return torch.where((prev[:, 0] != 0)[:, None], again, fresh)


def box_delta(cfg: GaussianLossConfig, o: torch.Tensor, pred: torch.Tensor, a: Assigned, g: Grid,
              norm: torch.Tensor) -> torch.Tensor:
    """delta_gaussian_yolo_box for m assigned rows: (m, 8) deltas of x, σx, y, σy, w, σw, h, σh. o (m, >= 8): the
    layer's outputs there; pred (m, 4) the decoded boxes; norm (m,) iou_normalizer times the class multiplier."""
    t = torch.stack((a.truth[:, 0] * g.nx - a.cell[3], a.truth[:, 1] * g.ny - a.cell[2],
                     torch.log(a.truth[:, 2] * g.net_w / a.anchor[:, 0]),
                     torch.log(a.truth[:, 3] * g.net_h / a.anchor[:, 1])), 1)
    mu, sigma = o[:, list(MU)], o[:, [m + 1 for m in MU]]
    z = (t - mu) / sigma
    normal = torch.exp(z * z * -0.5) / (math.sqrt(math.pi * 2.0) * (sigma + SIGMA_CONST))
    temp = 0.5 / (normal + EPSI) * normal * (2 - a.truth[:, 2] * a.truth[:, 3])[:, None]
    d_mu = temp * z / sigma
    d_sigma = temp * (z * z / sigma - 1 / (sigma + SIGMA_CONST))
    if cfg.iou_loss != 'mse':
        pred = torch.cat((pred[:, :2], torch.where(pred[:, 2:] == 0, torch.ones_like(pred[:, 2:]), pred[:, 2:])), 1)
        d = dx_box_iou(pred, a.truth, cfg.iou_loss)
        d_mu = torch.cat((d[:, :2], d[:, 2:] * torch.exp(o[:, [4, 6]])), 1)  # w, h: times exp(t)
    d = torch.stack((d_mu * norm[:, None], d_sigma * cfg.uc_normalizer), -1).reshape(len(t), 8)  # interleaved
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    return d.clamp(-cfg.max_delta, cfg.max_delta) if math.isfinite(cfg.max_delta) else d


def prediction_step(cfg: GaussianLossConfig, out: torch.Tensor, pred: torch.Tensor, pred32: torch.Tensor,
                    truths: torch.Tensor, valid: torch.Tensor, delta: torch.Tensor, g: Grid,
                    mult: torch.Tensor) -> None:
    """The loop over predictions: objectness to 0 except over ignore_thresh (0, or with objectness_smooth IoU² and
    the class deltas of the best truth), and over truth_thresh a positive with that truth's class and box."""
    t32 = truths.float()
    iou = darknet_iou(pred32[..., None, :], t32[:, None, None, None, :, :4])  # (B, na, ny, nx, T) float32
    iou = torch.where(valid[:, None, None, None], iou, torch.zeros_like(iou))
    if not iou.shape[-1]:
        delta[..., 8] = cfg.obj_normalizer * (0 - out[..., 8])
        return
    best_t = iou.argmax(-1)
    best = iou.gather(-1, best_t[..., None])[..., 0]
    match = (out[..., 9:] > CLASS_MATCH).any(-1)
    obj = out[..., 8]
    delta[..., 8] = cfg.obj_normalizer * (0 - obj)
    ignore = match & (best > _f32(cfg.ignore_thresh, out.device))
    cls_all = truths[..., 4].long()  # (B, T)
    bidx = torch.arange(len(truths), device=out.device).view(-1, 1, 1, 1).expand_as(best_t)
    best_cls = cls_all[bidx, best_t]  # (B, na, ny, nx)
    best64 = best.to(out.dtype)
    if cfg.objectness_smooth:
        cell = ignore.nonzero(as_tuple=True)
        delta[cell + (8,)] = cfg.obj_normalizer * (best64[cell] ** 2 - obj[cell])
        delta[cell + (slice(9, None),)] = class_delta(cfg, out[cell][:, 9:], delta[cell][:, 9:], best_cls[cell], mult)
    else:
        delta[..., 8] = torch.where(ignore, torch.zeros_like(obj), delta[..., 8])
    cell = (best > _f32(cfg.truth_thresh, out.device)).nonzero(as_tuple=True)
    if not len(cell[0]):
        return
    cls, o = best_cls[cell], out[cell]
    iou2 = best64[cell] ** 2
    delta[cell + (8,)] = cfg.obj_normalizer * ((iou2 if cfg.objectness_smooth else 1.0) - o[:, 8])
    d_cls = class_delta(cfg, o[:, 9:], delta[cell][:, 9:], cls, mult)
    if cfg.objectness_smooth:
        rows = torch.arange(len(cls), device=cls.device)
        d_cls[rows, cls] = mult[cls] * (iou2 - o[rows, 9 + cls])
    delta[cell + (slice(9, None),)] = d_cls
    anchors = _constant(tuple(tuple(cfg.anchors[m]) for m in cfg.mask), out.device, out.dtype)
    a = Assigned(cell, truths[cell[0], best_t[cell]][:, :4], cls, anchors[cell[1]])
    delta[cell + (slice(0, 8),)] += box_delta(cfg, o, pred[cell], a, g, cfg.iou_normalizer * mult[cls])


def gaussian_deltas(cfg: GaussianLossConfig, x: torch.Tensor, truths: torch.Tensor, valid: torch.Tensor,
                    net_wh: tuple[float, float]) -> torch.Tensor:
    """Darknet's [Gaussian_yolo] deltas (B, na, ny, nx, 9 + nc) for raw outputs x (same shape, float64) and truths
    (B, T, 5) [x, y, w, h, class] (normalised, Darknet's order) with valid (B, T); decisions in float32 as Darknet."""
    g = Grid(x.shape[3], x.shape[2], float(net_wh[0]), float(net_wh[1]))
    mult = (_constant(tuple(cfg.class_multipliers), x.device, x.dtype) if cfg.class_multipliers is not None
            else x.new_ones(cfg.nc))
    out32, pred32 = outputs(cfg, x.float(), g)
    out, pred = out32.to(x.dtype), pred32.to(x.dtype)
    delta = torch.zeros_like(x)
    prediction_step(cfg, out, pred, pred32, truths, valid, delta, g, mult)
    a = assign(cfg, truths, valid, g)
    o = out[a.cell]
    cm = mult[a.cls]
    delta[..., :8].index_put_(a.cell, box_delta(cfg, o, pred[a.cell], a, g, cfg.iou_normalizer * cm), accumulate=True)
    rank = cell_ranks(a.cell, tuple(delta.shape))
    for r in range(int(rank.max()) + 1 if len(rank) else 0):  # truth order; rows of one rank touch distinct cells
        k = (rank == r).nonzero(as_tuple=True)[0]
        cell, cls = tuple(c[k] for c in a.cell), a.cls[k]
        delta[cell + (8,)] = cm[k] * cfg.obj_normalizer * (1 - o[k][:, 8])
        delta[cell + (slice(9, None),)] = class_delta(cfg, o[k][:, 9:], delta[cell][:, 9:], cls, mult)
    n_cls = (delta[..., 9:] > 0).sum(-1, keepdim=True)  # every slot's box deltas over its positive classes
    delta[..., :8] /= torch.where(n_cls > 0, n_cls, torch.ones_like(n_cls)).to(delta.dtype)
    return delta


def gaussian_cost(delta: torch.Tensor) -> torch.Tensor:
    """Darknet's [Gaussian_yolo] cost (the squared delta norm), split (4,): box (means and σ), objectness, class,
    total."""
    sq = delta * delta
    parts = torch.stack((sq[..., :8].sum(), sq[..., 8].sum(), sq[..., 9:].sum()))
    return torch.cat((parts, parts.sum()[None]))
