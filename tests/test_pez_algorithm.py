"""PEZ core (trainers/pez/pez.py) on a tiny randomly initialised open_clip model built offline."""
from __future__ import annotations

import json
import math

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from tunewise.trainers.pez.pez import (  # noqa: E402
    PezConfig,
    Vocabulary,
    encode_targets,
    encode_text_embeddings,
    optimize_prompt,
    pool_positions,
    random_prompt_similarity,
    text_similarity,
    text_tower,
    token_recovery,
)

NAME = "tunewise-pez-test"
CONFIG = {"embed_dim": 64,
          "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
CAPTION = "a small red circle above a blue square"
FAST = {"iter": 40, "prompt_len": 4, "prompt_bs": 2, "seed": 0}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / f"{NAME}.json"
    path.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, pretrained=None).eval()
    return model, open_clip.get_tokenizer(NAME)


def test_embedding_fed_forward_equals_encode_text(clip):
    model, tok = clip
    ids = tok([CAPTION, "three green triangles", ""], context_length=16)
    with torch.no_grad():
        fed = encode_text_embeddings(model, model.token_embedding(ids), pool_positions(text_tower(model), ids))
        ref = model.encode_text(ids)
    assert torch.allclose(fed, ref, atol=1e-5, rtol=1e-5)


def test_projection_returns_vocabulary_rows(clip):
    model, tok = clip
    vocab = Vocabulary(model.token_embedding, tok, exclude_special=False)
    soft = torch.randn(3, 5, model.token_embedding.weight.shape[1])
    ids, hard = vocab.project(soft)
    assert ids.shape == (3, 5) and ids.min() >= 0 and ids.max() < 49408
    assert torch.equal(hard, model.token_embedding.weight.detach()[ids])
    on_rows = model.token_embedding.weight.detach()[torch.tensor([[5, 400, 1234]])]
    assert vocab.project(on_rows)[0].tolist() == [[5, 400, 1234]]


def test_bf16_shortlist_projection_is_exact(clip):
    model, tok = clip
    w = model.token_embedding.weight.detach().clone()
    w[20] = w[10]  # an exact tie: argmax answers the lower id, so must the shortlist path
    fast = Vocabulary(w, tok, exclude_special=False, fast_projection=True)
    slow = Vocabulary(w, tok, exclude_special=False, fast_projection=False)
    g = torch.Generator().manual_seed(0)
    soft = torch.cat([torch.randn(8, 6, w.shape[1], generator=g), 3 * w[torch.randint(49408, (8, 6), generator=g)]])
    soft[0, 0] = w[10]
    assert torch.equal(fast.project(soft)[0], slow.project(soft)[0])
    assert fast.project(soft)[0][0, 0] == 10 and fast.redone >= 1


def test_blocked_tokens_never_projected(clip):
    model, tok = clip
    red = tok.encode("red")[0]
    red_start = tok.encoder["red"]  # 'red' without the word end: would let 'reddish' through
    vocab = Vocabulary(model.token_embedding, tok, blocklist=["red", 777])
    rows = model.token_embedding.weight.detach()[torch.tensor([[red, red_start, 777, red]])]
    ids, _ = vocab.project(rows)
    assert not set(ids.flatten().tolist()) & {red, red_start, 777}
    assert not vocab.allowed[[red, red_start, 777]].any()


def test_special_and_non_ascii_excluded_when_asked(clip):
    model, tok = clip
    w = model.token_embedding.weight.detach()
    sot, eot = tok.sot_token_id, tok.eot_token_id
    non_ascii = tok.encode("café")[-1]
    assert not all(0x21 <= b <= 0x7E for b in bytes(tok.byte_decoder[c] for c in tok.decoder[non_ascii].replace("</w>", "")))
    soft = w[torch.tensor([[sot, eot, non_ascii]])]
    assert Vocabulary(w, tok, exclude_special=False).project(soft)[0].tolist() == [[sot, eot, non_ascii]]
    strict = Vocabulary(w, tok, exclude_special=True, exclude_non_ascii=True)
    ids = strict.project(soft)[0].flatten().tolist()
    assert not set(ids) & {sot, eot, non_ascii}
    assert strict.allowed[0]  # id 0 is padding but also the real token "!"
    assert all(tok.decode([i]).strip().isascii() for i in strict.allowed_ids[::500].tolist())


def test_only_the_prompt_is_optimised(clip):
    model, tok = clip
    model.train()
    model.visual.requires_grad_(False)  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    try:
        res = optimize_prompt(model, tok, [CAPTION], FAST, progress=False)
        assert model.training
        assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert res.steps == FAST["iter"] and len(res.ids) == FAST["prompt_len"]
    finally:
        model.requires_grad_(True)
        model.eval()


def test_best_is_monotone_and_beats_random_prompts(clip):
    model, tok = clip
    res = optimize_prompt(model, tok, [CAPTION], dict(FAST, iter=60), progress=False)
    best = [r["best"] for r in res.history]
    assert all(b2 >= b1 for b1, b2 in zip(best, best[1:]))
    assert best[-1] == res.similarity and max(r["current"] for r in res.history) == res.similarity
    feats = encode_targets(model, tok, [CAPTION])
    baseline = random_prompt_similarity(model, tok, feats, FAST["prompt_len"], n=64)
    assert res.similarity > baseline["mean"] + 2 * baseline["std"] / math.sqrt(baseline["n"])
    assert res.similarity > baseline["mean"]
    # the decoded prompt, tokenised again, is scored as a user would get it
    assert res.text_similarity == pytest.approx(text_similarity(model, tok, [res.prompt], feats)[0], abs=1e-6)
    assert text_similarity(model, tok, [CAPTION], feats)[0] == pytest.approx(1.0, abs=1e-5)


