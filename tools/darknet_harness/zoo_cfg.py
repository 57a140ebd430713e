"""Edits of a Darknet cfg's text for the zoo checks: input size, the network's largest stride, thinner layers.

Pure text in, text out (the cfg files themselves stay in ../shared/darknet-zoo). Sections are read the way Darknet's
read_cfg does: `[type]` starts a section, `key=value` lines belong to it, `#` and `;` lines are comments. Only the
values the edits need are interpreted; everything else is copied unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

HEADS = ('yolo', 'gaussian_yolo', 'region', 'detection')


@dataclass
class Section:
    """One cfg section: its type (lower case), header line index and {key: [line index, ...]} in file order."""
    type: str
    line: int
    keys: dict[str, list[int]] = field(default_factory=dict)


def sections(lines: list[str]) -> list[Section]:
    """The sections of a cfg's lines ([net] included), with where each key is."""
    out: list[Section] = []
    for n, raw in enumerate(lines):
        s = raw.strip()
        if not s or s[0] in '#;':
            continue
        if s.startswith('['):
            out.append(Section(s.strip('[]').strip().lower(), n))
        elif '=' in s and out:
            out[-1].keys.setdefault(s.split('=', 1)[0].strip(), []).append(n)
    return out


def value(lines: list[str], sec: Section, key: str, default: str | None = None) -> str | None:
    """A key's value as Darknet reads it: the first occurrence wins (option_find)."""
    if key not in sec.keys:
        return default
    return lines[sec.keys[key][0]].split('=', 1)[1].split('#')[0].strip()


def _set(lines: list[str], sec: Section, key: str, val: object) -> None:
    """Set every occurrence of key in sec to val (a key given twice keeps both lines, both changed)."""
    for n in sec.keys.get(key, []):
        lines[n] = f"{key}={val}"
    if key not in sec.keys:
        lines[sec.line] = f"{lines[sec.line]}\n{key}={val}"


def _layer_refs(spec: str, i: int) -> list[int]:
    return [i + int(v) if int(v) < 0 else int(v) for v in spec.split(',') if v.strip()]


def with_size(text: str, width: int, height: int) -> str:
    """The cfg with [net] width and height set (every occurrence, so Darknet and a last-wins reader agree)."""
    lines = text.splitlines()
    net = sections(lines)[0]
    if net.type not in ('net', 'network'):
        raise ValueError("the first section is not [net] or [network]")
    _set(lines, net, 'width', width)
    _set(lines, net, 'height', height)
    return '\n'.join(lines) + '\n'


def max_stride(text: str) -> int:
    """The largest downsampling of any layer's output relative to the input (32 for YOLOv3, 128 for P7 models)."""
    lines = text.splitlines()
    secs = sections(lines)[1:]
    strides: list[float] = []
    for i, sec in enumerate(secs):
        prev = strides[i - 1] if i else 1.0
        v = lambda k, d, sec=sec: value(lines, sec, k, d)
        if sec.type in ('convolutional', 'maxpool', 'local_avgpool'):
            s = int(v('stride', '1'))
            s = max(int(v('stride_x', s)), int(v('stride_y', s)))
            if sec.type != 'convolutional' and v('maxpool_depth', '0') != '0':
                s = 1
            strides.append(prev * s)
        elif sec.type in ('reorg', 'reorg3d'):
            strides.append(prev * int(v('stride', '2')))
        elif sec.type == 'upsample':
            s = int(v('stride', '2'))
            strides.append(prev / s if s > 0 else prev * -s)
        elif sec.type == 'route':
            strides.append(strides[_layer_refs(v('layers', '-1'), i)[0]])
        else:
            strides.append(prev)
    return int(max(strides + [1.0]))


def small_size(text: str) -> tuple[int, int]:
    """(width, height) for a quick check: multiples of the largest stride, about 160 x 128, width != height."""
    s = max_stride(text)
    return s * max(3, math.ceil(160 / s)), s * max(2, math.ceil(128 / s))


def head_filters(lines: list[str], head: Section, classes: int) -> int:
    """The filters the convolution before a head needs with `classes` classes."""
    v = lambda k, d: value(lines, head, k, d)
    if head.type == 'region':
        return int(v('num', '1')) * (classes + int(v('coords', '4')) + 1)
    n = len(v('mask', '').split(',')) if v('mask', '') else int(v('num', '1'))
    return n * (classes + (9 if head.type == 'gaussian_yolo' else 5))


def thinned(text: str, divisor: int, classes: int) -> str:
    """The cfg with every convolution's filters divided by `divisor` (rounded, at least 1; grouped convolutions keep
    groups that divide their channels) and every head set to `classes` classes: the same layers, kinds, shapes and
    heads, with a small fraction of the weights (for a committed fixture)."""
    lines = text.splitlines()
    secs = sections(lines)
    net, secs = secs[0], secs[1:]
    channels: list[int] = []  # output channels of each layer after thinning
    original: list[int] = []  # and before
    c0 = int(value(lines, net, 'channels', '3'))
    for i, sec in enumerate(secs):
        prev = channels[i - 1] if i else c0
        v = lambda k, d, sec=sec: value(lines, sec, k, d)
        original.append(_channels(lines, sec, i, original, c0))
        if sec.type == 'convolutional':
            nxt = secs[i + 1] if i + 1 < len(secs) else None
            if nxt is not None and nxt.type in HEADS:
                f = head_filters(lines, nxt, classes)
            else:
                f = max(1, round(int(v('filters', '1')) / divisor))
                if nxt is not None and nxt.type in ('reorg', 'reorg3d'):  # Darknet's reorg needs c % stride^2 == 0
                    s2 = int(value(lines, nxt, 'stride', '2')) ** 2
                    f = -(-f // s2) * s2
            _set(lines, sec, 'filters', f)
            g = int(v('groups', '1'))
            if g > 1:  # depthwise stays depthwise; other groups shrink to a common divisor of the new channels
                depthwise = g == (original[i - 1] if i else c0)
                _set(lines, sec, 'groups', prev if depthwise else math.gcd(math.gcd(prev, f), g))
            channels.append(f)
        else:
            if sec.type in HEADS:
                _set(lines, sec, 'classes', classes)
            channels.append(_channels(lines, sec, i, channels, c0))
    return '\n'.join(lines) + '\n'


def _channels(lines: list[str], sec: Section, i: int, channels: list[int], c0: int) -> int:
    """Output channels of layer i given the earlier layers' channels."""
    prev = channels[i - 1] if i else c0
    v = lambda k, d, sec=sec: value(lines, sec, k, d)
    if sec.type == 'convolutional':
        return int(v('filters', '1'))
    if sec.type == 'route':
        return sum(channels[r] for r in _layer_refs(v('layers', '-1'), i)) // int(v('groups', '1'))
    if sec.type in ('reorg', 'reorg3d'):
        s = int(v('stride', '2'))
        return prev * s * s if v('reverse', '0') == '0' else prev // (s * s)
    return prev
