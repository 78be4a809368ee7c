# Paths, resources and input functions shared by every rule.
import json
import os
import re

from snakemake.exceptions import IncompleteCheckpointException, WorkflowError

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


# an experiment's name; `exp` also matches its later optimization rounds, whose folders results/<exp>/round<r>/
# have the experiment's own layout (tunewise.phases.rounds): the rules of Phases 3-4 serve every round alike
BASE_EXP = "|".join(re.escape(e) for e in EXPERIMENTS) if EXPERIMENTS else "[^/]+"
ROUND_EXP = rf"(?:{BASE_EXP})(?:/round[2-9])?"


wildcard_constraints:
    exp=ROUND_EXP,
    side="baseline|optimized",
    seed=r"\d+",
    trial=r"\d+",
    gate="diagnostics|optimization_complete",
    step=r"[A-Za-z0-9_-]+",


def base_exp(exp):
    """The experiment a round folder belongs to: latent_mp for latent_mp/round2."""
    return re.sub(r"[/]round\d+$", "", exp)


def round_of(exp):
    """1 for the experiment's own folders, r for results/<exp>/round<r>/."""
    m = re.search(r"[/]round(\d+)$", exp)
    return int(m.group(1)) if m else 1


def previous_round(wildcards):
    """The round before round `n` of experiment `base` (rule plan_round)."""
    return round_exp(wildcards.base, int(wildcards.n) - 1)


def round_exp(exp, index):
    return base_exp(exp) if index == 1 else f"{base_exp(exp)}/round{index}"


def exp_cfg(wildcards):
    return config["experiments"][base_exp(wildcards.exp)]


def checkpoint_file(step, path, **wildcards):
    """`path`, an output of checkpoint `step` for `wildcards`, once the checkpoint has run (until then Snakemake
    waits for it). In a later round, a file already there from an earlier start is read as it is: Snakemake
    counts a checkpoint as done only once its job is in the DAG, and a later round's jobs join the DAG after
    that count was taken, so they would wait forever for checkpoints that need not run. Should the checkpoint
    run again after all, the jobs that read the file are evaluated again when it has (Snakemake updates a
    checkpoint's dependents)."""
    try:
        step.get(**wildcards)
    except IncompleteCheckpointException:
        if round_of(wildcards["exp"]) == 1 or not os.path.exists(path):
            raise  # round 1's jobs are in the first DAG, where Snakemake's own count holds
    return path


def round_decision(exp):
    """A round's decision.json, once its significance checkpoint has run."""
    with open(checkpoint_file(checkpoints.significance, f"results/{exp}/significance/decision.json", exp=exp)) as f:
        return json.load(f)


def loop_rounds(exp):
    """The rounds seed 004's loop ran for the experiment: round 1, then one more while a round's decision
    says `iterate` (B) or `retry` (C); each is known only after the one before it has decided."""
    rounds = [exp]
    while round_decision(rounds[-1])["next"] in ("iterate", "retry") and len(rounds) < 9:
        rounds.append(round_exp(exp, len(rounds) + 1))
    return rounds


def incumbent(exp):
    """(round folder, side) a later round starts from and compares with: the optimized side of the round before
    after B, else that round's own start (C); round 1 starts from the baseline."""
    index = round_of(exp)
    if index == 1:
        return exp, "baseline"
    previous = round_exp(exp, index - 1)
    if round_decision(previous)["next"] == "iterate":
        return previous, "optimized"
    return incumbent(previous)


def seed_list(wildcards):
    seeds = exp_cfg(wildcards)["significance"]["seeds"]
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def own_seed(wildcards):
    """The seed whose run a diagnosis reads: the experiment's, or the first compared one when it is not among them."""
    seeds, seed = seed_list(wildcards), int(exp_cfg(wildcards).get("seed", 0))
    return seed if seed in seeds else seeds[0]


def diagnosed_run(wildcards):
    """The run a round's diagnosis reads: the baseline, or in a later round its starting config's seed run."""
    if round_of(wildcards.exp) == 1:
        return f"results/{wildcards.exp}/baseline/metrics.json"
    where, side = incumbent(wildcards.exp)
    return f"results/{where}/seeds/{side}/seed{own_seed(wildcards)}/metrics.json"


def experiment_json(wildcards):
    """Only this experiment's settings, so editing one experiment reruns only its jobs."""
    return json.dumps(
        {"tracking": config.get("tracking", {}), "experiments": {wildcards.exp: exp_cfg(wildcards)}},
        sort_keys=True,
    )


def data_ready(wildcards):
    """What a training job needs before it starts: the prepared data and the preparation steps its trainer
    declares for this experiment's config (`preparation_steps`, known at the parse: config.py resolved it).
    Every round of an experiment trains on the experiment's data."""
    exp = base_exp(wildcards.exp)
    steps = PREPARATION_STEPS[exp]
    return [f"results/{exp}/data/ready.json", *(f"results/{exp}/data/{s}/step.json" for s in steps)]


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
    if requested != "auto" and round_of(wildcards.exp) == 1:
        return requested
    # a later round's strategy is its experiment.yaml's (C's next rung), which its diagnosis records
    path = checkpoint_file(checkpoints.diagnose, f"results/{wildcards.exp}/diagnosis/diagnosis.json", exp=wildcards.exp)
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
    """A side's seed runs; a later round's baseline side is its starting config's seeds, where they ran."""
    where = wildcards.exp
    if side == "baseline" and round_of(wildcards.exp) > 1:
        where, side = incumbent(wildcards.exp)
    return [f"results/{where}/seeds/{side}/seed{s}/metrics.json" for s in seed_list(wildcards)]


def significance_inputs(wildcards):
    inputs = {"optimize": optimize_outputs(wildcards)}
    inputs["optimized"] = seed_runs(wildcards, "optimized") if inputs["optimize"] else []
    return inputs


def loop_decisions(wildcards):
    """Every round's decision.json, round 1 first: what the loop's conclusion reads."""
    return [f"results/{r}/significance/decision.json" for r in loop_rounds(wildcards.exp)]


def experiment_outputs(exp):
    """What finishes an experiment: the final model, and the design on it where the experiment designs."""
    out = [f"results/{exp}/final/final.json"]
    if exp in DESIGN_EXPERIMENTS:
        out.append(f"results/{exp}/design/design.json")
    return out


def run_dirs(paths):
    return [os.path.dirname(p) for p in paths]
