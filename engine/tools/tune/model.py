"""The sizing model of ``storyline tune``: from inputs (rate, average event size, retention, backend, a
:class:`Capacity`, an optional base config) to a recommendation (config tree and reasoning per key). Pure: no I/O,
no clock. :func:`recommend` runs the steps: :func:`size` computes every figure (:class:`Sizing`), then the tree is
built part by part (engine keys, store, correlate and ingest, carried-over keys) and the header written.

The model, in short (all rates in events/s):

* a **worker** core spends ``1/read + 1/story`` seconds per event (read + decode from the store, then the story
  stage); it is sized for the rate times ``HEADROOM`` (a backlog after an outage drains as fast as it grew);
* **shards** (fixed when a tenant is initialized) leave room for ``GROWTH`` times as many workers, and on CQL
  for several written partitions per database core; a power of two, at least one 16-shard index group;
* **bucket_ms** is the largest bucket whose partitions (``rate / shards * bucket`` rows) stay within
  ``PARTITION_MAX_BYTES`` and ``PARTITION_MAX_ROWS`` (small tenants get long buckets: cheap idle polling),
  at most a tenth of ``correlate.max_wait_ms`` so the lag stays small next to a story's wait;
* **lag_ms**, **ttl_ms** and **twcs_window_ms** follow from the rules in :mod:`engine.core.config`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec

from engine.core.config import MAX_TWCS_WINDOWS, Config
from engine.core.errors import ConfigError

Backend = Literal["cql", "embedded"]
Tree = dict[str, Any]
Reasons = dict[str, list[str]]  # dotted key -> comment lines; "" -> the header

KIB, MIB = 1024, 1024 * 1024
HOUR_MS, DAY_MS = 3_600_000, 86_400_000

HEADROOM = 2.0  # engine and database sized for twice the rate: 50 % busy, a backlog drains as fast as it grew
GROWTH = 4  # shards leave room for 4x the workers (shards are fixed at init; workers are not)
MIN_SHARDS = 16  # one bucket_index query and one offset-commit batch cover 16 shards
MAX_SHARDS = 65_536
PARTITION_MAX_BYTES = 4 * MIB  # an (shard, bucket) partition: a few MB, a handful of pages
PARTITION_MAX_ROWS = 20_000
BUCKETS_MS = (10, 20, 50, 100, 200, 250, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 20_000, 30_000, 60_000)
MAX_BUCKET_MS = 60_000
ROW_OVERHEAD_BYTES = 64  # key columns, event id, cell metadata of one event row (an estimate, not measured)
NODE_CORES = 8  # the node size the database estimate is expressed in (an assumption: choose your own)
NODE_DISK_BYTES = 4e12  # data per node the estimate allows (an assumption: TWCS needs little compaction headroom)
READ_MEMORY_BYTES = 128 * MIB  # partitions a worker may hold at once while catching up (read_ahead x partition)
EMBEDDED_MAX_RATE = 300.0  # events/s: below this (and one machine) the embedded store is enough
EMBEDDED_MAX_BYTES_PER_S = 1_000_000.0
MAX_RATE = 10_000_000.0
MAX_AVG_BYTES = 64 * MIB
MAX_RETENTION_H = 20 * 365 * 24.0  # CQL's largest TTL is 20 years
DEFAULT_RETENTION_H = 48.0  # the config's default ttl_ms
PRODUCTION_DC = "datacenter1"  # ScyllaDB's and Cassandra's default datacenter name (`nodetool status`)

BENCHMARKS = "docs/BENCHMARKS.md, run of 2026-11-26 (2 vCPU x86_64, Cassandra 5.0 on the same cores)"


@dataclass(frozen=True, slots=True)
class Capacity:
    """Per-core throughput figures (events/s on one core unless named otherwise) and this machine's cores.

    The defaults were measured on the 2-vCPU development machine (``BENCHMARKS``):

    * ``ingest_per_core`` 112,339: client-side ingest of ~515 B events (validate, normalize, id, flow key, msgpack,
      shard, group; 8.90 µs per event), docs/BENCHMARKS.md "Ingest";
    * ``embedded_ingest_per_core`` 47,909: end-to-end JSONL ingest of ~515 B events into SQLite (one core client);
    * ``read_per_core`` 271,956: ``storyline run --until-idle`` with one worker process on CQL ("Consume");
    * ``story_per_core`` 36,376: ``StoryMachine`` (decode + link + state + fused stories + SQLite story writes) on
      simulated events of ~270 B ("Story builder");
    * ``bytes_per_core`` 143.9 MB/s: end-to-end ingest of 1 MiB events (embedded), the per-byte cost above the
      reference sizes;
    * ``db_write_per_core`` / ``db_read_per_core``: the CQL store write (84,632 events/s) and read (281,020) paths of
      300 B events on one Cassandra node, halved because node and client shared the 2 vCPUs ("Store paths");
    * ``idle_core_fraction`` 0.013: supervisor + workers with 256 shards, 1 s buckets, no traffic ("Consume");
    * ``payload_ratio``, ``story_bytes_per_event``, ``story_rows_per_event``: measured by ``storyline tune
      --measure`` on the same machine (2026-11-26; see docs/tuning.md).
    """

    ingest_per_core: float = 112_339.0
    ingest_ref_bytes: float = 515.0
    embedded_ingest_per_core: float = 47_909.0
    read_per_core: float = 271_956.0
    read_ref_bytes: float = 300.0
    story_per_core: float = 36_376.0
    story_ref_bytes: float = 270.0
    bytes_per_core: float = 143.9e6
    db_write_per_core: float = 84_632.0 / 2
    db_read_per_core: float = 281_020.0 / 2
    idle_core_fraction: float = 0.013  # of one core, for IDLE_REF_SHARDS shards at IDLE_REF_BUCKET_MS buckets
    payload_ratio: float = 0.85  # stored msgpack payload / JSON input line
    story_bytes_per_event: float = 310.0  # story bodies written (all revisions) per event
    story_rows_per_event: float = 0.45  # story rows (revisions) written per event
    cores: int = 2
    source: str = BENCHMARKS
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, float) and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"capacity.{name}", f"{value} must be a finite number > 0")
        if self.cores < 1:
            raise ConfigError("--cores", f"{self.cores} must be >= 1")


IDLE_REF_SHARDS, IDLE_REF_BUCKET_MS = 256, 1_000


def machine_cores() -> int:
    """The cores this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


