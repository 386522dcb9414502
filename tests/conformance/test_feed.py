"""The story feed on every store backend: which periods it delivers, in which order, from where a reader resumes,
drains, gaps, several readers."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine.core.clock import ManualClock
from engine.core.config import Config
from engine.core.records import Commit, FeedPosition, StoryPeriod, StoryRecord, story_id
from engine.feed import FeedGap, FeedItem, FeedSettings, StoryFeed
from engine.store import Store, make_store
from tests.conftest import ConfigFactory, arun

pytestmark = pytest.mark.conformance

NOW = 1_790_000_000_000
SHARDS = 4


def cfg_of(make_config: ConfigFactory) -> Config:
    return make_config(shards=SHARDS)


async def opened(cfg: Config, clock: ManualClock) -> Store:
    store = make_store(cfg, clock)
    await store.open()
    await store.init_schema()
    return store


def rec(shard: int, period: int, key: int, revision: int = 1, final: bool = True) -> StoryRecord:
    sid = story_id(shard, key)
    return StoryRecord(shard, period, sid, revision, final, None, period * 1000, f'{{"id":"{sid}"}}'.encode())


async def checkpoint(store: Store, reads: Sequence[int]) -> None:
    """Every shard's checkpoint at ``reads[shard]`` (the engine's consumer "main")."""
    offsets = await store.claim_many("main", list(range(len(reads))), "w", 0)
    await store.commit_many("main", "w", [Commit(o.shard, o.epoch, r, 0) for o, r in zip(offsets, reads, strict=True)])


async def drain(feed: StoryFeed) -> list[FeedItem | FeedGap]:
    out = [x async for x in feed]
    await feed.commit()
    return out


def keys(items: Sequence[FeedItem | FeedGap]) -> list[tuple[int, int, str, int]]:
    return [x.position.key() for x in items if isinstance(x, FeedItem)]


def test_story_periods_are_recorded_with_the_rows_and_a_seal_survives_a_rewrite(make_config: ConfigFactory) -> None:
    cfg = cfg_of(make_config)

    async def body() -> None:
        store = await opened(cfg, ManualClock(NOW))
        try:
            await store.put_stories([rec(1, 100, 5), rec(1, 100, 6), rec(0, 101, 7), rec(3, 99, 8)])
            assert await store.story_periods(100, 101) == [StoryPeriod(100, 1, False), StoryPeriod(101, 0, False)]
            await store.seal_periods([(100, 1), (102, 2)])  # a drained shard with nothing written is sealed too
            await store.put_stories([rec(1, 100, 5)])  # a replay rewrites identical rows: the seal stays
            got = await store.story_periods(0, 10**6)
            assert got == [
                StoryPeriod(99, 3, False),
                StoryPeriod(100, 1, True),
                StoryPeriod(101, 0, False),
                StoryPeriod(102, 2, True),
            ]
            assert await store.read_feed_position("r") is None
            await store.commit_feed_position(FeedPosition("r", 100, 1, "s1-x", 2, 5))
            assert await store.read_feed_position("r") == FeedPosition("r", 100, 1, "s1-x", 2, 5)
            await store.commit_feed_position(FeedPosition("r", 101, 0, "", -1, 6))
            assert await store.read_feed_position("r") == FeedPosition("r", 101, 0, "", -1, 6)
        finally:
            await store.close()

    arun(body())


def test_the_feed_delivers_complete_periods_in_emission_order_and_resumes_after_its_position(
    make_config: ConfigFactory,
) -> None:
    cfg = cfg_of(make_config)
    settings = FeedSettings.from_config(cfg)

    async def body() -> None:
        clock = ManualClock(NOW)
        store = await opened(cfg, clock)
        try:
            base = NOW // cfg.bucket_ms - 100
            rows = [rec(s, base + p, k, r) for s in range(SHARDS) for p in range(6) for k in (1, 2) for r in (1, 2)]
            await store.put_stories(rows)
            feed = StoryFeed(store, settings, reader="a", clock=clock)
            assert await drain(feed) == [] and feed.waiting_for == [0, 1, 2, 3]  # no checkpoint: nothing complete
            # Shard 2 is behind: periods up to base+2 are complete everywhere (read_bucket > period).
            await checkpoint(store, [base + 5, base + 5, base + 3, base + 6])
            feed = StoryFeed(store, settings, reader="a", clock=clock)
            got = await drain(feed)
            want = sorted((r.period, r.shard, r.story_id, r.revision) for r in rows if r.period <= base + 2)
            assert keys(got) == want  # (period, shard, story_id, revision) order
            assert all(isinstance(x, FeedItem) and x.record.body for x in got)
            # Resumes after the committed position: nothing again; then more complete periods.
            assert await drain(StoryFeed(store, settings, reader="a", clock=clock)) == []
            await checkpoint(store, [base + 6] * SHARDS)
            more = await drain(StoryFeed(store, settings, reader="a", clock=clock))
            assert keys(more) == sorted(
                (r.period, r.shard, r.story_id, r.revision) for r in rows if base + 2 < r.period <= base + 5
            )
            # Another reader reads independently, from the start; "latest" starts after what is complete now.
            assert len(keys(await drain(StoryFeed(store, settings, reader="b", clock=clock)))) == len(
                [r for r in rows if r.period <= base + 5]
            )
            late = StoryFeed(store, settings, reader="c", start="latest", clock=clock)
            assert await drain(late) == []
            await store.put_stories([extra := rec(0, base + 6, 9)])
            await checkpoint(store, [base + 7] * SHARDS)
            newer = [r for r in [*rows, extra] if r.period == base + 6]  # complete only now: after "latest"
            assert keys(await drain(StoryFeed(store, settings, reader="c", clock=clock))) == sorted(
                (r.period, r.shard, r.story_id, r.revision) for r in newer
            )
            # A time: from the bucket holding it.
            at = StoryFeed(store, settings, reader="d", start=(base + 4) * cfg.bucket_ms, clock=clock)
            assert {k[0] for k in keys(await drain(at))} == {base + 4, base + 5, base + 6}
        finally:
            await store.close()

    arun(body())


def test_a_drained_period_is_delivered_once_sealed_and_final_only_skips_provisional_revisions(
    make_config: ConfigFactory,
) -> None:
    cfg = cfg_of(make_config)
    settings = FeedSettings.from_config(cfg)

    async def body() -> None:
        clock = ManualClock(NOW)
        store = await opened(cfg, clock)
        try:
            b = NOW // cfg.bucket_ms - 50
            await store.put_stories([rec(s, b, 1) for s in range(SHARDS)])
            await checkpoint(store, [b] * SHARDS)  # read_bucket == b: b may still get a drain's revisions
            assert await drain(StoryFeed(store, settings, reader="r", clock=clock)) == []
            # The drain writes at b after the checkpoint, then seals b on every shard it drained.
            await store.put_stories([rec(s, b, 2, final=(s != 1)) for s in range(SHARDS)])
            await store.seal_periods([(b, s) for s in range(SHARDS - 1)])
            assert await drain(StoryFeed(store, settings, reader="r", clock=clock)) == []  # shard 3 not sealed
            await store.seal_periods([(b, SHARDS - 1)])
            feed = StoryFeed(store, settings, reader="r", final_only=True, clock=clock)
            got = keys(await drain(feed))
            assert len(got) == 2 * SHARDS - 1 and (b, 1, story_id(1, 2), 1) not in got
        finally:
            await store.close()

    arun(body())


def test_a_reader_behind_the_ttl_gets_a_gap_first(make_config: ConfigFactory) -> None:
    cfg = cfg_of(make_config)
    settings = FeedSettings.from_config(cfg)

    async def body() -> None:
        clock = ManualClock(NOW)
        store = await opened(cfg, clock)
        try:
            b = NOW // cfg.bucket_ms
            await store.put_stories([rec(0, b - 2, 1)])
            await checkpoint(store, [b] * SHARDS)
            assert len(keys(await drain(StoryFeed(store, settings, reader="r", clock=clock)))) == 1
            clock.advance(cfg.ttl_ms + 10 * cfg.bucket_ms)  # the reader stayed away longer than the TTL
            now_b = clock.now_ms() // cfg.bucket_ms
            await store.put_stories([rec(1, now_b - 2, 2)])
            await checkpoint(store, [now_b] * SHARDS)
            got = await drain(StoryFeed(store, settings, reader="r", clock=clock))
            gap = got[0]
            assert isinstance(gap, FeedGap) and gap.first_period == b  # the position stood after period b - 1
            assert gap.last_period == (clock.now_ms() - cfg.ttl_ms) // cfg.bucket_ms - 1
            assert keys(got) == [(now_b - 2, 1, story_id(1, 2), 1)]
            assert await drain(StoryFeed(store, settings, reader="r", clock=clock)) == []  # reported once
        finally:
            await store.close()

    arun(body())


def test_a_new_reader_that_found_nothing_complete_keeps_no_position_and_later_gets_no_gap(
    make_config: ConfigFactory,
) -> None:
    """Before the engine's first checkpoint nothing is complete: a new reader reads nothing and must not commit
    its start (the oldest kept period). Started again after the clock moved on, it would see the periods between
    that start and the new oldest kept period as a gap, and the CLI would exit 4 on a healthy tenant (found by a
    journey: feed before the first drain, drain, feed)."""
    cfg = cfg_of(make_config)
    settings = FeedSettings.from_config(cfg)

    async def body() -> None:
        clock = ManualClock(NOW)
        store = await opened(cfg, clock)
        try:
            assert await drain(StoryFeed(store, settings, reader="early", clock=clock)) == []
            assert await store.read_feed_position("early") is None
            clock.advance(5_000)
            b = clock.now_ms() // cfg.bucket_ms
            await store.put_stories([rec(2, b - 1, 1)])
            await checkpoint(store, [b] * SHARDS)
            got = await drain(StoryFeed(store, settings, reader="early", clock=clock))
            assert not any(isinstance(x, FeedGap) for x in got), got
            assert keys(got) == [(b - 1, 2, story_id(2, 1), 1)]
        finally:
            await store.close()

    arun(body())
