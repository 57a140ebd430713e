"""Non-maximum suppression of YOLO inference output: confidence filter, multi-label, batched NMS, merge-NMS.

torchvision is imported where NMS first needs it, not at module import: `import torchvision` pulls in torch._dynamo
(slow: benchmarks/README.md), which `--help`, option errors and train.py's start-up need not pay. Images
with at most SMALL candidates (detect.py's at its default conf) go through select_small, which keeps exactly what
torchvision's batched_nms keeps, so detect.py never imports it on ordinary images; larger sets (test.py's conf
0.001) use torchvision. test.py calls `import_in_background()` first, so that import overlaps its model loading.

Speed on the CPU without touching the process-wide thread count: torch runs a CPU op on several threads when it
has more than 32768 elements, and some ops at any size (indexing by a boolean mask or an index tensor,
repeat_interleave); on a busy machine (test.py's loader workers on few cores) each such op waits for a core, and NMS
is hundreds of small ops. So NMS works image by image, selects with index_select, and
cuts its work into pieces of at most GRAIN elements: rows of candidates, and pairs of merge-NMS, which compares
each kept box only with the candidates of its own class (far fewer pairs than the k x n IoU matrix), one coordinate
at a time. Timings: benchmarks/README.md.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Sequence

import numpy as np
import torch

from utils.boxes import bbox_iou, xywh2xyxy
from utils.logs import LOGGER

MIN_WH, MAX_WH = 2, 4096  # (pixels) boxes with a side outside (MIN_WH, MAX_WH) are dropped
MERGE_MAX = 3000  # merge-NMS only below this many candidates per image
GRAIN = 32768  # torch's at::internal::GRAIN_SIZE: elementwise CPU ops below this many elements run on one thread
SMALL = 64  # up to this many candidates per image (detect.py at conf 0.3: at most 39 on coco128), select_small() keeps
# exactly what torchvision.ops.batched_nms keeps, as fast, without importing torchvision (a second of start-up)


def _import_torchvision_ops() -> None:
    try:
        import torchvision.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - non_max_suppression's own import raises it where it matters
        pass


def import_in_background() -> threading.Thread | None:
    """Start importing torchvision.ops in a daemon thread unless it is loaded, and return the thread; NMS's import
    then waits for it (the import system's module lock), so the one-off import runs beside the caller's model
    loading and first images."""
    if 'torchvision.ops' in sys.modules:
        return None
    thread = threading.Thread(target=_import_torchvision_ops, name='import torchvision', daemon=True)
    thread.start()
    return thread


def _rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x[mask] for a boolean row mask, through index_select: see the module docstring."""
    return x.index_select(0, mask.nonzero().view(-1))


def candidates(x: torch.Tensor, conf_thres: float, multi_label: bool,
               classes: Sequence[int] | None = None) -> torch.Tensor:
    """Detection candidates of one image (N, 5 + nc) [xywh, obj, cls probs] -> (n, 6) [xyxy, conf, cls].

    conf = objectness x class probability. Rows with objectness > conf_thres and both sides in (MIN_WH, MAX_WH)
    are kept; each (row, class) pair with conf > conf_thres becomes a candidate (multi_label), or only the best
    class of each row. Candidates keep the order of rows, then classes.
    """
    x = _rows(x, x[:, 4] > conf_thres)  # first: at conf 0.001 it leaves a few hundred of the N rows
    x = _rows(x, ((x[:, 2:4] > MIN_WH) & (x[:, 2:4] < MAX_WH)).all(1))  # tiny and huge boxes dropped
    dets = [_row_candidates(c, conf_thres, multi_label) for c in x.split(max(1, GRAIN // x.shape[1]))]
    det = torch.cat(dets) if dets else x.new_zeros(0, 6)
    if classes is not None:
        det = _rows(det, (det[:, 5:6] == torch.as_tensor(list(classes), device=det.device, dtype=det.dtype)).any(1))
    return _rows(det, torch.isfinite(det).all(1))  # a diverged model must not crash NMS


def _row_candidates(x: torch.Tensor, conf_thres: float, multi_label: bool) -> torch.Tensor:
    """candidates() of rows (m, 5 + nc) already filtered by objectness and size."""
    scores = x[:, 5:] * x[:, 4:5]  # (m, nc)
    box = xywh2xyxy(x[:, :4])
    if multi_label:
        i, j = (scores > conf_thres).nonzero(as_tuple=True)
        conf = scores.view(-1).index_select(0, i * scores.shape[1] + j)  # scores[i, j]
        return torch.cat((box.index_select(0, i), conf[:, None], j[:, None].float()), 1)
    conf, j = scores.max(1, keepdim=True)
    return _rows(torch.cat((box, conf, j.float()), 1), conf.view(-1) > conf_thres)


def merge_boxes(det: torch.Tensor, keep: torch.Tensor, group: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """Merge-NMS boxes (k, 4): each kept box det[keep] as the score-weighted mean of the same-group candidates
    overlapping it by more than iou_thres (itself included); det (n, 6) [xyxy, conf, cls], group (n,) int."""
    # candidates sorted by group make each group one contiguous run of `order`
    order = group.argsort(stable=True)
    counts = torch.bincount(group)
    starts = counts.cumsum(0) - counts
    g = group.index_select(0, keep)  # (k,)
    per_keep = counts.index_select(0, g)  # (k,) candidates each kept box is compared with (n < MERGE_MAX < GRAIN)
    cols = det[:, :5].t().contiguous()  # (5, n) x1, y1, x2, y2, conf
    pieces, a, size = [], 0, 0
    for b, c in enumerate(per_keep.tolist() + [GRAIN]):  # kept boxes in pieces of at most GRAIN pairs
        if size + c > GRAIN:
            pieces.append(_merge_piece(cols, order, keep[a:b], starts.index_select(0, g[a:b]), per_keep[a:b],
                                       iou_thres))
            a, size = b, 0
        size += c
    return torch.cat(pieces)


def _merge_piece(cols: torch.Tensor, order: torch.Tensor, keep: torch.Tensor, start: torch.Tensor,
                 per_keep: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """merge_boxes for kept boxes keep (k,) whose same-group candidates are order[start:start + per_keep]."""
    first = per_keep.cumsum(0) - per_keep  # (k,) first pair of each kept box; never-empty runs (itself)
    k, p = len(keep), int(per_keep.sum())
    ki = keep.new_zeros(p).index_fill_(0, first[1:], 1).cumsum(0)  # (P,) pair -> kept box
    cj = order.index_select(0, torch.arange(p, device=keep.device) + (start - first).index_select(0, ki))  # (P,)
    kj = keep.index_select(0, ki)  # (P,) pair -> kept box's candidate index
    bk, bj = cols.new_empty(4, p), cols.new_empty(4, p)  # pair boxes gathered one coordinate at a time
    for r in range(4):
        torch.index_select(cols[r], 0, kj, out=bk[r])
        torch.index_select(cols[r], 0, cj, out=bj[r])
    iou = bbox_iou(bk.t(), bj.t())  # (P,)
    w = ((iou > iou_thres) | (cj == kj)) * cols[4].index_select(0, cj)  # (P,) a kept box always counts itself
    den = cols.new_zeros(k).index_add_(0, ki, w)
    return torch.stack([cols.new_zeros(k).index_add_(0, ki, w * bj[r]) for r in range(4)], 1) / den[:, None]


def select_small(boxes: torch.Tensor, scores: torch.Tensor, group: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """Indices kept by greedy NMS of a few hundred boxes (n, 4) xyxy, highest score first: the result of
    torchvision.ops.batched_nms, whose CPU path for n <= 1000 this repeats step by step in numpy (groups moved apart
    by group * (max coordinate + 1), scores sorted stably, IoU = inter / (area_i + area_j - inter) in float32,
    suppressed where it exceeds iou_thres as a double)."""
    if boxes.shape[0] == 0:
        return group.new_zeros(0)
    b = boxes.detach().float().cpu().numpy()
    grp = group.cpu().numpy().astype(np.float32)
    order = np.argsort(-scores.detach().float().cpu().numpy(), kind='stable')
    b = (b + (grp * (b.max() + np.float32(1)))[:, None])[order]  # (n, 4) in score order
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h  # (n, n)
    over = np.triu((inter / (area[:, None] + area[None, :] - inter)).astype(np.float64) > iou_thres, 1)
    removed = np.zeros(len(b), dtype=bool)  # a box suppresses only those after it in score order
    keep = []
    for i in range(len(b)):
        if not removed[i]:
            keep.append(i)
            removed |= over[i]
    return torch.from_numpy(order[keep]).to(group.device)


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
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres {conf_thres} and iou_thres {iou_thres} must be in [0, 1]")
    multi_label &= prediction.shape[2] - 5 > 1
    output = [torch.zeros((0, 6), device=prediction.device) for _ in range(prediction.shape[0])]
    t = time.time()
    for xi, x in enumerate(prediction):  # x: (N, 5 + nc)
        det = candidates(x, conf_thres, multi_label, classes)
        n = det.shape[0]
        if n:
            group = det.new_zeros(n, dtype=torch.long) if agnostic else det[:, 5].long()
            if n <= SMALL:
                keep = select_small(det[:, :4], det[:, 4], group, iou_thres)[:max_det]  # (k,) sorted by score
            else:
                from torchvision.ops import (
                    batched_nms,  # lazy: see the module docstring
                )
                keep = batched_nms(det[:, :4], det[:, 4], group, iou_thres)[:max_det]
            if merge and 1 < n < MERGE_MAX:
                det[keep, :4] = merge_boxes(det, keep, group, iou_thres)
            output[xi] = det.index_select(0, keep)
        if time.time() - t > time_limit:
            LOGGER.warning(f"NMS time limit {time_limit:.1f}s exceeded after {xi + 1}/{len(output)} images; "
                           f"the rest get no detections")
            break
    return output
