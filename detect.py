"""Run a model on images, videos, a webcam or streams; save the results with labelled boxes (and labels as text).

    python detect.py --cfg cfg/yolov3-tiny.cfg --names data/coco.names --weights weights/yolov3-tiny.weights \
        --source data/samples --output output --save-txt

Weights may be Darknet .weights, .pt checkpoints (loaded with weights_only=True: a checkpoint that would run code
is refused) or .onnx files exported by `python models.py --onnx` (run with onnxruntime). On the CPU the network runs
in onnxruntime by default, on an export cached outside the weights' folder (--backend; utils/eval/backends.py).

One pipeline, two runtimes: sources, pre-processing, NMS (utils/eval/postprocess.py), drawing and writing are numpy and
OpenCV; torch is imported only where PyTorch runs the network (a cache miss, --backend torch, CUDA, --half, --augment,
--darknet). A run on a cached export never imports it: that import alone costs more than 64 images' pre- and
post-processing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

if __name__ == '__main__':
    # Before torch loads OpenMP, which reads this once: waiting OpenMP threads sleep instead of spinning. Where other
    # processes keep the cores busy, spinning threads of every op wait for a sibling that is not scheduled, and each
    # forward pass gets several times slower (benchmarks/README.md, bench_infer). The user's setting wins.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from utils.darknet.parse_config import ConfigError  # noqa: E402
from utils.data.augmentations import letterbox  # noqa: E402
from utils.data.config import DatasetError, class_names, load_names  # noqa: E402
from utils.data.sources import LoadImages, LoadStreams  # noqa: E402
from utils.eval.backends import (  # noqa: E402
    BACKENDS,
    BackendError,
    OrtModel,
    cached_session,
    choose_backend,
    cpu_only,
    files_key,
)
from utils.eval.plots import class_color, plot_one_box  # noqa: E402
from utils.eval.postprocess import non_max_suppression, scale_coords  # noqa: E402
from utils.logs import LOGGER, setup_logging  # noqa: E402

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

STREAM_PREFIXES = ('rtsp://', 'rtmp://', 'http://', 'https://')
JSON_FILE = 'detections.jsonl'  # --save-json: one JSON object per image, in --output
# utils.torch_utils.HALF_CHOICES and utils.darknet.post's TEST_THRESH, NMS_THRESH, repeated so that the command line
# parses without importing torch (tests/test_detect.py keeps them equal)
HALF_CHOICES = ('auto', 'on', 'off', 'fp16', 'bf16')
DARKNET_THRESH, DARKNET_NMS = 0.25, 0.45


class DetectError(Exception):
    """A detect.py option or output that cannot work; the message says which and why."""


def window_unavailable() -> str | None:
    """Why cv2.imshow cannot work here (no display, or OpenCV built without GUI), or None where it can."""
    if sys.platform.startswith('linux') and not (os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY')):
        return 'no display (DISPLAY is not set)'
    try:
        cv2.namedWindow('detect.py check')
        cv2.destroyWindow('detect.py check')
    except cv2.error:
        return 'this OpenCV has no GUI support (opencv-python-headless)'
    return None


def is_stream(source: str) -> bool:
    """A webcam index, a stream URL or a .txt list of streams."""
    return source.isnumeric() or source.lower().startswith(STREAM_PREFIXES) or source.endswith('.txt')


def detection_summary(det: np.ndarray, names: list[str]) -> str:
    """'2 persons, 1 bus, ' style counts of the detections (n, 6) per class."""
    s = ''
    for c, n in zip(*np.unique(det[:, 5], return_counts=True)):
        s += f"{n} {names[int(c)]}{'s' * int(n > 1)}, "
    return s


def safe_name(s: str) -> str:
    """A file name made from a stream address or path: anything but letters, digits, '.', '-' becomes '_'."""
    return re.sub(r'[^\w.-]+', '_', s).strip('_') or 'stream'


def write_labels(path: Path, det: np.ndarray, shape: tuple[int, ...], save_conf: bool = False) -> None:
    """Write detections (n, 6) [xyxy, conf, cls] in original pixels as `class x y w h` rows, normalised by shape,
    with the confidence as a sixth column when save_conf (as YOLOv5)."""
    d = det.astype(np.float32)
    h, w = shape[:2]
    xywh = np.stack(((d[:, 0] + d[:, 2]) / 2 / w, (d[:, 1] + d[:, 3]) / 2 / h, (d[:, 2] - d[:, 0]) / w,
                     (d[:, 3] - d[:, 1]) / h), 1).tolist()  # (n, 4) normalised
    rows = [(c, *b, conf) if save_conf else (c, *b) for c, b, conf in zip(d[:, 5].tolist(), xywh, d[:, 4].tolist())]
    path.write_text(''.join(' '.join('%g' % v for v in row) + '\n' for row in rows))


def save_crops(det: np.ndarray, im0: np.ndarray, folder: Path, names: list[str], stem: str) -> list[Path]:
    """Save each detection (n, 6) [xyxy, conf, cls] in original pixels of the BGR image as
    folder/<class name>/<stem>_<k>.jpg, k its row in det (the k-th highest confidence), clipped to the image."""
    h, w = im0.shape[:2]
    saved = []
    for k, (*xyxy, _, cls) in enumerate(det.tolist()):
        x1, x2 = (int(np.clip(round(v), 0, w)) for v in (xyxy[0], xyxy[2]))
        y1, y2 = (int(np.clip(round(v), 0, h)) for v in (xyxy[1], xyxy[3]))
        if x2 <= x1 or y2 <= y1:  # nothing of the box inside the image
            continue
        d = folder / safe_name(names[int(cls)])
        d.mkdir(parents=True, exist_ok=True)
        f = d / f'{stem}_{k}.jpg'
        if not cv2.imwrite(str(f), im0[y1:y2, x1:x2]):
            raise DetectError(f'{f}: cannot write the crop')
        saved.append(f)
    return saved


def json_record(source: str, shape: tuple[int, ...], det: np.ndarray, names: list[str],
                frame: int | None = None) -> dict:
    """One --save-json line: the image, its size and its detections (n, 6) [xyxy, conf, cls] in original pixels."""
    rec = {'image': source, 'width': int(shape[1]), 'height': int(shape[0])}
    if frame is not None:
        rec['frame'] = frame
    rec['detections'] = [{'box': [round(v, 2) for v in xyxy], 'class': int(cls), 'name': names[int(cls)],
                          'confidence': round(conf, 5)} for *xyxy, conf, cls in det.tolist()]
    return rec


class ResultWriter:
    """detect.py's outputs besides the drawn images: --save-txt rows, --save-crop crops, --save-json lines."""

    def __init__(self, opt: argparse.Namespace, out: Path, names: list[str]):
        self.opt, self.out, self.names = opt, out, names
        self.json_path = out / JSON_FILE
        self.json_file = open(self.json_path, 'w') if opt.save_json else None

    def write(self, det: np.ndarray, im0: np.ndarray, source: str, stem: str, frame: int, video: bool) -> None:
        """The outputs asked for of one image (a frame of a video) with detections (n, 6) in original pixels."""
        name = f'{stem}_{frame}' if video else stem  # one file per frame for videos
        if self.opt.save_txt:  # class x y w h, normalised
            write_labels(self.out / f'{name}.txt', det, im0.shape, self.opt.save_conf)
        if self.opt.save_crop:
            save_crops(det, im0, self.out / 'crops', self.names, name)
        if self.json_file is not None:
            rec = json_record(str(source), im0.shape, det, self.names, frame if video else None)
            self.json_file.write(json.dumps(rec) + '\n')
            self.json_file.flush()  # a program reading the file as it grows sees whole lines

    def close(self) -> None:
        """Finish the JSON lines file and say where it is."""
        if self.json_file is not None:
            self.json_file.close()
            print(f'Detections written to {self.json_path.resolve()} (JSON lines, one object per image)')


