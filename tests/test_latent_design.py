"""Latent inverse design (tunewise.trainers.latent.design): the batched optimiser on models with a known optimum,
modes, constraints, masking of stopped restarts, frozen weights, the round-trip flag, and the trainer's design
phase on a trained model with its data."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tunewise.trainers.latent import data as latent_data
from tunewise.trainers.latent.design import (
    Constraint, DesignData, Objective, _RowAdam, check_design_config, design_data, optimize_latent,
    resolve_design_config, round_trip, run_design,
)
from tunewise.trainers.latent.model import LatentModel
from tunewise.trainers.latent.trainer import LatentTrainer

D = 4


class Quadratic(nn.Module):
    """sign * |z - c|^2 (sign -1: a peak at c) or w . z (linear)."""

    def __init__(self, c=None, sign=-1.0, w=None):
        super().__init__()
        self.c = nn.Parameter(torch.as_tensor(c, dtype=torch.float32)) if c is not None else None
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float32)) if w is not None else None
        self.sign = sign

    def forward(self, z):
        if self.w is not None:
            return (z * self.w).sum(dim=1, keepdim=True)
        return self.sign * ((z - self.c) ** 2).sum(dim=1, keepdim=True)


class KnownModel(nn.Module):
    """The LatentModel interface with known heads. `subspace` k: decode keeps the first k latent dimensions (the
    data manifold); encode is the identity, so E(D(z)) projects z onto that subspace."""

    def __init__(self, subspace: int | None = None):
        super().__init__()
        self.n_in = self.latent_dim = D
        self.heads = nn.ModuleList([
            Quadratic(c=[1.0, -2.0, 0.5, 3.0], sign=-1.0),  # 0: peak at c
            Quadratic(w=[1.0, 1.0, 0.0, 0.0]),  # 1: linear
            Quadratic(c=[-1.0, 0.0, 2.0, 1.0], sign=1.0),  # 2: bowl, minimum at c
        ])
        self.n_tasks = len(self.heads)
        mask = torch.ones(D) if subspace is None else (torch.arange(D) < subspace).float()
        self.register_buffer("mask", mask)

    def encode(self, x):
        return x

    def decode(self, z):
        return z * self.mask

    def predict(self, z):
        return torch.cat([h(z) for h in self.heads], dim=1)


def starts(n=8, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2


def test_max_mode_finds_the_peak_from_every_start():
    model = KnownModel()
    result = optimize_latent(model, starts(), [Objective(task=0, mode="max")], steps=600, lr=0.1, patience=None)
    target = model.heads[0].c.detach()
    assert torch.allclose(result.z, target.expand_as(result.z), atol=2e-2)
    assert result.score.max() == pytest.approx(0.0, abs=1e-3)


def test_min_mode_finds_the_bowl_bottom():
    model = KnownModel()
    result = optimize_latent(model, starts(), [Objective(task=2, mode="min")], steps=600, lr=0.1, patience=None)
    assert torch.allclose(result.z, model.heads[2].c.detach().expand_as(result.z), atol=2e-2)


def test_target_mode_reaches_the_target_value():
    model = KnownModel()
    result = optimize_latent(model, starts(), [Objective(task=1, mode="target", target=2.5)], steps=400, lr=0.05,
                             patience=None)
    assert torch.allclose(model.predict(result.z)[:, 1], torch.full((8,), 2.5), atol=1e-2)


def test_weighted_objectives_trade_off():
    """max -|z - c|^2 + 0.5 * w.z: the optimum moves from c by 0.25 w."""
    model = KnownModel()
    result = optimize_latent(model, starts(), [Objective(task=0), Objective(task=1, weight=0.5)], steps=800, lr=0.1,
                             patience=None)
    expected = model.heads[0].c.detach() + 0.25 * model.heads[1].w.detach()
    assert torch.allclose(result.z, expected.expand_as(result.z), atol=2e-2)


def test_constraint_is_respected():
    """Maximise the linear head (unbounded) under w.z <= 1.5: every restart ends on the bound, not past it."""
    model = KnownModel()
    result = optimize_latent(model, starts(), [Objective(task=1)], [Constraint(task=1, upper=1.5)], steps=500,
                             lr=0.05, patience=None, constraint_weight=10.0)
    values = model.predict(result.z)[:, 1]
    assert (values <= 1.5 + 1e-2).all() and (values >= 1.35).all()  # at the bound, up to the hinge's oscillation
    free = optimize_latent(model, starts(), [Objective(task=1)], steps=500, lr=0.05, patience=None)
    assert (model.predict(free.z)[:, 1] > 10).all()  # the constraint is what held them


def test_bounds_and_trust_radius_are_projections():
    model = KnownModel()
    z0 = torch.zeros(3, D)
    boxed = optimize_latent(model, z0, [Objective(task=1)], steps=200, lr=0.1, patience=None,
                            bounds=(torch.full((D,), -0.5), torch.full((D,), 0.5)))
    assert boxed.z.abs().max() <= 0.5 + 1e-6 and torch.allclose(boxed.z[:, :2], torch.full((3, 2), 0.5))
    trusted = optimize_latent(model, z0, [Objective(task=1)], steps=200, lr=0.1, patience=None, trust_radius=1.0)
    assert torch.allclose(trusted.z.norm(dim=1), torch.ones(3), atol=1e-5)


def test_rows_are_independent_restarts():
    """Each row of a batch ends where the same start ends alone: one batch is R separate optimisations."""
    model = KnownModel()
    z0 = starts(6, seed=3)
    kw = dict(steps=150, lr=0.05, plateau_patience=5, patience=20, l2=0.01, alpha=0.0)
    together = optimize_latent(model, z0, [Objective(task=0)], **kw)
    for r in range(6):
        alone = optimize_latent(model, z0[r : r + 1], [Objective(task=0)], **kw)
        assert torch.allclose(together.z[r], alone.z[0], atol=1e-5)
        assert together.steps[r] == alone.steps[0] and together.lr[r] == pytest.approx(float(alone.lr[0]))


def test_stopped_restarts_are_masked_not_moved():
    """A restart that starts at the optimum stops after `patience` steps without improvement and stays put; its
    trajectory ends there, while the other restart goes on."""
    model = KnownModel()
    peak = model.heads[0].c.detach()
    z0 = torch.stack([peak, peak + 3.0])
    result = optimize_latent(model, z0, [Objective(task=0)], steps=300, lr=0.05, patience=15, plateau_patience=None)
    assert int(result.steps[0]) < 20 < int(result.steps[1])
    assert torch.isnan(result.trajectory[int(result.steps[0]) :, 0]).all()
    assert torch.isfinite(result.trajectory[: int(result.steps[1]), 1]).all()
    assert torch.allclose(result.z[0], peak, atol=1e-3)


def test_compacting_the_batch_changes_no_result():
    """Once a quarter of the rows have stopped, the batch shrinks to the running ones: each row still ends, with
    its steps and learning rate, exactly where it ends alone."""
    model = KnownModel()
    peak = model.heads[0].c.detach()
    z0 = torch.cat([peak.expand(3, D), starts(5, seed=4)])  # three rows done at once, five that run on
    kw = dict(steps=300, lr=0.05, patience=15, plateau_patience=5, l2=0.01, alpha=torch.tensor([0.0, 1.0] * 4))
    together = optimize_latent(model, z0, [Objective(task=0)], **kw)
    assert int(together.steps[:3].max()) + 10 < int(together.steps[3:].min())  # a quarter stopped: compacted
    for r in range(8):
        alone = optimize_latent(model, z0[r : r + 1], [Objective(task=0)], **{**kw, "alpha": kw["alpha"][r : r + 1]})
        assert torch.allclose(together.z[r], alone.z[0], atol=1e-5), r
        assert int(together.steps[r]) == int(alone.steps[0]) and float(together.lr[r]) == pytest.approx(float(alone.lr[0]))
        assert torch.allclose(together.trajectory[: len(alone.trajectory), r], alone.trajectory[:, 0], equal_nan=True,
                              atol=1e-5)


def test_plateau_lowers_each_rows_learning_rate_on_its_own():
    model = KnownModel()
    peak = model.heads[0].c.detach()
    z0 = torch.stack([peak, peak + 5.0])
    result = optimize_latent(model, z0, [Objective(task=0)], steps=40, lr=0.1, patience=None, plateau_patience=5,
                             plateau_factor=0.5, min_lr=0.01)
    assert float(result.lr[0]) == pytest.approx(0.01)  # at the peak from the start: reduced down to min_lr
    assert float(result.lr[1]) == pytest.approx(0.1)  # still improving every step


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_other_optimisers_keep_stopped_rows_in_place(name):
    model = KnownModel()
    peak = model.heads[0].c.detach()
    z0 = torch.stack([peak, peak + 2.0])
    result = optimize_latent(model, z0, [Objective(task=0)], steps=200, lr=0.05, optimizer=name, patience=10,
                             plateau_patience=None)
    assert torch.allclose(result.z[0], peak, atol=1e-3)
    assert (model.predict(result.z)[1, 0] > model.predict(z0)[1, 0]).item()


def test_row_adam_is_torch_adam_with_a_learning_rate_per_row():
    torch.manual_seed(0)
    mine = torch.randn(5, 7)
    theirs = [mine[r : r + 1].clone().requires_grad_(True) for r in range(5)]
    lrs = [0.1, 0.05, 0.01, 0.001, 0.0]
    adam = _RowAdam(mine)
    opts = [torch.optim.Adam([p], lr=lr) for p, lr in zip(theirs, lrs)]
    for _ in range(30):
        g = torch.randn(5, 7)
        adam.step(g, torch.tensor(lrs))
        for r, (p, opt) in enumerate(zip(theirs, opts)):
            p.grad = g[r : r + 1].clone()
            opt.step()
    assert torch.allclose(mine, torch.cat([p.detach() for p in theirs]), atol=1e-6)


def test_weights_are_frozen_and_restored():
    model = LatentModel(n_in=10, n_tasks=2, hidden=16, latent_dim=4, dropout=0.2)
    model.train()
    model.decoder[0].weight.requires_grad_(False)  # a user's own choice, to be restored as it was
    flags = [p.requires_grad for p in model.parameters()]
    before = copy.deepcopy(model.state_dict())
    optimize_latent(model, torch.randn(5, 4), [Objective(task=0)], steps=30, lr=0.1, alpha=0.5, l2=0.01)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_round_trip_flags_designs_off_the_manifold_and_alpha_keeps_them_on():
    """The manifold is the first two latent dims (decode zeroes the rest). Maximising the peak head pulls z to c,
    whose last two dims are off the manifold: the round trip disagrees. The alignment term keeps z on it."""
    model = KnownModel(subspace=2)
    z0 = torch.zeros(4, D)
    free = optimize_latent(model, z0, [Objective(task=0)], steps=400, lr=0.1, patience=None)
    rt = round_trip(model, free.z, [0])
    assert (rt["disagreement"] > 1.0).all()  # predicted 0 at c, -(0.5^2 + 3^2) at its projection
    aligned = optimize_latent(model, z0, [Objective(task=0)], steps=400, lr=0.1, patience=None, alpha=100.0)
    rt = round_trip(model, aligned.z, [0])
    assert (rt["disagreement"] < 0.25).all()
    assert torch.allclose(aligned.z[:, 2:], torch.zeros(4, 2), atol=0.05)


def _identity_data(model, n=50):
    """DesignData for KnownModel: identity scaling, known compounds spread around the origin."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g)
    with torch.no_grad():
        y = model.predict(x)
    scaler = latent_data.Scaler(np.zeros(D), np.ones(D), np.zeros(3), np.ones(3), ["peak", "lin", "bowl"], [])
    return DesignData(x=x, y=y, ids=[f"id{i}" for i in range(n)], formulas=[f"F{i}" for i in range(n)],
                      split=["train"] * (n - 10) + ["val"] * 10, scaler=scaler, descriptor_columns=[f"d{i}" for i in range(D)],
                      z_train=x[: n - 10], typical_nn=1.0)


