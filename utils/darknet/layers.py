"""Darknet layer types that PyTorch lacks: Darknet's activations, maxpool, route, shortcut, scale_channels, sam, reorg,
reorg3d, upsample, shared convolutions, and the detection heads ([yolo], [Gaussian_yolo], [region])."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.boxes import decode_yolo_box


class DarknetActivation(nn.Module):
    """A Darknet activation torch has no exact twin for, by Darknet's formula (src/activations.h and .c)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def extra_repr(self) -> str:
        return self.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.name
        if n == 'loggy':
            return 2 * torch.sigmoid(x) - 1
        if n == 'relie':
            return torch.where(x > 0, x, 0.01 * x)
        if n == 'ramp':
            return F.relu(x) + 0.1 * x
        if n == 'elu':
            return torch.where(x >= 0, x, torch.exp(x) - 1)
        if n == 'selu':  # Darknet's rounded constants, not torch's SELU
            return torch.where(x >= 0, 1.0507 * x, 1.0507 * 1.6732 * (torch.exp(x) - 1))
        if n == 'gelu':  # Darknet's tanh approximation with its own constants
            return 0.5 * x * (1 + torch.tanh(0.797885 * x + 0.035677 * x ** 3))
        if n == 'plse':
            return torch.where(x < -4, 0.01 * (x + 4), torch.where(x > 4, 0.01 * (x - 4) + 1, 0.125 * x + 0.5))
        if n == 'lhtan':
            return torch.where(x < 0, 0.001 * x, torch.where(x > 1, 0.001 * (x - 1) + 1, x))
        if n == 'stair':
            f = torch.floor(x)
            half = torch.floor(x / 2)
            return torch.where(torch.remainder(f, 2) == 0, half, x - f + half)
        if n == 'hard_mish':
            return torch.where(x > 0, x, torch.where(x > -2, x * x / 2 + x, torch.zeros_like(x)))
        if n == 'normalize_channels':  # per pixel: positive values over their sum (+ 1e-4), the rest 0
            pos = F.relu(x)
            return pos / (pos.sum(1, keepdim=True) + 0.0001)
        if n in ('normalize_channels_softmax', 'normalize_channels_softmax_maxval'):
            m = x.amax(1, keepdim=True) if n.endswith('maxval') else torch.zeros_like(x[:, :1])
            e = torch.exp(x - m)
            return e / (e.sum(1, keepdim=True) + 0.0001)
        raise ValueError(f"unknown Darknet activation {n!r}")


def make_activation(name: str) -> nn.Module:
    """The nn.Module computing Darknet activation `name` (Darknet's formulas; torch's modules where they agree)."""
    if name in ('leaky', 'revleaky'):  # revleaky differs from leaky only in Darknet's backward
        return nn.LeakyReLU(0.1, inplace=True)  # Darknet's leaky slope
    if name == 'linear':
        return nn.Identity()
    simple = {'relu': nn.ReLU, 'mish': nn.Mish, 'swish': nn.SiLU, 'logistic': nn.Sigmoid, 'relu6': nn.ReLU6,
              'tanh': nn.Tanh, 'hardtan': nn.Hardtanh}  # mish: torch's softplus threshold is Darknet's 20
    return simple[name]() if name in simple else DarknetActivation(name)


class MaxPoolDarknet(nn.Module):
    """Darknet's maxpool: total padding `padding` (default size - 1), offset -padding/2, max over valid pixels only.

    The original port zero-pads the size-2/stride-1 maxpool of yolov3-tiny on the right and bottom; Darknet ignores
    out-of-image pixels instead, which matters where the border activations are negative (leaky outputs).
    """

    def __init__(self, size: int, stride: tuple[int, int], padding: int | None = None):
        super().__init__()
        self.size = size
        self.stride = stride  # (sy, sx)
        self.padding = size - 1 if padding is None else padding

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Output (h, w) for an (h, w) input, by Darknet's formula."""
        sy, sx = self.stride
        return (h + self.padding - self.size) // sy + 1, (w + self.padding - self.size) // sx + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        oh, ow = self.out_size(h, w)
        sy, sx = self.stride
        lo = self.padding // 2
        # pad so that exactly the Darknet windows fit; -inf never wins a max, so padded pixels are ignored
        pb = max(0, (oh - 1) * sy + self.size - h - lo)
        pr = max(0, (ow - 1) * sx + self.size - w - lo)
        if lo or pb or pr:
            x = F.pad(x, (lo, pr, lo, pb), value=float('-inf'))
        return F.max_pool2d(x, self.size, (sy, sx))


