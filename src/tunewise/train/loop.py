"""The fit loop every trainer shares.

It owns what is the same for every model: optimizer and schedule, mixed precision, gradient
norms and clipping, NaN detection, evaluation each epoch, early stopping, best/last
checkpoints and resuming from last.pt, the history rows and the progress bar. A trainer
gives it batches, a loss for a batch and an evaluation function.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from tunewise.devices import autocast
from tunewise.trainers.base import NonFiniteLoss
from tunewise.train.optim import Schedule, build_optimizer


@dataclass
class FitResult:
    metrics: dict
    status: str = "done"
    reason: str | None = None
    history: list[dict] = field(default_factory=list)


def _better(value: float, best: float | None, higher: bool, min_delta: float) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if higher else value < best - min_delta


def _progress(total: int, initial: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, unit="epoch", leave=False)


UPDATE_RATIO_SAMPLES = 8  # optimizer steps per epoch whose update-to-weight ratio is measured
# what a resume reads from last.pt: a file without them (a best.pt copied over it, a hand-made file) is named
# with what it lacks instead of failing on a KeyError halfway through restoring the state
RESUME_KEYS = ("model", "optimizer", "schedule", "epoch", "best_value", "best_step", "bad_epochs", "wall_seconds",
               "history", "torch_rng", "py_rng")


def _update_ratio(params: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
    """|theta_after - theta_before| / |theta_before| over all parameters (a 0-d tensor, no host sync)."""
    after = [p.detach() for p in params]
    delta = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(torch._foreach_sub(after, before))))
    weight = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(before)))
    return delta.float() / weight.float().clamp_min(1e-12)


def fit(
    *,
    model: torch.nn.Module,
    config: dict,
    run,  # tunewise.runs.RunDir
    reporter,  # has .epoch(step, row) and .replay(rows)
    device: torch.device,
    seed: int,
    train_batches: Callable[[int], Iterable],
    steps_per_epoch: int,
    train_step: Callable[[Any], tuple[torch.Tensor, int]],
    evaluate: Callable[[], dict[str, float]],
    primary: str,
    direction: str,
    progress: bool | None = None,
    extra_state: Callable[[], dict] | None = None,
) -> FitResult:
    tcfg = config["train"]
    epochs = int(tcfg["epochs"])
    grad_clip = tcfg.get("grad_clip")
    patience = tcfg.get("patience")
    min_delta = float(tcfg.get("min_delta") or 0.0)
    higher = direction == "max"

    optimizer = build_optimizer(model, config["optim"])
    schedule = Schedule(optimizer, config.get("schedule", {}), epochs, steps_per_epoch)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip_at = float(grad_clip) if grad_clip else float("inf")
    # update-to-weight ratio |delta theta| / |theta| of one optimizer step, measured on a few steps per epoch
    # (a parameter copy each): CS231n's rule of thumb puts a healthy step near 1e-3, so it tells the diagnosis
    # about the step size directly, whatever the loss curve looks like
    ratio_every = max(1, steps_per_epoch // UPDATE_RATIO_SAMPLES)

    history: list[dict] = []
    start_epoch, best_value, best_step, bad_epochs, wall = 0, None, 0, 0, 0.0
    last = run.load_checkpoint("last.pt", required=RESUME_KEYS)
    if last is not None:
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        schedule.load_state_dict(last["schedule"])
        torch.set_rng_state(last["torch_rng"])
        random.setstate(last["py_rng"])
        start_epoch, best_value, best_step = last["epoch"], last["best_value"], last["best_step"]
        bad_epochs, wall, history = last["bad_epochs"], last["wall_seconds"], list(last["history"])
        run.write_history(history)
        reporter.replay(history)  # rows whose tracking was cut off by the interruption

    # a run that had already stopped early when it was killed (before it was recorded as finished) stays
    # stopped: another epoch would make it differ from the run that was not killed
    stopped_early = last is not None and patience is not None and bad_epochs >= int(patience)
    samples_total = 0
    bar = _progress(epochs, start_epoch, run.path.name, progress)
    for epoch in range(start_epoch, start_epoch if stopped_early else epochs):
        model.train()
        t0 = time.perf_counter()
        data_wait = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64)
        norms: list[torch.Tensor] = []
        ratios: list[torch.Tensor] = []
        n_seen = 0
        step_in_epoch = 0
        batches = iter(train_batches(epoch))
        while True:
            td = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - td
            if batch is None:
                break
            with autocast(device, tcfg.get("amp", "auto")):
                loss, n = train_step(batch)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                global_step = epoch * steps_per_epoch + step_in_epoch + 1
                row = {"step": epoch + 1, "train/loss": loss_value, "lr": schedule.lr()}
                history.append(row)
                run.write_history(history)
                reporter.epoch(epoch + 1, row)
                bar.close()
                raise NonFiniteLoss(global_step, loss_value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # clip_grad_norm_ with an infinite bound still returns the norm the diagnosis needs
            norms.append(torch.nn.utils.clip_grad_norm_(params, clip_at))
            if step_in_epoch % ratio_every == 0:
                before = [p.detach().clone() for p in params]
                optimizer.step()
                ratios.append(_update_ratio(params, before))
            else:
                optimizer.step()
            schedule.step_batch()
            loss_sum += loss_value * n
            n_seen += n
            step_in_epoch += 1
        train_seconds = time.perf_counter() - t0

        model.eval()
        with torch.no_grad(), autocast(device, tcfg.get("amp", "auto")):
            metrics = evaluate()
        seconds = time.perf_counter() - t0
        wall += seconds
        samples_total += n_seen
        gn = torch.stack(norms).float() if norms else torch.zeros(1)
        row = {
            "step": epoch + 1,
            "train/loss": float(loss_sum) / max(1, n_seen),
            **metrics,
            "lr": schedule.lr(),
            "grad_norm": float(gn.mean()),
            "grad_norm_p90": float(torch.quantile(gn, 0.9)),
            "grad_clip_frac": float((gn > clip_at).float().mean()) if grad_clip else 0.0,
            "update_ratio": float(torch.stack(ratios).float().median()) if ratios else float("nan"),
            "seconds": seconds,
            "samples_per_s": n_seen / max(train_seconds, 1e-9),
            "data_frac": data_wait / max(seconds, 1e-9),
        }
        value = row.get(primary, float("nan"))
        if primary not in row:
            raise KeyError(f"primary metric {primary!r} is not among the trainer's metrics: {sorted(metrics)}")
        if not math.isfinite(value):
            history.append(row)
            run.write_history(history)
            reporter.epoch(epoch + 1, row)
            bar.close()
            raise NonFiniteLoss(epoch * steps_per_epoch + step_in_epoch, value)
        if _better(value, best_value, higher, min_delta):
            best_value, best_step, bad_epochs = value, epoch + 1, 0
            run.save_checkpoint("best.pt", {"model": model.state_dict(), "step": epoch + 1, "value": value})
        else:
            bad_epochs += 1
        schedule.step_epoch(value, higher)
        history.append(row)
        # last.pt carries the history so a resume restores exactly what was reported
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "epoch": epoch + 1,
            "best_value": best_value,
            "best_step": best_step,
            "bad_epochs": bad_epochs,
            "wall_seconds": wall,
            "history": history,
            "torch_rng": torch.get_rng_state(),
            "py_rng": random.getstate(),
            **(extra_state() if extra_state else {}),
        }
        run.save_checkpoint("last.pt", state)
        run.write_history(history)
        reporter.epoch(epoch + 1, row)
        bar.update(1)
        bar.set_postfix({primary: f"{value:.4f}"})
        if patience is not None and bad_epochs >= int(patience):
            stopped_early = True
            break
    bar.close()

    last_row = history[-1] if history else {}
    best_row = next((r for r in history if r["step"] == best_step), {})
    throughput = [r["samples_per_s"] for r in history if "samples_per_s" in r]
    metrics = {
        "primary": {
            "name": primary,
            "direction": direction,
            "best": best_value,
            "final": last_row.get(primary),
        },
        "best_step": best_step,
        "epochs_run": len(history),
        "epochs_planned": epochs,
        "stopped_early": stopped_early,
        "final": last_row,
        "best": best_row,
        "wall_seconds": wall,
        "samples_per_s": sum(throughput) / len(throughput) if throughput else None,
        "device": str(device),
    }
    return FitResult(metrics=metrics, history=history)
