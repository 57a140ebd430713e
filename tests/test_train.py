"""train.py and utils/engine.py: schedule, optimizer groups, accumulation, AMP, EMA, multi-scale, checkpoints, resume,
freeze, evolve, device rules, DDP (torchrun, elastic restart, launcher), and short CPU runs through the command line
on a few coco128 images at 64-160 pixels."""
from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from models import Darknet, load_darknet_weights
from tests.conftest import ROOT, TINY_WEIGHTS, make_subset
from utils import engine
from utils.torch_utils import ModelEMA

CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'
HYP = train.load_hyp(ROOT / 'data' / 'hyp.scratch.yaml')


def cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run train.py as a user would, in cwd."""
    return subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def base_args(data: Path, *extra: str, size: int = 160, epochs: int = 2, batch: int = 8) -> list[str]:
    return ['--cfg', str(CFG), '--data', str(data), '--weights', str(TINY_WEIGHTS), '--img-size', str(size),
            '--epochs', str(epochs), '--batch-size', str(batch), '--device', 'cpu', '--workers', '0', *extra]


@pytest.fixture(scope='module')
def coco8(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp('coco8'), 8, name='coco8')


def load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


# ------------------------------------------------------------------------------------------------------------------
# pure parts

def record_lrs(monkeypatch) -> list[tuple[int, list[float]]]:
    """(epoch, LR of each optimizer group) as the optimizer had them after each epoch's batches of a real run."""
    seen: list[tuple[int, list[float]]] = []
    real = train.train_one_epoch

    def recording(**kw):
        out = real(**kw)
        seen.append((kw['epoch'], [g['lr'] for g in kw['optimizer'].param_groups]))
        return out

    monkeypatch.setattr(train, 'train_one_epoch', recording)
    return seen


def test_lr_of_a_real_run_burn_in_then_the_originals_cosine(coco8, tmp_path, monkeypatch):
    # 10 epochs of one batch, burn-in shortened to 2 iterations: epochs 0-2 ramp (biases 0.1 -> target, others
    # 0 -> target), then the LR is lr0 times the original's lf = ((1 + cos(x * pi / epochs)) / 2) * 0.95 + 0.05,
    # which the default hyp (lrf 0.05) reproduces; the last epoch ends near 0.05 * lr0
    monkeypatch.setattr(train, 'n_burn_in', lambda nb: 2)
    seen = record_lrs(monkeypatch)
    assert train.main(train.parse_opt(base_args(coco8, '--notest', '--nosave', '--save-dir', str(tmp_path),
                                                epochs=10, size=64))) == 0
    lr0, epochs = HYP['lr0'], 10
    original = [((1 + math.cos(x * math.pi / epochs)) / 2) * 0.95 + 0.05 for x in range(epochs)]
    assert [e for e, _ in seen] == list(range(epochs))
    for e, lrs in seen:
        target = lr0 * original[e]
        if e <= 2:  # burn-in at integrated batch e
            expected = [target * e / 2, target * e / 2, 0.1 + (target - 0.1) * e / 2]
        else:
            expected = [target] * 3
        assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12), e
    assert seen[-1][1][0] == pytest.approx(lr0 * 0.0733, rel=1e-3) and seen[-1][1][0] < 0.08 * lr0


def test_warmup_interpolates_lr_momentum_gr_accumulate():
    targets = [0.01, 0.01, 0.01]
    w0 = engine.warmup_values(0, 500, targets, HYP, batch_size=16)
    assert w0['lr'] == [0.0, 0.0, 0.1] and w0['momentum'] == pytest.approx(0.9)
    assert w0['gr'] == 0.0 and w0['accumulate'] == 1 and w0['weight_decay'] == [0.0, 0.0, 0.0]
    mid = engine.warmup_values(250, 500, targets, HYP, batch_size=16)
    assert mid['lr'] == pytest.approx([0.005, 0.005, 0.055])
    assert mid['momentum'] == pytest.approx((0.9 + 0.937) / 2) and mid['gr'] == pytest.approx(0.5)
    assert mid['accumulate'] == round(1 + 3 * 0.5)  # 1 -> 64 / 16 = 4
    assert mid['weight_decay'] == pytest.approx([0.0, HYP['weight_decay'] / 2, 0.0])
    end = engine.warmup_values(500, 500, targets, HYP, batch_size=16)
    assert end['lr'] == pytest.approx(targets) and end['momentum'] == pytest.approx(0.937)
    assert end['gr'] == 1.0 and end['accumulate'] == 4 and end['weight_decay'] == [0.0, HYP['weight_decay'], 0.0]
    assert train.n_burn_in(8) == 500 and train.n_burn_in(1000) == 3000


def test_optimizer_groups_as_the_original():
    model = Darknet(CFG, 160)
    opt = train.build_optimizer(model, HYP)
    g0, g1, g2 = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith('.bias') for p in g2['params'])
    assert all(names[id(p)].endswith('Conv2d.weight') for p in g1['params'])
    assert all('BatchNorm2d.weight' in names[id(p)] for p in g0['params'])
    assert g1['weight_decay'] == HYP['weight_decay'] and g0['weight_decay'] == 0 and g2['weight_decay'] == 0
    assert g0['nesterov'] and g0['momentum'] == HYP['momentum']
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))
    assert isinstance(train.build_optimizer(model, HYP, adam=True), torch.optim.Adam)


