"""`tunewise <verb>`: the one entry point the Snakemake rules call.

Each verb also works by hand. A verb parses its arguments, calls one phase function (tunewise.phases) with
explicit arguments, and maps the errors to exit code 2 with the message alone. Heavy imports (torch, mlflow,
pandas) happen inside the phases so that `tunewise --help` and light verbs start fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from tunewise.phases import CliError

log = logging.getLogger("tunewise")


def _experiment(args) -> dict:
    from tunewise.config import load_experiment

    return load_experiment(args.experiment_file)


def _exp_dir(args) -> Path:
    return Path(args.experiment_file).parent


# --- verbs ----------------------------------------------------------------------------------


def cmd_validate(args) -> None:
    from tunewise.config import load_yaml
    from tunewise.experiment import validate

    cfg = validate(load_yaml(args.config))
    print(f"{args.config}: valid ({', '.join(cfg['experiments'])})")


def cmd_resolve(args) -> None:
    from tunewise.config import dump_yaml, load_yaml, validate_schema
    from tunewise.experiment import resolve_experiment
    from tunewise.runs import atomic_write_text

    raw = json.loads(args.config_json) if args.config_json else load_yaml(args.config)
    cfg = validate_schema(raw)
    if args.experiment not in cfg["experiments"]:
        raise CliError(f"experiment {args.experiment!r} not in config (have: {', '.join(cfg['experiments'])})")
    exp = resolve_experiment(cfg, args.experiment)
    out = Path(args.out)
    exp["baseline"]["data"]["prepared_dir"] = str(out.parent / "data")
    atomic_write_text(out, dump_yaml(exp))
    if args.rule:  # as a workflow job: on the experiment's MLflow runs too (a standalone resolve touches none)
        from tunewise.phases import tracked

        tracked.log_experiment_files(exp, out.parent, args.rule, {out: None})
    print(f"wrote {out}")


def cmd_prepare_data(args) -> None:
    from tunewise.phases.data import prepare_data

    prepare_data(_experiment(args), _exp_dir(args), Path(args.out), threads=args.threads, rule=args.rule)


def cmd_prepare_step(args) -> None:
    """One preparation step the experiment's trainer declares (cached on the data and its settings)."""
    from tunewise.phases.data import prepare_step

    prepare_step(_experiment(args), args.step, Path(args.out), threads=args.threads, rule=args.rule)


def cmd_train(args) -> None:
    from tunewise.phases.train import train_config, train_run

    exp, exp_dir = _experiment(args), _exp_dir(args)
    config = train_config(exp, exp_dir, args.config_file, args.side, args.set)
    train_run(exp, exp_dir, args.run_dir, config, args.seed, phase=args.phase, side=args.side, rule=args.rule,
              run_name=args.run_name, threads=args.threads, reuse_from=args.reuse_from, force=args.force)


def cmd_diagnose(args) -> None:
    from tunewise.phases.data import ready_path
    from tunewise.phases.diagnose import diagnose_run
    from tunewise.reports.render import write_diagnostic_report

    reports_dir, exp = Path(args.reports_dir), _experiment(args)
    diagnose_run(exp, args.run_dir, args.out_dir, rule=args.rule, data_ready=ready_path(exp),
                 report=lambda diagnosis, run_dir: write_diagnostic_report(diagnosis, run_dir, reports_dir))


def cmd_sweep_trial(args) -> None:
    """One trial slot of the experiment's study: ask, train (reporting for pruning), tell."""
    from tunewise.phases.sweep import run_slot

    run_slot(_experiment(args), _exp_dir(args), args.slot, Path(args.out), threads=args.threads, rule=args.rule)


def cmd_select_best(args) -> None:
    """The best complete trial of the study -> best.yaml, best.json, sweep.json (with playbook checks)."""
    from tunewise.phases.sweep import select_best

    select_best(_experiment(args), _exp_dir(args), Path(args.out_dir), rule=args.rule)


def cmd_iterate(args) -> None:
    """One round of the iterative strategy (diagnose the previous round, apply, train), or with --summary
    the chain's best.yaml/best.json/iterative.json once every round has run."""
    from tunewise.phases import iterate

    exp, exp_dir = _experiment(args), _exp_dir(args)
    if args.summary:
        iterate.finish_chain(exp, exp_dir, out=args.out, rule=args.rule)
    else:
        iterate.iterate_round(exp, exp_dir, args.round, out=args.out, threads=args.threads, rule=args.rule)


