"""Driver check (issue 7): the engine's CQL loops with scyllapy (the engine's driver) and with scylla-driver.

scylla-driver is ScyllaDB's shard-aware fork of the DataStax Python driver (Cython-compiled, libev event loop).
Only this module imports it (ruff's banned-api rule keeps it out of engine/); the engine keeps scyllapy.

Same node, same run, same data for both drivers: ``--events`` events of ``--payload`` random bytes (ids are
random 128-bit hex) in ``--partitions`` partitions of a table shaped like the engine's ``events`` table
(``PRIMARY KEY ((shard, bucket), event_id, chunk)``), in a fresh keyspace (RF 1, dropped at the end). Each driver
writes into its own table of each round, at LOCAL_QUORUM:

* **write**: every partition in UNLOGGED single-partition batches of ``batch_rows`` rows (at most
  ``store.batch_bytes`` = 64 KiB, as the engine sends them) of one prepared INSERT, ``--write-concurrency``
  batches in flight. scyllapy: ``Scylla.batch`` from that many asyncio tasks; scylla-driver:
  ``cassandra.concurrent.execute_concurrent`` over a generator of ``BatchStatement``.
* **read (cursor)**: the engine's partition-read loop: ``SELECT … WHERE shard = ? AND bucket = ? [AND (event_id,
  chunk) > (?, ?)] LIMIT ?`` pages of ``--page-rows`` rows until a short page, ``--read-concurrency`` partitions
  in flight. scyllapy: asyncio tasks; scylla-driver: ``execute_async`` with callbacks on its event-loop thread
  (each page's callback sends the next query; a finished partition starts the next one).
* **read (native paging)**: the same partitions with each driver's own paging (``SELECT … WHERE shard = ? AND
  bucket = ?``): scyllapy ``execute(..., paged=True)`` (its page size is fixed by the driver: 5,000 rows) and
  scylla-driver ``fetch_size = 5000`` with ``start_fetching_next_page`` in the callback.

Rows are touched the same way by both (count, payload length). scyllapy returns dicts; scylla-driver is given
``tuple_factory`` (its fastest row factory). Each (driver, round) runs in a fresh process, connecting before the
clock starts; rounds alternate the order of the drivers; the figures are the medians over rounds. On Cassandra
there are no shards, so shard awareness plays no part here (it does on ScyllaDB, for both drivers).

``python -m bench.drivers`` prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from multiprocessing.queues import Queue
from typing import Any, NamedTuple

PAGE_NATIVE = 5_000  # scyllapy's fixed page size for paged=True (scylla-rust-driver default); the same for both
BATCH_BYTES = 64 * 1024  # store.batch_bytes
ROW_OVERHEAD = 64  # id (32 hex), key columns and cell overhead per row, for sizing batches like the engine


class Spec(NamedTuple):
    contact: str
    keyspace: str
    events: int
    partitions: int
    payload: int
    batch_rows: int
    write_concurrency: int
    read_concurrency: int
    page_rows: int
    seed: int


def partitions(spec: Spec) -> list[tuple[int, int, list[tuple[str, bytes]]]]:
    """The data: (shard, bucket, [(event_id, payload)]) in clustering order, the same for every driver."""
    rnd = random.Random(spec.seed)
    per = spec.events // spec.partitions
    out = []
    for p in range(spec.partitions):
        rows = sorted((uuid.UUID(int=rnd.getrandbits(128)).hex, rnd.randbytes(spec.payload)) for _ in range(per))
        out.append((p % 16, 1_000_000 + p // 16, rows))
    return out


def table_cql(keyspace: str, table: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {keyspace}.{table} (shard int, bucket bigint, event_id text, chunk int, "
        f"chunks int, payload blob, PRIMARY KEY ((shard, bucket), event_id, chunk)) "
        f"WITH CLUSTERING ORDER BY (event_id ASC, chunk ASC)"
    )


def _insert(spec: Spec, table: str) -> str:
    return (
        f"INSERT INTO {spec.keyspace}.{table} (shard, bucket, event_id, chunk, chunks, payload) "
        f"VALUES (?, ?, ?, ?, ?, ?)"
    )


def _first(spec: Spec, table: str) -> str:
    return (
        f"SELECT event_id, chunk, chunks, payload FROM {spec.keyspace}.{table} WHERE shard = ? AND bucket = ? LIMIT ?"
    )


def _after(spec: Spec, table: str) -> str:
    return (
        f"SELECT event_id, chunk, chunks, payload FROM {spec.keyspace}.{table} WHERE shard = ? AND bucket = ? "
        f"AND (event_id, chunk) > (?, ?) LIMIT ?"
    )


def _whole(spec: Spec, table: str) -> str:
    return f"SELECT event_id, chunk, chunks, payload FROM {spec.keyspace}.{table} WHERE shard = ? AND bucket = ?"


# -- scyllapy --------------------------------------------------------------------------------------------------
async def _scyllapy(spec: Spec, table: str) -> dict[str, float]:
    from scyllapy import Batch, BatchType, Consistency, ExecutionProfile, Query, Scylla
    from scyllapy.extra_types import BigInt

    data = partitions(spec)
    lq = Consistency.LOCAL_QUORUM
    db = Scylla([spec.contact], default_execution_profile=ExecutionProfile(consistency=lq, request_timeout=30))
    await db.startup()
    try:
        insert = await db.prepare(Query(_insert(spec, table), consistency=lq, is_idempotent=True))
        first = await db.prepare(Query(_first(spec, table), consistency=lq, is_idempotent=True))
        after = await db.prepare(Query(_after(spec, table), consistency=lq, is_idempotent=True))
        whole = await db.prepare(Query(_whole(spec, table), consistency=lq, is_idempotent=True))

        # write: a shared iterator of batches, drained by write_concurrency tasks
        def batches() -> Iterator[tuple[int, int, list[tuple[str, bytes]]]]:
            for shard, bucket, rows in data:
                for i in range(0, len(rows), spec.batch_rows):
                    yield shard, bucket, rows[i : i + spec.batch_rows]

        todo = batches()

        async def writer() -> None:
            for shard, bucket, rows in todo:
                b = Batch(BatchType.UNLOGGED, consistency=lq, is_idempotent=True)
                big = BigInt(bucket)  # batch values are not type-checked against the statement: bigint explicitly
                params = []
                for eid, payload in rows:
                    b.add_query(insert)
                    params.append([shard, big, eid, 0, 1, payload])
                await db.batch(b, params)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(spec.write_concurrency)))
        t_write = time.perf_counter() - t0

        # read, the engine's loop: LIMIT pages with a clustering-key cursor
        parts = iter([(s, b) for s, b, _ in data])
        counts = [0, 0]

        async def cursor_reader() -> None:
            for shard, bucket in parts:
                res = await db.execute(first, [shard, bucket, spec.page_rows])
                while True:
                    rows = res.all()
                    for r in rows:
                        counts[0] += 1
                        counts[1] += len(r["payload"])
                    if len(rows) < spec.page_rows:
                        break
                    last = rows[-1]
                    res = await db.execute(after, [shard, bucket, last["event_id"], last["chunk"], spec.page_rows])

        t0 = time.perf_counter()
        await asyncio.gather(*(cursor_reader() for _ in range(spec.read_concurrency)))
        t_cursor = time.perf_counter() - t0
        cursor_rows, cursor_bytes = counts

        parts = iter([(s, b) for s, b, _ in data])
        counts[:] = [0, 0]

        async def native_reader() -> None:
            for shard, bucket in parts:
                async for r in await db.execute(whole, [shard, bucket], paged=True):
                    counts[0] += 1
                    counts[1] += len(r["payload"])

        t0 = time.perf_counter()
        await asyncio.gather(*(native_reader() for _ in range(spec.read_concurrency)))
        t_native = time.perf_counter() - t0
        return _figures(spec, t_write, t_cursor, cursor_rows, cursor_bytes, t_native, counts[0], counts[1])
    finally:
        await db.shutdown()


# -- scylla-driver ---------------------------------------------------------------------------------------------
def _scylla_driver(spec: Spec, table: str) -> dict[str, float]:
    from cassandra import ConsistencyLevel  # type: ignore[import-untyped]
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile  # type: ignore[import-untyped]
    from cassandra.concurrent import execute_concurrent  # type: ignore[import-untyped]
    from cassandra.query import BatchStatement, BatchType, tuple_factory  # type: ignore[import-untyped]

    logging.getLogger("cassandra").setLevel(logging.ERROR)
    data = partitions(spec)
    host, _, port = spec.contact.rpartition(":")
    lq = ConsistencyLevel.LOCAL_QUORUM
    profile = ExecutionProfile(consistency_level=lq, row_factory=tuple_factory, request_timeout=30)
    cluster = Cluster([host], port=int(port), execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    session = cluster.connect()
    session.default_fetch_size = PAGE_NATIVE  # the driver's default too
    try:
        insert = session.prepare(_insert(spec, table))
        first = session.prepare(_first(spec, table))
        after = session.prepare(_after(spec, table))
        whole = session.prepare(_whole(spec, table))
        for st in (insert, first, after, whole):
            st.is_idempotent = True

        def batches() -> Iterator[tuple[Any, None]]:
            for shard, bucket, rows in data:
                for i in range(0, len(rows), spec.batch_rows):
                    b = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=lq)
                    for eid, payload in rows[i : i + spec.batch_rows]:
                        b.add(insert, (shard, bucket, eid, 0, 1, payload))
                    yield b, None

        t0 = time.perf_counter()
        execute_concurrent(session, batches(), concurrency=spec.write_concurrency, raise_on_first_error=True)
        t_write = time.perf_counter() - t0

        keys = [(s, b) for s, b, _ in data]
        cursor_rows, cursor_bytes, t_cursor = _callback_reads(session, keys, spec, first, after, None)
        native_rows, native_bytes, t_native = _callback_reads(session, keys, spec, None, None, whole)
        figures = _figures(spec, t_write, t_cursor, cursor_rows, cursor_bytes, t_native, native_rows, native_bytes)
        return figures | {"protocol_version": float(cluster.protocol_version)}
    finally:
        cluster.shutdown()


def _callback_reads(
    session: Any, keys: list[tuple[int, int]], spec: Spec, first: Any, after: Any, whole: Any
) -> tuple[int, int, float]:
    """Read every partition with ``read_concurrency`` in flight, driven by callbacks on the driver's event-loop
    thread: the cursor loop (``first``/``after``) or the driver's own paging (``whole``)."""
    lock = threading.Lock()
    done = threading.Event()
    state = {"next": 0, "active": 0, "rows": 0, "bytes": 0}
    errors: list[BaseException] = []

    def start_next() -> None:
        with lock:
            i = state["next"]
            if i >= len(keys):
                if state["active"] == 0:
                    done.set()
                return
            state["next"] = i + 1
            state["active"] += 1
        shard, bucket = keys[i]
        if whole is not None:
            fut = session.execute_async(whole, (shard, bucket))  # pages of session.default_fetch_size rows
        else:
            fut = session.execute_async(first, (shard, bucket, spec.page_rows))
        fut.add_callbacks(on_page, on_error, callback_args=(fut, shard, bucket))

    def finish() -> None:
        with lock:
            state["active"] -= 1
        start_next()

    def on_page(rows: list[tuple[Any, ...]], fut: Any, shard: int, bucket: int) -> None:
        n = len(rows)
        size = 0
        for r in rows:
            size += len(r[3])
        with lock:
            state["rows"] += n
            state["bytes"] += size
        if whole is not None:
            if fut.has_more_pages:
                fut.start_fetching_next_page()  # the same callbacks fire for the next page
                return
        elif n == spec.page_rows:
            last = rows[-1]
            nxt = session.execute_async(after, (shard, bucket, last[0], last[1], spec.page_rows))
            nxt.add_callbacks(on_page, on_error, callback_args=(nxt, shard, bucket))
            return
        finish()

    def on_error(exc: BaseException, *_: Any) -> None:
        errors.append(exc)
        done.set()

    t0 = time.perf_counter()
    for _ in range(spec.read_concurrency):
        start_next()
    if not done.wait(600):
        raise SystemExit("scylla-driver reads did not finish within 600 s")
    dt = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"scylla-driver read failed: {errors[0]!r}")
    return state["rows"], state["bytes"], dt


