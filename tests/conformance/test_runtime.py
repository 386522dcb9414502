"""The engine runtime on every store: the worker in-process (deterministic clock) and the supervisor with real
worker processes through the CLI (kill -9, SIGTERM, two instances, status)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import psutil
import pytest

from engine.core.clock import ManualClock
from engine.core.config import Config, from_mapping
from engine.core.errors import ClockSkewError, LeaseLapsedError, SchemaError, TransientStoreError
from engine.core.event import Event, encode
from engine.core.stage import Emission, MarkRecord
from engine.runtime.assign import group_assignment
from engine.runtime.stages import CountingStage
from engine.runtime.worker import Worker, lease_clock
from engine.store import EventRecord, Member, Store, make_store
from engine.testing.recording import read_records
from tests import cli
from tests.cli import FAST, spawn, store_args
from tests.conftest import ConfigFactory, arun, base_tree, drop_tenant, merge, new_tenant, require_cql

pytestmark = pytest.mark.conformance


def ev(i: int, shard_hint: int = 0) -> Event:
    return Event(
        f"e{shard_hint}-{i:06d}", 1_790_000_000_000_000 + i, "fw", "fw-1", None, False, None, None, None, None, None, {}
    )


async def put(store: Store, shard: int, bucket: int, events: Sequence[Event]) -> None:
    await store.append(shard, bucket, [EventRecord(e.id, encode(e)) for e in events])


async def started(cfg: Config, clock: ManualClock) -> Store:
    store = make_store(cfg, clock)
    await store.open()
    await store.init_schema()
    return store


# -- the worker, in-process --------------------------------------------------------------------------------------
def test_worker_reads_every_bucket_up_to_the_lag_and_no_further(make_config: ConfigFactory) -> None:
    cfg = make_config(shards=4, **FAST)
    clock = ManualClock(int(time.time() * 1000))

    async def body() -> None:
        store = await started(cfg, clock)
        b0 = clock.now_ms() // cfg.bucket_ms
        try:
            for k in range(5):  # events in buckets b0+1 … b0+5 of shards 0 and 3
                await put(store, 0, b0 + 1 + k, [ev(10 * k + j) for j in range(3)])
                await put(store, 3, b0 + 1 + k, [ev(10 * k + j, 3) for j in range(2)])
            stage = CountingStage()
            stage.keep_ids = True
            w = Worker.from_config(
                cfg, [0, 1, 2, 3], stage, owner="w-a", clock=clock, store=make_store(cfg, clock), check_skew=False
            )
            await w.store.open()
            await w.measure_skew()
            await w.claim_all()
            # the clock is at b0: nothing is old enough yet
            assert not await w.step()
            # b0+3 is readable once now - lag reaches it
            clock.set((b0 + 3) * cfg.bucket_ms + cfg.lag_ms)
            assert w.target() == b0 + 3
            await w.step()
            assert stage.events == 3 * 3 + 3 * 2
            assert [b for b, _ in stage.seen[0]] == [b0 + 1, b0 + 2, b0 + 3]
            assert all(st.read == b0 + 3 for st in w.state.values())  # empty shards advanced too
            clock.advance(10 * cfg.bucket_ms)
            while await w.step():
                pass
            assert stage.events == 5 * 5
            await w.commit(list(w.state.values()), force=True)
            offs = await store.read_offsets(cfg.consumer, range(4))
            assert {o.read_bucket for o in offs} == {w.target()}
            await w.store.close()
        finally:
            await store.close()

    arun(body())


def test_at_the_head_a_worker_waits_for_a_poll_interval_of_buckets_and_hands_them_over_in_one_call(
    make_config: ConfigFactory,
) -> None:
    cfg = make_config(shards=2, **{**FAST, "poll_interval_ms": 500})  # 5 buckets of 100 ms
    clock = ManualClock(int(time.time() * 1000))

    async def body() -> None:
        store = await started(cfg, clock)
        try:
            stage = CountingStage()
            calls: list[list[int]] = []
            on_buckets = stage.on_buckets

            def recording(buckets: Any, *, replay: bool) -> Emission:
                calls.append([b for b, _ in buckets])
                return on_buckets(buckets, replay=replay)

            stage.on_buckets = recording  # type: ignore[method-assign]
            w = Worker.from_config(
                cfg, [0, 1], stage, owner="w-a", clock=clock, store=make_store(cfg, clock), check_skew=False
            )
            await w.store.open()
            await w.measure_skew()
            await w.claim_all()
            start = w.state[0].read
            for k in range(8):
                await put(store, 0, start + 1 + k, [ev(10 * k + j) for j in range(2)])
            # fewer than 5 readable buckets past the position: nothing is read yet
            clock.set((start + 4) * cfg.bucket_ms + cfg.lag_ms)
            assert w.target() == start + 4
            assert not await w.step()
            assert stage.events == 0 and calls == []
            # the fifth: the five go to the stage in one call
            clock.set((start + 5) * cfg.bucket_ms + cfg.lag_ms)
            assert await w.step()
            assert calls == [list(range(start + 1, start + 6))]
            assert stage.events == 2 * 5
            read = w.state[0].read
            assert read == start + 5
            # a run's last bucket is read without waiting for the interval
            clock.advance(2 * cfg.bucket_ms)
            assert not await w.step()
            w.until_bucket = read + 2
            assert await w.step()
            assert w.state[0].read == read + 2 and w.done()
            await w.store.close()
        finally:
            await store.close()

    arun(body())


def test_a_worker_refuses_an_old_schema_until_init_migrates_it(make_config: ConfigFactory, backend: str) -> None:
    """A tenant created by schema version 1 (no stage_marks table): workers stop with a clear message, and
    `storyline init` migrates it."""
    cfg = make_config(shards=2, **FAST)
    clock = ManualClock(int(time.time() * 1000))

    async def body() -> None:
        store = await started(cfg, clock)
        try:
            if backend == "cql":
                from engine.store.cql import CqlStore

                assert isinstance(store, CqlStore)
                await store._ddl(f"DROP TABLE {cfg.keyspace}.stage_marks")
                await store._exec(
                    "t", "v1", f"INSERT INTO {cfg.keyspace}.meta (key, value) VALUES ('schema_version', '1')", []
                )
            else:
                from engine.store.embedded import EmbeddedStore

                assert isinstance(store, EmbeddedStore)
                await store._run("t", lambda c: c.execute(f"DROP TABLE {store.t('stage_marks')}"), write=True)
                await store._run(
                    "t",
                    lambda c: c.execute(f"UPDATE {store.t('meta')} SET value = '1' WHERE key = 'schema_version'"),
                    write=True,
                )
            w = Worker.from_config(
                cfg, [0, 1], CountingStage(), owner="w-old", clock=clock, store=make_store(cfg, clock)
            )
            await w.store.open()
            with pytest.raises(SchemaError, match=r"schema version 1, this Storyline needs \d+: run `storyline init`"):
                await w.claim_all()
            did = await store.init_schema()
            assert any("stage_marks" in line and "created" in line for line in did), did
            assert any(line.startswith("schema version 1 -> ") for line in did), did
            await w.claim_all()
            assert sorted(w.state) == [0, 1]
            await w.store.close()
        finally:
            await store.close()

    arun(body())


def test_worker_resumes_after_its_offset_and_a_stale_owner_is_fenced(make_config: ConfigFactory) -> None:
    cfg = make_config(shards=2, **FAST)
    clock = ManualClock(int(time.time() * 1000))

    async def body() -> None:
        store = await started(cfg, clock)
        b0 = clock.now_ms() // cfg.bucket_ms
        try:
            await put(store, 1, b0 + 1, [ev(1), ev(2)])
            clock.set((b0 + 2) * cfg.bucket_ms + cfg.lag_ms)
            first = CountingStage()
            a = Worker.from_config(
                cfg, [0, 1], first, owner="a", clock=clock, store=make_store(cfg, clock), check_skew=False
            )
            a.until_bucket = b0 + 2
            assert await a.run() == 0
            assert first.events == 2
            await put(store, 1, b0 + 3, [ev(3)])
            clock.set((b0 + 4) * cfg.bucket_ms + cfg.lag_ms)
            second = CountingStage()
            b = Worker.from_config(
                cfg, [0, 1], second, owner="b", clock=clock, store=make_store(cfg, clock), check_skew=False
            )
            b.until_bucket = b0 + 4
            assert await b.run() == 0
            assert second.events == 1  # resumed after the committed offset: nothing delivered twice
            # a zombie: claims happened (epoch 1 for a, 2 for b); a third owner takes over while b still runs
            zombie = Worker.from_config(
                cfg,
                [0, 1],
                CountingStage(),
                owner="zombie",
                clock=clock,
                store=make_store(cfg, clock),
                check_skew=False,
            )
            await zombie.store.open()
            await zombie.measure_skew()
            await zombie.claim_all()
            c = Worker.from_config(
                cfg, [0, 1], CountingStage(), owner="c", clock=clock, store=make_store(cfg, clock), check_skew=False
            )
            await c.store.open()
            await c.claim_all()
            clock.advance(5 * cfg.bucket_ms)
            await zombie.step()
            await zombie.commit(list(zombie.state.values()), force=True)
            assert all(st.fenced for st in zombie.state.values())
            offs = {o.shard: o for o in await store.read_offsets(cfg.consumer, [0, 1])}
            assert all(o.owner == "c" and o.read_bucket == b0 + 4 for o in offs.values())
            await zombie.store.close()
            await c.store.close()
        finally:
            await store.close()

    arun(body())


def test_a_worker_holds_leases_pauses_when_they_lapse_and_releases_them_at_a_clean_stop(
    make_config: ConfigFactory,
) -> None:
    """Issue 20: claiming sets the shards' leases; past a lease's deadline (no renewal in time) the worker writes
    nothing — no story, no commit — until a renewal succeeds, and then goes on where it was (a renewal that gets
    through proves nobody took the shards: no rebuild); a renewal refused because another owner took the shard
    gives the shard up; a clean stop releases the leases (``lease_expires_ms = 0``)."""
    cfg = make_config(shards=2, **FAST)
    clock = ManualClock(int(time.time() * 1000))

    async def body() -> None:
        store = await started(cfg, clock)
        b0 = clock.now_ms() // cfg.bucket_ms
        try:
            await put(store, 1, b0 + 1, [ev(1), ev(2)])
            w = Worker.from_config(
                cfg, [0, 1], CountingStage(), owner="w", clock=clock, store=make_store(cfg, clock), check_skew=False
            )
            await w.store.open()
            await w.claim_all()
            offs = {o.shard: o for o in await store.read_offsets(cfg.consumer, [0, 1])}
            assert all(o.owner == "w" and o.lease_expires_ms == clock.now_ms() + cfg.lease_ms for o in offs.values())
            clock.set((b0 + 2) * cfg.bucket_ms + cfg.lag_ms)
            w.state[1].lease_deadline = lease_clock() - 1  # the renewals did not get through in time
            with pytest.raises(LeaseLapsedError, match="shards 1"):
                await w.step()
                await w.commit(list(w.state.values()), force=True)
            assert w.stats.lease_lapses == 1 and not w._stage_suspect and w._pending.writes == 0
            with pytest.raises(LeaseLapsedError):  # the same pause: counted once
                await w.commit(list(w.state.values()), force=True)
            assert w.stats.lease_lapses == 1
            assert {o.shard: o.read_bucket for o in await store.read_offsets(cfg.consumer, [0, 1])} == {
                s: offs[s].read_bucket for s in (0, 1)
            }, "nothing committed while a lease had lapsed"
            clock.advance(1_000)
            await w.renew_leases()  # it gets through: the worker goes on (after rebuilding its state)
            assert w.state[1].lease_deadline > lease_clock()
            (renewed,) = await store.read_offsets(cfg.consumer, [1])
            assert renewed.lease_expires_ms == clock.now_ms() + cfg.lease_ms
            await w.step()
            await w.commit(list(w.state.values()), force=True)
            moved = {o.shard: o.read_bucket for o in await store.read_offsets(cfg.consumer, [0, 1])}
            assert all(moved[s] > offs[s].read_bucket for s in (0, 1)), (moved, offs)
            # another owner takes shard 0 (a static claim): the next renewal gives it up
            await store.claim(cfg.consumer, 0, "other", 0)
            await w.renew_leases()
            assert w.state[0].fenced and not w.state[1].fenced and w.stats.leases_lost == 1
            await w.release_leases()
            final = {o.shard: o for o in await store.read_offsets(cfg.consumer, [0, 1])}
            assert (final[1].owner, final[1].lease_expires_ms) == ("w", 0)
            assert final[0].owner == "other" and final[0].lease_expires_ms != 0, "not released: not w's any more"
            await w.store.close()
            # a whole run ends with its leases released
            clock.advance(10 * cfg.bucket_ms)
            r = Worker.from_config(
                cfg, [1], CountingStage(), owner="r", clock=clock, store=make_store(cfg, clock), check_skew=False
            )
            r.until_bucket = (clock.now_ms() - cfg.lag_ms) // cfg.bucket_ms - 1
            assert await r.run() == 0
            (done,) = await store.read_offsets(cfg.consumer, [1])
            assert (done.owner, done.lease_expires_ms) == ("r", 0)
        finally:
            await store.close()

    arun(body())


class MarkingStage(CountingStage):
    """A counting stage that emits one mark per partition it consumes (so the worker has writes to flush) and
    records every bucket handed to it, replayed or not."""

    def __init__(self) -> None:
        super().__init__()
        self.handed: list[tuple[int, int, bool]] = []  # (shard, bucket, replay)

    def on_buckets(self, buckets: Any, *, replay: bool) -> Emission:
        out = super().on_buckets(buckets, replay=replay)
        for bucket, batches in buckets:
            for shard, b in batches.items():
                self.handed.append((shard, bucket, replay))
                if len(b):
                    out.marks.append(MarkRecord(shard, bucket, 0, b"m"))
        return out


def test_a_lease_lapse_during_a_flush_in_a_step_never_hands_the_stage_a_bucket_twice(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that flushes on the way (its pending writes reach FLUSH_WRITES) and finds a lease lapsed stops
    with LeaseLapsedError — a pause, the state kept. The buckets the stage consumed before that flush count as
    read: after the renewal the worker goes on after them. Handing them over again would feed a stateful stage
    the same buckets twice, out of order (the story builder then builds stories twice: most likely what a CI run
    of the chaos tier found as events in two stories and events in none)."""
    import engine.runtime.worker as worker_mod

    monkeypatch.setattr(worker_mod, "FLUSH_WRITES", 1)
    monkeypatch.setattr(worker_mod, "CALL_BUCKETS", 2)
    cfg = make_config(shards=2, **FAST)
    clock = ManualClock(int(time.time() * 1000))

    async def body() -> None:
        store = await started(cfg, clock)
        b0 = clock.now_ms() // cfg.bucket_ms
        try:
            for k in range(6):
                await put(store, 0, b0 + 1 + k, [ev(10 * k)])
                await put(store, 1, b0 + 1 + k, [ev(10 * k, 1)])
            stage = MarkingStage()
            w = Worker.from_config(cfg, [0, 1], stage, owner="w", clock=clock, store=make_store(cfg, clock),
                                   check_skew=False)  # fmt: skip
            await w.store.open()
            await w.claim_all()
            await w.replay()
            clock.set((b0 + 6) * cfg.bucket_ms + cfg.lag_ms)
            # the first call's flush goes through; the lease lapses before the second call's
            real_flush = w.flush
            flushes = [0]

            async def flush() -> None:
                flushes[0] += bool(w._pending.writes)
                if flushes[0] == 2:
                    w.state[1].lease_deadline = lease_clock() - 1
                await real_flush()

            monkeypatch.setattr(w, "flush", flush)
            with pytest.raises(LeaseLapsedError):
                await w.step()
            assert not w._stage_suspect and w._pending.writes, "a pause: the state and the emission kept"
            assert {st.shard: st.read for st in w.state.values()} == {0: b0 + 4, 1: b0 + 4}, "read: what was handed"
            clock.advance(1_000)
            await w.renew_leases()
            while await w.step():
                pass
            await w.commit(list(w.state.values()), force=True)
            live = [(s, b) for s, b, replay in stage.handed if not replay]
            assert len(live) == len(set(live)), f"buckets handed to the stage twice: {live}"
            for s in (0, 1):
                mine = [b for sh, b in live if sh == s]
                assert mine == sorted(mine) and set(range(b0 + 1, b0 + 7)) <= set(mine), (s, mine)
            assert stage.events == 12
            assert {o.shard: o.read_bucket for o in await store.read_offsets(cfg.consumer, [0, 1])} == {
                0: clock.now_ms() // cfg.bucket_ms - cfg.lag_ms // cfg.bucket_ms,
                1: clock.now_ms() // cfg.bucket_ms - cfg.lag_ms // cfg.bucket_ms,
            }
            for s in (0, 1):  # every mark written once the pause ended
                assert len(await store.read_marks(cfg.consumer, s, b0, b0 + 10)) == 6
            await w.store.close()
        finally:
            await store.close()

    arun(body())


