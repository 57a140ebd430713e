"""Darknet .cfg parsing: text -> list of typed section dicts, validated against the keys Darknet's parser.c reads.

Every key AlexeyAB/darknet's parser.c reads in a section is accepted and typed. Three kinds (SCHEMA):
- keys this project acts on (the network, the decode, the losses);
- keys that only steer Darknet's own training loop (TRAINING_ONLY): accepted, kept in the dicts, and listed once
  per model build as not used (Darknet's `[net] batch`, `subdivisions`, `[yolo] max`, ...);
- keys whose non-default value would change the computation in a way this port does not implement (REFUSED, e.g.
  binary `xnor` convolutions, `antialiasing`): accepted at Darknet's default value, otherwise a ConfigError naming
  the file, line, section and key.
A key given twice: the first wins, as Darknet's option_find (the later line is reported as a warning).
A key Darknet does not read is an error (a misspelling), except the few in DARKNET_IGNORES that Darknet itself only
reports as "Unused field" and that cfgs in its own cfg/ folder carry.
"""
from __future__ import annotations

import re
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


# the cfg a model is built from when none is given (the original's --cfg default): models.load_model, and the
# export cache's key in utils/eval/backends.py, which must not import torch
DEFAULT_CFG = Path(__file__).resolve().parents[2] / 'cfg' / 'yolov3-spp.cfg'
_NUMBER = re.compile(r'\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)')


def _atof(token: str) -> float:
    """C's atof: the number at the start of token (after blanks), 0 when there is none; the rest is ignored."""
    m = _NUMBER.match(token)
    return float(m.group(1)) if m else 0.0


def _anchor_values(v: str) -> list[float]:
    """Darknet's anchor list: its cfg reader deletes every blank of a line (strip() in utils.c), then reads one
    number per comma-separated item by atof: '61,45    61,45' reads 61, 4561, 45."""
    items = ''.join(v.split()).split(',')
    if items and not items[-1].strip():
        items = items[:-1]  # a trailing comma
    for t in items:
        if not _NUMBER.match(t):
            raise ValueError(f"{t.strip()!r} is not a number")
    return [_atof(t) for t in items]


def _anchors(v: str) -> list[tuple[float, float]]:
    """Anchor (w, h) pairs as Darknet reads them; an odd count leaves the last height at Darknet's default 0.5."""
    a = _anchor_values(v)
    if len(a) % 2:
        a.append(0.5)
    return [(a[i], a[i + 1]) for i in range(0, len(a), 2)]


Convert = Callable[[str], Any]


def _keys(conv: Convert, names: str) -> dict[str, Convert]:
    return {k: conv for k in names.split()}


# ---- [net]: parse_net_options. width/height/channels build the network; learning_rate scales --loss darknet.
_NET_USED = {**_keys(_int, 'width height channels'), 'learning_rate': _float}
_NET_TRAIN = {**_keys(_int, 'batch subdivisions max_batches time_steps track augment_speed sequential_subdivisions '
                             'try_fix_nan weights_reject_freq equidistant_point use_cuda_graph dynamic_minibatch '
                             'optimized_memory adam inputs max_crop min_crop flip blur gaussian_noise mixup cutmix '
                             'mosaic letter_box mosaic_bound contrastive contrastive_jit_flip contrastive_color '
                             'unsupervised attention burn_in sgdr_cycle sgdr_mult show_receptive_field step'),
              **_keys(_float, 'learning_rate_min momentum decay badlabels_rejection_percentage '
                              'num_sigmas_reject_badlabels ema_alpha loss_scale workspace_size_limit_MB B1 B2 eps '
                              'label_smooth_eps resize_step adversarial_lr max_chart_loss angle aspect saturation '
                              'exposure hue power gamma scale'),
              'policy': _str, 'steps': _ints, 'scales': _floats, 'seq_scales': _floats}

# ---- keys parse_network_cfg reads in every layer section
_LAYER_USED = {'stopbackward': _int, 'train_only_bn': _int, 'onlyforward': _int}
_LAYER_TRAIN = {'clip': _float, 'dont_update': _int, 'burnin_update': _int, 'learning_rate': _float}
_LAYER_REFUSED = {'dontload': (_int, 0, "(a layer whose weights are not in the .weights file) is not supported"),
                  'dontloadscales': (_int, 0, "(BN scales not in the .weights file) is not supported")}

