"""PEZ (Wen et al. 2023, "Hard Prompts Made Easy"): discrete prompt search against an open_clip CLIP.

The algorithm is the reference's (`optim_utils.py` of YuxinWenRick/hard-prompts-made-easy, described in
reference/methods.md): a soft prompt P is projected onto its nearest vocabulary rows (cosine) each step, the
loss is computed at the projected (hard) embeddings and its gradient is applied to P (straight-through),
AdamW steps P, and the best projected prompt against all targets is kept.

What this implementation does differently, all of it exact up to floating-point rounding:
- the normalised embedding matrix, the target features and the fixed parts of the text input (SOT, EOT and
  their positional embeddings) are computed once, not every step;
- one text forward per step serves both the loss and the scoring of every candidate against all targets
  (the prompt's text features do not depend on which targets are sampled); the reference runs a second,
  no_grad forward of the same projected prompts to score them;
- under the causal mask the EOT output depends only on the positions before it, so the sequence is cut
  right after EOT (prompt_len + 2 positions) instead of being padded to the context length;
- the projection only searches the allowed rows (blocklist, special / non-ASCII tokens excluded).
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tunewise.devices import autocast

# ---------------------------------------------------------------------------------------------------------
# The text tower, fed token embeddings instead of ids


@dataclass(frozen=True)
class TextTower:
    """The parts of an open_clip text tower that PEZ feeds: CLIP keeps them on the model itself,
    CustomTextCLIP under `model.text` (a TextTransformer)."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any  # Parameter [width, dim], nn.Linear or None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None
    context_length: int


def text_tower(model: nn.Module) -> TextTower:
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "token_embedding"):
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            # CoCa-style towers append a CLS token and mask padding: not a plain EOT-pooled CLIP text tower
            raise ValueError("PEZ supports open_clip text towers without a CLS embedding or padding mask")
        src = text
        pool_type, eos_id = text.pool_type, text.eos_id
    elif hasattr(model, "token_embedding"):
        src = model
        pool_type, eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)
    else:
        raise ValueError(f"{type(model).__name__} has no open_clip text tower (token_embedding) to optimise against")
    if pool_type not in ("argmax", "eos", "first", "last"):
        raise ValueError(f"text pool type {pool_type!r} is not supported by PEZ")
    return TextTower(src.token_embedding, src.positional_embedding, src.transformer, src.ln_final,
                     src.text_projection, src.attn_mask, pool_type, eos_id, src.positional_embedding.shape[0])


def pool_positions(tower: TextTower, ids: torch.Tensor) -> torch.Tensor:
    """Where encode_text pools for these ids: the first maximal id ('argmax', the EOT of open_clip's tokenizer)
    or the first `eos_id` ('eos'); 'first'/'last' pool at a fixed place."""
    if tower.pool_type == "eos":
        return (ids == tower.eos_id).int().argmax(dim=-1)
    if tower.pool_type == "first":
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    if tower.pool_type == "last":
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    return ids.argmax(dim=-1)


