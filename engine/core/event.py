"""The canonical event's wire form: the stored struct, its linking-field view, and their codecs.

Every layer reads events in this form (ingest writes it, the runtime's batches decode it, correlation fuses
it), so it lives at the ground. Pure; no I/O. The JSON input form and its normalization are ingest's
(:mod:`engine.ingest.canonical`).
"""

from __future__ import annotations

from typing import Any

import msgspec


class Event(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The canonical stored event (msgpack, array-like: fields by position; never reorder, only append).

    ``flow`` is the xxh64 of the direction-independent flow key (``None`` without addresses) and
    ``reversed`` says whether the event reports the flow from endpoint b to a. ``time_us`` is the event time in
    µs UTC as the sensor reported it.
    """

    id: str
    time_us: int
    source: str
    sensor: str
    flow: int | None
    reversed: bool
    proto: int | None
    src_ip: str | None
    src_port: int | None
    dst_ip: str | None
    dst_port: int | None
    attrs: dict[str, Any]


class EventView(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The linking fields only: a prefix of :class:`Event`, so decoding skips the rest cheaply."""

    id: str
    time_us: int
    source: str
    sensor: str
    flow: int | None
    reversed: bool


_payload_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(Event)
_view_decoder = msgspec.msgpack.Decoder(EventView)


def encode(event: Event) -> bytes:
    return _payload_encoder.encode(event)


def decode(payload: bytes) -> Event:
    return _payload_decoder.decode(payload)


def decode_view(payload: bytes) -> EventView:
    return _view_decoder.decode(payload)
