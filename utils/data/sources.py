"""Sources of detect.py's images: LoadImages (an image, a folder or a glob of images and videos), LoadWebcam (one
camera or stream), LoadStreams (several at once). Each yields (path(s), letterboxed RGB uint8 (3, h, w) or (n, 3, h, w),
BGR original(s), video capture or None).

Torch-free on purpose (cv2 and numpy only): detect.py on an onnxruntime session never imports torch, which alone
costs more start-up than 64 images' pre- and post-processing (benchmarks/README.md).
"""
from __future__ import annotations

import glob
import os
import re
import time
from pathlib import Path
from threading import Thread

import cv2
import numpy as np

from utils.data.augmentations import letterbox
from utils.logs import LOGGER

IMG_FORMATS = ('bmp', 'jpg', 'jpeg', 'png', 'tif', 'tiff', 'dng', 'webp')
VID_FORMATS = ('mov', 'avi', 'mp4', 'mpg', 'mpeg', 'm4v', 'wmv', 'mkv')


def _letterbox_chw(img0: np.ndarray, img_size: int, auto: bool) -> np.ndarray:
    """Letterbox a BGR image and return it as (3, h, w) RGB uint8, contiguous."""
    img = letterbox(img0, img_size, auto=auto)[0]
    return np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))


class LoadImages:
    """Iterate over images and videos (a file, a folder or a glob): yields (path, img (3,h,w) RGB, img0 BGR, cap)."""

    def __init__(self, path: str | Path, img_size: int = 416, auto: bool = True):
        p = str(Path(path).absolute())
        if '*' in p:
            files = sorted(glob.glob(p, recursive=True))
        elif os.path.isdir(p):
            files = sorted(glob.glob(os.path.join(p, '*.*')))
        elif os.path.isfile(p):
            files = [p]
        else:
            raise FileNotFoundError(f'{p} does not exist')
        images = [x for x in files if x.rsplit('.', 1)[-1].lower() in IMG_FORMATS]
        videos = [x for x in files if x.rsplit('.', 1)[-1].lower() in VID_FORMATS]
        if not images and not videos:
            raise FileNotFoundError(f'no images or videos in {p} (images: {", ".join(IMG_FORMATS)}; '
                                    f'videos: {", ".join(VID_FORMATS)})')
        self.img_size, self.auto = img_size, auto
        self.files = images + videos
        self.nf = len(self.files)
        self.video_flag = [False] * len(images) + [True] * len(videos)
        self.mode = 'image'
        self.cap, self.frame, self.nframes = None, 0, 0
        if videos:
            self._new_video(videos[0])

    def __iter__(self) -> LoadImages:
        self.count = 0
        return self

    def __next__(self) -> tuple[str, np.ndarray, np.ndarray, cv2.VideoCapture | None]:
        if self.count == self.nf:
            raise StopIteration
        path = self.files[self.count]
        if self.video_flag[self.count]:
            self.mode = 'video'
            ok, img0 = self.cap.read()
            while not ok:  # this video is over: the next one, or stop
                self.cap.release()
                self.count += 1
                if self.count == self.nf:
                    raise StopIteration
                path = self.files[self.count]
                self._new_video(path)
                ok, img0 = self.cap.read()
            self.frame += 1
        else:
            self.mode = 'image'
            self.count += 1
            img0 = cv2.imread(path)  # BGR
            if img0 is None:
                raise FileNotFoundError(f'{path}: cannot read image')
        cap = self.cap if self.mode == 'video' else None  # the capture only with its frames (detect.py saves video)
        return path, _letterbox_chw(img0, self.img_size, self.auto), img0, cap

    def _new_video(self, path: str) -> None:
        """Open the next video file."""
        self.frame = 0
        self.cap = cv2.VideoCapture(path)
        if not self.cap.isOpened():
            raise FileNotFoundError(f'{path}: cannot open video')
        self.nframes = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))

    def __len__(self) -> int:
        return self.nf


