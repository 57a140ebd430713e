"""Weights of the same network with other classes: transfer that says what it did, heads mapped by class name,
the bias prior on fresh heads, and the errors a user meets (another network, empty/truncated files, bad names)."""
from __future__ import annotations

import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from models import Darknet, class_prior, load_model
from tests.conftest import REF_CFG, ROOT, SAMPLES, TINY_WEIGHTS, TOY_CFG
from utils.checkpoint import CheckpointError, model_checkpoint, save_checkpoint
from utils.darknet.downloads import attempt_download
from utils.darknet.parse_config import cfg_with_classes
from utils.darknet.weights import WeightsError
from utils.data.config import coco_names
from utils.train.transfer import load_weights


def said(logged) -> str:
    """What the project logger said so far in this test, one line each (as a script would print it)."""
    return ''.join(f'{m}\n' for m in logged())


TINY = ROOT / 'cfg' / 'yolov3-tiny.cfg'
TINY_1CLS = ROOT / 'cfg' / 'yolov3-tiny-1cls.cfg'
HEADS = ('module_list.15.Conv2d', 'module_list.22.Conv2d')  # the convolutions before the two [yolo] layers


@pytest.fixture(scope='module')
def official() -> Darknet:
    """The 80-class yolov3-tiny with the official weights, eval mode."""
    return load_model(TINY_WEIGHTS, TINY, 416, verbose=False)


@pytest.fixture(scope='module')
def bus() -> torch.Tensor:
    """The bus photo, (1, 3, 416, 416) RGB in 0..1."""
    img = cv2.resize(cv2.imread(str(SAMPLES / 'bus.jpg')), (416, 416))[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()[None] / 255


def heads_have_prior(model: Darknet, classes: list[int] | None = None) -> bool:
    """Whether the head biases are PyTorch's fresh init plus the prior (whole heads, or the given classes' rows)."""
    for j, i in zip(model.head_convs(), model.yolo_layers):
        y, conv = model.module_list[i], model.module_list[j].Conv2d
        bound = 1 / math.sqrt(conv.weight[0].numel())  # default bias init: U(-bound, bound)
        b = conv.bias.detach()[:y.na * y.no].view(y.na, y.no)
        if classes is None and (b[:, 4] + 4.5).abs().max() > bound:  # objectness (whole fresh heads only)
            return False
        cls = b[:, 5:] if classes is None else b[:, [5 + c for c in classes]]
        if (cls - class_prior(y.nc)).abs().max() > bound:
            return False
    return True


def outputs(model: Darknet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)[0][0]  # (N, 5 + nc): boxes, objectness, per-class probabilities


@pytest.mark.slow
def test_official_weights_into_1cls_cfg_transfer_and_say_so(official, logged):
    model = Darknet(TINY_1CLS)
    load_weights(model, TINY_WEIGHTS)
    out = said(logged)
    assert 'Darknet weights of this network with 80 classes' in out
    assert '2 output convolutions re-initialised: 255 -> 18 filters (80 -> 1 classes)' in out
    ref, got = official.state_dict(), model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in got.items() if not k.startswith(HEADS))
    assert heads_have_prior(model) and model.names is None


@pytest.mark.slow
def test_two_class_mapping_equals_80_class_columns(official, bus, logged):
    model = Darknet(cfg_with_classes(TINY.read_text(), 2), 416)
    load_weights(model, TINY_WEIGHTS, names=['car', 'person'])
    out = said(logged)
    assert '2 output convolutions mapped by class name: 255 -> 21 filters (80 -> 2 classes)' in out
    assert '  car <- car (2)\n  person <- person (0)\n' in out
    assert model.names == ['car', 'person']
    ref, got = outputs(official, bus), outputs(model, bus)
    assert (ref[:, 4] * ref[:, 5:].max(1).values).max() > 0.5  # the photo has confident detections to compare
    assert torch.allclose(got[:, :5], ref[:, :5], rtol=1e-5, atol=1e-5)  # boxes (pixels) and objectness
    assert torch.allclose(got[:, 5:], ref[:, 5 + np.array([2, 0])], atol=1e-6)  # sigmoid per class: exact columns


@pytest.mark.slow
def test_person_only_into_1cls_cfg_is_the_person_detector(official, bus, logged):
    model = Darknet(TINY_1CLS, 416)
    load_weights(model, TINY_WEIGHTS, names=['person'])
    assert '  person <- person (0)' in said(logged)
    ref, got = outputs(official, bus), outputs(model, bus)
    assert torch.allclose(got[:, :5], ref[:, :5], rtol=1e-5, atol=1e-5)
    assert torch.allclose(got[:, 5], ref[:, 5], atol=1e-6)


