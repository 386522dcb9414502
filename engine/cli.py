"""The ``storyline`` command: a thin layer over the library. The only place that reads the environment.

Exit codes: 0 success, 1 the operation failed (database unreachable, check failed), 2 bad usage or config,
3 (`run`) shards were lost to another owner.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import __version__
from engine.core.clock import SYSTEM_CLOCK, database_offset
from engine.core.config import Config, load
from engine.core.errors import ConfigError, StorylineError, mask
from engine.core.records import DEAD_LETTER_RAW_MAX
from engine.ingest.canonical import MAX_NAME
from engine.ingest.formats import FORMATS, Format, LineParser
from engine.ingest.producer import (
    Ingestor,
    IngestSummary,
    InputLines,
    Producer,
    ProducerSettings,
    open_input,
    redrive,
)
from engine.store import EventRecord, Store, make_store

if TYPE_CHECKING:
    from engine.runtime.settings import StageFactory
    from engine.tools.simulate import Scenario

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

RUN_EPILOG = """\
--until-idle and --drain consume every event written before the command
started: they read through the bucket of (start + max_clock_skew_ms), so they
first wait about lag_ms for it to become readable (said on a TTY; `waiting_s`
in the JSON lines). If then no shard's committed position moves for
drain_timeout_ms, the run stops its workers and exits 1 with the last error
they reported.

exit codes:
  0  done: --until-idle/--drain consumed everything, or stopped by SIGINT/SIGTERM
  1  failure: no database or tenant, or --until-idle/--drain made no progress
     for drain_timeout_ms (the last error is printed)
  2  bad usage or config (the key is named)
  3  shards lost: another owner (e.g. a second `storyline run` on the same
     shards) claimed some of this run's shards and its commits were refused;
     the lost shards are printed, and in the final JSON line (lost_shards)
"""


FEED_EPILOG = """\
Revisions come in emission order, (period, shard, story_id, revision), from
periods the engine's checkpoints have committed (or a drain sealed). The
reader's position is committed after its output is flushed (and fsynced for
--out FILE) every 1,000 revisions, within commit_interval_ms when following,
and at the end: after a crash the revisions after the last committed
position come again (at-least-once;
de-duplicate by story_id and revision if you must). Several readers read
independently; run one process per reader name.

exit codes:
  0  done (without --follow: everything committed so far was delivered)
  1  failure (no database or tenant; the position stays where it was)
  2  bad usage or config
  4  gap: the reader's position lay in periods whose revisions may have
     expired (ttl_ms) before it read them; a JSON line on stderr names the
     periods. The revisions after the gap were delivered. With --follow the
     gap is reported and reading goes on.
"""
EXIT_GAP = 4


def _feed_start(text: str) -> str | int:
    """``--from``: earliest, latest, or a time (ms since the epoch)."""
    if text in ("earliest", "latest"):
        return text
    return int(_instant(text) * 1000)


def _count(text: str) -> int:
    """A ``--limit``: a whole number >= 0 (0: no limit)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative (0 means no limit)")
    return n


