"""--backend (utils/eval/backends.py): which runtime runs, the ONNX export cache and its staleness rules, and detections
equal between PyTorch and onnxruntime."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models import Darknet, load_eval_model
from tests.conftest import ROOT, SAMPLES, TINY_WEIGHTS, TOY_CFG
from utils.darknet.weights import save_weights
from utils.eval import backends
from utils.eval.backends import (
    BackendError,
    OrtModel,
    cache_dir,
    cached_export,
    choose_backend,
    files_key,
    load_runtime,
)
from utils.eval.nms import non_max_suppression

pytest.importorskip('onnxruntime')
CPU, CUDA = torch.device('cpu'), torch.device('cuda', 0)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty cache folder (YOLOV3_CACHE)."""
    d = tmp_path / 'cache'
    monkeypatch.setenv('YOLOV3_CACHE', str(d))
    return d


def toy(seed: int = 0, fused: bool = True) -> Darknet:
    """The toy model with random weights and BatchNorm statistics, eval mode, fused unless asked."""
    torch.manual_seed(seed)
    m = Darknet(str(TOY_CFG), 64)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval().fuse() if fused else m.eval()


def test_choice_rules():
    assert choose_backend('auto', CPU) == 'onnxruntime'
    assert choose_backend('auto', CPU, half='off') == 'onnxruntime'
    assert choose_backend('auto', CUDA) == 'torch'  # CUDA: PyTorch
    assert choose_backend('torch', CPU) == 'torch'
    assert choose_backend('onnxruntime', CPU) == 'onnxruntime'
    for kw in ({'half': 'bf16'}, {'half': 'on'}, {'augment': True}, {'need_raw_maps': True}):
        assert choose_backend('auto', CPU, **kw) == 'torch', kw  # only PyTorch gives these
        with pytest.raises(BackendError, match='--backend onnxruntime'):
            choose_backend('onnxruntime', CPU, **kw)
    with pytest.raises(BackendError, match='CPU only'):
        choose_backend('onnxruntime', CUDA)
    with pytest.raises(BackendError, match='expected one of auto, torch, onnxruntime'):
        choose_backend('openvino', CPU)


def test_auto_without_onnxruntime_runs_torch(monkeypatch):
    monkeypatch.setattr(backends, 'onnxruntime_available', lambda: False)
    assert choose_backend('auto', CPU) == 'torch'
    with pytest.raises(BackendError, match='not installed'):
        choose_backend('onnxruntime', CPU)


def test_cache_folder_override(monkeypatch, tmp_path):
    monkeypatch.setenv('YOLOV3_CACHE', str(tmp_path / 'mine'))
    assert cache_dir() == tmp_path / 'mine'
    monkeypatch.delenv('YOLOV3_CACHE')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert cache_dir() == tmp_path / 'xdg' / 'yolov3' / 'onnx'
    monkeypatch.delenv('XDG_CACHE_HOME')
    assert cache_dir() == Path.home() / '.cache' / 'yolov3' / 'onnx'


def test_export_reused_and_renewed_when_the_model_changes(cache):
    m = toy()
    path, fresh = cached_export(m, (64, 64))
    assert fresh and path.parent == cache and path.suffix == '.onnx'
    assert cached_export(m, (64, 64)) == (path, False)  # reused
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left
    other = toy()
    with torch.no_grad():
        other.module_list[0].Conv2d.bias[0] += 1e-3  # one number of the weights
    key = backends.export_key(m, (64, 64))  # the file's name: its changes are what a new export follows
    assert path.stem == key and backends.export_key(toy(), (64, 64)) == key
    assert backends.export_key(other, (64, 64)) != key
    assert backends.export_key(m, (96, 96)) != key  # another size
    recfg = Darknet(TOY_CFG.read_text().replace('[net]', '[net]\n# another cfg text'), 64).eval().fuse()
    recfg.load_state_dict(m.state_dict())
    assert backends.export_key(recfg, (64, 64)) != key


def test_export_failure_falls_back_to_torch_with_a_warning(monkeypatch, caplog):
    def refuse(*a, **k):
        raise RuntimeError('Exporting the operator foo to ONNX opset 17 is not supported')
    monkeypatch.setattr('utils.eval.export.export_onnx', refuse)
    m = toy()
    assert backends.runtime_for(m, 'onnxruntime', 64) is m
    assert 'could not be exported (RuntimeError: Exporting the operator foo' in caplog.text
    with pytest.raises(BackendError, match='--backend onnxruntime: the model could not be exported'):
        backends.runtime_for(m, 'onnxruntime', 64, strict=True)


