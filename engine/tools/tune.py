"""Sizing: a recommended config for an event rate, an event size and a retention (``storyline tune``).

:func:`recommend` is a pure function (no I/O): from the rate, the average event size, the retention, the backend
and a :class:`Capacity` (per-core throughput figures) it returns the config tree and, per key, the reasoning.
:func:`to_toml` renders both as a TOML document whose comments carry the reasoning. :func:`measure` calibrates a
:class:`Capacity` with a short real run on this machine (``--measure``, ~10 s). docs/tuning.md explains the
rules; every tree :func:`recommend` returns loads with :func:`engine.core.config.from_mapping`.

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

import argparse
import asyncio
import datetime as dt
import math
import os
import re
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgspec

from engine.core.config import MAX_TWCS_WINDOWS, Config, load
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


def _clamp(x: int, lo: int, hi: int) -> int:
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


# -- the recommendation ------------------------------------------------------------------------------------
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
    cap = capacity or Capacity()
    ref = base or Config(tenant="main")
    corr = ref.correlate
    why: Reasons = {}

    def note(key: str, *lines: str) -> None:
        why.setdefault(key, []).extend(lines)

    # Sizes and per-event costs.
    stored = avg_bytes * cap.payload_ratio + ROW_OVERHEAD_BYTES
    in_bps = rate * avg_bytes
    t_ingest = 1 / cap.ingest_per_core + max(0.0, avg_bytes - cap.ingest_ref_bytes) / cap.bytes_per_core
    t_embedded_ingest = 1 / cap.embedded_ingest_per_core + max(0.0, avg_bytes - cap.ingest_ref_bytes) / (
        cap.bytes_per_core
    )
    t_read = 1 / cap.read_per_core + max(0.0, avg_bytes - cap.read_ref_bytes) / cap.bytes_per_core
    t_story = 1 / cap.story_per_core + max(0.0, avg_bytes - cap.story_ref_bytes) / cap.bytes_per_core
    worker_rate = 1 / (t_read + t_story)
    need_workers = max(1, _ceil(rate * HEADROOM / worker_rate))

    # Backend.
    auto = backend is None
    if backend is None:
        backend = "embedded" if rate <= EMBEDDED_MAX_RATE and in_bps <= EMBEDDED_MAX_BYTES_PER_S else "cql"
    single = backend == "cql" and _single_local_node(base)
    rf = 1 if backend == "embedded" or single else 3

    # Database (CQL) estimate: every event row is written on rf replicas, plus the story rows; read once at the
    # read consistency (2 replicas for LOCAL_QUORUM of 3).
    db_cores = 0
    nodes = 0
    if backend == "cql":
        read_replicas = 1 if single else 2
        db_cores = max(
            1,
            _ceil(
                rate
                * HEADROOM
                * (rf * (1 + cap.story_rows_per_event) / cap.db_write_per_core + read_replicas / cap.db_read_per_core)
            ),
        )

    # Shards.
    by_partition = rate * stored / PARTITION_MAX_BYTES  # so that a 1 s bucket never exceeds the partition target
    shard_need = max(MIN_SHARDS, GROWTH * need_workers, GROWTH * db_cores, _ceil(by_partition))
    shards = min(MAX_SHARDS, _pow2ceil(shard_need))

    # Bucket.
    per_shard_eps = rate / shards
    per_shard_bps = per_shard_eps * stored
    bucket_cap = min(MAX_BUCKET_MS, corr.max_wait_ms // 10)
    fits = [
        b
        for b in BUCKETS_MS
        if (b <= bucket_cap or b == BUCKETS_MS[0])
        and per_shard_bps * b / 1000 <= PARTITION_MAX_BYTES
        and per_shard_eps * b / 1000 <= PARTITION_MAX_ROWS
    ]
    bucket_ms = max(fits) if fits else BUCKETS_MS[0]
    part_rows = per_shard_eps * bucket_ms / 1000
    part_bytes = part_rows * stored

    # Lag and retention.
    need_lag = ref.max_write_age_ms + ref.request_timeout_ms + ref.max_clock_skew_ms + bucket_ms
    lag_ms = -(-need_lag // 1000) * 1000
    need_ttl = lag_ms + corr.max_story_ms + corr.max_wait_ms + corr.amend_horizon_ms + ref.downtime_allowance_ms
    want_ttl = math.ceil(retention_h * 3600) * 1000
    ttl_ms = want_ttl if want_ttl >= need_ttl else -(-need_ttl // HOUR_MS) * HOUR_MS
    window_ms = twcs_window_ms(ttl_ms)

    # Workers per instance (this machine's cores), instances.
    workers = max(1, min(need_workers, cap.cores, shards, 1024))
    instances = _ceil(need_workers / workers)

    # Pages, batches, concurrency.
    page_bytes = MIB if stored <= 64 * KIB else 4 * MIB
    page_rows = _clamp(round(2 * page_bytes / stored / 500) * 500, 500, 20_000)
    in_flight = _clamp(_pow2ceil(max(64, 4 * db_cores)), 64, 1024)
    read_ahead = _clamp(int(READ_MEMORY_BYTES // max(part_bytes, 1.0)), 4, 16)
    batch_lines = _clamp(int(64 * MIB // avg_bytes), 1, 5_000)
    max_event_bytes = ref.max_event_bytes
    if avg_bytes * 8 > max_event_bytes:
        max_event_bytes = min(256 * MIB, _pow2ceil(avg_bytes * 8))

    # Storage (before compression) and idle cost.
    day_events = rate * 86_400
    rf_storage = rf if backend == "cql" else 1
    day_bytes = day_events * (stored + cap.story_bytes_per_event) * rf_storage
    kept_bytes = day_bytes * (ttl_ms + window_ms) / DAY_MS
    if backend == "cql":
        nodes = 1 if single else max(rf, _ceil(db_cores / NODE_CORES), _ceil(kept_bytes / NODE_DISK_BYTES))
    idle = cap.idle_core_fraction * (shards / IDLE_REF_SHARDS) * (IDLE_REF_BUCKET_MS / bucket_ms)
    producer_cores = rate * HEADROOM * (t_embedded_ingest if backend == "embedded" else t_ingest)

    # ---- the tree ----
    tree: Tree = {"tenant": ref.tenant}
    if base is None:
        note("tenant", "your tenant name ([a-z][a-z0-9_]{0,47}): the keyspace (CQL) or table prefix (embedded)")
    tree["shards"] = shards
    note(
        "shards",
        f"{shards} = the power of two >= max(16 (one bucket_index query / commit batch per 16 shards),"
        f" {GROWTH} x {need_workers} workers needed (room to add workers: shards are fixed at init)"
        + (f", {GROWTH} x {db_cores} database cores (several written partitions per core)" if db_cores else "")
        + (f", {_ceil(by_partition)} for partitions <= {PARTITION_MAX_BYTES // MIB} MiB per second)"),
        f"{per_shard_eps:,.1f} events/s per shard.",
    )
    tree["bucket_ms"] = bucket_ms
    note(
        "bucket_ms",
        f"partitions (shard, bucket) of ~{part_rows:,.0f} rows, ~{_fmt_bytes(part_bytes)} (stored row ~{stored:,.0f} B:"
        f" payload {cap.payload_ratio:.2f} x {avg_bytes:,.0f} B + ~{ROW_OVERHEAD_BYTES} B row overhead);"
        f" the largest bucket <= {min(bucket_cap, MAX_BUCKET_MS) / 1000:g} s (a tenth of correlate.max_wait_ms,"
        f" at most 60 s) with partitions <= {PARTITION_MAX_BYTES // MIB} MiB and <= {PARTITION_MAX_ROWS:,} rows."
        + (" Long buckets keep idle polling cheap for a small tenant." if bucket_ms >= 30_000 else ""),
        "Fixed when the tenant is initialized, like shards.",
    )
    if not fits:
        note("bucket_ms", "WARNING: even the smallest bucket exceeds the partition target at this rate.")
    tree["lag_ms"] = lag_ms
    note(
        "lag_ms",
        f">= max_write_age_ms + request_timeout_ms + max_clock_skew_ms + bucket_ms = {ref.max_write_age_ms} +"
        f" {ref.request_timeout_ms} + {ref.max_clock_skew_ms} + {bucket_ms} = {need_lag}, rounded up to a second.",
    )
    tree["max_write_age_ms"] = ref.max_write_age_ms
    tree["request_timeout_ms"] = ref.request_timeout_ms
    note("request_timeout_ms", "no lower than the server's write timeout")
    tree["max_clock_skew_ms"] = ref.max_clock_skew_ms
    note("max_clock_skew_ms", "keep every producer and worker on NTP; workers refuse to start above this")
    tree["ttl_ms"] = ttl_ms
    rule = (
        f"lag_ms + correlate.max_story_ms + max_wait_ms + amend_horizon_ms + downtime_allowance_ms ="
        f" {_fmt_ms(lag_ms)} + {_fmt_ms(corr.max_story_ms)} + {_fmt_ms(corr.max_wait_ms)} +"
        f" {_fmt_ms(corr.amend_horizon_ms)} + {_fmt_ms(ref.downtime_allowance_ms)} = {need_ttl / HOUR_MS:.2f} h"
    )
    if want_ttl >= need_ttl:
        note("ttl_ms", f"retention {retention_h:g} h ({_fmt_ms(ttl_ms)}); the TTL rule needs >= {rule}.")
    else:
        note(
            "ttl_ms",
            f"retention {retention_h:g} h asked, raised to {_fmt_ms(ttl_ms)}: the TTL rule needs >= {rule}."
            " Lower downtime_allowance_ms (--set) to keep less.",
        )
    tree["twcs_window_ms"] = window_ms
    note(
        "twcs_window_ms",
        f"{-(-ttl_ms // window_ms)} TWCS windows of {_fmt_ms(window_ms)} per TTL (at most {MAX_TWCS_WINDOWS}:"
        " ScyllaDB's twcs_max_window_count); whole windows expire at once, no tombstones.",
    )
    tree["downtime_allowance_ms"] = ref.downtime_allowance_ms
    note("downtime_allowance_ms", "how long the engine may be down without losing unread events (part of ttl_ms)")
    tree["workers"] = workers
    note(
        "workers",
        f"one worker core handles ~{worker_rate:,.0f} events/s (read {1 / t_read:,.0f}/s and story stage"
        f" {1 / t_story:,.0f}/s per core at {avg_bytes:,.0f} B); {rate:,.0f} x {HEADROOM:g} headroom needs"
        f" {need_workers} worker core(s).",
        f"{cap.cores} core(s) per engine machine: {workers} worker(s) per instance"
        + (
            f", {instances} instances (`storyline run --shards A-B` on each, disjoint ranges)."
            if instances > 1
            else "."
        ),
    )
    tree["read_ahead"] = read_ahead
    note("read_ahead", f"partitions read at once while catching up: {read_ahead} x ~{_fmt_bytes(part_bytes)}")
    if max_event_bytes != ref.max_event_bytes:
        tree["max_event_bytes"] = max_event_bytes
        note("max_event_bytes", "8 x the average event, so large events are not rejected")

    store: Tree = {"backend": backend}
    tree["store"] = store
    if backend == "embedded":
        store["path"] = ref.store.path if ref.store.backend == "embedded" and base is not None else "storyline.db"
        note(
            "store.backend",
            f"{rate:,.0f} events/s, {_fmt_bytes(in_bps)}/s of input"
            + (
                f": below {EMBEDDED_MAX_RATE:,.0f} events/s and {_fmt_bytes(EMBEDDED_MAX_BYTES_PER_S)}/s the embedded"
                " store (SQLite, one file, one machine) is enough"
                if auto
                else " (embedded asked)"
            )
            + f"; it wrote {cap.embedded_ingest_per_core:,.0f} events/s end to end here. No replication: back up the"
            " file, or use CQL when losing a disk must not lose events.",
        )
        if rate > EMBEDDED_MAX_RATE or in_bps > EMBEDDED_MAX_BYTES_PER_S:
            note(
                "store.backend",
                f"WARNING: above {EMBEDDED_MAX_RATE:,.0f} events/s or {_fmt_bytes(EMBEDDED_MAX_BYTES_PER_S)}/s"
                " use cql: one SQLite file serializes all writers.",
            )
        note("store.path", "the database file; relative paths resolve against the directory you run storyline from")
    else:
        if base is not None and base.store.backend == "cql":
            store["contact_points"] = list(ref.store.contact_points)
        else:
            store["contact_points"] = ["scylla-1:9042", "scylla-2:9042", "scylla-3:9042"]
            note("store.contact_points", "your nodes, host:9042 (the driver also uses ScyllaDB's shard-aware 19042)")
        note(
            "store.backend",
            f"{rate:,.0f} events/s, {_fmt_bytes(in_bps)}/s of input"
            + (f": above {EMBEDDED_MAX_RATE:,.0f} events/s CQL (ScyllaDB) replicates and scales out" if auto else "")
            + ".",
            f"Database: ~{db_cores} core(s) at {HEADROOM:g} x the rate (rf {rf} x (1 + {cap.story_rows_per_event:.2f}"
            f" story rows) writes/event at {cap.db_write_per_core:,.0f}/s per core, reads at"
            f" {cap.db_read_per_core:,.0f}/s per core; Cassandra figures, a ScyllaDB core usually does more)"
            + (
                f" => {nodes} node(s): at least {rf} for rf {rf}, {NODE_CORES} cores and"
                f" {_fmt_bytes(NODE_DISK_BYTES)} of data each (assumed node size; before compression)."
                if not single
                else " => the one local node."
            ),
        )
        if single:
            store["consistency"] = "ONE"
            store["serial_consistency"] = "LOCAL_SERIAL"
            store["replication"] = {"strategy": "SimpleStrategy", "replication_factor": 1}
            note(
                "store.consistency",
                "ONE: a single local node with replication_factor 1 (development only; production: RF 3 +"
                " LOCAL_QUORUM)",
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
        store["max_in_flight"] = in_flight
        note(
            "store.max_in_flight",
            f"statements in flight per process: >= 64 and >= 4 per database core ({db_cores})",
        )
    store["page_rows"] = page_rows
    store["page_bytes"] = page_bytes
    note(
        "store.page_rows",
        f"~2 x page_bytes / stored row, so the byte bound ({_fmt_bytes(page_bytes)}) decides a page's size",
    )
    store["batch_bytes"] = 64 * KIB
    note("store.batch_bytes", "single-partition UNLOGGED batches; keep below the server's batch size warning")

    tree["correlate"] = {
        "match_window_ms": corr.match_window_ms,
        "max_wait_ms": corr.max_wait_ms,
        "amend_horizon_ms": corr.amend_horizon_ms,
        "max_story_ms": corr.max_story_ms,
        "emit": corr.emit,
    }
    note(
        "correlate", "kept" + (" from your config" if base is not None else " (defaults)") + "; see docs/correlation.md"
    )
    ingest: Tree = {"batch_lines": batch_lines}
    tree["ingest"] = ingest
    note("ingest.batch_lines", f"lines per round: <= 5000 and ~64 MiB of input ({batch_lines} x {avg_bytes:,.0f} B)")
    if backend == "cql":
        ingest["max_in_flight"] = in_flight

    secrets = _carry_over(tree, base, backend, note)

    # ---- the header ----
    head = why.setdefault("", [])
    head += [
        f"{rate:,.6g} events/s x {avg_bytes:,.6g} B = {_fmt_bytes(in_bps)}/s, {_fmt_bytes(in_bps * 86_400)}/day of"
        f" JSON input; retention {retention_h:g} h; backend {backend}" + (" (chosen by rate)" if auto else "") + ".",
        f"Capacities: {cap.source}.",
        *cap.notes,
        f"Producers (ingest): ~{producer_cores:.2g} core(s) at {HEADROOM:g} x the rate"
        f" ({1 / (t_embedded_ingest if backend == 'embedded' else t_ingest):,.0f} events/s per core).",
        f"Engine: {need_workers} worker core(s) => {instances} instance(s) x {workers} worker(s); idle cost"
        f" ~{idle * 100:.3g} % of a core (scaled from 1.3 % for 256 shards at 1 s buckets).",
    ]
    if backend == "cql":
        head.append(
            f"Database: ~{db_cores} core(s), {nodes} node(s); stored {_fmt_bytes(day_bytes)}/day with rf {rf},"
            f" ~{_fmt_bytes(kept_bytes)} at steady state (TTL + one TWCS window; before compression)"
            + (f", ~{_fmt_bytes(kept_bytes / nodes)} per node." if nodes > 1 else ".")
        )
    else:
        head.append(
            f"Storage: {_fmt_bytes(day_bytes)}/day, ~{_fmt_bytes(kept_bytes)} in the file at steady state (TTL +"
            " one window, before SQLite overhead)."
        )
    head.append(
        "Watch `storyline status`: max behind (alarm at 2 x lag_ms), shards never consumed, replay_bucket near the TTL."
    )
    if base is not None and (base.shards != shards or base.bucket_ms != bucket_ms):
        head.append(
            f"If your tenant is already initialized (with shards = {base.shards}, bucket_ms = {base.bucket_ms} in"
            " your config), it keeps those: `storyline init` refuses a change; re-sharding means a new tenant."
        )
    if secrets:
        head.append(f"Not printed: {', '.join(secrets)} from your config; add them back.")
    return tree, why


_MAPS = {"store.replication.datacenters", "correlate.sensor_offsets_ms", "correlate.merge"}
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
            if isinstance(value, dict) and dotted not in _MAPS:
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


# -- TOML output ---------------------------------------------------------------------------------------------
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key(name: str) -> str:
    return name if _BARE.fullmatch(name) else _string(name)


def _string(s: str) -> str:
    """A TOML basic string: quote, backslash and control characters (but tab) escaped."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _comment(lines: list[str], width: int = 116) -> list[str]:
    out: list[str] = []
    for line in lines:
        out += ["# " + w for w in textwrap.wrap(line, width - 2, break_on_hyphens=False)] or ["#"]
    return out


