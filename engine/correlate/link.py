"""The link step of correlation: which events belong to the same story.

Semantics
    Two events *link* when they share a value of a key column and their event times are at most that key's
    ``window`` apart (inclusive: a gap equal to the window links, one unit more does not). A null key value
    never links, nor does a null event time. Linking is transitive: a *story* is a connected component of the
    link graph, and its label is the smallest row index among its events. Several keys can be given, each with
    its own window (today the direction-independent flow hash ``flow``; later e.g. a DNS answer linking to the
    connection it resolved); the components are then taken over the union of every key's links.

Row indices
    :func:`window_edges` reads row indices from a column ``idx`` of the frame it is given; :func:`link` builds
    that column itself (``0..n-1`` in the frame's row order), so callers of :func:`link` need not, and any
    existing ``idx`` column of their frame is ignored. The labels :func:`link` returns are positions in the
    frame's row order.

Times
    The time column is an integer (µs in the event schema) or a temporal type; it is compared through its
    physical integer value (``cast(Int64)``), so ``window`` is in the same unit.

Intervals (``end``)
    An event may describe a span — a flow record from its start (its time) to its end (``end``; null for an
    event at one instant). A span bounds its session, both ways: in (key, time) order an event joins the story
    of the events before it when its time is within ``window`` of the story's *reach*, which is the latest end
    of the story's spans when it has any — its instants then extend nothing (a firewall's end-of-session line
    a few seconds after the flow's end does not carry the session on to a new connection that reuses the
    5-tuple) — and the latest time of its instants otherwise (the rule without spans). A long connection's
    span thus also holds events far from its start. An end before its own time counts as the time. Unlike the
    rule without spans this one is not monotone: a span joining a story of instants lowers its reach from its
    latest time to the span's end, so adding an event can separate events that linked without it (why the story
    builder does not pass spans yet: docs/correlation.md, Not yet).

Everything here is a pure function of its arguments: no I/O, no clock, no Python loop over rows. Loops run over
keys and over the rounds of :func:`components` (a handful; logarithmic in the size of a story). Only eager
polars operations are used (the in-memory engine, which keeps row order); every order that matters is made by an
explicit sort.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

__all__ = ["components", "link", "window_edges"]

LABEL = "story"
"""Name of the label series :func:`link` and :func:`components` return."""


def _check_window(key: str, window: int) -> None:
    if window < 0:
        raise ValueError(f"window: must be >= 0 for key {key!r}, got {window}")


def _keyed(df: pl.DataFrame, key: str, time: str, end: str | None = None) -> pl.LazyFrame:
    """Columns ``idx``, ``k``, ``t`` (and ``e``, the end, with ``end``) of the rows whose key and time are not
    null, sorted by (key, time): a query, collected by the caller with what it selects from them (each collected
    query costs a fixed 0.1 to 0.3 ms here, see engine.correlate.rows)."""
    # Two stable single-column sorts (time, then key) give the (key, time) order; on one core that is about
    # twice as fast as a two-column sort, and the time sort is free when the frame is known to be time-sorted.
    cols = [pl.col("idx"), pl.col(key).alias("k"), pl.col(time).cast(pl.Int64).alias("t")]
    if end is not None:
        cols.append(pl.col(end).cast(pl.Int64).alias("e"))
    return df.lazy().select(cols).drop_nulls(["k", "t"]).sort("t", maintain_order=True).sort("k", maintain_order=True)


def _joins_previous(window: int, spans: tuple[int, int] | None) -> pl.Expr:
    """Over rows in (``k``, ``t``) order: whether a row joins the story of the row before it (same key, and
    within ``window`` of the story's reach — see Intervals in the module's text). ``spans``: None when no row
    has an end; else the least time or end of the rows and the width of their range (:func:`_span_range`).

    With spans the story's reach is found without a loop: in (key, time) order, the latest end among all the
    rows of the key before a row (``m``) is its story's latest end when the story has a span — ends of earlier
    stories lie more than ``window`` before the story's first time, so before any later end. The row before is
    *covered* when it lies within ``window`` of ``m``: then its story has a span (a story without one began
    after every earlier end + window, and the row before is in it) and the reach is ``m``; otherwise the
    story has none and the reach is the row before's time.

    The running maximum per key is one running maximum over the whole frame: each key's ends are lifted above
    every earlier key's (``+ key number * width``; the caller checks that this stays inside int64), so the
    maximum so far is always the current key's."""
    same_key = pl.col("k") == pl.col("k").shift(1)
    prev_t = pl.col("t").shift(1)
    if spans is None:
        return (same_key & ((pl.col("t") - prev_t) <= window)).fill_null(False)
    low, width = spans
    first = (~same_key).fill_null(True)
    segment = first.cum_sum().cast(pl.Int64)
    # 1 + (end - low) for a span (an end before its time counts as the time), 0 for an instant: above no end
    level = pl.when(pl.col("e").is_not_null()).then(pl.max_horizontal("e", "t") - low + 1).otherwise(0)
    if width:
        lift = segment * width
        latest = ((level + lift).cum_max() - lift).shift(1)  # of the rows before, in this key (masked below)
    else:  # too wide a range to lift: a running maximum per key (slower: a window over every key)
        latest = level.cum_max().over(segment).shift(1)
    latest = pl.when(first | (latest <= 0)).then(None).otherwise(latest + low - 1)
    covered = (latest + window >= prev_t).fill_null(False)
    reach = pl.when(covered).then(latest).otherwise(prev_t)
    return (same_key & (pl.col("t") - reach <= window)).fill_null(False)


