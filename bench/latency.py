"""``python -m bench.latency``: end-to-end latency, ingest → final story, with the real engine and small windows.

The simulator's scenario (skew, reversed reports, late arrivals, port reuse, noise) is sent live through the
producer, each event at its arrival offset compressed ``speed`` times, while ``storyline run --workers N``
(separate processes, the supervisor and its workers, default stage) consumes the same tenant concurrently.
An event's latency is from the moment its write was durable (the producer's call returned) to the moment a
reader first finds it in a *final* story revision in the stories table (``latency_*``). An event waits for its
story to go quiet (no new member for max_wait), so members that keep arriving push it out — the semantics, not
the engine; ``after_quiet_*`` measures from the write of the last member of that revision instead (the engine's
own delay: lag + max_wait + processing + observation): an observer polls every ``poll_s``
(0.5 s) and reads each (shard, emit bucket) partition once the engine's committed offset has passed that bucket
(``commit_interval_ms`` is 200 here, so that is close to when the revision was written). The resolution is
about poll_s + the commit interval. ``emitted_ms`` in the table is the stage's logical bucket time, not wall
time, so it cannot be used. A late event that amends an emitted story counts from its own
write to the amended revision. Small windows from
``configs/bench.toml`` (bucket 100 ms, lag 3 s, max_wait 5 s), so the bound the issue sets is
``lag + max_wait + 2 s`` = 10 s. Both clocks are this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from typing import Any

import msgspec
import psutil

from bench.pipeline import CONFIG, ingest_until_processed, schema, start_engine, stop_engine
from engine.core.config import Config, load
from engine.ingest.canonical import ParseRules, parse_line
from engine.ingest.producer import Producer, ProducerSettings
from engine.store import Store, make_store
from engine.tools.simulate import Scenario, generate


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


class _Observer:
    """Reads each (shard, emit bucket) partition of the stories table once, right after the engine has committed
    past that bucket (a full scan of the table per poll would take longer than the latency it measures)."""

    def __init__(
        self, cfg: Config, first_bucket: int, written: dict[str, int], shards: list[int] | None = None
    ) -> None:
        self.cfg = cfg
        self.checked = dict.fromkeys(range(cfg.shards) if shards is None else shards, first_bucket)
        self.seen: dict[str, int] = {}
        self.written = written
        # per event: from the write of the last member of the story revision it was first seen in (the moment
        # the story went quiet) to that sighting — the engine's own delay, without the waiting for later members
        self.after_quiet: dict[str, int] = {}

    async def poll(self, store: Store) -> None:
        offsets = await store.read_offsets(self.cfg.consumer, list(self.checked))
        sem = asyncio.Semaphore(32)

        async def one(shard: int, period: int) -> list[list[str]]:
            revisions: list[list[str]] = []
            async with sem:
                async for page in store.read_stories(shard, period):
                    for rec in page:
                        if rec.final and rec.merged_into is None:
                            revisions.append(msgspec.json.decode(rec.body)["event_ids"])
            return revisions

        todo = [(o.shard, p) for o in offsets for p in range(self.checked[o.shard] + 1, o.read_bucket + 1)]
        found = await asyncio.gather(*(one(s, p) for s, p in todo))
        now = int(time.time() * 1000)
        for revisions in found:
            for ids in revisions:
                quiet = max((self.written[i] for i in ids if i in self.written), default=now)
                for eid in ids:
                    if eid not in self.seen:
                        self.seen[eid] = now
                        self.after_quiet[eid] = now - quiet
        for o in offsets:
            self.checked[o.shard] = max(self.checked[o.shard], o.read_bucket)


def run(
    events: int = 20_000,
    speed: float = 20.0,
    workers: int = 2,
    backend: str = "cql",
    seed: int = 11,
    poll_s: float = 0.5,
    extra_sets: tuple[str, ...] = (),
) -> dict[str, Any]:
    tenant = f"lat_{uuid.uuid4().hex[:8]}"
    sets = [f"tenant={tenant}", f"store.backend={backend}", "commit_interval_ms=200", *extra_sets]
    tmp = None
    if backend == "embedded":
        import tempfile

        tmp = tempfile.TemporaryDirectory()
        sets.append(f"store.path={tmp.name}/lat.db")
    cfg = load(CONFIG, sets)
    sim, _truth = generate(Scenario(events=events, seed=seed, start_s=time.time(), span_s=600))

    schema(cfg, create=True)
    proc = start_engine(sets, workers)
    written: dict[str, int] = {}
    rss_peak = 0

    def sample_rss() -> None:
        nonlocal rss_peak
        try:
            procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            rss_peak = max(rss_peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass

    async def produce() -> float:
        store = make_store(cfg)
        await store.open()
        try:
            producer = Producer(store, ProducerSettings.from_config(cfg))
            await producer.check_clock()
            t0 = time.monotonic()
            i = 0
            last_sample = 0.0
            while i < len(sim):
                delay = t0 + sim[i].arrival_s / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                now_ms = int(time.time() * 1000)
                batch = []
                ids = []
                while i < len(sim) and t0 + sim[i].arrival_s / speed <= time.monotonic():
                    batch.append(parse_line(sim[i].line, ParseRules.from_config(cfg), now_ms))
                    ids.append(sim[i].id)
                    i += 1
                await producer.write(batch)
                done_ms = int(time.time() * 1000)
                for eid in ids:
                    written[eid] = done_ms
                if time.monotonic() - last_sample > 1.0:
                    sample_rss()
                    last_sample = time.monotonic()
            return time.monotonic() - t0
        finally:
            await store.close()

    observer = _Observer(cfg, int(time.time() * 1000) // cfg.bucket_ms - 10, written)
    seen = observer.seen

    async def observe(stop: asyncio.Event) -> None:
        store = make_store(cfg)
        await store.open()
        try:
            while True:
                await observer.poll(store)
                if stop.is_set() and written and written.keys() <= seen.keys():
                    return
                await asyncio.sleep(poll_s)
        finally:
            await store.close()

    async def both() -> float:
        stop = asyncio.Event()
        watcher = asyncio.create_task(observe(stop))
        send_s = await produce()
        stop.set()
        limit = (cfg.lag_ms + cfg.correlate.max_wait_ms) / 1000 + 60
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher, limit)
        return send_s

    try:
        time.sleep(3.0)  # the workers start, claim their shards and begin polling
        send_s = asyncio.run(both())
        sample_rss()
    finally:
        stop_engine(proc)
    schema(cfg, create=False)
    if tmp is not None:
        tmp.cleanup()
    lat = sorted(max(0, seen[e] - written[e]) / 1000 for e in written if e in seen)
    quiet = sorted(max(0, observer.after_quiet[e]) / 1000 for e in written if e in observer.after_quiet)
    bound = (cfg.lag_ms + cfg.correlate.max_wait_ms) / 1000 + 2
    return {
        "backend": backend,
        "workers": workers,
        "events": len(written),
        "events_in_final_stories": len(lat),
        "send_seconds": send_s,
        "rate_events_per_s": len(written) / send_s,
        "latency_p50_s": _quantile(lat, 0.50),
        "latency_p95_s": _quantile(lat, 0.95),
        "latency_p99_s": _quantile(lat, 0.99),
        "latency_max_s": lat[-1] if lat else float("nan"),
        "after_quiet_p50_s": _quantile(quiet, 0.50),
        "after_quiet_p99_s": _quantile(quiet, 0.99),
        "after_quiet_max_s": quiet[-1] if quiet else float("nan"),
        "latency_bound_s": bound,
        "poll_s": poll_s,
        "rss_peak_bytes": rss_peak,
        "latencies_s": lat[:: max(1, len(lat) // 2000)],  # a sample for the CDF plot
    }


def under_load(parsed: list[Any], workers: int = 2, observed_shards: int = 4, poll_s: float = 0.5) -> dict[str, Any]:
    """``latency_after_quiet_*`` under the pipeline's load: the pipeline's events (``bench.pipeline``, written as
    fast as the producer goes, the engine with ``--stage stories``) while an observer reads the final story
    revisions of ``observed_shards`` of the shards (a sample: reading every story would take CPU from the engine
    on this 2-core machine) the moment the engine has committed past their bucket. Per event: from the write of
    the last member of its story revision to that revision being read. ``commit_interval_ms`` = 200 here (the
    observer can only see a revision once its bucket is committed; bench.toml's 1 s would add up to 1 s).
    A backlog — the engine processing slower than the producer writes — shows up here as latency."""
    tenant = f"lload_{uuid.uuid4().hex[:8]}"
    sets = [f"tenant={tenant}", "consumer=lload", "commit_interval_ms=200"]
    cfg = load(CONFIG, sets)
    schema(cfg, create=True)
    written: dict[str, int] = {}
    shards = list(range(0, cfg.shards, max(1, cfg.shards // max(1, observed_shards))))[:observed_shards]
    observer = _Observer(cfg, int(time.time() * 1000) // cfg.bucket_ms - 10, written, shards)

    async def go() -> tuple[float, float]:
        stop = asyncio.Event()

        async def observe() -> None:
            store = make_store(cfg)
            await store.open()
            try:
                while not stop.is_set():
                    await observer.poll(store)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), poll_s)
                await observer.poll(store)
            finally:
                await store.close()

        watcher = asyncio.create_task(observe())
        t_ingest, t_total, _ = await ingest_until_processed(cfg, parsed, written=written)
        # the last stories go final max_wait after their last member; a few commits more
        await asyncio.sleep((cfg.lag_ms + cfg.correlate.max_wait_ms) / 1000 + 3)
        stop.set()
        await watcher
        return t_ingest, t_total

    proc = start_engine(sets, workers)
    try:
        time.sleep(3.0)
        t_ingest, t_total = asyncio.run(go())
    finally:
        stop_engine(proc)
    schema(cfg, create=False)
    quiet = sorted(max(0, v) / 1000 for v in observer.after_quiet.values())
    return {
        "events": len(parsed),
        "workers": workers,
        "observed_shards": shards,
        "events_observed": len(quiet),
        "ingest_events_per_s": len(parsed) / t_ingest,
        "storyline_events_per_s": len(parsed) / t_total,
        "after_quiet_p50_s": _quantile(quiet, 0.50),
        "after_quiet_p99_s": _quantile(quiet, 0.99),
        "after_quiet_max_s": quiet[-1] if quiet else float("nan"),
        "bound_s": (cfg.lag_ms + cfg.correlate.max_wait_ms) / 1000 + 1,
        "commit_interval_ms": cfg.commit_interval_ms,
        "poll_s": poll_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--speed", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", choices=["cql", "embedded"], default="cql")
    ap.add_argument("--set", action="append", default=[], help="config overrides (dotted.key=value)")
    ap.add_argument(
        "--under-load", type=int, default=0, metavar="EVENTS", help="instead: latency under the pipeline's load"
    )
    args = ap.parse_args(argv)
    if args.under_load:
        from bench.pipeline import parsed_events

        print(json.dumps(under_load(parsed_events(args.under_load), args.workers), indent=1))
        return 0
    r = run(args.events, args.speed, args.workers, args.backend, extra_sets=tuple(args.set))
    r.pop("latencies_s")
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
