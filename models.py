"""The YOLO model: Darknet (built from a Darknet cfg), its [yolo] layer and the cfg builder; load_model for a model
with its weights loaded.

Elsewhere: Darknet .weights I/O in utils/darknet/weights.py, loading weights of other class counts (heads mapped by
class name) in utils/train/transfer.py, .pt checkpoints in utils/checkpoint.py, official downloads in utils/darknet/downloads.py,
conversion and ONNX export in utils/eval/export.py, which this file's command line runs:

    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.weights --convert   # -> .pt
    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.pt --convert        # -> .weights
    python models.py --weights weights/best.pt --convert        # a train.py checkpoint -> best.weights + best.cfg
    python models.py --cfg cfg/yolov3-tiny.cfg --weights weights/yolov3-tiny.weights --onnx yolov3-tiny.onnx [--dynamic]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from utils.checkpoint import CheckpointError, load_checkpoint
from utils.darknet.downloads import attempt_download
from utils.darknet.input_size import (  # noqa: F401  (re-exported)
    InputSizeError,
    input_size_error,
    meta_twin,
    takes_input,
)
from utils.darknet.layers import (
    SAM,
    GaussianYOLOLayer,
    MaxPoolDarknet,
    MaxPoolDepth,
    RegionLayer,
    Reorg3d,
    ReorgOld,
    Route,
    ScaleChannels,
    SharedConv,
    Shortcut,
    UpsampleDarknet,
    YOLOLayer,
    make_activation,
)
from utils.darknet.parse_config import (
    DEFAULT_CFG,
    ConfigError,
    parse_cfg_text,
    unused_keys,
)
from utils.darknet.weights import WeightsError
from utils.eval.export import export_size, get_args_parser, run
from utils.logs import LOGGER, setup_logging
from utils.torch_utils import count_parameters
from utils.train.transfer import load_checkpoint_weights, load_weights

# BN momentum as the original (0.03). eps differs on purpose: AlexeyAB's Darknet normalises by sqrt(var + 1e-5)
# (normalize_cpu, fuse_conv_batchnorm); the original's eps=1e-4 moves outputs visibly away from Darknet/OpenCV, and
# 1e-6 (pjreddie's sqrt(var) + 1e-6) is 1e-4 away from AlexeyAB's on Darknet-saved weights with small variances.
BN_MOMENTUM, BN_EPS = 0.03, 1e-5


class Darknet(nn.Module):
    """YOLO model built from a Darknet cfg (a path, or cfg text containing [net])."""

    def __init__(self, cfg: str | Path, img_size: int | tuple[int, int] = (416, 416), verbose: bool = False,
                 log_cfg: bool = True):
        super().__init__()
        if isinstance(cfg, str) and '[net]' in cfg or isinstance(cfg, str) and '\n' in cfg:
            self.cfg_path, self.cfg_text = '<cfg text>', cfg
        else:
            path = Path(cfg)
            if not path.is_file():
                raise ConfigError(f"{path}: cfg file not found")
            self.cfg_path, self.cfg_text = str(path), path.read_text(encoding='utf-8', errors='replace')
        warnings: list[str] = []
        defs = parse_cfg_text(self.cfg_text, self.cfg_path, warnings)
        if log_cfg:  # once per model build (meta-device twins and class-count probes pass log_cfg=False)
            for w in warnings:
                LOGGER.warning(w)
            unused = unused_keys(defs)
            if unused:
                LOGGER.info(f"{self.cfg_path}: cfg keys for Darknet's own training loop, not used here: " +
                            '; '.join(f"[{s}] {', '.join(k)}" for s, k in unused.items()))
        self.hyperparams = defs[0]
        self.module_defs = defs[1:]
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        built: list[str] = []  # warnings of the layer builders (a share_index that cannot be honoured)
        self.module_list, self.yolo_layers, reused, strides = create_modules(
            self.module_defs, self.cfg_path, self.hyperparams.get('channels', 3), built)
        # input sides that are multiples of this divide evenly through every layer (the deepest downsampling)
        self.max_stride = int(max((max(s) for s in strides), default=1))
        if log_cfg:
            for w in built:
                LOGGER.warning(w)
        self.reused = set(reused)
        # layers whose backward Darknet skips ([layer] onlyforward=1): no gradient flows through them
        self.onlyforward = {i for i, d in enumerate(self.module_defs) if d.get('onlyforward', 0)}
        self.stopbackward, self.frozen_bn = freeze_darknet_layers(self.module_defs, self.module_list)
        self.nc = self.module_list[self.yolo_layers[0]].nc if self.yolo_layers else 0  # classes of the [yolo] layers
        self.version = np.array([0, 2, 5], dtype=np.int32)  # Darknet header: major, minor, revision
        self.seen = 0  # images seen in training, as stored in .weights headers
        self.names: list[str] | None = None  # class names when known (saved in checkpoints), else None
        self.fused = False  # BatchNorm folded into the convolutions (fuse()): no training, no .weights writing
        if verbose:
            self.info(verbose=True)

    def forward(self, x: torch.Tensor, augment: bool = False):
        """Train mode: list of (B, na, ny, nx, no) maps. Eval: (inference_out (B, N, no), list of maps)."""
        if augment:
            return self._forward_augment(x)
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor):
        img_hw = x.shape[-2:]
        frozen_below = self.frozen_below() if self.training else -1
        if self.training and torch.is_grad_enabled():
            self.seen += x.shape[0]  # as Darknet's train_network: images seen (the .weights header, stopbackward=N)
        outputs: list[Any] = []
        yolo_io, yolo_p = [], []
        try:
            for i, module in enumerate(self.module_list):
                if isinstance(module, Route):
                    x = module(outputs)
                elif isinstance(module, (Shortcut, ScaleChannels, SAM)):
                    x = module(x, outputs)
                elif isinstance(module, YOLOLayer):
                    io, p = module(module.asff(outputs) if module.asff_layers else x, img_hw)
                    yolo_io.append(io)
                    yolo_p.append(p)
                else:
                    x = module(x)
                if i <= frozen_below or i in self.onlyforward and self.training:
                    x = x.detach()  # Darknet runs no backward here (stopbackward, onlyforward)
                outputs.append(x if i in self.reused else None)  # keep only what later layers read
        except RuntimeError as e:
            # torch names neither the layer nor a size that works ("Kernel size can't be greater than actual input
            # size", "Sizes of tensors must match"): say both when the input's size is the cause
            if x.is_meta or isinstance(e, torch.OutOfMemoryError):
                raise
            twin = meta_twin(self)
            if takes_input(self, tuple(img_hw), twin):
                raise
            raise input_size_error(self, i, tuple(img_hw), e, twin) from e
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

    def frozen_below(self) -> int:
        """The last layer that gets no gradient now (-1: none): Darknet's stopbackward. stopbackward=1 freezes for
        good; stopbackward=N > 1 only during Darknet's first N iterations of [net] batch images each (as Darknet's
        GPU training; its CPU build would freeze for good), counted by self.seen."""
        last = -1
        for i, n in self.stopbackward:
            if n == 1 or self.seen // max(1, int(self.hyperparams.get('batch', 1))) < n:
                last = max(last, i)
        return last

    def train(self, mode: bool = True) -> 'Darknet':
        """nn.Module.train, except that BatchNorm layers Darknet does not train (below stopbackward=1) stay in eval
        mode: Darknet builds them with train=0, so they normalise by their running statistics and never update."""
        super().train(mode)
        for i in self.frozen_bn:
            self.module_list[i].eval()
        return self

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
        from torch.utils.flop_counter import (
            FlopCounterMode,  # imported here: only the summary needs it
        )
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        twin = meta_twin(self)
        with torch.device('meta'), FlopCounterMode(display=False) as counter, torch.no_grad():
            twin(torch.zeros(1, int(self.hyperparams.get('channels', 3)), h, w))
        return counter.get_total_flops() / 1e9

    def info(self, verbose: bool = False, img_size: int | tuple[int, int] | None = None) -> str:
        """Log (and return) a summary: layers, parameters, gradients, GFLOPs at img_size; the layer table too when
        verbose."""
        if verbose:
            LOGGER.info(f"{'layer':>5} {'type':>15} {'params':>10}  shape")
            for i, (d, m) in enumerate(zip(self.module_defs, self.module_list)):
                n = sum(p.numel() for p in m.parameters())
                shape = list(m.Conv2d.weight.shape) if isinstance(m, nn.Sequential) else ''
                LOGGER.info(f"{i:>5} {d['type']:>15} {n:>10}  {shape}")
        size = img_size or self.img_size
        size = (size, size) if isinstance(size, int) else size
        n_p, n_g = count_parameters(self)
        try:
            gflops = f", {self.gflops(size):.1f} GFLOPs at {size[0]}x{size[1]}"
        except RuntimeError:  # a size the network cannot take (e.g. not a multiple of its stride)
            gflops = ''
        s = f"Model Summary: {len(self.module_list)} layers, {n_p:,} parameters, {n_g:,} gradients{gflops}"
        LOGGER.info(s)
        return s


def _conv_padding(mdef: dict) -> int:
    return mdef['size'] // 2 if mdef.get('pad', 0) else mdef.get('padding', 0)


def _stride2(mdef: dict) -> tuple[int, int]:
    s = mdef.get('stride', 1)
    return mdef.get('stride_y', s), mdef.get('stride_x', s)


# The original's bias prior for the convolution before each [yolo] layer (focal-loss paper, section 3.3): a fresh
# head predicts objectness sigmoid(-4.5) ~ 0.011 and class probabilities ~ 0.6 / nc instead of 0.5 everywhere.
OBJ_PRIOR = -4.5


def class_prior(nc: int) -> float:
    """The class-logit bias prior of a fresh head with nc classes: log(0.6 / (nc - 0.99)), the original's."""
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

    def __init__(self, module_defs: list[dict], cfg_name: str, in_channels: int, warnings: list[str]):
        self.defs, self.cfg_name, self.in_channels = module_defs, cfg_name, in_channels
        self.warnings = warnings  # what the builders could not honour, for the caller to log
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


