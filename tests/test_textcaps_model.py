"""The textcaps model pieces: encoders, Gaussian anchors + Bures-Wasserstein-2, GroupDRO."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision
from torch import nn

from tunewise.trainers.textcaps.anchors import (
    GaussianAnchors,
    anchor_losses,
    build_head,
    class_moments,
    fit_loss,
    psd_sqrt,
    separation_loss,
    w2_squared,
)
from tunewise.trainers.textcaps.encoders import (
    CombinedEncoder,
    build_encoder,
    backbone_prefixes,
    parameter_groups,
    split_parameters,
)
from tunewise.trainers.textcaps.groupdro import GroupDRO, group_mean_losses

VOCAB, MAX_LEN, LATENT = 40, 24, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these tensors are tiny: with a second thread on a shared, busy CPU every op waits on the other core
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spd(d: int, seed: int, rank: int | None = None, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=dtype)
    return a @ a.T + (0 if rank else 0.1) * torch.eye(d, dtype=dtype)


# ---------------------------------------------------------------- Bures-Wasserstein-2


def test_w2_is_symmetric_and_matches_scipy_for_full_covariances():
    m1, m2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    s1, s2 = spd(5, 1), spd(5, 2)
    forward, backward = w2_squared(m1, s1, m2, s2), w2_squared(m2, s2, m1, s1)
    torch.testing.assert_close(forward, backward, rtol=1e-9, atol=1e-9)
    root2 = scipy.linalg.sqrtm(s2.numpy())
    cross = np.real(scipy.linalg.sqrtm(root2 @ s1.numpy() @ root2))
    expected = float(((m1 - m2) ** 2).sum()) + np.trace(s1.numpy() + s2.numpy() - 2 * cross)
    assert float(forward) == pytest.approx(expected, rel=1e-8)
    assert float(forward) > 0.1


def test_w2_is_zero_for_identical_gaussians():
    m, s = torch.randn(6, dtype=torch.float64), spd(6, 3)
    assert float(w2_squared(m, s, m, s)) == pytest.approx(0.0, abs=1e-9)
    eye = torch.eye(6)
    assert float(w2_squared(m.float(), 1e-4 * eye, m.float(), 1e-4 * eye)) == pytest.approx(0.0, abs=1e-6)


def test_w2_matches_closed_form_for_diagonal_covariances():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(3, 8, generator=g, dtype=torch.float64) * 3, torch.rand(3, 8, generator=g, dtype=torch.float64)
    got = w2_squared(m1, torch.diag_embed(v1), m2, torch.diag_embed(v2))  # batched over 3 pairs
    expected = ((v1.sqrt() - v2.sqrt()) ** 2).sum(-1) + ((m1 - m2) ** 2).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # float32 as in training: still the closed form to float32 accuracy
    got32 = w2_squared(m1.float(), torch.diag_embed(v1.float()), m2.float(), torch.diag_embed(v2.float()))
    torch.testing.assert_close(got32, expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "case",
    ["identity", "identical_full", "identical_singular", "singular_vs_full", "zero"],
)
def test_w2_gradients_are_finite_for_identical_and_singular_covariances(case):
    d = 5
    s_a = {
        "identity": torch.eye(d),
        "identical_full": spd(d, 4, dtype=torch.float32),
        "identical_singular": spd(d, 5, rank=1, dtype=torch.float32),
        "singular_vs_full": spd(d, 6, rank=2, dtype=torch.float32),
        "zero": torch.zeros(d, d),
    }[case]
    s_b = spd(d, 7, dtype=torch.float32) if case == "singular_vs_full" else s_a.clone()
    m_a = torch.randn(d, requires_grad=True)
    m_b = m_a.detach().clone().requires_grad_(True)
    s_a, s_b = s_a.clone().requires_grad_(True), s_b.clone().requires_grad_(True)
    w2 = w2_squared(m_a, s_a, m_b, s_b)
    assert torch.isfinite(w2)
    w2.backward()
    for t in (m_a, m_b, s_a, s_b):
        assert t.grad is not None and torch.isfinite(t.grad).all(), case


def test_torch_eigh_backward_would_fail_where_psd_sqrt_does_not():
    # the reason for the custom backward: repeated eigenvalues (the identity) break eigh's gradient
    a = torch.eye(4, requires_grad=True)
    evals, evecs = torch.linalg.eigh(a)
    (evecs @ torch.diag(evals.sqrt()) @ evecs.T).sum().backward()
    assert not torch.isfinite(a.grad).all()
    b = torch.eye(4, requires_grad=True)
    psd_sqrt(b).sum().backward()
    assert torch.isfinite(b.grad).all()
    # d/dA tr(sqrt(A)) at A = I is I / 2; sum(sqrt(A)) gives 1/2 on every entry of the symmetric grad
    torch.testing.assert_close(b.grad, torch.full((4, 4), 0.5))


def test_psd_sqrt_is_a_square_root_with_correct_gradient():
    a = spd(4, 8)
    root = psd_sqrt(a)
    torch.testing.assert_close(root @ root, a)
    torch.testing.assert_close(root, root.T)
    x = spd(4, 9).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: psd_sqrt(m), (x,), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- moments, anchors, losses


def test_class_moments_match_a_per_class_loop_and_handle_zero_and_one_sample():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(11, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 2, 2, 2, 0, 2, 2, 3])  # class 1 absent, class 3 once
    means, covs, counts = class_moments(z, y, num_classes=4, eps=1e-3)
    assert counts.tolist() == [5, 0, 5, 1]
    eye = 1e-3 * torch.eye(3, dtype=torch.float64)
    for c in (0, 2):
        torch.testing.assert_close(means[c], z[y == c].mean(0))
        torch.testing.assert_close(covs[c], torch.cov(z[y == c].T) + eye)
    torch.testing.assert_close(means[1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(covs[1], eye)
    torch.testing.assert_close(means[3], z[10])
    torch.testing.assert_close(covs[3], eye)


def test_anchor_covariance_is_psd_and_samples_have_the_anchor_moments():
    torch.manual_seed(0)
    anchors = GaussianAnchors(num_classes=3, latent_dim=3, eps=1e-2)
    with torch.no_grad():
        anchors.scale.copy_(torch.randn(3, 3, 3))  # upper triangle is ignored
    cov = anchors.covariance()
    assert (torch.linalg.eigvalsh(cov) >= 1e-2 - 1e-5).all()
    z, labels = anchors.sample(20000, torch.Generator().manual_seed(0))
    assert z.shape == (60000, 3) and labels.tolist()[:2] == [0, 0] and labels[-1] == 2
    means, covs, _ = class_moments(z.detach(), labels, 3)
    torch.testing.assert_close(means, anchors.mean.detach(), atol=0.1, rtol=0)
    torch.testing.assert_close(covs, cov.detach(), atol=0.15, rtol=0.05)
    # reparameterised: gradients reach mean and the lower triangle of the scale
    z.pow(2).sum().backward()
    assert anchors.mean.grad.abs().sum() > 0 and torch.tril(anchors.scale.grad).abs().sum() > 0


def test_fit_loss_is_w2_to_anchors_over_classes_with_two_or_more_samples():
    torch.manual_seed(0)
    anchors = GaussianAnchors(num_classes=3, latent_dim=4, eps=1e-3)
    z = torch.randn(9, 4, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 0])  # class 2 once: left out
    loss = fit_loss(z, y, anchors)
    means, covs, _ = class_moments(z, y, 3, 1e-3)
    expected = w2_squared(means[:2], covs[:2], anchors.mean[:2], anchors.covariance()[:2]).mean()
    torch.testing.assert_close(loss, expected)
    moved = z.detach().clone()
    moved[7] += 10.0
    torch.testing.assert_close(fit_loss(moved, y, anchors), loss.detach())
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad[7].abs().sum() == 0
    # no class with two samples: zero, and backward still works
    lonely = fit_loss(z[:1], y[:1], anchors)
    assert lonely.item() == 0.0
    lonely.backward()


def test_fit_loss_decreases_when_anchors_are_fitted():
    torch.manual_seed(1)
    anchors = GaussianAnchors(num_classes=2, latent_dim=3, eps=1e-4)
    z = torch.cat([torch.randn(32, 3) * 0.3 + 2, torch.randn(32, 3) * 0.5 - 2])
    y = torch.arange(2).repeat_interleave(32)
    opt = torch.optim.Adam(anchors.parameters(), lr=0.05)
    first = fit_loss(z, y, anchors).item()
    for _ in range(100):
        opt.zero_grad()
        loss = fit_loss(z, y, anchors)
        loss.backward()
        opt.step()
    assert fit_loss(z, y, anchors).item() < 0.05 * first


def _spread_anchors(spread: float, d: int = 4) -> GaussianAnchors:
    anchors = GaussianAnchors(num_classes=d, latent_dim=d, eps=1e-4)
    with torch.no_grad():
        anchors.mean.copy_(spread * torch.eye(d))
        anchors.scale.copy_(0.5 * torch.eye(d).repeat(d, 1, 1))
    return anchors


def test_classifier_separation_decreases_when_anchors_are_pushed_apart():
    head = nn.Linear(4, 4)
    with torch.no_grad():  # logits = z: the class whose axis the sample lies on wins
        head.weight.copy_(torch.eye(4))
        head.bias.zero_()
    losses = [
        separation_loss(_spread_anchors(k), "classifier", head, 64, generator=torch.Generator().manual_seed(0)).item()
        for k in (0.5, 1.0, 2.0, 4.0)
    ]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.2 * losses[0]
    # and a gradient step on the anchors lowers it
    anchors = _spread_anchors(0.5)
    loss = separation_loss(anchors, "classifier", head, 64, generator=torch.Generator().manual_seed(0))
    loss.backward()
    with torch.no_grad():
        anchors.mean -= 0.5 * anchors.mean.grad
    after = separation_loss(anchors, "classifier", head, 64, generator=torch.Generator().manual_seed(0))
    assert after.item() < loss.item()


def test_w2_margin_separation_decreases_when_anchors_are_pushed_apart():
    losses = [separation_loss(_spread_anchors(k), "w2_margin", margin=3.0).item() for k in (0.0, 0.5, 1.0, 1.5, 2.5)]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1]
    assert losses[-1] == 0.0  # every pair is sqrt(2) * 2.5 > 3 apart
    assert losses[0] == pytest.approx(9.0, abs=1e-4)  # coinciding anchors: margin^2
    anchors = _spread_anchors(0.5)
    loss = separation_loss(anchors, "w2_margin", margin=3.0)
    loss.backward()
    assert torch.isfinite(anchors.mean.grad).all() and torch.isfinite(anchors.scale.grad).all()
    with torch.no_grad():
        anchors.mean -= 0.5 * anchors.mean.grad
    assert separation_loss(anchors, "w2_margin", margin=3.0).item() < loss.item()
    # coinciding anchors still give finite gradients (the squared hinge has no sqrt)
    same = _spread_anchors(0.0)
    separation_loss(same, "w2_margin", margin=3.0).backward()
    assert torch.isfinite(same.scale.grad).all()


def test_anchor_losses_and_head():
    with pytest.raises(ValueError, match="sep_method"):
        separation_loss(_spread_anchors(1.0), "nearest")
    assert isinstance(build_head(8, 3, 0), nn.Linear)
    mlp = build_head(8, 3, 16, dropout=0.1)
    assert mlp(torch.randn(5, 8)).shape == (5, 3) and len([m for m in mlp if isinstance(m, nn.Linear)]) == 2
    torch.manual_seed(0)
    anchors = GaussianAnchors(3, 8)
    parts = anchor_losses(torch.randn(12, 8), torch.arange(3).repeat(4), anchors, mlp, sep_samples_per_class=4)
    assert set(parts) == {"fit", "sep"} and all(torch.isfinite(v) for v in parts.values())


# ---------------------------------------------------------------- GroupDRO


def test_group_mean_losses_match_a_loop_and_absent_groups_are_zero_without_nan():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    groups = torch.tensor([0, 2, 0, 2, 2])
    means, counts = group_mean_losses(losses, groups, 3)
    torch.testing.assert_close(means, torch.tensor([2.0, 0.0, 11.0 / 3]))
    assert counts.tolist() == [2, 0, 3]
    means.sum().backward()
    torch.testing.assert_close(losses.grad, torch.tensor([0.5, 1 / 3, 0.5, 1 / 3, 1 / 3]))


def _hand_update(q, signal, present, eta):
    """q_g * exp(eta * signal_g) over present groups, renormalised to the present groups' own mass."""
    w = {g: q[g] * math.exp(eta * signal[g]) for g in present}
    mass = sum(q[g] for g in present)
    total = sum(w.values())
    return [w[g] / total * mass if g in present else q[g] for g in range(len(q))]


