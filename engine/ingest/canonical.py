"""Canonical events: validation of the JSON input form, normalization, ids, shards and the stored form.

Pure functions, no I/O. The JSON form is documented in docs/events.md. A line either becomes an
:class:`Event` or is rejected with a reason that names the field; nothing is silently dropped or altered
beyond the documented normalization (time to int µs UTC, protocol to its number, addresses to canonical text).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import msgspec
import xxhash

from engine.core.config import Config, IngestConfig
from engine.core.errors import InputError
from engine.core.event import FIELDS, V1_FIELDS, Event, encode
from engine.ingest.network_identity import PORT_PROTOCOLS, flow_identity, parse_proto

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US = dt.timedelta(microseconds=1)


class InputEvent(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The JSON input form of one event (one JSONL line)."""

    source: str
    time: int | float | str
    proto: str | int | None = None
    src_ip: str | None = None
    src_port: int | None = None
    dst_ip: str | None = None
    dst_port: int | None = None
    id: str | None = None
    sensor: str | None = None
    attrs: dict[str, Any] | None = None
    session: str | None = None
    end_time: int | float | str | None = None


# What a derived id hashes: the normalized event without its id and what derives from the 5-tuple (msgspec JSON,
# sorted keys), over the FIRST wire version's fields only — ids must not change when the event gains a field (a
# field added later joins the id only with a new id scheme, or events differing only in it would be duplicates).
_IdInput = msgspec.defstruct(
    "_IdInput",
    [(f.name, f.type) for f in FIELDS[:V1_FIELDS] if f.name not in ("id", "flow", "reversed")],
    frozen=True,
    gc=False,
    module=__name__,
)


_json_decoder = msgspec.json.Decoder(InputEvent)
_id_encoder = msgspec.json.Encoder(order="sorted")
MAX_NAME = 256
MAX_ATTRS_DEPTH = 64  # arrays/objects nested in attrs (attrs itself is level 1); consumers decode with recursion
_PROTO_FAST = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132, "TCP": 6, "UDP": 17, "ICMP": 1}


def parse_time_us(value: int | float | str) -> int:
    """Event time as int µs UTC: epoch seconds (int or float) or RFC 3339 with an offset."""
    if value.__class__ is float and -1e13 <= value <= 1e13:  # the usual cases, first
        return round(value * 1_000_000)
    if value.__class__ is str:
        return _rfc3339_us(value)
    if isinstance(value, bool):
        raise InputError("time: expected epoch seconds or an RFC 3339 string, got a boolean")
    if isinstance(value, int):
        if abs(value) > 10**13:
            raise InputError(f"time: {value} is too large for epoch seconds{_unit_hint(value)}")
        return value * 1_000_000
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > 1e13:
            raise InputError(f"time: {value!r} is not a finite epoch-seconds value")
        return round(value * 1_000_000)
    return _rfc3339_us(value)


_SECONDS: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM:SS" + UTC offset → µs: the times of one input share seconds
_SECONDS_MAX = 1 << 16
_OFFSET_FORMS = frozenset({1, 5, 6})  # "Z", "+hhmm", "+hh:mm"


def _rfc3339_us(value: str) -> int:
    """An RFC 3339 time → µs. The usual form — six fraction digits, then Z or a ±hh[:]mm offset — costs a dict
    look-up per value: its second and offset are converted once (by :func:`_rfc3339_slow`, which checks them),
    the fraction is added. Any other form, and any error, is :func:`_rfc3339_slow`'s."""
    if (
        len(value) >= 27
        and value[19] == "."
        and len(value) - 26 in _OFFSET_FORMS
        and value[26] in "Z+-"
        and (frac := value[20:26]).isdigit()
        and frac.isascii()
    ):
        key = value[:19] + value[26:]
        base = _SECONDS.get(key)
        if base is None:
            try:
                base = _rfc3339_slow(key)
            except InputError:
                return _rfc3339_slow(value)  # its error names the value as given
            if len(_SECONDS) >= _SECONDS_MAX:
                _SECONDS.clear()
            _SECONDS[key] = base
        return base + int(frac)
    return _rfc3339_slow(value)


