"""The final model's files: checkpoints named after the side that won, and nothing left of an earlier
finalization that chose the other side."""
from __future__ import annotations

from tunewise.phases.finalize import _final_checkpoints
from tunewise.runs import RunDir


def test_checkpoints_are_named_after_the_winning_side_and_stale_ones_go(tmp_path):
    run = RunDir(tmp_path / "final" / "run")
    run.checkpoints.mkdir(parents=True)
    (run.checkpoints / "best.pt").write_bytes(b"best")
    (run.checkpoints / "last.pt").write_bytes(b"last")
    out = tmp_path / "final"
    first = _final_checkpoints(run, out, "optimized")
    assert {k: p.name for k, p in first.items()} == {"best": "best_model_optimized.pt", "last": "last_model_optimized.pt"}
    again = _final_checkpoints(run, out, "baseline")  # a rerun whose decision chose the baseline
    assert {k: p.name for k, p in again.items()} == {"best": "best_model_baseline.pt", "last": "last_model_baseline.pt"}
    assert sorted(p.name for p in out.glob("*.pt")) == ["best_model_baseline.pt", "last_model_baseline.pt"]
    assert again["best"].read_bytes() == b"best" and again["last"].read_bytes() == b"last"
