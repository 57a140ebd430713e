"""Darknet's cfg zoo through Darknet and through this project, side by side: one table row per cfg.

For each cfg (../shared/darknet-zoo by default) at a small input size, net_harness.c has AlexeyAB/darknet build the
network, fill seeded random weights, write them with its own save_weights, run network_predict on a seeded image and
dump every head's input and get_network_boxes at threshold 0. The project then loads the same cfg and the
Darknet-written .weights (models.load_model), runs the same input and is compared on: every head's input (the
network), the decoded boxes, objectness and class scores, and the .weights it writes back. OpenCV's Darknet importer
(cv2.dnn.readNetFromDarknet) is a second check on the boxes where it reads the cfg.

    python tools/darknet_harness/zoo.py --darknet /tmp/darknet                 # the whole zoo, text table
    python tools/darknet_harness/zoo.py --darknet /tmp/darknet --cfgs yolov4-tiny yolov7-tiny --markdown
    python tools/darknet_harness/zoo.py --from-json /tmp/darknet-zoo-work/results.json --markdown   # table again
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

from zoo_cfg import small_size, thinned, with_size  # after the path set-up

ZOO = ROOT.parent / 'shared' / 'darknet-zoo'
SEED = 23
# a layer matches when max |ours - Darknet| <= NET_TOL * max |Darknet| (float32, -Ofast, other summation orders)
NET_TOL = 1e-3
BOX_TOL = 5e-3  # boxes (box_err): new_coords' w = (2 sigmoid)^2 anchor doubles the head input's relative error
SCORE_TOL = 1e-3  # objectness and class scores: max absolute difference
HEAD_TYPES = {'yolo': 5, 'gaussian_yolo': 9, 'region': 5, 'detection': 5}  # Darknet's layer names -> entries before
# the classes in a head's output


@dataclass
class Head:
    """A head layer as Darknet built it."""
    index: int
    type: str
    n: int
    classes: int
    h: int
    w: int


@dataclass
class DarknetRun:
    """What net_harness wrote for one cfg."""
    dir: Path
    layers: list[tuple[int, str, tuple[int, int, int]]]  # (index, type, (c, h, w))
    heads: list[Head]
    boxes: np.ndarray  # (count, 5 + classes [+ 4 uc])
    size: tuple[int, int]  # (h, w)
    letter_box: int

    def output(self, i: int) -> np.ndarray:
        """Layer i's output as Darknet computed it, shaped (c, h, w)."""
        c, h, w = self.layers[i][2]
        return np.fromfile(self.dir / f'out_{i}.bin', dtype=np.float32).reshape(c, h, w)


@dataclass
class Result:
    """One table row."""
    cfg: str
    size: str = ''
    status: str = ''
    detail: str = ''
    net_err: float | None = None  # worst head input, relative to its largest value
    box_err: float | None = None
    obj_err: float | None = None
    cls_err: float | None = None
    weights: str = ''
    opencv: str = ''
    seconds: dict = field(default_factory=dict)


def harness_binary(darknet: Path, work: Path) -> Path:
    """net_harness built against darknet's libdarknet.so (as build.sh does), into work/ unless darknet has one."""
    exe = darknet / 'net_harness'
    src = HERE / 'net_harness.c'
    if exe.is_file() and exe.stat().st_mtime >= src.stat().st_mtime:
        return exe
    exe = work / 'net_harness'
    if not exe.is_file() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(['gcc', '-O2', '-std=gnu99', '-Wall', f'-I{darknet}/include', f'-I{darknet}/src', str(src),
                        '-o', str(exe), f'-L{darknet}', '-l:libdarknet.so', f'-Wl,-rpath,{darknet}', '-lm',
                        '-lpthread'], check=True)
    return exe


def seeded_image(h: int, w: int, seed: int) -> np.ndarray:
    """(3, h, w) uint8 RGB: noise on smooth colour gradients, so every channel and position differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, 1 - (xx + yy) / (w + h)])
    return np.clip(255 * (0.6 * base + 0.4 * rng.random((3, h, w))), 0, 255).astype(np.uint8)


def as_input(image: np.ndarray) -> np.ndarray:
    """The network input of a (3, h, w) uint8 image: float32 / 255, as Darknet's loaders scale pixels."""
    return image.astype(np.float32) / np.float32(255)