def _require(b: _Builder, i: int, mdef: dict, *keys: str) -> None:
    """A ConfigError naming the line when layer i lacks one of keys (Darknet stops there too)."""
    for key in keys:
        if key not in mdef:
            raise b.error(i, f"has no {key!r} (required)")


def _source(b: _Builder, i: int, mdef: dict, key: str = 'from') -> int:
    """The absolute index of the one earlier layer `key` names (marked as read later)."""
    _require(b, i, mdef, key)
    j = b.absolute(i, [mdef[key]] if isinstance(mdef[key], int) else mdef[key][:1], key)[0]
    b.reused.add(j)
    return j


def _build_convolutional(b: _Builder, i: int, mdef: dict) -> Built:
    _require(b, i, mdef, 'filters', 'size')
    c_in, s_in = b.prev(i)
    filters, k, bn = mdef['filters'], mdef['size'], mdef.get('batch_normalize', 0)
    dilation = 1 if k == 1 else mdef.get('dilation', 1)  # Darknet ignores dilation for 1x1 kernels
    # Darknet pads a dilated convolution by pad * dilation (cuDNN's and im2col_dilated's), so it keeps the size
    stride, pad = _stride2(mdef), _conv_padding(mdef) * dilation
    act = mdef.get('activation', 'logistic')  # Darknet's default activation
    s_out = (s_in[0] * stride[0], s_in[1] * stride[1])
    if 'share_index' in mdef:
        j = b.absolute(i, [mdef['share_index']], 'share_index')[0]
        src = b.module_list[j]
        if isinstance(src, nn.Sequential) and hasattr(src, 'Conv2d') and \
                src.Conv2d.weight.shape == (filters, c_in, k, k) and hasattr(src, 'BatchNorm2d') == bool(bn):
            return SharedConv(src, j, stride, pad, act, dilation), filters, s_out
        # Darknet stops here ("... don't match for the share_layer"); we build a layer of its own
        b.warnings.append(f"{b.cfg_name}:{mdef['line']}: layer {i} share_index={mdef['share_index']} ignored: layer "
                          f"{j} is not a convolution of the same shape (Darknet rejects this cfg); layer {i} gets "
                          f"weights of its own")
    groups = mdef.get('groups', 1)
    if c_in % groups or filters % groups:
        raise b.error(i, f"groups={groups} does not divide {c_in} input / {filters} output channels")
    module = nn.Sequential()
    module.add_module('Conv2d', nn.Conv2d(c_in, filters, k, stride, pad, dilation=dilation, groups=groups,
                                          bias=not bn))
    if bn:
        module.add_module('BatchNorm2d', nn.BatchNorm2d(filters, momentum=BN_MOMENTUM, eps=BN_EPS))
    module.add_module('activation', make_activation(act))
    return module, filters, s_out


