"""Suricata EVE JSON → canonical input events (docs/events.md, "Suricata EVE"; research notes:
docs/notes/input-formats.md §2).

One JSON object per line. The canonical event: ``source`` = ``suricata.<event_type>``; ``sensor`` = the caller's
``--sensor``, else EVE's ``host`` (Suricata's ``sensor-name``), else ``suricata``; the flow from ``proto``
(``TCP``, ``UDP``, ``ICMP``, ``IPv6-ICMP``… or a number), ``src_ip``/``src_port``, ``dest_ip``/``dest_port`` (for
ICMP the type and code, ``icmp_type``/``icmp_code``, stand in the ports, as in every canonical event).

Time: ``flow`` and ``netflow`` records are written when the flow ends, so their event time is the flow's
``start`` (the session's time, as other sensors report it); the record's ``timestamp`` otherwise. EVE writes
local time with an offset (``+0100``), which is read as such.

Who opened the session: in ``flow`` records and application-layer records (``http``, ``tls``, ``ssh``, ``smtp``,
``fileinfo``) ``src`` is the client (``initiator: "src"``); an ``alert`` is oriented by the packet that fired it,
so its ``direction`` decides (``to_server``: src, ``to_client``: dst); ``dns`` and ``netflow`` (one direction per
record) say nothing. Figures: a ``flow`` record's ``bytes_toserver``/``bytes_toclient`` and ``pkts_*`` become
``src_*``/``dst_*`` (src is the client); a ``netflow`` record's ``bytes``/``pkts`` are what its src sent.

Everything else of the record stays in ``attrs`` as EVE writes it (``flow_id``, ``app_proto``, the ``alert``,
``http``, ``dns``… objects). EVE's own ``community_id``, when present, is compared with the one Storyline computes
(:attr:`EveReader.community_id_mismatches`). ``stats`` records carry no network event: skipped (``None``).

Pure; no I/O.
"""

from __future__ import annotations

from typing import Any, Final

from engine.core.errors import InputError
from engine.ingest.network_identity import PORT_PROTOCOLS, community_id, parse_proto

from .canonical import InputEvent, decode_object, json_object

__all__ = ["EveReader", "looks_like_eve"]

_SKIPPED: Final = frozenset({"stats"})
_CLIENT_IS_SRC: Final = frozenset({"flow", "http", "tls", "ssh", "smtp", "fileinfo", "ftp", "rdp", "smb", "krb5"})
_ICMP: Final = frozenset({1, 58})
_PROTOS: Final = {"TCP": 6, "UDP": 17, "ICMP": 1, "IPv6-ICMP": 58, "SCTP": 132}  # as Suricata writes them
_FIGURES: Final = {
    "flow": (("bytes_toserver", "src_bytes"), ("bytes_toclient", "dst_bytes"), ("pkts_toserver", "src_packets"),
             ("pkts_toclient", "dst_packets")),
    "netflow": (("bytes", "src_bytes"), ("pkts", "src_packets")),
}  # fmt: skip
_SOURCES: dict[str, str] = {}  # event_type → "suricata.<event_type>", for the kinds met (at most 256)


def looks_like_eve(first: bytes) -> bool:
    """Whether an input's first line is an EVE record: a JSON object with ``event_type`` and ``timestamp``."""
    obj = json_object(first)
    return obj is not None and isinstance(obj.get("event_type"), str) and "timestamp" in obj


def _source(kind: str) -> str:
    source = _SOURCES.get(kind)
    if source is None:
        source = f"suricata.{kind}"
        if len(_SOURCES) < 256:
            _SOURCES[kind] = source
    return source


def _int(rec: dict[str, Any], key: str) -> int | None:
    return _int_of(rec.get(key), key)


def _int_of(value: object, key: str) -> int | None:
    if value.__class__ is int or value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{key}: expected an integer, got {value!r}"[:120])
    return value


