"""Data pipeline: dataset configs, image lists, label checks with reasons, the label cache, loaders."""
from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import (
    COCO128,
    COCO128_IMAGES,
    COCO_NAMES,
    ROOT,
    TINY_WEIGHTS,
    make_subset,
    make_synthetic,
)
from utils.data import datasets as ds_mod
from utils.data.config import DatasetError, check_dataset, load_data_config
from utils.data.datasets import (
    DatasetOptions,
    LoaderOptions,
    LoadImagesAndLabels,
    RectDistributedSampler,
    create_dataloader,
    img2label_paths,
    list_image_files,
    verify_image_label,
)
from utils.data.sources import LoadImages, LoadStreams, LoadWebcam
from utils.logs import setup_logging

HYP = {'hsv_h': 0.0138, 'hsv_s': 0.678, 'hsv_v': 0.36, 'degrees': 0.0, 'translate': 0.0, 'scale': 0.0, 'shear': 0.0}


@pytest.fixture(autouse=True)
def fresh_reports(monkeypatch):
    """Each test starts as a new process would: no fault reported yet."""
    monkeypatch.setattr(ds_mod, '_REPORTED', set())


@pytest.fixture
def printed(capsys):
    """capsys after the set-up a script makes (setup_logging()): what a user sees on the terminal."""
    setup_logging()
    return capsys


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file under folder with its md5, size and mtime, to prove nothing was changed."""
    out = {}
    for p in sorted(folder.rglob('*')):
        st = p.stat()
        out[str(p)] = (hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else 'dir', st.st_size if p.is_file()
                       else 0, st.st_mtime_ns)
    return out


def set_read_only(folder: Path, read_only: bool) -> None:
    """chmod a tree read-only (a-w) or back to writable (u+w)."""
    for p in [folder, *folder.rglob('*')]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) if read_only else mode | stat.S_IWUSR)


def make_faulty(dst: Path) -> tuple[Path, dict[str, str]]:
    """16 coco128 images with planted faults; returns the .data file and {faulty file: expected reason pattern}."""
    data = make_subset(dst, 16, name='faulty')
    ims = sorted((dst / 'images').glob('*.jpg'))
    lbs = [dst / 'labels' / (p.stem + '.txt') for p in ims]
    raw = ims[0].read_bytes()
    ims[0].write_bytes(raw[:len(raw) // 2])  # a truncated JPEG
    ims[1].write_text('this is a text file, not a picture\n')  # a text file named .jpg
    lbs[2].write_text(lbs[2].read_text() + '99 0.5 0.5 0.1 0.1\n')  # class 99 of 80
    lbs[3].write_text('0 0.5 0.5 1.7 0.2\n' + lbs[3].read_text())  # width 1.7
    lbs[4].write_text(lbs[4].read_text() + '3 0.5 0.5 0.2\n')  # a row of 4 numbers
    lbs[5].write_text('')  # an empty label file: a background image, not a fault
    lbs[6].unlink()  # a missing label file: a background image, not a fault
    faulty = {str(ims[0]): r'truncated', str(ims[1]): r'not an image', str(lbs[2]): r'class 99 not in \[0, 80\)',
              str(lbs[3]): r'normalised to \[0, 1\]', str(lbs[4]): r'4 numbers, expected 5'}
    return data, faulty


def check_fault_report(out: str, faulty: dict[str, str]) -> None:
    """Each faulty file is named exactly once, on a line giving its reason; one summary line with the counts."""
    for f, reason in faulty.items():
        lines = [x for x in out.splitlines() if f in x]
        assert len(lines) == 1, f'{f} named {len(lines)} times in:\n{out}'
        assert re.search(reason, lines[0]) and lines[0].startswith('WARNING: '), lines[0]
    assert re.search(r'9 found, 1 missing, 1 empty, 5 corrupt', out), out


# --- configs -------------------------------------------------------------------------------------------------------

def test_darknet_data_config(tmp_path):
    (tmp_path / 'x.names').write_text('cat\ndog\n\n')
    (tmp_path / 'images').mkdir()
    cfg = tmp_path / 'x.data'
    cfg.write_text('# two classes\nclasses= 2\ntrain=images\nvalid = images # same\nnames=x.names\nbackup=backup/\n')
    d = load_data_config(cfg)
    assert d['nc'] == 2 and d['names'] == ['cat', 'dog']
    assert d['train'] == d['valid'] == str((tmp_path / 'images').resolve())  # relative to the config's folder
    assert d['download'] is None and d['path'] == str(cfg) and d['backup'] == 'backup/'
    check_dataset(d)  # exists: no error

    cfg.write_text('classes=3\ntrain=images\nvalid=images\nnames=x.names\n')
    with pytest.raises(DatasetError, match=re.escape(str(cfg)) + r'.*3 classes but 2 names'):
        load_data_config(cfg)
    cfg.write_text('classes=2\ntrain=images\nvalid=images\nnames=nothere.names\n')
    with pytest.raises(DatasetError, match=r'nothere\.names: class names file not found'):
        load_data_config(cfg)
    cfg.write_text('classes=2\ntrain images\n')
    with pytest.raises(DatasetError, match=re.escape(f'{cfg}:2') + r": expected 'key=value'"):
        load_data_config(cfg)
    with pytest.raises(DatasetError, match=r'nope\.data: dataset config not found'):
        load_data_config(tmp_path / 'nope.data')


def test_yaml_data_config(tmp_path):
    root = tmp_path / 'ds'
    (root / 'images' / 'train').mkdir(parents=True)
    y = tmp_path / 'ds.yaml'
    y.write_text(f'path: {root}\ntrain: images/train\nval: [images/train, images/train]\nnc: 2\n'
                 f'names: [a, b]\ndownload: https://example.com/ds.zip\n')
    d = load_data_config(y)
    assert d['nc'] == 2 and d['names'] == ['a', 'b'] and d['download'] == 'https://example.com/ds.zip'
    assert d['train'] == str(root / 'images' / 'train') and d['valid'] == [d['train'], d['train']]
    y.write_text('train: a\nval: a\nnames: {0: x, 1: y, 2: z}\n')
    assert load_data_config(y)['nc'] == 3
    y.write_text('train: a\nval: a\nnc: 4\nnames: [x]\n')
    with pytest.raises(DatasetError, match=re.escape(str(y)) + r'.*4 classes but 1 names'):
        load_data_config(y)


def test_duplicate_class_names(tmp_path):
    (tmp_path / 'images').mkdir()
    names = tmp_path / 'x.names'
    names.write_text('cat\ndog\n\ncat\nbird\ndog\n')
    cfg = tmp_path / 'x.data'
    cfg.write_text('classes=5\ntrain=images\nvalid=images\nnames=x.names\n')
    with pytest.raises(DatasetError) as e:
        load_data_config(cfg)
    assert str(e.value) == (f"{names}: duplicate class names: 'cat' (lines 1, 4); 'dog' (lines 2, 6); "
                            f"each class needs its own name")
    y = tmp_path / 'x.yaml'
    y.write_text('train: images\nval: images\nnames: [person, car, person]\n')
    with pytest.raises(DatasetError, match=re.escape(f"{y}: duplicate class names: 'person' (classes 0, 2)")):
        load_data_config(y)
    y.write_text('train: images\nval: images\nnames: {0: a, 1: b, 2: b}\n')
    with pytest.raises(DatasetError, match=re.escape(f"{y}: duplicate class names: 'b' (classes 1, 2)")):
        load_data_config(y)
    y.write_text('train: images\nval: images\nnames: x.names\n')  # a names file from a YAML: its own lines
    with pytest.raises(DatasetError, match=re.escape(f"{names}: duplicate class names: 'cat' (lines 1, 4)")):
        load_data_config(y)


@pytest.mark.slow
def test_shipped_configs():
    for name in ('coco2014.data', 'coco2017.data', 'coco128.data', 'coco128.yaml'):
        d = load_data_config(ROOT / 'data' / name)
        assert d['nc'] == 80 and len(d['names']) == 80 and d['names'][0] == 'person', name
        assert d['download'], name
    assert (ROOT / 'data' / 'coco.names').read_text().splitlines() == COCO_NAMES.read_text().splitlines()


@pytest.mark.slow
def test_missing_train_path(tmp_path):
    cfg = tmp_path / 'x.data'
    missing = tmp_path / 'nowhere' / 'images'
    cfg.write_text(f'classes=80\ntrain={missing}\nvalid={COCO128_IMAGES}\nnames={COCO_NAMES}\n')
    with pytest.raises(DatasetError, match=re.escape(str(missing)) + ' does not exist'):
        check_dataset(load_data_config(cfg))
    # with a download entry that cannot be reached (offline): says what to fetch and where to put it
    cfg.write_text(f'classes=80\ntrain={missing}\nvalid={COCO128_IMAGES}\nnames={COCO_NAMES}\n'
                   f'download=http://127.0.0.1:9/coco128.zip\n')
    with pytest.raises(DatasetError) as e:
        check_dataset(load_data_config(cfg))
    msg = str(e.value)
    assert str(missing) in msg and 'http://127.0.0.1:9/coco128.zip' in msg and 'unzip it into' in msg
    cfg.write_text(f'classes=80\ntrain={missing}\nvalid={COCO128_IMAGES}\nnames={COCO_NAMES}\ndownload=exit 3\n')
    with pytest.raises(DatasetError, match=r"download command 'exit 3' failed \(exit 3\)"):
        check_dataset(load_data_config(cfg))
    with pytest.raises(DatasetError, match=re.escape(str(missing)) + ' does not exist'):
        LoadImagesAndLabels(str(missing))


@pytest.mark.slow
def test_download_command_makes_dataset(tmp_path):
    target = tmp_path / 'made' / 'images'
    cfg = tmp_path / 'x.data'
    cfg.write_text(f'classes=80\ntrain={target}\nvalid={target}\nnames={COCO_NAMES}\ndownload=mkdir -p {target}\n')
    check_dataset(load_data_config(cfg))
    assert target.is_dir()


# --- image lists and label paths -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_label_paths_and_lists(tmp_path):
    sep = os.sep
    assert img2label_paths([f'{sep}a{sep}images{sep}x{sep}images{sep}b.c.jpg']) == \
        [f'{sep}a{sep}images{sep}x{sep}labels{sep}b.c.txt']  # the last /images/ only
    assert img2label_paths([f'{sep}a{sep}pics{sep}b.png']) == [f'{sep}a{sep}pics{sep}b.txt']
    data = make_subset(tmp_path, 4)
    folder = list_image_files(tmp_path / 'images')
    assert len(folder) == 4
    lst = tmp_path / 'list.txt'
    lst.write_text('\n'.join(f'./images/{Path(f).name}' if i % 2 else f'images/{Path(f).name}'
                             for i, f in enumerate(folder)) + '\n\n')
    assert list_image_files(lst) == folder  # relative entries resolved against the list's folder
    assert list_image_files(str(tmp_path / 'images' / '*.jpg')) == folder
    assert list_image_files([str(tmp_path / 'images')]) == folder
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetError, match='no images found'):
        list_image_files(tmp_path / 'empty')
    assert data.exists()


def test_verify_exif_and_duplicates(tmp_path):
    (tmp_path / 'images').mkdir()
    (tmp_path / 'labels').mkdir()
    im = tmp_path / 'images' / 'rot.jpg'
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored 64 wide x 32 high, shown 32 x 64
    Image.new('RGB', (64, 32), (0, 0, 255)).save(im, exif=exif)
    lb = tmp_path / 'labels' / 'rot.txt'
    lb.write_text('1 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n2 0.3 0.3 0.1 0.1\n')
    labels, shape, status, msg = verify_image_label(str(im), str(lb), nc=3)
    assert shape == (32, 64) and cv2.imread(str(im)).shape[:2] == (64, 32)  # (w, h) as cv2 will load it
    assert status == 'found' and len(labels) == 2 and '1 duplicate label rows dropped' in msg
    np.testing.assert_allclose(labels, [[1, .5, .5, .2, .2], [2, .3, .3, .1, .1]])
    tiny = tmp_path / 'images' / 'tiny.png'
    Image.new('RGB', (8, 8)).save(tiny)
    assert verify_image_label(str(tiny), str(lb))[2] == 'corrupt'
    empty = tmp_path / 'images' / 'zero.jpg'
    empty.write_bytes(b'')
    labels, shape, status, msg = verify_image_label(str(empty), str(lb))
    assert labels is None and status == 'corrupt' and str(empty) in msg and '0 bytes' in msg


def test_exif_rotated_image_in_training(tmp_path):
    (tmp_path / 'images').mkdir()
    (tmp_path / 'labels').mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 400 wide x 200 high, shown 200 x 400
    Image.new('RGB', (400, 200), (0, 0, 255)).save(tmp_path / 'images' / 'a.jpg', exif=exif)
    (tmp_path / 'labels' / 'a.txt').write_text('0 0.5 0.5 0.5 0.5\n')
    ds = LoadImagesAndLabels(str(tmp_path / 'images'), DatasetOptions(img_size=128, augment=True, hyp=HYP))
    assert tuple(ds.shapes[0]) == (200, 400)
    img, (h0, w0), (h, w) = ds.load_image(0)  # decoded at 1/2 scale, orientation applied
    assert (h0, w0) == (400, 200) and img.shape[:2] == (h, w) == (128, 64)


# --- the planted-faults dataset ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_planted_faults_read_only(tmp_path, printed):
    data, faulty = make_faulty(tmp_path / 'faulty')
    before = snapshot(tmp_path / 'faulty')
    set_read_only(tmp_path / 'faulty', True)
    try:
        d = load_data_config(data)
        check_dataset(d)
        ds = LoadImagesAndLabels(d['train'],
                                 DatasetOptions(img_size=160, batch_size=8, augment=True, hyp=HYP, nc=d['nc']))
        out = printed.readouterr().out
        for i in range(len(ds)):  # every kept image loads and gives valid targets
            img, lb, path, _ = ds[i]
            assert img.shape == (3, 160, 160) and img.dtype == torch.uint8 and path not in faulty
            assert ((lb[:, 2:] >= 0) & (lb[:, 2:] <= 1)).all() and (lb[:, 1] < 80).all()
    finally:
        set_read_only(tmp_path / 'faulty', False)
    check_fault_report(out, faulty)
    assert out.count('read-only') == 1, out
    assert len(ds) == 11 and not set(faulty) & set(ds.img_files)
    assert snapshot(tmp_path / 'faulty') == before  # nothing changed, nothing added (no cache in a read-only folder)


@pytest.mark.slow
def test_planted_faults_cached_second_start(tmp_path, printed):
    data, faulty = make_faulty(tmp_path / 'faulty')
    before = snapshot(tmp_path / 'faulty')
    LoadImagesAndLabels(load_data_config(data)['train'], DatasetOptions(img_size=160, nc=80))
    first = printed.readouterr().out
    check_fault_report(first, faulty)
    after = snapshot(tmp_path / 'faulty')
    cache = tmp_path / 'faulty' / 'labels.cache'
    assert set(after) - set(before) == {str(cache)}  # the cache beside the labels, as the original
    assert {k: v for k, v in after.items() if k != str(cache)} == before  # every dataset file unchanged
    LoadImagesAndLabels(load_data_config(data)['train'],
                        DatasetOptions(img_size=160, nc=80))  # the val set of the same run: not again
    assert not [f for f in faulty if f in printed.readouterr().out]
    ds_mod._REPORTED.clear()  # a new process
    ds = LoadImagesAndLabels(load_data_config(data)['train'], DatasetOptions(img_size=160, nc=80))
    second = printed.readouterr().out
    assert '(cached)' in second and len(ds) == 11
    check_fault_report(second, faulty)  # the faults are reported again from the cache, once each


@pytest.mark.slow
def test_no_good_image(tmp_path):
    (tmp_path / 'images').mkdir()
    for i in range(3):
        (tmp_path / 'images' / f'{i}.jpg').write_text('not a jpeg')
    with pytest.raises(DatasetError, match=r'no usable images \(3 corrupt of 3\)'):
        LoadImagesAndLabels(str(tmp_path / 'images'), DatasetOptions(img_size=160))
    make_subset(tmp_path / 'bg', 2)
    for f in (tmp_path / 'bg' / 'labels').glob('*.txt'):
        f.unlink()
    with pytest.raises(DatasetError, match='cannot train without labels'):
        LoadImagesAndLabels(str(tmp_path / 'bg' / 'images'), DatasetOptions(img_size=160, augment=True, hyp=HYP))
    assert len(LoadImagesAndLabels(str(tmp_path / 'bg' / 'images'),
                                   DatasetOptions(img_size=160))) == 2  # testing on backgrounds is fine


# --- cache ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cache_invalidation(tmp_path, printed):
    make_subset(tmp_path, 6)
    images = tmp_path / 'images'
    LoadImagesAndLabels(str(images), DatasetOptions(img_size=160, nc=80))
    assert 'New cache created' in printed.readouterr().out
    LoadImagesAndLabels(str(images), DatasetOptions(img_size=160, nc=80))
    assert '(cached)' in printed.readouterr().out
    lb = sorted((tmp_path / 'labels').glob('*.txt'))[0]
    lb.write_text('7 0.5 0.5 0.25 0.25\n')  # edited label: size and mtime change
    ds = LoadImagesAndLabels(str(images), DatasetOptions(img_size=160, nc=80))
    assert 'New cache created' in printed.readouterr().out
    np.testing.assert_allclose(ds.labels[0], [[7, .5, .5, .25, .25]])
    LoadImagesAndLabels(str(images), DatasetOptions(img_size=160, nc=10))  # a different nc checks the classes again
    out = printed.readouterr().out
    assert 'New cache created' in out and 'not in [0, 10)' in out
    (images / sorted(images.glob('*.jpg'))[1].name).unlink()  # one image fewer
    ds = LoadImagesAndLabels(str(images), DatasetOptions(img_size=160, nc=80))
    assert 'New cache created' in printed.readouterr().out and len(ds) == 5
    (tmp_path / 'labels.cache').write_bytes(b'garbage')  # a damaged cache is rebuilt, not a crash
    assert len(LoadImagesAndLabels(str(images), DatasetOptions(img_size=160, nc=80))) == 5
    assert 'New cache created' in printed.readouterr().out


@pytest.mark.slow
def test_cache_images_ram(tmp_path, printed, monkeypatch):
    make_subset(tmp_path, 4)
    images = str(tmp_path / 'images')
    ds = LoadImagesAndLabels(images, DatasetOptions(img_size=160, cache_images=True))
    out = printed.readouterr().out
    assert re.search(r'Caching images needs 0\.\d\d GB of RAM', out)
    assert all(im is not None and max(im.shape[:2]) == 160 for im in ds.imgs)
    fresh = LoadImagesAndLabels(images, DatasetOptions(img_size=160))
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], fresh[i][0])  # cached and uncached give the same images
    monkeypatch.setattr(ds_mod, '_available_memory', lambda: 100_000)  # 0.0001 GB free
    ds = LoadImagesAndLabels(images, DatasetOptions(img_size=160, cache_images=True))
    out = printed.readouterr().out
    assert 'not caching images' in out and 'would not fit' in out
    assert all(im is None for im in ds.imgs) and ds[0][0].shape == (3, 160, 160)


@pytest.mark.slow
def test_small_training_set_cached_automatically(tmp_path, monkeypatch):
    """Training (augment) loaders keep small sets decoded in RAM; evaluation and large sets read from disk."""
    make_subset(tmp_path, 4)
    images = str(tmp_path / 'images')
    train = LoadImagesAndLabels(images, DatasetOptions(img_size=160, augment=True, hyp=HYP))
    assert all(im is not None and max(im.shape[:2]) == 160 for im in train.imgs)
    # a test pass reads each image once
    assert all(im is None for im in LoadImagesAndLabels(images, DatasetOptions(img_size=160)).imgs)
    monkeypatch.setattr(ds_mod, 'AUTO_CACHE_BYTES', 1000)  # "large" set
    assert all(im is None for im in LoadImagesAndLabels(images, DatasetOptions(img_size=160, augment=True,
                                                                               hyp=HYP)).imgs)


def test_other_ranks_print_nothing_rank_0_prints_as_a_script(tmp_path, capsys):
    """Rank filtering is setup_logging's alone: the dataset's lines, its fault warnings and its scan bar show on rank
    0 only; only rank 0 writes the label cache."""
    data = load_data_config(make_synthetic(tmp_path, n=4))
    bad = sorted((tmp_path / 'labels').glob('*.txt'))[0]
    bad.write_text('7 0.5 0.5 0.2 0.2\n')  # a fault: class 7 of 3
    opts = DatasetOptions(img_size=64, nc=3, prefix='train: ')
    setup_logging(1)
    assert len(LoadImagesAndLabels(data['train'], opts, rank=1)) == 3
    assert capsys.readouterr() == ('', '') and not (tmp_path / 'labels.cache').exists()
    ds_mod._REPORTED.clear()  # rank 0 is another process
    setup_logging(0)
    LoadImagesAndLabels(data['train'], opts, rank=0)
    out, err = capsys.readouterr()
    assert out.splitlines() == [f'train: WARNING: {bad}: skipped with its image: line 1: class 7 not in [0, 3)',
                                f"train: Scanning '{tmp_path / 'labels'}' images and labels... 3 found, 0 missing, "
                                f"0 empty, 1 corrupt",
                                f"train: New cache created: {tmp_path / 'labels.cache'}"]
    assert 'train: Scanning' in err and '100%' in err  # the bar


# --- items, batches, loaders ---------------------------------------------------------------------------------------

def test_items_rect_and_collate(synthetic16_data):
    path = load_data_config(synthetic16_data)['train']
    ds = LoadImagesAndLabels(path, DatasetOptions(img_size=160, batch_size=4, rect=True))
    assert not ds.mosaic and (ds.batch_shapes % 32 == 0).all()
    ar = ds.shapes[:, 1] / ds.shapes[:, 0]
    assert (np.diff(ar) >= 0).all()  # sorted by aspect ratio
    for i in range(len(ds)):
        img, lb, path_i, shapes = ds[i]
        assert tuple(img.shape[1:]) == tuple(ds.batch_shapes[ds.batch[i]])
        (h0, w0), ((rh, rw), pad) = shapes
        assert (w0, h0) == tuple(ds.shapes[i]) and img.dtype == torch.uint8
        assert len(lb) == len(ds.labels[i]) and ((lb[:, 2:] > 0) & (lb[:, 2:] <= 1)).all()
    imgs, targets, paths, shapes = LoadImagesAndLabels.collate_fn([ds[i] for i in range(4)])
    assert imgs.shape[0] == 4 and len(paths) == 4 and len(shapes) == 4
    counts = [len(ds.labels[i]) for i in range(4)]
    assert targets.shape == (sum(counts), 6) and targets[:, 0].tolist() == sum(([i] * c for i, c in
                                                                               enumerate(counts)), [])


@pytest.mark.slow
def test_create_dataloader_workers_and_seed(coco16_data):
    path = load_data_config(coco16_data)['train']

    def epoch(seed):
        loader, dataset = create_dataloader(path, DatasetOptions(img_size=160, batch_size=8, hyp=HYP, augment=True,
                                                                 seed=seed, nc=80),
                                            LoaderOptions(workers=2))
        assert loader.num_workers == 2 and len(loader) == 2
        return [(imgs, targets) for imgs, targets, _, _ in loader]

    a, b = epoch(0), epoch(0)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))  # seeded workers
    assert a[0][0].shape == (8, 3, 160, 160) and a[0][0].dtype == torch.uint8
    c = epoch(1)
    assert not torch.equal(a[0][0], c[0][0])


def test_create_dataloader_distributed_split(synthetic16_data):
    path = load_data_config(synthetic16_data)['train']
    seen = []
    for rank in (0, 1):
        loader, _ = create_dataloader(path, DatasetOptions(img_size=160, batch_size=4, seed=3),
                                      LoaderOptions(rank=rank, world_size=2, workers=0))
        loader.sampler.set_epoch(1)
        seen.append([p for _, _, paths, _ in loader for p in paths])
    assert len(seen[0]) == len(seen[1]) == 8 and not set(seen[0]) & set(seen[1])  # each rank its own half


def rank_batches(ds: LoadImagesAndLabels, bs: int, world: int, **kw) -> list[list[list[int]]]:
    """Per rank, the index chunks of bs that a DataLoader over a RectDistributedSampler would form."""
    out = []
    for rank in range(world):
        idx = [key.index for key in RectDistributedSampler(ds, bs, world, rank, **kw)]
        assert len(idx) % bs == 0
        out.append([idx[i:i + bs] for i in range(0, len(idx), bs)])
    return out


@pytest.mark.parametrize('world, bs', [(2, 4), (4, 3)])
def test_rect_distributed_sampler_whole_batches(synthetic16_data, world, bs):
    ds = LoadImagesAndLabels(load_data_config(synthetic16_data)['train'],
                             DatasetOptions(img_size=160, batch_size=bs, rect=True))
    nb = int(ds.batch.max()) + 1  # 4 batches of 4, or 6 of 3 with a last one of 1
    assert len({tuple(x) for x in ds.batch_shapes}) > 1  # several planned shapes, so mixing them would show
    plain = list(torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=0, shuffle=False))
    assert any(len({ds.batch[i] for i in plain[k:k + bs]}) > 1 for k in range(0, len(plain), bs))  # the fault

    for kw in ({}, {'shuffle': True, 'seed': 5}):
        ranks = rank_batches(ds, bs, world, **kw)
        assert len({len(r) for r in ranks}) == 1  # every rank the same number of batches
        for chunk in (c for r in ranks for c in r):
            assert len({ds.batch[i] for i in chunk}) == 1  # one planned batch, hence one shape
        assert {i for r in ranks for c in r for i in c} == set(range(len(ds)))  # every image
        dealt = [ds.batch[c[0]] for r in ranks for c in r]  # planned batch of each dealt batch
        assert set(dealt) == set(range(nb)) and len(dealt) - nb == -nb % world  # disjoint up to padding


def test_rect_distributed_sampler_epochs(synthetic16_data):
    ds = LoadImagesAndLabels(load_data_config(synthetic16_data)['train'],
                             DatasetOptions(img_size=160, batch_size=2, rect=True))  # 8 planned batches
    s = RectDistributedSampler(ds, 2, 2, 1, shuffle=True, seed=7)
    a = [key.index for key in s]
    s.set_epoch(1)
    b = [key.index for key in s]
    assert a != b and sorted(a) != sorted(b)  # another batch order and another half of the batches
    assert [key.index for key in RectDistributedSampler(ds, 2, 2, 1, shuffle=True, seed=7)] == a  # from seed + epoch
    assert [key.index for key in RectDistributedSampler(ds, 2, 2, 1)] == [i for b in range(1, 8, 2)
                                                                          for i in (2 * b, 2 * b + 1)]


def test_create_dataloader_distributed_rect(synthetic16_data):
    path = load_data_config(synthetic16_data)['train']
    seen = []
    for rank in (0, 1):
        loader, ds = create_dataloader(path, DatasetOptions(img_size=160, batch_size=3, rect=True, pad=0.5),
                                       LoaderOptions(rank=rank, world_size=2, workers=0))
        assert isinstance(loader.sampler, RectDistributedSampler) and len(loader) == 3  # 6 planned batches / 2
        loader.sampler.set_epoch(1)
        for imgs, _, paths, _ in loader:  # collate works: one shape per batch, the planned one
            b = ds.batch[ds.img_files.index(paths[0])]
            assert tuple(imgs.shape[2:]) == tuple(ds.batch_shapes[b]) and len(imgs) == 3
            seen.append(set(paths))
    assert set().union(*seen) == set(ds.img_files)
    assert sum(len(x) for x in seen) == 16  # only the last planned batch (1 image) padded with itself


@pytest.mark.slow
def test_load_images_and_video(tmp_path):
    for name in ('bus.jpg', 'zidane.jpg'):
        (tmp_path / name).write_bytes((COCO128.parents[1] / 'samples' / name).read_bytes())
    vid = tmp_path / 'clip.avi'
    writer = cv2.VideoWriter(str(vid), cv2.VideoWriter_fourcc(*'MJPG'), 10, (96, 64))
    for i in range(3):
        writer.write(np.full((64, 96, 3), 40 * i, np.uint8))
    writer.release()
    items = list(LoadImages(tmp_path, img_size=160))
    modes = [p.endswith('.avi') for p, *_ in items]
    assert modes == [False, False, True, True, True]
    path, img, img0, cap = items[1]
    assert path.endswith('zidane.jpg') and cap is None and img0.shape == (720, 1280, 3)
    assert img.shape == (3, 96, 160) and img.dtype == np.uint8  # minimum rectangle: 90 high padded to 96
    np.testing.assert_array_equal(img, letter_rgb(img0, 160))
    loader = LoadImages(vid, img_size=160)
    frames = [x[1] for x in loader]
    assert loader.mode == 'video' and loader.nframes == 3 and loader.frame == 3 and len(frames) == 3
    with pytest.raises(FileNotFoundError, match='does not exist'):
        LoadImages(tmp_path / 'none')


def test_streams_and_webcam_from_video_file(tmp_path):
    vid = tmp_path / 'cam.avi'  # a video file stands in for a camera or an RTSP/HTTP stream: same cv2.VideoCapture
    writer = cv2.VideoWriter(str(vid), cv2.VideoWriter_fourcc(*'MJPG'), 30, (192, 108))
    for i in range(20):
        writer.write(np.full((108, 192, 3), 10 * i, np.uint8))
    writer.release()
    lst = tmp_path / 'streams.txt'
    lst.write_text(f'{vid}\n{vid}\n')
    streams = LoadStreams(str(lst), img_size=160)
    sources, img, img0, cap = next(iter(streams))
    assert len(sources) == 2 and img.shape == (2, 3, 96, 160) and img.dtype == np.uint8 and cap is None
    assert img0[0].shape == (108, 192, 3) and streams.rect  # 90 rows padded to 96: the minimum rectangle
    n = sum(1 for _ in zip(range(10_000), streams))  # ends when the streams end
    assert n < 10_000
    cam = LoadWebcam(str(vid), img_size=160)
    frames = [x for x in cam]
    assert len(frames) == 20 and frames[0][1].shape == (3, 96, 160) and frames[0][0] == 'webcam_0.jpg'
    with pytest.raises(ConnectionError, match='cannot open stream'):
        LoadStreams(str(tmp_path / 'none.avi'))


def letter_rgb(img0: np.ndarray, size: int) -> np.ndarray:
    """The letterboxed (3, h, w) RGB array LoadImages should give."""
    from utils.data.augmentations import letterbox
    return letterbox(img0, size)[0][:, :, ::-1].transpose(2, 0, 1)


# --- samplers: order and augmentation from (seed, epoch, k), exact mid-epoch resume ----------------------------------

AUG = {**HYP, 'degrees': 5.0, 'translate': 0.1, 'scale': 0.2, 'shear': 2.0}  # every augmentation on


def epoch_batches(loader: torch.utils.data.DataLoader, epoch: int, start: int = 0) -> list[tuple]:
    """(i, imgs, targets, paths) of one iteration from batch `start` of `epoch`, numbered as the loop numbers them."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.set_start(start)
    return [(i, imgs, targets, paths) for i, (imgs, targets, paths, _) in enumerate(loader, start)]


