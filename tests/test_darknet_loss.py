"""Darknet's [yolo] loss (--loss darknet): gradients equal to Darknet's own deltas on the committed oracle fixture
(tests/fixtures/darknet_yolo, made by AlexeyAB/darknet itself), the printed loss equal to Darknet's, and the cfg
keys it reads."""
from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch

import train
from models import Darknet
from tests.conftest import ROOT, make_subset
from utils.boxes import bbox_iou
from utils.darknet.parse_config import ConfigError
from utils.train import resume
from utils.train.darknet_gaussian_loss import (
    GaussianLossConfig,
    gaussian_cost,
    gaussian_deltas,
)
from utils.train.darknet_loss import (
    DEFAULTS,
    DarknetLoss,
    Grid,
    YoloLossConfig,
    assign,
    class_multipliers,
    darknet_truths,
    dx_box_iou,
    layer_cost,
    layer_deltas,
    yolo_loss_config,
)
from utils.train.darknet_region_loss import RegionLossConfig, region_cost, region_deltas

FIXTURES = ROOT / 'tests' / 'fixtures' / 'darknet_yolo'
CASES = sorted(p.stem for p in FIXTURES.glob('*.npz'))


@functools.lru_cache(maxsize=None)
def case_fixture(name: str) -> tuple[dict, DarknetLoss]:
    """(fixture arrays, loss of the case's network) of one Darknet fixture case; built once per session."""
    with np.load(FIXTURES / f'{name}.npz') as f:
        d = dict(f)
    w, h = (int(v) for v in d['net_wh'])
    return d, DarknetLoss(Darknet(str(d['cfg']), img_size=(h, w)))


def load_case(name: str):
    """(fixture, loss, raw maps requiring grad, targets (n, 6)) of one Darknet fixture case."""
    d, loss_fn = case_fixture(name)
    truth = torch.from_numpy(d['truth'])  # (B, 200, 5) x, y, w, h, class; zero rows unused
    b, t = (truth.abs().sum(-1) > 0).nonzero(as_tuple=True)
    targets = torch.cat((b[:, None].float(), truth[b, t][:, 4:5], truth[b, t][:, :4]), 1)
    p = [to_maps(d[f'input_{k}'], len(d[f'mask_{k}'])).requires_grad_(True) for k in range(len(d['layer_index']))]
    loss_fn.model.seen = int(d['seen'])  # Darknet's net.seen, this batch counted ([region]'s prior pull)
    return d, loss_fn, p, targets


def to_maps(a: np.ndarray, na: int) -> torch.Tensor:
    """Darknet's (B, anchors * (5 + nc), h, w) layer memory as our raw map (B, anchors, h, w, 5 + nc)."""
    x = torch.from_numpy(np.ascontiguousarray(a))
    return x.reshape(x.shape[0], na, -1, *x.shape[2:]).permute(0, 1, 3, 4, 2).contiguous()


