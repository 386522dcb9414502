"""The runtime's metrics: what the workers count, how the supervisor adds it up, and the Prometheus exposition.

* A worker reports a snapshot of its counters about every second (:meth:`engine.runtime.worker.Worker.snapshot`,
  a plain dict through a queue). A process's counters start at zero; a worker slot's process is replaced when it
  dies. :class:`WorkerMetrics` keeps, per slot, the totals of its dead processes (``retired``) and adds the live
  process's latest values, so every counter the supervisor exports is monotonic across restarts: for each process
  (owner id) it keeps the highest value reported, a process's values are retired into the slot's totals once when
  the next process reports, and nothing is ever subtracted. Work a process did after its last report is lost with
  it (not counted); work redone by its successor (the buckets after the last commit) is counted again.
* :class:`Aggregator` turns the slots into one :class:`Snapshot` (totals, lag per shard, per-worker figures),
  which the status output (:mod:`engine.runtime.status`) prints and :func:`prometheus` renders.
* :class:`MetricsServer` serves the latest exposition on ``GET /metrics``.

Names follow Prometheus's conventions: counters end in ``_total``, units are base units (seconds, bytes) named in
the metric. :data:`METRICS` lists every metric; docs/architecture.md ("Metrics") lists the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import msgspec
import psutil

CPU_STEPS = ("decode", "link", "state", "fuse", "encode", "write", "commit")
"""The cost ledger's measured steps (``cpu_us_<step>`` in a worker's snapshot; the stage reports the ones it
knows); ``other`` — reads, the event loop, metrics — is the worker's CPU not in any of them."""
COUNTERS = (
    "events",
    "buckets",
    "partitions",
    "bytes",
    "commits",
    "errors",
    "rebuilds",
    "undecodable",
    "rebalances",
    "takeovers",
    "leases_lost",
    "lease_lapses",
    "stage_calls",
    *(f"cpu_us_{step}" for step in CPU_STEPS),
)
"""The worker snapshot's counters (:class:`engine.runtime.worker.WorkerStats`) the supervisor adds up."""


class Metric(msgspec.Struct, frozen=True):
    name: str
    type: Literal["counter", "gauge"]
    unit: str
    help: str
    label: str = ""  # the one label of a per-shard or per-worker metric


METRICS: tuple[Metric, ...] = (
    Metric("storyline_events_total", "counter", "events", "Events handed to the stages (replays not counted)."),
    Metric("storyline_buckets_total", "counter", "buckets", "Buckets consumed per shard (empty ones included)."),
    Metric("storyline_partitions_total", "counter", "partitions", "Non-empty partitions read."),
    Metric("storyline_read_bytes_total", "counter", "bytes", "Bytes of event rows read."),
    Metric("storyline_commits_total", "counter", "commits", "Shard offsets committed."),
    Metric("storyline_undecodable_events_total", "counter", "rows", "Rows skipped: not a canonical event."),
    Metric(
        "storyline_stage_calls_total",
        "counter",
        "calls",
        "Stage calls; each takes one or more buckets (adaptive batches: several when a worker is behind).",
    ),
    Metric(
        "storyline_step_cpu_seconds_total",
        "counter",
        "seconds",
        "Worker CPU per step of the story path (the cost ledger): decode, link, state, fuse, encode, write, commit; "
        "other = the rest of the workers' CPU (reads, the event loop).",
        "step",
    ),
    Metric("storyline_events_per_second", "gauge", "events/s", "Consumption rate over the last refresh (about 1 s)."),
    Metric(
        "storyline_shard_lag_seconds",
        "gauge",
        "seconds",
        "Time between now and the end of the shard's last consumed bucket.",
        "shard",
    ),
    Metric("storyline_lost_shards", "gauge", "shards", "Shards lost to another owner (their commits were refused)."),
    Metric(
        "storyline_rebalances_total",
        "counter",
        "rebalances",
        "Times a group's assignment to one of this instance's workers changed (run --group).",
    ),
    Metric(
        "storyline_shard_takeovers_total",
        "counter",
        "shards",
        "Shards this instance's workers took from a previous owner (a handover, or a failover after a lease ran out).",
    ),
    Metric(
        "storyline_leases_lost_total",
        "counter",
        "shards",
        "Shard leases whose renewal was refused: another owner had taken the shard.",
    ),
    Metric(
        "storyline_lease_pauses_total",
        "counter",
        "pauses",
        "Times a worker paused its writes because its leases were not renewed in time (it goes on once a renewal "
        "gets through).",
    ),
    Metric(
        "storyline_sensor_offset_seconds",
        "gauge",
        "seconds",
        "Learned clock offset of a sensor (its clock minus the reference sensor's), subtracted from its event times; "
        "the latest epoch's table any worker applied (configured offsets are not shown).",
        "sensor",
    ),
    Metric("storyline_worker_up", "gauge", "1", "1 while the worker's process runs, else 0.", "worker"),
    Metric("storyline_worker_cpu_seconds_total", "counter", "seconds", "CPU (user + system) of the worker.", "worker"),
    Metric("storyline_worker_rss_bytes", "gauge", "bytes", "Resident memory of the worker's process.", "worker"),
    Metric("storyline_worker_restarts_total", "counter", "restarts", "Restarts of the worker.", "worker"),
    Metric("storyline_worker_errors_total", "counter", "errors", "Transient database errors retried.", "worker"),
    Metric(
        "storyline_worker_rebuilds_total",
        "counter",
        "rebuilds",
        "Stage state rebuilt in-process from the committed offsets after an error mid-bucket.",
        "worker",
    ),
)


