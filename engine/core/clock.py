"""Injectable clocks. Times are int64 UTC milliseconds since the epoch; nothing here is naive."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

from engine.core.errors import ClockSkewError


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """Wall clock (``time.time_ns``), UTC by definition."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to: for tests, and to inject jumps (backwards too)."""

    def __init__(self, start_ms: int) -> None:
        self._now = start_ms

    def now_ms(self) -> int:
        return self._now

    def set(self, ms: int) -> None:
        self._now = ms

    def advance(self, ms: int) -> None:
        self._now += ms


SYSTEM_CLOCK = SystemClock()


class Offset(NamedTuple):
    """One measurement of the database's clock against a local clock."""

    offset_ms: int  # the database's clock minus the local clock, at the midpoint of the round trip
    round_trip_ms: int
    at_ms: int  # the local clock when the answer arrived


async def database_offset(clock: Clock, server_time_ms: Callable[[], Awaitable[int]]) -> Offset:
    """Ask the database for its time (``server_time_ms``: e.g. ``store.server_time_ms``) and compare it with
    ``clock`` at the midpoint of the round trip."""
    t0 = clock.now_ms()
    server = await server_time_ms()
    t1 = clock.now_ms()
    return Offset(server - (t0 + t1) // 2, t1 - t0, t1)


async def measure_skew(
    clock: Clock, server_time_ms: Callable[[], Awaitable[int]], max_clock_skew_ms: int, advice: str
) -> Offset:
    """:func:`database_offset`, refused with :class:`ClockSkewError` when it exceeds ``max_clock_skew_ms`` (plus
    half the round trip, the measurement's own uncertainty). ``advice`` ends the error message."""
    m = await database_offset(clock, server_time_ms)
    skew = m.offset_ms
    if abs(skew) > max_clock_skew_ms + m.round_trip_ms // 2:
        raise ClockSkewError(
            f"this host's clock is {-skew:+d} ms off the database's (max_clock_skew_ms = {max_clock_skew_ms}){advice}"
        )
    return m
