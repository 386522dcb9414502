"""A story as one Elastic Common Schema document (ECS 9.3; docs/stories.md, "ECS").

The document describes the story's session: ``@timestamp`` is the story's start (the earliest corrected event
time), so it stays the same across revisions and a consumer can upsert by ``event.id`` (the story id). Client
and server are ECS ``client``/``server`` and also ``source``/``destination`` (ECS: the source is the side that
initiated the session, when known — here the story's client whichever rule decided it; ``storyline.initiator_*``
tells how sure that is). Figures are the story's reconciled totals. Sensor attributes go where
:mod:`engine.export.families` says; what ECS has no field for is under the custom field set ``storyline``
(ECS recommends nesting custom fields under a proper name).

Categorization: ``event.kind`` ``event``; ``event.category`` ``network`` (``host`` for a flowless story whose
sensors are all endpoint agents or of no family); ``event.type`` ``connection`` plus ``end`` for a final
revision or ``start`` for a provisional one (flowless stories and merge stubs: ``info``), plus ``protocol`` when a
DNS, HTTP or TLS sensor reported it, plus ``allowed``/``denied`` from a firewall's or flow log's action — all of
them expected event types of the category in ECS.

Pure; no I/O.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final

from engine.correlate.body import Endpoint, Figures, StoryBody

from .families import (
    APP_PROTOCOL,
    convert,
    families_present,
    get_path,
    pick,
    primary,
    rfc3339_ms,
    storyline_namespace,
)

__all__ = ["ECS_VERSION", "NAMESPACE", "message", "to_ecs"]

ECS_VERSION: Final = "9.3.0"
"""``ecs.version``. The fields used are checked against the pinned 9.3.0-dev reference (tests/data), whose
fields used here are unchanged in 9.4.0."""

NAMESPACE: Final = "storyline"
"""The custom field set for what ECS has no field for."""

_ARRAYS: Final = frozenset(
    {"event.type", "event.category", "related.ip", "related.hosts", "related.user", "dns.resolved_ip", "dns.answers"}
)
_NETWORK_FAMILIES: Final = frozenset({"flow", "dns", "http", "tls"})
_ICMP: Final = frozenset({1, 58})


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in a nested document; array fields (:data:`_ARRAYS`) collect values, without repeats."""
    *parents, leaf = path.split(".")
    node = doc
    for name in parents:
        node = node.setdefault(name, {})
    if path in _ARRAYS:
        have: list[Any] = node.setdefault(leaf, [])
        for v in value if isinstance(value, list) else [value]:
            if v not in have:
                have.append(v)
    else:
        node[leaf] = value


def _hostport(ep: Endpoint, ports: bool) -> str:
    host = f"[{ep.ip}]" if ":" in ep.ip else ep.ip
    return f"{host}:{ep.port}" if ports and ep.port is not None else host


def message(body: StoryBody) -> str:
    """A one-line summary of the story (ECS ``message``, OCSF ``message``)."""
    if body.merged_into is not None:
        return f"story {body.story_id} was merged into story {body.merged_into}"
    sensors = ", ".join(o.sensor for o in body.observers or ())
    seen = f"{body.event_count} events from {sensors}"
    if body.client is None or body.server is None:
        return f"story {body.story_id}: {seen} (no flow)"
    proto = body.transport or f"IP protocol {body.proto}"
    ports = body.proto not in _ICMP
    guessed = "" if body.initiator_known else " (client guessed)"
    return (
        f"story {body.story_id}: {proto} {_hostport(body.client, ports)} -> {_hostport(body.server, ports)}"
        f"{guessed}, {seen}"
    )


def _side(ep: Endpoint, ports: bool, octets: int | None, packets: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"address": ep.ip, "ip": ep.ip}
    if ports and ep.port is not None:
        out["port"] = ep.port
    if octets is not None:
        out["bytes"] = octets
    if packets is not None:
        out["packets"] = packets
    return out


def to_ecs(body: StoryBody) -> dict[str, Any]:
    """The story (a version 2 body, a merge stub included) as one ECS document (nested objects)."""
    flow = body.client is not None and body.server is not None
    present = families_present(body.observers)
    network = flow or body.merged_into is not None or any(f in _NETWORK_FAMILIES for f in present)
    protocol = next((APP_PROTOCOL[f] for f in present if f in APP_PROTOCOL), None)
    types = ["connection", "end" if body.final else "start"] if flow else ["info"]
    if protocol is not None and network:
        types.append("protocol")

    doc: dict[str, Any] = {
        "@timestamp": body.start if body.start is not None else rfc3339_ms(body.emitted_ms),
        "ecs": {"version": ECS_VERSION},
        "message": message(body),
    }
    event: dict[str, Any] = {
        "kind": "event",
        "category": ["network" if network else "host"],
        "type": types,
        "id": body.story_id,
        "created": rfc3339_ms(body.emitted_ms),
    }
    if body.start is not None and body.end is not None:
        event["start"] = body.start
        event["end"] = body.end
    if body.start_us is not None and body.end_us is not None:
        event["duration"] = (body.end_us - body.start_us) * 1000  # ECS: nanoseconds
    doc["event"] = event

    namespace = storyline_namespace(body)
    if body.client is not None and body.server is not None:
        ports = body.proto not in _ICMP
        totals = body.totals
        octets = totals.bytes if totals is not None and totals.bytes is not None else Figures()
        packets = totals.packets if totals is not None and totals.packets is not None else Figures()
        client = _side(body.client, ports, octets.client_to_server, packets.client_to_server)
        server = _side(body.server, ports, octets.server_to_client, packets.server_to_client)
        doc["source"] = client
        doc["destination"] = server
        doc["client"] = dict(client)
        doc["server"] = dict(server)
        net: dict[str, Any] = {}
        if body.community_id is not None:
            net["community_id"] = body.community_id
        if body.transport is not None:
            net["transport"] = body.transport
        if body.proto is not None:
            net["iana_number"] = str(body.proto)  # a keyword in ECS
        net["type"] = f"ipv{ipaddress.ip_address(body.client.ip).version}"
        if octets.total is not None:
            net["bytes"] = octets.total
        if packets.total is not None:
            net["packets"] = packets.total
        if protocol is not None:
            net["protocol"] = protocol
        doc["network"] = net
        _put(doc, "related.ip", [body.client.ip, body.server.ip])
        if not ports:  # ICMP: the port fields carry type and code as reported (docs/events.md)
            namespace["icmp"] = {"client_port": body.client.port, "server_port": body.server.port}
    elif protocol is not None and network:
        doc["network"] = {"protocol": protocol}

    lead = primary(body.observers)
    if lead is not None:
        doc["observer"] = {"name": lead.sensor, "type": lead.source}

    for chosen in pick(body.observers):
        placed = False
        for target in chosen.row.ecs:
            value = convert(target.kind, chosen.value)
            if value is None:
                continue
            _put(doc, target.path, value)
            placed = True
        if not placed:
            namespace.setdefault(chosen.row.family, {})[chosen.row.attr] = chosen.value
    if body.dns_names and "destination" in doc:
        # the name the client looked up for the server (docs/correlation.md, DNS names); a DNS story's own query
        # (its observers' dns.question.name) is not replaced
        name = body.dns_names[0]
        doc["destination"]["domain"] = name
        doc["server"]["domain"] = name
        if get_path(doc, "dns.question.name") is None:
            _put(doc, "dns.question.name", name)
        _put(doc, "related.hosts", [name])
    doc[NAMESPACE] = namespace
    return doc
