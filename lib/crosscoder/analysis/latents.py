"""Interpretable-latent views: top-activating contexts rendered as static HTML, and the tokens a
latent's decoder direction promotes through each model's unembedding (a logit-lens reading).
"""

from __future__ import annotations

import html
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from crosscoder.data.pair import ModelPair
from crosscoder.data.sequence_acts import check_right_padded, length_batches, sequence_acts
from crosscoder.model import Crosscoder


class TopContexts(NamedTuple):
    rows_JK: Tensor
    """Sequence index of the k-th strongest activation of latent j."""
    pos_JK: Tensor
    """Token position of it."""
    vals_JK: Tensor
    """Activation value (0 where the latent fired on fewer than k tokens)."""


def top_contexts(acts_NTJ: Tensor, k: int = 8, *, one_per_sequence: bool = True) -> TopContexts:
    """The k largest activations of each latent over a [N sequences, T tokens, J latents] tensor.

    With ``one_per_sequence`` a sequence contributes at most its strongest token, so the examples
    show k different contexts rather than k neighbouring tokens of one.
    """
    N, T, J = acts_NTJ.shape
    if one_per_sequence:
        best_NJ, pos_NJ = acts_NTJ.max(dim=1)
        kk = min(k, N)
        vals, rows = best_NJ.topk(kk, dim=0)  # [kk, J]
        pos = pos_NJ.gather(0, rows)
    else:
        flat = acts_NTJ.reshape(N * T, J)
        kk = min(k, N * T)
        vals, idx = flat.topk(kk, dim=0)
        rows, pos = idx // T, idx % T
    return TopContexts(rows.T.contiguous(), pos.T.contiguous(), vals.T.contiguous())


def _cell(tok: str, a: float, vmax: float) -> str:
    alpha = 0.0 if vmax <= 0 else max(0.0, min(1.0, a / vmax))
    shown = html.escape(tok).replace("\n", "⏎")
    title = f"{a:.3g}"
    return (f'<span title="{title}" style="background: rgba(230,120,0,{alpha:.2f});'
            f'border-radius:2px;padding:0 1px">{shown}</span>')


