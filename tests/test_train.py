"""train.py: schedule, optimizer groups, accumulation, EMA, multi-scale, checkpoints, resume, freeze, evolve, DDP,
and short CPU runs through the command line on a few coco128 images at 128-160 pixels."""
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

def test_cosine_lr_from_1_to_lrf():
    lf = train.CosineLR(10, 0.0005)
    values = [lf(e) for e in range(11)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0005)
    assert values[5] == pytest.approx((1 + 0.0005) / 2)
    assert all(a > b for a, b in zip(values, values[1:]))


def test_warmup_interpolates_lr_momentum_gr_accumulate():
    targets = [0.01, 0.01, 0.01]
    w0 = train.warmup_values(0, 500, targets, HYP, batch_size=16)
    assert w0['lr'] == [0.0, 0.0, 0.1] and w0['momentum'] == pytest.approx(0.9)
    assert w0['gr'] == 0.0 and w0['accumulate'] == 1 and w0['weight_decay'] == [0.0, 0.0, 0.0]
    mid = train.warmup_values(250, 500, targets, HYP, batch_size=16)
    assert mid['lr'] == pytest.approx([0.005, 0.005, 0.055])
    assert mid['momentum'] == pytest.approx((0.9 + 0.937) / 2) and mid['gr'] == pytest.approx(0.5)
    assert mid['accumulate'] == round(1 + 3 * 0.5)  # 1 -> 64 / 16 = 4
    assert mid['weight_decay'] == pytest.approx([0.0, HYP['weight_decay'] / 2, 0.0])
    end = train.warmup_values(500, 500, targets, HYP, batch_size=16)
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
    sizes = {train.multi_scale_size(rng, gmin, gmax) for _ in range(300)}
    assert sizes == set(range(192, 449, 32))
    imgs = torch.rand(2, 3, 448, 320)
    assert train.resize_batch(imgs, 224).shape[2:] == (224, 160)
    assert train.resize_batch(imgs, 200).shape[2:] == (224, 160)  # sides rounded up to multiples of 32
    for bad in ([300, 300, 300], [320, 320, 0], [640, 320, 320]):
        with pytest.raises(ValueError, match='img-size'):
            train.check_img_sizes(bad, False)


def test_accumulated_scaled_loss_equals_nominal_batch_gradient():
    # loss * bs / 64 summed over 64 / bs batches = the gradient of one 64-image batch (objectness-only targets, so
    # the per-batch means have equal weights)
    from utils.loss import ComputeLoss
    torch.manual_seed(0)
    model = Darknet(CFG, 64)
    compute_loss = ComputeLoss(model, HYP)
    model.eval()  # BN on running statistics: the same function for any batch split
    x = torch.rand(8, 3, 64, 64)
    empty = torch.zeros(0, 6)

    def grads(chunks: int) -> torch.Tensor:
        model.zero_grad()
        for xc in x.chunk(chunks):
            loss, _ = compute_loss(model(xc)[1], empty)
            (loss * xc.shape[0] / 8).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    assert torch.allclose(grads(4), grads(1), rtol=1e-4, atol=1e-7)


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
    assert best['best_fitness'] == pytest.approx(max(fit), abs=1e-3)
    assert best['epoch'] == int(np.argmax(fit))
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
                                                size=128))) == 0
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


def test_ddp_two_cpu_processes(coco8, tmp_path):
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(ROOT / 'train.py'), *base_args(coco8, epochs=1, size=128)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'DDP: distinct images per rank [4, 4], seen by every rank 0' in r.stdout
    assert len((tmp_path / 'results.txt').read_text().splitlines()) == 1
    assert load(tmp_path / 'weights' / 'last.pt')['epoch'] == 0


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


def test_distributed_env_and_single_process_helpers(monkeypatch, tmp_path):
    from utils import distributed as du
    for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(k, raising=False)
    assert du.env_info() == du.DistInfo() and du.env_info().main and not du.env_info().distributed
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '4')
    info = du.env_info()
    assert (info.rank, info.local_rank, info.world_size, info.distributed, info.main) == (3, 1, 4, True, False)
    # no process group: every helper is a no-op or the identity
    assert du.is_main_process() and du.get_world_size() == 1 and du.all_gather_object('x') == ['x']
    du.barrier()
    du.save_on_master(lambda p: p.write_text('saved'), tmp_path / 'f.txt')
    assert (tmp_path / 'f.txt').read_text() == 'saved'


def test_single_cls_trains_a_one_class_cfg(coco8, tmp_path):
    # the 80-class labels stay valid (checked against the data's 80 classes), then all become class 0
    args = ['--cfg', str(ROOT / 'cfg' / 'yolov3-tiny-1cls.cfg'), '--data', str(coco8), '--weights', '',
            '--img-size', '128', '--epochs', '1', '--batch-size', '8', '--device', 'cpu', '--workers', '0',
            '--single-cls', '--save-dir', str(tmp_path)]
    assert train.main(train.parse_opt(args)) == 0
    row = (tmp_path / 'results.txt').read_text().split()
    assert float(row[4]) == 0.0 and float(row[2]) > 0  # no class loss for one class, box loss trained
    assert train.main(train.parse_opt(args[:-3] + ['--save-dir', str(tmp_path / 'b')])) == 2  # 80 vs 1 classes
