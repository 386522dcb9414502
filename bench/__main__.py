"""``python -m bench``: store-level benchmarks on the embedded store and the local CQL node.

Measures, in one run and on one machine, the partition write path (``Store.append``) and the partition read
path (``Store.read_partition``) for the same synthetic events on both stores, and reports their ratio. Results
go to ``bench/results/<UTC timestamp>.json``. The suite grows with the engine (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from bench.ingest import client_cost, ingest_bench
from engine import __version__
from engine.core.config import Config, from_mapping
from engine.store import EventRecord, Store, make_store

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import psutil

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "storyline": __version__,
        "msgspec": msgspec.__version__,
    }


def progress(label: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{label:<28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def store_round(cfg: Config, events: int, partitions: int, payload: int, concurrency: int) -> dict[str, float]:
    store: Store = make_store(cfg)
    await store.open()
    try:
        await store.init_schema()
        rnd = random.Random(42)
        per = events // partitions
        parts = [
            (
                p % cfg.shards,
                1_000_000 + p // cfg.shards,
                [EventRecord(f"{uuid.UUID(int=rnd.getrandbits(128)).hex}", rnd.randbytes(payload)) for _ in range(per)],
            )
            for p in range(partitions)
        ]
        sem = asyncio.Semaphore(concurrency)
        done = 0

        async def write(shard: int, bucket: int, evs: list[EventRecord]) -> None:
            nonlocal done
            async with sem:
                for i in range(0, len(evs), 500):  # producer-sized appends
                    await store.append(shard, bucket, evs[i : i + 500])
            done += 1
            progress(f"{cfg.store.backend}: write", done, partitions)

        t0 = time.perf_counter()
        await asyncio.gather(*(write(*p) for p in parts))
        t_write = time.perf_counter() - t0

        read_n = 0
        done = 0

        async def read(shard: int, bucket: int) -> None:
            nonlocal read_n, done
            async with sem:
                async for page in store.read_partition(shard, bucket):
                    read_n += len(page.events)
            done += 1
            progress(f"{cfg.store.backend}: read", done, partitions)

        t0 = time.perf_counter()
        await asyncio.gather(*(read(s, b) for s, b, _ in parts))
        t_read = time.perf_counter() - t0
        if read_n != per * partitions:
            raise SystemExit(f"bench: read {read_n} events, wrote {per * partitions}")
        return {
            "events": per * partitions,
            "payload_bytes": payload,
            "write_events_per_s": per * partitions / t_write,
            "read_events_per_s": read_n / t_read,
            "write_mb_per_s": per * partitions * payload / t_write / 1e6,
            "read_mb_per_s": read_n * payload / t_read / 1e6,
        }
    finally:
        await store.drop_schema()
        await store.close()


def peers(args: argparse.Namespace) -> dict[str, Any]:
    """The peer designs (bench/peers) and the driver check on the same data, and Storyline's ratios to them.
    A peer that cannot run here is recorded with its error, never silently left out."""
    import importlib

    out: dict[str, Any] = {}
    for key, module, kwargs in (
        ("peer_postgres", "bench.peers.postgres", {"n_events": args.pipeline_events, "variant": "fused"}),
        ("peer_postgres_lean", "bench.peers.postgres", {"n_events": args.pipeline_events, "variant": "lean"}),
        ("peer_kafka", "bench.peers.kafka", {"n_events": args.pipeline_events}),
        ("drivers", "bench.drivers", {}),
    ):
        try:
            mod = importlib.import_module(module)
            out[key] = mod.run(**kwargs)
        except Exception as exc:  # recorded in the results and printed
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"bench: {module} did not run: {exc}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=200)
    ap.add_argument("--payload", type=int, default=300, help="bytes per event (typical canonical event)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--cql", default="127.0.0.1:9042")
    ap.add_argument("--skip-cql", action="store_true")
    ap.add_argument("--ingest-small", type=int, default=100_000, help="~500 B events for the ingest bench")
    ap.add_argument("--ingest-large", type=int, default=60, help="1 MiB events for the ingest bench")
    ap.add_argument("--consume-events", type=int, default=500_000, help="events for the consume bench")
    ap.add_argument("--correlate-events", type=int, default=1_000_000, help="events for the link bench")
    ap.add_argument("--latency-events", type=int, default=20_000, help="simulated events sent live")
    ap.add_argument("--latency-speed", type=float, default=20.0, help="arrival-time compression of the live run")
    ap.add_argument("--pipeline-events", type=int, default=1_000_000, help="events for the pipeline and the peers")
    ap.add_argument(
        "--growth-prior", type=int, default=4_000_000, help="events stored before the growth run (0: no growth run)"
    )
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    run = uuid.uuid4().hex[:8]
    results["client"] = client_cost()
    with tempfile.TemporaryDirectory() as tmp:
        emb = from_mapping({"tenant": f"bench_{run}", "store": {"backend": "embedded", "path": f"{tmp}/b.db"}})
        results["embedded"] = asyncio.run(store_round(emb, args.events, args.partitions, args.payload, 1))
        results["ingest_embedded"] = ingest_bench("embedded", tmp, args.cql, args.ingest_small, args.ingest_large)
        if not args.skip_cql:
            results["ingest_cql"] = ingest_bench("cql", tmp, args.cql, args.ingest_small, args.ingest_large)
    if not args.skip_cql:
        cql = from_mapping({"tenant": f"bench_{run}", "store": {"backend": "cql", "contact_points": [args.cql]}})
        results["cql"] = asyncio.run(store_round(cql, args.events, args.partitions, args.payload, args.concurrency))
        results["cql_vs_embedded_write_ratio"] = (
            results["cql"]["write_events_per_s"] / results["embedded"]["write_events_per_s"]
        )
        results["cql_vs_embedded_read_ratio"] = (
            results["cql"]["read_events_per_s"] / results["embedded"]["read_events_per_s"]
        )
    if not args.skip_cql:
        from bench import consume

        results["consume_cql"] = consume.run(args.consume_events, "cql")
        results["consume_vs_raw_ratio"] = results["consume_cql"]["consume_vs_raw_ratio"]
        results["idle_cpu_percent"] = results["consume_cql"]["idle"]["cpu_percent_of_one_core"]
    from bench import correlate, stage, stories

    results["stories"] = stories.run()
    progress("stage at 100 ms buckets (~2 min)", 0, 1)
    results["stage"] = {mode: stage.run(mode=mode) for mode in ("grouped", "per-shard")}
    results["stage_per_shard_vs_grouped_ratio"] = (
        results["stage"]["per-shard"]["stage_seconds"] / results["stage"]["grouped"]["stage_seconds"]
    )
    progress("stage at 100 ms buckets (~2 min)", 1, 1)
    from bench import offsets_cost
    from bench import story_cpu as story_inproc

    progress("story builder in-process at the pipeline's rate (~1 min)", 0, 1)
    results["story_inproc"] = story_inproc.run(rounds=2)
    results["story_inproc_us_per_event"] = results["story_inproc"]["median_us_per_event"]
    progress("story builder in-process at the pipeline's rate (~1 min)", 1, 1)

    progress("DNS names on connections, off and on (~1 min)", 0, 1)
    results["dns_names"] = offsets_cost.dns_cost()
    progress("DNS names on connections, off and on (~1 min)", 1, 1)
    if not args.skip_cql:
        from bench import latency, pipeline

        progress("latency (live, ~3 min)", 0, 1)
        # bench.toml's 100 ms buckets, and 500 ms buckets for comparison
        results["latency"] = latency.run(args.latency_events, args.latency_speed, 2, "cql")
        results["latency_500ms_buckets"] = latency.run(
            args.latency_events, args.latency_speed, 2, "cql", extra_sets=("bucket_ms=500",)
        )
        results["latency_500ms_buckets"].pop("latencies_s", None)
        results["latency_p99_s"] = results["latency"]["latency_p99_s"]
        progress("latency (live, ~3 min)", 1, 1)
        progress("pipeline, stories and consume only (~4 min)", 0, 1)
        pipe = pipeline.run(args.pipeline_events, 2, stages=("stories", "count"))
        results["pipeline"], results["pipeline_count"] = pipe["stories"], pipe["count"]
        story_cpu, count_cpu = pipe["stories"]["cpu_us_per_event"], pipe["count"]["cpu_us_per_event"]
        results["story_engine_cpu_us_per_event"] = story_cpu["engine"]
        results["consume_engine_cpu_us_per_event"] = count_cpu["engine"]
        results["producer_cpu_us_per_event"] = story_cpu["producer"]
        results["story_node_cpu_vs_consume_ratio"] = (
            story_cpu["cql_node"] / count_cpu["cql_node"] if story_cpu["cql_node"] and count_cpu["cql_node"] else None
        )
        results["story_cost_ledger"] = pipe["stories"]["cost_ledger_us_per_event"]
        progress("pipeline, stories and consume only (~4 min)", 1, 1)
        progress("latency under the pipeline's load (~1 min)", 0, 1)
        results["latency_under_load"] = latency.under_load(pipeline.parsed_events(args.pipeline_events))
        results["latency_after_quiet_p99_s"] = results["latency_under_load"]["after_quiet_p99_s"]
        progress("latency under the pipeline's load (~1 min)", 1, 1)
        results.update(peers(args))
        if args.growth_prior:
            from bench import growth

            progress("growth, 0 and N events stored (~15 min)", 0, 1)
            results["growth"] = growth.run(args.pipeline_events, (0, args.growth_prior))
            results["growth_storyline_rise"] = results["growth"]["storyline_rise"]
            results["growth_postgres_rise"] = results["growth"].get("postgres_rise")
            progress("growth, 0 and N events stored (~15 min)", 1, 1)

    from bench import normalize

    progress("sensor formats to canonical events, one core (~10 s)", 0, 1)
    results["normalize"] = normalize.run()
    for key, part in (("zeek_conn", "zeek_conn_tsv"), ("eve", "eve_mix"), ("vpcflow", "vpcflow_v2")):
        results[f"normalize_{key}_events_per_s"] = results["normalize"][part]["events_per_s"]
    progress("sensor formats to canonical events, one core (~10 s)", 1, 1)
    from bench import feed

    progress("story feed, read and follow (~1 min)", 0, 1)
    results["feed"] = feed.run("embedded" if args.skip_cql else "cql", cql=args.cql)
    results["feed_revisions_per_s"] = results["feed"]["throughput"]["revisions_per_s"]
    results["feed_follow_p99_s"] = results["feed"]["follow"]["follow_p99_s"]
    progress("story feed, read and follow (~1 min)", 1, 1)
    results["correlate"] = correlate.run(args.correlate_events)
    results["correlate_events_per_s"] = results["correlate"]["link_events_per_s"]
    results["correlate_fuse_events_per_s"] = results["correlate"]["fuse_events_per_s"]
    results["correlate_vs_baseline_ratio"] = results["correlate"]["link_vs_baseline_ratio"]
    # Like for like: the PostgreSQL design builds stories, so it is compared with Storyline building stories; the
    # Kafka design's consumers deliver decoded records, so it is compared with Storyline consuming (count stage).
    # Storyline with stories against the Kafka design is reported too (vs_queue_stories_ratio).
    for key, ours_key, peer in (
        ("vs_postgres_ratio", "pipeline", "peer_postgres"),
        ("vs_postgres_lean_ratio", "pipeline", "peer_postgres_lean"),
        ("vs_queue_ratio", "pipeline_count", "peer_kafka"),
        ("vs_queue_stories_ratio", "pipeline", "peer_kafka"),
    ):
        ours = results.get(ours_key, {}).get("storyline_events_per_s")
        theirs = results.get(peer, {}).get("pipeline_events_per_s")
        results[key] = ours / theirs if ours and theirs else None
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(results, indent=2))
    try:
        from bench.plots import plot_all

        results["plots"] = [str(p) for p in plot_all(results, out.with_suffix(""))]
        out.write_text(json.dumps(results, indent=2))
    except ImportError as exc:  # matplotlib is a dev dependency
        print(f"bench: no plots ({exc})", file=sys.stderr)
    print(f"{'store':<10} {'write ev/s':>12} {'read ev/s':>12} {'write MB/s':>11} {'read MB/s':>10}")
    for name in ("embedded", "cql"):
        r = results.get(name)
        if r:
            print(
                f"{name:<10} {r['write_events_per_s']:>12,.0f} {r['read_events_per_s']:>12,.0f} "
                f"{r['write_mb_per_s']:>11.1f} {r['read_mb_per_s']:>10.1f}"
            )
    c = results["client"]
    print(
        f"client side per ~{c['avg_line_bytes']:.0f} B event: {c['client_us_per_event']:.2f} us "
        f"(parse {c['parse_us_per_event']:.2f} + encode/shard/group {c['encode_shard_group_us_per_event']:.2f}), "
        f"{c['client_events_per_s']:,.0f} events/s on one core"
    )
    print(f"{'ingest':<10} {'small ev/s':>12} {'small MB/s':>11} {'1 MiB ev/s':>11} {'1 MiB MB/s':>11}")
    for name in ("embedded", "cql"):
        r = results.get(f"ingest_{name}")
        if r:
            print(
                f"{name:<10} {r['small']['events_per_s']:>12,.0f} {r['small']['mb_per_s']:>11.1f} "
                f"{r['large']['events_per_s']:>11,.1f} {r['large']['mb_per_s']:>11.1f}"
            )
    if "consume_cql" in results:
        c2 = results["consume_cql"]
        print(
            f"consume (cql, {c2['events']:,} events): engine 1 worker {c2['engine_1w']['events_per_s']:,.0f}/s, "
            f"raw {c2['raw']['events_per_s']:,.0f}/s, ratio {c2['consume_vs_raw_ratio']:.2f} (median of "
            f"{', '.join(f'{r:.2f}' for r in c2['consume_vs_raw_ratios'])}); run 1w "
            f"{c2['run_1w']['events_per_s']:,.0f}/s, 2w {c2['run_2w']['events_per_s']:,.0f}/s; idle 256 shards "
            f"{c2['idle']['cpu_percent_of_one_core']:.2f} % of a core"
        )
    cr = results["correlate"]
    print(
        f"correlate link: {cr['link_events_per_s']:,.0f} events/s, baseline {cr['baseline_events_per_s']:,.0f}/s, "
        f"ratio {cr['link_vs_baseline_ratio']:.1f}"
    )
    st = results["stories"]
    print(
        f"story builder: {st['stage']['stage_events_per_s']:,.0f} events/s (link + state + fused stories + SQLite "
        f"writes); accuracy default scenario P {st['accuracy']['precision']:.3f} R {st['accuracy']['recall']:.3f} "
        f"exact {st['accuracy']['exact']:.3f}; with ±20 s skew R {st['accuracy_skew20']['recall']:.3f}"
    )
    sg = results["stage"]
    print(
        f"story stage at 100 ms buckets x 16 shards (no store): one call per bucket "
        f"{sg['grouped']['share_of_real_time']:.0%} of real time, one per shard and bucket "
        f"{sg['per-shard']['share_of_real_time']:.0%} (x{results['stage_per_shard_vs_grouped_ratio']:.1f})"
    )
    if "latency" in results:
        la = results["latency"]
        print(
            f"latency ingest -> final story ({la['events']:,} events live): p50 {la['latency_p50_s']:.2f} s, "
            f"p95 {la['latency_p95_s']:.2f} s, p99 {la['latency_p99_s']:.2f} s (bound {la['latency_bound_s']:g} s); "
            f"from the story's last member: p50 {la['after_quiet_p50_s']:.2f} s, p99 {la['after_quiet_p99_s']:.2f} s"
        )
    if "latency_under_load" in results:
        lu = results["latency_under_load"]
        print(
            f"latency under the pipeline's load ({lu['events']:,} events, {len(lu['observed_shards'])} shards "
            f"observed): from the story's last member p50 {lu['after_quiet_p50_s']:.2f} s, p99 "
            f"{lu['after_quiet_p99_s']:.2f} s (bound lag + max_wait + 1 s = {lu['bound_s']:g} s)"
        )
    if "growth" in results:
        gr = results["growth"]
        for name in ("storyline", "postgres"):
            rows = gr.get(name)
            if isinstance(rows, list):
                costs = ", ".join(f"{r['prior_events']:,} stored: {r['cost_us_per_event']:.1f}" for r in rows)
                rise = gr.get(f"{name}_rise")
                print(f"growth {name}: CPU us/event {costs}" + (f"; rise {rise:+.1%}" if rise is not None else ""))
    for name in ("pipeline", "pipeline_count"):
        pi = results.get(name)
        if pi:
            print(
                f"pipeline {pi['stage']} (ingest + 2 workers, {pi['events']:,} events): "
                f"{pi['storyline_events_per_s']:,.0f} events/s incl. the {pi['includes_lag_s']:g} s lag, "
                f"{pi['storyline_sustained_events_per_s']:,.0f} without it"
            )
    dn = results.get("dns_names")
    if dn:
        print(
            f"DNS names (story builder in-process, {dn['events']:,} events of the lookups scenario): "
            f"{dn['median_us_per_event_off']:.1f} -> {dn['median_us_per_event_on']:.1f} us/event "
            f"(ratio {dn['ratio_on_off']:.3f}); answers {dn['median_dns_gather_us_per_event']:.2f}, lookups "
            f"{dn['median_dns_lookup_us_per_event']:.2f}, amendments {dn['median_dns_amend_us_per_event']:.2f} us/event"
        )
    if "story_cost_ledger" in results:
        led = results["story_cost_ledger"]
        print(
            f"story path engine CPU {results['story_engine_cpu_us_per_event']:.1f} us/event (consume only "
            f"{results['consume_engine_cpu_us_per_event']:.1f}), node ratio "
            f"{results['story_node_cpu_vs_consume_ratio'] or float('nan'):.2f}; ledger us/event: "
            + ", ".join(f"{k} {v:.2f}" for k, v in led.items())
        )
    if "pipeline" in results:
        for key, peer in (
            ("vs_postgres_ratio", "peer_postgres"),
            ("vs_postgres_lean_ratio", "peer_postgres_lean"),
            ("vs_queue_ratio", "peer_kafka"),
            ("vs_queue_stories_ratio", "peer_kafka"),
        ):
            r = results.get(key)
            err = results.get(peer, {}).get("error")
            print(f"{key}: {r:.2f}" if r else f"{key}: not measured ({err or 'no figure'})")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
