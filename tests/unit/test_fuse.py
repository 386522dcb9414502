"""The vectorized fused-story builder against the per-story Python reference, on generated events."""

from __future__ import annotations

from typing import Any

import msgspec
import polars as pl
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.event import Event, decode, encode
from engine.correlate.body import decode_body
from engine.correlate.fuse import (
    EVENT_SCHEMA,
    HEAD_SCHEMA,
    event_columns,
    fuse,
    fuse_python,
    json_strings,
    story_community_id,
)
from engine.ingest.network_identity import community_id, flow_identity

NAMES = st.sampled_from(["fw", "edr", "dns", 'q"uote', "back\\slash", "ünï", "tab\there", "ctl\x01"])
VALUES = st.one_of(
    st.integers(-(2**45), 2**45),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
)
FIGURES = ["bytes", "packets", "src_bytes", "dst_bytes", "src_packets", "dst_packets"]
ATTRS = st.dictionaries(
    st.sampled_from([*FIGURES, "initiator", "action", "rule", "host", "n"]),
    st.one_of(VALUES, st.sampled_from(["src", "dst"])),
    max_size=5,
)
FLOWS = [
    (6, "10.0.0.1", 40000, "10.0.0.2", 443),
    (6, "10.0.0.2", 443, "10.0.0.1", 40000),  # the same flow, reported reversed
    (17, "192.168.1.9", 53, "192.168.1.1", 5353),
    (6, "2001:db8::1", 1234, "2001:db8::2", 80),
    (1, "10.1.1.1", 8, "10.1.1.2", 0),  # ICMP echo: type/code in the ports
    (47, "10.2.2.2", None, "10.2.2.1", None),  # GRE: portless
    None,  # no flow fields
]


@st.composite
def events(draw: st.DrawFn) -> Event:
    n = draw(st.integers(0, 10_000))
    flow = draw(st.sampled_from(FLOWS))
    source = draw(NAMES)
    sensor = draw(st.one_of(NAMES, st.just(source)))
    if draw(st.booleans()):  # a fixed schema (the usual case: one sensor type, one set of names)
        attrs = {"action": draw(VALUES), "bytes": draw(VALUES), "rule": draw(st.text(max_size=3))}
    elif draw(st.booleans()):  # directional figures, as firewalls and flow logs report them
        attrs = {
            f"{side}_{kind}": draw(st.integers(0, 10**9))
            for side in ("src", "dst")
            for kind in ("bytes", "packets")
            if draw(st.booleans())
        } | ({"initiator": draw(st.sampled_from(["src", "dst"]))} if draw(st.booleans()) else {})
    else:
        attrs = draw(ATTRS)
    time_us = 1_790_000_000_000_000 + draw(st.integers(0, 5)) * 1_000_000  # ties in time are common
    session = draw(st.one_of(st.none(), st.sampled_from(["C1", "C2", "4242", 'q"uote'])))  # a sensor's session id
    if flow is None:
        return Event(f"e{n}", time_us, source, sensor, None, False, None, None, None, None, None, attrs, session)
    proto, sip, sport, dip, dport = flow
    sip_n, dip_n, key, rev = flow_identity(proto, sip, sport, dip, dport)
    return Event(
        f"e{n}",
        time_us,
        source,
        sensor,
        xxhash.xxh64_intdigest(key),
        rev,
        proto,
        sip_n,
        sport,
        dip_n,
        dport,
        attrs,
        session,
    )


def frame_of(evs: list[Event], story_of: dict[str, int]) -> pl.DataFrame:
    cols = event_columns([encode(e) for e in evs])
    t = cols.pop("time_us")
    return pl.DataFrame(
        {**cols, "t": t, "story": [story_of[e.id] for e in evs], "ingest": [0] * len(evs)}, schema=EVENT_SCHEMA
    )


RULES: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.just({}),
    st.dictionaries(
        st.sampled_from(["bytes", "packets", "action", "rule", "host", "n"]),
        st.sampled_from(["first", "last", "sum", "min", "max", "set"]),
        max_size=3,
    ),
)