def _span_range(frame: pl.DataFrame, end: str | None) -> tuple[int, int] | None:
    """For :func:`_joins_previous`: None when no row of ``frame`` has an end (column ``end``) and time (``t``);
    else the least of their times and ends, and the width of the range (+ 2) — 0 when lifting each key's ends by
    a multiple of it could leave int64."""
    if end is None or frame[end].null_count() == frame.height:
        return None
    bounds = frame.select(
        pl.min_horizontal(pl.col("t").min(), pl.col(end).min()).alias("lo"),
        pl.max_horizontal(pl.col("t").max(), pl.col(end).max()).alias("hi"),
    ).row(0)
    low, high = int(bounds[0]), int(bounds[1])
    width = high - low + 2
    return low, width if width * (frame.height + 1) < 2**62 else 0


def window_edges(df: pl.DataFrame, key: str, time: str, window: int, end: str | None = None) -> pl.DataFrame:
    """Edges ``src``, ``dst`` (row indices from ``df["idx"]``, in its dtype) between the events that link by ``key``.

    The rows are sorted by (``key``, ``time``) and an edge joins each event to the previous one of the same key
    when their time gap is at most ``window`` (with ``end``: when the event is within ``window`` of its story's
    reach, see Intervals above). Consecutive edges suffice: the components are the same as with an edge between
    every pair within the window. Rows with a null key or a null time produce no edges.
    """
    _check_window(key, window)
    s = _keyed(df, key, time, end).collect()
    spans = _span_range(s, "e" if end is not None else None)
    return (
        s.select(
            pl.col("idx").shift(1).alias("src"),
            pl.col("idx").alias("dst"),
            _joins_previous(window, spans).alias("ok"),
        )
        .filter(pl.col("ok"))
        .select("src", "dst")
    )


def _jump(label: pl.Series) -> pl.Series:
    """Pointer jumping: ``label <- label[label]`` until every label is a root (points to itself)."""
    while True:
        nxt = label.gather(label)
        if nxt.equals(label):
            return nxt
        label = nxt


