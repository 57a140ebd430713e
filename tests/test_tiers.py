"""The test tiers themselves (fast): a test not marked slow cannot run Python or torchrun in a subprocess or start a
multiprocessing child, and the toy cfg and synthetic data the fast tier uses are what they say."""
from __future__ import annotations

import ctypes.util
import multiprocessing as mp
import subprocess
import sys

import pytest

from tests.conftest import TOY_CFG, make_synthetic


def test_fast_test_cannot_run_python_or_start_a_child():
    for cmd, shell in (([sys.executable, '-c', 'pass'], False), ('python3 -c pass', True), (['torchrun'], False)):
        with pytest.raises(RuntimeError, match=r'test_tiers.py::.* starts a process: mark it @pytest.mark.slow'):
            subprocess.run(cmd, shell=shell)
    with pytest.raises(RuntimeError, match='mark it @pytest.mark.slow'):
        mp.get_context('spawn').Process(target=print).start()


def test_fast_test_may_run_the_programs_libraries_run(monkeypatch):
    """Libraries run helper programs on first use (ctypes' ldconfig when torch loads, matplotlib's fc-list): the
    guard lets them through, and they give their answers."""
    started = []
    guarded = subprocess.Popen.__init__  # the tier's guard, installed by tests/conftest.py

    def recording(self, args, *rest, **kwargs):
        started.append(args)
        guarded(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, '__init__', recording)
    assert ctypes.util.find_library('c').startswith('libc.so')  # found by running `ldconfig -p`
    assert any('ldconfig' in str(a[0]) for a in started), started


def test_toy_cfg_and_synthetic_data_are_small(tmp_path):
    import cv2
    import numpy as np

    from models import Darknet
    from utils.data.config import load_data_config
    model = Darknet(TOY_CFG, 64)
    assert sum(p.numel() for p in model.parameters()) < 50_000 and len(model.yolo_layers) == 2 and model.nc == 3
    data = load_data_config(make_synthetic(tmp_path, n=4))
    images = sorted((tmp_path / 'images').glob('*.jpg'))
    assert data['nc'] == 3 and data['train'] == str(tmp_path / 'images') and len(images) == 4
    shapes = [cv2.imread(str(f)).shape[:2] for f in images]
    assert len({h / w for h, w in shapes}) == 4 and max(max(s) for s in shapes) <= 250  # 4 aspect ratios, small
    for f in images:
        rows = np.loadtxt(tmp_path / 'labels' / f'{f.stem}.txt', ndmin=2)
        assert 1 <= len(rows) <= 3 and set(rows[:, 0]) <= {0, 1, 2} and ((rows[:, 1:] > 0) & (rows[:, 1:] < 1)).all()
