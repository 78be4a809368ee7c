"""Per-group report sections: per-group accuracy at the best step, group curves, confusion matrices, all read
from the run directory files a trainer with groups writes (history.csv columns, confusion_val.json)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from tunewise.trainers.textcaps.report import val_confusion
from tunewise.reports.plots import group_columns, plot_confusion, plot_group_curves
from tunewise.reports.render import fmt, write_diagnostic_report, write_final_report
from tunewise.runs import CONFUSION_FILE, RunDir, write_json
from tunewise.trainers.textcaps.trainer import confusion_matrix

PRIMARY = "val/worst_group_acc"
CLASSES = ["bottle", "sign", "phone"]


def _png(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def _group_run(path: Path, best_step: int = 4, epochs: int = 6) -> dict:
    run = RunDir(path)
    run.start({"train": {"epochs": epochs}}, seed=0)
    rows = []
    for step in range(1, epochs + 1):
        minority = 0.31 + 0.071 * step - 0.02 * max(0, step - best_step) ** 2
        majority = 0.93 - 0.013 * step
        rows.append({
            "step": step, "train/loss": 1.0 / step, "val/loss": 0.9 / step + 0.1,
            "val/acc/majority": majority, "val/acc/minority": minority,
            "val/acc/minority/bottle": 0.5,  # group-by-class cells are not groups
            "val/worst_group_acc": min(majority, minority), "val/avg_acc": (majority + minority) / 2,
            "val/acc": 0.9 * majority + 0.1 * minority, "train/worst_group_acc": min(majority, minority) + 0.05,
            "q/majority": 0.5 - 0.04 * step, "q/minority": 0.5 + 0.04 * step, "lr": 1e-3,
        })
    run.write_history(rows)
    best = rows[best_step - 1]
    run.finish({"primary": {"name": PRIMARY, "direction": "max", "best": best[PRIMARY], "final": rows[-1][PRIMARY]},
                "best_step": best_step, "epochs_run": epochs, "epochs_planned": epochs, "final": rows[-1], "best": best})
    confusion = {"split": "val", "classes": CLASSES,
                 "steps": {str(s): [[10 + s, 1, 0], [2, 7, s], [0, 3, 9]] for s in range(1, epochs + 1)}}
    write_json(path / CONFUSION_FILE, confusion)
    return {"rows": rows, "best": best, "confusion": confusion}


def test_confusion_matrix_counts_true_by_predicted():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 2, 2])
    assert confusion_matrix(logits, labels, 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_group_columns_are_one_level_accuracy_columns(tmp_path):
    made = _group_run(tmp_path / "run")
    import pandas as pd

    history = pd.DataFrame(made["rows"])
    assert group_columns(history) == ["val/acc/majority", "val/acc/minority"]
    assert plot_group_curves(pd.DataFrame({"step": [1], "val/r2": [0.5]}), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_confusion_plot_rejects_a_matrix_of_the_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="3x3"):
        plot_confusion({"classes": CLASSES, "matrix": [[1, 2], [3, 4]]}, tmp_path / "c.png")


def test_val_confusion_picks_the_best_step_else_the_last(tmp_path):
    made = _group_run(tmp_path / "run")
    at4 = val_confusion(tmp_path / "run", 4)
    assert at4["step"] == 4 and at4["matrix"] == made["confusion"]["steps"]["4"] and at4["classes"] == CLASSES
    assert val_confusion(tmp_path / "run", 99)["step"] == 6
    assert val_confusion(tmp_path / "elsewhere", 4) is None


def test_diagnostic_report_shows_per_group_accuracy_at_the_best_step(tmp_path):
    made = _group_run(tmp_path / "results" / "tc" / "baseline")
    diagnosis = {"experiment": "tc", "trainer": "textcaps", "metric": {"name": PRIMARY, "direction": "max"},
                 "findings": [], "recommendations": [], "changes": [], "patch": {},
                 "strategy": {"requested": "auto", "chosen": "none", "reason": "nothing to fix"}}
    write_json(tmp_path / "results" / "tc" / "diagnosis" / "diagnosis.json", diagnosis)
    reports = tmp_path / "reports" / "tc"
    written = write_diagnostic_report(tmp_path / "results" / "tc" / "diagnosis" / "diagnosis.json",
                                      tmp_path / "results" / "tc" / "baseline", reports)
    text = written[0].read_text()
    best = made["best"]
    assert "## Per-group accuracy" in text and "baseline: step 4" in text
    assert f"| majority | {fmt(best['val/acc/majority'])} |" in text
    assert f"| minority | {fmt(best['val/acc/minority'])} |" in text
    assert f"| **worst_group_acc** | {fmt(best['val/worst_group_acc'])} |" in text
    assert "minority/bottle" not in text
    for name in ("baseline_groups.png", "baseline_confusion.png"):
        assert reports / "plots" / name in written
        assert f"](plots/{name})" in text
        width, height = _png(reports / "plots" / name)
        assert width > 300 and height > 200


def test_final_report_puts_test_per_group_accuracy_next_to_validation(tmp_path):
    exp = tmp_path / "results" / "tc"
    made = _group_run(exp / "final" / "run", best_step=5)
    test = {"test/acc/majority": 0.9123, "test/acc/minority": 0.6487, "test/worst_group_acc": 0.6487,
            "test/avg_acc": 0.7805, "test/acc": 0.8859}
    write_json(exp / "final" / "test" / "confusion_test.json", {"split": "test", "classes": CLASSES,
                                                       "matrix": [[40, 2, 1], [3, 30, 5], [0, 4, 33]]})
    write_json(exp / "final" / "final.json", {
        "chosen_side": "optimized", "decision": "A", "config_path": "c.yaml", "run_dir": str(exp / "final" / "run"),
        "val": {"best": made["rows"][4][PRIMARY], "best_step": 5}, "test": test, "checkpoints": {},
        "trainer": "textcaps", "tables": str(exp / "final" / "test")})
    write_json(exp / "significance" / "decision.json", {"option": "A", "label": "ok", "chosen_side": "optimized",
                                                        "rationale": "r", "target": None, "target_met": None})
    written = write_final_report(exp / "final" / "final.json", exp / "significance" / "decision.json",
                                 tmp_path / "reports" / "tc")
    text = written[0].read_text()
    best = made["rows"][4]
    assert f"| minority | {fmt(best['val/acc/minority'])} | {fmt(test['test/acc/minority'])} |" in text
    assert f"| **worst_group_acc** | {fmt(best['val/worst_group_acc'])} | {fmt(test['test/worst_group_acc'])} |" in text
    assert "(test)" in text  # the confusion matrix shown is the test split's
    assert any(p.name == "final_confusion.png" for p in written)
    json.loads((exp / "final" / "test" / "confusion_test.json").read_text())