def test_run_design_reports_round_trip_verdicts_per_alpha_in_one_batch():
    model = KnownModel(subspace=2)
    data = _identity_data(model)
    cfg = resolve_design_config({"objectives": [{"task": "peak", "mode": "max"}], "restarts": 6, "steps": 300,
                                 "bounds": None, "l2": 0.0, "lr": 0.1, "neighbors": 2})
    results = run_design(model, cfg, data, "cpu", alphas=[0.0, 100.0])
    free, aligned = results
    assert free["alpha"] == 0.0 and aligned["alpha"] == 100.0
    assert free["summary"]["batch_rows"] == 12 and free["summary"]["restarts"] == 6
    assert free["summary"]["off_manifold_rate"] == 1.0 and free["summary"]["ok"] == 0
    assert aligned["summary"]["off_manifold_rate"] == 0.0 and aligned["summary"]["ok"] == 6
    best = aligned["restarts"][0]
    # the validated score is the prediction from the decoded descriptor, not the latent's promise
    assert best["validated_score"] == pytest.approx(best["score_roundtrip"]) and best["ok"]
    assert best["start"]["kind"] == "known" and best["start"]["id"].startswith("id")
    assert len(best["neighbours"]) == 2 and best["neighbours"][0]["distance"] <= best["neighbours"][1]["distance"]
    assert free["restarts"][0]["score"] > free["restarts"][0]["score_roundtrip"] + 1.0
    assert best["nn_train_distance"] >= best["nn_distance"] - 1e-6  # the training rows are a subset of the known


