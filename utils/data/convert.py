"""Convert COCO JSON, Pascal VOC XML and LabelMe JSON annotations into a YOLO dataset that train.py/test.py read.

    python -m utils.data.convert coco --ann FILE.json --images DIR --out OUT
    python -m utils.data.convert voc --ann XML_DIR --images DIR --out OUT [--names FILE] [--skip-difficult]
    python -m utils.data.convert labelme --ann JSON_DIR --images DIR --out OUT [--names FILE]
    (each also takes --val-fraction F --seed S)

OUT gets images/ (links to the images, copies where links fail), labels/ (one YOLO label file per image, empty for a
background image), train.txt (and val.txt with --val-fraction), OUT.names and OUT.data. Everything is read and checked
first, then written into a temporary folder beside OUT and renamed to OUT, so bad input leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from utils.darknet.parse_config import ConfigError, cfg_with_classes
from utils.data.config import DatasetError, check_unique_names, load_names
from utils.data.datasets import IMG_FORMATS, exif_size, img2label_paths
from utils.logs import LOGGER, setup_logging


class ConvertError(Exception):
    """Bad annotation input or an unusable output folder; the message names the file and what is wrong."""


@dataclass
class ImageRecord:
    """One image: its file, its path under --images, its displayed size and its boxes in pixels."""
    src: Path
    rel: Path
    size: tuple[int, int]  # (width, height) as displayed (EXIF orientation applied), as the loader sees it
    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)  # (class, x1, y1, x2, y2)


@dataclass
class Converted:
    """What a reader found: images with boxes, class names in index order, and what it skipped or changed."""
    images: list[ImageRecord]
    names: list[str]
    skipped: Counter = field(default_factory=Counter)  # reason -> count of boxes or shapes left out
    clipped: int = 0  # boxes cut to the image
    class_note: str = ''  # how the class order was chosen, printed with the summary


# ---------------------------------------------------------------------------------------------------------- reading

def read_json(path: Path) -> Any:
    """Parsed JSON of an annotation file; ConvertError naming the file for a missing or malformed one."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: malformed JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read: {e}") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as displayed, read from its header; ConvertError if it is not an image."""
    try:
        with Image.open(path) as im:
            return exif_size(im)
    except (OSError, UnidentifiedImageError) as e:
        raise ConvertError(f"{path}: cannot read the image: {e}") from None


def find_image(images: Path, candidates: list[str], ann: Path, what: str) -> tuple[Path, Path]:
    """(absolute path, path under --images) of the first candidate that is an image file under --images;
    ConvertError naming the annotation if none is."""
    root = Path(os.path.normpath(images.absolute()))
    for c in candidates:
        p = Path(os.path.normpath(root / c)) if c else root
        if p.is_relative_to(root) and p.suffix[1:].lower() in IMG_FORMATS and p.is_file():
            return p, p.relative_to(root)
    tried = ', '.join(dict.fromkeys(c for c in candidates if c))
    raise ConvertError(f"{ann}: {what}: image not found in {images} (looked for {tried})")


def checked_size(src: Path, given: tuple[Any, Any], ann: Path, what: str) -> tuple[int, int]:
    """The image's displayed size; the annotation's own width/height, when it gives them, must agree with it."""
    size = image_size(src)
    try:
        w, h = (round(float(v)) for v in given)
    except (TypeError, ValueError, OverflowError):
        return size  # no usable size in the annotation: the image's own
    if w > 0 and h > 0 and (w, h) != size:  # VOC files often say 0 x 0: then the image's own size holds
        raise ConvertError(f"{ann}: {what}: annotated size {w}x{h} but {src} is {size[0]}x{size[1]} as displayed "
                           f"(EXIF orientation applied); the boxes would not fit the image")
    return size


def clip_box(box: tuple[float, float, float, float], size: tuple[int, int], ann: Path, what: str
             ) -> tuple[tuple[float, float, float, float], bool]:
    """A pixel box (x1, y1, x2, y2) cut to the image, and whether it was cut; ConvertError for a box with no area."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        raise ConvertError(f"{ann}: {what}: box {list(box)} has a non-finite coordinate")
    if x2 <= x1 or y2 <= y1:
        raise ConvertError(f"{ann}: {what}: box has no area (x {x1:g}..{x2:g}, y {y1:g}..{y2:g} pixels)")
    w, h = size
    c = (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))
    if c[2] <= c[0] or c[3] <= c[1]:
        raise ConvertError(f"{ann}: {what}: box (x {x1:g}..{x2:g}, y {y1:g}..{y2:g}) lies outside the "
                           f"{w}x{h} image")
    return c, c != (x1, y1, x2, y2)


