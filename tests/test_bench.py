"""benchmarks/: bench.py's parsers and table, the compat patches for the 2020 original, one bench.py --quick run on
this checkout, gpu_check.py --pack (the GPU checks' inputs) and gpu_probe.py's sync counter. The GPU checks
themselves are tests/test_gpu.py."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import COCO128, ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))

import bench  # noqa: E402  (benchmarks/ is not a package)
import compat_original  # noqa: E402
import gpu_check  # noqa: E402
import gpu_probe  # noqa: E402


def label_rows(n: int) -> int:
    """Label rows of the first n coco128 images: the targets test.py must count."""
    total = 0
    for im in sorted((COCO128 / 'images' / 'train2017').glob('*.jpg'))[:n]:
        lb = COCO128 / 'labels' / 'train2017' / f'{im.stem}.txt'
        total += sum(1 for x in lb.read_text().splitlines() if x.strip()) if lb.exists() else 0
    return total


# ---------------------------------------------------------------------------------------------------------- bench.py
def test_parse_all_row_both_table_layouts():
    """The 'all' row of the 2020 table (P R mAP F1) and of this checkout's (with mAP@0.5:0.95) parse alike."""
    old = ('               Class    Images   Targets ...\n'
           '                 all       128       929     0.375     0.44     0.424     0.38\n')
    new = 'x\r                 all           16           72        0.287        0.468        0.479    0.233  0.328\n'
    assert bench.parse_all_row(old) == {'images': 128, 'targets': 929, 'P': 0.375, 'R': 0.44, 'mAP50': 0.424}
    assert bench.parse_all_row(new)['mAP50'] == pytest.approx(0.479)
    assert bench.parse_all_row('no table') == {}


def test_summary_table_ratios():
    """Speed-ups are relative to the first checkout: rates divide, times invert, mAP gets no ratio."""
    a = {'repo': '/x/orig', 'train': {'images_per_s': 4.0, 'epoch_s': 32.0}, 'test': {'mAP50': 0.424}}
    b = {'repo': '/x/main', 'train': {'images_per_s': 6.0, 'epoch_s': 16.0}, 'test': {'mAP50': 0.423}}
    table = bench.summary_table([a, b]).splitlines()
    row = {line[:30].strip(): line[30:].split() for line in table[1:]}
    assert row['train images/s (median epoch)'][-1] == '1.50'
    assert row['train epoch s'][-1] == '2.00'
    assert row['test mAP@0.5'][-1] == '-'


def test_is_original_and_compat_patch(tmp_path):
    """The 2020 layout is recognised; the patches apply to a copy once, and refuse code they do not know."""
    (tmp_path / 'utils').mkdir()
    (tmp_path / 'utils' / 'utils.py').write_text('')
    (tmp_path / 'models.py').write_text('ONNX_EXPORT = False\n')
    assert bench.is_original(tmp_path) and not bench.is_original(ROOT)
    for p in compat_original.PATCHES:
        f = tmp_path / p.file
        f.write_text((f.read_text() if f.exists() else '') + 'x = 1\n' + p.old)
    assert len(compat_original.apply_patches(tmp_path)) == len(compat_original.PATCHES)
    for p in compat_original.PATCHES:
        assert p.new in (tmp_path / p.file).read_text()
        assert p.old not in (tmp_path / p.file).read_text().replace(p.new, '')
    assert compat_original.apply_patches(tmp_path) == []  # already applied
    # an optional patch (a change only the Nov 2020 head has) is skipped where its text is absent; required ones fail
    optional = [p for p in compat_original.PATCHES if not p.required]
    assert optional and optional[0].file == 'utils/utils.py'
    (tmp_path / 'utils' / 'utils.py').write_text('older build_targets\n')
    assert compat_original.apply_patches(tmp_path) == []
    (tmp_path / 'test.py').write_text('something else\n')
    with pytest.raises(RuntimeError, match='test.py does not apply'):
        compat_original.apply_patches(tmp_path)


def test_build_targets_patch_fixes_the_torch2_crash_with_the_same_indices():
    """The archive head's clamp_ with 0-dim float bounds raises under torch 2; the patched line clamps the same."""
    patch = next(p for p in compat_original.PATCHES if p.file == 'utils/utils.py')
    gain = torch.tensor([1, 1, 13, 13, 1, 1], dtype=torch.float32)  # (6,) xyxy grid gain of a 13x13 output
    b = a = torch.zeros(4, dtype=torch.long)

    def run(line: str) -> tuple:
        gj, gi = torch.tensor([-1, 0, 12, 15]), torch.tensor([13, 5, -2, 12])  # (4,) long grid indices
        indices = []
        exec(line, {'indices': indices, 'b': b, 'a': a, 'gj': gj, 'gi': gi, 'gain': gain})
        return indices[0]

    with pytest.raises(RuntimeError, match="can't be cast"):
        run(patch.old)
    _, _, gj, gi = run(patch.new)
    assert gj.tolist() == [0, 0, 12, 12] and gi.tolist() == [12, 5, 0, 12] and gj.dtype == torch.long


