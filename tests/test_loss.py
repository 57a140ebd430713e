"""Loss: parity with the original's compute_loss on a fixed batch, and target assignment on hand-made cases; the
CUDA step's device handling proven on the CPU (no host reads per micro-step, the device bound and synchronised,
channels_last, EMA, optimizer state in checkpoints)."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn

import models
import train
from models import Darknet
from tests.conftest import REF_CFG, ROOT, SHARED, TINY_WEIGHTS, TOY_CFG, make_subset
from utils import torch_utils
from utils.darknet.weights import load_darknet_weights
from utils.data.config import load_data_config
from utils.torch_utils import ModelEMA
from utils.train import distributed as du
from utils.train import engine
from utils.train.loss import ComputeLoss, FocalLoss, assign_targets, build_targets

FIXTURE = SHARED / 'fixtures' / 'loss_parity_tiny320.pt'
TRAIN_HYP = train.load_hyp(ROOT / 'data' / 'hyp.scratch.yaml')
HYP = {'giou': 3.54, 'cls': 37.4, 'cls_pw': 1.0, 'obj': 64.3, 'obj_pw': 1.0, 'iou_t': 0.20, 'fl_gamma': 0.0}


class FakeYOLO(nn.Module):
    """Just what the loss reads from a [yolo] module: anchors in grid units and scale_x_y."""

    def __init__(self, anchors_px: list[tuple[float, float]], stride: float, scale_x_y: float = 1.0):
        super().__init__()
        self.anchor_vec = torch.tensor(anchors_px) / stride
        self.scale_x_y = scale_x_y


class FakeModel(nn.Module):
    """One or two fake [yolo] layers and nc: the loss's whole view of a model."""

    def __init__(self, layers: list[FakeYOLO], nc: int = 80):
        super().__init__()
        self.module_list = nn.ModuleList(layers)
        self.yolo_layers = list(range(len(layers)))
        self.module_defs = [{'type': 'yolo', 'line': 1} for _ in layers]
        self.cfg_path = 'fake.cfg'
        self.nc = nc


def targets_of(p, targets, model, iou_t=HYP['iou_t']):
    """build_targets for a (fake) model's anchors and classes."""
    return build_targets(p, targets, [m.anchor_vec for m in model.module_list], model.nc, iou_t)


@pytest.fixture(scope='module')
def parity():
    """The fixture batch and the official yolov3-tiny's train-mode outputs on it."""
    d = torch.load(FIXTURE, weights_only=True)
    model = Darknet(REF_CFG / 'yolov3-tiny.cfg', img_size=320)
    load_darknet_weights(model, TINY_WEIGHTS)
    model.train()
    with torch.no_grad():
        p = model(d['images'].float() / 255)
    return d, model, p


@pytest.mark.slow
@pytest.mark.parametrize('setting', ['bce', 'focal_gamma1.5'])
def test_loss_parity_with_original(parity, setting):
    d, model, p = parity
    loss, items = ComputeLoss(model, d[setting]['hyp'])(p, d['targets'], d['gr'])
    ref = torch.tensor([d[setting][k] for k in ('lbox', 'lobj', 'lcls', 'total')])
    assert items.shape == (4,)
    assert torch.allclose(items, ref, rtol=1e-3, atol=0), (items, ref)
    assert loss.item() == pytest.approx(ref[3].item(), rel=1e-3)


@pytest.mark.slow
def test_loss_backward_gives_finite_gradients(parity):
    d, model, _ = parity
    model.zero_grad()
    p = model(d['images'][:2].float() / 255)
    targets = d['targets'][d['targets'][:, 0] < 2]
    loss, _ = ComputeLoss(model, d['bce']['hyp'])(p, targets, d['gr'])
    loss.backward()
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_build_targets_all_anchors_above_threshold():
    # stride 32 on a 320 input: 10x10 grid; anchors 32x32, 40x40, 300x300 px -> 1, 1.25, 9.375 cells
    model = FakeModel([FakeYOLO([(32, 32), (40, 40), (300, 300)], 32)])
    p = [torch.zeros(2, 3, 10, 10, 85)]
    # one 36x36 px box (IoU 0.79 and 0.81 with the first two anchors, ~0.014 with the third) centred at (0.55, 0.25)
    targets = torch.tensor([[1, 7, 0.55, 0.25, 36 / 320, 36 / 320]])
    tcls, tbox, indices, anch = targets_of(p, targets, model)
    b, a, gj, gi = indices[0]
    assert sorted(a.tolist()) == [0, 1]  # every anchor above iou_t, not only the best one
    assert b.tolist() == [1, 1] and tcls[0].tolist() == [7, 7]
    assert gi.tolist() == [5, 5] and gj.tolist() == [2, 2]
    assert torch.allclose(tbox[0][0], torch.tensor([0.5, 0.5, 1.125, 1.125]), atol=1e-5)
    assert torch.allclose(anch[0][a == 1][0], torch.tensor([1.25, 1.25]))


