"""One command that proves the CUDA path: AMP training, host syncs per micro-step, channels_last vs contiguous,
SIGTERM + exact mid-epoch resume, kill -9 + --resume, torchrun (NCCL) with an elastic restart, test.py / detect.py in
fp32 and fp16, and throughput with the share of the card's peak, all inside a time budget.

    python benchmarks/gpu_check.py --pack                          # here, once: inputs into gpu_inputs/ (git-ignored)
    python benchmarks/gpu_check.py --device cpu --quick            # every step that does not need CUDA, tiny, ~1 min

On a lent GPU machine (one H200, 600 s a command, at most 8 files back from $OUT), one call of the device tool:

    run(command="python3 benchmarks/gpu_check.py --inputs gpu_inputs --budget 480 --out $OUT/gpu_check.json
                 --logs $OUT/gpu_check_logs.tar.gz", carry=["gpu_inputs"], timeout_s=560)

Two files come back, both rewritten after every step so a crash or a timeout keeps what ran: the JSON (machine,
per step: status pass | fail | skipped | running | pending, reason, seconds, the estimate, figures) and one archive
of every command's output. --budget SECONDS (default 480): a step whose estimate does not fit in what is left is
skipped ("budget: ..."), and no command runs past the budget; --estimates FILE takes the seconds of an earlier
JSON instead of the built-in estimates.

Inputs, no network needed: --data-dir (a coco128 folder: images/train2017, labels/train2017, coco.names),
--weights (the official yolov3-tiny.weights) and --samples (a folder with bus.jpg and zidane.jpg); they default to
../shared, or to gpu_inputs/ when ../shared is absent. `--pack` copies exactly those files (about 57 MiB) into
gpu_inputs/, checking that they and the checkout fit the 64 MiB that travels; `--inputs DIR` reads such a copy.

Every command runs as a user would type it, in a subprocess, in a temporary folder. Each step records pass, fail
(with the reason) or skipped (needs CUDA, needs a step that did not pass, or the budget) and the script goes on; the
exit status is 1 when any step failed. Where fp32 results are compared with fixed figures or with each other,
the command runs with TF32 off (benchmarks/gpu_probe.py run --no-tf32). Steps in the order they run (CUDA sizes;
--quick: 8 images at 64-128 px and at most 3 epochs):
  test_fp32, test_half    test.py at 416: mAP@0.5 0.423 +- 0.005 in fp32 (coco128, official weights), fp16 within 0.01
  detect_fp32, detect_half  detect.py on bus.jpg, zidane.jpg: a bus and persons, persons and a tie; --half finds
                          the same confident boxes (fp32 conf >= 0.5, same class, IoU >= 0.9, both ways)
  sync_debug              train.py under torch.cuda.set_sync_debug_mode('warn'): host syncs counted per micro-step
                          (none between optimizer steps, apart from the progress bar's read every 10th batch)
  channels_last           AMP fp16 training steps of yolov3-tiny and yolov3-spp at 416, batch 64: contiguous vs
                          channels_last images/s (on the CPU: bf16, 64 px)
  sigterm_resume          SIGTERM inside epoch 1 of 3, exit 0 within 60 s, then --resume: every epoch once and the
                          final weights equal an uninterrupted run (max |diff| < 1e-4, --deterministic)
  train_fp16, train_bf16  2-epoch fine-tune of yolov3-tiny on coco128 at 416 with --amp fp16 / bf16: finite losses,
                          one results.txt row per epoch, last.pt and best.pt load with torch.load(weights_only=True)
  kill9_resume            kill -9 during the second of 3 epochs, then --resume: epochs 0, 1, 2 in results.txt once
  torchrun                torch.distributed.run, one process per visible GPU (NCCL; 2 gloo processes on the CPU),
                          batch 8 x processes: trains and writes one set of checkpoints
  elastic                 torchrun --max-restarts 1, one worker SIGKILLed after the first epoch: the restarted
                          workers continue from weights/last.pt by themselves, every epoch once, exit status 0
  throughput_spp, throughput_tiny  training images/s at 416, batch 64, AMP fp16 (loader included), peak GPU
                          memory, MFU = forward FLOPs x 3 x images/s / the card's dense bf16 peak
  loader                  the mosaic training loader alone with all of the machine's cores (images/s)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
SHARED = Path(os.environ.get('YOLO_SHARED', ROOT.parent / 'shared')).resolve()
PACK_DIR = ROOT / 'gpu_inputs'  # git-ignored; `--pack` fills it
CFG_TINY = ROOT / 'cfg' / 'yolov3-tiny.cfg'
CFG_SPP = ROOT / 'cfg' / 'yolov3-spp.cfg'
MAP_FP32, MAP_TOL, HALF_TOL = 0.423, 0.005, 0.01  # test.py, coco128 at 416, official yolov3-tiny weights, CPU
SAMPLE_OBJECTS = {'bus': {'bus', 'person'}, 'zidane': {'person', 'tie'}}  # what the fp32 run must find
# dense (no sparsity) bf16 tensor-core peaks in TFLOPS, first match in the device name wins; V100 has no bf16: fp16
PEAK_TFLOPS = [('H100 PCIe', 756.0), ('H100', 989.0), ('H200', 989.0), ('A100', 312.0), ('V100', 125.0)]
GOAL_IMAGES_PER_S, GOAL_MFU = 1000.0, 0.35  # the speed goal: yolov3-spp at 416 on one H100 (the original: 122 on V100)
RESUMING = re.compile(r'^Resuming \S*last\.pt from epoch \d+', re.M)  # what train.py prints when it resumes
STEP_NAMES = ['test_fp32', 'test_half', 'detect_fp32', 'detect_half', 'sync_debug', 'channels_last', 'sigterm_resume',
              'train_fp16', 'kill9_resume', 'torchrun', 'elastic', 'train_bf16', 'throughput_spp', 'throughput_tiny',
              'loader']  # run order: the CUDA-path faults and preemption checks first, so a short budget keeps them
# seconds per step, (CUDA, --quick on the CPU): CUDA ones are estimates (nothing has run on a GPU yet: a JSON of a
# real run, passed as --estimates, replaces them); CPU ones measured on the 2-core machine, rounded up
ESTIMATES = {'test_fp32': (30, 5), 'test_half': (30, 1), 'detect_fp32': (15, 4), 'detect_half': (15, 1),
             'sync_debug': (50, 10), 'channels_last': (45, 7), 'sigterm_resume': (90, 30), 'train_fp16': (45, 1),
             'kill9_resume': (60, 12), 'torchrun': (40, 10), 'elastic': (70, 20), 'train_bf16': (45, 6),
             'throughput_spp': (60, 1), 'throughput_tiny': (40, 1), 'loader': (30, 4)}
CONFIDENT = 0.5  # detect_half compares boxes this confident; detect.py's threshold is 0.3 (see step_detect_half)
PROBE = BENCH_DIR / 'gpu_probe.py'

sys.path.insert(0, str(BENCH_DIR))
import bench  # noqa: E402  (benchmarks/ is not a package: its tqdm probe and parsers)
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # for utils.files (after benchmarks/, so its modules keep their names)
from utils.files import atomic_write  # noqa: E402
from subset import make_subset  # noqa: E402


class CheckFailed(Exception):
    """A step's check did not hold; the message is the reason recorded."""


class NeedsCuda(Exception):
    """The step needs a CUDA device (the message, if any, says what ran without one)."""


class Skip(Exception):
    """The step cannot run here; the message is the reason recorded."""


