"""Storage: the only package that talks to a database driver. Callers import from here, not from the modules.

- ``protocol``: the :class:`Store` protocol both backends implement (and the tables, in its docstring), the
  error a refused commit raises;
- ``layout``: how data is laid out — schema version, fixed settings, index slots and shard groups, story lookup
  periods, table options, the meta checks;
- ``chunks``: events into rows (chunks of at most ``chunk_bytes``) and back, rows into write batches, row sizes;
- ``paging``: partitions read in pages bounded in rows and bytes;
- ``retry``: bounded, idempotent retries with backoff; ``classify``: which driver errors are retriable;
- ``embedded`` (SQLite, off the event loop) and ``cql`` (ScyllaDB / Cassandra via scyllapy): the backends.

May import ``engine.core`` only (and the drivers).
"""

from __future__ import annotations

from engine.core.clock import SYSTEM_CLOCK, Clock
from engine.core.config import Config
from engine.core.records import (
    AppendResult,
    BucketHint,
    Commit,
    DeadLetter,
    EventRecord,
    Member,
    Offset,
    PartitionPage,
    StoryRecord,
    story_id,
    story_id_shard,
)
from engine.store.layout import INDEX_GROUP_SHARDS, SCHEMA_VERSION, index_group, index_slot
from engine.store.protocol import Store, lease_ended
from engine.store.retry import run_all
from engine.store.settings import StoreSettings

__all__ = [
    "INDEX_GROUP_SHARDS",
    "SCHEMA_VERSION",
    "AppendResult",
    "BucketHint",
    "Commit",
    "DeadLetter",
    "EventRecord",
    "Member",
    "Offset",
    "PartitionPage",
    "Store",
    "StoreSettings",
    "StoryRecord",
    "index_group",
    "index_slot",
    "lease_ended",
    "make_store",
    "run_all",
    "store_for",
    "story_id",
    "story_id_shard",
]


def make_store(cfg: Config, clock: Clock = SYSTEM_CLOCK) -> Store:
    """The store of a loaded configuration (not yet opened): :func:`store_for` its :class:`StoreSettings`."""
    return store_for(StoreSettings.from_config(cfg), clock)


def store_for(settings: StoreSettings, clock: Clock = SYSTEM_CLOCK) -> Store:
    """The store for ``settings.store.backend`` (not yet opened). The CQL driver is imported only when used."""
    if settings.store.backend == "cql":
        from engine.store.cql import CqlStore

        return CqlStore(settings, clock)
    from engine.store.embedded import EmbeddedStore

    return EmbeddedStore(settings, clock)
