"""The story state machine alone, with no store: what it emits is all there is, so a replay, a drain and the
open-story limit are checked on emissions. A :class:`Ledger` stands for the stories stream and the marks table:
it applies emissions as the worker's checkpoint does and fails on any second row or changed bytes of a
``(story_id, revision)`` — the story stream's promise (docs/correlation.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
import pytest

from engine.core.event import Event
from engine.core.stage import Batch, Emission
from engine.correlate.offsets import OffsetTable
from engine.correlate.story import DRAIN_PART, StoryMachine
from engine.ingest.canonical import shard_of
from tests.unit.test_story import batch, config, ev, random_script

Row = tuple[int, int, bool, str | None, int, bytes]  # shard, period, final, merged_into, emitted_ms, body


class Ledger:
    """The stories and marks a sequence of emissions leaves behind; raises on a violation of the promise."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], Row] = {}
        self.marks: dict[tuple[int, int, int], bytes] = {}
        self.rewrites = 0

    def apply(self, em: Emission) -> None:
        for m in em.marks:
            old = self.marks.get((m.shard, m.bucket, m.part))
            assert old is None or old == m.body, ("marks rewritten with other bytes", m.shard, m.bucket, m.part)
            self.marks[(m.shard, m.bucket, m.part)] = m.body
        for s in em.stories:
            row = (s.shard, s.period, s.final, s.merged_into, s.emitted_ms, s.body)
            old_row = self.rows.get((s.story_id, s.revision))
            if old_row is not None:
                assert old_row == row, ("a story revision written twice, differently", s.story_id, s.revision)
                self.rewrites += 1
            self.rows[(s.story_id, s.revision)] = row

    def marks_of(self, shard: int, first: int, last: int) -> list[tuple[int, bytes]]:
        return sorted((b, body) for (s, b, p), body in sorted(self.marks.items()) if s == shard and first <= b <= last)

    def latest_ids(self) -> dict[str, list[str]]:
        """Event ids per story in its latest revision (merge stubs left out)."""
        import msgspec

        latest: dict[str, tuple[int, Row]] = {}
        for (sid, rev), row in self.rows.items():
            if sid not in latest or rev > latest[sid][0]:
                latest[sid] = (rev, row)
        return {sid: msgspec.json.decode(row[5])["event_ids"] for sid, (_, row) in latest.items() if row[3] is None}


def restart(cfg: Any, ledger: Ledger, read: dict[int, int], replay_from: dict[int, int]) -> StoryMachine:
    m = StoryMachine.for_config(cfg)
    for shard, last in read.items():
        first = replay_from[shard]
        m.prepare_replay(shard, first, last, ledger.marks_of(shard, m.marks_from(first), last))
    return m


def crash_and_replay(
    cfg: Any,
    ledger: Ledger,
    script: dict[int, dict[int, list[Event]]],
    shards: int,
    crash: int,
    before_replay: Callable[[Ledger], None] | None = None,
) -> StoryMachine:
    """A machine fed buckets 100..crash, then a new one replayed from the replay points through ``crash`` (the
    replay's emission applied too): returned ready to go on."""
    first = StoryMachine.for_config(cfg)
    replay_from: dict[int, int] = {}
    for b in range(100, crash + 1):
        em = first.on_buckets([(b, {s: batch(*script.get(b, {}).get(s, [])) for s in range(shards)})])
        ledger.apply(em)
        replay_from.update(em.replay)
    if before_replay is not None:
        before_replay(ledger)
    second = restart(cfg, ledger, dict.fromkeys(range(shards), crash), replay_from)
    for b in range(min(replay_from.values()), crash + 1):
        batches = {s: batch(*script.get(b, {}).get(s, [])) for s in range(shards) if replay_from[s] <= b}
        ledger.apply(second.on_buckets([(b, batches)], replay=True))
    return second


