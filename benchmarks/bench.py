"""Side-by-side speed of training, test.py and the training loader, for this checkout and others.

    python benchmarks/bench.py                                        # this checkout
    python benchmarks/bench.py --repo /work/orig-archive --repo .     # the 2020 original (git clone -b archive), then this
    python benchmarks/bench.py --quick                                # smoke run on 16 images (about a minute)

For each --repo, one after another, in fresh subprocesses, with yolov3-tiny from ../shared/weights and the same cfg
(this checkout's cfg/yolov3-tiny.cfg, masks 1,2,3, unless --cfg) and a temporary copy of coco128 (symlinks):

1. loader: images/s of the mosaic training loader (augment=True, 2 workers, 320, batch 16), measured by
   benchmarks/bench_loader.py (one warm-up epoch, then --loader-epochs timed epochs);
2. test: `test.py --img-size 416 --batch-size 16 --conf-thres 0.001 --iou-thres 0.6 --device cpu`, timed as the
   whole command (start-up, model, data, inference, NMS, metrics) and as the loop over the test batches alone,
   with the mAP@0.5 it prints;
3. train: `train.py --img-size 320 --batch-size 16 --epochs 3 --notest --device cpu` from the Darknet weights;
   the figure is the median of the epochs after the first, each from the start of its batch loop to its end
   (loader start included), so start-up, the first (warm-up) epoch and the final test do not count; the whole
   command is reported as well.

Times of each batch loop come from a probe on tqdm's iterator installed in the child process (both codes drive
their loops through tqdm), so neither checkout is edited. Peak memory: the largest single process of the command
(wait4 ru_maxrss) and the peak summed PSS of its whole process tree (main process + DataLoader workers, sampled
every second). The 2020 original runs through benchmarks/compat_original.py (names numpy/torch removed since, and
a few patches on a temporary copy); checkouts are told apart by their layout (utils/utils.py + models.py with
ONNX_EXPORT), or by --compat.

Results depend on the machine and on what else runs on it: compare checkouts within one run, on an idle machine
(the 1-minute load average is printed before and after each measurement).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
SHARED = Path(os.environ.get('YOLO_SHARED', ROOT.parent / 'shared')).resolve()
COCO128 = SHARED / 'datasets' / 'coco128'
WEIGHTS = SHARED / 'weights' / 'yolov3-tiny.weights'
DEFAULT_CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'
PROBE_ENV = 'YOLO_BENCH_PROBE'  # file the child's tqdm probe appends one JSON line per finished loop to

if str(BENCH_DIR) not in sys.path:  # benchmarks/ is not a package; subset.py is its dataset builder
    sys.path.insert(0, str(BENCH_DIR))
from subset import make_subset  # noqa: E402


# ---------------------------------------------------------------------------------------------------------- child side
def _install_tqdm_probe(log_path: str) -> None:
    """Record perf_counter() at the start of every tqdm loop, at each item it yields, and at its end."""
    import tqdm.std

    original_iter = tqdm.std.tqdm.__iter__

    def __iter__(self):
        rec = {'desc': str(self.desc or ''), 'total': self.total, 't': [time.perf_counter()], 'end': None}
        try:
            for obj in original_iter(self):
                rec['t'].append(time.perf_counter())  # t[k + 1]: batch k handed to the loop body
                yield obj
            rec['end'] = time.perf_counter()  # the body of the last batch has run
        finally:
            with open(log_path, 'a') as f:
                f.write(json.dumps(rec) + '\n')

    tqdm.std.tqdm.__iter__ = __iter__


def _child(spec: dict) -> None:
    """Run spec['script'] of spec['repo'] as __main__ with spec['argv'], behind the probe (and the compat shim)."""
    if spec['compat']:
        sys.path.insert(0, str(BENCH_DIR))
        import compat_original
        compat_original.install()
    _install_tqdm_probe(spec['probe'])
    sys.path.insert(0, spec['repo'])  # the checkout's own modules (models, utils, test) win
    sys.argv = [spec['script']] + spec['argv']
    try:
        runpy.run_path(spec['script'], run_name='__main__')
    finally:
        _record_cuda_memory(spec['probe'] + '.cuda.json')


def _record_cuda_memory(path: str) -> None:
    """Peak CUDA memory of this process (allocated by tensors, reserved by the caching allocator), if it used CUDA."""
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        with open(path, 'w') as f:
            json.dump({'max_allocated': torch.cuda.max_memory_allocated(),
                       'max_reserved': torch.cuda.max_memory_reserved()}, f)


# --------------------------------------------------------------------------------------------------- process metering
def _children_of() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                with open(f'/proc/{d}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])  # field 4; comm may hold spaces
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(d))
    return tree


def _tree_pss_bytes(pid: int) -> int:
    """Summed proportional set size of pid and its descendants (shared pages counted once overall)."""
    tree, todo, total = _children_of(), [pid], 0
    while todo:
        p = todo.pop()
        todo += tree.get(p, [])
        try:
            with open(f'/proc/{p}/smaps_rollup') as f:
                total += next(int(x.split()[1]) for x in f if x.startswith('Pss:')) * 1024
        except (OSError, StopIteration, ValueError):
            continue
    return total


def run_measured(cmd: list[str], cwd: Path, env: dict, log_path: Path, timeout: float) -> dict:
    """Run cmd to completion; wall time, exit code, ru_maxrss of its largest process, peak PSS of its tree."""
    peak = [0]
    with open(log_path, 'w') as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(1.0):
                peak[0] = max(peak[0], _tree_pss_bytes(p.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = t0 + timeout
        while True:  # wait4 (not Popen.wait) to get the child's rusage; poll so a hung child can be killed
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return {'rc': p.returncode, 'wall_s': wall, 'maxrss_mb': ru.ru_maxrss / 1024, 'peak_pss_mb': peak[0] / 2 ** 20}


def _loops(probe: Path) -> list[dict]:
    """The loops the child's tqdm probe recorded, in the order they finished."""
    if not probe.exists():
        return []
    return [json.loads(x) for x in probe.read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------------------------ preparation
def machine_info() -> dict:
    """CPU model, cores, library versions and torch threads of this machine (the children use the same)."""
    import numpy
    import torch
    cpu = platform.processor() or platform.machine()
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    try:
        import cv2
        cv = cv2.__version__
    except ImportError:
        cv = 'missing'
    return {'cpu': cpu, 'cores': os.cpu_count(), 'python': platform.python_version(), 'torch': torch.__version__,
            'torch_threads': torch.get_num_threads(), 'numpy': numpy.__version__, 'opencv': cv,
            'cuda': torch.cuda.is_available()}


def git_state(repo: Path) -> str:
    """'<short commit>' of a git checkout, '+dirty' when tracked files differ from it; '' for a plain folder."""
    try:
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ''
    return head + ('+dirty' if dirty else '')


def is_original(repo: Path) -> bool:
    """The 2020 archive layout: utils/utils.py next to a models.py with the global ONNX_EXPORT switch."""
    models = repo / 'models.py'
    return (repo / 'utils' / 'utils.py').is_file() and models.is_file() and 'ONNX_EXPORT' in models.read_text()


def prepare_repo(repo: Path, tmp: Path, compat: bool) -> tuple[Path, list[str]]:
    """The checkout to run: itself, or for the original a patched temporary copy; plus the patches applied."""
    if not compat:
        return repo, []
    sys.path.insert(0, str(BENCH_DIR))
    import compat_original
    copy = tmp / 'src'
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns('.git', '__pycache__', 'weights', 'runs', '*.pt'))
    return copy, compat_original.apply_patches(copy)


