"""Consume benchmarks on the local CQL node (and the embedded store for comparison).

* ``raw``: the partitions of a pre-ingested tenant read by a bare loop — the store's partition reads with the
  same driver, the same read-ahead bound and no decoding or processing: the ceiling.
* ``engine_1w``: one :class:`engine.runtime.worker.Worker` (in-process, counting stage, full msgspec decoding) draining
  the same partitions. Goal: >= 0.85 x raw (median of ROUNDS = 7 rounds in alternating order, after a warm-up
  read).
* ``engine_stories_1w``: the same with the story builder (fused stories written to the stories table).
* ``run_1w`` / ``run_2w``: ``storyline run --until-idle`` with 1 and 2 worker processes (wall time, process
  start-up included).
* ``idle``: CPU of a running engine (supervisor + workers) with 256 shards and no traffic. Goal: ≤ 2 % of a core.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import msgspec
import psutil

from engine.core.config import Config, from_mapping, load
from engine.ingest.canonical import ParseRules, parse_line
from engine.ingest.producer import Producer, ProducerSettings
from engine.runtime.stages import CountingStage
from engine.runtime.worker import Worker
from engine.store import make_store
from engine.tools.simulate import sessions

ROUNDS = 7  # engine/raw read rounds, alternating; the ratio reported is their median (issue 16: at least 7)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(backend: str, tmp: str, **over: Any) -> Config:
    base = msgspec.to_builtins(load(os.path.join(ROOT, "configs", "bench.toml")))
    base["tenant"] = f"bench_consume_{uuid.uuid4().hex[:8]}"
    if backend == "embedded":
        base["store"] = {"backend": "embedded", "path": f"{tmp}/consume.db"}
    base.update(over)
    return from_mapping(base)


async def preload(cfg: Config, n_events: int) -> int:
    store = make_store(cfg)
    await store.open()
    try:
        await store.init_schema()
        producer = Producer(store, ProducerSettings.from_config(cfg))
        now = int(time.time() * 1000)
        batch: list[Any] = []
        written = 0
        for line in sessions(n_events, seed=21, start_s=time.time() - 600, span_s=600):
            batch.append(parse_line(line, ParseRules.from_config(cfg), now))
            if len(batch) >= 5_000:
                written += (await producer.write(batch)).events
                batch = []
            if written + len(batch) >= n_events:
                break
        if batch:
            written += (await producer.write(batch)).events
        return written
    finally:
        await store.close()


async def raw_read(cfg: Config, first: int, last: int) -> dict[str, float]:
    """Connect, list the non-empty partitions, read them all: the same start-up as a worker's (a connection),
    without its clock check, claims and commits."""
    t0 = time.perf_counter()
    store = make_store(cfg)
    await store.open()
    try:
        sem = asyncio.Semaphore(cfg.read_ahead)
        n = 0

        async def one(shard: int, bucket: int, max_row: int) -> None:
            nonlocal n
            async with sem:
                async for page in store.read_partition(shard, bucket, max_row_bytes=max_row):
                    n += len(page.events)

        hints = await store.scan_index(list(range(cfg.shards)), first, last)
        await asyncio.gather(*(one(s, h.bucket, h.max_row_bytes) for s, hs in hints.items() for h in hs))
        dt = time.perf_counter() - t0
        return {"events": n, "seconds": dt, "events_per_s": n / dt}
    finally:
        await store.close()


async def engine_read(cfg: Config, last: int, *, stories: bool = False) -> dict[str, float]:
    """One in-process worker draining every shard from scratch (a fresh consumer): start-up (clock check,
    16 claims) included, process start-up not. ``stories``: the story builder (link, state, fused stories written
    to the stories table, drained at the end) instead of the counting stage."""
    from engine.correlate.story import StoryMachine

    cfg = msgspec.structs.replace(cfg, consumer=f"bench_{uuid.uuid4().hex[:8]}")
    counting = CountingStage()
    w = Worker.from_config(
        cfg, list(range(cfg.shards)), counting, owner=f"bench-{uuid.uuid4().hex[:6]}", until_bucket=last, drain=stories
    )
    story_stage = StoryMachine.for_config(cfg) if stories else None
    if story_stage is not None:
        w.stage = story_stage
    t0 = time.perf_counter()
    await w.run()
    dt = time.perf_counter() - t0
    n = story_stage.counters.events + story_stage.counters.duplicates if story_stage else counting.events
    return {"events": n, "seconds": dt, "events_per_s": n / dt}


def cli_run(cfg: Config, workers: int) -> dict[str, float]:
    args = [sys.executable, "-m", "engine.cli", "run", "--until-idle", "--workers", str(workers)]
    tree = msgspec.to_builtins(cfg)
    sets = [
        "--set",
        f"tenant={cfg.tenant}",
        "--set",
        f"consumer=run{workers}w_{uuid.uuid4().hex[:6]}",
        "--set",
        f"store.backend={cfg.store.backend}",
        "--set",
        f"store.path={cfg.store.path}",
    ]
    for k in ("bucket_ms", "max_write_age_ms", "request_timeout_ms", "max_clock_skew_ms", "lag_ms", "shards"):
        sets += ["--set", f"{k}={tree[k]}"]
    t0 = time.perf_counter()
    res = subprocess.run(  # noqa: S603 - our own CLI, fixed arguments
        [*args, *sets], capture_output=True, text=True, timeout=1800, check=False
    )
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"bench consume: run failed: {res.stderr[-2000:]}")
    final = json.loads(res.stdout.strip().splitlines()[-1])
    return {"events": final["events"], "seconds": dt, "events_per_s": final["events"] / dt}


def idle_cost(backend: str, tmp: str, seconds: float = 20.0) -> dict[str, float]:
    cfg = bench_config(
        backend,
        tmp,
        shards=256,
        bucket_ms=1000,
        lag_ms=15000,
        max_write_age_ms=5000,
        request_timeout_ms=5000,
        max_clock_skew_ms=1000,
        commit_interval_ms=5000,
    )

    async def init() -> None:
        store = make_store(cfg)
        await store.open()
        await store.init_schema()
        await store.close()

    asyncio.run(init())
    sets = ["--set", f"tenant={cfg.tenant}", "--set", "shards=256", "--set", f"store.backend={backend}"]
    if backend == "embedded":
        sets += ["--set", f"store.path={cfg.store.path}"]
    proc = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
        [sys.executable, "-m", "engine.cli", "run", "--workers", "2", *sets],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(8.0)  # start-up, claims and the first scans
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
        time.sleep(seconds)
        after = {p.pid: sum(p.cpu_times()[:2]) for p in procs if p.is_running()}
        used = sum(after[pid] - before[pid] for pid in after if pid in before)
        return {"shards": 256, "seconds": seconds, "cpu_percent_of_one_core": 100 * used / seconds}
    finally:
        proc.terminate()
        proc.wait(60)


def run(n_events: int = 300_000, backend: str = "cql") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(backend, tmp)
        t0 = time.time()
        written = asyncio.run(preload(cfg, n_events))
        first = int(t0 * 1000) // cfg.bucket_ms - 20
        time.sleep(cfg.lag_ms / 1000 + 0.5)
        last = (int(time.time() * 1000) - cfg.lag_ms) // cfg.bucket_ms
        # A warm-up read, then rounds in alternating order, so neither side always gets the colder cache or
        # the database's post-ingest flushes.
        asyncio.run(raw_read(cfg, first, last))
        rounds = []
        for i in range(ROUNDS):
            if i % 2:
                raw = asyncio.run(raw_read(cfg, first, last))
                eng = asyncio.run(engine_read(cfg, last))
            else:
                eng = asyncio.run(engine_read(cfg, last))
                raw = asyncio.run(raw_read(cfg, first, last))
            if eng["events"] != written or raw["events"] != written:
                raise SystemExit(f"bench consume: wrote {written}, raw read {raw['events']}, engine {eng['events']}")
            rounds.append((eng, raw))
        ratios = sorted(e["events_per_s"] / r["events_per_s"] for e, r in rounds)
        out: dict[str, Any] = {
            "backend": backend,
            "events": written,
            "raw": max((r for _, r in rounds), key=lambda r: r["events_per_s"]),
            "engine_1w": max((e for e, _ in rounds), key=lambda e: e["events_per_s"]),
            "consume_vs_raw_ratio": ratios[len(ratios) // 2],  # the median of the rounds
            "consume_vs_raw_ratios": ratios,
            "engine_stories_1w": asyncio.run(engine_read(cfg, last, stories=True)),
            "run_1w": cli_run(cfg, 1),
            "run_2w": cli_run(cfg, 2),
        }
        out["consume_stories_vs_raw_ratio"] = out["engine_stories_1w"]["events_per_s"] / out["raw"]["events_per_s"]
        out["scaling_2w_vs_1w"] = out["run_2w"]["events_per_s"] / out["run_1w"]["events_per_s"]
        out["idle"] = idle_cost(backend, tmp)
        return out


if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "cql"
    print(json.dumps(run(backend=backend), indent=2))
