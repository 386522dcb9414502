from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.errors import ConfigError
from engine.runtime.assign import format_ranges, group_assignment, parse_range, split


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


# -- groups: bounded-load rendezvous (issue 20) ------------------------------------------------------------------
def _owner(assignment: dict[tuple[str, int], list[int]]) -> dict[int, tuple[str, int]]:
    return {shard: slot for slot, shards in assignment.items() for shard in shards}


@given(
    shards=st.integers(1, 300),
    members=st.dictionaries(st.text("abcdef0123456789", min_size=1, max_size=8), st.integers(0, 4), max_size=6),
)
def test_group_assignment_is_complete_disjoint_balanced_and_weighted(shards: int, members: dict[str, int]) -> None:
    got = group_assignment(shards, members)
    slots = sum(members.values())
    assert set(got) == {(m, i) for m, n in members.items() for i in range(n)}
    flat = sorted(s for owned in got.values() for s in owned)
    assert flat == (list(range(shards)) if slots else [])  # every shard once (none without a slot)
    if slots:
        assert sorted(len(v) for v in got.values()) == sorted(
            shards // slots + (i < shards % slots) for i in range(slots)
        )  # balanced to one shard
    # the same members, listed in another order: the same answer (every host computes it)
    assert group_assignment(shards, dict(reversed(list(members.items())))) == got


def test_group_assignment_weights_members_by_their_workers() -> None:
    got = group_assignment(256, {"host-a": 1, "host-b": 3})
    per_member = {m: sum(len(v) for (mm, _), v in got.items() if mm == m) for m in ("host-a", "host-b")}
    assert per_member == {"host-a": 64, "host-b": 192}


@pytest.mark.parametrize(("shards", "bound"), [(64, 2.3), (256, 1.65), (1024, 1.3)])
def test_a_join_or_a_leave_moves_few_shards(shards: int, bound: float) -> None:
    """A join moves about the shards the new member gains (ideal: shards / slots after the join), a leave about
    the leaver's; at most ``bound`` times that over 40 member sets (members with one or two workers)."""
    ratios = []
    for trial in range(40):
        members = {f"m{trial}-{i}": 1 + (i + trial) % 2 for i in range(2 + trial % 5)}
        slots = sum(members.values())
        before = _owner(group_assignment(shards, members))
        after = _owner(group_assignment(shards, {**members, f"new{trial}": 1}))
        moved = sum(before[s] != after[s] for s in range(shards))
        ratios.append(moved / (shards / (slots + 1)))
        gone = next(iter(members))
        left = _owner(group_assignment(shards, {m: n for m, n in members.items() if m != gone}))
        lost = sum(1 for s in range(shards) if before[s][0] == gone)
        ratios.append(sum(before[s] != left[s] for s in range(shards)) / lost)
    assert max(ratios) <= bound, max(ratios)


def test_group_assignment_examples() -> None:
    assert group_assignment(4, {}) == {}
    got = group_assignment(2, {"a": 3})
    assert sorted(len(v) for v in got.values()) == [0, 1, 1]  # more slots than shards: one idle
    assert group_assignment(6, {"a": 1, "b": 0}) == {("a", 0): [0, 1, 2, 3, 4, 5]}
