rule report_index:
    input:
        [path for exp in EXPERIMENTS for path in experiment_outputs(exp)],
    output:
        report(
            "reports/index.md",
            caption="../report/index.rst",
            category="Overview",
            subcategory="All experiments",
        ),
        report(
            "reports/plots/index_overview.png",
            caption="../report/index_overview.rst",
            category="Overview",
            subcategory="All experiments",
        ),
    conda:
        CONDA_ENV
    log:
        "results/logs/report_index.log",
    localrule: True
    resources:
        gpu=0,
    shell:
        "tunewise report-index --results-dir results --reports-dir reports --rule report_index > {log:q} 2>&1"
