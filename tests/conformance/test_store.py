"""One conformance suite, run on every store backend: the embedded store and the CQL node.

Each test gets a fresh tenant (a fresh keyspace on CQL, dropped afterwards).
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from engine.core.clock import ManualClock
from engine.core.config import Config
from engine.core.errors import FencedError, SchemaError, StoreError, WriteTooLateError
from engine.store import (
    SCHEMA_VERSION,
    Commit,
    DeadLetter,
    EventRecord,
    Member,
    Offset,
    PartitionPage,
    Store,
    StoryRecord,
    make_store,
    story_id,
)
from engine.store.layout import INDEX_SLOT_MS
from tests.conftest import ConfigFactory, arun, require_cql

pytestmark = pytest.mark.conformance


@pytest.fixture(params=["embedded", "memory", pytest.param("cql", marks=pytest.mark.cql)])
def backend(request: pytest.FixtureRequest) -> str:
    """This suite also runs on the in-memory store of engine.testing (the embedded store on a named in-memory
    database): test support must behave as the stores do."""
    if request.param == "cql":
        require_cql()
    return str(request.param)


T = TypeVar("T")
NOW = 1_790_000_000_000  # a fixed instant, 2026-09-21


async def collect(it: AsyncIterator[T]) -> list[T]:
    return [x async for x in it]


async def opened(cfg: Config, clock: ManualClock | None = None, *, init: bool = True) -> Store:
    store = make_store(cfg, clock) if clock is not None else make_store(cfg)
    await store.open()
    if init:
        await store.init_schema()
    return store


async def read_all(store: Store, shard: int, bucket: int) -> tuple[list[EventRecord], list[PartitionPage]]:
    pages = await collect(store.read_partition(shard, bucket))
    return [e for p in pages for e in p.events], pages


def events(n: int, prefix: str = "ev", size: int = 40, seed: int = 1) -> list[EventRecord]:
    rnd = random.Random(seed)
    return [EventRecord(f"{prefix}-{i:07d}", rnd.randbytes(size)) for i in range(n)]


# -- schema ------------------------------------------------------------------------------------------------------
def test_init_is_idempotent_and_records_meta(make_config: ConfigFactory) -> None:
    cfg = make_config()

    async def body() -> None:
        store = await opened(cfg, init=False)
        try:
            first = await store.init_schema()
            second = await store.init_schema()
            meta = await store.read_meta()
        finally:
            await store.close()
        assert any(line.startswith("created table") for line in first)
        assert not any(line.startswith("created") for line in second)
        assert meta["schema_version"] == str(SCHEMA_VERSION)
        assert meta["shards"] == str(cfg.shards)
        assert meta["bucket_ms"] == str(cfg.bucket_ms)
        assert int(meta["created_ms"]) > 1_700_000_000_000

    arun(body())


def test_fixed_settings_cannot_change(make_config: ConfigFactory) -> None:
    cfg = make_config()
    other = make_config(tenant=cfg.tenant, shards=cfg.shards * 2)

    async def body() -> None:
        store = await opened(cfg)
        await store.close()
        with pytest.raises(SchemaError, match="shards"):
            await opened(other, init=False)

    arun(body())


# -- events ------------------------------------------------------------------------------------------------------
def test_partition_order_and_completeness(make_config: ConfigFactory) -> None:
    cfg = make_config()
    # ids out of order, including non-ASCII: the order is the UTF-8 byte order on both stores
    ids = ["b", "a", "Z", "é", "ä", "a0", "aa", "z", "\u4e2d", "0", "~"]
    evs = [EventRecord(i, i.encode() * 3) for i in ids]

    async def body() -> None:
        store = await opened(cfg)
        try:
            res = await store.append(3, 1000, evs)
            got, _ = await read_all(store, 3, 1000)
            empty, pages = await read_all(store, 3, 1001)
            other_shard, _ = await read_all(store, 4, 1000)
        finally:
            await store.close()
        assert res.events == len(evs)
        assert [e.event_id for e in got] == sorted(ids, key=lambda s: s.encode())
        assert {e.event_id: e.payload for e in got} == {e.event_id: e.payload for e in evs}
        assert empty == [] and other_shard == []
        assert sum(p.rows for p in pages) == 0

    arun(body())


def test_large_partition_pages_in_order(make_config: ConfigFactory) -> None:
    cfg = make_config(store={"page_rows": 997})
    evs = events(20_500, size=30)

    async def body() -> None:
        store = await opened(cfg)
        try:
            for i in range(0, len(evs), 2_500):
                await store.append(1, 77, evs[i : i + 2_500])
            got, pages = await read_all(store, 1, 77)
        finally:
            await store.close()
        assert len(got) == len(evs)
        assert [e.event_id for e in got] == [e.event_id for e in evs]
        assert [e.payload for e in got] == [e.payload for e in evs]
        assert len(pages) >= len(evs) // 997
        assert all(p.rows <= 997 for p in pages)
        assert pages[-1].incomplete == 0

    arun(body())


def test_two_mib_events_are_chunked_and_pages_stay_bounded(make_config: ConfigFactory) -> None:
    mib = 1024 * 1024
    cfg = make_config(store={"page_bytes": mib, "page_bytes_max": 4 * mib})
    rnd = random.Random(7)
    # small rows sort first, so the page-size estimate has learnt "small" when the 2 MiB events arrive
    small = [EventRecord(f"a-small-{i:04d}", rnd.randbytes(100)) for i in range(3000)]
    big = [EventRecord(f"big-{i}", rnd.randbytes(2 * mib + 17 * i)) for i in range(5)]
    exact = [EventRecord("exact", rnd.randbytes(cfg.chunk_bytes))]  # exactly one chunk: one row
    every = small + big + exact

    async def body() -> None:
        store = await opened(cfg)
        try:
            res = await store.append(0, 5, every)
            hint = (await store.nonempty_buckets(0, 5, 5))[0]
            got, pages = await read_all(store, 0, 5)
            await store.append(0, 6, small)
            only_small = await collect(store.read_partition(0, 6))
        finally:
            await store.close()
        assert res.rows == sum(-(-len(e.payload) // cfg.chunk_bytes) for e in big) + len(small) + 1
        assert {e.event_id: e.payload for e in got} == {e.event_id: e.payload for e in every}
        assert [e.event_id for e in got] == sorted(e.event_id for e in every)
        assert hint.max_row_bytes >= cfg.chunk_bytes
        # hard bound in bytes whatever the mix of row sizes; rows bounded too
        assert max(p.bytes for p in pages) <= 4 * mib
        assert all(p.rows <= cfg.store.page_rows for p in pages)
        assert pages[-1].incomplete == 0
        # a partition of small rows is read in few pages (the bound does not cost throughput there)
        assert len(only_small) <= 3

    arun(body())


def test_rewrites_are_idempotent(make_config: ConfigFactory) -> None:
    cfg = make_config()
    evs = [*events(50), EventRecord("chunky", random.Random(3).randbytes(cfg.chunk_bytes * 2 + 5))]

    async def body() -> None:
        store = await opened(cfg)
        try:
            await store.append(2, 10, evs)
            await store.append(2, 10, evs)  # a retried producer batch
            await store.append(2, 10, evs[:10])
            got, _ = await read_all(store, 2, 10)
        finally:
            await store.close()
        assert [e.event_id for e in got] == sorted(e.event_id for e in evs)
        assert {e.event_id: e.payload for e in got} == {e.event_id: e.payload for e in evs}

    arun(body())


def test_incomplete_chunk_sets_are_skipped_and_counted(make_config: ConfigFactory) -> None:
    cfg = make_config()
    ok = events(5)

    async def body() -> None:
        store = await opened(cfg)
        try:
            await store.append(6, 9, ok)
            await store.inject_rows(
                6,
                9,
                [
                    ("ev-0000001x", 0, 3, b"a"),  # chunk 2 of 3 never written
                    ("ev-0000001x", 1, None, b"b"),
                    ("ev-0000002x", 1, None, b"b"),  # chunk 0 (with the count) never written
                    ("ev-0000003x", 0, 2, b"a"),  # the last row of the partition, incomplete
                ],
            )
            got, pages = await read_all(store, 6, 9)
        finally:
            await store.close()
        assert [e.event_id for e in got] == [e.event_id for e in ok]
        assert pages[-1].incomplete == 3

    arun(body())


def test_bucket_index_lists_nonempty_buckets(make_config: ConfigFactory) -> None:
    cfg = make_config(shards=40)
    per_slot = 900_000 // cfg.bucket_ms
    base = 2_000_000 * per_slot  # a slot boundary
    written = [base - 2, base - 1, base + 3, base + per_slot + 1, base + 5 * per_slot]

    async def body() -> None:
        store = await opened(cfg)
        try:
            for b in written:
                await store.append(5, b, events(2, prefix=f"b{b}"))
            await store.append(4, base, events(1))  # same index group, another shard
            await store.append(21, base + 3, events(1))  # another index group
            await store.append(37, base + 3, events(1))  # not asked for
            got = await store.nonempty_buckets(5, base - 10, base + 6 * per_slot)
            part = await store.nonempty_buckets(5, base - 1, base + 3)
            none = await store.nonempty_buckets(5, base + 4, base + per_slot)
            backwards = await store.nonempty_buckets(5, base, base - 1)
            many = await store.scan_index([4, 5, 6, 21], base - 1, base + 3)
        finally:
            await store.close()
        assert [h.bucket for h in got] == written
        assert [h.bucket for h in part] == [base - 1, base + 3]
        assert none == [] and backwards == []
        assert all(h.max_row_bytes >= 40 for h in got)
        assert {s: [h.bucket for h in hs] for s, hs in many.items()} == {
            4: [base],
            5: [base - 1, base + 3],
            21: [base + 3],
        }

    arun(body())


def test_write_deadline_refuses_late_attempts(make_config: ConfigFactory) -> None:
    cfg = make_config()
    clock = ManualClock(NOW)

    async def body() -> None:
        store = await opened(cfg, clock)
        try:
            with pytest.raises(WriteTooLateError) as info:
                await store.append(1, 5, events(3), deadline_ms=NOW - 1)
            assert info.value.retriable
            await store.append(1, 6, events(3), deadline_ms=NOW + 1)
            late, _ = await read_all(store, 1, 5)
            ok, _ = await read_all(store, 1, 6)
            index = await store.nonempty_buckets(1, 0, 10)
        finally:
            await store.close()
        assert late == [] and len(ok) == 3
        assert [h.bucket for h in index] == [6]  # nothing, not even the index row, was written for the late attempt

    arun(body())


def test_oversized_event_is_refused(make_config: ConfigFactory) -> None:
    cfg = make_config(max_event_bytes=64 * 1024, chunk_bytes=16 * 1024)

    async def body() -> None:
        store = await opened(cfg)
        try:
            with pytest.raises(StoreError, match="max_event_bytes"):
                await store.append(0, 1, [EventRecord("huge", b"x" * (64 * 1024 + 1))])
        finally:
            await store.close()

    arun(body())


# -- offsets -----------------------------------------------------------------------------------------------------
def test_offset_fencing(make_config: ConfigFactory) -> None:
    cfg = make_config()

    async def body() -> None:
        store = await opened(cfg)
        try:
            a = await store.claim("main", 3, "worker-a", 99)
            assert (a.read_bucket, a.replay_bucket, a.owner, a.epoch) == (99, 100, "worker-a", 1)
            await store.commit("main", 3, "worker-a", a.epoch, 120, 110)
            await store.commit("main", 3, "worker-a", a.epoch, 120, 110)  # a retried commit is harmless
            b = await store.claim("main", 3, "worker-b", 0)
            assert (b.read_bucket, b.replay_bucket, b.owner, b.epoch) == (120, 110, "worker-b", 2)
            with pytest.raises(FencedError, match="stale"):
                await store.commit("main", 3, "worker-a", a.epoch, 130, 130)  # the zombie
            await store.commit("main", 3, "worker-b", b.epoch, 125, 111)
            with pytest.raises(FencedError, match="backwards"):
                await store.commit("main", 3, "worker-b", b.epoch, 124, 111)
            with pytest.raises(FencedError):
                await store.commit("main", 4, "worker-b", 1, 1, 1)  # never claimed
            offs = await store.read_offsets("main", range(8))
            other = await store.read_offsets("other-consumer", range(8))
        finally:
            await store.close()
        assert [(o.shard, o.read_bucket, o.replay_bucket, o.owner, o.epoch) for o in offs] == [
            (3, 125, 111, "worker-b", 2)
        ]
        assert other == []

    arun(body())


def test_commit_many_applies_what_it_may_and_names_the_refused(make_config: ConfigFactory) -> None:
    cfg = make_config(shards=40)

    async def body() -> None:
        store = await opened(cfg)
        try:
            mine = {s: await store.claim("main", s, "me", 10) for s in (1, 2, 3, 17, 33)}
            await store.claim("main", 2, "thief", 0)  # shard 2 now belongs to someone else
            await store.commit("main", 3, "me", mine[3].epoch, 50, 50)
            refused = await store.commit_many(
                "main",
                "me",
                [
                    Commit(1, mine[1].epoch, 20, 15),
                    Commit(2, mine[2].epoch, 20, 15),  # stale epoch
                    Commit(3, mine[3].epoch, 40, 40),  # backwards
                    Commit(17, mine[17].epoch, 21, 21),  # another offsets partition
                    Commit(33, mine[33].epoch, 22, 11),
                ],
            )
            offs = {
                o.shard: (o.read_bucket, o.replay_bucket, o.owner) for o in await store.read_offsets("main", range(40))
            }
        finally:
            await store.close()
        assert refused == [2, 3]
        assert offs == {
            1: (20, 15, "me"),
            2: (10, 11, "thief"),
            3: (50, 50, "me"),
            17: (21, 21, "me"),
            33: (22, 11, "me"),
        }

    arun(body())


def test_claim_many_takes_over_and_creates(make_config: ConfigFactory) -> None:
    cfg = make_config(shards=40)

    async def body() -> None:
        import asyncio

        store = await opened(cfg)
        try:
            old = await store.claim("main", 3, "old", 7)
            await store.commit("main", 3, "old", old.epoch, 30, 25)
            got = await store.claim_many("main", [1, 3, 17, 35], "new", 9)
            assert [(o.shard, o.read_bucket, o.replay_bucket, o.owner, o.epoch) for o in got] == [
                (1, 9, 10, "new", 1),
                (3, 30, 25, "new", 2),
                (17, 9, 10, "new", 1),
                (35, 9, 10, "new", 1),
            ]
            with pytest.raises(FencedError):
                await store.commit("main", 3, "old", old.epoch, 31, 31)
            # two claimers racing for the same shards: every claim gets its own epoch, the last one holds
            races = await asyncio.gather(
                store.claim_many("main", [1, 3], "a", 0), store.claim_many("main", [1, 3], "b", 0)
            )
            final = {o.shard: o for o in await store.read_offsets("main", [1, 3])}
            for shard in (1, 3):
                epochs = sorted(next(o.epoch for o in r if o.shard == shard) for r in races)
                assert epochs[0] != epochs[1]
                assert final[shard].epoch == epochs[1]
        finally:
            await store.close()

    arun(body())


def test_leases_are_taken_over_only_once_ended_and_renewals_are_fenced(make_config: ConfigFactory) -> None:
    """Issue 20: a group member takes a shard only when its lease has ended (run out, released, or never
    leased), atomically with that check; the old owner's renewals and commits are refused from then on; a static
    claim takes a shard whatever its lease."""
    cfg = make_config(shards=40)

    async def body() -> None:
        store = await opened(cfg)
        try:
            mine = await store.claim_many("main", [1, 3, 17], "a", 5, lease_until_ms=NOW + 10_000)
            assert [(o.shard, o.epoch, o.lease_expires_ms) for o in mine] == [(s, 1, NOW + 10_000) for s in (1, 3, 17)]
            # at NOW + 5 s every lease of a is live: b gets only the shard nobody held
            got = await store.claim_many("main", [1, 3, 17, 20], "b", 5, lease_until_ms=NOW + 15_000,
                                         free_at_ms=NOW + 5_000)  # fmt: skip
            assert [(o.shard, o.owner, o.epoch) for o in got] == [(20, "b", 1)]
            assert await store.renew_leases("main", "a", [(1, 1), (3, 1)], NOW + 20_000) == []
            # at NOW + 15 s: 17's lease (not renewed) has ended, 1 and 3 run to NOW + 20 s
            got = await store.claim_many("main", [1, 3, 17], "b", 5, lease_until_ms=NOW + 25_000,
                                         free_at_ms=NOW + 15_000)  # fmt: skip
            assert [(o.shard, o.owner, o.epoch, o.lease_expires_ms) for o in got] == [(17, "b", 2, NOW + 25_000)]
            assert await store.renew_leases("main", "a", [(1, 1), (17, 1)], NOW + 30_000) == [17]
            with pytest.raises(FencedError):
                await store.commit("main", 17, "a", 1, 9, 9)
            # a graceful leave: a releases 1 (and 17, which is no longer its own: b's lease stays)
            await store.release_leases("main", "a", [(1, 1), (17, 1)])
            # a renewal that lands after the release (sent before it) does not hold the shard back
            assert await store.renew_leases("main", "a", [(1, 1)], NOW + 50_000) == [1]
            offs = {o.shard: o for o in await store.read_offsets("main", [1, 3, 17])}
            assert offs[1].lease_expires_ms == 0 and offs[1].owner == "a"
            assert (offs[17].owner, offs[17].lease_expires_ms) == ("b", NOW + 25_000)
            got = await store.claim_many("main", [1], "b", 5, lease_until_ms=NOW + 12_000, free_at_ms=NOW + 1)
            assert [(o.shard, o.epoch) for o in got] == [(1, 2)]
            # a static claim takes 3 under a's live lease, and keeps the lease value when it sets none
            static = await store.claim("main", 3, "static", 5)
            assert (static.epoch, static.lease_expires_ms) == (2, NOW + 20_000)
            assert await store.renew_leases("main", "a", [(3, 1)], NOW + 40_000) == [3]
        finally:
            await store.close()

    arun(body())


def test_a_renewal_racing_a_takeover_lets_exactly_one_win(make_config: ConfigFactory) -> None:
    cfg = make_config(shards=40)

    async def body() -> None:
        import asyncio

        a, b = await opened(cfg), await opened(cfg)
        try:
            for round_ in range(6):
                shard = 2 + round_
                off = (await a.claim_many("main", [shard], "a", 0, lease_until_ms=NOW + 1_000))[0]
                refused, taken = await asyncio.gather(
                    a.renew_leases("main", "a", [(shard, off.epoch)], NOW + 30_000),
                    b.claim_many("main", [shard], "b", 0, lease_until_ms=NOW + 30_000, free_at_ms=NOW + 2_000),
                )
                final = (await a.read_offsets("main", [shard]))[0]
                if taken:  # the takeover won: the renewal was refused, b holds the next epoch
                    assert refused == [shard] and (final.owner, final.epoch) == ("b", off.epoch + 1)
                else:  # the renewal won: nothing was taken over
                    assert refused == [] and (final.owner, final.epoch) == ("a", off.epoch)
                assert final.lease_expires_ms == NOW + 30_000
        finally:
            await a.close()
            await b.close()

    arun(body())


def test_group_members_heartbeat_leave_and_expire(make_config: ConfigFactory, backend: str) -> None:
    cfg = make_config()
    clock = ManualClock(NOW)

    async def body() -> None:
        import asyncio

        store = await opened(cfg, clock)
        try:
            one = Member("h1:100:aa", "h1", 100, 2, NOW, NOW)
            two = Member("h2:200:bb", "h2", 200, 1, NOW, NOW)
            await store.heartbeat("main", one, 60_000)
            await store.heartbeat("main", two, 60_000)
            await store.heartbeat("other", two, 60_000)  # another consumer's group
            assert await store.read_members("main") == [one, two]
            later = Member("h1:100:aa", "h1", 100, 2, NOW, NOW + 2_000)
            await store.heartbeat("main", later, 60_000)
            await store.leave("main", two.member)
            assert await store.read_members("main") == [later]
            assert await store.read_members("other") == [two]
            await store.heartbeat("main", two, 1_000)  # stops sending heartbeats: gone after 1 s
            if backend == "cql":
                await asyncio.sleep(2.5)  # CQL TTLs run on the database's clock, in seconds
            else:
                clock.advance(1_001)
            assert await store.read_members("main") == [later]
        finally:
            await store.close()

    arun(body())


def test_concurrent_claims_get_distinct_epochs(make_config: ConfigFactory) -> None:
    cfg = make_config()

    async def body() -> None:
        import asyncio

        stores = [await opened(cfg) for _ in range(3)]
        try:
            results: list[Offset] = list(
                await asyncio.gather(*(s.claim("main", 0, f"owner-{i}", 0) for i, s in enumerate(stores)))
            )
            final = (await stores[0].read_offsets("main", [0]))[0]
        finally:
            for s in stores:
                await s.close()
        epochs = sorted(r.epoch for r in results)
        assert epochs == [1, 2, 3]
        assert final.epoch == 3
        assert final.owner == next(r.owner for r in results if r.epoch == 3)

    arun(body())


# -- stories and dead letters -----------------------------------------------------------------------------------
def test_story_upserts_reads_and_scan(make_config: ConfigFactory) -> None:
    cfg = make_config(store={"page_rows": 50})
    stories = [
        StoryRecord(s, p, f"story-{i:04d}", rev, rev == 2, None, NOW + i, f"body {i} {rev}".encode())
        for s, p in ((1, 100), (1, 101), (2, 100))
        for i in range(60)
        for rev in (1, 2)
    ]
    merged = StoryRecord(1, 100, "story-0000", 3, True, "story-9999", NOW, b"stub")

    async def body() -> None:
        store = await opened(cfg)
        try:
            await store.put_stories(stories)
            await store.put_stories(stories[:30])  # idempotent
            await store.put_stories([merged])
            part = [s for page in await collect(store.read_stories(1, 100)) for s in page]
            everything = [s for page in await collect(store.scan_stories()) for s in page]
            nothing = await collect(store.read_stories(3, 100))
        finally:
            await store.close()
        assert len(part) == 121
        assert [(s.story_id, s.revision) for s in part] == sorted((s.story_id, s.revision) for s in part)
        assert part[2] == merged
        assert part[0] == stories[0]
        assert sorted(everything, key=lambda s: (s.shard, s.period, s.story_id, s.revision)) == sorted(
            [*stories, merged], key=lambda s: (s.shard, s.period, s.story_id, s.revision)
        )
        assert nothing == []

    arun(body())


def test_story_bodies_come_back_byte_for_byte(make_config: ConfigFactory) -> None:
    """Bodies of any bytes: JSON with non-ASCII text and escapes (sent to the CQL driver as str, see
    ``engine.store.cql._blob``), invalid UTF-8, NUL bytes, empty."""
    cfg = make_config()
    bodies = [
        '{"user":"zoë","city":"東京","esc":"\\u0000\\n","emoji":"🛡"}'.encode(),
        b"\xff\xfe\x00binary\x80",
        b"\x00\x00",
        b"",
        ("x" * 70_000).encode(),
    ]
    p = NOW // cfg.bucket_ms
    stories = [StoryRecord(1, p, story_id(1, i), 1, True, None, NOW, b) for i, b in enumerate(bodies)]

    async def body() -> None:
        store = await opened(cfg)
        try:
            await store.put_stories(stories)
            back = [s for page in await collect(store.read_stories(1, p)) for s in page]
            assert [s.body for s in back] == bodies
            assert all(isinstance(s.body, bytes) for s in back)
        finally:
            await store.close()

    arun(body())


def test_story_lookup_by_id_gives_the_latest_revision(make_config: ConfigFactory) -> None:
    cfg = make_config()
    clock = ManualClock(NOW)
    p, slot = NOW // cfg.bucket_ms, INDEX_SLOT_MS // cfg.bucket_ms  # this bucket; buckets per index slot
    assert cfg.ttl_ms > 41 * INDEX_SLOT_MS
    aa, bb, cc = story_id(3, 0xAA), story_id(5, 0xBB), story_id(3, 0xCC)

    def rec(shard: int, period: int, sid: str, revision: int, body: bytes, into: str | None = None) -> StoryRecord:
        return StoryRecord(shard, period, sid, revision, into is not None, into, period * cfg.bucket_ms, body)

    revisions = [
        rec(3, p - 3 * slot, aa, 1, b'{"r":1}'),  # three index slots back
        rec(3, p - 2, aa, 3, b'{"r":3}'),  # a later emit bucket
        rec(3, p - 5, aa, 2, b'{"r":2}'),  # written out of order
        rec(5, p - 40 * slot, bb, 1, b'{"b":1}'),  # 40 slots back: not in the first slots a lookup reads
    ]
    stub = rec(5, p - 1, bb, 2, b'{"merged_into":"s0003"}', into=aa)
    # A story built again after it had left the state: revision 1 of the later incarnation is the latest.
    incarnations = [
        *(rec(3, p - 20 * slot + r, cc, r, b"old") for r in (1, 2, 3)),
        rec(3, p - 10 * slot, cc, 1, b"new"),
    ]

    async def body() -> None:
        store = await opened(cfg, clock)
        try:
            await store.put_stories(revisions)
            assert await store.get_story(aa) == revisions[1]
            assert await store.get_story(bb) == revisions[3]
            await store.put_stories([stub, revisions[1]])  # idempotent
            assert await store.get_story(bb) == stub
            assert await store.get_story(aa) == revisions[1]
            await store.put_stories(incarnations)
            assert await store.get_story(cc) == incarnations[3]
            # Not a story, or an id that does not name the shard the story is stored under: unknown.
            for unknown in (story_id(3, 0xAB), story_id(4, 0xAA), "story-0000", "s", ""):
                assert await store.get_story(unknown) is None, unknown
            # A lookup considers the periods of the last ttl_ms: at p - 1 only the stub is left.
            clock.advance(cfg.ttl_ms - cfg.bucket_ms)
            assert await store.get_story(aa) is None
            assert await store.get_story(bb) == stub
        finally:
            await store.close()

    arun(body())


async def downgrade(
    store: Store, cfg: Config, version: int, *, drop_table: str = "", drop_column: tuple[str, str] = ("", "")
) -> None:
    """Make a tenant look as schema ``version`` left it (for the upgrade tests): drop the table or the column that
    a later version added, and set ``meta.schema_version``; on either store."""
    from engine.store.cql import CqlStore
    from engine.store.embedded import EmbeddedStore

    table, column = drop_column
    if isinstance(store, CqlStore):
        if drop_table:
            await store._ddl(f"DROP TABLE {cfg.keyspace}.{drop_table}")
        if column:
            await store._ddl(f"ALTER TABLE {cfg.keyspace}.{table} DROP {column}")
        meta = f"INSERT INTO {cfg.keyspace}.meta (key, value) VALUES ('schema_version', '{version}')"
        await store._exec("downgrade", f"v{version}", meta, [])
        return
    assert isinstance(store, EmbeddedStore)
    embedded = store

    def run(c: Any) -> None:
        if drop_table:
            c.execute(f"DROP TABLE {embedded.t(drop_table)}")
        if column:
            c.execute(f"ALTER TABLE {embedded.t(table)} DROP COLUMN {column}")
        c.execute(f"UPDATE {embedded.t('meta')} SET value = '{version}' WHERE key = 'schema_version'")

    await embedded._run("downgrade", run, write=True)


def test_an_upgrade_keeps_stories_found_by_id_through_the_schema_2_table(
    make_config: ConfigFactory, backend: str
) -> None:
    """Schema 2 kept story pointers in ``story_ids`` (a partition per story); ``storyline init`` adds
    ``story_index`` and leaves the old table, which lookups still read until its rows expire."""
    if backend != "cql":
        pytest.skip("the embedded store's lookup is an index on the stories table, unchanged")
    cfg = make_config()
    clock = ManualClock(NOW)
    p = NOW // cfg.bucket_ms
    old = StoryRecord(2, p - 100, story_id(2, 7), 4, True, None, NOW - 100_000, b'{"v":2}')
    new = StoryRecord(2, p - 3, story_id(2, 8), 1, True, None, NOW - 3_000, b'{"v":3}')

    async def body() -> None:
        from engine.store.cql import CqlStore

        store = await opened(cfg, clock)
        try:
            assert isinstance(store, CqlStore)
            ks = cfg.keyspace
            await store._ddl(f"DROP TABLE {ks}.story_index")
            await store._ddl(f"DROP TABLE {ks}.story_periods")
            await store._ddl(f"DROP TABLE {ks}.feed_readers")
            await store._ddl(
                f"CREATE TABLE {ks}.story_ids (story_id text, revision int, shard int, period bigint, "
                f"PRIMARY KEY ((story_id), revision)) WITH CLUSTERING ORDER BY (revision DESC)"
            )
            await store._exec("t", "v2", f"INSERT INTO {ks}.meta (key, value) VALUES ('schema_version', '2')", [])
            await store._exec(
                "t",
                "old_row",
                f"INSERT INTO {ks}.stories (shard, period, story_id, revision, final, emitted_ms, body) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?)",
                [old.shard, old.period, old.story_id, old.revision, True, old.emitted_ms, old.body],
            )
            await store._exec(
                "t",
                "old_ptr",
                f"INSERT INTO {ks}.story_ids (story_id, revision, shard, period) VALUES (?, ?, ?, ?)",
                [old.story_id, old.revision, old.shard, old.period],
            )
            did = await store.init_schema()
            assert f"created table {ks}.story_index" in did and f"schema version 2 -> {SCHEMA_VERSION}" in did, did
            assert f"created table {ks}.story_periods" in did and f"created table {ks}.feed_readers" in did, did
            assert f"recorded 1 existing stories partitions in {ks}.story_periods" in did, did
            await store.put_stories([new])
            assert [(x.period, x.shard) for x in await store.story_periods(p - 200, p)] == [(p - 100, 2), (p - 3, 2)]
        finally:
            await store.close()
        store = await opened(cfg, clock, init=False)  # a fresh process: nothing cached
        try:
            assert await store.get_story(old.story_id) == old
            assert await store.get_story(new.story_id) == new
            assert await store.get_story(story_id(2, 9)) is None
        finally:
            await store.close()

    arun(body())


def test_an_upgrade_to_schema_4_records_the_stories_partitions_written_before(make_config: ConfigFactory) -> None:
    """Schema 4 adds story_periods (the story feed finds stories partitions through it) and feed_readers;
    ``storyline init`` on an older tenant fills story_periods from the stories already stored."""
    cfg = make_config()
    clock = ManualClock(NOW)
    p = NOW // cfg.bucket_ms
    rows = [StoryRecord(s, p - d, story_id(s, d), 1, True, None, NOW, b"{}") for s in (0, 3) for d in (5, 9)]

    async def body() -> None:
        store = await opened(cfg, clock)
        try:
            await store.put_stories(rows)
            await downgrade(store, cfg, 3, drop_table="story_periods")
            did = await store.init_schema()
            assert f"schema version 3 -> {SCHEMA_VERSION}" in did
            assert any("recorded 4 existing stories partitions" in d for d in did), did
            got = await store.story_periods(p - 200, p)
            assert [(x.period, x.shard, x.sealed) for x in got] == [
                (p - 9, 0, False),
                (p - 9, 3, False),
                (p - 5, 0, False),
                (p - 5, 3, False),
            ]
            again = await store.init_schema()  # current: nothing recorded again
            assert not any("recorded" in d and "partitions" in d for d in again), again
        finally:
            await store.close()

    arun(body())


def test_offset_evidence_and_tables(make_config: ConfigFactory) -> None:
    """Learned offsets' rows: evidence per (consumer, epoch, shard), a later write replacing it; a table per epoch
    written once (the first body stays, and every writer gets it back); the latest table before an epoch, looked for
    in its slot and the one before."""
    from engine.core.records import EvidenceRecord
    from engine.store.layout import OFFSET_TABLE_SLOT

    cfg = make_config()
    base = 1_790_000_000 // 60 // OFFSET_TABLE_SLOT * OFFSET_TABLE_SLOT  # 1-minute epochs, at a slot's start

    async def body() -> None:
        store = await opened(cfg)
        try:
            rows = [EvidenceRecord(base + e, s, f"{e}/{s}".encode() * 50) for e in range(3) for s in range(4)]
            await store.put_offset_evidence("workers", rows)
            await store.put_offset_evidence("other", [EvidenceRecord(base, 0, b"other consumer")])
            await store.put_offset_evidence("workers", [EvidenceRecord(base + 1, 2, b"replaced")])
            got = sorted(await store.read_offset_evidence("workers", [base + 1, base + 2, base + 9]))
            want = sorted([r for r in rows if r.epoch in (base + 1, base + 2) and (r.epoch, r.shard) != (base + 1, 2)])
            assert got == sorted([*want, EvidenceRecord(base + 1, 2, b"replaced")])
            assert await store.read_offset_evidence("other", [base]) == [EvidenceRecord(base, 0, b"other consumer")]
            assert await store.read_offset_evidence("workers", []) == []

            assert await store.read_offset_table("workers", base) is None
            assert await store.latest_offset_table("workers", base + 5) is None
            assert await store.create_offset_table("workers", base, b"first") == b"first"
            assert await store.create_offset_table("workers", base, b"second") == b"first"  # the first stays
            assert await store.read_offset_table("workers", base) == b"first"
            assert await store.read_offset_table("other", base) is None
            await store.create_offset_table("workers", base + 3, b"three")
            await store.create_offset_table("workers", base - 2, b"minus two")  # the slot before
            assert await store.latest_offset_table("workers", base + 3) == (base, b"first")
            assert await store.latest_offset_table("workers", base + 100) == (base + 3, b"three")
            assert await store.latest_offset_table("workers", base) == (base - 2, b"minus two")
            # two slots back at most
            far = base + 3 * OFFSET_TABLE_SLOT
            assert await store.latest_offset_table("workers", far) is None
            big = bytes(range(256)) * 400  # a table of 100 KB
            assert await store.create_offset_table("workers", far, big) == big
            assert await store.latest_offset_table("workers", far + OFFSET_TABLE_SLOT + 1) == (far, big)
        finally:
            await store.close()

    arun(body())


def test_stage_marks_by_consumer_shard_and_bucket_range(make_config: ConfigFactory) -> None:
    cfg = make_config(bucket_ms=1000)
    slot = 900  # buckets per 15-minute slot at 1 s buckets: ranges below cross slot boundaries
    base = 1_790_000_000 // slot * slot

    async def body() -> None:
        store = await opened(cfg)
        try:
            written: list[tuple[int, bytes]] = []
            for k, b in enumerate(range(base - 5, base + 2 * slot + 5, 37)):
                parts = [f"{b}:{i}".encode() * (1 + k % 5) for i in range(1 + k % 3)]
                await store.put_marks("workers", 2, b, parts)
                written += [(b, p) for p in parts]
            await store.put_marks("workers", 3, base, [b"other shard"])
            await store.put_marks("other", 2, base + 1, [b"other consumer"])
            big = [bytes([i]) * 70_000 for i in range(4)]  # parts beyond store.batch_bytes go in several writes
            await store.put_marks("workers", 2, base + 3 * slot, big)
            got = await store.read_marks("workers", 2, base - 10, base + 2 * slot + 10)
            assert got == written  # ascending (bucket, part); other shards and consumers apart
            lo, hi = base + 100, base + slot + 100
            assert await store.read_marks("workers", 2, lo, hi) == [(b, p) for b, p in written if lo <= b <= hi]
            assert await store.read_marks("workers", 2, base + 3 * slot, base + 3 * slot) == [
                (base + 3 * slot, p) for p in big
            ]
            assert await store.read_marks("workers", 3, base, base) == [(base, b"other shard")]
            await store.put_marks("workers", 3, base, [b"other shard"])  # idempotent
            assert await store.read_marks("workers", 3, base - slot, base + slot) == [(base, b"other shard")]
            assert await store.read_marks("workers", 2, base + 5 * slot, base + 6 * slot) == []
        finally:
            await store.close()

    arun(body())


def test_an_upgrade_to_schema_7_adds_leases_and_keeps_the_offsets(make_config: ConfigFactory) -> None:
    """Schema 7 adds read_offsets.lease_expires_ms and group_members; ``storyline init`` on a schema-6 tenant adds
    the column, keeps every offset (never leased: a group member may take them), and a second init changes
    nothing."""
    cfg = make_config(shards=20)

    async def body() -> None:
        store = await opened(cfg)
        try:
            before = await store.claim("main", 4, "old", 10)
            await store.commit("main", 4, "old", before.epoch, 30, 25)
            await downgrade(store, cfg, 6, drop_column=("read_offsets", "lease_expires_ms"))
            did = await store.init_schema()
            assert f"schema version 6 -> {SCHEMA_VERSION}" in did and any("lease_expires_ms" in d for d in did), did
            (kept,) = await store.read_offsets("main", [4])
            assert (kept.read_bucket, kept.replay_bucket, kept.owner, kept.lease_expires_ms) == (30, 25, "old", None)
            taken = await store.claim_many("main", [4], "member", 0, lease_until_ms=NOW, free_at_ms=NOW)
            assert [(o.read_bucket, o.epoch, o.lease_expires_ms) for o in taken] == [(30, before.epoch + 1, NOW)]
            again = await store.init_schema()
            assert not any("added column" in d for d in again), again
        finally:
            await store.close()

    arun(body())


def test_an_upgrade_to_schema_5_adds_the_dead_letters_raw_length(make_config: ConfigFactory) -> None:
    """Schema 5 adds dead_letter.raw_bytes (the length of a line kept only in part); ``storyline init`` on an older
    tenant adds the column, keeps the letters there, and a second init changes nothing."""
    cfg = make_config()
    old = DeadLetter("dl-old", NOW, "in.jsonl", 1, "json: bad", b"{bad")
    cut = DeadLetter("dl-cut", NOW, "in.jsonl", 2, "time: bad", b"x" * 10, raw_bytes=70_000)

    async def body() -> None:
        store = await opened(cfg)
        try:
            await store.put_dead_letters([old])
            await downgrade(store, cfg, 4, drop_column=("dead_letter", "raw_bytes"))
            did = await store.init_schema()
            assert f"schema version 4 -> {SCHEMA_VERSION}" in did and any("added column raw_bytes" in d for d in did)
            await store.put_dead_letters([cut])
            got = {d.dl_id: d for page in await collect(store.scan_dead_letters()) for d in page}
            assert got == {"dl-old": old, "dl-cut": cut} and got["dl-cut"].cut and not got["dl-old"].cut
            again = await store.init_schema()
            assert not any("added column" in d for d in again), again
        finally:
            await store.close()

    arun(body())


def test_dead_letters_roundtrip(make_config: ConfigFactory) -> None:
    cfg = make_config()
    letters = [
        DeadLetter(f"dl-{i:05d}", NOW + i, "input.jsonl", i + 1, "time: missing", f"{{bad {i}".encode())
        for i in range(1_234)
    ]
    letters[9] = DeadLetter("dl-00009", NOW, "input.jsonl", 10, "line: too long", b"{" * 100, raw_bytes=9_000_000)

    async def body() -> None:
        store = await opened(cfg)
        try:
            await store.put_dead_letters(letters)
            await store.put_dead_letters([DeadLetter(**{**_fields(letters[7]), "redriven_ms": NOW + 99})])
            got = [d for page in await collect(store.scan_dead_letters()) for d in page]
        finally:
            await store.close()
        assert len(got) == len(letters)
        by_id = {d.dl_id: d for d in got}
        assert by_id["dl-00007"].redriven_ms == NOW + 99
        assert by_id["dl-00008"] == letters[8]

    arun(body())


def _fields(d: DeadLetter) -> dict[str, Any]:
    return {f: getattr(d, f) for f in d.__struct_fields__}


# -- TTL and isolation ------------------------------------------------------------------------------------------
def test_ttl_is_set_or_enforced(make_config: ConfigFactory, backend: str) -> None:
    cfg = make_config()
    clock = ManualClock(NOW)

    async def body() -> None:
        store = await opened(cfg, clock)
        try:
            await store.append(0, NOW // cfg.bucket_ms, events(20))
            await store.put_stories([StoryRecord(0, 1, "s", 1, True, None, NOW, b"x")])
            await store.put_marks("c", 0, NOW // cfg.bucket_ms, [b"m"])
            if backend == "cql":
                from engine.store.cql import CqlStore

                assert isinstance(store, CqlStore)
                rows = await store._exec(
                    "t",
                    "ttl_check",
                    "SELECT table_name, default_time_to_live, compaction FROM system_schema.tables "
                    "WHERE keyspace_name = ?",
                    [cfg.keyspace],
                )
                by = {r["table_name"]: r for r in rows}
                for table in ("events", "bucket_index", "stories", "story_index", "story_periods", "stage_marks"):
                    assert by[table]["default_time_to_live"] == cfg.ttl_ms // 1000, table
                    assert by[table]["compaction"]["class"].endswith("TimeWindowCompactionStrategy"), table
            else:
                clock.advance(cfg.ttl_ms - 1)
                alive, _ = await read_all(store, 0, NOW // cfg.bucket_ms)
                assert len(alive) == 20
                clock.advance(1)
                gone, _ = await read_all(store, 0, NOW // cfg.bucket_ms)
                assert gone == []
                assert await store.nonempty_buckets(0, 0, NOW) == []
                assert await collect(store.scan_stories()) == []
                assert await store.read_marks("c", 0, 0, NOW) == []
                assert await store.story_periods(0, 10) == []
                assert await store.purge_expired() == 24  # 20 events, 1 index row, 1 story, its period, 1 mark
        finally:
            await store.close()

    arun(body())


def test_tenants_see_nothing_of_each_other(make_config: ConfigFactory) -> None:
    a_cfg, b_cfg = make_config(), make_config()

    async def body() -> None:
        a, b = await opened(a_cfg), await opened(b_cfg)
        try:
            await a.append(1, 50, events(10))
            await a.claim("main", 1, "a-worker", 0)
            await a.put_stories([StoryRecord(1, 1, "s", 1, True, None, NOW, b"x")])
            await a.put_dead_letters([DeadLetter("d", NOW, "f", 1, "r", b"raw")])
            b_events, _ = await read_all(b, 1, 50)
            assert b_events == []
            assert await b.nonempty_buckets(1, 0, 100) == []
            assert await b.read_offsets("main", [1]) == []
            assert await collect(b.scan_stories()) == []
            assert await collect(b.scan_dead_letters()) == []
            a_events, _ = await read_all(a, 1, 50)
            assert len(a_events) == 10
        finally:
            await a.close()
            await b.close()

    arun(body())


def test_server_clock_is_close(make_config: ConfigFactory) -> None:
    import time

    cfg = make_config()

    async def body() -> None:
        store = await opened(cfg)
        try:
            t = await store.server_time_ms()
        finally:
            await store.close()
        assert abs(t - time.time() * 1000) < 5_000

    arun(body())


# -- embedded only: several processes on one file --------------------------------------------------------------
def _writer(path: str, tenant: str, worker: int, n: int) -> None:
    from engine.core.config import from_mapping

    cfg = from_mapping({"tenant": tenant, "shards": 8, "store": {"backend": "embedded", "path": path}})

    async def go() -> None:
        store = make_store(cfg)
        await store.open()
        try:
            for i in range(n):
                await store.append(i % 4, 10, [EventRecord(f"w{worker}-{i:05d}", b"p" * 50)])
            off = await store.claim("main", worker, f"w{worker}", 0)
            for b in range(1, 30):
                await store.commit("main", worker, f"w{worker}", off.epoch, b, b)
        finally:
            await store.close()

    arun(go())


def test_embedded_store_is_safe_with_several_processes(tmp_path: Path) -> None:
    from engine.core.config import from_mapping

    path = str(tmp_path / "shared.db")
    cfg = from_mapping({"tenant": "shared", "shards": 8, "store": {"backend": "embedded", "path": path}})
    arun(_init(cfg))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, "shared", w, 300)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0

    async def check() -> None:
        store = await opened(cfg, init=False)
        try:
            got = []
            for shard in range(4):
                got += [e.event_id for e in (await read_all(store, shard, 10))[0]]
            offs = await store.read_offsets("main", range(3))
        finally:
            await store.close()
        assert sorted(got) == sorted(f"w{w}-{i:05d}" for w in range(3) for i in range(300))
        assert [(o.read_bucket, o.epoch) for o in offs] == [(29, 1)] * 3

    arun(check())


async def _init(cfg: Config) -> None:
    store = await opened(cfg)
    await store.close()