def _coco_categories(d: dict, ann: Path) -> tuple[dict[int, int], list[str], str]:
    """COCO category id -> class index (ids in increasing order -> 0..N-1), the names, and the mapping as text."""
    cats = d['categories']
    try:
        pairs = sorted((int(c['id']), str(c['name']).strip()) for c in cats)
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{ann}: every category needs an integer 'id' and a 'name' ({e!r})") from None
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ConvertError(f"{ann}: duplicate category ids {sorted(i for i, n in Counter(ids).items() if n > 1)}")
    names = [n for _, n in pairs]
    if not all(names):
        raise ConvertError(f"{ann}: a category has an empty name")
    try:
        check_unique_names(names, ann)
    except DatasetError as e:
        raise ConvertError(str(e)) from None
    note = 'COCO category ids -> classes: ' + ', '.join(f'{i}->{k} {n}' for k, (i, n) in enumerate(pairs))
    return {i: k for k, i in enumerate(ids)}, names, note


def _coco_images(d: dict, ann: Path, images: Path) -> dict[int, ImageRecord]:
    """COCO image id -> record, each image found under --images and its size checked."""
    out: dict[int, ImageRecord] = {}
    for im in d['images']:
        try:
            iid, name = int(im['id']), str(im['file_name'])
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"{ann}: every image needs an integer 'id' and a 'file_name' ({e!r})") from None
        what = f"image id {iid} ({name})"
        if iid in out:
            raise ConvertError(f"{ann}: {what}: duplicate image id")
        src, rel = find_image(images, [name, Path(name).name], ann, what)
        out[iid] = ImageRecord(src, rel, checked_size(src, (im.get('width'), im.get('height')), ann, what))
    return out


def read_coco(ann: Path, images: Path) -> Converted:
    """Read a COCO instances JSON: gapped category ids map to 0..N-1 in id order, crowd boxes are skipped."""
    d = read_json(ann)
    if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ('images', 'annotations',
                                                                                  'categories')):
        raise ConvertError(f"{ann}: not a COCO instances file (needs lists 'images', 'annotations', 'categories')")
    cat_index, names, note = _coco_categories(d, ann)
    recs = _coco_images(d, ann, images)
    res = Converted(list(recs.values()), names, class_note=note)
    for a in d['annotations']:
        what = f"annotation id {a.get('id')}" if isinstance(a, dict) else 'an annotation'
        if not isinstance(a, dict) or 'image_id' not in a or 'bbox' not in a or 'category_id' not in a:
            raise ConvertError(f"{ann}: {what}: needs 'image_id', 'category_id' and 'bbox'")
        rec = recs.get(a['image_id']) if isinstance(a['image_id'], int) else None
        if rec is None:
            raise ConvertError(f"{ann}: {what}: image_id {a['image_id']} is not in 'images' (a missing image)")
        if not isinstance(a['category_id'], int) or a['category_id'] not in cat_index:
            raise ConvertError(f"{ann}: {what}: category_id {a['category_id']} is not in 'categories'")
        if a.get('iscrowd', 0):  # as COCO's own evaluation: crowd regions are not objects to detect
            res.skipped['crowd'] += 1
            continue
        b = a['bbox']
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
            raise ConvertError(f"{ann}: {what}: bbox must be 4 numbers [x, y, width, height], got {b!r}")
        box, cut = clip_box((b[0], b[1], b[0] + b[2], b[1] + b[3]), rec.size, ann, f"{what} ({rec.rel})")
        rec.boxes.append((cat_index[a['category_id']], *box))
        res.clipped += cut
    return res


def class_order(found: set[str], names_file: Path | None) -> tuple[list[str], str]:
    """Class names in index order: the --names file's, else the names found, sorted; with a note saying which."""
    if names_file is not None:
        try:
            names = load_names(names_file)
        except DatasetError as e:
            raise ConvertError(str(e)) from None
        return names, f"classes from {names_file}: {', '.join(names)}"
    names = sorted(found)
    return names, f"classes (no --names: the names found, sorted): {', '.join(names)}"


