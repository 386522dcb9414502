"""``python -m bench.correlate``: the vectorized link step against the per-event Python baseline, on one core.

Data (generated vectorized with polars, deterministic for a seed): about ``n_events`` events in about
``n_events / 5`` stories. A story is one flow hash (random UInt64) with 1..9 events (uniform, mean 5) spread
uniformly over ``[start, start + window]``, so every event of a story links to every other one. A fifth of the
stories reuse the flow of an earlier story and start ``window + 1 .. 2 * window`` after that story's window
ends: linked only if the window is ignored, so the window matters. One percent of the events is noise: half
with no flow (null key), half with a flow of their own; each is a story by itself. Times are µs over one hour;
the frame is in arrival (time) order. The expected number of stories is known by construction and checked,
and the baseline's labels must equal :func:`engine.correlate.link.link`'s row for row.

Timing: best of 3 for ``link`` (single key: its fast path), for ``link(..., fast_path=False)`` (the general
edge-list path that several keys will use) and for the baseline, all on the same full data set. The baseline
is timed on Python lists; converting the frame to lists is not counted against it.

Threads: when run as a script this module sets ``POLARS_MAX_THREADS=1`` (unless already set in the
environment) before polars is imported, so ``link`` runs on one core like the baseline. Imported from a
process that has already loaded polars, the setting cannot take effect; :func:`run` reports the thread-pool
size it actually ran with (``polars_threads``).
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("POLARS_MAX_THREADS", "1")

import argparse
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import polars as pl

from bench.correlate_baseline import link_baseline
from engine.correlate.link import link

T = TypeVar("T")

WINDOW_US = 30_000_000  # 30 s
SPAN_US = 3_600_000_000  # one hour of events
MAX_STORY = 9
NOISE_FRACTION = 0.01
REUSE_FRACTION = 0.2

_U64 = pl.UInt64
_GOLDEN = 0x9E3779B97F4A7C15


def _u64(value: int) -> pl.Expr:
    return pl.lit(value, dtype=_U64)


def _mix64(z: int) -> int:
    """The splitmix64 finalizer on a Python int."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
    return z ^ (z >> 31)


def _random(counter: pl.Expr, stream: int, seed: int) -> pl.Expr:
    """A uniform UInt64 per row: splitmix64 of a per-(seed, stream) random start plus counter * golden gamma.

    Wrapping UInt64 arithmetic, the same on every polars version (unlike ``Expr.hash``). The starts of the
    streams are themselves mixed, so two streams never run through the same states for these counters.
    """
    start = _mix64((seed << 16 | stream) * _GOLDEN % 2**64)
    z = counter.cast(_U64) * _u64(_GOLDEN) + _u64(start)
    z = (z.xor(z // _u64(2**30))) * _u64(0xBF58476D1CE4E5B9)
    z = (z.xor(z // _u64(2**27))) * _u64(0x94D049BB133111EB)
    return z.xor(z // _u64(2**31))


def _below(counter: pl.Expr, stream: int, seed: int, bound: int) -> pl.Expr:
    """A uniform Int64 in ``0 .. bound - 1`` per row (modulo bias is negligible for these bounds)."""
    return (_random(counter, stream, seed) % _u64(bound)).cast(pl.Int64)


def make_events(n_events: int, window: int = WINDOW_US, seed: int = 7) -> tuple[pl.DataFrame, int]:
    """Columns ``flow`` (UInt64, nullable) and ``t`` (Int64 µs), in time order; and the number of stories."""
    noise = int(n_events * NOISE_FRACTION)
    n_stories = max((n_events - noise) // ((1 + MAX_STORY) // 2), 1)
    reused = int(n_stories * REUSE_FRACTION)
    fresh = n_stories - reused
    s = pl.col("s")
    first = pl.DataFrame({"s": pl.int_range(0, fresh, eager=True)}).select(
        s, _random(s, 1, seed).alias("flow"), _below(s, 2, seed, SPAN_US).alias("start")
    )
    # Story fresh + j reuses story j's flow and starts window + 1 + r (r < window) after story j's window ends.
    second = first.head(reused).select(
        (s + fresh).alias("s"),
        pl.col("flow"),
        pl.col("start") + 2 * window + 1 + _below(s, 3, seed, window),
    )
    stories = pl.concat([first, second]).with_columns((_below(s, 4, seed, MAX_STORY) + 1).alias("size"))
    events = (
        stories.select(pl.col("flow").repeat_by("size"), pl.col("start").repeat_by("size"))
        .explode("flow", "start")
        .with_row_index("e")
        .select(pl.col("flow"), (pl.col("start") + _below(pl.col("e"), 5, seed, window + 1)).alias("t"))
    )
    n = pl.col("n")
    lone = pl.DataFrame({"n": pl.int_range(0, noise, eager=True)}).select(
        pl.when(n % 2 == 0).then(_random(n, 6, seed)).otherwise(None).alias("flow"),
        _below(n, 7, seed, SPAN_US + 3 * window).alias("t"),
    )
    df = pl.concat([events, lone]).sort("t", maintain_order=True)
    return df, n_stories + noise


def _best_of(rounds: int, fn: Callable[[], T]) -> tuple[float, T]:
    best = float("inf")
    out: T | None = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    assert out is not None
    return best, out


def run(n_events: int = 1_000_000) -> dict[str, float]:
    """Generate the data, time ``link`` (fast and general path) and the baseline; check they agree."""
    df, expected = make_events(n_events)
    keys = [("flow", WINDOW_US)]
    t_link, labels = _best_of(3, lambda: link(df, keys))
    t_general, general = _best_of(3, lambda: link(df, keys, fast_path=False))
    flows, times = df["flow"].to_list(), df["t"].to_list()
    t_base, base = _best_of(3, lambda: link_baseline([(flows, WINDOW_US)], times))
    stories = labels.n_unique()
    if stories != expected:
        raise SystemExit(f"bench correlate: link found {stories} stories, the data has {expected}")
    if not general.equals(labels):
        raise SystemExit("bench correlate: the general path disagrees with the fast path")
    if base != labels.to_list():
        raise SystemExit("bench correlate: the baseline disagrees with link")
    events = df.height
    return {
        "events": float(events),
        "stories": float(stories),
        "link_events_per_s": events / t_link,
        "link_general_events_per_s": events / t_general,
        "baseline_events_per_s": events / t_base,
        "link_vs_baseline_ratio": t_base / t_link,
        "link_general_vs_baseline_ratio": t_base / t_general,
        "polars_threads": float(pl.thread_pool_size()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.correlate", description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    r = run(args.events)
    print(
        f"{r['events']:,.0f} events, {r['stories']:,.0f} stories, window {WINDOW_US / 1e6:g} s, "
        f"polars threads {r['polars_threads']:.0f}, best of 3 each"
    )
    print(
        f"link (fast path)     {r['link_events_per_s']:>14,.0f} events/s  {r['link_vs_baseline_ratio']:>6.1f}x baseline"
    )
    print(
        f"link (general path)  {r['link_general_events_per_s']:>14,.0f} events/s  "
        f"{r['link_general_vs_baseline_ratio']:>6.1f}x baseline"
    )
    print(f"baseline (Python)    {r['baseline_events_per_s']:>14,.0f} events/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