def test_multi_scale_sizes():
    assert train.check_img_sizes([320, 320, 320], False) == (320, 320, 10, 10, False)
    big, test_size, gmin, gmax, multi = train.check_img_sizes([320, 320, 256], True)
    assert (big, test_size, gmin * 32, gmax * 32, multi) == (448, 256, 192, 448, True)  # 0.67x - 1.5x
    assert train.check_img_sizes([256, 512, 416], False)[2:] == (8, 16, True)  # min != max -> multi-scale
    rng = __import__('random').Random(0)
    sizes = {engine.multi_scale_size(rng, gmin, gmax) for _ in range(300)}
    assert sizes == set(range(192, 449, 32))
    imgs = torch.rand(2, 3, 448, 320)
    assert engine.resize_batch(imgs, 224).shape[2:] == (224, 160)
    assert engine.resize_batch(imgs, 200).shape[2:] == (224, 160)  # sides rounded up to multiples of 32
    for bad in ([300, 300, 300], [320, 320, 0], [640, 320, 320]):
        with pytest.raises(ValueError, match='img-size'):
            train.check_img_sizes(bad, False)


NO_BN_CFG = """[net]
width=64
height=64
channels=3

[convolutional]
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=255
size=1
stride=1
pad=1
activation=linear

[yolo]
mask=0,1,2
anchors=10,14, 23,27, 37,58
classes=80
num=3
"""


def run_epoch(model: nn.Module, batches: list, accumulate: int, batch_size: int, lr: float = 1.0,
              amp_dtype: torch.dtype | None = None, distributed: bool = False
              ) -> tuple[train.LoopState, train.EpochStats]:
    """One real train_one_epoch over in-memory batches with plain SGD, no burn-in, no EMA."""
    from utils.loss import ComputeLoss
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    cfg = train.LoopConfig(hyp=HYP, lf=train.CosineLR(1, HYP['lrf']), n_burn=-1, batch_size=batch_size, epochs=1,
                           amp_dtype=amp_dtype, distributed=distributed, show=False)
    return train.train_one_epoch(model=model, loader=batches, optimizer=optimizer, scaler=scaler,
                                 compute_loss=ComputeLoss(model, HYP), ema=None, device=torch.device('cpu'), epoch=0,
                                 state=train.LoopState(accumulate=accumulate, img_size=64), cfg=cfg)


def test_accumulated_micro_batches_step_like_one_nominal_batch(tmp_path):
    # the real loop: 4 micro-batches of 2 images, accumulated, make the same optimizer step as one batch of 8
    # (objectness-only targets so the per-batch means weigh equally; no BatchNorm, whose statistics depend on the split)
    cfg = tmp_path / 'nobn.cfg'
    cfg.write_text(NO_BN_CFG)
    torch.manual_seed(0)
    imgs = torch.randint(0, 255, (8, 3, 64, 64), dtype=torch.uint8)
    empty = torch.zeros(0, 6)
    ref = Darknet(cfg, 64)
    a, b = copy.deepcopy(ref), copy.deepcopy(ref)
    state, _ = run_epoch(a, [(x, empty, ['x'] * 2, None) for x in imgs.chunk(4)], accumulate=4, batch_size=2)
    assert state.last_opt_step == 3  # one step, after the 4th micro-batch
    run_epoch(b, [(imgs, empty, ['x'] * 8, None)], accumulate=1, batch_size=8)
    moved = [(pa - pr).abs().max().item() for pa, pr in zip(a.parameters(), ref.parameters())]
    assert max(moved) > 1e-4  # the step did something
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-7)
    c = copy.deepcopy(ref)  # 3 micro-batches of an accumulation of 4: no step yet, the weights stay
    state, _ = run_epoch(c, [(x, empty, ['x'] * 2, None) for x in imgs.chunk(4)[:3]], accumulate=4, batch_size=2)
    assert state.last_opt_step == -1 and all(torch.equal(p, q) for p, q in zip(c.parameters(), ref.parameters()))


