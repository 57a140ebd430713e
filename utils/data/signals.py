"""Preemption signals and DataLoader workers: workers leave SIGTERM and SIGUSR1 to the main process, which saves and
then shuts them down (SLURM and spot-instance preemption signal the whole process group).

PreemptionSafeLoader starts its workers with both signals blocked; ignore_preemption_signals, run in each worker's
worker_init_fn, unblocks them as the worker should see them. Loaders still open at interpreter exit are closed before
multiprocessing's own exit handler runs.
"""
from __future__ import annotations

import atexit
import os
import signal
import weakref
from threading import Thread
from typing import Any

from torch.utils.data import DataLoader


def ignore_preemption_signals(main_pid: int) -> None:
    """In a DataLoader worker: ignore SIGUSR1, and SIGTERM unless it comes from the worker's own main process.

    The main process finishes its step, saves and then shuts its workers down; a worker killed first would fail that
    step. The main process itself still stops a worker with SIGTERM (the DataLoader's and multiprocessing's
    terminate() at exit), so SIGTERM is taken by a thread that reads the sender: the main process's own SIGTERM ends
    the worker as usual. A worker also exits when its main process dies (the DataLoader's watchdog checks it).
    """
    # the worker started with both blocked (PreemptionSafeLoader): one that arrived since is pending until now
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # discards a pending one
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    if not hasattr(signal, 'sigwaitinfo'):  # no sender to tell apart: ignore it, the watchdog still applies
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return
    senders = {main_pid, os.getppid()}  # the parent differs from the main process under forkserver or spawn
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler inherited from the main process
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid not in senders:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGTERM)  # the default action: end as terminate() expects

    Thread(target=wait, daemon=True, name='sigterm-from-main').start()


class PreemptionSafeLoader(DataLoader):
    """A DataLoader whose workers start with SIGTERM and SIGUSR1 blocked, so that a preemption signal sent to the
    process group while they start waits for their worker_init_fn (which ignores it) instead of killing them.

    Its persistent workers end with close() (train.py and test.py call it before returning, also on errors and
    stops), at the latest when the interpreter exits: left to garbage collection they would outlive
    multiprocessing's exit handler, whose SIGTERM torch's SIGCHLD handler then reports as a traceback.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _OPEN_LOADERS.add(self)

    def close(self) -> None:
        """Shut the workers down now: each gets the end-of-work message and is joined (terminated by the main
        process if it does not exit in time, which its SIGTERM rule lets through). The next iteration starts new
        ones; a loader without workers has nothing to close."""
        it, self._iterator = self._iterator, None
        if it is not None and hasattr(it, '_shutdown_workers'):
            it._shutdown_workers()

    def __iter__(self) -> Any:
        if not self.num_workers or not hasattr(signal, 'pthread_sigmask'):
            return super().__iter__()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})  # inherited by the workers
        try:
            return super().__iter__()
        finally:  # the main process's own handlers run now for anything that arrived meanwhile
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


_OPEN_LOADERS: weakref.WeakSet[PreemptionSafeLoader] = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    """At interpreter exit, before multiprocessing's own exit handler (registered earlier, so run later) terminates
    the children: shut down the workers of every loader still open (one made through the evaluate() API, say)."""
    for loader in list(_OPEN_LOADERS):
        loader.close()
