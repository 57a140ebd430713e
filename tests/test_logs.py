"""utils/logs.py: what reaches the terminal on the rank that talks, and nothing from the other ranks."""
from __future__ import annotations

import logging

import pytest

from utils.logs import LOGGER, setup_logging


@pytest.fixture
def restore_logger():
    """Leave the project logger as this test found it."""
    handlers, level, propagate = list(LOGGER.handlers), LOGGER.level, LOGGER.propagate
    yield
    LOGGER.handlers[:] = handlers
    LOGGER.setLevel(level)
    LOGGER.propagate = propagate


@pytest.mark.parametrize('rank', [-1, 0])
def test_main_rank_prints_like_print(rank, capsys, restore_logger):
    setup_logging(rank)
    LOGGER.info('Optimizer groups: 3 .bias')
    LOGGER.warning('anchors: none fit')
    LOGGER.error('a training process failed')
    out, err = capsys.readouterr()
    assert out == 'Optimizer groups: 3 .bias\nWARNING: anchors: none fit\n'
    assert err == 'ERROR: a training process failed\n'


def test_other_ranks_stay_quiet(capsys, restore_logger):
    setup_logging(1)
    LOGGER.info('hello')
    LOGGER.error('bad')
    assert capsys.readouterr() == ('', '')


def test_setup_twice_prints_once(capsys, restore_logger):
    setup_logging(0)
    setup_logging(0)
    LOGGER.info('once')
    assert capsys.readouterr().out == 'once\n'


def test_before_setup_records_propagate(caplog, restore_logger):
    LOGGER.handlers[:] = [h for h in LOGGER.handlers if isinstance(h, logging.NullHandler)]
    LOGGER.propagate = True
    with caplog.at_level(logging.INFO, logger='yolov3'):
        LOGGER.info('seen by the caller')
    assert caplog.messages == ['seen by the caller']