def child_env(compat: bool, tmp: Path) -> dict:
    """Environment of the measured processes: headless plots; with compat, a sitecustomize that installs the shim."""
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONUNBUFFERED': '1'}
    if compat:  # reaches processes bench.py does not start itself (bench_loader's child)
        site = tmp / 'compat_site'
        site.mkdir(exist_ok=True)
        (site / 'sitecustomize.py').write_text('import compat_original  # installs itself: YOLO_BENCH_COMPAT=1\n')
        env['PYTHONPATH'] = os.pathsep.join(x for x in (str(site), str(BENCH_DIR), env.get('PYTHONPATH')) if x)
        env['YOLO_BENCH_COMPAT'] = '1'
    return env


# ----------------------------------------------------------------------------------------------------- measurements
def load1() -> float:
    """1-minute load average (nan where unknown)."""
    return os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')


def run_script(repo: Path, script: str, argv: list[str], compat: bool, run_dir: Path, env: dict,
               timeout: float) -> tuple[dict, list[dict], str]:
    """Run repo/script in run_dir behind the probe; (metering, recorded loops, output text)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'weights').mkdir(exist_ok=True)  # the original saves weights/last.pt without creating the folder
    probe = run_dir / 'loops.jsonl'
    spec = {'repo': str(repo), 'script': str(repo / script), 'argv': argv, 'compat': compat, 'probe': str(probe)}
    cmd = [sys.executable, str(Path(__file__).resolve()), '--child', json.dumps(spec)]
    meter = run_measured(cmd, run_dir, env, run_dir / 'output.txt', timeout)
    text = (run_dir / 'output.txt').read_text(errors='replace')
    if meter['rc']:
        raise RuntimeError(f'{repo / script} exited {meter["rc"]}; last output:\n{text[-3000:]}')
    return meter, _loops(probe), text


def parse_all_row(text: str) -> dict:
    """P, R, mAP@0.5 from the last 'all' row of a test table (Images Targets P R mAP@0.5 ... in both codes)."""
    rows = [x.split() for x in re.split(r'[\r\n]', text) if x.strip().startswith('all ')]
    if not rows:
        return {}
    v = [float(x) for x in rows[-1][1:]]
    return {'images': int(v[0]), 'targets': int(v[1]), 'P': v[2], 'R': v[3], 'mAP50': v[4]}


def bench_test(repo: Path, compat: bool, cfg: Path, data: Path, n_images: int, img_size: int, tmp: Path,
               env: dict, timeout: float) -> dict:
    """test.py on the dataset: whole-command time, test-loop time, images/s of the loop, mAP@0.5, memory."""
    argv = ['--cfg', str(cfg), '--data', str(data), '--weights', str(WEIGHTS), '--img-size', str(img_size),
            '--batch-size', '16', '--conf-thres', '0.001', '--iou-thres', '0.6', '--device', 'cpu']
    meter, loops, text = run_script(repo, 'test.py', argv, compat, tmp / 'test', env, timeout)
    nb = math.ceil(n_images / 16)
    loop = [x for x in loops if x['total'] == nb and len(x['t']) == nb + 1 and x['end']][-1]
    loop_s = loop['end'] - loop['t'][0]
    return {**meter, **parse_all_row(text), 'loop_s': loop_s, 'loop_images_per_s': n_images / loop_s}


def bench_train(repo: Path, compat: bool, cfg: Path, data: Path, n_images: int, img_size: int, epochs: int,
                tmp: Path, env: dict, timeout: float) -> dict:
    """train.py for `epochs` epochs with --notest: median epoch after the first (s, images/s), the first, memory."""
    argv = ['--cfg', str(cfg), '--data', str(data), '--weights', str(WEIGHTS), '--img-size', str(img_size),
            '--batch-size', '16', '--epochs', str(epochs), '--notest', '--device', 'cpu']
    meter, loops, _ = run_script(repo, 'train.py', argv, compat, tmp / 'train', env, timeout)
    nb = math.ceil(n_images / 16)
    ep = [x for x in loops if x['total'] == nb and len(x['t']) == nb + 1 and x['end']][:epochs]  # test loop last
    if len(ep) < epochs:
        raise RuntimeError(f'{repo}: found {len(ep)} training loops of {nb} batches, expected {epochs}')
    timed = ep[1:] or ep  # the first epoch warms up (allocator, oneDNN primitives, first-batch plot)
    times = [x['end'] - x['t'][0] for x in timed]
    epoch_s = statistics.median(times)
    res = {**meter, 'epoch_s': epoch_s, 'images_per_s': n_images / epoch_s, 'epochs_s': times,
           'first_epoch_s': ep[0]['end'] - ep[0]['t'][0]}
    if nb > 1:  # the same epochs without their first batch (loader start, first-iteration allocations, batch plot)
        res['steady_images_per_s'] = statistics.median((n_images - 16) / (x['end'] - x['t'][2]) for x in timed)
    return res


def bench_loader(repo: Path, images: Path, epochs: int, env: dict) -> dict:
    """Mosaic loader images/s through benchmarks/bench_loader.py (its own subprocess) with env applied."""
    sys.path.insert(0, str(BENCH_DIR))
    import bench_loader
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # bench_loader hands os.environ to its child: the compat sitecustomize rides along
    try:
        r = bench_loader.loader_figures(repo, data=images, img_size=320, batch_size=16, workers=2, epochs=epochs)
        return {k: r[k] for k in ('images_per_s', 'images', 'seconds', 'cpu_ms_per_image')}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def bench_repo(repo: Path, opt: argparse.Namespace) -> dict:
    """All measurements of one checkout, each in fresh subprocesses, in a temporary folder removed afterwards."""
    compat = is_original(repo) if opt.compat == 'auto' else opt.compat == 'on'
    tmp = Path(tempfile.mkdtemp(prefix='yolo_bench_'))
    try:
        src, patches = prepare_repo(repo, tmp, compat)
        subset = make_subset(COCO128, tmp / 'data', opt.images, link=True, name='bench')
        images, data, n = subset.images, subset.data, subset.n_images
        env = child_env(compat, tmp)
        res = {'repo': str(repo), 'git': git_state(repo), 'compat': compat, 'patches': patches, 'images': n}
        for line in patches:
            print(f'  patched in its temporary copy: {line}')
        steps = [('loader', lambda: bench_loader(src, images, opt.loader_epochs, env)),
                 ('test', lambda: bench_test(src, compat, opt.cfg, data, n, opt.test_size, tmp, env, opt.timeout)),
                 ('train', lambda: bench_train(src, compat, opt.cfg, data, n, opt.train_size, opt.train_epochs, tmp,
                                               env, opt.timeout))]
        for name, fn in steps:
            if name not in opt.only:
                continue
            before = load1()
            res[name] = fn()
            res[name].update(load_before=before, load_after=load1())
            print(f'  {name:6s} {_fmt(name, res[name])}')
        return res
    finally:
        if opt.keep:
            print(f'  kept {tmp}')
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _fmt(name: str, r: dict) -> str:
    """One line of a measurement."""
    load = f"(load {r['load_before']:.2f} -> {r['load_after']:.2f})"
    if name == 'loader':
        return f"{r['images_per_s']:.1f} images/s ({r['images']} images in {r['seconds']:.2f} s) {load}"
    mem = f"peak RSS {r['maxrss_mb']:.0f} MB, tree PSS {r['peak_pss_mb']:.0f} MB"
    if name == 'test':
        return (f"{r['wall_s']:.1f} s command, {r['loop_s']:.1f} s loop ({r['loop_images_per_s']:.1f} images/s), "
                f"mAP@0.5 {r.get('mAP50', float('nan')):.3f}, {mem} {load}")
    steady = f", {r['steady_images_per_s']:.2f} without batch 0" if 'steady_images_per_s' in r else ''
    each = ', '.join(f'{x:.1f}' for x in r['epochs_s'])
    return (f"epoch {r['epoch_s']:.2f} s = {r['images_per_s']:.2f} images/s{steady} (epochs timed: {each} s; "
            f"first {r['first_epoch_s']:.1f} s), command {r['wall_s']:.1f} s, {mem} {load}")


# (measurement, key, label, higher is better)
SUMMARY = [('train', 'images_per_s', 'train images/s (median epoch)', True),
           ('train', 'epoch_s', 'train epoch s', False),
           ('train', 'wall_s', 'train command s', False),
           ('train', 'maxrss_mb', 'train peak RSS MB', False),
           ('train', 'peak_pss_mb', 'train peak tree PSS MB', False),
           ('test', 'wall_s', 'test.py command s', False),
           ('test', 'loop_s', 'test loop s', False),
           ('test', 'mAP50', 'test mAP@0.5', True),
           ('test', 'maxrss_mb', 'test peak RSS MB', False),
           ('loader', 'images_per_s', 'loader images/s', True)]


def summary_table(results: list[dict]) -> str:
    """Rows of figures per checkout and, for each further checkout, its speed-up over the first (>1 = better)."""
    names = [Path(r['repo']).name or r['repo'] for r in results]
    head = f"{'':30s}" + ''.join(f'{n[:16]:>17s}' for n in names) + ''.join(
        f'{"x vs " + names[0][:11]:>17s}' for _ in names[1:])
    lines = [head]
    for meas, key, label, higher in SUMMARY:
        vals = [r.get(meas, {}).get(key) for r in results]
        if all(v is None for v in vals):
            continue
        row = f'{label:30s}' + ''.join(f'{v:17.3f}' if v is not None else f'{"-":>17s}' for v in vals)
        for v in vals[1:]:
            base = vals[0]
            ok = v is not None and base is not None and v > 0 and base > 0 and key != 'mAP50'
            row += f'{(v / base if higher else base / v):17.2f}' if ok else f'{"-":>17s}'
        lines.append(row)
    return '\n'.join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options (tests call parse_args on it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--repo', action='append', help='checkout to measure (repeatable, measured in order); '
                                                   'default: this one')
    p.add_argument('--cfg', type=Path, default=DEFAULT_CFG, help='model cfg given to every checkout')
    p.add_argument('--images', type=int, default=None, help='use the first N coco128 images (default: all 128)')
    p.add_argument('--train-epochs', type=int, default=3,
                   help='epochs of train.py; the figure is the median epoch after the first')
    p.add_argument('--train-size', type=int, default=320, help='train.py --img-size')
    p.add_argument('--test-size', type=int, default=416, help='test.py --img-size')
    p.add_argument('--loader-epochs', type=int, default=3, help='timed loader epochs (after one warm-up epoch)')
    p.add_argument('--only', nargs='+', default=['loader', 'test', 'train'], choices=['loader', 'test', 'train'],
                   help='measurements to run')
    p.add_argument('--compat', choices=['auto', 'on', 'off'], default='auto',
                   help='run through compat_original (auto: for checkouts with the 2020 layout)')
    p.add_argument('--quick', action='store_true', help='smoke run: 16 images, 1 epoch at 160, test at 160')
    p.add_argument('--timeout', type=float, default=900, help='seconds allowed to each command')
    p.add_argument('--json', type=Path, help='also write the results to this JSON file')
    p.add_argument('--keep', action='store_true', help='keep the temporary folders (outputs, logs) for inspection')
    p.add_argument('--child', help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure every --repo in turn, print a line per measurement and the summary table; return the results."""
    opt = get_args_parser().parse_args(argv)
    if opt.child:
        _child(json.loads(opt.child))
        return []
    if opt.quick:
        opt.images, opt.train_epochs, opt.loader_epochs = opt.images or 16, 1, 1
        opt.train_size, opt.test_size = 160, 160
    repos = [Path(r).resolve() for r in (opt.repo or [str(ROOT)])]
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} CPUs, python {info['python']}, torch {info['torch']} "
          f"({info['torch_threads']} threads), numpy {info['numpy']}, opencv {info['opencv']}, "
          f"CUDA {'yes' if info['cuda'] else 'no'}; 1-min load {load1():.2f}")
    results = []
    for repo in repos:
        state = git_state(repo)
        print(f"{repo}{f' (git {state})' if state else ''}{' via compat_original' if is_original(repo) else ''}:")
        results.append(bench_repo(repo, opt))
    print()
    print(summary_table(results))
    if opt.json:
        opt.json.write_text(json.dumps({'machine': info, 'options': {k: str(v) for k, v in vars(opt).items()},
                                        'results': results}, indent=1))
    return results


if __name__ == '__main__':
    main()
