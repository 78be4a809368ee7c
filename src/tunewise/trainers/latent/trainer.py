"""The `latent` trainer (seed 003): a multi-task model on material descriptors.

Encoder -> latent -> one head per property, plus a decoder back to the descriptor, trained
jointly on weighted task losses and reconstruction. Primary metric: validation mean R^2.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from tunewise.trainers.base import check_data_source
from tunewise.trainers.latent import data as latent_data
from tunewise.trainers.latent.model import LatentModel, multitask_loss, regression_metrics

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
}


class LatentTrainer:
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
    }
    open_config_keys = {"optim.param_groups", "data.split", "loss.task_weights"}

    def default_config(self) -> dict:
        return copy.deepcopy(DEFAULT_CONFIG)

    def check_config(self, config: dict) -> None:
        data = config["data"]
        check_data_source(data)
        if data["source"] == "path":
            if not Path(data["path"]).exists():
                raise FileNotFoundError(f"data.path: file not found: {data['path']}")
        if not data["targets"]:
            raise ValueError("data.targets: at least one target column is required")
        for key in ("epochs", "batch_size"):
            if int(config["train"][key]) < 1:
                raise ValueError(f"baseline.train.{key}: must be >= 1, got {config['train'][key]}")
        if float(config["optim"]["lr"]) <= 0:
            raise ValueError(f"baseline.optim.lr: must be > 0, got {config['optim']['lr']}")

    def search_space(self) -> dict:
        return {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "optim.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
            "model.hidden": {"type": "categorical", "choices": [128, 256, 512]},
            "train.batch_size": {"type": "categorical", "choices": [128, 256, 512]},
        }

    def prepare_data(self, data_cfg: dict, out_dir: Path, threads: int) -> dict:
        return latent_data.prepare(data_cfg, Path(out_dir), threads=threads)

    # --- training ------------------------------------------------------------------------
    def _model(self, config: dict, splits) -> LatentModel:
        m = config["model"]
        return LatentModel(
            n_in=splits.x["train"].shape[1],
            n_tasks=splits.y["train"].shape[1],
            hidden=int(m["hidden"]),
            latent_dim=int(m["latent_dim"]),
            depth=int(m["depth"]),
            dropout=float(m["dropout"]),
            head_hidden=int(m["head_hidden"]),
            tanh_latent=bool(m["tanh_latent"]),
        )

    def _task_weights(self, config: dict, targets: list[str]):
        weights = config["loss"].get("task_weights")
        if not weights:
            return None
        unknown = set(weights) - set(targets)
        if unknown:
            raise ValueError(f"loss.task_weights: unknown task(s) {sorted(unknown)}; tasks are {targets}")
        return torch.tensor([float(weights.get(t, 1.0)) for t in targets])

    def run(self, config: dict, seed: int, run, reporter, device, metric: dict, progress: bool | None = None) -> dict:
        from tunewise.train.loop import fit
        from tunewise.train.seed import epoch_generator, seed_everything

        seed_everything(seed)
        splits = latent_data.load_splits(Path(config["data"]["prepared_dir"]), config["data"])
        targets = splits.target_columns
        model = self._model(config, splits).to(device)
        task_weights = self._task_weights(config, targets)
        if task_weights is not None:
            task_weights = task_weights.to(device)
        recon_weight = float(config["loss"]["recon_weight"])
        noise = float(config["data"].get("noise") or 0.0)
        batch_size = int(config["train"]["batch_size"])
        x_train, y_train = splits.x["train"].to(device), splits.y["train"].to(device)
        n_train = x_train.shape[0]
        steps = (n_train + batch_size - 1) // batch_size

        # the data sits in memory as tensors: a permutation per epoch is all the loader needs
        def batches(epoch: int):
            order = torch.randperm(n_train, generator=epoch_generator(seed, epoch)).to(device)
            for i in range(0, n_train, batch_size):
                idx = order[i : i + batch_size]
                yield x_train[idx], y_train[idx]

        def step(batch):
            x, y = batch
            x_in = x + noise * torch.randn_like(x) if noise > 0 else x
            _, preds, recon = model(x_in)
            loss, _ = multitask_loss(preds, y, recon, x, task_weights, recon_weight)
            return loss, x.shape[0]

        n_eval = min(int(config["train"]["eval_train_samples"]), n_train)
        eval_sets = {
            "train": (x_train[:n_eval], y_train[:n_eval]),
            "val": (splits.x["val"].to(device), splits.y["val"].to(device)),
        }

        def evaluate() -> dict:
            out = {}
            for split, (x, y) in eval_sets.items():
                _, preds, recon = model(x)
                loss, parts = multitask_loss(preds.float(), y, recon.float(), x, task_weights, recon_weight)
                out[f"{split}/loss"] = float(loss)
                out[f"{split}/recon_mse"] = float(parts["recon"])
                for name, value in regression_metrics(preds.float(), y, targets).items():
                    out[f"{split}/{name}"] = value
            return out

        result = fit(
            model=model,
            config=config,
            run=run,
            reporter=reporter,
            device=device,
            seed=seed,
            train_batches=batches,
            steps_per_epoch=steps,
            train_step=step,
            evaluate=evaluate,
            primary=metric["name"],
            direction=metric["direction"],
            progress=progress,
        )
        result.metrics["n_train"] = n_train
        return result.metrics

    def evaluate_test(self, config: dict, checkpoint: Path, device) -> dict:
        from tunewise.runs import load_checkpoint

        splits = latent_data.load_splits(Path(config["data"]["prepared_dir"]), config["data"])
        model = self._model(config, splits).to(device)
        model.load_state_dict(load_checkpoint(checkpoint, map_location=device)["model"])
        model.eval()
        task_weights = self._task_weights(config, splits.target_columns)
        with torch.no_grad():
            x, y = splits.x["test"].to(device), splits.y["test"].to(device)
            _, preds, recon = model(x)
            loss, _ = multitask_loss(preds, y, recon, x, task_weights, float(config["loss"]["recon_weight"]))
            out = {"test/loss": float(loss), "test/n": int(x.shape[0])}
            out.update({f"test/{k}": v for k, v in regression_metrics(preds, y, splits.target_columns).items()})
        return out
