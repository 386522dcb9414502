"""The store interface (the protocol every backend implements) and the error a refused commit raises. Two
implementations share its semantics (proven by tests/conformance):
:class:`engine.store.cql.CqlStore` (ScyllaDB / Cassandra via scyllapy) and
:class:`engine.store.embedded.EmbeddedStore` (SQLite).

Tables (one keyspace per tenant; see docs/architecture.md):

* ``events`` — ``PRIMARY KEY ((shard, bucket), event_id, chunk)``: the queue. Append-only, expired by TTL.
* ``bucket_index`` — ``PRIMARY KEY ((shard_group, slot), bucket, shard, size_class)``: which buckets of which
  shard received events, written before the event rows so a reader may skip buckets absent here. One partition
  holds 16 consecutive shards for 15 minutes: writes spread over many partitions (no hot partition), while a
  worker polls its shards with one query per 16 shards. ``size_class`` bounds the largest row of each write (a
  power of two), so readers can bound their pages in bytes.
* ``read_offsets`` — ``PRIMARY KEY ((consumer, shard_group), shard)``: positions, owner and epoch per shard;
  changed only by conditional writes so a stale owner cannot move them; 16 shards share a partition so one
  conditional batch commits them together.
* ``stories`` — ``PRIMARY KEY ((shard, period), story_id, revision)``.
* ``story_periods`` — ``PRIMARY KEY ((slot), period, shard)``: which ``stories`` partitions hold rows (written with
  them), and ``sealed`` when a drain has finished writing one after its checkpoint (the story feed reads these).
* ``feed_readers`` — ``PRIMARY KEY (reader)``: each story feed reader's committed position (no TTL).
* ``stage_marks`` — ``PRIMARY KEY ((consumer, shard, slot), bucket, part)``: small records a stage writes at a
  bucket and reads back when it replays (the story builder: the stories that left its state in that bucket, so a
  replay can start after the oldest story still held instead of before every story that overlaps it).
* ``dead_letter`` — ``PRIMARY KEY (dl_id)``.
* ``meta`` — ``PRIMARY KEY (key)``: creation time, schema version, and the tenant's fixed settings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from engine.core.errors import FencedError
from engine.core.records import (
    AppendResult,
    BucketHint,
    Commit,
    DeadLetter,
    EventRecord,
    EvidenceRecord,
    FeedPosition,
    Member,
    Offset,
    PartitionPage,
    StoryPeriod,
    StoryRecord,
)


@runtime_checkable
class Store(Protocol):
    """Async store interface. Every method is safe to retry as a whole: writes are idempotent upserts, and
    offset changes are conditional on the owner epoch."""

    async def open(self) -> None:
        """Connect; for an existing tenant also check that its fixed settings match the config."""

    async def close(self) -> None: ...

    async def init_schema(self) -> list[str]:
        """Create or migrate the tenant's schema idempotently; return one line per action taken."""

    async def drop_schema(self) -> None:
        """Drop the tenant's keyspace (CQL) or tables (embedded) with all their data. Irreversible."""

    async def read_meta(self) -> dict[str, str]: ...

    async def server_time_ms(self) -> int:
        """The database's clock, for the clock-skew check at start-up."""

    # -- events: the queue -------------------------------------------------------------------------------
    async def append(
        self, shard: int, bucket: int, events: Sequence[EventRecord], *, deadline_ms: int | None = None
    ) -> AppendResult:
        """Make ``events`` durable in partition ``(shard, bucket)``: index row first, then event rows in
        UNLOGGED single-partition batches of at most ``store.batch_bytes`` (larger events as single
        statements, one per chunk). Returns only when every row is acknowledged at the configured consistency.
        No attempt starts after ``deadline_ms``: then :class:`WriteTooLateError` (retriable; pick a newer
        bucket). Transient failures are retried with bounded backoff."""

    def read_partition(
        self, shard: int, bucket: int, *, max_row_bytes: int | None = None
    ) -> AsyncIterator[PartitionPage]:
        """The whole partition in clustering order, in pages of at most ``store.page_rows`` rows and
        ``store.page_bytes_max`` bytes (about ``store.page_bytes``), each query bounded by clustering key.
        ``max_row_bytes`` is the bound from :meth:`nonempty_buckets`; without it the store looks it up.
        Incomplete chunk sets are skipped and counted."""

    async def inject_rows(self, shard: int, bucket: int, rows: Sequence[tuple[str, int, int | None, bytes]]) -> None:
        """Fault injection: write raw ``(event_id, chunk, chunks, payload)`` rows (no index row, no checks), as a
        producer that died in the middle of a chunked event leaves them. For tests and the chaos suite."""

    async def nonempty_buckets(self, shard: int, first: int, last: int) -> list[BucketHint]:
        """Buckets in ``[first, last]`` of ``shard`` that may hold events (from ``bucket_index``), ascending,
        each with the bound of its largest row."""

    async def scan_index(self, shards: Sequence[int], first: int, last: int) -> dict[int, list[BucketHint]]:
        """:meth:`nonempty_buckets` for many shards at once: one query per 16-shard group and 15-minute slot of
        the range (callers bound the range: a worker never looks further back than its offsets). Shards with
        nothing in the range are absent from the result."""

    # -- offsets -------------------------------------------------------------------------------------------
    async def claim(
        self, consumer: str, shard: int, owner: str, initial_bucket: int, *, lease_until_ms: int | None = None
    ) -> Offset:
        """Take ownership of a shard: the epoch increments, fencing out the previous owner (whatever its lease:
        a static ``--shards`` start takes its shards). A shard never claimed before starts with ``read_bucket =
        initial_bucket`` and nothing to replay (``replay_bucket = initial_bucket + 1``). ``lease_until_ms``: the
        new owner's lease ends then (None: the row's lease is left as it is)."""

    async def claim_many(
        self,
        consumer: str,
        shards: Sequence[int],
        owner: str,
        initial_bucket: int,
        *,
        lease_until_ms: int | None = None,
        free_at_ms: int | None = None,
    ) -> list[Offset]:
        """:meth:`claim` for several shards (one conditional batch per 16-shard offsets partition on CQL), by
        shard. ``free_at_ms`` (a group member's takeover): only the shards whose lease has ended by then (never
        leased, released, or ``lease_expires_ms <= free_at_ms``) are taken — atomically with that check, so a
        lease renewed meanwhile is never taken over; the others are left out of the result."""

    async def renew_leases(
        self, consumer: str, owner: str, leases: Sequence[tuple[int, int]], until_ms: int
    ) -> list[int]:
        """Extend this owner's leases, ``(shard, epoch)`` each, to ``until_ms`` (conditional on owner and epoch,
        and on the lease not being released: one batch per offsets partition on CQL). Returns the shards refused:
        another claim took them, or their lease was released (a renewal sent before a handover's release and
        applied after it must not hold the shard back from its next owner). Repeating a renewal that was applied
        is harmless."""

    async def release_leases(self, consumer: str, owner: str, leases: Sequence[tuple[int, int]]) -> None:
        """End this owner's leases now (``lease_expires_ms = 0``; owner and epoch stay, so the next claim fences
        it): a graceful leave hands its shards over without waiting for the lease to run out. Leases another
        claim took already are left alone."""

    # -- group members -------------------------------------------------------------------------------------
    async def heartbeat(self, consumer: str, member: Member, ttl_ms: int) -> None:
        """Record (or refresh) a member of the group ``consumer``; the row disappears ``ttl_ms`` after its last
        heartbeat if the member stops sending them."""

    async def leave(self, consumer: str, member: str) -> None:
        """Remove a member's row now (a graceful stop)."""

    async def read_members(self, consumer: str) -> list[Member]:
        """The group's members whose rows have not expired, by member id."""

    async def commit(
        self, consumer: str, shard: int, owner: str, epoch: int, read_bucket: int, replay_bucket: int
    ) -> None:
        """Move the offsets if ``epoch`` is still current and ``read_bucket`` does not go backwards; else
        :class:`FencedError`. Repeating a commit that was applied is harmless."""

    async def commit_many(self, consumer: str, owner: str, commits: Sequence[Commit]) -> list[int]:
        """Several :meth:`commit` at once (one conditional batch per 16-shard offsets partition on CQL, one
        transaction on SQLite). Returns the shards whose commit was refused (stale epoch or backwards); the
        others are applied."""

    async def read_offsets(self, consumer: str, shards: Sequence[int]) -> list[Offset]:
        """The offsets of the given shards that exist, by shard."""

    # -- stories, dead letters -----------------------------------------------------------------------------
    async def put_stories(self, stories: Sequence[StoryRecord]) -> None: ...

    def read_stories(self, shard: int, period: int) -> AsyncIterator[list[StoryRecord]]:
        """One ``(shard, period)`` partition in ``(story_id, revision)`` order, paged."""

    async def get_story(self, story_id: str) -> StoryRecord | None:
        """The latest stored revision of a story: the one of the latest ``period``, then the latest
        ``emitted_ms``, then the highest revision (a story built again after it left the state restarts at
        revision 1 in a later period). Found when ``story_id`` names the shard it is stored under
        (:func:`engine.core.records.story_id`, as the story builder makes ids) and that period began less than
        ``ttl_ms`` ago. ``None``: unknown or expired."""

    def scan_stories(self) -> AsyncIterator[list[StoryRecord]]:
        """Every stored story revision, paged, in no particular order."""

    async def story_periods(self, first: int, last: int) -> list[StoryPeriod]:
        """The ``stories`` partitions with rows whose period lies in ``[first, last]``, by (period, shard). The CQL
        store reads one partition per 15-minute slot of the range: callers bound it (the feed: by the TTL)."""

    async def seal_periods(self, periods: Sequence[tuple[int, int]]) -> None:
        """Mark these (period, shard) partitions sealed: every revision that will ever be written there is durable
        (a drain calls it after writing its revisions at the shard's committed bucket)."""

    # -- story feed readers ------------------------------------------------------------------------------
    async def read_feed_position(self, reader: str) -> FeedPosition | None:
        """The reader's committed position; None for a reader that never committed."""

    async def commit_feed_position(self, position: FeedPosition) -> None:
        """Store the reader's position (an upsert: one process per reader name)."""

    # -- stage marks -------------------------------------------------------------------------------------
    async def put_marks(
        self, consumer: str, shard: int, bucket: int, parts: Sequence[bytes], *, first_part: int = 0
    ) -> None:
        """Store a stage's marks for one bucket of one shard as rows ``(bucket, part)`` (part = ``first_part`` +
        position in ``parts``): an idempotent upsert, so a replay may write the same marks again."""

    async def read_marks(self, consumer: str, shard: int, first: int, last: int) -> list[tuple[int, bytes]]:
        """The marks of buckets ``[first, last]``, ascending by ``(bucket, part)``."""

    async def put_offset_evidence(self, consumer: str, rows: Sequence[EvidenceRecord]) -> None:
        """Write shards' evidence of sensor clock offsets, one row per (epoch, shard) (a later write replaces it),
        kept for ttl_ms."""

    async def read_offset_evidence(self, consumer: str, epochs: Sequence[int]) -> list[EvidenceRecord]:
        """Every shard's evidence row of these epochs (in no particular order)."""

    async def create_offset_table(self, consumer: str, epoch: int, body: bytes) -> bytes:
        """Store the offset table of ``epoch`` unless one is stored already (first writer wins: a lightweight
        transaction on CQL); returns the stored body — ours or the earlier one. Kept for ttl_ms."""

    async def read_offset_table(self, consumer: str, epoch: int) -> bytes | None: ...

    async def latest_offset_table(self, consumer: str, before: int) -> tuple[int, bytes] | None:
        """The newest stored table of an epoch before ``before`` — looked for in the partitions of ``before - 1``
        and the one before it (up to 2 x OFFSET_TABLE_SLOT epochs back); None: none there."""

    async def put_dead_letters(self, letters: Sequence[DeadLetter]) -> None: ...

    def scan_dead_letters(self) -> AsyncIterator[list[DeadLetter]]:
        """Every dead letter, paged, in no particular order."""

    async def purge_expired(self) -> int:
        """Remove rows past their TTL where the backend does not do it itself; return how many."""


def lease_ended(cur: Offset, at_ms: int) -> bool:
    """Whether a shard's lease has ended by ``at_ms``: never leased, released (0), or run out."""
    return cur.lease_expires_ms is None or cur.lease_expires_ms <= at_ms


def raise_fenced(shard: int, owner: str, epoch: int, read_bucket: int, cur: Offset | None) -> None:
    if cur is None:
        raise FencedError(f"commit shard {shard}: no offset row (claim the shard first)")
    if cur.epoch != epoch:
        raise FencedError(
            f"commit shard {shard}: epoch {epoch} of {owner} is stale; shard now owned by {cur.owner} epoch {cur.epoch}"
        )
    raise FencedError(f"commit shard {shard}: read_bucket would move backwards from {cur.read_bucket} to {read_bucket}")
