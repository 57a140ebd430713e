"""Darknet cfg -> PyTorch YOLO model; Darknet .weights reading/writing; .pt checkpoints; conversion and ONNX export.

    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.weights --convert   # -> .pt
    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.pt --convert        # -> .weights
    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.weights --onnx yolov3-tiny.onnx
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.layers import MaxPoolDarknet, Reorg3d, Route, SharedConv, Shortcut, make_activation
from utils.parse_config import ConfigError, parse_cfg_text
from utils.torch_utils import conv_flops, count_parameters, fuse_conv_and_bn, intersect_state_dicts

# BN momentum as the original (0.03). eps differs on purpose: Darknet normalises by sqrt(var) + 1e-6; the original's
# eps=1e-4 moves the official yolov3-tiny outputs by up to 5e-4 against Darknet/OpenCV, eps=1e-6 by about 5e-6.
# (The loss on the shared parity fixture moves by under 2e-4 relative.)
BN_MOMENTUM, BN_EPS = 0.03, 1e-6


class WeightsError(ValueError):
    """A Darknet .weights file that does not fit the model; the message names the file and the counts."""


class CheckpointError(ValueError):
    """A .pt checkpoint that cannot be loaded safely or does not hold a model."""


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

    def _grid(self, ny: int, nx: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (ny, nx, device, dtype)
        if key not in self._grid_cache:
            yv, xv = torch.meshgrid(torch.arange(ny, device=device, dtype=dtype),
                                    torch.arange(nx, device=device, dtype=dtype), indexing='ij')
            self._grid_cache = {key: torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2)}
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
        bs, _, ny, nx = p.shape
        p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()  # (B, na, ny, nx, no)
        if self.training:
            return None, p
        grid = self._grid(ny, nx, p.device, p.dtype)
        s = self.scale_x_y
        stride = torch.tensor([img_hw[1] / nx, img_hw[0] / ny], device=p.device, dtype=p.dtype)  # (sx, sy)
        xy = (torch.sigmoid(p[..., :2]) * s - 0.5 * (s - 1) + grid) * stride
        wh = torch.exp(p[..., 2:4]) * self.anchors.to(p.dtype).view(1, self.na, 1, 1, 2)
        io = torch.cat((xy, wh, torch.sigmoid(p[..., 4:])), -1)
        return io.view(bs, -1, self.no), p


def _conv_padding(mdef: dict) -> int:
    return mdef['size'] // 2 if mdef.get('pad', 0) else mdef.get('padding', 0)


def _stride2(mdef: dict) -> tuple[int, int]:
    s = mdef.get('stride', 1)
    return mdef.get('stride_y', s), mdef.get('stride_x', s)


def create_modules(module_defs: list[dict], cfg_name: str = '<cfg>', in_channels: int = 3
                   ) -> tuple[nn.ModuleList, list[int], list[int]]:
    """Build one module per cfg section (the [net] section excluded): (module_list, yolo indices, reused outputs)."""
    module_list = nn.ModuleList()
    channels: list[int] = []  # output channels of each layer
    strides: list[tuple[int, int]] = []  # cumulative (sy, sx) downsampling of each layer
    reused: set[int] = set()
    yolo_layers: list[int] = []
    yolo_defs = [d for d in module_defs if d['type'] == 'yolo']

    def prev(i: int) -> tuple[int, tuple[int, int]]:
        return (channels[i - 1], strides[i - 1]) if i else (in_channels, (1, 1))

    def absolute(i: int, refs: list[int], key: str, mdef: dict) -> list[int]:
        out = [i + r if r < 0 else r for r in refs]
        for r, a in zip(refs, out):
            if not 0 <= a < i:
                raise ConfigError(f"{cfg_name}:{mdef['line']}: layer {i} [{mdef['type']}] {key}={r} refers to "
                                  f"layer {a}, which is not an earlier layer")
        return out

    for i, mdef in enumerate(module_defs):
        t = mdef['type']
        c_in, s_in = prev(i)
        if t == 'convolutional':
            for key in ('filters', 'size'):
                if key not in mdef:
                    raise ConfigError(f"{cfg_name}:{mdef['line']}: layer {i} [convolutional] has no {key!r}")
            filters, k, bn = mdef['filters'], mdef['size'], mdef.get('batch_normalize', 0)
            stride, pad = _stride2(mdef), _conv_padding(mdef)
            act = mdef.get('activation', 'logistic')  # Darknet's default activation
            share = None
            if 'share_index' in mdef:
                j = absolute(i, [mdef['share_index']], 'share_index', mdef)[0]
                src = module_list[j]
                if isinstance(src, nn.Sequential) and hasattr(src, 'Conv2d') and \
                        src.Conv2d.weight.shape == (filters, c_in, k, k) and hasattr(src, 'BatchNorm2d') == bool(bn):
                    share = SharedConv(src, j, stride, pad, act)
                else:  # Darknet stops here ("... don't match for the share_layer"); we build a layer of its own
                    print(f"WARNING: {cfg_name}:{mdef['line']}: layer {i} share_index={mdef['share_index']} ignored: "
                          f"layer {j} is not a convolution of the same shape (Darknet rejects this cfg); "
                          f"layer {i} gets weights of its own")
            if share is not None:
                module = share
            else:
                groups = mdef.get('groups', 1)
                if c_in % groups or filters % groups:
                    raise ConfigError(f"{cfg_name}:{mdef['line']}: layer {i} groups={groups} does not divide "
                                      f"{c_in} input / {filters} output channels")
                module = nn.Sequential()
                module.add_module('Conv2d', nn.Conv2d(c_in, filters, k, stride, pad, dilation=mdef.get('dilation', 1),
                                                      groups=groups, bias=not bn))
                if bn:
                    module.add_module('BatchNorm2d', nn.BatchNorm2d(filters, momentum=BN_MOMENTUM, eps=BN_EPS))
                module.add_module('activation', make_activation(act))
            c_out, s_out = filters, (s_in[0] * stride[0], s_in[1] * stride[1])
        elif t == 'maxpool':
            sy, sx = _stride2(mdef)
            module = MaxPoolDarknet(mdef.get('size', sx), (sy, sx), mdef.get('padding'))
            c_out, s_out = c_in, (s_in[0] * sy, s_in[1] * sx)
        elif t == 'avgpool':
            module = nn.AdaptiveAvgPool2d(1)
            c_out, s_out = c_in, s_in
        elif t == 'upsample':
            st = mdef.get('stride', 2)
            module = nn.Upsample(scale_factor=st, mode='nearest')
            c_out, s_out = c_in, (s_in[0] / st, s_in[1] / st)
        elif t == 'route':
            layers = absolute(i, mdef['layers'], 'layers', mdef)
            groups, gid = mdef.get('groups', 1), mdef.get('group_id', 0)
            c_out = sum(channels[j] for j in layers) // groups
            s_out = strides[layers[0]]
            module = Route(layers, groups, gid)
            reused.update(layers)
        elif t == 'shortcut':
            layers = absolute(i, mdef['from'], 'from', mdef)
            module = Shortcut(layers, mdef.get('activation', 'linear'))
            c_out, s_out = c_in, s_in
            reused.update(layers)
        elif t == 'reorg3d':
            st = mdef.get('stride', 2)
            module = Reorg3d(st)
            c_out, s_out = c_in * st * st, (s_in[0] * st, s_in[1] * st)
        elif t == 'dropout':
            module = nn.Dropout(mdef.get('probability', 0.5))
            c_out, s_out = c_in, s_in
        elif t == 'yolo':
            for key in ('mask', 'anchors', 'classes'):
                if key not in mdef:
                    raise ConfigError(f"{cfg_name}:{mdef['line']}: layer {i} [yolo] has no {key!r}")
            anchors, mask, nc = mdef['anchors'], mdef['mask'], mdef['classes']
            if any(not 0 <= m < len(anchors) for m in mask):
                raise ConfigError(f"{cfg_name}:{mdef['line']}: layer {i} [yolo] mask {mask} indexes outside its "
                                  f"{len(anchors)} anchors")
            asff = absolute(i, mdef['from'], 'from', mdef) if 'from' in mdef else []
            yi = len(yolo_layers)
            src = asff[yi] if asff else i - 1
            expected = (nc + 5) * len(mask) + len(asff)
            if module_defs[src]['type'] != 'convolutional' or channels[src] != expected:
                raise ConfigError(
                    f"{cfg_name}: layer {src} ([{module_defs[src]['type']}] at line {module_defs[src]['line']}) "
                    f"feeds [yolo] layer {i} with {channels[src]} filters, but (classes + 5) * len(mask)"
                    f"{' + len(from)' if asff else ''} = ({nc} + 5) * {len(mask)}{' + %d' % len(asff) if asff else ''}"
                    f" = {expected}")
            stride = strides[src]
            module = YOLOLayer([anchors[m] for m in mask], nc, stride[1], yi, mdef.get('scale_x_y', 1.0), asff)
            reused.update(asff)
            yolo_layers.append(i)
            c_out, s_out = channels[src], stride
        else:  # parse_config only lets supported sections through
            raise ConfigError(f"{cfg_name}:{mdef['line']}: section [{t}] is not implemented")
        module_list.append(module)
        channels.append(c_out)
        strides.append(s_out)
    if not yolo_layers and yolo_defs:
        raise ConfigError(f"{cfg_name}: no [yolo] layer was built")
    return module_list, yolo_layers, sorted(reused)


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

    def fuse(self) -> 'Darknet':
        """Fold every BatchNorm2d into its convolution (in place, for inference)."""
        for m in self.module_list:
            if isinstance(m, nn.Sequential) and hasattr(m, 'BatchNorm2d'):
                fused = fuse_conv_and_bn(m.Conv2d, m.BatchNorm2d)
                m.Conv2d = fused
                del m.BatchNorm2d
        self.fused = True
        return self

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
            gflops = f", {conv_flops(self, size):.1f} GFLOPs at {size[0]}x{size[1]}"
        except RuntimeError:
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


def load_darknet_weights(model: Darknet, path: str | Path, cutoff: int = -1) -> None:
    """Load a Darknet .weights file; a size that does not fit the model is an error naming the counts."""
    path = Path(path)
    if cutoff == -1:
        cutoff = cutoff_from_name(path)
    if getattr(model, 'fused', False):
        raise WeightsError(f"{path}: load Darknet weights before model.fuse()")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size < 20:
        raise WeightsError(f"{path}: {data.size} bytes is too short for a Darknet weights header")
    major, minor, revision = data[:12].view(np.int32)
    seen_int64 = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    hdr = 12 + (8 if seen_int64 else 4)
    model.version = np.array([major, minor, revision], dtype=np.int32)
    model.seen = int(data[12:hdr].view(np.int64 if seen_int64 else np.int32)[0])
    if (data.size - hdr) % 4:
        raise WeightsError(f"{path}: {data.size - hdr} bytes after the header is not a whole number of float32 values")
    values = data[hdr:].view(np.float32)
    tensors = [t for seq in _conv_layers(model, cutoff) for t in _darknet_tensors(seq)]
    expected = sum(t.numel() for t in tensors)
    if values.size != expected:
        layers = 'all layers' if cutoff < 0 else f'the first {cutoff} layers'
        why = ('a truncated file, or ' if values.size < expected else '') + 'the weights of another model?'
        raise WeightsError(f"{path}: holds {values.size:,} float32 values but {model.cfg_path} needs {expected:,} for "
                           f"{layers}: {why}")
    ptr = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(torch.from_numpy(values[ptr:ptr + n].reshape(t.shape)))
            ptr += n


def save_weights(model: Darknet, path: str | Path, cutoff: int = -1) -> None:
    """Write a Darknet .weights file (header, then conv layers in Darknet order), atomically."""
    if getattr(model, 'fused', False):
        raise WeightsError(f"{path}: a fused model cannot be written as Darknet weights; save before model.fuse()")
    parts = [np.asarray(model.version, dtype=np.int32).tobytes(), np.array([model.seen], dtype=np.int64).tobytes()]
    parts += [t.detach().cpu().float().numpy().ravel().tobytes()
              for seq in _conv_layers(model, cutoff) for t in _darknet_tensors(seq)]
    _atomic_write(path, lambda f: f.write(b''.join(parts)))


def _atomic_write(path: str | Path, write) -> None:
    """Write through a temp file in the same folder, fsync, then rename: a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# .pt checkpoints

