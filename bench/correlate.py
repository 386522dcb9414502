"""``python -m bench.correlate``: the vectorized link step against the per-event Python baseline, on one core.

Data (generated vectorized with polars, deterministic for a seed): about ``n_events`` events in about
``n_events / 5`` stories. A story is one flow hash (random UInt64) with 1..9 events (uniform, mean 5) spread
uniformly over ``[start, start + window]``, so every event of a story links to every other one. A fifth of the
stories reuse the flow of an earlier story and start ``window + 1 .. 2 * window`` after that story's window
ends: linked only if the window is ignored, so the window matters. One percent of the events is noise: half
with no flow (null key), half with a flow of their own; each is a story by itself. Times are µs over one hour;
the frame is in arrival (time) order. The expected number of stories is known by construction and checked,
and the baseline's labels must equal :func:`engine.correlate.link.link`'s row for row.

Fused stories: the same events get every column the story builder keeps (:func:`full_events`: ids, one of
five sources with its own attribute schema, sensors, reversed reports, endpoints); ``link`` + labelling +
:func:`engine.correlate.fuse.fuse` (one JSON body per story) is timed against the baseline link followed by
:func:`engine.correlate.fuse.fuse_python` per story (events as Python objects; building them is not timed), and a
sample of 5,000 stories must come out equal.

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

import msgspec
import polars as pl

from engine.core.event import Event
from engine.correlate.fuse import EVENT_SCHEMA, FIGURE_ATTRS, fuse, fuse_python
from engine.correlate.link import link
from engine.testing.baseline import link_baseline

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


SOURCES = ("firewall", "endpoint", "dns", "http", "cloud")


_KEYS = {
    "firewall": "action\x1frule\x1fsrc_bytes\x1fdst_bytes\x1fsrc_packets\x1fdst_packets\x1finitiator",
    "endpoint": "process\x1fpid\x1fuser\x1fhost",
    "dns": "query\x1fanswer\x1frcode",
    "http": "method\x1fhost\x1fpath\x1fstatus\x1fuser_agent",
    "cloud": "vpc\x1faccount\x1fsrc_bytes\x1fsrc_packets\x1faction",
}


def _obj(*parts: str | pl.Expr) -> pl.Expr:
    return pl.concat_str([pl.lit(p) if isinstance(p, str) else p for p in parts])


def _attrs_json(source: pl.Expr, r: pl.Expr) -> pl.Expr:
    """A per-source attribute object as JSON text, values drawn from the row's random ``r`` (UInt64)."""
    small = (r % _u64(1000)).cast(pl.String)
    big = (r % _u64(10_000_000)).cast(pl.String)
    octet = (r % _u64(250)).cast(pl.String)
    return (
        pl.when(source == "firewall")
        .then(
            _obj('{"action":"allow","rule":"r', small, '","src_bytes":', big, ',"dst_bytes":', small)
            + _obj(',"src_packets":', octet, ',"dst_packets":', octet, ',"initiator":"src"}')
        )
        .when(source == "endpoint")
        .then(_obj('{"process":"svc', small, '.exe","pid":', small, ',"user":"u', small, '","host":"h', small, '"}'))
        .when(source == "dns")
        .then(_obj('{"query":"q', big, '.example.com","answer":"10.0.0.', octet, '","rcode":"NOERROR"}'))
        .when(source == "http")
        .then(
            _obj('{"method":"GET","host":"h', small, '.example.com","path":"/p/', big, '","status":200,')
            + pl.lit('"user_agent":"curl/8.5.0"}')
        )
        .otherwise(
            _obj('{"vpc":"vpc-', small, '","account":"', big, '","src_bytes":', big, ',"src_packets":', small)
            + pl.lit(',"action":"ACCEPT"}')
        )
    )


