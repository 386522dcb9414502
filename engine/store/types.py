"""Records that cross the store interface. Times are int64 UTC milliseconds."""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from engine.records import EventRecord, StoryRecord, story_id, story_id_shard

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
    """One offset move for :meth:`engine.store.base.Store.commit_many`."""

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
    """

    consumer: str
    shard: int
    read_bucket: int
    replay_bucket: int
    owner: str
    epoch: int
    updated_ms: int


class DeadLetter(msgspec.Struct, frozen=True):
    """A rejected input line, kept with everything needed to understand and redrive it."""

    dl_id: str
    received_ms: int
    file: str
    line: int
    reason: str
    raw: bytes
    redriven_ms: int | None = None


__all__ = [
    "HOUR_MS",
    "AppendResult",
    "BucketHint",
    "Commit",
    "DeadLetter",
    "EventRecord",
    "Offset",
    "PartitionPage",
    "StoryRecord",
    "story_id",
    "story_id_shard",
]
