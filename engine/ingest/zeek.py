"""Zeek logs → canonical input events (docs/events.md, "Zeek"; research notes: docs/notes/input-formats.md §1).

Both of Zeek's log writers are read:

* **TSV** (the ASCII writer's default): ``#separator``, ``#set_separator``, ``#empty_field``, ``#unset_field``,
  ``#path``, ``#fields`` and ``#types`` header lines set how the data lines that follow are read (any field
  order; the header may repeat mid-file, as when logs are concatenated). Values: the unset token (``-``) leaves
  the field out; the empty token (``(empty)``) is an empty string or container; ``\\xHH`` escapes (and ``\\\\``)
  are decoded; sets and vectors are split on the set separator; each value is typed by its ``#types`` entry
  (``count``/``int``/``port`` → int, ``time``/``interval``/``double`` → float seconds, ``bool`` → true/false).
* **JSON** (``LogAscii::use_json``): one object per line with dotted keys (``"id.orig_h"``); ``ts`` as epoch
  seconds, ISO 8601, or integer milliseconds (``JSON::TS_MILLIS``); ``_path`` names the log when present (the
  json-streaming-logs package), else the log is told by its fields; ``_node`` or ``_system_name`` name the sensor.

The canonical event: ``source`` = ``zeek.<path>``; ``sensor`` = the caller's ``--sensor``, else ``_node`` /
``_system_name``, else ``zeek`` (never the file name: ids must not change when a file is renamed); ``time`` =
``ts``; the flow = ``id.orig_h``/``id.orig_p`` → src, ``id.resp_h``/``id.resp_p`` → dst, with the transport from
``ip_proto`` (Zeek ≥ 7.1), else ``proto``, else the log's (``http``, ``ssl``, ``ssh``, ``smtp``… are TCP); ICMP's
type and code stay in the ports, as Zeek writes them. Zeek's originator opened the session: every flow record
says ``initiator: "src"``. conn.log's IP-level counters become the figures fusion reads (``orig_ip_bytes`` →
``src_bytes``, ``resp_ip_bytes`` → ``dst_bytes``, ``orig_pkts`` → ``src_packets``, ``resp_pkts`` →
``dst_packets``: comparable with flow logs and firewalls, which count IP bytes); every other field stays in
``attrs`` under its Zeek name. A record without a usable flow (dhcp.log, a transport Zeek does not know) is a
flowless event with its addresses in ``attrs``.

Pure; no I/O. A value that does not fit its declared type raises :class:`InputError` naming the field.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any, Final

import polars as pl

from engine.core.errors import InputError

from .canonical import InputEvent, decode_object, json_object

__all__ = ["COLUMNAR_MIN", "ZeekReader", "is_json", "looks_like_zeek"]

COLUMNAR_MIN: Final = 64
"""Runs of at least this many TSV data lines under one header are parsed column by column (polars); shorter
runs line by line — a frame's fixed cost only pays above some dozens of lines."""

_TRANSPORTS: Final = {"tcp": 6, "udp": 17, "icmp": 1}
# Logs of TCP-only protocols: their records name no transport.
_TCP_LOGS: Final = frozenset(
    {"http", "ssl", "ssh", "smtp", "ftp", "rdp", "smb_files", "smb_mapping", "mysql", "irc", "socks", "pop3", "imap",
     "ldap", "rfb", "modbus", "dnp3", "ntlm", "dce_rpc", "x509", "websocket", "quic"}
)  # fmt: skip
_FIGURES: Final = {"orig_ip_bytes": "src_bytes", "resp_ip_bytes": "dst_bytes", "orig_pkts": "src_packets",
                   "resp_pkts": "dst_packets"}  # fmt: skip
