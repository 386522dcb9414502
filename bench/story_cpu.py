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
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from engine.core.config import Config, load
from engine.core.event import encode
from engine.core.stage import EMPTY, Batch, Emission
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


def partitions(events: int, cfg: Config, clock_s: float | None = None, rate: int = RATE) -> tuple[Parts, int]:
    """The worker's partitions (bucket → shard → records) and how many events they hold; ``clock_s``: the wall
    time the events are simulated and ingested at (default now; a fixed one gives the same keys run after run);
    ``rate``: events per second the producer writes (all shards)."""
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
        bucket = first + int(i * 1000 / rate) // cfg.bucket_ms
        parts.setdefault(bucket, {}).setdefault(shard, []).append(EventRecord(ev.id, encode(ev)))
    return parts, n


def one_round(
    parts: Parts, events: int, cfg: Config, per_call: int = 1, seen: Callable[[Emission], None] | None = None
) -> dict[str, Any]:
    """One machine fed every partition; ``seen``: called with each call's emission (``--digest``)."""
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
        if seen is not None:
            seen(out)
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


DIGEST_SETTINGS = ((RATE, 5, 100_000), (RATE, 1, 60_000), (2_500, 5, 30_000), (250_000, 20, 100_000))
"""``--digest``: (producer rate per s, buckets per call, simulated events) — the bench's rate, one bucket per call,
a small tenant (a few events per bucket) and a large one (many buckets per call)."""


def digest(clock_s: float) -> dict[str, str]:
    """Per setting of :data:`DIGEST_SETTINGS`, a hash of everything the builder emits — every revision, mark and
    evidence row, and the replay points — on input simulated at ``clock_s``: two engines that agree here write the
    same bytes (how a change meant to keep the output is checked: ``python -m bench.ab --digest``)."""
    cfg = load(CONFIG, [])
    out: dict[str, str] = {}
    for rate, per_call, events in DIGEST_SETTINGS:
        parts, n = partitions(events, cfg, clock_s, rate)
        h = hashlib.sha256()

        def add(em: Emission, h: Any = h) -> None:
            for rows in (em.stories, em.marks, em.evidence):
                h.update(msgspec.msgpack.encode(rows))
            h.update(msgspec.msgpack.encode(sorted(em.replay.items())))

        one_round(parts, n, cfg, per_call, add)
        out[f"rate={rate} per_call={per_call} events={n}"] = h.hexdigest()
    return out


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
    ap.add_argument(
        "--digest", action="store_true", help="print a hash of the output per setting (needs --clock-s), no timing"
    )
    args = ap.parse_args(argv)
    if args.digest:
        if args.clock_s is None:
            ap.error("--digest needs --clock-s: the same input in every run")
        print(json.dumps(digest(args.clock_s)))
        return 0
    print(json.dumps(run(args.events, args.rounds, args.buckets_per_call, args.clock_s)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