@dataclass
class Inputs:
    """Where the data, the weights and the sample images come from."""
    data_dir: Path  # coco128: images/train2017, labels/train2017, coco.names
    weights: Path  # yolov3-tiny.weights
    samples: Path  # bus.jpg, zidane.jpg

    def files(self) -> list[tuple[Path, str]]:
        """(source, path relative to a pack folder) of every input file."""
        out = [(self.weights, 'weights/yolov3-tiny.weights'), (self.data_dir / 'coco.names', 'coco128/coco.names')]
        out += [(self.samples / f'{s}.jpg', f'samples/{s}.jpg') for s in SAMPLE_OBJECTS]
        for sub in ('images', 'labels'):
            for f in sorted((self.data_dir / sub / 'train2017').glob('*')):
                out.append((f, f'coco128/{sub}/train2017/{f.name}'))
        return out

    def check(self) -> None:
        """One clear error naming the missing input."""
        need = [self.data_dir / 'images' / 'train2017', self.data_dir / 'labels' / 'train2017',
                self.data_dir / 'coco.names', self.weights] + [self.samples / f'{s}.jpg' for s in SAMPLE_OBJECTS]
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            raise SystemExit(f'gpu_check: missing input: {", ".join(missing)} (see --data-dir, --weights, --samples)')


def default_inputs(opt: argparse.Namespace) -> Inputs:
    """--data-dir/--weights/--samples, else --inputs (a pack folder), else ../shared, else gpu_inputs/."""
    base = opt.inputs or (None if SHARED.is_dir() or not PACK_DIR.is_dir() else PACK_DIR)
    if base is None:
        d = Inputs(SHARED / 'datasets' / 'coco128', SHARED / 'weights' / 'yolov3-tiny.weights', SHARED / 'samples')
    else:
        d = Inputs(base / 'coco128', base / 'weights' / 'yolov3-tiny.weights', base / 'samples')
    return Inputs(Path(opt.data_dir or d.data_dir).resolve(), Path(opt.weights or d.weights).resolve(),
                  Path(opt.samples or d.samples).resolve())


def checkout_bytes(root: Path = ROOT) -> int:
    """Bytes of what the device tool sends besides carried folders: tracked and untracked, not ignored, files."""
    r = subprocess.run(['git', 'ls-files', '-coz', '--exclude-standard'], cwd=root, capture_output=True, check=True)
    return sum((root / f).stat().st_size for f in r.stdout.decode().split('\0') if f and (root / f).is_file())


def pack(inputs: Inputs, dst: Path, limit_mib: float = 64.0, other_bytes: int = 0) -> int:
    """Copy exactly the inputs into dst (replacing an earlier pack); returns the bytes copied.

    other_bytes: what travels beside the pack (the checkout), counted against the same limit.
    """
    inputs.check()
    files = inputs.files()
    dst = dst.resolve()
    if any(dst == src or dst in src.resolve().parents for src, _ in files):
        raise SystemExit(f'gpu_check: --pack {dst} holds the inputs it would copy; pack into another folder')
    total = sum(src.stat().st_size for src, _ in files)
    if total + other_bytes > limit_mib * 2 ** 20:
        raise SystemExit(f'gpu_check: the inputs are {total / 2 ** 20:.1f} MiB and what travels beside them '
                         f'{other_bytes / 2 ** 20:.1f} MiB: over {limit_mib:.0f} MiB')
    shutil.rmtree(dst, ignore_errors=True)
    for src, rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / rel)
    return total


# ---------------------------------------------------------------------------------------------------------- set-up
@dataclass
class Ctx:
    """What every step needs: inputs, device, sizes, the work folder."""
    inputs: Inputs
    device: str  # 'cpu' or a CUDA index such as '0'
    quick: bool
    work: Path
    logs: Path | None = None
    n_gpus: int = 0
    data: Path = Path()  # .data over a symlinked copy of coco128 (caches land in work)
    n_images: int = 0
    n_targets: int = 0  # label rows of those images
    shared: dict = field(default_factory=dict)  # figures one step hands to a later one (test_fp32 -> test_half)
    deadline: float = math.inf  # time.monotonic() at which --budget runs out
    estimates: dict = field(default_factory=dict)  # step -> seconds it is expected to take here

    @property
    def timeout(self) -> float:
        """Seconds allowed to one command: a hang fails its step, and no command runs past the budget."""
        return max(1.0, min(90.0 if self.quick else 240.0, self.deadline - time.monotonic()))

    @property
    def cuda(self) -> bool:
        """True when the steps run on CUDA."""
        return self.device != 'cpu'

    def size(self, cuda_size: int = 416, quick_size: int = 64) -> int:
        """Image size of a training step."""
        return quick_size if self.quick else cuda_size


def run_cli(ctx: Ctx, name: str, cmd: list[str], cwd: Path, timeout: float, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run a command to completion (killed at timeout), its output saved as <logs>/<name>.log; returns it."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        r = subprocess.CompletedProcess(cmd, 124, out, err + f'\nTimeoutError: killed after {timeout:.0f} s')
    save_log(ctx, name, cmd, r.stdout + r.stderr)
    return r


def kill_tree(pid: int) -> None:
    """SIGKILL pid and every process under it. By pid, found before any dies: torchrun starts its workers in
    sessions of their own, so killing its process group would leave them running, re-parented to init."""
    tree, todo, found = bench._children_of(), [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += tree.get(p, [])
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def save_log(ctx: Ctx, name: str, cmd: list[str], text: str) -> None:
    """Keep a command's output under --logs."""
    if ctx.logs:
        ctx.logs.mkdir(parents=True, exist_ok=True)
        (ctx.logs / f'{name}.log').write_text(' '.join(map(str, cmd)) + '\n\n' + text)


def error_lines(text: str) -> str:
    """The last error a command printed (an 'XxxError: ...' line), else its last lines."""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r'^[\w.]*(Error|Exception|error)\b:?', x)]
    return (errors[-1] if errors else ' | '.join(lines[-3:]))[-600:]


def expect_rc0(r: subprocess.CompletedProcess, what: str) -> None:
    """A failed command is a failed check, with its last error as the reason."""
    if r.returncode:
        raise CheckFailed(f'{what} exited {r.returncode}: {error_lines(r.stdout + r.stderr)}')


def train_cmd(ctx: Ctx, *extra: str, epochs: int, cfg: Path = CFG_TINY, weights: str | None = None,
              batch: int | None = None, data: Path | None = None, size: int | None = None) -> list[str]:
    """train.py arguments for this machine (the script path first)."""
    batch = batch or (8 if ctx.quick else 16)
    # --notest: the last epoch is still tested; a test every epoch would double the time of these short runs.
    # --quick: 8 images, where worker start-up would be most of the time
    quick = ['--workers', '0', '--notest'] if ctx.quick else ['--notest']
    return [str(ROOT / 'train.py'), '--cfg', str(cfg), '--data', str(data or ctx.data),
            '--weights', str(ctx.inputs.weights) if weights is None else weights,
            '--img-size', str(size or ctx.size()),
            '--epochs', str(epochs), '--batch-size', str(batch), *quick, *extra]


