"""Device choice, GPU slot locking, CPU threads and the mixed-precision policy."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

GPU_COUNT_ENV = "TUNEWISE_GPU_COUNT"  # the host's GPU count, instead of asking nvidia-smi (tests fake one)
LOCK_DIR_ENV = "TUNEWISE_GPU_LOCK_DIR"
WAIT_ENV = "TUNEWISE_GPU_WAIT_S"
CLAIMED_ENV = "TUNEWISE_GPU_CLAIMED"  # what this process claimed, for the commands it starts
DEFAULT_LOCK_DIR = Path(".snakemake") / "tunewise-gpu-locks"  # Snakemake runs every job in the working directory
DEFAULT_WAIT_S = 24 * 3600.0
REQUEST_GPUS = ("auto", "always", "never")

# The open lock files of the slots this process holds. flock locks die with the process (however it dies),
# so a killed job never leaves a slot locked.
_held: list[int] = []


class GpuSlotError(RuntimeError):
    """No GPU slot can be had: the message says what was asked, what exists and who holds it."""


def cuda_expected() -> bool:
    """Whether this host has an NVIDIA GPU, without importing torch (used at DAG-build time)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def gpus_to_request(device: str, gpus: int, request: str = "auto", host_has_gpu: bool | None = None) -> int:
    """The `gpu` resource of a training job: the experiment's `resources.gpus`, or 0.

    A CPU experiment asks for none, so `--resources gpu=1` never blocks it. `request_gpus: always` asks
    whatever the submitting host has: a cluster's login node has no GPU but its compute nodes do."""
    if request not in REQUEST_GPUS:
        raise ValueError(f"request_gpus: {request!r} is not one of {', '.join(REQUEST_GPUS)}")
    if device == "cpu" or request == "never":
        return 0
    if request == "always" or device == "cuda":
        return int(gpus)
    return int(gpus) if (cuda_expected() if host_has_gpu is None else host_has_gpu) else 0


