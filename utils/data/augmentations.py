"""Image augmentations that move boxes with the pixels: letterbox, mosaic, random affine, HSV, flip.

Images are HWC uint8 BGR numpy arrays (OpenCV order) throughout; boxes are (n, 5) float arrays
[class, x1, y1, x2, y2] in pixels of the image they belong to. The random ones draw from the numpy Generator they are
given (the training dataset seeds one per sample from (seed, epoch, k)), never from the process-global random or
np.random, so a sample is augmented the same in whichever worker or process loads it.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

PAD_COLOR = (114, 114, 114)  # grey padding for letterbox, mosaic canvas and affine borders


def letterbox(img: np.ndarray, new_shape: int | Sequence[int] = 416, color: tuple = PAD_COLOR, auto: bool = True,
              scaleFill: bool = False, scaleup: bool = True, stride: int = 64
              ) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping the aspect ratio and pad to new_shape (h, w); return (img, (rw, rh) ratio, (dw, dh) padding).

    auto pads only to the next multiple of `stride` (a minimum rectangle); scaleFill stretches without padding;
    scaleup=False never enlarges (better test mAP). dw, dh are the padding per side (left, top), possibly .5.
    """
    shape = img.shape[:2]  # (h, w)
    if isinstance(new_shape, (int, np.integer)):
        new_shape = (int(new_shape), int(new_shape))
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    ratio = r, r
    new_unpad = int(round(shape[1] * r)), int(round(shape[0] * r))  # (w, h)
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:  # as the original: the minimum rectangle pads to a multiple of 64, not of the model stride 32
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    elif scaleFill:
        dw, dh = 0, 0
        new_unpad = (new_shape[1], new_shape[0])
        ratio = new_shape[1] / shape[1], new_shape[0] / shape[0]
    dw, dh = float(dw) / 2, float(dh) / 2  # split the padding between the two sides
    if shape[::-1] != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return img, ratio, (dw, dh)


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    """The given generator, or a fresh unseeded one."""
    return np.random.default_rng() if rng is None else rng


