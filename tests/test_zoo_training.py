"""Darknet's template flow: a cfg of AlexeyAB/darknet's cfg/ (../shared/darknet-zoo) with classes and filters set
for a custom dataset trains here, new_coords heads (yolov7-tiny) under --loss darknet included."""
from __future__ import annotations

import math

import pytest

import train
from tests.conftest import SHARED, make_synthetic
from utils.darknet.parse_config import cfg_with_classes


@pytest.mark.slow
def test_yolov7_tiny_template_trains_with_darknets_loss(tmp_path):
    # (the default loss on new_coords heads: tests/test_loss.py, without a training run)
    src = SHARED / 'darknet-zoo' / 'yolov7-tiny.cfg'
    cfg = tmp_path / 'yolov7-tiny-3c.cfg'
    cfg.write_text(cfg_with_classes(src.read_text(), 3, str(src)))  # classes=3, filters=24 before each [yolo]
    data = make_synthetic(tmp_path / 'data', 4, nc=3)
    args = ['--cfg', str(cfg), '--data', str(data), '--weights', '', '--img-size', '128', '--epochs', '1',
            '--batch-size', '4', '--device', 'cpu', '--workers', '0', '--loss', 'darknet', '--notest',
            '--save-dir', str(tmp_path / 'run')]
    assert train.main(train.parse_opt(args)) == 0
    row = (tmp_path / 'run' / 'results.txt').read_text().split()
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in row[2:6])  # box, obj, cls, total
    assert (tmp_path / 'run' / 'weights' / 'last.pt').is_file()
