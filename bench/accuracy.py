"""The accuracy table of docs/correlation.md: simulator scenarios by correlation rules, through the whole story path
(simulated sensors → producer → embedded store → worker → story builder, on a virtual clock), scored against the
simulator's ground truth with B-cubed precision / recall / F1 and the exact-story match rate.

A *rule* is a way of running the same scenario:

* ``instants``: the flow records' ``end_time`` removed before ingest, so every event is an instant (the engine
  before session intervals, issue 19 item 2);
* ``spans``: the lines as the sensors write them (flow records with ``end_time`` bound their session);
* ``learned``: as ``spans``, and sensor clock offsets learned from the events (``correlate.offsets.estimate``
  with its defaults: 60 s epochs; the two rules before run without it);
* ``learned 10 s``: the same with 10 s epochs (``correlate.offsets.epoch_ms``: the offsets are known sooner).

With the ``lookups`` scenarios, ``names_right`` is the share of the connections that follow a lookup whose story
carries the right DNS name (``names_wrong``: another name). Besides the scores over all events, ``after10`` gives
them over the stories whose events all arrive after the
first tenth of the events, and ``learned_after`` how many events had arrived when the offset table first placed
every sensor of the scenario within 2 s of its true offset against the reference (learned rules only).

``python -m bench.accuracy [--events N] [--seed S] [--scenario NAME ...]`` prints one JSON line per scenario and
rule, then a Markdown table. Each run is deterministic (same scenario and rule → same scores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from engine.core.config import from_mapping
from engine.ingest.canonical import ParseRules, parse_line
from engine.testing.pipeline import run_lines
from engine.tools.accuracy import score
from engine.tools.simulate import Scenario, generate

WINDOW_MS = 30_000

SCENARIOS: dict[str, dict[str, Any]] = {
    # the default scenario: every report an instant, sensors within ±5 s, reuse 10 min later
    "default": {},
    "no offset": {"skew_s": 0.0},
    # sessions that last (DNS tens of ms, HTTP seconds to minutes, others about 30 s with a tail to 5 min); firewall
    # and flow-log records are spans, HTTP requests fall anywhere in their connection
    "long sessions": {"spans": True},
    # long sessions whose 5-tuple is reused 35 to 44 s after the session's end: beyond the match window of the end
    "port reuse 35 s": {"spans": True, "port_reuse_fraction": 0.2, "reuse_gap_s": 35.0},
    # the same with every sensor's clock exact (what learned offsets are to give): the skew no longer narrows the gap
    "port reuse 35 s, no offset": {"spans": True, "port_reuse_fraction": 0.2, "reuse_gap_s": 35.0, "skew_s": 0.0},
    # sensor clocks off by up to ±30 s and ±5 min (every sensor; the learned offsets are relative to one of them)
    "±30 s": {"skew_s": 30.0},
    "±5 min": {"skew_s": 300.0},
    # one sensor on local time, an hour ahead of the others (±5 s)
    "one sensor +1 h": {"skew_overrides": {"edr-1": 3_600.0}},
    # reused 10 to 12.5 s after the end: within the match window of the end, so no rule here can separate them
    "port reuse 10 s": {"spans": True, "port_reuse_fraction": 0.2, "reuse_gap_s": 10.0},
    # connections to addresses their client looked up (names sharing CDN addresses, TTLs 60 s to 1 h): ``names``
    # scores the DNS names stories carry
    "DNS lookups": {"lookups": True},
    "DNS lookups, no offset": {"lookups": True, "skew_s": 0.0},
}
RULES = ("instants", "spans", "learned", "learned 10 s")


def _strip_end(line: bytes) -> bytes:
    doc = msgspec.json.decode(line)
    if "end_time" not in doc:
        return line
    del doc["end_time"]
    return msgspec.json.encode(doc)


def run(name: str, rule: str, *, events: int, seed: int) -> dict[str, Any]:
    """Scores of one scenario (``SCENARIOS[name]``) under one rule (``RULES``)."""
    scenario = Scenario(events=events, seed=seed, start_s=time.time() - 7_200, span_s=1_200, **SCENARIOS[name])
    evs, truth = generate(scenario)
    lines = [e.line for e in evs]
    if rule == "instants":
        lines = [_strip_end(line) for line in lines]
    elif rule not in RULES:
        raise ValueError(f"rule: {rule!r} is not one of {RULES}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_mapping(
            {
                "tenant": "bench_accuracy",
                "shards": 4,
                "store": {"backend": "embedded", "path": f"{tmp}/a.db"},
                "correlate": {
                    "match_window_ms": WINDOW_MS,
                    "max_wait_ms": 600_000,
                    "amend_horizon_ms": 3_600_000,
                    "offsets": {
                        "estimate": rule.startswith("learned"),
                        "epoch_ms": 10_000 if rule == "learned 10 s" else 60_000,
                    },
                },
            }
        )
        rules = ParseRules.from_config(cfg)
        parse: Callable[[bytes, int], Any] = lambda line, now: parse_line(line, rules, now)  # noqa: E731
        t0 = time.perf_counter()
        bodies: dict[str, Any] = {}
        predicted = run_lines(cfg, scenario.start_s, lines, [e.arrival_s for e in evs], parse, bodies=bodies)
        seconds = time.perf_counter() - t0
        learned_after = None
        if rule.startswith("learned"):
            learned_after = asyncio.run(_learned_after(cfg, scenario, evs, truth.skews))
    s = score(predicted, truth.stories)
    # the stories whose events all arrive after the first tenth of the events (evs is in arrival order)
    cut = evs[len(evs) // 10].arrival_s if evs else 0.0
    first: dict[str, float] = {}
    for e in evs:
        first[e.story] = min(first.get(e.story, e.arrival_s), e.arrival_s)
    late_truth = {e.id: e.story for e in evs if first[e.story] >= cut}
    late = score({k: v for k, v in predicted.items() if k in late_truth}, late_truth)
    return {
        "scenario": name,
        "rule": rule,
        **{k: round(v, 4) for k, v in s.items() if k in ("precision", "recall", "f1", "exact")},
        **score_names(truth.names, truth.stories, predicted, bodies),
        "after10": {k: round(v, 4) for k, v in late.items() if k in ("precision", "recall", "f1", "exact")},
        "learned_after": learned_after,
        "events": len(evs),
        "stories": int(s["stories"]),
        "seconds": round(seconds, 1),
    }


async def _learned_after(cfg: Any, scenario: Scenario, evs: Sequence[Any], skews: dict[str, float]) -> int | None:
    """How many events had arrived when a stored offset table first placed every sensor within 2 s (None: never)."""
    from engine.runtime.offsets import decode_table
    from engine.store import make_store

    epoch_ms = cfg.correlate.offsets.epoch_ms
    store = make_store(cfg)
    await store.open()
    try:
        first = int(scenario.start_s * 1000) // epoch_ms
        last = first + int((evs[-1].arrival_s + 60) * 1000) // epoch_ms + 2 if evs else first
        for epoch in range(first, last + 1):
            body = await store.read_offset_table(cfg.consumer, epoch)
            if body is None:
                continue
            table = decode_table(body)
            ref = table.reference
            if ref is None or set(table.offsets_us) != set(skews):
                continue
            if all(abs(v / 1e6 - (skews[k] - skews[ref])) <= 2.0 for k, v in table.offsets_us.items()):
                # the table applies from the epoch's start: events that arrived (were ingested) before it
                start_s = epoch * epoch_ms / 1000 - scenario.start_s
                return sum(1 for e in evs if e.arrival_s < start_s)
        return None
    finally:
        await store.close()


def score_names(
    names: dict[str, str], truth: dict[str, str], predicted: dict[str, str], bodies: dict[str, Any]
) -> dict[str, Any]:
    """Of the connections that follow a lookup (``names``: true story → its right name), the share whose story
    carries exactly that name (``names_right``; the story of the connection's first event), the share with a wrong
    one and the share with none; {} without such connections."""
    if not names:
        return {}
    first: dict[str, str] = {}
    for eid in sorted(truth):
        first.setdefault(truth[eid], eid)
    right = wrong = 0
    for story, expected in names.items():
        got = bodies.get(predicted.get(first.get(story, ""), ""), {}).get("dns_names")
        if got == [expected]:
            right += 1
        elif got:
            wrong += 1
    n = len(names)
    return {"names": n, "names_right": round(right / n, 4), "names_wrong": round(wrong / n, 4)}


def table(rows: Sequence[dict[str, Any]]) -> str:
    out = [
        "| scenario | rule | B³ precision | B³ recall | B³ F1 | exact match | after 10 %: F1 | exact | learned after "
        "| names right |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a = r["after10"]
        learned = "-" if r["learned_after"] is None else f"{r['learned_after']:,} events"
        names = f"{r['names_right']:.4f} of {r['names']:,}" if "names" in r else "-"
        out.append(
            f"| {r['scenario']} | {r['rule']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} "
            f"| {r['exact']:.4f} | {a['f1']:.4f} | {a['exact']:.4f} | {learned} | {names} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: all")
    ap.add_argument("--rule", action="append", choices=RULES, help="default: all")
    args = ap.parse_args(argv)
    rows = []
    for name in args.scenario or list(SCENARIOS):
        for rule in args.rule or RULES:
            row = run(name, rule, events=args.events, seed=args.seed)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
