"""Inference speed side by side: our model on detect.py's path (fp32, bf16), our ONNX export in onnxruntime and OpenCV
DNN reading the same Darknet .weights; per image, and as whole detect jobs over a folder of images.

    python benchmarks/bench_infer.py                    # 416: 40 rounds per image, 64 coco128 images x 3 jobs each
    python benchmarks/bench_infer.py --img-size 128 --images 2 --repeats 3 --job-repeats 1     # smoke run
    python benchmarks/bench_infer.py --only jobs --detect-args '--half off' --json out.json

Per image: bus.jpg letterboxed to img-size x img-size, the same input for every path, in interleaved rounds (each
round runs every path once) after two warm-up runs; the figure is the median ms of a forward pass (ONNX, OpenVINO
and OpenCV include their input and output copies). Paths: PyTorch fp32 NCHW, fp32 channels-last (detect.py
--backend torch --half off), bf16 weights channels-last (--backend torch's default where the CPU has native bf16),
bf16 autocast, torch.compile (inductor; its first call's compile time is printed), TorchScript freeze +
optimize_for_inference; our dynamic-shape ONNX export in onnxruntime as detect.py's --backend auto runs it
(utils/eval/backends.py), OpenVINO on the same export when `openvino` is installed, OpenCV DNN's Darknet importer. The
detections of each path (its raw output through our NMS at conf 0.3, IoU 0.6) are matched to fp32 channels-last's.

Jobs: `detect.py` (its defaults: --backend auto, --device cpu), `detect.py --backend torch` (the path before
--backend existed) and benchmarks/opencv_detect.py (the same steps with OpenCV DNN only: read, letterbox, forward,
NMS, draw, write) over the first --images coco128 images, as subprocesses, run in turn (the order rotates every
round); wall time of the command and time to its first image line. They run with --save-txt, so their detections
can be matched (same class, IoU >= 0.5). detect.py's ONNX export is cached in a temporary YOLOV3_CACHE filled by one
untimed run first (a user's first run pays the export once: a few seconds). Each round also times detect.py's forward
passes alone (its onnxruntime session on its own letterboxed inputs): the job's wall time less that is its overhead.

Instruction sets: `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OPENCV_CPU_DISABLE=AVX512-SKX` make PyTorch and
OpenCV run their AVX2 kernels on an AVX-512 CPU (the machine line says which are set); onnxruntime and OpenVINO have
no such switch and always use the CPU's widest instructions, so their figures are the AVX-512 ones.

The machine is shared: the 1-minute load average is printed before and after each part; compare figures only
within one run. As detect.py, this script sets OMP_WAIT_POLICY=PASSIVE for itself unless it is set (the jobs get the
environment it was started with: detect.py makes the same choice itself, OpenCV has its own thread pool).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

JOB_ENV = dict(os.environ)  # the jobs run in the environment this script was started with
if __name__ == '__main__':  # our torch paths run as detect.py runs them (see the OMP_WAIT_POLICY note there)
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from models import load_model  # noqa: E402
from utils.boxes import bbox_iou, xywh2xyxy  # noqa: E402
from utils.data.augmentations import letterbox  # noqa: E402
from utils.eval.nms import non_max_suppression  # noqa: E402
from utils.torch_utils import inference_dtype  # noqa: E402

SHARED = Path(os.environ.get('YOLO_SHARED', ROOT.parent / 'shared')).resolve()
COCO128 = SHARED / 'datasets' / 'coco128' / 'images' / 'train2017'
WEIGHTS = SHARED / 'weights' / 'yolov3-tiny.weights'
SAMPLE = SHARED / 'samples' / 'bus.jpg'
CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'
NAMES = ROOT / 'data' / 'coco.names'
CONF, IOU = 0.3, 0.6  # detect.py's defaults


def load1() -> float:
    """1-minute load average."""
    return os.getloadavg()[0]


ISA_ENV = ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'OPENCV_CPU_DISABLE')  # instruction-set limits honoured


def cpu_flags() -> str:
    """The CPU's vector-instruction flags that matter here (AVX2, FMA, AVX-512 F, VNNI, BF16, AMX)."""
    with open('/proc/cpuinfo') as f:
        flags = next((x.split(':', 1)[1].split() for x in f if x.startswith('flags')), [])
    keep = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_tile')
    return ' '.join(x for x in keep if x in flags)


