from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_bad_config_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('tenant = "ok"\n[store]\nconsistency = "SOMETIMES"\n')
    assert main(["init", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "store.consistency" in err and "Traceback" not in err
    assert main(["init", "--config", str(f), "--set", "store.consistency=ONE", "--set", "tenant=Bad"]) == 2
    assert "tenant" in capsys.readouterr().err


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["init", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_password_on_the_command_line_is_warned_about_and_never_printed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["--set", "tenant=pw", "--set", "store.backend=cql", "--set", "store.username=u"]
    assert main(["config", *args, "--set", "store.password=hunter2-secret"]) == 0
    out, err = capsys.readouterr()
    assert "store.password_file" in err and "process list" in err
    assert "hunter2" not in out + err
    (tmp_path / "pw").write_text("hunter2-secret\n")
    assert main(["config", *args, "--set", f"store.password_file={tmp_path / 'pw'}"]) == 0
    out, err = capsys.readouterr()
    assert "process list" not in err and "hunter2" not in out + err and "password" in out
    # a malformed item, or any config error: the error alone, exit 2 (found by the CLI fuzz test)
    assert main(["config", *args, "--set", "store.password"]) == 2
    assert capsys.readouterr().err.startswith("storyline: config error: --set:")
    assert main(["config", *args, "--set", "store.password=x", "--set", "shards=-1"]) == 2
    assert capsys.readouterr().err.startswith("storyline: config error: shards")


def test_init_and_selftest_on_embedded_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    args = ["--set", "tenant=clitest", "--set", f"store.path={db}"]
    assert main(["init", *args]) == 0
    out = capsys.readouterr().out
    assert "created table clitest__events" in out
    assert main(["init", *args]) == 0
    assert "is current" in capsys.readouterr().out
    assert main(["selftest", *args, "--events", "500"]) == 0
    assert "selftest ok" in capsys.readouterr().out
    # a layout-fixing setting cannot change under an existing tenant: exit 1 with the reason
    assert main(["init", *args, "--set", "shards=3"]) == 1
    assert "shards" in capsys.readouterr().err


def test_unreachable_database_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "init",
            "--set",
            "tenant=x",
            "--set",
            "store.backend=cql",
            "--set",
            'store.contact_points=["127.0.0.1:1"]',
            "--set",
            "store.max_retries=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "storyline:" in proc.stderr and "Traceback" not in proc.stderr


def test_config_command_hides_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "tenant=x", "--set", "store.username=u", "--set", "store.password=hunter2pw"]) == 0
    out = capsys.readouterr().out
    assert "hunter2pw" not in out and "store.password = '***'" in out


def test_only_the_store_package_imports_database_drivers() -> None:
    drivers = {"scyllapy", "sqlite3", "cassandra"}
    offenders = []
    for path in (ROOT / "engine").rglob("*.py"):
        if (ROOT / "engine" / "store") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in drivers]
    assert offenders == []


def test_simulate_writes_lines_and_truth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, truth = tmp_path / "s.jsonl.gz", tmp_path / "t.json"
    assert main(["simulate", "--set", "tenant=x", "--out", str(out), "--truth", str(truth), "--events", "300"]) == 0
    assert "300 events" in capsys.readouterr().out
    import gzip
    import json

    lines = gzip.decompress(out.read_bytes()).splitlines()
    stories = json.loads(truth.read_bytes())["stories"]
    assert len(lines) == 300 and {json.loads(ln)["id"] for ln in lines} == set(stories)
    assert main(["simulate", "--set", "tenant=x", "--events", "10"]) == 2  # neither --out nor --live


