"""The zero-loss invariant checker behind ``storyline verify`` (meant to run after ``storyline run --drain``).

It holds when:

* every accepted event id (every complete event in the ``events`` table, whatever bucket it was stored in) is in
  exactly one story's latest revision, ``merged_into`` stubs aside;
* no story's latest revision references an event id the ``events`` table does not hold;
* the counts reconcile with what the producers reported (:func:`reconcile`, given the ingest runs): every
  distinct event the ingest summaries accepted is stored, and the dead-letter store holds exactly the lines
  they rejected.

* every ``(story_id, revision)`` is stored as one row: the same revision under a second ``period`` (a story
  emitted again after a restart) is a violation of the story stream's promise (docs/correlation.md).

An id found in two stories whose emissions lie further apart than ``correlate.amend_horizon_ms`` was
delivered again after the horizon (a late re-delivery): that is outside the promise and listed apart, not as a
violation — the story it starts has another id (the id hashes the bucket a story starts in). Tenants written
before that rule may hold a story id built again with revisions counted from 1: the revisions of one id are
cut into incarnations where the revision number stops growing (in emission order), and each incarnation's last
revision counts as a latest revision; those repeated revisions are reported apart too. Incomplete chunk sets
(never acknowledged to a producer) and dead letters are counted and reported.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

import msgspec

from engine.core.config import Config
from engine.store import Store


class _EventIds(msgspec.Struct):
    event_ids: list[str] = msgspec.field(default_factory=list)


_ids_decoder = msgspec.json.Decoder(_EventIds)


class VerifyReport(msgspec.Struct):
    events: int = 0  # distinct event ids stored
    stored_twice: int = 0  # ids stored in more than one partition (retries), counted once
    incomplete: int = 0  # incomplete chunk sets skipped
    stories: int = 0  # live latest revisions (one per story, and per re-creation of a story id)
    recreated: int = 0  # story ids built again after they had left the state (a re-ingest after the horizon)
    merged_stubs: int = 0
    dead_letters: int = 0
    missing: list[str] = msgspec.field(default_factory=list)  # accepted ids in no story
    duplicated: list[str] = msgspec.field(default_factory=list)  # ids in several stories within the horizon
    # "story_id@revision" stored as more than one row (another period): a story emitted again
    repeated: list[str] = msgspec.field(default_factory=list)
    reingested: list[str] = msgspec.field(default_factory=list)  # ids in several stories beyond the horizon
    unknown: list[str] = msgspec.field(default_factory=list)  # story event ids not in the events table
    truth_missing: list[str] = msgspec.field(default_factory=list)  # --truth ids never accepted
    unreconciled: list[str] = msgspec.field(default_factory=list)  # counts that disagree with the ingest runs
    accepted_ids: set[str] = msgspec.field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.duplicated or self.repeated or self.unknown or self.truth_missing or self.unreconciled
        )

    @property
    def lost(self) -> int:
        """Events lost: accepted but in no story, or in the truth file but never stored."""
        return len(self.missing) + len(self.truth_missing)

    def lines(self, limit: int = 20) -> list[str]:
        out = [
            f"events: {self.events:,} accepted ids ({self.stored_twice:,} stored twice, counted once); "
            f"{self.incomplete:,} incomplete chunk sets skipped; {self.dead_letters:,} dead letters",
            f"stories: {self.stories:,} live, {self.merged_stubs:,} merged into others"
            + (
                f", {self.recreated:,} ids built again with revisions from 1 (stories written before ids named the "
                f"bucket they start in)"
                if self.recreated
                else ""
            ),
        ]
        for name, ids in (
            ("missing from every story", self.missing),
            ("in more than one story", self.duplicated),
            ("referenced by a story but not stored", self.unknown),
            (
                "delivered again after the amend horizon (late re-deliveries, outside the promise: not a violation)",
                self.reingested,
            ),
            ("in the truth file but never accepted", self.truth_missing),
        ):
            if ids:
                shown = ", ".join(ids[:limit]) + (" …" if len(ids) > limit else "")
                out.append(f"{len(ids):,} event ids {name}: {shown}")
        if self.repeated:
            shown = ", ".join(self.repeated[:limit]) + (" …" if len(self.repeated) > limit else "")
            out.append(
                f"{len(self.repeated):,} story revisions stored twice (emitted again under another period): {shown}"
            )
        out.extend(f"counts do not reconcile: {problem}" for problem in self.unreconciled)
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
    # Every revision's emission time and event ids. A story id can be created again: once a story has left the
    # state (the amend horizon after its last emission), a re-ingest of its events builds it anew, with the same
    # id and revisions counted from 1 again (in other ``period`` partitions). So a story's revisions are taken in
    # emission order and cut into incarnations wherever the revision number does not grow; each incarnation's
    # last revision is a latest revision.
    revisions: dict[str, list[tuple[int, int, bool, list[str]]]] = {}
    rows: dict[tuple[str, int], int] = {}  # (story_id, revision) → rows stored
    async for story_page in store.scan_stories():
        for s in story_page:
            merged = s.merged_into is not None
            ids = [] if merged else _ids_decoder.decode(s.body).event_ids
            revisions.setdefault(s.story_id, []).append((s.emitted_ms, s.revision, merged, ids))
            key = (s.story_id, s.revision)
            rows[key] = rows.get(key, 0) + 1
    rep.repeated = sorted(f"{sid}@{rev}" for (sid, rev), n in rows.items() if n > 1)
    del rows
    latest: list[tuple[int, bool, list[str]]] = []
    for revs in revisions.values():
        revs.sort(key=lambda r: (r[0], r[1]))
        for i, (emitted, revision, merged, ids) in enumerate(revs):
            if i + 1 == len(revs) or revs[i + 1][1] <= revision:
                latest.append((emitted, merged, ids))
        rep.recreated += sum(1 for a, b in itertools.pairwise(revs) if b[1] <= a[1])
    del revisions
    seen: dict[str, int] = {}
    for emitted, merged, ids in latest:
        if merged:
            rep.merged_stubs += 1
            continue
        rep.stories += 1
        for eid in ids:
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


class IngestRun(msgspec.Struct, frozen=True):
    """What one producer run reported for one input (``storyline ingest`` prints it as its summary line;
    :func:`parse_ingest_summary` reads that line back)."""

    file: str  # the input: runs of the same file deliver the same lines again
    accepted: int  # distinct events written by the run
    rejected: int  # lines written to the dead-letter store
    duplicates: int = 0  # repeated ids within one write call


_SUMMARY_RE = re.compile(r"accepted ([\d,]+), rejected ([\d,]+), duplicates ([\d,]+)")


def parse_ingest_summary(file: str, text: str) -> IngestRun:
    """The counts of a ``storyline ingest`` summary line (``ingest: accepted 1,000, rejected 2, duplicates 0, …``)."""
    m = _SUMMARY_RE.search(text)
    if m is None:
        raise ValueError(f"no ingest summary in {text[:200]!r}")
    accepted, rejected, duplicates = (int(g.replace(",", "")) for g in m.groups())
    return IngestRun(file, accepted, rejected, duplicates)


def reconcile(report: VerifyReport, runs: Iterable[IngestRun]) -> list[str]:
    """Check the verified counts against the producers' reports and record what disagrees in
    ``report.unreconciled`` (which makes the report fail). Returns those problems.

    For inputs whose files hold disjoint event ids (a file may be delivered any number of times — a retry, a
    re-ingest — each delivery writes its lines again): the distinct events stored must equal the sum over the
    files of the most any one run of that file accepted (a run of a file accepts all of its valid lines), and the
    dead-letter store, keyed by file, line and content, must hold the sum over the files of the most any run
    rejected. An event stored that no run accounts for, or an accepted one that is not stored, is a violation.
    """
    accepted: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for run in runs:
        accepted[run.file] = max(accepted.get(run.file, 0), run.accepted)
        rejected[run.file] = max(rejected.get(run.file, 0), run.rejected)
    problems: list[str] = []
    want_events, want_dead = sum(accepted.values()), sum(rejected.values())
    if report.events != want_events:
        problems.append(
            f"{report.events:,} distinct events stored, but the ingest runs of {len(accepted)} inputs accepted "
            f"{want_events:,}"
        )
    if report.dead_letters != want_dead:
        problems.append(
            f"{report.dead_letters:,} dead letters stored, but the ingest runs rejected {want_dead:,} lines"
        )
    report.unreconciled.extend(problems)
    return problems