def test_workers_of_a_group_follow_its_assignment_hand_over_and_fail_over(make_config: ConfigFactory) -> None:
    """Issue 20, in-process: a group's workers hold exactly their slots' part of the group's assignment. A join
    moves the joiner's part only once its holder handed it over (written, committed, released: taken at once);
    a member that vanishes without releasing (killed, cut off) loses its shards to the others once its leases
    have run out, not before; its renewals are then refused and it drops them (it rejoins, it does not exit)."""
    cfg = make_config(shards=8, **FAST)
    clock = ManualClock(int(time.time() * 1000))

    def worker(owner: str, member: str) -> Worker:
        return Worker.from_config(
            cfg, [], CountingStage(), owner=owner, clock=clock, store=make_store(cfg, clock), check_skew=False,
            group=(member, 0),
        )  # fmt: skip

    async def body() -> None:
        store = await started(cfg, clock)
        b0 = clock.now_ms() // cfg.bucket_ms
        a, b = worker("a", "m1"), worker("b", "m2")
        try:
            for sh in range(8):
                await put(store, sh, b0 + 1, [ev(sh * 10 + 1, sh)])
            now = clock.now_ms()
            await store.heartbeat(cfg.consumer, Member("m1", "h1", 1, 1, now, now), 60_000)
            await a.store.open()
            await a.claim_all()
            assert sorted(a.state) == list(range(8)) and a.stats.takeovers == 0  # new shards: nobody's before
            await store.heartbeat(cfg.consumer, Member("m2", "h2", 2, 1, now, now), 60_000)
            await b.store.open()
            await b.claim_all()
            assert b.state == {}, "a's leases are live: nothing taken yet"
            want = group_assignment(8, {"m1": 1, "m2": 1})
            mine, theirs = want[("m1", 0)], want[("m2", 0)]
            assert mine and theirs
            clock.set((b0 + 2) * cfg.bucket_ms + cfg.lag_ms)
            await a.replay()
            await a.step()  # a consumed every shard before the handover: its offsets go with them
            await a.follow_group()
            assert sorted(a.state) == mine and a.stats.rebalances == 1
            released = {o.shard: o for o in await store.read_offsets(cfg.consumer, theirs)}
            assert all(o.lease_expires_ms == 0 and o.read_bucket >= b0 + 1 for o in released.values())
            await b.follow_group()
            assert sorted(b.state) == theirs and b.stats.takeovers == len(theirs)
            assert all(b.state[sh].committed_read == released[sh].read_bucket for sh in theirs), "resumed, not reread"
            owners = {o.shard: o.owner for o in await store.read_offsets(cfg.consumer, list(range(8)))}
            assert owners == {sh: "a" if sh in mine else "b" for sh in range(8)}
            # m2 disappears without releasing anything (its row expires; for the others that is a leave)
            await store.leave(cfg.consumer, "m2")
            await a.follow_group()
            assert sorted(a.state) == mine, "b's leases are still live"
            clock.advance(cfg.lease_ms + 1)
            await a.follow_group()
            assert sorted(a.state) == list(range(8)) and a.stats.takeovers == len(theirs)
            # b wakes up: every renewal is refused, it gives the shards up and holds nothing (not a member now)
            await b.renew_leases()
            assert all(st.fenced for st in b.state.values()) and b.stats.leases_lost == len(theirs)
            await b.follow_group()
            assert b.state == {}
            final = {o.shard: o for o in await store.read_offsets(cfg.consumer, list(range(8)))}
            assert all(o.owner == "a" and o.read_bucket >= b0 + 1 for o in final.values()), "no offset moved back"
        finally:
            await a.store.close()
            await b.store.close()
            await store.close()

    arun(body())


