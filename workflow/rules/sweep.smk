# One job per trial slot: it asks the experiment's Optuna study, trains, and tells. Jobs of one study run in
# parallel (journal file on one host, an RDB URL on a cluster); a finished slot is never retrained.
rule sweep_trial:
    input:
        exp="results/{exp}/experiment.yaml",
        data=data_ready,
        gate="results/{exp}/gates/diagnostics.json",
        config="results/{exp}/diagnosis/optimization_config.yaml",
    output:
        "results/{exp}/optimize/sweep/trials/trial{trial}/trial.json",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/sweep_trial_{trial}.log",
    threads: threads_for
    # a failed training job is tried again; after an out-of-memory failure with half the batch (tunewise.train.oom)
    retries: TRAIN_RETRIES
    resources:
        **TRAINING_RESOURCES,
    shell:
        "tunewise sweep-trial --experiment-file {input.exp:q} --slot {wildcards.trial} --out {output:q}"
        " --threads {threads} --gpus {resources.gpu} --attempt {resources.attempt} --rule sweep_trial > {log:q} 2>&1"


checkpoint select_best:
    input:
        exp="results/{exp}/experiment.yaml",
        trials=sweep_trials,
    output:
        best="results/{exp}/optimize/sweep/best.yaml",
        summary="results/{exp}/optimize/sweep/best.json",
        sweep="results/{exp}/optimize/sweep/sweep.json",
    params:
        out_dir=lambda wc, output: os.path.dirname(output.best),
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/select_best.log",
    localrule: True
    resources:
        gpu=0,
    shell:
        "tunewise select-best --experiment-file {input.exp:q} --out-dir {params.out_dir:q}"
        " --rule select_best > {log:q} 2>&1"
