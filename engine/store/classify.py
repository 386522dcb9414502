"""What a driver error means to us: retriable (:class:`TransientStoreError`), a missing schema, a refused login,
or a plain :class:`StoreError`. Exception types and error codes first; messages only where the driver exposes
nothing else, and then only through :data:`MESSAGE_RULES`, the one table of message matches (each entry tested).

- SQLite (``sqlite3``): the error code (``sqlite_errorcode``, Python >= 3.11) decides busy/locked (retriable).
  A missing table has only the generic code SQLITE_ERROR, so its message is in the table.
- CQL (scyllapy 1.x): the driver raises ``ScyllaPyBindingError`` / ``ScyllaPyMappingError`` /
  ``ScyllaPyQueryBuiderError`` for values or statements it cannot handle (never retriable: the same call fails the
  same way), and folds every server and transport error — timeouts, overload, a lost connection, a syntax error,
  a refused login — into ``ScyllaPyDBError`` with a message and no code. Those are told apart by the table.
"""

from __future__ import annotations

import sqlite3
from typing import Literal, NamedTuple

Outcome = Literal["transient", "schema", "auth_required", "auth_refused", "permission"]

# sqlite3 primary result codes (https://sqlite.org/rescode.html): the extended codes keep them in the low byte.
SQLITE_BUSY = 5
SQLITE_LOCKED = 6


class MessageRule(NamedTuple):
    backend: Literal["cql", "sqlite"]
    marker: str  # matched as a substring of the driver's message
    outcome: Outcome
    why: str  # why a message match: what the driver exposes for this case


_CQL_NO_CODE = "scyllapy folds server and transport errors into ScyllaPyDBError: a message, no code"

# The one table of message matches. Order matters: the first rule that matches wins, so the login rules come
# before the transport rules (the driver wraps a refused login in "Cannot construct new session: IO Error: No
# connections in the pool; ...", which would otherwise read as a lost connection and be retried).
MESSAGE_RULES: tuple[MessageRule, ...] = (
    MessageRule("cql", "Authentication is required", "auth_required", _CQL_NO_CODE + " (server AuthenticationError)"),
    MessageRule("cql", "Authentication failed", "auth_refused", _CQL_NO_CODE + " (server AuthenticationError)"),
    MessageRule("cql", "bad credentials", "auth_refused", _CQL_NO_CODE + " (Cassandra's PasswordAuthenticator)"),
    MessageRule("cql", "and/or password are incorrect", "auth_refused", _CQL_NO_CODE + " (ScyllaDB's authenticator)"),
    MessageRule("cql", "doesn't have the right to perform the query", "permission", _CQL_NO_CODE + " (Unauthorized)"),
    MessageRule("cql", "Not enough nodes are alive", "transient", _CQL_NO_CODE + " (server Unavailable)"),
    MessageRule("cql", "Not enough nodes responded", "transient", _CQL_NO_CODE + " (read/write timeout)"),
    MessageRule("cql", "A non-timeout error during a", "transient", _CQL_NO_CODE + " (read/write failure)"),
    MessageRule("cql", "overloaded", "transient", _CQL_NO_CODE + " (server Overloaded)"),
    MessageRule("cql", "still bootstrapping", "transient", _CQL_NO_CODE + " (server IsBootstrapping)"),
    MessageRule("cql", "IO Error", "transient", _CQL_NO_CODE + " (socket errors, as text)"),
    MessageRule("cql", "Timeout Error", "transient", _CQL_NO_CODE + " (driver-side timeout)"),
    MessageRule("cql", "Request timeout", "transient", _CQL_NO_CODE + " (driver request timeout)"),
    MessageRule("cql", "Client timeout", "transient", _CQL_NO_CODE + " (client timeout)"),
    MessageRule("cql", "orphaned stream ids", "transient", _CQL_NO_CODE + " (connection being recycled)"),
    MessageRule("cql", "Unable to allocate stream id", "transient", _CQL_NO_CODE + " (connection saturated)"),
    MessageRule("cql", "Rate limit was exceeded", "transient", _CQL_NO_CODE + " (ScyllaDB per-partition limit)"),
    MessageRule("cql", "is not prepared", "transient", _CQL_NO_CODE + " (node restarted: prepared again on retry)"),
    MessageRule(
        "cql", "early eof", "transient", _CQL_NO_CODE + " (connection closed mid-frame: 'Frame error: early eof')"
    ),
    MessageRule("cql", "No connections in the pool", "transient", _CQL_NO_CODE + " (pool empty while reconnecting)"),
    # Broken or refused connections come as several phrasings ("Connection broken", "connection closed", ...);
    # only ScyllaPyDBError messages are matched (a binding or mapping error never is), which keeps this wide
    # marker to transport failures.
    MessageRule("cql", "Connection", "transient", _CQL_NO_CODE + " (broken/refused connection, several phrasings)"),
    MessageRule("cql", "connection", "transient", _CQL_NO_CODE + " (broken/refused connection, several phrasings)"),
    MessageRule("cql", "Cannot construct new session", "transient", _CQL_NO_CODE + " (no node reachable at startup)"),
    MessageRule("sqlite", "no such table", "schema", "SQLite reports a missing table with the generic SQLITE_ERROR"),
)


def match_message(backend: Literal["cql", "sqlite"], text: str) -> Outcome | None:
    """The outcome of the first rule of ``backend`` whose marker is in ``text``; None when none matches."""
    for rule in MESSAGE_RULES:
        if rule.backend == backend and rule.marker in text:
            return rule.outcome
    return None


def sqlite_outcome(exc: sqlite3.Error) -> Outcome | None:
    """Busy/locked by error code (retriable); a missing table by message; else None (a plain error)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED):
        return "transient"
    return match_message("sqlite", str(exc))
