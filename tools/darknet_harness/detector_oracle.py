"""Darknet as the oracle for utils/darknet/post.py: run `darknet detector test` and `detector map`, then the project's
model with Darknet's pre/post-processing on the same images, and compare.

    python tools/darknet_harness/detector_oracle.py --darknet /tmp/darknet \
        --cfg ../shared/darknet-cfg/yolov3-tiny.cfg --weights ../shared/weights/yolov3-tiny.weights \
        --images ../shared/samples/bus.jpg ../shared/samples/zidane.jpg --coco128 64 --map 128

--set net.letter_box=1 / --set yolo.nms_kind=diounms edit a copy of the cfg; --random-weights SEED writes seeded
weights of the project's model as a .weights file that both sides load. The project reads the images as --darknet
does (utils/darknet/post.load_image: JPEGs through utils/darknet/stb_jpeg.py); --decoder stb feeds it Darknet's own
load_image_color pixels instead (libdarknet.so, stb_image), --decoder opencv OpenCV's (libjpeg-turbo).
--fixture DIR --case NAME writes what Darknet printed for tests/test_darknet_post.py.
Exit status 1 when a check of the issue's done-when fails: per image the same (class, box) pairs, confidences within
--conf-tol, corners within --px-tol pixels; mAP@0.50 within --map-tol.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models import Darknet  # noqa: E402
from utils.darknet import post as dp  # noqa: E402
from utils.darknet.weights import save_weights  # noqa: E402
from utils.train.transfer import load_weights  # noqa: E402

SHARED = Path(os.environ.get('YOLO_SHARED', ROOT.parent / 'shared')).resolve()  # as tests/conftest.py
COCO128_IMAGES = SHARED / 'datasets' / 'coco128' / 'images' / 'train2017'
COCO_NAMES = SHARED / 'datasets' / 'coco128' / 'coco.names'
EXT_LINE = re.compile(r'^(?P<name>.+): (?P<pct>\d+)%\t\(left_x:\s*(-?\d+)\s+top_y:\s*(-?\d+)\s+width:\s*(-?\d+)\s+'
                      r'height:\s*(-?\d+)\)')
AP_LINE = re.compile(r'class_id = (\d+), name = .*?, ap = ([\d.]+)%')
MAP_LINE = re.compile(r'mean average precision \(mAP@([\d.]+)\) = ([\d.]+)')
TP_LINE = re.compile(r'for conf_thresh = [\d.]+, TP = (\d+), FP = (\d+), FN = (\d+), average IoU = ([\d.]+) %')


def edit_cfg(text: str, settings: list[str]) -> str:
    """The cfg text with each `net.KEY=VALUE` set in [net] and each `yolo.KEY=VALUE` in every [yolo] (replaced where
    the section sets it, else added under its header)."""
    lines = text.splitlines()
    for item in settings:
        m = re.fullmatch(r'(net|yolo)\.(\w+)=(.+)', item)
        if not m:
            raise SystemExit(f'--set {item}: expected net.KEY=VALUE or yolo.KEY=VALUE')
        section, key, value = m.groups()
        out, in_section, done, pos = [], False, True, 0
        for line in lines:
            header = re.match(r'\s*\[(\w+)\]', line)
            if header:
                if in_section and not done:
                    out.insert(pos, f'{key}={value}')
                in_section = header.group(1) in ({'net', 'network'} if section == 'net' else {'yolo'})
                done, pos = False, len(out) + 1
            elif in_section and line.split('#')[0].split('=')[0].strip() == key:
                line, done = f'{key}={value}', True
            out.append(line)
        if in_section and not done:
            out.insert(pos, f'{key}={value}')
        lines = out
    return '\n'.join(lines) + '\n'


def run_darknet(darknet: Path, args: list[str], work: Path, stdin: str = '') -> str:
    """Run the Darknet binary in work (it writes predictions.jpg there); its stdout, or exit naming the failure."""
    r = subprocess.run([str(darknet / 'darknet'), *args], cwd=work, input=stdin, capture_output=True, text=True)
    (work / f'darknet_{args[1]}.log').write_text(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f'darknet {" ".join(args)} failed ({r.returncode}); see {work}/darknet_{args[1]}.log')
    return r.stdout


def darknet_test(darknet: Path, data: Path, cfg: Path, weights: Path, images: list[Path], work: Path,
                 thresh: float) -> list[dict]:
    """`detector test -ext_output -out` on each image: [{'image', 'printed': [(name, pct, l, t, w, h)], 'objects'}]."""
    out = run_darknet(darknet, ['detector', 'test', str(data), str(cfg), str(weights), '-thresh', str(thresh),
                                '-ext_output', '-dont_show', '-out', 'test.json'], work,
                      ''.join(f'{p}\n' for p in images))
    frames = json.loads((work / 'test.json').read_text())
    blocks = re.split(r'^(.*): Predicted in [\d.]+ milli-seconds\.$', out, flags=re.M)[1:]
    results = []
    for (path, body), frame in zip(zip(blocks[0::2], blocks[1::2]), frames):
        printed = [(m['name'], int(m['pct']), *(int(m.group(k)) for k in range(3, 7)))
                   for m in (EXT_LINE.match(line.replace('Enter Image Path: ', '')) for line in body.splitlines())
                   if m]
        results.append({'image': path.replace('Enter Image Path: ', '').strip(), 'printed': printed,
                        'objects': frame['objects']})
    if len(results) != len(images):
        raise SystemExit(f'darknet detector test reported {len(results)} of {len(images)} images; see {work}')
    return results


def darknet_map(darknet: Path, data: Path, cfg: Path, weights: Path, work: Path, points: int) -> dict:
    """`detector map` on the .data file's valid list: {'map', 'ap' (per class), 'tp', 'fp', 'fn', 'avg_iou'}."""
    out = run_darknet(darknet, ['detector', 'map', str(data), str(cfg), str(weights), '-dont_show',
                                '-points', str(points)], work)
    ap = {int(c): float(v) / 100 for c, v in AP_LINE.findall(out)}
    tp, fp, fn, iou = TP_LINE.search(out).groups()
    return {'map': float(MAP_LINE.search(out).group(2)), 'ap': [ap[c] for c in sorted(ap)], 'tp': int(tp),
            'fp': int(fp), 'fn': int(fn), 'avg_iou': float(iou) / 100}