_META: Final = frozenset({"_path", "_write_ts", "_node", "_system_name"})
# Fields that tell a log apart when a JSON record has no _path (first match wins).
_SIGNATURES: Final = (
    ("conn", ("conn_state", "orig_ip_bytes", "history")),
    ("dns", ("qtype_name", "rcode_name", "trans_id")),
    ("http", ("status_code", "request_body_len", "trans_depth")),
    ("ssl", ("server_name", "cipher", "ssl_history", "established")),
    ("files", ("fuid", "seen_bytes", "mime_type")),
    ("notice", ("note",)),
    ("weird", ("addl", "peer")),
    ("ssh", ("auth_success", "host_key", "auth_attempts")),
    ("smtp", ("mailfrom", "rcptto", "helo")),
    ("dhcp", ("msg_types", "assigned_addr", "lease_time")),
)
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|\\)")
# A flow record layout's plan (ZeekReader._flow_plan): attribute columns and their names; proto, duration, uid.
_Plan = tuple[list[int], list[str], int, int | None, int | None]


def looks_like_zeek(first: bytes) -> bool:
    """Whether an input's first line is Zeek's: a TSV ``#separator`` header, or a JSON object with ``_path``, or
    with ``uid`` and ``id.orig_h`` (conn, dns, http… records)."""
    if first.startswith(b"#separator"):
        return True
    obj = json_object(first)
    if obj is None:
        return False
    return "_path" in obj or ("uid" in obj and "id.orig_h" in obj) or ("uids" in obj and "ts" in obj)


def is_json(line: bytes) -> bool:
    """Whether a Zeek line is a JSON record (its first byte that is not white space is ``{``); a TSV data line
    starts with its first value, so the usual answer costs no copy of the line."""
    first = line[:1]
    return first == b"{" or (first.isspace() and line.lstrip()[:1] == b"{")


def _unescape(value: bytes) -> str:
    if b"\\" in value:
        value = _ESCAPE.sub(lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1)[1:], 16)]), value)
    return value.decode("utf-8", "backslashreplace")


def _text(raw: bytes) -> str:
    return _unescape(raw) if b"\\" in raw else raw.decode("utf-8", "backslashreplace")


def _bool(raw: bytes) -> bool:
    if raw == b"T":
        return True
    if raw == b"F":
        return False
    raise ValueError(raw)


def _integer(raw: bytes) -> int:
    value = int(raw)
    if not -(2**63) <= value < 2**64:  # Zeek's int is 64-bit signed, count unsigned: nothing wider is stored
        raise ValueError(raw)
    return value


_CONVERTERS: Final[dict[str, Callable[[bytes], Any]]] = {
    "count": _integer, "int": _integer, "port": _integer, "time": float, "interval": float, "double": float,
    "bool": _bool,
}  # fmt: skip
# The column-wise parser takes a typed value only in a form where polars' cast and Python's int()/float() agree
# exactly (what Zeek writes: plain integers, fixed-point decimals); anything else goes to the line-wise path.
_COLUMN_KINDS: Final[dict[str, tuple[pl.DataType, str]]] = {
    "count": (pl.Int64(), r"^-?[0-9]{1,18}$"),
    "int": (pl.Int64(), r"^-?[0-9]{1,18}$"),
    "port": (pl.Int64(), r"^[0-9]{1,5}$"),
    "time": (pl.Float64(), r"^-?[0-9]{1,15}(\.[0-9]{1,9})?$"),
    "interval": (pl.Float64(), r"^-?[0-9]{1,15}(\.[0-9]{1,9})?$"),
    "double": (pl.Float64(), r"^-?[0-9]{1,15}(\.[0-9]{1,9})?$"),
}


