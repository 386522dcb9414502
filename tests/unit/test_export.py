"""Stories as ECS and OCSF documents (engine/export), validated against the pinned upstream definitions in
tests/data (README there): every field and attribute emitted exists with a value of its type, allowed and enum
values hold, what is required is there — on bodies fused from generated events (flows, flowless stories, merge
stubs, one-direction flow logs, ICMP, IPv6, junk attributes) and on a simulated scenario's stories."""

from __future__ import annotations

import ast
import datetime as dt
import ipaddress
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.errors import InputError
from engine.core.event import Event, encode
from engine.correlate.body import Endpoint, Figures, Observer, StoryBody, Totals, decode_body
from engine.correlate.fuse import EVENT_SCHEMA, HEAD_SCHEMA, event_columns, fuse
from engine.export import ECS_VERSION, OCSF_VERSION, encode_story, read_body, to_ecs, to_ocsf
from engine.export.families import FORMAT_FAMILIES, ROWS, SOURCE_FAMILY, convert, get_path, pick, primary
from engine.ingest.canonical import ParseRules, parse_line
from engine.ingest.network_identity import community_id, flow_identity
from engine.tools.simulate import Scenario, generate

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
VERSION = "9.9.9-test"


@cache
def ecs_ref() -> dict[str, Any]:
    ref: dict[str, Any] = json.loads((DATA / "ecs_fields.json").read_text())
    return ref


@cache
def ocsf_ref() -> dict[str, Any]:
    ref: dict[str, Any] = json.loads((DATA / "ocsf_network_activity.json").read_text())
    return ref


# -- the ECS validator -----------------------------------------------------------------------------------------
CUSTOM = "storyline"  # the documented custom field set
INT64 = 2**63


RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")


