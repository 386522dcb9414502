"""The processing stage interface between the worker (the queue half) and correlation (the story builder).

The worker calls the stage bucket by bucket, in bucket order, with the partitions of that bucket of every shard
it is moving forward (many partitions per call, so per-call costs are shared); ``on_buckets`` returns only when
everything derived from them is durable, so the worker may then move those shards' ``read_bucket`` past it.
``replay_bucket`` tells the worker the oldest bucket the stage still needs to rebuild its in-memory state after
a crash; the worker commits it with the offset and, on restart, calls ``prepare_replay`` and then replays from
there with ``replay=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import msgspec

from engine.event import Event, EventView
from engine.store import EventRecord

_view_decoder = msgspec.msgpack.Decoder(EventView)
_full_decoder = msgspec.msgpack.Decoder(Event)


class Batch:
    """The events of one bucket of one shard: the linking fields decoded up front (a small view struct, cheap),
    the full events only when asked for (``events()``), e.g. for the events of a story being emitted."""

    __slots__ = ("_events", "records", "undecodable", "views")

    def __init__(self, records: Sequence[EventRecord]) -> None:
        dec = _view_decoder.decode
        self.undecodable = 0
        try:
            self.views: list[EventView] = [dec(r.payload) for r in records]
            self.records = records
        except (msgspec.DecodeError, msgspec.ValidationError):
            # Not a canonical event (written by something else into the queue): skip it, count it, go on —
            # one bad row must not stop a shard.
            good: list[EventRecord] = []
            self.views = []
            for r in records:
                try:
                    self.views.append(dec(r.payload))
                    good.append(r)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.undecodable += 1
            self.records = good
        self._events: list[Event] | None = None

    def __len__(self) -> int:
        return len(self.views)

    def events(self) -> list[Event]:
        if self._events is None:
            dec = _full_decoder.decode
            self._events = [dec(r.payload) for r in self.records]
        return self._events


EMPTY: Batch = Batch(())


class Stage(Protocol):
    async def on_buckets(self, bucket: int, batches: Mapping[int, Batch], *, replay: bool) -> None:
        """Process bucket ``bucket`` of the shards in ``batches`` (shard → its partition, possibly empty: time
        moved on). Each shard's buckets come in order, though not every empty one. ``replay`` buckets were
        processed before a restart: rebuild state from them, and produce output only if it is idempotent."""

    def replay_bucket(self, shard: int, read_bucket: int) -> int:
        """The oldest bucket still needed to rebuild this shard's state; ``read_bucket + 1`` when none is."""

    async def prepare_replay(self, shard: int, first: int, last: int) -> None:
        """Called once before buckets ``[first, last]`` of a shard are replayed (``first`` = the committed
        ``replay_bucket``, ``last`` = ``read_bucket``): load what the replay needs besides the events."""

    def reset(self, shards: Sequence[int]) -> None:
        """Forget everything held for these shards. The worker calls it before it replays them: at start, and
        after an error in the middle of ``on_buckets`` (which may have left their state half-updated, e.g.
        stories marked emitted whose write failed) — it then rebuilds them from their committed offsets."""

    async def drain(self, shard: int, bucket: int) -> None:
        """Finalize everything still open for the shard (``run --drain``)."""

    def metrics(self) -> dict[str, float]: ...


class CountingStage:
    """A stage that only counts: for the runtime's tests and the consume benchmark."""

    def __init__(self) -> None:
        self.events = 0
        self.buckets = 0
        self.replayed = 0
        self.per_shard: dict[int, int] = {}
        self.seen: dict[int, list[tuple[int, list[str]]]] = {}
        self.keep_ids = False

    async def on_buckets(self, bucket: int, batches: Mapping[int, Batch], *, replay: bool) -> None:
        for shard, batch in batches.items():
            await self.on_bucket(shard, bucket, batch, replay=replay)

    async def on_bucket(self, shard: int, bucket: int, batch: Batch, *, replay: bool) -> None:
        if replay:
            self.replayed += len(batch)
            return
        self.events += len(batch)
        self.buckets += 1
        self.per_shard[shard] = self.per_shard.get(shard, 0) + len(batch)
        if self.keep_ids and batch.views:
            self.seen.setdefault(shard, []).append((bucket, [e.id for e in batch.views]))

    def replay_bucket(self, shard: int, read_bucket: int) -> int:
        return read_bucket + 1

    async def prepare_replay(self, shard: int, first: int, last: int) -> None:
        return None

    def reset(self, shards: Sequence[int]) -> None:
        return None  # counts are not state: buckets processed again after an error are counted again

    async def drain(self, shard: int, bucket: int) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {"stage_events": float(self.events), "stage_replayed": float(self.replayed)}
