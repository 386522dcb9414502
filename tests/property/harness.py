"""The story stream under restarts, in-process: the harness of the stateful property test
(``tests/property/test_story_stream.py``) and of the fixed sequences on the CQL node
(``tests/conformance/test_story_stream_cql.py``).

What it checks is the promise of issue 14: for every sequence of ingests, runs (``--until-idle``, ``--drain``),
kill -9, SIGTERM and failed writes, each ``(story_id, revision)`` exists in the stories table as one row with one
content (a rewrite of the same bytes to the same row is harmless; a second row under another period, or other
bytes, is a violation), and after a drain every accepted event is in exactly one live story's latest revision
(``engine.tools.verify.verify`` is ok).

Everything runs in this process on a virtual clock: a run is a real :class:`~engine.runtime.worker.Worker` with the
real story builder over a real store, wrapped in :class:`FaultyStore`, which numbers the run's write calls and
strikes at a chosen one (so hypothesis shrinks a failure to the first write that matters):

* ``kill``: the call writes a prefix of its rows, then raises :class:`Killed` (a ``BaseException``: the worker
  must not catch it) and refuses every later call — the run is abandoned there as a killed process is;
* ``term``: the call completes, then the worker's ``stop`` is set (SIGTERM: a graceful stop);
* ``fail``: the call writes a prefix of its rows, then raises ``TransientStoreError`` once (a timed-out write);
  the worker rebuilds and goes on, or exits with the error (a crash a supervisor would restart);
* ``outage``: a database restart: the call and the next ``span`` store calls of any kind (reads too: the
  rebuild's own replay) raise ``TransientStoreError``; then the database is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import xxhash

from engine.core.config import Config, from_mapping
from engine.core.errors import StorylineError, TransientStoreError
from engine.core.event import Event, encode
from engine.core.records import EvidenceRecord
from engine.core.stage import Stage
from engine.ingest.canonical import shard_of
from engine.ingest.network_identity import flow_identity
from engine.runtime.worker import Worker
from engine.store import Commit, EventRecord, Store, StoryRecord, make_store
from engine.tools.verify import VerifyReport, verify
from tests.conftest import base_tree, merge


def make_stage(cfg: Config, store: Store) -> Stage:
    """The story builder under test: the one place that builds it. It is pure: the worker writes what it emits
    through the run's (faulty) store, so ``store`` is unused here."""
    from engine.correlate.story import StoryMachine

    return StoryMachine.for_config(cfg)


# -- the configuration ---------------------------------------------------------------------------------------
SHARDS = 4
STREAM: dict[str, Any] = {
    "shards": SHARDS,
    "bucket_ms": 1000,
    # the smallest lag the config rules allow at this bucket size:
    # max_write_age_ms + request_timeout_ms (at least 1 s) + max_clock_skew_ms + bucket_ms
    "max_write_age_ms": 1,
    "request_timeout_ms": 1000,
    "max_clock_skew_ms": 0,
    "lag_ms": 2001,
    "commit_interval_ms": 100,  # a commit at almost every step of a run (the ticking clock moves ~0.5 s a step)
    # short waits and horizon: stories are emitted, amended and leave the state (marks) within a few runs
    "correlate": {
        "match_window_ms": 10_000,
        "max_wait_ms": 4_000,
        "amend_horizon_ms": 30_000,
        # learned offsets with short epochs and little evidence needed: the endpoint sensor's clock is off
        # (SKEW_S), so tables change within a run and the state is re-corrected at epoch boundaries, under
        # every fault too
        "offsets": {"epoch_ms": 1_000, "min_samples": 2},
        # DNS names: the resolver's events on the DNS flow answer the address of the first flows' server, so
        # their connections are named (and amended when an answer comes late) under every fault too; a short TTL
        # keeps the tables a restart reads few
        "dns_max_ttl_ms": 5_000,
    },
}
TICK_MS = 50  # the virtual clock moves this much at every reading
REDELIVER_MARGIN_MS = 5_000  # re-deliveries stay this far inside the amend horizon of the first delivery


def stream_config(backend: str, directory: Path, tenant: str, **overrides: Any) -> Config:
    return from_mapping(merge(merge(base_tree(backend, directory, tenant), STREAM), overrides))


