"""Darknet .cfg parsing: text -> list of typed section dicts, validated against the keys this port supports."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A malformed or unsupported Darknet cfg; the message names the file, line, section and key."""


def _int(v: str) -> int:
    return int(v)


def _float(v: str) -> float:
    return float(v)


def _str(v: str) -> str:
    return v.strip()


def _ints(v: str) -> list[int]:
    return [int(x) for x in v.replace(' ', '').split(',') if x]


def _floats(v: str) -> list[float]:
    return [float(x) for x in v.replace(' ', '').split(',') if x]


def _anchors(v: str) -> list[tuple[float, float]]:
    a = _floats(v)
    if len(a) % 2:
        raise ValueError(f"anchors need width,height pairs but {len(a)} numbers were given")
    return [(a[i], a[i + 1]) for i in range(0, len(a), 2)]


# Darknet [net] keys: training settings for Darknet itself. Accepted (and typed) so that any cfg Darknet reads
# parses here; only width/height/channels and the training schedule keys are used by this port.
_NET = {k: _int for k in ('batch', 'subdivisions', 'width', 'height', 'channels', 'burn_in', 'max_batches',
                          'mosaic', 'cutmix', 'mixup', 'blur', 'flip', 'letter_box', 'min_crop', 'max_crop',
                          'aspect', 'adam', 'time_steps', 'track', 'augment_speed', 'sequential_subdivisions',
                          'try_fix_nan', 'optimized_memory', 'workspace_size_limit_MB', 'random', 'gaussian_noise',
                          'mosaic_bound', 'contrastive', 'unsupervised', 'label_smooth_eps')}
_NET.update({k: _float for k in ('momentum', 'decay', 'learning_rate', 'angle', 'saturation', 'exposure', 'hue',
                                 'power', 'gamma', 'step', 'B1', 'B2', 'eps', 'max_chart_loss', 'loss_scale',
                                 'learning_rate_min', 'sgdr_cycle', 'sgdr_mult', 'seq_scales', 'jitter')})
_NET.update({'policy': _str, 'steps': _ints, 'scales': _floats})

_YOLO = {'mask': _ints, 'anchors': _anchors, 'classes': _int, 'num': _int, 'jitter': _float, 'ignore_thresh': _float,
         'truth_thresh': _float, 'random': _float, 'scale_x_y': _float, 'iou_normalizer': _float,
         'cls_normalizer': _float, 'obj_normalizer': _float, 'iou_loss': _str, 'iou_thresh': _float,
         'nms_kind': _str, 'beta_nms': _float, 'resize': _float, 'max_delta': _float, 'label_smooth_eps': _float,
         'counters_per_class': _str, 'iou_thresh_kind': _str, 'new_coords': _int, 'objectness_smooth': _int,
         'focal_loss': _int, 'map': _str, 'show_details': _int,
         'from': _ints}  # 'from': ultralytics' ASFF extension (yolov3-asff.cfg), not Darknet

# Supported sections and, for each, its keys and how each value is typed.
SCHEMA: dict[str, dict[str, Callable[[str], Any]]] = {
    'net': _NET,
    'convolutional': {'batch_normalize': _int, 'filters': _int, 'size': _int, 'stride': _int, 'stride_x': _int,
                      'stride_y': _int, 'pad': _int, 'padding': _int, 'groups': _int, 'dilation': _int,
                      'activation': _str, 'share_index': _int},
    'maxpool': {'size': _int, 'stride': _int, 'stride_x': _int, 'stride_y': _int, 'padding': _int},
    'avgpool': {},
    'upsample': {'stride': _int},
    'route': {'layers': _ints, 'groups': _int, 'group_id': _int},
    'shortcut': {'from': _ints, 'activation': _str},
    'yolo': _YOLO,
    'dropout': {'probability': _float},
    'reorg3d': {'stride': _int},
}
SECTION_ALIASES = {'network': 'net', 'conv': 'convolutional', 'max': 'maxpool', 'avg': 'avgpool'}
ACTIVATIONS = ('linear', 'leaky', 'relu', 'mish', 'swish', 'logistic', 'relu6', 'tanh', 'elu', 'selu', 'gelu',
               'hardtan')


