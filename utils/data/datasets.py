"""Datasets and loaders: checked image/label lists with a label cache, the training dataset (letterbox, rectangular
batches, mosaic, affine, HSV, flip), create_dataloader, and the detect.py sources (images, videos, webcam, streams)."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import math
import os
import sys
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.distributed as dist
from PIL import ExifTags, Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.boxes import xyxy2xywh
from utils.data.augmentations import (
    augment_hsv,
    combine_mosaic,
    letterbox,
    random_affine,
)
from utils.data.config import DatasetError
from utils.data.samplers import (
    EpochSampler,
    RectDistributedSampler,
    SampleKey,
    ShuffleSampler,
    WeightedImageSampler,
    sample_rng,
)
from utils.data.signals import PreemptionSafeLoader, ignore_preemption_signals
from utils.data.sources import IMG_FORMATS, VID_FORMATS  # noqa: F401  (VID_FORMATS: re-exported)
from utils.files import atomic_write
from utils.logs import LOGGER, shows_progress

AUG_KEYS = ('degrees', 'translate', 'scale', 'shear', 'hsv_h', 'hsv_s', 'hsv_v')  # hyp entries augmentation reads
CACHE_VERSION = 1  # bump when the cache layout or the checks change
AUTO_CACHE_BYTES = 1 << 30  # training sets whose decoded images fit in this (and 30% of free RAM) are cached in RAM
ORIENTATION = next(k for k, v in ExifTags.TAGS.items() if v == 'Orientation')
_REPORTED: set[str] = set()  # fault messages already logged by this process (train and val may share a folder)
__all__ = ['LoadImagesAndLabels', 'RectDistributedSampler', 'SampleKey', 'PreemptionSafeLoader', 'create_dataloader',
           'letterbox', 'img2label_paths', 'list_image_files', 'verify_image_label', 'IMG_FORMATS', 'VID_FORMATS']


def img2label_paths(img_paths: Sequence[str]) -> list[str]:
    """Label path of each image: the last `/images/` directory becomes `/labels/`, the extension `.txt`."""
    sa, sb = f'{os.sep}images{os.sep}', f'{os.sep}labels{os.sep}'
    out = []
    for p in img_paths:
        head, sep, tail = p.rpartition(sa)
        p = head + sb + tail if sep else p
        out.append(os.path.splitext(p)[0] + '.txt')
    return out


def list_image_files(path: str | Path | Sequence[str | Path]) -> list[str]:
    """Image files of a folder (recursive), a .txt list (relative entries against its folder), a glob, or a list."""
    files: list[str] = []
    for p in path if isinstance(path, (list, tuple)) else [path]:
        p = str(p)
        if '*' in p:
            files += glob.glob(p, recursive=True)
        elif os.path.isdir(p):
            files += glob.glob(os.path.join(p, '**', '*.*'), recursive=True)
        elif os.path.isfile(p) and p.rsplit('.', 1)[-1].lower() in IMG_FORMATS:
            files.append(p)
        elif os.path.isfile(p):
            parent = Path(p).resolve().parent
            try:
                lines = Path(p).read_text(encoding='utf-8').splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise DatasetError(f"{p}: cannot read image list: {e}") from e
            for x in (x.strip() for x in lines):
                if x and not x.startswith('#'):
                    files.append(x if os.path.isabs(x) else os.path.normpath(parent / x))
        else:
            raise DatasetError(f"{p} does not exist")
    files = sorted({os.path.normpath(f) for f in files if f.rsplit('.', 1)[-1].lower() in IMG_FORMATS})
    if not files:
        raise DatasetError(f"{path}: no images found (formats: {', '.join(IMG_FORMATS)})")
    return files


def exif_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of a PIL image as displayed, i.e. after its EXIF orientation (which cv2.imread applies)."""
    w, h = img.size
    with contextlib.suppress(Exception):
        if img.getexif().get(ORIENTATION) in (5, 6, 7, 8):  # the four orientations that swap the axes
            return h, w
    return w, h