class Route(nn.Module):
    """Darknet [route]: concatenate layer outputs along channels, optionally taking channel group `group_id`."""

    def __init__(self, layers: list[int], groups: int = 1, group_id: int = 0):
        super().__init__()
        self.layers = layers  # absolute layer indices
        self.groups = groups
        self.group_id = group_id

    def forward(self, outputs: list) -> torch.Tensor:
        xs = [outputs[i] for i in self.layers]
        if self.groups > 1:
            xs = [x.chunk(self.groups, 1)[self.group_id] for x in xs]
        return xs[0] if len(xs) == 1 else torch.cat(xs, 1)


class Shortcut(nn.Module):
    """Darknet [shortcut]: add earlier layer outputs to the previous one (over the channels they share), optionally
    each input times a learned weight (weights_type per_feature: one per input; per_channel: one per input and
    channel), the weights normalised across the inputs by relu or softmax (shortcut_multilayer_cpu)."""

    def __init__(self, layers: list[int], activation: str = 'linear', weights_type: str = 'none',
                 weights_normalization: str = 'none', channels: int = 0):
        super().__init__()
        self.layers = layers  # absolute layer indices
        self.act = make_activation(activation)
        self.weights_type = weights_type
        self.weights_normalization = weights_normalization
        n = len(layers) + 1
        if weights_type == 'none':
            self.weight = None
        else:  # Darknet starts them at 1; the .weights file holds them in this (inputs, channels) order
            shape = (n, channels) if weights_type == 'per_channel' else (n, 1)
            self.weight = nn.Parameter(torch.ones(shape))

    def _weights(self) -> torch.Tensor:
        """(inputs, channels or 1) weights after Darknet's normalisation (eps 1e-4 in the denominator)."""
        w = self.weight
        if self.weights_normalization == 'relu':
            r = F.relu(w)
            return r / (r.sum(0, keepdim=True) + 0.0001)
        if self.weights_normalization == 'softmax':
            e = torch.exp(w - w.amax(0, keepdim=True))
            return e / (e.sum(0, keepdim=True) + 0.0001)
        return w

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        w = self._weights()[..., None, None] if self.weight is not None else None  # (inputs, C or 1, 1, 1)
        if w is not None:
            x = x * w[0]
        for k, i in enumerate(self.layers, 1):
            a = outputs[i] if w is None else outputs[i] * w[k][:outputs[i].shape[1]]
            if a.shape[1] == x.shape[1]:
                x = x + a
            else:  # Darknet adds over min(channels) and keeps the rest of the previous layer
                c = min(a.shape[1], x.shape[1])
                x = torch.cat((x[:, :c] + a[:, :c], x[:, c:]), 1)
        return self.act(x)


class ScaleChannels(nn.Module):
    """Darknet [scale_channels]: layer `from`'s output times the previous output, which is (B, C, 1, 1) per-channel
    scales, or with scale_wh (B, 1, H, W) per-position scales (scale_channels_layer.c)."""

    def __init__(self, source: int, scale_wh: bool = False, activation: str = 'linear'):
        super().__init__()
        self.source = source  # absolute layer index
        self.scale_wh = scale_wh
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        # Darknet indexes the scales by channel (i / (h*w)) or by position (i % (h*w)): a size-1 axis broadcasts
        return self.act(outputs[self.source] * x)


class SAM(nn.Module):
    """Darknet [sam] (spatial attention, sam_layer.c): the previous output times layer `from`'s, element-wise."""

    def __init__(self, source: int, activation: str = 'linear'):
        super().__init__()
        self.source = source  # absolute layer index
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        return self.act(x * outputs[self.source])


