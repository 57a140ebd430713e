"""Shared paths and small datasets for the tests; ../shared is read-only and never written.

Two tiers (pytest.ini): the fast one (`-m "not slow"`) runs on tests/fixtures/toy.cfg and synthetic data, needs no
../shared and starts no process (no command line, DDP rank or DataLoader worker: fast_tier_starts_no_process); tests
marked slow run command lines, DDP groups and benchmarks, and read ../shared (YOLO_SHARED moves it; point it at an
empty folder to check that the fast tier does not need it). Tests marked gpu (tests/test_gpu.py) are skipped where
torch sees no CUDA device; --gpu-report, --gpu-logs and --gpu-budget (tests/gpu_report.py) serve their device runs.
"""
from __future__ import annotations

import logging
import multiprocessing.process
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from benchmarks import subset
from tests import gpu_report
from utils.logs import reset_logging

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('YOLO_SHARED', ROOT.parent / 'shared')).resolve()
COCO128 = SHARED / 'datasets' / 'coco128'
COCO128_IMAGES = COCO128 / 'images' / 'train2017'
COCO_NAMES = COCO128 / 'coco.names'
TINY_WEIGHTS = SHARED / 'weights' / 'yolov3-tiny.weights'
REF_CFG = SHARED / 'darknet-cfg'
SAMPLES = SHARED / 'samples'
TOY_CFG = ROOT / 'tests' / 'fixtures' / 'toy.cfg'  # 41k parameters, 3 classes, heads at strides 32 and 16


def pytest_addoption(parser) -> None:
    parser.addoption('--test-order', default='file', choices=('file', 'reverse'),
                     help="'reverse': run the collected tests last to first (.ci/run does, on the fast tier: a test "
                          "that passes only after another one has run fails there)")
    gpu_report.add_options(parser)


def pytest_configure(config) -> None:
    gpu_report.configure(config)


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption('--test-order') == 'reverse':
        items.reverse()
    gpu_report.skip_gpu_without_cuda(items)


@pytest.fixture(autouse=True, scope='session')
def onnx_cache(tmp_path_factory) -> Iterator[Path]:
    """The ONNX export cache of detect.py/test.py's onnxruntime backend (utils/eval/backends.py) in a temporary folder for
    the whole session, subprocesses included (they inherit the variable): the tests never write into ~/.cache."""
    folder = tmp_path_factory.mktemp('onnx_cache')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('YOLOV3_CACHE', str(folder))
        yield folder


@pytest.fixture(autouse=True)
def library_logger() -> Iterator[None]:
    """Every test starts and ends with the project logger as a library leaves it (utils.logs.reset_logging): a
    command line run in-process by an earlier test (setup_logging: handlers, no propagation) changes nothing here."""
    reset_logging()
    yield
    reset_logging()


@pytest.fixture
def logged(caplog) -> Callable[[], list[str]]:
    """A function returning what the project logger said so far in this test (the lines rank 0 prints)."""
    caplog.set_level(logging.INFO, logger='yolov3')
    return lambda: [r.getMessage() for r in caplog.records if r.name == 'yolov3']


@pytest.fixture(autouse=True)
def fast_tier_starts_no_process(request, monkeypatch) -> None:
    """A test not marked slow that runs Python or torchrun in a subprocess, or starts a multiprocessing child (DDP
    ranks, DataLoader workers), fails, naming the marker. Other programs pass: libraries run some on first use
    (ctypes' ldconfig when torch loads, matplotlib's fc-list on an empty font cache)."""
    if request.node.get_closest_marker('slow') is not None:
        return

    def refuse(*args, **kwargs):
        raise RuntimeError(f'{request.node.nodeid} starts a process: mark it @pytest.mark.slow (the fast tier '
                           f'starts none)')

    real_init = subprocess.Popen.__init__

    def popen_init(self, args, *rest, **kwargs):
        prog = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
        name = Path(os.fsdecode(prog).split()[0] if prog else '').name
        if name.startswith('python') or name in (Path(sys.executable).name, 'torchrun'):
            refuse()
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, '__init__', popen_init)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, 'start', refuse)


def make_subset(dst: Path, n: int | None = None, start: int = 0, name: str = 'subset') -> Path:
    """Copy n coco128 images (sorted, from start) and their labels under dst/images, dst/labels; return a .data file."""
    return subset.make_subset(COCO128, dst, n, start, name=name).data


@pytest.fixture(scope='session')
def coco128_data(tmp_path_factory) -> Path:
    """A .data file training and validating on the whole of ../shared coco128 (read in place)."""
    d = tmp_path_factory.mktemp('coco128data')
    data = d / 'coco128.data'
    data.write_text(f"classes=80\ntrain={COCO128_IMAGES}\nvalid={COCO128_IMAGES}\nnames={COCO_NAMES}\n")
    return data


@pytest.fixture(scope='session')
def coco16_data(tmp_path_factory) -> Path:
    """A .data file over a writable copy of the first 16 coco128 images."""
    return make_subset(tmp_path_factory.mktemp('coco16'), 16, name='coco16')


def make_synthetic(dst: Path, n: int = 16, nc: int = 3, seed: int = 0) -> Path:
    """n JPEGs of n different aspect ratios (about 100-250 px a side) with 1-3 labelled boxes of nc classes each
    (boxes drawn as solid colours on noise) under dst/images, dst/labels; return a .data file over them."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    (dst / 'images').mkdir(parents=True, exist_ok=True)
    (dst / 'labels').mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 100 + 150 * i // max(n - 1, 1), 250 - 150 * i // max(n - 1, 1)  # tall to wide, one ratio each
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        rows = []
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(0, nc))
            bw, bh = rng.uniform(0.1, 0.5, 2)
            x, y = rng.uniform(bw / 2, 1 - bw / 2), rng.uniform(bh / 2, 1 - bh / 2)
            x0, y0 = int((x - bw / 2) * w), int((y - bh / 2) * h)
            img[y0:y0 + int(bh * h), x0:x0 + int(bw * w)] = (40 * c, 255 - 40 * c, 128)
            rows.append(f'{c} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}')
        cv2.imwrite(str(dst / 'images' / f'{i:03d}.jpg'), img)
        (dst / 'labels' / f'{i:03d}.txt').write_text('\n'.join(rows) + '\n')
    names = dst / 'toy.names'
    names.write_text(''.join(f'class{c}\n' for c in range(nc)))
    data = dst / 'synthetic.data'
    data.write_text(f"classes={nc}\ntrain={dst / 'images'}\nvalid={dst / 'images'}\nnames={names}\n")
    return data


@pytest.fixture(scope='session')
def synthetic16_data(tmp_path_factory) -> Path:
    """A .data file over 16 synthetic images of 16 aspect ratios, 3 classes (fast tier: no ../shared)."""
    return make_synthetic(tmp_path_factory.mktemp('synthetic16'))
