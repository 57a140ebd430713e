"""Hyperparameter evolution (train.py --evolve N): the original's parent selection and mutation, evolve.txt I/O."""
from __future__ import annotations

import argparse
from copy import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from filelock import FileLock

from utils.eval.metrics import fitness
from utils.files import atomic_write
from utils.logs import LOGGER

RESULT_NAMES = ('P', 'R', 'mAP@0.5', 'mAP@0.5:0.95', 'F1', 'val_GIoU', 'val_obj', 'val_cls')
# the original's mutation gain per hyperparameter (lrf and fl_gamma are not mutated, momentum only a little)
GAINS = {'giou': 1, 'cls': 1, 'cls_pw': 1, 'obj': 1, 'obj_pw': 1, 'iou_t': 1, 'lr0': 1, 'lrf': 0, 'momentum': 0.1,
         'weight_decay': 1, 'fl_gamma': 0, 'hsv_h': 1, 'hsv_s': 1, 'hsv_v': 1, 'degrees': 1, 'translate': 1,
         'scale': 1, 'shear': 1}
LIMITS = {'lr0': (1e-5, 1e-2), 'iou_t': (0.0, 0.7), 'momentum': (0.6, 0.98), 'weight_decay': (0.0, 0.001),
          'hsv_s': (0.0, 0.9), 'hsv_v': (0.0, 0.9), 'translate': (0.0, 0.9), 'scale': (0.0, 0.9),
          'fl_gamma': (0.0, 3.0)}


def read_evolve(path: Path, keys: list[str]) -> np.ndarray:
    """Rows of evolve.txt (n, 8 results + len(keys) hyperparameters); empty (0, ...) when there is no file."""
    if not path.exists() or not path.read_text().strip():
        return np.zeros((0, len(RESULT_NAMES) + len(keys)))
    x = np.loadtxt(path, ndmin=2)
    if x.shape[1] != len(RESULT_NAMES) + len(keys):
        raise ValueError(f'{path}: {x.shape[1]} columns, expected {len(RESULT_NAMES)} results + {len(keys)} '
                         f'hyperparameters ({", ".join(keys)}); move it away to start a new evolution')
    return x


def mutate(hyp: dict[str, float], x: np.ndarray, rng: np.random.Generator, sigma: float = 0.2,
           mp: float = 0.9, n_parents: int = 5) -> dict[str, float]:
    """A child of the best rows of x: a parent picked with weight fitness - min over the top n_parents, each
    hyperparameter multiplied by clip(1 + gain * [u < mp] * N(0, 1) * U(0, 1) * sigma, 0.3, 3), then clipped to
    LIMITS. With no rows yet the given hyp is the parent."""
    keys = list(hyp)
    child = dict(hyp)
    if len(x):
        n = min(n_parents, len(x))
        top = x[np.argsort(-fitness(x))][:n]
        w = fitness(top) - fitness(top).min() + 1e-6  # + eps: equal fitnesses still give a valid distribution
        parent = top[rng.choice(n, p=w / w.sum())]
        g = np.array([GAINS.get(k, 1.0) for k in keys], dtype=np.float64)
        v = np.ones(len(keys))
        while np.all(v == 1):  # mutate until something changes (prevents duplicate rows)
            v = (g * (rng.random(len(keys)) < mp) * rng.standard_normal(len(keys)) * rng.random() * sigma + 1)
            v = v.clip(0.3, 3.0)
        child = {k: float(parent[len(RESULT_NAMES) + i] * v[i]) for i, k in enumerate(keys)}
    for k, (lo, hi) in LIMITS.items():
        if k in child:
            child[k] = float(np.clip(child[k], lo, hi))
    return child


def append_result(path: Path, hyp: dict[str, float], results: tuple[float, ...]) -> np.ndarray:
    """Add a generation row (results then hyp values) to evolve.txt, keep unique rows sorted by fitness, under a
    file lock so several evolving processes can share the file; returns all rows."""
    keys = list(hyp)
    with FileLock(str(path) + '.lock'):
        x = read_evolve(path, keys)
        row = np.array(list(results) + [hyp[k] for k in keys], dtype=np.float64).reshape(1, -1)
        x = np.unique(np.concatenate((x, row), 0), axis=0)
        x = x[np.argsort(-fitness(x))]
        header = ' '.join(f'{n:>11s}' for n in (*RESULT_NAMES, *keys))
        atomic_write(path, lambda f: np.savetxt(f, x, fmt='%11.5g',
                                                header=header[2:] if header.startswith('  ') else header))
    return x


def best_hyp(x: np.ndarray, keys: list[str]) -> dict[str, float]:
    """The hyperparameters of the fittest row."""
    row = x[int(np.argmax(fitness(x)))]
    return {k: float(row[len(RESULT_NAMES) + i]) for i, k in enumerate(keys)}


def evolve(hyp: dict[str, float], opt: argparse.Namespace, device: torch.device,
           train_fn: Callable[[dict, argparse.Namespace, torch.device], tuple]) -> Path:
    """Run opt.evolve generations: mutate from evolve.txt (continuing it if present), train with test only at the
    final epoch and nothing saved, append the result. Writes hyp_evolved.yaml and evolve.png; returns evolve.txt."""
    from utils.eval.plots import plot_evolution

    save_dir = Path(opt.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    path, best_yaml = save_dir / 'evolve.txt', save_dir / 'hyp_evolved.yaml'
    keys = list(hyp)
    rng = np.random.default_rng()  # fresh entropy: concurrent evolvers must not draw the same children
    gen_opt = copy(opt)
    gen_opt.notest, gen_opt.nosave = True, True
    for g in range(opt.evolve):
        with FileLock(str(path) + '.lock'):
            x = read_evolve(path, keys)
        child = mutate(hyp, x, rng)
        LOGGER.info(f'\nEvolve generation {g + 1}/{opt.evolve} ({len(x)} rows in {path}): {child}')
        results = train_fn(dict(child), gen_opt, device)
        x = append_result(path, child, tuple(float(r) for r in results))
        best = best_hyp(x, keys)
        best_yaml.write_text(f'# best of {len(x)} generations in {path.name}: fitness {fitness(x).max():.5g}\n'
                             + yaml.safe_dump(best, sort_keys=False))
        LOGGER.info(f'Generation {g + 1}: fitness {fitness(np.array([results]))[0]:.5g}; best so far '
                    f'{fitness(x).max():.5g}, written to {best_yaml}')
    plot_evolution(keys, path, save_path=save_dir / 'evolve.png', n_results=len(RESULT_NAMES))
    return path