def _ddp_accumulate_worker(rank: int, init_file: str, cfg: str, out: str) -> None:
    """One of 2 gloo ranks: 2 micro-batches of 2 images each, accumulated (and, for comparison, not), counting the
    gradient all-reduces through a DDP communication hook."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    imgs = torch.randint(0, 255, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batches = [(x, torch.zeros(0, 6), ['x'] * 2, None) for x in imgs[4 * rank:4 * rank + 4].chunk(2)]
    result = {}
    for accumulate in (2, 1):
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Darknet(cfg, 64))
        calls = [0]

        def counting_hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        run_epoch(model, batches, accumulate=accumulate, batch_size=4, distributed=True)
        result[accumulate] = (calls[0], [p.detach().clone() for p in model.module.parameters()])
    torch.save(result, f'{out}/rank{rank}.pt')
    dist.destroy_process_group()


def test_ddp_accumulation_all_reduces_once_per_optimizer_step(tmp_path):
    # 2 gloo ranks x 2 micro-batches of 2 images, accumulate 2: gradients are all-reduced once (no_sync on the first
    # micro-batch), and the step equals one single-process step on all 8 images
    import torch.multiprocessing as mp
    cfg = tmp_path / 'nobn.cfg'
    cfg.write_text(NO_BN_CFG)
    mp.spawn(_ddp_accumulate_worker, args=(str(tmp_path / 'init'), str(cfg), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    (calls2, w2), (calls1, _) = r0[2], r0[1]
    assert calls2 >= 1 and calls1 == 2 * calls2  # without accumulation: one all-reduce per micro-batch
    assert all(torch.equal(a, b) for a, b in zip(w2, r1[2][1]))  # the ranks agree
    torch.manual_seed(0)
    ref = Darknet(cfg, 64)
    imgs = torch.randint(0, 255, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    run_epoch(ref, [(imgs, torch.zeros(0, 6), ['x'] * 8, None)], accumulate=1, batch_size=8)
    for a, b in zip(w2, ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_amp_bf16_training_step_on_cpu():
    # a real step of yolov3-tiny under CPU autocast bf16: convolutions run in bf16, the loss is finite, weights move
    model = Darknet(CFG, 64)
    load_darknet_weights(model, TINY_WEIGHTS)
    dtypes = set()
    model.module_list[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    before = copy.deepcopy(model.state_dict())
    imgs = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.4, 0.6, 0.2, 0.2]])
    _, stats = run_epoch(model, [(imgs, targets, ['a', 'b'], None)], accumulate=1, batch_size=2, lr=0.01,
                         amp_dtype=torch.bfloat16)
    assert dtypes == {torch.bfloat16}
    assert all(math.isfinite(x) for x in stats.mloss) and stats.mloss[3] > 0
    assert not torch.equal(before['module_list.0.Conv2d.weight'], model.module_list[0].Conv2d.weight)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_bf16_warning_only_without_bf16_instructions():
    from utils.torch_utils import cpu_has_bf16
    assert cpu_has_bf16('processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n') is False
    assert cpu_has_bf16('flags\t\t: fpu avx512f avx512_bf16 amx_tile\n') is True
    assert cpu_has_bf16('') is None  # unknown: no warning
    logs: list[str] = []
    assert train.resolve_amp('bf16', torch.device('cpu'), logs.append)[1] == torch.bfloat16
    assert (any('slower than fp32' in s for s in logs)) == (cpu_has_bf16() is False)


@pytest.mark.parametrize('flags, chosen', [('fpu avx512f avx512_bf16 amx_tile', 'bf16'),
                                           ('fpu sse avx2 avx512f', 'off'), (None, 'off')])
def test_amp_auto_on_the_cpu_follows_its_bf16_flags(monkeypatch, flags, chosen):
    # auto = bf16 autocast where the CPU computes bf16 natively, fp32 where it would be emulated or is unknown
    from utils import torch_utils
    monkeypatch.setattr(torch_utils, 'read_cpuinfo', lambda: None if flags is None else f'flags\t\t: {flags}\n')
    logs: list[str] = []
    amp, dtype = train.resolve_amp('auto', torch.device('cpu'), logs.append)
    assert (amp, dtype) == (chosen, {'bf16': torch.bfloat16, 'off': None}[chosen])
    assert len(logs) == 1 and logs[0].startswith(f'--amp auto: {chosen} (')
    assert ('no native bf16' in logs[0]) == (flags is not None and chosen == 'off')
    assert ('unknown' in logs[0]) == (flags is None)
    logs.clear()
    assert train.resolve_amp('auto', torch.device('cuda', 0), logs.append) == ('fp16', torch.float16)
    assert 'CUDA' in logs[0]
    assert train.resolve_amp('off', torch.device('cpu'), logs.append) == ('off', None) and len(logs) == 1


def test_ema_update_and_ramp():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ema = ModelEMA(model, decay=0.9999, tau=2000)
    assert all(not p.requires_grad for p in ema.ema.parameters())
    assert ema.decay(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema.decay(100000) == pytest.approx(0.9999, rel=1e-6)
    before = copy.deepcopy(ema.ema.state_dict())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    d = ema.decay(1)
    expected = before['0.weight'] * d + model[0].weight * (1 - d)
    assert torch.allclose(ema.ema[0].weight, expected, atol=1e-6)
    assert torch.equal(ema.ema[0].bias, before['0.bias'])  # unchanged tensors stay bit-identical
    assert ema.ema[1].num_batches_tracked == before['1.num_batches_tracked']
    assert ema.updates == 1


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = train.rng_state(gen)
    torch.save(state, tmp_path / 's.pt')
    state = torch.load(tmp_path / 's.pt', weights_only=True)
    a = (__import__('random').random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    train.set_rng_state(state, gen)
    b = (__import__('random').random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    assert a == b


def test_freeze_layers_keeps_only_yolo_feeding_convs_trainable():
    model = Darknet(CFG, 160)
    frozen, trainable = train.freeze_modules(model, freeze_layers=True)
    heads = {i - 1 for i in model.yolo_layers}
    for name, p in model.named_parameters():
        assert p.requires_grad == (int(name.split('.')[1]) in heads), name
    assert trainable == sum(p.numel() for i in heads for p in model.module_list[i].parameters())
    assert frozen + trainable == sum(p.numel() for p in model.parameters())
    opt = train.build_optimizer(model, HYP)
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == trainable


def test_progress_best_epoch_and_patience():
    p = train.Progress()
    assert not p.stale(0, 1)  # nothing tested yet
    p = p.after_test(0, 0.0, np.zeros(2))  # the first test is the best so far, even at fitness 0
    assert (p.best_epoch, p.best_fitness) == (0, 0.0)
    p = p.after_test(1, 0.30, np.array([0.2, 0.4]))
    p = p.after_test(2, 0.30, np.array([0.1, 0.5]))  # equal is not better
    assert (p.best_epoch, p.best_fitness) == (1, 0.30) and p.maps.tolist() == [0.1, 0.5]
    assert p.stale(2, 1) and not p.stale(2, 2) and not p.stale(2, 0)  # patience 0: off
    assert p.stale(3, 2)


def test_progress_survives_a_checkpoint_and_old_checkpoints_still_resume(tmp_path):
    p = train.Progress(0.25, 3, np.array([0.5, 0.125]))
    torch.save({'epoch': 5, **p.state()}, tmp_path / 'c.pt')
    q = train.Progress.from_checkpoint(load(tmp_path / 'c.pt'))
    assert (q.best_fitness, q.best_epoch, q.maps.tolist()) == (0.25, 3, [0.5, 0.125])
    # a checkpoint from before best_epoch and maps: the best epoch is read from its results.txt rows
    rows = ''.join(train.progress_row(e, 9, '0G', [1, 1, 1, 3], 5, 128) + '%10.4g' * 8 % (0.5, 0.5, m50, m, 0.4, 1, 1,
                   1) + '\n' for e, (m50, m) in enumerate([(0.2, 0.1), (0.3, 0.2), (0.3, 0.1)]))
    q = train.Progress.from_checkpoint({'epoch': 2, 'best_fitness': 0.21, 'training_results': rows})
    assert (q.best_fitness, q.best_epoch, q.maps) == (0.21, 1, None)
    assert train.Progress.from_checkpoint({'epoch': 4, 'best_fitness': 0.2}).best_epoch == 4  # no rows either


def test_new_options_refuse_what_cannot_work(coco8):
    from utils import distributed as du
    for extra, message in ((['--image-weights', '--rect'], '--image-weights draws images at random'),
                           (['--patience', '3', '--notest'], 'leave out --notest'),
                           (['--save-period', '-1'], '--save-period -1: must be 0')):
        with pytest.raises(ValueError, match=message):
            train.check_options(train.parse_opt(base_args(coco8, *extra)), du.DistInfo(), torch.device('cpu'))


def test_load_hyp_errors_name_the_file(tmp_path):
    bad = tmp_path / 'hyp.yaml'
    bad.write_text('giou: 3.54\n')
    with pytest.raises(ValueError, match=f'{bad}.*missing'):
        train.load_hyp(bad)
    with pytest.raises(FileNotFoundError, match='nope.yaml'):
        train.load_hyp(tmp_path / 'nope.yaml')


# ------------------------------------------------------------------------------------------------------------------
# command line runs

@pytest.fixture(scope='module')
def short_run(coco8, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """python train.py ... --epochs 2 on 8 images at 160 from the official yolov3-tiny weights."""
    cwd = tmp_path_factory.mktemp('run')
    r = cli(base_args(coco8), cwd)
    return cwd, r


def test_cli_short_run_outputs(short_run):
    cwd, r = short_run
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (cwd / 'results.txt').read_text().splitlines()
    assert [row.split()[0] for row in rows] == ['0/1', '1/1']
    assert all(len(row.split()) == len(train.RESULTS_COLUMNS) for row in rows)
    map50 = [float(row.split()[10]) for row in rows]
    assert all(0.2 < m <= 1 for m in map50)  # fine-tuning from the official weights keeps detecting
    assert 'effective batch 64 (8 x 8 accumulated' in r.stdout
    for f in ('train_batch0.jpg', 'results.png', 'hyp.yaml', 'opt.yaml'):
        assert (cwd / f).stat().st_size > 0, f
    import cv2

    for f in ('precision_recall_curve.png', 'P_curve.png', 'R_curve.png', 'F1_curve.png'):  # the final epoch's test
        assert cv2.imread(str(cwd / f)).shape == (900, 1500, 3), f
    from utils.plots import matrix_geometry

    g = matrix_geometry((ROOT / 'data' / 'coco.names').read_text().splitlines() + ['background'])
    cm = cv2.imread(str(cwd / 'confusion_matrix.png'))
    cells = cm[g.top:g.top + 81 * g.cell, g.left:g.left + 81 * g.cell]
    assert cm.shape == (g.height, g.width, 3) and (cells != 255).any()  # the matrix, some cells coloured
    assert list((cwd / 'runs').rglob('events.out.tfevents*'))


def test_checkpoint_contents(short_run, coco8):
    cwd, r = short_run
    assert r.returncode == 0
    last, best = load(cwd / 'weights' / 'last.pt'), load(cwd / 'weights' / 'best.pt')
    for ck in (last, best):
        assert ck['optimizer'] is None  # stripped at the end of the run
        assert ck['hyp'] == HYP and ck['opt']['data'] == str(coco8) and ck['seed'] == 0
        assert '[yolo]' in ck['cfg'] and ck['ema_updates'] >= 1
        assert {'python', 'numpy', 'torch'} <= set(ck['rng'])
    assert last['epoch'] == 1 and last['training_results'] == (cwd / 'results.txt').read_text()
    rows = last['training_results'].splitlines()
    fit = [0.1 * float(x.split()[10]) + 0.9 * float(x.split()[11]) for x in rows]
    # results.txt rounds to 4 digits: best.pt's epoch is one whose rounded fitness is the best (ties are possible)
    assert best['best_fitness'] == pytest.approx(max(fit), abs=1e-3)
    assert fit[best['epoch']] == pytest.approx(max(fit), abs=1e-3)
    # the saved model is the EMA, loadable into a fresh model built from the saved cfg
    model = Darknet(last['cfg'], 160)
    model.load_state_dict(last['model'])


def test_kill_9_then_resume(coco8, tmp_path):
    # start 3 epochs, kill -9 during the second, resume: results.txt holds epochs 0, 1, 2 once each
    args = base_args(coco8, epochs=3, size=128)
    proc = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / 'weights' / 'last.pt'
    deadline = time.time() + 240
    try:
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert last.exists(), 'no checkpoint written'
        time.sleep(0.3)  # into the second epoch
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ck = load(last)
    assert ck['epoch'] < 2 and ck['optimizer'] is not None and ck['model_train'] is not None
    assert ck['scaler'] is not None and ck['last_opt_step'] >= 0
    r = cli(['--resume'], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Resuming' in r.stdout
    epochs = [row.split()[0] for row in (tmp_path / 'results.txt').read_text().splitlines()]
    assert epochs == ['0/2', '1/2', '2/2']
    r = cli(['--resume'], tmp_path)  # a finished run says so
    assert r.returncode == 0 and 'already finished' in r.stdout


def test_resume_matches_uninterrupted_run(coco8, tmp_path, monkeypatch):
    args = base_args(coco8, '--notest', '--multi-scale', epochs=2, size=128)  # sizes 64-160 from a saved RNG
    full = tmp_path / 'full'
    assert train.main(train.parse_opt(args + ['--save-dir', str(full)])) == 0

    # the same run, stopped right after epoch 0 was saved
    part = tmp_path / 'part'
    real_save = train.save_checkpoint

    def save_then_crash(ckpt, path):
        real_save(ckpt, path)
        if ckpt['epoch'] == 0 and Path(path).name == 'best.pt':
            raise KeyboardInterrupt

    monkeypatch.setattr(train, 'save_checkpoint', save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(train.parse_opt(args + ['--save-dir', str(part)]))
    monkeypatch.setattr(train, 'save_checkpoint', real_save)
    # after epoch 0 (one batch, ni = 0): momentum and weight decay as burn-in set them at ni = 0, LR already
    # stepped by the cosine schedule to epoch 1
    groups = load(part / 'weights' / 'last.pt')['optimizer']['param_groups']
    assert [g['momentum'] for g in groups] == pytest.approx([0.9] * 3)
    assert [g['weight_decay'] for g in groups] == [0.0, 0.0, 0.0]
    assert [g['lr'] for g in groups] == pytest.approx([HYP['lr0'] * train.CosineLR(2, HYP['lrf'])(1)] * 3)
    assert train.main(train.parse_opt(['--resume', str(part / 'weights' / 'last.pt')])) == 0

    a, b = load(full / 'weights' / 'last.pt'), load(part / 'weights' / 'last.pt')
    assert a['ema_updates'] == b['ema_updates']
    for k, v in a['model'].items():
        assert torch.allclose(v.float(), b['model'][k].float(), rtol=1e-4, atol=1e-5), k
    def rows(d: Path) -> list[list[str]]:  # results.txt without the memory column
        return [r.split()[:1] + r.split()[2:] for r in (d / 'results.txt').read_text().splitlines()]

    assert rows(full) == rows(part)
    assert all(int(r[6]) in range(64, 161, 32) for r in rows(full))  # img_size column (memory column dropped)


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_accumulation_steps_after_burn_in(coco8, tmp_path, monkeypatch):
    # without burn-in, batch 8 accumulates 64 / 8 = 8 batches per optimizer step (and EMA update): 8 epochs of
    # one batch -> exactly one step
    monkeypatch.setattr(train, 'n_burn_in', lambda nb: -1)
    assert train.main(train.parse_opt(base_args(coco8, '--notest', '--save-dir', str(tmp_path), epochs=8,
                                                size=64))) == 0
    assert load(tmp_path / 'weights' / 'last.pt')['ema_updates'] == 1


def test_freeze_layers_run_changes_only_head_convs(coco8, tmp_path):
    # batch 4: two steps, the second with a non-zero weight LR (burn-in starts weight LRs at 0)
    r = cli(base_args(coco8, '--freeze-layers', '--notest', epochs=1, size=128, batch=4), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Frozen' in r.stdout
    ref = Darknet(CFG, 128)
    load_darknet_weights(ref, TINY_WEIGHTS)
    heads = {f'module_list.{i - 1}.' for i in ref.yolo_layers}
    after = load(tmp_path / 'weights' / 'last.pt')['model']
    for k, v in ref.state_dict().items():
        if 'running_' in k or 'num_batches' in k:
            continue  # BN statistics follow the data even when frozen
        changed = not torch.equal(v, after[k])
        assert changed == any(k.startswith(h) for h in heads), k


def test_evolve_two_generations(coco8, tmp_path):
    r = cli(base_args(coco8, '--evolve', '2', epochs=1, size=128), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / 'evolve.txt').read_text().splitlines()
    assert text[0].startswith('#') and 'mAP@0.5' in text[0] and 'lr0' in text[0]
    x = np.loadtxt(tmp_path / 'evolve.txt', ndmin=2)
    assert x.shape == (2, 8 + len(HYP))
    best = train.load_hyp(tmp_path / 'hyp_evolved.yaml')  # usable with --hyp
    assert set(best) == set(HYP)
    assert (tmp_path / 'evolve.png').exists()
    assert not (tmp_path / 'weights').exists()  # evolution saves nothing but its results


def test_non_finite_loss_stops_and_keeps_last_checkpoint(coco8, tmp_path, monkeypatch, capsys):
    from utils.loss import ComputeLoss
    calls = {'n': 0}

    class NanInSecondEpoch(ComputeLoss):
        def __call__(self, p, targets):
            calls['n'] += 1
            loss, items = super().__call__(p, targets)
            return (loss * float('nan'), items) if calls['n'] > 1 else (loss, items)

    monkeypatch.setattr(train, 'ComputeLoss', NanInSecondEpoch)
    rc = train.main(train.parse_opt(base_args(coco8, '--notest', '--save-dir', str(tmp_path), epochs=2, size=128)))
    assert rc == 1
    err = capsys.readouterr().err
    assert 'non-finite loss at epoch 1' in err and 'GIoU' in err and 'cls' in err
    assert load(tmp_path / 'weights' / 'last.pt')['epoch'] == 0


def test_bad_image_size_is_a_clear_error(coco8, tmp_path):
    r = cli(base_args(coco8, size=150, epochs=1), tmp_path)
    assert r.returncode == 2 and 'multiple of 32' in r.stderr and 'Traceback' not in r.stderr


def test_bad_weights_are_one_line_and_write_nothing(coco8, tmp_path):
    empty = tmp_path / 'empty.weights'
    empty.touch()
    args = base_args(coco8, epochs=1)
    args[args.index('--weights') + 1] = str(empty)
    r = train.main(train.parse_opt(args + ['--save-dir', str(tmp_path / 'run')]))
    assert r == 2 and not (tmp_path / 'run').exists()  # not even hyp.yaml / opt.yaml


def torchrun(args: list[str], cwd: Path, env: dict[str, str], *launcher: str) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py (train.py) args."""
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           *launcher, str(ROOT / 'tests' / 'ddp_worker.py'), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=400, env={**os.environ, **env})