# -- input checks ------------------------------------------------------------------------------------------
def check_inputs(rate: float, avg_bytes: float, retention_h: float, backend: str | None) -> None:
    """Raise :class:`ConfigError` naming the flag of the first bad input."""
    if not (math.isfinite(rate) and 0 < rate <= MAX_RATE):
        raise ConfigError("--events-per-sec", f"{rate:g} must be a number > 0 and <= {MAX_RATE:,.0f}")
    if not (math.isfinite(avg_bytes) and 1 <= avg_bytes <= MAX_AVG_BYTES):
        raise ConfigError("--avg-event-bytes", f"{avg_bytes:g} must be a number >= 1 and <= {MAX_AVG_BYTES} (64 MiB)")
    if not (math.isfinite(retention_h) and 0 < retention_h <= MAX_RETENTION_H):
        raise ConfigError("--retention-hours", f"{retention_h:g} must be > 0 and <= {MAX_RETENTION_H:,.0f} (20 years)")
    if backend not in (None, "cql", "embedded"):
        raise ConfigError("--backend", f"{backend!r} must be cql or embedded")


# -- small helpers -----------------------------------------------------------------------------------------
def _ceil(x: float) -> int:
    """ceil that ignores float noise just above an integer (3.0000000001 -> 3)."""
    return math.ceil(x - 1e-9)


def _pow2ceil(x: float) -> int:
    n = 1
    while n < x - 1e-9:
        n *= 2
    return n


def clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


