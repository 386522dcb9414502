"""The database goes away mid-run while producers and consumers work.

* CQL: a private node (``CQL_NAME=chaos`` on 127.0.0.1:9342, never the shared one) is stopped with
  ``db/cql-node down`` and started again; a worker killed during the outage is restarted into it. Workers retry
  and resume; ``storyline ingest`` runs that fail are delivered again (at least once).
* Embedded: another process holds the SQLite write lock for longer than the busy timeout (the closest thing to
  an unavailable database a file has).

Both end with ``storyline run --drain`` and ``storyline verify --truth``: nothing skipped, nothing lost.
"""

from __future__ import annotations

import os
import signal
import sqlite3  # noqa: TID251 - the test holds the embedded store's file lock itself
import threading
import time
from pathlib import Path

import pytest

from tests.chaos.conftest import ChaosNode, Recorder, TenantFactory
from tests.chaos.harness import (
    Feeder,
    OffsetMonitor,
    Supervisor,
    finish,
    restart_backoffs,
    split,
    teardown,
    wait_readable,
)

pytestmark = pytest.mark.chaos

DOWN_S = 8.0  # how long the database stays away (after the stop has completed)


@pytest.mark.cql
def test_cql_node_stopped_and_restarted_mid_run(
    chaos_node: ChaosNode, chaos_node_tenant: TenantFactory, chaos_record: Recorder, sim_20k: tuple[Path, Path]
) -> None:
    t = chaos_node_tenant()
    t.run("init")
    src, truth = sim_20k
    feeder = Feeder(t, split(src, t.dir, 12), pause_s=1.0)
    sup = Supervisor(t)
    mon = OffsetMonitor(t.cfg)
    try:
        with teardown(feeder, mon, lambda: sup):
            sup.wait_workers()
            feeder.start()
            mon.wait_until(lambda offs: mon.caught_up(offs) and len(feeder.runs) >= 3, 120, "start")
            t_stop = time.time()
            stop_s = chaos_node.down()
            assert not chaos_node.answers()
            # A worker that dies during the outage is restarted into it: it must wait for the database, not exit.
            os.kill(sup.wait_workers()[0], signal.SIGKILL)
            time.sleep(DOWN_S)
            start_s = chaos_node.up()
            t_up = time.time()
            recovered = mon.wait_until(mon.caught_up, 180, "catching up after the restart", after=t_up)
            assert sup.proc.poll() is None, "the supervisor gave up"
            assert restart_backoffs(t.dir) == [1.0]  # the kill, and no exit of the restarted worker
            feeder.finish()
            wait_readable(t.cfg, feeder.done_at)
            mon.wait_until(mon.caught_up, 120, "the end", after=time.time())
            assert sup.stop() == 0
    finally:
        if not chaos_node.answers():
            chaos_node.up()  # leave it running for the next test and the teardown
    report = finish(t, truth, feeder.runs)
    assert report.events == 20_000
    chaos_record(
        "CQL node stopped and restarted mid-run",
        "cql",
        report,
        [recovered - t_up],
        1,
        failed_ingest_runs=feeder.failed_runs,
        outage_s=round(t_up - t_stop, 1),
        note=f"db/cql-node down ({stop_s:.1f} s), {DOWN_S:.0f} s down, up ({start_s:.1f} s until CQL answered); "
        "a worker killed right after the stop was restarted into the outage and waited for the node; "
        f"{feeder.failed_runs} ingest runs failed and were delivered again; recovery = node answering again "
        "until every shard is caught up",
    )
    t.assert_restart_changes_nothing(truth)


def hold_write_lock(path: str, seconds: float, held: threading.Event) -> None:
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        con.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(seconds)
        con.execute("ROLLBACK")
    finally:
        con.close()


def test_embedded_store_locked_by_another_process(
    embedded_tenant: TenantFactory, chaos_record: Recorder, sim_20k: tuple[Path, Path]
) -> None:
    t = embedded_tenant()  # the CQL form of this fault is the test above
    t.run("init")
    src, truth = sim_20k
    feeder = Feeder(t, split(src, t.dir, 12), pause_s=1.0)
    sup = Supervisor(t)
    mon = OffsetMonitor(t.cfg)
    with teardown(feeder, mon, lambda: sup):
        sup.wait_workers()
        feeder.start()
        mon.wait_until(lambda offs: mon.caught_up(offs) and len(feeder.runs) >= 3, 120, "start")
        held = threading.Event()
        locker = threading.Thread(target=hold_write_lock, args=(t.cfg.store.path, DOWN_S, held))
        t_lock = time.time()
        locker.start()
        assert held.wait(30)
        locker.join()
        t_free = time.time()
        recovered = mon.wait_until(mon.caught_up, 180, "catching up after the lock", after=t_free)
        feeder.finish()
        wait_readable(t.cfg, feeder.done_at)
        mon.wait_until(mon.caught_up, 120, "the end", after=time.time())
        assert sup.stop() == 0
    report = finish(t, truth, feeder.runs)
    assert report.events == 20_000
    chaos_record(
        "embedded store write-locked by another process",
        "embedded",
        report,
        [recovered - t_free],
        1,
        failed_ingest_runs=feeder.failed_runs,
        outage_s=round(t_free - t_lock, 1),
        note=f"BEGIN EXCLUSIVE held {DOWN_S:.0f} s (busy timeout = request_timeout_ms = 2 s); "
        f"{feeder.failed_runs} ingest runs failed and were delivered again; recovery = lock released until "
        "every shard is caught up",
    )
    t.assert_restart_changes_nothing(truth)