class VideoWriters:
    """Output videos by path, opened at the first frame's size; release() finishes the files."""

    def __init__(self, fourcc: str):
        self.fourcc = fourcc
        self.open: dict[Path, cv2.VideoWriter] = {}

    def write(self, path: Path, frame: np.ndarray, fps: float, keep_others: bool) -> None:
        """Append a BGR frame to the video at path; a new video file closes the others unless keep_others."""
        if path not in self.open:
            if not keep_others:
                self.release()
            h, w = frame.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*self.fourcc), fps, (w, h))
            if not writer.isOpened():
                raise DetectError(f'{path}: cannot write video with --fourcc {self.fourcc}')
            self.open[path] = writer
        self.open[path].write(frame)

    def release(self) -> None:
        """Finish every open video (an unreleased writer leaves an unplayable file)."""
        for writer in self.open.values():
            writer.release()
        self.open.clear()


class Detector(NamedTuple):
    """The network detect.py runs and what the rest of the job needs to know about it."""
    run: nn.Module | OrtModel  # the PyTorch model or an onnxruntime session of its export
    nc: int  # classes
    names: list[str] | None  # class names the weights carry, if any
    device: torch.device | None = None  # PyTorch's (None: onnxruntime, on the CPU)
    dtype: torch.dtype | None = None  # PyTorch's input dtype
    clock: Callable[[], float] = time.time  # the time after the device's queued work (CUDA: synchronized)


