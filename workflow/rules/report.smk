rule report_index:
    input:
        expand("results/{exp}/final/final.json", exp=EXPERIMENTS),
    output:
        report("reports/index.md", caption="../report/index.rst", category="Overview"),
    conda:
        CONDA_ENV
    log:
        "results/logs/report_index.log",
    localrule: True
    shell:
        "tunewise report-index --results-dir results --reports-dir reports > {log:q} 2>&1"
