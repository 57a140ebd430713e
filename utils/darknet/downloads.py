"""The official Darknet files: fetched on first use when a --weights path names one that is missing."""
from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import BinaryIO

from utils.darknet.weights import WeightsError
from utils.files import atomic_write
from utils.logs import LOGGER

OFFICIAL = {  # name: (release address, size in bytes)
    'yolov3.weights': ('https://pjreddie.com/media/files/yolov3.weights', 248007048),
    'yolov3-spp.weights': ('https://pjreddie.com/media/files/yolov3-spp.weights', 252209228),
    'yolov3-tiny.weights': ('https://pjreddie.com/media/files/yolov3-tiny.weights', 35434956),
    'darknet53.conv.74': ('https://pjreddie.com/media/files/darknet53.conv.74', 162482580),
}


def _download(f: BinaryIO, path: Path) -> None:
    """Stream OFFICIAL[path.name] into f; a failed or wrong download (size, an HTML page) is a FileNotFoundError."""
    url, size = OFFICIAL[path.name]
    got, head = 0, b''
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                got += len(chunk)
                head += chunk[:64 - len(head)]
    except OSError as e:
        raise FileNotFoundError(f"{path}: not found and the download from {url} failed ({e}). Download it "
                                f"elsewhere and put it at {path.resolve()}") from None
    html = head.lstrip().lower().startswith((b'<!doctype', b'<html'))
    if got != size or html:
        raise FileNotFoundError(f"{path}: the download from {url} is not the weights file ({got:,} bytes, expected "
                                f"{size:,}{'; an HTML page' if html else ''}); deleted. Download it by hand and put "
                                f"it at {path.resolve()}")


def attempt_download(path: str | Path) -> Path:
    """Download a missing official Darknet file to `path`; a bad download is deleted and reported, an empty file is
    a WeightsError (not "not found")."""
    path = Path(path)
    if path.is_file():
        if path.stat().st_size == 0:
            again = f"; delete it to download it again from {OFFICIAL[path.name][0]}" if path.name in OFFICIAL else ''
            raise WeightsError(f"{path}: the file is empty (0 bytes){again}")
        return path
    if path.name not in OFFICIAL:
        raise FileNotFoundError(f"{path}: weights file not found")
    LOGGER.info(f"Downloading {OFFICIAL[path.name][0]} to {path} ...")
    return atomic_write(path, lambda f: _download(f, path))  # nothing is left at path unless the whole file came