def _encode_inputs(tower: TextTower, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x: token embeddings + positional embeddings [B, L, width] (open_clip 3.x is batch-first)."""
    length = x.shape[1]
    mask = tower.attn_mask
    if mask is not None:
        mask = mask[:length, :length].to(x.dtype)
    x = tower.transformer(x, attn_mask=mask)
    # LayerNorm works per position, so pooling first and normalising the pooled rows is the same computation
    x = x[torch.arange(x.shape[0], device=x.device), positions]
    x = tower.ln_final(x)
    proj = tower.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def encode_text_embeddings(model: nn.Module, embeddings: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
    """The text features of token embeddings [B, context_length, width] pooled at `eot_positions` [B]:
    equal to `model.encode_text(ids)` for embeddings = token_embedding(ids), eot_positions = pool_positions."""
    tower = text_tower(model)
    cast = tower.transformer.get_cast_dtype()
    length = embeddings.shape[1]
    x = embeddings.to(cast) + tower.positional_embedding[:length].to(cast)
    return _encode_inputs(tower, x, eot_positions)


# ---------------------------------------------------------------------------------------------------------
# The vocabulary: allowed rows and the nearest-neighbour projection


def _token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes a token stands for (None when the tokenizer does not know the id)."""
    decoder = getattr(tokenizer, "decoder", None)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    if isinstance(decoder, dict) and byte_decoder is not None:
        piece = decoder.get(token_id)
        if piece is None:
            return None
        piece = piece.replace("</w>", "")
        try:
            return bytes(byte_decoder[c] for c in piece)
        except KeyError:  # a special token such as <start_of_text>: plain ASCII text
            return piece.encode()
    try:
        return tokenizer.decode([token_id]).encode("utf-8", errors="replace")
    except Exception:
        return None


def _printable_ascii(raw: bytes | None) -> bool:
    # a token that is a partial UTF-8 sequence or a control byte is as unusable in a prompt as an accented one
    return raw is not None and len(raw) > 0 and all(0x21 <= b <= 0x7E for b in raw)


def _blocked_ids(tokenizer, blocklist: Iterable[int | str]) -> set[int]:
    """Ids of a blocklist of ids and words. A word blocks every token it is encoded into, and each of those
    both as a word end ('cat</w>') and as a word start ('cat', which would let 'cats' through)."""
    encoder = getattr(tokenizer, "encoder", None)
    decoder = getattr(tokenizer, "decoder", None)
    out: set[int] = set()
    for item in blocklist:
        if isinstance(item, int):
            out.add(item)
            continue
        ids = tokenizer.encode(str(item))
        if not ids:
            raise ValueError(f"blocklist entry {item!r} encodes to no tokens")
        out.update(ids)
        if isinstance(encoder, dict) and isinstance(decoder, dict):
            for i in ids:
                piece = decoder[i]
                twin = piece[:-4] if piece.endswith("</w>") else piece + "</w>"
                if twin in encoder:
                    out.add(encoder[twin])
    return out


_BF16_EPS = 2.0 ** -7 + 2.0 ** -8 * 1.01 + 1e-4  # see Vocabulary._nearest_bf16
_SHORTLIST = 32


class Vocabulary:
    """The token embedding matrix normalised once, restricted to the allowed rows, and the cosine
    nearest-neighbour projection of soft prompts onto it.

    Allowed = every row, minus the blocklist, minus the tokenizer's special tokens (SOT, EOT) when
    `exclude_special`, minus tokens that are not printable ASCII when `exclude_non_ascii`, and, when
    `only_ids` is given, nothing outside it (a tiny CLIP whose other rows were never trained).
    Id 0 is open_clip's padding id but also the real token "!", so it stays allowed unless blocked."""

    def __init__(self, token_embedding: nn.Embedding | torch.Tensor, tokenizer, blocklist: Iterable[int | str] = (),
                 exclude_special: bool = True, exclude_non_ascii: bool = False,
                 only_ids: Iterable[int] | None = None, fast_projection: bool | None = None):
        weight = token_embedding.weight if isinstance(token_embedding, nn.Embedding) else token_embedding
        self.weight = weight.detach()
        n = self.weight.shape[0]
        allowed = torch.ones(n, dtype=torch.bool)
        if only_ids is not None:
            allowed[:] = False
            allowed[torch.as_tensor(sorted(set(int(i) for i in only_ids)), dtype=torch.long)] = True
        blocked = _blocked_ids(tokenizer, blocklist)
        if exclude_special:
            blocked.update(int(i) for i in getattr(tokenizer, "all_special_ids", ()))
            for name in ("sot_token_id", "eot_token_id"):
                if getattr(tokenizer, name, None) is not None:
                    blocked.add(int(getattr(tokenizer, name)))
        blocked = {i for i in blocked if 0 <= i < n}
        if blocked:
            allowed[torch.as_tensor(sorted(blocked), dtype=torch.long)] = False
        if exclude_non_ascii:
            for i in allowed.nonzero().flatten().tolist():
                if not _printable_ascii(_token_bytes(tokenizer, i)):
                    allowed[i] = False
        if not allowed.any():
            raise ValueError("the blocklist and exclusions leave no token to project onto")
        self.allowed = allowed.to(self.weight.device)
        self.allowed_ids = allowed.nonzero().flatten().to(self.weight.device)
        self.all_allowed = bool(allowed.all())
        rows = self.weight if self.all_allowed else self.weight[self.allowed_ids]
        # normalised once, stored transposed and contiguous: [d, A] is the layout the per-step GEMM reads fastest
        normed = F.normalize(rows, p=2, dim=1)
        self.normed_t = normed.T.contiguous()
        self._scores: torch.Tensor | None = None
        self.redone = 0  # queries the bf16 path could not prove and projected in fp32 (a diagnostic)
        # Two-stage projection (bf16 shortlist, exact fp32 choice) where bf16 GEMMs are faster: see _nearest_bf16
        self._normed = normed if fast_projection is not False else None
        self._normed_t_bf16 = self.normed_t.bfloat16() if fast_projection is not False else None
        self.fast = bool(fast_projection) if fast_projection is not None else self._bf16_is_faster()
        if not self.fast:
            self._normed = self._normed_t_bf16 = None

    def __len__(self) -> int:
        return int(self.allowed_ids.numel())

    def _nearest_fp32(self, queries: torch.Tensor) -> torch.Tensor:
        # the [queries, vocabulary] scores are megabytes: reusing one buffer spares an allocation (and, on the
        # CPU, fresh pages to fault in) every step
        if self._scores is None or self._scores.shape[0] != queries.shape[0]:
            self._scores = torch.empty(queries.shape[0], self.normed_t.shape[1], dtype=queries.dtype,
                                       device=queries.device)
        return torch.mm(queries, self.normed_t, out=self._scores).argmax(dim=1)

    def _nearest_bf16(self, queries: torch.Tensor) -> torch.Tensor:
        """The same argmax as _nearest_fp32, from a bf16 GEMM, an exact look at a shortlist, and proof.

        For unit vectors a bf16 score differs from the exact one by at most _BF16_EPS (inputs rounded to 8
        significant bits: 2^-7 by Cauchy-Schwarz; the bf16 output: 2^-8; fp32 accumulation: under 1e-4).
        The SHORTLIST rows of highest bf16 score are scored exactly in fp32; a row outside has an exact score
        of at most (shortlist's lowest bf16 score + _BF16_EPS), so when the shortlist's exact best is above
        that, it is the best of the whole vocabulary. Queries without that proof take the fp32 path."""
        approx = torch.mm(queries.bfloat16(), self._normed_t_bf16)
        low, cand = approx.topk(min(_SHORTLIST, approx.shape[1]), dim=1, sorted=False)
        exact = torch.bmm(self._normed[cand], queries.unsqueeze(2)).squeeze(2)  # [Q, SHORTLIST]
        best, at = exact.max(dim=1)
        nearest = cand.gather(1, at.unsqueeze(1)).squeeze(1)
        unproven = best <= low.float().min(dim=1).values + _BF16_EPS
        # an exact tie inside the shortlist must go to the lowest id, as argmax does
        tied = (exact == best.unsqueeze(1)).sum(dim=1) > 1
        redo = (unproven | tied).nonzero().flatten()
        self.redone += int(redo.numel())
        if redo.numel():
            nearest[redo] = torch.mm(queries[redo], self.normed_t).argmax(dim=1)
        return nearest

    def _bf16_is_faster(self) -> bool:
        """bf16 GEMMs are fast on GPUs and CPUs with bf16 units (AVX512-BF16, AMX) and many times slower elsewhere
        (seen: 10x on a CPU without them): time one GEMM of each kind on a 4096-row slice of the matrix, so the
        probe costs little where bf16 is slow, and keep bf16 only when it wins clearly (the shortlist's exact
        check adds its own cost). Both paths give the same ids."""
        if self.normed_t.dtype != torch.float32 or self.normed_t.shape[1] < 4096:
            return False
        q = F.normalize(torch.randn(32, self.normed_t.shape[0], device=self.normed_t.device), dim=1)
        fp32, bf16, qb = self.normed_t[:, :4096], self._normed_t_bf16[:, :4096], q.bfloat16()

        def clock(fn) -> float:
            fn()
            if q.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            if q.is_cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        return clock(lambda: torch.mm(qb, bf16)) < 0.6 * clock(lambda: torch.mm(q, fp32))

    def sample(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Random allowed ids (drawn on the CPU so a seed gives the same prompt on every device)."""
        idx = torch.randint(len(self), tuple(shape), generator=generator)
        return self.allowed_ids[idx.to(self.allowed_ids.device)]

    @torch.no_grad()
    def project(self, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """soft [..., d] -> (ids [...], hard embeddings [..., d]): the allowed row of highest cosine."""
        shape = soft.shape[:-1]
        queries = F.normalize(soft.reshape(-1, soft.shape[-1]).to(self.normed_t.dtype), p=2, dim=1)
        nearest = self._nearest_bf16(queries) if self.fast else self._nearest_fp32(queries)
        ids = nearest if self.all_allowed else self.allowed_ids[nearest]
        ids = ids.reshape(shape)
        return ids, self.weight[ids]


# ---------------------------------------------------------------------------------------------------------
# Targets


@torch.no_grad()
def encode_targets(model: nn.Module, tokenizer, targets, device: torch.device | str = "cpu",
                    amp: Any = "auto", chunk: int = 256) -> torch.Tensor:
    """Normalised float32 features [N, dim] of the targets: texts (list of str: prompt distillation),
    preprocessed images [N, 3, H, W], or features already computed [N, dim]."""
    device = torch.device(device)
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, (list, tuple)) and targets and isinstance(targets[0], str):
        ctx = text_tower(model).context_length
        ids = tokenizer(list(targets), context_length=ctx) if _takes_context(tokenizer) else tokenizer(list(targets))
        encode, data = model.encode_text, ids
    else:
        data = torch.as_tensor(targets) if not isinstance(targets, torch.Tensor) else targets
        if data.dim() == 2:
            return F.normalize(data.detach().to(device=device, dtype=torch.float32), dim=-1)
        if data.dim() != 4:
            raise ValueError(f"targets must be texts, images [N, 3, H, W] or features [N, dim]; got shape {tuple(data.shape)}")
        encode = model.encode_image
    if len(data) == 0:
        raise ValueError("no targets")
    out = []
    with autocast(device, amp):
        for i in range(0, len(data), chunk):
            out.append(encode(data[i:i + chunk].to(device)).float())
    return F.normalize(torch.cat(out), dim=-1)


def _takes_context(tokenizer) -> bool:
    import inspect

    try:
        return "context_length" in inspect.signature(tokenizer.__call__).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------
# The optimisation


from tunewise.trainers.pez.options import PezConfig  # noqa: E402,F401  (re-exported: pez.py was its home)


@dataclass
class PezResult:
    prompt: str  # decoded best prompt
    ids: list[int]
    similarity: float  # mean cosine of the best prompt's ids to all targets
    text_similarity: float  # the same for the decoded text tokenised again (what a user who copies it gets)
    history: list[dict]  # per evaluation: restart, step, loss, current, best, grad_norm, token_change
    steps: int  # optimisation steps run, all restarts together
    stopped_early: bool  # some restart stopped on patience
    seconds: float
    steps_per_s: float
    restart: int  # which restart found the best
    restarts: list[dict]  # per restart: seed, prompt, similarity, steps, stopped_early

    def to_dict(self) -> dict:
        return asdict(self)


class _Template:
    """[SOT] + prompt + [EOT] (+ padding), embedded with positions once; a step only inserts the prompt."""

    def __init__(self, tower: TextTower, tokenizer, prompt_len: int, truncate: bool, device, dtype):
        ctx = tower.context_length
        if prompt_len > ctx - 2:
            raise ValueError(f"prompt_len {prompt_len} does not fit the context length {ctx} with SOT and EOT "
                             f"(at most {ctx - 2})")
        sot, eot = int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)
        self.length = prompt_len + 2 if truncate else ctx
        ids = torch.zeros(self.length, dtype=torch.long)
        ids[0], ids[prompt_len + 1] = sot, eot
        self.ids = ids.to(device)
        self.prompt_len = prompt_len
        pos = tower.positional_embedding.detach()[: self.length].to(device=device, dtype=dtype)
        with torch.no_grad():
            fixed = tower.token_embedding.weight.detach()[self.ids].to(dtype) + pos
        self.prefix = fixed[:1]
        self.suffix = fixed[prompt_len + 1:]
        self.prompt_pos = pos[1: prompt_len + 1]

    def inputs(self, hard: torch.Tensor) -> torch.Tensor:
        b = hard.shape[0]
        return torch.cat([self.prefix.expand(b, -1, -1), hard + self.prompt_pos, self.suffix.expand(b, -1, -1)], 1)

    def full_ids(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        ids = self.ids.expand(prompt_ids.shape[0], -1).clone()
        ids[:, 1: self.prompt_len + 1] = prompt_ids
        return ids


def _dynamic_pool(tower: TextTower, vocab: Vocabulary, template: _Template) -> bool:
    """Whether a prompt token can move the pooling position (an allowed EOT, or an id above it for argmax)."""
    if tower.pool_type in ("first", "last"):
        return False
    eot = int(template.ids[template.prompt_len + 1])
    if tower.pool_type == "eos":
        return bool(vocab.allowed[tower.eos_id]) if tower.eos_id is not None and tower.eos_id < len(vocab.allowed) else False
    return bool(vocab.allowed[eot:].any())


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """The model gets no gradient and leaves PEZ as it came: requires_grad and train/eval mode restored."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(training)


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids)).strip()


