"""train.py --image-weights: class and image weights as the original (utils/data/image_weights.py), the seeded weighted
draw and its DDP sharding (utils/data/samplers.py's WeightedImageSampler)."""
from __future__ import annotations

import numpy as np
import pytest

from utils.data.image_weights import (
    epoch_image_weights,
    labels_to_class_weights,
    labels_to_image_weights,
)
from utils.data.samplers import WeightedImageSampler, draw_image_indices


def box_rows(*classes: int) -> np.ndarray:
    """(n, 5) label rows [class, x, y, w, h] of the given classes."""
    return np.array([[c, 0.5, 0.5, 0.2, 0.2] for c in classes], dtype=np.float32).reshape(-1, 5)


# 20 images: 18 with only common class 0 boxes, 1 with a rare class 1 box, 1 with a rare class 2 box and a class 0 box
LABELS = [box_rows(0, 0) for _ in range(18)] + [box_rows(1), box_rows(2, 0)]
RARE = (18, 19)


def test_class_and_image_weights_as_the_original():
    cw = labels_to_class_weights(LABELS, nc=4)  # boxes: class 0 37, class 1 1, class 2 1, class 3 none (counts 1)
    expected = np.array([1 / 37, 1, 1, 1])
    assert cw == pytest.approx(expected / expected.sum())
    iw = labels_to_image_weights(LABELS, 4, cw)
    assert iw[0] == pytest.approx(2 * cw[0]) and iw[18] == pytest.approx(cw[1])
    assert iw[19] == pytest.approx(cw[2] + cw[0])
    assert labels_to_image_weights([box_rows()], 4, cw).tolist() == [0.0]  # a background image is never drawn
    # a class detected perfectly (mAP 1) stops pulling its images in; (1 - mAP) ** 2 scales the rest
    w = epoch_image_weights(LABELS, 4, np.array([0.5, 1.0, 0.0, 0.0]))
    assert w[18] == 0 and w[19] == pytest.approx(cw[2] + cw[0] * 0.25)


def test_draw_over_represents_images_of_rare_classes():
    n = len(LABELS)
    idx = draw_image_indices(epoch_image_weights(LABELS, 3, None), 20 * n, seed=0, epoch=0)
    counts = np.bincount(idx, minlength=n)
    share_rare = counts[list(RARE)].sum() / len(idx)  # expected 2.03 / 3.0 of the weight; uniform: 2 / 20
    assert share_rare > 0.5
    assert counts[list(RARE)].mean() > 10 * counts[:18].mean()  # each rare image ~18x as often as a common one
    uniform = draw_image_indices(np.ones(n), 20 * n, seed=0, epoch=0)
    assert np.bincount(uniform, minlength=n)[list(RARE)].sum() / len(uniform) < 0.2


def test_draw_is_seeded_by_run_seed_and_epoch_only():
    w = epoch_image_weights(LABELS, 3, None)
    a = draw_image_indices(w, 20, seed=3, epoch=5)
    np.random.seed(123)  # the global RNGs (loader augmentation) do not enter the draw
    assert (draw_image_indices(w, 20, seed=3, epoch=5) == a).all()
    assert not (draw_image_indices(w, 20, seed=3, epoch=6) == a).all()
    assert draw_image_indices(np.zeros(4), 8, 0, 0).max() < 4  # all weights 0: uniform, not an error
    with pytest.raises(ValueError, match='non-negative'):
        draw_image_indices(np.array([1.0, -1.0]), 4, 0, 0)


def indices(sampler: WeightedImageSampler) -> list[int]:
    """The image indices of one iteration of the sampler."""
    return [key.index for key in sampler]


def test_two_ranks_draw_the_same_indices_and_split_them():
    w = epoch_image_weights(LABELS, 3, np.array([0.3, 0.1, 0.6]))
    ranks = [WeightedImageSampler(len(LABELS) + 1, num_replicas=2, rank=r, seed=7) for r in (0, 1)]
    for s in ranks:
        s.set_weights(np.append(w, 0.0))  # 21 images: 11 per rank, the draw padded by one
        s.set_epoch(4)
    assert (ranks[0].epoch_indices() == ranks[1].epoch_indices()).all()
    full = ranks[0].epoch_indices()
    a, b = indices(ranks[0]), indices(ranks[1])
    assert len(a) == len(b) == len(ranks[0]) == 11
    assert a == full[0::2].tolist() and b == full[1::2].tolist()
    single = WeightedImageSampler(len(LABELS) + 1, seed=7)
    single.set_weights(np.append(w, 0.0))
    single.set_epoch(4)
    assert indices(single) == full[:21].tolist()  # the same images as one process would train on
    ranks[0].set_epoch(5)
    assert indices(ranks[0]) != a  # a new draw each epoch
    with pytest.raises(ValueError, match='3 image weights for 21 images'):
        single.set_weights(np.ones(3))