class MaxPoolDepth(nn.Module):
    """Darknet [maxpool] with maxpool_depth=1: output channel g is the max over input channels g, g + out_channels,
    g + 2 * out_channels, ... at each position (maxpool_layer.c); width and height unchanged."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.out_channels
        k = -(-c // g)  # channels per output channel, the last group padded with -inf
        if k * g != c:
            x = F.pad(x, (0, 0, 0, 0, 0, k * g - c), value=float('-inf'))
        return x.view(b, k, g, h, w).amax(1)


class UpsampleDarknet(nn.Module):
    """Darknet [upsample]: nearest-neighbour by an integer stride, times `scale` (default 1)."""

    def __init__(self, stride: int, scale: float = 1.0):
        super().__init__()
        self.stride = stride
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=self.stride, mode='nearest')
        return x * self.scale if self.scale != 1 else x


class ReorgOld(nn.Module):
    """Darknet's old [reorg] (reorg_old_layer.c, YOLOv2's passthrough): reorg_cpu(forward=0) reads its (C, H, W)
    input as a (C / s^2, H*s, W*s) array and writes output channel k = off * C / s^2 + c2 from row j*s + off // s,
    column i*s + off % s; the (C, H, W) result is then read as (C*s^2, H/s, W/s). Not a plain space-to-depth."""

    def __init__(self, stride: int = 2):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.stride
        c2 = c // (s * s)
        y = x.reshape(b, c2, h, s, w, s)  # the input memory as (c2, H*s, W*s): row j*s + dy, column i*s + dx
        y = y.permute(0, 3, 5, 1, 2, 4)  # (b, dy, dx, c2, H, W): channel (dy*s + dx)*c2 + c2 of a (C, H, W) array
        return y.reshape(b, c * s * s, h // s, w // s)


class Reorg3d(nn.Module):
    """Darknet [reorg3d] (reorg_layer.c, not reverse): space-to-depth with output channel = (dy*s + dx)*C + c."""

    def __init__(self, stride: int = 2):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.stride
        x = x.view(b, c, h // s, s, w // s, s)  # (b, c, y, dy, x, dx)
        return x.permute(0, 3, 5, 1, 2, 4).reshape(b, s * s * c, h // s, w // s)


class SharedConv(nn.Module):
    """A [convolutional] with `share_index`: Darknet reuses another layer's weights, biases and BN statistics
    (and reads/writes them only once in .weights files) with this layer's own stride, padding and activation."""

    def __init__(self, source: nn.Sequential, source_index: int, stride: tuple[int, int], padding: int,
                 activation: str, dilation: int = 1):
        super().__init__()
        self.__dict__['source'] = source  # not registered: the parameters belong to (and are saved with) the source
        self.source_index = source_index
        self.stride = stride
        self.padding = padding
        self.dilation = dilation  # this layer's own (trident: one set of weights at dilations 1, 2 and 3)
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.source.Conv2d
        x = F.conv2d(x, conv.weight, conv.bias, self.stride, self.padding, self.dilation, conv.groups)
        bn = getattr(self.source, 'BatchNorm2d', None)
        if bn is not None:
            x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                             self.training, bn.momentum, bn.eps)
        return self.act(x)