# ----------------------------------------------------------------------------------------------------- run outputs
def results_rows(run: Path) -> list[list[str]]:
    """results.txt of a run as split rows (epoch 'i/n', mem, GIoU, obj, cls, total, targets, size, P, R, mAP...)."""
    f = run / 'results.txt'
    return [x.split() for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def check_epochs(run: Path, epochs: int) -> list[list[str]]:
    """results.txt holds epochs 0..epochs-1 once each, in order, with finite losses."""
    rows = results_rows(run)
    got = [r[0] for r in rows]
    want = [f'{i}/{epochs - 1}' for i in range(epochs)]
    if got != want:
        raise CheckFailed(f'results.txt epochs {got}, expected {want}')
    bad = [r[0] for r in rows if not all(math.isfinite(float(x)) for x in r[2:6] + r[-3:])]
    if bad:
        raise CheckFailed(f'non-finite losses in results.txt at epochs {bad}')
    return rows


def check_checkpoints(run: Path, epochs: int) -> dict:
    """weights/last.pt and best.pt load with weights_only=True; last.pt is the final epoch; finite tensors."""
    import torch
    out = {}
    for name in ('last.pt', 'best.pt'):
        f = run / 'weights' / name
        if not f.exists():
            raise CheckFailed(f'{f} missing')
        try:
            ck = torch.load(f, map_location='cpu', weights_only=True)
        except Exception as e:  # noqa: BLE001  (any unpickling error is the finding)
            raise CheckFailed(f'{f} does not load with weights_only=True: {e}') from None
        bad = [k for k, v in ck['model'].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckFailed(f'{f}: non-finite tensors {bad[:3]}')
        out[name] = ck['epoch']
    if out['last.pt'] != epochs - 1:
        raise CheckFailed(f"last.pt is epoch {out['last.pt']}, expected {epochs - 1}")
    return out


def checkpoint_files(run: Path) -> list[str]:
    """Every .pt file under a run folder, relative."""
    return sorted(str(p.relative_to(run)) for p in run.rglob('*.pt'))


# ----------------------------------------------------------------------------------------------------------- steps
def step_train_amp(ctx: Ctx, amp: str) -> dict:
    """2 epochs with --amp fp16/bf16: finite losses, a results.txt row per epoch, checkpoints load weights_only."""
    if amp == 'fp16' and not ctx.cuda:
        raise NeedsCuda
    run, epochs = ctx.work / f'train_{amp}', 2
    r = run_cli(ctx, f'train_{amp}', [sys.executable, *train_cmd(ctx, '--amp', amp, '--device', ctx.device,
                                                                 '--save-dir', str(run), epochs=epochs)],
                ctx.work, ctx.timeout)
    expect_rc0(r, f'train.py --amp {amp}')
    rows = check_epochs(run, epochs)
    ck = check_checkpoints(run, epochs)
    return {'total_loss': [float(x[5]) for x in rows],
            'mAP50': [float(x[10]) for x in rows], 'checkpoint_epochs': ck}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    """Poll until path exists; fail when the process ends first or time runs out."""
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise CheckFailed(f'the run exited ({proc.returncode}) before writing {path.name}')
        if time.time() > deadline:
            raise CheckFailed(f'no {path.name} after {timeout:.0f} s')
        time.sleep(0.05)


def step_kill9_resume(ctx: Ctx) -> dict:
    """kill -9 during the second of 3 epochs, then `train.py --resume`: epochs 0, 1, 2 once each."""
    run, epochs = ctx.work / 'kill9', 3
    run.mkdir()
    cmd = [sys.executable, *train_cmd(ctx, '--device', ctx.device, epochs=epochs)]
    with open(run / 'killed_run.log', 'w') as log:
        proc = subprocess.Popen(cmd, cwd=run, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(run / 'weights' / 'last.pt', proc, ctx.timeout)
            time.sleep(0.2)  # into the second epoch
            finished = proc.poll() is not None
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
            proc.wait()
            save_log(ctx, 'kill9_killed_run', cmd, (run / 'killed_run.log').read_text(errors='replace'))
    rows_at_kill = len(results_rows(run))
    if finished or rows_at_kill >= epochs:
        raise CheckFailed('the run finished before the kill: nothing to resume')
    import torch
    killed_epoch = torch.load(run / 'weights' / 'last.pt', map_location='cpu', weights_only=True)['epoch']
    r = run_cli(ctx, 'kill9_resume', [sys.executable, str(ROOT / 'train.py'), '--resume'], run, ctx.timeout)
    expect_rc0(r, 'train.py --resume')
    if not RESUMING.search(r.stdout):
        raise CheckFailed('train.py --resume did not say it was resuming')
    check_epochs(run, epochs)
    check_checkpoints(run, epochs)
    return {'killed_after_epoch': killed_epoch, 'rows_at_kill': rows_at_kill}


def _torchrun(ctx: Ctx, nproc: int, epochs: int, *extra: str) -> list[str]:
    """torch.distributed.run command line for this machine's devices (rank i takes the i-th listed GPU).

    --batch-size is the total of all ranks: 8 per process, so any number of GPUs (3, 5, 6, 7) divides it.
    """
    devices = ','.join(str(i) for i in range(nproc)) if ctx.cuda else 'cpu'
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), *extra,
            *train_cmd(ctx, '--device', devices, epochs=epochs, batch=8 * nproc)]


def _nproc(ctx: Ctx) -> int:
    """One process per visible GPU; 2 gloo processes on the CPU."""
    return ctx.n_gpus if ctx.cuda else 2


def _nccl_env(ctx: Ctx) -> dict:
    """NCCL_DEBUG=INFO on CUDA: NCCL then prints 'NCCL INFO' lines, the proof that it carried the all-reduces."""
    return {'NCCL_DEBUG': 'INFO'} if ctx.cuda else {}


def step_torchrun(ctx: Ctx) -> dict:
    """One process per GPU (NCCL) or 2 on the CPU (gloo): trains and writes one set of checkpoints."""
    run, nproc, epochs = ctx.work / 'torchrun', _nproc(ctx), 1 if ctx.quick else 2
    cmd = _torchrun(ctx, nproc, epochs)
    r = run_cli(ctx, 'torchrun', cmd, run, ctx.timeout, env=_nccl_env(ctx))
    expect_rc0(r, f'torchrun --nproc_per_node {nproc} train.py')
    if ctx.cuda and 'NCCL INFO' not in r.stdout + r.stderr:
        raise CheckFailed('no NCCL INFO lines: the process group did not use NCCL')
    check_epochs(run, epochs)
    check_checkpoints(run, epochs)
    pts = checkpoint_files(run)
    if pts != ['weights/best.pt', 'weights/last.pt']:
        raise CheckFailed(f'checkpoints written: {pts}, expected one set (weights/best.pt, weights/last.pt)')
    return {'processes': nproc, 'backend': 'nccl' if ctx.cuda else 'gloo'}


def _workers_of(pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the train.py processes under pid (torchrun's workers, not their DataLoader workers)."""
    tree, todo, ranks, parent = bench._children_of(), [pid], {}, {}
    while todo:
        p = todo.pop()
        for c in tree.get(p, []):
            parent[c] = p
            todo.append(c)
        try:
            cmdline = Path(f'/proc/{p}/cmdline').read_bytes().split(b'\0')
            env = dict(x.split(b'=', 1) for x in Path(f'/proc/{p}/environ').read_bytes().split(b'\0') if b'=' in x)
        except OSError:
            continue
        if b'LOCAL_RANK' in env and any(x.endswith(b'train.py') for x in cmdline):
            ranks[p] = int(env[b'LOCAL_RANK'])  # the agent has no LOCAL_RANK; forked DataLoader workers inherit it
    return {r: p for p, r in ranks.items() if parent.get(p) not in ranks}


def step_elastic(ctx: Ctx) -> dict:
    """torchrun --max-restarts 1; one worker SIGKILLed after the first epoch; every epoch once, exit 0."""
    run, nproc, epochs = ctx.work / 'elastic', _nproc(ctx), 2 if ctx.quick else 3
    run.mkdir()
    cmd = _torchrun(ctx, nproc, epochs, '--max-restarts', '1')
    with open(run / 'torchrun.log', 'w') as log:
        proc = subprocess.Popen(cmd, cwd=run, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, 'PYTHONUNBUFFERED': '1', **_nccl_env(ctx)})
        try:
            _wait_for(run / 'weights' / 'last.pt', proc, ctx.timeout)
            workers = _workers_of(proc.pid)
            if not workers:
                raise CheckFailed('no train.py worker found under torchrun')
            rank = max(workers)  # a non-zero rank where there are several: rank 0 writes the checkpoints
            time.sleep(0.2)  # into the second epoch
            rows_at_kill = len(results_rows(run))
            os.kill(workers[rank], signal.SIGKILL)
            try:
                proc.wait(timeout=ctx.timeout)
            except subprocess.TimeoutExpired:
                raise CheckFailed(f'torchrun did not finish within {ctx.timeout:.0f} s of the kill: '
                                  f"{error_lines((run / 'torchrun.log').read_text(errors='replace'))}") from None
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
            save_log(ctx, 'elastic', cmd, (run / 'torchrun.log').read_text(errors='replace'))
    text = (run / 'torchrun.log').read_text(errors='replace')
    if rows_at_kill >= epochs:
        raise CheckFailed('the run finished before the kill')
    if proc.returncode:
        raise CheckFailed(f'torchrun exited {proc.returncode} after the worker of local rank {rank} was killed: '
                          f'{error_lines(text)}')
    check_epochs(run, epochs)
    check_checkpoints(run, epochs)
    if not RESUMING.search(text):
        raise CheckFailed('the restarted workers did not say they resumed from weights/last.pt')
    return {'processes': nproc, 'killed_local_rank': rank, 'rows_at_kill': rows_at_kill}


def _test_cmd(ctx: Ctx, *extra: str) -> list[str]:
    """test.py on the dataset at 416 (128 in --quick), the official weights."""
    return [sys.executable, str(ROOT / 'test.py'), '--cfg', str(CFG_TINY), '--data', str(ctx.data), '--weights',
            str(ctx.inputs.weights), '--img-size', str(ctx.size(416, 128)), '--batch-size', '16', '--conf-thres',
            '0.001', '--iou-thres', '0.6', '--device', ctx.device, *extra]


def step_test_fp32(ctx: Ctx) -> dict:
    """test.py in fp32: counts the dataset's images and labels; mAP@0.5 0.423 +- 0.005 on coco128 at 416."""
    # --half off: fp32 on any device (the default is bf16 on a CPU with native bf16, as in --device cpu --quick);
    # TF32 off: the expected figure is the CPU's IEEE fp32 one
    r = run_cli(ctx, 'test_fp32', strict_fp32(_test_cmd(ctx, '--half', 'off', '--save-dir',
                                                        str(ctx.work / 'test_fp32'))), ctx.work, ctx.timeout)
    expect_rc0(r, 'test.py')
    row = bench.parse_all_row(r.stdout)
    if not row:
        raise CheckFailed("no 'all' row in test.py's output")
    if (row['images'], row['targets']) != (ctx.n_images, ctx.n_targets):
        raise CheckFailed(f"test.py counted {row['images']} images, {row['targets']} targets; the dataset has "
                          f'{ctx.n_images}, {ctx.n_targets}')
    ctx.shared['mAP50_fp32'] = row['mAP50']
    if not ctx.quick and abs(row['mAP50'] - MAP_FP32) > MAP_TOL:
        raise CheckFailed(f"mAP@0.5 {row['mAP50']:.3f}, expected {MAP_FP32} +- {MAP_TOL}")
    return {**row, 'expected': None if ctx.quick else f'{MAP_FP32} +- {MAP_TOL}'}


def step_test_half(ctx: Ctx) -> dict:
    """test.py --half on CUDA: mAP@0.5 within 0.01 of fp32."""
    if not ctx.cuda:
        raise NeedsCuda
    if 'mAP50_fp32' not in ctx.shared:
        raise Skip('needs test_fp32, which gave no figure')
    r = run_cli(ctx, 'test_half', _test_cmd(ctx, '--half', '--save-dir', str(ctx.work / 'test_half')), ctx.work,
                ctx.timeout)
    expect_rc0(r, 'test.py --half')
    row = bench.parse_all_row(r.stdout)
    if not row:
        raise CheckFailed("no 'all' row in the fp16 test output")
    diff = row['mAP50'] - ctx.shared['mAP50_fp32']
    if abs(diff) > HALF_TOL:
        raise CheckFailed(f"fp16 mAP@0.5 {row['mAP50']:.3f} vs fp32 {ctx.shared['mAP50_fp32']:.3f}: "
                          f'differs by more than {HALF_TOL}')
    return {**row, 'mAP50_fp32': ctx.shared['mAP50_fp32'], 'difference': diff}


def strict_fp32(cmd: list[str]) -> list[str]:
    """[python, script, args...] run through gpu_probe.py with TF32 off (fp32 compared with fp32 figures)."""
    return [cmd[0], str(PROBE), 'run', '--no-tf32', '--', *cmd[1:]]


def _detect(ctx: Ctx, name: str, *extra: str, strict: bool = False) -> dict[str, list[list[float]]]:
    """detect.py --save-txt --save-conf on the two samples at 416; stem -> [[class, x, y, w, h, conf], ...]."""
    out = ctx.work / name
    cmd = [sys.executable, str(ROOT / 'detect.py'), '--cfg', str(CFG_TINY), '--weights', str(ctx.inputs.weights),
           '--names', str(ctx.inputs.data_dir / 'coco.names'), '--source', str(ctx.inputs.samples), '--output',
           str(out), '--img-size', '416', '--save-txt', '--save-conf', '--device', ctx.device, *extra]
    r = run_cli(ctx, name, strict_fp32(cmd) if strict else cmd, ctx.work, ctx.timeout)
    expect_rc0(r, 'detect.py ' + ' '.join(extra))
    return {s: [[float(v) for v in x.split()] for x in (out / f'{s}.txt').read_text().splitlines() if x.strip()]
            if (out / f'{s}.txt').exists() else [] for s in SAMPLE_OBJECTS}


def _names(ctx: Ctx) -> list[str]:
    """The class names, one a line."""
    return [x.strip() for x in (ctx.inputs.data_dir / 'coco.names').read_text().splitlines() if x.strip()]


def _counts(ctx: Ctx, dets: list[list[float]]) -> dict[str, int]:
    """Class name -> number of detections."""
    names, out = _names(ctx), {}
    for d in dets:
        out[names[int(d[0])]] = out.get(names[int(d[0])], 0) + 1
    return dict(sorted(out.items()))


def step_detect_fp32(ctx: Ctx) -> dict:
    """detect.py finds a bus and persons in bus.jpg, persons and a tie in zidane.jpg."""
    dets = _detect(ctx, 'detect_fp32', '--half', 'off', strict=True)
    ctx.shared['detect_fp32'] = dets
    counts = {s: _counts(ctx, d) for s, d in dets.items()}
    for stem, want in SAMPLE_OBJECTS.items():
        if not want <= set(counts[stem]):
            raise CheckFailed(f'{stem}.jpg: found {counts[stem]}, expected at least {sorted(want)}')
    return {'objects': counts}


def _iou_xywh(a: list[float], b: list[float]) -> float:
    """IoU of two normalised (x, y, w, h) boxes."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-12)


def match_confident(ref: list[list[float]], other: list[list[float]], conf: float = CONFIDENT) -> tuple[int, float]:
    """(boxes of ref with confidence >= conf, the lowest IoU of one of them with its best box of the same class in
    other); rows are [class, x, y, w, h, conf]. 1.0 when none is confident, 0.0 when one has no match."""
    confident = [d for d in ref if d[5] >= conf]
    worst = min((max((_iou_xywh(d[1:5], o[1:5]) for o in other if o[0] == d[0]), default=0.0) for d in confident),
                default=1.0)
    return len(confident), worst


def step_detect_half(ctx: Ctx) -> dict:
    """detect.py --half on CUDA finds the confident fp32 boxes, and its confident boxes are fp32 boxes (IoU 0.9).

    Only boxes with confidence >= CONFIDENT (0.5) are compared: detect.py keeps boxes from 0.3 up, and a box near
    that threshold can fall either side of it under fp16's rounding (about 1e-3 relative), as can the choice NMS
    makes between two overlapping boxes of near-equal score; 0.2 above the threshold, neither happens.
    """
    if not ctx.cuda:
        raise NeedsCuda
    ref = ctx.shared.get('detect_fp32')
    if ref is None:
        raise Skip('needs detect_fp32, which gave no detections')
    half = _detect(ctx, 'detect_half', '--half')
    worst, compared = 1.0, 0
    for stem in SAMPLE_OBJECTS:
        for a, b, what in ((ref[stem], half[stem], 'fp32 box has no fp16'), (half[stem], ref[stem],
                                                                            'fp16 box has no fp32')):
            n, iou = match_confident(a, b)
            compared += n
            if iou < 0.9:
                raise CheckFailed(f'{stem}.jpg: a confident {what} box of its class at IoU >= 0.9 (best {iou:.2f})')
            worst = min(worst, iou)
    if compared == 0:
        raise CheckFailed(f'no box with confidence >= {CONFIDENT} to compare')
    return {'objects': {s: _counts(ctx, d) for s, d in half.items()}, 'confident_boxes_compared': compared,
            'confidence_threshold': CONFIDENT, 'min_iou_vs_fp32': worst}


def step_loader(ctx: Ctx) -> dict:
    """The mosaic training loader alone, with every core of the machine as workers: images/s."""
    import bench_loader
    workers = 2 if ctx.quick else (os.cpu_count() or 1)
    size, batch, epochs = ctx.size(416, 128), (8 if ctx.quick else 64), (1 if ctx.quick else 2)
    images = ctx.data.parent / 'images'
    if not ctx.quick and 'x8' in ctx.shared:  # the 1024 images of the throughput steps: 16 batches of 64 an epoch
        images = ctx.shared['x8'].parent / 'images'
    r = bench_loader.loader_figures(ROOT, data=images, img_size=size, batch_size=batch, workers=workers,
                                    epochs=epochs)
    n = len(list(images.glob('*.jpg')))
    if r['images'] != n * epochs:
        raise CheckFailed(f"the loader delivered {r['images']} images in {epochs} epochs of {n}")
    return {'images_per_s': r['images_per_s'], 'workers': workers, 'img_size': size, 'batch_size': batch,
            'images': r['images'], 'timed_s': r['seconds']}


def gpu_name(ctx: Ctx) -> str:
    """Name of the CUDA device the steps run on."""
    import torch
    return torch.cuda.get_device_name(int(ctx.device.split(',')[0]) if ctx.device.split(',')[0].isdigit() else 0)


def device_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a card by name (None when unknown)."""
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


def step_throughput(ctx: Ctx, cfg: Path) -> dict:
    """train.py at 416, batch 64, AMP fp16 on 1024 images (coco128 x 8): images/s, peak memory, MFU.

    --quick: 128 px, batch 16, 64 images (8 x 8).
    """
    if not ctx.cuda:
        raise NeedsCuda
    sys.path.insert(0, str(ROOT))
    from models import Darknet
    data, n, size, batch = ctx.shared['x8'], ctx.shared['x8_images'], ctx.size(416, 128), 16 if ctx.quick else 64
    weights = str(ctx.inputs.weights) if cfg == CFG_TINY else ''  # spp from scratch: the speed is the same
    argv = train_cmd(ctx, '--amp', 'fp16', '--notest', '--nosave', '--device', ctx.device, epochs=2, cfg=cfg,
                     weights=weights, batch=batch, data=data, size=size)[1:]
    if ctx.quick:  # the loader's worker count as in a full run, not the --quick 0
        del argv[argv.index('--workers'):argv.index('--workers') + 3]
    run = ctx.work / f'throughput_{cfg.stem}'
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    try:
        meter, loops, text = bench.run_script(ROOT, 'train.py', argv, False, run, env, ctx.timeout)
    except RuntimeError as e:
        raise CheckFailed(str(e).splitlines()[0] + ' ' + ' | '.join(str(e).splitlines()[-3:])) from None
    finally:
        out = run / 'output.txt'
        save_log(ctx, f'throughput_{cfg.stem}', argv, out.read_text(errors='replace') if out.exists() else '')
    nb = n // batch
    epochs = [x for x in loops if x['total'] == nb and len(x['t']) == nb + 1 and x['end']]
    if len(epochs) < 2:
        raise CheckFailed(f'found {len(epochs)} training loops of {nb} batches, expected 2')
    last = epochs[1]  # the second epoch; its first batch excluded (first-iteration allocations, loader start)
    rate = (nb - 1) * batch / (last['end'] - last['t'][2])
    gflops = Darknet(str(cfg)).gflops(size)  # forward, multiply-adds counted as 2 FLOPs
    name = gpu_name(ctx)
    peak = device_peak_tflops(name)
    mem = json.loads((run / 'loops.jsonl.cuda.json').read_text()) if (run / 'loops.jsonl.cuda.json').exists() else {}
    mfu = gflops * 1e9 * 3 * rate / (peak * 1e12) if peak else None
    return {'model': cfg.stem, 'img_size': size, 'batch_size': batch, 'images_per_s': rate,
            'epoch_s': last['end'] - last['t'][0],
            'peak_gpu_memory_gb': mem.get('max_allocated', float('nan')) / 1e9,
            'gflops_per_image_forward': gflops, 'device': name, 'peak_tflops_bf16': peak, 'mfu': mfu,
            'goal': f'>= {GOAL_IMAGES_PER_S:.0f} images/s and >= {GOAL_MFU:.0%} MFU (yolov3-spp, one H100)'}


def sync_summary(events: list[list]) -> dict:
    """Host syncs per micro-step from gpu_probe.py's events (['epoch_start'], ['loss'], ['step'], ['sync', where],
    ['epoch_end']).

    A micro-step runs from one loss call to the next, so it holds its backward, its optimizer step if any, and the
    next batch's copy to the device. The last micro-step of an epoch also holds the epoch's closing reads: it is
    counted apart, as are the syncs before an epoch's first loss call.
    """
    plain, at_step, ends, starts, where = [], [], [], [], {}
    cur: list | None = None  # [syncs, optimizer step?] of the micro-step in progress
    for e in events:
        if e[0] == 'epoch_start':
            cur = None
            starts.append(0)
        elif e[0] == 'loss':
            if cur is not None:
                (at_step if cur[1] else plain).append(cur[0])
            cur = [0, False]
        elif e[0] == 'step' and cur is not None:
            cur[1] = True
        elif e[0] == 'sync':
            where[e[1]] = where.get(e[1], 0) + 1
            if cur is not None:
                cur[0] += 1
            elif starts:
                starts[-1] += 1
        elif e[0] == 'epoch_end':
            if cur is not None:
                ends.append(cur[0])
            cur = None
    n_steps = sum(e[0] == 'step' for e in events)
    return {'micro_steps': sum(e[0] == 'loss' for e in events), 'optimizer_steps': n_steps,
            'plain_micro_steps': len(plain), 'plain_with_sync': sum(x > 0 for x in plain),
            'syncs_per_plain_micro_step': sum(plain) / len(plain) if plain else None,
            'syncs_per_optimizer_step': sum(at_step) / len(at_step) if at_step else None,
            'epoch_start_syncs': starts, 'epoch_end_syncs': ends, 'total_syncs': sum(where.values()),
            'where': dict(sorted(where.items(), key=lambda kv: -kv[1])[:10])}


SYNC_ALLOWANCE = 0.1  # syncs per plain micro-step: the progress bar reads the losses every 10th batch on CUDA


def step_sync_debug(ctx: Ctx) -> dict:
    """train.py with every epoch under torch.cuda.set_sync_debug_mode('warn'): no host sync between optimizer steps.

    Batch 4: accumulation (64 / batch after burn-in) rises above 1 after 17 batches, so most micro-steps of the
    64 (2 epochs of coco128 at 320) have no optimizer step. On the CPU the probe runs too (its wiring: micro-steps
    and optimizer steps seen), but no sync can be counted there.
    """
    run = ctx.work / 'sync_debug'
    report = run / 'sync_events.json'
    epochs, batch, size = (1, 2, 64) if ctx.quick else (2, 4, 320)
    cmd = [sys.executable, str(PROBE), 'run', '--sync-report', str(report), '--',
           *train_cmd(ctx, '--device', ctx.device, '--nosave', '--save-dir', str(run), epochs=epochs, batch=batch,
                      size=size)]
    r = run_cli(ctx, 'sync_debug', cmd, ctx.work, ctx.timeout)
    expect_rc0(r, 'train.py under the sync counter')
    if not report.exists():
        raise CheckFailed('gpu_probe.py wrote no events: train_one_epoch was not reached through utils.engine')
    data = json.loads(report.read_text())
    summ = sync_summary(data['events'])
    if summ['micro_steps'] == 0 or summ['optimizer_steps'] == 0:
        raise CheckFailed(f"the probe saw {summ['micro_steps']} loss calls and {summ['optimizer_steps']} optimizer "
                          f'steps: its wiring (ComputeLoss.__call__, GradScaler.step) missed the loop')
    if not data['cuda']:
        raise NeedsCuda(f"wiring ran on the CPU: {summ['micro_steps']} micro-steps, {summ['optimizer_steps']} "
                        f'optimizer steps seen')
    if summ['total_syncs'] == 0:  # the loss check reads a flag at every optimizer step: the counter must see it
        raise CheckFailed('no sync recorded at all: the sync debug mode did not report')
    if not summ['plain_micro_steps']:
        raise CheckFailed('every micro-step had an optimizer step: nothing to check')
    if summ['syncs_per_plain_micro_step'] > SYNC_ALLOWANCE:
        raise CheckFailed(f"{summ['syncs_per_plain_micro_step']:.2f} host syncs per micro-step without an optimizer "
                          f"step (allowed {SYNC_ALLOWANCE}); where: {summ['where']}")
    return {**summ, 'allowance': SYNC_ALLOWANCE, 'img_size': size, 'batch_size': batch}


def train_py_channels_last(ctx: Ctx) -> bool:
    """train.py's layout choice for this device with the AMP dtype the probe measures (utils.torch_utils)."""
    import torch
    sys.path.insert(0, str(ROOT))
    from utils.torch_utils import use_channels_last
    if ctx.cuda:
        return use_channels_last(torch.device('cuda', int(ctx.device.split(',')[0])), torch.float16)
    return use_channels_last(torch.device('cpu'), torch.bfloat16)


LAYOUT_TOL = 0.05  # train.py's layout may be this much slower than the other before channels_last fails


def step_channels_last(ctx: Ctx) -> dict:
    """AMP training steps (fp16 on CUDA, bf16 on the CPU), contiguous vs channels_last: images/s of each format.

    gpu_probe.py memfmt, one process for both models: 20 steps of batch 64 at 416 after 5 warm-up steps on CUDA;
    --quick on the CPU: yolov3-tiny, 2 steps of batch 2 at 64 px (checks the probe runs, not a speed). Fails when
    the layout train.py picks (utils.torch_utils.use_channels_last) is over 5% slower than the other on a model.
    """
    out = ctx.work / 'memfmt.json'
    cfgs, size, batch, steps = ([CFG_TINY], 64, 2, 2) if ctx.quick and not ctx.cuda else \
        ([CFG_TINY, CFG_SPP], ctx.size(416, 128), ctx.size(64, 16), ctx.size(20, 5))
    cmd = [sys.executable, str(PROBE), 'memfmt', '--cfg', *map(str, cfgs), '--img-size', str(size), '--batch',
           str(batch), '--steps', str(steps), '--device', ctx.device.split(',')[0], '--out', str(out)]
    r = run_cli(ctx, 'channels_last', cmd, ctx.work, ctx.timeout)
    expect_rc0(r, 'gpu_probe.py memfmt')
    res = json.loads(out.read_text())
    bad = [m for m, v in res['models'].items() if not (v['contiguous'] > 0 and v['channels_last'] > 0)]
    if bad:
        raise CheckFailed(f'no positive images/s for {bad}')
    chosen = 'channels_last' if train_py_channels_last(ctx) else 'contiguous'
    other = 'contiguous' if chosen == 'channels_last' else 'channels_last'
    slower = {m: round(v[other] / v[chosen], 3) for m, v in res['models'].items()
              if v[other] > v[chosen] * (1 + LAYOUT_TOL)}
    if slower and not ctx.quick:  # --quick times 2 steps at 64 px: noise, not a speed
        raise CheckFailed(f"train.py trains in {chosen} here, but {other} measured faster: {slower} (x its speed)")
    return {**res, 'train_py_layout': chosen, 'other_faster_by': slower}


def max_state_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the floating-point tensors of two state dicts (inf when their keys or shapes differ)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return math.inf
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a
                if a[k].is_floating_point() and a[k].numel()), default=0.0)


