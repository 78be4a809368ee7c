"""Device choice, CPU threads and the mixed-precision policy."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def cuda_expected() -> bool:
    """Whether this host has an NVIDIA GPU, without importing torch (used at DAG-build time)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def resolve_device(setting: str = "auto"):
    import torch

    if setting == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was requested but torch sees no CUDA device")
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