def _index(name: str, names: list[str], names_file: Path | None, ann: Path, what: str) -> int:
    """Class index of a name; ConvertError naming the annotation when --names lacks it."""
    if name not in names:
        raise ConvertError(f"{ann}: {what}: class {name!r} is not in {names_file} ({', '.join(names)})")
    return names.index(name)


def _voc_object(obj: ET.Element, ann: Path, what: str) -> tuple[str, bool, tuple[float, float, float, float]]:
    """(class name, difficult, pixel box) of one VOC <object>; its 1-based corner pixels become a 0-based box."""
    name = (obj.findtext('name') or '').strip()
    if not name:
        raise ConvertError(f"{ann}: {what}: no <name>")
    bb = obj.find('bndbox')
    try:
        xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax'))
        difficult = bool(int(float(obj.findtext('difficult') or 0)))
    except (AttributeError, TypeError, ValueError):
        raise ConvertError(f"{ann}: {what}: needs <bndbox> with numbers xmin, ymin, xmax, ymax") from None
    # xmin..xmax are the first and last pixel columns inside the box, counted from 1: as a 0-based box they cover
    # xmin - 1 to xmax, so a box of the whole image (1..W) has width W
    return name, difficult, (xmin - 1, ymin - 1, xmax, ymax)


def _voc_file(f: Path, images: Path) -> tuple[ImageRecord, list[tuple[str, bool, tuple]]]:
    """The image of one VOC XML file and its objects (name, difficult, unclipped box)."""
    try:
        root = ET.parse(f).getroot()
    except ET.ParseError as e:
        raise ConvertError(f"{f}: malformed XML: {e}") from None
    except OSError as e:
        raise ConvertError(f"{f}: cannot read: {e}") from None
    if root.tag != 'annotation':
        raise ConvertError(f"{f}: not a VOC annotation (root element <{root.tag}>, expected <annotation>)")
    name = (root.findtext('filename') or '').strip()
    cands = [name, *(f'{n}.{e}' for n in (name, f.stem) if n for e in IMG_FORMATS)]
    src, rel = find_image(images, cands, f, f"<filename> {name!r}")
    sz = root.find('size')
    given = (sz.findtext('width'), sz.findtext('height')) if sz is not None else (None, None)
    rec = ImageRecord(src, rel, checked_size(src, given, f, f"<filename> {name!r}"))
    return rec, [_voc_object(o, f, f'object {k + 1}') for k, o in enumerate(root.findall('object'))]


def read_voc(ann_dir: Path, images: Path, names_file: Path | None, skip_difficult: bool) -> Converted:
    """Read a folder of Pascal VOC XML files (searched recursively); `difficult` objects kept unless skipped."""
    files = _annotation_files(ann_dir, '.xml')
    parsed = [(f, *_voc_file(f, images)) for f in files]
    names, note = class_order({o[0] for _, _, objs in parsed for o in objs}, names_file)
    res = Converted([], names, class_note=note)
    for f, rec, objs in parsed:
        for k, (name, difficult, box) in enumerate(objs):
            what = f'object {k + 1}'
            c = _index(name, names, names_file, f, what)
            if difficult and skip_difficult:
                res.skipped['difficult'] += 1
                continue
            box, cut = clip_box(box, rec.size, f, what)
            rec.boxes.append((c, *box))
            res.clipped += cut
        res.images.append(rec)
    return res


def _annotation_files(ann_dir: Path, suffix: str) -> list[Path]:
    """The annotation files under a folder (recursive, sorted); ConvertError when there are none."""
    if not ann_dir.is_dir():
        raise ConvertError(f"{ann_dir}: --ann must be a folder of {suffix} files (not found or not a folder)")
    files = sorted(p for p in ann_dir.rglob(f'*{suffix}') if p.is_file())
    if not files:
        raise ConvertError(f"{ann_dir}: no {suffix} files found")
    return files


