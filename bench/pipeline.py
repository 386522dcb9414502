"""``python -m bench.pipeline [EVENTS] [STAGES]``: Storyline end to end with producers and consumers running together.

The simulator's events (parsed beforehand, not timed) are written by the producer as fast as it goes while
``storyline run --workers N --stage S`` (supervisor + worker processes) consumes the same tenant on the CQL node
(configs/bench.toml windows). Run once per stage on the same events: ``stories`` (the story builder: linked,
fused stories written) and ``count`` (consume only: every record read back and decoded, nothing built — what the
Kafka peer's consumers do). Throughput = events / (first write → every shard's committed ``read_bucket`` past
the last written bucket: every event processed by the stage — with ``stories``, linked into a story whose fused
form is stored — and the offsets durable). The peers (bench/peers) use the same definition: data in, durable,
processed. The figure includes the fixed ``lag_ms`` (3 s) and up to one ``commit_interval_ms``.

CPU per event (engine: the supervisor and workers; the CQL node; the producer): with ``stories`` the engine runs
on after the last event is processed until every story has been emitted final and has left the state
(``lag_ms + max_wait_ms + amend_horizon_ms`` + 2.5 s), so the figure holds every cost an event has in a steady
run — the last stories' fusion, evictions and their marks — not only those that fall inside the run; the idle
rate (measured over ``IDLE_WINDOW_S`` before the first write) times that wait is taken out again.
``cpu_us_per_event_until_processed`` keeps the earlier definition.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil

from engine.core.config import Config, load
from engine.ingest.canonical import ParseRules, parse_line
from engine.ingest.producer import Producer, ProducerSettings
from engine.store import make_store
from engine.tools.simulate import Scenario, generate

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench.toml"


def schema(cfg: Config, *, create: bool) -> None:
    """Create (or drop) the tenant's tables."""

    async def go() -> None:
        store = make_store(cfg)
        await store.open()
        try:
            await (store.init_schema() if create else store.drop_schema())
        finally:
            await store.close()

    asyncio.run(go())