def test_worker_skips_and_counts_rows_that_are_not_events(make_config: ConfigFactory) -> None:
    cfg = make_config(shards=1, **FAST)
    clock = ManualClock(int(time.time() * 1000))

    async def body() -> None:
        store = await started(cfg, clock)
        b0 = clock.now_ms() // cfg.bucket_ms
        try:
            await put(store, 0, b0 + 1, [ev(1), ev(3)])
            await store.append(0, b0 + 1, [EventRecord("e0-000002", b'{"not": "an event"}')])
            clock.set((b0 + 2) * cfg.bucket_ms + cfg.lag_ms)
            stage = CountingStage()
            stage.keep_ids = True
            w = Worker.from_config(cfg, [0], stage, owner="w", clock=clock, until_bucket=b0 + 2, check_skew=False)
            assert await w.run() == 0
            assert stage.seen[0] == [(b0 + 1, ["e0-000001", "e0-000003"])]
            assert w.stats.undecodable == 1
        finally:
            await store.close()

    arun(body())


class SlowMarks:
    """Around a real store: every ``put_marks`` call waits ``delay_s`` before it is sent (a database that answers
    slowly); ``sent`` counts the calls that reached the store."""

    def __init__(self, store: Store, delay_s: float) -> None:
        self.store = store
        self.delay_s = delay_s
        self.sent = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def put_marks(
        self, consumer: str, shard: int, bucket: int, parts: Sequence[bytes], *, first_part: int = 0
    ) -> None:
        await asyncio.sleep(self.delay_s)
        self.sent += 1
        await self.store.put_marks(consumer, shard, bucket, parts, first_part=first_part)


