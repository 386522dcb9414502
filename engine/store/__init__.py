"""Storage: the only package that talks to a database driver. See :mod:`engine.store.base`."""

from __future__ import annotations

from engine.core.clock import SYSTEM_CLOCK, Clock
from engine.core.config import Config
from engine.core.records import (
    AppendResult,
    BucketHint,
    Commit,
    DeadLetter,
    EventRecord,
    Offset,
    PartitionPage,
    StoryRecord,
    story_id,
    story_id_shard,
)
from engine.store.base import INDEX_GROUP_SHARDS, SCHEMA_VERSION, Store, index_group, index_slot

__all__ = [
    "INDEX_GROUP_SHARDS",
    "SCHEMA_VERSION",
    "AppendResult",
    "BucketHint",
    "Commit",
    "DeadLetter",
    "EventRecord",
    "Offset",
    "PartitionPage",
    "Store",
    "StoryRecord",
    "index_group",
    "index_slot",
    "make_store",
    "story_id",
    "story_id_shard",
]


def make_store(cfg: Config, clock: Clock = SYSTEM_CLOCK) -> Store:
    """The store for ``cfg.store.backend`` (not yet opened). The CQL driver is imported only when used."""
    if cfg.store.backend == "cql":
        from engine.store.cql import CqlStore

        return CqlStore(cfg, clock)
    from engine.store.embedded import EmbeddedStore

    return EmbeddedStore(cfg, clock)
