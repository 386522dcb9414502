"""What a Zeek, Suricata or VPC Flow Logs sensor would have written of a simulated scenario, with its truth
(``storyline simulate --format zeek|eve|vpcflow``; issue 18).

:func:`sensor_view` takes the scenario of :mod:`engine.tools.simulate` and keeps the reports such a sensor sees,
written in its own format — so the readers of :mod:`engine.ingest` are tested end to end against a known answer:

* **zeek** — the ``firewall`` reports as ``conn.log`` records, ``dns`` as ``dns.log``, ``http`` as ``http.log``
  (port 443: ``ssl.log`` with the server name); Zeek JSON lines with ``_path`` and ``_node`` (the
  json-streaming-logs layout), one Zeek node per simulated sensor (``zeek-fw-1`` …) with that sensor's clock.
  Zeek writes every record originator first, so a reversed report is turned around (its figures too).
* **eve** — ``firewall`` as ``flow`` records (client first, per-direction figures), ``dns`` as ``dns`` (v3, in the
  report's direction), ``http`` as ``http`` (port 443: ``tls``), and with ``alert_fraction`` an ``alert`` record
  after some flow records (same flow id, direction ``to_server``); ``host`` is ``suricata-<sensor>``.
* **vpcflow** — the ``cloud`` reports as version-2 records (one per direction, as the simulator writes them),
  after the default header; the account id stands for the simulated sensor (``vpcflow-1`` → ``123456789001``), so
  the sensor ingest names is ``vpcflow-123456789001``; ``start`` is the report's time cut to the second.

A flow record of a scenario with spans (``Scenario.spans``: an ``end_time``) keeps its span: Zeek ``duration``,
EVE ``flow.end``, VPC ``end`` (rounded up to the second); without one, EVE's end is half a second after the start
and VPC's a minute (a capture window), and Zeek writes no duration.

Session ids (Zeek ``uid``, EVE ``flow_id``) are one per simulated sensor and story, as a real sensor's would be.
The truth is keyed by the ids ingest gives these lines (each line is parsed here with the format's reader), its
skews by the names ingest gives the sensors. :attr:`View.subset` is the scenario's own events that the view
writes, so the canonical run on the same subset can be compared with the view's run. Pure; no I/O.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Sequence
from typing import Any, Final, Literal, NamedTuple

import msgspec
import xxhash

from engine.ingest.canonical import ParseRules, parse_time_us
from engine.ingest.formats import LineParser

from .simulate import SimEvent, Truth

__all__ = ["VIEW_FORMATS", "View", "ViewFormat", "sensor_view"]

ViewFormat = Literal["zeek", "eve", "vpcflow"]
VIEW_FORMATS: Final[tuple[ViewFormat, ...]] = ("zeek", "eve", "vpcflow")
_SEEN: Final[dict[str, frozenset[str]]] = {
    "zeek": frozenset({"firewall", "dns", "http"}),
    "eve": frozenset({"firewall", "dns", "http"}),
    "vpcflow": frozenset({"cloud"}),
}
_VPC_HEADER: Final = b" ".join(
    [b"version", b"account-id", b"interface-id", b"srcaddr", b"dstaddr", b"srcport", b"dstport", b"protocol",
     b"packets", b"bytes", b"start", b"end", b"action", b"log-status"]
)  # fmt: skip
_PROTO_NUMBER: Final = {"tcp": 6, "udp": 17}
_encoder = msgspec.json.Encoder()


class View(NamedTuple):
    """A sensor's view of a scenario: ``lines`` in arrival order (a header line first where the format has one)
    with each line's arrival (``arrivals``, seconds after the scenario's start), the ``truth`` keyed by the ids
    ingest gives the lines, and ``subset``: the scenario's events the view writes (alerts are extra)."""

    lines: list[bytes]
    arrivals: list[float]
    truth: Truth
    subset: list[SimEvent]


