"""optimization_results.md over the rounds of seed 004's loop: the rounds table and plot, the final decision
with decision A's criteria, then every round's own page (round_results.md) in full, its headings one level down
and its links rebased onto this page's folder."""
from __future__ import annotations

import re
from pathlib import Path

from tunewise.reports.markdown import link, render
from tunewise.runs import atomic_write_text, read_json

# a markdown link or image target that is a path relative to its page (no scheme, no anchor, no absolute path)
_RELATIVE_LINK = re.compile(r"(\]\()(?![a-zA-Z][a-zA-Z0-9+.-]*:|#|/)([^)\s]+)(\))")


def rebase(markdown: str, prefix: str) -> str:
    """The page's relative links, seen from a page `prefix` above it ('' leaves them)."""
    if not prefix:
        return markdown
    return _RELATIVE_LINK.sub(lambda m: f"{m.group(1)}{prefix.rstrip('/')}/{m.group(2)}{m.group(3)}", markdown)


def demote(markdown: str) -> str:
    """Every heading one level down (the page becomes a section); fenced code is left alone."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(out)


def round_page(reports_dir: Path, index: int) -> Path:
    return Path(reports_dir) / ("" if index == 1 else f"round{index}") / "round_results.md"


def write_rounds_report(loop_json: Path, reports_dir: Path) -> list[Path]:
    from tunewise.reports.plots import plot_loop_rounds

    loop = read_json(loop_json)
    reports_dir = Path(reports_dir)
    report = reports_dir / "optimization_results.md"
    metric = loop["metric"]
    plot = plot_loop_rounds(loop["rounds"], metric["name"], reports_dir / "plots" / "rounds.png",
                       title=f"{loop['experiment']}: {metric['name']} per round")
    rounds = []
    for rec in loop["rounds"]:
        page = round_page(reports_dir, rec["round"])
        body = page.read_text(encoding="utf-8") if page.exists() else f"(missing: {page})"
        # the round page's own title line gives way to this page's "## Round k" heading
        body = body.split("\n", 1)[1] if body.startswith("# ") else body
        rounds.append({**rec, "page": link(page, report),
                       "body": demote(rebase(body, link(page.parent, report) if rec["round"] > 1 else ""))})
    text = render("rounds.md.j2", experiment=loop["experiment"], metric=metric, rounds=rounds, final=loop["final"],
                  decision=loop["final"], plot=link(plot, report), max_iterations=loop["max_iterations"],
                  time_budget=loop["time_budget"])
    atomic_write_text(report, text)
    return [report, plot]
