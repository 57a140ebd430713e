"""Forward-pass time of a fused eval model in fp32, bf16 autocast and bf16 weights on the CPU, interleaved.

    python benchmarks/bench_half.py --cfg cfg/yolov3-tiny.cfg --img-size 416 --batch-size 1 --reps 21
    python benchmarks/bench_half.py --threads 1      # one thread each: the kernels' ratio, less hurt by busy cores

The measurement behind test.py's and detect.py's --half default (bf16 weights where the CPU has native bf16): the
three variants run in turn in every repetition, so load from other processes falls on all of them alike; the median
of each is printed with its speed-up over fp32. Random weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import Darknet  # noqa: E402
from utils.torch_utils import cpu_has_bf16  # noqa: E402


def variants(cfg: str, img_size: int, batch_size: int) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a no-argument forward pass returning inference_out: fp32, bf16 autocast, bf16 weights."""
    fp32 = Darknet(cfg, img_size).fuse().eval()
    bf16 = Darknet(cfg, img_size).fuse().eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to_dtype(torch.bfloat16)
    x = torch.rand(batch_size, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    xb = x.bfloat16()

    def autocast() -> torch.Tensor:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return fp32(x)[0]

    return {'fp32': lambda: fp32(x)[0], 'bf16 autocast': autocast, 'bf16 weights': lambda: bf16(xb)[0]}


@torch.no_grad()
def measure(cfg: str, img_size: int, batch_size: int, reps: int) -> dict[str, float]:
    """Median seconds per forward pass of each variant (one warm-up pass each, then reps interleaved rounds)."""
    runs = variants(cfg, img_size, batch_size)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        f()
    for _ in range(reps):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--cfg', default=str(ROOT / 'cfg' / 'yolov3-tiny.cfg'))
    p.add_argument('--img-size', type=int, default=416)
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--reps', type=int, default=21)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    opt = p.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    if not cpu_has_bf16():
        print('WARNING: this CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 is emulated and slow here')
    with contextlib.redirect_stdout(sys.stderr):  # the cfg's notes, if any, away from the table
        med = measure(opt.cfg, opt.img_size, opt.batch_size, opt.reps)
    print(f'{Path(opt.cfg).name} at {opt.img_size}, batch {opt.batch_size}, {torch.get_num_threads()} threads, '
          f'median of {opt.reps}')
    for k, s in med.items():
        print(f'{k:14s} {s * 1e3:8.1f} ms  {opt.batch_size / s:7.1f} images/s  {med["fp32"] / s:5.2f}x')
    return 0


if __name__ == '__main__':
    sys.exit(main())
