"""Do latents reappear across crosscoder seeds? Decoder-cosine matching between training runs.

A chat-specific latent found by one seed is more credible if crosscoders trained from other seeds
have a latent with (nearly) the same decoder. Matching uses the *concatenated* decoder row
[W_dec[j, base], W_dec[j, chat]] in the crosscoder's normalised space by default, so a match needs
both halves to agree: a chat-only latent (base half ~0) matches only another chat-only latent with
the same chat direction, not a shared latent that happens to write the same chat direction.
``source=1`` matches on the chat half alone.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from crosscoder.config import ConfigError
from crosscoder.model import Crosscoder


def decoder_rows(model: Crosscoder, source: int | None = None) -> Tensor:
    """Decoder rows [F, S*D] (concatenated, ``source=None``) or [F, D] (one source), normalised
    space (so a folded and an unfolded copy of one crosscoder give the same rows)."""
    W = model.W_dec_FSD.detach().float()
    if model.folded:
        W = W * model.input_scale_S.float()[None, :, None]
    if source is None:
        return W.reshape(W.shape[0], -1)
    if not 0 <= source < W.shape[1]:
        raise ConfigError(f"source must be in [0, {W.shape[1]}), got {source}")
    return W[:, source]


class LatentMatch(NamedTuple):
    """For each query latent of crosscoder A, its best match among the candidate latents of B."""

    latents: Tensor
    """Query latent indices of A [J]."""
    best_latent: Tensor
    """Index in B of the best-matching candidate [J] (-1 when B has no candidates)."""
    best_cos: Tensor
    """Cosine of the decoder rows [J] (NaN when B has no candidates)."""


def match_latents(a: Crosscoder, b: Crosscoder, latents_a: Tensor | Sequence[int] | None = None,
                  latents_b: Tensor | Sequence[int] | None = None, *, source: int | None = None) -> LatentMatch:
    """Best decoder-cosine match in ``b`` (among ``latents_b``, default all) of each latent of ``a``
    in ``latents_a`` (default all), on the concatenated decoder (``source=None``) or one source."""
    ra, rb = decoder_rows(a, source), decoder_rows(b, source)
    if ra.shape[1] != rb.shape[1]:
        raise ConfigError(f"decoders of different widths ({ra.shape[1]} vs {rb.shape[1]}) cannot be matched")
    Ja = torch.arange(ra.shape[0]) if latents_a is None else torch.as_tensor(latents_a, dtype=torch.long)
    Jb = torch.arange(rb.shape[0]) if latents_b is None else torch.as_tensor(latents_b, dtype=torch.long)
    if len(Jb) == 0 or len(Ja) == 0:
        return LatentMatch(Ja, torch.full((len(Ja),), -1, dtype=torch.long), torch.full((len(Ja),), float("nan")))
    ua = torch.nn.functional.normalize(ra[Ja], dim=-1)
    ub = torch.nn.functional.normalize(rb[Jb], dim=-1)
    cos_AB = ua @ ub.T
    best, idx = cos_AB.max(dim=1)
    return LatentMatch(Ja, Jb[idx], best)


def reappearance(models: Mapping[str, Crosscoder], latents: Mapping[str, Tensor | Sequence[int]], *,
                 threshold: float = 0.9, source: int | None = None, among_all: bool = False) -> list[dict]:
    """For every ordered pair of runs (A, B), how many of A's selected latents reappear in B.

    ``latents[name]`` are each run's selected latents (e.g. its confirmed chat-specific ones). A
    latent of A reappears in B when B has a latent with decoder cosine >= ``threshold`` among B's
    selected latents (default), or among all of B's latents (``among_all``: "does B have it at all,
    whatever its class?"). Returns one row per ordered pair and a summary row per run ``A`` with
    ``"in_all_others"``: how many of A's latents reappear in every other run.
    """
    names = list(models)
    if len(names) < 2:
        raise ConfigError("reappearance needs at least two runs")
    rows = []
    hits: dict[str, list[Tensor]] = {n: [] for n in names}
    for a in names:
        for b in names:
            if a == b:
                continue
            m = match_latents(models[a], models[b], latents[a], None if among_all else latents[b], source=source)
            ok = m.best_cos >= threshold  # NaN compares False
            hits[a].append(ok)
            rows.append({"run": a, "other": b, "n_latents": len(m.latents), "reappear": int(ok.sum()),
                         "median_best_cos": float(m.best_cos.nanmedian()) if len(m.latents) else float("nan")})
    for a in names:
        n = len(torch.as_tensor(latents[a]))
        every = torch.stack(hits[a]).all(0) if n else torch.zeros(0, dtype=torch.bool)
        rows.append({"run": a, "other": "all others", "n_latents": n, "reappear": int(every.sum()),
                     "median_best_cos": float("nan")})
    return rows
