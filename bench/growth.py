"""``python -m bench.growth``: does the cost per event rise as the tenant's stored data grows?

The same 1M-event story pipeline (``bench.pipeline``, stage ``stories``, 2 workers, configs/bench.toml) runs on a
tenant that already holds ``prior`` events, for each ``prior`` in ``--priors`` (default 0 and 4,000,000). The
prior events are the simulator's (other seeds, earlier event times, inside the TTL), written by the producer
and consumed by the same engine — stories built and written, offsets committed — in chunks of 1M; then the
engine idles for ``lag_ms + max_wait_ms + amend_horizon_ms`` + 2 s, so every prior story is final and its
events have left the builder's memory, before the measured events are written. The engine runs without a
restart across both phases (a restart would replay the recent buckets and charge that to the measurement).

Cost = engine CPU (the supervisor and its workers, sampled from the live processes at the start and the end of
the measured phase) + the CQL node's CPU over the same interval, per measured event. The node's figure includes
whatever the prior data costs it meanwhile (compactions), which is the point.

The relational design (``bench.peers.postgres``, variant ``fused``) is measured the same way: one server, the
prior events COPYed and their stories built by the story job in 1M chunks, then its pipeline phase (producers
and the per-second job together) on the measured events; cost = the server's CPU (COPY and the job) + the
client's (the COPY producers and the job loop) per event. The Storyline figure excludes its producer, the
PostgreSQL figure includes its COPY client: both are reported as measured, side by side.

Results: ``rise`` = cost at the largest prior ÷ cost at prior 0 - 1 (issue 16's goal for Storyline: ≤ 0.10).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

import psutil

from bench.pipeline import (
    CONFIG,
    _cpu,
    _cql_node,
    engine_cpu,
    free_port,
    ingest_until_processed,
    parsed_events,
    schema,
    scrape_ledger,
    start_engine,
    stop_engine,
)
from engine.core.config import load

CHUNK = 1_000_000
SPAN_PER_MILLION_S = 600.0  # the measured run's event density: 1M events over 10 minutes


def _chunks(prior: int) -> list[tuple[int, int, float, float]]:
    """(events, seed, start_s, span_s) of each prior chunk: spans at the measured run's density laid back to back
    before the measured events' hour-old span, 100 s apart (more than the match window, so prior and measured
    never link). Storyline and the PostgreSQL design get the same chunks."""
    out = []
    now = time.time()
    for k, first in enumerate(range(0, prior, CHUNK)):
        n = min(CHUNK, prior - first)
        out.append((n, 100 + k, now - 3_600 - (k + 1) * (SPAN_PER_MILLION_S + 100), SPAN_PER_MILLION_S * n / CHUNK))
    return out


def storyline(measured: list[Any], prior: int, workers: int = 2) -> dict[str, Any]:
    tenant = f"grow_{uuid.uuid4().hex[:8]}"
    port = free_port()
    sets = [f"tenant={tenant}", "consumer=grow", f"metrics_port={port}"]
    cfg = load(CONFIG, sets)
    schema(cfg, create=True)
    node = _cql_node()
    proc = start_engine(sets, workers)
    out: dict[str, Any] = {"prior_events": prior, "events": len(measured), "workers": workers}
    try:
        time.sleep(3.0)
        engine = psutil.Process(proc.pid)
        t = time.perf_counter()
        for n, seed, start_s, span_s in _chunks(prior):
            asyncio.run(ingest_until_processed(cfg, parsed_events(n, seed, start_s, span_s)))
        if prior:
            out["prior_load_s"] = time.perf_counter() - t
            c = cfg.correlate
            time.sleep((cfg.lag_ms + c.max_wait_ms + c.amend_horizon_ms) / 1000 + 2)
        e0, n0, l0 = engine_cpu(engine), _cpu(node), scrape_ledger(port)
        t_ingest, t_total, producer_cpu = asyncio.run(ingest_until_processed(cfg, measured))
        e1, n1 = engine_cpu(engine), _cpu(node)
        time.sleep(1.5)  # one more metrics refresh after the last commit
        l1 = scrape_ledger(port)
    finally:
        stop_engine(proc)
    schema(cfg, create=False)
    n = len(measured)
    node_us = None if n0 is None or n1 is None else (n1 - n0) / n * 1e6
    engine_us = (e1 - e0) / n * 1e6
    out.update(
        storyline_events_per_s=n / t_total,
        ingest_events_per_s=n / t_ingest,
        engine_cpu_us_per_event=engine_us,
        node_cpu_us_per_event=node_us,
        producer_cpu_us_per_event=producer_cpu / n * 1e6,
        cost_us_per_event=engine_us + (node_us or 0.0),
        # The workers' CPU by step over the measured phase (the metrics' ledger, diffed): where a rise comes from.
        cost_ledger_us_per_event={
            k: round((v - l0.get(k, 0.0)) / n * 1e6, 2) for k, v in l1.items() if not k.startswith("__")
        },
        stage_calls=l1.get("__stage", 0.0) - l0.get("__stage", 0.0),
    )
    return out


def postgres(measured_n: int, prior: int, variant: str = "fused") -> dict[str, Any]:
    from bench.peers import postgres as pg

    return pg.growth(measured_n, _chunks(prior), variant=variant, span_s=SPAN_PER_MILLION_S * measured_n / CHUNK)


def _rise(rows: list[dict[str, Any]]) -> float | None:
    if len(rows) < 2 or not rows[0].get("cost_us_per_event"):
        return None
    return float(rows[-1]["cost_us_per_event"] / rows[0]["cost_us_per_event"] - 1)


def run(events: int = 1_000_000, priors: tuple[int, ...] = (0, 4_000_000), peer: bool = True) -> dict[str, Any]:
    measured = parsed_events(events)
    ours = [storyline(measured, prior) for prior in priors]
    del measured
    out: dict[str, Any] = {"events": events, "priors": list(priors), "storyline": ours, "storyline_rise": _rise(ours)}
    if peer:
        try:
            theirs = [postgres(events, prior) for prior in priors]
            out["postgres"] = theirs
            out["postgres_rise"] = _rise(theirs)
        except Exception as exc:  # recorded, never silently left out
            out["postgres"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"bench.growth: the PostgreSQL peer did not run: {exc}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.growth", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--priors", default="0,4000000", help="comma-separated prior event counts")
    ap.add_argument("--no-peer", action="store_true", help="Storyline only")
    args = ap.parse_args(argv)
    priors = tuple(int(p) for p in args.priors.split(","))
    if args.events < 1 or any(p < 0 for p in priors):
        ap.error("--events must be >= 1 and --priors >= 0")
    print(json.dumps(run(args.events, priors, not args.no_peer), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
