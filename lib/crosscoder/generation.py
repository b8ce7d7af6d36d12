"""Batched greedy decoding with a KV cache: the one decode loop behind the organism's behaviour rates
(``organism.evaluate.greedy_responses``) and the causal checks (``analysis.causal.greedy_generate``).

Why not ``model.generate``: it keeps every row in the batch until the last one has finished, and it
computes all V logits at every step. Here

* prompts are sorted by length and left-padded into wide batches (a decoding step reads every weight
  once, so 64 rows cost little more than 1); positions count from each row's first real token and
  the attention mask hides the padding, so a padded row decodes as it would alone (``padded=False``
  batches only prompts of equal length: no padding at all);
* a row leaves the batch (and the KV cache) as soon as it has finished: a stop token, its budget,
  or ``until`` (a behaviour whose outcome is settled);
* the next token is the argmax of the float32 logits, found without computing most of them when the
  CPU has bfloat16 arithmetic (``exact_argmax``): a gemma-3-270m step spends two thirds of its time in
  the 262,144-row unembedding.

Forward hooks on the decoder blocks apply at every step (to the new positions, the cache holding
the earlier ones already edited); ``analysis.causal.edit_residual`` runs its partner model in
lockstep with a KV cache of its own, which follows this loop's row selections (``select_rows``).
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

FOLLOWERS = "_crosscoder_followers"
"""Attribute of a KV cache listing other caches that must keep the same rows (a lockstep partner's)."""

FILTER_MIN_VOCAB = 16384
"""``exact_argmax`` filters with bfloat16 logits only from this vocabulary size up: below it the full
float32 product is cheap (the tiny organisms' 2,048 tokens)."""


class Generation(NamedTuple):
    """One greedy continuation."""

    ids: list[int]
    """New token ids, the stop token excluded."""
    ended: bool
    """True when a stop token ended it (not the budget, not ``until``)."""


def select_rows(cache, keep: Tensor) -> None:
    """Keep only rows ``keep`` of a KV cache and of the caches that follow it (``FOLLOWERS``)."""
    cache.batch_select_indices(keep)
    for follower in getattr(cache, FOLLOWERS, ()):
        follower.batch_select_indices(keep)


def cache_kwarg(module) -> str:
    """The keyword a HF decoder takes its KV cache under (``cache`` from transformers 5.x's rename on,
    ``past_key_values`` before; the old name still works there but warns)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(lm):
    """An empty KV cache for ``lm`` (sliding-window layers as its config says)."""
    from transformers import DynamicCache

    from crosscoder.data.pair import text_config

    return DynamicCache(config=text_config(lm.config))


def _bf16_fast(device: torch.device) -> bool:
    from crosscoder.organism.training import cpu_has_bf16

    # CPU only: oneDNN's bf16 GEMM accumulates in float32, which the error bound assumes; cuBLAS may
    # reduce in bf16 (allow_bf16_reduced_precision_reduction), and a GPU's head costs little anyway.
    return device.type == "cpu" and cpu_has_bf16()


class GreedyHead:
    """The unembedding (and Gemma's final logit soft-capping) of ``lm``, reduced to the argmax.

    ``filtered`` (default: a CPU with bf16 arithmetic and a vocabulary of at least ``FILTER_MIN_VOCAB``)
    computes the logits in bfloat16 first (3.4x faster than float32 at 64 rows on an AVX512-BF16 core),
    keeps every token whose float32 logit could still be the largest by a proven error bound, and
    takes the argmax of the float32 logits of those candidates only: the same token as the full
    float32 argmax (ties to the lowest id, as ``argmax``) up to the rounding of the float32 dot
    products themselves.

    The bound: rounding h and w to bfloat16 (unit roundoff u = 2^-8) moves each product h_i w_i by at
    most (2u + u^2) |h_i w_i|, so the dot product by at most (2u + u^2) ||h|| ||w|| (Cauchy-Schwarz);
    the float32 accumulation adds at most about n 2^-24 ||h|| ||w|| (n = d_model), and rounding the
    result to bfloat16 at most u |result|. A token stays a candidate unless its upper bound is below
    the largest lower bound; soft-capping, monotone, is applied to the bounds.
    """

    def __init__(self, lm, filtered: bool | None = None):
        from crosscoder.data.pair import text_config

        head = lm.get_output_embeddings()
        self.W_VD = head.weight
        self.bias = getattr(head, "bias", None)
        self.cap = getattr(text_config(lm.config), "final_logit_softcapping", None)
        if filtered is None:
            filtered = _bf16_fast(self.W_VD.device) and self.W_VD.shape[0] >= FILTER_MIN_VOCAB
        self.filtered = bool(filtered) and self.bias is None
        if self.filtered:
            self.Wb_VD = self.W_VD.detach().to(torch.bfloat16)
            self.wnorm_max = float(self.W_VD.detach().float().norm(dim=-1).max())
            u, n = 2.0 ** -8, self.W_VD.shape[1]
            self.rel = 2 * u + u * u + 2 * n * 2.0 ** -24  # x ||h|| ||w_v||
            self.out_rel = u / (1 - u)  # x |bf16 logit|

    def logits(self, h_BD: Tensor, W_VD: Tensor) -> Tensor:
        """What ``lm``'s own head computes from final hidden states (float32 rows of ``W_VD``)."""
        z = torch.nn.functional.linear(h_BD, W_VD, self.bias)
        if self.cap is not None:
            z = torch.tanh(z / self.cap) * self.cap
        return z

    @torch.no_grad()
    def argmax(self, h_BD: Tensor) -> Tensor:
        """Greedy next tokens [B] from final (normed) hidden states [B, D]."""
        h_BD = h_BD.to(self.W_VD.dtype)
        if not self.filtered:
            return self.logits(h_BD, self.W_VD).argmax(-1)
        approx_BV = h_BD.to(torch.bfloat16) @ self.Wb_VD.t()
        # one error bound per row (the largest over its tokens: every ||w_v|| within a few % of the
        # largest in Gemma), so the candidates take one comparison pass over the [B, V] logits
        lo_B1, hi_B1 = (x.float() for x in torch.aminmax(approx_BV, dim=-1, keepdim=True))
        err_B1 = (h_BD.float().norm(dim=-1, keepdim=True) * (self.rel * self.wnorm_max)
                  + torch.maximum(hi_B1.abs(), lo_B1.abs()) * self.out_rel)
        if self.cap is None:
            cand_BV = approx_BV >= hi_B1 - 2 * err_B1
        else:
            # soft-capping is monotone but not strictly so in float32 (tanh rounds to 1 for large
            # logits): compare the capped bounds, so every token tied with the capped maximum stays
            cap = lambda x: torch.tanh(x / self.cap) * self.cap  # noqa: E731
            cand_BV = cap(approx_BV.float() + err_B1) >= cap(hi_B1 - err_B1)
        union_U = cand_BV.any(0).nonzero().squeeze(1)  # ascending: argmax ties still go to the lowest id
        exact_BU = self.logits(h_BD, self.W_VD[union_U])
        exact_BU = exact_BU.masked_fill(~cand_BV[:, union_U], float("-inf"))
        return union_U[exact_BU.argmax(-1)]


@torch.no_grad()
def greedy_generate(lm, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = (), *,
                    batch_size: int = 64, padded: bool = True, pad_id: int = 0,
                    until: Callable[[list[int]], bool] | None = None,
                    head: GreedyHead | None = None) -> list[Generation]:
    """Greedy continuations of token-id prompts (see the module docstring).

    ``stop_ids`` end a row (not included in its ids; ``Generation.ended``); ``until(new_ids)`` ends a row
    once True (greedy decoding makes every row's tokens a prefix of what a longer budget gives, so an
    outcome settled early is the outcome). ``padded``: batch prompts of any length with left padding
    (``pad_id``, masked out); else only prompts of equal length share a batch. ``batch_size`` rows
    at most per batch. Hooks on ``lm``'s blocks apply to every forward, each seeing the new positions
    only (a KV cache holds the rest)."""
    from crosscoder.data.pair import decoder

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    dec = decoder(lm)
    dev = next(lm.parameters()).device
    head = head or GreedyHead(lm)
    kw = cache_kwarg(dec)
    stop = {int(s) for s in stop_ids}
    out: list[Generation | None] = [None] * len(prompts)
    # sorted by length, so a batch pads its prompts to similar widths
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (padded or len(prompts[batches[-1][0]]) == len(prompts[i])):
            batches[-1].append(i)
        else:
            batches.append([i])
    lm.eval()
    for rows in batches:
        width = max(len(prompts[i]) for i in rows)
        ids_BT = torch.tensor([[pad_id] * (width - len(prompts[i])) + list(prompts[i]) for i in rows], device=dev)
        mask_BT = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows], device=dev)
        # a row's positions count from its first real token, as in an unpadded call
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        new: dict[int, list[int]] = {i: [] for i in rows}
        live = list(rows)  # prompt index of each batch row still decoding
        cache = new_cache(lm)
        for _ in range(max_new_tokens):
            h_BD = dec(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT, use_cache=True,
                       **{kw: cache}).last_hidden_state[:, -1]
            nxt_B = head.argmax(h_BD)
            keep = []
            for b, (i, t) in enumerate(zip(live, nxt_B.tolist())):
                if t in stop:
                    out[i] = Generation(new[i], True)
                    continue
                new[i].append(t)
                if until is not None and until(new[i]):
                    out[i] = Generation(new[i], False)
                else:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(live):
                k = torch.tensor(keep, device=dev)
                select_rows(cache, k)
                nxt_B, mask_BT, pos_BT = nxt_B[k], mask_BT[k], pos_BT[k]
                live = [live[b] for b in keep]
            ids_BT = nxt_B[:, None]
            mask_BT = torch.cat([mask_BT, mask_BT.new_ones(len(live), 1)], dim=1)
            pos_BT = pos_BT[:, -1:] + 1
        for i in rows:
            if out[i] is None:  # the budget ran out
                out[i] = Generation(new[i], False)
    return out  # type: ignore[return-value]