def _rfc3339_slow(value: str) -> int:
    text = value.strip()
    if text[-1:] == "z":  # RFC 3339 allows a lower-case Z; fromisoformat does not
        text = text[:-1] + "Z"
    if len(text) < 19 or len(text) > 40 or text[4] != "-" or text[10] not in "Tt ":
        raise InputError(f"time: {value!r} is not RFC 3339 (e.g. 2026-11-26T07:00:00.5Z)")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"time: {value!r} is not RFC 3339 (e.g. 2026-11-26T07:00:00.5Z)") from None
    if parsed.tzinfo is None:
        raise InputError(f"time: {value!r} has no UTC offset (add Z or +hh:mm)")
    return (parsed - _EPOCH) // _US


_UNITS = (("milliseconds", 1_000), ("microseconds", 1_000_000), ("nanoseconds", 1_000_000_000))


def _unit_hint(value: object, rules: ParseRules | None = None, now_ms: int | None = None) -> str:
    """A hint when a numeric time read as epoch seconds is out of range but would be in it read as epoch ms, µs
    or ns (the usual mistake: a JavaScript ``Date.now()``); empty otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return ""
    low, high = (rules.min_time_ms, now_ms + rules.max_future_ms) if rules and now_ms is not None else (0, 2**42)
    for unit, per_second in _UNITS:
        if low <= value * 1000 / per_second <= high:
            return f"; it looks like epoch {unit}: give epoch seconds (divide by {per_second:,}) or RFC 3339"
    return "; give epoch seconds or RFC 3339 (e.g. 2026-11-26T07:00:00.5Z)"


def _name(value: str, field: str) -> str:
    if value in _NAMES_SEEN:
        return value
    if not value or len(value) > MAX_NAME or not value.isprintable():
        raise InputError(f"{field}: must be 1..{MAX_NAME} printable characters")
    if len(_NAMES_SEEN) < 4096:  # sources and sensors repeat on every line: check each once
        _NAMES_SEEN.add(value)
    return value


_NAMES_SEEN: set[str] = set()


class ParseRules(msgspec.Struct, frozen=True):
    """What validation needs of the configuration: the accepted time range and the size limit (defaults as in
    the config). ``ParseRules.from_config(cfg)`` once per producer, not per line."""

    min_time_ms: int = IngestConfig().min_time_ms
    max_future_ms: int = IngestConfig().max_future_ms
    max_event_bytes: int = next(f.default for f in msgspec.structs.fields(Config) if f.name == "max_event_bytes")

    @classmethod
    def from_config(cls, cfg: Config) -> ParseRules:
        return cls(cfg.ingest.min_time_ms, cfg.ingest.max_future_ms, cfg.max_event_bytes)


def normalize(raw: InputEvent, rules: ParseRules, now_ms: int) -> Event:
    """Validate and normalize one decoded input event; raise :class:`InputError` naming the field."""
    source = raw.source if raw.source in _NAMES_SEEN else _name(raw.source, "source")
    sensor = raw.sensor
    if sensor is None:
        sensor = source
    elif sensor not in _NAMES_SEEN:
        _name(sensor, "sensor")
    time_us = parse_time_us(raw.time)
    if time_us < rules.min_time_ms * 1000:
        raise InputError(f"time: {_iso(time_us)} is before the accepted range (ingest.min_time_ms)")
    if time_us > (now_ms + rules.max_future_ms) * 1000:
        hint = _unit_hint(raw.time, rules, now_ms)
        raise InputError(f"time: {_iso(time_us)} is too far in the future (ingest.max_future_ms){hint}")
    proto: int | None = None
    src_ip = dst_ip = None
    src_port, dst_port = raw.src_port, raw.dst_port
    flow: int | None = None
    rev = False
    p, sip, dip = raw.proto, raw.src_ip, raw.dst_ip
    if p is not None and sip is not None and dip is not None:
        proto = _PROTO_FAST.get(p) if p.__class__ is str else p if p.__class__ is int and 0 <= p <= 255 else None
        if proto is None:
            proto = parse_proto(p)
        if proto not in PORT_PROTOCOLS and (src_port is not None or dst_port is not None):
            raise InputError(f"{'src_port' if src_port is not None else 'dst_port'}: protocol {proto} has no ports")
        src_ip, dst_ip, key_bytes, rev = flow_identity(proto, sip, src_port, dip, dst_port)
        flow = xxhash.xxh64_intdigest(key_bytes)
    elif p is not None or sip is not None or dip is not None:
        missing = next(f for f, v in (("proto", p), ("src_ip", sip), ("dst_ip", dip)) if v is None)
        raise InputError(f"{missing}: required with the other flow fields (proto, src_ip, dst_ip)")
    elif src_port is not None or dst_port is not None:
        raise InputError("proto: ports given without the flow fields (proto, src_ip, dst_ip)")
    attrs = raw.attrs if raw.attrs is not None else {}
    session = raw.session
    if session is not None and (not session or len(session) > MAX_NAME or not session.isprintable()):
        raise InputError(f"session: must be 1..{MAX_NAME} printable characters")
    end_us: int | None = None
    if raw.end_time is not None:
        try:
            end_us = parse_time_us(raw.end_time)
        except InputError as exc:
            raise InputError(f"end_time{str(exc).removeprefix('time')}") from None
        if end_us < time_us:
            raise InputError(f"end_time: {_iso(end_us)} is before time ({_iso(time_us)})")
    event_id = raw.id
    if event_id is not None:
        _name(event_id, "id")
    else:
        ident = _IdInput(
            source=source,
            sensor=sensor,
            time_us=time_us,
            proto=proto,
            src_ip=src_ip,
            src_port=src_port,
            dst_ip=dst_ip,
            dst_port=dst_port,
            attrs=attrs,
        )
        hashed = _id_encoder.encode(ident)
        if session is not None or end_us is not None:  # without them, the id is what it always was
            hashed += b"\x00" + _id_encoder.encode((session, end_us))
        event_id = xxhash.xxh3_128_hexdigest(hashed)
    return Event(
        event_id, time_us, source, sensor, flow, rev, proto, src_ip, src_port, dst_ip, dst_port, attrs, session, end_us
    )


_object_decoder = msgspec.json.Decoder(dict[str, Any])


def json_object(line: bytes) -> dict[str, Any] | None:
    """A line's JSON object, or None when it is not one (for telling formats apart by a first line)."""
    if not line.lstrip().startswith(b"{"):
        return None
    try:
        return _object_decoder.decode(line)
    except (msgspec.DecodeError, RecursionError):
        return None