class EveReader:
    """Reads one EVE input, line by line: :meth:`record` gives the canonical input event of a record, ``None``
    for a record kind that carries no network event (``stats``)."""

    def __init__(self, sensor: str | None = None, community_id_seed: int = 0) -> None:
        self.sensor = sensor
        self.seed = community_id_seed
        self.community_id_mismatches = 0
        self.first_mismatch: str | None = None

    def record(self, line: bytes) -> InputEvent | None:
        rec = decode_object(line, "an EVE line")
        kind = rec.get("event_type")
        if not isinstance(kind, str) or not kind:
            raise InputError("event_type: required (a Suricata EVE record)")
        if kind in _SKIPPED:
            return None
        time = rec.get("timestamp")
        found = rec.get(kind)
        body: dict[str, Any] = found if isinstance(found, dict) else {}
        if kind in ("flow", "netflow") and isinstance(body.get("start"), str):
            time = body["start"]
        if not isinstance(time, str):
            raise InputError("timestamp: required (an ISO 8601 time with an offset)")
        sensor = self.sensor
        if sensor is None:
            host = rec.get("host")
            sensor = host if isinstance(host, str) and host else "suricata"
        # The record itself becomes the attributes: what the canonical event carries elsewhere is taken out.
        pop = rec.pop
        pop("timestamp", None), pop("event_type", None), pop("host", None)
        proto_value, src_ip, src_port_value = pop("proto", None), pop("src_ip", None), pop("src_port", None)
        dst_ip, dst_port_value, flow_id = pop("dest_ip", None), pop("dest_port", None), pop("flow_id", None)
        attrs = rec
        session = str(flow_id) if isinstance(flow_id, int) and not isinstance(flow_id, bool) else None
        end = body.get("end") if kind in ("flow", "netflow") and isinstance(body.get("end"), str) else None
        if not isinstance(src_ip, str) or not isinstance(dst_ip, str) or not isinstance(proto_value, str | int):
            for key, value in (("proto", proto_value), ("src_ip", src_ip), ("src_port", src_port_value),
                               ("dest_ip", dst_ip), ("dest_port", dst_port_value)):  # fmt: skip
                if value is not None:  # flowless: kept as reported
                    attrs[key] = value
            return InputEvent(
                source=_source(kind), time=time, sensor=sensor, attrs=attrs, session=session, end_time=end
            )
        proto = _PROTOS.get(proto_value) if proto_value.__class__ is str else None
        if proto is None:
            proto = parse_proto(proto_value)
        src_port, dst_port = _int_of(src_port_value, "src_port"), _int_of(dst_port_value, "dest_port")
        if proto in _ICMP:
            src_port, dst_port = _int(rec, "icmp_type"), _int(rec, "icmp_code")
        elif proto not in PORT_PROTOCOLS:
            src_port = dst_port = None
        initiator = self._initiator(kind, rec)
        if initiator is not None:
            attrs["initiator"] = initiator
        figures = _FIGURES.get(kind)
        if figures is not None:
            get = body.get
            for eve_name, figure in figures:
                value = get(eve_name)
                if value.__class__ is int:  # a count (not a boolean)
                    attrs[figure] = value
        theirs = rec.get("community_id")
        if isinstance(theirs, str):
            try:
                ours = community_id(proto, src_ip, src_port, dst_ip, dst_port, seed=self.seed)
            except InputError:
                ours = None  # the addresses are bad: the event is rejected by normalize, naming them
            if ours is not None and ours != theirs:
                self.community_id_mismatches += 1
                if self.first_mismatch is None:
                    self.first_mismatch = f"EVE {theirs}, Storyline {ours} (flow_id {flow_id})"
        return InputEvent(
            source=_source(kind),
            time=time,
            sensor=sensor,
            proto=proto,
            src_ip=src_ip,
            src_port=src_port,
            dst_ip=dst_ip,
            dst_port=dst_port,
            attrs=attrs,
            session=session,
            end_time=end,
        )

    @staticmethod
    def _initiator(kind: str, rec: dict[str, Any]) -> str | None:
        if kind in _CLIENT_IS_SRC:
            return "src"
        if kind == "alert":
            direction = rec.get("direction")
            return "src" if direction == "to_server" else "dst" if direction == "to_client" else None
        return None
