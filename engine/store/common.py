"""Pieces shared by both stores: retries, page sizing, batch grouping and the schema's table options."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from engine.clock import Clock
from engine.config import Config
from engine.errors import FencedError, SchemaError, StoreError, StorylineError, WriteTooLateError
from engine.store.base import FIXED_SETTINGS
from engine.store.chunks import iter_rows
from engine.store.types import EventRecord, Offset

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
    """Chooses the LIMIT of the next partition page so that a page holds at most ``page_rows`` rows and, as
    estimated from the rows seen so far, about ``page_bytes`` bytes. A page that comes back far larger than
    planned resets the estimate to that page's average row, so one surprise costs one large page."""

    __slots__ = ("_avg", "_page_bytes", "_page_rows")

    def __init__(self, page_rows: int, page_bytes: int, first_guess_row_bytes: int) -> None:
        self._page_rows = page_rows
        self._page_bytes = page_bytes
        self._avg = float(max(first_guess_row_bytes, 64))

    def limit(self) -> int:
        return max(1, min(self._page_rows, int(self._page_bytes // self._avg)))

    def observe(self, rows: int, nbytes: int) -> None:
        if rows <= 0:
            return
        avg = nbytes / rows + ROW_OVERHEAD
        if nbytes > 2 * self._page_bytes:
            self._avg = avg
        else:
            self._avg = 0.7 * self._avg + 0.3 * avg


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
            size = len(piece) + len(ev.event_id) + ROW_OVERHEAD
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
