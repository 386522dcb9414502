"""Flow identity: protocol numbers, IP addresses, Community ID v1 and a direction-independent flow key.

Everything here is a pure function of its arguments: no I/O, no clock, no database. Malformed input raises
:class:`engine.core.errors.InputError` whose message starts with the name of the offending field (``proto``,
``src_ip``, ``dst_port``, ``seed`` ...).

Community ID
    :func:`community_id` implements version 1 of the Community ID flow hash
    (https://github.com/corelight/community-id-spec) and reproduces the spec's published baseline values. The
    SHA-1 input is, big-endian: the 2-byte seed, the first endpoint's address, the second endpoint's address (4
    bytes each for IPv4, 16 for IPv6), 1 byte IP protocol, 1 zero byte, then, only for the port-carrying
    protocols (ICMP, TCP, UDP, ICMPv6, SCTP), the first and second endpoint's 2-byte ports. The endpoints are
    ordered so the smaller (address bytes, port) pair comes first. The result is ``"1:"`` followed by the
    standard base64 of the 20-byte digest.

ICMP and ICMPv6
    As in the spec's inputs, ``src_port`` carries the ICMP type and ``dst_port`` the code; both are required
    and must be 0..255. Types that belong to a request/reply pair (echo, timestamp, information, router
    solicitation/advertisement, address mask for ICMPv4; echo, MLD query/report, router and neighbour
    discovery, who-are-you, home-agent address discovery for ICMPv6) become the port pair (type, counterpart
    type) and are ordered like ports, so a request and its reply share one id. Every other type becomes (type,
    code) and is one-way: its endpoints are never swapped.

Portless protocols
    For every protocol other than ICMP, TCP, UDP, ICMPv6 and SCTP the ports are not part of the identity (the
    spec hashes only addresses and protocol). Ports given for such a protocol are ignored without validation;
    this is deliberate leniency for sensors that log ``0`` or junk there. (The reference Python package would
    hash ports if given; the spec and its baseline do not.)

Addresses
    IPv4 and IPv6 text forms are accepted through :mod:`ipaddress`. An IPv4-mapped IPv6 address such as
    ``::ffff:192.0.2.1`` is kept as the IPv6 address it was written as (16 bytes, IPv6 family); it is not
    folded into IPv4, so it neither equals nor can be paired with ``192.0.2.1`` (mixing families in one flow is
    an error). IPv6 zone identifiers (``fe80::1%eth0``) are rejected: they are not part of the packed address,
    so keeping them would make the text and byte identities disagree.

Protocol names
    Zeek logs ``icmp`` for ICMPv6 connections too; this module does not guess: ``icmp`` is always 1. A caller
    reading such logs should map ``icmp`` over IPv6 to 58 itself.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import socket
import struct
from typing import Final, NamedTuple

import msgspec

from engine.core.errors import InputError

__all__ = [
    "FLOW_KEY_FORMAT_VERSION",
    "PORT_PROTOCOLS",
    "PROTO_ICMP",
    "PROTO_ICMP6",
    "PROTO_SCTP",
    "PROTO_TCP",
    "PROTO_UDP",
    "FlowKey",
    "community_id",
    "flow_key",
    "flow_key_bytes",
    "normalize_ip",
    "pack_ip",
    "parse_proto",
    "unpack_ip",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMP6: Final = 58
PROTO_SCTP: Final = 132

PORT_PROTOCOLS: Final = frozenset({PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMP6, PROTO_SCTP})
"""Protocols whose ports (ICMP: type and code) are part of the flow identity."""

_ICMP_PROTOCOLS: Final = frozenset({PROTO_ICMP, PROTO_ICMP6})

# Request/reply type pairs, both directions listed. Types not listed here are one-way.
ICMP4_COUNTERPART: Final[dict[int, int]] = {
    8: 0,  # echo request -> echo reply
    0: 8,
    13: 14,  # timestamp -> timestamp reply
    14: 13,
    15: 16,  # information request -> information reply
    16: 15,
    10: 9,  # router solicitation -> router advertisement
    9: 10,
    17: 18,  # address mask request -> address mask reply
    18: 17,
}
ICMP6_COUNTERPART: Final[dict[int, int]] = {
    128: 129,  # echo request -> echo reply
    129: 128,
    130: 131,  # multicast listener query -> report
    131: 130,
    133: 134,  # router solicitation -> router advertisement
    134: 133,
    135: 136,  # neighbour solicitation -> neighbour advertisement
    136: 135,
    139: 140,  # who-are-you request -> reply (node information query)
    140: 139,
    144: 145,  # home agent address discovery request -> reply
    145: 144,
}

# Lower-case names (IANA keywords and common aliases) to IANA protocol numbers. Names whose meaning differs
# between sources (``ip``, ``ipip``) are left out on purpose; give the number instead.
_PROTO_NAMES: Final[dict[str, int]] = {
    "hopopt": 0,
    "icmp": 1,
    "icmpv4": 1,
    "igmp": 2,
    "ggp": 3,
    "ipv4": 4,
    "ipencap": 4,
    "st": 5,
    "tcp": 6,
    "egp": 8,
    "igp": 9,
    "pup": 12,
    "udp": 17,
    "xns-idp": 22,
    "rdp": 27,
    "dccp": 33,
    "ipv6": 41,
    "ipv6-route": 43,
    "ipv6-frag": 44,
    "idrp": 45,
    "rsvp": 46,
    "gre": 47,
    "esp": 50,
    "ipsec-esp": 50,
    "ah": 51,
    "ipsec-ah": 51,
    "icmp6": 58,
    "icmpv6": 58,
    "ipv6-icmp": 58,
    "ipv6-nonxt": 59,
    "ipv6-opts": 60,
    "eigrp": 88,
    "ospf": 89,
    "ospfigp": 89,
    "etherip": 97,
    "encap": 98,
    "pim": 103,
    "ipcomp": 108,
    "vrrp": 112,
    "l2tp": 115,
    "isis": 124,
    "sctp": 132,
    "fc": 133,
    "mobility-header": 135,
    "udplite": 136,
    "mpls-in-ip": 137,
    "manet": 138,
    "hip": 139,
    "shim6": 140,
    "wesp": 141,
    "rohc": 142,
    "ethernet": 143,
}

FLOW_KEY_FORMAT_VERSION: Final = 1
"""First byte of every :func:`flow_key_bytes` encoding."""


def parse_proto(value: str | int) -> int:
    """The IANA protocol number (0..255) for a protocol name or number.

    Names are case-insensitive (``tcp``, ``UDP``, ``icmp6``, ``ipv6-icmp``, ``gre``, ``esp`` ...; ``_`` may
    stand for ``-``); decimal strings such as ``"6"`` are accepted too. Anything else raises
    :class:`InputError` naming the field ``proto``.
    """
    if isinstance(value, bool):
        raise InputError(f"proto: expected a protocol name or number 0..255, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip().lower().replace("_", "-")
        if text.isascii() and text.isdigit():
            number = int(text)
        elif text in _PROTO_NAMES:
            return _PROTO_NAMES[text]
        else:
            raise InputError(f"proto: unknown protocol name {value!r}")
    else:
        raise InputError(f"proto: expected a protocol name or number 0..255, got {type(value).__name__}")
    if not 0 <= number <= 255:
        raise InputError(f"proto: protocol number {number} is outside 0..255")
    return number


class _Addr(NamedTuple):
    """A parsed address: network-order bytes, canonical text, IP version."""

    packed: bytes
    text: str
    version: int


_V4_COMPAT = bytes(12)


def _from_packed(packed: bytes) -> _Addr:
    if len(packed) == 4:
        return _Addr(packed, socket.inet_ntop(socket.AF_INET, packed), 4)
    if packed[:12] == _V4_COMPAT:
        # glibc prints the deprecated IPv4-compatible form (::a.b.c.d); RFC 5952 text is hex.
        return _Addr(packed, str(ipaddress.IPv6Address(packed)), 6)
    # RFC 5952 (compressed, lower-case); IPv4-mapped as ::ffff:a.b.c.d on every Python version.
    return _Addr(packed, socket.inet_ntop(socket.AF_INET6, packed), 6)


@functools.lru_cache(maxsize=65_536)
def _parse_ip(text: str) -> _Addr:
    # inet_pton is strict (no leading zeros, no short forms, no spaces) and ~10x faster than ipaddress;
    # sensors repeat the same addresses constantly, so the cache saves most of the rest.
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except OSError:
        raise ValueError(text) from None
    return _from_packed(packed)


def _ip(text: str, field: str) -> _Addr:
    if not isinstance(text, str):
        raise InputError(f"{field}: expected an IP address string, got {type(text).__name__}")
    if "%" in text:
        raise InputError(f"{field}: IPv6 zone identifiers are not supported: {text!r}")
    try:
        return _parse_ip(text)
    except (ValueError, UnicodeError):
        raise InputError(f"{field}: not an IPv4 or IPv6 address: {text!r}") from None


def normalize_ip(text: str, field: str = "ip") -> str:
    """The canonical text of an IPv4 or IPv6 address (RFC 5952: IPv6 compressed, lower-case).

    IPv4-mapped IPv6 addresses stay IPv6 and are written ``::ffff:a.b.c.d`` on every Python version. ``field``
    names the record field in the :class:`InputError` raised for anything that is not an address.
    """
    return _ip(text, field).text


def pack_ip(text: str, field: str = "ip") -> bytes:
    """The network-order bytes of an address: 4 for IPv4, 16 for IPv6 (IPv4-mapped included)."""
    return _ip(text, field).packed


def unpack_ip(packed: bytes, field: str = "ip") -> str:
    """The canonical text of a 4- or 16-byte network-order address (the inverse of :func:`pack_ip`)."""
    if not isinstance(packed, bytes | bytearray | memoryview) or len(packed) not in (4, 16):
        raise InputError(f"{field}: a packed address must be 4 or 16 bytes")
    return _from_packed(bytes(packed)).text


def _port(value: object, field: str, limit: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{field}: expected an integer {what}, got {type(value).__name__}")
    if not 0 <= value <= limit:
        raise InputError(f"{field}: {what} {value} is outside 0..{limit}")
    return value


class _Ordered(NamedTuple):
    proto: int
    a_addr: _Addr
    a_port: int | None
    b_addr: _Addr
    b_port: int | None
    reversed: bool


def _order(proto: str | int, src_ip: str, src_port: int | None, dst_ip: str, dst_port: int | None) -> _Ordered:
    """Validate a reported flow and order its endpoints the way Community ID v1 does."""
    number = parse_proto(proto)
    src = _ip(src_ip, "src_ip")
    dst = _ip(dst_ip, "dst_ip")
    if src.version != dst.version:
        raise InputError(f"dst_ip: address family IPv{dst.version} differs from src_ip's IPv{src.version}")

    sport: int | None
    dport: int | None
    one_way = False
    if number in _ICMP_PROTOCOLS:
        if src_port is None:
            raise InputError("src_port: the ICMP type is required (src_port carries it)")
        if dst_port is None:
            raise InputError("dst_port: the ICMP code is required (dst_port carries it)")
        icmp_type = _port(src_port, "src_port", 255, "ICMP type")
        icmp_code = _port(dst_port, "dst_port", 255, "ICMP code")
        counterparts = ICMP4_COUNTERPART if number == PROTO_ICMP else ICMP6_COUNTERPART
        counterpart = counterparts.get(icmp_type)
        if counterpart is None:
            sport, dport, one_way = icmp_type, icmp_code, True
        else:
            sport, dport = icmp_type, counterpart
    elif number in PORT_PROTOCOLS:
        if src_port is None:
            raise InputError(f"src_port: required for protocol {number}")
        if dst_port is None:
            raise InputError(f"dst_port: required for protocol {number}")
        sport = _port(src_port, "src_port", 65535, "port")
        dport = _port(dst_port, "dst_port", 65535, "port")
    else:
        sport = dport = None  # portless: ports are not part of the identity and are ignored

    # Order by the big-endian address bytes, then the port. Equal endpoints are left as reported (not
    # "reversed"); swapping them would give the same hash input anyway.
    swap = False
    if not one_way:
        src_bytes, dst_bytes = src.packed, dst.packed
        if src_bytes != dst_bytes:
            swap = src_bytes > dst_bytes
        elif sport is not None and dport is not None:
            swap = sport > dport
    if swap:
        return _Ordered(number, dst, dport, src, sport, True)
    return _Ordered(number, src, sport, dst, dport, False)


@functools.lru_cache(maxsize=65_536)
def community_id(
    proto: str | int,
    src_ip: str,
    src_port: int | None,
    dst_ip: str,
    dst_port: int | None,
    seed: int = 0,
) -> str:
    """The Community ID v1 string (``"1:" + base64(sha1)``) of a flow, the same in both directions.

    ``proto`` is a name or number (see :func:`parse_proto`); for ICMP/ICMPv6 ``src_port`` is the type and
    ``dst_port`` the code. ``seed`` is 0..65535.
    """
    seed_value = _port(seed, "seed", 65535, "seed")
    flow = _order(proto, src_ip, src_port, dst_ip, dst_port)
    data = bytearray(struct.pack("!H", seed_value))
    data += flow.a_addr.packed
    data += flow.b_addr.packed
    data += struct.pack("!BB", flow.proto, 0)
    if flow.a_port is not None and flow.b_port is not None:
        data += struct.pack("!HH", flow.a_port, flow.b_port)
    digest = hashlib.sha1(data, usedforsecurity=False).digest()
    return "1:" + base64.b64encode(digest).decode("ascii")


class FlowKey(msgspec.Struct, frozen=True):
    """A direction-independent flow identity: endpoint ``a`` is the one Community ID puts first.

    Addresses are in :func:`normalize_ip` form. For TCP/UDP/SCTP the ports are the real ports; for
    ICMP/ICMPv6 they are the mapped (type, counterpart type) or, for one-way types, (type, code); for every
    other protocol both are ``None``. Build keys with :func:`flow_key`; a hand-made key is not checked for
    order.
    """

    proto: int
    a_ip: str
    a_port: int | None
    b_ip: str
    b_port: int | None


def flow_key(
    proto: str | int, src_ip: str, src_port: int | None, dst_ip: str, dst_port: int | None
) -> tuple[FlowKey, bool]:
    """The :class:`FlowKey` of a reported flow, and whether the report runs from ``b`` to ``a``.

    The bool is ``True`` when the reported source became endpoint ``b`` (the report is reversed relative to
    the key); a flow and its reply give equal keys with opposite flags. One-way ICMP types and flows whose two
    endpoints are identical are never reversed. Validation and errors are those of :func:`community_id`.
    """
    flow = _order(proto, src_ip, src_port, dst_ip, dst_port)
    key = FlowKey(
        proto=flow.proto,
        a_ip=flow.a_addr.text,
        a_port=flow.a_port,
        b_ip=flow.b_addr.text,
        b_port=flow.b_port,
    )
    return key, flow.reversed


def flow_key_bytes(key: FlowKey) -> bytes:
    """A canonical, injective byte encoding of a flow key, for hashing (e.g. xxhash into shards).

    PERSISTED SEMANTICS: shard placement and stored data depend on these exact bytes, so this layout must
    never change. A different layout needs a new :data:`FLOW_KEY_FORMAT_VERSION` and a migration.

    Layout (big-endian)::

        1 byte   format version, 1
        1 byte   IP protocol number
        1 byte   address length L: 4 (IPv4) or 16 (IPv6)
        L bytes  address a
        L bytes  address b
        1 byte   0 if the key has no ports, 1 if it has
        2 bytes  port a      } only when the previous byte is 1
        2 bytes  port b      }

    IPv4-mapped IPv6 addresses are encoded as 16 bytes, i.e. they stay distinct from their IPv4 form.
    """
    if isinstance(key.proto, bool) or not isinstance(key.proto, int) or not 0 <= key.proto <= 255:
        raise InputError(f"proto: protocol number {key.proto!r} is outside 0..255")
    a = _ip(key.a_ip, "a_ip")
    b = _ip(key.b_ip, "b_ip")
    if a.version != b.version:
        raise InputError(f"b_ip: address family IPv{b.version} differs from a_ip's IPv{a.version}")
    out = bytearray(struct.pack("!BBB", FLOW_KEY_FORMAT_VERSION, key.proto, len(a.packed)))
    out += a.packed
    out += b.packed
    if key.a_port is None and key.b_port is None:
        out.append(0)
    elif key.a_port is not None and key.b_port is not None:
        a_port = _port(key.a_port, "a_port", 65535, "port")
        b_port = _port(key.b_port, "b_port", 65535, "port")
        out += struct.pack("!BHH", 1, a_port, b_port)
    else:
        raise InputError("a_port: a flow key has either both ports or neither")
    return bytes(out)


_V4_PORTS_KEY: Final = struct.Struct("!BBB4s4sBHH")
_PORTED: Final = frozenset({6, 17, 132})


def flow_identity(
    proto: str | int, src_ip: str, src_port: int | None, dst_ip: str, dst_port: int | None
) -> tuple[str, str, bytes, bool]:
    """Everything ingest needs from a reported flow in one validation pass: the canonical source and
    destination address text (as reported, not reordered), :func:`flow_key_bytes` of its key, and whether the
    report is reversed relative to the key.

    The common case — TCP, UDP or SCTP between two IPv4 addresses — takes a short path with the same result
    (a test checks it against the general one): ``inet_pton`` accepts only the canonical dotted quad (no
    leading zeros, no short forms), so the text given is the canonical text. Everything else, and every
    error, goes through :func:`_order` (cached: the events of one flow repeat the same five fields)."""
    if (
        proto.__class__ is int
        and proto in _PORTED
        and src_port.__class__ is int
        and dst_port.__class__ is int
        and src_ip.__class__ is str
        and dst_ip.__class__ is str
        and 0 <= src_port <= 65535
        and 0 <= dst_port <= 65535
        and ":" not in src_ip
        and ":" not in dst_ip
    ):
        try:
            a, b = socket.inet_pton(socket.AF_INET, src_ip), socket.inet_pton(socket.AF_INET, dst_ip)
        except (OSError, UnicodeError, ValueError):
            pass  # the general path names the field
        else:
            if a < b or (a == b and src_port <= dst_port):
                key = _V4_PORTS_KEY.pack(FLOW_KEY_FORMAT_VERSION, proto, 4, a, b, 1, src_port, dst_port)
                return src_ip, dst_ip, key, False
            key = _V4_PORTS_KEY.pack(FLOW_KEY_FORMAT_VERSION, proto, 4, b, a, 1, dst_port, src_port)
            return src_ip, dst_ip, key, True
    return _flow_identity(proto, src_ip, src_port, dst_ip, dst_port)


@functools.lru_cache(maxsize=65_536)
def _flow_identity(
    proto: str | int, src_ip: str, src_port: int | None, dst_ip: str, dst_port: int | None
) -> tuple[str, str, bytes, bool]:
    flow = _order(proto, src_ip, src_port, dst_ip, dst_port)
    a, b = flow.a_addr.packed, flow.b_addr.packed
    out = bytearray(struct.pack("!BBB", FLOW_KEY_FORMAT_VERSION, flow.proto, len(a)))
    out += a
    out += b
    if flow.a_port is None or flow.b_port is None:
        out.append(0)
    else:
        out += struct.pack("!BHH", 1, flow.a_port, flow.b_port)
    src, dst = (flow.b_addr, flow.a_addr) if flow.reversed else (flow.a_addr, flow.b_addr)
    return src.text, dst.text, bytes(out), flow.reversed
