"""The cyclic garbage collector paused around work that allocates many small acyclic containers (msgspec's perf
tips): decoding a batch of events, parsing an ingest round. Collections set off by such allocations rescan
everything alive and find nothing to free."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused"]


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the collector for the block and enable it again after, also when the block raises; a collector the
    caller had turned off stays off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
