"""python -m utils.data.convert: COCO JSON, VOC XML and LabelMe JSON to YOLO labels, round trips from coco128's labels, the
mAP of test.py on converted labels, the real coco128 COCO file, splits, and errors that leave nothing on disk."""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COCO128, COCO128_IMAGES, COCO_NAMES, ROOT, TINY_WEIGHTS
from utils.data.coco import coco80_to_coco91_class
from utils.data.config import load_data_config, load_names
from utils.data.convert import ConvertError, link_image, main
from utils.data.datasets import list_image_files

LABELS = COCO128 / 'labels' / 'train2017'


@functools.cache
def coco_names() -> list[str]:
    """The 80 coco128 class names (read when a test needs them, so collecting this file needs no ../shared)."""
    return load_names(COCO_NAMES)


# 15 labelled images and a background one (no label file in coco128)
SUBSET = [p.name for p in sorted(COCO128_IMAGES.glob('*.jpg'))[:15]] + ['000000000250.jpg']


def pixel_boxes(image: str) -> tuple[tuple[int, int], np.ndarray]:
    """(width, height) of a coco128 image and its YOLO labels as (n, 5) [class, x1, y1, x2, y2] in pixels."""
    with Image.open(COCO128_IMAGES / image) as im:
        w, h = im.size
    lb = LABELS / (Path(image).stem + '.txt')
    x = np.loadtxt(lb, ndmin=2).reshape(-1, 5) if lb.exists() else np.zeros((0, 5))
    xyxy = np.column_stack((x[:, 0], (x[:, 1] - x[:, 3] / 2) * w, (x[:, 2] - x[:, 4] / 2) * h,
                            (x[:, 1] + x[:, 3] / 2) * w, (x[:, 2] + x[:, 4] / 2) * h))
    return (w, h), xyxy


def read_labels(out: Path, image: str, names: list[str] | None = None) -> np.ndarray:
    """(n, 5) labels a conversion wrote for an image, classes renumbered to COCO's order when names are given."""
    text = (out / 'labels' / (Path(image).stem + '.txt')).read_text()
    x = np.array(text.split(), dtype=float).reshape(-1, 5)
    if names is not None:
        x[:, 0] = [coco_names().index(names[int(c)]) for c in x[:, 0]]
    return x


def original_labels(image: str) -> np.ndarray:
    """coco128's own (n, 5) labels of an image (none for a background image)."""
    lb = LABELS / (Path(image).stem + '.txt')
    return np.loadtxt(lb, ndmin=2).reshape(-1, 5) if lb.exists() else np.zeros((0, 5))


def write_coco(path: Path, images: list[str]) -> Path:
    """A COCO instances JSON of coco128 labels: COCO's gapped category ids, one crowd box, full-precision boxes."""
    ids = coco80_to_coco91_class()
    d = {'images': [], 'annotations': [], 'categories': [{'id': ids[k], 'name': n} for k, n in enumerate(coco_names())]}
    for image in images:
        (w, h), b = pixel_boxes(image)
        iid = int(Path(image).stem)
        d['images'].append({'id': iid, 'file_name': image, 'width': w, 'height': h})
        for c, x1, y1, x2, y2 in b:
            d['annotations'].append({'id': len(d['annotations']) + 1, 'image_id': iid, 'category_id': ids[int(c)],
                                     'bbox': [x1, y1, x2 - x1, y2 - y1], 'iscrowd': 0})
    d['annotations'].append({'id': 0, 'image_id': d['images'][0]['id'], 'category_id': 1,
                             'bbox': [0, 0, 50, 50], 'iscrowd': 1})
    path.write_text(json.dumps(d))
    return path


