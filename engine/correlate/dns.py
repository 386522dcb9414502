"""DNS names on connections (issue 19 item 3): passive-DNS answers and their lookup. Pure: no I/O, no clock.

Answers
    A DNS event whose attributes carry a query name and address answers (a resolver's log, a Zeek ``dns.log``
    record, a Suricata EVE ``dns`` record) gives one :class:`DnsAnswer` per answered address: client C (the
    endpoint of its flow that is not on port 53; the reported source when neither is) asked name Q and got address
    A, at the event's corrected time, valid for the answer's TTL capped by ``correlate.dns_max_ttl_ms`` (the cap
    when the record has no TTL). CNAME and other non-address answers give nothing.

Where answers travel
    DNS events and the connections they name lie in different shards (shards are by flow), so the answers go
    through the store: the story builder adds them to its shard's evidence row of the epoch (the row that carries
    the learned-offset differences), and the epoch table built from those rows (first writer wins, the same one
    for every worker and every replay) carries the answers it merged. The answers a story builder looks up at a
    bucket of epoch ``e`` are those of the tables of epochs ``e - keep + 1 .. e``: a function of stored tables and
    the bucket, never of when a worker read what (docs/correlation.md, "DNS names").

Lookup
    A story of the flow between x and y starting at ``t`` takes the name of the latest answer with client x and
    address y, or client y and address x, given at most :data:`SLACK_US` after ``t`` and still valid at ``t``
    (``t <= time + ttl``); ties by name, then story id. The answer's DNS story id is the story's related story.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec

from .paths import get_path

__all__ = ["DNS_PATHS", "SLACK_US", "DnsAnswer", "DnsView", "answers_of", "dns_fields", "is_dns_source"]

SLACK_US = 2_000_000
"""How far after a connection's start an answer may be timed and still name it (µs): the resolver's log and the
sensors of the connection stamp one exchange up to a second or so apart (residual clock offsets, the time a
record is written), and a client connects milliseconds after its answer."""

DNS_PORT = 53


class DnsAnswer(msgspec.Struct, frozen=True, array_like=True, gc=False, order=True):
    """One answered address: ``client`` asked ``name`` and got ``addr`` at ``time_us`` (corrected event time),
    valid until ``expires_us``; ``story``: the id of the DNS event's story. Array-like: only grows at the end."""

    client: str
    addr: str
    name: str
    time_us: int
    expires_us: int
    story: str


def is_dns_source(source: str) -> bool:
    """Whether events of ``source`` may carry DNS answers: a resolver's log (``dns``) or a sensor format's DNS
    records (``zeek.dns``, ``suricata.dns``)."""
    return source == "dns" or source.endswith(".dns")


DNS_PATHS: Final[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
    "": {"query": ("query",), "answer": ("answer",), "ttl": ("ttl",)},  # a resolver's log (source ``dns``)
    "zeek": {"query": ("query",), "answer": ("answers",), "ttl": ("TTLs",)},  # dns.log
    "suricata": {  # EVE dns: v2/v3 ``answers`` objects, a v1 answer record's own ``rdata``, or the grouped form
        "query": ("dns.queries.0.rrname", "dns.rrname"),
        "answer": ("dns.answers.*.rdata", "dns.rdata", "dns.grouped.A", "dns.grouped.AAAA"),
        "ttl": ("dns.answers.*.ttl", "dns.ttl"),
    },
}
"""Where a DNS record holds its query name, its answers and their TTLs, by sensor format (the ``source``'s
prefix; ``""``: the resolver log's own attributes): paths as read by :func:`engine.correlate.paths.get_path`, the
first that holds a value wins. The one declaration: the exporters' ``dns`` family (``dns.question.name``,
``dns.answers``) takes its paths from here. A grouped EVE record gives its A answers, else its AAAA ones (one
query asks for one type)."""


def _first(attrs: Mapping[str, Any], paths: tuple[str, ...]) -> Any:
    return next((v for p in paths if (v := get_path(attrs, p)) is not None), None)


def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    return list(v) if isinstance(v, list) else [v]