class LoadWebcam:
    """Frames of one local camera (index) or network stream (URL), mirrored for a local camera."""

    def __init__(self, pipe: str | int = '0', img_size: int = 416):
        self.img_size = img_size
        self.pipe = int(pipe) if str(pipe).isnumeric() else pipe
        self.cap = cv2.VideoCapture(self.pipe)
        if not self.cap.isOpened():
            raise ConnectionError(f'cannot open camera {pipe}')
        self.cap.set(cv2.CAP_PROP_BUFFERSIZE, 3)
        self.mode = 'webcam'

    def __iter__(self) -> LoadWebcam:
        self.count = -1
        return self

    def __next__(self) -> tuple[str, np.ndarray, np.ndarray, None]:
        self.count += 1
        ok, img0 = self.cap.read()
        if not ok:
            self.cap.release()
            raise StopIteration
        if isinstance(self.pipe, int):
            img0 = cv2.flip(img0, 1)  # a local camera is shown like a mirror
        return f'webcam_{self.count}.jpg', _letterbox_chw(img0, self.img_size, True), img0, None

    def __len__(self) -> int:
        return 0


def clean_str(s: str) -> str:
    """A source name usable as a file name."""
    return re.sub(r'[|@#!¡·$€%&()=?¿^*;:,¨´><+]', '_', s)


class LoadStreams:
    """Several cameras or streams at once, each read by a thread; yields (sources, imgs (n,3,h,w), imgs0, None)."""

    def __init__(self, sources: str = 'streams.txt', img_size: int = 416):
        self.mode = 'stream'
        self.img_size = img_size
        if os.path.isfile(sources):
            sources = [x.strip() for x in Path(sources).read_text().splitlines() if x.strip()]
        else:
            sources = [sources]
        n = len(sources)
        self.imgs: list[np.ndarray | None] = [None] * n
        self.sources = [clean_str(x) for x in sources]
        self.threads = []
        for i, s in enumerate(sources):
            cap = cv2.VideoCapture(int(s) if s.isnumeric() else s)
            if not cap.isOpened():
                raise ConnectionError(f'cannot open stream {s}')
            ok, self.imgs[i] = cap.read()  # the first frame, so every stream has one
            if not ok:
                raise ConnectionError(f'stream {s} gave no frame')
            w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            fps = cap.get(cv2.CAP_PROP_FPS) % 100 or 30.0
            LOGGER.info(f'{i + 1}/{n}: {s} ({w}x{h} at {fps:.2f} FPS)')
            t = Thread(target=self._update, args=(i, cap), daemon=True)
            t.start()
            self.threads.append(t)
        shapes = {letterbox(x, img_size)[0].shape for x in self.imgs}
        self.rect = len(shapes) == 1  # one shape for all: minimum-rectangle inference, else square
        if not self.rect:
            LOGGER.warning('streams differ in shape; padding all to squares. Similar streams are faster.')

    def _update(self, i: int, cap: cv2.VideoCapture) -> None:
        """Keep the latest frame of stream i (decoding every 4th grabbed frame), until it ends."""
        n = 0
        while cap.isOpened():
            n += 1
            if not cap.grab():
                break
            if n == 4:
                ok, im = cap.retrieve()
                self.imgs[i] = im if ok else self.imgs[i] * 0
                n = 0
            time.sleep(0.01)  # yield to the other threads
        cap.release()

    def __iter__(self) -> LoadStreams:
        self.count = -1
        return self

    def __next__(self) -> tuple[list[str], np.ndarray, list[np.ndarray], None]:
        self.count += 1
        if not all(t.is_alive() for t in self.threads):
            raise StopIteration
        img0 = [x.copy() for x in self.imgs]
        img = np.stack([letterbox(x, self.img_size, auto=self.rect)[0] for x in img0], 0)  # (n, h, w, 3) BGR
        return self.sources, np.ascontiguousarray(img[..., ::-1].transpose(0, 3, 1, 2)), img0, None

    def __len__(self) -> int:
        return 0
