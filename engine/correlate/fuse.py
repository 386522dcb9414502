"""Fused-story building, vectorized: the events of many stories (one polars frame) → one JSON body per story.

Input: an *event frame* (:data:`EVENT_SCHEMA`; what :func:`event_columns` makes from stored payloads) whose
``story`` column says which story each event belongs to, and a *head frame* (:data:`HEAD_SCHEMA`) with what the
story builder knows per story (revision, final, truncated, predecessor). Output: the head frame with a ``body``
column, the fused story as JSON (the documented :class:`FusedStory` schema, docs/correlation.md).

Everything per event runs in polars (sorting, grouping, string assembly); Python runs once per story only for
the Community ID (SHA-1, cached per flow) and once per *(story, source) group with several events* for the
attribute merge (the rules fold values key by key; a group with one event takes its attributes as they are,
which is what every rule gives for a single value — except ``set``, so a ``set`` rule sends every group through
the Python merge).

Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter
from typing import Any

import msgspec
import polars as pl

from engine.core.event import Event, polars_columns, row_struct
from engine.ingest.network_identity import community_id

__all__ = [
    "EVENT_SCHEMA",
    "HEAD_SCHEMA",
    "TOTALS",
    "FusedStory",
    "event_columns",
    "fuse",
    "merge_value",
]

TOTALS = ("bytes", "packets")
TOTAL_LIMIT = 2**43
"""An attribute counts towards ``totals`` when it is an integer (not a boolean) of magnitude below this: with at
most ``correlate.max_story_events`` (≤ 1,000,000) events a story's sum stays inside int64."""

_STORED = dict(polars_columns())  # the stored fields' polars dtypes, derived from the one declaration
# The event frame: the stored fields (``time_us`` corrected into ``t``, maps as JSON text) and the frame's own
# columns. Every stored scalar field is a column, so a field added to the event reaches the frame by itself.
EVENT_SCHEMA: dict[str, Any] = {
    "id": pl.String,
    "t": pl.Int64,  # corrected event time, µs
    "flow": pl.UInt64,
    "story": pl.UInt64,  # story key
    "ingest": pl.Int64,  # ingest time (bucket end), ms
    **{name: getattr(pl, dtype) for name, dtype in _STORED.items() if dtype and name not in ("id", "time_us", "flow")},
    "attrs": pl.String,  # the event's attributes as a JSON object
    "akeys": pl.String,  # the attribute names, in order, joined by U+001F (equal names: a plain last-wins merge)
    "bytes": pl.Int64,
    "packets": pl.Int64,
}
_SCALARS = tuple(name for name, dtype in _STORED.items() if dtype is not None)  # columns taken as stored

HEAD_SCHEMA: dict[str, Any] = {
    "story": pl.UInt64,  # the story key (events' "story"); any orderable dtype the two share
    "story_id": pl.String,
    "revision": pl.Int64,
    "final": pl.Boolean,
    "truncated": pl.Boolean,
    "predecessor": pl.String,
}


class FusedStory(msgspec.Struct, omit_defaults=True):
    """The documented output schema (docs/correlation.md); :func:`fuse` writes the same JSON."""

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
    attrs: dict[str, dict[str, Any]]  # per source: merged attributes (correlate.merge rules, default last)
    totals: dict[str, int] = msgspec.field(default_factory=dict)  # sums of bytes / packets where reported
    truncated: bool = False
    predecessor: str | None = None
    merged_into: str | None = None


# -- decoding --------------------------------------------------------------------------------------------------
# :class:`Event` field by field (msgpack array), attributes kept as raw msgpack: derived from the declaration.
_Row = row_struct("_Row", maps=msgspec.Raw)
_rows: msgspec.msgpack.Decoder[list[Any]] = msgspec.msgpack.Decoder(list[_Row])  # type: ignore[valid-type]
_any = msgspec.msgpack.Decoder()  # a stored attribute map (validated at ingest)
_json = msgspec.json.Encoder()
_json_any = msgspec.json.Decoder()


