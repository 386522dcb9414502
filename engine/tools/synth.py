"""Deterministic synthetic sensor events (JSONL) for demos, tests and benchmarks.

Each *session* is one network flow seen by 1..4 sensors of different sources. Sensors report it with their own
clock offset, some in the reverse direction, and a few seconds apart — the situations story building must
handle. The same seed always gives the same lines.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import msgspec

SOURCES = ("firewall", "endpoint", "dns", "http", "cloud")
_encoder = msgspec.json.Encoder()


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
