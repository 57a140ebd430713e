"""Shared paths and small datasets for the tests; ../shared is read-only and never written."""
from __future__ import annotations

import os
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
