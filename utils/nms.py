"""Non-maximum suppression of YOLO inference output: confidence filter, multi-label, batched NMS, merge-NMS.

torchvision is imported where NMS first runs, not at module import: `import torchvision` pulls in torch._dynamo
(about 1.5 s on a 2-core machine), which `--help`, option errors and train.py's start-up need not pay.

Speed on the CPU without touching the process-wide thread count: the confidence filter runs once over the whole
batch, and merge-NMS compares each kept box only with the candidates of its own class (about 6x fewer pairs than
the k x n IoU matrix on coco128), so the per-image tensors stay small.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from utils.boxes import bbox_iou, xywh2xyxy

MIN_WH, MAX_WH = 2, 4096  # (pixels) boxes with a side outside (MIN_WH, MAX_WH) are dropped, as the original
MERGE_MAX = 3000  # as the original: merge-NMS only below this many candidates per image


def candidates(prediction: torch.Tensor, conf_thres: float, multi_label: bool,
               classes: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Detection candidates of a batch (B, N, 5 + nc) [xywh, obj, cls probs] -> (D, 6) [xyxy, conf, cls] and the
    image index (D,) of each row, rows grouped by image.

    conf = objectness x class probability. Rows with objectness > conf_thres and both sides in (MIN_WH, MAX_WH)
    are kept; each (row, class) pair with conf > conf_thres becomes a candidate (multi_label), or only the best
    class of each row. Candidates keep the order of rows, then classes, as the original's per-image loop.
    """
    wh = prediction[..., 2:4]
    rows = (prediction[..., 4] > conf_thres) & ((wh > MIN_WH) & (wh < MAX_WH)).all(-1)  # (B, N) as the original
    img, _ = rows.nonzero(as_tuple=True)  # (M,) image of each kept row, in row-major order
    x = prediction[rows]  # (M, 5 + nc)
    scores = x[:, 5:] * x[:, 4:5]  # (M, nc)
    box = xywh2xyxy(x[:, :4])
    if multi_label:
        i, j = (scores > conf_thres).nonzero(as_tuple=True)
        det = torch.cat((box[i], scores[i, j, None], j[:, None].float()), 1)  # (D, 6)
        img = img[i]
    else:
        conf, j = scores.max(1, keepdim=True)
        ok = conf.view(-1) > conf_thres
        det, img = torch.cat((box, conf, j.float()), 1)[ok], img[ok]
    ok = torch.isfinite(det).all(1)  # a diverged model must not crash NMS
    if classes is not None:
        ok &= (det[:, 5:6] == torch.as_tensor(list(classes), device=det.device, dtype=det.dtype)).any(1)
    return det[ok], img[ok]


def merge_boxes(det: torch.Tensor, keep: torch.Tensor, group: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """Merge-NMS boxes (k, 4): each kept box det[keep] as the score-weighted mean of the same-group candidates
    overlapping it by more than iou_thres (itself included); det (n, 6) [xyxy, conf, cls], group (n,) int."""
    # pairs (kept box, candidate of its group): candidates sorted by group make each group one contiguous run
    order = group.argsort(stable=True)
    counts = torch.bincount(group)
    starts = counts.cumsum(0) - counts
    g = group.index_select(0, keep)  # (k,)
    per_keep = counts.index_select(0, g)  # (k,) candidates each kept box is compared with
    ki = torch.repeat_interleave(torch.arange(len(keep), device=det.device), per_keep)  # (P,) pair -> kept box
    # position of each pair within its kept box's run, plus where that run starts among the sorted candidates
    pos = torch.arange(len(ki), device=det.device) + (starts.index_select(0, g) - per_keep.cumsum(0) + per_keep
                                                     ).repeat_interleave(per_keep)
    cj = order.index_select(0, pos)  # (P,) pair -> candidate
    boxes = det[:, :4]
    bj = boxes.index_select(0, cj)  # (P, 4)
    iou = bbox_iou(boxes.index_select(0, keep).index_select(0, ki), bj)  # (P,)
    w = ((iou > iou_thres) | (cj == keep.index_select(0, ki))) * det[:, 4].index_select(0, cj)  # a kept box
    num = torch.zeros(len(keep), 4, dtype=det.dtype, device=det.device).index_add_(0, ki, w[:, None] * bj)
    den = torch.zeros(len(keep), dtype=det.dtype, device=det.device).index_add_(0, ki, w)  # counts itself
    return num / den[:, None]


def non_max_suppression(prediction: torch.Tensor, conf_thres: float = 0.1, iou_thres: float = 0.6,
                        multi_label: bool = True, classes: Sequence[int] | None = None, agnostic: bool = False,
                        merge: bool = True, max_det: int | None = None,
                        time_limit: float = 10.0) -> list[torch.Tensor]:
    """Per-image NMS of (B, N, 5 + nc) [xywh, obj, cls probs] -> list of (n, 6) [x1, y1, x2, y2, conf, cls].

    Candidates as in `candidates` (classes: keep only these class indices). merge=True replaces each kept box by
    the score-weighted mean of the same-class boxes overlapping it by more than iou_thres (the original's
    merge-NMS, on by default there; it raises mAP). Output rows are sorted by conf.
    Images left when time_limit seconds have passed get no detections (a warning is printed).
    """
    from torchvision.ops import batched_nms  # lazy: see the module docstring

    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres {conf_thres} and iou_thres {iou_thres} must be in [0, 1]")
    bs, nc = prediction.shape[0], prediction.shape[2] - 5
    det, img = candidates(prediction, conf_thres, multi_label and nc > 1, classes)
    # groups never mix images; within an image, classes are kept apart unless agnostic
    group = img if agnostic else img * nc + det[:, 5].long()  # (D,)
    counts = torch.bincount(img, minlength=bs).tolist()
    keeps, t, start = [], time.time(), 0
    for xi, n in enumerate(counts):  # NMS per image: small tensors, so no op here goes multi-threaded on the CPU
        sl = slice(start, start + n)
        keep = batched_nms(det[sl, :4], det[sl, 4], group[sl], iou_thres)[:max_det] + start  # sorted by score
        keeps.append(keep)
        start += n
        if time.time() - t > time_limit:
            print(f"WARNING: NMS time limit {time_limit:.1f}s exceeded after {xi + 1}/{bs} images; "
                  f"the rest get no detections")
            break
    keeps += [keeps[0][:0]] * (bs - len(keeps))
    if merge:  # one merge for the whole batch: few large ops rather than many small ones
        mergeable = [k for k, n in zip(keeps, counts) if 1 < n < MERGE_MAX]
        if mergeable:
            mergeable = torch.cat(mergeable)
            det[mergeable, :4] = merge_boxes(det, mergeable, group, iou_thres)
    return [det[k] for k in keeps]
