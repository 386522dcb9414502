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
from engine.tools.accuracy import link_reference, score
from engine.tools.simulate import Scenario, SimEvent, Truth, generate, sessions, write

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
        "firewall": {"action", "rule", "bytes", "packets"},
        "endpoint": {"process", "pid", "user", "host"},
        "dns": {"query", "answer", "rcode"},
        "http": {"method", "host", "path", "status", "user_agent"},
        "cloud": {"vpc", "account", "bytes", "packets", "action"},
    }
    seen = Counter(e.source for e in events)
    assert set(seen) == set(schemas)
    for ev in events:
        doc = json.loads(ev.line)
        assert schemas[ev.source] <= set(doc["attrs"]), ev.line
        assert ev.sensor.split("-")[0] in {"fw", "edr", "dns", "proxy", "vpcflow"}
        if ev.source == "dns":
            assert doc["proto"] == "udp" and 53 in (doc["src_port"], doc["dst_port"])
        if ev.source == "http":
            assert doc["proto"] == "tcp" and {doc["src_port"], doc["dst_port"]} & {80, 443}
        if ev.source == "cloud":
            assert doc["attrs"]["action"] in {"ACCEPT", "REJECT"}


def test_sessions_one_to_four_distinct_sensors(default: tuple[list[SimEvent], Truth]) -> None:
    events, _ = default
    by_story: defaultdict[str, list[SimEvent]] = defaultdict(list)
    for ev in events:
        by_story[ev.story].append(ev)
    sizes = Counter(len(v) for v in by_story.values())
    assert set(sizes) == {1, 2, 3, 4}
    for members in by_story.values():
        assert len({e.sensor for e in members}) == len(members)
        times = [e.true_time_s for e in members]
        assert max(times) - min(times) <= Scenario().spread_s


def test_reverse_fraction(default: tuple[list[SimEvent], Truth]) -> None:
    events, _ = default
    with_flow = [e for e in events if five_tuple(e) is not None]
    share = sum(e.reversed for e in with_flow) / len(with_flow)
    assert 0.28 <= share <= 0.32
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
    events, _ = default
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
    # every other 5-tuple belongs to exactly one story
    for members in by_tuple.values():
        if all(e.kind != "reuse" for e in members):
            assert len({e.story for e in members}) == 1


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
