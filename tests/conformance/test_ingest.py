"""Ingest on every store: producer durability, re-bucketing, dead letters, redrive and the CLI."""

from __future__ import annotations

import gzip
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main
from engine.core.clock import ManualClock
from engine.core.config import Config, from_mapping
from engine.core.errors import StoreError, TransientStoreError
from engine.core.event import Event, decode
from engine.core.records import DEAD_LETTER_RAW_MAX
from engine.ingest.canonical import ParseRules, parse_line, shard_of
from engine.ingest.producer import ClockSkewError, Ingestor, Producer, ProducerError, ProducerSettings, redrive
from engine.store import AppendResult, EventRecord, Store, make_store
from engine.tools.simulate import sessions
from tests.conftest import ConfigFactory, arun, base_tree, drop_tenant, new_tenant, require_cql

pytestmark = pytest.mark.conformance


async def opened(cfg: Config, clock: ManualClock | None = None) -> Store:
    store = make_store(cfg, clock) if clock is not None else make_store(cfg)
    await store.open()
    await store.init_schema()
    return store


async def stored_events(store: Store, cfg: Config, first: int, last: int) -> dict[str, tuple[int, int, Event]]:
    """Every event in buckets [first, last] of every shard: id → (shard, bucket, event)."""
    out: dict[str, tuple[int, int, Event]] = {}
    for shard in range(cfg.shards):
        for hint in await store.nonempty_buckets(shard, first, last):
            async for page in store.read_partition(shard, hint.bucket, max_row_bytes=hint.max_row_bytes):
                for rec in page.events:
                    assert rec.event_id not in out, "one event stored twice"
                    out[rec.event_id] = (shard, hint.bucket, decode(rec.payload))
    return out


def bad_lines() -> list[bytes]:
    """25 bad lines of different kinds."""
    ok: dict[str, Any] = {
        "source": "fw",
        "time": time.time(),
        "proto": "tcp",
        "src_ip": "10.0.0.1",
        "src_port": 1,
        "dst_ip": "10.0.0.2",
        "dst_port": 2,
    }

    def with_(**kw: Any) -> bytes:
        d = {**ok, **kw}
        return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()

    return [
        b"{not json",
        b"\xff\xfe\x00",
        b"[]",
        b'"just a string"',
        with_(source=...),
        with_(time=...),
        with_(time="last tuesday"),
        with_(time="2026-01-01T00:00:00"),
        with_(time=100),
        with_(time=time.time() + 3 * 86_400),
        with_(proto="carrier-pigeon"),
        with_(src_ip="300.1.1.1"),
        with_(dst_ip="::1"),
        with_(src_port=70_000),
        with_(dst_port="https"),
        with_(dst_port=...),
        with_(proto="gre"),
        with_(proto="icmp", src_port=999),
        with_(src_ip=...),
        with_(flavour="vanilla"),
        with_(attrs="not an object"),
        with_(source=""),
        with_(id=""),
        with_(time=True),
        with_(sensor=7),
    ]


