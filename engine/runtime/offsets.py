"""The runtime's side of learned sensor clock offsets: each epoch's table, read from the store or built there once.

The story builder (a pure stage) gathers the evidence and applies a table per epoch (engine.correlate.offsets,
docs/correlation.md "Learned offsets"); this keeper gives it the tables. The table of epoch ``e`` is the one stored
for ``e`` when there is one (a replay, another worker, an earlier run); otherwise it is built from the latest
stored table before ``e`` and the evidence rows of the epochs up to ``e - 1 - delay_epochs`` that it has not
merged, and stored with a first-writer-wins write — the body stored is the one every worker and every later
replay applies, whoever built it. A table never depends on the clock, only on the store's rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec

from engine.core.config import Config
from engine.core.records import EvidenceRecord
from engine.correlate.offsets import EvidenceRow, OffsetTable, advance, evidence_epochs
from engine.store import Store

log = logging.getLogger("storyline.offsets")

_table_decoder = msgspec.msgpack.Decoder(OffsetTable)
_row_decoder = msgspec.msgpack.Decoder(EvidenceRow)
_encoder = msgspec.msgpack.Encoder()


class OffsetSettings(msgspec.Struct, frozen=True):
    """What the keeper reads of the configuration (the meaning of each field: :class:`Config`)."""

    consumer: str
    bucket_ms: int
    epoch_ms: int
    min_samples: int
    delay_epochs: int
    expire_epochs: int  # ttl_ms in epochs: a pair without evidence that long is dropped
    reference_sensor: str | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> OffsetSettings:
        o = cfg.correlate.offsets
        return cls(
            consumer=cfg.consumer,
            bucket_ms=cfg.bucket_ms,
            epoch_ms=o.epoch_ms,
            min_samples=o.min_samples,
            delay_epochs=o.delay_epochs,
            expire_epochs=max(1, cfg.ttl_ms // o.epoch_ms),
            reference_sensor=cfg.correlate.reference_sensor,
        )


def decode_table(body: bytes) -> OffsetTable:
    return _table_decoder.decode(body)


def decode_row(body: bytes) -> EvidenceRow:
    return _row_decoder.decode(body)


def empty_row(epoch: int, shard: int) -> EvidenceRecord:
    """A shard's row of ``epoch`` without evidence or answers: the mark that the shard closed the epoch (a drain
    writes it for a drained shard whose row is not stored, so the other draining workers need not wait for it)."""
    return EvidenceRecord(epoch, shard, _encoder.encode(EvidenceRow(epoch, shard, {})))


class OffsetKeeper:
    """Reads or builds the offset table of an epoch (see the module's text); remembers the latest it handed out
    (:attr:`current`, for metrics and status)."""

    def __init__(self, store: Store, settings: OffsetSettings) -> None:
        self.store = store
        self.s = settings
        self.current: OffsetTable | None = None
        self.built = 0  # tables this keeper built and stored first
        self.epoch_buckets = max(1, settings.epoch_ms // settings.bucket_ms)
        # Tables of epochs up to this one merge no rows (no event of the tenant is ingested before it): they are
        # empty for everyone, given without reading or storing anything (a story builder asks for the tables of the
        # last hour and more when it starts, for DNS answers). None: unknown, every table is read or built.
        self.empty_through: int | None = None

    async def table(self, epoch: int, *, pending: Sequence[EvidenceRecord] = ()) -> OffsetTable:
        """The table of ``epoch``; ``pending``: evidence rows emitted but not written yet (a worker catching up
        builds the next epoch's table right after the call that emitted them), taken with the stored ones."""
        if self.empty_through is not None and epoch <= self.empty_through:
            return OffsetTable(epoch=epoch)
        body = await self.store.read_offset_table(self.s.consumer, epoch)
        if body is None:
            body = await self._build(epoch, pending)
        table = decode_table(body)
        if self.current is None or table.epoch >= self.current.epoch:
            self.current = table
        return table

    async def _build(self, epoch: int, pending: Sequence[EvidenceRecord]) -> bytes:
        s = self.s
        if self.current is not None and self.current.epoch == epoch - 1:
            prev: OffsetTable | None = self.current  # the stored table of the epoch before: no read
        else:
            found = await self.store.latest_offset_table(s.consumer, epoch)
            prev = decode_table(found[1]) if found is not None else None
        rows = await self.store.read_offset_evidence(s.consumer, list(evidence_epochs(epoch, s.delay_epochs)))
        newest = {(r.epoch, r.shard): r for r in [*rows, *pending]}  # a pending row is newer than its stored one
        table = advance(
            prev,
            epoch,
            [decode_row(r.body) for _, r in sorted(newest.items())],
            reference=s.reference_sensor,
            min_samples=s.min_samples,
            delay_epochs=s.delay_epochs,
            expire_epochs=s.expire_epochs,
        )
        mine = _encoder.encode(table)
        stored = await self.store.create_offset_table(s.consumer, epoch, mine)
        if stored == mine:
            self.built += 1
            for key in table.jumps:
                a, b = key.split("\x1f", 1)
                log.warning(
                    "sensor clock jump between %s and %s (epoch %d): their offset is learned again from new evidence",
                    a,
                    b,
                    epoch,
                )
            if prev is not None and table.reference != prev.reference:
                log.info("offsets are now given against sensor %s (epoch %d)", table.reference, epoch)
        return stored
