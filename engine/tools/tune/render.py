"""TOML rendering of a recommendation: every key preceded by its reasoning as ``#`` comments.

Pure string work; knows nothing of the sizing model beyond which keys hold inline tables.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from typing import Any

from engine.tools.tune.model import INLINE_TABLES

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key(name: str) -> str:
    return name if _BARE.fullmatch(name) else _string(name)


def _string(s: str) -> str:
    """A TOML basic string: quote, backslash and control characters (but tab) escaped."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _comment(lines: list[str], width: int = 116) -> list[str]:
    out: list[str] = []
    for line in lines:
        out += ["# " + w for w in textwrap.wrap(line, width - 2, break_on_hyphens=False)] or ["#"]
    return out


def to_toml(tree: Mapping[str, Any], reasons: Mapping[str, list[str]], title: str = "") -> str:
    """The tree as TOML, each key preceded by its reasons as comments; the header ("" reasons) first."""
    out: list[str] = []
    if title:
        out += _comment([title])
    out += _comment(list(reasons.get("", [])))
    if out:
        out.append("")

    def table(prefix: str, node: Mapping[str, Any]) -> None:
        subs = []
        for k, v in node.items():
            dotted = f"{prefix}{k}"
            if isinstance(v, dict) and dotted not in INLINE_TABLES:
                subs.append((dotted, v))
                continue
            out.extend(_comment(list(reasons.get(dotted, []))))
            out.append(f"{_key(str(k))} = {_value(v)}")
        for dotted, v in subs:
            out.append("")
            out.extend(_comment(list(reasons.get(dotted, []))))
            out.append(f"[{'.'.join(_key(p) for p in dotted.split('.'))}]")
            table(dotted + ".", v)

    table("", tree)
    return "\n".join(out) + "\n"