def _labelme_box(shape: Any, f: Path, what: str) -> tuple[str, str, tuple[float, float, float, float] | None]:
    """(label, shape type, pixel box or None for shapes without area) of one LabelMe shape."""
    if not isinstance(shape, dict):
        raise ConvertError(f"{f}: {what}: not a shape object")
    label, kind = str(shape.get('label') or '').strip(), shape.get('shape_type') or 'polygon'
    if not label:
        raise ConvertError(f"{f}: {what}: no label")
    try:
        pts = [(float(x), float(y)) for x, y in shape['points']]
    except (KeyError, TypeError, ValueError):
        raise ConvertError(f"{f}: {what}: 'points' must be a list of [x, y] pairs") from None
    if kind in ('point', 'line', 'linestrip', 'points'):
        return label, kind, None
    if kind == 'circle' and len(pts) == 2:  # centre and a point on the circle
        (cx, cy), (px, py) = pts
        r = math.hypot(px - cx, py - cy)
        return label, kind, (cx - r, cy - r, cx + r, cy + r)
    if kind in ('rectangle', 'mask', 'polygon') and len(pts) >= 2:  # a mask's points are its box corners
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return label, kind, (min(xs), min(ys), max(xs), max(ys))
    raise ConvertError(f"{f}: {what}: cannot make a box from a {kind!r} shape with {len(pts)} points")


def _labelme_file(f: Path, images: Path) -> tuple[ImageRecord, list[tuple[str, str, tuple | None]]]:
    """The image of one LabelMe JSON file and its shapes (label, type, box or None)."""
    d = read_json(f)
    if not isinstance(d, dict) or not isinstance(d.get('shapes'), list):
        raise ConvertError(f"{f}: not a LabelMe file (needs a 'shapes' list)")
    path = str(d.get('imagePath') or '').replace('\\', '/')  # LabelMe on Windows writes backslashes
    cands = [path, Path(path).name, *(f'{f.stem}.{e}' for e in IMG_FORMATS)]
    src, rel = find_image(images, cands, f, f"imagePath {path!r}")
    rec = ImageRecord(src, rel, checked_size(src, (d.get('imageWidth'), d.get('imageHeight')), f,
                                             f"imagePath {path!r}"))
    return rec, [_labelme_box(s, f, f'shape {k + 1}') for k, s in enumerate(d['shapes'])]


def read_labelme(ann_dir: Path, images: Path, names_file: Path | None) -> Converted:
    """Read a folder of LabelMe JSON files: rectangles, polygons (their bounding box) and circles become boxes."""
    parsed = [(f, *_labelme_file(f, images)) for f in _annotation_files(ann_dir, '.json')]
    names, note = class_order({s[0] for _, _, shapes in parsed for s in shapes if s[2] is not None}, names_file)
    res = Converted([], names, class_note=note)
    for f, rec, shapes in parsed:
        for k, (label, kind, box) in enumerate(shapes):
            if box is None:  # a point or a line marks no region to detect
                res.skipped[f'{kind} shapes (no area)'] += 1
                continue
            what = f'shape {k + 1}'
            c = _index(label, names, names_file, f, what)
            box, cut = clip_box(box, rec.size, f, what)
            rec.boxes.append((c, *box))
            res.clipped += cut
        res.images.append(rec)
    return res


# ---------------------------------------------------------------------------------------------------------- writing

def check_out(out: Path) -> None:
    """Refuse an OUT that exists and is not an empty folder (old and new files would mix), or that .data can't name."""
    if '#' in str(out.resolve()):
        raise ConvertError(f"{out}: the path contains '#', which starts a comment in .data files; choose another")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out}: exists and is not an empty folder; give a new or empty --out (nothing written)")


