"""The supervisor: splits an instance's shard range among worker processes, keeps them running, stops them
gracefully and aggregates their metrics.

* Workers are started with the ``spawn`` method, each with a contiguous slice of the range
  (:mod:`engine.runtime.assign`) and an owner id of its own; a restarted worker claims its shards again (a new
  epoch), which fences any leftover of the old one.
* A worker that exits with an error or is killed is restarted with exponential backoff (1 s … 30 s). One that
  exits with code 3 lost shards to another owner (their commits were refused: another instance claimed them); it
  is not restarted (a restart would claim them back and fence the other owner), and the run exits with 3
  (:data:`EXIT_FENCED`), naming the lost shards.
* ``--until-idle`` / ``--drain`` consume every event written before the command started: they read through
  ``until_bucket = (start_ms + max_clock_skew_ms) // bucket_ms``, ``start_ms`` on the database's clock (a producer
  picks an event's bucket from its own clock, which may run up to ``max_clock_skew_ms`` ahead of the database's,
  so an event acknowledged before our start may sit in any bucket up to that one). A worker reads that bucket only
  once ``lag_ms`` has passed its start, so the run first waits; it says so (a status line on a TTY,
  ``waiting_s`` in the JSON lines). If then no shard's committed position moves for ``drain_timeout_ms``, counted
  from the moment that bucket became readable, from the last progress, or from the moment the workers first were
  all started or first held every shard of the run, whichever is latest (workers not all started by
  ``drain_timeout_ms`` after that bucket became readable count as started then), the run stops every worker and
  exits 1 with the last error a worker reported, instead of restarting failing workers forever.
* SIGINT / SIGTERM: the supervisor asks every worker to stop (they finish the current bucket and commit), waits
  up to ``shutdown_timeout_ms``, then kills what is left. Workers whose supervisor died notice it (their parent
  changes) and stop on their own.
* Metrics: the workers' counters added up per worker slot, monotonic across restarts (:mod:`engine.runtime.metrics`),
  lag per shard, CPU and RSS per worker: a status line on a TTY, JSON lines otherwise (:mod:`engine.runtime.status`),
  and Prometheus text on ``metrics_port`` (bound to ``metrics_host``, 127.0.0.1 by default), refreshed every second.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

import psutil

from engine.runtime.assign import format_ranges, split
from engine.runtime.metrics import Aggregator, MetricsServer, Rate, Snapshot, prometheus
from engine.runtime.settings import StageFactory, StoreFactory, SupervisorSettings, WorkerSettings
from engine.runtime.status import StatusOutput

log = logging.getLogger("storyline.supervisor")

EXIT_OK, EXIT_FAIL, EXIT_FENCED = 0, 1, 3
RESTART_BACKOFF_MAX_S = 30.0


@dataclass
class Slot:
    index: int
    shards: list[int]
    proc: BaseProcess | None = None
    owner: str = ""
    restarts: int = 0
    backoff_s: float = 1.0
    restart_at: float = 0.0
    started_at: float = 0.0
    finished: bool = False
    fenced: bool = False  # exited with EXIT_FENCED: lost shards to another owner, not restarted
    metrics: dict[str, Any] = field(default_factory=dict)
    # The worker's own metrics queue, new at every start: a worker killed while writing to a queue can leave it
    # corrupted (a half-written message, its write lock held), and that must not cut off the other workers' metrics.
    queue: Any = None
    ps: psutil.Process | None = None


def worker_process(
    settings: WorkerSettings,
    store: StoreFactory,
    stage_factory: StageFactory,
    shards: list[int],
    owner: str,
    until_bucket: int | None,
    drain: bool,
    metrics_q: Any,
    parent_pid: int,
    log_level: int,
    group: tuple[str, int] | None = None,
) -> None:
    """Entry point of a worker process (spawned: everything arrives pickled; the factories build the rest)."""
    import asyncio

    from engine.core.errors import StorylineError
    from engine.runtime.worker import Worker

    logging.basicConfig(level=log_level, format=f"%(asctime)s worker {owner} %(levelname)s %(message)s")
    stage = stage_factory.build(owner)

    async def main() -> int:
        worker = Worker(
            settings,
            shards,
            stage,
            owner=owner,
            store=store,
            until_bucket=until_bucket,
            drain=drain,
            parent_alive=lambda: os.getppid() == parent_pid,
            group=group,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop.set)

        async def report() -> None:
            while True:
                with contextlib.suppress(Exception):
                    metrics_q.put_nowait(worker.snapshot())
                await asyncio.sleep(1.0)

        reporter = asyncio.create_task(report())
        try:
            return await worker.run()
        except Exception as exc:
            # The last snapshot carries the error that ended the worker: the supervisor reports it when a drain
            # gives up (a worker's own last_error only holds the transient errors it retried).
            named = isinstance(exc, StorylineError)
            worker.stats.last_error = str(exc) if named else f"{type(exc).__name__}: {exc}"
            raise
        finally:
            reporter.cancel()
            with contextlib.suppress(Exception):
                metrics_q.put_nowait(worker.snapshot())

    try:
        code = asyncio.run(main())
    except StorylineError as exc:
        logging.getLogger("storyline.worker").error("%s", exc)
        code = 1
    sys.exit(code)


class Supervisor:
    def __init__(
        self,
        settings: SupervisorSettings,
        store: StoreFactory,
        stage: StageFactory,
        owned: range,
        workers: int,
        *,
        until_idle: bool = False,
        drain: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
        log_level: int = logging.INFO,
        clock_offset_ms: int = 0,
        group: bool = False,
    ) -> None:
        """``store`` and ``stage``: the factories each worker process builds its store and its stage from.
        ``out`` takes the status lines (a TTY) or JSON lines, ``err`` the messages about lost shards and a
        drain that gave up (default: sys.stdout / sys.stderr at call time). ``clock_offset_ms`` is the database's
        clock minus this host's, measured by the caller: workers read by the database's clock."""
        self.settings = settings
        self.store = store
        self.stage = stage
        self.owned = owned
        self.until_idle = until_idle or drain
        self.drain = drain
        self.out = out if out is not None else sys.stdout  # at call time: sys.stdout may have been replaced
        self.err = err if err is not None else sys.stderr
        self.clock_offset_ms = clock_offset_ms
        self.log_level = log_level
        self.ctx = mp.get_context("spawn")
        # A group member (run --group): every worker slot follows the group's assignment to it; the supervisor
        # keeps the member's row alive (:class:`GroupHeartbeat`).
        self.group = group
        if group:
            self.slots = [Slot(i, []) for i in range(workers)]
        else:
            self.slots = [Slot(i, list(r)) for i, r in enumerate(split(owned, workers))]
        self.stopping = False
        self.stop_deadline = 0.0
        self.started = time.time()
        self.until_bucket: int | None = None
        # --until-idle / --drain: when until_bucket becomes readable, and progress (time.monotonic(), seconds).
        self.readable_at = 0.0
        self.progress_at = 0.0
        # When every worker first reported (it is started: spawned, imported, its stage built) and when every
        # shard of the run was first reported held (0: not yet): the drain timeout counts from each at the
        # earliest, so workers slow to start on a loaded host are not taken for workers that make no progress.
        # Each is set once: a worker that fails and is restarted does not move them.
        self.started_at = 0.0
        self.held_at = 0.0
        self.timed_out = False
        self._committed: dict[int, int] = {}  # shard → the highest committed read bucket a worker reported
        self._commits: dict[str, int] = {}  # worker owner id → its commits counter
        self._errors: dict[str, str] = {}  # worker owner id → the last error it reported
        self.last_error = ""  # the last error a worker reported (which worker: in the text)
        self.last_exit = ""  # the last abnormal worker exit
        self.lost: set[int] = set()  # shards lost to another owner (commits refused)
        self.metrics = Aggregator(len(self.slots))
        self.status = StatusOutput(self.out, settings.worker.lag_ms, len(self.slots))
        self._status_rate = Rate(self.started)
        self._prom_rate = Rate(self.started)
        self._lock = threading.Lock()
        self._prom = ""
        self._http: MetricsServer | None = None
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.heartbeat: GroupHeartbeat | None = None

    # -- processes -----------------------------------------------------------------------------------------
    def _start(self, slot: Slot) -> None:
        slot.owner = f"{self.instance}:w{slot.index}:{slot.restarts}"
        if slot.queue is not None:
            slot.queue.close()  # the previous process's queue (drained when it exited)
        slot.queue = self.ctx.Queue()
        proc = self.ctx.Process(
            target=worker_process,
            args=(
                self.settings.worker,
                self.store,
                self.stage,
                slot.shards,
                slot.owner,
                self.until_bucket,
                self.drain,
                slot.queue,
                os.getpid(),
                self.log_level,
                (self.instance, slot.index) if self.group else None,
            ),
            name=f"storyline-worker-{slot.index}",
        )
        proc.start()
        slot.proc = proc
        slot.started_at = time.monotonic()
        slot.ps = psutil.Process(proc.pid) if proc.pid else None
        if slot.ps is not None:
            with contextlib.suppress(psutil.Error):
                slot.ps.cpu_percent(None)
        what = "the group's assignment" if self.group else f"shards {format_ranges(slot.shards)}"
        log.info("worker %d started (pid %s, %s)", slot.index, proc.pid, what)

    def _check(self, slot: Slot) -> None:
        proc = slot.proc
        if slot.finished:
            return
        if proc is None:
            if self.stopping:
                slot.finished = True  # waiting for its restart: nothing to stop
            elif time.monotonic() >= slot.restart_at:
                self._start(slot)
            return
        if proc.is_alive():
            if time.monotonic() - slot.started_at > 60:
                slot.backoff_s = 1.0
            return
        code = proc.exitcode
        proc.join(0)
        self._drain_slot(slot)  # its last snapshot, before a restart replaces the queue
        self._observe(slot)
        slot.proc = None
        if code == EXIT_FENCED:
            # Another owner claimed some of its shards (it carried on with the others first). Not restarted: a
            # restart would claim them back and fence the other owner in turn.
            slot.finished = slot.fenced = True
            lost = self._fenced_shards(slot)
            if not lost:  # its last snapshot was lost with its queue: which shards is unknown, say all of them
                lost = list(slot.shards)
                log.error("worker %d lost shards to another owner; its metrics do not say which", slot.index)
            self.lost.update(lost)
            log.error("worker %d exited %d (shards lost to another owner); not restarting it", slot.index, code)
            return
        if code == 0 and (self.until_idle or self.stopping):
            slot.finished = True
            self.progress_at = time.monotonic()  # a worker that read everything it had to is progress
            return
        if code != 0:
            self.last_exit = f"worker {slot.index} exited with code {code}"
        if self.stopping:
            slot.finished = True
            return
        slot.restarts += 1
        slot.restart_at = time.monotonic() + slot.backoff_s
        log.warning("worker %d exited with %s; restart %d in %.0f s", slot.index, code, slot.restarts, slot.backoff_s)
        slot.backoff_s = min(slot.backoff_s * 2, RESTART_BACKOFF_MAX_S)

    def request_stop(self, *_: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.shutdown_timeout_ms / 1000
        for slot in self.slots:
            if slot.proc is not None and slot.proc.is_alive() and slot.proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.proc.pid, signal.SIGTERM)

    # -- metrics -------------------------------------------------------------------------------------------
    def _drain_metrics(self) -> None:
        for slot in self.slots:
            self._drain_slot(slot)

    def _drain_slot(self, slot: Slot) -> None:
        if slot.queue is None:
            return
        while True:
            try:
                m = slot.queue.get_nowait()
            except queue.Empty:
                return
            except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # broken by its killed writer
                log.warning("worker %d: metrics queue unreadable (%s); dropped", slot.index, exc)
                slot.queue = None
                return
            if m.get("owner", "") == slot.owner:
                slot.metrics = m
                self.metrics.workers[slot.index].report(slot.owner, m)

    def _fenced_shards(self, slot: Slot) -> list[int]:
        m = slot.metrics
        if m.get("owner") != slot.owner:
            return []
        return sorted(int(k) for k, v in m.get("shards", {}).items() if isinstance(v, dict) and v.get("fenced"))

    def _observe(self, slot: Slot) -> None:
        """Progress, errors and lost shards from a worker's latest snapshot. Progress: a shard's committed read
        bucket moved, or the worker's commit counter grew (contract of ``Worker.snapshot``)."""
        m = slot.metrics
        owner = str(m.get("owner", ""))
        if not owner:
            return
        if not self.started_at and all(s.metrics for s in self.slots):  # a slot's metrics: its worker's reports
            self.started_at = time.monotonic()
        progressed = False
        commits = m.get("commits")
        if isinstance(commits, int):
            progressed = commits > self._commits.get(owner, 0)
            self._commits[owner] = max(commits, self._commits.get(owner, 0))
        for key, sh in m.get("shards", {}).items():
            if not isinstance(sh, dict):
                continue
            shard = int(key)
            committed = sh.get("committed_read")
            if isinstance(committed, int) and not isinstance(committed, bool):
                before = self._committed.get(shard)
                if before is not None and committed > before:
                    progressed = True
                if before is None or committed > before:
                    self._committed[shard] = committed
        if self.until_bucket is not None and not self.held_at and all(sh in self._committed for sh in self.owned):
            self.held_at = time.monotonic()
        # A group's worker gives up shards another member took and follows the assignment (it logs which):
        # nothing is lost, and the supervisor does not count them.
        if not self.group and (fenced := set(self._fenced_shards(slot)) - self.lost):
            self.lost |= fenced
            log.error("worker %d lost shards %s to another owner (commits refused)", slot.index, format_ranges(fenced))
        error = m.get("last_error")
        if isinstance(error, str) and error and self._errors.get(owner) != error:
            self._errors[owner] = error
            self.last_error = f"worker {slot.index}: {error}"
        if progressed:
            self.progress_at = time.monotonic()

    def _waiting_s(self, now: float) -> float:
        """Seconds until the run's last bucket becomes readable (0 when it is, or when the run is open-ended)."""
        return max(0.0, self.readable_at - now) if self.until_bucket is not None else 0.0

    def _check_drain_timeout(self, now: float) -> None:
        """--until-idle / --drain: no committed position moved for drain_timeout_ms since the run's last bucket
        became readable (or since the last progress, or since the workers first were all started or first held
        every shard, if later): stop every worker, as SIGTERM does."""
        if self.until_bucket is None or self.stopping:
            return
        # Workers not all started yet get drain_timeout_ms after the bucket became readable to start, then
        # drain_timeout_ms to make progress: a worker that never starts times out after twice the timeout.
        started = self.started_at or min(now, self.readable_at + self.settings.drain_timeout_ms / 1000)
        since = max(self.readable_at, self.progress_at, started, self.held_at)
        if now - since <= self.settings.drain_timeout_ms / 1000:
            return
        self.timed_out = True
        mode = "--drain" if self.drain else "--until-idle"
        self.status.end_line()
        self.err.write(
            f"storyline: run {mode}: no shard's committed position moved for {now - since:.1f} s once the run's"
            f" last bucket was readable (drain_timeout_ms = {self.settings.drain_timeout_ms}); stopping the workers\n"
        )
        self.err.flush()
        self.request_stop()

    def _sample(self, rate: Rate) -> Snapshot:
        """The instance now; ``rate`` (the status output's or the exposition's) is advanced."""
        now = time.time()
        return self.metrics.snapshot(
            now,
            rate,
            [
                (s.proc.pid if s.proc else None, bool(s.proc and s.proc.is_alive()), s.restarts, s.fenced)
                for s in self.slots
            ],
            waiting_s=self._waiting_s(time.monotonic()),
            until_bucket=self.until_bucket,
            lost_shards=format_ranges(self.lost),
            lost_count=len(self.lost),
        )

    def _sample_processes(self) -> None:
        """CPU and memory of every worker process (CPU % over the time since the previous call)."""
        for slot in self.slots:
            self.metrics.workers[slot.index].sample(slot.ps if slot.proc is not None else None)

    def _refresh_exposition(self) -> None:
        text = prometheus(self._sample(self._prom_rate))
        with self._lock:
            self._prom = text

    def _exposition(self) -> str:
        with self._lock:
            return self._prom

    def _serve_metrics(self) -> None:
        if self.settings.metrics_port is not None:
            self._http = MetricsServer(self.settings.metrics_host, self.settings.metrics_port, self._exposition)

    # -- main ----------------------------------------------------------------------------------------------
    def exit_code(self) -> int:
        """1 when a drain gave up, else 3 when shards were lost to another owner, else 0."""
        if self.timed_out:
            return EXIT_FAIL
        return EXIT_FENCED if self.lost else EXIT_OK

    def _start_until(self) -> None:
        """--until-idle / --drain: the last bucket to read, and when it becomes readable here."""
        cfg = self.settings.worker
        host_ms = int(time.time() * 1000)
        start_ms = host_ms + self.clock_offset_ms  # the database's clock, which producers and workers go by
        # Every event acknowledged before start_ms is in a bucket <= this one: its producer chose the bucket from
        # its own clock, at most max_clock_skew_ms ahead of the database's (producers refuse a larger skew).
        self.until_bucket = (start_ms + cfg.max_clock_skew_ms) // cfg.bucket_ms
        # A worker reads bucket b once (now - lag_ms) // bucket_ms >= b on the database's clock (the lag covers
        # the bucket's own span): b * bucket_ms + lag_ms, here on this host's clock.
        readable_ms = self.until_bucket * cfg.bucket_ms + cfg.lag_ms - self.clock_offset_ms
        # kept on the monotonic clock, as every deadline here: a step of the wall clock during the run (NTP, a VM
        # resumed) moves neither the wait nor the drain timeout
        self.readable_at = time.monotonic() + (readable_ms - host_ms) / 1000
        log.info(
            "consuming through bucket %d: waiting %.1f s for the events written before this run to become readable"
            " (lag_ms = %d)",
            self.until_bucket,
            max(0.0, (readable_ms - host_ms) / 1000),
            cfg.lag_ms,
        )

    def _report_end(self) -> None:
        if self.lost:
            self.err.write(
                f"storyline: lost shards {format_ranges(self.lost)} to another owner: their commits were refused"
                f" (another `storyline run` claimed them); not consumed by this run (exit {EXIT_FENCED})\n"
            )
        if self.timed_out:
            why = self.last_error or (f"no worker reported an error; {self.last_exit}" if self.last_exit else "")
            self.err.write(f"storyline: last error: {why or 'none reported (the workers made no progress)'}\n")
        self.err.flush()

    def run(self) -> int:
        if self.until_idle:
            self._start_until()
        old_int = signal.signal(signal.SIGINT, self.request_stop)
        old_term = signal.signal(signal.SIGTERM, self.request_stop)
        self._serve_metrics()
        if self.group:
            self.heartbeat = GroupHeartbeat(self.store, self.settings, self.instance, len(self.slots))
            self.heartbeat.start()
        try:
            for slot in self.slots:
                self._start(slot)
            last_emit = last_prom = last_ps = 0.0
            interval = 1.0 if self.status.tty else 5.0
            while True:
                self._drain_metrics()
                for slot in self.slots:
                    self._observe(slot)
                    self._check(slot)
                if all(s.finished for s in self.slots):
                    break
                self._check_drain_timeout(time.monotonic())
                if self.stopping and time.monotonic() > self.stop_deadline:
                    for slot in self.slots:
                        if slot.proc is not None and slot.proc.is_alive():
                            log.error("worker %d did not stop within shutdown_timeout_ms; killing it", slot.index)
                            slot.proc.kill()
                            slot.proc.join(5)
                        slot.finished = True
                    break
                if time.monotonic() - last_ps >= 1.0:
                    self._sample_processes()
                    last_ps = time.monotonic()
                if self._http is not None and time.monotonic() - last_prom >= 1.0:
                    self._refresh_exposition()
                    last_prom = time.monotonic()
                if time.monotonic() - last_emit >= interval:
                    self.status.emit(self._sample(self._status_rate))
                    last_emit = time.monotonic()
                time.sleep(0.1)
            self._drain_metrics()
            for slot in self.slots:
                self._observe(slot)
            self._sample_processes()
            if self._http is not None:
                self._refresh_exposition()
            snap = self._sample(self._status_rate)
            self.status.end_line()
            self.status.emit(
                snap,
                final=True,
                extra={"exit": self.exit_code(), "timed_out": self.timed_out, "last_error": self.last_error},
            )
            self._report_end()
            return self.exit_code()
        finally:
            if self.heartbeat is not None:
                self.heartbeat.stop()  # after the workers released their leases: the member leaves
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            if self._http is not None:
                self._http.close()
            for slot in self.slots:
                if slot.proc is not None and slot.proc.is_alive():
                    slot.proc.kill()


