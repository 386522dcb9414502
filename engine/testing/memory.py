"""An in-memory store for tests: the embedded store itself on a named in-memory SQLite database — the same
code as on disk, not a mock — so it passes the store conformance suite (``tests/conformance/test_store.py``
runs it as the ``memory`` backend). Nothing touches the disk and nothing outlives the process.

A named in-memory database lives while a connection to it is open, so :class:`MemoryDatabase` holds one (an
anchor store) from ``open`` to ``close``: stores opened and closed meanwhile on configs from :meth:`config` see
the same data, as they would on a file. One process only (a test's, or a benchmark's)."""

from __future__ import annotations

import uuid

import msgspec

from engine.core.config import Config
from engine.store import Store, make_store


class MemoryDatabase:
    def __init__(self, name: str | None = None) -> None:
        self.path = f"file:storyline-{name or uuid.uuid4().hex}?mode=memory&cache=shared"
        self._anchor: Store | None = None

    def config(self, cfg: Config) -> Config:
        """``cfg`` with its store pointed at this database."""
        store = msgspec.structs.replace(cfg.store, backend="embedded", path=self.path)
        return msgspec.structs.replace(cfg, store=store)

    async def open(self, cfg: Config) -> None:
        """Keep the database alive (until :meth:`close`); ``cfg``: any config of a tenant that will use it."""
        if self._anchor is None:
            anchor = make_store(self.config(cfg))
            await anchor.open()
            self._anchor = anchor

    async def close(self) -> None:
        anchor, self._anchor = self._anchor, None
        if anchor is not None:
            await anchor.close()
