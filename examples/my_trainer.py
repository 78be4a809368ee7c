"""A trainer written outside tunewise: an MLP regressor on a CSV (README, "Bring your own trainer").

Named in a config as `trainer: examples.my_trainer:MyTrainer`. It implements the Trainer protocol of
tunewise/trainers/base.py; the shared fit loop (tunewise.train.loop.fit) does the optimiser, schedule,
gradient norms, early stopping, checkpoints, resume and history rows, so this file holds only the data,
the model, the loss and the metrics.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from tunewise.trainers.base import check_data_source

SHIPPED_CSV = Path(__file__).resolve().parent / "data" / "housing_synthetic.csv"
SPLITS = ("train", "val", "test")

DEFAULT_CONFIG = {
    # source embedded: the CSV shipped beside this file; source path: `path` names a CSV of your own
    "data": {"source": "embedded", "path": None, "target": "price", "val_frac": 0.2, "test_frac": 0.2,
             "split_seed": 0},
    "model": {"hidden": 32, "depth": 2, "dropout": 0.0},
    # the sections and keys below are the ones the shared fit loop reads
    "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "param_groups": {}},
    "schedule": {"name": "none", "warmup_epochs": 0, "lr_end_factor": 0.01, "step_size": 10, "gamma": 0.1,
                 "patience": 3},
    "train": {"epochs": 20, "batch_size": 32, "grad_clip": None, "patience": None, "min_delta": 0.0, "amp": "auto"},
}


class MyTrainer:
    name = "my_mlp"
    primary_metric = "val/rmse"  # in the target's own unit, so lower is better
    direction = "min"
    # semantic knob -> dotted config key: the diagnosis' recommendations turn into config patches through these
    knobs = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "dropout": "model.dropout",
             "epochs": "train.epochs", "batch_size": "train.batch_size", "capacity": ["model.hidden"],
             "warmup": "schedule.warmup_epochs", "grad_clip": "train.grad_clip", "patience": "train.patience"}
    open_config_keys = {"optim.param_groups"}

    def default_config(self) -> dict:
        return copy.deepcopy(DEFAULT_CONFIG)

    def check_config(self, config: dict) -> None:
        data = config["data"]
        check_data_source(data)
        source = SHIPPED_CSV if data["source"] == "embedded" else Path(data["path"])
        if not source.is_file():
            raise FileNotFoundError(f"data.path: file not found: {data['path']}")
        with open(source, encoding="utf-8") as f:  # the header only: a wrong target stops the run before any job
            columns = next(csv.reader(f), [])
        if data["target"] not in columns:
            raise ValueError(f"data.target: no column {data['target']!r} in {source} (columns: {', '.join(columns)})")
        if not 0 < data["val_frac"] + data["test_frac"] < 1:
            raise ValueError("data.val_frac + data.test_frac: must be between 0 and 1")
        for key in ("epochs", "batch_size"):
            if int(config["train"][key]) < 1:
                raise ValueError(f"train.{key}: must be >= 1, got {config['train'][key]}")
        if float(config["optim"]["lr"]) <= 0:
            raise ValueError(f"optim.lr: must be > 0, got {config['optim']['lr']}")

    def search_space(self) -> dict:
        return {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
            "optim.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.3},
            "model.hidden": {"type": "categorical", "choices": [16, 32, 64]},
        }

    # --- data ----------------------------------------------------------------------------------
    def prepare_data(self, data_cfg: dict, out_dir: Path, threads: int) -> dict:
        """Split the CSV once and standardise it with the training rows' statistics (splits.npz, cached)."""
        import pandas as pd

        source = SHIPPED_CSV if data_cfg["source"] == "embedded" else Path(data_cfg["path"])
        settings = {k: data_cfg[k] for k in ("target", "val_frac", "test_frac", "split_seed")}
        key = hashlib.sha256(source.read_bytes() + json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        out_dir = Path(out_dir)
        ready = out_dir / "example_ready.json"
        if ready.exists() and json.loads(ready.read_text())["key"] == key:
            return json.loads(ready.read_text())["info"]
        frame = pd.read_csv(source)
        target = data_cfg["target"]
        if target not in frame.columns:
            raise ValueError(f"data.target: no column {target!r} in {source} (columns: {', '.join(frame.columns)})")
        features = [c for c in frame.columns if c != target]
        x = frame[features].to_numpy(np.float32)
        y = frame[target].to_numpy(np.float32)
        order = np.random.default_rng(int(data_cfg["split_seed"])).permutation(len(frame))
        n_val, n_test = int(len(frame) * data_cfg["val_frac"]), int(len(frame) * data_cfg["test_frac"])
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        mean, std = x[parts["train"]].mean(0), x[parts["train"]].std(0) + 1e-8
        y_mean, y_std = y[parts["train"]].mean(), y[parts["train"]].std() + 1e-8
        arrays = {f"x_{s}": (x[i] - mean) / std for s, i in parts.items()}
        arrays |= {f"y_{s}": (y[i] - y_mean) / y_std for s, i in parts.items()}
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(out_dir / "splits.npz", **arrays, y_scale=np.float32(y_std))
        info = {"n_rows": len(frame), "features": features, "target": target, "source": str(source),
                **{f"n_{s}": len(i) for s, i in parts.items()}}
        ready.write_text(json.dumps({"key": key, "info": info}))  # last: its presence means the split is whole
        return info

    def _splits(self, config: dict, device) -> tuple[dict, float]:
        with np.load(Path(config["data"]["prepared_dir"]) / "splits.npz") as f:  # allow_pickle stays False
            tensors = {k: torch.from_numpy(f[k]).to(device) for k in f.files if k != "y_scale"}
            return tensors, float(f["y_scale"])

    def _model(self, config: dict, n_in: int) -> torch.nn.Module:
        m, layers = config["model"], []
        for _ in range(int(m["depth"])):
            layers += [torch.nn.Linear(n_in, int(m["hidden"])), torch.nn.ReLU(), torch.nn.Dropout(float(m["dropout"]))]
            n_in = int(m["hidden"])
        return torch.nn.Sequential(*layers, torch.nn.Linear(n_in, 1))

    @staticmethod
    def _scores(model, x, y, y_scale: float, split: str) -> dict:
        """loss (MSE on the standardised target), RMSE in the target's unit, and R^2."""
        mse = float(((model(x).squeeze(-1).float() - y) ** 2).mean())
        return {f"{split}/loss": mse, f"{split}/rmse": mse ** 0.5 * y_scale,
                f"{split}/r2": 1.0 - mse / max(float(y.var(unbiased=False)), 1e-12)}

    # --- training --------------------------------------------------------------------------------
    def run(self, config: dict, seed: int, run, reporter, device, metric: dict, progress: bool | None = None) -> dict:
        from tunewise.train.loop import fit
        from tunewise.train.seed import epoch_generator, seed_everything

        seed_everything(seed)
        data, y_scale = self._splits(config, device)
        model = self._model(config, data["x_train"].shape[1]).to(device)
        batch_size = int(config["train"]["batch_size"])
        n_train = data["x_train"].shape[0]

        def batches(epoch: int):
            # one seeded permutation per epoch: a resumed run sees the same batches as an uninterrupted one
            order = torch.randperm(n_train, generator=epoch_generator(seed, epoch)).to(device)
            for i in range(0, n_train, batch_size):
                idx = order[i:i + batch_size]
                yield data["x_train"][idx], data["y_train"][idx]

        def step(batch):
            x, y = batch
            return ((model(x).squeeze(-1) - y) ** 2).mean(), x.shape[0]

        def evaluate() -> dict:
            # train/* beside val/*: the diagnosis reads the generalisation gap from the pair
            return {**self._scores(model, data["x_train"], data["y_train"], y_scale, "train"),
                    **self._scores(model, data["x_val"], data["y_val"], y_scale, "val")}

        result = fit(model=model, config=config, run=run, reporter=reporter, device=device, seed=seed,
                     train_batches=batches, steps_per_epoch=(n_train + batch_size - 1) // batch_size,
                     train_step=step, evaluate=evaluate, primary=metric["name"], direction=metric["direction"],
                     progress=progress)
        result.metrics["n_train"] = n_train
        return result.metrics

    def evaluate_test(self, config: dict, checkpoint: Path, device, out_dir: Path) -> dict:
        from tunewise.runs import load_checkpoint

        data, y_scale = self._splits(config, device)
        model = self._model(config, data["x_test"].shape[1]).to(device)
        model.load_state_dict(load_checkpoint(checkpoint, map_location=device)["model"])
        model.eval()
        with torch.no_grad():
            scores = self._scores(model, data["x_test"], data["y_test"], y_scale, "test")
        return {**scores, "test/n": int(data["x_test"].shape[0])}
