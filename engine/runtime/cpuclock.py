"""The clock of the cost ledger's stage steps: CPU time of the worker's thread plus polars' compute threads.

A stage step runs on the worker's thread, but polars does its work on its own pool (``polars-N`` threads), so the
thread's own CPU (``time.thread_time``) misses most of it, while the process's CPU (``time.process_time``) also
counts the driver's threads, which serve read-ahead meanwhile. On Linux this clock adds the ``polars-N`` threads'
time on CPU (``/proc/self/task/<tid>/schedstat``, ns) to this thread's; elsewhere it is the process's CPU.
"""

from __future__ import annotations

import os
import time

_RESCAN_EVERY = 512  # readings between looks for new polars threads (the pool starts with its first query)


class StageCpuClock:
    """A callable: seconds of CPU of the calling thread plus polars' pool threads (see the module docstring)."""

    def __init__(self) -> None:
        self._linux = os.path.isdir("/proc/self/task")
        self._fds: dict[str, int] = {}
        self._calls = 0

    def _scan(self) -> None:
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return
        for tid in tids:
            if tid in self._fds:
                continue
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
                if name.startswith("polars-") and name[7:].isdigit():
                    self._fds[tid] = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
            except OSError:
                continue

    def __call__(self) -> float:
        if not self._linux:
            return time.process_time()
        self._calls += 1
        if self._calls % _RESCAN_EVERY == 1:
            self._scan()
        ns = 0
        for tid, fd in list(self._fds.items()):
            try:
                ns += int(os.pread(fd, 64, 0).split()[0])
            except (OSError, ValueError, IndexError):
                os.close(fd)  # the thread is gone: what it did was counted while it ran
                del self._fds[tid]
        return time.thread_time() + ns / 1e9
