"""The story body's declaration, its JSON Schema file and the readers of both body versions."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from engine.cli import _story_line
from engine.correlate.body import StoryBody, decode_body, json_schema

ROOT = Path(__file__).resolve().parents[2]


def test_the_schema_file_is_generated_from_the_declaration() -> None:
    on_disk = json.loads((ROOT / "docs" / "story.schema.json").read_text())
    assert on_disk == json_schema(), "regenerate: python -c 'from engine.correlate.body import json_schema; ...'"


def test_a_merge_stub_has_only_identity_fields_and_the_version_first() -> None:
    stub = StoryBody(story_id="s1", tenant="t", revision=3, final=True, emitted_ms=5, merged_into="s0")
    raw = msgspec.json.encode(stub)
    assert raw.startswith(b'{"body_version":2,')
    assert json.loads(raw) == {
        "body_version": 2,
        "story_id": "s1",
        "tenant": "t",
        "revision": 3,
        "final": True,
        "emitted_ms": 5,
        "merged_into": "s0",
    }
    assert decode_body(raw) == stub


def test_a_version_1_body_is_not_read_as_version_2_but_the_table_shows_it() -> None:
    v1 = {
        "story_id": "s0-1",
        "revision": 1,
        "final": True,
        "community_id": "1:x",
        "flow": {"proto": 6, "a": {"ip": "10.0.0.1", "port": 40000}, "b": {"ip": "2001:db8::1", "port": 443}},
        "first_seen": 1_790_000_000_000_000,
        "last_seen": 1_790_000_001_000_000,
        "event_count": 2,
        "event_ids": ["a", "b"],
        "sources": ["firewall"],
        "sensors": ["fw-1", "fw-2"],
        "directions": {"a": "a->b", "b": "b->a"},
        "attrs": {"firewall": {}},
    }
    with pytest.raises(msgspec.ValidationError):
        decode_body(json.dumps(v1))
    line = _story_line("s0-1", 1, v1)
    assert "2026-09-21T14:13:20.000000Z" in line and "fw-1,fw-2" in line
    assert "10.0.0.1:40000 <-> [2001:db8::1]:443 (v1 body)" in line


def test_the_table_line_of_a_version_2_body_names_client_and_server() -> None:
    body = {
        "body_version": 2,
        "event_count": 3,
        "start": "2026-09-21T14:13:20.000000Z",
        "observers": [{"sensor": "edr-1"}, {"sensor": "fw-1"}],
        "client": {"ip": "10.0.0.1", "port": 40000},
        "server": {"ip": "192.0.2.7", "port": 443},
        "initiator_known": False,
    }
    line = _story_line("s0-2", 2, body)
    assert "edr-1,fw-1" in line and "10.0.0.1:40000 -> 192.0.2.7:443 (guessed)" in line
    flowless = {"body_version": 2, "event_count": 1, "start": "x", "observers": [{"sensor": "edr-1"}]}
    assert _story_line("s0-3", 1, flowless).endswith(" -")
