"""The pure parts of train.py and utils/train/engine.py (fast tier: no ../shared, no subprocesses): warm-up, optimizer
groups, multi-scale sizes, accumulation, AMP choice, EMA, freeze, progress, hyp files, evolve, device rules."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from models import Darknet
from tests.conftest import ROOT
from utils.torch_utils import ModelEMA
from utils.train import engine, resume

CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'
TOY_CFG = ROOT / 'tests' / 'fixtures' / 'toy.cfg'
HYP = train.load_hyp(ROOT / 'data' / 'hyp.scratch.yaml')


def load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def test_warmup_interpolates_lr_momentum_gr_accumulate():
    targets = {'other': 0.01, 'conv_weight': 0.01, 'bias': 0.01}
    w0 = engine.warmup_values(0, 500, targets, HYP, batch_size=16)
    assert w0['lr'] == {'other': 0.0, 'conv_weight': 0.0, 'bias': 0.1} and w0['momentum'] == pytest.approx(0.9)
    assert w0['gr'] == 0.0 and w0['accumulate'] == 1 and set(w0['weight_decay'].values()) == {0.0}
    mid = engine.warmup_values(250, 500, targets, HYP, batch_size=16)
    assert mid['lr'] == pytest.approx({'other': 0.005, 'conv_weight': 0.005, 'bias': 0.055})
    assert mid['momentum'] == pytest.approx((0.9 + 0.937) / 2) and mid['gr'] == pytest.approx(0.5)
    assert mid['accumulate'] == round(1 + 3 * 0.5)  # 1 -> 64 / 16 = 4
    assert mid['weight_decay'] == pytest.approx({'other': 0.0, 'conv_weight': HYP['weight_decay'] / 2, 'bias': 0.0})
    end = engine.warmup_values(500, 500, targets, HYP, batch_size=16)
    assert end['lr'] == pytest.approx(targets) and end['momentum'] == pytest.approx(0.937)
    assert end['gr'] == 1.0 and end['accumulate'] == 4
    assert end['weight_decay'] == {'other': 0.0, 'conv_weight': HYP['weight_decay'], 'bias': 0.0}
    assert engine.n_burn_in(8) == 500 and engine.n_burn_in(1000) == 3000


def test_burn_in_finds_the_groups_by_name_also_in_an_older_saved_state():
    model = Darknet(TOY_CFG, 64)
    old = engine.build_optimizer(model, HYP).state_dict()
    for g in old['param_groups']:
        del g['name']  # an optimizer state saved before the groups had names
    opt = engine.build_optimizer(model, HYP)
    opt.load_state_dict(old)
    assert [g['name'] for g in opt.param_groups] == ['other', 'conv_weight', 'bias']
    cfg = engine.LoopConfig(hyp=HYP, lf=engine.CosineLR(10, HYP['lrf']), n_burn=100, batch_size=16, epochs=10)
    for g in opt.param_groups:
        g['initial_lr'] = HYP['lr0']
    opt.param_groups.reverse()  # the order means nothing: only the names do
    assert engine.burn_in(opt, 0, 0, cfg) == (1, 0.0)  # (accumulation, the loss's gr) at the first batch
    by_name = {g['name']: g for g in opt.param_groups}
    assert (by_name['bias']['lr'], by_name['conv_weight']['lr'], by_name['other']['lr']) == (0.1, 0.0, 0.0)
    engine.burn_in(opt, 100, 0, cfg)
    assert by_name['conv_weight']['weight_decay'] == HYP['weight_decay'] > 0 == by_name['bias']['weight_decay']
    with pytest.raises(ValueError, match='build_optimizer'):  # a plain optimizer has no names to look up
        engine.burn_in(torch.optim.SGD(model.parameters(), lr=0.01), 0, 0, cfg)


def test_optimizer_groups_decay_conv_weights_only():
    # each trainable parameter is optimised once; convolution weights decay, BatchNorm weights and every bias do not
    model = Darknet(TOY_CFG, 64)
    opt = engine.build_optimizer(model, HYP)
    ids = [id(p) for g in opt.param_groups for p in g['params']]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    decay = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and any(m.bias is not None for m in convs)  # the toy cfg has both kinds of convolution
    assert all(decay[id(m.weight)] == HYP['weight_decay'] > 0 for m in convs)
    no_decay = [m.bias for m in convs if m.bias is not None] + [p for m in bns for p in (m.weight, m.bias)]
    assert all(decay[id(p)] == 0 for p in no_decay)
    # a step on zero gradients: weight decay alone moves the weights, so conv weights shrink (same direction) and
    # nothing else changes
    for g in opt.param_groups:
        g['lr'] = 1.0
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for m in convs:
        w, w0 = m.weight.detach(), before[id(m.weight)]
        assert w.norm() < w0.norm() and torch.allclose(w / w.norm(), w0 / w0.norm(), atol=1e-6)
    assert all(torch.equal(p, before[id(p)]) for p in no_decay)
    # frozen parameters are left out of every group
    train.freeze_modules(model, freeze_layers=True)
    kept = {id(p) for g in engine.build_optimizer(model, HYP).param_groups for p in g['params']}
    assert kept == {id(p) for p in model.parameters() if p.requires_grad} and 0 < len(kept) < len(ids)
    assert isinstance(engine.build_optimizer(model, HYP, adam=True), torch.optim.Adam)


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
filters=24
size=1
stride=1
pad=1
activation=linear

[yolo]
mask=0,1,2
anchors=10,14, 23,27, 37,58
classes=3
num=3
"""


