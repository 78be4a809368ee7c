"""The diagnosis' thresholds and their defaults. Below every layer, so that validating a config (the Snakefile
parse) can check `diagnose.thresholds` keys without importing the diagnosis (pandas, numpy); the diagnosis
itself is phases/diagnose.py.
"""
from __future__ import annotations

DEFAULT_THRESHOLDS: dict = {
    # fewer history rows than this: the curve rules cannot tell trend from noise
    "min_rows": 4,
    # rising training loss: final loss above min + rising_frac * (max - min) of the training loss ...
    "rising_frac": 0.25,
    # ... and the least-squares slope over this trailing share of steps is positive
    "tail_frac": 0.25,
    # oscillating training loss: std of first differences over the second half of training, relative to the
    # loss range (max - min) ...
    "loss_jitter_rel": 0.1,
    # ... and relative to the loss level there (median |loss|), so a flat curve with float jitter is not flagged
    "loss_jitter_level": 0.05,
    # noisy validation: std of first differences of the primary metric over the second half, relative to the
    # primary metric's range (a per-epoch noise of ~10% of the achieved improvement)
    "val_jitter_rel": 0.15,
    # ... and when the training counterpart evaluated at the same epochs jumps too (std of its first differences
    # over the second half above this share of its range), the weights themselves move too far per epoch: the
    # learning rate is too high rather than the validation set too small. Measured on real runs of the
    # built-in regression trainer (bench `trust`): trainer-default LR 0.1-0.5% of the range, 10x that LR 1.5-9.5%.
    "train_jitter_rel": 0.01,
    # update-to-weight ratio |delta theta| / |theta| per optimizer step (the loop's `update_ratio`, median over
    # sampled steps of each epoch): CS231n's rule of thumb puts a healthy step near 1e-3; a median over the
    # epochs above this means each step rewrites too much of the weights, the learning rate is too high
    "update_ratio_high": 1e-2,
    # gradient clipping: mean share of clipped steps above this means the LR is too high (methods.md: >50%)
    "clip_frac": 0.5,
    # generalisation gap at the end counts as large above max(gap_abs, gap_rel * max(|train end|, |val end|))
    "gap_rel": 0.1,
    "gap_abs": 0.0,
    # validation worsening after its best step: primary (or val loss) at the end worse than its best by more
    # than worsen_rel of its range
    "worsen_rel": 0.1,
    # rows averaged for "the value at the end", so one noisy epoch does not decide a rule
    "end_rows": 3,
    # flat: the running best improved over the trailing tail_frac by less than flat_frac of its total improvement
    "flat_frac": 0.1,
    # underfitting: the training primary metric must reach this to count as good (None: see bounded_good_enough)
    "good_enough": None,
    # without good_enough: bounded metrics (r2, accuracy, similarity; direction max) are poor below this
    "bounded_good_enough": 0.9,
    # underfitting also tolerates a gap up to this share of the training metric's shortfall from good_enough:
    # train 0.42 / val 0.36 against 0.9 is a bias problem even though the gap exceeds the overfitting threshold
    "underfit_gap_share": 0.5,
    # still improving: best step in the trailing tail_frac and the running best gained more than this share
    # of its total improvement there
    "still_improving_frac": 0.1,
    # saturated early: best step within this leading share of steps ...
    "early_frac": 0.1,
    # ... judged only for runs at least this long (in 5 epochs, step 1 is not "early" in any useful sense)
    "early_min_rows": 10,
    # input-pipeline bound: mean share of epoch time spent waiting for batches above this
    "data_frac": 0.3,
    # validation plateau: the primary's running best gained less than flat_frac of its total over the trailing
    # plateau_frac of steps (its best step before them) ...
    "plateau_frac": 0.5,
    # ... while the training loss still fell over those steps by more than this share of its range: training
    # continues and validation does not follow, the case for a schedule that lowers the LR (seed 004, pattern 3)
    "plateau_train_drop": 0.1,
    # gradient norm (history column `grad_norm`): at the end (mean of the last end_rows) above this multiple of
    # its median over the first tail_frac of steps, the gradients explode ...
    "grad_explode_ratio": 10.0,
    # ... below this fraction of it, they vanish (with the primary flat over the tail: not a converged run's
    # small gradients, which come with a metric that stopped improving because it is done, see the rule)
    "grad_vanish_ratio": 1e-3,
}


def unknown_thresholds(given: dict, trainer_own: dict | None = None) -> list[str]:
    """The keys of `given` that are neither generic thresholds nor the trainer's own (`diagnosis_thresholds`)."""
    return sorted(set(given or {}) - set(DEFAULT_THRESHOLDS) - set(trainer_own or {}))
