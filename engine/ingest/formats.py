"""Input formats: which reader turns an input's lines into events (``storyline ingest --format``).

``canonical`` is Storyline's JSONL (docs/events.md); ``zeek`` reads Zeek's TSV and JSON logs
(:mod:`engine.ingest.zeek`); ``eve`` Suricata's EVE JSON (:mod:`engine.ingest.eve`); ``vpcflow`` AWS VPC Flow
Logs in text (:mod:`engine.ingest.vpcflow`); ``auto`` (the default) decides per input from its first line that is
not empty: a Zeek header or Zeek JSON record, an EVE record (``event_type`` and ``timestamp``), a VPC header or
default-layout record, else canonical. A :class:`LineParser` serves one input (a Zeek TSV header's
state is that file's). Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

from engine.core.errors import ConfigError, InputError
from engine.core.event import Event
from engine.core.gcpause import collector_paused

from .canonical import InputEvent, ParseRules, accept, check_line, json_fits, parse_line
from .eve import EveReader, looks_like_eve
from .vpcflow import VpcFlowReader, looks_like_vpcflow
from .zeek import ZeekReader, is_json, looks_like_zeek

__all__ = ["FORMATS", "Format", "LineParser"]

Format = Literal["auto", "canonical", "zeek", "eve", "vpcflow"]
FORMATS: Final[tuple[Format, ...]] = ("auto", "canonical", "zeek", "eve", "vpcflow")


class LineParser:
    """One input's lines → events: ``parser(line, rules, now_ms)`` gives the :class:`Event` of a line, ``None``
    for a line that carries none (a Zeek header), or raises :class:`~engine.core.errors.InputError` naming the
    field. ``sensor`` names the sensor of a sensor format's records (canonical lines name their own);
    ``community_id_seed`` is the deployment's (``ingest.community_id_seed``), to check EVE's own Community IDs."""

    def __init__(self, fmt: Format = "auto", sensor: str | None = None, community_id_seed: int = 0) -> None:
        if fmt not in FORMATS:
            raise ConfigError("--format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
        self.format: Format | None = None if fmt == "auto" else fmt
        self.zeek = ZeekReader(sensor)
        self.eve = EveReader(sensor, community_id_seed)
        self.vpcflow = VpcFlowReader(sensor)

    def __call__(self, line: bytes, rules: ParseRules, now_ms: int) -> Event | None:
        if self.format is None:
            self._decide(line)
        if self.format == "canonical":
            return parse_line(line, rules, now_ms)
        check_line(line, rules)
        return self._checked(line, rules, now_ms)

    def _checked(self, line: bytes, rules: ParseRules, now_ms: int) -> Event | None:
        """A sensor format's line that passed :func:`check_line` → its event."""
        reader = self.zeek if self.format == "zeek" else self.eve if self.format == "eve" else self.vpcflow
        record = reader.record(line)
        if record is None:
            return None
        fits = self.format == "eve" and json_fits(line, rules.max_event_bytes)
        return accept(record, rules, now_ms, fits=fits)

    def many(self, lines: Sequence[bytes], rules: ParseRules, now_ms: int) -> list[Event | InputError | None]:
        """Lines that are not empty, in input order → per line what calling the parser gives (the error instead
        of raising it). Zeek TSV is read column by column here; the other formats line by line.

        The cyclic garbage collector pauses meanwhile: a round allocates some tens of containers per line, none
        in a cycle, and the collections they would set off cost ~5 % of ingest (measured: docs/BENCHMARKS.md)."""
        with collector_paused():
            return self._many(lines, rules, now_ms)

    def _many(self, lines: Sequence[bytes], rules: ParseRules, now_ms: int) -> list[Event | InputError | None]:
        if self.format is None and lines:
            self._decide(lines[0])
        checked = _all_pass_check_line(lines, rules)
        if self.format != "zeek":
            one = self._checked if checked and self.format != "canonical" else self
            out: list[Event | InputError | None] = []
            for line in lines:
                try:
                    out.append(one(line, rules, now_ms))
                except InputError as exc:
                    out.append(exc)
            return out
        results: list[Event | InputError | None] = [None] * len(lines)
        valid: Sequence[int] = range(len(lines))  # positions of the lines that pass the checks every line must pass
        if not checked:
            valid = []
            for i, line in enumerate(lines):
                try:
                    check_line(line, rules)
                except InputError as exc:
                    results[i] = exc
                else:
                    valid.append(i)
        zeek, limit = self.zeek, rules.max_event_bytes
        picked = lines if checked else [lines[i] for i in valid]
        for i, record in zip(valid, zeek.records(picked), strict=True):
            if isinstance(record, InputEvent):
                try:
                    line = lines[i]
                    fits = zeek.fits(line, limit) or (is_json(line) and json_fits(line, limit))
                    results[i] = accept(record, rules, now_ms, fits=fits)
                except InputError as exc:
                    results[i] = exc
            else:
                results[i] = record
        return results

    def _decide(self, line: bytes) -> None:
        self.format = (
            "zeek"
            if looks_like_zeek(line)
            else "eve"
            if looks_like_eve(line)
            else "vpcflow"
            if looks_like_vpcflow(line)
            else "canonical"
        )


def _all_pass_check_line(lines: Sequence[bytes], rules: ParseRules) -> bool:
    """Whether every line passes :func:`check_line`, known at once for a whole round: none longer than
    ``max_event_bytes``, and the round valid UTF-8 joined by newlines (a newline is no part of any multi-byte
    sequence, so no sequence can span two lines: the round is valid exactly when each line is)."""
    if not lines:
        return True
    if max(map(len, lines)) > rules.max_event_bytes:
        return False
    try:
        b"\n".join(lines).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
