"""DNS names on connections (issue 19 item 3): the answers a DNS event gives, their lookup, and the story builder
that names connections in other shards through the epoch tables — a late answer amending, a drain, and a replay
that emits what the uninterrupted run emitted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import xxhash

from engine.core.event import Event
from engine.core.stage import Batch, Emission
from engine.correlate.body import decode_body
from engine.correlate.dns import SLACK_US, DnsAnswer, DnsView, answers_of, dns_fields
from engine.correlate.offsets import EvidenceRow, TableBook
from engine.correlate.story import StoryMachine
from engine.ingest.canonical import shard_of
from engine.ingest.network_identity import flow_identity
from tests.unit.test_story import T0, batch, config
from tests.unit.test_story_machine import Ledger

HOUR_US = 3_600_000_000


# -- the answers of one event ----------------------------------------------------------------------------------
def test_the_query_and_answers_of_each_format() -> None:
    assert dns_fields("dns", {"query": "A.Example.com.", "answer": ["192.0.2.1", "cdn.example.net"], "ttl": 60}) == (
        "a.example.com",
        [("192.0.2.1", 60.0), ("cdn.example.net", 60.0)],
    )
    assert dns_fields(
        "zeek.dns", {"query": "x.org", "answers": ["2001:db8::1", "192.0.2.9"], "TTLs": [30.0, 90.0]}
    ) == (
        "x.org",
        [("2001:db8::1", 30.0), ("192.0.2.9", 90.0)],
    )
    eve = {"dns": {"version": 3, "queries": [{"rrname": "y.net", "rrtype": "A"}],
                   "answers": [{"rrname": "y.net", "rrtype": "A", "ttl": 300, "rdata": "198.51.100.4"}]}}  # fmt: skip
    assert dns_fields("suricata.dns", eve) == ("y.net", [("198.51.100.4", 300.0)])
    eve2 = {"dns": {"type": "answer", "rrname": "z.net", "grouped": {"A": ["203.0.113.5"], "CNAME": ["w.net"]}}}
    assert dns_fields("suricata.dns", eve2) == ("z.net", [("203.0.113.5", None)])
    eve3 = {"dns": {"type": "answer", "rrname": "v6.net", "grouped": {"AAAA": ["2001:db8::5"]}}}
    assert dns_fields("suricata.dns", eve3) == ("v6.net", [("2001:db8::5", None)])
    # TTLs that do not pair with the answers are dropped (the cap applies), never shifted onto the wrong answer
    assert dns_fields("zeek.dns", {"query": "m.org", "answers": ["192.0.2.1", "192.0.2.2"], "TTLs": [1, 2, 3]}) == (
        "m.org",
        [("192.0.2.1", None), ("192.0.2.2", None)],
    )
    assert dns_fields("bind.dns", {"query": "q.org", "answer": "192.0.2.1"}) == ("q.org", [("192.0.2.1", None)])
    assert dns_fields("dns", {"query": "nx.example", "answer": [], "rcode": "NXDOMAIN"}) is None
    assert dns_fields("dns", {"answer": ["192.0.2.1"]}) is None


def test_the_client_is_the_side_off_port_53_and_ttls_are_capped() -> None:
    attrs = msgspec.json.encode({"query": "a.example", "answer": ["192.0.2.1", "not-an-address"], "ttl": 86_400})
    # a resolver's answer reported from the server's side: the client is the destination
    got = answers_of([("dns", "10.0.0.53", 53, "10.1.1.1", 40_000, attrs.decode(), 5, "s0")], max_ttl_us=HOUR_US)
    assert got == [DnsAnswer("10.1.1.1", "192.0.2.1", "a.example", 5, 5 + HOUR_US, "s0")]
    no_ttl = msgspec.json.encode({"query": "a.example", "answer": "192.0.2.1"}).decode()
    got = answers_of([("dns", "10.1.1.1", 40_000, "10.0.0.53", 53, no_ttl, 7, "s1")], max_ttl_us=60_000_000)
    assert got == [DnsAnswer("10.1.1.1", "192.0.2.1", "a.example", 7, 7 + 60_000_000, "s1")]
    assert answers_of([("firewall", "10.1.1.1", 1, "10.0.0.53", 53, "{}", 7, "s")], max_ttl_us=1) == []


# -- lookup -------------------------------------------------------------------------------------------------------
def answer(
    name: str, t_s: float, ttl_s: float = 300, *, client: str = "10.1.1.1", addr: str = "192.0.2.1"
) -> DnsAnswer:
    t = T0 + int(t_s * 1e6)
    return DnsAnswer(client, addr, name, t, t + int(ttl_s * 1e6), f"dns-{name}")


def test_the_latest_valid_answer_before_the_connection_names_it() -> None:
    view = DnsView()
    view.add(1, [answer("old.example", 0, ttl_s=3_600), answer("new.example", 100, ttl_s=10)])
    view.add(2, [answer("later.example", 500)])

    def at(s: float) -> int:
        return T0 + int(s * 1e6)

    assert view.lookup("10.1.1.1", "192.0.2.1", at(105), 2, 0) == ("new.example", "dns-new.example")
    # new.example expired at 110: the older answer still holds
    assert view.lookup("192.0.2.1", "10.1.1.1", at(200), 2, 0) == ("old.example", "dns-old.example")

    # an answer given just after the start (another sensor's clock) still names it; one given later does not
    def name(t: int, epoch: int = 2, first: int = 0) -> str | None:
        found = view.lookup("10.1.1.1", "192.0.2.1", t, epoch, first)
        return None if found is None else found[0]

    assert name(at(500) - SLACK_US + 1) == "later.example"
    assert name(at(500) - SLACK_US - 1) == "old.example"
    # the tables of later epochs, and those before the window, are not seen
    assert name(at(600), 1) == "old.example"
    assert name(at(600), 2, 2) == "later.example"
    assert view.lookup("10.1.1.1", "192.0.2.1", at(5_000), 2, 0) is None  # every answer expired
    assert view.lookup("10.9.9.9", "192.0.2.1", at(105), 2, 0) is None  # another client
    view.prune(2)
    assert view.epochs == {2} and view.size == 1 and view.pairs(1) == set()


# -- the story builder, through the epoch tables -----------------------------------------------------------------
RESOLVER = "10.0.0.53"
CLIENT = "10.1.1.1"


def conn(i: str, t_s: float, server: str, sport: int, *, sensor: str = "fw-1", rev: bool = False) -> Event:
    a, b = (CLIENT, sport), (server, 443)
    src, dst = (b, a) if rev else (a, b)
    s_ip, d_ip, key, reversed_ = flow_identity(6, src[0], src[1], dst[0], dst[1])
    return Event(i, T0 + int(t_s * 1e6), "firewall", sensor, xxhash.xxh64_intdigest(key), reversed_, 6, s_ip, src[1],
                 d_ip, dst[1], {})  # fmt: skip


def lookup(i: str, t_s: float, name: str, addrs: list[str], sport: int, ttl: int = 300) -> Event:
    s_ip, d_ip, key, reversed_ = flow_identity(17, CLIENT, sport, RESOLVER, 53)
    attrs = {"query": name, "answer": addrs, "rcode": "NOERROR", "ttl": ttl}
    return Event(i, T0 + int(t_s * 1e6), "dns", "dns-1", xxhash.xxh64_intdigest(key), reversed_, 17, s_ip, sport, d_ip,
                 53, attrs)  # fmt: skip


class Tables(TableBook):
    """The epoch tables as a worker's keeper gives them (engine.correlate.offsets.TableBook), from the evidence rows
    of the story builder's emissions."""

    def __init__(self) -> None:
        super().__init__(reference=None, min_samples=10, delay_epochs=0, expire_epochs=1_000)

    def absorb(self, em: Emission) -> None:
        self.add(msgspec.msgpack.decode(r.body, type=EvidenceRow) for r in em.evidence)