def test_simulate_live_paces_events_through_the_producer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate --live` sends each event at its arrival offset / speed: the events land in buckets in arrival
    order, spread over about (last arrival / speed) seconds, not dumped at once; a drained run then holds every
    simulated event in a story (verify --truth)."""
    import asyncio
    import json

    from engine.core.config import load
    from engine.core.event import decode
    from engine.store import make_store

    truth = tmp_path / "t.json"
    sets = [f"store.path={tmp_path}/s.db", "lag_ms=3000", "max_write_age_ms=500", "request_timeout_ms=1000"]
    conf = ["--config", str(ROOT / "configs" / "local.toml")] + [x for kv in sets for x in ("--set", kv)]
    speed = 150.0
    args = ["simulate", *conf, "--live", "--speed", str(speed), "--events", "400", "--span-s", "60", "--seed", "3"]
    assert main(["init", *conf]) == 0
    assert main([*args, "--truth", str(truth)]) == 0
    assert "400 events sent live" in capsys.readouterr().out
    sim = json.loads(truth.read_bytes())
    arrivals: dict[str, float] = sim["arrivals"]
    assert set(arrivals) == set(sim["stories"]) and len(arrivals) == 400
    cfg = load(ROOT / "configs" / "local.toml", sets)

    async def buckets() -> dict[str, int]:
        store = make_store(cfg)
        await store.open()
        try:
            found: dict[str, int] = {}
            index = await store.scan_index(list(range(cfg.shards)), 0, 2**40)
            for shard, hints in index.items():
                for h in hints:
                    async for page in store.read_partition(shard, h.bucket):
                        for rec in page.events:
                            found[decode(rec.payload).id] = h.bucket
            return found
        finally:
            await store.close()

    where = asyncio.run(buckets())
    assert set(where) == set(arrivals)
    in_order = [where[e] for e in sorted(arrivals, key=lambda e: (arrivals[e], e))]
    # In arrival order, up to one bucket: one send's events go to several partitions, whose appends may straddle
    # a bucket boundary.
    running_max = [max(in_order[: i + 1]) for i in range(len(in_order))]
    assert all(m - b <= 1 for m, b in zip(running_max, in_order, strict=True)), "events were sent in arrival order"
    spread_s = (in_order[-1] - in_order[0]) * cfg.bucket_ms / 1000
    expected_s = (max(arrivals.values()) - min(arrivals.values())) / speed
    assert 0.8 * expected_s - 0.5 <= spread_s <= expected_s + 2.0, (spread_s, expected_s)
    import time

    time.sleep((cfg.lag_ms + cfg.bucket_ms) / 1000)  # the last events become readable lag_ms after their write
    assert main(["run", *conf, "--drain"]) == 0
    assert main(["verify", *conf, "--truth", str(truth)]) == 0


def test_verify_reconciles_with_ingest_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from engine.core.config import load

    sets = [f"store.path={tmp_path}/s.db", "lag_ms=3000", "max_write_age_ms=500", "request_timeout_ms=1000"]
    conf = ["--config", str(ROOT / "configs" / "local.toml")] + [x for kv in sets for x in ("--set", kv)]
    data, truth = tmp_path / "in.jsonl", tmp_path / "t.json"
    assert main(["init", *conf]) == 0
    assert main(["simulate", *conf, "--events", "300", "--out", str(data), "--truth", str(truth)]) == 0
    with data.open("ab") as f:
        f.write(b'{"source": "fw", "time": "yesterday"}\n')  # one rejected line
    capsys.readouterr()
    assert main(["ingest", *conf, str(data)]) == 0
    log = tmp_path / "ingest.log"
    log.write_text(capsys.readouterr().out)
    assert "accepted 300, rejected 1" in log.read_text()
    time.sleep((load(ROOT / "configs" / "local.toml", sets).lag_ms + 300) / 1000)
    assert main(["run", *conf, "--drain"]) == 0
    capsys.readouterr()
    assert main(["verify", *conf, "--truth", str(truth), "--ingest-log", f"in={log}", "--ingest-log", f"in={log}"]) == 0
    wrong = tmp_path / "wrong.log"
    wrong.write_text(log.read_text().replace("accepted 300", "accepted 301"))
    capsys.readouterr()
    assert main(["verify", *conf, "--ingest-log", f"in={wrong}"]) == 1
    assert "counts do not reconcile" in capsys.readouterr().out
    assert main(["verify", *conf, "--ingest-log", "no-equals-sign"]) == 2


def test_stories_time_window_takes_rfc3339_or_epoch_and_a_negative_limit_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import asyncio
    import json

    from engine.core.config import from_mapping
    from engine.core.records import StoryRecord
    from engine.store import make_store

    db = tmp_path / "w.db"
    args = ["--set", "tenant=window", "--set", f"store.path={db}"]
    assert main(["init", *args]) == 0
    base_ms = 1_796_000_000_000  # 2026-11-30T00:53:20Z

    async def put() -> None:
        store = make_store(from_mapping({"tenant": "window", "store": {"backend": "embedded", "path": str(db)}}))
        await store.open()
        rows = []
        for i in range(4):  # one story each 10 minutes; the first also has an older revision
            sid = f"s0000-{i:016x}"
            at = base_ms + i * 600_000
            body = json.dumps({"story_id": sid, "revision": 2, "event_count": 1, "sources": ["fw"]}).encode()
            rows.append(StoryRecord(0, at // 1000, sid, 2, True, None, at, body))
        rows.append(StoryRecord(0, base_ms // 1000 - 10, "s0000-0000000000000000", 1, False, None, base_ms - 1, b"{}"))
        await store.put_stories(rows)
        await store.close()

    asyncio.run(put())
    capsys.readouterr()

    def ids(*extra: str) -> list[str]:
        assert main(["stories", *args, "--format", "jsonl", *extra]) == 0
        return [json.loads(line)["story_id"][-1] for line in capsys.readouterr().out.splitlines()]

    assert ids() == ["0", "1", "2", "3"]
    # 00:53:20Z + 10 min = 01:03:20Z: the second story on; until is exclusive
    assert ids("--since", "2026-11-30T01:03:20Z", "--until", "2026-11-30T01:23:20Z") == ["1", "2"]
    assert ids("--since", "2026-11-30T02:03:20+01:00") == ["1", "2", "3"]  # the same instant, another offset
    assert ids("--since", str((base_ms + 600_000) / 1000)) == ["1", "2", "3"]  # epoch seconds
    assert ids("--limit", "1") == ["0"]
    for bad, why in (
        (["--limit", "-1"], "negative"),
        (["--since", "2026-11-30T01:03:20"], "no UTC offset"),
        (["--until", "yesterday"], "neither epoch seconds nor an RFC 3339"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["stories", *args, *bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("data", "kept"),
    [
        (b"", b""),
        (b"a\n", b"a\n"),
        (b"a\nb", b"a\n"),
        (b"abc", b""),
        (b"a\n" + b"x" * 200_000, b"a\n"),
        (b"y" * 70_000 + b"\nzz", b"y" * 70_000 + b"\n"),
    ],
)
def test_the_feed_cuts_a_partial_last_line_left_by_a_kill(tmp_path: Path, data: bytes, kept: bytes) -> None:
    import os

    from engine.cli import _cut_partial_line

    path = tmp_path / "out.jsonl"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        _cut_partial_line(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == kept
