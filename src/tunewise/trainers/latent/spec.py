"""The latent trainer's declarative side: its name, metric, knobs, default config, checks and search space.

Torch-free (numpy and pandas at most), so that validating a config at the Snakefile parse and the light jobs
that read a trainer's knobs never import torch; trainer.py adds the training on top.
"""
from __future__ import annotations

import copy
from pathlib import Path

from tunewise.trainers.base import Capabilities, check_data_source
from tunewise.trainers.latent import data as latent_data
from tunewise.trainers.latent import diagnosis
from tunewise.trainers.latent.design_settings import DEFAULT_DESIGN, check_design_config

DEFAULT_CONFIG = {
    "data": latent_data.DEFAULT_DATA,
    "model": {"hidden": 256, "latent_dim": 64, "depth": 2, "dropout": 0.0, "head_hidden": 64, "tanh_latent": False},
    "loss": {"recon_weight": 0.5, "task_weights": None},
    "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "param_groups": {}},
    "schedule": {"name": "none", "warmup_epochs": 0, "lr_end_factor": 0.01, "step_size": 10, "gamma": 0.1, "patience": 3},
    "train": {
        "epochs": 30,
        "batch_size": 256,
        "grad_clip": None,
        "patience": None,
        "min_delta": 0.0,
        "amp": "auto",
        "eval_train_samples": 4096,  # train metrics on a fixed subset: the gap needs them, not all rows
    },
    "design": DEFAULT_DESIGN,
}
# the target columns of the embedded transport table (matminer's mp_transport), checked without reading it
EMBEDDED_TARGETS = ("S_p", "S_n", "sigma_p", "sigma_n", "kappa_p", "kappa_n", "PF_p", "PF_n", "m_p", "m_n")
DESIGN_METRICS = ("design/validated_score", "design/best_score", "design/off_manifold_rate", "design/ok_rate")


class LatentSpec(Capabilities):
    name = "latent"
    primary_metric = "val/r2_mean"
    direction = "max"
    knobs = {
        "lr": "optim.lr",
        "weight_decay": "optim.weight_decay",
        "dropout": "model.dropout",
        "epochs": "train.epochs",
        "batch_size": "train.batch_size",
        "capacity": ["model.hidden", "model.latent_dim"],
        "scheduler": "schedule.name",
        "warmup": "schedule.warmup_epochs",
        "grad_clip": "train.grad_clip",
        "patience": "train.patience",
        "augmentation": "data.noise",
        "recon_weight": "loss.recon_weight",
        # a mapping target -> weight (None: all 1); set whole by the task_imbalance pattern (latent/diagnosis.py)
        "task_weights": "loss.task_weights",
        # the design's own knobs: tuned when the metric is a design metric (design/validated_score)
        "restarts": "design.restarts",
        "design_lr": "design.lr",
        "design_steps": "design.steps",
        "design_l2": "design.l2",
        "alpha": "design.alpha",
    }
    open_config_keys = {"optim.param_groups", "data.split", "loss.task_weights", "design.bounds"}
    diagnosis_thresholds = dict(diagnosis.THRESHOLDS)

    def extra_findings(self, history, metrics: dict, thresholds: dict) -> list[dict]:
        return diagnosis.task_findings(history, metrics, thresholds)

    def recommendation_patterns(self) -> dict:
        return {"task_imbalance": diagnosis.task_weights}

    def default_config(self) -> dict:
        return copy.deepcopy(DEFAULT_CONFIG)

    def metric_names(self, config: dict) -> list[str]:
        """What a run writes (checked against metric.name at validation): per split the losses, R^2 and MAE
        per target and their means; the design's metrics when it is tuned."""
        per_split = ["loss", "recon_mse", "r2_mean", "mae_mean",
                     *(f"{m}/{t}" for t in config["data"]["targets"] for m in ("r2", "mae"))]
        return [f"{split}/{name}" for split in ("val", "train") for name in per_split] + list(DESIGN_METRICS)

    def check_config(self, config: dict) -> None:
        data = config["data"]
        check_data_source(data)
        if data["source"] == "path":
            # a directory or a symlink loop is named as such now, before any job
            latent_data.check_table_path(Path(data["path"]))
        if not data["targets"]:
            raise ValueError("data.targets: at least one target column is required")
        if data["source"] == "embedded":
            unknown = [t for t in data["targets"] if t not in EMBEDDED_TARGETS]
            if unknown:
                raise ValueError(f"data.targets: {unknown} are not columns of the embedded transport table (it has "
                                 f"{', '.join(EMBEDDED_TARGETS)})")
        if data.get("limit") is not None and int(data["limit"]) < 1:
            raise ValueError(f"data.limit: must be >= 1 rows (or null for all), got {data['limit']}")
        if float(data.get("noise") or 0.0) < 0:
            raise ValueError(f"data.noise: must be >= 0 (the std of the input noise), got {data['noise']}")
        weights = (config.get("loss") or {}).get("task_weights") or {}
        if not isinstance(weights, dict):
            raise ValueError(f"loss.task_weights: expected a mapping of target -> weight, got {weights!r}")
        for task, weight in weights.items():
            if task not in data["targets"]:
                raise ValueError(f"loss.task_weights.{task}: not a target ({', '.join(data['targets'])})")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise ValueError(f"loss.task_weights.{task}: must be a number >= 0, got {weight!r}")
        if float((config.get("loss") or {}).get("recon_weight", 0.0)) < 0:
            raise ValueError(f"loss.recon_weight: must be >= 0, got {config['loss']['recon_weight']}")
        latent_data.check_split({**latent_data.DEFAULT_DATA["split"], **(data.get("split") or {})})
        for key in ("epochs", "batch_size"):
            if int(config["train"][key]) < 1:
                raise ValueError(f"baseline.train.{key}: must be >= 1, got {config['train'][key]}")
        if float(config["optim"]["lr"]) <= 0:
            raise ValueError(f"baseline.optim.lr: must be > 0, got {config['optim']['lr']}")
        if config["design"].get("enabled", True):  # a design switched off needs no objective among the targets
            check_design_config(config["design"], list(data["targets"]))

    def search_space(self) -> dict:
        return {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "optim.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
            "model.hidden": {"type": "categorical", "choices": [128, 256, 512]},
            "train.batch_size": {"type": "categorical", "choices": [128, 256, 512]},
        }