def run_epoch(model: nn.Module, batches: list, accumulate: int, batch_size: int, lr: float = 1.0,
              amp_dtype: torch.dtype | None = None, distributed: bool = False
              ) -> tuple[engine.LoopState, engine.EpochStats]:
    """One real train_one_epoch over in-memory batches with plain SGD, no burn-in, no EMA."""
    from utils.train.loss import ComputeLoss
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    cfg = engine.LoopConfig(hyp=HYP, lf=engine.CosineLR(1, HYP['lrf']), n_burn=-1, batch_size=batch_size, epochs=1,
                           amp_dtype=amp_dtype, distributed=distributed, show=False)
    return engine.train_one_epoch(model=model, loader=batches, optimizer=optimizer, scaler=scaler,
                                 compute_loss=ComputeLoss(model, HYP), ema=None, epoch=0,
                                 state=engine.LoopState(accumulate=accumulate, img_size=64), cfg=cfg)


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


def test_amp_bf16_training_step_on_cpu():
    # a real step of the toy model under CPU autocast bf16: convolutions run in bf16, the loss is finite, weights move
    model = Darknet(TOY_CFG, 64)
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


def test_bf16_warning_only_without_bf16_instructions(logged):
    from utils.torch_utils import cpu_has_bf16
    assert cpu_has_bf16('processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n') is False
    assert cpu_has_bf16('flags\t\t: fpu avx512f avx512_bf16 amx_tile\n') is True
    assert cpu_has_bf16('') is None  # unknown: no warning
    assert train.resolve_amp('bf16', torch.device('cpu'))[1] == torch.bfloat16
    assert (any('slower than fp32' in s for s in logged())) == (cpu_has_bf16() is False)


@pytest.mark.parametrize('flags, chosen', [('fpu avx512f avx512_bf16 amx_tile', 'bf16'),
                                           ('fpu sse avx2 avx512f', 'off'), (None, 'off')])
def test_amp_auto_on_the_cpu_follows_its_bf16_flags(logged, caplog, monkeypatch, flags, chosen):
    # auto = bf16 autocast where the CPU computes bf16 natively, fp32 where it would be emulated or is unknown
    from utils import torch_utils
    monkeypatch.setattr(torch_utils, 'read_cpuinfo', lambda: None if flags is None else f'flags\t\t: {flags}\n')
    amp, dtype = train.resolve_amp('auto', torch.device('cpu'))
    logs = logged()
    assert (amp, dtype) == (chosen, {'bf16': torch.bfloat16, 'off': None}[chosen])
    assert len(logs) == 1 and logs[0].startswith(f'--amp auto: {chosen} (')
    assert ('no native bf16' in logs[0]) == (flags is not None and chosen == 'off')
    assert ('unknown' in logs[0]) == (flags is None)
    caplog.clear()
    assert train.resolve_amp('auto', torch.device('cuda', 0)) == ('fp16', torch.float16)
    assert 'CUDA' in logged()[0]
    assert train.resolve_amp('off', torch.device('cpu')) == ('off', None) and len(logged()) == 1


def distance(a: nn.Module, b: nn.Module) -> float:
    """Largest difference between the floating-point states (weights and buffers) of two models."""
    sb = b.state_dict()
    return max((v - sb[k]).abs().max().item() for k, v in a.state_dict().items() if v.is_floating_point())


def test_ema_follows_early_averages_late_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ema = ModelEMA(model)  # the training defaults
    assert all(not p.requires_grad for p in ema.ema.parameters())
    start = copy.deepcopy(ema.ema)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # one big jump of the weights
    model(torch.randn(8, 3, 5, 5) + 3)  # a train-mode forward moves the BN running statistics
    assert distance(ema.ema, start) == 0  # the average is a copy: changing the model leaves it alone
    # early in training the ramp makes the average follow the model almost entirely, buffers included
    ema.update(model)
    assert distance(ema.ema, model) < 1e-3 * distance(start, model)
    assert torch.allclose(ema.ema[1].running_mean, model[1].running_mean, atol=1e-3)
    assert torch.equal(ema.ema[0].bias, start[0].bias)  # a tensor the model did not change stays bit-identical
    assert ema.ema[1].num_batches_tracked == start[1].num_batches_tracked  # integer buffers are not averaged
    # late in training (many updates) one update moves the average only a little of the way
    late = ModelEMA(start, updates=100_000)
    late.update(model)
    moved = (late.ema[0].weight - start[0].weight).abs().max().item()
    assert 0 < moved < 1e-3