def feed(
    m: StoryMachine, ledger: Ledger, script: dict[int, dict[int, list[Event]]], lo: int, hi: int, **kw: Any
) -> None:
    """Buckets ``lo..hi`` of every shard of the script, one call per bucket (empty shards included)."""
    shards = sorted({s for per in script.values() for s in per} | {0})
    for b in range(lo, hi + 1):
        batches: dict[int, Batch] = {s: batch(*script.get(b, {}).get(s, [])) for s in shards}
        ledger.apply(m.on_buckets([(b, batches)], **kw))


def by_shard(script: dict[int, list[Event]], shards: int) -> dict[int, dict[int, list[Event]]]:
    out: dict[int, dict[int, list[Event]]] = {}
    for b, evs in script.items():
        for e in evs:
            out.setdefault(b, {}).setdefault(shard_of(e, shards), []).append(e)
    return out


def test_a_drain_is_repeated_by_a_replay_not_rebuilt_and_emitted_again(tmp_path: Path) -> None:
    """Drain at bucket D, then a restart (replay from the committed offsets through D), then more time, more
    events and another drain: no story revision appears twice with other content or under another period, the
    replay emits only the drain's own revisions again (identical), and a later amendment is revision n+1."""
    cfg = config(tmp_path, max_wait_ms=10_000, amend_horizon_ms=60_000)
    shards = 4
    script = by_shard(random_script(5, 100, 160), shards)
    ledger = Ledger()
    live = StoryMachine.for_config(cfg)
    feed(live, ledger, script, 100, 160)
    drained = live.drain(list(range(shards)), 160)
    assert drained.stories and all(s.period == 160 and s.final for s in drained.stories)
    assert [m.part for m in drained.marks] == [DRAIN_PART] * len(drained.marks)
    ledger.apply(drained)
    assert not any(m.dirty for st in live.shards.values() for m in st.stories.values())
    replay_from = {s: drained.replay[s] for s in range(shards)}
    assert all(r <= 160 for r in replay_from.values())

    # a restart replays through 160: it emits the drain again (the same bytes), nothing else
    again = restart(cfg, ledger, dict.fromkeys(range(shards), 160), replay_from)
    rows_before = dict(ledger.rows)
    replayed = Emission()
    for b in range(min(replay_from.values()), 161):
        batches = {s: batch(*script.get(b, {}).get(s, [])) for s in range(shards) if replay_from[s] <= b}
        replayed.add(again.on_buckets([(b, batches)], replay=True))
    assert sorted(replayed.stories, key=lambda s: s.story_id) == sorted(drained.stories, key=lambda s: s.story_id)
    assert not replayed.marks
    ledger.apply(replayed)
    assert ledger.rows == rows_before
    # a second drain right away finds nothing open
    assert not again.drain(list(range(shards)), 160).stories

    # both go on: an event of an emitted story within the horizon amends it (revision n+1), the same in both
    victim = next(e for b in range(160, 99, -1) for evs in script.get(b, {}).values() for e in evs if e.flow)
    late = Event(
        "late-1",
        victim.time_us + 1_000_000,
        "firewall",
        "c",
        victim.flow,
        False,
        6,
        victim.src_ip,
        victim.src_port,
        victim.dst_ip,
        victim.dst_port,
        {},
    )
    more = {170: {shard_of(late, shards): [late]}}
    out_live, out_again = Ledger(), Ledger()
    feed(live, out_live, more, 161, 200)
    feed(again, out_again, more, 161, 200)
    out_live.apply(live.drain(list(range(shards)), 200))
    out_again.apply(again.drain(list(range(shards)), 200))
    assert out_live.rows == out_again.rows and out_live.rows
    amended = [(sid, rev) for (sid, rev) in out_live.rows if rev > 1]
    assert amended, "the late event amends its story with a new revision"
    for (sid, rev), row in out_live.rows.items():
        assert (sid, rev) not in ledger.rows and row[1] > 160  # new revisions only, in later periods


