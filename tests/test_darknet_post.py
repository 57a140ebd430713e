"""utils/darknet/post.py: Darknet's `detector test` / `detector map` pre- and post-processing.

Fast: the pure parts on hand-made inputs (resize arithmetic, letterbox, candidates, NMS kinds, printed boxes, the mAP
interpolation). Slow: the official yolov3-tiny on ../shared images against what Darknet printed
(tests/fixtures/darknet_detect, made by tools/darknet_harness/detector_oracle.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.darknet import post as dp
from utils.darknet.parse_config import ConfigError, parse_cfg_text

FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'darknet_detect'


def _dets(boxes, prob, wh=(100, 100)) -> dp.Detections:
    prob = np.asarray(prob, np.float32).reshape(len(boxes), -1)
    return dp.Detections(np.asarray(boxes, np.float32), prob.max(1), prob, wh)


# ---------------------------------------------------------------------------------------------------------------
# settings from the cfg

CFG = """[net]
width=64
height=32
{net}
[convolutional]
filters=8
size=1
[yolo]
mask=0
anchors=10,10
classes=3
{yolo}
"""


def test_settings_read_net_and_last_yolo():
    defs = parse_cfg_text(CFG.format(net='letter_box=1', yolo='nms_kind=diounms\nbeta_nms=0.8'))
    s = dp.darknet_settings(defs[0], defs[1:])
    assert s == dp.DarknetSettings(64, 32, True, 'diounms', 0.8)
    defs = parse_cfg_text(CFG.format(net='', yolo=''))
    assert dp.darknet_settings(defs[0], defs[1:]) == dp.DarknetSettings(64, 32, False, 'default', 0.6)


def test_unknown_nms_kind_is_refused_with_its_line():
    defs = parse_cfg_text(CFG.format(net='', yolo='nms_kind=cornersnms'), 'x.cfg')
    with pytest.raises(ConfigError, match=r'x.cfg:\d+: \[yolo\] nms_kind=cornersnms is not one of default, greedynms'):
        dp.darknet_settings(defs[0], defs[1:], 'x.cfg')


# ---------------------------------------------------------------------------------------------------------------
# the image

def test_load_image_ignores_exif_orientation_as_stb(tmp_path):
    from PIL import Image
    f = tmp_path / 'rotated.jpg'
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": cv2.imread would turn the 40 x 20 image into 20 x 40
    Image.fromarray(np.full((20, 40, 3), (255, 0, 0), np.uint8)).save(f, exif=exif)
    im = dp.load_image(f)
    assert im.shape == (20, 40, 3) and im.dtype == np.float32
    assert im[10, 20, 0] > 0.9 and im[10, 20, 2] < 0.1  # RGB order, / 255
    with pytest.raises(FileNotFoundError, match='nothing.jpg: cannot read the image'):
        dp.load_image(tmp_path / 'nothing.jpg')


def test_resize_image_steps_over_in_minus_one_by_out_minus_one():
    im = np.arange(4, dtype=np.float32).reshape(1, 4, 1)  # one row 0 1 2 3
    out = dp.resize_image(im, 3, 1)
    assert out[0, :, 0].tolist() == [0.0, 1.5, 3.0]  # scale 3/2: columns 0, 1.5, and the last column taken as is
    up = dp.resize_image(im, 7, 1)[0, :, 0]
    np.testing.assert_allclose(up, [0, 0.5, 1, 1.5, 2, 2.5, 3], atol=1e-6)


def test_resize_image_last_row_quirk():
    # 2 rows -> 42: (42 - 1) * float32(1 / 41) = 0.99999994, so the last row takes row 0 with weight 1 - dy ~ 6e-8
    # and adds nothing (image.c skips the dy part of the last row): a black last row, as Darknet makes it
    im = np.ones((2, 3, 1), np.float32)
    out = dp.resize_image(im, 3, 42)
    assert out[40, 0, 0] == pytest.approx(1.0)
    assert out[41, 0, 0] < 1e-6


def test_letterbox_centres_on_grey_with_integer_sizes():
    im = np.zeros((480, 640, 3), np.float32)
    assert dp.letterbox_size(640, 480, 416, 416) == (416, 312)
    boxed = dp.letterbox_image(im, 416, 416)
    assert boxed.shape == (416, 416, 3)
    assert (boxed[:52] == 0.5).all() and (boxed[52:364] == 0).all() and (boxed[364:] == 0.5).all()
    t = dp.network_input(im, dp.DarknetSettings(416, 416, False))
    assert t.shape == (1, 3, 416, 416) and float(t.max()) == 0.0  # stretched: no grey


# ---------------------------------------------------------------------------------------------------------------
# candidates (get_network_boxes)

def test_candidates_order_thresholds_and_scores():
    # one layer, 2 anchors on a 1 x 2 grid, 3 classes; rows in the model's order (anchor, y, x)
    rows = np.array([[8, 8, 16, 16, 0.9, 0.5, 0.2, 0.3],     # anchor 0, cell 0
                     [24, 8, 16, 16, 0.2, 1.0, 1.0, 1.0],    # anchor 0, cell 1: objectness under 0.25
                     [8, 8, 32, 16, 0.5, 0.6, 0.4, 0.51],    # anchor 1, cell 0
                     [24, 8, 8, 8, 0.3, 0.9, 0.1, 0.0]], np.float32)  # anchor 1, cell 1
    s = dp.DarknetSettings(32, 16, False)
    d = dp.get_network_boxes(torch.from_numpy(rows), [(2, 1, 2)], s, (64, 48), 0.25)
    # Darknet's order: cell-major, anchors inside a cell; the 0.2-objectness row is gone
    np.testing.assert_allclose(d.objectness, [0.9, 0.5, 0.3])
    np.testing.assert_allclose(d.prob, [[0.45, 0, 0.27], [0.3, 0, 0.255], [0.27, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(d.boxes[0], [0.25, 0.5, 0.5, 1.0])  # relative to the network = to the image
    assert [(r, c) for r, c, _ in d.pairs()] == [(0, 0), (0, 2), (1, 0), (1, 2), (2, 0)]


def test_correct_boxes_undoes_the_letterbox():
    # 640 x 480 in 416 x 416: content rows 52..364; a box centred in the content, as tall as it
    box = np.array([[0.5, 0.5, 0.5, 312 / 416]], np.float32)
    out = dp.correct_boxes(box, (640, 480), (416, 416), True)
    np.testing.assert_allclose(out[0], [0.5, 0.5, 0.5, 1.0], atol=1e-6)
    top = np.array([[0.5, 52 / 416, 0.1, 0.1]], np.float32)  # the top edge of the content is y = 0 of the image
    assert dp.correct_boxes(top, (640, 480), (416, 416), True)[0, 1] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_array_equal(dp.correct_boxes(top, (640, 480), (416, 416), False), top)


# ---------------------------------------------------------------------------------------------------------------
# NMS kinds

def test_default_nms_is_per_class_and_a_box_keeps_its_other_classes():
    # a and b overlap with IoU 0.6; b carries class 1 too, where a has nothing
    d = _dets([[0.5, 0.5, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]],
              [[0.9, 0.0], [0.8, 0.7], [0.3, 0.0]])
    assert dp.box_iou(d.boxes[0], d.boxes[1:2])[0] == pytest.approx(0.6, abs=1e-3)
    out = dp.darknet_nms(d, 0.45, 'default')
    kept = sorted((round(float(out.prob[r, c]), 2), c) for r, c, _ in out.pairs())
    assert kept == [(0.3, 0), (0.7, 1), (0.9, 0)]


def test_diou_kinds_keep_distant_centres_that_iou_suppresses():
    # IoU 0.5 (> 0.45), centres far apart for boxes this size: DIoU = IoU - (d^2 / c^2) ** beta falls under 0.45
    a, b = [0.5, 0.5, 0.3, 0.1], [0.6, 0.5, 0.3, 0.1]
    d = _dets([a, b], [[0.9], [0.8]])
    iou = float(dp.box_iou(d.boxes[0], d.boxes[1:2])[0])
    assert iou == pytest.approx(0.5, abs=1e-6)
    c2, d2 = 0.4 ** 2 + 0.1 ** 2, 0.1 ** 2
    assert float(dp.box_diou(d.boxes[0], d.boxes[1:2], 0.6)[0]) == pytest.approx(iou - (d2 / c2) ** 0.6, abs=1e-6)
    assert dp.darknet_nms(d, 0.45, 'default').prob[:, 0].tolist() == pytest.approx([0.9, 0.0])
    assert dp.darknet_nms(d, 0.45, 'greedynms').prob[:, 0].tolist() == pytest.approx([0.9, 0.8])  # 0.5 - 0.19
    # diounms with a large beta: the distance term (d^2/c^2 = 0.059) ** 3 ~ 2e-4 leaves DIoU over 0.45
    assert dp.darknet_nms(d, 0.45, 'diounms', beta=3.0).prob[:, 0].tolist() == pytest.approx([0.9, 0.0])
    assert dp.darknet_nms(d, 0.45, 'diounms', beta=0.6).prob[:, 0].tolist() == pytest.approx([0.9, 0.8])


def test_nms_leaves_rows_in_darknets_sorted_order():
    d = _dets([[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]], [[0.3, 0.0], [0.9, 0.0], [0.3, 0.5]])
    out = dp.darknet_nms(d)  # last sort is by class 1: row 2 first, then rows 0 and 1 in their class-0 order
    np.testing.assert_allclose(out.boxes[:, 0], [0.9, 0.5, 0.1])


# ---------------------------------------------------------------------------------------------------------------
# what Darknet prints

def test_ext_output_rounds_half_away_from_zero_and_sorts_by_left():
    assert dp.c_round([0.5, 1.5, 2.5, -0.5, -2.5]).tolist() == [1, 2, 3, -1, -3]
    # binary fractions, so the products are exact: the second box's left edge is 0.5 px
    d = _dets([[0.5, 0.5, 0.2, 0.2], [0.1328125, 0.5, 0.25, 0.25]], [[0.3, 0.6], [0.9, 0.0]], wh=(64, 64))
    lines = dp.ext_output(d, 0.25)
    assert [(b.cls, b.left, b.top, b.width, b.height) for b in lines] == \
        [(0, 1, 24, 16, 16), (1, 26, 26, 13, 13), (0, 26, 26, 13, 13)]  # left 0.5 -> 1; best class, then the rest


def test_ext_output_text_and_detection_rows_follow_the_printed_order():
    d = _dets([[0.5, 0.5, 0.2, 0.2], [0.1328125, 0.5, 0.25, 0.25]], [[0.3, 0.6], [0.985, 0.0]], wh=(64, 64))
    text = dp.ext_output_text(dp.ext_output(d), ['person', 'bus'])
    # float32(0.985) * 100 = 98.49999...: printf's %.0f gives 98, as Darknet prints it
    assert text.splitlines() == ['person: 98%\t(left_x:    1   top_y:   24   width:   16   height:   16)',
                                 'bus: 60%\t(left_x:   26   top_y:   26   width:   13   height:   13)',
                                 'person: 30%\t(left_x:   26   top_y:   26   width:   13   height:   13)']
    rows = dp.detection_rows(d)
    np.testing.assert_allclose(rows[:, 4:], [[0.985, 0], [0.6, 1], [0.3, 0]], atol=1e-6)
    np.testing.assert_allclose(rows[0, :4], [0.5, 24, 16.5, 40], atol=1e-5)  # corners in pixels, not rounded


# ---------------------------------------------------------------------------------------------------------------
# detector map

def test_map_area_under_curve_and_points_on_a_hand_made_case():
    labels = np.array([[0, 0.2, 0.2, 0.2, 0.2], [0, 0.7, 0.7, 0.2, 0.2]], np.float32)
    # class 0: 0.9 on label 1 (TP), 0.8 on nothing (FP), 0.7 on label 2 (TP), 0.6 on label 1 again (FP)
    d = _dets([[0.2, 0.2, 0.2, 0.2], [0.5, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.21, 0.2, 0.2, 0.2]],
              [[0.9, 0], [0.8, 0], [0.7, 0], [0.6, 0]])
    r = dp.darknet_map([(d, labels)], classes=2)
    # precision 1, .5, .667, .5 at recall .5, .5, 1, 1: area = .5 * 1 + .5 * .667; class 1 (no labels) counts 0
    assert r.ap[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert r.map == pytest.approx(r.ap[0] / 2)
    assert (r.tp, r.fp, r.fn) == (2, 2, 0)
    r11 = dp.darknet_map([(d, labels)], classes=2, points=11)
    assert r11.ap[0] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_map_matches_only_the_same_class_over_the_iou_threshold():
    labels = np.array([[1, 0.5, 0.5, 0.2, 0.2]], np.float32)
    d = _dets([[0.5, 0.5, 0.2, 0.2], [0.58, 0.5, 0.2, 0.2]], [[0.9, 0.0], [0.0, 0.8]])  # class 0 on a class-1 label
    r = dp.darknet_map([(d, labels)], classes=2)
    # IoU of the class-1 detection is 0.12 / 0.28 = 0.43: under 0.5, so no TP anywhere
    assert r.ap.tolist() == [0.0, 0.0] and (r.tp, r.fp, r.fn) == (0, 2, 1)
    r = dp.darknet_map([(d, labels)], classes=2, iou_thresh=0.4)
    assert r.ap.tolist() == [0.0, 1.0]


def test_read_labels_as_read_boxes(tmp_path):
    f = tmp_path / 'a.txt'
    f.write_text('3 0.5 0.5 0.2 0.1\n\n3 0.5 0.5 0.2 0.1\n')  # a repeated row stays: Darknet counts both
    np.testing.assert_array_equal(dp.read_labels(f), np.array([[3, 0.5, 0.5, 0.2, 0.1]] * 2, np.float32))
    assert dp.read_labels(tmp_path / 'missing.txt').shape == (0, 5)
    f.write_text('3 0.5 0.5 0.2\n')
    with pytest.raises(ValueError, match=r'a.txt:1: not a label row'):
        dp.read_labels(f)


def _toy_model():
    from models import Darknet
    torch.manual_seed(0)
    model = Darknet(str(Path(__file__).resolve().parent / 'fixtures' / 'toy.cfg'))
    with torch.no_grad():
        for i in model.head_convs():  # no bias prior: objectness ~0.5, so there are candidates at 0.005
            model.module_list[i].Conv2d.bias.zero_()
    return dp.darknet_model(model)


def test_detector_and_evaluate_map_run_a_model(tmp_path):
    import cv2
    model = _toy_model()
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    rows, dets = dp.DarknetDetector(model, thresh=0.005)(bgr)
    assert rows.shape[1] == 6 and len(rows) == len(dets.pairs(0.005)) > 0
    np.testing.assert_allclose(np.sort(rows[:, 4]), np.sort([p for _, _, p in dets.pairs(0.005)]))
    img = tmp_path / 'a.png'
    cv2.imwrite(str(img), bgr)
    (tmp_path / 'a.txt').write_text('0 0.5 0.5 0.5 0.5\n')
    r = dp.evaluate_map(model, [img], [tmp_path / 'a.txt'])
    assert r.truths == 1 and r.detections > 0 and 0 <= r.map <= 1
    text = dp.map_report(r, ['a', 'b', 'c'])
    assert 'class_id = 2, name = c, ap = ' in text and f'mean average precision (mAP@0.50) = {r.map:.6f}' in text


def test_darknet_model_takes_new_coords_and_refuses_other_heads():
    from models import Darknet
    toy = (Path(__file__).resolve().parent / 'fixtures' / 'toy.cfg').read_text()
    model = dp.darknet_model(Darknet(toy.replace('[yolo]\n', '[yolo]\nnew_coords=1\nscale_x_y=2.0\n')))
    rows, dets = dp.DarknetDetector(model, thresh=0.005)(np.zeros((32, 32, 3), np.uint8))
    assert np.isfinite(dets.boxes).all()
    defs = parse_cfg_text(toy.replace('\n[yolo]\n', '\n[Gaussian_yolo]\n', 1), 'g.cfg')
    with pytest.raises(ConfigError, match=r'g.cfg:\d+: \[gaussian_yolo\]: .* \[yolo\] layers only'):
        dp.darknet_settings(defs[0], defs[1:], 'g.cfg')


# ---------------------------------------------------------------------------------------------------------------
# against Darknet (slow: ../shared images, the official yolov3-tiny)

def _fixture_cases() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob('*.jsonl'))


@pytest.fixture(scope='module')
def tiny_model():
    from tests.conftest import REF_CFG, TINY_WEIGHTS

    def build(edits: list[str]):
        from models import Darknet
        from utils.train.transfer import load_weights
        text = (REF_CFG / 'yolov3-tiny.cfg').read_text()
        for edit in edits:  # the fixtures' --set edits: net.letter_box=1, yolo.nms_kind=diounms
            section, kv = edit.split('.', 1)
            text = text.replace('[net]\n' if section == 'net' else '[yolo]\n', f'[{section}]\n{kv}\n')
        model = Darknet(text)
        load_weights(model, str(TINY_WEIGHTS), verbose=False)
        return dp.use_darknet_bn_eps(model).fuse().eval()
    return build


@pytest.mark.slow
@pytest.mark.parametrize('case', _fixture_cases())
def test_detect_matches_darknet_fixture(case, tiny_model):
    from tests.conftest import SHARED
    meta = json.loads((FIXTURES / f'{case}.json').read_text())
    model = tiny_model(meta['set'])
    settings = dp.settings_from_model(model)
    for line in (FIXTURES / f'{case}.jsonl').read_text().splitlines():
        rec = json.loads(line)
        im = dp.load_image(SHARED / rec['image'])
        ours = dp.detect(model, im, settings, meta['thresh'])
        printed = dp.ext_output(ours, meta['thresh'])
        assert [dp_cls for dp_cls in sorted(b.cls for b in printed)] == \
            sorted(o['class_id'] for o in rec['objects']), rec['image']
        theirs = sorted((o['class_id'], -o['confidence'], o) for o in rec['objects'])
        mine = sorted((b.cls, -b.prob, b) for b in printed)
        for (_, _, o), (_, _, b) in zip(theirs, mine):  # Darknet's JSON has 6 decimals; float noise is ~1e-6
            assert abs(b.prob - o['confidence']) < 1e-4, rec['image']
        # the pixels are Darknet's (utils/darknet/stb_jpeg.py), so the printed lines are the same to the pixel and percent
        dn_lines = sorted(tuple(p[1:]) for p in rec['printed'])
        our_lines = sorted((round(float(np.float32(b.prob) * np.float32(100))), b.left, b.top, b.width, b.height)
                           for b in printed)
        assert our_lines == dn_lines, rec['image']
