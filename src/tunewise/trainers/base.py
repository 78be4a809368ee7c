"""The Trainer protocol: what every trainer gives the phases, and nothing more.

A trainer trains and evaluates. It reports each epoch through the reporter, never writes
MLflow or Optuna itself, and knows nothing of Snakemake.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class Pruned(Exception):
    """Raised by a reporter when a sweep's pruner stops a trial."""


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf: the run ends as diverged, with the step in the message."""

    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step = step
        self.value = value


def check_data_source(data: dict) -> None:
    """The `data.source` / `data.path` pair every built-in trainer takes: embedded data, or a user path."""
    if data["source"] not in ("embedded", "path"):
        raise ValueError(f"data.source: expected 'embedded' or 'path', got {data['source']!r}")
    if data["source"] == "path" and not data.get("path"):
        raise ValueError("data.path: required when data.source is 'path'")


def data_root(config: dict) -> Path:
    """Where a run reads its data: the user's `data.path`, or the directory `prepare_data` filled."""
    data = config["data"]
    if data["source"] == "path":
        return Path(data["path"])
    if not data.get("prepared_dir"):
        raise ValueError("data.prepared_dir: not set (prepare the data first)")
    return Path(data["prepared_dir"])


@runtime_checkable
class Trainer(Protocol):
    name: str
    primary_metric: str        # e.g. "val/r2_mean"
    direction: str             # "max" | "min"
    knobs: dict[str, str | list[str]]
    # dotted keys under which any sub-key is accepted (free-form dicts such as param_groups)
    open_config_keys: set[str]

    def default_config(self) -> dict: ...

    def check_config(self, config: dict) -> None:
        """Raise ValueError/FileNotFoundError naming the key for a config that cannot run."""

    def search_space(self) -> dict: ...

    def prepare_data(self, data_cfg: dict, out_dir: Path, threads: int) -> dict:
        """Make the data ready under out_dir (cached); return a description written to ready.json."""

    def run(self, config: dict, seed: int, run: Any, reporter: Any, device: Any, metric: dict) -> dict:
        """Train, calling reporter.epoch(step, metrics) each epoch; return metrics.json's content."""

    def evaluate_test(self, config: dict, checkpoint: Path, device: Any) -> dict:
        """Metrics of a saved model on the test split (finalization only)."""
