"""Darknet's own JPEG decode (load_image_color in libdarknet.so: stb_image) as the oracle for utils/darknet/stb_jpeg.py.

    python tools/darknet_harness/stb_jpeg_check.py --darknet /tmp/darknet --coco128 128 \
        --images ../shared/samples/*.jpg --made          # every image: bit-identical or not
    python tools/darknet_harness/stb_jpeg_check.py --darknet /tmp/darknet --fixture tests/fixtures/stb_jpeg

--made writes JPEGs of every kind stb treats differently into --work (cv2: 4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1 at
every width and height 1..17 px, quality 100 and 5, progressive, restart intervals, 3000x2000; Pillow: grayscale,
grayscale progressive, RGB with Adobe transform 0, CMYK, the CMYK file's Adobe transform patched to 2 (YCCK) and
removed) and compares them too. --fixture writes a few tiny ones of each kind and the pixels libdarknet decoded for
them (pixels.npz: uint8 = Darknet's float * 255, exact) for tests/test_stb_jpeg.py.
Exit status 1 when any image is not bit-identical.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detector_oracle import COCO128_IMAGES, ROOT, StbImages  # noqa: E402

sys.path.insert(0, str(ROOT))
from utils.darknet import post as dp  # noqa: E402

CV_SAMPLING = {'444': cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, '422': cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
               '420': cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, '440': cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440,
               '411': cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411}


def pattern(w: int, h: int, seed: int) -> np.ndarray:
    """A seeded (h, w, 3) uint8 test picture: colour gradients, a hard edge and noise (large AC coefficients)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 100 * np.sin((x + y) / 3)], -1)
    base[(x // 5 + y // 7) % 2 == 1] = base[(x // 5 + y // 7) % 2 == 1][:, ::-1]
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def cv_jpeg(im: np.ndarray, sampling: str = '420', quality: int = 90, progressive: bool = False, rst: int = 0) -> bytes:
    """im (RGB) encoded by OpenCV's libjpeg with the given chroma sampling."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, CV_SAMPLING[sampling],
              cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive), cv2.IMWRITE_JPEG_RST_INTERVAL, rst]
    ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(im[:, :, ::-1]), params)
    assert ok
    return buf.tobytes()


def pil_jpeg(im: Image.Image, **kw) -> bytes:
    """im encoded by Pillow (grayscale, RGB kept as RGB, CMYK)."""
    b = io.BytesIO()
    im.save(b, 'JPEG', quality=90, **kw)
    return b.getvalue()


def set_adobe_transform(data: bytes, transform: int | None) -> bytes:
    """The JPEG with its Adobe APP14 colour-transform byte replaced, or the segment removed (None)."""
    i = data.index(b'Adobe') - 4  # FF EE, the length, 'Adobe', version, flags0, flags1, transform
    assert data[i:i + 2] == b'\xff\xee'
    length = int.from_bytes(data[i + 2:i + 4], 'big')
    if transform is None:
        return data[:i] + data[i + 2 + length:]
    return data[:i + 15] + bytes([transform]) + data[i + 16:]


def made_jpegs(tiny: bool) -> dict[str, bytes]:
    """name -> JPEG bytes of every kind; tiny: a few small ones per kind (the committed fixture)."""
    out: dict[str, bytes] = {}
    sizes = [(3, 2), (17, 10)] if tiny else [(w, h) for w in range(1, 18) for h in range(1, 18)]
    for s in CV_SAMPLING:
        for w, h in sizes + ([(1, 1)] if tiny and s == '420' else []):
            out[f'cv{s}_{w}x{h}.jpg'] = cv_jpeg(pattern(w, h, w * 100 + h), s)
    big = (19, 11) if tiny else (640, 480)
    im = pattern(*big, 7)
    out['cv420_q100.jpg'] = cv_jpeg(im, '420', 100)
    out['cv444_q5.jpg'] = cv_jpeg(im, '444', 5)
    out['cv420_progressive.jpg'] = cv_jpeg(im, '420', 90, progressive=True)
    out['cv422_progressive.jpg'] = cv_jpeg(im, '422', 90, progressive=True)
    out['cv420_rst1.jpg'] = cv_jpeg(im, '420', 90, rst=1)
    out['cv411_rst2_progressive.jpg'] = cv_jpeg(im, '411', 90, progressive=True, rst=2)
    rgb = Image.fromarray(im)
    out['pil_gray.jpg'] = pil_jpeg(rgb.convert('L'))
    out['pil_gray_progressive.jpg'] = pil_jpeg(rgb.convert('L'), progressive=True)
    out['pil_rgb_adobe0.jpg'] = pil_jpeg(rgb, keep_rgb=True)
    cmyk = pil_jpeg(rgb.convert('CMYK'))
    out['pil_cmyk.jpg'] = cmyk
    out['pil_cmyk_as_ycck.jpg'] = set_adobe_transform(cmyk, 2)
    out['pil_cmyk_no_adobe.jpg'] = set_adobe_transform(cmyk, None)
    if not tiny:
        out['cv420_3000x2000.jpg'] = cv_jpeg(pattern(3000, 2000, 3), '420', 95)
    return out


def compare(paths: list[Path], stb: StbImages) -> tuple[int, list[str]]:
    """(bit-identical count, a line per image that is not) for dp.load_image against libdarknet's load_image_color."""
    same, bad = 0, []
    for p in paths:
        theirs, ours = stb(p), dp.load_image(p)
        if theirs.shape == ours.shape and np.array_equal(theirs, ours):
            same += 1
        else:
            diff = np.abs(theirs - ours) * 255 if theirs.shape == ours.shape else None
            bad.append(f'{p}: ' + (f'shape {ours.shape} vs Darknet {theirs.shape}' if diff is None else
                                   f'{int((diff > 0.5).any(-1).sum())} pixels differ, max {diff.max():.0f} levels'))
    return same, bad


def write_files(files: dict[str, bytes], folder: Path) -> list[Path]:
    """The JPEGs written into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / n for n in files]


def main(argv: list[str] | None = None) -> int:
    """Compare, or write the fixture."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--darknet', type=Path, default=Path('/tmp/darknet'), help='a Darknet checkout with libdarknet.so')
    p.add_argument('--images', type=Path, nargs='*', default=[])
    p.add_argument('--coco128', type=int, default=0, help='also the first N coco128 images')
    p.add_argument('--made', action='store_true', help='also the JPEGs this tool makes (see above)')
    p.add_argument('--work', type=Path, help='where --made writes its JPEGs (default: a temporary folder)')
    p.add_argument('--fixture', type=Path, help='write the tiny JPEGs and pixels.npz into this folder')
    opt = p.parse_args(argv)
    stb = StbImages(opt.darknet)
    if opt.fixture:
        paths = write_files(made_jpegs(tiny=True), opt.fixture)
        np.savez_compressed(opt.fixture / 'pixels.npz', **{q.name: np.rint(stb(q) * 255).astype(np.uint8)
                                                            for q in paths})
        same, bad = compare(paths, stb)
        print(f'{opt.fixture}: {len(paths)} JPEGs ({sum(q.stat().st_size for q in paths)} bytes) and pixels.npz; '
              f'{same} bit-identical')
        return 0 if not bad else 1
    groups = {'given': [q.resolve() for q in opt.images], 'coco128': sorted(COCO128_IMAGES.glob('*.jpg'))[:opt.coco128]}
    if opt.made:
        groups['made'] = write_files(made_jpegs(tiny=False), opt.work or Path(tempfile.mkdtemp(prefix='stb_jpeg_')))
    fails = 0
    for name, paths in groups.items():
        if paths:
            same, bad = compare(paths, stb)
            fails += len(bad)
            print(f'{name}: {same} of {len(paths)} bit-identical with Darknet\'s load_image_color')
            print(''.join(f'  {b}\n' for b in bad), end='')
    timing_image = next((q for q in groups['coco128'] + groups['given'] if cv2.imread(str(q)).shape[:2] == (480, 640)),
                        None)
    if timing_image is not None:  # CPU time of this process (the wall time on a shared machine says little) and wall
        t = {}
        for label, fn in (('stb_jpeg', dp.read_rgb_uint8), ('cv2.imread', cv2.imread)):
            fn(str(timing_image))
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(20):
                fn(str(timing_image))
            t[label] = ((time.process_time() - c0) / 20 * 1000, (time.perf_counter() - w0) / 20 * 1000)
        print(f'decode {timing_image.name} (640x480), CPU / wall ms per image: ' +
              ', '.join(f'{k} {c:.1f} / {w:.1f}' for k, (c, w) in t.items()))
    return 1 if fails else 0


if __name__ == '__main__':
    sys.exit(main())