def step_sigterm_resume(ctx: Ctx) -> dict:
    """SIGTERM inside epoch 1, exit 0 within 60 s with a resume hint; `--resume` ends with the weights of an
    uninterrupted run of the same seed (max |diff| < 1e-4).

    Both runs: --deterministic, TF32 off, 2 loader workers, the uninterrupted one beside the interrupted one.
    3 epochs of coco128 at 320, batch 8 (16 batches an epoch); --quick: 2 epochs of 8 images at 64, batch 2.
    """
    if '--save-period-min' not in (ROOT / 'train.py').read_text():
        raise Skip('train.py has no --save-period-min yet: no preemption save to check')
    import torch
    run, ref = ctx.work / 'sigterm', ctx.work / 'sigterm_ref'
    epochs, batch, size = (2, 2, 64) if ctx.quick else (3, 8, 320)
    args = train_cmd(ctx, '--device', ctx.device, '--deterministic', '--seed', '0', epochs=epochs, batch=batch,
                     size=size)
    if '--workers' in args:
        args[args.index('--workers') + 1] = '2'
    else:
        args += ['--workers', '2']
    cmd = strict_fp32([sys.executable, *args])
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'CUBLAS_WORKSPACE_CONFIG': ':4096:8'}
    for d in (run, ref):
        d.mkdir()
    with open(run / 'sigterm_run.log', 'w') as log, open(ref / 'ref_run.log', 'w') as ref_log:
        ref_proc = subprocess.Popen(cmd, cwd=ref, stdout=ref_log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        proc = subprocess.Popen(cmd, cwd=run, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_for(run / 'results.txt', proc, ctx.timeout)  # epoch 0 done: epoch 1 is starting
            os.kill(proc.pid, signal.SIGTERM)  # the main process only, as SLURM's scancel --signal=TERM --batch
            t0 = time.monotonic()
            try:
                rc = proc.wait(timeout=min(60.0, ctx.timeout))
            except subprocess.TimeoutExpired:
                raise CheckFailed('train.py did not exit within 60 s of SIGTERM') from None
            exit_s = time.monotonic() - t0
            ref_proc.wait(timeout=ctx.timeout)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f'the uninterrupted run did not finish within {ctx.timeout:.0f} s') from None
        finally:
            for pr in (proc, ref_proc):
                if pr.poll() is None:
                    kill_tree(pr.pid)
                    pr.wait()
            save_log(ctx, 'sigterm_run', cmd, (run / 'sigterm_run.log').read_text(errors='replace'))
            save_log(ctx, 'sigterm_ref', cmd, (ref / 'ref_run.log').read_text(errors='replace'))
    text = (run / 'sigterm_run.log').read_text(errors='replace')
    if rc != 0:
        raise CheckFailed(f'train.py exited {rc} on SIGTERM: {error_lines(text)}')
    hint = [x.strip() for x in text.splitlines() if '--resume' in x]
    if not hint:
        raise CheckFailed('train.py printed no line saying how to resume (with --resume)')
    ck = torch.load(run / 'weights' / 'last.pt', map_location='cpu', weights_only=True)
    saved_at = {'epoch': ck.get('epoch'), 'batch': ck.get('batch')}
    if ref_proc.returncode:
        raise CheckFailed(f"the uninterrupted run exited {ref_proc.returncode}: "
                          f"{error_lines((ref / 'ref_run.log').read_text(errors='replace'))}")
    r = run_cli(ctx, 'sigterm_resume', strict_fp32([sys.executable, str(ROOT / 'train.py'), '--resume']), run,
                ctx.timeout, env={'CUBLAS_WORKSPACE_CONFIG': ':4096:8'})
    expect_rc0(r, 'train.py --resume after SIGTERM')
    check_epochs(run, epochs)
    a = torch.load(run / 'weights' / 'last.pt', map_location='cpu', weights_only=True)['model']
    b = torch.load(ref / 'weights' / 'last.pt', map_location='cpu', weights_only=True)['model']
    diff = max_state_diff(a, b)
    if not diff < 1e-4:
        raise CheckFailed(f'resumed weights differ from the uninterrupted run by {diff:.3g} (saved at {saved_at})')
    return {'exit_s': round(exit_s, 1), 'saved_at': saved_at, 'resume_hint': hint[-1][:200],
            'max_weight_diff': diff}


STEPS: dict[str, Callable[[Ctx], dict]] = {
    'sync_debug': step_sync_debug,
    'channels_last': step_channels_last,
    'sigterm_resume': step_sigterm_resume,
    'train_fp16': lambda c: step_train_amp(c, 'fp16'),
    'train_bf16': lambda c: step_train_amp(c, 'bf16'),
    'kill9_resume': step_kill9_resume,
    'torchrun': step_torchrun,
    'elastic': step_elastic,
    'test_fp32': step_test_fp32,
    'test_half': step_test_half,
    'detect_fp32': step_detect_fp32,
    'detect_half': step_detect_half,
    'loader': step_loader,
    'throughput_tiny': lambda c: step_throughput(c, CFG_TINY),
    'throughput_spp': lambda c: step_throughput(c, CFG_SPP),
}


def run_step(ctx: Ctx, name: str) -> dict:
    """Run one step unless its estimate exceeds what is left of the budget; {'step', 'status': pass | fail |
    skipped, 'reason', 'seconds', 'estimate_s', figures...}."""
    est, left = ctx.estimates.get(name, 0.0), ctx.deadline - time.monotonic()
    if est > left:
        return {'step': name, 'status': 'skipped', 'reason': f'budget: estimated {est:.0f} s, {max(left, 0):.0f} s '
                f'left', 'seconds': 0.0, 'estimate_s': est}
    t0 = time.perf_counter()
    try:
        figures = STEPS[name](ctx)
        res = {'status': 'pass', 'reason': '', **figures}
    except NeedsCuda as e:
        res = {'status': 'skipped', 'reason': f'needs CUDA ({e})' if str(e) else 'needs CUDA'}
    except Skip as e:
        res = {'status': 'skipped', 'reason': str(e)}
    except CheckFailed as e:
        res = {'status': 'fail', 'reason': str(e)}
    except Exception as e:  # noqa: BLE001  (a crash in one step is that step's failure; the others still run)
        res = {'status': 'fail', 'reason': f'{type(e).__name__}: {e}'}
    return {'step': name, **res, 'seconds': round(time.perf_counter() - t0, 1), 'estimate_s': est}


class Report:
    """The results JSON and the logs archive, rewritten (atomically) whenever a step starts or ends, so a crash,
    a kill or the device tool's time limit keeps every step that ran and names the one that was running."""

    def __init__(self, ctx: Ctx, names: list[str], info: dict, out: Path | None, archive: Path | None,
                 budget: float):
        self.ctx, self.info, self.out, self.archive, self.budget = ctx, info, out, archive, budget
        self.t0 = time.monotonic()
        self.lock = threading.Lock()  # two lanes report from two threads
        self.steps = {n: {'step': n, 'status': 'pending', 'reason': '', 'seconds': 0.0,
                          'estimate_s': ctx.estimates.get(n, 0.0)} for n in names}

    def update(self, res: dict) -> None:
        """Record a step's state and rewrite the files."""
        with self.lock:
            self.steps[res['step']] = res
            self.write()

    def results(self) -> list[dict]:
        """The steps in run order."""
        return list(self.steps.values())

    def write(self) -> None:
        """Write --out and the --logs archive now."""
        if self.out:
            failed = [r['step'] for r in self.steps.values() if r['status'] == 'fail']
            doc = {'machine': self.info, 'quick': self.ctx.quick, 'budget_s': self.budget,
                   'elapsed_s': round(time.monotonic() - self.t0, 1), 'failed': failed, 'steps': self.results()}
            atomic_write(self.out, json.dumps(doc, indent=1))
        if self.archive and self.ctx.logs and self.ctx.logs.is_dir():
            atomic_write(self.archive, self._write_archive)

    def _write_archive(self, f) -> None:
        """Every log so far as one .tar.gz into the binary file f."""
        with tarfile.open(fileobj=f, mode='w:gz') as tar:
            for log in sorted(self.ctx.logs.iterdir()):
                tar.add(log, arcname=f'gpu_check_logs/{log.name}')


def run_steps(ctx: Ctx, names: list[str], jobs: int, report: Report) -> list[dict]:
    """Run the steps, the torchrun ones in a second lane when jobs is 2; results in run order."""
    def lane(steps: list[str]) -> None:
        for name in steps:
            report.update({**report.steps[name], 'status': 'running'})
            r = run_step(ctx, name)
            report.update(r)
            print(f"  {name:16s} {r['status']:8s} {r['seconds']:6.1f} s  {r['reason'] or _figure(r)}", flush=True)

    if jobs < 2:
        lane(names)
        return report.results()
    # two lanes for CPU runs, where each command is mostly start-up on one core: the distributed steps beside the
    # rest (steps that hand figures on, test_fp32 -> test_half, stay in one lane). Timings are then not comparable.
    second = [n for n in names if n in ('torchrun', 'elastic')]
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(lane, [n for n in names if n not in second]), pool.submit(lane, second)
        a.result()
        b.result()
    return report.results()


# --------------------------------------------------------------------------------------------------------- report
def _figure(r: dict) -> str:
    """The one figure of a step worth a column."""
    if 'images_per_s' in r:
        s = f"{r['images_per_s']:.0f} images/s"
        if r.get('mfu') is not None:
            s += f", MFU {r['mfu']:.1%}, {r['peak_gpu_memory_gb']:.1f} GB"
        return s
    if 'mAP50' in r and not isinstance(r['mAP50'], list):
        return f"mAP@0.5 {r['mAP50']:.3f}"
    if 'objects' in r:
        return '; '.join(f'{s}: ' + ', '.join(f'{n} {c}' for c, n in o.items()) for s, o in r['objects'].items())
    if 'total_loss' in r:
        return 'loss ' + ' -> '.join(f'{x:.2f}' for x in r['total_loss'])
    if 'processes' in r:
        return f"{r['processes']} processes"
    if 'syncs_per_plain_micro_step' in r:
        return (f"{r['syncs_per_plain_micro_step']:.2f} syncs per micro-step, "
                f"{r['syncs_per_optimizer_step'] or 0:.1f} per optimizer step")
    if 'models' in r:
        return ', '.join(f"{m} channels_last {v['channels_last_speedup']:.2f}x" for m, v in r['models'].items())
    if 'max_weight_diff' in r:
        return f"exit {r['exit_s']:.0f} s after SIGTERM, resumed weights within {r['max_weight_diff']:.1g}"
    return ''


def step_table(results: list[dict]) -> str:
    """One line per step: status, seconds, main figure or the reason (bench.py's summary_table compares checkouts)."""
    lines = [f"{'step':16s} {'status':8s} {'s':>6s}  figure / reason"]
    for r in results:
        lines.append(f"{r['step']:16s} {r['status']:8s} {r['seconds']:6.1f}  {r['reason'] or _figure(r)}")
    return '\n'.join(lines)


def machine(ctx: Ctx) -> dict:
    """Device, cores, versions."""
    import torch
    info = {'cores': os.cpu_count(), 'torch': torch.__version__, 'python': sys.version.split()[0],
            'cuda': torch.cuda.is_available(), 'gpus': ctx.n_gpus, 'device': 'cpu'}
    if ctx.cuda:
        info.update(device=gpu_name(ctx), cuda_version=torch.version.cuda)
    return info


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options (tests call parse_args on it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default=None, help="CUDA index ('0') or 'cpu'; default: '0' where CUDA is available")
    p.add_argument('--quick', action='store_true', help='tiny sizes: 8 images, 64-128 px, at most 3 epochs')
    p.add_argument('--data-dir', type=Path, help='coco128 folder (images/train2017, labels/train2017, coco.names)')
    p.add_argument('--weights', type=Path, help='yolov3-tiny.weights')
    p.add_argument('--samples', type=Path, help='folder with bus.jpg and zidane.jpg')
    p.add_argument('--inputs', type=Path, help='a folder written by --pack (instead of the three above)')
    p.add_argument('--pack', nargs='?', const=PACK_DIR, type=Path,
                   help=f'copy the inputs into this folder (default {PACK_DIR.name}/, git-ignored) and stop')
    p.add_argument('--only', nargs='+', choices=STEP_NAMES, help='run these steps only')
    p.add_argument('--out', type=Path, help='write the results as JSON here')
    p.add_argument('--logs', type=Path, help="keep every command's output (<step>.log) in this folder, or, for a "
                   "path ending in .tar.gz, in one archive rewritten after every step")
    p.add_argument('--budget', type=float, default=480.0,
                   help='seconds for the whole check (default 480): a step whose estimate does not fit in what is '
                        'left is skipped, and no command runs past it')
    p.add_argument('--estimates', type=Path, help="an earlier run's JSON: its steps' seconds replace the built-in "
                   'estimates')
    p.add_argument('--work', type=Path, help='work folder (default: a temporary folder, removed at the end)')
    p.add_argument('--jobs', type=int, choices=(1, 2),
                   help='2: the torchrun steps beside the others (default: 2 for --quick on the CPU, else 1)')
    return p


def load_estimates(previous: Path | None, cuda: bool) -> dict[str, float]:
    """Seconds per step: the built-in table for this kind of run, replaced by the steps an earlier JSON timed."""
    est = {k: float(v[0 if cuda else 1]) for k, v in ESTIMATES.items()}
    if previous is not None:
        try:
            doc = json.loads(previous.read_text())
            timed = {r['step']: float(r['seconds']) for r in doc['steps'] if r['status'] in ('pass', 'fail')}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f'gpu_check: --estimates {previous}: not a gpu_check JSON ({type(e).__name__}: {e})')
        est.update({k: v for k, v in timed.items() if k in est})
    return est


