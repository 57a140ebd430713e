"""The project against Darknet's own results on thinned cfgs of AlexeyAB/darknet's zoo (tests/fixtures/darknet_zoo).

Each case holds what net_harness.c had Darknet compute for a cfg of ../shared/darknet-zoo made small (width, height,
filters divided, 3 classes: tools/darknet_harness/zoo_cfg.py): the .weights Darknet wrote, every head's input, the
head outputs and get_network_boxes at threshold 0. The project must load the same cfg and weights, compute the same
head inputs, decode the same boxes, objectness and class scores, and write the weights back byte for byte.
Remake the fixture with tools/darknet_harness/make_zoo_fixture.py.
"""
import contextlib
import hashlib
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures' / 'darknet_zoo'
ZOO = SHARED / 'darknet-zoo'
CASES = sorted(p.stem for p in FIXTURES.glob('*.npz'))
# Tolerances: 2-3x the float32 noise measured on these cases (Darknet is built with -Ofast, sums in other orders and
# has its own mish/softplus): head inputs up to 8.8e-5, boxes 2.0e-4, scores 5.9e-5 (yolov4-csp, 145 layers). A
# batch-norm eps of 1e-6 instead of Darknet's 1e-5 alone moves the head inputs by 3.5e-4 to 1.7e-2.
NET_TOL = 2e-4  # head inputs: max |ours - Darknet| relative to max |Darknet|
BOX_TOL = 5e-4  # boxes: |ours - Darknet| / max(1, |Darknet|) in fractions of the input (new_coords' w = (2 sigmoid)^2
# anchor doubles the head input's relative error, exp() carries its absolute error)
SCORE_TOL = 2e-4  # objectness and class scores: max absolute difference
PRE = {'yolo': 5, 'gaussian_yolo': 9, 'region': 5}  # entries before the classes in a head's output


def load_zoo_cfg():
    """tools/darknet_harness/zoo_cfg.py (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location('darknet_harness_zoo_cfg', ROOT / 'tools' / 'darknet_harness' /
                                                  'zoo_cfg.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_fixture_is_complete_and_small():
    assert len(CASES) >= 10
    assert sum(p.stat().st_size for p in FIXTURES.glob('*.npz')) < 3_000_000
    kinds = set()
    for name in CASES:
        f = np.load(FIXTURES / f'{name}.npz')
        heads = f['heads']
        kinds.update(str(t) for t in f['head_types'])
        assert f['image'].dtype == np.uint8 and f['image'].shape == (3, *f['size'][::-1])
        for (i, n, nc, h, w), t in zip(heads, f['head_types']):
            assert f[f'output_{i}'].size == n * h * w * (PRE[str(t)] + nc)
            assert f'input_{i - 1}' in f
        assert f['boxes'].shape[1] == 5 + heads[0, 2] + 4 * (str(f['head_types'][0]) == 'gaussian_yolo')
    assert kinds == {'yolo', 'gaussian_yolo', 'region'}


INLINE_CFG = """[net]
width=416
height=416
width=320
channels=3

[convolutional]
filters=64
size=3
stride=2
activation=leaky

[convolutional]
filters=64
groups=64
size=3
stride=2

[convolutional]
filters=32
size=1

[reorg]
stride=2

[route]
layers=-1,-3

[convolutional]
filters=64
groups=8
size=3

[upsample]
stride=2

[convolutional]
filters=255
size=1

[yolo]
mask=0,1,2
anchors=10,13, 16,30, 33,23
classes=80
num=3
"""


def test_zoo_cfg_edits():
    zoo_cfg = load_zoo_cfg()
    sized = zoo_cfg.with_size(INLINE_CFG, 96, 64)
    assert 'width=96' in sized and 'height=64' in sized and '320' not in sized and '416' not in sized
    assert zoo_cfg.max_stride(INLINE_CFG) == 8  # conv /2, conv /2, reorg /2; the upsample comes back to 4
    thin = zoo_cfg.thinned(INLINE_CFG, 16, 3)
    lines = thin.splitlines()
    secs = zoo_cfg.sections(lines)[1:]
    get = lambda i, k: zoo_cfg.value(lines, secs[i], k)
    assert (get(0, 'filters'), get(1, 'filters'), get(1, 'groups')) == ('4', '4', '4')  # depthwise stays depthwise
    assert get(2, 'filters') == '4'  # 32 / 16 = 2, rounded up to a multiple of stride^2 for the [reorg]
    # the route joins 4 * 4 reorg channels and 4: 20 in, 64 / 16 = 4 out, groups 8 -> gcd(20, 4, 8) = 4
    assert (get(5, 'filters'), get(5, 'groups')) == ('4', '4')
    assert (get(7, 'filters'), get(8, 'classes')) == ('24', '3')  # the head convolution: (3 + 5) * 3


def darknet_order(rows: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """Our (n*h*w, no) rows of one head, anchor-major, in get_network_boxes' order: cell-major, anchor-minor."""
    return rows.reshape(n, h, w, -1).transpose(1, 2, 0, 3).reshape(n * h * w, -1)


