"""User journeys on the embedded store (issue 14; they were ``../shared/checks/journeys.sh``): the real CLI as
processes, each journey ending with ``storyline verify`` and the story stream's promise after a final drain
(:meth:`Tenant.assert_restart_changes_nothing`: no (story_id, revision) in a second row; started again, the engine
writes no new row and changes no row's bytes). Plus ``make run`` twice in a row, as the README promises.

Small windows: ``lag_ms`` 1800 is the lag rule with ``request_timeout_ms`` at its minimum (1 s), ``max_write_age_ms``
500, ``max_clock_skew_ms`` 200 and ``bucket_ms`` 100; a few thousand simulated events per journey. The story
windows are those of configs/local.toml.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from engine.core.config import Config
from engine.store import Store, make_store
from engine.tools.accuracy import score_stories
from engine.tools.simulate import Truth
from engine.tools.verify import parse_ingest_summary
from tests.chaos.conftest import TenantFactory
from tests.chaos.harness import ROOT, Supervisor, Tenant, simulate, story_rows
from tests.cli import SMALL_WINDOWS

pytestmark = pytest.mark.chaos

JOURNEY: dict[str, object] = {
    **SMALL_WINDOWS,
    "drain_timeout_ms": 30_000,
    # As configs/local.toml (journeys.sh used it): no story falls due by the clock within a journey, so each
    # drain finalizes the stories still open (the path of issue 14), whatever the timing.
    "correlate": {"match_window_ms": 30_000, "max_wait_ms": 600_000, "amend_horizon_ms": 3_600_000},
}
EVENTS = 3000
KILL_EVENTS = 15_000  # enough for the kill to land while the drain consumes (about 2.5 s of work here)

# `run --until-idle` / `--drain` wait themselves until the events written before they started are readable
# (issue 14, point 3). Set this to sleep for the lag after every ingest first, as journeys.sh did (it is how to
# run these journeys against an engine without that wait).
SLEEP_AFTER_INGEST = False


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Simulated input and its truth, made once: two batches with different ids, and a larger one."""
    d = tmp_path_factory.mktemp("journeys")
    return {"a": simulate(d, EVENTS, seed=1), "b": simulate(d, EVENTS, seed=2), "big": simulate(d, KILL_EVENTS, seed=3)}


def sleep_for_lag(cfg: Config, since: float) -> None:
    """Sleep until what was written by ``since`` (a time.time()) is older than the lag (plus a bucket)."""
    time.sleep(max(0.0, since + (cfg.lag_ms + 2 * cfg.bucket_ms) / 1000 - time.time()))


def ingest(t: Tenant, src: Path, *, sleep: bool = SLEEP_AFTER_INGEST) -> int:
    """``storyline ingest``; returns how many events it accepted."""
    res = t.run("ingest", str(src))
    if sleep:
        sleep_for_lag(t.cfg, time.time())
    return parse_ingest_summary(str(src), res.stdout).accepted


def fresh(make: TenantFactory, src: Path, *, sleep: bool = SLEEP_AFTER_INGEST) -> Tenant:
    t = make(**JOURNEY)
    t.run("init")
    assert ingest(t, src, sleep=sleep) > 0
    return t


def drain(t: Tenant) -> dict[str, object]:
    """``storyline run --workers 2 --drain``, exit 0; returns its final JSON line."""
    res = t.run("run", "--workers", "2", "--drain", timeout=300)
    final: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    assert final["final"], res.stdout[-2000:]
    return final


def test_ingest_wait_the_lag_drain_then_drain_again_with_nothing_new(
    embedded_tenant: TenantFactory, sims: dict[str, tuple[Path, Path]]
) -> None:
    src, truth = sims["a"]
    t = fresh(embedded_tenant, src, sleep=True)  # the user waits for the lag, as the docs used to say
    drain(t)
    t.assert_verify(truth)
    # The check drains again with nothing new: no story is written twice, nothing changes.
    t.assert_restart_changes_nothing(truth)