# What each oracle case is for, as our loss reads the cfg Darknet ran: the head type and the settings of every head
YOLO, GAUSSIAN, REGION = YoloLossConfig, GaussianLossConfig, RegionLossConfig
V4 = {'iou_loss': 'ciou', 'scale_x_y': 1.05, 'iou_normalizer': 0.07, 'ignore_thresh': 0.7, 'iou_thresh': 0.213}
CASE_SETTINGS = {
    'v3tiny_mse': (YOLO, {'iou_loss': 'mse', 'iou_normalizer': 0.75}),
    'v3tiny_mse_iou_thresh': (YOLO, {'iou_loss': 'mse', 'iou_thresh': 0.213}),
    'v3tiny_iou': (YOLO, {'iou_loss': 'iou'}),
    'v3tiny_giou': (YOLO, {'iou_loss': 'giou'}),
    'v3tiny_diou': (YOLO, {'iou_loss': 'diou'}),
    'v3tiny_ciou': (YOLO, {'iou_loss': 'ciou'}),
    'v4tiny': (YOLO, V4),
    'v4tiny_no_iou_thresh': (YOLO, {**V4, 'iou_thresh': 1.0}),
    'v4tiny_no_scale_x_y': (YOLO, {**V4, 'scale_x_y': 1.0}),
    'v4tiny_label_smooth': (YOLO, {**V4, 'label_smooth_eps': 0.1}),
    'v4tiny_thresholds': (YOLO, {**V4, 'ignore_thresh': 0.5, 'truth_thresh': 0.8}),
    'v4tiny_objectness_smooth': (YOLO, {**V4, 'objectness_smooth': 1, 'truth_thresh': 0.8}),
    'v4tiny_focal': (YOLO, {**V4, 'focal_loss': 1}),
    'v4tiny_counters': (YOLO, {**V4, 'class_multipliers': (1.0, 5.0, 2.0), 'cls_normalizer': 2.0}),
    'v4tiny_normalizers': (YOLO, {**V4, 'iou_normalizer': 0.5, 'obj_normalizer': 0.5, 'max_delta': 0.3}),
    'v4tiny_show_details0': (YOLO, {**V4, 'show_details': 0}),
    'v4tiny_grid_line': (YOLO, V4),
    'v4tiny_new_coords': (YOLO, {'new_coords': 1, 'scale_x_y': 2.0, 'objectness_smooth': 1, 'max_delta': 2.0}),
    'v4tiny_new_coords_csp': (YOLO, {'new_coords': 1, 'objectness_smooth': 0, 'obj_normalizer': 4.0, 'max_delta': 5.0}),
    'v3tiny_new_coords_mse': (YOLO, {'new_coords': 1, 'iou_loss': 'mse', 'scale_x_y': 2.0}),
    'v3tiny_gaussian': (GAUSSIAN, {'iou_loss': 'mse', 'uc_normalizer': 1.0}),
    'v3tiny_gaussian_giou': (GAUSSIAN, {'iou_loss': 'giou', 'uc_normalizer': 0.7, 'truth_thresh': 0.8}),
    'v2tiny_region': (REGION, {'softmax': 1, 'rescore': 1, 'bias_match': 1, 'object_scale': 5.0}),
    'v2tiny_region_seen': (REGION, {'softmax': 1, 'rescore': 1, 'bias_match': 1}),
    'v2tiny_region_variants': (REGION, {'softmax': 0, 'rescore': 0, 'bias_match': 0, 'noobject_scale': 0.5,
                                        'coord_scale': 2.0, 'class_scale': 1.5}),
}
PRIOR_PULL_SEEN = 12800  # [region] pulls every slot towards its anchor prior while seen < this (Darknet)


@pytest.mark.parametrize('case', sorted(CASE_SETTINGS))
def test_each_fixture_case_exercises_what_it_is_named_for(case):
    """The oracle case exists and the cfg Darknet ran has the settings its name promises (as our loss reads them),
    with labels matched to anchors and non-zero deltas: a regenerated fixture that lost a setting fails here."""
    assert case in CASES, f'{case}: no such case in {FIXTURES}'
    d, loss_fn, _, _ = load_case(case)
    kind, settings = CASE_SETTINGS[case]
    for cfg in loss_fn.configs:
        assert type(cfg) is kind, (case, type(cfg).__name__)
        for k, want in settings.items():
            assert getattr(cfg, k) == (want if isinstance(want, str) else pytest.approx(want)), (case, k)
    counts = [int(d[f'count_{k}']) for k in range(len(d['layer_index']))]
    assert sum(counts) > 0 and all(np.abs(d[f'delta_{k}']).max() > 0 for k in range(len(counts))), case
    if case.startswith('v2tiny_region'):  # the first batch pulls towards the priors, a later one does not
        assert (int(d['seen']) < PRIOR_PULL_SEEN) is (case == 'v2tiny_region'), int(d['seen'])
    if 'new_coords' in case:  # a new_coords head's input is logistic already: the convolution before it says so
        model = loss_fn.model
        assert all(model.module_defs[j]['activation'] == 'logistic' for j in model.head_convs()), case
    if case == 'v4tiny_grid_line':  # two truth centres exactly on the 10-cell head's grid lines (x = 0.7, 0.9)
        x = d['truth'][..., 0][np.abs(d['truth']).sum(-1) > 0] * 10
        assert (np.abs(x - np.round(x)) < 1e-5).sum() >= 2, x


