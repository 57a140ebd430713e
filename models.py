"""Darknet cfg -> PyTorch YOLO model; Darknet .weights reading/writing; .pt checkpoints (with class names); transfer
of weights to the same network with other classes (heads mapped by class name); conversion and ONNX export.

    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.weights --convert   # -> .pt
    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.pt --convert        # -> .weights
    python models.py --weights weights/best.pt --convert        # a train.py checkpoint -> best.weights + best.cfg
    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.weights --onnx yolov3-tiny.onnx [--dynamic]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from utils.boxes import decode_yolo_box
from utils.checkpoint import CheckpointError, load_checkpoint, model_checkpoint, save_checkpoint
from utils.files import atomic_write
from utils.layers import MaxPoolDarknet, Reorg3d, Route, SharedConv, Shortcut, make_activation
from utils.parse_config import ConfigError, cfg_with_classes, parse_cfg_text
from utils.torch_utils import count_parameters, intersect_state_dicts

# BN momentum as the original (0.03). eps differs on purpose: Darknet normalises by sqrt(var) + 1e-6; the original's
# eps=1e-4 moves the official yolov3-tiny outputs by up to 5e-4 against Darknet/OpenCV, eps=1e-6 by about 5e-6.
# (The loss on the shared parity fixture moves by under 2e-4 relative.)
BN_MOMENTUM, BN_EPS = 0.03, 1e-6


class WeightsError(ValueError):
    """A Darknet .weights file that does not fit the model; the message names the file and the counts."""


class YOLOLayer(nn.Module):
    """Darknet [yolo]: decodes a (B, na*no, ny, nx) map into boxes in input pixels."""

    def __init__(self, anchors: list[tuple[float, float]], nc: int, stride: float, index: int,
                 scale_x_y: float = 1.0, asff_layers: list[int] | None = None):
        super().__init__()
        self.register_buffer('anchors', torch.tensor(anchors, dtype=torch.float32))  # (na, 2) pixels
        self.na = len(anchors)
        self.nc = nc
        self.no = nc + 5
        self.stride = float(stride)
        self.index = index  # position among the model's [yolo] layers
        self.scale_x_y = scale_x_y
        self.asff_layers = asff_layers or []  # ultralytics ASFF ([yolo] from=...): feature maps fused here
        self._grid_cache: dict = {}

    @property
    def anchor_vec(self) -> torch.Tensor:
        """Anchors in grid units of this layer: (na, 2)."""
        return self.anchors / self.stride

    def _grid(self, ny: int, nx: int, img_hw: tuple[int, int], device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cell positions (1, 1, ny, nx, 2), stride (2,) = (sx, sy)) in fp32 on device, made once per shape: a
        stride tensor from Python numbers each forward would be a blocking host-to-device copy on CUDA."""
        key = (ny, nx, tuple(img_hw), device)
        if key not in self._grid_cache or torch.jit.is_tracing():  # traced (ONNX): built from the input's shape
            yv, xv = torch.meshgrid(torch.arange(ny, device=device, dtype=torch.float32),
                                    torch.arange(nx, device=device, dtype=torch.float32), indexing='ij')
            stride = torch.tensor([img_hw[1] / nx, img_hw[0] / ny], device=device)  # (sx, sy)
            self._grid_cache = {key: (torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2), stride)}
        return self._grid_cache[key]

    def asff(self, outputs: list) -> torch.Tensor:
        """Ultralytics ASFF: weighted sum of this and the other [yolo] inputs (last n channels are the weights)."""
        n, i = len(self.asff_layers), self.index
        p = outputs[self.asff_layers[i]]
        ny, nx = p.shape[-2:]
        w = torch.sigmoid(p[:, -n:]) * (2 / n)  # (B, n, ny, nx)
        x = p[:, :-n] * w[:, i:i + 1]
        for j, layer in enumerate(self.asff_layers):
            if j != i:
                x = x + w[:, j:j + 1] * F.interpolate(outputs[layer][:, :-n], size=(ny, nx), mode='bilinear',
                                                      align_corners=False)
        return x

    def forward(self, p: torch.Tensor, img_hw: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Return (decoded (B, na*ny*nx, no) or None in training, raw (B, na, ny, nx, no))."""
        _, _, ny, nx = p.shape
        # batch as -1, not the traced size: OpenCV's ONNX importer then runs an export at any batch size
        p = p.view(-1, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()  # (B, na, ny, nx, no)
        if self.training:
            return None, p
        # decoded in fp32 whatever the network's dtype: bf16 steps 2 px between 256 and 512, fp16 0.25 px
        pf = p.float()
        grid, stride = self._grid(ny, nx, img_hw, p.device)
        # the one decode the losses use too (scale_x_y included), so training optimises these boxes
        xy, wh = decode_yolo_box(pf, self.anchors.view(1, self.na, 1, 1, 2), self.scale_x_y, grid)
        xy = xy * stride
        io = torch.cat((xy, wh, torch.sigmoid(pf[..., 4:])), -1)
        return io.view(-1, self.na * ny * nx, self.no), p


def _conv_padding(mdef: dict) -> int:
    return mdef['size'] // 2 if mdef.get('pad', 0) else mdef.get('padding', 0)


def _stride2(mdef: dict) -> tuple[int, int]:
    s = mdef.get('stride', 1)
    return mdef.get('stride_y', s), mdef.get('stride_x', s)


# The original's bias prior for the convolution before each [yolo] layer (focal-loss paper, section 3.3): a fresh
# head predicts objectness sigmoid(-4.5) ~ 0.011 and class probabilities ~ 0.6 / nc instead of 0.5 everywhere.
OBJ_PRIOR = -4.5


def class_prior(nc: int) -> float:
    """The class-logit bias prior of a fresh head with nc classes (as the original: log(0.6 / (nc - 0.99)))."""
    return math.log(0.6 / (nc - 0.99))


def add_bias_prior(head: nn.Module, na: int, nc: int) -> None:
    """Add the prior to the output bias of a head convolution (its BatchNorm2d bias if it has one); in place."""
    bias = head.BatchNorm2d.bias if hasattr(head, 'BatchNorm2d') else head.Conv2d.bias
    with torch.no_grad():
        b = bias[:na * (nc + 5)].view(na, nc + 5)  # (na, 5 + nc); ASFF weight rows after these stay as they are
        b[:, 4] += OBJ_PRIOR
        b[:, 5:] += class_prior(nc)


class _Builder:
    """What the section builders share while create_modules walks the cfg: the layers so far and their shapes."""

    def __init__(self, module_defs: list[dict], cfg_name: str, in_channels: int):
        self.defs, self.cfg_name, self.in_channels = module_defs, cfg_name, in_channels
        self.module_list = nn.ModuleList()
        self.channels: list[int] = []  # output channels of each layer
        self.strides: list[tuple[float, float]] = []  # cumulative (sy, sx) downsampling of each layer
        self.reused: set[int] = set()  # layers whose outputs later layers read
        self.yolo_layers: list[int] = []

    def prev(self, i: int) -> tuple[int, tuple[float, float]]:
        """(channels, strides) of the input to layer i."""
        return (self.channels[i - 1], self.strides[i - 1]) if i else (self.in_channels, (1, 1))

    def error(self, i: int, text: str) -> ConfigError:
        """A ConfigError naming the cfg file, the line and layer i."""
        mdef = self.defs[i]
        return ConfigError(f"{self.cfg_name}:{mdef['line']}: layer {i} [{mdef['type']}] {text}")

    def absolute(self, i: int, refs: list[int], key: str) -> list[int]:
        """Layer references (negative = relative) as absolute indices of earlier layers."""
        out = [i + r if r < 0 else r for r in refs]
        for r, a in zip(refs, out):
            if not 0 <= a < i:
                raise self.error(i, f"{key}={r} refers to layer {a}, which is not an earlier layer")
        return out


Built = tuple[nn.Module, int, tuple[float, float]]  # (module, output channels, cumulative (sy, sx) stride)


def _build_convolutional(b: _Builder, i: int, mdef: dict) -> Built:
    for key in ('filters', 'size'):
        if key not in mdef:
            raise b.error(i, f"has no {key!r}")
    c_in, s_in = b.prev(i)
    filters, k, bn = mdef['filters'], mdef['size'], mdef.get('batch_normalize', 0)
    stride, pad = _stride2(mdef), _conv_padding(mdef)
    act = mdef.get('activation', 'logistic')  # Darknet's default activation
    s_out = (s_in[0] * stride[0], s_in[1] * stride[1])
    if 'share_index' in mdef:
        j = b.absolute(i, [mdef['share_index']], 'share_index')[0]
        src = b.module_list[j]
        if isinstance(src, nn.Sequential) and hasattr(src, 'Conv2d') and \
                src.Conv2d.weight.shape == (filters, c_in, k, k) and hasattr(src, 'BatchNorm2d') == bool(bn):
            return SharedConv(src, j, stride, pad, act), filters, s_out
        # Darknet stops here ("... don't match for the share_layer"); we build a layer of its own
        print(f"WARNING: {b.cfg_name}:{mdef['line']}: layer {i} share_index={mdef['share_index']} ignored: layer {j} "
              f"is not a convolution of the same shape (Darknet rejects this cfg); layer {i} gets weights of its own")
    groups = mdef.get('groups', 1)
    if c_in % groups or filters % groups:
        raise b.error(i, f"groups={groups} does not divide {c_in} input / {filters} output channels")
    module = nn.Sequential()
    module.add_module('Conv2d', nn.Conv2d(c_in, filters, k, stride, pad, dilation=mdef.get('dilation', 1),
                                          groups=groups, bias=not bn))
    if bn:
        module.add_module('BatchNorm2d', nn.BatchNorm2d(filters, momentum=BN_MOMENTUM, eps=BN_EPS))
    module.add_module('activation', make_activation(act))
    return module, filters, s_out


def _build_maxpool(b: _Builder, i: int, mdef: dict) -> Built:
    c_in, s_in = b.prev(i)
    sy, sx = _stride2(mdef)
    return MaxPoolDarknet(mdef.get('size', sx), (sy, sx), mdef.get('padding')), c_in, (s_in[0] * sy, s_in[1] * sx)


def _build_avgpool(b: _Builder, i: int, mdef: dict) -> Built:
    return nn.AdaptiveAvgPool2d(1), *b.prev(i)


def _build_upsample(b: _Builder, i: int, mdef: dict) -> Built:
    c_in, s_in = b.prev(i)
    st = mdef.get('stride', 2)
    return nn.Upsample(scale_factor=st, mode='nearest'), c_in, (s_in[0] / st, s_in[1] / st)


def _build_route(b: _Builder, i: int, mdef: dict) -> Built:
    layers = b.absolute(i, mdef['layers'], 'layers')
    groups = mdef.get('groups', 1)
    b.reused.update(layers)
    return Route(layers, groups, mdef.get('group_id', 0)), sum(b.channels[j] for j in layers) // groups, \
        b.strides[layers[0]]


def _build_shortcut(b: _Builder, i: int, mdef: dict) -> Built:
    layers = b.absolute(i, mdef['from'], 'from')
    b.reused.update(layers)
    return Shortcut(layers, mdef.get('activation', 'linear')), *b.prev(i)


def _build_reorg3d(b: _Builder, i: int, mdef: dict) -> Built:
    c_in, s_in = b.prev(i)
    st = mdef.get('stride', 2)
    return Reorg3d(st), c_in * st * st, (s_in[0] * st, s_in[1] * st)


def _build_dropout(b: _Builder, i: int, mdef: dict) -> Built:
    return nn.Dropout(mdef.get('probability', 0.5)), *b.prev(i)


def _build_yolo(b: _Builder, i: int, mdef: dict) -> Built:
    for key in ('mask', 'anchors', 'classes'):
        if key not in mdef:
            raise b.error(i, f"has no {key!r}")
    anchors, mask, nc = mdef['anchors'], mdef['mask'], mdef['classes']
    if any(not 0 <= m < len(anchors) for m in mask):
        raise b.error(i, f"mask {mask} indexes outside its {len(anchors)} anchors")
    asff = b.absolute(i, mdef['from'], 'from') if 'from' in mdef else []
    yi = len(b.yolo_layers)
    src = asff[yi] if asff else i - 1  # the convolution whose output this layer decodes
    expected = (nc + 5) * len(mask) + len(asff)
    if b.defs[src]['type'] != 'convolutional' or b.channels[src] != expected:
        asff_text = (' + len(from)', f' + {len(asff)}') if asff else ('', '')
        raise ConfigError(
            f"{b.cfg_name}: layer {src} ([{b.defs[src]['type']}] at line {b.defs[src]['line']}) feeds [yolo] layer {i} "
            f"with {b.channels[src]} filters, but (classes + 5) * len(mask){asff_text[0]} = ({nc} + 5) * {len(mask)}"
            f"{asff_text[1]} = {expected}")
    stride = b.strides[src]
    module = YOLOLayer([anchors[m] for m in mask], nc, stride[1], yi, mdef.get('scale_x_y', 1.0), asff)
    head = b.module_list[src]
    if isinstance(head, nn.Sequential):  # a SharedConv head would move its source layer's bias: left alone
        add_bias_prior(head, module.na, nc)  # as the original's create_modules
    b.reused.update(asff)
    b.yolo_layers.append(i)
    return module, b.channels[src], stride


BUILDERS = {'convolutional': _build_convolutional, 'maxpool': _build_maxpool, 'avgpool': _build_avgpool,
            'upsample': _build_upsample, 'route': _build_route, 'shortcut': _build_shortcut,
            'reorg3d': _build_reorg3d, 'dropout': _build_dropout, 'yolo': _build_yolo}


def create_modules(module_defs: list[dict], cfg_name: str = '<cfg>', in_channels: int = 3
                   ) -> tuple[nn.ModuleList, list[int], list[int]]:
    """Build one module per cfg section (the [net] section excluded): (module_list, yolo indices, reused outputs).

    The convolution feeding each [yolo] layer starts with the original's bias prior (add_bias_prior).
    """
    b = _Builder(module_defs, cfg_name, in_channels)
    for i, mdef in enumerate(module_defs):
        if mdef['type'] not in BUILDERS:  # parse_config only lets supported sections through
            raise b.error(i, "is not implemented")
        module, c_out, s_out = BUILDERS[mdef['type']](b, i, mdef)
        b.module_list.append(module)
        b.channels.append(c_out)
        b.strides.append(s_out)
    return b.module_list, b.yolo_layers, sorted(b.reused)


class Darknet(nn.Module):
    """YOLO model built from a Darknet cfg (a path, or cfg text containing [net])."""

    def __init__(self, cfg: str | Path, img_size: int | tuple[int, int] = (416, 416), verbose: bool = False):
        super().__init__()
        if isinstance(cfg, str) and '[net]' in cfg or isinstance(cfg, str) and '\n' in cfg:
            self.cfg_path, self.cfg_text = '<cfg text>', cfg
        else:
            path = Path(cfg)
            if not path.is_file():
                raise ConfigError(f"{path}: cfg file not found")
            self.cfg_path, self.cfg_text = str(path), path.read_text(encoding='utf-8', errors='replace')
        defs = parse_cfg_text(self.cfg_text, self.cfg_path)
        self.hyperparams = defs[0]
        self.module_defs = defs[1:]
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.module_list, self.yolo_layers, reused = create_modules(self.module_defs, self.cfg_path,
                                                                    self.hyperparams.get('channels', 3))
        self.reused = set(reused)
        self.nc = self.module_list[self.yolo_layers[0]].nc if self.yolo_layers else 0  # classes of the [yolo] layers
        self.version = np.array([0, 2, 5], dtype=np.int32)  # Darknet header: major, minor, revision
        self.seen = 0  # images seen in training, as stored in .weights headers
        self.names: list[str] | None = None  # class names when known (saved in checkpoints), else None
        if verbose:
            self.info(verbose=True)

    def forward(self, x: torch.Tensor, augment: bool = False):
        """Train mode: list of (B, na, ny, nx, no) maps. Eval: (inference_out (B, N, no), list of maps)."""
        if augment:
            return self._forward_augment(x)
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor):
        img_hw = x.shape[-2:]
        outputs: list[Any] = []
        yolo_io, yolo_p = [], []
        for i, module in enumerate(self.module_list):
            if isinstance(module, Route):
                x = module(outputs)
            elif isinstance(module, Shortcut):
                x = module(x, outputs)
            elif isinstance(module, YOLOLayer):
                io, p = module(module.asff(outputs) if module.asff_layers else x, img_hw)
                yolo_io.append(io)
                yolo_p.append(p)
            else:
                x = module(x)
            outputs.append(x if i in self.reused else None)  # keep only what later layers read
        if self.training:
            return yolo_p
        return torch.cat(yolo_io, 1), yolo_p

    def _forward_augment(self, x: torch.Tensor):
        """Test-time augmentation: original, left-right flip at 0.83x, 0.67x; boxes mapped back, rows joined."""
        h, w = x.shape[-2:]
        outs = []
        for flip, scale in ((False, 1.0), (True, 0.83), (False, 0.67)):
            xi = x.flip(3) if flip else x
            if scale != 1.0:
                xi = scale_img(xi, scale)
            io = self._forward_once(xi)[0]
            io[..., :4] /= scale
            if flip:
                io[..., 0] = w - io[..., 0]
            outs.append(io)
        return torch.cat(outs, 1), None

    def head_convs(self) -> list[int]:
        """Index of the convolution feeding each [yolo] layer (for ASFF heads, the `from=` layer it decodes)."""
        out = []
        for i in self.yolo_layers:
            y = self.module_list[i]
            out.append(y.asff_layers[y.index] if y.asff_layers else i - 1)
        return out

    def fuse(self) -> 'Darknet':
        """Fold every BatchNorm2d into its convolution (in place, for inference: BN uses its running statistics)."""
        for m in self.module_list:
            if isinstance(m, nn.Sequential) and hasattr(m, 'BatchNorm2d'):
                m.Conv2d = fuse_conv_bn_eval(m.Conv2d.eval(), m.BatchNorm2d.eval())  # a new Conv2d with a bias
                del m.BatchNorm2d
        self.fused = True
        return self

    def to_dtype(self, dtype: torch.dtype) -> 'Darknet':
        """Cast the layers' weights to dtype (fp16/bf16 inference) in place; the [yolo] anchors stay fp32 for the fp32
        box decode (bf16 would round anchor 319 to 320)."""
        for m in self.module_list:
            if not isinstance(m, YOLOLayer):
                m.to(dtype)
        return self

    def gflops(self, img_size: int | tuple[int, int]) -> float:
        """GFLOPs of one forward pass of a (1, 3, h, w) image, counted by torch's FlopCounterMode.

        Counted on a copy built from the cfg on the meta device: shapes only, no arithmetic, no memory.
        """
        from torch.utils.flop_counter import FlopCounterMode  # imported here: only the summary needs it
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        with contextlib.redirect_stdout(io.StringIO()), torch.device('meta'):  # cfg warnings were printed once
            twin = Darknet(self.cfg_text).eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                twin(torch.zeros(1, int(self.hyperparams.get('channels', 3)), h, w))
        return counter.get_total_flops() / 1e9

    def info(self, verbose: bool = False, img_size: int | tuple[int, int] | None = None) -> str:
        """Print (and return) a summary: layers, parameters, gradients, GFLOPs at img_size."""
        if verbose:
            print(f"{'layer':>5} {'type':>15} {'params':>10}  shape")
            for i, (d, m) in enumerate(zip(self.module_defs, self.module_list)):
                n = sum(p.numel() for p in m.parameters())
                shape = list(m.Conv2d.weight.shape) if isinstance(m, nn.Sequential) else ''
                print(f"{i:>5} {d['type']:>15} {n:>10}  {shape}")
        size = img_size or self.img_size
        size = (size, size) if isinstance(size, int) else size
        n_p, n_g = count_parameters(self)
        try:
            gflops = f", {self.gflops(size):.1f} GFLOPs at {size[0]}x{size[1]}"
        except RuntimeError:  # a size the network cannot take (e.g. not a multiple of its stride)
            gflops = ''
        s = f"Model Summary: {len(self.module_list)} layers, {n_p:,} parameters, {n_g:,} gradients{gflops}"
        print(s)
        return s


def scale_img(img: torch.Tensor, ratio: float, gs: int = 32) -> torch.Tensor:
    """Resize (B, 3, H, W) by ratio and pad right/bottom to a multiple of gs with grey (0.447)."""
    h, w = img.shape[-2:]
    s = (int(h * ratio), int(w * ratio))
    img = F.interpolate(img, size=s, mode='bilinear', align_corners=False)
    ph, pw = math.ceil(s[0] / gs) * gs, math.ceil(s[1] / gs) * gs
    return F.pad(img, [0, pw - s[1], 0, ph - s[0]], value=0.447)


# ----------------------------------------------------------------------------------------------------------------
# Darknet .weights

def _conv_layers(model: Darknet, cutoff: int) -> list[nn.Sequential]:
    """The convolutions with their own weights among the first `cutoff` layers, in file order."""
    n = len(model.module_list) if cutoff < 0 else cutoff
    return [m for m in list(model.module_list)[:n] if isinstance(m, nn.Sequential) and hasattr(m, 'Conv2d')]


def _darknet_tensors(seq: nn.Sequential) -> list[torch.Tensor]:
    """The tensors of one conv layer in Darknet's file order."""
    conv = seq.Conv2d
    if hasattr(seq, 'BatchNorm2d'):
        bn = seq.BatchNorm2d
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]
    return [conv.bias, conv.weight]


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