def test_a_flush_sends_no_write_that_could_land_after_the_leases_end(make_config: ConfigFactory) -> None:
    """Issue 20: no write is sent later than ``request_timeout_ms`` before the earliest lease deadline (so a write
    the database applies within the request timeout lands while the worker holds its shards); a flush still under
    way then is cut short (LeaseLapsedError, nothing more sent, the emission kept for later). A renewal that gets
    through meanwhile moves the bound on, so a slow flush of a worker whose renewals succeed is never cut; a
    renewal refused for a shard cuts it at once, and that shard's writes are dropped."""
    cfg = make_config(shards=2, **FAST)
    clock = ManualClock(int(time.time() * 1000))
    timeout_s = cfg.request_timeout_ms / 1000

    async def body() -> None:
        store = await started(cfg, clock)
        try:
            slow = SlowMarks(make_store(cfg, clock), delay_s=0.6)
            w = Worker.from_config(cfg, [0, 1], CountingStage(), owner="w", clock=clock, store=slow, check_skew=False)
            await w.store.open()
            await w.claim_all()
            b = clock.now_ms() // cfg.bucket_ms
            marks = [MarkRecord(0, b, 0, b"m0"), MarkRecord(1, b, 0, b"m1")]
            # the leases end 0.3 s after the last moment a write may be sent: the slow writes would land too late
            w.state[1].lease_deadline = lease_clock() + timeout_s + 0.3
            w._pending = Emission(marks=list(marks))
            t0 = time.monotonic()
            with pytest.raises(LeaseLapsedError, match="writes paused"):
                await w.flush()
            assert 0.25 < time.monotonic() - t0 < 0.6 + 0.5, "cut at the bound, not at the end of the slow writes"
            assert slow.sent == 0 and w.stats.lease_lapses == 1 and w._pending.writes == 2, "kept, not dropped"
            assert not w._stage_suspect, "a pause: the state is still good"
            assert await store.read_marks(cfg.consumer, 1, b, b) == []
            # the same, but a renewal gets through while the flush waits: it goes on to the end
            w.state[1].lease_deadline = lease_clock() + timeout_s + 0.3
            flush = asyncio.create_task(w.flush())
            await asyncio.sleep(0.1)
            await w.renew_leases()
            await flush
            assert slow.sent == 2 and not w._stage_suspect and w._pending.writes == 0
            assert await store.read_marks(cfg.consumer, 1, b, b) == [(b, b"m1")]
            # a shard taken by another owner meanwhile: the renewal cuts the flush at once, and nothing more is
            # written for that shard (its part of the emission is dropped); the other shard's is written
            await store.claim(cfg.consumer, 0, "other", 0)
            w._pending = Emission(marks=[MarkRecord(0, b + 1, 0, b"x0"), MarkRecord(1, b + 1, 0, b"x1")])
            flush = asyncio.create_task(w.flush())
            await asyncio.sleep(0.1)
            await w.renew_leases()
            t0 = time.monotonic()
            with pytest.raises(LeaseLapsedError):
                await flush
            assert time.monotonic() - t0 < 0.4 and w.state[0].fenced and slow.sent == 2
            await w.flush()
            assert slow.sent == 3 and w._pending.writes == 0
            assert await store.read_marks(cfg.consumer, 0, b + 1, b + 1) == []
            assert await store.read_marks(cfg.consumer, 1, b + 1, b + 1) == [(b + 1, b"x1")]
            await w.store.close()
        finally:
            await store.close()

    arun(body())