# -- events --------------------------------------------------------------------------------------------------
FLOWS: tuple[tuple[int, tuple[str, int], tuple[str, int]], ...] = (
    (6, ("10.0.0.1", 40001), ("192.0.2.7", 443)),
    (6, ("10.0.0.2", 40002), ("192.0.2.7", 443)),
    (17, ("10.0.0.1", 53000), ("10.0.0.53", 53)),
    (6, ("2001:db8::1", 40003), ("2001:db8::80", 80)),
    (6, ("10.0.0.3", 40004), ("198.51.100.9", 22)),
)
"""The 5-tuples events report: few, so flows are reused across batches (later sessions of the same tuple)."""
DNS_FLOW = 2  # the resolver's events on it carry an answer: 192.0.2.7, the server of the first two flows

SENSORS = (("firewall", "fw-1"), ("endpoint", "edr-1"), ("dns", "dns-1"), ("cloud", "vpcflow-1"))
SKEW_S = {"edr-1": 15}
"""Sensors whose clock is off (s): beyond the match window, so only a learned offset links their events."""


class EventSpec(NamedTuple):
    """One event to make: ``flow`` indexes :data:`FLOWS` (``len(FLOWS)`` and above: an event without flow
    fields), ``reversed`` reports the flow from b to a, ``sensor`` indexes :data:`SENSORS`, and the event time
    lies ``age_s`` seconds before the clock at ingest."""

    flow: int
    reversed: bool
    sensor: int
    age_s: int


def make_event(eid: str, spec: EventSpec, now_ms: int) -> Event:
    source, sensor = SENSORS[spec.sensor % len(SENSORS)]
    time_us = (now_ms - spec.age_s * 1000 + SKEW_S.get(sensor, 0) * 1000) * 1000
    attrs: dict[str, Any] = {"bytes": 100 + spec.age_s, "action": "allow"} if sensor[:2] in ("fw", "vp") else {}
    attrs["seq"] = eid
    if source == "dns" and spec.flow == DNS_FLOW:
        attrs.update(query="web.example", answer=["192.0.2.7"], ttl=60)
    if spec.flow >= len(FLOWS):
        return Event(eid, time_us, source, sensor, None, False, None, None, None, None, None, attrs)
    proto, a, b = FLOWS[spec.flow]
    src, dst = (b, a) if spec.reversed else (a, b)
    s_ip, d_ip, key, rev = flow_identity(proto, src[0], src[1], dst[0], dst[1])
    return Event(
        eid, time_us, source, sensor, xxhash.xxh64_intdigest(key), rev, proto, s_ip, src[1], d_ip, dst[1], attrs
    )


# -- time ----------------------------------------------------------------------------------------------------
class VirtualClock:
    """Moves ``tick_ms`` forward at every reading, and as far as told by :meth:`advance`: a run waits for the lag
    and takes commits on the way without waiting for the wall clock."""

    def __init__(self, start_ms: int, tick_ms: int = TICK_MS) -> None:
        self.t = start_ms
        self.tick = tick_ms

    def now_ms(self) -> int:
        self.t += self.tick
        return self.t

    def advance(self, ms: int) -> None:
        self.t += ms


class _NoWait(asyncio.Event):
    """The worker's ``stop``: set as usual (SIGTERM), but every wait on it (the pause before the next bucket, the
    backoff after a transient error) ends at once — the clock is virtual, waiting would only cost wall time."""

    async def wait(self) -> Literal[True]:
        await asyncio.sleep(0)
        return True


class VirtualTimeWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop = _NoWait()

    async def _sleep_until_next_bucket(self) -> None:
        await asyncio.sleep(0)


assert hasattr(Worker, "_sleep_until_next_bucket"), "the worker's idle wait was renamed: update VirtualTimeWorker"


# -- faults --------------------------------------------------------------------------------------------------
FaultKind = Literal["kill", "term", "fail", "outage"]
Target = Literal[
    "any", "put_stories", "put_marks", "commit_many", "seal_periods", "put_offset_evidence", "create_offset_table"
]


@dataclass(frozen=True)
class Fault:
    """Strike the run at its ``at``-th write call (1-based) among the calls of ``on`` (one of :data:`COUNTED`, or
    ``any`` of them: commits are the most frequent writes, so aiming at a story or marks write directly reaches
    the points between an emission's writes); ``keep``: how many of that call's rows (stories, mark parts,
    commits) reach the store first (``kill``, ``fail``); ``span``: how many store calls after it fail too
    (``outage``)."""

    kind: FaultKind
    at: int
    keep: int = 0
    span: int = 0
    on: Target = "any"


class Killed(BaseException):
    """kill -9 of the engine process: not an ``Exception``, so nothing in the worker handles it."""


