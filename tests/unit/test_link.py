"""Tests for engine.correlate.link: hand cases, long chains, and agreement with the per-event baseline."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.correlate import link as link_mod
from engine.correlate.link import components, link, window_edges
from engine.testing.baseline import link_baseline

ROOT = Path(__file__).resolve().parents[2]

W = 10
BOTH_PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])


def frame(flow: Sequence[int | None], t: Sequence[int | None], **more: Sequence[int | None]) -> pl.DataFrame:
    cols: dict[str, pl.Series] = {
        "flow": pl.Series(flow, dtype=pl.UInt64),
        "t": pl.Series(t, dtype=pl.Int64),
    }
    for name, values in more.items():
        cols[name] = pl.Series(values, dtype=pl.UInt64)
    return pl.DataFrame(cols)


def groups(labels: Sequence[int]) -> list[list[int]]:
    """The partition of row indices that the labels describe, in a canonical order."""
    by: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by.setdefault(lab, []).append(i)
    return sorted(by.values())


def labels_of(df: pl.DataFrame, keys: Sequence[tuple[str, int]], fast: bool = True) -> list[int]:
    out = link(df, keys, fast_path=fast)
    assert out.len() == df.height
    assert out.dtype == pl.get_index_type()
    return out.to_list()


# --- hand cases ---------------------------------------------------------------------------------------------------


@BOTH_PATHS
def test_same_flow_within_window_is_one_story(fast: bool) -> None:
    assert labels_of(frame([1, 1], [100, 105]), [("flow", W)], fast) == [0, 0]


@BOTH_PATHS
def test_same_flow_beyond_window_is_two_stories(fast: bool) -> None:
    assert labels_of(frame([1, 1], [100, 111]), [("flow", W)], fast) == [0, 1]


@BOTH_PATHS
def test_different_flows_never_link(fast: bool) -> None:
    assert labels_of(frame([1, 2, 1], [0, 0, 0]), [("flow", W)], fast) == [0, 1, 0]


@BOTH_PATHS
def test_window_boundary_is_inclusive(fast: bool) -> None:
    assert labels_of(frame([1, 1], [0, W]), [("flow", W)], fast) == [0, 0]
    assert labels_of(frame([1, 1], [0, W + 1]), [("flow", W)], fast) == [0, 1]
    assert labels_of(frame([1, 1], [5, 5]), [("flow", 0)], fast) == [0, 0]
    assert labels_of(frame([1, 1], [5, 6]), [("flow", 0)], fast) == [0, 1]


@BOTH_PATHS
def test_chain_links_transitively(fast: bool) -> None:
    # A-C is 16 > W apart, but A-B and B-C are each 8 <= W: one story. Rows are out of time order on purpose.
    df = frame([1, 1, 1], [16, 0, 8])
    assert labels_of(df, [("flow", W)], fast) == [0, 0, 0]
    # Break the chain in the middle: C is 11 after B.
    assert labels_of(frame([1, 1, 1], [19, 0, 8]), [("flow", W)], fast) == [0, 1, 1]


@BOTH_PATHS
def test_label_is_smallest_row_of_the_story_in_frame_order(fast: bool) -> None:
    df = frame([2, 1, 2, 1, 3], [50, 40, 45, 100, 0])
    assert labels_of(df, [("flow", W)], fast) == [0, 1, 0, 3, 4]


@BOTH_PATHS
def test_null_keys_and_null_times_never_link(fast: bool) -> None:
    df = frame([None, None, 1, 1, 1], [0, 0, 0, None, 0])
    assert labels_of(df, [("flow", W)], fast) == [0, 1, 2, 3, 2]


def test_second_key_bridges_two_components_of_the_first() -> None:
    # flow: rows 0-1 and rows 2-3 are two stories; the DNS answer key links row 1 to row 2.
    df = frame([1, 1, 2, 2], [0, 5, 30, 35], dns=[None, 7, 7, None])
    assert labels_of(df, [("flow", W)]) == [0, 0, 2, 2]
    assert labels_of(df, [("flow", W), ("dns", 25)]) == [0, 0, 0, 0]
    # The bridge has its own window: 25 apart does not link under a window of 24.
    assert labels_of(df, [("flow", W), ("dns", 24)]) == [0, 0, 2, 2]
    # Order of keys does not matter.
    assert labels_of(df, [("dns", 25), ("flow", W)]) == [0, 0, 0, 0]


def test_no_keys_and_empty_frames() -> None:
    assert labels_of(frame([1, 1], [0, 0]), []) == [0, 1]
    assert labels_of(frame([], []), [("flow", W)]) == []
    assert labels_of(frame([], []), [("flow", W)], fast=False) == []
    assert components(0, pl.DataFrame(schema={"src": pl.UInt32, "dst": pl.UInt32})).to_list() == []


def test_link_leaves_the_frame_alone_and_ignores_an_idx_column() -> None:
    df = frame([1, 1, 1], [0, 5, 100]).with_columns(pl.Series("idx", [7, 7, 7]))
    before = df.clone()
    assert labels_of(df, [("flow", W)]) == [0, 0, 2]
    assert labels_of(df, [("flow", W)], fast=False) == [0, 0, 2]
    assert df.equals(before)


def test_temporal_time_column_uses_its_physical_unit() -> None:
    df = frame([1, 1, 1], [0, 0, 0]).with_columns(pl.Series("t", [0, 1_000_000, 3_000_000]).cast(pl.Datetime("us")))
    assert labels_of(df, [("flow", 2_000_000)]) == [0, 0, 0]
    assert labels_of(df, [("flow", 1_999_999)]) == [0, 0, 2]
    assert labels_of(df, [("flow", 1_999_999)], fast=False) == [0, 0, 2]


def test_negative_window_is_rejected() -> None:
    with pytest.raises(ValueError, match="window"):
        link(frame([1], [0]), [("flow", -1)])
    with pytest.raises(ValueError, match="window"):
        window_edges(frame([1], [0]).with_row_index("idx"), "flow", "t", -1)


def test_window_edges_are_consecutive_same_key_pairs_within_the_window() -> None:
    df = frame([1, 1, 1, 2, None, 1], [0, 20, 5, 0, 1, 12]).with_row_index("idx")
    edges = window_edges(df, "flow", "t", W)
    assert edges.columns == ["src", "dst"]
    assert edges.schema["src"] == df.schema["idx"]
    # flow 1 in time order: rows 0 (t 0), 2 (t 5), 5 (t 12), 1 (t 20): gaps 5, 7, 8 -> three edges, not six.
    assert sorted(edges.rows()) == [(0, 2), (2, 5), (5, 1)]
    assert window_edges(df, "flow", "t", 4).height == 0


def test_components_labels_are_component_minima() -> None:
    edges = pl.DataFrame({"src": [4, 1, 2, 6], "dst": [0, 3, 2, 5]})
    assert components(7, edges).to_list() == [0, 1, 2, 1, 0, 5, 5]
    assert components(3, pl.DataFrame({"src": [2, 2, 1], "dst": [1, 1, 2]})).to_list() == [0, 1, 1]


def test_components_rejects_bad_edges() -> None:
    with pytest.raises(ValueError, match="edges"):
        components(3, pl.DataFrame({"src": [0], "dst": [3]}))
    with pytest.raises(ValueError, match="edges"):
        components(3, pl.DataFrame({"src": [-1], "dst": [0]}))
    with pytest.raises(ValueError, match="edges"):
        components(3, pl.DataFrame({"src": [0, None], "dst": [1, 2]}))


# --- long chains --------------------------------------------------------------------------------------------------

CHAIN = 100_000


def count_rounds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the rounds of components(): each round ends with exactly one call of _jump."""
    calls: list[int] = []
    jump = link_mod._jump

    def counting(label: pl.Series) -> pl.Series:
        calls.append(1)
        return jump(label)

    monkeypatch.setattr(link_mod, "_jump", counting)
    return calls