def _check_image(im_file: str) -> tuple[int, int]:
    """(w, h) of an image that opens and decodes; raises ValueError with the reason otherwise."""
    if os.path.getsize(im_file) == 0:
        raise ValueError('empty file (0 bytes)')
    try:
        with Image.open(im_file) as im:
            im.verify()  # structure and checksums, without decoding the pixels
        with Image.open(im_file) as im:  # verify() leaves the image unusable: reopen
            shape, fmt = exif_size(im), im.format
            if fmt == 'JPEG':
                with open(im_file, 'rb') as f:
                    f.seek(-2, 2)
                    if f.read() != b'\xff\xd9':  # no end-of-image marker: decode it all to see if it is truncated
                        im.load()
    except UnidentifiedImageError as e:
        raise ValueError('not an image (cannot identify the format)') from e
    except (OSError, SyntaxError) as e:
        raise ValueError(f'corrupt image ({e})') from e
    if shape[0] < 10 or shape[1] < 10:
        raise ValueError(f'image size {shape[0]}x{shape[1]} is under 10 pixels')
    return shape


def _check_labels(lb_file: str, nc: int | None) -> tuple[np.ndarray, int]:
    """(n, 5) float32 labels of a label file and the number of duplicate rows dropped; ValueError naming the line."""
    rows, lines = [], []
    with open(lb_file, encoding='utf-8') as f:
        for i, line in enumerate(f.read().splitlines(), 1):
            if line.strip():
                rows.append(line.split())
                lines.append(i)
    for parts, i in zip(rows, lines):
        if len(parts) != 5:
            raise ValueError(f'line {i}: {len(parts)} numbers, expected 5 (class x_center y_center width height)')
        try:
            values = [float(v) for v in parts]
        except ValueError as e:
            raise ValueError(f'line {i}: not a number ({e})') from e
        c, x, y, w, h = values
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f'line {i}: non-finite value')
        if c != int(c) or c < 0 or (nc is not None and c >= nc):
            raise ValueError(f'line {i}: class {parts[0]} not in [0, {nc if nc is not None else "nc"})')
        if not all(0 <= v <= 1 for v in (x, y, w, h)):
            raise ValueError(f'line {i}: coordinates must be normalised to [0, 1], got {" ".join(parts[1:])}')
        if w <= 0 or h <= 0:
            raise ValueError(f'line {i}: width and height must be > 0, got {parts[3]} {parts[4]}')
    labels = np.array(rows, dtype=np.float32).reshape(-1, 5)
    _, first = np.unique(labels, axis=0, return_index=True)
    return labels[np.sort(first)], len(labels) - len(first)


def verify_image_label(im_file: str, lb_file: str, nc: int | None = None
                       ) -> tuple[np.ndarray | None, tuple[int, int] | None, str, str]:
    """Check one image and its label file: (labels (n, 5) or None if unusable, (w, h), status, message).

    status is 'found', 'missing' (no label file), 'empty' or 'corrupt'; message names the faulty file and why.
    """
    try:
        shape = _check_image(im_file)
    except (OSError, ValueError) as e:
        return None, None, 'corrupt', f'{im_file}: skipped: {e}'
    if not os.path.isfile(lb_file):
        return np.zeros((0, 5), dtype=np.float32), shape, 'missing', ''
    try:
        labels, ndup = _check_labels(lb_file, nc)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, None, 'corrupt', f'{lb_file}: skipped with its image: {e}'
    msg = f'{lb_file}: {ndup} duplicate label rows dropped' if ndup else ''
    return labels, shape, 'found' if len(labels) else 'empty', msg


