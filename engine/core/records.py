"""Records that cross the seams between layers: what a producer appends and a worker reads (:class:`EventRecord`),
and what the story builder emits and the store keeps (:class:`StoryRecord`). Both the store and the pure
correlation code use them, so they live here, not in ``engine.store``. Times are int64 UTC milliseconds."""

from __future__ import annotations

from typing import NamedTuple

import msgspec


class EventRecord(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One event as the store sees it: an id (clustering key) and its encoded payload."""

    event_id: str
    payload: bytes


class StoryRecord(msgspec.Struct, frozen=True):
    """One revision of a story. Partitioned by ``(shard, period)``, where ``period`` is chosen deterministically
    by the writer (the story builder: the bucket whose processing emitted the revision); ``(story_id, revision)``
    is unique."""

    shard: int
    period: int
    story_id: str
    revision: int
    final: bool
    merged_into: str | None
    emitted_ms: int
    body: bytes


_HEX_DIGITS = frozenset("0123456789abcdef")


def story_id(shard: int, key: int) -> str:
    """A story's id: its shard and a 64-bit key (``s0003-00000000000000ff``). The id names the shard so that a
    lookup by id knows which shard's index to read."""
    return f"s{shard:04x}-{key:016x}"


def story_id_shard(sid: str) -> int | None:
    """The shard a story id names, ``None`` for a string that is not a story id."""
    head, sep, _ = sid.partition("-")
    digits = head[1:]
    if not sep or head[:1] != "s" or len(digits) < 4 or not set(digits) <= _HEX_DIGITS:
        return None
    return int(digits, 16)


HOUR_MS = 3_600_000


class PartitionPage(msgspec.Struct, frozen=True):
    """One page of a partition read: complete events in clustering order, plus accounting."""

    events: list[EventRecord]
    rows: int  # rows fetched for this page
    bytes: int  # payload bytes fetched for this page
    incomplete: int  # incomplete chunk sets skipped so far in this partition (cumulative)


class BucketHint(NamedTuple):
    """A bucket that received events, and an upper bound of its largest row (for page sizing)."""

    bucket: int
    max_row_bytes: int


class Commit(NamedTuple):
    """One offset move for :meth:`engine.store.protocol.Store.commit_many`."""

    shard: int
    epoch: int
    read_bucket: int
    replay_bucket: int


class AppendResult(msgspec.Struct, frozen=True):
    events: int
    rows: int
    bytes: int
    statements: int  # batches and single statements sent (not counting retries)
    retries: int


class Offset(msgspec.Struct, frozen=True):
    """A consumer's position in one shard.

    ``read_bucket``: every bucket <= it is consumed and everything derived from it is durable.
    ``replay_bucket``: the oldest bucket still needed to rebuild in-memory state after a crash.
    ``owner`` / ``epoch``: the current owner and its fencing token; each claim increments the epoch.
    ``lease_expires_ms``: when the owner's lease on the shard ends unless renewed (its clock, ms since the epoch);
    0: released; None: never leased (a shard claimed before leases existed). A group member takes over only a
    shard whose lease has ended.
    """

    consumer: str
    shard: int
    read_bucket: int
    replay_bucket: int
    owner: str
    epoch: int
    updated_ms: int
    lease_expires_ms: int | None = None


class Member(msgspec.Struct, frozen=True):
    """A running instance of a group (``storyline run --group``): ``member`` its id (unique per start), where it
    runs, how many worker slots it offers, when it started and last said it is alive (its clock, ms)."""

    member: str
    host: str
    pid: int
    workers: int
    started_ms: int
    heartbeat_ms: int


class StoryPeriod(NamedTuple):
    """A ``stories`` partition that holds rows: its ``period`` and ``shard``, and whether a drain ``sealed`` it
    (wrote its revisions there after the shard's checkpoint committed that bucket, and nothing will be added)."""

    period: int
    shard: int
    sealed: bool


class FeedPosition(msgspec.Struct, frozen=True):
    """Where a story feed reader is: the last revision it delivered and committed, in emission order — ``(period,
    shard, story_id, revision)``. ``story_id`` "" with revision -1 stands before the first revision of that
    (period, shard)."""

    reader: str
    period: int
    shard: int
    story_id: str
    revision: int
    updated_ms: int = 0

    def key(self) -> tuple[int, int, str, int]:
        return (self.period, self.shard, self.story_id, self.revision)


class DeadLetter(msgspec.Struct, frozen=True):
    """A rejected input line, kept with everything needed to understand and redrive it."""

    dl_id: str
    received_ms: int
    file: str
    line: int
    reason: str
    raw: bytes  # the rejected line; at most DEAD_LETTER_RAW_MAX bytes of it (``raw_bytes`` then says how long it was)
    redriven_ms: int | None = None
    raw_bytes: int | None = None  # set when ``raw`` was cut: the line's length; such a line cannot be redriven

    @property
    def cut(self) -> bool:
        return self.raw_bytes is not None


DEAD_LETTER_RAW_MAX = 64 * 1024
"""A dead letter keeps at most this much of its line: a 20 MB rejected line is evidence, not data to store whole
(``DeadLetter.raw_bytes`` keeps its length)."""


__all__ = [
    "DEAD_LETTER_RAW_MAX",
    "HOUR_MS",
    "AppendResult",
    "BucketHint",
    "Commit",
    "DeadLetter",
    "EventRecord",
    "Member",
    "Offset",
    "PartitionPage",
    "StoryRecord",
    "story_id",
    "story_id_shard",
]


class EvidenceRecord(NamedTuple):
    """One shard's evidence of sensor clock offsets in one epoch (``Store.put_offset_evidence``): ``body`` is the
    encoded :class:`engine.correlate.offsets.EvidenceRow`. A later record of the same (epoch, shard) replaces it."""

    epoch: int
    shard: int
    body: bytes
