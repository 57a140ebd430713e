"""detect.py as users run it: sample images, a video, .pt and .onnx weights, a booby-trapped checkpoint, headless;
its outputs (txt with confidences, crops, JSON lines, --nosave, --max-det)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect as detect_mod
from detect import (
    JSON_FILE,
    DetectError,
    detect,
    get_args_parser,
    parse_opt,
    save_crops,
)
from tests.conftest import COCO_NAMES, ROOT, SAMPLES, TINY_WEIGHTS
from utils.data.config import DatasetError
from utils.eval import backends

CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'
PERSON, BUS, TIE = 0, 5, 27


def run_detect(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """python detect.py ARGS, from the repository root unless cwd is given."""
    return subprocess.run([sys.executable, str(ROOT / 'detect.py'), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


# runs detect.py as `python detect.py ARGS` would, then says whether torch was imported (after every exit path)
TORCH_PROBE = ("import runpy, sys\n"
               "sys.argv = sys.argv[1:]\n"
               "try:\n"
               "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
               "finally:\n"
               "    print('torch imported:', 'torch' in sys.modules)\n")


def label_classes(txt: Path) -> list[int]:
    """Class column of a --save-txt file, after checking each row is `class x y w h` with normalised numbers."""
    rows = [line.split() for line in txt.read_text().splitlines()]
    for r in rows:
        assert len(r) == 5 and all(0 <= float(v) <= 1 for v in r[1:]), r
    return [int(r[0]) for r in rows]


@pytest.mark.slow
def test_samples_with_labels(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.me').write_text('an earlier result')  # the original emptied --output; this port never does
    r = run_detect('--cfg', str(CFG), '--names', str(COCO_NAMES), '--weights', str(TINY_WEIGHTS),
                   '--source', str(SAMPLES), '--output', str(out), '--save-txt')  # the command
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'zidane.jpg: 288x416' in r.stdout  # default size: the cfg's [net] width (416), as Darknet
    assert (out / 'keep.me').read_text() == 'an earlier result'
    bus, zidane = label_classes(out / 'bus.txt'), label_classes(out / 'zidane.txt')
    assert bus.count(PERSON) >= 3 and BUS in bus
    assert zidane.count(PERSON) >= 2 and TIE in zidane
    for name in ('bus.jpg', 'zidane.jpg'):
        drawn, orig = cv2.imread(str(out / name)), cv2.imread(str(SAMPLES / name))
        assert drawn.shape == orig.shape
        assert (np.abs(drawn.astype(int) - orig).max(2) > 60).mean() > 0.005  # boxes and labels were drawn
    assert re.search(r'bus\.jpg: \d+x\d+ \d+ persons, 1 bus, Done', r.stdout)


@pytest.mark.slow
def test_video_comes_out_as_video(tmp_path):
    src = tmp_path / 'clip.mp4'
    im = cv2.resize(cv2.imread(str(SAMPLES / 'bus.jpg')), (320, 400))
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*'mp4v'), 10, (320, 400))
    for k in range(5):  # five frames, the scene panning right
        writer.write(np.roll(im, 6 * k, axis=1))
    writer.release()
    out = tmp_path / 'out'
    r = run_detect('--cfg', str(CFG), '--names', str(COCO_NAMES), '--weights', str(TINY_WEIGHTS),
                   '--source', str(src), '--output', str(out), '--img-size', '320', '--save-txt', '--classes', '5',
                   '--save-json')
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (out / JSON_FILE).read_text().splitlines()]  # one line per frame
    assert [r['frame'] for r in recs] == [1, 2, 3, 4, 5] and {r['image'] for r in recs} == {str(src)}
    assert all([d['name'] for d in r['detections']] == ['bus'] and (r['width'], r['height']) == (320, 400)
               for r in recs)
    cap = cv2.VideoCapture(str(out / 'clip.mp4'))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    ok, frame = cap.read()
    cap.release()
    assert ok and n == 5 and size == (320, 400)
    for k in range(1, 6):  # one label file per frame; --classes 5 keeps only the bus
        assert label_classes(out / f'clip_{k}.txt') == [BUS]


@pytest.mark.slow
def test_several_streams_from_a_list(tmp_path):
    # a .txt source is a list of streams (here two video files, read by threads as cameras would be)
    im = cv2.resize(cv2.imread(str(SAMPLES / 'bus.jpg')), (160, 192))
    for name in ('cam_a.mp4', 'cam_b.mp4'):
        writer = cv2.VideoWriter(str(tmp_path / name), cv2.VideoWriter_fourcc(*'mp4v'), 30, (160, 192))
        for _ in range(60):  # long enough that the reader threads are still running at the first frame
            writer.write(im)
        writer.release()
    (tmp_path / 'streams.txt').write_text(f"{tmp_path / 'cam_a.mp4'}\n{tmp_path / 'cam_b.mp4'}\n")
    out = tmp_path / 'out'
    before = set(tmp_path.iterdir())
    r = run_detect('--cfg', str(CFG), '--names', str(COCO_NAMES), '--weights', str(TINY_WEIGHTS),
                   '--source', str(tmp_path / 'streams.txt'), '--output', str(out), '--img-size', '192')
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(tmp_path.iterdir()) - before == {out}  # everything went into --output
    for name in ('stream0_cam_a.mp4', 'stream1_cam_b.mp4'):
        cap = cv2.VideoCapture(str(out / name))
        assert cap.read()[0] and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 160, name
        cap.release()


@pytest.mark.slow
def test_pt_checkpoint_and_headless_view(tmp_path):
    from models import load_model
    from utils.checkpoint import model_checkpoint, save_checkpoint

    pt = tmp_path / 'tiny.pt'
    save_checkpoint(model_checkpoint(load_model(TINY_WEIGHTS, CFG, 416)), pt)
    env = {k: v for k, v in os.environ.items() if k not in ('DISPLAY', 'WAYLAND_DISPLAY')}
    out = tmp_path / 'out'
    # no --cfg: the checkpoint carries its cfg; --view-img on a machine without a display says so and goes on
    r = run_detect('--cfg', '', '--names', str(COCO_NAMES), '--weights', str(pt), '--source', str(SAMPLES / 'bus.jpg'),
                   '--output', str(out), '--img-size', '416', '--save-txt', '--view-img', env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'cannot show a window' in r.stdout
    bus = label_classes(out / 'bus.txt')
    assert bus.count(PERSON) >= 3 and BUS in bus


class _Evil:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.slow
def test_booby_trapped_checkpoint_is_refused(tmp_path):
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'evil.pt'
    torch.save({'model': _Evil(marker), 'cfg': CFG.read_text()}, evil)
    r = run_detect('--weights', str(evil), '--names', str(COCO_NAMES), '--source', str(SAMPLES),
                   '--output', str(tmp_path / 'out'))
    assert r.returncode != 0
    assert not marker.exists()
    assert 'refused' in r.stderr and str(evil) in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_onnx_runs_from_another_cwd_with_coco_names(tmp_path):
    # models.py --onnx and the export's agreement with PyTorch are tested in test_models.py; here: detect.py runs the
    # .onnx file, and without --names an 80-class model is labelled from data/coco.names beside the script
    onnx_file = tmp_path / 'tiny.onnx'
    r = subprocess.run([sys.executable, 'models.py', '--cfg', str(CFG), '--weights', str(TINY_WEIGHTS),
                        '--onnx', str(onnx_file), '--img-size', '320'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / 'out'
    r = run_detect('--weights', str(onnx_file), '--source', str(SAMPLES / 'bus.jpg'), '--output', str(out),
                   '--save-txt', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'bus.jpg: 320x320 ' in r.stdout  # letterboxed to the export's fixed size
    assert re.search(r'bus\.jpg: 320x320 \d+ persons, 1 bus, Done', r.stdout)
    bus = label_classes(out / 'bus.txt')
    assert bus.count(PERSON) >= 3 and BUS in bus
    with pytest.raises(DetectError, match='--augment needs the PyTorch model'):
        detect(parse_opt(['--weights', str(onnx_file), '--source', str(SAMPLES), '--augment']))


@pytest.mark.slow
def test_names_carried_by_a_one_class_checkpoint(tmp_path):
    # a person detector: yolov3-tiny-1cls with its head rows mapped from the official weights' person class, saved
    # as a plain dict; run from another folder without --names, it labels with the names the checkpoint carries
    from models import Darknet
    from utils.train.transfer import load_weights

    cfg = ROOT / 'cfg' / 'yolov3-tiny-1cls.cfg'
    model = Darknet(cfg, 416)
    load_weights(model, TINY_WEIGHTS, names=['person'], verbose=False)
    pt = tmp_path / 'person.pt'
    torch.save({'model': model.state_dict(), 'cfg': cfg.read_text(), 'names': ['person']}, pt)
    out = tmp_path / 'out'
    r = run_detect('--weights', str(pt), '--source', str(SAMPLES / 'bus.jpg'), '--output', str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    n = int(re.search(r'bus\.jpg: \d+x\d+ (\d+) persons, Done', r.stdout).group(1))
    assert n >= 3
    drawn, orig = cv2.imread(str(out / 'bus.jpg')), cv2.imread(str(SAMPLES / 'bus.jpg'))
    assert (np.abs(drawn.astype(int) - orig).max(2) > 60).mean() > 0.005  # boxes and labels were drawn


@pytest.mark.slow
def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(DetectError, match='nowhere.jpg does not exist'):
        detect(parse_opt(['--weights', str(TINY_WEIGHTS), '--source', str(tmp_path / 'nowhere.jpg')]))
    names = tmp_path / 'three.names'
    names.write_text('a\nb\nc\n')
    with pytest.raises(DatasetError, match='3 class names but the model has 80 classes'):
        detect(parse_opt(['--cfg', str(CFG), '--weights', str(TINY_WEIGHTS), '--names', str(names),
                          '--source', str(SAMPLES), '--output', str(tmp_path / 'out')]))
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_outputs_json_crops_confidences_nosave_max_det(tmp_path, capsys):
    out = tmp_path / 'out'
    detect(parse_opt(['--cfg', str(CFG), '--weights', str(TINY_WEIGHTS), '--source', str(SAMPLES / 'bus.jpg'),
                      '--output', str(out), '--save-txt', '--save-conf', '--save-crop', '--save-json', '--nosave']))
    assert f'Detections written to {(out / JSON_FILE).resolve()}' in capsys.readouterr().out
    assert JSON_FILE in get_args_parser().format_help()
    assert not (out / 'bus.jpg').exists()  # --nosave: no annotated image, the rest is written
    (rec,) = [json.loads(line) for line in (out / JSON_FILE).read_text().splitlines()]
    assert rec['image'] == str(SAMPLES / 'bus.jpg') and (rec['width'], rec['height']) == (810, 1080)
    dets = rec['detections']
    assert sorted(d['name'] for d in dets) == ['bus'] + ['person'] * 4  # at the cfg's size, 416
    assert [d['class'] for d in dets if d['name'] == 'bus'] == [BUS]
    conf = [d['confidence'] for d in dets]
    assert conf == sorted(conf, reverse=True) and all(0.3 < c <= 1 for c in conf)
    for d in dets:
        x1, y1, x2, y2 = d['box']
        assert 0 <= x1 < x2 <= 810 and 0 <= y1 < y2 <= 1080
    # --save-txt --save-conf: `class x y w h conf`, the same detections in the same order
    rows = [[float(v) for v in line.split()] for line in (out / 'bus.txt').read_text().splitlines()]
    assert [len(r) for r in rows] == [6] * 5
    assert [int(r[0]) for r in rows] == [d['class'] for d in dets]
    assert [r[5] for r in rows] == pytest.approx(conf, abs=1e-5)
    x1, y1, x2, y2 = dets[0]['box']
    assert rows[0][1:5] == pytest.approx([(x1 + x2) / 1620, (y1 + y2) / 2160, (x2 - x1) / 810, (y2 - y1) / 1080],
                                         abs=1e-5)
    # --save-crop: crops/<name>/bus_<k>.jpg, k the detection's row, the box's pixels of the original image
    assert sorted(f.name for f in (out / 'crops' / 'person').iterdir()) == [
        f'bus_{k}.jpg' for k, d in enumerate(dets) if d['name'] == 'person']
    orig = cv2.imread(str(SAMPLES / 'bus.jpg')).astype(int)
    for k, d in enumerate(dets):
        crop = cv2.imread(str(out / 'crops' / d['name'] / f'bus_{k}.jpg')).astype(int)
        x1, y1, x2, y2 = (int(v) for v in d['box'])
        assert crop.shape == (y2 - y1, x2 - x1, 3)
        assert np.abs(crop - orig[y1:y2, x1:x2]).mean() < 4  # only JPEG's loss
    # --max-det 2: the two most confident of the same detections; the annotated image is saved this time
    out2 = tmp_path / 'out2'
    detect(parse_opt(['--cfg', str(CFG), '--weights', str(TINY_WEIGHTS), '--source', str(SAMPLES / 'bus.jpg'),
                      '--output', str(out2), '--save-json', '--max-det', '2']))
    (rec2,) = [json.loads(line) for line in (out2 / JSON_FILE).read_text().splitlines()]
    assert rec2['detections'] == dets[:2]
    assert cv2.imread(str(out2 / 'bus.jpg')).shape == (1080, 810, 3)
    with pytest.raises(DetectError, match='--max-det must be at least 1, got 0'):
        detect(parse_opt(['--weights', str(TINY_WEIGHTS), '--source', str(SAMPLES), '--max-det', '0']))


def test_crops_are_clipped_to_the_image(tmp_path):
    im = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)  # (h, w, 3)
    det = np.array([[-10., 50, 30, 90, 0.9, 1],  # sticks out left and below
                    [70, -5, 95, 20, 0.8, 0],  # out right and above
                    [100, 10, 120, 20, 0.7, 0]], dtype=np.float32)  # wholly outside: no crop
    saved = save_crops(det, im, tmp_path, ['a/b', 'car'], 'img')
    assert saved == [tmp_path / 'car' / 'img_0.jpg', tmp_path / 'a_b' / 'img_1.jpg']  # names made file-safe
    assert cv2.imread(str(saved[0])).shape == (10, 30, 3) and cv2.imread(str(saved[1])).shape == (20, 10, 3)


@pytest.mark.parametrize('args, match', [(['--backend', 'onnxruntime', '--half', 'bf16'], '--half bf16 asks for'),
                                         (['--backend', 'onnxruntime', '--augment'], '--augment'),
                                         (['--backend', 'onnxruntime', '--device', '0'], 'CPU only|CUDA')])
def test_backend_refusals(tmp_path, args, match):
    with pytest.raises(DetectError, match=match):
        detect(parse_opt(['--weights', 'x.weights', '--source', str(tmp_path), '--output', str(tmp_path / 'o'),
                          *args]))
    assert not (tmp_path / 'o').exists()
    with pytest.raises(SystemExit):
        parse_opt(['--backend', 'openvino'])


def read_rows(folder: Path) -> dict[str, np.ndarray]:
    """--save-txt --save-conf files of a folder: stem -> (n, 6) rows."""
    return {f.stem: np.loadtxt(f, ndmin=2) for f in sorted(folder.glob('*.txt'))}


@pytest.mark.slow
def test_backends_give_the_same_detections_and_the_export_is_cached(tmp_path, monkeypatch):
    onnx_cache = tmp_path / 'cache'  # empty: the module's cache may hold this model's export already
    monkeypatch.setenv('YOLOV3_CACHE', str(onnx_cache))
    weights = tmp_path / 'w' / 'yolov3-tiny.weights'  # a folder of its own: nothing may be written beside it
    weights.parent.mkdir()
    weights.symlink_to(TINY_WEIGHTS)
    common = ['--cfg', str(ROOT / 'cfg' / 'yolov3-tiny.cfg'), '--weights', str(weights), '--source', str(SAMPLES),
              '--save-txt', '--save-conf', '--device', 'cpu', '--nosave']
    runs = {k: run_detect(*common, '--output', str(tmp_path / k), *a) for k, a in
            (('torch', ['--backend', 'torch', '--half', 'off']), ('auto', []), ('again', ['--backend', 'onnxruntime']))}
    # a cache hit runs without torch: the default --device '' on this machine too, where it has no GPU
    hit = [a for a in common if a not in ('--device', 'cpu')] if backends.cpu_only('') else common
    runs['hit'] = subprocess.run([sys.executable, '-c', TORCH_PROBE, str(ROOT / 'detect.py'), *hit,
                                  '--output', str(tmp_path / 'hit')], cwd=ROOT, capture_output=True, text=True,
                                 timeout=300)
    for r in runs.values():
        assert r.returncode == 0, r.stderr[-2000:]
    assert 'torch imported: False' in runs['hit'].stdout
    assert re.search(r'^Runtime: PyTorch .* cpu, float32$', runs['torch'].stdout, re.M)
    assert re.search(r'^Runtime: onnxruntime .* new export ', runs['auto'].stdout, re.M)
    assert re.search(r'^Runtime: onnxruntime .* cached export ', runs['again'].stdout, re.M)
    assert len(list(onnx_cache.glob('*.onnx'))) == 1 and [p.name for p in weights.parent.iterdir()] == [weights.name]
    ref = read_rows(tmp_path / 'torch')
    assert set(ref) == {'bus', 'zidane'}
    for k in ('auto', 'again', 'hit'):
        got = read_rows(tmp_path / k)
        assert set(got) == set(ref)
        for stem in ref:  # same classes, boxes within %g's rounding of normalised coordinates
            assert got[stem].shape == ref[stem].shape and (got[stem][:, 0] == ref[stem][:, 0]).all()
            np.testing.assert_allclose(got[stem][:, 1:], ref[stem][:, 1:], atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# --darknet: the boxes `darknet detector test` prints (tests/fixtures/darknet_detect, tools/darknet_harness)

DARKNET_FIXTURES = ROOT / 'tests' / 'fixtures' / 'darknet_detect'


def test_darknet_defaults_are_darknets_thresholds():
    from utils.darknet.post import NMS_THRESH, TEST_THRESH
    from utils.torch_utils import HALF_CHOICES

    opt = parse_opt(['--darknet'])
    assert (opt.conf_thres, opt.iou_thres) == (TEST_THRESH, NMS_THRESH) == (0.25, 0.45)
    assert detect_mod.HALF_CHOICES == HALF_CHOICES  # repeated in detect.py to parse without torch
    assert (parse_opt([]).conf_thres, parse_opt([]).iou_thres) == (0.3, 0.6)
    assert parse_opt(['--darknet', '--conf-thres', '0.5', '--iou-thres', '0.3']).conf_thres == 0.5


@pytest.mark.parametrize('args, match', [(['--augment'], '--augment'), (['--agnostic-nms'], '--agnostic-nms'),
                                         (['--backend', 'onnxruntime'], '--backend onnxruntime'),
                                         (['--half', 'bf16'], '--half bf16')])
def test_darknet_refusals(tmp_path, args, match):
    with pytest.raises(DetectError, match=f"--darknet runs the PyTorch model .*{match}"):
        detect(parse_opt(['--darknet', '--weights', 'x.weights', '--source', str(tmp_path),
                          '--output', str(tmp_path / 'o'), *args]))
    assert not (tmp_path / 'o').exists()


@pytest.mark.slow
@pytest.mark.parametrize('case', ['yolov3-tiny', 'yolov3-tiny_letterbox'])
def test_darknet_gives_the_boxes_darknet_prints(tmp_path, case):
    from tests.conftest import REF_CFG, SHARED
    meta = json.loads((DARKNET_FIXTURES / f'{case}.json').read_text())
    cfg = tmp_path / 'yolov3-tiny.cfg'  # Darknet's cfg (mask 1,2,3 on the second [yolo], as the weights were trained)
    text = (REF_CFG / 'yolov3-tiny.cfg').read_text()
    cfg.write_text(text.replace('[net]\n', '[net]\nletter_box=1\n') if 'net.letter_box=1' in meta['set'] else text)
    out = tmp_path / 'out'
    r = run_detect('--darknet', '--cfg', str(cfg), '--weights', str(TINY_WEIGHTS), '--source', str(SAMPLES),
                   '--output', str(out), '--save-txt', '--save-conf', '--nosave')
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (DARKNET_FIXTURES / f'{case}.jsonl').read_text().splitlines()]
    for rec in (x for x in records if x['image'].startswith('samples/')):
        name = Path(rec['image'])
        h, w = cv2.imread(str(SHARED / name)).shape[:2]
        rows = np.loadtxt(out / f'{name.stem}.txt', ndmin=2)  # class x y w h conf, normalised
        theirs = sorted(((o['class_id'], o['confidence'], o['relative_coordinates']) for o in rec['objects']),
                        key=lambda t: t[:2])
        ours = sorted(rows.tolist(), key=lambda r: (r[0], r[5]))  # by class, then confidence, as theirs
        assert [int(o[0]) for o in ours] == [t[0] for t in theirs], name
        for (c, x, y, bw, bh, conf), (_, dconf, rc) in zip(ours, theirs):
            assert abs(conf - dconf) < 1e-4
            corners = lambda b: np.array([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2])
            d = (corners([x, y, bw, bh]) - corners([rc['center_x'], rc['center_y'], rc['width'], rc['height']]))
            assert np.abs(d * [w, h, w, h]).max() <= 1, name
        # and the lines Darknet prints, exactly
        printed = re.findall(r'^([\w ]+): (\d+)%\t\(left_x:\s+(-?\d+)\s+top_y:\s+(-?\d+)\s+width:\s+(\d+)\s+height:\s+'
                             r'(\d+)\)$', r.stdout.split(f'{name.name}: ')[1].split('Done.')[1], re.M)
        assert len(printed) == len(rec['printed']), name
        mine = sorted((p[0], *map(int, p[1:])) for p in printed)
        assert mine == sorted((p[0], *map(int, p[1:])) for p in rec['printed']), name  # to the pixel and the percent
