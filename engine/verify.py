"""The zero-loss invariant checker behind ``storyline verify`` (meant to run after ``storyline run --drain``).

It holds when:

* every accepted event id (every complete event in the ``events`` table, whatever bucket it was stored in) is in
  exactly one story's latest revision, ``merged_into`` stubs aside;
* no story's latest revision references an event id the ``events`` table does not hold;

An id found in two stories whose emissions lie further apart than ``correlate.amend_horizon_ms`` was
re-ingested after the horizon: that is listed apart, not as a violation. Incomplete chunk sets (never
acknowledged to a producer) and dead letters are counted and reported.
"""

from __future__ import annotations

import msgspec

from engine.config import Config
from engine.store import Store


class VerifyReport(msgspec.Struct):
    events: int = 0  # distinct event ids stored
    stored_twice: int = 0  # ids stored in more than one partition (retries), counted once
    incomplete: int = 0  # incomplete chunk sets skipped
    stories: int = 0  # story ids with a live latest revision
    merged_stubs: int = 0
    dead_letters: int = 0
    missing: list[str] = msgspec.field(default_factory=list)  # accepted ids in no story
    duplicated: list[str] = msgspec.field(default_factory=list)  # ids in several stories within the horizon
    reingested: list[str] = msgspec.field(default_factory=list)  # ids in several stories beyond the horizon
    unknown: list[str] = msgspec.field(default_factory=list)  # story event ids not in the events table
    truth_missing: list[str] = msgspec.field(default_factory=list)  # --truth ids never accepted
    accepted_ids: set[str] = msgspec.field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.unknown or self.truth_missing)

    def lines(self, limit: int = 20) -> list[str]:
        out = [
            f"events: {self.events:,} accepted ids ({self.stored_twice:,} stored twice, counted once); "
            f"{self.incomplete:,} incomplete chunk sets skipped; {self.dead_letters:,} dead letters",
            f"stories: {self.stories:,} live, {self.merged_stubs:,} merged into others",
        ]
        for name, ids in (
            ("missing from every story", self.missing),
            ("in more than one story", self.duplicated),
            ("referenced by a story but not stored", self.unknown),
            ("re-ingested after the amend horizon (not a violation)", self.reingested),
            ("in the truth file but never accepted", self.truth_missing),
        ):
            if ids:
                shown = ", ".join(ids[:limit]) + (" …" if len(ids) > limit else "")
                out.append(f"{len(ids):,} event ids {name}: {shown}")
        out.append("verify: OK" if self.ok else "verify: FAILED")
        return out


async def verify(store: Store, cfg: Config, now_ms: int) -> VerifyReport:
    rep = VerifyReport()
    meta = await store.read_meta()
    created = int(meta.get("created_ms", "0") or 0)
    first = (max(created - cfg.max_write_age_ms - cfg.max_clock_skew_ms, now_ms - cfg.ttl_ms)) // cfg.bucket_ms
    last = now_ms // cfg.bucket_ms + 1
    accepted: set[str] = set()
    shards = list(range(cfg.shards))
    # One 15-minute slot of the index at a time keeps memory bounded by the partitions of one slot.
    step = max(1, 900_000 // cfg.bucket_ms)
    for lo in range(first, last + 1, step):
        hints = await store.scan_index(shards, lo, min(last, lo + step - 1))
        for shard, hs in hints.items():
            for h in hs:
                incomplete = 0
                async for page in store.read_partition(shard, h.bucket, max_row_bytes=h.max_row_bytes):
                    for rec in page.events:
                        if rec.event_id in accepted:
                            rep.stored_twice += 1
                        accepted.add(rec.event_id)
                    incomplete = page.incomplete  # cumulative within the partition
                rep.incomplete += incomplete
    rep.events = len(accepted)
    latest: dict[str, tuple[int, bool, int, bytes]] = {}
    async for story_page in store.scan_stories():
        for s in story_page:
            cur = latest.get(s.story_id)
            if cur is None or s.revision > cur[0]:
                latest[s.story_id] = (s.revision, s.merged_into is not None, s.emitted_ms, s.body)
    seen: dict[str, int] = {}
    for _sid, (_rev, merged, emitted, body) in latest.items():
        if merged:
            rep.merged_stubs += 1
            continue
        rep.stories += 1
        for eid in msgspec.json.decode(body)["event_ids"]:
            if eid in seen:
                if abs(emitted - seen[eid]) > cfg.correlate.amend_horizon_ms:
                    rep.reingested.append(eid)
                else:
                    rep.duplicated.append(eid)
            else:
                seen[eid] = emitted
            if eid not in accepted:
                rep.unknown.append(eid)
    rep.missing = sorted(accepted - seen.keys())
    rep.accepted_ids = accepted
    async for dl_page in store.scan_dead_letters():
        rep.dead_letters += len(dl_page)
    return rep
