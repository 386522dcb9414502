"""A stage that records what it consumed, durably, one JSONL file per worker: for the runtime's tests and the
chaos suite, which check from these files that no bucket was skipped or lost."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from engine.core.stage import NO_MARKS, Batch, Buckets, Emission, Stage, each_partition

_enc = msgspec.json.Encoder()


class RecordingStage:
    def __init__(self, directory: str, owner: str, delay_ms: int = 0) -> None:
        self.delay_s = delay_ms / 1000
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in owner)
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = os.path.join(directory, f"{safe}.jsonl")
        self._f = open(self.path, "ab")  # noqa: SIM115 - kept open for the process's life
        self.events = 0

    def on_buckets(self, buckets: Buckets, *, replay: bool) -> Emission:
        return each_partition(buckets, self.on_bucket, replay=replay)

    def on_bucket(self, shard: int, bucket: int, batch: Batch, *, replay: bool) -> None:
        if replay or not batch.views:
            return
        if self.delay_s:
            time.sleep(self.delay_s)  # tests: a slow stage, so faults land mid-run
        rec = {"shard": shard, "bucket": bucket, "ids": [e.id for e in batch.views]}
        self._f.write(_enc.encode(rec) + b"\n")
        self._f.flush()
        os.fsync(self._f.fileno())  # durable before the worker may move the offset past this bucket
        self.events += len(batch)

    def marks_from(self, first: int) -> int:
        return NO_MARKS

    def prepare_replay(self, shard: int, first: int, last: int, marks: Sequence[tuple[int, bytes]]) -> None:
        return None

    def reset(self, shards: Sequence[int]) -> None:
        return None  # nothing held: a bucket processed again after an error is recorded again

    def drain(self, shards: Sequence[int], bucket: int) -> Emission:
        return Emission(replay={s: bucket + 1 for s in shards})

    def metrics(self) -> dict[str, float]:
        return {"stage_events": float(self.events)}


class RecordingStageFactory(msgspec.Struct, frozen=True):
    """A :class:`RecordingStage` per worker process, in ``directory``; ``delay_ms`` per non-empty bucket;
    ``start_ms`` spent in :meth:`build` (a worker process slow to start: a loaded host)."""

    directory: str
    delay_ms: int = 0
    start_ms: int = 0

    def build(self, owner: str) -> Stage:
        if self.start_ms:
            time.sleep(self.start_ms / 1000)
        return RecordingStage(self.directory, owner, self.delay_ms)


def read_records(directory: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for p in sorted(Path(directory).glob("*.jsonl")):
        for line in p.read_bytes().splitlines():
            try:
                out.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                continue  # a line torn by kill -9: its bucket was never acknowledged, so it is consumed again
    return out
