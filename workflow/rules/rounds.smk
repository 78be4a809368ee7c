# Seed 004's loop over optimization rounds (tunewise.phases.rounds). A round's significance checkpoint decides;
# on B (`iterate`: go on from the optimized config) or C (`retry`: the next strategy) the next round's
# experiment.yaml is written here and the rules of Phases 3-4 run again in results/<exp>/round<r>/. A killed
# workflow picks the loop up where its files stop.


rule plan_round:
    wildcard_constraints:
        base=BASE_EXP,
        n=r"[2-9]",
    input:
        exp=lambda wc: f"results/{previous_round(wc)}/experiment.yaml",
        decision=lambda wc: f"results/{previous_round(wc)}/significance/decision.json",
    output:
        "results/{base}/round{n}/experiment.yaml",
    conda:
        CONDA_ENV
    log:
        "results/{base}/logs/plan_round{n}.log",
    localrule: True
    resources:
        gpu=0,
    shell:
        "tunewise next-round --experiment-file {input.exp:q} --decision {input.decision:q} --out {output:q}"
        " --rule plan_round > {log:q} 2>&1"


rule conclude:
    wildcard_constraints:
        exp=BASE_EXP,
    input:
        exp="results/{exp}/experiment.yaml",
        decisions=loop_decisions,
    output:
        loop="results/{exp}/loop/loop.json",
        decision="results/{exp}/loop/decision.json",
        report=report(
            "reports/{exp}/optimization_results.md",
            caption="../report/optimization_results.rst",
            category="{exp}",
            subcategory="Phase 4: optimization",
        ),
        plot=report(
            "reports/{exp}/plots/rounds.png",
            caption="../report/rounds_plot.rst",
            category="{exp}",
            subcategory="Phase 4: optimization",
        ),
    params:
        rounds=lambda wc, input: [os.path.dirname(os.path.dirname(d)) for d in input.decisions],
        out_dir=lambda wc, output: os.path.dirname(output.loop),
        reports="reports/{exp}",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/conclude.log",
    localrule: True
    resources:
        gpu=0,
    shell:
        "tunewise conclude --experiment-file {input.exp:q} --rounds {params.rounds:q} --out-dir {params.out_dir:q}"
        " --reports-dir {params.reports:q} --rule conclude > {log:q} 2>&1"
