"""Out of memory during training: recognising it, and the batch size the next attempt trains with.

A training job that runs out of memory inside the process (CUDA, MPS, a CPU allocation) fails with the batch
size that did not fit recorded in run.json; Snakemake retries the job (`resources.retries`, with mem_mb
scaled by the attempt) and the retry trains with half that batch size, from scratch.

The halving follows the OOMs recorded in the run directory, not Snakemake's `attempt`: the attempt counter
restarts at 1 on every invocation (a rerun after a kill would go back to the batch that did not fit and throw
away the smaller batch's epochs) and counts failures of every kind (a lost database connection must not change
what is trained). When every attempt runs out of memory the two agree: attempt k trains batch_size // 2**(k-1).
"""
from __future__ import annotations

# what torch's allocators say: CUDA ("CUDA out of memory"), MPS ("MPS backend out of memory"), the CPU
# allocator ("DefaultCPUAllocator: can't allocate memory"), cuBLAS/cuDNN workspaces ("..._ALLOC_FAILED")
_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "alloc_failed")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    import torch

    if isinstance(error, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is the same class
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _MARKERS)


def batch_size_for(configured: int, previous: dict) -> int:
    """The batch size this start of a run trains with, given the config's and the previous start's run.json.

    A new configured value starts from itself; after an OOM the next start takes half the batch that did not
    fit (at least 1); otherwise a batch already made smaller stays (the larger one is known not to fit)."""
    record = previous.get("batch_size") or {}
    if record.get("configured") != configured:
        return configured
    used = int(record.get("used", configured))
    return max(1, used // 2) if previous.get("out_of_memory") else used