def test_ema_of_a_model_trained_to_a_constant_converges_to_it():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    ema = ModelEMA(model, decay=0.9, tau=5)
    target = torch.full_like(model.weight, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    gaps = []
    for _ in range(100):
        opt.zero_grad()
        ((model.weight - target) ** 2).sum().backward()  # gradient descent pulls the weights to the constant
        opt.step()
        ema.update(model)
        gaps.append((ema.ema.weight - target).abs().max().item())
    assert all(b <= a + 1e-7 for a, b in zip(gaps, gaps[1:]))  # the average only gets closer
    assert gaps[-1] < 1e-3 and gaps[-1] < 1e-2 * gaps[0]
    assert ema.updates == 100


def test_freeze_layers_keeps_only_yolo_feeding_convs_trainable():
    model = Darknet(CFG, 160)
    frozen, trainable = train.freeze_modules(model, freeze_layers=True)
    heads = {i - 1 for i in model.yolo_layers}
    for name, p in model.named_parameters():
        assert p.requires_grad == (int(name.split('.')[1]) in heads), name
    assert trainable == sum(p.numel() for i in heads for p in model.module_list[i].parameters())
    assert frozen + trainable == sum(p.numel() for p in model.parameters())
    opt = engine.build_optimizer(model, HYP)
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == trainable


def test_progress_best_epoch_and_patience():
    p = resume.Progress()
    assert not p.stale(0, 1)  # nothing tested yet
    p = p.after_test(0, 0.0, np.zeros(2))  # the first test is the best so far, even at fitness 0
    assert (p.best_epoch, p.best_fitness) == (0, 0.0)
    p = p.after_test(1, 0.30, np.array([0.2, 0.4]))
    p = p.after_test(2, 0.30, np.array([0.1, 0.5]))  # equal is not better
    assert (p.best_epoch, p.best_fitness) == (1, 0.30) and p.maps.tolist() == [0.1, 0.5]
    assert p.stale(2, 1) and not p.stale(2, 2) and not p.stale(2, 0)  # patience 0: off
    assert p.stale(3, 2)


def test_epoch_checkpoint_targets(tmp_path):
    # which files an epoch's checkpoint is written to: last.pt (with --nosave only when the run ends or stops there),
    # best.pt when this epoch is the best so far (or there is no best.pt yet), epoch_K.pt every --save-period epochs
    opt = train.parse_opt(['--save-dir', str(tmp_path), '--save-period', '2', '--epochs', '6'])
    w = tmp_path / 'weights'
    best_at_1 = resume.Progress(0.3, 1)
    assert train.checkpoint_targets(opt, 1, best_at_1) == [w / 'last.pt', w / 'best.pt']
    w.mkdir()
    (w / 'best.pt').write_bytes(b'')
    assert train.checkpoint_targets(opt, 2, best_at_1) == [w / 'last.pt', w / 'epoch_2.pt']
    assert train.checkpoint_targets(opt, 3, best_at_1) == [w / 'last.pt']
    opt.nosave = True
    assert train.checkpoint_targets(opt, 3, best_at_1) == []  # --nosave before the end
    assert train.checkpoint_targets(opt, 3, best_at_1, stopping=True) == [w / 'last.pt']  # a stop: to resume from
    assert train.checkpoint_targets(opt, 4, best_at_1) == [w / 'epoch_4.pt']
    assert train.checkpoint_targets(opt, 5, best_at_1) == [w / 'last.pt']  # the last epoch
    opt.patience = 3
    assert train.checkpoint_targets(opt, 4, best_at_1) == [w / 'last.pt', w / 'epoch_4.pt']  # --patience ends here
    opt.evolve = 2
    assert train.checkpoint_targets(opt, 5, best_at_1, stopping=True) == []  # --evolve saves nothing


def test_progress_survives_a_checkpoint_and_old_checkpoints_still_resume(tmp_path):
    p = resume.Progress(0.25, 3, np.array([0.5, 0.125]))
    saved = {'epoch': 5, 'best_fitness': p.best_fitness, 'best_epoch': p.best_epoch, 'maps': torch.from_numpy(p.maps)}
    torch.save(saved, tmp_path / 'c.pt')
    q = resume.Progress.from_checkpoint(load(tmp_path / 'c.pt'))
    assert (q.best_fitness, q.best_epoch, q.maps.tolist()) == (0.25, 3, [0.5, 0.125])
    # a checkpoint from before best_epoch and maps: the best epoch is read from its results.txt rows
    rows = ''.join(engine.progress_row(e, 9, '0G', [1, 1, 1, 3], 5, 128) + '%10.4g' * 8 % (0.5, 0.5, m50, m, 0.4, 1, 1,
                   1) + '\n' for e, (m50, m) in enumerate([(0.2, 0.1), (0.3, 0.2), (0.3, 0.1)]))
    q = resume.Progress.from_checkpoint({'epoch': 2, 'best_fitness': 0.21, 'training_results': rows})
    assert (q.best_fitness, q.best_epoch, q.maps) == (0.21, 1, None)
    assert resume.Progress.from_checkpoint({'epoch': 4, 'best_fitness': 0.2}).best_epoch == 4  # no rows either


def test_load_hyp_errors_name_the_file(tmp_path):
    bad = tmp_path / 'hyp.yaml'
    bad.write_text('giou: 3.54\n')
    with pytest.raises(ValueError, match=f'{bad}.*missing'):
        train.load_hyp(bad)
    with pytest.raises(FileNotFoundError, match='nope.yaml'):
        train.load_hyp(tmp_path / 'nope.yaml')


def _append_rows(path: str, start: int) -> None:
    """Worker for the concurrency test: ten generations' rows into one evolve.txt."""
    from utils.train.evolve import append_result
    for i in range(start, start + 10):
        append_result(Path(path), {**HYP, 'lr0': 1e-4 * (i + 1)}, (0.1, 0.2, 0.3, 0.001 * i, 0.5, 1.0, 2.0, 3.0))


@pytest.mark.slow
def test_evolve_file_survives_concurrent_writers(tmp_path):
    import multiprocessing as mp

    from utils.train.evolve import read_evolve
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
    from utils.train.evolve import LIMITS, mutate
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


def test_distributed_env_and_helpers_in_a_process_group(monkeypatch):
    import torch.distributed as dist

    from utils.train import distributed as du
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
        assert du.is_initialized()
        assert du.all_gather_object([1, 2]) == [[1, 2]] and du.broadcast_object('rank 0') == 'rank 0'
        du.barrier()
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


def test_sync_bn_conversion_and_refusal_on_cpu_ddp(logged):
    from utils.train import distributed as du
    model = Darknet(CFG, 64)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    sd = copy.deepcopy(model.state_dict())
    converted = train.convert_sync_bn(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == n_bn > 0
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in sd.items())
    assert logged()[-1:] == [f'Using SyncBatchNorm ({n_bn} layers)']  # after the model build's cfg line
    opt = train.parse_opt(['--sync-bn', '--batch-size', '8'])
    ddp2 = du.DistInfo(rank=0, local_rank=0, world_size=2)
    with pytest.raises(ValueError, match='--sync-bn needs CUDA'):
        train.check_options(opt, ddp2, torch.device('cpu'))
    train.check_options(opt, ddp2, torch.device('cuda', 0))  # allowed on CUDA
    train.check_options(opt, du.DistInfo(), torch.device('cpu'))
    assert logged()[-1] == '--sync-bn has no effect in a single process'
    with pytest.raises(ValueError, match='multiple of the number of processes 2'):
        train.check_options(train.parse_opt(['--batch-size', '7']), ddp2, torch.device('cpu'))


def test_multi_scale_flag_acts_on_one_size_and_says_when_it_changes_nothing(logged):
    # as the original: two different train sizes (the default 320 640) already mean multi-scale, so the flag changes
    # nothing there (said in one line); with one size it widens it to 0.67x-1.5x
    from utils.train import distributed as du
    opt = train.parse_opt(['--multi-scale'])
    train.check_options(opt, du.DistInfo(), torch.device('cpu'))
    assert [s for s in logged() if s.startswith('--multi-scale changes nothing here: --img-size 320 640')]
    assert train.check_img_sizes(opt.img_size, True) == train.check_img_sizes(opt.img_size, False)
    assert train.check_img_sizes(opt.img_size, False)[2:] == (10, 20, True)  # 320-640 without the flag
    one = train.parse_opt(['--multi-scale', '--img-size', '320'])
    n = len(logged())
    train.check_options(one, du.DistInfo(), torch.device('cpu'))
    assert len(logged()) == n  # it acts: nothing to say
    assert train.check_img_sizes(one.img_size, True) == (448, 320, 6, 14, True)  # 192-448 around 320
    assert train.check_img_sizes(one.img_size, False) == (320, 320, 10, 10, False)
