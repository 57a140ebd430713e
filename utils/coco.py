"""COCO-format helpers: class-id maps, image ids, predictions and ground truth as COCO JSON, pycocotools scoring."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


def coco80_to_coco91_class() -> list[int]:
    """COCO's 91-index category id of each of the 80 Darknet/YOLO class indices (the paper's ids, with gaps)."""
    return [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
            34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
            62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def numeric_image_id(path: str | os.PathLike) -> int | None:
    """COCO image id from a file name: the number after its last '_' (COCO_val2014_000000000042.jpg -> 42) or None."""
    tail = Path(path).stem.split('_')[-1]
    return int(tail) if tail.isdigit() else None


def image_ids(paths: Sequence[str | os.PathLike]) -> dict[str, int]:
    """Map each image path to an integer id: its numeric file name where every name is numeric and unique,
    otherwise its 1-based position in sorted order (custom datasets), so predictions and ground truth agree."""
    keys = [str(p) for p in paths]
    ids = [numeric_image_id(p) for p in keys]
    if all(i is not None for i in ids) and len(set(ids)) == len(ids):
        return dict(zip(keys, ids))
    return {k: i + 1 for i, k in enumerate(sorted(keys))}


def find_coco_annotations(images_path: str | os.PathLike) -> Path | None:
    """COCO's own annotation file for a split laid out as COCO's, or None where there is none:
    <root>/images/<split>/ -> <root>/annotations/instances_<split>.json; a list <root>/<name>.txt ->
    <root>/annotations/instances_<name>.json, else the one <root>/annotations/instances_val*.json (as the original)."""
    p = Path(images_path)
    if p.is_dir():
        f = p.parent.parent / 'annotations' / f'instances_{p.name}.json'
        return f if f.is_file() else None
    if p.is_file() and p.suffix == '.txt':
        f = p.parent / 'annotations' / f'instances_{p.stem}.json'
        if f.is_file():
            return f
        val = sorted((p.parent / 'annotations').glob('instances_val*.json'))
        return val[0] if len(val) == 1 else None
    return None


def prediction_records(image_id: int, boxes_xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                       category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO result records for one image; boxes (n, 4) xyxy in original-image pixels -> [x_min, y_min, w, h]."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    xywh = np.concatenate((b[:, :2], b[:, 2:] - b[:, :2]), 1)
    cats = [int(c) if category_ids is None else category_ids[int(c)] for c in classes]
    return [{'image_id': image_id, 'category_id': cat, 'bbox': [round(float(v), 3) for v in box],
             'score': round(float(s), 5)} for box, s, cat in zip(xywh, scores, cats)]


class CocoGroundTruth:
    """Builds a COCO ground-truth dict from YOLO labels, image by image, so any dataset gets COCO metrics."""

    def __init__(self, names: Sequence[str], category_ids: Sequence[int] | None = None):
        self.category_ids = list(category_ids) if category_ids is not None else list(range(len(names)))
        self.categories = [{'id': cid, 'name': str(n), 'supercategory': ''}
                           for cid, n in zip(self.category_ids, names)]
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add_image(self, image_id: int, file_name: str, height: int, width: int, classes: Iterable[int],
                  boxes_xyxy: np.ndarray) -> None:
        """Add one image (original size) and its labels, boxes (n, 4) xyxy in original-image pixels."""
        self.images.append({'id': image_id, 'file_name': file_name, 'height': int(height), 'width': int(width)})
        for c, b in zip(classes, np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            self.annotations.append({'id': len(self.annotations) + 1, 'image_id': image_id,
                                     'category_id': self.category_ids[int(c)],
                                     'bbox': [round(float(b[0]), 3), round(float(b[1]), 3), round(w, 3), round(h, 3)],
                                     'area': w * h, 'iscrowd': 0})

    def to_dict(self) -> dict:
        """The COCO JSON structure."""
        return {'info': {'description': 'ground truth written from YOLO labels'}, 'images': self.images,
                'annotations': self.annotations, 'categories': self.categories}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file and return its path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path


def coco_evaluate(gt_json: str | os.PathLike, pred_json: str | os.PathLike,
                  img_ids: Sequence[int] | None = None, verbose: bool = True) -> np.ndarray:
    """Score COCO-format predictions with pycocotools; returns COCOeval.stats (12,): [AP, AP50, AP75, ...]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints index progress
        gt = COCO(str(gt_json))
    preds = json.loads(Path(pred_json).read_text())
    if not preds:  # loadRes fails on an empty list; no detections scores zero
        return np.zeros(12)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(str(pred_json))
    ev = COCOeval(gt, dt, 'bbox')
    if img_ids is not None:
        ev.params.imgIds = list(img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()  # the standard 12-line table
    return np.asarray(ev.stats)
