"""Long runs: a SIGTERM stops training at an optimizer step with last.pt saved and --resume continues it exactly
(mid-epoch: same batches, augmentation, multi-scale sizes, optimizer, EMA); kill -9 after a --save-period-min save
likewise; --resume auto for requeue scripts. Real train.py processes on 32 coco128 images at 64-192 pixels."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_WEIGHTS, make_subset
from utils.logs import setup_logging
from utils.train import resume
from utils.train.engine import CosineLR, FiniteGuard, RunControl

CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'
TRAIN = ROOT / 'train.py'
EPOCHS = 3
NB = 8  # batches per epoch: 32 images, batch 4


def run_args(data: Path, *extra: str) -> list[str]:
    # --multi-scale: sizes 64-192 drawn per accumulation step; --save-period 2 keeps weights/epoch_2.pt unstripped
    # (model_train and EMA of the final epoch) for the comparison
    return ['--cfg', str(CFG), '--data', str(data), '--weights', str(TINY_WEIGHTS), '--img-size', '128',
            '--multi-scale', '--epochs', str(EPOCHS), '--batch-size', '4', '--device', 'cpu', '--workers', '2',
            '--notest', '--save-period', '2', *extra]


class Training:
    """train.py in its own process group (as SLURM starts a job step), its output collected as it comes."""

    def __init__(self, args: list[str], cwd: Path, launcher: list[str] | None = None):
        launcher = launcher or [sys.executable, str(TRAIN)]
        self.proc = subprocess.Popen([*launcher, *args], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, 'PYTHONUNBUFFERED': '1'})
        self.text = ''
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self.text += chunk.decode(errors='replace')

    def wait_for(self, pattern: str, timeout: float = 240) -> bool:
        """True once the output matches pattern; False if the process ended or the time ran out first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.text):
                return True
            if self.proc.poll() is not None:
                self._reader.join(5)
                return bool(re.search(pattern, self.text))
            time.sleep(0.005)
        return False

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def epochs_of(d: Path) -> list[str]:
    return [r.split()[0] for r in (d / 'results.txt').read_text().splitlines()]


