"""The story builder: the stage that fuses linked events into stories (see docs/correlation.md).

State is one polars frame of the events of open and recently emitted stories of every shard the worker owns
(id, corrected time, flow, story, ingest time, the fields fusion needs, shard) plus a small record per story,
kept per shard. The worker hands over one bucket of many shards per call, processed as a whole:

1. the partitions' events (one msgspec call) become a frame; ids already in their shard's state are dropped
   (a re-ingested duplicate counts once) and counted;
2. the state's events of the same flows are taken (a semi-join), and :func:`engine.correlate.link.link` finds the
   components of the union — no per-event Python loop; a flow lives in one shard, so shards never link;
3. per component (a Python loop over stories, not events): no known story → a new story whose id derives from
   its shard and smallest event id (deterministic: the same input gives the same ids, also on replay); one → the
   events join it (an emitted story gets a new revision: late evidence amends); several → they merge, the
   smallest id survives and the others get a last revision marked ``merged_into``;
4. time is the bucket's end (ingest time): a story no event has joined for ``correlate.max_wait_ms`` is emitted
   (``final``); an emitted story leaves the state ``correlate.amend_horizon_ms`` after its last emission. The
   stories due in all the call's shards are fused in one pass and written in one call.

Every emission is an idempotent upsert of ``(story_id, revision)`` into the ``stories`` table, partitioned by
``(shard, emit bucket)``; the worker moves ``read_bucket`` only after :meth:`StoryStage.on_buckets` returns.
``replay_bucket`` is the first bucket of the oldest story of the shard still in the state; stories that left
before are stored as marks so that a replay from there skips their events (:meth:`StoryStage.prepare_replay`).
The same buckets in the same order give the same stories and revisions, however the shards were grouped.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import polars as pl
import xxhash

from engine.config import Config
from engine.stage import Batch
from engine.store import Store, StoryRecord, story_id

from .fuse import EVENT_SCHEMA, HEAD_SCHEMA, FusedStory, event_columns, fuse
from .link import link

_json = msgspec.json.Encoder()
KEY = pl.UInt64
STATE_SCHEMA: dict[str, Any] = {**EVENT_SCHEMA, "shard": pl.Int32}  # the state frame: events of every shard


@dataclass(slots=True)
class StoryMeta:
    key: int  # the story key of the state frame's rows (the 64-bit hash in the id)
    shard: int
    id: str
    first_bucket: int
    last_ingest_ms: int
    events: int = 0
    revision: int = 0  # the last emitted revision; 0: never emitted
    emitted_ms: int | None = None
    dirty: bool = True  # events joined since the last emission
    truncated: bool = False
    t_min: int = 2**62
    t_max: int = -(2**62)
    predecessor: str | None = None  # the truncated story this one continues
    last_bucket: int = -1  # the last bucket an event joined in


@dataclass
class ShardState:
    stories: dict[int, StoryMeta] = field(default_factory=dict)  # by story key
    ids: set[str] = field(default_factory=set)  # the shard's event ids in the frame: duplicates in O(new events)
    merged_now: dict[int, int] = field(default_factory=dict)  # merged this bucket: old key → survivor
    # flow → (its last truncated story, when it was cut in ms): a story of the flow that starts within max_wait
    # of the cut continues it (names it as predecessor)
    sealed_flows: dict[int, tuple[str, int]] = field(default_factory=dict)
    # When stories fall due, (ms, story key): emission (max_wait after the last event) or leaving the state
    # (amend horizon after the last emission). Every story has an entry at or before its due time (pushed when
    # it is created, emitted, or amended; not at each event joining an open story): an early entry is moved to
    # the due time when popped, so the top is a lower bound of the next due time.
    due: list[tuple[int, int]] = field(default_factory=list)
    changed: set[int] = field(default_factory=set)  # stories events joined in the call being processed
    open: int = 0  # stories with events not yet emitted final (dirty)
    # Replay (see StoryStage.prepare_replay): the stories that left the state before the crash, as (flow,
    # time range, bucket they left in) — their events are skipped, not rebuilt — and the cuts that set
    # predecessors, applied as the replay passes the bucket they happened in.
    ghosts: pl.DataFrame | None = None
    ghost_ids: dict[str, int] = field(default_factory=dict)  # flowless events of stories that left → bucket
    pending_cuts: list[tuple[int, int, str]] = field(default_factory=list)  # (bucket, flow, story id), ascending
    replay_through: int = -1  # buckets up to here were processed before the crash: their marks are stored


class Marks(msgspec.Struct, array_like=True, frozen=True):
    """What the stage stores (``Store.put_marks``) at a bucket in which stories left its state: enough for a
    replay that starts after them to skip their events instead of rebuilding them into partial stories."""

    flows: list[int]  # per (story, flow) that left: the flow hash …
    lo: list[int]  # … and the corrected event-time range of the story's events of that flow (µs)
    hi: list[int]
    ids: list[str]  # events without a flow in stories that left (each its own story)
    cuts: list[tuple[int, str]]  # (flow, truncated story id) cut at this bucket


_marks_encoder = msgspec.msgpack.Encoder()
_marks_decoder = msgspec.msgpack.Decoder(Marks)
MARKS_PER_PART = 2000  # entries per stored part (about 60 KB)


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
    replay_skipped: int = 0  # replayed events of stories that had left the state before the crash


class StoryStage:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.c = cfg.correlate
        self.window_us = self.c.match_window_ms * 1000
        self.shards: dict[int, ShardState] = {}
        # The events of open and recently emitted stories of every shard (STATE_SCHEMA): one frame, so a bucket of
        # many shards is linked, fused and evicted in one pass.
        self.frame = pl.DataFrame(schema=STATE_SCHEMA)
        self.pending_chunks = 0
        self.counters = StoryCounters()
        self.cid_cache: dict[int | None, str | None] = {}

    # -- the stage interface ------------------------------------------------------------------------------
    def replay_bucket(self, shard: int, read_bucket: int) -> int:
        """The first bucket of the oldest story in the state. Stories that already left the state may have
        events on both sides of it: their marks (written when they left) let the replay skip those events."""
        st = self.shards.get(shard)
        if st is None:
            return read_bucket + 1
        return min((m.first_bucket for m in st.stories.values()), default=read_bucket + 1)

    async def prepare_replay(self, shard: int, first: int, last: int) -> None:
        """Load the marks of the stories that left the state in ``[first, last]`` (and the cuts of the
        ``max_wait`` before ``first``, which still name predecessors). A story that left at bucket L had all its
        events, and no other story's, among the events of its flow within ``match_window`` of its time range
        arriving up to L (its events are a connected component, and any other event there would have linked to
        it while both were in the state): the replay drops exactly those."""
        st = self.shards.setdefault(shard, ShardState())
        st.replay_through = max(st.replay_through, last)
        bms = self.cfg.bucket_ms
        back = -(-self.c.max_wait_ms // bms) + 1
        flows: list[int] = []
        lo: list[int] = []
        hi: list[int] = []
        left: list[int] = []
        for bucket, body in await self.store.read_marks(self.cfg.consumer, shard, first - back, last):
            m = _marks_decoder.decode(body)
            st.pending_cuts.extend((bucket, flow, sid) for flow, sid in m.cuts)
            if bucket < first:
                continue
            flows += m.flows
            lo += m.lo
            hi += m.hi
            left += [bucket] * len(m.flows)
            st.ghost_ids.update(dict.fromkeys(m.ids, bucket))
        st.pending_cuts.sort(key=lambda c: c[0])
        if flows:
            w = self.window_us
            st.ghosts = pl.DataFrame(
                {
                    "flow": pl.Series(flows, dtype=pl.UInt64),
                    "lo": pl.Series(lo, dtype=pl.Int64) - w,
                    "hi": pl.Series(hi, dtype=pl.Int64) + w,
                    "left": pl.Series(left, dtype=pl.Int64),
                }
            )

    def reset(self, shards: Sequence[int]) -> None:
        """Drop the shards' stories, their rows in the state frame and their replay marks (see Stage.reset)."""
        gone = [s for s in shards if s in self.shards]
        for s in gone:
            del self.shards[s]
        if gone:
            self.frame = self.frame.filter(~pl.col("shard").is_in(gone))

    def metrics(self) -> dict[str, float]:
        return {f"stories_{k}": float(v) for k, v in vars(self.counters).items()}

    async def drain(self, shard: int, bucket: int) -> None:
        st = self.shards.get(shard)
        if st is None:
            return
        now = (bucket + 1) * self.cfg.bucket_ms
        due = [m for m in st.stories.values() if m.dirty]
        await self._emit(bucket, due, now)

    async def on_bucket(self, shard: int, bucket: int, batch: Batch, *, replay: bool) -> None:
        """One shard's bucket: :meth:`on_buckets` with one partition."""
        await self.on_buckets(bucket, {shard: batch}, replay=replay)

    async def on_buckets(self, bucket: int, batches: Mapping[int, Batch], *, replay: bool) -> None:
        """Bucket ``bucket`` of several shards at once (one polars pass over all their partitions; shards never
        link to each other, so this is the same as one call per shard). Each shard's buckets arrive in order but
        not necessarily one by one (empty buckets may be skipped): what falls due in the skipped buckets is
        settled first, at the bucket it fell due in, so the output does not depend on which empty buckets the
        worker reported, nor on which shards it grouped (live and replay agree)."""
        sts = {s: self.shards.setdefault(s, ShardState()) for s in batches}
        if not replay:
            for st in sts.values():
                if st.ghosts is not None or st.ghost_ids or st.pending_cuts:
                    st.ghosts, st.ghost_ids = None, {}  # the replay is over
                    self._apply_cuts(st, bucket)
        await self._catch_up(sts, bucket - 1)
        now = (bucket + 1) * self.cfg.bucket_ms
        full = {s: b for s, b in batches.items() if len(b)}
        if full:
            self._absorb(bucket, full, now)
        await self._timeouts(bucket, sts, now)

    def _due_bucket(self, ms: int) -> int:
        """The first bucket whose end is at or after ``ms``."""
        return -(-ms // self.cfg.bucket_ms) - 1

    @staticmethod
    def _next_due_ms(st: ShardState) -> int:
        return st.due[0][0] if st.due else 2**62

    def _due_ms(self, m: StoryMeta) -> int | None:
        """When the story falls due now: emission if it has unemitted events, else leaving the state."""
        if m.dirty:
            return m.last_ingest_ms + self.c.max_wait_ms
        return None if m.emitted_ms is None else m.emitted_ms + self.c.amend_horizon_ms

    def _pop_due(self, st: ShardState, now: int) -> list[StoryMeta]:
        """The stories whose current due time is at or before ``now``, in due order. Every story has an entry at
        or before its due time (entries are lower bounds): an entry found early is pushed again at the story's
        due time (popped again in this call if that is also at or before ``now``, so the order holds); entries of
        stories gone, or superseded by an earlier one, are dropped."""
        out: list[StoryMeta] = []
        seen: set[int] = set()
        heap = st.due
        while heap and heap[0][0] <= now:
            at, key = heapq.heappop(heap)
            m = st.stories.get(key)
            if m is None or key in seen:
                continue
            due = self._due_ms(m)
            if due is None or due < at:
                continue
            if due > at:
                heapq.heappush(heap, (due, key))
                continue
            seen.add(key)
            out.append(m)
        return out

    async def _catch_up(self, sts: Mapping[int, ShardState], until: int) -> None:
        """Emissions and evictions that fell due in buckets up to ``until``, each at its own bucket, in order;
        the shards due at the same bucket together."""
        last = -(2**62)
        while True:
            due = {s: self._due_bucket(self._next_due_ms(st)) for s, st in sts.items()}
            b = min(due.values(), default=until + 1)
            if b > until or b <= last:
                return
            last = b
            await self._timeouts(b, {s: sts[s] for s, d in due.items() if d == b}, (b + 1) * self.cfg.bucket_ms)

    # -- linking ------------------------------------------------------------------------------------------
    def _absorb(self, bucket: int, batches: Mapping[int, Batch], now: int) -> None:
        shards = list(batches)
        sizes = [len(batches[s]) for s in shards]
        cols = event_columns([r.payload for s in shards for r in batches[s].records])
        time_us = pl.Series("time_us", cols.pop("time_us"), pl.Int64)
        offsets = self.c.sensor_offsets_ms
        shard_col = pl.Series("shard", shards, pl.Int32).gather(
            pl.Series(range(len(shards)), dtype=pl.UInt32).repeat_by(pl.Series(sizes, dtype=pl.UInt32)).explode()
        )
        new = pl.DataFrame(cols, schema={k: v for k, v in EVENT_SCHEMA.items() if k in cols}).with_columns(
            (
                time_us - pl.col("sensor").replace_strict(offsets, default=0, return_dtype=pl.Int64) * 1000
                if offsets
                else time_us
            ).alias("t"),
            pl.lit(None, KEY).alias("story"),
            pl.lit(now, pl.Int64).alias("ingest"),
            shard_col,
        )
        total = len(new)
        new = new.select(list(STATE_SCHEMA)).unique("id", keep="first", maintain_order=True)
        sts = {s: self.shards[s] for s in shards}
        replaying = [st for st in sts.values() if st.ghosts is not None or st.ghost_ids or st.pending_cuts]
        skipped = 0
        if replaying:
            for st in replaying:
                if st.pending_cuts:
                    self._apply_cuts(st, bucket)
            before = len(new)
            new = self._skip_ghosts(sts, bucket, new)
            skipped = before - len(new)
            self.counters.replay_skipped += skipped
        new_ids: list[str] = new["id"].to_list()
        new_shards: list[int] = new["shard"].to_list()
        if any(st.ids for st in sts.values()):
            ids_of = {s: st.ids for s, st in sts.items()}
            fresh = [i not in ids_of[s] for i, s in zip(new_ids, new_shards, strict=True)]
            if not all(fresh):
                new = new.filter(pl.Series(fresh))
                new_ids = [i for i, f in zip(new_ids, fresh, strict=True) if f]
                new_shards = [s for s, f in zip(new_shards, fresh, strict=True) if f]
        self.counters.duplicates += total - len(new) - skipped
        if new.is_empty():
            return
        self.counters.events += len(new)
        frame = self.frame
        ctx = frame.join(new.select("flow").drop_nulls().unique(), on="flow", how="semi") if frame.height else frame
        union = pl.concat(
            [ctx.with_columns(pl.lit(False).alias("is_new")), new.with_columns(pl.lit(True).alias("is_new"))]
        )
        union = union.with_columns(link(union, [("flow", self.window_us)]).alias("comp"))
        story = pl.col("story")
        groups = (
            union.group_by("comp")
            .agg(
                story.min().alias("known_min"),
                (story.n_unique() - (story.null_count() > 0).cast(pl.UInt32)).alias("known_n"),
                pl.col("id").filter(pl.col("is_new")).min().alias("first_new"),
                pl.col("is_new").sum().alias("n_new"),
                pl.col("t").min().alias("t_min"),
                pl.col("t").max().alias("t_max"),
                pl.col("flow").first().alias("flow"),
                pl.col("shard").first().alias("shard"),
            )
            .filter(pl.col("n_new") > 0)
            .sort("first_new")
        )
        comps: list[int] = []
        sids: list[int] = []
        # Components with no known story: new stories (most of them), created from columns.
        fresh_groups = groups.filter(pl.col("known_n") == 0)
        wait = self.c.max_wait_ms
        for comp, first_new, n_new, t_min, t_max, flow, shard in zip(
            *(fresh_groups[c].to_list() for c in ("comp", "first_new", "n_new", "t_min", "t_max", "flow", "shard")),
            strict=True,
        ):
            sid = xxhash.xxh3_64_intdigest(first_new.encode())
            st = sts[shard]
            pred = None
            if flow is not None and st.sealed_flows:
                cut = st.sealed_flows.get(flow)
                if cut is not None and now - cut[1] <= wait:
                    pred = cut[0]
            st.open += 1
            st.changed.add(sid)
            heapq.heappush(st.due, (now + wait, sid))
            st.stories[sid] = StoryMeta(
                sid,
                shard,
                story_id(shard, sid),
                bucket,
                now,
                events=n_new,
                t_min=t_min,
                t_max=t_max,
                predecessor=pred,
                last_bucket=bucket,
            )
            comps.append(comp)
            sids.append(sid)
        self.counters.stories += fresh_groups.height
        # Components that touch known stories: the events join the smallest; several stories merge into it.
        known_groups = groups.filter(pl.col("known_n") > 0)
        merging = known_groups.filter(pl.col("known_n") > 1)["comp"]
        known_lists: dict[int, list[int]] = {}
        if merging.len():
            lists = (
                union.filter(pl.col("comp").is_in(merging.implode()) & story.is_not_null())
                .group_by("comp")
                .agg(story.unique().sort())
            )
            known_lists = dict(zip(lists["comp"].to_list(), lists["story"].to_list(), strict=True))
        renames: dict[int, int] = {}
        rename_shard: dict[int, int] = {}
        for comp, sid, n_known, n_new, t_min, t_max, shard in zip(
            *(known_groups[c].to_list() for c in ("comp", "known_min", "known_n", "n_new", "t_min", "t_max", "shard")),
            strict=True,
        ):
            st = sts[shard]
            if n_known > 1:
                for other in known_lists[comp][1:]:
                    renames[other] = sid
                    rename_shard[other] = shard
                    st.merged_now[other] = sid  # written as merged_into stubs by _timeouts
            meta = st.stories[sid]
            meta.last_ingest_ms = now
            meta.last_bucket = bucket
            meta.events += int(n_new)
            meta.t_min = min(meta.t_min, t_min)
            meta.t_max = max(meta.t_max, t_max)
            if not meta.dirty:
                if meta.revision:
                    self.counters.amended += 1
                meta.dirty = True
                st.open += 1
                # due earlier than its entry (the end of the horizon): a new entry. While dirty, its due time only
                # moves later, and the entry it has (a lower bound) is moved when popped (_pop_due).
                heapq.heappush(st.due, (now + self.c.max_wait_ms, sid))
            st.changed.add(sid)
            comps.append(comp)
            sids.append(sid)
        assigned = (
            union.filter(pl.col("is_new"))
            .with_columns(pl.col("comp").replace_strict(comps, sids, return_dtype=KEY).alias("story"))
            .select(list(STATE_SCHEMA))
        )
        frame = pl.concat([frame, assigned], how="vertical", rechunk=False)
        if renames:
            frame = frame.with_columns(pl.col("story").replace(renames))
            for old, sid in renames.items():
                st = sts[rename_shard[old]]
                om, sm = st.stories[old], st.stories[sid]
                sm.events += om.events
                sm.first_bucket = min(sm.first_bucket, om.first_bucket)
                sm.last_bucket = max(sm.last_bucket, om.last_bucket)
                sm.t_min, sm.t_max = min(sm.t_min, om.t_min), max(sm.t_max, om.t_max)
                self.counters.merged += 1
        self.pending_chunks += 1
        if self.pending_chunks > 64:
            frame = frame.rechunk()
            self.pending_chunks = 0
        self.frame = frame
        if len(sts) == 1:
            next(iter(sts.values())).ids.update(new_ids)
        else:
            per = assigned.group_by("shard").agg(pl.col("id"))
            for s, ids in zip(per["shard"].to_list(), per["id"].to_list(), strict=True):
                sts[s].ids.update(ids)

    def _skip_ghosts(self, sts: Mapping[int, ShardState], bucket: int, new: pl.DataFrame) -> pl.DataFrame:
        """Replay: drop the events of stories that had left the state (see :meth:`prepare_replay`)."""
        hit: list[str] = []
        t = pl.col("t")
        for shard, st in sts.items():
            if st.ghosts is not None:
                ghosts = st.ghosts.filter(pl.col("left") >= bucket)
                st.ghosts = ghosts if ghosts.height else None
                if ghosts.height:
                    hit += (
                        new.filter(pl.col("shard") == shard)
                        .select("id", "flow", "t")
                        .join(ghosts, on="flow")
                        .filter((t >= pl.col("lo")) & (t <= pl.col("hi")))["id"]
                        .to_list()
                    )
            if st.ghost_ids:
                gid = st.ghost_ids
                flowless = new.filter(pl.col("flow").is_null() & (pl.col("shard") == shard))["id"].to_list()
                hit += [i for i in flowless if gid.get(i, -1) >= bucket]
        return new.filter(~pl.col("id").is_in(hit)) if hit else new

    def _apply_cuts(self, st: ShardState, bucket: int) -> None:
        """Replay: the cuts made before ``bucket`` name the predecessors of stories created from it on."""
        bms = self.cfg.bucket_ms
        while st.pending_cuts and st.pending_cuts[0][0] < bucket:
            b, flow, sid = st.pending_cuts.pop(0)
            st.sealed_flows[flow] = (sid, (b + 1) * bms)

    # -- time ---------------------------------------------------------------------------------------------
    async def _timeouts(self, bucket: int, sts: Mapping[int, ShardState], now: int) -> None:
        """Emissions, truncations and evictions due at ``bucket`` in these shards: one fusion pass and one
        story write for all of them."""
        c = self.c
        records: list[StoryRecord] = []
        due_all: list[StoryMeta] = []
        provisional_all: list[StoryMeta] = []
        active: dict[int, tuple[ShardState, list[StoryMeta], list[int]]] = {}
        span_us = c.max_story_ms * 1000
        for shard, st in sts.items():
            if not st.changed and not st.merged_now and now < self._next_due_ms(st):
                continue  # nothing changed and nothing falls due yet
            renames, st.merged_now = st.merged_now, {}
            for old, sid in renames.items():
                om = st.stories.pop(old)
                if om.dirty:
                    st.open -= 1
                if om.revision:  # it was visible downstream: tell consumers where it went
                    records.append(self._stub(shard, bucket, om, story_id(shard, sid), now))
            popped = self._pop_due(st, now)
            due = [m for m in popped if m.dirty]
            gone = [m.key for m in popped if not m.dirty]  # emitted, quiet, past the amend horizon
            changed = sorted(st.changed)
            st.changed.clear()
            big = [
                m
                for m in (st.stories[k] for k in changed if k in st.stories)
                if m.dirty and (m.events >= c.max_story_events or m.t_max - m.t_min >= span_us)
            ]
            for m in big:
                m.truncated = True
            due_keys = {m.key for m in due}
            due += [m for m in big if m.key not in due_keys]
            due_keys.update(m.key for m in big)
            if st.open - len(due) > c.max_open_stories:
                extra = sorted(
                    (m for m in st.stories.values() if m.dirty and m.key not in due_keys),
                    key=lambda m: m.last_ingest_ms,
                )
                forced = extra[: st.open - len(due) - c.max_open_stories]
                self.counters.forced += len(forced)
                due += forced
            if c.emit == "updates":
                due_keys.update(m.key for m in due)
                provisional_all += [
                    m for m in (st.stories[k] for k in changed if k in st.stories) if m.dirty and m.key not in due_keys
                ]
            due_all += due
            active[shard] = (st, big, gone)
        if not active:
            return
        if records or due_all or provisional_all:
            await self._emit(bucket, due_all, now, records, provisional_all)
        # Leave the state: truncated stories now; emitted, quiet ones past the amend horizon.
        leaving: dict[int, list[int]] = {}
        for shard, (st, big, gone) in active.items():
            gone += [m.key for m in self._pop_due(st, now)]  # emitted now with a zero horizon
            if big or gone:
                leaving[shard] = [m.key for m in big] + gone
                self.counters.truncated += len(big)
                self.counters.evicted += len(gone)
        if leaving:
            # The leaving stories' rows, selected once for the cuts, the marks and the id sets.
            mask = pl.col("story").is_in([k for ks in leaving.values() for k in ks])
            rows = self.frame.filter(mask)
            big_all = [m for _, big, _ in active.values() for m in big]
            cuts = self._seal(rows, big_all, now) if big_all else {}
            marks = self._marks(rows, leaving, cuts)
            for shard, ids in rows.group_by("shard").agg(pl.col("id")).iter_rows():
                self.shards[shard].ids.difference_update(ids)
            self.frame = self.frame.filter(~mask)
            writes = []
            for shard, keys in leaving.items():
                st = active[shard][0]
                for key in keys:
                    del st.stories[key]
                if bucket > st.replay_through:  # a replayed bucket's marks are stored already (and complete)
                    writes.append(self.store.put_marks(self.cfg.consumer, shard, bucket, marks[shard]))
            for w in writes:
                await w
        for st, _, _ in active.values():
            if len(st.sealed_flows) > 64:
                st.sealed_flows = {f: cut for f, cut in st.sealed_flows.items() if now - cut[1] <= c.max_wait_ms}

    @staticmethod
    def _marks(
        rows: pl.DataFrame, keys: Mapping[int, list[int]], cuts: Mapping[int, list[tuple[int, str]]]
    ) -> dict[int, list[bytes]]:
        """The stored form of the stories leaving the state (:class:`Marks`) per shard, in parts of
        MARKS_PER_PART. ``rows``: the leaving stories' rows."""
        ranges = (
            rows.filter(pl.col("flow").is_not_null())
            .group_by("shard", "story", "flow")
            .agg(pl.col("t").min().alias("lo"), pl.col("t").max().alias("hi"))
            .sort("shard", "story", "flow")
            .partition_by("shard", as_dict=True)
        )
        flowless = rows.filter(pl.col("flow").is_null()).group_by("shard").agg(pl.col("id").sort())
        ids_of = dict(zip(flowless["shard"].to_list(), flowless["id"].to_list(), strict=True))
        out: dict[int, list[bytes]] = {}
        k = MARKS_PER_PART
        for shard in keys:
            r = ranges.get((shard,))
            flows, lo, hi = (r[c].to_list() for c in ("flow", "lo", "hi")) if r is not None else ([], [], [])
            ids: list[str] = ids_of.get(shard, [])
            cut = list(cuts.get(shard, []))
            n = max(len(flows), len(ids), len(cut))
            out[shard] = [
                _marks_encoder.encode(
                    Marks(flows[i : i + k], lo[i : i + k], hi[i : i + k], ids[i : i + k], cut[i : i + k])
                )
                for i in range(0, n, k)
            ]
        return out

    def _seal(self, leaving: pl.DataFrame, stories: list[StoryMeta], now: int) -> dict[int, list[tuple[int, str]]]:
        """Truncated stories are final: their rows leave the state (memory stays bounded under a flood of one
        flow), and a story of their flow that starts within ``max_wait`` continues one (names it as
        predecessor). ``leaving``: the rows of every story leaving now. Returns the cuts per shard: (flow,
        truncated story id)."""
        by_key = {m.key: m for m in stories}
        rows = (
            leaving.filter(pl.col("story").is_in(list(by_key)) & pl.col("flow").is_not_null())
            .group_by("flow")
            .agg(pl.col("story").max())
            .sort("flow")
        )
        cuts: dict[int, list[tuple[int, str]]] = {}
        for flow, key in rows.iter_rows():
            m = by_key[key]
            cuts.setdefault(m.shard, []).append((flow, m.id))
            self.shards[m.shard].sealed_flows[flow] = (m.id, now)
        return cuts

    async def _emit(
        self,
        bucket: int,
        due: list[StoryMeta],
        now: int,
        records: list[StoryRecord] | None = None,
        provisional: list[StoryMeta] | None = None,
    ) -> None:
        out = list(records or [])
        temp = {m.key for m in provisional or []}
        due = [*due, *(provisional or [])]
        if due:
            heads = []
            shard_of: dict[int, int] = {}
            for meta in due:
                meta.revision += 1
                final = meta.key not in temp
                if final:  # a provisional revision neither closes the story nor starts its amend horizon
                    meta.emitted_ms = now
                    if meta.dirty:
                        meta.dirty = False
                        st = self.shards[meta.shard]
                        st.open -= 1
                        heapq.heappush(st.due, (now + self.c.amend_horizon_ms, meta.key))
                heads.append((meta.key, meta.id, meta.revision, final, meta.truncated, meta.predecessor))
                shard_of[meta.key] = meta.shard
                self.counters.emitted += 1
            head_frame = pl.DataFrame(heads, schema=HEAD_SCHEMA, orient="row")
            rows = self.frame.filter(pl.col("story").is_in(list(shard_of))).drop("shard")
            fused = fuse(
                rows, head_frame, rules=self.c.merge, seed=self.cfg.ingest.community_id_seed, cid_cache=self.cid_cache
            )
            for key, sid, revision, final, body in fused.select(
                "story", "story_id", "revision", "final", "body"
            ).iter_rows():
                out.append(StoryRecord(shard_of[key], bucket, sid, revision, final, None, now, body.encode()))
        if out:
            await self.store.put_stories(out)

    def _stub(self, shard: int, bucket: int, meta: StoryMeta, into: str, now: int) -> StoryRecord:
        body = FusedStory(meta.id, meta.revision + 1, True, None, None, 0, 0, 0, [], [], [], {}, {}, merged_into=into)
        return StoryRecord(shard, bucket, meta.id, meta.revision + 1, True, into, now, _json.encode(body))
