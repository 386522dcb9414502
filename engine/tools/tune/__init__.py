"""Sizing: a recommended config for an event rate, an event size and a retention (``storyline tune``).

* :mod:`.model`: the sizing model. :func:`recommend` is pure (no I/O): from the rate, the average event size, the
  retention, the backend and a :class:`Capacity` (per-core throughput figures) it returns the config tree and,
  per key, the reasoning. Every tree it returns loads with :func:`engine.core.config.from_mapping`.
* :mod:`.render`: :func:`to_toml` renders tree and reasoning as a TOML document whose comments carry the reasoning.
* :mod:`.measure`: :func:`measure` calibrates a :class:`Capacity` with a short real run on this machine
  (``--measure``, ~10 s).
* here: :func:`main`, the command (flags in, TOML on stdout). docs/tuning.md explains the rules.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.core.config import load
from engine.core.errors import ConfigError
from engine.tools.tune.measure import measure
from engine.tools.tune.model import (
    DEFAULT_RETENTION_H,
    MAX_AVG_BYTES,
    MAX_RATE,
    MAX_RETENTION_H,
    PARTITION_MAX_BYTES,
    PARTITION_MAX_ROWS,
    ROW_OVERHEAD_BYTES,
    Capacity,
    check_inputs,
    machine_cores,
    recommend,
    twcs_window_ms,
)
from engine.tools.tune.render import to_toml

__all__ = [
    "MAX_AVG_BYTES",
    "MAX_RATE",
    "MAX_RETENTION_H",
    "PARTITION_MAX_BYTES",
    "PARTITION_MAX_ROWS",
    "ROW_OVERHEAD_BYTES",
    "Capacity",
    "main",
    "measure",
    "recommend",
    "to_toml",
    "twcs_window_ms",
]


def main(args: argparse.Namespace) -> int:
    """``storyline tune``: print the recommended config (stdout). Bad flags raise ConfigError (the CLI exits 2)."""
    rate, size = float(args.events_per_sec), float(args.avg_event_bytes)
    retention = DEFAULT_RETENTION_H if args.retention_hours is None else float(args.retention_hours)
    check_inputs(rate, size, retention, args.backend)
    if args.cores is not None and args.cores < 1:
        raise ConfigError("--cores", f"{args.cores} must be >= 1")
    base = None
    if args.config is not None or args.overrides:
        base = load(args.config, ([] if args.config is not None else ["tenant=main"]) + list(args.overrides))
    cores = args.cores or machine_cores()
    if args.measure:
        print("tune: measuring this machine (~10 s) ...", file=sys.stderr)
        capacity = measure(size, cores)
        for line in capacity.notes[:1]:
            print(f"tune: {line}", file=sys.stderr)
    else:
        capacity = Capacity(cores=cores)
    tree, reasons = recommend(rate, size, retention, args.backend, capacity, base=base)
    store = tree.get("store", {})
    path = store.get("path")
    if isinstance(path, str) and os.path.isabs(path):  # as the user wrote it: load() made it absolute
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            store["path"] = rel
    cmd = f"storyline tune --events-per-sec {rate:g} --avg-event-bytes {size:g} --retention-hours {retention:g}"
    for flag, value in (("--backend", args.backend), ("--cores", args.cores)):
        if value is not None:
            cmd += f" {flag} {value}"
    if args.measure:
        cmd += " --measure"
    sys.stdout.write(to_toml(tree, reasons, title=f"Recommended by `{cmd}`."))
    return 0
