"""DataLoader workers end before the process does: train.py, test.py and a script using the evaluate() API finish
without a traceback, and a loader's close() ends its persistent workers."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_WEIGHTS, make_subset

pytestmark = pytest.mark.slow

CFG = ROOT / 'cfg' / 'yolov3-tiny.cfg'


def assert_clean(r: subprocess.CompletedProcess) -> None:
    """Exit status 0 and nothing in the whole output (stderr included) that a user would read as a failure."""
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    for bad in ('Traceback', 'Exception ignored', 'is killed by signal'):
        assert bad not in out, out[-3000:]


@pytest.fixture(scope='module')
def coco8(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp('coco8'), 8, name='coco8')


# Run first in the child: multiprocessing's exit handler (which terminates the children left) is registered, then a
# hook that runs just before it (atexit is last in, first out) and counts the children it would terminate. A worker
# terminated there makes torch's SIGCHLD handler raise, but only when the signal wins a race: the count is certain.
COUNT_AT_EXIT = ("import atexit, multiprocessing.util, runpy, sys; "
                 "atexit.register(lambda: print('workers left at exit:', len(multiprocessing.active_children()))); "
                 "sys.argv = sys.argv[1:]; sys.path.insert(0, {root!r}); runpy.run_path(sys.argv[0], run_name='__main__')")


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """python SCRIPT ARGS... in cwd, with the count of workers left at exit printed last."""
    return subprocess.run([sys.executable, '-c', COUNT_AT_EXIT.format(root=str(ROOT)), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_training_with_workers_ends_without_a_traceback(coco8, tmp_path):
    r = run([str(ROOT / 'train.py'), '--cfg', str(CFG), '--data', str(coco8), '--weights', str(TINY_WEIGHTS),
             '--img-size', '128', '--epochs', '1', '--batch-size', '4', '--device', 'cpu', '--workers', '2'], tmp_path)
    assert_clean(r)
    assert 'workers left at exit: 0' in r.stdout
    assert 'Results saved to results.txt' in r.stdout and (tmp_path / 'weights' / 'last.pt').is_file()
    assert '2 dataloader workers' in r.stdout  # the run this test is about had workers to end


def test_testpy_with_workers_ends_without_a_traceback(coco8, tmp_path):
    r = run([str(ROOT / 'test.py'), '--cfg', str(CFG), '--data', str(coco8), '--weights', str(TINY_WEIGHTS),
             '--img-size', '128', '--batch-size', '4', '--device', 'cpu', '--workers', '2', '--save-dir', str(tmp_path)],
            tmp_path)
    assert_clean(r)
    assert 'Speed:' in r.stdout and 'workers left at exit: 0' in r.stdout


def test_evaluate_api_script_ends_without_a_traceback(coco8, tmp_path):
    """A user's script: its own loader (persistent workers, never closed) through evaluate(); the interpreter's exit
    shuts the workers down before multiprocessing terminates them."""
    script = tmp_path / 'score.py'
    script.write_text(textwrap.dedent(f"""
        import torch
        from models import load_eval_model
        from test import EvalConfig, evaluate, val_loader
        from utils.data.config import load_data_config

        data = load_data_config({str(coco8)!r})
        model = load_eval_model({str(TINY_WEIGHTS)!r}, {str(CFG)!r}, 128, torch.device('cpu'), torch.float32)
        loader = val_loader(data, 128, 4, model, False, 2)
        assert loader.num_workers == 2
        r = evaluate(model, loader, data['names'], EvalConfig(plots=False, save_dir={str(tmp_path)!r}))
        print('mAP@0.5', r.map50)
    """))
    r = run([str(script)], tmp_path)
    assert_clean(r)
    assert 'mAP@0.5' in r.stdout and 'workers left at exit: 0' in r.stdout


def test_close_ends_the_persistent_workers_and_the_loader_still_works(coco8):
    import multiprocessing

    from utils.data.config import load_data_config
    from utils.data.datasets import DatasetOptions, LoaderOptions, create_dataloader

    opts = DatasetOptions(img_size=64, batch_size=4, rect=True, stride=32, nc=80)
    loader, _ = create_dataloader(load_data_config(coco8)['valid'], opts, LoaderOptions(workers=2, shuffle=False))
    before = set(multiprocessing.active_children())
    first = [imgs.shape[0] for imgs, *_ in loader]
    workers = set(multiprocessing.active_children()) - before
    assert first == [4, 4] and len(workers) == 2  # persistent: alive between epochs
    loader.close()
    assert not any(w.is_alive() for w in workers) and not set(multiprocessing.active_children()) & workers
    loader.close()  # closing twice, or a loader whose workers are gone, is fine
    assert [imgs.shape[0] for imgs, *_ in loader] == first  # the next epoch starts new workers
    loader.close()
