"""Suricata EVE in (issue 18): records written by the team from EVE's documented layouts (no copied log files),
the canonical events they become, and malformed variants rejected naming the field."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import InputError
from engine.core.event import Event, encode
from engine.ingest import canonical
from engine.ingest.canonical import ParseRules, json_fits
from engine.ingest.eve import looks_like_eve
from engine.ingest.formats import LineParser
from engine.ingest.network_identity import community_id

NOW_MS = int(time.time() * 1000)
RULES = ParseRules()


def stamp(offset_s: float, tz: str = "+0100") -> str:
    """An EVE timestamp: the sensor's local time with an offset without a colon (here UTC+1 unless told)."""
    hours = int(tz[1:3]) * (1 if tz[0] == "+" else -1)
    t = NOW_MS / 1000 - 3600 + offset_s + hours * 3600
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}{tz}"


def utc_us(text: str) -> int:
    import datetime as dt

    return (dt.datetime.fromisoformat(text) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


TUPLE = {"src_ip": "10.0.0.5", "src_port": 52100, "dest_ip": "93.184.216.34", "dest_port": 443, "proto": "TCP"}


def parse(
    *records: Mapping[str, object], sensor: str | None = None, seed: int = 0
) -> tuple[list[Event | None], LineParser]:
    return parse_lines([json.dumps(r).encode() for r in records], sensor, seed)


def parse_lines(lines: list[bytes], sensor: str | None = None, seed: int = 0) -> tuple[list[Event | None], LineParser]:
    parser = LineParser("auto", sensor, seed)
    return [parser(line, RULES, NOW_MS) for line in lines], parser


def test_flow_alert_and_app_layer_records_become_flow_events() -> None:
    start, end = stamp(0), stamp(30)
    flow = {
        "timestamp": stamp(95),
        "flow_id": 1234567890123,
        "event_type": "flow",
        "host": "ids-dmz",
        **TUPLE,
        "app_proto": "tls",
        "flow": {
            "pkts_toserver": 20,
            "pkts_toclient": 18,
            "bytes_toserver": 2400,
            "bytes_toclient": 48000,
            "start": start,
            "end": end,
            "age": 30,
            "state": "closed",
            "reason": "timeout",
            "alerted": True,
        },
        "community_id": community_id(6, "10.0.0.5", 52100, "93.184.216.34", 443),
    }
    alert = {
        "timestamp": stamp(5),
        "flow_id": 1234567890123,
        "event_type": "alert",
        "host": "ids-dmz",
        "src_ip": "93.184.216.34",
        "src_port": 443,
        "dest_ip": "10.0.0.5",
        "dest_port": 52100,
        "proto": "TCP",
        "direction": "to_client",
        "alert": {
            "action": "allowed",
            "gid": 1,
            "signature_id": 2013028,
            "rev": 7,
            "signature": "ET POLICY curl",
            "category": "Potential Corporate Privacy Violation",
            "severity": 2,
        },
    }
    tls = {
        "timestamp": stamp(1),
        "flow_id": 1234567890123,
        "event_type": "tls",
        **TUPLE,
        "tls": {
            "subject": "CN=example.org",
            "issuerdn": "CN=Example CA",
            "sni": "example.org",
            "version": "TLS 1.3",
            "notbefore": "2026-01-01T00:00:00",
            "notafter": "2027-01-01T00:00:00",
        },
    }
    (f, a, t), parser = parse(flow, alert, tls)
    assert f is not None and a is not None and t is not None
    assert (f.source, f.sensor, f.proto, f.src_ip, f.src_port, f.dst_ip, f.dst_port) == (
        "suricata.flow",
        "ids-dmz",
        6,
        "10.0.0.5",
        52100,
        "93.184.216.34",
        443,
    )
    assert f.time_us == utc_us(start)  # the flow's start, not when the record was written; the offset applied
    assert f.attrs["initiator"] == "src" and f.attrs["src_bytes"] == 2400 and f.attrs["dst_bytes"] == 48000
    assert f.attrs["src_packets"] == 20 and f.attrs["dst_packets"] == 18
    assert f.session == "1234567890123" and "flow_id" not in f.attrs and f.attrs["flow"]["state"] == "closed"
    assert f.end_time_us == utc_us(end)
    assert parser.eve.community_id_mismatches == 0
    odd = json.loads(json.dumps(flow))
    odd["flow"].update(bytes_toserver=True, pkts_toserver="20")  # not counts: left in the flow object only
    (g,), _ = parse(odd)
    assert g is not None and "src_bytes" not in g.attrs and "src_packets" not in g.attrs
    assert g.attrs["dst_bytes"] == 48000 and g.attrs["flow"]["bytes_toserver"] is True
    assert a.source == "suricata.alert" and a.attrs["initiator"] == "dst"  # the packet came from the server
    assert a.attrs["alert"]["signature_id"] == 2013028 and a.flow == f.flow  # one flow, whichever direction
    assert t.attrs["initiator"] == "src" and t.sensor == "suricata" and t.attrs["tls"]["sni"] == "example.org"


def test_icmp_netflow_dns_stats_and_a_flowless_anomaly() -> None:
    icmp = {
        "timestamp": stamp(0, "-0800"),
        "event_type": "flow",
        "src_ip": "2001:db8::1",
        "dest_ip": "2001:db8::2",
        "proto": "IPv6-ICMP",
        "icmp_type": 128,
        "icmp_code": 0,
        "flow": {"start": stamp(0, "-0800"), "pkts_toserver": 1, "pkts_toclient": 1},
    }
    netflow = {
        "timestamp": stamp(3),
        "event_type": "netflow",
        **{**TUPLE, "proto": "UDP", "dest_port": 53},
        "netflow": {"pkts": 1, "bytes": 74, "start": stamp(2), "end": stamp(2), "age": 0},
    }
    dns3 = {
        "timestamp": stamp(2),
        "event_type": "dns",
        **{**TUPLE, "proto": "UDP", "dest_port": 53},
        "dns": {
            "version": 3,
            "type": "response",
            "rcode": "NOERROR",
            "queries": [{"rrname": "example.org", "rrtype": "A"}],
            "answers": [{"rrname": "example.org", "rrtype": "A", "ttl": 60, "rdata": "93.184.216.34"}],
        },
    }
    stats = {"timestamp": stamp(4), "event_type": "stats", "stats": {"uptime": 100}}
    anomaly = {
        "timestamp": stamp(4),
        "event_type": "anomaly",
        "anomaly": {"type": "decode", "event": "decoder.ethernet.pkt_too_small"},
    }
    (i, n, d, s, an), _ = parse(icmp, netflow, dns3, stats, anomaly)
    assert i is not None and (i.proto, i.src_port, i.dst_port) == (58, 128, 0)
    assert i.attrs["src_packets"] == 1 and i.attrs["initiator"] == "src"
    assert n is not None and n.proto == 17 and n.attrs["src_bytes"] == 74 and "initiator" not in n.attrs
    assert n.time_us == utc_us(stamp(2))
    assert d is not None and "initiator" not in d.attrs and d.attrs["dns"]["queries"][0]["rrname"] == "example.org"
    assert s is None  # stats: no network event, skipped
    assert an is not None and an.flow is None and an.source == "suricata.anomaly"


def test_a_community_id_that_disagrees_is_counted() -> None:
    rec = {
        "timestamp": stamp(0),
        "event_type": "http",
        **TUPLE,
        "community_id": community_id(6, "10.0.0.5", 52100, "93.184.216.34", 443, seed=7),
        "http": {"hostname": "example.org"},
    }
    _, parser = parse(rec, rec)
    assert parser.eve.community_id_mismatches == 2 and "Storyline 1:" in (parser.eve.first_mismatch or "")
    _, agreeing = parse(rec, seed=7)
    assert agreeing.eve.community_id_mismatches == 0


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"timestamp": "2026-12-05T10:00:00.000000+0100", **TUPLE}, r"^event_type: required"),
        ({"event_type": "flow", **TUPLE}, r"^timestamp: required"),
        ({"timestamp": "yesterday", "event_type": "http", **TUPLE}, r"^time: 'yesterday' is not RFC 3339"),
        ({"timestamp": "2026-12-05T10:00:00", "event_type": "http", **TUPLE}, r"^time: .* has no UTC offset"),
        ({"timestamp": "2026-12-05T10:00:00+0100", "event_type": "http", **{**TUPLE, "proto": "XYZ"}}, r"^proto:"),
        (
            {"timestamp": "2026-12-05T10:00:00+0100", "event_type": "http", **{**TUPLE, "src_port": "443"}},
            r"^src_port: expected an integer",
        ),
        ({"timestamp": "2026-12-05T10:00:00+0100", "event_type": "http", **{**TUPLE, "dest_ip": "1.2.3"}}, r"^dst_ip:"),
    ],
)
def test_malformed_eve_records_are_rejected_naming_the_field(record: dict[str, object], reason: str) -> None:
    with pytest.raises(InputError, match=reason):
        LineParser("eve")(json.dumps(record).encode(), RULES, NOW_MS)


