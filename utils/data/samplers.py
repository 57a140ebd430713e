"""Training samplers whose epoch order, DDP shard and resume point depend on (seed, epoch) alone.

Every training loader gets one of these (see create_dataloader). Each yields SampleKey(epoch, k, index): `index` is
the dataset image, `k` its position in the epoch's global order (before the DDP ranks take their shares), and the
dataset seeds that sample's augmentation from (seed, epoch, k). So what a sample looks like does not depend on which
worker or process loads it, nor on how many workers there are, and a run resumed at batch b of an epoch trains
exactly the batches b.. that the uninterrupted run would have (set_start skips the first b batches of this rank
without loading their images). Persistent DataLoader workers hold a copy of the dataset made when they started; the
epoch reaches them inside the keys.

ShuffleSampler (shuffled or in order), RectDistributedSampler (whole rectangular batches per rank) and
WeightedImageSampler (--image-weights: images drawn with replacement by weights utils.data.image_weights computes).
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np
from torch.utils.data import Sampler


class SampleKey(NamedTuple):
    """What a training sampler yields: the epoch, the position k in the epoch's global order, the image index."""
    epoch: int
    k: int
    index: int


def sample_rng(seed: int, epoch: int, k: int) -> np.random.Generator:
    """The generator of one sample's augmentation: a function of (seed, epoch, k) only."""
    return np.random.default_rng([seed % (1 << 64), epoch, k])  # SeedSequence entropy must be non-negative


class EpochSampler(Sampler[SampleKey]):
    """Base of the training samplers: a global order per epoch (epoch_order), dealt to the ranks, cut into batches.

    Subclasses give epoch_order() -> (indices, shard_unit): the epoch's global order of image indices, already padded
    to num_replicas * num_samples, and how many consecutive entries go to one rank at a time (1 = every
    num_replicas-th entry as DistributedSampler; batch_size = whole batches). Use with
    DataLoader(batch_size=self.batch_size, drop_last=False).
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not in [0, {num_replicas})')
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        self.num_samples = num_samples  # per rank, a full epoch
        self.batch_size, self.num_replicas, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration gives (and whose augmentation the keys carry)."""
        self.epoch = int(epoch)

    def set_start(self, batch: int) -> None:
        """Make the next iteration (only) skip this rank's first `batch` batches, e.g. to resume inside an epoch."""
        nb = self.num_batches()
        if not 0 <= batch <= nb:
            raise ValueError(f'start batch {batch} is not in [0, {nb}] (batches of this epoch on this rank)')
        self.start = int(batch)

    def num_batches(self) -> int:
        """Batches of a full epoch on this rank: len(loader)."""
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_order(self) -> tuple[np.ndarray, int]:
        """(global order of image indices, padded to num_replicas * num_samples; shard unit)."""
        raise NotImplementedError

    def epoch_keys(self) -> list[SampleKey]:
        """This rank's keys of the whole epoch (set_start ignored), in loading order."""
        order, unit = self.epoch_order()
        order = np.asarray(order, dtype=np.int64)
        k = np.arange(len(order)).reshape(-1, unit)  # (units, unit) positions in the global order
        mine = k[self.rank::self.num_replicas].reshape(-1)
        return [SampleKey(self.epoch, int(j), int(order[j])) for j in mine]

    def __iter__(self) -> Iterator[SampleKey]:
        keys = self.epoch_keys()[self.start * self.batch_size:]
        self.start = 0  # one iteration only: the next epoch starts at its beginning
        return iter(keys)

    def __len__(self) -> int:
        return self.num_samples


class ShuffleSampler(EpochSampler):
    """Single process or DDP: a permutation of all images from (seed, epoch) (or 0..n-1 without shuffle), padded by
    repeating from the start as DistributedSampler, every num_replicas-th image to a rank. One process sees the same
    global order as any number of DDP ranks together."""

    def __init__(self, n: int, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        super().__init__(math.ceil(n / num_replicas), batch_size, num_replicas, rank, seed)
        self.n, self.shuffle = n, shuffle

    def epoch_order(self) -> tuple[np.ndarray, int]:
        """(order, 1): the epoch's permutation, padded."""
        order = (np.random.default_rng([self.seed % (1 << 64), self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        return np.resize(order, self.num_samples * self.num_replicas), 1


class RectDistributedSampler(EpochSampler):
    """Rectangular batches: every rank receives whole planned batches, so each batch it loads has one planned shape
    (a sampler dealing image i to rank i % world mixes shapes in a batch).

    The dataset's planned batches (dataset.batch, consecutive images of similar aspect ratio) are dealt to the ranks
    in turn, batch order shuffled per epoch from (seed, epoch) if shuffle. Padding repeats images, as
    DistributedSampler does: a short planned batch (the last) is filled up to batch_size with its own images (same
    shape) so the DataLoader's chunks of batch_size line up with the planned batches, and whole batches are repeated
    from the start so every rank gets the same number.
    """

    def __init__(self, dataset: object, batch_size: int, num_replicas: int, rank: int, shuffle: bool = False,
                 seed: int = 0):
        planned = np.asarray(dataset.batch)  # (n,) planned batch of each image
        groups = [np.flatnonzero(planned == b).tolist() for b in range(int(planned.max()) + 1)]
        if max(len(g) for g in groups) > batch_size:
            raise ValueError(f'planned batches of up to {max(len(g) for g in groups)} images do not fit batch_size '
                             f'{batch_size}')
        self.batches = [(g * math.ceil(batch_size / len(g)))[:batch_size] for g in groups]  # each batch_size long
        super().__init__(math.ceil(len(self.batches) / num_replicas) * batch_size, batch_size, num_replicas, rank,
                         seed)
        self.shuffle = shuffle

    def epoch_order(self) -> tuple[np.ndarray, int]:
        """(order, batch_size): the planned batches in this epoch's order, padded with whole batches, flattened."""
        nb = len(self.batches)
        order = (np.random.default_rng([self.seed % (1 << 64), self.epoch]).permutation(nb) if self.shuffle
                 else np.arange(nb))
        order = np.resize(order, self.num_batches() * self.num_replicas)  # pad with whole batches from the start
        return np.array([i for b in order for i in self.batches[b]], dtype=np.int64), self.batch_size


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
