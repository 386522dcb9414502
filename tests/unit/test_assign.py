from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.errors import ConfigError
from engine.runtime.assign import format_ranges, parse_range, split


@given(lo=st.integers(0, 500), size=st.integers(0, 600), workers=st.integers(1, 64))
def test_split_is_complete_disjoint_balanced_contiguous(lo: int, size: int, workers: int) -> None:
    owned = range(lo, lo + size)
    parts = split(owned, workers)
    flat = [s for p in parts for s in p]
    assert flat == list(owned)  # complete, disjoint, in order
    assert len(parts) == min(workers, size)
    if parts:
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert min(sizes) >= 1
    for a, b in itertools.pairwise(parts):
        assert a.stop == b.start


def test_split_examples() -> None:
    assert split(range(0, 10), 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert split(range(5, 7), 4) == [range(5, 6), range(6, 7)]
    assert split(range(0, 0), 2) == []
    with pytest.raises(ConfigError):
        split(range(3), 0)


@pytest.mark.parametrize(
    ("text", "want"), [(None, range(16)), ("0-15", range(16)), ("3-5", range(3, 6)), ("7", range(7, 8))]
)
def test_parse_range(text: str | None, want: range) -> None:
    assert parse_range(text, 16) == want


@pytest.mark.parametrize("text", ["5-3", "0-16", "-1", "a-b", "1-2-3", "", "16"])
def test_parse_range_errors(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_range(text, 16)
    assert info.value.key == "--shards"


def test_format_ranges() -> None:
    assert format_ranges([5, 0, 2, 1, 1]) == "0-2, 5"
    assert format_ranges([7]) == "7"
    assert format_ranges([]) == ""
    assert format_ranges(range(4, 8)) == "4-7"


@given(st.sets(st.integers(0, 200)))
def test_format_ranges_round_trips_through_parse_range(shards: set[int]) -> None:
    text = format_ranges(shards)
    back = {s for part in text.split(", ") if part for s in parse_range(part, 201)}
    assert back == shards