def _build_maxpool(b: _Builder, i: int, mdef: dict) -> Built:
    c_in, s_in = b.prev(i)
    if mdef.get('maxpool_depth', 0):  # a max across channel groups, not over space
        out_c = mdef.get('out_channels', 1)
        return MaxPoolDepth(out_c), out_c, s_in
    st = mdef.get('stride', 1)
    sy, sx = mdef.get('stride_y', st), mdef.get('stride_x', st)
    return MaxPoolDarknet(mdef.get('size', st), (sy, sx), mdef.get('padding')), c_in, (s_in[0] * sy, s_in[1] * sx)


def _build_avgpool(b: _Builder, i: int, mdef: dict) -> Built:
    return nn.AdaptiveAvgPool2d(1), *b.prev(i)


def _build_upsample(b: _Builder, i: int, mdef: dict) -> Built:
    c_in, s_in = b.prev(i)
    st = mdef.get('stride', 2)
    if st < 1:
        raise b.error(i, f"stride={st}: Darknet's reverse (downsampling) upsample is not supported")
    return UpsampleDarknet(st, mdef.get('scale', 1.0)), c_in, (s_in[0] / st, s_in[1] / st)


def _build_route(b: _Builder, i: int, mdef: dict) -> Built:
    _require(b, i, mdef, 'layers')
    layers = b.absolute(i, mdef['layers'], 'layers')
    groups, group_id = mdef.get('groups', 1), mdef.get('group_id', 0)
    if groups < 1 or not 0 <= group_id < groups or any(b.channels[j] % groups for j in layers):
        raise b.error(i, f"groups={groups}, group_id={group_id} do not split the channels "
                         f"{[b.channels[j] for j in layers]} of layers {layers}")
    b.reused.update(layers)
    return Route(layers, groups, group_id), sum(b.channels[j] for j in layers) // groups, b.strides[layers[0]]