def test_build_targets_threshold_and_layers():
    # two layers (strides 32 and 16); a large box fits only the large anchor of the coarse layer
    model = FakeModel([FakeYOLO([(200, 200), (20, 20)], 32), FakeYOLO([(20, 20), (24, 24)], 16)])
    p = [torch.zeros(1, 2, 10, 10, 85), torch.zeros(1, 2, 20, 20, 85)]
    targets = torch.tensor([[0, 3, 0.5, 0.5, 180 / 320, 200 / 320],
                            [0, 4, 0.999, 1.0, 22 / 320, 22 / 320]])  # centre on the border: stays inside the grid
    tcls, tbox, indices, _ = targets_of(p, targets, model)
    assert indices[0][1].tolist() == [0, 1] and tcls[0].tolist() == [3, 4]
    assert indices[0][2].tolist() == [5, 9] and indices[0][3].tolist() == [5, 9]
    assert sorted(indices[1][1].tolist()) == [0, 1] and tcls[1].tolist() == [4, 4]
    assert indices[1][2].max() == 19
    tcls, tbox, indices, anch = targets_of(p, targets, model, iou_t=0.95)  # nothing matches this well
    assert all(len(t) == 0 for t in tcls) and all(x.shape == (0, 4) for x in tbox)


@pytest.mark.slow
def test_training_data_drops_labels_of_classes_the_model_lacks(tmp_path, logged):
    # the loss no longer checks classes (a device read per batch): the training loader train.py builds must
    make_subset(tmp_path, 3)
    bad = sorted((tmp_path / 'labels').glob('*.txt'))[0]
    bad.write_text('85 0.5 0.5 0.2 0.2\n')  # class 85 of an 80-class dataset
    data = load_data_config(tmp_path / 'subset.data')
    opt = train.get_args_parser().parse_args(['--batch-size', '2', '--workers', '0'])
    loader, dataset, _ = train.build_loaders(data, TRAIN_HYP, opt, du.DistInfo(), 128, 128)
    assert len(dataset) == 2 and bad.stem not in ' '.join(dataset.img_files)
    assert any(bad.name in line for line in logged())  # named, with what is wrong
    for _, targets, _, _ in loader:
        assert targets[:, 1].max() < 80


def test_masked_assignment_matches_build_targets():
    # assign_targets keeps every (anchor, target) pair; its mask selects exactly what build_targets returns
    model = FakeModel([FakeYOLO([(10, 13), (33, 23), (116, 90)], 32), FakeYOLO([(30, 61), (62, 45)], 16)], nc=5)
    torch.manual_seed(0)
    targets = torch.cat((torch.randint(0, 2, (9, 1)).float(), torch.randint(0, 5, (9, 1)).float(),
                         torch.rand(9, 2), torch.rand(9, 2) * 0.6 + 0.01), 1)
    p = [torch.zeros(2, 3, 10, 10, 10), torch.zeros(2, 2, 20, 20, 10)]
    dense, masks = assign_targets(p, targets, [m.anchor_vec for m in model.module_list], HYP['iou_t'])
    picked = targets_of(p, targets, model)
    assert 0 < sum(int(m.sum()) for m in masks) < sum(len(m) for m in masks)  # some pairs matched, some not
    for d, s in zip(dense, picked):
        for layer, (dl, sl) in enumerate(zip(d, s)):
            for x, y in zip(dl if isinstance(dl, tuple) else (dl,), sl if isinstance(sl, tuple) else (sl,)):
                assert torch.equal(x[masks[layer]], y)


