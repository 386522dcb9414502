"""Deterministic scenario generator with ground truth: sensor events (JSONL) plus the story each belongs to.

A *scenario* is a stream of sensor reports about network sessions, delivered out of order, with what story
building has to get right known by construction:

* **Sessions.** One session is one flow (TCP or UDP, IPv4 or about a tenth IPv6) seen by 1..4 distinct sensors.
  DNS sessions are UDP/53 to a resolver, HTTP sessions TCP/80 or TCP/443, the rest SSH, SMB, RDP, NTP, QUIC and
  similar. A report's true time lies within ``spread_s`` (3 s) after the session start; session starts are
  uniform over ``[start_s, start_s + span_s)``.
* **Figures.** Every session has true bytes and packets per direction (client → server, server → client),
  lognormal: DNS a one-packet query and a somewhat larger one-packet answer, HTTP a small request and a larger
  response, the rest alike both ways; at least one packet each way. A reuse session has its own figures.
* **Sources and schemas.** ``firewall`` (action, rule, ``src_bytes``, ``dst_bytes``, ``src_packets``,
  ``dst_packets``, ``initiator``), ``endpoint`` (process, pid, user, host, ``initiator``), ``dns`` (query,
  answer, rcode), ``http`` (method, host, path, status, user_agent) and ``cloud`` flow logs (vpc, account,
  ``src_bytes``, ``src_packets``, action ``ACCEPT``/``REJECT``). Figures follow docs/events.md: relative to the
  flow as the report gives it, so a reversed firewall report's ``src_bytes`` is the server → client figure;
  ``initiator`` is ``"src"``, or ``"dst"`` when the report is reversed. Bytes are the truth times one jitter
  draw uniform in ``[0.97, 1.03]`` (per firewall report; per cloud sensor and direction), packets exact. Each
  source has ``sensors_per_source`` sensors (``fw-1``, ``fw-2``, ``edr-1``, ``dns-1``, ``proxy-1``,
  ``vpcflow-1``, …). DNS sessions are seen by firewall, endpoint, dns and cloud sensors; HTTP by firewall,
  endpoint, http and cloud; others by firewall, endpoint and cloud. The sensors of one session have distinct
  sources while there are enough (a fourth sensor of an "other" session is a second instance of one of its
  sources).
* **Flow logs.** A cloud sensor writes one record per direction, each reporting its direction's flow (the
  sender as ``src``, so the server → client record is the reversed one) with only ``src_bytes`` and
  ``src_packets``, at its own time within ``spread_s``. With probability 0.10 a sensor sees one direction
  only (either, at random). With probability 0.15 a direction's record is split across two capture windows
  (when it has at least two packets): two records whose bytes and packets add up exactly to that direction's
  jittered figure, the second 0.5 to 5 s after the first (so within ``spread_s + 5`` s of the session start).
  All other sources write one report per sensor.
* **Clock skew.** Every sensor has its own clock offset, uniform in ``±skew_s`` (or as ``skew_overrides`` sets
  it: a sensor on local time, an hour off): the reported time is the true time plus the sensor's skew. Firewall
  and cloud sensors report epoch seconds, the others RFC 3339 (``Z``).
* **Direction.** Each firewall, endpoint, dns and http report independently gives the flow in the reverse
  direction (server → client) with probability ``reverse_fraction``; a flow-log record's direction is its
  traffic's.
* **Arrival.** A report arrives ``delay`` seconds after its true time: mostly about a second, some tens of
  seconds, a tail (3 %) uniform from 60 s up to ``max_arrival_delay_s``; never more than that.
* **Noise.** ``round(events * noise_fraction)`` background events, each a story of its own: a single report of a
  flow nobody else reports (from the cloud: one record of one direction) or (a fifth of them) an endpoint event
  without flow fields.
* **Port reuse.** With probability ``port_reuse_fraction`` a session reuses the exact 5-tuple of an earlier
  session and starts at least ``reuse_gap_s`` (10 min, far beyond a 30 s match window) after that session's
  last report. It is a different story. Reuse sessions can therefore lie after ``start_s + span_s`` (starting
  up to ``span_s + spread_s + 5 + 1.25 * reuse_gap_s`` after ``start_s``). Every other flow is unique to its
  session.
* **Spans** (``spans``, off by default). Every session lasts a drawn duration (lognormal: DNS tens of
  milliseconds, HTTP seconds with some connections kept for minutes, other services about half a minute with a
  long tail; at most ``max_session_s``). Firewall and flow-log records then report the session as a span:
  ``time`` within half a second after its start, ``end_time`` within half a second of its end (in the sensor's
  clock), and they are written, so arrive, after that end; a split flow-log direction becomes two capture windows,
  the first ending where the second starts. An HTTP report falls anywhere in its connection; endpoint and DNS
  reports stay at its start. The port-reuse gap counts from the session's end (or its last report, if later),
  so a small ``reuse_gap_s`` gives fast reuse.

:func:`generate` returns exactly ``events`` :class:`SimEvent` (sorted by arrival): a session's sensors are
chosen first, and when the budget left is smaller than what they would write, flow-log sensors drop splits,
then their second direction. The :class:`Truth` gives event id → story key, sensor → skew, event id → arrival
and, for every story with a flow (sessions, reuse sessions, flow noise), its :class:`FlowTruth`: protocol,
client and server, true bytes and packets per direction, and the sensors' relative jitter bound. Same
:class:`Scenario` → byte-identical output. Nothing here does I/O except :func:`write`.

The *sessions* mode (:func:`sessions`, ``storyline synth``) is the plain variant for demos, ingest tests and
benchmarks: JSONL lines only, no ground truth, ordered by session start. Each session is one network flow seen
by 1..4 sensors of different sources, with their own clock offset (``±sensor_skew_s``), some in the reverse
direction, and a few seconds apart; ``payload_bytes`` pads every line. The same seed always gives the same lines.
"""