SHARDS = 4


def machine(tmp: Path, **kw: Any) -> StoryMachine:
    cfg = config(tmp, max_wait_ms=30_000, offsets={"epoch_ms": 10_000, "estimate": False}, dns_max_ttl_ms=600_000, **kw)
    m = StoryMachine.for_config(cfg)
    m.use_offset_tables()
    return m


def step(m: StoryMachine, tables: Tables, ledger: Ledger, b: int, events: list[Event], *, replay: bool = False) -> None:
    batches: dict[int, Batch] = {s: batch(*(e for e in events if shard_of(e, SHARDS) == s)) for s in range(SHARDS)}
    for e in m.offset_epochs([(b, batches)]):
        m.set_offset_table(tables.table(e))
    em = m.on_buckets([(b, batches)], replay=replay)
    tables.absorb(em)
    ledger.apply(em)


def drain(m: StoryMachine, tables: Tables, ledger: Ledger, b: int) -> None:
    closing = m.close_epochs(list(range(SHARDS)), b // m.epoch_buckets)
    tables.absorb(closing)
    ledger.apply(closing)
    for e in m.offset_epochs([(b, dict.fromkeys(range(SHARDS), batch()))], drain=True):
        m.set_offset_table(tables.table(e))
    em = m.drain(list(range(SHARDS)), b)
    tables.absorb(em)
    ledger.apply(em)


def latest(ledger: Ledger) -> dict[str, dict[str, Any]]:
    """The latest revision of each story, decoded, by the ids of its events."""
    newest: dict[str, tuple[int, bytes]] = {}
    for (sid, rev), row in ledger.rows.items():
        if row[3] is None and (sid not in newest or rev > newest[sid][0]):
            newest[sid] = (rev, row[5])
    out = {}
    for _, body in newest.values():
        doc = msgspec.json.decode(body)
        out[",".join(doc["event_ids"])] = doc
    return out


def script() -> dict[int, list[Event]]:
    """Bucket → events: lookups of shared addresses, connections after them, a late-arriving answer."""
    return {
        100: [lookup("d1", 100.0, "one.example", ["192.0.2.10", "192.0.2.11"], 50_001)],
        101: [
            conn("c1", 100.2, "192.0.2.10", 41_001),
            conn("c1b", 100.4, "192.0.2.10", 41_001, sensor="fw-2", rev=True),
        ],
        # two names answer one address (a CDN's): the later lookup names the connection after it
        120: [lookup("d2", 120.0, "two.example", ["192.0.2.11"], 50_002)],
        121: [conn("c2", 120.3, "192.0.2.11", 41_002)],
        # a connection whose answer arrives 40 s late (its lookup was at 139.9): amended once the answer's table is in
        140: [conn("c3", 140.0, "192.0.2.12", 41_003)],
        180: [lookup("d3", 139.9, "three.example", ["192.0.2.12"], 50_005)],
        # no lookup names this one
        150: [conn("c4", 150.0, "198.51.100.1", 41_004)],
    }


def run(m: StoryMachine, tables: Tables, ledger: Ledger, lo: int, hi: int, *, replay: bool = False) -> None:
    s = script()
    for b in range(lo, hi + 1):
        step(m, tables, ledger, b, s.get(b, []), replay=replay)


def assert_flow_index(m: StoryMachine) -> None:
    """The amendments' index (ShardState.by_ends) holds exactly the stories in the state, by their flow's ends."""
    for st in m.shards.values():
        want: dict[tuple[str, str], set[int]] = {}
        for key, meta in st.stories.items():
            if meta.ends is not None:
                want.setdefault(meta.ends, set()).add(key)
        assert st.by_ends == want


def test_connections_in_other_shards_carry_the_name_and_the_dns_story(tmp_path: Path) -> None:
    shard = {e.id: shard_of(e, SHARDS) for evs in script().values() for e in evs}
    assert all(shard[d] != shard[c] for d, c in (("d1", "c1"), ("d2", "c2"), ("d3", "c3"))), "answers cross shards"
    m, tables, ledger = machine(tmp_path), Tables(), Ledger()
    run(m, tables, ledger, 100, 260)
    assert_flow_index(m)
    drain(m, tables, ledger, 260)
    assert_flow_index(m)
    got = latest(ledger)
    dns_story = {ids: doc["story_id"] for ids, doc in got.items() if ids.startswith("d")}
    assert got["c1,c1b"]["dns_names"] == ["one.example"] and got["c1,c1b"]["related_stories"] == [dns_story["d1"]]
    assert got["c2"]["dns_names"] == ["two.example"] and got["c2"]["related_stories"] == [dns_story["d2"]]
    assert got["c3"]["dns_names"] == ["three.example"] and got["c3"]["revision"] == 2, "the late answer amended it"
    c3_first = [
        msgspec.json.decode(r[5]) for (sid, rev), r in ledger.rows.items() if rev == 1 and sid == got["c3"]["story_id"]
    ]
    assert "dns_names" not in c3_first[0]
    assert "dns_names" not in got["c4"] and "dns_names" not in got["d1"]
    assert m.counters.dns_amended == 1 and m.counters.dns_answers == 4
    for row in ledger.rows.values():  # the appended fields are the declaration's: decoded and encoded, the same bytes
        assert msgspec.json.encode(decode_body(row[5])) == row[5]


def test_without_the_tables_there_are_no_names(tmp_path: Path) -> None:
    """The check above can fail: the same script with DNS names off names nothing."""
    m, tables, ledger = machine(tmp_path, dns_names=False), Tables(), Ledger()
    run(m, tables, ledger, 100, 260)
    drain(m, tables, ledger, 260)
    assert not any("dns_names" in doc for doc in latest(ledger).values())


@pytest.mark.parametrize("crash", [100, 101, 109, 125, 142, 171, 185, 199])
def test_a_replay_names_and_amends_like_the_uninterrupted_run(tmp_path: Path, crash: int) -> None:
    """A crash at any bucket, then a replay from the replay points through it (the stored tables, as a restarted
    worker reads them): every (story, revision) it writes is the uninterrupted run's, byte for byte."""
    whole, wt = Ledger(), Tables()
    m = machine(tmp_path)
    run(m, wt, whole, 100, 260)
    drain(m, wt, whole, 260)

    ledger, tables = Ledger(), Tables()
    tables.tables = wt.tables  # the stored tables: what the restarted worker reads
    first = machine(tmp_path)
    replay_from: dict[int, int] = {}
    s = script()
    for b in range(100, crash + 1):
        batches = {sh: batch(*(e for e in s.get(b, []) if shard_of(e, SHARDS) == sh)) for sh in range(SHARDS)}
        for e in first.offset_epochs([(b, batches)]):
            first.set_offset_table(tables.table(e))
        em = first.on_buckets([(b, batches)])
        tables.absorb(em)
        ledger.apply(em)
        replay_from.update(em.replay)
    second = machine(tmp_path)
    for shard in range(SHARDS):
        lo = replay_from[shard]
        second.prepare_replay(shard, lo, crash, ledger.marks_of(shard, second.marks_from(lo), crash))
    for b in range(min(replay_from.values()), crash + 1):
        batches = {
            sh: batch(*(e for e in s.get(b, []) if shard_of(e, SHARDS) == sh))
            for sh in range(SHARDS)
            if replay_from[sh] <= b
        }
        for e in second.offset_epochs([(b, batches)]):
            second.set_offset_table(tables.table(e))
        em = second.on_buckets([(b, batches)], replay=True)
        ledger.apply(em)
    run(second, tables, ledger, crash + 1, 260)
    drain(second, tables, ledger, 260)
    assert ledger.rows == whole.rows


def test_a_drain_takes_the_answers_of_its_epoch_and_stays_final(tmp_path: Path) -> None:
    """Drained right after the late answer arrives (its table not due yet): the drain looks up the next epoch's
    table, so the connection is named by the drain; a later boundary writes nothing more for drained stories."""
    m, tables, ledger = machine(tmp_path), Tables(), Ledger()
    run(m, tables, ledger, 100, 181)
    drain(m, tables, ledger, 181)
    got = latest(ledger)
    assert got["c3"]["dns_names"] == ["three.example"] and got["c3"]["final"]
    before = dict(ledger.rows)
    for b in range(182, 260):
        step(m, tables, ledger, b, [])
    assert ledger.rows == before, "nothing written after the drain without new events"
