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
attribute merge, no client/server, no observers), ``story_events`` maps every event to its story.

**Two variants** (``variant``). ``fused`` (the default, and the one ``make bench`` compares Storyline with:
``vs_postgres_ratio``): every story row also carries ``body``, a jsonb with the content of Storyline's fused story,
version 2 (:mod:`engine.correlate.body`) — start/end (RFC 3339 and µs), duration, event count, event ids in
(time, id) order; for a story with a flow its Community ID (pgcrypto's SHA-1), protocol and transport name,
client and server decided as Storyline decides them (the sensors' ``initiator`` votes, else the service-port
classes, else the earliest report's source: ``initiator_known``, ``initiator_rule``) and the reconciled
bytes/packets totals (per direction the largest observer's, total the larger of the largest observer total and
the two directions added up); and one observer per sensor (by name: source, first/last time, events, for a flow
the direction it reports and its per-direction byte/packet sums, its attributes merged key by key, latest wins)
— rebuilt in SQL from all of the story's events each time a run touches the story (``STORY_SQL_FUSED``).
``content_check`` compares 500 sampled bodies with Storyline's reference fusion of the same events
(``content_matches_storyline``, 1.0 = every compared field of every sampled story equal). ``lean``
(``vs_postgres_lean_ratio``): the summary rows only (``STORY_SQL``), the design the talk compared. Both report
the server's and the client's CPU per event of the pipeline phase (``pipeline_server_cpu_us_per_event``,
``pipeline_client_cpu_us_per_event``).

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
from engine.correlate.body import transport_name
from engine.correlate.fuse import FIGURE_ATTRS, TOTAL_LIMIT, fuse_python
from engine.ingest.canonical import ParseRules, parse_line
from engine.ingest.network_identity import ICMP4_COUNTERPART, ICMP6_COUNTERPART
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

# The fused variant (issue 16, "a fair peer"; body version 2 since issue 17): the same job, and each story it
# writes also gets the content of Storyline's fused body (engine.correlate.body, as fuse_python builds it) as
# jsonb, built in SQL from all its events, set-based: one aggregate per story (times, count, event ids in (time,
# id) order, the sensors' initiator vote, the earliest report), the client/server decision per story, one
# aggregate per (story, sensor) — the observer: its attributes merged key by key in (time, id) order, the latest
# value winning (Storyline's default rule: ``jsonb_merge``, jsonb's ``||`` folded), its byte/packet figures
# summed per direction of the flow's order (integers below 2^43, as Storyline), mapped to client/server once the
# story's client is known — then the observers and reconciled totals per story, and the body. The Community ID
# is pgcrypto's SHA-1 (seed 0, as the content check's reference: every protocol, ICMP type/code mapping as
# engine.ingest.network_identity). Absent optional fields are left out, as msgspec's ``omit_defaults`` does. The
# observers and the body are assembled as JSON text (names through ``to_json``, attributes as jsonb prints them)
# and cast to jsonb once — as Storyline assembles its bodies; nested jsonb_build_object calls with
# jsonb_strip_nulls (nulls inside attributes must stay) cost about a quarter more on the whole job.
# Each run rewrites the bodies of the stories it touched (Storyline's revisions). ``%(w)s`` = window, µs.
_PORT_PROTOS = "1, 6, 17, 58, 132"  # protocols whose ports (ICMP: type and code) are part of the Community ID


def _counterparts(table: dict[int, int]) -> str:
    return "CASE t " + " ".join(f"WHEN {k} THEN {v}" for k, v in sorted(table.items())) + " END"


FUSED_SCHEMA_SQL = (
    r"""
CREATE EXTENSION IF NOT EXISTS pgcrypto;
ALTER TABLE stories ADD COLUMN body jsonb;
DROP TYPE IF EXISTS flow_report CASCADE;
CREATE TYPE flow_report AS (proto smallint, sip inet, sport integer, dip inet, dport integer, rev boolean);
CREATE OR REPLACE AGGREGATE jsonb_merge (jsonb) (SFUNC = jsonb_concat, STYPE = jsonb, INITCOND = '{}');
CREATE OR REPLACE FUNCTION port_class(p integer) RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN p < 1024 THEN 0 WHEN p < 32768 THEN 1 ELSE 2 END $$;
CREATE OR REPLACE FUNCTION rfc3339(us bigint) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS
$$ SELECT to_char(timestamp '1970-01-01' + us * interval '1 microsecond', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') $$;
CREATE OR REPLACE FUNCTION ip_bytes(ip inet) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT substring(inet_send(ip) FROM 5) $$;
CREATE OR REPLACE FUNCTION port_bytes(p integer) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT substring(int4send(p) FROM 3) $$;
CREATE OR REPLACE FUNCTION icmp_counterpart(p smallint, t integer) RETURNS integer LANGUAGE sql IMMUTABLE
PARALLEL SAFE AS $$ SELECT CASE p WHEN 1 THEN ICMP4 WHEN 58 THEN ICMP6 END $$;
-- The second port the Community ID hashes (ICMP: the type's counterpart, or the code for a one-way type) ...
CREATE OR REPLACE FUNCTION cid_dport(p smallint, sport integer, dport integer) RETURNS integer LANGUAGE sql
IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN p IN (1, 58) THEN coalesce(icmp_counterpart(p, sport), dport) ELSE dport END $$;
-- ... and whether it swaps the endpoints (the smaller address, then port, first; one-way ICMP never).
CREATE OR REPLACE FUNCTION cid_swap(p smallint, sip inet, sport integer, dip inet, dport integer) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p IN (1, 58) AND icmp_counterpart(p, sport) IS NULL THEN false
                WHEN sip <> dip THEN sip > dip
                ELSE coalesce(sport > cid_dport(p, sport, dport), false) END
$$;
CREATE OR REPLACE FUNCTION community_id(p smallint, sip inet, sport integer, dip inet, dport integer)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN family(sip) = family(dip)
                     AND (p NOT IN (PORT_PROTOS) OR (sport IS NOT NULL AND dport IS NOT NULL))
    THEN '1:' || encode(digest(
            '\x0000'::bytea
            || CASE WHEN cid_swap(p, sip, sport, dip, dport)
                    THEN ip_bytes(dip) || ip_bytes(sip) ELSE ip_bytes(sip) || ip_bytes(dip) END
            || substring(int4send(p::integer) FROM 4) || '\x00'::bytea
            || CASE WHEN p NOT IN (PORT_PROTOS) THEN ''::bytea
                    WHEN cid_swap(p, sip, sport, dip, dport)
                    THEN port_bytes(cid_dport(p, sport, dport)) || port_bytes(sport)
                    ELSE port_bytes(sport) || port_bytes(cid_dport(p, sport, dport)) END,
            'sha1'), 'base64')
    END
$$;
""".replace("ICMP4", _counterparts(ICMP4_COUNTERPART))
    .replace("ICMP6", _counterparts(ICMP6_COUNTERPART))
    .replace("PORT_PROTOS", _PORT_PROTOS)
)


def _figure(k: str) -> str:
    """The event's attribute ``k`` as a figure (bigint), as Storyline reads it: an integer (not a boolean, not a
    float such as ``5.0``) of magnitude below 2^43, else NULL. CASE branches are evaluated in order: the casts
    only see numbers."""
    v = f"(attrs -> '{k}')"
    return (
        f"CASE WHEN jsonb_typeof({v}) <> 'number' THEN NULL"
        f" WHEN scale({v}::numeric) = 0 AND abs({v}::numeric) < {TOTAL_LIMIT} THEN {v}::bigint END AS {k}"
    )


def _figures_json(c2s: str, s2c: str, total: str) -> str:
    """A Figures object as JSON text (members that are NULL left out; NULL when all are)."""
    return (
        f"CASE WHEN coalesce({c2s}, {s2c}, {total}) IS NOT NULL THEN '{{' || concat_ws(',', "
        f"'\"client_to_server\":' || {c2s}, '\"server_to_client\":' || {s2c}, '\"total\":' || {total}) || '}}' END"
    )


def _reconciled(kind: str) -> str:
    """The story's total of ``kind``: the larger of the largest observer total and the directions added up."""
    c2s, s2c = f"o.c2s_{kind}", f"o.s2c_{kind}"
    return (
        f"greatest(o.t_{kind}, CASE WHEN coalesce({c2s}, {s2c}) IS NOT NULL "
        f"THEN coalesce({c2s}, 0) + coalesce({s2c}, 0) END)"
    )


_KINDS = ("bytes", "packets")
_DIRECTED = ", ".join(
    f"sum(CASE WHEN reversed THEN dst_{k} ELSE src_{k} END) AS a_{k}, "
    f"sum(CASE WHEN reversed THEN src_{k} ELSE dst_{k} END) AS b_{k}, "
    f"sum(coalesce({k}, CASE WHEN src_{k} IS NOT NULL OR dst_{k} IS NOT NULL "
    f"THEN coalesce(src_{k}, 0) + coalesce(dst_{k}, 0) END)) AS t_{k}"
    for k in _KINDS
)
_TRANSPORT = "CASE d.proto " + " ".join(f"WHEN {p} THEN '{transport_name(p)}'" for p in (1, 6, 17, 58, 132)) + " END"
STORY_SQL_FUSED = (
    "\nWITH "
    + _ST
    + """n AS MATERIALIZED (
    SELECT seq, id, flow, time_us, source, sensor, reversed, proto, src_ip, src_port, dst_ip, dst_port, attrs, xid
    FROM events
    WHERE xid >= (SELECT pg_snapshot_xmin(prev) FROM st) AND NOT pg_visible_in_snapshot(xid, (SELECT prev FROM st))
),
"""
    + _TOUCHED
    + """w AS (
    SELECT seq, id, flow, time_us, source, sensor, reversed, proto, src_ip, src_port, dst_ip, dst_port, attrs,
           NULL::bigint AS old_story
    FROM n WHERE flow IS NOT NULL
    UNION ALL
    SELECT o.* FROM touched t CROSS JOIN LATERAL (
        SELECT e.seq, e.id, e.flow, e.time_us, e.source, e.sensor, e.reversed, e.proto, e.src_ip, e.src_port,
               e.dst_ip, e.dst_port, e.attrs, t.story
        FROM events e
        WHERE e.flow = t.flow AND e.time_us BETWEEN t.first_us AND t.last_us
          AND pg_visible_in_snapshot(e.xid, (SELECT prev FROM st))
        OFFSET 0  -- keep it a per-story index lookup whatever the row estimates say
    ) o
),
"""
    + _SESSIONS
    + """lab AS MATERIALIZED (
    SELECT seq, id, flow, time_us, source, sensor, reversed, proto, src_ip, src_port, dst_ip, dst_port, attrs,
           old_story, coalesce(min(old_story) OVER r, min(seq) OVER r) AS story
    FROM i WINDOW r AS (PARTITION BY flow, run)
    UNION ALL
    SELECT seq, id, NULL, time_us, source, sensor, reversed, proto, src_ip, src_port, dst_ip, dst_port, attrs, NULL, seq
    FROM n WHERE flow IS NULL
),
-- Per story: times, count, ids, the sensors' initiator vote (+1: endpoint a of the flow's order opened the
-- session, -1: b did; the attribute speaks of the reported src, which is b in a reversed report) and the earliest
-- report of the flow. A story with a flow has one on every event (flowless events are stories of their own).
agg AS MATERIALIZED (
    SELECT story, min(flow) AS flow, min(time_us) AS first_us, max(time_us) AS last_us, count(*) AS n_events,
           array_agg(DISTINCT source ORDER BY source) AS sources, array_agg(DISTINCT sensor ORDER BY sensor) AS sensors,
           bool_or(old_story IS NOT NULL) AS known, json_agg(id ORDER BY time_us, id) AS event_ids,
           coalesce(sum(CASE attrs -> 'initiator' WHEN '"src"' THEN 1 WHEN '"dst"' THEN -1 END
                        * CASE WHEN reversed THEN -1 ELSE 1 END), 0) AS vote,
           (array_agg(ROW(proto, src_ip, src_port, dst_ip, dst_port, reversed)::flow_report ORDER BY time_us, id)
               FILTER (WHERE flow IS NOT NULL))[1] AS f
    FROM lab GROUP BY story
),
-- Per story with a flow: endpoints a and b (the earliest report's src and dst, swapped when it is reversed) and
-- the client: by the vote (sensor), else the lower port class is the server's (service_port: TCP, UDP, SCTP),
-- else the earliest report's src (first_seen). cib: the client is b.
ab AS (
    SELECT story, vote, (f).proto AS proto, (f).rev AS rev,
           community_id((f).proto, (f).sip, (f).sport, (f).dip, (f).dport) AS cid,
           CASE WHEN (f).rev THEN (f).dip ELSE (f).sip END AS a_ip,
           CASE WHEN (f).rev THEN (f).dport ELSE (f).sport END AS a_port,
           CASE WHEN (f).rev THEN (f).sip ELSE (f).dip END AS b_ip,
           CASE WHEN (f).rev THEN (f).sport ELSE (f).dport END AS b_port
    FROM agg WHERE (f).proto IS NOT NULL AND (f).sip IS NOT NULL AND (f).dip IS NOT NULL
),
dec AS MATERIALIZED (
    SELECT story, proto, cid, a_ip, a_port, b_ip, b_port,
           CASE WHEN vote <> 0 THEN 'sensor' WHEN svc THEN 'service_port' ELSE 'first_seen' END AS rule,
           CASE WHEN vote <> 0 THEN vote < 0 WHEN svc THEN port_class(a_port) < port_class(b_port) ELSE rev END AS cib
    FROM (
        SELECT *, proto IN (6, 17, 132) AND a_port IS NOT NULL AND b_port IS NOT NULL
                  AND port_class(a_port) <> port_class(b_port) AS svc
        FROM ab WHERE cid IS NOT NULL  -- always, for validated events (a NULL would void the body)
        OFFSET 0
    ) x
),
-- Per (story, sensor), the observer: source (its first event's), times, count, whether it reports the flow as
-- a -> b and/or b -> a, its figures summed per direction of the flow's order (a_*: sent by a) and in total, its
-- attributes merged.
obs AS (
    SELECT story, sensor, (array_agg(source ORDER BY time_us, id))[1] AS source, min(time_us) AS first_us,
           max(time_us) AS last_us, count(*) AS events, bool_or(reversed) AS any_rev, bool_or(NOT reversed) AS any_fwd,
           DIRECTED, jsonb_merge(attrs ORDER BY time_us, id) AS attrs
    FROM (SELECT story, sensor, source, time_us, id, reversed, attrs, FIGURES FROM lab OFFSET 0) e
    GROUP BY story, sensor
),
-- The observers relative to client and server, as a list by sensor name, and the story's reconciled figures:
-- per direction the largest observer's (several sensors report the same bytes: never added up).
obs_story AS (
    SELECT o.story, string_agg(
               '{"sensor":' || to_json(o.sensor) || ',"source":' || to_json(o.source) || ',"first_us":' || o.first_us
               || ',"last_us":' || o.last_us || ',"events":' || o.events
               || CASE WHEN o.cib IS NULL THEN '' ELSE
                   CASE WHEN NOT o.any_s2c THEN ',"reported_direction":"client_to_server"'
                        WHEN NOT o.any_c2s THEN ',"reported_direction":"server_to_client"'
                        ELSE ',"reported_direction":"both"' END
                   || coalesce(',"bytes":' || FIG_BYTES, '') || coalesce(',"packets":' || FIG_PACKETS, '') END
               || ',"attrs":' || o.attrs || '}', ',' ORDER BY o.sensor) AS observers,
           max(c2s_bytes) AS c2s_bytes, max(s2c_bytes) AS s2c_bytes, max(t_bytes) AS t_bytes,
           max(c2s_packets) AS c2s_packets, max(s2c_packets) AS s2c_packets, max(t_packets) AS t_packets
    FROM (
        SELECT o.*, d.cib,
               CASE WHEN d.cib THEN o.any_fwd ELSE o.any_rev END AS any_s2c,
               CASE WHEN d.cib THEN o.any_rev ELSE o.any_fwd END AS any_c2s,
               CASE WHEN d.cib THEN o.b_bytes ELSE o.a_bytes END AS c2s_bytes,
               CASE WHEN d.cib THEN o.a_bytes ELSE o.b_bytes END AS s2c_bytes,
               CASE WHEN d.cib THEN o.b_packets ELSE o.a_packets END AS c2s_packets,
               CASE WHEN d.cib THEN o.a_packets ELSE o.b_packets END AS s2c_packets
        FROM obs o LEFT JOIN dec d USING (story) OFFSET 0
    ) o
    GROUP BY o.story
),
fused AS MATERIALIZED (
    SELECT a.story, a.flow, a.first_us, a.last_us, a.n_events, a.sources, a.sensors, a.known,
           CASE WHEN d.story IS NOT NULL THEN TOTAL_BYTES END AS bytes,
           CASE WHEN d.story IS NOT NULL THEN TOTAL_PACKETS END AS packets,
           ('{"body_version":2,"story_id":"' || a.story || '","start":"' || rfc3339(a.first_us)
            || '","end":"' || rfc3339(a.last_us) || '","start_us":' || a.first_us || ',"end_us":' || a.last_us
            || ',"duration_ms":' || (a.last_us - a.first_us) / 1000 || ',"event_count":' || a.n_events
            || CASE WHEN d.story IS NULL THEN '' ELSE
                ',"community_id":"' || d.cid || '","proto":' || d.proto
                || coalesce(',"transport":"' || TRANSPORT || '"', '')
                || ',"client":{"ip":"' || host(CASE WHEN d.cib THEN d.b_ip ELSE d.a_ip END) || '","port":'
                || coalesce((CASE WHEN d.cib THEN d.b_port ELSE d.a_port END)::text, 'null')
                || '},"server":{"ip":"' || host(CASE WHEN d.cib THEN d.a_ip ELSE d.b_ip END) || '","port":'
                || coalesce((CASE WHEN d.cib THEN d.a_port ELSE d.b_port END)::text, 'null')
                || '},"initiator_known":' || (d.rule <> 'first_seen') || ',"initiator_rule":"' || d.rule || '"'
                || coalesce(',"totals":{' || nullif(concat_ws(',', '"bytes":' || RECONCILED_BYTES,
                                                              '"packets":' || RECONCILED_PACKETS), '') || '}', '') END
            || ',"observers":[' || o.observers || '],"event_ids":' || a.event_ids || '}')::jsonb AS body
    FROM agg a JOIN obs_story o USING (story) LEFT JOIN dec d USING (story)
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
""".replace("DIRECTED", _DIRECTED)
    .replace("FIGURES", ", ".join(_figure(k) for k in FIGURE_ATTRS))
    .replace("FIG_BYTES", _figures_json("o.c2s_bytes", "o.s2c_bytes", "o.t_bytes"))
    .replace("FIG_PACKETS", _figures_json("o.c2s_packets", "o.s2c_packets", "o.t_packets"))
    .replace("TOTAL_BYTES", _reconciled("bytes"))
    .replace("TOTAL_PACKETS", _reconciled("packets"))
    .replace("RECONCILED_BYTES", _figures_json("o.c2s_bytes", "o.s2c_bytes", _reconciled("bytes")))
    .replace("RECONCILED_PACKETS", _figures_json("o.c2s_packets", "o.s2c_packets", _reconciled("packets")))
    .replace("TRANSPORT", _TRANSPORT)
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
    "body_version",
    "start",
    "end",
    "start_us",
    "end_us",
    "duration_ms",
    "event_count",
    "community_id",
    "proto",
    "transport",
    "client",
    "server",
    "initiator_known",
    "initiator_rule",
    "totals",
    "observers",
    "event_ids",
)
"""The body fields compared with Storyline's (all but the head: story_id, tenant, revision, final, emitted_ms —
the peer has no revisions or tenants — and the truncation fields, which it never sets)."""


def content_diff(body: dict[str, Any], events: list[Event]) -> list[str]:
    """The fields of :data:`_COMPARED` in which an SQL-built ``body`` differs from Storyline's reference fusion
    (:func:`engine.correlate.fuse.fuse_python`) of the same ``events`` (absent fields are absent in both)."""
    ref = msgspec.to_builtins(fuse_python(events, ("", 1, True, False, None, 0)))
    return [k for k in _COMPARED if body.get(k) != ref.get(k)]


def content_check(conninfo: str, predicted: dict[str, str], events: dict[str, Event], sample: int = 500) -> float:
    """The share of (up to ``sample``) stories whose SQL-built body has the content Storyline's reference fusion
    gives for the same events (:func:`content_diff`: every field of :data:`_COMPARED`)."""
    members: dict[str, list[Event]] = {}
    for eid, story in predicted.items():
        members.setdefault(story, []).append(events[eid])
    chosen = random.Random(1).sample(sorted(members), min(sample, len(members)))
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT story::text, body FROM stories WHERE story = ANY(%s)", ([int(c) for c in chosen],))
        bodies = {str(k): v for k, v in rows.fetchall()}
    differ: list[tuple[str, list[str]]] = []
    for story in chosen:
        diff = content_diff(bodies.get(story) or {}, members[story])
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
