"""engine.correlate.rows: each helper gives what the polars query it replaces gives."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.correlate.rows import gather, member, remap, u64

KEYS = st.integers(min_value=0, max_value=2**64 - 1)


def _frame(keys: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "story": pl.Series(keys, dtype=pl.UInt64),
            "id": [f"e{i}" for i in range(len(keys))],
            "flow": pl.Series([None if i % 3 == 0 else i for i in range(len(keys))], dtype=pl.UInt64),
        }
    )


@pytest.mark.parametrize("numpy_max", [0, 10_000], ids=["polars", "numpy"])
@settings(max_examples=150, deadline=None)
@given(st.lists(KEYS, max_size=40), st.lists(KEYS, max_size=10), st.data())
def test_member_and_gather_select_what_filter_selects(
    numpy_max: int, rows: list[int], extra: list[int], data: st.DataObject
) -> None:
    # the keys asked for: some of the rows' (with repeats) and some others, as the story builder asks
    picked = data.draw(st.lists(st.sampled_from(rows), max_size=10)) if rows else []
    keys = picked + extra
    df = _frame(rows)
    want = df.filter(pl.col("story").is_in(pl.Series(keys, dtype=pl.UInt64).implode()))
    got = gather(df, member(df["story"], keys, numpy_max=numpy_max))
    assert got.equals(want)
    assert got.schema == df.schema


@settings(max_examples=200, deadline=None)
@given(st.lists(KEYS, unique=True, max_size=20), st.data())
def test_remap_is_replace_strict(keys: list[int], data: st.DataObject) -> None:
    to = data.draw(st.lists(KEYS, min_size=len(keys), max_size=len(keys)))
    values = data.draw(st.lists(st.sampled_from(keys), max_size=30)) if keys else []
    s = pl.Series("story", values, dtype=pl.UInt64)
    want = s.replace_strict(keys, to, return_dtype=pl.UInt64) if values else s
    got = pl.Series("story", remap(u64(s), keys, to, np.uint64))
    assert got.to_list() == want.to_list()
    assert got.dtype == pl.UInt64


def test_remap_refuses_a_value_that_is_no_key() -> None:
    values = np.array([3, 7], dtype=np.uint64)
    with pytest.raises(ValueError, match="none of the keys"):
        remap(values, [3, 5], [0, 1], np.uint64)
    with pytest.raises(ValueError, match="none of the keys"):
        remap(values, [3], [0], np.uint64)  # past the largest key
    with pytest.raises(ValueError, match="none of the keys"):
        remap(values, [], [], np.uint64)


def test_u64_refuses_nulls_rather_than_turn_keys_into_floats() -> None:
    s = pl.Series("story", [2**63 + 1, None], dtype=pl.UInt64)
    with pytest.raises(ValueError, match="'story': 1 nulls"):
        u64(s)
    assert u64(pl.Series("story", [2**64 - 1], dtype=pl.UInt64)).tolist() == [2**64 - 1]


def test_gather_keeps_the_order_and_an_empty_selection_keeps_the_schema() -> None:
    df = _frame([5, 1, 5, 2])
    assert gather(df, member(df["story"], [5]))["id"].to_list() == ["e0", "e2"]
    none = gather(df, member(df["story"], [9]))
    assert none.height == 0
    assert none.schema == df.schema