def machine_line() -> str:
    """CPU model and flags, cores, library versions, torch threads, the OpenMP wait policy and ISA limits."""
    cpu = platform.processor() or platform.machine()
    with open('/proc/cpuinfo') as f:
        cpu = next((x.split(':', 1)[1].strip() for x in f if x.startswith('model name')), cpu)
    import onnxruntime
    wait = os.environ.get('OMP_WAIT_POLICY', 'unset')
    isa = ', '.join(f'{k}={os.environ[k]}' for k in ISA_ENV if k in os.environ) or 'none'
    return (f'{cpu} ({cpu_flags()}), {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} '
            f'threads), onnxruntime {onnxruntime.__version__}, OpenCV {cv2.__version__}{openvino_version()}; '
            f'OMP_WAIT_POLICY {wait}; ISA limits: {isa}')


def openvino_version() -> str:
    """', OpenVINO <version>' when it is installed, else ''."""
    try:
        import openvino
    except ImportError:
        return ''
    return f', OpenVINO {openvino.__version__.split("-")[0]}'



# ------------------------------------------------------------------------------------------------------- per image
def sample_input(size: int) -> np.ndarray:
    """bus.jpg letterboxed to size x size: (1, 3, size, size) float32 RGB in [0, 1]."""
    img = letterbox(cv2.imread(str(SAMPLE)), size, auto=False)[0]
    return np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))[None].astype(np.float32) / 255


def opencv_to_ours(outs: list[np.ndarray], size: int) -> torch.Tensor:
    """OpenCV's [yolo] outputs (rows, 5 + nc) [xywh fractions, obj, obj * prob] -> our (1, N, 5 + nc) layout."""
    x = torch.from_numpy(np.concatenate(outs)).clone()
    x[:, :4] *= size
    x[:, 5:] /= x[:, 4:5].clamp(min=1e-12)
    return x[None]


def torch_paths(model: torch.nn.Module, x: np.ndarray, skip: set[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """Our model: fp32 NCHW; fp32 channels-last (detect.py --backend torch --half off on the CPU); bf16 weights
    channels-last (--backend torch's default on a CPU with native bf16); bf16 autocast channels-last; torch.compile
    and TorchScript freeze (fp32 channels-last) unless skipped."""
    nchw = torch.from_numpy(x)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    bf16_model = copy.deepcopy(model).to_dtype(torch.bfloat16)
    nhwc_bf16 = nhwc.to(torch.bfloat16)

    def autocast() -> torch.Tensor:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return model(nhwc)[0].float()

    paths = {'torch fp32 NCHW': lambda: model(nchw)[0],
             'torch fp32 channels-last': lambda: model(nhwc)[0],
             'torch bf16 weights channels-last': lambda: bf16_model(nhwc_bf16)[0].float(),
             'torch bf16 autocast channels-last': autocast}
    from utils.eval.export import InferenceOnly
    net = InferenceOnly(model).eval()
    with torch.no_grad():
        if 'compile' not in skip:
            compiled = torch.compile(net)
            t = time.perf_counter()
            compiled(nhwc)
            print(f'torch.compile: first call (compile) {time.perf_counter() - t:.1f} s')
            paths['torch.compile (inductor) channels-last'] = lambda: compiled(nhwc)
        if 'jit' not in skip:
            with warnings.catch_warnings():  # tracer and deprecation notes: the path is measured, not kept
                warnings.simplefilter('ignore')
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, nhwc)))
            paths['jit freeze + optimize_for_inference'] = lambda: frozen(nhwc)
    return paths


ORT_PATH = 'onnxruntime fp32 (our export)'


def detect_path(backend: str = 'auto') -> str:
    """The path above that detect.py takes here with --backend (and --half auto)."""
    if backend == 'auto':
        return ORT_PATH
    bf16 = inference_dtype('auto', torch.device('cpu')) == torch.bfloat16
    return 'torch bf16 weights channels-last' if bf16 else 'torch fp32 channels-last'