def load_detector(opt: argparse.Namespace) -> Detector:
    """The network of --weights: .onnx through onnxruntime, else .weights / .pt (weights_only) into the cfg's Darknet,
    fused, in eval mode, run by the --backend runtime (utils/eval/backends.py: auto is onnxruntime on the CPU, on a cached
    export) with its layers in the --half dtype. Sets opt.img_size to the cfg's width (an .onnx export's size, else
    416) when not given."""
    if opt.darknet:
        return load_darknet_detector(opt)
    if not str(opt.weights).lower().endswith('.onnx'):
        return cached_detector(opt) or load_torch_detector(opt)
    if opt.augment:
        raise DetectError('--augment needs the PyTorch model (.weights or .pt), not an .onnx export')
    if opt.half not in ('auto', 'off'):
        raise DetectError(f'--half {opt.half} needs the PyTorch model (.weights or .pt): an .onnx export runs '
                          f'in fp32 in onnxruntime')
    if opt.backend == 'torch':
        raise DetectError('--backend torch needs the PyTorch model (.weights or .pt): an .onnx file runs in '
                          'onnxruntime')
    try:
        model = OrtModel(opt.weights)
    except ValueError as e:
        raise DetectError(str(e)) from None
    LOGGER.info(f'Runtime: onnxruntime CPU, fp32, {opt.weights}')
    opt.img_size = model.img_hw[0] if model.img_hw else opt.img_size or 416
    return Detector(model, model.nc, None)


def cached_detector(opt: argparse.Namespace) -> Detector | None:
    """The onnxruntime session of the weights' cached export where --backend would run onnxruntime on the CPU and the
    cache has it (utils.eval.backends.files_key: the weights' and cfg's bytes, size, code, versions), found without
    importing torch; None otherwise (load_torch_detector then decides, exports and loads)."""
    if opt.backend == 'torch' or not cpu_only(opt.device):
        return None
    try:
        if choose_backend(opt.backend, 'cpu', opt.half, opt.augment) != 'onnxruntime':
            return None
    except BackendError as e:
        raise DetectError(str(e)) from None
    key = files_key(opt.weights, opt.cfg or None, opt.img_size)
    hit = cached_session(key) if key is not None else None
    if hit is None:
        return None
    opt.img_size = hit.img_size
    return Detector(hit.run, hit.nc, hit.names)


def load_torch_detector(opt: argparse.Namespace) -> Detector:
    """The network of .weights / .pt weights on the --backend runtime chosen on the --device: PyTorch, or
    onnxruntime on an export made now (and cached) from the PyTorch model."""
    import torch

    from models import load_eval_model
    from utils.eval.backends import load_runtime
    from utils.torch_utils import (
        inference_dtype,
        select_device,
        set_cuda_device,
        time_synchronized,
    )
    try:
        device = select_device(opt.device)
        backend = choose_backend(opt.backend, device, opt.half, opt.augment)
        dtype = torch.float32 if backend == 'onnxruntime' else inference_dtype(opt.half, device)
    except (RuntimeError, ValueError) as e:  # e.g. a CUDA --device where there is no CUDA, --half fp16 on the CPU
        raise DetectError(str(e)) from None
    set_cuda_device(device)  # before the model opens a CUDA context: --device 1 must not open one on GPU 0 too
    try:
        net = load_runtime(opt.weights, opt.cfg or None, opt.img_size, backend,
                           lambda size: load_eval_model(opt.weights, opt.cfg or None, size, device, dtype),
                           strict=opt.backend == 'onnxruntime')
    except BackendError as e:
        raise DetectError(str(e)) from None
    opt.img_size = net.img_size  # Darknet detects at the network size its cfg gives, unless --img-size says
    if isinstance(net.run, OrtModel):
        return Detector(net.run, net.nc, net.names)
    return Detector(net.run, net.nc, net.names, device, dtype, partial(time_synchronized, device))


