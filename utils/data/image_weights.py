"""Class-balanced image weights (train.py --image-weights), the original's scheme: each epoch, images are drawn with
replacement in proportion to how much of the rare and poorly detected classes they hold. The draw itself is
utils.data.samplers.WeightedImageSampler's."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def labels_to_class_weights(labels: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """(nc,) weights summing to 1, inversely proportional to each class's box count in labels ((n, 5) rows
    [class, x, y, w, h] per image); a class without boxes counts as one box."""
    classes = np.concatenate([lb[:, 0] for lb in labels]).astype(np.int64) if len(labels) else np.zeros(0, np.int64)
    counts = np.bincount(classes, minlength=nc).astype(np.float64)[:nc]
    counts[counts == 0] = 1
    weights = 1.0 / counts
    return weights / weights.sum()


def labels_to_image_weights(labels: Sequence[np.ndarray], nc: int, class_weights: np.ndarray) -> np.ndarray:
    """(n,) weight of each image: the sum of class_weights over its boxes (an image without boxes weighs 0)."""
    counts = np.stack([np.bincount(lb[:, 0].astype(np.int64), minlength=nc)[:nc] for lb in labels])  # (n, nc)
    return counts @ np.asarray(class_weights, dtype=np.float64)


def epoch_image_weights(labels: Sequence[np.ndarray], nc: int, maps: np.ndarray | None) -> np.ndarray:
    """The original's per-epoch image weights: class weights times (1 - per-class mAP) ** 2, summed per image
    (maps None before the first test: class weights alone)."""
    w = labels_to_class_weights(labels, nc)
    if maps is not None:
        w = w * (1.0 - np.asarray(maps, dtype=np.float64)) ** 2
    return labels_to_image_weights(labels, nc, w)
