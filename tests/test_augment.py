"""Augmentation keeps boxes on their objects: draw filled rectangles of known colours, augment, and compare each
transformed box with where that colour's pixels went (letterbox, mosaic, random affine, flip), plus HSV."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import COCO128_IMAGES
from utils.boxes import xywh2xyxy
from utils.data.augmentations import (
    PAD_COLOR,
    augment_hsv,
    box_candidates,
    combine_mosaic,
    letterbox,
    random_affine,
)
from utils.data.datasets import DatasetOptions, LoadImagesAndLabels, SampleKey

# BGR colours far from each other and from the grey padding (114) even after bilinear blending at the edges
COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0), (255, 255, 255),
           (0, 0, 0), (0, 128, 255), (255, 128, 0), (128, 0, 255), (0, 255, 128)]
TOL = 40  # colour distance (max over channels) that still counts as the object
NO_HSV = {'hsv_h': 0.0, 'hsv_s': 0.0, 'hsv_v': 0.0}


def draw(h: int, w: int, boxes: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """A grey (h, w) BGR image with filled rectangles (cls, x1, y1, x2, y2) in COLOURS[cls]."""
    img = np.full((h, w, 3), 114, np.uint8)
    for c, x1, y1, x2, y2 in boxes:
        img[y1:y2, x1:x2] = COLOURS[c]
    return img


def pixel_box(img: np.ndarray, c: int) -> np.ndarray | None:
    """xyxy extent (x2, y2 exclusive) of the pixels of colour c in a BGR image, None if there are none."""
    mask = (np.abs(img.astype(int) - COLOURS[c]).max(2) < TOL)
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def check_boxes(img: np.ndarray, labels: np.ndarray, tol: float) -> int:
    """Every (cls, x1, y1, x2, y2) label present once matches its colour's pixels within tol px; returns checks.

    A rotated box cut by the image border keeps the clipped extent of all four warped corners (as the original),
    which may be wider than the pixels left inside: there the pixels only have to lie within the label.
    """
    h, w = img.shape[:2]
    n = 0
    classes, counts = np.unique(labels[:, 0].astype(int), return_counts=True)
    for c, k in zip(classes, counts):
        if k != 1:  # the same image twice in one mosaic: two objects share the colour
            continue
        box = labels[labels[:, 0] == c][0, 1:5]
        pix = pixel_box(img, c)
        assert pix is not None, f'class {c}: label {box} but no pixels'
        if (box[:2] > tol).all() and box[2] < w - tol and box[3] < h - tol:
            np.testing.assert_allclose(box, pix, atol=tol, err_msg=f'class {c}')
        else:  # cut by the border
            assert (pix[:2] >= box[:2] - tol).all() and (pix[2:] <= box[2:] + tol).all(), (c, box, pix)
            assert min(pix[2] - pix[0], pix[3] - pix[1]) > 0
        n += 1
    return n


def test_letterbox_geometry():
    img = draw(200, 300, [(0, 50, 40, 120, 90), (1, 200, 100, 280, 180)])
    out, (rw, rh), (dw, dh) = letterbox(img, 160, auto=False)
    assert out.shape == (160, 160, 3) and rw == rh == pytest.approx(160 / 300) and dw == 0 and dh == 26.5
    assert (out[:26] == PAD_COLOR[0]).all() and (out[-26:] == PAD_COLOR[0]).all()  # grey bars top and bottom
    for c, x1, y1, x2, y2 in [(0, 50, 40, 120, 90), (1, 200, 100, 280, 180)]:
        expect = np.array([x1 * rw + dw, y1 * rh + dh, x2 * rw + dw, y2 * rh + dh])
        np.testing.assert_allclose(pixel_box(out, c), expect, atol=1.0)
    # auto: the minimum rectangle, padded to a multiple of 64 as the original
    assert letterbox(img, 416)[0].shape == (288, 416, 3)
    assert letterbox(img, 416, auto=False, scaleFill=True)[0].shape == (416, 416, 3)
    small, ratio, _ = letterbox(img, 416, auto=False, scaleup=False)
    assert small.shape == (416, 416, 3) and ratio == (1.0, 1.0)


@pytest.mark.parametrize('seed', range(6))
def test_random_affine_rotation_shear_scale(seed):
    boxes = [(0, 30, 40, 90, 80), (2, 120, 30, 170, 150), (5, 60, 120, 110, 170)]
    img = draw(200, 200, boxes)
    targets = np.array(boxes, np.float32)
    out, t = random_affine(img, targets.copy(), degrees=30, translate=0.1, scale=0.3, shear=10,
                           rng=np.random.default_rng(seed))
    assert out.shape == img.shape and len(t)
    assert not np.array_equal(out, img)
    assert check_boxes(out, t, tol=2.5) == len(t)


def test_integer_shift_matches_warp():
    img = draw(120, 160, [(0, 10, 10, 50, 40)])
    fast, _ = random_affine(img, None, 0, 0, 0, 0, border=-30)  # pure translation: copied, not interpolated
    M = np.float64([[1, 0, -30], [0, 1, -30]])
    slow = cv2.warpAffine(img, M, (100, 60), flags=cv2.INTER_LINEAR, borderValue=PAD_COLOR)
    np.testing.assert_array_equal(fast, slow)


def test_box_filter_thresholds():
    """The original's filter: keep w > 4 px, h > 4 px, area ratio (divided by the scale s) > 0.2, aspect < 10."""
    def keep(w: float, h: float, w0: float | None = None, h0: float | None = None, s: float = 1.0) -> bool:
        box0 = np.array([[0, 0, w if w0 is None else w0, h if h0 is None else h0]], float)
        return bool(box_candidates(box0, np.array([[10, 10, 10 + w, 10 + h]], float), s)[0])

    assert keep(4.01, 20) and not keep(4.0, 20) and not keep(3.99, 20)  # width
    assert keep(20, 4.01) and not keep(20, 4.0)  # height
    assert keep(20.1, 20, 100, 20) and not keep(19.9, 20, 100, 20)  # 20% of the area left
    assert keep(80.1, 20, 100, 40, s=2.0) and not keep(79.9, 20, 100, 40, s=2.0)  # as the original: ratio / s
    assert keep(99.9, 10) and not keep(100, 10) and not keep(10, 100.1)  # aspect ratio, either way round
    # through random_affine with no geometric change: a 4 px box goes, a 5 px one stays
    img = draw(64, 64, [])
    t = np.array([[0, 10, 10, 14, 30], [1, 30, 10, 35, 30], [2, 5, 40, 60, 45]], np.float32)  # 4x20, 5x20, 55x5
    _, kept = random_affine(img, t.copy(), 0, 0, 0, 0)
    assert kept[:, 0].tolist() == [1.0]  # 55x5 has aspect 11: dropped too
    np.testing.assert_array_equal(kept[0], t[1])


