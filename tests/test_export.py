"""ONNX export (utils/eval/export.py, models.py --onnx): onnxruntime and OpenCV DNN against PyTorch on a real photo."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from models import InputSizeError, load_model
from tests.conftest import ROOT, SAMPLES, TINY_WEIGHTS
from tests.opencv_ref import compare, opencv_outputs, ours_in_opencv_layout
from utils.checkpoint import model_checkpoint, save_checkpoint
from utils.eval.export import export_onnx

pytestmark = pytest.mark.slow  # runs command lines or reads ../shared

ort = pytest.importorskip('onnxruntime')


@pytest.fixture(scope='module')
def tiny() -> torch.nn.Module:
    """The official yolov3-tiny, eval mode, not fused."""
    return load_model(TINY_WEIGHTS, ROOT / 'cfg' / 'yolov3-tiny.cfg', 320)


def photos(h: int, w: int) -> np.ndarray:
    """bus.jpg and zidane.jpg resized to (h, w): a (2, 3, h, w) float32 RGB batch in [0, 1]."""
    ims = [cv2.resize(cv2.imread(str(SAMPLES / f)), (w, h))[:, :, ::-1] for f in ('bus.jpg', 'zidane.jpg')]
    return np.ascontiguousarray(np.stack(ims).transpose(0, 3, 1, 2), dtype=np.float32) / 255


def reference(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """PyTorch inference_out of a batch."""
    with torch.no_grad():
        return model(torch.from_numpy(x))[0].numpy()


@pytest.fixture(scope='module')
def dynamic_onnx(tiny, tmp_path_factory) -> Path:
    """yolov3-tiny exported with dynamic batch, height and width."""
    return export_onnx(tiny, tmp_path_factory.mktemp('onnx') / 'tiny.onnx', (320, 320), dynamic=True)


def test_dynamic_export_runs_any_batch_and_size_in_onnxruntime(tiny, dynamic_onnx):
    f = dynamic_onnx
    assert not tiny.training and not tiny.fused  # the caller's model is left as it was
    sess = ort.InferenceSession(str(f), providers=['CPUExecutionProvider'])
    assert sess.get_inputs()[0].shape == ['batch', 3, 'height', 'width']
    assert sess.get_outputs()[0].shape == ['batch', 'boxes', 85]
    for b, (h, w) in ((1, (320, 320)), (2, (256, 416))):
        x = photos(h, w)[:b]
        got, ref = sess.run(None, {'images': x})[0], reference(tiny, x)
        assert got.shape == ref.shape == (b, 3 * (h * w // 32 ** 2 + h * w // 16 ** 2), 85)
        assert np.abs(got[..., :4] - ref[..., :4]).max() < 1e-2  # pixels
        assert np.abs(got[..., 4:] - ref[..., 4:]).max() < 1e-4  # probabilities


def test_export_reads_in_opencv_dnn_at_two_batch_sizes(tiny, tmp_path):
    # what a deployer without onnxruntime does: cv2.dnn.readNetFromONNX on the default (dynamic batch) export
    f = export_onnx(tiny, tmp_path / 'tiny.onnx', (320, 320))
    assert ort.InferenceSession(str(f)).get_outputs()[0].shape == ['batch', 300 + 1200, 85]  # 3 anchors on 10x10 and 20x20
    net = cv2.dnn.readNetFromONNX(str(f))
    for b in (1, 2):
        x = photos(320, 320)[:b]
        net.setInput(x)
        got, ref = net.forward(), reference(tiny, x)
        assert got.shape == ref.shape
        assert np.abs(got[..., :4] - ref[..., :4]).max() < 1e-2
        assert np.abs(got[..., 4:] - ref[..., 4:]).max() < 1e-4
        assert (ref[..., 4] > 0.3).sum() >= 5  # real detections compared, not an empty picture


def test_failed_export_keeps_the_existing_file(tiny, tmp_path):
    f = tmp_path / 'tiny.onnx'
    f.write_bytes(b'an earlier export')
    with pytest.raises(InputSizeError, match=r'layer 20 \[route\] cannot take the 100x100 input'):
        export_onnx(tiny, f, (100, 100))  # not a multiple of 32: the route concat fails while tracing
    assert f.read_bytes() == b'an earlier export'
    assert [p.name for p in tmp_path.iterdir()] == ['tiny.onnx']  # no temporary file left behind


def test_detect_runs_a_dynamic_export_at_the_cfg_size(dynamic_onnx, tmp_path):
    from detect import detect, parse_opt

    out = tmp_path / 'out'
    detect(parse_opt(['--weights', str(dynamic_onnx), '--source', str(SAMPLES / 'bus.jpg'), '--output', str(out),
                      '--save-txt']))  # no --img-size: 416, letterboxed to 416x352 as the PyTorch model
    rows = (out / 'bus.txt').read_text().splitlines()
    assert sorted(int(r.split()[0]) for r in rows) == [0, 0, 0, 0, 5]  # 4 persons, 1 bus


def test_checkpoint_converts_to_weights_and_cfg_that_opencv_darknet_reads(tmp_path):
    # a fine-tuned checkpoint as train.py saves it (weights moved off the official ones), no --cfg: the .pt's cfg
    model = load_model(TINY_WEIGHTS, ROOT / 'cfg' / 'yolov3-tiny.cfg', 416)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    pt = tmp_path / 'best.pt'
    save_checkpoint(model_checkpoint(model, epoch=3), pt)
    assert models.main(models.get_args_parser().parse_args(['--weights', str(pt), '--convert'])) == 0
    assert (tmp_path / 'best.cfg').read_text() == model.cfg_text  # written beside best.weights for Darknet readers
    img = np.ascontiguousarray(photos(416, 416)[0].transpose(1, 2, 0) * 255).astype(np.uint8)
    d = compare(ours_in_opencv_layout(load_model(pt, img_size=416), img),
                opencv_outputs(str(tmp_path / 'best.cfg'), str(tmp_path / 'best.weights'), img))
    assert d['box_obj'] < 1e-4 and d['cls'] < 1e-4, d

