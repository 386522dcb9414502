"""The chaos tier's checker itself (engine/tools/verify.py): it must catch what it is there to catch. Fast, embedded
store only (the store calls it makes are covered on both stores by the conformance suite)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest

from engine.core.config import Config, from_mapping
from engine.store import DeadLetter, EventRecord, Store, StoryRecord, make_store
from engine.tools.verify import IngestRun, parse_ingest_summary, reconcile, verify
from tests.conftest import arun, base_tree

pytestmark = pytest.mark.chaos


@asynccontextmanager
async def initialized(cfg: Config) -> AsyncIterator[Store]:
    """The tenant's store, opened with its schema created; closed on the way out."""
    store = make_store(cfg)
    await store.open()
    try:
        await store.init_schema()
        yield store
    finally:
        await store.close()


def story(sid: str, revision: int, emitted_ms: int, ids: list[str], merged_into: str | None = None) -> StoryRecord:
    body = msgspec.json.encode({"story_id": sid, "revision": revision, "event_ids": ids})
    return StoryRecord(0, emitted_ms // 100, sid, revision, True, merged_into, emitted_ms, body)


def test_verify_tells_incarnations_reingests_conflicts_and_counts_apart(tmp_path: Path) -> None:
    cfg = from_mapping(
        {**base_tree("embedded", tmp_path, "t_verify"), "shards": 1, "correlate": {"amend_horizon_ms": 10_000}}
    )
    now = int(time.time() * 1000)

    async def body() -> None:
        async with initialized(cfg) as store:
            await store.append(0, now // cfg.bucket_ms, [EventRecord(i, b"x") for i in ("a", "b", "c", "d")])
            await store.put_dead_letters([DeadLetter("dl1", now, "f1", 3, "bad", b"{")])
            await store.put_stories(
                [
                    story("s1", 1, now, ["a"]),
                    story("s1", 2, now + 1_000, ["a", "b"]),
                    # a and b delivered again after the horizon: a new story (its id hashes the bucket it starts in)
                    story("s4", 1, now + 60_000, ["a", "b"]),
                    story("s2", 1, now, ["c"]),
                    story("s2", 2, now + 500, [], merged_into="s1"),
                    story("s3", 1, now, ["c", "d"]),
                ]
            )
            rep = await verify(store, cfg, now + 70_000)
        assert rep.events == 4 and rep.stories == 3 and rep.merged_stubs == 1 and rep.recreated == 0
        assert sorted(rep.reingested) == ["a", "b"]  # in s1 and s4, 59 s apart: a late re-delivery, listed apart
        assert rep.duplicated == [] and rep.missing == [] and rep.unknown == [] and rep.repeated == [] and rep.ok
        # ingest summaries: file f2 ran twice (a re-delivery counts once), rejects match the dead letters
        runs = [IngestRun("f1", 3, 1), IngestRun("f2", 1, 0), IngestRun("f2", 1, 0)]
        assert reconcile(rep, runs) == [] and rep.ok
        assert reconcile(rep, [IngestRun("f1", 5, 1)]) == [
            "4 distinct events stored, but the ingest runs of 1 inputs accepted 5"
        ]
        lines = rep.lines()
        assert lines[-1] == "verify: FAILED" and any(ln.startswith("counts do not reconcile") for ln in lines)
        assert parse_ingest_summary("f", "ingest: accepted 1,234, rejected 5, duplicates 6, empty …") == IngestRun(
            "f", 1234, 5, 6
        )

    arun(body())


def test_verify_flags_an_event_in_two_stories_within_the_horizon(tmp_path: Path) -> None:
    cfg = from_mapping({**base_tree("embedded", tmp_path, "t_verify2"), "shards": 1})
    now = int(time.time() * 1000)

    async def body() -> None:
        async with initialized(cfg) as store:
            await store.append(0, now // cfg.bucket_ms, [EventRecord(i, b"x") for i in ("a", "b")])
            await store.put_stories([story("s1", 1, now, ["a"]), story("s2", 1, now + 2_000, ["a", "b", "zz"])])
            rep = await verify(store, cfg, now + 5_000)
        assert rep.duplicated == ["a"] and rep.unknown == ["zz"] and not rep.ok

    arun(body())


def test_verify_flags_a_story_revision_stored_twice(tmp_path: Path) -> None:
    """The story stream's promise: one row per (story_id, revision). The same revision emitted again under
    another period (a restart that rebuilt and re-emitted a finished story) fails verify, even when every event
    is still in exactly one latest revision."""
    cfg = from_mapping({**base_tree("embedded", tmp_path, "t_verify3"), "shards": 1})
    now = int(time.time() * 1000)

    async def body() -> None:
        async with initialized(cfg) as store:
            await store.append(0, now // cfg.bucket_ms, [EventRecord(i, b"x") for i in ("a", "b")])
            await store.put_stories([story("s1", 1, now, ["a", "b"]), story("s1", 1, now + 30_000, ["a", "b"])])
            rep = await verify(store, cfg, now + 40_000)
        assert rep.repeated == ["s1@1"] and rep.missing == [] and not rep.ok
        assert any("stored twice" in ln for ln in rep.lines())

    arun(body())