def decode_object(line: bytes, what: str) -> dict[str, Any]:
    """A sensor format's JSON line → its object, or :class:`InputError` (``what`` names the format: "an EVE
    line must be an object"); arrays and objects nested deeper than :data:`MAX_ATTRS_DEPTH` are refused."""
    try:
        obj = _object_decoder.decode(line)
    except msgspec.ValidationError:
        raise InputError(f"json: {what} must be an object") from None
    except msgspec.DecodeError as exc:
        raise InputError(f"json: {exc}") from None
    except RecursionError:
        raise InputError(f"json: nested deeper than {MAX_ATTRS_DEPTH} levels") from None
    if line.count(b"[") + line.count(b"{") > MAX_ATTRS_DEPTH and too_deep(obj):
        raise InputError(f"json: nested deeper than {MAX_ATTRS_DEPTH} levels")
    return obj


def check_line(line: bytes, rules: ParseRules) -> None:
    """What every input line must be, whatever its format: within ``max_event_bytes``, valid UTF-8."""
    if len(line) > rules.max_event_bytes:
        raise InputError(f"line: {len(line)} bytes exceeds max_event_bytes ({rules.max_event_bytes})")
    try:
        line.decode("utf-8")  # msgspec does not validate UTF-8 inside strings
    except UnicodeDecodeError as u:
        raise InputError(f"json: invalid UTF-8 at byte {u.start}") from None


_DIGITS = bytes(1 if 0x30 <= b <= 0x39 else 0 for b in range(256))  # a digit → 1, any other byte → 0
_WIDE_INTEGER = b"\x01" * 19  # an integer outside -2**63..2**64-1 is written with at least 19 digits
_FIXED_BYTES = 2048  # what the stored form holds that a JSON line does not bound (see json_fits)


