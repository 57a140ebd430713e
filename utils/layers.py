"""Darknet layer types that PyTorch lacks: Darknet-exact maxpool, route, shortcut, reorg3d, shared convolutions."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_activation(name: str) -> nn.Module:
    """The nn.Module computing Darknet activation `name`."""
    if name == 'leaky':
        return nn.LeakyReLU(0.1, inplace=True)  # Darknet's leaky slope
    if name == 'linear':
        return nn.Identity()
    return {'relu': nn.ReLU, 'mish': nn.Mish, 'swish': nn.SiLU, 'logistic': nn.Sigmoid, 'relu6': nn.ReLU6,
            'tanh': nn.Tanh, 'elu': nn.ELU, 'selu': nn.SELU, 'gelu': nn.GELU, 'hardtan': nn.Hardtanh}[name]()


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
    """Darknet [shortcut]: add earlier layer outputs to the previous one (over the channels they share)."""

    def __init__(self, layers: list[int], activation: str = 'linear'):
        super().__init__()
        self.layers = layers  # absolute layer indices
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        for i in self.layers:
            a = outputs[i]
            if a.shape[1] == x.shape[1]:
                x = x + a
            else:  # Darknet adds over min(channels) and keeps the rest of the previous layer
                c = min(a.shape[1], x.shape[1])
                x = torch.cat((x[:, :c] + a[:, :c], x[:, c:]), 1)
        return self.act(x)


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
                 activation: str):
        super().__init__()
        self.__dict__['source'] = source  # not registered: the parameters belong to (and are saved with) the source
        self.source_index = source_index
        self.stride = stride
        self.padding = padding
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.source.Conv2d
        x = F.conv2d(x, conv.weight, conv.bias, self.stride, self.padding, conv.dilation, conv.groups)
        bn = getattr(self.source, 'BatchNorm2d', None)
        if bn is not None:
            x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                             self.training, bn.momentum, bn.eps)
        return self.act(x)