def same_batches(a: list[tuple], b: list[tuple]) -> bool:
    """Two lists of epoch_batches hold the same batches: numbers, images, targets and paths."""
    return len(a) == len(b) and all(x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
                                    and x[3] == y[3] for x, y in zip(a, b))


@pytest.mark.slow
def test_worker_count_does_not_change_batches(coco16_data):
    path = load_data_config(coco16_data)['train']
    l0, _ = create_dataloader(path, DatasetOptions(img_size=128, batch_size=4, hyp=AUG, augment=True, seed=3, nc=80),
                              LoaderOptions(workers=0))
    l2, _ = create_dataloader(path, DatasetOptions(img_size=128, batch_size=4, hyp=AUG, augment=True, seed=3, nc=80),
                              LoaderOptions(workers=2))
    assert l0.num_workers == 0 and l2.num_workers == 2 and len(l0) == len(l2) == 4
    epochs = []
    for epoch in (0, 1):  # l2's workers persist: the second epoch reaches them through the sampler's keys
        a, b = epoch_batches(l0, epoch), epoch_batches(l2, epoch)
        assert same_batches(a, b)
        epochs.append(a)
    assert [p for x in epochs[0] for p in x[3]] != [p for x in epochs[1] for p in x[3]]  # another order
    assert sorted(p for x in epochs[0] for p in x[3]) == sorted(p for x in epochs[1] for p in x[3])  # same images
    assert same_batches(epoch_batches(l2, 0), epochs[0])  # an epoch again: the same batches
    other, _ = create_dataloader(path, DatasetOptions(img_size=128, batch_size=4, hyp=AUG, augment=True, seed=4, nc=80),
                                 LoaderOptions(workers=0))
    assert not torch.equal(epoch_batches(other, 0)[0][1], epochs[0][0][1])  # the seed decides