COUNTED = frozenset(
    {"put_stories", "put_marks", "commit_many", "seal_periods", "put_offset_evidence", "create_offset_table"}
)
"""The writes a run makes after its claim: the emissions (stories, marks, offset evidence), the checkpoint, a
drain's seal of the periods it wrote (for the story feed) and the offset table of a new epoch; every one is a kill
point."""
PASSED = frozenset(
    {"open", "read_meta", "server_time_ms", "claim_many", "read_offsets", "scan_index", "nonempty_buckets"}
    | {"read_partition", "read_marks", "read_stories", "get_story", "scan_stories", "cfg", "clock", "stats"}
    | {"read_offset_evidence", "read_offset_table", "latest_offset_table", "renew_leases", "release_leases"}
)
"""Store members a run may use without being counted (refused after a kill all the same)."""

R = TypeVar("R")
T = TypeVar("T")


class FaultyStore:
    """The run's store: the real one, with its write calls numbered and one :class:`Fault` struck."""

    def __init__(self, store: Store, fault: Fault | None) -> None:
        self.store = store
        self.fault = fault
        self.writes = 0
        self.calls: dict[str, int] = {}  # write calls per method
        self.fired = False
        self.dead = False
        self.outage = 0  # store calls still to fail (a database restart)
        self.on_term: Callable[[], None] = lambda: None

    def __getattr__(self, name: str) -> Any:
        if name not in PASSED:
            raise AssertionError(f"a run used Store.{name}, which the harness neither counts nor passes: add it")
        target = getattr(self.store, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                raise Killed(f"Store.{name} after the kill")
            self._down(name)
            return target(*args, **kwargs)

        return call

    async def close(self) -> None:
        await self.store.close()  # a killed process's connection goes too

    def _down(self, name: str) -> None:
        if self.outage > 0:
            self.outage -= 1
            raise TransientStoreError(f"injected: Store.{name} while the database restarts")

    async def _write(self, name: str, rows: Sequence[T], do: Callable[[Sequence[T]], Awaitable[R]]) -> R:
        if self.dead:
            raise Killed(f"Store.{name} after the kill")
        self.writes += 1
        self.calls[name] = self.calls.get(name, 0) + 1
        self._down(name)
        f = self.fault
        if (
            f is None
            or self.fired
            or (self.writes if f.on == "any" else self.calls[name] if f.on == name else 0) != f.at
        ):
            return await do(rows)
        self.fired = True
        if f.kind == "term":
            out = await do(rows)
            self.on_term()
            return out
        if f.kind == "outage":
            self.outage = f.span
            raise TransientStoreError(f"injected: {name} (write {self.writes}): the database restarts")
        kept = rows[: f.keep]
        if kept:
            await do(kept)
        what = f"{name} (write {self.writes}) after {len(kept)} of {len(rows)} rows"
        if f.kind == "kill":
            self.dead = True
            raise Killed(f"kill -9 in {what}")
        raise TransientStoreError(f"injected: {what}")

    async def put_stories(self, stories: Sequence[StoryRecord]) -> None:
        await self._write("put_stories", stories, self.store.put_stories)

    async def put_marks(self, consumer: str, shard: int, bucket: int, parts: Sequence[bytes], **kw: Any) -> None:
        async def do(rows: Sequence[bytes]) -> None:
            await self.store.put_marks(consumer, shard, bucket, rows, **kw)  # kw: first_part, in the rewrite

        await self._write("put_marks", parts, do)

    async def commit_many(self, consumer: str, owner: str, commits: Sequence[Commit]) -> list[int]:
        async def do(rows: Sequence[Commit]) -> list[int]:
            return await self.store.commit_many(consumer, owner, rows)

        return await self._write("commit_many", commits, do)

    async def seal_periods(self, periods: Sequence[tuple[int, int]]) -> None:
        await self._write("seal_periods", periods, self.store.seal_periods)

    async def put_offset_evidence(self, consumer: str, rows: Sequence[EvidenceRecord]) -> None:
        async def do(part: Sequence[EvidenceRecord]) -> None:
            await self.store.put_offset_evidence(consumer, part)

        await self._write("put_offset_evidence", rows, do)

    async def create_offset_table(self, consumer: str, epoch: int, body: bytes) -> bytes:
        async def do(part: Sequence[bytes]) -> bytes:  # a fault strikes before (keep 0) or after (keep 1) it
            return await self.store.create_offset_table(consumer, epoch, part[0])

        return await self._write("create_offset_table", [body], do)


# -- the stream ----------------------------------------------------------------------------------------------
Outcome = Literal["done", "stopped", "killed", "crashed"]


@dataclass(frozen=True)
class RunResult:
    outcome: Outcome  # done: returned normally with no fault struck (or a failed write it recovered from)
    writes: int
    fault: Fault | None
    fired: bool
    rebuilds: int
    error: str = ""


class Row(NamedTuple):
    """Everything a story row holds besides its key ``(story_id, revision)``."""

    shard: int
    period: int
    final: bool
    merged_into: str | None
    emitted_ms: int
    body: bytes


def _row(r: StoryRecord) -> Row:
    return Row(r.shard, r.period, r.final, r.merged_into, r.emitted_ms, r.body)


class StoryStream:
    """One tenant, its virtual clock, the events accepted so far and every story row ever seen."""

    def __init__(self, cfg: Config, clock: VirtualClock, stage: Callable[[Config, Store], Stage] = make_stage) -> None:
        self.cfg = cfg
        self.clock = clock
        self.make_stage = stage
        self.events: dict[str, Event] = {}
        self.first_ingest: dict[str, int] = {}  # id → clock at its first delivery
        self.deliveries = 0
        self.rows: dict[tuple[str, int], Row] = {}  # every (story_id, revision) seen, as first seen
        self.runs: list[RunResult] = []
        self.broken = False  # a check failed: the test is over, skip the final drain
        self.until = 0  # the last run's until bucket

    def _fail(self, message: str) -> None:
        self.broken = True
        raise AssertionError(message)

    def _store(self) -> Store:
        return make_store(self.cfg, self.clock)

    # -- set-up and input ------------------------------------------------------------------------------------
    def setup(self) -> None:
        async def go() -> None:
            store = self._store()
            await store.open()
            try:
                await store.init_schema()
            finally:
                await store.close()

        asyncio.run(go())

    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    def ingest(self, specs: Sequence[EventSpec], redeliver: Sequence[int] = ()) -> list[Event]:
        """A producer's batch at the clock's bucket: fresh events made from ``specs``, plus the earlier events
        picked by ``redeliver`` (indexes into those first delivered within the amend horizon, minus a margin,
        modulo their number; none when there are none) delivered again. Returns what was written."""
        now = self.clock.now_ms()
        horizon = self.cfg.correlate.amend_horizon_ms - REDELIVER_MARGIN_MS
        recent = sorted(eid for eid, t in self.first_ingest.items() if now - t <= horizon)
        again = list(dict.fromkeys(recent[k % len(recent)] for k in redeliver)) if recent else []
        fresh = [make_event(f"e{len(self.events) + i:05d}", spec, now) for i, spec in enumerate(specs)]
        batch = [*fresh, *(self.events[eid] for eid in again)]
        by_shard: dict[int, list[EventRecord]] = {}
        for e in batch:
            by_shard.setdefault(shard_of(e, self.cfg.shards), []).append(EventRecord(e.id, encode(e)))
        bucket = now // self.cfg.bucket_ms

        async def go() -> None:
            store = self._store()
            await store.open()
            try:
                for shard, records in sorted(by_shard.items()):
                    await store.append(shard, bucket, records)
            finally:
                await store.close()

        asyncio.run(go())
        for e in fresh:
            self.events[e.id] = e
            self.first_ingest[e.id] = now
        self.deliveries += 1
        return batch

    # -- runs ------------------------------------------------------------------------------------------------
    def run(self, *, drain: bool, fault: Fault | None = None) -> RunResult:
        """``storyline run --until-idle`` (or ``--drain``) in-process: every event written before the start is
        consumed — ``until_bucket`` is the clock's bucket at the start, and the run waits (on the ticking clock)
        until that bucket is ``lag_ms`` old."""
        try:
            result = asyncio.run(self._run(drain, fault))
        except BaseException:
            self.broken = True
            raise
        self.runs.append(result)
        return result

    async def _run(self, drain: bool, fault: Fault | None) -> RunResult:
        cfg = self.cfg
        until = self.until = self.clock.now_ms() // cfg.bucket_ms
        store = FaultyStore(self._store(), fault)
        worker = VirtualTimeWorker.from_config(
            cfg,
            range(cfg.shards),
            self.make_stage(cfg, store),
            owner=f"run-{len(self.runs) + 1}",
            clock=self.clock,
            until_bucket=until,
            drain=drain,
            store=store,
            check_skew=False,
        )
        store.on_term = worker.stop.set

        def result(outcome: Outcome, error: str = "") -> RunResult:
            return RunResult(outcome, store.writes, fault, store.fired, worker.stats.rebuilds, error)

        try:
            rc = await worker.run()
        except Killed as exc:
            return result("killed", str(exc))
        except StorylineError as exc:
            if not (store.fired and fault is not None and fault.kind in ("fail", "outage") and "injected" in str(exc)):
                raise
            return result("crashed", str(exc))  # the injected error ended the process: a supervisor restarts it
        assert rc == 0, f"the run exited {rc}"
        if store.fired and fault is not None and fault.kind == "term":
            return result("stopped")
        assert worker.done(), "a run that was not stopped returned before reaching its until bucket"
        # the worker reads bucket b once the clock is lag_ms past its start (the lag covers the bucket's span): so
        # the next ingest lands in a bucket no run has read
        assert self.clock.t >= until * cfg.bucket_ms + cfg.lag_ms > (until + 1) * cfg.bucket_ms
        return result("done")

    # -- checks ----------------------------------------------------------------------------------------------
    async def _scan(self) -> list[StoryRecord]:
        store = self._store()
        await store.open()
        try:
            return [r async for page in store.scan_stories() for r in page]
        finally:
            await store.close()

    def check_rows(self) -> list[StoryRecord]:
        """Every ``(story_id, revision)`` is one row, and keeps the content it was first seen with; no row
        disappears. Returns the rows."""
        rows = asyncio.run(self._scan())
        now: dict[tuple[str, int], Row] = {}
        problems: list[str] = []
        for r in sorted(rows, key=lambda r: (r.story_id, r.revision, r.period)):
            key, row = (r.story_id, r.revision), _row(r)
            if key in now:
                problems.append(f"{key}: a second row, period {row.period} (first: period {now[key].period})")
                continue
            now[key] = row
            was = self.rows.get(key)
            if was is not None and was != row:
                problems.append(f"{key}: the row changed:\n  was {was}\n  now {row}")
        problems += [f"{key}: the row disappeared ({self.rows[key]})" for key in sorted(self.rows.keys() - now.keys())]
        for key, row in now.items():
            self.rows.setdefault(key, row)
        if problems:
            head = problems[:12] + ([f"… {len(problems) - 12} more"] if len(problems) > 12 else [])
            self._fail(
                f"the story stream broke its promise after {len(self.runs)} runs "
                f"({len(problems)} problems, {len(rows)} rows):\n" + "\n".join(head)
            )
        return rows

    def check_verify(self) -> VerifyReport:
        """After a drain: every accepted event in exactly one live story's latest revision."""

        async def go() -> VerifyReport:
            store = self._store()
            await store.open()
            try:
                return await verify(store, self.cfg, self.clock.now_ms())
            finally:
                await store.close()

        rep = asyncio.run(go())
        if not rep.ok:
            self._fail("verify failed after a drain:\n" + "\n".join(rep.lines()))
        if rep.events != len(self.events):
            self._fail(f"verify saw {rep.events} accepted events, {len(self.events)} were written")
        return rep

    def drain_and_check(self, fault: Fault | None = None) -> RunResult:
        """``run --drain``, then the promise: the rows always, ``verify`` when the drain completed."""
        result = self.run(drain=True, fault=fault)
        self.check_rows()
        if result.outcome == "done":
            self.check_verify()
            if self.cfg.correlate.dns_names or self.cfg.correlate.offsets.estimate:  # the stage uses epoch tables
                self.check_closing_rows()
        return result

    def check_closing_rows(self) -> None:
        """After a drain: every shard has its row of the drained epoch (the drain wrote the gathered ones, or an
        empty one where none was stored), whatever a fault lost of an earlier attempt's writes — a missing row
        leaves the next epoch's table without that shard's answers and makes other draining workers wait."""

        async def go() -> set[int]:
            store = self._store()
            await store.open()
            try:
                epoch = self.until * self.cfg.bucket_ms // self.cfg.correlate.offsets.epoch_ms
                return {r.shard for r in await store.read_offset_evidence(self.cfg.consumer, [epoch])}
            finally:
                await store.close()

        have = asyncio.run(go())
        if have != set(range(self.cfg.shards)):
            self._fail(f"after a drain, shards {sorted(set(range(self.cfg.shards)) - have)} have no row of its epoch")

    def final(self) -> None:
        """A clean final drain, the promise, and a restart after it: another drain writes no row at all."""
        result = self.drain_and_check()
        if result.outcome != "done":
            self._fail(f"the final drain did not complete: {result}")
        before = set(self.rows)
        self.drain_and_check()
        new = sorted(set(self.rows) - before)
        if new:
            self._fail(f"a drain right after the final drain wrote {len(new)} new rows: {new[:10]}")
