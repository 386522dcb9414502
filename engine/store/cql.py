"""The CQL store: ScyllaDB (or Apache Cassandra) through scyllapy, the Rust driver.

Every statement is prepared, carries the configured consistency, and is idempotent; transient failures are
retried with bounded backoff. Times are bigint milliseconds, never CQL timestamps (which the driver would hand
back as naive datetimes). All CQL here is valid on ScyllaDB and Cassandra alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import scyllapy
from scyllapy import Batch, BatchType, ExecutionProfile, PreparedQuery, Query, Scylla, SSLVerifyMode
from scyllapy.exceptions import (
    ScyllaPyBaseError,
    ScyllaPyBindingError,
    ScyllaPyMappingError,
    ScyllaPyQueryBuiderError,
)
from scyllapy.extra_types import BigInt, Unset

from engine.core.clock import SYSTEM_CLOCK, Clock
from engine.core.errors import ConfigError, SchemaError, StoreError, TransientStoreError, WriteTooLateError, mask
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
from engine.store.classify import match_message
from engine.store.layout import (
    OFFSET_TABLE_SLOT,
    SCHEMA_VERSION,
    check_fixed,
    index_group,
    index_slot,
    initial_meta,
    story_lookup_periods,
    twcs_options,
)
from engine.store.paging import PageSizer, partition_pages
from engine.store.protocol import lease_ended, raise_fenced
from engine.store.retry import RetryStats, retrying, run_all
from engine.store.settings import StoreSettings

T = TypeVar("T")

_CONSISTENCY = {
    name: getattr(scyllapy.Consistency, name)
    for name in ("ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE")
}
_SERIAL = {"SERIAL": scyllapy.SerialConsistency.SERIAL, "LOCAL_SERIAL": scyllapy.SerialConsistency.LOCAL_SERIAL}
_SERIAL_READ = {"SERIAL": scyllapy.Consistency.SERIAL, "LOCAL_SERIAL": scyllapy.Consistency.LOCAL_SERIAL}
_MIN_TOKEN = -(2**63)


def _opt(value: Any) -> Any:
    """None as an unset bind value: binding NULL in an INSERT would write a tombstone."""
    return Unset() if value is None else value


def _blob(value: bytes) -> str | bytes:
    """A blob bind value the driver converts cheaply. scyllapy 1.3 copies ``bytes`` into Rust one element at a
    time (~14 ns per byte: 9 µs for a 600-byte story body), a ``str`` as one UTF-8 copy (~2 µs). Blob and text
    values have the same wire form (length, then the bytes) and this driver does not check a value's type
    against the column, so valid UTF-8 (every JSON story body) is sent as its ``str``: the stored bytes are
    the same (conformance tests read them back). Anything else goes as ``bytes``."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


# Values or statements the driver cannot handle: the same call fails the same way (engine/store/classify.py).
_NEVER_RETRIED = (ScyllaPyBindingError, ScyllaPyMappingError, ScyllaPyQueryBuiderError)
_SERVER_DETAIL = re.compile(r"Error message: (.*)$", re.DOTALL)


def classify(exc: BaseException, what: str, secrets: Sequence[str] = (), hint: str = "") -> StoreError:
    """Map a driver exception to our hierarchy.

    Authentication and permission failures are never retriable: doing the same again cannot succeed, and a
    retry loop against a node that refuses a password looks like a brute-force attempt. The driver's messages
    name the user but not the password; every secret in ``secrets`` is masked all the same. ``hint`` is added to
    the other messages (e.g. what to check when a TLS connection fails).
    """
    text = mask(str(exc), secrets)
    suffix = f" {hint}" if hint else ""
    if isinstance(exc, _NEVER_RETRIED):
        return StoreError(f"{what}: {text}{suffix}")
    detail = _SERVER_DETAIL.search(text)
    server_says = detail.group(1).strip() if detail else text
    outcome = match_message("cql", text)
    if outcome == "auth_required":
        return StoreError(
            f"{what}: authentication failed: the node requires a username and password "
            f"(set store.username and store.password)"
        )
    if outcome == "auth_refused":
        return StoreError(
            f"{what}: authentication failed: the node refused the credentials ({server_says}); "
            f"check store.username and store.password"
        )
    if outcome == "permission":
        return StoreError(f"{what}: permission denied: {server_says}")
    if outcome == "transient":
        return TransientStoreError(f"{what}: {text}{suffix}")
    return StoreError(f"{what}: {text}{suffix}")