@pytest.mark.slow
def test_set_start_skips_batches_without_loading_them(coco16_data, monkeypatch):
    path = load_data_config(coco16_data)['train']
    loader, ds = create_dataloader(path, DatasetOptions(img_size=128, batch_size=4, hyp=AUG, augment=True, seed=3,
                                                        nc=80),
                                   LoaderOptions(workers=0))
    full = epoch_batches(loader, 1)
    keys, loaded = [], []
    get_item, load_image = LoadImagesAndLabels.__getitem__, ds.load_image
    monkeypatch.setattr(LoadImagesAndLabels, '__getitem__', lambda self, key: keys.append(key) or get_item(self, key))
    monkeypatch.setattr(ds, 'load_image', lambda i: loaded.append(i) or load_image(i))
    part = epoch_batches(loader, 1, start=2)
    assert [x[0] for x in part] == [2, 3] and same_batches(part, full[2:]) and len(loader) == 4
    assert [k.k for k in keys] == list(range(8, 16))  # only the samples of batches 2 and 3 were made
    assert len(loaded) == 4 * 8 and loaded[::4] == [k.index for k in keys]  # each: its image and 3 mosaic partners
    monkeypatch.undo()
    assert len(list(loader)) == 4  # set_start holds for one iteration only
    l2, _ = create_dataloader(path, DatasetOptions(img_size=128, batch_size=4, hyp=AUG, augment=True, seed=3, nc=80),
                              LoaderOptions(workers=2))
    assert same_batches(epoch_batches(l2, 1, start=3), full[3:])  # with workers too
    assert epoch_batches(l2, 1, start=4) == []  # the epoch was complete
    with pytest.raises(ValueError, match=r'start batch 5 is not in \[0, 4\]'):
        loader.sampler.set_start(5)