def test_same_output_as_torch_at_other_shapes_and_batches():
    m = toy()
    run = backends.runtime_for(m, 'onnxruntime', 64)
    assert isinstance(run, OrtModel) and run.img_hw is None  # dynamic height and width: one session for test.py
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 3, 64, 64), (3, 3, 96, 64), (2, 3, 64, 128)):
        x = torch.rand(*shape, generator=g)
        with torch.no_grad():
            ref = m(x)[0]
        got = run(x.contiguous(memory_format=torch.channels_last))
        assert got.shape == ref.shape
        assert ((got - ref).abs() / ref.abs().clamp(min=1)).max() < 1e-5


def test_changed_weights_file_is_never_served_from_a_stale_export(tmp_path):
    weights = tmp_path / 'toy.weights'
    save_weights(toy(0, fused=False), weights)
    builds = []

    def build(size: int) -> Darknet:
        builds.append(size)
        return load_eval_model(weights, TOY_CFG, size, CPU)

    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    first = load_runtime(weights, TOY_CFG, 64, 'onnxruntime', build)
    again = load_runtime(weights, TOY_CFG, 64, 'onnxruntime', build)
    assert len(builds) == 1 and again.run.path == first.run.path  # a hit builds nothing
    assert (again.nc, again.img_size) == (3, 64)
    # same name, same size, same modification time, other numbers: a stat-based key would serve the old export
    st = weights.stat()
    save_weights(toy(1, fused=False), weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size
    new = load_runtime(weights, TOY_CFG, 64, 'onnxruntime', build)
    assert len(builds) == 2 and new.run.path != first.run.path
    with torch.no_grad():
        ref = build(64)(torch.from_numpy(x))[0]
    assert torch.allclose(new.run(x), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first.run(x), ref, rtol=1e-3, atol=1e-3)
    # another cfg text or size: another export too
    cfg2 = tmp_path / 'toy2.cfg'
    cfg2.write_text(TOY_CFG.read_text() + '\n')
    assert files_key(weights, cfg2, 64) != files_key(weights, TOY_CFG, 64) != files_key(weights, TOY_CFG, 96)


def test_torch_backend_writes_no_cache(cache):
    m = toy()
    assert backends.runtime_for(m, 'torch', 64) is m
    assert load_runtime('missing.weights', TOY_CFG, 64, 'torch', lambda s: m).run is m
    assert not cache.exists()


@pytest.mark.slow  # reads ../shared
def test_detections_equal_on_real_images():
    import cv2

    from utils.data.augmentations import letterbox

    model = load_eval_model(TINY_WEIGHTS, ROOT / 'cfg' / 'yolov3-tiny.cfg', 416, CPU)
    run = backends.runtime_for(model, 'onnxruntime', 416)
    for name in ('bus.jpg', 'zidane.jpg'):
        img = letterbox(cv2.imread(str(SAMPLES / name)), 416)[0]  # detect.py's minimum rectangle
        x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)))[None].float() / 255
        with torch.no_grad():
            ref = non_max_suppression(model(x)[0], 0.3, 0.6, multi_label=False)[0]
        got = non_max_suppression(run(x), 0.3, 0.6, multi_label=False)[0]
        assert len(got) == len(ref) >= 4
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-3)  # boxes within 1e-3 px, same classes and order


def test_session_options_follow_openmp_settings(monkeypatch):
    monkeypatch.setenv('OMP_WAIT_POLICY', 'PASSIVE')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    so = backends.session_options()
    assert so.intra_op_num_threads == 1 and so.get_session_config_entry('session.intra_op.allow_spinning') == '0'
    monkeypatch.delenv('OMP_WAIT_POLICY')
    monkeypatch.delenv('OMP_NUM_THREADS')
    so = backends.session_options()
    assert so.intra_op_num_threads == 0  # onnxruntime's default: one thread per core
    with pytest.raises(Exception, match='allow_spinning'):  # not set: spinning stays onnxruntime's default
        so.get_session_config_entry('session.intra_op.allow_spinning')


# ---------------------------------------------------------------------------------------------------------------
# detect.py's torch-free path: utils/eval/postprocess.py's numpy NMS against utils/eval/nms.py, the cache key without torch

