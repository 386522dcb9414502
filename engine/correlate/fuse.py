"""Fused-story building: the events of many stories (one polars frame) → one JSON body per story.

Input: an *event frame* (:data:`EVENT_SCHEMA`; what :func:`event_columns` makes from stored payloads) whose
``story`` column says which story each event belongs to, and one *head* per story (:data:`HEAD_SCHEMA`) with what
the story builder knows of it (revision, final, truncated, predecessor, emission time). Output: the fused story
as JSON, the version 2 body declared in :mod:`engine.correlate.body` (docs/stories.md), byte for byte what
:func:`msgspec.json.encode` gives for that struct.

Two paths give the same bytes (tests/unit/test_fuse.py), chosen by size (:data:`ROWS_PATH_MAX`):

* vectorized, for large calls: everything per event runs in polars (sorting, grouping, string assembly); Python
  runs once per story only for the Community ID (SHA-1, cached per flow) and once per *(story, sensor) group with
  several events* for the attribute merge (the rules fold values key by key; a group with one event takes its
  attributes as they are, which is what every rule gives for a single value — except ``set``, so a ``set`` rule
  sends every group through the Python merge);
* story by story in Python, for small calls (most of the story builder's), where polars' fixed cost per
  operation would dominate: the columns are read once, and each body is the declared struct, encoded.

:func:`fuse_python` builds the same body from :class:`~engine.core.event.Event` objects: the plain reference the
tests and the benchmark compare both paths with.

Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from itertools import groupby
from operator import itemgetter
from typing import Any

import msgspec
import polars as pl
from msgspec.structs import astuple

from engine.core.event import Event, polars_columns, row_struct
from engine.core.gcpause import collector_paused
from engine.ingest.network_identity import community_id

from .body import Endpoint, Figures, Observer, SessionRef, StoryBody, Totals, transport_name

__all__ = [
    "EVENT_SCHEMA",
    "FIGURE_ATTRS",
    "HEAD_SCHEMA",
    "FusedStory",
    "Head",
    "event_columns",
    "fuse",
    "fuse_bodies",
    "fuse_python",
    "merge_value",
]

FIGURE_ATTRS = ("bytes", "packets", "src_bytes", "dst_bytes", "src_packets", "dst_packets")
"""The attributes fusion reads as byte and packet figures (docs/events.md): ``src_*``/``dst_*`` what the reported
source (destination) sent, ``bytes``/``packets`` both directions undivided."""
TOTAL_LIMIT = 2**43
"""An attribute counts as a figure when it is an integer (not a boolean) of magnitude below this: with at most
``correlate.max_story_events`` (≤ 1,000,000) events a story's sum stays inside int64."""

_STORED = dict(polars_columns())  # the stored fields' polars dtypes, derived from the one declaration
# The event frame: the stored fields (``time_us`` corrected into ``t`` — a span's ``end_time_us`` corrected by the
# same offset — maps as JSON text) and the frame's own
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
    **{name: pl.Int64 for name in FIGURE_ATTRS},
    "init": pl.Int8,  # the ``initiator`` attribute: 1 the reported src opened the session, -1 the dst, null: unknown
}
_SCALARS = tuple(name for name, dtype in _STORED.items() if dtype is not None)  # columns taken as stored

HEAD_SCHEMA: dict[str, Any] = {
    "story": pl.UInt64,  # the story key (events' "story"); any orderable dtype the two share
    "story_id": pl.String,
    "revision": pl.Int64,
    "final": pl.Boolean,
    "truncated": pl.Boolean,
    "predecessor": pl.String,
    "emitted_ms": pl.Int64,
}


class FusedStory(msgspec.Struct, omit_defaults=True):
    """The version 1 body, which rows written before version 2 hold (no ``body_version`` field); read-only now."""

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
_SCALAR_AT = tuple(_Row.__struct_fields__.index(name) for name in _SCALARS)  # the scalars' places in a row
_any = msgspec.msgpack.Decoder()  # a stored attribute map (validated at ingest)
_json = msgspec.json.Encoder()
_json_any = msgspec.json.Decoder()