def _date_ok(value: object) -> bool:
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        return False
    try:
        return dt.datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def _ip_ok(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _ecs_type_ok(kind: str, value: object) -> bool:
    if kind in ("keyword", "wildcard", "match_only_text", "text", "constant_keyword"):
        return isinstance(value, str)
    if kind == "long":
        return type(value) is int and -INT64 <= value < INT64
    if kind in ("float", "scaled_float"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "ip":
        return _ip_ok(value)
    if kind == "date":
        return _date_ok(value)
    if kind in ("object", "nested", "flattened"):
        return isinstance(value, dict)
    raise AssertionError(f"a type the validator does not know: {kind}")


def ecs_problems(doc: dict[str, Any]) -> list[str]:
    """Everything wrong with an ECS document, judged by the pinned field reference (empty: valid)."""
    ref = ecs_ref()
    fields: dict[str, dict[str, Any]] = ref["fields"]
    problems: list[str] = []

    def leaf(path: str, value: object) -> None:
        spec = fields.get(path)
        if spec is None:
            problems.append(f"{path}: not an ECS field")
            return
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and "array" not in spec["normalize"]:
            problems.append(f"{path}: a list, but the field is not an array")
        if not values:
            problems.append(f"{path}: an empty list")
        for v in values:
            if not _ecs_type_ok(spec["type"], v):
                problems.append(f"{path}: {v!r} is not of type {spec['type']}")

    def walk(node: dict[str, Any], prefix: str) -> None:
        if not node:
            problems.append(f"{prefix or 'document'}: an empty object")
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            if not prefix and key == CUSTOM:
                if not isinstance(value, dict):
                    problems.append(f"{CUSTOM}: not an object")
                continue
            spec = fields.get(path)
            if isinstance(value, dict):
                if spec is not None and spec["type"] != "object":
                    problems.append(f"{path}: an object, but the field is a {spec['type']}")
                elif not any(f.startswith(path + ".") for f in fields):
                    problems.append(f"{path}: no ECS field lies under it")
                walk(value, path)
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                if spec is None or spec["type"] != "object" or "array" not in spec["normalize"]:
                    problems.append(f"{path}: a list of objects, but not an object array field")
                for v in value:
                    walk(v, path)
            else:
                leaf(path, value)

    walk(doc, "")
    for name, spec in fields.items():
        if spec.get("required") and get_path(doc, name) is None:
            problems.append(f"{name}: required, absent")
    if get_path(doc, "ecs.version") != ref["ecs_version"].removesuffix("-dev"):
        problems.append(f"ecs.version: {get_path(doc, 'ecs.version')!r} is not the pinned version")
    kind = get_path(doc, "event.kind")
    if kind not in fields["event.kind"]["allowed_values"]:
        problems.append(f"event.kind: {kind!r} not allowed")
    categories = get_path(doc, "event.category") or []
    types = get_path(doc, "event.type") or []
    expected = fields["event.category"]["expected_event_types"]
    for c in categories:
        if c not in fields["event.category"]["allowed_values"]:
            problems.append(f"event.category: {c!r} not allowed")
        for t in types:
            if t not in expected.get(c, ()):
                problems.append(f"event.type: {t!r} is not an expected type of category {c!r}")
    for t in types:
        if t not in fields["event.type"]["allowed_values"]:
            problems.append(f"event.type: {t!r} not allowed")
    return problems


# -- the OCSF validator ----------------------------------------------------------------------------------------
INT32 = 2**31


def _ocsf_scalar_problem(type_name: str, value: object) -> str | None:
    types = ocsf_ref()["types"]
    spec = types.get(type_name)
    if spec is None:
        return f"unknown type {type_name}"
    base = spec["base"]
    if base == "string_t":
        ok = isinstance(value, str)
    elif base in ("integer_t", "long_t"):
        bound = INT32 if base == "integer_t" else INT64
        ok = type(value) is int and -bound <= value < bound
    elif base == "boolean_t":
        ok = isinstance(value, bool)
    elif base == "float_t":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif base == "json_t":
        ok = True
    else:
        raise AssertionError(f"a base type the validator does not know: {base}")
    if not ok:
        return f"{value!r} is not a {type_name} (base {base})"
    if "regex" in spec and not re.match(spec["regex"], str(value)):
        return f"{value!r} does not match the {type_name} pattern"
    if "max_len" in spec and len(str(value)) > spec["max_len"]:
        return f"{value!r} is longer than {spec['max_len']}"
    if "range" in spec and not spec["range"][0] <= int(str(value)) <= spec["range"][1]:
        return f"{value!r} is outside {spec['range']}"
    if type_name == "ip_t" and not _ip_ok(value):
        return f"{value!r} is not an IP address"
    return None


def _declared_profiles(doc: dict[str, Any]) -> list[str]:
    profiles = get_path(doc, "metadata.profiles")
    return list(profiles) if isinstance(profiles, list) else []


def ocsf_problems(doc: dict[str, Any]) -> list[str]:
    """Everything wrong with an OCSF Network Activity event, judged by the pinned 1.7.0 definitions (empty:
    valid): attributes of the class, its declared profiles and objects only, with their types, enums, sibling
    captions, requirements and at-least-one constraints; no deprecated attribute; the class's identifiers."""
    ref = ocsf_ref()
    cls, objects, profiles = ref["class"], ref["objects"], ref["profiles"]
    problems: list[str] = []
    declared = _declared_profiles(doc)
    for p in declared:
        if p not in cls["profiles"]:
            problems.append(f"metadata.profiles: {p!r} is not a profile of the class")
    class_attrs: dict[str, dict[str, Any]] = dict(cls["attributes"])
    for name, prof in profiles.items():
        for attr, spec in prof.get("attributes", {}).items():
            if name in declared:
                class_attrs[attr] = {**spec, "profile": name}
            elif attr in doc and attr not in cls["attributes"]:
                problems.append(f"{attr}: an attribute of profile {name!r}, which metadata.profiles does not name")

    def check_object(
        obj: dict[str, Any], attrs: dict[str, dict[str, Any]], constraints: dict[str, Any], at: str
    ) -> None:
        for key, value in obj.items():
            path = f"{at}.{key}" if at else key
            spec = attrs.get(key)
            if spec is None:
                problems.append(f"{path}: not an attribute here")
                continue
            if spec.get("profile") and spec["profile"] not in declared:
                problems.append(f"{path}: belongs to profile {spec['profile']!r}, not declared")
            if "deprecated_since" in spec:
                problems.append(f"{path}: deprecated since {spec['deprecated_since']}")
            if spec.get("is_array"):
                if not isinstance(value, list) or not value:
                    problems.append(f"{path}: must be a non-empty array")
                    continue
                for i, v in enumerate(value):
                    check_value(v, spec, f"{path}[{i}]")
            else:
                check_value(value, spec, path)
            sibling = spec.get("sibling")
            if sibling and "enum" in spec and sibling in obj and obj[sibling] != spec["enum"].get(str(value)):
                problems.append(f"{at}.{sibling}: {obj[sibling]!r} is not the caption of {key} {value!r}")
        for key, spec in attrs.items():
            applies = not spec.get("profile") or spec["profile"] in declared
            if spec["requirement"] == "required" and applies and key not in obj:
                problems.append(f"{at + '.' if at else ''}{key}: required, absent")
        for rule, names in constraints.items():
            present = [n for n in names if n in obj]
            if rule == "at_least_one" and not present:
                problems.append(f"{at or 'event'}: needs at least one of {names}")
            elif rule == "just_one" and len(present) != 1:
                problems.append(f"{at or 'event'}: needs exactly one of {names}")
            elif rule not in ("at_least_one", "just_one"):
                problems.append(f"{at or 'event'}: a constraint the validator does not know: {rule}")

    def check_value(value: object, spec: dict[str, Any], path: str) -> None:
        if spec["type"] == "object_t":
            if not isinstance(value, dict):
                problems.append(f"{path}: not an object")
                return
            target = spec["object_type"]
            if target == "object":  # free-form (unmapped, xattributes)
                return
            obj = objects[target]
            check_object(value, obj["attributes"], obj.get("constraints", {}), path)
            return
        problem = _ocsf_scalar_problem(spec["type"], value)
        if problem:
            problems.append(f"{path}: {problem}")
        enum = spec.get("enum")
        if enum is not None and str(value) not in enum:
            problems.append(f"{path}: {value!r} is not among the enum values")

    check_object(doc, class_attrs, cls.get("constraints", {}), "")
    if doc.get("class_uid") != cls["uid"] or doc.get("category_uid") != cls["category_uid"]:
        problems.append("class_uid/category_uid: not Network Activity")
    if doc.get("type_uid") != cls["uid"] * 100 + doc.get("activity_id", -1):
        problems.append(f"type_uid: {doc.get('type_uid')} is not class_uid * 100 + activity_id")
    if get_path(doc, "metadata.version") != ref["ocsf_version"]:
        problems.append("metadata.version: not the pinned version")
    for i, o in enumerate(doc.get("observables", [])):
        where = get_path(doc, o.get("name", ""))
        if where is None or str(where) != o.get("value"):
            problems.append(f"observables[{i}]: {o.get('name')} does not hold {o.get('value')!r}")
        attr_type = _ocsf_attr_type(o.get("name", ""))
        want = ocsf_ref()["types"].get(attr_type or "", {}).get("observable")
        if want is not None and o.get("type_id") != want:
            problems.append(f"observables[{i}]: type_id {o.get('type_id')}, but {attr_type} is observable {want}")
    return problems


def _ocsf_attr_type(path: str) -> str | None:
    """The OCSF type of an attribute path of the class (None: not typed by the schema, e.g. inside unmapped)."""
    ref = ocsf_ref()
    attrs: dict[str, Any] = dict(ref["class"]["attributes"])
    for prof in ref["profiles"].values():
        attrs.update(prof.get("attributes", {}))
    spec: dict[str, Any] | None = None
    for name in path.split("."):
        spec = attrs.get(name)
        if spec is None:
            return None
        if spec["type"] == "object_t":
            if spec["object_type"] == "object":
                return None
            attrs = ref["objects"][spec["object_type"]]["attributes"]
    return None if spec is None else str(spec["type"])


def assert_valid(body: StoryBody) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Both documents of a body, validated (OCSF None where the story has no OCSF form, which must be the case
    exactly for merge stubs and flowless stories)."""
    ecs = to_ecs(body)
    assert ecs_problems(ecs) == [], (ecs_problems(ecs), ecs)
    flowless = body.client is None or body.merged_into is not None
    if flowless:
        with pytest.raises(InputError, match=body.story_id):
            to_ocsf(body, product_version=VERSION)
        return ecs, None
    ocsf = to_ocsf(body, product_version=VERSION)
    assert ocsf_problems(ocsf) == [], (ocsf_problems(ocsf), ocsf)
    return ecs, ocsf


# -- generated bodies -------------------------------------------------------------------------------------------
FLOWS = [
    (6, "10.0.0.1", 40000, "192.0.2.10", 443),
    (17, "10.0.0.53", 53, "10.0.0.7", 51515),
    (6, "2001:db8::1", 51000, "2001:db8::2", 8443),
    (132, "10.9.9.9", 3868, "10.9.9.8", 3868),  # SCTP, two ports of one class: first_seen
    (1, "10.1.1.1", 8, "10.1.1.2", 0),  # ICMP echo: type and code in the ports
    (58, "fe80::1", 128, "fe80::2", 0),  # ICMPv6 echo
    (47, "10.2.2.2", None, "10.2.2.1", None),  # GRE: portless
    (6, "127.0.0.1", 5432, "127.0.0.1", 40001),  # loopback
    (6, "::ffff:10.0.0.1", 1234, "::ffff:10.0.0.2", 80),  # IPv4-mapped IPv6
]
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.sampled_from([2**31, -(2**31) - 1, 2**53, 0]),  # beyond OCSF integer_t, and the edges
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(-(2**40), 2**40), max_size=1),
)
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "action": st.sampled_from(["allow", "deny", "ACCEPT", "REJECT", "drop", "Block", "log-only"]),
    "rule": st.sampled_from(["r-101", "default"]),
    "vpc": st.just("vpc-1"),
    "account": st.just("123456789012"),
    "process": st.sampled_from(["curl", "chrome.exe"]),
    "pid": st.one_of(st.integers(1, 99_999), st.just("4242")),
    "user": st.sampled_from(["alice", "svc-backup"]),
    "host": st.sampled_from(["ws-01", "api.example.org"]),
    "query": st.sampled_from(["example.org", "nx1.example.invalid"]),
    "answer": st.one_of(
        st.lists(st.sampled_from(["192.0.2.1", "2001:db8::5", "cname.example.org"]), max_size=3),
        st.just("192.0.2.9"),
    ),
    "rcode": st.sampled_from(["NOERROR", "NXDOMAIN", 3]),
    "method": st.sampled_from(["GET", "POST"]),
    "path": st.sampled_from(["/", "/api/v1/items"]),
    "status": st.sampled_from([200, 404, "302"]),
    "user_agent": st.just("curl/8.5.0"),
    "sni": st.just("api.example.org"),
    "version": st.sampled_from(["1.2", "1.3"]),
    "cipher": st.just("TLS_AES_128_GCM_SHA256"),
    "ja3": st.just("e7d705a3286e19ea42f587b344ee6865"),
    "ja3s": st.just("f4febc55ea12b31ae17cfb7e614afda8"),
}
SOURCES = [*SOURCE_FAMILY, "zeek"]  # zeek: a source of no family
ATTRS_OF = {f: [r.attr for r in ROWS if r.family == f] for f in set(SOURCE_FAMILY.values())}


@st.composite
def attrs_for(draw: st.DrawFn, source: str) -> dict[str, Any]:
    family = SOURCE_FAMILY.get(source)
    out: dict[str, Any] = {}
    for name in ATTRS_OF.get(family or "", ["note"]):
        if draw(st.integers(0, 9)) < 7:  # mostly present
            out[name] = draw(GOOD.get(name, JUNK)) if draw(st.integers(0, 9)) < 7 else draw(JUNK)
    for kind in ("bytes", "packets"):  # directional or undivided figures, or none (one direction only: a flow log)
        for side in ("src_", "dst_", ""):
            if draw(st.integers(0, 3)) == 0:
                out[f"{side}{kind}"] = draw(st.integers(0, 10**9))
    if draw(st.booleans()):
        out["initiator"] = draw(st.sampled_from(["src", "dst"]))
    return out


@st.composite
def stories(draw: st.DrawFn) -> list[Event]:
    """One story's events: 1..6 reports of one flow (either direction), or 1..2 flowless events."""
    flow = draw(st.sampled_from([*FLOWS, None]))
    n = draw(st.integers(1, 2 if flow is None else 6))
    evs = []
    for i in range(n):
        source = draw(st.sampled_from(SOURCES))
        sensor = f"{source}-{draw(st.integers(1, 2))}"
        time_us = 1_790_000_000_000_000 + draw(st.integers(0, 10**7))
        attrs = draw(attrs_for(source))
        if flow is None:
            evs.append(Event(f"e{i}", time_us, source, sensor, None, False, None, None, None, None, None, attrs))
            continue
        proto, sip, sport, dip, dport = flow
        if draw(st.booleans()):  # reported the other way round
            sip, dip = dip, sip
            # ICMP: the echo reply, type 0 (v4) / 129 (v6), code 0; otherwise the ports swap
            sport, dport = ((0 if proto == 1 else 129), 0) if proto in (1, 58) else (dport, sport)
        sip_n, dip_n, key, rev = flow_identity(proto, sip, sport, dip, dport)
        flow_hash = xxhash.xxh64_intdigest(key)
        evs.append(Event(f"e{i}", time_us, source, sensor, flow_hash, rev, proto, sip_n, sport, dip_n, dport, attrs))
    return evs


def fused(groups: list[list[Event]], heads: list[tuple[int, bool, bool, str | None, int]]) -> list[bytes]:
    """Stored bodies of these stories, by the engine's fuse (the path the engine writes)."""
    evs = [e for g in groups for e in g]
    story = [k for k, g in enumerate(groups) for _ in g]
    cols = event_columns([encode(e) for e in evs])
    t = cols.pop("time_us")
    frame = pl.DataFrame({**cols, "t": t, "story": story, "ingest": [0] * len(evs)}, schema=EVENT_SCHEMA)
    rows = [(k, f"s0001-{k:016x}", *h) for k, h in enumerate(heads)]
    head_frame = pl.DataFrame(rows, schema=HEAD_SCHEMA, orient="row")
    out = fuse(frame, head_frame, rules={}, seed=0, tenant="t1")
    return [b.encode() for b in out["body"].to_list()]


HEADS = st.tuples(
    st.integers(1, 9),
    st.booleans(),
    st.booleans(),
    st.one_of(st.none(), st.just("s0001-00000000000000aa")),
    st.integers(1_790_000_000_000, 1_790_000_100_000),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(stories(), HEADS), min_size=1, max_size=4))
def test_every_generated_story_maps_to_valid_ecs_and_ocsf(cases: list[tuple[list[Event], Any]]) -> None:
    groups = [[msgspec.structs.replace(e, id=f"{k}-{e.id}") for e in evs] for k, (evs, _) in enumerate(cases)]
    for raw in fused(groups, [head for _, head in cases]):
        body = decode_body(raw)
        ecs, ocsf = assert_valid(body)
        # The bytes-level helper gives the same documents.
        assert json.loads(encode_story(raw, "ecs", product_version=VERSION)) == ecs
        if ocsf is not None:
            assert json.loads(encode_story(raw, "ocsf", product_version=VERSION)) == ocsf
        check_values(body, ecs, ocsf)


def check_values(body: StoryBody, ecs: dict[str, Any], ocsf: dict[str, Any] | None) -> None:
    """What the documents say agrees with the body, whatever the body."""
    assert ecs["event"]["id"] == body.story_id and ecs["storyline"]["revision"] == body.revision
    assert ecs["@timestamp"] == body.start
    lead = primary(body.observers)
    assert lead is not None and ecs["observer"]["name"] == lead.sensor
    assert all(lead.events >= o.events for o in body.observers or ())
    if body.client is None or body.server is None:
        assert "source" not in ecs and ocsf is None
        return
    assert ocsf is not None
    assert ecs["source"]["ip"] == ecs["client"]["ip"] == ocsf["src_endpoint"]["ip"] == body.client.ip
    assert ecs["destination"]["ip"] == ecs["server"]["ip"] == ocsf["dst_endpoint"]["ip"] == body.server.ip
    assert ecs["network"]["community_id"] == ocsf["connection_info"]["community_uid"] == body.community_id
    assert ecs["network"]["iana_number"] == str(body.proto) and ocsf["connection_info"]["protocol_num"] == body.proto
    if body.proto in (1, 58):
        assert "port" not in ecs["source"] and "port" not in ocsf["src_endpoint"]
        assert ecs["storyline"]["icmp"] == {"client_port": body.client.port, "server_port": body.server.port}
    else:
        assert ecs["source"].get("port") == ocsf["src_endpoint"].get("port") == body.client.port
    b = body.totals.bytes if body.totals and body.totals.bytes else Figures()
    assert ecs["source"].get("bytes") == ecs["client"].get("bytes") == b.client_to_server
    assert ecs["destination"].get("bytes") == b.server_to_client
    assert ocsf.get("traffic", {}).get("bytes_out") == b.client_to_server
    assert ocsf.get("traffic", {}).get("bytes_in") == b.server_to_client
    assert ecs["network"].get("bytes") == ocsf.get("traffic", {}).get("bytes") == b.total
    assert body.start_us is not None and body.end_us is not None
    assert ecs["event"]["duration"] == (body.end_us - body.start_us) * 1000
    assert ocsf["start_time"] == body.start_us // 1000 and ocsf["duration"] == body.duration_ms
    assert ocsf["is_src_dst_assignment_known"] == body.initiator_known


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=30), st.integers(1, 50), st.booleans(), st.integers(0, 2**41))
def test_merge_stubs_map_to_ecs_and_have_no_ocsf_form(into: str, revision: int, final: bool, emitted: int) -> None:
    stub = StoryBody(
        story_id="s0002-1", tenant="t", revision=revision, final=final, emitted_ms=emitted, merged_into=into
    )
    ecs, ocsf = assert_valid(stub)
    assert ocsf is None
    assert ecs["storyline"]["merged_into"] == into and ecs["event"]["type"] == ["info"]
    assert dt.datetime.fromisoformat(ecs["@timestamp"]).timestamp() * 1000 == pytest.approx(emitted, abs=1)
    with pytest.raises(InputError, match="merge stub"):
        encode_story(msgspec.json.encode(stub), "ocsf", product_version=VERSION)