# ---- [yolo] (parse_yolo) and [Gaussian_yolo] (parse_gaussian_yolo): decode and loss keys
_YOLO_USED = {'mask': _ints, 'anchors': _anchors, 'classes': _int, 'num': _int, 'scale_x_y': _float,
              'new_coords': _int, 'ignore_thresh': _float, 'truth_thresh': _float, 'iou_thresh': _float,
              'iou_normalizer': _float, 'obj_normalizer': _float, 'cls_normalizer': _float,
              'delta_normalizer': _float, 'iou_loss': _str, 'iou_thresh_kind': _str, 'max_delta': _float,
              'label_smooth_eps': _float, 'objectness_smooth': _int, 'focal_loss': _int, 'counters_per_class': _str,
              'random': _float, 'jitter': _float, 'resize': _float, 'nms_kind': _str, 'beta_nms': _float,
              'from': _ints}  # 'from': ultralytics' ASFF extension (yolov3-asff.cfg), not Darknet
_YOLO_TRAIN = {'max': _int, 'show_details': _int, 'track_history_size': _int, 'sim_thresh': _float,
               'dets_for_track': _int, 'dets_for_show': _int, 'track_ciou_norm': _float, 'embedding_layer': _int}
_MAP = {'map': (_str, None, "(a class map file, yolo9000) is out of scope")}
_GAUSSIAN_USED = {k: v for k, v in _YOLO_USED.items() if k not in ('new_coords', 'focal_loss', 'from')}
_GAUSSIAN_USED['uc_normalizer'] = _float

# ---- [region] (parse_region): YOLOv2's head
_REGION_USED = {'classes': _int, 'num': _int, 'anchors': _anchor_values, 'softmax': _int, 'jitter': _float,
                'rescore': _int, 'thresh': _float, 'absolute': _int, 'random': _float, 'coord_scale': _float,
                'object_scale': _float, 'noobject_scale': _float, 'class_scale': _float, 'mask_scale': _float,
                'bias_match': _int, 'log': _int, 'sqrt': _int, 'focal_loss': _int, 'resize': _float,
                'classfix': _int}
_REGION_REFUSED = {'coords': (_int, 4, "other than 4 (box coordinates) is not supported"),
                   'tree': (_str, None, "(yolo9000's hierarchical softmax tree) is out of scope"), **_MAP}

# Values are read as Darknet reads them: its cfg reader deletes every blank in a line ('filters = 2 55' is 255).
# Every section this port builds: (keys it acts on, training-loop keys it accepts and lists as not used,
# keys accepted only at Darknet's default: key -> (type, default, why another value is refused)).
SCHEMA: dict[str, tuple[dict[str, Convert], dict[str, Convert], dict[str, tuple[Convert, Any, str]]]] = {
    'net': (_NET_USED, _NET_TRAIN, {}),
    'convolutional': (
        {**_keys(_int, 'batch_normalize filters size stride stride_x stride_y pad padding groups dilation '
                       'share_index'), 'activation': _str},
        {**_keys(_int, 'grad_centr stream wait_stream bin_output'), 'dot': _float, 'angle': _float},
        {'antialiasing': (_int, 0, "(Darknet's blur before the stride) is not supported"),
         'xnor': (_int, 0, "(binary XNOR convolution) is out of scope"),
         'binary': (_int, 0, "(binary weights) is out of scope"),
         'cbn': (_int, 0, "(cross-iteration batch norm) is not supported"),
         'assisted_excitation': (_float, 0, "is not supported"),
         'sway': (_int, 0, "(deformable convolution) is not supported"),
         'rotate': (_int, 0, "(deformable convolution) is not supported"),
         'stretch': (_int, 0, "(deformable convolution) is not supported"),
         'stretch_sway': (_int, 0, "(deformable convolution) is not supported"),
         'flipped': (_int, 0, "is not supported"), 'reverse': (_float, 0, "is not supported"),
         'coordconv': (_int, 0, "is not supported")}),
    'maxpool': (_keys(_int, 'size stride stride_x stride_y padding maxpool_depth out_channels'), {},
                {'antialiasing': (_int, 0, "(Darknet's blur after the pooling) is not supported"),
                 'maxpool_zero_nonmax': (_int, 0, "is not supported")}),
    'avgpool': ({}, {}, {}),
    'upsample': ({'stride': _int, 'scale': _float}, {}, {}),
    'route': ({'layers': _ints, 'groups': _int, 'group_id': _int}, _keys(_int, 'stream wait_stream'), {}),
    'shortcut': ({'from': _ints, 'activation': _str, 'weights_type': _str, 'weights_normalization': _str}, {}, {}),
    'scale_channels': ({'from': _int, 'scale_wh': _int, 'activation': _str}, {}, {}),
    'sam': ({'from': _int, 'activation': _str}, {}, {}),
    'yolo': (_YOLO_USED, _YOLO_TRAIN, _MAP),
    'gaussian_yolo': (_GAUSSIAN_USED, {'max': _int},
                      {**_MAP, 'yolo_point': (_str, 'center', "other than center is not supported")}),
    'region': (_REGION_USED, {'max': _int}, _REGION_REFUSED),
    'dropout': ({'probability': _float}, {},
                {'dropblock': (_int, 0, "(DropBlock) is not supported"), 'dropblock_size_rel': (_float, 0, ''),
                 'dropblock_size_abs': (_float, 0, '')}),
    'reorg3d': ({'stride': _int}, {}, {'reverse': (_int, 0, "is not supported")}),
    'reorg': ({'stride': _int}, {}, {'reverse': (_int, 0, "is not supported")}),
}
for _name, (_used, _train, _refused) in SCHEMA.items():
    if _name != 'net':
        _used.update({k: v for k, v in _LAYER_USED.items() if k not in _used})
        _train.update({k: v for k, v in _LAYER_TRAIN.items() if k not in _used})
        _refused.update(_LAYER_REFUSED)