STEP1 = (torch.tensor([1.0, 2.0, 0.5]), torch.tensor([4, 2, 2]))
STEP2 = (torch.tensor([0.2, 1.0, 3.0]), torch.tensor([1, 3, 0]))  # group 2 absent: its 3.0 must be ignored


def test_groupdro_plain_update_matches_hand_computation_with_an_absent_group():
    dro = GroupDRO(3, eta=0.1, update_mode="plain")
    torch.testing.assert_close(dro.q, torch.full((3,), 1 / 3, dtype=torch.float64))
    obj1 = dro.step(*STEP1)
    q1 = _hand_update([1 / 3] * 3, [1.0, 2.0, 0.5], {0, 1, 2}, 0.1)
    torch.testing.assert_close(dro.q, torch.tensor(q1, dtype=torch.float64))
    assert float(obj1) == pytest.approx(q1[0] * 1.0 + q1[1] * 2.0 + q1[2] * 0.5, rel=1e-6)
    obj2 = dro.step(*STEP2)
    q2 = _hand_update(q1, [0.2, 1.0, None], {0, 1}, 0.1)
    torch.testing.assert_close(dro.q, torch.tensor(q2, dtype=torch.float64))
    assert dro.q[2] == q1[2] and float(dro.q.sum()) == pytest.approx(1.0)
    assert float(obj2) == pytest.approx(q2[0] * 0.2 + q2[1] * 1.0, rel=1e-6)