def test_ingest_then_immediately_drain_consumes_everything(
    embedded_tenant: TenantFactory, sims: dict[str, tuple[Path, Path]]
) -> None:
    src, truth = sims["a"]
    t = fresh(embedded_tenant, src, sleep=False)
    final = drain(t)
    assert final["events"] == EVENTS, f"the drain consumed {final['events']} of {EVENTS} events"
    t.assert_verify(truth)
    t.assert_restart_changes_nothing(truth)


def test_a_second_batch_after_a_drain_then_drain(
    embedded_tenant: TenantFactory, sims: dict[str, tuple[Path, Path]]
) -> None:
    (src_a, truth_a), (src_b, truth_b) = sims["a"], sims["b"]
    t = fresh(embedded_tenant, src_a)
    drain(t)
    t.assert_verify(truth_a)
    assert ingest(t, src_b) == EVENTS
    drain(t)
    t.assert_verify(truth_a)
    t.assert_verify(truth_b)
    t.assert_restart_changes_nothing(truth_b)


def test_sigint_during_ingest_then_ingest_again_then_drain(
    embedded_tenant: TenantFactory, sims: dict[str, tuple[Path, Path]]
) -> None:
    """Ctrl-C while ``ingest -`` waits for more input (issue 18): the lines it read are written — all of them,
    though fewer than a round — the summary says so, the exit code is 130; the whole file ingested again, then a
    drain: every event in exactly one story."""
    src, truth = sims["big"]
    t = embedded_tenant(**JOURNEY)
    t.run("init")
    data = src.read_bytes().splitlines(keepends=True)
    first = 7_500  # a round and a half (ingest.batch_lines is 5,000)
    proc = subprocess.Popen(
        t.argv("ingest", "-"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"".join(data[:first]))
        proc.stdin.flush()
        time.sleep(3)  # it reads them all, writes the first round and waits for more
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # standard input stays open: the read that waits for more must be abandoned
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, err.decode()
    assert "interrupted: every line read before it was ingested" in err.decode() and b"Traceback" not in err
    assert parse_ingest_summary("-", out.decode()).accepted == first, out.decode()
    assert ingest(t, src) == KILL_EVENTS
    drain(t)
    t.assert_verify(truth)


def test_until_idle_then_drain(embedded_tenant: TenantFactory, sims: dict[str, tuple[Path, Path]]) -> None:
    src, truth = sims["a"]
    t = fresh(embedded_tenant, src)
    t.run("run", "--workers", "2", "--until-idle", timeout=300)
    drain(t)
    t.assert_verify(truth)
    t.assert_restart_changes_nothing(truth)


async def _story_rows(store: Store) -> int:
    return sum([len(page) async for page in store.scan_stories()])


async def _wait_for(
    cfg: Config, proc: subprocess.Popen[bytes], first_bucket: int | None, rows_before: int, limit_s: float
) -> bool:
    """Poll the store while ``proc`` (a drain) runs: until some shard has committed a bucket at or after
    ``first_bucket`` (it has consumed part of the input), or, with ``first_bucket`` None, until there are more
    than ``rows_before`` story rows (it is writing what it finalized). Returns whether that happened before the
    drain ended."""
    store = make_store(cfg)
    await store.open()
    try:
        deadline = time.time() + limit_s
        while proc.poll() is None:
            assert time.time() < deadline, f"not within {limit_s} s"
            if first_bucket is None:
                if await _story_rows(store) > rows_before:
                    return True
            else:
                offs = await store.read_offsets(cfg.consumer, list(range(cfg.shards)))
                if any(o.read_bucket >= first_bucket for o in offs):
                    return True
            await asyncio.sleep(0.01)
        return False
    finally:
        await store.close()


def kill_9_tree(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL to the supervisor and to every process under it (its workers), found by psutil before the kill.
    Returns how many processes were under it."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    os.kill(proc.pid, signal.SIGKILL)
    for k in kids:
        with contextlib.suppress(psutil.NoSuchProcess):
            k.kill()  # psutil checks that the pid is still that process
    proc.wait(10)
    _, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, f"still alive after SIGKILL: {alive}"
    return len(kids)


def test_kill_9_of_the_supervisor_and_its_workers_during_a_drain_then_drain(
    embedded_tenant: TenantFactory, sims: dict[str, tuple[Path, Path]]
) -> None:
    """Kill -9 of the supervisor and its workers while a drain consumes; again (when it can be caught) while the
    next drain writes the stories it finalized; then a drain to the end."""
    src, truth = sims["big"]
    t = embedded_tenant(**JOURNEY)
    t.run("init")
    first_bucket = int(time.time() * 1000) // t.cfg.bucket_ms
    assert ingest(t, src) == KILL_EVENTS
    caught = []
    for at in (first_bucket, None):
        rows_before = len(story_rows(t.cfg))
        proc = t.spawn("drain", "run", "--workers", "2", "--drain", "--log-level", "WARNING")
        try:
            running = asyncio.run(_wait_for(t.cfg, proc, at, rows_before, limit_s=120))
            if running:
                assert kill_9_tree(proc) >= 2, "the supervisor had no workers to kill"
            caught.append(running)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    # The first kill must land while the drain consumes; the second only lands when the poll catches the
    # drain's story writes before it ends (the usual case here); if it did not, that drain completed.
    assert caught[0], "the drain ended before it had committed any of the input: nothing was killed"
    print(f"second kill during the drain's story writes: {'yes' if caught[1] else 'no, the drain ended first'}")
    drain(t)
    t.assert_verify(truth)
    t.assert_restart_changes_nothing(truth)


def test_run_sigterm_then_drain(embedded_tenant: TenantFactory, sims: dict[str, tuple[Path, Path]]) -> None:
    src, truth = sims["a"]
    t = fresh(embedded_tenant, src)
    sup = Supervisor(t)
    try:
        sup.wait_workers()
        time.sleep((t.cfg.lag_ms + 1000) / 1000)  # consuming part of the input
        assert sup.stop() == 0
    finally:
        if sup.proc.poll() is None:
            sup.proc.kill()
            sup.proc.wait(10)
    drain(t)
    t.assert_verify(truth)
    t.assert_restart_changes_nothing(truth)


def feed_keys(t: Tenant, out: Path, *args: str) -> list[tuple[str, int]]:
    """``storyline feed --reader downstream --out OUT [args]`` (exit 0, no gap); returns every (story_id,
    revision) in OUT so far, in order."""
    res = t.run("feed", "--reader", "downstream", "--out", str(out), *args)
    assert "gap" not in res.stderr, res.stderr
    return [(b["story_id"], b["revision"]) for b in map(json.loads, out.read_bytes().splitlines())]


def test_a_feed_reader_after_each_drain_gets_every_revision_once(
    embedded_tenant: TenantFactory, sims: dict[str, tuple[Path, Path]]
) -> None:
    """A downstream system reads the feed after each drain, with a second batch in between: every stored revision
    arrives exactly once (no kill, so no duplicates), the second read only what the second drain wrote, and a read
    with nothing new delivers nothing."""
    (src_a, truth_a), (src_b, truth_b) = sims["a"], sims["b"]
    t = fresh(embedded_tenant, src_a)
    out = t.dir / "downstream.jsonl"
    assert feed_keys(t, out) == [], "stories before any drain"  # nothing complete yet: no checkpoint
    drain(t)
    first = feed_keys(t, out)
    assert first and set(first) == {(r.story_id, r.revision) for r in story_rows(t.cfg).values()}
    assert feed_keys(t, out) == first, "a second read with nothing new delivered something"
    assert ingest(t, src_b) == EVENTS
    drain(t)
    both = feed_keys(t, out)
    stored = {(r.story_id, r.revision) for r in story_rows(t.cfg).values()}
    assert both[: len(first)] == first
    assert len(both) == len(set(both)) == len(stored) and set(both) == stored
    t.assert_verify(truth_a)
    t.assert_verify(truth_b)
    t.assert_restart_changes_nothing(truth_b)
    assert feed_keys(t, out) == both, "the restarts after the final drain made the feed deliver something"


@pytest.mark.parametrize(
    "options", [("--format", "zeek"), ("--format", "eve", "--alert-fraction", "0.2"), ("--format", "vpcflow")]
)
def test_a_sensors_own_logs_ingested_by_auto_then_drain_then_drain_again(
    embedded_tenant: TenantFactory, tmp_path: Path, options: tuple[str, ...]
) -> None:
    """Issue 18: what a Zeek, Suricata or VPC sensor writes of a simulated scenario (gzip), ingested as a user
    would — no --format, auto tells — then a drain: every record in exactly one story, the true story (the
    accuracy tool on `stories`), each story lists its events' native session ids; a second drain changes nothing."""
    src, truth = simulate(tmp_path, EVENTS, 7, *options)
    gz = src.with_name(src.name + ".gz")
    gz.write_bytes(gzip.compress(src.read_bytes()))
    t = fresh(embedded_tenant, gz)
    drain(t)
    t.assert_verify(truth)
    stories = t.dir / "stories.jsonl"
    stories.write_text(t.run("stories", "--format", "jsonl").stdout)
    scores = score_stories(str(stories), str(truth))
    assert scores["exact"] >= 0.99 and scores["client_server_right"] >= 0.99, scores
    bodies = [json.loads(line) for line in stories.read_text().splitlines() if line.strip()]
    with_sessions = sum(1 for b in bodies if b.get("sessions"))
    assert with_sessions == (0 if options[1] == "vpcflow" else len(bodies)), with_sessions
    t.assert_restart_changes_nothing(truth)


def test_dns_lookups_then_drain_name_the_connections_across_workers(
    embedded_tenant: TenantFactory, tmp_path: Path
) -> None:
    """Issue 19: connections to addresses their client looked up (the simulator's lookups, clocks exact), ingested
    and drained at once by two workers: the answers of the drained epoch reach the other worker's shards (each
    drain waits for the other's rows of the epoch), so the connections carry the right name and the DNS story;
    a second drain changes nothing."""
    src, truth_path = simulate(tmp_path, EVENTS, 9, "--lookups", "--skew-s", "0")
    truth = Truth.from_json(truth_path.read_bytes())
    assert len(truth.names) > 300
    t = fresh(embedded_tenant, src)
    drain(t)
    t.assert_verify(truth_path)
    stories = t.dir / "stories.jsonl"
    stories.write_text(t.run("stories", "--format", "jsonl").stdout)
    bodies = [json.loads(line) for line in stories.read_text().splitlines() if line.strip()]
    story_of = {eid: b for b in bodies if not b.get("merged_into") for eid in b["event_ids"]}
    ids = {b["story_id"] for b in bodies}
    first: dict[str, str] = {}
    for eid, key in sorted(truth.stories.items()):
        first.setdefault(key, eid)
    right = sum(1 for key, name in truth.names.items() if story_of[first[key]].get("dns_names") == [name])
    assert right / len(truth.names) >= 0.99, (right, len(truth.names))
    related = [r for b in bodies for r in b.get("related_stories", [])]
    assert related and set(related) <= ids, "every related story is a story of the tenant"
    t.assert_restart_changes_nothing(truth_path)


def make_run() -> subprocess.CompletedProcess[str]:
    # Not the variables of a `make test` this runs under (flags, jobserver), nor a CONFIG/DEMO from the shell.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CONFIG", "DEMO"}}
    return subprocess.run(
        ["make", "run", "EVENTS=2000"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_make_run_twice_in_a_row_passes_verify_both_times() -> None:
    """The README's demo (``.data/demo.db`` in the project, emptied at each start) run twice in a row."""
    for n in (1, 2):
        res = make_run()
        out = f"make run #{n}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        assert res.returncode == 0, out
        assert "verify: OK" in res.stdout, out