def test_loss_without_targets_is_objectness_only():
    model = FakeModel([FakeYOLO([(32, 32)], 32)], nc=2)
    p = [torch.full((2, 1, 4, 4, 7), -3.0, requires_grad=True)]
    loss, items = ComputeLoss(model, HYP)(p, torch.zeros(0, 6))
    expected_obj = HYP['obj'] * math.log1p(math.exp(-3.0))  # BCE of logit -3 against target 0, mean
    assert items[0] == 0 and items[2] == 0
    assert items[1].item() == pytest.approx(expected_obj, rel=1e-5)
    loss.backward()
    assert p[0].grad[..., 4].abs().sum() > 0 and p[0].grad[..., :4].abs().sum() == 0


def test_new_coords_head_trains_its_logits_as_a_logits_head_does():
    # a new_coords head's map is its convolution's logistic output: the loss (and the gradient reaching the
    # convolution, through the logistic) must be the one a head with raw logits gets, when both decode to the same
    # boxes (xy: t * s - (s - 1) / 2 of the probability; wh: 4 t^2 instead of exp(t))
    targets = torch.tensor([[0, 1, 0.4, 0.6, 0.3, 0.2], [1, 0, 0.7, 0.3, 0.15, 0.25]])
    z = torch.randn(2, 3, 8, 8, 7, generator=torch.Generator().manual_seed(0)) * 2
    wh = torch.rand(2, 3, 8, 8, 2, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2  # probabilities
    logits, new = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    raw = torch.cat((logits[..., :2], torch.log(4 * wh ** 2), logits[..., 4:]), -1)  # exp(raw_wh) = 4 wh^2
    probs = torch.cat((torch.sigmoid(new[..., :2]), wh, torch.sigmoid(new[..., 4:])), -1)
    yolo = [FakeYOLO([(40, 40), (80, 60), (120, 150)], 32, scale_x_y=2.0)]
    model, model_new = FakeModel(yolo, nc=2), FakeModel(yolo, nc=2)
    model_new.module_defs[0]['new_coords'] = 1
    loss, items = ComputeLoss(model, HYP)([raw], targets)
    loss_new, items_new = ComputeLoss(model_new, HYP)([probs], targets)
    assert torch.allclose(items_new, items, rtol=1e-4) and items[0] > 0 and items[2] > 0
    loss.backward()
    loss_new.backward()
    assert torch.allclose(new.grad, logits.grad, rtol=1e-3, atol=1e-7)


def test_loss_perfect_prediction_and_objectness_ratio():
    # a prediction exactly on the target: GIoU 1 -> no box loss; obj target 1 whatever gr is
    model = FakeModel([FakeYOLO([(64, 64)], 32)], nc=2)
    p = torch.full((1, 1, 4, 4, 7), -20.0)
    p[0, 0, 1, 2, :4] = torch.tensor([0.0, 0.0, 0.0, 0.0])  # sigmoid 0.5 offsets, exp(0) * anchor = 2 cells
    p[0, 0, 1, 2, 4] = 20.0
    p[0, 0, 1, 2, 5:] = torch.tensor([-20.0, 20.0])
    targets = torch.tensor([[0, 1, 2.5 / 4, 1.5 / 4, 2 / 4, 2 / 4]])
    loss_fn = ComputeLoss(model, HYP)
    for gr in (0.0, 1.0):
        _, items = loss_fn([p], targets, gr)
        assert items.tolist() == pytest.approx([0, 0, 0, 0], abs=1e-4)
    # a worse box lowers the objectness target when gr = 1 but not when gr = 0
    p[0, 0, 1, 2, 2:4] = 1.0
    obj_gr0 = loss_fn([p], targets, gr=0.0)[1][1]
    obj_gr1 = loss_fn([p], targets, gr=1.0)[1][1]
    assert obj_gr0 < 1e-3 < obj_gr1


def test_focal_loss_down_weights_easy_examples():
    bce = nn.BCEWithLogitsLoss(reduction='none')
    focal = FocalLoss(nn.BCEWithLogitsLoss(), gamma=1.5, alpha=0.25)
    logits = torch.tensor([4.0, -4.0, 0.0])
    t = torch.tensor([1.0, 0.0, 1.0])
    ref = bce(logits, t)
    p_t = torch.sigmoid(torch.tensor([4.0, 4.0, 0.0]))
    w = torch.tensor([0.25, 0.75, 0.25]) * (1 - p_t) ** 1.5
    assert focal(logits, t).item() == pytest.approx((ref * w).mean().item(), rel=1e-6)
    assert focal.loss_fcn.reduction == 'none' and focal.reduction == 'mean'


def raw_on_labels(model, targets: torch.Tensor, img: int) -> tuple[list[torch.Tensor], list[tuple]]:
    """Raw train-mode maps whose every anchor assigned to a label (build_targets) encodes exactly that label under
    each layer's own decode (scale_x_y included), and the assignments with the label boxes in pixels."""
    loss_fn = ComputeLoss(model, HYP)
    layers = [model.module_list[j] for j in model.yolo_layers]
    p = [torch.zeros(2, m.na, img // int(m.stride), img // int(m.stride), m.no) for m in layers]
    _, tbox, indices, anch = build_targets(p, targets, loss_fn.anchor_vecs, model.nc, HYP['iou_t'])
    placed = []
    for m, pi, box, idx, an, new in zip(layers, p, tbox, indices, anch, loss_fn.new_coords):
        s = m.scale_x_y
        xy = (box[:, :2] + 0.5 * (s - 1)) / s  # inverse of the xy decode
        # new_coords: the map is the head convolution's logistic output, w = 4 t^2 anchor
        pi[idx + (slice(0, 2),)] = xy if new else torch.logit(xy)
        pi[idx + (slice(2, 4),)] = torch.sqrt(box[:, 2:4] / an / 4) if new else torch.log(box[:, 2:4] / an)
        cell = torch.stack((idx[3], idx[2]), 1).float()
        placed.append((idx, torch.cat(((box[:, :2] + cell) * m.stride, box[:, 2:4] * m.stride), 1)))
    return p, placed


def new_coords_cfg(path) -> str:
    """A cfg's text with yolov7's head: new_coords=1, scale_x_y 2 and a logistic on each head convolution."""
    sections = path.read_text().split('\n[')
    for k, sec in enumerate(sections):
        if sec.startswith('yolo]'):
            sec = re.sub(r'^scale_x_y\s*=.*$', '', sec, flags=re.M)
            sections[k] = sec.replace('yolo]\n', 'yolo]\nnew_coords=1\nscale_x_y=2.0\n', 1)
            sections[k - 1] = sections[k - 1].replace('activation=linear', 'activation=logistic')
    return '\n['.join(sections)


@pytest.mark.parametrize('cfg', ['yolov4-tiny.cfg', 'yolov4.cfg', 'yolov4-tiny.cfg new_coords'])
def test_box_loss_zero_where_inference_decodes_onto_the_label(cfg):
    # the yolov4 heads have scale_x_y 1.05-1.2, yolov7's new_coords heads 2 and w = 4 t^2 anchor: the loss must
    # decode as YOLOLayer does at inference
    name, *new = cfg.split()
    model = Darknet(new_coords_cfg(ROOT / 'cfg' / name) if new else ROOT / 'cfg' / name, img_size=256)
    assert ComputeLoss(model, HYP).new_coords == [bool(new)] * len(model.yolo_layers)
    layers = [model.module_list[j] for j in model.yolo_layers]
    assert {m.scale_x_y for m in layers} - {1.0}, 'the cfg should exercise scale_x_y'
    # boxes of many sizes, centres away from each other so no two labels share an anchor and cell
    targets = torch.tensor([[0, 1, 0.13, 0.21, 0.05, 0.07], [0, 2, 0.61, 0.33, 0.3, 0.2],
                            [1, 3, 0.42, 0.77, 0.6, 0.5], [1, 0, 0.88, 0.12, 0.1, 0.15],
                            [1, 5, 0.07, 0.93, 0.9, 0.8]])
    p, placed = raw_on_labels(model, targets, 256)
    for m, pi, (idx, box_px) in zip(layers, p, placed):
        m.eval()
        bs, na, ny, nx, no = pi.shape
        io, _ = m(pi.permute(0, 1, 4, 2, 3).reshape(bs, na * no, ny, nx), (256, 256))
        decoded = io.view(bs, na, ny, nx, no)[idx][:, :4]  # what inference reports at the assigned anchors
        assert torch.allclose(decoded, box_px, atol=1e-3), 'the raw maps should decode onto the labels'
    _, items = ComputeLoss(model, HYP)(p, targets)
    assert sum(len(i[0]) for i, _ in placed) >= len(targets)
    assert items[0].item() < 1e-5, f'box loss {items[0].item():.4f} at the boxes inference reports'


class HostReads:
    """Counts the calls through which the host reads (or copies in) tensor data: .item(), .tolist(), bool(), float(),
    int(), .cpu(), .numpy() and torch.tensor of Python data; on CUDA each is a sync (or a blocking copy)."""

    READS = ('item', 'tolist', '__bool__', '__float__', '__int__', 'cpu', 'numpy')

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        tensor = torch.tensor

        def counted_tensor(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor):
                self.calls.append('torch.tensor')
            return tensor(data, *args, **kwargs)
        monkeypatch.setattr(torch, 'tensor', counted_tensor)

    def _counted(self, name, fn):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return wrapper


def test_training_micro_steps_read_nothing_from_the_device(monkeypatch):
    # the real train_one_epoch on a tiny model: a micro-step (no optimizer step) must not make the host wait for the
    # device; an optimizer step reads one flag (the finite-loss check, the collective all ranks agree through)
    model = Darknet(TOY_CFG, img_size=64)
    torch.manual_seed(0)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 0, 0.3, 0.6, 0.1, 0.1], [1, 2, 0.7, 0.2, 0.6, 0.5]])
    batches = [(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), targets, ['x'] * 2, None)
               for _ in range(6)]
    reads = HostReads(monkeypatch)
    per_batch: list[list[str]] = []

    class Loader(list):
        def __iter__(self):  # the loop asks for batch i + 1 once batch i's step is queued
            for b in list.__iter__(self):
                per_batch.append(reads.calls[:])
                reads.calls.clear()
                yield b
            per_batch.append(reads.calls[:])
            reads.calls.clear()

    loss_fn = ComputeLoss(model, TRAIN_HYP)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loop = engine.LoopConfig(hyp=TRAIN_HYP, lf=engine.CosineLR(1, 0.1), n_burn=-1, batch_size=2, epochs=1, show=False)
    state, _ = engine.train_one_epoch(model=model, loader=Loader(batches), optimizer=optimizer,
                                      scaler=torch.amp.GradScaler('cpu', enabled=False), compute_loss=loss_fn,
                                      ema=ModelEMA(model), epoch=0,
                                      state=engine.LoopState(accumulate=3, img_size=64), cfg=loop)
    assert state.last_opt_step == 5  # optimizer steps after batches 2 and 5
    steps = per_batch[1:]  # what each batch's step did (per_batch[0]: before the first batch)
    assert len(steps) == 6
    assert [len(steps[i]) for i in (0, 1, 3, 4)] == [0, 0, 0, 0], steps  # micro-steps: nothing read
    assert steps[2] == steps[5] == ['item'], steps  # optimizer steps: the finite-loss flag only


