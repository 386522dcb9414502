"""Canonical events: validation reasons, normalization, ids and shard placement (pure, no database)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.config import from_mapping
from engine.core.errors import InputError
from engine.core.event import Event, EventView, decode, decode_view, encode
from engine.ingest.canonical import ParseRules, parse_line, shard_of
from engine.ingest.network_identity import flow_identity, flow_key, flow_key_bytes

CFG = from_mapping({"tenant": "t", "max_event_bytes": 4096, "chunk_bytes": 1024, "store": {"page_bytes_max": 1 << 20}})
NOW_MS = 1_790_000_000_000  # 2026-09-21
T = 1_789_990_000


def line(**fields: object) -> bytes:
    base: dict[str, object] = {
        "source": "firewall",
        "time": T,
        "proto": "tcp",
        "src_ip": "10.0.0.2",
        "src_port": 51000,
        "dst_ip": "10.0.0.1",
        "dst_port": 443,
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def parse(raw: bytes) -> Event:
    return parse_line(raw, ParseRules.from_config(CFG), NOW_MS)


BAD: list[tuple[str, bytes, str]] = [
    ("invalid json", b'{"source": "x", "time": ', "json"),
    ("trailing garbage", line() + b" x", "json"),
    ("invalid utf-8 outside strings", b"\xff" + line(), "json"),
    ("invalid utf-8 inside a string", line(source="fw").replace(b'"fw"', b'"f\xc3\x28"'), "json"),
    ("not an object", b"[1, 2]", "json"),
    ("missing source", line(source=...), "source"),
    ("missing time", line(time=...), "time"),
    ("empty source", line(source=""), "source"),
    ("source of wrong type", line(source=5), "source"),
    ("time boolean", line(time=True), "time"),
    ("time unparseable", line(time="yesterday"), "time"),
    ("time without offset", line(time="2026-09-01T10:00:00"), "time"),
    ("time before 2000", line(time=946_684_799), "time"),
    ("time far future", line(time=NOW_MS // 1000 + 86_401), "time"),
    ("time in milliseconds", line(time=1_789_990_000_000), "time"),
    ("unknown protocol", line(proto="tcpp"), "proto"),
    ("protocol out of range", line(proto=256), "proto"),
    ("bad source ip", line(src_ip="10.0.0.300"), "src_ip"),
    ("bad destination ip", line(dst_ip="not-an-ip"), "dst_ip"),
    ("mixed families", line(dst_ip="2001:db8::1"), "dst_ip"),
    ("port out of range", line(dst_port=65536), "dst_port"),
    ("negative port", line(src_port=-1), "src_port"),
    ("port as string", line(src_port="80"), "src_port"),
    ("port as float", line(src_port=80.0), "src_port"),
    ("missing port for tcp", line(dst_port=...), "dst_port"),
    ("ports on a portless protocol", line(proto="gre"), "src_port"),
    ("icmp without type", line(proto="icmp", src_port=..., dst_port=...), "src_port"),
    ("icmp type out of range", line(proto="icmp", src_port=300, dst_port=0), "src_port"),
    ("flow fields incomplete", line(dst_ip=...), "dst_ip"),
    ("ports without a flow", line(proto=..., src_ip=..., dst_ip=...), "proto"),
    ("unknown field", line(severity="high"), "severity"),
    ("attrs not an object", line(attrs=[1, 2]), "attrs"),
    ("empty id", line(id=""), "id"),
    ("line too long", line(attrs={"blob": "x" * 5000}), "line"),
]


@pytest.mark.parametrize(("case", "raw", "field"), BAD, ids=[c for c, _, _ in BAD])
def test_bad_input_is_rejected_with_a_reason_naming_the_field(case: str, raw: bytes, field: str) -> None:
    with pytest.raises(InputError) as info:
        parse(raw)
    assert str(info.value).startswith(f"{field}:"), f"{case}: {info.value}"


def test_good_event_is_normalized() -> None:
    ev = parse(line(proto="TCP", src_ip="2001:DB8:0:0::2", dst_ip="2001:db8::1", sensor=None, attrs={"b": 1}))
    assert ev.proto == 6
    assert (ev.src_ip, ev.dst_ip) == ("2001:db8::2", "2001:db8::1")
    assert ev.sensor == "firewall"  # defaults to the source
    assert ev.time_us == T * 1_000_000
    assert ev.reversed  # 2001:db8::2 → ::1 runs from endpoint b to endpoint a
    assert decode(encode(ev)) == ev
    view = decode_view(encode(ev))
    assert (view.id, view.flow, view.reversed, view.time_us) == (ev.id, ev.flow, ev.reversed, ev.time_us)


def test_epoch_and_rfc3339_forms_of_one_instant_give_one_id() -> None:
    a = parse(line(time=1_789_990_000.25, attrs={"x": 1, "y": [1, 2]}))
    b = parse(line(time="2026-09-21T11:26:40.25Z", attrs={"y": [1, 2], "x": 1}))
    c = parse(line(time="2026-09-21T13:26:40.250000+02:00", proto=6, attrs={"y": [1, 2], "x": 1}))
    assert a.time_us == b.time_us == c.time_us == 1_789_990_000_250_000
    assert a.id == b.id == c.id
    assert parse(line(time=1_789_990_000.26)).id != a.id


def test_derived_id_and_shard_golden_values() -> None:
    # Pinned: changing the id derivation, the flow key bytes or the shard mapping would misplace stored data.
    assert parse(line()).id == "05e6af6b998eabe8d49a7f94da722fbd"
    golden = {
        (6, "10.0.0.2", 51000, "10.0.0.1", 443): (15550378958470293879, 7, 119),
        (17, "192.0.2.10", 53, "10.1.2.3", 40000): (185908505433220513, 1, 161),
        (1, "10.0.0.1", 8, "10.0.0.2", 0): (12070878680402980621, 13, 13),
        (58, "2001:db8::1", 128, "2001:db8::2", 0): (10407246444829284111, 15, 15),
        (47, "192.0.2.1", None, "192.0.2.2", None): (4960722303793593237, 5, 149),
    }
    protos = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp", 47: "gre"}
    for (proto, sip, sport, dip, dport), (flow, s16, s256) in golden.items():
        fields: dict[str, object] = {"proto": protos[proto], "src_ip": sip, "dst_ip": dip}
        fields["src_port"] = sport if sport is not None else ...
        fields["dst_port"] = dport if dport is not None else ...
        ev = parse(line(**fields))
        assert (ev.flow, shard_of(ev, 16), shard_of(ev, 256)) == (flow, s16, s256), (proto, sip)


def test_explicit_id_is_kept() -> None:
    assert parse(line(id="sensor-42/abc")).id == "sensor-42/abc"


def test_reverse_direction_shares_flow_and_shard() -> None:
    fwd = parse(line())
    rev = parse(line(src_ip="10.0.0.1", src_port=443, dst_ip="10.0.0.2", dst_port=51000))
    assert fwd.flow == rev.flow and fwd.reversed != rev.reversed
    assert shard_of(fwd, 256) == shard_of(rev, 256)
    assert fwd.id != rev.id


def test_events_without_flow_shard_by_id() -> None:
    ev = parse(line(proto=..., src_ip=..., dst_ip=..., src_port=..., dst_port=..., id="lonely"))
    assert ev.flow is None and ev.proto is None
    assert 0 <= shard_of(ev, 16) < 16


ips4 = st.ip_addresses(v=4).map(str)
ips6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(
    proto=st.sampled_from([6, 17, 132]),
    pair=st.one_of(st.tuples(ips4, ips4), st.tuples(ips6, ips6)),
    sport=ports,
    dport=ports,
)
def test_flow_identity_is_symmetric_and_matches_the_flow_key(
    proto: int, pair: tuple[str, str], sport: int, dport: int
) -> None:
    a, b = pair
    s1, d1, k1, r1 = flow_identity(proto, a, sport, b, dport)
    s2, d2, k2, r2 = flow_identity(proto, b, dport, a, sport)
    assert k1 == k2
    assert k1 == flow_bytes(proto, a, sport, b, dport)
    if (a, sport) != (b, dport) and not (pack(a) == pack(b) and sport == dport):
        assert r1 != r2
    assert (s1, d1) == (s2, d2)[::-1]


odd_ips4 = st.one_of(
    ips4,
    st.sampled_from(["01.2.3.4", "1.2.3", "1.2.3.4 ", " 1.2.3.4", "1.2.3.256", "1.2.3.4.5", "0x1.2.3.4", "1.2.3.٤"]),
)


@settings(max_examples=400, deadline=None)
@given(
    proto=st.one_of(st.sampled_from([6, 17, 132, 1, 47, "tcp"]), st.integers(0, 255)),
    a=odd_ips4,
    b=st.one_of(odd_ips4, st.sampled_from(["::1", "2001:db8::1"])),
    sport=st.one_of(ports, st.sampled_from([None, -1, 65536, True])),
    dport=st.one_of(ports, st.sampled_from([None, -1, 65536, False])),
)
def test_flow_identitys_ipv4_short_path_equals_the_general_path(
    proto: int | str, a: str, b: str, sport: int | None, dport: int | None
) -> None:
    from engine.core.errors import InputError
    from engine.ingest.network_identity import _flow_identity

    try:
        expected: object = _flow_identity(proto, a, sport, b, dport)
    except InputError as exc:
        expected = str(exc)
    try:
        got: object = flow_identity(proto, a, sport, b, dport)
    except InputError as exc:
        got = str(exc)
    assert got == expected


def flow_bytes(proto: int, a: str, sport: int, b: str, dport: int) -> bytes:
    return flow_key_bytes(flow_key(proto, a, sport, b, dport)[0])


def pack(ip: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(ip).packed


# -- the one declaration and its derived forms (issue 15) ------------------------------------------------------
GOLDEN_EVENT = bytes.fromhex(
    "9ca26531cf00060a2418202240a26677a466772d31cffffffffffffffffbc306a831302e302e302e31cdc822a831302e302e302e32"
    "cd01bb83a56279746573cd04b0a6616374696f6ea5616c6c6f77a16e920181a178c0"
)
GOLDEN_PARSED = bytes.fromhex(
    "9cd9203733646135323764363932383766383733333361313833643238333833663732cf000661cbf071a920a3646e73a27331cf"
    "94677b99eab38973c211a831302e312e312e31cd14e9a831302e312e312e323581a171a9612e6578616d706c65"
)


def test_the_wire_bytes_are_those_of_the_first_version() -> None:
    """Bytes captured from the code before the schema was declared once (the event struct written by hand):
    the same event encodes to the same bytes, and the same line to the same derived id and bytes."""
    e = Event(
        "e1", 1_700_000_000_123_456, "fw", "fw-1", 2**64 - 5, True, 6, "10.0.0.1", 51234, "10.0.0.2", 443,
        {"bytes": 1200, "action": "allow", "n": [1, {"x": None}]},
    )  # fmt: skip
    assert encode(e) == GOLDEN_EVENT
    assert decode(GOLDEN_EVENT) == e
    line = (
        b'{"source":"dns","time":"2026-12-04T10:00:00.5Z","proto":"udp","src_ip":"10.1.1.1","src_port":5353,'
        b'"dst_ip":"10.1.1.2","dst_port":53,"sensor":"s1","attrs":{"q":"a.example"}}'
    )
    parsed = parse_line(line, ParseRules.from_config(from_mapping({"tenant": "x"})), 1_796_400_000_000)
    assert parsed.id == "73da527d69287f87333a183d28383f72"
    assert encode(parsed) == GOLDEN_PARSED
    # validation needs its rules only, not a tenant's whole config: the defaults are the config's
    assert parse_line(line, ParseRules(), 1_796_400_000_000) == parsed
    small = ParseRules.from_config(
        from_mapping({"tenant": "x", "max_event_bytes": 2048, "chunk_bytes": 1024, "ingest": {"max_future_ms": 0}})
    )
    assert (small.max_event_bytes, small.max_future_ms) == (2048, 0)
    with pytest.raises(InputError, match="too far in the future"):
        parse_line(line, small, 1_796_378_400_500 - 60_000)  # the event is 60 s ahead of "now"


def test_every_derived_form_follows_the_declaration() -> None:
    import msgspec
    import polars as pl

    from engine.core.event import FIELDS, VIEW_FIELDS, polars_columns
    from engine.correlate import fuse

    names = [f.name for f in FIELDS]
    types = [f.type for f in FIELDS]
    assert names == list(Event.__struct_fields__)
    # the view: the first fields, same names and types, and it decodes a stored event
    view = msgspec.structs.fields(EventView)
    assert [(f.name, f.type) for f in view] == list(zip(names, types, strict=False))[:VIEW_FIELDS]
    assert decode_view(GOLDEN_EVENT) == EventView(*(getattr(decode(GOLDEN_EVENT), n) for n in names[:VIEW_FIELDS]))
    # the fusion row: every field in order, the same types except maps (raw msgpack)
    row = msgspec.structs.fields(fuse._Row)
    assert [f.name for f in row] == names
    assert [f.type for f in row] == [t if n != "attrs" else msgspec.Raw for n, t in zip(names, types, strict=True)]
    # the polars frame: every stored scalar field has its column with the declared dtype (time_us as "t")
    dtypes = dict(polars_columns())
    assert dtypes["flow"] == "UInt64" and dtypes["attrs"] is None
    for name, dtype in dtypes.items():
        if dtype is not None:
            assert fuse.EVENT_SCHEMA["t" if name == "time_us" else name] == getattr(pl, dtype), name
    cols = fuse.event_columns([GOLDEN_EVENT])
    assert set(cols) | {"t", "story", "ingest"} == set(fuse.EVENT_SCHEMA) | {"time_us"}


def test_a_field_added_without_a_default_is_refused() -> None:
    import msgspec

    from engine.core.event import check_evolution

    class Grown(Event, frozen=True, array_like=True, gc=False):
        vlan: int | None = None

    check_evolution(Grown)  # a trailing field with a default: fine
    old = encode(decode(GOLDEN_EVENT))
    assert msgspec.msgpack.decode(old, type=Grown).vlan is None  # events stored before it still decode

    # msgspec itself refuses a required field after the defaulted ones; kw_only gets past it, check_evolution not
    with pytest.raises(TypeError, match="cannot follow optional fields"):

        class Plain(Event, frozen=True, array_like=True, gc=False):
            vlan: int  # type: ignore[misc]

    class Bad(Event, frozen=True, array_like=True, gc=False, kw_only=True):
        vlan: int

    with pytest.raises(TypeError, match=r"Bad\.vlan: a field added to the stored event needs a default"):
        check_evolution(Bad)


def test_session_and_end_time_are_stored_only_when_set_and_join_the_id_only_then() -> None:
    """Issue 18: the event grew ``session`` and ``end_time_us`` at the end. An event without them keeps the first
    version's bytes and id; with them, the array holds up to its last set field."""
    import msgspec

    from engine.ingest.canonical import ParseRules, parse_line

    base = decode(GOLDEN_EVENT)
    both = msgspec.structs.replace(base, session="CAbc1", end_time_us=base.time_us + 5)
    only = msgspec.structs.replace(base, session="CAbc1")
    assert encode(both)[0] == 0x9E and decode(encode(both)) == both
    assert encode(only)[0] == 0x9D and decode(encode(only)) == only
    assert encode(msgspec.structs.replace(base, end_time_us=7))[0] == 0x9E  # a None before a set field stays
    now = 1_764_900_000_000
    plain = (
        b'{"source":"zeek.conn","time":1764800000.5,"proto":"tcp","src_ip":"10.0.0.1","src_port":1,'
        b'"dst_ip":"10.0.0.2","dst_port":2}'
    )
    with_session = plain[:-1] + b',"session":"CAbc1","end_time":1764800002.5}'
    a, b = parse_line(plain, ParseRules(), now), parse_line(with_session, ParseRules(), now)
    assert a.session is None and (b.session, b.end_time_us) == ("CAbc1", 1_764_800_002_500_000)
    assert a.id != b.id and a.flow == b.flow
    with pytest.raises(InputError, match=r"^end_time: .* is before time"):
        parse_line(plain[:-1] + b',"end_time":1764799999}', ParseRules(), now)
    with pytest.raises(InputError, match=r"^end_time: 'soon' is not RFC 3339"):
        parse_line(plain[:-1] + b',"end_time":"soon"}', ParseRules(), now)
    with pytest.raises(InputError, match=r"^session: must be 1\.\.256 printable"):
        parse_line(plain[:-1] + b',"session":""}', ParseRules(), now)