from __future__ import annotations

import datetime as dt
import gzip
import ipaddress
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

SOURCES = ("firewall", "endpoint", "dns", "http", "cloud")
SENSOR_PREFIX = {"firewall": "fw", "endpoint": "edr", "dns": "dns", "http": "proxy", "cloud": "vpcflow"}
_EPOCH_TIME_SOURCES = frozenset({"firewall", "cloud"})
_ELIGIBLE: dict[str, tuple[str, ...]] = {
    "dns": ("firewall", "endpoint", "dns", "cloud"),
    "http": ("firewall", "endpoint", "http", "cloud"),
    "other": ("firewall", "endpoint", "cloud"),
}
_KIND_WEIGHTS = (("dns", 0.30), ("http", 0.45), ("other", 0.25))
_SENSOR_COUNT_WEIGHTS = ((1, 0.20), (2, 0.35), (3, 0.30), (4, 0.15))
_OTHER_SERVICES = (("tcp", 22), ("tcp", 445), ("tcp", 3389), ("tcp", 8443), ("tcp", 5432), ("udp", 123), ("udp", 443))
_IPV6_FRACTION = 0.10
_BLOCKED_FRACTION = 0.04
_FLOWLESS_NOISE_FRACTION = 0.20
_JITTER = 0.03  # relative bound of a sensor's byte figures around the truth
_CLOUD_ONE_DIRECTION = 0.10  # a flow-log sensor that sees one direction of a session only
_CLOUD_SPLIT = 0.15  # a direction's flow-log record split across two capture windows
_SPLIT_LATER_S = (0.5, 5.0)  # the second part's time after the first's
# Arrival delay mix: (probability, mean) exponentials, then the rest uniform over [_TAIL_FROM_S, max].
_DELAY_FAST = (0.80, 1.0)
_DELAY_SLOW = (0.17, 20.0)
_TAIL_FROM_S = 60.0
# With Scenario.spans: a session's duration (s), lognormal (mu, sigma) per service, capped by max_session_s —
# DNS exchanges of tens of milliseconds, HTTP connections of seconds (some kept alive for minutes), other
# services (SSH, SMB, RDP, databases) of about half a minute with a long tail.
_DURATION = {"dns": (-3.5, 0.8), "http": (1.4, 1.5), "other": (3.4, 1.6)}

