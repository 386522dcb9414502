"""Pure pieces of the store layer: chunking, batch grouping, page sizing, retries."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.clock import ManualClock
from engine.core.config import from_mapping
from engine.core.errors import StoreError, TransientStoreError, WriteTooLateError
from engine.core.records import BucketHint, EventRecord
from engine.store.chunks import ROW_OVERHEAD, Assembler, group_rows, hints, iter_rows, row_bytes, size_class, split
from engine.store.paging import PageSizer
from engine.store.retry import RetryStats, retrying, run_all

CFG = from_mapping({"tenant": "t", "store": {"max_retries": 3, "retry_base_ms": 1, "retry_max_ms": 4}})


def rows_of(events: list[EventRecord], chunk: int) -> list[tuple[str, int, int | None, bytes]]:
    out = []
    for e in sorted(events, key=lambda e: e.event_id.encode()):
        out += [(e.event_id, c, n, p) for c, n, p in iter_rows(e, chunk)]
    return out


def test_split_sizes() -> None:
    assert split(b"", 4) == [b""]
    assert split(b"abcd", 4) == [b"abcd"]
    assert split(b"abcde", 4) == [b"abcd", b"e"]
    assert [n for _, n, _ in iter_rows(EventRecord("x", b"a" * 9), 4)] == [3, None, None]


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=0, max_size=20),
    chunk=st.integers(1, 9),
    cuts=st.lists(st.integers(0, 200), max_size=6),
)
def test_assembler_roundtrips_across_any_page_cuts(sizes: list[int], chunk: int, cuts: list[int]) -> None:
    rnd = random.Random(len(sizes))
    events = [EventRecord(f"e{i:03d}", rnd.randbytes(n)) for i, n in enumerate(sizes)]
    rows = rows_of(events, chunk)
    bounds = sorted({0, len(rows), *(c for c in cuts if c < len(rows))})
    asm = Assembler()
    got: list[EventRecord] = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        got += asm.feed_fast(rows[a:b]) if i % 2 == 0 else asm.feed(rows[a:b])
    asm.finish()
    assert got == events
    assert asm.incomplete == 0


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_assembler_never_yields_a_damaged_event(data: st.DataObject) -> None:
    rnd = random.Random(1)
    events = [EventRecord(f"e{i:03d}", rnd.randbytes(rnd.randint(0, 30))) for i in range(8)]
    rows = rows_of(events, 7)
    drop = data.draw(st.sets(st.integers(0, len(rows) - 1), max_size=5))
    kept = [r for i, r in enumerate(rows) if i not in drop]
    asm = Assembler()
    cut = data.draw(st.integers(0, len(kept)))
    got = asm.feed_fast(kept[:cut]) + asm.feed_fast(kept[cut:])
    asm.finish()
    damaged = {rows[i][0] for i in drop}
    assert got == [e for e in events if e.event_id not in damaged]
    # an event with some rows left is an incomplete set; one with none left simply is not there
    assert asm.incomplete == len(damaged & {r[0] for r in kept})


def test_group_rows_respects_batch_bytes_and_order() -> None:
    rnd = random.Random(5)
    events = [EventRecord(f"e{i:04d}", rnd.randbytes(rnd.choice([10, 500, 5_000, 70_000]))) for i in range(300)]
    groups = group_rows(events, chunk_bytes=16_384, batch_bytes=65_536)
    flat = [r for g in groups for r in g]
    assert flat == rows_of(events, 16_384) or [r[:2] for r in flat] == [
        (e.event_id, c) for e in events for c, _, _ in iter_rows(e, 16_384)
    ]
    for g in groups:
        total = sum(row_bytes(eid, p) for eid, _, _, p in g)
        assert total <= 65_536 or len(g) == 1


def test_size_class_and_hints() -> None:
    assert [size_class(n) for n in (1, 2, 3, 4, 5, 1024, 1025)] == [0, 1, 2, 2, 3, 10, 11]
    for n in range(1, 5000, 37):
        assert 1 << size_class(n) >= n
    # rows arrive in any order (two index slots are paged concurrently): one hint per bucket, the largest class
    rows = [(5, 1, 3), (9, 1, 4), (5, 1, 9), (6, 1, 2), (9, 1, 1), (6, 2, 7), (4, 1, 1), (10, 1, 1), (7, 3, 1)]
    assert hints(rows, [1, 2], 5, 9) == {
        1: [BucketHint(5, 512), BucketHint(6, 4), BucketHint(9, 16)],
        2: [BucketHint(6, 128)],
    }


def test_page_sizer_bounds() -> None:
    mib = 1 << 20
    cfg = from_mapping({"tenant": "t", "store": {"page_rows": 5000, "page_bytes": mib, "page_bytes_max": 8 * mib}})
    small = PageSizer(cfg.store, max_row_bytes=256, estimate=float(1 << 20))
    assert small.limit() == 4096  # page_bytes / 256: the hint caps the pessimistic estimate
    small.observe(4096, 4096 * 150)
    assert small.limit() == 5000  # learnt the rows are small: up to page_rows
    mixed = PageSizer(cfg.store, max_row_bytes=1 << 20, estimate=150.0)
    assert mixed.limit() == 8  # the partition holds 1 MiB rows: never more than page_bytes_max
    mixed.observe(8, 8 * 150)
    assert mixed.limit() == 8


def test_retrying_retries_only_transient_and_is_bounded() -> None:
    clock = ManualClock(0)
    calls = {"n": 0}

    async def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise TransientStoreError("timeout")
        return "ok"

    async def broken() -> str:
        calls["n"] += 1
        raise TransientStoreError("timeout")

    async def fatal() -> str:
        calls["n"] += 1
        raise StoreError("syntax error")

    stats = RetryStats()
    assert asyncio.run(retrying(flaky, settings=CFG.store, what="w", stats=stats, clock=clock)) == "ok"
    assert (calls["n"], stats.retries) == (3, 2)
    calls["n"] = 0
    with pytest.raises(StoreError, match="gave up after 4 attempts") as info:
        asyncio.run(retrying(broken, settings=CFG.store, what="w", stats=stats, clock=clock))
    assert info.value.retriable and calls["n"] == 4 and stats.giveups == 1
    calls["n"] = 0
    with pytest.raises(StoreError, match="syntax"):
        asyncio.run(retrying(fatal, settings=CFG.store, what="w", stats=stats, clock=clock))
    assert calls["n"] == 1


def test_retrying_never_starts_an_attempt_after_the_deadline() -> None:
    clock = ManualClock(1_000)
    calls = {"n": 0}

    async def slow_fail() -> None:
        calls["n"] += 1
        clock.advance(400)
        raise TransientStoreError("timeout")

    with pytest.raises(WriteTooLateError):
        asyncio.run(
            retrying(slow_fail, settings=CFG.store, what="w", stats=RetryStats(), clock=clock, deadline_ms=1_500)
        )
    assert calls["n"] == 2  # at 1000 and 1400; not at 1800


def test_run_all_raises_the_failure_itself() -> None:
    async def ok() -> None:
        await asyncio.sleep(0)

    async def bad() -> None:
        raise StoreError("boom")

    with pytest.raises(StoreError, match="boom"):
        asyncio.run(run_all([ok(), bad(), ok()]))


def test_row_overhead_is_counted() -> None:
    assert row_bytes("abc", b"x" * 10) == 13 + ROW_OVERHEAD
