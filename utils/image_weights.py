"""Class-balanced image sampling (train.py --image-weights), the original's scheme: each epoch, images are drawn with
replacement in proportion to how much of the rare and poorly detected classes they hold."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from utils.samplers import EpochSampler


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


def draw_image_indices(weights: np.ndarray, k: int, seed: int, epoch: int) -> np.ndarray:
    """k image indices drawn with replacement in proportion to weights, from a generator seeded by (seed, epoch) alone,
    so every DDP rank and a resumed run draw the same ones (uniform when all weights are 0)."""
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f'image weights must be finite and non-negative, got min {w.min()}, max {w.max()}')
    p = w / w.sum() if w.sum() > 0 else None
    return np.random.default_rng([seed, epoch]).choice(len(w), size=k, replace=True, p=p)


class WeightedImageSampler(EpochSampler):
    """Each epoch n indices (n images) drawn with draw_image_indices from the weights given by set_weights; under DDP
    every rank draws the same n (padded to a multiple of num_replicas by repeating from the start) and takes every
    num_replicas-th from its rank, as DistributedSampler shards. Yields SampleKey(epoch, k, index) with k the
    position in the draw, so two draws of one image are augmented differently. Call set_weights and set_epoch before
    each epoch (set_start to resume inside one)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, batch_size: int = 1):
        super().__init__(math.ceil(n / num_replicas), batch_size, num_replicas, rank, seed)
        self.n = n
        self.weights = np.ones(n)

    def set_weights(self, weights: np.ndarray) -> None:
        """The image weights of the coming epoch, (n,)."""
        if len(weights) != self.n:
            raise ValueError(f'{len(weights)} image weights for {self.n} images')
        self.weights = np.asarray(weights, dtype=np.float64)

    def epoch_indices(self) -> np.ndarray:
        """This epoch's whole draw, the same on every rank: (num_samples * num_replicas,)."""
        idx = draw_image_indices(self.weights, self.n, self.seed, self.epoch)
        return np.resize(idx, self.num_samples * self.num_replicas)  # padded by repeating from the start

    def epoch_order(self) -> tuple[np.ndarray, int]:
        """(the draw, 1): dealt image by image."""
        return self.epoch_indices(), 1
