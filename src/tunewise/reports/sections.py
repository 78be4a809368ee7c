"""Report sections a trainer registers (`report_sections` in its capabilities): every report writer with run
results (the diagnostic report, optimization_results.md, the final report) builds one `SectionContext` and
places what each of the experiment's trainer's sections returns after its own tables, in the declared order.

A section is a function `section(ctx) -> Section | None` named "module:function": the trainer names it and
never imports it, so the trainer layer stays below the reports. None means "nothing to show for these runs"
(a run that logged no per-group accuracy, no prompts file).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from tunewise.trainers import get_spec
from tunewise.trainers.base import capability

REPORTS = ("diagnostic", "optimization", "final")


@dataclass
class SectionContext:
    report: str                      # one of REPORTS
    report_path: Path                # the markdown file the section goes into (links are relative to it)
    plots_dir: Path                  # where the section's figures go
    name: str                        # prefix of the section's figure files ("baseline", "comparison", "final")
    title: str                       # figure titles start with it, e.g. "exp: baseline"
    runs: dict[str, Path | None]     # the runs the report shows, one table column each, in order
    best_steps: dict[str, int | None]
    shown: str                       # the run of `runs` the section's figures show
    run_label: str                   # how captions name that run ("baseline run", "final run")
    tables_dir: Path | None = None   # the final report: the folder evaluate_test wrote its tables to
    test_metrics: dict = field(default_factory=dict)  # the final report: the test split's metrics

    @property
    def shown_dir(self) -> Path | None:
        return self.runs.get(self.shown)


@dataclass
class Section:
    markdown: str                    # ends with a newline; the report adds the blank line after it
    written: list[Path]              # the figures (and other files) it wrote, logged with the report


def load_section(target: str):
    module_name, _, function = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"report section {target!r}: {e}") from None


def trainer_sections(trainer_name: str | None, ctx: SectionContext) -> list[Section]:
    """What the trainer's registered sections have to show for `ctx`, in their declared order."""
    if ctx.report not in REPORTS:
        raise ValueError(f"report must be one of {REPORTS}, got {ctx.report!r}")
    if not trainer_name:
        return []
    out = []
    for target in capability(get_spec(trainer_name), "report_sections"):
        section = load_section(target)(ctx)
        if section is not None:
            out.append(section)
    return out


def written(sections: list[Section]) -> list[Path]:
    return [path for s in sections for path in s.written]