def seen_images(d: Path, epoch: int) -> list[list[str]]:
    """Per rank, the images ddp_worker.py recorded for an epoch."""
    return [[ln.split()[0] for ln in (d / f'rank{r}_epoch{epoch}.txt').read_text().splitlines()] for r in (0, 1)]


def test_ddp_elastic_restart_continues_from_last_checkpoint(coco8, tmp_path):
    # 2 gloo workers under torchrun --max-restarts 1 (--rect: whole planned batches per rank); rank 1 is SIGKILLed as
    # epoch 1 starts; the agent restarts the group, which continues from weights/last.pt by itself: epochs 0, 1, 2
    # once each, the schedule continued
    seen = tmp_path / 'seen'
    seen.mkdir()
    r = torchrun(base_args(coco8, '--notest', '--rect', epochs=3, size=64), tmp_path,
                 {'YOLO_TEST_KILL_EPOCH': '1', 'YOLO_TEST_SEEN_DIR': str(seen)}, '--max-restarts', '1')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Elastic restart 1: resuming' in r.stdout
    assert [row.split()[0] for row in (tmp_path / 'results.txt').read_text().splitlines()] == ['0/2', '1/2', '2/2']
    ck = load(tmp_path / 'weights' / 'last.pt')
    assert ck['epoch'] == 2 and len(ck['elastic_agents']) == 1  # this launch's one agent (both workers' parent)
    assert ck['ema_updates'] == 3  # one optimizer step per epoch (burn-in accumulates 1): none lost or repeated
    # epoch 0: each rank half of the images, none seen by both
    a, b = seen_images(seen, 0)
    assert len(a) == len(b) == 4 and not set(a) & set(b) and len(set(a) | set(b)) == 8


