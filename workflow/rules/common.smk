# Paths, resources and input functions shared by every rule.
import json
import os

from snakemake.exceptions import WorkflowError

from tunewise.config import ConfigError, load_yaml
from tunewise.experiment import design_enabled, preparation_steps, resolve_experiment, validate
from tunewise.devices import gpus_to_request

try:
    # Snakemake read the --configfile(s) with a loader that keeps the last of two equal keys; read again with
    # ours, which refuses them (a repeated experiment name would drop the first experiment without a word)
    for _path in workflow.configfiles:
        load_yaml(_path)
    # schema + trainer-aware checks: a bad key stops the run before any job starts
    _validated = validate(config)
except ConfigError as e:
    raise WorkflowError(f"tunewise: {e}") from None
config.clear()
config.update(_validated)

EXPERIMENTS = list(config["experiments"])
# experiments whose trainer has a design phase, with the design block switched on: they end with the design rule
DESIGN_EXPERIMENTS = [e for e in EXPERIMENTS if design_enabled(resolve_experiment(config, e))]
# the preparation steps each experiment's trainer declares (a model its data must train first, e.g.)
PREPARATION_STEPS = {e: preparation_steps(resolve_experiment(config, e)) for e in EXPERIMENTS}

# The software each rule runs with, for `--software-deployment-method conda`; by default the rules run in
# the environment `make install` made, where the `tunewise` CLI is on PATH.
CONDA_ENV = os.path.join(workflow.basedir, "environment.yml")


wildcard_constraints:
    exp="|".join(EXPERIMENTS) if EXPERIMENTS else "[^/]+",
    side="baseline|optimized",
    seed=r"\d+",
    trial=r"\d+",
    gate="diagnostics|optimization_complete",
    step=r"[A-Za-z0-9_-]+",


def exp_cfg(wildcards):
    return config["experiments"][wildcards.exp]


def experiment_json(wildcards):
    """Only this experiment's settings, so editing one experiment reruns only its jobs."""
    return json.dumps(
        {"tracking": config.get("tracking", {}), "experiments": {wildcards.exp: exp_cfg(wildcards)}},
        sort_keys=True,
    )


def data_ready(wildcards):
    """What a training job needs before it starts: the prepared data and the preparation steps its trainer
    declares for this experiment's config (`preparation_steps`, known at the parse: config.py resolved it)."""
    steps = PREPARATION_STEPS[wildcards.exp]
    return [f"results/{wildcards.exp}/data/ready.json", *(f"results/{wildcards.exp}/data/{s}/step.json" for s in steps)]


def threads_for(wildcards):
    return exp_cfg(wildcards)["resources"]["threads"]


def gpus_for(wildcards):
    # 0 GPUs on a CPU experiment, so `--resources gpu=1` never blocks CPU runs; request_gpus: always asks on a
    # cluster whose login node has no GPU. The job's shell line passes the number on (`tunewise ... --gpus`),
    # which locks that many free GPUs of its host (Snakemake itself never says which).
    exp = exp_cfg(wildcards)
    return gpus_to_request(exp["device"], exp["resources"]["gpus"], config["request_gpus"])


def gpu_model_for(wildcards):
    """The GPU model a cluster job asks for (`--gpus=MODEL:N` under SLURM); empty when unset or without a GPU."""
    return (exp_cfg(wildcards)["resources"].get("gpu_model") or "") if gpus_for(wildcards) else ""


