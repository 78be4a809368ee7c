"""The latent trainer's model, masked multi-task loss and regression metrics."""
from __future__ import annotations

import math

import pytest
import torch

from tunewise.trainers.latent.model import LatentModel, multitask_loss, regression_metrics

TASKS = ["PF_p", "S_p", "sigma_p"]


def batch(n: int = 16, n_in: int = 10, n_tasks: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_in, generator=g), torch.randn(n, n_tasks, generator=g)


def test_shapes_and_parts():
    model = LatentModel(n_in=10, n_tasks=3, hidden=32, latent_dim=8, depth=3, head_hidden=16)
    x, _ = batch()
    z, preds, recon = model(x)
    assert z.shape == (16, 8) and preds.shape == (16, 3) and recon.shape == (16, 10)
    torch.testing.assert_close(model.predict(model.encode(x)), preds)
    torch.testing.assert_close(model.decode(z), recon)
    hidden_layers = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert len(hidden_layers) == 4  # depth hidden layers + the projection to the latent
    assert len(model.heads) == 3


def test_tanh_latent_is_bounded_and_linear_heads():
    model = LatentModel(n_in=10, n_tasks=2, hidden=16, latent_dim=4, head_hidden=0, tanh_latent=True)
    z = model.encode(100 * batch()[0])
    assert z.abs().max() <= 1.0
    assert all(isinstance(h, torch.nn.Linear) for h in model.heads)


def test_dropout_is_active_in_training_only():
    model = LatentModel(n_in=10, n_tasks=1, hidden=64, latent_dim=8, dropout=0.5)
    x, _ = batch()
    model.train()
    assert not torch.equal(model(x)[1], model(x)[1])
    model.eval()
    assert torch.equal(model(x)[1], model(x)[1])


def test_loss_ignores_missing_targets():
    x, y = batch()
    preds, recon = torch.randn_like(y), torch.randn_like(x)
    y[::3, 1] = float("nan")
    total, parts = multitask_loss(preds, y, recon, x, None, recon_weight=0.5)
    observed = ~torch.isnan(y[:, 1])
    expected_task1 = ((preds[observed, 1] - y[observed, 1]) ** 2).mean()
    torch.testing.assert_close(parts["per_task"][1], expected_task1)
    expected = sum(((preds[:, t] - y[:, t]) ** 2).mean() for t in (0, 2)) + expected_task1
    torch.testing.assert_close(total, expected + 0.5 * ((recon - x) ** 2).mean())
    # what the model predicts where the target is missing does not matter
    moved = preds.clone()
    moved[~observed, 1] += 100.0
    torch.testing.assert_close(multitask_loss(moved, y, recon, x, None, 0.5)[0], total)


def test_task_with_no_observed_targets_adds_zero_and_no_nan():
    model = LatentModel(n_in=10, n_tasks=3, hidden=16, latent_dim=4)
    x, y = batch()
    y[:, 2] = float("nan")
    _, preds, recon = model(x)
    total, parts = multitask_loss(preds, y, recon, x, None, recon_weight=1.0)
    assert torch.isfinite(total)
    assert parts["per_task"][2] == 0
    total.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # its head learns nothing from this batch; the others do
    assert all((p.grad == 0).all() for p in model.heads[2].parameters())
    assert any((p.grad != 0).any() for p in model.heads[0].parameters())


def test_gradients_reach_encoder_heads_and_decoder():
    model = LatentModel(n_in=10, n_tasks=3, hidden=16, latent_dim=4, depth=2)
    x, y = batch()
    _, preds, recon = model(x)
    total, _ = multitask_loss(preds, y, recon, x, None, recon_weight=0.5)
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_recon_weight_zero_leaves_the_decoder_untrained():
    model = LatentModel(n_in=10, n_tasks=3, hidden=16, latent_dim=4)
    x, y = batch()
    _, preds, recon = model(x)
    multitask_loss(preds, y, recon, x, None, recon_weight=0.0)[0].backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.decoder.parameters())


def test_task_weights_scale_each_task():
    x, y = batch()
    preds, recon = torch.randn_like(y), x.clone()  # perfect reconstruction: only tasks count
    _, parts = multitask_loss(preds, y, recon, x, None, 1.0)
    weights = torch.tensor([2.0, 0.0, 1.0])
    total, _ = multitask_loss(preds, y, recon, x, weights, 1.0)
    torch.testing.assert_close(total, 2 * parts["per_task"][0] + parts["per_task"][2])


def test_half_precision_outputs_give_a_float32_loss():
    x, y = batch()
    total, _ = multitask_loss(y.half(), y, x.half(), x, None, 1.0)
    assert total.dtype == torch.float32 and total < 1e-3


def test_metrics_perfect_predictions():
    _, y = batch(n=20)
    y[3, 0] = float("nan")
    m = regression_metrics(y.clone(), y, TASKS)
    for t in TASKS:
        assert m[f"r2/{t}"] == pytest.approx(1.0) and m[f"mae/{t}"] == pytest.approx(0.0)
    assert m["r2_mean"] == pytest.approx(1.0) and m["mae_mean"] == pytest.approx(0.0)


def test_metrics_values_over_observed_targets():
    y = torch.tensor([[1.0], [2.0], [3.0], [float("nan")]])
    preds = torch.tensor([[1.5], [2.0], [2.0], [50.0]])
    m = regression_metrics(preds, y, ["a"])
    # SS_res = 0.25 + 0 + 1 = 1.25, SS_tot = 2 -> R^2 = 0.375; MAE = 1.5 / 3
    assert m["r2/a"] == pytest.approx(0.375)
    assert m["mae/a"] == pytest.approx(0.5)
    mean_pred = regression_metrics(torch.full_like(preds, 2.0), y, ["a"])
    assert mean_pred["r2/a"] == pytest.approx(0.0)


def test_metrics_skip_tasks_without_targets_but_not_nan_predictions():
    _, y = batch(n=10)
    y[:, 1] = float("nan")
    m = regression_metrics(y.clone(), y, TASKS)
    assert math.isnan(m["r2/S_p"]) and math.isnan(m["mae/S_p"])
    assert m["r2_mean"] == pytest.approx(1.0)  # the empty task is left out of the mean
    diverged = y.clone()
    diverged[:, 0] = float("nan")
    assert math.isnan(regression_metrics(diverged, y, TASKS)["r2_mean"])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="LatentModel"):
        LatentModel(n_in=0, n_tasks=1)
    with pytest.raises(ValueError, match="regression_metrics"):
        regression_metrics(torch.zeros(4, 2), torch.zeros(4, 2), ["only_one"])
