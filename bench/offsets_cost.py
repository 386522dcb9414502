"""``python -m bench.offsets_cost [--events N] [--rounds R]``: what learning sensor clock offsets costs the story
builder, in-process.

The simulator's default scenario (seed 2, 20 min of sessions) is cut into partitions as a worker reads them
(16 shards by flow, 1 s buckets by arrival) and fed to :class:`engine.correlate.story.StoryMachine` ten buckets per
call, then drained — once with ``correlate.offsets.estimate`` off and once on, alternated for ``rounds`` rounds
(the second half in reverse order), one polars thread. No store: the figure is the stage's own CPU
(``time.process_time``) per event. With estimation on, each epoch's table is built in-process from the evidence
the machine emitted (as the worker's keeper builds it from the stored rows) and handed over before the epoch, so
the run applies learned offsets and re-corrects its open stories at epoch boundaries; the evidence and the
re-correction steps are also timed on their own. Prints every run and the medians.

``--dns``: the same for DNS names on connections (``correlate.dns_names`` off, then on; estimation off in both):
the simulator's ``lookups`` scenario (connections to the addresses of names their client looked up), the tables
carrying the answers built and handed as above; the steps timed on their own are taking the answers from the
DNS events, looking names up (one call per emitted revision of a story with a flow) and the amendments at epoch
boundaries. :func:`dns_cost` is what ``make bench`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec

from engine.core.config import Config, from_mapping
from engine.core.event import encode
from engine.core.stage import Batch, Emission
from engine.correlate.offsets import EvidenceRow, TableBook
from engine.correlate.story import StoryMachine
from engine.ingest.canonical import ParseRules, parse_line
from engine.store import EventRecord
from engine.tools.simulate import Scenario, generate

SHARDS = 16
_row_decoder = msgspec.msgpack.Decoder(EvidenceRow)


def _config(estimate: bool, dns: bool = False, long_waits: bool = False) -> Config:
    """The bench's tenant: 16 shards, 1 s buckets; short waits (60 s, horizon 10 min) to keep the state small, or
    with ``long_waits`` the defaults of a deployment (10 min, 1 h; the DNS runs: with a wait shorter than the
    epoch or two an answer takes to reach the tables, most named connections would be emitted first without
    their name and amended)."""
    return from_mapping(
        {
            "tenant": "bench_offsets",
            "shards": SHARDS,
            "bucket_ms": 1000,
            "correlate": {
                "match_window_ms": 30_000,
                "max_wait_ms": 600_000 if long_waits else 60_000,
                "amend_horizon_ms": 3_600_000 if long_waits else 600_000,
                "offsets": {"estimate": estimate},
                "dns_names": dns,
            },
        }
    )


def _partitions(n: int, lookups: bool = False) -> dict[int, dict[int, list[EventRecord]]]:
    start = time.time() - 7_200
    events, _ = generate(Scenario(events=n, seed=2, start_s=start, span_s=1_200, lookups=lookups))
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


def _rows(emission: Emission) -> list[EvidenceRow]:
    return [_row_decoder.decode(r.body) for r in emission.evidence]


def _tables(cfg: Config) -> TableBook:
    """The runtime's part, in-process: each epoch's table built once from the evidence the machine emitted (as
    engine.runtime.offsets.OffsetKeeper does from the stored rows), so the run applies learned tables and
    re-corrects its state as a worker does."""
    o = cfg.correlate.offsets
    return TableBook(
        reference=cfg.correlate.reference_sensor,
        min_samples=o.min_samples,
        delay_epochs=o.delay_epochs,
        expire_epochs=max(1, cfg.ttl_ms // o.epoch_ms),
    )


def _run(
    parts: dict[int, dict[int, list[EventRecord]]], n: int, estimate: bool, dns: bool = False, long_waits: bool = False
) -> dict[str, float]:
    cfg = _config(estimate, dns, long_waits)
    machine = StoryMachine.for_config(cfg)
    tables = _tables(cfg)
    if estimate or dns:
        machine.use_offset_tables()
    spent = dict.fromkeys(("evidence", "recorrect", "dns_gather", "dns_lookup", "dns_amend"), 0.0)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            t = time.process_time()
            out = fn(*args)
            spent[name] += time.process_time() - t
            return out

        return run

    machine._gather_evidence = timed("evidence", machine._gather_evidence)  # type: ignore[method-assign]
    machine._recorrect = timed("recorrect", machine._recorrect)  # type: ignore[method-assign]
    machine._gather_dns = timed("dns_gather", machine._gather_dns)  # type: ignore[method-assign]
    machine._dns_amend = timed("dns_amend", machine._dns_amend)  # type: ignore[method-assign]
    machine.dns_view.lookup = timed("dns_lookup", machine.dns_view.lookup)  # type: ignore[method-assign]
    order = sorted(parts)
    t0 = time.process_time()
    for i in range(0, len(order), 10):
        call = [(b, {s: Batch(r) for s, r in parts[b].items()}) for b in order[i : i + 10]]
        epochs = {b // machine.epoch_buckets for b, _ in call}
        for group in sorted(epochs):  # a worker never hands one call two epochs while learning
            part = [(b, x) for b, x in call if b // machine.epoch_buckets == group]
            for e in machine.offset_epochs(part):
                machine.set_offset_table(tables.table(e))
            tables.add(_rows(machine.on_buckets(part)))
    tables.add(_rows(machine.close_epochs(list(range(SHARDS)), order[-1] // machine.epoch_buckets)))
    for e in machine.offset_epochs([(order[-1], dict.fromkeys(range(SHARDS), Batch([])))], drain=True):
        machine.set_offset_table(tables.table(e))
    machine.drain(list(range(SHARDS)), order[-1])
    total = time.process_time() - t0
    return {
        "estimate": float(estimate),
        "dns": float(dns),
        "us_per_event": total / n * 1e6,
        **{f"{k}_us_per_event": v / n * 1e6 for k, v in spent.items()},
        "rows_recorrected": float(machine.counters.recorrected),
        "merged": float(machine.counters.merged),
        "dns_answers": float(machine.counters.dns_answers),
        "dns_named": float(machine.counters.dns_named),
        "dns_amended": float(machine.counters.dns_amended),
    }


def dns_cost(events: int = 30_000, rounds: int = 2) -> dict[str, Any]:
    """DNS names off and on (alternated, ``rounds`` each) on the ``lookups`` scenario: median µs per event, the
    ratio, and the DNS steps' µs per event and share of the 'on' figure."""
    parts = _partitions(events, lookups=True)
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for r in range(rounds):
        for dns in (False, True) if r < rounds / 2 else (True, False):
            runs[dns].append(_run(parts, events, False, dns, long_waits=True))
    off = statistics.median(r["us_per_event"] for r in runs[False])
    on = statistics.median(r["us_per_event"] for r in runs[True])
    out: dict[str, Any] = {
        "events": events,
        "median_us_per_event_off": round(off, 2),
        "median_us_per_event_on": round(on, 2),
        "ratio_on_off": round(on / off, 3),
    }
    for step in ("dns_gather", "dns_lookup", "dns_amend"):
        v = statistics.median(r[f"{step}_us_per_event"] for r in runs[True])
        out[f"median_{step}_us_per_event"] = round(v, 2)
        out[f"{step}_share_of_on"] = round(v / on, 4)
    last = runs[True][-1]
    out.update(answers=int(last["dns_answers"]), named=int(last["dns_named"]), amended=int(last["dns_amended"]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.offsets_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dns", action="store_true", help="DNS names off / on instead of estimation off / on")
    args = ap.parse_args(argv)
    if args.dns:
        print(json.dumps(dns_cost(args.events, args.rounds)))
        return
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
    rc = statistics.median(r["recorrect_us_per_event"] for r in runs[True])
    summary: dict[str, Any] = {
        "events": args.events,
        "median_us_per_event_off": round(off, 2),
        "median_us_per_event_on": round(on, 2),
        "ratio_on_off": round(on / off, 3),
        "median_evidence_us_per_event": round(ev, 2),
        "evidence_share_of_on": round(ev / on, 4),
        "median_recorrect_us_per_event": round(rc, 2),
        "recorrect_share_of_on": round(rc / on, 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