class WorkerStatus(msgspec.Struct):
    """One worker slot at one instant (its counters: over every process the slot ran)."""

    worker: int
    pid: int | None
    alive: bool
    restarts: int
    fenced: bool
    cpu_percent: float
    cpu_seconds: float
    rss_bytes: int
    errors: int
    rebuilds: int


class Snapshot(msgspec.Struct):
    """The instance at one instant: what the status output prints and the exposition renders."""

    t: float
    events: int
    buckets: int
    partitions: int
    bytes: int
    commits: int
    undecodable: int
    events_per_s: float
    buckets_per_s: float
    workers: list[WorkerStatus]
    lag_s: dict[int, float]
    waiting_s: float
    until_bucket: int | None
    lost_shards: str
    lost_count: int = 0
    stage_calls: int = 0
    step_cpu_s: dict[str, float] = msgspec.field(default_factory=dict)  # the cost ledger (CPU_STEPS + other)
    rebalances: int = 0
    takeovers: int = 0
    leases_lost: int = 0
    lease_lapses: int = 0
    sensor_offsets_s: dict[str, float] = msgspec.field(default_factory=dict)  # learned, the newest epoch reported


class WorkerMetrics:
    """One worker slot's figures: counters monotonic across its processes, the live process's gauges."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.retired: dict[str, int] = dict.fromkeys(COUNTERS, 0)  # the slot's dead processes
        self.live: dict[str, int] = dict.fromkeys(COUNTERS, 0)  # its current process: the highest values reported
        self.owner = ""  # whose report ``live`` holds
        self.shards: dict[int, float] = {}  # lag per shard, from the latest report
        self.cpu_retired = 0.0
        self.cpu_live = 0.0
        self.cpu_pid: int | None = None
        self.cpu_percent = 0.0
        self.rss_bytes = 0
        self.offsets_epoch = -1  # the newest learned offsets the slot reported
        self.offsets_s: dict[str, float] = {}

    def report(self, owner: str, snapshot: Mapping[str, object]) -> None:
        """A snapshot from the slot's process ``owner`` (a new owner: the previous process is over)."""
        if owner != self.owner:
            for key in COUNTERS:
                self.retired[key] += self.live[key]
            self.live = dict.fromkeys(COUNTERS, 0)
            self.owner = owner
        for key in COUNTERS:
            value = snapshot.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                self.live[key] = max(self.live[key], value)
        offsets = snapshot.get("sensor_offsets")
        if isinstance(offsets, dict) and isinstance(offsets.get("epoch"), int):
            seconds = offsets.get("seconds")
            if offsets["epoch"] >= self.offsets_epoch and isinstance(seconds, dict):
                self.offsets_epoch = offsets["epoch"]
                self.offsets_s = {str(k): float(v) for k, v in seconds.items()}
        shards = snapshot.get("shards")
        if isinstance(shards, dict):
            self.shards = {int(k): float(v["lag_s"]) for k, v in shards.items() if isinstance(v, dict)}

    def total(self, key: str) -> int:
        return self.retired[key] + self.live[key]

    def sample(self, proc: psutil.Process | None) -> None:
        """CPU and memory of the slot's live process (``None``: no process now, the figures stay as they were;
        gone: the gauges drop to 0; the CPU counter keeps what it had)."""
        if proc is None:
            return
        if proc.pid != self.cpu_pid:
            self.cpu_retired += self.cpu_live
            self.cpu_live = 0.0
            self.cpu_pid = proc.pid
        try:
            times = proc.cpu_times()
            self.cpu_live = max(self.cpu_live, times.user + times.system)
            self.cpu_percent = proc.cpu_percent(None)
            self.rss_bytes = proc.memory_info().rss
        except psutil.Error:
            self.cpu_percent, self.rss_bytes = 0.0, 0

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_retired + self.cpu_live


class Rate:
    """Events and buckets per second since the previous call (the totals are monotonic: never negative)."""

    def __init__(self, started: float) -> None:
        self.t = started
        self.events = 0
        self.buckets = 0

    def update(self, t: float, events: int, buckets: int) -> tuple[float, float]:
        dt = t - self.t
        out = ((events - self.events) / dt, (buckets - self.buckets) / dt) if dt > 0 else (0.0, 0.0)
        self.t, self.events, self.buckets = t, events, buckets
        return out


