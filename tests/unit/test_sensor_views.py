"""``simulate --format`` (issue 18): what a Zeek, Suricata or VPC sensor writes of a simulated scenario, and the
truth restricted to it — keyed by the ids ingest gives those lines, with the sensors' clocks and the true client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from engine.cli import main
from engine.core.event import Event
from engine.ingest.canonical import ParseRules
from engine.ingest.formats import LineParser
from engine.tools.sensor_views import sensor_view
from engine.tools.simulate import Scenario, generate

NOW_MS = int(time.time() * 1000)
SCENARIO = Scenario(events=1_500, seed=3, start_s=time.time() - 1_800, span_s=300)
EVENTS, TRUTH = generate(SCENARIO)


def parsed(fmt: str, lines: list[bytes]) -> list[Event | None]:
    reader = LineParser(fmt)  # type: ignore[arg-type]
    return [reader(line, ParseRules(), NOW_MS) for line in lines]


@pytest.mark.parametrize("fmt", ["zeek", "eve", "vpcflow"])
def test_the_truth_is_keyed_by_the_ids_ingest_gives_and_the_view_is_deterministic(fmt: str) -> None:
    view = sensor_view(EVENTS, TRUTH, fmt, now_ms=NOW_MS)  # type: ignore[arg-type]
    assert view == sensor_view(EVENTS, TRUTH, fmt, now_ms=NOW_MS)  # type: ignore[arg-type]
    events = [e for e in parsed(fmt, view.lines) if e is not None]
    assert [e.id for e in events] == list(view.truth.stories)
    assert [view.truth.stories[e.id] for e in events] == [s.story for s in view.subset]
    seen = {"zeek": {"firewall", "dns", "http"}, "eve": {"firewall", "dns", "http"}, "vpcflow": {"cloud"}}[fmt]
    reports = [s for s in EVENTS if s.source in seen]
    kept = {s.id for s in view.subset}
    assert [s.id for s in view.subset] == [s.id for s in reports if s.id in kept]  # in order
    # Only equal lines become one event (as ingest counts them): a record the view left out writes a line the view
    # has (two reports of a flow in one second give the same VPC record). How many depends on where the
    # scenario's start falls in a second: none in most runs.
    dropped = [s for s in reports if s.id not in kept]
    assert len(dropped) <= len(reports) // 100
    written = set(view.lines)
    for ev in dropped:
        alone = sensor_view([ev], TRUTH, fmt, now_ms=NOW_MS)  # type: ignore[arg-type]
        assert alone.lines[-1] in written, ev.id
    assert set(view.truth.flows) == set(view.truth.stories.values()) & set(TRUTH.flows)
    for e in events:  # each sensor keeps its simulated clock: the reported time is the true time plus its skew
        sim = view.subset[list(view.truth.stories).index(e.id)]
        expected = sim.true_time_s + view.truth.skews[e.sensor]
        assert abs(e.time_us / 1e6 - expected) < (1.0 if fmt == "vpcflow" else 1e-5), (e, sim)


def test_zeek_writes_the_originator_first_and_one_uid_per_sensor_and_story() -> None:
    view = sensor_view(EVENTS, TRUTH, "zeek", now_ms=NOW_MS)
    records = [json.loads(line) for line in view.lines]
    assert {r["_path"] for r in records} == {"conn", "dns", "http", "ssl"}
    assert any(s.reversed for s in view.subset), "the scenario has reversed reports to turn around"
    for rec, sim in zip(records, view.subset, strict=True):
        flow = TRUTH.flows[sim.story]
        assert (rec["id.orig_h"], rec["id.orig_p"]) == (flow.client_ip, flow.client_port), (rec, sim)
        if rec["_path"] == "conn":
            assert abs(rec["orig_ip_bytes"] - flow.bytes_c2s) <= flow.jitter * flow.bytes_c2s + 1
            assert rec["resp_pkts"] == flow.packets_s2c
    uids = {(r["_node"], r["uid"]) for r in records}
    assert len(uids) == len({(r["_node"], s.story) for r, s in zip(records, view.subset, strict=True)})


def test_eve_alerts_follow_flow_records_of_the_same_flow_and_story() -> None:
    view = sensor_view(EVENTS, TRUTH, "eve", alert_fraction=1.0, now_ms=NOW_MS)
    records = [json.loads(line) for line in view.lines]
    flows = [i for i, r in enumerate(records) if r["event_type"] == "flow"]
    assert flows and all(records[i + 1]["event_type"] == "alert" for i in flows)
    events = [e for e in parsed("eve", view.lines) if e is not None]
    for i in flows:
        flow, alert = records[i], records[i + 1]
        assert (alert["flow_id"], alert["host"], alert["src_ip"]) == (flow["flow_id"], flow["host"], flow["src_ip"])
        assert view.truth.stories[events[i].id] == view.truth.stories[events[i + 1].id]
        assert events[i].session == events[i + 1].session == str(flow["flow_id"])
    assert len(view.truth.stories) == len(view.subset) + len(flows)


def test_vpc_records_follow_the_header_and_name_one_account_per_simulated_sensor() -> None:
    view = sensor_view(EVENTS, TRUTH, "vpcflow", now_ms=NOW_MS)
    assert view.lines[0].startswith(b"version account-id interface-id srcaddr")
    sensors = {e.sensor for e in parsed("vpcflow", view.lines) if e is not None}
    assert sensors == set(view.truth.skews) == {"vpcflow-123456789001", "vpcflow-123456789002"}
    assert view.truth.skews["vpcflow-123456789001"] == TRUTH.skews["vpcflow-1"]


def test_bad_view_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        sensor_view(EVENTS, TRUTH, "syslog", now_ms=NOW_MS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alert_fraction"):
        sensor_view(EVENTS, TRUTH, "eve", alert_fraction=1.5, now_ms=NOW_MS)


def test_simulate_format_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, truth = tmp_path / "eve.json.gz", tmp_path / "t.json"
    common = ["simulate", "--set", "tenant=t", "--events", "300", "--out", str(out), "--truth", str(truth)]
    assert main([*common, "--format", "eve", "--alert-fraction", "0.5"]) == 0
    assert "eve records of 300 simulated events" in capsys.readouterr().out
    assert out.read_bytes()[:2] == b"\x1f\x8b" and json.loads(truth.read_text())["stories"]
    assert main([*common, "--format", "zeek", "--alert-fraction", "0.5"]) == 2
    assert "--alert-fraction" in capsys.readouterr().err
    assert main([*common, "--format", "vpcflow", "--live"]) == 2
    assert "--format" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["zeek", "eve", "vpcflow"])
def test_a_flow_record_keeps_its_span_in_every_format(fmt: str) -> None:
    """With ``Scenario.spans`` the flow records' ends reach ingest as ``end_time_us`` (the sensor's clock); the other
    records stay instants."""
    scenario = Scenario(events=600, seed=5, start_s=time.time() - 1_800, span_s=300, spans=True)
    events, truth = generate(scenario)
    view = sensor_view(events, truth, fmt, now_ms=NOW_MS)  # type: ignore[arg-type]
    parsed_events = [e for e in parsed(fmt, view.lines) if e is not None]
    spans = 0
    for e, sim in zip(parsed_events, view.subset, strict=True):
        if sim.true_end_s is None:
            assert e.end_time_us is None, (e, sim)
            continue
        spans += 1
        expected = sim.true_end_s + view.truth.skews[e.sensor]
        assert e.end_time_us is not None and abs(e.end_time_us / 1e6 - expected) < (1.0 if fmt == "vpcflow" else 1e-5)
    assert spans >= 100
