"""The worker: the queue half of "the database is the queue".

For each owned shard it resumes from the committed offsets and reads the partitions ``(shard, b)`` for every
bucket ``b <= floor((now - lag_ms) / bucket_ms)``, never newer, in order, skipping the buckets that
``bucket_index`` does not list. ``now`` is this host's clock corrected by the offset to the database's clock
measured at start (and refreshed every minute), so the lag rule holds against the clock producers are checked
against too. The offsets move only after the stage has made everything derived from those buckets durable, and
every commit carries the owner epoch: a worker that lost its shard cannot move its offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Self, cast

from engine.core.clock import SYSTEM_CLOCK, Clock, measure_skew
from engine.core.config import Config
from engine.core.errors import LeaseLapsedError, SchemaError, StorylineError
from engine.core.stage import EMPTY, Batch, Buckets, Emission, LearnsOffsets, MarkRecord, Stage
from engine.runtime.assign import format_ranges, group_assignment
from engine.runtime.offsets import OffsetKeeper, empty_row
from engine.runtime.settings import ConfiguredStore, StoreFactory, WorkerSettings
from engine.store import SCHEMA_VERSION, BucketHint, Commit, EventRecord, Offset, Store, lease_ended, run_all

log = logging.getLogger("storyline.worker")

SKEW_REFRESH_MS = 60_000
FLUSH_WRITES = 5_000  # pending story revisions and marks written before the step ends (bounds memory)
# One stage call takes at most this many buckets, events and bytes (adaptive batches: see Worker._feed).
CALL_BUCKETS = 64
CALL_EVENTS = 50_000
CALL_BYTES = 32 * 1024 * 1024
CALL_MIN_EVENTS = 5_000  # below this, wait for the next partition's read rather than make a small call
CATCHUP_STEP_SLOTS = 1  # buckets looked up per index scan while catching up: one 15-minute slot
MAX_BACKOFF_S = 10.0
CLOSING_WAIT_S = 10.0  # a drain waits at most this long for the other draining workers' rows of its epoch
LEASE_END_MARGIN_S = 0.05  # a group's worker waiting for a lease looks again this long after it runs out


class CorrectedClock:
    """This host's clock plus the measured offset to the database clock."""

    def __init__(self, base: Clock) -> None:
        self.base = base
        self.offset_ms = 0

    def now_ms(self) -> int:
        return self.base.now_ms() + self.offset_ms


