"""Worker processes of a sweep: they never outlive their parent and a Ctrl-C stops them cleanly.

- Ctrl-C (SIGINT, sent by a terminal to the whole process group) is the parent's to handle: workers ignore
  it, and are spawned with SIGINT blocked so that even their start-up (before the initializer runs) cannot
  print a ``KeyboardInterrupt`` traceback. The parent then cancels what is pending and stops the workers
  with SIGTERM, which a worker turns into ``SystemExit`` so the atomic writes under way remove their
  temporary files (:func:`sdpo_sim.core.io.atomic_write`), and then leaves (:func:`exit_if_stopping`).
- A worker dies with its parent, even when the parent is SIGKILLed: on Linux the kernel sends it SIGKILL
  (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon thread also watches ``os.getppid()`` and exits when the
  parent is gone. With every worker gone, the multiprocessing resource tracker (whose pipe the workers
  share) sees end-of-file and exits too.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any, Iterator, Optional

from tqdm import std as tqdm_std

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 0.5  # how often the portable fallback checks that the parent still lives
STOP_GRACE_S = 10.0  # how long a stopped worker may take to finish its SIGTERM clean-up before it is killed

_stopping = threading.Event()  # set in a worker once the parent asked it to stop (SIGTERM)


def exit_if_stopping() -> None:
    """In a worker told to stop (SIGTERM): leave now, once the run under way has unwound (its atomic writes removed
    their temporary files). ``os._exit`` is safe because a worker owns no semaphores (see :func:`init_worker`), and
    needed because the executor's worker loop would catch the ``SystemExit`` and wait for more work."""
    if _stopping.is_set():
        os._exit(128 + signal.SIGTERM)


def _on_sigterm(signum: int, frame: Any) -> None:
    """Worker SIGTERM: unwind the run under way (its ``finally`` clauses run), then :func:`exit_if_stopping`.
    Only the first one unwinds: a second SIGTERM must not interrupt that clean-up."""
    if _stopping.is_set():
        return
    _stopping.set()
    raise SystemExit(128 + signum)


def _set_parent_death_signal() -> bool:
    """Linux: have the kernel SIGKILL this process when the thread that spawned it exits (the parent's main
    thread: :meth:`WorkerPool.submit` spawns from there). Returns whether it is in place."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Portable fallback: exit at once when the parent is gone (this process was re-parented)."""
    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def init_worker(threads: int, parent: int) -> None:
    """Initializer of each worker process: signals, death with ``parent``, and ``threads`` torch threads."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    _watch_parent(parent)
    # tqdm's default lock is a multiprocessing RLock, a named semaphore registered with the resource tracker; a
    # worker that is stopped or dies with its parent would leave it behind ("leaked semaphore" warnings). Runs
    # in a worker share no progress bar, so a thread lock is enough and the worker owns no semaphore.
    tqdm_std.tqdm.set_lock(threading.RLock())
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Block SIGINT in the calling thread for the block: processes and threads started inside inherit the
    blocked mask (so workers never see a Ctrl-C), and a Ctrl-C that arrives meanwhile is delivered right after."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore further Ctrl-C while an interrupted sweep stops its workers (a second press must not leave a traceback)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


class WorkerPool:
    """Spawned worker processes, started on first use and shared by the tuning and evaluation phases."""

    def __init__(self, workers: int) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers={workers!r} must be a positive integer")
        self.workers = workers
        self._pool: Optional[cf.ProcessPoolExecutor] = None

    def get(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            with sigint_deferred():
                self._pool = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=init_worker,
                                                    initargs=(1, os.getpid()))
        return self._pool

    def submit(self, fn, *args: Any) -> cf.Future:
        """``executor.submit`` with SIGINT deferred: workers are spawned here, from the main thread."""
        with sigint_deferred():
            return self.get().submit(fn, *args)

    def reset(self) -> None:
        """Drop a broken pool (a worker died); the next :meth:`get` starts a fresh one."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def stop(self) -> None:
        """Cancel pending work and stop the workers now (SIGTERM; SIGKILL after :data:`STOP_GRACE_S`), then wait
        for the executor to wind down."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        # The executor's own table of live workers and its manager thread, taken before shutdown() drops them
        # (Python 3.14 has pool.terminate_workers() for this).
        processes = list((getattr(pool, "_processes", None) or {}).values())
        manager = getattr(pool, "_executor_manager_thread", None)
        # The manager thread cancels what has not started (cancelling futures here instead would make Python
        # 3.11's manager thread raise InvalidStateError when it then fails them for the stopped workers).
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
        for proc in processes:
            proc.join(STOP_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if manager is not None:
            manager.join(STOP_GRACE_S)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.stop()
        elif self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
