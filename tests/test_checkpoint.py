"""utils/checkpoint.py and utils/train/resume.py's checkpoint: a run saved and restored into fresh parts continues exactly as
the uninterrupted run; what the modules refuse. Fast tier: a toy model in memory, no ../shared, no subprocesses."""
from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from models import Darknet
from utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_checkpoint,
    read_run,
    restore_cuda_rng,
    rng_state,
    save_checkpoint,
    set_rng_state,
    strip_optimizer,
    training_weights,
)
from utils.logs import LOGGER
from utils.torch_utils import ModelEMA
from utils.train.engine import CosineLR, LoopState, Parts
from utils.train.resume import Progress, restore, train_checkpoint

TOY_CFG = Path(__file__).resolve().parent / 'fixtures' / 'toy.cfg'
EPOCHS = 3


def fresh_run(seed: int) -> Parts:
    """A toy model and its training parts, initialised from seed (a different seed: different weights)."""
    torch.manual_seed(seed)
    model = Darknet(TOY_CFG, img_size=64)
    model.names = ['a', 'b', 'c']
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    lf = CosineLR(EPOCHS, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    return Parts(model, optimizer, scheduler, lf, scaler, ModelEMA(model, tau=2.0), None)


def step(parts: Parts, gen: torch.Generator) -> float:
    """One training step that draws from every RNG a real one does: images from torch, augmentation choices from
    python and numpy, the loader's order from its generator."""
    x = torch.randn(2, 3, 64, 64) * (1 + random.random()) + float(np.random.rand())
    x = x[torch.randperm(2, generator=gen)]
    loss = sum(p.float().pow(2).mean() for p in parts.model(x))
    parts.optimizer.zero_grad()
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.ema.update(parts.model)
    return loss.item()


def opt_for(tmp_path: Path) -> argparse.Namespace:
    """The options a checkpoint carries (train.py's Namespace; only seed and epochs are read back here)."""
    return argparse.Namespace(seed=0, deterministic=False, epochs=EPOCHS, save_dir=tmp_path, cfg=str(TOY_CFG),
                              resume=str(tmp_path / 'last.pt'), patience=0)


def start(seed: int) -> tuple[Parts, torch.Generator]:
    """A run as train.py starts one: seeded globals, parts and a loader generator."""
    random.seed(seed)
    np.random.seed(seed)
    parts = fresh_run(seed)
    return parts, torch.Generator().manual_seed(seed)


def save(parts: Parts, gen: torch.Generator, tmp_path: Path, epoch: int, state: LoopState,
         progress: Progress = Progress(), results: str = '') -> Path:
    """last.pt of the run now, as train.py writes it."""
    ckpt = train_checkpoint(parts, {'lr0': 0.01}, opt_for(tmp_path), epoch, state, progress, results, ['host/1'], gen)
    save_checkpoint(ckpt, tmp_path / 'last.pt')
    return tmp_path / 'last.pt'


def resume_from(path: Path, seed: int, start_state: LoopState, drop: tuple[str, ...] = ()):
    """A new process (other weights and RNG streams) restored from path, the keys in drop left out of it (what an
    older checkpoint lacks): (parts, generator, Resumed)."""
    ckpt = load_checkpoint(path)
    for k in drop:
        del ckpt[k]
    parts, gen = start(seed)
    parts.model.load_state_dict(training_weights(ckpt))
    return parts, gen, restore(ckpt, parts, start_state, opt_for(path.parent), gen)


def assert_same_run(a: Parts, b: Parts) -> None:
    """Bit-identical raw weights, EMA weights, optimizer state, LR and schedule position."""
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    for k, v in a.ema.ema.state_dict().items():
        assert torch.equal(v, b.ema.ema.state_dict()[k]), k
    assert a.ema.updates == b.ema.updates
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert [g['lr'] for g in sa['param_groups']] == [g['lr'] for g in sb['param_groups']]
    for i, s in sa['state'].items():
        assert torch.equal(s['momentum_buffer'], sb['state'][i]['momentum_buffer'])
    schedule = [{k: v for k, v in p.scheduler.state_dict().items() if k != '_step_count'} for p in (a, b)]
    assert schedule[0] == schedule[1]  # _step_count only guards torch's step-order warning


@pytest.mark.parametrize('drop', [(), ('lr_scheduler',)])  # a last.pt of the code before the schedule was saved
def test_resume_at_an_epoch_end_equals_the_uninterrupted_run(tmp_path, drop):
    # the uninterrupted run: epoch 0 (3 steps), the schedule steps, epoch 1 (3 steps)
    parts, gen = start(0)
    for _ in range(3):
        step(parts, gen)
    parts.scheduler.step()
    progress = Progress(0.25, 0, np.array([0.5, 0.25, 0.0]))
    last = save(parts, gen, tmp_path, 0, LoopState(last_opt_step=2, accumulate=4, img_size=64), progress,
                'epoch 0 row\n')
    assert load_checkpoint(last)['lr_scheduler']['last_epoch'] == 1  # saved; resume_from drops it for drop
    for _ in range(3):
        step(parts, gen)
    parts.scheduler.step()

    parts2, gen2, resumed = resume_from(last, 1, LoopState(accumulate=1, img_size=32), drop)
    assert resumed.epoch == 1 and resumed.state.batch == 0  # the next epoch, from its start
    assert resumed.state == LoopState(last_opt_step=2, accumulate=4, img_size=64)
    assert (resumed.progress, resumed.progress.maps.tolist()) == (progress, [0.5, 0.25, 0.0])
    assert resumed.results == 'epoch 0 row\n'
    assert parts2.scheduler.last_epoch == 1
    for _ in range(3):
        step(parts2, gen2)
    parts2.scheduler.step()
    assert_same_run(parts, parts2)


@pytest.mark.parametrize('drop', [(), ('lr_scheduler',)])
def test_resume_inside_an_epoch_continues_at_the_saved_batch(tmp_path, drop):
    parts, gen = start(0)
    losses = [step(parts, gen) for _ in range(2)]
    mloss = torch.tensor([sum(losses) / 2, 0.0, 0.0, sum(losses) / 2])
    last = save(parts, gen, tmp_path, 0, LoopState(last_opt_step=1, accumulate=2, img_size=64, gr=0.5, batch=2,
                                                    mloss=mloss))
    after = [step(parts, gen) for _ in range(2)]
    parts.scheduler.step()

    parts2, gen2, resumed = resume_from(last, 5, LoopState(), drop)
    assert resumed.epoch == 0 and torch.equal(resumed.state.mloss, mloss)
    assert resumed.state == LoopState(last_opt_step=1, accumulate=2, img_size=64, gr=0.5, batch=2)
    assert parts2.scheduler.last_epoch == 0  # the LR is the saved step's, not a new epoch's
    assert [step(parts2, gen2) for _ in range(2)] == after
    parts2.scheduler.step()
    assert_same_run(parts, parts2)


def test_a_checkpoint_from_before_the_loop_state_and_rng_still_resumes(tmp_path):
    parts, gen = start(0)
    step(parts, gen)
    ckpt = train_checkpoint(parts, {}, opt_for(tmp_path), 0, LoopState(), Progress(0.2, 0), '', [], gen)
    for k in ('best_epoch', 'maps', 'last_opt_step', 'accumulate', 'img_size', 'gr', 'rng', 'elastic_agents',
              'lr_scheduler', 'batch', 'mloss'):  # keys added later
        del ckpt[k]
    save_checkpoint(ckpt, tmp_path / 'last.pt')
    ckpt = load_checkpoint(tmp_path / 'last.pt')
    parts2, gen2 = start(1)
    before = rng_state()
    resumed = restore(ckpt, parts2, LoopState(accumulate=4, img_size=64), opt_for(tmp_path), gen2)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(before)
    assert resumed.epoch == 1 and resumed.state == LoopState(accumulate=4, img_size=64)
    assert (resumed.progress.best_fitness, resumed.progress.best_epoch) == (0.2, 0)  # its own epoch, no rows to read
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws  # no saved RNG: streams left alone
    assert read_run(tmp_path / 'last.pt', require_options=False).agents is None


def test_saved_run_says_where_it_stopped_and_a_stripped_one_is_finished(tmp_path):
    parts, gen = start(0)
    step(parts, gen)
    last = save(parts, gen, tmp_path, 1, LoopState(batch=1, mloss=torch.zeros(4)))
    run = read_run(last)
    assert (run.epoch, run.batch, run.where, run.finished) == (1, 1, 'epoch 1, batch 1', False)
    assert run.opt['epochs'] == EPOCHS and run.hyp == {'lr0': 0.01} and run.agents == ['host/1']
    save(parts, gen, tmp_path, EPOCHS - 1, LoopState())
    assert read_run(last).finished  # the last epoch saved
    save(parts, gen, tmp_path, 0, LoopState())
    assert not read_run(last).finished
    strip_optimizer(last)
    ckpt = load_checkpoint(last)
    assert ckpt['optimizer'] is None and ckpt['model_train'] is None and ckpt['lr_scheduler'] is None
    assert read_run(last).finished
    assert ckpt['names'] == ['a', 'b', 'c'] and set(ckpt['model']) == set(parts.model.state_dict())


def test_rng_state_of_every_kind_round_trips_through_a_weights_only_file(tmp_path):
    gen = torch.Generator().manual_seed(3)
    random.gauss(0, 1)  # python's cached second gaussian is part of its state
    torch.save(rng_state(gen), tmp_path / 's.pt')
    draws = (random.gauss(0, 1), np.random.randn(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    set_rng_state(torch.load(tmp_path / 's.pt', weights_only=True), gen)
    assert (random.gauss(0, 1), np.random.randn(), torch.rand(1).item(), torch.rand(1, generator=gen).item()) == draws


def test_cuda_rng_states_of_more_or_fewer_devices(caplog):
    # a checkpoint from 2 GPUs resumed where there is 1, or from 1 where there are 3
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    put: list = []
    assert restore_cuda_rng(saved, 1, lambda s, i: put.append((i, int(s[0])))) == 1
    assert put == [(0, 0)] and 'restored 1, dropped 1' in caplog.text
    assert restore_cuda_rng(saved[:1], 3, lambda s, i: None) == 1 and 'devices 1-2 keep fresh seeds' in caplog.text


def test_refuses_what_is_not_a_checkpoint_and_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r'nothing\.pt: checkpoint not found'):
        load_checkpoint(tmp_path / 'nothing.pt')
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='junk.pt: not a readable PyTorch checkpoint'):
        load_checkpoint(junk)
    code = tmp_path / 'code.pt'
    torch.save({'model': {}, 'opt': argparse.Namespace(x=1)}, code)  # unpickling it would import and build objects
    with pytest.raises(CheckpointError, match='code.pt: refused to load'):
        load_checkpoint(code)
    weights = tmp_path / 'weights.pt'
    save_checkpoint(model_checkpoint(Darknet(TOY_CFG, img_size=64)), weights)
    with pytest.raises(CheckpointError, match="weights.pt: not a train.py checkpoint"):
        read_run(weights)  # a model to fine-tune from (--weights), not a run to resume


def test_a_failed_save_leaves_the_previous_file(tmp_path):
    path = tmp_path / 'last.pt'
    save_checkpoint({'model': {'w': torch.ones(2)}}, path)
    with pytest.raises(Exception):
        save_checkpoint({'model': {'w': torch.zeros(2)}, 'bad': lambda: 0}, path)  # cannot be pickled
    assert torch.equal(load_checkpoint(path)['model']['w'], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ['last.pt']  # no temporary file left behind
