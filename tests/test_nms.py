"""non_max_suppression: filters, multi-label, class handling, merge-NMS, limits; against a plain greedy reference."""
from __future__ import annotations

import logging

import pytest
import torch
from torchvision.ops import box_iou, nms

from utils.eval.nms import non_max_suppression


def pred_rows(rows: list[tuple], nc: int = 3) -> torch.Tensor:
    """(1, n, 5 + nc) prediction from rows (x, y, w, h, obj, {cls: prob})."""
    out = torch.zeros(1, len(rows), 5 + nc)
    for k, (x, y, w, h, obj, probs) in enumerate(rows):
        out[0, k, :5] = torch.tensor([x, y, w, h, obj])
        for c, p in probs.items():
            out[0, k, 5 + c] = p
    return out


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """Textbook greedy NMS: take the best remaining box, drop those overlapping it by more than thr."""
    order = scores.argsort(descending=True).tolist()
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= thr]
    return keep


def test_overlapping_same_class_keeps_best_and_merges():
    p = pred_rows([(50, 50, 20, 20, 0.9, {0: 1.0}), (52, 50, 20, 20, 0.6, {0: 1.0}), (150, 50, 20, 20, 0.5, {0: 1.0})])
    out = non_max_suppression(p.clone(), conf_thres=0.1, iou_thres=0.6, merge=False)[0]
    assert out.shape == (2, 6)
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.5])  # sorted by confidence
    assert out[0, :4].tolist() == pytest.approx([40, 40, 60, 60])
    merged = non_max_suppression(p.clone(), conf_thres=0.1, iou_thres=0.6, merge=True)[0]
    # the kept box becomes the score-weighted mean of it and the box it suppressed: x1 = (0.9*40 + 0.6*42) / 1.5
    assert merged[0, :4].tolist() == pytest.approx([40.8, 40, 60.8, 60])
    assert merged[1, :4].tolist() == pytest.approx([140, 40, 160, 60])  # alone: unchanged


def test_classes_kept_apart_unless_agnostic():
    p = pred_rows([(50, 50, 20, 20, 0.9, {0: 0.9}), (50, 50, 20, 20, 0.8, {1: 0.9})])
    assert len(non_max_suppression(p.clone(), 0.1, 0.6)[0]) == 2
    out = non_max_suppression(p.clone(), 0.1, 0.6, agnostic=True)[0]
    assert len(out) == 1 and out[0, 5] == 0
    only1 = non_max_suppression(p.clone(), 0.1, 0.6, classes=[1])[0]
    assert len(only1) == 1 and only1[0, 5] == 1


def test_multi_label_and_confidence_product():
    p = pred_rows([(50, 50, 20, 20, 0.8, {0: 0.5, 1: 0.25, 2: 0.05})])
    out = non_max_suppression(p.clone(), conf_thres=0.1, iou_thres=0.6, multi_label=True)[0]
    # conf = obj * cls: 0.4, 0.2 and 0.04 (below 0.1)
    assert out[:, 5].tolist() == [0, 1] and out[:, 4].tolist() == pytest.approx([0.4, 0.2])
    best = non_max_suppression(p.clone(), conf_thres=0.1, iou_thres=0.6, multi_label=False)[0]
    assert best[:, 5].tolist() == [0] and best[0, 4].item() == pytest.approx(0.4)


def test_filters_objectness_and_tiny_boxes():
    p = pred_rows([(50, 50, 20, 20, 0.05, {0: 1.0}),  # objectness below threshold
                   (80, 50, 2, 20, 0.9, {0: 1.0}),  # 2 px wide: dropped, as the original
                   (120, 50, 2.5, 20, 0.9, {0: 1.0})])
    out = non_max_suppression(p, 0.1, 0.6)[0]
    assert out.shape == (1, 6) and out[0, 0].item() == pytest.approx(118.75)
    empty = non_max_suppression(torch.zeros(2, 5, 8), 0.1, 0.6)
    assert [o.shape for o in empty] == [(0, 6), (0, 6)]


