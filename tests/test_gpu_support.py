"""What the GPU checks rely on: tests/gpu_report.py (a JSON line per test on disk as it ends, the logs archive, the
budget, gpu tests skipped without CUDA) and tests/gpu_support.py's helpers (process-tree kill, box matching)."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.gpu_support import error_lines, kill_tree, match_confident, max_state_diff

PLUGIN_TESTS = '''
import os, signal
import pytest

def log_dir(request):
    return request.config.pluginmanager.get_plugin('gpu_report').logs_dir

def test_pass(request, record_property):
    (log_dir(request) / 'first.log').write_text('first output')
    record_property('images_per_s', 12.5)
    record_property('objects', {'bus': {'person': 4}})

def test_fail(record_property):
    record_property('mAP50', 0.3)
    assert 0.3 > 0.42, 'mAP@0.5 0.300, expected 0.423'

def test_skip():
    pytest.skip('needs test_fp32, which gave no figure')

@pytest.mark.gpu
def test_on_gpu():
    pass

def test_killed(request):
    (log_dir(request) / 'second.log').write_text('killed while running')
    os.kill(os.getpid(), signal.SIGKILL)  # as the device tool's time limit: nothing after this runs

def test_never_reached():
    pass
'''


def run_plugin(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest on PLUGIN_TESTS in tmp_path with tests/gpu_report.py loaded as a plugin (not this suite's conftest)."""
    (tmp_path / 'test_plugin.py').write_text(PLUGIN_TESTS)
    (tmp_path / 'pytest.ini').write_text('[pytest]\nmarkers =\n    gpu: needs CUDA\n')
    return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'tests.gpu_report', '-p', 'no:cacheprovider',
                           '-c', str(tmp_path / 'pytest.ini'), '--rootdir', str(tmp_path),
                           str(tmp_path / 'test_plugin.py'), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_report_lines_on_disk_when_the_run_is_killed(tmp_path):
    """Each test's end line (outcome, reason, recorded figures) and the logs archive are on disk as it ends: a run
    killed inside a test keeps every earlier line and log, and the killed test's start line names it."""
    report, logs = tmp_path / 'out' / 'gpu.jsonl', tmp_path / 'out' / 'logs.tar.gz'
    r = run_plugin(tmp_path, '--gpu-report', str(report), '--gpu-logs', str(logs))
    assert r.returncode == -9, r.stdout + r.stderr
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    assert lines[0]['event'] == 'session' and lines[0]['torch'] == torch.__version__ and lines[0]['budget_s'] is None
    ends = {x['test'].split('::')[1]: x for x in lines if x['event'] == 'end'}
    starts = [x['test'].split('::')[1] for x in lines if x['event'] == 'start']
    assert starts == ['test_pass', 'test_fail', 'test_skip', 'test_on_gpu', 'test_killed']
    assert list(ends) == starts[:-1] and lines[-1]['event'] == 'start'  # no end line for the killed test
    assert ends['test_pass']['outcome'] == 'passed' and ends['test_pass']['reason'] == ''
    assert ends['test_pass']['figures'] == {'images_per_s': 12.5, 'objects': {'bus': {'person': 4}}}
    assert ends['test_fail']['outcome'] == 'failed' and ends['test_fail']['figures'] == {'mAP50': 0.3}
    assert ends['test_fail']['reason'].startswith('AssertionError: mAP@0.5 0.300, expected 0.423')
    assert ends['test_skip']['outcome'] == 'skipped' and 'when' not in ends['test_skip']  # skipped in its body
    assert ends['test_skip']['reason'] == 'needs test_fp32, which gave no figure'
    gpu = ends['test_on_gpu']
    if torch.cuda.is_available():
        assert gpu['outcome'] == 'passed'
    else:
        assert gpu['outcome'] == 'skipped' and gpu['reason'].startswith('needs CUDA: torch')
    assert all(x['seconds'] >= 0 for x in ends.values())
    with tarfile.open(logs) as tar:  # rewritten after test_on_gpu: the killed test's log is not in it yet
        assert tar.getnames() == ['gpu_logs/first.log']
        assert tar.extractfile('gpu_logs/first.log').read() == b'first output'
    assert sorted(p.name for p in logs.parent.iterdir()) == ['gpu.jsonl', 'logs.tar.gz']  # no temporary files


@pytest.mark.slow
def test_budget_skips_the_tests_left(tmp_path):
    """--gpu-budget: once it has run out, every test left is skipped, saying so, and the finish line counts them;
    --junitxml works beside it."""
    report, xml = tmp_path / 'gpu.jsonl', tmp_path / 'gpu.xml'
    r = run_plugin(tmp_path, '--gpu-budget', '0.001', '--gpu-report', str(report), '--junitxml', str(xml))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    ends = [x for x in lines if x['event'] == 'end']
    assert len(ends) == 6 and all(x['outcome'] == 'skipped' for x in ends)
    assert all(x['reason'].startswith('budget: the --gpu-budget of 0 s ran out') for x in ends), ends
    assert lines[0]['budget_s'] == 0.001
    assert lines[-1]['event'] == 'finish' and (lines[-1]['skipped'], lines[-1]['passed']) == (6, 0)
    assert xml.read_text().count('<skipped type="pytest.skip" message="budget: the --gpu-budget') == 6


@pytest.mark.slow
def test_kill_tree_reaches_children_in_their_own_session():
    """As torchrun's workers: a child in a session of its own dies with its parent (a process-group kill misses it)."""
    code = ('import subprocess, sys, time; '
            'c = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True); '
            'print(c.pid, flush=True); time.sleep(60)')
    parent = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    kill_tree(parent.pid)
    assert parent.wait(10) == -9
    for _ in range(100):  # the child is not ours to wait for: poll until it is gone (or a zombie of init)
        stat = Path(f'/proc/{child}/stat')
        if not stat.exists() or stat.read_text().rsplit(')', 1)[1].split()[0] == 'Z':
            break
        time.sleep(0.05)
    else:
        pytest.fail(f'child {child} still running')


def test_confident_boxes_only():
    """fp16 vs fp32 detections: a box below the confidence threshold may be missing, a confident one may not, and
    a confident box must overlap its match (same class) well; the error line is picked from a command's output."""
    ref = [[0, 0.5, 0.5, 0.2, 0.2, 0.9], [5, 0.2, 0.2, 0.1, 0.1, 0.31]]
    same = [[0, 0.5, 0.5, 0.2, 0.2, 0.89]]  # the 0.31 box fell under detect.py's 0.3 in fp16: allowed
    assert match_confident(ref, same) == (1, pytest.approx(1.0))
    shifted = [[0, 0.6, 0.5, 0.2, 0.2, 0.9]]
    assert match_confident(ref, shifted)[1] == pytest.approx(0.02 / 0.06)
    assert match_confident(ref, [[1, 0.5, 0.5, 0.2, 0.2, 0.9]]) == (1, 0.0)  # another class: no match
    assert match_confident([[5, 0.2, 0.2, 0.1, 0.1, 0.31]], []) == (0, 1.0)
    out = 'Traceback (most recent call last):\n  File "x"\nRuntimeError: CUDA out of memory\nexit\n'
    assert error_lines(out) == 'RuntimeError: CUDA out of memory'
    a = {'w': torch.zeros(3), 'n': torch.tensor(2)}
    assert max_state_diff(a, {'w': torch.tensor([0, 0, 3e-5]), 'n': torch.tensor(2)}) == pytest.approx(3e-5)
    assert max_state_diff(a, {'w': torch.zeros(4), 'n': torch.tensor(2)}) == float('inf')