@pytest.mark.parametrize("vectorized", [True, False], ids=["polars", "rows"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), min_size=1, max_size=25, unique_by=lambda e: e.id), st.integers(1, 5), RULES, st.data())
def test_fuse_equals_the_python_reference(
    vectorized: bool, evs: list[Event], n_stories: int, rules: dict[str, str], data: Any
) -> None:
    """Both of fuse's paths — column-wise in polars (large calls) and story by story (small ones) — give the
    reference's bytes."""
    story_of = {e.id: data.draw(st.integers(0, n_stories - 1)) for e in evs}
    keys = sorted(set(story_of.values()))
    heads_rows = [(k, f"s-{k}", k + 1, k % 2 == 0, k == 1, "s-pred" if k == 2 else None, 1000 * k) for k in keys]
    heads = pl.DataFrame(heads_rows, schema=HEAD_SCHEMA, orient="row")
    out = fuse(frame_of(evs, story_of), heads, rules=rules, seed=3, tenant="t1", vectorized=vectorized)
    assert out.columns == [*HEAD_SCHEMA, "body"]
    assert out["story_id"].to_list() == [h[1] for h in heads_rows]
    for (_, sid, *head), body in zip(heads_rows, out["body"].to_list(), strict=True):
        members = [e for e in evs if f"s-{story_of[e.id]}" == sid]
        want = fuse_python(members, (sid, *head), rules=rules, seed=3, tenant="t1")
        # Byte for byte what the declared struct encodes to, and it decodes as that struct.
        assert body.encode() == msgspec.json.encode(want)
        assert decode_body(body) == want


@pytest.mark.parametrize("vectorized", [True, False], ids=["polars", "rows"])
def test_events_and_heads_must_name_the_same_stories(vectorized: bool) -> None:
    e = Event("e1", 1, "fw", "fw", None, False, None, None, None, None, None, {})
    heads = pl.DataFrame([(1, "s1", 1, True, False, None, 0)], schema=HEAD_SCHEMA, orient="row")
    with pytest.raises(ValueError, match="same stories"):
        fuse(frame_of([e], {"e1": 2}), heads, vectorized=vectorized)
    heads2 = pl.DataFrame(
        [(2, "s2", 1, True, False, None, 0), (3, "s3", 1, True, False, None, 0)], schema=HEAD_SCHEMA, orient="row"
    )
    with pytest.raises(ValueError, match="same stories"):
        fuse(frame_of([e], {"e1": 2}), heads2, vectorized=vectorized)


def test_event_columns_round_trip() -> None:
    sip, dip, _key, rev = flow_identity(6, "10.0.0.9", 999, "10.0.0.1", 22)
    e = Event("x", 5, "fw", "fw-1", 7, rev, 6, sip, 999, dip, 22, {"bytes": 10, "packets": True, "z": [1, {"a": None}]})
    cols = event_columns([encode(e)])
    assert cols["id"] == ["x"] and cols["time_us"] == [5] and cols["reversed"] == [rev]
    assert msgspec.json.decode(cols["attrs"][0]) == e.attrs == decode(encode(e)).attrs
    assert cols["akeys"] == ["bytes\x1fpackets\x1fz"]
    assert cols["bytes"] == [10] and cols["packets"] == [None]  # a boolean is not a count


def test_json_strings_escapes_what_needs_it() -> None:
    s = pl.Series("s", ["plain", 'a"b', "c\\d", "e\x01f", None])
    out = json_strings(s).to_list()
    assert [msgspec.json.decode(v) for v in out] == ["plain", 'a"b', "c\\d", "e\x01f", None]
    assert json_strings(pl.Series("s", ["ok"])).to_list() == ['"ok"']


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([6, 17, 132]),
    st.ip_addresses(v=4),
    st.integers(0, 65535),
    st.ip_addresses(v=4),
    st.integers(0, 65535),
    st.integers(0, 65535),
)
def test_story_community_id_fast_path(proto: int, a: Any, ap: int, b: Any, bp: int, seed: int) -> None:
    expected = community_id(proto, str(a), ap, str(b), bp, seed=seed)
    assert story_community_id(proto, str(a), ap, str(b), bp, seed) == expected
    assert story_community_id(proto, str(a), ap, str(a), bp, seed) == community_id(
        proto, str(a), ap, str(a), bp, seed=seed
    )
