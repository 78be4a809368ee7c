rule resolve_experiment:
    output:
        "results/{exp}/experiment.yaml",
    params:
        cfg=experiment_json,
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/resolve_experiment.log",
    localrule: True
    shell:
        "tunewise resolve --config-json {params.cfg:q} --experiment {wildcards.exp:q} --out {output:q} > {log:q} 2>&1"


rule prepare_data:
    input:
        exp="results/{exp}/experiment.yaml",
    output:
        "results/{exp}/data/ready.json",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/prepare_data.log",
    threads: threads_for
    resources:
        gpu=0,
        mem_mb=mem_for,
        runtime=runtime_for,
    shell:
        "tunewise prepare-data --experiment-file {input.exp:q} --out {output:q} --threads {threads}"
        " --rule prepare_data > {log:q} 2>&1"


rule train_clip:
    input:
        exp="results/{exp}/experiment.yaml",
        data="results/{exp}/data/ready.json",
    output:
        "results/{exp}/data/clip/clip_metrics.json",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/train_clip.log",
    threads: threads_for
    resources:
        gpu=0,
        mem_mb=mem_for,
        runtime=runtime_for,
    shell:
        "tunewise train-clip --experiment-file {input.exp:q} --out {output:q} --threads {threads}"
        " --rule train_clip > {log:q} 2>&1"
