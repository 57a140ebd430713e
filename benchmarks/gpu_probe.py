"""In-process probes that tests/test_gpu.py runs in a subprocess of their own (each CUDA context starts fresh).

    python benchmarks/gpu_probe.py run [--no-tf32] [--sync-report F.json] -- train.py ARGS...
        runs a script of this checkout as `python SCRIPT ARGS` would, with TF32 off (both the torch flags and
        NVIDIA_TF32_OVERRIDE, so a script that turns the flags back on still gets IEEE fp32) and/or every training
        epoch under torch.cuda.set_sync_debug_mode('warn'), the host syncs written to F.json as events
    python benchmarks/gpu_probe.py memfmt --cfg CFG [CFG...] --img-size 416 --batch 64 --steps 20 --device 0 --out F.json
        training steps (forward, backward, optimizer) with AMP, contiguous vs channels_last: images/s of each
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: `run` sets NVIDIA_TF32_OVERRIDE before torch loads cuBLAS
    import torch

ROOT = Path(__file__).resolve().parents[1]
SYNC_MESSAGE = 'synchroniz'  # torch's sync debug warning: "called a synchronizing CUDA operation"


def tf32_off() -> None:
    """IEEE fp32 matmuls and convolutions on CUDA (cuDNN convolutions default to TF32 on Ampere and later)."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def install_sync_counter(report: Path) -> None:
    """Record, per training epoch, each loss call (a micro-step), optimizer step and host sync; write to report.

    Events: ['epoch_start'], ['loss'], ['step'], ['sync', 'file:line'], ['epoch_end']. The syncs are counted only
    inside utils.train.engine.train_one_epoch (set-up, tests and checkpoints are outside it). Without CUDA no sync can be
    counted: the events still show the micro-steps and optimizer steps (the probe's wiring).
    """
    import torch

    from utils.files import atomic_write
    from utils.train import engine, loss

    cuda = torch.cuda.is_available()
    events: list[list] = []
    inside = [False]  # in a training epoch: only there a sync is the step's

    def write() -> None:
        atomic_write(report, json.dumps({'cuda': cuda, 'events': events}))

    epoch_fn = engine.train_one_epoch

    def counted_epoch(*args, **kwargs):
        events.append(['epoch_start'])
        inside[0] = True
        if cuda:
            torch.cuda.set_sync_debug_mode('warn')
        try:
            return epoch_fn(*args, **kwargs)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            inside[0] = False
            events.append(['epoch_end'])
            write()

    engine.train_one_epoch = counted_epoch  # before train.py runs, so its `from utils.train.engine import` gets this one

    loss_call = loss.ComputeLoss.__call__

    def counted_loss(self, *args, **kwargs):
        events.append(['loss'])
        return loss_call(self, *args, **kwargs)

    loss.ComputeLoss.__call__ = counted_loss

    scaler_step = torch.amp.GradScaler.step

    def counted_step(self, *args, **kwargs):
        events.append(['step'])
        return scaler_step(self, *args, **kwargs)

    torch.amp.GradScaler.step = counted_step

    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE in str(message):
            if inside[0]:
                events.append(['sync', f'{Path(filename).name}:{lineno}'])
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = record
    warnings.filterwarnings('always', message=f'.*{SYNC_MESSAGE}')  # every sync, not once per line


def sync_summary(events: list[list]) -> dict:
    """Host syncs per micro-step from gpu_probe.py's events (['epoch_start'], ['loss'], ['step'], ['sync', where],
    ['epoch_end']).

    A micro-step runs from one loss call to the next, so it holds its backward, its optimizer step if any, and the
    next batch's copy to the device. The last micro-step of an epoch also holds the epoch's closing reads: it is
    counted apart, as are the syncs before an epoch's first loss call.
    """
    plain, at_step, ends, starts, where = [], [], [], [], {}
    cur: list | None = None  # [syncs, optimizer step?] of the micro-step in progress
    for e in events:
        if e[0] == 'epoch_start':
            cur = None
            starts.append(0)
        elif e[0] == 'loss':
            if cur is not None:
                (at_step if cur[1] else plain).append(cur[0])
            cur = [0, False]
        elif e[0] == 'step' and cur is not None:
            cur[1] = True
        elif e[0] == 'sync':
            where[e[1]] = where.get(e[1], 0) + 1
            if cur is not None:
                cur[0] += 1
            elif starts:
                starts[-1] += 1
        elif e[0] == 'epoch_end':
            if cur is not None:
                ends.append(cur[0])
            cur = None
    n_steps = sum(e[0] == 'step' for e in events)
    return {'micro_steps': sum(e[0] == 'loss' for e in events), 'optimizer_steps': n_steps,
            'plain_micro_steps': len(plain), 'plain_with_sync': sum(x > 0 for x in plain),
            'syncs_per_plain_micro_step': sum(plain) / len(plain) if plain else None,
            'syncs_per_optimizer_step': sum(at_step) / len(at_step) if at_step else None,
            'epoch_start_syncs': starts, 'epoch_end_syncs': ends, 'total_syncs': sum(where.values()),
            'where': dict(sorted(where.items(), key=lambda kv: -kv[1])[:10])}


