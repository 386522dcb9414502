"""The scenario generator (engine.tools.simulate), the accuracy scoring and reference clusterer
(engine.tools.accuracy)."""

from __future__ import annotations

import gzip
import ipaddress
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from engine.cli import main
from engine.core.config import from_mapping
from engine.ingest.canonical import ParseRules, parse_line
from engine.tools import simulate
from engine.tools.accuracy import link_reference, score
from engine.tools.simulate import FlowTruth, Scenario, SimEvent, Truth, generate, sessions, write

CFG = from_mapping({"tenant": "t", "ingest": {"max_future_ms": 10**13}})
NOW_MS = 1_790_000_000_000


@pytest.fixture(scope="module")
def default() -> tuple[list[SimEvent], Truth]:
    return generate(Scenario())


def five_tuple(ev: SimEvent) -> tuple[object, ...] | None:
    doc = json.loads(ev.line)
    if "proto" not in doc:
        return None
    a = (ipaddress.ip_address(doc["src_ip"]), doc["src_port"])
    b = (ipaddress.ip_address(doc["dst_ip"]), doc["dst_port"])
    return (doc["proto"], *sorted((a, b), key=lambda e: (e[0].version, int(e[0]), e[1])))


# --- generator ---------------------------------------------------------------------------------------------


def test_deterministic() -> None:
    s = Scenario(events=2_000, seed=7)
    a_events, a_truth = generate(s)
    b_events, b_truth = generate(s)
    assert a_events == b_events
    assert a_truth.to_json() == b_truth.to_json()
    c_events, c_truth = generate(Scenario(events=2_000, seed=8))
    assert [e.line for e in a_events] != [e.line for e in c_events]
    assert a_truth.skews != c_truth.skews


def test_exact_count_unique_ids_and_truth(default: tuple[list[SimEvent], Truth]) -> None:
    events, truth = default
    assert len(events) == Scenario().events
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)
    assert truth.stories == {e.id: e.story for e in events}
    assert truth.scenario == Scenario()


def test_every_line_parses(default: tuple[list[SimEvent], Truth]) -> None:
    events, truth = default
    for ev in events:
        parsed = parse_line(ev.line, ParseRules.from_config(CFG), NOW_MS)
        assert parsed.id == ev.id
        assert parsed.sensor == ev.sensor
        assert parsed.source == ev.source
        # reported time = true time + the sensor's skew (to the µs)
        assert abs(parsed.time_us - round((ev.true_time_s + truth.skews[ev.sensor]) * 1e6)) <= 1


def test_lines_parse_with_default_config_when_live() -> None:
    import time

    now = time.time()
    s = Scenario(events=500, start_s=now - 600)
    cfg = from_mapping({"tenant": "t"})
    for ev in generate(s)[0]:
        parse_line(ev.line, ParseRules.from_config(cfg), int(now * 1000))


def test_same_story_same_engine_flow(default: tuple[list[SimEvent], Truth]) -> None:
    events, _ = default
    flows: defaultdict[str, set[int | None]] = defaultdict(set)
    for ev in events:
        flows[ev.story].add(parse_line(ev.line, ParseRules.from_config(CFG), NOW_MS).flow)
    assert all(len(f) == 1 for f in flows.values())


def test_sources_schemas_and_services(default: tuple[list[SimEvent], Truth]) -> None:
    events, _ = default
    schemas = {
        "firewall": {"action", "rule", "src_bytes", "dst_bytes", "src_packets", "dst_packets", "initiator"},
        "endpoint": {"process", "pid", "user", "host", "initiator"},
        "dns": {"query", "answer", "rcode"},
        "http": {"method", "host", "path", "status", "user_agent"},
        "cloud": {"vpc", "account", "src_bytes", "src_packets", "action"},
    }
    flowless_endpoint = {"process", "pid", "user", "host", "action"}
    seen = Counter(e.source for e in events)
    assert set(seen) == set(schemas)
    for ev in events:
        doc = json.loads(ev.line)
        if ev.source == "endpoint" and "proto" not in doc:
            assert set(doc["attrs"]) == flowless_endpoint, ev.line
        else:
            assert set(doc["attrs"]) == schemas[ev.source], ev.line
        assert ev.sensor.split("-")[0] in {"fw", "edr", "dns", "proxy", "vpcflow"}
        if ev.source == "dns":
            assert doc["proto"] == "udp" and 53 in (doc["src_port"], doc["dst_port"])
        if ev.source == "http":
            assert doc["proto"] == "tcp" and {doc["src_port"], doc["dst_port"]} & {80, 443}
        if ev.source == "cloud":
            assert doc["attrs"]["action"] in {"ACCEPT", "REJECT"}


