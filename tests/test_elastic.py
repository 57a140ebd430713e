"""Elastic restarts under torchrun: which launch a process belongs to (its agent's identity), the decision rank 0 takes
for the whole group from weights/last.pt, and two real launches with the same --rdzv-id in the same folder."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import train
from tests.conftest import ROOT, TINY_WEIGHTS, make_subset
from utils.checkpoint import CheckpointError, run_paths, save_checkpoint
from utils.train import distributed as du
from utils.train import resume

CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'


@pytest.fixture(scope='module')
def coco8(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp('coco8'), 8, name='coco8')


def fake_proc(root: Path, pid: int, start: int, comm: str = 'python') -> Path:
    """A /proc with the stat line of process pid (start time in field 22) and a boot id."""
    (root / str(pid)).mkdir(parents=True)
    fields = ['S', '1', '1', '1', '0', '-1', '4194560'] + ['0'] * 12 + [str(start), '5124096', '977']
    (root / str(pid) / 'stat').write_text(f'{pid} ({comm}) ' + ' '.join(fields) + '\n')
    (root / 'sys' / 'kernel' / 'random').mkdir(parents=True)
    (root / 'sys' / 'kernel' / 'random' / 'boot_id').write_text('b00t\n')
    return root


# ------------------------------------------------------------------------------------------------------------------
# the agent's identity

def test_agent_key_is_the_parent_process_and_its_start_time(tmp_path, monkeypatch):
    # a command name with spaces and a parenthesis must not shift the fields
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'yolo1')
    proc = fake_proc(tmp_path / 'proc', os.getppid(), 123456, comm='py (x) y')
    key = du.agent_key(proc)
    assert key == f'{socket.gethostname()}/b00t/{os.getppid()}@123456/yolo1'
    # the same agent restarted later (same pid reused, another start time) is another launch
    (proc / str(os.getppid()) / 'stat').write_text((proc / str(os.getppid()) / 'stat').read_text()
                                                   .replace(' 123456 ', ' 123999 '))
    assert du.agent_key(proc) != key
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'yolo2')  # train.py's own launcher called twice by one process
    assert du.agent_key(proc) != key


def test_agent_key_without_proc_uses_the_agents_log_folder(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'yolo1')
    run_dir = tmp_path / 'torchelastic_ab12' / 'yolo1_x7q'
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(run_dir / 'attempt_3' / '1' / 'error.json'))
    key = du.agent_key(tmp_path / 'no_proc')
    assert key == f'{socket.gethostname()}/-/{os.getppid()}@{run_dir}/yolo1'
    # the next attempt of the same agent writes under the same run folder: the same launch
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(run_dir / 'attempt_4' / '0' / 'error.json'))
    assert du.agent_key(tmp_path / 'no_proc') == key


def test_agent_key_of_this_process_is_real():
    key = du.agent_key()
    host, boot, pid_start, run_id = key.split('/')
    pid, start = pid_start.split('@')
    assert host == socket.gethostname() and int(pid) == os.getppid()
    if Path('/proc/self/stat').exists():
        assert boot != '-' and int(start) > 0


def test_same_launch_needs_a_shared_agent():
    assert du.same_launch(['a', 'b'], ['b', 'c'])
    assert not du.same_launch(['a'], ['b'])
    assert not du.same_launch(None, ['a'])  # old checkpoint ('elastic_run_id' only) or a single-process run
    assert not du.same_launch([], [])


def join_round(store, world_size: int, late: dict[int, float] | None = None) -> list[str]:
    """Every rank's du.group_prefix for one group on store, each rank a thread (rank r starting late[r] s late)."""
    out: list[str | None] = [None] * world_size

    def run(r: int) -> None:
        time.sleep((late or {}).get(r, 0.0))
        out[r] = du.group_prefix(store, r, world_size, timeout_s=20)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_group_prefix_is_shared_by_a_group_and_new_for_each_group():
    # the agent's store keeps earlier groups' keys; a rank arriving after rank 0 has read a dead rank's token still
    # gets this group's prefix, and rank 0 waits for it (restart counts, which differ between nodes, play no part)
    import torch.distributed as dist
    store = dist.HashStore()
    first = join_round(store, 3)
    assert first[0] and len(set(first)) == 1
    store.set('yolo_group/ask/2', 'token-of-a-dead-rank')
    second = join_round(store, 3, late={2: 0.3})
    assert second[0] and len(set(second)) == 1 and second[0] != first[0]
    third = join_round(store, 2, late={0: 0.2})  # rank 0 last: the others wait for it
    assert third[0] and len(set(third)) == 1 and third[0] not in (first[0], second[0])


# ------------------------------------------------------------------------------------------------------------------
# the decision (one process: broadcast is the identity)

def tiny_last(save_dir: Path, **extra) -> Path:
    """A weights/last.pt of an unfinished 3-epoch run at epoch 0, with the given extra keys."""
    last = run_paths(save_dir)['last']
    last.parent.mkdir(parents=True)
    opt = vars(train.parse_opt(['--epochs', '3', '--save-dir', str(save_dir)]))
    save_checkpoint({'model': {'w': torch.zeros(1)}, 'optimizer': {}, 'epoch': 0, 'opt': opt, 'hyp': {}, **extra},
                    last)
    return last