@pytest.mark.parametrize("init", ["random", "random_latent"])
def test_random_starts_are_seeded(init):
    model = KnownModel()
    data = _identity_data(model)
    cfg = resolve_design_config({"objectives": [{"task": "peak"}], "init": init, "restarts": 5, "steps": 5,
                                 "bounds": None, "alpha_study": []})
    a, b = (run_design(model, cfg, data, "cpu")[0] for _ in range(2))
    other = run_design(model, {**cfg, "seed": 1}, data, "cpu")[0]
    assert all(r["start"]["kind"] == "random" for r in a["restarts"])
    assert torch.equal(a["_arrays"]["z0"], b["_arrays"]["z0"]) and not torch.equal(a["_arrays"]["z0"], other["_arrays"]["z0"])


def test_constraints_in_physical_units_mark_infeasible_designs():
    model = KnownModel()
    data = _identity_data(model)
    cfg = resolve_design_config({"objectives": [{"task": "lin", "mode": "max"}], "constraints": [{"task": "lin", "max": 1.0}],
                                 "restarts": 5, "steps": 300, "bounds": None, "alpha": 0.0, "l2": 0.0, "lr": 0.05,
                                 "alpha_study": []})
    design = run_design(model, cfg, data, "cpu")[0]
    for r in design["restarts"]:
        assert r["predicted"]["lin"] <= 1.0 + 1e-2
    loose = run_design(model, {**cfg, "constraint_weight": 0.0}, data, "cpu")[0]
    assert all(not r["feasible"] and not r["ok"] for r in loose["restarts"])


