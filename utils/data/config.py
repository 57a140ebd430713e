"""Dataset configs: Darknet `.data` and ultralytics YAML files, class names, and checks that the data is there."""
from __future__ import annotations

import functools
import glob
import os
import subprocess
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.logs import LOGGER

ROOT = Path(__file__).resolve().parents[2]  # repository root, a fallback base for relative paths

DARKNET_KEYS = {'classes', 'train', 'valid', 'test', 'names', 'backup', 'eval', 'download'}
YAML_KEYS = {'path', 'train', 'val', 'valid', 'test', 'nc', 'names', 'download'}


class DatasetError(Exception):
    """A dataset config, list, folder or file is missing or malformed; the message names the file."""


COCO_NAMES = ROOT / 'data' / 'coco.names'  # 80-class Darknet weights are COCO's


@functools.lru_cache(maxsize=1)
def _coco_names() -> tuple[str, ...] | None:
    if not COCO_NAMES.is_file():
        return None
    return tuple(s.strip() for s in COCO_NAMES.read_text(encoding='utf-8').splitlines() if s.strip())


def coco_names() -> list[str] | None:
    """The 80 COCO class names of data/coco.names (found in the repository, not in the cwd), or None if missing."""
    names = _coco_names()
    return list(names) if names else None


def placeholder_names(nc: int) -> list[str]:
    """The names of a dataset config that gives none: 'class0', 'class1', ..."""
    return [f'class{i}' for i in range(nc)]


def class_names(nc: int, listed: Sequence[str] | None = None, carried: Sequence[str] | None = None,
                source: str | Path = 'class names') -> list[str]:
    """Labels for nc classes, the first that applies: `listed` (a dataset config's or a --names file's, named source
    in the error when their count is not nc; a config's placeholders count as none), the names a checkpoint carries
    when there are nc of them, COCO's for 80 classes (what every 80-class Darknet .weights release is), else the
    placeholders 'class0', 'class1', ..."""
    if listed is not None and list(listed) != placeholder_names(nc):
        if len(listed) != nc:
            raise DatasetError(f"{source}: {len(listed)} class names but the model has {nc} classes")
        return [str(n) for n in listed]
    if carried is not None and len(carried) == nc:
        return [str(n) for n in carried]
    coco = coco_names() if nc == 80 else None
    return coco if coco is not None else placeholder_names(nc)


