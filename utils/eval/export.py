"""Conversion between Darknet .weights and .pt checkpoints, ONNX export of a model's inference output and its check
in onnxruntime against PyTorch: the work behind `python models.py`, which builds the model and calls run().

    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.weights --convert   # -> .pt
    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.pt --convert        # -> .weights
    python models.py --weights weights/best.pt --convert        # a train.py checkpoint -> best.weights + best.cfg
    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.weights --onnx yolov3-tiny.onnx
    python models.py ... --onnx yolov3-tiny.onnx --dynamic     # any height and width (multiples of 32)

The export's input `images` is (batch, 3, h, w) float RGB in [0, 1]; its output `output` is (batch, N, 5 + classes):
x, y, w, h in input pixels, objectness and class probabilities, the rows of the PyTorch model's inference_out.
The batch axis is always dynamic; --dynamic makes height and width dynamic too (then N varies with them).
"""
from __future__ import annotations

import argparse
import copy
import io
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from utils.checkpoint import model_checkpoint, save_checkpoint
from utils.darknet.weights import save_weights
from utils.files import atomic_write
from utils.logs import LOGGER

ONNX_OPSET = 17


class InferenceOnly(nn.Module):
    """An eval-mode detection model seen through its inference_out only: (B, 3, h, w) -> (B, N, 5 + classes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """inference_out of the wrapped model."""
        return self.model(x)[0]


def _fuse_copy(model: nn.Module) -> nn.Module:
    """A fused fp32 eval copy: the caller's model is neither fused nor switched to eval by an export."""
    twin = copy.deepcopy(model).float().eval()
    return twin.fuse() if hasattr(twin, 'fuse') else twin


def _name_output_dims(data: bytes, n_boxes: int | None, no: int, metadata: dict[str, str] | None = None) -> bytes:
    """The model with its output's shape written as (batch, N or 'boxes', no): the traced reshapes leave the
    exporter's generated names there, and readers (detect.py, OpenCV) take the class count from the last dimension.
    metadata becomes the model's metadata_props (onnxruntime: get_modelmeta().custom_metadata_map)."""
    import onnx

    m = onnx.load_from_string(data)
    for k, v in (metadata or {}).items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    dims = m.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param = 'batch'
    if n_boxes is None:
        dims[1].dim_param = 'boxes'
    else:
        dims[1].dim_value = n_boxes
    dims[2].dim_value = no
    return m.SerializeToString()


def export_onnx(model: nn.Module, path: str | Path, img_size: tuple[int, int], dynamic: bool = False,
                opset: int = ONNX_OPSET, metadata: dict[str, str] | None = None) -> Path:
    """Export model's inference_out to ONNX with a dynamic batch axis (and dynamic height, width when dynamic), with
    metadata as the file's metadata_props.

    Written atomically once the export succeeded, so a failed export leaves an existing file as it was.
    """
    path = Path(path)
    net = InferenceOnly(_fuse_copy(model)).eval()  # the wrapper must be in eval mode too: export restores its mode
    x = torch.zeros(1, 3, *img_size)
    with torch.no_grad():
        n_boxes, no = net(x).shape[1:]
    axes = {'images': {0: 'batch', 2: 'height', 3: 'width'}, 'output': {0: 'batch', 1: 'boxes'}} if dynamic else \
        {'images': {0: 'batch'}, 'output': {0: 'batch'}}
    buf = io.BytesIO()
    with warnings.catch_warnings():  # shape-to-constant warnings: the exported graph is checked numerically
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        torch.onnx.export(net, (x,), buf, input_names=['images'], output_names=['output'], opset_version=opset,
                          dynamo=False, dynamic_axes=axes)
    return atomic_write(path, _name_output_dims(buf.getvalue(), None if dynamic else int(n_boxes), int(no), metadata))


