"""The story body, version 2: declared once, here (docs/stories.md; ``docs/story.schema.json`` is derived from it).

A story body is the JSON document a story revision publishes. :func:`engine.correlate.fuse.fuse` writes it
column-wise (polars string assembly, for speed) in exactly the layout these structs encode to — fields in
declaration order, absent optional fields left out — and a test decodes every fused body with
:data:`decode_body` and encodes it back to the same bytes. Pure; no I/O.

Reading rules for consumers: ``body_version`` tells the layout (rows written before version 2 have no such field
and the v1 layout, :class:`engine.correlate.fuse.FusedStory`); unknown fields must be ignored (a later version may
add fields, never change the meaning of one).

Flow fields (``community_id``, ``proto``, ``transport``, ``client``, ``server``, ``initiator_known``,
``initiator_rule``, ``totals``, an observer's ``reported_direction``, ``bytes`` and ``packets``) are present only
on a story with a flow; a story of flowless events (an endpoint's process start) has none of them.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

__all__ = [
    "BODY_VERSION",
    "INITIATOR_RULES",
    "Endpoint",
    "Figures",
    "Observer",
    "SessionRef",
    "StoryBody",
    "Totals",
    "decode_body",
    "json_schema",
    "transport_name",
]

BODY_VERSION: Final = 2

InitiatorRule = Literal["sensor", "service_port", "first_seen"]
INITIATOR_RULES: Final[tuple[str, ...]] = ("sensor", "service_port", "first_seen")
"""How a story's client (the initiator) was decided, strongest evidence first:

* ``sensor`` — the sensors that say who opened the session (an ``initiator`` attribute: firewall session tables,
  an EDR's connect vs accept) agree by majority;
* ``service_port`` — TCP, UDP or SCTP with one port in a lower class than the other (well-known < 1024 <
  registered < 32768 ≤ ephemeral): the lower class is the server's;
* ``first_seen`` — neither: the reported source of the earliest event is taken as the client; a guess
  (``initiator_known`` is false)."""

Direction = Literal["client_to_server", "server_to_client", "both"]

_TRANSPORTS: Final[dict[int, str]] = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}


def transport_name(proto: int) -> str | None:
    """The transport's lowercase name for the protocol numbers Storyline names (None for the others)."""
    return _TRANSPORTS.get(proto)


class Endpoint(msgspec.Struct, frozen=True):
    """One side of the flow."""

    ip: str
    port: int | None = None  # None for protocols without ports


class Figures(msgspec.Struct, frozen=True, omit_defaults=True):
    """Bytes (or packets) of one flow: per direction where known, and ``total``.

    An observer's figures add up its own records (one sensor may split a flow across records, e.g. a flow log's
    capture windows); ``total`` is its records' undivided totals, or their two directions added up. A story's
    :class:`Totals` take the maximum over observers per direction — several sensors seeing one flow report the
    same bytes, so adding them would count the flow several times — and ``total`` is the larger of the observers'
    largest total and the reconciled directions added up."""

    client_to_server: int | None = None
    server_to_client: int | None = None
    total: int | None = None


class Totals(msgspec.Struct, frozen=True, omit_defaults=True):
    """The story's reconciled figures (see :class:`Figures`); a kind nobody reported is absent."""

    bytes: Figures | None = None
    packets: Figures | None = None


class SessionRef(msgspec.Struct, frozen=True):
    """A sensor's own session id among the story's events (Zeek's ``uid``, Suricata's ``flow_id``): where an
    analyst finds the sensor's raw records of the story."""

    sensor: str
    session: str


class Observer(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What one sensor reported of the story: never merged with another sensor's report."""

    sensor: str
    source: str
    first_us: int  # corrected event time of its first event, µs since the epoch (UTC)
    last_us: int
    events: int
    # How its events report the flow, relative to client and server (flows only).
    reported_direction: Direction | None = None
    bytes: Figures | None = None
    packets: Figures | None = None
    attrs: dict[str, Any]  # its events' attributes merged key by key (correlate.merge rules; default: latest)
    # The sources of its events by name, when there are several (a Zeek node's zeek.conn and zeek.http records);
    # ``source`` is its first event's.
    sources: list[str] | None = None


class StoryBody(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="body_version", tag=BODY_VERSION
):
    """A story revision's body, version 2. Field order is the JSON's, after ``body_version`` (the tag: always
    first, always 2)."""

    story_id: str
    tenant: str
    revision: int
    final: bool
    emitted_ms: int  # the ingest time (end of the bucket, ms) at which the revision was emitted
    merged_into: str | None = None  # set: this story's events now belong to that story; nothing else is set
    start: str | None = None  # RFC 3339 UTC, µs: the earliest corrected event time
    end: str | None = None
    start_us: int | None = None
    end_us: int | None = None
    duration_ms: int | None = None  # (end_us - start_us) // 1000
    event_count: int | None = None
    community_id: str | None = None
    proto: int | None = None  # IANA protocol number
    transport: str | None = None  # its name, for icmp, tcp, udp, ipv6-icmp, sctp
    client: Endpoint | None = None  # the initiator …
    server: Endpoint | None = None  # … and the responder
    initiator_known: bool | None = None  # false: the client is a guess (initiator_rule "first_seen")
    initiator_rule: InitiatorRule | None = None
    totals: Totals | None = None
    observers: list[Observer] | None = None  # by sensor name
    event_ids: list[str] | None = None  # in (corrected time, id) order
    truncated: bool = False  # the story hit correlate.max_story_events; its flow continues in another story
    predecessor: str | None = None  # the truncated story this one continues
    sessions: list[SessionRef] | None = None  # the sensors' own session ids, by (sensor, session); absent: none
    # The DNS name its client looked up for its server (the latest answer before it started: docs/correlation.md,
    # DNS names) and the id of the DNS story that answered; absent: no answer names it.
    dns_names: list[str] | None = None
    related_stories: list[str] | None = None


decode_body = msgspec.json.Decoder(StoryBody).decode
"""JSON bytes of a version 2 body → :class:`StoryBody` (a v1 body raises :class:`msgspec.ValidationError`)."""


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`StoryBody` (what ``docs/story.schema.json`` holds)."""
    schema = msgspec.json.schema(StoryBody)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://storyline.invalid/story.schema.json",
        "title": "Storyline story body, version 2",
        **schema,
    }