def augment_hsv(img: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5,
                rng: np.random.Generator | None = None) -> None:
    """Scale hue, saturation and value of a BGR uint8 image by random gains in [1 - gain, 1 + gain], in place,
    through one lookup table."""
    r = _rng(rng).uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1  # random gains
    x = np.arange(256, dtype=np.float32)
    lut = np.empty((256, 1, 3), dtype=np.uint8)  # one table per HSV channel, applied in a single cv2.LUT call
    lut[:, 0, 0] = (x * r[0] % 180).astype(np.uint8)  # OpenCV hue is 0..179 and wraps around
    lut[:, 0, 1] = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut[:, 0, 2] = np.clip(x * r[2], 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    cv2.cvtColor(cv2.LUT(hsv, lut), cv2.COLOR_HSV2BGR, dst=img)


def affine_matrix(shape: Sequence[int], degrees: float = 10, translate: float = 0.1, scale: float = 0.1,
                  shear: float = 10, border: int = 0, rng: np.random.Generator | None = None
                  ) -> tuple[np.ndarray, float]:
    """Draw the original's random 3x3 affine M = Shear @ Translate @ RotateScale for an image of shape (h, w).

    Returns (M, s) with s the drawn scale factor (the box filter uses it).
    """
    h, w = shape[0], shape[1]
    # one draw of the six values: rotation, scale, x and y translation, x and y shear
    a, s, tx, ty, sx, sy = _rng(rng).uniform(-1, 1, 6) * [degrees, scale, translate, translate, shear, shear]
    s = float(1 + s)
    R = np.eye(3)
    R[:2] = cv2.getRotationMatrix2D(angle=float(a), center=(w / 2, h / 2), scale=s)
    T = np.eye(3)
    # as the original: x translation scales with the image height and y with the width (equal for square images)
    T[0, 2] = tx * h + border
    T[1, 2] = ty * w + border
    S = np.eye(3)
    S[0, 1] = math.tan(sx * math.pi / 180)
    S[1, 0] = math.tan(sy * math.pi / 180)
    return S @ T @ R, s


def warp_boxes(boxes: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Transform (n, 4) xyxy boxes by the 3x3 affine M; return the (n, 4) xyxy boxes enclosing the warped corners."""
    n = len(boxes)
    xy = np.ones((n * 4, 3))
    xy[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)  # corners x1y1, x2y2, x1y2, x2y1
    xy = (xy @ M.T)[:, :2].reshape(n, 8)
    x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
    return np.stack((x.min(1), y.min(1), x.max(1), y.max(1)), 1)


# the original's rule (random_affine in its utils/data/datasets.py): a warped box is kept when it is more than 4 px wide and
# high, keeps more than 20% of its area and has an aspect ratio under 10
BOX_MIN_WH = 4.0  # px, strict: a box exactly 4 px wide is dropped
BOX_MIN_AREA_RATIO = 0.2
BOX_MAX_ASPECT = 10.0  # strict: an aspect ratio of exactly 10 is dropped


def box_candidates(box0: np.ndarray, box1: np.ndarray, s: float) -> np.ndarray:
    """Boolean mask of warped (n, 4) xyxy boxes box1 to keep, given the boxes box0 before the warp and its scale s.

    Kept: > 4 px wide and high, > 20% of the area, aspect ratio < 10 (the original's thresholds).
    """
    w0, h0 = box0[:, 2] - box0[:, 0], box0[:, 3] - box0[:, 1]
    w, h = box1[:, 2] - box1[:, 0], box1[:, 3] - box1[:, 1]
    ar = np.maximum(w / (h + 1e-16), h / (w + 1e-16))
    # as the original: the area ratio divides by s (not s**2)
    return ((w > BOX_MIN_WH) & (h > BOX_MIN_WH) & (w * h / (w0 * h0 * s + 1e-16) > BOX_MIN_AREA_RATIO)
            & (ar < BOX_MAX_ASPECT))


def random_affine(img: np.ndarray, targets: np.ndarray | None = None, degrees: float = 10, translate: float = 0.1,
                  scale: float = 0.1, shear: float = 10, border: int = 0, rng: np.random.Generator | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Rotate, scale, translate and shear img and its (n, 5) [cls, x1, y1, x2, y2] targets together.

    The output is (h + 2 * border, w + 2 * border); a negative border crops (the mosaic uses -size // 2).
    Boxes are clipped to the output and dropped when mostly gone (see box_candidates).
    """
    targets = np.zeros((0, 5), dtype=np.float32) if targets is None else targets
    height, width = img.shape[0] + border * 2, img.shape[1] + border * 2
    M, s = affine_matrix(img.shape, degrees, translate, scale, shear, border, rng)
    if np.allclose(M[:2, :2], np.eye(2)) and np.allclose(M[:2, 2], np.round(M[:2, 2])):
        img = _shift(img, int(round(M[0, 2])), int(round(M[1, 2])), width, height)  # exact, no interpolation
    elif border != 0 or not np.allclose(M, np.eye(3)):
        img = cv2.warpAffine(img, M[:2], dsize=(width, height), flags=cv2.INTER_LINEAR, borderValue=PAD_COLOR)
    if len(targets):
        xy = warp_boxes(targets[:, 1:5], M)
        xy[:, [0, 2]] = xy[:, [0, 2]].clip(0, width)
        xy[:, [1, 3]] = xy[:, [1, 3]].clip(0, height)
        keep = box_candidates(targets[:, 1:5], xy, s)
        targets = targets[keep]
        targets[:, 1:5] = xy[keep]
    return img, targets


def _shift(img: np.ndarray, tx: int, ty: int, width: int, height: int) -> np.ndarray:
    """Translate img by whole pixels (tx, ty) into a (height, width) grey canvas: warpAffine's result, by copying."""
    out = np.full((height, width, img.shape[2]), PAD_COLOR[0], dtype=img.dtype)
    x1, y1 = max(tx, 0), max(ty, 0)  # destination corner
    x2, y2 = min(tx + img.shape[1], width), min(ty + img.shape[0], height)
    if x2 > x1 and y2 > y1:
        out[y1:y2, x1:x2] = img[y1 - ty:y2 - ty, x1 - tx:x2 - tx]
    return out


def combine_mosaic(imgs: Sequence[np.ndarray], labels: Sequence[np.ndarray], s: int, xc: int, yc: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Place four images around the centre (xc, yc) of a (2s, 2s) grey canvas: top-left, top-right, bottom-left,
    bottom-right. labels[i] is (n, 5) [cls, x, y, w, h] normalised to imgs[i]; returns (canvas, (m, 5) xyxy labels
    in canvas pixels, clipped to the canvas)."""
    img4 = np.full((s * 2, s * 2, imgs[0].shape[2]), PAD_COLOR[0], dtype=np.uint8)
    out = []
    for i, (img, x) in enumerate(zip(imgs, labels)):
        h, w = img.shape[:2]
        if i == 0:  # top left: the image's bottom-right corner at the centre
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
        elif i == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, s * 2), yc
            x1b, y1b = 0, h - (y2a - y1a)
        elif i == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(s * 2, yc + h)
            x1b, y1b = w - (x2a - x1a), 0
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, s * 2), min(s * 2, yc + h)
            x1b, y1b = 0, 0
        img4[y1a:y2a, x1a:x2a] = img[y1b:y1b + (y2a - y1a), x1b:x1b + (x2a - x1a)]
        padw, padh = x1a - x1b, y1a - y1b  # canvas position of the image's top-left corner
        if len(x):
            b = np.empty((len(x), 5), dtype=np.float32)
            b[:, 0] = x[:, 0]
            b[:, 1] = w * (x[:, 1] - x[:, 3] / 2) + padw
            b[:, 2] = h * (x[:, 2] - x[:, 4] / 2) + padh
            b[:, 3] = w * (x[:, 1] + x[:, 3] / 2) + padw
            b[:, 4] = h * (x[:, 2] + x[:, 4] / 2) + padh
            out.append(b)
    labels4 = np.concatenate(out, 0) if out else np.zeros((0, 5), dtype=np.float32)
    np.clip(labels4[:, 1:], 0, 2 * s, out=labels4[:, 1:])
    return img4, labels4
