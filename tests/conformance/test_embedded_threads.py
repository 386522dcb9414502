"""The embedded store calls SQLite off the event loop (issue 15): a locked database blocks one of the store's
threads, never the loop, so the worker's other tasks — read-ahead, its heartbeat to the parent watchdog — go
on while a write waits for the lock."""

from __future__ import annotations

import asyncio
import sqlite3  # the test holds the embedded store's file lock itself
import threading
import time
from pathlib import Path

from engine.core.config import from_mapping
from engine.core.errors import TransientStoreError
from engine.store import make_store
from engine.store.classify import SQLITE_BUSY
from engine.store.embedded import _classify

LOCK_S = 1.0
TICK_S = 0.01


def test_a_locked_database_does_not_stall_other_tasks_of_the_loop(tmp_path: Path) -> None:
    cfg = from_mapping(
        {
            "tenant": "t_threads",
            "shards": 2,
            "request_timeout_ms": 5_000,
            "store": {"backend": "embedded", "path": str(tmp_path / "s.db")},
        }
    )

    async def body() -> tuple[int, float]:
        store = make_store(cfg)
        await store.open()
        await store.init_schema()
        other = sqlite3.connect(tmp_path / "s.db", isolation_level=None, check_same_thread=False)
        try:
            other.execute("BEGIN EXCLUSIVE")  # another process's writer holds the lock
            threading.Timer(LOCK_S, lambda: other.execute("COMMIT")).start()
            ticks = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    await asyncio.sleep(TICK_S)
                    ticks += 1

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            t0 = time.monotonic()
            await store.claim("main", 0, "owner-a", 0)  # a write: waits in its thread for the lock
            waited = time.monotonic() - t0
            during = ticks
            stop.set()
            await task
            return during, waited
        finally:
            other.close()
            await store.close()

    during, waited = asyncio.run(body())
    assert waited >= LOCK_S * 0.8, f"the write did not wait for the lock ({waited:.2f} s)"
    # ~100 ticks of 10 ms fit in 1 s; with SQLite on the loop there are none until the lock is released.
    assert during >= 0.3 * waited / TICK_S, f"{during} ticks of the loop during a {waited:.2f} s wait for the lock"


def test_busy_is_retriable_by_its_error_code(tmp_path: Path) -> None:
    """A real SQLITE_BUSY (another connection holds the write lock, no busy timeout) is classified by its code."""
    a = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    b = sqlite3.connect(tmp_path / "b.db", isolation_level=None, timeout=0)
    try:
        a.execute("CREATE TABLE x (k INTEGER)")
        a.execute("BEGIN EXCLUSIVE")
        try:
            b.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            assert exc.sqlite_errorcode & 0xFF == SQLITE_BUSY
            assert isinstance(_classify(exc, "write"), TransientStoreError)
        else:
            raise AssertionError("the second writer was not refused")
    finally:
        a.close()
        b.close()
