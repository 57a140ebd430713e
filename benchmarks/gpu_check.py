"""The inputs of the GPU checks (tests/test_gpu.py), packed so they travel to a machine without ../shared.

    python benchmarks/gpu_check.py --pack            # here, once: coco128, the weights, 2 samples into gpu_inputs/

The checks themselves are pytest tests under the `gpu` marker (README: "GPU checks"). They read a coco128 folder
(images/train2017, labels/train2017, coco.names), the official yolov3-tiny.weights and a folder with bus.jpg and
zidane.jpg: from `--gpu-inputs DIR` (a folder this script wrote), else ../shared, else gpu_inputs/. `--pack` copies
exactly those files (about 56 MiB) and refuses when they and the checkout (tracked and untracked, not ignored files:
what the device tool sends beside a carried folder) pass the 64 MiB that travels.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('YOLO_SHARED', ROOT.parent / 'shared')).resolve()
PACK_DIR = ROOT / 'gpu_inputs'  # git-ignored (.gitignore)
SAMPLES = ('bus', 'zidane')  # the sample images detect.py runs on


@dataclass
class Inputs:
    """Where the data, the weights and the sample images come from."""
    data_dir: Path  # coco128: images/train2017, labels/train2017, coco.names
    weights: Path  # yolov3-tiny.weights
    samples: Path  # bus.jpg, zidane.jpg

    @classmethod
    def under(cls, base: Path) -> Inputs:
        """The layout of a pack folder."""
        return cls(base / 'coco128', base / 'weights' / 'yolov3-tiny.weights', base / 'samples')

    def files(self) -> list[tuple[Path, str]]:
        """(source, path relative to a pack folder) of every input file."""
        out = [(self.weights, 'weights/yolov3-tiny.weights'), (self.data_dir / 'coco.names', 'coco128/coco.names')]
        out += [(self.samples / f'{s}.jpg', f'samples/{s}.jpg') for s in SAMPLES]
        for sub in ('images', 'labels'):
            for f in sorted((self.data_dir / sub / 'train2017').glob('*')):
                out.append((f, f'coco128/{sub}/train2017/{f.name}'))
        return out

    def missing(self) -> list[str]:
        """The inputs that do not exist (empty when all do)."""
        need = [self.data_dir / 'images' / 'train2017', self.data_dir / 'labels' / 'train2017',
                self.data_dir / 'coco.names', self.weights] + [self.samples / f'{s}.jpg' for s in SAMPLES]
        return [str(p) for p in need if not p.exists()]


def shared_inputs() -> Inputs:
    """The inputs in ../shared (YOLO_SHARED moves it)."""
    return Inputs(SHARED / 'datasets' / 'coco128', SHARED / 'weights' / 'yolov3-tiny.weights', SHARED / 'samples')


def default_inputs(base: Path | None = None) -> Inputs:
    """A pack folder if given, else ../shared, else gpu_inputs/ when ../shared is absent."""
    if base is None and (SHARED.is_dir() or not PACK_DIR.is_dir()):
        return shared_inputs()
    return Inputs.under((base or PACK_DIR).resolve())


def checkout_bytes(root: Path = ROOT) -> int:
    """Bytes of what the device tool sends besides carried folders: tracked and untracked, not ignored, files."""
    r = subprocess.run(['git', 'ls-files', '-coz', '--exclude-standard'], cwd=root, capture_output=True, check=True)
    return sum((root / f).stat().st_size for f in r.stdout.decode().split('\0') if f and (root / f).is_file())


def pack(inputs: Inputs, dst: Path, limit_mib: float = 64.0, other_bytes: int = 0) -> int:
    """Copy exactly the inputs into dst (replacing an earlier pack); returns the bytes copied.

    other_bytes: what travels beside the pack (the checkout), counted against the same limit.
    """
    missing = inputs.missing()
    if missing:
        raise SystemExit(f'gpu_check: missing input: {", ".join(missing)} (see --data-dir, --weights, --samples)')
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


def main(argv: list[str] | None = None) -> int:
    """Copy the inputs (from ../shared unless named) into the pack folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--pack', nargs='?', const=PACK_DIR, type=Path, required=True,
                   help=f'copy the inputs into this folder (default {PACK_DIR.name}/, git-ignored)')
    p.add_argument('--data-dir', type=Path, help='coco128 folder (images/train2017, labels/train2017, coco.names)')
    p.add_argument('--weights', type=Path, help='yolov3-tiny.weights')
    p.add_argument('--samples', type=Path, help='folder with bus.jpg and zidane.jpg')
    opt = p.parse_args(argv)
    d = shared_inputs()
    inputs = Inputs(Path(opt.data_dir or d.data_dir).resolve(), Path(opt.weights or d.weights).resolve(),
                    Path(opt.samples or d.samples).resolve())
    dst = opt.pack.resolve()
    other = checkout_bytes() if ROOT in dst.parents else 0
    total = pack(inputs, dst, other_bytes=other)
    shown = os.path.relpath(dst)  # as the device command names it: relative to the checkout it runs in
    print(f'gpu_check: copied {len(inputs.files())} files, {total / 2 ** 20:.1f} MiB, into {shown} (with the '
          f'checkout {(total + other) / 2 ** 20:.1f} of 64 MiB travel); carry it and run the checks with '
          f'--gpu-inputs {shown}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