def voc_xml(image: str, size: tuple[int, int], objects: list[tuple[str, int, int, int, int, int]]) -> str:
    """A Pascal VOC annotation: objects are (name, difficult, xmin, ymin, xmax, ymax), 1-based corner pixels."""
    objs = ''.join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
                   f"<xmax>{c}</xmax><ymax>{e}</ymax></bndbox></object>" for n, d, a, b, c, e in objects)
    return (f"<annotation><filename>{image}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


def write_voc(folder: Path, images: list[str]) -> Path:
    """VOC XML files of coco128 labels, corners rounded to whole pixels as VOC stores them."""
    folder.mkdir()
    for image in images:
        size, b = pixel_boxes(image)
        objs = []
        for c, x1, y1, x2, y2 in b:
            xmin, ymin = round(x1) + 1, round(y1) + 1  # first pixel inside, 1-based
            objs.append((coco_names()[int(c)], 0, xmin, ymin, max(round(x2), xmin), max(round(y2), ymin)))
        (folder / f'{Path(image).stem}.xml').write_text(voc_xml(image, size, objs))
    return folder


def write_labelme(folder: Path, images: list[str]) -> Path:
    """LabelMe JSON files of coco128 labels: rectangles, as LabelMe saves them beside an images folder."""
    folder.mkdir()
    for image in images:
        (w, h), b = pixel_boxes(image)
        shapes = [{'label': coco_names()[int(c)], 'points': [[x2, y2], [x1, y1]], 'shape_type': 'rectangle',
                   'flags': {}} for c, x1, y1, x2, y2 in b]  # corners in the order dragged: any order is a box
        d = {'version': '5.4.1', 'shapes': shapes, 'imagePath': f'..\\images\\{image}', 'imageData': None,
             'imageWidth': w, 'imageHeight': h}
        (folder / f'{Path(image).stem}.json').write_text(json.dumps(d))
    return folder


def subset_images(tmp: Path) -> Path:
    """A folder of links to the SUBSET images (a user's --images)."""
    d = tmp / 'photos'
    d.mkdir()
    for image in SUBSET:
        os.symlink(COCO128_IMAGES / image, d / image)
    return d


def convert(*args: str | Path) -> int:
    """main() of python -m utils.data.convert with these arguments."""
    return main([str(a) for a in args])


@pytest.mark.slow
def test_real_coco128_json_matches_shared_labels(tmp_path, capsys):
    # ../shared's YOLO labels were converted from this same file: same boxes (to their 6 digits), crowd boxes left out
    out = tmp_path / 'c128'
    convert('coco', '--ann', COCO128 / 'annotations' / 'instances_train2017.json', '--images', COCO128_IMAGES,
            '--out', out)
    stdout = capsys.readouterr().out
    assert '128 images (2 background), 929 boxes, 80 classes; skipped: 10 crowd; train = valid = all 128' in stdout
    assert '18->16 dog' in stdout  # the gapped ids, in id order
    for image in sorted(p.name for p in COCO128_IMAGES.glob('*.jpg')):
        got, want = read_labels(out, image), original_labels(image)
        assert got.shape == want.shape, image
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=image)
        assert (out / 'images' / image).resolve() == (COCO128_IMAGES / image).resolve()
    data = load_data_config(out / 'c128.data')
    assert data['nc'] == 80 and data['names'] == coco_names()  # names kept: class mapping from COCO weights works
    assert data['train'] == data['valid'] == str(out / 'train.txt')
    assert len(list_image_files(data['train'])) == 128
    assert sorted(p.name for p in out.iterdir()) == ['c128.data', 'c128.names', 'images', 'labels', 'train.txt']
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_round_trips_give_the_same_boxes_and_map(tmp_path, capsys):
    from models import load_model
    from test import EvalConfig, evaluate, val_loader

    images = subset_images(tmp_path)
    convert('coco', '--ann', write_coco(tmp_path / 'coco.json', SUBSET), '--images', images, '--out', tmp_path / 'c')
    convert('voc', '--ann', write_voc(tmp_path / 'xml', SUBSET), '--images', images, '--out', tmp_path / 'v',
            '--names', COCO_NAMES)
    convert('labelme', '--ann', write_labelme(tmp_path / 'lm', SUBSET), '--images', images, '--out', tmp_path / 'l')
    stdout = capsys.readouterr().out
    assert 'coco: 16 images (1 background)' in stdout and 'skipped: 1 crowd' in stdout
    lm_names = load_names(tmp_path / 'l' / 'l.names')
    assert lm_names == sorted(lm_names) and f"(no --names: the names found, sorted): {', '.join(lm_names)}" in stdout
    for image in SUBSET:
        want = original_labels(image)
        np.testing.assert_allclose(read_labels(tmp_path / 'c', image), want, atol=2e-6)
        np.testing.assert_allclose(read_labels(tmp_path / 'l', image, lm_names), want, atol=2e-6)
        size, px = pixel_boxes(image)
        got = read_labels(tmp_path / 'v', image)
        xyxy = np.column_stack((got[:, 1] - got[:, 3] / 2, got[:, 2] - got[:, 4] / 2, got[:, 1] + got[:, 3] / 2,
                                got[:, 2] + got[:, 4] / 2)) * (size * 2)
        assert np.array_equal(got[:, 0], want[:, 0])
        assert np.abs(xyxy - px[:, 1:]).max(initial=0) <= 0.5 + 1e-3  # each corner rounded to a whole pixel

    # test.py on the originals and on the converted labels (official yolov3-tiny, 16 images at 256)
    listed = tmp_path / 'original.txt'
    listed.write_text(''.join(f'{COCO128_IMAGES / i}\n' for i in SUBSET))
    orig = tmp_path / 'original.data'
    orig.write_text(f'classes=80\ntrain={listed}\nvalid={listed}\nnames={COCO_NAMES}\n')
    model = load_model(TINY_WEIGHTS, ROOT / 'cfg' / 'yolov3-tiny.cfg', 256)

    def scores(data_file: Path) -> tuple[float, ...]:  # P, R, mAP@0.5, mAP@0.5:0.95, F1 as test.py scores them
        data = load_data_config(data_file)
        loader = val_loader(data, 256, 16, model, False, 0)
        return evaluate(model, loader, data['names'], EvalConfig(plots=False, save_dir=tmp_path)).results[:5]

    maps = {k: scores(d) for k, d in (('original', orig), ('coco', tmp_path / 'c' / 'c.data'),
                                      ('voc', tmp_path / 'v' / 'v.data'))}
    assert 0.2 < maps['original'][2] < 0.9
    assert maps['coco'] == maps['original']
    # VOC's whole-pixel corners move boxes by up to half a pixel: only the strictest IoU thresholds notice
    assert maps['voc'][:3] == maps['original'][:3] and maps['voc'][3] == pytest.approx(maps['original'][3], abs=0.002)


