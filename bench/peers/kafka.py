"""Benchmark peer (issue 7): the "database + message queue" design that Storyline replaces.

Producers write each event record durably to the CQL store (``Store.append``: the engine's own write path, index
row + UNLOGGED single-partition batches, at ``store.consistency``), and only then publish the event's *key*
(``shard:bucket:event_id``, i.e. the event id and its CQL partition) to an Apache Kafka topic. Consumers fetch
keys from Kafka in batches and read the records back from CQL by key, in batches (one ``SELECT … WHERE shard = ?
AND bucket = ? AND event_id IN ?`` per partition and up to ``IN_KEYS`` keys), then decode them (the linking
view, :class:`engine.core.event.EventView`, with one reused decoder: what Storyline's worker decodes of every
record before its stage; the full event is decoded only for stories being emitted). That is the cost
of the design: one queue plus a by-key lookup, against Storyline's one table read in whole partitions.

* Kafka: one KRaft broker (``db/kafka-node``: org.apache.kafka:kafka_2.13 from Maven Central on Java 17),
  started here when nothing answers on 127.0.0.1:9092 and stopped again at the end. A topic of ``PARTITIONS``
  partitions (RF 1, ``min.insync.replicas`` 1), message key = shard (all keys of a shard, hence of a flow, in one
  partition, in order).
* Producer (confluent-kafka / librdkafka): ``acks=all``, idempotent, batching (``linger.ms``, ``batch.size``,
  ``batch.num.messages``: ``PRODUCER_CONF``). A key is produced only after its record's CQL write is
  acknowledged; an event counts as produced when both are acknowledged.
* Consumer: partitions assigned explicitly (no group rebalance), fetched up to ``FETCH_KEYS`` at a time; offsets
  committed (asynchronously, in order) only after every record of the fetched batch was read back and decoded
  (at-least-once).
* Data: ``engine.tools.simulate.generate`` (canonical Storyline events via
  ``engine.ingest.canonical.parse_line``), parsed and encoded once before any timing (the same client work in
  both designs; reported as ``parse_us_per_event``).

Four phases, each role in its own process (as separate producer and consumer services would run), timed from a
common start signal after connecting:

1. ``produce``: the producer alone, all events (records durable in CQL and keys acked by Kafka).
2. ``consume``: the consumer alone, draining the keys of phase 1 (keys fetched, records read by key, decoded).
3. ``pipeline``: both at once on a fresh topic, unpaced: events/s from the start until the consumer has
   everything, and per event the latency from the producer's Kafka ack (the delivery report, served by a thread
   that polls every 5 ms) to the moment the consumer has decoded the record. Both run flat out, so the latency
   includes any backlog the consumer builds; the consumer can also see a key a little before the producer's
   delivery report arrives (negative latencies: reported as the minimum).
4. ``paced``: the same on another fresh topic with the producer paced at half the pipeline's events/s (rounds
   of 500 events on schedule, at most 10 s of events): the latency of the design when it is not saturated.

``python -m bench.peers.kafka [--events N]`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import msgspec

from engine.core.config import Config, from_mapping, load
from engine.core.event import EventView, encode
from engine.ingest.canonical import ParseRules, parse_line, shard_of
from engine.store import EventRecord, Store, make_store
from engine.store.cql import CqlStore
from engine.tools.simulate import Scenario, generate

DESCRIPTION = "CQL store + Kafka queue of keys (the design Storyline replaces): produce, consume, pipeline figures."
ROOT = Path(__file__).resolve().parents[2]
KAFKA_NODE = ROOT / "db" / "kafka-node"
CQL_NODE = ROOT / "db" / "cql-node"
KAFKA_HOST, KAFKA_PORT = "127.0.0.1", 9092
BOOTSTRAP = f"{KAFKA_HOST}:{KAFKA_PORT}"
PARTITIONS = 4
ROUND_EVENTS = 5_000  # events per producer round (the engine's ingest.batch_lines)
PACED_ROUND_EVENTS = 500  # events per round when paced (a round every 500 / rate seconds)
PACE_FRACTION = 0.5  # the paced phase runs at this fraction of the unpaced pipeline's events/s
PACED_MAX_S = 10.0  # and for at most this long (fewer events than --events if needed)
ROUNDS_IN_FLIGHT = 4  # rounds written concurrently: up to ~64 partition appends in flight (store.max_in_flight)
FETCH_KEYS = 5_000  # keys per consumer fetch, at most
FETCH_WAIT_S = 0.005  # a fetch returns what the client has after this long (or FETCH_KEYS keys, if sooner)
IN_KEYS = 100  # keys per by-key CQL query (one partition each)
LOOKUPS_IN_FLIGHT = 32  # by-key queries in flight
BATCHES_IN_FLIGHT = 4  # fetched key batches being looked up at once (offsets still committed in order)
PHASE_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 600.0  # a role's start-up (data file loaded, clients connected); 1M events took ~10 s alone

PRODUCER_CONF: dict[str, Any] = {
    "bootstrap.servers": BOOTSTRAP,
    "acks": "all",
    "enable.idempotence": True,
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "batch.num.messages": 10_000,
    "compression.type": "none",
    "queue.buffering.max.messages": 1_000_000,
}
CONSUMER_CONF: dict[str, Any] = {
    "bootstrap.servers": BOOTSTRAP,
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "fetch.wait.max.ms": 100,
}


# -- infrastructure --------------------------------------------------------------------------------------------
def kafka_answers(host: str = KAFKA_HOST, port: int = KAFKA_PORT) -> bool:
    """Whether a Kafka broker answers an ApiVersions (v0) request without error."""
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            client = b"storyline-bench"
            body = struct.pack(">hhih", 18, 0, 7, len(client)) + client
            s.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 10:
                chunk = s.recv(10 - len(head))
                if not chunk:
                    return False
                head += chunk
            _, corr, err = struct.unpack(">iih", head)
            return bool(corr == 7 and err == 0)
    except OSError:
        return False


def cql_answers(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(struct.pack(">BBhBi", 4, 0, 0, 5, 0))  # OPTIONS
            head = s.recv(9)
            return len(head) == 9 and head[4] == 6  # SUPPORTED
    except OSError:
        return False


def _node(script: Path, action: str) -> None:
    res = subprocess.run([str(script), action], capture_output=True, text=True, timeout=600, check=False)  # noqa: S603
    if res.returncode != 0:
        raise SystemExit(f"{script.name} {action} failed:\n{res.stdout}{res.stderr}")
    sys.stderr.write(res.stdout)


def kafka_version() -> str:
    jars = sorted((Path(os.environ.get("KAFKA_HOME", ROOT / ".kafka")) / "lib").glob("kafka_2.13-*.jar"))
    return jars[-1].name.removeprefix("kafka_2.13-").removesuffix(".jar") if jars else "unknown"


def client_version() -> str:
    import confluent_kafka

    return f"confluent-kafka {metadata.version('confluent-kafka')} (librdkafka {confluent_kafka.libversion()[0]})"


def bench_config(tenant: str, cql: str) -> dict[str, Any]:
    """configs/bench.toml (the engine's benchmark settings: 16 shards, 100 ms buckets) on a fresh keyspace."""
    tree: dict[str, Any] = msgspec.to_builtins(load(str(ROOT / "configs" / "bench.toml")))
    tree["tenant"] = tenant
    tree["store"]["contact_points"] = [cql]
    return tree


# -- data ------------------------------------------------------------------------------------------------------
def make_data(cfg: Config, n_events: int, seed: int) -> tuple[list[tuple[int, str, bytes]], dict[str, float]]:
    """Simulated sensor lines → canonical events → (shard, event id, msgpack payload), in arrival order."""
    t0 = time.perf_counter()
    sims, _ = generate(Scenario(events=n_events, seed=seed, start_s=time.time() - 3600, span_s=600))
    t1 = time.perf_counter()
    now = int(time.time() * 1000)
    out: list[tuple[int, str, bytes]] = []
    seen: set[str] = set()
    rules = ParseRules.from_config(cfg)
    for sim in sims:
        ev = parse_line(sim.line, rules, now)
        if ev.id in seen:
            continue
        seen.add(ev.id)
        out.append((shard_of(ev, cfg.shards), ev.id, encode(ev)))
    t2 = time.perf_counter()
    return out, {
        "generate_s": t1 - t0,
        "parse_us_per_event": (t2 - t1) / max(len(sims), 1) * 1e6,
        "avg_line_bytes": sum(len(s.line) for s in sims) / max(len(sims), 1),
        "avg_payload_bytes": sum(len(p) for _, _, p in out) / max(len(out), 1),
    }


def _key(shard: int, bucket: int, event_id: str) -> bytes:
    return b"%d:%d:%s" % (shard, bucket, event_id.encode())


# -- producer --------------------------------------------------------------------------------------------------
async def _produce(
    tree: dict[str, Any],
    data: list[tuple[int, str, bytes]],
    topic: str,
    ready: MpEvent,
    go: MpEvent,
    rate: float | None = None,
) -> dict[str, Any]:
    """Write ``data`` (CQL, then keys to Kafka) as fast as possible, or at ``rate`` events/s (in rounds of
    ``PACED_ROUND_EVENTS``, each started on schedule)."""
    warmup_topic = topic.rsplit("-", 1)[0] + "-w"
    from confluent_kafka import KafkaError, Message, Producer

    cfg = from_mapping(tree)
    acks: list[tuple[bytes, float]] = []
    errors: list[str] = []
    expected = len(data) + 1  # the warm-up message, then the keys
    all_reported = threading.Event()

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        # Runs on the poller thread below, which serves delivery reports as they arrive: the time taken here is
        # when the producer learns that the key is durable in Kafka (its record already is in CQL).
        if err is not None:
            errors.append(str(err))
            return
        value = msg.value()
        if value is not None:
            acks.append((value, time.time()))
        if len(acks) + len(errors) >= expected:
            all_reported.set()

    producer = Producer({**PRODUCER_CONF, "on_delivery": on_delivery})
    # Before the clock starts: connect, fetch the topic's metadata, and get the idempotent producer's id (one
    # message to a warm-up topic, so the measured topic holds only keys).
    producer.list_topics(topic, timeout=30)
    producer.produce(warmup_topic, value=b"warm-up")
    if producer.flush(60) or errors:
        raise SystemExit(f"producer: warm-up message not acknowledged ({errors[:1]})")
    acks.clear()
    expected = len(data)
    all_reported.clear()
    stop = threading.Event()

    def poller() -> None:
        while not stop.is_set():
            producer.poll(0.005)

    poll_thread = threading.Thread(target=poller, name="kafka-delivery-reports", daemon=True)
    poll_thread.start()
    store = make_store(cfg)
    await store.open()
    try:
        await store.server_time_ms()
        rounds = asyncio.Semaphore(ROUNDS_IN_FLIGHT)

        def publish(keys: Sequence[bytes], shard_key: bytes) -> None:
            for k in keys:
                while True:
                    try:
                        producer.produce(topic, value=k, key=shard_key)
                        break
                    except BufferError:  # local queue full: let librdkafka drain it
                        time.sleep(0.005)

        async def group(shard: int, items: list[tuple[int, str, bytes]]) -> None:
            bucket = int(time.time() * 1000) // cfg.bucket_ms
            await store.append(shard, bucket, [EventRecord(eid, payload) for _, eid, payload in items])
            publish([_key(shard, bucket, eid) for _, eid, _ in items], b"%d" % shard)

        async def one_round(items: list[tuple[int, str, bytes]]) -> None:
            try:
                by_shard: dict[int, list[tuple[int, str, bytes]]] = {}
                for it in items:
                    by_shard.setdefault(it[0], []).append(it)
                await asyncio.gather(*(group(s, g) for s, g in by_shard.items()))
            finally:
                rounds.release()

        ready.set()
        go.wait()
        t0 = time.time()
        tasks: list[asyncio.Task[None]] = []
        step = PACED_ROUND_EVENTS if rate else ROUND_EVENTS
        for i in range(0, len(data), step):
            if rate:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.time()))
            await rounds.acquire()
            tasks.append(asyncio.create_task(one_round(data[i : i + step])))
        await asyncio.gather(*tasks)
        t_cql = time.time()
        await asyncio.to_thread(all_reported.wait, PHASE_TIMEOUT_S)
        t1 = time.time()
        stop.set()
        poll_thread.join()
        left = producer.flush(10)
        if left or errors or len(acks) != len(data):
            raise SystemExit(f"producer: {left} unacked, {len(errors)} errors ({errors[:3]}), {len(acks)} acks")
        return {"events": len(data), "t0": t0, "t1": t1, "cql_done_s": t_cql - t0, "acks": acks}
    finally:
        stop.set()
        await store.close()