def to_toml(tree: Mapping[str, Any], reasons: Mapping[str, list[str]], title: str = "") -> str:
    """The tree as TOML, each key preceded by its reasons as comments; the header ("" reasons) first."""
    out: list[str] = []
    if title:
        out += _comment([title])
    out += _comment(list(reasons.get("", [])))
    if out:
        out.append("")

    def table(prefix: str, node: Mapping[str, Any]) -> None:
        subs = []
        for k, v in node.items():
            dotted = f"{prefix}{k}"
            if isinstance(v, dict) and dotted not in _MAPS:
                subs.append((dotted, v))
                continue
            out.extend(_comment(list(reasons.get(dotted, []))))
            out.append(f"{_key(str(k))} = {_value(v)}")
        for dotted, v in subs:
            out.append("")
            out.extend(_comment(list(reasons.get(dotted, []))))
            out.append(f"[{'.'.join(_key(p) for p in dotted.split('.'))}]")
            table(dotted + ".", v)

    table("", tree)
    return "\n".join(out) + "\n"


# -- measuring this machine ------------------------------------------------------------------------------------
def measure(avg_bytes: float, cores: int | None = None, story_events: int = 60_000) -> Capacity:
    """Calibrate the client-side ingest and story-stage figures with a short real run on this machine (~10 s): parse
    + encode + shard of synthetic lines of about ``avg_bytes`` (engine.tools.simulate.sessions), and a StoryMachine
    over simulated events writing stories to a temporary embedded store (as bench/stories.py does). Per-core figures
    are events per CPU second of this process (polars threads included). The read and database figures keep their
    docs/BENCHMARKS.md values (they need the CQL node)."""
    from engine.core.config import from_mapping
    from engine.core.event import encode
    from engine.core.stage import Batch
    from engine.correlate.story import StoryMachine
    from engine.ingest.canonical import parse_line, shard_of
    from engine.runtime.worker import persist
    from engine.store import EventRecord, make_store
    from engine.tools.simulate import Scenario, generate, sessions

    cfg = from_mapping({"tenant": "tune_measure"})
    now_s = time.time()
    now_ms = int(now_s * 1000)

    # 1. client-side ingest at the asked size (capped at 1 MiB to bound memory)
    size = min(float(avg_bytes), float(MIB))
    probe = list(sessions(50, seed=5, start_s=now_s - 600, span_s=600))
    plain = sum(map(len, probe)) / len(probe)
    pad = max(0, round(size - plain - len(',"blob":""')))
    n_lines = _clamp(int(32e6 // max(size, 1.0)), 100, 50_000)
    lines: list[bytes] = []
    for ln in sessions(n_lines, seed=11, start_s=now_s - 3_000, span_s=3_000, payload_bytes=pad):
        lines.append(ln)
        if len(lines) >= n_lines:
            break
    c0, w0 = time.process_time(), time.perf_counter()
    payload = 0
    for ln in lines:
        ev = parse_line(ln, cfg, now_ms)
        payload += len(encode(ev))
        shard_of(ev, 16)
    c_ing, w_ing = time.process_time() - c0, time.perf_counter() - w0
    line_bytes = sum(map(len, lines)) / len(lines)

    # 2. the story stage (decode + link + state + fused stories + SQLite story writes), buckets of 5,000
    events, _ = generate(Scenario(events=story_events, seed=2, start_s=now_s - 3_600, span_s=900))
    records = [EventRecord(e.id, encode(parse_line(e.line, cfg, now_ms))) for e in events]
    sim_bytes = sum(len(e.line) for e in events) / max(len(events), 1)

    async def stage_run(path: str) -> tuple[float, float, int, int]:
        scfg = from_mapping(
            {
                "tenant": "tune_measure",
                "shards": 1,
                "store": {"backend": "embedded", "path": path},
                "correlate": {"match_window_ms": 30_000, "max_wait_ms": 60_000, "amend_horizon_ms": 600_000},
            }
        )
        store = make_store(scfg)
        await store.open()
        await store.init_schema()
        try:
            stage = StoryMachine.for_config(scfg)
            c1, w1 = time.process_time(), time.perf_counter()
            bucket = 0
            for i in range(0, len(records), 5_000):
                await persist(store, scfg.consumer, stage.on_buckets([(bucket, {0: Batch(records[i : i + 5_000])})]))
                bucket += 1
            await persist(store, scfg.consumer, stage.drain([0], bucket - 1))
            cpu, wall = time.process_time() - c1, time.perf_counter() - w1
            rows = body = 0
            async for page in store.scan_stories():
                for rec in page:
                    rows += 1
                    body += len(rec.body)
            return cpu, wall, rows, body
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as tmp:
        c_st, w_st, rows, body = asyncio.run(stage_run(os.path.join(tmp, "tune.db")))

    n_story = max(len(records), 1)
    ncores = cores or machine_cores()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ingest_rate = len(lines) / max(c_ing, 1e-9)
    story_rate = n_story / max(c_st, 1e-9)
    notes = (
        f"Measured here ({when}, {machine_cores()} cores, load average {load_avg:.2f}): ingest client side"
        f" {ingest_rate:,.0f} events/s per CPU second ({len(lines):,} lines of {line_bytes:,.0f} B,"
        f" wall {len(lines) / max(w_ing, 1e-9):,.0f}/s); story stage {story_rate:,.0f} events/s per CPU second"
        f" ({n_story:,} simulated events of {sim_bytes:,.0f} B, wall {n_story / max(w_st, 1e-9):,.0f}/s);"
        f" payload {payload / max(sum(map(len, lines)), 1):.2f} x the line; stories {rows / n_story:.3f} rows and"
        f" {body / n_story:,.0f} B per event.",
        "Read, database and per-byte figures: " + BENCHMARKS + ".",
    )
    return replace(
        Capacity(cores=ncores),
        ingest_per_core=ingest_rate,
        ingest_ref_bytes=line_bytes,
        story_per_core=story_rate,
        story_ref_bytes=sim_bytes,
        payload_ratio=payload / max(sum(map(len, lines)), 1),
        story_bytes_per_event=max(body / n_story, 1.0),
        story_rows_per_event=max(rows / n_story, 0.001),
        source="`storyline tune --measure` on this machine, the rest from " + BENCHMARKS,
        notes=notes,
    )


# -- the command ---------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """``storyline tune``: print the recommended config (stdout). Bad flags raise ConfigError (the CLI exits 2)."""
    rate, size = float(args.events_per_sec), float(args.avg_event_bytes)
    retention = DEFAULT_RETENTION_H if args.retention_hours is None else float(args.retention_hours)
    check_inputs(rate, size, retention, args.backend)
    if args.cores is not None and args.cores < 1:
        raise ConfigError("--cores", f"{args.cores} must be >= 1")
    base = None
    if args.config is not None or args.overrides:
        base = load(args.config, ([] if args.config is not None else ["tenant=main"]) + list(args.overrides))
    cores = args.cores or machine_cores()
    if args.measure:
        print("tune: measuring this machine (~10 s) ...", file=sys.stderr)
        capacity = measure(size, cores)
        for line in capacity.notes[:1]:
            print(f"tune: {line}", file=sys.stderr)
    else:
        capacity = Capacity(cores=cores)
    tree, reasons = recommend(rate, size, retention, args.backend, capacity, base=base)
    store = tree.get("store", {})
    path = store.get("path")
    if isinstance(path, str) and os.path.isabs(path):  # as the user wrote it: load() made it absolute
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            store["path"] = rel
    cmd = f"storyline tune --events-per-sec {rate:g} --avg-event-bytes {size:g} --retention-hours {retention:g}"
    for flag, value in (("--backend", args.backend), ("--cores", args.cores)):
        if value is not None:
            cmd += f" {flag} {value}"
    if args.measure:
        cmd += " --measure"
    sys.stdout.write(to_toml(tree, reasons, title=f"Recommended by `{cmd}`."))
    return 0