class ZeekReader:
    """Reads one Zeek log input, line by line: :meth:`record` gives the canonical input event of a data line and
    ``None`` for a header line. The TSV header state is this input's; make one reader per file."""

    def __init__(self, sensor: str | None = None) -> None:
        self.sensor = sensor
        self.path: str | None = None
        self._sep = b"\t"
        self._set_sep = b","
        self._empty = b"(empty)"
        self._unset = b"-"
        self._fields: list[str] = []
        self._types: list[str] = []
        self._conv: list[tuple[str, Callable[[bytes], Any] | None, Callable[[bytes], Any] | None]] | None = None
        # _typed_columns' selection under the current header (expressions, containers, plan); any header line
        # clears it
        self._select: tuple[list[pl.Expr], list[tuple[int, Callable[[bytes], Any]]], _Plan | None] | None = None
        self._bound = 0  # the constant part of :meth:`fits`' bound: the largest of any header read so far

    def fits(self, line: bytes, max_bytes: int) -> bool:
        """Whether the stored form of this TSV data line's event certainly holds (integers within 64 bits) and
        is within ``max_bytes``, so that it need not be encoded to know (``canonical.accept(fits=True)``).

        The bound, for a line of L bytes: a value of w bytes of text is stored in at most 9·w + 10 bytes (a
        number in 9 from at least one digit; a string in w + 5; a set's elements each in their length + 5, or
        9 when typed, plus 5 for the array), and the n - 1 separators of the line pay 9 bytes each, hence
        9·L + n + 9 for the values; plus what does not come from the line — per field its name as a key (+ 16,
        for the figures' longer names), the source, a sensor of 256 characters of up to 4 bytes, the id, the
        addresses in canonical text, times, ports, the initiator and the arrays' headers (under 2048 in all). A
        test holds random headers and lines to it, and the widest forms to within half of it. JSON lines are
        not bounded (their integers are not).

        The header part is the largest of every header this reader has read, so the bound holds for a line
        read before a later header too (ingest asks after reading a whole round of lines)."""
        if not self._fields or is_json(line):
            return False
        return 9 * len(line) + self._bound <= max_bytes

    def _grow_bound(self) -> None:
        here = 2048 + len(f"zeek.{self.path}".encode()) + sum(len(f.encode()) + 17 for f in self._fields)
        self._bound = max(self._bound, here)

    def records(self, lines: Sequence[bytes]) -> list[InputEvent | InputError | None]:
        """Many lines of this input at once, in order: per line what :meth:`record` gives (the error instead of
        raising it). Runs of TSV data lines are parsed column by column; the results are the same as line by
        line (a test holds the two paths to that)."""
        out: list[InputEvent | InputError | None] = []
        run: list[bytes] = []
        for line in lines:
            if line[:1] == b"#" or is_json(line):
                if run:
                    out.extend(self._run(run))
                    run = []
                try:
                    out.append(self.record(line))
                except InputError as exc:
                    out.append(exc)
            else:
                run.append(line)
        if run:
            out.extend(self._run(run))
        return out

    def _run(self, lines: list[bytes]) -> list[InputEvent | InputError | None]:
        recs = self._tsv_columns(lines) if len(lines) >= COLUMNAR_MIN and self._fields else [None] * len(lines)
        out: list[InputEvent | InputError | None] = []
        path = self.path
        for line, rec in zip(lines, recs, strict=True):
            if rec.__class__ is InputEvent:
                out.append(rec)
                continue
            try:
                out.append(self._event(rec, path) if rec is not None else self.record(line))  # type: ignore[arg-type]
            except InputError as exc:
                out.append(exc)
        return out

    def record(self, line: bytes) -> InputEvent | None:
        if line.startswith(b"#"):
            self._header(line)
            return None
        if is_json(line):
            rec = decode_object(line, "a Zeek JSON line")
            path = rec.get("_path") if isinstance(rec.get("_path"), str) else None
        else:
            rec = self._tsv(line)
            path = self.path
        return self._event(rec, path)

    # -- TSV -----------------------------------------------------------------------------------------------
    def _header(self, line: bytes) -> None:
        self._select = None
        if line.startswith(b"#separator "):
            sep = _unescape(line[len(b"#separator ") :].strip()).encode()
            if len(sep) != 1:
                raise InputError(f"zeek: #separator must be one byte, got {sep!r}")
            self._sep = sep
            return
        key, _, rest = line.partition(self._sep)
        values = rest.split(self._sep)
        if key == b"#set_separator":
            self._set_sep = _unescape(rest).encode()
        elif key == b"#empty_field":
            self._empty = _unescape(rest).encode()
        elif key == b"#unset_field":
            self._unset = _unescape(rest).encode()
        elif key == b"#path":
            self.path = _unescape(rest)
            self._grow_bound()
        elif key == b"#fields":
            self._fields = [_unescape(v) for v in values]
            self._types = []
            self._conv = None
            self._grow_bound()
        elif key == b"#types":
            self._types = [_unescape(v) for v in values]
            self._conv = None
        # #open, #close and comments carry nothing an event needs

    def _columns(self) -> list[tuple[str, Callable[[bytes], Any] | None, Callable[[bytes], Any] | None]]:
        """Per column of the current #fields/#types: (name, converter of a scalar, converter of a container's
        elements — None for a scalar column). Built once per header, not per line."""
        types = self._types if len(self._types) == len(self._fields) else ["string"] * len(self._fields)
        out: list[tuple[str, Callable[[bytes], Any] | None, Callable[[bytes], Any] | None]] = []
        for field, kind in zip(self._fields, types, strict=True):
            if kind.endswith("]") and "[" in kind:
                out.append((field, None, _CONVERTERS.get(kind[kind.index("[") + 1 : -1], _text)))
            else:
                out.append((field, _CONVERTERS.get(kind, _text), None))
        return out

    def _tsv(self, line: bytes) -> dict[str, Any]:
        if not self._fields:
            raise InputError("zeek: a data line before any #fields header (not a Zeek log, or its header is missing)")
        values = line.split(self._sep)
        if len(values) != len(self._fields):
            raise InputError(f"zeek: {len(values)} values for {len(self._fields)} #fields")
        if self._conv is None:
            self._conv = self._columns()
        unset, empty, set_sep = self._unset, self._empty, self._set_sep
        rec: dict[str, Any] = {}
        field = ""
        try:
            for (field, scalar, element), raw in zip(self._conv, values, strict=True):
                if raw == unset:
                    continue
                if element is not None:
                    rec[field] = [] if raw == empty else [element(v) for v in raw.split(set_sep)]
                elif raw == empty:
                    rec[field] = ""
                else:
                    rec[field] = scalar(raw)  # type: ignore[misc]
        except ValueError:
            kind = self._types[self._fields.index(field)] if len(self._types) == len(self._fields) else "string"
            text = _unescape(raw)
            raise InputError(f"{field}: {text[:40]!r} is not a Zeek {kind}") from None
        return rec

    def _tsv_columns(self, lines: list[bytes]) -> list[InputEvent | dict[str, Any] | None]:
        """The records of TSV data lines under the current header, parsed column by column: per line its event
        (a flow record of a usual layout), its record (for :meth:`_event`), or ``None`` where the line must take
        the line-wise path (a wrong value count, an escape, a value in a form this parser leaves to Python —
        which then gives the record or names the error)."""
        fields, sep = self._fields, self._sep
        types = self._types if len(self._types) == len(fields) else ["string"] * len(fields)
        if len(set(fields)) != len(fields):
            return [None] * len(lines)
        width = len(fields) - 1
        names = [f"c{i}" for i in range(len(fields))]
        text = b"\n".join(lines) + b"\n"
        if text.count(sep) == width * len(lines) and b"\\" not in text and b"\r" not in text:
            # The usual round: every line plain. As many separators as the lines should have in all, and polars
            # refusing a line with more values than fields, mean every line has its count; else line by line.
            with contextlib.suppress(pl.exceptions.PolarsError):
                recs = self._typed_columns(text, len(lines), names, types)
                if recs is not None:
                    return recs
        plain = [line.count(sep) == width and b"\\" not in line and b"\r" not in line for line in lines]
        picked = [line for line, ok in zip(lines, plain, strict=True) if ok]
        if len(picked) < COLUMNAR_MIN:
            return [None] * len(lines)
        try:
            recs = self._typed_columns(b"\n".join(picked) + b"\n", len(picked), names, types)
        except pl.exceptions.PolarsError:  # whatever polars makes of an odd line, the line-wise path decides
            return [None] * len(lines)
        if recs is None:
            return [None] * len(lines)
        it = iter(recs)
        return [next(it) if ok else None for ok in plain]

    def _typed_columns(
        self, text: bytes, count: int, names: list[str], types: list[str]
    ) -> list[InputEvent | dict[str, Any] | None] | None:
        """Per line of ``text`` (``count`` plain lines) what :meth:`_tsv_columns` gives; None when polars reads
        another number of rows."""
        fields = self._fields
        frame = pl.read_csv(
            text,
            has_header=False,
            separator=self._sep.decode("latin-1"),
            quote_char=None,
            comment_prefix=None,
            schema=dict.fromkeys(names, pl.String()),
            empty_string_is_null=False,
            raise_if_empty=False,
        )
        if frame.height != count:
            return None
        if self._select is None:
            self._select = self._selection(names, types)
        exprs, converters, plan = self._select
        typed = frame.select(exprs)
        columns = [typed.get_column(name).to_list() for name in names]
        fine = typed.get_column("ok").to_list()
        recs: list[InputEvent | dict[str, Any] | None] = []
        if plan is not None:
            self._flow_events(plan, columns, fine, typed.get_column("gap").to_list(), recs)
            return recs
        for row, good in zip(zip(*columns, strict=True), fine, strict=True):
            if not good:
                recs.append(None)
                continue
            rec = {k: v for k, v in zip(fields, row, strict=True) if v is not None}
            try:
                for i, convert in converters:
                    if row[i]:
                        rec[fields[i]] = [convert(v.encode()) for v in row[i]]
            except ValueError:
                recs.append(None)
                continue
            recs.append(rec)
        return recs

    def _selection(
        self, names: list[str], types: list[str]
    ) -> tuple[list[pl.Expr], list[tuple[int, Callable[[bytes], Any]]], _Plan | None]:
        """What :meth:`_typed_columns` selects from a frame of text columns under the current header, built once
        per header (building them costs ~0.5 ms, a tenth of running them on a round of 4,096 lines): per column
        its typed value (``None`` where unset), ``ok`` (every value in a form polars and Python read alike) and,
        for a flow record layout, ``gap`` (an attribute column unset); the typed-element containers; the plan."""
        unset, empty = self._unset.decode("utf-8", "replace"), self._empty.decode("utf-8", "replace")
        set_sep = self._set_sep.decode("utf-8", "replace")
        values: list[pl.Expr] = []
        checks: list[pl.Expr] = []
        converters: list[tuple[int, Callable[[bytes], Any]]] = []  # containers of typed elements
        for i, (name, kind) in enumerate(zip(names, types, strict=True)):
            col = pl.col(name)
            is_unset = col == unset
            if kind.endswith("]") and "[" in kind:
                element = kind[kind.index("[") + 1 : -1]
                if element in _CONVERTERS:
                    converters.append((i, _CONVERTERS[element]))
                value = pl.when(col == empty).then(pl.lit([], pl.List(pl.String()))).otherwise(col.str.split(set_sep))
            elif kind in _COLUMN_KINDS:
                dtype, form = _COLUMN_KINDS[kind]
                checks.append(is_unset | col.str.contains(form))
                value = col.cast(dtype, strict=False)
            elif kind == "bool":
                checks.append(is_unset | col.is_in(["T", "F"]))
                value = col == "T"
            else:
                value = pl.when(col == empty).then(pl.lit("")).otherwise(col)
            values.append(pl.when(is_unset).then(None).otherwise(value).alias(name))
        values.append((pl.all_horizontal(checks) if checks else pl.lit(True)).alias("ok"))
        plan = self._flow_plan(types) if not converters else None
        if plan is not None:
            attr_names = [names[i] for i in plan[0] if i >= 0]
            cols = pl.col(attr_names)
            gap = pl.any_horizontal(cols.is_null() | (cols == unset)) if attr_names else pl.lit(False)
            values.append(gap.alias("gap"))
        return values, converters, plan

    def _flow_plan(self, types: list[str]) -> _Plan | None:
        """For a header whose records :meth:`_flow_events` can turn into events straight from the columns — the
        flow fields typed as Zeek writes them, nothing :meth:`_event` treats specially besides — the attributes'
        columns (-1: the initiator) and names in :meth:`_event`'s order (by name), the proto, duration and uid
        columns; else None."""
        fields = self._fields
        at = {f: i for i, f in enumerate(fields)}
        want = {"ts": "time", "id.orig_h": "addr", "id.orig_p": "port", "id.resp_h": "addr", "id.resp_p": "port"}
        if self.path is None or any(types[at[f]] != kind if f in at else True for f, kind in want.items()):
            return None
        if "uid" in at and types[at["uid"]] != "string":
            return None
        if "duration" in at and types[at["duration"]] not in ("interval", "double", "time"):
            return None
        if "proto" in at and types[at["proto"]] not in ("enum", "string"):
            return None
        special = {*_META, *_FIGURES.values(), "initiator", "ip_proto"}
        if special & at.keys():
            return None
        fixed = {*want, "uid"}
        order = [i for i, f in enumerate(fields) if f not in fixed and f not in _FIGURES]
        order += [at[f] for f in _FIGURES if f in at]
        names = [_FIGURES.get(fields[i], fields[i]) for i in order]
        by_name = sorted([*zip(names, order, strict=True), ("initiator", -1)])
        order, names = [i for _, i in by_name], [name for name, _ in by_name]
        return order, names, at.get("proto", -1), at.get("duration"), at.get("uid")

    def _flow_events(
        self,
        plan: _Plan,
        columns: list[list[Any]],
        fine: list[bool],
        gaps: list[bool],
        out: list[InputEvent | dict[str, Any] | None],
    ) -> None:
        """What :meth:`_event` makes of these rows' records, built from the columns (a test holds the two to the
        same events); a row that is not a plain flow record is given to :meth:`_event` as its record. ``gaps``:
        per row, whether an attribute column is unset in it."""
        order, names, proto_at, duration_at, uid_at = plan
        fields = self._fields
        at = {f: i for i, f in enumerate(fields)}
        ts_col, oh_col, op_col = columns[at["ts"]], columns[at["id.orig_h"]], columns[at["id.orig_p"]]
        rh_col, rp_col = columns[at["id.resp_h"]], columns[at["id.resp_p"]]
        n = len(ts_col)
        proto_col = columns[proto_at] if proto_at >= 0 else [None] * n
        duration_col = columns[duration_at] if duration_at is not None else [None] * n
        uid_col = columns[uid_at] if uid_at is not None else [None] * n
        source, sensor = f"zeek.{self.path}", self.sensor if self.sensor is not None else "zeek"
        default = 6 if self.path in _TCP_LOGS else None
        rows = zip(*(columns[i] if i >= 0 else itertools.repeat("src", n) for i in order), strict=True)
        for i, (good, gap, row, ts, orig_h, orig_p, resp_h, resp_p, name, duration, uid) in enumerate(
            zip(fine, gaps, rows, ts_col, oh_col, op_col, rh_col, rp_col, proto_col, duration_col, uid_col, strict=True)
        ):
            if not good:
                out.append(None)
                continue
            proto = default if name is None else _TRANSPORTS.get(name.lower())
            if ts is None or orig_h is None or resp_h is None or proto is None:
                out.append({f: col[i] for f, col in zip(fields, columns, strict=True) if col[i] is not None})
                continue
            if proto == 1 and (":" in orig_h or ":" in resp_h):
                proto = 58
            if gap:  # an unset value: no attribute
                attrs = {k: v for k, v in zip(names, row, strict=True) if v is not None}
            else:
                attrs = dict(zip(names, row, strict=True))
            out.append(
                InputEvent(
                    source=source,
                    time=ts,
                    sensor=sensor,
                    proto=proto,
                    src_ip=orig_h,
                    src_port=orig_p,
                    dst_ip=resp_h,
                    dst_port=resp_p,
                    attrs=attrs,
                    session=uid or None,
                    end_time=ts + duration if duration is not None and duration >= 0 else None,
                )
            )

    # -- the canonical event -------------------------------------------------------------------------------
    def _event(self, rec: dict[str, Any], path: str | None) -> InputEvent:
        if path is None:
            path = next((p for p, keys in _SIGNATURES if any(k in rec for k in keys)), "log")
        ts = rec.pop("ts", None)
        if ts is None:
            raise InputError(f"ts: required (zeek {path})")
        if isinstance(ts, bool) or not isinstance(ts, int | float | str):
            raise InputError(f"ts: expected epoch seconds or ISO 8601, got {type(ts).__name__}")
        if isinstance(ts, int) and abs(ts) >= 10**11:  # JSON::TS_MILLIS
            ts = ts / 1000
        sensor = self.sensor
        if sensor is None:
            named = rec.get("_node", rec.get("_system_name"))
            sensor = named if isinstance(named, str) and named else "zeek"
        for key in _META:
            rec.pop(key, None)
        uid = rec.pop("uid", None)
        session = uid if isinstance(uid, str) and uid else None
        duration = rec.get("duration")
        end: float | None = None
        if isinstance(duration, int | float) and not isinstance(duration, bool) and duration >= 0:
            start = ts if isinstance(ts, int | float) else None
            end = start + duration if start is not None else None
        orig_h, resp_h = rec.pop("id.orig_h", None), rec.pop("id.resp_h", None)
        orig_p, resp_p = rec.pop("id.orig_p", None), rec.pop("id.resp_p", None)
        proto = self._proto(rec, path, orig_h, resp_h)
        if proto is None or not isinstance(orig_h, str) or not isinstance(resp_h, str):
            # flowless: the addresses stay as attributes
            for key, value in (
                ("id.orig_h", orig_h),
                ("id.orig_p", orig_p),
                ("id.resp_h", resp_h),
                ("id.resp_p", resp_p),
            ):
                if value is not None:
                    rec[key] = value
            attrs = dict(sorted(rec.items()))
            return InputEvent(source=f"zeek.{path}", time=ts, sensor=sensor, attrs=attrs, session=session, end_time=end)
        for zeek_name, figure in _FIGURES.items():
            if zeek_name in rec:
                rec[figure] = rec.pop(zeek_name)
        rec["initiator"] = "src"
        ports = proto in (1, 6, 17, 58, 132)
        attrs = dict(sorted(rec.items()))  # by name: the id's sorted-keys JSON is cheaper on keys already sorted
        return InputEvent(
            source=f"zeek.{path}",
            time=ts,
            sensor=sensor,
            proto=proto,
            src_ip=orig_h,
            src_port=_port(orig_p, "id.orig_p") if ports else None,
            dst_ip=resp_h,
            dst_port=_port(resp_p, "id.resp_p") if ports else None,
            attrs=attrs,
            session=session,
            end_time=end,
        )

    @staticmethod
    def _proto(rec: dict[str, Any], path: str, orig_h: object, resp_h: object) -> int | None:
        number = rec.get("ip_proto")
        if isinstance(number, int) and not isinstance(number, bool) and 0 <= number <= 255:
            return number
        name = rec.get("proto")
        if isinstance(name, str):
            proto = _TRANSPORTS.get(name.lower())
            if proto == 1 and ":" in f"{orig_h}{resp_h}":
                return 58  # Zeek's transport enum calls ICMPv6 "icmp" too
            return proto  # unknown_transport: no flow
        return 6 if path in _TCP_LOGS else None


def _port(value: object, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{field}: expected a port number, got {value!r}"[:120])
    return value
