"""Story accuracy: B-cubed scores of a predicted clustering against ground truth, and a reference clusterer.

:func:`score` compares predicted story keys with the truth of :mod:`engine.tools.simulate` (or any event id → story
key mapping). :func:`link_reference` applies the link rule in plain Python, directly on the JSONL lines, so a
test can show a scenario is solvable and what the engine should reach on it.

``python -m engine.tools.accuracy [--events N] [--seed S]`` prints the reference clusterer's scores on a scenario with
and without per-sensor skew correction; ``python -m engine.tools.accuracy --stories S.jsonl --truth T.json`` scores
the engine's stories (``storyline stories --format jsonl``) against a simulator's truth file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from engine.tools.simulate import Scenario, SimEvent, generate

# IANA numbers of the protocol names a line may carry, so "tcp" and 6 give one flow key.
_PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ipv6-icmp": 58, "icmp6": 58, "sctp": 132}


def score(predicted: Mapping[str, str], truth: Mapping[str, str]) -> dict[str, float]:
    """B-cubed precision, recall and F1 of ``predicted`` (event id → cluster key) against ``truth`` (event id →
    story key), and the exact-story match rate.

    The items are the keys of ``truth``. An item missing from ``predicted`` counts as a cluster of its own (a
    singleton); keys of ``predicted`` not in ``truth`` are ignored. Per item ``x`` with predicted cluster ``P(x)``
    and true story ``T(x)`` (both restricted to the items): precision ``|P(x) ∩ T(x)| / |P(x)|``, recall
    ``|P(x) ∩ T(x)| / |T(x)|``; both averaged over the items. ``exact`` is the fraction of true stories whose event
    set equals one predicted cluster exactly. With no items every score is 1.0.

    Returned keys: ``precision``, ``recall``, ``f1``, ``exact``, and the counts ``items``, ``stories`` (true) and
    ``clusters`` (predicted, over the items), as floats.
    """
    if not truth:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0, "exact": 1.0, "items": 0.0, "stories": 0.0, "clusters": 0.0}
    # Predicted labels as tuples so a missing item's singleton label cannot collide with a real cluster key.
    pred_label: dict[str, tuple[bool, str]] = {
        item: ((True, predicted[item]) if item in predicted else (False, item)) for item in truth
    }
    pred_size = Counter(pred_label.values())
    true_size = Counter(truth.values())
    both = Counter((pred_label[item], story) for item, story in truth.items())
    p_sum = r_sum = 0.0
    for item, story in truth.items():
        label = pred_label[item]
        common = both[(label, story)]
        p_sum += common / pred_size[label]
        r_sum += common / true_size[story]
    n = len(truth)
    precision, recall = p_sum / n, r_sum / n
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    exact = sum(1 for (label, story), common in both.items() if common == true_size[story] == pred_size[label]) / len(
        true_size
    )
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "exact": exact,
        "items": float(n),
        "stories": float(len(true_size)),
        "clusters": float(len(pred_size)),
    }


def _time_s(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("time: a boolean is not a time")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        parsed = dt.datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError(f"time: {value!r} has no UTC offset")
        return parsed.timestamp()
    raise ValueError(f"time: {value!r} is neither epoch seconds nor RFC 3339")


def _endpoint(ip: object, port: object) -> tuple[int, int, int]:
    addr = ipaddress.ip_address(str(ip))
    return (addr.version, int(addr), -1 if port is None else int(str(port)))


def _flow_key(doc: Mapping[str, object]) -> tuple[object, ...] | None:
    proto, src, dst = doc.get("proto"), doc.get("src_ip"), doc.get("dst_ip")
    if proto is None or src is None or dst is None:
        return None
    p = _PROTO_NUMBERS.get(proto.lower(), proto.lower()) if isinstance(proto, str) else proto
    a, b = _endpoint(src, doc.get("src_port")), _endpoint(dst, doc.get("dst_port"))
    return (p, a, b) if a <= b else (p, b, a)


def link_reference(
    events: Sequence[SimEvent], window_s: float = 30.0, skews: Mapping[str, float] | None = None
) -> dict[str, str]:
    """Event id → cluster key by the link rule, from the lines alone (plus ``skews`` when given).

    Two events link when they have the same direction-independent flow (protocol and the two endpoints sorted)
    and their times, each less its sensor's skew (``skews``: sensor → seconds; a sensor not in it, or no
    ``skews`` at all, is taken as exact), are at most ``window_s`` apart. A cluster is a connected component:
    within one flow, the events sorted by corrected time, cut wherever two neighbours are more than ``window_s``
    apart. An event without flow fields is a cluster of its own. A cluster's key is the id of its first event
    (earliest corrected time, then smallest id).

    This handles ports as TCP/UDP-style numbers (no ICMP type mapping), which is all :mod:`engine.tools.simulate`
    produces.
    """
    by_flow: defaultdict[tuple[object, ...], list[tuple[float, str]]] = defaultdict(list)
    out: dict[str, str] = {}
    for ev in events:
        doc = json.loads(ev.line)
        event_id = str(doc.get("id", ev.id))
        key = _flow_key(doc)
        if key is None:
            out[event_id] = event_id
            continue
        sensor = str(doc.get("sensor", doc["source"]))
        t = _time_s(doc["time"]) - (skews.get(sensor, 0.0) if skews else 0.0)
        by_flow[key].append((t, event_id))
    for members in by_flow.values():
        members.sort()
        head, last = members[0][1], members[0][0]
        for t, event_id in members:
            if t - last > window_s:
                head = event_id
            out[event_id] = head
            last = t
    return out


def _sources(body: Mapping[str, Any]) -> int:
    if body.get("body_version") == 2:
        return len({o["source"] for o in body["observers"]})
    return len(body.get("sources", ()))


def score_contents(bodies: Sequence[Mapping[str, Any]], truth: Mapping[str, Any]) -> dict[str, float]:
    """What the version 2 bodies say of each flow against the simulator's truth (``truth["flows"]``): of the
    stories that hold exactly one true story's events, all of them,

    * ``client_server_right``: the share of flow stories whose client and server are the true ones
      (``client_server_stories``: how many were scored; those with a known initiator separately as
      ``client_server_right_known``);
    * ``totals_within_jitter``: the share of stories seen by several sensors whose reconciled bytes and packets
      per direction — each direction some sensor reported — lie within the sensors' jitter of the truth
      (``totals_stories``: how many were scored).
    """
    stories: Mapping[str, str] = truth["stories"]
    flows: Mapping[str, Mapping[str, Any]] = truth.get("flows") or {}
    size: dict[str, int] = {}
    for story in stories.values():
        size[story] = size.get(story, 0) + 1
    cs = [0, 0]
    cs_known = [0, 0]
    tot = [0, 0]
    for body in bodies:
        if body.get("body_version") != 2 or "client" not in body:
            continue
        keys = {stories.get(e) for e in body["event_ids"]}
        if len(keys) != 1:
            continue
        (key,) = keys
        if key is None or key not in flows or size[key] != len(body["event_ids"]):
            continue
        f = flows[key]
        right = body["client"] == {"ip": f["client_ip"], "port": f["client_port"]} and body["server"] == {
            "ip": f["server_ip"],
            "port": f["server_port"],
        }
        cs[0] += right
        cs[1] += 1
        if body["initiator_known"]:
            cs_known[0] += right
            cs_known[1] += 1
        if len(body["observers"]) < 2:
            continue
        ok = True
        jitter = float(f.get("jitter", 0.03)) + 1e-9
        for kind in ("bytes", "packets"):
            got = (body.get("totals") or {}).get(kind) or {}
            for direction, true_key in (("client_to_server", f"{kind}_c2s"), ("server_to_client", f"{kind}_s2c")):
                if direction in got:
                    want = f[true_key]
                    ok &= abs(got[direction] - want) <= jitter * want + 1
        tot[0] += ok
        tot[1] += 1
    return {
        "client_server_right": cs[0] / cs[1] if cs[1] else 1.0,
        "client_server_right_known": cs_known[0] / cs_known[1] if cs_known[1] else 1.0,
        "client_server_stories": float(cs[1]),
        "totals_within_jitter": tot[0] / tot[1] if tot[1] else 1.0,
        "totals_stories": float(tot[1]),
    }


def score_stories(stories_jsonl: str, truth_json: str, show: int = 0) -> dict[str, float]:
    """Score the output of ``storyline stories --format jsonl`` (latest revisions) against a ``storyline
    simulate`` truth file: the linking (:func:`score`) and the contents (:func:`score_contents`); print the
    ``show`` stories with the most sources in full."""
    with open(truth_json, "rb") as f:
        truth_doc = json.load(f)
    truth = truth_doc["stories"]
    predicted: dict[str, str] = {}
    bodies = []
    with open(stories_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                body = json.loads(line)
                bodies.append(body)
                for eid in body["event_ids"]:
                    predicted[eid] = body["story_id"]
    bodies.sort(key=lambda b: (-_sources(b), -b["event_count"], b["story_id"]))
    for body in bodies[:show]:
        print(json.dumps(body, indent=1))
    return {**score(predicted, truth), **score_contents(bodies, truth_doc)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engine.tools.accuracy", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=Scenario().events)
    ap.add_argument("--seed", type=int, default=Scenario().seed)
    ap.add_argument("--skew-s", type=float, default=Scenario().skew_s)
    ap.add_argument("--window-s", type=float, default=30.0)
    ap.add_argument("--stories", help="score this `storyline stories --format jsonl` output against --truth instead")
    ap.add_argument("--truth", help="the `storyline simulate` truth file of --stories")
    ap.add_argument("--show", type=int, default=0, help="with --stories: print this many fused stories in full")
    args = ap.parse_args(argv)
    if args.stories:
        if not args.truth:
            ap.error("--stories needs --truth")
        result = score_stories(args.stories, args.truth, args.show)
        print(json.dumps({"file": args.stories, **{k: round(v, 6) for k, v in result.items()}}))
        return
    events, truth = generate(Scenario(events=args.events, seed=args.seed, skew_s=args.skew_s))
    for label, skews in (("with skew correction", truth.skews), ("without skew correction", None)):
        result = score(link_reference(events, args.window_s, skews), truth.stories)
        print(json.dumps({"reference": label, **{k: round(v, 6) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