@pytest.mark.parametrize('case', CASES)
def test_gradients_are_darknets_deltas_and_loss_is_darknets(case):
    d, loss_fn, p, targets = load_case(case)
    bs = p[0].shape[0]
    loss, items = loss_fn(p, targets)
    loss.backward()
    for k, pk in enumerate(p):
        ref = to_maps(d[f'delta_{k}'], pk.shape[1])
        ours = -pk.grad * bs / loss_fn.grad_scale  # the documented scale: -delta / batch * lr / 0.01
        # 1e-4 relative on every element; 1e-6 absolute where Darknet's float32 cancels to near zero
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6), (case, k, (ours - ref).abs().max())
        assert (ours[ref == 0] == 0).all(), 'untouched or ignored slots have exactly no gradient'
        truths = darknet_truths(targets.double(), bs, 3)
        net_wh = (int(d['net_wh'][0]), int(d['net_wh'][1]))
        if isinstance(loss_fn.configs[k], RegionLossConfig):
            cost = region_cost(region_deltas(loss_fn.configs[k], pk.detach().double(), *truths, int(d['seen'])))
        elif isinstance(loss_fn.configs[k], GaussianLossConfig):
            cost = gaussian_cost(gaussian_deltas(loss_fn.configs[k], pk.detach().double(), *truths, net_wh))
        else:
            delta, stats = layer_deltas(loss_fn.configs[k], pk.detach().double(), *truths,
                                        (int(d['net_wh'][0]), int(d['net_wh'][1])))
            cost = layer_cost(loss_fn.configs[k], delta, stats)
        assert cost[3].item() == pytest.approx(float(d[f'cost_{k}']), rel=1e-5)
    assert items[3].item() == pytest.approx(float(d['loss']), rel=1e-5)  # what `darknet detector train` prints
    assert loss.item() == pytest.approx(float(d['loss']), rel=1e-5)
    assert items[:3].sum().item() == pytest.approx(items[3].item(), rel=1e-6)


def yolo_def(**keys) -> dict:
    """A parsed [yolo] section with the given extra keys."""
    return {'type': 'yolo', 'line': 9, 'mask': [1, 2], 'anchors': [(10, 14), (23, 27), (37, 58)], 'classes': 3,
            **keys}


def test_omitted_keys_take_darknets_defaults():
    cfg = yolo_loss_config(yolo_def(), 'a.cfg:9: layer 4')
    assert {k: getattr(cfg, k) for k in DEFAULTS} == DEFAULTS
    assert cfg.iou_loss == 'mse' and cfg.iou_normalizer == 0.75 and cfg.ignore_thresh == 0.5
    assert cfg.anchors == ((10, 14), (23, 27), (37, 58)) and cfg.mask == (1, 2) and cfg.class_multipliers is None
    cfg = yolo_loss_config(yolo_def(iou_loss='giou', counters_per_class='100, 20, 50', max_delta=4.0), 'a.cfg')
    assert cfg.iou_loss == 'giou' and cfg.class_multipliers == (1.0, 4.0, 2.0)  # 100/20 = 5, capped at max_delta


@pytest.mark.parametrize('keys, message', [({'iou_loss': 'cious'}, 'iou_loss'),
                                           ({'iou_thresh_kind': 'mse'}, 'iou_thresh_kind'),
                                           ({'map': 'x.map'}, 'map'), ({'counters_per_class': '1,2'}, '2 values'),
                                           ({'num': 9}, 'num=9 differs from the 3 anchors')])
def test_key_it_cannot_honour_is_an_error(keys, message):
    with pytest.raises(ConfigError, match=f'a.cfg:9: layer 4: .*{message}'):
        yolo_loss_config(yolo_def(**keys), 'a.cfg:9: layer 4')


def test_cfg_error_names_file_and_layer(tmp_path):
    text = (ROOT / 'cfg' / 'yolov3-tiny.cfg').read_text()
    cfg = tmp_path / 'bad.cfg'
    cfg.write_text(text.replace('[yolo]\n', '[yolo]\niou_thresh_kind=mse\n', 1))
    with pytest.raises(ConfigError, match=r"bad.cfg:\d+: layer 16: \[yolo\] key iou_thresh_kind='mse' .*--loss darknet"):
        DarknetLoss(Darknet(cfg, img_size=128))


@pytest.mark.parametrize('px, size, n, cell', [(200, 416, 52, 25), (240, 416, 26, 15), (112, 160, 10, 7),
                                               (201, 416, 52, 25), (199, 416, 52, 24)])
def test_centre_on_a_grid_line_takes_darknets_float32_cell(px, size, n, cell):
    # Darknet: (int)(truth.x * l.w) with a float32 truth and a float32 product; 200/416 * 52 is 25 there, 24 in float64
    cfg = yolo_loss_config(yolo_def(), 'a.cfg')
    truths = torch.tensor([[[px / size, px / size, 23 / size, 27 / size, 1]]]).double()  # float32 labels, as given
    a = assign(cfg, truths, torch.ones(1, 1, dtype=torch.bool), Grid(n, n, float(size), float(size)))
    assert a.cell[3].tolist() == [cell] and a.cell[2].tolist() == [cell]


