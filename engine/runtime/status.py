"""What ``storyline run`` prints while it runs: a status line on a TTY, JSON lines otherwise (one per interval,
then a final one with the exit code), from the supervisor's :class:`engine.runtime.metrics.Snapshot`."""

from __future__ import annotations

import json
from typing import Any, TextIO

import msgspec

from engine.runtime.metrics import Snapshot


class StatusOutput:
    def __init__(self, out: TextIO, lag_ms: int, workers: int) -> None:
        self.out = out
        self.lag_ms = lag_ms
        self.workers = workers

    @property
    def tty(self) -> bool:
        return self.out.isatty()

    def end_line(self) -> None:
        """On a TTY: end the status line (before a message or the final line)."""
        if self.tty:
            self.out.write("\n")
            self.out.flush()

    def emit(self, snap: Snapshot, *, final: bool = False, extra: dict[str, Any] | None = None) -> None:
        lags = snap.lag_s.values()
        max_lag = max(lags) if lags else 0.0
        alive = sum(1 for w in snap.workers if w.alive)
        if self.tty and not final:
            if snap.waiting_s > 0:
                # \x1b[K: clear what a longer line left on the right
                self.out.write(
                    f"\rwaiting {snap.waiting_s:,.1f} s for the events written before this run to become"
                    f" readable (lag_ms = {self.lag_ms})\x1b[K"
                )
            else:
                cpu = sum(w.cpu_percent for w in snap.workers)
                rss = sum(w.rss_bytes for w in snap.workers) / 2**20
                self.out.write(
                    f"\r{snap.events:,} events  {snap.events_per_s:,.0f}/s  {snap.buckets_per_s:,.0f}"
                    f" buckets/s  max lag {max_lag:,.1f} s  workers {alive}/{self.workers}  cpu {cpu:.0f}%"
                    f"  rss {rss:,.0f} MiB\x1b[K"
                )
        else:
            line: dict[str, Any] = msgspec.to_builtins(snap)
            line.pop("lost_count", None)
            line |= {"max_lag_s": max_lag, "final": final, **(extra or {})}
            self.out.write(json.dumps(line) + "\n")
        self.out.flush()