def full_events(df: pl.DataFrame, seed: int = 7) -> pl.DataFrame:
    """The link data (``flow``, ``t``) with every column the fused-story step reads (:data:`EVENT_SCHEMA`):
    hex event ids, one of five sources with its own attribute schema (firewall: both directions' bytes and
    packets and the initiator; cloud: one direction's), a sensor per source, 30 % reported reversed, IPv4
    TCP/UDP endpoints derived from the flow hash."""
    i = pl.int_range(0, pl.len(), dtype=pl.Int64)
    r = _random(i, 8, seed)
    source = pl.lit(pl.Series(SOURCES)).gather(_below(i, 9, seed, len(SOURCES)))
    flow = pl.col("flow")
    quad = [((flow // _u64(256**k)) % _u64(256)).cast(pl.String) for k in range(8)]
    has = flow.is_not_null()
    return (
        df.select(
            pl.concat_str([pl.lit("e"), r.cast(pl.String)]).alias("id"),
            pl.col("t"),
            flow,
            pl.lit(None, pl.UInt64).alias("story"),
            pl.lit(0, pl.Int64).alias("ingest"),
            source.alias("source"),
            pl.concat_str([source, pl.lit("-"), (_below(i, 10, seed, 2) + 1).cast(pl.String)]).alias("sensor"),
            (_below(i, 11, seed, 10) < 3).alias("reversed"),
            pl.when(has).then(pl.when(flow % _u64(3) == 0).then(17).otherwise(6)).cast(pl.Int64).alias("proto"),
            pl.when(has).then(_obj("10.", quad[0], ".", quad[1], ".", quad[2])).alias("src_ip"),
            pl.when(has).then((flow // _u64(2**24) % _u64(28_000) + 32_768).cast(pl.Int64)).alias("src_port"),
            pl.when(has).then(_obj("172.16.", quad[4], ".", quad[5])).alias("dst_ip"),
            pl.when(has).then(pl.when(flow % _u64(2) == 0).then(443).otherwise(53)).cast(pl.Int64).alias("dst_port"),
            _attrs_json(source, r).alias("attrs"),
            source.replace_strict(_KEYS).alias("akeys"),
        )
        .with_columns(
            *(pl.col("attrs").str.json_path_match(f"$.{name}").cast(pl.Int64).alias(name) for name in FIGURE_ATTRS),
            pl.col("attrs")
            .str.json_path_match("$.initiator")
            .replace_strict({"src": 1, "dst": -1}, default=None, return_dtype=pl.Int8)
            .alias("init"),
        )
        .pipe(
            lambda df: df.with_columns(  # stored fields these events do not have (session, end time): null
                *(pl.lit(None, dtype).alias(name) for name, dtype in EVENT_SCHEMA.items() if name not in df.columns)
            )
        )
        .select(list(EVENT_SCHEMA))
    )


def link_and_fuse(events: pl.DataFrame) -> pl.DataFrame:
    """The hot path of the story builder on one frame: link, label stories, fuse every story (revision 1)."""
    label = link(events, [("flow", WINDOW_US)])
    framed = events.with_columns(label.cast(pl.UInt64).alias("story"))
    heads = framed.select(pl.col("story").unique()).select(
        "story",
        pl.format("s{}", "story").alias("story_id"),
        pl.lit(1, pl.Int64).alias("revision"),
        pl.lit(True).alias("final"),
        pl.lit(False).alias("truncated"),
        pl.lit(None, pl.String).alias("predecessor"),
        pl.lit(0, pl.Int64).alias("emitted_ms"),
    )
    return fuse(framed, heads)


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
    fusion = fuse_run(df, labels)
    return {
        **fusion,
        "events": float(events),
        "stories": float(stories),
        "link_events_per_s": events / t_link,
        "link_general_events_per_s": events / t_general,
        "baseline_events_per_s": events / t_base,
        "link_vs_baseline_ratio": t_base / t_link,
        "link_general_vs_baseline_ratio": t_base / t_general,
        "polars_threads": float(pl.thread_pool_size()),
    }


def fuse_baseline(events: list[Event], labels: list[int]) -> list[bytes]:
    """Link labels (from the baseline link) → one fused story per label, event by event in Python dicts."""
    members: dict[int, list[Event]] = {}
    for e, label in zip(events, labels, strict=True):
        members.setdefault(label, []).append(e)
    enc = msgspec.json.Encoder()
    return [enc.encode(fuse_python(evs, (f"s{label}", 1, True, False, None, 0))) for label, evs in members.items()]


def fuse_run(df: pl.DataFrame, labels: pl.Series) -> dict[str, float]:
    """Link + fused-story building on full events, against link + fusion in plain Python (same semantics: the
    bodies of a sample of stories must be equal once decoded)."""
    full = full_events(df)
    t_fused, fused = _best_of(3, lambda: link_and_fuse(full))
    columns = ("id", "t", "source", "sensor", "flow", "reversed", "proto", "src_ip", "src_port", "dst_ip", "dst_port")
    evs = [
        Event(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], msgspec.json.decode(r[11]))
        for r in full.select(*columns, "attrs").iter_rows()
    ]
    flows, times = full["flow"].to_list(), full["t"].to_list()
    t_base, base = _best_of(2, lambda: fuse_baseline(evs, link_baseline([(flows, WINDOW_US)], times)))
    if len(base) != fused.height or fused.height != labels.n_unique():
        raise SystemExit("bench correlate: fusion and its baseline disagree on the number of stories")
    want = {msgspec.json.decode(b)["story_id"]: msgspec.json.decode(b) for b in base[:5000]}
    got = {
        sid: msgspec.json.decode(body)
        for sid, body in fused.filter(pl.col("story_id").is_in(list(want))).select("story_id", "body").iter_rows()
    }
    if got != want:
        raise SystemExit("bench correlate: fused stories differ from the Python baseline's")
    events = full.height
    return {
        "fuse_events_per_s": events / t_fused,
        "fuse_stories_per_s": fused.height / t_fused,
        "fuse_baseline_events_per_s": events / t_base,
        "fuse_vs_baseline_ratio": t_base / t_fused,
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
    print(
        f"link + fused stories {r['fuse_events_per_s']:>14,.0f} events/s  {r['fuse_vs_baseline_ratio']:>6.1f}x "
        f"baseline ({r['fuse_stories_per_s']:,.0f} stories/s)"
    )
    print(f"baseline (Python)    {r['fuse_baseline_events_per_s']:>14,.0f} events/s (link + fusion)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
