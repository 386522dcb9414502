"""The producer (durable, bucketed, sharded writes) and the JSONL ingest pipeline with its dead-letter store.

A :class:`Producer` is what embedding applications use: ``await producer.write(events)`` returns only when
every event is durable at the configured consistency, or raises :class:`ProducerError` naming the events that
could not be written. It never writes into a bucket a consumer may have read:

* the bucket is chosen from the clock right before each attempt, and the store refuses to start an attempt more
  than ``max_write_age_ms`` after that choice (``WriteTooLateError``); the producer then re-buckets the events
  to the current bucket and tries again (counted in ``rebucketed``);
* ``check_clock`` measures this host's clock against the database at start and refuses to write when they
  differ by more than ``max_clock_skew_ms``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import io
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

import msgspec
import xxhash

from engine.core.clock import SYSTEM_CLOCK, Clock, measure_skew
from engine.core.config import Config
from engine.core.errors import ClockSkewError as ClockSkewError  # noqa: PLC0414 - re-exported: its old home
from engine.core.errors import InputError, StoreError, WriteTooLateError
from engine.core.event import Event, encode
from engine.core.records import DEAD_LETTER_RAW_MAX
from engine.ingest.canonical import ParseRules, parse_line, shard_of
from engine.ingest.formats import LineParser
from engine.store import DeadLetter, EventRecord, Store

# One append call carries at most this many events / bytes, so a retry or a re-bucketing redoes little.
APPEND_EVENTS = 2_000
APPEND_BYTES = 4 * 1024 * 1024

BeforeWrite = Callable[[int, int, int], Awaitable[None]]
"""Fault-injection hook: ``await hook(shard, bucket, attempt)`` after the bucket is chosen, before the write."""


class ProducerError(StoreError):
    """Some events could not be made durable; ``failed`` lists them. The others were written."""

    def __init__(self, message: str, failed: Sequence[Event], *, retriable: bool) -> None:
        super().__init__(message, retriable=retriable)
        self.failed = list(failed)


class WriteReport(msgspec.Struct):
    events: int = 0  # distinct events written
    duplicates: int = 0  # repeated ids within one write call, written once
    bytes: int = 0
    appends: int = 0
    rebucketed: int = 0  # appends moved to a newer bucket because an attempt came too late
    retries: int = 0  # store-level retries of statements

    def add(self, other: WriteReport) -> None:
        for f in self.__struct_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))


class ProducerSettings(msgspec.Struct, frozen=True):
    """What the producer, the JSONL ingest and redrive read of the configuration (the meaning of each field:
    :class:`~engine.core.config.Config` and its ``ingest`` table)."""

    shards: int
    bucket_ms: int
    max_event_bytes: int
    max_clock_skew_ms: int
    max_write_age_ms: int
    max_in_flight: int
    max_attempts: int
    batch_lines: int
    rules: ParseRules

    @classmethod
    def from_config(cls, cfg: Config) -> ProducerSettings:
        return cls(
            shards=cfg.shards,
            bucket_ms=cfg.bucket_ms,
            max_event_bytes=cfg.max_event_bytes,
            max_clock_skew_ms=cfg.max_clock_skew_ms,
            max_write_age_ms=cfg.max_write_age_ms,
            max_in_flight=cfg.ingest.max_in_flight,
            max_attempts=cfg.ingest.max_attempts,
            batch_lines=cfg.ingest.batch_lines,
            rules=ParseRules.from_config(cfg),
        )


class Producer:
    def __init__(
        self,
        store: Store,
        settings: ProducerSettings,
        clock: Clock = SYSTEM_CLOCK,
        *,
        before_write: BeforeWrite | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.before_write = before_write
        self._sem = asyncio.Semaphore(settings.max_in_flight)
        self.clock_checked = False

    async def check_clock(self) -> int:
        """Measure (database clock - this clock) in ms; refuse above ``max_clock_skew_ms``."""
        m = await measure_skew(
            self.clock,
            self.store.server_time_ms,
            self.settings.max_clock_skew_ms,
            ": fix NTP before writing, or events could land in buckets already read",
        )
        self.clock_checked = True
        return m.offset_ms

    def _groups(self, events: Sequence[Event]) -> tuple[dict[int, list[list[tuple[Event, EventRecord]]]], int]:
        seen: set[str] = set()
        dups = 0
        by_shard: dict[int, list[list[tuple[Event, EventRecord]]]] = {}
        sizes: dict[int, int] = {}
        shards = self.settings.shards
        for ev in events:
            if ev.id in seen:
                dups += 1
                continue
            seen.add(ev.id)
            payload = encode(ev)
            if len(payload) > self.settings.max_event_bytes:
                raise InputError(f"event {ev.id}: encoded size {len(payload)} exceeds max_event_bytes")
            shard = shard_of(ev, shards)
            groups = by_shard.setdefault(shard, [[]])
            if len(groups[-1]) >= APPEND_EVENTS or sizes.get(shard, 0) + len(payload) > APPEND_BYTES:
                groups.append([])
                sizes[shard] = 0
            groups[-1].append((ev, EventRecord(ev.id, payload)))
            sizes[shard] = sizes.get(shard, 0) + len(payload)
        return by_shard, dups

    async def write(self, events: Sequence[Event]) -> WriteReport:
        """Make every event durable; return what was done, or raise :class:`ProducerError` with the failures."""
        if not self.clock_checked:
            await self.check_clock()
        by_shard, dups = self._groups(events)
        report = WriteReport(duplicates=dups)
        failed: list[Event] = []
        errors: list[StoreError] = []

        async def one(shard: int, group: list[tuple[Event, EventRecord]]) -> None:
            async with self._sem:
                try:
                    report.add(await self._append(shard, [r for _, r in group]))
                except StoreError as exc:
                    failed.extend(e for e, _ in group)
                    errors.append(exc)

        await asyncio.gather(*(one(s, g) for s, groups in by_shard.items() for g in groups))
        if failed:
            raise ProducerError(
                f"{len(failed)} of {len(events) - dups} events were not written: {errors[0]}",
                failed,
                retriable=all(e.retriable for e in errors),
            )
        return report

    async def _append(self, shard: int, records: list[EventRecord]) -> WriteReport:
        s = self.settings
        rebucketed = 0
        last: StoreError | None = None
        for attempt in range(s.max_attempts):
            chosen = self.clock.now_ms()
            bucket = chosen // s.bucket_ms
            if self.before_write is not None:
                await self.before_write(shard, bucket, attempt)
            try:
                res = await self.store.append(shard, bucket, records, deadline_ms=chosen + s.max_write_age_ms)
            except WriteTooLateError as exc:
                rebucketed += 1
                last = exc
                continue
            except StoreError as exc:
                if not exc.retriable:
                    raise
                last = exc  # the store already retried with backoff; try again in a fresh bucket
                continue
            return WriteReport(
                events=res.events, bytes=res.bytes, appends=1, rebucketed=rebucketed, retries=res.retries
            )
        assert last is not None
        raise StoreError(f"shard {shard}: gave up after {s.max_attempts} attempts: {last}", retriable=True)


# -- JSONL ingest ----------------------------------------------------------------------------------------------
@dataclass
class IngestSummary:
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    empty: int = 0
    skipped: int = 0  # lines that carry no event (header lines, EVE stats records, VPC NODATA/SKIPDATA records)
    # accepted events with a sensor's session id but no flow (a Zeek files.log record, an EVE anomaly without
    # addresses): stored flowless, so they link by their session only within their shard (issue 19 links more)
    flowless_sessions: int = 0
    lines: int = 0
    bytes: int = 0
    rebucketed: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    def since(self, before: IngestSummary) -> IngestSummary:
        """What was counted after ``before`` (a copy of this summary taken earlier): one file's share of a run."""
        out = IngestSummary(
            **{k: getattr(self, k) - getattr(before, k) for k in vars(self) if k not in ("reasons", "seconds")}
        )
        out.seconds = self.seconds - before.seconds
        out.reasons = {k: n - before.reasons.get(k, 0) for k, n in self.reasons.items() if n > before.reasons.get(k, 0)}
        return out

    def copy(self) -> IngestSummary:
        return dataclasses.replace(self, reasons=dict(self.reasons))

    def line(self) -> str:
        return (
            f"accepted {self.accepted:,}, rejected {self.rejected:,}, duplicates {self.duplicates:,}, "
            f"empty lines {self.empty:,}, "
            + (f"skipped lines {self.skipped:,} (headers, stats, no data), " if self.skipped else "")
            + (
                f"with a session id but no flow {self.flowless_sessions:,} (stored without a flow), "
                if self.flowless_sessions
                else ""
            )
            + f"{self.bytes / 1e6:,.1f} MB in {self.seconds:,.2f} s "
            f"({self.accepted / max(self.seconds, 1e-9):,.0f} events/s), re-bucketed writes {self.rebucketed:,}"
        )


