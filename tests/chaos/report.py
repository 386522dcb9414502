"""Render the chaos tier's measurements as the Markdown table of docs/RELIABILITY.md.

STORYLINE_CHAOS_REPORT=chaos.json python -m pytest -m chaos tests/chaos
python -m tests.chaos.report chaos.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

ORDER = [
    "kill -9 of a worker",
    "kill -9 of the supervisor",
    "CQL node",
    "embedded store",
    "producer writes",
    "the same",
    "a worker clock",
]


def _key(row: dict[str, Any]) -> tuple[int, str]:
    rank = next((i for i, p in enumerate(ORDER) if row["fault"].startswith(p)), len(ORDER))
    return rank, row["backend"]


def _recovery(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} / {max(values):.1f} (n = {len(values)})"


def render(doc: dict[str, Any]) -> str:
    out = [
        f"Machine: {doc['machine']}; written {doc['written']}.",
        "",
        "| fault | store | events in | stories out | events lost | faults injected | recovery s (median / max) "
        "| test s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(doc["rows"], key=_key):
        out.append(
            f"| {r['fault']} | {r['backend']} | {r['events_in']:,} | {r['stories_out']:,} | {r['events_lost']} "
            f"| {r['injected']} | {_recovery(r['recovery_s'])} | {r['test_seconds']:.0f} |"
        )
    out += ["", "Details per row:", ""]
    for r in sorted(doc["rows"], key=_key):
        extra = {
            k: v
            for k, v in r.items()
            if k
            not in {
                "test",
                "fault",
                "backend",
                "events_in",
                "stories_out",
                "events_lost",
                "injected",
                "recovery_s",
                "test_seconds",
                "note",
            }
            and v not in (0, [], None)
        }
        detail = ", ".join(f"{k} {v}" for k, v in extra.items())
        rec = ", ".join(f"{x:g}" for x in r["recovery_s"])
        out.append(
            f"- **{r['fault']}, {r['backend']}**: {r['note']}."
            + (f" Recovery times (s): {rec}." if len(r["recovery_s"]) > 1 else "")
            + (f" Also: {detail}." if detail else "")
        )
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.chaos.report CHAOS.json", file=sys.stderr)
        return 2
    sys.stdout.write(render(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