class GroupHeartbeat:
    """The member's row of a group, kept alive from a thread of the supervisor: written before the workers start
    (they find their member in the group at once), refreshed every ``renew_ms`` with a TTL of ``lease_ms`` (a
    member whose supervisor died or was cut off leaves the group within ``lease_ms``), deleted at a clean stop,
    after the workers released their leases. A failed heartbeat is logged and tried again at the next tick."""

    def __init__(self, store: StoreFactory, settings: SupervisorSettings, member: str, workers: int) -> None:
        self.store_factory = store
        self.consumer = settings.worker.consumer
        self.renew_s = settings.worker.renew_ms / 1000
        self.ttl_ms = settings.worker.lease_ms
        self.member = member
        self.workers = workers
        self.started_ms = int(time.time() * 1000)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="group-heartbeat", daemon=True)
        self.beats = 0
        self.failures = 0

    def start(self, timeout_s: float = 30.0) -> None:
        """Start beating; returns after the first heartbeat was written (or ``timeout_s``)."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            log.warning("group: the first heartbeat did not get through in %.0f s; going on", timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import asyncio

        from engine.core.clock import SYSTEM_CLOCK
        from engine.core.records import Member

        async def main() -> None:
            store = self.store_factory.build(SYSTEM_CLOCK)
            opened = False
            try:
                while not self._stop.is_set():
                    try:
                        if not opened:
                            await store.open()
                            opened = True
                        now = int(time.time() * 1000)
                        row = Member(self.member, socket.gethostname(), os.getpid(), self.workers, self.started_ms, now)
                        await store.heartbeat(self.consumer, row, self.ttl_ms)
                        self.beats += 1
                        self._ready.set()
                    except Exception as exc:  # any failure: a heartbeat must never end the member
                        self.failures += 1
                        log.warning("group: heartbeat failed (%s); trying again in %.1f s", exc, self.renew_s)
                    await asyncio.get_running_loop().run_in_executor(None, self._stop.wait, self.renew_s)
                if opened:
                    with contextlib.suppress(Exception):
                        await store.leave(self.consumer, self.member)
            finally:
                self._ready.set()
                with contextlib.suppress(Exception):
                    await store.close()

        asyncio.run(main())