def other_paths(model: torch.nn.Module, x: np.ndarray, tmp: Path, cfg: Path,
                weights: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Our dynamic-shape ONNX export in onnxruntime (fp32) as detect.py runs it, OpenVINO on it when installed, and
    OpenCV DNN's Darknet importer on the same .weights."""
    from utils.eval.backends import OrtModel
    from utils.eval.export import export_onnx

    onnx_file = export_onnx(model, tmp / 'model.onnx', x.shape[2:], dynamic=True)
    session = OrtModel(onnx_file)
    paths = {ORT_PATH: lambda: session(x)}
    try:
        import openvino
    except ImportError:
        pass
    else:
        compiled = openvino.Core().compile_model(str(onnx_file), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
        request = compiled.create_infer_request()
        paths['OpenVINO fp32 (our export)'] = lambda: torch.from_numpy(request.infer([x])[0].copy())
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    layers = net.getUnconnectedOutLayersNames()

    def opencv() -> torch.Tensor:
        net.setInput(x)
        return opencv_to_ours(net.forward(layers), x.shape[2])

    paths['OpenCV DNN (Darknet importer)'] = opencv
    return paths


def match_share(a: torch.Tensor, b: torch.Tensor, iou: float) -> float:
    """Share of the boxes of a and b (n, 6) [xyxy, conf, cls] paired one-to-one with a box of the same class at
    IoU >= iou (greedy, best conf first); 1.0 when both are empty."""
    if not len(a) + len(b):
        return 1.0
    used, pairs = set(), 0
    for box in a[a[:, 4].argsort(descending=True)]:
        same = [j for j in range(len(b)) if j not in used and b[j, 5] == box[5]]
        if same:
            ious = bbox_iou(box[None, :4], b[same, :4]).view(-1)
            k = int(ious.argmax())
            if ious[k] >= iou:
                used.add(same[k])
                pairs += 1
    return 2 * pairs / (len(a) + len(b))


def time_paths(paths: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, list[float]]:
    """ms of each path, `repeats` interleaved rounds after two warm-up calls each."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    with torch.no_grad():
        for f in paths.values():
            f(), f()
        for _ in range(repeats):
            for k, f in paths.items():
                t = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t) * 1e3)
    return times


def bench_per_image(size: int, repeats: int, cfg: Path, weights: Path, tmp: Path, skip: set[str]) -> list[dict]:
    """Median ms per path on one size x size image, and how its detections match those of fp32 channels-last."""
    model = load_model(str(weights), str(cfg), size, torch.device('cpu')).fuse().eval()
    x = sample_input(size)
    paths = {**torch_paths(model, x, skip), **other_paths(model, x, tmp, cfg, weights)}
    times = time_paths(paths, repeats)
    with torch.no_grad():
        dets = {k: non_max_suppression(f().float(), CONF, IOU, multi_label=False)[0] for k, f in paths.items()}
    ref_key, default, old = 'torch fp32 channels-last', detect_path(), detect_path('torch')
    opencv_ms = statistics.median(times['OpenCV DNN (Darknet importer)'])
    return [{'path': k, 'ms': statistics.median(v), 'vs_opencv': opencv_ms / statistics.median(v),
             'detections': len(dets[k]), 'agree': match_share(dets[k], dets[ref_key], 0.9),
             'detect_default': k == default, 'torch_default': k == old}
            for k, v in times.items()]


# ------------------------------------------------------------------------------------------------------------ jobs
def job_commands(src: Path, out: Path, size: int, cfg: Path, weights: Path,
                 detect_args: list[str]) -> dict[str, list[str]]:
    """The three jobs over the images in src, writing into out/<job>; detect_args are added to detect.py's."""
    common = ['--cfg', str(cfg), '--weights', str(weights), '--source', str(src), '--img-size', str(size),
              '--save-txt']
    detect = [sys.executable, str(ROOT / 'detect.py'), *common, '--device', 'cpu']
    return {'detect.py': [*detect, '--output', str(out / 'ours'), *detect_args],
            'detect.py --backend torch': [*detect, '--output', str(out / 'torch'), *detect_args, '--backend', 'torch'],
            'OpenCV DNN script': [sys.executable, str(BENCH_DIR / 'opencv_detect.py'), *common,
                                  '--output', str(out / 'opencv'), '--names', str(NAMES)]}


def time_job(cmd: list[str], cache: Path) -> tuple[float, float]:
    """Run cmd from the repository root with its ONNX exports cached in cache; (wall seconds, seconds until it
    printed its first image line)."""
    env = {**JOB_ENV, 'PYTHONUNBUFFERED': '1', 'YOLOV3_CACHE': str(cache)}
    t0 = time.perf_counter()
    first = float('nan')
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if first != first and line.startswith('image 1/'):
                first = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {p.returncode}):\n{''.join(lines[-15:])}")
    return wall, first


def read_labels(folder: Path) -> dict[str, torch.Tensor]:
    """--save-txt files of a job: stem -> (n, 6) [xyxy (normalised), 1, cls]."""
    out = {}
    for f in folder.glob('*.txt'):
        t = torch.tensor([[float(v) for v in line.split()[:5]] for line in f.read_text().splitlines() if line.strip()],
                         dtype=torch.float32).view(-1, 5)
        out[f.stem] = torch.cat((xywh2xyxy(t[:, 1:5]), torch.ones(len(t), 1), t[:, :1]), 1)
    return out


def job_agreement(a: Path, b: Path, stems: list[str]) -> tuple[int, int, float]:
    """Detections of two job outputs and the share of them matched (same class, IoU >= 0.5), over all images."""
    la, lb = read_labels(a), read_labels(b)
    empty = torch.zeros(0, 6)
    na = sum(len(la.get(s, empty)) for s in stems)
    nb = sum(len(lb.get(s, empty)) for s in stems)
    matched = sum(match_share(la.get(s, empty), lb.get(s, empty), 0.5) * (len(la.get(s, empty)) +
                                                                         len(lb.get(s, empty))) for s in stems)
    return na, nb, matched / max(na + nb, 1)


def job_forwards(src: Path, size: int, cfg: Path, weights: Path, cache: Path) -> float:
    """Seconds of the forward passes alone of detect.py's job: onnxruntime on its cached export (found as detect.py
    finds it), on its own inputs (each image letterboxed to its minimum rectangle by LoadImages), after one untimed
    pass. A job's wall time less this is its overhead: start-up, reading, letterbox, NMS, drawing, writing."""
    from utils.data.sources import LoadImages
    from utils.eval.backends import OrtModel, files_key

    run = OrtModel(cache / f'{files_key(weights, cfg, size)}.onnx')
    xs = [img[None].astype(np.float32) / np.float32(255.0) for _, img, _, _ in LoadImages(src, size)]
    run.predict(xs[0])
    t = time.perf_counter()
    for x in xs:
        run.predict(x)
    return time.perf_counter() - t


def bench_jobs(size: int, n_images: int, repeats: int, cfg: Path, weights: Path, tmp: Path,
               detect_args: list[str]) -> tuple[list[dict], list[float]]:
    """Median wall time and time to first image of each job over n_images coco128 images, run alternately; and the
    seconds of detect.py's forward passes alone in each round (job_forwards)."""
    src = tmp / 'images'
    src.mkdir()
    for im in sorted(COCO128.glob('*.jpg'))[:n_images]:
        (src / im.name).symlink_to(im)
    cache = tmp / 'onnx-cache'
    time_job(job_commands(src, tmp / 'warm-up', size, cfg, weights, detect_args)['detect.py'], cache)  # the export
    times: dict[str, list[tuple[float, float]]] = {}
    forwards: list[float] = []
    for r in range(repeats):
        cmds = list(job_commands(src, tmp / f'run{r}', size, cfg, weights, detect_args).items())
        for name, cmd in cmds[r % len(cmds):] + cmds[:r % len(cmds)]:  # each job first in turn
            times.setdefault(name, []).append(time_job(cmd, cache))
        forwards.append(job_forwards(src, size, cfg, weights, cache))  # in the same rounds: the same load
    last = tmp / f'run{repeats - 1}'
    stems = [p.stem for p in src.iterdir()]
    rows = []
    for name, runs in times.items():
        folder = {'detect.py': 'ours', 'detect.py --backend torch': 'torch'}.get(name, 'opencv')
        n, _, share = job_agreement(last / folder, last / 'ours', stems)
        wall, first = statistics.median(w for w, _ in runs), statistics.median(f for _, f in runs)
        rows.append({'job': name, 'wall_s': wall, 'first_image_s': first, 'runs': [w for w, _ in runs],
                     'detections': n, 'agree': share})
    return rows, forwards


# ------------------------------------------------------------------------------------------------------- test.py
TEST_RUNS = {'test.py (--backend auto)': [], 'test.py --backend torch': ['--backend', 'torch'],
             'test.py --backend torch --half off': ['--backend', 'torch', '--half', 'off']}


def bench_testpy(size: int, repeats: int, cfg: Path, weights: Path, tmp: Path) -> list[dict]:
    """test.py on coco128 (batch 16, rect, conf 0.001) per backend, run in turn (the order rotates every round):
    median wall time, the batch loop's inference ms per image (its Speed line) and the mAP@0.5 of its `all` row."""
    import re
    data = tmp / 'coco128.data'
    data.write_text(f"classes=80\nvalid={COCO128}\nnames={NAMES}\n")
    cache = tmp / 'onnx-cache-test'
    common = [sys.executable, str(ROOT / 'test.py'), '--cfg', str(cfg), '--weights', str(weights), '--data', str(data),
              '--img-size', str(size), '--batch-size', '16', '--device', 'cpu']
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in TEST_RUNS}
    env = {**JOB_ENV, 'YOLOV3_CACHE': str(cache)}
    subprocess.run([*common, '--save-dir', str(tmp / 'tw')], env=env, capture_output=True, check=True)  # export
    names = list(TEST_RUNS)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            p = subprocess.run([*common, *TEST_RUNS[name], '--save-dir', str(tmp / f't{r}')], cwd=ROOT, env=env,
                               capture_output=True, text=True)
            wall = time.perf_counter() - t
            if p.returncode:
                raise RuntimeError(f'{name} failed (exit {p.returncode}):\n{p.stdout[-1500:]}{p.stderr[-1500:]}')
            inf = float(re.search(r'Speed: ([\d.]+)/', p.stdout).group(1))
            map50 = float(re.search(r'^\s+all\s+\S+\s+\S+\s+\S+\s+\S+\s+(\S+)', p.stdout, re.M).group(1))
            runs[name].append((wall, inf, map50))
    return [{'run': k, 'wall_s': statistics.median(x[0] for x in v), 'inference_ms': statistics.median(x[1] for x in v),
             'map50': v[-1][2], 'walls': [x[0] for x in v]} for k, v in runs.items()]


