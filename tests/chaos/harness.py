"""The chaos tier's machinery.

* :class:`Tenant`: a fresh tenant's config written to disk, and the ``storyline`` CLI run against it as real
  processes (``python -m engine.cli``), their output kept in files beside the config.
* :class:`Supervisor`: ``storyline run --workers N`` as a process, with its worker processes found by psutil.
* :class:`Feeder`: a producer thread delivering input files with ``storyline ingest`` while the engine runs; a
  failed run (database down) is delivered again, as a real shipper would (at least once).
* :class:`OffsetMonitor`: a thread reading the committed offsets a few times a second, to tell when every shard
  is caught up again after a fault (the recovery times in docs/RELIABILITY.md).
* :func:`finish`: ``storyline run --drain``, ``storyline verify --truth``, and the count reconciliation against
  the ingest summaries and the dead-letter store (:func:`engine.tools.verify.reconcile`).
* :meth:`Tenant.assert_restart_changes_nothing`: the story stream's promise after a final drain (issue 14): the
  engine started again (``run --drain``, then ``run --until-idle``) writes no new story row and changes no row's
  bytes, and no ``(story_id, revision)`` is stored as more than one row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import psutil

from engine.core.config import Config
from engine.core.errors import StorylineError
from engine.runtime.assign import group_assignment
from engine.store import Member, Offset, StoryRecord, make_store
from engine.tools.verify import IngestRun, VerifyReport, parse_ingest_summary, reconcile, verify

ROOT = Path(__file__).resolve().parents[2]

# Small windows so that a fault and its recovery take seconds, with the lag rule intact:
# lag_ms 3600 >= max_write_age_ms 1000 + request_timeout_ms 2000 + max_clock_skew_ms 500 + bucket_ms 100.
CHAOS: dict[str, Any] = {
    "shards": 8,
    "bucket_ms": 100,
    "max_write_age_ms": 1000,
    "request_timeout_ms": 2000,
    "max_clock_skew_ms": 500,
    "lag_ms": 3600,
    "commit_interval_ms": 300,
    "shutdown_timeout_ms": 20_000,
    "correlate": {"match_window_ms": 30_000, "max_wait_ms": 2_000, "amend_horizon_ms": 10_000},
}
CAUGHT_UP_SLACK_MS = 1_500  # caught up: every shard's committed offset within lag + this of the clock …


def caught_up_slack_ms(cfg: Config) -> int:
    """… and the buckets a worker at the head waits for before it reads them (``poll_interval_ms``)."""
    return CAUGHT_UP_SLACK_MS + max(0, cfg.poll_interval_ms - cfg.bucket_ms)


# -- configs and the CLI -------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"no TOML for {v!r}")


def to_toml(cfg: Config) -> str:
    tree = msgspec.to_builtins(cfg)
    top = [f"{k} = {_toml_value(v)}" for k, v in tree.items() if v is not None and not isinstance(v, dict)]
    tables = []
    for k, v in tree.items():
        if isinstance(v, dict):
            tables.append(f"\n[{k}]")
            tables += [f"{k2} = {_toml_value(v2)}" for k2, v2 in v.items() if v2 is not None]
    return "\n".join(top + tables) + "\n"


def storyline_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


class Tenant:
    """One test's tenant: its config file, and the CLI run against it (output kept under ``dir``)."""

    def __init__(self, cfg: Config, directory: Path) -> None:
        self.cfg = cfg
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = directory / "storyline.toml"
        self.path.write_text(to_toml(cfg))
        self._n = 0

    def argv(self, command: str, *args: str) -> list[str]:
        return storyline_argv(command, "--config", str(self.path), *args)

    def run(
        self, command: str, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            self.argv(command, *args), capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
        )
        if check:
            assert res.returncode == 0, f"storyline {command} {' '.join(args)}: exit {res.returncode}\n{res.stderr}"
        return res

    def spawn(self, name: str, command: str, *args: str) -> subprocess.Popen[bytes]:
        """A long-running CLI process; stdout and stderr go to files (a full pipe would block it)."""
        self._n += 1
        out = open(self.dir / f"{name}-{self._n}.out", "wb")  # noqa: SIM115 - closed with the process
        err = open(self.dir / f"{name}-{self._n}.err", "wb")  # noqa: SIM115
        proc = subprocess.Popen(self.argv(command, *args), stdout=out, stderr=err, cwd=ROOT)
        out.close()
        err.close()
        return proc

    def assert_verify(self, truth: Path | None = None) -> str:
        """``storyline verify [--truth T]`` exits 0 and says ``verify: OK``; returns its output."""
        res = self.run("verify", *(["--truth", str(truth)] if truth is not None else []), check=False)
        assert res.returncode == 0 and "verify: OK" in res.stdout, (
            f"storyline verify failed:\n{res.stdout}\n{res.stderr}"
        )
        return res.stdout

    def assert_restart_changes_nothing(self, truth: Path | None = None, *, workers: int = 2) -> int:
        """Call after the final drain of a test, with nothing ingested since. The story stream's promise (issue 14,
        docs/correlation.md): a restart neither rebuilds nor emits again what a drain finalized. So every story
        row (shard, period, story_id, revision, and its bytes) is read, the engine is started again twice
        (``run --drain``, then ``run --until-idle``), and after each run the rows must be exactly the same: no new
        row (such as a revision re-emitted under another period), none gone, none with other bytes. Before that,
        no ``(story_id, revision)`` may be stored as more than one row at all. ``storyline verify`` must pass at
        the end. Returns the number of story rows."""
        t0 = time.time()
        before = story_rows(self.cfg)
        assert before, "no story rows: nothing to compare (was anything consumed?)"
        assert_one_row_per_revision(before)
        for mode in ("--drain", "--until-idle"):
            res = self.run("run", "--workers", str(workers), mode, "--log-level", "WARNING", timeout=600)
            final = json.loads(res.stdout.strip().splitlines()[-1])
            assert final["final"] and all(not w["alive"] for w in final["workers"]), res.stdout[-2000:]
            assert_rows_unchanged(before, story_rows(self.cfg), f"storyline run {mode} after the final drain")
        self.assert_verify(truth)
        print(f"restart after the final drain: {len(before):,} story rows unchanged ({time.time() - t0:.1f} s)")
        return len(before)


