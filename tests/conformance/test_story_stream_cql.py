"""The story stream's promise (issue 14) over fixed sequences of runs, kills, stops and failed writes, on every
store (the CQL node: marker ``cql``): the same harness as the stateful property test
(``tests/property/harness.py``), in-process on a virtual clock. Every sequence ends with a clean drain, the
checks, and one more drain that must write nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.core.clock import SYSTEM_CLOCK
from tests.conftest import arun, drop_tenant, new_tenant
from tests.property.harness import FLOWS, EventSpec, Fault, StoryStream, VirtualClock, stream_config

pytestmark = pytest.mark.conformance


@pytest.fixture
def stream(backend: str, tmp_path: Path) -> Iterator[StoryStream]:
    cfg = stream_config(backend, tmp_path, new_tenant())
    s = StoryStream(cfg, VirtualClock(SYSTEM_CLOCK.now_ms()))
    s.setup()
    try:
        yield s
    finally:
        arun(drop_tenant(cfg))


def batch(i: int) -> list[EventSpec]:
    """Every flow (reported both ways across batches, by changing sensors) and an event without a flow."""
    return [EventSpec(f, (f + i) % 2 == 1, (f + i) % 4, (3 * f + i) % 8) for f in range(len(FLOWS) + 1)]


def busy(s: StoryStream, batches: int = 3, start: int = 0) -> None:
    """Batches 6 s apart (longer than max_wait, within the match window), the first 6 s after the clock: a
    catch-up run emits stories at several buckets and amends them, with re-deliveries of earlier events; the last
    batch's stories are still open when the run reaches its until bucket (a drain finalizes them)."""
    for i in range(start, start + batches):
        s.advance(6_000)
        s.ingest(batch(i), redeliver=[i, 5 * i + 1] if i else [])


def test_drain_then_drain_again(stream: StoryStream) -> None:
    stream.ingest(batch(0))
    assert stream.drain_and_check().outcome == "done"
    stream.final()  # drains twice more


def test_ingest_drain_ingest_drain(stream: StoryStream) -> None:
    busy(stream, 2)
    stream.drain_and_check()
    busy(stream, 2, start=2)  # links to the drained stories (amends within the horizon) and re-delivers
    stream.drain_and_check()
    stream.advance(40_000)  # past the amend horizon: the stories leave the state (marks)
    busy(stream, 1, start=4)
    stream.drain_and_check()
    stream.final()


def test_until_idle_then_drain_then_until_idle(stream: StoryStream) -> None:
    busy(stream, 2)
    stream.run(drain=False)
    stream.check_rows()
    stream.drain_and_check()
    busy(stream, 1, start=2)
    stream.run(drain=False)
    stream.check_rows()
    stream.final()


@pytest.mark.parametrize(("at", "keep"), [(1, 0), (2, 1), (4, 1)])
def test_kill_during_a_drain_then_drain(stream: StoryStream, at: int, keep: int) -> None:
    busy(stream)
    result = stream.drain_and_check(Fault("kill", at, keep))
    assert result.outcome == "killed", result
    stream.final()


def test_kill_during_a_run_after_a_drain_then_drain(stream: StoryStream) -> None:
    busy(stream, 2)
    stream.drain_and_check()
    busy(stream, 2, start=2)
    assert stream.run(drain=False, fault=Fault("kill", 2, 1)).outcome == "killed"
    stream.check_rows()
    stream.final()


@pytest.mark.parametrize("at", [1, 3])
def test_a_failing_write_then_drain(stream: StoryStream, at: int) -> None:
    busy(stream)
    result = stream.run(drain=False, fault=Fault("fail", at, 1))
    assert result.fired, result
    stream.check_rows()
    stream.drain_and_check()
    stream.final()


def test_a_failing_write_during_a_drain(stream: StoryStream) -> None:
    busy(stream)
    result = stream.drain_and_check(Fault("fail", 2, 0))
    assert result.fired, result
    stream.final()


def test_sigterm_during_a_drain_then_drain(stream: StoryStream) -> None:
    busy(stream)
    result = stream.drain_and_check(Fault("term", 1))
    assert result.fired, result
    stream.final()


@pytest.mark.parametrize("span", [1, 3])
def test_a_database_restart_during_a_drain_that_outlasts_the_first_rebuild(stream: StoryStream, span: int) -> None:
    """The drain's first marks write fails, and so do the next ``span`` store calls: the reads of the rebuild's
    replay. The worker must rebuild again, not drain a half-rebuilt stage (found by the property test: the drain
    then emitted nothing and exited 0, every open story's events missing)."""
    stream.ingest(batch(0))
    result = stream.drain_and_check(Fault("outage", 1, span=span, on="put_marks"))
    assert result.fired and result.outcome == "done", result
    stream.final()
