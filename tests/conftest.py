"""Shared paths and small datasets for the tests; ../shared is read-only and never written.

Two tiers (pytest.ini): the fast one (`-m "not slow"`) runs on tests/fixtures/toy.cfg and synthetic data, needs no
../shared and starts no process, which fast_tier_starts_no_process enforces; tests marked slow run command lines, DDP
groups and benchmarks, and read ../shared (YOLO_SHARED moves it; point it at an empty folder to check that the fast
tier does not need it).
"""
from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import subset

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('YOLO_SHARED', ROOT.parent / 'shared')).resolve()
COCO128 = SHARED / 'datasets' / 'coco128'
COCO128_IMAGES = COCO128 / 'images' / 'train2017'
COCO_NAMES = COCO128 / 'coco.names'
TINY_WEIGHTS = SHARED / 'weights' / 'yolov3-tiny.weights'
REF_CFG = SHARED / 'darknet-cfg'
SAMPLES = SHARED / 'samples'
TOY_CFG = ROOT / 'tests' / 'fixtures' / 'toy.cfg'  # 41k parameters, 3 classes, heads at strides 32 and 16


@pytest.fixture(autouse=True)
def fast_tier_starts_no_process(request, monkeypatch) -> None:
    """A test not marked slow that starts a subprocess or a multiprocessing child fails, naming the marker."""
    if request.node.get_closest_marker('slow') is not None:
        return

    def refuse(*args, **kwargs):
        raise RuntimeError(f'{request.node.nodeid} starts a process: mark it @pytest.mark.slow (the fast tier '
                           f'starts none)')

    monkeypatch.setattr(subprocess.Popen, '__init__', refuse)
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