@pytest.mark.parametrize("crash", [160, 203, 251])
def test_the_open_story_limit_forces_out_the_same_stories_after_a_replay(tmp_path: Path, crash: int) -> None:
    """With ``max_open_stories`` reached, the stories forced out depend on how many stories are open — including
    ones that have left the state since, which a replay does not hold. The choice is recorded in the marks and
    a replay takes it: the rows after a crash at any point equal the uninterrupted run's."""
    knobs = {"max_story_events": 6, "amend_horizon_ms": 20_000, "max_open_stories": 2, "max_wait_ms": 10_000}
    cfg = config(tmp_path, **knobs)
    shards = 2
    script = by_shard(random_script(9, 100, 300), shards)
    whole = Ledger()
    m = StoryMachine.for_config(cfg)
    feed(m, whole, script, 100, 360)
    assert m.counters.forced > 5 and m.counters.evicted > 20

    crashed = Ledger()
    second = crash_and_replay(cfg, crashed, script, shards, crash)
    feed(second, crashed, script, crash + 1, 360)
    assert crashed.rows == whole.rows


def test_without_the_recorded_choice_a_replay_would_force_out_other_stories(tmp_path: Path) -> None:
    """The record is what makes the previous test pass: a replay that decides again (its marks without the forced
    lists) writes different rows for at least one crash point — so the test above can fail."""
    import msgspec

    from engine.correlate.story import Marks

    knobs = {"max_story_events": 6, "amend_horizon_ms": 20_000, "max_open_stories": 2, "max_wait_ms": 10_000}
    cfg = config(tmp_path, **knobs)
    shards = 2
    script = by_shard(random_script(9, 100, 300), shards)
    whole = Ledger()
    feed(StoryMachine.for_config(cfg), whole, script, 100, 360)
    dec, enc = msgspec.msgpack.Decoder(Marks), msgspec.msgpack.Encoder()

    def forget_forced(ledger: Ledger) -> None:
        ledger.marks = {
            k: enc.encode(msgspec.structs.replace(dec.decode(v), forced=[])) for k, v in ledger.marks.items()
        }

    differs = 0
    for crash in (160, 203, 251):
        crashed = Ledger()
        second = crash_and_replay(cfg, crashed, script, shards, crash, before_replay=forget_forced)
        rest = Ledger()
        feed(second, rest, script, crash + 1, 360)
        differs += any(whole.rows.get(k) != v for k, v in rest.rows.items())
    assert differs >= 1


def test_a_story_built_again_after_the_horizon_gets_a_new_id(tmp_path: Path) -> None:
    """An event delivered again after its story left the state starts a story with another id: the id hashes the
    bucket a story starts in, so it is never a second revision 1 of the old one."""
    cfg = config(tmp_path, max_wait_ms=5_000, amend_horizon_ms=10_000)
    ledger = Ledger()
    m = StoryMachine.for_config(cfg)
    e = ev("x1", 0.0)
    script = {100: {0: [e]}, 200: {0: [e]}}
    feed(m, ledger, script, 100, 230)
    ids = ledger.latest_ids()
    assert sorted(ids.values()) == [["x1"], ["x1"]] and len(ids) == 2
    assert {rev for (_, rev) in ledger.rows} == {1}


def test_the_replay_point_is_the_first_bucket_of_the_oldest_story_held(tmp_path: Path) -> None:
    """The replay point is kept by counting stories per first bucket (no scan per call): through creations,
    merges, truncations and evictions it equals the minimum over the stories held, or the next bucket."""
    cfg = config(tmp_path, max_story_events=6, amend_horizon_ms=20_000, max_wait_ms=10_000)
    shards = 2
    script = by_shard(random_script(4, 100, 300), shards)
    m = StoryMachine.for_config(cfg)
    checked = 0
    for b in range(100, 361):
        em = m.on_buckets([(b, {s: batch(*script.get(b, {}).get(s, [])) for s in range(shards)})])
        for s in range(shards):
            held = m.shards[s].stories.values()
            want = min((x.first_bucket for x in held), default=b + 1)
            assert em.replay[s] == want, (b, s)
            checked += bool(held)
    assert checked > 300 and m.counters.merged and m.counters.truncated and m.counters.evicted