def cmd_significance(args) -> None:
    from tunewise.phases.significance import judge
    from tunewise.reports.render import write_optimization_results

    diagnosis, reports_dir = Path(args.diagnosis), Path(args.reports_dir)

    def report(significance: Path, decision: Path, baseline_run: Path, optimize_run: Path | None, extra: dict):
        # this round's page; conclude gathers the rounds into optimization_results.md
        return write_optimization_results(significance, decision, diagnosis, baseline_run, optimize_run,
                                          reports_dir, name="round_results.md", **extra)

    judge(_experiment(args), _exp_dir(args), diagnosis, args.baseline_runs, args.optimized_runs, Path(args.out_dir),
          optimize_run=args.optimize_run, report=report, rule=args.rule)


def cmd_next_round(args) -> None:
    """The experiment.yaml of the round after this one (seed 004's loop: B or C said go on)."""
    from tunewise.phases.rounds import write_next_experiment

    write_next_experiment(_experiment(args), _exp_dir(args), Path(args.decision), Path(args.out), rule=args.rule)


def cmd_conclude(args) -> None:
    """The loop's conclusion: loop.json, the final decision, optimization_results.md over the rounds."""
    from tunewise.phases.rounds import conclude
    from tunewise.reports.rounds import write_rounds_report

    reports_dir = Path(args.reports_dir)
    conclude(_experiment(args), _exp_dir(args), args.rounds, Path(args.out_dir), rule=args.rule,
             report=lambda loop: write_rounds_report(loop, reports_dir))


def cmd_gate(args) -> None:
    from tunewise.phases.gates import gate
    from tunewise.reports.render import write_checklist

    gate(_experiment(args), _exp_dir(args), args.name, Path(args.out), Path(args.reports_dir),
         write_checklist=write_checklist, optimize_run=args.optimize_run, rule=args.rule)


def cmd_finalize(args) -> None:
    from tunewise.phases.finalize import finalize
    from tunewise.reports.render import write_final_report

    decision, reports_dir = Path(args.decision), Path(args.reports_dir)
    finalize(_experiment(args), _exp_dir(args), decision, args.baseline_config, args.optimized_config,
             Path(args.out_dir), report=lambda final: write_final_report(final, decision, reports_dir),
             threads=args.threads, rule=args.rule)


def cmd_design(args) -> None:
    """Inverse design on the final model (trainers with a design phase): design.json, the CSVs beside it, design_report.md."""
    from tunewise.phases.design import design
    from tunewise.reports.design import write_design_report

    reports_dir = Path(args.reports_dir)
    design(_experiment(args), args.final, Path(args.out_dir), sets=args.set, threads=args.threads,
           progress=args.progress, rule=args.rule, report=lambda result: write_design_report(result, reports_dir))


def cmd_gpu_slot(args) -> None:
    """Run any command in the GPU slot(s) main() claimed: it replaces this process and keeps the locks,
    so the slot is free again exactly when the command ends (for rules of your own that use a GPU)."""
    from tunewise.devices import keep_slots_across_exec

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("no command given (tunewise gpu-slot --gpus N -- COMMAND ...)")
    keep_slots_across_exec()
    try:
        os.execvp(command[0], command)
    except OSError as e:
        raise CliError(f"cannot run {command[0]!r}: {e.strerror}") from None


def cmd_report_index(args) -> None:
    from tunewise.reports.render import write_index

    from tunewise.phases.report_index import log_index

    written = write_index(Path(args.results_dir), Path(args.reports_dir))
    if args.rule:  # as a workflow job: on every experiment's MLflow `workflow` run
        log_index(Path(args.results_dir), written, args.rule)
    print(f"wrote {written[0]}")


# --- argument parsing -----------------------------------------------------------------------


def _gpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="GPUs Snakemake gave this job ({resources.gpu}): lock N free GPU slots of this host and set "
                        "CUDA_VISIBLE_DEVICES to them before torch loads (nothing for 0, or under SLURM)")
    p.add_argument("--attempt", type=int, default=None, metavar="N",
                   help="Snakemake's attempt number ({resources.attempt}): a retry of a job whose first attempt "
                        "failed on its input stops at once with that message (tunewise.retries)")


