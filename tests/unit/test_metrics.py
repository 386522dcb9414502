"""The supervisor's metrics (engine.runtime.metrics): counters monotonic across worker restarts, Prometheus names
and the docs' table."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from engine.runtime.metrics import COUNTERS, METRICS, Aggregator, Rate, WorkerMetrics, prometheus

ROOT = Path(__file__).resolve().parents[2]

# A process's reports: its counters only grow; a restart is a new owner whose counters start again from 0.
reports = st.lists(
    st.tuples(st.integers(0, 3), st.lists(st.integers(0, 50), min_size=len(COUNTERS), max_size=len(COUNTERS))),
    max_size=40,
)


@given(reports)
def test_a_slots_counters_never_decrease_whatever_its_processes_report(seq: list[tuple[int, list[int]]]) -> None:
    w = WorkerMetrics(0)
    owner, reported = 0, dict.fromkeys(COUNTERS, 0)
    last = dict.fromkeys(COUNTERS, 0)
    for restart, steps in seq:
        if restart == 0:  # a new process: its own counters start from zero
            owner += 1
            reported = dict.fromkeys(COUNTERS, 0)
        for key, step in zip(COUNTERS, steps, strict=True):
            reported[key] += step
        w.report(f"o{owner}", {**reported, "shards": {}})
        for key in COUNTERS:
            assert w.total(key) >= last[key], (key, w.total(key), last[key])
            last[key] = w.total(key)


def test_a_restart_adds_the_new_process_to_the_dead_ones() -> None:
    w = WorkerMetrics(0)
    w.report("a", {"events": 10, "errors": 2})
    w.report("a", {"events": 15, "errors": 2})
    w.report("b", {"events": 3, "errors": 0})  # the restarted process
    w.report("c", {"events": 1})
    assert (w.total("events"), w.total("errors")) == (15 + 3 + 1, 2)


def test_the_exposition_names_every_metric_by_the_conventions_and_the_docs_list_them() -> None:
    agg = Aggregator(2)
    agg.workers[1].report("x", {"events": 7, "shards": {"3": {"lag_s": 1.5}}})
    snap = agg.snapshot(
        1.0,
        Rate(0.0),
        [(11, True, 0, False), (None, False, 2, False)],
        waiting_s=0.0,
        until_bucket=None,
        lost_shards="",
        lost_count=0,
    )
    text = prometheus(snap)
    assert "storyline_events_total 7\n" in text and 'storyline_shard_lag_seconds{shard="3"} 1.500' in text
    assert 'storyline_worker_restarts_total{worker="1"} 2' in text and 'storyline_worker_up{worker="0"} 1' in text
    for m in METRICS:
        assert f"# TYPE {m.name} {m.type}\n" in text and f"# HELP {m.name} " in text
        assert m.name.startswith("storyline_") and m.name.endswith("_total") == (m.type == "counter"), m.name
        assert not re.search(r"_(ms|percent|milliseconds|kb|mb)(_|$)", m.name), m.name
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Metrics") :]
    listed = re.findall(r"^\| `(storyline_[a-z_]+)(?:\{[a-z]+\})?` \| (counter|gauge) \|", table, re.M)
    assert listed == [(m.name, m.type) for m in METRICS]
