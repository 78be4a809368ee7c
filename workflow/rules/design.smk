rule design:
    """Inverse design on the final model (trainers with a design phase): design.json, trajectories/latents/descriptors CSVs, design_report.md."""
    wildcard_constraints:
        exp=BASE_EXP,
    input:
        exp="results/{exp}/experiment.yaml",
        data=data_ready,
        final="results/{exp}/final/final.json",
    output:
        design="results/{exp}/design/design.json",
        report=report(
            "reports/{exp}/design_report.md",
            caption="../report/design_report.rst",
            category="{exp}",
            subcategory="Design",
        ),
        # the plots drawn for every design; the alpha study and one design-vs-known plot per objective task
        # depend on the design block, so they stay undeclared (linked from the report only)
        trajectories=report(
            "reports/{exp}/plots/design_trajectories.png",
            caption="../report/design_trajectories.rst",
            category="{exp}",
            subcategory="Design",
        ),
        scores=report(
            "reports/{exp}/plots/design_scores.png",
            caption="../report/design_scores.rst",
            category="{exp}",
            subcategory="Design",
        ),
    params:
        out_dir=lambda wc, output: os.path.dirname(output.design),
        reports="reports/{exp}",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/design.log",
    threads: threads_for
    resources:
        **TRAINING_RESOURCES,
    shell:
        "tunewise design --experiment-file {input.exp:q} --final {input.final:q} --out-dir {params.out_dir:q}"
        " --reports-dir {params.reports:q} --threads {threads} --gpus {resources.gpu} --attempt {resources.attempt} --rule design > {log:q} 2>&1"