def sensor_view(
    events: Sequence[SimEvent], truth: Truth, fmt: ViewFormat, *, alert_fraction: float = 0.0, now_ms: int
) -> View:
    """What a ``fmt`` sensor writes of a scenario (``events`` and ``truth`` of :func:`~engine.tools.simulate.
    generate`). ``now_ms`` is the time the lines will be ingested at (for the id check of every line)."""
    if fmt not in VIEW_FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(VIEW_FORMATS)}")
    if not 0.0 <= alert_fraction <= 1.0:
        raise ValueError(f"alert_fraction: {alert_fraction} must be within [0, 1]")
    rnd = random.Random(truth.scenario.seed * 7919 + VIEW_FORMATS.index(fmt))
    parser = LineParser(fmt)
    rules = ParseRules()
    lines: list[bytes] = []
    arrivals: list[float] = []
    stories: dict[str, str] = {}
    view_arrivals: dict[str, float] = {}
    skews: dict[str, float] = {}
    subset: list[SimEvent] = []
    if fmt == "vpcflow":
        lines.append(_VPC_HEADER)
        arrivals.append(events[0].arrival_s if events else 0.0)
    for ev in events:
        if ev.source not in _SEEN[fmt]:
            continue
        doc = msgspec.json.decode(ev.line)
        written: list[tuple[bytes, str]] = []
        if fmt == "zeek":
            written.append(_zeek(ev, doc))
        elif fmt == "eve":
            written.append(_eve(ev, doc))
            if ev.source == "firewall" and rnd.random() < alert_fraction:
                written.append(_eve_alert(ev, doc))
        else:
            written.append(_vpc(ev, doc))
        for i, (line, sensor) in enumerate(written):
            event = parser(line, rules, now_ms)
            if event is None or event.id in stories:  # equal lines are one event, as ingest counts them
                continue
            stories[event.id] = ev.story
            view_arrivals[event.id] = ev.arrival_s + i * 0.001
            skews[sensor] = truth.skews[ev.sensor]
            lines.append(line)
            arrivals.append(ev.arrival_s + i * 0.001)
            if i == 0:
                subset.append(ev)
    flows = {k: v for k, v in truth.flows.items() if k in set(stories.values())}
    view_truth = Truth(stories=stories, skews=skews, scenario=truth.scenario, arrivals=view_arrivals, flows=flows)
    return View(lines, arrivals, view_truth, subset)


def _us(doc: dict[str, Any]) -> int:
    return parse_time_us(doc["time"])


def _end_us(doc: dict[str, Any]) -> int:
    return parse_time_us(doc["end_time"])


def _iso(us: int) -> str:
    """EVE's timestamp form: local time with a numeric offset (UTC here), microseconds."""
    return (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)).strftime(
        "%Y-%m-%dT%H:%M:%S.%f+0000"
    )


def _oriented(ev: SimEvent, doc: dict[str, Any]) -> tuple[str, int, str, int]:
    """(client ip, client port, server ip, server port) of a report: the reported source unless it is reversed."""
    if ev.reversed:
        return doc["dst_ip"], doc["dst_port"], doc["src_ip"], doc["src_port"]
    return doc["src_ip"], doc["src_port"], doc["dst_ip"], doc["dst_port"]


def _session_id(sensor: str, story: str) -> int:
    return xxhash.xxh64_intdigest(f"{sensor}\0{story}".encode()) >> 13  # < 2**51: an EVE flow_id is a JSON integer


def _zeek(ev: SimEvent, doc: dict[str, Any]) -> tuple[bytes, str]:
    node = f"zeek-{ev.sensor}"
    attrs = doc["attrs"]
    client, cport, server, sport = _oriented(ev, doc)
    rec: dict[str, Any] = {"ts": _us(doc) / 1e6, "uid": f"C{_session_id(node, ev.story):x}", "id.orig_h": client,
                           "id.orig_p": cport, "id.resp_h": server, "id.resp_p": sport}  # fmt: skip
    if ev.source == "firewall":
        near, far = ("dst", "src") if ev.reversed else ("src", "dst")
        blocked = attrs["action"] == "deny"
        rec = {"_path": "conn", **rec, "proto": doc["proto"], "conn_state": "REJ" if blocked else "SF",
               "orig_pkts": attrs[f"{near}_packets"], "orig_ip_bytes": attrs[f"{near}_bytes"],
               "resp_pkts": attrs[f"{far}_packets"], "resp_ip_bytes": attrs[f"{far}_bytes"]}  # fmt: skip
        if "end_time" in doc:  # a span (Scenario.spans): Zeek gives it as a duration
            rec["duration"] = round((_end_us(doc) - _us(doc)) / 1e6, 6)
    elif ev.source == "dns":
        answers = [a for a in attrs["answer"] if isinstance(a, str)]
        rec = {"_path": "dns", **rec, "proto": "udp", "trans_id": _session_id(node, ev.story) & 0xFFFF,
               "query": attrs["query"], "qtype_name": "A", "rcode_name": attrs["rcode"], "answers": answers,
               "TTLs": [300.0] * len(answers)}  # fmt: skip
    elif sport == 443:
        rec = {"_path": "ssl", **rec, "version": "TLSv13", "server_name": attrs["host"], "established": True}
    else:
        rec = {"_path": "http", **rec, "trans_depth": 1, "method": attrs["method"], "host": attrs["host"],
               "uri": attrs["path"], "user_agent": attrs["user_agent"], "status_code": attrs["status"]}  # fmt: skip
    rec["_node"] = node
    return _encoder.encode(rec), node