def test_ema_update_gives_the_per_tensor_lerp_numbers():
    # the multi-tensor update must give exactly the per-tensor lerp's numbers, on both sides of lerp's 0.5 switch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1, bias=False))
    model[2].weight.requires_grad_(False)  # frozen: the average must stay bit-identical to it
    ema = ModelEMA(model, decay=0.9999, tau=2.0)  # a short ramp: 1 - d > 0.5 at first, < 0.5 later
    ref = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    for _ in range(6):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name != '2.weight':
                    p.add_(torch.randn_like(p))
            model(torch.randn(2, 3, 8, 8))  # BN running stats move too
        ema.update(model)
        w = 1 - ema.decay(ema.updates)
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ref[k].lerp_(v, w)
    got = ema.ema.state_dict()
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    assert torch.equal(got['2.weight'], model[2].weight)
    assert got['1.num_batches_tracked'] == 0 and ema.updates == 6


class CudaCalls:
    """Fake CUDA for a CPU machine: 2 devices, and a record of what set_device and synchronize were given."""

    def __init__(self, monkeypatch):
        self.set_device: list[torch.device] = []
        self.synchronize: list = []
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
        monkeypatch.setattr(torch.cuda, 'set_device', lambda d: self.set_device.append(torch.device(d)))
        monkeypatch.setattr(torch.cuda, 'synchronize', lambda d=None: self.synchronize.append(d))


