rule train_baseline:
    wildcard_constraints:
        exp=BASE_EXP,
    input:
        exp="results/{exp}/experiment.yaml",
        data=data_ready,
    output:
        "results/{exp}/baseline/metrics.json",
    params:
        run_dir=lambda wc, output: os.path.dirname(output[0]),
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/train_baseline.log",
    threads: threads_for
    # a failed training job is tried again; after an out-of-memory failure with half the batch (tunewise.train.oom)
    retries: TRAIN_RETRIES
    resources:
        **TRAINING_RESOURCES,
    shell:
        "tunewise train --experiment-file {input.exp:q} --run-dir {params.run_dir:q} --phase baseline"
        " --threads {threads} --gpus {resources.gpu} --attempt {resources.attempt} --rule train_baseline > {log:q} 2>&1"
