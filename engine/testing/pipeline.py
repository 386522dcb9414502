"""The whole story path in one process on a virtual clock, for accuracy checks (tests, ``bench.stories``):
simulated sensors → producer → store → worker (story builder, drained) → each event's story."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from engine.core.clock import ManualClock
from engine.core.config import Config
from engine.core.event import Event
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
    rules = ParseRules.from_config(cfg)
    predicted = run_lines(
        cfg,
        scenario.start_s,
        [e.line for e in events],
        [e.arrival_s for e in events],
        lambda line, now: parse_line(line, rules, now),
    )
    return predicted, dict(truth.stories)


def run_lines(
    cfg: Config,
    start_s: float,
    lines: Sequence[bytes],
    arrivals: Sequence[float],
    parse: Callable[[bytes, int], Event | None],
    *,
    bodies: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Lines (any input format: ``parse`` turns one into its event, or None for a header) delivered in order, each
    at its arrival (seconds after ``start_s``) on a virtual clock → producer → store → worker (story builder,
    drained) → the story of each event id in the stories' latest revisions (``bodies``, when given, receives each
    story's latest body, decoded, by story id)."""
    start_ms = int(start_s * 1000)
    clock = ManualClock(start_ms)

    async def body() -> dict[str, str]:
        store = make_store(cfg, clock)
        await store.open()
        await store.init_schema()
        try:
            producer = Producer(store, ProducerSettings.from_config(cfg), clock)
            producer.clock_checked = True  # simulated time
            batch: list[Any] = []
            for line, arrival_s in zip(lines, arrivals, strict=True):  # in order, each at its arrival time
                arrival = start_ms + int(arrival_s * 1000)
                if batch and arrival // cfg.bucket_ms != clock.now_ms() // cfg.bucket_ms:
                    await producer.write(batch)
                    batch = []
                clock.set(max(clock.now_ms(), arrival))
                event = parse(line, clock.now_ms())
                if event is not None:
                    batch.append(event)
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
                doc = msgspec.json.decode(rec.body)
                if bodies is not None:
                    bodies[rec.story_id] = doc
                for eid in doc["event_ids"]:
                    assert eid not in predicted, f"{eid} in two stories' latest revisions"
                    predicted[eid] = rec.story_id
            return predicted
        finally:
            await store.close()

    return asyncio.run(body())