@pytest.mark.slow
def test_compat_install_restores_numpy_names():
    """install() brings back the numpy aliases the 2020 code uses (in a subprocess: it changes torch.load)."""
    code = ('import compat_original, numpy as np, torch; compat_original.install(); '
            'assert np.int is int and np.float is float and callable(np.trapz); '
            'assert torch.load._compat_original')
    subprocess.run([sys.executable, '-c', code], cwd=ROOT / 'benchmarks', check=True)


@pytest.mark.slow
def test_quick_run_this_checkout(tmp_path, capsys):
    """`bench.py --quick` on 8 images: the figures agree with the run (counts, rates from times, the JSON)."""
    out = tmp_path / 'r.json'
    results = bench.main(['--quick', '--images', '8', '--json', str(out)])
    printed = capsys.readouterr().out
    r = results[0]
    assert r['images'] == 8 and not r['compat']
    # loader: 1 timed epoch of the 8 images, the rate is those images over the time taken
    assert r['loader']['images'] == 8
    assert r['loader']['images_per_s'] == pytest.approx(8 / r['loader']['seconds'])
    # test.py: counted the 8 images and every label row of them; the loop is part of the command
    assert (r['test']['images'], r['test']['targets']) == (8, label_rows(8))
    assert 0 <= r['test']['mAP50'] <= 1 and r['test']['loop_s'] < r['test']['wall_s']
    assert r['test']['loop_images_per_s'] == pytest.approx(8 / r['test']['loop_s'])
    # train: --quick is 1 epoch, timed alone; images/s is 8 images over the epoch time, as printed
    t = r['train']
    assert len(t['epochs_s']) == 1 and t['epoch_s'] == t['epochs_s'][0] == t['first_epoch_s'] < t['wall_s']
    assert t['images_per_s'] == pytest.approx(8 / t['epoch_s'])
    m = re.search(r'epoch ([\d.]+) s = ([\d.]+) images/s', printed)
    assert float(m.group(2)) == pytest.approx(8 / float(m.group(1)), rel=0.02)  # from the rounded printed figures
    assert t['maxrss_mb'] > 100 and t['peak_pss_mb'] > 100  # a process that imported torch and built a model
    saved = json.loads(out.read_text())
    assert saved['results'][0]['train']['epoch_s'] == t['epoch_s'] and saved['machine']['cores'] >= 1
    assert 'train images/s (median epoch)' in printed


# ------------------------------------------------------------------------------------------------- gpu_check.py
def test_gpu_check_pack_copies_exactly_the_inputs(tmp_path):
    """--pack copies the weights, names, samples, images and labels, nothing else, and refuses more than the limit."""
    src = tmp_path / 'src'
    for rel in ('coco128/images/train2017/a.jpg', 'coco128/labels/train2017/a.txt', 'coco128/coco.names',
                'coco128/annotations/instances.json', 'weights/yolov3-tiny.weights', 'samples/bus.jpg',
                'samples/zidane.jpg', 'samples/other.jpg'):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b'x' * 100)
    inputs = gpu_check.Inputs(src / 'coco128', src / 'weights' / 'yolov3-tiny.weights', src / 'samples')
    assert gpu_check.pack(inputs, tmp_path / 'pack') == 600  # 6 files of 100 bytes
    got = sorted(str(p.relative_to(tmp_path / 'pack')) for p in (tmp_path / 'pack').rglob('*') if p.is_file())
    assert got == ['coco128/coco.names', 'coco128/images/train2017/a.jpg', 'coco128/labels/train2017/a.txt',
                   'samples/bus.jpg', 'samples/zidane.jpg', 'weights/yolov3-tiny.weights']
    with pytest.raises(SystemExit, match='over 0 MiB'):
        gpu_check.pack(inputs, tmp_path / 'pack2', limit_mib=0.0001)
    assert not (tmp_path / 'pack2').exists()
    with pytest.raises(SystemExit, match='holds the inputs'):  # packing a folder into itself would delete it
        gpu_check.pack(inputs, src)
    assert (src / 'weights' / 'yolov3-tiny.weights').exists()
    with pytest.raises(SystemExit, match=r'missing input: .*nothing'):
        gpu_check.main(['--pack', str(tmp_path / 'pack3'), '--data-dir', str(tmp_path / 'nothing')])
    assert not (tmp_path / 'pack3').exists()


def test_gpu_probe_sync_summary_counts_per_micro_step():
    """Syncs fall into the micro-step (loss call to loss call) they happen in; optimizer steps, an epoch's start and
    its last micro-step (the closing reads) are counted apart; where they happen is tallied."""
    ev = [['epoch_start'], ['sync', 'train.py:1'],
          ['loss'], ['step'], ['sync', 'engine.py:9'], ['sync', 'engine.py:9'],  # micro-step 0: optimizer step
          ['loss'],  # micro-step 1: nothing
          ['loss'], ['sync', 'engine.py:5'],  # micro-step 2: a stray read
          ['loss'], ['sync', 'engine.py:7'], ['epoch_end'],  # last: the epoch's closing read
          ['epoch_start'], ['loss'], ['loss'], ['epoch_end']]
    s = gpu_probe.sync_summary(ev)
    assert (s['micro_steps'], s['optimizer_steps'], s['plain_micro_steps']) == (6, 1, 3)
    assert s['plain_with_sync'] == 1 and s['syncs_per_plain_micro_step'] == pytest.approx(1 / 3)
    assert s['syncs_per_optimizer_step'] == 2.0
    assert s['epoch_start_syncs'] == [1, 0] and s['epoch_end_syncs'] == [1, 0]
    assert s['total_syncs'] == 5 and list(s['where'])[0] == 'engine.py:9' and s['where']['engine.py:9'] == 2
    empty = gpu_probe.sync_summary([['epoch_start'], ['epoch_end']])
    assert empty['micro_steps'] == 0 and empty['syncs_per_plain_micro_step'] is None