def lease_clock() -> float:
    """Seconds on the clock lease deadlines are kept in: CLOCK_BOOTTIME where there is one (Linux), which goes on
    counting while the host is suspended — a member woken from a suspended VM must see its leases as run out, as
    the other members do — else time.monotonic."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


@dataclass
class ShardState:
    shard: int
    offset: Offset
    read: int  # consumed through (committed or about to be)
    committed_read: int
    committed_replay: int  # the replay_bucket committed with committed_read
    last_commit_ms: int = 0
    fenced: bool = False
    # Until when (lease_clock) this worker may write for the shard: the send time of its last applied lease
    # claim or renewal + lease_ms - max_clock_skew_ms (a claimer whose clock runs ahead sees the lease end that
    # much earlier). A write must be sent request_timeout_ms before it (so that even a write the database applies
    # at the end of its timeout lands while the lease holds): later, the worker writes nothing until a renewal
    # succeeds (:meth:`Worker.flush`).
    lease_deadline: float = float("inf")


@dataclass
class WorkerStats:
    events: int = 0
    buckets: int = 0  # buckets consumed (empty ones included)
    partitions: int = 0  # non-empty partitions read
    bytes: int = 0
    incomplete: int = 0
    commits: int = 0
    errors: int = 0
    index_scans: int = 0
    stage_calls: int = 0  # on_buckets calls (each takes one or more buckets: adaptive batches)
    # The worker's part of the cost ledger, CPU seconds: decode (the views of the partitions read), write (the
    # process's CPU while an emission is written: the driver's threads included, and read-ahead that ran
    # meanwhile), commit (likewise while offsets are committed). The stage reports its own steps.
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("decode", "write", "commit"), 0.0))
    rebuilds: int = 0  # stage state rebuilt (replayed) in-process after an error mid-bucket
    leases_lost: int = 0  # shards whose lease renewal was refused: another owner took them
    rebalances: int = 0  # times the group's assignment to this worker changed
    takeovers: int = 0  # shards this worker took from a previous owner (a group's handover or failover)
    lease_lapses: int = 0  # times the worker paused because a renewal did not succeed in time
    undecodable: int = 0  # payloads that are not canonical events: skipped and counted
    started: float = field(default_factory=time.time)
    last_error: str = ""


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        shards: Sequence[int],
        stage: Stage,
        *,
        owner: str,
        store: Store | StoreFactory,
        clock: Clock = SYSTEM_CLOCK,
        until_bucket: int | None = None,
        drain: bool = False,
        parent_alive: Callable[[], bool] | None = None,
        check_skew: bool = True,
        group: tuple[str, int] | None = None,
    ) -> None:
        """``store``: the store, or the factory that builds it on this worker's clock (corrected to the
        database's)."""
        self.settings = settings
        self.shards = list(shards)
        self.stage = stage
        self.owner = owner
        self.clock = CorrectedClock(clock)
        self.until_bucket = until_bucket
        self.drain = drain
        # A factory is told apart by its type: a store wrapper (tests' fault injection) may answer any attribute.
        is_factory = hasattr(type(store), "build")
        self.store = cast(StoreFactory, store).build(self.clock) if is_factory else cast(Store, store)
        self.parent_alive = parent_alive
        self.stop = asyncio.Event()
        self.state: dict[int, ShardState] = {}
        self.stats = WorkerStats()
        self._read_sem = asyncio.Semaphore(settings.read_ahead)
        self._skew_at = 0
        self._stage_suspect = False  # an emission may not be durable: rebuild the stage before going on
        self._pending = Emission()  # what the stage emitted since the last flush (written before any commit)
        self._replay_at: dict[int, int] = {}  # shard → the stage's replay point at its last processed bucket
        self._drained = False
        self._last_commit_ms = 0  # when commit() last ran (a checkpoint, whether or not an offset moved)
        self.check_skew = check_skew  # False only with an injected clock that is not meant to match the database
        # A group's worker slot (member id, worker index): its shards are the group's assignment to it, followed
        # every group_poll_ms (:meth:`follow_group`), not ``shards``. None: a static range.
        self.group = group
        self._target: set[int] | None = None  # the group's last assignment to this slot
        self._next_poll = 0.0  # when to read the group again (time.monotonic)
        self._write_bounds: set[asyncio.Timeout] = set()  # flushes under way: each ends when the leases do
        self._rebuild_for = ""  # why the next rebuild of the stage is planned ("": after an error)
        self._lapsed = False  # writes paused: a lease was not renewed in time (until a renewal gets through)
        self._renewed = asyncio.Event()  # set by each renewal that gets through
        # Learned sensor clock offsets: the tables a stage that applies them needs (engine/runtime/offsets.py)
        self.offsets = OffsetKeeper(self.store, settings.offsets) if settings.offsets is not None else None

    @classmethod
    def from_config(
        cls, cfg: Config, shards: Sequence[int], stage: Stage, *, owner: str, store: Store | None = None, **kw: Any
    ) -> Self:
        """A worker with its part of ``cfg``, on ``store`` or else on the store ``cfg`` describes (``kw``: the
        other arguments of the constructor)."""
        return cls(
            WorkerSettings.from_config(cfg),
            shards,
            stage,
            owner=owner,
            store=store if store is not None else ConfiguredStore.from_config(cfg),
            **kw,
        )

    # -- clock ---------------------------------------------------------------------------------------------
    async def measure_skew(self) -> int:
        base = self.clock.base
        if not self.check_skew:
            self._skew_at = base.now_ms()
            return 0
        m = await measure_skew(base, self.store.server_time_ms, self.settings.max_clock_skew_ms, "; fix NTP")
        self.clock.offset_ms = m.offset_ms
        self._skew_at = m.at_ms
        return m.offset_ms

    def target(self) -> int:
        """The newest bucket that may be read now."""
        t = (self.clock.now_ms() - self.settings.lag_ms) // self.settings.bucket_ms
        return t if self.until_bucket is None else min(t, self.until_bucket)

    # -- start ---------------------------------------------------------------------------------------------
    async def first_bucket(self) -> int:
        """Where a shard never consumed before starts: just before the tenant began, bounded by the TTL, and
        by ``start_from_ms`` when set (consumed through = the bucket before the first to read)."""
        cfg = self.settings
        meta = await self.store.read_meta()
        created = int(meta.get("created_ms", "0"))
        if not created:
            raise StorylineError(f"tenant {cfg.tenant} is not initialized: run `storyline init` first")
        version = int(meta.get("schema_version", "0"))
        if version < SCHEMA_VERSION:
            raise SchemaError(
                f"tenant {cfg.tenant} has schema version {version}, this Storyline needs {SCHEMA_VERSION}: "
                f"run `storyline init` to migrate it"
            )
        if self.offsets is not None:  # no event is ingested before the tenant's first bucket: no rows of earlier epochs
            first_ingest = (created - cfg.max_write_age_ms - cfg.max_clock_skew_ms) // cfg.bucket_ms
            self.offsets.empty_through = first_ingest // self.offsets.epoch_buckets
        start_ms = max(created - cfg.max_write_age_ms - cfg.max_clock_skew_ms, self.clock.now_ms() - cfg.ttl_ms)
        if cfg.start_from_ms is not None:
            start_ms = max(start_ms, cfg.start_from_ms)
        return start_ms // cfg.bucket_ms - 1

    def orphaned(self) -> bool:
        """The supervisor that started this worker is gone (its parent changed)."""
        return self.parent_alive is not None and not self.parent_alive()

    async def claim_all(self) -> None:
        first = await self.first_bucket()
        # An orphan must never claim: its supervisor's successor may already own these shards, and a claim now
        # would fence that live worker (which then gives the shards up) right before the orphan exits, leaving
        # them without a consumer. A worker paused during start-up and resumed after a supervisor restart
        # does exactly that (tests/chaos/test_processes.py).
        if self.stop.is_set() or self.orphaned():
            log.error("stopping before claiming: %s", "supervisor is gone" if self.orphaned() else "asked to stop")
            self.stop.set()
            return
        if self.group is not None:
            await self.follow_group()
            return
        sent = lease_clock()
        until = self.clock.now_ms() + self.settings.lease_ms
        consumer = self.settings.consumer
        offsets = await self.store.claim_many(consumer, self.shards, self.owner, first, lease_until_ms=until)
        for off in offsets:
            self._hold(off, sent)
            log.info(
                "claimed shard %d epoch %d at bucket %d (replay from %d)",
                off.shard,
                off.epoch,
                off.read_bucket,
                off.replay_bucket,
            )

    async def replay(self) -> None:
        """Rebuild the stage's state of every live shard from its committed ``replay_bucket`` through its
        committed ``read_bucket``: the stage forgets what it holds for them first (so a replay retried after an
        error starts clean), reads the marks it asks for, then bucket by bucket, every shard whose range holds the
        bucket in the same stage call. What was emitted after the last commit and not yet written is dropped: the
        stage emits it again when it reaches those buckets. Reading resumes after the committed ``read_bucket``."""
        live = [st for st in self.state.values() if not st.fenced]
        self.stage.reset([st.shard for st in live])
        self._pending = Emission()
        self._stage_suspect = True  # until the replay is complete: a failed read below must rebuild again
        for st in live:
            st.read = st.committed_read
            self._replay_at[st.shard] = st.committed_replay
        # Every live shard gets its marks, also one with nothing to replay: the cuts of the last max_wait still
        # name the predecessors of stories its next buckets start.
        for st in live:
            first = self.stage.marks_from(st.committed_replay)
            marks = (
                await self.store.read_marks(self.settings.consumer, st.shard, first, st.committed_read)
                if first <= st.committed_read
                else []
            )
            self.stage.prepare_replay(st.shard, st.committed_replay, st.committed_read, marks)
        todo = [st for st in live if st.committed_replay <= st.committed_read]
        if not todo:
            self._stage_suspect = False
            return
        lo = min(st.committed_replay for st in todo)
        hi = max(st.committed_read for st in todo)
        hints = await self.store.scan_index([st.shard for st in todo], lo, hi)
        plan: dict[int, dict[int, BucketHint | None]] = {}
        for st in todo:
            lo_s, hi_s = st.committed_replay, st.committed_read
            for h in hints.get(st.shard, []):
                if lo_s <= h.bucket <= hi_s:
                    plan.setdefault(h.bucket, {})[st.shard] = h
            plan.setdefault(hi_s, {}).setdefault(st.shard, None)  # replayed time reaches read_bucket
        ranges = [(st.shard, st.committed_replay, st.committed_read) for st in todo]
        await self._feed(plan, ranges, replay=True)
        # What the replay emitted (a recorded drain's revisions, which its run may not have finished writing).
        await self.flush()
        self._stage_suspect = False

    async def _feed(
        self, plan: dict[int, dict[int, BucketHint | None]], ranges: list[tuple[int, int, int]], *, replay: bool
    ) -> dict[int, int]:
        """Hand the buckets of ``plan`` (bucket → shard → its partition to read, None: empty) to the stage in
        bucket order. Each call also takes, as empty, every shard of ``ranges`` ((shard, first, last)) whose range
        holds the bucket, so their emissions due then are fused in the same pass. Partitions are read ahead
        concurrently (a sliding window of ``read_ahead``). Returns the last bucket handed over per shard."""
        order = [(b, s) for b in sorted(plan) for s, h in sorted(plan[b].items()) if h is not None]
        window = max(4 * self.settings.read_ahead, 16)
        futs: dict[tuple[int, int], asyncio.Future[Batch]] = {}
        nxt = 0
        done: dict[int, int] = {}

        def fill() -> None:
            nonlocal nxt
            while nxt < len(order) and len(futs) < window:
                b, s = order[nxt]
                hint = plan[b][s]
                assert hint is not None
                futs[(b, s)] = asyncio.ensure_future(self._read(s, hint))
                nxt += 1

        # Adaptive batches: the buckets of the plan go to the stage together (up to CALL_EVENTS events /
        # CALL_BYTES bytes / CALL_BUCKETS buckets; once a group holds CALL_MIN_EVENTS, it goes on rather than wait
        # for a partition still being read), so a worker that is behind shares each call's fixed costs over many
        # buckets; one that keeps up hands over each bucket as it comes (its plan holds one). The
        # stage's output does not depend on how buckets are grouped into calls (each keeps its own ingest time).
        group: list[tuple[int, dict[int, Batch]]] = []
        size = [0, 0]  # events, bytes of the group
        learning = self.offsets is not None and isinstance(self.stage, LearnsOffsets)
        epoch_buckets = self.offsets.epoch_buckets if learning and self.offsets is not None else 0

        async def hand_over() -> None:
            if not group:
                return
            calls = list(group)
            group.clear()
            size[0] = size[1] = 0
            await self._hand_offset_tables(calls)
            try:
                emission = self.stage.on_buckets(calls, replay=replay)
            except BaseException:
                # The stage may be half-way through the buckets: its state is rebuilt from the committed
                # offsets before anything else is fed.
                self._stage_suspect = True
                raise
            self.stats.stage_calls += 1
            self._pending.add(emission)
            self._replay_at.update(emission.replay)
            # The stage has consumed these buckets: they count as read before anything below may raise. A flush
            # cut short by a lapsed lease (LeaseLapsedError) is a pause that keeps the state and the emission; the
            # step after it must go on after these buckets, never hand them to the stage a second time.
            for b, batches in calls:
                if not replay:
                    for batch in batches.values():
                        self.stats.events += len(batch)
                        self.stats.undecodable += batch.undecodable
                for s in batches:
                    done[s] = b
                    st = self.state.get(s)
                    if st is not None and not replay:
                        st.read = max(st.read, b)
            if self._pending.writes >= FLUSH_WRITES:
                await self.flush()
            if not replay and self.clock.now_ms() - self._last_commit_ms >= self.settings.commit_interval_ms:
                # A long step (catching up: up to a 15-minute slot of buckets) checkpoints on the way, so
                # progress is durable and visible (a drain's supervisor waits for committed positions).
                await self.commit([st for st in self.state.values() if not st.fenced], force=False)

        try:
            for b in sorted(plan):
                fill()
                batches: dict[int, Batch] = {s: EMPTY for s, first, last in ranges if first <= b <= last}
                for s, hint in plan[b].items():
                    if hint is not None:
                        fut = futs.pop((b, s))
                        if not fut.done() and size[0] >= CALL_MIN_EVENTS:
                            await hand_over()  # what is read already goes on while this partition comes in
                        batches[s] = await fut
                        size[0] += len(batches[s])
                        size[1] += batches[s].bytes
                        fill()
                if group and epoch_buckets and b // epoch_buckets != group[-1][0] // epoch_buckets:
                    # learned offsets: an epoch's table is built from the evidence of the epochs before it, which
                    # the calls before emit (a call never holds two epochs)
                    await hand_over()
                group.append((b, batches))
                if size[0] >= CALL_EVENTS or size[1] >= CALL_BYTES or len(group) >= CALL_BUCKETS:
                    await hand_over()
            await hand_over()
        finally:
            for fut in futs.values():
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # retrieved: a failed read-ahead is redone by the next step
        return done

    async def _hand_offset_tables(self, calls: Buckets, *, drain: bool = False) -> None:
        """Give a stage that applies epoch tables the table of every epoch it asks for (for ``calls``, or a drain
        at their bucket) that it lacks."""
        if self.offsets is None or not isinstance(self.stage, LearnsOffsets):
            return
        self.stage.use_offset_tables()
        for epoch in self.stage.offset_epochs(calls, drain=drain):
            self.stage.set_offset_table(await self.offsets.table(epoch, pending=self._pending.evidence))

    # -- reading -------------------------------------------------------------------------------------------
    async def _read(self, shard: int, hint: BucketHint) -> Batch:
        async with self._read_sem:
            out: list[EventRecord] = []
            async for page in self.store.read_partition(shard, hint.bucket, max_row_bytes=hint.max_row_bytes):
                out.extend(page.events)
                self.stats.bytes += page.bytes
                if page.incomplete:
                    self.stats.incomplete = max(self.stats.incomplete, page.incomplete)
            self.stats.partitions += 1
            t0 = time.thread_time()
            batch = Batch(out)
            self.stats.cpu["decode"] += time.thread_time() - t0
            return batch

    async def flush(self) -> None:
        """Write what the stage emitted since the last flush (:func:`persist`). A failure leaves the stage's
        state ahead of the store: it is rebuilt from the committed offsets before the worker goes on (a
        stopping worker may instead flush the same emission again: its content is fixed).

        The writes are bound by the leases. Nothing is written for a shard another owner took (its part of the
        emission is dropped). No write, nor a retry of one, is sent later than ``request_timeout_ms`` before the
        earliest lease deadline of the live shards (each renewal that gets through moves the bound on): past it
        the flush is cut short with :class:`LeaseLapsedError`. That is a pause, not a failure: what was sent is
        an idempotent upsert of fixed content, and the whole emission is written again once a renewal gets
        through — which proves that nobody took the shards meanwhile, so the state needs no rebuild."""
        fenced = {st.shard for st in self.state.values() if st.fenced}
        if fenced:
            self._pending.drop_shards(fenced)
        if not self._pending.writes:
            return
        self._check_leases()
        bound = asyncio.timeout_at(self._write_bound_at())
        self._write_bounds.add(bound)
        try:
            t0 = time.process_time()
            async with bound:
                await persist(self.store, self.settings.consumer, self._pending)
            self.stats.cpu["write"] += time.process_time() - t0
        except TimeoutError:
            if not bound.expired():
                self._stage_suspect = True
                raise
            self._lapse("writes paused before their end: a lease was not renewed in time, or was lost")
        except BaseException:
            self._stage_suspect = True
            raise
        finally:
            self._write_bounds.discard(bound)
        self._pending = Emission()

    def _write_bound_at(self) -> float | None:
        """The event loop's time after which no write may be sent: the earliest lease deadline of a live shard,
        less ``request_timeout_ms`` (None: no live shard, no bound)."""
        live = [st.lease_deadline for st in self.state.values() if not st.fenced]
        if not live or min(live) == float("inf"):
            return None
        budget_s = min(live) - self.settings.request_timeout_ms / 1000 - lease_clock()
        return asyncio.get_running_loop().time() + budget_s

    async def commit(self, states: Sequence[ShardState], *, force: bool) -> None:
        """The checkpoint, in this order: (1) write every emission of the buckets consumed so far (marks, then
        story revisions: :meth:`flush`); (2) move the offsets of the shards whose position moved — at most every
        ``commit_interval_ms`` unless forced — with the stage's replay point, one conditional batch per 16 shards.
        So a committed ``read_bucket`` never covers output that is not durable, and a replay from the committed
        offsets regenerates exactly what was written. A refused shard was claimed by another owner: give it
        up."""
        await self.flush()
        self._check_leases()
        now = self.clock.now_ms()
        self._last_commit_ms = now
        due = [
            st
            for st in states
            if not st.fenced
            and st.read != st.committed_read
            and (force or now - st.last_commit_ms >= self.settings.commit_interval_ms)
        ]
        if not due:
            return
        commits = [Commit(st.shard, st.offset.epoch, st.read, self._replay_at.get(st.shard, st.read + 1)) for st in due]
        t0 = time.process_time()
        refused = set(await self.store.commit_many(self.settings.consumer, self.owner, commits))
        self.stats.cpu["commit"] += time.process_time() - t0
        for st, c in zip(due, commits, strict=True):
            if st.shard in refused:
                st.fenced = True
                log.error("shard %d: commit refused (another owner holds a newer epoch); giving it up", st.shard)
            else:
                st.committed_read = st.read
                st.committed_replay = c.replay_bucket
                st.last_commit_ms = now
                self.stats.commits += 1

    def _hold(self, off: Offset, sent: float) -> None:
        """Start holding a shard just claimed (``sent``: when the claim was sent, :func:`lease_clock`)."""
        self.state[off.shard] = ShardState(
            off.shard,
            off,
            off.read_bucket,
            off.read_bucket,
            off.replay_bucket,
            self.clock.now_ms(),
            lease_deadline=sent + self._lease_margin_s(),
        )

    def _lease_margin_s(self) -> float:
        return (self.settings.lease_ms - self.settings.max_clock_skew_ms) / 1000

    def _check_leases(self) -> None:
        """Before a write (and before reading on): a write sent now must land before every live shard's lease ends
        by our own reckoning (see ``ShardState.lease_deadline``) — another member may take a lapsed lease any
        moment — or nothing is written and nothing more is read until a renewal gets through
        (:class:`LeaseLapsedError`). The state and the emission not yet written stay as they are."""
        lands_by = lease_clock() + self.settings.request_timeout_ms / 1000  # a write sent now, at the latest
        lapsed = [st.shard for st in self.state.values() if not st.fenced and st.lease_deadline <= lands_by]
        if not lapsed:
            self._lapsed = False  # (a pause that ended with every lapsed shard lost, or given up)
            return
        self._lapse(f"leases on shards {format_ranges(lapsed)} not renewed in time")

    def _lapse(self, why: str) -> NoReturn:
        """Pause the writes until a renewal gets through: counted and logged once per pause."""
        if not self._lapsed:
            self._lapsed = True
            self.stats.lease_lapses += 1
            log.warning("%s: writing and reading nothing until a renewal gets through", why)
        raise LeaseLapsedError(f"{why}: writing nothing until a renewal gets through")

    async def renew_leases(self) -> None:
        """Renew the leases of every live shard (one conditional batch per 16 shards). A refused shard was taken
        by another owner: given up (fenced) at once. A failed renewal leaves the deadlines as they were."""
        live = [st for st in self.state.values() if not st.fenced]
        if not live:
            return
        sent = lease_clock()
        until = self.clock.now_ms() + self.settings.lease_ms
        refused = set(
            await self.store.renew_leases(
                self.settings.consumer, self.owner, [(st.shard, st.offset.epoch) for st in live], until
            )
        )
        for st in live:
            if st.shard in refused:
                st.fenced = True
                self.stats.leases_lost += 1
                log.log(
                    logging.WARNING if self.group is not None else logging.ERROR,
                    "shard %d: lease renewal refused (another owner holds a newer epoch); giving it up",
                    st.shard,
                )
            else:
                st.lease_deadline = sent + self._lease_margin_s()
        kept = [st for st in live if not st.fenced]
        lands_by = lease_clock() + self.settings.request_timeout_ms / 1000
        if self._lapsed and kept and all(st.lease_deadline > lands_by for st in kept):
            self._lapsed = False
            log.info("leases renewed: writing again")
        self._renewed.set()
        if self._write_bounds:  # flushes under way go on until the new deadlines, or stop now for a lost shard
            when = asyncio.get_running_loop().time() if refused else self._write_bound_at()
            for bound in self._write_bounds:
                if not bound.expired():
                    bound.reschedule(when)

    async def _renew_forever(self) -> None:
        """Every ``renew_ms``, beside the processing (a long step must not starve the renewals)."""
        while True:
            await asyncio.sleep(self.settings.renew_ms / 1000)
            try:
                await self.renew_leases()
            except StorylineError as exc:  # the deadlines stay: past them the worker pauses its writes
                level = logging.WARNING if exc.retriable else logging.ERROR
                log.log(level, "lease renewal failed, trying again in %.1f s: %s", self.settings.renew_ms / 1000, exc)

    async def release_leases(self) -> None:
        """A graceful stop, after the final checkpoint: end this worker's leases now, so whoever is assigned the
        shards next takes them without waiting for the leases to run out."""
        live = [(st.shard, st.offset.epoch) for st in self.state.values() if not st.fenced]
        if live:
            await self.store.release_leases(self.settings.consumer, self.owner, live)

    async def follow_group(self) -> None:
        """A group's worker: read the members, compute the group's assignment (:func:`group_assignment`, the same
        on every host) and follow this slot's part of it. Shards assigned elsewhere now are handed over — the
        emissions so far written, their offsets committed, their leases released, their state dropped — so
        their new owner takes them at once; shards assigned here are claimed when their lease has ended
        (released, or run out: a dead or cut-off owner) — a plain read of their offsets first, so that the
        conditional claim is sent only for shards it can take, and the group is read again right when the
        first lease still held elsewhere runs out (not only every ``group_poll_ms``); the state is then
        rebuilt from the committed offsets with the new shards in it. Shards another owner took (a refused
        commit or renewal) are dropped: the group's assignment decides whether they come back. While this
        member's own row is missing (its heartbeats did not get through), its slot is assigned nothing."""
        assert self.group is not None
        member, slot = self.group
        s = self.settings
        self._next_poll = time.monotonic() + s.group_poll_ms / 1000
        members = await self.store.read_members(s.consumer)
        if any(m.member == member for m in members) and s.shards is not None:
            weights = {m.member: m.workers for m in members}
            target = set(group_assignment(s.shards, weights).get((member, slot), []))
        else:
            target = set()
        if target != self._target:
            if self._target is not None:
                self.stats.rebalances += 1
                log.info("group assignment changed: this worker now has %d shards (%s)", len(target),
                         format_ranges(target) or "none")  # fmt: skip
            self._target = target
        lost = [st.shard for st in self.state.values() if st.fenced]
        if lost:
            self._forget(lost)
        leaving = sorted(set(self.state) - target)
        if leaving:
            await self._hand_over(leaving)
        missing = sorted(target - set(self.state))
        if not missing or self.stop.is_set() or self.orphaned():
            return
        now = self.clock.now_ms()
        held = [o for o in await self.store.read_offsets(s.consumer, missing) if not lease_ended(o, now)]
        if held:  # look again when the first of those leases runs out
            ends_s = (min(cast(int, o.lease_expires_ms) for o in held) - now) / 1000 + LEASE_END_MARGIN_S
            self._next_poll = min(self._next_poll, time.monotonic() + ends_s)
            missing = sorted(set(missing) - {o.shard for o in held})
            if not missing:
                return
        first = await self.first_bucket()
        sent = lease_clock()
        now = self.clock.now_ms()
        taken = await self.store.claim_many(
            s.consumer, missing, self.owner, first, lease_until_ms=now + s.lease_ms, free_at_ms=now
        )
        for off in taken:
            self._hold(off, sent)
            if off.epoch > 1:
                self.stats.takeovers += 1
            log.info("took shard %d epoch %d at bucket %d (replay from %d)", off.shard, off.epoch, off.read_bucket,
                     off.replay_bucket)  # fmt: skip
        if taken:
            self._stage_suspect = True  # rebuild with the new shards (a replay of every shard this worker holds)
            self._rebuild_for = (
                self._rebuild_for or f"with the shards taken ({format_ranges([o.shard for o in taken])})"
            )

    async def _hand_over(self, shards: Sequence[int]) -> None:
        """Give these shards up cleanly: write what was emitted, commit their offsets (unless the state is
        suspect: then their new owner replays from the last commit), release their leases, forget them."""
        states = [self.state[sh] for sh in shards if not self.state[sh].fenced]
        if not self._stage_suspect:
            await self.commit(states, force=True)
        live = [(st.shard, st.offset.epoch) for st in states if not st.fenced]
        if live:
            await self.store.release_leases(self.settings.consumer, self.owner, live)
        self._forget(shards)
        log.info("handed over shards %s", format_ranges(shards))

    def _forget(self, shards: Sequence[int]) -> None:
        self.stage.reset(list(shards))
        for sh in shards:
            self.state.pop(sh, None)
            self._replay_at.pop(sh, None)

    async def drain_all(self) -> None:
        """``run --drain``, once every live shard has read through ``until_bucket``: commit everything (the
        checkpoint), then let the stage finalize every open story at each shard's last bucket and write that
        emission — the drain's record in the marks first, then its revisions — so any later replay through that
        bucket repeats the drain instead of building those stories again; then seal those (bucket, shard) story
        periods for the story feed. Shards lost at the commit are not drained (their new owner has them)."""
        await self.commit(list(self.state.values()), force=True)
        by_bucket: dict[int, list[int]] = {}
        for st in self.state.values():
            if not st.fenced:
                by_bucket.setdefault(st.read, []).append(st.shard)
        if self.offsets is not None and isinstance(self.stage, LearnsOffsets):
            # A drain looks up the next epoch's table too (DNS answers of the drained epoch): the shards' rows of
            # their epoch go in first — this worker's written now, the other workers' (draining too) waited for, a
            # bounded time.
            epoch_of = {b: b // self.offsets.epoch_buckets for b in by_bucket}
            for bucket, shards in sorted(by_bucket.items()):
                self._pending.add(self.stage.close_epochs(shards, epoch_of[bucket]))
            await self.flush()
            for epoch in sorted(set(epoch_of.values())):
                mine = {s for b, shards in by_bucket.items() if epoch_of[b] == epoch for s in shards}
                elsewhere = {s for b, shards in by_bucket.items() if epoch_of[b] != epoch for s in shards}
                await self._await_closing_rows(epoch, mine=mine, skip=elsewhere)
        for bucket, shards in sorted(by_bucket.items()):
            await self._hand_offset_tables([(bucket, dict.fromkeys(shards, EMPTY))], drain=True)
            emission = self.stage.drain(shards, bucket)
            self._pending.add(emission)
            self._replay_at.update(emission.replay)
        await self.flush()
        # The drain wrote into periods its checkpoint had already committed: seal them, so a story feed (which
        # takes a committed period only once it is sealed or the shard has read past it) delivers them now, and
        # never before they are all written.
        self._check_leases()
        await self.store.seal_periods([(bucket, shard) for bucket, shards in by_bucket.items() for shard in shards])
        self._drained = True

    async def _await_closing_rows(self, epoch: int, *, mine: set[int], skip: set[int]) -> None:
        """Before a drain builds the next epoch's table: ``mine`` (this worker's shards drained at ``epoch``, their
        gathered rows written) each get an empty row of ``epoch`` where the store has none; then wait until every
        shard of the tenant but ``skip`` (this worker's shards drained in another epoch) has its row (the workers
        draining with this one write theirs before their drain), at most :data:`CLOSING_WAIT_S`; shards nobody
        drains (a static split with instances that keep running) are not waited for longer. The table is stored
        once, so whatever it holds, every replay applies the same. A stored row is never replaced by an empty one
        (a retried drain, a state rebuilt after a failed write)."""
        if self.offsets is None:
            return
        rows = await self.store.read_offset_evidence(self.settings.consumer, [epoch])
        absent = sorted(mine - {r.shard for r in rows})
        if absent:
            self._check_leases()
            await self.store.put_offset_evidence(self.settings.consumer, [empty_row(epoch, s) for s in absent])
        if self.settings.shards is None:
            return
        deadline = time.monotonic() + CLOSING_WAIT_S
        want = set(range(self.settings.shards)) - skip - mine
        while True:
            missing = want - {r.shard for r in rows}
            if not missing or time.monotonic() >= deadline or self.stop.is_set():
                if missing:
                    log.info(
                        "drain: %d shards wrote no row of epoch %d in %.0f s (not drained now?): going on without",
                        len(missing),
                        epoch,
                        CLOSING_WAIT_S,
                    )
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.2)
            rows = await self.store.read_offset_evidence(self.settings.consumer, [epoch])

    async def step(self) -> bool:
        """One round over every shard that is behind. Returns whether any shard was behind."""
        target = self.target()
        live = [st for st in self.state.values() if not st.fenced]
        behind = [st for st in live if st.read < target]
        if not behind or target < self._runs_at():
            return False
        lo = min(st.read for st in behind) + 1
        per_scan = CATCHUP_STEP_SLOTS * 900_000 // self.settings.bucket_ms
        last = min(target, lo + max(per_scan, 1) - 1)
        hints = await self.store.scan_index([st.shard for st in behind], lo, last)
        self.stats.index_scans += 1
        # Buckets (st.read, last] of every shard that is behind, in bucket order, all shards of a bucket in one
        # stage call; at `last` every shard (time moved on, nothing more to read).
        plan: dict[int, dict[int, BucketHint | None]] = {}
        for st in behind:
            for h in hints.get(st.shard, []):
                if st.read < h.bucket <= last:
                    plan.setdefault(h.bucket, {})[st.shard] = h
            plan.setdefault(last, {}).setdefault(st.shard, None)
        before = sum(st.read for st in behind)
        try:
            await self._feed(plan, [(st.shard, st.read + 1, last) for st in behind], replay=False)
        finally:
            self.stats.buckets += sum(st.read for st in behind) - before
        await self.commit(behind, force=False)
        return True

    # -- loop ----------------------------------------------------------------------------------------------
    def done(self) -> bool:
        live = [st for st in self.state.values() if not st.fenced]
        return self.until_bucket is not None and all(st.read >= self.until_bucket for st in live)

    def _poll_buckets(self) -> int:
        """How many readable buckets a worker at the head waits for before it hands them over (at least 1)."""
        return max(1, self.settings.poll_interval_ms // self.settings.bucket_ms)

    def _runs_at(self) -> int:
        """The bucket whose readability lets the next step run: the poll interval's last past the live shards'
        lowest position (``poll_interval_ms`` of buckets; the first past it when that is under a bucket), or the
        run's last bucket (``until``) if that comes first."""
        live = [st.read for st in self.state.values() if not st.fenced]
        at = min(live, default=0) + self._poll_buckets()
        return at if self.until_bucket is None else min(at, self.until_bucket)

    async def _sleep_until_next_bucket(self) -> None:
        cfg = self.settings
        want = max(self.target() + 1, self._runs_at())
        nxt = (want + 1) * cfg.bucket_ms + cfg.lag_ms
        delay = max(0.005, min((nxt - self.clock.now_ms()) / 1000, 1.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)

    async def _back_off(self, exc: StorylineError, backoff: float, when: str) -> float:
        """A transient error: count it, wait ``backoff`` seconds (less if the worker is stopped), return the next
        backoff."""
        self.stats.errors += 1
        self.stats.last_error = str(exc)
        log.warning("transient error%s, retrying in %.1f s: %s", when, backoff, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), backoff)
        return min(backoff * 2, MAX_BACKOFF_S)

    async def _with_backoff(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Start-up steps: transient database errors are retried with backoff until the worker is stopped."""
        backoff = 0.5
        while True:
            try:
                await fn()
                return
            except StorylineError as exc:
                if not exc.retriable or self.stop.is_set():
                    raise
                backoff = await self._back_off(exc, backoff, " at start-up")

    async def _open(self) -> None:
        try:
            await self.store.open()
        except StorylineError:
            await self.store.close()  # connected but failed after: do not leak that session into the retry
            raise

    async def _watch_parent(self) -> None:
        """Stop as soon as the supervisor is gone, in every phase (start-up retries and replay included)."""
        while not self.stop.is_set():
            if self.orphaned():
                log.error("supervisor is gone; stopping")
                self.stop.set()
                return
            await asyncio.sleep(0.2)

    async def run(self) -> int:
        """Returns 0 on a normal stop or when idle (``until``), 3 when every shard was lost to other owners."""
        watchdog = asyncio.create_task(self._watch_parent()) if self.parent_alive is not None else None
        renewer: asyncio.Task[None] | None = None
        try:
            # Start-up waits out a database that is down (a worker restarted during an outage) instead of
            # exiting and being restarted with a growing backoff.
            await self._with_backoff(self._open)
            await self._with_backoff(self.measure_skew)
            await self._with_backoff(self.claim_all)
            renewer = asyncio.create_task(self._renew_forever())
            await self._with_backoff(self.replay)
            backoff = 0.5
            while not self.stop.is_set():
                if self.orphaned():
                    log.error("supervisor is gone; stopping")
                    break
                try:
                    if self._stage_suspect:
                        self.stats.rebuilds += 1
                        if self._rebuild_for:  # planned: not after an error
                            log.info("rebuilding the stage's state from the committed offsets %s", self._rebuild_for)
                        else:
                            log.warning("rebuilding the stage's state from the committed offsets after an error")
                        self._rebuild_for = ""
                        await self.replay()
                    if self.clock.base.now_ms() - self._skew_at > SKEW_REFRESH_MS:
                        await self.measure_skew()
                    if self.group is not None and time.monotonic() >= self._next_poll:
                        await self.follow_group()
                        if self._stage_suspect:
                            continue  # rebuild (the new shards' replay) before the next step
                    self._check_leases()  # paused: read nothing more until a renewal gets through
                    progressed = await self.step()
                    if self.drain and not self._drained and self.done():
                        await self.drain_all()
                    backoff = 0.5
                except LeaseLapsedError:
                    await self._await_renewal()
                    continue
                except StorylineError as exc:
                    if not exc.retriable:
                        raise
                    backoff = await self._back_off(exc, backoff, "")
                    continue
                if self.group is None and all(st.fenced for st in self.state.values()):
                    break
                if self.done():
                    break
                if not progressed:
                    await self._sleep_until_next_bucket()
            if not self._stage_suspect:
                try:
                    await self.commit(list(self.state.values()), force=True)
                except LeaseLapsedError as exc:  # their next owner replays from the last commit
                    log.warning("stopping without the final checkpoint: %s", exc)
                if renewer is not None:
                    renewer.cancel()
                await self.release_leases()
            lost = sorted(st.shard for st in self.state.values() if st.fenced)
            if lost and self.group is None:  # a group's worker gives up lost shards and goes on (it rejoins)
                log.error("lost shards %s to another owner (their commits were refused)", format_ranges(lost))
                return 3
            return 0
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if renewer is not None:
                renewer.cancel()
            await self.store.close()

    async def _await_renewal(self) -> None:
        """Writes are paused (a lease was not renewed in time): wait for the next renewal that gets through (at
        most ``renew_ms``, then look again: the loop also follows the group and notices a stop)."""
        self._renewed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._renewed.wait(), self.settings.renew_ms / 1000)

    def _cpu_steps(self, stage_metrics: dict[str, float]) -> dict[str, int]:
        """The cost ledger's steps measured in this process, µs of CPU (``cpu_us_<step>``): the worker's and the
        stage's (a step both measure, decode, is added up)."""
        out = {f"cpu_us_{k}": round(v * 1e6) for k, v in self.stats.cpu.items()}
        for key, value in stage_metrics.items():
            if key.startswith("cpu_us_"):
                out[key] = out.get(key, 0) + int(value)
        return out

    def snapshot(self) -> dict[str, object]:
        """Metrics for the supervisor."""
        now = self.clock.now_ms()
        bms = self.settings.bucket_ms
        stage = self.stage.metrics()
        return {
            "pid": os.getpid(),
            "owner": self.owner,
            "events": self.stats.events,
            "buckets": self.stats.buckets,
            "partitions": self.stats.partitions,
            "bytes": self.stats.bytes,
            "commits": self.stats.commits,
            "stage_calls": self.stats.stage_calls,
            "errors": self.stats.errors,
            "rebuilds": self.stats.rebuilds,
            "rebalances": self.stats.rebalances,
            "takeovers": self.stats.takeovers,
            "leases_lost": self.stats.leases_lost,
            "lease_lapses": self.stats.lease_lapses,
            "incomplete": self.stats.incomplete,
            "undecodable": self.stats.undecodable,
            "last_error": self.stats.last_error,
            "shards": {
                str(st.shard): {
                    "read_bucket": st.read,
                    "lag_s": max(0.0, (now - (st.read + 1) * bms) / 1000),
                    "fenced": st.fenced,
                    "committed_read": st.committed_read,
                }
                for st in self.state.values()
            },
            "sensor_offsets": self._sensor_offsets(),
            **stage,
            **self._cpu_steps(stage),
        }

    def _sensor_offsets(self) -> dict[str, object]:
        """The learned offsets of the latest epoch this worker applied: epoch and sensor → seconds."""
        table = self.offsets.current if self.offsets is not None else None
        if table is None:
            return {}
        return {"epoch": table.epoch, "seconds": {k: v / 1e6 for k, v in table.offsets_us.items()}}


async def persist(store: Store, consumer: str, emission: Emission) -> None:
    """Write an emission: its marks first (a drain's record must be durable before the revisions it made, so that
    no later start emits them again elsewhere) with its offset evidence, then its story revisions. All are
    idempotent upserts of fixed content, so a retry, or a replay that emits the same again, rewrites identical
    bytes (evidence: a row of the same epoch and shard). The marks of different (shard, bucket)s are written
    concurrently (the store bounds the requests in flight)."""
    runs: dict[tuple[int, int], list[MarkRecord]] = {}
    for m in emission.marks:
        runs.setdefault((m.shard, m.bucket), []).append(m)
    writes = []
    for (shard, bucket), marks in runs.items():
        marks.sort(key=lambda m: m.part)
        start = 0
        for i in range(1, len(marks) + 1):
            if i == len(marks) or marks[i].part != marks[i - 1].part + 1:  # parts are written in contiguous runs
                run = marks[start:i]
                writes.append(store.put_marks(consumer, shard, bucket, [m.body for m in run], first_part=run[0].part))
                start = i
    if emission.evidence:
        writes.append(store.put_offset_evidence(consumer, emission.evidence))
    await run_all(writes)
    if emission.stories:
        await store.put_stories(emission.stories)