# -- a simulated scenario: the stories the engine builds from the simulator's sensors ----------------------------
@cache
def simulated_bodies() -> list[StoryBody]:
    scenario = Scenario(events=900, seed=11)
    sim, truth = generate(scenario)
    now_ms = int((scenario.start_s + 4 * scenario.span_s) * 1000)
    by_story: dict[str, list[Event]] = {}
    for e in sim:
        by_story.setdefault(truth.stories[e.id], []).append(parse_line(e.line, ParseRules(), now_ms))
    groups = list(by_story.values())
    raws = fused(groups, [(1, True, False, None, now_ms)] * len(groups))
    return [decode_body(r) for r in raws]


def test_every_simulated_story_maps_to_valid_ecs_and_ocsf() -> None:
    bodies = simulated_bodies()
    assert len(bodies) > 250
    seen: set[str] = set()
    for body in bodies:
        ecs, ocsf = assert_valid(body)
        check_values(body, ecs, ocsf)
        sources = {o.source for o in body.observers or ()}
        # Each family's attributes land where the table says.
        if "dns" in sources:
            assert ecs["dns"]["question"]["name"] and ecs["network"]["protocol"] == "dns"
            seen.add("dns")
        if "http" in sources:
            assert ecs["url"]["domain"] and ecs["http"]["request"]["method"]
            assert ocsf is not None and ocsf["url"]["hostname"] == ecs["url"]["domain"]
            seen.add("http")
        if "endpoint" in sources:
            assert ecs["related"]["user"] and ecs["related"]["hosts"]
            if ocsf is not None:
                assert ocsf["actor"]["process"]["pid"] > 0 and ocsf["device"]["hostname"]
                assert "host" in ocsf["metadata"]["profiles"]
            seen.add("endpoint")
        if sources & {"firewall", "cloud"}:
            verdicts = {"allowed", "denied"} & set(ecs["event"]["type"])
            assert len(verdicts) == 1
            assert ocsf is not None and ocsf["action_id"] in (1, 2)
            assert "security_control" in ocsf["metadata"]["profiles"]
            seen.add("flow")
        if ocsf is None:
            seen.add("flowless")
            assert ecs["event"]["category"] == ["host"] and "source" not in ecs
    assert seen == {"dns", "http", "endpoint", "flow", "flowless"}


