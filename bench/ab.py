"""``python -m bench.ab --base REV [--head REV] [--rounds N] [--events N]``: the story path's CPU of two commits,
on the same input, runs alternated — how body v2's cost was measured (docs/BENCHMARKS.md, issue 17).

Each commit's ``engine``, ``bench`` and ``configs`` are extracted (``git archive``) into a temporary directory and
imported from there; the input is written once by the head's simulator (so both engines read the same lines);
each run is ``bench.pipeline._one(parsed, 2, "stories")`` in a process of its own (the CQL node of
configs/bench.toml must be up: ``make db-up``). Rounds alternate base/head, the second half in reverse order.
Prints every run and the medians of the settled engine CPU per event and of the cost ledger, head / base.

``--inproc``: the story builder alone instead (no store, no node): ``bench/story_cpu.py`` of the head run against
each commit's ``engine`` (its ``--rounds 2`` in each run), so a change to the builder is measured without the
node's noise.

``--instructions``: the story builder's instructions per event instead of its CPU time, counted by valgrind
(``cachegrind``, no cache simulation; Debian package ``valgrind``): ``bench/story_cpu.py`` of the head with a fixed
clock and a fixed ``PYTHONHASHSEED``, run with 1 and with 2 measured rounds per commit; the difference is one
warm round. One commit's count repeated within ~1 % here (polars' pool threads spin for a while before they sleep,
and how long depends on the scheduling) where the CPU time of a round swings by a third on this machine, so a
change of a few per cent shows; without the fixed hash seed runs spread ~4 %. It misses what is not the
process's own instructions: a polars query's hand-over to its thread pool and the stalls (a query of nothing costs
~135k instructions but ~250 µs of CPU here), so it complements ``--inproc``, it does not replace it. Run it on an
idle machine: the spinning grows with the load.

``--digest``: whether the two commits' story builders write the same bytes: ``bench/story_cpu.py --digest`` of the
head (a hash of every revision, mark, evidence row and replay point at four rate / buckets-per-call settings, on
input simulated at a fixed clock) against each commit's ``engine``. Exit status 1 when any setting differs: how a
change meant only to make the builder cheaper is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_GEN = """
import sys, time
from engine.tools.simulate import Scenario, generate
sim, _ = generate(Scenario(events=int(sys.argv[1]), seed=1, start_s=time.time() - 3600, span_s=600))
with open(sys.argv[2], "wb") as f:
    f.writelines(e.line + b"\\n" for e in sim)