def train_rows(d: Path) -> list[list[str]]:
    """results.txt's training columns without the memory column: epoch, losses, targets, img_size."""
    return [r.split()[:1] + r.split()[2:8] for r in (d / 'results.txt').read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    """The final epoch's raw model and EMA of two runs agree to 1e-4."""
    ca, cb = load(a / 'weights' / f'epoch_{EPOCHS - 1}.pt'), load(b / 'weights' / f'epoch_{EPOCHS - 1}.pt')
    assert ca['ema_updates'] == cb['ema_updates']
    for part in ('model_train', 'model'):
        diff = max((ca[part][k].float() - cb[part][k].float()).abs().max().item() for k in ca[part])
        assert diff < 1e-4, f'{part}: max |diff| {diff}'


@pytest.fixture(scope='module')
def data32(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp('coco32'), 32, name='coco32')


@pytest.fixture(scope='module')
def reference(data32, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    d = tmp_path_factory.mktemp('reference')
    r = cli(run_args(data32), d)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d


@pytest.fixture(scope='module')
def sigterm_run(data32, tmp_path_factory) -> tuple[Path, str, float]:
    """The same run, SIGTERMed (the whole process group, as SLURM does) once epoch 1 shows progress: (folder,
    output, seconds from the signal to the exit)."""
    d = tmp_path_factory.mktemp('sigterm')
    t = Training(run_args(data32), d)
    try:
        assert t.wait_for(r'\s1/2\s'), t.text[-3000:]
        t0 = time.time()
        t.signal_group(signal.SIGTERM)
        rc = t.wait(120)
        dt = time.time() - t0
    finally:
        t.kill()
    assert rc == 0, t.text[-3000:]
    return d, t.text, dt


@pytest.mark.slow
def test_sigterm_saves_position_and_exits_0_with_the_resume_command(sigterm_run):
    d, out, dt = sigterm_run
    assert dt < 60
    assert 'Traceback' not in out and 'Exception ignored' not in out, out[-3000:]  # its 2 workers ended cleanly
    m = re.search(r'Stopped by SIGTERM in epoch (\d+), after (\d+)/(\d+) batches; saved (\S+)\. Resume with: (.+)',
                  out)
    assert m, out[-3000:]
    assert m.group(1) == '1' and 0 < int(m.group(2)) < NB and int(m.group(3)) == NB
    assert Path(m.group(4)) == Path('weights/last.pt') and m.group(5).endswith(f"--resume {d / 'weights' / 'last.pt'}")
    ck = load(d / 'weights' / 'last.pt')
    assert ck['epoch'] == 1 and ck['batch'] == int(m.group(2))
    assert ck['optimizer'] is not None and ck['model_train'] is not None and ck['mloss'].shape == (4,)
    assert epochs_of(d) == ['0/2']  # the interrupted epoch's row comes once it completes


@pytest.mark.slow
def test_sigterm_then_resume_equals_the_uninterrupted_run(sigterm_run, reference, tmp_path):
    d = tmp_path / 'run'
    shutil.copytree(sigterm_run[0], d)
    r = cli(['--resume'], d)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r'Resuming \S+ from epoch 1, batch \d+ of 3 epochs', r.stdout), r.stdout[-3000:]
    assert epochs_of(d) == ['0/2', '1/2', '2/2']
    assert train_rows(d) == train_rows(reference)  # running losses of the interrupted epoch, multi-scale sizes
    assert_same_weights(d, reference)


@pytest.mark.slow
def test_kill_9_after_a_periodic_save_then_resume_equals(data32, reference, tmp_path):
    # --save-period-min 0.001 (60 ms): last.pt at nearly every optimizer step; kill -9 once one inside epoch 1 exists
    t = Training(run_args(data32, '--save-period-min', '0.001'), tmp_path)
    try:
        assert t.wait_for(r'Saved weights/last\.pt at epoch 1, batch [1-9]'), t.text[-3000:]
    finally:
        t.kill()
    ck = load(tmp_path / 'weights' / 'last.pt')
    assert ck['epoch'] >= 1 and ck['optimizer'] is not None
    r = cli(['--resume', '--save-period-min', '60'], tmp_path)  # how often to save may change at a resume
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'Saved weights/last.pt at epoch' not in r.stdout
    assert epochs_of(tmp_path) == ['0/2', '1/2', '2/2']
    assert train_rows(tmp_path) == train_rows(reference)
    assert_same_weights(tmp_path, reference)


@pytest.mark.slow
def test_resume_auto_fresh_finished_unfinished_and_other_options(data32, sigterm_run, tmp_path, capsys):
    # an unfinished run of the same options resumes
    same = tmp_path / 'same'
    shutil.copytree(sigterm_run[0], same)
    r = cli(run_args(data32, '--resume', 'auto', '--workers', '1'), same)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r'--resume auto: resuming weights/last\.pt at epoch 1, batch \d+; workers from this command '
                     r'line', r.stdout), r.stdout[-3000:]
    assert epochs_of(same) == ['0/2', '1/2', '2/2']

    # ... and once finished, a requeue of the same command trains nothing and exits 0
    before = (same / 'weights' / 'last.pt').stat().st_mtime_ns, (same / 'results.txt').read_text()
    r = cli(run_args(data32, '--resume', 'auto'), same)
    assert r.returncode == 0 and '--resume auto: weights/last.pt is a finished run (3/3 epochs)' in r.stdout
    assert 'Starting training' not in r.stdout
    assert ((same / 'weights' / 'last.pt').stat().st_mtime_ns, (same / 'results.txt').read_text()) == before

    # other options over an unfinished run: a new run, the old one's files kept aside
    other = tmp_path / 'other'
    shutil.copytree(sigterm_run[0], other)
    old = load(other / 'weights' / 'last.pt')
    r = cli(run_args(data32, '--resume', 'auto', '--epochs', '1'), other)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r'unfinished run of other options \(epochs\); kept the old run as \S+last_replaced_', r.stdout)
    kept = list((other / 'weights').glob('last_replaced_*.pt'))
    assert len(kept) == 1 and load(kept[0])['batch'] == old['batch']
    assert [p.name.startswith('results_replaced_') for p in other.glob('results_replaced_*.txt')] == [True]
    assert epochs_of(other) == ['0/0']

    # a fresh folder starts a new run (the decision alone: the training is the one above)
    import train

    setup_logging()  # as train.main() does: the decision's line on stdout, whichever test ran before
    opt = train.parse_opt(run_args(data32, '--resume', 'auto', '--save-dir', str(tmp_path / 'fresh')))
    decided = resume.auto_resume(opt, train.option_defaults(), train.load_hyp(opt.hyp))
    assert decided.resume is False and decided.epochs == EPOCHS
    last = tmp_path / 'fresh' / 'weights' / 'last.pt'
    assert f'--resume auto: no {last}, starting a new run' in capsys.readouterr().out