def json_fits(line: bytes, max_bytes: int) -> bool:
    """Whether the event of this JSON line (canonical, EVE or Zeek JSON) certainly has a stored form within
    ``max_bytes`` — so that :func:`accept` need not encode it to know (``fits=True``).

    The bound: each JSON value is stored in at most 9 bytes per byte of its text (a number in 9 from at least
    one digit; a string in its text + 3, escapes only shrinking; true, false, null, [] and {} in fewer than
    their text), so what comes from the line takes at most 9·L; the rest — a derived id, the time, the flow
    hash, addresses in canonical text, a sensor of 256 characters of up to 4 bytes, a reader's figures and
    initiator — under 2048. And no integer is wider than 64 bits (which msgpack cannot hold): those take 19
    digits in a row, which the line does not have. A test holds random events to the bound."""
    return 9 * len(line) + _FIXED_BYTES <= max_bytes and line.translate(_DIGITS).find(_WIDE_INTEGER) < 0


def parse_line(line: bytes, rules: ParseRules, now_ms: int) -> Event:
    """One JSONL line → Event, or :class:`InputError` with the reason."""
    check_line(line, rules)
    try:
        raw = _json_decoder.decode(line)
    except msgspec.ValidationError as exc:
        raise InputError(_validation_reason(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InputError(f"json: {exc}") from None
    except RecursionError:  # only attrs holds untyped values that can nest
        raise InputError(f"attrs: nested deeper than {MAX_ATTRS_DEPTH} levels") from None
    if raw.attrs and line.count(b"[") + line.count(b"{") > MAX_ATTRS_DEPTH and too_deep(raw.attrs):
        raise InputError(f"attrs: nested deeper than {MAX_ATTRS_DEPTH} levels")
    return accept(raw, rules, now_ms, fits=json_fits(line, rules.max_event_bytes))


def accept(raw: InputEvent, rules: ParseRules, now_ms: int, *, fits: bool = False) -> Event:
    """A decoded input event (from a JSONL line or a sensor format's reader) → the stored :class:`Event`:
    :func:`normalize`, then the check that its stored form exists and fits ``max_event_bytes`` — unless the
    caller has shown that already (``fits``: a bound from the line, e.g. :meth:`ZeekReader.fits`)."""
    event = normalize(raw, rules, now_ms)
    if fits:
        return event
    # The stored form must exist and fit: msgpack holds no integer outside int64/uint64 (only attrs can carry
    # one), and it can be larger than the JSON (a 4-byte `1e5,` becomes a 9-byte float64).
    try:
        size = len(encode(event))
    except OverflowError:
        raise InputError("attrs: an integer is outside -2**63..2**64-1 (the stored form cannot hold it)") from None
    if size > rules.max_event_bytes:
        raise InputError(f"line: the stored event is {size} bytes, over max_event_bytes ({rules.max_event_bytes})")
    return event


def too_deep(attrs: dict[str, Any]) -> bool:
    """Whether arrays/objects nest in attrs deeper than MAX_ATTRS_DEPTH (iterative: no recursion limit)."""
    stack: list[tuple[object, int]] = [(attrs, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_ATTRS_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def shard_of(event: Event, shards: int) -> int:
    """Every event of a flow lands in one shard; events without a flow spread by id."""
    if event.flow is not None:
        return event.flow % shards
    return xxhash.xxh64_intdigest(event.id.encode()) % shards


def _iso(time_us: int) -> str:
    try:
        return (_EPOCH + dt.timedelta(microseconds=time_us)).isoformat().replace("+00:00", "Z")
    except OverflowError:
        return f"{time_us} µs"


def _validation_reason(msg: str) -> str:
    # msgspec: "Expected `int`, got `str` - at `$.src_port`" / "Object missing required field `time`"
    field = ""
    if " - at `$." in msg:
        msg, _, path = msg.partition(" - at `$.")
        field = path.rstrip("`")
    for marker in ("Object missing required field `", "Object contains unknown field `"):
        if msg.startswith(marker):
            name = msg[len(marker) : -1] if msg.endswith("`") else msg[len(marker) :]
            if not name or not name.isprintable():  # a field name from the input: never raw control characters
                name = repr(name)
            if "missing" in marker:
                return f"{name}: required field is missing"
            return f"{name}: unknown field (put sensor-specific data under attrs)"
    if msg.startswith("Expected `object`"):
        return f"json: a line must be a JSON object ({msg.lower()})"
    return f"{field or 'json'}: {msg[0].lower()}{msg[1:]}" if msg else "json: invalid"
