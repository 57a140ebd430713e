"""Training speed: seconds per epoch and images/s of train.py's loop (coco128, 320, batch 16, --notest).

    python benchmarks/bench_train.py                       # yolov3-tiny from the official weights, 2 epochs, CPU
    python benchmarks/bench_train.py --epochs 3 --amp bf16 --device cpu
    python benchmarks/bench_train.py --device 0            # CUDA (fp16 AMP by default there)

The first epoch includes worker start-up and caches; the figure reported is the mean of the later epochs (or the
only one). The test after the final epoch is not timed. Numbers depend on what else runs on the machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / 'shared'
COCO128 = SHARED / 'datasets' / 'coco128'


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this run: CUDA max allocated, or the process's peak RSS on the CPU (GB)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def bench_train(cfg: str | Path = ROOT / 'cfg' / 'yolov3-tiny.cfg', weights: str | Path = SHARED / 'weights' /
                'yolov3-tiny.weights', img_size: int = 320, batch_size: int = 16, epochs: int = 2,
                workers: int = 2, device: str = 'cpu', amp: str = 'auto', data: str | Path | None = None) -> dict:
    """Train `epochs` epochs with --notest in a temporary folder; return seconds per epoch, images/s, peak GB."""
    import train
    from utils.torch_utils import select_device

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if data is None:
            data = tmp / 'coco128.data'
            data.write_text(f"classes=80\ntrain={COCO128 / 'images' / 'train2017'}\n"
                            f"valid={COCO128 / 'images' / 'train2017'}\nnames={COCO128 / 'coco.names'}\n")
        opt = train.parse_opt(['--cfg', str(cfg), '--data', str(data), '--weights', str(weights), '--img-size',
                               str(img_size), '--epochs', str(epochs), '--batch-size', str(batch_size), '--notest',
                               '--nosave', '--workers', str(workers), '--device', device, '--amp', amp,
                               '--save-dir', str(tmp / 'run')])
        dev = select_device(device, batch_size=batch_size)
        times: list[tuple[float, int]] = []  # (seconds, images) per epoch, the test after the last one excluded
        real = train.train_one_epoch

        def timed_epoch(**kw):  # timed from outside the loop: train.py calls train_one_epoch with keywords
            t = time.perf_counter()
            out = real(**kw)
            times.append((time.perf_counter() - t, len(kw['loader'].dataset)))
            return out

        train.train_one_epoch = timed_epoch
        try:
            train.train(train.load_hyp(opt.hyp), opt, dev)
        finally:
            train.train_one_epoch = real
    timed = times[1:] or times  # skip the first epoch (worker start, page cache) when there are more
    seconds = sum(t for t, _ in timed) / len(timed)
    images = timed[0][1]
    return {'device': str(dev), 'img_size': img_size, 'batch_size': batch_size, 'epochs_timed': len(timed),
            'seconds_per_epoch': seconds, 'images_per_second': images / seconds,
            'peak_memory_gb': peak_memory_gb(dev), 'all_epochs_s': [round(t, 2) for t, _ in times]}


def main(args: list[str] | None = None) -> dict:
    """Command line: print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--cfg', default=str(ROOT / 'cfg' / 'yolov3-tiny.cfg'))
    p.add_argument('--weights', default=str(SHARED / 'weights' / 'yolov3-tiny.weights'))
    p.add_argument('--img-size', type=int, default=320)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', default='auto', choices=('auto', 'off', 'fp16', 'bf16'))
    p.add_argument('--data', default=None, help='dataset config (default: ../shared coco128)')
    o = p.parse_args(args)
    r = bench_train(o.cfg, o.weights, o.img_size, o.batch_size, o.epochs, o.workers, o.device, o.amp, o.data)
    print(f"train epoch ({r['device']}, {r['img_size']}, batch {r['batch_size']}): {r['seconds_per_epoch']:.1f} s "
          f"per epoch, {r['images_per_second']:.2f} images/s, peak memory {r['peak_memory_gb']:.2f} GB "
          f"(epochs: {r['all_epochs_s']} s)")
    return r


if __name__ == '__main__':
    main()
