"""What every report writer shares: number formatting, the Jinja environment, and links between files.

The report modules (render, design, sweep, iterative, sections) and the trainers' report sections import these
from here and never from each other, so render can call the section writers without an import cycle.
A run's history.csv is read through tunewise.runs.read_history.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined

import tunewise

TEMPLATES_ENV = "TUNEWISE_TEMPLATES"


# --- formatting -----------------------------------------------------------------------------


def number(value: Any) -> float | None:
    """A float for numbers and the "inf"/"-inf" strings runs.write_json leaves; None otherwise."""
    if value is None or isinstance(value, bool):
        return None
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def fmt(value: Any, signed: bool = False) -> str:
    """4 significant digits; `n/a` for None/NaN; ints in full; words pass through."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        value = value.item()
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    if isinstance(value, str):
        parsed = number(value)
        if parsed is None:
            return value
        value = parsed
    sign = "+" if signed else ""
    if isinstance(value, int):
        return f"{value:{sign}d}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:{sign}.4g}"
    return str(value)


def pct(value: Any, signed: bool = False) -> str:
    """A fraction as a percentage (0.034 -> 3.4%), 4 significant digits."""
    parsed = number(value)
    if parsed is None or math.isnan(parsed):
        return "n/a"
    return fmt(parsed * 100, signed=signed) + "%"


def cell(value: Any) -> str:
    """Text safe inside a markdown table cell."""
    text = value if isinstance(value, str) else fmt(value)
    return " ".join(text.split()).replace("|", "\\|")


def templates_dir() -> Path:
    override = os.environ.get(TEMPLATES_ENV)
    if override:
        return Path(override)
    return Path(tunewise.__file__).resolve().parents[2] / "reports" / "templates"


def environment(templates: Path | None = None, beside: Path | None = None) -> Environment:
    """The reports' Jinja environment; `beside` adds a folder searched after the templates folder (a trainer's
    report section ships its template next to its module, and a TUNEWISE_TEMPLATES folder still overrides it)."""
    loaders = [FileSystemLoader(str(templates or templates_dir()))]
    if beside is not None:
        loaders.append(FileSystemLoader(str(beside)))
    env = Environment(
        loader=ChoiceLoader(loaders),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(fmt=fmt, pct=pct, cell=cell)
    return env


def render(template: str, *, beside: Path | None = None, **context: Any) -> str:
    return environment(beside=beside).get_template(template).render(**context)


def link(target: Path, document: Path) -> str:
    """Relative path from a markdown document to a file, as a link target."""
    return Path(os.path.relpath(Path(target).resolve(), Path(document).resolve().parent)).as_posix()
