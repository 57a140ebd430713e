"""Write the Darknet cfg files in cfg/ from compact architecture descriptions.

    python tools/make_cfgs.py            # (re)writes cfg/*.cfg

Each architecture is built block by block (Darknet-53 residual stages, CSP stages, SPP, FPN/PAN heads) so that the
layer list is easy to audit; tests/test_models.py checks every file against the reference cfg of the same name.
"""
from __future__ import annotations

from pathlib import Path

COCO_ANCHORS = [(10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326)]
TINY_ANCHORS = [(10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319)]
V4_ANCHORS = [(12, 16), (19, 36), (40, 28), (36, 75), (76, 55), (72, 146), (142, 110), (192, 243), (459, 401)]


class Cfg:
    """Accumulates cfg sections; each add returns the new layer's absolute index."""

    def __init__(self, net: dict):
        self.sections: list[tuple[str, dict]] = [('net', net)]

    @property
    def n(self) -> int:
        """Number of layers so far (the [net] section excluded)."""
        return len(self.sections) - 1

    def add(self, kind: str, **kv) -> int:
        self.sections.append((kind, kv))
        return self.n - 1

    def conv(self, filters: int, size: int = 1, stride: int = 1, act: str = 'leaky', bn: bool = True) -> int:
        kv = {'batch_normalize': 1} if bn else {}
        kv.update(filters=filters, size=size, stride=stride, pad=1, activation=act)
        return self.add('convolutional', **kv)

    def route(self, *layers: int, **kv) -> int:
        """Route to absolute layer indices, written relative (negative) as Darknet cfgs usually are."""
        return self.add('route', layers=','.join(str(l - self.n if l >= 0 else l) for l in layers), **kv)

    def shortcut(self, frm: int) -> int:
        return self.add('shortcut', **{'from': frm - self.n}, activation='linear')

    def maxpool(self, size: int, stride: int) -> int:
        return self.add('maxpool', size=size, stride=stride)

    def upsample(self) -> int:
        return self.add('upsample', stride=2)

    def yolo(self, mask: list[int], anchors: list[tuple[int, int]], classes: int, **extra) -> int:
        kv = {'mask': ','.join(map(str, mask)), 'anchors': ',  '.join(f'{w},{h}' for w, h in anchors),
              'classes': classes, 'num': len(anchors)}
        kv.update(extra)
        return self.add('yolo', **kv)

    def text(self, header: str) -> str:
        lines = [f'# {line}' if line else '#' for line in header.strip().splitlines()] + ['']
        for kind, kv in self.sections:
            lines.append(f'[{kind}]')
            lines += [f'{k}={v}' for k, v in kv.items()]
            lines.append('')
        return '\n'.join(lines)


def net(size: int = 416, lr: float = 0.001, momentum: float = 0.9, **extra) -> dict:
    """The [net] section: Darknet's own training settings (this project's train.py takes its own hyp file)."""
    d = {'batch': 64, 'subdivisions': 16, 'width': size, 'height': size, 'channels': 3, 'momentum': momentum,
         'decay': 0.0005, 'angle': 0, 'saturation': 1.5, 'exposure': 1.5, 'hue': 0.1, 'learning_rate': lr,
         'burn_in': 1000, 'max_batches': 500200, 'policy': 'steps', 'steps': '400000,450000', 'scales': '.1,.1'}
    d.update(extra)
    return d


def yolo_kv(random: bool = True) -> dict:
    return {'jitter': 0.3, 'ignore_thresh': 0.7, 'truth_thresh': 1, 'random': int(random)}