def check_unique_outputs(images: list[ImageRecord], ann: Path) -> None:
    """Two annotations of one image, or two images sharing a label file (a.jpg, a.png), are an error."""
    seen: dict[str, Path] = {}
    for lb, rec in zip(img2label_paths([str(Path('images') / r.rel) for r in images]), images):
        key = os.path.normcase(lb)
        if key in seen:
            same = seen[key] == rec.src
            raise ConvertError(f"{ann}: {rec.src} is annotated twice" if same else
                               f"{ann}: {seen[key]} and {rec.src} would share the label file {lb}; rename one")
        seen[key] = rec.src


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and validation images: a seeded shuffle, val_fraction of them (at least 1) for val."""
    if not 0 <= val_fraction < 1:
        raise ConvertError(f"--val-fraction must be in [0, 1), got {val_fraction:g}")
    if val_fraction == 0:
        return list(range(n)), []
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise ConvertError(f"--val-fraction {val_fraction:g} of {n} images leaves none for training")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


def yolo_rows(rec: ImageRecord) -> str:
    """Label file text: `class x_center y_center width height`, normalised, one row per box."""
    w, h = rec.size
    rows = [f"{c} {(x1 + x2) / 2 / w:.6g} {(y1 + y2) / 2 / h:.6g} {(x2 - x1) / w:.6g} {(y2 - y1) / h:.6g}"
            for c, x1, y1, x2, y2 in rec.boxes]  # 6 significant digits: a tiny box never prints as width 0
    return ''.join(r + '\n' for r in rows)


def link_image(src: Path, dst: Path) -> str:
    """Put src at dst as a symbolic link, else a hard link, else a copy; return which."""
    try:
        os.symlink(src, dst)
        return 'linked'
    except OSError:  # e.g. Windows without the symlink privilege, or a filesystem without links
        pass
    try:
        os.link(src, dst)
        return 'hard-linked'
    except OSError:
        shutil.copy2(src, dst)
        return 'copied'


def _write_files(res: Converted, stage: Path, out: Path, lists: dict[str, list[ImageRecord]],
                 cfg: tuple[str, str] | None = None) -> Counter:
    """Write images, labels, lists, names, the .data file and cfg = (file name, text) if given under stage, with
    paths as they will be under out."""
    modes: Counter = Counter()
    if cfg:
        (stage / cfg[0]).write_text(cfg[1], encoding='utf-8')
    for rec in res.images:
        dst = stage / 'images' / rec.rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        modes[link_image(rec.src, dst)] += 1
        lb = Path(img2label_paths([str(dst)])[0])
        lb.parent.mkdir(parents=True, exist_ok=True)
        lb.write_text(yolo_rows(rec), encoding='utf-8')  # an empty file: a background image
    for name, recs in lists.items():
        (stage / name).write_text(''.join(f"{(Path('images') / r.rel).as_posix()}\n" for r in recs), 'utf-8')
    (stage / f'{out.name}.names').write_text(''.join(f'{n}\n' for n in res.names), encoding='utf-8')
    valid = 'val.txt' if 'val.txt' in lists else 'train.txt'
    (stage / f'{out.name}.data').write_text(
        f"classes={len(res.names)}\ntrain={out / 'train.txt'}\nvalid={out / valid}\n"
        f"names={out / (out.name + '.names')}\n", encoding='utf-8')
    return modes


def _umask() -> int:
    """The process's file mode creation mask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_dataset(res: Converted, out: Path, val_fraction: float = 0.0, seed: int = 0,
                  cfg: tuple[str, str] | None = None) -> tuple[Path, str]:
    """Write the converted dataset (and cfg = (file name, text) if given) to out (a new or empty folder) through a
    temporary folder; (.data path, summary)."""
    out = out.resolve()
    check_out(out)
    train_i, val_i = split(len(res.images), val_fraction, seed)
    lists = {'train.txt': [res.images[i] for i in train_i]}
    if val_i:
        lists['val.txt'] = [res.images[i] for i in val_i]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', suffix='.tmp', dir=out.parent))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private; OUT gets the permissions of a new folder
    try:
        modes = _write_files(res, stage, out, lists, cfg)
        check_out(out)  # made meanwhile by someone else: keep theirs
        if out.exists():
            out.rmdir()  # empty (just checked): the rename needs the name free on every platform
        stage.rename(out)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise ConvertError(f"{out}: cannot write: {e} (nothing written)") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    missing = classes_missing(res.names, lists['train.txt'], lists.get('val.txt', []))
    if val_i and missing:
        LOGGER.warning(f"no boxes of {', '.join(missing)} in val.txt (only in train.txt): their mAP will not be "
                       f"measured; try another --seed or a larger --val-fraction")
    return out / f'{out.name}.data', summary(res, modes, len(train_i), len(val_i))


def classes_missing(names: list[str], train: list[ImageRecord], val: list[ImageRecord]) -> list[str]:
    """Names of the classes with boxes in train but none in val."""
    in_train = {b[0] for r in train for b in r.boxes}
    in_val = {b[0] for r in val for b in r.boxes}
    return [n for k, n in enumerate(names) if k in in_train and k not in in_val]


