from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine.tools.tune as tune
from engine.cli import main
from engine.core.config import MAX_TWCS_WINDOWS, Config, from_mapping, load
from engine.core.errors import ConfigError
from engine.tools.tune import Capacity, recommend, to_toml, twcs_window_ms

ROOT = Path(__file__).resolve().parents[2]
HOUR_MS = 3_600_000

rates = st.floats(min_value=1e-3, max_value=tune.MAX_RATE, allow_nan=False)
sizes = st.floats(min_value=1.0, max_value=tune.MAX_AVG_BYTES, allow_nan=False)
retentions = st.floats(min_value=1e-3, max_value=tune.MAX_RETENTION_H, allow_nan=False)
backends = st.sampled_from([None, "cql", "embedded"])
cores = st.integers(min_value=1, max_value=512)


def loaded(tree: dict[str, Any], reasons: dict[str, list[str]]) -> Config:
    """The tree loads, and so does its TOML text, to the same config."""
    cfg = from_mapping(tree)
    text = to_toml(tree, reasons)
    assert tomllib.loads(text) == tree
    assert from_mapping(tomllib.loads(text)) == cfg
    return cfg


@settings(max_examples=300, deadline=None)
@given(rates, sizes, retentions, backends, cores)
def test_every_recommendation_loads_and_obeys_the_rules(
    rate: float, size: float, retention: float, backend: Any, n_cores: int
) -> None:
    tree, reasons = recommend(rate, size, retention, backend, Capacity(cores=n_cores))
    cfg = loaded(tree, reasons)
    assert cfg.lag_ms >= cfg.max_write_age_ms + cfg.request_timeout_ms + cfg.max_clock_skew_ms + cfg.bucket_ms
    assert cfg.ttl_ms >= retention * HOUR_MS - 1000  # whole seconds
    assert -(-cfg.ttl_ms // cfg.twcs_window_ms) <= MAX_TWCS_WINDOWS
    assert cfg.shards >= 16 and cfg.shards & (cfg.shards - 1) == 0
    assert 1 <= cfg.workers <= min(n_cores, cfg.shards)
    if backend is not None:
        assert cfg.store.backend == backend
    if cfg.store.backend == "cql":
        assert cfg.store.consistency == "LOCAL_QUORUM"
        assert cfg.store.replication.datacenters == {"datacenter1": 3}
    assert "" in reasons and all(isinstance(line, str) for lines in reasons.values() for line in lines)


@settings(max_examples=300, deadline=None)
@given(rates, rates, sizes, backends, cores)
def test_more_rate_never_means_fewer_shards_or_workers(
    r1: float, r2: float, size: float, backend: Any, n_cores: int
) -> None:
    lo, hi = sorted((r1, r2))
    cap = Capacity(cores=n_cores)
    a, _ = recommend(lo, size, 48, backend, cap)
    b, _ = recommend(hi, size, 48, backend, cap)
    assert b["shards"] >= a["shards"]
    assert b["workers"] >= a["workers"]


@pytest.mark.parametrize(
    ("retention_h", "ttl_ms", "window_ms"),
    [
        (48, 48 * HOUR_MS, HOUR_MS),  # 48 windows of 1 h
        (72, 72 * HOUR_MS, 2 * HOUR_MS),  # 36 of 2 h
        (168, 168 * HOUR_MS, 4 * HOUR_MS),  # 42 of 4 h
        (24 * 30, 24 * 30 * HOUR_MS, 24 * HOUR_MS),  # 30 of 1 d
        (24 * 365, 24 * 365 * HOUR_MS, 8 * 24 * HOUR_MS),  # 46 of 8 d
        (1, 32 * HOUR_MS, HOUR_MS),  # raised to the TTL rule (31.2 h with the defaults), whole hours
    ],
)
def test_retention_becomes_ttl_and_twcs_windows(retention_h: float, ttl_ms: int, window_ms: int) -> None:
    tree, reasons = recommend(100, 500, retention_h)
    assert (tree["ttl_ms"], tree["twcs_window_ms"]) == (ttl_ms, window_ms)
    loaded(tree, reasons)
    if retention_h == 1:
        assert any("raised" in line for line in reasons["ttl_ms"])


@given(st.integers(min_value=1, max_value=int(tune.MAX_RETENTION_H * HOUR_MS)))
def test_twcs_window_is_whole_minutes_and_at_most_50_per_ttl(ttl_ms: int) -> None:
    w = twcs_window_ms(ttl_ms)
    assert w % 60_000 == 0 and w >= HOUR_MS
    assert -(-ttl_ms // w) <= MAX_TWCS_WINDOWS


def test_backend_choice_and_consistency() -> None:
    small, _ = recommend(100, 500)
    assert small["store"]["backend"] == "embedded" and small["bucket_ms"] == 60_000  # long buckets: cheap idle
    big, _ = recommend(5_000, 500)
    assert big["store"]["backend"] == "cql"
    assert big["store"]["consistency"] == "LOCAL_QUORUM" and big["store"]["serial_consistency"] == "LOCAL_SERIAL"
    assert big["store"]["replication"] == {"strategy": "NetworkTopologyStrategy", "datacenters": {"datacenter1": 3}}
    # a single local node (the development config) keeps RF 1 and reads and writes at ONE
    base = load(ROOT / "configs" / "cassandra-local.toml")
    dev, reasons = recommend(5_000, 500, backend="cql", base=base)
    assert dev["store"]["consistency"] == "ONE" and dev["store"]["replication"]["replication_factor"] == 1
    assert dev["store"]["contact_points"] == ["127.0.0.1:9042"] and dev["tenant"] == "dev"
    loaded(dev, reasons)
    # a large rate on the embedded store is allowed when asked for, with a warning
    forced, reasons = recommend(50_000, 500, backend="embedded")
    assert forced["store"]["backend"] == "embedded" and any("WARNING" in r for r in reasons["store.backend"])


def test_partitions_stay_bounded() -> None:
    for rate in (1, 100, 5_000, 50_000, 500_000, 5_000_000):
        for size in (100, 500, 5_000, 100_000):
            tree, _ = recommend(rate, size)
            stored = size * Capacity().payload_ratio + tune.ROW_OVERHEAD_BYTES
            per_partition = rate / tree["shards"] * tree["bucket_ms"] / 1000
            assert per_partition * stored <= tune.PARTITION_MAX_BYTES
            assert per_partition <= tune.PARTITION_MAX_ROWS
            if rate * size <= 1e11:  # below 65,536 shards x 4 MiB/s: shards grow first, buckets stay >= 1 s
                assert tree["bucket_ms"] >= 1_000


def test_the_base_config_is_kept_and_secrets_are_not_printed() -> None:
    base = from_mapping(
        {
            "tenant": "acme",
            "consumer": "blue",
            "metrics_port": 9100,
            "downtime_allowance_ms": 3_600_000,
            "store": {
                "backend": "cql",
                "contact_points": ["10.0.0.1:9042"],
                "username": "u",
                "password": "hunter2pw",
                "replication": {"strategy": "NetworkTopologyStrategy", "datacenters": {"eu-west": 3}},
            },
            "correlate": {
                "max_wait_ms": 120_000,
                "merge": {"bytes": "sum", "odd key \u007f\"'": "set"},
                "sensor_offsets_ms": {"fw-1": -200},
            },
        }
    )
    tree, reasons = recommend(5_000, 500, 1, "cql", base=base)
    cfg = loaded(tree, reasons)
    text = to_toml(tree, reasons)
    assert "hunter2pw" not in text and "username" not in tree["store"]
    assert any("store.password" in line for line in reasons[""])
    assert (cfg.tenant, cfg.consumer, cfg.metrics_port) == ("acme", "blue", 9100)
    assert cfg.store.contact_points == ["10.0.0.1:9042"]
    assert cfg.store.replication.datacenters == {"eu-west": 3}
    assert cfg.correlate.max_wait_ms == 120_000 and cfg.correlate.merge == base.correlate.merge
    assert cfg.correlate.sensor_offsets_ms == {"fw-1": -200}
    # the inputs of the rules come from the base: a shorter downtime allowance gives a shorter TTL
    assert cfg.ttl_ms == 9 * HOUR_MS  # lag + 6 h + 2 min + 1 h + 1 h = 8.04 h, up to whole hours
    assert cfg.bucket_ms <= 12_000  # at most a tenth of max_wait_ms


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--events-per-sec", "-5", "--avg-event-bytes", "500"], "--events-per-sec"),
        (["--events-per-sec", "0", "--avg-event-bytes", "500"], "--events-per-sec"),
        (["--events-per-sec", "nan", "--avg-event-bytes", "500"], "--events-per-sec"),
        (["--events-per-sec", "100", "--avg-event-bytes", "0"], "--avg-event-bytes"),
        (["--events-per-sec", "100", "--avg-event-bytes", "-1"], "--avg-event-bytes"),
        (["--events-per-sec", "100", "--avg-event-bytes", "500", "--retention-hours", "0"], "--retention-hours"),
        (["--events-per-sec", "100", "--avg-event-bytes", "500", "--cores", "0"], "--cores"),
        (["--events-per-sec", "100", "--avg-event-bytes", "500", "--config", "/nonexistent/c.toml"], "--config"),
        (["--events-per-sec", "100", "--avg-event-bytes", "500", "--set", "tenant=Bad"], "tenant"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_flag(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STORYLINE_CONFIG", raising=False)
    assert main(["tune", *args]) == 2
    captured = capsys.readouterr()
    assert f"config error: {flag}" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    "args",
    [
        ["--avg-event-bytes", "500"],  # --events-per-sec missing
        ["--events-per-sec", "abc", "--avg-event-bytes", "500"],
        ["--events-per-sec", "100", "--avg-event-bytes", "500", "--backend", "kafka"],
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["tune", *args])
    assert exc.value.code == 2
    capsys.readouterr()


def test_cli_prints_a_loadable_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STORYLINE_CONFIG", raising=False)
    assert main(["tune", "--events-per-sec", "5000", "--avg-event-bytes", "500", "--cores", "4"]) == 0
    out = capsys.readouterr().out
    f = tmp_path / "c.toml"
    f.write_text(out)
    cfg = load(f)
    assert cfg.store.backend == "cql" and cfg.workers >= 1
    assert out.startswith("# Recommended by `storyline tune --events-per-sec 5000")
    # with a base config: its tenant and embedded path (relative to the current directory) are kept
    monkeypatch.chdir(tmp_path)
    args = ["--set", "tenant=acme", "--set", "store.path=data/x.db"]
    assert main(["tune", "--events-per-sec", "10", "--avg-event-bytes", "300", *args]) == 0
    tree = tomllib.loads(capsys.readouterr().out)
    assert tree["tenant"] == "acme" and tree["store"]["path"] == "data/x.db"


def test_cli_measure_uses_the_measured_capacity(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STORYLINE_CONFIG", raising=False)
    seen: list[float] = []

    def fake(avg_bytes: float, cores: int | None = None, story_events: int = 0) -> Capacity:
        seen.append(avg_bytes)
        return Capacity(cores=cores or 1, story_per_core=1_000.0, source="fake", notes=("measured: fake",))

    monkeypatch.setattr(tune, "measure", fake)
    assert main(["tune", "--events-per-sec", "5000", "--avg-event-bytes", "700", "--measure", "--cores", "64"]) == 0
    out = capsys.readouterr().out
    assert seen == [700.0] and "# measured: fake" in out and "--measure`" in out.split("\n\n")[0]
    # 1,000 stories/s per core: 5,000 x 2 headroom needs >= 10 workers
    assert tomllib.loads(out)["workers"] >= 10


def test_measure_runs_here() -> None:
    """A small real calibration (large lines, few simulated events: about a second)."""
    cap = tune.measure(100_000, cores=2, story_events=3_000)
    for name in ("ingest_per_core", "story_per_core", "payload_ratio", "story_bytes_per_event"):
        assert math.isfinite(getattr(cap, name)) and getattr(cap, name) > 0
    assert 50_000 < cap.ingest_ref_bytes < 150_000 and cap.notes
    tree, reasons = recommend(1_000, 100_000, 48, None, cap)
    loaded(tree, reasons)


@pytest.mark.parametrize("name", ["small", "medium", "large"])
def test_shipped_configs_are_what_tune_prints(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STORYLINE_CONFIG", raising=False)
    path = ROOT / "configs" / f"{name}.toml"
    text = path.read_text()
    header = " ".join(ln[2:] for ln in text.splitlines() if ln.startswith("# "))
    m = re.search(r"`storyline tune ([^`]*)`", header)
    assert m, f"{path} does not say which tune command made it"
    load(path)
    assert main(["tune", *m.group(1).split()]) == 0
    assert capsys.readouterr().out == text, f"{path} differs from `storyline tune {m.group(1)}`: regenerate it"


def test_recommend_rejects_bad_input_naming_the_flag() -> None:
    with pytest.raises(ConfigError) as exc:
        recommend(-1, 500)
    assert exc.value.key == "--events-per-sec"
    with pytest.raises(ConfigError) as exc:
        recommend(1, 0)
    assert exc.value.key == "--avg-event-bytes"
    with pytest.raises(ConfigError) as exc:
        recommend(1, 1, math.inf)
    assert exc.value.key == "--retention-hours"