def load_darknet_detector(opt: argparse.Namespace) -> Detector:
    """--darknet: the PyTorch model run as Darknet's `detector test` runs it (utils/darknet/post.py): fp32, BatchNorm
    fused with Darknet's eps, at the cfg's [net] size; the options that would change that are refused."""
    refused = [name for name, on in (('.onnx weights', str(opt.weights).lower().endswith('.onnx')),
                                     ('--backend onnxruntime', opt.backend == 'onnxruntime'),
                                     (f'--half {opt.half}', opt.half not in ('auto', 'off')),
                                     ('--augment', opt.augment), ('--agnostic-nms', opt.agnostic_nms)) if on]
    if refused:
        raise DetectError(f"--darknet runs the PyTorch model in fp32 with Darknet's own per-class NMS: "
                          f"{', '.join(refused)} cannot go with it")
    import torch

    from models import load_model
    from utils.darknet.post import darknet_model
    from utils.torch_utils import select_device, set_cuda_device, time_synchronized
    try:
        device = select_device(opt.device)
    except (RuntimeError, ValueError) as e:
        raise DetectError(str(e)) from None
    set_cuda_device(device)
    model = load_model(opt.weights, opt.cfg or None, opt.img_size or 416, device)
    size = (int(model.hyperparams.get('height', 416)), int(model.hyperparams.get('width', 416)))
    if opt.img_size is not None and (opt.img_size, opt.img_size) != size:
        raise DetectError(f"--darknet detects at the cfg's [net] size {size[1]}x{size[0]}, as Darknet; drop "
                          f"--img-size {opt.img_size} (or set width and height in the cfg)")
    opt.img_size = size[1]  # the loader's letterboxed copy goes unused: Darknet resizes each original itself
    LOGGER.info(f"Runtime: PyTorch {torch.__version__} {device.type}, fp32, Darknet's pre- and post-processing")
    return Detector(darknet_model(model), model.nc, model.names, device, torch.float32,
                    partial(time_synchronized, device))


def model_input(img: np.ndarray, imgs0: list[np.ndarray], det: Detector) -> np.ndarray | torch.Tensor:
    """Pre-processing: the loader's letterboxed uint8 RGB image(s) (3, h, w) or (B, 3, h, w) -> the network's input
    (B, 3, h, w) in [0, 1]: float32 numpy for onnxruntime, else a tensor of det.dtype on det.device (NHWC on the
    CPU)."""
    if isinstance(det.run, OrtModel):
        if det.run.img_hw:  # a fixed export: letterbox to exactly its size, not a minimum rectangle
            img = np.stack([np.ascontiguousarray(letterbox(x, det.run.img_hw, auto=False)[0][:, :, ::-1]
                                                 .transpose(2, 0, 1)) for x in imgs0])
        x = img.astype(np.float32) / np.float32(255.0)  # the same IEEE division as PyTorch's below
        return x[None] if x.ndim == 3 else x
    import torch

    x = torch.from_numpy(img).to(det.device)
    x = x.to(det.dtype) / 255.0
    if x.ndim == 3:
        x = x[None]  # (1, 3, h, w)
    if det.device.type == 'cpu':  # NHWC input: oneDNN convolutions skip layout conversions
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def forward(det: Detector, x: np.ndarray | torch.Tensor, augment: bool) -> np.ndarray:
    """The network's output (B, N, 5 + nc) float32: boxes xywh in input pixels, objectness, class probabilities."""
    if isinstance(det.run, OrtModel):
        return det.run.predict(x)
    import torch

    with torch.no_grad():
        return det.run(x, augment=augment)[0].float().cpu().numpy()


def frame_info(dataset: LoadImages | LoadStreams, path: str | list[str], i: int,
               stream: bool) -> tuple[str, str, int, str, bool]:
    """For image i of a loader step: (source path, log prefix, frame number, output stem, is video)."""
    if stream:
        p = path[i]
        return p, f'{i}: ', dataset.count, f'stream{i}_{safe_name(Path(p).stem if os.path.isfile(p) else p)}', True
    if dataset.mode == 'video':  # the loader advances count only when a video ends
        s = f'video {dataset.count + 1}/{dataset.nf} ({dataset.frame}/{dataset.nframes}) {path}: '
        return path, s, dataset.frame, Path(path).stem, True
    return path, f'image {dataset.count}/{dataset.nf} {path}: ', getattr(dataset, 'frame', 0), Path(path).stem, False


