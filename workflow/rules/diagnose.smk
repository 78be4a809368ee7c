checkpoint diagnose:
    input:
        exp="results/{exp}/experiment.yaml",
        # the baseline run, or in a later round the seed run of the config the round starts from
        baseline=diagnosed_run,
        # the data checks of preparation: the report's Data section, and a divergence read as a data problem
        ready=lambda wc: f"results/{base_exp(wc.exp)}/data/ready.json",
    output:
        diagnosis="results/{exp}/diagnosis/diagnosis.json",
        config="results/{exp}/diagnosis/optimization_config.yaml",
        report=report(
            "reports/{exp}/diagnostic_report.md",
            caption="../report/diagnostic_report.rst",
            category="{exp}",
            subcategory="Phase 3: diagnosis",
        ),
        # the baseline's curves: drawn here, from the run the diagnosis reads
        curves=report(
            "reports/{exp}/plots/baseline_curves.png",
            caption="../report/baseline_curves.rst",
            category="{exp}",
            subcategory="Phase 2: baseline",
        ),
    params:
        run_dir=lambda wc, input: os.path.dirname(input.baseline),
        out_dir=lambda wc, output: os.path.dirname(output.diagnosis),
        reports="reports/{exp}",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/diagnose.log",
    localrule: True
    resources:
        gpu=0,
    shell:
        "tunewise diagnose --experiment-file {input.exp:q} --run-dir {params.run_dir:q}"
        " --out-dir {params.out_dir:q} --reports-dir {params.reports:q} --rule diagnose > {log:q} 2>&1"


rule gate:
    input:
        exp="results/{exp}/experiment.yaml",
        evidence=lambda wc: (
            [f"results/{wc.exp}/diagnosis/diagnosis.json"]
            if wc.gate == "diagnostics"
            else [f"results/{wc.exp}/loop/decision.json"]
        ),
    output:
        "results/{exp}/gates/{gate}.json",
    params:
        reports="reports/{exp}",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/gate_{gate}.log",
    localrule: True
    resources:
        gpu=0,
    shell:
        "tunewise gate --experiment-file {input.exp:q} --name {wildcards.gate:q} --out {output:q}"
        " --reports-dir {params.reports:q} --rule gate > {log:q} 2>&1"
