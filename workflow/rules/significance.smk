rule seed_run:
    input:
        exp="results/{exp}/experiment.yaml",
        data=data_ready,
        # the optimized side trains the chosen strategy's config; the baseline side the experiment's own
        # (an empty list: `--config-file=` then reads as "none", where a bare flag would eat the next one)
        config=optimized_config,
        reuse=reuse_source,
    output:
        "results/{exp}/seeds/{side}/seed{seed}/metrics.json",
    params:
        run_dir=lambda wc, output: os.path.dirname(output[0]),
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/seed_run_{side}_{seed}.log",
    threads: threads_for
    # a failed training job is tried again; after an out-of-memory failure with half the batch (tunewise.train.oom)
    retries: TRAIN_RETRIES
    resources:
        **TRAINING_RESOURCES,
    shell:
        "tunewise train --experiment-file {input.exp:q} --config-file={input.config:q} --run-dir {params.run_dir:q}"
        " --reuse-from={input.reuse:q} --phase seed --side {wildcards.side} --seed {wildcards.seed}"
        " --threads {threads} --gpus {resources.gpu} --attempt {resources.attempt} --rule seed_run > {log:q} 2>&1"


# a checkpoint: its decision says whether the loop goes on (rounds.smk), which Snakemake learns when it has run
checkpoint significance:
    input:
        unpack(significance_inputs),
        exp="results/{exp}/experiment.yaml",
        diagnosis="results/{exp}/diagnosis/diagnosis.json",
        gate="results/{exp}/gates/diagnostics.json",
        # the baseline side does not depend on the diagnosis: its seeds start right away
        baseline=lambda wc: seed_runs(wc, "baseline"),
    output:
        significance="results/{exp}/significance/significance.json",
        decision="results/{exp}/significance/decision.json",
        # this round's results; reports/<exp>/optimization_results.md gathers the rounds (rounds.smk: conclude)
        report=report(
            "reports/{exp}/round_results.md",
            caption="../report/round_results.rst",
            category="{exp}",
            subcategory="Phase 4: optimization",
        ),
        curves=report(
            "reports/{exp}/plots/curves_comparison.png",
            caption="../report/curves_comparison.rst",
            category="{exp}",
            subcategory="Phase 4: optimization",
        ),
        significance_report=report(
            "reports/{exp}/significance.md",
            caption="../report/significance.rst",
            category="{exp}",
            subcategory="Significance",
        ),
        seed_scores=report(
            "reports/{exp}/plots/seed_scores.png",
            caption="../report/seed_scores.rst",
            category="{exp}",
            subcategory="Significance",
        ),
    params:
        # params are evaluated once before the diagnose checkpoint has run, when inputs are unknown
        baseline=lambda wc, input: run_dirs(getattr(input, "baseline", [])),
        optimized=lambda wc, input: run_dirs(getattr(input, "optimized", [])),
        out_dir=lambda wc, output: os.path.dirname(output.significance),
        reports="reports/{exp}",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/significance.log",
    localrule: True
    resources:
        gpu=0,
    shell:
        "tunewise significance --experiment-file {input.exp:q} --diagnosis {input.diagnosis:q}"
        " --baseline-runs {params.baseline:q} --optimized-runs {params.optimized:q}"
        " --out-dir {params.out_dir:q} --reports-dir {params.reports:q} --rule significance > {log:q} 2>&1"
