"""tunewise benchmarks: each entry measures two things side by side in one run and prints
their ratio as a row of a markdown table.

    make bench                         # every entry
    make bench ARGS="--only loop"      # one entry by name
    python bench/run.py --list

An entry is a function returning rows `{"entry", "what", "a", "b", "ratio", "goal", "ok"}`
(`a`/`b` are printed as given, a `ratio` of None as "-" where b is 0 or not a number);
later issues add entries to ENTRIES.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from table import row  # noqa: E402  (bench/ is the script's own folder)


def _row(entry, what, a, b, unit, goal=None, ok=None):
    return row(entry, what, a, b, unit, goal, ok, fmt=".3f")


# --- loop: the shared fit loop vs a plain PyTorch loop ------------------------------------------


def _loop_setup(n=20000, n_in=132, n_tasks=4, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    w = torch.randn(n_in, n_tasks, generator=g) / n_in**0.5
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, n_tasks, generator=g)
    y[torch.rand(n, n_tasks, generator=g) < 0.05] = float("nan")  # missing targets, as in real tables
    split = n * 9 // 10
    return x[:split], y[:split], x[split:], y[split:]


def _plain_loop(data, cfg, seed):
    """What a researcher writes by hand: shuffle, forward, loss, backward, step, evaluate."""
    import torch

    from tunewise.trainers.latent.model import LatentModel, multitask_loss, regression_metrics

    torch.manual_seed(seed)
    xt, yt, xv, yv = data
    model = LatentModel(xt.shape[1], yt.shape[1], hidden=256, latent_dim=64)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["optim"]["lr"])
    bs = cfg["train"]["batch_size"]
    for epoch in range(cfg["train"]["epochs"]):
        model.train()
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), bs):
            idx = order[i : i + bs]
            _, preds, recon = model(xt[idx])
            loss, _ = multitask_loss(preds, yt[idx], recon, xt[idx], None, 0.5)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for x, y in ((xt[:4096], yt[:4096]), (xv, yv)):
                _, preds, recon = model(x)
                multitask_loss(preds, y, recon, x, None, 0.5)
                regression_metrics(preds, y, ["a", "b", "c", "d"])


def _fit_loop(data, cfg, seed, run_dir):
    import torch

    from tunewise.runs import RunDir
    from tunewise.tracking import EpochReporter
    from tunewise.train.loop import fit
    from tunewise.train.seed import epoch_generator
    from tunewise.trainers.latent.model import LatentModel, multitask_loss, regression_metrics

    torch.manual_seed(seed)
    xt, yt, xv, yv = data
    model = LatentModel(xt.shape[1], yt.shape[1], hidden=256, latent_dim=64)
    bs = cfg["train"]["batch_size"]
    run = RunDir(run_dir)
    run.start(cfg, seed)

    def batches(epoch):
        order = torch.randperm(len(xt), generator=epoch_generator(seed, epoch))
        for i in range(0, len(xt), bs):
            idx = order[i : i + bs]
            yield xt[idx], yt[idx]

    def step(batch):
        x, y = batch
        _, preds, recon = model(x)
        loss, _ = multitask_loss(preds, y, recon, x, None, 0.5)
        return loss, len(x)

    def evaluate():
        out = {}
        for split, (x, y) in {"train": (xt[:4096], yt[:4096]), "val": (xv, yv)}.items():
            _, preds, recon = model(x)
            loss, _ = multitask_loss(preds, y, recon, x, None, 0.5)
            out[f"{split}/loss"] = float(loss)
            out.update({f"{split}/{k}": v for k, v in regression_metrics(preds, y, ["a", "b", "c", "d"]).items()})
        return out

    fit(model=model, config=cfg, run=run, reporter=EpochReporter(None, None), device=torch.device("cpu"), seed=seed,
        train_batches=batches, steps_per_epoch=(len(xt) + bs - 1) // bs, train_step=step, evaluate=evaluate,
        primary="val/r2_mean", direction="max", progress=False)


def bench_loop(repeats: int = 3) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    cfg = {
        "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "param_groups": {}},
        "schedule": {"name": "none"},
        "train": {"epochs": 4, "batch_size": 256, "grad_clip": None, "patience": None, "amp": "auto"},
    }
    data = _loop_setup()
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):  # interleaved, so drift in machine load hits both sides alike
            t = time.perf_counter()
            _plain_loop(data, cfg, r)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            _fit_loop(data, cfg, r, Path(tmp) / f"run{r}")
            ours.append(time.perf_counter() - t)
    a, b = statistics.median(ours), statistics.median(plain)
    return [_row("loop", "fit loop (checkpoints, history, grad norms) vs plain PyTorch loop, 18k rows x 4 epochs",
                 a, b, "s", "<= 1.10x", a / b <= 1.10)]


# --- job: fixed start-up cost of a tunewise verb ------------------------------------------------


def _time_cmd(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_job(repeats: int = 5) -> list[dict]:
    """The fixed cost every job and every Snakefile parse pays before it works, against bare Python."""
    tunewise = str(Path(sys.executable).with_name("tunewise"))
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    bare = _time_cmd([sys.executable, "-c", "pass"], repeats)
    with tempfile.TemporaryDirectory() as tmp:
        dry = _time_cmd([snakemake, "-n", "--cores", "2", "-s", str(REPO / "Snakefile"), "-d", tmp,
                         "--configfile", str(REPO / "config" / "config.yaml")], repeats)
        resolve = _time_cmd([tunewise, "resolve", "--config", "config/config.yaml", "--experiment", "latent_mp",
                             "--out", str(Path(tmp) / "experiment.yaml")], repeats)
    validate = _time_cmd([tunewise, "validate", "config/config.yaml"], repeats)
    # what a light job that logs (diagnose) and a training job load before their first line of work
    light = _time_cmd([sys.executable, "-c", "import tunewise.phases.diagnose, tunewise.reports.render, "
                       "tunewise.phases.tracked, mlflow"], repeats)
    train = _time_cmd([sys.executable, "-c", "import tunewise.phases.train, mlflow; from tunewise.trainers import "
                       "get_trainer; get_trainer('latent')"], repeats)
    return [
        _row("job", "`snakemake -n` on config/config.yaml vs `python -c pass`", dry, bare, "s",
             "<= 4 s", dry <= 4.0),
        _row("job", "`tunewise validate config/config.yaml` (no torch) vs `python -c pass`", validate, bare, "s",
             "<= 2 s above", validate - bare <= 2.0),
        _row("job", "light job `tunewise resolve` vs `python -c pass`", resolve, bare, "s",
             "<= 2 s above", resolve - bare <= 2.0),
        _row("job", "imports of a light job that logs (diagnose: phases, reports, mlflow) vs bare", light, bare, "s"),
        _row("job", "imports of a training job (phases.train, mlflow, latent trainer: torch) vs bare", train, bare, "s"),
    ]


def bench_sweep() -> list[dict]:
    from sweep_bench import bench_sweep as run

    return run()


def bench_parallel() -> list[dict]:
    from sweep_bench import bench_parallel as run

    return run()


def bench_trust() -> list[dict]:
    from trust import bench_trust as run

    return run()


def bench_groupdro() -> list[dict]:
    from textcaps_bench import bench_groupdro as run

    return run()


def bench_textcaps() -> list[dict]:
    from textcaps_bench import bench_textcaps as run

    return run()


def bench_pez() -> list[dict]:
    from pez_bench import bench_pez as run

    return run()


def bench_design() -> list[dict]:
    from design_bench import bench as run

    return run(_row)


ENTRIES = {"loop": bench_loop, "job": bench_job, "sweep": bench_sweep, "parallel": bench_parallel,
           "trust": bench_trust, "groupdro": bench_groupdro,
           "textcaps": bench_textcaps, "pez": bench_pez, "design": bench_design}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(ENTRIES), help="run only this entry (repeatable)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(sorted(ENTRIES)))
        return 0
    rows = []
    for name in args.only or list(ENTRIES):
        print(f"running {name} ...", file=sys.stderr)
        rows.extend(ENTRIES[name]())
    print(f"\nhost: {os.cpu_count()} cores, python {sys.version.split()[0]}\n")
    print("| entry | what | a | b | ratio a/b | goal | ok |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"  # None: no meaningful ratio (b is 0)
        print(f"| {r['entry']} | {r['what']} | {r['a']} | {r['b']} | {ratio} | {r['goal']} | {r['ok']} |")
    return 0 if all(r["ok"] != "NO" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