# -- consumer --------------------------------------------------------------------------------------------------
async def _consume(
    tree: dict[str, Any], topic: str, group_id: str, n: int, ready: MpEvent, go: MpEvent
) -> dict[str, Any]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

    cfg = from_mapping(tree)
    decode = msgspec.msgpack.Decoder(EventView).decode
    store = make_store(cfg)
    if not isinstance(store, CqlStore):
        raise SystemExit("the Kafka peer needs the CQL store")
    await store.open()
    consumer = Consumer({**CONSUMER_CONF, "group.id": group_id})
    pool = ThreadPoolExecutor(1, thread_name_prefix="kafka-consumer")  # every Consumer call on one thread
    loop = asyncio.get_running_loop()
    try:
        db = store.db
        lookup = await db.prepare(
            f"SELECT event_id, chunk, chunks, payload FROM {store.ks}.events "
            f"WHERE shard = ? AND bucket = ? AND event_id IN ?"
        )
        # Connect before the clock starts; assign only after it (librdkafka would start prefetching at once).
        await loop.run_in_executor(pool, lambda: consumer.list_topics(topic, timeout=30))
        sem = asyncio.Semaphore(LOOKUPS_IN_FLIGHT)
        consumed: list[tuple[bytes, float]] = []
        stats = {"queries": 0, "bytes": 0, "missing": 0}

        async def query(shard: int, bucket: int, keys: list[tuple[str, bytes]]) -> None:
            async with sem:
                res = await db.execute(lookup, [shard, bucket, [eid for eid, _ in keys]])
                rows = res.all()
            wanted = dict(keys)
            got = 0
            for r in rows:
                if r["chunk"] != 0 or (r["chunks"] or 1) != 1:
                    raise SystemExit("kafka peer: chunked events are not expected here")
                ev = decode(r["payload"])  # the linking view, as Storyline's worker decodes every record
                if ev.id not in wanted:
                    raise SystemExit(f"kafka peer: unexpected event {ev.id}")
                stats["bytes"] += len(r["payload"])
                got += 1
            t = time.time()
            consumed.extend((k, t) for k in wanted.values())
            stats["queries"] += 1
            stats["missing"] += len(keys) - got

        async def process(msgs: list[Message]) -> int:
            parts: dict[tuple[int, int], list[tuple[str, bytes]]] = {}
            for m in msgs:
                value = m.value()
                if value is None:
                    continue
                shard, bucket, eid = value.split(b":")
                parts.setdefault((int(shard), int(bucket)), []).append((eid.decode(), value))
            await asyncio.gather(
                *(
                    query(shard, bucket, keys[i : i + IN_KEYS])
                    for (shard, bucket), keys in parts.items()
                    for i in range(0, len(keys), IN_KEYS)
                )
            )
            return sum(len(k) for k in parts.values())

        def commit(offsets: list[TopicPartition]) -> None:
            consumer.commit(offsets=offsets, asynchronous=True)

        ready.set()
        go.wait()
        t0 = time.time()
        assignment = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)]
        await loop.run_in_executor(pool, consumer.assign, assignment)
        deadline = t0 + PHASE_TIMEOUT_S
        fetched = done = 0
        pending: deque[tuple[asyncio.Task[int], list[TopicPartition]]] = deque()

        async def settle_oldest() -> None:
            nonlocal done
            task, offsets = pending.popleft()
            done += await task
            await loop.run_in_executor(pool, commit, offsets)

        while fetched < n:
            if time.time() > deadline:
                raise SystemExit(f"consumer: only {fetched} of {n} keys within {PHASE_TIMEOUT_S} s")
            msgs = await loop.run_in_executor(pool, consumer.consume, FETCH_KEYS, FETCH_WAIT_S)
            good = [m for m in msgs if m.error() is None]
            if len(good) != len(msgs):
                raise SystemExit(f"consumer: {[str(m.error()) for m in msgs if m.error() is not None][:3]}")
            if good:
                fetched += len(good)
                last: dict[int, int] = {}
                for m in good:
                    p, o = m.partition(), m.offset()
                    if p is not None and o is not None:
                        last[p] = max(o, last.get(p, -1))
                offsets = [TopicPartition(topic, p, o + 1) for p, o in last.items()]
                pending.append((asyncio.create_task(process(good)), offsets))
            while pending and (pending[0][0].done() or len(pending) > BATCHES_IN_FLIGHT):
                await settle_oldest()
        while pending:
            await settle_oldest()
        t1 = time.time()
        if done != n or stats["missing"]:
            raise SystemExit(f"consumer: {done} of {n} keys processed, {stats['missing']} records missing in CQL")
        return {"events": done, "t0": t0, "t1": t1, "consumed": consumed, **stats}
    finally:
        await loop.run_in_executor(pool, consumer.close)
        pool.shutdown()
        await store.close()


