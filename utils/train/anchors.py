"""Anchors for a dataset: how well a model's anchors fit the training labels, and new anchors for a cfg.

The fit uses the matching of the training loss. The original's (utils/train/loss.py build_targets): a target goes to every
anchor of a [yolo] layer whose width-height IoU with it exceeds iou_t. Darknet's (--loss darknet,
utils/train/darknet_loss.py): to the best of all anchors of a layer's anchors= list when the layer's mask has it, plus, with
iou_thresh < 1, every masked anchor above iou_thresh. BPR (best possible recall) is the share of targets that match at
least one anchor; anchors per target is the mean number they match (an anchor listed in two layers' masks counts
twice, as the loss assigns it twice); fitness is the original's kmean_anchors fitness, the mean best IoU counting
only IoUs above iou_t.

    python -m utils.train.anchors --data data/person.data --cfg cfg/yolov3-tiny-1cls.cfg --img-size 320

computes anchors for the training labels (k-means, then a genetic refinement reproducible with --seed) and writes a
copy of the cfg with them in every [yolo] `anchors=` line (masks and everything else unchanged).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import yaml
from tqdm import tqdm

from utils.boxes import wh_iou
from utils.darknet.parse_config import (
    ConfigError,
    parse_cfg_text,
    parse_model_cfg,
    with_values,
)
from utils.data.augmentations import BOX_MAX_ASPECT, BOX_MIN_WH
from utils.data.config import DatasetError, check_dataset, load_data_config
from utils.data.datasets import DatasetOptions, LoadImagesAndLabels
from utils.logs import LOGGER, setup_logging
from utils.torch_utils import de_parallel
from utils.train.darknet_loss import DarknetLoss, YoloLossConfig, darknet_iou

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_HYP = ROOT / 'data' / 'hyp.scratch.yaml'
BPR_WARN = 0.98  # below this best possible recall, check_anchors warns


class AnchorError(Exception):
    """Anchors cannot be computed or written; the message names the file and what is wrong."""


def label_wh(labels: Sequence[np.ndarray], shapes: np.ndarray, img_size: int) -> np.ndarray:
    """(n, 2) widths and heights of all labels in pixels at the training size, as the loader letterboxes.

    labels: per image (k, 5) [class, x, y, w, h] normalised; shapes: (images, 2) original (w, h). Each image's long
    side is scaled to img_size.
    """
    out = [lb[:, 3:5] * (s / s.max()) * img_size for lb, s in zip(labels, np.asarray(shapes, np.float64)) if len(lb)]
    return np.concatenate(out, 0) if out else np.zeros((0, 2))


def kept_by_loader(wh: np.ndarray) -> np.ndarray:
    """Boolean mask of (n, 2) box sizes the training loader keeps: its box filter (utils/data/augmentations.py
    box_candidates) drops boxes <= 4 px wide or high and boxes of aspect ratio >= 10, so the loss never sees them."""
    w, h = wh[:, 0], wh[:, 1]
    return (w > BOX_MIN_WH) & (h > BOX_MIN_WH) & (np.maximum(w / h, h / w) < BOX_MAX_ASPECT)


def anchor_fit(wh: torch.Tensor, anchors: torch.Tensor, thr: float) -> tuple[float, float, float]:
    """(fitness, BPR, anchors per target) of (n, 2) target sizes against the (m, 2) anchors the layers use."""
    iou = wh_iou(wh, anchors.to(wh.dtype))  # (n, m)
    best = iou.max(1).values  # (n,)
    fitness = (best * (best > thr)).mean()  # mean best IoU, counting only IoUs above thr
    return float(fitness), float((best > thr).float().mean()), float((iou > thr).float().sum(1).mean())


def model_anchors(model: nn.Module) -> torch.Tensor:
    """(m, 2) anchors in pixels of every [yolo] layer of a Darknet model (DDP-wrapped or not), in layer order."""
    m = de_parallel(model)
    anchors = [m.module_list[i].anchors.detach().float().cpu() for i in m.yolo_layers]
    if not anchors:
        raise AnchorError('the model has no [yolo] layers')
    return torch.cat(anchors, 0)


def darknet_fit(wh: torch.Tensor, configs: list[YoloLossConfig]) -> tuple[float, float]:
    """(BPR, anchors per target) of (n, 2) target sizes under Darknet's assignment (per [yolo] layer: the best of its
    whole anchors= list if masked there, and masked anchors above iou_thresh)."""
    boxes = torch.cat((torch.zeros_like(wh), wh), 1)[:, None]  # (n, 1, 4) centred
    matched = torch.zeros(len(wh), dtype=torch.bool)
    count = torch.zeros(len(wh))
    for c in configs:
        anchors = torch.tensor(c.anchors, dtype=wh.dtype)
        a_boxes = torch.cat((torch.zeros_like(anchors), anchors), 1)[None]  # (1, total, 4)
        masked = torch.zeros(len(anchors), dtype=torch.bool)
        masked[list(c.mask)] = True
        best = darknet_iou(boxes, a_boxes).argmax(1)  # (n,)
        take = masked[best]
        extra = torch.zeros(len(wh))
        if c.iou_thresh < 1.0:
            above = darknet_iou(boxes, a_boxes, c.iou_thresh_kind) > c.iou_thresh
            above &= masked[None] & (torch.arange(len(anchors))[None] != best[:, None])
            extra = above.sum(1).float()
        matched |= take | (extra > 0)
        count += take.float() + extra
    return float(matched.float().mean()), float(count.mean())


def check_anchors(dataset, model: nn.Module, img_size: int, thr: float, data: str | None = None,
                  cfg: str | None = None, loss: str = 'original', pretrained: bool = False) -> float:
    """Log how well the model's anchors fit the dataset's labels at img_size, under the assignment rule of the loss
    ('original': IoU above thr; 'darknet': Darknet's best anchor), and return the BPR.

    dataset: a utils.data.datasets.LoadImagesAndLabels (.labels, .shapes). Below 0.98 BPR: training from scratch, a
    WARNING gives the `python -m utils.train.anchors` command (data and cfg fill in its paths); starting from weights, a
    note says what the figure means and to keep the anchors the weights were trained with.
    """
    wh = label_wh(dataset.labels, dataset.shapes, img_size)
    keep = kept_by_loader(wh)
    if not keep.any():
        LOGGER.warning(f'anchors: none of the {len(wh)} label boxes is larger than {BOX_MIN_WH:g} px at {img_size}: '
                       f'the loader drops them all (train at a larger --img-size)')
        return 0.0
    wh_t = torch.from_numpy(wh[keep]).float()
    if loss == 'darknet':
        bpr, aat = darknet_fit(wh_t, DarknetLoss(model).configs)
        rule = "Darknet's best anchor"
    else:
        _, bpr, aat = anchor_fit(wh_t, model_anchors(model), thr)
        rule = f'iou_t {thr:g}'
    LOGGER.info(f'anchors: BPR {bpr:.4f}, {aat:.2f} anchors per target at {img_size} ({rule})')
    if bpr < BPR_WARN:
        # from weights a low BPR is a note (keep their anchors); from scratch it warns with the command to fix it
        (LOGGER.info if pretrained else LOGGER.warning)(anchor_advice(bpr, rule, pretrained,
                                                                      fix_command(data, cfg, img_size)))
    return bpr


def anchor_advice(bpr: float, rule: str, pretrained: bool, command: str) -> str:
    """What a BPR under 0.98 means and what to do: from weights, keep their anchors; from scratch, fit new ones."""
    missed = f'{1 - bpr:.1%} of the labels match no anchor ({rule}), so the loss trains no box for them'
    if pretrained:
        return (f'anchors: note: {missed}. These are the anchors the starting weights were trained with: keep them '
                f'when fine-tuning (new anchors change what every pretrained width/height output means, and the '
                f'heads must relearn them). New anchors help when training from scratch, or for boxes far from those '
                f'the weights learned (then compare both runs): {command}')
    return (f'anchors: {missed} (BPR < {BPR_WARN}). Training from scratch, anchors fitted to this data '
            f'help: {command}  and train with the cfg it writes')


def fix_command(data: str | None, cfg: str | None, img_size: int) -> str:
    """The `python -m utils.train.anchors` command line for data and cfg; run from elsewhere than the repository root,
    with absolute paths and a `cd` to the root (python -m finds utils/ only there)."""
    if Path.cwd().resolve() == ROOT:
        return f'python -m utils.train.anchors --data {data or "<data>"} --cfg {cfg or "<cfg>"} --img-size {img_size}'
    data, cfg = (str(Path(x).resolve()) if x else f'<{k}>' for x, k in ((data, 'data'), (cfg, 'cfg')))
    return f'cd {ROOT} && python -m utils.train.anchors --data {data} --cfg {cfg} --img-size {img_size}'


def cfg_anchors(path: str | Path) -> tuple[np.ndarray, list[list[int]]]:
    """The anchors (n, 2) of a cfg's [yolo] layers and each layer's mask; every layer must list the same number."""
    yolos = [s for s in parse_model_cfg(path) if s['type'] == 'yolo']
    if not yolos:
        raise AnchorError(f'{path}: no [yolo] section, so no anchors to compute')
    for s in yolos:
        if 'anchors' not in s or 'mask' not in s:
            raise AnchorError(f"{path}:{s['line']}: [yolo] needs anchors= and mask=")
    n = {len(s['anchors']) for s in yolos}
    if len(n) > 1:
        raise AnchorError(f'{path}: the [yolo] sections list different numbers of anchors ({sorted(n)}); '
                          f'one list shared by all (selected by mask=) is expected')
    return np.array(yolos[0]['anchors'], np.float64), [list(s['mask']) for s in yolos]


def used_anchors(anchors: np.ndarray, masks: list[list[int]]) -> torch.Tensor:
    """(m, 2) anchors as the layers use them: each layer's mask of the cfg's list, concatenated."""
    return torch.from_numpy(np.concatenate([anchors[m] for m in masks], 0)).float()


def by_area(anchors: np.ndarray) -> np.ndarray:
    """(n, 2) anchors sorted small to large (the order the masks of a cfg expect)."""
    return anchors[np.argsort(anchors.prod(1), kind='stable')]


def evolve_anchors(wh: np.ndarray, n: int, masks: list[list[int]], thr: float, gen: int = 1000, seed: int = 0,
                   start: np.ndarray | None = None) -> np.ndarray:
    """n anchors (n, 2), sorted by area, for target sizes wh (t, 2): k-means, then `gen` generations of mutation
    keeping improvements of the fitness (with masks, as the layers use them). Reproducible from seed.

    start: other anchors (the cfg's) to refine instead when they fit better than the k-means result.
    """
    from scipy.cluster.vq import kmeans  # scipy only for this tool, not for training

    rng = np.random.default_rng(seed)
    pts = wh[(wh >= 2.0).all(1)]  # sub-2-pixel boxes would drag the clusters to zero
    sigma = pts.std(0)
    sigma[sigma == 0] = 1.0  # all boxes the same width (or height): nothing to whiten
    used = sorted({i for m in masks for i in m})  # anchors some layer uses (yolov3-tiny's masks skip anchor 0)
    nu = len(used)
    LOGGER.info(f'anchors: k-means for the {nu} anchors the masks use, on {len(pts)} boxes...')
    c, _ = kmeans(pts / sigma, min(nu, len(pts)), iter=30, rng=np.random.default_rng(seed))
    c = c * sigma
    if len(c) < nu:  # fewer distinct boxes than anchors: complete with label sizes
        c = np.concatenate([c, pts[rng.integers(0, len(pts), nu - len(c))]], 0)
    k = np.empty((n, 2))
    k[used] = by_area(c)
    k = park_unused(k, used).clip(min=2.0)
    wh_t = torch.from_numpy(wh).float()

    def fitness(a: np.ndarray) -> float:
        return anchor_fit(wh_t, used_anchors(by_area(a), masks), thr)[0]

    f = fitness(k)
    LOGGER.info(f'anchors: k-means fitness {f:.4f}')
    if start is not None and len(start) == n and fitness(start) > f:
        k, f = start.astype(np.float64), fitness(start)
        LOGGER.info(f"anchors: the cfg's anchors fit better ({f:.4f}): refining those instead")
    mp, s = 0.9, 0.1  # mutation probability and sigma of the original's evolution
    for _ in tqdm(range(gen), desc='Evolving anchors', file=sys.stderr, disable=gen == 0):
        v = np.ones_like(k)
        while (v == 1).all():  # mutate until something changes
            v = ((rng.random(k.shape) < mp) * rng.random() * rng.standard_normal(k.shape) * s + 1).clip(0.3, 3.0)
        kg = (k * v).clip(min=2.0)
        fg = fitness(kg)
        if fg > f:
            f, k = fg, kg
    return by_area(park_unused(k, used))


def park_unused(k: np.ndarray, used: list[int]) -> np.ndarray:
    """k (n, 2) with each anchor no mask uses set where no loss gives it a label and the list stays sorted: after
    a used anchor, a copy of the one before it (a tie goes to the earlier, used one); before all used anchors, 2x2 px
    (Darknet's loss gives each label its best anchor of the whole list, and a label whose best is unmasked is lost)."""
    k = k.copy()
    for i in range(len(k)):
        if i not in used:
            before = [u for u in used if u < i]
            k[i] = k[max(before)] if before else (2.0, 2.0)
    return k


def format_anchors(anchors: np.ndarray) -> str:
    """Darknet's anchors= value: `w,h,  w,h, ...` in whole pixels."""
    return ',  '.join(f'{int(w)},{int(h)}' for w, h in np.round(anchors).astype(int))


def cfg_with_anchors(text: str, anchors: np.ndarray, path: str = '<cfg>') -> tuple[str, int]:
    """cfg text with the value of every [yolo] anchors= line replaced (spacing, comments, line endings kept);
    returns (text, lines replaced)."""
    yolo = [i for i, d in enumerate(parse_cfg_text(text, path)[1:]) if d['type'] == 'yolo' and 'anchors' in d]
    if not yolo:
        raise AnchorError(f'{path}: no anchors= line in a [yolo] section')
    value = format_anchors(anchors)
    return with_values(text, {i: {'anchors': value} for i in yolo}, path), len(yolo)


def read_iou_t(path: str | Path) -> float:
    """iou_t from a hyperparameter YAML."""
    p = Path(path)
    try:
        hyp = yaml.safe_load(p.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise AnchorError(f'{p}: cannot read hyperparameters: {e}') from e
    if not isinstance(hyp, dict) or not isinstance(hyp.get('iou_t'), (int, float)) or isinstance(hyp['iou_t'], bool):
        raise AnchorError(f'{p}: no numeric iou_t (the anchor matching threshold)')
    return float(hyp['iou_t'])


def default_out(cfg: Path, data: Path) -> Path:
    """Where the new cfg goes by default: beside the input, named after it and the data."""
    return cfg.with_name(f'{cfg.stem}-{data.stem}-anchors{cfg.suffix or ".cfg"}')


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of `python -m utils.train.anchors`."""
    p = argparse.ArgumentParser(prog='python -m utils.train.anchors', description=__doc__.split('\n\n')[0])
    p.add_argument('--data', required=True, help='dataset .data or .yaml (its train images and labels are used)')
    p.add_argument('--cfg', required=True, help='model cfg whose [yolo] anchors to replace (never overwritten)')
    p.add_argument('--img-size', type=int, required=True,
                   help="training image size in pixels (the loader's long side; train.py's --img-size)")
    p.add_argument('--out', default='', help='new cfg path (default: beside --cfg, <cfg>-<data>-anchors.cfg); '
                                             'must not exist')
    p.add_argument('--hyp', default=str(DEFAULT_HYP), help='hyperparameter YAML giving iou_t')
    p.add_argument('--seed', type=int, default=0, help='seed of k-means and of the genetic refinement')
    p.add_argument('--gen', type=int, default=1000, help='generations of the genetic refinement')
    return p


def parse_opt(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (argv, or sys.argv)."""
    return get_args_parser().parse_args(argv)


def main(opt: argparse.Namespace) -> int:
    """Compute anchors for opt.data and write them into a copy of opt.cfg (errors raise AnchorError and others)."""
    setup_logging()
    cfg, data = Path(opt.cfg), Path(opt.data)
    out = Path(opt.out) if opt.out else default_out(cfg, data)
    if opt.img_size <= 0 or opt.gen < 0:
        raise AnchorError(f'--img-size must be > 0 and --gen >= 0 (got {opt.img_size}, {opt.gen})')
    if out.exists():  # also catches --out equal to --cfg: the input is never overwritten
        raise AnchorError(f'{out}: output cfg exists; give another --out (nothing written)')
    if not out.parent.is_dir():
        raise AnchorError(f'{out}: folder {out.parent} does not exist (nothing written)')
    thr = read_iou_t(opt.hyp)
    anchors0, masks = cfg_anchors(cfg)
    with open(cfg, encoding='utf-8', newline='') as f:  # newline='': keep the file's line endings as they are
        text = f.read()
    cfg_with_anchors(text, anchors0, str(cfg))  # fails now, before the work, if there is nothing to replace

    d = load_data_config(data)
    check_dataset(d, ('train',))
    ds = LoadImagesAndLabels(d['train'], DatasetOptions(img_size=opt.img_size, nc=d['nc'], prefix='anchors: '))
    wh = label_wh(ds.labels, ds.shapes, opt.img_size)
    if not len(wh):
        raise AnchorError(f'{data}: no labels in the training images {d["train"]}; anchors need labelled boxes '
                          f'(nothing written)')
    keep = kept_by_loader(wh)
    if not keep.any():
        raise AnchorError(f'{data}: none of the {len(wh)} label boxes is larger than {BOX_MIN_WH:g} px at '
                          f'--img-size {opt.img_size} (the loader drops them all); nothing written')
    LOGGER.info(f'anchors: {int(keep.sum())} boxes of {len(ds)} images at {opt.img_size}, iou_t {thr:g}'
                + (f'; {int((~keep).sum())} boxes <= {BOX_MIN_WH:g} px or of aspect >= {BOX_MAX_ASPECT:g} left '
                   f'out (the loader drops them)' if not keep.all() else ''))
    wh = wh[keep]
    wh_t = torch.from_numpy(wh).float()

    def report(name: str, a: np.ndarray) -> None:
        f, bpr, aat = anchor_fit(wh_t, used_anchors(a, masks), thr)
        LOGGER.info(f'{name}: fitness {f:.4f}, BPR {bpr:.4f}, {aat:.2f} anchors per target; anchors '
                    f'{format_anchors(a)}')

    report(f'before ({cfg})', anchors0)
    new = evolve_anchors(wh, len(anchors0), masks, thr, opt.gen, opt.seed, start=anchors0)
    new = by_area(np.round(new))  # the whole pixels written (and measured), small to large
    report('after', new)
    text_new, n = cfg_with_anchors(text, new, str(cfg))
    try:
        f = open(out, 'x', encoding='utf-8', newline='')  # 'x': never replaces a file created meanwhile
    except FileExistsError as e:
        raise AnchorError(f'{out}: output cfg exists; give another --out (nothing written)') from e
    except OSError as e:
        raise AnchorError(f'{out}: cannot write: {e.strerror or e} (nothing written)') from e
    try:
        with f:
            f.write(text_new)
    except OSError as e:
        out.unlink(missing_ok=True)  # no half-written cfg
        raise AnchorError(f'{out}: cannot write: {e.strerror or e} (nothing written)') from e
    LOGGER.info(f'wrote {out} (anchors= in {n} [yolo] sections, masks unchanged); train with --cfg {out}')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main(parse_opt()))
    except (AnchorError, DatasetError, ConfigError) as err:
        sys.exit(f'Error: {err}')