def test_groupdro_smoothed_and_adjusted_update_matches_hand_computation():
    eta, gamma = 0.5, 0.8  # not 0.5: a swapped gamma / (1 - gamma) would go unnoticed
    dro = GroupDRO(3, eta=eta, gamma=gamma, update_mode="exp_smooth", adjustment=1.0, group_sizes=[100, 25, 4])
    adj = [1 / 10, 1 / 5, 1 / 2]
    dro.step(*STEP1)
    avg = [1.0, 2.0, 0.5]  # the first observation initialises the average
    q1 = _hand_update([1 / 3] * 3, [a + c for a, c in zip(avg, adj)], {0, 1, 2}, eta)
    torch.testing.assert_close(dro.q, torch.tensor(q1, dtype=torch.float64))
    obj2 = dro.step(*STEP2)
    avg = [gamma * 1.0 + (1 - gamma) * 0.2, gamma * 2.0 + (1 - gamma) * 1.0, 0.5]
    torch.testing.assert_close(dro.avg_loss, torch.tensor(avg, dtype=torch.float64))
    q2 = _hand_update(q1, [a + c for a, c in zip(avg, adj)], {0, 1}, eta)
    torch.testing.assert_close(dro.q, torch.tensor(q2, dtype=torch.float64))
    # the objective uses this batch's raw losses, not the smoothed or adjusted ones
    assert float(obj2) == pytest.approx(q2[0] * 0.2 + q2[1] * 1.0, rel=1e-6)