def draw_detections(det: np.ndarray, im0: np.ndarray, names: list[str]) -> None:
    """Draw detections (n, 6) [xyxy, conf, cls] in original pixels on the BGR image, best last (on top)."""
    for *xyxy, conf, cls in reversed(det.tolist()):
        plot_one_box(xyxy, im0, label=f'{names[int(cls)]} {conf:.2f}', color=class_color(int(cls)))


def open_view(opt: argparse.Namespace, stream: bool, out: Path) -> bool:
    """Whether results are shown in a window: --view-img or a stream, where a window can open."""
    view_img = opt.view_img or stream
    why = window_unavailable() if view_img else None
    if why:
        LOGGER.warning(f'--view-img: cannot show a window: {why}; results are saved to {out} instead')
    return view_img and not why


class Step(NamedTuple):
    """One loader step after the forward pass, with what its outputs need."""
    shape: tuple[int, int]  # model input (h, w)
    imgs0: list[np.ndarray]  # BGR originals, one per image
    frames: list[tuple[str, str, int, str, bool]]  # frame_info of each image
    fps: float  # of a video source (30 where unknown)
    pred: np.ndarray | None  # (B, N, 5 + nc) model output (None with --darknet)
    seconds: float  # forward time
    darknet: list | None = None  # --darknet: per image (rows (n, 6) in original pixels, Detections), post-processed


class Finisher:
    """Everything after the forward pass: NMS, labels, drawing, display and saving of each image of a Step."""

    def __init__(self, opt: argparse.Namespace, out: Path, names: list[str], view_img: bool, stream: bool):
        self.opt, self.out, self.names, self.view_img, self.stream = opt, out, names, view_img, stream
        self.writers = VideoWriters(opt.fourcc)
        self.results = ResultWriter(opt, out, names)

    def __call__(self, step: Step) -> None:
        """Finish each image of a step; KeyboardInterrupt when q is pressed in the window."""
        opt = self.opt
        if step.darknet is not None:  # Darknet's boxes, in original pixels already
            pred = [self.darknet_rows(rows) for rows, _ in step.darknet]
        else:
            pred = non_max_suppression(step.pred, opt.conf_thres, opt.iou_thres, multi_label=False,
                                       classes=opt.classes, agnostic=opt.agnostic_nms, max_det=opt.max_det)
        for k, (det, im0, (p, s, frame, stem, video)) in enumerate(zip(pred, step.imgs0, step.frames)):
            im0 = im0.copy() if self.stream else im0
            s += '%gx%g ' % step.shape
            if len(det):
                if step.darknet is None:  # det: (n, 6) in input pixels
                    det[:, :4] = scale_coords(step.shape, det[:, :4], im0.shape).round()  # original pixels
                s += detection_summary(det, self.names)
            self.results.write(det, im0, p, stem, frame, video)  # before drawing: crops of the clean image
            print(f'{s}Done. ({step.seconds:.3f}s)')
            if step.darknet is not None:  # the lines `darknet detector test -ext_output` prints
                from utils.darknet.post import ext_output, ext_output_text
                print(ext_output_text(ext_output(step.darknet[k][1], opt.conf_thres), self.names), end='')
            self.show_and_save(det, im0, p, stem, video, step.fps)

    def darknet_rows(self, rows: np.ndarray) -> np.ndarray:
        """--darknet rows (n, 6) in Darknet's printed order, less those --classes and --max-det (the most confident
        kept) leave out; the printed -ext_output lines stay Darknet's own."""
        if self.opt.classes is not None:
            rows = rows[np.isin(rows[:, 5], self.opt.classes)]
        if len(rows) > self.opt.max_det:
            keep = np.sort(np.argsort(-rows[:, 4], kind='stable')[:self.opt.max_det])
            rows = rows[keep]
        return rows

    def show_and_save(self, det: np.ndarray, im0: np.ndarray, p: str, stem: str, video: bool, fps: float) -> None:
        """Draw the detections (n, 6) on the image, show it (--view-img) and write it (an image or a video frame)."""
        if self.view_img or not self.opt.nosave:
            draw_detections(det, im0, self.names)
        if self.view_img:
            cv2.imshow(str(p), im0)
            if cv2.waitKey(1) == ord('q'):
                raise KeyboardInterrupt
        if self.opt.nosave:
            return
        if video:
            self.writers.write(self.out / f'{stem}.mp4', im0, fps, keep_others=self.stream)
        else:
            cv2.imwrite(str(self.out / Path(p).name), im0)

    def close(self) -> None:
        """Finish the videos and the JSON file, close the windows."""
        self.writers.release()
        self.results.close()
        if self.view_img:
            cv2.destroyAllWindows()