def components(n: int, edges: pl.DataFrame) -> pl.Series:
    """Connected-component label of rows ``0..n-1`` under ``edges`` (columns ``src``, ``dst``).

    The label of a row is the smallest row index of its component; the series is named ``story`` and has
    polars' index dtype (UInt32). Edges may repeat, be self-loops or point either way.

    Method: min-label hooking with pointer jumping. ``label`` is a forest in which every row points to a row
    of its component with a smaller or equal index, and roots point to themselves; it starts as the identity.
    Each round maps every remaining edge onto the labels of its ends (so the edge list contracts onto the
    current roots), drops the edges whose ends already share a label (they never separate again), hooks each
    larger label onto the smallest label it is joined to (a scatter of per-root minima: the larger label is a
    root, so the forest keeps pointing downwards) and then jumps pointers (``label <- label[label]``) until the
    forest is flat; flattening a tree of depth ``d`` takes about ``log2(d)`` jumps.

    Rounds: on a path (what :func:`window_edges` gives for one key) only the local minima of the labels stay
    roots, and the contracted graph is again a path, so the number of labels per component at least halves
    each round: a chain of ``m`` events needs at most about ``log2(m)`` rounds whatever its row order. For the
    general graphs that several keys make, no such bound is claimed here; each round still removes at least the
    largest label of every unfinished component (it always has a smaller neighbour), so the loop ends.

    Result: when no edge is left, each component has one label, a root; the component's smallest row is its own
    root (nothing smaller can be its parent), so that label is the component's minimum.
    """
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    idx_t = pl.get_index_type()
    label = pl.int_range(0, n, dtype=idx_t, eager=True).alias(LABEL)
    if edges.height == 0:
        return label
    if edges["src"].null_count() or edges["dst"].null_count():
        raise ValueError("edges: src and dst must not be null")
    bounds = edges.select(
        pl.min_horizontal(pl.col("src").min(), pl.col("dst").min()).alias("lo"),
        pl.max_horizontal(pl.col("src").max(), pl.col("dst").max()).alias("hi"),
    ).row(0)
    if bounds[0] < 0 or bounds[1] >= n:
        raise ValueError(f"edges: row indices must be in 0..{n - 1}, got {bounds[0]}..{bounds[1]}")
    src = edges["src"].cast(idx_t)
    dst = edges["dst"].cast(idx_t)
    while src.len():
        pair = (
            pl.DataFrame({"a": label.gather(src), "b": label.gather(dst)})
            .select(pl.max_horizontal("a", "b").alias("hi"), pl.min_horizontal("a", "b").alias("lo"))
            .filter(pl.col("hi") != pl.col("lo"))
        )
        if pair.height == 0:
            break
        # Smallest offer per hooked label. Sorting first lets the grouping run over contiguous runs: on one core
        # that is about half the cost of a hash aggregation over (mostly distinct) labels.
        hook = pair.sort("hi").group_by(pl.col("hi").set_sorted()).agg(pl.col("lo").min())
        label.scatter(hook["hi"], hook["lo"])
        label = _jump(label)
        src, dst = pair["hi"], pair["lo"]
    return label.alias(LABEL)


def _single_key(frame: pl.DataFrame, key: str, window: int, end: str | None = None) -> pl.Series:
    """Fast path for one key: in (key, time) order a story is a run of rows that each join the one before."""
    spans = _span_range(frame.select(pl.col("t").cast(pl.Int64), pl.col(end).cast(pl.Int64)), end) if end else None
    starts = ~_joins_previous(window, spans)
    t = frame["t"]
    if t.null_count() == 0 and t.is_sorted():
        # Rows already in time order (the usual case: events in arrival order): the stable sorts keep each key's
        # rows in row order, so the first row of a run is its smallest; carry it forward, no grouping needed.
        first = pl.when(starts).then(pl.col("idx")).forward_fill()
    else:
        first = pl.col("idx").min().over(starts.cum_sum().set_sorted())  # a cumulative sum of booleans: ascending
    runs = _keyed(frame, key, "t", end).select(pl.col("idx"), first.alias("first")).collect()
    label = pl.int_range(0, frame.height, dtype=pl.get_index_type(), eager=True).alias(LABEL)
    label.scatter(runs["idx"], runs["first"])
    return label


def link(
    df: pl.DataFrame,
    keys: Sequence[tuple[str, int]],
    time: str = "t",
    *,
    end: str | None = None,
    fast_path: bool = True,
) -> pl.Series:
    """Story label of every row of ``df``, in ``df``'s row order (``df`` itself is not changed).

    ``keys`` lists ``(column, window)`` pairs; ``time`` names the event-time column and ``end`` the column of
    span ends, if any (null: an instant; see Intervals above). The label is the smallest row position (0-based,
    in ``df``'s order) of the row's story; rows that link to nothing get their own position. With one key and
    ``fast_path`` (the default) the stories are runs of a single sort; otherwise the edges of every key
    (:func:`window_edges`) go through :func:`components`. Both give the same labels.
    """
    for key, window in keys:
        _check_window(key, window)
    frame = df.select(
        pl.int_range(pl.len(), dtype=pl.get_index_type()).alias("idx"),
        pl.col(time).alias("t"),
        *(pl.col(key).alias(f"k{i}") for i, (key, _) in enumerate(keys)),
        *([pl.col(end).alias("end")] if end is not None else []),
    )
    ends = "end" if end is not None else None
    if fast_path and len(keys) == 1:
        return _single_key(frame, "k0", keys[0][1], ends)
    edges = [window_edges(frame, f"k{i}", "t", window, ends) for i, (_, window) in enumerate(keys)]
    if not edges:
        idx_t = pl.get_index_type()
        return components(frame.height, pl.DataFrame(schema={"src": idx_t, "dst": idx_t}))
    return components(frame.height, pl.concat(edges))