# -- learned offsets: re-correction at epoch boundaries ----------------------------------------------------------
SKEW_S = 90.0  # sensor "b" reports 90 s late: beyond the 30 s window, so its events join nothing until corrected


def skewed_script(seed: int, shards: int) -> dict[int, dict[int, list[Event]]]:
    """Sessions on many ports (a port is reused now and then), each reported by sensor a and, up to 4 buckets
    later, by sensor b with its clock SKEW_S late, and one long session; no spans (stories that leave are marked
    by time range, the case a re-correction must not break); a few re-deliveries."""
    import random

    rnd = random.Random(seed)
    script: dict[int, list[Event]] = {}
    n = 0
    for b in range(100, 300):
        if b % 5 == 2:  # one long session: its story holds the replay point at 100, so every replay meets the
            # events of stories that left the state since (skipped by their marks)
            script.setdefault(b, []).append(ev(f"k{b}", b - 100, sport=39_999, sensor="a"))
        for _ in range(rnd.choice((0, 1, 1, 2))):
            t = (b - 100) + rnd.uniform(-3.0, 1.0)
            port = 40_000 + rnd.randrange(80)
            a = ev(f"e{n:05d}", t, sport=port, sensor="a")
            other = ev(f"e{n + 1:05d}", t + SKEW_S + rnd.uniform(-2.0, 2.0), sport=port, sensor="b", rev=True)
            n += 2
            script.setdefault(b, []).append(a)
            script.setdefault(b + rnd.randrange(5), []).append(other)
            if rnd.random() < 0.05:
                script.setdefault(b + rnd.randrange(90), []).append(a)  # re-delivered, maybe after it left
    for quiet in (130, 200, 240):  # the offsets change at empty buckets: a caller may not report them
        script.setdefault(quiet + 1, []).extend(script.pop(quiet, []))
    return by_shard(script, shards)


def offsets_of(epoch: int) -> OffsetTable:
    """The tables a runtime would hand over: nothing learned before bucket 130, then b's offset; a wrong estimate
    in epochs 20 to 23 (50 s), then right again."""
    b = 0 if epoch < 13 else 50 if 20 <= epoch < 24 else SKEW_S
    return OffsetTable(epoch=epoch, offsets_us={"b": int(b * 1e6)} if b else {})


def tabled(m: StoryMachine) -> StoryMachine:
    m.use_offset_tables()
    return m


def call(m: StoryMachine, buckets: list[tuple[int, dict[int, Batch]]], *, replay: bool = False) -> Emission:
    for e in m.offset_epochs(buckets):
        m.set_offset_table(offsets_of(e))
    return m.on_buckets(buckets, replay=replay)


def drain(m: StoryMachine, shards: int, bucket: int) -> Emission:
    """As the worker drains: the tables of the epochs the shards still cross first."""
    for e in m.offset_epochs([(bucket, dict.fromkeys(range(shards), batch()))]):
        m.set_offset_table(offsets_of(e))
    return m.drain(list(range(shards)), bucket)