def load_names(path: str | Path) -> list[str]:
    """Read class names, one a line (blank lines ignored), from a `.names` file; duplicates are an error."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: class names file not found")
    try:
        lines = p.read_text(encoding='utf-8').splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{p}: cannot read class names: {e}") from e
    numbered = [(i, x.strip()) for i, x in enumerate(lines, 1) if x.strip()]
    check_unique_names([x for _, x in numbered], p, [i for i, _ in numbered])
    return [x for _, x in numbered]


def check_unique_names(names: list[str], source: str | Path, lines: list[int] | None = None) -> None:
    """Raise DatasetError naming the source and each duplicated class name (with its lines or class indices)."""
    where: dict[str, list[int]] = {}
    for k, name in enumerate(names):
        where.setdefault(name, []).append(lines[k] if lines is not None else k)
    dups = {n: w for n, w in where.items() if len(w) > 1}
    if dups:
        unit = 'lines' if lines is not None else 'classes'
        listed = '; '.join(f"{n!r} ({unit} {', '.join(map(str, w))})" for n, w in dups.items())
        raise DatasetError(f"{source}: duplicate class names: {listed}; each class needs its own name")


def _exists(p: Path) -> bool:
    """True if p exists, or, for a glob pattern, matches something."""
    return bool(glob.glob(str(p), recursive=True)) if '*' in str(p) else p.exists()


def _resolve(value: str, bases: list[Path]) -> str:
    """Absolute form of a relative path: the first base where it exists, else against the first base."""
    p = Path(os.path.expanduser(str(value).strip()))
    if p.is_absolute():
        return str(p)
    for base in bases:
        if _exists(base / p):
            return str((base / p).resolve()) if '*' not in str(p) else str(base / p)
    return str((bases[0] / p).resolve()) if '*' not in str(p) else str(bases[0] / p)


def _resolve_entry(value: Any, bases: list[Path]) -> str | list[str] | None:
    """Resolve a train/valid entry that may be one path or a list of paths."""
    if value is None or value == '':
        return None
    if isinstance(value, (list, tuple)):
        return [_resolve(str(v), bases) for v in value]
    return _resolve(str(value), bases)


def _parse_darknet(path: Path) -> dict[str, str]:
    """Parse `key=value` lines of a Darknet .data file; `#` starts a comment."""
    out: dict[str, str] = {}
    try:
        lines = path.read_text(encoding='utf-8').splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read dataset config: {e}") from e
    for i, line in enumerate(lines, 1):
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        if '=' not in line:
            raise DatasetError(f"{path}:{i}: expected 'key=value', got {line!r}")
        key, value = (s.strip() for s in line.split('=', 1))
        if key not in DARKNET_KEYS:  # Darknet itself ignores keys it does not use; say so once
            LOGGER.warning(f"{path}:{i}: ignoring unknown key {key!r} (used: {', '.join(sorted(DARKNET_KEYS))})")
        out[key] = value
    return out


def _parse_yaml(path: Path) -> dict[str, Any]:
    """Read an ultralytics-style dataset YAML into a dict."""
    try:
        d = yaml.safe_load(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DatasetError(f"{path}: cannot read dataset YAML: {e}") from e
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: dataset YAML must be a mapping of keys (train, val, nc, names)")
    unknown = set(d) - YAML_KEYS
    if unknown:
        LOGGER.warning(f"{path}: ignoring unknown keys {sorted(unknown)} (used: {', '.join(sorted(YAML_KEYS))})")
    return d


def load_data_config(path: str | Path) -> dict[str, Any]:
    """Load a Darknet `.data` or ultralytics `.yaml` dataset config into a dict with resolved paths.

    Returns at least: 'path' (the config file), 'nc' (int), 'names' (list[str]), 'train' and 'valid' (absolute path
    strings or lists of them, None when absent), 'download' (str or None). Relative paths are tried against the
    working directory, the config file's folder and the repository root, in that order (YAML: against `path`).
    """
    cfg = Path(path)
    if not cfg.is_file():
        raise DatasetError(f"{cfg}: dataset config not found")
    bases = [Path.cwd(), cfg.resolve().parent, ROOT]
    out: dict[str, Any] = {'path': str(cfg)}
    if cfg.suffix.lower() in ('.yaml', '.yml'):
        d = _parse_yaml(cfg)
        if d.get('path'):  # dataset root: train/val are relative to it
            root = Path(_resolve(str(d['path']), bases))
            out['root'] = str(root)
            bases = [root]
        names = d.get('names')
        if isinstance(names, dict):  # {0: person, 1: bicycle, ...}
            names = [str(names[k]) for k in sorted(names)]
        elif isinstance(names, str):  # a .names file, found like the config's other files (not under `path`)
            names = load_names(_resolve(names, [Path.cwd(), cfg.resolve().parent, ROOT]))
        elif names is not None:
            names = [str(x) for x in names]
        if names is not None and not isinstance(d.get('names'), str):  # a .names file was checked as it was read
            check_unique_names(names, cfg)
        nc = d.get('nc')
        out['train'] = _resolve_entry(d.get('train'), bases)
        out['valid'] = _resolve_entry(d.get('val', d.get('valid')), bases)
        out['test'] = _resolve_entry(d.get('test'), bases)
        out['download'] = d.get('download') or None
    else:
        d = _parse_darknet(cfg)
        names = load_names(_resolve(d['names'], bases)) if d.get('names') else None
        nc = d.get('classes')
        for key in ('train', 'valid', 'test'):
            out[key] = _resolve_entry(d.get(key), bases)
        out['download'] = d.get('download') or None
        if d.get('backup'):
            out['backup'] = d['backup']
        if d.get('eval'):
            out['eval'] = d['eval']
    if nc is None and names is None:
        raise DatasetError(f"{cfg}: needs the number of classes ('classes'/'nc') or the class names ('names')")
    try:
        nc = int(nc) if nc is not None else len(names)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{cfg}: number of classes must be an integer, got {nc!r}") from e
    if nc < 1:
        raise DatasetError(f"{cfg}: number of classes must be >= 1, got {nc}")
    if names is None:
        names = placeholder_names(nc)
    if len(names) != nc:
        raise DatasetError(f"{cfg}: {nc} classes but {len(names)} names")
    out['nc'], out['names'] = nc, names
    return out


def _missing(entry: str | list[str] | None) -> list[str]:
    """The paths of a train/valid entry that do not exist."""
    if entry is None:
        return []
    return [p for p in (entry if isinstance(entry, list) else [entry]) if not _exists(Path(p))]


def _download(data: dict[str, Any]) -> None:
    """Fetch a missing dataset as ultralytics did: a .zip URL unpacked beside the dataset, else a shell command."""
    s = str(data['download']).strip()
    if s.startswith(('http://', 'https://')):
        # as ultralytics: a zip holding the dataset folder, unpacked one level above it (`path`'s parent, else '..')
        dest = Path(data['root']).parent if data.get('root') else Path.cwd().parent
        dest.mkdir(parents=True, exist_ok=True)
        LOGGER.info(f"Downloading {s} to {dest} ...")
        with tempfile.NamedTemporaryFile(suffix='.zip', dir=dest, delete=False) as f:
            tmp = Path(f.name)
        try:
            urllib.request.urlretrieve(s, tmp)  # noqa: S310 (the user's own config names the URL)
            with zipfile.ZipFile(tmp) as z:
                z.extractall(dest)
        except (OSError, zipfile.BadZipFile) as e:
            raise DatasetError(f"could not download {s}: {e}. Fetch it yourself and unzip it into {dest}") from e
        finally:
            tmp.unlink(missing_ok=True)
    else:
        LOGGER.info(f"Running dataset download command: {s}")
        r = subprocess.run(s, shell=True, check=False)  # noqa: S602 (the user's own config names the command)
        if r.returncode:
            raise DatasetError(f"download command {s!r} failed (exit {r.returncode}); run it where there is network "
                               f"access, or fetch the files it names by hand")


def check_dataset(data: dict[str, Any], splits: tuple[str, ...] = ('train', 'valid')) -> None:
    """Raise DatasetError naming any missing train/valid path; first try the config's `download` entry if any."""
    for s in splits:
        if data.get(s) is None:
            raise DatasetError(f"{data['path']}: no '{s if s != 'valid' else 'valid/val'}' entry")
    missing = list(dict.fromkeys(p for s in splits for p in _missing(data.get(s))))  # unique, in order
    if not missing:
        return
    if not data.get('download'):
        raise DatasetError(f"{data['path']}: dataset not found: {', '.join(missing)} does not exist")
    LOGGER.info(f"Dataset not found: {', '.join(missing)}")
    try:
        _download(data)
    except DatasetError as e:
        raise DatasetError(f"{data['path']}: dataset not found: {', '.join(missing)} does not exist; {e}; "
                           f"afterwards {missing[0]} must exist") from e
    still = list(dict.fromkeys(p for s in splits for p in _missing(data.get(s))))
    if still:
        raise DatasetError(f"{data['path']}: after running download {data['download']!r}, "
                           f"{', '.join(still)} still does not exist")