def darknet_value_count(model: Darknet, cutoff: int = -1) -> int:
    """How many float32 values a Darknet .weights file of this model holds (of its first `cutoff` layers)."""
    return sum(t.numel() for seq in _conv_layers(model, cutoff) for t in _darknet_tensors(seq))


def _misfit_error(model: Darknet, path: str | Path, n_values: int, cutoff: int) -> WeightsError:
    expected = darknet_value_count(model, cutoff)
    layers = 'all layers' if cutoff < 0 else f'the first {cutoff} layers'
    why = ('a truncated file, or ' if n_values < expected else '') + 'the weights of another model'
    return WeightsError(
        f"{path}: holds {n_values:,} float32 values but {model.cfg_path} needs {expected:,} for {layers} "
        f"({model.nc} classes) and no other class count makes them fit: {why}. To fine-tune from this file use the "
        f"cfg of the model these weights belong to (any classes=), or pass --weights '' to start from random weights")


def _fill_from_values(model: Darknet, values: np.ndarray, cutoff: int, path: str | Path) -> None:
    """Copy Darknet-ordered values into the model's conv layers; a count that does not fit changes nothing."""
    if getattr(model, 'fused', False):
        raise WeightsError(f"{path}: load Darknet weights before model.fuse()")
    if values.size != darknet_value_count(model, cutoff):
        raise _misfit_error(model, path, values.size, cutoff)
    ptr = 0
    with torch.no_grad():
        for t in (t for seq in _conv_layers(model, cutoff) for t in _darknet_tensors(seq)):
            n = t.numel()
            t.copy_(torch.from_numpy(values[ptr:ptr + n].reshape(t.shape)))
            ptr += n