def test_matches_greedy_reference_and_max_det():
    g = torch.Generator().manual_seed(0)
    n = 300
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 5
    obj = torch.rand(n, 1, generator=g)
    cls = torch.rand(n, 4, generator=g)
    p = torch.cat((xy, wh, obj, cls), 1)[None]
    out = non_max_suppression(p.clone(), conf_thres=0.05, iou_thres=0.5, multi_label=False, merge=False)[0]
    # reference: best class per box, conf filter, then greedy NMS per class
    conf, j = (cls * obj).max(1)
    ok = (obj[:, 0] > 0.05) & (conf > 0.05)
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), 1)
    ref = []
    for c in range(4):
        idx = (ok & (j == c)).nonzero().view(-1)
        ref += [(round(conf[idx[k]].item(), 5), c) for k in greedy_nms(boxes[idx], conf[idx], 0.5)]
    got = [(round(s, 5), int(c)) for s, c in zip(out[:, 4].tolist(), out[:, 5].tolist())]
    assert sorted(got) == sorted(ref) and len(got) > 20
    capped = non_max_suppression(p.clone(), 0.05, 0.5, multi_label=False, merge=False, max_det=7)[0]
    assert torch.equal(capped, out[:7])


def test_time_limit_and_bad_thresholds(caplog, monkeypatch):
    p = pred_rows([(50, 50, 20, 20, 0.9, {0: 1.0})]).repeat(3, 1, 1)
    threads = torch.get_num_threads()

    def no_thread_change(n: int) -> None:
        raise AssertionError(f'NMS changed the process-wide torch thread count to {n}')

    monkeypatch.setattr(torch, 'set_num_threads', no_thread_change)
    with caplog.at_level(logging.WARNING, logger='yolov3'):
        out = non_max_suppression(p, 0.1, 0.6, time_limit=-1.0)
    assert [len(o) for o in out] == [1, 0, 0]
    assert torch.get_num_threads() == threads  # NMS leaves the process-wide thread count alone
    assert [r.levelname for r in caplog.records] == ['WARNING'] and 'time limit' in caplog.text
    with pytest.raises(ValueError, match='conf_thres'):
        non_max_suppression(p, 1.5, 0.6)


def offset_trick_nms(pred: torch.Tensor, conf_thres: float, iou_thres: float, agnostic: bool = False) -> torch.Tensor:
    """The archive's formulation for one image: classes kept apart by shifting boxes 4096 px per class index
    (none if agnostic), torchvision.ops.nms, then merge-NMS with IoUs taken on the shifted boxes."""
    x = pred[pred[:, 4] > conf_thres]
    x = x[((x[:, 2:4] > 2) & (x[:, 2:4] < 4096)).all(1)].clone()
    x[:, 5:] *= x[:, 4:5]
    box = torch.cat((x[:, :2] - x[:, 2:4] / 2, x[:, :2] + x[:, 2:4] / 2), 1)
    i, j = (x[:, 5:] > conf_thres).nonzero(as_tuple=True)
    x = torch.cat((box[i], x[i, j + 5, None], j[:, None].float()), 1)
    shifted, scores = x[:, :4] + x[:, 5:6] * 4096 * (not agnostic), x[:, 4]
    keep = nms(shifted, scores, iou_thres)
    w = (box_iou(shifted[keep], shifted) > iou_thres) * scores[None]
    x[keep, :4] = (w @ x[:, :4]) / w.sum(1, keepdim=True)
    return x[keep]


def test_merge_nms_equals_class_offset_formulation(monkeypatch):
    # clusters of jittered boxes with several plausible classes each: plenty of merging and multi-label rows
    g = torch.Generator().manual_seed(1)
    centres = torch.rand(12, 2, generator=g) * 300 + 50
    xy = centres.repeat_interleave(30, 0) + torch.randn(360, 2, generator=g) * 4
    wh = torch.rand(12, 2, generator=g).repeat_interleave(30, 0) * 80 + 20 + torch.randn(360, 2, generator=g) * 3
    obj = torch.rand(360, 1, generator=g)
    cls = torch.rand(360, 6, generator=g) ** 3
    p = torch.cat((xy, wh, obj, cls), 1)
    ours = non_max_suppression(p[None].clone(), conf_thres=0.01, iou_thres=0.6)[0]
    ref = offset_trick_nms(p.clone(), 0.01, 0.6)
    assert len(ours) == len(ref) > 50
    key = lambda d: d[(d[:, 5] * 10 + d[:, 4]).argsort()]  # same order for both: by class, then score
    assert torch.allclose(key(ours), key(ref), atol=1e-3)
    plain = non_max_suppression(p[None].clone(), conf_thres=0.01, iou_thres=0.6, merge=False)[0]
    assert (key(plain)[:, :4] - key(ours)[:, :4]).abs().max() > 1  # the merge did move boxes
    ours = non_max_suppression(p[None].clone(), conf_thres=0.01, iou_thres=0.6, agnostic=True)[0]
    ref = offset_trick_nms(p.clone(), 0.01, 0.6, agnostic=True)
    assert 12 <= len(ours) == len(ref) < 100  # agnostic: one box or a few per cluster, merged across classes
    assert torch.allclose(key(ours), key(ref), atol=1e-3)
    import utils.eval.nms

    monkeypatch.setattr(utils.eval.nms, 'GRAIN', 2000)  # merge pairs cut into many pieces: the same boxes
    pieces = non_max_suppression(p[None].clone(), conf_thres=0.01, iou_thres=0.6, agnostic=True)[0]
    assert torch.allclose(pieces, ours, atol=1e-4)


