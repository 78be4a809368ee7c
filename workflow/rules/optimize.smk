rule optimize_targeted:
    input:
        exp="results/{exp}/experiment.yaml",
        data=data_ready,
        config="results/{exp}/diagnosis/optimization_config.yaml",
        gate="results/{exp}/gates/diagnostics.json",
    output:
        "results/{exp}/optimize/targeted/metrics.json",
    params:
        run_dir=lambda wc, output: os.path.dirname(output[0]),
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/optimize_targeted.log",
    threads: threads_for
    # a failed training job is tried again; after an out-of-memory failure with half the batch (tunewise.train.oom)
    retries: TRAIN_RETRIES
    resources:
        **TRAINING_RESOURCES,
    shell:
        "tunewise train --experiment-file {input.exp:q} --config-file {input.config:q}"
        " --run-dir {params.run_dir:q} --phase optimize --threads {threads} --gpus {resources.gpu} --attempt {resources.attempt}"
        " --rule optimize_targeted > {log:q} 2>&1"
