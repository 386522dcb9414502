"""The story builder: a pure state machine that fuses linked events into stories (see docs/correlation.md).

It does no I/O. The worker hands it buckets (:meth:`StoryMachine.on_buckets`) and persists the
:class:`~engine.core.stage.Emission` it returns — story revisions, marks, replay points — in its checkpoint. Its
output is a function of the sequence of buckets only: time inside it is ingest time (the end of the bucket being
processed), never the wall clock, and never the boundaries of calls, checkpoints or processes. What a replay
cannot derive from the buckets alone — a drain (``run --drain`` finalizes stories at a bucket of its choosing)
and which stories the open-story limit forced out while stories that have since left the state still counted —
is recorded in the marks of that bucket, and a replay applies the record instead of deciding again.

State is one polars frame of the events of open and recently emitted stories of every shard the machine holds
(id, corrected time, flow, story, ingest time, the fields fusion needs, shard) plus a small record per story,
kept per shard. A bucket of many shards is processed as a whole, in named steps:

1. ``_decode``: the partitions' events (one msgspec call) become a frame;
2. ``_dedupe``: ids already in their shard's state are dropped (a re-delivered event counts once); during a
   replay, the events of stories that had left the state are dropped too (:meth:`StoryMachine.prepare_replay`);
3. ``_link``: the state's events of the same flows are taken (by position, from an index flow → rows), and
   :func:`engine.correlate.link.link` finds the components of the union — no per-event Python loop; a flow lives
   in one shard, so shards never link;
4. ``_assign``: per component (a loop over stories, not events): no known story → a new story whose id derives
   from its shard, the bucket it starts in and its smallest event id; one → the events join it (an emitted story
   gets a new revision: late evidence amends); several → ``_merge``: they merge, the smallest key survives and
   the others get a last revision marked ``merged_into``;
5. ``_timeouts``: a story no event has joined for ``correlate.max_wait_ms`` is emitted (``final``); an emitted
   story leaves the state ``correlate.amend_horizon_ms`` after its last emission. The stories due in all the
   call's shards are fused in one pass.

``replay_bucket`` is the first bucket of the oldest story of the shard still in the state; stories that left
before are stored as marks so that a replay from there skips their events.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import polars as pl
import xxhash

from engine.core.config import Config, CorrelateConfig
from engine.core.errors import StageOrderError
from engine.core.gcpause import collector_paused
from engine.core.records import EvidenceRecord, StoryRecord, story_id
from engine.core.stage import Batch, Buckets, Emission, MarkRecord

from .body import StoryBody
from .dns import DnsAnswer, DnsView, answers_of, is_dns_source
from .fuse import EVENT_SCHEMA, event_columns, fuse_bodies
from .link import link
from .offsets import LOOKBACK_EPOCHS, EvidenceRow, OffsetTable, Pair, Sketch, evidence, pair_key
from .rows import gather, member, remap, u64

_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()
KEY = pl.UInt64
# The state frame: events of every shard; ``seq``: the number of the append that brought the row in (ascending in
# frame order by construction — ingest times are not: a shard behind the others appends older buckets later).
# ``raw``: the event time as its sensor reported it (µs; ``t`` less the offset applied), the evidence of learned
# offsets.
STATE_SCHEMA: dict[str, Any] = {**EVENT_SCHEMA, "shard": pl.Int32, "seq": pl.Int64, "raw": pl.Int64}
SESSION_WINDOW_US = 2**60
"""The (sensor, session) link key's window: any time apart (µs; added to event times, so it stays inside int64)."""
CPU_STEPS = ("decode", "link", "state", "fuse", "encode")
"""The story builder's steps in the cost ledger (:attr:`StoryMachine.cpu`, reported as ``cpu_us_<step>``)."""
_KEY_MASK = (1 << 64) - 1  # a story key is 64 bits
_SHARD_BITS = (1 << 16) - 1  # a story key's low bits: its shard


def story_key(first_id: str, bucket: int, shard: int) -> int:
    """A new story's key: the 64-bit hash of its smallest new event id followed by the bucket it starts in (8
    bytes, so no two (id, bucket) pairs give the same input), its low 16 bits replaced by the shard (shards are
    at most 65,536), so stories of different shards never share a key in the worker's one frame.

    Not the id hashed with the bucket as xxh3's seed: for inputs up to 16 bytes xxh3 folds the seed into the
    input with an xor before mixing, so short ids in nearby buckets collided ("f10" at bucket 110 and "f12" at
    112 had one key, and one of the stories was lost)."""
    digest = xxhash.xxh3_64_intdigest(first_id.encode() + bucket.to_bytes(8, "little", signed=True))
    return (digest & ~_SHARD_BITS & _KEY_MASK) | shard


COMPACT_ROWS = 50_000
"""Dead rows (of stories that left the state) the frame may hold before it is compacted, at the least."""
CID_CACHE_MAX = 100_000
"""Community IDs of flows kept between fusion passes (a re-emitted story's flow is not hashed again); the cache
starts over past this many entries, so a long run's memory does not grow with every flow it saw (~150 B each)."""
GATHER_MS = 10_000
"""The events of this much ingest time (whole buckets, never across an epoch's end) are gathered together for the
evidence of learned offsets and DNS answers (see :meth:`StoryMachine._gather`). Nothing waits for them before the
epoch's row is emitted, when they are gathered anyway; longer periods cost less (each gathering is a dozen polars
operations whatever its size) while the frame still holds their rows (``max_wait_ms`` + the amend horizon)."""
DRAIN_PART = 1 << 20
"""The marks part that records a drain at its bucket (the other parts of a bucket count up from 0)."""


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
    first_seq: int = 0  # the state frame's appends holding the story's rows: from this one …
    last_seq: int = 0  # … to this one
    ends: tuple[str, str] | None = None  # the flow's two addresses, ordered (None: a story without a flow)
    dns: tuple[str, str] | None = None  # the DNS name it was last emitted with and the DNS story that gave it
    drained: bool = False  # a drain emitted it final (DNS answers that come later do not amend it)


@dataclass
class ShardState:
    stories: dict[int, StoryMeta] = field(default_factory=dict)  # by story key
    ids: set[str] = field(default_factory=set)  # the shard's event ids in the frame: duplicates in O(new events)
    merged_now: dict[int, int] = field(default_factory=dict)  # merged this bucket: old key → survivor
    # flow → (its last truncated story, when it was cut in ms): a story of the flow that starts within max_wait
    # of the cut continues it (names it as predecessor)
    sealed_flows: dict[int, tuple[str, int]] = field(default_factory=dict)
    # When stories fall due, by bucket (a timer wheel: bucket → story keys, and a heap of those buckets): emission
    # (max_wait after the last event) or leaving the state (amend horizon after the last emission), in the first
    # bucket whose end reaches that time. Every story has an entry at or before its due bucket (added when it is
    # created, emitted, or amended; not at each event joining an open story): an early entry is moved to the due
    # bucket when popped, so the heap's top is a lower bound of the next bucket at which something falls due. A
    # slot is in ``due`` exactly while its bucket is in ``due_buckets``.
    due: dict[int, list[int]] = field(default_factory=dict)
    due_buckets: list[int] = field(default_factory=list)
    changed: set[int] = field(default_factory=set)  # stories events joined in the call being processed
    open: int = 0  # stories with events not yet emitted final (dirty)
    through: int = -(2**62)  # the last bucket handed in (each shard's buckets ascend: see on_buckets)
    # Replay (see StoryMachine.prepare_replay): the stories that left the state before the crash, as (flow,
    # time range, bucket they left in) — their events are skipped, not rebuilt — and the cuts that set
    # predecessors, applied as the replay passes the bucket they happened in.
    ghosts: pl.DataFrame | None = None
    ghost_ids: dict[str, int] = field(default_factory=dict)  # events named by id (see Marks.ids) → bucket left
    pending_cuts: list[tuple[int, int, str]] = field(default_factory=list)  # (bucket, flow, story id), ascending
    replay_through: int = -1  # buckets up to here were processed before the crash: their marks are stored
    forced_at: dict[int, list[int]] = field(default_factory=dict)  # replay: bucket → story keys forced out then
    # The replay point without a scan of the stories: how many stories start in each bucket, and a heap of those
    # buckets (entries whose count fell to 0 are dropped when they reach the top).
    firsts: dict[int, int] = field(default_factory=dict)
    firsts_heap: list[int] = field(default_factory=list)
    drains: set[int] = field(default_factory=set)  # replay: the buckets at which a drain finalized the shard
    # Learned offsets (StoryMachine._recorrect): the epoch whose table the shard's rows were last corrected to (at
    # an epoch's first bucket) or absorbed in; the epoch of the last bucket that brought the shard events; and the
    # flows whose rows a re-correction moved (→ that bucket): a story of such a flow leaves named by its events,
    # its time range no longer tells a replay which events were its (pruned once every story in the state at
    # that bucket has left).
    epoch: int | None = None
    data_epoch: int | None = None
    moved: dict[int, int] = field(default_factory=dict)
    # DNS names: the flow's two addresses (StoryMeta.ends) → the keys of its stories in the state, so an epoch
    # table's answers find the stories they may amend without a scan
    by_ends: dict[tuple[str, str], set[int]] = field(default_factory=dict)

    def drop(self, key: int) -> StoryMeta:
        """The story leaves the state (evicted, or merged into another)."""
        meta = self.stories.pop(key)
        self.track(meta.first_bucket, -1)
        if meta.ends is not None:
            keys = self.by_ends[meta.ends]
            keys.discard(key)
            if not keys:
                del self.by_ends[meta.ends]
        return meta

    def track(self, first_bucket: int, n: int) -> None:
        """A story starting at ``first_bucket`` joins (``n = 1``) or leaves (``n = -1``) the state."""
        c = self.firsts.get(first_bucket, 0) + n
        if c:
            if first_bucket not in self.firsts:
                heapq.heappush(self.firsts_heap, first_bucket)
            self.firsts[first_bucket] = c
        else:
            del self.firsts[first_bucket]

    def oldest_first_bucket(self) -> int | None:
        heap = self.firsts_heap
        while heap and heap[0] not in self.firsts:
            heapq.heappop(heap)
        return heap[0] if heap else None

    @property
    def replaying(self) -> bool:
        return self.ghosts is not None or bool(self.ghost_ids) or bool(self.pending_cuts)


