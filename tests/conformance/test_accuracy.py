"""Accuracy of the whole path on every store: simulated sensors (skew, reversed reports, late arrivals, port
reuse, noise) → producer → store → worker → story builder → stories, scored against the ground truth."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from bench.accuracy import score
from engine.clock import ManualClock
from engine.config import Config
from engine.correlate.story import StoryStage
from engine.event import parse_line
from engine.ingest import Producer
from engine.simulate import Scenario, generate
from engine.stage import CountingStage
from engine.store import make_store
from engine.worker import Worker
from tests.conftest import ConfigFactory, arun

pytestmark = pytest.mark.conformance


def run_pipeline(cfg: Config, scenario: Scenario) -> tuple[dict[str, str], dict[str, str]]:
    events, truth = generate(scenario)
    start_ms = int(scenario.start_s * 1000)
    clock = ManualClock(start_ms)

    async def body() -> dict[str, str]:
        store = make_store(cfg, clock)
        await store.open()
        await store.init_schema()
        try:
            producer = Producer(store, cfg, clock)
            producer.clock_checked = True  # simulated time
            batch: list[Any] = []
            for ev in events:  # delivered in arrival order, each at its arrival time
                arrival = start_ms + int(ev.arrival_s * 1000)
                if batch and arrival // cfg.bucket_ms != clock.now_ms() // cfg.bucket_ms:
                    await producer.write(batch)
                    batch = []
                clock.set(max(clock.now_ms(), arrival))
                batch.append(parse_line(ev.line, cfg, clock.now_ms()))
            if batch:
                await producer.write(batch)
            end = clock.now_ms()
            clock.set(end + cfg.lag_ms + cfg.bucket_ms)
            worker = Worker(
                cfg,
                list(range(cfg.shards)),
                CountingStage(),
                owner="acc",
                clock=clock,
                until_bucket=end // cfg.bucket_ms,
                drain=True,
                check_skew=False,
            )
            worker.stage = StoryStage(cfg, worker.store)
            assert await worker.run() == 0
            latest: dict[str, Any] = {}
            async for page in store.scan_stories():
                for rec in page:
                    if rec.story_id not in latest or rec.revision > latest[rec.story_id].revision:
                        latest[rec.story_id] = rec
            predicted: dict[str, str] = {}
            for rec in latest.values():
                if rec.merged_into is not None:
                    continue
                for eid in msgspec.json.decode(rec.body)["event_ids"]:
                    assert eid not in predicted, f"{eid} in two stories' latest revisions"
                    predicted[eid] = rec.story_id
            return predicted
        finally:
            await store.close()

    return arun(body()), dict(truth.stories)


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