@pytest.mark.slow
def test_unknown_class_keeps_fresh_rows_with_prior(official, logged):
    model = Darknet(REF_CFG / 'yolov3-tiny-3cls.cfg')
    load_weights(model, TINY_WEIGHTS, names=['car', 'widget', 'person'])
    out = said(logged)
    assert '  car <- car (2)\n  widget <- (new)\n  person <- person (0)\n' in out
    assert heads_have_prior(model, classes=[1]) and not heads_have_prior(model, classes=[0])
    w, w80 = model.module_list[15].Conv2d.weight, official.module_list[15].Conv2d.weight
    for a in range(3):  # per anchor: box+obj rows, then class rows (car = source class 2, person = 0)
        assert torch.equal(w[a * 8:a * 8 + 5], w80[a * 85:a * 85 + 5])
        assert torch.equal(w[a * 8 + 5], w80[a * 85 + 7]) and torch.equal(w[a * 8 + 7], w80[a * 85 + 5])


@pytest.mark.slow
def test_mapping_off_leaves_fresh_heads_with_prior(logged):
    model = Darknet(TINY_1CLS)
    load_weights(model, TINY_WEIGHTS, names=['person'], map_classes=False)
    out = said(logged)
    assert 're-initialised: 255 -> 18 filters' in out and 'class mapping off: turned off' in out
    assert heads_have_prior(model)


@pytest.mark.slow
def test_checkpoint_carries_names_and_maps(official, tmp_path, logged):
    pt = tmp_path / 'coco.pt'
    save_checkpoint(model_checkpoint(official), pt)
    assert torch.load(pt, weights_only=True)['names'] == coco_names()
    assert load_model(pt, verbose=False).names == coco_names()  # test.py/detect.py read model.names
    model = Darknet(TINY_1CLS)
    load_weights(model, pt, names=['person'])
    assert 'transferred 68/72 items' in said(logged) and model.names == ['person']
    ckpt = torch.load(pt, weights_only=True)
    ckpt['names'] = None  # a checkpoint without class names: mapping says it is off and why
    save_checkpoint(ckpt, pt)
    assert load_model(pt, verbose=False).names is None
    model = Darknet(TINY_1CLS)
    load_weights(model, pt, names=['person'])
    out = said(logged)
    assert 're-initialised: 255 -> 18 filters (80 -> 1 classes)' in out
    assert f'class mapping off: {pt} carries no class names' in out
    assert heads_have_prior(model)


@pytest.mark.slow
def test_weights_of_another_network_say_how_to_fine_tune():
    model = Darknet(ROOT / 'cfg' / 'yolov3.cfg')
    before = model.module_list[0].Conv2d.weight.clone()
    with pytest.raises(WeightsError) as e:
        load_weights(model, TINY_WEIGHTS)
    msg = str(e.value)
    assert str(TINY_WEIGHTS) in msg and '8,858,734' in msg and '62,001,757' in msg and 'another model' in msg
    assert 'cfg of the model these weights belong to' in msg and "--weights ''" in msg
    assert torch.equal(before, model.module_list[0].Conv2d.weight)  # nothing loaded