def _common(p: argparse.ArgumentParser, experiment: bool = True) -> None:
    if experiment:
        p.add_argument("--experiment-file", required=True, help="results/<exp>/experiment.yaml (from `tunewise resolve`)")
    p.add_argument("--rule", default=None, help="Snakemake rule name, recorded as an MLflow tag")


def _setup_verbs(sub) -> None:
    """Verbs: configs and data."""
    p = sub.add_parser("validate", help="validate a config file")
    p.add_argument("config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("resolve", help="write one experiment's fully resolved config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config YAML")
    src.add_argument("--config-json", help="the workflow config as JSON (used by the Snakefile)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rule", default=None, help="Snakemake rule name: log experiment.yaml to the experiment's MLflow "
                                                "`workflow` run (a standalone resolve touches no tracking store)")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("prepare-data", help="make the experiment's data ready (cached)")
    _common(p)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("prepare-step", help="one preparation step the experiment's trainer declares, after "
                                            "prepare-data and before any training")
    _common(p)
    p.add_argument("--step", required=True, help="the step's name, as the trainer's preparation_steps gives it")
    p.add_argument("--out", required=True, help="results/<exp>/data/<step>/step.json")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_prepare_step)


def _train_verbs(sub) -> None:
    """Verbs: training a run and diagnosing it (Phases 1-3)."""
    p = sub.add_parser("train", help="train one run into a run directory (resumes from last.pt)")
    _common(p)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--config-file", help="full trainer config (default: the experiment's baseline)")
    p.add_argument("--seed", type=int)
    p.add_argument("--phase", default="baseline", choices=["baseline", "optimize", "seed", "final"])
    p.add_argument("--side", default=None, choices=[None, "baseline", "optimized"])
    p.add_argument("--threads", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. optim.lr=0.01")
    p.add_argument("--run-name")
    p.add_argument("--force", action="store_true")
    p.add_argument("--reuse-from", default=None,
                   help="metrics.json of a finished run; adopted instead of training when it has the same config and seed")
    _gpus(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("diagnose", help="Phase 3: findings, recommendations, config patch, strategy")
    _common(p)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--reports-dir", required=True)
    p.set_defaults(func=cmd_diagnose)


def _optimize_verbs(sub) -> None:
    """Verbs: the optimization strategies that run as several jobs (Phase 4)."""
    p = sub.add_parser("sweep-trial", help="Phase 4 sweep: ask the study for one trial slot, train it, tell")
    _common(p)
    p.add_argument("--slot", type=int, required=True, help="trial slot (the Snakemake wildcard `trial`)")
    p.add_argument("--out", required=True, help="trial.json, written once the trial is told")
    p.add_argument("--threads", type=int)
    _gpus(p)
    p.set_defaults(func=cmd_sweep_trial)

    p = sub.add_parser("select-best", help="Phase 4 sweep: best trial -> best.yaml, sweep.json, playbook checks")
    _common(p)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_select_best)

    p = sub.add_parser("iterate", help="Phase 4 iterative: one round of diagnose -> recommend -> train")
    _common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--round", type=int, help="round number K (1..optimize.iterative.max_iterations)")
    which.add_argument("--summary", action="store_true", help="best.yaml, best.json, iterative.json after the last round")
    p.add_argument("--out", help="round<K>/round.json (or best.json with --summary); checked against the layout")
    p.add_argument("--threads", type=int)
    _gpus(p)
    p.set_defaults(func=cmd_iterate)


def _decision_verbs(sub) -> None:
    """Verbs: significance, gates and the final model (Phase 4-5)."""
    p = sub.add_parser("significance", help="multi-seed comparison and the decision point")
    _common(p)
    p.add_argument("--diagnosis", required=True)
    p.add_argument("--baseline-runs", nargs="+", required=True)
    p.add_argument("--optimized-runs", nargs="*", default=[])
    p.add_argument("--optimize-run")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--reports-dir", required=True)
    p.set_defaults(func=cmd_significance)

    p = sub.add_parser("next-round", help="seed 004's loop: the next round's experiment.yaml after a B or C decision")
    _common(p)
    p.add_argument("--decision", required=True, help="this round's significance/decision.json")
    p.add_argument("--out", required=True, help="results/<exp>/round<r+1>/experiment.yaml")
    p.set_defaults(func=cmd_next_round)

    p = sub.add_parser("conclude", help="seed 004's loop: the rounds' conclusion, the config Phase 5 finalizes")
    _common(p)
    p.add_argument("--rounds", nargs="+", required=True, help="the round folders in order: results/<exp> results/<exp>/round2 ...")
    p.add_argument("--out-dir", required=True, help="results/<exp>/loop")
    p.add_argument("--reports-dir", required=True)
    p.set_defaults(func=cmd_conclude)

    p = sub.add_parser("gate", help="render a checklist from checks; fail on an unticked required box")
    _common(p)
    p.add_argument("--name", required=True, choices=["diagnostics", "optimization_complete"])
    p.add_argument("--optimize-run")
    p.add_argument("--out", required=True)
    p.add_argument("--reports-dir", required=True)
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("finalize", help="Phase 5: final training, test split once, final checkpoints")
    _common(p)
    p.add_argument("--decision", required=True)
    p.add_argument("--baseline-config", help="with a single round's decision.json: the baseline config")
    p.add_argument("--optimized-config", help="with a single round's decision.json: the optimized config")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--reports-dir", required=True)
    p.add_argument("--threads", type=int)
    _gpus(p)
    p.set_defaults(func=cmd_finalize)


def _tool_verbs(sub) -> None:
    """Verbs: design (Phase 6) and tools."""
    p = sub.add_parser("design", help="Phase 6 (trainers with a design phase): batched inverse design on the final model, design_report.md")
    _common(p)
    p.add_argument("--final", required=True, help="results/<exp>/final/final.json")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--reports-dir", required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a design setting for this run, e.g. restarts=200 or alpha=0 (YAML value)")
    p.add_argument("--progress", action="store_true", help="a progress bar over the design steps")
    _gpus(p)
    p.set_defaults(func=cmd_design)

    p = sub.add_parser("gpu-slot", help="run a command in a free GPU slot of this host (CUDA_VISIBLE_DEVICES set)")
    _gpus(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    p.set_defaults(func=cmd_gpu_slot, gpus=1)

    p = sub.add_parser("report-index", help="reports/index.md across experiments")
    _common(p, experiment=False)
    p.add_argument("--results-dir", default="results")
    p.add_argument("--reports-dir", default="reports")
    p.set_defaults(func=cmd_report_index)


def build_parser() -> argparse.ArgumentParser:
    from tunewise import __version__

    parser = argparse.ArgumentParser(prog="tunewise", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tunewise {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(gpus=None)  # the verbs that run on a GPU take --gpus
    sub = parser.add_subparsers(dest="verb", required=True)
    _setup_verbs(sub)
    _train_verbs(sub)
    _optimize_verbs(sub)
    _decision_verbs(sub)
    _tool_verbs(sub)
    return parser


def _claim_gpu_slots(args) -> None:
    """Before any verb imports torch: CUDA reads CUDA_VISIBLE_DEVICES once, when it initialises."""
    if args.gpus is None:
        return
    from tunewise import devices

    claimed = devices.claim_gpus(args.gpus)
    if claimed:
        print(f"tunewise {args.verb}: GPU slot(s) {','.join(claimed)} (CUDA_VISIBLE_DEVICES)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tunewise.config import ConfigError
    from tunewise.devices import DeviceError, GpuSlotError
    from tunewise.runs import CheckpointError
    from tunewise.tracking import TrackingError

    from tunewise.phases.train import OutOfMemory
    from tunewise.retries import earlier_input_error, record_input_error

    argv = list(sys.argv[1:] if argv is None else argv)
    earlier = earlier_input_error(args.verb, argv, getattr(args, "attempt", None))
    if earlier is not None:
        print(f"tunewise {args.verb}: error: not retried: an earlier attempt failed on its input, which a retry "
              f"cannot change (fix it and run the workflow again): {earlier}", file=sys.stderr)
        return 2
    try:
        _claim_gpu_slots(args)
        args.func(args)
    except (CliError, ConfigError, DeviceError, FileNotFoundError, GpuSlotError, TrackingError, CheckpointError) as e:
        print(f"tunewise {args.verb}: error: {e}", file=sys.stderr)
        # out of memory, a busy GPU slot or tracking store: a retry may succeed; the rest fails again the same way
        if getattr(args, "attempt", None) and not isinstance(e, (OutOfMemory, GpuSlotError, TrackingError)):
            record_input_error(args.verb, argv, str(e))
        return 2
    except ValueError as e:  # a trainer's refusal of its config or data (the protocol's error): the same every time
        if getattr(args, "attempt", None):
            record_input_error(args.verb, argv, f"{type(e).__name__}: {e}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
