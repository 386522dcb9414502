"""The drain timeout of ``run --until-idle`` / ``--drain`` (:meth:`Supervisor._check_drain_timeout`), on a fake
clock: from when it counts, and that a step of the wall clock does not move it. No worker process is started."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from engine.core.config import from_mapping
from engine.runtime import supervisor as sup_module
from engine.runtime.settings import ConfiguredStore, SupervisorSettings
from engine.runtime.stages import CountingStageFactory
from engine.runtime.supervisor import Supervisor
from tests.cli import SMALL_WINDOWS

TIMEOUT_S = 3.0


class FakeTime:
    """The module's ``time``: a monotonic clock the test moves, and a wall clock that may step on its own."""

    def __init__(self) -> None:
        self.mono = 1_000.0
        self.wall_step = 0.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return 1_800_000_000.0 + self.mono + self.wall_step


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(sup_module, "time", fake)
    return fake


def supervisor(tmp_path: Path) -> Supervisor:
    cfg = from_mapping(
        {
            "tenant": "t_timeout",
            "shards": 4,
            **SMALL_WINDOWS,
            "drain_timeout_ms": int(TIMEOUT_S * 1000),
            "store": {"backend": "embedded", "path": str(tmp_path / "never-opened.db")},
        }
    )
    sup = Supervisor(
        SupervisorSettings.from_config(cfg),
        ConfiguredStore.from_config(cfg),
        CountingStageFactory(),
        range(4),
        2,
        until_idle=True,
        out=io.StringIO(),
        err=io.StringIO(),
    )
    sup._start_until()
    for slot in sup.slots:
        slot.owner = f"w{slot.index}"
    return sup


def report(sup: Supervisor, index: int, **fields: Any) -> None:
    slot = sup.slots[index]
    slot.metrics = {"owner": slot.owner, "commits": 0, "shards": {}, **fields}
    sup._observe(slot)


def all_report(sup: Supervisor, clock: FakeTime, at: float) -> None:
    """Every worker reports (has started) at ``at``."""
    clock.mono = at
    for slot in sup.slots:
        report(sup, slot.index)


def times_out_at(sup: Supervisor, clock: FakeTime, at: float) -> bool:
    clock.mono = at
    sup._check_drain_timeout(clock.monotonic())
    return sup.timed_out


def test_the_wait_for_the_lag_is_on_the_monotonic_clock(tmp_path: Path, clock: FakeTime) -> None:
    sup = supervisor(tmp_path)
    assert 1.8 <= sup.readable_at - clock.mono <= 1.8 + 0.2 + 0.1 + 0.001  # lag + skew + one bucket at most
    assert sup._waiting_s(clock.mono) == pytest.approx(sup.readable_at - clock.mono)


def test_workers_that_never_start_time_out_after_twice_the_timeout(tmp_path: Path, clock: FakeTime) -> None:
    sup = supervisor(tmp_path)
    r = sup.readable_at
    assert not times_out_at(sup, clock, r + TIMEOUT_S + 0.5)  # before: this gave up here
    assert not times_out_at(sup, clock, r + 2 * TIMEOUT_S - 0.1)
    assert times_out_at(sup, clock, r + 2 * TIMEOUT_S + 0.1)
    assert isinstance(sup.err, io.StringIO) and "no shard's committed position moved" in sup.err.getvalue()


def test_the_timeout_counts_from_when_every_worker_started(tmp_path: Path, clock: FakeTime) -> None:
    sup = supervisor(tmp_path)
    r = sup.readable_at
    clock.mono = r + 5
    report(sup, 0)
    assert not sup.started_at, "one worker of two is not all of them"
    report(sup, 1)
    assert sup.started_at == r + 5
    assert not times_out_at(sup, clock, r + 5 + TIMEOUT_S - 0.1)
    assert times_out_at(sup, clock, r + 5 + TIMEOUT_S + 0.1)


def test_a_worker_restarted_later_does_not_move_the_start(tmp_path: Path, clock: FakeTime) -> None:
    sup = supervisor(tmp_path)
    r = sup.readable_at
    all_report(sup, clock, r + 1)
    clock.mono = r + 3.5
    sup.slots[1].owner = "w1-restarted"
    report(sup, 1)
    assert sup.started_at == r + 1
    assert times_out_at(sup, clock, r + 1 + TIMEOUT_S + 0.1)


def test_holding_every_shard_and_progress_restart_the_count(tmp_path: Path, clock: FakeTime) -> None:
    sup = supervisor(tmp_path)
    r = sup.readable_at
    all_report(sup, clock, r + 0.5)
    clock.mono = r + 2
    report(sup, 0, shards={"0": {"committed_read": 10}, "1": {"committed_read": 10}})
    assert not sup.held_at, "shards 2 and 3 are not held yet"
    clock.mono = r + 3
    report(sup, 1, shards={"2": {"committed_read": 10}, "3": {"committed_read": 10}})
    assert sup.held_at == r + 3
    assert not times_out_at(sup, clock, r + 3 + TIMEOUT_S - 0.1)
    clock.mono = r + 5
    report(sup, 1, commits=1, shards={"2": {"committed_read": 11}, "3": {"committed_read": 10}})
    assert sup.progress_at == r + 5
    assert not times_out_at(sup, clock, r + 5 + TIMEOUT_S - 0.1)
    assert times_out_at(sup, clock, r + 5 + TIMEOUT_S + 0.1)


def test_a_step_of_the_wall_clock_moves_no_deadline(tmp_path: Path, clock: FakeTime) -> None:
    """A VM's or NTP's step of the wall clock during the run: before, the drain timeout counted on it (a run
    reported "no progress for 9.4 s" 3 s into its wait)."""
    sup = supervisor(tmp_path)
    r = sup.readable_at
    all_report(sup, clock, r + 1)
    clock.wall_step = 30.0
    assert not times_out_at(sup, clock, r + 1 + TIMEOUT_S - 0.1)
    clock.wall_step = -30.0
    assert times_out_at(sup, clock, r + 1 + TIMEOUT_S + 0.1)
