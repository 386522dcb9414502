"""Typed, frozen configuration loaded from TOML.

Every duration is an integer number of milliseconds and its key ends in ``_ms``. The library never reads the
environment; the CLI turns ``--config`` and ``--set`` into a :class:`Config` with :func:`load`.

Safety rules enforced here (see docs/architecture.md for the reasoning):

* ``lag_ms >= max_write_age_ms + request_timeout_ms + max_clock_skew_ms + bucket_ms`` — a worker reads bucket
  ``b`` only when no producer can still write into it: a producer picks ``b`` from its clock (up to
  ``max_clock_skew_ms`` off), writes until ``max_write_age_ms`` after that, and a write sent then may land up to
  ``request_timeout_ms`` later; the bucket itself spans ``bucket_ms``.
* ``ttl_ms >= lag_ms + correlate.max_wait_ms + correlate.amend_horizon_ms + downtime_allowance_ms`` — an event
  must outlive the time the engine may still need it, plus the downtime a deployment is sized to survive
  without losing unread events.
* ``ttl_ms / twcs_window_ms <= 50`` — ScyllaDB rejects more TWCS windows than ``twcs_max_window_count``.
* ``drain_timeout_ms > lag_ms`` and ``> commit_interval_ms`` — ``run --until-idle`` / ``--drain`` give up (exit 1)
  when no shard's committed position moved for ``drain_timeout_ms`` after the run's last bucket became readable.
  A healthy worker may go ``commit_interval_ms`` between commits, and a drain should not give up on a stall
  shorter than the delay every event waits in the queue anyway (``lag_ms``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from engine.core.errors import ConfigError

TENANT_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")
_DC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CONSUMER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
MAX_TWCS_WINDOWS = 50

Consistency = Literal["ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE"]
SerialConsistency = Literal["SERIAL", "LOCAL_SERIAL"]

PositiveMs = Annotated[int, msgspec.Meta(gt=0)]
NonNegMs = Annotated[int, msgspec.Meta(ge=0)]


class Replication(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Keyspace replication: ``SimpleStrategy`` + ``replication_factor`` locally, ``NetworkTopologyStrategy``
    with a factor per datacenter in production."""

    strategy: Literal["SimpleStrategy", "NetworkTopologyStrategy"] = "SimpleStrategy"
    replication_factor: Annotated[int, msgspec.Meta(ge=1, le=15)] = 1
    datacenters: dict[str, Annotated[int, msgspec.Meta(ge=1, le=15)]] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strategy == "NetworkTopologyStrategy":
            if not self.datacenters:
                raise ConfigError(
                    "store.replication.datacenters", "NetworkTopologyStrategy needs datacenters, e.g. {dc1 = 3}"
                )
            for dc in self.datacenters:
                if not _DC_RE.fullmatch(dc):
                    raise ConfigError(
                        "store.replication.datacenters", f"datacenter name {dc!r} must match {_DC_RE.pattern}"
                    )
        elif self.datacenters:
            raise ConfigError("store.replication.datacenters", "only for NetworkTopologyStrategy")

    def cql(self) -> str:
        """The replication map as a CQL literal (names validated above, so no quoting issue)."""
        if self.strategy == "SimpleStrategy":
            return f"{{'class': 'SimpleStrategy', 'replication_factor': {self.replication_factor}}}"
        dcs = ", ".join(f"'{dc}': {n}" for dc, n in sorted(self.datacenters.items()))
        return f"{{'class': 'NetworkTopologyStrategy', {dcs}}}"


class StoreConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    backend: Literal["embedded", "cql"] = "embedded"
    # embedded (SQLite): the database file; relative paths resolve against the current directory at load time.
    path: str = "storyline.db"
    # cql
    contact_points: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:9042"])
    replication: Replication = msgspec.field(default_factory=Replication)
    consistency: Consistency = "LOCAL_QUORUM"
    serial_consistency: SerialConsistency = "LOCAL_SERIAL"
    username: str | None = None
    password: str | None = None
    # A file holding the password (its first line): read when the config is loaded, into ``password``. Use it
    # instead of ``--set store.password=...``, which any user on the host can read in the process list.
    password_file: str | None = None
    tls_ca_file: str | None = None
    # Paging and batching. A page holds at most page_rows rows and about page_bytes bytes.
    page_rows: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 5_000
    page_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024, le=64 * 1024 * 1024)] = 1024 * 1024
    # Hard ceiling of one page, whatever the mix of row sizes (see engine.store.paging.PageSizer).
    page_bytes_max: Annotated[int, msgspec.Meta(ge=1024 * 1024, le=1024 * 1024 * 1024)] = 64 * 1024 * 1024
    batch_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024)] = 64 * 1024
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    # Bounded retries of idempotent statements on transient errors: exponential backoff with full jitter.
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 6
    retry_base_ms: PositiveMs = 50
    retry_max_ms: PositiveMs = 2_000

    def __post_init__(self) -> None:
        if not self.contact_points:
            raise ConfigError("store.contact_points", "must name at least one host:port")
        for cp in self.contact_points:
            host, sep, port = cp.rpartition(":")
            if not sep or not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError("store.contact_points", f"{cp!r} must be host:port")
        if self.password is not None and self.password_file is not None:
            raise ConfigError("store.password_file", "set store.password or store.password_file, not both")
        if (self.username is None) != (self.password is None and self.password_file is None):
            raise ConfigError(
                "store.password" if self.username is not None else "store.username", "username and password go together"
            )
        if self.retry_max_ms < self.retry_base_ms:
            raise ConfigError("store.retry_max_ms", "must be >= store.retry_base_ms")

    def _shown(self) -> list[tuple[str, Any]]:
        """Every field, the password masked: what repr, str and rich show (logs, tracebacks, test reports)."""
        return [
            (f, "***" if f == "password" and self.password is not None else getattr(self, f))
            for f in self.__struct_fields__
        ]

    def __repr__(self) -> str:  # never print the password
        return f"StoreConfig({', '.join(f'{k}={v!r}' for k, v in self._shown())})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:  # msgspec's default would show the password
        return self._shown()


class OffsetsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Sensor clock offsets learned from events that link without doubt (docs/correlation.md, Learned offsets):
    # one table per epoch_ms (a multiple of bucket_ms), built from the evidence of the epochs before it, up to
    # delay_epochs before the last (evidence stored later is taken by a later table); a pair of sensors counts
    # once it has min_samples differences.
    estimate: bool = True
    epoch_ms: Annotated[int, msgspec.Meta(ge=1_000, le=3_600_000)] = 60_000
    min_samples: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10
    delay_epochs: Annotated[int, msgspec.Meta(ge=0, le=60)] = 0


class CorrelateConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    match_window_ms: PositiveMs = 30_000
    max_wait_ms: PositiveMs = 600_000
    amend_horizon_ms: NonNegMs = 3_600_000
    emit: Literal["final", "updates"] = "final"
    # Per-sensor clock offsets (ms, sensor clock minus true time), subtracted from event times before linking.
    sensor_offsets_ms: dict[str, int] = msgspec.field(default_factory=dict)
    # Bounded state: a story reaching either limit is emitted final with truncated = true; the open-story
    # limit (per worker shard state) force-finalizes the least recently extended stories first.
    max_story_events: Annotated[int, msgspec.Meta(ge=2)] = 10_000
    max_story_ms: PositiveMs = 6 * 3_600_000
    max_open_stories: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    # How a story merges each attribute over its events of one source (in event-time order): first, last, sum,
    # min, max or set. Attributes not named here take `last`; `bytes` and `packets` are also summed into totals.
    merge: dict[str, Literal["first", "last", "sum", "min", "max", "set"]] = msgspec.field(default_factory=dict)
    # Learned offsets: two sensors' events of one flow count as evidence when their times are at most
    # max_offset_ms apart; offsets are given against reference_sensor (unset: the best supported sensor, kept).
    # A sensor in sensor_offsets_ms keeps its configured offset.
    max_offset_ms: PositiveMs = 7_200_000
    reference_sensor: str | None = None
    offsets: OffsetsConfig = msgspec.field(default_factory=OffsetsConfig)
    # DNS names on connections (docs/correlation.md, DNS names): a DNS answer names the connections of its client
    # to an answered address for its TTL, at most dns_max_ttl_ms (also the TTL of an answer that gives none). The
    # answers travel in the epoch tables of correlate.offsets (epoch_ms, delay_epochs), also when estimate is off.
    dns_names: bool = True
    dns_max_ttl_ms: Annotated[int, msgspec.Meta(ge=1_000, le=86_400_000)] = 3_600_000


class IngestConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Accepted event times: from min_time_ms (default 2000-01-01, so replays of old captures work) up to
    # max_future_ms ahead of the ingesting host's clock.
    min_time_ms: NonNegMs = 946_684_800_000
    max_future_ms: NonNegMs = 86_400_000
    # Lines validated and written per round, and partition writes in flight at once.
    batch_lines: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 5_000
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    # Community ID seed: every sensor of a deployment must use the same one.
    community_id_seed: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 0
    # Attempts to write one partition group (each may re-bucket) before the producer gives up on it.
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tenant: str
    shards: Annotated[int, msgspec.Meta(ge=1, le=65_536)] = 16
    bucket_ms: Annotated[int, msgspec.Meta(ge=10, le=3_600_000)] = 1_000
    lag_ms: PositiveMs = 15_000
    max_write_age_ms: PositiveMs = 5_000
    max_clock_skew_ms: NonNegMs = 1_000
    request_timeout_ms: Annotated[int, msgspec.Meta(ge=1_000)] = 5_000
    ttl_ms: PositiveMs = 48 * 3_600_000
    twcs_window_ms: Annotated[int, msgspec.Meta(ge=60_000)] = 3_600_000
    downtime_allowance_ms: NonNegMs = 24 * 3_600_000
    chunk_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024)] = 512 * 1024
    max_event_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024 * 1024)] = 8 * 1024 * 1024
    workers: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    consumer: str = "main"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65_535)] | None = None
    metrics_host: str = "127.0.0.1"
    # Runtime: a graceful stop finishes the current bucket and commits within shutdown_timeout_ms; offsets are
    # committed at most every commit_interval_ms (and always before stopping); read_ahead partitions are read
    # concurrently per worker while catching up. `run --until-idle` / `--drain` stop with exit 1 (and the last
    # error the workers reported) when no shard's committed position moved for drain_timeout_ms, counted from
    # the moment the run's last bucket became readable (the initial wait for the lag does not count) or from the
    # workers' start, if later; it must exceed lag_ms and commit_interval_ms.
    shutdown_timeout_ms: PositiveMs = 30_000
    commit_interval_ms: PositiveMs = 5_000
    # At the head (caught up), a worker waits until poll_interval_ms of buckets are readable and hands them to the
    # stage in one call, instead of one call per bucket as each becomes readable: a call's fixed costs (a dozen
    # polars operations, an index query, a checkpoint) are shared by more events, at the price of up to
    # poll_interval_ms - bucket_ms more latency. 0 (or any value up to bucket_ms): each bucket once it is readable.
    poll_interval_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 500
    drain_timeout_ms: PositiveMs = 120_000
    read_ahead: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    # Groups (`storyline run --group`, docs/operations.md): each shard is held by a lease of lease_ms that its
    # worker renews every renew_ms; a member looks at the group's members every group_poll_ms. A worker stops
    # touching a shard whose lease it could not renew before the lease ends, so lease_ms must exceed renew_ms +
    # request_timeout_ms (a renewal that hangs) + max_clock_skew_ms (the claimer's clock may run ahead).
    lease_ms: PositiveMs = 10_000
    renew_ms: PositiveMs = 2_000
    group_poll_ms: PositiveMs = 1_000
    # A first start reads from the tenant's creation (bounded by the TTL); start_from_ms narrows that on purpose.
    start_from_ms: NonNegMs | None = None
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    correlate: CorrelateConfig = msgspec.field(default_factory=CorrelateConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)

    def __post_init__(self) -> None:
        if not TENANT_RE.fullmatch(self.tenant):
            raise ConfigError(
                "tenant", f"{self.tenant!r} must match [a-z][a-z0-9_]{{0,47}} (lower-case letter first, at most 48)"
            )
        if not _CONSUMER_RE.fullmatch(self.consumer):
            raise ConfigError("consumer", f"{self.consumer!r} must match {_CONSUMER_RE.pattern}")
        need_lag = self.max_write_age_ms + self.request_timeout_ms + self.max_clock_skew_ms + self.bucket_ms
        if self.lag_ms < need_lag:
            raise ConfigError(
                "lag_ms",
                f"{self.lag_ms} must be >= max_write_age_ms + request_timeout_ms + max_clock_skew_ms"
                f" + bucket_ms = {need_lag}, or a worker could read a bucket producers still write",
            )
        c = self.correlate
        need_ttl = self.lag_ms + c.max_story_ms + c.max_wait_ms + c.amend_horizon_ms + self.downtime_allowance_ms
        if self.ttl_ms < need_ttl:
            raise ConfigError(
                "ttl_ms",
                f"{self.ttl_ms} must be >= lag_ms + correlate.max_story_ms + correlate.max_wait_ms"
                f" + correlate.amend_horizon_ms + downtime_allowance_ms = {need_ttl}, or events a replay needs"
                f" could expire",
            )
        if c.dns_names and self.ttl_ms < c.dns_max_ttl_ms + c.max_wait_ms + self.lag_ms:
            raise ConfigError(
                "correlate.dns_max_ttl_ms",
                f"{c.dns_max_ttl_ms} + correlate.max_wait_ms + lag_ms must be <= ttl_ms ({self.ttl_ms}): the epoch"
                f" tables that carry DNS answers are kept for ttl_ms",
            )
        if self.drain_timeout_ms <= max(self.lag_ms, self.commit_interval_ms):
            raise ConfigError(
                "drain_timeout_ms",
                f"{self.drain_timeout_ms} must be > lag_ms ({self.lag_ms}) and > commit_interval_ms"
                f" ({self.commit_interval_ms}), or a drain could give up on a healthy worker that has not committed"
                f" yet",
            )
        need_lease = self.renew_ms + self.request_timeout_ms + self.max_clock_skew_ms
        if self.lease_ms <= need_lease:
            raise ConfigError(
                "lease_ms",
                f"{self.lease_ms} must be > renew_ms + request_timeout_ms + max_clock_skew_ms = {need_lease}, or a"
                f" lease could end while its holder still believes it holds it",
            )
        if c.offsets.epoch_ms % self.bucket_ms:
            raise ConfigError(
                "correlate.offsets.epoch_ms", f"{c.offsets.epoch_ms} must be a multiple of bucket_ms ({self.bucket_ms})"
            )
        if self.ttl_ms % 1000:
            raise ConfigError("ttl_ms", f"{self.ttl_ms} must be whole seconds (CQL TTLs are in seconds)")
        if self.twcs_window_ms % 60_000:
            raise ConfigError("twcs_window_ms", f"{self.twcs_window_ms} must be whole minutes")
        windows = -(-self.ttl_ms // self.twcs_window_ms)
        if windows > MAX_TWCS_WINDOWS:
            raise ConfigError(
                "twcs_window_ms",
                f"ttl_ms / twcs_window_ms = {windows} windows; at most {MAX_TWCS_WINDOWS} are allowed"
                f" (ScyllaDB's twcs_max_window_count): use twcs_window_ms >="
                f" {-(-self.ttl_ms // MAX_TWCS_WINDOWS // 60_000) * 60_000}",
            )
        if self.store.page_bytes_max < 2 * self.chunk_bytes:
            raise ConfigError("store.page_bytes_max", "must be >= 2 x chunk_bytes, so a page holds a whole chunk")
        if self.store.page_bytes > self.store.page_bytes_max:
            raise ConfigError("store.page_bytes", "must be <= store.page_bytes_max")
        if self.chunk_bytes > self.max_event_bytes:
            raise ConfigError("chunk_bytes", "must be <= max_event_bytes")

    @property
    def keyspace(self) -> str:
        """The tenant's keyspace (CQL) or table prefix (embedded): the validated tenant name."""
        return self.tenant


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(dotted, "empty key segment in --set")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"{p!r} is a value, not a table")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``dotted.key=value``: the value is read as a TOML value when it parses as one, else as a plain string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        # Not the item itself in the message: a mistyped `store.password:secret` must not be printed.
        raise ConfigError("--set", "takes dotted.key=value (an item has no '=' or no key)")
    try:
        doc = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        doc = {}
    except RecursionError:
        raise ConfigError(key, "--set value is nested too deeply") from None
    # One TOML value, nothing after it: "32\nlag_ms = 1" is not the value 32.
    value = doc["v"] if doc.keys() == {"v"} else raw
    return key, value