def test_sessions_one_to_four_distinct_sensors(default: tuple[list[SimEvent], Truth]) -> None:
    """1..4 sensors per story; each writes one report, except a flow log: one record per direction it sees,
    possibly split in two (so up to 4), the second part at most 5 s after the first."""
    events, _ = default
    by_story: defaultdict[str, list[SimEvent]] = defaultdict(list)
    for ev in events:
        by_story[ev.story].append(ev)
    sizes = Counter(len({e.sensor for e in v}) for v in by_story.values())
    assert set(sizes) == {1, 2, 3, 4}
    spread = Scenario().spread_s
    for members in by_story.values():
        per_sensor = Counter(e.sensor for e in members)
        for e in members:
            assert per_sensor[e.sensor] <= (4 if e.source == "cloud" else 1)
        times = [e.true_time_s for e in members]
        assert max(times) - min(times) <= spread + 5.0 + 1e-6
        if all(e.source != "cloud" for e in members):
            assert max(times) - min(times) <= spread


def test_reverse_fraction(default: tuple[list[SimEvent], Truth]) -> None:
    events, _ = default
    with_flow = [e for e in events if five_tuple(e) is not None]
    one_report = [e for e in with_flow if e.source != "cloud"]  # a flow log's direction is its traffic's
    share = sum(e.reversed for e in one_report) / len(one_report)
    assert 0.28 <= share <= 0.32
    cloud = [e for e in with_flow if e.source == "cloud"]
    assert 0.45 <= sum(e.reversed for e in cloud) / len(cloud) <= 0.55
    # a reversed report swaps the endpoints of a forward report of the same session
    forward: dict[str, tuple[object, ...]] = {}
    for ev in with_flow:
        if not ev.reversed:
            d = json.loads(ev.line)
            forward[ev.story] = (d["src_ip"], d["src_port"], d["dst_ip"], d["dst_port"])
    checked = 0
    for ev in with_flow:
        if ev.reversed and ev.story in forward:
            d = json.loads(ev.line)
            assert (d["dst_ip"], d["dst_port"], d["src_ip"], d["src_port"]) == forward[ev.story]
            checked += 1
    assert checked > 100


def test_skews_within_bounds(default: tuple[list[SimEvent], Truth]) -> None:
    _, truth = default
    assert len(truth.skews) == 10
    assert all(-5.0 <= v <= 5.0 for v in truth.skews.values())
    assert len(set(truth.skews.values())) == len(truth.skews)
    assert all(v == 0.0 for v in generate(Scenario(events=100, skew_s=0.0))[1].skews.values())


