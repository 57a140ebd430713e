"""The one builder of small coco128 datasets, shared by the tests and the benchmarks (standard library only, so the
benchmarks can import it when they time another checkout).

A subset is a folder with images/ and labels/ (the loader finds labels by that name swap, and writes its label cache
beside them, inside the subset) and a .data file that trains and validates on those images.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Subset:
    """A built subset: its .data file, folders, and what it holds."""
    data: Path  # the .data file
    images: Path
    labels: Path
    n_images: int
    n_targets: int  # label rows over all copies


def make_subset(coco: Path, dst: Path, n: int | None = None, start: int = 0, copies: int = 1, link: bool = False,
                name: str = 'subset', valid: Path | None = None) -> Subset:
    """Put the coco128 images [start, start + n) (sorted by name) and their labels `copies` times under dst.

    coco: a coco128 folder (images/train2017, labels/train2017, coco.names). link: symlink instead of copying (fast,
    but the files stay read-only where ../shared is). copies > 1 prefixes names with the copy's index (the loader
    drops duplicate paths). valid: the validation images of the .data file (default: the subset's own).
    """
    coco = coco.resolve()  # symlinks hold the absolute path: a relative one would resolve from the link's folder
    src_images, src_labels = coco / 'images' / 'train2017', coco / 'labels' / 'train2017'
    if not src_images.is_dir():
        raise FileNotFoundError(f'{src_images}: no coco128 images folder (expected images/train2017 under {coco})')
    images, labels = dst / 'images', dst / 'labels'
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    put = _symlink if link else shutil.copy
    chosen = sorted(src_images.glob('*.jpg'))[start:None if n is None else start + n]
    n_targets = 0
    for k in range(copies):
        prefix = f'{k}_' if copies > 1 else ''
        for im in chosen:
            put(im, images / f'{prefix}{im.name}')
            lb = src_labels / f'{im.stem}.txt'
            if lb.exists():
                put(lb, labels / f'{prefix}{lb.name}')
                n_targets += sum(1 for row in lb.read_text().splitlines() if row.strip())
    # the .data name must not contain 'coco.data': test.py would turn on COCO JSON scoring for it
    data = dst / f'{name}.data'
    data.write_text(f"classes=80\ntrain={images}\nvalid={valid or images}\nnames={coco / 'coco.names'}\n")
    return Subset(data, images, labels, len(chosen) * copies, n_targets)


def _symlink(src: Path, dst: Path) -> None:
    """Symlink dst -> src (shutil.copy's argument order)."""
    dst.symlink_to(src)
