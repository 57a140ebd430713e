"""train.py for torchrun runs in the tests, with two test-only behaviours switched on by the environment:

YOLO_TEST_SEEN_DIR: each rank writes the images of each epoch to rank{R}_epoch{E}.txt there (one `path h w` line
per image, h w the batch's tensor size), so a test can check that the ranks saw disjoint images in whole batches.
YOLO_TEST_KILL_EPOCH=E: rank 1 of the first attempt (TORCHELASTIC_RESTART_COUNT 0) SIGKILLs itself as epoch E
starts, so a test can check the elastic restart. With YOLO_TEST_KILL_MARK=<file> as well, the kill happens in any
attempt, once: the rank that kills itself creates the file first (in a multi-agent group the agents restart their
workers with counts of their own, so the count cannot tell the first attempt). YOLO_TEST_KILL_BATCH=B moves the kill
from the epoch's start to the moment rank 1 would load its batch B (a restart then resumes inside the epoch).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py <train.py arguments>
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


class RecordingLoader:
    """A loader that appends the paths and tensor sizes of the batches it yields to a file."""

    def __init__(self, loader: Any, path: Path):
        self.loader, self.path = loader, path

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        with open(self.path, 'a') as f:
            for imgs, targets, paths, shapes in self.loader:
                f.writelines(f'{p} {imgs.shape[2]} {imgs.shape[3]}\n' for p in paths)
                f.flush()
                yield imgs, targets, paths, shapes


class KillingLoader(RecordingLoader):
    """A loader that SIGKILLs this process instead of yielding its batch number `at` (counted from the first batch it
    yields), unless kill_now() says no at that moment."""

    def __init__(self, loader: Any, at: int):
        self.loader, self.at = loader, at

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.loader):
            if i == self.at and kill_now():
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


def kill_now() -> bool:
    """Whether this is the kill the environment asks for: once (YOLO_TEST_KILL_MARK, created first), else only in
    the first attempt."""
    mark = os.environ.get('YOLO_TEST_KILL_MARK')
    if mark:
        try:
            Path(mark).touch(exist_ok=False)
        except FileExistsError:
            return False
        return True
    return os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'


def wrapped_epoch(real: Any, **kw: Any) -> Any:
    """train_one_epoch with the test behaviours above. A call trains the batches of an epoch from kw['state'].batch
    (a stop request or a periodic save ends it early, and train.py calls again from there)."""
    rank, epoch, start = int(os.environ.get('RANK', -1)), kw['epoch'], kw['state'].batch
    kill = os.environ.get('YOLO_TEST_KILL_EPOCH')
    if kill and rank == 1 and epoch == int(kill):
        at = os.environ.get('YOLO_TEST_KILL_BATCH')
        if at and int(at) >= start:  # batch `at` of the epoch is this call's (at - start)th
            kw['loader'] = KillingLoader(kw['loader'], int(at) - start)
        elif not at and start == 0 and kill_now():
            os.kill(os.getpid(), signal.SIGKILL)
    seen = os.environ.get('YOLO_TEST_SEEN_DIR')
    if seen:
        kw['loader'] = RecordingLoader(kw['loader'], Path(seen) / f'rank{rank}_epoch{epoch}.txt')
    return real(**kw)


if __name__ == '__main__':
    real_epoch = train.train_one_epoch
    train.train_one_epoch = lambda **kw: wrapped_epoch(real_epoch, **kw)
    sys.exit(train.main(train.parse_opt()))