def load_darknet_weights(model: Darknet, path: str | Path, cutoff: int = -1) -> None:
    """Load a Darknet .weights file into a model it fits exactly; otherwise a WeightsError naming the counts.

    (load_weights also takes files of the same network with another class count.)
    """
    if cutoff == -1:
        cutoff = cutoff_from_name(path)
    version, seen, values = read_darknet_file(path)
    _fill_from_values(model, values, cutoff, path)
    model.version, model.seen = version, seen


def darknet_source_classes(model: Darknet, n_values: int, cutoff: int = -1) -> int | None:
    """The class count >= 1 with which the model's cfg needs exactly n_values Darknet values, else None.

    The count is linear in the classes (only the convolutions before the [yolo] layers change), so two meta-device
    builds (shapes only) give it, and a third checks the answer.
    """
    def count(nc: int) -> int:
        with contextlib.redirect_stdout(io.StringIO()), torch.device('meta'):  # cfg warnings were printed once
            return darknet_value_count(Darknet(cfg_with_classes(model.cfg_text, nc, model.cfg_path)), cutoff)

    if not model.yolo_layers:
        return None
    c1, c2 = count(1), count(2)
    per_class = c2 - c1
    if per_class <= 0 or n_values < c1 or (n_values - c1) % per_class:
        return None
    nc = 1 + (n_values - c1) // per_class
    return nc if count(nc) == n_values else None


