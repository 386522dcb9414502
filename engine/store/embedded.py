"""The embedded store: SQLite, for development, ``make run`` and tiny tenants. Same semantics as the CQL store.

* One file may hold several tenants; each tenant's tables carry its (validated) name as a prefix, as a
  keyspace would.
* WAL journal, ``synchronous = FULL`` (a commit is on disk when it returns), a busy timeout equal to
  ``request_timeout_ms`` (so a write lands within it, as the lag rule assumes), and
  ``BEGIN IMMEDIATE`` for writes, so several worker processes can share the file.
* TTL as on CQL: every row gets ``expires_ms = write time + ttl_ms``; reads never return expired rows and
  :meth:`purge_expired` (also run every few minutes by writers) deletes them.
* Offset commits are conditional inside one transaction, the equivalent of the CQL lightweight transaction.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from engine.core.clock import SYSTEM_CLOCK, Clock
from engine.core.errors import SchemaError, StoreError, TransientStoreError
from engine.core.records import (
    AppendResult,
    BucketHint,
    Commit,
    DeadLetter,
    EventRecord,
    EvidenceRecord,
    FeedPosition,
    Member,
    Offset,
    PartitionPage,
    StoryPeriod,
    StoryRecord,
    story_id_shard,
)
from engine.store.chunks import ROW_OVERHEAD, check_event_sizes, group_rows, hints, max_size_class, size_class
from engine.store.classify import sqlite_outcome
from engine.store.layout import (
    OFFSET_TABLE_SLOT,
    SCHEMA_VERSION,
    check_fixed,
    index_group,
    index_slot,
    initial_meta,
    story_lookup_periods,
)
from engine.store.paging import PageSizer, partition_pages
from engine.store.protocol import lease_ended, raise_fenced
from engine.store.retry import RetryStats, retrying
from engine.store.settings import StoreSettings

T = TypeVar("T")
PURGE_EVERY_MS = 5 * 60_000
POOL_THREADS = 4  # SQLite threads per store: concurrent WAL reads (read-ahead), one writer at a time


def _ddl(p: str) -> dict[str, str]:
    return {
        "meta": f'CREATE TABLE IF NOT EXISTS "{p}__meta" (key TEXT PRIMARY KEY, value TEXT NOT NULL)',
        "events": (
            f'CREATE TABLE IF NOT EXISTS "{p}__events" (shard INTEGER NOT NULL, bucket INTEGER NOT NULL, '
            f"event_id TEXT NOT NULL, chunk INTEGER NOT NULL, chunks INTEGER, payload BLOB NOT NULL, "
            f"expires_ms INTEGER NOT NULL, PRIMARY KEY (shard, bucket, event_id, chunk)) WITHOUT ROWID"
        ),
        "bucket_index": (
            f'CREATE TABLE IF NOT EXISTS "{p}__bucket_index" (shard_group INTEGER NOT NULL, slot INTEGER NOT NULL, '
            f"bucket INTEGER NOT NULL, shard INTEGER NOT NULL, size_class INTEGER NOT NULL, "
            f"expires_ms INTEGER NOT NULL, PRIMARY KEY (shard_group, slot, bucket, shard, size_class)) WITHOUT ROWID"
        ),
        "read_offsets": (
            f'CREATE TABLE IF NOT EXISTS "{p}__read_offsets" (consumer TEXT NOT NULL, shard INTEGER NOT NULL, '
            f"read_bucket INTEGER NOT NULL, replay_bucket INTEGER NOT NULL, owner TEXT NOT NULL, "
            f"epoch INTEGER NOT NULL, updated_ms INTEGER NOT NULL, lease_expires_ms INTEGER, "
            f"PRIMARY KEY (consumer, shard)) WITHOUT ROWID"
        ),
        "group_members": (
            f'CREATE TABLE IF NOT EXISTS "{p}__group_members" (consumer TEXT NOT NULL, member TEXT NOT NULL, '
            f"host TEXT NOT NULL, pid INTEGER NOT NULL, workers INTEGER NOT NULL, started_ms INTEGER NOT NULL, "
            f"heartbeat_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL, PRIMARY KEY (consumer, member)) WITHOUT ROWID"
        ),
        "stories": (
            f'CREATE TABLE IF NOT EXISTS "{p}__stories" (shard INTEGER NOT NULL, period INTEGER NOT NULL, '
            f"story_id TEXT NOT NULL, revision INTEGER NOT NULL, final INTEGER NOT NULL, merged_into TEXT, "
            f"emitted_ms INTEGER NOT NULL, body BLOB NOT NULL, expires_ms INTEGER NOT NULL, "
            f"PRIMARY KEY (shard, period, story_id, revision)) WITHOUT ROWID"
        ),
        "story_periods": (
            f'CREATE TABLE IF NOT EXISTS "{p}__story_periods" (period INTEGER NOT NULL, shard INTEGER NOT NULL, '
            f"sealed INTEGER NOT NULL DEFAULT 0, expires_ms INTEGER NOT NULL, PRIMARY KEY (period, shard)) "
            f"WITHOUT ROWID"
        ),
        "feed_readers": (
            f'CREATE TABLE IF NOT EXISTS "{p}__feed_readers" (reader TEXT PRIMARY KEY, period INTEGER NOT NULL, '
            f"shard INTEGER NOT NULL, story_id TEXT NOT NULL, revision INTEGER NOT NULL, updated_ms INTEGER NOT NULL)"
        ),
        "stage_marks": (
            f'CREATE TABLE IF NOT EXISTS "{p}__stage_marks" (consumer TEXT NOT NULL, shard INTEGER NOT NULL, '
            f"bucket INTEGER NOT NULL, part INTEGER NOT NULL, body BLOB NOT NULL, expires_ms INTEGER NOT NULL, "
            f"PRIMARY KEY (consumer, shard, bucket, part)) WITHOUT ROWID"
        ),
        "offset_evidence": (
            f'CREATE TABLE IF NOT EXISTS "{p}__offset_evidence" (consumer TEXT NOT NULL, epoch INTEGER NOT NULL, '
            f"shard INTEGER NOT NULL, body BLOB NOT NULL, expires_ms INTEGER NOT NULL, "
            f"PRIMARY KEY (consumer, epoch, shard)) WITHOUT ROWID"
        ),
        "offset_tables": (
            f'CREATE TABLE IF NOT EXISTS "{p}__offset_tables" (consumer TEXT NOT NULL, epoch INTEGER NOT NULL, '
            f"body BLOB NOT NULL, expires_ms INTEGER NOT NULL, PRIMARY KEY (consumer, epoch)) WITHOUT ROWID"
        ),
        "dead_letter": (
            f'CREATE TABLE IF NOT EXISTS "{p}__dead_letter" (dl_id TEXT PRIMARY KEY, received_ms INTEGER NOT NULL, '
            f"file TEXT NOT NULL, line INTEGER NOT NULL, reason TEXT NOT NULL, raw BLOB NOT NULL, "
            f"redriven_ms INTEGER, raw_bytes INTEGER)"
        ),
    }


def _classify(exc: sqlite3.Error, what: str) -> StoreError:
    outcome = sqlite_outcome(exc)
    if outcome == "transient":
        return TransientStoreError(f"{what}: {exc}")
    if outcome == "schema":
        return SchemaError(f"{what}: {exc} (run `storyline init`)")
    return StoreError(f"{what}: {exc}")


def _fetch(sql: str, args: tuple[Any, ...]) -> Callable[[sqlite3.Connection], list[Any]]:
    def run(c: sqlite3.Connection) -> list[Any]:
        return c.execute(sql, args).fetchall()

    return run


class EmbeddedStore:
    """:class:`engine.store.protocol.Store` on SQLite."""

    def __init__(self, settings: StoreSettings, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = cfg = settings.for_backend("embedded", "EmbeddedStore")
        self.clock = clock
        self.p = cfg.keyspace
        self.stats = RetryStats()
        # SQLite runs off the event loop: a small pool of threads, each with its own connection (made in the
        # thread on first use). A locked database then blocks a pool thread, never the loop (the worker's
        # heartbeat and read-ahead go on); WAL lets the threads read concurrently; writes take the database's
        # lock in BEGIN IMMEDIATE, waiting up to request_timeout_ms (busy_timeout) in their thread.
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._cons: list[sqlite3.Connection] = []
        self._cons_lock = threading.Lock()
        self._last_purge = 0
        self._worst_row = 1 << size_class(cfg.chunk_bytes + 1024 + ROW_OVERHEAD)
        self._row_estimate = float(self._worst_row)

    # -- plumbing ------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        """This thread's connection (made on first use; pool threads only)."""
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            path = self.settings.store.path
            # The busy timeout is the request timeout: a write waiting for the lock must land within
            # request_timeout_ms like a CQL write, or it could land in a bucket a worker already read.
            busy_ms = self.settings.request_timeout_ms
            con = sqlite3.connect(
                path, timeout=busy_ms / 1000, isolation_level=None, check_same_thread=False, uri=_is_uri(path)
            )
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=FULL")
                con.execute(f"PRAGMA busy_timeout={busy_ms}")
            except BaseException:
                con.close()
                raise
            self._local.con = con
            with self._cons_lock:
                self._cons.append(con)
        return con

    def _transaction(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        """In a pool thread: ``fn`` in one transaction (IMMEDIATE for writes)."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            out = fn(con)
            con.execute("COMMIT")
            return out
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    async def _in_thread(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        pool = self._pool
        if pool is None:
            raise StoreError("store is not open")
        return await asyncio.get_running_loop().run_in_executor(pool, self._transaction, fn, write)

    def t(self, table: str) -> str:
        return f'"{self.p}__{table}"'

    async def _run(
        self, what: str, fn: Callable[[sqlite3.Connection], T], *, write: bool = False, deadline_ms: int | None = None
    ) -> T:
        """Run ``fn`` in one transaction (IMMEDIATE for writes), retrying busy/locked errors."""

        async def once() -> T:
            try:
                return await self._in_thread(fn, write)
            except sqlite3.Error as exc:
                raise _classify(exc, what) from None

        return await retrying(
            once, settings=self.settings.store, what=what, stats=self.stats, clock=self.clock, deadline_ms=deadline_ms
        )

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def open(self) -> None:
        path = self.settings.store.path
        if not _in_memory(path) and not _is_uri(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # An in-memory database has no WAL and locks whole tables: one thread (one connection) per store.
        threads = 1 if _in_memory(path) else POOL_THREADS
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sqlite")
        try:
            await self._in_thread(lambda c: None, False)  # open the first connection now: errors surface here
        except sqlite3.Error as exc:
            await self.close()
            raise StoreError(f"open {path}: {exc}") from None
        meta = await self._meta_if_present()
        if meta is not None:
            check_fixed(self.settings, meta)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Wait for the calls in flight (a transaction is never cut in half), off the loop.
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown, True)
        with self._cons_lock:
            cons, self._cons = self._cons, []
        for con in cons:
            con.close()

    async def __aenter__(self) -> EmbeddedStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def server_time_ms(self) -> int:
        return self.clock.now_ms()  # the database is on this host

    # -- schema --------------------------------------------------------------------------------------------
    async def _meta_if_present(self) -> dict[str, str] | None:
        name = f"{self.p}__meta"
        found = await self._run(
            "read schema",
            lambda c: c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone(),
        )
        return None if found is None else await self.read_meta()

    async def drop_schema(self) -> None:
        def drop(c: sqlite3.Connection) -> None:
            for table in _ddl(self.p):
                c.execute(f"DROP TABLE IF EXISTS {self.t(table)}")

        await self._run("drop schema", drop, write=True)

    async def read_meta(self) -> dict[str, str]:
        rows = await self._run("read meta", lambda c: c.execute(f"SELECT key, value FROM {self.t('meta')}").fetchall())
        return {k: v for k, v in rows}

    async def init_schema(self) -> list[str]:
        cfg = self.settings
        did: list[str] = []
        tables = _ddl(self.p)

        def create(c: sqlite3.Connection) -> list[str]:
            out = []
            for table, ddl in tables.items():
                name = f"{self.p}__{table}"
                exists = c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
                if exists:
                    out.append(f"table {name} is current")
                else:
                    c.execute(ddl)
                    out.append(f"created table {name}")
            # The lookup by story id (CqlStore keeps a story_index table for it).
            index = f'"{self.p}__stories_by_id"'
            c.execute(f"CREATE INDEX IF NOT EXISTS {index} ON {self.t('stories')} (story_id, revision)")
            return out

        did.extend(await self._run("create schema", create, write=True))
        meta = await self.read_meta()
        if meta:
            check_fixed(cfg, meta)
        old = int(meta.get("schema_version", "0"))
        if old > SCHEMA_VERSION:
            raise SchemaError(f"tenant {cfg.tenant} has schema version {old}, newer than this Storyline")
        wanted = initial_meta(cfg, self.clock.now_ms())

        def write_meta(c: sqlite3.Connection) -> list[str]:
            out = []
            offsets_columns = {r[1] for r in c.execute(f"PRAGMA table_info({self.t('read_offsets')})")}
            if "lease_expires_ms" not in offsets_columns:  # schema 7
                c.execute(f"ALTER TABLE {self.t('read_offsets')} ADD COLUMN lease_expires_ms INTEGER")
                out.append(f"added column lease_expires_ms to {self.p}__read_offsets")
            dead_letter_columns = {r[1] for r in c.execute(f"PRAGMA table_info({self.t('dead_letter')})")}
            if "raw_bytes" not in dead_letter_columns:  # schema 5
                c.execute(f"ALTER TABLE {self.t('dead_letter')} ADD COLUMN raw_bytes INTEGER")
                out.append(f"added column raw_bytes to {self.p}__dead_letter")
            if 0 < old < 4:  # the stories partitions written before schema 4, for the story feed
                n = c.execute(
                    f"INSERT OR IGNORE INTO {self.t('story_periods')} (period, shard, expires_ms) "
                    f"SELECT period, shard, max(expires_ms) FROM {self.t('stories')} GROUP BY period, shard"
                ).rowcount
                out.append(f"recorded {n} existing stories partitions in {self.p}__story_periods")
            for key, value in wanted.items():
                cur = c.execute(f"INSERT OR IGNORE INTO {self.t('meta')} (key, value) VALUES (?, ?)", (key, value))
                if cur.rowcount:
                    out.append(f"recorded {key} = {value}")
            c.execute(
                f"INSERT OR REPLACE INTO {self.t('meta')} (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            out.append(
                f"schema version {old} -> {SCHEMA_VERSION}"
                if old != SCHEMA_VERSION
                else f"schema version {SCHEMA_VERSION}"
            )
            return out

        did.extend(await self._run("write meta", write_meta, write=True))
        return did

    # -- events --------------------------------------------------------------------------------------------
    async def append(
        self, shard: int, bucket: int, events: Sequence[EventRecord], *, deadline_ms: int | None = None
    ) -> AppendResult:
        cfg = self.settings
        check_event_sizes(events, cfg.max_event_bytes)
        if not events:
            return AppendResult(0, 0, 0, 0, 0)
        await self._maybe_purge()
        retries0 = self.stats.retries
        groups = group_rows(events, cfg.chunk_bytes, cfg.store.batch_bytes)
        cls = max_size_class(groups)
        index_sql = (
            f"INSERT OR REPLACE INTO {self.t('bucket_index')} (shard_group, slot, bucket, shard, size_class, "
            f"expires_ms) VALUES (?, ?, ?, ?, ?, ?)"
        )
        events_sql = (
            f"INSERT OR REPLACE INTO {self.t('events')} (shard, bucket, event_id, chunk, chunks, payload, expires_ms) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?)"
        )

        def write(c: sqlite3.Connection) -> None:
            # One transaction: the index row first, then every event row; durable (fsync) at COMMIT.
            exp = self.clock.now_ms() + cfg.ttl_ms
            c.execute(index_sql, (index_group(shard), index_slot(bucket, cfg.bucket_ms), bucket, shard, cls, exp))
            for group in groups:
                c.executemany(events_sql, [(shard, bucket, e, ch, n, pl, exp) for e, ch, n, pl in group])

        await self._run(f"write events ({shard}, {bucket})", write, write=True, deadline_ms=deadline_ms)
        rows = sum(len(g) for g in groups)
        return AppendResult(
            len(events), rows, sum(len(e.payload) for e in events), len(groups), self.stats.retries - retries0
        )

    async def read_partition(
        self, shard: int, bucket: int, *, max_row_bytes: int | None = None
    ) -> AsyncIterator[PartitionPage]:
        t = self.t("events")
        first = (
            f"SELECT event_id, chunk, chunks, payload FROM {t} WHERE shard = ? AND bucket = ? AND expires_ms > ? "
            f"ORDER BY event_id, chunk LIMIT ?"
        )
        after = (
            f"SELECT event_id, chunk, chunks, payload FROM {t} WHERE shard = ? AND bucket = ? AND expires_ms > ? "
            f"AND (event_id, chunk) > (?, ?) ORDER BY event_id, chunk LIMIT ?"
        )
        what = f"read events ({shard}, {bucket})"
        sizer = await PageSizer.for_partition(
            self.settings.store,
            max_row_bytes,
            lambda: self.nonempty_buckets(shard, bucket, bucket),
            self._worst_row,
            self._row_estimate,
        )

        async def fetch(cursor: tuple[str, int] | None, limit: int) -> list[tuple[str, int, int | None, bytes]]:
            now = self.clock.now_ms()
            if cursor is None:
                return await self._run(what, _fetch(first, (shard, bucket, now, limit)))
            return await self._run(what, _fetch(after, (shard, bucket, now, cursor[0], cursor[1], limit)))

        async for page in partition_pages(fetch, sizer):
            yield page
        self._row_estimate = sizer.estimate

    async def inject_rows(self, shard: int, bucket: int, rows: Sequence[tuple[str, int, int | None, bytes]]) -> None:
        exp = self.clock.now_ms() + self.settings.ttl_ms
        sql = (
            f"INSERT OR REPLACE INTO {self.t('events')} (shard, bucket, event_id, chunk, chunks, payload, expires_ms) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        await self._run(
            "inject rows", lambda c: c.executemany(sql, [(shard, bucket, *r, exp) for r in rows]), write=True
        )

    async def nonempty_buckets(self, shard: int, first: int, last: int) -> list[BucketHint]:
        return (await self.scan_index([shard], first, last)).get(shard, [])

    async def scan_index(self, shards: Sequence[int], first: int, last: int) -> dict[int, list[BucketHint]]:
        if last < first or not shards:
            return {}
        bms = self.settings.bucket_ms
        q = (
            f"SELECT bucket, shard, size_class FROM {self.t('bucket_index')} WHERE shard_group BETWEEN ? AND ? "
            f"AND slot BETWEEN ? AND ? AND bucket BETWEEN ? AND ? AND shard BETWEEN ? AND ? AND expires_ms > ?"
        )
        args = (
            index_group(min(shards)),
            index_group(max(shards)),
            index_slot(first, bms),
            index_slot(last, bms),
            first,
            last,
            min(shards),
            max(shards),
            self.clock.now_ms(),
        )
        return hints(await self._run("read bucket_index", _fetch(q, args)), shards, first, last)

    # -- offsets -------------------------------------------------------------------------------------------
    def _get_offset(self, c: sqlite3.Connection, consumer: str, shard: int) -> Offset | None:
        r = c.execute(
            f"SELECT read_bucket, replay_bucket, owner, epoch, updated_ms, lease_expires_ms "
            f"FROM {self.t('read_offsets')} WHERE consumer = ? AND shard = ?",
            (consumer, shard),
        ).fetchone()
        return None if r is None else Offset(consumer, shard, r[0], r[1], r[2], r[3], r[4], r[5])

    def _take(
        self,
        c: sqlite3.Connection,
        consumer: str,
        shard: int,
        owner: str,
        initial_bucket: int,
        lease_until_ms: int | None,
        free_at_ms: int | None,
    ) -> Offset | None:
        cur = self._get_offset(c, consumer, shard)
        now = self.clock.now_ms()
        if cur is None:
            c.execute(
                f"INSERT INTO {self.t('read_offsets')} (consumer, shard, read_bucket, replay_bucket, owner, "
                f"epoch, updated_ms, lease_expires_ms) VALUES (?, ?, ?, ?, ?, 1, ?, ?)",
                (consumer, shard, initial_bucket, initial_bucket + 1, owner, now, lease_until_ms),
            )
        elif free_at_ms is not None and not lease_ended(cur, free_at_ms):
            return None
        else:
            c.execute(
                f"UPDATE {self.t('read_offsets')} SET owner = ?, epoch = epoch + 1, updated_ms = ?, "
                f"lease_expires_ms = coalesce(?, lease_expires_ms) WHERE consumer = ? AND shard = ?",
                (owner, now, lease_until_ms, consumer, shard),
            )
        return self._get_offset(c, consumer, shard)

    async def claim(
        self, consumer: str, shard: int, owner: str, initial_bucket: int, *, lease_until_ms: int | None = None
    ) -> Offset:
        def do(c: sqlite3.Connection) -> Offset:
            got = self._take(c, consumer, shard, owner, initial_bucket, lease_until_ms, None)
            assert got is not None
            return got

        return await self._run(f"claim shard {shard}", do, write=True)

    async def claim_many(
        self,
        consumer: str,
        shards: Sequence[int],
        owner: str,
        initial_bucket: int,
        *,
        lease_until_ms: int | None = None,
        free_at_ms: int | None = None,
    ) -> list[Offset]:
        def do(c: sqlite3.Connection) -> list[Offset]:
            got = [self._take(c, consumer, sh, owner, initial_bucket, lease_until_ms, free_at_ms) for sh in shards]
            return sorted((o for o in got if o is not None), key=lambda o: o.shard)

        return await self._run("claim shards", do, write=True)

    async def renew_leases(
        self, consumer: str, owner: str, leases: Sequence[tuple[int, int]], until_ms: int
    ) -> list[int]:
        sql = (
            f"UPDATE {self.t('read_offsets')} SET lease_expires_ms = ? "
            f"WHERE consumer = ? AND shard = ? AND owner = ? AND epoch = ? AND lease_expires_ms > 0"
        )

        def do(c: sqlite3.Connection) -> list[int]:
            return sorted(s for s, e in leases if c.execute(sql, (until_ms, consumer, s, owner, e)).rowcount != 1)

        return await self._run("renew leases", do, write=True)

    async def release_leases(self, consumer: str, owner: str, leases: Sequence[tuple[int, int]]) -> None:
        sql = (
            f"UPDATE {self.t('read_offsets')} SET lease_expires_ms = 0 "
            f"WHERE consumer = ? AND shard = ? AND owner = ? AND epoch = ?"
        )

        def do(c: sqlite3.Connection) -> None:
            for s, e in leases:
                c.execute(sql, (consumer, s, owner, e))

        await self._run("release leases", do, write=True)

    # -- group members -------------------------------------------------------------------------------------
    async def heartbeat(self, consumer: str, member: Member, ttl_ms: int) -> None:
        m = member
        row = (consumer, m.member, m.host, m.pid, m.workers, m.started_ms, m.heartbeat_ms, self.clock.now_ms() + ttl_ms)
        sql = (
            f"INSERT OR REPLACE INTO {self.t('group_members')} (consumer, member, host, pid, workers, started_ms, "
            f"heartbeat_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        await self._run("heartbeat", lambda c: c.execute(sql, row), write=True)

    async def leave(self, consumer: str, member: str) -> None:
        sql = f"DELETE FROM {self.t('group_members')} WHERE consumer = ? AND member = ?"
        await self._run("leave group", lambda c: c.execute(sql, (consumer, member)), write=True)

    async def read_members(self, consumer: str) -> list[Member]:
        sql = (
            f"SELECT member, host, pid, workers, started_ms, heartbeat_ms FROM {self.t('group_members')} "
            f"WHERE consumer = ? AND expires_ms > ? ORDER BY member"
        )
        rows = await self._run("read members", lambda c: c.execute(sql, (consumer, self.clock.now_ms())).fetchall())
        return [Member(*r) for r in rows]

    async def commit(
        self, consumer: str, shard: int, owner: str, epoch: int, read_bucket: int, replay_bucket: int
    ) -> None:
        if await self.commit_many(consumer, owner, [Commit(shard, epoch, read_bucket, replay_bucket)]):
            cur = await self._run("read offset", lambda c: self._get_offset(c, consumer, shard))
            raise_fenced(shard, owner, epoch, read_bucket, cur)

    async def commit_many(self, consumer: str, owner: str, commits: Sequence[Commit]) -> list[int]:
        sql = (
            f"UPDATE {self.t('read_offsets')} SET read_bucket = ?, replay_bucket = ?, updated_ms = ? "
            f"WHERE consumer = ? AND shard = ? AND epoch = ? AND read_bucket <= ?"
        )

        def do(c: sqlite3.Connection) -> list[int]:
            now = self.clock.now_ms()
            refused = []
            for m in commits:
                n = c.execute(sql, (m.read_bucket, m.replay_bucket, now, consumer, m.shard, m.epoch, m.read_bucket))
                if n.rowcount != 1:
                    refused.append(m.shard)
            return sorted(refused)

        return await self._run("commit offsets", do, write=True)

    async def read_offsets(self, consumer: str, shards: Sequence[int]) -> list[Offset]:
        def do(c: sqlite3.Connection) -> list[Offset]:
            out = []
            for s in shards:
                o = self._get_offset(c, consumer, s)
                if o is not None:
                    out.append(o)
            return out

        return await self._run("read offsets", do)

    # -- stories -------------------------------------------------------------------------------------------
    async def put_stories(self, stories: Sequence[StoryRecord]) -> None:
        if not stories:
            return
        sql = (
            f"INSERT OR REPLACE INTO {self.t('stories')} (shard, period, story_id, revision, final, merged_into, "
            f"emitted_ms, body, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )

        index = (
            f"INSERT INTO {self.t('story_periods')} (period, shard, expires_ms) VALUES (?, ?, ?) "
            f"ON CONFLICT (period, shard) DO UPDATE SET expires_ms = max(expires_ms, excluded.expires_ms)"
        )

        def do(c: sqlite3.Connection) -> None:
            exp = self.clock.now_ms() + self.settings.ttl_ms
            c.executemany(index, [(p, s, exp) for p, s in sorted({(r.period, r.shard) for r in stories})])
            c.executemany(
                sql,
                [
                    (s.shard, s.period, s.story_id, s.revision, int(s.final), s.merged_into, s.emitted_ms, s.body, exp)
                    for s in stories
                ],
            )

        await self._run("write stories", do, write=True)

    async def story_periods(self, first: int, last: int) -> list[StoryPeriod]:
        q = (
            f"SELECT period, shard, sealed FROM {self.t('story_periods')} WHERE period BETWEEN ? AND ? "
            f"AND expires_ms > ? ORDER BY period, shard"
        )
        rows = await self._run("read story periods", _fetch(q, (first, last, self.clock.now_ms())))
        return [StoryPeriod(p, s, bool(sealed)) for p, s, sealed in rows]

    async def seal_periods(self, periods: Sequence[tuple[int, int]]) -> None:
        if not periods:
            return
        sql = (
            f"INSERT INTO {self.t('story_periods')} (period, shard, sealed, expires_ms) VALUES (?, ?, 1, ?) "
            f"ON CONFLICT (period, shard) DO UPDATE SET sealed = 1"
        )

        def do(c: sqlite3.Connection) -> None:
            exp = self.clock.now_ms() + self.settings.ttl_ms
            c.executemany(sql, [(p, s, exp) for p, s in periods])

        await self._run("seal story periods", do, write=True)

    async def read_feed_position(self, reader: str) -> FeedPosition | None:
        q = f"SELECT period, shard, story_id, revision, updated_ms FROM {self.t('feed_readers')} WHERE reader = ?"
        rows = await self._run("read feed position", _fetch(q, (reader,)))
        return FeedPosition(reader, *rows[0]) if rows else None

    async def commit_feed_position(self, position: FeedPosition) -> None:
        sql = (
            f"INSERT OR REPLACE INTO {self.t('feed_readers')} (reader, period, shard, story_id, revision, updated_ms) "
            f"VALUES (?, ?, ?, ?, ?, ?)"
        )
        p = position
        args = (p.reader, p.period, p.shard, p.story_id, p.revision, p.updated_ms or self.clock.now_ms())
        await self._run("commit feed position", lambda c: c.execute(sql, args), write=True)

    async def read_stories(self, shard: int, period: int) -> AsyncIterator[list[StoryRecord]]:
        cols = "story_id, revision, final, merged_into, emitted_ms, body"
        t = self.t("stories")
        limit = self.settings.store.page_rows
        cursor = ("", -1)
        while True:
            q = (
                f"SELECT {cols} FROM {t} WHERE shard = ? AND period = ? AND expires_ms > ? "
                f"AND (story_id, revision) > (?, ?) ORDER BY story_id, revision LIMIT ?"
            )
            args = (shard, period, self.clock.now_ms(), cursor[0], cursor[1], limit)
            rows = await self._run("read stories", _fetch(q, args))
            page = [StoryRecord(shard, period, r[0], r[1], bool(r[2]), r[3], r[4], r[5]) for r in rows]
            if page:
                yield page
            if len(rows) < limit:
                return
            cursor = (page[-1].story_id, page[-1].revision)

    async def get_story(self, story_id: str) -> StoryRecord | None:
        shard = story_id_shard(story_id)
        if shard is None:
            return None
        t = self.t("stories")
        now = self.clock.now_ms()
        first, last = story_lookup_periods(now, self.settings)
        q = (
            f"SELECT shard, period, story_id, revision, final, merged_into, emitted_ms, body FROM {t} "
            f"WHERE story_id = ? AND shard = ? AND period BETWEEN ? AND ? AND expires_ms > ? "
            f"ORDER BY period DESC, emitted_ms DESC, revision DESC LIMIT 1"
        )
        rows = await self._run("read story", _fetch(q, (story_id, shard, first, last, now)))
        if not rows:
            return None
        r = rows[0]
        return StoryRecord(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7])

    async def scan_stories(self) -> AsyncIterator[list[StoryRecord]]:
        t = self.t("stories")
        rows = await self._run(
            "scan stories",
            lambda c: c.execute(
                f"SELECT DISTINCT shard, period FROM {t} WHERE expires_ms > ? ORDER BY shard, period",
                (self.clock.now_ms(),),
            ).fetchall(),
        )
        for shard, period in rows:
            async for page in self.read_stories(shard, period):
                yield page

    # -- stage marks ---------------------------------------------------------------------------------------
    async def put_marks(
        self, consumer: str, shard: int, bucket: int, parts: Sequence[bytes], *, first_part: int = 0
    ) -> None:
        if not parts:
            return
        sql = (
            f"INSERT OR REPLACE INTO {self.t('stage_marks')} (consumer, shard, bucket, part, body, expires_ms) "
            f"VALUES (?, ?, ?, ?, ?, ?)"
        )

        def do(c: sqlite3.Connection) -> None:
            exp = self.clock.now_ms() + self.settings.ttl_ms
            c.executemany(sql, [(consumer, shard, bucket, i, body, exp) for i, body in enumerate(parts, first_part)])

        await self._run("write stage marks", do, write=True)

    async def read_marks(self, consumer: str, shard: int, first: int, last: int) -> list[tuple[int, bytes]]:
        q = (
            f"SELECT bucket, body FROM {self.t('stage_marks')} WHERE consumer = ? AND shard = ? AND bucket >= ? "
            f"AND bucket <= ? AND expires_ms > ? ORDER BY bucket, part"
        )
        rows = await self._run("read stage marks", _fetch(q, (consumer, shard, first, last, self.clock.now_ms())))
        return [(r[0], r[1]) for r in rows]

    # -- learned offsets -----------------------------------------------------------------------------------
    async def put_offset_evidence(self, consumer: str, rows: Sequence[EvidenceRecord]) -> None:
        if not rows:
            return
        sql = (
            f"INSERT OR REPLACE INTO {self.t('offset_evidence')} (consumer, epoch, shard, body, expires_ms) "
            f"VALUES (?, ?, ?, ?, ?)"
        )

        def do(c: sqlite3.Connection) -> None:
            exp = self.clock.now_ms() + self.settings.ttl_ms
            c.executemany(sql, [(consumer, r.epoch, r.shard, r.body, exp) for r in rows])

        await self._run("write offset evidence", do, write=True)

    async def read_offset_evidence(self, consumer: str, epochs: Sequence[int]) -> list[EvidenceRecord]:
        if not epochs:
            return []
        marks = ", ".join("?" * len(epochs))
        q = (
            f"SELECT epoch, shard, body FROM {self.t('offset_evidence')} WHERE consumer = ? AND epoch IN ({marks}) "
            f"AND expires_ms > ?"
        )
        rows = await self._run("read offset evidence", _fetch(q, (consumer, *epochs, self.clock.now_ms())))
        return [EvidenceRecord(r[0], r[1], r[2]) for r in rows]

    async def create_offset_table(self, consumer: str, epoch: int, body: bytes) -> bytes:
        table = self.t("offset_tables")

        def do(c: sqlite3.Connection) -> bytes:
            exp = self.clock.now_ms() + self.settings.ttl_ms
            c.execute(
                f"INSERT OR IGNORE INTO {table} (consumer, epoch, body, expires_ms) VALUES (?, ?, ?, ?)",
                (consumer, epoch, body, exp),
            )
            row = c.execute(f"SELECT body FROM {table} WHERE consumer = ? AND epoch = ?", (consumer, epoch)).fetchone()
            return bytes(row[0])

        return await self._run("write offset table", do, write=True)

    async def read_offset_table(self, consumer: str, epoch: int) -> bytes | None:
        q = f"SELECT body FROM {self.t('offset_tables')} WHERE consumer = ? AND epoch = ? AND expires_ms > ?"
        rows = await self._run("read offset table", _fetch(q, (consumer, epoch, self.clock.now_ms())))
        return bytes(rows[0][0]) if rows else None

    async def latest_offset_table(self, consumer: str, before: int) -> tuple[int, bytes] | None:
        low = (((before - 1) // OFFSET_TABLE_SLOT) - 1) * OFFSET_TABLE_SLOT  # the two slots the CQL store reads
        q = (
            f"SELECT epoch, body FROM {self.t('offset_tables')} WHERE consumer = ? AND epoch < ? AND epoch >= ? "
            f"AND expires_ms > ? ORDER BY epoch DESC LIMIT 1"
        )
        rows = await self._run("read offset table", _fetch(q, (consumer, before, low, self.clock.now_ms())))
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    # -- dead letters --------------------------------------------------------------------------------------
    async def put_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        sql = (
            f"INSERT INTO {self.t('dead_letter')} (dl_id, received_ms, file, line, reason, raw, redriven_ms, "
            f"raw_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dl_id) DO UPDATE SET "
            f"received_ms = excluded.received_ms, file = excluded.file, line = excluded.line, "
            f"reason = excluded.reason, raw = excluded.raw, raw_bytes = excluded.raw_bytes, "
            f"redriven_ms = COALESCE(excluded.redriven_ms, redriven_ms)"
        )
        await self._run(
            "write dead letters",
            lambda c: c.executemany(
                sql,
                [
                    (d.dl_id, d.received_ms, d.file, d.line, d.reason, d.raw, d.redriven_ms, d.raw_bytes)
                    for d in letters
                ],
            ),
            write=True,
        )

    async def scan_dead_letters(self) -> AsyncIterator[list[DeadLetter]]:
        limit = 500
        last = ""
        while True:
            q = (
                f"SELECT dl_id, received_ms, file, line, reason, raw, redriven_ms, raw_bytes "
                f"FROM {self.t('dead_letter')} "
                f"WHERE dl_id > ? ORDER BY dl_id LIMIT ?"
            )
            rows = await self._run("scan dead letters", _fetch(q, (last, limit)))
            page = [DeadLetter(*r) for r in rows]
            if page:
                yield page
            if len(rows) < limit:
                return
            last = page[-1].dl_id

    # -- TTL -----------------------------------------------------------------------------------------------
    async def _maybe_purge(self) -> None:
        if self.clock.now_ms() - self._last_purge >= PURGE_EVERY_MS:
            await self.purge_expired()

    async def purge_expired(self) -> int:
        now = self.clock.now_ms()
        self._last_purge = now

        cfg = self.settings
        # A row's expires_ms is its write time + ttl_ms, and a write comes after its bucket starts, so expired
        # rows lie in buckets starting at or before now - ttl_ms: a primary-key range per shard.
        last_bucket = (now - cfg.ttl_ms) // cfg.bucket_ms
        last_slot = index_slot(last_bucket, cfg.bucket_ms)

        def do(c: sqlite3.Connection) -> int:
            n = 0
            for shard in range(cfg.shards):
                n += c.execute(
                    f"DELETE FROM {self.t('events')} WHERE shard = ? AND bucket <= ? AND expires_ms <= ?",
                    (shard, last_bucket, now),
                ).rowcount
            for group in range(index_group(cfg.shards - 1) + 1):
                n += c.execute(
                    f"DELETE FROM {self.t('bucket_index')} WHERE shard_group = ? AND slot <= ? AND expires_ms <= ?",
                    (group, last_slot, now),
                ).rowcount
            n += c.execute(f"DELETE FROM {self.t('stories')} WHERE expires_ms <= ?", (now,)).rowcount
            n += c.execute(f"DELETE FROM {self.t('story_periods')} WHERE expires_ms <= ?", (now,)).rowcount
            n += c.execute(f"DELETE FROM {self.t('stage_marks')} WHERE expires_ms <= ?", (now,)).rowcount
            n += c.execute(f"DELETE FROM {self.t('offset_evidence')} WHERE expires_ms <= ?", (now,)).rowcount
            n += c.execute(f"DELETE FROM {self.t('offset_tables')} WHERE expires_ms <= ?", (now,)).rowcount
            return n

        return await self._run("purge expired rows", do, write=True)


def database_path(cfg: StoreSettings) -> str:
    """The SQLite file of a config, for messages."""
    path = cfg.store.path
    return path if _in_memory(path) or _is_uri(path) else os.path.abspath(path)


def _is_uri(path: str) -> bool:
    """``store.path`` as an SQLite URI (``file:...``), e.g. a named in-memory database shared by the
    connections of one process: ``file:NAME?mode=memory&cache=shared`` (engine.testing.memory)."""
    return path.startswith("file:")


def _in_memory(path: str) -> bool:
    return path == ":memory:" or (_is_uri(path) and ("mode=memory" in path or path.startswith("file::memory:")))
