"""Write tests/fixtures/darknet_zoo/<case>.npz: Darknet's results on thinned zoo cfgs, for tests/test_zoo_fixture.py.

Each case is a cfg of ../shared/darknet-zoo made small (zoo_cfg.with_size, zoo_cfg.thinned: every convolution's
filters divided, few classes; the same layers, kinds and heads), a seeded uint8 image and Darknet's seeded weights
(net_harness.c). The cfg text is not stored: the test rebuilds it from ../shared with the same edits and checks the
source's sha256.

    python tools/darknet_harness/make_zoo_fixture.py --darknet /tmp/darknet [--cases yolov4-tiny enet-coco]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
from zoo import ROOT, SEED, ZOO, harness_binary, run_darknet, seeded_image
from zoo_cfg import max_stride, thinned, with_size

OUT = ROOT / 'tests' / 'fixtures' / 'darknet_zoo'
# case -> (zoo cfg, filters divisor, classes): each head and layer kind of the zoo at least once. The input is
# 3 x 2 cells of the network's largest stride (fixture_size).
CASES = {
    'yolov3-tiny': ('yolov3-tiny', 16, 3),  # [yolo], maxpool stride 1, upsample
    'yolov4-tiny': ('yolov4-tiny', 16, 3),  # route groups/group_id, scale_x_y
    'yolov7-tiny': ('yolov7-tiny', 16, 3),  # new_coords, SPP maxpools
    'yolov4-csp': ('yolov4-csp', 32, 3),  # Scaled-YOLOv4 [net] keys, new_coords, mish
    'enet-coco': ('enet-coco', 16, 3),  # [scale_channels], depthwise groups, swish, avgpool
    'yolov2': ('yolov2', 32, 3),  # old [reorg], [region]
    'yolov2-tiny': ('yolov2-tiny', 16, 3),  # [region] with its own anchors, maxpool stride 1
    'Gaussian_yolov3_BDD': ('Gaussian_yolov3_BDD', 32, 3),  # [Gaussian_yolo]
    'yolov4-sam-mish-csp-reorg-bfm': ('yolov4-sam-mish-csp-reorg-bfm', 32, 3),  # [sam], stopbackward, reorg3d
    'resnet152_trident': ('resnet152_trident', 32, 3),  # dilation, share_index
}


def fixture_size(text: str) -> tuple[int, int]:
    """(width, height): 3 x 2 cells of the network's largest stride."""
    s = max_stride(text)
    return 3 * s, 2 * s


def make_case(exe: Path, name: str, work: Path) -> dict:
    """Run Darknet on one case; the arrays of its .npz."""
    cfg, divisor, classes = CASES[name]
    src = (ZOO / f'{cfg}.cfg').read_bytes()
    w, h = fixture_size(src.decode(errors='replace'))
    text = thinned(with_size(src.decode(errors='replace'), w, h), divisor, classes)
    image = seeded_image(h, w, SEED)
    dn = run_darknet(exe, text, work / name, image, SEED, False, 600)
    arrays = {
        'cfg': np.array(cfg), 'cfg_sha256': np.array(hashlib.sha256(src).hexdigest()),
        'size': np.array([w, h]), 'thin': np.array([divisor, classes]), 'seed': np.array(SEED),
        'image': image, 'weights': np.frombuffer((work / name / 'darknet.weights').read_bytes(), np.uint8),
        'n_layers': np.array(len(dn.layers)), 'letter_box': np.array(dn.letter_box),
        'heads': np.array([[hd.index, hd.n, hd.classes, hd.h, hd.w] for hd in dn.heads]),
        'head_types': np.array([hd.type for hd in dn.heads]), 'boxes': dn.boxes,
    }
    for hd in dn.heads:
        arrays[f'input_{hd.index - 1}'] = dn.output(hd.index - 1)
        arrays[f'output_{hd.index}'] = dn.output(hd.index)
    return arrays


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--darknet', type=Path, required=True, help='AlexeyAB/darknet checkout built by build.sh')
    p.add_argument('--cases', nargs='*', default=list(CASES), choices=list(CASES))
    p.add_argument('--work', type=Path, default=None, help='keep the dumps here (default: a temporary folder)')
    opt = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = opt.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        exe = harness_binary(opt.darknet.resolve(), work)
        for name in opt.cases:
            arrays = make_case(exe, name, work)
            np.savez_compressed(OUT / f'{name}.npz', **arrays)
            print(f"{name}: {len(arrays['boxes'])} boxes, {arrays['weights'].size:,} B of weights, "
                  f"{(OUT / f'{name}.npz').stat().st_size:,} B")
    return 0


if __name__ == '__main__':
    sys.exit(main())
