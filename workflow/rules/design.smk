rule design:
    """Latent inverse design on the final model: design.json, trajectories/latents/descriptors CSVs, design_report.md."""
    input:
        exp="results/{exp}/experiment.yaml",
        data=data_ready,
        final="results/{exp}/final/final.json",
    output:
        design="results/{exp}/design/design.json",
    params:
        out_dir=lambda wc, output: os.path.dirname(output.design),
        reports="reports/{exp}",
    conda:
        CONDA_ENV
    log:
        "results/{exp}/logs/design.log",
    threads: threads_for
    resources:
        gpu=gpus_for,
        mem_mb=mem_for,
        runtime=runtime_for,
    shell:
        "tunewise design --experiment-file {input.exp:q} --final {input.final:q} --out-dir {params.out_dir:q}"
        " --reports-dir {params.reports:q} --threads {threads} --rule design > {log:q} 2>&1"