class Marks(msgspec.Struct, array_like=True, frozen=True):
    """What the machine stores (as :class:`~engine.core.stage.MarkRecord` rows) at a bucket where a replay could not
    decide the same from the events alone: stories that left its state (so a replay that starts after them skips
    their events instead of rebuilding them into partial stories), stories the open-story limit forced out, and
    a drain. Array-like: fields are only ever added at the end, with defaults."""

    flows: list[int]  # per (story, flow) that left: the flow hash …
    lo: list[int]  # … and the corrected event-time range of the story's events of that flow (µs)
    hi: list[int]
    ids: list[str]  # events named one by one: without a flow (each its own story), or of a story with spans
    cuts: list[tuple[int, str]]  # (flow, truncated story id) cut at this bucket
    forced: list[int] = msgspec.field(default_factory=list)  # story keys the open-story limit forced out
    drained: bool = False  # a drain finalized every open story of the shard after this bucket


_marks_encoder = msgspec.msgpack.Encoder()
_marks_decoder = msgspec.msgpack.Decoder(Marks)
MARKS_PER_PART = 2000  # entries per stored part (about 60 KB)
DRAIN_MARK = _marks_encoder.encode(Marks([], [], [], [], [], drained=True))


MARKS_ROWS_PATH_MAX = 20_000
"""Below this many rows of leaving stories :meth:`StoryMachine._marks` groups them in Python (a bucket's
evictions, ~1,300 rows in ``bench.story_cpu``: about 0.6 µs per row against a dozen polars operations at
~0.2 ms each on the bench machine); above it in polars."""
_Left = dict[int, tuple[list[int], list[int], list[int], list[str]]]
"""Per shard, what leaves: per (story, flow) without spans its flow and time range (sorted by story key, flow),
and the ids of the events named one by one (sorted)."""


def _leaving_frame(rows: pl.DataFrame, moved: Mapping[int, set[int]] | None) -> _Left:
    named = pl.col("end_time_us").is_not_null()
    if moved:
        pairs = [(s, f) for s, flows in moved.items() for f in flows]
        hit = pl.DataFrame(
            {
                "shard": pl.Series([p[0] for p in pairs], dtype=pl.Int32),
                "flow": pl.Series([p[1] for p in pairs], dtype=pl.UInt64),
                "_moved": pl.Series([True] * len(pairs), dtype=pl.Boolean),
            }
        )
        rows = rows.join(hit, on=["shard", "flow"], how="left")
        named = named | pl.col("_moved").fill_null(False)
    spanned = rows.group_by("story").agg(named.any().alias("spans"))
    rows = rows.join(spanned, on="story", how="left")
    ranges = (
        rows.filter(pl.col("flow").is_not_null() & ~pl.col("spans"))
        .group_by("shard", "story", "flow")
        .agg(pl.col("t").min().alias("lo"), pl.col("t").max().alias("hi"))
        .sort("shard", "story", "flow")
        .partition_by("shard", as_dict=True)
    )
    flowless = rows.filter(pl.col("flow").is_null() | pl.col("spans")).group_by("shard").agg(pl.col("id").sort())
    ids_of = dict(zip(flowless["shard"].to_list(), flowless["id"].to_list(), strict=True))
    out: _Left = {}
    for shard in {*(s for (s,) in ranges), *ids_of}:
        r = ranges.get((shard,))
        flows, lo, hi = (r[c].to_list() for c in ("flow", "lo", "hi")) if r is not None else ([], [], [])
        out[shard] = (flows, lo, hi, ids_of.get(shard, []))
    return out


def _leaving_rows(rows: pl.DataFrame, moved: Mapping[int, set[int]] | None) -> _Left:
    cols = [rows.get_column(c).to_list() for c in ("shard", "story", "flow", "t", "id", "end_time_us")]
    spanned: set[int] = set()
    for shard, story, flow, _, _, end in zip(*cols, strict=True):
        if end is not None or (moved and flow is not None and flow in moved.get(shard, ())):
            spanned.add(story)
    ranges: dict[tuple[int, int, int], list[int]] = {}
    ids: dict[int, list[str]] = {}
    for shard, story, flow, t, id_, _ in zip(*cols, strict=True):
        if flow is None or story in spanned:
            ids.setdefault(shard, []).append(id_)
            continue
        r = ranges.get((shard, story, flow))
        if r is None:
            ranges[(shard, story, flow)] = [t, t]
        elif t < r[0]:
            r[0] = t
        elif t > r[1]:
            r[1] = t
    out: _Left = {}
    for (shard, _, flow), (lo, hi) in sorted(ranges.items()):
        got = out.get(shard)
        if got is None:
            got = out[shard] = ([], [], [], [])
        got[0].append(flow)
        got[1].append(lo)
        got[2].append(hi)
    for shard, named in ids.items():
        got = out.get(shard)
        if got is None:
            got = out[shard] = ([], [], [], [])
        got[3].extend(sorted(named))
    return out


def _no_clock() -> float:
    return 0.0


@dataclass
class _Pending:
    """Revisions emitted in the call being processed, fused together at its end: per revision its head (the
    sequence number standing for the story), where its record goes (shard, bucket, ingest time, index in the
    emission) and the snapshots of the stories' rows."""

    heads: list[tuple[int, str, int, bool, bool, str | None, int]] = field(default_factory=list)
    slots: list[tuple[int, int, int, int]] = field(default_factory=list)
    rows: list[pl.DataFrame] = field(default_factory=list)
    dns: list[tuple[str, str] | None] = field(default_factory=list)  # per head: (DNS name, DNS story id)


_PLACEHOLDER = StoryRecord(-1, -1, "", 0, False, None, 0, b"")  # replaced by _fuse_pending before the call returns


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
    drained: int = 0  # revisions emitted by drains
    recorrected: int = 0  # state rows moved because their sensor's learned offset changed (StoryMachine._recorrect)
    dns_answers: int = 0  # DNS answers taken from the shards' events (sent to the other workers in the epoch rows)
    dns_named: int = 0  # revisions emitted with a DNS name
    dns_amended: int = 0  # emitted stories given a new revision because a DNS answer came later
    replay_skipped: int = 0  # replayed events of stories that had left the state before the crash