def run_script(script: str, args: list[str], no_tf32: bool, sync_report: Path | None) -> None:
    """Run a script of the checkout as its own __main__, with the probes asked for."""
    if no_tf32:
        os.environ['NVIDIA_TF32_OVERRIDE'] = '0'  # read by cuBLAS/cuDNN when they load: after this, not before
        tf32_off()
    path = (ROOT / script) if not Path(script).is_absolute() else Path(script)
    sys.path[0] = str(path.parent)  # as `python train.py`: the script's folder first
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    if sync_report is not None:
        install_sync_counter(sync_report)
    sys.argv = [str(path), *args]
    runpy.run_path(str(path), run_name='__main__')


def timed_steps(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, steps: int) -> float:
    """Seconds for `steps` AMP training steps of model on x (SGD, GradScaler for fp16), after steps // 4 warm-up."""
    import torch
    dev = x.device
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype):
            out = model(x)
        loss = sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(max(2, steps // 4)):  # cuDNN autotuning and allocations
        step()
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def memfmt(cfgs: list[str], img_size: int, batch: int, steps: int, device: str, out: Path) -> dict:
    """Training steps of each cfg's model with AMP (fp16 on CUDA, bf16 on the CPU): images/s, contiguous vs NHWC.

    The loss is the mean of the raw outputs: the model's forward and backward are what the memory format changes;
    the data loader and the YOLO loss are left out so the two timings differ by the convolutions alone.
    """
    import torch
    sys.path.insert(0, str(ROOT))
    from models import Darknet

    dev = torch.device('cpu' if device == 'cpu' else f'cuda:{device}')
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # as train.py for fixed-size batches
    dtype = torch.float16 if dev.type == 'cuda' else torch.bfloat16
    res: dict = {'img_size': img_size, 'batch_size': batch, 'steps': steps, 'amp': str(dtype).split('.')[-1],
                 'device': str(dev), 'models': {}}
    x = torch.rand(batch, 3, img_size, img_size, device=dev)
    for cfg, fmt in ((c, f) for c in cfgs for f in ('contiguous', 'channels_last')):
        r = res['models'].setdefault(Path(cfg).stem, {})
        torch.manual_seed(0)
        model = Darknet(cfg).to(dev).train()
        mf = torch.channels_last if fmt == 'channels_last' else torch.contiguous_format
        model.to(memory_format=mf)
        xi = x.contiguous(memory_format=mf)
        r[fmt] = batch * steps / timed_steps(model, xi, dtype, steps)
        if fmt == 'channels_last':
            r['faster'] = 'channels_last' if r['channels_last'] > r['contiguous'] else 'contiguous'
            r['channels_last_speedup'] = r['channels_last'] / r['contiguous']
    out.write_text(json.dumps(res))
    return res


def main(argv: list[str] | None = None) -> None:
    """Dispatch the sub-commands."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['run']:
        p = argparse.ArgumentParser(prog='gpu_probe.py run')
        p.add_argument('--no-tf32', action='store_true')
        p.add_argument('--sync-report', type=Path)
        p.add_argument('script')
        sep = argv.index('--') if '--' in argv else len(argv)
        opt = p.parse_args(argv[1:sep] + argv[sep + 1:sep + 2])
        run_script(opt.script, argv[sep + 2:], opt.no_tf32, opt.sync_report)
        return
    p = argparse.ArgumentParser(prog='gpu_probe.py memfmt')
    p.add_argument('command', choices=['memfmt'])
    p.add_argument('--cfg', nargs='+', required=True)
    p.add_argument('--img-size', type=int, default=416)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--device', default='0')
    p.add_argument('--out', type=Path, required=True)
    opt = p.parse_args(argv)
    memfmt(opt.cfg, opt.img_size, opt.batch, opt.steps, opt.device, opt.out)


if __name__ == '__main__':
    main()
