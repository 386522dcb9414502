"""What the runtime takes from the configuration: each component its part, derived once from the loaded
:class:`~engine.core.config.Config` (which stays for loading and validation), and the factories a worker process
builds its store and its stage from. Everything here is a frozen, picklable struct: the supervisor hands it to
worker processes started with ``spawn``.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from engine.core.clock import Clock
from engine.core.config import Config
from engine.core.stage import Stage
from engine.runtime.offsets import OffsetSettings
from engine.store import Store, StoreSettings, store_for


class WorkerSettings(msgspec.Struct, frozen=True):
    """What a worker reads of the configuration (the meaning of each field: :class:`Config`)."""

    tenant: str
    consumer: str
    bucket_ms: int
    lag_ms: int
    max_clock_skew_ms: int
    max_write_age_ms: int
    ttl_ms: int
    commit_interval_ms: int
    read_ahead: int
    start_from_ms: int | None = None
    shards: int | None = None  # the tenant's shard count (a drain waits for every shard's row of its epoch)
    offsets: OffsetSettings | None = None  # the epoch tables: learned offsets, DNS answers (None: neither is on)
    lease_ms: int = 10_000  # a worker's lease on each of its shards (Config.lease_ms)
    renew_ms: int = 2_000  # how often it renews them
    group_poll_ms: int = 1_000  # how often a group's worker reads the members (Config.group_poll_ms)
    request_timeout_ms: int = 5_000  # how long one store request may take (a write bound by a lease ends sooner)
    poll_interval_ms: int = 0  # at the head, buckets are handed over once this much of them is readable

    @classmethod
    def from_config(cls, cfg: Config) -> WorkerSettings:
        return cls(
            tenant=cfg.tenant,
            consumer=cfg.consumer,
            bucket_ms=cfg.bucket_ms,
            lag_ms=cfg.lag_ms,
            max_clock_skew_ms=cfg.max_clock_skew_ms,
            max_write_age_ms=cfg.max_write_age_ms,
            ttl_ms=cfg.ttl_ms,
            commit_interval_ms=cfg.commit_interval_ms,
            read_ahead=cfg.read_ahead,
            start_from_ms=cfg.start_from_ms,
            shards=cfg.shards,
            offsets=OffsetSettings.from_config(cfg)
            if cfg.correlate.offsets.estimate or cfg.correlate.dns_names
            else None,
            lease_ms=cfg.lease_ms,
            renew_ms=cfg.renew_ms,
            group_poll_ms=cfg.group_poll_ms,
            request_timeout_ms=cfg.request_timeout_ms,
            poll_interval_ms=cfg.poll_interval_ms,
        )


class SupervisorSettings(msgspec.Struct, frozen=True):
    """What the supervisor reads of the configuration, and what it hands each worker."""

    worker: WorkerSettings
    shutdown_timeout_ms: int
    drain_timeout_ms: int
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    @classmethod
    def from_config(cls, cfg: Config) -> SupervisorSettings:
        return cls(
            worker=WorkerSettings.from_config(cfg),
            shutdown_timeout_ms=cfg.shutdown_timeout_ms,
            drain_timeout_ms=cfg.drain_timeout_ms,
            metrics_port=cfg.metrics_port,
            metrics_host=cfg.metrics_host,
        )


class StoreFactory(Protocol):
    """Builds a worker's store (not yet opened) on the worker's clock (corrected to the database's)."""

    def build(self, clock: Clock) -> Store: ...


class ConfiguredStore(msgspec.Struct, frozen=True):
    """The store the runtime opens: its settings (the store's part of the config), picklable to the workers."""

    settings: StoreSettings

    @classmethod
    def from_config(cls, cfg: Config) -> ConfiguredStore:
        return cls(StoreSettings.from_config(cfg))

    def build(self, clock: Clock) -> Store:
        return store_for(self.settings, clock)


class StageFactory(Protocol):
    """Builds the stage of one worker process (``owner``: its owner id). Picklable: it crosses to the worker
    process as it is."""

    def build(self, owner: str) -> Stage: ...
