"""Driver errors to our hierarchy (engine/store/classify.py): types and codes first, and every entry of the one
table of message matches, one by one."""

from __future__ import annotations

import sqlite3  # noqa: TID251 - the driver's own exceptions are what this tests

import pytest
from scyllapy.exceptions import (  # noqa: TID251 - the driver's own exceptions are what this tests
    ScyllaPyBindingError,
    ScyllaPyDBError,
    ScyllaPyMappingError,
)

from engine.core.errors import SchemaError, StoreError, TransientStoreError
from engine.store.classify import MESSAGE_RULES, SQLITE_BUSY, SQLITE_LOCKED, MessageRule, match_message, sqlite_outcome
from engine.store.cql import classify
from engine.store.embedded import _classify


@pytest.mark.parametrize("rule", MESSAGE_RULES, ids=lambda r: f"{r.backend}:{r.marker}")
def test_every_message_rule_matches_and_is_not_shadowed(rule: MessageRule) -> None:
    text = f"prefix {rule.marker} suffix"
    assert match_message(rule.backend, text) == rule.outcome
    first = next(r for r in MESSAGE_RULES if r.backend == rule.backend and r.marker in text)
    assert first.outcome == rule.outcome, f"{rule.marker!r} is decided by an earlier rule {first.marker!r}"
    assert rule.why


@pytest.mark.parametrize("rule", [r for r in MESSAGE_RULES if r.backend == "cql"], ids=lambda r: r.marker)
def test_each_cql_rule_gives_its_error(rule: MessageRule) -> None:
    err = classify(ScyllaPyDBError(f"Database returned an error: {rule.marker} (x)"), "write")
    retriable = rule.outcome == "transient"
    assert isinstance(err, StoreError) and err.retriable == retriable, err
    if rule.outcome.startswith("auth"):
        assert "authentication failed" in str(err)
    if rule.outcome == "permission":
        assert "permission denied" in str(err)


def test_a_refused_login_wrapped_in_a_transport_error_is_not_retried() -> None:
    text = "Cannot construct new session: IO Error: No connections in the pool; Authentication failed: bad credentials"
    err = classify(ScyllaPyDBError(text), "connect")
    assert not err.retriable and "authentication failed" in str(err)


@pytest.mark.parametrize("cls", [ScyllaPyBindingError, ScyllaPyMappingError])
def test_values_the_driver_cannot_handle_are_never_retried_whatever_the_message(cls: type[Exception]) -> None:
    err = classify(cls("Connection IO Error Timeout Error overloaded"), "write")
    assert type(err) is StoreError and not err.retriable


def test_unknown_driver_messages_are_plain_errors() -> None:
    assert match_message("cql", "Invalid query: line 1:7 no viable alternative") is None
    err = classify(ScyllaPyDBError("Invalid query: line 1:7 no viable alternative"), "read")
    assert type(err) is StoreError and not err.retriable


def _sqlite_error(message: str, code: int | None) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(message)
    if code is not None:
        exc.sqlite_errorcode = code  # what sqlite3 sets on errors it raises (Python >= 3.11)
    return exc


@pytest.mark.parametrize("code", [SQLITE_BUSY, SQLITE_LOCKED, SQLITE_BUSY | (1 << 8), SQLITE_LOCKED | (1 << 8)])
def test_sqlite_busy_and_locked_are_retriable_by_code_extended_codes_included(code: int) -> None:
    assert sqlite_outcome(_sqlite_error("whatever the text", code)) == "transient"
    assert isinstance(_classify(_sqlite_error("whatever the text", code), "write"), TransientStoreError)


def test_sqlite_messages_alone_do_not_make_an_error_retriable() -> None:
    """Busy/locked are read from the code: a message that says "locked" with another code is a plain error."""
    err = _classify(_sqlite_error("database table is locked by the user's trigger", 1), "write")
    assert type(err) is StoreError and not err.retriable


def test_sqlite_missing_table_is_a_schema_error() -> None:
    err = _classify(_sqlite_error("no such table: t__meta", 1), "read schema")
    assert isinstance(err, SchemaError) and "storyline init" in str(err)