@pytest.mark.parametrize("patch, message", [
    ({"objectives": []}, "at least one objective"),
    ({"objectives": [{"task": "nope"}]}, "is not a target column"),
    ({"objectives": [{"task": "PF_p", "mode": "up"}]}, "mode: expected one of max, min, target"),
    ({"objectives": [{"task": "PF_p", "mode": "target"}]}, "needs a numeric target"),
    ({"constraints": [{"task": "S_p"}]}, "give max and/or min"),
    ({"init": "input"}, "needs design.initial_input"),
    ({"optimizer": "lbfgs"}, "design.optimizer"),
    ({"restarts": 0}, "design.restarts: must be >= 1"),
    ({"alpha": -1}, "design.alpha: must be >= 0"),
    ({"bounds": [1, 0]}, "design.bounds"),
])
def test_bad_design_blocks_are_named(patch, message):
    with pytest.raises(ValueError, match=message):
        check_design_config(resolve_design_config(patch), ["PF_p", "S_p"])


# --- the trainer's design phase on a trained model -----------------------------------------------

FIXTURE = latent_data.Path(__file__).parent / "data" / "latent" / "transport_small.csv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tunewise.runs import RunDir

    work = tmp_path_factory.mktemp("design")
    trainer = LatentTrainer()
    cfg = trainer.default_config()
    cfg["data"].update(source="path", path=str(FIXTURE), targets=["PF_p", "S_p", "kappa_p"], prepared_dir=str(work / "data"),
                       split={"val": 0.2, "test": 0.2, "seed": 0})
    cfg["model"].update(hidden=32, latent_dim=8, head_hidden=8)
    cfg["train"].update(epochs=15, batch_size=16)
    cfg["optim"]["lr"] = 3e-3
    cfg["design"].update(restarts=12, steps=120, constraints=[{"task": "kappa_p", "max": 2.0}], alpha_study=[0.0, 0.5])
    trainer.prepare_data(cfg["data"], work / "data", threads=1)
    run = RunDir(work / "run")
    run.start(cfg, 0)

    class Rows:
        def epoch(self, step, row):
            pass

        def replay(self, rows):
            pass

    trainer.run(copy.deepcopy(cfg), 0, run, Rows(), torch.device("cpu"), {"name": "val/r2_mean", "direction": "max"},
                progress=False)
    return trainer, cfg, run, work


