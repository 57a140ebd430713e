"""The project's one logger ('yolov3'): modules log through LOGGER, scripts call setup_logging(rank) once.

After torchvision's setup_for_distributed: rank 0 (or a single process) prints, every other rank stays quiet, and no
function needs a `log` argument or a rank check: setup_logging(rank) decides once, and progress bars ask
shows_progress(). Messages are plain text on stdout as print() gave them; warnings get a 'WARNING: ' prefix (after the
record's `prefix` extra, e.g. a dataset's 'train: ') and errors go to stderr with 'ERROR: '. Until a script calls
setup_logging the logger only propagates (a library user's own logging configuration, or pytest's caplog, sees the
records).
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
    """The message as print() gave it, with 'WARNING: ' / 'ERROR: ' in front of warnings and errors; a record whose
    message starts with its `prefix` extra ('train: ', LOGGER.warning(msg, extra={'prefix': ...})) gets the tag
    after that prefix ('train: WARNING: ...')."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        tag = 'ERROR: ' if record.levelno >= logging.ERROR else 'WARNING: ' if record.levelno >= logging.WARNING else ''
        prefix = getattr(record, 'prefix', '')
        if tag and prefix and msg.startswith(prefix):
            return prefix + tag + msg[len(prefix):]
        return tag + msg


QUIET = logging.CRITICAL + 1  # LOGGER's level on the ranks that stay quiet: no record passes


def setup_logging(rank: int = -1, level: int = logging.INFO) -> logging.Logger:
    """Send LOGGER's records to stdout (errors to stderr) on rank -1/0; on every other rank LOGGER lets no record
    through and shows_progress() is False. Calling it again replaces the set-up."""
    for h in [h for h in LOGGER.handlers if isinstance(h, _StdStream)]:
        LOGGER.removeHandler(h)
    out, err = _StdStream(), _StdStream(err=True)
    out.addFilter(lambda r: r.levelno < logging.ERROR)
    err.setLevel(logging.ERROR)
    for h in (out, err):
        h.setFormatter(_Plain('%(message)s'))
        LOGGER.addHandler(h)
    LOGGER.setLevel(level if rank in (-1, 0) else QUIET)
    LOGGER.propagate = False  # printed here once, not again by a root handler
    return LOGGER


def shows_progress() -> bool:
    """Whether this process draws progress bars (tqdm): yes, except on the ranks setup_logging silenced."""
    return LOGGER.level < QUIET