class FlakyReads:
    """Fault injection around a real store: the first ``n`` partition reads fail with a transient error."""

    def __init__(self, store: Store, n: int) -> None:
        self.store = store
        self.n = n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def read_partition(self, shard: int, bucket: int, *, max_row_bytes: int | None = None) -> Any:
        if self.n > 0:
            self.n -= 1
            raise TransientStoreError("injected: read timed out")
        async for page in self.store.read_partition(shard, bucket, max_row_bytes=max_row_bytes):
            yield page


def test_worker_retries_transient_errors_without_moving_past_a_failed_bucket(make_config: ConfigFactory) -> None:
    cfg = make_config(shards=1, **FAST)
    clock = ManualClock(int(time.time() * 1000))

    async def body() -> None:
        store = await started(cfg, clock)
        b0 = clock.now_ms() // cfg.bucket_ms
        try:
            await put(store, 0, b0 + 1, [ev(1)])
            await put(store, 0, b0 + 2, [ev(2)])
            clock.set((b0 + 3) * cfg.bucket_ms + cfg.lag_ms)
            stage = CountingStage()
            stage.keep_ids = True
            inner = make_store(cfg, clock)
            w = Worker.from_config(
                cfg, [0], stage, owner="w", clock=clock, store=FlakyReads(inner, 2), check_skew=False
            )
            await w.store.open()
            await w.measure_skew()
            await w.claim_all()
            start = w.state[0].read
            with pytest.raises(TransientStoreError):
                await w.step()  # both read-ahead reads fail
            assert w.state[0].read == start and stage.events == 0
            await w.step()
            assert [ids for _, ids in stage.seen[0]] == [["e0-000001"], ["e0-000002"]]
            await w.store.close()
        finally:
            await store.close()

    arun(body())