def test_groupdro_smoothing_starts_a_group_when_it_first_appears():
    dro = GroupDRO(2, eta=1.0, gamma=0.9, update_mode="exp_smooth")
    dro.step(torch.tensor([1.0, 7.0]), torch.tensor([3, 0]))
    assert dro.avg_loss.tolist() == [1.0, 0.0] and dro.q[1] == 0.5
    dro.step(torch.tensor([1.0, 2.0]), torch.tensor([3, 1]))
    assert dro.avg_loss.tolist() == pytest.approx([1.0, 2.0])
    q = _hand_update([0.5, 0.5], [1.0, 2.0], {0, 1}, 1.0)
    torch.testing.assert_close(dro.q, torch.tensor(q, dtype=torch.float64))


def test_groupdro_warmup_is_erm_then_reweights():
    dro = GroupDRO(3, eta=0.1, update_mode="plain", warmup_epochs=2)
    losses = torch.tensor([1.0, 2.0, 0.5, 4.0, 0.0, 1.5], requires_grad=True)
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    for epoch in (0, 1):
        dro.set_epoch(epoch)
        assert dro.in_warmup
        obj = dro.step(*group_mean_losses(losses, groups, 3))
        torch.testing.assert_close(obj, losses.mean())  # plain ERM: the per-sample mean
        torch.testing.assert_close(dro.q, torch.full((3,), 1 / 3, dtype=torch.float64))
    obj.backward()
    torch.testing.assert_close(losses.grad, torch.full((6,), 1 / 6))
    dro.set_epoch(2)
    assert not dro.in_warmup
    dro.step(*STEP1)
    assert dro.q[1] > dro.q[0] > dro.q[2]
    erm = GroupDRO(3, enabled=False)
    erm.set_epoch(100)
    assert erm.in_warmup
    torch.testing.assert_close(erm.step(*STEP1), torch.tensor((4 * 1.0 + 2 * 2.0 + 2 * 0.5) / 8))


