"""utils/files.atomic_write: the one writer behind model, weights, checkpoint and export files (fast tier)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from utils.files import atomic_write


def test_writes_bytes_text_and_writer_functions(tmp_path):
    assert atomic_write(tmp_path / 'a' / 'b.bin', b'\x00\x01') == tmp_path / 'a' / 'b.bin'  # folders created
    assert (tmp_path / 'a' / 'b.bin').read_bytes() == b'\x00\x01'
    atomic_write(tmp_path / 'c.txt', 'größe\n')
    assert (tmp_path / 'c.txt').read_text(encoding='utf-8') == 'größe\n'
    atomic_write(tmp_path / 'd.pt', lambda f: torch.save({'w': torch.arange(3)}, f))
    assert torch.equal(torch.load(tmp_path / 'd.pt', weights_only=True)['w'], torch.arange(3))
    atomic_write(tmp_path / 'e.txt', lambda f: np.savetxt(f, np.eye(2), fmt='%g'))
    assert (tmp_path / 'e.txt').read_text().split() == ['1', '0', '0', '1']
    assert sorted(p.name for p in tmp_path.rglob('*')) == ['a', 'b.bin', 'c.txt', 'd.pt', 'e.txt']  # no temp files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / 'last.pt'
    f.write_bytes(b'the previous checkpoint')

    def half_then_fail(fh):
        fh.write(b'half of a new one')
        raise OSError('No space left on device')

    with pytest.raises(OSError, match='No space left'):
        atomic_write(f, half_then_fail)
    assert f.read_bytes() == b'the previous checkpoint'
    assert [p.name for p in tmp_path.iterdir()] == ['last.pt']


def test_permissions_are_those_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / 'w.weights', b'x')
        (tmp_path / 'plain').write_bytes(b'x')
    finally:
        os.umask(old)
    mode = (tmp_path / 'w.weights').stat().st_mode & 0o777
    assert mode == (tmp_path / 'plain').stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
