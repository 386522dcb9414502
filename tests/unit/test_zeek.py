"""Zeek logs in (issue 18): TSV and JSON records written by the team from Zeek's documented formats (no copied log
files), the canonical events they become, and the malformed variants that must be rejected naming the field."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.errors import ConfigError, InputError
from engine.core.event import Event, encode
from engine.ingest import zeek
from engine.ingest.canonical import InputEvent, ParseRules
from engine.ingest.formats import Format, LineParser
from engine.ingest.zeek import COLUMNAR_MIN, ZeekReader, looks_like_zeek

NOW_MS = int(time.time() * 1000)
TS = NOW_MS / 1000 - 3600  # an hour ago, as Zeek writes it: epoch seconds with 6 decimals
RULES = ParseRules()

CONN_HEADER = [
    "#separator \\x09",
    "#set_separator\t,",
    "#empty_field\t(empty)",
    "#unset_field\t-",
    "#path\tconn",
    "#open\t2026-12-05-10-00-00",
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\tduration\torig_bytes\tresp_bytes"
    "\tconn_state\tlocal_orig\thistory\torig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes\ttunnel_parents",
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\tcount\tstring\tbool\tstring\tcount"
    "\tcount\tcount\tcount\tset[string]",
]


def record(**fields: object) -> str:
    """A Zeek JSON line (dotted keys are passed with ``**{...}``)."""
    return json.dumps(fields, separators=(",", ":"))


def conn_line(*values: object) -> str:
    return "\t".join(str(v) for v in values)


def parse_all(lines: list[str], sensor: str | None = None) -> list[Event | None]:
    parser = LineParser("auto", sensor)
    return [parser(line.encode(), RULES, NOW_MS) for line in lines]


def test_a_conn_log_in_tsv_becomes_flow_events_with_the_originator_as_source() -> None:
    lines = [
        *CONN_HEADER,
        conn_line(
            f"{TS:.6f}",
            "CAbc1",
            "10.0.0.5",
            52100,
            "93.184.216.34",
            443,
            "tcp",
            "ssl",
            "2.500000",
            700,
            5200,
            "SF",
            "T",
            "ShADadFf",
            12,
            1400,
            10,
            5800,
            "(empty)",
        ),
        conn_line(
            f"{TS + 1:.6f}",
            "CDns2",
            "10.0.0.5",
            40000,
            "10.0.0.53",
            53,
            "udp",
            "dns",
            "0.010000",
            40,
            120,
            "SF",
            "-",
            "Dd",
            1,
            68,
            1,
            148,
            "CAbc1,CXyz9",
        ),
        conn_line(
            f"{TS + 2:.6f}",
            "CIcmp3",
            "10.0.0.5",
            8,
            "10.0.0.1",
            0,
            "icmp",
            "-",
            "0.001000",
            56,
            56,
            "OTH",
            "-",
            "-",
            1,
            84,
            1,
            84,
            "-",
        ),
        "#close\t2026-12-05-11-00-00",
    ]
    out = parse_all(lines)
    assert out[: len(CONN_HEADER)] == [None] * len(CONN_HEADER) and out[-1] is None
    tcp, udp, icmp = (e for e in out if e is not None)
    assert (tcp.source, tcp.sensor, tcp.proto, tcp.src_ip, tcp.src_port, tcp.dst_ip, tcp.dst_port) == (
        "zeek.conn",
        "zeek",
        6,
        "10.0.0.5",
        52100,
        "93.184.216.34",
        443,
    )
    assert tcp.time_us == round(float(f"{TS:.6f}") * 1_000_000)
    # IP-level counters become the figures fusion reads; the payload counters stay as Zeek names them
    assert tcp.attrs["src_bytes"] == 1400 and tcp.attrs["dst_bytes"] == 5800
    assert tcp.attrs["src_packets"] == 12 and tcp.attrs["dst_packets"] == 10
    assert tcp.attrs["orig_bytes"] == 700 and "orig_ip_bytes" not in tcp.attrs
    assert tcp.attrs["initiator"] == "src" and tcp.session == "CAbc1" and "uid" not in tcp.attrs
    assert tcp.attrs["duration"] == 2.5 and tcp.end_time_us == tcp.time_us + 2_500_000  # ts + duration
    assert tcp.attrs["local_orig"] is True and tcp.attrs["tunnel_parents"] == []
    assert "local_orig" not in udp.attrs  # unset: left out
    assert udp.proto == 17 and udp.attrs["tunnel_parents"] == ["CAbc1", "CXyz9"]
    assert (icmp.proto, icmp.src_port, icmp.dst_port) == (1, 8, 0)  # ICMP type and code in the ports


def test_tsv_escapes_a_custom_header_and_a_repeated_header() -> None:
    lines = [
        "#separator \\x7c",  # '|'
        "#set_separator|;",
        "#empty_field|EMPTY",
        "#unset_field|NONE",
        "#path|http",
        "#fields|ts|uid|id.orig_h|id.orig_p|id.resp_h|id.resp_p|method|uri|user_agent|tags|status_code",
        "#types|time|string|addr|port|addr|port|string|string|string|set[enum]|count",
        f"{TS:.6f}|CH1|10.1.1.1|50000|10.2.2.2|80|GET|/a\\x7cb\\x09c|\\x2d|EMPTY|NONE",
        "#fields|ts|uid|id.orig_h|id.orig_p|id.resp_h|id.resp_p|status_code|method|uri|user_agent|tags",
        "#types|time|string|addr|port|addr|port|count|string|string|string|set[enum]",
        f"{TS:.6f}|CH2|10.1.1.1|50001|10.2.2.2|80|404|POST|/x|curl\\\\8|A;B",
    ]
    first, second = (e for e in parse_all(lines) if e is not None)
    assert first.source == "zeek.http" and first.proto == 6  # http.log names no transport: TCP
    assert first.attrs["uri"] == "/a|b\tc" and first.attrs["user_agent"] == "-"  # an escaped unset token is a value
    assert first.attrs["tags"] == [] and "status_code" not in first.attrs
    assert second.attrs["status_code"] == 404 and second.attrs["user_agent"] == "curl\\8"
    assert second.attrs["tags"] == ["A", "B"]


def test_zeek_json_records_with_and_without_path_and_three_timestamp_forms() -> None:
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(TS)) + ".250000Z"
    flow = {"id.orig_h": "10.0.0.5", "id.orig_p": 5000, "id.resp_h": "10.0.0.9", "id.resp_p": 22}
    lines = [
        record(
            _path="conn",
            _write_ts="x",
            _node="worker-02",
            ts=TS,
            uid="C1",
            **flow,
            proto="tcp",
            orig_ip_bytes=99,
            ip_proto=6,
        ),
        record(
            ts=iso,
            uid="C2",
            **{**flow, "id.orig_p": 5353, "id.resp_h": "10.0.0.53", "id.resp_p": 53},
            proto="udp",
            trans_id=7,
            query="example.org",
            qtype_name="A",
            rcode_name="NOERROR",
            answers=["1.2.3.4"],
        ),
        record(
            ts=int(TS * 1000),
            uid="C3",
            **{"id.orig_h": "2001:db8::1", "id.orig_p": 128, "id.resp_h": "2001:db8::2", "id.resp_p": 0},
            proto="icmp",
            conn_state="OTH",
        ),
        record(
            ts=TS,
            uid="C4",
            **{**flow, "id.orig_p": 0, "id.resp_h": "224.0.0.5", "id.resp_p": 0},
            proto="unknown_transport",
            ip_proto=89,
            conn_state="OTH",
        ),
        record(ts=TS, uids=["C5", "C6"], mac="aa:bb:cc:dd:ee:ff", assigned_addr="10.0.0.77", msg_types=["ACK"]),
    ]
    assert looks_like_zeek(lines[0].encode()) and looks_like_zeek(lines[4].encode())
    conn, dns, icmp6, ospf, dhcp = (e for e in parse_all(lines) if e is not None)
    assert (conn.source, conn.sensor, conn.attrs["src_bytes"]) == ("zeek.conn", "worker-02", 99)
    assert "_write_ts" not in conn.attrs and "_node" not in conn.attrs
    assert dns.source == "zeek.dns" and dns.sensor == "zeek" and dns.proto == 17  # told by its fields
    assert dns.time_us % 1_000_000 == 250_000
    assert icmp6.proto == 58 and icmp6.time_us == int(TS * 1000) * 1000  # integer ms (JSON::TS_MILLIS); ICMPv6
    assert ospf.proto == 89 and ospf.src_port is None and ospf.dst_port is None
    assert dhcp.source == "zeek.dhcp" and dhcp.flow is None and dhcp.attrs["uids"] == ["C5", "C6"]


def test_the_sensor_option_names_the_sensor_and_the_file_name_never_does() -> None:
    line = record(
        _path="conn",
        ts=TS,
        uid="C1",
        **{"id.orig_h": "10.0.0.5", "id.orig_p": 5000, "id.resp_h": "10.0.0.9", "id.resp_p": 22},
        proto="tcp",
    )
    (named,) = parse_all([line], sensor="zeek-dmz")
    (default,) = parse_all([line])
    assert named is not None and default is not None
    assert named.sensor == "zeek-dmz" and default.sensor == "zeek" and named.id != default.id
    assert parse_all([line])[0] == default  # the same record, the same id


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ([*CONN_HEADER, "1.0\tC1\t10.0.0.1"], r"^zeek: 3 values for 19 #fields$"),
        (
            [*CONN_HEADER, conn_line(TS, "C", "10.0.0.1", 1, "10.0.0.2", 2, "tcp", "-", "-", "many", *["-"] * 9)],
            r"^orig_bytes: 'many' is not a Zeek count$",
        ),
        (
            [
                *CONN_HEADER,
                conn_line(TS, "C", "10.0.0.1", 1, "10.0.0.2", 2, "tcp", "-", "-", "-", "-", "-", "yes", *["-"] * 6),
            ],
            r"^local_orig: 'yes' is not a Zeek bool",
        ),
        ([*CONN_HEADER, conn_line("-", "C", "10.0.0.1", 1, "10.0.0.2", 2, "tcp", *["-"] * 12)], r"^ts: required"),
        ([*CONN_HEADER, conn_line(TS, "C", "10.0.0.1", 99999, "10.0.0.2", 2, "tcp", *["-"] * 12)], r"^src_port:"),
        (["#separator \\x09", "#path\tconn", "1.0\tC1"], r"^zeek: a data line before any #fields header"),
        (['{"_path":"conn","uid":"C1","id.orig_h":"10.0.0.1","id.resp_h":"10.0.0.2","proto":"tcp"}'], r"^ts: required"),
        (['{"_path":"conn","ts":true,"uid":"C1"}'], r"^ts: expected epoch seconds"),
        (
            [
                record(
                    _path="conn",
                    ts=TS,
                    uid="C1",
                    **{"id.orig_h": "10.0.0.1", "id.orig_p": "x", "id.resp_h": "10.0.0.2"},
                    proto="tcp",
                )
            ],
            r"^id.orig_p: expected a port number",
        ),
        (
            [record(_path="conn", ts=TS, uid="C1", **{"id.orig_h": "nope", "id.resp_h": "10.0.0.2"}, proto="tcp")],
            r"^src_ip:",
        ),
    ],
)
def test_malformed_zeek_records_are_rejected_naming_the_field(lines: list[str], reason: str) -> None:
    parser = LineParser("zeek")
    with pytest.raises(InputError, match=reason):
        for line in lines:
            parser(line.encode(), RULES, NOW_MS)


def test_auto_tells_zeek_from_canonical_per_input_and_an_unknown_format_is_a_usage_error() -> None:
    canonical = b'{"source": "fw", "time": %.3f}' % TS
    assert not looks_like_zeek(canonical) and not looks_like_zeek(b"not json")
    event = LineParser("auto")(canonical, RULES, NOW_MS)
    assert event is not None and event.source == "fw"
    with pytest.raises(InputError, match="unknown field"):  # a Zeek record read as canonical
        LineParser("canonical")(b'{"_path":"conn","ts":1.0,"uid":"C1"}', RULES, NOW_MS)
    with pytest.raises(ConfigError, match="--format"):
        LineParser("pcap")  # type: ignore[arg-type]
    assert ZeekReader().record(b"#close\t2026-12-05-11-00-00") is None


# -- the column-wise TSV path gives what the line-wise one gives -------------------------------------------------
_KINDS = ["time", "string", "addr", "port", "count", "int", "interval", "double", "bool", "enum", "set[string]",
          "vector[count]", "vector[interval]"]  # fmt: skip
_ODD = ["-", "(empty)", "", "+5", "1_0", "1e3", " 7", "nan", "inf", "T", "F", "x", "a\\x09b", "0.12345678901234567",
        "-0", "007", "99999999999999999999", "1,2", "1,x", "3.", ".5", "é", "-1.5"]  # fmt: skip


def _value(kind: str, draw: st.DrawFn) -> str:
    odd = draw(st.integers(0, 19))
    if odd < 2:  # the tokens, which both paths must read alike
        return ("-", "(empty)")[odd]
    if odd == 2:
        return draw(st.sampled_from(_ODD))
    if kind in ("time", "interval", "double"):
        return f"{draw(st.floats(0, 2e9, allow_nan=False)):.{draw(st.integers(0, 9))}f}"
    if kind in ("port", "count", "int"):
        return str(draw(st.integers(-5 if kind == "int" else 0, 2**40)))
    if kind == "bool":
        return draw(st.sampled_from(["T", "F"]))
    if kind.startswith(("set", "vector")):
        inner = "count" if "count" in kind else "interval" if "interval" in kind else "string"
        return ",".join(_value(inner, draw) for _ in range(draw(st.integers(1, 3))))
    return draw(st.text(st.characters(codec="utf-8", exclude_characters="\t\n\r\\"), min_size=1, max_size=6))


@st.composite
def _zeek_log(draw: st.DrawFn) -> list[str]:
    kinds = draw(st.lists(st.sampled_from(_KINDS), min_size=1, max_size=6))
    fields = [f"f{i}" for i in range(len(kinds))]
    fixed = ["ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "duration"]
    fixed_kinds = ["time", "string", "addr", "port", "addr", "port", "enum", "interval"]
    lines = [*CONN_HEADER[:6], "\t".join(["#fields", *fixed, *fields]), "\t".join(["#types", *fixed_kinds, *kinds])]
    for i in range(draw(st.integers(4, 30))):
        orig, resp = draw(st.sampled_from([(f"10.0.{i % 3}.1", "192.0.2.9"), ("2001:db8::1", "2001:db8::9")]))
        row = [f"{TS + i / 7:.6f}", draw(st.sampled_from([f"C{i}", f"C{i}", "", "-"])), orig, str(1000 + i), resp,
               "443", draw(st.sampled_from(["tcp", "udp", "icmp", "ICMP", "gre"])),
               draw(st.sampled_from(["-", "-1.5", "nan", "0.000001", _value("interval", draw)]))]  # fmt: skip
        if draw(st.integers(0, 19)) == 0:
            row[draw(st.integers(0, len(row) - 1))] = draw(st.sampled_from(_ODD))
        row += [_value(k, draw) for k in kinds]
        if draw(st.integers(0, 30)) == 0:
            row.append("extra")
        lines.append("\t".join(row))
    return lines


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=_zeek_log())
def test_zeek_tsv_read_column_by_column_equals_line_by_line(lines: list[str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zeek, "COLUMNAR_MIN", 3)  # short runs too, so that most examples take the column-wise path
        _same_both_ways([line.encode() for line in lines])


def _same_both_ways(raw: list[bytes]) -> None:
    one = LineParser("auto")
    expected: list[object] = []
    for line in raw:
        try:
            expected.append(one(line, RULES, NOW_MS))
        except InputError as exc:
            expected.append(str(exc))
    got = [str(r) if isinstance(r, InputError) else r for r in LineParser("auto").many(raw, RULES, NOW_MS)]

    def seen(results: Sequence[object]) -> list[object]:  # NaN != NaN: compare the stored bytes and the repr
        return [(encode(r), repr(r)) if isinstance(r, Event) else r for r in results]

    assert seen(got) == seen(expected)


def test_the_column_wise_parser_takes_plain_lines_and_leaves_odd_ones_to_the_line_wise_one() -> None:
    reader = ZeekReader()
    for line in CONN_HEADER:
        reader.record(line.encode())
    row = [f"{TS:.6f}", "C1", "10.0.0.5", "52100", "192.0.2.7", "443", "tcp", "ssl", "1.25", "100", "200", "SF", "T",
           "ShADadFf", "5", "400", "4", "900", "(empty)"]  # fmt: skip
    lines = [conn_line(*row).encode() for _ in range(COLUMNAR_MIN + 3)]
    lines[1] = lines[1].replace(b"\t100\t", b"\t1e2\t")  # a form Python reads and this parser leaves alone
    lines[2] = lines[2].replace(b"ShADadFf", b"Sh\\x09A")  # an escape
    recs = reader._tsv_columns(lines)
    assert [i for i, rec in enumerate(recs) if rec is None] == [1, 2]
    assert recs[0] == reader._event(reader._tsv(lines[0]), "conn")
    assert isinstance(recs[0], InputEvent) and recs[0].attrs is not None
    assert recs[0].attrs["tunnel_parents"] == [] and recs[0].attrs["local_orig"] is True
    assert recs[0].attrs["src_bytes"] == 400 and recs[0].end_time == float(f"{TS:.6f}") + 1.25


@pytest.mark.parametrize("extra_at", [0, 40, 199])
def test_a_round_whose_separators_add_up_but_whose_lines_do_not_is_read_line_by_line(extra_at: int) -> None:
    """One line with a value too many and another with one too few: the round has as many separators as it
    should, so only polars refusing the long line keeps the short one from being read with a value missing."""
    reader = ZeekReader()
    for line in CONN_HEADER:
        reader.record(line.encode())
    row = [f"{TS:.6f}", "C1", "10.0.0.5", "52100", "192.0.2.7", "443", "tcp", "ssl", "1.25", "100", "200", "SF", "T",
           "ShADadFf", "5", "400", "4", "900", "(empty)"]  # fmt: skip
    lines = [conn_line(*row).encode() for _ in range(200)]
    lines[extra_at] += b"\textra"
    lines[100] = lines[100].rsplit(b"\t", 1)[0]
    recs = reader._tsv_columns(lines)
    assert [i for i, rec in enumerate(recs) if rec is None] == sorted([extra_at, 100])
    out = reader.records(lines)
    assert [i for i, rec in enumerate(out) if isinstance(rec, InputError)] == sorted([extra_at, 100])
    assert "values for 19 #fields" in str(out[100])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=_zeek_log(), sensor=st.sampled_from([None, "s" * 256, "\U0001f600" * 256]))
def test_a_tsv_event_is_stored_within_the_bound_that_lets_ingest_skip_encoding_it(
    lines: list[str], sensor: str | None
) -> None:
    """``ZeekReader.fits`` lets ``accept`` skip the size check: the stored form must be within its bound."""
    parser = LineParser("auto", sensor)
    raw = [line.encode() for line in lines]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zeek, "COLUMNAR_MIN", 3)
        results = parser.many(raw, RULES, NOW_MS)
    for line, result in zip(raw, results, strict=True):
        if isinstance(result, Event):
            assert len(encode(result)) <= 9 * len(line) + parser.zeek._bound, line


def test_the_bound_holds_for_the_widest_forms_and_for_lines_read_before_a_later_header() -> None:
    """The forms that grow most when stored — one-digit intervals, in a set and in many columns (9 bytes from
    2) — stay within the bound, and are over half of it: a bound of 4 bytes per byte of the line would not hold."""
    fixed = "ts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto"
    fixed_types = "time\tstring\taddr\tport\taddr\tport\tenum"
    start = f"{TS:.6f}\tC1\t10.0.0.1\t1000\t192.0.2.9\t443\ttcp"
    wide = [f"#fields\t{fixed}\t" + "\t".join(f"a_long_field_name_of_an_interval_{i:05d}" for i in range(3000)),
            f"#types\t{fixed_types}\t" + "\t".join(["interval"] * 3000),
            f"{start}\t" + "\t".join(["1"] * 3000)]  # fmt: skip
    one_set = [f"#fields\t{fixed}\tv", f"#types\t{fixed_types}\tvector[interval]",
               f"{start}\t" + ",".join(["1"] * 9000)]  # fmt: skip
    narrow = [f"#fields\t{fixed}", f"#types\t{fixed_types}"]
    for log in (wide, one_set):
        parser = LineParser("zeek")
        raw = [line.encode() for line in [*CONN_HEADER[:5], *log, *narrow]]  # a narrower header after the line
        results = parser.many(raw, RULES, NOW_MS)
        event, line = results[len(CONN_HEADER[:5]) + 2], raw[len(CONN_HEADER[:5]) + 2]
        assert isinstance(event, Event)
        size, bound = len(encode(event)), 9 * len(line) + parser.zeek._bound
        assert size <= bound
        if log is one_set:
            assert 4 * len(line) + parser.zeek._bound < size
        assert parser.zeek.fits(line, bound) and not parser.zeek.fits(line, bound - 1)
        assert not parser.zeek.fits(b'{"ts": 1}', 1 << 30)  # a JSON line: its integers are not bounded


def test_a_count_wider_than_64_bits_is_not_a_zeek_count() -> None:
    reader = ZeekReader()
    for line in CONN_HEADER:
        reader.record(line.encode())
    row = [f"{TS:.6f}", "C1", "10.0.0.5", "52100", "192.0.2.7", "443", "tcp", "ssl", "1.25", "18446744073709551616",
           "200", "SF", "T", "ShADadFf", "5", "400", "4", "900", "(empty)"]  # fmt: skip
    with pytest.raises(InputError, match=r"^orig_bytes: '18446744073709551616' is not a Zeek count$"):
        reader.record(conn_line(*row).encode())
    row[9] = "18446744073709551615"  # the largest count
    assert reader.record(conn_line(*row).encode()).attrs["orig_bytes"] == 2**64 - 1  # type: ignore[union-attr,index]


def test_a_round_pauses_the_garbage_collector_only_while_it_runs() -> None:
    parser, seen = LineParser("zeek"), []
    parse = parser._many

    def spy(lines: Sequence[bytes], rules: ParseRules, now_ms: int) -> list[Event | InputError | None]:
        seen.append(gc.isenabled())
        if not lines:
            raise RuntimeError("boom")
        return parse(lines, rules, now_ms)

    parser._many = spy  # type: ignore[method-assign]
    assert gc.isenabled()
    assert parser.many([line.encode() for line in CONN_HEADER], RULES, NOW_MS) == [None] * len(CONN_HEADER)
    with pytest.raises(RuntimeError):
        parser.many([], RULES, NOW_MS)
    assert seen == [False, False] and gc.isenabled()
    gc.disable()
    try:
        parser.many([b"#path\tconn"], RULES, NOW_MS)
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


@pytest.mark.parametrize("fmt", ["zeek", "eve", "canonical"])
def test_a_round_checked_at_once_rejects_the_lines_each_check_would(fmt: Format) -> None:
    """A round is checked as a whole (length, UTF-8) when it can be; a line that fails — invalid UTF-8, a
    multi-byte character cut across two lines, too long — gets the reason the line-by-line check gives."""
    header = [line.encode() for line in CONN_HEADER]
    row = conn_line(f"{TS:.6f}", "C1", "10.0.0.5", "52100", "192.0.2.7", "443", "tcp", "ssl", "1.25", "100", "200",
                    "SF", "T", "ShADadFf", "5", "400", "4", "900", "(empty)").encode()  # fmt: skip
    if fmt == "eve":
        flow = {"src_ip": "10.0.0.5", "src_port": 53000, "dest_ip": "192.0.2.7", "dest_port": 53, "proto": "UDP"}
        row = json.dumps({"timestamp": "2026-12-05T10:00:00.000000+0000", "event_type": "dns", **flow}).encode()
        header = []
    elif fmt == "canonical":
        row, header = json.dumps({"source": "fw", "time": TS}).encode(), []
    rules = ParseRules(max_event_bytes=2048)
    cut = {
        -2: row + b"\xc3",
        -1: b"\xa9" + row,
    }  # a character cut: its first byte ends a line, the rest starts the next
    for bad in ({-1: row + b" " * 2048}, cut, {-1: row + b"\xff"}):  # one round each
        lines = [*header, *[row] * 80]
        for at, line in bad.items():
            lines[at] = line
        expected: list[object] = []
        one = LineParser(fmt)
        for line in lines:
            try:
                expected.append(one(line, rules, NOW_MS))
            except InputError as exc:
                expected.append(str(exc))
        got = [str(r) if isinstance(r, InputError) else r for r in LineParser(fmt).many(lines, rules, NOW_MS)]
        assert got == expected
        assert all(isinstance(r, str) for r in got[-len(bad) :]), got[-len(bad) :]
        assert all(isinstance(r, Event) for r in got[len(header) : -len(bad)])
