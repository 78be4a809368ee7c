rule resolve_experiment:
    wildcard_constraints:
        exp=BASE_EXP,
    output:
        "results/{exp}/experiment.yaml",
    params:
        cfg=experiment_json,
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/resolve_experiment.log",
    localrule: True
    resources:
        gpu=0,
    shell:
        "tunewise resolve --config-json {params.cfg:q} --experiment {wildcards.exp:q} --out {output:q}"
        " --rule resolve_experiment > {log:q} 2>&1"


rule prepare_data:
    wildcard_constraints:
        exp=BASE_EXP,
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


rule prepare_step:
    wildcard_constraints:
        exp=BASE_EXP,
    # one job per preparation step the experiment's trainer declares (Trainer.preparation_steps), e.g. a model
    # the data must train before any run; every training job waits for them (common.smk: data_ready)
    input:
        exp="results/{exp}/experiment.yaml",
        data="results/{exp}/data/ready.json",
    output:
        "results/{exp}/data/{step}/step.json",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/prepare_step_{step}.log",
    threads: threads_for
    resources:
        gpu=0,
        mem_mb=mem_for,
        runtime=runtime_for,
    shell:
        "tunewise prepare-step --experiment-file {input.exp:q} --step {wildcards.step:q} --out {output:q}"
        " --threads {threads} --rule prepare_step > {log:q} 2>&1"