@pytest.mark.parametrize("order", ["time", "shuffled", "reversed"])
def test_chain_of_100000_events_is_one_story_in_few_rounds(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Event i is W after event i-1: every consecutive pair links, the ends are ~1e6 apart.
    df = pl.DataFrame(
        {"flow": pl.repeat(42, CHAIN, dtype=pl.UInt64, eager=True), "t": pl.int_range(0, CHAIN * W, W, eager=True)}
    )
    if order == "shuffled":
        df = df.sample(fraction=1.0, shuffle=True, seed=1)
    elif order == "reversed":
        df = df.reverse()
    rounds = count_rounds(monkeypatch)
    general = link(df, [("flow", W)], fast_path=False)
    assert general.n_unique() == 1
    assert general[0] == 0
    assert 1 <= len(rounds) <= math.ceil(math.log2(CHAIN)) + 1
    assert link(df, [("flow", W)]).equals(general)
    # One unit less of window breaks every link.
    assert link(df, [("flow", W - 1)]).n_unique() == CHAIN


def test_chain_of_100000_events_across_two_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # Key a links events 2j and 2j+1, key b links 2j+1 and 2j+2: only the two keys together make one chain.
    i = pl.int_range(0, CHAIN, eager=True)
    df = pl.DataFrame(
        {
            "a": (i // 2).cast(pl.UInt64),
            "b": ((i + 1) // 2).cast(pl.UInt64),
            "t": i * W,
        }
    ).sample(fraction=1.0, shuffle=True, seed=2)
    rounds = count_rounds(monkeypatch)
    both = link(df, [("a", W), ("b", W)])
    assert both.n_unique() == 1
    assert len(rounds) <= math.ceil(math.log2(CHAIN)) + 1
    assert link(df, [("a", W)]).n_unique() == CHAIN // 2


# --- agreement with the baseline ----------------------------------------------------------------------------------

KEY_VALUES = st.one_of(st.none(), st.integers(0, 4))
TIMES = st.one_of(st.none(), st.integers(0, 40))


@st.composite
def events(draw: st.DrawFn) -> tuple[pl.DataFrame, list[tuple[str, int]]]:
    n = draw(st.integers(0, 40))
    n_keys = draw(st.integers(1, 2))
    t: list[int | None] = draw(st.lists(TIMES, min_size=n, max_size=n))
    if draw(st.booleans()):  # arrival order, no null times: exercises the time-sorted fast path
        t = [*sorted(x if x is not None else 0 for x in t)]
    cols: dict[str, pl.Series] = {"t": pl.Series(t, dtype=pl.Int64)}
    keys: list[tuple[str, int]] = []
    for k in range(n_keys):
        cols[f"k{k}"] = pl.Series(draw(st.lists(KEY_VALUES, min_size=n, max_size=n)), dtype=pl.UInt64)
        keys.append((f"k{k}", draw(st.integers(0, 12))))
    return pl.DataFrame(cols), keys


@settings(max_examples=300, deadline=None)
@given(events())
def test_link_equals_the_baseline(case: tuple[pl.DataFrame, list[tuple[str, int]]]) -> None:
    df, keys = case
    expected = link_baseline([(df[k].to_list(), w) for k, w in keys], df["t"].to_list())
    fast = link(df, keys).to_list()
    general = link(df, keys, fast_path=False).to_list()
    assert groups(fast) == groups(expected)
    assert groups(general) == groups(expected)
    # Both define the label as the smallest row of the story, so the labels agree too, and fast == general.
    assert fast == general == expected


def test_benchmark_smoke() -> None:
    """``python -m bench.correlate`` runs as a user runs it (nothing imports ``bench``); it exits non-zero when
    link, its general path and the baseline disagree."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.correlate", "--events", "5000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]  # "5,000 events, 1,234 stories, window ..."
    events, stories = (int(x.split()[0].replace(",", "")) for x in first.split(", ")[:2])
    assert events > 4_000
    assert stories > 800
    assert "baseline" in proc.stdout


# --- spans (session intervals) --------------------------------------------------------------------------------


@st.composite
def events_with_spans(draw: st.DrawFn) -> tuple[pl.DataFrame, list[tuple[str, int]]]:
    df, keys = draw(events())
    ends = [
        None if t is None or draw(st.integers(0, 2)) == 0 else t + draw(st.integers(-3, 30)) for t in df["t"].to_list()
    ]
    df = df.with_columns(pl.Series("end", ends, dtype=pl.Int64))
    if draw(st.booleans()):  # a row far in the future: the range is too wide to lift, a window per key runs
        far = {"t": [2**61], **{k: [99] for k, _ in keys}, "end": [2**61 + 5]}
        df = pl.concat([df, pl.DataFrame(far, schema=df.schema)])
    return df, keys


@settings(max_examples=400, deadline=None)
@given(events_with_spans())
def test_link_with_spans_equals_the_baseline(case: tuple[pl.DataFrame, list[tuple[str, int]]]) -> None:
    """The vectorized reach (the latest end before a row, 'covered' rows) against the baseline's walk that keeps
    each story's state as the rule states it."""
    df, keys = case
    expected = link_baseline([(df[k].to_list(), w) for k, w in keys], df["t"].to_list(), df["end"].to_list())
    fast = link(df, keys, end="end").to_list()
    general = link(df, keys, end="end", fast_path=False).to_list()
    assert fast == general == expected


@BOTH_PATHS
def test_a_span_bounds_its_session_and_holds_events_far_from_its_start(fast: bool) -> None:
    # A flow record from 0 to 30, then: a report at 25 (inside), a firewall's end-of-session line at 33 (within
    # the window of the end), a new connection reusing the 5-tuple at 41 — within the window of 33, but 11 after
    # the span's end — and its own report at 43.
    df = frame([1, 1, 1, 1, 1], [0, 25, 33, 41, 43]).with_columns(
        pl.Series("end", [30, None, None, None, None], dtype=pl.Int64)
    )
    assert groups(link(df, [("flow", W)], end="end", fast_path=fast).to_list()) == [[0, 1, 2], [3, 4]]
    assert groups(labels_of(df, [("flow", W)], fast)) == [[0], [1, 2, 3, 4]]  # without spans: by gaps only
