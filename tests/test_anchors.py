"""Anchors: the fit of a model's anchors to the labels (the loss's matching rule), and the anchor tool writing a new
cfg, on a dataset of only small boxes where the default yolov3-tiny anchors fit badly."""
from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from models import Darknet
from tests.conftest import ROOT
from utils.boxes import wh_iou
from utils.darknet.parse_config import parse_model_cfg
from utils.data.datasets import DatasetOptions, LoadImagesAndLabels
from utils.logs import reset_logging
from utils.train.anchors import (
    AnchorError,
    anchor_fit,
    cfg_anchors,
    cfg_with_anchors,
    check_anchors,
    darknet_fit,
    fix_command,
    label_wh,
    main,
    parse_opt,
)
from utils.train.darknet_loss import DarknetLoss

TINY = ROOT / 'cfg' / 'yolov3-tiny.cfg'


def small_box_data(root, n_images: int = 6, boxes: int = 20, labels: bool = True, seed: int = 0):
    """A .data file over n grey 320x240 images, each with boxes of 6-10 px (at 320, the long side) if labels."""
    rng = np.random.default_rng(seed)
    (root / 'images').mkdir(parents=True)
    (root / 'labels').mkdir()
    for i in range(n_images):
        cv2.imwrite(str(root / 'images' / f'{i}.png'), np.full((240, 320, 3), 100, np.uint8))
        if labels:
            w, h = rng.uniform(6, 10, (2, boxes))
            x, y = rng.uniform(0.2, 0.8, (2, boxes))
            rows = [f'0 {a:.6f} {b:.6f} {c / 320:.6f} {d / 240:.6f}' for a, b, c, d in zip(x, y, w, h)]
            (root / 'labels' / f'{i}.txt').write_text('\n'.join(rows) + '\n')
    (root / 'one.names').write_text('dot\n')
    data = root / 'dots.data'
    data.write_text(f"classes=1\ntrain={root / 'images'}\nvalid={root / 'images'}\nnames={root / 'one.names'}\n")
    return data


def test_fit_is_the_loss_matching():
    wh = torch.tensor([[10.0, 10.0], [30.0, 30.0], [200.0, 20.0]])
    anchors = torch.tensor([[12.0, 12.0], [30.0, 40.0], [32.0, 32.0]])
    iou = wh_iou(wh, anchors)  # the rule build_targets applies (iou > iou_t)
    fitness, bpr, aat = anchor_fit(wh, anchors, 0.2)
    assert bpr == pytest.approx(2 / 3)  # the 200x20 box matches nothing (best IoU 0.146)
    assert aat == pytest.approx((1 + 2 + 0) / 3) == float((iou > 0.2).sum()) / 3  # 10x10: 12x12; 30x30: the two others
    assert fitness == pytest.approx((100 / 144 + 900 / 1024 + 0) / 3)  # best IoUs above 0.2, averaged over all
    # pixel sizes from normalised labels: long side scaled to the training size
    lb = [np.array([[0, 0.5, 0.5, 0.1, 0.2]], np.float32), np.zeros((0, 5), np.float32)]
    np.testing.assert_allclose(label_wh(lb, np.array([[640.0, 480.0], [10.0, 10.0]]), 320), [[32.0, 48.0]], rtol=1e-6)


def test_cfg_rewrite_keeps_everything_else():
    text = TINY.read_text().replace('\n', '\r\n').replace('anchors=10,14', 'anchors = 10,14', 1) + '# end\r\n'
    text = text.replace('344,319\r\n', '344,319  # coco\r\n', 1)
    new, n = cfg_with_anchors(text, np.array([[4, 5], [6, 7.4], [8, 9], [10, 11], [12, 13], [14, 15]]))
    assert n == 2
    old_lines, new_lines = text.splitlines(keepends=True), new.splitlines(keepends=True)
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert len(old_lines) == len(new_lines) and len(changed) == 2
    assert changed[0][1] == 'anchors = 4,5,  6,7,  8,9,  10,11,  12,13,  14,15  # coco\r\n'
    assert changed[1][1] == 'anchors=4,5,  6,7,  8,9,  10,11,  12,13,  14,15\r\n'
    with pytest.raises(AnchorError, match='no anchors= line'):
        cfg_with_anchors('[net]\nwidth=32\n[convolutional]\nfilters=4\n', np.ones((1, 2)))


