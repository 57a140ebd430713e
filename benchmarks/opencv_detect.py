"""detect.py's job done with OpenCV DNN alone, the baseline bench_infer.py times against our detect.py.

    python benchmarks/opencv_detect.py --cfg cfg/yolov3-tiny.cfg --weights ../shared/weights/yolov3-tiny.weights \
        --names data/coco.names --source DIR --output OUT [--img-size 416] [--save-txt]

The same steps as detect.py with its defaults: read each image, letterbox it to the same minimum rectangle
(long side img-size, padded to a multiple of 64 with grey), forward through cv2.dnn.readNetFromDarknet, keep rows
with objectness and best class score over 0.3, class-wise NMS at IoU 0.6 (cv2.dnn.NMSBoxesBatched), scale back,
draw labelled boxes and write the image (and `class x y w h` rows with --save-txt). Only cv2 and numpy are
imported, as a user's small OpenCV script would.
"""
from __future__ import annotations

import argparse
import glob
import os
import time

import cv2
import numpy as np

IMG_FORMATS = ('bmp', 'jpg', 'jpeg', 'png', 'tif', 'tiff', 'dng', 'webp', 'mpo')


def letterbox(img: np.ndarray, size: int, stride: int = 64) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize so the long side is size and pad to a multiple of stride; returns (image, ratio, (left, top))."""
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nw, nh = int(round(w * r)), int(round(h * r))
    dw, dh = (size - nw) % stride / 2, (size - nh) % stride / 2
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = int(round(dh - 0.1)), int(round(dw - 0.1))
    img = cv2.copyMakeBorder(img, top, int(round(dh + 0.1)), left, int(round(dw + 0.1)), cv2.BORDER_CONSTANT,
                             value=(114, 114, 114))
    return img, r, (left, top)


def detect_one(net: cv2.dnn.Net, img0: np.ndarray, size: int, conf: float, iou: float) -> np.ndarray:
    """Detections (n, 6) [x1, y1, x2, y2, conf, cls] in original pixels of one BGR image."""
    img, r, (left, top) = letterbox(img0, size)
    h, w = img.shape[:2]
    net.setInput(cv2.dnn.blobFromImage(img, 1 / 255.0, swapRB=True))
    out = np.concatenate(net.forward(net.getUnconnectedOutLayersNames()))  # (N, 85) xywh fractions, obj, obj*cls
    cls = out[:, 5:].argmax(1)
    score = out[np.arange(len(out)), 5 + cls]
    wh = out[:, 2:4] * (w, h)
    keep = (out[:, 4] > conf) & (score > conf) & (wh > 2).all(1)  # detect.py drops boxes with a side under 2 px
    xy, wh, score, cls = out[keep, :2] * (w, h), wh[keep], score[keep], cls[keep]
    boxes = np.concatenate((xy - wh / 2, wh), 1)  # (n, 4) x, y, w, h in input pixels
    i = np.array(cv2.dnn.NMSBoxesBatched(boxes.tolist(), score.tolist(), cls.tolist(), conf, iou), int).reshape(-1)
    xyxy = np.concatenate((boxes[i, :2], boxes[i, :2] + boxes[i, 2:]), 1)
    xyxy = ((xyxy - (left, top, left, top)) / r).clip(0, (img0.shape[1], img0.shape[0]) * 2)
    return np.concatenate((xyxy, score[i, None], cls[i, None]), 1)


def draw(img: np.ndarray, det: np.ndarray, names: list[str]) -> None:
    """Labelled boxes on the BGR image, in place."""
    tl = round(0.002 * (img.shape[0] + img.shape[1]) / 2) + 1
    for x1, y1, x2, y2, conf, c in det[::-1]:
        color = ((int(c) * 67) % 256, (int(c) * 131) % 256, (int(c) * 199) % 256)
        label = f'{names[int(c)]} {conf:.2f}'
        cv2.rectangle(img, (int(x1), int(y1)), (int(x2), int(y2)), color, tl, cv2.LINE_AA)
        tw, th = cv2.getTextSize(label, 0, tl / 3, max(tl - 1, 1))[0]
        cv2.rectangle(img, (int(x1), int(y1)), (int(x1) + tw, int(y1) - th - 3), color, -1, cv2.LINE_AA)
        cv2.putText(img, label, (int(x1), int(y1) - 2), 0, tl / 3, (225, 255, 255), max(tl - 1, 1), cv2.LINE_AA)


def main() -> None:
    """Run the job over --source and print the time it took."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--cfg', required=True)
    p.add_argument('--weights', required=True)
    p.add_argument('--names', required=True)
    p.add_argument('--source', required=True, help='a folder of images')
    p.add_argument('--output', required=True)
    p.add_argument('--img-size', type=int, default=416)
    p.add_argument('--conf-thres', type=float, default=0.3)
    p.add_argument('--iou-thres', type=float, default=0.6)
    p.add_argument('--save-txt', action='store_true')
    opt = p.parse_args()
    t0 = time.time()
    net = cv2.dnn.readNetFromDarknet(opt.cfg, opt.weights)
    names = open(opt.names).read().split('\n')
    os.makedirs(opt.output, exist_ok=True)
    files = sorted(f for f in glob.glob(os.path.join(opt.source, '*.*')) if f.rsplit('.', 1)[-1].lower() in IMG_FORMATS)
    for k, f in enumerate(files, 1):
        img0 = cv2.imread(f)
        det = detect_one(net, img0, opt.img_size, opt.conf_thres, opt.iou_thres)
        print(f'image {k}/{len(files)} {f}: {len(det)} detections')  # detect.py prints a line per image too
        draw(img0, det, names)
        stem = os.path.splitext(os.path.basename(f))[0]
        cv2.imwrite(os.path.join(opt.output, os.path.basename(f)), img0)
        if opt.save_txt:
            h, w = img0.shape[:2]
            xywh = np.concatenate(((det[:, :2] + det[:, 2:4]) / 2, det[:, 2:4] - det[:, :2]), 1) / (w, h, w, h)
            with open(os.path.join(opt.output, stem + '.txt'), 'w') as fh:
                fh.writelines(('%g ' * 4 + '%g\n') % (c, *b) for c, b in zip(det[:, 5], xywh))
    print(f'{len(files)} images, Done. ({time.time() - t0:.3f}s)')


if __name__ == '__main__':
    main()