def test_device_list_launch_trains_one_process_per_device_rect(coco8, tmp_path):
    # what --device 0,1 does on a CUDA machine (one process per device through torch's elastic launcher, the engine
    # of torchrun), here on the CPU with gloo; with --rect, so each rank must load whole planned batches of one shape
    # (a batch mixing shapes cannot be collated)
    opt = train.parse_opt(base_args(coco8, '--rect', '--notest', '--save-dir', str(tmp_path), epochs=1, size=128,
                                    batch=4))
    assert train.launch(opt, 2) == 0
    assert len((tmp_path / 'results.txt').read_text().splitlines()) == 1
    ck = load(tmp_path / 'weights' / 'last.pt')
    assert ck['epoch'] == 0 and ck['opt']['rect'] and len(ck['elastic_agents']) == 1


def _append_rows(path: str, start: int) -> None:
    """Worker for the concurrency test: ten generations' rows into one evolve.txt."""
    from utils.evolve import append_result
    for i in range(start, start + 10):
        append_result(Path(path), {**HYP, 'lr0': 1e-4 * (i + 1)}, (0.1, 0.2, 0.3, 0.001 * i, 0.5, 1.0, 2.0, 3.0))


def test_evolve_file_survives_concurrent_writers(tmp_path):
    import multiprocessing as mp
    from utils.evolve import read_evolve
    path = tmp_path / 'evolve.txt'
    ctx = mp.get_context('fork' if 'fork' in mp.get_all_start_methods() else 'spawn')
    procs = [ctx.Process(target=_append_rows, args=(str(path), 10 * k)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    x = read_evolve(path, list(HYP))
    assert x.shape == (30, 8 + len(HYP))
    assert np.allclose(sorted(x[:, 8 + list(HYP).index('lr0')]), [1e-4 * (i + 1) for i in range(30)])
    assert x[0, 3] == x[:, 3].max()  # sorted by fitness, best first


def test_mutation_keeps_limits_and_fixed_keys():
    from utils.evolve import LIMITS, mutate
    rng = np.random.default_rng(0)
    assert mutate(HYP, np.zeros((0, 8 + len(HYP))), rng) == HYP  # no history: the given hyp is the first parent
    rows = np.array([[0, 0, 0.5, 0.3, 0, 0, 0, 0] + list(HYP.values()),
                     [0, 0, 0.1, 0.05, 0, 0, 0, 0] + list(HYP.values())])
    for _ in range(50):
        child = mutate(HYP, rows, rng)
        assert child['lrf'] == HYP['lrf'] and child['fl_gamma'] == HYP['fl_gamma']  # gain 0: never mutated
        assert child['degrees'] == 0.0  # 0 stays 0 (the original's disabled geometric augmentation)
        assert all(lo <= child[k] <= hi for k, (lo, hi) in LIMITS.items())
        assert child != HYP


def test_distributed_env_and_helpers_in_a_process_group(monkeypatch, tmp_path):
    import torch.distributed as dist
    from utils import distributed as du
    for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE'):
        monkeypatch.delenv(k, raising=False)
    assert du.env_info() == du.DistInfo() and du.env_info().main and not du.env_info().distributed
    assert du.local_world_size() == 1 and du.all_gather_object({'a': 1}) == [{'a': 1}]
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    info = du.env_info()
    assert (info.rank, info.local_rank, info.world_size, info.distributed, info.main) == (3, 1, 4, True, False)
    assert du.local_world_size() == 2
    # a real (one-process gloo) group: the helpers go through torch.distributed
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert du.is_initialized() and du.is_main_process() and du.get_world_size() == 1
        assert du.all_gather_object([1, 2]) == [[1, 2]]
        du.barrier()
        du.save_on_master(lambda p: p.write_text('saved'), tmp_path / 'f.txt')
        assert (tmp_path / 'f.txt').read_text() == 'saved'
    finally:
        du.cleanup()
    assert not du.is_initialized()


def test_device_rules():
    from utils.torch_utils import resolve_device
    assert resolve_device('cpu', -1, 1, 8) == ('cpu', 0)
    assert resolve_device('', -1, 1, 0) == ('cpu', 0)
    assert resolve_device('', -1, 1, 2) == ('cuda:0', 0)
    assert resolve_device('1', -1, 1, 2) == ('cuda:1', 1)
    assert resolve_device('0,1', -1, 1, 2) == ('cuda:0', 2)  # no torchrun: one process per listed device
    assert resolve_device('cuda:2,3', -1, 1, 4) == ('cuda:2', 2)
    # torchrun: LOCAL_RANK takes the LOCAL_RANK-th listed device, or CUDA device LOCAL_RANK
    assert resolve_device('2,3', 1, 2, 4) == ('cuda:3', 0)
    assert resolve_device('', 1, 2, 2) == ('cuda:1', 0)
    assert resolve_device('cpu', 1, 2, 0) == ('cpu', 0)
    with pytest.raises(ValueError, match='lists 1 device.*2 processes'):
        resolve_device('0', 0, 2, 2)
    with pytest.raises(ValueError, match='2 CUDA device'):
        resolve_device('', 2, 3, 2)
    with pytest.raises(ValueError, match='CUDA is not available'):
        resolve_device('0,1', -1, 1, 0)
    with pytest.raises(ValueError, match=r'has 2 CUDA device.*\[3\]'):
        resolve_device('0,3', -1, 1, 2)
    for bad in ('gpu', '0,0', '-1'):
        with pytest.raises(ValueError, match='--device'):
            resolve_device(bad, -1, 1, 2)


def test_device_list_without_cuda_is_one_clear_error(coco8, tmp_path, capsys):
    assert train.main(train.parse_opt(base_args(coco8, '--save-dir', str(tmp_path))[:-4] + ['--device', '0,1'])) == 2
    assert 'CUDA is not available' in capsys.readouterr().err and not (tmp_path / 'weights').exists()


def test_cuda_rng_states_of_more_or_fewer_devices(capsys):
    # a checkpoint from 2 GPUs resumed where there are fewer (here: none, or a fabricated 1)
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    put: list = []
    logs: list[str] = []
    assert train.restore_cuda_rng(saved, 1, lambda s, i: put.append((i, int(s[0]))), logs.append) == 1
    assert put == [(0, 0)] and 'restored 1, dropped 1' in logs[0]
    assert train.restore_cuda_rng(saved[:1], 3, lambda s, i: None, logs.append) == 1 and 'devices 1-2' in logs[1]
    state = train.rng_state()
    state['cuda'] = saved
    train.set_rng_state(state)  # on this CPU machine: nothing restored, no IndexError
    out = capsys.readouterr().out
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert (f'sees {seen}' in out) == (seen != 2)


def test_sync_bn_conversion_and_refusal_on_cpu_ddp():
    from utils import distributed as du
    model = Darknet(CFG, 64)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    sd = copy.deepcopy(model.state_dict())
    logs: list[str] = []
    converted = train.convert_sync_bn(model, logs.append)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == n_bn > 0
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in sd.items())
    assert logs == [f'Using SyncBatchNorm ({n_bn} layers)']
    opt = train.parse_opt(['--sync-bn', '--batch-size', '8'])
    ddp2 = du.DistInfo(rank=0, local_rank=0, world_size=2)
    with pytest.raises(ValueError, match='--sync-bn needs CUDA'):
        train.check_options(opt, ddp2, torch.device('cpu'))
    train.check_options(opt, ddp2, torch.device('cuda', 0))  # allowed on CUDA
    train.check_options(opt, du.DistInfo(), torch.device('cpu'), logs.append)
    assert logs[-1] == '--sync-bn has no effect in a single process'
    with pytest.raises(ValueError, match='multiple of the number of processes 2'):
        train.check_options(train.parse_opt(['--batch-size', '7']), ddp2, torch.device('cpu'))


def test_rank0_validates_with_the_per_process_batch(coco8):
    from utils import distributed as du
    from utils.data_config import load_data_config
    opt = train.parse_opt(base_args(coco8, batch=8))
    loader, _, testloader = train.build_loaders(load_data_config(str(coco8)), HYP, opt,
                                                du.DistInfo(rank=0, local_rank=0, world_size=2), 128, 128)
    assert loader.batch_size == 4 and testloader.batch_size == 4  # not the global 8


def test_single_cls_trains_a_one_class_cfg(coco8, tmp_path):
    # the 80-class labels stay valid (checked against the data's 80 classes), then all become class 0
    args = ['--cfg', str(ROOT / 'cfg' / 'yolov3-tiny-1cls.cfg'), '--data', str(coco8), '--weights', '',
            '--img-size', '128', '--epochs', '1', '--batch-size', '8', '--device', 'cpu', '--workers', '0',
            '--single-cls', '--save-dir', str(tmp_path)]
    assert train.main(train.parse_opt(args)) == 0
    row = (tmp_path / 'results.txt').read_text().split()
    assert float(row[4]) == 0.0 and float(row[2]) > 0  # no class loss for one class, box loss trained
    assert train.main(train.parse_opt(args[:-3] + ['--save-dir', str(tmp_path / 'b')])) == 2  # 80 vs 1 classes


def test_rect_training_run(coco8, tmp_path, monkeypatch):
    # --rect: batches shaped by their images' aspect ratios (sorted), not all squares (and mosaic off)
    shapes: list[tuple[int, int]] = []
    real = train.train_one_epoch

    def recording(**kw):
        loader = kw['loader']
        shapes.extend(tuple(imgs.shape[2:]) for imgs, *_ in loader)
        return real(**kw)

    monkeypatch.setattr(train, 'train_one_epoch', recording)
    assert train.main(train.parse_opt(base_args(coco8, '--rect', '--notest', '--save-dir', str(tmp_path),
                                                epochs=1, size=128, batch=4))) == 0
    assert len(shapes) == 2 and all(max(s) == 128 for s in shapes) and min(min(s) for s in shapes) < 128
    row = (tmp_path / 'results.txt').read_text().split()
    assert row[0] == '0/0' and float(row[5]) > 0


@pytest.fixture(scope='module')
def person8(tmp_path_factory) -> Path:
    """coco8 as a one-class `person` dataset (person boxes only, class 0)."""
    d = tmp_path_factory.mktemp('person8')
    make_subset(d, 8)
    for lb in (d / 'labels').glob('*.txt'):
        lb.write_text(''.join(ln + '\n' for ln in lb.read_text().splitlines() if ln.split()[0] == '0'))
    (d / 'person.names').write_text('person\n')
    data = d / 'person.data'
    data.write_text(f"classes=1\ntrain={d / 'images'}\nvalid={d / 'images'}\nnames={d / 'person.names'}\n")
    return data


def test_fine_tune_one_class_from_official_weights(person8, tmp_path, capsys):
    # issue 10's command at a small size: the 80-class .weights into yolov3-tiny-1cls.cfg, the person rows mapped
    # from COCO's person (or fresh with --no-class-map); the anchor check runs; the checkpoint carries the names
    map50 = {}
    for mapped in (True, False):
        args = ['--cfg', str(ROOT / 'cfg' / 'yolov3-tiny-1cls.cfg'), '--data', str(person8), '--weights',
                str(TINY_WEIGHTS), '--img-size', '128', '--epochs', '1', '--batch-size', '8', '--device', 'cpu',
                '--workers', '0', '--notest', '--save-dir', str(tmp_path / str(mapped)),
                *([] if mapped else ['--no-class-map'])]
        assert train.main(train.parse_opt(args)) == 0
        out = capsys.readouterr().out
        assert ('person <- person (0)' in out) == mapped, out[-3000:]
        assert 'anchors: BPR' in out
        ck = load(tmp_path / str(mapped) / 'weights' / 'last.pt')
        assert ck['names'] == ['person'] and ck['opt']['no_class_map'] == (not mapped)
        map50[mapped] = float((tmp_path / str(mapped) / 'results.txt').read_text().split()[10])
    assert map50[True] > 2 * map50[False]  # after one epoch the mapped head still finds people (0.063 vs 0.012)


def test_patience_save_period_image_weights_run(coco8, tmp_path, monkeypatch, capsys):
    # 4 epochs planned; fitness (faked) falls after epoch 0, so --patience 1 stops after epoch 1. --image-weights
    # draws from class weights alone at epoch 0, then from epoch 0's per-class mAP; --save-period 1 keeps both epochs
    fits = iter([0.5, 0.4, 0.3, 0.2])
    monkeypatch.setattr(train, 'fitness', lambda x: np.array([next(fits)]))
    drawn: list[np.ndarray | None] = []
    real_weights = train.epoch_image_weights
    monkeypatch.setattr(train, 'epoch_image_weights', lambda labels, nc, maps: drawn.append(maps) or
                        real_weights(labels, nc, maps))
    args = base_args(coco8, '--patience', '1', '--save-period', '1', '--image-weights', '--amp', 'auto', '--name',
                     'x', '--save-dir', str(tmp_path), epochs=4, size=64)
    assert train.main(train.parse_opt(args)) == 0
    out = capsys.readouterr().out
    assert 'Stopping early after epoch 1: fitness has not improved for 1 epochs (--patience 1); the best was epoch ' \
           '0 (fitness 0.5000)' in out
    assert [r.split()[0] for r in (tmp_path / 'results_x.txt').read_text().splitlines()] == ['0/3', '1/3']
    assert drawn[0] is None and len(drawn) == 2 and drawn[1].shape == (80,)
    w = tmp_path / 'weights'
    assert sorted(f.name for f in w.iterdir()) == ['best_x.pt', 'epoch_0_x.pt', 'epoch_1_x.pt', 'last_x.pt']
    last, best, e0 = load(w / 'last_x.pt'), load(w / 'best_x.pt'), load(w / 'epoch_0_x.pt')
    assert last['optimizer'] is None and e0['optimizer'] is not None  # final files stripped, epoch_K.pt full
    assert (last['epoch'], last['best_epoch'], best['epoch'], e0['epoch']) == (1, 0, 0, 0)
    assert torch.equal(e0['maps'], best['maps']) and last['maps'].dtype == torch.float64
    for ck in (last, e0):  # saved in fp32 whatever --amp auto chose
        assert {v.dtype for v in ck['model'].values() if v.is_floating_point()} == {torch.float32}
    assert (tmp_path / 'results.png').exists()
    assert (tmp_path / 'confusion_matrix.png').exists()  # the early-stopped epoch drew the final plots
    from models import load_model
    assert load_model(str(w / 'epoch_1_x.pt')).names == last['names']
