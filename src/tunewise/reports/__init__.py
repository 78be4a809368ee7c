"""Markdown reports (Jinja templates in reports/templates/) and their PNG plots.

`render` writes the documents the phases promise (diagnostic report, optimization results,
significance, checklists, final report, index); `plots` draws their figures. Every number a
report prints is read from a file the workflow wrote.
"""
