"""Learned sensor clock offsets (issue 19): evidence, mergeable sketches and the estimate. Pure: no I/O, no clock.

Evidence
    Two events of different sensors that describe one connection without doubt: the same flow, a flow whose
    client port is ephemeral (one port at least :data:`EPHEMERAL_MIN`, the other below it: a 5-tuple that is not
    reused within hours, unlike ``udp 123 ↔ 123``), ingested within ``max_wait_ms`` of each other, their reported
    times at most ``max_offset_us`` apart. Each such pair gives one difference ``t_a - t_b`` of the times as the
    sensors wrote them (``a < b`` by name): the offset of ``a`` against ``b`` plus how far apart the two saw the
    session (seconds at most, either sign). :func:`evidence` finds, for every new event, the nearest event of each
    other sensor of its flow (so a flow with many events gives at most one difference per new event and sensor, not
    a quadratic number); of a gathering (the story builder gathers 10 s of buckets at once) with more than
    :data:`SAMPLE_EVENTS` new events it takes those of a uniform sample of the flows.

Sketches
    The differences of one pair of sensors are kept as counts per :data:`BIN_US` bin (:class:`Sketch`, a sparse
    histogram): two sketches merge by adding counts, so the partial sketches of several workers (each sees only
    its shards' flows) and of several periods add up to the sketch of all of them, in any order. A sketch keeps at
    most :data:`MAX_BINS` bins (the rarest go, nearest the median last) and at most :data:`MAX_COUNT` differences
    (past that every count is halved: old evidence fades, so a sketch follows a clock that drifts).

Estimate
    Per pair: the median of the differences in the densest :data:`PEAK_WINDOW_US` window (wrong pairs and events
    in the middle of long connections lie outside it), their count and their spread (half the distance between
    the quartiles). The sensors and the pairs with at least
    ``min_samples`` differences form a graph; from the reference sensor (offset 0) the offsets follow along the
    tree of the best-supported pairs (most samples first; ties by name): ``off_b = off_a - median(t_a - t_b)``.
    A sensor that no supported pair reaches has no estimate.

Jumps
    A clock that is reset moves its pairs' new differences away from the sketch: :func:`jumped` says when a
    period's sketch of a pair (enough samples, concentrated) has its median more than ``max(JUMP_MIN_US, 4 *
    spread)`` from the long sketch's. :func:`advance` holds such a period aside and starts the pair over from it
    when the next period with evidence says the same (a single period may be a burst of wrong pairs: reused
    5-tuples, split flow records).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import polars as pl

from .dns import DnsAnswer

__all__ = [
    "BIN_US",
    "EPHEMERAL_MIN",
    "MAX_BINS",
    "MAX_COUNT",
    "Estimate",
    "PairEstimate",
    "Sketch",
    "TableBook",
    "estimate_pair",
    "evidence",
    "evidence_epochs",
    "jumped",
    "merge",
    "solve",
]

BIN_US = 100_000
"""Resolution of a difference sketch (µs): far below a match window, far above a clock's jitter."""
EPHEMERAL_MIN = 32_768
"""The least client port taken as ephemeral: Linux starts its range here, Windows and macOS at 49,152."""
MAX_BINS = 1_024
"""Bins a sketch keeps at most (differences concentrate around the offset; scattered ones are wrong pairs)."""
MAX_COUNT = 1 << 20
"""Differences a sketch holds at most; past it every count is halved (old evidence fades)."""
SAMPLE_EVENTS = 4_096
"""New events one gathering takes evidence from at most (more: those of a sample of the flows): 10 s of a busy
worker's buckets hold a hundred thousand and more, and a few thousand differences per epoch are plenty."""
PEAK_WINDOW_US = 6_000_000
"""The estimate is taken among the differences of the densest window this wide: two sensors that see a session
start report it seconds apart, while an event in the middle of a long connection (a request minutes into it) is
minutes from the other sensor's start — a broad tail that would drag a plain median."""
JUMP_MIN_US = 5_000_000
"""The least move of a pair's median that counts as a clock jump (µs): sessions alone move it by seconds."""

Pair = tuple[str, str]