# -- explicit values -----------------------------------------------------------------------------------------------
def _story(*, reversed_first: bool) -> StoryBody:
    """A TCP session 10.0.0.1:40000 -> 192.0.2.10:443 whose first report comes from the server's side."""
    fw = Observer(
        sensor="fw-1",
        source="firewall",
        first_us=1_790_000_000_000_000,
        last_us=1_790_000_000_000_000,
        events=1,
        reported_direction="server_to_client" if reversed_first else "client_to_server",
        bytes=Figures(1200, 54_000, 55_200),
        packets=Figures(10, 40, 50),
        attrs={"action": "deny", "rule": "r-7", "src_bytes": 54_000, "dst_bytes": 1200, "initiator": "dst"},
    )
    flowlog = Observer(
        sensor="vpcflow-1",
        source="cloud",
        first_us=1_790_000_000_250_000,
        last_us=1_790_000_002_500_999,
        events=2,
        reported_direction="both",
        bytes=Figures(1190, 54_100, 55_290),
        attrs={"action": "ACCEPT", "vpc": "vpc-1", "src_bytes": 54_100},
    )
    return StoryBody(
        story_id="s0003-00000000000000ab",
        tenant="acme",
        revision=2,
        final=True,
        emitted_ms=1_790_000_010_000,
        start="2026-09-21T14:13:20.000000Z",
        end="2026-09-21T14:13:22.500999Z",
        start_us=1_790_000_000_000_000,
        end_us=1_790_000_002_500_999,
        duration_ms=2500,
        event_count=3,
        community_id=community_id(6, "10.0.0.1", 40000, "192.0.2.10", 443),
        proto=6,
        transport="tcp",
        client=Endpoint("10.0.0.1", 40000),
        server=Endpoint("192.0.2.10", 443),
        initiator_known=True,
        initiator_rule="sensor",
        totals=Totals(bytes=Figures(1200, 54_100, 55_300), packets=Figures(10, 40, 50)),
        observers=[fw, flowlog],
        event_ids=["a", "b", "c"],
    )


