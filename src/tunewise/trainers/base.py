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
    """What every trainer must provide. What it may add is `Capabilities` below."""
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

    def evaluate_test(self, config: dict, checkpoint: Path, device: Any, out_dir: Path) -> dict:
        """Metrics of a saved model on the test split (finalization only). Tables that are not metrics (a
        confusion matrix, the prompts found) the trainer writes into out_dir itself, for its report sections."""


class Capabilities:
    """What a trainer may add to the protocol, each with the default the phases use when a trainer leaves it
    out (a trainer need not inherit this class: `capability(trainer, name)` falls back to it).

    - `diagnosis_thresholds`: its own values for the diagnosis' thresholds (curves that behave differently).
    - `extra_findings(history, metrics, thresholds)`: findings of its own beside the generic ones, in the
      diagnosis' finding format (id, root_cause, severity, summary, evidence); `thresholds` are the merged
      ones, its own keys included.
    - `recommendation_patterns()`: {root_cause: pattern} for the root causes its findings name; a pattern is
      `pattern(finding, config, knobs) -> [(knob, action, value, impact, risk, effort, why), ...]`, as the
      generic ones in phases/recommend.py.
    - `preparation_steps(config)`: {step: description} of the work a config needs after `prepare_data` and
      before any training (e.g. a model the data must train first); the workflow makes one job of each
      (rule `prepare_step`) and every training job waits for them.
    - `prepare_step(step, config, out_dir, threads)`: does one such step into out_dir (cached: None when the
      files in place fit), returning {"params", "metrics", "files", "message"} for its MLflow run.
    - `report_sections`: "module:function" names of report sections; each report writer calls every one
      with a `tunewise.reports.sections.SectionContext` and places what it returns (markdown and the files
      it wrote) after its own tables. Named, not imported, so a trainer never imports the report layer.
    - `metric_names(config)`: the metric names a run with this config writes (fnmatch patterns allowed, e.g.
      "val/acc/*" where names come from the data), so a typo in `metric.name` is refused at validation instead
      of failing the first epoch; None (the default): not checked.
    - a `design` block in `default_config()` gives the trainer a design phase (`design(...)` then trains it).
    - `primary_metric_for(config)`: the primary metric for this resolved config, when it depends on the data
      (pez: the caption ratio needs captions); an experiment's `metric.name` defaults to it at resolve time, so
      it must not need torch. Default: `primary_metric`.
    """

    diagnosis_thresholds: dict = {}
    report_sections: tuple[str, ...] = ()

    def extra_findings(self, history: Any, metrics: dict, thresholds: dict) -> list[dict]:
        return []

    def recommendation_patterns(self) -> dict:
        return {}

    def metric_names(self, config: dict) -> list[str] | None:
        return None

    def preparation_steps(self, config: dict) -> dict[str, str]:
        return {}

    def primary_metric_for(self, config: dict) -> str:
        return self.primary_metric

    def prepare_step(self, step: str, config: dict, out_dir: Path, threads: int) -> dict | None:
        raise KeyError(f"trainer {getattr(self, 'name', '?')!r} has no preparation step {step!r}")


def capability(trainer: Any, name: str) -> Any:
    """The trainer's `name` capability, or the default of `Capabilities` when the trainer does not define it."""
    if hasattr(trainer, name):
        return getattr(trainer, name)
    default = getattr(Capabilities, name)
    return default.__get__(trainer) if callable(default) else default