def prepare(opt: argparse.Namespace, inputs: Inputs) -> Ctx:
    """Device, work folder and the symlinked datasets."""
    import torch
    device = opt.device if opt.device is not None else ('0' if torch.cuda.is_available() else 'cpu')
    if device != 'cpu' and not torch.cuda.is_available():
        raise SystemExit(f'gpu_check: --device {device} but CUDA is not available (use --device cpu --quick)')
    if opt.work and opt.work.exists() and any(opt.work.iterdir()):
        raise SystemExit(f'gpu_check: --work {opt.work} is not empty (each run needs a fresh folder)')
    work = opt.work or Path(tempfile.mkdtemp(prefix='gpu_check_'))
    work.mkdir(parents=True, exist_ok=True)
    archive = opt.logs is not None and opt.logs.name.endswith('.tar.gz')
    ctx = Ctx(inputs, device, opt.quick, work, work / 'logs' if archive else opt.logs,
              torch.cuda.device_count() if device != 'cpu' else 0)
    ctx.estimates = load_estimates(opt.estimates, cuda=ctx.cuda)
    n = 8 if opt.quick else None
    base = make_subset(inputs.data_dir, work / 'data', n, link=True, name='check')
    ctx.data, ctx.n_images, ctx.n_targets = base.data, base.n_images, base.n_targets
    if ctx.cuda:  # the throughput steps: 16 batches of 64 per epoch (--quick: 4 of 16)
        x8 = make_subset(inputs.data_dir, work / 'data_x8', n, copies=8, link=True, name='check', valid=base.images)
        ctx.shared['x8'], ctx.shared['x8_images'] = x8.data, x8.n_images
    return ctx


