"""benchmarks/bench.py: its pure helpers, the compat patch mechanism, and one --quick run on this checkout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import bench  # noqa: E402  (benchmarks/ is not a package)
import compat_original  # noqa: E402


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
    for rel, old, _, _ in compat_original.PATCHES:
        f = tmp_path / rel
        f.write_text(f.read_text() + 'x = 1\n' + old if f.exists() else 'x = 1\n' + old)
    assert len(compat_original.apply_patches(tmp_path)) == len(compat_original.PATCHES)
    for rel, old, new, _ in compat_original.PATCHES:
        assert new in (tmp_path / rel).read_text() and old not in (tmp_path / rel).read_text().replace(new, '')
    assert compat_original.apply_patches(tmp_path) == []  # already applied
    (tmp_path / 'test.py').write_text('something else\n')
    with pytest.raises(RuntimeError, match='does not apply'):
        compat_original.apply_patches(tmp_path)


def test_compat_install_restores_numpy_names():
    """install() brings back the numpy aliases the 2020 code uses (in a subprocess: it changes torch.load)."""
    code = ('import compat_original, numpy as np, torch; compat_original.install(); '
            'assert np.int is int and np.float is float and callable(np.trapz); '
            'assert torch.load._compat_original')
    subprocess.run([sys.executable, '-c', code], cwd=ROOT / 'benchmarks', check=True)


def test_quick_run_this_checkout(tmp_path, capsys):
    """`bench.py --quick` on 8 images: every measurement runs and gives sane figures (a smoke run, not a timing)."""
    out = tmp_path / 'r.json'
    results = bench.main(['--quick', '--images', '8', '--json', str(out)])
    r = results[0]
    assert r['images'] == 8 and not r['compat']
    assert r['loader']['images_per_s'] > 0
    assert 0 < r['test']['mAP50'] <= 1 and r['test']['images'] == 8 and r['test']['wall_s'] > r['test']['loop_s']
    assert r['train']['images_per_s'] > 0 and r['train']['maxrss_mb'] > 100 and r['train']['peak_pss_mb'] > 0
    assert json.loads(out.read_text())['machine']['cores'] >= 1
    assert 'train images/s (median epoch)' in capsys.readouterr().out