def save_weights(model: Darknet, path: str | Path, cutoff: int = -1) -> None:
    """Write a Darknet .weights file (header, then conv layers in Darknet order), atomically."""
    if getattr(model, 'fused', False):
        raise WeightsError(f"{path}: a fused model cannot be written as Darknet weights; save before model.fuse()")
    parts = [np.asarray(model.version, dtype=np.int32).tobytes(), np.array([model.seen], dtype=np.int64).tobytes()]
    parts += [t.detach().cpu().float().numpy().ravel().tobytes()
              for seq in _conv_layers(model, cutoff) for t in _darknet_tensors(seq)]
    atomic_write(path, b''.join(parts))


def transfer_weights(model: nn.Module, state_dict: dict, verbose: bool = True) -> tuple[int, int]:
    """Load the entries of state_dict whose names and shapes match the model; print `transferred X/Y`."""
    own = model.state_dict()
    matched = intersect_state_dicts(state_dict, own)
    model.load_state_dict(matched, strict=False)
    if verbose:
        print(f"transferred {len(matched)}/{len(own)} items")
    return len(matched), len(own)


# ----------------------------------------------------------------------------------------------------------------
# weights into a model: exact loads, transfer to other class counts, class-mapped heads

COCO_NAMES = Path(__file__).resolve().parent / 'data' / 'coco.names'  # 80-class Darknet weights are COCO's


