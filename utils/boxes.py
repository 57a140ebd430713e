"""Box format conversions, IoU variants and coordinate rescaling shared by loss, metrics, data and detect."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch


def xyxy2xywh(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Convert (n, 4) boxes from [x1, y1, x2, y2] to [x_center, y_center, w, h]."""
    y = x.clone() if isinstance(x, torch.Tensor) else np.copy(x)
    y[:, 0] = (x[:, 0] + x[:, 2]) / 2
    y[:, 1] = (x[:, 1] + x[:, 3]) / 2
    y[:, 2] = x[:, 2] - x[:, 0]
    y[:, 3] = x[:, 3] - x[:, 1]
    return y


def xywh2xyxy(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Convert (n, 4) boxes from [x_center, y_center, w, h] to [x1, y1, x2, y2]."""
    y = x.clone() if isinstance(x, torch.Tensor) else np.copy(x)
    y[:, 0] = x[:, 0] - x[:, 2] / 2
    y[:, 1] = x[:, 1] - x[:, 3] / 2
    y[:, 2] = x[:, 0] + x[:, 2] / 2
    y[:, 3] = x[:, 1] + x[:, 3] / 2
    return y


def box_iou(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (n, 4) x (m, 4) -> (n, m) (the formula of torchvision.ops.box_iou)."""
    area1 = (box1[:, 2] - box1[:, 0]) * (box1[:, 3] - box1[:, 1])
    area2 = (box2[:, 2] - box2[:, 0]) * (box2[:, 3] - box2[:, 1])
    lt = torch.max(box1[:, None, :2], box2[:, :2])  # (n, m, 2)
    rb = torch.min(box1[:, None, 2:], box2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    return inter / (area1[:, None] + area2 - inter)


_NMS: Callable | None = None


def _nms_kernel() -> Callable:
    """torchvision's compiled NMS operator (torch.ops.torchvision.nms).

    Loaded from torchvision's extension library directly: `import torchvision` pulls in torch._dynamo, sympy and the
    model zoo, about 1.1-1.3 s of every test/detect/train start-up on a 2-core machine, for this one kernel.
    Falls back to importing torchvision where the library cannot be found.
    """
    global _NMS
    if _NMS is None:
        try:
            _NMS = torch.ops.torchvision.nms  # registered already (torchvision imported elsewhere)
        except (AttributeError, RuntimeError):
            spec = importlib.util.find_spec('torchvision')
            folder = Path(spec.origin).parent if spec and spec.origin else None
            libs = sorted(folder.glob('_C*.so')) + sorted(folder.glob('_C*.pyd')) if folder else []
            try:
                torch.ops.load_library(str(libs[0]))
                _NMS = torch.ops.torchvision.nms
            except (IndexError, OSError, RuntimeError, AttributeError):
                import torchvision
                _NMS = torchvision.ops.nms
    return _NMS


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """Indices of the xyxy boxes (n, 4) kept by NMS within each group, by decreasing score (torchvision's
    batched_nms: boxes of different groups are offset apart so one NMS call never lets them suppress each other)."""
    nms = _nms_kernel()
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if boxes.shape[0] <= (1000 if boxes.device.type == 'cpu' else 5000):  # one call is cheapest for few boxes
        offsets = groups.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_thres)
    # many boxes: NMS is quadratic, so one call per group is faster (torchvision switches at the same sizes)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for g in torch.unique(groups):
        idx = torch.where(groups == g)[0]
        keep[idx[nms(boxes[idx], scores[idx], iou_thres)]] = True
    kept = torch.where(keep)[0]
    return kept[scores[kept].argsort(descending=True, stable=True)]


def bbox_iou(box1: torch.Tensor, box2: torch.Tensor, x1y1x2y2: bool = True,
             giou: bool = False, diou: bool = False, ciou: bool = False, eps: float = 1e-16) -> torch.Tensor:
    """Element-wise IoU (or GIoU/DIoU/CIoU) of box1 (4,) or (n, 4) against box2 (n, 4); returns (n,)."""
    box2 = box2.t()
    box1 = box1.t()
    if x1y1x2y2:
        b1_x1, b1_y1, b1_x2, b1_y2 = box1[0], box1[1], box1[2], box1[3]
        b2_x1, b2_y1, b2_x2, b2_y2 = box2[0], box2[1], box2[2], box2[3]
    else:  # xywh -> xyxy
        b1_x1, b1_x2 = box1[0] - box1[2] / 2, box1[0] + box1[2] / 2
        b1_y1, b1_y2 = box1[1] - box1[3] / 2, box1[1] + box1[3] / 2
        b2_x1, b2_x2 = box2[0] - box2[2] / 2, box2[0] + box2[2] / 2
        b2_y1, b2_y2 = box2[1] - box2[3] / 2, box2[1] + box2[3] / 2

    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * \
            (torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(0)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1
    union = (w1 * h1 + eps) + w2 * h2 - inter
    iou = inter / union
    if not (giou or diou or ciou):
        return iou
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)  # width of the smallest enclosing box
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    if giou:
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    c2 = cw ** 2 + ch ** 2 + eps  # squared diagonal of the enclosing box
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    if diou:
        return iou - rho2 / c2
    v = (4 / math.pi ** 2) * torch.pow(torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps)), 2)
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return iou - (rho2 / c2 + v * alpha)


def wh_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes given only by width and height, as if sharing a centre: (n, 2) x (m, 2) -> (n, m)."""
    wh1 = wh1[:, None]  # (n, 1, 2)
    wh2 = wh2[None]  # (1, m, 2)
    inter = torch.min(wh1, wh2).prod(2)
    return inter / (wh1.prod(2) + wh2.prod(2) - inter)


def clip_coords(boxes: torch.Tensor | np.ndarray, img_shape: Sequence[int]) -> None:
    """Clip xyxy boxes in place to an image of shape (h, w)."""
    h, w = img_shape[0], img_shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[:, 0].clamp_(0, w)
        boxes[:, 1].clamp_(0, h)
        boxes[:, 2].clamp_(0, w)
        boxes[:, 3].clamp_(0, h)
    else:
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)


def scale_coords(img1_shape: Sequence[int], coords: torch.Tensor, img0_shape: Sequence[int],
                 ratio_pad: tuple | None = None) -> torch.Tensor:
    """Rescale xyxy coords (in place) from a letterboxed img1_shape (h, w) back to the original img0_shape."""
    if ratio_pad is None:  # derive gain and padding from the two shapes, as letterbox() made them
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = (img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain = ratio_pad[0][0]
        pad = ratio_pad[1]
    coords[:, [0, 2]] -= pad[0]
    coords[:, [1, 3]] -= pad[1]
    coords[:, :4] /= gain
    clip_coords(coords, img0_shape)
    return coords