class Sketch(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Counts of the differences of one pair of sensors per bin: ``bins[i]`` (the difference // BIN_US, ascending)
    has ``counts[i]`` (> 0) differences."""

    bins: list[int]
    counts: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @classmethod
    def of(cls, counts: Mapping[int, int]) -> Sketch:
        """A bounded sketch of ``counts`` (bin → count; counts <= 0 are dropped)."""
        items = sorted((b, c) for b, c in counts.items() if c > 0)
        total = sum(c for _, c in items)
        while total > MAX_COUNT:
            items = [(b, c // 2) for b, c in items if c // 2 > 0]
            total = sum(c for _, c in items)
        if len(items) > MAX_BINS:
            mid = _median_bin(items)
            keep = sorted(items, key=lambda bc: (-bc[1], abs(bc[0] - mid), bc[0]))[:MAX_BINS]
            items = sorted(keep)
        return cls([b for b, _ in items], [c for _, c in items])


def _median_bin(items: list[tuple[int, int]]) -> int:
    half = sum(c for _, c in items) / 2
    acc = 0
    for b, c in items:
        acc += c
        if acc >= half:
            return b
    return items[-1][0] if items else 0


def merge(sketches: Iterable[Sketch]) -> Sketch:
    """The sketch of all the differences of ``sketches`` (counts added; bounded like :meth:`Sketch.of`)."""
    acc: dict[int, int] = {}
    for sk in sketches:
        for b, c in zip(sk.bins, sk.counts, strict=True):
            acc[b] = acc.get(b, 0) + c
    return Sketch.of(acc)


@dataclass(frozen=True, slots=True)
class PairEstimate:
    median_us: int  # of t_a - t_b
    samples: int
    spread_us: int  # half the interquartile range


def _quantile(sk: Sketch, q: float) -> float:
    """The ``q`` quantile of the differences, interpolated inside its bin (µs)."""
    total = sk.total
    target = q * total
    acc = 0
    for b, c in zip(sk.bins, sk.counts, strict=True):
        if acc + c >= target:
            return (b + (target - acc) / c) * BIN_US
        acc += c
    return (sk.bins[-1] + 1) * BIN_US


def _peak(sk: Sketch) -> Sketch:
    """The differences within the :data:`PEAK_WINDOW_US` window that holds the most of them (ties: the earliest)."""
    width = PEAK_WINDOW_US // BIN_US
    best, best_at, acc, lo = -1, 0, 0, 0
    bins, counts = sk.bins, sk.counts
    for hi in range(len(bins)):
        acc += counts[hi]
        while bins[hi] - bins[lo] >= width:
            acc -= counts[lo]
            lo += 1
        if acc > best:
            best, best_at = acc, lo
    end = best_at
    while end < len(bins) and bins[end] - bins[best_at] < width:
        end += 1
    return Sketch(bins[best_at:end], counts[best_at:end])


def estimate_pair(sk: Sketch) -> PairEstimate | None:
    """Median, count and spread of one pair's differences around their peak (:func:`_peak`); None for an empty
    sketch. The count is of the differences in the peak window: the support of the estimate."""
    if not sk.bins:
        return None
    peak = _peak(sk)
    q1, q2, q3 = (_quantile(peak, q) for q in (0.25, 0.5, 0.75))
    return PairEstimate(round(q2), peak.total, round((q3 - q1) / 2))


def jumped(long: Sketch, recent: Sketch, min_samples: int) -> bool:
    """Whether ``recent`` (one period's differences of a pair) says a clock of the pair jumped away from ``long``
    (everything before): both have at least ``min_samples`` differences in their peak windows, the recent ones
    concentrate there (at least half of them: a reset clock moves every difference by the same amount, while a
    period of scattered differences — split flow records, reused 5-tuples — has no clear peak), and the two
    medians lie further apart than ``max(JUMP_MIN_US, 4 * long's spread)``."""
    a, b = estimate_pair(long), estimate_pair(recent)
    if a is None or b is None or a.samples < min_samples or b.samples < min_samples:
        return False
    if 2 * b.samples < recent.total:
        return False
    return abs(a.median_us - b.median_us) > max(JUMP_MIN_US, 4 * a.spread_us)


def _agree(a: Sketch, b: Sketch) -> bool:
    """Whether two sketches' estimates lie within :data:`JUMP_MIN_US` of each other."""
    x, y = estimate_pair(a), estimate_pair(b)
    return x is not None and y is not None and abs(x.median_us - y.median_us) <= JUMP_MIN_US


class Estimate(msgspec.Struct, frozen=True, kw_only=True):
    """Offsets of the sensors a supported pair reaches from ``reference`` (µs, sensor clock minus the reference's;
    the reference itself 0), with each one's evidence: the samples of the pair that placed it and its spread."""

    reference: str | None
    offsets_us: dict[str, int]
    samples: dict[str, int]
    spread_us: dict[str, int]


def solve(pairs: Mapping[Pair, Sketch], reference: str | None, min_samples: int) -> Estimate:
    """Offsets from the pairs' sketches (see Estimate in the module's text). ``reference``: the sensor whose clock
    the others are given against; None: the sensor with the most supported evidence (most differences in pairs
    with at least ``min_samples``; ties by name), or None when no pair has enough."""
    supported: dict[Pair, PairEstimate] = {}
    for (a, b), sk in pairs.items():
        est = estimate_pair(sk)
        if est is not None and est.samples >= min_samples and a != b:
            supported[(a, b) if a < b else (b, a)] = (
                est if a < b else PairEstimate(-est.median_us, est.samples, est.spread_us)
            )
    if reference is None:
        weight: dict[str, int] = {}
        for (a, b), est in supported.items():
            weight[a] = weight.get(a, 0) + est.samples
            weight[b] = weight.get(b, 0) + est.samples
        if not weight:
            return Estimate(reference=None, offsets_us={}, samples={}, spread_us={})
        reference = min(weight, key=lambda s: (-weight[s], s))
    offsets = {reference: 0}
    samples: dict[str, int] = {}
    spread: dict[str, int] = {reference: 0}
    # Prim's algorithm over the best-supported pairs: always the next pair with the most samples that reaches a
    # sensor not placed yet (ties by the pair's names), so the tree and the offsets are a function of the input.
    edges = sorted(supported.items(), key=lambda kv: (-kv[1].samples, kv[0]))
    grew = True
    while grew:
        grew = False
        for (a, b), est in edges:
            if (a in offsets) == (b in offsets):
                continue
            if a in offsets:  # t_a - t_b = off_a - off_b
                offsets[b] = offsets[a] - est.median_us
                placed = b
            else:
                offsets[a] = offsets[b] + est.median_us
                placed = a
            samples[placed] = est.samples
            spread[placed] = est.spread_us
            grew = True
            break
    samples[reference] = sum(e.samples for p, e in supported.items() if reference in p)
    return Estimate(reference=reference, offsets_us=offsets, samples=samples, spread_us=spread)


def evidence(
    new: pl.DataFrame,
    others: pl.DataFrame,
    *,
    max_offset_us: int,
    max_wait_ms: int,
    epoch_column: str | None = None,
) -> dict[tuple[int, int], dict[Pair, dict[int, int]]]:
    """The differences that ``new`` events give with events of ``others`` (which may include ``new`` itself; a pair
    is counted once): per (epoch, shard), per sensor pair, the count per :data:`BIN_US` bin (what
    :meth:`Sketch.of` takes). The epoch is the new event's ``epoch_column`` (None: 0 for all).

    Both frames need the columns ``id``, ``flow``, ``shard``, ``sensor``, ``raw`` (the time as the sensor reported
    it, µs), ``ingest`` (ms), ``src_port`` and ``dst_port``. Per new event and other sensor of its flow only the
    nearest event counts (see Evidence in the module's text)."""
    epoch = pl.col(epoch_column).cast(pl.Int64) if epoch_column else pl.lit(0, pl.Int64)
    cols = ["id", "flow", "shard", "sensor", "raw", "ingest", "src_port", "dst_port", epoch.alias("epoch")]
    lo = pl.min_horizontal("src_port", "dst_port")
    hi = pl.max_horizontal("src_port", "dst_port")
    ephemeral = (hi >= EPHEMERAL_MIN) & (lo < EPHEMERAL_MIN) & (lo > 0)
    left = new.select(cols).filter(ephemeral & pl.col("flow").is_not_null() & pl.col("sensor").is_not_null())
    if left.height == 0:
        return {}
    if left.height > SAMPLE_EVENTS:  # a large gathering: the flows of a uniform sample (flow hashes are uniform)
        left = left.filter(pl.col("flow") < int(2**64 * SAMPLE_EVENTS / left.height))
    right = others.select("id", "flow", "sensor", "raw", "ingest").filter(
        pl.col("flow").is_in(left["flow"].unique().implode()) & pl.col("sensor").is_not_null()
    )
    pairs = (
        left.join(right, on="flow", suffix="_o")
        .filter(
            (pl.col("sensor") != pl.col("sensor_o"))
            & ((pl.col("raw") - pl.col("raw_o")).abs() <= max_offset_us)
            & ((pl.col("ingest") - pl.col("ingest_o")).abs() <= max_wait_ms)
        )
        .with_columns((pl.col("raw") - pl.col("raw_o")).alias("d"))
        # the nearest event of each other sensor (ties: the smaller id)
        .sort(pl.col("d").abs(), "id_o")
        .unique(["id", "sensor_o"], keep="first")
    )
    # A pair of two new events shows up from both sides: keep the side whose id is smaller.
    in_new = pl.col("id_o").is_in(left["id"].implode())
    pairs = pairs.filter(~in_new | (pl.col("id") < pl.col("id_o")))
    if pairs.height == 0:
        return {}
    # orient every difference as t_a - t_b with a < b by name
    forward = pl.col("sensor") < pl.col("sensor_o")
    binned = pairs.select(
        "epoch",
        "shard",
        pl.when(forward).then(pl.col("sensor")).otherwise(pl.col("sensor_o")).alias("a"),
        pl.when(forward).then(pl.col("sensor_o")).otherwise(pl.col("sensor")).alias("b"),
        (pl.when(forward).then(pl.col("d")).otherwise(-pl.col("d")) // BIN_US).alias("bin"),
    )
    out: dict[tuple[int, int], dict[Pair, dict[int, int]]] = {}
    keys = ("epoch", "shard", "a", "b", "bin")
    for epoch_, shard, a, b, bin_, n in binned.group_by(*keys).len().sort(*keys).iter_rows():
        out.setdefault((epoch_, shard), {}).setdefault((a, b), {})[bin_] = n
    return out


# --- the table of one epoch -----------------------------------------------------------------------------------

LOOKBACK_EPOCHS = 16
"""Evidence of the epochs this far before a table's own is merged as it arrives (a shard's row of an epoch counts
once: the table records which it merged); older evidence that was not in by then is not merged."""


def pair_key(a: str, b: str) -> str:
    """A pair's key in a stored table: the two names, ``a < b``, joined by U+001F."""
    return f"{a}\x1f{b}"


class PairState(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One pair's long sketch in a table, the last epoch whose evidence added to it, and ``candidate``: an epoch's
    evidence that looked like a clock jump, held aside until the next epoch's confirms it (or not)."""

    sketch: Sketch
    last_epoch: int
    candidate: Sketch | None = None


class OffsetTable(msgspec.Struct, frozen=True, kw_only=True):
    """The offsets a consumer applies during one epoch, and what the next epoch's table grows from. Stored once
    per epoch (the first worker to build it wins; every worker and every replay applies that one).

    ``offsets_us``: sensor → offset (µs, its clock minus the reference's), ``samples`` / ``spread_us`` its evidence
    (see :class:`Estimate`); ``pairs``: the long sketches (:func:`pair_key` → :class:`PairState`); ``merged``:
    evidence epoch → the shards whose rows of it are in (the last :data:`LOOKBACK_EPOCHS` epochs); ``jumps``: the
    pairs started over at this epoch (a clock jump)."""

    epoch: int
    reference: str | None = None
    offsets_us: dict[str, int] = msgspec.field(default_factory=dict)
    samples: dict[str, int] = msgspec.field(default_factory=dict)
    spread_us: dict[str, int] = msgspec.field(default_factory=dict)
    pairs: dict[str, PairState] = msgspec.field(default_factory=dict)
    merged: dict[int, list[int]] = msgspec.field(default_factory=dict)
    jumps: list[str] = msgspec.field(default_factory=list)
    # The DNS answers of the rows this table merged (only those: a story builder keeps the answers of the tables
    # of the last epochs, engine.correlate.dns.DnsView), in order.
    dns: list[DnsAnswer] = msgspec.field(default_factory=list)


class EvidenceRow(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A shard's differences of one epoch (what the story builder emits when the epoch closes for the shard)."""

    epoch: int
    shard: int
    pairs: dict[str, Sketch]
    dns: list[DnsAnswer] = msgspec.field(
        default_factory=list
    )  # the shard's DNS answers of the epoch (engine.correlate.dns)


def advance(
    prev: OffsetTable | None,
    epoch: int,
    rows: Iterable[EvidenceRow],
    *,
    reference: str | None,
    min_samples: int,
    delay_epochs: int,
    expire_epochs: int,
) -> OffsetTable:
    """The table of ``epoch`` from the latest earlier table ``prev`` (None: none is kept) and the stored evidence
    ``rows`` of the epochs up to ``epoch - 1 - delay_epochs`` (rows of later epochs, rows already merged into
    ``prev`` and rows older than the look-back are ignored, so the caller may pass more than needed).

    Per pair: the evidence of the new rows is merged into the long sketch, unless it says the clock jumped
    (:func:`jumped`, per new epoch of evidence), then the pair starts over from it. A pair with no evidence in the
    last ``expire_epochs`` epochs merged (up to ``epoch - 1 - delay_epochs``) is dropped. The reference is
    ``reference`` when given, else ``prev``'s, else the best supported sensor once one pair has ``min_samples``."""
    upto = epoch - 1 - delay_epochs
    floor = epoch - LOOKBACK_EPOCHS
    merged = {e: set(s) for e, s in (prev.merged.items() if prev else ()) if e >= floor}
    fresh: dict[int, list[EvidenceRow]] = {}
    for row in rows:
        if floor <= row.epoch <= upto and row.shard not in merged.get(row.epoch, ()):
            fresh.setdefault(row.epoch, []).append(row)
    pairs = dict(prev.pairs) if prev else {}
    jumps: list[str] = []
    answers: set[DnsAnswer] = set()
    for ev_epoch in sorted(fresh):
        by_pair: dict[str, list[Sketch]] = {}
        for row in sorted(fresh[ev_epoch], key=lambda r: r.shard):
            merged.setdefault(ev_epoch, set()).add(row.shard)
            answers.update(row.dns)
            for key, sk in row.pairs.items():
                by_pair.setdefault(key, []).append(sk)
        for key in sorted(by_pair):
            recent = merge(by_pair[key])
            old = pairs.get(key)
            if old is not None and jumped(old.sketch, recent, min_samples):
                if old.candidate is not None and _agree(old.candidate, recent):  # two epochs say so: a jump
                    pairs[key] = PairState(merge([old.candidate, recent]), ev_epoch)
                    jumps.append(key)
                else:  # held aside: a single epoch of it may be a burst of wrong pairs
                    pairs[key] = PairState(old.sketch, ev_epoch, recent)
            else:
                base = [old.sketch] if old is not None else []
                pairs[key] = PairState(merge([*base, recent]), max(ev_epoch, old.last_epoch if old else ev_epoch))
    pairs = {k: p for k, p in pairs.items() if p.last_epoch > upto - expire_epochs}
    ref = reference if reference is not None else (prev.reference if prev else None)
    est = solve({tuple(k.split("\x1f", 1)): p.sketch for k, p in pairs.items()}, ref, min_samples)  # type: ignore[misc]
    return OffsetTable(
        epoch=epoch,
        reference=est.reference,
        offsets_us=est.offsets_us,
        samples=est.samples,
        spread_us=est.spread_us,
        pairs=dict(sorted(pairs.items())),
        merged={e: sorted(s) for e, s in sorted(merged.items())},
        jumps=jumps,
        dns=sorted(answers),
    )


def evidence_epochs(epoch: int, delay_epochs: int) -> range:
    """The evidence epochs whose rows :func:`advance` may merge into ``epoch``'s table: the look-back up to
    ``epoch - 1 - delay_epochs`` (what a keeper reads before it builds the table)."""
    return range(epoch - LOOKBACK_EPOCHS, epoch - delay_epochs)


class TableBook:
    """Epoch tables in memory, built as a worker's keeper (engine.runtime.offsets) builds the stored ones: an
    epoch's table once, the first time it is asked for, from the latest table built before it and the rows of
    :func:`evidence_epochs` given so far; the same table afterwards (first writer wins). For runs without a
    store: tests and benches that drive a story builder in-process. Pure."""

    def __init__(self, *, reference: str | None, min_samples: int, delay_epochs: int, expire_epochs: int) -> None:
        self._kw: dict[str, Any] = {
            "reference": reference,
            "min_samples": min_samples,
            "delay_epochs": delay_epochs,
            "expire_epochs": expire_epochs,
        }
        self._delay = delay_epochs
        self.rows: dict[tuple[int, int], EvidenceRow] = {}  # (epoch, shard) → the newest row given
        self.tables: dict[int, OffsetTable] = {}

    def add(self, rows: Iterable[EvidenceRow]) -> None:
        """Evidence rows as they are written (a later row of the same epoch and shard replaces the earlier)."""
        for row in rows:
            self.rows[(row.epoch, row.shard)] = row

    def table(self, epoch: int) -> OffsetTable:
        got = self.tables.get(epoch)
        if got is None:
            prev = max((e for e in self.tables if e < epoch), default=None)
            span = evidence_epochs(epoch, self._delay)
            rows = [r for (e, _), r in sorted(self.rows.items()) if e in span]
            got = self.tables[epoch] = advance(self.tables[prev] if prev is not None else None, epoch, rows, **self._kw)
        return got