def _key_from_msgspec(msg: str) -> tuple[str, str]:
    """Turn msgspec's '... - at `$.store.consistency`' into ('store.consistency', '...')."""
    m = re.search(r" - at `\$\.?([^`]*)`$", msg)
    if m:
        path = re.sub(r"\[(\d+)\]", r"[\1]", m.group(1))
        return path, msg[: m.start()]
    return "", msg


def _key_name(name: str) -> str:
    """A key as TOML writes it: bare when it can be, else quoted (``""``, ``"a b"``), never raw control
    characters."""
    if _BARE_KEY_RE.fullmatch(name):
        return name
    chars = (
        c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
        for c in name
    )
    return '"' + "".join(chars) + '"'


def _check_int64(tree: Mapping[str, Any]) -> None:
    """Every integer must fit the 64-bit columns and arithmetic downstream (TOML's own range). Iterative."""
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack:
        key, node = stack.pop()
        if isinstance(node, Mapping):
            stack.extend((f"{key}.{_key_name(str(k))}" if key else _key_name(str(k)), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((f"{key}[{i}]", v) for i, v in enumerate(node))
        elif isinstance(node, int) and not -(2**63) <= node < 2**63:
            raise ConfigError(key, f"{node} is outside the 64-bit integer range")


def from_mapping(tree: Mapping[str, Any], base_dir: Path | None = None) -> Config:
    """Build and validate a Config from a parsed TOML tree; raise ConfigError naming the key on any problem."""
    _check_int64(tree)
    try:
        cfg = msgspec.convert(dict(tree), Config, strict=True)
    except msgspec.ValidationError as exc:
        key, problem = _key_from_msgspec(str(exc))
        unknown = re.fullmatch(r"Object contains unknown field `(.*)`", problem, re.DOTALL)
        if unknown:
            name = _key_name(unknown.group(1))
            key = f"{key}.{name}" if key else name
            problem = "unknown key"
        elif "Object missing required field" in problem:
            m = re.search(r"`([^`]*)`", problem)
            missing = m.group(1) if m else "?"
            key = f"{key}.{missing}" if key else missing
            problem = "required key is missing"
        raise ConfigError(key or "config", problem) from None
    path = cfg.store.path
    if cfg.store.backend == "embedded" and path != ":memory:" and not os.path.isabs(path):
        path = str((base_dir or Path.cwd()) / path)
        cfg = msgspec.structs.replace(cfg, store=msgspec.structs.replace(cfg.store, path=path))
    if cfg.store.tls_ca_file is not None and not os.path.isabs(cfg.store.tls_ca_file):
        ca = str((base_dir or Path.cwd()) / cfg.store.tls_ca_file)
        cfg = msgspec.structs.replace(cfg, store=msgspec.structs.replace(cfg.store, tls_ca_file=ca))
    if cfg.store.password_file is not None:
        password = _read_password((base_dir or Path.cwd()) / cfg.store.password_file)
        cfg = msgspec.structs.replace(
            cfg, store=msgspec.structs.replace(cfg.store, password=password, password_file=None)
        )
    return cfg


def _read_password(path: Path) -> str:
    """The first line of ``path``, without its line end; never echoed in errors."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("store.password_file", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("store.password_file", f"{path} is not UTF-8 text") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError("store.password_file", f"{path} is empty (the password is its first line)")
    return password


def load(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Load a TOML file (or nothing) and apply ``--set`` overrides; relative paths resolve against the cwd."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_bytes().decode("utf-8")  # not read_text: TOML's newlines are its own (no \r → \n)
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {p}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError("--config", f"{p} is not UTF-8 text (invalid byte at {exc.start})") from None
        try:
            tree = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{p} is not valid TOML: {exc}") from None
        except RecursionError:
            raise ConfigError("--config", f"{p} is not valid TOML: nested too deeply") from None
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return from_mapping(tree)
