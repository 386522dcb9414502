"""The one exception hierarchy of Storyline.

Every error the library raises derives from :class:`StorylineError`. ``retriable`` says whether doing the same
thing again may succeed (a timeout, an unavailable replica, a restarting node); callers retry only those, and
only a bounded number of times.
"""

from __future__ import annotations

from collections.abc import Sequence


class StorylineError(Exception):
    """Root of every error raised by Storyline."""

    retriable: bool = False


class ConfigError(StorylineError):
    """A configuration value is missing, malformed or inconsistent. The message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class InputError(StorylineError):
    """A record given to Storyline is malformed; the message says which field and why."""


class StoreError(StorylineError):
    """The database refused or failed an operation."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class TransientStoreError(StoreError):
    """A failure that may succeed when retried: timeout, unavailable replicas, overload, lost connection."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=True)


class SchemaError(StoreError):
    """The keyspace is missing, was made by an incompatible version, or disagrees with the configuration."""


class FencedError(StoreError):
    """An offset commit carried a stale owner epoch (another owner claimed the shard) or moved backwards."""


class WriteTooLateError(StoreError):
    """A write would land after its bucket's deadline; the caller must choose a newer bucket and retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=True)


class LeaseLapsedError(StorylineError):
    """A worker could not renew its lease on some shards in time: it writes nothing for them until a renewal
    succeeds (then it goes on where it was: a renewal that gets through proves nobody took them) or another owner
    takes them (then it gives them up)."""

    retriable = True


class StageOrderError(StorylineError):
    """A stage was handed a shard's bucket at or before one it already consumed: the caller's bug, caught before
    the stage's state changed (fed twice, a stateful stage would build some stories twice). Not retriable: the
    worker exits, and its restart rebuilds the state from the committed offsets."""


class ClockSkewError(StorylineError):
    """This host's clock differs from the database's by more than ``max_clock_skew_ms``."""


def mask(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced by ``***`` (error messages that could quote a password)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