def _eve(ev: SimEvent, doc: dict[str, Any]) -> tuple[bytes, str]:
    host = f"suricata-{ev.sensor}"
    attrs = doc["attrs"]
    us = _us(doc)
    client, cport, server, sport = _oriented(ev, doc)
    rec: dict[str, Any] = {"timestamp": _iso(us), "flow_id": _session_id(host, ev.story), "in_iface": "eth0"}
    endpoints = {"src_ip": client, "src_port": cport, "dest_ip": server, "dest_port": sport,
                 "proto": doc["proto"].upper()}  # fmt: skip
    if ev.source == "firewall":
        near, far = ("dst", "src") if ev.reversed else ("src", "dst")
        end = _end_us(doc) if "end_time" in doc else us + 500_000
        rec |= {"event_type": "flow", **endpoints, "host": host, "flow": {
            "pkts_toserver": attrs[f"{near}_packets"], "pkts_toclient": attrs[f"{far}_packets"],
            "bytes_toserver": attrs[f"{near}_bytes"], "bytes_toclient": attrs[f"{far}_bytes"],
            "start": _iso(us), "end": _iso(end), "age": 0, "state": "closed", "reason": "timeout",
            "alerted": False}}  # fmt: skip
    elif ev.source == "dns":  # in the report's direction: a response from the server when reversed
        endpoints = {"src_ip": doc["src_ip"], "src_port": doc["src_port"], "dest_ip": doc["dst_ip"],
                     "dest_port": doc["dst_port"], "proto": "UDP"}  # fmt: skip
        answers = [{"rrname": attrs["query"], "rrtype": "A", "ttl": 300, "rdata": a}
                   for a in attrs["answer"] if isinstance(a, str)]  # fmt: skip
        rec |= {"event_type": "dns", **endpoints, "host": host, "dns": {
            "version": 3, "type": "response", "id": rec["flow_id"] & 0xFFFF, "rcode": attrs["rcode"],
            "queries": [{"rrname": attrs["query"], "rrtype": "A"}], "answers": answers}}  # fmt: skip
    elif sport == 443:
        rec |= {"event_type": "tls", **endpoints, "host": host,
                "tls": {"sni": attrs["host"], "version": "TLS 1.3", "subject": f"CN={attrs['host']}"}}  # fmt: skip
    else:
        rec |= {"event_type": "http", **endpoints, "host": host, "tx_id": 0, "http": {
            "hostname": attrs["host"], "url": attrs["path"], "http_user_agent": attrs["user_agent"],
            "http_method": attrs["method"], "protocol": "HTTP/1.1", "status": attrs["status"]}}  # fmt: skip
    return _encoder.encode(rec), host


def _eve_alert(ev: SimEvent, doc: dict[str, Any]) -> tuple[bytes, str]:
    host = f"suricata-{ev.sensor}"
    client, cport, server, sport = _oriented(ev, doc)
    rec = {"timestamp": _iso(_us(doc) + 200_000), "flow_id": _session_id(host, ev.story), "in_iface": "eth0",
           "event_type": "alert", "src_ip": client, "src_port": cport, "dest_ip": server, "dest_port": sport,
           "proto": doc["proto"].upper(), "direction": "to_server", "host": host,
           "alert": {"action": "allowed", "gid": 1, "signature_id": 2_013_028, "rev": 7,
                     "signature": "ET POLICY simulated", "category": "Potential Corporate Privacy Violation",
                     "severity": 2}}  # fmt: skip
    return _encoder.encode(rec), host


def _vpc(ev: SimEvent, doc: dict[str, Any]) -> tuple[bytes, str]:
    attrs = doc["attrs"]
    account = 123_456_789_000 + int(ev.sensor.rsplit("-", 1)[1])
    start = _us(doc) // 1_000_000
    end = -(-_end_us(doc) // 1_000_000) if "end_time" in doc else start + 60
    eni = f"eni-{xxhash.xxh64_hexdigest(str(attrs['vpc']).encode())[:17]}"
    fields = ["2", str(account), eni, doc["src_ip"], doc["dst_ip"], str(doc["src_port"]), str(doc["dst_port"]),
              str(_PROTO_NUMBER[doc["proto"]]), str(attrs["src_packets"]), str(attrs["src_bytes"]), str(start),
              str(end), attrs["action"], "OK"]  # fmt: skip
    return " ".join(fields).encode(), f"vpcflow-{account}"
