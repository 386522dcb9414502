"""``python -m bench.stage``: the story builder's CPU cost at small buckets, and its replay window over time.

The simulator's default scenario is cut into partitions as a worker would read them: 16 shards (flow hash mod 16),
100 ms buckets, arrival offsets compressed ``speed`` times. One :class:`engine.correlate.story.StoryStage` is fed
every bucket in order, in one of two ways:

* ``grouped`` — what the worker does: one ``on_buckets`` call per bucket with all 16 shards (empty ones too);
* ``per-shard`` — one ``on_bucket`` call per shard and bucket (the worker's behaviour before the stage took many
  partitions per call).

The store's writes are left out (a store that accepts and drops them) so that the figure is the stage's own
CPU: link, state, fusion, marks. It is reported as a share of the simulated wall time (above 100 %: one core
cannot keep up with that traffic at that bucket size). Every 60 s of simulated time it also records the widest
replay window (``read_bucket - replay_bucket``) over the shards, which must level off rather than grow with the
run (docs/correlation.md, Recovery). One polars thread (``POLARS_MAX_THREADS=1``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from engine.core.config import from_mapping
from engine.core.event import encode
from engine.core.stage import EMPTY, Batch, Emission
from engine.correlate.story import StoryMachine
from engine.ingest.canonical import ParseRules, parse_line, shard_of
from engine.store import EventRecord
from engine.tools.simulate import Scenario, generate

SHARDS = 16
BUCKET_MS = 100


class _Sink:
    """Counts what the stage emits and drops it: the benchmark measures the stage (pure), not the database."""

    def __init__(self) -> None:
        self.stories = 0
        self.marks = 0

    def take(self, emission: Emission) -> None:
        self.stories += len(emission.stories)
        self.marks += len(emission.marks)


def run(
    events: int = 20_000, speed: float = 20.0, span_s: float = 1_440.0, horizon_ms: int = 60_000, mode: str = "grouped"
) -> dict[str, Any]:
    cfg = from_mapping(
        {
            "tenant": "bench_stage",
            "shards": SHARDS,
            "bucket_ms": BUCKET_MS,
            "store": {"backend": "embedded", "path": ":memory:"},
            "correlate": {"match_window_ms": 30_000, "max_wait_ms": 5_000, "amend_horizon_ms": horizon_ms},
        }
    )
    sim, _truth = generate(Scenario(events=events, seed=3, start_s=time.time() - 2 * span_s, span_s=span_s))
    now = int(time.time() * 1000)
    parts: dict[tuple[int, int], list[EventRecord]] = {}
    for e in sim:
        ev = parse_line(e.line, ParseRules.from_config(cfg), now)
        bucket = int(e.arrival_s / speed * 1000 / BUCKET_MS)
        parts.setdefault((shard_of(ev, SHARDS), bucket), []).append(EventRecord(ev.id, encode(ev)))
    last = max(b for _, b in parts)
    store = _Sink()
    stage = StoryMachine.for_config(cfg)
    windows: list[tuple[float, float]] = []
    every = 60_000 // BUCKET_MS

    def part(shard: int, bucket: int) -> Batch:
        recs = parts.get((shard, bucket))
        return Batch(recs) if recs else EMPTY

    def feed() -> None:
        for b in range(last + 1):
            if mode == "grouped":
                store.take(stage.on_buckets([(b, {s: part(s, b) for s in range(SHARDS)})]))
            else:
                for s in range(SHARDS):
                    store.take(stage.on_buckets([(b, {s: part(s, b)})]))
            if b % every == 0:
                widest = max(b - stage.replay_bucket(s, b) for s in range(SHARDS))
                windows.append((b * BUCKET_MS / 1000, widest * BUCKET_MS / 1000))

    t0 = time.perf_counter()
    feed()
    seconds = time.perf_counter() - t0
    simulated_s = (last + 1) * BUCKET_MS / 1000
    return {
        "mode": mode,
        "events": events,
        "shards": SHARDS,
        "bucket_ms": BUCKET_MS,
        "speed": speed,
        "amend_horizon_ms": horizon_ms,
        "partitions": len(parts),
        "simulated_s": simulated_s,
        "stage_seconds": seconds,
        "share_of_real_time": seconds / simulated_s,
        "ms_per_partition": seconds / len(parts) * 1000,
        "stories_written": store.stories,
        "replay_window_s": windows,
        "counters": dict(vars(stage.counters)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stage", description=__doc__)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--speed", type=float, default=20.0)
    ap.add_argument("--span-s", type=float, default=1_440.0, help="simulated span of sessions (event time)")
    ap.add_argument("--horizon-ms", type=int, default=60_000)
    ap.add_argument("--mode", choices=("grouped", "per-shard", "both"), default="both")
    args = ap.parse_args(argv)
    modes = ("grouped", "per-shard") if args.mode == "both" else (args.mode,)
    out = {m: run(args.events, args.speed, args.span_s, args.horizon_ms, m) for m in modes}
    if len(out) == 2:
        out["per_shard_vs_grouped_ratio"] = out["per-shard"]["stage_seconds"] / out["grouped"]["stage_seconds"]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
