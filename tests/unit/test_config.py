from __future__ import annotations

from pathlib import Path

import pytest

from engine.core.config import Config, from_mapping, load, parse_override
from engine.core.errors import ConfigError


def cfg(**kw: object) -> Config:
    return from_mapping({"tenant": "acme", **kw})


def test_defaults_are_valid_and_frozen() -> None:
    c = cfg()
    assert c.store.backend == "embedded"
    assert c.store.consistency == "LOCAL_QUORUM"
    assert c.store.serial_consistency == "LOCAL_SERIAL"
    assert c.correlate.match_window_ms == 30_000
    assert c.lag_ms >= c.max_write_age_ms + c.request_timeout_ms + c.max_clock_skew_ms + c.bucket_ms
    with pytest.raises(AttributeError):
        c.shards = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["a", "acme", "a_b_9", "x" * 48])
def test_valid_tenants(name: str) -> None:
    assert cfg(tenant=name).keyspace == name


@pytest.mark.parametrize(
    "name",
    ["", "Acme", "9abc", "_x", "a-b", "a b", "x" * 49, "a;drop keyspace x", "a'b", "é"],
)
def test_bad_tenants_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(tenant=name)
    assert info.value.key == "tenant"


@pytest.mark.parametrize(
    ("tree", "key"),
    [
        ({"shards": 0}, "shards"),
        ({"shards": "8"}, "shards"),
        ({"store": {"consistency": "FOO"}}, "store.consistency"),
        ({"store": {"backend": "mysql"}}, "store.backend"),
        ({"store": {"contact_points": ["nohost"]}}, "store.contact_points"),
        ({"store": {"contact_points": []}}, "store.contact_points"),
        ({"store": {"username": "u"}}, "store.password"),
        ({"store": {"replication": {"strategy": "NetworkTopologyStrategy"}}}, "store.replication.datacenters"),
        (
            {"store": {"replication": {"strategy": "NetworkTopologyStrategy", "datacenters": {"d'c": 3}}}},
            "store.replication.datacenters",
        ),
        ({"correlate": {"emit": "sometimes"}}, "correlate.emit"),
        ({"correlate": {"offsets": {"epoch_ms": 1_500}}}, "correlate.offsets.epoch_ms"),
        ({"correlate": {"offsets": {"epoch_ms": 25_000}}, "bucket_ms": 2_000}, "correlate.offsets.epoch_ms"),
        ({"correlate": {"offsets": {"min_samples": 0}}}, "correlate.offsets.min_samples"),
        ({"correlate": {"offsets": {"guess": True}}}, "correlate.offsets.guess"),
        ({"correlate": {"max_offset_ms": 0}}, "correlate.max_offset_ms"),
        ({"lag_ms": 1000}, "lag_ms"),
        ({"ttl_ms": 3_600_000}, "ttl_ms"),
        ({"ttl_ms": 200_000_000_001}, "ttl_ms"),
        ({"twcs_window_ms": 90_000}, "twcs_window_ms"),
        ({"drain_timeout_ms": 15_000}, "drain_timeout_ms"),
        ({"drain_timeout_ms": 0}, "drain_timeout_ms"),
        ({"lag_ms": 200_000}, "drain_timeout_ms"),
        ({"commit_interval_ms": 120_000}, "drain_timeout_ms"),
        ({"poll_interval_ms": -1}, "poll_interval_ms"),
        ({"poll_interval_ms": 60_001}, "poll_interval_ms"),
        ({"twcs_window_ms": 600_000}, "twcs_window_ms"),
        ({"unknown_key": 1}, "unknown_key"),
        ({"store": {"bogus": 1}}, "store.bogus"),
        ({"store": {"page_bytes_max": 1024 * 1024}, "chunk_bytes": 1024 * 1024}, "store.page_bytes_max"),
    ],
)
def test_errors_name_the_key(tree: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(**tree)
    assert info.value.key == key, str(info.value)


def test_missing_tenant_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({})
    assert info.value.key == "tenant"
    assert "missing" in info.value.problem


def test_lag_rule_boundary() -> None:
    need = 5_000 + 5_000 + 1_000 + 1_000
    assert cfg(lag_ms=need).lag_ms == need
    with pytest.raises(ConfigError, match="lag_ms"):
        cfg(lag_ms=need - 1)


def test_drain_timeout_rule_boundary() -> None:
    """drain_timeout_ms must exceed lag_ms and commit_interval_ms (a drain must not give up on a worker that is
    healthy but has not committed yet); the default, 120 s, holds with the default lag and interval."""
    c = cfg()
    assert c.drain_timeout_ms == 120_000 and c.drain_timeout_ms > max(c.lag_ms, c.commit_interval_ms)
    assert cfg(drain_timeout_ms=15_001).drain_timeout_ms == 15_001  # lag_ms is 15,000 by default
    with pytest.raises(ConfigError) as info:
        cfg(drain_timeout_ms=15_000)
    assert info.value.key == "drain_timeout_ms" and "lag_ms (15000)" in info.value.problem
    assert cfg(lag_ms=200_000, drain_timeout_ms=200_001).drain_timeout_ms == 200_001
    assert cfg(commit_interval_ms=30_000, drain_timeout_ms=30_001).commit_interval_ms == 30_000
    with pytest.raises(ConfigError) as info:
        cfg(lag_ms=20_000, commit_interval_ms=30_000, drain_timeout_ms=30_000)
    assert info.value.key == "drain_timeout_ms" and "commit_interval_ms (30000)" in info.value.problem
    with pytest.raises(ConfigError) as info:
        load(None, ["tenant=acme", "drain_timeout_ms=5s"])
    assert info.value.key == "drain_timeout_ms"


def test_twcs_window_count_limit() -> None:
    # 48 h of TTL in 1 h windows: 48 windows, fine; 30 min windows: 96, refused with a suggestion
    assert cfg(ttl_ms=48 * 3_600_000, twcs_window_ms=3_600_000).ttl_ms == 48 * 3_600_000
    with pytest.raises(ConfigError, match="at most 50") as info:
        cfg(ttl_ms=48 * 3_600_000, twcs_window_ms=1_800_000)
    assert "twcs_window_ms >=" in str(info.value)


def test_network_topology_replication_literal() -> None:
    c = cfg(
        store={
            "backend": "cql",
            "replication": {"strategy": "NetworkTopologyStrategy", "datacenters": {"dc2": 3, "dc1": 2}},
        }
    )
    assert c.store.replication.cql() == "{'class': 'NetworkTopologyStrategy', 'dc1': 2, 'dc2': 3}"
    assert cfg().store.replication.cql() == "{'class': 'SimpleStrategy', 'replication_factor': 1}"


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("shards=32", "shards", 32),
        ('store.contact_points=["h1:9042"]', "store.contact_points", ["h1:9042"]),
        ("store.path=/tmp/x.db", "store.path", "/tmp/x.db"),
        ("store.backend=cql", "store.backend", "cql"),
        ('tenant="quoted"', "tenant", "quoted"),
        ("flag=true", "flag", True),
        ("x=", "x", ""),
        ("a.b=1 2", "a.b", "1 2"),
    ],
)
def test_parse_override(item: str, key: str, value: object) -> None:
    assert parse_override(item) == (key, value)


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(ConfigError):
        parse_override("shards")