def test_gpu_probe_records_syncs_inside_training_epochs(tmp_path, monkeypatch):
    """gpu_probe's counter: sync warnings (as torch's sync debug mode raises them) are recorded with their place
    only inside train_one_epoch, between the loss calls and optimizer steps it sees; other warnings pass through."""
    import warnings

    from utils.train import engine, loss

    for obj, name in ((engine, 'train_one_epoch'), (loss.ComputeLoss, '__call__'), (torch.amp.GradScaler, 'step'),
                      (warnings, 'showwarning')):
        monkeypatch.setattr(obj, name, getattr(obj, name))  # restored after the test
    monkeypatch.setattr(loss.ComputeLoss, '__call__', lambda self, p, t: (p, t))
    scaler, opt = torch.amp.GradScaler('cpu', enabled=False), torch.optim.SGD([torch.zeros(1, requires_grad=True)])

    def epoch() -> None:
        loss.ComputeLoss.__call__(None, 1, 2)
        warnings.warn('called a synchronizing CUDA operation')
        scaler.step(opt)
        loss.ComputeLoss.__call__(None, 1, 2)

    monkeypatch.setattr(engine, 'train_one_epoch', epoch)
    report = tmp_path / 'events.json'
    gpu_probe.install_sync_counter(report)
    warnings.warn('called a synchronizing CUDA operation')  # outside an epoch: not counted
    engine.train_one_epoch()
    with pytest.warns(UserWarning, match='something else'):
        warnings.warn('something else')
    events = json.loads(report.read_text())['events']
    assert [e[0] for e in events] == ['epoch_start', 'loss', 'sync', 'step', 'loss', 'epoch_end']
    assert events[2][1].startswith('test_bench.py:')
    s = gpu_probe.sync_summary(events)
    assert (s['micro_steps'], s['optimizer_steps'], s['syncs_per_optimizer_step']) == (2, 1, 1.0)


# ---------------------------------------------------------------------------------------------------- bench_infer.py
@pytest.mark.slow
def test_bench_infer_tables_and_agreement(tmp_path, capsys):
    """bench_infer at a tiny size: both tables, every path and job timed, and the paths find the same boxes."""
    import bench_infer

    t0 = time.time()
    res = bench_infer.main(['--img-size', '128', '--images', '3', '--repeats', '2', '--job-repeats', '1',
                            '--only', 'per-image', 'jobs', '--skip', 'compile', '--json', str(tmp_path / 'r.json')])
    wall = time.time() - t0
    printed = capsys.readouterr().out
    assert 'per image: bus.jpg at 128x128' in printed and 'jobs: 3 coco128 images at 128' in printed
    paths = {r['path']: r for r in res['per_image']}
    assert {'torch fp32 channels-last', 'jit freeze + optimize_for_inference', 'onnxruntime fp32 (our export)',
            'OpenCV DNN (Darknet importer)'} <= set(paths) and all(r['ms'] > 0 for r in paths.values())
    assert [k for k, r in paths.items() if r['detect_default']] == ['onnxruntime fp32 (our export)']
    ref = paths['torch fp32 channels-last']
    assert ref['detections'] > 0
    for name, r in paths.items():  # bf16, onnxruntime and OpenCV through our NMS: the same boxes at IoU >= 0.9
        assert r['detections'] == ref['detections'] and r['agree'] == 1.0, name
        assert r['vs_opencv'] == pytest.approx(paths['OpenCV DNN (Darknet importer)']['ms'] / r['ms'])
    jobs = {r['job']: r for r in res['jobs']}
    assert set(jobs) == {'detect.py', 'detect.py --backend torch', 'OpenCV DNN script'}
    for j in jobs.values():
        assert 0 < j['first_image_s'] < j['wall_s'] < wall and j['runs'] == [j['wall_s']]
    # the jobs' --save-txt boxes against detect.py's: same classes, IoU >= 0.5 (OpenCV's plain NMS vs our merge-NMS)
    assert jobs['detect.py']['detections'] > 0 and jobs['detect.py']['agree'] == 1.0
    assert jobs['OpenCV DNN script']['agree'] >= 0.8 and jobs['detect.py --backend torch']['agree'] >= 0.8
    assert json.loads((tmp_path / 'r.json').read_text())['jobs'][0]['wall_s'] == res['jobs'][0]['wall_s']
