"""The story feed's benchmarks (issue 17): how fast a reader reads, and how soon a following reader sees a revision.

* ``throughput``: ``revisions`` story revisions (version 2 bodies of a three-sensor flow, about 1.3 KB each) are
  written over 8 shards and 250 periods and every shard's checkpoint is committed past them; then one
  :class:`engine.feed.StoryFeed` reader (one process, one core: the feed is a single asyncio task) reads them all
  the way ``storyline feed --out FILE`` does — whole lines appended to a file, the position committed (after a
  flush and fsync) every 1,000 revisions and at the end. ``revisions_per_s`` is over the wall time of that read;
  ``cpu_us_per_revision`` is the reader process's CPU.
* ``follow``: a writer process plays the engine: every ``bucket_ms`` (100 ms) it writes ``per_period`` revisions
  of the period that just ended, over 8 shards, then commits every shard's checkpoint past it (as a worker's
  checkpoint: rows first, offsets second) and records when that commit returned. A following reader in this
  process records when it receives each revision. ``follow_p99_s`` = p99 over revisions of receive - the commit
  of its period's checkpoint; the issue's bound is ``commit_interval_ms`` + 2 x ``bucket_ms`` (the reader polls
  every ``max(bucket_ms / 2, 50)`` ms).

Run: ``python -m bench.feed [--backend embedded|cql] [--revisions N]`` (the CQL node at 127.0.0.1:9042 for cql);
``make bench`` runs both on the CQL node (``feed_revisions_per_s``, ``feed_follow_p99_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from typing import Any

import msgspec

from bench.pipeline import schema
from engine.core.config import Config, from_mapping
from engine.core.records import Commit, StoryRecord, story_id
from engine.correlate.body import Endpoint, Figures, Observer, StoryBody, Totals
from engine.feed import FeedItem, FeedSettings, StoryFeed
from engine.store import Store, make_store

SHARDS = 8
COMMIT_EVERY = 1_000  # as storyline feed


def _tree(backend: str, directory: str, cql: str) -> dict[str, Any]:
    store: dict[str, Any] = {"backend": backend}
    if backend == "embedded":
        store["path"] = f"{directory}/feed.db"
    else:
        store["contact_points"] = [cql]
    # bench.toml's buckets (100 ms); commit_interval_ms as there too (the follow bound depends on both)
    return {
        "tenant": f"bench_feed_{uuid.uuid4().hex[:8]}",
        "shards": SHARDS,
        "bucket_ms": 100,
        "commit_interval_ms": 1_000,
        "store": store,
    }


def body(sid: str, emitted_ms: int, n: int) -> bytes:
    """A version 2 body of a flow seen by a firewall, an EDR and a flow log (about 1.3 KB)."""
    start_us = emitted_ms * 1000 - 4_000_000

    def figures(c2s: int, s2c: int) -> Figures:
        return Figures(client_to_server=c2s, server_to_client=s2c, total=c2s + s2c)

    observers = [
        Observer(
            sensor="fw-1",
            source="firewall",
            first_us=start_us,
            last_us=start_us + 900_000,
            events=1,
            reported_direction="client_to_server",
            bytes=figures(1_200 + n % 97, 48_000),
            packets=figures(9, 40),
            attrs={"action": "allow", "rule": "r-117", "initiator": "src"},
        ),
        Observer(
            sensor="edr-1",
            source="endpoint",
            first_us=start_us + 150_000,
            last_us=start_us + 150_000,
            events=1,
            reported_direction="client_to_server",
            attrs={"process": "chrome.exe", "pid": 4_000 + n % 1000, "user": "a.lee", "host": "wks-0042"},
        ),
        Observer(
            sensor="vpcflow-1",
            source="cloud",
            first_us=start_us + 400_000,
            last_us=start_us + 2_100_000,
            events=2,
            reported_direction="both",
            bytes=figures(1_190, 47_700),
            packets=figures(9, 40),
            attrs={"vpc": "vpc-0a1b2c3d", "account": "412345678901", "action": "ACCEPT"},
        ),
    ]
    return msgspec.json.encode(
        StoryBody(
            story_id=sid,
            tenant="bench",
            revision=1,
            final=True,
            emitted_ms=emitted_ms,
            start="2026-12-05T10:00:00.000000Z",
            end="2026-12-05T10:00:02.100000Z",
            start_us=start_us,
            end_us=start_us + 2_100_000,
            duration_ms=2_100,
            event_count=4,
            community_id="1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
            proto=6,
            transport="tcp",
            client=Endpoint("10.1.4.20", 51_234 + n % 1000),
            server=Endpoint("93.184.216.34", 443),
            initiator_known=True,
            initiator_rule="sensor",
            totals=Totals(bytes=figures(1_200, 48_000), packets=figures(9, 40)),
            observers=observers,
            event_ids=[f"ev-{n}-{k}" for k in range(4)],
        )
    )


def rows_of_period(period: int, bucket_ms: int, per_period: int, first_key: int) -> list[StoryRecord]:
    emitted = (period + 1) * bucket_ms
    out = []
    for k in range(per_period):
        shard = k % SHARDS
        sid = story_id(shard, first_key + k)
        out.append(StoryRecord(shard, period, sid, 1, True, None, emitted, body(sid, emitted, first_key + k)))
    return out


async def checkpoint(store: Store, consumer: str, read_bucket: int, epochs: dict[int, int]) -> None:
    """Every shard's checkpoint at ``read_bucket`` (the shards claimed first while ``epochs`` is empty)."""
    if not epochs:
        offsets = await store.claim_many(consumer, list(range(SHARDS)), "bench", 0)
        epochs.update({o.shard: o.epoch for o in offsets})
    commits = [Commit(s, epochs[s], read_bucket, 0) for s in range(SHARDS)]
    refused = await store.commit_many(consumer, "bench", commits)
    assert not refused, refused


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def _read_all(cfg: Config, out_path: str) -> tuple[int, float, float]:
    store = make_store(cfg)
    await store.open()
    try:
        feed = StoryFeed(store, FeedSettings.from_config(cfg), reader="bench")
        fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        buf = bytearray()

        async def commit() -> None:
            os.write(fd, buf)
            buf.clear()
            os.fsync(fd)
            await feed.commit()

        t0, c0 = time.perf_counter(), _cpu_s()
        async for item in feed:
            assert isinstance(item, FeedItem)
            buf += item.record.body
            buf += b"\n"
            if feed.revisions % COMMIT_EVERY == 0:
                await commit()
        await commit()
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
        os.close(fd)
        return feed.revisions, wall, cpu
    finally:
        await store.close()