def test_combine_mosaic_placement():
    s = 64
    sizes = [(40, 60), (64, 30), (50, 64), (20, 20)]  # (h, w) of the four tiles
    imgs, labels = [], []
    for i, (h, w) in enumerate(sizes):
        x1, y1, x2, y2 = w // 4, h // 4, w - w // 4, h - h // 4
        imgs.append(draw(h, w, [(i, x1, y1, x2, y2)]))
        labels.append(np.array([[i, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]], np.float32))
    img4, labels4 = combine_mosaic(imgs, labels, s, xc=70, yc=50)
    assert img4.shape == (128, 128, 3) and len(labels4) == 4
    assert check_boxes(img4, labels4, tol=1e-6) == 4  # no interpolation: exact
    # each tile touches the centre from its own quadrant
    assert labels4[0, 3] <= 70 and labels4[0, 4] <= 50 and labels4[1, 1] >= 70 and labels4[2, 2] >= 50
    assert labels4[3, 1] >= 70 and labels4[3, 2] >= 50


def make_synthetic(tmp_path, sizes=((300, 400), (360, 280), (256, 256), (400, 300), (290, 330), (320, 260))):
    """PNG images with two coloured rectangles each (class = colour index, unique over the set) and their labels."""
    (tmp_path / 'images').mkdir()
    (tmp_path / 'labels').mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        boxes = []
        for j, c in enumerate((2 * i, 2 * i + 1)):
            x1 = int(rng.integers(10, w // 2 - 70)) + j * (w // 2)
            y1 = int(rng.integers(10, h - 90))
            boxes.append((c, x1, y1, x1 + int(rng.integers(40, 70)), y1 + int(rng.integers(40, 80))))
        cv2.imwrite(str(tmp_path / 'images' / f'{i}.png'), draw(h, w, boxes))
        rows = [f'{c} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}'
                for c, x1, y1, x2, y2 in boxes]
        (tmp_path / 'labels' / f'{i}.txt').write_text('\n'.join(rows) + '\n')
    return tmp_path / 'images'


def item_boxes(ds: LoadImagesAndLabels, i: int) -> tuple[np.ndarray, np.ndarray]:
    """A dataset item as a BGR HWC image and (n, 5) [cls, x1, y1, x2, y2] pixel labels."""
    img, lb, _, _ = ds[i]
    img = np.ascontiguousarray(img.numpy().transpose(1, 2, 0)[:, :, ::-1])
    h, w = img.shape[:2]
    boxes = lb[:, 2:].numpy() * [w, h, w, h]
    return img, np.concatenate([lb[:, 1:2].numpy(), xywh2xyxy(boxes)], 1)


def test_mosaic_affine_flip_dataset(tmp_path):
    images = make_synthetic(tmp_path)
    hyp = {**NO_HSV, 'degrees': 10, 'translate': 0.1, 'scale': 0.2, 'shear': 5}
    ds = LoadImagesAndLabels(str(images), DatasetOptions(img_size=128, batch_size=4, augment=True, hyp=hyp, nc=12))
    assert ds.mosaic
    loaded: list[int] = []
    real_load = ds.load_image
    ds.load_image = lambda i: loaded.append(i) or real_load(i)
    checked = 0
    for epoch in range(4):
        for i in range(len(ds)):
            loaded.clear()
            img, boxes = item_boxes(ds, SampleKey(epoch, i, i))
            assert img.shape == (128, 128, 3) and len(loaded) == 4 and loaded[0] == i
            # an image twice in one mosaic: a copy whose box the affine dropped still shows pixels of its colour
            twice = {c for j in set(loaded) if loaded.count(j) > 1 for c in (2 * j, 2 * j + 1)}
            checked += check_boxes(img, boxes[~np.isin(boxes[:, 0], list(twice))], tol=3.0)
    assert checked > 40  # many boxes actually compared


def test_flip_and_letterbox_dataset(tmp_path):
    images = make_synthetic(tmp_path)
    plain = LoadImagesAndLabels(str(images), DatasetOptions(img_size=128, batch_size=2, rect=True))  # test mode
    for i in range(len(plain)):
        img, boxes = item_boxes(plain, i)
        assert len(boxes) == 2 and check_boxes(img, boxes, tol=1.5) == 2
    hyp = {**NO_HSV, 'degrees': 0, 'translate': 0, 'scale': 0, 'shear': 0}
    aug = LoadImagesAndLabels(str(images), DatasetOptions(img_size=128, batch_size=2, augment=True, hyp=hyp,
                                                          rect=True))  # rect: no mosaic
    assert not aug.mosaic
    flips = 0
    for epoch in range(3):
        for i in range(len(aug)):
            img, boxes = item_boxes(aug, SampleKey(epoch, i, i))
            _, ref = item_boxes(plain, i)
            w = img.shape[1]
            mirrored = np.stack([ref[:, 0], w - ref[:, 3], ref[:, 2], w - ref[:, 1], ref[:, 4]], 1)
            flipped = np.abs(boxes - mirrored).max() < 1.5
            assert flipped or np.abs(boxes - ref).max() < 1.5  # the same boxes, mirrored or not
            flips += flipped
            assert check_boxes(img, boxes, tol=1.5) == 2
    assert 0 < flips < 18  # some flipped, some not


@pytest.mark.slow
def test_reduced_decode_matches_full():
    """Training decodes big JPEGs at 1/2, 1/4 scale in the decoder: the same picture as a full decode + resize,
    up to sub-pixel shifts (compared blurred) and a row or column of rounding."""
    files = [str(f) for f in sorted(COCO128_IMAGES.glob('*.jpg'))[:6]]
    hyp = {**NO_HSV, 'degrees': 0, 'translate': 0, 'scale': 0, 'shear': 0}
    for size in (160, 320):
        train = LoadImagesAndLabels(files, DatasetOptions(img_size=size, augment=True, hyp=hyp))
        test = LoadImagesAndLabels(files, DatasetOptions(img_size=size))
        for i in range(len(files)):
            a, hw0, hw = train.load_image(i)
            b, hw0b, hwb = test.load_image(i)
            assert hw0 == hw0b and abs(hw[0] - hwb[0]) <= 1 and abs(hw[1] - hwb[1]) <= 1
            h, w = min(hw[0], hwb[0]), min(hw[1], hwb[1])
            blur = [cv2.GaussianBlur(x[:h, :w], (0, 0), 1.5).astype(int) for x in (a, b)]
            assert np.abs(blur[0] - blur[1]).mean() < 3, (size, files[i])


def hsv_gains(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per-pixel (saturation, value) ratios after / before of two BGR images, where before is well inside 0..255."""
    h0, h1 = (cv2.cvtColor(x, cv2.COLOR_BGR2HSV).reshape(-1, 3).astype(float) for x in (before, after))
    return h1[:, 1:] / h0[:, 1:]


def test_augment_hsv():
    # muted colours (saturation and value near the middle) so no gain is cut off at 255
    img = np.zeros((16, 32, 3), np.uint8)
    img[:, :16] = (60, 80, 140)
    img[:, 16:] = (70, 130, 90)
    same = img.copy()
    augment_hsv(same, 0, 0, 0, rng=np.random.default_rng(0))
    assert np.abs(same.astype(int) - img).max() <= 1  # zero gains: unchanged up to the HSV round trip
    hues, ratios = [], []
    for seed in range(40):
        out = img.copy()
        augment_hsv(out, 0.02, 0.5, 0.3, rng=np.random.default_rng(seed))
        r = hsv_gains(img, out)
        assert r.min(0) == pytest.approx(r.max(0), abs=0.03)  # one gain per channel over the whole image
        ratios.append(r.mean(0))
        hues.append(cv2.cvtColor(out, cv2.COLOR_BGR2HSV)[0, 0, 0])
    ratios = np.array(ratios)
    # gains within [1 - gain, 1 + gain] (up to uint8 rounding), and spread over that range
    assert (ratios.min(0) > [0.5 - 0.03, 0.7 - 0.03]).all() and (ratios.max(0) < [1.5 + 0.03, 1.3 + 0.03]).all()
    assert (ratios.min(0) < [0.75, 0.85]).all() and (ratios.max(0) > [1.25, 1.15]).all()
    h0 = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)[0, 0, 0]
    assert max(abs(int(h) - int(h0)) for h in hues) <= int(np.ceil(h0 * 0.02)) + 1  # hue within its small gain
    a, b, c = img.copy(), img.copy(), img.copy()
    augment_hsv(a, 0.02, 0.5, 0.3, rng=np.random.default_rng(7))
    augment_hsv(b, 0.02, 0.5, 0.3, rng=np.random.default_rng(7))
    augment_hsv(c, 0.02, 0.5, 0.3, rng=np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # the generator alone decides


def test_random_affine_follows_its_generator():
    img = draw(96, 96, [(0, 20, 20, 50, 60), (1, 55, 30, 80, 70)])
    t = np.array([[0, 20, 20, 50, 60], [1, 55, 30, 80, 70]], np.float32)
    kw = dict(degrees=10, translate=0.1, scale=0.2, shear=5)
    a = random_affine(img, t.copy(), **kw, rng=np.random.default_rng(1))
    b = random_affine(img, t.copy(), **kw, rng=np.random.default_rng(1))
    c = random_affine(img, t.copy(), **kw, rng=np.random.default_rng(2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    random_affine(img, t.copy(), **kw, rng=np.random.default_rng(1))
    augment_hsv(img.copy(), rng=np.random.default_rng(1))
    assert np.array_equal(np.random.get_state()[1], state)  # the process-global stream is not drawn from


def test_dataset_sample_augmentation_from_seed_epoch_k(tmp_path):
    """A training sample is a function of (seed, epoch, k): the same key gives the same sample in any order and
    after other draws; another k, epoch or seed gives another augmentation of the same image."""
    images = make_synthetic(tmp_path)
    hyp = {'hsv_h': 0.014, 'hsv_s': 0.7, 'hsv_v': 0.4, 'degrees': 5, 'translate': 0.1, 'scale': 0.2, 'shear': 2}
    ds = LoadImagesAndLabels(str(images),
                             DatasetOptions(img_size=128, batch_size=4, augment=True, hyp=hyp, nc=12, seed=5))
    keys = [SampleKey(0, 0, 3), SampleKey(0, 1, 3), SampleKey(1, 0, 3), SampleKey(2, 7, 1)]
    first = [ds[k] for k in keys]
    np.random.seed(99)
    again = [ds[k] for k in reversed(keys)][::-1]
    for x, y in zip(first, again):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert not torch.equal(first[0][0], first[1][0]) and not torch.equal(first[0][0], first[2][0])
    other_seed = LoadImagesAndLabels(str(images),
                                     DatasetOptions(img_size=128, batch_size=4, augment=True, hyp=hyp, nc=12, seed=6))
    assert not torch.equal(other_seed[keys[0]][0], first[0][0])
    assert torch.equal(ds[3][0], ds[SampleKey(0, 3, 3)][0]) and torch.equal(ds[3][0], ds[3][0])  # plain index


def test_collate_uint8_rgb(tmp_path):
    images = make_synthetic(tmp_path, sizes=((256, 256), (256, 256)))
    ds = LoadImagesAndLabels(str(images), DatasetOptions(img_size=128, batch_size=2))
    imgs, targets, _, _ = LoadImagesAndLabels.collate_fn([ds[0], ds[1]])
    assert imgs.dtype == torch.uint8 and imgs.shape == (2, 3, 128, 128)
    c = int(targets[0, 1])
    x, y = (targets[0, 2:4] * 128).long().tolist()
    assert tuple(imgs[0, :, y, x].tolist()) == COLOURS[c][::-1]  # RGB order