@functools.lru_cache(maxsize=1)
def _coco_names() -> tuple[str, ...] | None:
    if not COCO_NAMES.is_file():
        return None
    return tuple(s.strip() for s in COCO_NAMES.read_text(encoding='utf-8').splitlines() if s.strip())


def coco_names() -> list[str] | None:
    """The 80 COCO class names of data/coco.names (found beside models.py, not in the cwd), or None if missing."""
    names = _coco_names()
    return list(names) if names else None


class _Source:
    """Weights to put into a model: a state_dict, its class names (None with the reason when unknown), header."""

    def __init__(self, label: str, state: dict[str, torch.Tensor], names: list[str] | None, no_names: str,
                 version: Any, seen: int, layers: int = -1):
        self.label, self.state, self.names, self.no_names = label, state, names, no_names
        self.version, self.seen = np.array(version, dtype=np.int32), int(seen)
        self.layers = layers  # only layers below this index come from the source (partial Darknet files); -1: all


def _layer_of(key: str) -> int:
    """Layer index of a Darknet state_dict key: 'module_list.15.Conv2d.weight' -> 15 (-1 for other keys)."""
    parts = key.split('.')
    return int(parts[1]) if len(parts) > 2 and parts[0] == 'module_list' and parts[1].isdigit() else -1


