"""Weights into a Darknet model: exact loads, transfer to the same network with other classes, heads mapped by name.

Weights of the same network with another class count load everything but the output convolutions before the [yolo]
layers. Those are mapped by class name when the model's class names are given, mapping is on and the source has
names: box and objectness rows as they are, each known class from its source class, unknown ones fresh (with the
bias prior). Otherwise they stay fresh. The model is used by duck typing (state_dict, module_list, yolo_layers,
head_convs, cfg_text, cfg_path, nc, names, version, seen); twins are built as type(model)(cfg): nothing here needs
the top-level models.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from utils.checkpoint import CheckpointError, load_checkpoint
from utils.darknet.parse_config import cfg_with_classes
from utils.darknet.weights import (
    WeightsError,
    cutoff_from_name,
    darknet_source_classes,
    darknet_value_count,
    fill_from_values,
    misfit_error,
    read_darknet_file,
)
from utils.data.config import coco_names
from utils.logs import LOGGER


class _Source:
    """Weights to put into a model: a state_dict, its class names (None with the reason when unknown), header."""

    def __init__(self, label: str, state: dict[str, torch.Tensor], names: list[str] | None, no_names: str,
                 version: Any, seen: int, layers: int = -1):
        self.label, self.state, self.names, self.no_names = label, state, names, no_names
        self.version, self.seen = np.array(version, dtype=np.int32), int(seen)
        self.layers = layers  # only layers below this index come from the source (partial Darknet files); -1: all


@dataclass
class _HeadPlan:
    """What happens to the output convolutions before the [yolo] layers."""
    src_nc: dict[int, int]  # head conv index -> the source's class count there (heads the source holds for this input)
    why_off: str  # why the heads are not mapped by class name ('' where they could be)
    cls_src: list[int | None] | None = None  # mapping: per model class its source class (None: new); else None
    fresh: list[int] = field(default_factory=list)  # heads left fresh: another class count and no mapping

    @property
    def mapping(self) -> bool:
        """True when the heads are built row by row from the source's class rows."""
        return self.cls_src is not None


def _layer_of(key: str) -> int:
    """Layer index of a Darknet state_dict key: 'module_list.15.Conv2d.weight' -> 15 (-1 for other keys)."""
    parts = key.split('.')
    return int(parts[1]) if len(parts) > 2 and parts[0] == 'module_list' and parts[1].isdigit() else -1


def _foreign_error(model: nn.Module, src: _Source, src_nc: dict[int, int]) -> WeightsError | None:
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


def _check_names(names: list[str], model: nn.Module) -> list[str]:
    """The model's class names as strings; duplicates or a count other than the model's are a ValueError."""
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


def _source_classes(model: nn.Module, state: dict) -> dict[int, int]:
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
        if rows > y.extra * y.na and rows % y.na == 0:  # extra: 5 values before the classes, 9 for Gaussian heads
            out[j] = rows // y.na - y.extra
    return out


def _plan_heads(model: nn.Module, src: _Source, names: list[str] | None, map_classes: bool) -> _HeadPlan:
    """Map the heads by class name where names are known on both sides and differ (in order or count), else leave
    heads of another class count fresh; a source of other classes carrying names of another count is not mapped."""
    src_nc = _source_classes(model, src.state)
    why_off = _mapping_off(src, names, map_classes)
    if not why_off and any(len(src.names) != n for n in src_nc.values()):
        why_off = f"{src.label} has {len(src.names)} class names for {sorted(set(src_nc.values()))} classes"
    plan = _HeadPlan(src_nc, why_off)
    if src_nc and not why_off and (names != src.names or any(n != model.nc for n in src_nc.values())):
        plan.cls_src = [src.names.index(n) if n in src.names else None for n in names]
    else:
        plan.fresh = [j for j, n in src_nc.items() if n != model.nc]
    return plan


def _whole_tensors(model: nn.Module, src: _Source, skip: set[int]) -> dict[str, torch.Tensor]:
    """Source tensors of the same name and shape as the model's, in the source's layers and not in `skip`."""
    state = {}
    for k, v in model.state_dict().items():
        s, j = src.state.get(k), _layer_of(k)
        if s is None or (src.layers >= 0 and j >= src.layers) or j in skip:
            continue
        if s.shape == v.shape:
            state[k] = s
    return state


