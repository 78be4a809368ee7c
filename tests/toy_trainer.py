"""A tiny regression trainer used by the machinery tests (named as `toy_trainer:ToyTrainer`)."""
from __future__ import annotations

import copy

import torch

DEFAULT = {
    "data": {"n": 256, "noise": 0.1},
    "model": {"hidden": 16, "dropout": 0.0},
    "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9, "param_groups": {}},
    "schedule": {"name": "none", "warmup_epochs": 0, "lr_end_factor": 0.01, "step_size": 10, "gamma": 0.1, "patience": 3},
    "train": {"epochs": 8, "batch_size": 32, "grad_clip": None, "patience": None, "min_delta": 0.0, "amp": "auto",
              # fault injection: the loss turns `nonfinite` (nan or inf) from epoch `nan_at_epoch` on; a batch
              # larger than `oom_above_batch` runs out of memory from epoch `oom_from_epoch` on
              "sleep": 0.0, "nan_at_epoch": None, "nonfinite": "nan", "oom_above_batch": None, "oom_from_epoch": 1},
}


class ToyTrainer:
    name = "toy"
    primary_metric = "val/neg_mse"
    direction = "max"
    knobs = {"lr": "optim.lr", "epochs": "train.epochs", "dropout": "model.dropout",
             "batch_size": "train.batch_size", "weight_decay": "optim.weight_decay", "capacity": ["model.hidden"]}
    open_config_keys = {"optim.param_groups"}

    def default_config(self):
        return copy.deepcopy(DEFAULT)

    def check_config(self, config):
        pass

    def search_space(self):
        return {}

    def prepare_data(self, data_cfg, out_dir, threads):
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"n_rows": data_cfg["n"]}

    def _data(self, config):
        g = torch.Generator().manual_seed(1234)
        n = config["data"]["n"]
        x = torch.randn(n, 4, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + config["data"]["noise"] * torch.randn(n, generator=g)
        return x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4:], y[n * 3 // 4:]

    def _model(self, config):
        h = config["model"]["hidden"]
        return torch.nn.Sequential(torch.nn.Linear(4, h), torch.nn.ReLU(), torch.nn.Dropout(config["model"]["dropout"]),
                                   torch.nn.Linear(h, 1))

    def run(self, config, seed, run, reporter, device, metric, progress=None):
        import time

        from tunewise.train.loop import fit
        from tunewise.train.seed import epoch_generator, seed_everything

        seed_everything(seed)
        xt, yt, xv, yv = self._data(config)
        model = self._model(config)
        bs = config["train"]["batch_size"]
        nan_at = config["train"]["nan_at_epoch"]
        oom_above = config["train"]["oom_above_batch"]

        def batches(epoch):
            order = torch.randperm(len(xt), generator=epoch_generator(seed, epoch))
            for i in range(0, len(xt), bs):
                idx = order[i:i + bs]
                yield epoch, xt[idx], yt[idx]

        def step(batch):
            epoch, x, y = batch
            if oom_above is not None and bs > oom_above and epoch + 1 >= config["train"]["oom_from_epoch"]:
                # what torch raises when a batch does not fit on the GPU (a RuntimeError subclass)
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {bs} toy samples "
                                                  f"(train.oom_above_batch: {oom_above})")
            if config["train"]["sleep"]:
                time.sleep(config["train"]["sleep"])
            loss = ((model(x).squeeze(-1) - y) ** 2).mean()
            if nan_at is not None and epoch + 1 >= nan_at:
                loss = loss * float(config["train"]["nonfinite"])
            return loss, len(x)

        def evaluate():
            out = {}
            for split, (x, y) in {"train": (xt, yt), "val": (xv, yv)}.items():
                mse = float(((model(x).squeeze(-1) - y) ** 2).mean())
                out[f"{split}/loss"] = mse
                out[f"{split}/neg_mse"] = -mse
            return out

        steps = (len(xt) + bs - 1) // bs
        return fit(model=model, config=config, run=run, reporter=reporter, device=device, seed=seed,
                   train_batches=batches, steps_per_epoch=steps, train_step=step, evaluate=evaluate,
                   primary=metric["name"], direction=metric["direction"], progress=progress).metrics

    def evaluate_test(self, config, checkpoint, device):
        from tunewise.runs import load_checkpoint

        model = self._model(config)
        model.load_state_dict(load_checkpoint(checkpoint)["model"])
        _, _, xv, yv = self._data(config)
        with torch.no_grad():
            return {"test/neg_mse": -float(((model(xv).squeeze(-1) - yv) ** 2).mean())}
