"""Run the original ultralytics/yolov3 archive code (mid-2020) unmodified under today's numpy and torch.

The original was written for numpy 1.17-1.18 and torch 1.5; a few names it uses have since been removed. `install()`
puts them back for the current process (and for DataLoader workers forked from it) without touching its files:

- numpy: `np.int`, `np.float`, `np.bool`, `np.object`, `np.str` (removed in numpy 1.24) and `np.trapz` (removed in 2.0)
  as aliases of what they meant then (`int`, `float`, ..., `np.trapezoid`);
- torch: `torch.load` defaults to `weights_only=False` as in torch < 2.6, because the original loads its own
  checkpoints and label files with it (only files this benchmark just wrote; never use this shim on untrusted files);
  `torch.cuda.memory_cached` (removed) points at `memory_reserved`;
- matplotlib: the non-interactive Agg backend, so plotting works without a display, and the default colour cycle
  as '#rrggbb' strings (matplotlib 3.11 stores RGB tuples; the original parses hex strings in plot_images);
- warnings the old code triggers on every batch (meshgrid indexing, pin_memory without a GPU) are silenced so the
  benchmark log stays readable; they do not change what runs.

Three things cannot be done from outside, so `apply_patches(copy)` changes a temporary copy of the checkout (PATCHES
lists each change with its reason; the checkout's own files, e.g. a plain `git clone -b archive`, are never edited):
- the archive head (Nov 2020, after the grid-overflow fix #1551) clamps the long grid indices in build_targets with
  0-dim float tensors as bounds (`gj.clamp_(0, gain[3] - 1)`), which torch 1.6 accepted and torch 2 refuses ("result
  type Float can't be cast to the desired output type long int"); the patch passes the same bounds as ints. Archive
  commits before that fix do not have the line, and the patch is then skipped;
- numpy 2 refuses to turn a 1-element array into a float, which the original test.py does in mAP@0.5-only runs (its
  per-class table and `maps[c] = ap[i]`); the patch squeezes those (classes, 1) arrays to (classes,), so the printed
  and returned numbers are the ones numpy 1.17 produced;
- the yolov3-tiny size-2/stride-1 maxpool is padded the Darknet way instead of with zeros, as the reference figures
  of ../shared/README.md were measured (with it the original reproduces ../shared/fixtures/loss_parity_tiny320.pt
  to 1e-6; with zero padding the losses differ by up to 1.3%). The cost of the two paddings is the same.

Used by benchmarks/bench.py (`--repo /path/to/original`); `python -c "import compat_original; ..."` also works from a
folder that has this file on sys.path. Set YOLO_BENCH_COMPAT=1 and put a folder holding a `sitecustomize.py` that
calls `install()` first on PYTHONPATH to apply it to a subprocess you do not control (bench.py does that for the
loader benchmark).
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import NamedTuple

_INSTALLED = False

# numpy names removed since 2020 -> the builtin (or function) they meant at the time
_NUMPY_ALIASES = {'int': int, 'float': float, 'bool': bool, 'object': object, 'str': str, 'complex': complex}


class Patch(NamedTuple):
    """One text replacement in a temporary copy of the original."""
    file: str  # relative to the checkout
    old: str  # text of the original, found exactly once
    new: str  # its replacement
    why: str
    required: bool = True  # False: skipped where the text is absent (a change only some archive commits have)


# applied to a temporary copy only
PATCHES = [
    Patch('test.py',
          "            p, r, ap, f1 = p[:, 0], r[:, 0], ap.mean(1), ap[:, 0]  # [P, R, AP@0.5:0.95, AP@0.5]\n",
          "            p, r, ap, f1 = p[:, 0], r[:, 0], ap.mean(1), ap[:, 0]  # [P, R, AP@0.5:0.95, AP@0.5]\n"
          "        else:  # compat_original: numpy 2 will not convert the (nc, 1) arrays to scalars below\n"
          "            p, r, ap, f1 = p[:, 0], r[:, 0], ap[:, 0], f1[:, 0]\n",
          'numpy >= 2 raises on float(array of shape (1,)) in the per-class print and in maps[c] = ap[i]'),
    Patch('models.py',
          "                modules.add_module('ZeroPad2d', nn.ZeroPad2d((0, 1, 0, 1)))\n",
          "                modules.add_module('ZeroPad2d', nn.ReplicationPad2d((0, 1, 0, 1)))  # compat_original\n",
          'size-2/stride-1 maxpool padded the Darknet way (the max ignores the padding; replicating the edge is the '
          'same), as in the reference figures of ../shared/README.md and the loss fixture'),
    Patch('utils/utils.py',
          "indices.append((b, a, gj.clamp_(0, gain[3] - 1), gi.clamp_(0, gain[2] - 1)))",
          "indices.append((b, a, gj.clamp_(0, int(gain[3]) - 1), gi.clamp_(0, int(gain[2]) - 1)))",
          'torch 2 refuses float tensor bounds when clamping the long grid indices in place (build_targets of the '
          'Nov 2020 archive head); the same bounds as ints', required=False),
]


def apply_patches(root: str | Path) -> list[str]:
    """Apply PATCHES to the checkout copy at root (never the original files); return one line per patch applied."""
    done = []
    for rel, old, new, why, required in PATCHES:
        f = Path(root) / rel
        text = f.read_text()
        if new in text or (not required and old not in text):
            continue
        if text.count(old) != 1:
            raise RuntimeError(f'compat patch for {rel} does not apply ({why}): expected text found '
                               f'{text.count(old)} times; is this the 2020 archive code?')
        f.write_text(text.replace(old, new))
        done.append(f'{rel}: {why}')
    return done


def install() -> None:
    """Restore the removed numpy/torch names the original uses; idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    os.environ.setdefault('MPLBACKEND', 'Agg')  # before the original imports matplotlib.pyplot

    import numpy as np
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:  # hasattr() would trip numpy's deprecation __getattr__
            setattr(np, name, value)
    if 'trapz' not in np.__dict__ and hasattr(np, 'trapezoid'):
        np.trapz = np.trapezoid

    import matplotlib
    from matplotlib.colors import to_hex
    cycle = matplotlib.rcParams['axes.prop_cycle']
    if 'color' in cycle.keys:
        matplotlib.rcParams['axes.prop_cycle'] = matplotlib.cycler(color=[to_hex(c) for c in cycle.by_key()['color']])

    import torch
    if not getattr(torch.load, '_compat_original', False):
        original_load = torch.load

        @functools.wraps(original_load)
        def load(*args, **kwargs):
            """torch.load with the pre-2.6 default: the original reads its own pickled checkpoints."""
            kwargs.setdefault('weights_only', False)
            return original_load(*args, **kwargs)

        load._compat_original = True
        torch.load = load
    if not hasattr(torch.cuda, 'memory_cached') and hasattr(torch.cuda, 'memory_reserved'):
        torch.cuda.memory_cached = torch.cuda.memory_reserved

    # noise the 2020 code triggers every batch on today's torch; behaviour is unchanged
    warnings.filterwarnings('ignore', message='.*torch.meshgrid.*indexing.*')
    warnings.filterwarnings('ignore', message=".*'pin_memory' argument is set as true but no accelerator.*")
    warnings.filterwarnings('ignore', message='.*pin_memory.*no accelerator.*')
    warnings.filterwarnings('ignore', message='.*optimizer.step\\(\\)` before `lr_scheduler.step\\(\\)`.*')
    warnings.filterwarnings('ignore', message='.*epoch parameter in `scheduler.step\\(\\)`.*')
    _INSTALLED = True


if os.environ.get('YOLO_BENCH_COMPAT') == '1':  # imported from a benchmark's sitecustomize
    install()