def testpy_table(rows: list[dict], size: int, repeats: int) -> str:
    """The test.py rows as text."""
    lines = [f'test.py: coco128 at {size}, batch 16, rect; median of {repeats} runs in turn',
             f"{'run':<38}{'wall s':>8}{'inference ms/image':>20}{'mAP@0.5':>9}  runs (s)"]
    lines += [f"{r['run']:<38}{r['wall_s']:>8.2f}{r['inference_ms']:>20.1f}{r['map50']:>9.3f}  "
              + ' '.join(f'{w:.2f}' for w in r['walls']) for r in rows]
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------- report
def per_image_table(rows: list[dict], size: int, repeats: int) -> str:
    """The per-image rows as text."""
    lines = [f'per image: bus.jpg at {size}x{size}, median of {repeats} interleaved rounds',
             f"{'path':<52}{'ms':>8}{'OpenCV/this':>13}{'detections':>12}{'match fp32 CL':>15}"]
    lines += [f"{r['path'] + ' *' * r['detect_default'] + ' +' * r.get('torch_default', False):<52}{r['ms']:>8.1f}"
              f"{r['vs_opencv']:>12.2f}x"
              f"{r['detections']:>12}{r['agree']:>15.2f}" for r in rows]
    lines.append('* what detect.py and test.py run here by default (--backend auto); + with --backend torch')
    return '\n'.join(lines)