def test_groupdro_max_objective_ignores_absent_groups_and_the_gradient_goes_to_the_worst():
    dro = GroupDRO(3, objective="max")
    loss = torch.tensor([0.2, 1.0, 3.0], requires_grad=True)
    obj = dro.step(loss, torch.tensor([1, 3, 0]))
    assert obj.item() == pytest.approx(1.0)
    obj.backward()
    assert loss.grad.tolist() == [0.0, 1.0, 0.0]
    empty = dro.step(torch.zeros(3, requires_grad=True), torch.zeros(3, dtype=torch.long))
    assert empty.item() == 0.0 and torch.isfinite(dro.q).all()


def test_groupdro_no_nan_with_huge_eta_and_an_empty_batch():
    dro = GroupDRO(3, eta=1000.0, update_mode="plain")
    dro.step(torch.tensor([10.0, 1.0, 0.0]), torch.tensor([1, 1, 1]))
    before = dro.q.clone()
    assert torch.isfinite(before).all() and float(before.sum()) == pytest.approx(1.0)
    obj = dro.step(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    assert torch.equal(dro.q, before) and float(obj) == 0.0


def test_groupdro_state_dict_resumes_exactly():
    a = GroupDRO(3, eta=0.3, gamma=0.8, warmup_epochs=1)
    a.set_epoch(1)
    a.step(*STEP1)
    state = a.state_dict()
    b = GroupDRO(3, eta=0.3, gamma=0.8, warmup_epochs=1)
    b.load_state_dict(state)
    assert b.epoch == 1 and not b.in_warmup
    a.step(*STEP2)
    b.step(*STEP2)
    assert torch.equal(a.q, b.q) and torch.equal(a.avg_loss, b.avg_loss)
    assert a.log_values(["image", "text", "both"]) == {f"q/{n}": v for n, v in zip(["image", "text", "both"], a.q.tolist())}
    with pytest.raises(ValueError, match="groups"):
        GroupDRO(2).load_state_dict(state)
    with pytest.raises(ValueError, match="group_sizes"):
        GroupDRO(3, adjustment=1.0)
    with pytest.raises(ValueError, match="update_mode"):
        GroupDRO(3, update_mode="ema")


# ---------------------------------------------------------------- encoders


def images(b: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def char_ids(b: int = 4, length: int = MAX_LEN, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, length), generator=g)
    for i in range(b):
        ids[i, (i * 5 + 3) :] = 0  # different lengths; row 0 has 3 characters
    ids[-1] = 0  # an all-padding text
    return ids


def build(spec: dict, dropout: float = 0.0, **kw):
    return build_encoder(spec, LATENT, dropout, vocab_size=VOCAB, max_len=MAX_LEN, **kw)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "small_cnn"])
