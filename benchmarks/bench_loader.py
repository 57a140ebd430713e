"""Images per second of the training loader (mosaic + augmentation) over coco128, for this and other checkouts.

    python benchmarks/bench_loader.py                                  # this checkout
    python benchmarks/bench_loader.py --repo . --repo ../yolov3-orig   # side by side, same machine, same run

Each --repo is measured in its own Python process that imports `utils.data.datasets.LoadImagesAndLabels` from that
checkout (the original's constructor is compatible), so two versions never share modules. Numbers depend on the
machine and on what else runs on it: compare versions only within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / 'shared' / 'datasets' / 'coco128' / 'images' / 'train2017'
# the original's training augmentation (archive train.py): colour jitter on, geometric jitter off
# (degrees/translate/scale/shear * 0)
ARCHIVE_AUG = {'hsv_h': 0.0138, 'hsv_s': 0.678, 'hsv_v': 0.36, 'degrees': 0.0, 'translate': 0.0, 'scale': 0.0,
               'shear': 0.0}


def _measure_here(data: str, img_size: int, batch_size: int, workers: int, epochs: int, hyp: dict) -> dict:
    """Time the loader of whichever `utils.data.datasets` is first on sys.path; returns the figures as a dict."""
    import torch
    from torch.utils.data import DataLoader

    import utils.data.datasets as d  # resolved against the checkout put first on sys.path
    from utils.data.datasets import LoadImagesAndLabels

    if hasattr(d, 'DatasetOptions'):  # this checkout groups the dataset's options
        opts = d.DatasetOptions(img_size=img_size, batch_size=batch_size, augment=True, hyp=hyp)
        dataset = LoadImagesAndLabels(data, opts)
    else:  # the original's signature
        dataset = LoadImagesAndLabels(data, img_size, batch_size, augment=True, hyp=hyp, rect=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=LoadImagesAndLabels.collate_fn, persistent_workers=workers > 0)
    torch.manual_seed(0)
    for _ in loader:  # warm-up epoch: worker start, page cache
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for imgs, *_ in loader:
            n += imgs.shape[0]
    dt = time.perf_counter() - t0
    # CPU time per image in this process alone: less sensitive than wall time to other jobs on a shared machine
    c0 = time.process_time()
    for i in range(len(dataset)):
        dataset[i]
    cpu_ms = (time.process_time() - c0) / len(dataset) * 1e3
    return {'images': n, 'seconds': dt, 'images_per_s': n / dt, 'cpu_ms_per_image': cpu_ms,
            'module': sys.modules['utils.data.datasets'].__file__}


def loader_rate(repo: str | Path | None = None, data: str | Path = DEFAULT_DATA, img_size: int = 320,
                batch_size: int = 16, workers: int = 2, epochs: int = 3, hyp: dict | None = None) -> float:
    """Images/s of `repo`'s LoadImagesAndLabels (augment=True, mosaic) in a DataLoader; repo None = this checkout."""
    return loader_figures(repo, data, img_size, batch_size, workers, epochs, hyp)['images_per_s']


def loader_figures(repo: str | Path | None = None, data: str | Path = DEFAULT_DATA, img_size: int = 320,
                   batch_size: int = 16, workers: int = 2, epochs: int = 3, hyp: dict | None = None) -> dict:
    """loader_rate's measurement in full: images (delivered by the timed epochs), seconds, images_per_s, ..."""
    return _run(repo or ROOT, data, img_size, batch_size, workers, epochs, hyp or ARCHIVE_AUG)


def _run(repo: str | Path, data: str | Path, img_size: int, batch_size: int, workers: int, epochs: int,
         hyp: dict) -> dict:
    """Measure in a fresh interpreter whose sys.path starts with repo."""
    args = {'data': str(Path(data).resolve()), 'img_size': img_size, 'batch_size': batch_size, 'workers': workers,
            'epochs': epochs, 'hyp': hyp}
    code = (f'import json, sys; sys.path.insert(0, {str(Path(repo).resolve())!r}); '
            f'sys.path.insert(1, {str(Path(__file__).resolve().parent)!r}); '
            f'from bench_loader import _measure_here; '
            f'print("RESULT " + json.dumps(_measure_here(**json.loads(sys.argv[1]))))')
    r = subprocess.run([sys.executable, '-c', code, json.dumps(args)], cwd=str(Path(repo).resolve()),
                       capture_output=True, text=True, env={**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'})
    lines = [x for x in r.stdout.splitlines() if x.startswith('RESULT ')]
    if r.returncode or not lines:
        raise RuntimeError(f'benchmark of {repo} failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-3000:]}')
    return json.loads(lines[-1][len('RESULT '):])


def main() -> None:
    """Command line: measure each --repo and print images/s (and the ratio to the first)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repo', action='append', help='checkout to measure (repeatable); default: this one')
    ap.add_argument('--data', default=str(DEFAULT_DATA), help='image folder or .txt list')
    ap.add_argument('--img-size', type=int, default=320)
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--epochs', type=int, default=3, help='timed epochs, after one warm-up epoch')
    ap.add_argument('--hyp', help='YAML with hsv_h/s/v, degrees, translate, scale, shear (default: the archive values)')
    opt = ap.parse_args()
    hyp = dict(ARCHIVE_AUG)
    if opt.hyp:
        import yaml
        hyp.update({k: v for k, v in yaml.safe_load(Path(opt.hyp).read_text()).items() if k in ARCHIVE_AUG})
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f'mosaic loader, {opt.data}, {opt.img_size} px, batch {opt.batch_size}, {opt.workers} workers, '
          f'{os.cpu_count()} CPUs, load average {load:.2f} at start')
    first = None
    for repo in opt.repo or [str(ROOT)]:
        res = _run(repo, opt.data, opt.img_size, opt.batch_size, opt.workers, opt.epochs, hyp)
        first = first or res['images_per_s']
        print(f"{repo}: {res['images_per_s']:.1f} images/s ({res['images']} images in {res['seconds']:.2f} s, "
              f"{res['module']}) x{res['images_per_s'] / first:.2f} of the first; "
              f"{res['cpu_ms_per_image']:.2f} CPU ms per image in one process")


if __name__ == '__main__':
    main()