def test_the_client_is_the_source_and_bytes_follow_client_to_server() -> None:
    body = _story(reversed_first=True)
    ecs, ocsf = assert_valid(body)
    assert ocsf is not None
    for side in ("source", "client"):
        assert ecs[side] == {"address": "10.0.0.1", "ip": "10.0.0.1", "port": 40000, "bytes": 1200, "packets": 10}
    for side in ("destination", "server"):
        assert ecs[side] == {"address": "192.0.2.10", "ip": "192.0.2.10", "port": 443, "bytes": 54_100, "packets": 40}
    assert ecs["network"]["bytes"] == 55_300 and ecs["network"]["packets"] == 50
    assert ocsf["src_endpoint"] == {"ip": "10.0.0.1", "port": 40000}
    assert ocsf["dst_endpoint"] == {"ip": "192.0.2.10", "port": 443}
    assert ocsf["traffic"] == {
        "bytes": 55_300,
        "bytes_out": 1200,  # OCSF: source to destination
        "bytes_in": 54_100,
        "packets": 50,
        "packets_out": 10,
        "packets_in": 40,
    }
    assert ecs["related"]["ip"] == ["10.0.0.1", "192.0.2.10"]


def test_a_dns_name_names_the_server_and_the_related_story_is_kept() -> None:
    body = msgspec.structs.replace(
        _story(reversed_first=False), dns_names=["cdn7.example.net"], related_stories=["s0001-00000000000000cd"]
    )
    ecs, ocsf = assert_valid(body)
    assert ocsf is not None
    assert ecs["destination"]["domain"] == ecs["server"]["domain"] == "cdn7.example.net"
    assert "domain" not in ecs["source"]
    assert ecs["dns"]["question"]["name"] == "cdn7.example.net"
    assert "cdn7.example.net" in ecs["related"]["hosts"]
    assert ecs["storyline"]["related_stories"] == ["s0001-00000000000000cd"]
    assert ecs["storyline"]["dns_names"] == ["cdn7.example.net"]
    assert ocsf["dst_endpoint"]["hostname"] == "cdn7.example.net"
    assert {"name": "dst_endpoint.hostname", "type_id": 1, "type": "Hostname", "value": "cdn7.example.net"} in ocsf[
        "observables"
    ]
    assert ocsf["unmapped"]["storyline"]["related_stories"] == ["s0001-00000000000000cd"]
    plain, plain_ocsf = assert_valid(_story(reversed_first=False))
    assert "domain" not in plain["destination"] and "dns" not in plain
    assert plain_ocsf is not None and "hostname" not in plain_ocsf["dst_endpoint"]


def test_community_id_times_and_durations() -> None:
    body = _story(reversed_first=False)
    ecs, ocsf = assert_valid(body)
    assert ocsf is not None
    cid = community_id(6, "192.0.2.10", 443, "10.0.0.1", 40000)  # either direction: one id
    assert ecs["network"]["community_id"] == ocsf["connection_info"]["community_uid"] == cid
    assert ecs["network"]["transport"] == ocsf["connection_info"]["protocol_name"] == "tcp"
    assert ecs["network"]["iana_number"] == "6" and ecs["network"]["type"] == "ipv4"
    assert ecs["@timestamp"] == ecs["event"]["start"] == "2026-09-21T14:13:20.000000Z"
    assert ecs["event"]["end"] == "2026-09-21T14:13:22.500999Z"
    assert ecs["event"]["duration"] == 2_500_999_000  # ns
    assert ecs["event"]["created"] == "2026-09-21T14:13:30.000Z"
    assert ocsf["time"] == ocsf["start_time"] == 1_790_000_000_000 and ocsf["end_time"] == 1_790_000_002_500
    assert ocsf["duration"] == 2500  # ms
    assert ocsf["metadata"]["processed_time"] == 1_790_000_010_000
    assert ocsf["metadata"]["uid"] == "s0003-00000000000000ab:2"
    assert ocsf["metadata"]["correlation_uid"] == "s0003-00000000000000ab"
    assert ocsf["metadata"]["product"] == {"name": "Storyline", "vendor_name": "Storyline", "version": VERSION}
    assert (ocsf["activity_id"], ocsf["type_uid"], ocsf["severity_id"]) == (6, 400106, 1)
    assert ocsf["connection_info"]["direction_id"] == 0 and "boundary_id" not in ocsf["connection_info"]
    assert ecs["ecs"]["version"] == ECS_VERSION and ocsf["metadata"]["version"] == OCSF_VERSION


