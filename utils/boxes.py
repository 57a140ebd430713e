"""Box format conversions, IoU variants and coordinate rescaling shared by loss, metrics, data and detect."""
from __future__ import annotations

import math
from typing import Sequence

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


def decode_yolo_box(p: torch.Tensor, anchors: torch.Tensor, scale_x_y: float = 1.0,
                    grid: torch.Tensor | None = None, max_wh_scale: float | None = None, new_coords: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Darknet's [yolo] box decode of raw outputs p (..., >= 4): (xy, wh): xy in grid cells, wh in the anchors' units.

    xy = sigmoid(t) * scale_x_y - (scale_x_y - 1) / 2 (+ grid), the offset in the cell (or the cell position with
    grid); wh = exp(t) * anchors. With new_coords (Scaled-YOLOv4, YOLOv7: get_yolo_box in yolo_layer.c) the head's
    convolution already applied the logistic, so Darknet applies none: xy = t * scale_x_y - (scale_x_y - 1) / 2 and
    wh = 4 * t^2 * anchors. YOLOLayer (inference) and the losses both decode through this, so training optimises the
    boxes inference reports. max_wh_scale clamps exp(t) (the original loss's overflow guard).
    """
    t = p[..., :2] if new_coords else torch.sigmoid(p[..., :2])
    xy = t * scale_x_y - 0.5 * (scale_x_y - 1)
    if grid is not None:
        xy = xy + grid
    scale = 4 * p[..., 2:4] ** 2 if new_coords else torch.exp(p[..., 2:4])
    if max_wh_scale is not None:
        scale = scale.clamp(max=max_wh_scale)
    return xy, scale * anchors


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
