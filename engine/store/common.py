"""Pieces shared by both stores: retries, page sizing, batch grouping and the schema's table options."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from engine.core.clock import Clock
from engine.core.config import Config
from engine.core.errors import FencedError, SchemaError, StoreError, StorylineError, WriteTooLateError
from engine.core.records import BucketHint, EventRecord, Offset, PartitionPage
from engine.store.base import FIXED_SETTINGS
from engine.store.chunks import Assembler, iter_rows

T = TypeVar("T")

# Per-row overhead estimate (keys, cell headers) used when sizing batches and pages.
ROW_OVERHEAD = 48


class RetryStats:
    __slots__ = ("giveups", "retries")

    def __init__(self) -> None:
        self.retries = 0
        self.giveups = 0


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    cfg: Config,
    what: str,
    stats: RetryStats,
    clock: Clock,
    deadline_ms: int | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run ``op`` (which must be idempotent) and retry it on retriable :class:`StoreError`.

    At most ``store.max_retries`` retries, with exponential backoff and full jitter between
    ``store.retry_base_ms`` and ``store.retry_max_ms``. No attempt starts after ``deadline_ms``.
    """
    s = cfg.store
    attempt = 0
    while True:
        if deadline_ms is not None and clock.now_ms() > deadline_ms:
            raise WriteTooLateError(f"{what}: deadline passed before attempt {attempt + 1}; choose a newer bucket")
        try:
            return await op()
        except StoreError as exc:
            if not exc.retriable:
                raise
            if attempt >= s.max_retries:
                stats.giveups += 1
                raise StoreError(f"{what}: gave up after {attempt + 1} attempts: {exc}", retriable=True) from exc
            cap = min(s.retry_max_ms, s.retry_base_ms * (2**attempt))
            attempt += 1
            stats.retries += 1
            await sleep(random.uniform(0, cap) / 1000.0)


async def run_all(coros: Iterable[Coroutine[Any, Any, Any]]) -> None:
    """Run coroutines concurrently; on the first failure cancel the rest and raise that failure itself (not
    an ExceptionGroup), preferring a StorylineError."""
    try:
        async with asyncio.TaskGroup() as tg:
            for c in coros:
                tg.create_task(c)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        first = next((e for e in leaves if isinstance(e, StorylineError)), leaves[0])
        raise first from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


class PageSizer:
    """Chooses the LIMIT of each partition page.

    Hard bounds: at most ``page_rows`` rows and at most ``page_bytes_max`` bytes, because the LIMIT never
    exceeds ``page_bytes_max // max_row_bytes`` where ``max_row_bytes`` is the partition's largest row as
    recorded in ``bucket_index`` at write time (or the largest possible row, a full chunk, when unknown).
    Target: about ``page_bytes`` per page, from an estimate of the average row that follows what was read
    (carried across partitions by the store through ``estimate``).
    """

    __slots__ = ("_cap", "_page_bytes", "estimate")

    def __init__(self, cfg: Config, max_row_bytes: int, estimate: float) -> None:
        s = cfg.store
        self._page_bytes = s.page_bytes
        self._cap = max(1, min(s.page_rows, s.page_bytes_max // max(1, max_row_bytes)))
        self.estimate = max(64.0, min(estimate, float(max_row_bytes)))

    def limit(self) -> int:
        return max(1, min(self._cap, int(self._page_bytes // self.estimate)))

    def observe(self, rows: int, raw_bytes: int) -> None:
        if rows <= 0:
            return
        avg = raw_bytes / rows
        self.estimate = max(64.0, avg if raw_bytes > 2 * self._page_bytes else 0.5 * self.estimate + 0.5 * avg)


def row_bytes(event_id: str, piece: bytes) -> int:
    """What one event row weighs for page sizing: payload, id and a fixed overhead."""
    return len(piece) + len(event_id) + ROW_OVERHEAD


def size_class(nbytes: int) -> int:
    """The power-of-two class of a row size: ``1 << size_class(n) >= n``."""
    return max(0, (nbytes - 1).bit_length())


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


def twcs_options(cfg: Config) -> tuple[str, int]:
    """(unit, size) of the TWCS window for ``twcs_window_ms`` (validated to whole minutes)."""
    if cfg.twcs_window_ms % 86_400_000 == 0:
        return "DAYS", cfg.twcs_window_ms // 86_400_000
    if cfg.twcs_window_ms % 3_600_000 == 0:
        return "HOURS", cfg.twcs_window_ms // 3_600_000
    return "MINUTES", cfg.twcs_window_ms // 60_000


def initial_meta(cfg: Config, now_ms: int) -> dict[str, str]:
    """The ``meta`` rows ``init`` records once for a tenant (the first ``init`` wins)."""
    return {"tenant": cfg.tenant, "shards": str(cfg.shards), "bucket_ms": str(cfg.bucket_ms), "created_ms": str(now_ms)}


def check_fixed(cfg: Config, meta: dict[str, str]) -> None:
    """Refuse a config whose layout-fixing settings differ from the tenant's recorded ones."""
    for key in FIXED_SETTINGS:
        have = meta.get(key)
        want = str(getattr(cfg, key))
        if have is not None and have != want:
            raise SchemaError(
                f"{key}: tenant {cfg.tenant} was initialized with {key} = {have}, config says {want}; "
                f"changing it would misplace events (it is fixed for the tenant's life)"
            )


def raise_fenced(shard: int, owner: str, epoch: int, read_bucket: int, cur: Offset | None) -> None:
    if cur is None:
        raise FencedError(f"commit shard {shard}: no offset row (claim the shard first)")
    if cur.epoch != epoch:
        raise FencedError(
            f"commit shard {shard}: epoch {epoch} of {owner} is stale; shard now owned by {cur.owner} epoch {cur.epoch}"
        )
    raise FencedError(f"commit shard {shard}: read_bucket would move backwards from {cur.read_bucket} to {read_bucket}")