class YOLOLayer(nn.Module):
    """Darknet [yolo]: decodes a (B, na*no, ny, nx) map into boxes in input pixels.

    Rows of the decoded output: x, y, w, h (input pixels), objectness, class probabilities. With new_coords the
    map's values are already logistic (the head convolution's activation), so none is applied here, as Darknet.
    """

    kind = 'yolo'
    extra = 5  # box (4) + objectness (1) values before the classes

    def __init__(self, anchors: list[tuple[float, float]], nc: int, stride: float, index: int,
                 scale_x_y: float = 1.0, asff_layers: list[int] | None = None, new_coords: bool = False):
        super().__init__()
        self.register_buffer('anchors', torch.tensor(anchors, dtype=torch.float32))  # (na, 2) pixels
        self.na = len(anchors)
        self.nc = nc
        self.no = nc + self.extra
        self.stride = float(stride)
        self.index = index  # position among the model's [yolo] layers
        self.scale_x_y = scale_x_y
        self.new_coords = bool(new_coords)  # the map is already logistic: no sigmoid, wh = 4 t^2 anchors
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
        io = self.decode(p.float(), *self._grid(ny, nx, img_hw, p.device))
        return io.view(-1, self.na * ny * nx, io.shape[-1]), p

    def decode(self, pf: torch.Tensor, grid: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
        """Rows (B, na, ny, nx, 5 + nc) of x, y, w, h in pixels, objectness, class probabilities from the raw map."""
        # the one decode the losses use too (scale_x_y, new_coords), so training optimises these boxes
        xy, wh = decode_yolo_box(pf, self.anchors.view(1, self.na, 1, 1, 2), self.scale_x_y, grid,
                                 new_coords=self.new_coords)
        conf = pf[..., 4:] if self.new_coords else torch.sigmoid(pf[..., 4:])
        return torch.cat((xy * stride, wh, conf), -1)


class GaussianYOLOLayer(YOLOLayer):
    """Darknet [Gaussian_yolo] (gaussian_yolo_layer.c): per anchor x, σx, y, σy, w, σw, h, σh, objectness, classes.

    Boxes decode as [yolo] (x, y logistic with scale_x_y, w, h exp on the anchors); the four uncertainties are the
    logistic of the σ channels. Darknet's detection score is objectness * class * (1 - mean uncertainty): the rows'
    objectness column carries objectness * (1 - mean uncertainty), so NMS's objectness * class equals it. The raw map
    (B, na, ny, nx, 9 + nc) keeps the σ channels; uncertainties() gives them.
    """

    kind = 'gaussian_yolo'
    extra = 9

    def __init__(self, anchors: list[tuple[float, float]], nc: int, stride: float, index: int,
                 scale_x_y: float = 1.0):
        super().__init__(anchors, nc, stride, index, scale_x_y)

    @staticmethod
    def uncertainties(p: torch.Tensor) -> torch.Tensor:
        """(..., 4) uncertainties of x, y, w, h from a raw map (..., 9 + nc)."""
        return torch.sigmoid(p[..., 1:8:2])

    def decode(self, pf: torch.Tensor, grid: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
        box = pf[..., 0:8:2]  # (x, y, w, h) means
        xy, wh = decode_yolo_box(box, self.anchors.view(1, self.na, 1, 1, 2), self.scale_x_y, grid)
        obj = torch.sigmoid(pf[..., 8:9]) * (1 - self.uncertainties(pf).mean(-1, keepdim=True))
        return torch.cat((xy * stride, wh, obj, torch.sigmoid(pf[..., 9:])), -1)


class RegionLayer(YOLOLayer):
    """Darknet [region] (YOLOv2, region_layer.c get_region_boxes): x, y = cell + logistic(t); w, h = exp(t) times the
    anchors given in grid cells; objectness logistic; classes softmax (softmax=1) or as they are (softmax=0).

    Rows: x, y, w, h in input pixels, objectness, class probabilities (Darknet's score objectness * class is what NMS
    computes). `anchors` holds the anchors in input pixels (grid units times this layer's stride) for the rest of the
    pipeline; `anchors_grid` the cfg's values. A YOLOv2 head has no scale_x_y and uses every anchor (no mask).
    """

    kind = 'region'

    def __init__(self, anchors_grid: list[tuple[float, float]], nc: int, stride: float, index: int,
                 softmax: bool = True):
        super().__init__([(w * stride, h * stride) for w, h in anchors_grid], nc, stride, index)
        self.register_buffer('anchors_grid', torch.tensor(anchors_grid, dtype=torch.float32))  # (na, 2) cells
        self.softmax = bool(softmax)

    def decode(self, pf: torch.Tensor, grid: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
        xy = (torch.sigmoid(pf[..., :2]) + grid) * stride
        wh = torch.exp(pf[..., 2:4]) * self.anchors_grid.view(1, self.na, 1, 1, 2) * stride
        cls = torch.softmax(pf[..., 5:], -1) if self.softmax else pf[..., 5:]
        return torch.cat((xy, wh, torch.sigmoid(pf[..., 4:5]), cls), -1)
