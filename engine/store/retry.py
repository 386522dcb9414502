"""Bounded retries of idempotent store calls (backoff with jitter, deadlines) and running calls concurrently.
What is retriable is decided by :mod:`engine.store.classify`."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from engine.core.clock import Clock
from engine.core.config import StoreConfig
from engine.core.errors import StoreError, StorylineError, WriteTooLateError

T = TypeVar("T")


class RetryStats:
    __slots__ = ("giveups", "retries")

    def __init__(self) -> None:
        self.retries = 0
        self.giveups = 0


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    settings: StoreConfig,
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
    s = settings
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
