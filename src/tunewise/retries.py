"""Snakemake retries a failed training job (`resources.retries`): right for running out of memory (the retry
halves the batch) and for transient faults (a busy tracking store, a lost node), useless for a job that failed
on its input (a damaged checkpoint, a device the host lacks, data the trainer refuses), which fails the same way
every time. Snakemake cannot tell them apart, so the job does: a failure on input leaves a marker keyed by the
job's command line, and a retry of that command (`--attempt` > 1, Snakemake's `{resources.attempt}`) stops at
once with the first attempt's message instead of training again. A new run of the workflow is attempt 1 again:
it clears the marker and tries, so fixing the input and running again just works.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

MARKERS = Path(".tunewise") / "input-errors"  # under the working directory, where Snakemake runs every job


def _marker(verb: str, argv: list[str]) -> Path:
    kept, skip = [], False
    for arg in argv:  # the same job at every attempt: its command line without the attempt number
        if skip:
            skip = False
        elif arg == "--attempt":
            skip = True
        elif not arg.startswith("--attempt="):
            kept.append(arg)
    return MARKERS / f"{verb}-{hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16]}.txt"


def earlier_input_error(verb: str, argv: list[str], attempt: int | None) -> str | None:
    """The message of the earlier attempt's failure on input when this start is a retry of it; None otherwise
    (and a first attempt forgets any such failure of an earlier workflow run)."""
    marker = _marker(verb, argv)
    if not attempt or attempt <= 1:
        marker.unlink(missing_ok=True)
        return None
    return marker.read_text(encoding="utf-8") if marker.exists() else None


def record_input_error(verb: str, argv: list[str], message: str) -> None:
    marker = _marker(verb, argv)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(message, encoding="utf-8")
