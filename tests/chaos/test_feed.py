"""The story feed under kill -9 of its reader while the engine emits (issue 17; docs/stories.md).

``storyline feed --reader chaos --follow --out FILE`` tails the stories while producers ingest and two workers
build and emit them with the chaos windows (``max_wait_ms`` 2 s: revisions are written all along). The reader is
killed with SIGKILL ten times at random moments while it delivers and started again each time with the same name;
it resumes after the position it last committed. At the end the engine drains and one more ``feed`` (without
``--follow``) reads to the end. Then:

* every line of FILE is one whole story body at the end (the feed commits its position only after its lines are
  written and fsynced; a kill can cut a write part way, and the next start truncates that uncommitted partial
  line before it delivers it again);
* every ``(story_id, revision)`` stored is delivered at least once — nothing missing — and nothing is delivered
  that is not stored;
* a revision delivered more than once comes from the tail written after the reader's last commit before a kill
  (at least once, not exactly once): they are counted and reported, and bounded by what a reader can deliver
  between two commits.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine.cli import FEED_COMMIT_EVERY
from tests.chaos.conftest import Recorder, TenantFactory
from tests.chaos.harness import Feeder, OffsetMonitor, Supervisor, finish, split, story_rows, teardown

pytestmark = pytest.mark.chaos

KILLS = 10
PARTS = 10


def _lines(path: Path, *, whole: bool = True) -> list[bytes]:
    """The lines of ``path``; ``whole``: it must end with a newline. Between a kill and the next start it may not
    (a kill can interrupt a write part way; the next start cuts that uncommitted line and delivers it again)."""
    data = path.read_bytes() if path.exists() else b""
    assert not whole or not data or data.endswith(b"\n"), f"{path} ends with a partial line: {data[-200:]!r}"
    return data.splitlines()


def _await_start(reader: subprocess.Popen[bytes], err: Path) -> None:
    """Wait until the reader says where it resumes (its first line on stderr): the kill's random moment is counted
    from there, not from the spawn, whose imports take a second here and several on a loaded machine (a CI run
    once killed eight readers in a row before they read anything)."""
    deadline = time.time() + 60
    while "feed: reader chaos: " not in (err.read_text() if err.exists() else ""):
        assert reader.poll() is None, f"the following reader exited with {reader.returncode}"
        assert time.time() < deadline, "the following reader did not start within 60 s"
        time.sleep(0.02)


def test_kill_9_of_a_following_feed_reader_while_the_engine_emits(
    backend: str, chaos_tenant: TenantFactory, chaos_record: Recorder, sim_20k: tuple[Path, Path]
) -> None:
    rng = random.Random(20261205)
    t = chaos_tenant()
    t.run("init")
    src, truth = sim_20k
    feeder = Feeder(t, split(src, t.dir, PARTS, bad_per_part=0), pause_s=2.5)
    out = t.dir / "feed.jsonl"
    sup = Supervisor(t)
    mon = OffsetMonitor(t.cfg)
    kills_with_output = 0
    grown: list[int] = []  # lines in FILE at each kill
    reader = None
    with teardown(feeder, mon, lambda: sup):
        try:
            sup.wait_workers()
            feeder.start()
            for _ in range(KILLS):
                reader = t.spawn("feed", "feed", "--reader", "chaos", "--follow", "--out", str(out))
                _await_start(reader, t.dir / f"feed-{t._n}.err")
                # Killed while it delivers: once it has written something new (the first time once stories flow:
                # the first periods complete after lag + wait), at a random moment of the next half second.
                # Revisions come a period at a time, so a reader may have nothing new for a while: at most 10 s.
                had = len(_lines(out, whole=False))
                deadline = time.time() + (10 if grown else 120)
                while len(_lines(out, whole=False)) <= had and time.time() < deadline:
                    assert reader.poll() is None, f"the following reader exited with {reader.returncode}"
                    time.sleep(0.05)
                assert grown or len(_lines(out, whole=False)) > had, "the feed delivered nothing within 120 s"
                time.sleep(rng.uniform(0.0, 0.5))
                assert reader.poll() is None, f"the following reader exited with {reader.returncode}"
                os.kill(reader.pid, signal.SIGKILL)
                reader.wait(10)
                n = len(_lines(out, whole=False))
                kills_with_output += n > (grown[-1] if grown else 0)
                grown.append(n)
        finally:
            if reader is not None and reader.poll() is None:
                reader.kill()
                reader.wait(10)
        feeder.finish()
        assert sup.stop() == 0
    report = finish(t, truth, feeder.runs)
    last = t.run("feed", "--reader", "chaos", "--out", str(out), timeout=300)
    assert "gap" not in last.stderr.lower(), last.stderr

    stored = {(r.story_id, r.revision) for r in story_rows(t.cfg).values()}
    bodies = [json.loads(line) for line in _lines(out)]
    delivered = [(b["story_id"], b["revision"]) for b in bodies]
    distinct = set(delivered)
    missing = sorted(stored - distinct)
    assert not missing, f"{len(missing)} of {len(stored)} stored revisions never delivered, e.g. {missing[:5]}"
    extra = sorted(distinct - stored)
    assert not extra, f"delivered but not stored: {extra[:5]}"
    duplicates = len(delivered) - len(distinct)
    # A restart delivers again at most what came after the last commit: under FEED_COMMIT_EVERY revisions.
    assert duplicates <= KILLS * FEED_COMMIT_EVERY, f"{duplicates} duplicates after {KILLS} kills"
    # Output grew between most kills: they landed while the reader delivered (a kill that found nothing new within
    # 10 s landed anyway).
    assert kills_with_output >= KILLS // 2, f"the reader delivered between only {kills_with_output} kills: {grown}"
    print(
        f"feed under {KILLS} kill -9: {len(stored):,} revisions stored, {len(delivered):,} lines delivered, "
        f"{duplicates:,} duplicates; lines at each kill {grown}"
    )
    chaos_record(
        "kill -9 of a following feed reader while the engine emits",
        backend,
        report,
        [],
        KILLS,
        revisions_stored=len(stored),
        lines_delivered=len(delivered),
        duplicates=duplicates,
        missing=len(missing),
        lines_at_kills=grown,
        note="storyline feed --follow --out FILE killed ten times 1-2.5 s after each start (the first once stories "
        "flow), restarted with the same reader name; then a drain and a feed to the end: every stored (story_id, "
        "revision) delivered; duplicates = the tail re-delivered after the last commit before a kill",
    )
