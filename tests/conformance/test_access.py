"""Tenant isolation and access on CQL: logins, TLS, secrets, and tenants side by side on one database.

* A second local node (``db/cql-node`` with CQL_NAME=auth, CQL_AUTH=1, CQL_TLS=1 on 127.0.0.1:9242) requires a
  username and password (PasswordAuthenticator + CassandraAuthorizer) and serves TLS on its native port (where
  plaintext is still accepted). This module starts it and stops it at the end (only if it started it).
* Logins: a dedicated role opens the store, creates its keyspace and reads back what it wrote; a wrong or a
  missing password is a non-retriable error that says authentication failed, at once and without the password.
* TLS: ``store.tls_ca_file`` reaches the driver, and the node's own client table shows the connection encrypted;
  a CA that did not sign the node, a plaintext-only port and an unreadable CA file fail clearly.
* Secrets: a distinctive password appears in no CLI output (config, init, ingest, run at DEBUG, status, stories,
  verify, a refused login), in no log record and in no exception.
* Isolation: a role granted SELECT and MODIFY on its own keyspace only runs the whole engine — the node refuses
  any statement to another keyspace, so the database itself shows that the engine stays in its tenant's
  keyspace — and is refused when pointed at another tenant. Two tenants ingest and run at the same time on the
  main node, and the data shows that each keyspace holds only its own tenant's events, stories and offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from scyllapy import Scylla, SSLVerifyMode
from scyllapy.exceptions import ScyllaPyBaseError, ScyllaPyMappingError

import engine.store.cql as cql_store
from engine.cli import main as cli_main
from engine.core.config import Config, from_mapping
from engine.core.errors import ConfigError, StoreError, StorylineError
from engine.store import EventRecord, make_store
from engine.tools.simulate import sessions as synth
from tests.cli import FAST
from tests.conftest import CQL_ADDR, REQUIRE_CQL, arun, drop_tenant, new_tenant, require_cql

pytestmark = pytest.mark.conformance  # every test but the first needs a CQL node and is marked cql

ROOT = Path(__file__).resolve().parents[2]
AUTH_NAME, AUTH_PORT, AUTH_STORAGE_PORT = "auth", 9242, 7200
AUTH_ADDR = f"127.0.0.1:{AUTH_PORT}"
SUPERUSER = ("cassandra", "cassandra")  # the default superuser of a fresh PasswordAuthenticator node
# A CA certificate that signed nothing of ours (its key was never kept): the node's certificate must not verify.
FOREIGN_CA = """-----BEGIN CERTIFICATE-----
MIIBlDCCATugAwIBAgIUIRVsTB8tvLpQVL5XWXbdEg+MgmMwCgYIKoZIzj0EAwIw
HzEdMBsGA1UEAwwUbm90LXRoZS1zdG9yeWxpbmUtY2EwIBcNMjYxMTI2MTAwNzQ4
WhgPMjEyNjExMDIxMDA3NDhaMB8xHTAbBgNVBAMMFG5vdC10aGUtc3RvcnlsaW5l
LWNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEVTicRqDx8M+fUovaizI0yyp2
BfGuFINedt8IDeylHtyNVEibeJjBLv9wQo8T0YKT4yCmnTORD1Ip08R9tEEX76NT
MFEwHQYDVR0OBBYEFB5AUOqrpnHRUE0nja0ZClteL3gdMB8GA1UdIwQYMBaAFB5A
UOqrpnHRUE0nja0ZClteL3gdMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwID
RwAwRAIgeUtKOqyHV7vbZx6AOgjh66uVjbJtr6E7JFYGOBHKPQsCIHybj4ABzBA7
LhfRm+bPD7YkI5FmwF4YU3tUdkWo56Zz
-----END CERTIFICATE-----
"""


def secret() -> str:
    """A distinctive password, so that finding it anywhere in an output is never a coincidence."""
    return f"Pw{uuid.uuid4().hex}Zq"


# -- the auth node ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuthNode:
    addr: str
    ca_file: str


def _node_env() -> dict[str, str]:
    return {
        **os.environ,
        "CQL_NAME": AUTH_NAME,
        "CQL_PORT": str(AUTH_PORT),
        "CQL_STORAGE_PORT": str(AUTH_STORAGE_PORT),
        "CQL_AUTH": "1",
        "CQL_TLS": "1",
    }


def _unavailable(msg: str) -> NoReturn:
    if REQUIRE_CQL:
        pytest.fail(f"{msg} (STORYLINE_REQUIRE_CQL=1)", pytrace=False)
    pytest.skip(msg)


async def _superuser_ready(addr: str, within_s: float) -> bool:
    """The node answers CQL before it has made the default superuser: log in until that works."""
    deadline = time.monotonic() + within_s
    while True:
        db = Scylla([addr], username=SUPERUSER[0], password=SUPERUSER[1], connection_timeout=3)  # type: ignore[call-arg]  # stub: conn_timeout
        try:
            await db.startup()
            await db.shutdown()
            return True
        except ScyllaPyBaseError:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def auth_node() -> Iterator[AuthNode]:
    script = str(ROOT / "db" / "cql-node")
    env = _node_env()
    try:
        up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"cannot run db/cql-node up for the auth node: {exc}")
    if up.returncode != 0:
        _unavailable(f"the auth node (CQL_AUTH=1 CQL_TLS=1 on {AUTH_ADDR}) did not start: {up.stderr.strip()[-3000:]}")
    started_here = "already running" not in up.stdout  # a node someone else started is left running
    try:
        if not arun(_superuser_ready(AUTH_ADDR, 60)):
            _unavailable(f"the auth node on {AUTH_ADDR} never accepted the default superuser login")
        home = Path(os.environ.get("CQL_HOME", str(ROOT / ".cql")))
        yield AuthNode(AUTH_ADDR, str(home / AUTH_NAME / "tls" / "ca.pem"))
    finally:
        if started_here:  # by the pid file of this node only; the main node is never touched
            subprocess.run([script, "down"], env=env, capture_output=True, text=True, timeout=120, check=False)


# -- helpers ----------------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def session(addr: str, login: tuple[str, str] | None = SUPERUSER) -> AsyncIterator[Scylla]:
    """A raw driver session (tests only): administration, and reading what the engine wrote."""
    user, pw = login if login else (None, None)
    db = Scylla([addr], username=user, password=pw, connection_timeout=5)  # type: ignore[call-arg]
    await db.startup()
    try:
        yield db
    finally:
        await db.shutdown()


async def q(db: Scylla, cql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    res = await db.execute(cql, list(params) if params is not None else None)
    try:
        return res.all()
    except ScyllaPyMappingError:  # no rows
        return []


async def make_role(db: Scylla, role: str, password: str, *grants: str) -> None:
    await q(db, f"CREATE ROLE IF NOT EXISTS {role} WITH PASSWORD = '{password}' AND LOGIN = true")
    for grant in grants:
        await q(db, f"GRANT {grant} TO {role}")


def cfg_for(addr: str, tenant: str, login: tuple[str, str] | None = None, **overrides: Any) -> Config:
    store: dict[str, Any] = {
        "backend": "cql",
        "contact_points": [addr],
        "consistency": "QUORUM",
        "serial_consistency": "SERIAL",
        **overrides.pop("store", {}),
    }
    if login:
        store["username"], store["password"] = login
    return from_mapping({"tenant": tenant, "shards": 8, "store": store, **overrides})


def toml_config(path: Path, addr: str, tenant: str, login: tuple[str, str] | None = None) -> Path:
    """A config file: the password goes in a file, never on a command line (where `ps` would show it)."""
    lines = [f"tenant = {json.dumps(tenant)}", "shards = 8", *(f"{k} = {v}" for k, v in FAST.items())]
    lines += [
        "[store]",
        'backend = "cql"',
        f"contact_points = [{json.dumps(addr)}]",
        'consistency = "QUORUM"',
        'serial_consistency = "SERIAL"',
    ]
    if login:
        lines += [f"username = {json.dumps(login[0])}", f"password = {json.dumps(login[1])}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def storyline(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def write_input(path: Path, tenant: str, sessions: int = 150, seed: int = 7) -> set[str]:
    """Synthetic sensor events with ids that name their tenant: disjoint between tenants by construction (the
    traffic itself is the same for every tenant with the same seed: same flows, shards and times)."""
    ids: list[str] = []
    out: list[str] = []
    for i, line in enumerate(synth(sessions, seed=seed, start_s=time.time() - 300, span_s=300)):
        ev = json.loads(line)
        ev["id"] = f"{tenant}-{i:05d}"
        ids.append(ev["id"])
        out.append(json.dumps(ev))
    path.write_text("\n".join(out) + "\n")
    return set(ids)


async def open_fails(cfg: Config) -> tuple[StorylineError, float, int]:
    """Open a store that must fail: the error, the seconds it took, the retries made."""
    store = make_store(cfg)
    t0 = time.monotonic()
    try:
        await store.open()
    except StorylineError as exc:
        assert isinstance(store, cql_store.CqlStore)
        return exc, time.monotonic() - t0, store.stats.retries
    finally:
        await store.close()
    raise AssertionError("the store opened")


def everything_about(exc: BaseException) -> str:
    """What a log or a crash report could show of an exception: message, repr, the whole chain."""
    return f"{exc}\n{exc!r}\n{''.join(traceback.format_exception(exc))}"


# -- masking, without a node ------------------------------------------------------------------------------------
def test_a_password_inside_an_error_is_masked_by_the_store_and_by_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pw = secret()
    err = cql_store.classify(RuntimeError(f"IO Error: Connection reset while sending {pw}"), "write", [pw])
    assert err.retriable and pw not in str(err) and "***" in str(err)

    def leaky_store(cfg: Config, *args: Any) -> Any:
        raise StoreError(f"the driver said something with {cfg.store.password} in it")

    monkeypatch.setattr("engine.cli.make_store", leaky_store)
    args = [
        "--set",
        "tenant=x",
        "--set",
        "store.backend=cql",
        "--set",
        "store.username=u",
        "--set",
        f"store.password={pw}",
    ]
    assert cli_main(["status", *args]) == 1
    out = capsys.readouterr()
    assert pw not in out.out + out.err and "something with *** in it" in out.err


# -- logins -----------------------------------------------------------------------------------------------------
@pytest.mark.cql
def test_a_role_with_a_password_creates_its_keyspace_and_reads_back_what_it_wrote(auth_node: AuthNode) -> None:
    role, pw, tenant = f"app_{uuid.uuid4().hex[:8]}", secret(), new_tenant()
    cfg = cfg_for(auth_node.addr, tenant, (role, pw))

    async def body() -> None:
        async with session(auth_node.addr) as db:
            await make_role(db, role, pw, "CREATE ON ALL KEYSPACES")  # the creator then owns its keyspace
        store = make_store(cfg)
        try:
            await store.open()
            did = await store.init_schema()
            assert f"created keyspace {tenant} with replication" in did[0]
            bucket = int(time.time() * 1000) // cfg.bucket_ms
            await store.append(3, bucket, [EventRecord("e-1", b"one"), EventRecord("e-2", b"two")])
            got = [(e.event_id, e.payload) async for page in store.read_partition(3, bucket) for e in page.events]
            assert got == [("e-1", b"one"), ("e-2", b"two")]
            async with session(auth_node.addr) as db:
                users = {r["username"] for r in await q(db, "SELECT username FROM system_views.clients")}
            assert role in users  # the node saw the store log in as the role
            await store.drop_schema()  # the owner may drop it too
        finally:
            await store.close()
            async with session(auth_node.addr) as db:
                await q(db, f"DROP KEYSPACE IF EXISTS {tenant}")
                await q(db, f"DROP ROLE IF EXISTS {role}")

    arun(body())


@pytest.mark.cql
@pytest.mark.parametrize("login", ["wrong password", "no password"])
def test_a_wrong_or_missing_password_is_refused_at_once_and_never_shown(
    auth_node: AuthNode, login: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = secret()
    creds = (SUPERUSER[0], wrong) if login == "wrong password" else None
    cfg = cfg_for(auth_node.addr, new_tenant(), creds, store={"max_retries": 6})
    err, took, retries = arun(open_fails(cfg))
    text = str(err)
    assert "authentication failed" in text
    if creds:
        assert "refused the credentials" in text and "check store.username and store.password" in text
    else:
        assert "requires a username and password (set store.username and store.password)" in text
    assert not err.retriable and retries == 0 and took < 3, (err, took, retries)  # no retry storm: one attempt
    assert wrong not in everything_about(err) + caplog.text


# -- TLS --------------------------------------------------------------------------------------------------------
@pytest.mark.cql
def test_tls_with_the_ca_file_reaches_the_driver_and_encrypts_the_connection(
    auth_node: AuthNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    given: list[dict[str, Any]] = []
    real = Scylla  # what engine.store.cql calls, before the patch below

    def recording_scylla(contact_points: list[str], **kwargs: Any) -> Scylla:
        given.append(kwargs)
        return real(contact_points, **kwargs)

    monkeypatch.setattr(cql_store, "Scylla", recording_scylla)
    role, pw = f"tls_{uuid.uuid4().hex[:8]}", secret()
    cfg = cfg_for(auth_node.addr, new_tenant(), (role, pw), store={"tls_ca_file": auth_node.ca_file})

    async def body() -> list[dict[str, Any]]:
        async with session(auth_node.addr) as db:
            await make_role(db, role, pw)
        store = make_store(cfg)
        try:
            await store.open()
            assert abs(await store.server_time_ms() - time.time() * 1000) < 60_000
            async with session(auth_node.addr) as db:  # this admin session itself is plaintext
                rows = await q(db, "SELECT username, ssl_enabled, ssl_protocol FROM system_views.clients")
            return [r for r in rows if r["username"] == role]
        finally:
            await store.close()
            async with session(auth_node.addr) as db:
                await q(db, f"DROP ROLE IF EXISTS {role}")

    mine = arun(body())
    kwargs = given[-1]
    assert kwargs["ssl_ca_file"] == auth_node.ca_file and kwargs["ssl_verify_mode"] == SSLVerifyMode.PEER
    assert "-----BEGIN CERTIFICATE-----" in kwargs["ssl_cert"]  # without it scyllapy stays plaintext
    assert mine, "the node lists no connection of the TLS role"
    assert all(r["ssl_enabled"] and str(r["ssl_protocol"]).startswith("TLSv1.") for r in mine), mine


@pytest.mark.cql
def test_tls_fails_clearly_with_a_ca_that_did_not_sign_the_node_or_an_unreadable_ca_file(
    auth_node: AuthNode, tmp_path: Path
) -> None:
    foreign = tmp_path / "foreign-ca.pem"
    foreign.write_text(FOREIGN_CA)
    fast_fail = {"max_retries": 1, "retry_base_ms": 10, "retry_max_ms": 20}
    cfg = cfg_for(auth_node.addr, new_tenant(), SUPERUSER, store={"tls_ca_file": str(foreign), **fast_fail})
    err, took, retries = arun(open_fails(cfg))
    assert "TLS is on" in str(err) and str(foreign) in str(err), err
    assert retries <= 1 and took < 10
    for path, problem in ((tmp_path / "missing.pem", "cannot read"), (tmp_path / "x.txt", "holds no PEM certificate")):
        if path.name == "x.txt":
            path.write_text("not a certificate\n")
        cfg = cfg_for(auth_node.addr, new_tenant(), SUPERUSER, store={"tls_ca_file": str(path)})
        bad, _, _ = arun(open_fails(cfg))
        assert isinstance(bad, ConfigError) and bad.key == "store.tls_ca_file" and problem in str(bad), bad


@pytest.mark.cql
def test_tls_to_a_plaintext_only_node_fails_clearly(auth_node: AuthNode) -> None:
    require_cql()  # the main node serves no TLS at all
    cfg = cfg_for(
        CQL_ADDR,
        new_tenant(),
        store={"tls_ca_file": auth_node.ca_file, "max_retries": 1, "retry_base_ms": 10, "retry_max_ms": 20},
    )
    err, took, retries = arun(open_fails(cfg))
    assert f"connect to {CQL_ADDR}" in str(err) and "TLS is on" in str(err), err
    assert retries <= 1 and took < 10


# -- secrets, and a tenant's role that may only touch its own keyspace ------------------------------------------
@pytest.mark.cql
def test_secrets_stay_out_of_every_output_while_a_tenant_role_runs_the_engine_in_its_keyspace_only(
    auth_node: AuthNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine, other = new_tenant(), new_tenant()
    role, pw, wrong = f"tenant_{uuid.uuid4().hex[:8]}", secret(), secret()
    admin = {t: cfg_for(auth_node.addr, t, SUPERUSER, **FAST) for t in (mine, other)}

    async def setup() -> None:
        async def init(cfg: Config) -> None:
            store = make_store(cfg)
            await store.open()
            try:
                await store.init_schema()
            finally:
                await store.close()

        await asyncio.gather(*(init(c) for c in admin.values()))  # both keyspaces made by the administrator
        async with session(auth_node.addr) as db:
            await make_role(db, role, pw, f"SELECT ON KEYSPACE {mine}", f"MODIFY ON KEYSPACE {mine}")

    outputs: list[str] = []
    wrong_login: StorylineError | None = None

    def cli(*args: str, config: Path, expect: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        res = storyline(*args, "--config", str(config))
        outputs.append(f"$ storyline {' '.join(args)}\n{res.stdout}\n{res.stderr}")
        assert res.returncode in expect, f"storyline {args[0]}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res

    try:
        arun(setup())
        conf = toml_config(tmp_path / "tenant.toml", auth_node.addr, mine, (role, pw))
        shown = cli("config", config=conf).stdout
        assert "store.password = '***'" in shown and f"store.username = '{role}'" in shown
        cli("init", config=conf)  # already initialized: nothing to create, so SELECT and MODIFY suffice
        want = write_input(tmp_path / "in.jsonl", mine)
        cli("ingest", str(tmp_path / "in.jsonl"), config=conf)
        time.sleep(FAST["lag_ms"] / 1000 + 0.3)
        run = cli("run", "--until-idle", "--drain", "--workers", "1", "--log-level", "DEBUG", config=conf)
        assert " supervisor DEBUG " in run.stderr and re.search(r" worker \S+ DEBUG ", run.stderr)  # really DEBUG
        # the role reads every shard's offset; whether the drained engine is still within 2 x lag of the clock
        # (healthy, exit 0) depends on the machine's load, not on access (test_runtime checks health)
        report = json.loads(cli("status", "--json", config=conf, expect=(0, 1)).stdout)
        assert report["summary"]["shards_without_offset"] == 0
        assert all(r["read_bucket"] is not None and r["owner"] for r in report["shards"]), report["shards"]
        stories = [json.loads(line) for line in cli("stories", "--format", "jsonl", config=conf).stdout.splitlines()]
        assert {i for s in stories for i in s["event_ids"]} == want
        cli("verify", config=conf)
        refused = cli(
            "status", config=toml_config(tmp_path / "wrong.toml", auth_node.addr, mine, (role, wrong)), expect=(1,)
        )
        assert "authentication failed" in refused.stderr and "Traceback" not in refused.stderr

        async def in_process() -> StorylineError:
            store = make_store(cfg_for(auth_node.addr, mine, (role, pw), **FAST))
            await store.open()
            try:
                assert len(await store.read_offsets("main", range(8))) == 8
            finally:
                await store.close()
            # the node refuses the role in the other tenant's keyspace: a clear, non-retriable error
            denied, _, retries = await open_fails(cfg_for(auth_node.addr, other, (role, pw)))
            assert "permission denied" in str(denied) and other in str(denied), denied
            assert not denied.retriable and retries == 0
            wrong_login, _, _ = await open_fails(cfg_for(auth_node.addr, mine, (role, wrong)))
            return wrong_login

        caplog.set_level(logging.DEBUG)
        wrong_login = arun(in_process())

        async def other_tables() -> dict[str, int]:
            async with session(auth_node.addr) as db:
                sql = "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?"
                tables = {r["table_name"] for r in await q(db, sql, [other])} - {"meta"}
                assert {"events", "bucket_index", "read_offsets", "stories"} <= tables
                return {t: len(await q(db, f"SELECT * FROM {other}.{t} LIMIT 10")) for t in sorted(tables)}

        untouched = arun(other_tables())  # the other tenant's keyspace got no row from this tenant's engine
        assert set(untouched.values()) == {0}, untouched
    finally:

        async def cleanup() -> None:
            async with session(auth_node.addr) as db:
                for t in (mine, other):
                    await q(db, f"DROP KEYSPACE IF EXISTS {t}")
                await q(db, f"DROP ROLE IF EXISTS {role}")

        arun(cleanup())
    assert wrong_login is not None and len(outputs) == 8
    seen = "\n".join(outputs) + caplog.text + everything_about(wrong_login)
    assert pw not in seen and wrong not in seen


# -- two tenants on one database --------------------------------------------------------------------------------
@pytest.mark.cql
def test_two_tenants_at_the_same_time_on_one_database_keep_to_their_own_keyspaces(tmp_path: Path) -> None:
    require_cql()
    tenants = [new_tenant(), new_tenant()]
    conf = {t: toml_config(tmp_path / f"{t}.toml", CQL_ADDR, t) for t in tenants}
    want = {t: write_input(tmp_path / f"{t}.jsonl", t) for t in tenants}  # the same traffic, tenant-named ids

    def together(*argsets: tuple[str, ...]) -> list[subprocess.Popen[str]]:
        procs = [spawn(*a) for a in argsets]
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, f"{p.args!r}: exit {p.returncode}\n{out}\n{err}"
        return procs

    try:
        together(*(("init", "--config", str(conf[t])) for t in tenants))
        together(*(("ingest", "--config", str(conf[t]), str(tmp_path / f"{t}.jsonl")) for t in tenants))
        time.sleep(FAST["lag_ms"] / 1000 + 0.3)
        runs = together(*(("run", "--config", str(conf[t]), "--until-idle", "--drain") for t in tenants))
        run_pid = {t: str(p.pid) for t, p in zip(tenants, runs, strict=True)}
        arun(check_isolation(tenants, want, run_pid))
    finally:
        for t in tenants:
            arun(drop_tenant(cfg_for(CQL_ADDR, t, None, **FAST)))


async def check_isolation(tenants: list[str], want: dict[str, set[str]], run_pid: dict[str, str]) -> None:
    """From the data: every table of each keyspace holds its own tenant's rows and nothing else."""
    assert not set.intersection(*want.values())  # disjoint by construction
    async with session(CQL_ADDR, None) as db:
        for t in tenants:
            events = await q(db, f"SELECT shard, bucket, event_id FROM {t}.events")
            assert {r["event_id"] for r in events} == want[t]  # all of its own events, none of the other's
            partitions = {(r["shard"], r["bucket"]) for r in events}
            index = {(r["shard"], r["bucket"]) for r in await q(db, f"SELECT shard, bucket FROM {t}.bucket_index")}
            assert index == partitions  # the index lists exactly this keyspace's partitions
            latest: dict[str, dict[str, Any]] = {}
            for r in await q(db, f"SELECT story_id, revision, body FROM {t}.stories"):
                body = json.loads(r["body"])
                assert set(body.get("event_ids", [])) <= want[t], f"{t}: a story holds another tenant's events"
                if r["revision"] >= latest.get(r["story_id"], {}).get("revision", -1):
                    latest[r["story_id"]] = {"revision": r["revision"], "body": body}
            live = [s["body"] for s in latest.values() if not s["body"].get("merged_into")]
            assert {i for b in live for i in b["event_ids"]} == want[t]
            offsets = await q(db, f"SELECT consumer, shard, owner FROM {t}.read_offsets")
            assert sorted(r["shard"] for r in offsets) == list(range(8))
            assert {r["consumer"] for r in offsets} == {"main"}
            assert {r["owner"].split(":")[1] for r in offsets} == {run_pid[t]}  # this tenant's own run
            assert await q(db, f"SELECT dl_id FROM {t}.dead_letter") == []
            meta = {r["key"]: r["value"] for r in await q(db, f"SELECT key, value FROM {t}.meta")}
            assert meta["tenant"] == t
        # The statements: both keyspaces have the same tables (the schema's, nothing else was created in either),
        # and every statement the stores prepared (Cassandra keeps them in system.prepared_statements) names the
        # tables of one tenant's keyspace only.
        schema = [
            {
                r["table_name"]
                for r in await q(db, "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?", [t])
            }
            for t in tenants
        ]
        tables = schema[0]
        assert schema[1] == tables and {"events", "bucket_index", "read_offsets", "stories", "meta"} <= tables
        try:
            prepared = [r["query_string"] for r in await q(db, "SELECT query_string FROM system.prepared_statements")]
        except ScyllaPyBaseError:  # ScyllaDB keeps no such table; the data checks above stand on their own there
            return
        named: dict[str, set[str]] = {t: set() for t in tenants}
        for text in prepared:
            refs = set(re.findall(r"\b(t_[0-9a-f]{20})\.(\w+)", text))
            mine = {ks for ks, _ in refs} & set(tenants)
            if mine:
                assert len({ks for ks, _ in refs}) == 1, f"a statement names two keyspaces: {text}"
                named[mine.pop()] |= {tb for _, tb in refs}
        for t in tenants:  # the statements of both stores were seen, and name only schema tables
            assert {"events", "bucket_index", "read_offsets", "stories", "meta"} <= named[t] <= tables, named