def test_cuda_device_is_bound_and_synchronised_by_index(monkeypatch):
    cuda = CudaCalls(monkeypatch)
    torch_utils.set_cuda_device(torch.device('cpu'))
    torch_utils.set_cuda_device(torch.device('cuda:1'))
    assert cuda.set_device == [torch.device('cuda:1')]
    torch_utils.time_synchronized(torch.device('cpu'))  # the CPU has nothing queued
    torch_utils.time_synchronized(torch.device('cuda:1'))
    assert cuda.synchronize == [torch.device('cuda:1')]
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: False)
    torch_utils.time_synchronized()  # no context yet: opening one on GPU 0 just to wait would be the fault
    assert cuda.synchronize == [torch.device('cuda:1')]
    assert not torch_utils.pin_memory_for(torch.device('cpu')) and torch_utils.pin_memory_for(torch.device('cuda:1'))


@pytest.mark.slow
def test_testpy_and_detect_bind_the_device_before_loading(monkeypatch, tmp_path):
    # test.py / detect.py --device 1: GPU 1 is the current device before the model (or any CUDA tensor) exists
    import detect
    import test as testpy
    cuda = CudaCalls(monkeypatch)
    seen = []

    def loaded(*args, **kwargs):
        seen.append(list(cuda.set_device))
        raise RuntimeError('stop here: no real GPU')
    monkeypatch.setattr(testpy, 'load_eval_model', loaded)
    monkeypatch.setattr(models, 'load_eval_model', loaded)  # detect.py imports it where PyTorch runs
    data = make_subset(tmp_path, 1)
    with pytest.raises(RuntimeError, match='stop here'):
        testpy.run(testpy.parse_opt(['--data', str(data), '--weights', 'x.pt', '--batch-size', '1', '--img-size',
                                     '128', '--device', '1', '--half', 'off', '--save-dir', str(tmp_path)]))
    with pytest.raises(RuntimeError, match='stop here'):
        detect.load_detector(detect.parse_opt(['--weights', 'x.pt', '--device', '1', '--half', 'off']))
    assert seen == [[torch.device('cuda:1')], [torch.device('cuda:1')] * 2]


