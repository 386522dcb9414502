"""Reading partitions in pages bounded in rows and bytes: the page sizer, row size estimates, size classes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from engine.core.config import StoreConfig
from engine.core.records import BucketHint, PartitionPage
from engine.store.chunks import ROW_OVERHEAD, Assembler


class PageSizer:
    """Chooses the LIMIT of each partition page.

    Hard bounds: at most ``page_rows`` rows and at most ``page_bytes_max`` bytes, because the LIMIT never
    exceeds ``page_bytes_max // max_row_bytes`` where ``max_row_bytes`` is the partition's largest row as
    recorded in ``bucket_index`` at write time (or the largest possible row, a full chunk, when unknown).
    Target: about ``page_bytes`` per page, from an estimate of the average row that follows what was read
    (carried across partitions by the store through ``estimate``).
    """

    __slots__ = ("_cap", "_page_bytes", "estimate")

    def __init__(self, settings: StoreConfig, max_row_bytes: int, estimate: float) -> None:
        s = settings
        self._page_bytes = s.page_bytes
        self._cap = max(1, min(s.page_rows, s.page_bytes_max // max(1, max_row_bytes)))
        self.estimate = max(64.0, min(estimate, float(max_row_bytes)))

    @classmethod
    async def for_partition(
        cls,
        settings: StoreConfig,
        max_row_bytes: int | None,
        hints: Callable[[], Awaitable[list[BucketHint]]],
        worst_row: int,
        estimate: float,
    ) -> PageSizer:
        """A sizer for one partition: its largest row is the caller's, else the bucket index's (``hints()``),
        else ``worst_row`` (a full chunk)."""
        if max_row_bytes is None:
            found = await hints()
            max_row_bytes = found[0].max_row_bytes if found else worst_row
        return cls(settings, max_row_bytes, estimate)

    def limit(self) -> int:
        return max(1, min(self._cap, int(self._page_bytes // self.estimate)))

    def observe(self, rows: int, raw_bytes: int) -> None:
        if rows <= 0:
            return
        avg = raw_bytes / rows
        self.estimate = max(64.0, avg if raw_bytes > 2 * self._page_bytes else 0.5 * self.estimate + 0.5 * avg)


Fetch = Callable[[tuple[str, int] | None, int], Awaitable[list[tuple[str, int, int | None, bytes]]]]


async def partition_pages(fetch: Fetch, sizer: PageSizer) -> AsyncIterator[PartitionPage]:
    """Page through one partition with ``fetch(cursor, limit)`` (rows after ``cursor`` in clustering order)."""
    asm = Assembler()
    cursor: tuple[str, int] | None = None
    while True:
        limit = sizer.limit()
        rows = await fetch(cursor, limit)
        nbytes = sum([len(r[3]) for r in rows])
        if rows:
            sizer.observe(len(rows), nbytes + len(rows) * (ROW_OVERHEAD + len(rows[0][0])))
        events = asm.feed_fast(rows)
        done = len(rows) < limit
        if done:
            asm.finish()
        else:
            cursor = (rows[-1][0], rows[-1][1])
        yield PartitionPage(events, len(rows), nbytes, asm.incomplete)
        if done:
            return
