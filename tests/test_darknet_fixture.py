"""The committed Darknet [yolo] fixture (tests/fixtures/darknet_yolo) is complete and self-consistent."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures' / 'darknet_yolo'
TOOLS = ROOT / 'tools' / 'darknet_harness'


def load_tool(name: str):
    """Import a script of tools/darknet_harness by file name (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f'darknet_harness_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


check_fixture = load_tool('check_fixture')
CASE_NAMES = [c.name for c in load_tool('make_fixture').CASES]


def test_every_case_is_committed():
    assert sorted(p.stem for p in FIXTURES.glob('*.npz')) == sorted(CASE_NAMES)
    assert sum(p.stat().st_size for p in FIXTURES.glob('*.npz')) < 2_000_000


@pytest.mark.parametrize('name', CASE_NAMES)
def test_case_passes_self_check(name, capsys):
    assert check_fixture.check_case(FIXTURES / f'{name}.npz') == []
    assert 'nonzero deltas' in capsys.readouterr().out


@pytest.mark.parametrize('name', CASE_NAMES)
def test_negative_objectness_delta_is_minus_normalized_output(name):
    # Darknet's delta points from output to target: a slot with no truth has obj delta obj_normalizer * (0 - p)
    z = np.load(FIXTURES / f'{name}.npz')
    # (with objectness_smooth, slots over ignore_thresh are pushed towards their IoU instead: above -p)
    region = check_fixture.yolo_sections(str(z['cfg']), 'region')
    if region:  # [region]: the delta holds the logistic's derivative, noobject_scale * (0 - p) * p * (1 - p)
        d, o = (z[key].reshape(2, 5, -1, *z[key].shape[2:]) for key in ('delta_0', 'output_0'))
        negative = (d[:, :, 5:] == 0).all(2) & (d[:, :, 4] != 0)
        assert negative.sum() > 0.8 * negative.size
        p = o[:, :, 4][negative].astype(np.float64)
        scale = float(region[0].get('noobject_scale', 1))
        np.testing.assert_allclose(d[:, :, 4][negative], -scale * p * p * (1 - p), rtol=1e-5)
        return
    gaussian = check_fixture.yolo_sections(str(z['cfg']), 'Gaussian_yolo')
    if gaussian:  # [Gaussian_yolo]: objectness at entry 8 of 9 + classes, obj_normalizer * (0 - p)
        obj_norm = float(gaussian[0].get('obj_normalizer', 1))
        for k in range(len(z['layer_index'])):
            d, o = (z[f'{key}_{k}'].reshape(2, 3, -1, *z[f'{key}_{k}'].shape[2:]) for key in ('delta', 'output'))
            negative = (d[:, :, :8] == 0).all(2) & (d[:, :, 9:] == 0).all(2) & (d[:, :, 8] != 0)
            assert negative.sum() > 0.8 * negative.size
            np.testing.assert_allclose(d[:, :, 8][negative], -obj_norm * o[:, :, 8][negative], rtol=1e-6)
        return
    opts = check_fixture.yolo_sections(str(z['cfg']))[0]
    obj_norm = float(opts.get('obj_normalizer', 1))
    for k in range(len(z['layer_index'])):
        n = len(z[f'mask_{k}'])
        d = z[f'delta_{k}'].reshape(2, n, -1, *z[f'delta_{k}'].shape[2:])
        o = z[f'output_{k}'].reshape(d.shape)
        negative = (d[:, :, :4] == 0).all(2) & (d[:, :, 5:] == 0).all(2) & (d[:, :, 4] != 0)
        assert negative.sum() > 0.8 * negative.size
        d_obj, expect = d[:, :, 4][negative], -obj_norm * o[:, :, 4][negative]
        if int(opts.get('objectness_smooth', 0)):
            smoothed = ~np.isclose(d_obj, expect, rtol=1e-6, atol=0)
            assert smoothed.sum() < 0.05 * len(d_obj) and (d_obj[smoothed] > expect[smoothed]).all()
            d_obj, expect = d_obj[~smoothed], expect[~smoothed]
        np.testing.assert_allclose(d_obj, expect, rtol=1e-6)


def test_self_check_names_the_file_and_a_wrong_output(tmp_path):
    z = dict(np.load(FIXTURES / 'v4tiny.npz'))
    z['output_1'] = z['output_1'].copy()
    z['output_1'][0, 4, 2, 3] += 0.01
    bad = tmp_path / 'broken.npz'
    np.savez_compressed(bad, **z)
    problems = check_fixture.check_case(bad)
    assert len(problems) == 1 and str(bad) in problems[0] and 'output_1' in problems[0]