def test_good_and_bad_lines(make_config: ConfigFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_config(ingest={"batch_lines": 300})
    good = list(sessions(400, seed=3, start_s=time.time() - 600, span_s=600))[:1000]
    assert len(good) == 1000
    bad = bad_lines()
    assert len(bad) == 25
    rnd = random.Random(9)
    mixed = good + bad
    rnd.shuffle(mixed)
    path = tmp_path / "input.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(mixed) + b"\n\n")
    args = ["--set", f"tenant={cfg.tenant}", "--set", f"store.backend={cfg.store.backend}"]
    args += ["--set", f"shards={cfg.shards}"]
    if cfg.store.backend == "cql":
        args += ["--set", f"store.contact_points={json.dumps(cfg.store.contact_points)}"]
    else:
        args += ["--set", f"store.path={cfg.store.path}"]
    args += ["--set", "ingest.batch_lines=300"]
    assert main(["init", *args]) == 0
    capsys.readouterr()
    assert main(["ingest", *args, str(path)]) == 0
    out = capsys.readouterr().out
    assert "accepted 1,000, rejected 25, duplicates 0, empty lines 1" in out, out
    assert main(["dead-letter", *args, "--limit", "0"]) == 0
    listing = capsys.readouterr().out.strip().splitlines()
    assert listing[-1].startswith("dead-letter: 25 rejected lines, 25 not redriven")
    reasons = [ln for ln in listing[:-1] if ln.startswith(str(path))]
    assert len(reasons) == 25
    assert all(ln.split(": ", 2)[2] for ln in reasons)  # every line has a reason

    async def check() -> None:
        store = await opened(cfg)
        try:
            now_b = int(time.time() * 1000) // cfg.bucket_ms
            got = await stored_events(store, cfg, now_b - 100, now_b + 1)
        finally:
            await store.close()
        want = {parse_line(g, ParseRules.from_config(cfg), int(time.time() * 1000)).id for g in good}
        assert set(got) == want
        for shard, _bucket, ev in got.values():
            assert shard == shard_of(ev, cfg.shards)

    arun(check())


def test_rebucketing_after_an_injected_slow_write(make_config: ConfigFactory) -> None:
    cfg = make_config()
    clock = ManualClock(int(time.time() * 1000))
    events = [
        parse_line(ln, ParseRules.from_config(cfg), clock.now_ms())
        for ln in sessions(50, seed=5, start_s=time.time() - 60, span_s=60)
    ]
    slowed: list[tuple[int, int]] = []

    async def slow_first_attempt(shard: int, bucket: int, attempt: int) -> None:
        if attempt == 0:
            slowed.append((shard, bucket))
            clock.advance(cfg.max_write_age_ms + 1)  # the write is delayed past max_write_age_ms

    async def body() -> None:
        store = await opened(cfg, clock)
        try:
            producer = Producer(store, ProducerSettings.from_config(cfg), clock, before_write=slow_first_attempt)
            producer.clock_checked = True  # the manual clock is not the database's
            report = await producer.write(events)
            start = int(time.time() * 1000) // cfg.bucket_ms
            got = await stored_events(store, cfg, start - 5, clock.now_ms() // cfg.bucket_ms)
        finally:
            await store.close()
        assert report.events == len({e.id for e in events})
        assert report.rebucketed == report.appends == len(slowed) > 0
        assert set(got) == {e.id for e in events}
        # nothing landed in a partition whose write came too late
        assert not {(shard, b) for shard, b, _ in got.values()} & set(slowed)

    arun(body())


def test_duplicate_ids_in_one_batch_are_written_once(make_config: ConfigFactory) -> None:
    cfg = make_config()
    now = int(time.time() * 1000)
    lines = list(sessions(30, seed=8, start_s=now / 1000 - 60, span_s=60))
    events = [parse_line(ln, ParseRules.from_config(cfg), now) for ln in lines]

    async def body() -> None:
        store = await opened(cfg)
        try:
            report = await Producer(store, ProducerSettings.from_config(cfg)).write(events + events[:10])
            got = await stored_events(store, cfg, now // cfg.bucket_ms - 5, now // cfg.bucket_ms + 600)
        finally:
            await store.close()
        assert report.duplicates == 10
        assert report.events == len(events)
        assert set(got) == {e.id for e in events}

    arun(body())


@pytest.mark.cql
def test_clock_skew_is_refused(tmp_path: Path) -> None:
    # CQL only: the embedded store's clock is this host's, so there is no second clock to disagree with.
    require_cql()
    cfg = from_mapping(base_tree("cql", tmp_path, new_tenant()))
    clock = ManualClock(int(time.time() * 1000) - 60_000)  # this host one minute behind the database

    async def body() -> None:
        store = await opened(cfg, clock)
        try:
            with pytest.raises(ClockSkewError, match="max_clock_skew_ms"):
                await Producer(store, ProducerSettings.from_config(cfg), clock).write([])
        finally:
            await store.close()
            await drop_tenant(cfg)

    arun(body())


class Flaky:
    """Fault injection around a real store: the first ``fail`` appends raise the given error."""

    def __init__(self, store: Store, fail: int, error: StoreError) -> None:
        self.store = store
        self.fail = fail
        self.error = error
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def append(
        self, shard: int, bucket: int, events: Sequence[EventRecord], *, deadline_ms: int | None = None
    ) -> AppendResult:
        self.calls += 1
        if self.calls <= self.fail:
            raise self.error
        return await self.store.append(shard, bucket, events, deadline_ms=deadline_ms)


def test_transient_failures_are_retried_and_permanent_ones_name_the_events(make_config: ConfigFactory) -> None:
    cfg = make_config(shards=1)
    now = int(time.time() * 1000)
    events = [
        parse_line(ln, ParseRules.from_config(cfg), now)
        for ln in sessions(20, seed=2, start_s=now / 1000 - 60, span_s=60)
    ]

    async def body() -> None:
        store = await opened(cfg)
        try:
            flaky = Flaky(store, 2, TransientStoreError("timeout"))
            report = await Producer(flaky, ProducerSettings.from_config(cfg)).write(events)
            assert report.events == len(events) and flaky.calls == 3
            broken = Flaky(store, 10**6, StoreError("unauthorized"))
            with pytest.raises(ProducerError) as info:
                await Producer(broken, ProducerSettings.from_config(cfg)).write(events)
            assert {e.id for e in info.value.failed} == {e.id for e in events}
            assert not info.value.retriable
            gone = Flaky(store, 10**6, TransientStoreError("unavailable"))
            with pytest.raises(ProducerError) as info2:
                await Producer(gone, ProducerSettings.from_config(cfg)).write(events)
            assert info2.value.retriable and gone.calls == cfg.ingest.max_attempts
        finally:
            await store.close()

    arun(body())


def test_a_long_rejected_line_is_kept_in_part_with_its_length_and_is_not_redriven(make_config: ConfigFactory) -> None:
    """Issue 18: a 20 MB rejected line used to be stored whole in the dead-letter table. Now its first 64 KiB and
    its length are kept, the listing says so, and a redrive counts it apart (its head is not the event)."""
    cfg = make_config()
    long_line = b'{"source": "fw", "time": "' + b"9" * 300_000 + b'"}'

    async def body() -> None:
        store = await opened(cfg)
        try:
            ing = Ingestor(store, Producer(store, ProducerSettings.from_config(cfg)))
            s = await ing.run([("big.jsonl", 1, long_line), ("big.jsonl", 2, b"{broken")])
            assert (s.accepted, s.rejected) == (0, 2)
            got = {d.line: d for page in [p async for p in store.scan_dead_letters()] for d in page}
            assert got[1].raw == long_line[:DEAD_LETTER_RAW_MAX] and got[1].raw_bytes == len(long_line)
            assert got[1].reason.startswith("time:")
            assert got[2].raw == b"{broken" and got[2].raw_bytes is None
            assert await redrive(store, Producer(store, ProducerSettings.from_config(cfg))) == (0, 1, 1)
        finally:
            await store.close()

    arun(body())


def test_redrive_after_a_config_change(make_config: ConfigFactory) -> None:
    strict = make_config(ingest={"min_time_ms": 1_700_000_000_000})
    old = (
        b'{"source": "replay", "time": 1600000000, "proto": "udp", "src_ip": "10.0.0.1", "src_port": 5, '
        b'"dst_ip": "10.0.0.2", "dst_port": 6}'
    )
    junk = b"{broken"

    async def body() -> None:
        store = await opened(strict)
        try:
            ing = Ingestor(store, Producer(store, ProducerSettings.from_config(strict)))
            s = await ing.run([("f.jsonl", 1, old), ("f.jsonl", 2, junk)])
            assert (s.accepted, s.rejected) == (0, 2)
            assert await redrive(store, Producer(store, ProducerSettings.from_config(strict))) == (0, 2, 0)
            lenient = make_config(tenant=strict.tenant, ingest={"min_time_ms": 946_684_800_000})
            assert await redrive(store, Producer(store, ProducerSettings.from_config(lenient))) == (1, 1, 0)
            letters = [d for page in [p async for p in store.scan_dead_letters()] for d in page]
            assert sorted((d.line, d.redriven_ms is not None) for d in letters) == [(1, True), (2, False)]
            assert await redrive(store, Producer(store, ProducerSettings.from_config(lenient))) == (0, 1, 0)
        finally:
            await store.close()

    arun(body())