def test_visual_encoders_map_uint8_and_float_images_to_the_latent(arch):
    torch.manual_seed(0)
    enc = build({"name": "image", "modality": "visual", "encoder": arch, "weights": "none"}).eval()
    x = images()
    z = enc(x)
    assert z.shape == (3, LATENT) and torch.isfinite(z).all()
    torch.testing.assert_close(enc(x.float() / 255), z)  # float images in [0, 1] mean the same thing
    torch.manual_seed(0)
    cl = build({"name": "image", "modality": "visual", "encoder": arch}, channels_last=True).eval()
    assert cl.channels_last
    torch.testing.assert_close(cl(x), z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mlp_text", "char_cnn_text", "transformer_text"])
def test_text_encoders_map_char_ids_to_the_latent_and_ignore_padding(name):
    torch.manual_seed(0)
    enc = build({"name": "ocr", "modality": "text", "encoder": name}, dropout=0.1).eval()
    ids = char_ids()
    z = enc(ids)
    assert z.shape == (4, LATENT) and torch.isfinite(z).all()
    shorter = ids[:3, :18]  # the same texts with less trailing padding (the longest has 13 characters)
    assert (ids[:3, 18:] == 0).all()
    torch.testing.assert_close(enc(shorter), z[:3], rtol=1e-5, atol=1e-5)
    enc.train()  # dropout is active in training only
    assert not torch.equal(enc(ids), enc(ids))


def test_mlp_text_reads_character_frequencies():
    torch.manual_seed(0)
    enc = build({"name": "ocr", "modality": "text", "encoder": "mlp_text"}).eval()
    once = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0]])
    twice = torch.tensor([[7, 6, 5, 5, 6, 7, 0, 0]])  # the same bag, repeated and reordered
    other = torch.tensor([[5, 5, 5, 6, 7, 0, 0, 0]])
    torch.testing.assert_close(enc(twice), enc(once))
    assert not torch.allclose(enc(other), enc(once))


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_combined_encoder_fuses_both_latents(fusion):
    torch.manual_seed(0)
    spec = {"name": "both", "modality": "combined", "fusion": fusion, "visual": "small_cnn",
            "text": {"encoder": "char_cnn_text", "channels": 16}}
    enc = build(spec).eval()
    assert isinstance(enc, CombinedEncoder)
    x, ids = images(4), char_ids()
    z = enc((x, ids))
    assert z.shape == (4, LATENT)
    torch.testing.assert_close(enc({"image": x, "text": ids}), z)
    if fusion == "sum":
        torch.testing.assert_close(z, enc.visual(x) + enc.text(ids))
    else:
        assert enc.fuse.in_features == 2 * LATENT