def check_options(opt: argparse.Namespace, source: str, stream: bool) -> None:
    """Refuse options that cannot work before the model loads or anything is written."""
    if not stream and '*' not in source and not Path(source).exists():
        raise DetectError(f'--source {source} does not exist')
    if opt.max_det < 1:
        raise DetectError(f'--max-det must be at least 1, got {opt.max_det}')
    if opt.save_conf and not opt.save_txt:
        LOGGER.warning('--save-conf adds the confidence to --save-txt rows; without --save-txt it does nothing')


def detect(opt: argparse.Namespace) -> Path:
    """Run detection as configured by the command-line options; returns the output folder."""
    source, out = str(opt.source), Path(opt.output)
    stream = is_stream(source)
    check_options(opt, source, stream)
    det = load_detector(opt)
    names = class_names(det.nc, load_names(opt.names) if opt.names else None, det.names, source=opt.names)

    out.mkdir(parents=True, exist_ok=True)  # never emptied: results of earlier runs stay unless overwritten
    view_img = open_view(opt, stream, out)
    imgsz = opt.img_size
    dataset = LoadStreams(source, img_size=imgsz) if stream else LoadImages(source, img_size=imgsz)
    t0 = time.time()
    finish = Finisher(opt, out, names, view_img, stream)
    darknet = None
    if opt.darknet:
        from utils.darknet.post import DarknetDetector, read_bgr
        darknet = DarknetDetector(det.run, opt.conf_thres, opt.iou_thres)
    try:
        for path, img, im0s, vid_cap in dataset:
            imgs0 = im0s if stream else [im0s]  # BGR originals, one per image of the batch
            fps = (vid_cap.get(cv2.CAP_PROP_FPS) if vid_cap is not None else 0) or 30.0
            frames = [frame_info(dataset, path, i, stream) for i in range(len(imgs0))]  # before the loader moves on
            t1 = det.clock()
            if darknet is not None:  # Darknet's resize of each original, its thresholds and NMS
                if not stream and dataset.mode == 'image':  # as stb reads it: EXIF orientation not applied
                    imgs0 = [read_bgr(path)]
                outs = [darknet(im0) for im0 in imgs0]
                shape = (darknet.settings.height, darknet.settings.width)
                finish(Step(shape, imgs0, frames, fps, None, det.clock() - t1, outs))
                continue
            x = model_input(img, imgs0, det)
            pred = forward(det, x, opt.augment)
            t2 = det.clock()
            finish(Step(tuple(x.shape[2:]), imgs0, frames, fps, pred, t2 - t1))
    except KeyboardInterrupt:
        print('Stopped.')
    finally:
        finish.close()
    print(f'Results saved to {out.resolve()}')
    print(f'Done. ({time.time() - t0:.3f}s)')
    return out


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of `python detect.py` (the original's)."""
    p = argparse.ArgumentParser(prog='detect.py', description='Detect objects in images, videos and streams.')
    p.add_argument('--cfg', type=str, default='',
                   help='model cfg (default: the cfg saved in a .pt; cfg/yolov3-spp.cfg for .weights)')
    p.add_argument('--names', type=str, default='',
                   help="class names file, one a line (default: the checkpoint's names; COCO's for 80 classes)")
    p.add_argument('--weights', type=str, default='weights/yolov3-spp-ultralytics.pt', help='.weights, .pt or .onnx')
    p.add_argument('--source', type=str, default='data/samples',
                   help='image, folder, glob, video, webcam index (0), rtsp/http URL, or .txt list of streams')
    p.add_argument('--output', type=str, default='output', help='output folder (existing files are kept)')
    p.add_argument('--img-size', type=int, default=None,
                   help="inference size (pixels); default: the cfg's [net] width, as Darknet (the original: 512)")
    p.add_argument('--conf-thres', type=float, default=None,
                   help=f"object confidence threshold (default 0.3; with --darknet, Darknet's -thresh "
                        f"{DARKNET_THRESH})")
    p.add_argument('--iou-thres', type=float, default=None,
                   help=f'IoU threshold for NMS (default 0.6; with --darknet, Darknet\'s {DARKNET_NMS})')
    p.add_argument('--fourcc', type=str, default='mp4v', help='output video codec (see fourcc.org)')
    p.add_argument('--half', nargs='?', const='on', default='auto', choices=HALF_CHOICES,
                   help='network precision: auto (default: bf16 on a CPU with avx512_bf16/amx_bf16, else fp32), '
                        'bare --half or on (fp16 on CUDA, bf16 on such a CPU), off (fp32), fp16, bf16')
    p.add_argument('--device', default='', help="cuda device, i.e. 0 or 0,1, or 'cpu'")
    p.add_argument('--backend', default='auto', choices=BACKENDS,
                   help='runtime of the network: auto (default: onnxruntime on the CPU, on an ONNX export cached in '
                        '$YOLOV3_CACHE or ~/.cache/yolov3/onnx; PyTorch on CUDA), torch, onnxruntime')
    p.add_argument('--view-img', action='store_true', help='show results in a window')
    p.add_argument('--save-txt', action='store_true', help='save results to *.txt (class x y w h, normalised)')
    p.add_argument('--save-conf', action='store_true', help='with --save-txt: the confidence as a sixth column')
    p.add_argument('--save-crop', action='store_true',
                   help='save each detection cropped from the image as crops/<class name>/<image>_<k>.jpg')
    p.add_argument('--save-json', action='store_true',
                   help=f'write {JSON_FILE} in --output: one JSON object per image (image path, width, height, '
                        'detections with xyxy pixel box, class, name, confidence)')
    p.add_argument('--nosave', action='store_true',
                   help='do not save annotated images or videos (--save-txt/-crop/-json are still written)')
    p.add_argument('--max-det', type=int, default=300,
                   help='at most this many detections per image, highest confidence first')
    p.add_argument('--classes', nargs='+', type=int, help='keep only these classes, e.g. --classes 0 2 3')
    p.add_argument('--agnostic-nms', action='store_true', help='class-agnostic NMS')
    p.add_argument('--augment', action='store_true', help='test-time augmentation (flips and scales)')
    p.add_argument('--darknet', action='store_true',
                   help="Darknet's `detector test` pre- and post-processing (the cfg's [net] size and letter_box, "
                        "objectness x class scores, per-class nms_kind NMS): the boxes Darknet prints, as its "
                        "-ext_output lines too")
    return p


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; --conf-thres and --iou-thres default to Darknet's with --darknet."""
    opt = get_args_parser().parse_args(argv)
    if opt.conf_thres is None:
        opt.conf_thres = DARKNET_THRESH if opt.darknet else 0.3
    if opt.iou_thres is None:
        opt.iou_thres = DARKNET_NMS if opt.darknet else 0.6
    return opt


def main(opt: argparse.Namespace) -> int:
    """Run detect(opt); returns the exit status."""
    setup_logging()
    print(opt)
    detect(opt)
    return 0


def input_errors() -> tuple[type[Exception], ...]:
    """The exceptions that report a bad input (shown as one line, without a traceback). Those of modules this run
    never imported (torch's loaders, on a cached export) cannot have been raised, so they are not imported here."""
    errors = [DetectError, ConfigError, DatasetError, BackendError, FileNotFoundError, ConnectionError]
    for module, name in (('utils.checkpoint', 'CheckpointError'), ('utils.darknet.weights', 'WeightsError')):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == '__main__':
    args = parse_opt()
    try:
        status = main(args)
    except Exception as err:  # noqa: BLE001  re-raised below unless input_errors() says a bad input
        if not isinstance(err, input_errors()):
            raise
        sys.exit(f'Error: {err}')
    # Everything is written and closed. What is left are the objects of the imported modules (torch's, where it ran),
    # which the interpreter's garbage collections at exit would walk for nothing (longer than a small job takes).
    gc.freeze()
    sys.exit(status)
