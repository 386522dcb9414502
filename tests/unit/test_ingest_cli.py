"""``storyline ingest`` as a user meets it: a byte order mark, a truncated gzip, standard input named twice, times
in the wrong unit (issue 18, Accounting). The embedded store in a temporary directory; the CLI in-process."""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path

import pytest

from engine.cli import main
from engine.core.errors import InputError
from engine.ingest.canonical import ParseRules, parse_line

ROOT = Path(__file__).resolve().parents[2]


def conf(tmp_path: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "local.toml"), "--set", f"store.path={tmp_path}/s.db"]


def lines(n: int, start: int = 0) -> bytes:
    now = time.time()
    return b"".join(
        json.dumps(
            {
                "source": "fw",
                "time": now - 60 + i / 1000,
                "proto": "tcp",
                "src_ip": "10.0.0.1",
                "src_port": 1024 + i,
                "dst_ip": "10.0.0.2",
                "dst_port": 443,
            }
        ).encode()
        + b"\n"
        for i in range(start, start + n)
    )


def conn_header(*extra: tuple[str, str]) -> str:
    """A Zeek conn.log TSV header: the flow fields, then ``extra`` (name, type) columns."""
    fields = [("ts", "time"), ("uid", "string"), ("id.orig_h", "addr"), ("id.orig_p", "port"),
              ("id.resp_h", "addr"), ("id.resp_p", "port"), ("proto", "enum"), *extra]  # fmt: skip
    return (
        "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n#path\tconn\n"
        + "\t".join(["#fields", *(f for f, _ in fields)])
        + "\n"
        + "\t".join(["#types", *(t for _, t in fields)])
        + "\n"
    )


def summary(out: str) -> dict[str, int]:
    m = re.search(r"accepted ([\d,]+), rejected ([\d,]+), duplicates ([\d,]+)", out)
    assert m, out
    return dict(zip(("accepted", "rejected", "duplicates"), (int(g.replace(",", "")) for g in m.groups()), strict=True))


