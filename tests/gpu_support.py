"""What the GPU checks (tests/test_gpu.py) share: the run's settings, running a command line with its output kept,
killing a process tree, and reading a training run's results.txt and checkpoints."""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.gpu_check import Inputs

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / 'benchmarks'
PROBE = BENCH_DIR / 'gpu_probe.py'
CFG_TINY = ROOT / 'cfg' / 'yolov3-tiny.cfg'
CFG_SPP = ROOT / 'cfg' / 'yolov3-spp.cfg'
RESUMING = re.compile(r'^Resuming \S*last\.pt from epoch \d+', re.M)  # what train.py prints when it resumes

if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # bench.py imports its siblings by their bare names
import bench  # noqa: E402  (after the path: test_gpu.py takes it from here, so no import order can break it)


@dataclass
class GpuRun:
    """What every check needs: inputs, device, sizes, the data subset, where command logs go."""
    inputs: Inputs
    device: str  # a CUDA index such as '0', or 'cpu' (the dry run: tiny sizes)
    logs: Path  # every command's output, <name>.log
    n_gpus: int = 0
    data: Path = Path()  # .data over a symlinked copy of coco128 (8 images on the CPU)
    n_images: int = 0
    n_targets: int = 0  # label rows of those images
    deadline: float = math.inf  # time.monotonic() at which --gpu-budget runs out
    figures: dict = field(default_factory=dict)  # what one check hands to a later one (test_fp32 -> test_half)

    @property
    def cuda(self) -> bool:
        """True when the checks run on CUDA."""
        return self.device != 'cpu'

    @property
    def quick(self) -> bool:
        """The CPU dry run: 8 images, 64-128 px, at most 3 epochs."""
        return not self.cuda

    @property
    def timeout(self) -> float:
        """Seconds allowed to one command: a hang fails its test, and no command runs past the budget."""
        return max(1.0, min(90.0 if self.quick else 240.0, self.deadline - time.monotonic()))

    def size(self, cuda_size: int = 416, quick_size: int = 64) -> int:
        """Image size of a check."""
        return quick_size if self.quick else cuda_size


def save_log(run: GpuRun, name: str, cmd: list[str], text: str) -> None:
    """Keep a command's output as <logs>/<name>.log, the command line first."""
    run.logs.mkdir(parents=True, exist_ok=True)
    (run.logs / f'{name}.log').write_text(' '.join(map(str, cmd)) + '\n\n' + text)


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


def run_cli(run: GpuRun, name: str, cmd: list[str], cwd: Path, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run a command to completion (killed at run.timeout), its output saved as <logs>/<name>.log; returns it."""
    cwd.mkdir(parents=True, exist_ok=True)
    timeout = run.timeout
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        r = subprocess.CompletedProcess(cmd, 124, out, err + f'\nTimeoutError: killed after {timeout:.0f} s')
    save_log(run, name, cmd, r.stdout + r.stderr)
    return r


def error_lines(text: str) -> str:
    """The last error a command printed (an 'XxxError: ...' line), else its last lines."""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r'^[\w.]*(Error|Exception|error)\b:?', x)]
    return (errors[-1] if errors else ' | '.join(lines[-3:]))[-600:]


def expect_rc0(r: subprocess.CompletedProcess, what: str) -> None:
    """A failed command fails the test, with its last error as the message."""
    assert r.returncode == 0, f'{what} exited {r.returncode}: {error_lines(r.stdout + r.stderr)}'


def strict_fp32(cmd: list[str]) -> list[str]:
    """[python, script, args...] run through gpu_probe.py with TF32 off (fp32 compared with fp32 figures)."""
    return [cmd[0], str(PROBE), 'run', '--no-tf32', '--', *cmd[1:]]


def train_cmd(run: GpuRun, *extra: str, epochs: int, cfg: Path = CFG_TINY, weights: str | None = None,
              batch: int | None = None, data: Path | None = None, size: int | None = None) -> list[str]:
    """train.py arguments for this run (the script path first)."""
    batch = batch or (8 if run.quick else 16)
    # --notest: the last epoch is still tested; a test every epoch would double the time of these short runs.
    # quick: 8 images, where worker start-up would be most of the time
    quick = ['--workers', '0', '--notest'] if run.quick else ['--notest']
    return [str(ROOT / 'train.py'), '--cfg', str(cfg), '--data', str(data or run.data),
            '--weights', str(run.inputs.weights) if weights is None else weights,
            '--img-size', str(size or run.size()),
            '--epochs', str(epochs), '--batch-size', str(batch), *quick, *extra]


def results_rows(folder: Path) -> list[list[str]]:
    """results.txt of a run as split rows (epoch 'i/n', mem, GIoU, obj, cls, total, targets, size, P, R, mAP...)."""
    f = folder / 'results.txt'
    return [x.split() for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def check_epochs(folder: Path, epochs: int) -> list[list[str]]:
    """results.txt holds epochs 0..epochs-1 once each, in order, with finite losses."""
    rows = results_rows(folder)
    got, want = [r[0] for r in rows], [f'{i}/{epochs - 1}' for i in range(epochs)]
    assert got == want, f'results.txt epochs {got}, expected {want}'
    bad = [r[0] for r in rows if not all(math.isfinite(float(x)) for x in r[2:6] + r[-3:])]
    assert not bad, f'non-finite losses in results.txt at epochs {bad}'
    return rows


def check_checkpoints(folder: Path, epochs: int) -> dict:
    """weights/last.pt and best.pt load with weights_only=True, hold finite tensors; last.pt is the final epoch."""
    import torch
    out = {}
    for name in ('last.pt', 'best.pt'):
        f = folder / 'weights' / name
        assert f.exists(), f'{f} missing'
        ck = torch.load(f, map_location='cpu', weights_only=True)  # an unpickling error fails the test as is
        bad = [k for k, v in ck['model'].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, f'{f}: non-finite tensors {bad[:3]}'
        out[name] = ck['epoch']
    assert out['last.pt'] == epochs - 1, f"last.pt is epoch {out['last.pt']}, expected {epochs - 1}"
    return out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    """Poll until path exists; fail when the process ends first or time runs out."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f'the run exited ({proc.returncode}) before writing {path.name}'
        assert time.time() < deadline, f'no {path.name} after {timeout:.0f} s'
        time.sleep(0.05)


def workers_of(pid: int) -> dict[int, int]:
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


def iou_xywh(a: list[float], b: list[float]) -> float:
    """IoU of two normalised (x, y, w, h) boxes."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-12)


def match_confident(ref: list[list[float]], other: list[list[float]], conf: float = 0.5) -> tuple[int, float]:
    """(boxes of ref with confidence >= conf, the lowest IoU of one of them with its best box of the same class in
    other); rows are [class, x, y, w, h, conf]. 1.0 when none is confident, 0.0 when one has no match."""
    confident = [d for d in ref if d[5] >= conf]
    worst = min((max((iou_xywh(d[1:5], o[1:5]) for o in other if o[0] == d[0]), default=0.0) for d in confident),
                default=1.0)
    return len(confident), worst


def max_state_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the floating-point tensors of two state dicts (inf when their keys or shapes differ)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return math.inf
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a
                if a[k].is_floating_point() and a[k].numel()), default=0.0)
