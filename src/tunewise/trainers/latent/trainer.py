"""The `latent` trainer (seed 003): a multi-task model on material descriptors.

Encoder -> latent -> one head per property, plus a decoder back to the descriptor, trained
jointly on weighted task losses and reconstruction. Primary metric: validation mean R^2.

The config's `design` section (the experiment's `design:` block) drives the inverse design the
`design` rule runs on the final model (tunewise.trainers.latent.design). With `metric.name:
design/validated_score` every epoch also runs that design, so the optimisation phases can tune
the design knobs (and pick the checkpoint) by the round-trip-validated score.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tunewise.config import deep_merge
from tunewise.trainers.latent import data as latent_data
from tunewise.trainers.latent.model import LatentModel, multitask_loss, regression_metrics
from tunewise.trainers.latent.spec import DEFAULT_CONFIG, DESIGN_METRICS, LatentSpec  # noqa: F401  (re-exported)


class LatentTrainer(LatentSpec):
    """The latent trainer: LatentSpec's settings, and the training, test evaluation and design."""

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

        design_epoch = self._design_every_epoch(config, splits, model, device, metric["name"])
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
            if design_epoch is not None:
                out.update(design_epoch())
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

    def _design_every_epoch(self, config: dict, splits, model, device, metric_name: str):
        """A callable giving this epoch's design metrics when the primary metric is one of them, else None."""
        if not metric_name.startswith("design/"):
            return None
        if metric_name not in DESIGN_METRICS:
            raise ValueError(f"metric.name: {metric_name!r} is not a design metric ({', '.join(DESIGN_METRICS)})")
        from tunewise.trainers.latent.design import design_data, resolve_design_config, run_design

        cfg = resolve_design_config(config["design"])
        typical: list[float] = []

        def epoch_design() -> dict:
            data = design_data(model, splits, device, typical[0] if typical else None)
            typical[:1] = [data.typical_nn]
            # the fit loop evaluates under no_grad (and maybe autocast); the design needs gradients in z, in fp32
            with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
                summary = run_design(model, cfg, data, device)[0]["summary"]
            return {
                "design/validated_score": summary["validated_score"], "design/best_score": summary["best_score"],
                "design/off_manifold_rate": summary["off_manifold_rate"],
                "design/ok_rate": summary["ok"] / max(1, summary["restarts"]),
            }

        return epoch_design

    def design(self, config: dict, checkpoint: Path, device, out_dir: Path, overrides: dict | None = None,
               progress: bool | None = None) -> dict:
        """The design phase on a trained model: design.json's content (without writing it) and the CSVs beside it."""
        from tunewise.runs import load_checkpoint
        from tunewise.trainers.latent.design import (
            UNITS, check_design_config, design_data, design_phase, resolve_design_config, write_design_files,
        )

        # deep: `--set plateau={patience: 5}` changes the patience and keeps the plateau's other settings
        cfg = resolve_design_config(deep_merge(config.get("design") or {}, overrides or {}))
        check_design_config(cfg, list(config["data"]["targets"]))
        splits = latent_data.load_splits(Path(config["data"]["prepared_dir"]), config["data"])
        model = self._model(config, splits).to(device)
        model.load_state_dict(load_checkpoint(checkpoint, map_location=device)["model"])
        model.eval()
        data = design_data(model, splits, device)
        result = design_phase(model, cfg, data, device, progress=bool(progress))
        files = write_design_files(out_dir, result, splits.descriptor_columns)
        result.pop("_arrays")
        targets = list(splits.target_columns)
        return {"settings": cfg, "checkpoint": str(checkpoint), "targets": targets,
                "units": {t: UNITS.get(t, "") for t in targets}, "log_targets": list(splits.scaler.log_targets),
                "latent_dim": model.latent_dim, "files": files, **result}

    def evaluate_test(self, config: dict, checkpoint: Path, device, out_dir: Path) -> dict:
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