def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    """torch.save a checkpoint of tensors and plain values atomically (temp file + rename)."""
    _atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str | Path) -> dict:
    """Load a .pt checkpoint with weights_only=True; anything else (code, pickled objects) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain values, and unpickling "
            f"them could run code (loaded with weights_only=True). Only load checkpoints you trust; convert a "
            f"trusted one by extracting its state_dict. Detail: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise CheckpointError(f"{path}: not a model checkpoint (expected a dict with a 'model' state_dict)")
    return ckpt


def transfer_weights(model: nn.Module, state_dict: dict, verbose: bool = True) -> tuple[int, int]:
    """Load the entries of state_dict whose names and shapes match the model; print `transferred X/Y`."""
    own = model.state_dict()
    matched = intersect_state_dicts(state_dict, own)
    model.load_state_dict(matched, strict=False)
    if verbose:
        print(f"transferred {len(matched)}/{len(own)} items")
    return len(matched), len(own)


def model_checkpoint(model: Darknet, **extra: Any) -> dict:
    """A minimal checkpoint dict for a model: its state_dict, cfg text and Darknet header values."""
    m = model.module if hasattr(model, 'module') else model
    return {'model': {k: v.detach().cpu() for k, v in m.state_dict().items()}, 'cfg': m.cfg_text,
            'version': [int(v) for v in m.version], 'seen': int(m.seen), **extra}


def _load_checkpoint_state(model: Darknet, ckpt: dict, source: str, verbose: bool = True) -> None:
    """Put a checkpoint's weights into model: all of them when they fit exactly, else the matching ones (printing
    `transferred X/Y`); none matching is an error. The Darknet header values come along."""
    own = model.state_dict()
    if set(own) == set(ckpt['model']) and all(own[k].shape == v.shape for k, v in ckpt['model'].items()):
        model.load_state_dict(ckpt['model'])
    elif transfer_weights(model, ckpt['model'], verbose)[0] == 0:
        raise CheckpointError(f"{source}: no tensor fits the model built from {model.cfg_path}")
    model.version = np.array(ckpt.get('version', model.version), dtype=np.int32)
    model.seen = int(ckpt.get('seen', model.seen))


def load_weights(model: Darknet, weights: str | Path, verbose: bool = True) -> None:
    """Load .pt (matching tensors transferred) or Darknet weights into an existing model."""
    weights = str(weights)
    if weights.endswith('.pt'):
        _load_checkpoint_state(model, load_checkpoint(weights), weights, verbose)
    else:
        load_darknet_weights(model, weights)


def load_model(weights: str | Path, cfg: str | Path | None = None, img_size: int | tuple[int, int] = 416,
               device: str | torch.device = 'cpu') -> Darknet:
    """Build a model from cfg (or, for .pt, the cfg saved in it) and load the weights; eval mode on `device`."""
    weights = str(weights)
    if weights.endswith('.pt'):
        ckpt = load_checkpoint(weights)
        model = Darknet(cfg if cfg else ckpt.get('cfg') or _missing_cfg(weights), img_size)
        _load_checkpoint_state(model, ckpt, weights)
    else:
        model = Darknet(cfg or DEFAULT_CFG, img_size)
        attempt_download(weights)
        load_darknet_weights(model, weights)
    return model.to(device).eval()


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
    """Download a missing official Darknet file to `path`; a bad download is deleted and reported."""
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
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

class _InferenceOnly(nn.Module):
    """Wraps an eval-mode Darknet so that export sees only inference_out."""

    def __init__(self, model: Darknet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def export_onnx(model: Darknet, path: str | Path, img_size: tuple[int, int], opset: int = 17) -> None:
    """Export the eval model's inference_out (1, N, 5 + nc) for a (1, 3, h, w) input to ONNX."""
    model.eval()
    x = torch.zeros(1, 3, *img_size)
    torch.onnx.export(_InferenceOnly(model), (x,), str(path), input_names=['images'], output_names=['output'],
                      opset_version=opset, dynamo=False)


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of `python models.py`."""
    p = argparse.ArgumentParser(description='Convert Darknet weights <-> .pt checkpoints, or export to ONNX.')
    p.add_argument('--cfg', type=str, default='cfg/yolov3-spp.cfg', help='model cfg file')
    p.add_argument('--weights', type=str, required=True, help='.weights or .pt file')
    p.add_argument('--convert', action='store_true', help='write the other format next to --weights')
    p.add_argument('--onnx', type=str, default='', help='export the inference model to this .onnx file')
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
        else:
            dst = src.with_suffix('.pt') if src.suffix == '.weights' else src.with_name(src.name + '.pt')
            save_checkpoint(model_checkpoint(model, epoch=-1), dst)
        print(f"Converted {src} -> {dst}")
    if opt.onnx:
        export_onnx(model, opt.onnx, img)
        print(f"Exported {opt.onnx} ({img[0]}x{img[1]}, output (1, N, {model.nc + 5}))")
    return 0


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    try:
        sys.exit(main(args))
    except (ConfigError, WeightsError, CheckpointError, FileNotFoundError) as err:
        sys.exit(f"Error: {err}")