Kind = Literal["session", "reuse", "noise"]
_encoder = msgspec.json.Encoder()
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class Scenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of one scenario. Times are in seconds (float); fractions in ``[0, 1]``."""

    events: int = 10_000
    seed: int = 1
    start_s: float = 1_790_000_000.0  # 2026-09-21T14:13:20Z; pass time.time() - span_s for live use
    span_s: float = 600.0
    skew_s: float = 5.0
    reverse_fraction: float = 0.30
    max_arrival_delay_s: float = 480.0
    noise_fraction: float = 0.05
    port_reuse_fraction: float = 0.02
    reuse_gap_s: float = 600.0
    spread_s: float = 3.0
    sensors_per_source: int = 2
    spans: bool = False
    max_session_s: float = 300.0
    skew_overrides: dict[str, float] = msgspec.field(default_factory=dict)  # sensor → its clock offset (s)
    lookups: bool = False  # HTTP and other connections go to the addresses of names their client looked up

    def __post_init__(self) -> None:
        if self.events < 0:
            raise ValueError(f"events: {self.events} must be >= 0")
        if self.sensors_per_source < 1:
            raise ValueError(f"sensors_per_source: {self.sensors_per_source} must be >= 1")
        for name in ("span_s", "skew_s", "max_arrival_delay_s", "reuse_gap_s", "spread_s", "max_session_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 0")
        for name in ("reverse_fraction", "noise_fraction", "port_reuse_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: {getattr(self, name)} must be within [0, 1]")
        if self.start_s < 946_684_800.0:
            raise ValueError(f"start_s: {self.start_s} is before 2000-01-01 (events there are rejected)")


class SimEvent(msgspec.Struct, frozen=True, gc=False):
    """One generated report.

    ``line`` is the JSONL line (no newline), valid per docs/events.md, with ``id`` set explicitly. ``story`` is
    the ground-truth story key; ``arrival_s`` the delivery time in seconds after ``Scenario.start_s``.
    ``true_time_s`` is the event time without sensor skew (the reported time is ``true_time_s + skew``);
    ``reversed`` says the line reports the flow server → client; ``kind`` tells session / reuse / noise;
    ``true_end_s`` the end of the span a flow record reports (``Scenario.spans``), else None.
    """

    line: bytes
    id: str
    story: str
    arrival_s: float
    source: str
    sensor: str
    true_time_s: float
    reversed: bool
    kind: Kind
    true_end_s: float | None = None


class FlowTruth(msgspec.Struct, frozen=True, kw_only=True):
    """The true flow of one story: protocol, client (the initiator) and server, bytes and packets per direction
    before any sensor's jitter, and ``jitter``, the relative bound of a sensor's byte figures around them
    (packets are reported exactly)."""

    proto: str
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    bytes_c2s: int
    bytes_s2c: int
    packets_c2s: int
    packets_s2c: int
    jitter: float = _JITTER


class Truth(msgspec.Struct, frozen=True, kw_only=True):
    """Ground truth of a scenario: ``stories`` maps event id → story key, ``skews`` sensor → clock offset (s),
    ``arrivals`` event id → arrival offset (s after the scenario's start), ``flows`` story key → its true flow
    (every story with a flow; absent from truth files of older versions)."""

    stories: dict[str, str]
    skews: dict[str, float]
    scenario: Scenario = msgspec.field(default_factory=Scenario)
    arrivals: dict[str, float] = msgspec.field(default_factory=dict)
    flows: dict[str, FlowTruth] = msgspec.field(default_factory=dict)
    # With Scenario.lookups: connection story key → the name of the latest lookup of its client, before it
    # started and within that answer's TTL, that answered its server's address (the connections that follow one)
    names: dict[str, str] = msgspec.field(default_factory=dict)

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> Truth:
        return msgspec.json.decode(data, type=cls)


@dataclass(slots=True)
class _Client:
    ip4: str
    ip6: str
    host: str
    user: str


@dataclass(slots=True)
class _Session:
    """Facts shared by every report of one session (a reuse session copies the flow, not the rest)."""

    story: str
    kind: Kind
    service: str  # dns / http / other
    proto: str
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    t0: float
    client: _Client
    blocked: bool
    facts: dict[str, Any] = field(default_factory=dict)
    c2s: tuple[int, int] = (0, 0)  # true (bytes, packets) client → server
    s2c: tuple[int, int] = (0, 0)  # and server → client
    last_s: float = 0.0  # true time of the latest report or span end so far (at least t0 + spread_s)
    end_s: float = 0.0  # with Scenario.spans: the true end of the session

    def flow_truth(self) -> FlowTruth:
        return FlowTruth(
            proto=self.proto,
            client_ip=self.client_ip,
            client_port=self.client_port,
            server_ip=self.server_ip,
            server_port=self.server_port,
            bytes_c2s=self.c2s[0],
            bytes_s2c=self.s2c[0],
            packets_c2s=self.c2s[1],
            packets_s2c=self.s2c[1],
        )


@dataclass(slots=True)
class _Pending:
    """A report before it has its id (ids follow arrival order, so they tell nothing about stories)."""

    order: int
    arrival_s: float
    true_time_s: float
    reported_us: int
    source: str
    sensor: str
    story: str
    kind: Kind
    reversed: bool
    flow: tuple[str, str, int, str, int] | None  # proto, src_ip, src_port, dst_ip, dst_port as reported
    attrs: dict[str, Any]
    true_end_s: float | None = None
    reported_end_us: int | None = None


def sensor_names(sensors_per_source: int) -> dict[str, list[str]]:
    """Source → its sensor names (``fw-1``, ``fw-2``, …)."""
    return {src: [f"{SENSOR_PREFIX[src]}-{i}" for i in range(1, sensors_per_source + 1)] for src in SOURCES}


def _pick(rnd: random.Random, weighted: tuple[tuple[Any, float], ...]) -> Any:
    u = rnd.random()
    acc = 0.0
    for value, weight in weighted:
        acc += weight
        if u < acc:
            return value
    return weighted[-1][0]


def _delay(rnd: random.Random, max_s: float) -> float:
    u = rnd.random()
    if u < _DELAY_FAST[0]:
        d = rnd.expovariate(1.0 / _DELAY_FAST[1])
    elif u < _DELAY_FAST[0] + _DELAY_SLOW[0]:
        d = rnd.expovariate(1.0 / _DELAY_SLOW[1])
    else:
        d = rnd.uniform(min(_TAIL_FROM_S, max_s), max_s)
    return min(d, max_s)


def _rfc3339(us: int) -> str:
    return (_EPOCH + dt.timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Generator:
    def __init__(self, s: Scenario) -> None:
        self.s = s
        self.rnd = random.Random(s.seed)
        self.sensors = sensor_names(s.sensors_per_source)
        rnd = self.rnd
        self.skews: dict[str, float] = {
            name: round(rnd.uniform(-s.skew_s, s.skew_s), 6) for src in SOURCES for name in self.sensors[src]
        }
        unknown = set(s.skew_overrides) - set(self.skews)
        if unknown:
            raise ValueError(f"skew_overrides: no sensor {sorted(unknown)[0]!r} in the scenario")
        self.skews.update(s.skew_overrides)
        n_clients = max(16, s.events // 20)
        self.clients = [
            _Client(
                ip4=f"10.{rnd.randrange(1, 255)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}",
                ip6=str(ipaddress.IPv6Address((0xFD00 << 112) | rnd.getrandbits(64))),
                host=f"ws-{i:05d}",
                user=rnd.choice(("alice", "bob", "carol", "dave", "erin", "frank", "svc-backup", "svc-build"))
                + ("" if rnd.random() < 0.5 else str(rnd.randrange(1, 100))),
            )
            for i in range(n_clients)
        ]
        self.domains = [f"{w}{i}.example.{tld}" for i, (w, tld) in enumerate(self._words(max(8, s.events // 50)))]
        self.vpcs = [(f"vpc-{rnd.getrandbits(32):08x}", str(rnd.randrange(10**11, 10**12))) for _ in range(4)]
        # Scenario.lookups: each name answers 1 to 4 addresses of a shared pool (a CDN's: several names share an
        # address), with a TTL of 60 s to 1 h; a client's lookups (true time, name, addresses, TTL) by its address.
        self.answers: dict[str, tuple[list[str], list[str], int]] = {}
        self.looked: dict[str, list[tuple[float, str, list[str], int]]] = {}
        self.cache: dict[tuple[str, str], float] = {}  # (client address, name) → when its answer expires
        self.lookup_of: dict[str, tuple[str, str, float]] = {}  # connection story → (client address, server, t0)
        if s.lookups:
            pool4 = [
                f"198.18.{rnd.randrange(256)}.{rnd.randrange(1, 255)}" for _ in range(max(8, len(self.domains) // 3))
            ]
            pool6 = [str(ipaddress.IPv6Address((0x20010DB8 << 96) | (0xCD << 32) | rnd.getrandbits(16))) for _ in pool4]
            for name in self.domains:
                k = rnd.randint(1, 4)
                ttl = rnd.choice((60, 120, 300, 600, 1_800, 3_600))
                self.answers[name] = (rnd.sample(pool4, k), rnd.sample(pool6, k), ttl)
        self.used_flows: set[tuple[str, tuple[str, int], tuple[str, int]]] = set()
        self.pending: list[_Pending] = []
        self.flows: dict[str, FlowTruth] = {}
        self.order = 0

    def _words(self, n: int) -> list[tuple[str, str]]:
        words = ("app", "api", "cdn", "mail", "auth", "files", "git", "wiki", "shop", "news", "img", "update")
        return [(self.rnd.choice(words), self.rnd.choice(("com", "net", "org"))) for _ in range(n)]

    def _server_ip(self, v6: bool) -> str:
        rnd = self.rnd
        if v6:
            return str(ipaddress.IPv6Address((0x20010DB8 << 96) | rnd.getrandbits(32)))
        net = rnd.choice(("192.0.2", "198.51.100", "203.0.113"))
        return f"{net}.{rnd.randrange(1, 255)}"

    def _flow_key(self, proto: str, a: str, ap: int, b: str, bp: int) -> tuple[str, tuple[str, int], tuple[str, int]]:
        x, y = (a, ap), (b, bp)
        return (proto, x, y) if x <= y else (proto, y, x)

    def new_session(self, story: str, kind: Kind) -> _Session:
        rnd = self.rnd
        service: str = _pick(rnd, _KIND_WEIGHTS)
        client = rnd.choice(self.clients)
        v6 = rnd.random() < _IPV6_FRACTION
        client_ip = client.ip6 if v6 else client.ip4
        facts: dict[str, Any] = {}
        if service == "dns":
            proto, server_port = "udp", 53
            server_ip = (
                ("fd00::53" if rnd.random() < 0.5 else "fd00::1:53") if v6 else rnd.choice(("10.0.0.53", "10.0.1.53"))
            )
            nx = rnd.random() < 0.1
            qname = rnd.choice(self.domains) if not nx else f"nx{rnd.randrange(10**6)}.example.invalid"
            facts["query"] = qname
            facts["rcode"] = "NXDOMAIN" if nx else "NOERROR"
            facts["answer"] = [] if nx else [self._server_ip(v6) for _ in range(rnd.randint(1, 2))]
        elif service == "http":
            proto = "tcp"
            server_port = 443 if rnd.random() < 0.7 else 80
            server_ip = self._server_ip(v6) if not self.s.lookups else self._looked_up(facts, v6)
            facts["method"] = _pick(rnd, (("GET", 0.75), ("POST", 0.2), ("PUT", 0.03), ("DELETE", 0.02)))
            facts["host"] = facts.get("name") or rnd.choice(self.domains)
            facts["path"] = rnd.choice(("/", "/index.html", "/api/v1/items", "/login", "/static/app.js", "/health"))
            facts["status"] = _pick(rnd, ((200, 0.8), (304, 0.07), (404, 0.06), (302, 0.04), (500, 0.03)))
            facts["user_agent"] = rnd.choice(
                ("Mozilla/5.0 (Windows NT 10.0; Win64; x64)", "Mozilla/5.0 (X11; Linux x86_64)", "curl/8.5.0")
            )
        else:
            proto, server_port = rnd.choice(_OTHER_SERVICES)
            server_ip = self._server_ip(v6) if not self.s.lookups else self._looked_up(facts, v6)
        process = {
            "dns": ("svchost.exe", "systemd-resolved", "chrome.exe"),
            "http": ("chrome.exe", "firefox", "curl", "python3"),
            "other": ("ssh", "smbclient", "mstsc.exe", "psql", "chronyd", "chrome.exe"),
        }[service]
        facts["process"] = rnd.choice(process)
        facts["pid"] = rnd.randrange(300, 65_536)
        facts["rule"] = f"r-{rnd.randrange(100, 140)}"
        facts["vpc"], facts["account"] = rnd.choice(self.vpcs)
        while True:
            client_port = rnd.randrange(32_768, 61_000)
            key = self._flow_key(proto, client_ip, client_port, server_ip, server_port)
            if key not in self.used_flows:
                self.used_flows.add(key)
                break
        t0 = self.s.start_s + rnd.random() * self.s.span_s
        blocked = rnd.random() < _BLOCKED_FRACTION
        ses = _Session(
            story, kind, service, proto, client_ip, client_port, server_ip, server_port, t0, client, blocked, facts
        )
        self._figures(ses)
        return ses

    def _looked_up(self, facts: dict[str, Any], v6: bool) -> str:
        """Scenario.lookups: a connection's server, one address of a name (kept in ``facts["name"]``)."""
        name = self.rnd.choice(self.domains)
        facts["name"] = name
        addrs4, addrs6, _ = self.answers[name]
        return self.rnd.choice(addrs6 if v6 else addrs4)

    def lookup(self, story: str, ses: _Session) -> _Session | None:
        """Scenario.lookups: the lookup that precedes connection ``ses`` (5 to 500 ms before it), or None when the
        client still holds an unexpired answer for the name and uses it (half the time)."""
        rnd = self.rnd
        name = ses.facts["name"]
        v6 = ":" in ses.client_ip
        key = (ses.client_ip, name)
        self.lookup_of[ses.story] = (ses.client_ip, ses.server_ip, ses.t0)
        if self.cache.get(key, 0.0) > ses.t0 + 1.0 and rnd.random() < 0.5:
            return None
        addrs4, addrs6, ttl = self.answers[name]
        dns = self.new_session(story, "session")
        dns.service, dns.proto, dns.server_port = "dns", "udp", 53
        dns.client, dns.client_ip = ses.client, ses.client_ip
        dns.server_ip = (
            ("fd00::53" if rnd.random() < 0.5 else "fd00::1:53") if v6 else rnd.choice(("10.0.0.53", "10.0.1.53"))
        )
        while self._flow_key("udp", dns.client_ip, dns.client_port, dns.server_ip, 53) in self.used_flows:
            dns.client_port = rnd.randrange(32_768, 61_000)
        self.used_flows.add(self._flow_key("udp", dns.client_ip, dns.client_port, dns.server_ip, 53))
        dns.t0 = round(ses.t0 - rnd.uniform(0.005, 0.5), 6)
        answer = list(addrs6 if v6 else addrs4)
        dns.facts.update(query=name, rcode="NOERROR", answer=answer, ttl=ttl)
        dns.facts.pop("name", None)
        self._figures(dns)
        return dns

    def record_lookup(self, dns: _Session) -> None:
        """The lookup ``dns`` was written (its resolver's log among its reports): the client holds its answer."""
        f = dns.facts
        self.cache[(dns.client_ip, f["query"])] = dns.t0 + f["ttl"]
        self.looked.setdefault(dns.client_ip, []).append((dns.t0, f["query"], f["answer"], f["ttl"]))

    def expected_names(self) -> dict[str, str]:
        """Scenario.lookups: each connection's right name — the latest lookup of its client before it started whose
        answer holds its server's address and has not expired (another name that shares the address may be it)."""
        out: dict[str, str] = {}
        for story, (client, server, t0) in self.lookup_of.items():
            best: tuple[float, str] | None = None
            for t, name, addrs, ttl in self.looked.get(client, []):
                if t <= t0 <= t + ttl and server in addrs and (best is None or (t, name) > best):
                    best = (t, name)
            if best is not None:
                out[story] = best[1]
        return out

    def _figures(self, ses: _Session) -> None:
        """Draw the session's true bytes and packets per direction (for its service) and reset ``last_s``."""
        rnd = self.rnd
        if ses.service == "dns":
            ses.c2s = (int(rnd.lognormvariate(4.0, 0.3)) + 28, 1)
            ses.s2c = (int(rnd.lognormvariate(4.8, 0.6)) + 28, 1)
        else:
            mu_c2s, mu_s2c = (6.5, 9.0) if ses.service == "http" else (7.5, 8.0)
            b_c2s = int(rnd.lognormvariate(mu_c2s, 1.2 if ses.service == "http" else 1.8)) + 60
            b_s2c = int(rnd.lognormvariate(mu_s2c, 1.8)) + 60
            ses.c2s = (b_c2s, max(1, b_c2s // rnd.randrange(200, 1400)))
            ses.s2c = (b_s2c, max(1, b_s2c // rnd.randrange(200, 1400)))
        ses.last_s = ses.t0 + self.s.spread_s
        if self.s.spans:
            ses.end_s = ses.t0 + min(self.s.max_session_s, rnd.lognormvariate(*_DURATION[ses.service]))
            ses.last_s = max(ses.last_s, ses.end_s)

    def _span(self, ses: _Session) -> tuple[float, float]:
        """A flow record's (start, end): the session's bounds as one sensor measures them (start within half a
        second after the first packet, end within half a second of the last)."""
        t = round(ses.t0 + self.rnd.uniform(0.0, min(self.s.spread_s, 0.5)), 6)
        return t, round(max(t, ses.end_s + self.rnd.uniform(-0.5, 0.5)), 6)

    def reuse(self, story: str, orig: _Session) -> _Session:
        """A later session of ``orig``'s exact 5-tuple, at least ``reuse_gap_s`` after its last report."""
        fresh = self.new_session(story, "reuse")  # new facts; its own (unused) flow is simply left registered
        gap = self.rnd.uniform(self.s.reuse_gap_s, 1.25 * self.s.reuse_gap_s)
        fresh.service, fresh.proto = orig.service, orig.proto
        fresh.client_ip, fresh.client_port = orig.client_ip, orig.client_port
        fresh.server_ip, fresh.server_port = orig.server_ip, orig.server_port
        fresh.client = orig.client
        fresh.t0 = orig.last_s + gap
        self._figures(fresh)  # figures of the reused service, its own
        for k in ("query", "rcode", "answer", "method", "host", "path", "status", "user_agent"):
            if k in orig.facts:
                fresh.facts[k] = orig.facts[k]
            else:
                fresh.facts.pop(k, None)
        return fresh

    def _jitter(self) -> float:
        return self.rnd.uniform(1.0 - _JITTER, 1.0 + _JITTER)

    def _attrs(self, source: str, ses: _Session, rev: bool) -> dict[str, Any]:
        """The attributes of a one-report source (not ``cloud``), ``rev``: the report gives server → client."""
        f = ses.facts
        if source == "firewall":
            jitter = self._jitter()
            (src_b, src_p), (dst_b, dst_p) = (ses.s2c, ses.c2s) if rev else (ses.c2s, ses.s2c)
            return {
                "action": "deny" if ses.blocked else "allow",
                "rule": f["rule"],
                "src_bytes": int(src_b * jitter),
                "dst_bytes": int(dst_b * jitter),
                "src_packets": src_p,
                "dst_packets": dst_p,
                "initiator": "dst" if rev else "src",
            }
        if source == "endpoint":
            return {
                "process": f["process"],
                "pid": f["pid"],
                "user": ses.client.user,
                "host": ses.client.host,
                "initiator": "dst" if rev else "src",
            }
        if source == "dns":
            if "ttl" in f:
                return {"query": f["query"], "answer": list(f["answer"]), "rcode": f["rcode"], "ttl": f["ttl"]}
            return {"query": f["query"], "answer": list(f["answer"]), "rcode": f["rcode"]}
        return {k: f[k] for k in ("method", "host", "path", "status", "user_agent")}

    def _choose_sensors(self, service: str, k: int, *, resolver: bool = False) -> list[tuple[str, str]]:
        """``k`` sensors of a session of ``service``; ``resolver``: a DNS sensor among them (a lookup's)."""
        rnd = self.rnd
        eligible = _ELIGIBLE[service]
        sources = rnd.sample(eligible, min(k, len(eligible)))
        if resolver and "dns" not in sources:
            sources[0] = "dns"
        chosen = [(src, rnd.choice(self.sensors[src])) for src in sources]
        spare = [(src, name) for src in sources for name in self.sensors[src] if (src, name) not in chosen]
        while len(chosen) < k and spare:
            chosen.append(spare.pop(rnd.randrange(len(spare))))
        return chosen

    def _add(
        self,
        source: str,
        sensor: str,
        ses: _Session | None,
        story: str,
        kind: Kind,
        t: float,
        rev: bool,
        attrs: dict[str, Any],
        end: float | None = None,
    ) -> None:
        """Queue one report at true time ``t``; ``end``: the true end of the span a flow record reports (it is
        written, and so arrives, after that end)."""
        s = self.s
        flow: tuple[str, str, int, str, int] | None = None
        if ses is not None:
            if rev:
                flow = (ses.proto, ses.server_ip, ses.server_port, ses.client_ip, ses.client_port)
            else:
                flow = (ses.proto, ses.client_ip, ses.client_port, ses.server_ip, ses.server_port)
        if ses is not None:
            ses.last_s = max(ses.last_s, t if end is None else max(t, end))
        reported_us = round((t + self.skews[sensor]) * 1_000_000)
        written = t if end is None else end
        arrival = round(written - s.start_s + _delay(self.rnd, s.max_arrival_delay_s), 6)
        pending = _Pending(self.order, arrival, t, reported_us, source, sensor, story, kind, rev, flow, attrs)
        if end is not None:
            pending.true_end_s = end
            pending.reported_end_us = round((end + self.skews[sensor]) * 1_000_000)
        self.pending.append(pending)
        self.order += 1

    def emit_session(self, ses: _Session, k: int, extra: int) -> None:
        """Reports of ``k`` sensors of ``ses``; flow-log sensors may write up to ``extra`` records more in all."""
        rnd = self.rnd
        for source, sensor in self._choose_sensors(ses.service, k, resolver="ttl" in ses.facts):
            if source == "cloud":
                extra -= self._emit_flow_log(ses, sensor, extra)
                continue
            end: float | None = None
            if not self.s.spans:
                t = round(ses.t0 + rnd.uniform(0.0, self.s.spread_s), 6)
            elif source == "firewall":
                t, end = self._span(ses)
            elif source == "http":  # a request anywhere in the connection
                t = round(ses.t0 + rnd.uniform(0.0, max(self.s.spread_s, ses.end_s - ses.t0)), 6)
            else:
                t = round(ses.t0 + rnd.uniform(0.0, self.s.spread_s), 6)
            if source == "dns" and "ttl" in ses.facts:  # a lookup's resolver log: the time it answered
                t = round(ses.t0 + rnd.uniform(0.0, 0.01), 6)
            rev = rnd.random() < self.s.reverse_fraction
            self._add(source, sensor, ses, ses.story, ses.kind, t, rev, self._attrs(source, ses, rev), end)

    def _emit_flow_log(self, ses: _Session, sensor: str, extra: int) -> int:
        """One flow-log sensor's records of ``ses``: one per direction it sees, a direction possibly split in
        two. Beyond its first record it writes at most ``extra`` (dropping splits, then the second direction);
        returns how many it wrote beyond the first."""
        rnd, s = self.rnd, self.s
        first_s2c = rnd.random() < 0.5
        directions = [first_s2c] if rnd.random() < _CLOUD_ONE_DIRECTION else [first_s2c, not first_s2c]
        plan: list[tuple[bool, float, int, int, bool]] = []  # s2c, time, jittered bytes, packets, split
        ends: list[float] = []  # with spans: each direction's end
        for s2c in directions:
            b, p = ses.s2c if s2c else ses.c2s
            if s.spans:
                t, end = self._span(ses)
                ends.append(end)
            else:
                t = round(ses.t0 + rnd.uniform(0.0, s.spread_s), 6)
            jb = int(b * self._jitter())
            split = rnd.random() < _CLOUD_SPLIT and p >= 2 and jb >= 2
            plan.append((s2c, t, jb, p, split))
        more = len(plan) - 1 + sum(d[4] for d in plan)
        for i in reversed(range(len(plan))):
            if more > extra and plan[i][4]:
                plan[i] = (*plan[i][:4], False)
                more -= 1
        if more > extra:
            del plan[1:]
            more = 0
        for i, (s2c, t, jb, p, split) in enumerate(plan):
            span_end = ends[i] if s.spans else None
            parts: list[tuple[float, int, int, float | None]] = [(t, jb, p, span_end)]
            if split:
                p1 = rnd.randint(1, p - 1)
                b1 = min(jb - 1, max(1, round(jb * p1 / p)))
                if span_end is None:
                    t2 = round(t + rnd.uniform(*_SPLIT_LATER_S), 6)  # t <= t0 + spread_s
                    parts = [(t, b1, p1, None), (t2, jb - b1, p - p1, None)]
                else:  # two capture windows: the first ends where the second starts
                    cut = round(t + rnd.uniform(0.2, 0.8) * (span_end - t), 6)
                    parts = [(t, b1, p1, cut), (cut, jb - b1, p - p1, span_end)]
            for tp, bp, pp, ep in parts:
                attrs = {
                    "vpc": ses.facts["vpc"],
                    "account": ses.facts["account"],
                    "src_bytes": bp,
                    "src_packets": pp,
                    "action": "REJECT" if ses.blocked else "ACCEPT",
                }
                self._add("cloud", sensor, ses, ses.story, ses.kind, tp, s2c, attrs, ep)
        return more

    def emit_noise(self, story: str) -> None:
        rnd = self.rnd
        if rnd.random() < _FLOWLESS_NOISE_FRACTION:
            client = rnd.choice(self.clients)
            sensor = rnd.choice(self.sensors["endpoint"])
            t = round(self.s.start_s + rnd.random() * self.s.span_s, 6)
            attrs = {
                "process": rnd.choice(("powershell.exe", "cron", "explorer.exe", "bash")),
                "pid": rnd.randrange(300, 65_536),
                "user": client.user,
                "host": client.host,
                "action": rnd.choice(("process_start", "file_write", "login")),
            }
            self._add("endpoint", sensor, None, story, "noise", t, False, attrs)
            return
        ses = self.new_session(story, "noise")
        self.flows[story] = ses.flow_truth()
        self.emit_session(ses, 1, 0)

    def run(self) -> tuple[list[SimEvent], Truth]:
        s, rnd = self.s, self.rnd
        n_noise = round(s.events * s.noise_fraction)
        remaining = s.events - n_noise
        reusable: list[_Session] = []
        n_story = 0
        while remaining > 0:
            story = f"st{s.seed}-{n_story:06d}"
            n_story += 1
            if reusable and rnd.random() < s.port_reuse_fraction:
                ses = self.reuse(story, reusable.pop(rnd.randrange(len(reusable))))
            else:
                ses = self.new_session(story, "session")
                reusable.append(ses)
            self.flows[story] = ses.flow_truth()
            if s.lookups and ses.kind == "session" and "name" in ses.facts:
                dns = self.lookup(f"dq{s.seed}-{n_story:06d}", ses)
                if dns is not None and remaining > 1:
                    self.flows[dns.story] = dns.flow_truth()
                    k = min(remaining - 1, _pick(rnd, _SENSOR_COUNT_WEIGHTS))
                    before = len(self.pending)
                    self.emit_session(dns, k, 0)
                    self.record_lookup(dns)
                    remaining -= len(self.pending) - before
            k = min(remaining, _pick(rnd, _SENSOR_COUNT_WEIGHTS))
            before = len(self.pending)
            self.emit_session(ses, k, remaining - k)
            remaining -= len(self.pending) - before
        for i in range(n_noise):
            self.emit_noise(f"nz{s.seed}-{i:06d}")
        self.pending.sort(key=lambda p: (p.arrival_s, p.order))
        width = max(6, len(str(len(self.pending))))
        out: list[SimEvent] = []
        stories: dict[str, str] = {}
        for i, p in enumerate(self.pending):
            event_id = f"sim{s.seed}-{i:0{width}d}"
            doc: dict[str, Any] = {"source": p.source, "sensor": p.sensor, "id": event_id}
            doc["time"] = p.reported_us / 1_000_000 if p.source in _EPOCH_TIME_SOURCES else _rfc3339(p.reported_us)
            if p.reported_end_us is not None:  # flow records only, which give epoch seconds
                doc["end_time"] = p.reported_end_us / 1_000_000
            if p.flow is not None:
                proto, sip, sport, dip, dport = p.flow
                doc.update(proto=proto, src_ip=sip, src_port=sport, dst_ip=dip, dst_port=dport)
            doc["attrs"] = p.attrs
            line = _encoder.encode(doc)
            out.append(
                SimEvent(
                    line,
                    event_id,
                    p.story,
                    p.arrival_s,
                    p.source,
                    p.sensor,
                    p.true_time_s,
                    p.reversed,
                    p.kind,
                    p.true_end_s,
                )
            )
            stories[event_id] = p.story
        arrivals = {e.id: e.arrival_s for e in out}
        written = {p.story for p in self.pending}
        names = {k: v for k, v in self.expected_names().items() if k in written}
        return out, Truth(
            stories=stories, skews=dict(self.skews), scenario=s, arrivals=arrivals, flows=self.flows, names=names
        )


def generate(s: Scenario | None = None) -> tuple[list[SimEvent], Truth]:
    """The scenario's events, sorted by arrival, and its ground truth. Deterministic for equal settings."""
    return _Generator(s if s is not None else Scenario()).run()


def write(events: list[SimEvent], truth: Truth, out_path: str | Path, truth_path: str | Path) -> None:
    """Write the JSONL (in the list's order, i.e. arrival order; gzip when ``out_path`` ends with ``.gz``) and the
    truth JSON."""
    write_lines([e.line for e in events], truth, out_path, truth_path)


def write_lines(lines: list[bytes], truth: Truth, out_path: str | Path, truth_path: str | Path) -> None:
    """Write lines of any input format (gzip when ``out_path`` ends with ``.gz``) and the truth JSON."""
    data = b"".join(line + b"\n" for line in lines)
    out = Path(out_path)
    if out.suffix == ".gz":
        out.write_bytes(gzip.compress(data, mtime=0))
    else:
        out.write_bytes(data)
    Path(truth_path).write_bytes(truth.to_json())


# -- sessions mode (`storyline synth`): lines only, no ground truth ------------------------------------
def sessions(
    n: int,
    *,
    seed: int = 1,
    start_s: float = 1_764_000_000.0,
    span_s: float = 3_600.0,
    sensor_skew_s: float = 2.0,
    payload_bytes: int = 0,
) -> Iterator[bytes]:
    """JSONL lines for ``n`` sessions, ordered by session start (not by event time)."""
    rnd = random.Random(seed)
    skews = {src: rnd.uniform(-sensor_skew_s, sensor_skew_s) for src in SOURCES}
    for i in range(n):
        t0 = start_s + span_s * i / max(n, 1)
        kind = rnd.random()
        client = f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        server = f"192.0.2.{rnd.randrange(1, 255)}" if rnd.random() < 0.8 else f"2001:db8::{rnd.randrange(1, 9999):x}"
        if ":" in server:
            client = f"fd00::{rnd.randrange(1, 65535):x}"
        if kind < 0.7:
            proto, sport, dport = "tcp", rnd.randrange(1024, 65536), rnd.choice((443, 80, 22, 8443))
        elif kind < 0.95:
            proto, sport, dport = "udp", rnd.randrange(1024, 65536), rnd.choice((53, 123, 443))
        else:
            proto, sport, dport = ("icmp" if ":" not in server else "ipv6-icmp"), 8 if ":" not in server else 128, 0
        k = rnd.randint(1, 4)
        for j, src in enumerate(rnd.sample(SOURCES, k)):
            reverse = proto not in {"icmp", "ipv6-icmp"} and rnd.random() < 0.3
            t = t0 + rnd.uniform(0, 5) + skews[src]
            ev: dict[str, object] = {
                "source": src,
                "sensor": f"{src}-{rnd.randrange(3)}",
                "time": round(t, 6),
                "proto": proto,
                "src_ip": server if reverse else client,
                "src_port": dport if reverse else sport,
                "dst_ip": client if reverse else server,
                "dst_port": sport if reverse else dport,
                "attrs": {"session": i, "seen": j, "bytes": rnd.randrange(40, 1_000_000)},
            }
            if payload_bytes:
                ev["attrs"] = {**ev["attrs"], "blob": "x" * payload_bytes}  # type: ignore[dict-item]
            yield _encoder.encode(ev)
