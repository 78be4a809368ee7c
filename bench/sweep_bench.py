"""Bench entries for sweeps.

`sweep`: TPE with a median pruner vs random search without pruning, the same trial budget on the latent
trainer, over several study seeds: the best validation metric reached and the trial-epochs spent.

`parallel`: the same four-trial CPU sweep through Snakemake at `--cores 2` and at `--cores 1` (the
workflow up to the diagnosis is run first and not timed).
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from table import row

REPO = Path(__file__).resolve().parents[1]
EXP = {
    "trainer": "latent",
    "data": {"source": "embedded", "limit": 1500, "targets": ["PF_p", "S_p"]},
    "baseline": {"model": {"hidden": 64, "latent_dim": 16, "head_hidden": 16}, "optim": {"lr": 0.0003},
                 "train": {"epochs": 10, "batch_size": 128}},
    "resources": {"threads": 1, "mem_mb": 1000, "runtime": 10},
}


# --- sweep: TPE + pruning vs random search ------------------------------------------------------

def _experiment(tmp: Path) -> tuple[dict, object]:
    from tunewise.config import validate_schema
    from tunewise.experiment import resolve_experiment
    from tunewise.trainers import get_trainer

    cfg = validate_schema({"experiments": {"bench": EXP}})
    exp = resolve_experiment(cfg, "bench")
    trainer = get_trainer("latent")
    data_dir = tmp / "data"
    exp["baseline"]["data"]["prepared_dir"] = str(data_dir)
    trainer.prepare_data(exp["baseline"]["data"], data_dir, threads=1)
    return exp, trainer


def _study(exp, trainer, sampler: str, pruner: str, seed: int, n_trials: int, tmp: Path) -> tuple[float, int]:
    """Best val metric and total epochs trained by one in-memory study run sequentially."""
    import optuna
    import torch

    from tunewise.phases import sweep
    from tunewise.runs import RunDir
    from tunewise.tracking import EpochReporter
    from tunewise.trainers.base import Pruned

    space = sweep.resolve_space(trainer.search_space(), {"model.hidden": {"type": "categorical", "choices": [32, 64, 128]}})
    epochs = int(exp["baseline"]["train"]["epochs"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sweep.make_sampler(sampler, seed, space, 3),
                                pruner=sweep.make_pruner(pruner, epochs, n_trials))
    spent = 0
    for i in range(n_trials):
        trial = study.ask()
        config = sweep.trial_config(exp["baseline"], sweep.suggest(trial, space), None)
        run = RunDir(tmp / f"{sampler}-{seed}-{i}")
        run.start(config, 0)
        reporter = sweep.TrialReporter(EpochReporter(None, None), trial, exp["metric"]["name"], epochs)
        try:
            metrics = trainer.run(config, 0, run, reporter, torch.device("cpu"), exp["metric"], progress=False)
            study.tell(trial, metrics["primary"]["best"])
        except Pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except Exception:  # a diverged trial costs its epochs and finds nothing
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        spent += len(run.history()) if run.history_path.exists() else 0
        shutil.rmtree(run.path)
    return study.best_value, spent


def bench_sweep(seeds=(0, 1, 2), n_trials: int = 16) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        exp, trainer = _experiment(Path(tmp))
        results = {"tpe": [], "random": []}
        for seed in seeds:
            results["tpe"].append(_study(exp, trainer, "tpe", "median", seed, n_trials, Path(tmp)))
            results["random"].append(_study(exp, trainer, "random", "none", seed, n_trials, Path(tmp)))
    best = {k: statistics.mean(v[0] for v in vals) for k, vals in results.items()}
    epochs = {k: statistics.mean(v[1] for v in vals) for k, vals in results.items()}
    per_seed = ", ".join(f"seed {s}: {t[0]:.3f}/{r[0]:.3f}" for s, t, r in zip(seeds, results["tpe"], results["random"]))
    return [
        row("sweep", f"best val/r2_mean, TPE+median vs random, {n_trials} trials, mean of {len(seeds)} study seeds "
                      f"({per_seed})", best["tpe"], best["random"], "", ">= 1.00x", best["tpe"] >= best["random"]),
        row("sweep", "trial-epochs spent, TPE+median vs random (same budget)", epochs["tpe"], epochs["random"],
             "epochs", "< 1.00x", epochs["tpe"] < epochs["random"]),
    ]


# --- parallel: --cores 2 vs --cores 1 -----------------------------------------------------------


def _snakemake(workdir: Path, config: Path, *args: str) -> float:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--workflow-profile", str(REPO / "profiles" / "default"), "--configfile", str(config), *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake failed in {workdir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def bench_parallel(n_trials: int = 4, trial_epochs: int = 25, rows: int = 8000) -> list[dict]:
    # Trials sized like small real ones (tens of seconds): a job's fixed cost (imports of torch and MLflow,
    # run bookkeeping, about 7 s here) and the serial select_best would otherwise be what is measured.
    exp = {**EXP, "data": {**EXP["data"], "limit": rows},
           "optimize": {"strategy": "sweep", "sweep": {"n_trials": n_trials, "sampler": "random",
                                                       "pruner": "none", "epochs": trial_epochs}}}
    target = "results/par/optimize/sweep/best.json"
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cores in (1, 2):
            work = Path(tmp) / f"cores{cores}"
            work.mkdir()
            config = work / "config.yaml"
            config.write_text(yaml.safe_dump({"experiments": {"par": exp}}))
            _snakemake(work, config, "--cores", "2", "results/par/gates/diagnostics.json")  # not timed
            times[cores] = _snakemake(work, config, "--cores", str(cores), target)
    ratio = times[2] / times[1]
    return [row("parallel", f"{n_trials}-trial CPU sweep (threads 1, {rows} rows, {trial_epochs} epochs/trial, "
                             f"+ select_best): --cores 2 vs --cores 1",
                 times[2], times[1], "s", "<= 0.65x", ratio <= 0.65)]