def test_auto_detects_eve_by_its_fields() -> None:
    assert looks_like_eve(json.dumps({"timestamp": stamp(0), "event_type": "dns"}).encode())
    assert not looks_like_eve(b'{"source": "fw", "time": 1}') and not looks_like_eve(b"#separator \\x09")
    with pytest.raises(InputError, match="must be an object"):
        LineParser("eve")(b"[1, 2]", RULES, NOW_MS)


_SCALARS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.integers(0, 9),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
)
_BODIES = st.dictionaries(st.text(min_size=1, max_size=2), _SCALARS | st.lists(_SCALARS, max_size=3), max_size=6)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["flow", "netflow", "alert", "dns", "http", "anomaly"]),
    body=_BODIES,
    figures=st.dictionaries(
        st.sampled_from(["bytes_toserver", "bytes_toclient", "pkts_toserver", "pkts_toclient", "bytes", "pkts"]),
        st.integers(0, 9),
    ),
    flowless=st.booleans(),
    sensor=st.sampled_from([None, "\U0001f600" * 256]),
)
def test_an_eve_event_is_stored_within_the_bound_that_lets_ingest_skip_encoding_it(
    kind: str, body: dict[str, object], figures: dict[str, int], flowless: bool, sensor: str | None
) -> None:
    """What EVE adds to a record — figures copied out of the flow object, the initiator, the session — stays
    within ``json_fits``' bound (one-digit figures are the widest: 9 bytes stored for each)."""
    record: dict[str, object] = {"timestamp": stamp(0), "event_type": kind, "flow_id": 7, kind: {**body, **figures}}
    if not flowless:
        record |= {**TUPLE, "direction": "to_server"}
    line = json.dumps(record, separators=(",", ":")).encode()
    (event,), _ = parse_lines([line], sensor)
    assert isinstance(event, Event)
    assert json_fits(line, 1 << 30) is not (b"\x01" * 19 in line.translate(canonical._DIGITS))
    assert len(encode(event)) <= 9 * len(line) + canonical._FIXED_BYTES