def test_image_targets_and_minimisation(clip):
    model, tok = clip
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    low = optimize_prompt(model, tok, images, dict(FAST, loss_weight=-1.0, batch_size=2), progress=False)
    best = [r["best"] for r in low.history]
    assert all(b2 <= b1 for b1, b2 in zip(best, best[1:])) and low.similarity == min(r["current"] for r in low.history)


def test_restarts_keep_the_best(clip):
    model, tok = clip
    res = optimize_prompt(model, tok, [CAPTION], dict(FAST, restarts=3), progress=False)
    sims = [r["similarity"] for r in res.restarts]
    assert [r["seed"] for r in res.restarts] == [0, 1, 2]
    assert res.similarity == max(sims) and res.restart == sims.index(max(sims))
    single = optimize_prompt(model, tok, [CAPTION], dict(FAST, seed=1), progress=False)
    assert single.similarity == sims[1] and single.prompt == res.restarts[1]["prompt"]
    assert res.steps == 3 * FAST["iter"]


def test_patience_stops_early(clip):
    model, tok = clip
    rows = []
    res = optimize_prompt(model, tok, [CAPTION], dict(FAST, iter=2000, patience=3), progress=False,
                          callback=rows.append)
    assert res.stopped_early and res.steps < 2000 and rows == res.history
    last_best = max(i for i, r in enumerate(res.history) if i == 0 or r["best"] != res.history[i - 1]["best"])
    assert len(res.history) - 1 - last_best == 3


def test_min_delta_counts_only_gains_above_it(clip):
    model, tok = clip
    # no gain can exceed a cosine's range: after the first evaluation (from -inf) patience runs out at once
    res = optimize_prompt(model, tok, [CAPTION], dict(FAST, iter=2000, patience=3, min_delta=2.0), progress=False)
    assert res.stopped_early and len(res.history) == 4
    # the best prompt is still tracked on every gain, however small
    assert res.similarity == max(r["current"] for r in res.history)
    for bad in (-0.1, float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="min_delta"):
            PezConfig.of({"min_delta": bad})


def test_history_rows_carry_the_prompt_gradient_norm_and_token_change(clip):
    model, tok = clip
    res = optimize_prompt(model, tok, [CAPTION], FAST, progress=False)
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in res.history)
    assert all(0.0 <= r["token_change"] <= 1.0 for r in res.history) and any(r["token_change"] > 0 for r in res.history)


def test_config_errors(clip):
    model, tok = clip
    with pytest.raises(ValueError, match="context length"):
        optimize_prompt(model, tok, [CAPTION], dict(FAST, prompt_len=15), progress=False)
    with pytest.raises(ValueError, match="unknown PEZ option"):
        PezConfig.of({"iters": 3})


def test_token_recovery_by_hand():
    assert token_recovery("red circle blue square", CAPTION) == pytest.approx(4 / 6)
    assert token_recovery("a small red circle above a blue square", CAPTION) == 1.0
    assert token_recovery("RED, Circles!", "the red circle") == pytest.approx(1 / 2)
    assert token_recovery("anything", "") != token_recovery("anything", "")  # nan: no content word


def test_batched_searches_equal_separate_runs(clip):
    """optimize_prompts runs G searches as one batch; each finds what optimize_prompt finds alone with its seed."""
    from tunewise.trainers.pez.pez import optimize_prompts

    model, tok = clip
    targets = encode_targets(model, tok, [CAPTION, "three green triangles", "a large white cross"])
    cfg = dict(FAST, iter=30, seed=5)
    batched = optimize_prompts(model, tok, targets, cfg, progress=False)
    assert len(batched) == 3
    for g, res in enumerate(batched):
        alone = optimize_prompt(model, tok, targets[g:g + 1], dict(cfg, seed=5 + g), progress=False)
        assert res.prompt == alone.prompt and res.ids == alone.ids
        assert res.similarity == pytest.approx(alone.similarity, abs=1e-5)
        assert [r["best"] for r in res.history] == pytest.approx([r["best"] for r in alone.history], abs=1e-5)
        assert res.restarts[0]["seed"] == 5 + g


def test_batched_callback_reports_every_search(clip):
    from tunewise.trainers.pez.pez import optimize_prompts

    model, tok = clip
    targets = encode_targets(model, tok, [CAPTION, "three green triangles"])
    rows = []
    res = optimize_prompts(model, tok, targets, dict(FAST, iter=10, restarts=2), progress=False, callback=rows.append)
    assert len(rows) == 20 and {r["restart"] for r in rows} == {0, 1}
    assert all(len(r["best_each"]) == 2 and r["best"] == pytest.approx(sum(r["best_each"]) / 2) for r in rows)
    assert all(0.0 <= r["token_change"] <= 1.0 for r in rows)
    # restart r of search g starts from seed + r * G + g
    assert [r["seed"] for r in res[1].restarts] == [1, 3]