def parse_cfg_text(text: str, path: str = '<cfg>') -> list[dict[str, Any]]:
    """Parse Darknet cfg text into section dicts: {'type': 'convolutional', 'line': 12, 'filters': 32, ...}."""
    sections: list[dict[str, Any]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split('#', 1)[0].strip()
        if not line or line.startswith(';'):
            continue
        if line.startswith('['):
            if not line.endswith(']'):
                raise ConfigError(f"{path}:{lineno}: malformed section header {raw.strip()!r}")
            name = line[1:-1].strip().lower()
            name = SECTION_ALIASES.get(name, name)
            if name not in SCHEMA:
                raise ConfigError(f"{path}:{lineno}: unsupported section [{name}] "
                                  f"(supported: {', '.join('[%s]' % s for s in SCHEMA)})")
            sections.append({'type': name, 'line': lineno})
            continue
        if not sections:
            raise ConfigError(f"{path}:{lineno}: {raw.strip()!r} appears before any [section]")
        if '=' not in line:
            raise ConfigError(f"{path}:{lineno}: expected key=value in [{sections[-1]['type']}], got {raw.strip()!r}")
        key, value = (s.strip() for s in line.split('=', 1))
        sec = sections[-1]
        schema = SCHEMA[sec['type']]
        if key not in schema:
            raise ConfigError(f"{path}:{lineno}: unknown key {key!r} in [{sec['type']}] (section at line "
                              f"{sec['line']}); supported keys: {', '.join(sorted(schema)) or 'none'}")
        if key in sec:
            raise ConfigError(f"{path}:{lineno}: key {key!r} given twice in [{sec['type']}] at line {sec['line']}")
        try:
            sec[key] = schema[key](value)
        except ValueError as e:
            raise ConfigError(f"{path}:{lineno}: bad value for {key!r} in [{sec['type']}]: {value!r} ({e})") from None
        if key == 'activation' and sec[key] not in ACTIVATIONS:
            raise ConfigError(f"{path}:{lineno}: unsupported activation {sec[key]!r} in [{sec['type']}] "
                              f"(supported: {', '.join(ACTIVATIONS)})")
    if not sections or sections[0]['type'] != 'net':
        raise ConfigError(f"{path}: a Darknet cfg must start with a [net] section")
    return sections


def parse_model_cfg(path: str | Path) -> list[dict[str, Any]]:
    """Read and parse a Darknet cfg file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: cfg file not found")
    return parse_cfg_text(path.read_text(encoding='utf-8', errors='replace'), str(path))


def with_values(text: str, changes: dict[int, dict[str, Any]], path: str = '<cfg>') -> str:
    """cfg text with new values for keys of some layers: changes maps a layer index (0 = the first section after
    [net], as create_modules counts) to {key: value}. Only those values change; spacing, comments and line endings
    stay as they were. A key the layer does not set is a ConfigError naming the layer's line."""
    layers = parse_cfg_text(text, path)[1:]
    lines = text.splitlines(keepends=True)
    starts = [d['line'] for d in layers] + [len(lines) + 1]  # 1-based header line of each layer, then the end
    for i, values in changes.items():
        for key, value in values.items():
            for n in range(starts[i], starts[i + 1] - 1):  # 0-based indices of the lines after layer i's header
                body = lines[n].rstrip('\r\n')
                code = body.split('#', 1)[0]
                if '=' not in code or code.split('=', 1)[0].strip() != key:
                    continue
                eq = code.index('=') + 1
                start = eq + len(code[eq:]) - len(code[eq:].lstrip())  # first character of the value
                lines[n] = body[:start] + str(value) + body[len(code.rstrip()):] + lines[n][len(body):]
                break
            else:
                raise ConfigError(f"{path}:{layers[i]['line']}: layer {i} [{layers[i]['type']}] has no {key!r}")
    return ''.join(lines)


def cfg_with_classes(text: str, nc: int, path: str = '<cfg>') -> str:
    """The cfg text with classes=nc in every [yolo] section and the matching filters= in the convolution before it
    ((nc + 5) * len(mask), plus len(from) for ASFF heads); every other line as it was."""
    changes: dict[int, dict[str, int]] = {}
    defs = parse_cfg_text(text, path)[1:]
    for k, i in enumerate(j for j, d in enumerate(defs) if d['type'] == 'yolo'):
        d = defs[i]
        frm = [r + i if r < 0 else r for r in d.get('from', [])]
        changes.setdefault(i, {})['classes'] = nc
        changes.setdefault(frm[k] if frm else i - 1, {})['filters'] = (nc + 5) * len(d['mask']) + len(frm)
    return with_values(text, changes, path)
