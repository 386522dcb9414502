"""The whole story path in one process on a virtual clock, for accuracy checks (tests, ``bench.stories``):
simulated sensors → producer → store → worker (story builder, drained) → each event's story."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from engine.core.clock import ManualClock
from engine.core.config import Config
from engine.correlate.story import StoryMachine
from engine.ingest.canonical import ParseRules, parse_line
from engine.ingest.producer import Producer, ProducerSettings
from engine.runtime.stages import CountingStage
from engine.runtime.worker import Worker
from engine.store import make_store
from engine.tools.simulate import Scenario, generate


def run_pipeline(cfg: Config, scenario: Scenario) -> tuple[dict[str, str], dict[str, str]]:
    """Simulated sensors → producer → store → worker (story builder, drained) → the stories' latest revisions.
    Returns (predicted story per event id, true story per event id)."""
    events, truth = generate(scenario)
    start_ms = int(scenario.start_s * 1000)
    clock = ManualClock(start_ms)

    async def body() -> dict[str, str]:
        store = make_store(cfg, clock)
        await store.open()
        await store.init_schema()
        try:
            producer = Producer(store, ProducerSettings.from_config(cfg), clock)
            producer.clock_checked = True  # simulated time
            batch: list[Any] = []
            for ev in events:  # delivered in arrival order, each at its arrival time
                arrival = start_ms + int(ev.arrival_s * 1000)
                if batch and arrival // cfg.bucket_ms != clock.now_ms() // cfg.bucket_ms:
                    await producer.write(batch)
                    batch = []
                clock.set(max(clock.now_ms(), arrival))
                batch.append(parse_line(ev.line, ParseRules.from_config(cfg), clock.now_ms()))
            if batch:
                await producer.write(batch)
            end = clock.now_ms()
            clock.set(end + cfg.lag_ms + cfg.bucket_ms)
            worker = Worker.from_config(
                cfg,
                list(range(cfg.shards)),
                CountingStage(),
                owner="acc",
                clock=clock,
                until_bucket=end // cfg.bucket_ms,
                drain=True,
                check_skew=False,
            )
            worker.stage = StoryMachine.for_config(cfg)
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

    return asyncio.run(body()), dict(truth.stories)