def test_truths_in_label_order_and_x_zero_ends_the_list():
    targets = torch.tensor([[1, 2, 0.5, 0.5, 0.1, 0.1], [0, 1, 0.2, 0.3, 0.1, 0.2], [1, 0, 0.0, 0.4, 0.1, 0.1],
                            [1, 1, 0.7, 0.7, 0.2, 0.2], [0, 0, 0.6, 0.3, 0.3, 0.2]])
    truths, valid = darknet_truths(targets, 3, nc=3)
    assert truths.shape == (3, 3, 5) and valid.tolist() == [[True, True, False], [True, False, False], [False] * 3]
    assert truths[0, :2, 4].tolist() == [1, 0] and truths[1, 0].tolist() == pytest.approx([0.5, 0.5, 0.1, 0.1, 2])
    with pytest.raises(ValueError, match='class 3 is out of range'):
        darknet_truths(torch.tensor([[0, 3, 0.5, 0.5, 0.1, 0.1]]), 1, nc=3)
    assert class_multipliers('0, 10', 2, math.inf) == (10.0, 1.0)  # counts under 1 count as 1, as Darknet


def test_iou_gradient_of_overlapping_boxes_is_the_true_derivative():
    # where boxes overlap, dx_box_iou's IoU part is the analytic derivative (w, h undivided by 2, as Darknet)
    # partial overlaps in x and y (no shared edges, where the min/max choice of a subgradient is arbitrary)
    pred = torch.tensor([[0.5, 0.5, 0.3, 0.2], [0.42, 0.61, 0.2, 0.35]], dtype=torch.float64, requires_grad=True)
    truth = torch.tensor([[0.55, 0.44, 0.25, 0.3], [0.35, 0.7, 0.3, 0.3]], dtype=torch.float64)
    bbox_iou(pred, truth, x1y1x2y2=False, eps=0).sum().backward()
    d = dx_box_iou(pred.detach(), truth, 'iou')
    assert torch.allclose(d[:, :2], pred.grad[:, :2]) and torch.allclose(d[:, 2:], 2 * pred.grad[:, 2:])


class Crash(Exception):
    """Stands for a crash after an epoch's checkpoint was written."""


@pytest.mark.slow
def test_train_with_darknet_loss_resumes_with_it(tmp_path, monkeypatch):
    # yolov4-tiny from random init (ciou, scale_x_y, iou_thresh): epoch 0, a crash, then --resume finishes epoch 1
    data = make_subset(tmp_path / 'data', 4)
    args = ['--cfg', str(ROOT / 'cfg' / 'yolov4-tiny.cfg'), '--data', str(data), '--weights', '', '--img-size', '128',
            '--epochs', '2', '--batch-size', '4', '--device', 'cpu', '--workers', '0', '--loss', 'darknet',
            '--notest', '--save-dir', str(tmp_path / 'run')]

    def crash(*_, **__):
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(train, 'stop_early', crash)
        with pytest.raises(Crash):
            train.main(train.parse_opt(args))
    assert 'loss: darknet' in (tmp_path / 'run' / 'opt.yaml').read_text()
    opt, _ = resume.resolve_resume(train.parse_opt(['--resume', str(tmp_path / 'run' / 'weights' / 'last.pt')]),
                                   train.option_defaults())
    assert opt.loss == 'darknet'  # the loss of the run, from its checkpoint
    assert train.main(train.parse_opt(['--resume', str(tmp_path / 'run' / 'weights' / 'last.pt')])) == 0
    rows = [r.split() for r in (tmp_path / 'run' / 'results.txt').read_text().splitlines()]
    assert [r[0] for r in rows] == ['0/1', '1/1']
    assert all(math.isfinite(float(v)) and float(v) > 0 for r in rows for v in r[2:6])  # box, obj, cls, total