def _foreign_error(model: Darknet, src: _Source, src_nc: dict[int, int]) -> WeightsError | None:
    """An error naming the source tensors that have no place in the model (outside heads of other classes), if any:
    the weights of another network, which a name-and-shape match would load only by accident."""
    own = model.state_dict()
    foreign = [k for k, s in src.state.items()
               if (k not in own or s.shape != own[k].shape) and _layer_of(k) not in src_nc]
    if not foreign:
        return None
    k = foreign[0]
    where = f"{tuple(own[k].shape)} in the model" if k in own else "not in the model"
    return WeightsError(
        f"{src.label}: {len(foreign)} of its {len(src.state)} tensors do not fit the model of {model.cfg_path} (e.g. "
        f"{k} {tuple(src.state[k].shape)}, {where}): the weights of another model. To fine-tune from this file use "
        f"the cfg of the model these weights belong to (any classes=), or pass --weights '' to start from random "
        f"weights")


def _check_names(names: list[str], model: Darknet) -> list[str]:
    names = [str(n) for n in names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate class names {', '.join(map(repr, dup))}: every class needs a name of its own "
                         f"(class mapping finds a class by its name)")
    if len(names) != model.nc:
        raise ValueError(f"{len(names)} class names given but {model.cfg_path} has {model.nc} classes")
    return names


def _mapping_off(src: _Source, names: list[str] | None, map_classes: bool) -> str:
    """Why the heads are not mapped by class name ('' where they may be)."""
    if names is None:
        return 'no class names given'
    if not map_classes:
        return 'turned off (map_classes=False, train.py --no-class-map)'
    if src.names is None:
        return f'{src.label} carries no class names ({src.no_names})'
    return ''


def _source_classes(model: Darknet, state: dict) -> dict[int, int]:
    """{head conv index: source class count} for heads where state holds that convolution with another row count
    that is (classes + 5) * anchors (+ ASFF rows) for the same input: the same network with other classes."""
    own = model.state_dict()
    out = {}
    for j, i in zip(model.head_convs(), model.yolo_layers):
        y, key = model.module_list[i], f'module_list.{j}.Conv2d.weight'
        w = state.get(key)
        if w is None or w.shape[1:] != own[key].shape[1:]:
            continue
        rows = w.shape[0] - len(y.asff_layers)
        if rows > 5 * y.na and rows % y.na == 0:
            out[j] = rows // y.na - 5
    return out


def _row_pairs(y: YOLOLayer, nc_src: int, cls_src: list[int | None]) -> tuple[list[int], list[int]]:
    """(rows of a new head, source rows they copy): every anchor's box and objectness rows, the class rows whose
    source class is known (cls_src[c]; None keeps the fresh row), then the ASFF weight rows."""
    no, no_src = y.nc + 5, nc_src + 5
    dst, src = [], []
    for a in range(y.na):  # rows are anchor-major: (na, 5 + nc)
        dst += [a * no + f for f in range(5)]
        src += [a * no_src + f for f in range(5)]
        for c, s in enumerate(cls_src):
            if s is not None:
                dst.append(a * no + 5 + c)
                src.append(a * no_src + 5 + s)
    n = len(y.asff_layers)
    return dst + [y.na * no + e for e in range(n)], src + [y.na * no_src + e for e in range(n)]


def _mapped_state(model: Darknet, src: _Source, src_nc: dict[int, int], cls_src: list[int | None]) -> dict:
    """Head tensors built row by row: fresh rows of the model (bias prior included) overwritten by source rows."""
    own, out = model.state_dict(), {}
    yolo_of = dict(zip(model.head_convs(), (model.module_list[i] for i in model.yolo_layers)))
    for k, v in own.items():
        j = _layer_of(k)
        if j not in src_nc or k not in src.state:
            continue
        s = src.state[k]
        dst_rows, src_rows = _row_pairs(yolo_of[j], src_nc[j], cls_src)
        if v.dim() and s.dim() and v.shape[1:] == s.shape[1:]:  # per-row tensors: conv weight, bias, BN vectors
            t = v.detach().clone()
            t[dst_rows] = s[src_rows].to(t)
            out[k] = t
        elif s.shape == v.shape:  # e.g. BN num_batches_tracked
            out[k] = s
    return out


def _put_state(model: Darknet, src: _Source, names: list[str] | None, map_classes: bool, verbose: bool) -> None:
    """Put a source's weights into the model: tensors of the same name and shape as they are; heads of the same
    network with other classes mapped by class name (or left fresh, with the bias prior); print what was done."""
    own = model.state_dict()
    src_nc = _source_classes(model, src.state)
    if (err := _foreign_error(model, src, src_nc)) is not None:
        raise err
    why_off = _mapping_off(src, names, map_classes)
    if not why_off and any(len(src.names) != n for n in src_nc.values()):
        why_off = f"{src.label} has {len(src.names)} class names for {sorted(set(src_nc.values()))} classes"
    mapping = bool(src_nc) and not why_off and (names != src.names or any(n != model.nc for n in src_nc.values()))
    state = {}
    for k, v in own.items():
        s = src.state.get(k)
        j = _layer_of(k)
        if s is None or (src.layers >= 0 and j >= src.layers) or (mapping and j in src_nc):
            continue
        if s.shape == v.shape:
            state[k] = s
    n_whole = len(state)
    fresh = [j for j, n in src_nc.items() if n != model.nc] if not mapping else []
    cls_src = [src.names.index(n) if n in src.names else None for n in names] if mapping else []
    if mapping:
        state.update(_mapped_state(model, src, src_nc, cls_src))
    if not state:
        raise WeightsError(f"{src.label}: no tensor fits the model built from {model.cfg_path}")
    model.load_state_dict(state, strict=False)
    model.version, model.seen = src.version, src.seen
    if names is not None:
        model.names = list(names)
    else:  # the source's names describe the model only where every head came from the source as it was
        whole = src_nc and not fresh and all(n == model.nc for n in src_nc.values())
        model.names = list(src.names) if whole and src.names and len(src.names) == model.nc else None
    if verbose and (n_whole < len(own) or mapping):
        _report(model, src, src_nc, n_whole, len(own), fresh, cls_src if mapping else None)
    matters = src.names is None or names != src.names or any(n != model.nc for n in src_nc.values())
    if verbose and names is not None and src_nc and why_off and matters:
        print(f"class mapping off: {why_off}")


