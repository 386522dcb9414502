"""The story builder: the stage that fuses linked events into stories (first cut, see docs/correlation.md).

State per shard is one polars frame of the events of open and recently emitted stories (id, corrected time,
flow, story, ingest time, payload) plus a small record per story. Each bucket is processed as a whole:

1. the bucket's events (view-decoded by the worker) become a frame; ids already in the state are dropped
   (a re-ingested duplicate counts once) and counted;
2. the state's events of the same flows are taken (a semi-join), and :func:`engine.correlate.link.link` finds the
   components of the union — no per-event Python loop;
3. per component (a Python loop over stories, not events): no known story → a new story whose id derives from
   its smallest event id (deterministic: the same input gives the same ids, also on replay); one → the events
   join it (an emitted story gets a new revision: late evidence amends); several → they merge, the smallest id
   survives and the others get a last revision marked ``merged_into``;
4. time is the bucket's end (ingest time): a story no event has joined for ``correlate.max_wait_ms`` is emitted
   (``final``); an emitted story leaves the state ``correlate.amend_horizon_ms`` after its last emission.

Every emission is an idempotent upsert of ``(story_id, revision)`` into the ``stories`` table, partitioned by
``(shard, emit bucket)``; the worker moves ``read_bucket`` only after :meth:`StoryStage.on_bucket` returns.
``replay_bucket`` is the first bucket of the oldest story still in the state, so a restart rebuilds the state by
replaying from there (the same buckets in the same order give the same stories and revisions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import polars as pl
import xxhash

from engine.config import Config
from engine.event import Event
from engine.flow import community_id
from engine.stage import Batch
from engine.store import Store, StoryRecord

from .link import link

_full = msgspec.msgpack.Decoder(Event)
_json = msgspec.json.Encoder()
SCHEMA = {
    "id": pl.String,
    "t": pl.Int64,
    "flow": pl.UInt64,
    "story": pl.String,
    "ingest": pl.Int64,
    "payload": pl.Binary,
}
TOTALS = ("bytes", "packets")


@dataclass
class StoryMeta:
    id: str
    first_bucket: int
    last_ingest_ms: int
    events: int = 0
    revision: int = 0  # the last emitted revision; 0: never emitted
    emitted_ms: int | None = None
    dirty: bool = True  # events joined since the last emission
    changed: bool = True  # events joined in the bucket being processed
    truncated: bool = False
    t_min: int = 2**62
    t_max: int = -(2**62)
    predecessor: str | None = None  # the truncated story this one continues
    last_bucket: int = -1  # the last bucket an event joined in


class FusedStory(msgspec.Struct, omit_defaults=True):
    """The documented output schema (docs/correlation.md)."""

    story_id: str
    revision: int
    final: bool
    community_id: str | None
    flow: dict[str, Any] | None
    first_seen: int  # µs UTC, corrected event time
    last_seen: int
    event_count: int
    event_ids: list[str]
    sources: list[str]
    sensors: list[str]
    directions: dict[str, str]  # event id → "a->b" (as the flow's order) or "b->a" (reported reversed)
    attrs: dict[str, dict[str, Any]]  # per source: merged attributes (last value wins)
    totals: dict[str, int] = msgspec.field(default_factory=dict)  # sums of bytes / packets where reported
    truncated: bool = False
    predecessor: str | None = None
    merged_into: str | None = None


@dataclass
class ShardState:
    frame: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=SCHEMA))
    stories: dict[str, StoryMeta] = field(default_factory=dict)
    pending_chunks: int = 0
    merged_now: dict[str, str] = field(default_factory=dict)  # merged this bucket: old id → survivor
    sealed_flows: dict[int, str] = field(default_factory=dict)  # flow → its last truncated story
    # (first_bucket, last_bucket) of stories that left the state: a replay must not start inside one of them
    gone: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class StoryCounters:
    events: int = 0
    duplicates: int = 0
    stories: int = 0
    emitted: int = 0
    amended: int = 0
    merged: int = 0
    evicted: int = 0
    forced: int = 0
    truncated: int = 0


_MISSING: Any = object()


def _merge(rule: str, old: Any, new: Any) -> Any:
    """One attribute value folded into the merged value by its rule; values a rule cannot combine (a sum of
    strings) fall back to the latest value."""
    if old is _MISSING:
        return [new] if rule == "set" else new
    if rule == "first":
        return old
    if rule == "set":
        return old if new in old else [*old, new]
    numeric = isinstance(old, int | float) and isinstance(new, int | float)
    if rule == "sum" and numeric and not isinstance(old, bool) and not isinstance(new, bool):
        return old + new
    if rule in ("min", "max") and numeric:
        return min(old, new) if rule == "min" else max(old, new)
    return new


class StoryStage:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.c = cfg.correlate
        self.window_us = self.c.match_window_ms * 1000
        self.shards: dict[int, ShardState] = {}
        self.counters = StoryCounters()

    # -- the stage interface ------------------------------------------------------------------------------
    def replay_bucket(self, shard: int, read_bucket: int) -> int:
        """The first bucket of the oldest story in the state — moved further back while a story that already
        left the state has events on both sides of it, so that a replay never starts in the middle of a story
        (its later events would otherwise be rebuilt into a new, partial story)."""
        st = self.shards.get(shard)
        if st is None:
            return read_bucket + 1
        r = min((m.first_bucket for m in st.stories.values()), default=read_bucket + 1)
        moved = True
        while moved:
            moved = False
            for first, last in st.gone:
                if first < r <= last:
                    r, moved = first, True
        st.gone = [(f, la) for f, la in st.gone if la >= r]  # those ending before r can never matter again
        return r

    def metrics(self) -> dict[str, float]:
        return {f"stories_{k}": float(v) for k, v in vars(self.counters).items()}

    async def drain(self, shard: int, bucket: int) -> None:
        st = self.shards.get(shard)
        if st is None:
            return
        now = (bucket + 1) * self.cfg.bucket_ms
        due = [m for m in st.stories.values() if m.dirty]
        await self._emit(shard, bucket, st, due, now)

    async def on_bucket(self, shard: int, bucket: int, batch: Batch, *, replay: bool) -> None:
        """Buckets arrive in order but not necessarily one by one (empty buckets may be skipped): what falls
        due in the skipped buckets is settled first, at the bucket it fell due in, so the output does not
        depend on which empty buckets the worker reported (live and replay agree)."""
        st = self.shards.setdefault(shard, ShardState())
        await self._catch_up(shard, st, bucket - 1)
        if len(batch):
            self._absorb(shard, bucket, st, batch, (bucket + 1) * self.cfg.bucket_ms)
        await self._timeouts(shard, bucket, st, (bucket + 1) * self.cfg.bucket_ms)

    def _due_bucket(self, ms: int) -> int:
        """The first bucket whose end is at or after ``ms``."""
        return -(-ms // self.cfg.bucket_ms) - 1

    async def _catch_up(self, shard: int, st: ShardState, until: int) -> None:
        """Emissions and evictions that fell due in buckets up to ``until``, each at its own bucket, in order."""
        c = self.c
        while True:
            pending = [self._due_bucket(m.last_ingest_ms + c.max_wait_ms) for m in st.stories.values() if m.dirty] + [
                self._due_bucket(m.emitted_ms + c.amend_horizon_ms)
                for m in st.stories.values()
                if not m.dirty and m.emitted_ms is not None
            ]
            due = [b for b in pending if b <= until]
            if not due:
                return
            b = min(due)
            await self._timeouts(shard, b, st, (b + 1) * self.cfg.bucket_ms)

    # -- linking ------------------------------------------------------------------------------------------
    def _absorb(self, shard: int, bucket: int, st: ShardState, batch: Batch, now: int) -> None:
        views = batch.views
        offsets = self.c.sensor_offsets_ms
        new = pl.DataFrame(
            {
                "id": [v.id for v in views],
                "t": [v.time_us - offsets.get(v.sensor, 0) * 1000 for v in views]
                if offsets
                else [v.time_us for v in views],
                "flow": [v.flow for v in views],
                "story": pl.Series([None] * len(views), dtype=pl.String),
                "ingest": pl.Series([now] * len(views), dtype=pl.Int64),
                "payload": [r.payload for r in batch.records],
            },
            schema=SCHEMA,
        ).unique("id", keep="first", maintain_order=True)
        if st.frame.height:
            new = new.join(st.frame.select("id"), on="id", how="anti")
        self.counters.duplicates += len(views) - len(new)
        if new.is_empty():
            return
        self.counters.events += len(new)
        ctx = (
            st.frame.join(new.select("flow").drop_nulls().unique(), on="flow", how="semi")
            if st.frame.height
            else st.frame
        )
        union = pl.concat(
            [ctx.with_columns(pl.lit(False).alias("is_new")), new.with_columns(pl.lit(True).alias("is_new"))]
        )
        union = union.with_columns(link(union, [("flow", self.window_us)]).alias("comp"))
        groups = (
            union.group_by("comp")
            .agg(
                pl.col("story").drop_nulls().unique().sort().alias("known"),
                pl.col("id").filter(pl.col("is_new")).min().alias("first_new"),
                pl.col("is_new").sum().alias("n_new"),
                pl.col("t").min().alias("t_min"),
                pl.col("t").max().alias("t_max"),
                pl.col("flow").first().alias("flow"),
            )
            .filter(pl.col("n_new") > 0)
            .sort("first_new")
        )
        survivor_of: dict[int, str] = {}
        renames: dict[str, str] = {}
        for comp, known, first_new, n_new, t_min, t_max, flow in groups.iter_rows():
            if not known:
                sid = self._new_id(shard, first_new)
                st.stories[sid] = StoryMeta(sid, bucket, now)
                if flow is not None and flow in st.sealed_flows:
                    st.stories[sid].predecessor = st.sealed_flows[flow]
                self.counters.stories += 1
            else:
                sid = known[0]
                for other in known[1:]:
                    renames[other] = sid
            meta = st.stories[sid]
            meta.last_ingest_ms = now
            meta.last_bucket = bucket
            meta.events += int(n_new)
            meta.t_min = min(meta.t_min, t_min)
            meta.t_max = max(meta.t_max, t_max)
            if meta.revision and not meta.dirty:
                self.counters.amended += 1
            meta.dirty = True
            meta.changed = True
            survivor_of[comp] = sid
        assigned = (
            union.filter(pl.col("is_new"))
            .with_columns(pl.col("comp").replace_strict(survivor_of, return_dtype=pl.String).alias("story"))
            .select(list(SCHEMA))
        )
        frame = pl.concat([st.frame, assigned], how="vertical", rechunk=False)
        if renames:
            frame = frame.with_columns(pl.col("story").replace(renames))
            for old, sid in renames.items():
                om, sm = st.stories[old], st.stories[sid]
                sm.events += om.events
                sm.first_bucket = min(sm.first_bucket, om.first_bucket)
                sm.last_bucket = max(sm.last_bucket, om.last_bucket)
                sm.t_min, sm.t_max = min(sm.t_min, om.t_min), max(sm.t_max, om.t_max)
                self.counters.merged += 1
        st.pending_chunks += 1
        if st.pending_chunks > 64:
            frame = frame.rechunk()
            st.pending_chunks = 0
        st.frame = frame
        st.merged_now.update(renames)  # written as merged_into stubs by _timeouts

    def _new_id(self, shard: int, first_event: str) -> str:
        return f"s{shard:04x}-{xxhash.xxh3_64_hexdigest(first_event.encode())}"

    # -- time ---------------------------------------------------------------------------------------------
    async def _timeouts(self, shard: int, bucket: int, st: ShardState, now: int) -> None:
        renames, st.merged_now = st.merged_now, {}
        records: list[StoryRecord] = []
        for old, sid in renames.items():
            om = st.stories.pop(old)
            if om.revision:  # it was visible downstream: tell consumers where it went
                records.append(self._stub(shard, bucket, om, sid, now))
        c = self.c
        due = [m for m in st.stories.values() if m.dirty and m.last_ingest_ms + c.max_wait_ms <= now]
        span_us = c.max_story_ms * 1000
        big = [
            m
            for m in st.stories.values()
            if m.dirty and (m.events >= c.max_story_events or m.t_max - m.t_min >= span_us)
        ]
        for m in big:
            m.truncated = True
        due += [m for m in big if m not in due]
        open_now = sum(1 for m in st.stories.values() if m.dirty)
        if open_now - len(due) > c.max_open_stories:
            extra = sorted((m for m in st.stories.values() if m.dirty and m not in due), key=lambda m: m.last_ingest_ms)
            forced = extra[: open_now - len(due) - c.max_open_stories]
            self.counters.forced += len(forced)
            due += forced
        provisional: list[StoryMeta] = []
        if c.emit == "updates":
            provisional = [m for m in st.stories.values() if m.changed and m.dirty and m not in due]
        for m in st.stories.values():
            m.changed = False
        if records or due or provisional:
            await self._emit(shard, bucket, st, due, now, records, provisional)
        if big:
            self._seal(st, big)
        # Leave the state: emitted, quiet, and past the amend horizon.
        gone = [
            m.id
            for m in st.stories.values()
            if not m.dirty and m.emitted_ms is not None and m.emitted_ms + c.amend_horizon_ms <= now
        ]
        if gone:
            for sid in gone:
                m = st.stories.pop(sid)
                st.gone.append((m.first_bucket, m.last_bucket))
            st.frame = st.frame.filter(~pl.col("story").is_in(gone))
            self.counters.evicted += len(gone)

    def _seal(self, st: ShardState, stories: list[StoryMeta]) -> None:
        """A truncated story is final: its rows leave the state (memory stays bounded under a flood of one
        flow), and the next events of its flows start a successor story that names it."""
        ids = [m.id for m in stories]
        rows = st.frame.filter(pl.col("story").is_in(ids)).group_by("flow").agg(pl.col("story").max())
        for flow, sid in rows.iter_rows():
            if flow is not None:
                st.sealed_flows[flow] = sid
        st.frame = st.frame.filter(~pl.col("story").is_in(ids))
        for sid in ids:
            m = st.stories.pop(sid)
            st.gone.append((m.first_bucket, m.last_bucket))
        self.counters.truncated += len(ids)

    async def _emit(
        self,
        shard: int,
        bucket: int,
        st: ShardState,
        due: list[StoryMeta],
        now: int,
        records: list[StoryRecord] | None = None,
        provisional: list[StoryMeta] | None = None,
    ) -> None:
        out = list(records or [])
        temp = {m.id for m in provisional or []}
        due = [*due, *(provisional or [])]
        if due:
            ids = [m.id for m in due]
            rows = st.frame.filter(pl.col("story").is_in(ids)).sort(["story", "t", "id"])
            col_story: list[str] = rows["story"].to_list()
            col_t: list[int] = rows["t"].to_list()
            col_payload: list[bytes] = rows["payload"].to_list()
            lo = 0
            n = len(col_story)
            while lo < n:  # one pass over the emitted rows, split at story boundaries
                sid = col_story[lo]
                hi = lo + 1
                while hi < n and col_story[hi] == sid:
                    hi += 1
                meta = st.stories[sid]
                meta.revision += 1
                final = sid not in temp
                if final:  # a provisional revision neither closes the story nor starts its amend horizon
                    meta.emitted_ms = now
                    meta.dirty = False
                body = self._fuse(meta, col_t[lo:hi], col_payload[lo:hi])
                body.final = final
                out.append(StoryRecord(shard, bucket, meta.id, meta.revision, final, None, now, _json.encode(body)))
                self.counters.emitted += 1
                lo = hi
        if out:
            await self.store.put_stories(out)

    def _stub(self, shard: int, bucket: int, meta: StoryMeta, into: str, now: int) -> StoryRecord:
        body = FusedStory(meta.id, meta.revision + 1, True, None, None, 0, 0, 0, [], [], [], {}, {}, merged_into=into)
        return StoryRecord(shard, bucket, meta.id, meta.revision + 1, True, into, now, _json.encode(body))

    def _fuse(self, meta: StoryMeta, ts: list[int], payloads: list[bytes]) -> FusedStory:
        events = [_full.decode(p) for p in payloads]
        sources = sorted({e.source for e in events})
        sensors = sorted({e.sensor for e in events})
        directions = {e.id: ("b->a" if e.reversed else "a->b") for e in events}
        attrs: dict[str, dict[str, Any]] = {}
        totals: dict[str, int] = {}
        rules = self.c.merge
        for e in events:
            merged = attrs.setdefault(e.source, {})
            if not rules:
                merged.update(e.attrs)
            else:
                for k, v in e.attrs.items():
                    merged[k] = _merge(rules.get(k, "last"), merged.get(k, _MISSING), v)
            for k in TOTALS:
                v = e.attrs.get(k)
                if isinstance(v, int) and not isinstance(v, bool):
                    totals[k] = totals.get(k, 0) + v
        first = next((e for e in events if e.flow is not None), None)
        cid = flow = None
        if first is not None and first.proto is not None and first.src_ip and first.dst_ip:
            a = (first.dst_ip, first.dst_port) if first.reversed else (first.src_ip, first.src_port)
            b = (first.src_ip, first.src_port) if first.reversed else (first.dst_ip, first.dst_port)
            flow = {"proto": first.proto, "a": {"ip": a[0], "port": a[1]}, "b": {"ip": b[0], "port": b[1]}}
            cid = community_id(
                first.proto,
                first.src_ip,
                first.src_port,
                first.dst_ip,
                first.dst_port,
                seed=self.cfg.ingest.community_id_seed,
            )
        return FusedStory(
            meta.id,
            meta.revision,
            True,
            cid,
            flow,
            min(ts),
            max(ts),
            len(events),
            [e.id for e in events],
            sources,
            sensors,
            directions,
            attrs,
            totals,
            meta.truncated,
            meta.predecessor,
        )