def test_load_file_overrides_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.toml"
    f.write_text('tenant = "acme"\nshards = 4\n[store]\npath = "data/s.db"\n')
    monkeypatch.chdir(tmp_path)
    c = load(f, ["shards=8", "correlate.emit=updates"])
    assert c.shards == 8
    assert c.correlate.emit == "updates"
    assert c.store.path == str(tmp_path / "data" / "s.db")


def test_load_reports_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("tenant = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)
    with pytest.raises(ConfigError) as info:
        load(None, ["tenant=acme", "shards.x=1"])
    assert info.value.key == "shards"


def test_password_never_in_repr() -> None:
    c = cfg(store={"backend": "cql", "username": "u", "password": "s3cret-pw"})
    assert "s3cret-pw" not in repr(c)
    assert "s3cret-pw" not in repr(c.store)
    assert "s3cret-pw" not in str(c)


def test_a_mistyped_set_item_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        parse_override("store.password:hunter2-secret")
    assert "hunter2" not in str(err.value) and err.value.key == "--set"


def test_password_file_is_read_at_load_and_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret-pw\nignored second line\n")
    monkeypatch.chdir(tmp_path)
    c = load(None, ["tenant=acme", "store.backend=cql", "store.username=u", "store.password_file=pw"])
    assert c.store.password == "s3cret-pw" and c.store.password_file is None  # relative to the cwd, first line
    assert "s3cret-pw" not in repr(c)
    import msgspec

    assert from_mapping(msgspec.to_builtins(c)).store.password == "s3cret-pw"  # what workers are given


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"username": "u", "password": "a", "password_file": "pw"}, "not both"),
        ({"username": "u", "password_file": "missing"}, "cannot read"),
        ({"username": "u", "password_file": "empty"}, "is empty"),
        ({"password_file": "pw"}, "username and password go together"),
    ],
)
def test_password_file_errors_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: dict[str, str], message: str
) -> None:
    (tmp_path / "pw").write_text("s3cret-pw\n")
    (tmp_path / "empty").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        from_mapping({"tenant": "acme", "store": {"backend": "cql", **store}})
    assert info.value.key in ("store.password_file", "store.username") and "s3cret" not in str(info.value)
