"""Fixtures of the chaos tier (marker ``chaos``; docs/RELIABILITY.md).

* ``chaos_tenant(**overrides)`` → a :class:`Tenant` on the current backend (embedded, or the CQL node under
  test), with the :data:`CHAOS` windows; its keyspace is dropped afterwards. ``embedded_tenant`` and
  ``chaos_node_tenant`` do the same on one fixed store.
* ``sim_20k`` → 20,000 simulated events and their truth file, made once per session.
* ``chaos_record(fault, backend, report, recovery_s, injected, **extra)`` → keeps one row of measurements; with
  ``STORYLINE_CHAOS_REPORT=path`` set, the rows are merged into that JSON file at the end of the session
  (``python -m tests.chaos.report path`` renders them).
* ``chaos_node`` → a second, private CQL node (``CQL_NAME=chaos``, 127.0.0.1:9342) that a test may stop and
  start; never the shared node on 9042.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.core.config import from_mapping
from engine.tools.verify import VerifyReport
from tests.chaos.harness import CHAOS, ROOT, Tenant, simulate, summary
from tests.conftest import REQUIRE_CQL, arun, base_tree, cql_answers, drop_tenant, merge, new_tenant

REPORT_ENV = "STORYLINE_CHAOS_REPORT"

CHAOS_NODE_ENV = {"CQL_NAME": "chaos", "CQL_PORT": "9342", "CQL_STORAGE_PORT": "7300"}
CHAOS_NODE_ADDR = "127.0.0.1:9342"


TenantFactory = Callable[..., Tenant]


def tenants(backend: str, tmp_path: Path, store: dict[str, Any] | None = None) -> Iterator[TenantFactory]:
    """Tenants with the :data:`CHAOS` windows (``store``: settings laid over the backend's store table); each
    tenant's keyspace is dropped at the end."""
    made: list[Tenant] = []

    def make(**overrides: Any) -> Tenant:
        tree = merge(merge(base_tree(backend, tmp_path, new_tenant()), CHAOS), overrides)
        tree["store"].update(store or {})
        t = Tenant(from_mapping(tree), tmp_path / f"tenant{len(made)}")
        made.append(t)
        return t

    yield make
    for t in made:
        try:
            arun(drop_tenant(t.cfg))
        except Exception as exc:  # a node that is down at the end must not hide the test's own result
            print(f"could not drop {t.cfg.tenant}: {exc}")


@pytest.fixture
def chaos_tenant(backend: str, tmp_path: Path) -> Iterator[TenantFactory]:
    """A fresh tenant on the current backend (embedded, or the shared CQL node)."""
    yield from tenants(backend, tmp_path)


@pytest.fixture
def embedded_tenant(tmp_path: Path) -> Iterator[TenantFactory]:
    """A fresh tenant on the embedded store, for faults that exist only there."""
    yield from tenants("embedded", tmp_path)


@pytest.fixture(scope="session")
def sim_20k(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """20,000 simulated events (``storyline simulate``) and their truth file, made once per session."""
    return simulate(tmp_path_factory.mktemp("sim"), 20_000, seed=11)


@pytest.fixture(scope="session")
def chaos_results() -> Iterator[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    yield rows
    path = os.environ.get(REPORT_ENV)
    if not path or not rows:
        return
    p = Path(path)
    old = json.loads(p.read_text())["rows"] if p.exists() else []
    keep = {r["test"] for r in rows}
    merged = [r for r in old if r["test"] not in keep] + rows
    doc = {
        "machine": f"{os.cpu_count()} vCPU {platform.machine()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}",
        "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rows": merged,
    }
    p.write_text(json.dumps(doc, indent=1) + "\n")


Recorder = Callable[..., None]


@pytest.fixture
def chaos_record(chaos_results: list[dict[str, Any]], request: pytest.FixtureRequest) -> Iterator[Recorder]:
    t0 = time.time()
    mine: list[dict[str, Any]] = []

    def record(
        fault: str, backend: str, report: VerifyReport, recovery_s: list[float], injected: int, **extra: Any
    ) -> None:
        mine.append(
            {
                "test": request.node.nodeid,
                "fault": fault,
                "backend": backend,
                **summary(report),
                "injected": injected,
                "recovery_s": [round(r, 2) for r in recovery_s],
                **extra,
            }
        )

    yield record
    for row in mine:
        row["test_seconds"] = round(time.time() - t0, 1)
    chaos_results.extend(mine)


# -- the private CQL node ------------------------------------------------------------------------------------
class ChaosNode:
    """The node ``db/cql-node`` runs as ``CQL_NAME=chaos`` on 127.0.0.1:9342 (storage port 7300)."""

    addr = CHAOS_NODE_ADDR

    def _script(self, action: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **CHAOS_NODE_ENV}
        return subprocess.run(
            [str(ROOT / "db" / "cql-node"), action],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self) -> float:
        t0 = time.time()
        res = self._script("up")
        assert res.returncode == 0, f"the chaos CQL node did not start:\n{res.stdout}\n{res.stderr}"
        return time.time() - t0

    def down(self) -> float:
        t0 = time.time()
        res = self._script("down")
        assert res.returncode == 0, res.stderr
        return time.time() - t0

    def pid(self) -> int | None:
        f = ROOT / ".cql" / CHAOS_NODE_ENV["CQL_NAME"] / "pid"
        return int(f.read_text()) if f.exists() else None

    def answers(self) -> bool:
        return cql_answers(self.addr)


@pytest.fixture(scope="module")
def chaos_node() -> Iterator[ChaosNode]:
    node = ChaosNode()
    if not cql_answers():  # no shared node: no Java here either (CI always has one)
        msg = "no CQL node on the shared address, so no Java/Maven to start the chaos node with"
        if REQUIRE_CQL:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    node.up()
    yield node
    node.down()


@pytest.fixture
def chaos_node_tenant(chaos_node: ChaosNode, tmp_path: Path) -> Iterator[TenantFactory]:
    """A fresh tenant on the private CQL node."""
    yield from tenants("cql", tmp_path, {"contact_points": [chaos_node.addr]})


# -- the private three-node cluster ------------------------------------------------------------------------------
CLUSTER_ENV = {"CQL_CLUSTER_NAME": "chaos-cluster", "CQL_PORT": "9442", "CQL_STORAGE_PORT": "7400"}
CLUSTER_ADDRS = [f"127.0.0.{n}:{CLUSTER_ENV['CQL_PORT']}" for n in (1, 2, 3)]


class ChaosCluster:
    """Three Cassandra nodes (``db/cql-node cluster-*`` as ``CQL_CLUSTER_NAME=chaos-cluster``) on 127.0.0.1, .2 and .3,
    native port 9442, storage port 7400: beside the shared single node, never touching it. Fresh data folders."""

    addrs = CLUSTER_ADDRS

    def script(self, *action: str, timeout: float = 400, while_running: Callable[[], None] | None = None) -> float:
        """Run ``db/cql-node <action>``; the seconds it took (it waits until the nodes answer or are gone).
        ``while_running`` is called about five times a second meanwhile."""
        t0 = time.time()
        env = {**os.environ, **CLUSTER_ENV}
        proc = subprocess.Popen(
            [str(ROOT / "db" / "cql-node"), *action], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        while proc.poll() is None and time.time() < t0 + timeout:
            if while_running is not None:
                while_running()
            time.sleep(0.2)
        out = proc.communicate(timeout=max(1.0, t0 + timeout - time.time()))[0]
        assert proc.returncode == 0, f"db/cql-node {' '.join(action)}:\n{out}"
        return time.time() - t0

    def folder(self) -> Path:
        return ROOT / ".cql" / CLUSTER_ENV["CQL_CLUSTER_NAME"]


@pytest.fixture(scope="module")
def chaos_cluster() -> Iterator[ChaosCluster]:
    if not cql_answers():  # no shared node: no Java here either (CI always has one)
        msg = "no CQL node on the shared address, so no Java/Maven to start the cluster with"
        if REQUIRE_CQL:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    cluster = ChaosCluster()
    cluster.script("cluster-down")  # a cluster left by an interrupted run
    shutil.rmtree(cluster.folder(), ignore_errors=True)
    up_s = cluster.script("cluster-up")
    print(f"chaos cluster up in {up_s:.1f} s")
    try:
        yield cluster
    finally:
        cluster.script("cluster-down")
        shutil.rmtree(cluster.folder(), ignore_errors=True)


@pytest.fixture
def cluster_tenant(chaos_cluster: ChaosCluster, tmp_path: Path) -> Iterator[TenantFactory]:
    """A fresh tenant on the cluster: all three contact points, SimpleStrategy RF 3, QUORUM and SERIAL (as every
    CQL test here; with one datacenter the same as production's LOCAL_QUORUM)."""
    replication = {"strategy": "SimpleStrategy", "replication_factor": 3}
    yield from tenants("cql", tmp_path, {"contact_points": list(chaos_cluster.addrs), "replication": replication})
