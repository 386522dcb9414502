"""``python -m bench.offsets_cost [--events N] [--rounds R]``: what learning sensor clock offsets costs the story
builder, in-process.

The simulator's default scenario (seed 2, 20 min of sessions) is cut into partitions as a worker reads them
(16 shards by flow, 1 s buckets by arrival) and fed to :class:`engine.correlate.story.StoryMachine` ten buckets per
call, then drained — once with ``correlate.offsets.estimate`` off and once on, alternated for ``rounds`` rounds
(the second half in reverse order), one polars thread. No store: the figure is the stage's own CPU
(``time.process_time``) per event; with estimation on, the evidence step is also timed on its own. Prints every run
and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from engine.core.config import Config, from_mapping
from engine.core.event import encode
from engine.core.stage import Batch
from engine.correlate.story import StoryMachine
from engine.ingest.canonical import ParseRules, parse_line
from engine.store import EventRecord
from engine.tools.simulate import Scenario, generate

SHARDS = 16


def _config(estimate: bool) -> Config:
    return from_mapping(
        {
            "tenant": "bench_offsets",
            "shards": SHARDS,
            "bucket_ms": 1000,
            "correlate": {
                "match_window_ms": 30_000,
                "max_wait_ms": 60_000,
                "amend_horizon_ms": 600_000,
                "offsets": {"estimate": estimate},
            },
        }
    )


def _partitions(n: int) -> dict[int, dict[int, list[EventRecord]]]:
    start = time.time() - 7_200
    events, _ = generate(Scenario(events=n, seed=2, start_s=start, span_s=1_200))
    rules = ParseRules.from_config(_config(True))
    now = int(time.time() * 1000)
    out: dict[int, dict[int, list[EventRecord]]] = {}
    for e in events:
        parsed = parse_line(e.line, rules, now)
        assert parsed is not None
        shard = (parsed.flow or 0) % SHARDS
        bucket = int(start) + int(e.arrival_s)
        out.setdefault(bucket, {}).setdefault(shard, []).append(EventRecord(parsed.id, encode(parsed)))
    return out


def _run(parts: dict[int, dict[int, list[EventRecord]]], n: int, estimate: bool) -> dict[str, float]:
    machine = StoryMachine.for_config(_config(estimate))
    spent = [0.0]
    gather = machine._gather_evidence

    def timed(first_seq: int) -> None:
        t = time.process_time()
        gather(first_seq)
        spent[0] += time.process_time() - t

    machine._gather_evidence = timed  # type: ignore[method-assign]
    order = sorted(parts)
    t0 = time.process_time()
    for i in range(0, len(order), 10):
        machine.on_buckets([(b, {s: Batch(r) for s, r in parts[b].items()}) for b in order[i : i + 10]])
    machine.drain(list(range(SHARDS)), order[-1])
    total = time.process_time() - t0
    return {"estimate": float(estimate), "us_per_event": total / n * 1e6, "evidence_us_per_event": spent[0] / n * 1e6}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.offsets_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    parts = _partitions(args.events)
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for r in range(args.rounds):
        for estimate in (False, True) if r < args.rounds / 2 else (True, False):
            row = _run(parts, args.events, estimate)
            print(json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
            runs[estimate].append(row)
    off = statistics.median(r["us_per_event"] for r in runs[False])
    on = statistics.median(r["us_per_event"] for r in runs[True])
    ev = statistics.median(r["evidence_us_per_event"] for r in runs[True])
    summary: dict[str, Any] = {
        "events": args.events,
        "median_us_per_event_off": round(off, 2),
        "median_us_per_event_on": round(on, 2),
        "ratio_on_off": round(on / off, 3),
        "median_evidence_us_per_event": round(ev, 2),
        "evidence_share_of_on": round(ev / on, 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