def _build_shortcut(b: _Builder, i: int, mdef: dict) -> Built:
    _require(b, i, mdef, 'from')
    layers = b.absolute(i, mdef['from'], 'from')
    kind, norm = mdef.get('weights_type', 'none'), mdef.get('weights_normalization', 'none')
    kind = 'per_feature' if kind == 'per_layer' else kind  # Darknet's alias
    norm = 'relu' if norm == 'avg_relu' else norm
    if kind not in ('none', 'per_feature', 'per_channel'):
        raise b.error(i, f"weights_type={kind} is not one of none, per_feature, per_channel")
    if norm not in ('none', 'relu', 'softmax'):
        raise b.error(i, f"weights_normalization={norm} is not one of none, relu, softmax")
    b.reused.update(layers)
    c_in, s_in = b.prev(i)
    return Shortcut(layers, mdef.get('activation', 'linear'), kind, norm, c_in), c_in, s_in


def _no_swish_mish(b: _Builder, i: int, mdef: dict) -> str:
    act = mdef.get('activation', 'linear')
    if act in ('swish', 'mish', 'hard_mish') or act.startswith('normalize_channels'):
        raise b.error(i, f"activation={act}: Darknet's {mdef['type']} layer does not apply it (it says so and "
                         f"computes something else); use another activation")
    return act


