"""ap_per_class, compute_ap, prediction matching, confusion matrix and fitness against hand-computed cases; COCO
helpers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import COCO128, COCO128_IMAGES
from utils.data.coco import (
    CocoGroundTruth,
    coco80_to_coco91_class,
    coco_evaluate,
    find_coco_annotations,
    image_ids,
    prediction_records,
)
from utils.eval.metrics import (
    ConfusionMatrix,
    ap_per_class,
    compute_ap,
    fitness,
    match_predictions,
)


def test_compute_ap_single_point():
    # recall 0.5 at precision 1: envelope 1 up to 0.5, then falls to 0 at the sentinel 0.501; on the 101-point
    # grid that is 1 for x <= 0.50 and 0 from 0.51 on: 0.5 + one half-step trapezoid 0.005
    ap, _, _ = compute_ap(np.array([0.5]), np.array([1.0]))
    assert ap == pytest.approx(0.505, abs=1e-9)


def test_compute_ap_envelope():
    # 3 targets; tp 1,0,1,0 -> recall 1/3,1/3,2/3,2/3, precision 1,1/2,2/3,1/2; envelope 1 to r=1/3, 2/3 to r=2/3:
    # grid 0..0.33 -> 1, 0.34..0.66 -> 2/3, 0.67.. -> 0: 0.33 + 0.01*(1+2/3)/2 + 0.32*2/3 + 0.01*(2/3)/2 = 0.555
    ap, mpre, _ = compute_ap(np.array([1, 1, 2, 2]) / 3, np.array([1, 1 / 2, 2 / 3, 1 / 2]))
    assert ap == pytest.approx(0.555, abs=1e-9)
    assert mpre[:5] == pytest.approx([1, 1, 2 / 3, 2 / 3, 1 / 2])


def test_ap_per_class_hand_case():
    conf = np.array([0.7, 0.9, 0.6, 0.8])  # unsorted on purpose
    tp = np.array([[1], [1], [0], [0]], dtype=bool)  # sorted by conf: tp 1,0,1,0
    pred_cls = np.zeros(4)
    target_cls = np.array([0, 0, 0, 1])  # class 1 has a target and no prediction
    res = ap_per_class(tp, conf, pred_cls, target_cls, pr_score=0.75)
    assert res.classes.tolist() == [0, 1]
    assert res.ap[:, 0] == pytest.approx([0.555, 0.0], abs=1e-9)
    # at conf 0.75 (between 0.8 and 0.7) recall is halfway from 1/3 to 2/3, precision from 1/2 to 2/3
    assert res.r == pytest.approx([0.5, 0.0])
    assert res.p == pytest.approx([7 / 12, 0.0])
    assert res.f1[0] == pytest.approx(2 * (7 / 12) * 0.5 / (7 / 12 + 0.5))
    # below every confidence: the end of the curve
    res = ap_per_class(tp, conf, pred_cls, target_cls)
    assert res.r[0] == pytest.approx(2 / 3) and res.p[0] == pytest.approx(0.5)
    assert res.py.shape == (2, 1000) and res.py[0, 0] == pytest.approx(1.0)
    # P and R against confidence on the px grid, interpolated along the curve as the PR curve is
    assert res.p_curve.shape == res.r_curve.shape == (2, 1000)
    k = np.searchsorted(res.px, 0.75)  # between the detections at conf 0.8 and 0.7
    t = (0.8 - res.px[k]) / 0.1
    assert res.r_curve[0, k] == pytest.approx(1 / 3 + t / 3) and res.p_curve[0, k] == pytest.approx(1 / 2 + t / 6)
    above, below = res.px > 0.9, res.px < 0.6  # nothing detected yet (R 0, P 1); the end of the curve
    assert (res.r_curve[0, above] == 0).all() and (res.p_curve[0, above] == 1).all()
    assert res.r_curve[0, below] == pytest.approx(2 / 3) and res.p_curve[0, below] == pytest.approx(1 / 2)
    assert not res.p_curve[1].any() and not res.r_curve[1].any()  # class 1: no predictions
    f1 = res.f1_curve()
    assert f1[0, k] == pytest.approx(2 * res.p_curve[0, k] * res.r_curve[0, k] / (res.p_curve[0, k] + res.r_curve[0, k]))


def test_ap_per_class_ignores_classes_without_targets():
    tp = np.array([[1], [0]], dtype=bool)
    res = ap_per_class(tp, np.array([0.9, 0.95]), np.array([0, 5]), np.array([0]))
    assert res.classes.tolist() == [0]  # class 5 was only predicted: not scored, not a false positive of class 0
    assert res.ap[0, 0] == pytest.approx(0.995, abs=1e-9)  # recall 1 at precision 1: see the end quirk below


def test_ap_perfect_detector_is_one_minus_end_quirk():
    # recall reaches exactly 1: the sentinel duplicates x=1, where np.interp takes the closing 0, so the last
    # trapezoid is halved (as the original): 1 - 0.005
    tp = np.ones((4, 10), dtype=bool)
    res = ap_per_class(tp, np.array([0.9, 0.8, 0.7, 0.6]), np.zeros(4), np.zeros(4))
    assert res.ap[0] == pytest.approx(np.full(10, 0.995), abs=1e-9)


def test_match_predictions_greedy_by_confidence():
    labels = torch.tensor([[0, 0, 0, 10, 10],  # A
                           [0, 20, 0, 30, 10],  # B
                           [1, 0, 0, 10, 10.]])  # C
    pred = torch.tensor([[0, 0, 10, 10, .9, 0],  # A, IoU 1: correct everywhere
                         [0, 0, 10, 9, .8, 0],  # best target A is taken: wrong everywhere
                         [21, 0, 30.5, 10, .7, 0],  # B, IoU 90/105 = 0.857: correct at 0.50..0.85
                         [0, 0, 10, 10, .6, 2],  # class without targets
                         [0, 0, 10, 4, .5, 1],  # C, IoU 0.4: below 0.5
                         [0, 0, 10, 6.2, .4, 1]])  # C, IoU 0.62: correct at 0.50, 0.55, 0.60
    correct = match_predictions(pred, labels)
    assert correct.shape == (6, 10)
    assert correct.sum(1).tolist() == [10, 0, 8, 0, 0, 3]
    assert correct[2].tolist() == [True] * 8 + [False] * 2


def test_match_predictions_second_target_not_taken_over():
    # as the original: a prediction whose best target is taken does not fall back to its second-best target
    labels = torch.tensor([[0, 0, 0, 10, 10], [0, 2, 0, 12, 10.]])
    pred = torch.tensor([[0, 0, 10, 10, .9, 0], [0.5, 0, 10.5, 10, .8, 0]])  # both best-match the first target
    assert match_predictions(pred, labels)[:, 0].tolist() == [True, False]
    assert not match_predictions(pred, labels[:0]).any()
    assert match_predictions(pred[:0], labels).shape == (0, 10)


def test_confusion_matrix_hand_case():
    labels = torch.tensor([[0, 0, 0, 10, 10],  # A: found by its class
                           [1, 20, 0, 30, 10],  # B: found as class 2
                           [2, 40, 0, 50, 10],  # C: missed
                           [0, 80, 0, 90, 10.]])  # D: two detections on it
    det = torch.tensor([[0, 0, 10, 10, .9, 0],  # A
                        [0, 0, 10, 10, .2, 1],  # below conf 0.25: not counted
                        [20, 0, 30, 10, .8, 2],  # B with the wrong class
                        [60, 0, 70, 10, .7, 0],  # on nothing: a false positive
                        [81, 0, 91, 10, .95, 0],  # D, IoU 9/11: the second-best overlap, a false positive
                        [80, 0, 90, 10, .6, 0]])  # D, IoU 1: the best overlap takes D, whatever the confidence
    cm = ConfusionMatrix(3)
    cm.process_batch(det, labels)
    expected = np.zeros((4, 4), dtype=int)  # rows predicted, columns true; index 3 = background
    expected[0, 0] = 2  # A and D
    expected[2, 1] = 1  # B as class 2
    expected[3, 2] = 1  # C missed: predicted background
    expected[0, 3] = 2  # the detection on nothing and the second one on D: true background
    assert cm.matrix.tolist() == expected.tolist()
    # normalised per true class: each column with any count sums to 1
    n = cm.normalised()
    assert n[:, :4].sum(0).tolist() == pytest.approx([1, 1, 1, 1])
    assert n[0, 0] == n[2, 1] == n[3, 2] == n[0, 3] == 1
    # an image with detections only, then one with labels only
    cm.process_batch(det[:1], labels[:0])
    cm.process_batch(det[:0], labels[2:3])
    assert cm.matrix[0, 3] == 3 and cm.matrix[3, 2] == 2
    assert cm.normalised()[0, 0] == 1 and cm.normalised()[3, 2] == 1
    with pytest.raises(ValueError, match='class 3 is outside the confusion matrix of 3 classes'):
        cm.process_batch(torch.tensor([[0, 0, 10, 10, .9, 3.]]), labels)


def test_confusion_matrix_pairs_as_yolov5():
    labels = torch.tensor([[0, 0, 0, 100, 100], [0, 0, 0, 100, 70.]])  # L0, L1
    # IoU with L0, L1: a 0.9, 0.78; b 0.8, 0.875: each detection's best label differs, both are matched
    det = torch.tensor([[0, 0, 100, 90, .9, 0], [0, 0, 100, 80, .8, 0]])
    cm = ConfusionMatrix(1, iou_thres=0.45)
    cm.process_batch(det, labels)
    assert cm.matrix.tolist() == [[2, 0], [0, 0]]
    # a 1.0, 0.7; b 0.85, 0.82: as YOLOv5 v7, b keeps only its best label L0, which goes to a; so b counts as a
    # false positive and L1 as missed, though b overlaps L1 by 0.82
    det = torch.tensor([[0, 0, 100, 100, .9, 0], [0, 0, 100, 85, .8, 0]])
    cm = ConfusionMatrix(1, iou_thres=0.45)
    cm.process_batch(det, labels)
    assert cm.matrix.tolist() == [[1, 1], [1, 0]]


def test_fitness_picks_the_epoch_with_better_map_over_thresholds():
    # rows as train.py writes them: P, R, mAP@0.5, mAP@0.5:0.95, F1, val losses
    a = [1.0, 1.0, 0.60, 0.20, 1.0, 0.1, 0.1, 0.1]  # perfect P, R, F1, losses and a better mAP@0.5 ...
    b = [0.0, 0.0, 0.40, 0.25, 0.0, 9.0, 9.0, 9.0]  # ... lose to a better mAP@0.5:0.95 (as the original: 0.1/0.9)
    c = [0.0, 0.0, 0.61, 0.20, 0.0, 9.0, 9.0, 9.0]  # same mAP@0.5:0.95: mAP@0.5 breaks the tie
    f = fitness(np.array([a, b, c]))
    assert f.argmax() == 1 and f[2] > f[0]
    assert fitness(np.array([[0, 0, 1, 1, 0, 0, 0, 0]])) == pytest.approx([1.0])  # perfect mAPs: fitness 1


@pytest.mark.slow
def test_coco_ids_and_class_map():
    # each of our 80 class indices maps to COCO's category of the same name (COCO's ids have gaps, e.g. no 12)
    cats = json.loads((COCO128 / 'annotations' / 'instances_train2017.json').read_text())['categories']
    coco_name = {c['id']: c['name'] for c in cats}
    ours = (COCO128 / 'coco.names').read_text().splitlines()
    assert [coco_name[cid] for cid in coco80_to_coco91_class()] == ours
    rec = prediction_records(7, np.array([[1, 2, 3, 4.]]), np.array([0.5]), np.array([79]), coco80_to_coco91_class())
    assert rec[0]['category_id'] == 90 and coco_name[90] == ours[79] == 'toothbrush'
    assert image_ids(['a/000000000009.jpg', 'b/COCO_val2014_000000000042.jpg']) == {
        'a/000000000009.jpg': 9, 'b/COCO_val2014_000000000042.jpg': 42}
    assert image_ids(['x/dog.jpg', 'x/cat.jpg']) == {'x/cat.jpg': 1, 'x/dog.jpg': 2}  # custom names: positions
    assert find_coco_annotations(COCO128_IMAGES) == COCO128 / 'annotations' / 'instances_train2017.json'
    assert find_coco_annotations(COCO128 / 'labels') is None


def test_find_coco_annotations_for_image_lists(tmp_path):
    (tmp_path / 'annotations').mkdir()
    (tmp_path / 'annotations' / 'instances_val2014.json').write_text('{}')
    (tmp_path / '5k.txt').write_text('./images/val2014/COCO_val2014_000000000042.jpg\n')
    assert find_coco_annotations(tmp_path / '5k.txt') == tmp_path / 'annotations' / 'instances_val2014.json'
    (tmp_path / 'annotations' / 'instances_val2017.json').write_text('{}')
    (tmp_path / 'val2017.txt').write_text('./images/val2017/000000000139.jpg\n')
    assert find_coco_annotations(tmp_path / 'val2017.txt') == tmp_path / 'annotations' / 'instances_val2017.json'
    assert find_coco_annotations(tmp_path / '5k.txt') is None  # two candidates: ground truth from the labels instead


def test_coco_gt_from_labels_scores_perfect_predictions(tmp_path):
    gt = CocoGroundTruth(['cat', 'dog'])
    boxes = np.array([[10, 20, 110, 220], [200, 50, 300, 90.]])
    gt.add_image(1, 'a.jpg', 480, 640, [0, 1], boxes)
    gt.add_image(2, 'b.jpg', 480, 640, [1], boxes[:1])
    gt_file = gt.save(tmp_path / 'gt.json')
    recs = prediction_records(1, boxes, np.array([0.9, 0.8]), np.array([0, 1]))
    recs += prediction_records(2, boxes[:1], np.array([0.7]), np.array([1]))
    assert recs[0]['bbox'] == [10.0, 20.0, 100.0, 200.0]
    (tmp_path / 'pred.json').write_text(json.dumps(recs))
    stats = coco_evaluate(gt_file, tmp_path / 'pred.json', img_ids=[1, 2], verbose=False)
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    # one box shifted off its object: AP drops
    recs[1]['bbox'][0] += 60
    (tmp_path / 'pred.json').write_text(json.dumps(recs))
    assert coco_evaluate(gt_file, tmp_path / 'pred.json', verbose=False)[1] < 1.0
