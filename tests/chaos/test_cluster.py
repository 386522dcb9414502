"""The database as a cluster (issue 20): three Cassandra nodes on 127.0.0.1, .2 and .3 (``db/cql-node`` cluster
mode, private ports), a tenant with RF 3 at QUORUM, a group of two engine instances and producers running the whole
time. Then:

1. **kill -9 of node 1** — the seed, and the first contact point of every client — and, after a while with it
   gone, ``cluster-start 1``;
2. **node 3 stopped** (SIGTERM) for far longer than ``max_write_age_ms``, then started again.

The other two replicas hold a quorum, so writes and the lightweight transactions (commits, leases, claims) go on;
the returning node gets what it missed by hinted handoff (docs/operations.md). After each outage the engine must
be caught up again; at the end ``run --drain`` and ``verify --truth`` find every event that an ingest run
acknowledged (the counts reconciled with the ingest summaries: no write acknowledged and then missing), no
committed offset moved back, and no ``(story_id, revision)`` stored twice. The figures go to
docs/RELIABILITY.md.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.chaos.conftest import ChaosCluster, Recorder, TenantFactory
from tests.chaos.harness import (
    Feeder,
    Group,
    OffsetMonitor,
    assert_nothing_stale,
    assert_one_row_per_revision,
    finish,
    split,
    story_rows,
    teardown,
    wait_readable,
    waited,
)

pytestmark = [pytest.mark.chaos, pytest.mark.cql]

PARTS = 14
KILLED_S = 10.0  # how long node 1 stays dead
STOPPED_S = 15.0  # how long node 3 stays stopped (max_write_age_ms is 1 s here)


def test_a_database_node_killed_and_another_stopped_under_load(
    chaos_cluster: ChaosCluster, cluster_tenant: TenantFactory, chaos_record: Recorder, sim_20k: tuple[Path, Path]
) -> None:
    t = cluster_tenant()
    cfg = t.cfg
    assert 10 * cfg.max_write_age_ms < STOPPED_S * 1000
    t.run("init")
    src, truth = sim_20k
    begun = [0]  # outages begun: file k waits for its share of them, so production goes on during each
    feeder = Feeder(t, split(src, t.dir, PARTS), gate=lambda k: begun[0] >= k * 3 // PARTS, pause_s=0.5)
    mon = OffsetMonitor(cfg, members=True)
    group = Group(mon, cfg.shards)
    figures: dict[str, float] = {}

    def outage(name: str, down: str, node: int, away_s: float) -> None:
        """Take a node away while everything runs, bring it back, wait until the engine has caught up."""
        rows = story_rows(cfg)
        failed_before = feeder.failed_runs
        begun[0] += 1
        t0 = time.time()
        worst, behind_at = 0, t0  # the worst lag seen, and the last time the engine was not caught up

        def sample() -> None:
            nonlocal worst, behind_at
            offs = mon.snapshot(time.time() - 0.05)
            worst = max(worst, mon.behind_ms(offs))
            if not mon.caught_up(offs):
                behind_at = time.time()

        figures[f"{name}_s"] = chaos_cluster.script(down, str(node), while_running=sample)  # until it has gone
        while time.time() < t0 + away_s:
            sample()
            time.sleep(0.2)
        # until every node answers and sees the others UP again
        figures[f"{name}_restart_s"] = chaos_cluster.script("cluster-start", str(node), while_running=sample)
        t1 = time.time()
        figures[f"{name}_worst_behind_s"] = worst / 1000
        if behind_at < t1 - 1:  # caught up again while the node was away: when, counted from the fault
            figures[f"{name}_caught_up_while_away_s"] = behind_at - t0
        at = mon.wait_until(mon.caught_up, 180, f"caught up after node {node} returned", after=t1)
        figures[f"{name}_caught_up_after_return_s"] = max(0.0, at - t1)
        figures[f"{name}_failed_ingest_runs"] = feeder.failed_runs - failed_before
        figures[f"{name}_ingest_runs_while_away"] = sum(t0 <= e <= t1 for e in feeder.ended)
        assert all(s.proc.poll() is None for s in group.instances.values()), "an engine instance exited"
        assert_nothing_stale(rows, f"after {name}", cfg)

    with teardown(feeder, mon, lambda: list(group.instances.values())):
        for name in "ab":
            group.start(name, t)
        waited("two members share the shards", lambda: group.settled("a", "b"), time.time(), 120)
        feeder.start()
        mon.wait_until(lambda offs: mon.caught_up(offs) and len(feeder.runs) >= 2, 180, "start")
        outage("node1_kill9", "cluster-kill", 1, KILLED_S)
        outage("node3_stop", "cluster-stop", 3, STOPPED_S)
        feeder.finish()
        wait_readable(cfg, feeder.done_at)
        mon.wait_until(mon.caught_up, 120, "the last files", after=time.time())
        for sup in group.instances.values():
            sup.proc.send_signal(signal.SIGTERM)
        for sup in group.instances.values():
            assert sup.proc.wait(60) == 0, sup.log()[-3000:]
        assert not mon.backwards, f"committed offsets moved back: {mon.backwards[:5]}"
    report = finish(t, truth, feeder.runs)
    assert_one_row_per_revision(story_rows(cfg))
    print("cluster: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    chaos_record(
        "database cluster (RF 3, QUORUM): kill -9 of node 1, node 3 stopped 15 s",
        "cql-cluster",
        report,
        [figures["node1_kill9_caught_up_after_return_s"], figures["node3_stop_caught_up_after_return_s"]],
        2,
        **{k: round(v, 2) for k, v in figures.items()},
    )