@pytest.mark.parametrize('saved, resumes', [({'elastic_agents': ['host/b/1@2/x', 'me']}, True),
                                            ({'elastic_agents': ['host/b/1@2/x']}, False),
                                            ({'elastic_run_id': 'yolo1'}, False), ({}, False)])
def test_elastic_resume_only_a_checkpoint_of_this_launch(logged, tmp_path, monkeypatch, saved, resumes):
    monkeypatch.setattr(du, 'launch_agents', lambda: ['me', 'other-node'])
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'yolo1')  # same id as the old checkpoint: not what decides
    last = tiny_last(tmp_path, **saved)
    opt = resume.elastic_resume(train.parse_opt(['--save-dir', str(tmp_path)]))
    lines = logged()
    assert (opt.resume or None) == (str(last) if resumes else None)
    assert len(lines) == 1
    assert (f'resuming this launch\'s {last} at epoch 1' in lines[0]) if resumes else ('starting again' in lines[0])
    assert last.is_file()


def test_elastic_first_attempt_without_checkpoint_says_nothing(logged, tmp_path, monkeypatch):
    monkeypatch.setattr(du, 'launch_agents', lambda: ['me'])
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')
    opt = resume.elastic_resume(train.parse_opt(['--save-dir', str(tmp_path)]))
    lines = logged()
    assert not opt.resume and lines == []


def test_elastic_unreadable_last_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(du, 'launch_agents', lambda: ['me'])
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    last = run_paths(tmp_path)['last']
    last.parent.mkdir(parents=True)
    last.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='last.pt'):
        resume.elastic_resume(train.parse_opt(['--save-dir', str(tmp_path)]))
    assert last.read_bytes() == b'not a checkpoint'