# -- plumbing --------------------------------------------------------------------------------------------------
def _figures(
    spec: Spec,
    t_write: float,
    t_cursor: float,
    cursor_rows: int,
    cursor_bytes: int,
    t_native: float,
    native_rows: int,
    native_bytes: int,
) -> dict[str, float]:
    n = spec.events // spec.partitions * spec.partitions
    want_bytes = n * spec.payload
    if (cursor_rows, cursor_bytes, native_rows, native_bytes) != (n, want_bytes, n, want_bytes):
        raise SystemExit(f"driver check: read {cursor_rows}/{native_rows} rows of {n}")
    return {
        "write_events_per_s": n / t_write,
        "read_cursor_events_per_s": n / t_cursor,
        "read_native_events_per_s": n / t_native,
    }


def _child(driver: str, spec: Spec, table: str, out: Queue[Any]) -> None:
    try:
        out.put(asyncio.run(_scyllapy(spec, table)) if driver == "scyllapy" else _scylla_driver(spec, table))
    except BaseException as exc:
        out.put({"error": repr(exc)})


def _measure(driver: str, spec: Spec, table: str) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    out: Queue[Any] = ctx.Queue()
    p = ctx.Process(target=_child, args=(driver, spec, table, out))
    p.start()
    try:
        res: dict[str, Any] = out.get(timeout=900)
    finally:
        p.join(60)
        if p.is_alive():
            p.terminate()
    if "error" in res:
        raise SystemExit(f"driver check: {driver} failed: {res['error']}")
    return res


