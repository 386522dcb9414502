"""Splitting event payloads into chunk rows and putting them back together (pure, no I/O).

An event is stored as rows ``(event_id, chunk)`` with ``chunk`` 0..n-1; row 0 carries ``chunks = n``. A reader
yields an event only when row 0 and every later row are present, in order; anything else is an incomplete
chunk set, skipped and counted (its writer never saw it durable, so it was never acknowledged).
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.core.records import EventRecord


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
