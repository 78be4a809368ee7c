rule train_baseline:
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
    resources:
        gpu=gpus_for,
        mem_mb=mem_for,
        runtime=runtime_for,
    shell:
        "tunewise train --experiment-file {input.exp:q} --run-dir {params.run_dir:q} --phase baseline"
        " --threads {threads} --rule train_baseline > {log:q} 2>&1"