@pytest.mark.slow
def test_small_boxes_new_anchors_fit(tmp_path, capsys, caplog, monkeypatch):
    data = small_box_data(tmp_path / 'dots')
    out = tmp_path / 'tiny-dots.cfg'
    before = TINY.read_bytes()
    assert main(parse_opt(['--data', str(data), '--cfg', str(TINY), '--img-size', '320', '--out', str(out),
                           '--gen', '100', '--seed', '3'])) == 0
    log = capsys.readouterr().out
    assert TINY.read_bytes() == before  # the input is never touched
    fit = {k: (float(f), float(b)) for k, f, b in
           re.findall(r'^(before|after).*?: fitness ([\d.]+), BPR ([\d.]+), [\d.]+ anchors per target', log, re.M)}
    # 6-10 px boxes match none of the anchors tiny's masks use (3,4,5 and 1,2,3: 23x27 and up; the unused first
    # anchor, 10x14, would match most of them: the fit must follow the masks as the loss does)
    assert fit['before'] == (0.0, 0.0) and fit['after'][1] >= 0.98 and fit['after'][0] > 0.5

    # the new cfg: only the two anchors= lines differ; anchors sorted by area, masks as they were
    a, b = TINY.read_text().splitlines(), out.read_text().splitlines()
    assert len(a) == len(b) and [i for i, (x, y) in enumerate(zip(a, b)) if x != y] == \
        [i for i, x in enumerate(a) if x.startswith('anchors=')]
    anchors, masks = cfg_anchors(out)
    assert len(anchors) == 6 and (np.diff(anchors.prod(1)) >= 0).all() and masks == cfg_anchors(TINY)[1]
    assert anchors.max() < 23  # sized for the small boxes

    # the check train.py runs: the default anchors warn with the command to run; the new ones pass
    reset_logging()  # main() set the logger up as a script's: a library's again, so caplog sees its records
    ds = LoadImagesAndLabels(str(tmp_path / 'dots' / 'images'), DatasetOptions(img_size=320))
    model = Darknet(str(TINY))  # built first: its cfg line (keys not used here) is not the check's
    with caplog.at_level(logging.INFO, logger='yolov3'):
        bpr = check_anchors(ds, model, 320, 0.2, data=str(data), cfg=str(TINY))
    logs = caplog.messages
    assert bpr < 0.98 and re.fullmatch(r'anchors: BPR 0\.\d{4}, \d+\.\d\d anchors per target at 320 \(iou_t 0\.2\)',
                                       logs[0])
    assert caplog.records[1].levelname == 'WARNING' and f'python -m utils.train.anchors --data {data} --cfg {TINY} --img-size 320' in logs[1]
    # run from another folder, the command still works when pasted: a cd to the root, absolute paths
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert fix_command('my.data', str(TINY), 320) == (f'cd {ROOT} && python -m utils.train.anchors --data '
                                                         f'{tmp_path / "my.data"} --cfg {TINY} --img-size 320')
    caplog.clear()
    model = Darknet(str(out))
    with caplog.at_level(logging.INFO, logger='yolov3'):
        bpr_new = check_anchors(ds, model, 320, 0.2)
    assert bpr_new >= 0.98 and len(caplog.messages) == 1 and bpr_new == pytest.approx(fit['after'][1], abs=1e-4)
    # under Darknet's best-anchor rule too: the anchor no mask uses (yolov3-tiny's first) takes no label
    assert anchors[0].tolist() == [2, 2]
    assert check_anchors(ds, Darknet(str(out)), 320, 0.2, loss='darknet') >= 0.98

    # reproducible from the seed
    out2 = tmp_path / 'again.cfg'
    main(parse_opt(['--data', str(data), '--cfg', str(TINY), '--img-size', '320', '--out', str(out2),
                    '--gen', '100', '--seed', '3']))
    assert out2.read_bytes() == out.read_bytes()


