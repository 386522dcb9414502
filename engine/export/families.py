"""Source families: which sensor attributes become which ECS and OCSF fields, in one table (docs/stories.md,
"ECS and OCSF").

A story's observers report free-form ``attrs`` (docs/events.md). Most of them mean the same thing across sensors
of one kind: a DNS server's ``query``, a proxy's ``method``. A *family* names such a kind (``flow``, ``endpoint``,
``dns``, ``http``, ``tls``); :data:`SOURCE_FAMILY` says which family a ``source`` belongs to, and :data:`ROWS`
says, per family and attribute, where its value goes in ECS and in OCSF Network Activity. A new input format
extends the mapping by adding rows here (a source name to :data:`SOURCE_FAMILY`, attributes to :data:`ROWS`);
the mappers (:mod:`engine.export.ecs`, :mod:`engine.export.ocsf`) read nothing else.

Choosing a value when several observers of one family report an attribute: the observers are taken in sensor
name order (the body's order) and the first one that reports the attribute (not null) gives it. Sensor name
order, not event counts, so that the choice does not change from one revision to the next as events arrive.
Every observer's own attributes stay in the ``storyline.observers`` list of both documents.

A value whose target's kind it does not fit (a ``pid`` that is a string of letters), or a row with no target
in one of the formats, goes to ``storyline.<family>.<attr>`` of that document instead, as it is.

Also here, because both mappers need them: the *primary* observer (:func:`primary`) and the ``storyline``
namespace (:func:`storyline_namespace`). Pure; no I/O.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping
from typing import Any, Final, Literal, NamedTuple

import msgspec

from engine.correlate.body import Observer, StoryBody
from engine.correlate.dns import DNS_PATHS
from engine.correlate.paths import get_path

__all__ = [
    "APP_PROTOCOL",
    "FAMILIES",
    "FORMAT_FAMILIES",
    "ROWS",
    "SOURCE_FAMILY",
    "Kind",
    "Picked",
    "Row",
    "Target",
    "action_verdict",
    "convert",
    "families_present",
    "family_of",
    "get_path",
    "pick",
    "primary",
    "rfc3339_ms",
    "storyline_namespace",
]

FAMILIES: Final[tuple[str, ...]] = ("flow", "endpoint", "dns", "http", "tls")
"""The families, in the order their fields are placed (and ``network.protocol`` is chosen: the first of dns,
http, tls that is present)."""

SOURCE_FAMILY: Final[Mapping[str, str]] = {
    "firewall": "flow",  # session records: action, rule, figures, initiator
    "cloud": "flow",  # VPC flow logs: action, vpc, account, one record per direction
    "endpoint": "endpoint",  # an EDR agent: process, pid, user, host
    "dns": "dns",  # a resolver's query log: query, answer, rcode
    "http": "http",  # a proxy's access log: method, host, path, status, user_agent
    "tls": "tls",  # a TLS sensor (a Zeek ssl.log, an inspecting proxy): sni, version, cipher, ja3, ja3s
}
"""``source`` → family. Sources not listed belong to no family (unless a sensor format's, below): their
attributes are only in ``storyline.observers``."""

Paths = tuple[str, ...]
"""Where an attribute is in a sensor format's record: dotted paths into the observer's attrs, the first that holds
a value wins (``*`` maps over a list, a number indexes one)."""

FORMAT_FAMILIES: Final[Mapping[str, Mapping[str, tuple[Paths, Mapping[str, Paths]]]]] = {
    "zeek": {  # one Zeek node is one observer: its conn, dns, http and ssl records' attributes merged
        "flow": (("conn_state", "history"), {}),
        "dns": (("query", "qtype_name", "rcode_name"), {"query": DNS_PATHS["zeek"]["query"],
                                                        "answer": DNS_PATHS["zeek"]["answer"],
                                                        "rcode": ("rcode_name",)}),
        "http": (("status_code", "uri", "trans_depth"), {"method": ("method",), "host": ("host",), "path": ("uri",),
                                                         "status": ("status_code",), "user_agent": ("user_agent",)}),
        "tls": (("server_name", "cipher", "ssl_history", "established"), {
            "sni": ("server_name",), "version": ("version",), "cipher": ("cipher",), "ja3": ("ja3",),
            "ja3s": ("ja3s",)}),
    },
    "suricata": {  # EVE: each record kind's fields under its own key
        "flow": (("flow", "netflow"), {}),
        "dns": (("dns",), {"query": DNS_PATHS["suricata"]["query"], "answer": DNS_PATHS["suricata"]["answer"],
                           "rcode": ("dns.rcode",)}),
        "http": (("http",), {"method": ("http.http_method",), "host": ("http.hostname",), "path": ("http.url",),
                             "status": ("http.status",), "user_agent": ("http.http_user_agent",)}),
        "tls": (("tls",), {"sni": ("tls.sni",), "version": ("tls.version",), "ja3": ("tls.ja3.hash",),
                           "ja3s": ("tls.ja3s.hash",)}),
    },
    "vpcflow": {"flow": (("action",), {"action": ("action",), "vpc": ("vpc-id",), "account": ("account-id",)})},
}  # fmt: skip
"""Sensor formats (docs/events.md): the ``source`` prefix (``zeek`` of ``zeek.http``; ``vpcflow``) → family →
(marker fields: the observer belongs to the family when it reports one of them; attribute → its paths). One
observer of a Zeek node or a Suricata sensor can belong to several families: its sensor writes one log per
protocol and the body merges them per sensor. Attributes the table does not name stay in
``storyline.observers`` only."""

APP_PROTOCOL: Final[Mapping[str, str]] = {"dns": "dns", "http": "http", "tls": "tls"}
"""The application protocol a family's presence tells (ECS ``network.protocol``, event type ``protocol``)."""

Kind = Literal["keyword", "integer", "ips", "dns_answers", "ecs_action", "ocsf_action", "ocsf_disposition"]
"""How a value is converted for its target (:func:`convert`):

* ``keyword`` — a string as it is; a number (not a boolean) as its decimal text;
* ``integer`` — an integer (not a boolean) within ±2³¹, or a string of decimal digits;
* ``ips`` — an IP address or a list of them, canonical text; the values that are not addresses are left out;
* ``dns_answers`` — an answer or a list of them (strings or numbers): ECS ``dns.answers`` objects (``data``);
* ``ecs_action`` — a firewall verdict (:func:`action_verdict`) as the ECS event type ``allowed``/``denied``;
* ``ocsf_action``, ``ocsf_disposition`` — the verdict as OCSF ``action_id`` (1 Allowed, 2 Denied) and
  ``disposition_id`` (1 Allowed, 2 Blocked)."""


class Target(NamedTuple):
    """Where a value goes: a dotted path in the document and how it is converted. ECS paths of array fields
    (``related.*``, ``event.type``, ``dns.resolved_ip``, ``dns.answers``) collect values from several rows."""

    path: str
    kind: Kind = "keyword"


class Row(NamedTuple):
    """One attribute of one family and its targets in each format (none: the value goes to
    ``storyline.<family>.<attr>`` of that format's document)."""

    family: str
    attr: str
    ecs: tuple[Target, ...]
    ocsf: tuple[Target, ...]


def _t(path: str, kind: Kind = "keyword") -> Target:
    return Target(path, kind)


# ECS targets are fields of the pinned ECS reference (tests/data/ecs_fields.json); process.*, user.*, host.*,
# user_agent.* and rule.* are not in it, so those attributes have related.* or no ECS target.
# OCSF targets are attributes of class 4001 and its objects; dns and http request/response fields belong to
# other classes (DNS Activity 4003, HTTP Activity 4002), so those attributes have no OCSF target.
ROWS: Final[tuple[Row, ...]] = (
    Row(
        "flow",
        "action",
        (_t("event.type", "ecs_action"),),
        (_t("action_id", "ocsf_action"), _t("disposition_id", "ocsf_disposition")),
    ),
    Row("flow", "rule", (), (_t("firewall_rule.name"),)),
    Row("flow", "vpc", (), ()),
    Row("flow", "account", (), ()),
    Row("endpoint", "process", (), (_t("actor.process.name"),)),
    Row("endpoint", "pid", (), (_t("actor.process.pid", "integer"),)),
    Row("endpoint", "user", (_t("related.user"),), (_t("actor.user.name"),)),
    Row("endpoint", "host", (_t("related.hosts"),), (_t("device.hostname"),)),
    Row("dns", "query", (_t("dns.question.name"), _t("related.hosts")), ()),
    Row("dns", "answer", (_t("dns.answers", "dns_answers"), _t("dns.resolved_ip", "ips"), _t("related.ip", "ips")), ()),
    Row("dns", "rcode", (_t("dns.response_code"),), ()),
    Row("http", "method", (_t("http.request.method"),), ()),
    Row("http", "host", (_t("url.domain"), _t("related.hosts")), (_t("url.hostname"),)),
    Row("http", "path", (_t("url.path"),), (_t("url.path"),)),
    Row("http", "status", (_t("http.response.status_code", "integer"),), ()),
    Row("http", "user_agent", (), ()),
    Row("tls", "sni", (_t("tls.client.server_name"), _t("related.hosts")), (_t("tls.sni"),)),
    Row("tls", "version", (_t("tls.version"),), (_t("tls.version"),)),
    Row("tls", "cipher", (_t("tls.cipher"),), (_t("tls.cipher"),)),
    Row("tls", "ja3", (_t("tls.client.ja3"),), ()),
    Row("tls", "ja3s", (_t("tls.server.ja3s"),), ()),
)
"""The mapping table (docs/stories.md renders it). Rows of one family are placed in this order."""

_ALLOWED: Final = frozenset({"allow", "allowed", "accept", "accepted", "permit", "permitted", "pass"})
_DENIED: Final = frozenset({"deny", "denied", "drop", "dropped", "reject", "rejected", "block", "blocked"})
_INT32: Final = 2**31
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


_FORMAT_SOURCE_FAMILY: Final = {"zeek.conn": "flow", "zeek.dns": "dns", "zeek.http": "http", "zeek.ssl": "tls",
                                 "suricata.flow": "flow", "suricata.netflow": "flow", "suricata.dns": "dns",
                                 "suricata.http": "http", "suricata.tls": "tls", "vpcflow": "flow"}  # fmt: skip


def family_of(source: str) -> str | None:
    """The family of a ``source`` (None: none) — a sensor format's source by its log (``zeek.ssl`` → tls)."""
    return SOURCE_FAMILY.get(source) or _FORMAT_SOURCE_FAMILY.get(source)


def _views(o: Observer) -> list[tuple[str, Mapping[str, Paths] | None]]:
    """The families an observer belongs to, each with where its attributes are (None: under the rows' own
    names)."""
    sources = o.sources or [o.source]
    canonical = {SOURCE_FAMILY[s] for s in sources if s in SOURCE_FAMILY}
    if canonical:
        return [(family, None) for family in FAMILIES if family in canonical]
    table = FORMAT_FAMILIES.get(o.source.partition(".")[0])
    if table is None:
        return []
    own = {_FORMAT_SOURCE_FAMILY.get(s) for s in sources}
    return [
        (f, paths)
        for f, (markers, paths) in table.items()
        if f in own or any(get_path(o.attrs, m) is not None for m in markers)
    ]


def action_verdict(value: object) -> Literal["allowed", "denied"] | None:
    """A firewall or flow-log action (``allow``, ``deny``, ``ACCEPT``, ``REJECT``, ``drop`` …; any case) as
    allowed or denied; None for anything else."""
    if not isinstance(value, str):
        return None
    v = value.strip().lower()
    return "allowed" if v in _ALLOWED else "denied" if v in _DENIED else None


def _ip(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def _keyword(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _items(value: object) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def convert(kind: Kind, value: object) -> Any:
    """``value`` converted for a target of ``kind`` (:data:`Kind`), or None when it does not fit."""
    if kind == "keyword":
        return _keyword(value)
    if kind == "integer":
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value if -_INT32 <= value < _INT32 else None
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10:
            return int(value)
        return None
    if kind == "ips":
        ips = [ip for ip in map(_ip, _items(value)) if ip is not None]
        return ips or None
    if kind == "dns_answers":
        data = [d for d in map(_keyword, _items(value)) if d is not None]
        return [{"data": d} for d in data] or None
    verdict = action_verdict(value)
    if verdict is None:
        return None
    if kind == "ecs_action":
        return verdict
    if kind == "ocsf_action":
        return 1 if verdict == "allowed" else 2
    return 1 if verdict == "allowed" else 2  # ocsf_disposition: 1 Allowed, 2 Blocked


class Picked(NamedTuple):
    """One attribute's chosen value and where it came from."""

    row: Row
    value: Any
    sensor: str


def pick(observers: list[Observer] | None) -> list[Picked]:
    """Per row of :data:`ROWS` (in table order), the value the story's observers give it: the first observer of
    the row's family in sensor-name order that reports the attribute (not null). Rows no observer reports are
    left out."""
    by_family: dict[str, list[tuple[Observer, Mapping[str, Paths] | None]]] = {}
    for o in sorted(observers or (), key=lambda o: o.sensor):
        for family, paths in _views(o):
            by_family.setdefault(family, []).append((o, paths))
    picked: list[Picked] = []
    for row in ROWS:
        for o, paths in by_family.get(row.family, ()):
            if paths is None:
                value = o.attrs.get(row.attr)
            else:
                value = next((v for p in paths.get(row.attr, ()) if (v := get_path(o.attrs, p)) is not None), None)
            if value is not None:
                picked.append(Picked(row, value, o.sensor))
                break
    return picked


def primary(observers: list[Observer] | None) -> Observer | None:
    """The primary observer: the one with the most events, ties broken by sensor name (None: no observers)."""
    return min(observers or (), key=lambda o: (-o.events, o.sensor), default=None)


def families_present(observers: list[Observer] | None) -> list[str]:
    """The families of a story's observers, in :data:`FAMILIES` order."""
    present = {family for o in observers or () for family, _ in _views(o)}
    return [f for f in FAMILIES if f in present]


def storyline_namespace(body: StoryBody) -> dict[str, Any]:
    """What ECS and OCSF have no field for, the same in both documents (ECS ``storyline.*``, OCSF
    ``unmapped.storyline``): the revision and its state, the client decision, every observer as the body holds
    it (plus its family), the event ids. Absent body fields are left out."""
    out: dict[str, Any] = {
        "story_id": body.story_id,
        "tenant": body.tenant,
        "revision": body.revision,
        "final": body.final,
        "emitted_ms": body.emitted_ms,
    }
    optional = {
        "merged_into": body.merged_into,
        "event_count": body.event_count,
        "initiator_known": body.initiator_known,
        "initiator_rule": body.initiator_rule,
        "truncated": body.truncated or None,
        "predecessor": body.predecessor,
        "dns_names": body.dns_names,
        "related_stories": body.related_stories,
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    if body.observers is not None:
        observers = []
        for o in body.observers:
            entry: dict[str, Any] = msgspec.to_builtins(o)
            family = family_of(o.source)
            if family is not None:
                entry["family"] = family
            observers.append(entry)
        out["observers"] = observers
    if body.event_ids is not None:
        out["event_ids"] = list(body.event_ids)
    return out


def rfc3339_ms(ms: int) -> str:
    """Milliseconds since the epoch → RFC 3339 UTC with ms (``2026-12-05T07:00:00.123Z``); no clock is read."""
    when = _EPOCH + dt.timedelta(milliseconds=ms)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
