"""A story as one OCSF 1.7.0 Network Activity event (class 4001; docs/stories.md, "OCSF").

* ``activity_id`` 6 Traffic: a story reports a session's traffic as several sensors saw it. Open (1) and Close
  (2) would claim a handshake or a teardown was observed, which a story does not know; ``final`` means only that
  no new evidence came for ``correlate.max_wait_ms``. ``type_uid`` is ``class_uid * 100 + activity_id``.
* ``time`` and ``start_time`` are the story's start, ``end_time`` its end (ms since the epoch, truncated from
  µs); ``duration`` is the body's ``duration_ms``. ``severity_id`` 1 Informational.
* ``src_endpoint`` is the story's client, ``dst_endpoint`` its server; ``traffic.bytes_out``/``packets_out`` are
  client → server (OCSF: source to destination), ``bytes_in``/``packets_in`` server → client.
  ``is_src_dst_assignment_known`` is the body's ``initiator_known``.
* ``connection_info``: Community ID, protocol number and name, IP version; ``direction_id`` 0 Unknown (which
  side is inside is not known to Storyline); ``boundary_id`` 1 Localhost when both ends are loopback addresses.
* Sensor attributes go where :mod:`engine.export.families` says. Attributes of the ``host`` profile (``actor``,
  ``device``) and of the ``security_control`` profile (``action_id``, ``disposition_id``, ``firewall_rule``) are
  emitted only with their profile named in ``metadata.profiles``. An object that would miss what OCSF requires
  of it (a process without a pid, a URL without a path, TLS without a version) is not emitted; its values go to
  ``unmapped.storyline.<family>``.
* What OCSF has no attribute for is in ``unmapped.storyline`` (the same content as ECS ``storyline.*``).

Merge stubs and flowless stories have no endpoints, which Network Activity requires (at least one of
``src_endpoint``/``dst_endpoint``): :func:`to_ocsf` raises :class:`~engine.core.errors.InputError` for them.

Pure; no I/O.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final

from engine.core.errors import InputError
from engine.correlate.body import Endpoint, Figures, StoryBody

from .ecs import message
from .families import Picked, convert, get_path, pick, storyline_namespace

__all__ = ["OCSF_VERSION", "PRODUCT_NAME", "to_ocsf"]

OCSF_VERSION: Final = "1.7.0"
PRODUCT_NAME: Final = "Storyline"

CLASS_UID: Final = 4001  # Network Activity
CATEGORY_UID: Final = 4  # Network Activity
ACTIVITY_TRAFFIC: Final = 6
_NAMES: Final = {
    "class": "Network Activity",
    "category": "Network Activity",
    "activity": "Traffic",
    "severity": "Informational",
}
# Captions of the enum values this module emits (the ``sibling`` string attributes), as OCSF 1.7.0 names them.
_ACTION: Final = {1: "Allowed", 2: "Denied"}
_DISPOSITION: Final = {1: "Allowed", 2: "Blocked"}
_IP_VERSION: Final = {4: "Internet Protocol version 4 (IPv4)", 6: "Internet Protocol version 6 (IPv6)"}
_OBSERVABLE: Final = {1: "Hostname", 2: "IP Address", 4: "User Name", 9: "Process Name"}

# Objects this module can emit and what OCSF requires of them: at least one of these attributes. Deepest first:
# dropping actor.process may leave actor empty.
_NEEDS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("actor.process", ("pid", "uid", "cpid")),
    ("actor.user", ("account", "name", "uid")),
    ("actor", ("process", "user", "invoked_by", "session", "app_name", "app_uid")),
    ("device", ("ip", "uid", "name", "hostname", "instance_uid", "interface_uid", "interface_name")),
    ("url", ("url_string", "path")),
    ("firewall_rule", ("name", "uid")),
    ("tls", ("version",)),  # required
)
# Top-level attributes that belong to a profile.
_PROFILE_OF: Final = {
    "actor": "host",
    "device": "host",
    "action_id": "security_control",
    "disposition_id": "security_control",
    "firewall_rule": "security_control",
}
# Observables: attribute paths whose string values are worth indexing, and their type_id.
_OBSERVED: Final[tuple[tuple[str, int], ...]] = (
    ("src_endpoint.ip", 2),
    ("dst_endpoint.ip", 2),
    ("dst_endpoint.hostname", 1),
    ("device.hostname", 1),
    ("url.hostname", 1),
    ("tls.sni", 1),
    ("actor.user.name", 4),
    ("actor.process.name", 9),
    ("unmapped.storyline.dns.query", 1),
)
_ICMP: Final = frozenset({1, 58})


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = doc
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value


def _delete(doc: dict[str, Any], path: str) -> None:
    *parents, leaf = path.split(".")
    parent = get_path(doc, ".".join(parents)) if parents else doc
    if isinstance(parent, dict):
        parent.pop(leaf, None)


def _endpoint(ep: Endpoint, ports: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"ip": ep.ip}
    if ports and ep.port is not None:
        out["port"] = ep.port
    return out


def _traffic(body: StoryBody) -> dict[str, Any]:
    out: dict[str, Any] = {}
    totals = body.totals
    for kind, figures in (
        ("bytes", totals.bytes if totals is not None else None),
        ("packets", totals.packets if totals is not None else None),
    ):
        f = figures or Figures()
        for name, value in ((kind, f.total), (f"{kind}_out", f.client_to_server), (f"{kind}_in", f.server_to_client)):
            if value is not None:
                out[name] = value
    return out


def _place(doc: dict[str, Any], picked: list[Picked], fallback: dict[str, Any]) -> None:
    """The families' values into ``doc``; objects that miss what OCSF requires are taken out again, and a value
    that ends up nowhere goes to ``fallback[family][attr]``."""
    placed: list[tuple[Picked, list[str]]] = []
    for chosen in picked:
        paths = []
        for target in chosen.row.ocsf:
            value = convert(target.kind, chosen.value)
            if value is not None:
                _put(doc, target.path, value)
                paths.append(target.path)
        placed.append((chosen, paths))
    for path, needs in _NEEDS:
        obj = get_path(doc, path)
        if isinstance(obj, dict) and not any(k in obj for k in needs):
            _delete(doc, path)
    for chosen, paths in placed:
        if not any(get_path(doc, p) is not None for p in paths):
            fallback.setdefault(chosen.row.family, {})[chosen.row.attr] = chosen.value


def to_ocsf(body: StoryBody, *, product_version: str) -> dict[str, Any]:
    """The story (a version 2 body with a flow) as one OCSF Network Activity event; ``product_version`` is
    Storyline's version (``metadata.product.version``). Raises :class:`InputError` for a merge stub or a flowless
    story (no endpoints)."""
    if body.merged_into is not None:
        raise InputError(
            f"story {body.story_id} revision {body.revision}: merged into {body.merged_into}; a merge stub has no"
            " endpoints, so no OCSF Network Activity form"
        )
    client, server = body.client, body.server
    if client is None or server is None or body.start_us is None or body.end_us is None:
        raise InputError(
            f"story {body.story_id} revision {body.revision}: a story without a flow has no endpoints, so no OCSF"
            " Network Activity form"
        )
    start_ms, end_ms = body.start_us // 1000, body.end_us // 1000
    ports = body.proto not in _ICMP
    doc: dict[str, Any] = {
        "activity_id": ACTIVITY_TRAFFIC,
        "activity_name": _NAMES["activity"],
        "category_uid": CATEGORY_UID,
        "category_name": _NAMES["category"],
        "class_uid": CLASS_UID,
        "class_name": _NAMES["class"],
        "type_uid": CLASS_UID * 100 + ACTIVITY_TRAFFIC,
        "type_name": f"{_NAMES['class']}: {_NAMES['activity']}",
        "severity_id": 1,
        "severity": _NAMES["severity"],
        "time": start_ms,
        "start_time": start_ms,
        "end_time": end_ms,
        "message": message(body),
    }
    if body.duration_ms is not None:
        doc["duration"] = body.duration_ms
    if body.event_count is not None:
        doc["count"] = body.event_count
    metadata: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": {"name": PRODUCT_NAME, "vendor_name": PRODUCT_NAME, "version": product_version},
        "uid": f"{body.story_id}:{body.revision}",
        "correlation_uid": body.story_id,
        "log_name": "stories",
        "processed_time": body.emitted_ms,
    }
    if body.start is not None:
        metadata["original_time"] = body.start
    if body.tenant:
        metadata["tenant_uid"] = body.tenant
    doc["metadata"] = metadata
    doc["src_endpoint"] = _endpoint(client, ports)
    doc["dst_endpoint"] = _endpoint(server, ports)
    if body.dns_names:  # the name the client looked up for the server (docs/correlation.md, DNS names)
        doc["dst_endpoint"]["hostname"] = body.dns_names[0]
    version = ipaddress.ip_address(client.ip).version
    connection: dict[str, Any] = {}
    if body.community_id is not None:
        connection["community_uid"] = body.community_id
    if body.proto is not None:
        connection["protocol_num"] = body.proto
    if body.transport is not None:
        connection["protocol_name"] = body.transport
    connection["protocol_ver_id"] = version
    connection["protocol_ver"] = _IP_VERSION[version]
    connection["direction_id"] = 0
    connection["direction"] = "Unknown"
    if ipaddress.ip_address(client.ip).is_loopback and ipaddress.ip_address(server.ip).is_loopback:
        connection["boundary_id"] = 1
        connection["boundary"] = "Localhost"
    doc["connection_info"] = connection
    if body.initiator_known is not None:
        doc["is_src_dst_assignment_known"] = body.initiator_known
    traffic = _traffic(body)
    if traffic:
        doc["traffic"] = traffic

    namespace = storyline_namespace(body)
    if not ports:  # ICMP: the port fields carry type and code as reported (docs/events.md)
        namespace["icmp"] = {"client_port": client.port, "server_port": server.port}
    _place(doc, pick(body.observers), namespace)
    if "device" in doc:
        doc["device"].update(type_id=0, type="Unknown")
    if "action_id" in doc:
        doc["action"] = _ACTION[doc["action_id"]]
    if "disposition_id" in doc:
        doc["disposition"] = _DISPOSITION[doc["disposition_id"]]
    profiles = sorted({profile for key, profile in _PROFILE_OF.items() if key in doc})
    if profiles:
        metadata["profiles"] = profiles
    doc["unmapped"] = {"storyline": namespace}

    observables = []
    for path, type_id in _OBSERVED:
        value = get_path(doc, path)
        if isinstance(value, str) and value:
            observables.append({"name": path, "type_id": type_id, "type": _OBSERVABLE[type_id], "value": value})
    doc["observables"] = observables
    return doc
