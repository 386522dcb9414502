"""kill -9 of worker processes and of the supervisor while producers and consumers run (docs/RELIABILITY.md).

200,000 simulated events (plus invalid lines for the dead-letter store) are delivered in 22 ingest runs spread
over the whole test; meanwhile ten random worker processes are killed with SIGKILL (the supervisor restarts
them) and, halfway, the supervisor itself (its workers notice their parent is gone and exit; a new supervisor
is started at once). After each fault the test waits until every shard is caught up again under a new owner
(the recovery time). It ends with ``storyline run --drain`` and ``storyline verify --truth``: every accepted
event in exactly one story, nothing lost, the counts reconciled with the ingest summaries.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from engine.store import Offset
from tests.chaos.conftest import Recorder, TenantFactory
from tests.chaos.harness import (
    Feeder,
    OffsetMonitor,
    Supervisor,
    alive,
    finish,
    owners,
    restart_backoffs,
    simulate,
    split,
    teardown,
    wait_readable,
)

pytestmark = pytest.mark.chaos

EVENTS = 200_000
PARTS = 22
FAULTS = ["worker"] * 5 + ["supervisor"] + ["worker"] * 5


@pytest.fixture(scope="session")
def sim_200k(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return simulate(tmp_path_factory.mktemp("sim"), EVENTS, seed=7)


def test_kill_9_of_workers_and_of_the_supervisor(
    backend: str, chaos_tenant: TenantFactory, chaos_record: Recorder, sim_200k: tuple[Path, Path]
) -> None:
    rng = random.Random(20261126)
    t = chaos_tenant()
    t.run("init")
    src, truth = sim_200k
    files = split(src, t.dir, PARTS)
    done = [0]  # faults injected and recovered from
    # File k is delivered once the faults before its share of the run are done: production goes on during
    # every fault, and the last files arrive after the last one.
    feeder = Feeder(t, files, gate=lambda k: done[0] >= k * (len(FAULTS) + 1) // PARTS)
    sup = Supervisor(t)
    mon = OffsetMonitor(t.cfg)
    recovery: list[float] = []
    orphan_exit_s = 0.0
    with teardown(feeder, mon, lambda: sup):
        labels = dict(zip(sup.wait_workers(), (0, 1), strict=True))  # worker pid -> slot (as far as we know)
        kills = [0, 0]
        feeder.start()
        mon.wait_until(mon.caught_up, 120, "start")
        for i, kind in enumerate(FAULTS):
            time.sleep(rng.uniform(0.3, 1.5))  # ingest and consumption under way
            before = owners(mon.snapshot())
            if kind == "worker":
                pids = sup.wait_workers()
                for p in pids:  # the restarted worker takes the slot of the one that is gone
                    if p not in labels:
                        labels[p] = ({0, 1} - {labels[q] for q in pids if q in labels}).pop()
                # A random worker of the slots killed least so far: the restart backoff doubles per slot, so
                # spreading the kills keeps the run short without choosing the victim by hand.
                least = min(kills[labels[p]] for p in pids)
                victim = rng.choice(sorted(p for p in pids if kills[labels[p]] == least))
                kills[labels[victim]] += 1
                os.kill(victim, signal.SIGKILL)
                t_kill = time.time()

                def recovered(offs: dict[int, Offset], before: dict[int, tuple[str, int]] = before) -> bool:
                    changed = [s for s, o in owners(offs).items() if o != before[s]]
                    return bool(changed) and mon.caught_up(offs)

            else:
                old = sup.wait_workers()
                sup.kill9()
                t_kill = time.time()
                sup = Supervisor(t)  # restarted at once, as a service manager would
                deadline = time.time() + 60
                while any(alive(p) for p in old) and time.time() < deadline:
                    time.sleep(0.05)
                assert not any(alive(p) for p in old), "workers outlived their supervisor by 60 s"
                orphan_exit_s = time.time() - t_kill
                labels = dict(zip(sup.wait_workers(), (0, 1), strict=True))
                kills = [0, 0]

                def recovered(offs: dict[int, Offset], before: dict[int, tuple[str, int]] = before) -> bool:
                    now = owners(offs)
                    return all(now[s] != before[s] for s in before) and mon.caught_up(offs)

            at = mon.wait_until(recovered, 180, f"fault {i} ({kind})", after=t_kill)
            recovery.append(at - t_kill)
            done[0] += 1
        feeder.finish()
        wait_readable(t.cfg, feeder.done_at)
        mon.wait_until(mon.caught_up, 120, "the end", after=time.time())
        assert sup.stop() == 0
    report = finish(t, truth, feeder.runs)
    assert report.events == EVENTS and report.dead_letters == 2 * PARTS
    worker_rec, sup_rec = [r for r, k in zip(recovery, FAULTS, strict=True) if k == "worker"], recovery[5]
    backoff = restart_backoffs(t.dir)
    assert len(backoff) == len(worker_rec), backoff  # one restart per kill, none for other reasons
    chaos_record(
        "kill -9 of a worker process (supervisor restarts it)",
        backend,
        report,
        worker_rec,
        len(worker_rec),
        backoff_s=backoff,
        replay_window_s_max=mon.replay_window_max_ms / 1000,
        production_s=round(feeder.done_at - feeder.started_at, 1),
        recovery_after_backoff_s=[round(r - b, 2) for r, b in zip(worker_rec, backoff, strict=True)],
        note="2 workers, 8 shards, the victim drawn at random among the slots killed least; recovery = kill until "
        "the worker's shards are claimed again and every shard is within lag + 1.5 s of the clock; it includes the "
        "supervisor's restart backoff (backoff_s: 1 s, doubling per slot)",
    )
    chaos_record(
        "kill -9 of the supervisor, then a restart",
        backend,
        report,
        [sup_rec],
        1,
        note=f"orphaned workers exited {orphan_exit_s:.1f} s after the kill; recovery = kill until every shard "
        "is claimed by the new supervisor's workers and caught up (same run as the worker kills)",
    )
    t.assert_restart_changes_nothing(truth)


def test_a_worker_paused_across_a_supervisor_restart_does_not_steal_its_shards(
    backend: str, chaos_tenant: TenantFactory, chaos_record: Recorder, sim_20k: tuple[Path, Path]
) -> None:
    """A replacement worker is frozen (SIGSTOP) while it starts, its supervisor is killed and started again, and
    the frozen orphan is resumed once the new workers own every shard. It must exit without claiming: a claim
    would fence the new worker, which gives its shards up (the supervisor does not restart a fenced worker),
    and the orphan exits right after, leaving those shards without a consumer."""
    t = chaos_tenant()
    t.run("init")
    src, truth = sim_20k
    feeder = Feeder(t, split(src, t.dir, 10), pause_s=0.5)
    sup = Supervisor(t)
    mon = OffsetMonitor(t.cfg)
    paused = 0
    try:
        with teardown(feeder, mon, lambda: sup):
            pids = sup.wait_workers()
            feeder.start()
            mon.wait_until(lambda offs: mon.caught_up(offs) and len(feeder.runs) >= 2, 120, "start")
            os.kill(pids[0], signal.SIGKILL)
            while not paused:
                fresh = [p for p in sup.worker_pids() if p not in pids]
                if fresh:
                    paused = fresh[0]
                    os.kill(paused, signal.SIGSTOP)
                time.sleep(0.002)
            sup.kill9()
            t_kill = time.time()
            sup = Supervisor(t)
            mine = f":{sup.pid}:"

            def owned_by_new(offs: dict[int, Offset]) -> bool:
                return all(mine in o.owner for o in offs.values()) and mon.caught_up(offs)

            recovered = mon.wait_until(owned_by_new, 120, "the new supervisor takes over", after=t_kill)
            os.kill(paused, signal.SIGCONT)
            t_cont = time.time()
            while alive(paused) and time.time() < t_cont + 30:
                time.sleep(0.05)
            assert not alive(paused), "the resumed orphan did not exit"
            orphan_exit_s = time.time() - t_cont
            time.sleep(2.0)  # a claim by the orphan would show now: a fenced new worker, shards falling behind
            mon.wait_until(owned_by_new, 30, "the new supervisor still owns every shard", after=time.time())
            assert len(sup.wait_workers()) == 2
            feeder.finish()
            wait_readable(t.cfg, feeder.done_at)
            mon.wait_until(mon.caught_up, 120, "the end", after=time.time())
            assert sup.stop() == 0
    finally:
        if paused and alive(paused):
            os.kill(paused, signal.SIGCONT)
            os.kill(paused, signal.SIGKILL)
    report = finish(t, truth, feeder.runs)
    assert report.events == 20_000
    chaos_record(
        "worker frozen (SIGSTOP) across a supervisor kill -9 and restart",
        backend,
        report,
        [recovered - t_kill],
        1,
        note=f"the frozen orphan, resumed once the new supervisor owned every shard, exited in {orphan_exit_s:.1f} s "
        "without claiming; recovery = supervisor kill until the new supervisor's workers own every shard, "
        "caught up",
    )
    t.assert_restart_changes_nothing(truth)
