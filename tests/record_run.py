"""``python -m tests.record_run run ... --record DIR[,MS[,START_MS]]``: ``storyline`` with every worker recording the
ids it consumed in folder DIR (:class:`engine.testing.recording.RecordingStageFactory`; sleeping MS per non-empty
bucket, and START_MS once as it starts) instead of building stories. For the tests that run the real supervisor
and worker processes: the CLI itself has no such flag, and the engine never imports its test support."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine.cli import main as storyline
from engine.testing.recording import RecordingStageFactory


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    i = args.index("--record")
    directory, _, timing = args[i + 1].partition(",")
    delay, _, start = timing.partition(",")
    del args[i : i + 2]
    return storyline(args, stage_factory=RecordingStageFactory(directory, int(delay or 0), int(start or 0)))


if __name__ == "__main__":
    sys.exit(main())
