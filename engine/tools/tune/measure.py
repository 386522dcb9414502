"""Calibration: a :class:`~engine.tools.tune.model.Capacity` measured by a short real run on this machine
(``storyline tune --measure``, ~10 s). The only part of ``tune`` that does I/O besides the command."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import tempfile
import time
from dataclasses import replace

from engine.tools.tune.model import BENCHMARKS, MIB, Capacity, clamp, machine_cores


def measure(avg_bytes: float, cores: int | None = None, story_events: int = 60_000) -> Capacity:
    """Calibrate the client-side ingest and story-stage figures with a short real run on this machine (~10 s): parse
    + encode + shard of synthetic lines of about ``avg_bytes`` (engine.tools.simulate.sessions), and a StoryMachine
    over simulated events writing stories to a temporary embedded store (as bench/stories.py does). Per-core figures
    are events per CPU second of this process (polars threads included). The read and database figures keep their
    docs/BENCHMARKS.md values (they need the CQL node)."""
    from engine.core.config import from_mapping
    from engine.core.event import encode
    from engine.core.stage import Batch
    from engine.correlate.story import StoryMachine
    from engine.ingest.canonical import ParseRules, parse_line, shard_of
    from engine.runtime.worker import persist
    from engine.store import EventRecord, make_store
    from engine.tools.simulate import Scenario, generate, sessions

    cfg = from_mapping({"tenant": "tune_measure"})
    now_s = time.time()
    now_ms = int(now_s * 1000)

    # 1. client-side ingest at the asked size (capped at 1 MiB to bound memory)
    size = min(float(avg_bytes), float(MIB))
    probe = list(sessions(50, seed=5, start_s=now_s - 600, span_s=600))
    plain = sum(map(len, probe)) / len(probe)
    pad = max(0, round(size - plain - len(',"blob":""')))
    n_lines = clamp(int(32e6 // max(size, 1.0)), 100, 50_000)
    lines: list[bytes] = []
    for ln in sessions(n_lines, seed=11, start_s=now_s - 3_000, span_s=3_000, payload_bytes=pad):
        lines.append(ln)
        if len(lines) >= n_lines:
            break
    rules = ParseRules.from_config(cfg)
    c0, w0 = time.process_time(), time.perf_counter()
    payload = 0
    for ln in lines:
        ev = parse_line(ln, rules, now_ms)
        payload += len(encode(ev))
        shard_of(ev, 16)
    c_ing, w_ing = time.process_time() - c0, time.perf_counter() - w0
    line_bytes = sum(map(len, lines)) / len(lines)

    # 2. the story stage (decode + link + state + fused stories + SQLite story writes), buckets of 5,000
    events, _ = generate(Scenario(events=story_events, seed=2, start_s=now_s - 3_600, span_s=900))
    records = [EventRecord(e.id, encode(parse_line(e.line, rules, now_ms))) for e in events]
    sim_bytes = sum(len(e.line) for e in events) / max(len(events), 1)

    async def stage_run(path: str) -> tuple[float, float, int, int]:
        scfg = from_mapping(
            {
                "tenant": "tune_measure",
                "shards": 1,
                "store": {"backend": "embedded", "path": path},
                "correlate": {"match_window_ms": 30_000, "max_wait_ms": 60_000, "amend_horizon_ms": 600_000},
            }
        )
        store = make_store(scfg)
        await store.open()
        await store.init_schema()
        try:
            stage = StoryMachine.for_config(scfg)
            c1, w1 = time.process_time(), time.perf_counter()
            bucket = 0
            for i in range(0, len(records), 5_000):
                await persist(store, scfg.consumer, stage.on_buckets([(bucket, {0: Batch(records[i : i + 5_000])})]))
                bucket += 1
            await persist(store, scfg.consumer, stage.drain([0], bucket - 1))
            cpu, wall = time.process_time() - c1, time.perf_counter() - w1
            rows = body = 0
            async for page in store.scan_stories():
                for rec in page:
                    rows += 1
                    body += len(rec.body)
            return cpu, wall, rows, body
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as tmp:
        c_st, w_st, rows, body = asyncio.run(stage_run(os.path.join(tmp, "tune.db")))

    n_story = max(len(records), 1)
    ncores = cores or machine_cores()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ingest_rate = len(lines) / max(c_ing, 1e-9)
    story_rate = n_story / max(c_st, 1e-9)
    notes = (
        f"Measured here ({when}, {machine_cores()} cores, load average {load_avg:.2f}): ingest client side"
        f" {ingest_rate:,.0f} events/s per CPU second ({len(lines):,} lines of {line_bytes:,.0f} B,"
        f" wall {len(lines) / max(w_ing, 1e-9):,.0f}/s); story stage {story_rate:,.0f} events/s per CPU second"
        f" ({n_story:,} simulated events of {sim_bytes:,.0f} B, wall {n_story / max(w_st, 1e-9):,.0f}/s);"
        f" payload {payload / max(sum(map(len, lines)), 1):.2f} x the line; stories {rows / n_story:.3f} rows and"
        f" {body / n_story:,.0f} B per event.",
        "Read, database and per-byte figures: " + BENCHMARKS + ".",
    )
    return replace(
        Capacity(cores=ncores),
        ingest_per_core=ingest_rate,
        ingest_ref_bytes=line_bytes,
        story_per_core=story_rate,
        story_ref_bytes=sim_bytes,
        payload_ratio=payload / max(sum(map(len, lines)), 1),
        story_bytes_per_event=max(body / n_story, 1.0),
        story_rows_per_event=max(rows / n_story, 0.001),
        source="`storyline tune --measure` on this machine, the rest from " + BENCHMARKS,
        notes=notes,
    )