def run_darknet(exe: Path, cfg_text: str, out: Path, image: np.ndarray, seed: int, all_layers: bool,
                timeout: float) -> DarknetRun:
    """Run net_harness on cfg_text and a (3, h, w) uint8 image with weights from seed, in out/ (net.cfg, input.bin,
    darknet.log and the dumps); RuntimeError if Darknet fails (its last log line)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / 'net.cfg').write_text(cfg_text)
    h, w = image.shape[1:]
    as_input(image).tofile(out / 'input.bin')
    cmd = [str(exe), str(out / 'net.cfg'), str(out), str(seed)] + (['all'] if all_layers else [])
    with open(out / 'darknet.log', 'w') as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    if rc:
        lines = [s.strip() for s in (out / 'darknet.log').read_text(errors='replace').splitlines() if s.strip()]
        ours = [s for s in lines if s.startswith('net_harness:')]  # the harness's own refusal, else Darknet's words
        errors = [s for s in lines if 'rror' in s and 'location' not in s]
        said = errors[-1] if errors else lines[-1] if lines else 'no output'
        why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"rc {rc}"
        raise RuntimeError(ours[0] if ours else f"{why}: {said}")
    layers, heads = [], []
    for row in (out / 'layers.tsv').read_text().splitlines():
        f = row.split('\t')
        i, t, (c, lh, lw) = int(f[0]), f[1].lower(), map(int, f[2:5])
        layers.append((i, t, (c, lh, lw)))
        if len(f) > 6:
            heads.append(Head(i, t, int(f[6]), int(f[7]), lh, lw))
    meta = dict(s.split(' ', 1) for s in (out / 'boxes.txt').read_text().splitlines())
    row = int(meta['row'])
    boxes = np.fromfile(out / 'boxes.bin', dtype=np.float32).reshape(-1, row) if row else np.zeros((0, 5), np.float32)
    return DarknetRun(out, layers, heads, boxes, (h, w), int(meta['letter_box']))


def load_project(cfg: Path, weights: Path, size: tuple[int, int], log: Path):
    """models.load_model on the cfg and the Darknet-written weights, its printout kept in log."""
    import models
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            return models.load_model(str(weights), str(cfg), img_size=size, verbose=True)
    finally:
        log.write_text(buf.getvalue())


def project_build(cfg: Path) -> str:
    """What the project says when it builds the cfg alone (for cfgs Darknet cannot run here): 'builds' or its error."""
    import models
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            models.Darknet(str(cfg))
    except Exception as e:  # noqa: BLE001 (any refusal is the answer)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return 'builds'


def project_forward(model, x: np.ndarray, keep: set[int]):
    """(outputs of the layers in keep, decoded inference rows (N, no)) for one (3, h, w) input."""
    import torch
    kept: dict[int, np.ndarray] = {}
    hooks = []

    def keep_output(i: int, out) -> None:
        if isinstance(out, torch.Tensor):  # a head's output is its decoded rows, compared as boxes
            kept[i] = out.detach().float().numpy()[0].copy()

    for i, m in enumerate(model.module_list):
        if i in keep:
            hooks.append(m.register_forward_hook(lambda mod, args, out, i=i: keep_output(i, out)))
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(x)[None])
    finally:
        for hk in hooks:
            hk.remove()
    return kept, out[0][0].float().numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| relative to max |ref| (inf when the shapes differ)."""
    if ours.size != ref.size:
        return float('inf')
    scale = max(float(np.abs(ref).max()), 1e-12)
    return float(np.abs(ours.reshape(ref.shape) - ref).max()) / scale