def _report(model: Darknet, src: _Source, src_nc: dict[int, int], n_whole: int, n_own: int, fresh: list[int],
            cls_src: list[int | None] | None) -> None:
    """Print the transfer: items loaded whole, heads re-initialised or mapped (then one line per class)."""
    print(f"transferred {n_whole}/{n_own} items from {src.label}")
    heads = fresh if cls_src is None else sorted(src_nc)
    if heads:
        sd = model.state_dict()
        rows = sorted({(src.state[f'module_list.{j}.Conv2d.weight'].shape[0], sd[f'module_list.{j}.Conv2d.weight']
                        .shape[0]) for j in heads})
        filters = ', '.join(f'{a} -> {b}' for a, b in rows)
        classes = f"{'/'.join(str(n) for n in sorted({src_nc[j] for j in heads}))} -> {model.nc} classes"
        what = 're-initialised' if cls_src is None else 'mapped by class name'
        print(f"{len(heads)} output convolution{'s' * (len(heads) > 1)} {what}: {filters} filters ({classes})")
    if cls_src is not None:
        print('box and objectness rows copied; class rows:')
        for name, s in zip(model.names, cls_src):
            print(f"  {name} <- {'(new)' if s is None else f'{src.names[s]} ({s})'}")


def _darknet_source(model: Darknet, path: str, names: list[str] | None, map_classes: bool,
                    verbose: bool) -> _Source | None:
    """Read a Darknet file: straight into the model when it fits and no mapping is asked for (None returned), else
    into a twin of the model built with the file's class count (inferred from its size), returned as a _Source."""
    version, seen, values = read_darknet_file(path)
    cutoff = cutoff_from_name(path)
    nc_src = model.nc if values.size == darknet_value_count(model, cutoff) else \
        darknet_source_classes(model, values.size, cutoff)
    if nc_src is None:
        raise _misfit_error(model, path, values.size, cutoff)
    coco = coco_names() if nc_src == 80 and cutoff < 0 else None  # partial files hold no heads: nothing to map
    no_names = ('data/coco.names is missing' if nc_src == 80 and cutoff < 0 else
                f'only 80-class Darknet weights are taken as COCO\'s; this file has {nc_src} classes'
                if cutoff < 0 else f'a partial file of the first {cutoff} layers')
    src = _Source(path, {}, coco, no_names, version, seen, cutoff)
    if nc_src == model.nc and (names is None or _mapping_off(src, names, map_classes) or names == coco):
        _fill_from_values(model, values, cutoff, path)
        model.version, model.seen = version, seen
        model.names = list(names) if names is not None else coco
        why_off = _mapping_off(src, names, map_classes)
        if verbose and names is not None and why_off and cutoff < 0 and names != coco:
            print(f"class mapping off: {why_off}; {path} loaded as it is")
        return None
    if verbose and nc_src != model.nc:
        print(f"{path}: Darknet weights of this network with {nc_src} classes ({model.cfg_path} has {model.nc})")
    twin = Darknet(cfg_with_classes(model.cfg_text, nc_src, model.cfg_path) if nc_src != model.nc else model.cfg_text)
    _fill_from_values(twin, values, cutoff, path)
    src.state = twin.state_dict()
    return src


def _checkpoint_source(ckpt: dict, label: str) -> _Source:
    names = ckpt.get('names')
    ok = isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
    return _Source(label, ckpt['model'], list(names) if ok else None, 'a checkpoint saved without them',
                   ckpt.get('version', [0, 2, 5]), ckpt.get('seen', 0))


def load_weights(model: Darknet, weights: str | Path, names: list[str] | None = None, map_classes: bool = True,
                 verbose: bool = True) -> None:
    """Load a .pt checkpoint or Darknet weights into the model, transferring what fits, and set model.names.

    Weights of the same network with another class count load everything but the output convolutions before the
    [yolo] layers; those are mapped by class name when `names` (the model's classes) are given, map_classes is on
    and the source has names (box and objectness rows as they are, known classes from their source class, unknown
    ones fresh), else left fresh with the bias prior. Prints what it did when verbose.
    """
    weights = str(weights)
    names = _check_names(names, model) if names is not None else None
    if weights.endswith('.pt'):
        src = _checkpoint_source(load_checkpoint(weights), weights)
    else:
        src = _darknet_source(model, weights, names, map_classes, verbose)
        if src is None:  # loaded as it is
            return
    try:
        _put_state(model, src, names, map_classes, verbose)
    except WeightsError as e:
        raise (CheckpointError(str(e)) if weights.endswith('.pt') else e) from None


