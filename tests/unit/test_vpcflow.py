"""AWS VPC Flow Logs in (issue 18): records written by the team from AWS's documented layouts (default version 2
and a custom layout declared by a header line), NODATA/SKIPDATA counted, malformed records rejected naming the
field."""

from __future__ import annotations

import time

import pytest

from engine.core.errors import InputError
from engine.core.event import Event
from engine.ingest.canonical import ParseRules
from engine.ingest.formats import LineParser
from engine.ingest.vpcflow import looks_like_vpcflow

NOW_S = int(time.time())
T0 = NOW_S - 3600
RULES = ParseRules()


def parse(lines: list[str], fmt: str = "auto", sensor: str | None = None) -> tuple[list[Event | None], LineParser]:
    parser = LineParser(fmt, sensor)  # type: ignore[arg-type]
    return [parser(line.encode(), RULES, NOW_S * 1000) for line in lines], parser


def test_default_layout_records_one_direction_each_and_nodata_skipdata_counted() -> None:
    lines = [
        f"2 123456789010 eni-1235b8ca123456789 172.31.16.139 172.31.16.21 20641 22 6 20 4249 {T0} {T0 + 60} ACCEPT OK",
        f"2 123456789010 eni-1235b8ca123456789 172.31.16.21 172.31.16.139 22 20641 6 18 5200 {T0} {T0 + 60} ACCEPT OK",
        f"2 123456789010 eni-1235b8ca123456789 203.0.113.12 172.31.16.139 0 0 1 4 336 {T0} {T0 + 60} REJECT OK",
        f"2 123456789010 eni-1235b8ca123456789 - - - - - - - {T0} {T0 + 60} - NODATA",
        f"2 123456789010 eni-11111111111111111 - - - - - - - {T0} {T0 + 60} - SKIPDATA",
    ]
    assert looks_like_vpcflow(lines[0].encode())
    (request, reply, icmp, nodata, skipdata), parser = parse(lines)
    assert request is not None and reply is not None and icmp is not None
    assert (request.source, request.sensor, request.proto, request.src_ip, request.src_port) == (
        "vpcflow",
        "vpcflow-123456789010",
        6,
        "172.31.16.139",
        20641,
    )
    assert request.time_us == T0 * 1_000_000 and request.end_time_us == (T0 + 60) * 1_000_000
    assert "end" not in request.attrs and request.session is None
    assert request.attrs["src_bytes"] == 4249 and request.attrs["src_packets"] == 20
    assert request.attrs["action"] == "ACCEPT" and request.attrs["interface-id"] == "eni-1235b8ca123456789"
    assert "initiator" not in request.attrs  # version 2 has no tcp-flags
    assert reply.flow == request.flow and reply.reversed != request.reversed  # the two directions, one flow
    assert icmp.proto == 1 and (icmp.src_port, icmp.dst_port) == (0, 0) and icmp.attrs["icmp_type_unknown"]
    assert nodata is None and skipdata is None
    assert (parser.vpcflow.nodata, parser.vpcflow.skipdata) == (1, 1)


def test_a_custom_layout_declared_by_its_header() -> None:
    header = (
        "version srcaddr dstaddr srcport dstport protocol start end type packets bytes account-id vpc-id subnet-id"
        " instance-id interface-id region az-id sublocation-type sublocation-id action tcp-flags pkt-srcaddr"
        " pkt-dstaddr pkt-src-aws-service pkt-dst-aws-service traffic-path flow-direction log-status"
    )
    syn = (
        f"5 10.0.0.71 52.95.128.179 34210 443 6 {T0} {T0 + 57} IPv4 14 15044 123456789012 vpc-abc subnet-def"
        " i-0c50d5961bcb2d47b eni-0a1 ap-southeast-2 apse2-az3 - - ACCEPT 2 10.0.0.71 52.95.128.179 - S3 8 egress OK"
    )
    synack = (
        f"5 52.95.128.179 10.0.0.71 443 34210 6 {T0} {T0 + 57} IPv4 14 9000 123456789012 vpc-abc subnet-def"
        " i-0c50d5961bcb2d47b eni-0a1 ap-southeast-2 apse2-az3 - - ACCEPT 19 52.95.128.179 10.0.0.71 S3 - - ingress OK"
    )
    (h, out, back), _ = parse([header, syn, synack], sensor="vpc-prod")
    assert h is None and out is not None and back is not None
    assert out.sensor == "vpc-prod" and out.attrs["initiator"] == "src" and out.attrs["pkt-dst-aws-service"] == "S3"
    assert out.attrs["traffic-path"] == 8 and "az-id" in out.attrs and "sublocation-type" not in out.attrs
    assert back.attrs["initiator"] == "dst" and back.attrs["flow-direction"] == "ingress"  # SYN-ACK (+FIN): dst opened


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (["2 123456789010 eni-1 10.0.0.1 10.0.0.2 1 2 6 1 100 1 2 ACCEPT"], r"^vpcflow: 13 fields and no header"),
        (["version srcaddr dstaddr start log-status", "2 10.0.0.1 10.0.0.2 x OK"], r"^start: 'x' is not an integer"),
        (
            ["version srcaddr dstaddr srcport dstport protocol start log-status", "2 10.0.0.1 10.0.0.2 1 2 6 1"],
            r"^vpcflow: 7 fields for a header of 8",
        ),
        (["version srcaddr dstaddr protocol log-status", "2 10.0.0.1 10.0.0.2 6 OK"], r"^start: required"),
        ([f"2 1 eni-1 10.0.0.1 10.0.0.999 1 2 6 1 100 {T0} {T0} ACCEPT OK"], r"^dst_ip:"),
        ([f"2 1 eni-1 10.0.0.1 10.0.0.2 1 2 300 1 100 {T0} {T0} ACCEPT OK"], r"^proto:"),
    ],
)
def test_malformed_records_are_rejected_naming_the_field(lines: list[str], reason: str) -> None:
    parser = LineParser("vpcflow")
    with pytest.raises(InputError, match=reason):
        for line in lines:
            parser(line.encode(), RULES, NOW_S * 1000)


def test_auto_does_not_take_other_inputs_for_vpc() -> None:
    assert not looks_like_vpcflow(b'{"source": "fw", "time": 1}') and not looks_like_vpcflow(b"#separator \\x09")
    assert not looks_like_vpcflow(b"hello world")
    assert looks_like_vpcflow(b"version account-id interface-id srcaddr dstaddr srcport dstport protocol packets")