def _array_header(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big")  # msgpack array32


def _total(v: object) -> int | None:
    return v if type(v) is int and -TOTAL_LIMIT < v < TOTAL_LIMIT else None


def event_columns(payloads: Sequence[bytes]) -> dict[str, list[Any]]:
    """Stored event payloads (canonical msgpack :class:`Event`) → the columns of :data:`EVENT_SCHEMA` except
    ``t``/``story``/``ingest`` (``time_us`` is given instead; the caller corrects it). One decoder call for the
    whole list (the payloads are concatenated into one msgpack array), then one pass per column.

    The cyclic garbage collector is paused meanwhile (msgspec's perf tips): the attribute maps are many small
    container objects, and collections triggered by their allocation would rescan everything alive — on a large
    batch that costs more than the decoding itself."""
    paused = gc.isenabled()
    gc.disable()
    try:
        rows = _rows.decode(_array_header(len(payloads)) + b"".join(payloads))
        maps = [_any.decode(r.attrs) for r in rows]
        return {
            **{name: list(map(attrgetter(name), rows)) for name in _SCALARS},
            "attrs": [_json.encode(m).decode() for m in maps],
            "akeys": ["\x1f".join(m) for m in maps],
            "bytes": [_total(m.get("bytes")) for m in maps],
            "packets": [_total(m.get("packets")) for m in maps],
        }
    finally:
        if paused:
            gc.enable()


# -- Community ID ---------------------------------------------------------------------------------------------
_V4_PORTS = struct.Struct("!H4s4sBBHH").pack
_PORT_PROTOS = frozenset({6, 17, 132})


def story_community_id(
    proto: int, src_ip: str, src_port: int | None, dst_ip: str, dst_port: int | None, seed: int
) -> str:
    """:func:`engine.ingest.network_identity.community_id` of a stored (already validated and normalized) flow;
    IPv4 TCP/UDP/SCTP — most flows — computed directly (less than half the general function's cost), the rest by
    it."""
    if proto in _PORT_PROTOS and src_port is not None and dst_port is not None and ":" not in src_ip + dst_ip:
        a = socket.inet_pton(socket.AF_INET, src_ip)
        b = socket.inet_pton(socket.AF_INET, dst_ip)
        if a > b or (a == b and src_port > dst_port):
            a, b, src_port, dst_port = b, a, dst_port, src_port
        digest = hashlib.sha1(_V4_PORTS(seed, a, b, proto, 0, src_port, dst_port), usedforsecurity=False).digest()
        return "1:" + base64.b64encode(digest).decode("ascii")
    return community_id(proto, src_ip, src_port, dst_ip, dst_port, seed=seed)


# -- attribute merge --------------------------------------------------------------------------------------------
_MISSING: Any = object()


def merge_value(rule: str, old: Any, new: Any) -> Any:
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


def merge_attrs(rules: Mapping[str, str], maps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The attributes of one source's events (in event order) merged key by key."""
    merged: dict[str, Any] = {}
    if not rules:
        for m in maps:
            merged.update(m)
        return merged
    for m in maps:
        for k, v in m.items():
            merged[k] = merge_value(rules.get(k, "last"), merged.get(k, _MISSING), v)
    return merged


# -- JSON assembly ------------------------------------------------------------------------------------------------
_NEEDS_ESCAPE = r'["\\\x00-\x1f]'


def json_strings(s: pl.Series) -> pl.Series:
    """Each string as a JSON string literal (null → ``null``). One scan when nothing needs escaping (names and
    ids are validated printable at ingest, so that is the rule); values that do are encoded by msgspec."""
    quoted = pl.concat_str([pl.lit('"'), s, pl.lit('"')], ignore_nulls=False).fill_null("null")
    if not s.str.contains(_NEEDS_ESCAPE).any():
        return pl.select(quoted).to_series().alias(s.name)
    values = [None if v is None else _json.encode(v).decode() for v in s.to_list()]
    return pl.Series(s.name, values, pl.String).fill_null("null")


def fuse(
    events: pl.DataFrame,
    heads: pl.DataFrame,
    *,
    rules: Mapping[str, str] | None = None,
    seed: int = 0,
    cid_cache: dict[int | None, str | None] | None = None,
) -> pl.DataFrame:
    """One fused story per row of ``heads``: ``heads`` with a ``body`` column (JSON text).

    ``events`` holds exactly the events of these stories (:data:`EVENT_SCHEMA`; ``story`` is the story key,
    any orderable dtype, the same as ``heads["story"]``). ``heads`` has :data:`HEAD_SCHEMA`; ``story_id`` is what
    the body calls the story. Events are taken in (time, id) order: the order of ``event_ids`` and of the merge.
    ``cid_cache`` (flow hash → Community ID) may be kept by the caller across calls (the caller bounds it).
    """
    rules = dict(rules or {})
    cache = cid_cache if cid_cache is not None else {}
    # Sources and sensors are few: work on their codes (an Enum of the sorted names: code order = name order)
    # and quote each name once.
    source_names = events["source"].unique().sort()
    sensor_names = events["sensor"].unique().sort()
    q_source = json_strings(source_names)
    q_sensor = json_strings(sensor_names)
    ev = (
        events.with_columns(
            pl.col("source").cast(pl.Enum(source_names)).to_physical().alias("sc"),
            pl.col("sensor").cast(pl.Enum(sensor_names)).to_physical().alias("nc"),
        )
        .drop("source", "sensor", "ingest")
        .sort(["story", "t", "id"])
    )
    # rank: the story's position (ev is sorted by story). Keys built from it and the small codes are single
    # integers in (story, name) order, so the groupings below sort and group plain integers.
    n_src, n_sen = len(source_names), len(sensor_names)
    ev = ev.with_columns(json_strings(ev["id"]).alias("qid"), pl.col("story").rle_id().cast(pl.UInt64).alias("rank"))
    ev = ev.with_columns(
        (pl.col("rank") * n_src + pl.col("sc")).alias("skey"), (pl.col("rank") * n_sen + pl.col("nc")).alias("nkey")
    )
    # Attributes per (story, source). One event, or several with the same attribute names and the default rule
    # (last wins): the last event's object as it is. Otherwise merged in Python, key by key.
    per_source = (
        ev.select("skey", "akeys", "attrs")
        .sort("skey", maintain_order=True)  # stable: (time, id) order within each group
        .group_by(pl.col("skey").set_sorted(), maintain_order=True)
        .agg(
            pl.len().alias("n"),
            (pl.col("akeys").min() == pl.col("akeys").max()).alias("same_keys"),
            pl.col("attrs").last().alias("merged"),
        )
    )
    if "set" in rules.values():
        python = pl.lit(True)
    elif rules:
        python = pl.col("n") > 1
    else:
        python = (pl.col("n") > 1) & ~pl.col("same_keys")
    slow = per_source.filter(python)
    if slow.height:
        lists = ev.join(slow.select("skey"), on="skey", how="semi").group_by("skey").agg(pl.col("attrs"))
        merged = [
            _json.encode(merge_attrs(rules, [_json_any.decode(a) for a in attrs])).decode()
            for attrs in lists["attrs"].to_list()
        ]
        lists = lists.select("skey", pl.Series("slow_merged", merged, pl.String))
        per_source = per_source.join(lists, on="skey", how="left", maintain_order="left").with_columns(
            pl.coalesce("slow_merged", "merged").alias("merged")
        )
    qsource = pl.lit(q_source).gather(pl.col("skey") % n_src)
    attrs = (
        per_source.select(
            (pl.col("skey") // n_src).alias("rank"),
            pl.concat_str([qsource, pl.lit(":"), pl.col("merged")]).alias("kv"),
            qsource.alias("qsource"),
        )
        .group_by(pl.col("rank").set_sorted(), maintain_order=True)
        .agg("kv", "qsource")
        .select(
            pl.col("kv").list.join(",").alias("attrs_json"),
            pl.col("qsource").list.join(",").alias("sources_json"),
        )
    )
    sensors = (
        ev.select(pl.col("nkey").unique().sort())
        .select((pl.col("nkey") // n_sen).alias("rank"), pl.lit(q_sensor).gather(pl.col("nkey") % n_sen).alias("q"))
        .group_by(pl.col("rank").set_sorted(), maintain_order=True)
        .agg("q")
        .select(pl.col("q").list.join(",").alias("sensors_json"))
    )
    # The flow of a story is its first event's that has one. Events without a flow link to nothing today, so a
    # story either has a flow on every event or is one flowless event: the first event's flow then is the one.
    has_flow = pl.col("flow").is_not_null()
    mixed = (
        ev.group_by("story")
        .agg(pl.col("flow").null_count().alias("z"), pl.len())
        .filter((pl.col("z") > 0) & (pl.col("z") < pl.col("len")))
    )

    def flow_field(c: str) -> pl.Expr:
        return pl.col(c).filter(has_flow).first() if mixed.height else pl.col(c).first()

    direction = pl.when(pl.col("reversed")).then(pl.lit(':"b->a"')).otherwise(pl.lit(':"a->b"'))
    per_story = (
        ev.with_columns(pl.concat_str([pl.col("qid"), direction]).alias("dir"))
        .group_by("story", maintain_order=True)
        .agg(
            pl.len().alias("event_count"),
            pl.col("t").min().alias("first_seen"),
            pl.col("t").max().alias("last_seen"),
            pl.col("qid"),
            pl.col("dir"),
            pl.col("bytes").sum().alias("bytes_sum"),
            pl.col("bytes").count().alias("bytes_n"),
            pl.col("packets").sum().alias("packets_sum"),
            pl.col("packets").count().alias("packets_n"),
            *(
                flow_field(c).alias(f"f_{c}")
                for c in ("flow", "proto", "src_ip", "src_port", "dst_ip", "dst_port", "reversed")
            ),
        )
        .with_columns(pl.col("qid").list.join(",").alias("ids_json"), pl.col("dir").list.join(",").alias("dirs_json"))
        .drop("qid", "dir")
    )
    # All three come out in story order (ev is sorted by story; the groupings keep that order).
    per_story = per_story.hstack([attrs.to_series(0), attrs.to_series(1), sensors.to_series(0)])
    # The Community ID of each story's flow (from its first event with one): once per distinct flow hash, and
    # cached across calls by the caller.
    flows = per_story.filter(pl.col("f_flow").is_not_null()).unique("f_flow", keep="first")
    keys: list[int] = flows["f_flow"].to_list()
    values: list[str | None] = []
    endpoints = (flows[c].to_list() for c in ("f_proto", "f_src_ip", "f_src_port", "f_dst_ip", "f_dst_port"))
    for flow, proto, sip, sport, dip, dport in zip(keys, *endpoints, strict=True):
        cid = cache.get(flow, _MISSING)
        if cid is _MISSING:
            cid = story_community_id(proto, sip, sport, dip, dport, seed) if sip and dip else None
            cache[flow] = cid
        values.append(cid)
    cid_col = pl.col("f_flow").replace_strict(keys, values, default=None, return_dtype=pl.String).alias("cid")
    rev = pl.col("f_reversed")
    a_ip = pl.when(rev).then(pl.col("f_dst_ip")).otherwise(pl.col("f_src_ip"))
    b_ip = pl.when(rev).then(pl.col("f_src_ip")).otherwise(pl.col("f_dst_ip"))
    a_port = pl.when(rev).then(pl.col("f_dst_port")).otherwise(pl.col("f_src_port")).cast(pl.String).fill_null("null")
    b_port = pl.when(rev).then(pl.col("f_src_port")).otherwise(pl.col("f_dst_port")).cast(pl.String).fill_null("null")
    flow_json = pl.concat_str(
        [
            pl.lit('{"proto":'),
            pl.col("f_proto").cast(pl.String),
            pl.lit(',"a":{"ip":"'),
            a_ip,
            pl.lit('","port":'),
            a_port,
            pl.lit('},"b":{"ip":"'),
            b_ip,
            pl.lit('","port":'),
            b_port,
            pl.lit("}}"),
        ]
    )
    totals = pl.concat_str(
        [
            pl.when(pl.col("bytes_n") > 0).then(pl.format('"bytes":{}', pl.col("bytes_sum"))),
            pl.when(pl.col("packets_n") > 0).then(pl.format('"packets":{}', pl.col("packets_sum"))),
        ],
        separator=",",
        ignore_nulls=True,
    )
    body = pl.concat_str(
        [
            pl.lit('{"story_id":'),
            pl.col("q_story_id"),
            pl.lit(',"revision":'),
            pl.col("revision").cast(pl.String),
            pl.lit(',"final":'),
            pl.when(pl.col("final")).then(pl.lit("true")).otherwise(pl.lit("false")),
            pl.lit(',"community_id":'),
            pl.concat_str([pl.lit('"'), pl.col("cid"), pl.lit('"')]).fill_null("null"),  # base64: nothing to escape
            pl.lit(',"flow":'),
            pl.when(pl.col("cid").is_null()).then(pl.lit("null")).otherwise(flow_json),
            pl.lit(',"first_seen":'),
            pl.col("first_seen").cast(pl.String),
            pl.lit(',"last_seen":'),
            pl.col("last_seen").cast(pl.String),
            pl.lit(',"event_count":'),
            pl.col("event_count").cast(pl.String),
            pl.lit(',"event_ids":['),
            pl.col("ids_json"),
            pl.lit('],"sources":['),
            pl.col("sources_json"),
            pl.lit('],"sensors":['),
            pl.col("sensors_json"),
            pl.lit('],"directions":{'),
            pl.col("dirs_json"),
            pl.lit('},"attrs":{'),
            pl.col("attrs_json"),
            pl.lit("}"),
            pl.when(totals != "")
            .then(pl.concat_str([pl.lit(',"totals":{'), totals, pl.lit("}")]))
            .otherwise(pl.lit("")),
            pl.when(pl.col("truncated")).then(pl.lit(',"truncated":true')).otherwise(pl.lit("")),
            pl.when(pl.col("q_predecessor") != "null")
            .then(pl.concat_str([pl.lit(',"predecessor":'), pl.col("q_predecessor")]))
            .otherwise(pl.lit("")),
            pl.lit("}"),
        ]
    )
    out = heads.with_columns(
        json_strings(heads["story_id"]).alias("q_story_id"), json_strings(heads["predecessor"]).alias("q_predecessor")
    ).join(per_story.with_columns(cid_col), on="story", how="left", maintain_order="left")
    if per_story.height != heads.height or out["event_count"].null_count():
        raise ValueError("fuse: events and heads must name the same stories")
    return out.select(*HEAD_SCHEMA, body.alias("body"))


def fuse_python(
    events: list[Event],
    head: tuple[str, int, bool, bool, str | None],
    *,
    rules: Mapping[str, str] | None = None,
    seed: int = 0,
    offsets_ms: Callable[[str], int] | None = None,
) -> FusedStory:
    """The same story fused event by event in Python (the reference :func:`fuse` is tested and benchmarked
    against). ``events`` are one story's events; ``head`` is (story, revision, final, truncated, predecessor)."""
    shift = offsets_ms or (lambda _sensor: 0)
    events = sorted(events, key=lambda e: (e.time_us - shift(e.sensor) * 1000, e.id))
    ts = [e.time_us - shift(e.sensor) * 1000 for e in events]
    story, revision, final, truncated, predecessor = head
    attrs: dict[str, dict[str, Any]] = {}
    totals: dict[str, int] = {}
    by_source: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_source.setdefault(e.source, []).append(e.attrs)
        for k in TOTALS:
            v = _total(e.attrs.get(k))
            if v is not None:
                totals[k] = totals.get(k, 0) + v
    for source in sorted(by_source):
        attrs[source] = merge_attrs(dict(rules or {}), by_source[source])
    first = next((e for e in events if e.flow is not None), None)
    cid = flow = None
    if first is not None and first.proto is not None and first.src_ip and first.dst_ip:
        a = (first.dst_ip, first.dst_port) if first.reversed else (first.src_ip, first.src_port)
        b = (first.src_ip, first.src_port) if first.reversed else (first.dst_ip, first.dst_port)
        flow = {"proto": first.proto, "a": {"ip": a[0], "port": a[1]}, "b": {"ip": b[0], "port": b[1]}}
        cid = community_id(first.proto, first.src_ip, first.src_port, first.dst_ip, first.dst_port, seed=seed)
    return FusedStory(
        story,
        revision,
        final,
        cid,
        flow,
        min(ts),
        max(ts),
        len(events),
        [e.id for e in events],
        sorted({e.source for e in events}),
        sorted({e.sensor for e in events}),
        {e.id: ("b->a" if e.reversed else "a->b") for e in events},
        attrs,
        totals,
        truncated,
        predecessor,
    )