def _row_pairs(y: nn.Module, nc_src: int, cls_src: list[int | None]) -> tuple[list[int], list[int]]:
    """(rows of a new head, source rows they copy) for [yolo] layer y: every anchor's box and objectness rows, the
    class rows whose source class is known (cls_src[c]; None keeps the fresh row), then the ASFF weight rows."""
    e = y.extra  # box and objectness values before the classes: 5 ([yolo], [region]), 9 ([Gaussian_yolo])
    no, no_src = y.nc + e, nc_src + e
    dst, src = [], []
    for a in range(y.na):  # rows are anchor-major: (na, e + nc)
        dst += [a * no + f for f in range(e)]
        src += [a * no_src + f for f in range(e)]
        for c, s in enumerate(cls_src):
            if s is not None:
                dst.append(a * no + e + c)
                src.append(a * no_src + e + s)
    n = len(y.asff_layers)
    return dst + [y.na * no + k for k in range(n)], src + [y.na * no_src + k for k in range(n)]


def _mapped_state(model: nn.Module, src: _Source, plan: _HeadPlan) -> dict[str, torch.Tensor]:
    """Head tensors built row by row: fresh rows of the model (bias prior included) overwritten by source rows."""
    own, out = model.state_dict(), {}
    yolo_of = dict(zip(model.head_convs(), (model.module_list[i] for i in model.yolo_layers)))
    for k, v in own.items():
        j = _layer_of(k)
        if j not in plan.src_nc or k not in src.state:
            continue
        s = src.state[k]
        dst_rows, src_rows = _row_pairs(yolo_of[j], plan.src_nc[j], plan.cls_src)
        if v.dim() and s.dim() and v.shape[1:] == s.shape[1:]:  # per-row tensors: conv weight, bias, BN vectors
            t = v.detach().clone()
            t[dst_rows] = s[src_rows].to(t)
            out[k] = t
        elif s.shape == v.shape:  # e.g. BN num_batches_tracked
            out[k] = s
    return out


def _names_after(model: nn.Module, src: _Source, names: list[str] | None, plan: _HeadPlan) -> list[str] | None:
    """The model's class names after the load: those given, else the source's where every head came from the source
    as it was (same class count, none fresh), else None."""
    if names is not None:
        return list(names)
    whole = plan.src_nc and not plan.fresh and all(n == model.nc for n in plan.src_nc.values())
    return list(src.names) if whole and src.names and len(src.names) == model.nc else None


def _put_state(model: nn.Module, src: _Source, names: list[str] | None, map_classes: bool, verbose: bool) -> None:
    """Put a source's weights into the model: tensors of the same name and shape as they are; heads of the same
    network with other classes mapped by class name (or left fresh, with the bias prior); log what was done."""
    plan = _plan_heads(model, src, names, map_classes)
    if (err := _foreign_error(model, src, plan.src_nc)) is not None:
        raise err
    state = _whole_tensors(model, src, skip=set(plan.src_nc) if plan.mapping else set())
    n_whole = len(state)
    if plan.mapping:
        state.update(_mapped_state(model, src, plan))
    if not state:
        raise WeightsError(f"{src.label}: no tensor fits the model built from {model.cfg_path}")
    model.load_state_dict(state, strict=False)
    model.version, model.seen = src.version, src.seen
    model.names = _names_after(model, src, names, plan)
    if verbose:
        _report(model, src, plan, n_whole, names)


def _report(model: nn.Module, src: _Source, plan: _HeadPlan, n_whole: int, names: list[str] | None) -> None:
    """Log the transfer (items loaded whole, heads re-initialised or mapped, one line per mapped class) when it
    was not a whole load, and why mapping was off where it would have mattered."""
    n_own = len(model.state_dict())
    if n_whole < n_own or plan.mapping:
        LOGGER.info(f"transferred {n_whole}/{n_own} items from {src.label}")
        heads = sorted(plan.src_nc) if plan.mapping else plan.fresh
        if heads:
            sd = model.state_dict()
            rows = sorted({(src.state[f'module_list.{j}.Conv2d.weight'].shape[0],
                            sd[f'module_list.{j}.Conv2d.weight'].shape[0]) for j in heads})
            filters = ', '.join(f'{a} -> {b}' for a, b in rows)
            classes = f"{'/'.join(str(n) for n in sorted({plan.src_nc[j] for j in heads}))} -> {model.nc} classes"
            what = 'mapped by class name' if plan.mapping else 're-initialised'
            LOGGER.info(f"{len(heads)} output convolution{'s' * (len(heads) > 1)} {what}: {filters} filters "
                        f"({classes})")
        if plan.mapping:
            LOGGER.info('box and objectness rows copied; class rows:')
            for name, s in zip(model.names, plan.cls_src):
                LOGGER.info(f"  {name} <- {'(new)' if s is None else f'{src.names[s]} ({s})'}")
    matters = src.names is None or names != src.names or any(n != model.nc for n in plan.src_nc.values())
    if names is not None and plan.src_nc and plan.why_off and matters:
        LOGGER.info(f"class mapping off: {plan.why_off}")


