"""Run a Darknet cfg + weights through OpenCV's Darknet importer and put our model's output in the same layout."""
from __future__ import annotations

import numpy as np
import torch

from models import Darknet


def opencv_outputs(cfg: str, weights: str, img_rgb: np.ndarray) -> list[np.ndarray]:
    """OpenCV (4.x) outputs of each [yolo] layer: rows (grid y, grid x, anchor), cols x y w h (fractions), obj, cls."""
    import cv2
    net = cv2.dnn.readNetFromDarknet(cfg, weights)
    blob = img_rgb.astype(np.float32).transpose(2, 0, 1)[None] / 255
    net.setInput(blob)
    return [o.copy() for o in net.forward(net.getUnconnectedOutLayersNames())]


def ours_in_opencv_layout(model: Darknet, img_rgb: np.ndarray) -> list[np.ndarray]:
    """Our eval output split per [yolo] layer and reordered to OpenCV's layout (class columns = obj * prob)."""
    h, w = img_rgb.shape[:2]
    x = torch.from_numpy(img_rgb.transpose(2, 0, 1).copy()).float()[None] / 255
    model.eval()
    with torch.no_grad():
        io, p = model(x)
    io = io[0]
    outs, start = [], 0
    for pi in p:
        _, na, ny, nx, no = pi.shape
        t = io[start:start + na * ny * nx].view(na, ny, nx, no).permute(1, 2, 0, 3).reshape(-1, no).numpy().copy()
        start += na * ny * nx
        t[:, [0, 2]] /= w
        t[:, [1, 3]] /= h
        t[:, 5:] *= t[:, 4:5]
        outs.append(t)
    return outs


def compare(ours: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Max |a - b| / max(1, |b|) over box/objectness columns and over the class scores OpenCV did not zero;
    also the largest of our class scores where OpenCV reports 0 (its score threshold)."""
    box = cls = below = 0.0
    if len(ours) != len(ref):
        return {'layers': (len(ours), len(ref))}
    for a, b in zip(ours, ref):
        if a.shape != b.shape:
            return {'shape': (a.shape, b.shape)}
        box = max(box, float((np.abs(a[:, :5] - b[:, :5]) / np.maximum(1, np.abs(b[:, :5]))).max()))
        kept = b[:, 5:] != 0
        if kept.any():
            cls = max(cls, float(np.abs(a[:, 5:][kept] - b[:, 5:][kept]).max()))
        if (~kept).any():
            below = max(below, float(a[:, 5:][~kept].max()))
    return {'box_obj': box, 'cls': cls, 'max_zeroed': below}


def randomize(model: Darknet, seed: int = 0) -> None:
    """Random weights that keep activations in a useful range through deep nets (He-scaled, random BN stats)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