def _read_ca(path: str) -> str:
    """The PEM text of ``store.tls_ca_file``; a ConfigError naming the key when it is unreadable or not PEM."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            pem = f.read()
    except OSError as exc:
        raise ConfigError("store.tls_ca_file", f"cannot read {path}: {exc.strerror or exc}") from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError("store.tls_ca_file", f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return pem


def _table_ddl(cfg: StoreSettings) -> dict[str, str]:
    ks = cfg.keyspace
    unit, size = twcs_options(cfg)
    ttl_s = cfg.ttl_ms // 1000
    twcs = (
        f"compaction = {{'class': 'TimeWindowCompactionStrategy', 'compaction_window_unit': '{unit}', "
        f"'compaction_window_size': {size}}} AND default_time_to_live = {ttl_s}"
    )
    return {
        "meta": f"CREATE TABLE IF NOT EXISTS {ks}.meta (key text PRIMARY KEY, value text)",
        "events": (
            f"CREATE TABLE IF NOT EXISTS {ks}.events (shard int, bucket bigint, event_id text, chunk int, "
            f"chunks int, payload blob, PRIMARY KEY ((shard, bucket), event_id, chunk)) "
            f"WITH CLUSTERING ORDER BY (event_id ASC, chunk ASC) AND {twcs} AND gc_grace_seconds = 10800"
        ),
        "bucket_index": (
            f"CREATE TABLE IF NOT EXISTS {ks}.bucket_index (shard_group int, slot bigint, bucket bigint, shard int, "
            f"size_class int, PRIMARY KEY ((shard_group, slot), bucket, shard, size_class)) "
            f"WITH CLUSTERING ORDER BY (bucket ASC, shard ASC, size_class ASC) AND {twcs} "
            f"AND gc_grace_seconds = 10800"
        ),
        "read_offsets": (
            f"CREATE TABLE IF NOT EXISTS {ks}.read_offsets (consumer text, shard_group int, shard int, "
            f"read_bucket bigint, replay_bucket bigint, owner text, epoch bigint, updated_ms bigint, "
            f"lease_expires_ms bigint, PRIMARY KEY ((consumer, shard_group), shard))"
        ),
        # Groups: one row per running member, written with a TTL at every heartbeat (a member that dies leaves).
        "group_members": (
            f"CREATE TABLE IF NOT EXISTS {ks}.group_members (consumer text, member text, host text, pid int, "
            f"workers int, started_ms bigint, heartbeat_ms bigint, PRIMARY KEY (consumer, member))"
        ),
        "stories": (
            f"CREATE TABLE IF NOT EXISTS {ks}.stories (shard int, period bigint, story_id text, revision int, "
            f"final boolean, merged_into text, emitted_ms bigint, body blob, "
            f"PRIMARY KEY ((shard, period), story_id, revision)) "
            f"WITH CLUSTERING ORDER BY (story_id ASC, revision ASC) AND {twcs}"
        ),
        # The lookup by story id: where each revision of a story is (its stories partition). The id names the
        # shard, so the pointers of one emission share a partition per (shard, 15-minute slot of the period)
        # and are one single-partition batch; a lookup reads the slots newest first (see get_story).
        # (Schema 2 had story_ids, one partition per story: a tiny partition write per revision, ~30 % of the
        # node's CPU in a story run; left in place on upgrade and still read by get_story until it expires.)
        "story_index": (
            f"CREATE TABLE IF NOT EXISTS {ks}.story_index (shard int, slot bigint, story_id text, revision int, "
            f"period bigint, emitted_ms bigint, PRIMARY KEY ((shard, slot), story_id, revision)) "
            f"WITH CLUSTERING ORDER BY (story_id ASC, revision ASC) AND {twcs}"
        ),
        # Which stories partitions hold rows, per 15-minute slot of the period (the story feed reads one partition
        # per slot instead of probing every shard's partition of every period); ``sealed``: a drain finished
        # writing there after the checkpoint (see Store.seal_periods).
        "story_periods": (
            f"CREATE TABLE IF NOT EXISTS {ks}.story_periods (slot bigint, period bigint, shard int, sealed boolean, "
            f"PRIMARY KEY ((slot), period, shard)) WITH CLUSTERING ORDER BY (period ASC, shard ASC) AND {twcs}"
        ),
        # Story feed readers' committed positions: kept until deleted (no TTL; a few rows).
        "feed_readers": (
            f"CREATE TABLE IF NOT EXISTS {ks}.feed_readers (reader text PRIMARY KEY, period bigint, shard int, "
            f"story_id text, revision int, updated_ms bigint)"
        ),
        # What a stage needs to replay correctly (see Store.put_marks); 15-minute slots like bucket_index.
        "stage_marks": (
            f"CREATE TABLE IF NOT EXISTS {ks}.stage_marks (consumer text, shard int, slot bigint, bucket bigint, "
            f"part int, body blob, PRIMARY KEY ((consumer, shard, slot), bucket, part)) "
            f"WITH CLUSTERING ORDER BY (bucket ASC, part ASC) AND {twcs}"
        ),
        # Learned sensor clock offsets: each shard's evidence per epoch (a row replaced as the epoch's evidence
        # grows), and the table every worker applies during an epoch (written once: IF NOT EXISTS), newest first
        # in partitions of OFFSET_TABLE_SLOT epochs.
        "offset_evidence": (
            f"CREATE TABLE IF NOT EXISTS {ks}.offset_evidence (consumer text, epoch bigint, shard int, body blob, "
            f"PRIMARY KEY ((consumer, epoch), shard)) WITH CLUSTERING ORDER BY (shard ASC) AND {twcs}"
        ),
        "offset_tables": (
            f"CREATE TABLE IF NOT EXISTS {ks}.offset_tables (consumer text, slot bigint, epoch bigint, body blob, "
            f"PRIMARY KEY ((consumer, slot), epoch)) WITH CLUSTERING ORDER BY (epoch DESC) AND {twcs}"
        ),
        "dead_letter": (
            f"CREATE TABLE IF NOT EXISTS {ks}.dead_letter (dl_id text PRIMARY KEY, received_ms bigint, "
            f"file text, line bigint, reason text, raw blob, redriven_ms bigint, raw_bytes bigint)"
        ),
    }


_TTL_TABLES = (
    "events",
    "bucket_index",
    "stories",
    "story_index",
    "story_periods",
    "stage_marks",
    "offset_evidence",
    "offset_tables",
)
_POINTERS_PER_BATCH = 500  # story_index rows per batch (about 60 bytes each: ~30 KB)
_LOOKUP_SLOTS_AT_ONCE = 16  # story_index slots a lookup reads concurrently, newest first


class CqlStore:
    """:class:`engine.store.protocol.Store` on ScyllaDB / Cassandra."""

    def __init__(self, settings: StoreSettings, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = cfg = settings.for_backend("cql", "CqlStore")
        self.clock = clock
        self.ks = cfg.keyspace
        self.stats = RetryStats()
        self._db: Scylla | None = None
        self._sem = asyncio.Semaphore(cfg.store.max_in_flight)
        self._prepared: dict[str, PreparedQuery] = {}
        self._legacy_ids: bool | None = None  # a schema 2 story_ids table exists (read once, on a lookup miss)
        self._worst_row = 1 << size_class(cfg.chunk_bytes + 1024 + ROW_OVERHEAD)
        self._row_estimate = float(self._worst_row)
        self._consistency = _CONSISTENCY[cfg.store.consistency]
        self._serial = _SERIAL[cfg.store.serial_consistency]
        self._serial_read = _SERIAL_READ[cfg.store.serial_consistency]
        self._timeout_s = max(1, cfg.request_timeout_ms // 1000)
        self._secrets = tuple(p for p in (cfg.store.password,) if p)

    # -- plumbing ------------------------------------------------------------------------------------------
    @property
    def db(self) -> Scylla:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]], deadline_ms: int | None = None) -> T:
        return await retrying(
            op, settings=self.settings.store, what=what, stats=self.stats, clock=self.clock, deadline_ms=deadline_ms
        )

    async def _write_rows(
        self, what: str, prepared: PreparedQuery, params: list[list[Any]], deadline_ms: int | None = None
    ) -> None:
        """One statement per row: a plain execute for one row, else one UNLOGGED batch; retried (idempotent).
        Batch values are not type-checked against the statement by the driver: callers pass BigInt for bigint."""

        async def once() -> None:
            if len(params) == 1:
                await self._call(what, lambda: self.db.execute(prepared, params[0]), deadline_ms)
                return
            batch = Batch(
                BatchType.UNLOGGED, consistency=self._consistency, request_timeout=self._timeout_s, is_idempotent=True
            )
            for _ in params:
                batch.add_query(prepared)
            await self._call(what, lambda: self.db.batch(batch, params), deadline_ms)

        await self._retry(what, once, deadline_ms)

    def _conditional_batch(self) -> Batch:
        """An UNLOGGED batch of conditional updates of one partition (one Paxos round for all of them)."""
        return Batch(
            BatchType.UNLOGGED,
            consistency=self._consistency,
            serial_consistency=self._serial,
            request_timeout=self._timeout_s,
            is_idempotent=True,
        )

    async def _call(self, what: str, coro_fn: Callable[[], Awaitable[T]], deadline_ms: int | None = None) -> T:
        async with self._sem:
            # Checked once the slot is ours: waiting for a slot must not let a write start after its deadline.
            if deadline_ms is not None and self.clock.now_ms() > deadline_ms:
                raise WriteTooLateError(f"{what}: deadline passed while waiting for a request slot")
            try:
                return await coro_fn()
            except ScyllaPyBaseError as exc:
                raise classify(exc, what, self._secrets) from None

    async def _prep(self, key: str, cql: str, *, serial_read: bool = False) -> PreparedQuery:
        p = self._prepared.get(key)
        if p is None:
            q = Query(
                cql,
                consistency=self._serial_read if serial_read else self._consistency,
                serial_consistency=self._serial,
                request_timeout=self._timeout_s,
                is_idempotent=True,
            )
            p = await self._retry(f"prepare {key}", lambda: self._call(f"prepare {key}", lambda: self.db.prepare(q)))
            self._prepared[key] = p
        return p

    async def _exec(
        self,
        what: str,
        key: str,
        cql: str,
        params: Sequence[Any],
        *,
        deadline_ms: int | None = None,
        serial_read: bool = False,
    ) -> list[dict[str, Any]]:
        prepared = await self._prep(key, cql, serial_read=serial_read)

        async def once() -> list[dict[str, Any]]:
            res = await self._call(what, lambda: self.db.execute(prepared, list(params)), deadline_ms)
            try:
                return res.all()
            except ScyllaPyMappingError:  # a statement that returns no rows
                return []

        return await self._retry(what, once, deadline_ms)

    async def _ddl(self, cql: str) -> None:
        await self._retry(
            "schema change",
            lambda: self._call(
                "schema change",
                lambda: self.db.execute(
                    Query(cql, consistency=self._consistency, request_timeout=max(self._timeout_s, 30))
                ),
            ),
        )

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def open(self) -> None:
        s = self.settings.store
        kwargs: dict[str, Any] = {
            "username": s.username,
            "password": s.password,
            "connection_timeout": self._timeout_s,
            "default_execution_profile": ExecutionProfile(
                consistency=self._consistency, serial_consistency=self._serial, request_timeout=self._timeout_s
            ),
        }
        hint = ""
        if s.tls_ca_file:
            # scyllapy (1.3) builds a TLS context only when ssl_cert is given: ssl_ca_file and ssl_verify_mode
            # alone are ignored and the connection silently stays plaintext. The CA's certificate fills that
            # slot; without a private key OpenSSL never presents it, so the client sends no certificate, and
            # the node's certificate chain is verified against the CA file (PEER).
            kwargs["ssl_cert"] = _read_ca(s.tls_ca_file)
            kwargs["ssl_ca_file"] = s.tls_ca_file
            kwargs["ssl_verify_mode"] = SSLVerifyMode.PEER
            hint = (
                f"(TLS is on: check that the node serves TLS on this port and that its certificate is signed "
                f"by a CA in store.tls_ca_file = {s.tls_ca_file})"
            )
        db = Scylla(list(s.contact_points), **kwargs)
        where = f"connect to {', '.join(s.contact_points)}"

        async def start() -> None:
            try:
                await db.startup()
            except ScyllaPyBaseError as exc:
                raise classify(exc, where, self._secrets, hint) from None

        await self._retry("connect", start)
        self._db = db
        meta = await self._meta_if_present()
        if meta is not None:
            check_fixed(self.settings, meta)

    async def close(self) -> None:
        db, self._db = self._db, None
        self._prepared.clear()
        if db is not None:
            with contextlib.suppress(ScyllaPyBaseError):
                await db.shutdown()

    async def __aenter__(self) -> CqlStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def server_time_ms(self) -> int:
        rows = await self._exec("read server time", "now", "SELECT toUnixTimestamp(now()) AS t FROM system.local", [])
        value = rows[0]["t"]
        # toUnixTimestamp returns a bigint of milliseconds.
        return int(value)

    # -- schema --------------------------------------------------------------------------------------------
    async def _keyspace_exists(self) -> bool:
        rows = await self._exec(
            "read schema",
            "ks_exists",
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?",
            [self.ks],
        )
        return bool(rows)

    async def _tables(self) -> dict[str, dict[str, Any]]:
        rows = await self._exec(
            "read schema",
            "tables",
            "SELECT table_name, default_time_to_live, compaction FROM system_schema.tables WHERE keyspace_name = ?",
            [self.ks],
        )
        return {r["table_name"]: r for r in rows}

    async def _meta_if_present(self) -> dict[str, str] | None:
        if not await self._keyspace_exists() or "meta" not in await self._tables():
            return None
        return await self.read_meta()

    async def drop_schema(self) -> None:
        await self._ddl(f"DROP KEYSPACE IF EXISTS {self.ks}")
        self._prepared.clear()

    async def read_meta(self) -> dict[str, str]:
        rows = await self._exec("read meta", "meta_all", f"SELECT key, value FROM {self.ks}.meta LIMIT 1000", [])
        return {r["key"]: r["value"] for r in rows}

    async def init_schema(self) -> list[str]:
        cfg, ks, did = self.settings, self.ks, []
        repl = cfg.store.replication.cql()
        if await self._keyspace_exists():
            did.append(f"keyspace {ks} exists")
            rows = await self._exec(
                "read schema",
                "ks_repl",
                "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
                [ks],
            )
            have = {k: v.rsplit(".", 1)[-1] for k, v in (rows[0]["replication"] or {}).items()}
            want = _replication_map(cfg)
            if have != want:
                did.append(
                    f"WARNING: keyspace {ks} replication is {have}, config says {want}; not changed "
                    f"(ALTER KEYSPACE by hand, then run a repair)"
                )
        else:
            await self._ddl(f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {repl} AND durable_writes = true")
            did.append(f"created keyspace {ks} with replication {repl}")
        existing = await self._tables()
        unit, size = twcs_options(cfg)
        for table, ddl in _table_ddl(cfg).items():
            if table not in existing:
                await self._ddl(ddl)
                did.append(f"created table {ks}.{table}")
                continue
            if table in _TTL_TABLES:
                row = existing[table]
                comp = {k: str(v) for k, v in (row["compaction"] or {}).items()}
                ttl_ok = int(row["default_time_to_live"] or 0) == cfg.ttl_ms // 1000
                comp_ok = (
                    comp.get("class", "").endswith("TimeWindowCompactionStrategy")
                    and comp.get("compaction_window_unit") == unit
                    and comp.get("compaction_window_size") == str(size)
                )
                if not (ttl_ok and comp_ok):
                    await self._ddl(
                        f"ALTER TABLE {ks}.{table} WITH compaction = {{'class': 'TimeWindowCompactionStrategy', "
                        f"'compaction_window_unit': '{unit}', 'compaction_window_size': {size}}} "
                        f"AND default_time_to_live = {cfg.ttl_ms // 1000}"
                    )
                    did.append(
                        f"altered table {ks}.{table}: default_time_to_live {cfg.ttl_ms // 1000} s, "
                        f"TWCS window {size} {unit} (new writes; existing rows keep their TTL)"
                    )
                    continue
            did.append(f"table {ks}.{table} is current")
        self._prepared.clear()
        did.extend(await self._write_meta())
        return did

    async def _write_meta(self) -> list[str]:
        cfg = self.settings
        meta = await self.read_meta()
        did: list[str] = []
        if meta:
            check_fixed(cfg, meta)
        wanted = initial_meta(cfg, self.clock.now_ms())
        for key, value in wanted.items():
            if key in meta:
                continue
            rows = await self._exec(
                "write meta",
                "meta_insert",
                f"INSERT INTO {self.ks}.meta (key, value) VALUES (?, ?) IF NOT EXISTS",
                [key, value],
            )
            if rows and rows[0].get("[applied]"):
                did.append(f"recorded {key} = {value}")
        old = int(meta.get("schema_version", "0"))
        if old > SCHEMA_VERSION:
            raise SchemaError(
                f"keyspace {self.ks} has schema version {old}, newer than this Storyline ({SCHEMA_VERSION})"
            )
        if 0 < old < 4:
            did.append(await self._backfill_story_periods())
        if 0 < old < 5:
            did.extend(await self._add_dead_letter_raw_bytes())
        if 0 < old < 7:
            did.extend(await self._add_column("read_offsets", "lease_expires_ms", "bigint"))
        if old != SCHEMA_VERSION:
            await self._exec(
                "write meta",
                "meta_upsert",
                f"INSERT INTO {self.ks}.meta (key, value) VALUES (?, ?)",
                ["schema_version", str(SCHEMA_VERSION)],
            )
            did.append(f"schema version {old} -> {SCHEMA_VERSION}")
        else:
            did.append(f"schema version {SCHEMA_VERSION}")
        return did

    async def _add_column(self, table: str, column: str, kind: str) -> list[str]:
        """Upgrading: a new column of an existing table. Idempotent: an init that runs at the same time may have
        added it first (then the ALTER fails and the column is there)."""

        async def has_it() -> bool:
            rows = await self._exec(
                "read schema",
                "columns",
                "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?",
                [self.ks, table],
            )
            return any(r["column_name"] == column for r in rows)

        if await has_it():
            return []
        try:
            await self._ddl(f"ALTER TABLE {self.ks}.{table} ADD {column} {kind}")
        except StoreError:
            if not await has_it():
                raise
        return [f"added column {column} to {self.ks}.{table}"]

    async def _add_dead_letter_raw_bytes(self) -> list[str]:
        """Upgrading to schema 5: dead_letter.raw_bytes. Idempotent: an init that runs at the same time may have
        added it first (then the ALTER fails and the column is there)."""

        async def has_it() -> bool:
            rows = await self._exec(
                "read schema",
                "dl_columns",
                "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?",
                [self.ks, "dead_letter"],
            )
            return any(r["column_name"] == "raw_bytes" for r in rows)

        if await has_it():
            return []
        try:
            await self._ddl(f"ALTER TABLE {self.ks}.dead_letter ADD raw_bytes bigint")
        except StoreError:
            if not await has_it():
                raise
        return [f"added column raw_bytes to {self.ks}.dead_letter"]

    async def _backfill_story_periods(self) -> str:
        """Upgrading to schema 4: the stories partitions written before it, into story_periods (a scan of the
        stories table's partition keys, once), so the story feed finds them."""
        rows = await self._exec(
            "backfill story periods", "periods_backfill", f"SELECT DISTINCT shard, period FROM {self.ks}.stories", []
        )
        pairs = sorted({(r["period"], r["shard"]) for r in rows})
        prepared = await self._prep(
            "story_period_insert", f"INSERT INTO {self.ks}.story_periods (slot, period, shard) VALUES (?, ?, ?)"
        )
        bms = self.settings.bucket_ms
        await run_all(
            self._write_rows("backfill story periods", prepared, [[BigInt(index_slot(p, bms)), BigInt(p), s]])
            for p, s in pairs
        )
        return f"recorded {len(pairs)} existing stories partitions in {self.ks}.story_periods"

    # -- events --------------------------------------------------------------------------------------------
    async def append(
        self, shard: int, bucket: int, events: Sequence[EventRecord], *, deadline_ms: int | None = None
    ) -> AppendResult:
        cfg = self.settings
        check_event_sizes(events, cfg.max_event_bytes)
        if not events:
            return AppendResult(0, 0, 0, 0, 0)
        retries0 = self.stats.retries
        ks = self.ks
        groups = group_rows(events, cfg.chunk_bytes, cfg.store.batch_bytes)
        await self._exec(
            "write bucket_index",
            "index_insert",
            f"INSERT INTO {ks}.bucket_index (shard_group, slot, bucket, shard, size_class) VALUES (?, ?, ?, ?, ?)",
            [index_group(shard), index_slot(bucket, cfg.bucket_ms), bucket, shard, max_size_class(groups)],
            deadline_ms=deadline_ms,
        )
        insert_cql = (
            f"INSERT INTO {ks}.events (shard, bucket, event_id, chunk, chunks, payload) VALUES (?, ?, ?, ?, ?, ?)"
        )
        prepared = await self._prep("event_insert", insert_cql)
        what = f"write events ({shard}, {bucket})"

        async def send(group: list[tuple[str, int, int | None, bytes]]) -> None:
            big_bucket = BigInt(bucket)
            params = [[shard, big_bucket, eid, chunk, _opt(chunks), piece] for eid, chunk, chunks, piece in group]
            await self._write_rows(what, prepared, params, deadline_ms)

        await run_all(send(g) for g in groups)
        rows = sum(len(g) for g in groups)
        nbytes = sum(len(e.payload) for e in events)
        return AppendResult(len(events), rows, nbytes, len(groups), self.stats.retries - retries0)

    async def read_partition(
        self, shard: int, bucket: int, *, max_row_bytes: int | None = None
    ) -> AsyncIterator[PartitionPage]:
        ks = self.ks
        first = f"SELECT event_id, chunk, chunks, payload FROM {ks}.events WHERE shard = ? AND bucket = ? LIMIT ?"
        after = (
            f"SELECT event_id, chunk, chunks, payload FROM {ks}.events WHERE shard = ? AND bucket = ? "
            f"AND (event_id, chunk) > (?, ?) LIMIT ?"
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
            if cursor is None:
                rows = await self._exec(what, "part_first", first, [shard, bucket, limit])
            else:
                rows = await self._exec(what, "part_after", after, [shard, bucket, cursor[0], cursor[1], limit])
            return [(r["event_id"], r["chunk"], r["chunks"], r["payload"]) for r in rows]

        async for page in partition_pages(fetch, sizer):
            yield page
        self._row_estimate = sizer.estimate

    async def inject_rows(self, shard: int, bucket: int, rows: Sequence[tuple[str, int, int | None, bytes]]) -> None:
        cql = (
            f"INSERT INTO {self.ks}.events (shard, bucket, event_id, chunk, chunks, payload) VALUES (?, ?, ?, ?, ?, ?)"
        )
        for eid, chunk, chunks, piece in rows:
            await self._exec("inject rows", "event_insert", cql, [shard, bucket, eid, chunk, _opt(chunks), piece])

    async def nonempty_buckets(self, shard: int, first: int, last: int) -> list[BucketHint]:
        return (await self.scan_index([shard], first, last)).get(shard, [])

    async def scan_index(self, shards: Sequence[int], first: int, last: int) -> dict[int, list[BucketHint]]:
        if last < first or not shards:
            return {}
        cfg = self.settings
        first_q = (
            f"SELECT bucket, shard, size_class FROM {self.ks}.bucket_index WHERE shard_group = ? AND slot = ? "
            f"AND bucket >= ? AND bucket <= ? LIMIT ?"
        )
        next_q = (
            f"SELECT bucket, shard, size_class FROM {self.ks}.bucket_index WHERE shard_group = ? AND slot = ? "
            f"AND (bucket, shard, size_class) > (?, ?, ?) AND bucket <= ? LIMIT ?"
        )
        limit = cfg.store.page_rows
        found: list[tuple[int, int, int]] = []

        async def one(group: int, slot: int) -> None:
            rows = await self._exec("read bucket_index", "index_first", first_q, [group, slot, first, last, limit])
            while True:
                found.extend((r["bucket"], r["shard"], r["size_class"]) for r in rows)
                if len(rows) < limit:
                    return
                c = rows[-1]
                args = [group, slot, c["bucket"], c["shard"], c["size_class"], last, limit]
                rows = await self._exec("read bucket_index", "index_next", next_q, args)

        groups = sorted({index_group(s) for s in shards})
        slots = range(index_slot(first, cfg.bucket_ms), index_slot(last, cfg.bucket_ms) + 1)
        await run_all(one(g, sl) for g in groups for sl in slots)
        return hints(found, shards, first, last)

    # -- offsets -------------------------------------------------------------------------------------------
    async def _read_offset_serial(self, consumer: str, shard: int) -> Offset | None:
        rows = await self._exec(
            "read offset",
            "offset_serial",
            f"SELECT read_bucket, replay_bucket, owner, epoch, updated_ms, lease_expires_ms "
            f"FROM {self.ks}.read_offsets WHERE consumer = ? AND shard_group = ? AND shard = ?",
            [consumer, index_group(shard), shard],
            serial_read=True,
        )
        return _offset(consumer, shard, rows[0]) if rows else None

    async def claim(
        self, consumer: str, shard: int, owner: str, initial_bucket: int, *, lease_until_ms: int | None = None
    ) -> Offset:
        got = await self._claim_one(consumer, shard, owner, initial_bucket, lease_until_ms, None)
        assert got is not None  # without free_at_ms every round takes the shard or retries
        return got

    async def _claim_one(
        self,
        consumer: str,
        shard: int,
        owner: str,
        initial_bucket: int,
        lease_until_ms: int | None,
        free_at_ms: int | None,
    ) -> Offset | None:
        ks = self.ks
        what = f"claim shard {shard}"
        group = index_group(shard)
        for _ in range(32):  # bounded: each round loses only to a concurrent claimer or renewal
            cur = await self._read_offset_serial(consumer, shard)
            now = self.clock.now_ms()
            if cur is None:
                rows = await self._exec(
                    what,
                    "offset_create",
                    f"INSERT INTO {ks}.read_offsets (consumer, shard_group, shard, read_bucket, replay_bucket, owner, "
                    f"epoch, updated_ms, lease_expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
                    [consumer, group, shard, initial_bucket, initial_bucket + 1, owner, 1, now, lease_until_ms],
                )
            elif free_at_ms is not None and not lease_ended(cur, free_at_ms):
                return None
            else:
                lease = cur.lease_expires_ms if lease_until_ms is None else lease_until_ms
                rows = await self._exec(
                    what,
                    "offset_claim",
                    # The positions are part of the condition: the Offset returned must be the one we took
                    # over, even if the previous owner committed between our read and this write; the lease is
                    # too: a lease renewed since the read is not taken over.
                    f"UPDATE {ks}.read_offsets SET owner = ?, epoch = ?, updated_ms = ?, lease_expires_ms = ? "
                    f"WHERE consumer = ? AND shard_group = ? AND shard = ? "
                    f"IF epoch = ? AND read_bucket = ? AND replay_bucket = ? AND lease_expires_ms = ?",
                    [owner, cur.epoch + 1, now, lease, consumer, group, shard, cur.epoch, cur.read_bucket,
                     cur.replay_bucket, cur.lease_expires_ms],
                )  # fmt: skip
            if rows and rows[0].get("[applied]"):
                if cur is None:
                    return Offset(consumer, shard, initial_bucket, initial_bucket + 1, owner, 1, now, lease_until_ms)
                return Offset(consumer, shard, cur.read_bucket, cur.replay_bucket, owner, cur.epoch + 1, now, lease)
            # Not applied: someone else moved it, or our own earlier attempt (retried after a timeout) did.
            got = await self._read_offset_serial(consumer, shard)
            if got is not None and got.owner == owner and (cur is None or got.epoch == cur.epoch + 1):
                return got
        raise StoreError(f"{what}: too much contention from other claimers", retriable=True)

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
        by_group: dict[int, list[int]] = {}
        for sh in shards:
            by_group.setdefault(index_group(sh), []).append(sh)
        out: list[Offset] = []

        async def one(group: int, todo: list[int]) -> None:
            got = await self._claim_group(consumer, group, todo, owner, initial_bucket, lease_until_ms, free_at_ms)
            if got is None:  # lost a race with another claimer: shard by shard (each bounded)
                each = [
                    await self._claim_one(consumer, sh, owner, initial_bucket, lease_until_ms, free_at_ms)
                    for sh in todo
                ]
                got = [o for o in each if o is not None]
            out.extend(got)

        await run_all(one(g, t) for g, t in by_group.items())
        return sorted(out, key=lambda o: o.shard)

    async def _claim_group(
        self,
        consumer: str,
        group: int,
        shards: list[int],
        owner: str,
        initial_bucket: int,
        lease_until_ms: int | None,
        free_at_ms: int | None,
    ) -> list[Offset] | None:
        """One offsets partition's shards in one conditional batch (a single Paxos round instead of one per
        shard contending on the same partition); with ``free_at_ms`` only those whose lease has ended. None when
        the batch was refused."""
        ks = self.ks
        rows = await self._exec(
            "read offsets",
            "offset_group_serial",
            f"SELECT shard, read_bucket, replay_bucket, owner, epoch, updated_ms, lease_expires_ms "
            f"FROM {ks}.read_offsets WHERE consumer = ? AND shard_group = ?",
            [consumer, group],
            serial_read=True,
        )
        cur = {r["shard"]: _offset(consumer, r["shard"], r) for r in rows}
        if free_at_ms is not None:
            shards = [sh for sh in shards if sh not in cur or lease_ended(cur[sh], free_at_ms)]
            if not shards:
                return []
        now = self.clock.now_ms()
        create = await self._prep(
            "offset_create",
            f"INSERT INTO {ks}.read_offsets (consumer, shard_group, shard, read_bucket, replay_bucket, owner, "
            f"epoch, updated_ms, lease_expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
        )
        take = await self._prep(
            "offset_claim",
            f"UPDATE {ks}.read_offsets SET owner = ?, epoch = ?, updated_ms = ?, lease_expires_ms = ? "
            f"WHERE consumer = ? AND shard_group = ? AND shard = ? "
            f"IF epoch = ? AND read_bucket = ? AND replay_bucket = ? AND lease_expires_ms = ?",
        )
        batch = self._conditional_batch()
        params: list[list[Any]] = []
        result: list[Offset] = []
        b = BigInt

        def big(v: int | None) -> BigInt | None:
            return None if v is None else BigInt(v)

        for sh in shards:
            c = cur.get(sh)
            if c is None:
                batch.add_query(create)
                params.append([consumer, group, sh, b(initial_bucket), b(initial_bucket + 1), owner, b(1), b(now),
                               big(lease_until_ms)])  # fmt: skip
                result.append(Offset(consumer, sh, initial_bucket, initial_bucket + 1, owner, 1, now, lease_until_ms))
            else:
                lease = c.lease_expires_ms if lease_until_ms is None else lease_until_ms
                batch.add_query(take)
                params.append([owner, b(c.epoch + 1), b(now), big(lease), consumer, group, sh, b(c.epoch),
                               b(c.read_bucket), b(c.replay_bucket), big(c.lease_expires_ms)])  # fmt: skip
                result.append(Offset(consumer, sh, c.read_bucket, c.replay_bucket, owner, c.epoch + 1, now, lease))
        what = f"claim shard group {group}"
        res = await self._retry(what, lambda: self._call(what, lambda: self.db.batch(batch, params)))
        try:
            applied = res.all()
        except ScyllaPyMappingError:
            applied = [{"[applied]": True}]
        if applied and applied[0].get("[applied]"):
            return result
        return None

    async def renew_leases(
        self, consumer: str, owner: str, leases: Sequence[tuple[int, int]], until_ms: int
    ) -> list[int]:
        cql = (
            f"UPDATE {self.ks}.read_offsets SET lease_expires_ms = ? "
            f"WHERE consumer = ? AND shard_group = ? AND shard = ? IF owner = ? AND epoch = ? AND lease_expires_ms > 0"
        )
        return await self._lease_batches("renew leases", "lease_renew", cql, consumer, owner, leases, until_ms)

    async def release_leases(self, consumer: str, owner: str, leases: Sequence[tuple[int, int]]) -> None:
        cql = (
            f"UPDATE {self.ks}.read_offsets SET lease_expires_ms = ? "
            f"WHERE consumer = ? AND shard_group = ? AND shard = ? IF owner = ? AND epoch = ?"
        )
        await self._lease_batches("release leases", "lease_release", cql, consumer, owner, leases, 0)

    async def _lease_batches(
        self,
        what: str,
        name: str,
        cql: str,
        consumer: str,
        owner: str,
        leases: Sequence[tuple[int, int]],
        until_ms: int,
    ) -> list[int]:
        """One conditional batch per offsets partition setting ``lease_expires_ms`` where owner and epoch still
        match; on refusal the shards another claim took are found and the rest applied again (bounded: each
        round removes at least one). Returns the refused shards."""
        prepared = await self._prep(name, cql)
        by_group: dict[int, list[tuple[int, int]]] = {}
        for shard, epoch in leases:
            by_group.setdefault(index_group(shard), []).append((shard, epoch))
        refused: list[int] = []

        async def batch_of(group: int, todo: list[tuple[int, int]]) -> bool:
            params = [[BigInt(until_ms), consumer, group, sh, owner, BigInt(ep)] for sh, ep in todo]
            return await self._applied_batch(what, prepared, params)

        async def one(group: int, todo: list[tuple[int, int]]) -> None:
            while todo:
                if await batch_of(group, todo):
                    return
                still = []
                for sh, ep in todo:
                    cur = await self._read_offset_serial(consumer, sh)
                    released = until_ms > 0 and not cur_lease(cur)  # a renewal of a released lease
                    if cur is None or cur.owner != owner or cur.epoch != ep or released:
                        refused.append(sh)
                    else:
                        still.append((sh, ep))
                if len(still) == len(todo):
                    raise StoreError(f"{what}: batch refused for shards {[sh for sh, _ in todo]}", retriable=True)
                todo = still

        await run_all(one(g, t) for g, t in by_group.items())
        return sorted(refused)

    # -- group members -------------------------------------------------------------------------------------
    async def heartbeat(self, consumer: str, member: Member, ttl_ms: int) -> None:
        m = member
        await self._exec(
            "heartbeat",
            "member_put",
            f"INSERT INTO {self.ks}.group_members (consumer, member, host, pid, workers, started_ms, heartbeat_ms) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?",
            [consumer, m.member, m.host, m.pid, m.workers, m.started_ms, m.heartbeat_ms, max(1, -(-ttl_ms // 1000))],
        )

    async def leave(self, consumer: str, member: str) -> None:
        await self._exec(
            "leave group",
            "member_delete",
            f"DELETE FROM {self.ks}.group_members WHERE consumer = ? AND member = ?",
            [consumer, member],
        )

    async def read_members(self, consumer: str) -> list[Member]:
        rows = await self._exec(
            "read members",
            "member_read",
            f"SELECT member, host, pid, workers, started_ms, heartbeat_ms FROM {self.ks}.group_members "
            f"WHERE consumer = ?",
            [consumer],
        )
        return sorted(
            (Member(r["member"], r["host"], r["pid"], r["workers"], r["started_ms"], r["heartbeat_ms"]) for r in rows),
            key=lambda m: m.member,
        )

    async def commit(
        self, consumer: str, shard: int, owner: str, epoch: int, read_bucket: int, replay_bucket: int
    ) -> None:
        refused = await self.commit_many(consumer, owner, [Commit(shard, epoch, read_bucket, replay_bucket)])
        if refused:
            cur = await self._read_offset_serial(consumer, shard)
            raise_fenced(shard, owner, epoch, read_bucket, cur)

    async def commit_many(self, consumer: str, owner: str, commits: Sequence[Commit]) -> list[int]:
        by_group: dict[int, list[Commit]] = {}
        for c in commits:
            by_group.setdefault(index_group(c.shard), []).append(c)
        refused: list[int] = []

        async def one(group: int, todo: list[Commit]) -> None:
            # One conditional batch per offsets partition (16 shards): all-or-nothing; on refusal, find the
            # fenced shards and apply the rest again (bounded: each round removes at least one shard).
            while todo:
                if await self._commit_batch(consumer, group, todo):
                    return
                still: list[Commit] = []
                for c in todo:
                    cur = await self._read_offset_serial(consumer, c.shard)
                    if cur is None or cur.epoch != c.epoch or cur.read_bucket > c.read_bucket:
                        refused.append(c.shard)
                    else:
                        still.append(c)
                if len(still) == len(todo):
                    raise StoreError(f"commit offsets: batch refused for shards {[c.shard for c in todo]}")
                todo = still

        await run_all(one(g, cs) for g, cs in by_group.items())
        return sorted(refused)

    async def _commit_batch(self, consumer: str, group: int, todo: list[Commit]) -> bool:
        cql = (
            f"UPDATE {self.ks}.read_offsets SET read_bucket = ?, replay_bucket = ?, updated_ms = ? "
            f"WHERE consumer = ? AND shard_group = ? AND shard = ? IF epoch = ? AND read_bucket <= ?"
        )
        what = f"commit offsets of shard group {group}"
        prepared = await self._prep("offset_commit", cql)
        now = BigInt(self.clock.now_ms())
        # Batch values are not type-checked against the prepared statement by the driver: bigint explicitly.
        params = [
            [
                BigInt(c.read_bucket),
                BigInt(c.replay_bucket),
                now,
                consumer,
                group,
                c.shard,
                BigInt(c.epoch),
                BigInt(c.read_bucket),
            ]
            for c in todo
        ]

        return await self._applied_batch(what, prepared, params)

    async def _applied_batch(self, what: str, prepared: Any, params: list[list[Any]]) -> bool:
        """One conditional batch of ``prepared`` with each of ``params`` (rows of one partition), retried while
        transient (each statement is idempotent: applying it twice is harmless). Whether it was applied."""

        async def once() -> bool:
            batch = self._conditional_batch()
            for _ in params:
                batch.add_query(prepared)
            res = await self._call(what, lambda: self.db.batch(batch, params))
            try:
                rows = res.all()
            except ScyllaPyMappingError:
                return True
            return bool(rows and rows[0].get("[applied]"))

        return await self._retry(what, once)

    async def read_offsets(self, consumer: str, shards: Sequence[int]) -> list[Offset]:
        cql = (
            f"SELECT shard, read_bucket, replay_bucket, owner, epoch, updated_ms, lease_expires_ms "
            f"FROM {self.ks}.read_offsets WHERE consumer = ? AND shard_group = ?"
        )
        wanted = set(shards)
        found: list[Offset] = []

        async def one(group: int) -> None:
            rows = await self._exec("read offsets", "offset_read", cql, [consumer, group])
            found.extend(_offset(consumer, r["shard"], r) for r in rows if r["shard"] in wanted)

        await run_all(one(g) for g in sorted({index_group(s) for s in shards}))
        return sorted(found, key=lambda o: o.shard)

    # -- stories -------------------------------------------------------------------------------------------
    async def put_stories(self, stories: Sequence[StoryRecord]) -> None:
        cql = (
            f"INSERT INTO {self.ks}.stories (shard, period, story_id, revision, final, merged_into, emitted_ms, body) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        by_id = (
            f"INSERT INTO {self.ks}.story_index (shard, slot, story_id, revision, period, emitted_ms) "
            f"VALUES (?, ?, ?, ?, ?, ?)"
        )
        prepared = await self._prep("story_insert", cql)
        prepared_id = await self._prep("story_id_insert", by_id)
        # First the partitions in story_periods (their sealed column untouched), so a feed finds every partition
        # that has rows; one single-partition batch per slot.
        bms = self.settings.bucket_ms
        by_slot: dict[int, list[list[Any]]] = {}
        for period, shard in sorted({(r.period, r.shard) for r in stories}):
            slot = index_slot(period, bms)
            by_slot.setdefault(slot, []).append([BigInt(slot), BigInt(period), shard])
        if by_slot:
            prepared_period = await self._prep(
                "story_period_insert", f"INSERT INTO {self.ks}.story_periods (slot, period, shard) VALUES (?, ?, ?)"
            )
            await run_all(
                self._write_rows(f"write story periods (slot {slot})", prepared_period, rows)
                for slot, rows in by_slot.items()
            )
        limit = self.settings.store.batch_bytes
        # Revisions of one (shard, period) partition go together in single-partition UNLOGGED batches of at most
        # store.batch_bytes (one emission writes one partition); then their pointers in story_index, so a
        # lookup never finds a pointer to a missing row.
        chunks: list[list[StoryRecord]] = []
        parts: dict[tuple[int, int], list[StoryRecord]] = {}
        for rec in stories:
            parts.setdefault((rec.shard, rec.period), []).append(rec)
        for recs in parts.values():
            cur: list[StoryRecord] = []
            size = 0
            for rec in recs:
                if cur and size + len(rec.body) > limit:
                    chunks.append(cur)
                    cur, size = [], 0
                cur.append(rec)
                size += len(rec.body) + 64
            chunks.append(cur)

        def rows(chunk: list[StoryRecord]) -> list[list[Any]]:
            return [
                [
                    r.shard,
                    BigInt(r.period),
                    r.story_id,
                    r.revision,
                    r.final,
                    _opt(r.merged_into),
                    BigInt(r.emitted_ms),
                    _blob(r.body),
                ]
                for r in chunk
            ]

        await run_all(
            self._write_rows(f"write stories ({c[0].shard}, {c[0].period})", prepared, rows(c)) for c in chunks
        )
        # Then the pointers (so a lookup never finds a pointer to a missing row), grouped per story_index partition
        # (shard, slot) across every period of the call: single-partition batches far smaller than the rows'.
        pointers: dict[tuple[int, int], list[list[Any]]] = {}
        for r in stories:
            slot = index_slot(r.period, bms)
            pointers.setdefault((r.shard, slot), []).append(
                [r.shard, BigInt(slot), r.story_id, r.revision, BigInt(r.period), BigInt(r.emitted_ms)]
            )
        step = _POINTERS_PER_BATCH
        await run_all(
            self._write_rows(f"write story index ({shard}, slot {slot})", prepared_id, ptr[i : i + step])
            for (shard, slot), ptr in pointers.items()
            for i in range(0, len(ptr), step)
        )

    async def story_periods(self, first: int, last: int) -> list[StoryPeriod]:
        bms = self.settings.bucket_ms
        limit = 5000
        cols = f"SELECT period, shard, sealed FROM {self.ks}.story_periods WHERE slot = ?"
        q_first = f"{cols} AND period >= ? AND period <= ? LIMIT ?"
        q_after = f"{cols} AND (period, shard) > (?, ?) AND (period, shard) <= (?, ?) LIMIT ?"
        out: list[StoryPeriod] = []
        for slot in range(index_slot(first, bms), index_slot(last, bms) + 1):
            rows = await self._exec(
                "read story periods", "periods_first", q_first, [BigInt(slot), BigInt(first), BigInt(last), limit]
            )
            while True:
                out.extend(StoryPeriod(r["period"], r["shard"], bool(r["sealed"])) for r in rows)
                if len(rows) < limit:
                    break
                after = [BigInt(rows[-1]["period"]), rows[-1]["shard"], BigInt(last), 2**31 - 1, limit]
                rows = await self._exec("read story periods", "periods_after", q_after, [BigInt(slot), *after])
        return out

    async def seal_periods(self, periods: Sequence[tuple[int, int]]) -> None:
        if not periods:
            return
        prepared = await self._prep(
            "story_period_seal",
            f"INSERT INTO {self.ks}.story_periods (slot, period, shard, sealed) VALUES (?, ?, ?, true)",
        )
        bms = self.settings.bucket_ms
        by_slot: dict[int, list[list[Any]]] = {}
        for period, shard in periods:
            slot = index_slot(period, bms)
            by_slot.setdefault(slot, []).append([BigInt(slot), BigInt(period), shard])
        await run_all(
            self._write_rows(f"seal story periods (slot {slot})", prepared, rows) for slot, rows in by_slot.items()
        )

    async def read_feed_position(self, reader: str) -> FeedPosition | None:
        rows = await self._exec(
            "read feed position",
            "feed_read",
            f"SELECT period, shard, story_id, revision, updated_ms FROM {self.ks}.feed_readers WHERE reader = ?",
            [reader],
        )
        if not rows:
            return None
        r = rows[0]
        return FeedPosition(reader, r["period"], r["shard"], r["story_id"], r["revision"], r["updated_ms"])

    async def commit_feed_position(self, position: FeedPosition) -> None:
        p = position
        prepared = await self._prep(
            "feed_commit",
            f"INSERT INTO {self.ks}.feed_readers (reader, period, shard, story_id, revision, updated_ms) "
            f"VALUES (?, ?, ?, ?, ?, ?)",
        )
        row = [p.reader, BigInt(p.period), p.shard, p.story_id, p.revision, BigInt(p.updated_ms or self.clock.now_ms())]
        await self._write_rows("commit feed position", prepared, [row])

    async def get_story(self, story_id: str) -> StoryRecord | None:
        shard = story_id_shard(story_id)
        if shard is None:
            return None
        # The slots of the periods a lookup considers, newest first, a few at a time: the first slot holding
        # the story holds its latest period.
        first, last = story_lookup_periods(self.clock.now_ms(), self.settings)
        newest, oldest = index_slot(last, self.settings.bucket_ms), index_slot(first, self.settings.bucket_ms)
        cql = (
            f"SELECT revision, period, emitted_ms FROM {self.ks}.story_index "
            f"WHERE shard = ? AND slot = ? AND story_id = ?"
        )
        found: dict[int, list[dict[str, Any]]] = {}

        async def one(slot: int) -> None:
            rows = await self._exec("read story index", "story_index_read", cql, [shard, BigInt(slot), story_id])
            rows = [r for r in rows if first <= r["period"] <= last]
            if rows:
                found[slot] = rows

        for top in range(newest, oldest - 1, -_LOOKUP_SLOTS_AT_ONCE):
            await run_all(one(sl) for sl in range(top, max(oldest - 1, top - _LOOKUP_SLOTS_AT_ONCE), -1))
            if found:
                break
        pointers = found[max(found)] if found else await self._legacy_pointers(story_id)
        if not pointers:
            return None
        r = max(pointers, key=lambda p: (p["period"], p["emitted_ms"] or 0, p["revision"]))
        cql = (
            f"SELECT final, merged_into, emitted_ms, body FROM {self.ks}.stories "
            f"WHERE shard = ? AND period = ? AND story_id = ? AND revision = ?"
        )
        at = int(r.get("shard", shard))  # a schema 2 pointer names its shard
        rows = await self._exec("read story", "story_one", cql, [at, BigInt(r["period"]), story_id, r["revision"]])
        if not rows:  # the pointer outlived its row (both expire by the same TTL, written a moment apart)
            return None
        f = rows[0]
        final, merged, emitted = bool(f["final"]), f["merged_into"], f["emitted_ms"]
        return StoryRecord(at, r["period"], story_id, r["revision"], final, merged, emitted, f["body"])

    async def _legacy_pointers(self, story_id: str) -> list[dict[str, Any]]:
        """Schema 2's story_ids pointers, for stories emitted before an upgrade (until that table's rows
        expire; ``storyline init`` leaves it in place)."""
        if self._legacy_ids is None:
            self._legacy_ids = "story_ids" in await self._tables()
        if not self._legacy_ids:
            return []
        cql = f"SELECT revision, shard, period FROM {self.ks}.story_ids WHERE story_id = ? LIMIT 1"
        rows = await self._exec("read story ids (schema 2)", "story_ids_latest", cql, [story_id])
        return [{**r, "emitted_ms": 0} for r in rows]

    async def read_stories(self, shard: int, period: int) -> AsyncIterator[list[StoryRecord]]:
        cols = "story_id, revision, final, merged_into, emitted_ms, body"
        first = f"SELECT {cols} FROM {self.ks}.stories WHERE shard = ? AND period = ? LIMIT ?"
        after = (
            f"SELECT {cols} FROM {self.ks}.stories WHERE shard = ? AND period = ? "
            f"AND (story_id, revision) > (?, ?) LIMIT ?"
        )
        limit = self.settings.store.page_rows
        cursor: tuple[str, int] | None = None
        while True:
            if cursor is None:
                rows = await self._exec("read stories", "story_first", first, [shard, period, limit])
            else:
                rows = await self._exec(
                    "read stories", "story_after", after, [shard, period, cursor[0], cursor[1], limit]
                )
            page = [
                StoryRecord(
                    shard,
                    period,
                    r["story_id"],
                    r["revision"],
                    bool(r["final"]),
                    r["merged_into"],
                    r["emitted_ms"],
                    r["body"],
                )
                for r in rows
            ]
            if page:
                yield page
            if len(rows) < limit:
                return
            cursor = (page[-1].story_id, page[-1].revision)

    async def _token_scan(
        self, what: str, key: str, cql: str, limit: int, ident: Callable[[dict[str, Any]], object]
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every row of a whole-table scan in token order, each once, in non-empty pages. ``cql`` selects
        ``token(...) AS t`` with ``WHERE token(...) >= ? LIMIT ?``; rows sharing the last token of a page are read
        again by the next one, so those already yielded (by ``ident``) are skipped."""
        token = _MIN_TOKEN
        seen: set[object] = set()
        while True:
            rows = await self._exec(what, key, cql, [token, limit])
            fresh = [r for r in rows if not (r["t"] == token and ident(r) in seen)]
            if fresh:
                yield fresh
            if len(rows) < limit:
                return
            last = rows[-1]["t"]
            if last != token:
                seen = set()
            token = last
            seen |= {ident(r) for r in rows if r["t"] == last}

    async def scan_stories(self) -> AsyncIterator[list[StoryRecord]]:
        cql = (
            f"SELECT DISTINCT shard, period, token(shard, period) AS t FROM {self.ks}.stories "
            f"WHERE token(shard, period) >= ? LIMIT ?"
        )
        async for rows in self._token_scan(
            "scan stories", "story_parts", cql, 1000, lambda r: (r["shard"], r["period"])
        ):
            for r in rows:
                async for page in self.read_stories(r["shard"], r["period"]):
                    yield page

    # -- dead letters --------------------------------------------------------------------------------------
    async def put_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        cql = (
            f"INSERT INTO {self.ks}.dead_letter (dl_id, received_ms, file, line, reason, raw, redriven_ms, raw_bytes) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        await run_all(
            self._exec(
                "write dead letter",
                "dl_insert",
                cql,
                [d.dl_id, d.received_ms, d.file, d.line, d.reason, d.raw, _opt(d.redriven_ms), _opt(d.raw_bytes)],
            )
            for d in letters
        )

    async def scan_dead_letters(self) -> AsyncIterator[list[DeadLetter]]:
        cql = (
            f"SELECT token(dl_id) AS t, dl_id, received_ms, file, line, reason, raw, redriven_ms, raw_bytes "
            f"FROM {self.ks}.dead_letter WHERE token(dl_id) >= ? LIMIT ?"
        )
        async for rows in self._token_scan("scan dead letters", "dl_scan", cql, 500, lambda r: r["dl_id"]):
            yield [
                DeadLetter(
                    r["dl_id"],
                    r["received_ms"],
                    r["file"],
                    r["line"],
                    r["reason"],
                    r["raw"],
                    r["redriven_ms"],
                    r["raw_bytes"],
                )
                for r in rows
            ]

    # -- stage marks ---------------------------------------------------------------------------------------
    async def put_marks(
        self, consumer: str, shard: int, bucket: int, parts: Sequence[bytes], *, first_part: int = 0
    ) -> None:
        if not parts:
            return
        cql = f"INSERT INTO {self.ks}.stage_marks (consumer, shard, slot, bucket, part, body) VALUES (?, ?, ?, ?, ?, ?)"
        prepared = await self._prep("marks_insert", cql)
        slot = BigInt(index_slot(bucket, self.settings.bucket_ms))
        rows = [[consumer, shard, slot, BigInt(bucket), i, body] for i, body in enumerate(parts, first_part)]
        limit = self.settings.store.batch_bytes
        cur: list[list[Any]] = []
        size = 0
        for row, body in zip(rows, parts, strict=True):
            if cur and size + len(body) > limit:
                await self._write_rows(f"write stage marks ({shard}, {bucket})", prepared, cur)
                cur, size = [], 0
            cur.append(row)
            size += len(body) + 64
        await self._write_rows(f"write stage marks ({shard}, {bucket})", prepared, cur)

    async def read_marks(self, consumer: str, shard: int, first: int, last: int) -> list[tuple[int, bytes]]:
        bms = self.settings.bucket_ms
        limit = 64  # rows of up to store.batch_bytes each
        cols = f"SELECT bucket, part, body FROM {self.ks}.stage_marks WHERE consumer = ? AND shard = ? AND slot = ?"
        q_first = f"{cols} AND bucket >= ? AND bucket <= ? LIMIT ?"
        # One multi-column slice on both ends: CQL does not mix single- and multi-column clustering relations.
        q_after = f"{cols} AND (bucket, part) > (?, ?) AND (bucket, part) <= (?, ?) LIMIT ?"
        out: list[tuple[int, bytes]] = []
        for slot in range(index_slot(first, bms), index_slot(last, bms) + 1):
            base = [consumer, shard, BigInt(slot)]
            rows = await self._exec(
                "read stage marks", "marks_first", q_first, [*base, BigInt(first), BigInt(last), limit]
            )
            while True:
                out.extend((r["bucket"], r["body"]) for r in rows)
                if len(rows) < limit:
                    break
                after = [BigInt(rows[-1]["bucket"]), rows[-1]["part"], BigInt(last), 2**31 - 1, limit]
                rows = await self._exec("read stage marks", "marks_after", q_after, [*base, *after])
        return out

    # -- learned offsets -----------------------------------------------------------------------------------
    async def put_offset_evidence(self, consumer: str, rows: Sequence[EvidenceRecord]) -> None:
        if not rows:
            return
        cql = f"INSERT INTO {self.ks}.offset_evidence (consumer, epoch, shard, body) VALUES (?, ?, ?, ?)"
        prepared = await self._prep("evidence_insert", cql)
        by_epoch: dict[int, list[list[Any]]] = {}
        for r in rows:
            by_epoch.setdefault(r.epoch, []).append([consumer, BigInt(r.epoch), r.shard, r.body])
        await run_all(
            self._write_rows(f"write offset evidence (epoch {e})", prepared, params) for e, params in by_epoch.items()
        )

    async def read_offset_evidence(self, consumer: str, epochs: Sequence[int]) -> list[EvidenceRecord]:
        q = f"SELECT shard, body FROM {self.ks}.offset_evidence WHERE consumer = ? AND epoch = ?"
        out: list[EvidenceRecord] = []

        async def one(epoch: int) -> None:
            rows = await self._exec("read offset evidence", "evidence_read", q, [consumer, BigInt(epoch)])
            out.extend(EvidenceRecord(epoch, r["shard"], r["body"]) for r in rows)

        await run_all(one(e) for e in sorted(set(epochs)))
        return out

    async def create_offset_table(self, consumer: str, epoch: int, body: bytes) -> bytes:
        slot = BigInt(epoch // OFFSET_TABLE_SLOT)
        rows = await self._exec(
            f"write offset table (epoch {epoch})",
            "offset_table_create",
            f"INSERT INTO {self.ks}.offset_tables (consumer, slot, epoch, body) VALUES (?, ?, ?, ?) IF NOT EXISTS",
            [consumer, slot, BigInt(epoch), body],
        )
        if rows and rows[0].get("[applied]"):
            return body
        # Not applied: another worker's table is there (or our own earlier attempt, retried): read it back with a
        # serial read, which sees every committed lightweight transaction.
        got = await self._exec(
            f"read offset table (epoch {epoch})",
            "offset_table_serial",
            f"SELECT body FROM {self.ks}.offset_tables WHERE consumer = ? AND slot = ? AND epoch = ?",
            [consumer, slot, BigInt(epoch)],
            serial_read=True,
        )
        if not got:
            raise StoreError(f"write offset table (epoch {epoch}): not applied, yet no table is stored", retriable=True)
        return bytes(got[0]["body"])

    async def read_offset_table(self, consumer: str, epoch: int) -> bytes | None:
        rows = await self._exec(
            f"read offset table (epoch {epoch})",
            "offset_table_read",
            f"SELECT body FROM {self.ks}.offset_tables WHERE consumer = ? AND slot = ? AND epoch = ?",
            [consumer, BigInt(epoch // OFFSET_TABLE_SLOT), BigInt(epoch)],
        )
        return bytes(rows[0]["body"]) if rows else None

    async def latest_offset_table(self, consumer: str, before: int) -> tuple[int, bytes] | None:
        q = f"SELECT epoch, body FROM {self.ks}.offset_tables WHERE consumer = ? AND slot = ? AND epoch < ? LIMIT 1"
        top = (before - 1) // OFFSET_TABLE_SLOT
        for slot in (top, top - 1):
            rows = await self._exec(
                "read offset table", "offset_table_latest", q, [consumer, BigInt(slot), BigInt(before)]
            )
            if rows:
                return rows[0]["epoch"], bytes(rows[0]["body"])
        return None

    async def purge_expired(self) -> int:
        return 0  # the database expires rows by default_time_to_live


def cur_lease(cur: Offset | None) -> int:
    """A stored lease's end, 0 when released or never leased (or no row)."""
    return 0 if cur is None or cur.lease_expires_ms is None else cur.lease_expires_ms


def _offset(consumer: str, shard: int, r: dict[str, Any]) -> Offset:
    return Offset(
        consumer,
        shard,
        r["read_bucket"],
        r["replay_bucket"],
        r["owner"],
        r["epoch"],
        r["updated_ms"],
        r.get("lease_expires_ms"),
    )


def _replication_map(cfg: StoreSettings) -> dict[str, str]:
    r = cfg.store.replication
    if r.strategy == "SimpleStrategy":
        return {"class": "SimpleStrategy", "replication_factor": str(r.replication_factor)}
    return {"class": "NetworkTopologyStrategy", **{dc: str(n) for dc, n in r.datacenters.items()}}