def test_a_byte_order_mark_before_the_first_line_is_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + lines(3))
    assert main(["init", *conf(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["ingest", *conf(tmp_path), str(f)]) == 0
    assert summary(capsys.readouterr().out) == {"accepted": 3, "rejected": 0, "duplicates": 0}


def test_a_truncated_gzip_ingests_every_complete_line_and_says_where_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = gzip.compress(lines(30_000))
    f = tmp_path / "cut.jsonl.gz"
    f.write_bytes(whole[: len(whole) * 2 // 3])
    assert main(["init", *conf(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["ingest", *conf(tmp_path), str(f)]) == 1
    out, err = capsys.readouterr()
    m = re.search(r"reading \S+ stopped after line ([\d,]+): EOFError", err)
    assert m, err
    read = int(m.group(1).replace(",", ""))
    assert 10_000 < read < 30_000
    # every line read was complete and valid, and all of them were written: more than one round's worth
    assert summary(out) == {"accepted": read, "rejected": 0, "duplicates": 0}
    assert "Traceback" not in err


def test_standard_input_named_twice_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ingest", *conf(tmp_path), "-", "-"]) == 2
    err = capsys.readouterr().err
    assert "files: - (standard input) can be read only once" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("scale", "unit"), [(1_000, "milliseconds"), (1_000_000, "microseconds"), (1_000_000_000, "nanoseconds")]
)
def test_a_time_in_the_wrong_unit_gets_a_hint(scale: int, unit: str) -> None:
    now_ms = int(time.time() * 1000)
    line = json.dumps({"source": "fw", "time": now_ms // 1000 * scale}).encode()
    with pytest.raises(InputError, match=rf"^time: .*looks like epoch {unit}: give epoch seconds"):
        parse_line(line, ParseRules(), now_ms)
    # seconds and RFC 3339 stay fine; a time merely far off gets the plain advice
    assert parse_line(json.dumps({"source": "fw", "time": now_ms // 1000}).encode(), ParseRules(), now_ms)
    with pytest.raises(InputError, match=r"too far in the future.*give epoch seconds or RFC 3339"):
        parse_line(json.dumps({"source": "fw", "time": now_ms // 1000 + 10**9}).encode(), ParseRules(), now_ms)


def test_a_rejected_line_over_64_kib_is_listed_as_cut_and_not_redriven(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "long.jsonl"
    f.write_bytes(b'{"source": "fw", "time": "' + b"7" * 100_000 + b'"}\n' + lines(1))
    assert main(["init", *conf(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["ingest", *conf(tmp_path), str(f)]) == 0
    assert summary(capsys.readouterr().out) == {"accepted": 1, "rejected": 1, "duplicates": 0}
    assert main(["dead-letter", *conf(tmp_path)]) == 0
    assert "long.jsonl:1: time:" in (out := capsys.readouterr().out)
    assert "[line of 100,028 bytes, first 65,536 kept: not redrivable]" in out
    assert main(["dead-letter", *conf(tmp_path), "--redrive"]) == 0
    out = capsys.readouterr().out
    assert "redrive accepted 0 now, 0 still rejected" in out and "1 line was kept only in part" in out


def test_several_files_get_a_summary_each_after_the_run_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    a.write_bytes(lines(4) + b"\n" + b'{"source": "fw", "time": "soon"}\n')
    b.write_bytes(gzip.compress(lines(2, start=100) + b"{broken\n" + b'{"source": "fw"}\n'))
    assert main(["init", *conf(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["ingest", *conf(tmp_path), str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert summary(out) == {"accepted": 6, "rejected": 3, "duplicates": 0}  # the run's total comes first
    assert f"ingest: file {a}: accepted 4, rejected 1 (time 1), duplicates 0, empty lines 1, 6 lines" in out
    assert f"ingest: file {b}: accepted 2, rejected 2 (json 1, time 1), duplicates 0, empty lines 0, 4 lines" in out


def test_a_zeek_tsv_log_is_ingested_by_auto_with_its_headers_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ts = time.time() - 600
    f = tmp_path / "conn.log.gz"
    header = conn_header(("orig_ip_bytes", "count"))
    rows = "".join(f"{ts + i:.6f}\tC{i}\t10.0.0.{i}\t4000{i}\t10.0.1.1\t443\ttcp\t{100 * i}\n" for i in range(1, 6))
    f.write_bytes(gzip.compress((header + rows + "1.0\tbroken\n").encode()))
    assert main(["init", *conf(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["ingest", *conf(tmp_path), "--sensor", "zeek-edge", str(f)]) == 0
    out = capsys.readouterr().out
    assert (
        summary(out) == {"accepted": 5, "rejected": 1, "duplicates": 0}
        and "skipped lines 7 (headers, stats, no data)" in out
    )
    assert main(["ingest", *conf(tmp_path), "--sensor", "bad\x01name", str(f)]) == 2
    assert "--sensor: must be" in capsys.readouterr().err


def test_records_with_a_session_but_no_flow_are_counted_and_a_long_zeek_log_is_read_column_by_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ts = time.time() - 600
    conn = tmp_path / "conn.log"
    header = conn_header(("duration", "interval"), ("orig_ip_bytes", "count"))
    rows = "".join(f"{ts + i / 10:.6f}\tC{i}\t10.0.0.{i % 200 + 1}\t{40000 + i}\t10.0.1.1\t443\ttcp\t0.5\t{i}\n"
                   for i in range(300))  # fmt: skip
    conn.write_text(header + rows)
    eve = tmp_path / "eve.json"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000+0000", time.gmtime(ts))
    anomaly = {"timestamp": stamp, "flow_id": 77, "event_type": "anomaly", "anomaly": {"type": "decode"}}
    eve.write_text(json.dumps(anomaly) + "\n")
    assert main(["init", *conf(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["ingest", *conf(tmp_path), str(conn), str(eve)]) == 0
    out = capsys.readouterr().out
    assert summary(out) == {"accepted": 301, "rejected": 0, "duplicates": 0}
    assert "with a session id but no flow 1 (stored without a flow)" in out
    assert f"ingest: file {conn}: accepted 300," in out