def _array_header(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big")  # msgpack array32


def _total(v: object) -> int | None:
    return v if type(v) is int and -TOTAL_LIMIT < v < TOTAL_LIMIT else None


def _initiator(v: object) -> int | None:
    return 1 if v == "src" else -1 if v == "dst" else None


def event_columns(payloads: Sequence[bytes]) -> dict[str, list[Any]]:
    """Stored event payloads (canonical msgpack :class:`Event`) → the columns of :data:`EVENT_SCHEMA` except
    ``t``/``story``/``ingest`` (``time_us`` is given instead; the caller corrects it). One decoder call for the
    whole list (the payloads are concatenated into one msgpack array), then one pass per column.

    The cyclic garbage collector is paused meanwhile (msgspec's perf tips): the attribute maps are many small
    container objects, and collections triggered by their allocation would rescan everything alive — on a large
    batch that costs more than the decoding itself."""
    with collector_paused():
        rows = _rows.decode(_array_header(len(payloads)) + b"".join(payloads))
        maps = [_any.decode(r.attrs) for r in rows]
        fields = list(zip(*map(astuple, rows), strict=True)) if rows else [()] * len(_Row.__struct_fields__)
        lim = TOTAL_LIMIT
        return {
            **{name: list(fields[i]) for name, i in zip(_SCALARS, _SCALAR_AT, strict=True)},
            "attrs": [_json.encode(m).decode() for m in maps],
            "akeys": ["\x1f".join(m) for m in maps],
            # _total(m.get(name)), inline
            **{
                name: [v if type(v := m.get(name)) is int and -lim < v < lim else None for m in maps]
                for name in FIGURE_ATTRS
            },
            "init": [_initiator(m.get("initiator")) for m in maps],
        }


# -- Community ID ---------------------------------------------------------------------------------------------
_V4_PORTS = struct.Struct("!H4s4sBBHH").pack
_PORT_PROTOS = frozenset({6, 17, 132})
_TRANSPORT_JSON = {p: f',"transport":"{transport_name(p)}"' for p in (1, 6, 17, 58, 132)}


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


def _figures(name: str, c2s: pl.Expr, s2c: pl.Expr, total: pl.Expr) -> pl.Expr:
    """``,"name":{…}``, a :class:`~engine.correlate.body.Figures` member (empty when ``total`` is null: a direction
    is only known with a total). Nulls propagate through ``concat_str``: no branches to evaluate."""
    return pl.concat_str(
        [
            pl.lit(f',"{name}":{{'),
            pl.concat_str([pl.lit('"client_to_server":'), c2s.cast(pl.String), pl.lit(",")]).fill_null(""),
            pl.concat_str([pl.lit('"server_to_client":'), s2c.cast(pl.String), pl.lit(",")]).fill_null(""),
            pl.lit('"total":'),
            total.cast(pl.String),
            pl.lit("}"),
        ]
    ).fill_null("")


def _port_class(port: pl.Expr) -> pl.Expr:
    return pl.when(port < 1024).then(0).when(port < 32768).then(1).otherwise(2)


def _rfc3339(us: pl.Expr) -> pl.Expr:
    return pl.from_epoch(us, time_unit="us").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ")


Head = tuple[Any, str, int, bool, bool, str | None, int]
"""One story to fuse, as a row of :data:`HEAD_SCHEMA`: (story key, story_id, revision, final, truncated,
predecessor, emitted_ms)."""


def fuse_bodies(
    events: pl.DataFrame,
    heads: Sequence[Head],
    *,
    rules: Mapping[str, str] | None = None,
    seed: int = 0,
    cid_cache: dict[int | None, str | None] | None = None,
    tenant: str = "",
    vectorized: bool | None = None,
) -> list[bytes]:
    """One fused story body (JSON, the version 2 body of :mod:`engine.correlate.body`) per head, in their order.

    ``events`` holds exactly the events of these stories (:data:`EVENT_SCHEMA`; ``story`` is the story key,
    any orderable dtype, the heads' first member). Events are taken in (time, id) order: the order of
    ``event_ids`` and of the merge. ``cid_cache`` (flow hash → Community ID) may be kept by the caller across
    calls (the caller bounds it). ``vectorized``: polars column-wise (True) or Python story by story (False); by
    default the latter below :data:`ROWS_PATH_MAX` events. Both give the same bytes (tests/unit/test_fuse.py).
    """
    rules = dict(rules or {})
    cache = cid_cache if cid_cache is not None else {}
    if _story_by_story(events, vectorized):
        return _fuse_rows(events, heads, rules, seed, cache, tenant)
    frame = pl.DataFrame(heads, schema=HEAD_SCHEMA, orient="row")
    bodies: list[bytes] = _fuse_frame(events, frame, rules, seed, cache, tenant)["body"].cast(pl.Binary).to_list()
    return bodies


def _story_by_story(events: pl.DataFrame, vectorized: bool | None) -> bool:
    return events.height < ROWS_PATH_MAX if vectorized is None else not vectorized


def fuse(
    events: pl.DataFrame,
    heads: pl.DataFrame,
    *,
    rules: Mapping[str, str] | None = None,
    seed: int = 0,
    cid_cache: dict[int | None, str | None] | None = None,
    tenant: str = "",
    vectorized: bool | None = None,
) -> pl.DataFrame:
    """:func:`fuse_bodies` on a frame of heads (:data:`HEAD_SCHEMA`): ``heads`` with a ``body`` column (JSON
    text)."""
    rules = dict(rules or {})
    cache = cid_cache if cid_cache is not None else {}
    if _story_by_story(events, vectorized):
        bodies = _fuse_rows(events, heads.select(*HEAD_SCHEMA).rows(), rules, seed, cache, tenant)
        return heads.select(*HEAD_SCHEMA).with_columns(pl.Series("body", bodies, pl.Binary).cast(pl.String))
    return _fuse_frame(events, heads, rules, seed, cache, tenant)


def _fuse_frame(
    events: pl.DataFrame,
    heads: pl.DataFrame,
    rules: dict[str, str],
    seed: int,
    cache: dict[int | None, str | None],
    tenant: str,
) -> pl.DataFrame:
    """The vectorized path: ``heads`` with a ``body`` column."""
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
    # rank: the story's position (ev is sorted by story). A key built from it and the sensor's code is a single
    # integer in (story, sensor name) order, so the observers are grouped on plain integers.
    n_sen = len(sensor_names)
    ev = ev.with_columns(json_strings(ev["id"]).alias("qid"), pl.col("story").rle_id().cast(pl.UInt64).alias("rank"))
    ev = ev.with_columns((pl.col("rank") * n_sen + pl.col("nc")).alias("nkey"))

    # -- per story: times, ids, the flow (its first event's that has one), the initiator evidence --------------
    # Events without a flow link to nothing today, so a story either has a flow on every event or is one
    # flowless event: the first event's flow then is the one.
    has_flow = pl.col("flow").is_not_null()
    mixed = (
        ev.group_by("story")
        .agg(pl.col("flow").null_count().alias("z"), pl.len())
        .filter((pl.col("z") > 0) & (pl.col("z") < pl.col("len")))
    )

    def flow_field(c: str) -> pl.Expr:
        return pl.col(c).filter(has_flow).first() if mixed.height else pl.col(c).first()

    # A sensor's claim, for endpoint a of the flow's order: +1 "a opened it", -1 "b did" (init is about the
    # reported src, which is b when the event is reversed).
    claim = pl.col("init").cast(pl.Int64) * pl.when(pl.col("reversed")).then(-1).otherwise(1)
    per_story = ev.group_by("story", maintain_order=True).agg(
        pl.len().alias("event_count"),
        pl.col("t").min().alias("start_us"),
        pl.col("t").max().alias("end_us"),
        pl.col("qid").alias("ids_json"),  # joined below: list.join is faster than str.join in the agg
        (claim.filter(has_flow) if mixed.height else claim).sum().alias("vote"),
        *(
            flow_field(c).alias(f"f_{c}")
            for c in ("flow", "proto", "src_ip", "src_port", "dst_ip", "dst_port", "reversed")
        ),
    )
    per_story = per_story.with_columns(pl.col("ids_json").list.join(","))
    # The sensors' own session ids, by (sensor name, session), one JSON list per story that has any.
    with_session = ev.filter(pl.col("session").is_not_null())
    if with_session.height:
        pairs = with_session.select("story", "nc", "session").unique().sort("story", "nc", "session")
        ref = pl.concat_str(
            [
                pl.lit('{"sensor":'),
                pl.lit(q_sensor).gather(pl.col("nc")),
                pl.lit(',"session":'),
                pl.lit(json_strings(pairs["session"])),
                pl.lit("}"),
            ]
        )
        sessions = (
            pairs.select("story", ref.alias("r"))
            .group_by("story", maintain_order=True)
            .agg(pl.col("r"))
            .select("story", pl.col("r").list.join(",").alias("sessions_json"))
        )
        per_story = per_story.join(sessions, on="story", how="left", maintain_order="left")
    else:
        per_story = per_story.with_columns(pl.lit(None, pl.String).alias("sessions_json"))
    rev = pl.col("f_reversed")
    a_port = pl.when(rev).then(pl.col("f_dst_port")).otherwise(pl.col("f_src_port"))
    b_port = pl.when(rev).then(pl.col("f_src_port")).otherwise(pl.col("f_dst_port"))
    by_ports = (
        pl.col("f_proto").is_in(list(_PORT_PROTOS))
        & a_port.is_not_null()
        & b_port.is_not_null()
        & (_port_class(a_port) != _port_class(b_port))
    )
    vote = pl.col("vote")
    per_story = per_story.with_columns(
        a_port.alias("a_port"),
        b_port.alias("b_port"),
        pl.when(rev).then(pl.col("f_dst_ip")).otherwise(pl.col("f_src_ip")).alias("a_ip"),
        pl.when(rev).then(pl.col("f_src_ip")).otherwise(pl.col("f_dst_ip")).alias("b_ip"),
        pl.when(pl.col("f_flow").is_null())
        .then(None)
        .when(vote != 0)
        .then(vote < 0)
        .when(by_ports)
        .then(_port_class(a_port) < _port_class(b_port))  # a's port is the service's: b is the client
        .otherwise(rev)  # the earliest report's source (b when it is reversed)
        .alias("client_is_b"),
        pl.when(vote != 0)
        .then(pl.lit("sensor"))
        .when(by_ports)
        .then(pl.lit("service_port"))
        .otherwise(pl.lit("first_seen"))
        .alias("rule"),
    )

    # -- per event: its figures relative to client and server -------------------------------------------------
    # ev is sorted by story and per_story is in story order: a story's value is taken by its rank.
    cib = per_story["client_is_b"].gather(ev["rank"])
    sic = pl.when(has_flow).then(pl.col("reversed") == pl.col("cib"))  # the reported src is the client
    story_flow = pl.col("cib").is_not_null()
    figures = []
    for kind in ("bytes", "packets"):
        src, dst = pl.col(f"src_{kind}"), pl.col(f"dst_{kind}")
        figures += [
            pl.when(sic).then(src).when(~sic).then(dst).alias(f"c2s_{kind}"),
            pl.when(sic).then(dst).when(~sic).then(src).alias(f"s2c_{kind}"),
            pl.when(story_flow)
            .then(
                pl.coalesce(
                    pl.col(kind),
                    pl.when(src.is_not_null() | dst.is_not_null()).then(src.fill_null(0) + dst.fill_null(0)),
                )
            )
            .alias(f"tot_{kind}"),
        ]
    fig_names = [f"{d}_{kind}" for kind in ("bytes", "packets") for d in ("c2s", "s2c", "tot")]

    # -- observers: one per (story, sensor) -------------------------------------------------------------------
    by_sensor = (
        ev.with_columns(cib.alias("cib"))
        .select("nkey", "sc", "t", "akeys", "attrs", sic.cast(pl.Int8).alias("sic"), *figures)
        .sort("nkey", maintain_order=True)  # stable: (time, id) order within each group
        .group_by(pl.col("nkey").set_sorted(), maintain_order=True)
        .agg(
            pl.len().alias("n"),
            (pl.col("akeys").min() == pl.col("akeys").max()).alias("same_keys"),
            pl.col("attrs").last().alias("merged"),
            pl.col("sc").first(),
            (pl.col("sc").min() != pl.col("sc").max()).alias("several_sources"),
            pl.col("t").min().alias("first_us"),
            pl.col("t").max().alias("last_us"),
            pl.col("sic").min().alias("sic_min"),
            pl.col("sic").max().alias("sic_max"),
            *(pl.when(pl.col(f).count() > 0).then(pl.col(f).sum()).alias(f) for f in fig_names),
        )
    )
    # Attributes per observer. One event, or several with the same attribute names and the default rule (last
    # wins): the last event's object as it is. Otherwise merged in Python, key by key.
    if "set" in rules.values():
        python = pl.lit(True)
    elif rules:
        python = pl.col("n") > 1
    else:
        python = (pl.col("n") > 1) & ~pl.col("same_keys")
    slow = by_sensor.filter(python)
    if slow.height:
        lists = ev.join(slow.select("nkey"), on="nkey", how="semi").group_by("nkey").agg(pl.col("attrs"))
        merged = [
            _json.encode(merge_attrs(rules, [_json_any.decode(a) for a in attrs])).decode()
            for attrs in lists["attrs"].to_list()
        ]
        lists = lists.select("nkey", pl.Series("slow_merged", merged, pl.String))
        by_sensor = by_sensor.join(lists, on="nkey", how="left", maintain_order="left").with_columns(
            pl.coalesce("slow_merged", "merged").alias("merged")
        )
    direction = (
        pl.when(pl.col("sic_min") == 1)
        .then(pl.lit(',"reported_direction":"client_to_server"'))
        .when(pl.col("sic_max") == 0)
        .then(pl.lit(',"reported_direction":"server_to_client"'))
        .when(pl.col("sic_max").is_not_null())
        .then(pl.lit(',"reported_direction":"both"'))
        .otherwise(pl.lit(""))
    )

    # An observer whose events are of several sources (a Zeek node's conn and http records) lists them; that is
    # rare, so the list is built only for those observers.
    sources_json: pl.Expr = pl.lit("")
    several = by_sensor.filter(pl.col("several_sources"))["nkey"]
    if several.len():
        quoted = q_source.to_list()
        codes = ev.filter(pl.col("nkey").is_in(several.implode())).group_by("nkey").agg(pl.col("sc").unique().sort())
        listed = {nkey: ',"sources":[' + ",".join(quoted[c] for c in sc) + "]" for nkey, sc in codes.iter_rows()}
        sources_json = pl.col("nkey").replace_strict(list(listed), list(listed.values()), default="")
    observer_json = pl.concat_str(
        [
            pl.lit('{"sensor":'),
            pl.lit(q_sensor).gather(pl.col("nkey") % n_sen),
            pl.lit(',"source":'),
            pl.lit(q_source).gather(pl.col("sc")),
            pl.lit(',"first_us":'),
            pl.col("first_us").cast(pl.String),
            pl.lit(',"last_us":'),
            pl.col("last_us").cast(pl.String),
            pl.lit(',"events":'),
            pl.col("n").cast(pl.String),
            direction,
            _figures("bytes", pl.col("c2s_bytes"), pl.col("s2c_bytes"), pl.col("tot_bytes")),
            _figures("packets", pl.col("c2s_packets"), pl.col("s2c_packets"), pl.col("tot_packets")),
            pl.lit(',"attrs":'),
            pl.col("merged"),
            sources_json,
            pl.lit("}"),
        ]
    )
    observers = (
        by_sensor.select((pl.col("nkey") // n_sen).alias("rank"), observer_json.alias("o"), *fig_names)
        .group_by(pl.col("rank").set_sorted(), maintain_order=True)
        .agg(pl.col("o"), *(pl.col(f).max() for f in fig_names))
        .with_columns(pl.col("o").list.join(",").alias("observers_json"))  # faster than str.join in the agg
        .drop("o")
    )
    # All come out in story order (ev is sorted by story; the groupings keep that order).
    per_story = per_story.hstack(observers.drop("rank"))

    # -- the Community ID of each story's flow: once per distinct flow hash, cached across calls by the caller --
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

    # -- the body ------------------------------------------------------------------------------------------------
    cib_col = pl.col("client_is_b")

    def endpoint(b_side: pl.Expr) -> pl.Expr:
        ip = pl.when(b_side).then(pl.col("b_ip")).otherwise(pl.col("a_ip"))
        port = pl.when(b_side).then(pl.col("b_port")).otherwise(pl.col("a_port"))
        return pl.concat_str(
            [pl.lit('{"ip":"'), ip, pl.lit('","port":'), port.cast(pl.String).fill_null("null"), pl.lit("}")]
        )

    def reconciled(kind: str) -> pl.Expr:
        c2s, s2c, tot = pl.col(f"c2s_{kind}"), pl.col(f"s2c_{kind}"), pl.col(f"tot_{kind}")
        both = pl.when(c2s.is_not_null() | s2c.is_not_null()).then(c2s.fill_null(0) + s2c.fill_null(0))
        total = pl.max_horizontal(tot, both)  # nulls ignored
        return _figures(kind, c2s, s2c, total)

    totals = pl.concat_str([reconciled("bytes"), reconciled("packets")]).str.strip_prefix(",")
    transport = pl.col("f_proto").replace_strict(
        list(_TRANSPORT_JSON), list(_TRANSPORT_JSON.values()), default="", return_dtype=pl.String
    )
    flow_json = pl.concat_str(
        [
            pl.lit(',"community_id":"'),
            pl.col("cid"),  # base64: nothing to escape
            pl.lit('","proto":'),
            pl.col("f_proto").cast(pl.String),
            transport,
            pl.lit(',"client":'),
            endpoint(cib_col),
            pl.lit(',"server":'),
            endpoint(~cib_col),
            pl.lit(',"initiator_known":'),
            pl.when(pl.col("rule") == "first_seen").then(pl.lit("false")).otherwise(pl.lit("true")),
            pl.lit(',"initiator_rule":"'),
            pl.col("rule"),
            pl.lit('"'),
            pl.when(totals != "")
            .then(pl.concat_str([pl.lit(',"totals":{'), totals, pl.lit("}")]))
            .otherwise(pl.lit("")),
        ]
    )
    body = pl.concat_str(
        [
            pl.lit('{"body_version":2,"story_id":'),
            pl.col("q_story_id"),
            pl.lit(',"tenant":' + _json.encode(tenant).decode() + ',"revision":'),
            pl.col("revision").cast(pl.String),
            pl.lit(',"final":'),
            pl.when(pl.col("final")).then(pl.lit("true")).otherwise(pl.lit("false")),
            pl.lit(',"emitted_ms":'),
            pl.col("emitted_ms").cast(pl.String),
            pl.lit(',"start":"'),
            _rfc3339(pl.col("start_us")),
            pl.lit('","end":"'),
            _rfc3339(pl.col("end_us")),
            pl.lit('","start_us":'),
            pl.col("start_us").cast(pl.String),
            pl.lit(',"end_us":'),
            pl.col("end_us").cast(pl.String),
            pl.lit(',"duration_ms":'),
            ((pl.col("end_us") - pl.col("start_us")) // 1000).cast(pl.String),
            pl.lit(',"event_count":'),
            pl.col("event_count").cast(pl.String),
            pl.when(pl.col("cid").is_null()).then(pl.lit("")).otherwise(flow_json),
            pl.lit(',"observers":['),
            pl.col("observers_json"),
            pl.lit('],"event_ids":['),
            pl.col("ids_json"),
            pl.lit("]"),
            pl.when(pl.col("truncated")).then(pl.lit(',"truncated":true')).otherwise(pl.lit("")),
            pl.when(pl.col("q_predecessor") != "null")
            .then(pl.concat_str([pl.lit(',"predecessor":'), pl.col("q_predecessor")]))
            .otherwise(pl.lit("")),
            pl.concat_str([pl.lit(',"sessions":['), pl.col("sessions_json"), pl.lit("]")]).fill_null(""),
            pl.lit("}"),
        ]
    )
    out = heads.with_columns(
        json_strings(heads["story_id"]).alias("q_story_id"), json_strings(heads["predecessor"]).alias("q_predecessor")
    ).join(per_story.with_columns(cid_col), on="story", how="left", maintain_order="left")
    if per_story.height != heads.height or out["event_count"].null_count():
        raise ValueError("fuse: events and heads must name the same stories")
    return out.select(*HEAD_SCHEMA, body.alias("body"))


ROWS_PATH_MAX = 3_000
"""Below this many events :func:`fuse_bodies` builds the bodies story by story in Python (:func:`_fuse_rows`):
every polars operation has a fixed cost of tens of µs and the vectorized path runs about a hundred of them,
which is most of the work when a call fuses a few dozen stories — the story builder's usual call (a median of
64 events in ``bench.stage``). The two cost the same per event at about 3,000 events (7.7 µs on the bench's
stories, one core); above that the vectorized path is cheaper (3.8 µs at 100,000)."""

_ROW_FIELDS = (
    "story",
    "t",
    "id",
    "sensor",
    "source",
    "flow",
    "reversed",
    "proto",
    "src_ip",
    "src_port",
    "dst_ip",
    "dst_port",
    "attrs",
    "akeys",
    "init",
    *FIGURE_ATTRS,
    "session",
)
# positions in a row of _ROW_FIELDS
_T, _ID, _SENSOR, _SOURCE, _FLOW, _REV, _PROTO, _SIP, _SPORT, _DIP, _DPORT, _ATTRS, _AKEYS, _INIT = range(1, 15)
_SESSION = len(_ROW_FIELDS) - 1
_KINDS = tuple(
    (
        kind,
        15 + FIGURE_ATTRS.index(kind),
        15 + FIGURE_ATTRS.index(f"src_{kind}"),
        15 + FIGURE_ATTRS.index(f"dst_{kind}"),
    )
    for kind in ("bytes", "packets")
)


_NO_FIGURES: tuple[None, None, None] = (None, None, None)


def _fuse_rows(
    events: pl.DataFrame,
    heads: Sequence[Head],
    rules: dict[str, str],
    seed: int,
    cache: dict[int | None, str | None],
    tenant: str,
) -> list[bytes]:
    """:func:`fuse`'s bodies, built story by story in Python from the frame's columns (one ``to_list`` per
    column): the same rules as the vectorized path, and the body is the declared struct, encoded."""
    rows = sorted(zip(*(events.get_column(c).to_list() for c in _ROW_FIELDS), strict=True), key=itemgetter(0, 1, 2))
    slot = {h[0]: i for i, h in enumerate(heads)}
    out: list[bytes | None] = [None] * len(heads)
    merge_all = "set" in rules.values()
    for story, group in groupby(rows, key=itemgetter(0)):
        i = slot.get(story)
        if i is None or out[i] is not None:
            raise ValueError("fuse: events and heads must name the same stories")
        evs = list(group)
        _, sid, revision, final, truncated, predecessor, emitted_ms = heads[i]
        first = next((e for e in evs if e[_FLOW] is not None), evs[0])
        # client and server (as the vectorized path: the first event with a flow gives a and b)
        client_is_b: bool | None = None
        flow: dict[str, Any] = {}
        if first[_FLOW] is not None:
            rev = first[_REV]
            a = (first[_DIP], first[_DPORT]) if rev else (first[_SIP], first[_SPORT])
            b = (first[_SIP], first[_SPORT]) if rev else (first[_DIP], first[_DPORT])
            vote = sum(e[_INIT] * (-1 if e[_REV] else 1) for e in evs if e[_FLOW] is not None and e[_INIT] is not None)
            if vote:
                client_is_b, rule = vote < 0, "sensor"
            elif (
                first[_PROTO] in _PORT_PROTOS
                and a[1] is not None
                and b[1] is not None
                and _port_rank(a[1]) != _port_rank(b[1])
            ):
                client_is_b, rule = _port_rank(a[1]) < _port_rank(b[1]), "service_port"
            else:
                client_is_b, rule = rev, "first_seen"
            cid = cache.get(first[_FLOW], _MISSING)
            if cid is _MISSING:
                proto, sip, sport, dip, dport = first[_PROTO : _DPORT + 1]
                cid = story_community_id(proto, sip, sport, dip, dport, seed) if sip and dip else None
                cache[first[_FLOW]] = cid
            if cid is not None:
                client, server = (b, a) if client_is_b else (a, b)
                flow = {
                    "community_id": cid,
                    "proto": first[_PROTO],
                    "transport": transport_name(first[_PROTO]),
                    "client": Endpoint(*client),
                    "server": Endpoint(*server),
                    "initiator_known": rule != "first_seen",
                    "initiator_rule": rule,
                }
        per_sensor: dict[str, list[tuple[Any, ...]]] = {}
        for e in evs:
            per_sensor.setdefault(e[_SENSOR], []).append(e)
        observers: list[Observer] = []
        story_max: dict[str, list[int | None]] = {}  # per kind: the observers' largest c2s, s2c, total
        for sensor in sorted(per_sensor):
            g = per_sensor[sensor]
            extra: dict[str, Any] = {}
            if client_is_b is not None:
                sics = [e[_REV] == client_is_b for e in g if e[_FLOW] is not None]
                if sics:
                    extra["reported_direction"] = (
                        "client_to_server" if all(sics) else "server_to_client" if not any(sics) else "both"
                    )
                for kind, k_tot, k_src, k_dst in _KINDS:
                    c2s: int | None = None
                    s2c: int | None = None
                    tot: int | None = None
                    for e in g:
                        src, dst, undivided = e[k_src], e[k_dst], e[k_tot]
                        if src is None and dst is None:
                            if undivided is not None:
                                tot = undivided if tot is None else tot + undivided
                            continue
                        if e[_FLOW] is not None:
                            to_server, to_client = (src, dst) if e[_REV] == client_is_b else (dst, src)
                            if to_server is not None:
                                c2s = to_server if c2s is None else c2s + to_server
                            if to_client is not None:
                                s2c = to_client if s2c is None else s2c + to_client
                        if undivided is None:
                            undivided = (src or 0) + (dst or 0)
                        tot = undivided if tot is None else tot + undivided
                    if c2s is not None or s2c is not None or tot is not None:
                        extra[kind] = Figures(c2s, s2c, tot)
                        story_max[kind] = [
                            v if m is None else m if v is None else max(m, v)
                            for m, v in zip(story_max.get(kind, _NO_FIGURES), (c2s, s2c, tot), strict=True)
                        ]
            # One event, or several with the same attribute names and no rules (the latest wins): the latest
            # event's object as stored. Otherwise merged key by key.
            if merge_all or (len(g) > 1 and (rules or any(e[_AKEYS] != g[0][_AKEYS] for e in g))):
                attrs: Any = merge_attrs(rules, [_json_any.decode(e[_ATTRS]) for e in g])
            else:
                attrs = msgspec.Raw(g[-1][_ATTRS].encode())
            sources = sorted({e[_SOURCE] for e in g})
            observers.append(
                Observer(
                    sensor=sensor,
                    source=g[0][_SOURCE],
                    first_us=g[0][_T],
                    last_us=g[-1][_T],
                    events=len(g),
                    attrs=attrs,
                    **extra,
                    sources=sources if len(sources) > 1 else None,
                )
            )
        if flow:
            reconciled = {kind: f for kind, maxima in story_max.items() if (f := _reconciled(*maxima)) is not None}
            if reconciled:
                flow["totals"] = Totals(**reconciled)
        start_us, end_us = evs[0][_T], evs[-1][_T]
        out[i] = _json.encode(
            StoryBody(
                story_id=sid,
                tenant=tenant,
                revision=revision,
                final=final,
                emitted_ms=emitted_ms,
                start=_rfc3339_py(start_us),
                end=_rfc3339_py(end_us),
                start_us=start_us,
                end_us=end_us,
                duration_ms=(end_us - start_us) // 1000,
                event_count=len(evs),
                **flow,
                observers=observers,
                event_ids=[e[_ID] for e in evs],
                truncated=truncated,
                predecessor=predecessor,
                sessions=[SessionRef(*p) for p in sorted(pairs)]
                if (pairs := {(e[_SENSOR], e[_SESSION]) for e in evs if e[_SESSION] is not None})
                else None,
            )
        )
    if len(slot) != len(heads) or None in out:
        raise ValueError("fuse: events and heads must name the same stories")
    return out  # type: ignore[return-value]


def _ref_key(ref: SessionRef) -> tuple[str, str]:
    return ref.sensor, ref.session


def _port_rank(port: int) -> int:
    return 0 if port < 1024 else 1 if port < 32768 else 2


def _sum(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _max(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _reconciled(c2s_max: int | None, s2c_max: int | None, tot_max: int | None) -> Figures | None:
    """A story's figures of one kind from the observers' largest per direction and total (docs/stories.md): the
    directions as they are, the total the larger of the largest total and the directions added up."""
    both = None if c2s_max is None and s2c_max is None else (c2s_max or 0) + (s2c_max or 0)
    total = _max([tot_max, both])
    return None if total is None else Figures(c2s_max, s2c_max, total)


@lru_cache(maxsize=1024)
def _rfc3339_day(days: int) -> str:
    """Days since 1970-01-01 → ``YYYY-MM-DDT`` (the proleptic Gregorian calendar; arithmetic only, the module
    does not import the clock's modules)."""
    z = days + 719_468  # days since 0000-03-01
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    return f"{year:04d}-{month:02d}-{day:02d}T"


def _rfc3339_py(us: int) -> str:
    """µs since the epoch → RFC 3339 UTC with µs."""
    days, rest = divmod(us, 86_400_000_000)
    secs, micros = divmod(rest, 1_000_000)
    return f"{_rfc3339_day(days)}{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{micros:06d}Z"


def fuse_python(
    events: list[Event],
    head: tuple[str, int, bool, bool, str | None, int],
    *,
    rules: Mapping[str, str] | None = None,
    seed: int = 0,
    offsets_ms: Callable[[str], int] | None = None,
    tenant: str = "",
) -> StoryBody:
    """The same story fused event by event in Python (the reference :func:`fuse` is tested and benchmarked
    against). ``events`` are one story's events; ``head`` is (story, revision, final, truncated, predecessor,
    emitted_ms)."""
    shift = offsets_ms or (lambda _sensor: 0)
    events = sorted(events, key=lambda e: (e.time_us - shift(e.sensor) * 1000, e.id))
    ts = [e.time_us - shift(e.sensor) * 1000 for e in events]
    story, revision, final, truncated, predecessor, emitted_ms = head
    first = next((e for e in events if e.flow is not None), None)
    flow: dict[str, Any] = {}
    client_is_b: bool | None = None
    if first is not None and first.proto is not None and first.src_ip and first.dst_ip:
        a = (first.dst_ip, first.dst_port) if first.reversed else (first.src_ip, first.src_port)
        b = (first.src_ip, first.src_port) if first.reversed else (first.dst_ip, first.dst_port)
        vote = 0
        for e in events:
            init = _initiator(e.attrs.get("initiator"))
            if e.flow is not None and init is not None:
                vote += init * (-1 if e.reversed else 1)
        if vote:
            client_is_b, rule = vote < 0, "sensor"
        elif (
            first.proto in _PORT_PROTOS
            and a[1] is not None
            and b[1] is not None
            and _port_rank(a[1]) != _port_rank(b[1])
        ):
            client_is_b, rule = _port_rank(a[1]) < _port_rank(b[1]), "service_port"
        else:
            client_is_b, rule = first.reversed, "first_seen"
        client, server = (b, a) if client_is_b else (a, b)
        flow = {
            "community_id": community_id(
                first.proto, first.src_ip, first.src_port, first.dst_ip, first.dst_port, seed=seed
            ),
            "proto": first.proto,
            "transport": transport_name(first.proto),
            "client": Endpoint(*client),
            "server": Endpoint(*server),
            "initiator_known": rule != "first_seen",
            "initiator_rule": rule,
        }
    per_sensor: dict[str, list[tuple[Event, int]]] = {}
    for e, t in zip(events, ts, strict=True):
        per_sensor.setdefault(e.sensor, []).append((e, t))
    observers: list[Observer] = []
    kinds = ("bytes", "packets")
    story_figs: dict[str, list[list[int | None]]] = {k: [[], [], []] for k in kinds}
    for sensor in sorted(per_sensor):
        group = per_sensor[sensor]
        extra: dict[str, Any] = {}
        if client_is_b is not None:
            src_is_client = [e.reversed == client_is_b for e, _ in group if e.flow is not None]
            if src_is_client:
                extra["reported_direction"] = (
                    "client_to_server"
                    if all(src_is_client)
                    else "server_to_client"
                    if not any(src_is_client)
                    else "both"
                )
            for kind in kinds:
                c2s: list[int | None] = []
                s2c: list[int | None] = []
                tot: list[int | None] = []
                for e, _ in group:
                    src, dst = _total(e.attrs.get(f"src_{kind}")), _total(e.attrs.get(f"dst_{kind}"))
                    if e.flow is not None:
                        sic = e.reversed == client_is_b
                        c2s.append(src if sic else dst)
                        s2c.append(dst if sic else src)
                    undivided = _total(e.attrs.get(kind))
                    if undivided is None and (src is not None or dst is not None):
                        undivided = (src or 0) + (dst or 0)
                    tot.append(undivided)
                fig = [_sum(c2s), _sum(s2c), _sum(tot)]
                for i, v in enumerate(fig):
                    story_figs[kind][i].append(v)
                if any(v is not None for v in fig):
                    extra[kind] = Figures(*fig)
        sources = sorted({e.source for e, _ in group})
        observers.append(
            Observer(
                sensor=sensor,
                source=group[0][0].source,
                first_us=min(t for _, t in group),
                last_us=max(t for _, t in group),
                events=len(group),
                attrs=merge_attrs(dict(rules or {}), [e.attrs for e, _ in group]),
                **extra,
                sources=sources if len(sources) > 1 else None,
            )
        )
    if flow:
        reconciled: dict[str, Figures] = {}
        for kind in kinds:
            figures = _reconciled(*(_max(v) for v in story_figs[kind]))
            if figures is not None:
                reconciled[kind] = figures
        if reconciled:
            flow["totals"] = Totals(**reconciled)
    return StoryBody(
        story_id=story,
        tenant=tenant,
        revision=revision,
        final=final,
        emitted_ms=emitted_ms,
        start=_rfc3339_py(min(ts)),
        end=_rfc3339_py(max(ts)),
        start_us=min(ts),
        end_us=max(ts),
        duration_ms=(max(ts) - min(ts)) // 1000,
        event_count=len(events),
        **flow,
        observers=observers,
        event_ids=[e.id for e in events],
        truncated=truncated,
        predecessor=predecessor,
        sessions=sorted({SessionRef(e.sensor, e.session) for e in events if e.session is not None}, key=_ref_key)
        or None,
    )