def test_event_types_and_the_firewall_verdict() -> None:
    body = _story(reversed_first=False)
    ecs, ocsf = assert_valid(body)
    assert ocsf is not None
    # fw-1 comes before vpcflow-1 by name: its deny decides, whatever the flow log says.
    assert ecs["event"]["type"] == ["connection", "end", "denied"]
    assert (ocsf["action_id"], ocsf["action"], ocsf["disposition_id"], ocsf["disposition"]) == (
        2,
        "Denied",
        2,
        "Blocked",
    )
    assert ocsf["firewall_rule"] == {"name": "r-7"} and ocsf["metadata"]["profiles"] == ["security_control"]
    # The primary observer has the most events: the flow log.
    assert ecs["observer"] == {"name": "vpcflow-1", "type": "cloud"}
    provisional = msgspec.structs.replace(body, final=False)
    assert to_ecs(provisional)["event"]["type"] == ["connection", "start", "denied"]


def test_one_family_several_sensors_the_first_by_name_gives_the_value() -> None:
    base = _story(reversed_first=False)
    dns = [
        Observer(sensor=name, source="dns", first_us=1, last_us=1, events=ev, attrs={"query": q, "rcode": rc})
        for name, ev, q, rc in (("dns-2", 5, "b.example.org", "NOERROR"), ("dns-1", 1, "a.example.org", None))
    ]
    body = msgspec.structs.replace(base, observers=[*dns, *(base.observers or [])])
    ecs, ocsf = assert_valid(body)
    assert ocsf is not None
    assert ecs["dns"]["question"]["name"] == "a.example.org"  # dns-1 sorts first, though dns-2 saw more
    assert ecs["dns"]["response_code"] == "NOERROR"  # dns-1 has no rcode: the next one's
    assert ecs["network"]["protocol"] == "dns" and "protocol" in ecs["event"]["type"]
    assert ecs["observer"]["name"] == "dns-2"  # the primary: most events
    assert [o["sensor"] for o in ecs["storyline"]["observers"]] == ["dns-2", "dns-1", "fw-1", "vpcflow-1"]
    # OCSF Network Activity has no DNS fields: the values are in unmapped, the query also an observable.
    assert ocsf["unmapped"]["storyline"]["dns"] == {"query": "a.example.org", "rcode": "NOERROR"}
    assert {"name": "unmapped.storyline.dns.query", "type_id": 1, "type": "Hostname", "value": "a.example.org"} in (
        ocsf["observables"]
    )


def test_values_that_do_not_fit_their_target_go_to_the_namespace() -> None:
    base = _story(reversed_first=False)
    edr = Observer(
        sensor="edr-1",
        source="endpoint",
        first_us=1,
        last_us=1,
        events=1,
        attrs={"process": "curl", "pid": "not-a-pid", "user": ["x"], "host": "ws-1"},
    )
    body = msgspec.structs.replace(base, observers=[edr, *(base.observers or [])])
    ecs, ocsf = assert_valid(body)
    assert ocsf is not None
    # A process without a pid is not an OCSF process: name and pid stay in unmapped; the user is no string.
    assert "actor" not in ocsf and ocsf["device"] == {"hostname": "ws-1", "type_id": 0, "type": "Unknown"}
    assert ocsf["unmapped"]["storyline"]["endpoint"] == {"process": "curl", "pid": "not-a-pid", "user": ["x"]}
    assert ocsf["metadata"]["profiles"] == ["host", "security_control"]
    assert ecs["storyline"]["endpoint"] == {"process": "curl", "pid": "not-a-pid", "user": ["x"]}
    assert ecs["related"]["hosts"] == ["ws-1"] and "user" not in ecs["related"]


def test_icmp_ipv6_and_loopback() -> None:
    base = _story(reversed_first=False)
    icmp = msgspec.structs.replace(
        base,
        community_id=community_id(58, "2001:db8::1", 128, "2001:db8::2", 0),
        proto=58,
        transport="ipv6-icmp",
        client=Endpoint("2001:db8::1", 128),
        server=Endpoint("2001:db8::2", 0),
        totals=None,
    )
    ecs, ocsf = assert_valid(icmp)
    assert ocsf is not None
    assert ecs["source"] == {"address": "2001:db8::1", "ip": "2001:db8::1"} and ecs["network"]["type"] == "ipv6"
    assert ecs["storyline"]["icmp"] == ocsf["unmapped"]["storyline"]["icmp"] == {"client_port": 128, "server_port": 0}
    assert ocsf["connection_info"]["protocol_ver_id"] == 6 and "traffic" not in ocsf
    loop = msgspec.structs.replace(base, client=Endpoint("127.0.0.1", 40000), server=Endpoint("127.0.0.2", 5432))
    _, ocsf = assert_valid(loop)
    assert ocsf is not None and ocsf["connection_info"]["boundary_id"] == 1


def test_a_flowless_story_is_a_host_event_in_ecs_and_has_no_ocsf_form() -> None:
    body = StoryBody(
        story_id="s0004-1",
        tenant="t",
        revision=1,
        final=True,
        emitted_ms=1_790_000_010_000,
        start="2026-09-21T14:13:20.000000Z",
        end="2026-09-21T14:13:20.000000Z",
        start_us=1_790_000_000_000_000,
        end_us=1_790_000_000_000_000,
        duration_ms=0,
        event_count=1,
        observers=[
            Observer(
                sensor="edr-1",
                source="endpoint",
                first_us=1_790_000_000_000_000,
                last_us=1_790_000_000_000_000,
                events=1,
                attrs={"process": "bash", "pid": 4242, "user": "root", "host": "db-1", "action": "process_start"},
            )
        ],
        event_ids=["x"],
    )
    ecs, ocsf = assert_valid(body)
    assert ocsf is None
    assert ecs["event"]["category"] == ["host"] and ecs["event"]["type"] == ["info"]
    assert ecs["related"] == {"user": ["root"], "hosts": ["db-1"]} and ecs["event"]["duration"] == 0
    with pytest.raises(InputError, match="without a flow"):
        encode_story(msgspec.json.encode(body), "ocsf", product_version=VERSION)


