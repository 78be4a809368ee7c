"""Every rule carries its resources, as the design card asks ("GPU resource tags on each rule"): the training
rules the one TRAINING_RESOURCES block of common.smk, the light ones gpu=0, so `--resources gpu=N` counts every
job and a cluster profile sees what each asks for."""
from __future__ import annotations

import re

from e2e_support import REPO, snakemake

RULE = re.compile(r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)*)", re.MULTILINE)


def _rules() -> dict[str, str]:
    out = {}
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for name, body in RULE.findall(path.read_text(encoding="utf-8")):
            out[name] = body
    return out


def test_every_rule_declares_its_gpus():
    rules = _rules()
    assert len(rules) >= 16
    missing = [name for name, body in rules.items()
               if not re.search(r"resources:\n\s+(gpu=|\*\*TRAINING_RESOURCES)", body)]
    assert missing == []
    training = sorted(name for name, body in rules.items() if "**TRAINING_RESOURCES" in body)
    assert training == ["design", "finalize", "iterate", "optimize_targeted", "seed_run", "sweep_trial",
                        "train_baseline"]
    # the block is written once: no rule repeats the keys it holds
    assert not [name for name, body in rules.items() if "gpu=gpus_for" in body]
    # and each training job is told its attempt, so a retry of a failure on input stops at once (tunewise.retries)
    assert not [name for name in training if "--attempt {resources.attempt}" not in rules[name]]


def test_a_dry_run_shows_a_gpu_count_on_every_job(tmp_path):
    proc = snakemake(tmp_path, "-n", "--cores", "2", "--resources", "gpu=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):\n((?:    .*\n)+)", proc.stdout, re.MULTILINE)
    assert len(jobs) > 10
    # `all` only gathers the targets: it runs nothing
    without = [name for name, body in jobs if name != "all" and not re.search(r"resources: .*\bgpu=\d", body)]
    assert without == []