class Aggregator:
    """The slots' figures added up into :class:`Snapshot`\\ s."""

    def __init__(self, workers: int) -> None:
        self.workers = [WorkerMetrics(i) for i in range(workers)]
        self.other_cpu_s = 0.0  # the ledger's "other": a counter, so never below what it was

    def snapshot(
        self,
        now: float,
        rate: Rate,
        processes: list[tuple[int | None, bool, int, bool]],
        *,
        waiting_s: float,
        until_bucket: int | None,
        lost_shards: str,
        lost_count: int,
    ) -> Snapshot:
        """``processes``: per slot (pid, alive, restarts, fenced), from the supervisor; ``rate`` is advanced."""
        totals = {key: sum(w.total(key) for w in self.workers) for key in COUNTERS}
        eps, bps = rate.update(now, totals["events"], totals["buckets"])
        steps = {step: totals[f"cpu_us_{step}"] / 1e6 for step in CPU_STEPS}
        # "other" is derived from figures sampled at different instants (the workers' CPU, their step reports):
        # exported as a counter, it keeps its highest value so far.
        rest = sum(w.cpu_seconds for w in self.workers) - sum(steps.values())
        self.other_cpu_s = steps["other"] = max(self.other_cpu_s, rest)
        newest = max(self.workers, key=lambda w: w.offsets_epoch, default=None)
        return Snapshot(
            t=round(now, 3),
            events=totals["events"],
            buckets=totals["buckets"],
            partitions=totals["partitions"],
            bytes=totals["bytes"],
            commits=totals["commits"],
            undecodable=totals["undecodable"],
            stage_calls=totals["stage_calls"],
            rebalances=totals["rebalances"],
            takeovers=totals["takeovers"],
            lease_lapses=totals["lease_lapses"],
            leases_lost=totals["leases_lost"],
            events_per_s=eps,
            buckets_per_s=bps,
            workers=[
                WorkerStatus(
                    worker=w.index,
                    pid=pid,
                    alive=alive,
                    restarts=restarts,
                    fenced=fenced,
                    cpu_percent=w.cpu_percent,
                    cpu_seconds=round(w.cpu_seconds, 3),
                    rss_bytes=w.rss_bytes,
                    errors=w.total("errors"),
                    rebuilds=w.total("rebuilds"),
                )
                for w, (pid, alive, restarts, fenced) in zip(self.workers, processes, strict=True)
            ],
            lag_s={shard: lag for w in self.workers for shard, lag in w.shards.items()},
            waiting_s=round(waiting_s, 1),
            until_bucket=until_bucket,
            lost_shards=lost_shards,
            lost_count=lost_count,
            step_cpu_s={k: round(v, 3) for k, v in steps.items()},
            sensor_offsets_s=dict(sorted(newest.offsets_s.items())) if newest is not None else {},
        )


def _label(value: str) -> str:
    """A label value escaped for the text format (backslash, double quote, line feed)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(snap: Snapshot) -> str:
    """The text exposition format (version 0.0.4) of a snapshot: every metric of :data:`METRICS`, in that order."""
    per_worker: dict[str, Callable[[WorkerStatus], str]] = {
        "storyline_worker_up": lambda w: str(int(w.alive)),
        "storyline_worker_cpu_seconds_total": lambda w: f"{w.cpu_seconds:.3f}",
        "storyline_worker_rss_bytes": lambda w: str(w.rss_bytes),
        "storyline_worker_restarts_total": lambda w: str(w.restarts),
        "storyline_worker_errors_total": lambda w: str(w.errors),
        "storyline_worker_rebuilds_total": lambda w: str(w.rebuilds),
    }
    single: dict[str, str] = {
        "storyline_events_total": str(snap.events),
        "storyline_buckets_total": str(snap.buckets),
        "storyline_partitions_total": str(snap.partitions),
        "storyline_read_bytes_total": str(snap.bytes),
        "storyline_commits_total": str(snap.commits),
        "storyline_undecodable_events_total": str(snap.undecodable),
        "storyline_stage_calls_total": str(snap.stage_calls),
        "storyline_events_per_second": f"{snap.events_per_s:.3f}",
        "storyline_lost_shards": str(snap.lost_count),
        "storyline_rebalances_total": str(snap.rebalances),
        "storyline_shard_takeovers_total": str(snap.takeovers),
        "storyline_lease_pauses_total": str(snap.lease_lapses),
        "storyline_leases_lost_total": str(snap.leases_lost),
    }
    lines: list[str] = []
    for m in METRICS:
        lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.type}"]
        if m.name in single:
            lines.append(f"{m.name} {single[m.name]}")
        elif m.name == "storyline_step_cpu_seconds_total":
            lines += [f'{m.name}{{step="{k}"}} {v:.3f}' for k, v in snap.step_cpu_s.items()]
        elif m.name == "storyline_sensor_offset_seconds":
            lines += [f'{m.name}{{sensor="{_label(k)}"}} {v:.6f}' for k, v in snap.sensor_offsets_s.items()]
        elif m.name == "storyline_shard_lag_seconds":
            lines += [f'{m.name}{{shard="{s}"}} {v:.3f}' for s, v in sorted(snap.lag_s.items())]
        else:
            value = per_worker[m.name]
            lines += [f'{m.name}{{worker="{w.worker}"}} {value(w)}' for w in snap.workers]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on ``host:port``: the latest text ``exposition`` returns, from a daemon thread."""

    def __init__(self, host: str, port: int, exposition: Callable[[], str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self._http = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