def _better(value: float, best: float, maximise: bool) -> bool:
    return value > best if maximise else value < best


def _run_once(tower: TextTower, vocab: Vocabulary, template: _Template, targets: torch.Tensor, cfg: PezConfig,
              seeds: Sequence[int], device: torch.device, restart: int, histories: list[list], callback,
              bar) -> list[dict]:
    """One restart of G independent searches run as one batch: targets [G, T, dim], search g drawn from seeds[g].

    The loss is the sum of the searches' own losses, so each search's soft prompt gets exactly its own gradient,
    and AdamW works element by element: a batch of G searches is G separate runs of the reference, one forward
    and backward per step for all of them."""
    n_groups, n = targets.shape[:2]
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    maximise = cfg.loss_weight > 0
    init_ids = torch.cat([vocab.sample((cfg.prompt_bs, cfg.prompt_len), g) for g in gens])  # [G * P, L]
    soft = vocab.weight[init_ids].detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([soft], lr=cfg.lr, weight_decay=cfg.weight_decay)
    dynamic = _dynamic_pool(tower, vocab, template)
    positions = pool_positions(tower, template.full_ids(init_ids.to(device)))
    sample = cfg.batch_size is not None and cfg.batch_size < n
    subsets = gens[0]  # the first search's generator draws the target subsets, shared by all searches
    start = -math.inf if maximise else math.inf
    best, best_ids, since = [start] * n_groups, [None] * n_groups, [0] * n_groups
    anchor = [start] * n_groups  # the best at the last improvement patience counted (min_delta)
    stopped, step, previous = False, 0, init_ids.to(device)
    for step in range(cfg.iter):
        sub = targets[:, torch.randperm(n, generator=subsets)[: cfg.batch_size].to(device)] if sample else targets
        ids, hard = vocab.project(soft)
        hard = hard.detach().requires_grad_(True)
        if dynamic:
            positions = pool_positions(tower, template.full_ids(ids))
        with autocast(device, cfg.amp):
            feats = _encode_inputs(tower, template.inputs(hard), positions).float()
        feats = (feats / feats.norm(dim=1, keepdim=True)).view(n_groups, cfg.prompt_bs, -1)
        cos = torch.bmm(sub, feats.transpose(1, 2))  # [searches, targets, candidates], the reference's orientation
        losses = (1 - cos.mean(dim=(1, 2))) * cfg.loss_weight
        soft.grad, = torch.autograd.grad(losses.sum(), [hard])
        last = step == cfg.iter - 1
        evaluate = step % cfg.eval_every == 0 or last
        if evaluate:  # seed 000: watch the gradient norms; each search's own prompt rows, one norm each
            grad_norms = soft.grad.detach().float().reshape(n_groups, -1).norm(dim=1)
        opt.step()
        opt.zero_grad(set_to_none=True)

        if evaluate:
            with torch.no_grad():  # the features of this step's hard prompts are already here
                scores = (cos.detach() if not sample else torch.bmm(targets, feats.detach().transpose(1, 2))).mean(dim=1)
                pick = scores.argmax(dim=1) if maximise else scores.argmin(dim=1)
                current = scores.gather(1, pick[:, None]).squeeze(1).tolist()
                # per search, the share of its prompt tokens whose projection moved since the last evaluation
                changed = (ids != previous).reshape(n_groups, -1).float().mean(dim=1).tolist()
                previous = ids
            grouped = ids.view(n_groups, cfg.prompt_bs, cfg.prompt_len)
            loss_values = losses.detach().tolist()
            norms = grad_norms.tolist()
            for g in range(n_groups):
                if _better(current[g], best[g], maximise):
                    best[g], best_ids[g] = current[g], grouped[g, int(pick[g])].tolist()
                if _better(current[g], anchor[g] + (cfg.min_delta if maximise else -cfg.min_delta), maximise):
                    anchor[g], since[g] = current[g], 0
                else:
                    since[g] += 1
                histories[g].append({"restart": restart, "step": step, "loss": loss_values[g], "current": current[g],
                                     "best": best[g], "grad_norm": norms[g], "token_change": changed[g]})
            if callback is not None:
                if n_groups == 1:
                    callback(histories[0][-1])
                else:
                    callback({"restart": restart, "step": step, "loss": sum(loss_values) / n_groups,
                              "current": sum(current) / n_groups, "best": sum(best) / n_groups,
                              "token_change": sum(changed) / n_groups, "grad_norm": sum(norms) / n_groups,
                              "grad_norm_max": max(norms), "current_each": current, "best_each": list(best),
                              "ids": grouped})
            if cfg.patience is not None and min(since) >= cfg.patience and not last:
                stopped = True
                if bar is not None:
                    bar.update(1)
                break
        if bar is not None:
            bar.update(1)
    return [{"seed": int(s), "ids": best_ids[g], "similarity": best[g], "steps": step + 1, "stopped_early": stopped}
            for g, s in enumerate(seeds)]


