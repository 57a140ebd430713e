"""utils/darknet/stb_jpeg.py against the pixels Darknet's own load_image_color decoded (tests/fixtures/stb_jpeg, made by
tools/darknet_harness/stb_jpeg_check.py), and darknet_post's reader around it."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.darknet import post as dp
from utils.darknet import stb_jpeg

FIXTURE = Path(__file__).parent / 'fixtures' / 'stb_jpeg'


@pytest.fixture(scope='module')
def darknet_pixels() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / 'pixels.npz') as z:
        return {k: z[k] for k in z.files}


def test_fixture_pixels_bit_identical(darknet_pixels):
    """Every kind (sampling 4:4:4 .. 4:1:1, odd sizes, progressive, restarts, gray, RGB, CMYK, YCCK) as Darknet."""
    assert len(darknet_pixels) == 23
    wrong = {}
    for name, theirs in darknet_pixels.items():
        ours = stb_jpeg.decode(FIXTURE / name)
        if ours.shape != theirs.shape or not np.array_equal(ours, theirs):
            wrong[name] = int((ours != theirs).any(-1).sum()) if ours.shape == theirs.shape else ours.shape
    assert not wrong, f'pixels differing from Darknet: {wrong}'


def test_load_image_is_darknets_float(darknet_pixels):
    """darknet_post.load_image: Darknet's (float)byte / 255. (a double division), RGB, 3 channels."""
    for name in ('cv420_17x10.jpg', 'pil_gray.jpg', 'pil_cmyk.jpg'):
        im = dp.load_image(FIXTURE / name)
        assert im.dtype == np.float32 and im.shape[2] == 3
        assert np.array_equal(im, (darknet_pixels[name] / 255.).astype(np.float32)), name
        assert np.array_equal(dp.read_bgr(FIXTURE / name), darknet_pixels[name][:, :, ::-1]), name


def test_opencv_pixels_differ(darknet_pixels):
    """Why the module exists: libjpeg-turbo (OpenCV) gives other pixels on most of these files."""
    differ = [n for n, theirs in darknet_pixels.items()
              if not np.array_equal(cv2.imread(str(FIXTURE / n), cv2.IMREAD_COLOR)[:, :, ::-1], theirs)]
    assert len(differ) >= 15, differ


def test_without_jpeglib_opencv_with_one_warning(monkeypatch, logged, darknet_pixels):
    monkeypatch.setattr(stb_jpeg, 'jpeglib', None)
    dp._warn_no_jpeglib.cache_clear()
    name = 'cv422_17x10.jpg'
    for _ in range(2):
        im = dp.read_rgb_uint8(FIXTURE / name)
    assert np.array_equal(im, cv2.imread(str(FIXTURE / name))[:, :, ::-1])
    warnings = [m for m in logged() if 'pip install jpeglib' in m]
    assert len(warnings) == 1 and 'OpenCV' in warnings[0]
    dp._warn_no_jpeglib.cache_clear()
    with pytest.raises(ImportError, match='pip install jpeglib'):
        stb_jpeg.decode(FIXTURE / name)


def test_png_read_by_opencv(tmp_path):
    im = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / 'a.jpg'), im)  # a PNG under a .jpg name is still a PNG: stb picks by content
    cv2.imwrite(str(tmp_path / 'a.png'), im)
    (tmp_path / 'a.jpg').write_bytes((tmp_path / 'a.png').read_bytes())
    for name in ('a.png', 'a.jpg'):
        assert np.array_equal(dp.read_bgr(tmp_path / name), im)


@pytest.mark.parametrize('patch, message', [
    ((b'\xff\xc0', b'\xff\xc9'), 'SOF9'),  # arithmetic coding
    ((b'\xff\xc0\x00\x11\x08', b'\xff\xc0\x00\x11\x0c'), '12-bit'),
])
def test_refused_names_the_file(tmp_path, patch, message):
    data = (FIXTURE / 'cv420_17x10.jpg').read_bytes()
    assert patch[0] in data
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(data.replace(patch[0], patch[1], 1))
    with pytest.raises(stb_jpeg.StbJpegError, match=f'bad.jpg.*{message}'):
        dp.load_image(bad)


def test_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.jpg'):
        dp.load_image(tmp_path / 'nope.jpg')