def _build_scale_channels(b: _Builder, i: int, mdef: dict) -> Built:
    j = _source(b, i, mdef)
    c_in, _ = b.prev(i)
    scale_wh = bool(mdef.get('scale_wh', 0))
    if (c_in != 1) if scale_wh else (c_in != b.channels[j]):
        raise b.error(i, f"the previous layer gives {c_in} channels but layer {j} has {b.channels[j]}"
                         f"{' (scale_wh=1 needs 1)' if scale_wh else ''}")
    return ScaleChannels(j, scale_wh, _no_swish_mish(b, i, mdef)), b.channels[j], b.strides[j]


def _build_sam(b: _Builder, i: int, mdef: dict) -> Built:
    j = _source(b, i, mdef)
    c_in, s_in = b.prev(i)
    if c_in != b.channels[j]:
        raise b.error(i, f"the previous layer gives {c_in} channels but layer {j} has {b.channels[j]}")
    return SAM(j, _no_swish_mish(b, i, mdef)), c_in, s_in


def _build_reorg3d(b: _Builder, i: int, mdef: dict) -> Built:
    c_in, s_in = b.prev(i)
    st = mdef.get('stride', 2)
    return Reorg3d(st), c_in * st * st, (s_in[0] * st, s_in[1] * st)


def _build_reorg(b: _Builder, i: int, mdef: dict) -> Built:
    c_in, s_in = b.prev(i)
    st = mdef.get('stride', 1)  # Darknet's default
    if c_in % (st * st):
        raise b.error(i, f"stride={st}: {c_in} channels are not a multiple of stride^2")
    return ReorgOld(st), c_in * st * st, (s_in[0] * st, s_in[1] * st)


def _build_dropout(b: _Builder, i: int, mdef: dict) -> Built:
    return nn.Dropout(mdef.get('probability', 0.2)), *b.prev(i)  # Darknet's default probability


def _head_input(b: _Builder, i: int, src: int, expected: int, formula: str) -> None:
    """The layer feeding head i must be a convolution with `expected` filters (Darknet's check, named)."""
    if b.defs[src]['type'] != 'convolutional' or b.channels[src] != expected:
        raise ConfigError(
            f"{b.cfg_name}: layer {src} ([{b.defs[src]['type']}] at line {b.defs[src]['line']}) feeds "
            f"[{b.defs[i]['type']}] layer {i} with {b.channels[src]} filters, but {formula} = {expected}")


def _masked_anchors(b: _Builder, i: int, mdef: dict) -> list[tuple[float, float]]:
    """The anchors of a [yolo]-like layer's mask, as Darknet reads them (the first num pairs, 0.5 where missing)."""
    _require(b, i, mdef, 'anchors')
    num = mdef.get('num', len(mdef['anchors']))
    anchors = (list(mdef['anchors']) + [(0.5, 0.5)] * num)[:num]
    mask = mdef.get('mask', list(range(num)))
    if any(not 0 <= m < num for m in mask):  # Darknet reads past its num*2 biases there (undefined values)
        raise b.error(i, f"mask {mask} indexes outside its num={num} anchors (Darknet would read memory past its "
                         f"anchor array); set num= to the number of anchor pairs")
    return [anchors[m] for m in mask]


