"""The stages the runtime offers besides story building: ``--stage count``."""

from __future__ import annotations

from collections.abc import Sequence

from engine.core.stage import NO_MARKS, Batch, Buckets, Emission, each_partition


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