def test_arrival_sorted_and_delay_bounded(default: tuple[list[SimEvent], Truth]) -> None:
    events, truth = default
    arrivals = [e.arrival_s for e in events]
    assert arrivals == sorted(arrivals)
    delays = sorted(e.arrival_s - (e.true_time_s - truth.scenario.start_s) for e in events)
    assert delays[0] >= -1e-5
    assert delays[-1] <= 480.0 + 1e-5
    assert delays[len(delays) // 2] < 5.0  # most are small
    assert delays[-1] > 120.0  # with a tail
    short = generate(Scenario(events=1_000, max_arrival_delay_s=10.0))
    assert all(e.arrival_s - (e.true_time_s - short[1].scenario.start_s) <= 10.0 + 1e-5 for e in short[0])


def test_port_reuse_is_a_different_story(default: tuple[list[SimEvent], Truth]) -> None:
    events, truth = default
    own_figures = 0
    by_tuple: defaultdict[tuple[object, ...], list[SimEvent]] = defaultdict(list)
    for ev in events:
        key = five_tuple(ev)
        if key is not None:
            by_tuple[key].append(ev)
    reused = [members for members in by_tuple.values() if any(e.kind == "reuse" for e in members)]
    assert len(reused) >= 0.01 * len(by_tuple)
    for members in reused:
        stories: defaultdict[str, list[float]] = defaultdict(list)
        for e in members:
            stories[e.story].append(e.true_time_s)
        assert len(stories) == 2
        (a, b) = sorted(stories.values(), key=min)
        assert min(b) - max(a) >= 600.0
        # same flow in the truth, own figures
        fa, fb = (truth.flows[k] for k in stories)
        assert (fa.proto, fa.client_ip, fa.client_port, fa.server_ip, fa.server_port) == (
            fb.proto,
            fb.client_ip,
            fb.client_port,
            fb.server_ip,
            fb.server_port,
        )
        own_figures += (fa.bytes_c2s, fa.bytes_s2c) != (fb.bytes_c2s, fb.bytes_s2c)
    assert own_figures >= 0.9 * len(reused)
    # every other 5-tuple belongs to exactly one story
    for members in by_tuple.values():
        if all(e.kind != "reuse" for e in members):
            assert len({e.story for e in members}) == 1


def test_without_spans_no_line_has_an_end(default: tuple[list[SimEvent], Truth]) -> None:
    events, _ = default
    assert not any(b'"end_time"' in e.line or e.true_end_s is not None for e in events)


@pytest.fixture(scope="module")
def spanned() -> tuple[list[SimEvent], Truth]:
    return generate(Scenario(events=4_000, seed=6, spans=True, port_reuse_fraction=0.2, reuse_gap_s=35.0))


def test_spans_flow_records_carry_their_session_and_arrive_after_its_end(
    spanned: tuple[list[SimEvent], Truth],
) -> None:
    events, truth = spanned
    s = truth.scenario
    rules = ParseRules.from_config(CFG)
    by_story: defaultdict[str, list[SimEvent]] = defaultdict(list)
    long_http = 0
    for e in events:
        by_story[e.story].append(e)
        doc = json.loads(e.line)
        if e.source in ("firewall", "cloud") or e.true_end_s is not None:
            assert e.source in ("firewall", "cloud") and e.true_end_s is not None, e
            assert e.true_time_s <= e.true_end_s <= e.true_time_s + s.max_session_s + 0.5
            skew = truth.skews[e.sensor]
            assert doc["end_time"] == pytest.approx(e.true_end_s + skew, abs=1e-6)
            parsed = parse_line(e.line, rules, NOW_MS)
            assert parsed is not None and parsed.end_time_us == round((e.true_end_s + skew) * 1e6)
            written = e.true_end_s - s.start_s  # a flow record is written when its span ends
        else:
            assert "end_time" not in doc
            written = e.true_time_s - s.start_s
        assert written - 1e-5 <= e.arrival_s <= written + s.max_arrival_delay_s + 1e-5
    long_sessions = 0
    for members in by_story.values():
        per_sensor: dict[str, tuple[float, float]] = {}  # a flow log's split records together: its whole span
        for e in members:
            if e.true_end_s is not None:
                lo, hi = per_sensor.get(e.sensor, (e.true_time_s, e.true_end_s))
                per_sensor[e.sensor] = (min(lo, e.true_time_s), max(hi, e.true_end_s))
        if not per_sensor:
            continue
        starts, ends = [lo for lo, _ in per_sensor.values()], [hi for _, hi in per_sensor.values()]
        # every sensor measures the same session to within half a second at either end
        assert max(starts) - min(starts) <= 0.5 + 1e-6 and max(ends) - min(ends) <= 1.0 + 1e-6
        long_sessions += min(ends) - max(starts) > 30.0
        for e in members:
            if e.source == "http":  # a request anywhere in the connection
                assert min(starts) - 0.5 <= e.true_time_s <= max(ends) + s.spread_s
                long_http += e.true_time_s - min(starts) > 30.0
    assert long_http >= 5, "some HTTP requests lie beyond a match window from their connection's start"
    assert long_sessions >= 0.1 * len(by_story), "a tenth of the sessions outlast a match window"


def test_spans_port_reuse_starts_the_gap_after_the_whole_session(spanned: tuple[list[SimEvent], Truth]) -> None:
    events, _ = spanned
    by_tuple: defaultdict[tuple[object, ...], list[SimEvent]] = defaultdict(list)
    for ev in events:
        key = five_tuple(ev)
        if key is not None:
            by_tuple[key].append(ev)
    gaps = []
    for members in by_tuple.values():
        if not any(e.kind == "reuse" for e in members):
            continue
        stories: defaultdict[str, list[SimEvent]] = defaultdict(list)
        for e in members:
            stories[e.story].append(e)
        assert len(stories) == 2
        a, b = sorted(stories.values(), key=lambda m: min(e.true_time_s for e in m))
        a_last = max(max(e.true_time_s, e.true_end_s or 0.0) for e in a)
        assert min(e.true_time_s for e in b) - a_last >= 35.0 - 0.5  # a span's end: within 0.5 s of the true end
        if any(e.true_end_s is not None for e in a) and any(e.true_end_s is not None for e in b):
            # from a record of the first session's end to one of the reuse's start (each within 0.5 s of the truth;
            # the gap runs from the first session's last report, up to spread_s after a short session's end)
            gaps.append(min(e.true_time_s for e in b if e.true_end_s) - max(e.true_end_s or 0.0 for e in a))
    assert len(gaps) >= 50
    assert min(gaps) >= 35.0 - 0.5 and max(gaps) <= 1.25 * 35.0 + 1.0 + 3.0


def test_noise_is_singletons(default: tuple[list[SimEvent], Truth]) -> None:
    events, _ = default
    noise = [e for e in events if e.kind == "noise"]
    assert len(noise) == round(Scenario().events * Scenario().noise_fraction)
    story_size = Counter(e.story for e in events)
    assert all(story_size[e.story] == 1 for e in noise)
    tuple_count = Counter(five_tuple(e) for e in events)
    flowless = [e for e in noise if five_tuple(e) is None]
    assert flowless  # some noise has no flow fields at all
    assert all(tuple_count[five_tuple(e)] == 1 for e in noise if five_tuple(e) is not None)


def test_truth_json_round_trip(default: tuple[list[SimEvent], Truth], tmp_path: Path) -> None:
    events, truth = default
    assert truth.flows and all(isinstance(f, FlowTruth) for f in truth.flows.values())
    assert json.loads(truth.to_json())["flows"]  # written
    assert Truth.from_json(truth.to_json()) == truth
    assert Truth.from_json(truth.to_json().decode()) == truth
    out, truth_path = tmp_path / "events.jsonl", tmp_path / "truth.json"
    write(events, truth, out, truth_path)
    assert out.read_bytes().splitlines() == [e.line for e in events]
    assert Truth.from_json(truth_path.read_bytes()) == truth
    gz = tmp_path / "events.jsonl.gz"
    write(events, truth, gz, truth_path)
    assert gzip.decompress(gz.read_bytes()).splitlines() == [e.line for e in events]


def test_scenario_validation() -> None:
    with pytest.raises(ValueError, match="reverse_fraction"):
        Scenario(reverse_fraction=1.5)
    with pytest.raises(ValueError, match="events"):
        Scenario(events=-1)
    assert generate(Scenario(events=0))[0] == []


def test_sessions_mode_is_what_storyline_synth_prints(
    capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``storyline synth`` is simulate's sessions mode: the same lines for the same seed and span, each of which
    parses; 1..4 lines per session."""
    monkeypatch.setattr(time, "time", lambda: 1_790_000_000.0)
    assert main(["synth", "--sessions", "200", "--seed", "5", "--span-s", "120"]) == 0
    lines = list(sessions(200, seed=5, start_s=1_790_000_000.0 - 120, span_s=120))
    assert capsysbinary.readouterr().out == b"".join(ln + b"\n" for ln in lines)
    assert lines == list(sessions(200, seed=5, start_s=1_790_000_000.0 - 120, span_s=120))
    assert 200 <= len(lines) <= 800
    for ln in lines:
        parse_line(ln, ParseRules.from_config(CFG), NOW_MS)


# --- scoring -----------------------------------------------------------------------------------------------

TRUTH = {"a": "X", "b": "X", "c": "X", "d": "Y", "e": "Y"}


def test_score_perfect() -> None:
    result = score({"a": "1", "b": "1", "c": "1", "d": "2", "e": "2"}, TRUTH)
    assert result["precision"] == result["recall"] == result["f1"] == result["exact"] == 1.0


def test_score_all_in_one() -> None:
    result = score(dict.fromkeys(TRUTH, "one"), TRUTH)
    # a, b, c: 3/5 each; d, e: 2/5 each
    assert result["precision"] == pytest.approx((3 * 3 / 5 + 2 * 2 / 5) / 5)
    assert result["recall"] == 1.0
    assert result["exact"] == 0.0


def test_score_all_singletons_and_missing_items() -> None:
    expected_recall = (3 * 1 / 3 + 2 * 1 / 2) / 5
    result = score({k: k for k in TRUTH}, TRUTH)
    assert result["precision"] == 1.0
    assert result["recall"] == pytest.approx(expected_recall)
    assert result["exact"] == 0.0
    assert score({}, TRUTH) == result  # missing items count as singletons
    # a missing item's singleton never merges with a predicted cluster whose key equals the item id
    assert score({"b": "a", "c": "a"}, TRUTH)["precision"] == 1.0


def test_score_partial_by_hand() -> None:
    # predicted {a, b}, {c, d}, {e}
    result = score({"a": "1", "b": "1", "c": "2", "d": "2", "e": "3"}, TRUTH)
    # precision: a 2/2, b 2/2, c 1/2, d 1/2, e 1/1 -> 4/5
    # recall:    a 2/3, b 2/3, c 1/3, d 1/2, e 1/2 -> 8/15
    assert result["precision"] == pytest.approx(4 / 5)
    assert result["recall"] == pytest.approx(8 / 15)
    assert result["f1"] == pytest.approx(0.64)
    assert result["exact"] == 0.0
    # predicted {a, b, c}, {d}, {e}: X exact, Y split
    result = score({"a": "1", "b": "1", "c": "1", "d": "2", "e": "3"}, TRUTH)
    assert result["exact"] == 0.5
    assert result["precision"] == 1.0
    assert result["recall"] == pytest.approx((3 * 1 + 2 * 1 / 2) / 5)
    assert score({}, {})["f1"] == 1.0


# --- reference clusterer -----------------------------------------------------------------------------------


def test_reference_solves_default_scenario(default: tuple[list[SimEvent], Truth]) -> None:
    events, truth = default
    result = score(link_reference(events, 30.0, truth.skews), truth.stories)
    assert result["precision"] >= 0.99
    assert result["recall"] >= 0.99
    # ±5 s skew is well inside the 30 s window: correction makes no difference on the default scenario
    plain = score(link_reference(events, 30.0, None), truth.stories)
    assert plain["precision"] >= 0.99
    assert plain["recall"] >= 0.99


def test_reference_needs_skew_correction_when_skew_is_large() -> None:
    events, truth = generate(Scenario(events=3_000, skew_s=40.0))
    corrected = score(link_reference(events, 30.0, truth.skews), truth.stories)
    assert corrected["precision"] >= 0.99 and corrected["recall"] >= 0.99
    plain = score(link_reference(events, 30.0, None), truth.stories)
    assert plain["recall"] < 0.9
    # ignoring the window merges reused 5-tuples
    merged = score(link_reference(events, 10**9, truth.skews), truth.stories)
    assert merged["precision"] < 1.0


# --- per-direction figures, initiator, flow logs ---------------------------------------------------------------


def _reported_client_first(doc: dict[str, object], flow: FlowTruth) -> bool:
    """Whether the line reports the flow client → server (else server → client; anything else fails)."""
    src = (ipaddress.ip_address(str(doc["src_ip"])), doc["src_port"])
    dst = (ipaddress.ip_address(str(doc["dst_ip"])), doc["dst_port"])
    client = (ipaddress.ip_address(flow.client_ip), flow.client_port)
    server = (ipaddress.ip_address(flow.server_ip), flow.server_port)
    assert {src, dst} == {client, server} and doc["proto"] == flow.proto
    return src == client


def _within_jitter(got: int, want: int, jitter: float = 0.03) -> bool:
    return (1 - jitter) * want - 1 <= got <= (1 + jitter) * want


def test_flow_truth_covers_every_story_with_a_flow(default: tuple[list[SimEvent], Truth]) -> None:
    events, truth = default
    with_flow = {e.story for e in events if five_tuple(e) is not None}
    assert set(truth.flows) == with_flow
    assert not {e.story for e in events if five_tuple(e) is None} & set(truth.flows)
    for ev in events:
        if ev.story in truth.flows:
            # the truth's endpoints are the line's, and `reversed` says which way round it reports them
            assert _reported_client_first(json.loads(ev.line), truth.flows[ev.story]) is not ev.reversed
    for f in truth.flows.values():
        assert f.proto in {"tcp", "udp"} and f.jitter == 0.03
        assert min(f.packets_c2s, f.packets_s2c) >= 1 and min(f.bytes_c2s, f.bytes_s2c) >= f.packets_c2s // 100
        assert f.bytes_c2s >= 28 and f.bytes_s2c >= 28
    http = [f for f in truth.flows.values() if f.server_port in (80, 443) and f.proto == "tcp"]
    assert sum(f.bytes_s2c > f.bytes_c2s for f in http) > 0.75 * len(http)  # responses larger than requests


def test_firewall_figures_follow_the_reported_direction(default: tuple[list[SimEvent], Truth]) -> None:
    events, truth = default
    checked = {False: 0, True: 0}
    for ev in events:
        if ev.source != "firewall":
            continue
        f, a = truth.flows[ev.story], json.loads(ev.line)["attrs"]
        want = (
            (f.bytes_s2c, f.bytes_c2s, f.packets_s2c, f.packets_c2s)
            if ev.reversed
            else (f.bytes_c2s, f.bytes_s2c, f.packets_c2s, f.packets_s2c)
        )
        assert _within_jitter(a["src_bytes"], want[0]) and _within_jitter(a["dst_bytes"], want[1]), (ev.line, f)
        assert (a["src_packets"], a["dst_packets"]) == want[2:], (ev.line, f)
        assert "bytes" not in a and "packets" not in a
        checked[ev.reversed] += 1
    assert min(checked.values()) > 300


def test_initiator_is_consistent_with_reversed(default: tuple[list[SimEvent], Truth]) -> None:
    events, _ = default
    counts: Counter[tuple[str, str | None]] = Counter()
    for ev in events:
        doc = json.loads(ev.line)
        initiator = doc["attrs"].get("initiator")
        if ev.source == "firewall" or (ev.source == "endpoint" and "proto" in doc):
            assert initiator == ("dst" if ev.reversed else "src"), ev.line
        else:
            assert initiator is None, ev.line
        counts[(ev.source, initiator)] += 1
    for source in ("firewall", "endpoint"):
        assert counts[(source, "src")] > 2 * counts[(source, "dst")] > 0


def test_flow_log_records_add_up_per_direction(default: tuple[list[SimEvent], Truth]) -> None:
    """Each cloud sensor of a story: per direction it reports, its records' src_bytes add up to one jittered
    figure and its src_packets to the true packets; some sensors see one direction only, some records are
    split in two."""
    events, truth = default
    records: defaultdict[tuple[str, str], defaultdict[bool, list[SimEvent]]] = defaultdict(lambda: defaultdict(list))
    for ev in events:
        if ev.source == "cloud":
            records[(ev.story, ev.sensor)][ev.reversed].append(ev)
    one_direction = splits = 0
    for (story, _), by_dir in records.items():
        f = truth.flows[story]
        kind = next(iter(by_dir.values()))[0].kind
        assert 1 <= len(by_dir) <= 2
        if len(by_dir) == 1 and kind != "noise":
            one_direction += 1
        for s2c, recs in by_dir.items():
            attrs = [json.loads(e.line)["attrs"] for e in recs]
            assert all(set(a) == {"vpc", "account", "src_bytes", "src_packets", "action"} for a in attrs)
            assert all(a["src_packets"] >= 1 and a["src_bytes"] >= 1 for a in attrs)
            b, p = (f.bytes_s2c, f.packets_s2c) if s2c else (f.bytes_c2s, f.packets_c2s)
            assert _within_jitter(sum(a["src_bytes"] for a in attrs), b), (recs, f)
            assert sum(a["src_packets"] for a in attrs) == p, (recs, f)
            assert len(recs) <= 2
            if len(recs) == 2:
                splits += 1
                assert kind != "noise"
                t1, t2 = sorted(e.true_time_s for e in recs)
                assert 0.5 - 1e-6 <= t2 - t1 <= 5.0 + 1e-6
                assert len({e.id for e in recs}) == 2
        if kind == "noise":
            assert sum(len(r) for r in by_dir.values()) == 1
    sessions_seen = sum(1 for (story, _) in records if not story.startswith("nz"))
    assert 0.05 * sessions_seen <= one_direction <= 0.15 * sessions_seen, (one_direction, sessions_seen)
    assert splits >= 50, splits


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 13, 100, 999, 2_500])
def test_exact_event_count_for_any_budget(n: int) -> None:
    for seed in range(1, 13 if n < 100 else 3):
        for noise in (0.0, 0.05):
            events, truth = generate(Scenario(events=n, seed=seed, noise_fraction=noise))
            assert len(events) == n, (n, seed, noise)
            assert len(truth.stories) == n == len({e.id for e in events})
            assert set(truth.flows) == {e.story for e in events if five_tuple(e) is not None}


def test_flow_log_budget_drops_splits_then_the_second_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulate, "_CLOUD_SPLIT", 1.0)
    monkeypatch.setattr(simulate, "_CLOUD_ONE_DIRECTION", 0.0)
    gen = simulate._Generator(Scenario(events=100, seed=3))
    for i in range(1_000):
        ses = gen.new_session(f"s{i}", "session")
        if min(ses.c2s[1], ses.s2c[1]) >= 2:
            break
    else:
        pytest.fail("no session with two packets each way")
    for extra, want in ((5, (2, 2)), (3, (2, 2)), (2, (1, 2)), (1, (1, 1)), (0, (1,))):
        gen.pending.clear()
        assert gen._emit_flow_log(ses, "vpcflow-1", extra) == min(extra, 3)
        per_dir = Counter(p.reversed for p in gen.pending)
        assert tuple(sorted(per_dir.values())) == want, (extra, per_dir)
        for s2c in per_dir:
            recs = [p for p in gen.pending if p.reversed == s2c]
            assert sum(p.attrs["src_packets"] for p in recs) == (ses.s2c if s2c else ses.c2s)[1]
            assert all(p.flow is not None and (p.flow[1] == ses.server_ip) is s2c for p in recs)


def test_truth_without_flows_still_loads(default: tuple[list[SimEvent], Truth]) -> None:
    _, truth = default
    doc = json.loads(truth.to_json())
    del doc["flows"]
    old = Truth.from_json(json.dumps(doc))
    assert old.flows == {} and old.stories == truth.stories and old.arrivals == truth.arrivals
    # a flow without `jitter` takes the default
    doc = json.loads(truth.to_json())
    key, flow = next(iter(doc["flows"].items()))
    del flow["jitter"]
    assert Truth.from_json(json.dumps(doc)).flows[key] == truth.flows[key]


def test_deterministic_with_flows() -> None:
    s = Scenario(events=3_000, seed=11)
    a_events, a_truth = generate(s)
    b_events, b_truth = generate(s)
    assert [e.line for e in a_events] == [e.line for e in b_events]
    assert a_truth.to_json() == b_truth.to_json()
    assert a_truth.flows == b_truth.flows