def test_run_control_flags_and_one_collective_answer(monkeypatch):
    now = [0.0]
    control = RunControl(save_period_s=60, clock=lambda: now[0]).install()
    try:
        assert signal.getsignal(signal.SIGTERM) == control.request_stop
        assert not control.stop_requested and not control.save_due()
        now[0] = 61
        assert control.save_due()
        control.saved()
        assert not control.save_due()
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: the test process keeps running
        assert control.stop_requested and control.signum == signal.SIGUSR1
    finally:
        control.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    guard = FiniteGuard(torch.device('cpu'))
    assert guard.agree(0, 'x', stop=True, save=False) == (True, False)
    guard.record(3, torch.tensor(float('nan')), torch.zeros(4))
    with pytest.raises(Exception, match='non-finite loss at epoch 0, batch 3'):
        guard.agree(0, 'x', stop=True)


@pytest.mark.slow
def test_mid_epoch_resume_after_burn_in_keeps_the_optimizers_lr_and_accumulation(tmp_path, monkeypatch):
    # in-process, burn-in over after one batch and NBS 8 (batch 4: an optimizer step every 2 batches), so the
    # resumed step runs on the LR, momentum and weight decay the optimizer state holds mid-epoch, not burn-in's
    import train
    from utils.train import engine

    data = make_subset(tmp_path / 'data', 16, name='c16')
    monkeypatch.setattr(train, 'n_burn_in', lambda nb: 1)
    monkeypatch.setattr(train, 'NBS', 8)
    monkeypatch.setattr(engine, 'NBS', 8)
    args = ['--cfg', str(CFG), '--data', str(data), '--weights', str(TINY_WEIGHTS), '--img-size', '64', '--epochs',
            '3', '--batch-size', '4', '--device', 'cpu', '--workers', '0', '--notest', '--save-period', '2']
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert train.main(train.parse_opt(args + ['--save-dir', str(full)])) == 0

    real_save = train.save_checkpoint

    def save_then_crash(ckpt, path):  # what kill -9 right after the first mid-epoch save of epoch 1 leaves
        real_save(ckpt, path)
        if ckpt.get('batch') is not None and ckpt['epoch'] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, 'save_checkpoint', save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(train.parse_opt(args + ['--save-dir', str(part), '--save-period-min', '1e-9']))
    monkeypatch.setattr(train, 'save_checkpoint', real_save)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers went with the run
    ck = load(part / 'weights' / 'last.pt')
    assert (ck['epoch'], ck['batch'], ck['accumulate']) == (1, 1, 2)  # the step at ni = 4 (epoch 1, batch 0)
    hyp = train.load_hyp(ROOT / 'data' / 'hyp.scratch.yaml')
    lr1 = hyp['lr0'] * CosineLR(3, hyp['lrf'])(1)  # epoch 1's scheduled LR
    assert [g['lr'] for g in ck['optimizer']['param_groups']] == pytest.approx([lr1] * 3, rel=1e-3)
    assert train.main(train.parse_opt(['--resume', str(part / 'weights' / 'last.pt')])) == 0
    assert epochs_of(part) == ['0/2', '1/2', '2/2']
    assert train_rows(part) == train_rows(full)
    assert_same_weights(part, full)



