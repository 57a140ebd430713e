"""utils/data/samplers.py alone (no images): one global order per (seed, epoch) shared by any number of DDP ranks, keys that
carry the epoch and a unique position k, and set_start's one-iteration skip."""
from __future__ import annotations

import types

import numpy as np
import pytest

from utils.data.samplers import (
    RectDistributedSampler,
    SampleKey,
    ShuffleSampler,
    sample_rng,
)


def test_one_global_order_for_any_world_size():
    one = ShuffleSampler(21, 4, seed=5)
    one.set_epoch(3)
    whole = [key.index for key in one]
    assert sorted(whole) == list(range(21)) and whole != list(range(21))
    for world in (2, 3, 4):
        seen = {}
        for rank in range(world):
            s = ShuffleSampler(21, 4, world, rank, seed=5)
            s.set_epoch(3)
            keys = list(s)
            assert len(keys) == len(s) == -(-21 // world)  # padded: every rank the same number
            assert [k.k for k in keys] == list(range(rank, len(keys) * world, world))
            seen.update({k.k: k.index for k in keys})
        # position k holds the single process's image k; the padding repeats the order from its start
        assert [seen[k] for k in range(21)] == whole
        assert [seen[k] for k in range(21, len(seen))] == whole[:len(seen) - 21]


def test_order_from_seed_and_epoch_only():
    def order(seed: int, epoch: int) -> list[int]:
        s = ShuffleSampler(30, 8, seed=seed)
        s.set_epoch(epoch)
        return [k.index for k in s]

    np.random.seed(1)
    a = order(0, 1)
    np.random.seed(2)  # the process-global stream plays no part
    assert order(0, 1) == a and order(0, 2) != a and order(1, 1) != a
    plain = ShuffleSampler(10, 4, shuffle=False)
    assert [k.index for k in plain] == list(range(10))  # --rect on one process: the planned order


def test_keys_carry_the_epoch_and_set_start_holds_once():
    s = ShuffleSampler(10, 4, seed=0)
    s.set_epoch(7)
    full = list(s)
    assert all(isinstance(k, SampleKey) and k.epoch == 7 for k in full) and [k.k for k in full] == list(range(10))
    assert s.num_batches() == 3
    s.set_start(2)
    assert list(s) == full[8:]  # the third batch: a short one of 2
    assert list(s) == full  # back to the whole epoch
    s.set_start(3)
    assert list(s) == []
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=r'not in \[0, 3\]'):
            s.set_start(bad)
    with pytest.raises(ValueError, match='rank 2 is not in'):
        ShuffleSampler(10, 4, 2, 2)


def test_rect_sampler_keys_and_resume():
    ds = types.SimpleNamespace(batch=np.repeat(np.arange(5), 3)[:14])  # planned batches of 3, the last of 2
    ranks = [RectDistributedSampler(ds, 3, 2, r, shuffle=True, seed=1) for r in (0, 1)]
    keys = []
    for s in ranks:
        s.set_epoch(4)
        mine = list(s)
        assert len(mine) == len(s) == 9 and s.num_batches() == 3
        chunks = [mine[i:i + 3] for i in range(0, 9, 3)]
        assert all(len({ds.batch[k.index] for k in c}) == 1 for c in chunks)  # whole planned batches
        s.set_start(1)
        assert list(s) == mine[3:]
        keys += mine
    assert sorted(k.k for k in keys) == list(range(18))  # unique positions over the ranks
    assert {k.index for k in keys} == set(range(14))


def test_sample_rng_depends_on_seed_epoch_k():
    draw = [sample_rng(*key).random() for key in ((0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0))]
    assert draw[0] == draw[4] and len(set(draw[:4])) == 4
    assert 0 <= sample_rng(-3, 0, 0).random() < 1  # a negative --seed works too
