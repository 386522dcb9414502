"""The ``storyline`` command as a child process, for the tests that run the real CLI (conformance and chaos tiers):
the command line, a run to completion, a spawned run, an ingest of synthetic sessions, and the small windows
that keep such tests to a few seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine.core.config import Config

# lag_ms 1800 = max_write_age_ms 500 + request_timeout_ms 1000 (its minimum) + max_clock_skew_ms 200 + bucket_ms
# 100: the lag rule holds exactly.
SMALL_WINDOWS: dict[str, Any] = {
    "bucket_ms": 100,
    "max_write_age_ms": 500,
    "request_timeout_ms": 1000,
    "max_clock_skew_ms": 200,
    "lag_ms": 1800,
    "commit_interval_ms": 300,
}

# The windows of the runtime and access tests (lag 3 s).
FAST = {
    "bucket_ms": 100,
    "max_write_age_ms": 1000,
    "request_timeout_ms": 1000,
    "max_clock_skew_ms": 500,
    "lag_ms": 3000,
    "commit_interval_ms": 300,
    "shutdown_timeout_ms": 20_000,
    # each bucket once it is readable (the tests step workers bucket by bucket; test_runtime.py tests the default)
    "poll_interval_ms": 0,
}


def store_args(cfg: Config) -> list[str]:
    """``--set`` items that give the CLI ``cfg``'s store: CQL contact points and consistencies, or the file."""
    args: list[str] = []
    if cfg.store.backend == "cql":
        args += ["--set", f"store.contact_points={json.dumps(cfg.store.contact_points)}"]
        args += ["--set", f"store.consistency={cfg.store.consistency}"]
        args += ["--set", f"store.serial_consistency={cfg.store.serial_consistency}"]
    else:
        args += ["--set", f"store.path={cfg.store.path}"]
    return args


def argv(*args: str) -> list[str]:
    """``storyline ARGS``; with ``--record DIR[,MS]``, through :mod:`tests.record_run`: every worker records
    the ids it consumed in DIR (and sleeps MS per non-empty bucket) instead of building stories."""
    return [sys.executable, "-m", "tests.record_run" if "--record" in args else "engine.cli", *args]


def storyline(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv(*args), capture_output=True, text=True, timeout=timeout, check=False)


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ingest(cfg: Config, tmp: Path, sessions: int, seed: int, *, cli_args: list[str], timeout: float) -> set[str]:
    """``storyline ingest`` (with ``cli_args``, the ``--set`` items of ``cfg``) of synthetic sessions; the ids it
    accepted."""
    from engine.ingest.canonical import ParseRules, parse_line
    from engine.tools.simulate import sessions as synth

    lines = list(synth(sessions, seed=seed, start_s=time.time() - 300, span_s=300))
    path = tmp / f"in-{seed}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    res = storyline("ingest", *cli_args, str(path), timeout=timeout)
    assert res.returncode == 0, res.stderr
    now = int(time.time() * 1000)
    return {parse_line(ln, ParseRules.from_config(cfg), now).id for ln in lines}