class StbImages:
    """Images decoded by Darknet's own load_image_color (stb_image in libdarknet.so), as (h, w, 3) float32."""

    class Image(ctypes.Structure):
        _fields_ = [('w', ctypes.c_int), ('h', ctypes.c_int), ('c', ctypes.c_int),
                    ('data', ctypes.POINTER(ctypes.c_float))]

    def __init__(self, darknet: Path):
        self.lib = ctypes.CDLL(str(darknet / 'libdarknet.so'))
        self.lib.load_image_color.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        self.lib.load_image_color.restype = self.Image
        self.lib.free_image.argtypes = [self.Image]

    def __call__(self, path: Path) -> np.ndarray:
        im = self.lib.load_image_color(str(path).encode(), 0, 0)
        a = np.ctypeslib.as_array(im.data, shape=(im.c, im.h, im.w)).transpose(1, 2, 0).copy()
        self.lib.free_image(im)
        return a


def load_opencv(path: Path) -> np.ndarray:
    """An image as cv2.imread decodes it (libjpeg-turbo for JPEGs), RGB float32 / 255."""
    im = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if im is None:
        raise FileNotFoundError(f'{path}: cannot read the image')
    return np.ascontiguousarray(im[:, :, ::-1]).astype(np.float32) / np.float32(255.0)


def label_path(image: Path) -> Path:
    """replace_image_to_label for the layouts used here: .../images/X/name.jpg -> .../labels/X/name.txt."""
    return Path(str(image).replace('/images/', '/labels/')).with_suffix('.txt')