@pytest.mark.parametrize("crash", [125, 131, 175, 188, 204, 241, 262])
def test_a_replay_re_corrects_and_relinks_like_the_live_run(tmp_path: Path, crash: int) -> None:
    """Learned offsets change at epoch boundaries (the first table at 130, a wrong one at 200, right again at
    240): the state's rows take each epoch's offsets and the stories that now link merge, emitted ones with a
    merge stub. A crash at any point and a replay give the same rows as the uninterrupted run; a caller that
    reports only the buckets with events gets them too."""
    cfg = config(tmp_path, max_wait_ms=40_000, offsets={"epoch_ms": 10_000})
    shards = 2
    script = skewed_script(11, shards)
    whole = Ledger()
    m = tabled(StoryMachine.for_config(cfg))
    for b in range(100, 361):
        whole.apply(call(m, [(b, {s: batch(*script.get(b, {}).get(s, [])) for s in range(shards)})]))
    whole.apply(drain(m, shards, 360))
    assert m.counters.recorrected > 20 and m.counters.merged >= 3
    assert any(row[3] is not None for row in whole.rows.values()), "an emitted story merged: a stub names it"

    # the events of sensor b before bucket 130 were linked once their offset was known
    early = [e for b in range(100, 125) for evs in script.get(b, {}).values() for e in evs if e.sensor == "b"]
    latest = whole.latest_ids()
    joined = [ids for ids in latest.values() if any(e.id in ids for e in early) and len(ids) > 1]
    assert len(joined) >= len(early) // 2, (len(joined), len(early))

    # only the buckets with events: the same rows
    sparse = Ledger()
    m2 = tabled(StoryMachine.for_config(cfg))
    for b in range(100, 361):
        if b in script:
            sparse.apply(call(m2, [(b, {s: batch(*evs) for s, evs in script[b].items()})]))
    sparse.apply(drain(m2, shards, 360))
    assert sparse.rows == whole.rows

    # a crash and a replay from the replay points: the same rows
    crashed = Ledger()
    first = tabled(StoryMachine.for_config(cfg))
    replay_from: dict[int, int] = {}
    for b in range(100, crash + 1):
        em = call(first, [(b, {s: batch(*script.get(b, {}).get(s, [])) for s in range(shards)})])
        crashed.apply(em)
        replay_from.update(em.replay)
    second = tabled(restart(cfg, crashed, dict.fromkeys(range(shards), crash), replay_from))
    for b in range(min(replay_from.values()), crash + 1):
        batches = {s: batch(*script.get(b, {}).get(s, [])) for s in range(shards) if replay_from[s] <= b}
        crashed.apply(call(second, [(b, batches)], replay=True))
    assert held(second) == held(first), "the replay holds exactly the stories the crashed run held"
    for b in range(crash + 1, 361):
        crashed.apply(call(second, [(b, {s: batch(*script.get(b, {}).get(s, [])) for s in range(shards)})]))
    crashed.apply(drain(second, shards, 360))
    assert crashed.rows == whole.rows


def held(m: StoryMachine) -> dict[int, list[str]]:
    """The stories in the machine's state: key → their events' ids."""
    live = {k for st in m.shards.values() for k in st.stories}
    rows = m.frame.filter(pl.col("story").is_in(list(live)))
    return {k: sorted(ids) for k, ids in rows.group_by("story").agg(pl.col("id")).iter_rows()}


def test_a_story_of_a_flow_whose_rows_moved_leaves_named_by_its_events(tmp_path: Path) -> None:
    """A replay skips the events of stories that left by the time range of their flow, compared with the times
    events arrive with; a re-correction moved rows away from those. So a story of a moved flow is marked by its
    events' ids; one of a flow that nothing moved, by its range (the compact form)."""
    from engine.correlate.story import Marks

    cfg = config(tmp_path, max_wait_ms=40_000, offsets={"epoch_ms": 10_000})
    m = tabled(StoryMachine.for_config(cfg))
    first = [
        ev("a1", 0.0, sport=40_001, sensor="a"),
        ev("b1", SKEW_S, sport=40_001, sensor="b", rev=True),
        ev("a2", 0.0, sport=40_002, sensor="a"),
    ]
    ledger = Ledger()
    for b in range(100, 260):
        ledger.apply(call(m, [(b, {0: batch(*first) if b == 115 else batch()})]))
    assert m.counters.recorrected == 1 and m.counters.merged == 1
    marks = [msgspec.msgpack.decode(body, type=Marks) for body in ledger.marks.values()]
    named = {i for mk in marks for i in mk.ids}
    assert named == {"a1", "b1"}
    assert [f for mk in marks for f in mk.flows] == [first[2].flow]


