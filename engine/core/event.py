"""The canonical event's wire form: declared once, here; every other form of it is derived.

Every layer reads events in this form (ingest writes it, the runtime's batches decode it, correlation fuses
it), so it lives at the ground. Pure; no I/O. The JSON input form and its normalization are ingest's
(:mod:`engine.ingest.canonical`).

**The one declaration** is the pair of class statements below: :class:`EventView` holds the linking fields and
:class:`Event` extends it with the rest, so the view is by construction the prefix of the event (msgspec lays a
subclass's fields after its parent's; a view decodes a stored event and ignores the trailing fields). What is
derived from it: the fusion row (:func:`row_struct`: the same fields, maps kept as raw msgpack), the polars
dtypes of the event frame (:func:`polars_columns`), and the hash input of derived ids (ingest). A test compares
names, types and order of every derived form with the declaration.

**Evolution** (msgspec's rules for array-like structs): a stored event is a msgpack array read by position, so a
field is never reordered, renamed in meaning or removed; a new field goes at the end of :class:`Event`, and it
needs a default so that events written before it decode (a missing trailing element takes the default; an
older reader ignores extra trailing elements). The first :data:`V1_FIELDS` fields are frozen as they are;
:func:`check_evolution` refuses a field after them without a default, at import.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Union, get_args, get_origin

import msgspec


class Unsigned64:
    """Annotation marker: an integer field holding an unsigned 64-bit value (polars UInt64 in the frame)."""


class EventView(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The linking fields, decoded for every event a worker reads: the first fields of :class:`Event`.

    ``flow`` is the xxh64 of the direction-independent flow key (``None`` without addresses) and ``reversed``
    says whether the event reports the flow from endpoint b to a. ``time_us`` is the event time in µs UTC as the
    sensor reported it.
    """

    id: str
    time_us: int
    source: str
    sensor: str
    flow: Annotated[int | None, Unsigned64]
    reversed: bool


class Event(EventView, frozen=True, array_like=True, gc=False):
    """The canonical stored event (msgpack, array-like: fields by position; never reorder, only append — with a
    default). :func:`encode` leaves out trailing fields that are None, so an event that has none of the later
    fields is stored exactly as the first version stored it."""

    proto: int | None
    src_ip: str | None
    src_port: int | None
    dst_ip: str | None
    dst_port: int | None
    attrs: dict[str, Any]
    # New fields: here, at the end, each with a default (see the module docstring).
    session: str | None = None  # the sensor's own session id (Zeek uid, Suricata flow_id), when it has one
    end_time_us: int | None = None  # the end of the span a record describes (a flow record), µs UTC


V1_FIELDS: Final = 12  # the fields of the first wire version: frozen, no defaults needed


def check_evolution(struct: type[msgspec.Struct], frozen: int = V1_FIELDS) -> None:
    """Refuse a struct whose fields after the first ``frozen`` lack a default (such a field could not decode
    the events stored before it was added)."""
    for f in msgspec.structs.fields(struct)[frozen:]:
        if f.required:
            raise TypeError(
                f"{struct.__name__}.{f.name}: a field added to the stored event needs a default "
                f"(events written before it have no value for it)"
            )


check_evolution(Event)

FIELDS: Final = msgspec.structs.fields(Event)
VIEW_FIELDS: Final = len(msgspec.structs.fields(EventView))


def _strip(tp: Any) -> tuple[Any, bool]:
    """(the base type, whether it is Unsigned64-annotated) of a field type, without None and Annotated."""
    unsigned = False
    if get_origin(tp) is Annotated:
        tp, *meta = get_args(tp)
        unsigned = Unsigned64 in meta
    args = get_args(tp)
    if args and type(None) in args and (get_origin(tp) is Union or type(tp).__name__ == "UnionType"):
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp
    return tp, unsigned


def polars_dtype_name(tp: Any) -> str | None:
    """The polars dtype (by name) of a scalar field type; None for maps and lists (the frame holds them as JSON
    text, a choice of the frame's own)."""
    base, unsigned = _strip(tp)
    if base is bool:
        return "Boolean"
    if base is int:
        return "UInt64" if unsigned else "Int64"
    if base is str:
        return "String"
    if base is float:
        return "Float64"
    return None


def polars_columns() -> list[tuple[str, str | None]]:
    """(field name, polars dtype name or None) of every stored field, in wire order."""
    return [(f.name, polars_dtype_name(f.type)) for f in FIELDS]


def row_struct(name: str, *, maps: Any) -> type[msgspec.Struct]:
    """An array-like struct with :class:`Event`'s fields in order, map and list fields typed ``maps`` (e.g.
    :class:`msgspec.Raw`, to decode them later or not at all); defaults as declared."""
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in FIELDS:
        tp = f.type if polars_dtype_name(f.type) is not None else maps
        fields.append((f.name, tp) if f.required else (f.name, tp, f.default))
    return msgspec.defstruct(name, fields, array_like=True, gc=False, module=__name__)


_payload_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(Event)
_view_decoder = msgspec.msgpack.Decoder(EventView)

_FULL = len(msgspec.structs.fields(Event))
_OPTIONAL_TAIL = tuple(f.name for f in msgspec.structs.fields(Event)[V1_FIELDS:])
if _FULL > 15:
    raise TypeError("Event: encode() patches a msgpack fixarray header, which holds at most 15 fields")


def encode(event: Event) -> bytes:
    """An :class:`Event` → its stored bytes. Trailing fields added after the first version are left out while
    they are None (msgspec writes every field of an array-like struct): the array is cut to its last set field,
    so events without them keep the first version's bytes, and ids and sizes do not change."""
    data = _payload_encoder.encode(event)
    cut = 0
    for name in reversed(_OPTIONAL_TAIL):
        if getattr(event, name) is not None:
            break
        cut += 1
    if not cut:
        return data
    return bytes([0x90 | (_FULL - cut)]) + data[1:-cut]  # each None is the one byte 0xc0, last in the array


decode = _payload_decoder.decode
"""Stored bytes → the :class:`Event`."""
decode_view = _view_decoder.decode
"""Stored bytes → the :class:`EventView` (the linking fields only: cheaper)."""