def write_fixture(opt: argparse.Namespace, theirs: list[dict], work: Path) -> None:
    """FIXTURE/CASE.jsonl: Darknet's printed lines and JSON objects per image (paths relative to ../shared);
    FIXTURE/CASE.json: how they were made (cfg, --set, threshold, weights)."""
    if opt.random_weights is not None:
        raise SystemExit('--fixture needs weights the tests can load (--weights from ../shared), not --random-weights')
    opt.fixture.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({'image': str(Path(t['image']).relative_to(SHARED)), 'printed': t['printed'],
                         'objects': t['objects']}) for t in theirs]
    (opt.fixture / f'{opt.case}.jsonl').write_text('\n'.join(lines) + '\n')
    meta = {'cfg': str(opt.cfg.resolve().relative_to(SHARED)), 'set': opt.set, 'thresh': opt.thresh,
            'weights': str(opt.weights.resolve().relative_to(SHARED)), 'darknet': str(opt.darknet)}
    (opt.fixture / f'{opt.case}.json').write_text(json.dumps(meta, indent=1) + '\n')
    print(f'fixture: {opt.fixture}/{opt.case}.jsonl')


def corners_px(box: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    """Relative xywh -> (x1, y1, x2, y2) in pixels of an image wh, in float64."""
    b = box.astype(np.float64)
    return np.array([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]) * np.array([*wh, *wh])


def compare_image(ours: dp.Detections, theirs: dict, thresh: float) -> dict:
    """Pair Darknet's JSON objects with ours (same class, best IoU over 0.5, in Darknet's order) and measure the
    differences: the largest confidence and corner (pixels) differences of the pairs, and what stayed unpaired."""
    w, h = ours.image_wh
    rows, cls = np.nonzero(ours.prob > thresh)
    boxes, probs = ours.boxes[rows], ours.prob[rows, cls]
    conf_d, px_d, unmatched = 0.0, 0.0, 0
    by_class: dict[int, list[dict]] = {}
    for o in theirs['objects']:
        by_class.setdefault(o['class_id'], []).append(o)
    for c, objs in by_class.items():
        mine = np.nonzero(cls == c)[0]
        dn = np.array([[o['relative_coordinates'][k] for k in ('center_x', 'center_y', 'width', 'height')]
                       for o in objs], np.float32)
        iou = dp.box_iou_many(dn, boxes[mine])  # (Darknet's, ours) of this class
        for i, o in enumerate(objs):
            k = int(iou[i].argmax()) if len(mine) else -1
            if k < 0 or iou[i, k] < 0.5:
                unmatched += 1
                continue
            iou[:, k] = -1  # each of ours pairs once
            conf_d = max(conf_d, abs(float(probs[mine[k]]) - o['confidence']))
            px_d = max(px_d, float(np.abs(corners_px(boxes[mine[k]], (w, h)) - corners_px(dn[i], (w, h))).max()))
    paired = len(theirs['objects']) - unmatched
    return {'image': theirs['image'], 'darknet': len(theirs['objects']), 'ours': len(rows),
            'unmatched': unmatched + len(rows) - paired, 'conf_diff': conf_d, 'px_diff': px_d,
            'printed_darknet': len(theirs['printed']), 'printed_ours': len(dp.ext_output(ours, thresh))}


def build_model(cfg: Path, weights: Path) -> Darknet:
    """The project's model of cfg with weights, Darknet's fused BatchNorm eps, fused, eval mode."""
    model = Darknet(str(cfg))
    load_weights(model, str(weights), verbose=False)
    return dp.use_darknet_bn_eps(model).fuse().eval()


# target mean and std of a random model's raw head outputs (x, y, w, h; objectness; classes) on bus.jpg, so that it
# finds some boxes per image at 0.25 with spread-out confidences and not too many at 0.005 (a fresh model's are all
# ~0.26 or all ~0.01); `detector map` keeps classes x candidates x 40 bytes: use --map 32 or fewer with these
HEAD_TARGETS = ((0.0, 0.5), (-9.0, 2.5), (-5.0, 3.0))
CALIBRATION_IMAGE = SHARED / 'samples' / 'bus.jpg'


def random_weights(cfg: Path, seed: int, path: Path) -> None:
    """Seeded weights of the project's model as a .weights file: its own init, each BatchNorm's statistics set to
    those of its input on CALIBRATION_IMAGE (so activations neither vanish nor blow up and the boxes depend on the
    image), then each head convolution's rows rescaled to HEAD_TARGETS on the same image."""
    torch.manual_seed(seed)
    model = Darknet(str(cfg))
    x = dp.network_input(dp.load_image(CALIBRATION_IMAGE), dp.settings_from_model(model))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0  # one training-mode pass leaves exactly this image's statistics
        model.train()(x)
        _, maps = model.eval()(x)
        for i, y, p in zip(model.head_convs(), model.yolo_layers, maps):  # p: (1, na, ny, nx, no) raw
            conv = model.module_list[i].Conv2d
            na, no = p.shape[1], p.shape[-1]
            if getattr(model.module_list[y], 'new_coords', False):  # the head's logistic is in p: back to logits
                p = torch.logit(p.clamp(1e-6, 1 - 1e-6))
            for (lo, hi), (mean, std) in zip(((0, 4), (4, 5), (5, no)), HEAD_TARGETS):
                v = p[..., lo:hi]
                scale = std / float(v.std().clamp(min=1e-6))
                rows = [a * no + k for a in range(na) for k in range(lo, hi)]
                conv.weight[rows] *= scale
                conv.bias[rows] = (conv.bias[rows] - float(v.mean())) * scale + mean
    save_weights(model, path)


def main(argv: list[str] | None = None) -> int:
    """Run the oracle and the comparison; 0 when every check holds."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--darknet', type=Path, default=Path('/tmp/darknet'), help='built AlexeyAB/darknet checkout')
    p.add_argument('--cfg', type=Path, required=True)
    p.add_argument('--weights', type=Path, help='.weights (or --random-weights)')
    p.add_argument('--random-weights', type=int, metavar='SEED', help='seeded weights of the project model')
    p.add_argument('--set', action='append', default=[], help='net.KEY=VALUE or yolo.KEY=VALUE in a cfg copy')
    p.add_argument('--names', type=Path, default=COCO_NAMES)
    p.add_argument('--images', type=Path, nargs='*', default=[])
    p.add_argument('--coco128', type=int, default=0, help='also the first N coco128 images for detector test')
    p.add_argument('--map', type=int, default=0, help='detector map on the first N coco128 images')
    p.add_argument('--points', type=int, default=0, help='detector map -points (0: area under the curve)')
    p.add_argument('--thresh', type=float, default=dp.TEST_THRESH)
    p.add_argument('--decoder', choices=('port', 'stb', 'opencv'), default='port',
                   help="the project's pixels: port (its --darknet reader), stb (libdarknet's), opencv (cv2.imread)")
    p.add_argument('--conf-tol', type=float, default=0.01)
    p.add_argument('--px-tol', type=float, default=1.0)
    p.add_argument('--map-tol', type=float, default=0.002)
    p.add_argument('--work', type=Path, help='keep the cfg copy, lists, logs and report here')
    p.add_argument('--fixture', type=Path, help="write Darknet's outputs into this folder (tests/fixtures/...)")
    p.add_argument('--case', default='case', help='--fixture file names: CASE.jsonl, CASE.json, map_CASE.json')
    opt = p.parse_args(argv)
    work = (opt.work or Path(tempfile.mkdtemp(prefix='detector_oracle_'))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / 'model.cfg'
    cfg.write_text(edit_cfg(opt.cfg.read_text(), opt.set))
    weights = opt.weights.resolve() if opt.weights else None
    if opt.random_weights is not None:
        weights = work / f'random{opt.random_weights}.weights'
        random_weights(cfg, opt.random_weights, weights)
    if weights is None:
        raise SystemExit('give --weights or --random-weights')
    images = [Path(i).resolve() for i in opt.images] + sorted(COCO128_IMAGES.glob('*.jpg'))[:opt.coco128]
    map_images = sorted(COCO128_IMAGES.glob('*.jpg'))[:opt.map]
    (work / 'map.txt').write_text(''.join(f'{i}\n' for i in map_images))
    data = work / 'oracle.data'
    model = build_model(cfg, weights)
    data.write_text(f'classes={model.nc}\ntrain={work / "map.txt"}\nvalid={work / "map.txt"}\n'
                    f'names={opt.names.resolve()}\n')
    settings = dp.settings_from_model(model)
    load = StbImages(opt.darknet) if opt.decoder == 'stb' else load_opencv if opt.decoder == 'opencv' else dp.load_image
    print(f'{cfg}: {settings}; decoder {opt.decoder}; work {work}')
    report: dict = {'cfg': str(opt.cfg), 'set': opt.set, 'weights': str(weights), 'decoder': opt.decoder,
                    'settings': settings.__dict__}
    ok = True
    if images:
        theirs = darknet_test(opt.darknet, data, cfg, weights, images, work, opt.thresh)
        rows = []
        for path, t in zip(images, theirs):
            rows.append(compare_image(dp.detect(model, load(path), settings, opt.thresh), t, opt.thresh))
            r = rows[-1]
            bad = r['unmatched'] or r['darknet'] != r['ours'] or r['conf_diff'] > opt.conf_tol or \
                r['px_diff'] > opt.px_tol
            ok &= not bad
            if bad:
                print(f"MISMATCH {r}")
        report['test'] = rows
        print(f"detector test, {len(rows)} images: {sum(r['darknet'] for r in rows)} Darknet detections, "
              f"{sum(r['ours'] for r in rows)} ours, {sum(r['unmatched'] for r in rows)} unmatched; max conf diff "
              f"{max(r['conf_diff'] for r in rows):.5f}, max corner diff {max(r['px_diff'] for r in rows):.3f} px; "
              f"printed lines {sum(r['printed_darknet'] for r in rows)} Darknet, {sum(r['printed_ours'] for r in rows)}"
              f" ours")
        if opt.fixture:
            write_fixture(opt, theirs, work)
    if map_images:
        dn = darknet_map(opt.darknet, data, cfg, weights, work, opt.points)
        per_image = [(dp.detect(model, load(i), settings, dp.MAP_THRESH), dp.read_labels(label_path(i)))
                     for i in map_images]
        ours = dp.darknet_map(per_image, model.nc, 0.5, opt.points, opt.thresh)
        ap_diff = float(np.abs(np.array(dn['ap']) - ours.ap).max())
        report['map'] = {'darknet': dn, 'ours': {'map': ours.map, 'ap': ours.ap.tolist(), 'tp': ours.tp,
                                                 'fp': ours.fp, 'fn': ours.fn, 'avg_iou': ours.avg_iou}}
        print(f"detector map, {len(map_images)} images: Darknet mAP@0.50 {dn['map']:.6f}, ours {ours.map:.6f} "
              f"(diff {abs(dn['map'] - ours.map):.6f}); max AP diff {ap_diff:.4f}; TP/FP/FN at {opt.thresh}: Darknet "
              f"{dn['tp']}/{dn['fp']}/{dn['fn']}, ours {ours.tp}/{ours.fp}/{ours.fn}")
        ok &= abs(dn['map'] - ours.map) <= opt.map_tol
        if opt.fixture:
            meta = {'set': opt.set, 'cfg': str(opt.cfg.resolve().relative_to(SHARED)), 'points': opt.points,
                    'images': [str(i.relative_to(SHARED)) for i in map_images], 'darknet': dn}
            (opt.fixture / f'map_{opt.case}.json').write_text(json.dumps(meta, indent=1) + '\n')
    (work / 'report.json').write_text(json.dumps(report, indent=1))
    print('PASS' if ok else 'FAIL')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