class StoryMachine:
    """The story builder (see the module docstring). ``settings``: the ``correlate`` section; ``bucket_ms``,
    ``community_id_seed`` and the ``tenant`` name (written in every story body) are the tenant's."""

    def __init__(
        self,
        settings: CorrelateConfig,
        *,
        bucket_ms: int,
        community_id_seed: int = 0,
        tenant: str = "",
        cpu_clock: Callable[[], float] | None = None,
    ) -> None:
        self.c = settings
        self.tenant = tenant  # named in every story body
        self.bucket_ms = bucket_ms
        self.seed = community_id_seed
        self.window_us = settings.match_window_ms * 1000
        self.shards: dict[int, ShardState] = {}
        # The events of open and recently emitted stories of every shard (STATE_SCHEMA): one frame, so a bucket of
        # many shards is linked, fused and evicted in one pass.
        self.frame = pl.DataFrame(schema=STATE_SCHEMA)
        # Stories that left the state keep their rows in the frame until a compaction (rebuilding the frame at
        # every bucket would copy all of it each time): every reader of the frame selects rows by live story keys
        # (the link step drops the dead ones from its context); the frame is compacted once the dead rows are as
        # many as the live ones (and at least COMPACT_ROWS), so it stays within twice the live state.
        self.dead: set[int] = set()
        self.dead_rows = 0
        # Flow → the frame's rows of that flow (positions, ascending; dead rows too, until a compaction): the link
        # step takes the state's rows of a bucket's flows by position instead of a join over the whole frame,
        # whose cost grows with the state. Positions hold until a compaction (appends go at the end; merges and
        # re-corrections rewrite columns in place), which rebuilds the index.
        self._flow_rows: dict[int, list[int]] = {}
        self.pending_chunks = 0
        self.appends = 0  # the frame's appends so far: the next one's rows get ``seq`` = this
        # Per append from ``seq_base`` on: the latest ingest time (ms) of the appends up to it (ascending), so the
        # rows ingested after a given time are a tail of the frame found by bisection (_ingested_since).
        self._ingest_upto: list[int] = []
        self._seq_base = 0
        # Evidence of learned offsets and DNS answers are gathered per period of buckets (_gather): from this
        # append on, of this period (None: nothing appended since the last gathering).
        self.gather_buckets = max(1, GATHER_MS // bucket_ms)
        self._gather_from: int | None = None
        self._gather_at: tuple[int, int] | None = None
        self.counters = StoryCounters()
        # CPU seconds of this thread per step (the cost ledger; measuring time is not I/O, and nothing decided
        # depends on it): decode, link (dedupe, link, assign, merge), state (due stories, evictions, marks), fuse,
        # encode (the emitted records).
        # ``cpu_clock``: the runtime's CPU clock (engine.runtime.cpuclock: this thread's and polars' threads');
        # none: nothing is measured.
        self.cpu = dict.fromkeys(CPU_STEPS, 0.0)
        self._cpu_clock: Callable[[], float] = cpu_clock or _no_clock
        self.cid_cache: dict[int | None, str | None] = {}
        self._out = Emission()
        self._pending = _Pending()  # revisions of this call waiting for its one fusion pass
        self._writing = True  # False while replaying: what the call emits is durable already
        # Learned sensor clock offsets (engine.correlate.offsets; docs/correlation.md, Learned offsets). The
        # runtime hands over each epoch's table before the buckets of the epoch (offset_epochs / set_offset_table;
        # ``tables`` None: no runtime does — only the configured offsets apply); the evidence of each epoch is
        # gathered per shard and emitted when the epoch closes for the shard (or at a drain).
        self.learn = settings.offsets.estimate
        self.epoch_buckets = max(1, settings.offsets.epoch_ms // bucket_ms)
        # the smallest move a re-correction makes (µs): a tenth of the match window, at least 100 ms
        self.recorrect_min_us = max(100_000, self.window_us // 10)
        # a shard's rows are re-corrected at each epoch's first bucket up to this many epochs after the last one
        # that brought it events (max_wait: later, its stories are emitted and no new event will join them)
        self.relink_epochs = -(-settings.max_wait_ms // settings.offsets.epoch_ms) + 1
        self.tables: dict[int, OffsetTable] | None = None
        self._offsets_cache: dict[int, dict[str, int]] = {}
        self._evidence: dict[tuple[int, int], dict[Pair, dict[int, int]]] = {}  # (epoch, shard) → pair → bin counts
        # DNS names on connections (engine.correlate.dns; docs/correlation.md, DNS names): the shards' answers go
        # out in their epoch rows, and the answers of the epoch tables of the last ``dns_keep`` epochs are looked
        # up when a story with a flow is emitted.
        self.dns_on = settings.dns_names
        self.epochs_on = self.learn or self.dns_on  # the runtime hands epoch tables
        self.dns_max_ttl_us = settings.dns_max_ttl_ms * 1000
        self.dns_keep = -(-(settings.dns_max_ttl_ms + settings.max_wait_ms) // settings.offsets.epoch_ms) + 1
        self.dns_view = DnsView()
        self._dns: dict[tuple[int, int], list[DnsAnswer]] = {}  # (epoch, shard) → its answers so far
        self._dns_ahead = 0  # 1 while a drain emits: its lookups take the next epoch's table too
        # Epoch boundaries (re-correction, DNS amendments) are handled up to this many epochs after a shard's last
        # events: while a story could still gain events (max_wait), and with DNS names while an emitted one stays
        # in the state (the amend horizon after its emission), at most dns_max_ttl more: a late answer amends then.
        wait_ms = settings.max_wait_ms + (min(settings.amend_horizon_ms, settings.dns_max_ttl_ms) if self.dns_on else 0)
        self.boundary_epochs = -(-wait_ms // settings.offsets.epoch_ms) + 1

    @classmethod
    def for_config(cls, cfg: Config) -> StoryMachine:
        return cls(
            cfg.correlate, bucket_ms=cfg.bucket_ms, community_id_seed=cfg.ingest.community_id_seed, tenant=cfg.tenant
        )

    # -- the stage interface ------------------------------------------------------------------------------
    def replay_bucket(self, shard: int, read_bucket: int) -> int:
        """The first bucket of the oldest story in the state. Stories that already left the state may have
        events on both sides of it: their marks (written when they left) let the replay skip those events."""
        st = self.shards.get(shard)
        oldest = None if st is None else st.oldest_first_bucket()
        return read_bucket + 1 if oldest is None else oldest

    def marks_from(self, first: int) -> int:
        """Marks from the ``max_wait`` before ``first`` on: the cuts made then still name predecessors."""
        return first - (-(-self.c.max_wait_ms // self.bucket_ms) + 1)

    def prepare_replay(self, shard: int, first: int, last: int, marks: Sequence[tuple[int, bytes]]) -> None:
        """Take the marks of a replay of ``[first, last]``: the stories that left the state in ``[first, last]``
        (and the cuts of the ``max_wait`` before ``first``, which still name predecessors), the stories forced out
        by the open-story limit and the drains. A story without spans that left at bucket L had all its events,
        and no other story's, among the events of its flow within ``match_window`` of its time range arriving up
        to L (its events are a connected component, and any other event there would have linked to it while both
        were in the state): the replay drops exactly those. A story with spans is named by its events' ids (the
        span rule is not monotone: no range holds exactly its events), as events without a flow are."""
        st = self.shards.setdefault(shard, ShardState())
        st.replay_through = max(st.replay_through, last)
        flows: list[int] = []
        lo: list[int] = []
        hi: list[int] = []
        left: list[int] = []
        for bucket, body in marks:
            if bucket > last:
                continue
            m = _marks_decoder.decode(body)
            st.pending_cuts.extend((bucket, flow, sid) for flow, sid in m.cuts)
            if bucket < first:
                continue
            if m.drained:
                st.drains.add(bucket)
            if m.forced:
                st.forced_at.setdefault(bucket, []).extend(m.forced)
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
        dropped = set(shards)
        for key in [k for k in self._evidence if k[1] in dropped]:
            del self._evidence[key]
        for key in [k for k in self._dns if k[1] in dropped]:
            del self._dns[key]
        if gone:
            self.frame = self.frame.filter(~pl.col("shard").is_in(gone))
            self._compact()

    def use_offset_tables(self) -> None:
        """Called by the runtime that stores the offset tables: from now on every bucket's epoch needs its table
        (:meth:`offset_epochs`, :meth:`set_offset_table`) — a missing one is an error, never a silent zero."""
        if self.tables is None:
            self.tables = {}

    def offset_epochs(self, buckets: Buckets, *, drain: bool = False) -> list[int]:
        """The epochs whose table the machine still needs for ``buckets`` (none without estimation and DNS names):
        every epoch from the call's first to its last, and the epochs a shard with stories crosses before the
        call's first (its rows are re-corrected at each epoch's first bucket, :meth:`_recorrect`); with DNS names
        also the ``dns_keep`` epochs before the call's first whose answers it does not hold, and the epoch after a
        drain's bucket (``drain``, or a drain a replay repeats: a drain looks up the next epoch's table too)."""
        if not self.epochs_on or self.tables is None or not buckets:
            return []
        eb = self.epoch_buckets
        first, last = buckets[0][0] // eb, buckets[-1][0] // eb
        need = set(range(first, last + 1))
        shards = {s for _, batches in buckets for s in batches}
        for s in shards:
            st = self.shards.get(s)
            if st is not None and st.stories and st.epoch is not None and st.data_epoch is not None:
                need.update(range(st.epoch + 1, min(first, st.data_epoch + self.boundary_epochs) + 1))
        need -= set(self.tables)
        if self.dns_on:
            dns = set(range(first - self.dns_keep + 1, last + 1))
            if drain:
                dns.add(last + 1)
            for s in shards:
                st = self.shards.get(s)
                if st is not None and st.drains:
                    dns.update(d // eb + 1 for d in st.drains)
            need |= dns - self.dns_view.epochs
        return sorted(need)

    def set_offset_table(self, table: OffsetTable) -> None:
        """The offsets to apply during ``table.epoch`` (tables more than LOOKBACK_EPOCHS before the newest are
        dropped after each call; a shard behind needs its tables handed again)."""
        if self.tables is None:
            self.tables = {}
        self.tables[table.epoch] = table
        self._offsets_cache.pop(table.epoch, None)
        if self.dns_on:
            self.dns_view.add(table.epoch, table.dns)

    def _prune_tables(self) -> None:
        if not self.tables:
            return
        newest = max(self.tables)
        for e in [e for e in self.tables if e < newest - LOOKBACK_EPOCHS]:
            del self.tables[e]
            self._offsets_cache.pop(e, None)
        self.dns_view.prune(newest - self.dns_keep)

    def offsets_us(self, epoch: int) -> dict[str, int]:
        """Sensor → the offset subtracted from its times during ``epoch`` (µs): the learned one, unless
        ``sensor_offsets_ms`` configures the sensor."""
        got = self._offsets_cache.get(epoch)
        if got is not None:
            return got
        learned: dict[str, int] = {}
        if self.learn and self.tables is not None:
            table = self.tables.get(epoch)
            if table is None:
                raise RuntimeError(f"no offset table for epoch {epoch}: the runtime must hand it over first")
            learned = table.offsets_us
        got = {**learned, **{k: v * 1000 for k, v in self.c.sensor_offsets_ms.items()}}
        self._offsets_cache[epoch] = got
        if len(self._offsets_cache) > 64:
            self._offsets_cache.pop(min(self._offsets_cache))
        return got

    def metrics(self) -> dict[str, float]:
        return {
            **{f"stories_{k}": float(v) for k, v in vars(self.counters).items()},
            **{f"cpu_us_{k}": round(v * 1e6) for k, v in self.cpu.items()},
        }

    def on_buckets(self, buckets: Buckets, *, replay: bool = False) -> Emission:
        """Buckets in ascending order, each ``(bucket, {shard: batch})`` of several shards at once (one polars pass
        over all their partitions; shards never link to each other, so this is the same as one call per shard).
        Each shard's buckets arrive in order but not necessarily one by one (empty buckets may be skipped): what
        falls due in the skipped buckets is settled first, at the bucket it fell due in, so the output does not
        depend on which empty buckets the caller reported, nor on which shards or buckets it grouped into one
        call (live and replay agree).

        The cyclic garbage collector is paused for the call (see :func:`~engine.core.gcpause.collector_paused`):
        the state holds a few objects per story, and the collections its allocations would set off rescan all of
        them (~7 % of the call's CPU at the bench's rate); the garbage of one call waits until it returns."""
        with collector_paused():
            return self._on_buckets(buckets, replay=replay)

    def _on_buckets(self, buckets: Buckets, *, replay: bool) -> Emission:
        self._check_order(buckets)
        self._out = out = Emission()
        self._writing = not replay
        t0 = self._cpu_clock()
        before = sum(self.cpu.values())
        try:
            decoded = self._decode_call(buckets)
            self.cpu["decode"] += self._cpu_clock() - t0
            for bucket, batches in buckets:
                self._bucket(bucket, batches, replay=replay, decoded=decoded.get(bucket))
                for s in batches:
                    out.replay[s] = self.replay_bucket(s, bucket)
            if buckets and self._gather_key(buckets[-1][0] + 1) != self._gather_at:
                self._gather()  # the last bucket of a gathering period: it is complete
            self._fuse_pending()
            self._prune_tables()
        finally:
            self.cpu["state"] += self._cpu_clock() - t0 - (sum(self.cpu.values()) - before)
            self._writing = True
            self._out = Emission()
            self._pending = _Pending()
        return out

    def _check_order(self, buckets: Buckets) -> None:
        """Each shard's buckets ascend, across calls too (a replay starts from a reset state): a bucket handed in
        again is refused before anything changes (:class:`StageOrderError`)."""
        last: dict[int, int] = {}
        for bucket, batches in buckets:
            for s in batches:
                st = self.shards.get(s)
                prev = last.get(s, st.through if st is not None else -(2**62))
                if bucket <= prev:
                    raise StageOrderError(
                        f"shard {s}: bucket {bucket} handed to the story builder after bucket {prev}: each shard's "
                        "buckets must ascend (the state is unchanged; rebuild it from the committed offsets)"
                    )
                last[s] = bucket

    def drain(self, shards: Sequence[int], bucket: int) -> Emission:
        """Emit every open story of these shards as final at ``bucket`` (the last bucket processed), and record
        the drain in the shards' marks (part :data:`DRAIN_PART`) so that a replay through ``bucket`` repeats it:
        a later start then neither rebuilds nor emits again what the drain finalized. Persist the marks before
        the stories (the worker does): a drain whose stories were written must be known to every later replay."""
        self._out = out = Emission()
        t0 = self._cpu_clock()
        before = sum(self.cpu.values())
        try:
            for s in shards:
                if self._drain_shard(s, bucket):
                    out.marks.append(MarkRecord(s, bucket, DRAIN_PART, DRAIN_MARK))
                out.replay[s] = self.replay_bucket(s, bucket)
            # The worker emitted the shards' rows with close_epochs before the drain; a caller that did not gets
            # them here (evidence and answers are never left behind in a drained shard).
            self._gather()
            self._emit_evidence(set(shards), None)
            self._fuse_pending()
        finally:
            self.cpu["state"] += self._cpu_clock() - t0 - (sum(self.cpu.values()) - before)
            self._out = Emission()
            self._pending = _Pending()
        return out

    def close_epochs(self, shards: Sequence[int], epoch: int) -> Emission:
        """Emit the gathered evidence and DNS answers of these shards now: a drain at a bucket of ``epoch``
        follows, and the next epoch's table, which its lookups take, is built with them. A shard with nothing
        gathered gets no row: the runtime writes an empty one where the store has none (it knows what is stored;
        the stage does not know which of its emissions a failed write lost, nor what a rebuilt state's earlier
        life wrote)."""
        del epoch  # every epoch gathered so far is emitted
        self._out = out = Emission()
        try:
            self._gather()
            self._emit_evidence(set(shards), None)
        finally:
            self._out = Emission()
        return out

    def _drain_shard(self, shard: int, bucket: int) -> bool:
        """Emit the shard's open stories at ``bucket``; whether there were any."""
        st = self.shards.get(shard)
        if st is None:
            return False
        self._catch_up({shard: st}, bucket)
        # A drain finalizes the shard as of the end of its bucket's epoch: its lookups take the next epoch's DNS
        # table too (the answers of the epoch being drained, as far as they are stored), and the stories it emitted
        # before are amended by those answers now, not after the drain.
        self._dns_ahead = 1 if self.dns_on and self.tables is not None else 0
        try:
            amended = self._dns_amend(bucket, {shard: st}, bucket // self.epoch_buckets + self._dns_ahead)
            due = sorted((m for m in st.stories.values() if m.dirty), key=lambda m: m.key)
            self.counters.drained += len(due)
            if due:
                self._emit(bucket, due, (bucket + 1) * self.bucket_ms)
        finally:
            self._dns_ahead = 0
        if not due and not amended:
            return False  # nothing recorded: a replay does not repeat it, so nothing here may change the state
        for m in st.stories.values():
            m.drained = True
        return True

    # -- one bucket ---------------------------------------------------------------------------------------
    def _bucket(
        self,
        bucket: int,
        batches: Mapping[int, Batch],
        *,
        replay: bool,
        decoded: tuple[pl.DataFrame, int] | None = None,
    ) -> None:
        sts = {s: self.shards.setdefault(s, ShardState()) for s in batches}
        for st in sts.values():
            st.through = bucket
        if self._gather_key(bucket) != self._gather_at:
            self._gather()  # a new gathering period (and so never two epochs' rows in one gathering)
        if self._evidence or self._dns:
            self._emit_evidence(set(batches), bucket // self.epoch_buckets)
        if not replay:
            for st in sts.values():
                if st.replaying:
                    st.ghosts, st.ghost_ids = None, {}  # the replay is over
                    self._apply_cuts(st, bucket)
                st.forced_at.clear()
                st.drains.clear()
        else:
            self._replay_drains(sts, bucket - 1)
        self._catch_up(sts, bucket - 1)
        crossing = {s: st for s, st in sts.items() if self._next_boundary(st) == bucket}
        if crossing:
            self._boundary(bucket, crossing)
        now = (bucket + 1) * self.bucket_ms
        full = {s: b for s, b in batches.items() if len(b)}
        if full:
            self._absorb(bucket, full, now, decoded)
        epoch = bucket // self.epoch_buckets
        for s, st in sts.items():
            st.epoch = epoch
            if s in full:
                st.data_epoch = epoch
        self._timeouts(bucket, sts, now)
        if replay:
            self._replay_drains(sts, bucket)

    def _replay_drains(self, sts: Mapping[int, ShardState], through: int) -> None:
        """Replay: repeat the drains recorded at buckets up to ``through``, each right after its bucket, as the
        run that drained did (the replay may not be handed that bucket: it had no events). Their revisions are
        emitted again (identical bytes): that run may have been cut off between recording the drain and writing
        them."""
        for s, st in sts.items():
            for d in sorted(b for b in st.drains if b <= through):
                st.drains.discard(d)
                self._catch_up({s: st}, d)
                self._writing = True
                try:
                    self._drain_shard(s, d)
                finally:
                    self._writing = False

    def _due_later(self, st: ShardState, ms: int, key: int) -> None:
        """An entry for the story ``key``: it falls due at ``ms`` (or later)."""
        b = -(-ms // self.bucket_ms) - 1  # the first bucket whose end is at or after ms
        slot = st.due.get(b)
        if slot is None:
            st.due[b] = [key]
            heapq.heappush(st.due_buckets, b)
        else:
            slot.append(key)

    @staticmethod
    def _next_due(st: ShardState) -> int:
        """A lower bound of the next bucket at which a story of the shard falls due."""
        return st.due_buckets[0] if st.due_buckets else 2**62

    def _pop_due(self, st: ShardState, now: int) -> list[StoryMeta]:
        """The stories whose current due time is at or before ``now`` (a bucket's end), in due order (by time,
        then key). Every story has an entry at or before its due bucket (entries are lower bounds): an entry
        found early is moved to the story's due bucket; entries of stories gone are dropped."""
        found: dict[int, int] = {}  # key → due ms
        moved: set[int] = set()
        wheel, heap, stories = st.due, st.due_buckets, st.stories
        wait, horizon = self.c.max_wait_ms, self.c.amend_horizon_ms
        bucket = now // self.bucket_ms - 1
        while heap and heap[0] <= bucket:
            for key in wheel.pop(heapq.heappop(heap)):
                m = stories.get(key)
                if m is None:
                    continue
                # when the story falls due now: its emission if it has unemitted events, else leaving the state
                if m.dirty:
                    due = m.last_ingest_ms + wait
                elif m.emitted_ms is None:
                    continue
                else:
                    due = m.emitted_ms + horizon
                if due <= now:
                    found[key] = due
                elif key not in moved:
                    moved.add(key)
                    self._due_later(st, due, key)
        return [stories[k] for k in sorted(found, key=lambda k: (found[k], k))]

    def _next_bucket(self, st: ShardState) -> int:
        """The next bucket at which something falls due in the shard (a replay: or a recorded forced emission)."""
        b = self._next_due(st)
        return min(b, *st.forced_at) if st.forced_at else b

    def _catch_up(self, sts: Mapping[int, ShardState], until: int) -> None:
        """Emissions and evictions that fell due in buckets up to ``until``, each at its own bucket, in order;
        the shards due at the same bucket together. With learned offsets, the re-corrections at the first bucket
        of each epoch crossed too (:meth:`_recorrect`), before that bucket's emissions."""
        last = -(2**62)
        while True:
            due = {s: self._next_bucket(st) for s, st in sts.items()}
            bounds = {s: b for s, st in sts.items() if (b := self._next_boundary(st)) is not None}
            b = min([*due.values(), *bounds.values()], default=until + 1)
            if b > until or b <= last:
                return
            last = b
            crossing = {s: sts[s] for s, x in bounds.items() if x == b}
            if crossing:
                self._boundary(b, crossing)
            now = (b + 1) * self.bucket_ms
            self._timeouts(b, {s: sts[s] for s, d in due.items() if d == b or s in crossing}, now)

    def _next_boundary(self, st: ShardState) -> int | None:
        """The first bucket of the next epoch, at which the shard's open stories are re-corrected and its emitted
        ones amended by DNS answers (:meth:`_boundary`): while the runtime hands over tables, the shard has stories,
        and the epoch is within ``boundary_epochs`` of its last events (``relink_epochs`` bounds re-correction
        inside that, in :meth:`_boundary`)."""
        if self.tables is None or not self.epochs_on or not st.stories or st.epoch is None or st.data_epoch is None:
            return None
        e = st.epoch + 1
        return e * self.epoch_buckets if e <= st.data_epoch + self.boundary_epochs else None

    def _boundary(self, bucket: int, sts: Mapping[int, ShardState]) -> None:
        """The first bucket of an epoch for these shards: their open stories' rows take the epoch's offsets
        (:meth:`_recorrect`), then their emitted stories take the DNS answers the epoch's table brought
        (:meth:`_dns_amend`)."""
        epoch = bucket // self.epoch_buckets
        # re-correction only while a story of the shard may still be open (relink_epochs after its last events)
        fresh = {
            s: st for s, st in sts.items() if st.data_epoch is not None and epoch <= st.data_epoch + self.relink_epochs
        }
        if self.learn and fresh:
            self._recorrect(bucket, fresh)
        for st in sts.values():
            st.epoch = epoch
        if self.dns_on:
            self._dns_amend(bucket, sts, epoch)

    def _dns_amend(self, bucket: int, sts: Mapping[int, ShardState], epoch: int) -> bool:
        """The emitted stories of these shards (not drained, not open: an open story looks its name up when it is
        emitted) whose flow the table of ``epoch`` brought answers for, and whose name those answers change, get a
        new revision now. Returns whether any did."""
        pairs = self.dns_view.pairs(epoch)
        if not pairs:
            return False
        lo = bucket // self.epoch_buckets - self.dns_keep + 1  # the window _emit looks up in (a drain: one ahead)
        amend: dict[int, list[StoryMeta]] = {}
        for s, st in sts.items():
            if len(pairs) < len(st.by_ends):  # the answers' flows among the shard's, or the shard's among them
                ends = [e for x, y in pairs if (e := (min(x, y), max(x, y))) in st.by_ends]
            else:
                ends = [e for e in st.by_ends if e in pairs or (e[1], e[0]) in pairs]
            for (a, b), m in ((e, st.stories[k]) for e in set(ends) for k in st.by_ends[e]):
                if m.dirty or m.drained or not m.revision:
                    continue
                found = self.dns_view.lookup(a, b, m.t_min, epoch, lo)
                if found is not None and found != m.dns:
                    amend.setdefault(s, []).append(m)
        if not amend:
            return False
        metas = [m for s in sorted(amend) for m in sorted(amend[s], key=lambda m: m.key)]
        self.counters.dns_amended += len(metas)
        self._emit(bucket, metas, (bucket + 1) * self.bucket_ms)
        return True

    def _recorrect(self, bucket: int, sts: Mapping[int, ShardState]) -> None:
        """The first bucket of an epoch: the rows of these shards' open stories (events not yet emitted final)
        take the epoch's offsets (``t`` = ``raw`` less the offset; a span's end moves with it), and the open
        stories whose rows now link merge (the smallest key survives; an emitted one among the others gets a last
        revision marked ``merged_into``). So the events that came before a sensor's offset was learned, or before
        it changed, link like those after while their stories are open (``max_wait`` after their last event).
        Stories emitted final keep their times and links — only new events amend them — so a drain's output
        stays final. Stories never split: rows that no longer link stay in their story.

        Deterministic: the table is the stored one of the epoch, and this happens at the epoch's first bucket
        whether or not the caller reported that bucket (:meth:`_catch_up`)."""
        epoch = bucket // self.epoch_buckets
        for st in sts.values():
            st.epoch = epoch
        opened = [m for st in sts.values() for m in st.stories.values() if m.dirty]
        if not opened:
            return
        open_keys = [m.key for m in opened]
        offs = self.offsets_us(epoch)
        # the open stories' rows lie from the first append holding any on (seq ascends in frame order)
        at = int(self.frame["seq"].search_sorted(min(m.first_seq for m in opened), side="left"))
        frame = self.frame.slice(at)
        mine = pl.col("story").is_in(pl.Series(open_keys, dtype=KEY).implode())
        off = pl.col("sensor").replace_strict(offs, default=0, return_dtype=pl.Int64) if offs else pl.lit(0, pl.Int64)
        d = pl.col("raw") - off - pl.col("t")
        # a move smaller than the threshold is not made: it would not change what links (the estimate wanders
        # by a bin or two between epochs), and a moved row's story leaves named by its events
        big = mine & (d.abs() >= self.recorrect_min_us)
        delta = frame.select(pl.when(big).then(d).otherwise(0).alias("d"))["d"]
        if not (delta != 0).any():
            return
        frame = frame.with_columns(
            (pl.col("t") + delta).alias("t"), (pl.col("end_time_us") + delta).alias("end_time_us")
        )
        moved = frame.filter(delta != 0)
        self.frame = pl.concat([self.frame.slice(0, at), frame], how="vertical", rechunk=False) if at else frame
        self.counters.recorrected += moved.height
        for shard, flows in (
            moved.filter(pl.col("flow").is_not_null()).group_by("shard").agg(pl.col("flow").unique()).iter_rows()
        ):
            st = sts[shard]
            self._prune_moved(st)
            st.moved.update(dict.fromkeys(flows, bucket))
        now = (bucket + 1) * self.bucket_ms
        touched = set(moved["story"].unique().to_list())
        renames = self._relink(sts, moved["flow"].drop_nulls().unique(), open_keys)
        if renames:
            self.frame = self._merge(sts, self.frame, renames)
            for sid, shard in set(renames.values()):
                self._reopen(sts[shard], sts[shard].stories[sid], bucket, now)
                touched.add(sid)
            touched -= set(renames)
        rows = self._rows_of([m for st in sts.values() for k in touched if (m := st.stories.get(k)) is not None])
        ranges = rows.group_by("shard", "story").agg(pl.col("t").min(), pl.col("t").max().alias("t_max"))
        for shard, key, t_min, t_max in ranges.iter_rows():
            m = sts[shard].stories[key]
            m.t_min, m.t_max = t_min, t_max

    @staticmethod
    def _prune_moved(st: ShardState) -> None:
        """Forget the moves older than every story in the state: the rows they moved have left with their
        stories (a row moved at bucket b was in a story that started at or before b)."""
        oldest = st.oldest_first_bucket()
        if oldest is None:
            st.moved.clear()
        elif min(st.moved.values(), default=oldest) < oldest:
            st.moved = {f: b for f, b in st.moved.items() if b >= oldest}

    def _relink(
        self, sts: Mapping[int, ShardState], flows: pl.Series, open_keys: list[int]
    ) -> dict[int, tuple[int, int]]:
        """The stories ``open_keys`` (of these shards) whose rows of ``flows`` now link: old key → (survivor,
        shard)."""
        if flows.is_empty():
            return {}
        ctx = self.frame.filter(
            pl.col("story").is_in(pl.Series(open_keys, dtype=KEY).implode()) & pl.col("flow").is_in(flows.implode())
        )
        groups = (
            ctx.with_columns(self._components(ctx).alias("comp"))
            .group_by("comp")
            .agg(pl.col("story").unique().sort(), pl.col("shard").first())
            .filter(pl.col("story").list.len() > 1)
        )
        if groups.is_empty():
            return {}
        parent: dict[int, int] = {}

        def root(k: int) -> int:
            while parent.get(k, k) != k:
                k = parent[k]
            return k

        shard_of: dict[int, int] = {}
        for keys, shard in zip(groups["story"].to_list(), groups["shard"].to_list(), strict=True):
            for k in keys:
                shard_of[k] = shard
                a, b = root(keys[0]), root(k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        renames: dict[int, tuple[int, int]] = {}
        for k in sorted(shard_of):
            r = root(k)
            if r != k:
                renames[k] = (r, shard_of[k])
                sts[shard_of[k]].merged_now[k] = r  # written as merged_into stubs by _timeouts
        return renames

    def _reopen(self, st: ShardState, meta: StoryMeta, bucket: int, now: int) -> None:
        """Events joined the story (or stories merged into it) at ``now``: it is due again ``max_wait`` later,
        and an emitted one gets a new revision then."""
        meta.last_ingest_ms = now
        meta.last_bucket = bucket
        meta.drained = False
        if not meta.dirty:
            if meta.revision:
                self.counters.amended += 1
            meta.dirty = True
            st.open += 1
            # due earlier than its entry (the end of the horizon): a new entry. While dirty, its due time only
            # moves later, and the entry it has (a lower bound) is moved when popped (_pop_due).
            self._due_later(st, now + self.c.max_wait_ms, meta.key)
        st.changed.add(meta.key)

    # -- linking ------------------------------------------------------------------------------------------
    def _absorb(
        self, bucket: int, batches: Mapping[int, Batch], now: int, decoded: tuple[pl.DataFrame, int] | None
    ) -> None:
        """The bucket's events of these shards join the state: decode (unless the call decoded them), dedupe,
        link, assign (and merge)."""
        t0 = self._cpu_clock()
        new, total = decoded if decoded is not None else self._decode({bucket: batches})[bucket]
        t1 = self._cpu_clock()
        self.cpu["decode"] += t1 - t0
        try:
            self._link_assign(bucket, batches, now, new, total)
        finally:
            self.cpu["link"] += self._cpu_clock() - t1

    def _link_assign(self, bucket: int, batches: Mapping[int, Batch], now: int, new: pl.DataFrame, total: int) -> None:
        sts = {s: self.shards[s] for s in batches}
        new, skipped = self._dedupe(sts, bucket, new)
        self.counters.duplicates += total - new.height - skipped
        if new.is_empty():
            return
        self.counters.events += new.height
        union = self._link(new)
        frame = self._assign(sts, bucket, now, union, new.height)
        if self._gather_from is None:
            self._gather_from, self._gather_at = self.appends, self._gather_key(bucket)
        self.appends += 1
        self._ingest_upto.append(max(now, self._ingest_upto[-1]) if self._ingest_upto else now)
        self.pending_chunks += 1
        if self.pending_chunks > 64:
            frame = frame.rechunk()
            self.pending_chunks = 0
        self.frame = frame

    def _gather_key(self, bucket: int) -> tuple[int, int]:
        """The gathering period of a bucket (see :meth:`_gather`), and its epoch."""
        return bucket // self.gather_buckets, bucket // self.epoch_buckets

    def _gather(self) -> None:
        """The evidence of learned offsets and the DNS answers of the events appended since the last gathering,
        taken once per gathering period (:data:`GATHER_MS` of buckets, never across an epoch's end; and before a
        drain or an epoch's rows are emitted) rather than per bucket or call: each costs a dozen polars operations
        whatever the number of events, and the periods are a function of the buckets, not of how the caller
        grouped them into calls."""
        first, self._gather_from, self._gather_at = self._gather_from, None, None
        if first is None or first >= self.appends:
            return
        t1 = self._cpu_clock()
        try:
            if self.learn:
                self._gather_evidence(first)
            if self.dns_on:
                self._gather_dns(first)
        finally:
            self.cpu["link"] += self._cpu_clock() - t1

    def _gather_evidence(self, first_seq: int) -> None:
        """Add the differences that the new events (the frame's appends from ``first_seq`` on) give with the
        events of their flows in the frame to the evidence of their epochs, per shard."""
        frame = self.frame
        new = frame.filter(pl.col("seq") >= first_seq)
        if new.is_empty():
            return
        found = evidence(
            new.with_columns(((pl.col("ingest") // self.bucket_ms - 1) // self.epoch_buckets).alias("epoch")),
            # a pair's ingest times are at most max_wait apart: only the frame's tail can hold the other events
            self._ingested_since(int(new["ingest"].min()) - self.c.max_wait_ms),  # type: ignore[arg-type]
            max_offset_us=self.c.max_offset_ms * 1000,
            max_wait_ms=self.c.max_wait_ms,
            epoch_column="epoch",
        )
        for (epoch, shard), pairs in found.items():
            acc = self._evidence.setdefault((epoch, shard), {})
            for pair, counts in pairs.items():
                into = acc.setdefault(pair, {})
                for b, n in counts.items():
                    into[b] = into.get(b, 0) + n

    def _gather_dns(self, first_seq: int) -> None:
        """The DNS answers of the new events (the frame's appends from ``first_seq`` on), per epoch of their
        ingest and shard, with the id of the story each event is in now."""
        frame = self.frame
        new = frame.slice(int(frame["seq"].search_sorted(first_seq, side="left")))
        sources = [s for s in new["source"].unique().to_list() if s is not None and is_dns_source(s)]
        if not sources:
            return
        rows = new.filter(pl.col("source").is_in(sources) & pl.col("src_ip").is_not_null()).select(
            "source",
            "src_ip",
            "src_port",
            "dst_ip",
            "dst_port",
            "attrs",
            "t",
            "story",
            "shard",
            ((pl.col("ingest") // self.bucket_ms - 1) // self.epoch_buckets).alias("epoch"),
        )
        cols = [rows[c].to_list() for c in rows.columns]
        by_key: dict[tuple[int, int], list[tuple[Any, ...]]] = {}
        for source, sip, sport, dip, dport, attrs, t, key, shard, epoch in zip(*cols, strict=True):
            row = (source, sip, sport, dip, dport, attrs, t, story_id(shard, key))
            by_key.setdefault((epoch, shard), []).append(row)
        for k, part in by_key.items():
            found = answers_of(part, max_ttl_us=self.dns_max_ttl_us)
            if found:
                self._dns.setdefault(k, []).extend(found)
                self.counters.dns_answers += len(found)

    def _emit_evidence(self, shards: set[int], before_epoch: int | None) -> None:
        """Emit the gathered evidence and DNS answers of these shards for the epochs before ``before_epoch`` (None:
        every epoch, a drain) and forget them."""
        keys = self._evidence.keys() | self._dns.keys()
        due = [k for k in keys if k[1] in shards and (before_epoch is None or k[0] < before_epoch)]
        for key in sorted(due):
            pairs = self._evidence.pop(key, {})
            body = {pair_key(a, b): Sketch.of(counts) for (a, b), counts in sorted(pairs.items())}
            row = EvidenceRow(key[0], key[1], body, sorted(set(self._dns.pop(key, []))))
            self._out.evidence.append(EvidenceRecord(key[0], key[1], _msgpack.encode(row)))

    def _decode_call(self, buckets: Buckets) -> dict[int, tuple[pl.DataFrame, int]]:
        """Every partition of the call decoded at once (see :meth:`_decode`), when there are several buckets."""
        full = {b: {s: x for s, x in batches.items() if len(x)} for b, batches in buckets}
        full = {b: parts for b, parts in full.items() if parts}
        return self._decode(full) if len(full) > 1 else {}

    def _decode(self, buckets: Mapping[int, Mapping[int, Batch]]) -> dict[int, tuple[pl.DataFrame, int]]:
        """The partitions' events as state rows (story unset; ingest time: the end of their bucket), per bucket the
        first of each id only, and how many there were. One decoder call and one frame for all the buckets (in
        ascending order), then a slice per bucket."""
        shards: list[int] = []
        sizes: list[int] = []
        ingest: list[int] = []
        payloads: list[bytes] = []
        totals: dict[int, int] = {}
        for b, batches in buckets.items():
            for s, batch in batches.items():
                shards.append(s)
                sizes.append(len(batch))
                ingest.append((b + 1) * self.bucket_ms)
                payloads += [r.payload for r in batch.records]
            totals[b] = sum(len(x) for x in batches.values())
        cols = event_columns(payloads)
        time_us = pl.Series("time_us", cols.pop("time_us"), pl.Int64)
        spread = pl.Series(range(len(shards)), dtype=pl.UInt32).repeat_by(pl.Series(sizes, dtype=pl.UInt32)).explode()
        ingest_col = pl.Series("ingest", ingest, pl.Int64).gather(spread)
        offset_us = self._offset_expr(sorted(buckets), ingest_col)
        new = pl.DataFrame(cols, schema={k: v for k, v in EVENT_SCHEMA.items() if k in cols}).with_columns(
            (time_us - offset_us if offset_us is not None else time_us).alias("t"),
            # a span's end, corrected like its start (the link step bounds sessions by it)
            *([pl.col("end_time_us") - offset_us] if offset_us is not None else []),
            time_us.alias("raw"),
            pl.lit(None, KEY).alias("story"),
            ingest_col,
            pl.Series("shard", shards, pl.Int32).gather(spread),
            pl.lit(0, pl.Int64).alias("seq"),  # set when the rows join the state (_assign)
        )
        new = new.select(list(STATE_SCHEMA)).unique(["ingest", "id"], keep="first", maintain_order=True)
        if len(buckets) == 1:
            return {b: (new, totals[b]) for b in buckets}
        counts = new.group_by("ingest", maintain_order=True).len()
        out: dict[int, tuple[pl.DataFrame, int]] = {}
        at = 0
        for ingest_ms, n in counts.iter_rows():
            b = ingest_ms // self.bucket_ms - 1
            out[b] = (new.slice(at, n), totals[b])
            at += n
        return out

    def _offset_expr(self, buckets: list[int], ingest: pl.Series) -> pl.Expr | None:
        """The offset (µs) to subtract from each row's times: by its sensor, from the table of its bucket's epoch
        (``ingest``: the rows' bucket ends); None when no sensor has one in these epochs."""
        per_epoch = {e: self.offsets_us(e) for e in sorted({b // self.epoch_buckets for b in buckets})}
        if not any(per_epoch.values()):
            return None
        exprs = {
            e: pl.col("sensor").replace_strict(m, default=0, return_dtype=pl.Int64) if m else pl.lit(0, pl.Int64)
            for e, m in per_epoch.items()
        }
        if len(exprs) == 1:
            return next(iter(exprs.values()))
        epoch = (pl.lit(ingest) // self.bucket_ms - 1) // self.epoch_buckets
        expr: pl.Expr = pl.lit(0, pl.Int64)
        for e, by_sensor in exprs.items():
            expr = pl.when(epoch == e).then(by_sensor).otherwise(expr)
        return expr

    def _dedupe(self, sts: Mapping[int, ShardState], bucket: int, new: pl.DataFrame) -> tuple[pl.DataFrame, int]:
        """Drop the events already in their shard's state (re-deliveries) and, in a replay, those of stories that
        had left the state. Returns the rest and how many the replay skipped."""
        skipped = 0
        replaying = [st for st in sts.values() if st.replaying]
        if replaying:
            for st in replaying:
                if st.pending_cuts:
                    self._apply_cuts(st, bucket)
            before = new.height
            new = self._skip_ghosts(sts, bucket, new)
            skipped = before - new.height
            self.counters.replay_skipped += skipped
        if any(st.ids for st in sts.values()):
            ids_of = {s: st.ids for s, st in sts.items()}
            fresh = [i not in ids_of[s] for i, s in zip(new["id"].to_list(), new["shard"].to_list(), strict=True)]
            if not all(fresh):
                new = new.filter(pl.Series(fresh))
        return new, skipped

    def _link(self, new: pl.DataFrame) -> pl.DataFrame:
        """The new events with the state's events of the same flows (``is_new`` tells them apart), each with its
        component (``comp``): events linked directly or through others."""
        frame = self.frame
        index = self._flow_rows
        flows = set(new["flow"].to_list())
        flows.discard(None)
        at = sorted(i for f in flows for i in index.get(f, ()))
        ctx = frame[pl.Series(at, dtype=pl.UInt32)] if at else frame.clear()
        if self.dead and ctx.height:
            dead = self.dead
            live = [k not in dead for k in ctx["story"].to_list()]
            if not all(live):
                ctx = gather(ctx, np.array(live, dtype=bool))
        union = ctx.vstack(new)
        is_new = np.zeros(union.height, dtype=bool)
        is_new[ctx.height :] = True
        union.hstack([pl.Series("is_new", is_new)], in_place=True)
        comp = self._components(union, sessions=new["session"].null_count() < new.height)
        return union.hstack([comp], in_place=True)

    def _components(self, rows: pl.DataFrame, *, sessions: bool = True) -> pl.Series:
        """The component (``comp``) of each row: rows linked directly or through others, by flow within the
        match window (spans bound sessions) and by the sensor's own session id."""
        ends = "end_time_us" if rows["end_time_us"].null_count() < rows.height else None  # spans bound sessions
        if not sessions or rows["session"].null_count() == rows.height:
            return link(rows, [("flow", self.window_us)], end=ends).alias("comp")
        # A sensor's own session id is a second key, without a time window: its records of one session are one
        # story however far apart (a long connection's conn record and its late request). The state's records
        # of these flows are in the context already; a session's records share its flow.
        session_key = (
            pl.when(pl.col("session").is_not_null())
            .then(pl.concat_str([pl.col("sensor"), pl.lit("\x1f"), pl.col("session")]).hash())
            .alias("session_key")
        )
        keyed = rows.with_columns(session_key)
        return link(keyed, [("flow", self.window_us), ("session_key", SESSION_WINDOW_US)], end=ends).alias("comp")

    def _assign(
        self, sts: Mapping[int, ShardState], bucket: int, now: int, union: pl.DataFrame, n_new: int
    ) -> pl.DataFrame:
        """Per component with new events: a new story, or the story it touches, or the merge of the several it
        touches. ``union``: :meth:`_link`'s, its last ``n_new`` rows the new events. Returns the state frame with the
        new events in it."""
        story = pl.col("story")
        groups = (
            union.lazy()
            .group_by("comp")
            .agg(
                story.min().alias("known_min"),
                (story.n_unique() - (story.null_count() > 0).cast(pl.UInt32)).alias("known_n"),
                pl.col("id").filter(pl.col("is_new")).min().alias("first_new"),
                pl.col("is_new").sum().alias("n_new"),
                pl.col("t").min().alias("t_min"),
                pl.col("t").max().alias("t_max"),
                pl.col("flow").first().alias("flow"),
                pl.col("shard").first().alias("shard"),
                pl.col("src_ip").first().alias("src_ip"),
                pl.col("dst_ip").first().alias("dst_ip"),
            )
            .filter(pl.col("n_new") > 0)
            .sort("first_new")
            .collect()
        )
        comps: list[int] = []
        sids: list[int] = []
        known = groups["known_n"].to_numpy() > 0
        self._create(sts, bucket, now, gather(groups, ~known), comps, sids)
        renames = self._extend(sts, bucket, now, union, gather(groups, known), comps, sids)
        # the new events are the union's last rows (_link), in their order
        assigned = union.slice(union.height - n_new)[list(STATE_SCHEMA)]
        comp = union["comp"].slice(union.height - n_new).to_numpy()
        assigned.replace_column(
            assigned.get_column_index("story"), pl.Series("story", remap(comp, comps, sids, np.uint64))
        )
        assigned.replace_column(
            assigned.get_column_index("seq"),
            pl.Series("seq", [self.appends], pl.Int64).new_from_index(0, assigned.height),
        )
        index = self._flow_rows
        for i, f in enumerate(assigned["flow"].to_list(), self.frame.height):
            if f is not None:
                got = index.get(f)
                if got is None:
                    index[f] = [i]
                else:
                    got.append(i)
        frame = self.frame.vstack(assigned)
        if renames:
            frame = self._merge(sts, frame, renames)
        if len(sts) == 1:
            next(iter(sts.values())).ids.update(assigned["id"].to_list())
        else:
            for s, i in zip(assigned["shard"].to_list(), assigned["id"].to_list(), strict=True):
                sts[s].ids.add(i)
        return frame

    def _create(
        self,
        sts: Mapping[int, ShardState],
        bucket: int,
        now: int,
        fresh: pl.DataFrame,
        comps: list[int],
        sids: list[int],
    ) -> None:
        """Components that touch no known story become new stories. The key hashes the smallest new event id
        with the bucket the story starts in (:func:`story_key`): an event delivered again after its story left
        the state starts a story with another id (never a second revision 1 of the old one)."""
        wait = self.c.max_wait_ms
        cols = ("comp", "first_new", "n_new", "t_min", "t_max", "flow", "shard", "src_ip", "dst_ip")
        dead = self.dead
        created: dict[int, int] = {}  # per shard
        for comp, first_new, n_new, t_min, t_max, flow, shard, src_ip, dst_ip in zip(
            *(fresh[c].to_list() for c in cols), strict=True
        ):
            st = sts[shard]
            stories = st.stories
            sid = story_key(first_new, bucket, shard)  # looked up here: a test replaces it to force collisions
            while sid in stories:  # a hash collision in the shard (48 bits): never join unrelated stories
                sid = (sid + _SHARD_BITS + 1) & _KEY_MASK
            if sid in dead:  # the rows of a story that left still carry this key: drop them first
                self._compact()
            pred = None
            if flow is not None and st.sealed_flows:
                cut = st.sealed_flows.get(flow)
                if cut is not None and now - cut[1] <= wait:
                    pred = cut[0]
            st.changed.add(sid)
            self._due_later(st, now + wait, sid)
            created[shard] = created.get(shard, 0) + 1
            ends = None
            if flow is not None and src_ip is not None and dst_ip is not None:
                ends = (src_ip, dst_ip) if src_ip <= dst_ip else (dst_ip, src_ip)
            stories[sid] = StoryMeta(
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
                first_seq=self.appends,
                last_seq=self.appends,
                ends=ends,
            )
            if ends is not None:
                st.by_ends.setdefault(ends, set()).add(sid)
            comps.append(comp)
            sids.append(sid)
        for shard, n in created.items():
            sts[shard].open += n
            sts[shard].track(bucket, n)
        self.counters.stories += fresh.height

    def _extend(
        self,
        sts: Mapping[int, ShardState],
        bucket: int,
        now: int,
        union: pl.DataFrame,
        known: pl.DataFrame,
        comps: list[int],
        sids: list[int],
    ) -> dict[int, tuple[int, int]]:
        """Components that touch known stories: the new events join the smallest; an emitted story re-opens (a
        new revision will follow). Returns the other stories of each component: old key → (survivor, shard)."""
        merging = known["comp"].filter(known["known_n"] > 1)
        known_lists: dict[int, list[int]] = {}
        if merging.len():
            lists = (
                union.filter(pl.col("comp").is_in(merging.implode()) & pl.col("story").is_not_null())
                .group_by("comp")
                .agg(pl.col("story").unique().sort())
            )
            known_lists = dict(zip(lists["comp"].to_list(), lists["story"].to_list(), strict=True))
        renames: dict[int, tuple[int, int]] = {}
        for comp, sid, n_known, n_new, t_min, t_max, shard in zip(
            *(known[c].to_list() for c in ("comp", "known_min", "known_n", "n_new", "t_min", "t_max", "shard")),
            strict=True,
        ):
            st = sts[shard]
            if n_known > 1:
                for other in known_lists[comp][1:]:
                    renames[other] = (sid, shard)
                    st.merged_now[other] = sid  # written as merged_into stubs by _timeouts
            meta = st.stories[sid]
            meta.last_seq = self.appends
            meta.events += int(n_new)
            meta.t_min = min(meta.t_min, t_min)
            meta.t_max = max(meta.t_max, t_max)
            self._reopen(st, meta, bucket, now)
            comps.append(comp)
            sids.append(sid)
        return renames

    def _merge(
        self, sts: Mapping[int, ShardState], frame: pl.DataFrame, renames: Mapping[int, tuple[int, int]]
    ) -> pl.DataFrame:
        """Stories linked by this bucket's events merge into the smallest key: rows renamed (from the first append
        holding rows of a merged story on), counts folded."""
        first = min(sts[shard].stories[old].first_seq for old, (_, shard) in renames.items())
        at = int(frame["seq"].search_sorted(first, side="left"))
        renamed = frame.slice(at).with_columns(pl.col("story").replace({old: sid for old, (sid, _) in renames.items()}))
        frame = pl.concat([frame.slice(0, at), renamed], how="vertical", rechunk=False) if at else renamed
        for old, (sid, shard) in renames.items():
            st = sts[shard]
            om, sm = st.stories[old], st.stories[sid]
            sm.events += om.events
            if om.first_bucket < sm.first_bucket:
                st.track(sm.first_bucket, -1)
                st.track(om.first_bucket, 1)
                sm.first_bucket = om.first_bucket
            sm.last_bucket = max(sm.last_bucket, om.last_bucket)
            sm.first_seq, sm.last_seq = min(sm.first_seq, om.first_seq), max(sm.last_seq, om.last_seq)
            sm.t_min, sm.t_max = min(sm.t_min, om.t_min), max(sm.t_max, om.t_max)
            self.counters.merged += 1
        return frame

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
            if st.ghost_ids:  # events named one by one: without a flow, or of a story with spans
                gid = st.ghost_ids
                named = new.filter(pl.col("shard") == shard)["id"].to_list()
                hit += [i for i in named if gid.get(i, -1) >= bucket]
        return new.filter(~pl.col("id").is_in(hit)) if hit else new

    def _apply_cuts(self, st: ShardState, bucket: int) -> None:
        """Replay: the cuts made before ``bucket`` name the predecessors of stories created from it on."""
        bms = self.bucket_ms
        while st.pending_cuts and st.pending_cuts[0][0] < bucket:
            b, flow, sid = st.pending_cuts.pop(0)
            st.sealed_flows[flow] = (sid, (b + 1) * bms)

    # -- time ---------------------------------------------------------------------------------------------
    def _forced(self, st: ShardState, bucket: int, due: list[StoryMeta], due_keys: set[int]) -> list[StoryMeta]:
        """The stories the open-story limit forces out at ``bucket``, least recently extended first. In a replay
        the live run's choice is taken from the marks: it counted stories that had left the state since (the
        replay does not hold them), so deciding again could choose others."""
        c = self.c
        if bucket <= st.replay_through:
            keys = st.forced_at.pop(bucket, [])
            return [m for m in (st.stories.get(k) for k in keys) if m is not None and m.dirty and m.key not in due_keys]
        if st.open - len(due) <= c.max_open_stories:
            return []
        extra = sorted(
            (m for m in st.stories.values() if m.dirty and m.key not in due_keys),
            key=lambda m: (m.last_ingest_ms, m.key),
        )
        return extra[: st.open - len(due) - c.max_open_stories]

    def _timeouts(self, bucket: int, sts: Mapping[int, ShardState], now: int) -> None:
        """Emissions, truncations and evictions due at ``bucket`` in these shards: one fusion pass for all."""
        c = self.c
        records: list[StoryRecord] = []
        due_all: list[StoryMeta] = []
        provisional_all: list[StoryMeta] = []
        active: dict[int, tuple[ShardState, list[StoryMeta], list[int], list[int]]] = {}
        span_us = c.max_story_ms * 1000
        for shard, st in sts.items():
            if (
                not st.changed
                and not st.merged_now
                and bucket < self._next_due(st)
                and not (st.forced_at and bucket in st.forced_at)
            ):
                continue  # nothing changed and nothing falls due yet
            renames, st.merged_now = st.merged_now, {}
            for old, sid in renames.items():
                om = st.drop(old)
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
            forced = self._forced(st, bucket, due, due_keys)
            self.counters.forced += len(forced)
            due += forced
            if c.emit == "updates":
                due_keys.update(m.key for m in due)
                provisional_all += [
                    m for m in (st.stories[k] for k in changed if k in st.stories) if m.dirty and m.key not in due_keys
                ]
            due_all += due
            active[shard] = (st, big, gone, [m.key for m in forced])
        if not active:
            return
        if records or due_all or provisional_all:
            self._emit(bucket, due_all, now, records, provisional_all)
        # Leave the state: truncated stories now; emitted, quiet ones past the amend horizon.
        leaving: dict[int, list[int]] = {}
        for shard, (st, big, gone, _) in active.items():
            gone += [m.key for m in self._pop_due(st, now)]  # emitted now with a zero horizon
            if big or gone:
                leaving[shard] = [m.key for m in big] + gone
                self.counters.truncated += len(big)
                self.counters.evicted += len(gone)
        forced_keys = {shard: keys for shard, (_, _, _, keys) in active.items() if keys}
        if leaving or forced_keys:
            # The leaving stories' rows, selected once for the cuts, the marks and the id sets.
            rows = self._rows_of([active[s][0].stories[k] for s, ks in leaving.items() for k in ks])
            big_all = [m for _, big, _, _ in active.values() for m in big]
            cuts = self._seal(rows, big_all, now) if big_all else {}
            moved: dict[int, set[int]] = {}
            if any(active[s][0].moved for s in leaving):
                for s, flows in rows.group_by("shard").agg(pl.col("flow").drop_nulls().unique()).iter_rows():
                    hit = self.shards[s].moved.keys() & set(flows)
                    if hit:
                        moved[s] = hit
            shards = [*leaving, *(s for s in forced_keys if s not in leaving)]
            marks = self._marks(rows, shards, cuts, forced_keys, moved)
            if leaving:
                for shard, id_ in zip(rows["shard"].to_list(), rows["id"].to_list(), strict=True):
                    self.shards[shard].ids.discard(id_)
                self.dead.update(k for ks in leaving.values() for k in ks)
                self.dead_rows += rows.height
                if self.dead_rows >= max(COMPACT_ROWS, self.frame.height - self.dead_rows):
                    self._compact()
            for shard, keys in leaving.items():
                st = active[shard][0]
                for key in keys:
                    st.drop(key)
            for shard, parts in marks.items():
                if bucket > active[shard][0].replay_through:  # a replayed bucket's marks are stored (and complete)
                    self._out.marks += [MarkRecord(shard, bucket, i, body) for i, body in enumerate(parts)]
        for st, _, _, _ in active.values():
            if st.moved and leaving:
                self._prune_moved(st)
            if len(st.sealed_flows) > 64:
                st.sealed_flows = {f: cut for f, cut in st.sealed_flows.items() if now - cut[1] <= c.max_wait_ms}

    def _rows_of(self, stories: Sequence[StoryMeta]) -> pl.DataFrame:
        """The stories' rows in the frame: searched only between the first and the last append holding any."""
        if not stories:
            return self.frame.clear()
        seq = self.frame["seq"]
        lo = int(seq.search_sorted(min(m.first_seq for m in stories), side="left"))
        hi = int(seq.search_sorted(max(m.last_seq for m in stories), side="right"))
        rows = self.frame.slice(lo, hi - lo)
        return gather(rows, member(rows["story"], [m.key for m in stories]))

    @property
    def live_rows(self) -> int:
        """Rows of the stories in the state (the frame also holds up to ``max(COMPACT_ROWS, live_rows)`` rows of
        stories that left it, until the next compaction)."""
        return self.frame.height - self.dead_rows

    def _compact(self) -> None:
        """Drop the rows of the stories that left the state."""
        if self.dead:
            self.frame = self.frame.filter(~pl.col("story").is_in(pl.Series(list(self.dead), dtype=KEY).implode()))
            self.pending_chunks = 0
        self.dead.clear()
        self.dead_rows = 0
        self._index_flows()
        # the appends before the frame's oldest row hold nothing any more
        oldest = int(self.frame["seq"][0]) if self.frame.height else self.appends  # seq ascends in frame order
        if oldest > self._seq_base:
            del self._ingest_upto[: oldest - self._seq_base]
            self._seq_base = oldest

    def _index_flows(self) -> None:
        """Rebuild the flow → rows index (:attr:`_flow_rows`) from the frame."""
        rows = (
            self.frame.select("flow")
            .with_row_index("at")
            .filter(pl.col("flow").is_not_null())
            .group_by("flow")
            .agg(pl.col("at").sort())
        )
        self._flow_rows = dict(zip(rows["flow"].to_list(), rows["at"].to_list(), strict=True))

    def _ingested_since(self, ms: int) -> pl.DataFrame:
        """A tail of the state frame holding every row ingested at ``ms`` or later (and maybe some earlier): from
        the first append whose latest ingest time so far reaches ``ms`` (rows are in append order; a shard behind
        the others appends older buckets later, which the running maximum covers)."""
        i = bisect.bisect_left(self._ingest_upto, ms)
        if i == 0:
            return self.frame
        at = int(self.frame["seq"].search_sorted(self._seq_base + i, side="left"))
        return self.frame.slice(at)

    @staticmethod
    def _marks(
        rows: pl.DataFrame,
        shards: Sequence[int],
        cuts: Mapping[int, list[tuple[int, str]]],
        forced: Mapping[int, list[int]],
        moved: Mapping[int, set[int]] | None = None,
        *,
        vectorized: bool | None = None,
    ) -> dict[int, list[bytes]]:
        """The stored form (:class:`Marks`) per shard, in parts of MARKS_PER_PART. ``rows``: the leaving stories'
        rows; ``forced``: the keys of the stories forced out per shard; ``moved``: the flows per shard whose rows
        a re-correction moved while stories now leaving could meet them.

        A story with spans is named event by event: the span rule is not monotone (engine.correlate.link), so no
        time range holds exactly its events. Without spans the range widened by the window does — unless rows of
        its flow were moved by a re-correction (StoryMachine._recorrect): a replay compares the times events
        arrive with, and a moved row may have linked, or not, by its time after the move.

        Two paths give the same bytes (tests/unit/test_story.py): in Python below :data:`MARKS_ROWS_PATH_MAX`
        rows (a bucket's evictions: a dozen polars operations cost more than the loop), in polars above
        (``vectorized`` forces one)."""
        if vectorized is None:
            vectorized = rows.height >= MARKS_ROWS_PATH_MAX
        left = _leaving_frame(rows, moved) if vectorized else _leaving_rows(rows, moved)
        out: dict[int, list[bytes]] = {}
        k = MARKS_PER_PART
        for shard in shards:
            flows, lo, hi, ids = left.get(shard, ([], [], [], []))
            cut = list(cuts.get(shard, []))
            forced_keys = sorted(forced.get(shard, []))
            n = max(len(flows), len(ids), len(cut), len(forced_keys))
            out[shard] = [
                _marks_encoder.encode(
                    Marks(
                        flows[i : i + k],
                        lo[i : i + k],
                        hi[i : i + k],
                        ids[i : i + k],
                        cut[i : i + k],
                        forced_keys[i : i + k],
                    )
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

    def _emit(
        self,
        bucket: int,
        due: list[StoryMeta],
        now: int,
        records: list[StoryRecord] | None = None,
        provisional: list[StoryMeta] | None = None,
    ) -> None:
        """New revisions of ``due`` (final) and ``provisional`` stories (fused with the whole call's), plus ``records``
        (merge stubs), into the call's emission (unless replaying: then they are durable already)."""
        out = list(records or [])
        temp = {m.key for m in provisional or []}
        due = [*due, *(provisional or [])]
        if due:
            heads = []
            shard_of: dict[int, int] = {}
            names: list[tuple[str, str] | None] = []
            epoch = bucket // self.epoch_buckets + self._dns_ahead
            lo = bucket // self.epoch_buckets - self.dns_keep + 1
            view = self.dns_view if self.dns_on and self.dns_view.size else None
            for meta in due:
                if view is not None and meta.ends is not None:
                    found = view.lookup(meta.ends[0], meta.ends[1], meta.t_min, epoch, lo)
                    if found is not None:
                        meta.dns = found  # kept when a later revision finds none (its answer left the view)
                if meta.dns is not None:
                    self.counters.dns_named += 1
                names.append(meta.dns)
                meta.revision += 1
                final = meta.key not in temp
                if final:  # a provisional revision neither closes the story nor starts its amend horizon
                    meta.emitted_ms = now
                    if meta.dirty:
                        meta.dirty = False
                        st = self.shards[meta.shard]
                        st.open -= 1
                        self._due_later(st, now + self.c.amend_horizon_ms, meta.key)
                heads.append((meta.key, meta.id, meta.revision, final, meta.truncated, meta.predecessor))
                shard_of[meta.key] = meta.shard
                self.counters.emitted += 1
        if not self._writing:
            return
        self._out.stories += out
        if due:
            # Fused once per call (_fuse_pending): here only this bucket's rows of these stories are taken (they
            # may gain events, or be renamed by a merge, later in the same call).
            self._defer(bucket, now, heads, shard_of, min(m.first_seq for m in due), names)

    def _defer(
        self,
        bucket: int,
        now: int,
        heads: list[tuple[int, str, int, bool, bool, str | None]],
        shard_of: Mapping[int, int],
        first_seq: int,
        names: Sequence[tuple[str, str] | None],
    ) -> None:
        """Queue revisions for the call's one fusion pass: each gets a sequence number that stands for the story
        in the snapshot of its rows taken now (a story emitted twice in a call has two snapshots).

        Only the frame's rows from append ``first_seq`` on (the earliest append holding rows of any of these
        stories) are searched: ``seq`` ascends in frame order, so a story's rows all lie there (emitted stories
        are mostly recent: this is a small tail of the state, not all of it). Not ingest time: a shard that was
        behind the others appends older buckets after their newer ones."""
        p = self._pending
        base = len(p.slots)
        keys = [h[0] for h in heads]
        seqs = list(range(base, base + len(heads)))
        frame = self.frame
        tail = frame.slice(int(frame["seq"].search_sorted(first_seq, side="left")))
        rows = gather(tail[[c for c in frame.columns if c not in ("shard", "seq")]], member(tail["story"], keys))
        seq_of = remap(u64(rows["story"]), keys, seqs, np.uint64)
        rows.replace_column(rows.get_column_index("story"), pl.Series("story", seq_of))
        p.rows.append(rows)
        p.dns.extend(names)
        for seq, (key, sid, revision, final, truncated, predecessor) in zip(seqs, heads, strict=True):
            p.heads.append((seq, sid, revision, final, truncated, predecessor, now))
            p.slots.append((shard_of[key], bucket, now, len(self._out.stories)))
            self._out.stories.append(_PLACEHOLDER)

    def _fuse_pending(self) -> None:
        """Fuse every revision queued in this call in one pass and put the bodies in their places."""
        p = self._pending
        if not p.slots:
            return
        self._pending = _Pending()
        t0 = self._cpu_clock()
        if len(self.cid_cache) > CID_CACHE_MAX:
            self.cid_cache.clear()
        rows = pl.concat(p.rows, how="vertical", rechunk=False) if len(p.rows) > 1 else p.rows[0]
        bodies = fuse_bodies(
            rows, p.heads, rules=self.c.merge, seed=self.seed, cid_cache=self.cid_cache, tenant=self.tenant
        )
        t1 = self._cpu_clock()
        self.cpu["fuse"] += t1 - t0
        stories = self._out.stories
        for (shard, bucket, now, at), (_, sid, revision, final, _, _, _), fused, named in zip(
            p.slots, p.heads, bodies, p.dns, strict=True
        ):
            body = fused
            if named is not None:  # the body's last fields (StoryBody): appended to the fused JSON object
                body = b'%s,"dns_names":%s,"related_stories":%s}' % (
                    fused[:-1],
                    _json.encode([named[0]]),
                    _json.encode([named[1]]),
                )
            stories[at] = StoryRecord(shard, bucket, sid, revision, final, None, now, body)
        self.cpu["encode"] += self._cpu_clock() - t1

    def _stub(self, shard: int, bucket: int, meta: StoryMeta, into: str, now: int) -> StoryRecord:
        body = StoryBody(
            story_id=meta.id,
            tenant=self.tenant,
            revision=meta.revision + 1,
            final=True,
            emitted_ms=now,
            merged_into=into,
        )
        return StoryRecord(shard, bucket, meta.id, meta.revision + 1, True, into, now, _json.encode(body))
