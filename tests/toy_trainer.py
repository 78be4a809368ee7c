"""A tiny regression trainer used by the machinery tests (named as `toy_trainer:ToyTrainer`).

torch is imported where a method needs it, as a built-in trainer's spec does without it: the light jobs (resolve,
diagnose, gates, significance, ...) load the trainer for its settings and knobs only, and an end-to-end test runs
hundreds of them."""
from __future__ import annotations

import copy

DEFAULT = {
    "data": {"n": 256, "noise": 0.1},
    "model": {"hidden": 16, "dropout": 0.0},
    "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9, "param_groups": {}},
    "schedule": {"name": "none", "warmup_epochs": 0, "lr_end_factor": 0.01, "step_size": 10, "gamma": 0.1, "patience": 3},
    "train": {"epochs": 8, "batch_size": 32, "grad_clip": None, "patience": None, "min_delta": 0.0, "amp": "auto",
              # fault injection: the loss turns `nonfinite` (nan or inf) from epoch `nan_at_epoch` on; a batch
              # larger than `oom_above_batch` runs out of memory from epoch `oom_from_epoch` on; the trainer refuses
              # its data (a ValueError, as a trainer does) at epoch `refuse_data_at_epoch`
              "sleep": 0.0, "nan_at_epoch": None, "nonfinite": "nan", "oom_above_batch": None, "oom_from_epoch": 1,
              "refuse_data_at_epoch": None},
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
        import torch

        g = torch.Generator().manual_seed(1234)
        n = config["data"]["n"]
        x = torch.randn(n, 4, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + config["data"]["noise"] * torch.randn(n, generator=g)
        return x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4:], y[n * 3 // 4:]

    def _model(self, config):
        import torch

        h = config["model"]["hidden"]
        return torch.nn.Sequential(torch.nn.Linear(4, h), torch.nn.ReLU(), torch.nn.Dropout(config["model"]["dropout"]),
                                   torch.nn.Linear(h, 1))

    def run(self, config, seed, run, reporter, device, metric, progress=None):
        import time

        import torch

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
            if epoch + 1 == config["train"].get("refuse_data_at_epoch"):
                raise ValueError(f"toy: the data of epoch {epoch + 1} are unusable (column x: 3 rows are text)")
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

    def evaluate_test(self, config, checkpoint, device, out_dir):
        import torch

        from tunewise.runs import load_checkpoint

        model = self._model(config)
        model.load_state_dict(load_checkpoint(checkpoint)["model"])
        _, _, xv, yv = self._data(config)
        with torch.no_grad():
            return {"test/neg_mse": -float(((model(xv).squeeze(-1) - yv) ** 2).mean())}


class CapableToy(ToyTrainer):
    """The ToyTrainer with every optional capability (trainers/base.py: Capabilities), for the tests that check
    the phases and the workflow use them without knowing the trainer: a preparation step, a finding and its
    recommendation of its own, a threshold of its own, a test table and a report section."""

    name = "capable_toy"
    diagnosis_thresholds = {"toy_dropout_max": 0.05}
    report_sections = ("toy_trainer:toy_section",)

    def preparation_steps(self, config):
        return {"warmup": "write the toy's warm-up file"}

    def prepare_step(self, step, config, out_dir, threads):
        import json
        from pathlib import Path

        assert step == "warmup"
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "warmup.json").write_text(json.dumps({"threads": threads}))
        return {"params": {"warmup.threads": threads}, "metrics": {"warmup/value": 1.5},
                "files": [out_dir / "warmup.json"], "message": "toy warm-up written"}

    def extra_findings(self, history, metrics, thresholds):
        # fires on any run (the toy has no dropout worth keeping): evidence from the history, as a real rule's
        return [{"id": "toy_flag", "root_cause": "toy_cause", "severity": "high",
                 "summary": "the toy's own rule fired",
                 "evidence": {"rows": len(history), "toy_dropout_max": thresholds["toy_dropout_max"]}}]

    def recommendation_patterns(self):
        def toy_cause(finding, config, knobs):
            return [("weight_decay", "set", 0.001, "high", "low", "low", "the toy's own recommendation")]

        return {"toy_cause": toy_cause}

    def evaluate_test(self, config, checkpoint, device, out_dir):
        import json
        from pathlib import Path

        test = super().evaluate_test(config, checkpoint, device, out_dir)
        (Path(out_dir) / "toy_table.json").write_text(json.dumps({"rows": [[1, 2], [3, 4]]}))
        return test


def toy_section(ctx):
    """CapableToy's report section: the runs it was given and, in the final report, its test table."""
    from tunewise.reports.sections import Section

    lines = [f"## Toy section ({ctx.report})", "", f"runs: {', '.join(ctx.runs)}; shown: {ctx.run_label}"]
    if ctx.tables_dir is not None:
        lines.append(f"test table: {(ctx.tables_dir / 'toy_table.json').read_text()}")
    path = ctx.plots_dir / f"{ctx.name}_toy.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("toy figure")
    return Section("\n".join(lines) + "\n", [path])