# -- the engine as processes -------------------------------------------------------------------------------
def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Supervisor:
    """``storyline run --workers N [extra...]`` (no --until-idle: it runs until stopped or killed)."""

    def __init__(self, tenant: Tenant, workers: int = 2, extra: Sequence[str] = (), name: str = "run") -> None:
        self.tenant = tenant
        self.workers = workers
        self.err = tenant.dir / f"{name}-{tenant._n + 1}.err"  # the supervisor's and its workers' stderr
        self.proc = tenant.spawn(name, "run", "--workers", str(workers), "--log-level", "WARNING", *extra)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.Error:
            return []
        out = []
        for k in kids:
            try:
                if k.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(k.cmdline()):
                    out.append(k.pid)
            except psutil.Error:
                continue
        return out

    def wait_workers(self, timeout: float = 60) -> list[int]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"the supervisor exited with {self.proc.returncode}"
            pids = self.worker_pids()
            if len(pids) == self.workers:
                return pids
            time.sleep(0.05)
        raise AssertionError(f"the supervisor did not have {self.workers} workers within {timeout} s")

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def kill9_all(self) -> None:
        """kill -9 of the whole instance: the supervisor and its workers at once (a host that dies)."""
        for pid in [self.pid, *self.worker_pids()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        """What the supervisor and its workers wrote to stderr so far."""
        return self.err.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM: workers finish the current bucket, commit and exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def restart_backoffs(directory: Path) -> list[float]:
    """The restart delays the supervisors logged, in order ("worker 1 exited with -9; restart 2 in 2 s")."""
    logs = sorted(directory.glob("run-*.err"), key=lambda p: int(p.stem.split("-")[1]))
    found = [re.findall(r"exited with (-?\d+); restart \d+ in (\d+) s", p.read_text()) for p in logs]
    exits = [(int(code), float(delay)) for per_log in found for code, delay in per_log]
    assert all(code == -signal.SIGKILL for code, _ in exits), f"workers exited for other reasons: {exits}"
    return [delay for _, delay in exits]


# -- input ---------------------------------------------------------------------------------------------------
def simulate(directory: Path, events: int, seed: int, *options: str) -> tuple[Path, Path]:
    """``storyline simulate``: events in arrival order and their ground truth (``options``: e.g. ``--format
    zeek``, which writes that sensor's view)."""
    tag = "-".join([str(seed), *(o.lstrip("-") for o in options)])
    out, truth = directory / f"sim-{tag}.log", directory / f"sim-{tag}.truth.json"
    res = subprocess.run(
        storyline_argv(
            "simulate",
            "--set",
            "tenant=sim",
            "--out",
            str(out),
            "--truth",
            str(truth),
            "--events",
            str(events),
            "--seed",
            str(seed),
            *options,
        ),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    return out, truth


def split(src: Path, directory: Path, parts: int, bad_per_part: int = 2) -> list[Path]:
    """Cut a JSONL file into ``parts`` files, each with ``bad_per_part`` invalid lines mixed in (they must end up
    in the dead-letter store, and the counts must say so)."""
    lines = src.read_bytes().splitlines()
    size = -(-len(lines) // parts)
    out = []
    for k in range(parts):
        chunk = lines[k * size : (k + 1) * size]
        for j in range(bad_per_part):
            bad = b'{"source": "firewall", "sensor": "fw-1", "id": "bad-%d-%d"}' if j % 2 else b"not json %d-%d"
            chunk.insert((j + 1) * len(chunk) // (bad_per_part + 1), bad % (k, j))
        path = directory / f"{src.stem}.part{k:02d}.jsonl"
        path.write_bytes(b"\n".join(chunk) + b"\n")
        out.append(path)
    return out


class Feeder(threading.Thread):
    """Delivers ``files`` with ``storyline ingest``, one run per file, while the engine runs. File ``k`` starts
    when ``gate(k)`` says so (None: at once). A failed run is delivered again after a second (the database was
    down): at least once, like a real shipper; the ids make the repeats harmless."""

    def __init__(
        self,
        tenant: Tenant,
        files: Sequence[Path],
        gate: Callable[[int], bool] | None = None,
        *,
        pause_s: float = 0.0,
        give_up_s: float = 180.0,
    ) -> None:
        super().__init__(daemon=True)
        self.tenant = tenant
        self.files = list(files)
        self.gate = gate
        self.pause_s = pause_s
        self.give_up_s = give_up_s
        self.runs: list[IngestRun] = []
        self.ended: list[float] = []  # when each successful run ended
        self.failed_runs = 0
        self.rebucketed = 0
        self.error: str | None = None
        self.stopping = threading.Event()
        self.started_at = 0.0
        self.done_at = 0.0

    def run(self) -> None:
        self.started_at = time.time()
        try:
            for k, f in enumerate(self.files):
                while self.gate is not None and not self.gate(k):
                    if self.stopping.wait(0.05):
                        return
                first_try = time.time()
                while True:
                    res = self.tenant.run("ingest", str(f), check=False)
                    if res.returncode == 0:
                        self.runs.append(parse_ingest_summary(str(f), res.stdout))
                        self.ended.append(time.time())
                        self.rebucketed += int(
                            res.stdout.split("re-bucketed writes ")[1].split(";")[0].replace(",", "")
                        )
                        break
                    self.failed_runs += 1
                    if time.time() - first_try > self.give_up_s:
                        self.error = f"ingest of {f} failed for {self.give_up_s} s: {res.stderr[-2000:]}"
                        return
                    if self.stopping.wait(1.0):
                        return
                if self.pause_s and self.stopping.wait(self.pause_s):
                    return
        except Exception as exc:  # reported by finish()
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done_at = time.time()

    def finish(self, timeout: float = 300) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the feeder did not finish"
        assert self.error is None, self.error


# -- offsets -------------------------------------------------------------------------------------------------
class OffsetMonitor:
    """Reads every shard's committed offset about five times a second in a thread of its own (its own store
    connection, reopened after repeated errors so that it never waits on the engine's recovery). With
    ``members``, the group's members too. ``backwards`` collects every read where a shard's ``read_bucket`` was
    lower than at the read before (an offset that moved back: never allowed)."""

    def __init__(self, cfg: Config, *, members: bool = False) -> None:
        self.cfg = cfg
        self.offsets: dict[int, Offset] = {}
        self.members: list[Member] = []
        self.read_members = members
        self.backwards: list[tuple[int, int, int]] = []  # (shard, read_bucket before, read_bucket after)
        self.at = 0.0
        self.errors = 0
        self.replay_window_max_ms = 0  # the widest read_bucket - replay_bucket seen (what a restart replays)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True)
        self._thread.start()

    async def _loop(self) -> None:
        shards = list(range(self.cfg.shards))
        while not self._stop.is_set():
            store = make_store(self.cfg)
            try:
                await store.open()
                failures = 0
                while not self._stop.is_set() and failures < 5:
                    try:
                        offs = await store.read_offsets(self.cfg.consumer, shards)
                        members = await store.read_members(self.cfg.consumer) if self.read_members else []
                        with self._lock:
                            for o in offs:
                                prev = self.offsets.get(o.shard)
                                if prev is not None and o.read_bucket < prev.read_bucket:
                                    self.backwards.append((o.shard, prev.read_bucket, o.read_bucket))
                            self.offsets = {o.shard: o for o in offs}
                            self.members = members
                            self.at = time.time()
                            window = max((o.read_bucket - o.replay_bucket + 1 for o in offs), default=0)
                            self.replay_window_max_ms = max(self.replay_window_max_ms, window * self.cfg.bucket_ms)
                        failures = 0
                    except StorylineError:
                        failures += 1
                        self.errors += 1
                    await asyncio.sleep(0.2)
            except StorylineError:
                self.errors += 1
                await asyncio.sleep(0.5)
            finally:
                try:
                    await store.close()
                except StorylineError:
                    self.errors += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def snapshot(self, fresh_after: float = 0.0, timeout: float = 30) -> dict[int, Offset]:
        """The latest offsets, read after ``fresh_after`` (a time.time())."""
        deadline = time.time() + timeout
        while True:
            with self._lock:
                if self.at > fresh_after and len(self.offsets) == self.cfg.shards:
                    return dict(self.offsets)
            if time.time() > deadline:
                raise AssertionError(f"no fresh offsets for {timeout} s ({self.errors} read errors)")
            time.sleep(0.05)

    def group(self, fresh_after: float = 0.0) -> tuple[set[str], dict[int, str]]:
        """The group's members, and each shard's holder: the member whose worker holds a live lease on it (a
        released or run-out lease is nobody's; a shard without a live lease is left out)."""
        offs = self.snapshot(fresh_after)
        with self._lock:
            members = {m.member for m in self.members}
        now = time.time() * 1000
        held: dict[int, str] = {}
        for s, o in offs.items():
            if o.lease_expires_ms and o.lease_expires_ms > now:
                held[s] = o.owner.rsplit(":", 2)[0]  # a worker's owner id: <member>:w<slot>:<restarts>
        return members, held

    def member_of(self, pid: int) -> str | None:
        """The member id of the instance whose supervisor has this pid (None: not a member now)."""
        with self._lock:
            return next((m.member for m in self.members if m.pid == pid), None)

    def behind_ms(self, offs: dict[int, Offset], now_ms: int | None = None) -> int:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return max(now - (o.read_bucket + 1) * self.cfg.bucket_ms for o in offs.values())

    def caught_up(self, offs: dict[int, Offset]) -> bool:
        return len(offs) == self.cfg.shards and self.behind_ms(offs) <= self.cfg.lag_ms + caught_up_slack_ms(self.cfg)

    def wait_until(
        self, pred: Callable[[dict[int, Offset]], bool], timeout: float, what: str = "recovery", after: float = 0.0
    ) -> float:
        """Poll until ``pred(offsets)`` holds for offsets read after ``after``; return when it first held."""
        deadline = time.time() + timeout
        last: dict[int, Offset] = {}
        while time.time() < deadline:
            with self._lock:
                offs, at = dict(self.offsets), self.at
            if at > after and pred(offs):
                return at
            last = offs
            time.sleep(0.05)
        behind = self.behind_ms(last) if last else None
        raise AssertionError(f"{what}: not reached within {timeout} s (behind {behind} ms, {self.errors} errors)")


@contextmanager
def teardown(
    feeder: Feeder, mon: OffsetMonitor, supervisor: Callable[[], Supervisor | Sequence[Supervisor]]
) -> Iterator[None]:
    """The teardown of a chaos run, however its block ends: stop the feeder, close the offset monitor and kill
    every supervisor that still runs, with its workers. ``supervisor`` returns the current one or ones (a test
    may start new ones mid-run)."""
    try:
        yield
    finally:
        feeder.stopping.set()
        mon.close()
        current = supervisor()
        for sup in [current] if isinstance(current, Supervisor) else current:
            if sup.proc.poll() is None:
                sup.kill9_all()


def owners(offs: dict[int, Offset]) -> dict[int, tuple[str, int]]:
    return {s: (o.owner, o.epoch) for s, o in offs.items()}


# -- groups (run --group) ---------------------------------------------------------------------------------------
def waited(what: str, check: Callable[[], bool], since: float, timeout_s: float) -> float:
    """Poll ``check`` until it holds; the seconds from ``since`` (a time.time()) to that moment."""
    deadline = time.time() + timeout_s
    while not check():
        if time.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.1)
    return time.time() - since


class Group:
    """The instances of the test and what the offset monitor says of them."""

    def __init__(self, mon: OffsetMonitor, shards: int) -> None:
        self.mon = mon
        self.shards = shards
        self.instances: dict[str, Supervisor] = {}  # by the test's name for it: a, b, c, d

    def start(self, name: str, tenant: Tenant) -> Supervisor:
        sup = Supervisor(tenant, workers=1, extra=["--group"], name=f"run-{name}")
        self.instances[name] = sup
        return sup

    def member(self, name: str) -> str | None:
        return self.mon.member_of(self.instances[name].pid)

    def holds(self, want: dict[str, list[int]]) -> bool:
        """Whether the members are exactly the named instances and each holds exactly its shards."""
        members, held = self.mon.group(time.time() - 0.05)
        ids = {name: self.member(name) for name in want}
        if None in ids.values() or members != set(ids.values()):
            return False
        return all(sorted(s for s, m in held.items() if m == ids[name]) == sh for name, sh in want.items())

    def settled(self, *names: str) -> bool:
        """Whether exactly these instances are members and each holds its part of their assignment."""
        if any(self.member(n) is None for n in names):
            return False
        return self.holds(self.assignment(*names))

    def assignment(self, *names: str) -> dict[str, list[int]]:
        """The group's assignment if exactly these instances are members (their member ids must be known)."""
        ids = {n: self.member(n) for n in names}
        assert None not in ids.values(), ids
        plan = group_assignment(self.shards, {str(m): 1 for m in ids.values()})
        return {n: plan[(str(ids[n]), 0)] for n in names}

    def held_by(self, name: str) -> list[int]:
        me = self.member(name)
        return sorted(s for s, m in self.mon.group(time.time() - 0.05)[1].items() if m == me)

    def epochs(self) -> dict[int, int]:
        return {s: o.epoch for s, o in self.mon.snapshot(time.time() - 0.05).items()}


def assert_nothing_stale(before: dict[RowKey, StoryRecord], what: str, cfg: Config) -> dict[RowKey, StoryRecord]:
    """Every story row read before the fault is still there with the same bytes; returns the rows now."""
    now = story_rows(cfg)
    gone = sorted(before.keys() - now.keys())
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
    assert not gone and not changed, (
        f"{what}: {len(gone)} story rows gone (e.g. {gone[:3]}), {len(changed)} with other bytes (e.g. "
        f"{[(k, before[k], now[k]) for k in changed[:1]]})"[:3000]
    )
    return now


# -- the end of every test ------------------------------------------------------------------------------------
def wait_readable(cfg: Config, written_at: float) -> None:
    """Sleep until everything written by ``written_at`` (a time.time()) is older than the lag."""
    delay = written_at + (cfg.lag_ms + 2 * cfg.bucket_ms) / 1000 - time.time()
    if delay > 0:
        time.sleep(delay)


async def _verify(cfg: Config) -> VerifyReport:
    store = make_store(cfg)
    await store.open()
    try:
        return await verify(store, cfg, await store.server_time_ms())
    finally:
        await store.close()


# What the engine's logs (the supervisors' and workers' stderr) say about how a chaos run went: shown when it
# fails, so a CI log tells which faults the engine met (a lease lapse, a rebuild) without the run's directory.
LOG_EVENTS = {
    "lease lapse": "not renewed in time",
    "writes cut at the lease bound": "writes paused before their end",
    "rebuild after an error": "rebuilding the stage's state from the committed offsets after an error",
    "transient error": "transient error",
    "lease lost": "giving it up",
    "worker exit": "exited with",
    "StageOrderError": "StageOrderError",
}


def log_events(directory: Path, *more: str) -> dict[str, int]:
    """How often each of :data:`LOG_EVENTS` appears in ``directory``'s ``*.err`` files and ``more`` texts."""
    texts = [p.read_text(errors="replace") for p in sorted(directory.glob("*.err"))] + list(more)
    counts = {name: sum(t.count(needle) for t in texts) for name, needle in LOG_EVENTS.items()}
    return {name: n for name, n in counts.items() if n}


def finish(tenant: Tenant, truth: Path | None, runs: Sequence[IngestRun], *, workers: int = 2) -> VerifyReport:
    """``storyline run --drain`` then ``storyline verify [--truth]``; the same report in-process, reconciled with
    the ingest runs. Asserts that the invariant holds with nothing lost, and returns the report."""
    drain = tenant.run("run", "--workers", str(workers), "--drain", timeout=600)
    final = json.loads(drain.stdout.strip().splitlines()[-1])
    assert final["final"] and all(not w["alive"] for w in final["workers"]), drain.stdout[-2000:]
    args = ["--truth", str(truth)] if truth is not None else []
    cli = tenant.run("verify", *args, check=False)
    events = log_events(tenant.dir, drain.stderr)
    assert cli.returncode == 0, f"storyline verify failed:\n{cli.stdout}\n{cli.stderr}\nthe engine's logs: {events}"
    assert not events.get("StageOrderError"), f"a worker handed the story builder a bucket twice: {events}"
    report = asyncio.run(_verify(tenant.cfg))
    if truth is not None:
        ids = msgspec.json.decode(truth.read_bytes())["stories"]
        report.truth_missing = sorted(set(ids) - report.accepted_ids)
    reconcile(report, runs)
    assert report.ok, "\n".join(report.lines())
    assert report.lost == 0
    return report


# -- the story stream ----------------------------------------------------------------------------------------
RowKey = tuple[int, int, str, int]  # (shard, period, story_id, revision): one row of the stories stream


async def _scan_stories(cfg: Config) -> list[StoryRecord]:
    store = make_store(cfg)
    await store.open()
    try:
        return [r async for page in store.scan_stories() for r in page]
    finally:
        await store.close()


def story_rows(cfg: Config) -> dict[RowKey, StoryRecord]:
    """Every story row in the store (what a downstream reader of the stories partitions gets), by its key."""
    rows: dict[RowKey, StoryRecord] = {}
    for r in asyncio.run(_scan_stories(cfg)):
        key = (r.shard, r.period, r.story_id, r.revision)
        assert key not in rows, f"the store returned the row {key} twice"
        rows[key] = r
    return rows


def assert_one_row_per_revision(rows: dict[RowKey, StoryRecord]) -> None:
    """No ``(story_id, revision)`` is stored as more than one row (in another period or shard)."""
    where: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for shard, period, sid, revision in rows:
        where.setdefault((sid, revision), []).append((shard, period))
    twice = sorted((k, sorted(v)) for k, v in where.items() if len(v) > 1)
    assert not twice, (
        f"{len(twice)} of {len(where)} (story_id, revision) stored as more than one row "
        f"({len(rows)} rows), e.g. (story_id, revision): [(shard, period), ...] {twice[:3]}"
    )


def assert_rows_unchanged(before: dict[RowKey, StoryRecord], after: dict[RowKey, StoryRecord], what: str) -> None:
    """The same rows with the same bytes (every field of every row, the body included)."""
    new = sorted(after.keys() - before.keys())
    gone = sorted(before.keys() - after.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    old_revisions = {(sid, revision) for _, _, sid, revision in before}
    again = [k for k in new if (k[2], k[3]) in old_revisions]
    problems = []
    if new:
        problems.append(
            f"{len(new)} new rows ({len(again)} of them a (story_id, revision) stored before, under another "
            f"period), e.g. (shard, period, story_id, revision) {(again or new)[:3]}"
        )
    if gone:
        problems.append(f"{len(gone)} rows gone, e.g. {gone[:3]}")
    if changed:
        k = changed[0]
        problems.append(f"{len(changed)} rows with other bytes, e.g. {k}: {before[k]!r} -> {after[k]!r}"[:2000])
    assert not problems, f"{what}: " + "; ".join(problems) + f" ({len(before)} rows before)"


def summary(report: VerifyReport) -> dict[str, Any]:
    return {
        "events_in": report.events,
        "stories_out": report.stories,
        "events_lost": report.lost,
        "merged_stubs": report.merged_stubs,
        "stored_twice": report.stored_twice,
        "reingested_apart": len(report.reingested),
        "recreated_story_ids": report.recreated,
        "dead_letters": report.dead_letters,
    }