def _darknet_source(model: nn.Module, path: str, names: list[str] | None, map_classes: bool,
                    verbose: bool) -> _Source | None:
    """Read a Darknet file: straight into the model when it fits and no mapping is asked for (None returned), else
    into a twin of the model built with the file's class count (inferred from its size), returned as a _Source."""
    version, seen, values = read_darknet_file(path)
    cutoff = cutoff_from_name(path)
    nc_src = model.nc if values.size == darknet_value_count(model, cutoff) else \
        darknet_source_classes(model, values.size, cutoff)
    if nc_src is None:
        raise misfit_error(model, path, values.size, cutoff)
    coco = coco_names() if nc_src == 80 and cutoff < 0 else None  # partial files hold no heads: nothing to map
    no_names = ('data/coco.names is missing' if nc_src == 80 and cutoff < 0 else
                f'only 80-class Darknet weights are taken as COCO\'s; this file has {nc_src} classes'
                if cutoff < 0 else f'a partial file of the first {cutoff} layers')
    src = _Source(path, {}, coco, no_names, version, seen, cutoff)
    if nc_src == model.nc and (names is None or _mapping_off(src, names, map_classes) or names == coco):
        fill_from_values(model, values, cutoff, path)
        model.version, model.seen = version, seen
        model.names = list(names) if names is not None else coco
        why_off = _mapping_off(src, names, map_classes)
        if verbose and names is not None and why_off and cutoff < 0 and names != coco:
            LOGGER.info(f"class mapping off: {why_off}; {path} loaded as it is")
        return None
    if verbose and nc_src != model.nc:
        LOGGER.info(f"{path}: Darknet weights of this network with {nc_src} classes ({model.cfg_path} has "
                    f"{model.nc})")
    twin = type(model)(cfg_with_classes(model.cfg_text, nc_src, model.cfg_path) if nc_src != model.nc
                       else model.cfg_text, log_cfg=False)
    fill_from_values(twin, values, cutoff, path)
    src.state = twin.state_dict()
    return src


def _checkpoint_source(ckpt: dict, label: str) -> _Source:
    """A .pt checkpoint's model state with its class names when it carries valid ones."""
    names = ckpt.get('names')
    ok = isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
    return _Source(label, ckpt['model'], list(names) if ok else None, 'a checkpoint saved without them',
                   ckpt.get('version', [0, 2, 5]), ckpt.get('seen', 0))


def load_checkpoint_weights(model: nn.Module, ckpt: dict, label: str, names: list[str] | None = None,
                            map_classes: bool = False, verbose: bool = True) -> None:
    """Put a loaded .pt checkpoint's model into the model by load_weights' rules; a misfit is a CheckpointError."""
    try:
        _put_state(model, _checkpoint_source(ckpt, label), names, map_classes, verbose)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None


def load_weights(model: nn.Module, weights: str | Path, names: list[str] | None = None, map_classes: bool = True,
                 verbose: bool = True) -> None:
    """Load a .pt checkpoint or Darknet weights into the model, transferring what fits, and set model.names.

    Weights of the same network with another class count load everything but the output convolutions before the
    [yolo] layers; those are mapped by class name when `names` (the model's classes) are given, map_classes is on
    and the source has names (box and objectness rows as they are, known classes from their source class, unknown
    ones fresh), else left fresh with the bias prior. Logs what it did when verbose.
    """
    weights = str(weights)
    names = _check_names(names, model) if names is not None else None
    if weights.endswith('.pt'):
        load_checkpoint_weights(model, load_checkpoint(weights), weights, names, map_classes, verbose)
        return
    src = _darknet_source(model, weights, names, map_classes, verbose)
    if src is not None:  # else loaded as it is
        _put_state(model, src, names, map_classes, verbose)