def samples_by_k(loader: torch.utils.data.DataLoader, epoch: int, start: int = 0) -> dict[int, tuple]:
    """{k: (image, labels (n, 5), path)} of every sample one iteration gives, k its position in the global order."""
    batches = epoch_batches(loader, epoch, start)
    keys = loader.sampler.epoch_keys()[start * loader.batch_size:]
    out, j = {}, 0
    for _, imgs, targets, paths in batches:
        for b in range(len(imgs)):
            out[keys[j].k] = (imgs[b], targets[targets[:, 0] == b, 1:], paths[b])
            j += 1
    assert j == len(keys)
    return out


def same_samples(a: dict[int, tuple], b: dict[int, tuple]) -> bool:
    """The samples of a are in b with the same image, labels and path."""
    return all(k in b and torch.equal(v[0], b[k][0]) and torch.equal(v[1], b[k][1]) and v[2] == b[k][2]
               for k, v in a.items())


@pytest.mark.slow
def test_ddp_shards_partition_the_epoch_and_resume(coco16_data):
    path = load_data_config(coco16_data)['train']
    single, _ = create_dataloader(path, DatasetOptions(img_size=128, batch_size=2, hyp=AUG, augment=True, seed=3,
                                                       nc=80), LoaderOptions(workers=0))
    whole = samples_by_k(single, 2)
    assert sorted(whole) == list(range(16))
    ranks = []
    for rank in (0, 1):
        loader, _ = create_dataloader(path, DatasetOptions(img_size=128, batch_size=2, hyp=AUG, augment=True, seed=3,
                                                           nc=80),
                                      LoaderOptions(rank=rank, world_size=2, workers=1))
        assert len(loader) == 4
        ranks.append(samples_by_k(loader, 2))
        part = samples_by_k(loader, 2, start=3)  # resume a rank at its batch 3: its last 2 samples
        assert sorted(part) == sorted(ranks[-1])[-2:] and same_samples(part, ranks[-1])
    assert sorted(ranks[0]) == list(range(0, 16, 2)) and sorted(ranks[1]) == list(range(1, 16, 2))  # a partition
    # sample k is the same image, augmented the same, whichever process (and worker) loads it
    assert same_samples(ranks[0], whole) and same_samples(ranks[1], whole)