def box_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max(1, |ref|) over box coordinates in fractions of the input (an untrained head's w and h
    reach tens of input widths, where float32 keeps ~7 digits)."""
    return float((np.abs(ours - ref) / np.maximum(1, np.abs(ref))).max()) if len(ref) else 0.0


def darknet_rows(dn: DarknetRun, head: Head) -> np.ndarray:
    """Which of the head's slots (cell-major, anchor-minor: get_network_boxes' order) Darknet returned a box for."""
    if head.type == 'region' or head.type == 'detection':
        return np.ones(head.h * head.w * head.n, bool)
    entries = HEAD_TYPES[head.type] + head.classes
    obj = dn.output(head.index).reshape(head.n, entries, head.h, head.w)[:, HEAD_TYPES[head.type] - 1]
    return (obj > 0).transpose(1, 2, 0).reshape(-1)  # (h, w, n): Darknet's loop order


def compare_boxes(dn: DarknetRun, rows: np.ndarray) -> tuple[float, float, float]:
    """(box, objectness, class score) max abs differences between get_network_boxes and our decoded rows."""
    h, w = dn.size
    box = obj = cls = 0.0
    start = got = 0
    for hd in dn.heads:
        n_slots = hd.n * hd.h * hd.w
        ours = rows[start:start + n_slots]
        start += n_slots
        if ours.shape[0] != n_slots:
            raise ValueError(f"head at layer {hd.index}: {ours.shape[0]} rows, Darknet has {n_slots} slots")
        ours = ours.reshape(hd.n, hd.h, hd.w, -1).transpose(1, 2, 0, 3).reshape(n_slots, -1)
        ours = ours[darknet_rows(dn, hd)]
        ref = dn.boxes[got:got + len(ours)]
        got += len(ours)
        nc = hd.classes
        box = max(box, box_err(ours[:, :4] / [w, h, w, h], ref[:, :4]))
        score = ours[:, 4:5] * ours[:, 5:5 + nc]  # what NMS ranks: Darknet's prob
        ref_obj = ref[:, 4]
        if hd.type == 'gaussian_yolo':  # our objectness column carries Darknet's (1 - mean uncertainty) factor
            ref_obj = ref_obj * (1 - ref[:, 5 + nc:9 + nc].mean(1))
        if hd.type != 'region' and len(ref):  # Darknet's region detections carry objectness 1, the score is in prob
            obj = max(obj, float(np.abs(ours[:, 4] - ref_obj).max()))
        score = np.where(score > 0, score, 0)  # Darknet keeps prob > thresh (0), else 0
        if len(ref):
            cls = max(cls, float(np.abs(score - ref[:, 5:5 + nc]).max()))
    if start != rows.shape[0] or got != dn.boxes.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows here, {start} in Darknet's heads; {dn.boxes.shape[0]} Darknet "
                         f"boxes, {got} matched")
    return box, obj, cls


def compare_weights(model, darknet_file: Path, out: Path) -> str:
    """Write the model's .weights and compare with Darknet's file: 'identical' or what differs."""
    from utils.darknet.weights import save_weights
    save_weights(model, out)
    a, b = out.read_bytes(), darknet_file.read_bytes()
    if a == b:
        return 'identical'
    if len(a) != len(b):
        return f"size {len(a):,} B, Darknet {len(b):,} B"
    head = 'header differs, ' if a[:20] != b[:20] else ''
    fa, fb = np.frombuffer(a[20:], np.float32), np.frombuffer(b[20:], np.float32)
    return f"{head}{int((fa != fb).sum()):,} of {fa.size:,} floats differ"


def compare_opencv(dn: DarknetRun, x: np.ndarray) -> str:
    """cv2.dnn's outputs (rows: cell-major, anchor-minor) against Darknet's boxes: max abs difference, or why not."""
    import cv2
    try:
        net = cv2.dnn.readNetFromDarknet(str(dn.dir / 'net.cfg'), str(dn.dir / 'darknet.weights'))
        net.setInput(x[None])
        outs = net.forward(net.getUnconnectedOutLayersNames())
    except cv2.error as e:  # "OpenCV(4.x) file:line: error: (-212:Parsing error) Unsupported layer type: sam in ..."
        msg = str(e).split('error: ', 1)[-1].split(') ', 1)[-1].split(' in function')[0].strip()
        return 'cannot read: ' + msg[:60]
    if len(outs) != len(dn.heads):
        return f"{len(outs)} outputs for {len(dn.heads)} heads"
    err, got = 0.0, 0
    for o, hd in zip(outs, dn.heads):
        o = o.reshape(-1, o.shape[-1])[darknet_rows(dn, hd)] if o.shape[0] == hd.n * hd.h * hd.w else None
        if o is None:
            return 'other layout'
        ref = dn.boxes[got:got + len(o)]
        got += len(o)
        err = max(err, box_err(o[:, :4], ref[:, :4]))
        kept = (o[:, 5:] != 0) & (ref[:, 5:5 + hd.classes] > 0)
        if kept.any():
            err = max(err, float(np.abs(o[:, 5:] - ref[:, 5:5 + hd.classes])[kept].max()))
    return f"{err:.1e}"


def check_cfg(cfg: Path, exe: Path, work: Path, seed: int, timeout: float, size: tuple[int, int] | None,
              thin: tuple[int, int] | None, use_opencv: bool) -> Result:
    """Darknet and the project on one cfg: a Result (status and figures)."""
    text = cfg.read_text(errors='replace')
    w, h = size or small_size(text)
    text = with_size(text, w, h)
    if thin:
        text = thinned(text, *thin)
    res = Result(cfg.stem, f"{w}x{h}")
    out = work / cfg.stem
    t0 = time.time()
    image = seeded_image(h, w, seed)
    try:
        dn = run_darknet(exe, text, out, image, seed, False, timeout)
    except RuntimeError as e:
        res.status = 'not run' if str(e).startswith('net_harness:') else 'darknet fails'
        res.detail = f"{str(e)[:120]}; project: {project_build(out / 'net.cfg')}"
        return res
    res.seconds['darknet'] = round(time.time() - t0, 1)
    t0 = time.time()
    x = as_input(image)
    if use_opencv:
        res.opencv = compare_opencv(dn, x)
    try:
        model = load_project(out / 'net.cfg', out / 'darknet.weights', (h, w), out / 'project.log')
    except Exception as e:  # noqa: BLE001 (the project's refusal is a result, whatever its type)
        res.status, res.detail = 'refused', f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return res
    if len(model.module_list) != len(dn.layers):
        res.status, res.detail = 'mismatch', f"{len(model.module_list)} layers, Darknet {len(dn.layers)}"
        return res
    inputs = {hd.index - 1 for hd in dn.heads}
    try:
        kept, rows = project_forward(model, x, inputs)
    except Exception as e:  # noqa: BLE001 (a crash is a result too)
        res.status, res.detail = 'crash', f"forward: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return res
    res.seconds['project'] = round(time.time() - t0, 1)
    res.net_err = max(rel_err(kept[i], dn.output(i)) for i in sorted(inputs))
    res.weights = compare_weights(model, out / 'darknet.weights', out / 'project.weights')
    if not res.net_err <= NET_TOL:
        res.status = 'mismatch'
        res.detail = first_bad_layer(model, exe, text, out, image, seed, timeout)
        return res
    try:
        res.box_err, res.obj_err, res.cls_err = compare_boxes(dn, rows)
    except ValueError as e:
        res.status, res.detail = 'wrong boxes', str(e)[:160]
        return res
    boxes_ok = res.box_err <= BOX_TOL and max(res.obj_err, res.cls_err) <= SCORE_TOL
    res.status = 'wrong boxes' if not boxes_ok else ('match' if res.weights == 'identical' else 'weights differ')
    return res


def first_bad_layer(model, exe: Path, text: str, out: Path, image: np.ndarray, seed: int, timeout: float) -> str:
    """Rerun Darknet dumping every layer (same seed, same weights) and name the first layer that differs."""
    dn = run_darknet(exe, text, out.with_name(out.name + '-all'), image, seed, True, timeout)
    kept, _ = project_forward(model, as_input(image), set(range(len(dn.layers))))
    for i, t, _ in dn.layers:
        if i in kept and not rel_err(kept[i], dn.output(i)) <= NET_TOL:
            return f"first bad layer {i} [{t}] (err {rel_err(kept[i], dn.output(i)):.1e})"
    return 'no single layer differs beyond the tolerance'


def fmt(v: float | None) -> str:
    return '' if v is None else f"{v:.1e}"


def table(results: list[Result], markdown: bool) -> str:
    """The results as a text or markdown table."""
    cols = ['cfg', 'input', 'status', 'head inputs', 'boxes', 'objectness', 'classes', 'weights back', 'OpenCV',
            'detail']
    rows = [[r.cfg, r.size, r.status, fmt(r.net_err), fmt(r.box_err), fmt(r.obj_err), fmt(r.cls_err), r.weights,
             r.opencv, r.detail] for r in results]
    if markdown:
        lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
        lines += ['| ' + ' | '.join(c.replace('|', '/') for c in row) + ' |' for row in rows]
        return '\n'.join(lines)
    widths = [max(len(c), *(len(row[k]) for row in rows)) if rows else len(c) for k, c in enumerate(cols)]
    fmt_row = lambda row: '  '.join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip()
    return '\n'.join([fmt_row(cols)] + [fmt_row(r) for r in rows])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--darknet', type=Path, help='AlexeyAB/darknet checkout built by build.sh')
    p.add_argument('--from-json', type=Path, help="print the table of an earlier run's results.json, run nothing")
    p.add_argument('--zoo', type=Path, default=ZOO, help='folder of Darknet cfgs')
    p.add_argument('--cfgs', nargs='*', default=None, help='cfg names (stems) to run; default: every cfg in --zoo')
    p.add_argument('--work', type=Path, default=Path('/tmp/darknet-zoo-work'), help='dumps, logs, results.json')
    p.add_argument('--seed', type=int, default=SEED)
    p.add_argument('--size', type=int, nargs=2, default=None, metavar=('W', 'H'),
                   help='input size for every cfg (default: about 160x128 in multiples of each net\'s stride)')
    p.add_argument('--thin', type=int, nargs=2, default=None, metavar=('DIVISOR', 'CLASSES'),
                   help='divide every convolution\'s filters and set the classes (zoo_cfg.thinned)')
    p.add_argument('--timeout', type=float, default=600, help='seconds per Darknet run')
    p.add_argument('--threads', type=int, default=1, help='torch threads')
    p.add_argument('--keep', action='store_true', help='keep the weights and layer dumps of every cfg in --work '
                   '(tens of GB for the whole zoo); by default only logs, cfgs, inputs and boxes stay')
    p.add_argument('--no-opencv', action='store_true')
    p.add_argument('--markdown', action='store_true', help='print the table as markdown (for a README)')
    return p


def main(opt: argparse.Namespace) -> int:
    """Run the cfgs, print the table, write work/results.json; exit 1 when any cfg Darknet runs does not match."""
    if opt.from_json:
        print(table([Result(**r) for r in json.loads(opt.from_json.read_text())], opt.markdown))
        return 0
    if not opt.darknet:
        sys.exit("zoo.py: --darknet DARKNET_CHECKOUT is required (or --from-json results.json)")
    import torch
    torch.set_num_threads(opt.threads)
    opt.work.mkdir(parents=True, exist_ok=True)
    exe = harness_binary(opt.darknet.resolve(), opt.work)
    cfgs = sorted(opt.zoo.glob('*.cfg')) if not opt.cfgs else [opt.zoo / f"{Path(c).stem}.cfg" for c in opt.cfgs]
    results = []
    for cfg in cfgs:
        if not cfg.is_file():
            sys.exit(f"zoo.py: {cfg}: cfg not found")
        r = check_cfg(cfg, exe, opt.work, opt.seed, opt.timeout, tuple(opt.size) if opt.size else None, opt.thin,
                      not opt.no_opencv)
        if not opt.keep:  # full-size weights and every-layer dumps reach 0.5 GB per cfg, 40 GB for the zoo
            for d in (opt.work / cfg.stem, opt.work / f'{cfg.stem}-all'):
                for f in [*d.glob('*.weights'), *d.glob('out_*.bin')]:
                    f.unlink()
        r.detail = r.detail.replace(str(opt.work / cfg.stem / 'net.cfg'), cfg.name)  # not the scratch copy's path
        print(f"{r.cfg}: {r.status} {r.detail}".rstrip(), file=sys.stderr, flush=True)
        results.append(r)
    (opt.work / 'results.json').write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(table(results, opt.markdown))
    return int(any(r.status not in ('match', 'darknet fails', 'not run') for r in results))


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
