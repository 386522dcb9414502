"""Row selection on polars frames with as few queries as possible.

In polars 2.x an eager ``DataFrame.filter``, ``Series.is_in``, ``replace_strict`` or ``pl.concat`` is a lazy query
built and collected; on this project's machine each such call costs 100 to 400 µs of CPU whatever the frame's size
(docs/BENCHMARKS.md), and the story builder makes dozens per bucket. Gathering rows by position, selecting columns
by name, stacking frames and the numpy views of integer columns are direct calls (a few µs to tens of µs). The
helpers here express the builder's per-bucket selections with those (only :func:`member` on more than
:data:`MEMBER_NUMPY_MAX` values runs polars' ``is_in``, which is cheaper there); each gives the rows, in their
order, that the query it replaces gives (tests/unit/test_rows.py checks them against the query).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

__all__ = ["MEMBER_NUMPY_MAX", "gather", "member", "remap", "u64"]


def u64(s: pl.Series) -> np.ndarray:
    """The values of an unsigned 64-bit column without nulls as a numpy array (a view where it is one chunk). A
    null would turn into a float (and lose the key's low bits): refused."""
    if s.null_count():
        raise ValueError(f"column {s.name!r}: {s.null_count()} nulls where every row must have a value")
    return s.to_numpy()


MEMBER_NUMPY_MAX = 4_096
"""Up to this many values :func:`member` searches the sorted keys with numpy (a few µs per thousand values);
above it polars' hashed ``is_in`` (a query: ~0.2 ms, but linear, where the search grows with the keys)."""


def member(values: pl.Series, keys: Sequence[int], *, numpy_max: int = MEMBER_NUMPY_MAX) -> np.ndarray:
    """Whether each value of an unsigned 64-bit column without nulls is one of ``keys`` (a boolean array, one
    per value)."""
    if values.len() > numpy_max:
        return values.is_in(pl.Series(keys, dtype=values.dtype).implode()).to_numpy()
    v = u64(values)
    ks = np.unique(np.asarray(keys, dtype=v.dtype))
    if not len(ks):
        return np.zeros(len(v), dtype=bool)
    pos = np.minimum(np.searchsorted(ks, v), len(ks) - 1)
    return np.asarray(ks[pos] == v)


def gather(df: pl.DataFrame, mask: np.ndarray) -> pl.DataFrame:
    """The rows of ``df`` where ``mask`` is true, in ``df``'s order (``df.filter(mask)``). Indexing by a series of
    positions is a direct call; ``df.gather`` is a query (~35 µs more a call on this machine, whatever the size)."""
    return df[pl.Series(np.flatnonzero(mask), dtype=pl.get_index_type())]


def remap(values: np.ndarray, keys: Sequence[int], to: Sequence[int], dtype: type[np.generic]) -> np.ndarray:
    """Each value replaced by the ``to`` of its key (``replace_strict(keys, to)``), as ``dtype``; every value must
    be one of ``keys`` (distinct), else ValueError."""
    k = np.asarray(keys, dtype=values.dtype)
    order = np.argsort(k, kind="stable")
    ks = k[order]
    pos = np.searchsorted(ks, values)
    if len(values) and (len(ks) == 0 or pos.max() >= len(ks) or not np.array_equal(ks[pos], values)):
        raise ValueError("remap: a value that is none of the keys")
    return np.asarray(to, dtype=dtype)[order][pos]
