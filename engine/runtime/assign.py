"""Shard assignment: pure functions, tested without any database.

A Storyline instance owns an inclusive range of shard numbers (``--shards A-B``); its supervisor splits the
range among its workers in contiguous, disjoint, balanced slices: contiguous so a worker's shards share
``bucket_index`` partitions (16 consecutive shards each), balanced so no worker gets more than one shard more
than another.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.core.errors import ConfigError


def parse_range(text: str | None, shards: int) -> range:
    """``"A-B"`` (inclusive) or ``"A"`` → ``range(A, B + 1)`` within ``0 … shards-1``; ``None`` → all."""
    if text is None:
        return range(shards)
    lo_s, sep, hi_s = text.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
    except ValueError:
        raise ConfigError("--shards", f"{text!r} must be A-B (inclusive shard numbers) or A") from None
    if not 0 <= lo <= hi < shards:
        raise ConfigError("--shards", f"{text!r} must lie within 0-{shards - 1} with A <= B")
    return range(lo, hi + 1)


def split(owned: range, workers: int) -> list[range]:
    """Split ``owned`` into ``min(workers, len(owned))`` contiguous slices whose sizes differ by at most one.

    Complete (every shard in exactly one slice), disjoint, in order. A worker count above the number of shards
    gives one shard per worker (no idle workers).
    """
    if workers < 1:
        raise ConfigError("workers", "must be >= 1")
    n = min(workers, len(owned))
    if n == 0:
        return []
    base, extra = divmod(len(owned), n)
    out: list[range] = []
    start = owned.start
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def format_ranges(shards: Iterable[int]) -> str:
    """Shard numbers as inclusive ranges, the way ``--shards`` writes one: ``[5, 0, 1, 2]`` → ``"0-2, 5"``."""
    out: list[str] = []
    ordered = sorted(set(shards))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(f"{ordered[i]}-{ordered[j]}" if j > i else f"{ordered[i]}")
        i = j + 1
    return ", ".join(out)