@pytest.mark.slow
def test_anchor_tool_errors(tmp_path, capsys):
    data = small_box_data(tmp_path / 'dots', n_images=2, boxes=3)
    cfg = tmp_path / 'mine.cfg'
    cfg.write_bytes(TINY.read_bytes())
    empty = small_box_data(tmp_path / 'empty', n_images=2, labels=False)
    files = sorted(p.name for p in tmp_path.iterdir())

    # the command line: the input as the output is refused with one line, exit 1
    r = subprocess.run([sys.executable, '-m', 'utils.train.anchors', '--data', str(data), '--cfg', str(cfg), '--img-size',
                        '320', '--out', str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == f'Error: {cfg}: output cfg exists; give another --out (nothing written)\n'
    assert cfg.read_bytes() == TINY.read_bytes()

    def run(*args: str) -> int:
        return main(parse_opt(['--gen', '5', '--img-size', '320', *args]))

    with pytest.raises(AnchorError, match=re.escape(f'{empty}: no labels in the training images')):
        run('--data', str(empty), '--cfg', str(cfg))
    with pytest.raises(AnchorError, match=re.escape(f'{data}: none of the 6 label boxes is larger than 4 px')):
        run('--data', str(data), '--cfg', str(cfg), '--img-size', '128')  # 2.4-4 px there: the loader drops them
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no cfg written

    assert run('--data', str(data), '--cfg', str(cfg)) == 0  # the default output: beside the cfg
    out = tmp_path / 'mine-dots-anchors.cfg'
    assert f'wrote {out}' in capsys.readouterr().out and parse_model_cfg(out)
    stamp = out.stat().st_mtime_ns
    with pytest.raises(AnchorError, match=re.escape(f'{out}: output cfg exists')):
        run('--data', str(data), '--cfg', str(cfg))  # again: that output exists now
    assert out.stat().st_mtime_ns == stamp


def test_darknet_rule_and_advice_when_fine_tuning(tmp_path, caplog, monkeypatch):
    # yolov3-tiny: anchor 0 (10x14) is in no mask, anchor 3 (81x82) in both; Darknet assigns the best of all six
    configs = DarknetLoss(Darknet(str(TINY))).configs
    wh = torch.tensor([[10.0, 14.0], [80.0, 80.0], [300.0, 300.0], [12.0, 30.0]])
    bpr, aat = darknet_fit(wh, configs)
    assert bpr == pytest.approx(3 / 4) and aat == pytest.approx((0 + 2 + 1 + 1) / 4)  # 12x30: 23x27
    # iou_thresh adds every masked anchor above it (yolov4-tiny's iou_thresh 0.213 style)
    loose = [dataclasses.replace(c, iou_thresh=0.2) for c in configs]
    assert darknet_fit(wh, loose)[1] > aat

    data = small_box_data(tmp_path / 'dots', n_images=2, boxes=5)
    ds = LoadImagesAndLabels(str(tmp_path / 'dots' / 'images'), DatasetOptions(img_size=320))
    model = Darknet(str(TINY))
    with caplog.at_level(logging.INFO, logger='yolov3'):
        bpr = check_anchors(ds, model, 320, 0.2, data=str(data), cfg=str(TINY), loss='darknet',
                            pretrained=True)
    logs = caplog.messages
    assert bpr < 0.98 and logs[0].endswith("at 320 (Darknet's best anchor)")
    # starting from weights: what the figure means, keep the weights' anchors, no warning asking to replace them
    assert caplog.records[1].levelname == 'INFO' and 'keep them when fine-tuning' in logs[1] and 'from scratch' in logs[1]
    assert 'train with the cfg it writes' not in logs[1]
