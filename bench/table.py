"""The bench table's row: every entry returns these, bench/run.py prints them."""
from __future__ import annotations


def row(entry: str, what: str, a: float, b: float, unit: str = "", goal: str | None = None, ok: bool | None = None,
        fmt: str = ".4g") -> dict:
    return {"entry": entry, "what": what, "a": f"{a:{fmt}} {unit}".rstrip(), "b": f"{b:{fmt}} {unit}".rstrip(),
            "ratio": a / b if b else float("nan"), "goal": goal or "-",
            "ok": "-" if ok is None else ("yes" if ok else "NO")}
