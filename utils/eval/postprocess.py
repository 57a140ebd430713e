"""NMS and box rescaling of YOLO inference output in numpy: detect.py's post-processing, whichever runtime ran.

Arrays are float32 numpy throughout; detections are (n, 6) [x1, y1, x2, y2, conf, cls]. non_max_suppression gives
exactly what utils.eval.nms.non_max_suppression gives for the same (B, N, 5 + nc) output and options (same rows, same
order; tests/test_backends.py compares them), without torch: detect.py on an onnxruntime session never imports it,
which alone costs more start-up than 64 images' pre- and post-processing. The float32 operations are those of the
torch path, in the same order (thresholds compared in float32 as torch compares a tensor with a Python float; the
greedy NMS as torchvision's CPU kernel: IoU in float32 compared with the threshold as a double; merge sums added
one pair at a time in candidate order, as index_add_), so the results are equal, not just close.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from utils.logs import LOGGER

# the limits of utils/eval/nms.py (kept equal by tests/test_backends.py)
MIN_WH, MAX_WH = 2, 4096  # (pixels) boxes with a side outside (MIN_WH, MAX_WH) are dropped
MERGE_MAX = 3000  # merge-NMS only below this many candidates per image
VANILLA_NUMEL = 4000  # torchvision's batched_nms on the CPU runs NMS class by class above this many box coordinates


def xywh2xyxy(x: np.ndarray) -> np.ndarray:
    """(n, 4) boxes [x_center, y_center, w, h] -> [x1, y1, x2, y2]."""
    y = np.empty_like(x)
    y[:, 0] = x[:, 0] - x[:, 2] / 2
    y[:, 1] = x[:, 1] - x[:, 3] / 2
    y[:, 2] = x[:, 0] + x[:, 2] / 2
    y[:, 3] = x[:, 1] + x[:, 3] / 2
    return y


def candidates(x: np.ndarray, conf_thres: float, multi_label: bool,
               classes: Sequence[int] | None = None) -> np.ndarray:
    """Candidates of one image (N, 5 + nc) [xywh, obj, cls probs] -> (n, 6) [xyxy, conf, cls], as
    utils.eval.nms.candidates: objectness and size filter, conf = objectness x class probability > conf_thres for each
    (row, class) pair (multi_label) or the best class of each row; rows, then classes, in order."""
    t = np.float32(conf_thres)
    x = x[x[:, 4] > t]
    x = x[((x[:, 2:4] > MIN_WH) & (x[:, 2:4] < MAX_WH)).all(1)]
    scores = x[:, 5:] * x[:, 4:5]  # (m, nc)
    box = xywh2xyxy(x[:, :4])
    if multi_label:
        i, j = (scores > t).nonzero()
        det = np.concatenate((box[i], scores[i, j][:, None], j[:, None].astype(np.float32)), 1)
    else:
        j = scores.argmax(1)  # the first of equal maxima, as torch's max
        conf = scores[np.arange(len(j)), j]
        det = np.concatenate((box, conf[:, None], j[:, None].astype(np.float32)), 1)[conf > t]
    if classes is not None:
        det = det[(det[:, 5:6] == np.asarray(list(classes), dtype=np.float32)).any(1)]
    return det[np.isfinite(det).all(1)]  # a diverged model must not crash NMS


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float) -> np.ndarray:
    """Indices kept by greedy NMS of boxes (n, 4) xyxy, highest score first, as torchvision's CPU nms kernel: a stable
    sort by score, IoU = inter / (area_i + area_j - inter) in float32, suppressed where it exceeds iou_thres (a
    double); a suppressed box suppresses nothing."""
    order = np.argsort(-scores, kind='stable')
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    removed = np.zeros(len(b), dtype=bool)
    keep = []
    for i in range(len(b)):
        if removed[i]:
            continue
        keep.append(i)
        r = slice(i + 1, None)
        w = np.maximum(np.minimum(b[i, 2], b[r, 2]) - np.maximum(b[i, 0], b[r, 0]), np.float32(0))
        h = np.maximum(np.minimum(b[i, 3], b[r, 3]) - np.maximum(b[i, 1], b[r, 1]), np.float32(0))
        inter = w * h
        removed[r] |= (inter / (area[i] + area[r] - inter)).astype(np.float64) > iou_thres
    return order[np.asarray(keep, dtype=np.int64)]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, group: np.ndarray, iou_thres: float) -> np.ndarray:
    """Indices kept by NMS within each group, sorted by decreasing score: torchvision.ops.batched_nms on the CPU
    (groups moved apart by group * (max coordinate + 1) up to VANILLA_NUMEL coordinates, else NMS group by group)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    if boxes.size <= VANILLA_NUMEL:
        offsets = group.astype(np.float32) * (boxes.max() + np.float32(1))
        return greedy_nms(boxes + offsets[:, None], scores, iou_thres)
    kept = np.concatenate([idx[greedy_nms(boxes[idx], scores[idx], iou_thres)]
                           for idx in (np.flatnonzero(group == g) for g in np.unique(group))])
    kept.sort()
    return kept[np.argsort(-scores[kept], kind='stable')]  # torchvision sorts unstably here: ties may differ


