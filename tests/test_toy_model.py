"""The model alone on tests/fixtures/toy.cfg (fast tier: no ../shared, no process): the cfg it parses to, the train
and inference outputs, fusing, Darknet .weights round trips, partial files and files that do not fit. The same checks
on the official yolov3-tiny weights and against OpenCV are in test_models.py (slow tier)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import Darknet
from tests.conftest import ROOT, TOY_CFG
from tests.opencv_ref import randomize
from utils.darknet.parse_config import parse_model_cfg
from utils.darknet.weights import (
    WeightsError,
    darknet_value_count,
    load_darknet_weights,
    save_weights,
)

STRIDES = (32, 16)  # of the two [yolo] layers, in output order
NO = 5 + 3  # box, objectness and 3 class scores per anchor


def toy(seed: int = 0, img_size: int | tuple[int, int] = 64) -> Darknet:
    """The toy model with random weights and BatchNorm statistics (so that BN and fusing change the outputs)."""
    model = Darknet(TOY_CFG, img_size)
    randomize(model, seed)
    return model.eval()


def file_state(model: Darknet) -> dict[str, torch.Tensor]:
    """What a .weights file holds: every convolution and BatchNorm tensor (not BN's batch counter, not anchors)."""
    return {k: v for k, v in model.state_dict().items()
            if ('.Conv2d.' in k or '.BatchNorm2d.' in k) and not k.endswith('num_batches_tracked')}


def test_toy_cfg_parses_to_typed_sections():
    defs = parse_model_cfg(TOY_CFG)
    assert [d['type'] for d in defs] == ['net', 'convolutional', 'maxpool', 'convolutional', 'maxpool',
                                         'convolutional', 'shortcut', 'convolutional', 'convolutional', 'maxpool',
                                         'convolutional', 'convolutional', 'yolo', 'route', 'convolutional',
                                         'upsample', 'route', 'convolutional', 'convolutional', 'yolo']
    yolo = defs[-1]
    assert yolo['mask'] == [0, 1, 2] and yolo['classes'] == 3 and yolo['ignore_thresh'] == 0.7
    assert yolo['anchors'][:2] == [(10.0, 14.0), (23.0, 27.0)] and len(yolo['anchors']) == 6
    assert defs[16]['layers'] == [-1, 7] and defs[6]['from'] == [-2]


def test_train_and_inference_outputs_on_a_non_square_input():
    model = toy(img_size=(64, 96))
    x = torch.rand(2, 3, 64, 96)
    model.train()
    shapes = [(2, 3, 64 // s, 96 // s, NO) for s in STRIDES]
    assert [tuple(p.shape) for p in model(x)] == shapes  # raw maps: (bs, anchors, ny, nx, 5 + classes)
    model.eval()
    with torch.no_grad():
        io, p = model(x)
    assert [tuple(t.shape) for t in p] == shapes
    assert io.shape == (2, 3 * 2 * 3 + 3 * 4 * 6, NO)
    # rows run layer, anchor, grid y, grid x: each decoded centre lies in its own grid cell (sigmoid offsets),
    # sizes are positive, objectness and class scores are probabilities
    row = 0
    for s, (ny, nx) in zip(STRIDES, [(2, 3), (4, 6)]):
        for _ in range(3):
            for y in range(ny):
                for x_ in range(nx):
                    cx, cy = io[:, row, 0], io[:, row, 1]
                    assert ((cx > x_ * s) & (cx < (x_ + 1) * s) & (cy > y * s) & (cy < (y + 1) * s)).all(), row
                    row += 1
    assert (io[..., 2:4] > 0).all() and (io[..., 4:] >= 0).all() and (io[..., 4:] <= 1).all()


def test_fused_model_equals_unfused():
    model = toy()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a = model(x)[0]
        b = model.fuse()(x)[0]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert ((a - b).abs() / a.abs().clamp(min=1)).max() < 1e-5


def test_weights_round_trip_is_bit_identical(tmp_path):
    a, b = toy(seed=1), toy(seed=2)
    first, second = tmp_path / 'a.weights', tmp_path / 'b.weights'
    save_weights(a, first)
    # header: version (3 x int32) and images seen (int64), then every value as float32
    assert first.stat().st_size == 12 + 8 + 4 * darknet_value_count(a) > 4 * sum(p.numel() for p in a.parameters())
    load_darknet_weights(b, first)
    sa, sb = file_state(a), file_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    save_weights(b, second)
    assert second.read_bytes() == first.read_bytes()
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64)
        assert torch.equal(a(x)[0], b(x)[0])


def test_truncated_and_foreign_weights_are_errors_that_load_nothing(tmp_path):
    good = tmp_path / 'toy.weights'
    save_weights(toy(seed=1), good)
    model = toy(seed=2)
    before = file_state(model)
    trunc = tmp_path / 'trunc.weights'
    trunc.write_bytes(good.read_bytes()[:20 + 4 * 1000])
    with pytest.raises(WeightsError) as e:
        load_darknet_weights(model, trunc)
    assert str(trunc) in str(e.value) and '1,000' in str(e.value) and f'{darknet_value_count(model):,}' in str(e.value)
    odd = tmp_path / 'odd.weights'
    odd.write_bytes(good.read_bytes()[:-2])  # not a whole float32 at the end
    with pytest.raises(WeightsError, match='odd.weights.*not a whole number'):
        load_darknet_weights(model, odd)
    with pytest.raises(WeightsError, match='another model'):  # the toy's values cannot fill yolov3-tiny
        load_darknet_weights(Darknet(ROOT / 'cfg' / 'yolov3-tiny.cfg', 64), good)
    after = file_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded
    with pytest.raises(FileNotFoundError, match='missing.weights'):
        load_darknet_weights(model, tmp_path / 'missing.weights')


def test_partial_weights_hold_the_first_layers_and_take_the_cutoff_from_the_name(tmp_path):
    full = toy(seed=1)
    part = tmp_path / 'toy.conv.9'  # Darknet's naming of partial files (darknet53.conv.74)
    save_weights(full, part, cutoff=9)
    assert part.stat().st_size == 20 + 4 * darknet_value_count(full, 9) < 20 + 4 * darknet_value_count(full)
    fresh = toy(seed=2)
    load_darknet_weights(fresh, part)  # no cutoff given: 9 from the name
    a, b = file_state(full), file_state(fresh)
    layer = {k: int(k.split('.')[1]) for k in a}  # module_list.<layer>.Conv2d.weight, ...
    assert all(torch.equal(a[k], b[k]) for k in a if layer[k] < 9)
    assert not any(torch.equal(a[k], b[k]) for k in a if layer[k] >= 9)  # later layers keep their own values


def test_fused_model_cannot_be_saved_or_loaded_as_darknet_weights(tmp_path):
    path = tmp_path / 'toy.weights'
    save_weights(toy(), path)
    fused = toy().fuse()
    with pytest.raises(WeightsError, match='fused'):
        save_weights(fused, tmp_path / 'f.weights')
    with pytest.raises(WeightsError, match='fuse'):
        load_darknet_weights(fused, path)
    assert not (tmp_path / 'f.weights').exists()
    assert np.fromfile(path, dtype=np.int32)[:3].tolist() == [0, 2, 5]  # Darknet's header version 0.2.5
