"""Stories in standard schemas: Elastic Common Schema (ECS 9.3) and OCSF 1.7.0 Network Activity (docs/stories.md,
"ECS and OCSF").

:func:`to_ecs` and :func:`to_ocsf` map a decoded version 2 body (:class:`~engine.correlate.body.StoryBody`);
:func:`encode_story` takes a stored body (JSON bytes) and returns one JSON document, as ``storyline stories`` and
``storyline feed`` write it with ``--format ecs|ocsf``. :mod:`engine.export.families` holds the table of which
sensor attributes go where.

Version 1 bodies (rows written before ``body_version`` 2, which expire with ``ttl_ms``) are not mapped: reading
one raises :class:`~engine.core.errors.InputError` naming the story. So do a merge stub and a flowless story for
OCSF (Network Activity needs an endpoint); ECS maps both.

Pure: no I/O, no store, no environment. The callers (the CLI) choose what to do with a story that has no form.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from engine.core.errors import InputError
from engine.correlate.body import BODY_VERSION, StoryBody, decode_body

from .ecs import ECS_VERSION, to_ecs
from .ocsf import OCSF_VERSION, to_ocsf

__all__ = ["ECS_VERSION", "FORMATS", "OCSF_VERSION", "Format", "encode_story", "read_body", "to_ecs", "to_ocsf"]

Format = Literal["ecs", "ocsf"]
FORMATS: Final[tuple[Format, ...]] = ("ecs", "ocsf")

_encode = msgspec.json.Encoder().encode


class _Head(msgspec.Struct):
    """What a body of any version says about itself (for error messages)."""

    story_id: str | None = None
    revision: int | None = None
    body_version: object = None


def read_body(raw: bytes) -> StoryBody:
    """A stored body → :class:`StoryBody`. Raises :class:`InputError` naming the story for a version 1 body, a
    body of a later version than this Storyline reads, or anything that is not a story body."""
    try:
        return decode_body(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        problem = str(exc)
    try:
        head = msgspec.json.decode(raw, type=_Head)
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise InputError(f"not a story body: {problem}") from None
    story = f"story {head.story_id}" + (f" revision {head.revision}" if head.revision is not None else "")
    if head.body_version is None:
        raise InputError(
            f"{story}: a version 1 body (written before body_version {BODY_VERSION}); it cannot be mapped to ECS"
            " or OCSF — it expires with ttl_ms, or use --format jsonl"
        )
    if isinstance(head.body_version, int) and head.body_version > BODY_VERSION:
        raise InputError(f"{story}: body_version {head.body_version} is newer than this Storyline reads")
    raise InputError(f"{story}: not a valid version {BODY_VERSION} story body: {problem}")


def encode_story(raw: bytes, fmt: str, *, product_version: str) -> bytes:
    """A stored story body as one compact JSON document in ``fmt`` (one of :data:`FORMATS`; no newline).
    ``product_version`` is Storyline's version, which OCSF records. Raises :class:`InputError` when the story has
    no such form (:func:`read_body`; OCSF: a merge stub or a flowless story)."""
    body = read_body(raw)
    if fmt == "ecs":
        return _encode(to_ecs(body))
    if fmt == "ocsf":
        return _encode(to_ocsf(body, product_version=product_version))
    raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
