"""ONNX export of a model's inference output, and its check in onnxruntime against PyTorch.

    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.weights --onnx yolov3-tiny.onnx
    python models.py ... --onnx yolov3-tiny.onnx --dynamic     # any height and width (multiples of 32)

The export's input `images` is (batch, 3, h, w) float RGB in [0, 1]; its output `output` is (batch, N, 5 + classes):
x, y, w, h in input pixels, objectness and class probabilities, the rows of the PyTorch model's inference_out.
The batch axis is always dynamic; --dynamic makes height and width dynamic too (then N varies with them).
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

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


def _name_output_dims(path: Path, n_boxes: int | None, no: int) -> None:
    """Write the output's shape into the file as (batch, N or 'boxes', no): the traced reshapes leave the exporter's
    generated names there, and readers (detect.py, OpenCV) take the class count from the last dimension."""
    import onnx

    m = onnx.load(str(path))
    dims = m.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param = 'batch'
    if n_boxes is None:
        dims[1].dim_param = 'boxes'
    else:
        dims[1].dim_value = n_boxes
    dims[2].dim_value = no
    onnx.save(m, str(path))


def export_onnx(model: nn.Module, path: str | Path, img_size: tuple[int, int], dynamic: bool = False,
                opset: int = ONNX_OPSET) -> Path:
    """Export model's inference_out to ONNX with a dynamic batch axis (and dynamic height, width when dynamic).

    Written through a temporary file beside path, so a failed export leaves an existing file as it was.
    """
    path = Path(path)
    net = InferenceOnly(_fuse_copy(model)).eval()  # the wrapper must be in eval mode too: export restores its mode
    x = torch.zeros(1, 3, *img_size)
    with torch.no_grad():
        n_boxes, no = net(x).shape[1:]
    axes = {'images': {0: 'batch', 2: 'height', 3: 'width'}, 'output': {0: 'batch', 1: 'boxes'}} if dynamic else \
        {'images': {0: 'batch'}, 'output': {0: 'batch'}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        with warnings.catch_warnings():  # shape-to-constant warnings: the exported graph is checked numerically
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            torch.onnx.export(net, (x,), str(tmp), input_names=['images'], output_names=['output'],
                              opset_version=opset, dynamo=False, dynamic_axes=axes)
        _name_output_dims(tmp, None if dynamic else int(n_boxes), int(no))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
