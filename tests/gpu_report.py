"""A pytest plugin for runs that may be killed at a time limit (the device tool's 600 s): one JSON line per test,
written and flushed to disk as the test starts and as it ends, the commands' logs archived after every test, and a
budget after which the remaining tests are skipped; tests marked gpu are skipped where torch sees no CUDA device.
tests/conftest.py calls add_options, configure and skip_gpu_without_cuda; elsewhere `-p tests.gpu_report` loads it.

Lines of --gpu-report: {"event": "session", machine...}, then per test {"event": "start", "test"} and
{"event": "end", "test", "outcome": passed | failed | skipped, "seconds", "reason", "figures": {...}} (figures: what
the test gave pytest's record_property, which --junitxml writes as <property> too), and {"event": "finish", counts}
when pytest ends. A run killed inside a test leaves that test's "start" line without its "end".
"""
from __future__ import annotations

import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO

import pytest

from utils.files import atomic_write


def add_options(parser) -> None:
    """--gpu-report, --gpu-logs, --gpu-budget, --gpu-inputs."""
    parser.addoption('--gpu-report', type=Path, default=os.environ.get('GPU_REPORT') or None,
                     help='write a JSON line as each test starts and ends (outcome, seconds, reason, its recorded '
                          'figures) to this file, flushed at once (default: $GPU_REPORT)')
    parser.addoption('--gpu-logs', type=Path, help="keep the output of every command the gpu tests run here: a "
                     "folder, or a .tar.gz archive rewritten after every test")
    parser.addoption('--gpu-budget', type=float, help='seconds: the tests that start after this much time are '
                     'skipped (reason: budget), and no gpu-test command runs past it')
    parser.addoption('--gpu-inputs', type=Path, help='a folder written by `benchmarks/gpu_check.py --pack` (coco128, '
                     'weights, samples) for the gpu tests; default ../shared, else gpu_inputs/ if ../shared is absent')


def configure(config) -> None:
    """Register the session's GpuReport as the plugin 'gpu_report'."""
    config.pluginmanager.register(GpuReport(config.getoption('--gpu-report'), config.getoption('--gpu-logs'),
                                            config.getoption('--gpu-budget')), 'gpu_report')


def skip_gpu_without_cuda(items) -> None:
    """Mark the gpu tests skipped, with the reason, where torch sees no CUDA device."""
    gpu = [item for item in items if item.get_closest_marker('gpu') is not None]
    if gpu:
        import torch
        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason=f'needs CUDA: torch {torch.__version__} sees no CUDA device')
            for item in gpu:
                item.add_marker(skip)


pytest_addoption = add_options  # as a plugin of its own (-p tests.gpu_report)
pytest_configure = configure


def pytest_collection_modifyitems(config, items) -> None:
    skip_gpu_without_cuda(items)


def machine() -> dict:
    """Device, cores, versions: the header of a report."""
    import torch
    info = {'cores': os.cpu_count(), 'python': platform.python_version(), 'torch': torch.__version__,
            'cuda': torch.cuda.is_available(), 'gpus': torch.cuda.device_count(), 'device': 'cpu'}
    if info['cuda']:
        info.update(device=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda)
    return info


def short_reason(report: pytest.TestReport) -> str:
    """A skip's reason, or a failure's one-line message (the exception pytest shows last)."""
    lr = report.longrepr
    if lr is None:
        return ''
    if isinstance(lr, tuple):  # skipped: (file, line, 'Skipped: reason')
        return str(lr[2]).removeprefix('Skipped: ')
    crash = getattr(lr, 'reprcrash', None)
    return (crash.message if crash is not None else str(lr).strip().splitlines()[-1])[:600]


class GpuReport:
    """The JSON lines, the logs archive and the budget of one pytest session."""

    def __init__(self, report: Path | None, logs: Path | None, budget: float | None):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget if budget else float('inf')
        self.budget = budget
        self.file: IO[str] | None = None
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(report, 'w')  # noqa: SIM115  (open for the session; closed in pytest_unconfigure)
        self.archive = logs if logs is not None and logs.name.endswith('.tar.gz') else None
        if self.archive is not None:  # the logs gather in a folder; the archive is rewritten from it
            self.logs_dir = Path(tempfile.mkdtemp(prefix='gpu_logs_'))
        else:
            self.logs_dir = logs
        if self.logs_dir is not None:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.outcomes: dict[str, dict] = {}  # nodeid -> the end line being assembled from its phases

    def seconds_left(self) -> float:
        """Seconds until the budget runs out (inf without one)."""
        return self.deadline - time.monotonic()

    def write(self, line: dict) -> None:
        """One JSON line, on disk before this returns."""
        if self.file is not None:
            self.file.write(json.dumps(line, default=str) + '\n')
            self.file.flush()
            os.fsync(self.file.fileno())

    def pytest_sessionstart(self, session) -> None:
        if self.file is not None:
            self.write({'event': 'session', **machine(), 'budget_s': self.budget})

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item) -> None:
        left = self.seconds_left()
        if left <= 0:
            pytest.skip(f'budget: the --gpu-budget of {self.budget:.0f} s ran out '
                        f'{-left:.0f} s before this test')

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self.write({'event': 'start', 'test': nodeid, 'at_s': round(time.monotonic() - self.t0, 1)})
        self.outcomes[nodeid] = {'event': 'end', 'test': nodeid, 'outcome': 'passed', 'seconds': 0.0,
                                 'reason': '', 'figures': {}}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        line = self.outcomes.get(report.nodeid)
        if line is None:
            return
        line['seconds'] = round(line['seconds'] + report.duration, 2)
        line['figures'].update(dict(report.user_properties))
        if report.outcome != 'passed' and line['outcome'] == 'passed':  # the first phase that did not pass
            line['outcome'], line['reason'] = report.outcome, short_reason(report)
            if report.when != 'call':
                line['when'] = report.when

    def pytest_runtest_logfinish(self, nodeid, location) -> None:
        line = self.outcomes.pop(nodeid, None)
        if line is not None:
            self.write(line)
        self.write_archive()

    def write_archive(self) -> None:
        """Every command log so far as one .tar.gz (atomically: a kill leaves the last complete one)."""
        if self.archive is None:
            return

        def fill(f) -> None:
            with tarfile.open(fileobj=f, mode='w:gz') as tar:
                for log in sorted(self.logs_dir.iterdir()):
                    tar.add(log, arcname=f'gpu_logs/{log.name}')

        self.archive.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.archive, fill)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        counts = {k: len(terminalreporter.stats.get(k, [])) for k in ('passed', 'failed', 'skipped', 'error')}
        self.write({'event': 'finish', **counts, 'elapsed_s': round(time.monotonic() - self.t0, 1)})

    def pytest_unconfigure(self, config) -> None:
        if self.file is not None:
            self.file.close()
