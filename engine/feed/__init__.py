"""The story feed: story revisions in emission order, for downstream systems, with a position per reader.

A reader (a name: one process at a time per name) reads every story revision the engine writes, in emission order
— ``(period, shard, story_id, revision)``, where ``period`` is the bucket whose processing emitted the revision —
and commits its position in the database after it has handed the revisions on (at-least-once: after a crash the
revisions after the last committed position come again; a reader de-duplicates by ``(story_id, revision)`` if it
must). Several readers read independently.

**Only committed periods.** A ``(period, shard)`` is *complete* when the engine's checkpoint for that shard has
moved past it (``read_bucket > period``: everything it emitted there is durable and nothing more will be) or a
drain sealed it (a drain writes at the bucket its checkpoint already committed, then seals it). The feed reads
periods up to the last one complete for every shard, so a reader's position never passes a partition that
could still grow: a drain never writes behind a committed reader position.

**Gaps.** Revisions expire ``ttl_ms`` after they were written. A reader whose position lies in periods that may
have expired is told: a :class:`FeedGap` (the periods it may have lost) before anything else — never a silent
skip. ``storyline feed`` prints it on stderr and exits 4 unless it follows.

Usage::

    feed = StoryFeed(store, FeedSettings.from_config(cfg), reader="siem-export")
    async for item in feed:                # FeedItem or FeedGap
        if isinstance(item, FeedItem):
            send(item.record.body)
        await feed.commit()                # after what was handed on is safe: commit as often as you like
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Literal

import msgspec

from engine.core.clock import SYSTEM_CLOCK, Clock
from engine.core.config import Config
from engine.core.errors import ConfigError
from engine.core.records import FeedPosition, StoryRecord
from engine.store import Store

__all__ = ["FeedGap", "FeedItem", "FeedSettings", "Start", "StoryFeed"]

READER_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")

Start = Literal["earliest", "latest"] | int
"""Where a reader without a committed position starts: the oldest revision kept, the first revision emitted after
now, or a time (ms since the epoch: the revisions emitted from the bucket holding it)."""


class FeedSettings(msgspec.Struct, frozen=True):
    """What the feed reads of the configuration (meanings: :class:`~engine.core.config.Config`)."""

    consumer: str  # whose checkpoints say which periods are complete
    shards: int
    bucket_ms: int
    ttl_ms: int
    poll_ms: int  # how often a following feed looks for newly complete periods

    @classmethod
    def from_config(cls, cfg: Config) -> FeedSettings:
        return cls(
            consumer=cfg.consumer,
            shards=cfg.shards,
            bucket_ms=cfg.bucket_ms,
            ttl_ms=cfg.ttl_ms,
            poll_ms=max(cfg.bucket_ms // 2, 50),
        )


class FeedItem(msgspec.Struct, frozen=True):
    """One story revision and the position just after it."""

    position: FeedPosition
    record: StoryRecord


class FeedGap(msgspec.Struct, frozen=True):
    """Periods ``[first_period, last_period]`` whose revisions may have expired before the reader got them."""

    reader: str
    first_period: int
    last_period: int
    first_ms: int  # the start of first_period
    end_ms: int  # the end of last_period


def check_reader(name: str) -> str:
    if not READER_RE.fullmatch(name):
        raise ConfigError("--reader", f"{name!r} must match {READER_RE.pattern}")
    return name


class StoryFeed:
    """Iterate a reader's story revisions (see the module docstring). ``follow``: wait for more at the end instead
    of stopping; ``final_only``: skip provisional revisions (``emit = "updates"``). ``start`` applies only to a
    reader that never committed a position."""

    def __init__(
        self,
        store: Store,
        settings: FeedSettings,
        *,
        reader: str,
        start: Start = "earliest",
        follow: bool = False,
        final_only: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.s = settings
        self.reader = check_reader(reader)
        self.start = start
        self.follow = follow
        self.final_only = final_only
        self.clock = clock
        self.committed: FeedPosition | None = None  # what the database holds
        self.delivered: FeedPosition | None = None  # the last position handed out
        self.complete_through: int | None = None  # the last period complete for every shard, at the last look
        self.revisions = 0  # handed out by this instance
        self.waiting_for: list[int] = []  # shards without a committed position (nothing is complete without them)
        self._stop = False
        self._stored: FeedPosition | None = None
        self._read_stored = False

    def stop(self) -> None:
        """End a following iteration at its next wait."""
        self._stop = True

    async def commit(self) -> None:
        """Store the position after the last revision handed out (nothing if there is nothing new)."""
        d = self.delivered
        if d is None or (self.committed is not None and self.committed.key() == d.key()):
            return
        pos = msgspec.structs.replace(d, updated_ms=self.clock.now_ms())
        await self.store.commit_feed_position(pos)
        self.committed = pos

    # -- positions -------------------------------------------------------------------------------------------
    def first_kept(self, now_ms: int) -> int:
        """The oldest period none of whose revisions can have expired yet (a revision of period p is written
        after p ends and lives ``ttl_ms``)."""
        return (now_ms - self.s.ttl_ms) // self.s.bucket_ms

    async def complete(self) -> int | None:
        """The last period complete for every shard (None: some shard has no checkpoint yet)."""
        offsets = await self.store.read_offsets(self.s.consumer, list(range(self.s.shards)))
        have = {o.shard: o.read_bucket for o in offsets}
        self.waiting_for = [s for s in range(self.s.shards) if s not in have]
        if self.waiting_for:
            return None
        lo, hi = min(have.values()), max(have.values())
        sealed = {(p.period, p.shard) for p in await self.store.story_periods(lo, hi) if p.sealed}
        return min(r if (r, s) in sealed else r - 1 for s, r in have.items())

    async def _initial(self, complete: int | None) -> FeedPosition:
        now = self.clock.now_ms()
        start = self.start
        if start == "earliest":
            period = self.first_kept(now)
            return FeedPosition(self.reader, period - 1, self.s.shards, "", -1)
        if start == "latest":
            period = complete if complete is not None else now // self.s.bucket_ms
            return FeedPosition(self.reader, period, self.s.shards, "", -1)
        return FeedPosition(self.reader, start // self.s.bucket_ms - 1, self.s.shards, "", -1)

    # -- iteration -------------------------------------------------------------------------------------------
    async def resume_point(self) -> FeedPosition | None:
        """The reader's committed position, read once (the iteration starts after it; None: a new reader)."""
        if not self._read_stored:
            self._stored = await self.store.read_feed_position(self.reader)
            self._read_stored = True
        return self._stored

    async def __aiter__(self) -> AsyncIterator[FeedItem | FeedGap]:
        stored = await self.resume_point()
        self.committed = stored
        complete = await self.complete()
        pos = stored if stored is not None else await self._initial(complete)
        # A new reader's start is not a position yet: committing it would make a later start see the periods
        # between it and the then oldest kept period as a gap. It gets one once it has read something.
        self.delivered = stored
        kept = self.first_kept(self.clock.now_ms())
        # The first period the reader has not finished: its position's (unless the position stands after all of
        # its shards). Periods from there to kept - 1 may have expired.
        needed = None if stored is None else stored.period + (stored.shard >= self.s.shards)
        if needed is not None and needed < kept:
            bms = self.s.bucket_ms
            yield FeedGap(self.reader, needed, kept - 1, needed * bms, kept * bms)
            pos = FeedPosition(self.reader, kept - 1, self.s.shards, "", -1)
            self.delivered = pos
        while True:
            if complete is not None and complete >= pos.period:
                async for item in self._read(pos, complete):
                    pos = item.position
                    yield item
                # Everything through `complete` is read: stand after its last partition (even an empty one).
                pos = FeedPosition(self.reader, complete, self.s.shards, "", -1)
                if self.delivered is None or self.delivered.key() < pos.key():
                    self.delivered = pos
            self.complete_through = complete
            if not self.follow or self._stop:
                return
            await asyncio.sleep(self.s.poll_ms / 1000)
            complete = await self.complete()

    async def _read(self, after: FeedPosition, through: int) -> AsyncIterator[FeedItem]:
        """The revisions after ``after`` in periods up to ``through``."""
        first = max(after.period, self.first_kept(self.clock.now_ms()))
        start = (after.period, after.shard)
        parts = [p for p in await self.store.story_periods(first, through) if (p.period, p.shard) >= start]
        for part in parts:
            async for page in self.store.read_stories(part.shard, part.period):
                for rec in page:
                    key = (rec.period, rec.shard, rec.story_id, rec.revision)
                    if key <= after.key():
                        continue
                    position = FeedPosition(self.reader, *key)
                    self.delivered = position
                    if self.final_only and not rec.final:
                        continue
                    self.revisions += 1
                    yield FeedItem(position, rec)