def kept_slots(kind: str, out: np.ndarray, n: int, nc: int, h: int, w: int) -> np.ndarray:
    """The slots Darknet returned boxes for: objectness > threshold 0 ([yolo], [Gaussian_yolo]); all ([region])."""
    if kind == 'region':
        return np.ones(n * h * w, bool)
    obj = out.reshape(n, PRE[kind] + nc, h, w)[:, PRE[kind] - 1]
    return (obj > 0).transpose(1, 2, 0).reshape(-1)


@pytest.mark.slow  # reads ../shared/darknet-zoo
@pytest.mark.parametrize('name', CASES)
def test_matches_darknet(name, tmp_path):
    import models
    f = np.load(FIXTURES / f'{name}.npz')
    src = ZOO / f"{f['cfg']}.cfg"
    assert hashlib.sha256(src.read_bytes()).hexdigest() == str(f['cfg_sha256']), \
        f"{src} is not the cfg the fixture was made from: remake it (tools/darknet_harness/make_zoo_fixture.py)"
    zoo_cfg = load_zoo_cfg()
    w, h = (int(v) for v in f['size'])
    cfg = tmp_path / f'{name}.cfg'
    cfg.write_text(zoo_cfg.thinned(zoo_cfg.with_size(src.read_text(), w, h), *(int(v) for v in f['thin'])))
    weights = tmp_path / 'darknet.weights'
    weights.write_bytes(f['weights'].tobytes())
    with contextlib.redirect_stdout(io.StringIO()):
        model = models.load_model(weights, cfg, img_size=(h, w), verbose=False)
    assert len(model.module_list) == int(f['n_layers'])

    # the network: every head's input
    heads = [tuple(int(v) for v in hd) for hd in f['heads']]
    seen = {}
    hooks = [model.module_list[i - 1].register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i - 1, out[0].numpy().copy())) for i, *_ in heads]
    x = torch.from_numpy(f['image'].astype(np.float32) / np.float32(255))[None]
    with torch.no_grad():
        rows = model(x)[0][0].numpy()
    for hk in hooks:
        hk.remove()
    for i, *_ in heads:
        ref = f[f'input_{i - 1}']
        err = np.abs(seen[i - 1].reshape(ref.shape) - ref).max() / np.abs(ref).max()
        assert err <= NET_TOL, f"{name}: input of head layer {i} differs from Darknet's by {err:.1e} (relative)"

    # the boxes, objectness and class scores get_network_boxes gives at threshold 0
    boxes, start, got = f['boxes'], 0, 0
    for (i, n, nc, gh, gw), kind in zip(heads, (str(t) for t in f['head_types'])):
        ours = darknet_order(rows[start:start + n * gh * gw], n, gh, gw)
        ours = ours[kept_slots(kind, f[f'output_{i}'], n, nc, gh, gw)]
        start += n * gh * gw
        ref = boxes[got:got + len(ours)]
        got += len(ours)
        box = ours[:, :4] / [w, h, w, h]
        err = (np.abs(box - ref[:, :4]) / np.maximum(1, np.abs(ref[:, :4]))).max()
        assert err <= BOX_TOL, f"{name}: boxes of head layer {i} differ from Darknet's by {err:.1e}"
        score = ours[:, 4:5] * ours[:, 5:5 + nc]
        np.testing.assert_allclose(np.where(score > 0, score, 0), ref[:, 5:5 + nc], rtol=0, atol=SCORE_TOL,
                                   err_msg=f"{name}: class scores (objectness * class) of head layer {i}")
        if kind != 'region':  # Darknet's region detections carry objectness 1 (the score is in the classes)
            obj = ref[:, 4] * (1 - ref[:, 5 + nc:9 + nc].mean(1)) if kind == 'gaussian_yolo' else ref[:, 4]
            np.testing.assert_allclose(ours[:, 4], obj, rtol=0, atol=SCORE_TOL, err_msg=f"{name}: objectness")
    assert start == len(rows) and got == len(boxes)

    # the weights written back: Darknet's file, byte for byte
    from utils.darknet.weights import save_weights
    save_weights(model, tmp_path / 'ours.weights')
    assert (tmp_path / 'ours.weights').read_bytes() == weights.read_bytes()
