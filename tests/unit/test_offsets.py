"""Learned sensor clock offsets, the pure parts (engine.correlate.offsets): evidence from linked events, mergeable
sketches of differences, the estimate relative to a reference, jumps."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.config import from_mapping
from engine.core.event import Event
from engine.core.stage import EMPTY
from engine.correlate import offsets as off
from engine.correlate.offsets import BIN_US, Sketch, estimate_pair, evidence, jumped, merge, solve
from engine.correlate.story import StoryMachine
from tests.unit.test_story import batch, config, ev

S = 1_000_000  # µs per second


def sketch_of(diffs_us: list[int]) -> Sketch:
    counts: dict[int, int] = {}
    for d in diffs_us:
        counts[d // BIN_US] = counts.get(d // BIN_US, 0) + 1
    return Sketch.of(counts)


# --- sketches -----------------------------------------------------------------------------------------------


@given(st.lists(st.lists(st.integers(-(10**10), 10**10), max_size=40), min_size=1, max_size=5), st.randoms())
@settings(max_examples=60, deadline=None)
def test_merge_adds_counts_in_any_order(parts: list[list[int]], rnd: random.Random) -> None:
    sketches = [sketch_of(p) for p in parts]
    whole = sketch_of([d for p in parts for d in p])
    shuffled = sketches[:]
    rnd.shuffle(shuffled)
    assert merge(sketches) == whole == merge(shuffled)
    assert merge([merge(sketches[:1]), merge(sketches[1:])]) == whole
    assert whole.total == sum(len(p) for p in parts)


def test_a_sketch_stays_bounded_and_keeps_what_counts() -> None:
    # many scattered wrong pairs and a peak at the offset: the scattered bins go first
    rnd = random.Random(3)
    diffs = [300 * S + rnd.randint(-2 * S, 2 * S) for _ in range(20_000)]
    diffs += [rnd.randint(-7_200 * S, 7_200 * S) for _ in range(10_000)]
    sk = sketch_of(diffs)
    assert len(sk.bins) <= off.MAX_BINS
    est = estimate_pair(sk)
    assert est is not None and abs(est.median_us - 300 * S) < 0.5 * S
    # past MAX_COUNT every count halves: the median stays
    big = Sketch.of({10: off.MAX_COUNT, 11: off.MAX_COUNT, 12: 3})
    # halved until within: twice (the first leaves one too many), and the bin of 3 is gone
    assert big == Sketch([10, 11], [off.MAX_COUNT // 4, off.MAX_COUNT // 4])


def test_estimate_median_count_and_spread() -> None:
    rnd = random.Random(1)
    diffs = [42 * S + rnd.randint(-3 * S, 3 * S) for _ in range(5_001)]
    est = estimate_pair(sketch_of(diffs))
    assert est is not None
    true_median = sorted(diffs)[len(diffs) // 2]
    assert abs(est.median_us - true_median) <= BIN_US
    assert est.samples == 5_001
    assert abs(est.spread_us - 1.5 * S) < 0.1 * S  # uniform ±3 s: quartiles at ±1.5 s
    assert estimate_pair(Sketch([], [])) is None


def test_the_median_is_robust_to_a_tenth_of_wrong_pairs() -> None:
    rnd = random.Random(2)
    diffs = [-90 * S + rnd.randint(-2 * S, 2 * S) for _ in range(900)]
    diffs += [rnd.randint(-3_600 * S, 3_600 * S) for _ in range(100)]
    est = estimate_pair(sketch_of(diffs))
    assert est is not None and abs(est.median_us + 90 * S) < 0.5 * S


# --- solving ------------------------------------------------------------------------------------------------


def pairs_for(truth_s: dict[str, float], links: list[tuple[str, str, int]], seed: int = 0) -> dict[off.Pair, Sketch]:
    """Sketches of simulated differences t_a - t_b = off_a - off_b + session noise (±3 s), ``n`` per pair."""
    rnd = random.Random(seed)
    out = {}
    for x, y, n in links:
        a, b = min(x, y), max(x, y)
        out[(a, b)] = sketch_of([round((truth_s[a] - truth_s[b] + rnd.uniform(-3, 3)) * S) for _ in range(n)])
    return out


def test_solve_places_every_reachable_sensor_against_the_reference() -> None:
    truth = {"fw-1": 0.0, "edr-1": 290.0, "dns-1": -45.5, "proxy-1": 3_600.0, "lonely": 12.0}
    links = [("fw-1", "edr-1", 400), ("edr-1", "dns-1", 300), ("fw-1", "proxy-1", 200), ("lonely", "fw-1", 5)]
    est = solve(pairs_for(truth, links), "fw-1", min_samples=30)
    assert est.reference == "fw-1"
    assert set(est.offsets_us) == {"fw-1", "edr-1", "dns-1", "proxy-1"}  # "lonely": too few samples
    for sensor, value in est.offsets_us.items():
        assert abs(value / S - truth[sensor]) < 0.5, (sensor, value)
    assert est.samples["dns-1"] == 300 and est.samples["fw-1"] == 600
    assert 1.0 * S < est.spread_us["edr-1"] < 2.0 * S


def test_solve_without_a_reference_picks_the_best_supported_sensor_and_is_deterministic() -> None:
    truth = {"a": 10.0, "b": 0.0, "c": -20.0}
    pairs = pairs_for(truth, [("a", "b", 800), ("b", "c", 800), ("a", "c", 400)])
    est = solve(pairs, None, min_samples=30)
    assert est.reference == "b"  # 1,600 samples against 1,200 for a and c
    assert abs(est.offsets_us["a"] / S - 10.0) < 0.5 and abs(est.offsets_us["c"] / S + 20.0) < 0.5
    assert solve(dict(reversed(list(pairs.items()))), None, min_samples=30) == est
    assert solve(pairs, None, min_samples=10_000) == off.Estimate(
        reference=None, offsets_us={}, samples={}, spread_us={}
    )


def test_solve_takes_a_pair_in_either_order() -> None:
    sk = sketch_of([5 * S] * 50)  # t_x - t_y = 5 s given as the pair (x, y) with x > y
    est = solve({("x", "w"): sk}, "w", min_samples=10)
    # the key ("x", "w") means t_x - t_w = 5 s: x runs 5 s ahead of w
    assert abs(est.offsets_us["x"] - 5 * S) <= BIN_US


# --- jumps --------------------------------------------------------------------------------------------------


def test_a_jump_is_a_move_well_beyond_the_spread() -> None:
    rnd = random.Random(4)
    long = sketch_of([60 * S + rnd.randint(-3 * S, 3 * S) for _ in range(2_000)])
    same = sketch_of([60 * S + rnd.randint(-3 * S, 3 * S) for _ in range(100)])
    reset = sketch_of([rnd.randint(-3 * S, 3 * S) for _ in range(100)])
    assert not jumped(long, same, min_samples=30)
    assert jumped(long, reset, min_samples=30)
    assert not jumped(long, reset, min_samples=300)  # too little evidence yet
    small = sketch_of([62 * S + rnd.randint(-1 * S, 1 * S) for _ in range(100)])
    assert not jumped(long, small, min_samples=30)  # 2 s: within what sessions alone move


# --- evidence -----------------------------------------------------------------------------------------------

COLS = {
    "id": pl.String,
    "flow": pl.UInt64,
    "shard": pl.Int32,
    "sensor": pl.String,
    "raw": pl.Int64,
    "ingest": pl.Int64,
    "src_port": pl.Int32,
    "dst_port": pl.Int32,
}


def frame(rows: list[tuple[str, int, str, float, int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(i, f, f % 2, s, round(t * S), ing, sp, dp) for i, f, s, t, ing, sp, dp in rows], schema=COLS, orient="row"
    )


def as_counts(ev: dict[tuple[int, int], dict[off.Pair, dict[int, int]]]) -> dict[off.Pair, list[float]]:
    """The differences (s, binned) per pair, over the epochs and shards (flow f lives in shard f % 2)."""
    pairs: dict[off.Pair, Sketch] = {}
    for per_shard in ev.values():
        for p, counts in per_shard.items():
            pairs[p] = merge([pairs.get(p, Sketch([], [])), Sketch.of(counts)])
    return as_lists(pairs)


def as_lists(ev: dict[off.Pair, Sketch]) -> dict[off.Pair, list[float]]:
    return {
        p: sorted(b * BIN_US / S for b, c in zip(sk.bins, sk.counts, strict=True) for _ in range(c))
        for p, sk in ev.items()
    }


def test_evidence_pairs_sensors_of_one_flow_within_the_limits() -> None:
    old = frame(
        [
            ("o1", 1, "fw", 1_000.0, 10_000, 40_000, 443),
            ("o2", 2, "fw", 1_000.0, 10_000, 40_001, 443),
            ("o3", 3, "fw", 1_000.0, 10_000, 123, 123),  # NTP: no ephemeral port
            ("o4", 4, "fw", 1_000.0, 10_000, 40_002, 443),
            ("o5", 5, "fw", 1_000.0, 10_000, 40_003, 443),
        ]
    )
    new = frame(
        [
            ("n1", 1, "edr", 1_300.0, 20_000, 443, 40_000),  # reversed: the same flow; 300 s ahead
            ("n2", 2, "fw", 1_001.0, 20_000, 40_001, 443),  # the same sensor: nothing
            ("n3", 3, "edr", 1_000.0, 20_000, 123, 123),
            ("n4", 4, "edr", 1_000.0, 700_000, 40_002, 443),  # ingested 690 s later: beyond max_wait
            ("n5", 5, "edr", 9_000.0, 20_000, 40_003, 443),  # 8,000 s apart: beyond max_offset
        ]
    )
    ev = evidence(new, pl.concat([old, new]), max_offset_us=7_200 * S, max_wait_ms=600_000)
    assert as_counts(ev) == {("edr", "fw"): [300.0]}
    assert list(ev) == [(0, 1)], "counted in the shard of its flow (flow 1: shard 1), epoch 0 (none given)"


def test_evidence_takes_the_nearest_event_per_sensor_and_counts_new_pairs_once() -> None:
    old = frame([("o1", 1, "fw", 100.0, 0, 50_000, 22), ("o2", 1, "fw", 160.0, 0, 50_000, 22)])
    new = frame(
        [
            ("n1", 1, "edr", 130.5, 1_000, 50_000, 22),  # nearest fw: o1 (30.5 s) — o2 is 29.5 s: o2
            ("n2", 1, "dns", 101.0, 1_000, 22, 50_000),
            ("n3", 1, "edr", 102.0, 1_000, 50_000, 22),
        ]
    )
    ev = as_counts(evidence(new, pl.concat([old, new]), max_offset_us=7_200 * S, max_wait_ms=600_000))
    # n1's nearest fw event is o2 (-29.5 s, nearer than o1's 30.5 s), n3's is o1 (2 s)
    assert ev[("edr", "fw")] == [-29.5, 2.0]
    assert ev[("dns", "fw")] == [1.0]
    # n2's nearest edr event is n3 (-1 s); n1's nearest dns event is n2 (t_dns - t_edr = -29.5 s); the pair n2-n3
    # shows up from both sides and counts once
    assert ev[("dns", "edr")] == [-29.5, -1.0]


# --- the table of an epoch ------------------------------------------------------------------------------------


def row(epoch: int, shard: int, pairs: dict[tuple[str, str], list[float]]) -> off.EvidenceRow:
    return off.EvidenceRow(
        epoch, shard, {off.pair_key(a, b): sketch_of([round(d * S) for d in ds]) for (a, b), ds in pairs.items()}
    )


def noisy(center_s: float, n: int, seed: int) -> list[float]:
    rnd = random.Random(seed)
    return [center_s + rnd.uniform(-3, 3) for _ in range(n)]


def adv(
    prev: off.OffsetTable | None,
    epoch: int,
    rows: list[off.EvidenceRow],
    *,
    reference: str | None = None,
    expire_epochs: int = 100,
) -> off.OffsetTable:
    return off.advance(
        prev, epoch, rows, reference=reference, min_samples=30, delay_epochs=1, expire_epochs=expire_epochs
    )


def test_a_table_merges_each_shards_row_once_and_only_old_enough_epochs() -> None:
    rows = [
        row(0, 0, {("edr", "fw"): noisy(300, 20, 1)}),
        row(0, 1, {("edr", "fw"): noisy(300, 20, 2)}),
        row(1, 0, {("edr", "fw"): noisy(300, 20, 3)}),  # epoch 1: not before table 2 (delay 1)
    ]
    t2 = adv(None, 2, rows)
    assert t2.merged == {0: [0, 1]} and t2.pairs[off.pair_key("edr", "fw")].sketch.total == 40
    assert t2.reference == "edr" and abs(t2.offsets_us["fw"] + 300 * S) < 1.0 * S  # fw runs 300 s behind edr
    # the next table: epoch 1 now, epoch 0's rows passed again are not counted twice
    t3 = adv(t2, 3, rows)
    assert t3.merged == {0: [0, 1], 1: [0]} and t3.pairs[off.pair_key("edr", "fw")].sketch.total == 60
    # a row of epoch 0 that comes in late (within the look-back) is merged then; rewritten rows are not
    late = row(0, 2, {("edr", "fw"): noisy(300, 10, 4)})
    t4 = adv(t3, 4, [*rows, late, row(0, 0, {("edr", "fw"): noisy(0, 99, 5)})])
    assert t4.merged[0] == [0, 1, 2] and t4.pairs[off.pair_key("edr", "fw")].sketch.total == 70
    assert t4.reference == "edr", "the reference is kept"
    assert adv(t3, 4, [*rows, late]) == t4
    # a table round-trips through its stored form
    assert msgspec.json.decode(msgspec.json.encode(t4), type=off.OffsetTable) == t4


def test_a_jump_starts_the_pair_over_and_old_pairs_expire() -> None:
    key = off.pair_key("edr", "fw")
    t = adv(None, 2, [row(0, 0, {("edr", "fw"): noisy(60, 500, 1)})])
    assert abs(t.offsets_us["fw"] + 60 * S) < S and not t.jumps
    t = adv(t, 3, [row(1, 0, {("edr", "fw"): noisy(3_660, 100, 2)})])  # fw's clock set back 1 h
    assert not t.jumps and abs(t.offsets_us["fw"] + 60 * S) < S, "one epoch of it is held aside"
    assert t.pairs[key].candidate is not None and t.pairs[key].sketch.total == 500
    t = adv(t, 4, [row(2, 0, {("edr", "fw"): noisy(3_660, 100, 4)})])  # the next epoch says the same: a jump
    assert t.jumps == [key] and abs(t.offsets_us["fw"] + 3_660 * S) < S and t.pairs[key].sketch.total == 200
    assert t.pairs[key].candidate is None
    # a burst of one epoch that the next does not confirm is dropped
    t = adv(t, 5, [row(3, 0, {("edr", "fw"): noisy(-500, 100, 5)})])
    t = adv(t, 6, [row(4, 0, {("edr", "fw"): noisy(3_660, 100, 6)})])
    assert not t.jumps and abs(t.offsets_us["fw"] + 3_660 * S) < S and t.pairs[key].candidate is None
    t = adv(t, 8, [row(6, 0, {("dns", "edr"): noisy(5, 50, 3)})], expire_epochs=1)
    assert set(t.pairs) == {off.pair_key("dns", "edr")}, "edr-fw had no evidence in the newest epoch merged (6)"
    assert t.reference == "edr" and "fw" not in t.offsets_us and abs(t.offsets_us["dns"] - 5 * S) < S


def test_a_configured_reference_wins() -> None:
    t = adv(None, 2, [row(0, 0, {("edr", "fw"): noisy(300, 100, 1)})], reference="fw")
    assert t.reference == "fw" and t.offsets_us["fw"] == 0 and abs(t.offsets_us["edr"] - 300 * S) < S


def test_a_large_call_gives_evidence_from_a_sample_of_its_flows() -> None:
    n = 3 * off.SAMPLE_EVENTS
    rnd = random.Random(7)
    flows = [rnd.getrandbits(64) for _ in range(n)]
    old = frame([(f"o{i}", f, "fw", 1_000.0, 0, 40_000, 443) for i, f in enumerate(flows)])
    new = frame([(f"n{i}", f, "edr", 1_060.0, 1_000, 40_000, 443) for i, f in enumerate(flows)])
    got = as_counts(evidence(new, pl.concat([old, new]), max_offset_us=7_200 * S, max_wait_ms=600_000))
    taken = len(got[("edr", "fw")])
    assert 0.8 * off.SAMPLE_EVENTS < taken < 1.2 * off.SAMPLE_EVENTS and set(got[("edr", "fw")]) == {60.0}


def test_the_estimate_ignores_a_broad_tail_of_events_in_long_connections() -> None:
    """Requests minutes into long connections against the connections' starts: a broad positive tail (here more
    than half of the differences) that drags a plain median tens of seconds off; the peak window's median stays
    put, and a period of such evidence is not a jump."""
    rnd = random.Random(8)
    diffs = [120 * S + round(rnd.uniform(-2, 2) * S) for _ in range(600)]
    diffs += [120 * S + round(rnd.uniform(5, 300) * S) for _ in range(700)]
    sk = sketch_of(diffs)
    plain = sorted(diffs)[len(diffs) // 2]
    assert plain - 120 * S > 10 * S  # what a plain median would say
    est = estimate_pair(sk)
    assert est is not None and abs(est.median_us - 120 * S) < 0.5 * S and 550 <= est.samples <= 620
    later = sketch_of(
        [120 * S + round(rnd.uniform(-2, 2) * S) for _ in range(60)]
        + [140 * S + round(rnd.uniform(0, 200) * S) for _ in range(60)]
    )
    assert not jumped(sk, later, min_samples=30)


# --- in the story builder ---------------------------------------------------------------------------------------


def test_the_story_builder_gathers_evidence_per_epoch_and_applies_the_epochs_table(tmp_path: Path) -> None:
    """Two sensors of one flow, the endpoint's clock 300 s ahead: no story joins them until the epoch's table says
    so. The evidence of an epoch is emitted when the epoch closes for the shard, one row per (epoch, shard); a
    configured offset wins over the learned one; a runtime that hands over tables must hand over every epoch's."""
    cfg = config(tmp_path, offsets={"epoch_ms": 10_000}, dns_names=False)  # 10 buckets of 1 s per epoch
    m = StoryMachine.for_config(cfg)
    m.use_offset_tables()
    m.set_offset_table(off.OffsetTable(epoch=0))
    pairs = [(f"f{i}", f"e{i}", 40_000 + i) for i in range(12)]
    events = []
    for i, (f, e, port) in enumerate(pairs):
        events += [
            ev(f, i * 0.5, sport=port),
            ev(e, 300 + i * 0.5 + 0.2, sensor="edr-1", source="endpoint", sport=port),
        ]
    out = m.on_buckets([(3, {0: batch(*events)})])
    assert out.evidence == []  # epoch 0 is still open
    assert m.offset_epochs([(10, {0: EMPTY})]) == [1]
    with pytest.raises(RuntimeError, match="no offset table for epoch 1"):
        m.on_buckets([(10, {0: batch(ev("x", 1.0, sport=50_001))})])
    m = StoryMachine.for_config(cfg)  # the failed call left the machine half-way (the worker would rebuild it)
    m.use_offset_tables()
    m.set_offset_table(off.OffsetTable(epoch=0))
    m.on_buckets([(3, {0: batch(*events)})])
    learned = off.OffsetTable(epoch=1, reference="fw-1", offsets_us={"fw-1": 0, "edr-1": 300 * S})
    m.set_offset_table(learned)
    assert m.offset_epochs([(10, {0: EMPTY})]) == []
    out = m.on_buckets([(10, {0: EMPTY})])
    (rec,) = out.evidence
    row = msgspec.msgpack.decode(rec.body, type=off.EvidenceRow)
    assert (rec.epoch, rec.shard, row.epoch, row.shard) == (0, 0, 0, 0)
    est = estimate_pair(row.pairs[off.pair_key("edr-1", "fw-1")])
    assert est is not None and est.samples == 12 and abs(est.median_us - 300.2 * S) <= BIN_US
    # epoch 1 applies the table: a new pair of reports of one connection joins in one story
    joined = [ev("f99", 310.0, sport=50_000), ev("e99", 610.3, sensor="edr-1", source="endpoint", sport=50_000)]
    m.on_buckets([(11, {0: batch(*joined)})])
    drained = m.drain([0], 11)
    bodies = [msgspec.json.decode(r.body) for r in drained.stories]
    assert any(set(b["event_ids"]) == {"f99", "e99"} for b in bodies)
    # epoch 0's reports were apart (no table yet); at epoch 1's first bucket they took its offsets and linked
    assert all(any({f, e} == set(b["event_ids"]) for b in bodies) for f, e, _ in pairs)
    assert m.counters.recorrected == 12 and m.counters.merged == 12
    assert [r.epoch for r in drained.evidence] == [1]  # a drain emits the open epoch's evidence
    # a configured offset wins over the learned one
    m2 = StoryMachine.for_config(
        config(tmp_path, offsets={"epoch_ms": 10_000}, sensor_offsets_ms={"edr-1": 5_000}, dns_names=False)
    )
    m2.set_offset_table(learned)
    assert m2.offsets_us(1) == {"fw-1": 0, "edr-1": 5_000_000}


