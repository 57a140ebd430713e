"""test.py as users and train.py run it: the coco128 mAP of the original, pycocotools, custom-data COCO metrics."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn
import yaml

from tests.conftest import ROOT, TINY_WEIGHTS
from utils.data.coco import coco80_to_coco91_class

CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'


def run_testpy(*args: str) -> subprocess.CompletedProcess:
    """python test.py ARGS from the repository root."""
    return subprocess.run([sys.executable, 'test.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def all_row(stdout: str) -> list[float]:
    """The numbers of the table's `all` row: images, targets, P, R, mAP@0.5, mAP@0.5:0.95, F1."""
    m = re.search(r'^\s+all\s+(.*)$', stdout, re.M)
    assert m, stdout[-3000:]
    return [float(v) for v in m.group(1).split()]


@pytest.mark.slow
def test_coco128_map_matches_original(coco128_data, tmp_path):
    # the acceptance run (~20 s): the original gives P 0.375, R 0.44, mAP@0.5 0.424; pycocotools AP50 0.436, AP 0.231
    r = run_testpy('--cfg', str(CFG), '--data', str(coco128_data), '--weights', str(TINY_WEIGHTS), '--img-size',
                   '416', '--batch-size', '16', '--device', 'cpu', '--save-json', '--save-dir', str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    images, targets, p, rec, map50, map_, f1 = all_row(r.stdout)
    assert (images, targets) == (128, 929)  # 939 COCO boxes less the 10 crowd boxes the YOLO labels leave out
    assert map50 == pytest.approx(0.424, abs=0.005)
    assert re.search(r'^Runtime: onnxruntime .* fp32, new export ', r.stdout, re.M)  # --backend auto on the CPU
    assert p == pytest.approx(0.375, abs=0.01) and rec == pytest.approx(0.44, abs=0.01)
    assert 0.15 < map_ < map50
    assert re.search(r'^\s+person\s+128\s+254\s', r.stdout, re.M)  # the per-class table
    assert re.search(r'Speed: [\d.]+/[\d.]+/[\d.]+ ms inference/NMS/total', r.stdout)
    coco_ap, coco_ap50 = (float(v) for v in re.search(r'pycocotools: AP@\[\.5:\.95\] ([\d.]+)\s+AP50 ([\d.]+)',
                                                       r.stdout).groups())
    assert abs(coco_ap50 - map50) < 0.025 and coco_ap == pytest.approx(0.23, abs=0.01)
    preds = json.loads((tmp_path / 'predictions.json').read_text())
    assert {'image_id', 'category_id', 'bbox', 'score'} <= set(preds[0])
    cats = {d['category_id'] for d in preds}
    assert cats <= set(coco80_to_coco91_class()) and max(cats) > 80  # COCO's 91-class ids, not 0-79
    import cv2

    gt, pred = (cv2.imread(str(tmp_path / f'test_batch0_{k}.jpg')).astype(int) for k in ('gt', 'pred'))
    assert gt.shape == pred.shape and gt.shape[0] > 500  # the first batch: 16 images as a 4 x 4 mosaic
    assert (np.abs(gt - pred).max(2) > 60).mean() > 0.01  # other boxes drawn on the same images
    assert cv2.imread(str(tmp_path / 'precision_recall_curve.png')).shape == (900, 1500, 3)
    for f in ('P_curve.png', 'R_curve.png', 'F1_curve.png'):  # 71 classes: grey lines and the bold blue mean
        img = cv2.imread(str(tmp_path / f)).astype(int)
        assert img.shape == (900, 1500, 3), f
        plot_area = img[41:820, 91:990]
        assert (np.abs(plot_area - (255, 0, 0)).sum(-1) < 60).sum() > 1000, f
        assert (np.abs(plot_area - (160, 160, 160)).sum(-1) < 30).sum() > 1000, f
    from utils.eval.plots import blues, matrix_geometry

    g = matrix_geometry((ROOT / 'data' / 'coco.names').read_text().split('\n')[:80] + ['background'])
    cm = cv2.imread(str(tmp_path / 'confusion_matrix.png'))
    assert cm.shape == (g.height, g.width, 3)

    def value(row: int, col: int) -> float:  # a cell's colour read back as its value on the colour ramp
        bgr = cm[g.top + row * g.cell + 2, g.left + col * g.cell + 2].astype(int)
        return float(min(np.linspace(0, 1, 201), key=lambda v: np.abs(np.array(blues(v)) - bgr).sum()))

    found, missed = value(0, 0), value(80, 0)  # of the 254 persons at conf 0.25 / IoU 0.45: about half each
    assert 0.35 < found < 0.65 and 0.3 < missed < 0.65 and found + missed <= 1.01, (found, missed)


@pytest.mark.slow
def test_in_process_with_loss_and_custom_coco_gt(coco16_data, tmp_path):
    # as train.py calls it: its own model (train mode before and after), its own dataloader and loss function;
    # the subset has no COCO annotation file, so the ground truth JSON is written from the YOLO labels
    import torch

    from models import load_model
    from test import EvalConfig, eval_names, evaluate
    from utils.data.config import load_data_config
    from utils.data.datasets import DatasetOptions, LoaderOptions, create_dataloader
    from utils.train.loss import ComputeLoss

    data = load_data_config(coco16_data)
    model = load_model(TINY_WEIGHTS, CFG, 256)
    compute_loss = ComputeLoss(model, yaml.safe_load((ROOT / 'data' / 'hyp.scratch.yaml').read_text()))
    model.train()
    loader, dataset = create_dataloader(data['valid'], DatasetOptions(img_size=256, batch_size=8, pad=0.5, rect=True),
                                        LoaderOptions(shuffle=False, workers=0))
    names = eval_names(data, model, single_cls=False)
    r = evaluate(model, loader, names, EvalConfig(save_json=True, save_dir=tmp_path), compute_loss)
    assert model.training
    assert len(r.results) == 8 and r.maps.shape == (80,) and len(r.times) == 3 and r.seen == 16
    p, rec, map50, map_, f1, lbox, lobj, lcls = r.results
    assert (p, rec, map50, map_, f1) == (r.mp, r.mr, r.map50, r.map, r.mf1)
    assert 0.3 < map50 < 0.9 and 0 < map_ < map50
    assert lbox > 0 and lobj > 0 and lcls > 0
    assert 0 < r.maps[0] < 1  # person (class 0) has targets in the subset: its own mAP@0.5:0.95
    assert r.nt.sum() == sum(len(x) for x in dataset.labels) and r.per_class is not None
    gt = json.loads((tmp_path / 'ground_truth.json').read_text())
    assert len(gt['images']) == 16 and len(gt['annotations']) == sum(len(x) for x in dataset.labels)
    # COCO's evaluation of the same detections agrees with ours at IoU 0.5
    from utils.data.coco import coco_evaluate
    stats = coco_evaluate(tmp_path / 'ground_truth.json', tmp_path / 'predictions.json', verbose=False)
    assert abs(stats[1] - map50) < 0.03
    # no loss function (the command line): the losses are zeros
    plain = evaluate(model, loader, names, EvalConfig(plots=False, save_dir=tmp_path))
    assert plain.loss == (0.0, 0.0, 0.0) and plain.map50 == pytest.approx(map50)
    # test-time augmentation (flip + two scales, merged before NMS): a different, still sound, result
    tta = evaluate(model, loader, names, EvalConfig(augment=True, plots=False, save_dir=tmp_path))
    assert tta.map50 != map50 and abs(tta.map50 - map50) < 0.15
    assert torch.is_grad_enabled()
    # onnxruntime on the model's export: the same scores; the losses and --augment need PyTorch
    ort = evaluate(model, loader, names, EvalConfig(plots=False, save_dir=tmp_path, backend='onnxruntime'))
    assert model.training and ort.seen == plain.seen
    np.testing.assert_allclose(ort.results[:5], plain.results[:5], atol=1e-4)
    from test import EvalError
    with pytest.raises(EvalError, match='validation losses need the PyTorch model'):
        evaluate(model, loader, names, EvalConfig(plots=False, save_dir=tmp_path, backend='onnxruntime'), compute_loss)
    auto = evaluate(model, loader, names, EvalConfig(plots=False, save_dir=tmp_path, backend='auto'), compute_loss)
    assert auto.loss == r.loss  # auto: PyTorch, which gives the losses


@pytest.mark.slow
def test_benchmark_task_writes_table(coco16_data, tmp_path):
    from models import load_model
    from test import benchmark
    from utils.data.config import load_data_config

    model = load_model(TINY_WEIGHTS, CFG, 160).fuse()
    opt = Namespace(cfg=str(CFG), batch_size=16, conf_thres=0.001, single_cls=False, workers=0, save_dir=tmp_path,
                    backend='auto')
    out = benchmark(opt, model, load_data_config(coco16_data), sizes=[160, 224], ious=(0.6,))
    y = np.loadtxt(out, ndmin=2)
    assert y.shape == (2, 11) and y[:, 0].tolist() == [160, 224]
    assert (y[:, 4] > 0.1).all()  # mAP@0.5 at both sizes


@pytest.mark.slow
def test_missing_dataset_is_a_clear_error(tmp_path):
    bad = tmp_path / 'bad.data'
    bad.write_text(f'classes=80\ntrain={tmp_path}/nothing\nvalid={tmp_path}/nothing\n')
    r = run_testpy('--cfg', str(CFG), '--data', str(bad), '--weights', str(TINY_WEIGHTS), '--device', 'cpu')
    assert r.returncode != 0
    assert f'{tmp_path}/nothing' in r.stderr and 'Traceback' not in r.stderr


def test_row_labels_from_data_else_checkpoint():
    from test import eval_names

    model = nn.Linear(1, 1)
    model.names = ['person', 'car']  # as models.load_model sets it from a checkpoint
    unnamed = {'nc': 2, 'names': ['class0', 'class1']}  # load_data_config's placeholders for a .data without names
    assert eval_names(unnamed, model, single_cls=False) == ['person', 'car']
    assert eval_names({'nc': 2, 'names': ['cat', 'dog']}, model, single_cls=False) == ['cat', 'dog']  # data wins
    assert eval_names(unnamed, nn.Linear(1, 1), single_cls=False) == ['class0', 'class1']  # nothing carried
    assert eval_names(unnamed, model, single_cls=True) == ['object']


def test_class_names_one_rule():
    # test.py's rows and detect.py's labels: listed names (a dataset's, --names) win, a config's placeholders count
    # as none, then the checkpoint's (when they are nc), COCO's for 80 classes, else the placeholders
    from utils.data.config import DatasetError, class_names, placeholder_names

    assert class_names(2, ['cat', 'dog'], ['person', 'car']) == ['cat', 'dog']
    assert class_names(2, placeholder_names(2), ['person', 'car']) == ['person', 'car']
    assert class_names(2, None, ['person', 'car']) == ['person', 'car']
    assert class_names(2, None, ['person']) == ['class0', 'class1']  # carried names of another head: not these
    assert class_names(80, placeholder_names(80))[:2] == ['person', 'bicycle']
    assert class_names(3) == ['class0', 'class1', 'class2']
    with pytest.raises(DatasetError, match='two.names: 2 class names but the model has 1 classes'):
        class_names(1, ['pedestrian', 'cyclist'], source='two.names')


@pytest.mark.slow
def test_half_fp16_on_the_cpu_is_a_clear_error_and_writes_nothing(coco16_data, tmp_path):
    out = tmp_path / 'out'
    r = run_testpy('--cfg', str(CFG), '--weights', str(TINY_WEIGHTS), '--data', str(coco16_data), '--device', 'cpu',
                   '--half', 'fp16', '--save-dir', str(out))
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert '--half fp16 needs a CUDA device' in r.stderr and not out.exists()


@pytest.mark.slow
def test_darknet_map_is_darknets(coco16_data, tmp_path):
    # test.py --darknet on the first 16 coco128 images: Darknet's `detector map` gave the fixture's mAP@0.50 (its own
    # figures at --img-size 256 to save time; Darknet's are at the cfg's 416 whatever --img-size says)
    from tests.conftest import REF_CFG
    meta = json.loads((ROOT / 'tests' / 'fixtures' / 'darknet_detect' / 'map_yolov3-tiny.json').read_text())
    assert [Path(i).name for i in meta['images']] == sorted(p.name for p in (coco16_data.parent / 'images').iterdir())
    r = run_testpy('--darknet', '--cfg', str(REF_CFG / 'yolov3-tiny.cfg'), '--data', str(coco16_data), '--weights',
                   str(TINY_WEIGHTS), '--img-size', '256', '--device', 'cpu', '--workers', '0',
                   '--save-dir', str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert all_row(r.stdout)[0] == 16  # its own figures too
    m = re.search(r'mean average precision \(mAP@0\.50\) = ([\d.]+)', r.stdout)
    assert m and f"{float(m.group(1)):.6f}" == f"{meta['darknet']['map']:.6f}", r.stdout[-2000:]  # Darknet's figure
    assert len(re.findall(r'^class_id = \d+, name = .+, ap = [\d.]+%', r.stdout, re.M)) == 80


def test_darknet_refusals_write_nothing(tmp_path):
    from test import EvalError, load, parse_opt
    for args, match in ((['--single-cls'], '--single-cls'), (['--half', 'bf16'], '--half bf16'),
                        (['--task', 'study'], '--task study')):
        with pytest.raises(EvalError, match=f'--darknet scores the PyTorch model .*{match}'):
            load(parse_opt(['--darknet', '--weights', 'x.weights', '--save-dir', str(tmp_path / 's'), *args]))
    assert not (tmp_path / 's').exists()


def test_evaluate_writes_nothing_unless_asked(tmp_path, monkeypatch, logged):
    """evaluate() as a library function: no folder, no file (not in save_dir, not in the working directory) unless
    plots or save_json ask; the table and speed line go to the project logger."""
    from models import Darknet
    from test import EvalConfig, evaluate, val_loader
    from tests.conftest import TOY_CFG, make_synthetic
    from utils.data.config import load_data_config

    data = load_data_config(make_synthetic(tmp_path / 'data', n=4))
    model = Darknet(TOY_CFG, 64)
    loader = val_loader(data, 64, 4, model, single_cls=False, workers=0)  # the label cache is written here
    (tmp_path / 'cwd').mkdir()
    monkeypatch.chdir(tmp_path / 'cwd')
    before = sorted(tmp_path.rglob('*'))
    r = evaluate(model, loader, data['names'], EvalConfig(save_dir=tmp_path / 'out'))
    assert sorted(tmp_path.rglob('*')) == before and r.seen == 4
    lines = logged()
    assert re.match(r'\s+all\s+4\s+\d+', lines[-2]) and lines[-1].startswith('Speed: ')
