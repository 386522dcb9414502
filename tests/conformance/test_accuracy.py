"""Accuracy of the whole path on every store: simulated sensors (skew, reversed reports, late arrivals, port
reuse, noise) → producer → store → worker → story builder → stories, scored against the ground truth."""

from __future__ import annotations

import time

import pytest

from engine.testing.pipeline import run_pipeline
from engine.tools.accuracy import score
from engine.tools.simulate import Scenario
from tests.conftest import ConfigFactory

pytestmark = pytest.mark.conformance


def test_small_scenario_scores_at_least_098(make_config: ConfigFactory) -> None:
    cfg = make_config(
        shards=4,
        correlate={"match_window_ms": 30_000, "max_wait_ms": 120_000, "amend_horizon_ms": 900_000},
    )
    scenario = Scenario(events=2_000, seed=4, start_s=time.time() - 1_800, span_s=600)
    predicted, truth = run_pipeline(cfg, scenario)
    assert set(predicted) == set(truth), "every accepted event is in exactly one story"
    s = score(predicted, truth)
    assert s["precision"] >= 0.98 and s["recall"] >= 0.98 and s["exact"] >= 0.98, s


def test_stories_by_id_from_the_cli(make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio
    import json

    from engine.cli import cmd_story

    cfg = make_config(shards=2, correlate={"match_window_ms": 30_000, "max_wait_ms": 60_000})
    predicted, _ = run_pipeline(cfg, Scenario(events=300, seed=5, start_s=time.time() - 1_800, span_s=120))
    members: dict[str, set[str]] = {}
    for eid, sid in predicted.items():
        members.setdefault(sid, set()).add(eid)
    capsys.readouterr()
    for sid in sorted(members)[:5]:
        assert asyncio.run(cmd_story(cfg, sid, "jsonl")) == 0
        body = json.loads(capsys.readouterr().out)
        assert body["story_id"] == sid and set(body["event_ids"]) == members[sid]
    assert asyncio.run(cmd_story(cfg, "s0000-0000000000000000", "table")) == 1
    assert "no story" in capsys.readouterr().err


def test_verify_holds_after_a_drain_and_catches_a_lost_event(make_config: ConfigFactory) -> None:
    import asyncio

    from engine.store import EventRecord, make_store
    from engine.tools.verify import verify

    cfg = make_config(
        shards=4,
        correlate={"match_window_ms": 30_000, "max_wait_ms": 120_000, "amend_horizon_ms": 900_000},
    )
    scenario = Scenario(events=600, seed=9, start_s=time.time() - 1_800, span_s=300)
    predicted, truth = run_pipeline(cfg, scenario)
    assert set(predicted) == set(truth)

    async def check() -> None:
        store = make_store(cfg)
        await store.open()
        try:
            now = int(time.time() * 1000)
            good = await verify(store, cfg, now)
            assert good.ok, good.lines()
            assert good.events == len(truth) and not good.missing and not good.unknown
            # an accepted event that no story holds is loss: verify must say so
            await store.append(1, now // cfg.bucket_ms, [EventRecord("orphan-1", b"\x90")])
            bad = await verify(store, cfg, now)
            assert not bad.ok and bad.missing == ["orphan-1"]
        finally:
            await store.close()

    asyncio.run(check())