# keys each section accepts that only steer Darknet's training loop: listed once per model build as not used
TRAINING_ONLY: dict[str, frozenset[str]] = {s: frozenset(t) for s, (_, t, _) in SCHEMA.items()}

# keys Darknet does not read either (it prints "Unused field" and goes on) that cfgs of its own cfg/ folder carry
DARKNET_IGNORES = {'net': {'max_epochs'}, 'yolo': {'uc_normalizer', 'beta1'}}

SECTION_ALIASES = {'network': 'net', 'conv': 'convolutional', 'max': 'maxpool', 'avg': 'avgpool'}
# Darknet sections this port does not build: one-line error naming file, line and section
OUT_OF_SCOPE = {**{s: 'recurrent layers are out of scope' for s in ('crnn', 'rnn', 'gru', 'lstm', 'conv_lstm',
                                                                     'history')},
                'contrastive': 'the contrastive (self-supervised) layer is out of scope',
                **{s: 'is not supported' for s in (
                    'local', 'connected', 'conn', 'crop', 'cost', 'detection', 'softmax', 'soft', 'normalization',
                    'lrn', 'batchnorm', 'activation', 'implicit', 'empty', 'silence', 'local_avgpool',
                    'local_avg')}}

# Darknet's activations (activations.c get_activation); utils/darknet/layers.py computes each with Darknet's formula
ACTIVATIONS = ('logistic', 'loggy', 'relu', 'relu6', 'elu', 'selu', 'gelu', 'relie', 'ramp', 'linear', 'tanh',
               'plse', 'leaky', 'revleaky', 'stair', 'hardtan', 'lhtan', 'swish', 'mish', 'hard_mish',
               'normalize_channels', 'normalize_channels_softmax', 'normalize_channels_softmax_maxval')