def _search_targets(model: nn.Module, tokenizer, targets, device, amp) -> torch.Tensor:
    """targets of optimize_prompts as normalised features [G, T, dim]."""
    if isinstance(targets, torch.Tensor) and targets.dim() == 3:
        return F.normalize(targets.detach().to(device=device, dtype=torch.float32), dim=-1)
    return encode_targets(model, tokenizer, targets, device, amp).unsqueeze(1)


def optimize_prompts(model: nn.Module, tokenizer, targets, cfg: PezConfig | dict | None = None,
                     device: torch.device | str | None = None, progress: bool | None = None,
                     callback: Callable[[dict], None] | None = None) -> list[PezResult]:
    """Independent PEZ searches, one per target, run as one batch: `targets` are texts, preprocessed images
    [G, 3, H, W] or features [G, dim] (one target each), or features [G, T, dim] (a set of T per search).
    Search g of restart r starts from seed `cfg.seed + r * G + g`; the result of each search is what a
    separate optimize_prompt with that seed would find (up to floating-point rounding of the batched GEMMs).

    `callback(row)` receives each evaluation: with one search its history row, with several the means over
    the searches plus `current_each` / `best_each` lists, `grad_norm_max` and the projected prompts `ids`
    [G, prompt_bs, prompt_len] (a reporter may raise to stop). A row's `grad_norm` is the norm of the loss
    gradient at the search's projected prompt embeddings, `token_change` the share of its prompt tokens whose
    projection moved since the previous evaluation."""
    cfg = PezConfig.of(cfg)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    t0 = time.perf_counter()
    tower = text_tower(model)
    with _frozen(model):
        feats = _search_targets(model, tokenizer, targets, device, cfg.amp)
        n_groups = feats.shape[0]
        vocab = Vocabulary(tower.token_embedding, tokenizer, cfg.blocklist, cfg.exclude_special,
                           cfg.exclude_non_ascii, cfg.only_ids, cfg.fast_projection)
        cast = tower.transformer.get_cast_dtype()
        truncate = tower.attn_mask is not None and tower.pool_type in ("argmax", "eos")
        template = _Template(tower, tokenizer, cfg.prompt_len, truncate, device, cast)
        bar = None
        if progress or (progress is None and sys.stderr.isatty()):
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.iter * cfg.restarts, desc="pez", unit="step", leave=False)
        histories: list[list[dict]] = [[] for _ in range(n_groups)]
        runs: list[list[dict]] = [[] for _ in range(n_groups)]  # per search, per restart
        try:
            for r in range(cfg.restarts):
                seeds = [cfg.seed + r * n_groups + g for g in range(n_groups)]
                for g, out in enumerate(_run_once(tower, vocab, template, feats, cfg, seeds, device, r, histories,
                                                  callback, bar)):
                    runs[g].append(out)
        finally:
            if bar is not None:
                bar.close()
        sign = 1 if cfg.loss_weight > 0 else -1
        chosen = [max(range(cfg.restarts), key=lambda i: sign * rs[i]["similarity"]) for rs in runs]
        best_ids = [list(runs[g][chosen[g]]["ids"]) for g in range(n_groups)]
        prompts = [_decode(tokenizer, ids) for ids in best_ids]
        text_sims = _own_similarity(model, tokenizer, prompts, feats)
        for rs in runs:
            for run in rs:
                run["prompt"] = _decode(tokenizer, run.pop("ids"))
    seconds = time.perf_counter() - t0
    results = []
    for g in range(n_groups):
        best = runs[g][chosen[g]]
        steps = sum(r["steps"] for r in runs[g])
        results.append(PezResult(
            prompt=prompts[g], ids=best_ids[g],
            similarity=best["similarity"], text_similarity=text_sims[g], history=histories[g], steps=steps,
            stopped_early=any(r["stopped_early"] for r in runs[g]), seconds=seconds,
            steps_per_s=steps / seconds if seconds > 0 else float("nan"), restart=chosen[g], restarts=runs[g]))
    return results