@pytest.mark.slow
def test_image_weights_loader_resumes_and_augments_repeats_apart(coco16_data):
    path = load_data_config(coco16_data)['train']
    weights = np.zeros(16)
    weights[[2, 5]] = 1.0  # only two images are drawn: each about 8 times
    loaders = []
    for workers in (0, 2):
        loader, ds = create_dataloader(path, DatasetOptions(img_size=128, batch_size=4, hyp=AUG, augment=True,
                                                            image_weights=True, seed=3, nc=80),
                                       LoaderOptions(workers=workers))
        loader.sampler.set_weights(weights)
        loaders.append(loader)
    full = epoch_batches(loaders[0], 1)
    assert same_batches(epoch_batches(loaders[1], 1), full) and same_batches(epoch_batches(loaders[1], 1, 2), full[2:])
    paths = [p for x in full for p in x[3]]
    assert set(paths) == {ds.img_files[2], ds.img_files[5]} and len(paths) == 16
    imgs = torch.cat([x[1] for x in full])
    for p in set(paths):  # the draws of one image: one augmentation each (k differs)
        same_image = [imgs[j] for j, q in enumerate(paths) if q == p]
        assert len({x.numpy().tobytes() for x in same_image}) == len(same_image)


@pytest.mark.slow
def test_rect_loaders_resume(coco16_data):
    path = load_data_config(coco16_data)['train']
    single, ds = create_dataloader(path, DatasetOptions(img_size=128, batch_size=4, hyp=AUG, augment=True, rect=True,
                                                        seed=3, nc=80),
                                   LoaderOptions(workers=0))
    full = epoch_batches(single, 0)
    # as the original: no shuffle, the planned batches in order, each with its planned shape
    assert [list(x[3]) for x in full] == [ds.img_files[i:i + 4] for i in range(0, 16, 4)]
    assert all(tuple(imgs.shape[2:]) == tuple(ds.batch_shapes[i]) for i, imgs, _, _ in full)
    assert same_batches(epoch_batches(single, 0, start=2), full[2:])
    for rank in (0, 1):
        loader, _ = create_dataloader(path, DatasetOptions(img_size=128, batch_size=3, hyp=AUG, augment=True,
                                                           rect=True, seed=3, nc=80),
                                      LoaderOptions(rank=rank, world_size=2, workers=1))
        assert isinstance(loader.sampler, RectDistributedSampler) and len(loader) == 3
        whole = epoch_batches(loader, 1)
        assert same_batches(epoch_batches(loader, 1, start=1), whole[1:])


