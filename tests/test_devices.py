"""GPU slots on one host: which GPUs a job may take, locks that never give one GPU to two jobs at once and
die with their process, the CLI claiming before torch loads, and Snakemake jobs on distinct GPUs.

The machine running the tests has no GPU: TUNEWISE_GPU_COUNT fakes the host's count."""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tunewise import devices
from tunewise.devices import GpuSlotError, claim_gpus, gpu_pool, gpus_to_request, host_gpu_count

REPO = Path(__file__).resolve().parents[1]
ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "TUNEWISE_GPU_COUNT", "TUNEWISE_GPU_LOCK_DIR", "TUNEWISE_GPU_WAIT_S",
            "TUNEWISE_GPU_CLAIMED", "SLURM_JOB_ID")

# claims n GPUs, holds them for a while, prints what it got and when
HOLDER = textwrap.dedent("""
    import json, os, sys, time
    from tunewise.devices import claim_gpus
    got = claim_gpus(int(sys.argv[1]))
    start = time.time()
    print(json.dumps({"got": got, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start}), flush=True)
    time.sleep(float(sys.argv[2]))
    print(json.dumps({"end": time.time()}), flush=True)
""")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No GPU settings of the caller's shell, a lock folder of the test's own, and the slots this process
    claimed given back."""
    for key in ENV_KEYS:
        monkeypatch.setenv(key, "")  # recorded, so what claim_gpus sets in os.environ is undone too
        monkeypatch.delenv(key)
    monkeypatch.setenv("TUNEWISE_GPU_LOCK_DIR", str(tmp_path / "locks"))
    yield
    devices.release_gpus()


def _env(**extra) -> dict:
    """A fresh job's environment: not a child of a command that holds this process' slots."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "TUNEWISE_GPU_CLAIMED")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _holder(n: int, hold_s: float, stderr=subprocess.PIPE, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(n), str(hold_s)], env=_env(**env),
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def _claimed(proc: subprocess.Popen) -> dict:
    """The holder's first line: what it got, once it got it."""
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else "holder printed nothing"
    return json.loads(line)


# --- which GPUs ------------------------------------------------------------------------------


@pytest.mark.parametrize("visible, pool", [
    ("2,3", ["2", "3"]),
    (" 1, 0 ", ["1", "0"]),
    ("GPU-8e6a1d2c,GPU-77aa", ["GPU-8e6a1d2c", "GPU-77aa"]),
    ("", []),
    ("-1", []),
    ("1,-1,2", ["1"]),  # CUDA ignores everything after an invalid entry
    ("NoDevFiles", []),
])
def test_the_pool_is_the_users_cuda_visible_devices(monkeypatch, visible, pool):
    monkeypatch.setenv("TUNEWISE_GPU_COUNT", "8")  # the user's restriction wins over the host's count
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_pool() == pool


def test_the_pool_is_every_gpu_of_the_host_otherwise(monkeypatch):
    monkeypatch.setenv("TUNEWISE_GPU_COUNT", "3")
    assert gpu_pool() == ["0", "1", "2"]
    monkeypatch.setenv("TUNEWISE_GPU_COUNT", "two")
    with pytest.raises(GpuSlotError, match="TUNEWISE_GPU_COUNT='two': expected a whole number"):
        gpu_pool()