def _files_hash(files: Sequence[str], extra: str = '') -> str:
    """md5 of the file list with each file's size and mtime (absent files count as absent)."""
    h = hashlib.md5(f'{CACHE_VERSION}{extra}'.encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f'{f}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
        except OSError:
            h.update(f'{f}\0-\n'.encode())
    return h.hexdigest()


def _dir_writable(d: Path) -> bool:
    """True if files may be created in d; a folder without any write permission bit counts as read-only even for
    root, who ignores the bits (read-only shares are often exported that way)."""
    try:
        return bool(os.stat(d).st_mode & 0o222) and os.access(d, os.W_OK)
    except OSError:
        return False


def _available_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable on Linux)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open('/proc/meminfo') as f:
            return int(next(x for x in f if x.startswith('MemAvailable:')).split()[1]) * 1024
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


@dataclass(frozen=True)
class DatasetOptions:
    """What LoadImagesAndLabels makes of a folder or list of images: size, batching, training augmentation, labels."""
    img_size: int = 416  # long side of each image (training: the square mosaic's side)
    batch_size: int = 16  # rect: one planned shape per batch of this many images
    augment: bool = False  # training augmentation (mosaic unless rect, affine, HSV, flips); needs hyp
    hyp: dict | None = None  # augmentation hyperparameters (AUG_KEYS)
    rect: bool = False  # rectangular batches (images sorted by aspect ratio), no mosaic
    image_weights: bool = False  # images drawn by class weights (WeightedImageSampler); rect off
    cache_images: bool = False  # decode every image into RAM once
    single_cls: bool = False  # every label's class becomes 0
    pad: float = 0.0  # rect: padding around each batch shape, in strides
    stride: int = 32  # rect shapes are multiples of it
    nc: int | None = None  # label classes are checked against it once (required for training)
    prefix: str = ''  # start of the dataset's messages ('train: ', 'val: ')
    seed: int = 0  # with (epoch, k): each sample's augmentation; and the samplers' order


@dataclass(frozen=True)
class LoaderOptions:
    """How create_dataloader deals a dataset's batches: processes, workers, order."""
    rank: int = -1  # this process's rank (-1: a single process)
    world_size: int = 1  # processes sharing each epoch's order
    workers: int = 8  # DataLoader workers, at most
    shuffle: bool = True  # a new order every epoch (off with rect)
    pin_memory: bool = False  # only for loaders that feed a CUDA device