def test_trainer_design_writes_every_restart_in_physical_units(trained):
    import pandas as pd

    import hashlib

    trainer, cfg, run, work = trained
    digest = hashlib.sha256((run.checkpoints / "best.pt").read_bytes()).hexdigest()
    design = trainer.design(copy.deepcopy(cfg), run.checkpoints / "best.pt", torch.device("cpu"), work / "out")
    assert design["summary"]["restarts"] == 12 and len(design["restarts"]) == 12
    assert [r["alpha"] for r in design["alpha_study"]] == [0.0, 0.5]
    assert design["units"]["PF_p"] == "µW/(cm·K²)"
    splits = latent_data.load_splits(work / "data", cfg["data"])
    known = {i: f for s in ("train", "val", "test") for i, f in zip(splits.ids[s], splits.formulas[s])}
    table = pd.read_csv(FIXTURE)
    for r in design["restarts"]:
        assert r["predicted"]["PF_p"] > 0  # a log10 target comes back as a positive physical value
        for n in r["neighbours"]:
            assert known[n["id"]] == n["formula"]
            measured = table.loc[table["mp_id"] == n["id"], "PF_p"].item()
            assert n["properties"]["PF_p"] == pytest.approx(measured, rel=1e-6)
        if r["ok"]:
            assert r["predicted"]["kappa_p"] <= 2.0 * (1 + 1e-3) and not r["off_manifold"]
    ordered = [r for r in design["restarts"] if r["ok"]]
    assert [r["validated_score"] for r in ordered] == sorted((r["validated_score"] for r in ordered), reverse=True)
    for name in ("trajectories", "latents", "descriptors"):
        assert (work / "out" / f"{name}.csv").is_file()
    assert list(pd.read_csv(work / "out" / "descriptors.csv").columns[1:]) == splits.descriptor_columns
    assert hashlib.sha256((run.checkpoints / "best.pt").read_bytes()).hexdigest() == digest  # the model is untouched


def test_design_metric_every_epoch(trained, tmp_path):
    from tunewise.runs import RunDir

    trainer, cfg, _, _ = trained
    cfg = copy.deepcopy(cfg)
    cfg["train"]["epochs"] = 3
    run = RunDir(tmp_path / "run")
    run.start(cfg, 0)
    rows = []

    class Rows:
        def epoch(self, step, row):
            rows.append(row)

        def replay(self, r):
            pass

    metrics = trainer.run(cfg, 0, run, Rows(), torch.device("cpu"),
                          {"name": "design/validated_score", "direction": "max"}, progress=False)
    assert len(rows) == 3 and all(np.isfinite(r["design/validated_score"]) for r in rows)
    assert metrics["primary"]["best"] == pytest.approx(max(r["design/validated_score"] for r in rows))
    assert all(0 <= r["design/off_manifold_rate"] <= 1 for r in rows)