def check_onnx(model: nn.Module, path: str | Path, shapes: Sequence[tuple[int, int, int]],
               seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| / max(1, |PyTorch|) of inference_out over random inputs of the given
    (batch, h, w) shapes; pixel columns count absolutely above 1 px, probabilities absolutely."""
    import onnxruntime as ort

    net = InferenceOnly(_fuse_copy(model)).eval()
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b, h, w in shapes:
        x = torch.rand(b, 3, h, w, generator=g)
        with torch.no_grad():
            ref = net(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ValueError(f'{path}: onnxruntime output {got.shape} for input {tuple(x.shape)}, PyTorch {ref.shape}')
        worst = max(worst, float((np.abs(got - ref) / np.maximum(1.0, np.abs(ref))).max()))
    return worst


def onnx_export(model: nn.Module, path: str | Path, img: tuple[int, int], dynamic: bool, opset: int) -> None:
    """models.py --onnx: export, say what was written, then compare onnxruntime with PyTorch at two batch sizes (and
    a second image size with dynamic height and width)."""
    export_onnx(model, path, img, dynamic, opset)
    shape = '(batch, 3, height, width)' if dynamic else f'(batch, 3, {img[0]}, {img[1]})'
    LOGGER.info(f"Exported {path}: input 'images' {shape} RGB in [0, 1], output (batch, N, {model.nc + 5}), "
                f"opset {opset}")
    shapes = [(1, *img), (2, *img)] + ([(2, img[0] + 64, img[1] + 32)] if dynamic else [])
    try:
        err = check_onnx(model, path, shapes)
    except ImportError:
        LOGGER.info('onnxruntime is not installed: the export was not checked (pip install onnxruntime)')
        return
    LOGGER.info(f"onnxruntime agrees with PyTorch to {err:.1e} (relative, inputs {', '.join(map(str, shapes))})")


def convert(model: nn.Module, src: str | Path) -> Path:
    """Write the model loaded from src in the other format beside it: .pt -> .weights (and the cfg, if none is
    there), Darknet weights -> .pt. Returns the path written."""
    src = Path(src)
    if src.suffix == '.pt':
        dst = src.with_suffix('.weights')
        save_weights(model, dst)
        cfg_file = dst.with_suffix('.cfg')
        if not cfg_file.exists():  # Darknet and OpenCV's Darknet importer read the cfg beside the weights
            atomic_write(cfg_file, model.cfg_text)
            LOGGER.info(f"Wrote {cfg_file} (the cfg {src} carries)")
    else:
        dst = src.with_suffix('.pt') if src.suffix == '.weights' else src.with_name(src.name + '.pt')
        save_checkpoint(model_checkpoint(model, epoch=-1), dst)
    LOGGER.info(f"Converted {src} -> {dst}")
    return dst


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of `python models.py`."""
    p = argparse.ArgumentParser(description='Convert Darknet weights <-> .pt checkpoints, or export to ONNX.')
    p.add_argument('--cfg', type=str, default='',
                   help='model cfg (default: the cfg saved in a .pt; cfg/yolov3-spp.cfg for .weights)')
    p.add_argument('--weights', type=str, required=True, help='.weights or .pt file')
    p.add_argument('--convert', action='store_true', help='write the other format next to --weights')
    p.add_argument('--onnx', type=str, default='',
                   help='export the inference model to this .onnx file (dynamic batch axis), checked in onnxruntime')
    p.add_argument('--dynamic', action='store_true', help='ONNX export with dynamic height and width too')
    p.add_argument('--opset', type=int, default=ONNX_OPSET, help='ONNX opset')
    p.add_argument('--img-size', type=int, nargs='+', default=[416], help='export size: one int or h w')
    p.add_argument('--info', action='store_true', help='print the layer table')
    return p


def export_size(opt: argparse.Namespace) -> tuple[int, int]:
    """(h, w) of --img-size (one value: square); sizes that are not multiples of 32 stop the command."""
    img = tuple(opt.img_size * 2 if len(opt.img_size) == 1 else opt.img_size[:2])
    if any(s % 32 for s in img):
        raise SystemExit(f"--img-size {img} must be multiples of 32")
    return img


def run(opt: argparse.Namespace, model: nn.Module) -> int:
    """Describe, convert and/or export the model loaded from opt.weights, as the options ask."""
    img = export_size(opt)
    if opt.info:
        model.info(verbose=True, img_size=img)
    if opt.convert:
        convert(model, opt.weights)
    if opt.onnx:
        onnx_export(model, opt.onnx, img, opt.dynamic, opt.opset)
    return 0
