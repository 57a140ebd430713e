"""Wall time and mAP of `python test.py` on coco128 at 416, for this and other checkouts, side by side.

    python benchmarks/bench_test.py                                   # this checkout
    python benchmarks/bench_test.py --repo . --repo ../yolov3-orig    # same machine, same run

Each --repo runs its own test.py command line in a fresh process (cwd = the checkout), so the time includes start-up,
model loading, data loading, inference, NMS and metrics: what a user waits for. The original's test.py finds --data
and --cfg by globbing under its checkout, so give such a checkout relative paths (e.g. --data data/coco128.data).
Numbers depend on the machine and on what else runs on it: compare versions only within one run.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
COCO128 = SHARED / 'datasets' / 'coco128'


def default_data(folder: Path) -> Path:
    """A .data file validating on ../shared coco128 (absolute paths)."""
    f = folder / 'coco128_bench.data'
    images = COCO128 / 'images' / 'train2017'
    f.write_text(f'classes=80\ntrain={images}\nvalid={images}\nnames={COCO128 / "coco.names"}\n')
    return f


def run_once(repo: Path, cfg: str, data: str, weights: str, img_size: int, batch_size: int,
             save_dir: str) -> dict:
    """Run test.py in repo; return wall seconds, the `all` row's mAP@0.5 and the printed speed line."""
    cmd = [sys.executable, 'test.py', '--cfg', cfg, '--data', data, '--weights', weights, '--img-size', str(img_size),
           '--batch-size', str(batch_size), '--device', 'cpu']
    if '--save-dir' in (repo / 'test.py').read_text():  # plots into a temporary folder, not the checkout
        cmd += ['--save-dir', save_dir]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f'{repo}: test.py failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-3000:]}')
    out = r.stdout + r.stderr
    m = re.search(r'^\s+all\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)', out, re.M)
    speed = re.search(r'^Speed:.*$', out, re.M)
    return {'seconds': dt, 'images': int(m.group(1)) if m else 0, 'map50': float(m.group(5)) if m else float('nan'),
            'speed': speed.group(0) if speed else ''}


def main() -> None:
    """Measure each --repo (best of --runs) and print seconds, mAP@0.5 and the speed-up against the first."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repo', action='append', help='checkout to measure (repeatable); default: this one')
    ap.add_argument('--cfg', default=str(ROOT / 'cfg' / 'yolov3-tiny.cfg'))
    ap.add_argument('--data', default='', help='dataset config (default: ../shared coco128, absolute paths)')
    ap.add_argument('--weights', default=str(SHARED / 'weights' / 'yolov3-tiny.weights'))
    ap.add_argument('--img-size', type=int, default=416)
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--runs', type=int, default=1, help='runs per checkout; the fastest is reported')
    opt = ap.parse_args()
    repos = [Path(r).resolve() for r in (opt.repo or [ROOT])]
    with tempfile.TemporaryDirectory() as tmp:
        data = opt.data or str(default_data(Path(tmp)))
        results = []
        for repo in repos:
            runs = [run_once(repo, opt.cfg, data, opt.weights, opt.img_size, opt.batch_size, tmp)
                    for _ in range(opt.runs)]
            best = min(runs, key=lambda x: x['seconds'])
            results.append(best)
            print(f"{repo}: {best['seconds']:.1f} s wall, {best['images']} images, mAP@0.5 {best['map50']:.3f}\n"
                  f"    {best['speed']}")
    if len(results) > 1:
        for repo, r in zip(repos[1:], results[1:]):
            print(f"{repos[0].name} is {r['seconds'] / results[0]['seconds']:.2f}x as fast as {repo.name}")


if __name__ == '__main__':
    main()