@pytest.mark.cql
def test_worker_refuses_a_skewed_clock(tmp_path: Path) -> None:
    # CQL only: the embedded store's clock is this host's, so there is no second clock to disagree with.
    require_cql()
    cfg = from_mapping(merge(base_tree("cql", tmp_path, new_tenant()), {"shards": 1, **FAST}))
    clock = ManualClock(int(time.time() * 1000) + 5_000)

    async def body() -> None:
        store = await started(cfg, ManualClock(int(time.time() * 1000)))
        await store.close()
        try:
            w = Worker.from_config(cfg, [0], CountingStage(), owner="w", clock=clock)
            with pytest.raises(ClockSkewError):
                await w.run()
        finally:
            await drop_tenant(cfg)

    arun(body())


# -- the supervisor and real worker processes ------------------------------------------------------------------
def cli_args(cfg: Config) -> list[str]:
    assert cfg.bucket_ms == FAST["bucket_ms"], "make the config with **FAST"
    args = [
        "--set",
        f"tenant={cfg.tenant}",
        "--set",
        f"shards={cfg.shards}",
        "--set",
        f"store.backend={cfg.store.backend}",
    ]
    for k, v in FAST.items():
        args += ["--set", f"{k}={v}"]
    return args + store_args(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def storyline(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return cli.storyline(*args, timeout=timeout)


def ingest(cfg: Config, tmp: Path, sessions: int, seed: int = 1) -> set[str]:
    return cli.ingest(cfg, tmp, sessions, seed, cli_args=cli_args(cfg), timeout=180)


def recorded(directory: Path) -> list[str]:
    return [i for r in read_records(str(directory)) for i in cast(list[str], r["ids"])]


def worker_pids(proc: subprocess.Popen[str]) -> list[int]:
    try:
        kids = psutil.Process(proc.pid).children()
    except psutil.Error:
        return []
    out = []
    for k in kids:
        try:
            if k.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(k.cmdline()):
                out.append(k.pid)
        except psutil.Error:
            continue  # gone, or a zombie the supervisor has not reaped yet
    return out


def test_two_workers_consume_everything_and_status_follows_lag(make_config: ConfigFactory, tmp_path: Path) -> None:
    cfg = make_config(shards=8, **FAST)
    args = cli_args(cfg)
    assert storyline("init", *args).returncode == 0
    assert storyline("status", *args).returncode == 1  # never consumed: unhealthy
    want = ingest(cfg, tmp_path, 600)
    time.sleep(FAST["lag_ms"] / 1000 + 0.3)
    res = storyline("run", *args, "--workers", "2", "--until-idle", "--record", str(tmp_path / "rec"))
    assert res.returncode == 0, res.stderr
    got = recorded(tmp_path / "rec")
    assert set(got) == want and len(got) == len(want)
    final = json.loads(res.stdout.strip().splitlines()[-1])
    assert final["final"] and final["events"] == len(want)
    # Status follows the lag: healthy while workers keep up, unhealthy once nobody consumes for 2 x lag. Checked
    # against a running engine, not right after `--until-idle`: whether its exit and the status command's start
    # fit in the lag is a matter of machine load (a CI with 60 % CPU steal once took longer).
    shared = {r["owner"] for r in json.loads(storyline("status", *args, "--json").stdout)["shards"]}
    assert len(shared) == 2, shared  # the two workers shared the shards
    sup = spawn("run", *args, "--workers", "2")
    try:
        deadline = time.time() + 90
        while True:  # until the new run's two workers hold every shard and keep up
            st = storyline("status", *args, "--json")
            report = json.loads(st.stdout)
            owners = {r["owner"] for r in report["shards"]}
            if st.returncode == 0 and report["summary"]["healthy"] and len(owners) == 2 and not owners & shared:
                break
            assert sup.poll() is None, sup.communicate()[1][-3000:]
            assert time.time() < deadline, f"never healthy while the engine ran: {report}"
            time.sleep(0.5)
    finally:
        sup.send_signal(signal.SIGTERM)
        _out, err = sup.communicate(timeout=60)
    assert sup.returncode == 0, err
    time.sleep(2 * FAST["lag_ms"] / 1000 + 0.5)  # nobody consumes: the lag grows past 2 x lag
    assert storyline("status", *args).returncode == 1


def test_kill_9_of_a_worker_loses_nothing(make_config: ConfigFactory, tmp_path: Path) -> None:
    cfg = make_config(shards=8, **FAST)
    args = cli_args(cfg)
    assert storyline("init", *args).returncode == 0
    rec = tmp_path / "rec"
    sup = spawn("run", *args, "--workers", "2", "--record", f"{rec},15")
    want: set[str] = set()
    try:
        for seed in range(1, 4):  # producers and consumers run concurrently
            want |= ingest(cfg, tmp_path, 300, seed)
        deadline = time.time() + 60
        while len(worker_pids(sup)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(FAST["lag_ms"] / 1000 + 0.5)  # consumption is under way
        victim = worker_pids(sup)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 120
        while time.time() < deadline:
            if set(recorded(rec)) >= want:
                break
            time.sleep(0.5)
        deadline = time.time() + 30
        while (victim in worker_pids(sup) or len(worker_pids(sup)) < 2) and time.time() < deadline:
            time.sleep(0.2)
        pids = worker_pids(sup)
        assert victim not in pids and len(pids) == 2  # the supervisor restarted it
    finally:
        sup.send_signal(signal.SIGTERM)
        out, err = sup.communicate(timeout=60)
    assert sup.returncode == 0, err
    got = recorded(rec)
    assert set(got) >= want, f"{len(want - set(got))} events lost"
    assert (
        json.loads(out.strip().splitlines()[-1])["workers"][0]["restarts"]
        + json.loads(out.strip().splitlines()[-1])["workers"][1]["restarts"]
        >= 1
    )


def test_sigterm_stops_cleanly_within_the_timeout(make_config: ConfigFactory, tmp_path: Path) -> None:
    cfg = make_config(shards=4, **FAST)
    args = cli_args(cfg)
    assert storyline("init", *args).returncode == 0
    want = ingest(cfg, tmp_path, 400)
    time.sleep(FAST["lag_ms"] / 1000 + 0.3)
    rec = tmp_path / "rec"
    port = free_port()
    sup = spawn("run", *args, "--workers", "2", "--record", f"{rec},30", "--set", f"metrics_port={port}")
    time.sleep(3.0)
    body = ""
    for _ in range(40):  # the Prometheus endpoint on 127.0.0.1 while it runs
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                body = resp.read().decode()
            if "storyline_shard_lag_seconds{" in body:
                break
        except OSError:
            pass
        time.sleep(0.25)
    assert "storyline_events_total" in body and 'storyline_worker_rss_bytes{worker="1"}' in body
    t0 = time.time()
    sup.send_signal(signal.SIGTERM)
    _out, err = sup.communicate(timeout=60)
    took = time.time() - t0
    assert sup.returncode == 0, err
    assert took < FAST["shutdown_timeout_ms"] / 1000
    assert "did not stop" not in err
    # what was consumed before the stop is committed: a second run delivers only the rest
    first = recorded(rec)
    res = storyline("run", *args, "--workers", "1", "--until-idle", "--record", str(tmp_path / "rec2"))
    assert res.returncode == 0, res.stderr
    second = recorded(tmp_path / "rec2")
    assert set(first) | set(second) == want
    assert len(set(first) & set(second)) <= len(want) // 4  # at most the uncommitted tail is re-read


def test_two_instances_with_disjoint_ranges_share_one_database(make_config: ConfigFactory, tmp_path: Path) -> None:
    cfg = make_config(shards=8, **FAST)
    args = cli_args(cfg)
    assert storyline("init", *args).returncode == 0
    want = ingest(cfg, tmp_path, 500)
    time.sleep(FAST["lag_ms"] / 1000 + 0.3)
    a = spawn("run", *args, "--shards", "0-3", "--until-idle", "--record", str(tmp_path / "a"))
    b = spawn("run", *args, "--shards", "4-7", "--until-idle", "--record", str(tmp_path / "b"))
    for p in (a, b):
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    ra, rb = read_records(str(tmp_path / "a")), read_records(str(tmp_path / "b"))
    assert {r["shard"] for r in ra} <= {0, 1, 2, 3} and {r["shard"] for r in rb} <= {4, 5, 6, 7}
    assert set(recorded(tmp_path / "a")) | set(recorded(tmp_path / "b")) == want
    report = json.loads(storyline("status", *args, "--json").stdout)
    owners = {r["shard"]: r["owner"].rsplit(":", 3)[0] for r in report["shards"]}
    assert len({owners[s] for s in range(4)}) == 1 and len({owners[s] for s in range(4, 8)}) == 1
    assert owners[0] != owners[4]


def group_status(args: list[str]) -> tuple[list[str], dict[int, str]]:
    """``status --json`` of a group: its member ids, and each owned shard's owner member (its worker ids start
    with the member id) whose lease is live (a released or lapsed lease is nobody's)."""
    report = json.loads(storyline("status", *args, "--json").stdout)
    members = [m["member"] for m in report["members"]]
    now = time.time() * 1000
    owners = {}
    for r in report["shards"]:
        if r["owner"] and r.get("lease_expires_ms") and r["lease_expires_ms"] > now:
            owners[r["shard"]] = next((m for m in members if r["owner"].startswith(m + ":")), r["owner"])
    return members, owners


def wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.25)
    return time.monotonic() - t0


def kill_instance(proc: subprocess.Popen[str]) -> None:
    """kill -9 of a whole instance: its supervisor and its workers at once."""
    victims = [proc.pid, *worker_pids(proc)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)


def took_shards(log: Path, *, after: float) -> dict[int, float]:
    """From a run's log (``%(asctime)s … took shard N epoch E …`` lines, local time to the millisecond): each
    shard taken after the wall time ``after`` → when it was taken (its last take)."""
    out: dict[int, float] = {}
    for ln in log.read_text().splitlines():
        if " took shard " not in ln:
            continue
        at = datetime.datetime.strptime(ln[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if at >= after:
            out[int(ln.split(" took shard ", 1)[1].split()[0])] = at
    return out


def test_a_group_shares_the_shards_and_takes_over_a_killed_member(make_config: ConfigFactory, tmp_path: Path) -> None:
    """Issue 20 through the CLI (default lease settings: lease_ms 10 s, renew_ms 2 s, group_poll_ms 1 s): a first
    member takes every shard; a second joins and gets its part by handover; kill -9 of the second (supervisor and
    worker) — its shards are taken over within lease_ms + 2 s + group_poll_ms; a second batch is consumed; SIGTERM
    ends the survivor cleanly. Every event written is consumed.

    The takeover time is the survivor's own: the wall time of its last "took shard" line after the kill. The time
    until ``status`` shows it adds the test's polling (two CLI runs per look, seconds each on a loaded machine: a CI
    run measured 17.8 s that way)."""
    cfg = make_config(shards=8, **FAST)
    args = cli_args(cfg)
    assert storyline("init", *args).returncode == 0
    want = ingest(cfg, tmp_path, 300)
    a_log = tmp_path / "a.log"
    with a_log.open("w") as a_err:  # a file, not a pipe: the survivor's log is read while it runs
        a = subprocess.Popen(cli.argv("run", *args, "--group", "--workers", "1", "--log-level", "INFO", "--record",
                                      str(tmp_path / "a")),
                             stdout=subprocess.PIPE, stderr=a_err, text=True)  # fmt: skip
    b: subprocess.Popen[str] | None = None
    try:
        wait_for("the first member holds every shard", lambda: len(set(group_status(args)[1].values())) == 1
                 and len(group_status(args)[1]) == 8, 60)  # fmt: skip
        (first,) = group_status(args)[0]
        b = spawn("run", *args, "--group", "--workers", "1", "--record", str(tmp_path / "b"))

        def split() -> bool:
            members, owners = group_status(args)
            return len(members) == 2 and len(owners) == 8 and len(set(owners.values())) == 2

        joined = wait_for("the second member gets its part", split, 60)
        members, owners = group_status(args)
        second = next(m for m in members if m != first)
        moved = sorted(s for s, m in owners.items() if m == second)
        assert moved == group_assignment(8, {first: 1, second: 1})[(second, 0)]
        killed_at = time.time()
        kill_instance(b)

        def all_first() -> bool:
            owners = group_status(args)[1]
            return set(owners.values()) == {first} and len(owners) == 8

        seen = wait_for("status shows the survivor holding every shard", all_first, cfg.lease_ms / 1000 + 30)
        taken = took_shards(a_log, after=killed_at)
        assert set(moved) <= set(taken), (moved, taken, a_log.read_text()[-3000:])
        took = max(taken[sh] for sh in moved) - killed_at
        assert took <= cfg.lease_ms / 1000 + 2 + cfg.group_poll_ms / 1000, (took, a_log.read_text()[-3000:])
        more = ingest(cfg, tmp_path, 100, seed=2)
        wait_for("the second batch is consumed", lambda: (want | more) <= set(recorded(tmp_path / "a"))
                 | set(recorded(tmp_path / "b")), 60)  # fmt: skip
        a.send_signal(signal.SIGTERM)
        a.communicate(timeout=60)
        assert a.returncode == 0, a_log.read_text()[-3000:]
        members, owners = group_status(args)
        assert members == [] and owners == {}, "a clean stop leaves the group and releases every lease"
        print(f"group: joined in {joined:.1f} s, moved {len(moved)} shards, takeover after kill -9 in {took:.1f} s"
              f" (status showed it after {seen:.1f} s)")  # fmt: skip
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                kill_instance(p)


def scrape(port: int) -> dict[str, float] | None:
    """Every sample of a counter (``# TYPE … counter``) on the endpoint: ``name{labels}`` → value; None when the
    endpoint does not answer (yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            body = resp.read().decode()
    except OSError:
        return None
    counters = {ln.split()[2] for ln in body.splitlines() if ln.startswith("# TYPE ") and ln.split()[3] == "counter"}
    out: dict[str, float] = {}
    for ln in body.splitlines():
        if ln and not ln.startswith("#"):
            series, value = ln.rsplit(" ", 1)
            if series.split("{")[0] in counters:
                out[series] = float(value)
    return out


def test_counters_never_decrease_across_a_worker_kill(make_config: ConfigFactory, tmp_path: Path) -> None:
    """kill -9 of a worker mid-run: the supervisor restarts it, and no counter on the Prometheus endpoint ever goes
    down (the dead process's counts are kept; the new process's are added to them). Events written after the
    restart are consumed and counted on top of what was counted before the kill."""
    cfg = make_config(shards=4, **FAST)
    args = cli_args(cfg)
    assert storyline("init", *args).returncode == 0
    before = ingest(cfg, tmp_path, 400, seed=1)
    time.sleep(FAST["lag_ms"] / 1000 + 0.3)
    port = free_port()
    rec = tmp_path / "rec"
    sup = spawn("run", *args, "--workers", "2", "--record", f"{rec},20", "--set", f"metrics_port={port}")
    scrapes: list[tuple[float, dict[str, float]]] = []

    def sample() -> float:
        got = scrape(port)
        if got:
            scrapes.append((time.time(), got))
        return got.get("storyline_events_total", 0.0) if got else 0.0

    def wait(ok: Callable[[], bool], what: str) -> str:
        deadline = time.time() + 60
        while not ok():
            if time.time() > deadline:
                return f"timed out waiting for {what}"
            sample()
            time.sleep(0.1)
        return ""

    try:
        assert not wait(lambda: sample() >= len(before), "the first events to be counted")
        victim = worker_pids(sup)[0]
        at_kill = sample()
        os.kill(victim, signal.SIGKILL)
        assert not wait(lambda: victim not in worker_pids(sup) and len(worker_pids(sup)) == 2, "the restart")
        after = ingest(cfg, tmp_path, 400, seed=2)  # consumed by both workers, the restarted one included
        assert not wait(lambda: set(recorded(rec)) >= before | after, "the new events to be consumed")
        counted = wait(lambda: sample() >= at_kill + len(after), "the new events to be counted")
        for _ in range(10):  # a second more of scrapes
            sample()
            time.sleep(0.1)
    finally:
        sup.send_signal(signal.SIGTERM)
        _out, err = sup.communicate(timeout=60)
    assert sup.returncode == 0, err
    drops = [
        f"{series}: {prev[series]:g} -> {cur[series]:g} at {t:.1f}"
        for (_, prev), (t, cur) in itertools.pairwise(scrapes)
        for series in cur
        if series in prev and cur[series] < prev[series]
    ]
    assert not drops, f"{len(drops)} counter decreases over {len(scrapes)} scrapes: {drops[:10]}"
    assert not counted, f"{counted}: {scrapes[-1][1]['storyline_events_total']:g} < {at_kill:g} + {len(after)}"
    assert sum(v for k, v in scrapes[-1][1].items() if k.startswith("storyline_worker_restarts_total")) >= 1
