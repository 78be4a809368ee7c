"""The names `optim.name` and `schedule.name` take, torch-free: validating a config checks them without torch."""

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "linear", "step", "cosine", "plateau")
AMP = ("auto", "bf16", "off")  # train.amp (true and false too): bf16 autocast on CUDA, or not

# The shared training blocks (train/loop.py, train/optim.py) read these keys; any trainer whose config has them
# gets them checked at validation. (low, high, low inclusive, high inclusive); None: open on that side.
RANGES = {
    "optim.weight_decay": (0.0, None, True, False),
    "optim.momentum": (0.0, 1.0, True, False),
    "model.dropout": (0.0, 1.0, True, False),
    "schedule.warmup_epochs": (0, None, True, False),
    "schedule.lr_end_factor": (0.0, 1.0, False, True),
    "schedule.step_size": (1, None, True, False),
    "schedule.gamma": (0.0, 1.0, False, True),
    "schedule.patience": (0, None, True, False),
    "train.epochs": (1, None, True, False),
    "train.batch_size": (1, None, True, False),
    "train.grad_clip": (0.0, None, False, False),
    "train.patience": (1, None, True, False),
    "train.min_delta": (0.0, None, True, False),
}
CHOICES = {"optim.name": OPTIMIZERS, "schedule.name": SCHEDULES}
# a model's sizes (hidden, latent_dim, depth, head_hidden, width, ...) are counts: zero or less builds nothing
COUNT_BLOCKS = ("model.",)


def _get(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _in_range(value, low, high, low_in, high_in) -> bool:
    return ((low is None or (value >= low if low_in else value > low))
            and (high is None or (value <= high if high_in else value < high)))


def _range_text(low, high, low_in, high_in) -> str:
    if high is None:
        return f"must be {'>=' if low_in else '>'} {low:g}"
    return f"must be in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_training_options(config: dict) -> None:
    """ValueError naming the key for a shared training setting out of its range or not one of its names (a
    negative weight decay, dropout 1.5, `adamm`, `train.amp: yes please`); keys a config lacks are skipped."""
    import difflib

    for key, names in CHOICES.items():
        try:
            value = _get(config, key)
        except KeyError:
            continue
        if value not in names:
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(names)}{hint}")
    try:
        amp = _get(config, "train.amp")
        if not isinstance(amp, bool) and amp not in AMP:
            raise ValueError(f"train.amp: {amp!r} is not one of {', '.join(AMP)}, true or false")
    except KeyError:
        pass
    for key, bounds in RANGES.items():
        try:
            value = _get(config, key)
        except KeyError:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not _in_range(value, *bounds):
            raise ValueError(f"{key}: {_range_text(*bounds)}, got {value}")
    groups = (config.get("optim") or {}).get("param_groups") or {}
    for name, group in groups.items() if isinstance(groups, dict) else ():
        if not isinstance(group, dict):
            raise ValueError(f"optim.param_groups.{name}: expected a mapping of optimizer settings (lr, weight_decay, "
                             f"momentum), got {group!r}")
        unknown = set(group) - {"lr", "weight_decay", "momentum"}
        if unknown:
            raise ValueError(f"optim.param_groups.{name}: unknown setting(s) {sorted(unknown)} (lr, weight_decay, momentum)")
        for sub in ("weight_decay", "momentum"):
            if sub in group and not _in_range(group[sub], *RANGES[f"optim.{sub}"]):
                raise ValueError(f"optim.param_groups.{name}.{sub}: {_range_text(*RANGES[f'optim.{sub}'])}, got {group[sub]}")
    _check_counts(config.get("model"), "model")


def _check_counts(block, where: str) -> None:
    if not isinstance(block, dict):
        return
    for key, value in block.items():
        if isinstance(value, dict):
            _check_counts(value, f"{where}.{key}")
        elif isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"{where}.{key}: a model size must be >= 1, got {value}")