def parse_cfg_text(text: str, path: str = '<cfg>', warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse Darknet cfg text into section dicts: {'type': 'convolutional', 'line': 12, 'filters': 32, ...}.

    A key given twice keeps its first value (Darknet's option_find); the later line goes to `warnings` if given.
    """
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
            if name in OUT_OF_SCOPE:
                raise ConfigError(f"{path}:{lineno}: section [{name}] {OUT_OF_SCOPE[name]}")
            if name not in SCHEMA:
                raise ConfigError(f"{path}:{lineno}: unknown section [{name}] "
                                  f"(supported: {', '.join('[%s]' % s for s in SCHEMA)})")
            sections.append({'type': name, 'line': lineno})
            continue
        if not sections:
            raise ConfigError(f"{path}:{lineno}: {raw.strip()!r} appears before any [section]")
        sec = sections[-1]
        where = f"{path}:{lineno}: [{sec['type']}] (section at line {sec['line']})"
        if '=' not in line:
            raise ConfigError(f"{where}: expected key=value, got {raw.strip()!r}")
        key, value = (''.join(s.split()) for s in line.split('=', 1))  # Darknet's strip(): no blanks anywhere
        used, train, refused = SCHEMA[sec['type']]
        if key in DARKNET_IGNORES.get(sec['type'], ()):
            if warnings is not None:
                warnings.append(f"{path}:{lineno}: {key}={value} in [{sec['type']}] is ignored (Darknet does not "
                                f"read it either)")
            continue
        convert = used.get(key) or train.get(key) or (refused[key][0] if key in refused else None)
        if convert is None:
            known = sorted({*used, *train, *refused})
            raise ConfigError(f"{where}: unknown key {key!r}; Darknet's keys here: {', '.join(known) or 'none'}")
        if key in sec:
            if warnings is not None:
                warnings.append(f"{path}:{lineno}: {key}={value} in [{sec['type']}] ignored: {key} is already set "
                                f"in this section (Darknet takes the first value)")
            continue
        try:
            sec[key] = convert(value)
        except ValueError as e:
            raise ConfigError(f"{where}: bad value for {key!r}: {value!r} ({e})") from None
        if key == 'anchors' and warnings is not None:
            if any(len(_NUMBER.findall(t)) > 1 for t in line.split('=', 1)[1].split(',')):
                warnings.append(f"{path}:{lineno}: anchors has two numbers with no comma between them: Darknet "
                                f"deletes the blanks and reads them as one number (as here), so later anchors shift")
            if len(_anchor_values(value)) % 2:
                warnings.append(f"{path}:{lineno}: anchors has an odd count of numbers: the last anchor's height is "
                                f"Darknet's default 0.5")
        if key in refused and sec[key] != refused[key][1]:
            raise ConfigError(f"{where}: {key}={value} {refused[key][2] or 'is not supported'}")
        if key == 'activation' and sec[key] not in ACTIVATIONS:
            raise ConfigError(f"{where}: unknown activation {sec[key]!r} (Darknet's: {', '.join(ACTIVATIONS)})")
    if not sections or sections[0]['type'] != 'net':
        raise ConfigError(f"{path}: a Darknet cfg must start with a [net] section")
    return sections


def unused_keys(sections: list[dict[str, Any]]) -> dict[str, list[str]]:
    """{section type: sorted keys} of the training-loop keys the cfg sets that this port does not use."""
    out: dict[str, set[str]] = {}
    for sec in sections:
        keys = TRAINING_ONLY[sec['type']].intersection(sec)
        if keys:
            out.setdefault(sec['type'], set()).update(keys)
    if any(sec.get('stopbackward', 0) > 1 for sec in sections):  # Darknet's iterations: images seen // [net] batch
        out.get('net', set()).discard('batch')
    return {s: sorted(k) for s, k in out.items() if k}


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
    """The cfg text with classes=nc in every detection head ([yolo], [Gaussian_yolo], [region]) and the matching
    filters= in the convolution before it ((nc + 5) * len(mask), plus len(from) for ASFF heads; (nc + 9) * len(mask)
    for [Gaussian_yolo]; (nc + 5) * num for [region]); every other line as it was."""
    changes: dict[int, dict[str, int]] = {}
    defs = parse_cfg_text(text, path)[1:]
    heads = [j for j, d in enumerate(defs) if d['type'] in ('yolo', 'gaussian_yolo', 'region')]
    for k, i in enumerate(heads):
        d = defs[i]
        frm = [r + i if r < 0 else r for r in d.get('from', [])]
        changes.setdefault(i, {})['classes'] = nc
        if d['type'] == 'region':
            filters = (nc + 5) * d['num']
        else:
            n = len(d['mask']) if 'mask' in d else d.get('num', 1)
            filters = (nc + (9 if d['type'] == 'gaussian_yolo' else 5)) * n + len(frm)
        changes.setdefault(frm[k] if frm else i - 1, {})['filters'] = filters
    return with_values(text, changes, path)