def load_model(weights: str | Path, cfg: str | Path | None = None, img_size: int | tuple[int, int] = 416,
               device: str | torch.device = 'cpu', verbose: bool = True) -> Darknet:
    """Build a model from cfg (or, for .pt, the cfg saved in it), load the weights (load_weights' rules, class
    names from the checkpoint, COCO's for 80-class Darknet weights; model.names None when unknown); eval mode."""
    weights = str(weights)
    if weights.endswith('.pt'):
        ckpt = load_checkpoint(weights)
        model = Darknet(cfg if cfg else ckpt.get('cfg') or _missing_cfg(weights), img_size)
        try:
            _put_state(model, _checkpoint_source(ckpt, weights), None, False, verbose)
        except WeightsError as e:
            raise CheckpointError(str(e)) from None
    else:
        model = Darknet(cfg or DEFAULT_CFG, img_size)
        attempt_download(weights)
        load_weights(model, weights, verbose=verbose)
    return model.to(device).eval()


def load_eval_model(weights: str | Path, cfg: str | Path | None, img_size: int | tuple[int, int],
                    device: str | torch.device, dtype: torch.dtype = torch.float32) -> Darknet:
    """load_model, fused, with its layers in dtype (fp16/bf16 inference; box decode and NMS stay fp32), saying so."""
    model = load_model(weights, cfg, img_size, device).fuse()
    if dtype != torch.float32:
        model.to_dtype(dtype)
        print(f"{str(dtype).replace('torch.', '')} inference on {torch.device(device).type} (--half off for fp32)")
    return model


DEFAULT_CFG = Path(__file__).resolve().parent / 'cfg' / 'yolov3-spp.cfg'  # as the original's --cfg default


def _missing_cfg(weights: str):
    raise ConfigError(f"{weights}: no --cfg given and the file carries no cfg text; pass --cfg")


# ----------------------------------------------------------------------------------------------------------------
# official weights

OFFICIAL = {  # name: (release address, size in bytes)
    'yolov3.weights': ('https://pjreddie.com/media/files/yolov3.weights', 248007048),
    'yolov3-spp.weights': ('https://pjreddie.com/media/files/yolov3-spp.weights', 252209228),
    'yolov3-tiny.weights': ('https://pjreddie.com/media/files/yolov3-tiny.weights', 35434956),
    'darknet53.conv.74': ('https://pjreddie.com/media/files/darknet53.conv.74', 162482580),
}


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
    url, size = OFFICIAL[path.name]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.part')
    print(f"Downloading {url} to {path} ...")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, 'wb') as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(f"{path}: not found and the download from {url} failed ({e}). Download it "
                                f"elsewhere and put it at {path.resolve()}") from None
    got = tmp.stat().st_size
    head = tmp.read_bytes()[:64].lstrip().lower()
    if got != size or head.startswith((b'<!doctype', b'<html')):
        tmp.unlink()
        raise FileNotFoundError(f"{path}: the download from {url} is not the weights file ({got:,} bytes, expected "
                                f"{size:,}{'; an HTML page' if head.startswith((b'<!doctype', b'<html')) else ''}); "
                                f"deleted. Download it by hand and put it at {path.resolve()}")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# command line

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
    p.add_argument('--opset', type=int, default=17, help='ONNX opset')
    p.add_argument('--img-size', type=int, nargs='+', default=[416], help='export size: one int or h w')
    p.add_argument('--info', action='store_true', help='print the layer table')
    return p


def main(opt: argparse.Namespace) -> int:
    """Run the conversion / export asked for."""
    img = tuple(opt.img_size * 2 if len(opt.img_size) == 1 else opt.img_size[:2])
    if any(s % 32 for s in img):
        raise SystemExit(f"--img-size {img} must be multiples of 32")
    model = load_model(opt.weights, opt.cfg, img)
    if opt.info:
        model.info(verbose=True, img_size=img)
    if opt.convert:
        src = Path(opt.weights)
        if src.suffix == '.pt':
            dst = src.with_suffix('.weights')
            save_weights(model, dst)
            cfg_file = dst.with_suffix('.cfg')
            if not cfg_file.exists():  # Darknet and OpenCV's Darknet importer read the cfg beside the weights
                cfg_file.write_text(model.cfg_text, encoding='utf-8')
                print(f"Wrote {cfg_file} (the cfg {src} carries)")
        else:
            dst = src.with_suffix('.pt') if src.suffix == '.weights' else src.with_name(src.name + '.pt')
            save_checkpoint(model_checkpoint(model, epoch=-1), dst)
        print(f"Converted {src} -> {dst}")
    if opt.onnx:
        onnx_export(model, opt.onnx, img, opt.dynamic, opt.opset)
    return 0


def onnx_export(model: Darknet, path: str, img: tuple[int, int], dynamic: bool, opset: int) -> None:
    """models.py --onnx: export through utils.export, then compare onnxruntime with PyTorch at two batch sizes (and
    a second image size with dynamic height and width)."""
    from utils.export import check_onnx, export_onnx

    export_onnx(model, path, img, dynamic, opset)
    shape = '(batch, 3, height, width)' if dynamic else f'(batch, 3, {img[0]}, {img[1]})'
    print(f"Exported {path}: input 'images' {shape} RGB in [0, 1], output (batch, N, {model.nc + 5}), opset {opset}")
    shapes = [(1, *img), (2, *img)] + ([(2, img[0] + 64, img[1] + 32)] if dynamic else [])
    try:
        err = check_onnx(model, path, shapes)
    except ImportError:
        print('onnxruntime is not installed: the export was not checked (pip install onnxruntime)')
        return
    print(f"onnxruntime agrees with PyTorch to {err:.1e} (relative, inputs {', '.join(map(str, shapes))})")


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    try:
        sys.exit(main(args))
    except (ConfigError, WeightsError, CheckpointError, FileNotFoundError) as err:
        sys.exit(f"Error: {err}")
