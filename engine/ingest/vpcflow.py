"""AWS VPC Flow Logs (text) → canonical input events (docs/events.md, "VPC flow logs"; research notes:
docs/notes/input-formats.md §3).

A record is one line of space-separated fields; ``-`` is a missing value. The layout is the default version-2 one
(``version account-id interface-id srcaddr dstaddr srcport dstport protocol packets bytes start end action
log-status``) unless a header line of field names declares another (S3 delivery writes one at the top of each
file; custom formats need it). A record is one direction of one flow on one network interface during an
aggregation window.

The canonical event: ``source`` = ``vpcflow``; ``sensor`` = the caller's ``--sensor``, else ``vpcflow-<account
id>`` (never the interface: observers and clock offsets are per sensor); ``time`` = ``start`` (epoch seconds);
the flow from ``protocol``, ``srcaddr``/``srcport``, ``dstaddr``/``dstport``. VPC logs ICMP with ports 0 0, which
say nothing of the type and code; they are kept as logged (ICMP's ports are its type and code, so such a record
reads as an echo reply, which Community ID pairs with echo requests) and ``icmp_type_unknown`` says so.
``bytes``/``packets`` are what the record's source sent (``src_bytes``/``src_packets``); ``tcp-flags`` (version
3+) tell who opened a TCP session: SYN without ACK (2) from src → ``initiator: "src"``, SYN-ACK (18) →
``"dst"``. Every other field stays in ``attrs`` under its name (``end``, ``action``, ``interface-id``,
``pkt-srcaddr``…), numbers as integers.

``NODATA`` and ``SKIPDATA`` records (no traffic in the window; records AWS skipped) carry no flow: they are
counted (:attr:`VpcFlowReader.nodata`, :attr:`VpcFlowReader.skipdata`), not rejected.

Pure; no I/O.
"""

from __future__ import annotations

import re
from typing import Any, Final

from engine.core.errors import InputError

from .canonical import InputEvent

__all__ = ["DEFAULT_LAYOUT", "VpcFlowReader", "looks_like_vpcflow"]

DEFAULT_LAYOUT: Final = (
    "version", "account-id", "interface-id", "srcaddr", "dstaddr", "srcport", "dstport", "protocol", "packets",
    "bytes", "start", "end", "action", "log-status",
)  # fmt: skip
_INTEGERS: Final = frozenset(
    {"version", "srcport", "dstport", "protocol", "packets", "bytes", "start", "end", "tcp-flags", "traffic-path"}
)
_FIELD_NAME = re.compile(rb"^[a-z][a-z0-9-]*$")
_ICMP: Final = frozenset({1, 58})
_SYN, _SYN_ACK = 2, 18


def _header_fields(tokens: list[bytes]) -> list[str] | None:
    """The field names of a header line's tokens (all are names, one of them ``version`` or ``srcaddr``)."""
    if not tokens or not all(_FIELD_NAME.match(t) for t in tokens):
        return None
    names = [t.decode() for t in tokens]
    return names if "srcaddr" in names or "version" in names else None


def looks_like_vpcflow(first: bytes) -> bool:
    """Whether an input's first line is a VPC flow log's: a header of field names, or a default-layout record
    (14 fields, a version number first, a log status last)."""
    tokens = first.split()
    if _header_fields(tokens) is not None:
        return True
    return len(tokens) == len(DEFAULT_LAYOUT) and tokens[0].isdigit() and tokens[-1] in (b"OK", b"NODATA", b"SKIPDATA")


class VpcFlowReader:
    """Reads one VPC flow log input, line by line: :meth:`record` gives the canonical input event of a record,
    ``None`` for a header line or a NODATA/SKIPDATA record. The layout is this input's; one reader per file."""

    def __init__(self, sensor: str | None = None) -> None:
        self.sensor = sensor
        self.layout: tuple[str, ...] | None = None
        self.nodata = 0
        self.skipdata = 0

    def record(self, line: bytes) -> InputEvent | None:
        raw_tokens = line.split()
        header = _header_fields(raw_tokens)
        if header is not None:
            self.layout = tuple(header)
            return None
        tokens = [t.decode("utf-8") for t in raw_tokens]
        layout = self.layout
        if layout is None:
            if len(tokens) != len(DEFAULT_LAYOUT):
                raise InputError(
                    f"vpcflow: {len(tokens)} fields and no header line names them (the default layout has"
                    f" {len(DEFAULT_LAYOUT)})"
                )
            layout = DEFAULT_LAYOUT
        elif len(tokens) != len(layout):
            raise InputError(f"vpcflow: {len(tokens)} fields for a header of {len(layout)}")
        rec: dict[str, Any] = {}
        for name, value in zip(layout, tokens, strict=True):
            if value == "-":
                continue
            if name in _INTEGERS:
                try:
                    rec[name] = int(value)
                except ValueError:
                    raise InputError(f"{name}: {value[:40]!r} is not an integer") from None
            else:
                rec[name] = value
        status = rec.get("log-status")
        if status == "NODATA":
            self.nodata += 1
            return None
        if status == "SKIPDATA":
            self.skipdata += 1
            return None
        start = rec.pop("start", None)
        if start is None:
            raise InputError("start: required (epoch seconds of the window's first packet)")
        sensor = self.sensor
        if sensor is None:
            account = rec.get("account-id")
            sensor = f"vpcflow-{account}" if isinstance(account, str) and account != "unknown" else "vpcflow"
        proto = rec.pop("protocol", None)
        src_ip, dst_ip = rec.pop("srcaddr", None), rec.pop("dstaddr", None)
        src_port, dst_port = rec.pop("srcport", None), rec.pop("dstport", None)
        if proto is None or src_ip is None or dst_ip is None:
            raise InputError("protocol: a record with log-status OK needs protocol, srcaddr and dstaddr")
        if proto in _ICMP:
            rec["icmp_type_unknown"] = True  # logged as 0 0: the type and code are not in the record
        if "bytes" in rec:
            rec["src_bytes"] = rec.pop("bytes")
        if "packets" in rec:
            rec["src_packets"] = rec.pop("packets")
        flags = rec.get("tcp-flags")
        if proto == 6 and isinstance(flags, int):
            if flags & _SYN_ACK == _SYN_ACK:
                rec["initiator"] = "dst"
            elif flags & _SYN:
                rec["initiator"] = "src"
        return InputEvent(
            source="vpcflow",
            time=start,
            sensor=sensor,
            proto=proto,
            src_ip=src_ip,
            src_port=src_port,
            dst_ip=dst_ip,
            dst_port=dst_port,
            attrs=rec,
            end_time=rec.pop("end", None),
        )
