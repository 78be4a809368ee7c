# One job per round, chained statically: round k diagnoses round k-1's run, applies the recommendations and
# trains; once a round stops the chain (target met, worse, ceiling), the later rounds record "skipped".
rule iterate:
    input:
        exp="results/{exp}/experiment.yaml",
        data=data_ready,
        gate="results/{exp}/gates/diagnostics.json",
        config="results/{exp}/diagnosis/optimization_config.yaml",
        # the run round 1 is compared with: the baseline, or a later loop round's starting run
        baseline=diagnosed_run,
        previous=lambda wc: (
            [f"results/{wc.exp}/optimize/iterative/round{int(wc.round) - 1}/round.json"] if int(wc.round) > 1 else []
        ),
    output:
        "results/{exp}/optimize/iterative/round{round}/round.json",
    wildcard_constraints:
        round=r"\d+",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/iterate_round{round}.log",
    threads: threads_for
    # a failed training job is tried again; after an out-of-memory failure with half the batch (tunewise.train.oom)
    retries: TRAIN_RETRIES
    resources:
        **TRAINING_RESOURCES,
    shell:
        "tunewise iterate --experiment-file {input.exp:q} --round {wildcards.round} --out {output:q}"
        " --threads {threads} --gpus {resources.gpu} --attempt {resources.attempt} --rule iterate > {log:q} 2>&1"


rule iterate_summary:
    input:
        exp="results/{exp}/experiment.yaml",
        last=lambda wc: "results/{}/optimize/iterative/round{}/round.json".format(
            wc.exp, exp_cfg(wc)["optimize"]["iterative"]["max_iterations"]
        ),
    output:
        best="results/{exp}/optimize/iterative/best.yaml",
        summary="results/{exp}/optimize/iterative/best.json",
        rounds="results/{exp}/optimize/iterative/iterative.json",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/iterate_summary.log",
    localrule: True
    resources:
        gpu=0,
    shell:
        "tunewise iterate --experiment-file {input.exp:q} --summary --out {output.summary:q}"
        " --rule iterate_summary > {log:q} 2>&1"
