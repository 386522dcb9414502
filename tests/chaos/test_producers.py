"""Producer-side faults while the engine runs: writes delayed past ``max_write_age_ms``, and the same input
delivered again (within the amend horizon and after it). Each ends with ``storyline run --drain`` and
``storyline verify --truth`` holding with nothing lost."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from engine.ingest.producer import Ingestor, InputLines, Producer, ProducerSettings, open_input
from engine.store import make_store
from engine.tools.verify import IngestRun
from tests.chaos.conftest import Recorder, TenantFactory
from tests.chaos.harness import Feeder, OffsetMonitor, Supervisor, Tenant, finish, split, teardown, wait_readable

pytestmark = pytest.mark.chaos

EVENTS = 20_000  # sim_20k


async def ingest_slowly(t: Tenant, files: list[Path], seed: int) -> tuple[list[IngestRun], int, int]:
    """Ingest ``files`` in-process through a Producer whose ``before_write`` hook holds a quarter of the first
    and second attempts past ``max_write_age_ms`` (the store then refuses them and the producer re-buckets)."""
    cfg = t.cfg
    rng = random.Random(seed)
    delayed = 0

    async def late(shard: int, bucket: int, attempt: int) -> None:
        nonlocal delayed
        if attempt < 2 and rng.random() < 0.25:
            delayed += 1
            await asyncio.sleep((cfg.max_write_age_ms + 300) / 1000)

    store = make_store(cfg)
    await store.open()
    runs: list[IngestRun] = []
    rebucketed = 0
    try:
        producer = Producer(store, ProducerSettings.from_config(cfg), before_write=late)
        await producer.check_clock()
        for f in files:
            ingestor = Ingestor(store, producer)
            with open_input(str(f)) as stream:
                s = await ingestor.run(InputLines(str(f), stream))
            runs.append(IngestRun(str(f), s.accepted, s.rejected, s.duplicates))
            rebucketed += s.rebucketed
            await asyncio.sleep(0.3)
    finally:
        await store.close()
    return runs, delayed, rebucketed


def test_writes_delayed_past_max_write_age_are_rebucketed_and_consumed(
    backend: str, chaos_tenant: TenantFactory, chaos_record: Recorder, sim_20k: tuple[Path, Path]
) -> None:
    t = chaos_tenant()
    t.run("init")
    src, truth = sim_20k
    files = split(src, t.dir, 8)
    sup = Supervisor(t)
    mon = OffsetMonitor(t.cfg)
    try:
        sup.wait_workers()
        runs, delayed, rebucketed = asyncio.run(ingest_slowly(t, files, seed=3))
        done = time.time()
        wait_readable(t.cfg, done)
        caught = mon.wait_until(mon.caught_up, 120, "caught up after the last write", after=time.time())
        assert sup.stop() == 0
    finally:
        mon.close()
        if sup.proc.poll() is None:
            sup.proc.kill()
    assert delayed > 0 and rebucketed == delayed  # every delayed attempt was refused and re-bucketed
    report = finish(t, truth, runs)
    assert report.events == EVENTS
    chaos_record(
        "producer writes delayed past max_write_age_ms",
        backend,
        report,
        [caught - done],
        delayed,
        rebucketed=rebucketed,
        note="before_write hook holds 25 % of first and second attempts for max_write_age + 0.3 s; the store "
        "refuses them (WriteTooLateError) and the producer re-buckets; recovery = last write until every shard "
        "is caught up (bounded below by lag_ms = 3.6 s)",
    )
    t.assert_restart_changes_nothing(truth)


def test_the_same_input_delivered_again(
    backend: str, chaos_tenant: TenantFactory, chaos_record: Recorder, sim_20k: tuple[Path, Path]
) -> None:
    t = chaos_tenant()
    t.run("init")
    src, truth = sim_20k
    parts = split(src, t.dir, 4)
    c = t.cfg.correlate
    # Third delivery once every story of the first has left the state (quiet for max_wait, then the horizon).
    apart_s = (c.max_wait_ms + c.amend_horizon_ms) / 1000 + 3

    def gate(k: int) -> bool:
        if k < 2 * len(parts):
            return True
        return len(feeder.ended) >= 2 * len(parts) and time.time() >= feeder.ended[2 * len(parts) - 1] + apart_s

    feeder = Feeder(t, parts * 3, gate)
    sup = Supervisor(t)
    mon = OffsetMonitor(t.cfg)
    with teardown(feeder, mon, lambda: sup):
        sup.wait_workers()
        feeder.start()
        feeder.finish()
        wait_readable(t.cfg, feeder.done_at)
        mon.wait_until(mon.caught_up, 120, "caught up after the last delivery", after=time.time())
        assert sup.stop() == 0
    report = finish(t, truth, feeder.runs)
    assert report.events == EVENTS and report.dead_letters == 2 * len(parts)
    assert report.stored_twice >= 2 * EVENTS  # three deliveries, each into newer buckets
    assert report.recreated or report.reingested  # the third delivery built stories again
    chaos_record(
        "the same input delivered three times",
        backend,
        report,
        [],
        2,
        note="4 files ingested, again at once (duplicates within the amend horizon: dropped by the story builder),"
        f" and a third time {apart_s:.0f} s later (after the horizon: new stories, listed apart by verify as "
        "re-ingested, not as loss)",
    )
    t.assert_restart_changes_nothing(truth)