def _ttl_s(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            return float(v) if isinstance(v, str) else None
        except ValueError:
            return None
    return float(v)


def dns_fields(source: str, attrs: Mapping[str, Any]) -> tuple[str, list[tuple[str, float | None]]] | None:
    """(query name, [(answer, TTL in seconds or None)]) of a DNS event's attributes, read at the paths of
    :data:`DNS_PATHS` for its format. TTLs pair with answers by position; one TTL serves every answer; TTLs that do
    not pair (another count) are dropped, so the cap applies. None: no query name or no answers."""
    fmt = source.split(".", 1)[0] if "." in source else ""
    paths = DNS_PATHS.get(fmt, DNS_PATHS[""])  # another resolver's ``x.dns`` log: the resolver log's names
    name = _first(attrs, paths["query"])
    answers = _as_list(_first(attrs, paths["answer"]))
    ttls = _as_list(_first(attrs, paths["ttl"]))
    if len(ttls) == 1:
        ttls = ttls * len(answers)
    elif len(ttls) != len(answers):
        ttls = [None] * len(answers)
    if not isinstance(name, str) or not name or not answers:
        return None
    return name.rstrip(".").lower(), [(a, _ttl_s(t)) for a, t in zip(answers, ttls, strict=True) if isinstance(a, str)]


@functools.lru_cache(maxsize=1 << 16)
def _address(text: str) -> str | None:
    """The canonical text of an address answer; None for anything else (a CNAME target, a TXT record). Cached:
    answers repeat (the addresses of popular names), and parsing one costs more than the rest of its answer."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def answers_of(
    rows: Iterable[tuple[str, str | None, int | None, str | None, int | None, str | None, int, str]],
    *,
    max_ttl_us: int,
) -> list[DnsAnswer]:
    """The answers of DNS events: ``rows`` of (source, src_ip, src_port, dst_ip, dst_port, attrs as JSON text,
    corrected time µs, story id). Events that are not DNS answers give nothing."""
    out: list[DnsAnswer] = []
    for source, src_ip, src_port, dst_ip, dst_port, attrs_json, t, story in rows:
        if not attrs_json or src_ip is None or dst_ip is None:
            continue
        try:
            attrs = msgspec.json.decode(attrs_json)
        except msgspec.DecodeError:
            continue
        if not isinstance(attrs, dict):
            continue
        got = dns_fields(source, attrs)
        if got is None:
            continue
        name, pairs = got
        client = dst_ip if src_port == DNS_PORT and dst_port != DNS_PORT else src_ip
        for answer, ttl_s in pairs:
            addr = _address(answer)
            if addr is None:
                continue
            ttl_us = max_ttl_us if ttl_s is None else max(0, min(int(ttl_s * 1_000_000), max_ttl_us))
            out.append(DnsAnswer(client, addr, name, t, t + ttl_us, story))
    return out


class DnsView:
    """The answers a story builder looks up: added per epoch table, looked up as of an epoch (answers of tables
    after it are not seen), dropped with their table's epoch. Per (client, address): the answers by time."""

    def __init__(self) -> None:
        self._by_pair: dict[
            tuple[str, str], list[tuple[int, int, str, str, int]]
        ] = {}  # time, expires, name, story, epoch
        self.epochs: set[int] = set()  # the tables added (whether or not they had answers)
        self._pairs_of: dict[int, set[tuple[str, str]]] = {}  # epoch → the pairs its table brought answers for
        self.size = 0

    def add(self, epoch: int, answers: Sequence[DnsAnswer]) -> None:
        """The answers of epoch ``epoch``'s table (once per epoch; a second call for it is ignored)."""
        if epoch in self.epochs:
            return
        self.epochs.add(epoch)
        for a in answers:
            entry = (a.time_us, a.expires_us, a.name, a.story, epoch)
            bisect.insort(self._by_pair.setdefault((a.client, a.addr), []), entry)
            self.size += 1
        if answers:
            self._pairs_of[epoch] = {(a.client, a.addr) for a in answers}

    def prune(self, before: int) -> None:
        """Forget the tables of epochs before ``before`` and their answers."""
        old = {e for e in self.epochs if e < before}
        if not old:
            return
        self.epochs -= old
        for e in old:
            self._pairs_of.pop(e, None)
        for key in list(self._by_pair):
            kept = [a for a in self._by_pair[key] if a[4] >= before]
            self.size -= len(self._by_pair[key]) - len(kept)
            if kept:
                self._by_pair[key] = kept
            else:
                del self._by_pair[key]

    def pairs(self, epoch: int) -> set[tuple[str, str]]:
        """The (client, address) pairs the table of ``epoch`` brought answers for."""
        return self._pairs_of.get(epoch, set())

    def lookup(self, x: str, y: str, start_us: int, epoch: int, first_epoch: int) -> tuple[str, str] | None:
        """(name, DNS story id) for a connection between ``x`` and ``y`` starting at ``start_us``, from the tables of
        epochs ``first_epoch`` to ``epoch`` (see the module's text); None: no answer names it."""
        best: tuple[int, str, str] | None = None
        for key in ((x, y), (y, x)):
            answers = self._by_pair.get(key)
            if not answers:
                continue
            i = bisect.bisect_right(answers, (start_us + SLACK_US, 2**63))
            while i > 0:
                i -= 1
                time_us, expires_us, name, story, e = answers[i]
                if e > epoch or e < first_epoch or expires_us < start_us:
                    continue
                cand = (time_us, name, story)
                if best is None or cand > best:
                    best = cand
                break
        return None if best is None else (best[1], best[2])