def test_initial_input_file_starts_one_restart_per_row(trained, tmp_path):
    import pandas as pd

    trainer, cfg, run, work = trained
    table = pd.read_csv(FIXTURE)
    descriptors = latent_data.load_splits(work / "data", cfg["data"]).descriptor_columns  # (sigma_p is one here)
    path = tmp_path / "start.csv"
    table.loc[:2, ["pretty_formula", *descriptors]].rename(columns={"pretty_formula": "formula"}).to_csv(path, index=False)
    own = copy.deepcopy(cfg)
    own["design"]["plateau"]["factor"] = 0.3
    design = trainer.design(own, run.checkpoints / "best.pt", torch.device("cpu"), tmp_path / "out",
                            overrides={"init": "input", "initial_input": str(path), "alpha_study": [],
                                       "plateau": {"patience": 7}})
    assert design["summary"]["restarts"] == 3
    # an override of one plateau setting keeps the config's others (`tunewise design --set plateau={patience: 7}`)
    assert design["settings"]["plateau"] == {"factor": 0.3, "patience": 7, "min_lr": 1.0e-4}
    assert sorted(r["start"]["formula"] for r in design["restarts"]) == sorted(table.loc[:2, "pretty_formula"])
    table.loc[:2, descriptors[:-1]].to_csv(path, index=False)
    with pytest.raises(ValueError, match=f"missing descriptor column\\(s\\) \\['{descriptors[-1]}'\\]"):
        trainer.design(copy.deepcopy(cfg), run.checkpoints / "best.pt", torch.device("cpu"), tmp_path / "out",
                       overrides={"init": "input", "initial_input": str(path)})


def test_a_sweep_trial_tunes_design_knobs_by_the_validated_score(tmp_path, monkeypatch):
    """The optimisation phases can tune the design: a sweep over design.* keys with design/validated_score as the
    metric trains the trial with the sampled design settings and tells the study the best validated score."""
    import json

    import pandas as pd
    import yaml

    from tunewise.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    config = {"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "experiments": {"d": {
        "trainer": "latent", "data": {"source": "path", "path": str(FIXTURE), "targets": ["PF_p", "S_p"],
                                      "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "baseline": {"model": {"hidden": 16, "latent_dim": 4, "head_hidden": 4}, "train": {"epochs": 3, "batch_size": 16}},
        "design": {"restarts": 6, "steps": 40, "alpha_study": []},
        "metric": {"name": "design/validated_score", "direction": "max"},
        "optimize": {"strategy": "sweep", "sweep": {"base": "baseline", "sampler": "random", "pruner": "none", "space": {
            "optim.lr": None, "optim.weight_decay": None, "model.dropout": None, "model.hidden": None,
            "train.batch_size": None, "design.alpha": {"type": "float", "low": 0.0, "high": 1.0},
            "design.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}}},
    }}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    exp_file = "results/d/experiment.yaml"
    assert main(["resolve", "--config", "c.yaml", "--experiment", "d", "--out", exp_file]) == 0
    assert main(["prepare-data", "--experiment-file", exp_file, "--out", "results/d/data/ready.json"]) == 0
    assert main(["train", "--experiment-file", exp_file, "--run-dir", "results/d/baseline", "--threads", "1"]) == 0
    out = tmp_path / "results/d/optimize/sweep/trials/trial0/trial.json"
    assert main(["sweep-trial", "--experiment-file", exp_file, "--slot", "0", "--out", str(out), "--threads", "1"]) == 0
    trial = json.loads(out.read_text())
    assert set(trial["params"]) == {"design.alpha", "design.lr"} and trial["state"] == "COMPLETE"
    run_config = yaml.safe_load((out.parent / "config.yaml").read_text())
    assert run_config["design"]["alpha"] == pytest.approx(trial["params"]["design.alpha"])
    assert run_config["design"]["lr"] == pytest.approx(trial["params"]["design.lr"])
    history = pd.read_csv(out.parent / "history.csv")
    assert trial["value"] == pytest.approx(history["design/validated_score"].max())
