"""utils/logs.py: what reaches the terminal on the rank that talks, and nothing from the other ranks."""
from __future__ import annotations

import logging

import pytest

from utils.logs import LOGGER, reset_logging, setup_logging, shows_progress


@pytest.mark.parametrize('rank', [-1, 0])
def test_main_rank_prints_like_print(rank, capsys):
    setup_logging(rank)
    LOGGER.info('Optimizer groups: 3 .bias')
    LOGGER.warning('anchors: none fit')
    LOGGER.error('a training process failed')
    out, err = capsys.readouterr()
    assert out == 'Optimizer groups: 3 .bias\nWARNING: anchors: none fit\n'
    assert err == 'ERROR: a training process failed\n'


def test_other_ranks_stay_quiet(capsys):
    setup_logging(1)
    LOGGER.info('hello')
    LOGGER.error('bad')
    assert capsys.readouterr() == ('', '')


def test_setup_twice_prints_once(capsys):
    setup_logging(0)
    setup_logging(0)
    LOGGER.info('once')
    assert capsys.readouterr().out == 'once\n'


def test_before_setup_records_propagate(caplog):
    with caplog.at_level(logging.INFO, logger='yolov3'):
        LOGGER.info('seen by the caller')
    assert caplog.messages == ['seen by the caller']


def test_reset_gives_a_library_logger_again(caplog, capsys):
    """After a script's set-up (a command line run in-process), reset_logging: nothing printed by the project, each
    record reaches the caller's logging once (tests/conftest.py resets it around every test)."""
    setup_logging(0)
    LOGGER.info('printed')
    reset_logging()
    with caplog.at_level(logging.WARNING, logger='yolov3'):
        LOGGER.warning('once')
    assert capsys.readouterr().out == 'printed\n'
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [('yolov3', 'WARNING', 'once')]
    assert LOGGER.propagate and [type(h) for h in LOGGER.handlers] == [logging.NullHandler]


def test_warning_tag_goes_after_the_records_prefix(capsys, caplog):
    """A dataset's warnings read 'train: WARNING: ...' as they did when printed; the caller's logging sees the whole
    message, prefix included."""
    setup_logging()
    LOGGER.warning('train: labels/a.txt: skipped', extra={'prefix': 'train: '})
    LOGGER.warning('no prefix here', extra={'prefix': 'train: '})
    assert capsys.readouterr().out == 'train: WARNING: labels/a.txt: skipped\nWARNING: no prefix here\n'
    reset_logging()
    with caplog.at_level(logging.WARNING, logger='yolov3'):
        LOGGER.warning('val: x', extra={'prefix': 'val: '})
    assert caplog.messages == ['val: x']


@pytest.mark.parametrize('rank, shown', [(-1, True), (0, True), (1, False), (3, False)])
def test_progress_bars_follow_the_rank_set_up_once(rank, shown):
    assert shows_progress()  # a library's logger: bars shown, as without any set-up
    setup_logging(rank)
    assert shows_progress() is shown
    assert LOGGER.isEnabledFor(logging.ERROR) is shown  # nothing passes on the quiet ranks, errors neither
    reset_logging()
    assert shows_progress()
