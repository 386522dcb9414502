"""Paths into a sensor record's attributes (``dns.answers.*.rdata``): how the story builder (DNS answers) and the
exporters (ECS, OCSF fields) read a format's nested records, from one declaration of where a value is. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["get_path"]


def get_path(doc: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of a nested document (``"connection_info.direction_id"``); None when absent. In
    a list, a number picks an element (``dns.queries.0.rrname``) and ``*`` maps the rest of the path over every
    element (``dns.answers.*.rdata``: the values found, None when there are none)."""
    node: Any = doc
    names = path.split(".")
    for i, name in enumerate(names):
        if isinstance(node, list):
            if name == "*":
                rest = ".".join(names[i + 1 :])
                found = [v for v in (get_path({"v": e}, f"v.{rest}" if rest else "v") for e in node) if v is not None]
                return found or None
            if name.isdigit() and int(name) < len(node):
                node = node[int(name)]
                continue
            return None
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node