def darknet53(c: Cfg) -> list[int]:
    """Darknet-53 backbone: returns the indices of the stride 8, 16 and 32 outputs."""
    c.conv(32, 3)
    outs = []
    for filters, blocks in ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)):
        c.conv(filters, 3, 2)  # downsample
        for _ in range(blocks):
            start = c.n - 1
            c.conv(filters // 2, 1)
            c.conv(filters, 3)
            c.shortcut(start)
        outs.append(c.n - 1)
    return outs[2:]


def yolov3_head(c: Cfg, feats: list[int], nc: int, spp: bool = False) -> None:
    """The YOLOv3 FPN head (SPP after its first 3 convs when asked): P5, P4 and P3 outputs."""
    levels = list(zip(reversed(feats), (1024, 512, 256), ([6, 7, 8], [3, 4, 5], [0, 1, 2])))
    for level, (feat, f, mask) in enumerate(levels):
        half = f // 2
        if level:  # lateral: reduce, upsample and join the backbone feature of this stride
            c.conv(half, 1)
            c.upsample()
            c.route(c.n - 1, feat)
        c.conv(half, 1)
        c.conv(f, 3)
        c.conv(half, 1)
        if spp and level == 0:
            spp_block(c)
            c.conv(half, 1)
            c.conv(f, 3)
            c.conv(half, 1)
        else:
            c.conv(f, 3)
            c.conv(half, 1)
        branch = c.n - 1
        c.conv(f, 3)
        c.conv((nc + 5) * 3, 1, act='linear', bn=False)
        c.yolo(mask, COCO_ANCHORS, nc, **yolo_kv())
        if level < 2:
            c.route(branch)


def spp_block(c: Cfg) -> None:
    """Spatial pyramid pooling: max pools of 5, 9, 13 (stride 1) concatenated with their input."""
    x = c.n - 1
    c.maxpool(5, 1)
    c.route(x)
    c.maxpool(9, 1)
    c.route(x)
    c.maxpool(13, 1)
    c.route(c.n - 1, c.n - 3, c.n - 5, x)


def yolov3(nc: int = 80, spp: bool = False) -> Cfg:
    c = Cfg(net())
    yolov3_head(c, darknet53(c), nc, spp)
    return c


def yolov3_tiny(nc: int = 80, three_heads: bool = False) -> Cfg:
    """YOLOv3-tiny (2 heads, 6 anchors) or yolov3-tiny3 (a third, stride-8 head; the 9 COCO anchors)."""
    c = Cfg(net(momentum=0.9))
    taps = {}  # backbone outputs the upsampled heads join: stride 16 and stride 8
    for i, f in enumerate((16, 32, 64, 128, 256, 512)):
        c.conv(f, 3)
        if i in (3, 4):
            taps[i] = c.n - 1
        c.maxpool(2, 1 if i == 5 else 2)
    c.conv(1024, 3)
    c.conv(256, 1)
    branch = c.n - 1
    c.conv(512, 3)
    c.conv((nc + 5) * 3, 1, act='linear', bn=False)
    if three_heads:
        # as Darknet's yolov3-tiny3.cfg: the third head reads the 128-filter conv of the stride-8 stage
        heads = [([6, 7, 8], None, None), ([3, 4, 5], taps[4], 256), ([0, 1, 2], taps[3], 128)]
        anchors = COCO_ANCHORS
    else:
        # as the official weights (and the original's yolov3-tiny.cfg): the second head uses anchors 1,2,3, not
        # 0,1,2; with 0,1,2 the official weights lose a third of their mAP. The 1-class cfg too (the original's has
        # 0,1,2): fine-tuning it from the official weights then starts with the boxes those weights predict
        heads = [([3, 4, 5], None, None), ([1, 2, 3], taps[4], 256)]
        anchors = TINY_ANCHORS
    for mask, tap, filters in heads:
        if tap is not None:  # lateral: reduce the previous head's branch, upsample, join the backbone tap
            c.route(branch)
            c.conv(128, 1)
            c.upsample()
            c.route(c.n - 1, tap)
            c.conv(filters, 3)
            branch = c.n - 1
            c.conv((nc + 5) * 3, 1, act='linear', bn=False)
        c.yolo(mask, anchors, nc, **yolo_kv())
    return c


def csp_darknet53(c: Cfg) -> list[int]:
    """CSPDarknet-53 with mish: returns the indices of the stride 8, 16 and 32 outputs."""
    c.conv(32, 3, act='mish')
    outs = []
    for stage, (filters, blocks) in enumerate(((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4))):
        c.conv(filters, 3, 2, act='mish')
        down = c.n - 1
        inner = filters if stage == 0 else filters // 2
        c.conv(inner, 1, act='mish')  # cross-stage partial branch
        c.route(down)
        c.conv(inner, 1, act='mish')
        for _ in range(blocks):
            start = c.n - 1
            c.conv(filters // 2 if stage == 0 else inner, 1, act='mish')
            c.conv(inner, 3, act='mish')
            c.shortcut(start)
        c.conv(inner, 1, act='mish')
        c.route(c.n - 1, down + 1)
        c.conv(filters, 1, act='mish')  # transition
        outs.append(c.n - 1)
    return outs[2:]


def yolov4(nc: int = 80) -> Cfg:
    c = Cfg(net(608, lr=0.00261, momentum=0.949, subdivisions=8, max_batches=500500, mosaic=1))
    p3, p4, p5 = csp_darknet53(c)
    c.conv(512, 1)
    c.conv(1024, 3)
    c.conv(512, 1)
    spp_block(c)
    c.conv(512, 1)
    c.conv(1024, 3)
    c.conv(512, 1)
    n5 = c.n - 1
    lat = {}
    for f, feat in ((256, p4), (128, p3)):  # top-down path
        c.conv(f, 1)
        c.upsample()
        c.route(feat)
        c.conv(f, 1)
        c.route(c.n - 1, c.n - 3)
        for _ in range(2):
            c.conv(f, 1)
            c.conv(f * 2, 3)
        c.conv(f, 1)
        lat[f] = c.n - 1
    kv = {'jitter': 0.3, 'ignore_thresh': 0.7, 'truth_thresh': 1, 'iou_thresh': 0.213, 'cls_normalizer': 1.0,
          'iou_normalizer': 0.07, 'iou_loss': 'ciou', 'nms_kind': 'greedynms', 'beta_nms': 0.6}
    c.conv(256, 3)
    c.conv((nc + 5) * 3, 1, act='linear', bn=False)
    c.yolo([0, 1, 2], V4_ANCHORS, nc, scale_x_y=1.2, **kv)
    for f, skip, mask, sxy in ((256, lat[256], [3, 4, 5], 1.1), (512, n5, [6, 7, 8], 1.05)):  # bottom-up path
        c.route(c.n - 4)
        c.conv(f, 3, 2)
        c.route(c.n - 1, skip)
        for _ in range(2):
            c.conv(f, 1)
            c.conv(f * 2, 3)
        c.conv(f, 1)
        c.conv(f * 2, 3)
        c.conv((nc + 5) * 3, 1, act='linear', bn=False)
        extra = dict(kv, random=1) if f == 512 else kv
        c.yolo(mask, V4_ANCHORS, nc, scale_x_y=sxy, **extra)
    return c


def yolov4_tiny(nc: int = 80) -> Cfg:
    c = Cfg(net(416, lr=0.00261, momentum=0.9, subdivisions=1, max_batches=2000200,
                steps='1600000,1800000'))
    c.conv(32, 3, 2)
    c.conv(64, 3, 2)
    for f in (64, 128, 256):  # CSP-tiny blocks: split channels, two convs, concat, pool
        c.conv(f, 3)
        full = c.n - 1
        c.route(full, groups=2, group_id=1)
        c.conv(f // 2, 3)
        a = c.n - 1
        c.conv(f // 2, 3)
        c.route(c.n - 1, a)
        c.conv(f, 1)
        last = c.n - 1
        c.route(full, last)
        c.maxpool(2, 2)
    c.conv(512, 3)
    c.conv(256, 1)
    branch = c.n - 1
    c.conv(512, 3)
    c.conv((nc + 5) * 3, 1, act='linear', bn=False)
    kv = {'jitter': 0.3, 'scale_x_y': 1.05, 'cls_normalizer': 1.0, 'iou_normalizer': 0.07, 'iou_loss': 'ciou',
          'ignore_thresh': 0.7, 'truth_thresh': 1, 'random': 0, 'resize': 1.5, 'nms_kind': 'greedynms',
          'beta_nms': 0.6}
    c.yolo([3, 4, 5], TINY_ANCHORS, nc, **kv)
    c.route(branch)
    c.conv(128, 1)
    c.upsample()
    c.route(c.n - 1, last)
    c.conv(256, 3)
    c.conv((nc + 5) * 3, 1, act='linear', bn=False)
    c.yolo([1, 2, 3], TINY_ANCHORS, nc, **kv)  # as Darknet's yolov4-tiny.cfg: anchors 1,2,3 here
    return c


HEADER = """{name}: {what}
Written for this project from the published Darknet architecture by tools/make_cfgs.py;
tests/test_models.py checks it layer by layer against the reference cfg of the same name.
Input size, and [net] training settings, are Darknet's; train.py uses its own --img-size and --hyp."""

MODELS = {
    'yolov3.cfg': (lambda: yolov3(), 'YOLOv3, Darknet-53 backbone, 3 scales, 80 COCO classes'),
    'yolov3-spp.cfg': (lambda: yolov3(spp=True), 'YOLOv3 with spatial pyramid pooling, 80 COCO classes'),
    'yolov3-tiny.cfg': (lambda: yolov3_tiny(), 'YOLOv3-tiny, 2 scales, 80 COCO classes'),
    'yolov3-tiny3.cfg': (lambda: yolov3_tiny(three_heads=True), 'YOLOv3-tiny with a third (stride 8) scale'),
    'yolov4.cfg': (lambda: yolov4(), 'YOLOv4, CSPDarknet-53 + SPP + PANet, 80 COCO classes'),
    'yolov4-tiny.cfg': (lambda: yolov4_tiny(), 'YOLOv4-tiny, CSP-tiny backbone, 80 COCO classes'),
    'yolov3-1cls.cfg': (lambda: yolov3(nc=1), 'YOLOv3 for one class (custom data)'),
    'yolov3-spp-1cls.cfg': (lambda: yolov3(nc=1, spp=True), 'YOLOv3-SPP for one class (custom data)'),
    'yolov3-tiny-1cls.cfg': (lambda: yolov3_tiny(nc=1), 'YOLOv3-tiny for one class (custom data)'),
    'yolov3-tiny3-1cls.cfg': (lambda: yolov3_tiny(nc=1, three_heads=True), 'YOLOv3-tiny3 for one class'),
}


def main() -> None:
    out = Path(__file__).resolve().parents[1] / 'cfg'
    out.mkdir(exist_ok=True)
    for name, (build, what) in MODELS.items():
        (out / name).write_text(build().text(HEADER.format(name=name, what=what)))
        print(f'wrote cfg/{name}')


if __name__ == '__main__':
    main()
