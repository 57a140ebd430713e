"""Darknet's own [region] training loss (YOLOv2; AlexeyAB/darknet src/region_layer.c forward_region_layer), delta
for delta. DarknetLoss (utils/train/darknet_loss.py) calls region_deltas for each [region] head.

Darknet's [region] differs from [yolo] throughout: its deltas already hold the logistic's derivative (x, y and
objectness are activated inside the layer), classes are a softmax trained by softmax cross-entropy (softmax=1),
anchors are in grid cells and every anchor of the list is the head's; each truth trains only its best anchor (by
anchor shape with bias_match=1, else by the predicted shape there) and a later truth on the same slot replaces an
earlier one entirely; objectness is pushed to 0 (noobject_scale) except where a prediction overlaps any truth by
more than thresh, to 1 or to its IoU (rescore) at the truths' slots (object_scale); and for the first 12800 images
seen every slot's box is also pulled towards its anchor prior at the cell centre (scale .01). Cost: the squared
delta norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.darknet.parse_config import ConfigError

PRIOR_IMAGES = 12800  # Darknet pulls every box towards its prior while net.seen is below this
PRIOR_SCALE = 0.01
FOCAL_ALPHA = 0.5


@dataclass(frozen=True)
class RegionLossConfig:
    """The Darknet training keys of one [region] layer, with Darknet's defaults (parse_region) filled in.

    anchors, mask and iou_thresh describe its assignment as a [yolo] config does (for utils.train.anchors' fit check):
    every anchor is the layer's, and each label goes to its best anchor only."""
    anchors_grid: tuple[tuple[float, float], ...]  # grid cells, every anchor of the layer (the loss uses these)
    anchors: tuple[tuple[float, float], ...]  # the same in input pixels
    mask: tuple[int, ...]
    nc: int
    iou_thresh: float = 1.0
    iou_thresh_kind: str = 'iou'
    softmax: int = 0
    rescore: int = 0
    bias_match: int = 0
    focal_loss: int = 0
    thresh: float = 0.5
    coord_scale: float = 1.0
    object_scale: float = 1.0
    noobject_scale: float = 1.0
    class_scale: float = 1.0


REGION_KEYS = ('softmax', 'rescore', 'bias_match', 'focal_loss', 'thresh', 'coord_scale', 'object_scale',
               'noobject_scale', 'class_scale')


def region_loss_config(mdef: dict, anchors: list[tuple[float, float]], stride: float,
                       where: str) -> RegionLossConfig:
    """The loss settings of one parsed [region] section (anchors in grid cells, as the model built them; stride in
    input pixels); a key this loss cannot honour is a ConfigError naming where (file, line, layer) and the key."""
    if mdef.get('classfix', 0):
        raise ConfigError(f"{where}: [region] key classfix={mdef['classfix']!r} is not supported under --loss darknet")
    values = {k: mdef[k] for k in REGION_KEYS if k in mdef}
    grid = tuple((float(w), float(h)) for w, h in anchors)
    return RegionLossConfig(anchors_grid=grid, anchors=tuple((w * stride, h * stride) for w, h in grid),
                            mask=tuple(range(len(grid))), nc=int(mdef['classes']), **values)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Darknet's box_iou (box.c) of broadcastable (..., 4) xywh boxes, in their dtype and operation order."""
    iw = torch.minimum(a[..., 0] + a[..., 2] / 2, b[..., 0] + b[..., 2] / 2) - \
        torch.maximum(a[..., 0] - a[..., 2] / 2, b[..., 0] - b[..., 2] / 2)
    ih = torch.minimum(a[..., 1] + a[..., 3] / 2, b[..., 1] + b[..., 3] / 2) - \
        torch.maximum(a[..., 1] - a[..., 3] / 2, b[..., 1] - b[..., 3] / 2)
    inter = torch.where((iw < 0) | (ih < 0), torch.zeros_like(iw), iw * ih)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return torch.where((inter == 0) | (union == 0), torch.zeros_like(inter), inter / union)


def _class_delta(cfg: RegionLossConfig, cls_out: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """delta_region_class without a tree: class_scale * (one-hot - output) for every class of m rows (m, nc), the
    focal variant times 0.5 * its gradient factor."""
    onehot = torch.zeros_like(cls_out)
    onehot[torch.arange(len(cls), device=cls.device), cls] = 1.0
    d = cfg.class_scale * (onehot - cls_out)
    if cfg.focal_loss:
        pt = cls_out.gather(1, cls[:, None]) + 1e-15
        d = d * (FOCAL_ALPHA * -(1 - pt) * (2 * pt * torch.log(pt) + pt - 1))
    return d


def region_deltas(cfg: RegionLossConfig, x: torch.Tensor, truths: torch.Tensor, valid: torch.Tensor,
                  seen: int) -> torch.Tensor:
    """Darknet's [region] deltas (B, na, ny, nx, 5 + nc), with respect to the raw input x (same shape, float64), for
    truths (B, T, 5) [x, y, w, h, class] (normalised, Darknet's order) and valid (B, T); seen: net.seen, the images
    counted so far including this batch.

    Darknet's layer output and boxes are float32 and its comparisons (cell, best anchor, thresh) are made on them:
    so here, with the deltas computed from those float32 values in float64.
    """
    bs, na, ny, nx, _ = x.shape
    dev, dt = x.device, x.dtype
    x32 = x.float()
    sig = torch.sigmoid(x32[..., :2]).to(dt)  # get_region_box's logistic of x, y
    obj = torch.sigmoid(x32[..., 4]).to(dt)
    cls_out = (torch.softmax(x32[..., 5:], -1) if cfg.softmax else x32[..., 5:]).to(dt)
    anchors = torch.tensor(cfg.anchors_grid, dtype=torch.float32, device=dev)  # (na, 2) cells, float as l.biases
    yv, xv = torch.meshgrid(torch.arange(ny, device=dev, dtype=torch.float32),
                            torch.arange(nx, device=dev, dtype=torch.float32), indexing='ij')
    # get_region_box: float32 centre, w and h from exp() in double rounded to float
    wh = (torch.exp(x[..., 2:4]) * anchors.to(dt).view(1, na, 1, 1, 2) /
          torch.tensor([nx, ny], dtype=dt, device=dev)).float()
    pred32 = torch.cat((((xv + sig[..., 0].float()) / nx)[..., None], ((yv + sig[..., 1].float()) / ny)[..., None],
                        wh), -1)  # (B, na, ny, nx, 4)
    t32 = truths.float()
    delta = torch.zeros_like(x)

    # every slot: objectness to 0 unless it overlaps a truth by more than thresh
    iou = _iou(pred32[..., None, :], t32[:, None, None, None, :, :4])  # (B, na, ny, nx, T)
    iou = torch.where(valid[:, None, None, None], iou, torch.zeros_like(iou))
    best = iou.max(-1).values if iou.shape[-1] else torch.zeros_like(pred32[..., 0])
    keep = best <= torch.tensor(cfg.thresh, dtype=torch.float32, device=dev)
    delta[..., 4] = torch.where(keep, cfg.noobject_scale * ((0 - obj) * ((1 - obj) * obj)), torch.zeros_like(obj))
    if seen < PRIOR_IMAGES:  # the box towards the anchor at the cell centre: x, y to 0.5, w, h to 0 (log 1)
        delta[..., 0:2] = PRIOR_SCALE * ((0.5 - sig) * ((1 - sig) * sig))
        delta[..., 2:4] = PRIOR_SCALE * (0 - x[..., 2:4])

    # every truth: its best anchor at its cell; a later truth on the same slot replaces an earlier one
    b, t = valid.nonzero(as_tuple=True)
    if not len(b):
        return delta
    tr, tr32 = truths[b, t], t32[b, t]
    gi = (tr32[:, 0] * nx).long().clamp(0, nx - 1)  # (int)(truth.x * l.w) in float32
    gj = (tr32[:, 1] * ny).long().clamp(0, ny - 1)
    shifted = torch.cat((torch.zeros_like(tr32[:, :2]), tr32[:, 2:4]), 1)[:, None]  # (m, 1, 4)
    if cfg.bias_match:
        shape = (anchors / torch.tensor([nx, ny], dtype=torch.float32, device=dev))[None].expand(len(b), na, 2)
    else:
        shape = pred32[b, :, gj, gi, 2:4]  # (m, na, 2) the predicted w, h there
    n = _iou(torch.cat((torch.zeros_like(shape), shape), -1), shifted).argmax(1)  # first best, as its strict '>'
    key = ((b * na + n) * ny + gj) * nx + gi
    last = torch.full((bs * na * ny * nx,), -1, dtype=torch.long, device=dev)
    last.scatter_reduce_(0, key, torch.arange(len(key), device=dev), 'amax')
    r = (last[key] == torch.arange(len(key), device=dev)).nonzero(as_tuple=True)[0]  # the last truth of each slot
    b, n, gj, gi, tr = b[r], n[r], gj[r], gi[r], tr[r]
    cell = (b, n, gj, gi)
    s, o = sig[cell], obj[cell]
    anchor = anchors.to(dt)[n]
    txy = torch.stack((tr[:, 0] * nx - gi, tr[:, 1] * ny - gj), 1)
    twh = torch.log(tr[:, 2:4] * torch.tensor([nx, ny], dtype=dt, device=dev) / anchor)
    delta[cell + (slice(0, 2),)] = cfg.coord_scale * ((txy - s) * ((1 - s) * s))
    delta[cell + (slice(2, 4),)] = cfg.coord_scale * (twh - x[cell][:, 2:4])
    target = _iou(pred32[cell].to(dt), tr[:, :4]) if cfg.rescore else 1.0
    delta[cell + (4,)] = cfg.object_scale * (target - o) * ((1 - o) * o)
    delta[cell + (slice(5, None),)] = _class_delta(cfg, cls_out[cell], tr[:, 4].long())
    return delta


def region_cost(delta: torch.Tensor) -> torch.Tensor:
    """Darknet's [region] cost (the squared delta norm), split (4,): box, objectness, class, total."""
    sq = delta * delta
    parts = torch.stack((sq[..., :4].sum(), sq[..., 4].sum(), sq[..., 5:].sum()))
    return torch.cat((parts, parts.sum()[None]))
