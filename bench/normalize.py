"""``python -m bench.normalize``: sensor formats from file bytes to validated canonical events, one core, before the
database (issue 18: ``normalize_zeek_conn_events_per_s``, ``normalize_eve_events_per_s``,
``normalize_vpcflow_events_per_s``).

Inputs are generated here, deterministically: a Zeek conn.log in TSV (the default 21 conn fields, distinct
5-tuples, typical values); an EVE mix of 40 % flow, 20 % dns (v3), 20 % http, 10 % tls, 10 % alert; VPC flow log
records in the default version-2 layout. Each is gzip-compressed in memory, then timed from decompression
through :class:`engine.ingest.producer.InputLines` and :meth:`engine.ingest.formats.LineParser.many` in ingest's
rounds of ``ingest.batch_lines`` lines (ids and flow keys computed, every check of ingest) — what ``storyline
ingest`` does before writing. CPU time of this process (polars' threads included); the best of 3. The cost per
step (``steps_us``): reading (gzip, lines), parsing (the format's reader) and validating (normalize, ids, flow
keys, the stored size), each from runs that stop after it.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import io
import json
import time
from typing import Any

from engine.core.config import IngestConfig
from engine.core.event import Event
from engine.ingest.canonical import ParseRules
from engine.ingest.formats import Format, LineParser
from engine.ingest.producer import InputLines

NOW_MS = int(time.time() * 1000)
BATCH_LINES = IngestConfig().batch_lines  # ingest validates a round of this many lines at a time
T0 = NOW_MS / 1000 - 3600


def zeek_conn(n: int) -> bytes:
    header = (
        "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n#path\tconn\n"
        "#open\t2026-12-05-10-00-00\n"
        "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\tduration\torig_bytes\tresp_bytes"
        "\tconn_state\tlocal_orig\tlocal_resp\tmissed_bytes\thistory\torig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes"
        "\ttunnel_parents\n"
        "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\tcount\tstring\tbool\tbool\tcount"
        "\tstring\tcount\tcount\tcount\tcount\tset[string]\n"
    )
    rows = (
        f"{T0 + i * 0.001:.6f}\tC{i:017x}\t10.{i % 250}.{i // 250 % 250}.{i % 7 + 1}\t{1024 + i % 60000}"
        f"\t192.168.{i % 200}.{i % 13 + 1}\t{(443, 80, 53, 22)[i % 4]}\t{'udp' if i % 4 == 2 else 'tcp'}"
        f"\t{('ssl', 'http', 'dns', 'ssh')[i % 4]}\t{i % 9}.{i % 999_999:06d}\t{i % 5000}\t{i % 90000}\tSF\tT\tF\t0"
        f"\tShADadFf\t{i % 50 + 1}\t{i % 7000 + 40}\t{i % 40 + 1}\t{i % 95000 + 40}\t(empty)\n"
        for i in range(n)
    )
    return (header + "".join(rows)).encode()


def _eve_time(s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s + 3600)) + f".{int(s % 1 * 1e6):06d}+0100"


def eve_mix(n: int) -> bytes:
    out: list[str] = []
    for i in range(n):
        t = T0 + i * 0.001
        base: dict[str, Any] = {
            "timestamp": _eve_time(t),
            "flow_id": 1_000_000 + i // 5,
            "in_iface": "eth0",
            "src_ip": f"10.{i % 250}.{i // 250 % 250}.{i % 7 + 1}",
            "src_port": 1024 + i % 60000,
            "dest_ip": f"192.168.{i % 200}.{i % 13 + 1}",
            "dest_port": 443,
            "proto": "TCP",
            "host": "ids-1",
        }
        k = i % 10
        if k < 4:
            rec = {
                **base,
                "event_type": "flow",
                "app_proto": "tls",
                "flow": {
                    "pkts_toserver": 12,
                    "pkts_toclient": 10,
                    "bytes_toserver": 1400 + i % 500,
                    "bytes_toclient": 5800,
                    "start": _eve_time(t),
                    "end": _eve_time(t + 2),
                    "age": 2,
                    "state": "closed",
                    "reason": "timeout",
                    "alerted": False,
                },
            }
        elif k < 6:
            rec = {
                **base,
                "event_type": "dns",
                "proto": "UDP",
                "dest_port": 53,
                "dns": {
                    "version": 3,
                    "type": "response",
                    "id": i % 65536,
                    "flags": "8180",
                    "qr": True,
                    "rd": True,
                    "ra": True,
                    "rcode": "NOERROR",
                    "queries": [{"rrname": f"host{i % 997}.example.org", "rrtype": "A"}],
                    "answers": [
                        {
                            "rrname": f"host{i % 997}.example.org",
                            "rrtype": "A",
                            "ttl": 300,
                            "rdata": f"93.184.{i % 250}.{i % 200}",
                        }
                    ],
                },
            }
        elif k < 8:
            rec = {
                **base,
                "event_type": "http",
                "dest_port": 80,
                "tx_id": 0,
                "http": {
                    "hostname": f"www{i % 97}.example.org",
                    "url": f"/p/{i}",
                    "http_user_agent": "curl/8.5.0",
                    "http_method": "GET",
                    "protocol": "HTTP/1.1",
                    "status": 200,
                    "length": 512 + i % 4000,
                },
            }
        elif k < 9:
            rec = {
                **base,
                "event_type": "tls",
                "tls": {
                    "subject": f"CN=www{i % 97}.example.org",
                    "issuerdn": "CN=Example CA",
                    "sni": f"www{i % 97}.example.org",
                    "version": "TLS 1.3",
                    "notbefore": "2026-01-01T00:00:00",
                    "notafter": "2027-01-01T00:00:00",
                },
            }
        else:
            rec = {
                **base,
                "event_type": "alert",
                "direction": "to_server",
                "alert": {
                    "action": "allowed",
                    "gid": 1,
                    "signature_id": 2_013_028 + i % 50,
                    "rev": 7,
                    "signature": "ET POLICY example",
                    "category": "Potential Corporate Privacy Violation",
                    "severity": 2,
                },
            }
        out.append(json.dumps(rec))
    return ("\n".join(out) + "\n").encode()


def vpcflow(n: int) -> bytes:
    rows = (
        f"2 123456789010 eni-{i % 40:017x} 172.31.{i % 250}.{i % 7 + 1} 172.31.16.{i % 200 + 1} {1024 + i % 60000}"
        f" {(443, 22, 53)[i % 3]} {(6, 6, 17)[i % 3]} {i % 50 + 1} {i % 90000 + 40} {int(T0) + i // 100}"
        f" {int(T0) + i // 100 + 60} ACCEPT OK\n"
        for i in range(n)
    )
    return "".join(rows).encode()


def _timed(fmt: Format, packed: bytes, step: str, rounds: int) -> tuple[float, int]:
    """Best CPU seconds over ``rounds`` and the events made, for the work up to ``step``: ``read`` (gzip and line
    splitting only), ``parse`` (also the format's reader: records, no validation) or ``all`` (what ingest does
    before writing: :meth:`LineParser.many` on each round)."""
    rules = ParseRules()
    best, events = float("inf"), 0
    for _ in range(rounds):
        parser = LineParser(fmt)
        t0 = time.process_time()
        events = 0
        with gzip.GzipFile(fileobj=io.BytesIO(packed)) as stream:
            batch: list[bytes] = []
            for _, _, line in InputLines("bench", stream):  # type: ignore[arg-type]
                if line.strip():
                    batch.append(line)
                if len(batch) == BATCH_LINES:
                    events += _round(parser, step, batch, rules)
                    batch = []
            events += _round(parser, step, batch, rules)
        best = min(best, time.process_time() - t0)
    return best, events


def _round(parser: LineParser, step: str, batch: list[bytes], rules: ParseRules) -> int:
    if step == "read":
        return 0
    if step == "parse":  # the collector paused as many() pauses it, so that the steps add up
        reader = parser.eve if parser.format == "eve" else parser.vpcflow
        gc.disable()
        try:
            recs = parser.zeek.records(batch) if parser.format == "zeek" else [reader.record(x) for x in batch]
        finally:
            gc.enable()
        return len(recs)
    return sum(isinstance(r, Event) for r in parser.many(batch, rules, NOW_MS))


def measure(fmt: Format, data: bytes, rounds: int = 3) -> dict[str, Any]:
    packed = gzip.compress(data, compresslevel=6)
    best, events = _timed(fmt, packed, "all", rounds)
    read, _ = _timed(fmt, packed, "read", rounds)
    parse, _ = _timed(fmt, packed, "parse", rounds)
    per = 1e6 / events
    return {
        "events": events,
        "gzip_bytes": len(packed),
        "seconds": round(best, 3),
        "events_per_s": round(events / best),
        "us_per_event": round(best * per, 2),
        # µs per event by step, each the difference of two timed runs (best of `rounds`): noisy by ~0.3 µs
        "steps_us": {
            "read": round(read * per, 2),
            "parse": round((parse - read) * per, 2),
            "validate": round((best - parse) * per, 2),
        },
    }


def run(n: int = 100_000) -> dict[str, Any]:
    return {
        "zeek_conn_tsv": measure("zeek", zeek_conn(n)),
        "eve_mix": measure("eve", eve_mix(n)),
        "vpcflow_v2": measure("vpcflow", vpcflow(n)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.normalize", description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    print(json.dumps(run(ap.parse_args(argv).events), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
