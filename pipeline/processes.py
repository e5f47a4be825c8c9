"""Child processes that leave with their stage.

A stage's worker processes (the sample's renderers, torchrun's training workers) must not outlive
it: Ctrl-C and SIGTERM reach the whole process group and the stage says what happened once, and
a stage killed outright (kill -9, out of memory) runs no code at all to stop them, so on Linux
the kernel does it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

from pipeline.errors import PipelineError


def die_with_parent(parent: int | None = None) -> None:
    """The kernel kills this process when the one that started it dies (Linux's PR_SET_PDEATHSIG).
    With `parent`, its pid: if it died before this was armed, this process ends now."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def dvc_execution() -> str | None:
    """The DVC command this stage runs under, as '<pid>:<start time>' of the nearest ancestor
    process running dvc (DVC names no execution to its stages, and a pid alone is reused), so the
    stages of one `dvc repro` can tell each other from a later command; None when run by hand, or
    where there is no /proc."""
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if any(os.path.basename(arg) == b"dvc" for arg in argv[:3]):  # dvc, python .../dvc, python -m dvc
            return f"{pid}:{fields[19]}"  # stat's 22nd field: the start, in clock ticks after boot
        pid = int(fields[1])
    return None


def _pool_worker(parent: int) -> None:
    # the stage got the same Ctrl-C: it stops the workers, and a worker's own traceback (20 lines
    # of KeyboardInterrupt from inside the pool) would bury the stage's one line. SIGTERM ends a
    # worker silently, as by default (the stage's handler for it came along with fork)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A ProcessPoolExecutor whose workers stop with the stage: at once when it is interrupted or
    fails (not after their tasks), and with it when it is killed outright. A worker killed on its
    own (out of memory) is one line."""
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_pool_worker, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException as e:
        manager = getattr(pool, "_executor_manager_thread", None)  # shutdown() forgets it
        # stopped now, not after their tasks; Python 3.14 has pool.kill_workers(), before it the
        # processes are in _processes
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        # a worker killed while sending its result leaves the pool's reader waiting for the rest,
        # and the exit waits for that reader: closing the stage's own end of the pipe ends the wait
        with contextlib.suppress(Exception):
            pool._result_queue._writer.close()
        pool.shutdown(wait=False, cancel_futures=True)
        # the pool's thread closes its wake-up pipe as it ends, and the interpreter's exit writes
        # to that pipe without a lock (CPython gh-125451, fixed in later releases than 3.11.7): now
        # and then 16 lines of "Exception ignored ... Bad file descriptor" after the stage's one.
        # Its workers are gone, so it ends within moments; the timeout only bounds a surprise
        if manager is not None:
            manager.join(timeout=10)
        if isinstance(e, BrokenProcessPool):
            raise PipelineError("a worker process of this stage ended abruptly (killed, or out of memory?); "
                                "no output was left half-written") from None
        raise
    pool.shutdown()
