"""Bench entry `pez`: PEZ steps/s of tunewise's optimize_prompt against a reference-style loop, same result.

The reference-style loop (`reference_loop`) does each step's work the way optim_utils.py of
YuxinWenRick/hard-prompts-made-easy does it (open_clip 3.x is batch-first, so its permutes are gone):
- nn_project: normalises the soft prompt AND the whole 49,408-row embedding matrix, dot product, top-1 per
  row handed back through Python lists (what sentence_transformers' semantic_search returns), embedding
  lookup of the ids;
- a no_grad forward of the projected candidates padded to the full context length, scored against all
  targets (target features normalised again inside forward_text_embedding);
- a second forward of the same projected candidates with grad, against the step's targets, loss
  1 - mean cosine, the gradient at the hard embeddings copied to the soft prompt, AdamW step;
- decodes every candidate's ids each step and keeps the best decoded prompt.
All candidates (prompt_bs) go through one forward in both, as in the reference.

Kept equal so that both reach the same prompt: the seeded generator draws the initial ids and the target
subsets in the same order; the model is frozen in both (requires_grad False) and in eval mode; the reference
starts its best similarity at 0, this loop at -inf (a negative best would otherwise return ""), which costs
nothing. Nothing is excluded from the projection (the reference draws from all 49,408 ids).

What tunewise does differently (see pez.py's docstring): the normalised matrix, target features and the
SOT/EOT part of the input are computed once; one forward per step serves loss and scoring; the sequence
stops after EOT (causal mask) instead of padding to the context length; decoding happens on improvement only;
where a bf16 GEMM times faster (this CPU has AVX512-BF16), the projection shortlists rows with it and picks
among them in fp32 with a proof that no other row is closer (else fp32 for that query): the same ids.

Measured with 1 thread (the machine is shared; both loops alternate, median of 3): the projection GEMM
(queries x 49,408 rows) is most of a step in both loops, so it bounds the ratio.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))

from table import row  # noqa: E402

CAPTIONS = ["a small red circle above a blue square", "three green triangles", "a large yellow star",
            "a purple square left of an orange circle"]
CONFIG = {"iter": 300, "prompt_len": 8, "prompt_bs": 4, "batch_size": None, "lr": 0.1, "weight_decay": 0.1,
          "exclude_special": False, "seed": 0}
BENCH_MODEL = "tunewise-pez-bench"


def bench_model(seed: int = 0):
    """The embedded tiny CLIP's architecture (randomly initialised: speed does not depend on the weights)."""
    import open_clip
    import torch

    try:
        from tunewise.trainers.pez.clip import TINY_CLIP_CONFIG as config
    except ImportError:  # the same numbers, should clip.py move
        config = {"embed_dim": 128,
                  "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "head_width": 32, "layers": 3},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}}
    path = Path(tempfile.mkdtemp()) / f"{BENCH_MODEL}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    model = open_clip.create_model(BENCH_MODEL, pretrained=None).eval()
    return model, open_clip.get_tokenizer(BENCH_MODEL)


# --- the reference's per-step work ------------------------------------------------------------------


def _nn_project(curr_embeds, embedding_layer):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        bsz, seq_len, emb_dim = curr_embeds.shape
        curr_embeds = F.normalize(curr_embeds.reshape((-1, emb_dim)), p=2, dim=1)
        embedding_matrix = F.normalize(embedding_layer.weight, p=2, dim=1)
        scores = torch.mm(curr_embeds, embedding_matrix.transpose(0, 1))
        top_scores, top_idx = torch.topk(scores, 1, dim=1, largest=True, sorted=False)
        # semantic_search returns [[{"corpus_id", "score"}]] per query, sorted by score
        hits = [[{"corpus_id": i[0], "score": s[0]}] for i, s in zip(top_idx.cpu().tolist(), top_scores.cpu().tolist())]
        hits = [sorted(h, key=lambda x: x["score"], reverse=True) for h in hits]
        nn_indices = torch.tensor([h[0]["corpus_id"] for h in hits], device=curr_embeds.device).reshape((bsz, seq_len))
        projected_embeds = embedding_layer(nn_indices)
    return projected_embeds, nn_indices


def _encode_text_embedding(model, text_embedding, ids):
    import torch

    cast_dtype = model.transformer.get_cast_dtype()
    x = text_embedding + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ model.text_projection


def _forward_text_embedding(model, embeddings, ids, image_features):
    text_features = _encode_text_embedding(model, embeddings, ids)
    image_features = image_features / image_features.norm(dim=1, keepdim=True)
    text_features = text_features / text_features.norm(dim=1, keepdim=True)
    logits_per_image = image_features @ text_features.t()
    return logits_per_image, logits_per_image.t()


def reference_loop(model, tokenizer, all_target_features, cfg: dict) -> dict:
    import torch

    g = torch.Generator().manual_seed(cfg["seed"])
    token_embedding = model.token_embedding
    prompt_len, prompt_bs, batch_size = cfg["prompt_len"], cfg["prompt_bs"], cfg["batch_size"]
    ctx = model.positional_embedding.shape[0]

    prompt_ids = torch.randint(len(tokenizer.encoder), (prompt_bs, prompt_len), generator=g)
    prompt_embeds = token_embedding(prompt_ids).detach()
    prompt_embeds.requires_grad = True
    dummy_ids = tokenizer.encode(" ".join(["<start_of_text>"] * prompt_len))
    dummy_ids = [i if i != 49406 else -1 for i in dummy_ids]
    dummy_ids = [49406] + dummy_ids + [49407]
    dummy_ids += [0] * (ctx - len(dummy_ids))
    dummy_ids = torch.tensor([dummy_ids] * prompt_bs)
    tmp_dummy_ids = dummy_ids.clone()
    tmp_dummy_ids[tmp_dummy_ids == -1] = 0
    dummy_embeds = token_embedding(tmp_dummy_ids).detach()

    opt = torch.optim.AdamW([prompt_embeds], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    n = len(all_target_features)
    best_sim, best_text = -float("inf"), ""
    p_dim = prompt_embeds.shape[-1]
    t0 = time.perf_counter()
    for step in range(cfg["iter"]):
        if batch_size is None or batch_size >= n:
            target_features = all_target_features
        else:
            target_features = all_target_features[torch.randperm(n, generator=g)][0:batch_size]
        projected_embeds, nn_indices = _nn_project(prompt_embeds, token_embedding)
        with torch.no_grad():
            padded_embeds = dummy_embeds.detach().clone()
            padded_embeds[dummy_ids == -1] = projected_embeds.reshape(-1, p_dim)
            logits_per_image, _ = _forward_text_embedding(model, padded_embeds, dummy_ids, all_target_features)
            scores_per_prompt = logits_per_image.mean(dim=0)
            universal_cosim_score = scores_per_prompt.max().item()
            best_indx = scores_per_prompt.argmax().item()
        tmp_embeds = prompt_embeds.detach().clone()
        tmp_embeds.data = projected_embeds.data
        tmp_embeds.requires_grad = True
        padded_embeds = dummy_embeds.detach().clone()
        padded_embeds[dummy_ids == -1] = tmp_embeds.reshape(-1, p_dim)
        logits_per_image, _ = _forward_text_embedding(model, padded_embeds, dummy_ids, target_features)
        loss = 1 - logits_per_image.mean()
        prompt_embeds.grad, = torch.autograd.grad(loss, [tmp_embeds])
        opt.step()
        opt.zero_grad()
        decoded_text = [tokenizer.decode(ids) for ids in nn_indices.detach().cpu().numpy()][best_indx]
        if best_sim < universal_cosim_score:
            best_sim, best_text = universal_cosim_score, decoded_text
    seconds = time.perf_counter() - t0
    return {"prompt": best_text.strip(), "similarity": best_sim, "seconds": seconds, "steps_per_s": cfg["iter"] / seconds}


def tunewise_loop(model, tokenizer, all_target_features, cfg: dict) -> dict:
    from tunewise.trainers.pez.pez import optimize_prompt

    t0 = time.perf_counter()
    res = optimize_prompt(model, tokenizer, all_target_features, cfg, progress=False)
    seconds = time.perf_counter() - t0  # all of it: vocabulary normalisation, decoding, bookkeeping
    return {"prompt": res.prompt, "similarity": res.similarity, "seconds": seconds, "steps_per_s": res.steps / seconds}


def compare(model=None, tokenizer=None, cfg: dict | None = None, repeats: int = 3, threads: int = 1) -> dict:
    """Both loops `repeats` times, alternating (another job on the machine slows both alike); median steps/s.
    Asserts that both find the same best prompt and similarity."""
    import torch

    torch.set_num_threads(threads)
    if model is None:
        model, tokenizer = bench_model()
    cfg = dict(CONFIG, **(cfg or {}))
    for p in model.parameters():  # as optimize_prompt does: the reference-style loop gets no weight gradients either
        p.requires_grad_(False)
    # raw (unnormalised) features: the reference normalises them itself, optimize_prompt once
    with torch.no_grad():
        raw = model.encode_text(tokenizer(CAPTIONS, context_length=model.positional_embedding.shape[0]))
    ours, ref = [], []
    for _ in range(repeats):
        ref.append(reference_loop(model, tokenizer, raw, cfg))
        ours.append(tunewise_loop(model, tokenizer, raw, cfg))
    a, b = ours[0], ref[0]
    assert a["prompt"] == b["prompt"], f"different best prompts: {a['prompt']!r} vs reference {b['prompt']!r}"
    assert abs(a["similarity"] - b["similarity"]) < 1e-4, (a["similarity"], b["similarity"])
    return {"ours_steps_per_s": statistics.median(r["steps_per_s"] for r in ours),
            "reference_steps_per_s": statistics.median(r["steps_per_s"] for r in ref),
            "prompt": a["prompt"], "similarity": a["similarity"], "reference_similarity": b["similarity"],
            "iter": cfg["iter"], "prompt_len": cfg["prompt_len"], "prompt_bs": cfg["prompt_bs"], "threads": threads}


def profile_step(model=None, tokenizer=None, cfg: dict | None = None, repeats: int = 40, threads: int = 1) -> dict:
    """Milliseconds per call of each part of one step, reference-style vs tunewise: where the time goes."""
    import torch

    from tunewise.trainers.pez import pez

    torch.set_num_threads(threads)
    if model is None:
        model, tokenizer = bench_model()
    cfg = dict(CONFIG, **(cfg or {}))
    model.requires_grad_(False)
    tower = pez.text_tower(model)
    vocab = pez.Vocabulary(tower.token_embedding, tokenizer, exclude_special=False)
    ctx = tower.context_length
    short = pez._Template(tower, tokenizer, cfg["prompt_len"], True, torch.device("cpu"), torch.float32)
    full = pez._Template(tower, tokenizer, cfg["prompt_len"], False, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    soft = model.token_embedding.weight[vocab.sample((cfg["prompt_bs"], cfg["prompt_len"]), g)] * 3
    with torch.no_grad():
        targets = model.encode_text(tokenizer(CAPTIONS, context_length=ctx))
    ids, hard = vocab.project(soft)
    pos = torch.full((cfg["prompt_bs"],), cfg["prompt_len"] + 1)
    full_ids = full.full_ids(ids)

    def fwd_bwd(template, grad=True):
        h = hard.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            f = pez._encode_inputs(tower, template.inputs(h), pos)
            cos = targets @ (f / f.norm(dim=1, keepdim=True)).t()
            if grad:
                torch.autograd.grad(1 - cos.mean(), [h])

    parts = {
        "projection, tunewise (cached matrix, bf16 shortlist where faster)": lambda: vocab.project(soft),
        "projection, reference (normalise matrix, top-1 via lists)": lambda: _nn_project(soft, model.token_embedding),
        "  of which: normalising the embedding matrix": lambda: torch.nn.functional.normalize(
            model.token_embedding.weight, p=2, dim=1),
        "forward + backward, cut after EOT (tunewise)": lambda: fwd_bwd(short),
        "forward + backward, padded to context (reference)": lambda: fwd_bwd(full),
        "scoring forward, no_grad, padded (reference only)": lambda: fwd_bwd(full, grad=False),
        "decode every candidate (reference only)": lambda: [tokenizer.decode(i) for i in full_ids.numpy()],
    }
    out = {}
    for name, fn in parts.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - t0) / repeats * 1e3
    return out


def compare_batched(model=None, tokenizer=None, n_targets: int = 20, cfg: dict | None = None, repeats: int = 3,
                    threads: int = 1) -> dict:
    """The pez trainer's search: one prompt per target image, n_targets searches as one batch
    (optimize_prompts) against the same searches one after another (optimize_prompt, seed + g each).
    Asserts that every search finds the same prompt both ways; median wall seconds of each."""
    import torch

    from tunewise.trainers.pez.pez import optimize_prompt, optimize_prompts

    torch.set_num_threads(threads)
    if model is None:
        model, tokenizer = bench_model()
    cfg = dict(CONFIG, prompt_bs=1, iter=100, **(cfg or {}))
    g = torch.Generator().manual_seed(0)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with torch.no_grad():
        feats = torch.nn.functional.normalize(model.encode_image(torch.randn(n_targets, 3, size, size, generator=g)), dim=-1)
    batched, alone = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        many = optimize_prompts(model, tokenizer, feats, cfg, progress=False)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        one = [optimize_prompt(model, tokenizer, feats[i:i + 1], dict(cfg, seed=cfg["seed"] + i), progress=False)
               for i in range(n_targets)]
        alone.append(time.perf_counter() - t0)
    same = sum(a.prompt == b.prompt for a, b in zip(many, one))
    assert same == n_targets, f"{n_targets - same} of {n_targets} searches found another prompt when batched"
    return {"batched_s": statistics.median(batched), "sequential_s": statistics.median(alone), "n_targets": n_targets,
            "iter": cfg["iter"], "prompt_len": cfg["prompt_len"]}


def bench_pez() -> list[dict]:
    out = compare()
    ratio = out["ours_steps_per_s"] / out["reference_steps_per_s"]
    what = (f"PEZ steps/s, tiny CLIP, prompt_len {out['prompt_len']}, prompt_bs {out['prompt_bs']}, "
            f"{out['iter']} steps (same prompt: {out['prompt']!r})")
    rows = [row("pez", what, out["ours_steps_per_s"], out["reference_steps_per_s"], "steps/s", ">= 1.5x", ratio >= 1.5)]
    b = compare_batched()
    what = (f"one prompt per target image, {b['n_targets']} searches x {b['iter']} steps: sequential (optimize_prompt "
            f"each) / batched (optimize_prompts), same prompts")
    rows.append(row("pez", what, b["sequential_s"], b["batched_s"], "s", "-", None))
    return rows


if __name__ == "__main__":
    for name, ms in profile_step().items():
        print(f"{ms:7.2f} ms  {name}")
    res = compare()
    print(json.dumps(res, indent=2))
    print(f"ratio {res['ours_steps_per_s'] / res['reference_steps_per_s']:.2f}x")
