"""Splitting event payloads into chunk rows and putting them back together (pure, no I/O).

An event is stored as rows ``(event_id, chunk)`` with ``chunk`` 0..n-1; row 0 carries ``chunks = n``. A reader
yields an event only when row 0 and every later row are present, in order; anything else is an incomplete
chunk set, skipped and counted (its writer never saw it durable, so it was never acknowledged).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine.core.errors import StoreError
from engine.core.records import BucketHint, EventRecord


def split(payload: bytes, chunk_bytes: int) -> list[bytes]:
    """The chunk payloads of one event: one piece if it fits, else pieces of at most ``chunk_bytes``."""
    if len(payload) <= chunk_bytes:
        return [payload]
    return [payload[i : i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)]


_DONE = -2
_BROKEN = -1


class Assembler:
    """Feeds on rows in clustering order, across page boundaries, and emits complete events.

    ``feed`` returns the events completed by these rows. Rows of an event that continue on the next page are
    held until the next ``feed``; ``finish`` closes the partition. ``incomplete`` counts skipped chunk sets.
    """

    __slots__ = ("_chunks", "_expect", "_id", "_parts", "incomplete")

    def __init__(self) -> None:
        self._id: str | None = None
        self._expect = 0
        self._chunks = _DONE
        self._parts: list[bytes] = []
        self.incomplete = 0

    def _close_group(self) -> None:
        # Called when a new event id starts or the partition ends: an open group there is incomplete.
        if self._id is not None and self._chunks != _DONE:
            self.incomplete += 1
        self._parts = []

    def feed(self, rows: Iterable[tuple[str, int, int | None, bytes]]) -> list[EventRecord]:
        """Rows are ``(event_id, chunk, chunks_or_None, payload)`` in (event_id, chunk) order."""
        out: list[EventRecord] = []
        for event_id, chunk, chunks, payload in rows:
            if event_id != self._id:
                self._close_group()
                self._id = event_id
                self._expect = 0
                self._chunks = chunks if (chunk == 0 and chunks is not None and chunks > 0) else _BROKEN
            if self._chunks < 0:
                continue  # broken set, or rows past a completed event: skip
            if chunk != self._expect:
                self._chunks = _BROKEN
                self._parts = []
                continue
            self._parts.append(payload)
            self._expect += 1
            if self._expect == self._chunks:
                parts = self._parts
                out.append(EventRecord(event_id, parts[0] if len(parts) == 1 else b"".join(parts)))
                self._parts = []
                self._chunks = _DONE
        return out

    def feed_fast(self, rows: list[tuple[str, int, int | None, bytes]]) -> list[EventRecord]:
        """:meth:`feed`, with a fast path for the common page: no open group and every row a whole event
        (chunk 0 of 1); any other page goes through the general loop."""
        if (self._id is None or self._chunks == _DONE) and all([r[2] == 1 for r in rows]):
            if rows and rows[0][0] == self._id:  # rows past an event already completed: general path
                return self.feed(rows)
            if rows:
                self._id = rows[-1][0]
                self._chunks = _DONE
            return [EventRecord(r[0], r[3]) for r in rows]
        return self.feed(rows)

    def finish(self) -> None:
        """End of partition: count a trailing open set as incomplete."""
        self._close_group()
        self._id = None
        self._chunks = _DONE


def iter_rows(event: EventRecord, chunk_bytes: int) -> list[tuple[int, int | None, bytes]]:
    """``(chunk, chunks_or_None, piece)`` for each row of one event (most events: one row)."""
    if len(event.payload) <= chunk_bytes:
        return [(0, 1, event.payload)]
    pieces = split(event.payload, chunk_bytes)
    return [(i, (len(pieces) if i == 0 else None), piece) for i, piece in enumerate(pieces)]


Row = tuple[str, int, int | None, bytes]


def group_rows(events: Iterable[EventRecord], chunk_bytes: int, batch_bytes: int) -> list[list[Row]]:
    """The rows of ``events`` cut into groups: each group is one UNLOGGED batch (or a single statement when
    it holds one row) of at most ``batch_bytes`` estimated bytes. A chunk bigger than ``batch_bytes`` goes
    alone."""
    groups: list[list[Row]] = []
    cur: list[Row] = []
    cur_bytes = 0
    for ev in events:
        for chunk, chunks, piece in iter_rows(ev, chunk_bytes):
            size = row_bytes(ev.event_id, piece)
            if size >= batch_bytes:
                groups.append([(ev.event_id, chunk, chunks, piece)])
                continue
            if cur and cur_bytes + size > batch_bytes:
                groups.append(cur)
                cur, cur_bytes = [], 0
            cur.append((ev.event_id, chunk, chunks, piece))
            cur_bytes += size
    if cur:
        groups.append(cur)
    return groups


def max_size_class(groups: Iterable[list[Row]]) -> int:
    return max(size_class(row_bytes(eid, piece)) for g in groups for eid, _, _, piece in g)


def hints(
    rows: Iterable[tuple[int, int, int]], shards: Sequence[int], first: int, last: int
) -> dict[int, list[BucketHint]]:
    """``(bucket, shard, size_class)`` index rows, in any order → per wanted shard, one hint per bucket in
    ``[first, last]`` (ascending) carrying its largest row class."""
    wanted = set(shards)
    best: dict[tuple[int, int], int] = {}
    for bucket, shard, cls in rows:
        if shard in wanted and first <= bucket <= last and cls > best.get((shard, bucket), -1):
            best[(shard, bucket)] = cls
    out: dict[int, list[BucketHint]] = {}
    for (shard, bucket), cls in sorted(best.items()):
        out.setdefault(shard, []).append(BucketHint(bucket, 1 << cls))
    return out


def check_event_sizes(events: Iterable[EventRecord], max_event_bytes: int) -> None:
    for ev in events:
        if len(ev.payload) > max_event_bytes:
            raise StoreError(f"event {ev.event_id!r}: payload of {len(ev.payload)} bytes exceeds max_event_bytes")
        if not ev.event_id:
            raise StoreError("event with an empty event_id")


# Per-row overhead estimate (keys, cell headers) used when sizing batches and pages.
ROW_OVERHEAD = 48


def row_bytes(event_id: str, piece: bytes) -> int:
    """What one event row weighs for page sizing: payload, id and a fixed overhead."""
    return len(piece) + len(event_id) + ROW_OVERHEAD


def size_class(nbytes: int) -> int:
    """The power-of-two class of a row size: ``1 << size_class(n) >= n``."""
    return max(0, (nbytes - 1).bit_length())
