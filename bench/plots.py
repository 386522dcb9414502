"""PNG plots of one ``python -m bench`` results file: throughput per design, latency CDF, scaling, memory, growth.

``python -m bench.plots bench/results/<stamp>.json`` (``python -m bench`` calls :func:`plot_all` itself). Every
plot is drawn only from figures in that file; a figure that is missing (a peer that did not run) is left out
and named in the plot's title.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _get(tree: dict[str, Any], *path: str) -> float | None:
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


def plot_all(results: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[Path] = []

    # Throughput per design: end-to-end pipeline events/s (producers and consumers running together).
    designs = [
        ("Storyline, stories", _get(results, "pipeline", "storyline_events_per_s")),
        ("PostgreSQL + SQL job, fused stories", _get(results, "peer_postgres", "pipeline_events_per_s")),
        ("PostgreSQL + SQL job, summary rows", _get(results, "peer_postgres_lean", "pipeline_events_per_s")),
        ("Storyline, consume only", _get(results, "pipeline_count", "storyline_events_per_s")),
        ("CQL + Kafka keys, consume only", _get(results, "peer_kafka", "pipeline_events_per_s")),
    ]
    shown = [(n, v) for n, v in designs if v is not None]
    missing = [n for n, v in designs if v is None]
    fig, ax = plt.subplots(figsize=(8.5, 3.5))
    ax.barh(
        [n for n, _ in shown],
        [v for _, v in shown],
        color=["#2b6cb0" if n.startswith("Storyline") else "#a0aec0" for n, _ in shown],
    )
    for i, (_, v) in enumerate(shown):
        ax.text(v, i, f" {v:,.0f}", va="center")
    if shown:
        ax.set_xlim(0, max(v for _, v in shown) * 1.15)  # room for the longest bar's label
    ax.set_xlabel("events/s, ingest and consume concurrently (same data, same machine)")
    ax.set_title("Throughput per design" + (f" (not run: {', '.join(missing)})" if missing else ""))
    fig.tight_layout()
    path = stem.with_name(stem.name + "-throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    # Latency CDF, ingest -> final story.
    lat = results.get("latency", {}).get("latencies_s") or []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if lat:
        xs = sorted(lat)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label="Storyline")
        bound = _get(results, "latency", "latency_bound_s")
        if bound is not None:
            ax.axvline(bound, color="red", linestyle="--", label=f"bound lag + max_wait + 2 s = {bound:g} s")
    for name, key in (("PostgreSQL", "peer_postgres"), ("CQL + Kafka", "peer_kafka")):
        p50 = _get(results, key, "latency_p50_s") or _get(results, key, "latency_ack_to_consumed_p50_s")
        p99 = _get(results, key, "latency_p99_s") or _get(results, key, "latency_ack_to_consumed_p99_s")
        if p50 is not None and p99 is not None:
            ax.plot([p50, p99], [0.5, 0.99], "o", label=f"{name} p50/p99")
    ax.set_xlabel("seconds from durable write to the event's final story")
    ax.set_ylabel("fraction of events")
    ax.set_title("End-to-end latency (CDF)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = stem.with_name(stem.name + "-latency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    # Scaling with 1 and 2 worker processes, and the raw read ceiling.
    wanted = [
        ("raw partition reads", _get(results, "consume_cql", "raw", "events_per_s")),
        ("engine, 1 worker (in-process)", _get(results, "consume_cql", "engine_1w", "events_per_s")),
        ("storyline run, 1 worker", _get(results, "consume_cql", "run_1w", "events_per_s")),
        ("storyline run, 2 workers", _get(results, "consume_cql", "run_2w", "events_per_s")),
    ]
    bars = [(n, v) for n, v in wanted if v is not None]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([n for n, _ in bars], [v for _, v in bars], color="#2b6cb0")
    for i, (_, v) in enumerate(bars):
        ax.text(v, i, f" {v:,.0f}", va="center")
    ax.set_xlabel("events/s consumed (CQL node on the same 2 cores)")
    ax.set_title("Consume scaling")
    fig.tight_layout()
    path = stem.with_name(stem.name + "-scaling.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    # Memory vs open stories.
    points = results.get("stories", {}).get("memory", {}).get("points") or []
    if points:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot([p["open_stories"] for p in points], [p["rss_bytes"] / 2**20 for p in points], "o-")
        ax.set_xlabel("open stories (one story builder)")
        ax.set_ylabel("RSS, MiB")
        ax.set_title("Memory vs open stories")
        fig.tight_layout()
        path = stem.with_name(stem.name + "-memory.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)

    # Growth: cost per event (CPU µs, engine + database) with 0 and N events already stored.
    growth = results.get("growth") or {}
    series = [
        (name, rows)
        for name, rows in (("Storyline", growth.get("storyline")), ("PostgreSQL, fused", growth.get("postgres")))
        if isinstance(rows, list) and rows
    ]
    if series:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        priors = [int(r["prior_events"]) for r in series[0][1]]
        width = 0.8 / len(series)
        for k, (name, rows) in enumerate(series):
            xs = [i + k * width for i in range(len(rows))]
            ys = [float(r["cost_us_per_event"]) for r in rows]
            ax.bar(xs, ys, width, label=name, color="#2b6cb0" if name == "Storyline" else "#a0aec0")
            for x, y in zip(xs, ys, strict=True):
                ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(priors))])
        ax.set_xticklabels([f"{p:,} events stored" for p in priors])
        ax.set_ylabel("CPU µs per event (engine + database)")
        not_run = "" if len(series) == 2 else " (PostgreSQL not run)"
        ax.set_title(f"Cost per event as the tenant grows ({int(growth.get('events', 0)):,} events measured){not_run}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = stem.with_name(stem.name + "-growth.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m bench.plots RESULTS.json", file=sys.stderr)
        return 2
    src = Path(args[0])
    for p in plot_all(json.loads(src.read_text()), src.with_suffix("")):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