def jobs_table(rows: list[dict], size: int, n_images: int, repeats: int, detect_args: str = '',
               forwards: list[float] | None = None) -> str:
    """The job rows as text, and detect.py's overhead beyond its forward passes when they were timed."""
    extra = f' (detect.py {detect_args})' if detect_args else ''
    lines = [f'jobs: {n_images} coco128 images at {size}, median of {repeats} alternating runs{extra}',
             f"{'job':<28}{'wall s':>8}{'first image s':>15}{'after first, ms/image':>23}{'detections':>12}"
             f"{'vs auto':>9}  runs (s)"]
    for r in rows:
        per = (r['wall_s'] - r['first_image_s']) / max(n_images - 1, 1) * 1e3
        lines.append(f"{r['job']:<28}{r['wall_s']:>8.2f}{r['first_image_s']:>15.2f}{per:>23.1f}{r['detections']:>12}"
                     f"{r['agree']:>9.2f}  " + ' '.join(f'{w:.2f}' for w in r['runs']))
    if forwards:
        ours, fwd = next(r for r in rows if r['job'] == 'detect.py'), statistics.median(forwards)
        lines.append(f"detect.py's {n_images} onnxruntime forward passes alone (its session, its inputs): {fwd:.2f} s "
                     f"(runs " + ' '.join(f'{w:.2f}' for w in forwards) + f"); overhead beyond them "
                     f"{ours['wall_s'] - fwd:.2f} s (median wall - median)")
    return '\n'.join(lines)