def optimize_prompt(model: nn.Module, tokenizer, targets, cfg: PezConfig | dict | None = None,
                    device: torch.device | str | None = None, progress: bool | None = None,
                    callback: Callable[[dict], None] | None = None) -> PezResult:
    """PEZ: the hard prompt of `prompt_len` tokens whose text features are most similar (mean cosine) to the
    targets (texts, preprocessed images [N, 3, H, W], or features [N, dim]); see PezConfig for the options.

    `callback(row)` receives each history row as it is made (a reporter may raise to stop the search).
    Restarts run one after another with seeds seed, seed + 1, ...; the best over all of them is returned."""
    cfg = PezConfig.of(cfg)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with _frozen(model):
        feats = encode_targets(model, tokenizer, targets, device, cfg.amp)
    return optimize_prompts(model, tokenizer, feats.unsqueeze(0), cfg, device, progress, callback)[0]


@torch.no_grad()
def _own_similarity(model: nn.Module, tokenizer, texts: Sequence[str], targets: torch.Tensor) -> list[float]:
    """Mean cosine of text g (tokenised as a user would) to its own target set targets[g] [T, dim]."""
    feats = encode_targets(model, tokenizer, list(texts), targets.device)
    return torch.bmm(targets, feats.unsqueeze(2)).squeeze(2).mean(dim=1).tolist()