def start_engine(sets: list[str], workers: int, stage: str = "stories") -> subprocess.Popen[bytes]:
    """``storyline run --config configs/bench.toml --set ... --workers N --stage S`` as a child process."""
    set_args = [a for kv in sets for a in ("--set", kv)]
    return subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
        [
            sys.executable,
            "-m",
            "engine.cli",
            "run",
            "--config",
            str(CONFIG),
            *set_args,
            "--workers",
            str(workers),
            "--stage",
            stage,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_ledger(port: int) -> dict[str, float]:
    """The engine's cost ledger (``storyline_step_cpu_seconds_total{step}``) and its event count, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.fullmatch(r'storyline_step_cpu_seconds_total\{step="(\w+)"\} ([0-9.]+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
        elif line.startswith("storyline_events_total "):
            out["__events"] = float(line.split()[1])
        elif line.startswith(("storyline_stage_calls_total ", "storyline_buckets_total ")):
            out["__" + line.split()[0].split("_")[1]] = float(line.split()[1])
    return out


def stop_engine(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _cql_node() -> psutil.Process | None:
    """The local CQL node's JVM, to account its CPU (None when it is not on this host)."""
    for proc in psutil.process_iter(["cmdline"]):
        if "org.apache.cassandra.service.CassandraDaemon" in (proc.info["cmdline"] or []):
            return proc
    return None


def _cpu(proc: psutil.Process | None) -> float | None:
    """User + system CPU seconds of a process, None when it is not on this host or has gone."""
    if proc is None:
        return None
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


def engine_cpu(proc: psutil.Process) -> float:
    """CPU seconds of the engine's live processes (the supervisor and its workers, their threads included)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


IDLE_WINDOW_S = 5.0  # the engine's and the node's CPU with nothing to do, measured before the first write


def _children_cpu() -> float:
    """CPU of this process's finished children (and theirs, as each waited for its own): the engine's processes."""
    t = psutil.Process().cpu_times()
    return float(t.children_user + t.children_system)


async def ingest_until_processed(
    cfg: Config, parsed: list[Any], timeout_s: float = 900, written: dict[str, int] | None = None
) -> tuple[float, float, float]:
    """Write ``parsed`` with the producer as fast as it goes, then wait until every shard's committed
    ``read_bucket`` has passed the last written bucket. Returns (ingest seconds, seconds until processed, the
    producer's CPU seconds). ``written``: filled with each event id's write time (ms, when its write call
    returned)."""
    store = make_store(cfg)
    await store.open()
    try:
        producer = Producer(store, ProducerSettings.from_config(cfg))
        await producer.check_clock()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(parsed), 2_000):
            await producer.write(parsed[i : i + 2_000])
            if written is not None:
                done_ms = int(time.time() * 1000)
                for e in parsed[i : i + 2_000]:
                    written[e.id] = done_ms
        t_ingest = time.perf_counter() - t0
        producer_cpu = time.process_time() - c0
        last_bucket = int(time.time() * 1000) // cfg.bucket_ms
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            offsets = await store.read_offsets(cfg.consumer, list(range(cfg.shards)))
            if len(offsets) == cfg.shards and all(o.read_bucket >= last_bucket for o in offsets):
                return t_ingest, time.perf_counter() - t0, producer_cpu
            await asyncio.sleep(0.2)
        raise SystemExit(f"bench pipeline: the engine did not catch up within {timeout_s:.0f} s")
    finally:
        await store.close()


def _one(parsed: list[Any], workers: int, stage: str) -> dict[str, Any]:
    tenant = f"pipe_{uuid.uuid4().hex[:8]}"
    port = free_port()
    sets = [f"tenant={tenant}", "consumer=pipe", f"metrics_port={port}"]
    cfg = load(CONFIG, sets)
    schema(cfg, create=True)
    node = _cql_node()
    cpu0 = (_cpu(node), _children_cpu())
    proc = start_engine(sets, workers, stage)
    ledger: dict[str, float] = {}
    settle_s = 0.0
    try:
        time.sleep(3.0)  # workers up and polling before the first write
        live = psutil.Process(proc.pid)
        # What idling costs (polling, metrics; the node's background work), to take out of the settle wait below.
        q0 = (engine_cpu(live), _cpu(node), time.perf_counter())
        time.sleep(IDLE_WINDOW_S)
        q1 = (engine_cpu(live), _cpu(node), time.perf_counter())
        t_ingest, t_total, producer_cpu = asyncio.run(ingest_until_processed(cfg, parsed))
        time.sleep(1.5)  # one more metrics refresh after the last commit
        processed = (engine_cpu(live), _cpu(node))
        if stage == "stories":
            # Settle: the last stories' emission (max_wait) and every story leaving the state (amend horizon) —
            # costs each event has in a steady run, which a run shorter than the horizon would leave out.
            c = cfg.correlate
            t = time.perf_counter()
            time.sleep((cfg.lag_ms + c.max_wait_ms + c.amend_horizon_ms) / 1000 + 2.5)
            settle_s = time.perf_counter() - t
        try:
            ledger = scrape_ledger(port)
        except OSError as exc:
            print(f"bench pipeline: no cost ledger ({exc})", file=sys.stderr)
    finally:
        stop_engine(proc)
        cql_end = _cpu(node)  # until the engine has stopped: its last commits included
    idle_s = q1[2] - q0[2]
    engine_idle = (q1[0] - q0[0]) / idle_s
    node_idle = None if q0[1] is None or q1[1] is None else (q1[1] - q0[1]) / idle_s
    cql_cpu = None if cql_end is None or cpu0[0] is None else cql_end - cpu0[0] - (node_idle or 0.0) * settle_s
    engine_cpu_s = _children_cpu() - cpu0[1] - engine_idle * settle_s
    schema(cfg, create=False)
    n = len(parsed)
    return {
        "events": n,
        "workers": workers,
        "stage": stage,
        "ingest_seconds": t_ingest,
        "total_seconds": t_total,
        "ingest_events_per_s": n / t_ingest,
        "storyline_events_per_s": n / t_total,
        "includes_lag_s": cfg.lag_ms / 1000,
        "storyline_sustained_events_per_s": n / max(t_total - cfg.lag_ms / 1000, 1e-9),
        # CPU seconds over the run (2 cores, shared): where the time goes. The CQL node's figure also covers the
        # few seconds between the last commit and the engine's stop.
        # With ``stories``, the settle wait's CPU is included, less the idle rate over its length.
        "cpu_s": {"cql_node": cql_cpu, "engine": engine_cpu_s, "producer": producer_cpu},
        "cpu_us_per_event": {
            "cql_node": None if cql_cpu is None else cql_cpu / n * 1e6,
            "engine": engine_cpu_s / n * 1e6,
            "producer": producer_cpu / n * 1e6,
        },
        "settle_seconds": settle_s,
        "idle_cpu_per_s": {"engine": engine_idle, "cql_node": node_idle},
        # The figure as measured before the settle wait existed (until every event was processed, without the
        # last stories' emission nor any story leaving the state): for comparison with earlier results.
        "cpu_us_per_event_until_processed": {
            "engine": processed[0] / n * 1e6,
            "cql_node": None if processed[1] is None or cpu0[0] is None else (processed[1] - cpu0[0]) / n * 1e6,
        },
        # The workers' CPU per event by step (docs/architecture.md, "Metrics"); unattributed: the rest of the
        # engine's figure (the supervisor, and the workers' CPU after their last report: idle polling, shutdown).
        "cost_ledger_us_per_event": {k: round(v / n * 1e6, 2) for k, v in ledger.items() if not k.startswith("__")},
        "stage_calls": ledger.get("__stage"),
        "shard_buckets_per_stage_call": ledger["__buckets"] / ledger["__stage"] if ledger.get("__stage") else None,
        "unattributed_cpu_us_per_event": engine_cpu_s / n * 1e6
        - sum(v for k, v in ledger.items() if not k.startswith("__")) / n * 1e6
        if ledger
        else None,
    }


def run(
    events: int = 1_000_000, workers: int = 2, seed: int = 1, stages: tuple[str, ...] = ("stories", "count")
) -> dict[str, dict[str, Any]]:
    """The pipeline once per stage (``stories``: the story builder; ``count``: consume only, the like-for-like
    figure for the Kafka peer, whose consumers deliver records without building stories), on the same events."""
    parsed = parsed_events(events, seed)
    return {stage: _one(parsed, workers, stage) for stage in stages}


def parsed_events(events: int, seed: int = 1, start_s: float | None = None, span_s: float = 600) -> list[Any]:
    """The simulator's events as the producer takes them (parsed before any clock starts); by default from an
    hour ago over ``span_s``."""
    rules = ParseRules.from_config(load(CONFIG))
    start = time.time() - 3_600 if start_s is None else start_s
    sim, _ = generate(Scenario(events=events, seed=seed, start_s=start, span_s=span_s))
    now_ms = int(time.time() * 1000)
    return [parse_line(e.line, rules, now_ms) for e in sim]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    stages = tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else ("stories", "count")
    print(json.dumps(run(n, stages=stages), indent=1))
