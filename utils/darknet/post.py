"""Darknet's `detector test` and `detector map` pre- and post-processing (AlexeyAB/darknet), driven by the cfg.

What a Darknet user compares a port with: the same weights, the same image, the boxes Darknet prints. Darknet
stretches the image to the network size (or letterboxes it when [net] letter_box=1) with its own bilinear arithmetic,
keeps a box when its objectness is over the threshold, scores each class as objectness x class probability (a box can
carry several classes), runs its NMS per class (the last [yolo] layer's nms_kind, beta_nms; threshold 0.45) and prints
corners rounded to pixels. `detector map` does the same at threshold 0.005 and computes the area under each class's
precision/recall curve (mean over every class of the cfg, classes without labels included).

Images are RGB float32 (h, w, 3) in [0, 1]. Boxes are Darknet's: float32 (n, 4) [x_center, y_center, w, h] relative
to the image, as Darknet keeps them after correct_yolo_boxes. Facts from darknet/src: image.c, network.c (get_network
_boxes, fuse_conv_batchnorm), yolo_layer.c (get_yolo_detections, correct_yolo_boxes), box.c (do_nms_sort, diounms_sort)
and detector.c (test_detector, validate_detector_map) at 59596d7.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn

from utils.darknet import stb_jpeg
from utils.darknet.parse_config import ConfigError
from utils.logs import LOGGER

TEST_THRESH = 0.25  # `detector test -thresh` default
MAP_THRESH = 0.005  # validate_detector_map's candidate threshold (a constant there)
NMS_THRESH = 0.45  # test_detector's and validate_detector_map's NMS threshold (constants)
FUSED_BN_EPS = 1e-5  # fuse_conv_batchnorm: scales / sqrt(rolling_variance + .00001); both commands fuse
NMS_KINDS = ('default', 'greedynms', 'diounms')  # what parse_yolo accepts for [yolo] nms_kind


@dataclass(frozen=True)
class DarknetSettings:
    """What Darknet's detector reads from the cfg: network size, [net] letter_box, the last [yolo]'s NMS."""
    width: int
    height: int
    letter_box: bool
    nms_kind: str = 'default'
    beta_nms: float = 0.6


def darknet_settings(hyperparams: dict, module_defs: Sequence[dict], cfg_name: str = '<cfg>') -> DarknetSettings:
    """The DarknetSettings of a parsed cfg; an nms_kind Darknet's [yolo] does not know is a ConfigError, and so is a
    detection layer other than [yolo] ([Gaussian_yolo] and [region] score and suppress their own way)."""
    for d in module_defs:
        if d['type'] in ('gaussian_yolo', 'region'):
            raise ConfigError(f"{cfg_name}:{d['line']}: [{d['type']}]: Darknet's detector post-processing is "
                              f"reproduced for [yolo] layers only")
    yolos = [d for d in module_defs if d['type'] == 'yolo']
    if not yolos:
        raise ConfigError(f"{cfg_name}: no [yolo] layer: Darknet's detector post-processing needs one")
    for d in yolos:
        kind = d.get('nms_kind', 'default')
        if kind not in NMS_KINDS:  # Darknet falls back to 'default' without a word; we say so instead
            raise ConfigError(f"{cfg_name}:{d['line']}: [yolo] nms_kind={kind} is not one of {', '.join(NMS_KINDS)} "
                              f"(Darknet would silently run its default NMS; write nms_kind=default for that)")
    last = yolos[-1]  # test_detector and validate_detector_map take the NMS of the last detection layer
    return DarknetSettings(int(hyperparams.get('width', 416)), int(hyperparams.get('height', 416)),
                           bool(hyperparams.get('letter_box', 0)), last.get('nms_kind', 'default'),
                           float(last.get('beta_nms', 0.6)))


def settings_from_model(model: nn.Module) -> DarknetSettings:
    """DarknetSettings of a models.Darknet (its [yolo] layers decode new_coords heads as get_yolo_box does)."""
    return darknet_settings(model.hyperparams, model.module_defs, model.cfg_path)


def use_darknet_bn_eps(model: nn.Module) -> nn.Module:
    """Set every BatchNorm2d's eps to fuse_conv_batchnorm's (1e-5, models.py's default too) before model.fuse():
    Darknet's detector commands run the fused network. In place; refused on a fused model (its eps is baked in)."""
    if getattr(model, 'fused', False):
        raise ValueError("the model is already fused; set Darknet's BatchNorm eps before fusing")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = FUSED_BN_EPS
    return model


# ---------------------------------------------------------------------------------------------------------------
# the image: load_image (RGB, / 255), resize_image / letterbox_image

@functools.cache  # once per process
def _warn_no_jpeglib() -> None:
    LOGGER.warning(f"--darknet: JPEGs are decoded by OpenCV (libjpeg-turbo), not as Darknet's stb_image does: about "
                   f"1-5% of the pixels differ by a level, so a box near a threshold can differ. For Darknet's exact "
                   f"pixels: {stb_jpeg.PIP_INSTALL}")


def read_rgb_uint8(path: str | Path) -> np.ndarray:
    """An image file as Darknet built without OpenCV reads it (stbi_load, 3 channels): (h, w, 3) uint8 RGB. JPEGs go
    through utils/darknet/stb_jpeg.py (stb's IDCT, upsampling and colour arithmetic, bit-identical); other formats through
    OpenCV (lossless, the same pixels). EXIF orientation is ignored, as stb ignores it."""
    if stb_jpeg.is_jpeg(path):
        if stb_jpeg.jpeglib is not None:
            return stb_jpeg.decode(path)
        _warn_no_jpeglib()
    im = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if im is None:
        raise FileNotFoundError(f"{path}: cannot read the image")
    return np.ascontiguousarray(im[:, :, ::-1])


def read_bgr(path: str | Path) -> np.ndarray:
    """read_rgb_uint8 in OpenCV's BGR channel order (what detect.py --darknet draws on and passes back)."""
    return np.ascontiguousarray(read_rgb_uint8(path)[:, :, ::-1])


def load_image(path: str | Path) -> np.ndarray:
    """Darknet's load_image_color without OpenCV: stbi_load's bytes as RGB float32 (h, w, 3) / 255."""
    return read_rgb_uint8(path).astype(np.float32) / np.float32(255.0)


def resize_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """Darknet's resize_image: bilinear over (in - 1) / (out - 1) steps, columns first then rows, in float32; the last
    row takes only its (1 - dy) share, as image.c does. im: (h0, w0, c) float32 -> (h, w, c) float32."""
    h0, w0 = im.shape[:2]
    if (w0, h0) == (w, h):
        return im.copy()
    f32 = np.float32
    part = np.empty((h0, w, im.shape[2]), dtype=f32)  # columns resized, rows as they are
    part[:, w - 1] = im[:, w0 - 1]
    if w > 1 and w0 > 1:
        sx = np.arange(w - 1, dtype=f32) * (f32(w0 - 1) / f32(w - 1))
        ix = sx.astype(np.int64)
        dx = (sx - ix.astype(f32))[None, :, None]
        part[:, :w - 1] = (f32(1) - dx) * im[:, ix] + dx * im[:, np.minimum(ix + 1, w0 - 1)]
    else:
        part[:, :] = im[:, w0 - 1:w0]
    sy = np.arange(h, dtype=f32) * (f32(h0 - 1) / f32(h - 1)) if h > 1 else np.zeros(1, f32)
    iy = sy.astype(np.int64)
    dy = (sy - iy.astype(f32))[:, None, None]
    out = (f32(1) - dy) * part[iy]
    if h0 > 1:  # every row but the last adds dy x the next source row
        out[:h - 1] += dy[:h - 1] * part[np.minimum(iy[:h - 1] + 1, h0 - 1)]
    return out


def letterbox_size(w0: int, h0: int, w: int, h: int) -> tuple[int, int]:
    """(new_w, new_h) of an image w0 x h0 letterboxed into w x h, with Darknet's integer arithmetic."""
    if np.float32(w) / np.float32(w0) < np.float32(h) / np.float32(h0):
        return w, (h0 * w) // w0
    return (w0 * h) // h0, h


def letterbox_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """Darknet's letterbox_image: resize_image to fit w x h keeping the aspect ratio, centred on grey 0.5."""
    new_w, new_h = letterbox_size(im.shape[1], im.shape[0], w, h)
    boxed = np.full((h, w, im.shape[2]), 0.5, dtype=np.float32)
    dx, dy = (w - new_w) // 2, (h - new_h) // 2
    boxed[dy:dy + new_h, dx:dx + new_w] = resize_image(im, new_w, new_h)
    return boxed


def network_input(im: np.ndarray, settings: DarknetSettings) -> torch.Tensor:
    """The (1, 3, height, width) float32 tensor Darknet feeds its network for the RGB image im (h, w, 3)."""
    resize = letterbox_image if settings.letter_box else resize_image
    sized = resize(im, settings.width, settings.height)
    return torch.from_numpy(np.ascontiguousarray(sized.transpose(2, 0, 1)))[None]


# ---------------------------------------------------------------------------------------------------------------
# detections: get_network_boxes (thresholds, box correction), NMS

@dataclass
class Detections:
    """Darknet's `detection` array of one image: boxes (n, 4) relative xywh, objectness (n,), prob (n, classes)
    where a class at or below the threshold (or suppressed by NMS) is 0. Rows in Darknet's order."""
    boxes: np.ndarray
    objectness: np.ndarray
    prob: np.ndarray
    image_wh: tuple[int, int] = (1, 1)

    def pairs(self, thresh: float = 0.0) -> list[tuple[int, int, float]]:
        """(row, class, prob) of every class over thresh, in Darknet's order (rows, then classes)."""
        rows, cls = np.nonzero(self.prob > thresh)
        return [(int(r), int(c), float(self.prob[r, c])) for r, c in zip(rows, cls)]

    def xyxy_pixels(self) -> np.ndarray:
        """(n, 4) float64 corners in image pixels: (x -+ w/2) * image width, (y -+ h/2) * image height (float32 sums
        as Darknet's)."""
        b = self.boxes
        w, h = self.image_wh
        x1, x2 = b[:, 0] - b[:, 2] / np.float32(2), b[:, 0] + b[:, 2] / np.float32(2)
        y1, y2 = b[:, 1] - b[:, 3] / np.float32(2), b[:, 1] + b[:, 3] / np.float32(2)
        return np.stack([x1 * np.float32(w), y1 * np.float32(h), x2 * np.float32(w), y2 * np.float32(h)], 1)\
            .astype(np.float64)


def head_layout(yolo_p: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
    """(anchors, ny, nx) of each [yolo] output, from the model's raw maps (B, na, ny, nx, no)."""
    return [(int(p.shape[1]), int(p.shape[2]), int(p.shape[3])) for p in yolo_p]


def darknet_order(io: torch.Tensor | np.ndarray, layout: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """One image's decoded rows (N, no), the model's order (layer, anchor, y, x), in Darknet's (layer, y, x, anchor)."""
    io = io.detach().float().cpu().numpy() if isinstance(io, torch.Tensor) else np.asarray(io, np.float32)
    blocks, start = [], 0
    for na, ny, nx in layout:
        n = na * ny * nx
        blocks.append(io[start:start + n].reshape(na, ny, nx, -1).transpose(1, 2, 0, 3).reshape(n, -1))
        start += n
    if start != len(io):
        raise ValueError(f"{len(io)} output rows, but the [yolo] layers {list(layout)} make {start}")
    return np.concatenate(blocks)


def correct_boxes(boxes: np.ndarray, image_wh: tuple[int, int], net_wh: tuple[int, int], letter: bool) -> np.ndarray:
    """correct_yolo_boxes: boxes relative to the network input -> relative to the image (undoes the letterbox)."""
    netw, neth = net_wh
    new_w, new_h = letterbox_size(image_wh[0], image_wh[1], netw, neth) if letter else (netw, neth)
    ratiow, ratioh = np.float32(new_w) / np.float32(netw), np.float32(new_h) / np.float32(neth)
    out = boxes.copy()
    # x, y in double as yolo_layer.c's `deltaw / 2. / netw`; w, h times the float 1 / ratio
    out[:, 0] = (boxes[:, 0].astype(np.float64) - (netw - new_w) / 2. / netw) / np.float64(ratiow)
    out[:, 1] = (boxes[:, 1].astype(np.float64) - (neth - new_h) / 2. / neth) / np.float64(ratioh)
    out[:, 2] = boxes[:, 2] * (np.float32(1) / ratiow)
    out[:, 3] = boxes[:, 3] * (np.float32(1) / ratioh)
    return out


def get_network_boxes(io: torch.Tensor | np.ndarray, layout: Sequence[tuple[int, int, int]],
                      settings: DarknetSettings, image_wh: tuple[int, int], thresh: float) -> Detections:
    """Darknet's candidates of one image from the model's decoded output io (N, 5 + classes) (xywh in input pixels,
    sigmoids): objectness > thresh, prob = objectness x class prob kept where > thresh, boxes relative to the image."""
    rows = darknet_order(io, layout)
    obj = rows[:, 4]
    keep = obj > np.float32(thresh)
    rows, obj = rows[keep], obj[keep]
    prob = obj[:, None] * rows[:, 5:]
    prob[~(prob > np.float32(thresh))] = 0
    net = np.array([settings.width, settings.height, settings.width, settings.height], dtype=np.float32)
    boxes = correct_boxes(rows[:, :4] / net, image_wh, (settings.width, settings.height), settings.letter_box)
    return Detections(boxes.astype(np.float32), obj.copy(), prob, image_wh)


def box_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """box.c's box_iou of boxes a (..., 4) and b (..., 4) (broadcast), relative xywh, in float32; 0 where they do
    not meet (a negative overlap width or height) or where the union is 0."""
    half = np.float32(2)
    w = np.minimum(a[..., 0] + a[..., 2] / half, b[..., 0] + b[..., 2] / half) - \
        np.maximum(a[..., 0] - a[..., 2] / half, b[..., 0] - b[..., 2] / half)
    h = np.minimum(a[..., 1] + a[..., 3] / half, b[..., 1] + b[..., 3] / half) - \
        np.maximum(a[..., 1] - a[..., 3] / half, b[..., 1] - b[..., 3] / half)
    inter = np.where((w < 0) | (h < 0), np.float32(0), w * h)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.where((inter == 0) | (union == 0), np.float32(0), inter / union).astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """box_iou of one box a (4,) against boxes b (n, 4): (n,)."""
    return box_iou_pairs(a[None, :], b)


def box_diou(a: np.ndarray, b: np.ndarray, beta: float) -> np.ndarray:
    """box.c's box_diounms: IoU - (centre distance^2 / enclosing diagonal^2) ** beta (box_diou: beta 0.6)."""
    half = np.float32(2)
    cw = np.maximum(a[0] + a[2] / half, b[:, 0] + b[:, 2] / half) - np.minimum(a[0] - a[2] / half,
                                                                             b[:, 0] - b[:, 2] / half)
    ch = np.maximum(a[1] + a[3] / half, b[:, 1] + b[:, 3] / half) - np.minimum(a[1] - a[3] / half,
                                                                             b[:, 1] - b[:, 3] / half)
    c = cw * cw + ch * ch
    d = (a[0] - b[:, 0]) ** 2 + (a[1] - b[:, 1]) ** 2
    iou = box_iou(a, b)
    with np.errstate(divide='ignore', invalid='ignore'):
        term = np.power((d / c).astype(np.float64), beta).astype(np.float32)
    return np.where(c == 0, iou, iou - term)


def nms_criterion(kind: str, beta: float):
    """The overlap each NMS kind compares with the threshold: box_iou (default), box_diou (greedynms: its
    exponent is box.c's fixed 0.6, beta_nms unused), box_diounms with beta_nms (diounms)."""
    if kind == 'default':
        return box_iou
    if kind == 'greedynms':
        return lambda a, b: box_diou(a, b, 0.6)
    if kind == 'diounms':
        return lambda a, b: box_diou(a, b, beta)
    raise ValueError(f"nms_kind {kind!r} is not one of {', '.join(NMS_KINDS)}")


def darknet_nms(dets: Detections, thresh: float = NMS_THRESH, kind: str = 'default', beta: float = 0.6
                ) -> Detections:
    """do_nms_sort / diounms_sort: for each class in turn, rows sorted by that class's prob (stable, as glibc's
    qsort, on the order the previous class left), each kept row zeroes the class in later rows whose overlap > thresh.
    Returns the detections with probs zeroed and rows in the order Darknet leaves its array."""
    overlap = nms_criterion(kind, beta)
    boxes, obj, prob = dets.boxes, dets.objectness, dets.prob.copy()
    order = np.arange(len(boxes))
    for k in range(prob.shape[1]):
        order = order[np.argsort(-prob[order, k], kind='stable')]
        live = order[prob[order, k] > 0]  # rows with a zero prob neither suppress nor change when suppressed
        for n, i in enumerate(live):
            if prob[i, k] == 0 or n + 1 == len(live):
                continue
            rest = live[n + 1:]
            prob[rest[overlap(boxes[i], boxes[rest]) > np.float32(thresh)], k] = 0
    return Detections(boxes[order], obj[order], prob[order], dets.image_wh)


def detect(model: nn.Module, im: np.ndarray, settings: DarknetSettings, thresh: float = TEST_THRESH,
           nms_thresh: float = NMS_THRESH) -> Detections:
    """Darknet's `detector test` on one RGB image (h, w, 3) with a models.Darknet in eval mode: input, candidates,
    NMS. The model should carry Darknet's fused BatchNorm eps (use_darknet_bn_eps before fuse())."""
    x = network_input(im, settings).to(next(model.parameters()).device)
    with torch.no_grad():
        io, yolo_p = model(x)
    dets = get_network_boxes(io[0], head_layout(yolo_p), settings, (im.shape[1], im.shape[0]), thresh)
    return darknet_nms(dets, nms_thresh, settings.nms_kind, settings.beta_nms)


# ---------------------------------------------------------------------------------------------------------------
# what Darknet prints

def c_round(v: np.ndarray) -> np.ndarray:
    """C's round(): halves away from zero (numpy's round goes to even)."""
    v = np.asarray(v, dtype=np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


@dataclass(frozen=True)
class PrintedBox:
    """One `-ext_output` line: class, prob and the rounded left, top, width, height in image pixels."""
    cls: int
    prob: float
    left: int
    top: int
    width: int
    height: int


def ext_output(dets: Detections, thresh: float = TEST_THRESH) -> list[PrintedBox]:
    """draw_detections_v3's text: rows whose best class is over thresh, sorted by left edge (stable), the best
    class first, then the row's other classes over thresh; coordinates as its round((x - w/2) * im.w) etc."""
    half, (iw, ih) = np.float32(2), (np.float32(v) for v in dets.image_wh)
    rows = [r for r in range(len(dets.boxes)) if (dets.prob[r] > thresh).any()]
    b = dets.boxes
    rows.sort(key=lambda r: b[r, 0] - b[r, 2] / half)
    out = []
    for r in rows:
        best = int(np.argmax(np.where(dets.prob[r] > thresh, dets.prob[r], -1)))  # first of equal maxima, as C
        geom = [int(v) for v in c_round([(b[r, 0] - b[r, 2] / half) * iw, (b[r, 1] - b[r, 3] / half) * ih,
                                         b[r, 2] * iw, b[r, 3] * ih])]
        classes = [best] + [c for c in np.nonzero(dets.prob[r] > thresh)[0].tolist() if c != best]
        out += [PrintedBox(c, float(dets.prob[r, c]), *geom) for c in classes]
    return out


def ext_output_text(lines: Sequence[PrintedBox], names: Sequence[str]) -> str:
    """The lines as Darknet prints them: `name: 99%\t(left_x:   41   top_y:  384   width:  184   height:  532)`;
    the percentage is printf's %.0f of the float32 product prob * 100, as image.c computes it."""
    return ''.join(f"{names[b.cls]}: {float(np.float32(b.prob) * np.float32(100)):.0f}%\t(left_x: {b.left:4d}   "
                   f"top_y: {b.top:4d}   width: {b.width:4d}   height: {b.height:4d})\n" for b in lines)


def detection_rows(dets: Detections, thresh: float = TEST_THRESH) -> np.ndarray:
    """The (box, class) pairs Darknet prints, in its printed order, as the port's detections: (n, 6) float32
    [x1, y1, x2, y2 in image pixels (unrounded), confidence, class]."""
    xyxy = dets.xyxy_pixels()
    half = np.float32(2)
    order = sorted((r for r in range(len(dets.boxes)) if (dets.prob[r] > thresh).any()),
                   key=lambda r: dets.boxes[r, 0] - dets.boxes[r, 2] / half)
    rows = []
    for r in order:
        over = np.nonzero(dets.prob[r] > thresh)[0].tolist()
        best = max(over, key=lambda c: (dets.prob[r, c], -c))  # the first of equal maxima, as get_actual_detections
        rows += [[*xyxy[r], dets.prob[r, c], c] for c in [best] + [c for c in over if c != best]]
    return np.array(rows, dtype=np.float32).reshape(-1, 6)


# ---------------------------------------------------------------------------------------------------------------
# detector map

def box_iou_many(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """box_iou of every box a (n, 4) against every box b (m, 4), relative xywh: (n, m) float32."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    return box_iou_pairs(a[:, None, :], b[None, :, :])


def read_labels(path: str | Path) -> np.ndarray:
    """A YOLO label file as read_boxes reads it: `id x y w h` rows as float32 (n, 5), nothing filtered or merged; a
    missing file is no labels (Darknet says so and goes on); a malformed row is a ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        return np.zeros((0, 5), np.float32)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append([float(v) for v in line.split()[:5]])
            except ValueError:
                raise ValueError(f"{path}:{n}: not a label row `class x y w h`: {line!r}") from None
            if len(rows[-1]) != 5:
                raise ValueError(f"{path}:{n}: not a label row `class x y w h`: {line!r}")
    return np.array(rows, dtype=np.float32).reshape(-1, 5)


@dataclass
class MapResult:
    """What `detector map` prints: mAP, AP per class, and TP / FP / FN / average IoU at the -thresh it is given."""
    map: float
    ap: np.ndarray
    tp: int = 0
    fp: int = 0
    fn: int = 0
    avg_iou: float = 0.0
    detections: int = 0
    truths: int = 0
    tp_per_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fp_per_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def darknet_map(images: Sequence[tuple[Detections, np.ndarray]], classes: int, iou_thresh: float = 0.5,
                points: int = 0, thresh: float = TEST_THRESH) -> MapResult:
    """validate_detector_map from each image's detections (after NMS, found at MAP_THRESH) and YOLO labels (m, 5)
    [class, x, y, w, h] relative: each (row, class) with prob > 0 is matched to the same-class label of highest IoU
    over iou_thresh (TP the first time that label is matched in prob order, FP after), all sorted by prob (stable);
    AP per class is the area under its precision envelope (points=0) or the mean of `points` interpolated
    precisions; mAP is the mean over all `classes`, those without labels counting 0."""
    f32 = np.float32
    probs, truth_idx, cls_ids = [], [], []
    truth_count = np.zeros(classes, np.int64)
    tp_c, fp_c = np.zeros(classes, np.int64), np.zeros(classes, np.int64)
    iou_sum, offset = 0.0, 0
    for dets, labels in images:
        labels = np.asarray(labels, dtype=f32).reshape(-1, 5)
        lab_cls = labels[:, 0].astype(np.int64)
        if len(lab_cls) and (lab_cls.min() < 0 or lab_cls.max() >= classes):
            raise ValueError(f"label classes {sorted(set(lab_cls.tolist()))} outside 0..{classes - 1}")
        np.add.at(truth_count, lab_cls, 1)
        rows, cls = np.nonzero(dets.prob > 0)  # Darknet's loop order: rows, then classes
        p = dets.prob[rows, cls]
        # (pairs, labels) IoU where the class matches and IoU > iou_thresh, else -1; the first maximum wins
        iou = box_iou_many(dets.boxes, labels[:, 1:])[rows] if len(labels) else np.zeros((len(rows), 0), f32)
        iou = np.where((cls[:, None] == lab_cls[None, :]) & (iou > f32(iou_thresh)), iou, f32(-1))
        j = iou.argmax(1) if len(labels) else np.zeros(len(rows), np.int64)
        best_iou = iou[np.arange(len(rows)), j] if len(labels) else np.full(len(rows), -1, f32)
        best = np.where(best_iou > 0, offset + j, -1)
        # the TP/FP count at `thresh`: a TP when the label is matched by no earlier pair of this image (any prob)
        _, first = np.unique(best, return_index=True)
        earlier = np.ones(len(best), bool)
        earlier[first] = False
        counted = p > f32(thresh)
        tp = counted & (best > -1) & ~earlier
        np.add.at(tp_c, cls[tp], 1)
        np.add.at(fp_c, cls[counted & ~tp], 1)
        iou_sum += float(best_iou[tp].astype(np.float64).sum())
        probs.append(p)
        truth_idx.append(best)
        cls_ids.append(cls)
        offset += len(labels)
    p = np.concatenate(probs) if probs else np.zeros(0, f32)
    order = np.argsort(-p, kind='stable')  # glibc's qsort is a stable merge sort
    truth = np.concatenate(truth_idx)[order] if probs else np.zeros(0, np.int64)
    cls = np.concatenate(cls_ids)[order] if probs else np.zeros(0, np.int64)
    # in prob order, a detection is a TP the first time its label is matched
    is_tp = np.zeros(len(order), bool)
    matched = np.nonzero(truth > -1)[0]
    _, first = np.unique(truth[matched], return_index=True)
    is_tp[matched[first]] = True
    ap = np.zeros(classes, np.float64)
    for c in range(classes):
        mine = is_tp[cls == c]  # this class's detections in rank order (other ranks repeat its values)
        if len(mine) == 0 or truth_count[c] == 0:
            continue  # recall 0 at every rank: AP 0
        tp = np.cumsum(mine).astype(np.float64)
        precision = tp / np.arange(1, len(mine) + 1)
        ap[c] = _average_precision(precision, tp / truth_count[c], points)
    tp_all, fp_all = int(tp_c.sum()), int(fp_c.sum())
    return MapResult(float(ap.sum() / classes), ap, tp_all, fp_all, int(truth_count.sum()) - tp_all,
                     iou_sum / (tp_all + fp_all) if tp_all + fp_all else 0.0, len(order), int(truth_count.sum()),
                     tp_c, fp_c)


def _average_precision(precision: np.ndarray, recall: np.ndarray, points: int) -> float:
    """One class's AP from its precision / recall at every rank, as validate_detector_map's two branches."""
    if points == 0:  # area under the envelope: each recall step times the best precision at or after it
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        steps = np.diff(recall)
        return float(np.sum(steps * envelope[:-1]) + recall[0] * envelope[0])
    total = 0.0
    for point in range(points):
        reached = recall >= point / (points - 1)
        total += float(precision[reached].max()) if reached.any() else 0.0
    return total / points


# ---------------------------------------------------------------------------------------------------------------
# a model run as `detector test` / `detector map` (what detect.py and test.py --darknet call)

def darknet_model(model: nn.Module) -> nn.Module:
    """A models.Darknet as Darknet's detector commands run it: BatchNorm fused with Darknet's eps, fp32, eval mode;
    refused (ConfigError) where the cfg asks for post-processing this module does not reproduce."""
    settings_from_model(model)
    return use_darknet_bn_eps(model).fuse().float().eval()


class DarknetDetector:
    """`detector test` on images: detector(bgr) -> (rows (n, 6) [x1, y1, x2, y2 image pixels, conf, class] in
    Darknet's printed order, Detections after NMS)."""

    def __init__(self, model: nn.Module, thresh: float = TEST_THRESH, nms_thresh: float = NMS_THRESH):
        self.model, self.thresh, self.nms_thresh = model, thresh, nms_thresh
        self.settings = settings_from_model(model)

    def __call__(self, bgr: np.ndarray) -> tuple[np.ndarray, Detections]:
        rgb = np.ascontiguousarray(bgr[:, :, ::-1], dtype=np.float32) / np.float32(255.0)
        dets = detect(self.model, rgb, self.settings, self.thresh, self.nms_thresh)
        return detection_rows(dets, self.thresh), dets


def evaluate_map(model: nn.Module, img_files: Sequence[str | Path], label_files: Sequence[str | Path],
                 iou_thresh: float = 0.5, points: int = 0, thresh: float = TEST_THRESH) -> MapResult:
    """`detector map` of a model over images and their YOLO label files (read as Darknet reads them)."""
    settings = settings_from_model(model)
    per_image = [(detect(model, load_image(i), settings, MAP_THRESH), read_labels(lab))
                 for i, lab in zip(img_files, label_files)]
    return darknet_map(per_image, model.nc, iou_thresh, points, thresh)


def map_report(r: MapResult, names: Sequence[str], iou_thresh: float = 0.5, thresh: float = TEST_THRESH) -> str:
    """What `detector map` prints of a MapResult: a line per class, the TP/FP/FN line and the mAP line."""
    lines = [f"class_id = {c}, name = {names[c]}, ap = {100 * r.ap[c]:.2f}%   \t (TP = {r.tp_per_class[c]}, "
             f"FP = {r.fp_per_class[c]}) " for c in range(len(r.ap))]
    lines.append(f" for conf_thresh = {thresh:.2f}, TP = {r.tp}, FP = {r.fp}, FN = {r.fn}, average IoU = "
                 f"{100 * r.avg_iou:.2f} % ")
    lines.append(f" mean average precision (mAP@{iou_thresh:.2f}) = {r.map:.6f}, or {100 * r.map:.2f} % ")
    return '\n'.join(lines) + '\n'