@pytest.mark.slow
def test_import_in_background_defers_only_until_loaded():
    """In a fresh process: importing utils.eval.nms loads no torchvision; import_in_background() loads torchvision.ops in
    a thread while the caller goes on, and NMS then gives the same boxes as in this process."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ('import json, sys, torch\n'
            'from utils.eval.nms import import_in_background, non_max_suppression\n'
            'assert "torchvision" not in sys.modules\n'
            'thread = import_in_background()\n'
            'states = [thread.is_alive()]\n'
            'thread.join()\n'
            'assert "torchvision.ops" in sys.modules and import_in_background() is None\n'
            'p = torch.tensor([[[50. + 3 * i, 50, 20, 20, .9, 1] for i in range(80)]])  # > SMALL: torchvision\n'
            'print(json.dumps([states, non_max_suppression(p, 0.3, 0.5, merge=False)[0].tolist()]))\n')
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    states, boxes = json.loads(r.stdout.splitlines()[-1])
    assert states == [True]  # the import was still running right after it started
    p = torch.tensor([[[50. + 3 * i, 50, 20, 20, .9, 1] for i in range(80)]])
    assert torch.tensor(boxes).allclose(non_max_suppression(p, 0.3, 0.5, merge=False)[0])


def test_small_sets_keep_exactly_what_torchvision_keeps():
    """select_small (no torchvision import) against torchvision's batched_nms: random boxes with exact ties in
    coordinates and scores, several classes, any threshold; the same indices in the same order."""
    from torchvision.ops import batched_nms

    from utils.eval.nms import SMALL, select_small

    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        n = int(torch.randint(1, SMALL + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 300
        wh = torch.rand(n, 2, generator=g) * 80 + 1
        if trial % 2:
            xy, wh = xy.round(), wh.round() + 1  # whole pixels: many equal IoUs
        scores = torch.rand(n, generator=g)
        if trial % 3:
            scores = (scores * 5).round() / 5  # many equal scores: the stable order decides
        group = torch.randint(0, 3, (n,), generator=g)
        thr = 0.5 if trial % 4 == 0 else float(torch.rand(1, generator=g))
        boxes = torch.cat((xy, xy + wh), 1)
        assert torch.equal(select_small(boxes, scores, group, thr), batched_nms(boxes, scores, group, thr)), trial


def test_both_paths_give_the_same_detections(monkeypatch):
    """non_max_suppression with every image on the small path and with every image on torchvision's."""
    import utils.eval.nms

    g = torch.Generator().manual_seed(1)
    xy = torch.rand(2, 60, 2, generator=g) * 200
    pred = torch.cat((xy, torch.rand(2, 60, 2, generator=g) * 60 + 4, torch.rand(2, 60, 4, generator=g)), 2)
    monkeypatch.setattr(utils.eval.nms, 'SMALL', 10 ** 6)
    small = non_max_suppression(pred.clone(), 0.05, 0.5)
    monkeypatch.setattr(utils.eval.nms, 'SMALL', 0)
    large = non_max_suppression(pred.clone(), 0.05, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(small, large)) and sum(len(d) for d in small) > 10


@pytest.mark.slow
def test_detect_runs_without_importing_torchvision(tmp_path):
    """detect.py at its default conf on bus.jpg, in a fresh process: NMS takes the small path, so the second of
    torchvision's import is never paid; the detections are the usual 4 persons and 1 bus."""
    import subprocess
    import sys

    from tests.conftest import ROOT, SAMPLES, TINY_WEIGHTS

    code = ('import atexit, runpy, sys\n'
            'atexit.register(lambda: print("torchvision loaded:", "torchvision" in sys.modules))\n'
            f'sys.argv = ["detect.py", "--cfg", "cfg/yolov3-tiny.cfg", "--weights", {str(TINY_WEIGHTS)!r}, '
            f'"--source", {str(SAMPLES / "bus.jpg")!r}, "--output", {str(tmp_path)!r}, "--device", "cpu"]\n'
            'runpy.run_path("detect.py", run_name="__main__")\n')
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '4 persons, 1 bus' in r.stdout and 'torchvision loaded: False' in r.stdout, r.stdout[-2000:]