@pytest.mark.slow
def test_train_refuses_a_key_it_cannot_honour(tmp_path, capsys):
    cfg = tmp_path / 'v4.cfg'
    cfg.write_text((ROOT / 'cfg' / 'yolov4-tiny.cfg').read_text().replace('[yolo]\n', '[yolo]\niou_thresh_kind=mse\n'))
    data = make_subset(tmp_path / 'data', 2)
    r = train.main(train.parse_opt(['--cfg', str(cfg), '--data', str(data), '--weights', '', '--img-size', '128',
                                    '--epochs', '1', '--device', 'cpu', '--loss', 'darknet',
                                    '--save-dir', str(tmp_path / 'run')]))
    err = capsys.readouterr().err.strip().splitlines()
    assert r == 2 and len(err) == 1
    assert re.search(rf'{re.escape(str(cfg))}:\d+: layer \d+: \[yolo\] key iou_thresh_kind', err[0])
    assert not (tmp_path / 'run').exists()  # nothing written


def head_cfg(kind: str) -> str:
    """A small cfg text ending in one detection head of kind ('region' or 'Gaussian_yolo'), 3 classes."""
    net = '[net]\nwidth=64\nheight=64\nchannels=3\n\n[convolutional]\nfilters=8\nsize=3\nstride=2\npad=1\n' \
          'activation=leaky\n\n[maxpool]\nsize=2\nstride=2\n\n'
    if kind == 'region':
        return net + '[convolutional]\nfilters=40\nsize=1\nstride=1\nactivation=linear\n\n[region]\n' \
                     'anchors=1.08,1.19, 3.42,4.41, 6.63,11.38, 9.42,5.11, 16.62,10.52\nclasses=3\nnum=5\n' \
                     'softmax=1\nbias_match=1\nrescore=1\nthresh=.6\nobject_scale=5\n'
    return net + '[convolutional]\nfilters=36\nsize=1\nstride=1\nactivation=linear\n\n[Gaussian_yolo]\nmask=0,1,2\n' \
                 'anchors=10,14, 23,27, 37,58\nclasses=3\nnum=3\niou_loss=giou\nuc_normalizer=0.7\n'


@pytest.mark.parametrize('kind', ['region', 'Gaussian_yolo'])
def test_each_head_kind_trains_with_darknets_loss_and_the_original_says_it_cannot(kind):
    from utils.train.loss import ComputeLoss
    model = Darknet(head_cfg(kind), img_size=64)
    loss_fn = DarknetLoss(model)
    model.train()
    p = model(torch.rand(2, 3, 64, 64))  # train mode: the raw maps
    targets = torch.tensor([[0, 1, 0.4, 0.6, 0.3, 0.2], [1, 2, 0.7, 0.3, 0.1, 0.4]])
    loss, items = loss_fn(p, targets)
    loss.backward()
    grads = [q.grad for q in model.parameters()]
    assert torch.isfinite(loss).all() and items[3] > 0 and all(g is not None and torch.isfinite(g).all() for g in grads)
    # train.py's anchor check reads the same configs: every label has an anchor here (all anchors are the head's)
    from utils.train.anchors import darknet_fit
    assert darknet_fit(torch.tensor([[10.0, 12.0], [40.0, 30.0], [60.0, 20.0]]), loss_fn.configs) == (1.0, 1.0)
    with pytest.raises(ConfigError, match=rf"<cfg text>:\d+: layer 3: .*\[{kind.split('_')[0]}.* cannot be trained "
                                          r"with --loss original"):
        ComputeLoss(model, {'giou': 1, 'obj': 1, 'cls': 1, 'cls_pw': 1, 'obj_pw': 1, 'iou_t': 0.2})


def test_region_prior_pull_stops_after_12800_images_the_model_has_seen():
    # Darknet's [region] pulls every box towards its anchor while net.seen (images, this batch included) < 12800;
    # the model's training forward counts them (and .weights headers and checkpoints keep the count)
    model = Darknet(head_cfg('region'), img_size=64)
    loss_fn = DarknetLoss(model)
    targets = torch.tensor([[0, 1, 0.4, 0.6, 0.3, 0.2]])
    box_grads = []
    for seen_before in (0, 12798 - 2, 12798):
        model.seen = seen_before
        p = model(torch.rand(2, 3, 64, 64))
        assert model.seen == seen_before + 2
        p[0].retain_grad()
        loss_fn(p, targets)[0].backward()
        box_grads.append(int((p[0].grad[..., :4] != 0).any(-1).sum()))
    assert box_grads[0] == box_grads[1] == p[0][..., 0].numel()  # seen 2 and 12798: every slot
    assert box_grads[2] == 1  # seen 12800: only the label's slot