def _build_yolo(b: _Builder, i: int, mdef: dict) -> Built:
    _require(b, i, mdef, 'anchors', 'classes')  # no mask: every one of the num anchors, as Darknet
    anchors, nc = _masked_anchors(b, i, mdef), mdef['classes']
    asff = b.absolute(i, mdef['from'], 'from') if 'from' in mdef else []
    yi = len(b.yolo_layers)
    src = asff[yi] if asff else i - 1  # the convolution whose output this layer decodes
    extra = f' + {len(asff)} (len(from))' if asff else ''
    _head_input(b, i, src, (nc + 5) * len(anchors) + len(asff),
                f"(classes + 5) * len(mask){extra} = ({nc} + 5) * {len(anchors)}{extra}")
    stride = b.strides[src]
    module = YOLOLayer(anchors, nc, stride[1], yi, mdef.get('scale_x_y', 1.0), asff, mdef.get('new_coords', 0))
    head = b.module_list[src]
    if isinstance(head, nn.Sequential) and not module.new_coords:
        # a SharedConv head would move its source layer's bias; a new_coords head's outputs are logistic already,
        # where the prior's logit offsets would mean something else: both left alone
        add_bias_prior(head, module.na, nc)
    b.reused.update(asff)
    b.yolo_layers.append(i)
    return module, b.channels[src], stride


def _build_gaussian_yolo(b: _Builder, i: int, mdef: dict) -> Built:
    _require(b, i, mdef, 'anchors', 'classes')
    anchors, nc = _masked_anchors(b, i, mdef), mdef['classes']
    _head_input(b, i, i - 1, (nc + 9) * len(anchors), f"(classes + 9) * len(mask) = ({nc} + 9) * {len(anchors)}")
    stride = b.strides[i - 1]
    module = GaussianYOLOLayer(anchors, nc, stride[1], len(b.yolo_layers), mdef.get('scale_x_y', 1.0))
    b.yolo_layers.append(i)
    return module, b.channels[i - 1], stride


def _build_region(b: _Builder, i: int, mdef: dict) -> Built:
    _require(b, i, mdef, 'anchors', 'classes', 'num')
    num, nc = mdef['num'], mdef['classes']
    values = (list(mdef['anchors']) + [0.5] * 2 * num)[:2 * num]  # Darknet's biases default to 0.5
    anchors = [(values[2 * k], values[2 * k + 1]) for k in range(num)]
    _head_input(b, i, i - 1, (nc + 5) * num, f"(classes + 5) * num = ({nc} + 5) * {num}")
    stride = b.strides[i - 1]
    module = RegionLayer(anchors, nc, stride[1], len(b.yolo_layers), softmax=bool(mdef.get('softmax', 0)))
    b.yolo_layers.append(i)
    return module, b.channels[i - 1], stride


BUILDERS = {'convolutional': _build_convolutional, 'maxpool': _build_maxpool, 'avgpool': _build_avgpool,
            'upsample': _build_upsample, 'route': _build_route, 'shortcut': _build_shortcut,
            'scale_channels': _build_scale_channels, 'sam': _build_sam, 'reorg3d': _build_reorg3d,
            'reorg': _build_reorg, 'dropout': _build_dropout, 'yolo': _build_yolo,
            'gaussian_yolo': _build_gaussian_yolo, 'region': _build_region}


def create_modules(module_defs: list[dict], cfg_name: str = '<cfg>', in_channels: int = 3,
                   warnings: list[str] | None = None
                   ) -> tuple[nn.ModuleList, list[int], list[int], list[tuple[float, float]]]:
    """Build one module per cfg section (the [net] section excluded): (module_list, yolo indices, reused outputs,
    cumulative (sy, sx) downsampling of each layer's output).

    The convolution feeding each [yolo] layer starts with the original's bias prior (add_bias_prior). What a layer
    cannot honour as written is appended to warnings (when given) for the caller to log.
    """
    b = _Builder(module_defs, cfg_name, in_channels, [] if warnings is None else warnings)
    for i, mdef in enumerate(module_defs):
        if mdef['type'] not in BUILDERS:  # parse_config only lets supported sections through
            raise b.error(i, "is not implemented")
        module, c_out, s_out = BUILDERS[mdef['type']](b, i, mdef)
        b.module_list.append(module)
        b.channels.append(c_out)
        b.strides.append(s_out)
    return b.module_list, b.yolo_layers, sorted(b.reused), b.strides