def test_channels_last_where_it_pays(monkeypatch):
    capability = {0: (8, 0), 1: (6, 1)}
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d: capability[torch.device(d).index])
    use = torch_utils.use_channels_last
    assert use(torch.device('cpu'), None) and use(torch.device('cpu'), torch.bfloat16)  # oneDNN, as before
    assert use(torch.device('cuda:0'), torch.float16) and use(torch.device('cuda:0'), torch.bfloat16)
    assert not use(torch.device('cuda:0'), None)  # fp32 on CUDA: NCHW
    assert not use(torch.device('cuda:1'), torch.float16)  # no tensor cores (Pascal)


def test_cudnn_benchmark_is_restored_even_after_an_error():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        with pytest.raises(KeyError):
            with torch_utils.cudnn_benchmark(False):
                assert torch.backends.cudnn.benchmark is False
                raise KeyError
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_optimizer_state_saved_on_cpu_loads_onto_the_parameters_device():
    # a GPU run's optimizer state (momentum buffers) is saved on the CPU, and loading puts it on the parameters'
    # device again; the 'meta' device stands in for a GPU here
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    live = opt.state[model.weight]['momentum_buffer']
    on_meta = torch_utils.state_to(opt.state_dict(), 'meta')
    assert on_meta['state'][0]['momentum_buffer'].is_meta and live.device.type == 'cpu'  # the live state stays
    saved = torch_utils.optimizer_state_cpu(opt)
    assert saved['state'][0]['momentum_buffer'].device.type == 'cpu'
    assert saved['state'][0]['momentum_buffer'] is not live  # a copy: later steps do not change a saved checkpoint
    assert saved['param_groups'] == opt.state_dict()['param_groups']
    meta_model = nn.Linear(4, 2, device='meta')
    meta_opt = torch.optim.SGD(meta_model.parameters(), lr=0.1, momentum=0.9)
    meta_opt.load_state_dict(saved)
    assert meta_opt.state[meta_model.weight]['momentum_buffer'].is_meta
    back = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    back.load_state_dict(saved)
    assert torch.equal(back.state[model.weight]['momentum_buffer'], live)