def test_a_bucket_handed_in_again_is_refused_before_the_state_changes(tmp_path: Path) -> None:
    """Each shard's buckets must ascend across calls: fed a bucket again (a caller's bug: the worker once did after
    a lease lapse mid-step), a stateful builder would build some stories twice. It is refused with
    StageOrderError — within one call too — and the state is untouched: going on gives the uninterrupted output."""
    from engine.core.errors import StageOrderError

    cfg = config(tmp_path, max_wait_ms=2_000, amend_horizon_ms=10_000)
    shards = 2
    script = by_shard(random_script(9, 100, 200), shards)
    whole, ledger = StoryMachine.for_config(cfg), Ledger()
    feed(whole, ledger, script, 100, 260)
    m, out = StoryMachine.for_config(cfg), Ledger()
    feed(m, out, script, 100, 150)
    again = {s: batch(*script.get(150, {}).get(s, [])) for s in range(shards)}
    with pytest.raises(StageOrderError, match="shard 0: bucket 150 handed to the story builder after bucket 150"):
        m.on_buckets([(150, again)])
    with pytest.raises(StageOrderError, match=r"shard 1: bucket 149 .* after bucket 150"):
        m.on_buckets([(151, {0: batch()}), (149, {1: batch()})])  # shard 0's 151 is fine; shard 1 goes back
    with pytest.raises(StageOrderError, match=r"bucket 152 .* after bucket 152"):
        m.on_buckets([(152, {0: batch()}), (152, {0: batch()})])
    assert m.shards[0].through == 150 and m.shards[1].through == 150
    feed(m, out, script, 151, 260)
    assert out.rows == ledger.rows and len(ledger.rows) > 20


def test_due_stories_come_out_by_time_then_key_and_early_entries_move_to_their_bucket(tmp_path: Path) -> None:
    """The due wheel (StoryMachine._due_later / _pop_due): the stories due at or before a bucket's end, in (due
    time, key) order, each once however many entries it has; an entry found early is moved to the story's due
    bucket (not lost, not popped early); entries of stories gone are dropped."""
    from engine.correlate.story import ShardState, StoryMeta

    m = StoryMachine.for_config(config(tmp_path))
    bms, wait = m.bucket_ms, m.c.max_wait_ms
    st = ShardState()

    def story(key: int, last_ingest_ms: int) -> StoryMeta:
        meta = StoryMeta(key, 0, f"s{key}", 0, last_ingest_ms)
        st.stories[key] = meta
        return meta

    late = story(5, 3 * bms)  # due at 3 bms + wait, in bucket (3 bms + wait) / bms - 1
    a, b = story(9, 0), story(7, 0)  # due at wait: same time, so key order
    c = story(11, -(bms // 2))  # due half a bucket before a and b, in the same bucket: first, despite its key
    for meta in (late, a, b, c):
        m._due_later(st, wait, meta.key)  # every entry at the earliest bucket: lower bounds
    m._due_later(st, wait, a.key)  # a second entry for a
    m._due_later(st, wait, 42)  # a story that is gone
    first = wait // bms - 1 + (1 if wait % bms else 0)
    assert m._next_due(st) == first
    assert m._pop_due(st, first * bms) == []  # the bucket before: nothing due yet, nothing popped
    assert [x.key for x in m._pop_due(st, (first + 1) * bms)] == [11, 7, 9]
    # late's entry moved to its own bucket, and only it is left
    due_late = -(-(3 * bms + wait) // bms) - 1
    assert m._next_due(st) == due_late
    assert st.due == {due_late: [5]}
    assert m._pop_due(st, due_late * bms) == []
    assert [x.key for x in m._pop_due(st, (due_late + 1) * bms)] == [5]
    assert st.due == {} and st.due_buckets == []
