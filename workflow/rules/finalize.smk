rule finalize:
    wildcard_constraints:
        exp=BASE_EXP,
    input:
        exp="results/{exp}/experiment.yaml",
        data=data_ready,
        # the loop's conclusion: the config to finalize, from the best verified round
        decision="results/{exp}/loop/decision.json",
        gate="results/{exp}/gates/optimization_complete.json",
    output:
        final="results/{exp}/final/final.json",
        # best_model_<side>.pt and last_model_<side>.pt are named after the side that won, known only when
        # the job runs: final.json (written after them) names them
        config="results/{exp}/final/final_config.yaml",
        report=report(
            "reports/{exp}/final_report.md",
            caption="../report/final_report.rst",
            category="{exp}",
            subcategory="Phase 5: finalization",
        ),
    params:
        out_dir=lambda wc, output: os.path.dirname(output.final),
        reports="reports/{exp}",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/finalize.log",
    threads: threads_for
    # a failed training job is tried again; after an out-of-memory failure with half the batch (tunewise.train.oom)
    retries: TRAIN_RETRIES
    resources:
        **TRAINING_RESOURCES,
    shell:
        "tunewise finalize --experiment-file {input.exp:q} --decision {input.decision:q}"
        " --out-dir {params.out_dir:q} --reports-dir {params.reports:q} --threads {threads} --gpus {resources.gpu} --attempt {resources.attempt}"
        " --rule finalize > {log:q} 2>&1"
