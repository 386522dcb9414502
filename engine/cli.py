"""The ``storyline`` command: a thin layer over the library. The only place that reads the environment.

Exit codes: 0 success, 1 the operation failed (database unreachable, check failed), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
import uuid
from collections.abc import Sequence

from engine import __version__
from engine.config import Config, load
from engine.errors import ConfigError, StorylineError
from engine.ingest import Ingestor, IngestSummary, Producer, open_input, read_lines, redrive
from engine.store import EventRecord, Store, make_store

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


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
    p = sub.add_parser("ingest", help="validate JSONL events (plain or gzip) and write them durably")
    _common(p)
    p.add_argument("files", nargs="*", default=["-"], help="JSONL files, plain or gzip; - for stdin (default)")
    p = sub.add_parser("synth", help="write deterministic synthetic sensor events as JSONL to stdout")
    p.add_argument("--sessions", type=int, default=1_000, help="network sessions (1..4 events each)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--span-s", type=float, default=600.0, help="seconds the sessions spread over, ending now")
    p = sub.add_parser("dead-letter", help="list rejected input lines, or --redrive them through validation")
    _common(p)
    p.add_argument("--redrive", action="store_true", help="validate every pending dead letter again")
    p.add_argument("--limit", type=int, default=100, help="lines to list (default 100; 0 for all)")
    return parser


def _config(args: argparse.Namespace) -> Config:
    return load(args.config, args.overrides)


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
        await store.close()
    return EXIT_OK


async def cmd_ingest(cfg: Config, files: list[str]) -> int:
    tty = sys.stderr.isatty()

    def progress(s: IngestSummary) -> None:
        if tty:
            rate = s.accepted / max(s.seconds, 1e-9)
            mb = s.bytes / 1e6 / max(s.seconds, 1e-9)
            sys.stderr.write(
                f"\r{s.lines:,} lines  {s.accepted:,} accepted  {s.rejected:,} rejected  "
                f"{rate:,.0f} events/s  {mb:,.1f} MB/s "
            )
            sys.stderr.flush()

    store = await _with_store(cfg)
    try:
        producer = Producer(store, cfg)
        skew = await producer.check_clock()
        ingestor = Ingestor(store, cfg, producer)
        for name in files:
            try:
                stream = open_input(name)
            except OSError as exc:
                raise ConfigError("files", f"cannot open {name}: {exc.strerror or exc}") from None
            with stream:
                try:
                    await ingestor.run(read_lines(name, stream), progress)
                except (OSError, EOFError) as exc:  # a truncated gzip, a read error
                    print(f"storyline: reading {name} stopped: {exc}", file=sys.stderr)
                    return EXIT_FAIL
        s = ingestor.summary
        if tty:
            sys.stderr.write("\n")
        print(f"ingest: {s.line()}; database clock {skew:+d} ms")
        if s.reasons:
            top = ", ".join(f"{k} {v}" for k, v in sorted(s.reasons.items(), key=lambda kv: -kv[1]))
            print(f"ingest: rejections by field: {top} (see `storyline dead-letter`)")
    finally:
        await store.close()
    return EXIT_OK


async def cmd_dead_letter(cfg: Config, do_redrive: bool, limit: int) -> int:
    store = await _with_store(cfg)
    try:
        if do_redrive:
            accepted, still = await redrive(store, cfg, Producer(store, cfg))
            print(f"dead-letter: redrive accepted {accepted:,} now, {still:,} still rejected")
            return EXIT_OK
        total = pending = shown = 0
        async for page in store.scan_dead_letters():
            for d in sorted(page, key=lambda d: (d.file, d.line)):
                total += 1
                pending += d.redriven_ms is None
                if limit == 0 or shown < limit:
                    shown += 1
                    state = "" if d.redriven_ms is None else " [redriven]"
                    print(f"{d.file}:{d.line}: {d.reason}{state}")
        print(
            f"dead-letter: {total:,} rejected lines, {pending:,} not redriven"
            + (f" (showing {shown:,}; --limit 0 for all)" if shown < total else "")
        )
    finally:
        await store.close()
    return EXIT_OK


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from engine.synth import sessions

        out = sys.stdout.buffer
        for line in sessions(args.sessions, seed=args.seed, start_s=time.time() - args.span_s, span_s=args.span_s):
            out.write(line + b"\n")
        out.flush()
        return EXIT_OK
    try:
        cfg = _config(args)
        if args.command == "init":
            return asyncio.run(cmd_init(cfg))
        if args.command == "selftest":
            return asyncio.run(cmd_selftest(cfg, args.events))
        if args.command == "config":
            return cmd_config(cfg)
        if args.command == "ingest":
            return asyncio.run(cmd_ingest(cfg, args.files))
        if args.command == "dead-letter":
            return asyncio.run(cmd_dead_letter(cfg, args.redrive, args.limit))
    except ConfigError as exc:
        print(f"storyline: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StorylineError as exc:
        print(f"storyline: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