def main(argv: list[str] | None = None) -> int:
    """Run the steps, print the table, write --out; 1 when a step failed."""
    opt = get_args_parser().parse_args(argv)
    inputs = default_inputs(opt)
    if opt.pack:
        other = checkout_bytes() if ROOT in opt.pack.resolve().parents else 0
        total = pack(inputs, opt.pack.resolve(), other_bytes=other)
        print(f'gpu_check: copied {len(inputs.files())} files, {total / 2 ** 20:.1f} MiB, into {opt.pack} (with the '
              f'checkout {(total + other) / 2 ** 20:.1f} of 64 MiB travel); run with --inputs {opt.pack}')
        return 0
    inputs.check()
    ctx = prepare(opt, inputs)
    info = machine(ctx)
    print(f"gpu_check on {info['device']} ({ctx.n_gpus} GPUs, {info['cores']} CPUs, torch {info['torch']})"
          f"{', quick' if ctx.quick else ''}; inputs {inputs.data_dir}, {inputs.weights.name}; work {ctx.work}")
    names = [n for n in STEP_NAMES if n in (opt.only or STEP_NAMES)]
    jobs = opt.jobs or (2 if ctx.quick and not ctx.cuda else 1)
    archive = opt.logs.resolve() if ctx.logs is not None and ctx.logs != opt.logs else None
    report = Report(ctx, names, info, opt.out, archive, opt.budget)
    ctx.deadline = report.t0 + opt.budget
    report.write()  # every step pending: the file exists from the start
    try:
        results = run_steps(ctx, names, jobs, report)
    finally:
        report.write()
        if opt.work is None:
            shutil.rmtree(ctx.work, ignore_errors=True)
    print()
    print(step_table(results))
    failed = [r['step'] for r in results if r['status'] == 'fail']
    print(f"\n{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{sum(r['status'] == 'pass' for r in results)} passed, "
          f"{sum(r['status'] == 'skipped' for r in results)} skipped")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