# ---------------------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def text_similarity(model: nn.Module, tokenizer, texts: Sequence[str], target_features: torch.Tensor) -> list[float]:
    """Mean cosine of each text (tokenised as a user would) to the targets' features: for the ground-truth
    caption, the ceiling a recovered prompt is measured against on generated data."""
    feats = encode_targets(model, tokenizer, list(texts), target_features.device)
    targets = F.normalize(target_features.float(), dim=-1)
    return (feats @ targets.t()).mean(dim=1).tolist()


STOP_WORDS = frozenset("a an the of and or in on at to with is are this that for from by its it".split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def token_recovery(prompt: str, caption: str, stop_words: Iterable[str] = STOP_WORDS) -> float:
    """Share of the caption's distinct content words (stop words dropped) that appear as words of the prompt;
    nan for a caption with no content word."""
    stop = set(stop_words)
    content = {w for w in _words(caption) if w not in stop}
    if not content:
        return float("nan")
    found = set(_words(prompt))
    return len(content & found) / len(content)


@torch.no_grad()
def random_prompt_scores(model: nn.Module, tokenizer, target_features: torch.Tensor, prompt_len: int,
                         n: int = 64, seed: int = 0, vocabulary: Vocabulary | None = None) -> torch.Tensor:
    """Cosines [n, targets] of `n` prompts of `prompt_len` random allowed tokens (default: all but the special
    tokens) to each target: the baseline PEZ must beat."""
    tower = text_tower(model)
    vocab = vocabulary or Vocabulary(tower.token_embedding, tokenizer)
    device = target_features.device
    g = torch.Generator().manual_seed(seed)
    prompt = vocab.sample((n, prompt_len), g).to(device)
    template = _Template(tower, tokenizer, prompt_len, False, device, tower.transformer.get_cast_dtype())
    ids = template.full_ids(prompt)
    with _frozen(model):
        feats = F.normalize(model.encode_text(ids).float(), dim=-1)
    return feats @ F.normalize(target_features.float(), dim=-1).t()


@torch.no_grad()
def random_prompt_similarity(model: nn.Module, tokenizer, target_features: torch.Tensor, prompt_len: int,
                             n: int = 64, seed: int = 0, vocabulary: Vocabulary | None = None) -> dict:
    """Random prompts scored as PEZ scores a prompt, the mean cosine of its ids to the targets: mean, std and
    max over the `n` prompts (see random_prompt_scores)."""
    scores = random_prompt_scores(model, tokenizer, target_features, prompt_len, n, seed, vocabulary).mean(dim=1)
    return {"mean": float(scores.mean()), "std": float(scores.std()) if n > 1 else 0.0,
            "max": float(scores.max()), "n": n}