# -- process plumbing ------------------------------------------------------------------------------------------
def _producer_main(
    tree: dict[str, Any],
    data_path: str,
    topic: str,
    ready: MpEvent,
    go: MpEvent,
    out: Queue[Any],
    n: int,
    rate: float | None,
) -> None:
    try:
        data = msgspec.msgpack.decode(Path(data_path).read_bytes(), type=list[tuple[int, str, bytes]])[:n]
        out.put(("producer", asyncio.run(_produce(tree, data, topic, ready, go, rate))))
    except BaseException as exc:
        ready.set()
        out.put(("producer", {"error": repr(exc)}))


def _consumer_main(
    tree: dict[str, Any], topic: str, group_id: str, n: int, ready: MpEvent, go: MpEvent, out: Queue[Any]
) -> None:
    try:
        out.put(("consumer", asyncio.run(_consume(tree, topic, group_id, n, ready, go))))
    except BaseException as exc:
        ready.set()
        out.put(("consumer", {"error": repr(exc)}))


def _phase(
    tree: dict[str, Any],
    data_path: str,
    topic: str,
    group_id: str,
    n: int,
    roles: Sequence[str],
    rate: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the given roles, each in a spawned process; start them together once all have connected."""
    ctx = mp.get_context("spawn")
    out: Queue[Any] = ctx.Queue()
    go = ctx.Event()
    procs: list[tuple[Any, MpEvent]] = []
    for role in roles:
        ready = ctx.Event()
        if role == "producer":
            p = ctx.Process(target=_producer_main, args=(tree, data_path, topic, ready, go, out, n, rate))
        else:
            p = ctx.Process(target=_consumer_main, args=(tree, topic, group_id, n, ready, go, out))
        p.start()
        procs.append((p, ready))
    results: dict[str, dict[str, Any]] = {}
    try:
        for _, ready in procs:
            if not ready.wait(READY_TIMEOUT_S):
                raise SystemExit(f"kafka peer: a role did not get ready within {READY_TIMEOUT_S:g} s")
        go.set()
        for _ in roles:
            role, res = out.get(timeout=PHASE_TIMEOUT_S + 60)
            if "error" in res:
                raise SystemExit(f"kafka peer: {role} failed: {res['error']}")
            results[role] = res
    finally:
        for p, _ in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(10)
    return results


def _latencies(phase: dict[str, dict[str, Any]], n: int) -> list[float]:
    """Per event: consumed (record read back and decoded) minus acked (the producer's Kafka delivery report)."""
    acked = dict(phase["producer"]["acks"])
    lat = sorted(t - acked[k] for k, t in phase["consumer"]["consumed"])
    if len(lat) != n:
        raise SystemExit(f"kafka peer: {len(lat)} latencies for {n} events")
    return lat


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# -- the benchmark ---------------------------------------------------------------------------------------------
def run(n_events: int = 200_000, seed: int = 1, cql: str = "127.0.0.1:9042") -> dict[str, float | str]:
    """Produce, consume and pipeline figures of the CQL + Kafka design (see the module doc)."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    t_start = time.perf_counter()
    load1 = os.getloadavg()[0]
    started_cql = started_kafka = False
    if not cql_answers(cql):
        if cql != "127.0.0.1:9042":
            raise SystemExit(f"kafka peer: no CQL node answers on {cql}")
        _node(CQL_NODE, "up")
        started_cql = True
    if not kafka_answers():
        _node(KAFKA_NODE, "up")
        started_kafka = True
    run_id = uuid.uuid4().hex[:8]
    tree = bench_config(f"peer_kafka_{run_id}", cql)
    cfg = from_mapping(tree)
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    topics = [f"storyline-peer-{run_id}-{x}" for x in ("a", "b", "c", "w")]
    groups = topics[:3]
    store = make_store(cfg)
    try:
        data, prep = make_data(cfg, n_events, seed)
        n = len(data)
        asyncio.run(_init(store))
        futures = admin.create_topics(
            [
                NewTopic(t, num_partitions=PARTITIONS, replication_factor=1, config={"min.insync.replicas": "1"})
                for t in topics
            ],
            operation_timeout=30,
        )
        for f in futures.values():
            f.result(60)
        with tempfile.TemporaryDirectory() as tmp:
            data_path = os.path.join(tmp, "events.msgpack")
            Path(data_path).write_bytes(msgspec.msgpack.encode(data))
            del data
            prod = _phase(tree, data_path, topics[0], groups[0], n, ["producer"])["producer"]
            cons = _phase(tree, data_path, topics[0], groups[0], n, ["consumer"])["consumer"]
            both = _phase(tree, data_path, topics[1], groups[1], n, ["producer", "consumer"])
            rate = PACE_FRACTION * n / (both["consumer"]["t1"] - both["producer"]["t0"])
            n_paced = min(n, int(rate * PACED_MAX_S))
            paced = _phase(tree, data_path, topics[2], groups[2], n_paced, ["producer", "consumer"], rate)
        lat = _latencies(both, n)
        lat_paced = _latencies(paced, n_paced)
        p_s = prod["t1"] - prod["t0"]
        c_s = cons["t1"] - cons["t0"]
        e_s = both["consumer"]["t1"] - both["producer"]["t0"]
        result: dict[str, float | str] = {
            "design": "CQL store (Store.append) + Kafka topic of keys; consumers look records up by key",
            "kafka_version": kafka_version(),
            "client_version": client_version(),
            "cql_store": "engine.store CqlStore (scyllapy), configs/bench.toml, consistency " + cfg.store.consistency,
            "producer_conf": json.dumps({k: v for k, v in PRODUCER_CONF.items() if k != "bootstrap.servers"}),
            "consumer_conf": json.dumps({k: v for k, v in CONSUMER_CONF.items() if k != "bootstrap.servers"}),
            "topic": f"{PARTITIONS} partitions, RF 1, min.insync.replicas 1, key = shard",
            "shape": (
                f"producer rounds of {ROUND_EVENTS} events, {ROUNDS_IN_FLIGHT} in flight; consumer fetches of "
                f"<= {FETCH_KEYS} keys (waiting <= {FETCH_WAIT_S * 1000:g} ms), {BATCHES_IN_FLIGHT} in flight, "
                f"by-key queries of <= {IN_KEYS} keys, {LOOKUPS_IN_FLIGHT} in flight"
            ),
            "broker_started_here": "yes" if started_kafka else "no",
            "events": float(n),
            **{k: float(v) for k, v in prep.items()},
            "produce_events_per_s": n / p_s,
            "produce_s": p_s,
            "produce_cql_done_s": float(prod["cql_done_s"]),
            "consume_events_per_s": n / c_s,
            "consume_s": c_s,
            "consume_queries": float(cons["queries"]),
            "consume_keys_per_query": n / max(cons["queries"], 1),
            "pipeline_events_per_s": n / e_s,
            "pipeline_s": e_s,
            "pipeline_produce_events_per_s": n / (both["producer"]["t1"] - both["producer"]["t0"]),
            "latency_ack_to_consumed_p50_s": _percentile(lat, 0.50),
            "latency_ack_to_consumed_p95_s": _percentile(lat, 0.95),
            "latency_ack_to_consumed_p99_s": _percentile(lat, 0.99),
            "latency_ack_to_consumed_min_s": lat[0],
            "latency_ack_to_consumed_max_s": lat[-1],
            "paced_events_per_s": rate,
            "paced_events": float(n_paced),
            "paced_latency_ack_to_consumed_p50_s": _percentile(lat_paced, 0.50),
            "paced_latency_ack_to_consumed_p95_s": _percentile(lat_paced, 0.95),
            "paced_latency_ack_to_consumed_p99_s": _percentile(lat_paced, 0.99),
            "paced_latency_ack_to_consumed_max_s": lat_paced[-1],
            "loadavg_1m_at_start": load1,
            "cpus": float(os.cpu_count() or 0),
        }
        result["total_s"] = time.perf_counter() - t_start
        return result
    finally:
        with contextlib.suppress(Exception):
            for f in admin.delete_topics(topics, operation_timeout=30).values():
                f.result(60)
        with contextlib.suppress(Exception):
            for f in admin.delete_consumer_groups(groups).values():
                f.result(60)
        del admin  # closes its connection before the broker may be stopped below
        asyncio.run(_drop(store))
        if started_kafka:
            _node(KAFKA_NODE, "down")
        if started_cql:
            _node(CQL_NODE, "down")


async def _init(store: Store) -> None:
    await store.open()
    try:
        await store.init_schema()
    finally:
        await store.close()


async def _drop(store: Store) -> None:
    await store.open()
    try:
        await store.drop_schema()
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers.kafka", description=DESCRIPTION)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cql", default="127.0.0.1:9042")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.events, args.seed, args.cql), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
