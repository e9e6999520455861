"""Processes die with their run: a worker (process pool, notebook kernel, sharded process) asks
Linux to kill it the moment its parent dies (PR_SET_PDEATHSIG), so that nothing writes into the
run folder after the main process is gone, whatever killed it."""
from __future__ import annotations

import os
import signal
import sys


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Linux: `sig` to this process when its parent dies. `parent`: the pid it must still have
    (if it died before this call, exit now)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def pool_worker_init(parent: int, nice: int = 0) -> None:
    """A process pool's initializer: die with the pool's owner `parent`, at CPU priority `nice`."""
    die_with_parent(signal.SIGKILL, parent)
    if nice:
        os.nice(nice)