def box_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box pairs a[i], b[i] (n, 4) xyxy, as utils.boxes.bbox_iou (eps 1e-16 in the union)."""
    inter = (np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), np.float32(0)) *
             np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), np.float32(0)))
    union = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + np.float32(1e-16)) + \
        (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / union


def merge_boxes(det: np.ndarray, keep: np.ndarray, group: np.ndarray, iou_thres: float) -> np.ndarray:
    """Merge-NMS boxes (k, 4): each kept box det[keep] as the conf-weighted mean of the same-group candidates
    overlapping it by more than iou_thres (itself included), as utils.eval.nms.merge_boxes."""
    pairs = [(np.full(len(c), k), c) for k, c in
             ((k, np.flatnonzero(group == group[keep[k]])) for k in range(len(keep)))]
    ki = np.concatenate([p[0] for p in pairs])  # (P,) pair -> kept box
    cj = np.concatenate([p[1] for p in pairs])  # (P,) pair -> candidate, in index order within the group
    kj = keep[ki]
    iou = box_iou_pairs(det[kj, :4], det[cj, :4])
    w = ((iou > np.float32(iou_thres)) | (cj == kj)) * det[cj, 4]  # a kept box always counts itself
    den = np.zeros(len(keep), dtype=np.float32)
    np.add.at(den, ki, w)  # one pair at a time, in order, as index_add_
    out = np.zeros((len(keep), 4), dtype=np.float32)
    for r in range(4):
        np.add.at(out[:, r], ki, w * det[cj, r])
    return out / den[:, None]


def non_max_suppression(prediction: np.ndarray, conf_thres: float = 0.1, iou_thres: float = 0.6,
                        multi_label: bool = True, classes: Sequence[int] | None = None, agnostic: bool = False,
                        merge: bool = True, max_det: int | None = None,
                        time_limit: float = 10.0) -> list[np.ndarray]:
    """Per-image NMS of (B, N, 5 + nc) [xywh, obj, cls probs] -> list of (n, 6) [x1, y1, x2, y2, conf, cls], sorted
    by conf: utils.eval.nms.non_max_suppression in numpy (same options, same results)."""
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres {conf_thres} and iou_thres {iou_thres} must be in [0, 1]")
    prediction = np.asarray(prediction, dtype=np.float32)
    multi_label &= prediction.shape[2] - 5 > 1
    output = [np.zeros((0, 6), dtype=np.float32) for _ in range(prediction.shape[0])]
    t = time.time()
    for xi, x in enumerate(prediction):  # x: (N, 5 + nc)
        det = candidates(x, conf_thres, multi_label, classes)
        n = det.shape[0]
        if n:
            group = np.zeros(n, dtype=np.int64) if agnostic else det[:, 5].astype(np.int64)
            keep = batched_nms(det[:, :4], det[:, 4], group, iou_thres)[:max_det]
            if merge and 1 < n < MERGE_MAX:
                det[keep, :4] = merge_boxes(det, keep, group, iou_thres)
            output[xi] = det[keep]
        if time.time() - t > time_limit:
            LOGGER.warning(f"NMS time limit {time_limit:.1f}s exceeded after {xi + 1}/{len(output)} images; "
                           f"the rest get no detections")
            break
    return output


def scale_coords(img1_shape: Sequence[int], coords: np.ndarray, img0_shape: Sequence[int]) -> np.ndarray:
    """Rescale xyxy coords (in place) from a letterboxed img1_shape (h, w) back to the original img0_shape (h, w),
    clipped to it, as utils.boxes.scale_coords."""
    gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
    pad = (img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2
    coords[:, [0, 2]] -= np.float32(pad[0])
    coords[:, [1, 3]] -= np.float32(pad[1])
    coords[:, :4] /= np.float32(gain)
    coords[:, [0, 2]] = coords[:, [0, 2]].clip(0, img0_shape[1])
    coords[:, [1, 3]] = coords[:, [1, 3]].clip(0, img0_shape[0])
    return coords
