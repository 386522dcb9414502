"""Shared fixtures. Tests (not the library) read the environment:

* ``STORYLINE_TEST_CQL`` — host:port of the CQL node for the ``cql`` tests (default 127.0.0.1:9042).
* ``STORYLINE_REQUIRE_CQL=1`` (set by .ci/run) — a missing CQL node fails the ``cql`` tests instead of
  skipping them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from engine.core.config import Config, from_mapping
from engine.store import make_store
from engine.testing.memory import MemoryDatabase

T = TypeVar("T")

CQL_ADDR = os.environ.get("STORYLINE_TEST_CQL", "127.0.0.1:9042")
REQUIRE_CQL = os.environ.get("STORYLINE_REQUIRE_CQL") == "1"


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def cql_answers(addr: str = CQL_ADDR) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(struct.pack(">BBhBi", 4, 0, 0, 5, 0))  # OPTIONS
            head = s.recv(9)
            return len(head) == 9 and head[4] == 6  # SUPPORTED
    except OSError:
        return False


_cql_state: dict[str, bool] = {}


def require_cql() -> None:
    if "ok" not in _cql_state:
        _cql_state["ok"] = cql_answers()
    if not _cql_state["ok"]:
        msg = f"no CQL node answers on {CQL_ADDR} (start it with `make db-up`)"
        if REQUIRE_CQL:
            pytest.fail(msg + " and STORYLINE_REQUIRE_CQL=1", pytrace=False)
        pytest.skip(msg)


def new_tenant() -> str:
    return "t_" + uuid.uuid4().hex[:20]


def base_tree(backend: str, tmp_path: Path, tenant: str) -> dict[str, Any]:
    store: dict[str, Any] = {"backend": backend}
    if backend == "embedded":
        store["path"] = str(tmp_path / "store.db")
    else:
        store["contact_points"] = [CQL_ADDR]
        store["consistency"] = "QUORUM"
        store["serial_consistency"] = "SERIAL"
    return {"tenant": tenant, "shards": 8, "store": store}


def merge(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(tree)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


async def drop_tenant(cfg: Config) -> None:
    """Drop a test keyspace (CQL); the embedded store lives in tmp_path and goes with it."""
    if cfg.store.backend != "cql":
        return
    store = make_store(cfg)
    await store.open()
    try:
        await store.drop_schema()
    finally:
        await store.close()


ConfigFactory = Callable[..., Config]


@pytest.fixture(params=["embedded", pytest.param("cql", marks=pytest.mark.cql)])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "cql":
        require_cql()
    return str(request.param)


@pytest.fixture
def make_config(backend: str, tmp_path: Path) -> Iterator[ConfigFactory]:
    """``make_config(**overrides)`` → a Config for a fresh tenant (fresh keyspace) on the current backend.
    Every keyspace made is dropped after the test."""
    made: list[Config] = []
    memory = MemoryDatabase() if backend == "memory" else None

    def make(tenant: str | None = None, **overrides: Any) -> Config:
        tree = merge(base_tree("embedded" if memory else backend, tmp_path, tenant or new_tenant()), overrides)
        cfg = from_mapping(tree)
        if memory is not None:  # the embedded store on an in-memory database (engine.testing.memory)
            cfg = memory.config(cfg)
            arun(memory.open(cfg))
        made.append(cfg)
        return cfg

    yield make
    if memory is not None:
        arun(memory.close())
    if backend == "cql":
        for ks in {c.keyspace for c in made}:
            cfg = next(c for c in made if c.keyspace == ks)
            arun(drop_tenant(cfg))