def _instant(text: str) -> float:
    """A point in time as epoch seconds: epoch seconds (``1764918000``, ``1764918000.5``) or RFC 3339 with a UTC
    offset (``2026-12-05T07:00:00Z``, ``2026-12-05T08:00:00+01:00``)."""
    from datetime import datetime

    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither epoch seconds nor an RFC 3339 time such as 2026-12-05T07:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset: add Z (UTC) or one such as +01:00")
    return when.timestamp()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=os.environ.get("STORYLINE_CONFIG"),
        help="TOML config file (default: $STORYLINE_CONFIG)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set store.path=/tmp/x.db (value read as TOML when it parses)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storyline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"storyline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="create or migrate the tenant's keyspace and tables (idempotent)")
    _common(p)
    p = sub.add_parser(
        "selftest", help="write events, read them back, claim and commit an offset; print what it measured"
    )
    _common(p)
    p.add_argument("--events", type=int, default=2_000, help="events to write (default 2000)")
    p = sub.add_parser("config", help="print the effective config as TOML-like lines (secrets hidden)")
    _common(p)
    p = sub.add_parser("ingest", help="validate events (plain or gzip) and write them durably")
    _common(p)
    p.add_argument("files", nargs="*", default=["-"], help="input files, plain or gzip; - for stdin (default)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="auto (default: decided per file from its first line), canonical (Storyline JSONL, docs/events.md),"
        " zeek (TSV or JSON logs), eve (Suricata EVE JSON) or vpcflow (AWS VPC Flow Logs, text)",
    )
    p.add_argument(
        "--sensor",
        help="the sensor name of a sensor format's records (default: from the records — Zeek's _node, EVE's host,"
        " vpcflow-<account id> — else the format's name); canonical lines name their own",
    )
    p = sub.add_parser(
        "run",
        help="run the engine: a supervisor and worker processes over a shard range",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--shards", help="inclusive shard range A-B of this instance (default: all)")
    p.add_argument(
        "--group",
        action="store_true",
        help="join the group named by the config's `consumer`: the shards are shared among its running instances"
        " by leases in the database, rebalanced when one joins or leaves, taken over when one dies",
    )
    p.add_argument("--workers", type=int, help="worker processes (default: config `workers`)")
    p.add_argument(
        "--until-idle",
        action="store_true",
        help="exit once every owned shard has consumed every event written before the command started",
    )
    p.add_argument("--drain", action="store_true", help="like --until-idle, then finalize every open story")
    p.add_argument("--log-level", default="WARNING", help="worker/supervisor log level (default WARNING)")
    p.add_argument(
        "--stage",
        choices=["stories", "count"],
        default="stories",
        help="what workers do with events: build stories (default) or only count them",
    )
    p = sub.add_parser("verify", help="check that every accepted event is in exactly one story (after run --drain)")
    _common(p)
    p.add_argument("--truth", help="a `storyline simulate` truth file: every event in it must have been accepted")
    p.add_argument(
        "--ingest-log",
        action="append",
        default=[],
        metavar="INPUT=LOG",
        help="the output of one `storyline ingest` run of INPUT (repeatable; runs of the same INPUT name it the same):"
        " the counts must reconcile with the events and dead letters stored",
    )
    p = sub.add_parser("stories", help="print the latest revision of every story")
    _common(p)
    p.add_argument(
        "--format",
        choices=["table", "jsonl", "ecs", "ocsf"],
        default="table",
        help="table (default); jsonl: the story body as stored; ecs: one ECS 9.3 document per story; ocsf: one OCSF"
        " 1.7.0 Network Activity event per story (stories without a flow have none: skipped, said on stderr)",
    )
    p.add_argument(
        "--since",
        type=_instant,
        help="only stories last emitted at or after this time (RFC 3339 with an offset, e.g. 2026-12-05T07:00:00Z,"
        " or epoch seconds)",
    )
    p.add_argument("--until", type=_instant, help="only stories last emitted before this time (as --since)")
    p.add_argument("--limit", type=_count, default=0, help="at most this many, oldest first (default 0: all)")
    p.add_argument("--id", dest="story_id", help="only this story (a lookup by id; exit 1 when it is unknown)")
    p = sub.add_parser(
        "feed",
        help="story revisions in emission order for a downstream system, with a position per reader in the database",
        epilog=FEED_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--reader", required=True, help="this reader's name: its position is kept under it")
    p.add_argument(
        "--from",
        dest="start",
        type=_feed_start,
        default="earliest",
        help="where a reader without a position starts: earliest (default), latest, or a time (RFC 3339 with an"
        " offset, or epoch seconds); a reader's stored position always wins",
    )
    p.add_argument("--follow", action="store_true", help="keep reading as the engine emits (SIGINT/SIGTERM: stop)")
    p.add_argument("--final-only", action="store_true", help="skip provisional revisions (emit = updates)")
    p.add_argument(
        "--format",
        choices=["jsonl", "ecs", "ocsf"],
        default="jsonl",
        help="jsonl (default): the story body as stored; ecs: one ECS 9.3 document per revision; ocsf: one OCSF 1.7.0"
        " Network Activity event per revision (merge stubs and stories without a flow have none, nor have version 1"
        " bodies in either: such a revision is skipped and named in a JSON line on stderr)",
    )
    p.add_argument("--out", default="-", help="append to this file (default -: standard output)")
    p = sub.add_parser("status", help="offsets and lag per shard; exit 0 when every shard is within 2 x lag")
    _common(p)
    p.add_argument("--shards", help="inclusive shard range A-B (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p = sub.add_parser("synth", help="write deterministic synthetic sensor events as JSONL to stdout")
    p.add_argument("--sessions", type=int, default=1_000, help="network sessions (1..4 events each)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--span-s", type=float, default=600.0, help="seconds the sessions spread over, ending now")
    p = sub.add_parser("simulate", help="simulated sensors with ground truth: to files, or --live through the producer")
    _common(p)
    p.add_argument("--out", help="JSONL output (gzip when it ends in .gz), in arrival order")
    p.add_argument("--truth", help="ground truth JSON (event id -> story, sensor skews)")
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--skew-s", type=float, default=5.0, help="per-sensor clock skew bound (default ±5 s)")
    p.add_argument("--span-s", type=float, default=600.0)
    p.add_argument(
        "--spans",
        action="store_true",
        help="sessions last (seconds to minutes); firewall and flow-log records carry end_time, written after it",
    )
    p.add_argument(
        "--reuse-gap-s",
        type=float,
        default=600.0,
        help="a reused 5-tuple's new session starts this long (up to 1.25 times) after the old one's end",
    )
    p.add_argument("--port-reuse-fraction", type=float, default=0.02, help="the share of sessions that reuse a 5-tuple")
    p.add_argument(
        "--lookups",
        action="store_true",
        help="connections go to addresses of names their client looked up (DNS answers; the truth gives each name)",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="send the events through the producer at their arrival "
        "offsets (compressed --speed times) instead of writing --out",
    )
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument(
        "--format",
        choices=("canonical", "zeek", "eve", "vpcflow"),
        default="canonical",
        help="write what one kind of sensor sees of the scenario, in its own format, with the truth restricted to it:"
        " zeek (conn, dns, http, ssl; JSON logs), eve (flow, dns, http, tls), vpcflow (cloud flows); not with --live",
    )
    p.add_argument(
        "--alert-fraction",
        type=float,
        default=0.0,
        help="with --format eve: the share of flow records followed by an alert record of the same flow",
    )
    p = sub.add_parser("dead-letter", help="list rejected input lines, or --redrive them through validation")
    _common(p)
    p.add_argument("--redrive", action="store_true", help="validate every pending dead letter again")
    p.add_argument("--limit", type=_count, default=100, help="lines to list (default 100; 0 for all)")
    p = sub.add_parser("tune", help="print a recommended config (TOML, reasons as comments) for a rate and size")
    _common(p)
    p.add_argument("--events-per-sec", type=float, required=True, help="events per second to size for (peak)")
    p.add_argument("--avg-event-bytes", type=float, required=True, help="average JSON input line, bytes")
    p.add_argument("--retention-hours", type=float, help="hours events are kept (default 48; raised to the TTL rule)")
    p.add_argument("--backend", choices=["cql", "embedded"], help="default: embedded below a few hundred events/s")
    p.add_argument("--cores", type=int, help="cores per engine machine (default: this machine's)")
    p.add_argument("--measure", action="store_true", help="calibrate per-core figures with a ~10 s run here")
    return parser


def _config(args: argparse.Namespace) -> Config:
    config = load(args.config, args.overrides)  # a config error is reported alone, without the warning below
    if any(key.strip() == "store.password" and sep for key, sep, _ in (i.partition("=") for i in args.overrides)):
        print(
            "storyline: warning: --set store.password=... can be read by any user of this host in the process list; "
            "put the password in a file only you can read and use store.password_file",
            file=sys.stderr,
        )
    return config


async def _with_store(cfg: Config) -> Store:
    store = make_store(cfg)
    await store.open()
    return store


async def cmd_init(cfg: Config) -> int:
    store = await _with_store(cfg)
    try:
        where = cfg.store.path if cfg.store.backend == "embedded" else ", ".join(cfg.store.contact_points)
        print(f"init tenant {cfg.tenant} on {cfg.store.backend} store ({where})")
        for line in await store.init_schema():
            print(f"  {line}")
    finally:
        await store.close()
    return EXIT_OK


async def cmd_selftest(cfg: Config, n: int) -> int:
    if n < 1:
        raise ConfigError("--events", "must be >= 1")
    # Its own throw-away tenant: selftest payloads are not canonical events and must never enter a live queue.
    import msgspec

    cfg = msgspec.structs.replace(cfg, tenant=f"selftest_{uuid.uuid4().hex[:12]}")
    store = await _with_store(cfg)
    try:
        await store.init_schema()
        db_ms = await store.server_time_ms()
        skew = db_ms - int(time.time() * 1000)
        bucket = int(time.time() * 1000) // cfg.bucket_ms
        run = uuid.uuid4().hex[:12]
        by_shard: dict[int, list[EventRecord]] = {}
        for i in range(n):
            shard = i % cfg.shards
            payload = f'{{"selftest":"{run}","seq":{i}}}'.encode()
            by_shard.setdefault(shard, []).append(EventRecord(f"selftest-{run}-{i:08d}", payload))
        t0 = time.perf_counter()
        await asyncio.gather(*(store.append(s, bucket, evs) for s, evs in by_shard.items()))
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = 0
        for shard, evs in by_shard.items():
            want = {e.event_id: e.payload for e in evs}
            async for page in store.read_partition(shard, bucket):
                for ev in page.events:
                    if ev.event_id in want:
                        if want.pop(ev.event_id) != ev.payload:
                            print(f"selftest: payload mismatch for {ev.event_id}", file=sys.stderr)
                            return EXIT_FAIL
                        got += 1
            if want:
                print(f"selftest: {len(want)} events missing from shard {shard}", file=sys.stderr)
                return EXIT_FAIL
        t_read = time.perf_counter() - t0
        owner = f"selftest:{socket.gethostname()}:{os.getpid()}:{run}"
        consumer = f"selftest-{run}"
        off = await store.claim(consumer, 0, owner, bucket - 1)
        await store.commit(consumer, 0, owner, off.epoch, bucket, bucket)
        print(
            f"selftest ok on {cfg.store.backend} store, tenant {cfg.tenant}: {got} events in bucket {bucket} "
            f"across {len(by_shard)} shards; write {n / t_write:,.0f} events/s, read {n / t_read:,.0f} events/s; "
            f"offset claimed (epoch {off.epoch}) and committed; database clock {skew:+d} ms from this host"
        )
    finally:
        try:
            await store.drop_schema()
        finally:
            await store.close()
    return EXIT_OK


async def cmd_ingest(cfg: Config, files: list[str], *, fmt: Format = "auto", sensor: str | None = None) -> int:
    if files.count("-") > 1:
        raise ConfigError("files", "- (standard input) can be read only once")
    if sensor is not None and (not sensor or len(sensor) > MAX_NAME or not sensor.isprintable()):
        raise ConfigError("--sensor", f"must be 1..{MAX_NAME} printable characters")
    tty = sys.stderr.isatty()
    if files == ["-"] and sys.stdin.isatty():
        print("ingest: reading JSONL events from standard input (end with Ctrl-D; or name files)", file=sys.stderr)

    def progress(s: IngestSummary) -> None:
        if tty:
            rate = s.accepted / max(s.seconds, 1e-9)
            mb = s.bytes / 1e6 / max(s.seconds, 1e-9)
            sys.stderr.write(
                f"\r{s.lines:,} lines  {s.accepted:,} accepted  {s.rejected:,} rejected  "
                f"{rate:,.0f} events/s  {mb:,.1f} MB/s "
            )
            sys.stderr.flush()

    # SIGINT: stop reading, write what was read, report, exit 130. A second SIGINT interrupts at once.
    interrupted = False
    lines: InputLines | None = None

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True
        if lines is not None:
            lines.interrupt()

    previous = signal.signal(signal.SIGINT, on_sigint)
    store = await _with_store(cfg)
    rc = EXIT_OK
    try:
        producer = Producer(store, ProducerSettings.from_config(cfg))
        skew = await producer.check_clock()
        ingestor = Ingestor(store, producer)
        per_file: list[tuple[str, IngestSummary]] = []
        for name in files:
            if interrupted:
                break
            before = ingestor.summary.copy()
            try:
                stream = open_input(name)
            except OSError as exc:
                raise ConfigError("files", f"cannot open {name}: {exc.strerror or exc}") from None
            lines = InputLines(name, stream)
            parser = LineParser(fmt, sensor, cfg.ingest.community_id_seed)
            with stream:
                try:
                    await ingestor.run(lines, progress, parser)
                except StorylineError as exc:
                    _ingest_report(ingestor.summary, skew, tty)
                    print(
                        f"storyline: ingest stopped at {name} line {lines.stopped_after:,}: {exc}\n"
                        "storyline: the counts above are what was written; running the same ingest again is safe"
                        " (an event's id is derived from its content; consumers deduplicate by id)",
                        file=sys.stderr,
                    )
                    return EXIT_FAIL
            per_file.append((name, ingestor.summary.since(before)))
            if parser.vpcflow.nodata or parser.vpcflow.skipdata:
                print(
                    f"ingest: file {name}: {parser.vpcflow.nodata:,} NODATA and {parser.vpcflow.skipdata:,} SKIPDATA"
                    " VPC records (no flow; counted as skipped lines)"
                )
            if parser.eve.community_id_mismatches:
                print(
                    f"storyline: {name}: {parser.eve.community_id_mismatches:,} EVE records name a community_id that"
                    f" differs from Storyline's (first: {parser.eve.first_mismatch}); check ingest.community_id_seed"
                    " against Suricata's community-id-seed",
                    file=sys.stderr,
                )
            if lines.error is not None:
                print(
                    f"storyline: reading {name} stopped after line {lines.stopped_after:,}: {lines.error}; every"
                    " complete line before it was ingested",
                    file=sys.stderr,
                )
                rc = EXIT_FAIL
            if lines.interrupted:
                break
        _ingest_report(ingestor.summary, skew, tty)
        if len(per_file) > 1:
            for name, s in per_file:
                reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(s.reasons.items(), key=lambda kv: (-kv[1], kv[0])))
                print(
                    f"ingest: file {name}: accepted {s.accepted:,}, rejected {s.rejected:,}"
                    + (f" ({reasons})" if reasons else "")
                    + f", duplicates {s.duplicates:,}, empty lines {s.empty:,}, {s.lines:,}"
                    + (" line" if s.lines == 1 else " lines")
                )
        if interrupted:
            where = f"; {lines.name} stopped after line {lines.stopped_after:,}" if lines is not None else ""
            print(
                f"storyline: interrupted: every line read before it was ingested (the counts above){where}",
                file=sys.stderr,
            )
            rc = 130
    finally:
        signal.signal(signal.SIGINT, previous)
        await store.close()
    return rc


def _ingest_report(s: IngestSummary, skew: int, tty: bool) -> None:
    if tty:
        sys.stderr.write("\n")
    print(f"ingest: {s.line()}; database clock {skew:+d} ms")
    if s.reasons:
        top = ", ".join(f"{k} {v}" for k, v in sorted(s.reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        print(f"ingest: rejections by field: {top} (see `storyline dead-letter`)")


async def cmd_dead_letter(cfg: Config, do_redrive: bool, limit: int) -> int:
    store = await _with_store(cfg)
    try:
        if do_redrive:
            r = await redrive(store, Producer(store, ProducerSettings.from_config(cfg)))
            print(f"dead-letter: redrive accepted {r.accepted:,} now, {r.still:,} still rejected")
            if r.cut:
                print(
                    f"dead-letter: {r.cut:,} {'line was' if r.cut == 1 else 'lines were'} kept only in part (longer"
                    f" than {DEAD_LETTER_RAW_MAX:,} bytes) and cannot be redriven: ingest the source file again"
                )
            return EXIT_OK
        total = pending = shown = 0
        async for page in store.scan_dead_letters():
            for d in sorted(page, key=lambda d: (d.file, d.line)):
                total += 1
                pending += d.redriven_ms is None
                if limit == 0 or shown < limit:
                    shown += 1
                    state = "" if d.redriven_ms is None else " [redriven]"
                    if d.raw_bytes is not None:
                        state += f" [line of {d.raw_bytes:,} bytes, first {len(d.raw):,} kept: not redrivable]"
                    print(f"{d.file}:{d.line}: {d.reason}{state}")
        print(
            f"dead-letter: {total:,} rejected lines, {pending:,} not redriven"
            + (f" (showing {shown:,}; --limit 0 for all)" if shown < total else "")
        )
    finally:
        await store.close()
    return EXIT_OK


def cmd_run(cfg: Config, args: argparse.Namespace, stage_factory: StageFactory | None = None) -> int:
    """``stage_factory``: what the workers run instead of ``--stage`` (a library caller's or a test's stage)."""
    import logging

    from engine.runtime.assign import parse_range
    from engine.runtime.settings import ConfiguredStore, SupervisorSettings
    from engine.runtime.stages import CountingStageFactory, StoryStageFactory
    from engine.runtime.supervisor import Supervisor

    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        raise ConfigError("--log-level", f"{args.log_level!r} is not a log level")
    logging.basicConfig(level=level, format="%(asctime)s supervisor %(levelname)s %(message)s")
    group = bool(getattr(args, "group", False))
    if group and args.shards is not None:
        raise ConfigError("--group", "a group shares all the shards among its members: give --group or --shards")
    if group and (args.until_idle or args.drain):
        raise ConfigError("--group", "a group member runs until stopped: --until-idle and --drain take --shards")
    owned = parse_range(args.shards, cfg.shards)
    workers = args.workers if args.workers is not None else cfg.workers
    if workers < 1:
        raise ConfigError("--workers", "must be >= 1")
    offset_ms = asyncio.run(_check_ready(cfg))
    if stage_factory is None:
        stage_factory = StoryStageFactory.for_config(cfg) if args.stage == "stories" else CountingStageFactory()
    sup = Supervisor(
        SupervisorSettings.from_config(cfg),
        ConfiguredStore.from_config(cfg),
        stage_factory,
        owned,
        workers,
        until_idle=args.until_idle,
        drain=args.drain,
        log_level=level,
        clock_offset_ms=offset_ms,
        group=group,
    )
    return sup.run()


async def _check_ready(cfg: Config) -> int:
    """Fail fast, in the supervisor, on what every worker would fail on: no database, no tenant. Returns the
    database's clock minus this host's (ms): --until-idle / --drain read what was written before the start by
    the database's clock, which producers and workers go by."""
    store = await _with_store(cfg)
    try:
        if not (await store.read_meta()).get("created_ms"):
            raise ConfigError("tenant", f"{cfg.tenant} is not initialized: run `storyline init` first")
        return (await database_offset(SYSTEM_CLOCK, store.server_time_ms)).offset_ms
    finally:
        await store.close()


async def cmd_status(cfg: Config, shards_arg: str | None, as_json: bool) -> int:
    import json

    from engine.runtime.assign import parse_range

    owned = parse_range(shards_arg, cfg.shards)
    store = await _with_store(cfg)
    try:
        offsets = {o.shard: o for o in await store.read_offsets(cfg.consumer, list(owned))}
        members = await store.read_members(cfg.consumer)
        meta = await store.read_meta()
        now = await store.server_time_ms()
        clocks = await _sensor_clocks(cfg, store, now)
    finally:
        await store.close()
    bms, lag = cfg.bucket_ms, cfg.lag_ms
    rows: list[dict[str, Any]] = []
    healthy = True
    warnings = []
    for shard in owned:
        o = offsets.get(shard)
        if o is None:
            rows.append({"shard": shard, "read_bucket": None, "behind_s": None, "replay_bucket": None, "owner": None})
            healthy = False
            continue
        behind = (now - (o.read_bucket + 1) * bms) / 1000
        if behind * 1000 > 2 * lag:
            healthy = False
        replay_age = now - o.replay_bucket * bms
        if replay_age > 0.8 * cfg.ttl_ms:
            warnings.append(
                f"shard {shard}: replay_bucket is {replay_age / 3.6e6:.1f} h old, within 20 % of the TTL "
                f"({cfg.ttl_ms / 3.6e6:.0f} h): data it needs is about to expire"
            )
        rows.append(
            {
                "shard": shard,
                "read_bucket": o.read_bucket,
                "behind_s": round(behind, 1),
                "replay_bucket": o.replay_bucket,
                "owner": o.owner,
                "epoch": o.epoch,
                "lease_expires_ms": o.lease_expires_ms,
            }
        )
    known = [r["behind_s"] for r in rows if r["behind_s"] is not None]
    summary = {
        "tenant": cfg.tenant,
        "consumer": cfg.consumer,
        "shards": len(rows),
        "shards_without_offset": sum(1 for r in rows if r["read_bucket"] is None),
        "max_behind_s": max(known) if known else None,
        "healthy": healthy,
        "threshold_s": 2 * lag / 1000,
        "created_ms": int(meta.get("created_ms", "0") or 0),
    }
    if as_json:
        group = [
            {"member": m.member, "host": m.host, "pid": m.pid, "workers": m.workers, "started_ms": m.started_ms,
             "heartbeat_ms": m.heartbeat_ms}
            for m in members
        ]  # fmt: skip
        print(
            json.dumps(
                {
                    "summary": summary,
                    "members": group,
                    "shards": rows,
                    "sensor_clocks": clocks,
                    "warnings": warnings,
                }
            )
        )
    else:
        if members:
            print(f"group {cfg.consumer}: {len(members)} members")
            print(f"  {'member':<40} {'host':<20} {'pid':>7} {'workers':>7} {'shards':>6} {'heartbeat_s_ago':>15}")
            for m in members:
                held = sum(1 for r in rows if r["owner"] and r["owner"].startswith(m.member + ":"))
                ago = max(0.0, (now - m.heartbeat_ms) / 1000)
                print(f"  {m.member:<40} {m.host:<20} {m.pid:>7} {m.workers:>7} {held:>6} {ago:>15.1f}")
        print(
            f"{'shard':>5} {'read_bucket':>14} {'behind_s':>9} {'replay_bucket':>14} {'epoch':>6} {'lease_s':>8}  owner"
        )
        for r in rows:
            rb = "-" if r["read_bucket"] is None else r["read_bucket"]
            bs = "-" if r["behind_s"] is None else r["behind_s"]
            rp = "-" if r["replay_bucket"] is None else r["replay_bucket"]
            ep = r.get("epoch") or "-"
            lease = r.get("lease_expires_ms")
            ls = "-" if not lease else f"{(lease - now) / 1000:.1f}"  # none, or released (0)
            print(f"{r['shard']:>5} {rb:>14} {bs:>9} {rp:>14} {ep:>6} {ls:>8}  {r['owner'] or '-'}")
        state = "healthy" if healthy else "UNHEALTHY"
        print(
            f"status: {state}: {len(rows)} shards, max behind {summary['max_behind_s']} s "
            f"(threshold {2 * lag / 1000:.0f} s), {summary['shards_without_offset']} never consumed"
        )
        if cfg.correlate.offsets.estimate and not any(c["source"] != "configured" for c in clocks["sensors"].values()):
            print(
                "sensor clocks: none learned yet — a table is built per epoch (correlate.offsets.epoch_ms ="
                f" {cfg.correlate.offsets.epoch_ms}) from the evidence of the epochs before it"
                + (f"; latest table: epoch {clocks['epoch']}" if clocks["epoch"] is not None else "")
            )
        if clocks["sensors"]:
            print(
                f"sensor clocks (epoch {clocks['epoch']}, against {clocks['reference'] or '-'}; "
                f"offset = the sensor's clock minus the reference's):"
            )
            print(f"  {'sensor':<32} {'offset_s':>12} {'samples':>8} {'spread_s':>9}  source")
            for name, c in clocks["sensors"].items():
                samples = "-" if c["samples"] is None else c["samples"]
                spread = "-" if c["spread_s"] is None else c["spread_s"]
                print(f"  {name:<32} {c['offset_s']:>12.3f} {samples:>8} {spread:>9}  {c['source']}")
        for w in warnings:
            print(f"warning: {w}")
    return EXIT_OK if healthy else EXIT_FAIL


async def _sensor_clocks(cfg: Config, store: Store, now_ms: int) -> dict[str, Any]:
    """The sensor clock offsets in use now: the latest learned table (when estimated) and the configured ones."""
    from engine.runtime.offsets import decode_table

    out: dict[str, Any] = {"epoch": None, "reference": cfg.correlate.reference_sensor, "sensors": {}}
    sensors: dict[str, dict[str, Any]] = {}
    if cfg.correlate.offsets.estimate:
        found = await store.latest_offset_table(cfg.consumer, now_ms // cfg.correlate.offsets.epoch_ms + 1)
        if found is not None:
            table = decode_table(found[1])
            out["epoch"], out["reference"] = table.epoch, table.reference
            for name in sorted(table.offsets_us):
                sensors[name] = {
                    "offset_s": table.offsets_us[name] / 1e6,
                    "samples": table.samples.get(name),
                    "spread_s": round(table.spread_us.get(name, 0) / 1e6, 3),
                    "source": "reference" if name == table.reference else "learned",
                }
    for name, ms in sorted(cfg.correlate.sensor_offsets_ms.items()):
        sensors[name] = {"offset_s": ms / 1000, "samples": None, "spread_s": None, "source": "configured"}
    out["sensors"] = dict(sorted(sensors.items()))
    return out


async def cmd_story(cfg: Config, story_id: str, fmt: str) -> int:
    """One story's latest revision, found by id (a merged story shows its ``merged_into`` stub)."""
    import msgspec

    store = await _with_store(cfg)
    try:
        rec = await store.get_story(story_id)
    finally:
        await store.close()
    if rec is None:
        print(f"stories: no story {story_id!r} (unknown, or expired after ttl_ms)", file=sys.stderr)
        return EXIT_FAIL
    if fmt == "jsonl":
        sys.stdout.write(rec.body.decode() + "\n")
    elif fmt in ("ecs", "ocsf"):
        from engine.export import encode_story

        # no form in that format (a version 1 body; OCSF: a flowless story): InputError, exit 1 with the reason
        sys.stdout.write(encode_story(rec.body, fmt, product_version=__version__).decode() + "\n")
    else:
        body = msgspec.json.decode(rec.body)
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(body), indent=2).decode() + "\n")
    return EXIT_OK


def _story_line(story_id: str, revision: int, b: dict[str, Any]) -> str:
    """One story as a table line: a version 2 body, or a version 1 one (rows written before version 2)."""
    if b.get("body_version") == 2:
        start = b["start"]
        sensors = ",".join(o["sensor"] for o in b["observers"])
        c, s = b.get("client"), b.get("server")
        flow = "-" if c is None or s is None else f"{_hostport(c)} -> {_hostport(s)}"
        if b.get("initiator_known") is False:
            flow += " (guessed)"
    else:  # version 1: times in µs, endpoints in Community ID order, not client and server
        import datetime as dt

        start = dt.datetime.fromtimestamp(b["first_seen"] / 1e6, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        sensors = ",".join(b["sensors"])
        f = b.get("flow")
        flow = "-" if f is None else f"{_hostport(f['a'])} <-> {_hostport(f['b'])} (v1 body)"
    return f"{story_id:<24} {revision:>3} {b['event_count']:>6}  {start:<26} {sensors:<28} {flow}"


def _hostport(ep: dict[str, Any]) -> str:
    ip, port = ep["ip"], ep.get("port")
    host = f"[{ip}]" if ":" in ip else ip
    return host if port is None else f"{host}:{port}"


async def cmd_feed(
    cfg: Config,
    *,
    reader: str,
    start: str | int,
    follow: bool,
    final_only: bool,
    out_path: str,
    fmt: str = "jsonl",
) -> int:
    import json
    import signal

    from engine.core.errors import InputError
    from engine.export import encode_story
    from engine.feed import FeedGap, FeedSettings, StoryFeed

    settings = FeedSettings.from_config(cfg)
    store = await _with_store(cfg)
    to_file = out_path != "-"
    fd = os.open(out_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644) if to_file else sys.stdout.fileno()
    if to_file:
        _cut_partial_line(fd)
    buf = bytearray()  # written in whole lines; a kill during a write may still leave part of one (cut above)
    feed = StoryFeed(store, settings, reader=reader, start=start, follow=follow, final_only=final_only)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, feed.stop)
    gaps = 0
    skipped = 0  # revisions without a form in --format (ecs, ocsf)

    def flush() -> None:
        view = memoryview(buf)
        while view:
            view = view[os.write(fd, view) :]
        view.release()
        buf.clear()

    async def commit() -> None:
        flush()
        if to_file:
            os.fsync(fd)
        await feed.commit()

    async def committer() -> None:  # following: what was delivered is committed within commit_interval_ms
        while True:
            await asyncio.sleep(cfg.commit_interval_ms / 1000)
            await commit()

    # Where this start resumes, before any line is delivered: an operator sees it, and a supervisor (or a test)
    # knows the reader is up and reading.
    stored = await feed.resume_point()
    if stored is None:
        first = {"earliest": "the oldest revision kept", "latest": "the revisions completed from now on"}
        begin = f"no committed position: starting at {first[start] if isinstance(start, str) else _rfc3339_ms(start)}"
    else:
        when = f"period {stored.period} ({_rfc3339_ms(stored.period * cfg.bucket_ms)})"
        begin = f"resuming after {when}" if stored.shard >= cfg.shards else f"resuming in {when}, shard {stored.shard}"
    print(f"feed: reader {reader}: {begin}{'; following' if follow else ''}", file=sys.stderr, flush=True)
    task = asyncio.create_task(committer()) if follow else None
    try:
        async for item in feed:
            if isinstance(item, FeedGap):
                gaps += 1
                print(
                    json.dumps(
                        {
                            "gap": {
                                "reader": item.reader,
                                "first_period": item.first_period,
                                "last_period": item.last_period,
                                "from": _rfc3339_ms(item.first_ms),
                                "until": _rfc3339_ms(item.end_ms),
                            },
                            "message": f"revisions emitted from {_rfc3339_ms(item.first_ms)} until "
                            f"{_rfc3339_ms(item.end_ms)} may have expired (ttl_ms {cfg.ttl_ms}) before reader "
                            f"{item.reader} read them",
                        }
                    ),
                    file=sys.stderr,
                )
                continue
            if fmt == "jsonl":
                buf += item.record.body
                buf += b"\n"
            else:
                try:
                    buf += encode_story(item.record.body, fmt, product_version=__version__) + b"\n"
                except InputError as exc:  # no form in this format: named on stderr, and counted as delivered
                    skipped += 1
                    rec = item.record
                    skip = {"story_id": rec.story_id, "revision": rec.revision, "format": fmt, "reason": str(exc)}
                    print(json.dumps({"skipped": skip}), file=sys.stderr)
            if len(buf) >= 1 << 16:
                flush()
            if feed.revisions % FEED_COMMIT_EVERY == 0:  # bounds what a kill makes a restart deliver again
                await commit()
        await commit()
    except BrokenPipeError:  # the reading end went away: what it did not take stays uncommitted
        return EXIT_OK
    finally:
        if task is not None:
            task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if to_file:
            os.close(fd)
        await store.close()
    pos = feed.committed
    where = (
        "none" if pos is None else f"period {pos.period} ({_rfc3339_ms(pos.period * cfg.bucket_ms)}), shard {pos.shard}"
    )
    without = f" ({skipped:,} skipped: no {fmt} form)" if skipped else ""
    print(f"feed: reader {reader}: {feed.revisions:,} revisions delivered{without}; position {where}", file=sys.stderr)
    if feed.waiting_for:
        shown = ", ".join(map(str, feed.waiting_for[:8])) + (" ..." if len(feed.waiting_for) > 8 else "")
        print(
            f"feed: shards {shown} have no committed checkpoint of consumer {cfg.consumer!r} yet: nothing is complete"
            " until every shard has one (has `storyline run` started?)",
            file=sys.stderr,
        )
    return EXIT_GAP if gaps and not follow else EXIT_OK


def _cut_partial_line(fd: int) -> None:
    """Truncate ``fd``'s file after its last newline. A kill -9 can interrupt a write part way; that line was
    never committed, so the reader delivers it again after the cut."""
    end = os.lseek(fd, 0, os.SEEK_END)
    keep = end
    while keep > 0:
        chunk = os.pread(fd, min(keep, 1 << 16), keep - min(keep, 1 << 16))
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            keep = keep - len(chunk) + nl + 1
            break
        keep -= len(chunk)
    if keep != end:
        os.ftruncate(fd, keep)


FEED_COMMIT_EVERY = 1_000  # revisions; each commit is one fsync and one position write


def _rfc3339_ms(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


async def cmd_stories(cfg: Config, fmt: str, since: float | None, limit: int, until: float | None = None) -> int:
    import msgspec

    latest: dict[str, Any] = {}
    store = await _with_store(cfg)
    try:
        async for page in store.scan_stories():
            for rec in page:
                cur = latest.get(rec.story_id)
                if cur is None or rec.revision > cur.revision:
                    latest[rec.story_id] = rec
    finally:
        await store.close()
    live = [r for r in latest.values() if r.merged_into is None]
    if since is not None:
        live = [r for r in live if r.emitted_ms >= since * 1000]
    if until is not None:
        live = [r for r in live if r.emitted_ms < until * 1000]
    live.sort(key=lambda r: (r.emitted_ms, r.story_id))
    if limit:
        live = live[:limit]
    out = sys.stdout
    skipped = 0
    if fmt == "jsonl":
        for r in live:
            out.write(r.body.decode() + "\n")
    elif fmt in ("ecs", "ocsf"):
        from engine.core.errors import InputError
        from engine.export import encode_story

        for r in live:
            try:
                out.write(encode_story(r.body, fmt, product_version=__version__).decode() + "\n")
            except InputError as exc:  # no form in this format: said, and the others still written
                skipped += 1
                print(f"stories: skipped: {exc}", file=sys.stderr)
    else:
        out.write(f"{'story_id':<24} {'rev':>3} {'events':>6}  {'start (UTC)':<26} {'sensors':<28} client -> server\n")
        for r in live:
            out.write(_story_line(r.story_id, r.revision, msgspec.json.decode(r.body)) + "\n")
    merged = sum(1 for r in latest.values() if r.merged_into is not None)
    not_shown = f" ({skipped:,} skipped: no {fmt} form)" if skipped else ""
    print(
        f"stories: {len(live) - skipped:,} shown{not_shown}, {len(latest):,} story ids ({merged:,} merged into others)",
        file=sys.stderr,
    )
    return EXIT_OK


def _scenario(args: argparse.Namespace, start_s: float) -> Scenario:
    from engine.tools.simulate import Scenario

    return Scenario(
        events=args.events,
        seed=args.seed,
        start_s=start_s,
        span_s=args.span_s,
        skew_s=args.skew_s,
        spans=args.spans,
        reuse_gap_s=args.reuse_gap_s,
        port_reuse_fraction=args.port_reuse_fraction,
        lookups=args.lookups,
    )


async def cmd_simulate(cfg: Config, args: argparse.Namespace) -> int:
    from engine.ingest.canonical import ParseRules, parse_line
    from engine.tools.simulate import generate, write, write_lines

    if args.events < 1 or args.speed <= 0 or args.span_s <= 0 or args.skew_s < 0:
        raise ConfigError("--events/--speed/--span-s/--skew-s", "must be positive (skew >= 0)")
    if args.reuse_gap_s < 0:
        raise ConfigError("--reuse-gap-s", f"{args.reuse_gap_s:g} must be >= 0")
    if not 0.0 <= args.port_reuse_fraction <= 1.0:
        raise ConfigError("--port-reuse-fraction", f"{args.port_reuse_fraction:g} is not a share within [0, 1]")
    if args.format != "canonical" and args.live:
        raise ConfigError("--format", "a sensor format is written to --out, not sent --live")
    if not 0.0 <= args.alert_fraction <= 1.0 or (args.alert_fraction and args.format != "eve"):
        raise ConfigError("--alert-fraction", "is a share within [0, 1], for --format eve")
    start = time.time() - args.span_s
    if not args.live:
        if not args.out or not args.truth:
            raise ConfigError("--out/--truth", "both are needed (or use --live)")
        events, truth = generate(_scenario(args, start))
        if args.format != "canonical":
            from engine.tools.sensor_views import sensor_view

            view = sensor_view(
                events, truth, args.format, alert_fraction=args.alert_fraction, now_ms=int(time.time() * 1000)
            )
            write_lines(view.lines, view.truth, args.out, args.truth)
            print(
                f"simulate: {len(view.truth.stories):,} {args.format} records of {len(events):,} simulated events,"
                f" {len(set(view.truth.stories.values())):,} stories -> {args.out}, {args.truth}"
            )
            return EXIT_OK
        write(events, truth, args.out, args.truth)
        print(
            f"simulate: {len(events):,} events, {len(set(truth.stories.values())):,} stories -> {args.out}, "
            f"{args.truth}"
        )
        return EXIT_OK
    # Live: the scenario starts now; each event is sent at its arrival offset / speed.
    events, truth = generate(_scenario(args, time.time()))
    if args.truth:
        await asyncio.to_thread(Path(args.truth).write_bytes, truth.to_json())
    store = await _with_store(cfg)
    try:
        producer = Producer(store, ProducerSettings.from_config(cfg))
        await producer.check_clock()
        t0 = time.monotonic()
        sent = 0
        i = 0
        while i < len(events):
            due = t0 + events[i].arrival_s / args.speed
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now_ms = int(time.time() * 1000)
            batch = []
            while i < len(events) and t0 + events[i].arrival_s / args.speed <= time.monotonic():
                batch.append(parse_line(events[i].line, ParseRules.from_config(cfg), now_ms))
                i += 1
            sent += (await producer.write(batch)).events
            if sys.stderr.isatty():
                sys.stderr.write(f"\rsimulate: {sent:,}/{len(events):,} events sent")
        print(f"\nsimulate: {sent:,} events sent live at speed {args.speed:g}")
    finally:
        await store.close()
    return EXIT_OK


async def cmd_verify(cfg: Config, truth_path: str | None, ingest_logs: Sequence[str] = ()) -> int:
    import msgspec

    from engine.tools.verify import IngestRun, parse_ingest_summary, reconcile, verify

    runs: list[IngestRun] = []
    for item in ingest_logs:
        name, sep, log = item.partition("=")
        if not sep or not name or not log:
            raise ConfigError("--ingest-log", f"{item!r} must be INPUT=LOG")
        try:
            text = await asyncio.to_thread(Path(log).read_text, encoding="utf-8", errors="replace")
            runs.append(parse_ingest_summary(name, text))
        except (OSError, ValueError) as exc:
            raise ConfigError("--ingest-log", f"{log}: {exc}") from None

    truth: dict[str, str] = {}
    if truth_path:
        try:
            raw = await asyncio.to_thread(Path(truth_path).read_bytes)
            truth = msgspec.json.decode(raw)["stories"]
        except (OSError, msgspec.DecodeError, KeyError, TypeError) as exc:
            raise ConfigError("--truth", f"cannot read a truth file from {truth_path}: {exc}") from None
    store = await _with_store(cfg)
    try:
        report = await verify(store, cfg, await store.server_time_ms())
    finally:
        await store.close()
    if truth:
        report.truth_missing = sorted(set(truth) - report.accepted_ids)
    if runs:
        reconcile(report, runs)
    for line in report.lines():
        print(line)
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_config(cfg: Config) -> int:
    import msgspec

    tree = msgspec.to_builtins(cfg)
    if tree["store"].get("password") is not None:
        tree["store"]["password"] = "***"  # noqa: S105 - the mask, not a secret

    def emit(prefix: str, node: dict[str, object]) -> None:
        for k, v in node.items():
            if isinstance(v, dict) and k != "datacenters":
                emit(f"{prefix}{k}.", v)
            else:
                print(f"{prefix}{k} = {v!r}")

    emit("", tree)
    return EXIT_OK


def _masked(exc: BaseException, secrets: Sequence[str]) -> str:
    """An error's message with the configured password masked (the store masks it already; printing is the
    last place to make sure)."""
    return mask(str(exc), secrets)


def main(argv: Sequence[str] | None = None, *, stage_factory: StageFactory | None = None) -> int:
    """``stage_factory`` (``run`` only): the stage every worker builds, instead of the one ``--stage`` names."""
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from engine.tools.simulate import sessions

        out = sys.stdout.buffer
        for line in sessions(args.sessions, seed=args.seed, start_s=time.time() - args.span_s, span_s=args.span_s):
            out.write(line + b"\n")
        out.flush()
        return EXIT_OK
    secrets: list[str] = []
    try:
        if args.command == "tune":  # before _config: tune needs no tenant; engine/tools/tune does the work
            from engine.tools.tune import main as tune

            return tune(args)
        cfg = _config(args)
        if cfg.store.password:
            secrets.append(cfg.store.password)
        if args.command == "init":
            return asyncio.run(cmd_init(cfg))
        if args.command == "selftest":
            return asyncio.run(cmd_selftest(cfg, args.events))
        if args.command == "config":
            return cmd_config(cfg)
        if args.command == "run":
            return cmd_run(cfg, args, stage_factory)
        if args.command == "simulate":
            return asyncio.run(cmd_simulate(cfg, args))
        if args.command == "verify":
            return asyncio.run(cmd_verify(cfg, args.truth, args.ingest_log))
        if args.command == "stories":
            if args.story_id is not None:
                return asyncio.run(cmd_story(cfg, args.story_id, args.format))
            return asyncio.run(cmd_stories(cfg, args.format, args.since, args.limit, args.until))
        if args.command == "feed":
            return asyncio.run(
                cmd_feed(
                    cfg,
                    reader=args.reader,
                    start=args.start,
                    follow=args.follow,
                    final_only=args.final_only,
                    out_path=args.out,
                    fmt=args.format,
                )
            )
        if args.command == "status":
            return asyncio.run(cmd_status(cfg, args.shards, args.json))
        if args.command == "ingest":
            return asyncio.run(cmd_ingest(cfg, args.files, fmt=args.format, sensor=args.sensor))
        if args.command == "dead-letter":
            return asyncio.run(cmd_dead_letter(cfg, args.redrive, args.limit))
    except ConfigError as exc:
        print(f"storyline: config error: {_masked(exc, secrets)}", file=sys.stderr)
        return EXIT_USAGE
    except StorylineError as exc:
        print(f"storyline: {_masked(exc, secrets)}", file=sys.stderr)
        return EXIT_FAIL
    except (OSError, EOFError, zlib.error) as exc:  # unreadable or truncated input, a port in use, a full disk
        print(f"storyline: {type(exc).__name__}: {_masked(exc, secrets)}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