@pytest.mark.slow
def test_sigterm_under_torchrun_every_rank_exits_0_and_resume_equals(tmp_path):
    # 2 gloo processes; SIGTERM to each training process (not the agent, which would exit 1 by torchrun's own
    # design after forwarding it): the agent's exit status 0 says every rank exited 0
    data = make_subset(tmp_path / 'data', 16, name='c16')
    args = ['--cfg', str(CFG), '--data', str(data), '--weights', str(TINY_WEIGHTS), '--img-size', '64', '--epochs',
            '3', '--batch-size', '4', '--device', 'cpu', '--workers', '1', '--notest', '--save-period', '2']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(TRAIN)]
    ref, run = tmp_path / 'ref', tmp_path / 'run'
    ref.mkdir(), run.mkdir()
    r = subprocess.run(torchrun + args, cwd=ref, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    t = Training(args, run, launcher=torchrun)
    try:
        assert t.wait_for(r'\s1/2\s'), t.text[-3000:]
        workers = [int(x) for x in Path(f'/proc/{t.proc.pid}/task/{t.proc.pid}/children').read_text().split()]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        rc = t.wait(120)
    finally:
        t.kill()
    assert rc == 0, t.text[-3000:]
    assert re.search(r'Stopped by SIGTERM in epoch 1, after \d/4 batches; saved weights/last\.pt\. Resume with: '
                     r'\S+ -m torch\.distributed\.run --nproc_per_node 2 \S+train\.py --resume \S+', t.text)
    ck = load(run / 'weights' / 'last.pt')
    assert ck['epoch'] == 1 and 0 < ck['batch'] < 4
    r = subprocess.run(torchrun + ['--resume', str(run / 'weights' / 'last.pt')], cwd=run, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert epochs_of(run) == ['0/2', '1/2', '2/2']
    assert train_rows(run) == train_rows(ref)
    assert_same_weights(run, ref)


@pytest.mark.slow
def test_engine_stops_at_an_optimizer_step_and_continues_from_it_exactly(tmp_path):
    # the loop alone on in-memory batches: a stop requested before the epoch is honoured at the first optimizer step
    # (accumulate 2: after batch 1), the pass ends there with the next batch and the running losses in its state, and
    # a pass started from that state ends with the same weights, state and mean losses as one that never stopped
    import copy

    from models import Darknet
    from tests.test_train import HYP, NO_BN_CFG
    from utils.train import engine
    from utils.train.loss import ComputeLoss

    cfg_path = tmp_path / 'nobn.cfg'
    cfg_path.write_text(NO_BN_CFG)
    torch.manual_seed(0)
    ref = Darknet(cfg_path, 64)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=gen),
                torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 2, 0.4, 0.6, 0.2, 0.4]]), ['x'] * 2, None)
               for _ in range(6)]
    cfg = engine.LoopConfig(hyp=HYP, lf=engine.CosineLR(1, HYP['lrf']), n_burn=-1, batch_size=2, epochs=1,
                            show=False)

    def epoch(model, control=None, optimizer_state=None, state=None):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        out = engine.train_one_epoch(model=model, loader=batches, optimizer=optimizer,
                                     scaler=torch.amp.GradScaler('cpu', enabled=False),
                                     compute_loss=ComputeLoss(model, HYP), ema=None, epoch=0,
                                     state=state or engine.LoopState(accumulate=2, img_size=64), cfg=cfg,
                                     control=control)
        return out, optimizer

    (full_state, full_stats), _ = epoch(a := copy.deepcopy(ref))
    control = RunControl()
    control.request_stop(signal.SIGTERM)
    (state, stats), optimizer = epoch(b := copy.deepcopy(ref), control=control)
    assert stats.stop and state.batch == 2 and state.last_opt_step == 1 and state.mloss is not None
    saved = copy.deepcopy(state)
    (state2, stats2), _ = epoch(b, optimizer_state=optimizer.state_dict(), state=saved)
    assert state2 == full_state and state2.batch == 0 and stats2.mloss == full_stats.mloss and not stats2.stop
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_resume_auto_knows_a_finished_run_renamed_by_name(tmp_path, capsys):
    # --name X renames the finished run's last.pt to last_X.pt: a requeue of the same command must not retrain
    import train

    (tmp_path / 'weights').mkdir()
    (tmp_path / 'weights' / 'last_x.pt').write_bytes(b'')
    setup_logging()  # as train.main() does
    opt = train.parse_opt(['--resume', 'auto', '--name', 'x', '--save-dir', str(tmp_path)])
    assert resume.auto_resume(opt, train.option_defaults(), train.load_hyp(opt.hyp)) is None
    assert f"{tmp_path / 'weights' / 'last_x.pt'} is a finished run (--name x)" in capsys.readouterr().out
    opt = train.parse_opt(['--resume', 'auto', '--name', 'y', '--save-dir', str(tmp_path)])
    # another name: nothing of this run yet
    assert resume.auto_resume(opt, train.option_defaults(), train.load_hyp(opt.hyp)).resume is False
