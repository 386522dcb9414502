"""A group of engine instances (``storyline run --group``, issue 20) under faults while producers write the whole
time, with the default lease settings (lease_ms 10 s, renew_ms 2 s, group_poll_ms 1 s).

Three instances of one worker each share the 8 shards. In turn:

1. **kill -9** of a whole instance (supervisor and worker): its shards are taken over within ``lease_ms`` + 2 s.
2. **Network partition** (CQL only: a file has no network): one instance reaches the database only through a TCP
   proxy on 127.0.0.1; the proxy starts dropping every byte on its open connections and leaves new ones
   unanswered. The others take the instance's shards once its leases run out; after the link is restored the
   cut-off instance rejoins and gets its part back. It never exits. (Whether its writes stop in time cannot be
   seen from here — no byte of it gets through while cut — so the write bound is checked by
   ``tests/conformance/test_runtime.py::test_a_flush_sends_no_write_that_could_land_after_the_leases_end``.)
3. **SIGTERM** of an instance: a handover without waiting for any lease to run out.
4. A **new instance joins**: exactly the shards the assignment gives it move (the others keep their epoch).
5. **SIGSTOP** of an instance for twice ``lease_ms``, then SIGCONT: the others take its shards meanwhile; woken, it
   finds itself fenced and rejoins (the same worker process: it did not exit).

Throughout, no committed offset moves back; after each fault the story rows read before it still have the same
bytes (nothing stale: a member that wakes or comes back writes nothing that differs from what the current owner
wrote). At the end: ``run --drain`` and ``verify --truth`` with 0 events lost, the counts reconciled with the
ingest runs, and no ``(story_id, revision)`` stored as more than one row. The times go to docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import msgspec
import pytest

from engine.store import StoryRecord
from tests.chaos.conftest import Recorder, TenantFactory
from tests.chaos.harness import (
    Feeder,
    Group,
    OffsetMonitor,
    RowKey,
    Tenant,
    assert_nothing_stale,
    assert_one_row_per_revision,
    finish,
    split,
    story_rows,
    teardown,
    wait_readable,
    waited,
)
from tests.chaos.proxy import TcpProxy

pytestmark = pytest.mark.chaos

PARTS = 18
TAKEOVER_SLACK_S = 2.0  # the bound: a dead member's shards are taken within lease_ms + this


def test_a_group_under_kill_9_partition_sigterm_join_and_sigstop(
    backend: str, chaos_tenant: TenantFactory, chaos_record: Recorder, sim_20k: tuple[Path, Path]
) -> None:
    t = chaos_tenant()
    cfg = t.cfg
    lease_s, poll_s = cfg.lease_ms / 1000, cfg.group_poll_ms / 1000
    t.run("init")
    src, truth = sim_20k
    files = split(src, t.dir, PARTS)
    phases = 5 if backend == "cql" else 4
    begun = [0]  # faults injected so far: file k waits for its share of them, so production goes on during each
    feeder = Feeder(t, files, gate=lambda k: begun[0] >= k * (phases + 1) // PARTS, pause_s=0.5)
    mon = OffsetMonitor(cfg, members=True)
    group = Group(mon, cfg.shards)
    proxy = TcpProxy(int(cfg.store.contact_points[0].rsplit(":", 1)[1])) if backend == "cql" else None
    a_tenant = t
    if proxy is not None:  # instance a reaches the database only through the proxy
        store = msgspec.structs.replace(cfg.store, contact_points=[proxy.address])
        a_tenant = Tenant(msgspec.structs.replace(cfg, store=store), t.dir / "via-proxy")
    times: dict[str, float] = {}
    rows: dict[RowKey, StoryRecord] = {}

    try:
        with teardown(feeder, mon, lambda: list(group.instances.values())):
            for name in "abc":
                group.start(name, a_tenant if name == "a" else t)
            waited("three members share the shards", lambda: group.settled(*"abc"), time.time(), 90)
            feeder.start()
            mon.wait_until(lambda offs: mon.caught_up(offs) and len(feeder.runs) >= 1, 120, "start")

            # 1. kill -9 of instance c: a and b take its shards once its leases run out
            rows = story_rows(cfg)
            t0 = time.time()
            ids_before = {n: group.member(n) for n in "ab"}
            begun[0] += 1
            group.instances["c"].kill9_all()

            times["kill9_takeover_s"] = waited(
                "a and b take c's shards", lambda: group.settled("a", "b"), t0, lease_s + 15
            )
            assert {n: group.member(n) for n in "ab"} == ids_before
            assert times["kill9_takeover_s"] <= lease_s + TAKEOVER_SLACK_S, times
            rows = assert_nothing_stale(rows, "after the kill -9", cfg)

            # 2. (CQL) partition of instance a: b takes everything; a comes back and gets its part again
            if proxy is not None:
                a_worker = group.instances["a"].worker_pids()
                a_id = group.member("a")
                t0 = time.time()
                begun[0] += 1
                proxy.cut(drop=True)
                times["partition_takeover_s"] = waited(
                    "b takes the cut-off a's shards",
                    lambda: group.member("a") is None and group.held_by("b") == list(range(cfg.shards)),
                    t0,
                    lease_s + 15,
                )
                assert times["partition_takeover_s"] <= lease_s + TAKEOVER_SLACK_S + poll_s, times
                assert group.instances["a"].proc.poll() is None, "the cut-off instance must not exit"
                time.sleep(2 * poll_s)  # b works alone a little: a must not write over it when it comes back
                rows = assert_nothing_stale(rows, "during the partition", cfg)
                t0 = time.time()
                proxy.restore()
                times["partition_rejoin_s"] = waited(
                    "a rejoins and gets its part back", lambda: group.settled("a", "b"), t0, 60
                )
                assert group.member("a") == a_id and group.instances["a"].worker_pids() == a_worker
                rows = assert_nothing_stale(rows, "after the partition healed", cfg)

            # 3. SIGTERM of b: a takes over without waiting for a lease to run out
            t0 = time.time()
            begun[0] += 1
            group.instances["b"].proc.send_signal(signal.SIGTERM)
            times["sigterm_handover_s"] = waited(
                "a takes b's shards at once", lambda: group.held_by("a") == list(range(cfg.shards)), t0, 60
            )
            assert group.instances["b"].proc.wait(60) == 0, group.instances["b"].log()[-3000:]
            assert times["sigterm_handover_s"] < lease_s, f"the handover waited for the leases to run out: {times}"
            rows = assert_nothing_stale(rows, "after the SIGTERM", cfg)

            # 4. d joins: exactly its part of the new assignment moves; a's other shards keep their epoch
            before = group.epochs()
            t0 = time.time()
            begun[0] += 1
            group.start("d", t)
            times["join_s"] = waited("d joins and gets its part", lambda: group.settled("a", "d"), t0, 90)
            after, d_part = group.epochs(), group.assignment("a", "d")["d"]
            moved = sorted(s for s in range(cfg.shards) if after[s] != before[s])
            assert moved == d_part, f"only d's shards move: moved {moved}, d's part {d_part}"
            rows = assert_nothing_stale(rows, "after the join", cfg)

            # 5. SIGSTOP of a for 2 x lease_ms: d takes everything; woken, a is fenced and rejoins
            a = group.instances["a"]
            a_worker, a_id, a_logged = a.worker_pids(), group.member("a"), len(a.log())
            t0 = time.time()
            begun[0] += 1
            for pid in [a.pid, *a_worker]:
                os.kill(pid, signal.SIGSTOP)
            times["sigstop_takeover_s"] = waited(
                "d takes the paused a's shards", lambda: group.held_by("d") == list(range(cfg.shards)), t0, lease_s + 15
            )
            assert times["sigstop_takeover_s"] <= lease_s + TAKEOVER_SLACK_S + poll_s, times
            time.sleep(max(0.0, t0 + 2 * lease_s - time.time()))
            rows = assert_nothing_stale(rows, "while a was paused", cfg)
            t0 = time.time()
            for pid in [a.pid, *a_worker]:
                os.kill(pid, signal.SIGCONT)
            times["sigcont_rejoin_s"] = waited("a rejoins after SIGCONT", lambda: group.settled("a", "d"), t0, 60)
            assert a.worker_pids() == a_worker and group.member("a") == a_id, "a rejoined with the same processes"
            woke = a.log()[a_logged:]
            assert "refused" in woke, f"the woken worker found itself fenced (a refused renewal or commit): {woke}"
            rows = assert_nothing_stale(rows, "after the SIGCONT", cfg)

            feeder.finish()
            wait_readable(cfg, feeder.done_at)
            mon.wait_until(mon.caught_up, 120, "the last files", after=time.time())
            for name in "ad":
                group.instances[name].proc.send_signal(signal.SIGTERM)
            for name in "ad":
                assert group.instances[name].proc.wait(60) == 0, group.instances[name].log()[-3000:]
            assert not mon.backwards, f"committed offsets moved back: {mon.backwards[:5]}"
    finally:
        if proxy is not None:
            proxy.close()
    report = finish(t, truth, feeder.runs)
    assert_one_row_per_revision(story_rows(cfg))
    print(f"group ({backend}): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    chaos_record("group: kill -9, partition, SIGTERM, join, SIGSTOP", backend, report, list(times.values()),
                 len(times), **{k: round(v, 2) for k, v in times.items()})  # fmt: skip
