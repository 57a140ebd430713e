"""train.py end to end (slow tier): short CPU runs in-process and through the command line on a few coco128 images
at 64-160 pixels (schedule, checkpoints, resume, freeze, evolve, options), and DDP (gloo ranks, torchrun, elastic
restart, launcher). The pure parts are in test_train_units.py."""
from __future__ import annotations

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
from models import Darknet
from tests.conftest import ROOT, TINY_WEIGHTS, make_subset
from tests.test_train_units import NO_BN_CFG, run_epoch
from utils.darknet.weights import load_darknet_weights
from utils.data import image_weights
from utils.train.engine import CosineLR

CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'
HYP = train.load_hyp(ROOT / 'data' / 'hyp.scratch.yaml')

pytestmark = pytest.mark.slow


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
# in-process runs on coco128 images, DDP groups

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


def test_new_options_refuse_what_cannot_work(coco8):
    from utils.train import distributed as du
    for extra, message in ((['--image-weights', '--rect'], '--image-weights draws images at random'),
                           (['--patience', '3', '--notest'], 'leave out --notest'),
                           (['--save-period', '-1'], '--save-period -1: must be 0')):
        with pytest.raises(ValueError, match=message):
            train.check_options(train.parse_opt(base_args(coco8, *extra)), du.DistInfo(), torch.device('cpu'))


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
    from utils.eval.plots import matrix_geometry

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
    assert [g['lr'] for g in groups] == pytest.approx([HYP['lr0'] * CosineLR(2, HYP['lrf'])(1)] * 3)
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
    from utils.train.loss import ComputeLoss
    calls = {'n': 0}

    class NanInSecondEpoch(ComputeLoss):
        def __call__(self, p, targets, gr=1.0):
            calls['n'] += 1
            loss, items = super().__call__(p, targets, gr)
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


def test_device_list_without_cuda_is_one_clear_error(coco8, tmp_path, capsys):
    assert train.main(train.parse_opt(base_args(coco8, '--save-dir', str(tmp_path))[:-4] + ['--device', '0,1'])) == 2
    assert 'CUDA is not available' in capsys.readouterr().err and not (tmp_path / 'weights').exists()


def test_rank0_validates_with_the_per_process_batch(coco8):
    from utils.data.config import load_data_config
    from utils.train import distributed as du
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
    real_weights = image_weights.epoch_image_weights
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