def test_version_1_and_broken_bodies_are_refused_by_name() -> None:
    v1 = {"story_id": "s0000-0000000000000001", "revision": 3, "final": True, "first_seen": 1, "event_count": 1}
    for fmt in ("ecs", "ocsf"):
        with pytest.raises(InputError, match=r"story s0000-0000000000000001 revision 3: a version 1 body"):
            encode_story(json.dumps(v1).encode(), fmt, product_version=VERSION)
    with pytest.raises(InputError, match="newer than"):
        read_body(json.dumps({**v1, "body_version": 3}).encode())
    with pytest.raises(InputError, match="not a valid version 2"):
        read_body(json.dumps({**v1, "body_version": 2}).encode())
    with pytest.raises(InputError, match="not a story body"):
        read_body(b"[1, 2")
    with pytest.raises(ValueError, match="unknown export format"):
        encode_story(msgspec.json.encode(_story(reversed_first=False)), "cef", product_version=VERSION)


def test_the_validators_see_violations() -> None:
    """The checks are not vacuous: planted mistakes are found."""
    body = _story(reversed_first=False)
    ecs, ocsf = to_ecs(body), to_ocsf(body, product_version=VERSION)
    bad_ecs = [
        ("source", {**ecs["source"], "port": "443"}),  # long as a string
        ("network", {**ecs["network"], "iana_number": 6}),  # keyword as a number
        ("event", {**ecs["event"], "type": ["connection", "creation"]}),  # not a network event type
        ("event", {**ecs["event"], "kind": "story"}),
        ("event", {**ecs["event"], "start": "2026-09-21 14:13:20"}),  # no offset
        ("process", {"name": "curl"}),  # not in the pinned reference
        ("related", {"ip": ["10.0.0.300"]}),
        ("ecs", {"version": "1.0.0"}),
    ]
    for key, value in bad_ecs:
        assert ecs_problems({**ecs, key: value}), key
    assert ecs_problems({k: v for k, v in ecs.items() if k != "@timestamp"})
    bad_ocsf: list[tuple[str, Any]] = [
        ("activity_id", 8),  # not in the enum
        ("type_uid", 400101),
        ("src_endpoint", {"ip": "10.0.0.1", "port": 70000}),
        ("src_endpoint", {"ip": "not-an-ip"}),
        ("connection_info", {"community_uid": "x"}),  # direction_id is required
        ("traffic", {"bytes_out": "12"}),
        ("proxy", {"ip": "10.0.0.1"}),  # deprecated
        ("osint", [{"type_id": 1, "value": "x"}]),  # a profile not declared
        ("actor", {"process": {"name": "curl"}}),  # a process needs a pid, uid or cpid
        ("severity", "Low"),  # not the caption of severity_id 1
        ("tls", {"sni": "x"}),  # version is required
        ("observables", [{"name": "src_endpoint.ip", "type_id": 1, "value": "10.0.0.1"}]),  # an IP is type 2
    ]
    for key, value in bad_ocsf:
        assert ocsf_problems({**ocsf, key: value}), key
    for required in ("time", "metadata", "severity_id"):
        assert ocsf_problems({k: v for k, v in ocsf.items() if k != required}), required
    assert ocsf_problems({k: v for k, v in ocsf.items() if k not in ("src_endpoint", "dst_endpoint")})


def test_the_table_targets_are_fields_of_the_pinned_definitions() -> None:
    fields = ecs_ref()["fields"]
    for row in ROWS:
        for target in row.ecs:
            assert target.path in fields, (row, target)
        for target in row.ocsf:
            assert _ocsf_attr_type(target.path) is not None, (row, target)
    assert convert("integer", True) is None and convert("integer", "12") == 12
    assert convert("integer", 2**31 - 1) == 2**31 - 1 and convert("integer", 2**31) is None
    assert convert("keyword", 3) == "3" and convert("keyword", False) is None and convert("keyword", [1]) is None
    assert convert("ecs_action", "REJECT") == "denied" and convert("ocsf_action", "Accept") == 1
    assert convert("ocsf_disposition", "drop") == 2 and convert("ocsf_action", "log") is None
    assert convert("ips", ["10.0.0.1", "x", "2001:DB8::1"]) == ["10.0.0.1", "2001:db8::1"]
    assert convert("dns_answers", ["a.example", 3, None]) == [{"data": "a.example"}, {"data": "3"}]
    assert pick(None) == [] and primary([]) is None


def test_the_docs_family_table_matches_the_code() -> None:
    doc = (ROOT / "docs" / "stories.md").read_text()
    lines = {
        line.split("|")[1].strip() + " " + line.split("|")[2].strip(): line
        for line in doc.splitlines()
        if line.startswith("| ") and line.count("|") == 5
    }
    for row in ROWS:
        line = lines.get(f"{row.family} `{row.attr}`")
        assert line is not None, f"docs/stories.md has no row for {row.family} {row.attr}"
        ecs_cell, ocsf_cell = line.split("|")[3], line.split("|")[4]
        for target in row.ecs:
            assert f"`{target.path}" in ecs_cell, (row, target)
        for target in row.ocsf:
            assert f"`{target.path}" in ocsf_cell, (row, target)
        assert (not row.ecs) == (ecs_cell.strip() == "—") and (not row.ocsf) == (ocsf_cell.strip() == "—"), row
    for source, family in SOURCE_FAMILY.items():
        assert any(f"`{source}`" in ln and f"| `{family}` |" in ln for ln in doc.splitlines()), source
    for fmt, families in FORMAT_FAMILIES.items():
        for family, (markers, paths) in families.items():
            line = lines.get(f"`{fmt}` `{family}`")
            assert line is not None, f"docs/stories.md has no row for the {fmt} {family} family"
            assert all(f"`{m}`" in line.split("|")[3] for m in markers), (fmt, family)
            for attr, found in paths.items():
                assert f"`{attr}` ← " + " or ".join(f"`{p}`" for p in found) in line, (fmt, family, attr)