def cpus_per_gpu_for(wildcards):
    """The job's threads spread over its GPUs (`--cpus-per-gpu` under SLURM); a CPU job asks per task instead."""
    gpus = gpus_for(wildcards)
    return max(1, threads_for(wildcards) // gpus) if gpus else 0


def mem_for(wildcards, attempt):
    return exp_cfg(wildcards)["resources"]["mem_mb"] * attempt


# Snakemake's `retries` is one number per training step for all experiments, fixed when the workflow is
# parsed; so the largest resources.retries of the experiments. Between attempts the mem_mb above grows and,
# after an out-of-memory failure, the batch size halves (tunewise.train.oom).
TRAIN_RETRIES = max((config["experiments"][e]["resources"]["retries"] for e in EXPERIMENTS), default=0)


def runtime_for(wildcards):
    return exp_cfg(wildcards)["resources"]["runtime"]


# The resources of every job that trains or evaluates a model, written once: the GPUs (0 on a CPU experiment)
# and, on a cluster, their model and CPUs per GPU; memory grows with each retry. Light rules ask for gpu=0.
TRAINING_RESOURCES = dict(
    gpu=gpus_for,
    gpu_model=gpu_model_for,
    cpus_per_gpu=cpus_per_gpu_for,
    mem_mb=mem_for,
    runtime=runtime_for,
    # Snakemake's attempt number, for the job itself: a retry of a job that failed on its input stops at once
    # (tunewise.retries), since only out of memory and transient faults are worth training again
    attempt=lambda wildcards, attempt: attempt,
)


def strategy(wildcards):
    """The optimize strategy. Under `auto` the diagnosis chooses, so the DAG below the diagnose
    checkpoint waits for it; an explicit strategy is known up front (and shows in `snakemake -n`)."""
    requested = exp_cfg(wildcards)["optimize"]["strategy"]
    if requested != "auto":
        return requested
    path = checkpoints.diagnose.get(exp=wildcards.exp).output.diagnosis
    with open(path) as f:
        return json.load(f)["strategy"]["chosen"]


def optimize_outputs(wildcards):
    """What the chosen strategy produces; the significance phase waits for it."""
    chosen, base = strategy(wildcards), f"results/{wildcards.exp}"
    return {
        "none": [],
        "targeted": [f"{base}/optimize/targeted/metrics.json"],
        "sweep": [f"{base}/optimize/sweep/best.json"],
        "iterative": [f"{base}/optimize/iterative/best.json"],
    }[chosen]


def strategy_config(wildcards):
    """The optimized config: the diagnosis' patch (targeted, none) or the strategy's best."""
    chosen = strategy(wildcards)
    if chosen in ("targeted", "none"):
        return f"results/{wildcards.exp}/diagnosis/optimization_config.yaml"
    return f"results/{wildcards.exp}/optimize/{chosen}/best.yaml"


def optimized_config(wildcards):
    """What a seed run trains: the optimized config on the optimized side, the experiment's own otherwise."""
    return [strategy_config(wildcards)] if wildcards.side == "optimized" else []


def reuse_source(wildcards):
    """The finished run a seed run adopts instead of training the same config with the same seed again: the
    baseline run (baseline side) or the targeted run (optimized side), for the experiment's own seed.
    `tunewise train --reuse-from` checks config and seed on the files and trains when they differ."""
    if int(wildcards.seed) != int(exp_cfg(wildcards).get("seed", 0)):
        return []
    if wildcards.side == "baseline":
        return [f"results/{wildcards.exp}/baseline/metrics.json"]
    if strategy(wildcards) == "targeted":
        return [f"results/{wildcards.exp}/optimize/targeted/metrics.json"]
    return []


def sweep_trials(wildcards):
    n = exp_cfg(wildcards)["optimize"]["sweep"]["n_trials"]
    return [f"results/{wildcards.exp}/optimize/sweep/trials/trial{i}/trial.json" for i in range(n)]


def seed_runs(wildcards, side):
    seeds = exp_cfg(wildcards)["significance"]["seeds"]
    seeds = list(range(seeds)) if isinstance(seeds, int) else seeds
    return [f"results/{wildcards.exp}/seeds/{side}/seed{s}/metrics.json" for s in seeds]


def significance_inputs(wildcards):
    inputs = {"optimize": optimize_outputs(wildcards)}
    inputs["optimized"] = seed_runs(wildcards, "optimized") if inputs["optimize"] else []
    return inputs


def experiment_outputs(exp):
    """What finishes an experiment: the final model, and the design on it where the experiment designs."""
    out = [f"results/{exp}/final/final.json"]
    if exp in DESIGN_EXPERIMENTS:
        out.append(f"results/{exp}/design/design.json")
    return out


def run_dirs(paths):
    return [os.path.dirname(p) for p in paths]
