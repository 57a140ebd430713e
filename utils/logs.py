"""The project's one logger ('yolov3'): modules log through LOGGER, scripts call setup_logging(rank) once.

After torchvision's setup_for_distributed: rank 0 (or a single process) prints, every other rank stays quiet, and no
function needs a `log` argument. Messages are plain text on stdout as print() gave them; warnings get a 'WARNING: '
prefix and errors go to stderr with 'ERROR: '. Until a script calls setup_logging the logger only propagates
(a library user's own logging configuration, or pytest's caplog, sees the records).
"""
from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger('yolov3')


def reset_logging() -> logging.Logger:
    """Put LOGGER back as a library's logger: only a NullHandler (it prints nothing until configured), level unset,
    records propagated to the caller's logging configuration (or pytest's caplog)."""
    for h in list(LOGGER.handlers):
        LOGGER.removeHandler(h)
    LOGGER.addHandler(logging.NullHandler())
    LOGGER.setLevel(logging.NOTSET)
    LOGGER.propagate = True
    return LOGGER


reset_logging()


class _StdStream(logging.StreamHandler):
    """A handler writing to sys.stdout (or sys.stderr) as it is at each record, so redirections made later
    (contextlib.redirect_stdout, pytest's capsys) receive the text as they would print()'s."""

    def __init__(self, err: bool = False):
        self.err = err
        super().__init__()

    @property
    def stream(self):  # noqa: D401 - logging.StreamHandler's attribute
        """The current sys.stderr or sys.stdout."""
        return sys.stderr if self.err else sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys stream


class _Plain(logging.Formatter):
    """The message as print() gave it, with 'WARNING: ' / 'ERROR: ' in front of warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.ERROR:
            return f'ERROR: {msg}'
        if record.levelno >= logging.WARNING:
            return f'WARNING: {msg}'
        return msg


class RankFilter(logging.Filter):
    """Passes every record on rank -1 (a single process) and rank 0, none on the other ranks."""

    def __init__(self, rank: int = -1):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        """True on the rank that talks."""
        return self.rank in (-1, 0)


def setup_logging(rank: int = -1, level: int = logging.INFO) -> logging.Logger:
    """Send LOGGER's records to stdout (errors to stderr) on rank -1/0 only; calling it again replaces the set-up."""
    for h in [h for h in LOGGER.handlers if isinstance(h, _StdStream)]:
        LOGGER.removeHandler(h)
    out, err = _StdStream(), _StdStream(err=True)
    out.addFilter(lambda r: r.levelno < logging.ERROR)
    err.setLevel(logging.ERROR)
    for h in (out, err):
        h.setFormatter(_Plain('%(message)s'))
        h.addFilter(RankFilter(rank))
        LOGGER.addHandler(h)
    LOGGER.setLevel(level)
    LOGGER.propagate = False  # printed here once, not again by a root handler
    return LOGGER
