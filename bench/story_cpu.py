"""``python -m bench.story_cpu [--events N] [--rounds R] [--buckets-per-call K]``: the story builder's CPU per event
in-process, at the rate and settings of ``bench.pipeline`` — the engine's share of the story path without the
store, per step of the cost ledger.

The simulator's default scenario (seed 1, 600 s of sessions, as ``bench.pipeline``) is cut into partitions as one
of the pipeline's two workers reads them: configs/bench.toml (16 shards, 100 ms buckets, 30 s window, 5 s wait,
60 s amend horizon, learned offsets and DNS names as configured), shards 0 to 7, the events arriving at
``RATE`` per second in the simulator's order (the producer's pace in the pipeline). One
:class:`engine.correlate.story.StoryMachine` is fed ``K`` buckets per call (by default the config's
``poll_interval_ms`` of them, as a worker at the head hands them over), every shard of the worker in each
(empty ones too), then the idle buckets after the last event (one call per second of them) until every story has
been emitted and has left the state, as the pipeline's settled figure counts. Each epoch's offset table is built
in-process from the evidence the machine emitted (as the worker's keeper does from the stored rows).

CPU is this process's (``time.process_time``, one polars thread): building each partition's
:class:`~engine.core.stage.Batch` (the worker's view decoding) and the machine's calls. The ledger steps are the
machine's own (:data:`engine.correlate.story.CPU_STEPS`). Rounds run in one process after one warm-up round; the
median is reported with every round. ``bench.ab --inproc`` runs this module for two commits, alternated.

It imports only ``engine`` (so ``bench.ab`` can run it against another commit's engine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import msgspec

from engine.core.config import Config, load
from engine.core.event import encode
from engine.core.stage import EMPTY, Batch
from engine.correlate.offsets import EvidenceRow, TableBook
from engine.correlate.story import StoryMachine
from engine.ingest.canonical import ParseRules, parse_line
from engine.store import EventRecord
from engine.tools.simulate import Scenario, generate

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench.toml"
RATE = 25_000
"""Events per second the producer writes in the pipeline (all shards): the arrival rate of the partitions."""
SHARDS_OF_WORKER = range(8)
_rows = msgspec.msgpack.Decoder(EvidenceRow)
Parts = dict[int, dict[int, list[EventRecord]]]


def partitions(events: int, cfg: Config, clock_s: float | None = None) -> tuple[Parts, int]:
    """The worker's partitions (bucket → shard → records) and how many events they hold; ``clock_s``: the wall
    time the events are simulated and ingested at (default now; a fixed one gives the same keys run after run)."""
    rules = ParseRules.from_config(cfg)
    wall = time.time() if clock_s is None else clock_s
    sim, _ = generate(Scenario(events=events, seed=1, start_s=wall - 3_600, span_s=600))
    now = int(wall * 1000)
    first = now // cfg.bucket_ms
    parts: Parts = {}
    n = 0
    for i, e in enumerate(sim):
        ev = parse_line(e.line, rules, now)
        shard = (ev.flow or 0) % cfg.shards
        if shard not in SHARDS_OF_WORKER:
            continue
        n += 1
        bucket = first + int(i * 1000 / RATE) // cfg.bucket_ms
        parts.setdefault(bucket, {}).setdefault(shard, []).append(EventRecord(ev.id, encode(ev)))
    return parts, n


def one_round(parts: Parts, events: int, cfg: Config, per_call: int = 1) -> dict[str, Any]:
    c = cfg.correlate
    machine = StoryMachine(
        c,
        bucket_ms=cfg.bucket_ms,
        community_id_seed=cfg.ingest.community_id_seed,
        tenant=cfg.tenant,
        cpu_clock=time.process_time,
    )
    o = c.offsets
    book = TableBook(
        reference=c.reference_sensor,
        min_samples=o.min_samples,
        delay_epochs=o.delay_epochs,
        expire_epochs=max(1, cfg.ttl_ms // o.epoch_ms),
    )
    if machine.epochs_on:
        machine.use_offset_tables()
    first, last = min(parts), max(parts)
    idle_every = max(1, 1000 // cfg.bucket_ms)
    settle = (c.max_wait_ms + c.amend_horizon_ms + 2_500) // cfg.bucket_ms
    calls: list[list[int]] = [list(range(b, min(b + per_call, last + 1))) for b in range(first, last + 1, per_call)]
    calls += [[b] for b in range(last + idle_every, last + settle + 1, idle_every)]
    revisions = marks = 0
    t0 = time.process_time()
    for bs in calls:
        call = [(b, {s: Batch(parts[b][s]) if s in parts.get(b, {}) else EMPTY for s in SHARDS_OF_WORKER}) for b in bs]
        for epoch in machine.offset_epochs(call):
            machine.set_offset_table(book.table(epoch))
        out = machine.on_buckets(call)
        book.add([_rows.decode(r.body) for r in out.evidence])
        revisions += len(out.stories)
        marks += len(out.marks)
    cpu = time.process_time() - t0
    left = sum(len(st.stories) for st in machine.shards.values())
    return {
        "us_per_event": round(cpu / events * 1e6, 2),
        "ledger_us_per_event": {k: round(v / events * 1e6, 2) for k, v in machine.cpu.items()},
        "batches_us_per_event": round((cpu - sum(machine.cpu.values())) / events * 1e6, 2),
        "revisions": revisions,
        "marks": marks,
        "stories": machine.counters.stories,
        "stories_left_in_state": left,
    }


def run(
    events: int = 200_000, rounds: int = 3, per_call: int | None = None, clock_s: float | None = None
) -> dict[str, Any]:
    cfg = load(CONFIG, [])
    if per_call is None:
        per_call = max(1, getattr(cfg, "poll_interval_ms", 0) // cfg.bucket_ms)  # an older engine: 1
    parts, n = partitions(events, cfg, clock_s)
    one_round(parts, n, cfg, per_call)  # warm-up: imports, caches, polars' first calls
    rs = [one_round(parts, n, cfg, per_call) for _ in range(rounds)]
    steps = rs[0]["ledger_us_per_event"]
    return {
        "events": n,
        "buckets_per_call": per_call,
        "rate_per_s": RATE,
        "median_us_per_event": statistics.median(r["us_per_event"] for r in rs),
        "median_ledger_us_per_event": {k: statistics.median(r["ledger_us_per_event"][k] for r in rs) for k in steps},
        "rounds": rs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.story_cpu", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000, help="simulated events (the worker gets about half)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--buckets-per-call", type=int, default=None, help="default: the config's poll_interval_ms of buckets"
    )
    ap.add_argument(
        "--clock-s", type=float, default=None, help="simulate at this wall time (s), not now: the same input each run"
    )
    args = ap.parse_args(argv)
    print(json.dumps(run(args.events, args.rounds, args.buckets_per_call, args.clock_s)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
