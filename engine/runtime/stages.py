"""The stages ``storyline run --stage`` offers, as picklable factories a worker process builds its stage from:
``stories`` (:class:`StoryStageFactory`, the story builder of :mod:`engine.correlate.story`) and ``count``
(:class:`CountingStageFactory`, :class:`CountingStage`: consume only). Any other
:class:`~engine.runtime.settings.StageFactory` can be handed to the supervisor (the tests' recording stage:
:mod:`engine.testing.recording`)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from engine.core.config import Config, CorrelateConfig
from engine.core.stage import NO_MARKS, Batch, Buckets, Emission, Stage, each_partition
from engine.runtime.cpuclock import StageCpuClock


class CountingStage:
    """A stage that only counts: for the runtime's tests and the consume benchmark."""

    def __init__(self) -> None:
        self.events = 0
        self.buckets = 0
        self.replayed = 0
        self.per_shard: dict[int, int] = {}
        self.seen: dict[int, list[tuple[int, list[str]]]] = {}
        self.keep_ids = False

    def on_buckets(self, buckets: Buckets, *, replay: bool) -> Emission:
        return each_partition(buckets, self.on_bucket, replay=replay)

    def on_bucket(self, shard: int, bucket: int, batch: Batch, *, replay: bool) -> None:
        if replay:
            self.replayed += len(batch)
            return
        self.events += len(batch)
        self.buckets += 1
        self.per_shard[shard] = self.per_shard.get(shard, 0) + len(batch)
        if self.keep_ids and batch.views:
            self.seen.setdefault(shard, []).append((bucket, [e.id for e in batch.views]))

    def drain(self, shards: Sequence[int], bucket: int) -> Emission:
        return Emission(replay={s: bucket + 1 for s in shards})

    def marks_from(self, first: int) -> int:
        return NO_MARKS

    def prepare_replay(self, shard: int, first: int, last: int, marks: Sequence[tuple[int, bytes]]) -> None:
        return None

    def reset(self, shards: Sequence[int]) -> None:
        return None  # counts are not state: buckets processed again after an error are counted again

    def metrics(self) -> dict[str, float]:
        return {"stage_events": float(self.events), "stage_replayed": float(self.replayed)}


class CountingStageFactory(msgspec.Struct, frozen=True):
    """``--stage count``."""

    def build(self, owner: str) -> Stage:
        return CountingStage()


class StoryStageFactory(msgspec.Struct, frozen=True):
    """``--stage stories`` (the default): the story builder, with its part of the configuration."""

    correlate: CorrelateConfig
    bucket_ms: int
    community_id_seed: int = 0
    tenant: str = ""

    @classmethod
    def for_config(cls, cfg: Config) -> StoryStageFactory:
        return cls(cfg.correlate, cfg.bucket_ms, cfg.ingest.community_id_seed, cfg.tenant)

    def build(self, owner: str) -> Stage:
        from engine.correlate.story import StoryMachine  # polars: imported in the worker process only

        return StoryMachine(
            self.correlate,
            bucket_ms=self.bucket_ms,
            community_id_seed=self.community_id_seed,
            tenant=self.tenant,
            cpu_clock=StageCpuClock(),  # the cost ledger's steps: this thread's and polars' threads' CPU
        )