class LoadImagesAndLabels(Dataset):
    """Images with YOLO labels for training and testing, checked once and cached (see README: data pipeline)."""

    def __init__(self, path: str | Path | Sequence[str | Path], opts: DatasetOptions = DatasetOptions(),
                 rank: int = -1):
        img_size, batch_size, augment = opts.img_size, opts.batch_size, opts.augment
        self.img_size = img_size
        self.seed = opts.seed  # with (epoch, k) of each SampleKey, seeds that sample's augmentation
        self.augment = augment
        self.hyp = opts.hyp or {}
        # with image weights the loader's WeightedImageSampler draws the images (see create_dataloader): no rect batches
        self.rect = False if opts.image_weights else opts.rect
        self.mosaic = self.augment and not self.rect  # four images at a time, training only
        self.stride = opts.stride
        self.path = path
        self.main = rank in (-1, 0)  # the process that writes the label cache
        self.prefix = opts.prefix
        missing = [k for k in AUG_KEYS if k not in self.hyp] if augment else []
        if missing:
            raise ValueError(f"augment=True needs hyp values for {', '.join(missing)}")

        img_files = list_image_files(path)
        cache = self._load_or_scan(path, img_files, img2label_paths(img_files), opts.nc)
        nf, nm, ne, ncor = (cache['counts'][k] for k in ('found', 'missing', 'empty', 'corrupt'))
        if not cache['files']:
            raise DatasetError(f"{path}: no usable images ({ncor} corrupt of {len(img_files)})")
        if augment and nf == 0:
            raise DatasetError(f"{path}: no labels found in {nm + ne} images (label folder "
                               f"{Path(img2label_paths(img_files[:1])[0]).parent}); cannot train without labels")

        self.img_files = list(cache['files'])
        self.label_files = img2label_paths(self.img_files)
        self.labels = [lb.numpy() for lb in cache['labels']]  # (n, 5) float32 [class, x, y, w, h] each
        if opts.single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        self.shapes = cache['shapes'].numpy().astype(np.float64)  # (n, 2) original (w, h), EXIF-corrected
        n = len(self.img_files)
        self.n = n
        self.batch = np.floor(np.arange(n) / batch_size).astype(int)  # batch index of each image
        if self.rect:
            self._set_rect_batches(batch_size, opts.pad)

        self.imgs: list[np.ndarray | None] = [None] * n
        self.img_hw0: list[tuple[int, int] | None] = [None] * n
        self.img_hw: list[tuple[int, int] | None] = [None] * n
        if opts.cache_images:
            self._cache_images()
        elif augment and self._cache_bytes() <= min(AUTO_CACHE_BYTES, 0.3 * _available_memory()):
            # a small training set is decoded once instead of 4 times per mosaic every epoch: JPEG decoding is most
            # of the loader's work, and on few cores it competes with training (sizes: benchmarks/README.md)
            self._cache_images()

    def _log(self, msg: str) -> None:
        """Log a line with the dataset's prefix ('train: ')."""
        LOGGER.info(self.prefix + msg)

    def _warn(self, msg: str) -> None:
        """Log a fault message once per process, above any progress bar ('train: WARNING: ...')."""
        if msg not in _REPORTED:
            _REPORTED.add(msg)
            with tqdm.external_write_mode():  # clears the bars, writes, draws them again (as tqdm.write)
                LOGGER.warning(self.prefix + msg, extra={'prefix': self.prefix})

    def _load_or_scan(self, path: Any, img_files: list[str], label_files: list[str], nc: int | None) -> dict:
        """The checked labels of img_files: from the cache next to the labels when it is current, else a scan."""
        single = path[0] if isinstance(path, (list, tuple)) and len(path) == 1 else path
        if (isinstance(single, (str, Path)) and os.path.isfile(single)
                and str(single).rsplit('.', 1)[-1].lower() not in IMG_FORMATS):  # beside a .txt list
            cache_path = Path(single).with_suffix('.cache')
        else:  # labels/train2017 -> labels/train2017.cache
            cache_path = Path(label_files[0]).parent.with_suffix('.cache')
        key = _files_hash(img_files + label_files, extra=f'nc={nc}')
        cache = None
        if cache_path.is_file():
            with contextlib.suppress(Exception):  # unreadable or foreign file: scan again
                cache = torch.load(cache_path, weights_only=True)
                if cache.get('version') != CACHE_VERSION or cache.get('hash') != key:
                    cache = None
        if cache is not None:
            self._log(f"Scanning '{cache_path}' (cached) ... {self._summary(cache['counts'])}")
            for msg in cache['msgs']:
                self._warn(msg)
            return cache
        cache = self._scan(img_files, label_files, nc)
        cache.update(version=CACHE_VERSION, hash=key)
        if self.main:
            if _dir_writable(cache_path.parent):
                try:
                    atomic_write(cache_path, lambda f: torch.save(cache, f))  # a reader never sees half a cache
                    self._log(f'New cache created: {cache_path}')
                except OSError as e:
                    self._log(f'Label cache not saved ({cache_path}: {e.strerror or e})')
            else:
                self._log(f'Label cache not saved: {cache_path.parent} is read-only')
        return cache

    def _scan(self, img_files: list[str], label_files: list[str], nc: int | None) -> dict:
        """Check every image and label file (threads, one progress bar); print each fault once and a summary."""
        counts = {'found': 0, 'missing': 0, 'empty': 0, 'corrupt': 0}
        files, labels, shapes, msgs = [], [], [], []
        desc = f"Scanning '{Path(label_files[0]).parent}' images and labels"
        with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
            results = pool.imap(lambda a: verify_image_label(*a, nc), zip(img_files, label_files), chunksize=16)
            pbar = tqdm(results, desc=self.prefix + desc, total=len(img_files), disable=not shows_progress(),
                        file=sys.stderr)
            for (lb, shape, status, msg), im_file in zip(pbar, img_files):  # the bar first: it reaches 100%
                counts[status] += 1
                if msg:
                    msgs.append(msg)
                    self._warn(msg)
                if lb is not None:
                    files.append(im_file)
                    labels.append(torch.from_numpy(lb))
                    shapes.append(shape)
                pbar.set_postfix_str(self._summary(counts), refresh=False)
            pbar.close()
        self._log(f"{desc}... {self._summary(counts)}")
        return {'files': files, 'labels': labels, 'shapes': torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2),
                'counts': counts, 'msgs': msgs}

    @staticmethod
    def _summary(c: dict) -> str:
        """The one summary line: found / missing / empty / corrupt counts."""
        return f"{c['found']} found, {c['missing']} missing, {c['empty']} empty, {c['corrupt']} corrupt"

    def _set_rect_batches(self, batch_size: int, pad: float) -> None:
        """Sort by aspect ratio and give each batch the smallest stride-multiple shape that fits its images."""
        ar = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        irect = ar.argsort()
        self.img_files = [self.img_files[i] for i in irect]
        self.label_files = [self.label_files[i] for i in irect]
        self.labels = [self.labels[i] for i in irect]
        self.shapes = self.shapes[irect]
        ar = ar[irect]
        nb = int(self.batch[-1]) + 1
        shapes = np.ones((nb, 2))  # (h, w) relative to img_size
        for i in range(nb):
            ari = ar[self.batch == i]
            mini, maxi = ari.min(), ari.max()
            if maxi < 1:
                shapes[i] = [maxi, 1]
            elif mini > 1:
                shapes[i] = [1, 1 / mini]
        self.batch_shapes = np.ceil(shapes * self.img_size / self.stride + pad).astype(int) * self.stride

    def _cache_bytes(self) -> int:
        """RAM that the decoded, resized images take."""
        r = self.img_size / self.shapes.max(1)
        return int((np.floor(self.shapes[:, 0] * r) * np.floor(self.shapes[:, 1] * r) * 3).sum())

    def _cache_images(self) -> None:
        """Decode and resize every image into RAM, after saying how much that takes; refuse if it would not fit."""
        need = self._cache_bytes()
        avail = _available_memory()
        self._log(f'Caching images needs {need / 1e9:.2f} GB of RAM ({avail / 1e9:.2f} GB available)')
        if need > 0.8 * avail:  # leave room for the model, the workers and the rest of the system
            LOGGER.warning(f'{self.prefix}not caching images: {need / 1e9:.2f} GB would not fit in the '
                           f'{avail / 1e9:.2f} GB available; images are read from disk instead',
                           extra={'prefix': self.prefix})
            return
        with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
            for i, (img, hw0, hw) in enumerate(pool.imap(self.load_image, range(self.n))):
                self.imgs[i], self.img_hw0[i], self.img_hw[i] = img, hw0, hw

    def __len__(self) -> int:
        return len(self.img_files)

    def load_image(self, index: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """BGR uint8 image resized so its long side is img_size; returns (img, (h0, w0) original, (h, w) resized)."""
        if self.imgs[index] is not None:
            return self.imgs[index], self.img_hw0[index], self.img_hw[index]
        path = self.img_files[index]
        w0, h0 = (int(v) for v in self.shapes[index])
        r = self.img_size / max(h0, w0)
        flag = cv2.IMREAD_COLOR
        if self.augment:  # training: let the JPEG decoder downscale by 2, 4 or 8 (DCT scaling, far faster)
            for f, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                               (2, cv2.IMREAD_REDUCED_COLOR_2)):
                if r * f <= 1:
                    flag = reduced
                    break
        img = cv2.imread(path, flag)  # BGR, EXIF orientation applied
        if img is None:
            raise DatasetError(f'{path}: image can no longer be read (changed since the dataset was checked?)')
        if r != 1:
            new = (int(w0 * r), int(h0 * r))
            dw, dh = abs(img.shape[1] - new[0]), abs(img.shape[0] - new[1])
            reduced_close = flag != cv2.IMREAD_COLOR and dw <= 1 and dh <= 1  # the decoder rounds up odd sizes
            if (dw or dh) and not reduced_close:  # a 1-pixel resample would only blur; labels are normalised
                # INTER_AREA only when shrinking for testing, INTER_LINEAR otherwise (the choice changes test mAP)
                interp = cv2.INTER_AREA if r < 1 and not self.augment else cv2.INTER_LINEAR
                img = cv2.resize(img, new, interpolation=interp)
        return img, (h0, w0), img.shape[:2]

    def load_mosaic(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Mosaic of this image and three random others, then the random affine cropping it to img_size."""
        s = self.img_size
        xc, yc = (int(v) for v in rng.uniform(s * 0.5, s * 1.5, 2))  # mosaic centre
        indices = [index] + rng.integers(0, self.n, 3).tolist()
        imgs = [self.load_image(i)[0] for i in indices]
        img4, labels4 = combine_mosaic(imgs, [self.labels[i] for i in indices], s, xc, yc)
        hyp = self.hyp
        return random_affine(img4, labels4, degrees=hyp['degrees'], translate=hyp['translate'],
                             scale=hyp['scale'], shear=hyp['shear'], border=-s // 2, rng=rng)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, torch.Tensor, str, tuple | None]:
        """(img uint8 (3, H, W) RGB, labels (n, 6) [0, cls, x, y, w, h] normalised, path, shapes or None).

        key is a training sampler's SampleKey(epoch, k, index), whose augmentation is seeded by (seed, epoch, k), or
        a plain image index i, augmented as SampleKey(0, i, i) (the same every time).
        """
        if isinstance(key, SampleKey):
            epoch, k, index = key
        else:
            index = int(key)
            epoch, k = 0, index
        rng = sample_rng(self.seed, epoch, k) if self.augment else None  # draws: mosaic, affine, HSV, flip
        hyp = self.hyp
        if self.mosaic:
            img, labels = self.load_mosaic(index, rng)
            shapes = None
        else:
            img, (h0, w0), (h, w) = self.load_image(index)
            shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
            img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
            shapes = (h0, w0), ((h / h0, w / w0), pad)  # for rescaling predictions to the original (COCO mAP)
            x = self.labels[index]
            labels = np.zeros((len(x), 5), dtype=np.float32)
            if len(x):  # normalised xywh -> letterboxed pixel xyxy
                labels[:, 0] = x[:, 0]
                labels[:, 1] = ratio[0] * w * (x[:, 1] - x[:, 3] / 2) + pad[0]
                labels[:, 2] = ratio[1] * h * (x[:, 2] - x[:, 4] / 2) + pad[1]
                labels[:, 3] = ratio[0] * w * (x[:, 1] + x[:, 3] / 2) + pad[0]
                labels[:, 4] = ratio[1] * h * (x[:, 2] + x[:, 4] / 2) + pad[1]
            if self.augment:
                img, labels = random_affine(img, labels, degrees=hyp['degrees'], translate=hyp['translate'],
                                            scale=hyp['scale'], shear=hyp['shear'], rng=rng)
        if self.augment:
            augment_hsv(img, hgain=hyp['hsv_h'], sgain=hyp['hsv_s'], vgain=hyp['hsv_v'], rng=rng)

        nl = len(labels)
        if nl:  # pixel xyxy -> normalised xywh
            labels[:, 1:5] = xyxy2xywh(labels[:, 1:5])
            labels[:, [2, 4]] /= img.shape[0]
            labels[:, [1, 3]] /= img.shape[1]
        flip = self.augment and rng.random() < 0.5  # left-right only
        if flip and nl:
            labels[:, 1] = 1 - labels[:, 1]
        labels_out = torch.zeros((nl, 6))
        if nl:
            labels_out[:, 1:] = torch.from_numpy(labels)
        # BGR HWC -> RGB CHW (and the flip) in one copy: (3, H, W) uint8
        img = img[:, ::-1, ::-1] if flip else img[:, :, ::-1]
        img = np.ascontiguousarray(img.transpose(2, 0, 1))
        return torch.from_numpy(img), labels_out, self.img_files[index], shapes

    @staticmethod
    def collate_fn(batch: list) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """Stack images (B, 3, H, W) and join targets (n, 6) with column 0 the image's index in the batch."""
        img, label, path, shapes = zip(*batch)
        for i, lb in enumerate(label):
            lb[:, 0] = i
        return torch.stack(img, 0), torch.cat(label, 0), path, shapes


@contextlib.contextmanager
def _rank_zero_first(rank: int) -> Iterator[None]:
    """Let rank 0 build the dataset (and its label cache) before the other ranks read it."""
    sync = rank != -1 and dist.is_available() and dist.is_initialized()
    if sync and rank > 0:
        dist.barrier()
    yield
    if sync and rank == 0:
        dist.barrier()


def _worker_init(worker_id: int, main_pid: int) -> None:
    """Keep OpenCV single-threaded in a DataLoader worker, and leave preemption signals to the main process."""
    cv2.setNumThreads(0)  # the workers are the parallelism; OpenCV's own threads would oversubscribe the cores
    ignore_preemption_signals(main_pid)


def create_dataloader(path: Any, opts: DatasetOptions, loading: LoaderOptions = LoaderOptions()
                      ) -> tuple[DataLoader, LoadImagesAndLabels]:
    """(DataLoader, dataset) for training or testing. A training loader (augment or shuffle) has one of our
    samplers (utils/data/samplers.py): call loader.sampler.set_epoch(epoch) before each epoch, set_start(batch) to resume
    inside one.

    The order comes from (seed, epoch) and each sample's augmentation from (seed, epoch, k), so the worker count does
    not change a batch. With world_size > 1 each rank gets its share of one global order; with rect the sampler deals
    whole planned batches (one shape per batch); with image_weights a WeightedImageSampler draws images with
    replacement (call its set_weights too). nc (required for training) checks every label's class once, here.
    """
    if opts.augment and opts.nc is None:
        raise ValueError('create_dataloader(augment=True) needs nc: label classes are checked against it once, in '
                         'the dataset, not in every training step')
    rank, seed, shuffle = loading.rank, opts.seed, loading.shuffle
    with _rank_zero_first(rank):
        dataset = LoadImagesAndLabels(path, replace(opts, stride=int(opts.stride)), rank=rank)
    train = opts.augment or shuffle
    if opts.rect and shuffle:
        LOGGER.info(f'{opts.prefix}Rectangular batches: shuffle and mosaic off')
        shuffle = False
    batch_size = min(opts.batch_size, len(dataset))
    world, r = max(loading.world_size, 1), max(rank, 0)
    nw = min((os.cpu_count() or 1) // world, batch_size if batch_size > 1 else 0, loading.workers)
    sampler: EpochSampler | None = None
    if opts.image_weights:  # the same weighted draw on every rank, sharded; train.py sets its weights each epoch
        sampler = WeightedImageSampler(len(dataset), world, r, seed=seed, batch_size=batch_size)
    elif world > 1 and dataset.rect:  # whole planned batches per rank: one shape per batch
        sampler = RectDistributedSampler(dataset, batch_size, world, r, shuffle=shuffle, seed=seed)
    elif train or world > 1:  # single process rect: the planned batches in order
        sampler = ShuffleSampler(len(dataset), batch_size, world, r, shuffle=shuffle, seed=seed)
    generator = torch.Generator()  # seeds only the workers' torch RNG, which the dataset does not draw from
    generator.manual_seed(seed + r * 1000)
    loader = PreemptionSafeLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=nw,
                                  pin_memory=loading.pin_memory, collate_fn=LoadImagesAndLabels.collate_fn,
                                  worker_init_fn=partial(_worker_init, main_pid=os.getpid()), generator=generator,
                                  persistent_workers=nw > 0)
    return loader, dataset