def _fmt_ms(ms: int) -> str:
    if ms % DAY_MS == 0:
        return f"{ms // DAY_MS} d"
    if ms % HOUR_MS == 0:
        return f"{ms // HOUR_MS} h"
    if ms % 60_000 == 0:
        return f"{ms // 60_000} min"
    return f"{ms / 1000:g} s"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def twcs_window_ms(ttl_ms: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12 h or a whole number of days giving at most 50 windows per TTL."""
    for hours in (1, 2, 3, 4, 6, 8, 12):
        if -(-ttl_ms // (hours * HOUR_MS)) <= MAX_TWCS_WINDOWS:
            return hours * HOUR_MS
    days = -(-ttl_ms // (MAX_TWCS_WINDOWS * DAY_MS))
    while -(-ttl_ms // (days * DAY_MS)) > MAX_TWCS_WINDOWS:  # integer rounding
        days += 1
    return days * DAY_MS


def _is_loopback(contact_point: str) -> bool:
    host = contact_point.rpartition(":")[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _single_local_node(base: Config | None) -> bool:
    """A base config on one local CQL node with replication factor 1 (the development node)."""
    if base is None or base.store.backend != "cql":
        return False
    rep = base.store.replication
    rf = rep.replication_factor if rep.strategy == "SimpleStrategy" else max(rep.datacenters.values())
    return rf == 1 and all(_is_loopback(cp) for cp in base.store.contact_points)


# -- the recommendation: figures -------------------------------------------------------------------------------
class Note(Protocol):
    """Adds reasoning lines to a dotted key ("" is the header)."""

    def __call__(self, key: str, *lines: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Sizing:
    """Every figure of one recommendation (rates in events/s, times in seconds per event or ms, sizes in bytes)."""

    rate: float
    avg_bytes: float
    retention_h: float
    cap: Capacity
    base: Config | None
    ref: Config  # the base config, or the defaults
    backend: Backend
    auto: bool  # backend chosen by rate
    single: bool  # one local CQL node with replication factor 1
    rf: int
    stored: float  # bytes of one stored event row
    in_bps: float
    t_ingest: float
    t_embedded_ingest: float
    t_read: float
    t_story: float
    worker_rate: float
    need_workers: int
    db_cores: int
    by_partition: float
    shards: int
    per_shard_eps: float
    bucket_cap: int
    fits: bool  # some bucket keeps partitions within the targets
    bucket_ms: int
    part_rows: float
    part_bytes: float
    need_lag: int
    lag_ms: int
    need_ttl: int
    want_ttl: int
    ttl_ms: int
    window_ms: int
    workers: int
    instances: int
    page_bytes: int
    page_rows: int
    in_flight: int
    read_ahead: int
    batch_lines: int
    max_event_bytes: int
    day_bytes: float
    kept_bytes: float
    nodes: int
    idle: float
    producer_cores: float


def _per_event_seconds(avg_bytes: float, cap: Capacity) -> tuple[float, float, float, float]:
    """CPU seconds per event of one core: client ingest, embedded ingest end to end, store read, story stage."""
    t_ingest = 1 / cap.ingest_per_core + max(0.0, avg_bytes - cap.ingest_ref_bytes) / cap.bytes_per_core
    t_embedded_ingest = 1 / cap.embedded_ingest_per_core + max(0.0, avg_bytes - cap.ingest_ref_bytes) / (
        cap.bytes_per_core
    )
    t_read = 1 / cap.read_per_core + max(0.0, avg_bytes - cap.read_ref_bytes) / cap.bytes_per_core
    t_story = 1 / cap.story_per_core + max(0.0, avg_bytes - cap.story_ref_bytes) / cap.bytes_per_core
    return t_ingest, t_embedded_ingest, t_read, t_story


def _choose_backend(rate: float, in_bps: float, backend: Backend | None) -> Backend:
    if backend is not None:
        return backend
    return "embedded" if rate <= EMBEDDED_MAX_RATE and in_bps <= EMBEDDED_MAX_BYTES_PER_S else "cql"


def _database_cores(rate: float, cap: Capacity, rf: int, single: bool) -> int:
    """Database (CQL) cores: every event row is written on rf replicas, plus the story rows; read once at the read
    consistency (2 replicas for LOCAL_QUORUM of 3)."""
    read_replicas = 1 if single else 2
    return max(
        1,
        _ceil(
            rate
            * HEADROOM
            * (rf * (1 + cap.story_rows_per_event) / cap.db_write_per_core + read_replicas / cap.db_read_per_core)
        ),
    )


def _shard_count(rate: float, stored: float, need_workers: int, db_cores: int) -> tuple[int, float]:
    """The shard count and the shards needed so that a 1 s bucket never exceeds the partition target."""
    by_partition = rate * stored / PARTITION_MAX_BYTES
    shard_need = max(MIN_SHARDS, GROWTH * need_workers, GROWTH * db_cores, _ceil(by_partition))
    return min(MAX_SHARDS, _pow2ceil(shard_need)), by_partition


def _bucket(per_shard_eps: float, stored: float, max_wait_ms: int) -> tuple[int, int, bool]:
    """The largest bucket within the cap and the partition targets; the cap; whether any bucket fits."""
    per_shard_bps = per_shard_eps * stored
    bucket_cap = min(MAX_BUCKET_MS, max_wait_ms // 10)
    fits = [
        b
        for b in BUCKETS_MS
        if (b <= bucket_cap or b == BUCKETS_MS[0])
        and per_shard_bps * b / 1000 <= PARTITION_MAX_BYTES
        and per_shard_eps * b / 1000 <= PARTITION_MAX_ROWS
    ]
    return (max(fits) if fits else BUCKETS_MS[0]), bucket_cap, bool(fits)


def _lag_and_ttl(ref: Config, bucket_ms: int, retention_h: float) -> tuple[int, int, int, int, int]:
    """need_lag, lag_ms, need_ttl, want_ttl, ttl_ms: the config's lag and TTL rules, the retention asked."""
    corr = ref.correlate
    need_lag = ref.max_write_age_ms + ref.request_timeout_ms + ref.max_clock_skew_ms + bucket_ms
    lag_ms = -(-need_lag // 1000) * 1000
    need_ttl = lag_ms + corr.max_story_ms + corr.max_wait_ms + corr.amend_horizon_ms + ref.downtime_allowance_ms
    want_ttl = math.ceil(retention_h * 3600) * 1000
    ttl_ms = want_ttl if want_ttl >= need_ttl else -(-need_ttl // HOUR_MS) * HOUR_MS
    return need_lag, lag_ms, need_ttl, want_ttl, ttl_ms


def _io_sizes(stored: float, avg_bytes: float, db_cores: int, part_bytes: float, ref: Config) -> tuple[int, ...]:
    """page_bytes, page_rows, in_flight, read_ahead, batch_lines, max_event_bytes."""
    page_bytes = MIB if stored <= 64 * KIB else 4 * MIB
    page_rows = clamp(round(2 * page_bytes / stored / 500) * 500, 500, 20_000)
    in_flight = clamp(_pow2ceil(max(64, 4 * db_cores)), 64, 1024)
    read_ahead = clamp(int(READ_MEMORY_BYTES // max(part_bytes, 1.0)), 4, 16)
    batch_lines = clamp(int(64 * MIB // avg_bytes), 1, 5_000)
    max_event_bytes = ref.max_event_bytes
    if avg_bytes * 8 > max_event_bytes:
        max_event_bytes = min(256 * MIB, _pow2ceil(avg_bytes * 8))
    return page_bytes, page_rows, in_flight, read_ahead, batch_lines, max_event_bytes


def size(
    rate: float,
    avg_bytes: float,
    retention_h: float,
    backend: Backend | None,
    cap: Capacity,
    base: Config | None,
) -> Sizing:
    """Every figure of the recommendation, step by step (inputs already checked)."""
    ref = base or Config(tenant="main")
    stored = avg_bytes * cap.payload_ratio + ROW_OVERHEAD_BYTES
    in_bps = rate * avg_bytes
    t_ingest, t_embedded_ingest, t_read, t_story = _per_event_seconds(avg_bytes, cap)
    worker_rate = 1 / (t_read + t_story)
    need_workers = max(1, _ceil(rate * HEADROOM / worker_rate))
    chosen = _choose_backend(rate, in_bps, backend)
    single = chosen == "cql" and _single_local_node(base)
    rf = 1 if chosen == "embedded" or single else 3
    db_cores = _database_cores(rate, cap, rf, single) if chosen == "cql" else 0
    shards, by_partition = _shard_count(rate, stored, need_workers, db_cores)
    per_shard_eps = rate / shards
    bucket_ms, bucket_cap, fits = _bucket(per_shard_eps, stored, ref.correlate.max_wait_ms)
    part_rows = per_shard_eps * bucket_ms / 1000
    part_bytes = part_rows * stored
    need_lag, lag_ms, need_ttl, want_ttl, ttl_ms = _lag_and_ttl(ref, bucket_ms, retention_h)
    window_ms = twcs_window_ms(ttl_ms)
    # workers per instance (this machine's cores), instances
    workers = max(1, min(need_workers, cap.cores, shards, 1024))
    instances = _ceil(need_workers / workers)
    page_bytes, page_rows, in_flight, read_ahead, batch_lines, max_event_bytes = _io_sizes(
        stored, avg_bytes, db_cores, part_bytes, ref
    )
    # storage (before compression) and idle cost
    day_events = rate * 86_400
    rf_storage = rf if chosen == "cql" else 1
    day_bytes = day_events * (stored + cap.story_bytes_per_event) * rf_storage
    kept_bytes = day_bytes * (ttl_ms + window_ms) / DAY_MS
    nodes = 0
    if chosen == "cql":
        nodes = 1 if single else max(rf, _ceil(db_cores / NODE_CORES), _ceil(kept_bytes / NODE_DISK_BYTES))
    idle = cap.idle_core_fraction * (shards / IDLE_REF_SHARDS) * (IDLE_REF_BUCKET_MS / bucket_ms)
    producer_cores = rate * HEADROOM * (t_embedded_ingest if chosen == "embedded" else t_ingest)
    return Sizing(
        rate=rate,
        avg_bytes=avg_bytes,
        retention_h=retention_h,
        cap=cap,
        base=base,
        ref=ref,
        backend=chosen,
        auto=backend is None,
        single=single,
        rf=rf,
        stored=stored,
        in_bps=in_bps,
        t_ingest=t_ingest,
        t_embedded_ingest=t_embedded_ingest,
        t_read=t_read,
        t_story=t_story,
        worker_rate=worker_rate,
        need_workers=need_workers,
        db_cores=db_cores,
        by_partition=by_partition,
        shards=shards,
        per_shard_eps=per_shard_eps,
        bucket_cap=bucket_cap,
        fits=fits,
        bucket_ms=bucket_ms,
        part_rows=part_rows,
        part_bytes=part_bytes,
        need_lag=need_lag,
        lag_ms=lag_ms,
        need_ttl=need_ttl,
        want_ttl=want_ttl,
        ttl_ms=ttl_ms,
        window_ms=window_ms,
        workers=workers,
        instances=instances,
        page_bytes=page_bytes,
        page_rows=page_rows,
        in_flight=in_flight,
        read_ahead=read_ahead,
        batch_lines=batch_lines,
        max_event_bytes=max_event_bytes,
        day_bytes=day_bytes,
        kept_bytes=kept_bytes,
        nodes=nodes,
        idle=idle,
        producer_cores=producer_cores,
    )


# -- the recommendation: tree and reasoning ------------------------------------------------------------------
def recommend(
    rate: float,
    avg_bytes: float,
    retention_h: float = DEFAULT_RETENTION_H,
    backend: Backend | None = None,
    capacity: Capacity | None = None,
    *,
    base: Config | None = None,
) -> tuple[Tree, Reasons]:
    """The recommended config tree for ``rate`` events/s of ``avg_bytes`` (JSON input) kept ``retention_h``
    hours, and the reasoning per dotted key ("" for the header). ``backend`` None chooses by rate. ``base`` is an
    existing config whose inputs are kept (tenant, connection, correlate windows, timeouts, downtime allowance)
    and whose other non-default keys are carried over. Pure: no I/O. Raises ConfigError naming the flag."""
    check_inputs(rate, avg_bytes, retention_h, backend)
    s = size(rate, avg_bytes, retention_h, backend, capacity or Capacity(), base)
    why: Reasons = {}

    def note(key: str, *lines: str) -> None:
        why.setdefault(key, []).extend(lines)

    tree = _sizing_keys(s, note)
    tree.update(_retention_keys(s, note))
    tree.update(_worker_keys(s, note))
    tree["store"] = _store_table(s, note)
    _correlate_and_ingest(s, tree, note)
    secrets = _carry_over(tree, base, s.backend, note)
    why.setdefault("", []).extend(_header(s, secrets))
    return tree, why


def _sizing_keys(s: Sizing, note: Note) -> Tree:
    """tenant, shards, bucket_ms, lag_ms and the timeouts the lag rule adds up."""
    ref = s.ref
    tree: Tree = {"tenant": ref.tenant}
    if s.base is None:
        note("tenant", "your tenant name ([a-z][a-z0-9_]{0,47}): the keyspace (CQL) or table prefix (embedded)")
    tree["shards"] = s.shards
    note(
        "shards",
        f"{s.shards} = the power of two >= max(16 (one bucket_index query / commit batch per 16 shards),"
        f" {GROWTH} x {s.need_workers} workers needed (room to add workers: shards are fixed at init)"
        + (f", {GROWTH} x {s.db_cores} database cores (several written partitions per core)" if s.db_cores else "")
        + (f", {_ceil(s.by_partition)} for partitions <= {PARTITION_MAX_BYTES // MIB} MiB per second)"),
        f"{s.per_shard_eps:,.1f} events/s per shard.",
    )
    tree["bucket_ms"] = s.bucket_ms
    note(
        "bucket_ms",
        f"partitions (shard, bucket) of ~{s.part_rows:,.0f} rows, ~{_fmt_bytes(s.part_bytes)} (stored row"
        f" ~{s.stored:,.0f} B: payload {s.cap.payload_ratio:.2f} x {s.avg_bytes:,.0f} B + ~{ROW_OVERHEAD_BYTES} B row"
        f" overhead); the largest bucket <= {min(s.bucket_cap, MAX_BUCKET_MS) / 1000:g} s (a tenth of"
        f" correlate.max_wait_ms, at most 60 s) with partitions <= {PARTITION_MAX_BYTES // MIB} MiB and <="
        f" {PARTITION_MAX_ROWS:,} rows."
        + (" Long buckets keep idle polling cheap for a small tenant." if s.bucket_ms >= 30_000 else ""),
        "Fixed when the tenant is initialized, like shards.",
    )
    if not s.fits:
        note("bucket_ms", "WARNING: even the smallest bucket exceeds the partition target at this rate.")
    tree["lag_ms"] = s.lag_ms
    note(
        "lag_ms",
        f">= max_write_age_ms + request_timeout_ms + max_clock_skew_ms + bucket_ms = {ref.max_write_age_ms} +"
        f" {ref.request_timeout_ms} + {ref.max_clock_skew_ms} + {s.bucket_ms} = {s.need_lag}, rounded up to a"
        " second.",
    )
    tree["max_write_age_ms"] = ref.max_write_age_ms
    tree["request_timeout_ms"] = ref.request_timeout_ms
    note("request_timeout_ms", "no lower than the server's write timeout")
    tree["max_clock_skew_ms"] = ref.max_clock_skew_ms
    note("max_clock_skew_ms", "keep every producer and worker on NTP; workers refuse to start above this")
    return tree


def _retention_keys(s: Sizing, note: Note) -> Tree:
    """ttl_ms, twcs_window_ms and downtime_allowance_ms."""
    ref, corr, ttl_ms = s.ref, s.ref.correlate, s.ttl_ms
    rule = (
        f"lag_ms + correlate.max_story_ms + max_wait_ms + amend_horizon_ms + downtime_allowance_ms ="
        f" {_fmt_ms(s.lag_ms)} + {_fmt_ms(corr.max_story_ms)} + {_fmt_ms(corr.max_wait_ms)} +"
        f" {_fmt_ms(corr.amend_horizon_ms)} + {_fmt_ms(ref.downtime_allowance_ms)} = {s.need_ttl / HOUR_MS:.2f} h"
    )
    if s.want_ttl >= s.need_ttl:
        note("ttl_ms", f"retention {s.retention_h:g} h ({_fmt_ms(ttl_ms)}); the TTL rule needs >= {rule}.")
    else:
        note(
            "ttl_ms",
            f"retention {s.retention_h:g} h asked, raised to {_fmt_ms(ttl_ms)}: the TTL rule needs >= {rule}."
            " Lower downtime_allowance_ms (--set) to keep less.",
        )
    note(
        "twcs_window_ms",
        f"{-(-ttl_ms // s.window_ms)} TWCS windows of {_fmt_ms(s.window_ms)} per TTL (at most {MAX_TWCS_WINDOWS}:"
        " ScyllaDB's twcs_max_window_count); whole windows expire at once, no tombstones.",
    )
    note("downtime_allowance_ms", "how long the engine may be down without losing unread events (part of ttl_ms)")
    return {"ttl_ms": ttl_ms, "twcs_window_ms": s.window_ms, "downtime_allowance_ms": ref.downtime_allowance_ms}


def _worker_keys(s: Sizing, note: Note) -> Tree:
    """workers, read_ahead and (when the average event needs it) max_event_bytes."""
    tree: Tree = {"workers": s.workers}
    note(
        "workers",
        f"one worker core handles ~{s.worker_rate:,.0f} events/s (read {1 / s.t_read:,.0f}/s and story stage"
        f" {1 / s.t_story:,.0f}/s per core at {s.avg_bytes:,.0f} B); {s.rate:,.0f} x {HEADROOM:g} headroom needs"
        f" {s.need_workers} worker core(s).",
        f"{s.cap.cores} core(s) per engine machine: {s.workers} worker(s) per instance"
        + (
            f", {s.instances} instances (`storyline run --shards A-B` on each, disjoint ranges)."
            if s.instances > 1
            else "."
        ),
    )
    tree["read_ahead"] = s.read_ahead
    note("read_ahead", f"partitions read at once while catching up: {s.read_ahead} x ~{_fmt_bytes(s.part_bytes)}")
    if s.max_event_bytes != s.ref.max_event_bytes:
        tree["max_event_bytes"] = s.max_event_bytes
        note("max_event_bytes", "8 x the average event, so large events are not rejected")
    return tree


def _store_table(s: Sizing, note: Note) -> Tree:
    """The [store] table: backend-specific keys, then pages and batches."""
    store: Tree = {"backend": s.backend}
    if s.backend == "embedded":
        _embedded_store(s, store, note)
    else:
        _cql_store(s, store, note)
    store["page_rows"] = s.page_rows
    store["page_bytes"] = s.page_bytes
    note(
        "store.page_rows",
        f"~2 x page_bytes / stored row, so the byte bound ({_fmt_bytes(s.page_bytes)}) decides a page's size",
    )
    store["batch_bytes"] = 64 * KIB
    note("store.batch_bytes", "single-partition UNLOGGED batches; keep below the server's batch size warning")
    return store


def _embedded_store(s: Sizing, store: Tree, note: Note) -> None:
    ref = s.ref
    store["path"] = ref.store.path if ref.store.backend == "embedded" and s.base is not None else "storyline.db"
    note(
        "store.backend",
        f"{s.rate:,.0f} events/s, {_fmt_bytes(s.in_bps)}/s of input"
        + (
            f": below {EMBEDDED_MAX_RATE:,.0f} events/s and {_fmt_bytes(EMBEDDED_MAX_BYTES_PER_S)}/s the embedded"
            " store (SQLite, one file, one machine) is enough"
            if s.auto
            else " (embedded asked)"
        )
        + f"; it wrote {s.cap.embedded_ingest_per_core:,.0f} events/s end to end here. No replication: back up the"
        " file, or use CQL when losing a disk must not lose events.",
    )
    if s.rate > EMBEDDED_MAX_RATE or s.in_bps > EMBEDDED_MAX_BYTES_PER_S:
        note(
            "store.backend",
            f"WARNING: above {EMBEDDED_MAX_RATE:,.0f} events/s or {_fmt_bytes(EMBEDDED_MAX_BYTES_PER_S)}/s"
            " use cql: one SQLite file serializes all writers.",
        )
    note("store.path", "the database file; relative paths resolve against the directory you run storyline from")


def _cql_store(s: Sizing, store: Tree, note: Note) -> None:
    ref, base, cap, rf = s.ref, s.base, s.cap, s.rf
    if base is not None and base.store.backend == "cql":
        store["contact_points"] = list(ref.store.contact_points)
    else:
        store["contact_points"] = ["scylla-1:9042", "scylla-2:9042", "scylla-3:9042"]
        note("store.contact_points", "your nodes, host:9042 (the driver also uses ScyllaDB's shard-aware 19042)")
    note(
        "store.backend",
        f"{s.rate:,.0f} events/s, {_fmt_bytes(s.in_bps)}/s of input"
        + (f": above {EMBEDDED_MAX_RATE:,.0f} events/s CQL (ScyllaDB) replicates and scales out" if s.auto else "")
        + ".",
        f"Database: ~{s.db_cores} core(s) at {HEADROOM:g} x the rate (rf {rf} x (1 + {cap.story_rows_per_event:.2f}"
        f" story rows) writes/event at {cap.db_write_per_core:,.0f}/s per core, reads at"
        f" {cap.db_read_per_core:,.0f}/s per core; Cassandra figures, a ScyllaDB core usually does more)"
        + (
            f" => {s.nodes} node(s): at least {rf} for rf {rf}, {NODE_CORES} cores and"
            f" {_fmt_bytes(NODE_DISK_BYTES)} of data each (assumed node size; before compression)."
            if not s.single
            else " => the one local node."
        ),
    )
    if s.single:
        store["consistency"] = "ONE"
        store["serial_consistency"] = "LOCAL_SERIAL"
        store["replication"] = {"strategy": "SimpleStrategy", "replication_factor": 1}
        note(
            "store.consistency",
            "ONE: a single local node with replication_factor 1 (development only; production: RF 3 + LOCAL_QUORUM)",
        )
    else:
        store["consistency"] = "LOCAL_QUORUM"
        store["serial_consistency"] = "LOCAL_SERIAL"
        dcs = dict(ref.store.replication.datacenters) if base is not None else {}
        dcs = {dc: 3 for dc in dcs} or {PRODUCTION_DC: 3}
        store["replication"] = {"strategy": "NetworkTopologyStrategy", "datacenters": dcs}
        note(
            "store.consistency",
            "LOCAL_QUORUM with RF 3: writes and reads each on 2 of 3 replicas (W + R > RF), one node may fail",
        )
        note("store.replication", "your datacenter name(s) as `nodetool status` shows them")
    store["max_in_flight"] = s.in_flight
    note(
        "store.max_in_flight",
        f"statements in flight per process: >= 64 and >= 4 per database core ({s.db_cores})",
    )


def _correlate_and_ingest(s: Sizing, tree: Tree, note: Note) -> None:
    """[correlate] kept as it is; [ingest] sized for the event size."""
    corr = s.ref.correlate
    tree["correlate"] = {
        "match_window_ms": corr.match_window_ms,
        "max_wait_ms": corr.max_wait_ms,
        "amend_horizon_ms": corr.amend_horizon_ms,
        "max_story_ms": corr.max_story_ms,
        "emit": corr.emit,
    }
    note(
        "correlate",
        "kept" + (" from your config" if s.base is not None else " (defaults)") + "; see docs/correlation.md",
    )
    ingest: Tree = {"batch_lines": s.batch_lines}
    tree["ingest"] = ingest
    note(
        "ingest.batch_lines",
        f"lines per round: <= 5000 and ~64 MiB of input ({s.batch_lines} x {s.avg_bytes:,.0f} B)",
    )
    if s.backend == "cql":
        ingest["max_in_flight"] = s.in_flight


def _header(s: Sizing, secrets: list[str]) -> list[str]:
    """The header comment: inputs, capacities, the engine, database or storage estimate, what to watch."""
    cap, base = s.cap, s.base
    in_bps = s.in_bps
    head = [
        f"{s.rate:,.6g} events/s x {s.avg_bytes:,.6g} B = {_fmt_bytes(in_bps)}/s, {_fmt_bytes(in_bps * 86_400)}/day"
        f" of JSON input; retention {s.retention_h:g} h; backend {s.backend}"
        + (" (chosen by rate)" if s.auto else "")
        + ".",
        f"Capacities: {cap.source}.",
        *cap.notes,
        f"Producers (ingest): ~{s.producer_cores:.2g} core(s) at {HEADROOM:g} x the rate"
        f" ({1 / (s.t_embedded_ingest if s.backend == 'embedded' else s.t_ingest):,.0f} events/s per core).",
        f"Engine: {s.need_workers} worker core(s) => {s.instances} instance(s) x {s.workers} worker(s); idle cost"
        f" ~{s.idle * 100:.3g} % of a core (scaled from 1.3 % for 256 shards at 1 s buckets).",
    ]
    if s.backend == "cql":
        head.append(
            f"Database: ~{s.db_cores} core(s), {s.nodes} node(s); stored {_fmt_bytes(s.day_bytes)}/day with rf"
            f" {s.rf}, ~{_fmt_bytes(s.kept_bytes)} at steady state (TTL + one TWCS window; before compression)"
            + (f", ~{_fmt_bytes(s.kept_bytes / s.nodes)} per node." if s.nodes > 1 else ".")
        )
    else:
        head.append(
            f"Storage: {_fmt_bytes(s.day_bytes)}/day, ~{_fmt_bytes(s.kept_bytes)} in the file at steady state (TTL +"
            " one window, before SQLite overhead)."
        )
    head.append(
        "Watch `storyline status`: max behind (alarm at 2 x lag_ms), shards never consumed, replay_bucket near the TTL."
    )
    if base is not None and (base.shards != s.shards or base.bucket_ms != s.bucket_ms):
        head.append(
            f"If your tenant is already initialized (with shards = {base.shards}, bucket_ms = {base.bucket_ms} in"
            " your config), it keeps those: `storyline init` refuses a change; re-sharding means a new tenant."
        )
    if secrets:
        head.append(f"Not printed: {', '.join(secrets)} from your config; add them back.")
    return head


INLINE_TABLES = {"store.replication.datacenters", "correlate.sensor_offsets_ms", "correlate.merge"}
_CQL_ONLY = {
    "store.contact_points",
    "store.replication",
    "store.consistency",
    "store.serial_consistency",
    "store.username",
    "store.password",
    "store.tls_ca_file",
}
_SECRETS = ("store.username", "store.password")


def _carry_over(tree: Tree, base: Config | None, backend: str, note: Any) -> list[str]:
    """Copy the base config's non-default values of keys the recommendation does not set; return the secret keys
    left out."""
    if base is None:
        return []
    have = msgspec.to_builtins(base)
    default = msgspec.to_builtins(Config(tenant=base.tenant))
    secrets: list[str] = []

    def walk(prefix: str, mine: Mapping[str, Any], dflt: Mapping[str, Any], out: Tree) -> None:
        for key, value in mine.items():
            dotted = f"{prefix}{key}"
            if value is None or value == dflt.get(key):
                continue
            if dotted in _SECRETS:
                secrets.append(dotted)
                continue
            if backend != "cql" and any(dotted == k or dotted.startswith(k + ".") for k in _CQL_ONLY):
                continue
            if backend == "cql" and dotted == "store.path":
                continue
            if isinstance(value, dict) and dotted not in INLINE_TABLES:
                sub = out.setdefault(key, {})
                if isinstance(sub, dict):
                    walk(dotted + ".", value, dflt.get(key) or {}, sub)
                continue
            if key in out:
                continue
            out[key] = value
            note(dotted, "from your config")

    walk("", have, default, tree)
    return secrets