def random_prediction(rng: np.random.Generator, n: int, nc: int, ties: bool = False) -> np.ndarray:
    """(2, n, 5 + nc) float32 inference output [xywh, obj, cls probs]; ties: a coarse grid of boxes and scores, so
    many candidates share a score and many boxes coincide."""
    xy, wh = rng.uniform(0, 200, (2, n, 2)), rng.uniform(1, 80, (2, n, 2))
    obj, cls = rng.uniform(0, 1, (2, n, 1)), rng.uniform(0, 1, (2, n, nc))
    if ties:
        xy, wh = np.round(xy / 10) * 10, np.round(wh / 10) * 10 + 5
        obj, cls = np.round(obj * 4) / 4, np.round(cls * 4) / 4
    return np.concatenate((xy, wh, obj, cls), 2).astype(np.float32)


OPTION_SETS = [dict(conf_thres=0.3, iou_thres=0.6, multi_label=False),  # detect.py's defaults
               dict(conf_thres=0.05, iou_thres=0.45, multi_label=True),
               dict(conf_thres=0.3, iou_thres=0.6, multi_label=False, classes=[0, 2], max_det=5),
               dict(conf_thres=0.1, iou_thres=0.5, multi_label=True, agnostic=True),
               dict(conf_thres=0.2, iou_thres=0.6, multi_label=False, merge=False, max_det=3)]


@pytest.mark.parametrize('n, nc, ties', [(40, 3, False), (400, 5, False), (300, 3, True), (40, 2, True)])
def test_numpy_nms_equals_torch_nms(n, nc, ties):
    from utils.eval import postprocess

    p = random_prediction(np.random.default_rng(n + nc), n, nc, ties)
    for opts in OPTION_SETS:
        ref = non_max_suppression(torch.from_numpy(p.copy()), **opts)
        got = postprocess.non_max_suppression(p.copy(), **opts)
        assert len(got) == len(ref) == 2
        for g, r in zip(got, ref):  # same rows in the same order, bit for bit (merged boxes included)
            assert g.dtype == np.float32 and np.array_equal(g, r.numpy()), opts
    assert sum(len(d) for d in got) > 0


@pytest.mark.slow  # seconds of NMS over thousands of candidates
def test_numpy_nms_above_torchvisions_vanilla_threshold():
    """Over 1000 candidates torchvision's batched_nms runs NMS class by class and sorts the kept boxes with an
    unstable sort: the same rows and scores come out, but boxes of equal score may be in another order."""
    from utils.eval import postprocess

    for seed, ties in ((1, True), (2, False)):  # even random scores tie now and then among thousands
        p = random_prediction(np.random.default_rng(seed), 3000, 3, ties)
        ref = non_max_suppression(torch.from_numpy(p.copy()), 0.05, 0.6)
        got = postprocess.non_max_suppression(p, 0.05, 0.6)
        for g, r in zip(got, ref):
            r = r.numpy()
            assert len(g) == len(r) > 1000 and np.array_equal(g[:, 4], r[:, 4])
            assert np.array_equal(g[np.lexsort(g.T[::-1])], r[np.lexsort(r.T[::-1])])


def test_numpy_scale_coords_and_constants_equal_torch_ones():
    from models import DEFAULT_CFG
    from utils.boxes import scale_coords
    from utils.eval import nms, postprocess

    boxes = np.random.default_rng(0).uniform(-20, 420, (50, 4)).astype(np.float32)
    for shape0 in ((480, 640), (1080, 810), (300, 300)):
        ref = scale_coords((320, 416), torch.from_numpy(boxes.copy()), shape0)
        assert np.array_equal(postprocess.scale_coords((320, 416), boxes.copy(), shape0), ref.numpy())
    assert (postprocess.MIN_WH, postprocess.MAX_WH, postprocess.MERGE_MAX) == (nms.MIN_WH, nms.MAX_WH, nms.MERGE_MAX)
    assert backends.DEFAULT_CFG == DEFAULT_CFG


def test_cpu_only_without_torch(monkeypatch):
    monkeypatch.setattr(backends.sys, 'platform', 'linux')
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    monkeypatch.setattr(backends.glob, 'glob', lambda p: ['/dev/nvidia0'])  # a GPU: torch decides
    assert backends.cpu_only('cpu') and not backends.cpu_only('') and not backends.cpu_only('0')
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')  # all hidden
    assert backends.cpu_only('')
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
    monkeypatch.setattr(backends.glob, 'glob', lambda p: [])
    monkeypatch.setattr(backends.os.path, 'exists', lambda p: False)
    assert backends.cpu_only('')
    monkeypatch.setattr(backends.sys, 'platform', 'win32')  # no cheap check there
    assert not backends.cpu_only('') and backends.cpu_only('cpu')