@pytest.mark.slow
def test_create_dataloader_needs_nc_to_train(coco16_data):
    path = load_data_config(coco16_data)['train']
    with pytest.raises(ValueError, match='needs nc'):
        create_dataloader(path, DatasetOptions(img_size=128, batch_size=4, hyp=AUG, augment=True),
                          LoaderOptions(workers=0))
    loader, _ = create_dataloader(path, DatasetOptions(img_size=128, batch_size=4, rect=True),
                                  LoaderOptions(shuffle=False, workers=0))
    assert not loader.pin_memory  # pinned only when asked (a loader feeding a CUDA device)


WORKERS_UNDER_SIGNALS = '''
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import utils.data.datasets as d
hyp = {'hsv_h': 0.0, 'hsv_s': 0.0, 'hsv_v': 0.0, 'degrees': 0.0, 'translate': 0.0, 'scale': 0.0, 'shear': 0.0}
loader, _ = d.create_dataloader(sys.argv[2], d.DatasetOptions(img_size=128, batch_size=2, hyp=hyp, augment=True, nc=80),
                                d.LoaderOptions(workers=2))
real = d.ignore_preemption_signals
d.ignore_preemption_signals = lambda pid: (time.sleep(1.5), real(pid))  # slow workers: signalled while starting
it = iter(loader)
got = []  # the main process's own handlers, installed once the workers are forked (as a trainer may)
signal.signal(signal.SIGTERM, lambda *a: got.append('TERM'))
signal.signal(signal.SIGUSR1, lambda *a: got.append('USR1'))
print('WORKERS', *[w.pid for w in it._workers], flush=True)
sys.stdin.readline()  # the test signals the whole process group meanwhile, at the workers' start and later
n = sum(1 for _ in it)
print('BATCHES', n, 'SIGNALS', ','.join(sorted(set(got))), flush=True)
sys.stdin.readline()  # the test kills this process with SIGKILL, or lets it exit with its workers running
'''