@pytest.mark.slow
def test_split_is_seeded_and_complete(tmp_path, capsys):
    images = subset_images(tmp_path)
    ann = write_coco(tmp_path / 'coco.json', SUBSET)
    lists = {}
    for name, seed in (('a', 1), ('b', 1), ('c', 2)):
        convert('coco', '--ann', ann, '--images', images, '--out', tmp_path / name, '--val-fraction', '0.25',
                '--seed', seed)
        data = load_data_config(tmp_path / name / f'{name}.data')
        lists[name] = [[Path(p).name for p in list_image_files(data[k])] for k in ('train', 'valid')]
    stdout = capsys.readouterr().out
    assert 'train 12, val 4' in stdout
    assert 'WARNING: no boxes of ' in stdout  # 16 images of 40 classes: some are only in train
    train, val = lists['a']
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val) == sorted(SUBSET)
    assert lists['b'] == lists['a'] and lists['c'] != lists['a']
    with pytest.raises(ConvertError, match='leaves none for training'):
        convert('coco', '--ann', ann, '--images', images, '--out', tmp_path / 'd', '--val-fraction', '0.99')
    with pytest.raises(ConvertError, match=r'--val-fraction must be in \[0, 1\)'):
        convert('coco', '--ann', ann, '--images', images, '--out', tmp_path / 'd', '--val-fraction', '1')
    assert not (tmp_path / 'd').exists()


