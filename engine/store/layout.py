"""How data is laid out: the schema version, the settings fixed at creation, index partitions (slots and
shard groups), story lookup periods, table options and the meta checks."""

from __future__ import annotations

from engine.core.errors import SchemaError
from engine.store.settings import StoreSettings

SCHEMA_VERSION = 7
# 2: stage_marks; 3: story_index (per shard and slot) instead of story_ids (per story); 4: story_periods and
# feed_readers (the story feed); 5: dead_letter.raw_bytes (a rejected line's length when only its head is kept);
# 6: offset_evidence and offset_tables (learned sensor clock offsets); 7: read_offsets.lease_expires_ms and
# group_members (groups of instances: shard leases)
OFFSET_TABLE_SLOT = 1024
"""Epochs per partition of offset_tables (the latest table before an epoch is found in its slot or the one before)."""


# Settings that fix how data is laid out: changing them on an existing tenant would misplace events.
FIXED_SETTINGS = ("shards", "bucket_ms")


INDEX_GROUP_SHARDS = 16


INDEX_SLOT_MS = 900_000


def index_slot(bucket: int, bucket_ms: int) -> int:
    """The time part of a bucket's ``bucket_index`` partition: the 15-minute slot its start falls in."""
    return (bucket * bucket_ms) // INDEX_SLOT_MS


def story_lookup_periods(now_ms: int, cfg: StoreSettings) -> tuple[int, int]:
    """The periods a lookup by story id considers, ``[first, last]``: from ``ttl_ms`` ago to one index slot
    ahead of ``now_ms`` (a worker on another host may run a little ahead of this clock)."""
    return (now_ms - cfg.ttl_ms) // cfg.bucket_ms, (now_ms + INDEX_SLOT_MS) // cfg.bucket_ms


def index_group(shard: int) -> int:
    """The shard part of a ``bucket_index`` partition."""
    return shard // INDEX_GROUP_SHARDS


def twcs_options(cfg: StoreSettings) -> tuple[str, int]:
    """(unit, size) of the TWCS window for ``twcs_window_ms`` (validated to whole minutes)."""
    if cfg.twcs_window_ms % 86_400_000 == 0:
        return "DAYS", cfg.twcs_window_ms // 86_400_000
    if cfg.twcs_window_ms % 3_600_000 == 0:
        return "HOURS", cfg.twcs_window_ms // 3_600_000
    return "MINUTES", cfg.twcs_window_ms // 60_000


def initial_meta(cfg: StoreSettings, now_ms: int) -> dict[str, str]:
    """The ``meta`` rows ``init`` records once for a tenant (the first ``init`` wins)."""
    return {"tenant": cfg.tenant, "shards": str(cfg.shards), "bucket_ms": str(cfg.bucket_ms), "created_ms": str(now_ms)}


def check_fixed(cfg: StoreSettings, meta: dict[str, str]) -> None:
    """Refuse a config whose layout-fixing settings differ from the tenant's recorded ones."""
    for key in FIXED_SETTINGS:
        have = meta.get(key)
        want = str(getattr(cfg, key))
        if have is not None and have != want:
            raise SchemaError(
                f"{key}: tenant {cfg.tenant} was initialized with {key} = {have}, config says {want}; "
                f"changing it would misplace events (it is fixed for the tenant's life)"
            )
