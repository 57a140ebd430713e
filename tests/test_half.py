"""--half of test.py and detect.py: the precision chosen from the CPU's flags, bf16 mAP against fp32, fp32 decode."""
from __future__ import annotations

import re

import pytest
import torch

from models import load_model
from tests.conftest import COCO128_IMAGES, COCO_NAMES, ROOT, SAMPLES, TINY_WEIGHTS
from utils import torch_utils
from utils.logs import setup_logging
from utils.torch_utils import inference_dtype

CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'
CPU, CUDA = torch.device('cpu'), torch.device('cuda')  # a device object: no GPU needed to ask about one
FLAGS = 'processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {}\n'
HAS_BF16 = torch_utils.cpu_has_bf16()


def fake_cpu(monkeypatch, flags: str) -> None:
    """Make the cpuinfo reader see a CPU with these extra flags."""
    real = torch_utils.cpu_has_bf16
    monkeypatch.setattr(torch_utils, 'cpu_has_bf16', lambda cpuinfo=None: real(FLAGS.format(flags)))


@pytest.mark.parametrize('flags', ['avx512_bf16', 'amx_bf16 amx_tile'])
def test_cpu_with_native_bf16_runs_bf16_by_default(monkeypatch, capsys, flags):
    fake_cpu(monkeypatch, flags)
    assert [inference_dtype(h, CPU) for h in ('auto', 'on', 'bf16')] == [torch.bfloat16] * 3
    assert inference_dtype('off', CPU) == torch.float32
    with pytest.raises(ValueError, match='--half fp16 needs a CUDA device'):
        inference_dtype('fp16', CPU)
    assert capsys.readouterr().out == ''  # nothing to warn about


def test_cpu_without_bf16_runs_fp32_and_says_so_when_asked(monkeypatch, capsys):
    fake_cpu(monkeypatch, 'avx512_vnni')
    setup_logging()  # as test.py and detect.py do
    assert inference_dtype('auto', CPU) == torch.float32 and capsys.readouterr().out == ''  # the default: silent
    assert inference_dtype('on', CPU) == torch.float32
    warning = capsys.readouterr().out
    assert warning.startswith('WARNING: --half') and 'fp32' in warning and warning.count('\n') == 1
    assert inference_dtype('bf16', CPU) == torch.bfloat16  # asked for by name: run, warned it is emulated
    assert 'emulated' in capsys.readouterr().out


def test_cuda_keeps_fp32_by_default_and_fp16_for_half():
    assert inference_dtype('auto', CUDA) == torch.float32
    assert inference_dtype('on', CUDA) == inference_dtype('fp16', CUDA) == torch.float16
    assert inference_dtype('bf16', CUDA) == torch.bfloat16
    with pytest.raises(ValueError, match='expected one of'):
        inference_dtype('fp8', CPU)


@pytest.mark.slow
def test_bf16_network_decodes_boxes_in_fp32():
    model = load_model(TINY_WEIGHTS, CFG, 256).fuse()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        ref = model(x)[0]
        model.to_dtype(torch.bfloat16)
        out, raw = model(x.bfloat16())
    assert raw[0].dtype == torch.bfloat16 and out.dtype == torch.float32
    assert model.module_list[model.yolo_layers[0]].anchors.dtype == torch.float32  # 319 stays 319, not 320
    xy_err = (out[..., :2] - ref[..., :2]).abs()
    # a bf16 decode could only give multiples of 1 px above 128 (2 px above 256); fp32 keeps sub-pixel centres
    assert (out[..., :2] % 1 != 0).float().mean() > 0.9 and xy_err.median() < 0.5


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BF16, reason='this CPU has no native bf16 (bf16 would be emulated and slow)')
def test_testpy_bf16_map_within_0_003_of_fp32(tmp_path, capsys):
    from models import load_eval_model
    from test import EvalConfig, evaluate, val_loader
    from utils.data.config import load_data_config

    # the first 32 coco128 images, read in place (on 16 images single classes' APs jump: up to 0.0032 apart there)
    images = sorted(COCO128_IMAGES.glob('*.jpg'))[:32]
    (tmp_path / 'val.txt').write_text(''.join(f'{p}\n' for p in images))
    data = tmp_path / 'val32.data'
    data.write_text(f"classes=80\ntrain={tmp_path / 'val.txt'}\nvalid={tmp_path / 'val.txt'}\nnames={COCO_NAMES}\n")
    data = load_data_config(data)
    maps, loader = {}, None
    setup_logging()  # evaluate() logs its Speed line: on stdout as test.py prints it
    for half in ('off', 'auto'):  # test.py's own model loading for each --half, one loader for both
        model = load_eval_model(str(TINY_WEIGHTS), str(CFG), 320, CPU, inference_dtype(half, CPU))
        loader = loader or val_loader(data, 320, 16, model, False, 0)
        result = evaluate(model, loader, data['names'], EvalConfig(plots=False, save_dir=tmp_path))
        speed = re.search(r'Speed: .*, (\w+)$', capsys.readouterr().out, re.M)
        maps[speed.group(1)] = result.map50
    assert set(maps) == {'float32', 'bfloat16'}  # the default ran bf16 on this CPU
    assert maps['float32'] > 0.3 and abs(maps['bfloat16'] - maps['float32']) < 0.003


def xywh_iou(a: list[float], b: list[float]) -> float:
    """IoU of two normalised (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2))
    iy = max(0.0, min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


@pytest.mark.slow
def test_detect_half_finds_the_bus_and_four_persons_as_fp32(tmp_path, capsys):
    from detect import detect, parse_opt

    rows = {}
    setup_logging()  # as detect.py's main(): the model's dtype line (logged by load_eval_model) on stdout
    for half in ('off', 'on'):  # on: bf16 on a CPU with native bf16, fp32 (warned) on one without
        detect(parse_opt(['--cfg', str(CFG), '--weights', str(TINY_WEIGHTS), '--source', str(SAMPLES / 'bus.jpg'),
                          '--output', str(tmp_path / half), '--save-txt', '--half', half]))
        rows[half] = [[float(v) for v in r.split()] for r in (tmp_path / half / 'bus.txt').read_text().splitlines()]
    out = capsys.readouterr().out
    assert ('bfloat16 inference on cpu' in out) == bool(HAS_BF16)
    assert sorted(int(r[0]) for r in rows['on']) == [0, 0, 0, 0, 5]  # 4 persons, 1 bus
    for r in rows['off']:  # each fp32 box has its bf16 twin
        assert max(xywh_iou(r[1:], h[1:]) for h in rows['on'] if h[0] == r[0]) > 0.95


@pytest.mark.slow
def test_bench_half_times_three_variants_of_the_same_network():
    from benchmarks.bench_half import measure, variants

    runs = variants(str(CFG), 64, 1)
    with torch.no_grad():
        out = {k: f() for k, f in runs.items()}
    for k in ('bf16 autocast', 'bf16 weights'):  # the same boxes, to bf16's precision: like is timed against like
        assert out[k].dtype == torch.float32 and (out[k][..., :4] - out['fp32'][..., :4]).abs().median() < 0.5
    med = measure(str(CFG), 64, 1, reps=1)
    assert set(med) == set(runs) and all(s > 0 for s in med.values())
