"""PostgreSQL peer: the relational design Storyline started from, measured on the same events.

The talk's first design (``../shared/seed``): events in a relational database, and a periodic job that runs a
query to find which events tell the same story. This module runs that design as well as we know how on one
PostgreSQL server and measures what Storyline's benchmarks measure: ingest, story building, both at once,
latency, and accuracy against the simulator's truth.

**The server.** Started by this module and stopped by it (``pg_ctl stop`` on its own data directory, which is
then deleted): a fresh ``initdb`` cluster in a temporary directory, listening on 127.0.0.1 only (port 55432,
or a free port when that one is taken), Unix socket in the same temporary directory, ``trust`` authentication
(local only, for the run's lifetime). As root, ``initdb``/``pg_ctl`` run as the ``postgres`` user through
``runuser`` (the server refuses to run as root). Nothing else is touched: no system cluster, no service. When
no PostgreSQL server binaries are found, ``apt-get install -y postgresql`` installs them first (reported as
``installed`` in the output); on Debian the package may also create and start its own ``main`` cluster, which
this module leaves alone. Settings (``SETTINGS``; 2 vCPUs, 24 GiB, the database on the same cores as the
client, as for Storyline's own benchmarks):

* durability: ``fsync = on``, ``full_page_writes = on``, ``synchronous_commit = on`` — a COPY batch is
  acknowledged once its WAL is flushed to disk (stricter than the local Cassandra node of Storyline's benchmarks,
  whose ``commitlog_sync: periodic`` acknowledges before the 10-s fsync; one fsync per 5,000 events costs
  little here);
* memory: ``shared_buffers = 4GB`` (every table and index here fits), ``effective_cache_size = 16GB``,
  ``work_mem = 64MB`` (the job's sorts stay in memory), ``maintenance_work_mem = 1GB``, ``huge_pages = try``;
* WAL: ``wal_buffers = 64MB``, ``max_wal_size = 16GB``, ``min_wal_size = 2GB``, ``checkpoint_timeout =
  30min`` (no checkpoint during a run), ``wal_level = replica`` (the default: what a production server keeps
  for backups and standbys; ``minimal`` would only help tables created in the loading transaction);
* planner: ``jit = off`` (JIT compilation costs more than it saves on a query run every second),
  ``random_page_cost = 1.1`` (SSD), parallel query left at its defaults; autovacuum on (defaults).

**The schema.** ``events`` holds every canonical field of :class:`engine.core.event.Event` (``flow`` is the same
xxh64 flow key, stored as a signed bigint; addresses as ``inet``; ``attrs`` as ``jsonb``) plus ``seq`` (an
identity, the events' compact key) and ``xid`` (the inserting transaction, ``pg_current_xact_id()``), with
indexes on ``(flow, time_us)`` and on ``xid``. There is no unique constraint on the event id: COPY cannot skip
duplicates, so idempotent re-sends would need a staging table and ``INSERT .. ON CONFLICT`` (slower; not done,
which favours PostgreSQL). ``stories`` holds one summary row per story (flow, first/last time, event count,
sorted distinct sources and sensors, bytes/packets totals; lighter than Storyline's fused JSON body: no
per-source attribute merge, no directions), ``story_events`` maps every event to its story.

**Two variants** (``variant``). ``fused`` (the default, and the one ``make bench`` compares Storyline with:
``vs_postgres_ratio``): every story row also carries ``body``, a jsonb with the content of Storyline's fused story
— event ids in (time, id) order, directions, sources, sensors, per-source attributes merged key by key (latest
wins), bytes/packets totals, times, count, the flow and its Community ID (pgcrypto's SHA-1) — rebuilt in SQL
from all of the story's events each time a run touches the story (``STORY_SQL_FUSED``). ``content_check``
compares 500 sampled bodies with Storyline's reference fusion of the same events
(``content_matches_storyline``, 1.0 = all equal). ``lean`` (``vs_postgres_lean_ratio``): the summary rows only
(``STORY_SQL``), the design the talk compared. Both report the server's and the client's CPU per event of the
pipeline phase (``pipeline_server_cpu_us_per_event``, ``pipeline_client_cpu_us_per_event``).

**Ingest.** Events are parsed by :func:`engine.ingest.canonical.parse_line` (exactly Storyline's canonical events) and
encoded as COPY text rows before the clock starts (``prepare_s``, not part of any rate); the timed part is
``COPY events FROM STDIN`` in transactions of 5,000 events (Storyline's ``ingest.batch_lines``), each committed
durably, on ``PRODUCERS`` = 2 connections at once (one per core: about 1.3 x the events/s of one connection
here).

**The story job** (``STORY_SQL``): one SQL statement, run every second, in its own transaction. Link rule as
Storyline's: same flow key, ``|t1 - t2| <= window`` (µs, inclusive), transitive. Transitivity within one flow
key is sessionization: the flow's events sorted by time, a gap of more than the window starts a new story (for
one key the connected components of "within the window" are exactly these runs). Incrementally:

1. *New events* are those whose inserting transaction is visible in this run's snapshot and was not in the
   previous run's (``pg_visible_in_snapshot``; the previous snapshot is kept in ``job_state``, updated by the
   same statement). Unlike a ``seq > last_seq`` watermark this misses nothing when several producers commit
   out of sequence order, and a crash of the job neither loses nor doubles anything (the snapshot advances in
   the transaction that writes the stories).
2. *Touched stories*: stories of the same flow with ``first_us - window <= t <= last_us + window`` for a new
   event ``t`` (a story's events are chained by gaps of at most the window, so this is "some event of the
   story is within the window of t").
3. The touched stories' events (the events of the flow in ``[first_us, last_us]`` that the previous run saw:
   different stories of one flow never interleave, because their events are more than the window apart) and the
   new events are sessionized per flow (``lag``/``sum`` window functions). Stories of the flow that are not
   touched are more than the window away from every event in that set, so the runs found are exact.
4. A run that holds no old story gets a new story id (its smallest ``seq``); a run holding old stories keeps the
   smallest of their ids and the others are deleted (merged). Stories are upserted, new and moved events
   written to ``story_events``. Events without a flow are stories of their own.

**What is measured** (:func:`run`), in one server, each phase on freshly created tables:

* ``ingest_events_per_s``: the durable COPY above, the story job idle.
* ``story_events_per_s`` (and ``story_s``): every event already stored (then ``ANALYZE``, as autovacuum would
  have done by then), one run of the job builds every story.
* ``pipeline_events_per_s``: the producers and the per-second job at once, each on its own connection: events
  divided by the time from the start to the commit of the job run that put the last event in a story. The
  producers go as fast as they can, or at ``producers_rate`` events/s in all, then in batches of a tenth of the
  rate (100..5,000), so that about ten commits a second arrive. The job runs at 1-s ticks; a run that takes
  longer is followed at once by the next (``pipeline_job_runs``, ``pipeline_job_max_s``).
* ``latency_p50/p95/p99_s``: per event, from the commit of its COPY transaction to the commit of the job run
  that wrote its ``story_events`` row — every event, not a sample (a run reports the transaction ids it took
  in; the producers record when each committed), on the client's monotonic clock. A story row is current, not
  final: later events may still extend or merge it (Storyline's ``emit = "updates"`` rather than ``"final"``).
* accuracy of the batch-built stories: ``stories``, and ``precision``/``recall``/``f1``/``exact`` from
  ``engine.tools.accuracy.score`` against the simulator's truth; ``rule_precision``/``rule_recall`` against
  ``engine.tools.accuracy.link_reference`` (the same rule in plain Python: 1.0 means the SQL implements it exactly);
  ``pipeline_matches_batch``: the concurrent run built the same stories.

:func:`selfcheck` (``--selfcheck``) is the adversarial check of the incremental job: chains of events around
the window delivered in random order, so late events bridge and merge stories.

``python -m bench.peers.postgres [--events N] [--seed S] [--window-s W] [--rate R] [--selfcheck]`` prints the
result as JSON. In the main thread a SIGTERM stops the server too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import psycopg

from engine.core.config import from_mapping
from engine.core.errors import InputError
from engine.core.event import Event
from engine.correlate.fuse import fuse_python
from engine.ingest.canonical import ParseRules, parse_line
from engine.tools.accuracy import link_reference, score
from engine.tools.simulate import Scenario, generate

__all__ = ["SETTINGS", "STORY_SQL", "run", "selfcheck"]

BATCH = 5_000  # events per COPY transaction (Storyline's ingest.batch_lines)
PRODUCERS = 2  # COPY connections at once: one per core (2 gave ~1.3 x the events/s of 1 here)
PORT = 55432
SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "20",
    "fsync": "on",
    "full_page_writes": "on",
    "synchronous_commit": "on",
    "wal_level": "replica",
    "shared_buffers": "'4GB'",
    "huge_pages": "try",
    "effective_cache_size": "'16GB'",
    "work_mem": "'64MB'",
    "maintenance_work_mem": "'1GB'",
    "wal_buffers": "'64MB'",
    "max_wal_size": "'16GB'",
    "min_wal_size": "'2GB'",
    "checkpoint_timeout": "'30min'",
    "checkpoint_completion_target": "0.9",
    "jit": "off",
    "random_page_cost": "1.1",
}

SCHEMA_SQL = """
CREATE TABLE events (
    seq bigint GENERATED ALWAYS AS IDENTITY (CACHE 1000),
    id text NOT NULL,
    time_us bigint NOT NULL,
    source text NOT NULL,
    sensor text NOT NULL,
    flow bigint,
    reversed boolean NOT NULL,
    proto smallint,
    src_ip inet,
    src_port integer,
    dst_ip inet,
    dst_port integer,
    attrs jsonb NOT NULL,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX events_flow_time ON events (flow, time_us);
CREATE INDEX events_xid ON events (xid);
CREATE TABLE stories (
    story bigint PRIMARY KEY,
    flow bigint,
    first_us bigint NOT NULL,
    last_us bigint NOT NULL,
    n_events integer NOT NULL,
    sources text[] NOT NULL,
    sensors text[] NOT NULL,
    bytes numeric,
    packets numeric,
    updated timestamptz NOT NULL
);
CREATE INDEX stories_flow ON stories (flow, first_us);
CREATE TABLE story_events (seq bigint PRIMARY KEY, story bigint NOT NULL);
CREATE TABLE job_state (one boolean PRIMARY KEY DEFAULT true CHECK (one), snap pg_snapshot NOT NULL);
INSERT INTO job_state (snap) VALUES (pg_current_snapshot());
"""

COPY_SQL = (
    "COPY events (id, time_us, source, sensor, flow, reversed, proto, src_ip, src_port, dst_ip, dst_port, attrs) "
    "FROM STDIN"
)

# One statement: new events since the previous run's snapshot, the stories they touch, sessionization of both per
# flow, then upsert stories / delete merged ones / write memberships / advance the snapshot. %(w)s = window, µs.
# The two statements share their first and last steps: the snapshots (st), the stories the new events touch
# (touched), the sessionization per flow (g, i), and the writes of merges, memberships and the snapshot.
_ST = """st AS MATERIALIZED (
    SELECT snap AS prev, pg_current_snapshot() AS cur FROM job_state
),
"""
_TOUCHED = """touched AS MATERIALIZED (
    SELECT DISTINCT s.story, s.flow, s.first_us, s.last_us
    FROM n JOIN stories s
      ON s.flow = n.flow AND s.first_us <= n.time_us + %(w)s AND s.last_us >= n.time_us - %(w)s
),
"""
_SESSIONS = """g AS (
    SELECT *, CASE WHEN time_us - lag(time_us) OVER o <= %(w)s THEN 0 ELSE 1 END AS brk
    FROM w WINDOW o AS (PARTITION BY flow ORDER BY time_us, seq)
),
i AS (
    SELECT *, sum(brk) OVER (PARTITION BY flow ORDER BY time_us, seq ROWS UNBOUNDED PRECEDING) AS run FROM g
),
"""
_WRITES = """gone AS (
    DELETE FROM stories s USING touched t
    WHERE s.story = t.story AND NOT EXISTS (SELECT 1 FROM agg a WHERE a.story = t.story)
    RETURNING 1
),
mem_new AS (
    INSERT INTO story_events (seq, story) SELECT seq, story FROM lab WHERE old_story IS NULL RETURNING 1
),
mem_moved AS (
    UPDATE story_events m SET story = l.story FROM lab l
    WHERE l.old_story <> l.story AND m.seq = l.seq
    RETURNING 1
),
adv AS (
    UPDATE job_state SET snap = (SELECT cur FROM st) RETURNING 1
)
SELECT (SELECT count(*) FROM n), (SELECT count(*) FROM ins) + (SELECT count(*) FROM upd), (SELECT count(*) FROM gone),
       (SELECT count(*) FROM mem_new) + (SELECT count(*) FROM mem_moved), (SELECT count(*) FROM adv),
       (SELECT coalesce(array_agg(DISTINCT xid::text), '{}') FROM n)
"""

STORY_SQL = (
    "\nWITH "
    + _ST
    + """n AS MATERIALIZED (
    SELECT seq, flow, time_us, source, sensor, xid,
           CASE WHEN jsonb_typeof(attrs -> 'bytes') = 'number' THEN (attrs ->> 'bytes')::numeric END AS bytes,
           CASE WHEN jsonb_typeof(attrs -> 'packets') = 'number' THEN (attrs ->> 'packets')::numeric END AS packets
    FROM events
    WHERE xid >= (SELECT pg_snapshot_xmin(prev) FROM st) AND NOT pg_visible_in_snapshot(xid, (SELECT prev FROM st))
),
"""
    + _TOUCHED
    + """w AS (
    SELECT seq, flow, time_us, source, sensor, bytes, packets, NULL::bigint AS old_story
    FROM n WHERE flow IS NOT NULL
    UNION ALL
    SELECT o.* FROM touched t CROSS JOIN LATERAL (
        SELECT e.seq, e.flow, e.time_us, e.source, e.sensor,
               CASE WHEN jsonb_typeof(e.attrs -> 'bytes') = 'number' THEN (e.attrs ->> 'bytes')::numeric END,
               CASE WHEN jsonb_typeof(e.attrs -> 'packets') = 'number' THEN (e.attrs ->> 'packets')::numeric END,
               t.story
        FROM events e
        WHERE e.flow = t.flow AND e.time_us BETWEEN t.first_us AND t.last_us
          AND pg_visible_in_snapshot(e.xid, (SELECT prev FROM st))
        OFFSET 0  -- keep it a per-story index lookup whatever the row estimates say
    ) o
),
"""
    + _SESSIONS
    + """lab AS MATERIALIZED (
    SELECT seq, flow, time_us, source, sensor, bytes, packets, old_story,
           coalesce(min(old_story) OVER r, min(seq) OVER r) AS story
    FROM i WINDOW r AS (PARTITION BY flow, run)
    UNION ALL
    SELECT seq, NULL, time_us, source, sensor, bytes, packets, NULL, seq FROM n WHERE flow IS NULL
),
agg AS MATERIALIZED (
    SELECT story, min(flow) AS flow, min(time_us) AS first_us, max(time_us) AS last_us, count(*) AS n_events,
           array_agg(DISTINCT source ORDER BY source) AS sources, array_agg(DISTINCT sensor ORDER BY sensor) AS sensors,
           sum(bytes) AS bytes, sum(packets) AS packets, bool_or(old_story IS NOT NULL) AS known
    FROM lab GROUP BY story
),
ins AS (
    INSERT INTO stories (story, flow, first_us, last_us, n_events, sources, sensors, bytes, packets, updated)
    SELECT story, flow, first_us, last_us, n_events, sources, sensors, bytes, packets, clock_timestamp()
    FROM agg WHERE NOT known
    RETURNING 1
),
upd AS (
    UPDATE stories s SET first_us = a.first_us, last_us = a.last_us, n_events = a.n_events, sources = a.sources,
        sensors = a.sensors, bytes = a.bytes, packets = a.packets, updated = clock_timestamp()
    FROM agg a WHERE a.known AND s.story = a.story
    RETURNING 1
),
"""
    + _WRITES
)

_json = msgspec.json.Encoder()

# The fused variant (issue 16, "a fair peer"): the same job, and each story it writes also gets the content of
# Storyline's fused body as jsonb, built in SQL from all its events: event ids in (time, id) order, directions,
# sources, sensors, per-source attributes merged key by key (the latest event's value wins: Storyline's default
# rule), bytes/packets totals (integers below 2^43, as Storyline), times, event count, the flow as its first
# event with one reports it and its Community ID (SHA-1 via pgcrypto; TCP/UDP/SCTP over IPv4 or IPv6, seed 0:
# the simulator's flows; ICMP and other protocols get none). Each run rewrites the bodies of the stories it
# touched (Storyline's revisions). ``%(w)s`` = window, µs.
FUSED_SCHEMA_SQL = r"""
CREATE EXTENSION IF NOT EXISTS pgcrypto;
ALTER TABLE stories ADD COLUMN body jsonb;
CREATE OR REPLACE FUNCTION ip_bytes(ip inet) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT substring(inet_send(ip) FROM 5) $$;
CREATE OR REPLACE FUNCTION port_bytes(p integer) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT substring(int4send(p) FROM 3) $$;
CREATE OR REPLACE FUNCTION community_id(p smallint, sip inet, sport integer, dip inet, dport integer)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN family(sip) = family(dip) AND p IN (6, 17, 132) AND sport IS NOT NULL AND dport IS NOT NULL
    THEN '1:' || encode(digest(
            '\x0000'::bytea
            || CASE WHEN sip < dip OR (sip = dip AND sport <= dport)
                    THEN ip_bytes(sip) || ip_bytes(dip) ELSE ip_bytes(dip) || ip_bytes(sip) END
            || substring(int4send(p) FROM 4) || '\x00'::bytea
            || CASE WHEN sip < dip OR (sip = dip AND sport <= dport)
                    THEN port_bytes(sport) || port_bytes(dport) ELSE port_bytes(dport) || port_bytes(sport) END,
            'sha1'), 'base64')
    END
$$;
"""

_TOTAL = (
    "CASE WHEN jsonb_typeof({a} -> '{k}') = 'number' AND ({a} ->> '{k}') ~ '^-?[0-9]+$' "
    "AND abs(({a} ->> '{k}')::numeric) < 8796093022208 THEN ({a} ->> '{k}')::numeric END"
)
STORY_SQL_FUSED = (
    "\nWITH "
    + _ST
    + """n AS MATERIALIZED (
    SELECT seq, id, flow, time_us, source, sensor, reversed, proto, src_ip, src_port, dst_ip, dst_port, attrs, xid,
           {n_bytes} AS bytes, {n_packets} AS packets
    FROM events
    WHERE xid >= (SELECT pg_snapshot_xmin(prev) FROM st) AND NOT pg_visible_in_snapshot(xid, (SELECT prev FROM st))
),
""".format(n_bytes=_TOTAL.format(a="attrs", k="bytes"), n_packets=_TOTAL.format(a="attrs", k="packets"))
    + _TOUCHED
    + """w AS (
    SELECT seq, id, flow, time_us, source, sensor, reversed, proto, src_ip, src_port, dst_ip, dst_port, attrs,
           bytes, packets, NULL::bigint AS old_story
    FROM n WHERE flow IS NOT NULL
    UNION ALL
    SELECT o.* FROM touched t CROSS JOIN LATERAL (
        SELECT e.seq, e.id, e.flow, e.time_us, e.source, e.sensor, e.reversed, e.proto, e.src_ip, e.src_port,
               e.dst_ip, e.dst_port, e.attrs, {e_bytes}, {e_packets}, t.story
        FROM events e
        WHERE e.flow = t.flow AND e.time_us BETWEEN t.first_us AND t.last_us
          AND pg_visible_in_snapshot(e.xid, (SELECT prev FROM st))
        OFFSET 0  -- keep it a per-story index lookup whatever the row estimates say
    ) o
),
""".format(e_bytes=_TOTAL.format(a="e.attrs", k="bytes"), e_packets=_TOTAL.format(a="e.attrs", k="packets"))
    + _SESSIONS
    + """lab AS MATERIALIZED (
    SELECT seq, id, flow, time_us, source, sensor, reversed, proto, src_ip, src_port, dst_ip, dst_port, attrs,
           bytes, packets, old_story, coalesce(min(old_story) OVER r, min(seq) OVER r) AS story
    FROM i WINDOW r AS (PARTITION BY flow, run)
    UNION ALL
    SELECT seq, id, NULL, time_us, source, sensor, reversed, proto, src_ip, src_port, dst_ip, dst_port, attrs,
           bytes, packets, NULL, seq
    FROM n WHERE flow IS NULL
),
src AS MATERIALIZED (
    SELECT l.story, l.source,
           coalesce(jsonb_object_agg(kv.key, kv.value ORDER BY l.time_us, l.id) FILTER (WHERE kv.key IS NOT NULL),
                    '{}'::jsonb) AS merged
    FROM lab l LEFT JOIN LATERAL jsonb_each(l.attrs) kv ON true
    GROUP BY l.story, l.source
),
per_story_attrs AS MATERIALIZED (
    SELECT story, jsonb_object_agg(source, merged) AS attrs FROM src GROUP BY story
),
agg AS MATERIALIZED (
    SELECT story, min(flow) AS flow, min(time_us) AS first_us, max(time_us) AS last_us, count(*) AS n_events,
           array_agg(DISTINCT source ORDER BY source) AS sources, array_agg(DISTINCT sensor ORDER BY sensor) AS sensors,
           sum(bytes) AS bytes, sum(packets) AS packets, bool_or(old_story IS NOT NULL) AS known,
           jsonb_agg(id ORDER BY time_us, id) AS event_ids,
           jsonb_object_agg(id, CASE WHEN reversed THEN 'b->a' ELSE 'a->b' END) AS directions,
           (array_agg(ARRAY[proto::text, src_ip::text, src_port::text, dst_ip::text, dst_port::text,
                            reversed::text] ORDER BY time_us, id) FILTER (WHERE flow IS NOT NULL))[1:1] AS f
    FROM lab GROUP BY story
),
fused AS MATERIALIZED (
    SELECT a.*, jsonb_build_object(
        'story_id', a.story::text,
        'community_id', community_id(f.proto, f.sip, f.sport, f.dip, f.dport),
        'flow', CASE WHEN f.proto IS NOT NULL THEN jsonb_build_object(
            'proto', f.proto,
            'a', CASE WHEN f.rev THEN jsonb_build_object('ip', host(f.dip), 'port', f.dport)
                      ELSE jsonb_build_object('ip', host(f.sip), 'port', f.sport) END,
            'b', CASE WHEN f.rev THEN jsonb_build_object('ip', host(f.sip), 'port', f.sport)
                      ELSE jsonb_build_object('ip', host(f.dip), 'port', f.dport) END) END,
        'first_seen', a.first_us, 'last_seen', a.last_us, 'event_count', a.n_events,
        'event_ids', a.event_ids, 'sources', to_jsonb(a.sources), 'sensors', to_jsonb(a.sensors),
        'directions', a.directions, 'attrs', p.attrs,
        'totals', jsonb_strip_nulls(jsonb_build_object('bytes', a.bytes, 'packets', a.packets))
    ) AS body
    FROM agg a JOIN per_story_attrs p USING (story)
    LEFT JOIN LATERAL (
        SELECT a.f[1][1]::smallint AS proto, a.f[1][2]::inet AS sip, a.f[1][3]::integer AS sport,
               a.f[1][4]::inet AS dip, a.f[1][5]::integer AS dport, a.f[1][6]::boolean AS rev
    ) f ON true
),
ins AS (
    INSERT INTO stories (story, flow, first_us, last_us, n_events, sources, sensors, bytes, packets, updated, body)
    SELECT story, flow, first_us, last_us, n_events, sources, sensors, bytes, packets, clock_timestamp(), body
    FROM fused WHERE NOT known
    RETURNING 1
),
upd AS (
    UPDATE stories s SET first_us = a.first_us, last_us = a.last_us, n_events = a.n_events, sources = a.sources,
        sensors = a.sensors, bytes = a.bytes, packets = a.packets, updated = clock_timestamp(), body = a.body
    FROM fused a WHERE a.known AND s.story = a.story
    RETURNING 1
),
"""
    + _WRITES
)
VARIANTS = ("fused", "lean")
"""``fused``: stories carry Storyline's body content (STORY_SQL_FUSED); ``lean``: summary rows only (STORY_SQL)."""


class JobRun(msgspec.Struct, frozen=True):
    new_events: int
    stories_written: int
    merged: int
    memberships: int
    xids: list[str]
    seconds: float
    done_at: float  # time.perf_counter() after the commit


# --- the server -----------------------------------------------------------------------------------------------


def _server_bindir() -> Path | None:
    found: list[tuple[int, Path]] = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if (d / "initdb").exists() and (d / "pg_ctl").exists() and d.parent.name.isdigit():
            found.append((int(d.parent.name), d))
    if found:
        return max(found)[1]
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    return None


def ensure_postgres() -> tuple[Path, str]:
    """The directory of ``initdb``/``pg_ctl``, installing Debian's ``postgresql`` package when there is none."""
    bindir = _server_bindir()
    if bindir is not None:
        return bindir, "already present"
    apt = shutil.which("apt-get")
    if apt is None:
        raise SystemExit("PostgreSQL server binaries not found and apt-get is not available: install PostgreSQL")
    print("PostgreSQL server not found: installing it with apt-get install -y postgresql", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "update", "-q"], check=True, env=env, stdout=sys.stderr)  # noqa: S603 - fixed arguments
    subprocess.run([apt, "install", "-y", "-q", "postgresql"], check=True, env=env, stdout=sys.stderr)  # noqa: S603
    bindir = _server_bindir()
    if bindir is None:
        raise SystemExit("apt-get installed postgresql but initdb/pg_ctl are still not found")
    return bindir, "installed now by apt-get install -y postgresql"


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free TCP port on 127.0.0.1")


