"""The index of all experiments (reports/index.md) on each experiment's MLflow `workflow` run."""
from __future__ import annotations

from pathlib import Path

from tunewise.phases import tracked


def log_index(results_dir: Path, written: list[Path], rule: str | None) -> list[str]:
    """Log the index and its plot to the `workflow` run of every experiment under results_dir that has a
    resolved config (the index compares them all, so each experiment's runs carry it); returns the run ids.
    written[0] is index.md: the files keep their places below it (plots/...), so its links work in MLflow."""
    from tunewise.config import load_experiment

    top = Path(written[0]).parent
    folders = {p: (Path("reports") / Path(p).parent.relative_to(top)).as_posix() for p in written}
    run_ids = []
    for exp_file in sorted(Path(results_dir).glob("*/experiment.yaml")):
        exp = load_experiment(exp_file)
        run_ids.append(tracked.log_experiment_files(exp, exp_file.parent, rule, folders))
    return run_ids