def test_a_period_of_scattered_differences_is_not_a_jump() -> None:
    rnd = random.Random(9)
    long = sketch_of([30 * S + round(rnd.uniform(-2, 2) * S) for _ in range(2_000)])
    scattered = sketch_of([round(rnd.uniform(-600, 600) * S) for _ in range(120)])  # no peak: 6 s windows of 1 s
    concentrated = sketch_of([-3_570 * S + round(rnd.uniform(-2, 2) * S) for _ in range(40)])
    assert not jumped(long, scattered, min_samples=1)
    assert jumped(long, concentrated, min_samples=30)


def test_the_evidence_does_not_depend_on_how_buckets_are_grouped_into_calls() -> None:
    """The evidence is gathered per period of buckets (10 s of ingest time), not per call: a worker that is
    behind hands several buckets per call, a replay others again, and both must emit the same evidence rows as
    one call per bucket. Reports of one flow from three sensors arrive in different buckets, inside and across the
    periods, so the nearest-event rule would pair them differently if the calls decided what was new together."""
    cfg = from_mapping(
        {"tenant": "ev", "shards": 4, "bucket_ms": 1000, "correlate": {"match_window_ms": 30_000, "max_wait_ms": 9_000}}
    )
    rnd = random.Random(5)
    arrivals: dict[int, list[Event]] = {}
    for i in range(60):
        port = 40_000 + i
        for sensor, skew in (("fw-1", 0.0), ("edr-1", 2.0), ("ndr-1", -1.0)):
            for k in range(rnd.randint(1, 2)):
                e = ev(f"{sensor}-{i}-{k}", i * 0.6 + skew + rnd.uniform(0, 4), sensor=sensor, sport=port)
                arrivals.setdefault(int(i * 0.6) + rnd.randrange(6), []).append(e)
    buckets = range(45)

    def rows(groups: list[int]) -> list[tuple[int, int, bytes]]:
        m = StoryMachine.for_config(cfg)
        out: list[tuple[int, int, bytes]] = []
        at = 0
        for size in groups:
            call = [(b, {0: batch(*arrivals.get(b, []))}) for b in buckets[at : at + size]]
            out += [(r.epoch, r.shard, r.body) for r in m.on_buckets(call).evidence]
            at += size
        out += [(r.epoch, r.shard, r.body) for r in m.drain([0], buckets[-1]).evidence]
        return out

    one = rows([1] * 45)
    samples = sum(sk.total for *_, b in one for sk in msgspec.msgpack.decode(b, type=off.EvidenceRow).pairs.values())
    assert samples > 60, "too little evidence to tell groupings apart"
    assert rows([7] * 6 + [3]) == one
    assert rows([3, 11, 1, 20, 10]) == one
    assert rows([45]) == one
