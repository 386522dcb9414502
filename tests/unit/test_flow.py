"""Tests for engine.ingest.network_identity: Community ID v1 against the published vectors, flow keys, parsing,
errors.

Expected Community ID strings come from the spec repository corelight/community-id-spec
(``baseline/README.md`` tables and ``baseline/baseline_deflt.json`` / ``baseline/baseline_seed1.json``), plus a
few from the reference package corelight/pycommunityid (``README.md`` and ``tests/communityid_test.py``).
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.errors import InputError
from engine.ingest.network_identity import (
    FlowKey,
    community_id,
    flow_key,
    flow_key_bytes,
    normalize_ip,
    pack_ip,
    parse_proto,
    unpack_ip,
)

V6_A = "fe80:0001:0203:0405:0607:0809:0A0B:0C0D"
V6_B = "fe80:1011:1213:1415:1617:1819:1A1B:1C1D"

# (proto, src_ip, src_port, dst_ip, dst_port, id with seed 0, id with seed 1): baseline/README.md tables.
README_VECTORS: list[tuple[int, str, int | None, str, int | None, str, str]] = [
    (6, "1.2.3.4", 1122, "5.6.7.8", 3344, "1:wCb3OG7yAFWelaUydu0D+125CLM=", "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="),
    (6, "5.6.7.8", 3344, "1.2.3.4", 1122, "1:wCb3OG7yAFWelaUydu0D+125CLM=", "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="),
    (17, "1.2.3.4", 1122, "5.6.7.8", 3344, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg=", "1:OShq+iKDAMVouh/4bMxB9Sz4amw="),
    (17, "5.6.7.8", 3344, "1.2.3.4", 1122, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg=", "1:OShq+iKDAMVouh/4bMxB9Sz4amw="),
    (132, "1.2.3.4", 1122, "5.6.7.8", 3344, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8=", "1:uitchpn5MMGAQKBJh7bIr/bAr7s="),
    (132, "5.6.7.8", 3344, "1.2.3.4", 1122, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8=", "1:uitchpn5MMGAQKBJh7bIr/bAr7s="),
    (1, "1.2.3.4", 8, "5.6.7.8", 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0=", "1:9pr4ZGTICiuZoIh90RRYE2RyXpU="),
    (1, "5.6.7.8", 0, "1.2.3.4", 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0=", "1:9pr4ZGTICiuZoIh90RRYE2RyXpU="),
    (1, "1.2.3.4", 11, "5.6.7.8", 0, "1:f/YiSyWqczrTgfUCZlBUnvHRcPk=", "1:1DD7cWGC/Yg91YGsQeni8du3pIA="),
    (58, V6_A, 128, V6_B, 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo=", "1:IO27GQzPuCtNnwFvjWALMHu5tJE="),
    (58, V6_B, 129, V6_A, 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo=", "1:IO27GQzPuCtNnwFvjWALMHu5tJE="),
    (58, V6_A, 146, V6_B, 0, "1:fYC8+pz24E+EhANP1EZhpX0Dw10=", "1:Cv4IKJe56BNkF0MBW2YxQ3Nwc3s="),
    (46, "1.2.3.4", None, "5.6.7.8", None, "1:ikv3kmf89luf73WPz1jOs49S768=", "1:/buhqeOmaRCopOZFy9HnoJd5XW8="),
    (46, "5.6.7.8", None, "1.2.3.4", None, "1:ikv3kmf89luf73WPz1jOs49S768=", "1:/buhqeOmaRCopOZFy9HnoJd5XW8="),
    (46, V6_A, None, V6_B, None, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0=", "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM="),
    (46, V6_B, None, V6_A, None, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0=", "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM="),
]

# Same shape: baseline/baseline_deflt.json (seed 0) and baseline/baseline_seed1.json (seed 1), which list the
# same tuples in the same order.
_N1 = "fe80::200:86ff:fe05:80da"
_N2 = "fe80::260:97ff:fe07:69ea"
_H = "3ffe:507:0:1:200:86ff:fe05:80da"
_MAIL = "2001:470:e5bf:dead:4957:2174:e82c:4887"
_GMAIL = "2607:f8b0:400c:c03::1a"
JSON_VECTORS: list[tuple[int, str, int | None, str, int | None, str, str]] = [
    (58, _N1, 135, _N2, 136, "1:dGHyGvjMfljg6Bppwm3bg0LO8TY=", "1:kHa1FhMYIT6Ym2Vm2AOtoOARDzY="),
    (58, _N2, 136, _N1, 135, "1:dGHyGvjMfljg6Bppwm3bg0LO8TY=", "1:kHa1FhMYIT6Ym2Vm2AOtoOARDzY="),
    (58, _N2, 135, _N1, 136, "1:zavyT/cezQr1fmImYCwYnMXbgck=", "1:2hSqmsDZ2kdcY9kbiUzOEBic0iM="),
    (58, _N1, 136, _N2, 135, "1:zavyT/cezQr1fmImYCwYnMXbgck=", "1:2hSqmsDZ2kdcY9kbiUzOEBic0iM="),
    (58, "3ffe:501:1800:2345::2", 3, _H, 0, "1:2ObVBgIn28oZvibYZhZMBgh7WdQ=", "1:lVEtCZpYu84Xqaa++3lXFyuu2n4="),
    (
        58,
        "3ffe:501:410:0:2c0:dfff:fe47:33e",
        1,
        _H,
        4,
        "1:hLZd0XGWojozrvxqE0dWB1iM6R0=",
        "1:W8MHwXpWzpoSTD+cGcaJr4u0ys8=",
    ),
    (58, _H, 128, "3ffe:501:0:1001::2", 129, "1:+TW+HtLHvV1xnGhV1lv7XoJrqQg=", "1:GfZxjAkDk2MkegpBYHV6tadtFXQ="),
    (58, "3ffe:501:0:1001::2", 129, _H, 128, "1:+TW+HtLHvV1xnGhV1lv7XoJrqQg=", "1:GfZxjAkDk2MkegpBYHV6tadtFXQ="),
    (58, _N1, 133, "ff02::2", 134, "1:hO+sN4H+MG5MY/8hIrXPqc4ZQz0=", "1:L7Ka0ZMYu+J3bL4ulW2PrqyXNo8="),
    (58, _N2, 134, "ff02::1", 133, "1:pkvHqCL88/tg1k4cPigmZXUtL00=", "1:K/ee5UCqAMAQXDorP5nSa2CGLjc="),
    (1, "192.168.0.89", 8, "192.168.0.1", 0, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk=", "1:03g6IloqVBdcZlPyX8r0hgoE7kA="),
    (1, "192.168.0.1", 0, "192.168.0.89", 8, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk=", "1:03g6IloqVBdcZlPyX8r0hgoE7kA="),
    (1, "10.0.0.1", 11, "10.0.0.2", 0, "1:YHxtAirCG//0OzkcVAukqKQN9xM=", "1:XjUibYHaafLQ3pxQeiMI8g25q20="),
    (6, _MAIL, 63943, _GMAIL, 25, "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4=", "1:eJYTW6AOzFLlSUoESovMjnu7rMw="),
    (6, _GMAIL, 25, _MAIL, 63943, "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4=", "1:eJYTW6AOzFLlSUoESovMjnu7rMw="),
    (132, "192.168.170.8", 7, "192.168.170.56", 7, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs=", "1:5w3ZRjeKBzqT3zsaEECDGjUbYeg="),
    (132, "192.168.170.56", 7, "192.168.170.8", 7, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs=", "1:5w3ZRjeKBzqT3zsaEECDGjUbYeg="),
    (
        6,
        "128.232.110.120",
        34855,
        "66.35.250.204",
        80,
        "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
        "1:3V71V58M3Ksw/yuFALMcW0LAHvc=",
    ),
    (
        6,
        "66.35.250.204",
        80,
        "128.232.110.120",
        34855,
        "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
        "1:3V71V58M3Ksw/yuFALMcW0LAHvc=",
    ),
    (17, "192.168.1.52", 54585, "8.8.8.8", 53, "1:d/FP5EW3wiY1vCndhwleRRKHowQ=", "1:Q9We8WO3piVF8yEQBNJF4uiSVrI="),
    (17, "8.8.8.8", 53, "192.168.1.52", 54585, "1:d/FP5EW3wiY1vCndhwleRRKHowQ=", "1:Q9We8WO3piVF8yEQBNJF4uiSVrI="),
    (46, "10.1.12.1", None, "10.1.12.2", None, "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw=", "1:rYir8gphR31noO9iDRQmF/BteEI="),
    (46, "10.1.12.2", None, "10.1.12.1", None, "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw=", "1:rYir8gphR31noO9iDRQmF/BteEI="),
]

# (proto, src_ip, src_port, dst_ip, dst_port, id with seed 0): from corelight/pycommunityid README.md and
# tests/communityid_test.py.
PACKAGE_VECTORS: list[tuple[str | int, str, int | None, str, int | None, str]] = [
    ("tcp", "127.0.0.1", 1234, "10.0.0.1", 80, "1:mgRgpIZSu0KHDp/QrtcWZpkJpMU="),
    ("tcp", "10.0.0.1", 10, "10.0.0.2", 20, "1:9j2Dzwrw7T9E+IZi4b4IVT66HBI="),
    ("tcp", "10.0.0.1", 10, "10.0.0.2", 11569, "1:SXBGMX1lBOwhhoDrZynfROxnhnM="),
    ("sctp", "192.168.170.8", 7, "192.168.170.56", 80, "1:jQgCxbku+pNGw8WPbEc/TS/uTpQ="),
    ("sctp", "192.168.170.56", 80, "192.168.170.8", 7, "1:jQgCxbku+pNGw8WPbEc/TS/uTpQ="),
    ("icmp", "192.168.0.89", 20, "192.168.0.1", 0, "1:3o2RFccXzUgjl7zDpqmY7yJi8rI="),
    ("icmp", "192.168.0.89", 20, "192.168.0.1", 1, "1:tz/fHIDUHs19NkixVVoOZywde+I="),
    ("icmp", "192.168.0.1", 0, "192.168.0.89", 20, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="),  # echo reply: code ignored
    ("icmp6", "3ffe:507:0:1:260:97ff:fe07:69ea", 3, _H, 0, "1:NdobDX8PQNJbAyfkWxhtL2Pqp5w="),
    ("icmp6", _H, 3, "3ffe:507:0:1:260:97ff:fe07:69ea", 0, "1:/OGBt9BN1ofenrmSPWYicpij2Vc="),
    ("rsvp", "10.1.24.4", None, "10.1.12.1", None, "1:/nQI4Rh/TtY3mf0R2gJFBkVlgS4="),
]

SPEC_VECTORS = README_VECTORS + JSON_VECTORS


@pytest.mark.parametrize(("proto", "src", "sport", "dst", "dport", "seed0", "seed1"), SPEC_VECTORS)
def test_spec_baseline_vectors(
    proto: int, src: str, sport: int | None, dst: str, dport: int | None, seed0: str, seed1: str
) -> None:
    assert community_id(proto, src, sport, dst, dport) == seed0
    assert community_id(proto, src, sport, dst, dport, seed=0) == seed0
    assert community_id(proto, src, sport, dst, dport, seed=1) == seed1


@pytest.mark.parametrize(("proto", "src", "sport", "dst", "dport", "expected"), PACKAGE_VECTORS)
def test_reference_package_vectors(
    proto: str | int, src: str, sport: int | None, dst: str, dport: int | None, expected: str
) -> None:
    assert community_id(proto, src, sport, dst, dport) == expected


def test_proto_names_and_numbers_give_the_same_id() -> None:
    expected = "1:wCb3OG7yAFWelaUydu0D+125CLM="
    for proto in (6, "6", "tcp", "TCP", " Tcp "):
        assert community_id(proto, "1.2.3.4", 1122, "5.6.7.8", 3344) == expected
    v6 = "1:0bf7hyMJUwt3fMED7z8LIfRpBeo="
    for proto in (58, "icmp6", "ICMPv6", "ipv6-icmp", "IPV6_ICMP"):
        assert community_id(proto, V6_A, 128, V6_B, 0) == v6


Flow = tuple[int, str, int | None, str, int | None]


def _two_way(vectors: list[tuple[int, str, int | None, str, int | None, str, str]]) -> list[Flow]:
    """The vectors whose reverse direction (swapped endpoints, and for ICMP the counterpart type) is listed."""
    ids = [v[5] for v in vectors]
    return [v[:5] for v in vectors if ids.count(v[5]) == 2]


_COUNTERPART = {1: {8: 0, 0: 8}, 58: {128: 129, 129: 128, 135: 136, 136: 135}}


def _reverse(proto: int, src: str, sport: int | None, dst: str, dport: int | None) -> Flow:
    if proto in _COUNTERPART:
        assert sport is not None
        return proto, dst, _COUNTERPART[proto][sport], src, 0
    return proto, dst, dport, src, sport


@pytest.mark.parametrize(("proto", "src", "sport", "dst", "dport"), _two_way(SPEC_VECTORS))
def test_direction_independence(proto: int, src: str, sport: int | None, dst: str, dport: int | None) -> None:
    _, rsrc, rsport, rdst, rdport = _reverse(proto, src, sport, dst, dport)
    assert community_id(proto, src, sport, dst, dport) == community_id(proto, rsrc, rsport, rdst, rdport)
    fwd_key, fwd_rev = flow_key(proto, src, sport, dst, dport)
    back_key, back_rev = flow_key(proto, rsrc, rsport, rdst, rdport)
    assert fwd_key == back_key
    assert flow_key_bytes(fwd_key) == flow_key_bytes(back_key)
    if src != dst or sport != dport:
        assert fwd_rev != back_rev


def test_flow_key_orders_like_community_id() -> None:
    key, rev = flow_key("tcp", "5.6.7.8", 3344, "1.2.3.4", 1122)
    assert key == FlowKey(proto=6, a_ip="1.2.3.4", a_port=1122, b_ip="5.6.7.8", b_port=3344)
    assert rev is True
    key2, rev2 = flow_key(6, "1.2.3.4", 1122, "5.6.7.8", 3344)
    assert key2 == key
    assert rev2 is False


def test_flow_key_same_address_ports_decide() -> None:
    key, rev = flow_key("udp", "10.0.0.1", 9000, "10.0.0.1", 53)
    assert (key.a_port, key.b_port, rev) == (53, 9000, True)
    assert community_id("udp", "10.0.0.1", 9000, "10.0.0.1", 53) == community_id(
        "udp", "10.0.0.1", 53, "10.0.0.1", 9000
    )
    same, same_rev = flow_key("udp", "10.0.0.1", 53, "10.0.0.1", 53)
    assert same_rev is False
    assert same.a_port == same.b_port == 53


def test_flow_key_normalizes_addresses() -> None:
    key, rev = flow_key("tcp", "2001:DB8:0:0::1", 443, "2001:db8::2", 50000)
    assert (key.a_ip, key.b_ip, rev) == ("2001:db8::1", "2001:db8::2", False)


def test_icmp_echo_request_and_reply_share_a_key() -> None:
    request, req_rev = flow_key("icmp", "1.2.3.4", 8, "5.6.7.8", 0)
    reply, rep_rev = flow_key("icmp", "5.6.7.8", 0, "1.2.3.4", 0)
    assert request == reply == FlowKey(proto=1, a_ip="1.2.3.4", a_port=8, b_ip="5.6.7.8", b_port=0)
    assert (req_rev, rep_rev) == (False, True)


@pytest.mark.parametrize(
    ("proto", "icmp_type"),
    [("icmp", 3), ("icmp", 11), ("icmp", 5), ("icmp6", 1), ("icmp6", 3), ("icmp6", 146)],
)
def test_icmp_one_way_types_are_never_swapped(proto: str, icmp_type: int) -> None:
    # The larger address as source: a two-way protocol would be reversed, a one-way ICMP type must not be.
    if proto == "icmp":
        hi, lo = "10.0.0.9", "10.0.0.1"
    else:
        hi, lo = "2001:db8::9", "2001:db8::1"
    out_key, out_rev = flow_key(proto, hi, icmp_type, lo, 4)
    back_key, back_rev = flow_key(proto, lo, icmp_type, hi, 4)
    assert (out_rev, back_rev) == (False, False)
    assert (out_key.a_ip, out_key.a_port, out_key.b_port) == (normalize_ip(hi), icmp_type, 4)
    assert out_key != back_key
    assert community_id(proto, hi, icmp_type, lo, 4) != community_id(proto, lo, icmp_type, hi, 4)


@pytest.mark.parametrize(
    ("proto", "ask", "answer"),
    [
        ("icmp", 8, 0),
        ("icmp", 13, 14),
        ("icmp", 15, 16),
        ("icmp", 10, 9),
        ("icmp", 17, 18),
        ("icmp6", 128, 129),
        ("icmp6", 130, 131),
        ("icmp6", 133, 134),
        ("icmp6", 135, 136),
        ("icmp6", 139, 140),
        ("icmp6", 144, 145),
    ],
)
def test_icmp_request_reply_pairs(proto: str, ask: int, answer: int) -> None:
    a, b = ("192.0.2.1", "192.0.2.7") if proto == "icmp" else ("2001:db8::1", "2001:db8::7")
    # The code is ignored for paired types.
    assert community_id(proto, b, ask, a, 0) == community_id(proto, a, answer, b, 3)
    out_key, out_rev = flow_key(proto, b, ask, a, 0)
    back_key, back_rev = flow_key(proto, a, answer, b, 0)
    assert out_key == back_key
    assert out_rev != back_rev


def test_portless_protocols_ignore_ports() -> None:
    expected = "1:ikv3kmf89luf73WPz1jOs49S768="
    assert community_id("rsvp", "1.2.3.4", 0, "5.6.7.8", 0) == expected
    assert community_id(46, "1.2.3.4", 17, "5.6.7.8", None) == expected
    key, rev = flow_key("gre", "5.6.7.8", 1, "1.2.3.4", 2)
    assert key == FlowKey(proto=47, a_ip="1.2.3.4", a_port=None, b_ip="5.6.7.8", b_port=None)
    assert rev is True
    assert flow_key("gre", "1.2.3.4", None, "5.6.7.8", None) == (key, False)
    assert community_id("gre", "1.2.3.4", None, "5.6.7.8", None) == community_id("gre", "5.6.7.8", 9, "1.2.3.4", 9)


def test_flow_key_bytes_layout_is_pinned() -> None:
    # Persisted semantics: these bytes must never change.
    tcp, _ = flow_key("tcp", "5.6.7.8", 3344, "1.2.3.4", 1122)
    assert flow_key_bytes(tcp) == bytes.fromhex("01 06 04 01020304 05060708 01 0462 0d10")
    gre, _ = flow_key("gre", "2001:db8::2", None, "2001:db8::1", None)
    assert flow_key_bytes(gre) == bytes.fromhex(
        "01 2f 10 20010db8000000000000000000000001 20010db8000000000000000000000002 00"
    )
    icmp, _ = flow_key("icmp", "1.2.3.4", 11, "5.6.7.8", 0)
    assert flow_key_bytes(icmp) == bytes.fromhex("01 01 04 01020304 05060708 01 000b 0000")


def test_flow_key_bytes_distinguishes_keys() -> None:
    keys = [
        flow_key("tcp", "1.2.3.4", 1, "5.6.7.8", 2)[0],
        flow_key("udp", "1.2.3.4", 1, "5.6.7.8", 2)[0],
        flow_key("tcp", "1.2.3.4", 2, "5.6.7.8", 1)[0],
        flow_key("tcp", "::ffff:1.2.3.4", 1, "::ffff:5.6.7.8", 2)[0],
        flow_key("gre", "1.2.3.4", None, "5.6.7.8", None)[0],
        flow_key("icmp", "1.2.3.4", 3, "5.6.7.8", 1)[0],
        flow_key("icmp", "1.2.3.4", 3, "5.6.7.8", 2)[0],
    ]
    encodings = {flow_key_bytes(k) for k in keys}
    assert len(encodings) == len(keys)


@pytest.mark.parametrize(
    ("key", "field"),
    [
        (FlowKey(proto=6, a_ip="1.2.3.4", a_port=1, b_ip="::1", b_port=2), "b_ip"),
        (FlowKey(proto=6, a_ip="nope", a_port=1, b_ip="1.2.3.4", b_port=2), "a_ip"),
        (FlowKey(proto=6, a_ip="1.2.3.4", a_port=1, b_ip="1.2.3.5", b_port=None), "a_port"),
        (FlowKey(proto=6, a_ip="1.2.3.4", a_port=70000, b_ip="1.2.3.5", b_port=2), "a_port"),
        (FlowKey(proto=300, a_ip="1.2.3.4", a_port=None, b_ip="1.2.3.5", b_port=None), "proto"),
    ],
)
def test_flow_key_bytes_rejects_malformed_keys(key: FlowKey, field: str) -> None:
    with pytest.raises(InputError, match=rf"^{field}:"):
        flow_key_bytes(key)


def test_flow_key_is_frozen_and_hashable() -> None:
    key, _ = flow_key("tcp", "1.2.3.4", 1, "5.6.7.8", 2)
    assert {key: 1}[flow_key("tcp", "5.6.7.8", 2, "1.2.3.4", 1)[0]] == 1
    with pytest.raises(AttributeError):
        key.proto = 17  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tcp", 6),
        ("TCP", 6),
        ("udp", 17),
        ("icmp", 1),
        ("icmp6", 58),
        ("ipv6-icmp", 58),
        ("icmpv6", 58),
        ("sctp", 132),
        ("gre", 47),
        ("esp", 50),
        ("ah", 51),
        ("rsvp", 46),
        ("ospf", 89),
        (0, 0),
        (6, 6),
        (255, 255),
        ("17", 17),
        (" 47 ", 47),
    ],
)
def test_parse_proto(value: str | int, expected: int) -> None:
    assert parse_proto(value) == expected


@pytest.mark.parametrize("value", [-1, 256, "256", "-1", "", "tcpx", "ipip", "6.0", True, 6.0, None, b"tcp"])
def test_parse_proto_rejects(value: object) -> None:
    with pytest.raises(InputError, match=r"^proto:"):
        parse_proto(value)  # type: ignore[arg-type]


def test_normalize_ip() -> None:
    assert normalize_ip("10.0.0.1") == "10.0.0.1"
    assert normalize_ip("2001:0DB8:0000:0000:0000:0000:0000:0001") == "2001:db8::1"
    assert normalize_ip(V6_A) == "fe80:1:203:405:607:809:a0b:c0d"
    # IPv4-mapped IPv6 stays IPv6, written the same way on every Python version.
    assert normalize_ip("::FFFF:1.2.3.4") == "::ffff:1.2.3.4"
    assert normalize_ip("0:0:0:0:0:ffff:0102:0304") == "::ffff:1.2.3.4"
    assert unpack_ip(pack_ip("::ffff:1.2.3.4")) == "::ffff:1.2.3.4"
    assert flow_key("tcp", "::ffff:5.6.7.8", 1, "::FFFF:1.2.3.4", 2)[0].a_ip == "::ffff:1.2.3.4"


@pytest.mark.parametrize(
    "text", ["", "1.2.3", "1.2.3.256", "01.2.3.4", "example.com", "::g", "fe80::1%eth0", " 1.2.3.4"]
)
def test_normalize_ip_rejects(text: str) -> None:
    with pytest.raises(InputError, match=r"^src_ip:"):
        normalize_ip(text, field="src_ip")
    with pytest.raises(InputError, match=r"^ip:"):
        normalize_ip(text)


def test_normalize_ip_rejects_non_strings() -> None:
    with pytest.raises(InputError, match=r"^ip:"):
        normalize_ip(16909060)  # type: ignore[arg-type]


def test_pack_and_unpack_ip() -> None:
    assert pack_ip("1.2.3.4") == b"\x01\x02\x03\x04"
    assert pack_ip("::1") == bytes(15) + b"\x01"
    assert len(pack_ip("::ffff:1.2.3.4")) == 16
    assert unpack_ip(b"\x01\x02\x03\x04") == "1.2.3.4"
    assert unpack_ip(pack_ip("2001:DB8::1")) == "2001:db8::1"
    with pytest.raises(InputError, match=r"^ip:"):
        unpack_ip(b"\x01\x02\x03")
    with pytest.raises(InputError, match=r"^dst_ip:"):
        pack_ip("x", field="dst_ip")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("tcp", "1.2.3.4", 1, "::1", 2), "dst_ip"),
        (("tcp", "::ffff:1.2.3.4", 1, "5.6.7.8", 2), "dst_ip"),
        (("tcp", "bogus", 1, "5.6.7.8", 2), "src_ip"),
        (("tcp", "1.2.3.4", 1, "5.6.7.888", 2), "dst_ip"),
        (("tcp", "1.2.3.4", None, "5.6.7.8", 2), "src_port"),
        (("udp", "1.2.3.4", 1, "5.6.7.8", None), "dst_port"),
        (("sctp", "1.2.3.4", None, "5.6.7.8", None), "src_port"),
        (("tcp", "1.2.3.4", -1, "5.6.7.8", 2), "src_port"),
        (("tcp", "1.2.3.4", 1, "5.6.7.8", 65536), "dst_port"),
        (("tcp", "1.2.3.4", "80", "5.6.7.8", 2), "src_port"),
        (("tcp", "1.2.3.4", 1, "5.6.7.8", True), "dst_port"),
        (("tcp", "1.2.3.4", 1.0, "5.6.7.8", 2), "src_port"),
        (("icmp", "1.2.3.4", None, "5.6.7.8", 0), "src_port"),
        (("icmp", "1.2.3.4", 8, "5.6.7.8", None), "dst_port"),
        (("icmp", "1.2.3.4", 256, "5.6.7.8", 0), "src_port"),
        (("icmp6", "::1", 128, "::2", 300), "dst_port"),
        (("bogus", "1.2.3.4", 1, "5.6.7.8", 2), "proto"),
        ((999, "1.2.3.4", 1, "5.6.7.8", 2), "proto"),
    ],
)
def test_malformed_flows_raise_input_error(args: tuple[object, ...], field: str) -> None:
    with pytest.raises(InputError, match=rf"^{field}:"):
        community_id(*args)
    with pytest.raises(InputError, match=rf"^{field}:"):
        flow_key(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 65536, True, "1"])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(InputError, match=r"^seed:"):
        community_id("tcp", "1.2.3.4", 1, "5.6.7.8", 2, seed=seed)


def test_max_seed_is_accepted() -> None:
    assert community_id("tcp", "1.2.3.4", 1, "5.6.7.8", 2, seed=65535).startswith("1:")


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_ports = st.integers(min_value=0, max_value=65535)


@st.composite
def _endpoints(draw: st.DrawFn) -> tuple[str, int, str, int]:
    family = draw(st.sampled_from([_ipv4, _ipv6]))
    a = draw(family)
    b = draw(st.one_of(family, st.just(a)))
    return a, draw(_ports), b, draw(_ports)


@given(proto=st.sampled_from(["tcp", "udp", 6, 17, "sctp"]), ends=_endpoints(), seed=_ports)
def test_property_community_id_is_direction_independent(
    proto: str | int, ends: tuple[str, int, str, int], seed: int
) -> None:
    a, a_port, b, b_port = ends
    forward = community_id(proto, a, a_port, b, b_port, seed=seed)
    backward = community_id(proto, b, b_port, a, a_port, seed=seed)
    assert forward == backward
    assert forward.startswith("1:")
    assert len(forward) == 30
    fwd_key, fwd_rev = flow_key(proto, a, a_port, b, b_port)
    back_key, back_rev = flow_key(proto, b, b_port, a, a_port)
    assert fwd_key == back_key
    assert flow_key_bytes(fwd_key) == flow_key_bytes(back_key)
    same_endpoint = ipaddress.ip_address(a) == ipaddress.ip_address(b) and a_port == b_port
    assert fwd_rev == (not back_rev) or (same_endpoint and fwd_rev is back_rev is False)
    # Endpoint a is the smaller (address bytes, port) pair.
    assert (pack_ip(fwd_key.a_ip), fwd_key.a_port) <= (pack_ip(fwd_key.b_ip), fwd_key.b_port)