def test_the_host_count_comes_from_nvidia_smi(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n"
                    "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaa)'\n"
                    "echo '  MIG 3g.40gb     Device  0: (UUID: MIG-bbb)'\n"
                    "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-ccc)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert host_gpu_count() == 2


@pytest.mark.parametrize("device, request_, host_has_gpu, expected", [
    ("cpu", "auto", True, 0), ("cpu", "always", True, 0),
    ("cuda", "auto", False, 2), ("auto", "auto", True, 2), ("auto", "auto", False, 0),
    ("auto", "always", False, 2),  # a cluster's login node: the compute nodes have the GPUs
    ("cuda", "never", True, 0), ("auto", "never", True, 0),
])
def test_how_many_gpus_a_training_job_requests(device, request_, host_has_gpu, expected):
    assert gpus_to_request(device, 2, request_, host_has_gpu=host_has_gpu) == expected


# --- claiming ---------------------------------------------------------------------------------


def test_concurrent_jobs_never_share_a_gpu(tmp_path):
    # six jobs, two GPUs: at most two run at once, each on a GPU no other running job has
    procs = [_holder(1, 1.5, TUNEWISE_GPU_COUNT=2) for _ in range(6)]
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        first, last = (json.loads(line) for line in out.splitlines())
        records.append({**first, **last, "stderr": err})
    assert sorted(r["cvd"] for r in records) == ["0", "0", "0", "1", "1", "1"]
    assert all(r["got"] == [r["cvd"]] for r in records)
    overlap = lambda a, b: a["start"] < b["end"] and b["start"] < a["end"]
    pairs = list(itertools.combinations(records, 2))
    assert not [(a, b) for a, b in pairs if a["cvd"] == b["cvd"] and overlap(a, b)]
    assert [(a, b) for a, b in pairs if overlap(a, b)], "the two GPUs were never used at the same time"
    waited = [r for r in records if "all GPU slots busy" in r["stderr"]]
    assert waited, "no job had to wait: the test did not contend"
    assert "waiting for 1 of GPU(s) 0,1" in waited[0]["stderr"]


def test_a_killed_job_frees_its_gpu(tmp_path):
    holder = _holder(1, 600, TUNEWISE_GPU_COUNT=1)
    assert _claimed(holder)["cvd"] == "0"
    waiter = _holder(1, 0, TUNEWISE_GPU_COUNT=1)
    time.sleep(1.5)
    assert waiter.poll() is None  # still waiting: the GPU is taken
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock with the process
    holder.wait(timeout=10)
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert json.loads(out.splitlines()[0])["cvd"] == "0"
    assert "got GPU(s) 0 after" in err


def test_waiting_ends_with_an_error_naming_the_holder(monkeypatch, tmp_path):
    holder = _holder(1, 600, TUNEWISE_GPU_COUNT=1)
    try:
        _claimed(holder)
        monkeypatch.setenv("TUNEWISE_GPU_COUNT", "1")
        with pytest.raises(GpuSlotError) as e:
            claim_gpus(1, wait_s=1.0, poll_s=0.2)
    finally:
        holder.kill()
        holder.wait()
    message = str(e.value)
    assert f"GPU 0: pid {holder.pid} on " in message
    assert str(tmp_path / "locks") in message and "after 1 s" in message
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # nothing claimed, nothing changed


def test_two_gpus_are_claimed_together_or_not_at_all(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEWISE_GPU_COUNT", "3")
    got = claim_gpus(2)
    assert len(set(got)) == 2 and set(got) <= {"0", "1", "2"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(got)
    # one GPU left: a job asking for two waits and gives up, without sitting on the free one meanwhile
    pair = subprocess.run([sys.executable, "-c", HOLDER, "2", "0"], env=_env(TUNEWISE_GPU_WAIT_S=1),
                          capture_output=True, text=True, timeout=60)
    assert pair.returncode != 0 and "no 2 free GPU slot(s) among GPU(s) 0,1,2" in pair.stderr
    single = _holder(1, 0)
    out, err = single.communicate(timeout=60)
    assert single.returncode == 0, err
    assert json.loads(out.splitlines()[0])["got"] == sorted({"0", "1", "2"} - set(got))


def test_the_users_restriction_is_respected(monkeypatch):
    monkeypatch.setenv("TUNEWISE_GPU_COUNT", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    mine = claim_gpus(1)
    other = _holder(1, 0, CUDA_VISIBLE_DEVICES="2,3")  # the user's setting, not what this process now has
    out, err = other.communicate(timeout=60)
    assert other.returncode == 0, err
    theirs = json.loads(out.splitlines()[0])["got"]
    assert sorted(mine + theirs) == ["2", "3"]


def test_nothing_to_claim_under_slurm_or_for_zero_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEWISE_GPU_COUNT", "2")
    assert claim_gpus(0) == []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # what SLURM gave the job
    assert claim_gpus(1) == []
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert not (tmp_path / "locks").exists()


def test_a_host_without_gpus_runs_the_job_without_one(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TUNEWISE_GPU_COUNT", "0")
    assert claim_gpus(1) == []
    assert "asked for 1 GPU(s) but this host has none" in capsys.readouterr().err
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_more_gpus_than_the_host_has_is_an_error(monkeypatch):
    monkeypatch.setenv("TUNEWISE_GPU_COUNT", "2")
    with pytest.raises(GpuSlotError, match=r"asks for 3 GPUs but only 2 are available \(TUNEWISE_GPU_COUNT: 0,1\)"):
        claim_gpus(3)


# --- the CLI and the rules --------------------------------------------------------------------

GPU_VERBS = {
    "train": ["--run-dir", "r"],
    "sweep-trial": ["--slot", "0", "--out", "t.json"],
    "iterate": ["--round", "1"],
    "finalize": ["--decision", "d.json", "--baseline-config", "b.yaml", "--optimized-config", "o.yaml",
                 "--out-dir", "f", "--reports-dir", "rep"],
    "design": ["--final", "final.json", "--out-dir", "d", "--reports-dir", "rep"],
}

# runs `tunewise <verb> ... --gpus 1` with a spy on the claim; the experiment file does not exist, so the verb
# stops with an error right after
SPY = textwrap.dedent("""
    import json, os, sys
    import tunewise.cli as cli
    from tunewise import devices
    seen = {"torch_after_import": "torch" in sys.modules}
    real = devices.claim_gpus
    def spy(n, **kw):
        seen.update(n=n, torch_at_claim="torch" in sys.modules)
        got = real(n, **kw)
        seen["cvd"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return got
    devices.claim_gpus = spy
    seen["rc"] = cli.main(sys.argv[1:])
    print(json.dumps(seen))
""")


@pytest.mark.parametrize("verb", sorted(GPU_VERBS))
def test_the_cli_claims_the_gpu_before_torch_loads(verb, tmp_path):
    argv = [verb, "--experiment-file", str(tmp_path / "missing.yaml"), *GPU_VERBS[verb], "--gpus", "1"]
    proc = subprocess.run([sys.executable, "-c", SPY, *argv], env=_env(TUNEWISE_GPU_COUNT=1), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen == {"torch_after_import": False, "n": 1, "torch_at_claim": False, "cvd": "0", "rc": 2}, proc.stderr
    assert "missing.yaml" in proc.stderr  # it went on to the verb, which then stopped


def _rule_blocks() -> dict[str, str]:
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    parts = re.split(r"^(?:rule|checkpoint) (\w+):", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_gpu_rule_tells_the_cli_its_gpus():
    from tunewise.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    gpu_rules = {name: block for name, block in _rule_blocks().items() if "**TRAINING_RESOURCES" in block}  # the GPU block, common.smk
    assert {"train_baseline", "optimize_targeted", "sweep_trial", "iterate", "seed_run", "finalize", "design"} <= set(gpu_rules)
    for name, block in gpu_rules.items():
        assert "--gpus {resources.gpu}" in block, name
        verb = re.search(r'"tunewise ([\w-]+)', block).group(1)
        assert "--gpus" in verbs[verb]._option_string_actions, (name, verb)


def test_a_command_run_in_a_slot_holds_it_and_can_claim_again(tmp_path):
    # the command replaces `tunewise gpu-slot` and keeps its lock; a tunewise verb inside it reuses the slot
    inner = textwrap.dedent(f"""
        import fcntl, os
        from tunewise.devices import claim_gpus
        fd = os.open({str(tmp_path / "locks" / "gpu0.lock")!r}, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("free")
        except BlockingIOError:
            print("held")
        print(claim_gpus(1), os.environ["CUDA_VISIBLE_DEVICES"])
    """)
    tunewise = Path(sys.executable).parent / "tunewise"
    proc = subprocess.run([str(tunewise), "gpu-slot", "--gpus", "1", "--", sys.executable, "-c", inner],
                          env=_env(TUNEWISE_GPU_COUNT=1, TUNEWISE_GPU_WAIT_S=5), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["held", "['0'] 0"]


SNAKEFILE = """
import sys

PY = sys.executable
RECORD = {record!r}

rule all:
    input:
        expand("out/{{i}}.json", i=range(4)),

rule job:
    output:
        "out/{{i}}.json",
    resources:
        gpu=1,
    shell:
        "tunewise gpu-slot --gpus {{resources.gpu}} -- {{PY}} {{RECORD}} {{output}}"
"""

RECORD = """
import fcntl, json, os, sys, time
cvd = os.environ["CUDA_VISIBLE_DEVICES"]
start = time.time()
time.sleep(1.5)
fd = os.open(f".snakemake/tunewise-gpu-locks/gpu{cvd}.lock", os.O_RDWR)  # the default folder, in the workdir
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held = False
except BlockingIOError:
    held = True
json.dump({"cvd": cvd, "start": start, "end": time.time(), "held": held}, open(sys.argv[1], "w"))
"""


def test_snakemake_jobs_get_distinct_gpus(tmp_path):
    (tmp_path / "record.py").write_text(RECORD)
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(record=str(tmp_path / "record.py")))
    env = _env(TUNEWISE_GPU_COUNT=2, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("TUNEWISE_GPU_LOCK_DIR")  # the default folder, shared by the workflow's jobs
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(tmp_path / "Snakefile"), "-d", str(tmp_path),
                           "--cores", "4", "--resources", "gpu=2"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads((tmp_path / "out" / f"{i}.json").read_text()) for i in range(4)]
    assert {j["cvd"] for j in jobs} == {"0", "1"} and all(j["held"] for j in jobs)
    overlapping = [(a, b) for a, b in itertools.combinations(jobs, 2) if a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping, "no two jobs ran at the same time"
    assert all(a["cvd"] != b["cvd"] for a, b in overlapping)


def test_request_gpus_always_from_the_command_line(tmp_path):
    # a profile's `config: ["request_gpus=always"]` on a host without a GPU: the embedded config still loads,
    # and the training jobs ask for, and pass on, the experiment's GPU
    env = _env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "-n", "-p", "--config", "request_gpus=always"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [line for line in (proc.stdout + proc.stderr).splitlines() if "Shell command: tunewise train " in line]
    assert train and all(" --gpus 1 " in line for line in train), train
    assert any("results/latent_mp/" in line for line in train)  # the embedded default config/config.yaml
