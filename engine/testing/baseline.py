"""Plain per-event Python implementation of the link step: the oracle for :mod:`engine.correlate.link` (tests)

Same semantics as :func:`engine.correlate.link.link`: two events link when they share a (non-null) key value
and their (non-null) times are at most that key's window apart, inclusive; linking is transitive and a story is
a connected component labelled by its smallest row index.

Method: for each key, group the row indices by key value in a dict, sort each group by time (Timsort: close to
linear when rows already arrive in time order), and union each event with the next one of its group when the
gap is within the window. Union-find with path halving; the larger root always goes under the smaller one, so
every root is the smallest row of its tree and the final ``find`` is the label directly.

The input is Python lists (one value per row); converting a frame to lists is the caller's business and is not
part of what the benchmark times for the baseline.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import cast

__all__ = ["link_baseline"]


def link_baseline(
    keys: Sequence[tuple[Sequence[Hashable | None], int]],
    times: Sequence[int | None],
    ends: Sequence[int | None] | None = None,
) -> list[int]:
    """Story label (smallest row index of the story) of every row.

    ``keys`` lists ``(values, window)`` pairs, ``values`` holding one key value per row (``None`` = no key);
    ``times`` holds one event time per row (``None`` = never links); ``ends`` the end of the span an event
    describes (``None``: an instant). With spans, a group's events are walked in time order keeping the story's
    state as the rule states it: an event joins the story when within the window of its reach — the latest end
    of its spans when it has any, else its latest time — or starts the next story.
    """
    n = len(times)
    ts = cast("Sequence[int]", times)  # only rows with a time enter a group below
    parent = list(range(n))

    def find(x: int) -> int:
        while True:
            p = parent[x]
            if p == x:
                return x
            gp = parent[p]
            parent[x] = gp
            x = gp

    for values, window in keys:
        if window < 0:
            raise ValueError(f"window: must be >= 0, got {window}")
        if len(values) != n:
            raise ValueError(f"keys: {len(values)} key values for {n} times")
        groups: dict[Hashable, list[int]] = {}
        for i, (k, t) in enumerate(zip(values, times, strict=True)):
            if k is None or t is None:
                continue
            g = groups.get(k)
            if g is None:
                groups[k] = [i]
            else:
                g.append(i)
        for g in groups.values():
            if len(g) < 2:
                continue
            g.sort(key=ts.__getitem__)
            prev = g[0]
            t_prev = ts[prev]
            span_end = _end(ends, prev, t_prev)  # the latest end of the story's spans; None: it has none
            for i in g[1:]:
                t_i = ts[i]
                reach = t_prev if span_end is None else span_end
                if t_i - reach <= window:
                    a, b = find(prev), find(i)
                    if a < b:
                        parent[b] = a
                    elif b < a:
                        parent[a] = b
                else:
                    span_end = None  # a new story: no span yet
                end_i = _end(ends, i, t_i)
                if end_i is not None:
                    span_end = end_i if span_end is None else max(span_end, end_i)
                prev, t_prev = i, t_i
    return [find(i) for i in range(n)]


def _end(ends: Sequence[int | None] | None, i: int, t: int) -> int | None:
    if ends is None or ends[i] is None:
        return None
    return max(cast("int", ends[i]), t)  # an end before its own time counts as the time