def throughput(backend: str, revisions: int = 200_000, cql: str = "127.0.0.1:9042") -> dict[str, Any]:
    periods = 250
    per_period = -(-revisions // periods)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_mapping(_tree(backend, tmp, cql))

        async def prepare() -> int:
            store = make_store(cfg)
            await store.open()
            await store.init_schema()
            try:
                p0 = int(time.time() * 1000) // cfg.bucket_ms - periods - 10
                written = 0
                for p in range(p0, p0 + periods):
                    rows = rows_of_period(p, cfg.bucket_ms, min(per_period, revisions - written), written)
                    await store.put_stories(rows)
                    written += len(rows)
                await checkpoint(store, cfg.consumer, p0 + periods, {})
                return written
            finally:
                await store.close()

        written = asyncio.run(prepare())
        n, wall, cpu = asyncio.run(_read_all(cfg, f"{tmp}/out.jsonl"))
        size = os.path.getsize(f"{tmp}/out.jsonl")
        _drop(cfg)
    assert n == written, f"the feed delivered {n} of {written} revisions"
    return {
        "backend": backend,
        "revisions": n,
        "bytes_per_revision": round(size / n),
        "seconds": round(wall, 3),
        "revisions_per_s": round(n / wall),
        "cpu_us_per_revision": round(cpu / n * 1e6, 2),
    }


def _drop(cfg: Config) -> None:
    """Drop the run's keyspace (CQL); the embedded store's file goes with its temporary directory."""
    if cfg.store.backend == "cql":
        schema(cfg, create=False)


def _writer(tree: dict[str, Any], periods: int, per_period: int, ready: Any, go: Any, out: Any) -> None:
    """The engine's part, in a process of its own: rows of each period, then the checkpoint; when it returned."""
    cfg = from_mapping(tree)

    async def run() -> dict[int, float]:
        store = make_store(cfg)
        await store.open()
        try:
            epochs: dict[int, int] = {}
            bms = cfg.bucket_ms
            p = int(time.time() * 1000) // bms
            await checkpoint(store, cfg.consumer, p, epochs)  # everything before the run is complete
            ready.set()
            go.wait()
            committed: dict[int, float] = {}
            key = 0
            for _ in range(periods):
                p = int(time.time() * 1000) // bms
                await asyncio.sleep(max(0.0, (p + 1) * bms / 1000 - time.time()))  # period p has ended
                await store.put_stories(rows_of_period(p, bms, per_period, key))
                key += per_period
                await checkpoint(store, cfg.consumer, p + 1, epochs)
                committed[p] = time.time()
            return committed
        finally:
            await store.close()

    out.put(asyncio.run(run()))


def follow(backend: str, seconds: float = 30.0, per_period: int = 40, cql: str = "127.0.0.1:9042") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tree = _tree(backend, tmp, cql)
        cfg = from_mapping(tree)

        async def init() -> None:
            store = make_store(cfg)
            await store.open()
            try:
                await store.init_schema()
            finally:
                await store.close()

        asyncio.run(init())
        periods = int(seconds * 1000 / cfg.bucket_ms)
        ctx = mp.get_context("spawn")
        ready, go, q = ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=_writer, args=(tree, periods, per_period, ready, go, q))
        proc.start()
        try:
            assert ready.wait(120), "the writer did not start"
            received: dict[int, list[float]] = {}

            async def read() -> None:
                store = make_store(cfg)
                await store.open()
                try:
                    feed = StoryFeed(store, FeedSettings.from_config(cfg), reader="bench", start="latest", follow=True)
                    go.set()
                    async for item in feed:
                        assert isinstance(item, FeedItem)
                        received.setdefault(item.record.period, []).append(time.time())
                        if sum(map(len, received.values())) >= periods * per_period:
                            feed.stop()
                            break
                finally:
                    await store.close()

            asyncio.run(asyncio.wait_for(read(), seconds + 120))
            committed: dict[int, float] = q.get(timeout=60)
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        _drop(cfg)
    delays = sorted(t - committed[p] for p, ts in received.items() for t in ts)
    assert len(delays) == periods * per_period, (len(delays), periods * per_period)

    def pct(q_: float) -> float:
        return round(delays[min(len(delays) - 1, int(q_ * len(delays)))], 4)

    return {
        "backend": backend,
        "revisions": len(delays),
        "revisions_per_s": round(per_period * 1000 / cfg.bucket_ms),
        "poll_ms": FeedSettings.from_config(cfg).poll_ms,
        "follow_p50_s": pct(0.50),
        "follow_p99_s": pct(0.99),
        "follow_max_s": round(delays[-1], 4),
        "bound_s": (cfg.commit_interval_ms + 2 * cfg.bucket_ms) / 1000,
    }


def run(backend: str = "cql", revisions: int = 200_000, cql: str = "127.0.0.1:9042") -> dict[str, Any]:
    return {"throughput": throughput(backend, revisions, cql), "follow": follow(backend, cql=cql)}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.feed", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("embedded", "cql"), default="cql")
    ap.add_argument("--revisions", type=int, default=200_000)
    ap.add_argument("--cql", default="127.0.0.1:9042")
    args = ap.parse_args()
    print(json.dumps(run(args.backend, args.revisions, args.cql), indent=2))


if __name__ == "__main__":
    main()