def test_backbone_and_new_parameters_partition_the_model_and_feed_two_lr_groups():
    torch.manual_seed(0)
    model = nn.Module()
    model.encoders = nn.ModuleList([
        build({"name": "image", "modality": "visual", "encoder": "resnet18"}),
        build({"name": "text", "modality": "text", "encoder": "transformer_text"}),
        build({"name": "both", "modality": "combined", "visual": "resnet18", "text": "mlp_text"}),
        build({"name": "small", "modality": "visual", "encoder": "small_cnn"}),
    ])
    model.head = build_head(LATENT, 10, 32)
    model.anchors = GaussianAnchors(10, LATENT)
    split = split_parameters(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(split["backbone"] + split["new"]) == sorted(names)
    assert not set(split["backbone"]) & set(split["new"])
    assert backbone_prefixes(model) == ["encoders.0.trunk", "encoders.2.visual.trunk"]
    assert all(n.startswith(("encoders.0.trunk.", "encoders.2.visual.trunk.")) for n in split["backbone"])
    assert "encoders.0.trunk.conv1.weight" in split["backbone"]
    assert {"encoders.0.project.1.weight", "anchors.mean", "head.0.weight", "encoders.3.trunk.0.weight",
            "encoders.2.fuse.weight"} <= set(split["new"])
    model.encoders[1].embed.weight.requires_grad_(False)
    groups = parameter_groups(model, lr_backbone=1e-4, lr_new=1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", 1e-4), ("new", 1e-3)]
    assert sum(len(g["params"]) for g in groups) == len(names) - 1
    torch.optim.Adam(groups)  # a valid optimizer spec


def test_imagenet_weights_raise_a_clear_error():
    with pytest.raises(ValueError, match=r"(?s)nothing can be downloaded.*path"):
        build({"name": "image", "modality": "visual", "encoder": "resnet18", "weights": "imagenet"})
    with pytest.raises(ValueError, match="small_cnn has no ImageNet"):
        build({"name": "image", "modality": "visual", "encoder": "small_cnn", "weights": "imagenet"})


def test_weights_load_from_a_saved_state_dict(tmp_path):
    torch.manual_seed(123)
    reference = torchvision.models.resnet18(weights=None)  # a full torchvision state dict, fc included
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    torch.manual_seed(0)
    enc = build({"name": "image", "modality": "visual", "encoder": "resnet18", "weights": str(path)})
    for name, tensor in enc.trunk.state_dict().items():
        torch.testing.assert_close(tensor, reference.state_dict()[name])
    # a checkpoint that wraps the state dict, and small_cnn trunks (then counted as backbone)
    small = build({"name": "s", "modality": "visual", "encoder": "small_cnn", "width": 8})
    assert small.backbone_module_names() == []
    torch.save({"state_dict": small.trunk.state_dict()}, tmp_path / "small.pt")
    loaded = build({"name": "s", "modality": "visual", "encoder": "small_cnn", "width": 8, "weights": str(tmp_path / "small.pt")})
    assert loaded.backbone_module_names() == ["trunk"]
    torch.testing.assert_close(loaded.trunk[0].weight, small.trunk[0].weight)
    with pytest.raises(ValueError, match="does not fit a resnet34"):
        build({"name": "image", "modality": "visual", "encoder": "resnet34", "weights": str(path)})
    with pytest.raises(FileNotFoundError, match="neither"):
        build({"name": "image", "modality": "visual", "encoder": "resnet18", "weights": str(tmp_path / "nope.pt")})


def test_build_encoder_rejects_bad_specs():
    with pytest.raises(ValueError, match="modality"):
        build({"name": "x", "modality": "audio", "encoder": "resnet18"})
    with pytest.raises(ValueError, match="encoder"):
        build({"name": "x", "modality": "text", "encoder": "resnet18"})
    with pytest.raises(ValueError, match="unknown keys"):
        build({"name": "x", "modality": "text", "encoder": "mlp_text", "hiden": 3})
    with pytest.raises(ValueError, match="vocab_size"):
        build_encoder({"name": "x", "modality": "text", "encoder": "mlp_text"}, LATENT)
    with pytest.raises(ValueError, match="text encoder spec"):
        build({"name": "x", "modality": "combined", "visual": "small_cnn"})
    with pytest.raises(ValueError, match="fusion"):
        build({"name": "x", "modality": "combined", "visual": "small_cnn", "text": "mlp_text", "fusion": "max"})


def test_encoders_are_deterministic_for_a_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        enc = build({"name": "t", "modality": "text", "encoder": "transformer_text"}, dropout=0.2)
        outs.append(enc(char_ids()))  # training mode: dropout draws from the seeded RNG too
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_pieces_compose_under_bf16_autocast_with_finite_gradients():
    torch.manual_seed(0)
    enc = build({"name": "both", "modality": "combined", "visual": "small_cnn", "text": "transformer_text"},
                dropout=0.1, channels_last=True)
    head, anchors, dro = build_head(LATENT, 4, 32), GaussianAnchors(4, LATENT), GroupDRO(2)
    y, groups = torch.arange(4).repeat(2), torch.tensor([0, 1] * 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = enc((images(8), char_ids(8)))
        ce = nn.functional.cross_entropy(head(z).float(), y, reduction="none")
        parts = anchor_losses(z, y, anchors, head, sep_samples_per_class=4)
        total = dro.step(*group_mean_losses(ce, groups, 2)) + 1e-3 * parts["fit"] + 1e-3 * parts["sep"]
    assert z.dtype == torch.bfloat16 and parts["fit"].dtype == torch.float32  # W2 itself runs in float32
    total.backward()
    params = [*enc.parameters(), *head.parameters(), *anchors.parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params if p.requires_grad)