@pytest.mark.slow
def test_empty_and_truncated_weights(tmp_path):
    empty = tmp_path / 'yolov3-tiny.weights'
    empty.touch()
    for call in (lambda: attempt_download(empty), lambda: load_weights(Darknet(TINY_1CLS), empty)):
        with pytest.raises(WeightsError, match='empty') as e:
            call()
        assert str(empty) in str(e.value) and 'not found' not in str(e.value)
    trunc = tmp_path / 'trunc.weights'
    trunc.write_bytes(TINY_WEIGHTS.read_bytes()[:-4 * 1000])  # 1,000 values short: no class count fits
    with pytest.raises(WeightsError, match='truncated'):
        load_weights(Darknet(TINY_1CLS), trunc)
    trunc.write_bytes(TINY_WEIGHTS.read_bytes()[:-2])
    with pytest.raises(WeightsError, match='truncated'):
        load_weights(Darknet(TINY_1CLS), trunc)
    r = subprocess.run([sys.executable, 'models.py', '--cfg', str(TINY_1CLS), '--weights', str(empty), '--convert'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and 'Traceback' not in r.stderr and 'empty' in r.stderr
    assert not (tmp_path / 'yolov3-tiny.pt').exists()


@pytest.mark.slow
def test_duplicate_or_miscounted_names_are_one_line_errors():
    model = Darknet(cfg_with_classes(TINY.read_text(), 3))
    with pytest.raises(ValueError, match="duplicate class names 'car'"):
        load_weights(model, TINY_WEIGHTS, names=['car', 'person', 'car'])
    with pytest.raises(ValueError, match='2 class names given but .* has 3 classes'):
        load_weights(model, TINY_WEIGHTS, names=['car', 'person'])
    assert heads_have_prior(model)  # nothing loaded


def test_pt_of_another_network_is_an_error(tmp_path):
    pt = tmp_path / 'v4tiny.pt'
    save_checkpoint(model_checkpoint(Darknet(ROOT / 'cfg' / 'yolov4-tiny.cfg')), pt)
    model = Darknet(ROOT / 'cfg' / 'yolov3.cfg')
    before = model.module_list[0].Conv2d.weight.clone()
    with pytest.raises(CheckpointError) as e:  # its first layers would fit by name and shape: loaded by accident
        load_weights(model, pt)
    assert str(pt) in str(e.value) and 'another model' in str(e.value) and "--weights ''" in str(e.value)
    assert torch.equal(before, model.module_list[0].Conv2d.weight)


# ---- fast tier: the same rules on the toy cfg (3 classes), no ../shared

def toy_source(tmp_path, names: list[str]) -> tuple[Darknet, object]:
    """A toy model with random (not fresh-looking) weights saved as a checkpoint carrying its class names."""
    torch.manual_seed(0)
    src = Darknet(TOY_CFG)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    src.names = list(names)
    pt = tmp_path / 'toy.pt'
    save_checkpoint(model_checkpoint(src), pt)
    return src.eval(), pt


def test_toy_reordered_names_permute_the_class_columns(tmp_path, logged):
    src, pt = toy_source(tmp_path, ['cat', 'dog', 'bird'])
    dst = Darknet(TOY_CFG)
    load_weights(dst, pt, names=['bird', 'cat', 'dog'])  # the same classes in another order
    x = torch.rand(1, 3, 64, 96)
    a, b = outputs(src, x), outputs(dst, x)
    assert torch.allclose(b[:, :5], a[:, :5]) and torch.allclose(b[:, 5:], a[:, [7, 5, 6]])
    assert dst.names == ['bird', 'cat', 'dog']
    out = said(logged)
    assert '2 output convolutions mapped by class name' in out and 'bird <- bird (2)' in out


def test_toy_mapping_into_fewer_classes_copies_known_rows_and_keeps_new_ones_fresh(tmp_path, logged):
    src, pt = toy_source(tmp_path, ['cat', 'dog', 'bird'])
    dst = Darknet(cfg_with_classes(TOY_CFG.read_text(), 2))
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    load_weights(dst, pt, names=['dog', 'fish'])
    got, want = dst.state_dict(), src.state_dict()
    heads = [f'module_list.{j}.Conv2d.{t}' for j in dst.head_convs() for t in ('weight', 'bias')]
    assert all(torch.equal(got[k], want[k]) for k in got if k not in heads)  # the rest loaded as it was
    for k in heads:  # rows per anchor: x, y, w, h, objectness, then classes (source 8 rows, model 7)
        g, w, f = got[k].view(3, 7, -1), want[k].view(3, 8, -1), fresh[k].view(3, 7, -1)
        assert torch.equal(g[:, :5], w[:, :5])  # box and objectness rows as they were
        assert torch.equal(g[:, 5], w[:, 6])  # dog <- dog (source class 1)
        assert torch.equal(g[:, 6], f[:, 6])  # fish: new, the fresh row with its bias prior
    assert heads_have_prior(dst, classes=[1])
    out = said(logged)
    assert 'dog <- dog (1)' in out and 'fish <- (new)' in out and dst.names == ['dog', 'fish']


def test_toy_without_names_leaves_other_class_heads_fresh(tmp_path, logged):
    _, pt = toy_source(tmp_path, ['cat', 'dog', 'bird'])
    dst = Darknet(cfg_with_classes(TOY_CFG.read_text(), 2))
    load_weights(dst, pt)  # no names for the model: nothing to map by
    assert heads_have_prior(dst) and dst.names is None
    n = len(dst.state_dict())
    assert f'transferred {n - 4}/{n} items from {pt}' in said(logged)


def test_toy_same_classes_and_names_load_whole(tmp_path, logged, caplog):
    src, pt = toy_source(tmp_path, ['cat', 'dog', 'bird'])
    dst = Darknet(TOY_CFG)
    caplog.clear()  # the cfg's own notes
    load_weights(dst, pt)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(outputs(src, x), outputs(dst, x)) and dst.names == ['cat', 'dog', 'bird']
    assert said(logged) == ''  # a whole load says nothing