def _photo(folder: Path, name: str, size: tuple[int, int] = (64, 48)) -> None:
    folder.mkdir(exist_ok=True)
    Image.new('RGB', size, (90, 120, 150)).save(folder / name)


def test_voc_corners_difficult_sorted_names_and_clipping(tmp_path, capsys):
    _photo(tmp_path / 'img', 'a.jpg')
    _photo(tmp_path / 'img', 'b.png')
    xml = tmp_path / 'xml'
    xml.mkdir()
    # the whole image (pixels 1..64, 1..48), a difficult dog, a box past the right edge; b.png: size 0x0, no filename
    (xml / 'a.xml').write_text(voc_xml('a.jpg', (64, 48), [('zebra', 0, 1, 1, 64, 48), ('dog', 1, 11, 21, 20, 30),
                                                          ('dog', 0, 60, 1, 80, 10)]))
    (xml / 'b.xml').write_text(voc_xml('', (0, 0), [('cat', 0, 1, 1, 32, 24)]))
    convert('voc', '--ann', xml, '--images', tmp_path / 'img', '--out', tmp_path / 'o')
    stdout = capsys.readouterr().out
    assert 'classes (no --names: the names found, sorted): cat, dog, zebra' in stdout
    assert '2 images (0 background), 4 boxes (1 clipped to the image), 3 classes; skipped: nothing' in stdout
    rows = (tmp_path / 'o' / 'labels' / 'a.txt').read_text().splitlines()
    assert rows == ['2 0.5 0.5 1 1', '1 0.234375 0.520833 0.15625 0.208333', '1 0.960938 0.104167 0.078125 0.208333']
    assert (tmp_path / 'o' / 'labels' / 'b.txt').read_text() == '0 0.25 0.25 0.5 0.5\n'
    convert('voc', '--ann', xml, '--images', tmp_path / 'img', '--out', tmp_path / 'p', '--skip-difficult')
    assert 'skipped: 1 difficult' in capsys.readouterr().out
    assert len((tmp_path / 'p' / 'labels' / 'a.txt').read_text().splitlines()) == 2


def test_labelme_shapes(tmp_path, capsys):
    _photo(tmp_path / 'img', 'x.jpg', (100, 50))
    shapes = [{'label': 'kite', 'points': [[10, 5], [30, 5], [20, 25]], 'shape_type': 'polygon'},
              {'label': 'ball', 'points': [[50, 25], [50, 35]], 'shape_type': 'circle'},
              {'label': 'ball', 'points': [[1, 1]], 'shape_type': 'point'},
              {'label': 'kite', 'points': [[-10, -10], [10, 10]]}]  # no shape_type (old LabelMe): a polygon
    ann = tmp_path / 'ann'
    ann.mkdir()
    (ann / 'x.json').write_text(json.dumps({'shapes': shapes, 'imagePath': 'x.jpg', 'imageWidth': 100,
                                            'imageHeight': 50}))
    names = tmp_path / 'my.names'
    names.write_text('kite\nball\n')
    convert('labelme', '--ann', ann, '--images', tmp_path / 'img', '--out', tmp_path / 'o', '--names', names)
    assert '3 boxes (1 clipped to the image), 2 classes; skipped: 1 point shapes (no area)' in capsys.readouterr().out
    assert (tmp_path / 'o' / 'labels' / 'x.txt').read_text().splitlines() == [
        '0 0.2 0.3 0.2 0.4', '1 0.5 0.5 0.2 0.4', '0 0.05 0.1 0.1 0.2']


