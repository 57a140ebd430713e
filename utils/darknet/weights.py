"""Darknet .weights files: reading them into a Darknet model, writing them, and what their size says.

A .weights file is a header (version major, minor, revision as int32; images seen as int64, int32 in old files) then
every convolution's float32 values in Darknet's order: BN bias, BN weight, running mean, running var, conv weight
(or conv bias, conv weight without BN), and the weights of weighted [shortcut] layers where they come. Convolutions
sharing another's weights (share_index) have none of their own in the file. Partial files (darknet53.conv.74) hold
the first N layers only.
The model is used by duck typing (module_list of nn.Sequential with Conv2d [+ BatchNorm2d], cfg_text, cfg_path, nc,
yolo_layers, version, seen, fused): nothing here needs the top-level models.py.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.darknet.parse_config import cfg_with_classes
from utils.files import atomic_write


class WeightsError(ValueError):
    """A Darknet .weights file that does not fit the model; the message names the file and the counts."""


def conv_layers(model: nn.Module, cutoff: int = -1) -> list[nn.Module]:
    """The layers with weights in .weights files among the first `cutoff` layers (all for -1), in file order:
    convolutions with their own weights and weighted [shortcut] layers (load_weights_upto in Darknet's parser.c)."""
    n = len(model.module_list) if cutoff < 0 else cutoff
    return [m for m in list(model.module_list)[:n] if isinstance(m, nn.Sequential) and hasattr(m, 'Conv2d') or
            getattr(m, 'weights_type', 'none') != 'none']


def _darknet_tensors(seq: nn.Module) -> list[torch.Tensor]:
    """The tensors of one layer in Darknet's file order."""
    if not isinstance(seq, nn.Sequential):  # a weighted [shortcut]: its (inputs, channels) weights, row by row
        return [seq.weight]
    conv = seq.Conv2d
    if hasattr(seq, 'BatchNorm2d'):
        bn = seq.BatchNorm2d
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]
    return [conv.bias, conv.weight]


def _file_tensors(model: nn.Module, cutoff: int) -> list[torch.Tensor]:
    """Every tensor a .weights file of the model's first `cutoff` layers holds, in file order."""
    return [t for seq in conv_layers(model, cutoff) for t in _darknet_tensors(seq)]


def cutoff_from_name(path: str | Path) -> int:
    """Darknet partial weights (e.g. darknet53.conv.74) hold the first N layers; -1 for full files."""
    m = re.search(r'\.conv\.(\d+)$', Path(path).name)
    return int(m.group(1)) if m else -1


def read_darknet_file(path: str | Path) -> tuple[np.ndarray, int, np.ndarray]:
    """(version (3,) int32, images seen, float32 values) of a Darknet .weights file; a bad file is a WeightsError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise WeightsError(f"{path}: the file is empty (0 bytes); download or copy it again")
    if data.size < 20:
        raise WeightsError(f"{path}: {data.size} bytes is too short for a Darknet weights header (a truncated file?)")
    major, minor, revision = data[:12].view(np.int32)
    seen_int64 = major * 10 + minor >= 2 and major < 1000 and minor < 1000  # Darknet's own header rule
    hdr = 12 + (8 if seen_int64 else 4)
    if (data.size - hdr) % 4:
        raise WeightsError(f"{path}: {data.size - hdr:,} bytes after the header is not a whole number of float32 "
                           f"values: a truncated or damaged file")
    seen = int(data[12:hdr].view(np.int64 if seen_int64 else np.int32)[0])
    return np.array([major, minor, revision], dtype=np.int32), seen, data[hdr:].view(np.float32)


def darknet_value_count(model: nn.Module, cutoff: int = -1) -> int:
    """How many float32 values a Darknet .weights file of this model holds (of its first `cutoff` layers)."""
    return sum(t.numel() for t in _file_tensors(model, cutoff))


def misfit_error(model: nn.Module, path: str | Path, n_values: int, cutoff: int) -> WeightsError:
    """The error for a file of n_values values that fits neither the model nor its network with other classes."""
    expected = darknet_value_count(model, cutoff)
    layers = 'all layers' if cutoff < 0 else f'the first {cutoff} layers'
    why = ('a truncated file, or ' if n_values < expected else '') + 'the weights of another model'
    return WeightsError(
        f"{path}: holds {n_values:,} float32 values but {model.cfg_path} needs {expected:,} for {layers} "
        f"({model.nc} classes) and no other class count makes them fit: {why}. To fine-tune from this file use the "
        f"cfg of the model these weights belong to (any classes=), or pass --weights '' to start from random weights")


def fill_from_values(model: nn.Module, values: np.ndarray, cutoff: int, path: str | Path) -> None:
    """Copy Darknet-ordered values into the model's conv layers; a count that does not fit changes nothing."""
    if model.fused:
        raise WeightsError(f"{path}: load Darknet weights before model.fuse()")
    if values.size != darknet_value_count(model, cutoff):
        raise misfit_error(model, path, values.size, cutoff)
    ptr = 0
    with torch.no_grad():
        for t in _file_tensors(model, cutoff):
            n = t.numel()
            t.copy_(torch.from_numpy(values[ptr:ptr + n].reshape(t.shape)))
            ptr += n


def load_darknet_weights(model: nn.Module, path: str | Path, cutoff: int = -1) -> None:
    """Load a Darknet .weights file into a model it fits exactly; otherwise a WeightsError naming the counts.

    (utils.train.transfer.load_weights also takes files of the same network with another class count.)
    """
    if cutoff == -1:
        cutoff = cutoff_from_name(path)
    version, seen, values = read_darknet_file(path)
    fill_from_values(model, values, cutoff, path)
    model.version, model.seen = version, seen


def darknet_source_classes(model: nn.Module, n_values: int, cutoff: int = -1) -> int | None:
    """The class count >= 1 with which the model's cfg needs exactly n_values Darknet values, else None.

    The count is linear in the classes (only the convolutions before the [yolo] layers change), so two meta-device
    builds (shapes only) of the model's class give it, and a third checks the answer.
    """
    def count(nc: int) -> int:
        with contextlib.redirect_stdout(io.StringIO()), torch.device('meta'):  # cfg warnings were printed once
            twin = type(model)(cfg_with_classes(model.cfg_text, nc, model.cfg_path), log_cfg=False)
            return darknet_value_count(twin, cutoff)

    if not model.yolo_layers:
        return None
    c1, c2 = count(1), count(2)
    per_class = c2 - c1
    if per_class <= 0 or n_values < c1 or (n_values - c1) % per_class:
        return None
    nc = 1 + (n_values - c1) // per_class
    return nc if count(nc) == n_values else None


def save_weights(model: nn.Module, path: str | Path, cutoff: int = -1) -> None:
    """Write a Darknet .weights file (header, then conv layers in Darknet order), atomically."""
    if model.fused:
        raise WeightsError(f"{path}: a fused model cannot be written as Darknet weights; save before model.fuse()")
    parts = [np.asarray(model.version, dtype=np.int32).tobytes(), np.array([model.seen], dtype=np.int64).tobytes()]
    parts += [t.detach().cpu().float().numpy().ravel().tobytes() for t in _file_tensors(model, cutoff)]
    atomic_write(path, b''.join(parts))
