"""The processing stage interface between the worker (the queue half) and correlation (the story builder).

A stage is a pure state machine: it does no I/O. The worker hands it buckets in bucket order — each a bucket
number and the partitions of that bucket of every shard it is moving forward (many partitions per call, so
per-call costs are shared) — and gets back an :class:`Emission`: the story revisions to write, the marks to
store, and the replay point of every shard of the call. The worker persists emissions in its checkpoint, in one
documented order (docs/architecture.md, "The checkpoint"): emissions first (marks, then stories), then the
offsets; so every offset committed covers only output that is durable.

After a restart the worker reads the marks the stage asks for (``marks_from``), hands them to
``prepare_replay`` and replays ``[replay_bucket, read_bucket]`` with ``replay=True``: the stage rebuilds its
state from the same buckets, which gives the same decisions (its output is a function of the sequence of buckets
only), and emits again only what a crash may have cut off (a recorded drain's revisions); the rest of a
replay's output is durable already.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import msgspec

from engine.core.event import Event, EventView, decode, decode_view
from engine.core.records import EventRecord, EvidenceRecord, StoryRecord


class Batch:
    """The events of one bucket of one shard: the linking fields decoded up front (a small view struct, cheap),
    the full events only when asked for (``events()``), e.g. for the events of a story being emitted."""

    __slots__ = ("_events", "bytes", "records", "undecodable", "views")

    def __init__(self, records: Sequence[EventRecord]) -> None:
        dec = decode_view
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
        self.bytes = sum([len(r.payload) for r in self.records])  # payload bytes (bounds a stage call's size)

    def __len__(self) -> int:
        return len(self.views)

    def events(self) -> list[Event]:
        if self._events is None:
            dec = decode
            self._events = [dec(r.payload) for r in self.records]
        return self._events


EMPTY: Batch = Batch(())
NO_MARKS = 2**62
"""``marks_from`` of a stage that stores no marks: later than any bucket, so nothing is read."""

Buckets = Sequence[tuple[int, Mapping[int, Batch]]]
"""What a stage call takes: ``(bucket, {shard: its partition of that bucket})`` in ascending bucket order; a shard
with an empty batch is one whose time moved on with nothing to read."""


class MarkRecord(NamedTuple):
    """One stored mark row: what a replay needs besides the events, at ``(shard, bucket, part)``
    (``Store.put_marks``)."""

    shard: int
    bucket: int
    part: int
    body: bytes


@dataclass(slots=True)
class Emission:
    """What a stage call produced, for the worker to persist: story revisions (``(story_id, revision)`` is unique
    and its content fixed: a rewrite is an idempotent upsert of the same bytes), marks, and the replay point per
    shard of the call (the oldest bucket a rebuild of its state needs; committed with the offsets), and the
    evidence of sensor clock offsets of the epochs that closed (an upsert per (epoch, shard))."""

    stories: list[StoryRecord] = field(default_factory=list)
    marks: list[MarkRecord] = field(default_factory=list)
    replay: dict[int, int] = field(default_factory=dict)
    evidence: list[EvidenceRecord] = field(default_factory=list)

    def add(self, other: Emission) -> None:
        """Append a later emission (its replay points replace this one's)."""
        self.stories += other.stories
        self.marks += other.marks
        self.replay.update(other.replay)
        self.evidence += other.evidence

    @property
    def writes(self) -> int:
        return len(self.stories) + len(self.marks) + len(self.evidence)

    def drop_shards(self, shards: set[int]) -> None:
        """Forget what this emission holds for ``shards`` (shards another owner took: never written by us)."""
        self.stories = [r for r in self.stories if r.shard not in shards]
        self.marks = [m for m in self.marks if m.shard not in shards]
        self.evidence = [e for e in self.evidence if e.shard not in shards]
        self.replay = {s: b for s, b in self.replay.items() if s not in shards}


def each_partition(buckets: Buckets, fn: Callable[..., None], *, replay: bool) -> Emission:
    """For a stage that holds no state: ``fn(shard, bucket, batch, replay=replay)`` per partition; it emits
    nothing and needs no replay (replay point: the next bucket)."""
    out = Emission()
    for bucket, batches in buckets:
        for shard, batch in batches.items():
            fn(shard, bucket, batch, replay=replay)
            out.replay[shard] = bucket + 1
    return out


@runtime_checkable
class LearnsOffsets(Protocol):
    """A stage that applies epoch tables — learned sensor clock offsets, DNS answers — (the story builder): before
    each call (and a drain: ``drain``) the runtime hands over the table of every epoch the stage asks for that it
    lacks (``table``: an :class:`engine.correlate.offsets.OffsetTable`)."""

    def use_offset_tables(self) -> None: ...

    def offset_epochs(self, buckets: Buckets, *, drain: bool = False) -> list[int]: ...

    def close_epochs(self, shards: Sequence[int], epoch: int) -> Emission:
        """Before a drain at a bucket of ``epoch``: what the stage gathered for the epoch tables of these shards,
        emitted now (the runtime adds an empty row of ``epoch`` for each shard the store then has none of)."""

    def set_offset_table(self, table: Any) -> None: ...


class Stage(Protocol):
    def on_buckets(self, buckets: Buckets, *, replay: bool) -> Emission:
        """Process the buckets (ascending; each shard's buckets in order, though not every empty one).
        ``replay`` buckets were processed before a restart: rebuild state from them, and emit only what may not
        be durable (see the module docstring)."""

    def drain(self, shards: Sequence[int], bucket: int) -> Emission:
        """Finalize everything still open in these shards at ``bucket`` (their last processed bucket;
        ``run --drain``). The emission records the drain in the marks, so a replay repeats it."""

    def marks_from(self, first: int) -> int:
        """The first bucket whose marks :meth:`prepare_replay` needs for a replay starting at ``first``."""

    def prepare_replay(self, shard: int, first: int, last: int, marks: Sequence[tuple[int, bytes]]) -> None:
        """Called once before buckets ``[first, last]`` of a shard are replayed (``first`` = the committed
        replay bucket, ``last`` = the committed read bucket), with the shard's stored marks of
        ``[marks_from(first), last]`` as ``(bucket, body)`` ascending."""

    def reset(self, shards: Sequence[int]) -> None:
        """Forget everything held for these shards. The worker calls it before it replays them: at start, and
        after an error while it persisted an emission (the state is then ahead of the store) — it then rebuilds
        them from their committed offsets."""

    def metrics(self) -> dict[str, float]: ...