def freeze_darknet_layers(module_defs: list[dict], module_list: nn.ModuleList
                          ) -> tuple[list[tuple[int, int]], list[int]]:
    """Apply the cfg's stopbackward / train_only_bn in place; return ([(layer, stopbackward value)], layers whose
    BatchNorm stays in eval mode).

    As Darknet (parse_network_cfg, network_kernels.cu): stopbackward=1 at layer k: layers 0..k get no gradient and
    no update (requires_grad off, so the optimizer leaves them out), and layers before k normalise with their running
    BN statistics; stopbackward=N > 1: no gradient to layers 0..k during the first N iterations (Darknet.forward).
    train_only_bn=1 at layer k: layers 0..k are not updated (requires_grad off) but their BN statistics still run.
    """
    stop = [(i, d['stopbackward']) for i, d in enumerate(module_defs) if d.get('stopbackward', 0)]
    permanent = max([i for i, n in stop if n == 1], default=-1)
    only_bn = max([i for i, d in enumerate(module_defs) if d.get('train_only_bn', 0)], default=-1)
    for i in range(max(permanent, only_bn) + 1):
        for p in module_list[i].parameters():
            p.requires_grad_(False)
    frozen_bn = [i for i in range(permanent) if isinstance(module_list[i], nn.Sequential) and
                 hasattr(module_list[i], 'BatchNorm2d')]
    return stop, frozen_bn


def scale_img(img: torch.Tensor, ratio: float, gs: int = 32) -> torch.Tensor:
    """Resize (B, 3, H, W) by ratio and pad right/bottom to a multiple of gs with grey (0.447)."""
    h, w = img.shape[-2:]
    s = (int(h * ratio), int(w * ratio))
    img = F.interpolate(img, size=s, mode='bilinear', align_corners=False)
    ph, pw = math.ceil(s[0] / gs) * gs, math.ceil(s[1] / gs) * gs
    return F.pad(img, [0, pw - s[1], 0, ph - s[0]], value=0.447)


# ----------------------------------------------------------------------------------------------------------------
# a model ready to use: built from its cfg, weights loaded (utils/train/transfer.py's rules)

def load_model(weights: str | Path, cfg: str | Path | None = None, img_size: int | tuple[int, int] = 416,
               device: str | torch.device = 'cpu', verbose: bool = True) -> Darknet:
    """Build a model from cfg (or, for .pt, the cfg saved in it), load the weights (load_weights' rules, class
    names from the checkpoint, COCO's for 80-class Darknet weights; model.names None when unknown); eval mode."""
    weights = str(weights)
    if weights.endswith('.pt'):
        ckpt = load_checkpoint(weights)
        if not (cfg or ckpt.get('cfg')):
            raise ConfigError(f"{weights}: no --cfg given and the file carries no cfg text; pass --cfg")
        model = Darknet(cfg or ckpt['cfg'], img_size)
        load_checkpoint_weights(model, ckpt, weights, verbose=verbose)
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
        LOGGER.info(f"{str(dtype).replace('torch.', '')} inference on {torch.device(device).type} "
                    f"(--half off for fp32)")
    return model


def main(opt: argparse.Namespace) -> int:
    """`python models.py`: load --weights (with --cfg) and convert, export or describe it (utils/eval/export.py)."""
    setup_logging()
    return run(opt, load_model(opt.weights, opt.cfg, export_size(opt)))


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    try:
        sys.exit(main(args))
    except (ConfigError, WeightsError, CheckpointError, FileNotFoundError) as err:
        sys.exit(f"Error: {err}")
