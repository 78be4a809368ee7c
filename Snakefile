# tunewise: baseline -> diagnose -> optimize -> multi-seed significance -> finalize (-> design, for trainers with one).
# Run: snakemake --cores 8 --resources gpu=1   (see README.md)
import os

from snakemake.utils import min_version

min_version("9.0")

# the front page of `snakemake --report report.html`; the results are flagged with report(...) in the rules
report: "workflow/report/workflow.rst"


# the embedded default, unless --configfile gave another (merging both would mix experiments); a
# --config of top-level switches alone (a profile's `config: ["request_gpus=always"]`) is applied over it
if "experiments" not in config:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/baseline.smk"
include: "workflow/rules/diagnose.smk"
include: "workflow/rules/optimize.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/iterative.smk"
include: "workflow/rules/significance.smk"
include: "workflow/rules/rounds.smk"
include: "workflow/rules/finalize.smk"
include: "workflow/rules/design.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "reports/index.md",
        [path for exp in EXPERIMENTS for path in experiment_outputs(exp)],
    default_target: True