def _coco(path: Path, bbox: list | None = None, image: str = 'a.jpg', image_id: int = 1) -> Path:
    path.write_text(json.dumps({'images': [{'id': 1, 'file_name': image, 'width': 64, 'height': 48}],
                                'annotations': [{'id': 7, 'image_id': image_id, 'category_id': 3,
                                                 'bbox': bbox or [1, 2, 3, 4]}],
                                'categories': [{'id': 3, 'name': 'car'}]}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize('case, message', [
    ('json', r'coco.json: malformed JSON: Expecting'),
    ('image_id', r'coco.json: annotation id 7: image_id 5 is not in .images. \(a missing image\)'),
    ('file', r'coco.json: image id 1 \(gone.jpg\): image not found in .*img \(looked for gone.jpg\)'),
    ('area', r'coco.json: annotation id 7 \(a.jpg\): box has no area \(x 10..10, y 2..6 pixels\)'),
    ('outside', r'coco.json: annotation id 7 \(a.jpg\): box \(x 70..80, y 2..6\) lies outside the 64x48 image'),
    ('size', r'coco.json: image id 1 \(a.jpg\): annotated size 64x48 but .*a.jpg is 48x64'),
    ('xml', r'a.xml: malformed XML: mismatched tag'),
    ('names', r"a.xml: object 1: class 'dgo' is not in .*my.names \(cat, dog\)"),
    ('voc_area', r'a.xml: object 1: box has no area \(x 10..9, y 0..5 pixels\)'),
    ('labelme_image', r"b.json: imagePath 'b.jpg': image not found"),
    ('twice', r'xml: .*a.jpg is annotated twice'),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, message):
    _photo(tmp_path / 'img', 'a.jpg', (48, 64) if case == 'size' else (64, 48))
    ann, fmt, extra = tmp_path / 'coco.json', 'coco', []
    if case == 'json':
        ann.write_text('{"images": [}')
    elif case in ('image_id', 'file', 'area', 'outside', 'size'):
        _coco(ann, bbox={'area': [10, 2, 0, 4], 'outside': [70, 2, 10, 4]}.get(case),
              image='gone.jpg' if case == 'file' else 'a.jpg', image_id=5 if case == 'image_id' else 1)
    elif case == 'labelme_image':
        fmt, ann = 'labelme', tmp_path / 'lm'
        ann.mkdir()
        (ann / 'b.json').write_text(json.dumps({'shapes': [], 'imagePath': 'b.jpg'}))
    else:
        fmt, ann = 'voc', tmp_path / 'xml'
        ann.mkdir()
        obj = {'names': ('dgo', 0, 1, 1, 5, 5), 'voc_area': ('dog', 0, 11, 1, 9, 5)}.get(case)
        (ann / 'a.xml').write_text(voc_xml('a.jpg', (64, 48), [obj]) if obj else '<annotation><a></annotation>')
        if case == 'twice':
            (ann / 'a.xml').write_text(voc_xml('a.jpg', (64, 48), [('cat', 0, 1, 1, 5, 5)]))
            (ann / 'b.xml').write_text(voc_xml('a.jpg', (64, 48), [('dog', 0, 1, 1, 5, 5)]))
        (tmp_path / 'my.names').write_text('cat\ndog\n')
        extra = ['--names', tmp_path / 'my.names'] if case == 'names' else []
    r = subprocess.run([sys.executable, '-m', 'utils.data.convert', fmt, '--ann', str(ann), '--images',
                        str(tmp_path / 'img'), '--out', str(tmp_path / 'out'), *map(str, extra)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60) if case == 'json' else None
    if r is not None:  # once through the command line: exit status 1, one line, no traceback
        assert r.returncode == 1 and r.stderr.startswith('Error: ') and len(r.stderr.splitlines()) == 1
        assert re.search(message, r.stderr), r.stderr
    else:
        with pytest.raises(ConvertError, match=message) as e:
            convert(fmt, '--ann', ann, '--images', tmp_path / 'img', '--out', tmp_path / 'out', *extra)
        assert '\n' not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(('out', '.out'))) == []


def test_existing_out_is_refused_and_kept(tmp_path):
    _photo(tmp_path / 'img', 'a.jpg')
    ann = _coco(tmp_path / 'coco.json')
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'mine.txt').write_text('keep me')
    with pytest.raises(ConvertError, match='out: exists and is not an empty folder'):
        convert('coco', '--ann', ann, '--images', tmp_path / 'img', '--out', out)
    assert [p.name for p in out.iterdir()] == ['mine.txt'] and (out / 'mine.txt').read_text() == 'keep me'
    (out / 'mine.txt').unlink()  # an empty folder is fine
    convert('coco', '--ann', ann, '--images', tmp_path / 'img', '--out', out)
    assert (out / 'labels' / 'a.txt').read_text() == '0 0.0390625 0.0833333 0.046875 0.0833333\n'


@pytest.mark.slow
def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    images = subset_images(tmp_path)
    ann = write_coco(tmp_path / 'coco.json', SUBSET)
    calls = []

    def failing_link(src: Path, dst: Path) -> str:
        calls.append(src)
        if len(calls) == 5:
            raise OSError(28, 'No space left on device')
        return link_image(src, dst)

    monkeypatch.setattr('utils.data.convert.link_image', failing_link)
    with pytest.raises(ConvertError, match=r'out: cannot write: .*No space left on device.*\(nothing written\)'):
        convert('coco', '--ann', ann, '--images', images, '--out', tmp_path / 'out')
    assert len(calls) == 5 and sorted(p.name for p in tmp_path.iterdir()) == ['coco.json', 'photos']


@pytest.mark.slow
def test_link_falls_back_to_copy(tmp_path, monkeypatch):
    src = COCO128_IMAGES / SUBSET[0]
    assert link_image(src, tmp_path / 'a.jpg') == 'linked' and (tmp_path / 'a.jpg').is_symlink()

    def refuse(*args):
        raise OSError(1, 'Operation not permitted')

    monkeypatch.setattr(os, 'symlink', refuse)
    monkeypatch.setattr(os, 'link', refuse)
    assert link_image(src, tmp_path / 'b.jpg') == 'copied'
    assert not (tmp_path / 'b.jpg').is_symlink() and (tmp_path / 'b.jpg').read_bytes() == src.read_bytes()


def test_cfg_for_the_classes_found_builds_and_a_bad_cfg_writes_nothing(tmp_path, capsys):
    from models import Darknet
    _photo(tmp_path / 'img', 'a.jpg')
    ann = _coco(tmp_path / 'coco.json')
    convert('coco', '--ann', ann, '--images', tmp_path / 'img', '--out', tmp_path / 'o',
            '--cfg', ROOT / 'cfg' / 'yolov3-tiny.cfg')
    written = tmp_path / 'o' / 'yolov3-tiny-1cls.cfg'
    assert f'cfg for 1 classes: {written}' in capsys.readouterr().out
    model = Darknet(written)
    assert model.nc == 1 and [model.module_list[j].no for j in model.yolo_layers] == [6, 6]
    base = (ROOT / 'cfg' / 'yolov3-tiny.cfg').read_text().splitlines()
    changed = [b for a, b in zip(base, written.read_text().splitlines()) if a != b]
    assert changed == ['filters=18', 'classes=1', 'filters=18', 'classes=1']
    bad = tmp_path / 'bad.cfg'
    bad.write_text('[net]\nwidth=64\n[yolo]\nmask=0\nanchors=1,2\nclasses=3\nnum=1\n')  # a [yolo] with no conv
    with pytest.raises(ConvertError, match='bad.cfg'):
        convert('coco', '--ann', ann, '--images', tmp_path / 'img', '--out', tmp_path / 'p', '--cfg', bad)
    assert not (tmp_path / 'p').exists()