PARTS = ('per-image', 'jobs', 'testpy')


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of `python benchmarks/bench_infer.py`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--img-size', type=int, default=416, help='inference size (multiple of 32)')
    p.add_argument('--images', type=int, default=64, help='coco128 images per job')
    p.add_argument('--repeats', type=int, default=40, help='interleaved rounds of the per-image measurement')
    p.add_argument('--job-repeats', type=int, default=3, help='runs of each job and of each test.py run (in turn)')
    p.add_argument('--cfg', type=Path, default=CFG)
    p.add_argument('--weights', type=Path, default=WEIGHTS, help='Darknet .weights (OpenCV reads them too)')
    p.add_argument('--detect-args', default='', help="more detect.py options for its job, e.g. '--half off'")
    p.add_argument('--only', nargs='+', choices=PARTS, default=list(PARTS), help='the parts to run (default: all)')
    p.add_argument('--skip', nargs='+', default=[], choices=('compile', 'jit'),
                   help='per-image paths to leave out (torch.compile takes 30-60 s to compile on 2 cores)')
    p.add_argument('--json', type=Path, help='also write the results here')
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the measurements, print the tables; returns the results."""
    opt = get_args_parser().parse_args(argv)
    if opt.img_size % 32 or opt.images < 1 or opt.repeats < 1 or opt.job_repeats < 1:
        raise SystemExit('--img-size must be a multiple of 32; --images, --repeats, --job-repeats at least 1')
    print(f'machine: {machine_line()}')
    res: dict = {'machine': machine_line(), 'img_size': opt.img_size}
    with tempfile.TemporaryDirectory(prefix='bench_infer_') as tmp:
        if 'per-image' in opt.only:
            l0 = load1()
            res['per_image'] = bench_per_image(opt.img_size, opt.repeats, opt.cfg, opt.weights, Path(tmp),
                                               set(opt.skip))
            print(per_image_table(res['per_image'], opt.img_size, opt.repeats))
            print(f'load {l0:.2f} -> {load1():.2f}')
        if 'testpy' in opt.only:
            l0 = load1()
            res['testpy'] = bench_testpy(opt.img_size, opt.job_repeats, opt.cfg, opt.weights, Path(tmp))
            print(testpy_table(res['testpy'], opt.img_size, opt.job_repeats))
            print(f'load {l0:.2f} -> {load1():.2f}')
        if 'jobs' in opt.only:
            l0 = load1()
            res['jobs'], res['job_forwards_s'] = bench_jobs(opt.img_size, opt.images, opt.job_repeats, opt.cfg,
                                                            opt.weights, Path(tmp), shlex.split(opt.detect_args))
            print(jobs_table(res['jobs'], opt.img_size, opt.images, opt.job_repeats, opt.detect_args,
                             res['job_forwards_s']))
            print(f'load {l0:.2f} -> {load1():.2f}')
    if opt.json:
        opt.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == '__main__':
    main()
