"""The trust bench's pez part: planted pathologies on real PEZ searches, named by the diagnosis or not.

A tiny CLIP is trained once on generated shapes (4000 images, 4 epochs: held-out top-5 caption retrieval near 1,
about a minute on one core; nothing is downloaded), then each condition runs RUNS_PER_CONDITION real searches
(`PezTrainer.run`, 20 targets, 8-token prompts, seeds 0..9) and each run's history.csv + metrics.json goes through
the diagnosis as the diagnose job calls it (`trainer_findings` with the spec's thresholds: its own rules included).
A pathology counts as named when a finding with one of its root causes (NAMED) is among the findings; the healthy
runs say how often each cause is named wrongly.

`rows()` is what bench/trust.py's bench_trust calls; `python bench/trust_pez.py [condition ...]` prints each run's
findings and the curves' last rows, for tuning.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO / "src", REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from trust import (RUNS_PER_CONDITION, SCRATCH, WORKERS, _no_tracking, _row, diagnosis_rows,  # noqa: E402
                   named, print_findings, run_pool)

PRIMARY = {"name": "val/caption_ratio", "direction": "max"}
CLIP_DATA = {"n_train": 4000, "n_val": 64, "n_test": 8, "seed": 0}
CLIP_TRAIN = {"epochs": 4, "batch_size": 128, "lr": 2e-3, "seed": 0}
REFERENCE_LR = 0.1  # the reference's (methods.md) and the trainer's default
STEPS = 100

# root causes that count as naming each planted pathology
NAMED = {
    "lr_too_low": {"lr_too_low"},  # prompt_freeze: the steps cannot move a token
    "lr_too_high": {"lr_too_high"},  # prompt_churn (rising_train_loss, exploding_gradients would count too)
    "too_few_steps": {"too_short", "lr_too_low"},  # insufficient_history, or still_improving
    "short_budget": {"lr_too_low"},  # still_improving / prompt_freeze: "train longer, or raise the LR"
}


def _conditions(base: dict) -> dict[str, tuple[str, dict]]:
    """name -> (what was planted, config)."""
    from tunewise.config import deep_merge

    def with_(pez: dict, train: dict | None = None) -> dict:
        return deep_merge(base, {"pez": pez, "train": train or {}})

    healthy = with_({"lr": REFERENCE_LR, "iter": STEPS})
    return {
        "healthy": (f"the reference's lr {REFERENCE_LR:g} for {STEPS} steps", healthy),
        "lr_too_low": (f"lr 1e-4 ({REFERENCE_LR / 1e-4:g}x below the reference's) for {STEPS} steps",
                       with_({"lr": 1e-4, "iter": STEPS})),
        "lr_too_high": (f"lr 10 ({10 / REFERENCE_LR:g}x the reference's) for {STEPS} steps",
                        with_({"lr": 10.0, "iter": STEPS})),
        "too_few_steps": (f"lr {REFERENCE_LR:g} for 10 steps (2 history rows)", with_({"lr": REFERENCE_LR, "iter": 10})),
        # the default config's pez_shapes baseline is of this kind: 30x below the reference's lr, a short budget
        "short_budget": ("lr 0.003 for 40 steps (a row every 2)", with_({"lr": 0.003, "iter": 40}, {"report_every": 2})),
        # not a pathology: the top of the trainer's search space (pez.lr up to 1.0), the churn rule's margin
        "top_lr": ("lr 1 (the top of pez.lr's search space)", with_({"lr": 1.0, "iter": STEPS})),
    }


def _prepare(tmp: Path) -> dict:
    """The shapes and the tiny CLIP in `tmp`, and the base config that searches them."""
    import torch

    from tunewise.trainers.pez.clip import train_tiny_clip
    from tunewise.trainers.pez.trainer import PezTrainer

    torch.set_num_threads(1)
    trainer = PezTrainer()
    cfg = trainer.default_config()
    cfg["data"]["generator"] = dict(CLIP_DATA)
    cfg["data"]["clip"]["train"] = dict(CLIP_TRAIN)
    cfg["data"]["prepared_dir"] = str(tmp / "data")
    cfg["data"]["n_targets"] = 20
    cfg["pez"].update(prompt_len=8)
    cfg["train"].update(report_every=5, random_prompts=16)
    trainer.prepare_data(cfg["data"], tmp / "data", threads=1)
    train_tiny_clip(tmp / "data", tmp / "data" / "clip", epochs=CLIP_TRAIN["epochs"], batch_size=CLIP_TRAIN["batch_size"],
                    lr=CLIP_TRAIN["lr"], seed=CLIP_TRAIN["seed"], threads=1, progress=False, train_config=CLIP_TRAIN)
    return cfg


def _pez_run(name: str, config: dict, seed: int) -> dict:
    import torch

    from tunewise.phases.diagnose import load_run, thresholds_for, trainer_findings
    from tunewise.runs import RunDir
    from tunewise.trainers.base import NonFiniteLoss
    from tunewise.trainers.pez.trainer import PezTrainer

    t0 = time.perf_counter()
    trainer = PezTrainer()
    with tempfile.TemporaryDirectory(prefix=f"trust-pez-{name}-", dir=SCRATCH) as tmp:
        run = RunDir(Path(tmp) / "run")
        run.start(config, seed)
        try:
            metrics = trainer.run(config, seed, run, _no_tracking(), torch.device("cpu"), PRIMARY, progress=False)
            run.finish(metrics)
        except NonFiniteLoss as e:
            run.finish({"primary": {**PRIMARY, "best": None, "final": None},
                        "epochs_planned": int(config["pez"]["iter"])}, status="diverged", reason=str(e))
        history, metrics = load_run(run.path)
        findings = trainer_findings(trainer, history, metrics, PRIMARY, thresholds_for(trainer, {}) or {})
        tail = history.tail(3).to_dict("records")
    return {"name": name, "seed": seed, "seconds": time.perf_counter() - t0,
            "findings": [(f["id"], f["root_cause"]) for f in findings], "tail": tail,
            "best": metrics["primary"]["best"]}


def _job(task: tuple) -> dict:
    return _pez_run(*task)


def _runs(names: list[str] | None = None) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory(prefix="trust-pez-") as tmp:
        conditions = _conditions(_prepare(Path(tmp)))
        chosen = names or list(conditions)
        tasks = [(name, conditions[name][1], seed) for name in chosen for seed in range(RUNS_PER_CONDITION)]
        results = run_pool(_job, tasks)
    return results, conditions


def _diagnosis_rows(results: list[dict], conditions: dict) -> list[dict]:
    healthy = [r for r in results if r["name"] == "healthy"]
    top = [r for r in results if r["name"] == "top_lr"]
    extra = [_row(
        f"pez: {conditions['top_lr'][0]}, {STEPS} steps: lr_too_high named in {len(top)} runs, a margin, not a "
        f"pathology (b: named in {len(healthy)} healthy runs)",
        f"{sum(named(r, NAMED['lr_too_high']) for r in top) / len(top):.3f}",
        f"{sum(named(r, NAMED['lr_too_high']) for r in healthy) / len(healthy):.3f}", None)] if top else []
    return diagnosis_rows(results, conditions, NAMED, prefix="pez: ", extra=extra)


def rows() -> list[dict]:
    t0 = time.perf_counter()
    results, conditions = _runs()
    print_findings("pez ", results, conditions)
    print(f"  trust pez: tiny CLIP + {len(results)} PEZ runs in {time.perf_counter() - t0:.0f} s on {WORKERS} workers",
          file=sys.stderr)
    return _diagnosis_rows(results, conditions)


if __name__ == "__main__":
    results, _ = _runs(sys.argv[1:] or None)
    for r in sorted(results, key=lambda r: (r["name"], r["seed"])):
        last = r["tail"][-1]
        change = [row.get("train/token_change", float("nan")) for row in r["tail"]]
        print(f"{r['name']} seed {r['seed']}: best {r['best']:.3f} token_change (last rows) {min(change):.3f}-{max(change):.3f} "
              f"grad {last.get('grad_norm', float('nan')):.3g} -> {r['findings']}")