def host_gpu_count() -> int:
    """GPUs on this host: TUNEWISE_GPU_COUNT, else nvidia-smi -L, else the driver's /proc entries, else 0."""
    forced = os.environ.get(GPU_COUNT_ENV)
    if forced is not None:
        try:
            return int(forced)
        except ValueError:
            raise GpuSlotError(f"{GPU_COUNT_ENV}={forced!r}: expected a whole number of GPUs") from None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
            # MIG instances are listed indented under their GPU; CUDA_VISIBLE_DEVICES indices count GPUs
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def gpu_pool() -> list[str]:
    """The GPUs jobs may share out: the user's CUDA_VISIBLE_DEVICES when set ("2,3" -> only 2 and 3),
    else every GPU of the host. Entries stay strings: CUDA also takes UUIDs such as GPU-8e6a..."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(host_gpu_count())]
    pool = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry in ("-1", "NoDevFiles"):  # CUDA stops at an invalid entry; SLURM writes NoDevFiles for none
            break
        if entry:
            pool.append(entry)
    return pool


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)


def _lock_path(folder: Path, index: str) -> Path:
    return folder / f"gpu{re.sub(r'[^A-Za-z0-9_.-]', '_', index)}.lock"


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "?"
    except OSError:
        return "?"


def _try_slots(pool: list[str], n: int, folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """Lock n free slots of the pool without blocking: ([(index, fd)], []) on success, else ([], who holds
    the busy ones). All or nothing: a job holding 1 of its 2 GPUs while it waits could deadlock another."""
    got, busy = [], []
    for index in pool:
        path = _lock_path(folder, index)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            busy.append(f"GPU {index}: {_holder(path)}")
            continue
        # who holds it, for the "waiting" message of the others; stale text of a dead holder is never read,
        # since its lock went with it
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        got.append((index, fd))
        if len(got) == n:
            return got, []
    for _, fd in got:
        os.close(fd)
    return [], busy


def _say(message: str) -> None:
    print(f"tunewise: {message}", file=sys.stderr, flush=True)


def claim_gpus(n: int, wait_s: float | None = None, poll_s: float = 0.5) -> list[str]:
    """Lock n free GPU slots of this host for the life of the process and point CUDA_VISIBLE_DEVICES at
    them; call it before torch loads (CUDA reads the variable once). Returns the claimed indices.

    Snakemake counts `--resources gpu=N` but never says which GPU a job got (snakemake#281): without this,
    every job would train on GPU 0. When every slot is busy the job waits (up to TUNEWISE_GPU_WAIT_S) rather
    than share a GPU. Nothing to do for n == 0, or under SLURM, which assigns and isolates a job's GPUs."""
    if n <= 0 or os.environ.get("SLURM_JOB_ID"):
        return []
    inherited = os.environ.get(CLAIMED_ENV)
    if inherited and inherited == os.environ.get("CUDA_VISIBLE_DEVICES"):
        # started by a command that holds the slots (`tunewise gpu-slot -- tunewise train ...`): locking
        # them again would wait on our own parent forever
        return inherited.split(",")
    pool = gpu_pool()
    if not pool:
        _say(f"the job asked for {n} GPU(s) but this host has none: it runs without one")
        return []
    if n > len(pool):
        raise GpuSlotError(f"the job asks for {n} GPUs but only {len(pool)} are available ({_pool_source()}: "
                           f"{','.join(pool)}); lower the experiment's resources.gpus")
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    wait_s = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S)) if wait_s is None else wait_s
    started = time.monotonic()
    got, busy = _try_slots(pool, n, folder)
    if not got:
        _say(f"all GPU slots busy ({'; '.join(busy)}); waiting for {n} of GPU(s) {','.join(pool)} "
             f"(up to {wait_s:.0f} s, locks in {folder})")
    while not got:
        if time.monotonic() - started >= wait_s:
            raise GpuSlotError(f"no {n} free GPU slot(s) among GPU(s) {','.join(pool)} after {wait_s:.0f} s "
                               f"({'; '.join(busy)}; locks in {folder}); are more GPU jobs running than the host "
                               f"has GPUs (--resources gpu=N larger than {len(pool)}, or another workflow)?")
        time.sleep(poll_s)
        got, busy = _try_slots(pool, n, folder)
    if time.monotonic() - started > poll_s:
        _say(f"got GPU(s) {','.join(i for i, _ in got)} after {time.monotonic() - started:.0f} s")
    _held.extend(fd for _, fd in got)
    claimed = ",".join(i for i, _ in got)
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[CLAIMED_ENV] = claimed
    return claimed.split(",")


def _pool_source() -> str:
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return "CUDA_VISIBLE_DEVICES"
    return GPU_COUNT_ENV if GPU_COUNT_ENV in os.environ else "this host"


def keep_slots_across_exec() -> None:
    """Let a command that replaces this process (os.exec*) keep holding its slots."""
    for fd in _held:
        os.set_inheritable(fd, True)


def release_gpus() -> None:
    """Give the slots back before the process ends (the end of the process does it anyway)."""
    while _held:
        os.close(_held.pop())
    if os.environ.get(CLAIMED_ENV):
        os.environ.pop(CLAIMED_ENV)


class DeviceError(ValueError):
    """The device a config asks for is not on this host: a setting to change, not a fault to retry."""


def resolve_device(setting: str = "auto"):
    """The torch device of `device:`; `cuda` where torch sees none is refused (only `auto` falls back)."""
    import torch

    if setting == "cuda":
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise DeviceError("device: cuda, but torch sees no CUDA device on this host"
                              + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
                              + f"{'' if torch.version.cuda else ' and this torch build has no CUDA'}; "
                              "use device: auto to fall back to the CPU")
        return torch.device("cuda")
    if setting == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def set_threads(threads: int | None) -> int:
    """Use the job's thread budget (Snakemake's {threads}), not every core of the host."""
    import torch

    n = int(threads or os.environ.get("TUNEWISE_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return n


def autocast(device, amp_setting) :
    """bf16 autocast on CUDA when amp is on/auto; a no-op context on the CPU.

    bf16 keeps fp32's exponent range, so no GradScaler is needed."""
    import contextlib

    import torch

    if device.type == "cuda" and amp_setting in (True, "auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
