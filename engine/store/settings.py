"""What a store needs of the configuration: its own section and the few tenant-wide settings that fix the
layout (shards, bucket_ms), the retention (ttl_ms, twcs_window_ms), row sizes and the request timeout. The
backends receive this, never the whole :class:`engine.core.config.Config` (which stays for loading and
validation)."""

from __future__ import annotations

import msgspec

from engine.core.config import Config, StoreConfig
from engine.core.errors import StoreError


class StoreSettings(msgspec.Struct, frozen=True):
    store: StoreConfig
    tenant: str
    shards: int
    bucket_ms: int
    ttl_ms: int
    twcs_window_ms: int
    chunk_bytes: int
    max_event_bytes: int
    request_timeout_ms: int

    @property
    def keyspace(self) -> str:
        """The tenant's keyspace (CQL) or table prefix (embedded)."""
        return self.tenant

    def for_backend(self, backend: str, who: str) -> StoreSettings:
        """These settings, checked to name ``backend`` (a store class refuses another backend's settings)."""
        if self.store.backend != backend:
            raise StoreError(f"{who} needs store.backend = {backend!r}, not {self.store.backend!r}")
        return self

    @classmethod
    def from_config(cls, cfg: Config) -> StoreSettings:
        return cls(
            store=cfg.store,
            tenant=cfg.tenant,
            shards=cfg.shards,
            bucket_ms=cfg.bucket_ms,
            ttl_ms=cfg.ttl_ms,
            twcs_window_ms=cfg.twcs_window_ms,
            chunk_bytes=cfg.chunk_bytes,
            max_event_bytes=cfg.max_event_bytes,
            request_timeout_ms=cfg.request_timeout_ms,
        )
