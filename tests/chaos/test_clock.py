"""A worker whose clock jumps backwards while producers write (injected clock, in-process worker with the story
builder). The worker must not read any bucket again, its offsets must not move backwards, and it must resume
without skipping anything when the clock comes back; ``storyline run --drain`` and ``storyline verify`` end it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from engine.core.stage import Buckets, Emission, Stage
from engine.correlate.story import StoryMachine
from engine.runtime.stages import CountingStage
from engine.runtime.worker import Worker
from tests.chaos.conftest import Recorder, TenantFactory
from tests.chaos.harness import Feeder, caught_up_slack_ms, finish, split

pytestmark = pytest.mark.chaos

JUMP_MS = 20_000  # backwards: more than five times the lag


class JumpClock:
    """The system clock plus an offset the test sets (negative: the clock jumped backwards)."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


class Watch:
    """Wraps the worker's stage and records every live bucket it hands over, with the time."""

    def __init__(self, inner: Stage) -> None:
        self.inner = inner
        self.live: dict[int, list[tuple[int, float]]] = {}

    def on_buckets(self, buckets: Buckets, *, replay: bool) -> Emission:
        if not replay:
            for bucket, batches in buckets:
                for shard in batches:
                    self.live.setdefault(shard, []).append((bucket, time.time()))
        return self.inner.on_buckets(buckets, replay=replay)

    def marks_from(self, first: int) -> int:
        return self.inner.marks_from(first)

    def prepare_replay(self, shard: int, first: int, last: int, marks: Sequence[tuple[int, bytes]]) -> None:
        self.inner.prepare_replay(shard, first, last, marks)

    def reset(self, shards: Sequence[int]) -> None:
        self.inner.reset(shards)

    def drain(self, shards: Sequence[int], bucket: int) -> Emission:
        return self.inner.drain(shards, bucket)

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()


def test_a_worker_clock_jumping_backwards(
    backend: str, chaos_tenant: TenantFactory, chaos_record: Recorder, sim_20k: tuple[Path, Path]
) -> None:
    t = chaos_tenant()
    t.run("init")
    cfg = t.cfg
    src, truth = sim_20k
    feeder = Feeder(t, split(src, t.dir, 10), pause_s=1.0)
    clock = JumpClock()
    worker = Worker.from_config(
        cfg, range(cfg.shards), CountingStage(), owner="chaos-clock", clock=clock, check_skew=False
    )
    watch = Watch(StoryMachine.for_config(cfg))
    worker.stage = watch
    committed: dict[int, list[int]] = {}

    def caught_up() -> bool:
        target = worker.target()
        slack = caught_up_slack_ms(cfg) // cfg.bucket_ms
        return bool(worker.state) and all(st.read >= target - slack for st in worker.state.values())

    async def scenario() -> tuple[float, float]:
        task = asyncio.create_task(worker.run())

        async def wait(pred: Callable[[], bool], limit_s: float, what: str) -> float:
            deadline = time.time() + limit_s
            while not pred():
                assert not task.done(), f"the worker stopped: {task.result()}"
                assert time.time() < deadline, f"{what}: not within {limit_s} s"
                for st in worker.state.values():
                    committed.setdefault(st.shard, []).append(st.committed_read)
                await asyncio.sleep(0.05)
            return time.time()

        feeder.start()
        await wait(lambda: sum(len(v) for v in watch.live.values()) > 50 and caught_up(), 60, "start")
        await asyncio.sleep(2.0)  # consuming what the feeder writes
        clock.offset_ms = -JUMP_MS
        t_jump = time.time()
        await asyncio.sleep(1.0)  # a round that began before the jump may end
        reads = {s: st.read for s, st in worker.state.items()}
        await asyncio.sleep(5.0)  # producers go on writing; the worker must wait, not re-read
        assert {s: st.read for s, st in worker.state.items()} == reads, "the worker moved while its clock was back"
        late = [(s, b) for s, seen in watch.live.items() for b, at in seen if at > t_jump + 1.0]
        assert not late, f"buckets handed over while the clock was {JUMP_MS} ms back: {late[:5]}"
        clock.offset_ms = 0
        t_back = time.time()
        recovered = await wait(caught_up, 60, "catching up after the clock came back")
        await asyncio.to_thread(feeder.finish)
        await asyncio.sleep(max(0.0, feeder.done_at + (cfg.lag_ms + 2 * cfg.bucket_ms) / 1000 - time.time()))
        await wait(caught_up, 60, "the end")
        worker.stop.set()
        assert await task == 0
        return t_jump, recovered - t_back

    try:
        _t_jump, recovery = asyncio.run(scenario())
    finally:
        feeder.stopping.set()
    for shard, seen in watch.live.items():
        buckets = [b for b, _ in seen]
        assert buckets == sorted(set(buckets)), f"shard {shard}: a bucket was handed over twice or out of order"
    for shard, values in committed.items():
        assert values == sorted(values), f"shard {shard}: the committed offset moved backwards"
    report = finish(t, truth, feeder.runs)
    assert report.events == 20_000
    chaos_record(
        "a worker clock jumping backwards",
        backend,
        report,
        [recovery],
        1,
        note=f"in-process worker (story builder) with an injected clock set {JUMP_MS / 1000:.0f} s back for 6 s "
        "while producers write: no bucket handed over, no offset moved; recovery = clock restored until every "
        "shard is caught up",
    )
    t.assert_restart_changes_nothing(truth)
