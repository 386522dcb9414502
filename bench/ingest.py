"""Ingest benchmarks: the client-side cost per event on its own, and end-to-end JSONL ingest into each store.

* ``client``: validate + normalize + derive id + flow key + encode (msgpack) + shard + group, for ~500 B events,
  no database: µs per event on one core.
* ``ingest_small`` / ``ingest_large``: :class:`engine.ingest.Ingestor` over in-memory lines (no file I/O) into
  the store — ~500 B events and 1 MiB events — events/s and MB/s of input.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from engine.core.config import Config, from_mapping
from engine.ingest.canonical import ParseRules, parse_line
from engine.ingest.producer import Ingestor, Producer, ProducerSettings
from engine.store import make_store
from engine.tools.simulate import sessions

SMALL_PAD = 300  # bytes of attrs padding that bring a synthetic event to ~500 B of JSON


def small_lines(n_events: int, seed: int = 11) -> list[bytes]:
    out: list[bytes] = []
    for line in sessions(n_events, seed=seed, start_s=time.time() - 3_000, span_s=3_000, payload_bytes=SMALL_PAD):
        out.append(line)
        if len(out) >= n_events:
            break
    return out


def client_cost(n: int = 100_000) -> dict[str, float]:
    """Per-event client work without a database: parse, normalize, id, flow, encode, shard and group."""
    cfg = from_mapping({"tenant": "bench"})
    lines = small_lines(n)
    producer = Producer(None, ProducerSettings.from_config(cfg))  # type: ignore[arg-type]  # only its pure grouping step is used
    now = int(time.time() * 1000)
    step = cfg.ingest.batch_lines  # rounds of the size the ingest pipeline uses
    t_parse = t_group = 0.0
    rules = ParseRules.from_config(cfg)
    for i in range(0, len(lines), step):
        t0 = time.perf_counter()
        events = [parse_line(ln, rules, now) for ln in lines[i : i + step]]
        t1 = time.perf_counter()
        producer._groups(events)
        t_parse += t1 - t0
        t_group += time.perf_counter() - t1
    total = t_parse + t_group
    return {
        "events": len(lines),
        "avg_line_bytes": sum(map(len, lines)) / len(lines),
        "parse_us_per_event": t_parse / len(lines) * 1e6,
        "encode_shard_group_us_per_event": t_group / len(lines) * 1e6,
        "client_us_per_event": total / len(lines) * 1e6,
        "client_events_per_s": len(lines) / total,
    }


async def _ingest(cfg: Config, lines: list[bytes]) -> dict[str, float]:
    store = make_store(cfg)
    await store.open()
    try:
        await store.init_schema()
        ing = Ingestor(store, Producer(store, ProducerSettings.from_config(cfg)))
        s = await ing.run(("bench", i, ln) for i, ln in enumerate(lines, 1))
        if s.accepted != len(lines):
            raise SystemExit(f"bench ingest: accepted {s.accepted} of {len(lines)}")
        return {
            "events": s.accepted,
            "avg_line_bytes": s.bytes / max(s.lines, 1),
            "seconds": s.seconds,
            "events_per_s": s.accepted / s.seconds,
            "mb_per_s": s.bytes / s.seconds / 1e6,
        }
    finally:
        await store.drop_schema()
        await store.close()


def ingest_bench(backend: str, tmp: str, cql: str, small: int, large: int) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    store: dict[str, Any] = {"backend": backend}
    if backend == "embedded":
        store["path"] = f"{tmp}/ingest-{run}.db"
    else:
        store["contact_points"] = [cql]
    cfg = from_mapping({"tenant": f"bench_ingest_{run}", "store": store})
    out = {"small": asyncio.run(_ingest(cfg, small_lines(small)))}
    big = [
        ln for ln in sessions(large, seed=12, start_s=time.time() - 600, span_s=600, payload_bytes=1024 * 1024 - 200)
    ][:large]
    cfg_big = from_mapping({"tenant": f"bench_ingest_big_{run}", "store": store, "ingest": {"batch_lines": 20}})
    out["large"] = asyncio.run(_ingest(cfg_big, big))
    return out