def test_process_group_is_bound_to_the_ranks_gpu(monkeypatch):
    cuda = CudaCalls(monkeypatch)
    calls = []
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.distributed, 'is_nccl_available', lambda: True)
    monkeypatch.delenv('TORCHELASTIC_RESTART_COUNT', raising=False)
    for k, v in {'RANK': '1', 'LOCAL_RANK': '1', 'WORLD_SIZE': '2'}.items():
        monkeypatch.setenv(k, v)
    du.init_distributed(torch.device('cuda:1'))
    du.init_distributed(torch.device('cpu'))
    assert cuda.set_device == [torch.device('cuda:1')]
    assert calls[0]['backend'] == 'nccl' and calls[0]['device_id'] == torch.device('cuda:1')
    assert calls[1]['backend'] == 'gloo' and 'device_id' not in calls[1]


def test_train_main_binds_the_device_before_training(monkeypatch):
    cuda = CudaCalls(monkeypatch)
    seen = []
    monkeypatch.setattr(train, 'train', lambda hyp, opt, device, *a, **k: seen.append((device, list(cuda.set_device))))
    for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(k, raising=False)
    assert train.main(train.parse_opt(['--device', '1'])) == 0
    assert seen == [(torch.device('cuda:1'), [torch.device('cuda:1')])]


def test_ddp_does_not_broadcast_buffers_and_checkpoints_hold_cpu_optimizer_state(tmp_path):
    # a one-process gloo group is enough to build the real DDP wrapper of build_parts
    model = Darknet(ROOT / 'cfg' / 'yolov3-tiny.cfg', img_size=64)
    opt = train.parse_opt(['--device', 'cpu', '--epochs', '1'])
    torch.distributed.init_process_group('gloo', store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        parts = train.build_parts(model, TRAIN_HYP, opt, torch.device('cpu'), du.DistInfo(0, 0, 1))
    finally:
        torch.distributed.destroy_process_group()
    assert isinstance(parts.model, nn.parallel.DistributedDataParallel)
    assert getattr(parts.model, 'forward_sync_buffers', None) is False or parts.model.broadcast_buffers is False
    p0 = next(model.parameters())
    p0.grad = torch.ones_like(p0)
    parts.optimizer.step()
    from utils.train.engine import LoopState
    from utils.train.resume import Progress, train_checkpoint
    ckpt = train_checkpoint(parts, TRAIN_HYP, opt, 0, LoopState(), Progress())
    bufs = [v for s in ckpt['optimizer']['state'].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert bufs and all(b.device.type == 'cpu' for b in bufs)
    assert all(b is not parts.optimizer.state[p0]['momentum_buffer'] for b in bufs)  # a copy, not the live state


def test_fp16_maps_decode_in_fp32():
    # --half on CUDA runs the network in fp16; exp() of a large raw w/h in fp16 overflows (exp(10) * 116 px > 65504)
    # and sigmoid/exp lose sub-pixel precision: the [yolo] decode must run in fp32 whatever the maps' dtype
    from models import YOLOLayer
    layer = YOLOLayer([(116, 90), (156, 198)], nc=2, stride=32, index=0).eval()
    torch.manual_seed(0)
    raw = torch.randn(1, 2 * 7, 4, 4) * 3
    raw[0, 2] = 10.0  # anchor 0's raw w everywhere
    io16, _ = layer(raw.half(), (128, 128))
    io32, _ = layer(raw.half().float(), (128, 128))  # the same fp16 numbers, decoded in fp32
    assert io16.dtype == torch.float32 and torch.isfinite(io16).all()
    assert torch.equal(io16, io32)
    assert io16[0, 0, 2].item() == pytest.approx(math.exp(10) * 116, rel=1e-6)


def test_inference_decode_makes_no_tensor_from_python_numbers_after_the_first_batch(monkeypatch):
    # the grid and the stride of a shape are made once: on CUDA each tensor from Python numbers is a blocking copy
    model = Darknet(ROOT / 'cfg' / 'yolov3-tiny.cfg', img_size=64).eval()
    x = torch.zeros(1, 3, 64, 96)
    with torch.no_grad():
        model(x)
        reads = HostReads(monkeypatch)
        model(x)
    assert reads.calls == []