async def _schema(spec: Spec, tables: list[str], drop: bool) -> None:
    from scyllapy import Query, Scylla

    db = Scylla([spec.contact])
    await db.startup()
    try:
        if drop:
            await db.execute(Query(f"DROP KEYSPACE IF EXISTS {spec.keyspace}", request_timeout=60))
            return
        await db.execute(
            Query(
                f"CREATE KEYSPACE IF NOT EXISTS {spec.keyspace} WITH replication = "
                f"{{'class': 'SimpleStrategy', 'replication_factor': 1}}",
                request_timeout=60,
            )
        )
        for t in tables:
            await db.execute(Query(table_cql(spec.keyspace, t), request_timeout=60))
    finally:
        await db.shutdown()


DRIVERS = ("scyllapy", "scylla-driver")


def run(
    events: int = 200_000,
    n_partitions: int = 200,
    payload: int = 300,
    rounds: int = 3,
    contact: str = "127.0.0.1:9042",
    write_concurrency: int = 64,
    read_concurrency: int = 32,
    page_rows: int = 500,
) -> dict[str, Any]:
    """Both drivers, ``rounds`` rounds in alternating order; per-round figures, medians and ratios."""
    spec = Spec(
        contact=contact,
        keyspace=f"drivers_{uuid.uuid4().hex[:8]}",
        events=events,
        partitions=n_partitions,
        payload=payload,
        batch_rows=max(1, BATCH_BYTES // (payload + ROW_OVERHEAD)),
        write_concurrency=write_concurrency,
        read_concurrency=read_concurrency,
        page_rows=page_rows,
        seed=42,
    )
    tables = {(d, r): f"ev_{d.replace('-', '_')}_{r}" for d in DRIVERS for r in range(rounds)}
    load1 = os.getloadavg()[0]
    asyncio.run(_schema(spec, list(tables.values()), drop=False))
    per: dict[str, list[dict[str, float]]] = {d: [] for d in DRIVERS}
    try:
        for r in range(rounds):
            for d in DRIVERS if r % 2 == 0 else DRIVERS[::-1]:
                per[d].append(_measure(d, spec, tables[(d, r)]))
    finally:
        asyncio.run(_schema(spec, [], drop=True))
    medians = {d: {k: statistics.median(x[k] for x in per[d]) for k in per[d][0]} for d in DRIVERS}
    a, b = medians["scylla-driver"], medians["scyllapy"]
    protocol = a.pop("protocol_version", 0.0)
    return {
        "versions": {
            "scyllapy": metadata.version("scyllapy"),
            "scylla-driver": metadata.version("scylla-driver"),
            "scylla-driver_connection": _driver_facts(),
            "protocol": f"scylla-driver negotiated v{protocol:.0f}; scyllapy (scylla-rust-driver) speaks v4",
        },
        "spec": {k: v for k, v in spec._asdict().items() if k != "keyspace"}
        | {"page_rows_native": PAGE_NATIVE, "rounds": rounds, "consistency": "LOCAL_QUORUM"},
        "loadavg_1m_at_start": load1,
        "rounds": per,
        "median": medians,
        "ratio_scylla_driver_over_scyllapy": {k: a[k] / b[k] for k in a},
        # Each driver's faster read loop against the other's (scyllapy: the engine's cursor loop; scylla-driver:
        # usually its own paging).
        "ratio_best_read": max(a["read_cursor_events_per_s"], a["read_native_events_per_s"])
        / max(b["read_cursor_events_per_s"], b["read_native_events_per_s"]),
    }


def _driver_facts() -> str:
    import cassandra.cluster
    from cassandra.cython_deps import HAVE_CYTHON  # type: ignore[import-untyped]

    conn = cassandra.cluster.DefaultConnection.__name__
    return f"{conn}, Cython extensions: {HAVE_CYTHON}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.drivers", description="scyllapy vs scylla-driver")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=200)
    ap.add_argument("--payload", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cql", default="127.0.0.1:9042")
    ap.add_argument("--write-concurrency", type=int, default=64)
    ap.add_argument("--read-concurrency", type=int, default=32)
    ap.add_argument("--page-rows", type=int, default=500)
    a = ap.parse_args(argv)
    res = run(a.events, a.partitions, a.payload, a.rounds, a.cql, a.write_concurrency, a.read_concurrency, a.page_rows)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
