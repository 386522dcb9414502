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


def score_stories(stories_jsonl: str, truth_json: str, show: int = 0) -> dict[str, float]:
    """Score the output of ``storyline stories --format jsonl`` (latest revisions) against a ``storyline
    simulate`` truth file; print the ``show`` stories with the most sources in full."""
    with open(truth_json, "rb") as f:
        truth = json.load(f)["stories"]
    predicted: dict[str, str] = {}
    bodies = []
    with open(stories_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                body = json.loads(line)
                bodies.append(body)
                for eid in body["event_ids"]:
                    predicted[eid] = body["story_id"]
    bodies.sort(key=lambda b: (-len(b["sources"]), -b["event_count"], b["story_id"]))
    for body in bodies[:show]:
        print(json.dumps(body, indent=1))
    return score(predicted, truth)


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