"""

_RUN = """
import json, sys, time
import bench.pipeline as bp
from engine.core.config import load
from engine.ingest.canonical import ParseRules, parse_line
rules = ParseRules.from_config(load(bp.CONFIG))
now_ms = int(time.time() * 1000)
parsed = [parse_line(line.rstrip(b"\\n"), rules, now_ms) for line in open(sys.argv[1], "rb")]
print(json.dumps(bp._one(parsed, 2, "stories")))
"""


def extract(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    git, tar = shutil.which("git"), shutil.which("tar")
    if git is None or tar is None:
        raise SystemExit("bench.ab: needs git and tar")
    archive = subprocess.run(  # noqa: S603 - git with a revision the user named
        [git, "archive", rev, "engine", "bench", "configs"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run([tar, "-x", "-C", str(into)], input=archive.stdout, check=True)  # noqa: S603 - fixed arguments
    return into


def python(tree: Path, code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree), "POLARS_MAX_THREADS": "1"}
    res = subprocess.run(  # noqa: S603 - this module's own code
        [sys.executable, "-c", code, *args], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    if res.returncode:
        raise SystemExit(f"bench.ab: a run in {tree} failed:\n{res.stderr[-2000:]}")
    return res.stdout


def alternated(
    trees: dict[str, Path], rounds: int, run: Callable[[Path], dict[str, Any]], line: Callable[[dict[str, Any]], str]
) -> dict[str, list[dict[str, Any]]]:
    """``run(tree)`` for base and head, ``rounds`` each, alternated (the second half in reverse order), each run
    printed as ``line(result)``: the results per commit."""
    order = [("base", "head") if r < (rounds + 1) // 2 else ("head", "base") for r in range(rounds)]
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "head": []}
    for pair in order:
        for which in pair:
            started = time.strftime("%H:%M:%S")
            result = run(trees[which])
            runs[which].append(result)
            print(f"{started} {which}: {line(result)}", flush=True)
    return runs


def medians(runs: dict[str, list[dict[str, Any]]], figures: dict[str, str], ledger: str) -> dict[str, dict[str, float]]:
    """Per commit: the median of each figure (name → key path ``a.b``; a missing value counts 0) and of each step
    of the ``ledger`` dict."""

    def get(r: dict[str, Any], path: str) -> Any:
        for k in path.split("."):
            r = r[k]
        return r

    return {
        which: {
            **{name: statistics.median(get(r, path) or 0 for r in rs) for name, path in figures.items()},
            **{k: statistics.median(r[ledger][k] for r in rs) for k in rs[0][ledger]},
        }
        for which, rs in runs.items()
    }


def last_json(out: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def inproc(base: str, head: str, rounds: int, events: int) -> int:
    """``--inproc``: bench.story_cpu against both commits' engines, alternated; medians of the runs' medians."""
    with tempfile.TemporaryDirectory(prefix="storyline-ab-") as tmp:
        trees = {"base": extract(base, Path(tmp) / "base"), "head": extract(head, Path(tmp) / "head")}
        script = f"import runpy; runpy.run_path({str(trees['head'] / 'bench' / 'story_cpu.py')!r}, run_name='__main__')"
        runs = alternated(
            trees,
            rounds,
            lambda tree: last_json(python(tree, script, "--events", str(events), "--rounds", "2")),
            lambda r: f"{r['median_us_per_event']:.2f} µs/event, ledger {r['median_ledger_us_per_event']}",
        )
    med = medians(runs, {"total": "median_us_per_event"}, "median_ledger_us_per_event")
    print(json.dumps({"base": base, "head": head, "rounds": rounds, "inproc": True, "median": med}, indent=1))
    print(f"head / base, story builder µs/event: {med['head']['total'] / med['base']['total']:.3f}")
    return 0


INSTRUCTIONS_CLOCK_S = 1_796_000_000.0
"""The wall time (s) ``--instructions`` simulates at: every run reads the same events with the same keys."""


def counted(tree: Path, script: str, valgrind: str, *args: str) -> tuple[int, dict[str, Any]]:
    """Instructions of ``python -c script args`` under cachegrind, and the script's last JSON line."""
    env = {**os.environ, "PYTHONPATH": str(tree), "POLARS_MAX_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", sys.executable]
    res = subprocess.run(  # noqa: S603 - valgrind on this module's own code
        [*cmd, "-c", script, *args], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    refs = [ln for ln in res.stderr.splitlines() if "I   refs:" in ln or "I refs:" in ln]
    if res.returncode or not refs:
        raise SystemExit(f"bench.ab --instructions: a run in {tree} failed:\n{res.stderr[-2000:]}")
    return int(refs[-1].rsplit(":", 1)[1].replace(",", "").strip()), last_json(res.stdout)


def instructions(base: str, head: str, events: int) -> int:
    """``--instructions``: one warm round's instructions per event of each commit's story builder."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("bench.ab --instructions: needs valgrind (Debian: apt-get install valgrind)")
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="storyline-ab-") as tmp:
        trees = {"base": extract(base, Path(tmp) / "base"), "head": extract(head, Path(tmp) / "head")}
        script = f"import runpy; runpy.run_path({str(trees['head'] / 'bench' / 'story_cpu.py')!r}, run_name='__main__')"
        for which, tree in trees.items():
            common = ("--events", str(events), "--clock-s", str(INSTRUCTIONS_CLOCK_S))
            one, r = counted(tree, script, valgrind, *common, "--rounds", "1")
            two, _ = counted(tree, script, valgrind, *common, "--rounds", "2")
            n = r["events"]
            out[which] = {"instructions_per_event": round((two - one) / n), "events": n, "process_instructions": two}
            print(f"{time.strftime('%H:%M:%S')} {which}: {out[which]['instructions_per_event']:,} instructions/event")
    print(json.dumps({"base": base, "head": head, "instructions": out}, indent=1))
    ratio = out["head"]["instructions_per_event"] / out["base"]["instructions_per_event"]
    print(f"head / base, story builder instructions/event: {ratio:.3f}")
    return 0


def digests(base: str, head: str) -> int:
    """``--digest``: each commit's output hashes, and whether they agree (exit status 1 if not)."""
    with tempfile.TemporaryDirectory(prefix="storyline-ab-") as tmp:
        trees = {"base": extract(base, Path(tmp) / "base"), "head": extract(head, Path(tmp) / "head")}
        script = f"import runpy; runpy.run_path({str(trees['head'] / 'bench' / 'story_cpu.py')!r}, run_name='__main__')"
        got = {
            which: last_json(python(tree, script, "--digest", "--clock-s", str(INSTRUCTIONS_CLOCK_S)))
            for which, tree in trees.items()
        }
    differ = [k for k in got["head"] if got["base"].get(k) != got["head"][k]]
    for k, h in got["head"].items():
        print(f"{k}: base {got['base'].get(k, '-')[:16]} head {h[:16]} {'DIFFERENT' if k in differ else 'same'}")
    print(f"head / base, story builder output: {'DIFFERENT in ' + str(len(differ)) if differ else 'the same bytes'}")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--head", default="HEAD")
    ap.add_argument("--rounds", type=int, default=3, help="runs per commit (default 3)")
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--inproc", action="store_true", help="the story builder in-process (bench.story_cpu)")
    ap.add_argument(
        "--instructions", action="store_true", help="the story builder's instructions per event (valgrind), once each"
    )
    ap.add_argument("--digest", action="store_true", help="whether the two story builders write the same bytes")
    args = ap.parse_args(argv)
    if args.digest:
        return digests(args.base, args.head)
    if args.instructions:
        return instructions(args.base, args.head, args.events)
    if args.inproc:
        return inproc(args.base, args.head, args.rounds, args.events)
    with tempfile.TemporaryDirectory(prefix="storyline-ab-") as tmp:
        trees = {"base": extract(args.base, Path(tmp) / "base"), "head": extract(args.head, Path(tmp) / "head")}
        data = Path(tmp) / "input.jsonl"
        python(trees["head"], _GEN, str(args.events), str(data))
        runs = alternated(
            trees,
            args.rounds,
            lambda tree: last_json(python(tree, _RUN, str(data))),
            lambda r: (
                f"engine {r['cpu_us_per_event']['engine']:.2f} µs/event, CQL node "
                f"{r['cpu_us_per_event']['cql_node'] or 0:.2f}, shard buckets per call "
                f"{r['shard_buckets_per_stage_call'] or 0:.1f}, ledger {r['cost_ledger_us_per_event']}"
            ),
        )
    figures = {"engine": "cpu_us_per_event.engine", "cql_node": "cpu_us_per_event.cql_node"}
    med = medians(runs, figures, "cost_ledger_us_per_event")
    print(json.dumps({"base": args.base, "head": args.head, "rounds": args.rounds, "median": med}, indent=1))
    print(f"head / base, engine µs/event: {med['head']['engine'] / med['base']['engine']:.3f}")
    if med["base"]["cql_node"]:
        print(f"head / base, CQL node µs/event: {med['head']['cql_node'] / med['base']['cql_node']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