class Server:
    """One PostgreSQL server in its own temporary directory; :meth:`stop` stops it and deletes the directory."""

    def __init__(self, bindir: Path, port: int = PORT) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="storyline-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port(port)
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603 - our fixed commands
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C")
        conf = {**SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.root}'"}
        with (self.data / "postgresql.conf").open("a") as f:
            f.write("\n# storyline bench.peers.postgres\n")
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def stop(self) -> None:
        """Stop the server started on this data directory (if any), then delete the directory."""
        pidfile = self.data / "postmaster.pid"
        for mode in ("fast", "immediate"):
            if not pidfile.exists():
                break
            with contextlib.suppress(RuntimeError):
                self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        if pidfile.exists():
            print(f"warning: the PostgreSQL server of {self.data} did not stop; left in place", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def server(port: int = PORT) -> Iterator[tuple[Server, str]]:
    """A started :class:`Server` (and how its binaries were found), stopped on exit; in the main thread a
    SIGTERM becomes ``SystemExit`` meanwhile so the server is stopped then too."""
    bindir, installed = ensure_postgres()
    srv = Server(bindir, port)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        srv.start()
        yield srv, installed
    finally:
        srv.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# --- the data ---------------------------------------------------------------------------------------------------


def _text(value: str) -> str:
    """A value in COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _opt(value: object) -> str:
    return "\\N" if value is None else str(value)


def copy_row(e: Event) -> bytes:
    """One events row in COPY text format (the columns of ``COPY_SQL``)."""
    flow = None if e.flow is None else (e.flow - (1 << 64) if e.flow >= 1 << 63 else e.flow)
    attrs = _json.encode(e.attrs).decode()
    fields = (
        _text(e.id),
        str(e.time_us),
        _text(e.source),
        _text(e.sensor),
        _opt(flow),
        "t" if e.reversed else "f",
        _opt(e.proto),
        _opt(e.src_ip),
        _opt(e.src_port),
        _opt(e.dst_ip),
        _opt(e.dst_port),
        _text(attrs),
    )
    return ("\t".join(fields) + "\n").encode()


def make_batches(rows: list[bytes], size: int) -> list[tuple[int, bytes]]:
    return [(len(rows[i : i + size]), b"".join(rows[i : i + size])) for i in range(0, len(rows), size)]


# --- the measurements -------------------------------------------------------------------------------------------


def create_schema(conninfo: str, variant: str = "lean") -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS events, stories, story_events, job_state")
        conn.execute(SCHEMA_SQL)
        if variant == "fused":
            conn.execute(FUSED_SCHEMA_SQL)


def copy_batch(conn: psycopg.Connection, data: bytes) -> str:
    """COPY one batch in one transaction; returns the transaction id (text) after the commit."""
    with conn.cursor() as cur:
        with cur.copy(COPY_SQL) as cp:
            cp.write(data)
        cur.execute("SELECT pg_current_xact_id()::text")
        row = cur.fetchone()
    conn.commit()
    assert row is not None
    return str(row[0])


def produce(
    conninfo: str,
    batches: list[tuple[int, bytes]],
    rate: float | None = None,
    committed: dict[str, tuple[int, float]] | None = None,
) -> float:
    """COPY ``batches`` on ``PRODUCERS`` connections (batches dealt round-robin), one durable transaction per
    batch, each connection paced at its share of ``rate`` events/s when given. Records ``xid -> (events, commit
    time)`` in ``committed``. Returns the seconds until every batch is committed."""
    errors: list[BaseException] = []
    lanes = [batches[i::PRODUCERS] for i in range(PRODUCERS)]
    share = rate / PRODUCERS if rate else None
    t0 = time.perf_counter()

    def lane(mine: list[tuple[int, bytes]]) -> None:
        try:
            with psycopg.connect(conninfo) as conn:
                sent = 0
                for n, data in mine:
                    if share:
                        wait = t0 + sent / share - time.perf_counter()
                        if wait > 0:
                            time.sleep(wait)
                    xid = copy_batch(conn, data)
                    if committed is not None:
                        committed[xid] = (n, time.perf_counter())
                    sent += n
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lane, args=(mine,), name=f"pg-producer-{i}") for i, mine in enumerate(lanes)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def story_job(conn: psycopg.Connection, window_us: int, variant: str = "lean") -> JobRun:
    """One run of the story job (autocommit: the statement is its own transaction)."""
    t0 = time.perf_counter()
    sql = STORY_SQL_FUSED if variant == "fused" else STORY_SQL
    row = conn.execute(sql, {"w": window_us}, prepare=False).fetchone()
    done = time.perf_counter()
    assert row is not None
    return JobRun(int(row[0]), int(row[1]), int(row[2]), int(row[3]), list(row[5]), done - t0, done)


def predicted_stories(conninfo: str) -> dict[str, str]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT e.id, m.story FROM story_events m JOIN events e USING (seq)").fetchall()
    return {str(eid): str(story) for eid, story in rows}


def count_stories(conninfo: str) -> int:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SELECT count(*) FROM stories").fetchone()
    assert row is not None
    return int(row[0])


_COMPARED = (
    "community_id",
    "flow",
    "first_seen",
    "last_seen",
    "event_count",
    "event_ids",
    "sources",
    "sensors",
    "directions",
    "attrs",
    "totals",
)


def content_check(conninfo: str, predicted: dict[str, str], events: dict[str, Event], sample: int = 500) -> float:
    """The share of (up to ``sample``) stories whose SQL-built body has the content Storyline's reference fusion
    (:func:`engine.correlate.fuse.fuse_python`) gives for the same events: every field of :data:`_COMPARED`."""
    members: dict[str, list[Event]] = {}
    for eid, story in predicted.items():
        members.setdefault(story, []).append(events[eid])
    chosen = random.Random(1).sample(sorted(members), min(sample, len(members)))
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT story::text, body FROM stories WHERE story = ANY(%s)", ([int(c) for c in chosen],))
        bodies = {str(k): v for k, v in rows.fetchall()}
    differ: list[tuple[str, list[str]]] = []
    for story in chosen:
        ref = msgspec.to_builtins(fuse_python(members[story], (story, 1, True, False, None)))
        body = bodies.get(story) or {}
        diff = [k for k in _COMPARED if body.get(k) != ref.get(k, {} if k == "totals" else None)]
        if diff:
            differ.append((story, diff))
    for story, diff in differ[:3]:  # what differs, not just how many
        print(f"content_check: story {story} differs in {diff}", file=sys.stderr)
    return 1 - len(differ) / max(len(chosen), 1)


def server_cpu_s(srv: Server) -> float | None:
    """CPU seconds (user + system) the server has used: the postmaster, its live backends, and the backends it
    has reaped (their time is in the postmaster's children figures). None when it cannot be read."""
    try:
        pid = int((srv.data / "postmaster.pid").read_text().split()[0])
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return float(total)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def pipeline(
    conninfo: str, batches: list[tuple[int, bytes]], window_us: int, rate: float | None, variant: str = "lean"
) -> tuple[float, list[float], list[JobRun]]:
    """The producers (:func:`produce`) and the per-second story job, concurrently, on an empty database.
    Returns (seconds from the start to the commit of the job run that completed the last event, the latency of
    every event, the job runs)."""
    total = sum(n for n, _ in batches)
    committed: dict[str, tuple[int, float]] = {}
    producer_done = threading.Event()
    errors: list[BaseException] = []
    t0 = time.perf_counter()

    def producers() -> None:
        try:
            produce(conninfo, batches, rate, committed)
        except BaseException as exc:
            errors.append(exc)
        finally:
            producer_done.set()

    thread = threading.Thread(target=producers, name="pg-producers")
    thread.start()
    runs: list[JobRun] = []
    done_events = 0
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            tick = t0 + 1.0
            while done_events < total and not errors:
                wait = tick - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                finished = producer_done.is_set()
                r = story_job(conn, window_us, variant)
                runs.append(r)
                done_events += r.new_events
                tick = max(tick + 1.0, time.perf_counter())
                if finished and r.new_events == 0 and done_events < total:
                    raise RuntimeError(f"story job idle with {done_events}/{total} events processed")
    finally:
        thread.join()
    if errors:
        raise errors[0]
    latencies: list[float] = []
    for r in runs:
        for xid in r.xids:
            n, at = committed[xid]
            latencies.extend([r.done_at - at] * n)
    latencies.sort()
    return runs[-1].done_at - t0, latencies, runs


def run(
    n_events: int = 200_000,
    seed: int = 1,
    window_s: float = 30.0,
    producers_rate: float | None = None,
    variant: str = "fused",
) -> dict[str, float | str]:
    """Measure the PostgreSQL design on ``n_events`` simulated events; see the module docstring for each key.
    ``variant``: :data:`VARIANTS`."""
    if n_events < 1:
        raise ValueError(f"n_events: {n_events} must be >= 1")
    if variant not in VARIANTS:
        raise ValueError(f"variant: {variant!r} is not one of {VARIANTS}")
    out: dict[str, float | str] = {"peer": "postgresql", "variant": variant, "events": float(n_events)}
    window_us = round(window_s * 1_000_000)
    t = time.perf_counter()
    events, truth = generate(Scenario(events=n_events, seed=seed, start_s=time.time() - 3600, span_s=600))
    cfg = from_mapping({"tenant": "bench_pg", "store": {"backend": "embedded", "path": ":memory:"}})
    now_ms = int(time.time() * 1000)
    rows: list[bytes] = []
    parsed: dict[str, Event] = {}
    rejected = 0
    rules = ParseRules.from_config(cfg)
    for ev in events:
        try:
            e = parse_line(ev.line, rules, now_ms)
        except InputError:
            rejected += 1
            continue
        rows.append(copy_row(e))
        parsed[e.id] = e
    batches = make_batches(rows, BATCH)
    out["prepare_s"] = time.perf_counter() - t
    out["rejected"] = float(rejected)
    out["bytes_per_row"] = sum(len(d) for _, d in batches) / max(len(rows), 1)
    t = time.perf_counter()
    with server() as (srv, installed):
        out["setup_s"] = time.perf_counter() - t
        out["installed"] = installed
        info = srv.conninfo()
        with psycopg.connect(info) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        out["pg_version"] = str(version[0]) if version else "?"
        out["psycopg"] = f"{psycopg.__version__} ({psycopg.pq.__impl__})"
        out["config"] = ", ".join(f"{k}={v.strip(chr(39))}" for k, v in SETTINGS.items() if k != "listen_addresses")

        # (a) ingest, then (b) one job run over everything already stored.
        create_schema(info, variant)
        seconds = produce(info, batches)
        out["ingest_events_per_s"] = len(rows) / seconds
        with psycopg.connect(info, autocommit=True) as conn:
            conn.execute("ANALYZE events")
            job = story_job(conn, window_us, variant)
        out["story_events_per_s"] = job.new_events / job.seconds
        out["story_s"] = job.seconds
        out["stories"] = float(count_stories(info))
        predicted = predicted_stories(info)
        s = score(predicted, truth.stories)
        out.update(precision=s["precision"], recall=s["recall"], f1=s["f1"], exact=s["exact"])
        out["true_stories"] = s["stories"]
        ref = score(predicted, link_reference(events, window_s))
        out["rule_precision"], out["rule_recall"] = ref["precision"], ref["recall"]
        if variant == "fused":
            out["content_matches_storyline"] = content_check(info, predicted, parsed)

        # (c) + (d): producer and per-second job concurrently, on an empty database.
        create_schema(info, variant)
        # Paced producers commit about ten times a second in all (a rate-limited source flushes smaller batches).
        size = BATCH if not producers_rate else max(100, min(BATCH, round(producers_rate / 10)))
        out["pipeline_batch"] = float(size)
        server0, client0 = server_cpu_s(srv), time.process_time()
        seconds, latencies, runs = pipeline(info, make_batches(rows, size), window_us, producers_rate, variant)
        server1, client_s = server_cpu_s(srv), time.process_time() - client0
        # CPU per event of the pipeline phase: the server's (every backend: COPY and the job) and this client's
        # (the COPY producers and the job loop; the rows were encoded before the clock started).
        if server0 is not None and server1 is not None:
            out["pipeline_server_cpu_us_per_event"] = (server1 - server0) / len(rows) * 1e6
        out["pipeline_client_cpu_us_per_event"] = client_s / len(rows) * 1e6
        out["producers_rate"] = "max" if not producers_rate else float(producers_rate)
        out["pipeline_events_per_s"] = len(rows) / seconds
        out["pipeline_job_runs"] = float(len(runs))
        out["pipeline_job_max_s"] = max(r.seconds for r in runs)
        out["latency_p50_s"] = _percentile(latencies, 0.50)
        out["latency_p95_s"] = _percentile(latencies, 0.95)
        out["latency_p99_s"] = _percentile(latencies, 0.99)
        out["pipeline_stories"] = float(count_stories(info))
        same = _partition(predicted_stories(info)) == _partition(predicted)
        out["pipeline_matches_batch"] = "yes" if same else "no"
    return out


def _rows(n_events: int, seed: int, start_s: float, span_s: float) -> list[bytes]:
    """COPY rows of ``n_events`` simulated events (parsed as Storyline's producer parses them; rejects skipped)."""
    events, _ = generate(Scenario(events=n_events, seed=seed, start_s=start_s, span_s=span_s))
    rules = ParseRules.from_config(from_mapping({"tenant": "bench_pg", "store": {"backend": "embedded"}}))
    now_ms = int(time.time() * 1000)
    rows: list[bytes] = []
    for ev in events:
        try:
            rows.append(copy_row(parse_line(ev.line, rules, now_ms)))
        except InputError:
            continue
    return rows


def growth(
    n_events: int,
    prior_chunks: list[tuple[int, int, float, float]],
    *,
    span_s: float,
    seed: int = 1,
    window_s: float = 30.0,
    variant: str = "fused",
) -> dict[str, Any]:
    """The pipeline phase (producers and the per-second job together) on ``n_events`` events from an hour ago
    over ``span_s``, on a database that already holds the ``prior_chunks`` (``bench.growth``: (events, seed,
    start_s, span_s) each) with their stories built: each chunk COPYed, then run through the story job. Cost =
    the server's CPU + this client's CPU per measured event."""
    window_us = round(window_s * 1_000_000)
    rows = _rows(n_events, seed, time.time() - 3_600, span_s)
    prior_events = sum(n for n, _, _, _ in prior_chunks)
    out: dict[str, Any] = {"peer": "postgresql", "variant": variant, "prior_events": prior_events, "events": len(rows)}
    with server() as (srv, _installed):
        info = srv.conninfo()
        create_schema(info, variant)
        t = time.perf_counter()
        for n, chunk_seed, start_s, chunk_span_s in prior_chunks:
            produce(info, make_batches(_rows(n, chunk_seed, start_s, chunk_span_s), BATCH))
            with psycopg.connect(info, autocommit=True) as conn:
                conn.execute("ANALYZE events")
                story_job(conn, window_us, variant)
        if prior_events:
            out["prior_load_s"] = time.perf_counter() - t
            with psycopg.connect(info, autocommit=True) as conn:
                size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            out["prior_database_bytes"] = int(size[0]) if size else None
        server0, client0 = server_cpu_s(srv), time.process_time()
        seconds, latencies, runs = pipeline(info, make_batches(rows, BATCH), window_us, None, variant)
        server1, client_s = server_cpu_s(srv), time.process_time() - client0
    server_us = None if server0 is None or server1 is None else (server1 - server0) / len(rows) * 1e6
    client_us = client_s / len(rows) * 1e6
    out.update(
        pipeline_events_per_s=len(rows) / seconds,
        server_cpu_us_per_event=server_us,
        client_cpu_us_per_event=client_us,
        cost_us_per_event=client_us + (server_us or 0.0),
        job_runs=len(runs),
        job_max_s=max(r.seconds for r in runs),
        latency_p99_s=_percentile(latencies, 0.99),
    )
    return out


def selfcheck(seed: int = 7, window_s: float = 30.0) -> dict[str, float | str]:
    """An adversarial check of the incremental job: chains of events per flow with gaps around the window (equal to
    it, one µs over, far over), flowless events, all delivered in random order in random batches with a job run
    after each, so late events extend, bridge and merge stories. The job's stories must equal the plain
    sessionization of every flow, and every ``stories`` row must agree with its members."""
    rnd = random.Random(seed)
    w = round(window_s * 1_000_000)
    base = int(time.time() * 1_000_000) - 36_000_000_000
    evs: list[Event] = []
    for _ in range(300):
        flow, t = rnd.getrandbits(64), base + rnd.randrange(1_000_000_000)
        for _ in range(rnd.randint(1, 40)):
            t += rnd.choice((rnd.randint(0, w), rnd.randint(0, w), w, w + 1, rnd.randint(w + 1, 3 * w)))
            evs.append(
                Event(f"e{len(evs)}", t, rnd.choice("abc"), "s", flow, False, 6, "10.0.0.1", 1, "10.0.0.2", 2, {})
            )
    evs += [Event(f"x{k}", base, "endpoint", "s", None, False, None, None, None, None, None, {}) for k in range(50)]
    expected: dict[str, str] = {}
    by_flow: dict[int, list[Event]] = {}
    for e in evs:
        if e.flow is None:
            expected[e.id] = e.id
        else:
            by_flow.setdefault(e.flow, []).append(e)
    for members in by_flow.values():
        members.sort(key=lambda e: e.time_us)
        head, last = members[0].id, members[0].time_us
        for e in members:
            if e.time_us - last > w:
                head = e.id
            expected[e.id], last = head, e.time_us
    rnd.shuffle(evs)
    rows = [copy_row(e) for e in evs]
    merged = 0
    with server() as (srv, _):
        info = srv.conninfo()
        create_schema(info)
        with psycopg.connect(info) as prod, psycopg.connect(info, autocommit=True) as job:
            i = 0
            while i < len(rows):
                k = rnd.randint(1, 60)
                copy_batch(prod, b"".join(rows[i : i + k]))
                i += k
                merged += story_job(job, w).merged
            row = job.execute(
                "SELECT count(*) FROM stories s FULL JOIN (SELECT m.story, count(*) AS n, min(e.time_us) AS f,"
                " max(e.time_us) AS l FROM story_events m JOIN events e USING (seq) GROUP BY m.story) x USING (story)"
                " WHERE x.n IS DISTINCT FROM s.n_events OR x.f IS DISTINCT FROM s.first_us"
                " OR x.l IS DISTINCT FROM s.last_us"
            ).fetchone()
        bad_rows = int(row[0]) if row else -1
        same = _partition(predicted_stories(info)) == _partition(expected)
    return {
        "events": float(len(evs)),
        "stories": float(len(set(expected.values()))),
        "merges": float(merged),
        "inconsistent_story_rows": float(bad_rows),
        "stories_equal_sessionization": "yes" if same else "no",
    }


def _partition(mapping: dict[str, str]) -> set[frozenset[str]]:
    groups: dict[str, set[str]] = {}
    for item, key in mapping.items():
        groups.setdefault(key, set()).add(item)
    return {frozenset(g) for g in groups.values()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.peers.postgres", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--window-s", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=None, help="producer rate in events/s (default: as fast as it can)")
    ap.add_argument("--variant", choices=VARIANTS, default="fused", help="fused: Storyline's story content; lean")
    ap.add_argument("--selfcheck", action="store_true", help="run the adversarial merge check instead (selfcheck)")
    args = ap.parse_args(argv)
    if args.rate is not None and not args.rate > 0:
        ap.error("--rate must be > 0")
    if args.selfcheck:
        result = selfcheck(window_s=args.window_s)
        print(json.dumps(result, indent=1))
        sys.exit(0 if result["stories_equal_sessionization"] == "yes" and result["inconsistent_story_rows"] == 0 else 1)
    result = run(args.events, args.seed, args.window_s, args.rate, args.variant)
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
