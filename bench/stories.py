"""Story-building benchmarks: the story builder's throughput, and accuracy through the whole path.

* ``stage``: :class:`engine.correlate.story.StoryStage` fed simulated events in buckets of 5,000 on one shard
  (link + state + emission + fused-story building + writes to the embedded store), one polars thread.
* ``accuracy``: the default simulator scenario through producer → embedded store → worker → story builder,
  scored with B-cubed precision/recall and the exact-story match rate (engine/tools/accuracy.py).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

from engine.core.config import from_mapping
from engine.core.event import encode
from engine.core.stage import Batch
from engine.correlate.story import StoryMachine
from engine.ingest.canonical import ParseRules, parse_line
from engine.runtime.worker import persist
from engine.store import EventRecord, make_store
from engine.testing.pipeline import run_pipeline
from engine.tools.accuracy import score
from engine.tools.simulate import Scenario, generate


def stage_throughput(n_events: int = 200_000, per_bucket: int = 5_000) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_mapping(
            {
                "tenant": "bench_stories",
                "shards": 1,
                "store": {"backend": "embedded", "path": f"{tmp}/s.db"},
                "correlate": {"match_window_ms": 30_000, "max_wait_ms": 60_000, "amend_horizon_ms": 600_000},
            }
        )
        events, truth = generate(Scenario(events=n_events, seed=2, start_s=time.time() - 3_600, span_s=1_800))
        now = int(time.time() * 1000)
        records = [EventRecord(e.id, encode(parse_line(e.line, ParseRules.from_config(cfg), now))) for e in events]

        async def run() -> tuple[float, dict[str, int]]:
            store = make_store(cfg)
            await store.open()
            await store.init_schema()
            try:
                stage = StoryMachine.for_config(cfg)
                t0 = time.perf_counter()
                bucket = 0
                for i in range(0, len(records), per_bucket):
                    emission = stage.on_buckets([(bucket, {0: Batch(records[i : i + per_bucket])})])
                    await persist(store, cfg.consumer, emission)
                    bucket += 1
                await persist(store, cfg.consumer, stage.drain([0], bucket - 1))
                return time.perf_counter() - t0, vars(stage.counters)
            finally:
                await store.close()

        seconds, counters = asyncio.run(run())
        return {
            "events": len(records),
            "stories": counters["stories"],
            "seconds": seconds,
            "stage_events_per_s": len(records) / seconds,
            "true_stories": len(set(truth.stories.values())),
        }


def accuracy(n_events: int = 10_000, skew_s: float = 5.0) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_mapping(
            {
                "tenant": "bench_accuracy",
                "shards": 4,
                "store": {"backend": "embedded", "path": f"{tmp}/a.db"},
                "correlate": {"match_window_ms": 30_000, "max_wait_ms": 120_000, "amend_horizon_ms": 900_000},
            }
        )
        scenario = Scenario(events=n_events, seed=1, start_s=time.time() - 2_400, span_s=600, skew_s=skew_s)
        predicted, truth = run_pipeline(cfg, scenario)
        return score(predicted, truth)


def memory_curve(points: tuple[int, ...] = (0, 25_000, 50_000, 100_000, 200_000)) -> dict[str, Any]:
    """Resident memory of a story builder holding ``n`` open stories (one event each, distinct flows, ~300 B
    stored events with firewall-like attributes; nothing falls due), measured on this process (psutil RSS)."""
    import gc

    import psutil

    from engine.core.event import Event
    from engine.ingest.network_identity import flow_identity

    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_mapping(
            {
                "tenant": "bench_memory",
                "shards": 1,
                "store": {"backend": "embedded", "path": f"{tmp}/m.db"},
                "correlate": {"max_wait_ms": 3_600_000, "max_open_stories": 10_000_000},
            }
        )
        t0 = int(time.time() * 1_000_000) - 600_000_000

        def record(i: int) -> EventRecord:
            sip, dip, key, rev = flow_identity(
                6, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000, "10.255.0.1", 443
            )
            import xxhash

            attrs = {"action": "allow", "rule": f"r-{i % 500}", "bytes": 1000 + i % 7777, "packets": 1 + i % 50}
            e = Event(
                f"m{i:09d}",
                t0 + i,
                "firewall",
                "fw-1",
                xxhash.xxh64_intdigest(key),
                rev,
                6,
                sip,
                40000,
                dip,
                443,
                attrs,
            )
            return EventRecord(e.id, encode(e))

        async def body() -> list[dict[str, float]]:
            store = make_store(cfg)
            await store.open()
            await store.init_schema()
            out = []
            try:
                stage = StoryMachine.for_config(cfg)
                done = 0
                for target in points:
                    while done < target:
                        n = min(5_000, target - done)
                        batch = Batch([record(i) for i in range(done, done + n)])
                        await persist(store, cfg.consumer, stage.on_buckets([(done // 5_000, {0: batch})]))
                        done += n
                    gc.collect()
                    out.append({"open_stories": float(done), "rss_bytes": float(proc.memory_info().rss)})
            finally:
                await store.close()
            return out

        curve = asyncio.run(body())
    base = curve[0]["rss_bytes"]
    top = curve[-1]
    per_story = (top["rss_bytes"] - base) / top["open_stories"] if top["open_stories"] else 0.0
    return {"points": curve, "bytes_per_open_story": per_story}


def memory_curve_fresh() -> dict[str, Any]:
    """:func:`memory_curve` in a new process: in a process that already ran other benchmarks, the story
    builder's allocations reuse freed heap and the RSS growth understates them (219 B per story against
    1.35 KB fresh, on 2026-11-26)."""
    import json
    import subprocess
    import sys

    code = "import json; from bench.stories import memory_curve; print(json.dumps(memory_curve()))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)  # noqa: S603
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run() -> dict[str, Any]:
    return {
        "stage": stage_throughput(),
        "accuracy": accuracy(),
        "accuracy_skew20": accuracy(skew_s=20.0),
        "memory": memory_curve_fresh(),
    }


if __name__ == "__main__":
    os.environ.setdefault("POLARS_MAX_THREADS", "1")
    import json

    print(json.dumps(run(), indent=2))