def _alive(pid: int) -> bool:
    """pid runs (a zombie left unreaped counts as gone)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != 'linux', reason='process groups and /proc')
@pytest.mark.parametrize('end', ['kill -9', 'exit'])
def test_workers_survive_preemption_signals_and_end_with_the_main_process(coco16_data, end, tmp_path):
    import signal
    import time
    path = load_data_config(coco16_data)['train']
    p = subprocess.Popen([sys.executable, '-c', WORKERS_UNDER_SIGNALS, str(ROOT), path], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=(tmp_path / 'stderr.txt').open('w'), text=True,
                         start_new_session=True)

    def next_line(prefix: str) -> str:
        """The script's next output line starting with prefix ('' at its end)."""
        line = p.stdout.readline()
        while line and not line.startswith(prefix):
            line = p.stdout.readline()
        return line

    try:
        line = next_line('WORKERS')
        assert line, 'the script ended before its workers ran'
        workers = [int(x) for x in line.split()[1:]]
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        for _ in range(2):  # while the workers start (they sleep 1.5 s first), then while they work
            os.killpg(p.pid, signal.SIGTERM)  # what SLURM and spot instances do: the whole group
            os.killpg(p.pid, signal.SIGUSR1)
            time.sleep(2)
        p.stdin.write('\n')
        p.stdin.flush()
        line = next_line('BATCHES')
        if not line:
            p.wait(10)
        assert line.split()[:3] == ['BATCHES', '8', 'SIGNALS'], (tmp_path / 'stderr.txt').read_text()[-3000:]
        assert line.split()[3] == 'TERM,USR1', line  # and the main process got both
        assert all(_alive(w) for w in workers)
        if end == 'kill -9':  # no chance to shut the workers down: they notice that their main process is gone
            p.kill()
            p.wait(10)
        else:  # an interpreter exit terminate()s the workers still running: that SIGTERM they obey
            p.stdin.write('\n')
            p.stdin.flush()
            p.wait(30)
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), 'DataLoader workers outlived their main process'
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- the command line (train.py belongs to the training issue) -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / 'train.py').exists(), reason='train.py is not written yet')
def test_train_on_planted_faults(tmp_path):
    data, faulty = make_faulty(tmp_path / 'faulty')
    before = snapshot(tmp_path / 'faulty')
    run = tmp_path / 'run'  # the working directory: whatever train.py writes lands here, not in the checkout
    run.mkdir()
    (run / 'cfg').symlink_to(ROOT / 'cfg')
    set_read_only(tmp_path / 'faulty', True)
    try:
        r = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--cfg', 'cfg/yolov3-tiny.cfg', '--data',
                            str(data), '--weights', str(TINY_WEIGHTS), '--img-size', '160', '--epochs', '1',
                            '--batch-size', '8', '--device', 'cpu'], cwd=run, capture_output=True, text=True,
                           timeout=600)
    finally:
        set_read_only(tmp_path / 'faulty', False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for f, reason in faulty.items():  # named once (train and val share the folder), with the reason
        assert len(re.findall(re.escape(f) + '.*' + reason, out)) == 1, f'{f} not reported once:\n{out[-4000:]}'
    assert 'Traceback' not in out
    assert snapshot(tmp_path / 'faulty') == before  # no dataset file changed or added


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / 'train.py').exists(), reason='train.py is not written yet')
def test_train_missing_dataset(tmp_path):
    missing = tmp_path / 'nowhere' / 'images'
    cfg = tmp_path / 'missing.data'
    cfg.write_text(f'classes=80\ntrain={missing}\nvalid={missing}\nnames={COCO_NAMES}\n')
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--cfg', str(ROOT / 'cfg' / 'yolov3-tiny.cfg'),
                        '--data', str(cfg), '--weights', str(TINY_WEIGHTS), '--img-size', '160', '--epochs', '1',
                        '--batch-size', '8', '--device', 'cpu'], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and str(missing) in out and 'Traceback' not in out, out[-3000:]