def open_input(path: str) -> BinaryIO:
    """A file (plain or gzip, told by its magic bytes) or ``-`` for standard input."""
    raw = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[type-var]
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    return buffered


_BOM = b"\xef\xbb\xbf"
_READ_ERRORS = (OSError, EOFError, zlib.error)


class _Interrupted(Exception):
    """Raised by :meth:`InputLines.interrupt` into a read that blocks (a pipe with nothing to read yet)."""


class InputLines:
    """The lines of one input as ``(name, line number, bytes without the line end)``, for :meth:`Ingestor.run`.

    A UTF-8 byte order mark before the first line is dropped (editors on Windows write one). A read error — a
    truncated gzip, an I/O error — ends the lines instead of raising: every complete line read before it is
    given, ``error`` says what stopped the reading and ``stopped_after`` is the last line given.

    :meth:`interrupt` (from a SIGINT handler) ends the lines before the next one (``interrupted``); a read that
    is waiting for input (standard input from a pipe) is abandoned at once."""

    def __init__(self, name: str, stream: BinaryIO) -> None:
        self.name = name
        self.stream = stream
        self.error: str | None = None
        self.interrupted = False
        self.stopped_after = 0
        self._reading = False

    def interrupt(self) -> None:
        """End the lines before the next one. Call it from a signal handler only (it may raise into a read that
        is under way in the main thread: that is how a blocked read is abandoned)."""
        self.interrupted = True
        if self._reading:
            raise _Interrupted

    def __iter__(self) -> Iterator[tuple[str, int, bytes]]:
        lines = iter(self.stream)
        n = 0
        try:
            while not self.interrupted:
                self._reading = True
                try:
                    line = next(lines, None)
                finally:
                    self._reading = False
                if line is None:
                    return
                n += 1
                self.stopped_after = n
                yield self.name, n, (line[3:] if n == 1 and line.startswith(_BOM) else line).rstrip(b"\r\n")
        except _Interrupted:
            self.interrupted = True
        except _READ_ERRORS as exc:
            self.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def dead_letter_id(file: str, line: int, raw: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(b"%s\0%d\0%s" % (file.encode(), line, raw))


class Ingestor:
    """Validates lines, writes the good ones through a :class:`Producer` and the bad ones to the dead-letter
    store, in rounds of ``ingest.batch_lines`` lines; the validation rules are the producer's settings."""

    def __init__(self, store: Store, producer: Producer, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.producer = producer
        self.clock = clock
        self.summary = IngestSummary()
        self._rules = producer.settings.rules
        self._batch_lines = producer.settings.batch_lines

    async def run(
        self,
        lines: Iterable[tuple[str, int, bytes]],
        progress: Callable[[IngestSummary], None] | None = None,
        parser: LineParser | None = None,
    ) -> IngestSummary:
        """Validate round N+1 while round N is being written (one round in flight: bounded memory). ``parser``
        reads the lines' format (default: canonical JSONL); give one per input."""
        t0 = time.perf_counter()
        pending: asyncio.Task[None] | None = None
        batch: list[tuple[str, int, bytes]] = []

        async def flush(batch: list[tuple[str, int, bytes]]) -> None:
            nonlocal pending
            parsed = self._parse(batch, parser)
            if pending is not None:
                await pending
            pending = asyncio.create_task(self._write(*parsed))
            self.summary.seconds = time.perf_counter() - t0
            if progress:
                progress(self.summary)

        try:
            for item in lines:
                batch.append(item)
                if len(batch) >= self._batch_lines:
                    await flush(batch)
                    batch = []
            if batch:
                await flush(batch)
            if pending is not None:
                await pending
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        self.summary.seconds = time.perf_counter() - t0
        return self.summary

    def _parse(
        self, batch: list[tuple[str, int, bytes]], parser: LineParser | None
    ) -> tuple[list[Event], list[DeadLetter]]:
        s = self.summary
        now = self.clock.now_ms()
        good: list[Event] = []
        bad: list[DeadLetter] = []
        lines: list[tuple[str, int, bytes]] = []
        for item in batch:
            raw = item[2]
            s.lines += 1
            s.bytes += len(raw) + 1
            if raw.strip():
                lines.append(item)
            else:
                s.empty += 1
        reader = parser if parser is not None else LineParser("canonical")
        results = reader.many([raw for _, _, raw in lines], self._rules, now)
        for (file, n, raw), result in zip(lines, results, strict=True):
            if result is None:
                s.skipped += 1
            elif isinstance(result, Event):
                good.append(result)
            else:
                reason = str(result)
                dl_id = dead_letter_id(file, n, raw)
                if len(raw) > DEAD_LETTER_RAW_MAX:  # keep the head as evidence, and the length
                    bad.append(DeadLetter(dl_id, now, file, n, reason, raw[:DEAD_LETTER_RAW_MAX], raw_bytes=len(raw)))
                else:
                    bad.append(DeadLetter(dl_id, now, file, n, reason, raw))
                key = reason.split(":", 1)[0]
                s.reasons[key] = s.reasons.get(key, 0) + 1
        return good, bad

    async def _write(self, good: list[Event], bad: list[DeadLetter]) -> None:
        s = self.summary
        if bad:
            await self.store.put_dead_letters(bad)
            s.rejected += len(bad)
        if good:
            report = await self.producer.write(good)
            s.flowless_sessions += sum(1 for e in good if e.flow is None and e.session is not None)
            s.accepted += report.events
            s.duplicates += report.duplicates
            s.rebucketed += report.rebucketed


class RedriveReport(NamedTuple):
    accepted: int  # valid now, written and marked
    still: int  # rejected again
    cut: int  # kept only in part (longer than DEAD_LETTER_RAW_MAX): cannot be redriven; ingest the source again


async def redrive(store: Store, producer: Producer, clock: Clock = SYSTEM_CLOCK) -> RedriveReport:
    """Validate every dead letter not yet redriven again (with the producer's rules); write the ones that pass
    now and mark them. A line kept only in part is not validated (its head is not the event): counted as cut."""
    accepted = still = cut = 0
    pending: list[DeadLetter] = []
    async for page in store.scan_dead_letters():
        for d in page:
            if d.redriven_ms is None and d.cut:
                cut += 1
            elif d.redriven_ms is None:
                pending.append(d)
    now = clock.now_ms()
    rules, step = producer.settings.rules, producer.settings.batch_lines
    for i in range(0, len(pending), step):
        chunk = pending[i : i + step]
        good: list[Event] = []
        done: list[DeadLetter] = []
        for d in chunk:
            try:
                good.append(parse_line(d.raw, rules, now))
                done.append(msgspec.structs.replace(d, redriven_ms=now))
            except InputError:
                still += 1
        if good:
            await producer.write(good)
            await store.put_dead_letters(done)  # marked only once their events are durable
            accepted += len(done)
    return RedriveReport(accepted, still, cut)