def test_the_docs_example_is_what_the_mappers_write() -> None:
    """docs/stories.md shows one story as its body, ECS and OCSF: the last two are what this code makes of the
    first (regenerate them when the mapping changes)."""
    from engine import __version__

    doc = (ROOT / "docs" / "stories.md").read_text()

    def block_after(heading: str) -> Any:
        rest = doc[doc.index(heading) :]
        start = rest.index("```json\n") + len("```json\n")
        return json.loads(rest[start : rest.index("\n```", start)])

    body = msgspec.json.encode(block_after("## An example"))
    assert json.loads(encode_story(body, "ecs", product_version=__version__)) == block_after("### The example in ECS")
    ocsf = json.loads(encode_story(body, "ocsf", product_version=__version__))
    assert ocsf == block_after("### The example in OCSF")
    assert {o.source for o in decode_body(body).observers or ()} >= {"firewall", "cloud", "endpoint"}


def test_the_export_package_is_pure() -> None:
    """No I/O, no store or driver, no environment, no clock: only the body's declaration, errors, and the pure
    record paths and DNS path table it shares with the story builder."""
    banned = ("os", "pathlib", "socket", "asyncio", "subprocess", "time", "io", "sqlite3", "scyllapy", "cassandra")
    for path in sorted((ROOT / "engine" / "export").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in banned, f"{path.name} imports {name}"
                if name.startswith("engine."):
                    allowed = ("engine.core.errors", "engine.correlate.body", "engine.correlate.dns")
                    assert name in (*allowed, "engine.correlate.paths"), f"{path.name}: {name}"
    source = "\n".join(p.read_text() for p in (ROOT / "engine" / "export").glob("*.py"))
    for call in (".now(", ".today(", "time.time", "getenv", "environ[", "environ.get", "open("):
        assert call not in source, call


def test_sensor_formats_attributes_map_by_their_own_names_and_a_zeek_node_is_in_every_family_it_logged() -> None:
    """Issue 18: a Zeek node's observer merges its conn and http records; a Suricata sensor's holds EVE's nested
    objects; a VPC flow log names its fields as AWS does. Their attributes land where the canonical ones do."""
    zeek = Observer(sensor="zeek-1", source="zeek.conn", first_us=1, last_us=2, events=2,
                    attrs={"conn_state": "SF", "history": "ShADadFf", "method": "GET", "host": "example.com",
                           "uri": "/login", "status_code": 302, "user_agent": "curl/8", "trans_depth": 1})  # fmt: skip
    eve = Observer(sensor="ids-1", source="suricata.flow", first_us=1, last_us=2, events=3,
                   attrs={"flow": {"state": "closed"}, "tls": {"sni": "example.com", "version": "TLS 1.3",
                          "ja3": {"hash": "e7d705a3286e19ea42f587b344ee6865"}},
                          "dns": {"version": 3, "queries": [{"rrname": "example.com", "rrtype": "A"}],
                                  "answers": [{"rdata": "93.184.216.34"}, {"rdata": "93.184.216.35"}],
                                  "rcode": "NOERROR"}})  # fmt: skip
    vpc = Observer(sensor="vpcflow-123456789012", source="vpcflow", first_us=1, last_us=2, events=1,
                   attrs={"action": "REJECT", "account-id": "123456789012", "interface-id": "eni-1"})  # fmt: skip
    body = msgspec.structs.replace(_story(reversed_first=False), observers=[zeek, eve, vpc])
    ecs, ocsf = assert_valid(body)
    assert ocsf is not None
    assert ecs["url"] == {"domain": "example.com", "path": "/login"}
    assert ecs["http"] == {"request": {"method": "GET"}, "response": {"status_code": 302}}
    assert ecs["tls"]["client"] == {"server_name": "example.com", "ja3": "e7d705a3286e19ea42f587b344ee6865"}
    assert ecs["dns"]["question"]["name"] == "example.com" and ecs["dns"]["response_code"] == "NOERROR"
    assert ecs["dns"]["resolved_ip"] == ["93.184.216.34", "93.184.216.35"]
    assert ecs["network"]["protocol"] == "dns"  # the first of dns, http, tls present
    assert ecs["event"]["type"] == ["connection", "end", "protocol", "denied"]  # the flow log's REJECT
    assert ocsf["tls"]["sni"] == "example.com" and ocsf["url"]["path"] == "/login"
    families = {o["sensor"]: o.get("family") for o in ecs["storyline"]["observers"]}
    assert families == {"ids-1": "flow", "vpcflow-123456789012": "flow", "zeek-1": "flow"}
    # A Zeek node that logged only connections is in the flow family alone: no protocol is claimed for it.
    only_conn = msgspec.structs.replace(zeek, attrs={"conn_state": "S0"})
    ecs2, _ = assert_valid(msgspec.structs.replace(body, observers=[only_conn]))
    assert "protocol" not in ecs2["network"] and "url" not in ecs2


def test_an_observer_with_several_sources_is_in_each_of_their_families() -> None:
    """A Zeek node's conn and ssl records are one observer; its body lists both sources, and it is in the tls
    family by them even when no marker field of ssl.log made it into the merged attributes."""
    zeek = Observer(sensor="zeek-1", source="zeek.conn", first_us=1, last_us=2, events=2,
                    attrs={"conn_state": "SF", "version": "TLSv13"}, sources=["zeek.conn", "zeek.ssl"])  # fmt: skip
    ecs, ocsf = assert_valid(msgspec.structs.replace(_story(reversed_first=False), observers=[zeek]))
    assert ocsf is not None
    assert ecs["tls"]["version"] == "TLSv13" and ecs["network"]["protocol"] == "tls"
    assert ecs["storyline"]["observers"][0]["sources"] == ["zeek.conn", "zeek.ssl"]
    alone = msgspec.structs.replace(zeek, sources=None)
    ecs2, _ = assert_valid(msgspec.structs.replace(_story(reversed_first=False), observers=[alone]))
    assert "tls" not in ecs2  # without the ssl source and without a marker: a Zeek node that logged connections