# ------------------------------------------------------------------------------------------------------------------
# two real launches with the same --rdzv-id in one folder

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def torchrun_fixed_id(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run with a fixed --rdzv-id (as the README's multi-node example), 2 gloo workers,
    one restart allowed, running tests/ddp_worker.py (train.py)."""
    launcher = ['--nnodes', '1', '--nproc-per-node', '2', '--rdzv-backend', 'c10d', '--rdzv-endpoint',
                f'localhost:{free_port()}', '--rdzv-id', 'yolo-fixed', '--max-restarts', '1', '--monitor-interval', '1']
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', *launcher,
                           str(ROOT / 'tests' / 'ddp_worker.py'), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


@pytest.mark.slow
def test_relaunch_with_same_rdzv_id_trains_its_own_epochs_after_a_first_epoch_failure(coco8, tmp_path):
    # launch 1 trains 2 epochs to the end; launch 2, the same command in the same folder, loses rank 1 as its epoch 0
    # starts (before it saved anything): the restarted group must not take launch 1's last.pt for its own (it would
    # exit 0 as "finished" having trained nothing) but train its epochs 0 and 1 once
    args = ['--cfg', str(CFG), '--data', str(coco8), '--weights', str(TINY_WEIGHTS), '--img-size', '64', '--epochs',
            '2', '--batch-size', '8', '--device', 'cpu', '--workers', '0', '--notest', '--rect']
    r1 = torchrun_fixed_id(args, tmp_path, {})
    assert r1.returncode == 0, r1.stderr[-3000:]
    first = torch.load(tmp_path / 'weights' / 'last.pt', map_location='cpu', weights_only=True)
    assert first['epoch'] == 1 and len(first['elastic_agents']) == 1  # both workers: one agent

    seen = tmp_path / 'seen'
    seen.mkdir()
    r2 = torchrun_fixed_id(args, tmp_path, {'YOLO_TEST_KILL_EPOCH': '0', 'YOLO_TEST_SEEN_DIR': str(seen)})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count('Elastic restart') == 1, r2.stdout[-3000:]  # decided once, logged by rank 0
    assert "Elastic restart 1: weights/last.pt is another launch's" in r2.stdout and 'starting again' in r2.stdout
    assert [row.split()[0] for row in (tmp_path / 'results.txt').read_text().splitlines()] == ['0/1', '1/1']
    second = torch.load(tmp_path / 'weights' / 'last.pt', map_location='cpu', weights_only=True)
    assert second['epoch'] == 1 and second['ema_updates'] == 2  # one optimizer step per epoch, each epoch once
    assert len(second['elastic_agents']) == 1 and set(second['elastic_agents']).isdisjoint(first['elastic_agents'])
    for epoch in (0, 1):  # rank 1 (killed in attempt 0) trained both epochs in attempt 1
        assert len((seen / f'rank1_epoch{epoch}.txt').read_text().splitlines()) == 4


@pytest.mark.slow
def test_two_agents_as_two_nodes_resume_by_any_shared_agent(coco8, tmp_path):
    # two torchrun agents on this host, one worker each, form one group as two nodes would; rank 1 (on either agent)
    # is SIGKILLed once as epoch 1 starts: both agents restart their workers, rank 0 decides for both, and the group
    # continues from last.pt, which names both agents
    port = free_port()
    launcher = ['--nnodes', '2', '--nproc-per-node', '1', '--rdzv-backend', 'c10d', '--rdzv-endpoint',
                f'localhost:{port}', '--rdzv-id', 'two-nodes', '--max-restarts', '1', '--monitor-interval', '1']
    args = ['--cfg', str(CFG), '--data', str(coco8), '--weights', str(TINY_WEIGHTS), '--img-size', '64', '--epochs',
            '3', '--batch-size', '8', '--device', 'cpu', '--workers', '0', '--notest', '--rect']
    env = {**os.environ, 'YOLO_TEST_KILL_EPOCH': '1', 'YOLO_TEST_KILL_MARK': str(tmp_path / 'killed')}
    agents = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *launcher,
                                str(ROOT / 'tests' / 'ddp_worker.py'), *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [a.communicate(timeout=300) for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert [a.returncode for a in agents] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert (tmp_path / 'killed').exists()
    stdout = outs[0][0] + outs[1][0]
    assert stdout.count("resuming this launch's weights/last.pt at epoch 1") == 1, stdout[-3000:]
    assert [row.split()[0] for row in (tmp_path / 'results.txt').read_text().splitlines()] == ['0/2', '1/2', '2/2']
    ck = torch.load(tmp_path / 'weights' / 'last.pt', map_location='cpu', weights_only=True)
    assert ck['epoch'] == 2 and ck['ema_updates'] == 3 and len(ck['elastic_agents']) == 2


@pytest.mark.slow
def test_elastic_restart_inside_an_epoch_resumes_at_the_saved_batch(coco8, tmp_path):
    # --save-period-min saves last.pt at optimizer steps inside epochs; rank 1 is SIGKILLed as it would load batch 2
    # of epoch 1 (4 batches per rank per epoch): the restart goes through --resume's path to the saved position and
    # loads only the batches after it
    seen = tmp_path / 'seen'
    seen.mkdir()
    args = ['--cfg', str(CFG), '--data', str(coco8), '--weights', str(TINY_WEIGHTS), '--img-size', '64', '--epochs',
            '3', '--batch-size', '2', '--device', 'cpu', '--workers', '0', '--notest', '--rect',
            '--save-period-min', '0.00001']
    r = torchrun_fixed_id(args, tmp_path, {'YOLO_TEST_KILL_EPOCH': '1', 'YOLO_TEST_KILL_BATCH': '2',
                                           'YOLO_TEST_KILL_MARK': str(tmp_path / 'killed'),
                                           'YOLO_TEST_SEEN_DIR': str(seen)})
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"Elastic restart 1: resuming this launch's weights/last\.pt at epoch 1, batch (\d)", r.stdout)
    assert m, r.stdout[-3000:]
    batch = int(m.group(1))  # the save after batch 1's step, or after batch 0's if the kill cut the later one short
    assert batch in (1, 2)
    assert [row.split()[0] for row in (tmp_path / 'results.txt').read_text().splitlines()] == ['0/2', '1/2', '2/2']
    # rank 1 in epoch 1: batches 0 and 1 before the kill, then only batches batch..3 after the restart
    assert len((seen / 'rank1_epoch1.txt').read_text().splitlines()) == 2 + 4 - batch
    assert torch.load(tmp_path / 'weights' / 'last.pt', map_location='cpu', weights_only=True)['epoch'] == 2


def test_elastic_restart_after_this_launchs_last_epoch_exits_as_finished(logged, tmp_path, monkeypatch, capsys):
    # the group failed after saving its final epoch (say while plotting): the restart finds its own finished run,
    # and --resume's path says so and exits 0 without training
    monkeypatch.setattr(du, 'launch_agents', lambda: ['me'])
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    last = tiny_last(tmp_path, elastic_agents=['me'])
    ckpt = torch.load(last, weights_only=True)
    save_checkpoint({**ckpt, 'epoch': 2}, last)
    opt = resume.elastic_resume(train.parse_opt(['--save-dir', str(tmp_path)]))
    lines = logged()
    assert opt.resume == str(last) and lines == [f"Elastic restart 1: this launch's {last} is its finished run"]
    assert resume.resolve_resume(opt, train.option_defaults())[1] is None and 'already finished' in logged()[-1]


def test_elastic_checkpoint_rank0_cannot_judge_is_an_error_not_a_wait(tmp_path, monkeypatch):
    # a last.pt naming this group's agent but not saved by train.py (no options): rank 0 must still answer
    monkeypatch.setattr(du, 'launch_agents', lambda: ['me'])
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    last = run_paths(tmp_path)['last']
    last.parent.mkdir(parents=True)
    save_checkpoint({'model': {'w': torch.zeros(1)}, 'optimizer': {}, 'elastic_agents': ['me'], 'epoch': 0}, last)
    with pytest.raises(CheckpointError, match='cannot decide whether to resume it'):
        resume.elastic_resume(train.parse_opt(['--save-dir', str(tmp_path)]))