def context_html(tokens: Sequence[str], acts_T: Sequence[float], centre: int, window: int = 12,
                 vmax: float | None = None) -> str:
    """One context: tokens around ``centre``, each shaded by its activation (hover shows value)."""
    lo, hi = max(0, centre - window), min(len(tokens), centre + window // 2 + 1)
    acts = [float(a) for a in acts_T]
    vmax = max(acts[lo:hi] + [1e-9]) if vmax is None else vmax
    cells = "".join(_cell(tokens[i], acts[i], vmax) if i != centre else
                    f"<b>{_cell(tokens[i], acts[i], vmax)}</b>" for i in range(lo, hi))
    return f'<div style="font-family:monospace;white-space:pre-wrap;margin:2px 0">{"…" if lo else ""}{cells}</div>'


def latent_card_html(title: str, facts: dict[str, str], promoted: dict[str, Sequence[str]],
                     contexts: Sequence[str]) -> str:
    """A latent's card: title, key facts, promoted tokens per model, and its top contexts."""
    fact_html = " · ".join(f"<b>{html.escape(k)}</b> {html.escape(v)}" for k, v in facts.items())
    prom = "".join(
        f"<div><b>promotes in {html.escape(m)}:</b> "
        + " ".join(f"<code>{html.escape(t)}</code>" for t in toks) + "</div>"
        for m, toks in promoted.items()
    )
    return (f'<div style="border:1px solid #ccc;border-radius:6px;padding:8px;margin:8px 0">'
            f'<div style="font-weight:bold">{html.escape(title)}</div><div>{fact_html}</div>{prom}'
            f'{"".join(contexts)}</div>')


@torch.no_grad()
def promoted_tokens(lm, direction_D: Tensor, tokenizer, k: int = 8) -> list[str]:
    """Tokens whose logits the direction raises most when added to the final residual stream.

    The final RMSNorm's elementwise gain is applied (Gemma's is 1 + weight); the norm's division
    by the RMS is a positive scalar per token and does not change the ranking.
    """
    W_U = lm.get_output_embeddings().weight  # [V, D]
    d = direction_D.to(W_U.dtype).to(W_U.device)
    norm = getattr(getattr(lm, "model", lm), "norm", None)
    if norm is not None and hasattr(norm, "weight"):
        gain = norm.weight.float()
        if "gemma" in getattr(lm.config, "model_type", ""):
            gain = 1.0 + gain
        d = d * gain.to(d.dtype)
    logits = W_U @ d
    top = logits.topk(k).indices.tolist()
    return [tokenizer.decode([t]) for t in top]


@torch.no_grad()
def latent_acts(model: Crosscoder, pair: ModelPair, input_ids_NT: torch.Tensor, attention_mask_NT: torch.Tensor,
                latents: torch.Tensor | list[int] | None = None, *, batch: int = 16) -> torch.Tensor:
    """Activations [N, T, J] of ``latents`` (all when None) on token sequences; 0 on BOS and padding."""
    return latent_acts_many([model], pair, input_ids_NT, attention_mask_NT, [latents], batch=batch)[0]


@torch.no_grad()
def latent_acts_many(models: Sequence[Crosscoder], pair: ModelPair, input_ids_NT: torch.Tensor,
                     attention_mask_NT: torch.Tensor, latents: Sequence[torch.Tensor | list[int] | None], *,
                     batch: int = 16) -> list[torch.Tensor]:
    """``latent_acts`` of several crosscoders of the same pair (e.g. two seeds) on the same sequences,
    running the language models once per batch instead of once per crosscoder. Batches are of
    similar lengths and cut at their longest sequence (``length_batches``). The models' activations
    come from ``sequence_acts``: read from the pair's activation cache when a page already ran them."""
    check_right_padded(attention_mask_NT)
    cols = [torch.arange(m.cfg.n_latents) if j is None else torch.as_tensor(j, dtype=torch.long)
            for m, j in zip(models, latents)]
    for m in models:
        m.eval()
    N, T = input_ids_NT.shape
    acts_NTSD = sequence_acts(pair, input_ids_NT, attention_mask_NT, batch=batch)
    out = [torch.zeros(N, T, len(J)) for J in cols]
    for rows, L in length_batches(attention_mask_NT, batch):
        am = attention_mask_NT[rows, :L].long()
        acts = acts_NTSD[rows, :L]  # [B, L, S, D]
        B = len(rows)
        body = am.bool().clone()
        body[:, 0] = False
        for m, J, acc in zip(models, cols, out):
            x = acts.to(m.W_dec_FSD.device).reshape(B * L, *acts.shape[2:])
            f = m.encode(m.normalise(x))[:, J].view(B, L, -1).cpu()
            acc[rows, :L] = f * body[..., None]
    return out


class TokenRows(NamedTuple):
    """Cached activations of the body tokens (not BOS, not padding) of a set of sequences."""

    acts_RSD: Tensor
    """Raw activations [R, S, D] in the cache's storage dtype."""
    seq_R: Tensor
    """Sequence of each row (index into the cached sequences)."""
    pos_R: Tensor
    """Token position of each row."""


def heldout_rows(cache) -> TokenRows:
    """The held-out split of an ``ActivationCache`` with each row's (sequence, position) in
    ``cache.heldout_sequences()``: the activations every held-out statistic (density, Δnorm
    classes, Latent Scaling) is computed from."""
    acts, _, seq, pos = cache.load("heldout", with_index=True)
    return TokenRows(acts, seq.long(), pos.long())


@torch.no_grad()
def latent_acts_from_rows(models: Sequence[Crosscoder], rows: TokenRows, shape_NT: tuple[int, int],
                          latents: Sequence[torch.Tensor | list[int] | None], *, chunk: int = 4096
                          ) -> list[torch.Tensor]:
    """``latent_acts_many`` read from cached activations (``heldout_rows``) instead of running the
    language models: [N, T, J] per crosscoder, 0 on BOS and padding (the cache has no rows there).
    Equal to it up to the cache's storage precision (float16: about 1e-3 of an activation)."""
    cols = [torch.arange(m.cfg.n_latents) if j is None else torch.as_tensor(j, dtype=torch.long)
            for m, j in zip(models, latents)]
    out = [torch.zeros(*shape_NT, len(J)) for J in cols]
    for m in models:
        m.eval()
    for s in range(0, rows.acts_RSD.shape[0], chunk):
        seq, pos = rows.seq_R[s:s + chunk], rows.pos_R[s:s + chunk]
        for m, J, acc in zip(models, cols, out):
            x = rows.acts_RSD[s:s + chunk].to(m.W_dec_FSD.device).float()
            acc[seq, pos] = m.encode(m.normalise(x))[:, J].cpu()
    return out


def sample_by_class(classes: list[str], n_per_class: int, seed: int = 0,
                    names: Sequence[str] = ("chat-only", "base-only", "shared")) -> dict[str, list[int]]:
    """Up to ``n_per_class`` random latents of each class in ``names`` (one seeded generator, drawn
    in that order, so the sample is reproducible)."""
    g = torch.Generator().manual_seed(seed)
    shown = {}
    for name in names:
        ids = [j for j, c in enumerate(classes) if c == name]
        shown[name] = [ids[i] for i in torch.randperm(len(ids), generator=g)[:n_per_class].tolist()]
    return shown


def token_strings(tokenizer, input_ids_NT: Tensor) -> list[list[str]]:
    """Each token of each sequence as the text it stands for (for highlighted contexts)."""
    return [[tokenizer.convert_tokens_to_string([p]) for p in tokenizer.convert_ids_to_tokens(row.tolist())]
            for row in input_ids_NT]


def latent_cards_html(model: Crosscoder, pair: ModelPair, tokens: list[list[str]], f_NTJ: Tensor,
                      shown: dict[str, list[int]], facts_F: dict[str, Tensor], n_contexts: int) -> str:
    """Cards for the latents of ``shown`` (class -> latent ids, in the column order of ``f_NTJ``):
    their top contexts, the given per-latent facts and the tokens each model's decoder promotes."""
    tc = top_contexts(f_NTJ, k=n_contexts)
    cards = []
    latents = [(cls, j) for cls, js in shown.items() for j in js]
    for idx, (cls, j) in enumerate(latents):
        ctx = [context_html(tokens[r], f_NTJ[r, :, idx].tolist(), p) for r, p, v in
               zip(tc.rows_JK[idx].tolist(), tc.pos_JK[idx].tolist(), tc.vals_JK[idx].tolist()) if v > 0]
        prom = {name: promoted_tokens(lm, model.W_dec_FSD[j, s].detach(), pair.tokenizer)
                for s, (name, lm) in reversed(list(enumerate(zip(model.cfg.source_names, pair.models))))}
        facts = {"class": cls, **{k: _fmt(k, float(v[j])) for k, v in facts_F.items()}}
        cards.append(latent_card_html(f"latent {j}", facts, prom, ctx or ["<i>no activation on held-out text</i>"]))
    return "".join(cards)


def _fmt(name: str, value: float) -> str:
    return f"{100 * value:.2f}%" if name == "density" else f"{value:.2f}"
