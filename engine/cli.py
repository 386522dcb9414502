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
    try:
        cfg = _config(args)
        if args.command == "init":
            return asyncio.run(cmd_init(cfg))
        if args.command == "selftest":
            return asyncio.run(cmd_selftest(cfg, args.events))
        if args.command == "config":
            return cmd_config(cfg)
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
