"""Non-maximum suppression of YOLO inference output: confidence filter, multi-label, batched NMS, merge-NMS."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Sequence

import torch

from utils.boxes import batched_nms, box_iou, xywh2xyxy

MIN_WH, MAX_WH = 2, 4096  # (pixels) boxes with a side outside (MIN_WH, MAX_WH) are dropped, as the original


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch CPU ops single-threaded inside the block.

    NMS works on many small tensors: intra-op threads only add synchronisation, which on a busy 2-core machine
    made NMS 20-50x slower (1.4 s instead of 25 ms for 16 images). The setting is restored on exit.
    """
    if device.type != 'cpu' or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def non_max_suppression(prediction: torch.Tensor, conf_thres: float = 0.1, iou_thres: float = 0.6,
                        multi_label: bool = True, classes: Sequence[int] | None = None, agnostic: bool = False,
                        merge: bool = True, max_det: int | None = None,
                        time_limit: float = 10.0) -> list[torch.Tensor]:
    """Per-image NMS of (B, N, 5 + nc) [xywh, obj, cls probs] -> list of (n, 6) [x1, y1, x2, y2, conf, cls].

    conf = objectness x class probability. Candidates are first filtered by objectness > conf_thres, then each
    (box, class) pair with conf > conf_thres becomes a detection (multi_label) or only the best class of each box.
    merge=True replaces each kept box by the score-weighted mean of the same-class boxes overlapping it by more than
    iou_thres (the original's merge-NMS, on by default there; it raises mAP). Output rows are sorted by conf.
    Images left when time_limit seconds have passed get no detections (a warning is printed).
    """
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres {conf_thres} and iou_thres {iou_thres} must be in [0, 1]")
    nc = prediction.shape[2] - 5
    multi_label &= nc > 1
    device = prediction.device
    output = [torch.zeros((0, 6), device=device) for _ in range(prediction.shape[0])]
    class_filter = None if classes is None else torch.as_tensor(list(classes), device=device)
    with _one_cpu_thread(device):
        t = time.time()
        for xi, x in enumerate(prediction):  # x: (N, 5 + nc)
            # confidence filter first: at conf 0.001 it leaves a small share of the N rows for the rest
            x = x[x[:, 4] > conf_thres]
            # as the original: tiny (<= 2 px) and huge boxes are dropped before NMS
            x = x[((x[:, 2:4] > MIN_WH) & (x[:, 2:4] < MAX_WH)).all(1)]
            if not x.shape[0]:
                continue
            scores_all = x[:, 5:] * x[:, 4:5]  # (n, nc) conf = obj_conf * cls_conf
            box = xywh2xyxy(x[:, :4])
            if multi_label:
                i, j = (scores_all > conf_thres).nonzero(as_tuple=True)
                det = torch.cat((box[i], scores_all[i, j, None], j[:, None].float()), 1)
            else:
                conf, j = scores_all.max(1, keepdim=True)
                det = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
            if class_filter is not None:
                det = det[(det[:, 5:6] == class_filter).any(1)]
            det = det[torch.isfinite(det).all(1)]  # a diverged model must not crash NMS
            n = det.shape[0]
            if not n:
                continue

            group = torch.zeros_like(det[:, 5]) if agnostic else det[:, 5]
            keep = batched_nms(det[:, :4], det[:, 4], group.long(), iou_thres)  # sorted by score
            if merge and 1 < n < 3000:  # as the original: merge only below 3000 candidates (memory of the n x n IoU)
                iou = box_iou(det[keep, :4], det[:, :4])  # (k, n)
                same = group[keep, None] == group[None]  # IoU only counts within a class (unless agnostic)
                mask = (iou > iou_thres) & same
                mask[torch.arange(len(keep), device=device), keep] = True  # a kept box always counts itself
                weights = mask * det[None, :, 4]  # (k, n)
                det[keep, :4] = (weights @ det[:, :4]) / weights.sum(1, keepdim=True)
            if max_det is not None:
                keep = keep[:max_det]
            output[xi] = det[keep]
            if time.time() - t > time_limit:
                print(f"WARNING: NMS time limit {time_limit:.1f}s exceeded after {xi + 1}/{len(prediction)} images; "
                      f"the rest get no detections")
                break
    return output
