"""COCO-format helpers: class-id maps, image ids, predictions and ground truth as COCO JSON, pycocotools scoring."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from utils.data.config import DatasetError
from utils.logs import LOGGER


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
    <root>/annotations/instances_<name>.json, else the one <root>/annotations/instances_val*.json."""
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


class CocoJson:
    """test.py's COCO JSON of one evaluation: detections in original-image pixels, scored by pycocotools against
    COCO's own annotation file (91-class ids, numeric file names) or against ground truth written from the labels."""

    def __init__(self, img_files: Sequence[str], names: Sequence[str], gt_file: str | os.PathLike | None = None):
        self.gt_file = Path(gt_file) if gt_file else None
        self.gt_builder = CocoGroundTruth(names) if self.gt_file is None else None
        # own ground truth: ids from the dataset's file list (a loader without one: in order of appearance)
        self.id_of = image_ids(img_files) if self.gt_file is None else {}
        self.category_ids = coco80_to_coco91_class() if self.gt_file is not None and len(names) == 80 else None
        self.records: list[dict] = []
        self.image_ids: list[int] = []

    def add(self, path: str, shape: Sequence[int], boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
            gt_classes: Sequence[int], gt_boxes: np.ndarray) -> None:
        """Add one image of original shape (h, w): detections boxes (n, 4) xyxy, scores (n,), classes (n,) and
        its labels gt_boxes (m, 4) xyxy, all in original-image pixels (labels are used without COCO's file)."""
        if self.gt_builder is not None:
            image_id = self.id_of.setdefault(path, len(self.id_of) + 1)
            self.gt_builder.add_image(image_id, Path(path).name, shape[0], shape[1], gt_classes, gt_boxes)
        else:
            image_id = numeric_image_id(path)
            if image_id is None:
                raise DatasetError(f"{path}: COCO annotations need numeric image file names (e.g. 000000000009.jpg); "
                                 f"pass --coco-gt or leave out COCO's file")
        self.image_ids.append(image_id)
        self.records += prediction_records(image_id, boxes, scores, classes, self.category_ids)

    def evaluate(self, save_dir: str | os.PathLike) -> np.ndarray:
        """Write predictions.json (and ground_truth.json from the labels) into save_dir; pycocotools' stats (12,)."""
        save_dir = Path(save_dir)
        pred_file = save_dir / 'predictions.json'
        pred_file.write_text(json.dumps(self.records))
        if self.gt_builder is not None:
            self.gt_file = self.gt_builder.save(save_dir / 'ground_truth.json')
            LOGGER.info(f'COCO ground truth written from the labels: {self.gt_file}')
        LOGGER.info(f'\nCOCO mAP with pycocotools: predictions {pred_file}, ground truth {self.gt_file}')
        stats = coco_evaluate(self.gt_file, pred_file, img_ids=sorted(set(self.image_ids)))
        LOGGER.info(f'pycocotools: AP@[.5:.95] {stats[0]:.3f}  AP50 {stats[1]:.3f}')
        return stats


def coco_evaluate(gt_json: str | os.PathLike, pred_json: str | os.PathLike,
                  img_ids: Sequence[int] | None = None, verbose: bool = True) -> np.ndarray:
    """Score COCO-format predictions with pycocotools; returns COCOeval.stats (12,): [AP, AP50, AP75, ...]. Logs
    pycocotools' 12-line table when verbose."""
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
    table = io.StringIO()
    with contextlib.redirect_stdout(table):  # pycocotools prints its table: logged instead
        ev.summarize()  # the standard 12-line table
    if verbose:
        LOGGER.info(table.getvalue().removesuffix('\n'))
    return np.asarray(ev.stats)