def summary(res: Converted, modes: Counter, n_train: int, n_val: int) -> str:
    """One line: images, boxes, classes, what was skipped and why, the split and how the images got there."""
    n_boxes = sum(len(r.boxes) for r in res.images)
    n_bg = sum(not r.boxes for r in res.images)
    skipped = ', '.join(f'{n} {why}' for why, n in sorted(res.skipped.items())) or 'nothing'
    clipped = f' ({res.clipped} clipped to the image)' if res.clipped else ''
    split_s = (f'train {n_train}, val {n_val}' if n_val else
               f'train = valid = all {n_train} images (no --val-fraction)')
    how = ', '.join(f'{n} {m}' for m, n in modes.most_common())
    return (f"{len(res.images)} images ({n_bg} background), {n_boxes} boxes{clipped}, {len(res.names)} classes; "
            f"skipped: {skipped}; {split_s}; images {how}")


def class_cfg(base: Path, nc: int) -> tuple[str, str]:
    """(file name, text) of a copy of the cfg base with nc classes: classes= in every [yolo] section and the filters=
    of the convolution before it; every other line as in base."""
    try:
        text = base.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{base}: cannot read the --cfg file ({e}) (nothing written)") from None
    try:
        return f'{base.stem}-{nc}cls.cfg', cfg_with_classes(text, nc, str(base))
    except ConfigError as e:
        raise ConvertError(f"{e} (nothing written)") from None


# ---------------------------------------------------------------------------------------------------------- command

def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m utils.data.convert {coco,voc,labelme}`."""
    p = argparse.ArgumentParser(prog='python -m utils.data.convert',
                                description='Convert COCO / Pascal VOC / LabelMe annotations to a YOLO dataset.')
    sub = p.add_subparsers(dest='format', required=True)
    helps = {'coco': 'COCO instances JSON file', 'voc': 'folder of Pascal VOC .xml files',
             'labelme': 'folder of LabelMe .json files'}
    for fmt, ann_help in helps.items():
        s = sub.add_parser(fmt, help=f'convert a {ann_help}')
        s.add_argument('--ann', type=Path, required=True, help=ann_help)
        s.add_argument('--images', type=Path, required=True, help='folder holding the images the annotations name')
        s.add_argument('--out', type=Path, required=True, help='new (or empty) output folder')
        s.add_argument('--val-fraction', type=float, default=0.0,
                       help='share of images for validation (default 0: train and valid are both all images)')
        s.add_argument('--seed', type=int, default=0, help='seed of the train/val split')
        s.add_argument('--cfg', type=Path, default=None,
                       help='also write OUT/<cfg name>-<N>cls.cfg: a copy of this Darknet cfg with classes= and the '
                            'heads\' filters= set for the N classes found')
        if fmt != 'coco':
            s.add_argument('--names', type=Path, default=None,
                           help='class names, one a line, in class order (default: the names found, sorted)')
        if fmt == 'voc':
            s.add_argument('--skip-difficult', action='store_true', help="leave out objects marked 'difficult'")
    return p


def main(argv: list[str] | None = None) -> int:
    """Convert as the command line says; print the class order and a summary line. Errors raise ConvertError."""
    opt = get_args_parser().parse_args(argv)
    setup_logging()
    check_out(opt.out)  # before the reading, which can take a while on a large set
    split(2, opt.val_fraction, opt.seed)  # checks the fraction's range before the reading
    if not opt.images.is_dir():
        raise ConvertError(f"{opt.images}: --images must be a folder of images (not found or not a folder)")
    if opt.format == 'coco':
        res = read_coco(opt.ann, opt.images)
    elif opt.format == 'voc':
        res = read_voc(opt.ann, opt.images, opt.names, opt.skip_difficult)
    else:
        res = read_labelme(opt.ann, opt.images, opt.names)
    if not res.images:
        raise ConvertError(f"{opt.ann}: no images (nothing written)")
    check_unique_outputs(res.images, opt.ann)
    if not res.names:
        raise ConvertError(f"{opt.ann}: no classes: no objects found and no --names given (nothing written)")
    res.images.sort(key=lambda r: r.rel.as_posix())  # the split depends on the images, not on the file's order
    cfg = class_cfg(opt.cfg, len(res.names)) if opt.cfg else None
    LOGGER.info(res.class_note)
    data, line = write_dataset(res, opt.out, opt.val_fraction, opt.seed, cfg)
    LOGGER.info(f"{opt.format}: {line} -> {data}")
    if cfg:
        LOGGER.info(f"cfg for {len(res.names)} classes: {data.parent / cfg[0]} (only classes= and the heads' "
                    f"filters= differ from {opt.cfg})")
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except ConvertError as err:
        sys.exit(f'Error: {err}')
