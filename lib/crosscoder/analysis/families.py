"""Families of latents on a trained crosscoder: the stability-chosen clustering of its live latents
(``analysis.clustering``), checked against a second seed and a shuffled null, and read as cards
(name, size, class mix, where the family fires, what it writes, examples) and through both models'
decoders (which families fine-tuning touched)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from crosscoder.analysis import clustering as cl
from crosscoder.analysis.latents import (TokenRows, context_html, latent_acts_from_rows, latent_acts_many,
                                         promoted_tokens)
from crosscoder.analysis.metrics import DiffGeometry
from crosscoder.data.pair import ModelPair
from crosscoder.model import Crosscoder


class Families(NamedTuple):
    latents: Tensor
    """The clustered (live) latents of the crosscoder, in column order."""
    choice: cl.Choice
    """The chosen view and size, and the stability of every candidate."""
    labels: np.ndarray
    """Family of each clustered latent."""
    facts: list[cl.ClusterFacts]
    """Per family: size, dominant context class, purity."""
    null_facts: list[cl.ClusterFacts]
    """The same method and size on shuffled activations (the null)."""
    summary: dict[str, float]
    """Headline numbers: seed ARI, bootstrap ARI, ARI against context labels, per context class the
    purity of the family carrying most of it (``purity_*``) and of its purest own family of at least
    ``clustering.MIN_FAMILY`` latents (``own_family_purity_*``), and the same for the null."""
    view: dict[str, np.ndarray]
    """The features the chosen method clustered (for the map)."""
    f_NTJ: Tensor
    """Activations of the clustered latents on the held-out sequences."""
    context_NT: Tensor
    """Context class of every held-out token (-1 on BOS / padding)."""
    input_ids_NT: Tensor
    """The held-out sequences the activations were measured on."""


def find_families(model: Crosscoder, other: Crosscoder | None, pair: ModelPair, held, alive_F: Tensor,
                  other_alive_F: Tensor | None, *, ks=(4, 6, 8, 12, 16), match_cos: float = 0.9, n_boot: int = 5,
                  seed: int = 0, rows: TokenRows | None = None) -> Families:
    """Cluster ``model``'s live latents by the most stable view and size (bootstrap over held-out
    sequences, and ARI against ``other``, a second seed, on latents matched at decoder cosine >=
    ``match_cos``), then score the families against token context classes beside a shuffled null.
    Without ``other`` (None) stability is the bootstrap ARI alone and the decoder view is not tried
    (it needs a second seed to be judged). ``rows``: the held-out sequences' cached activations
    (``latents.heldout_rows``), encoded instead of running the language models."""
    from crosscoder.analysis.seeds import match_latents

    live = torch.nonzero(alive_F).squeeze(1)
    ids, am = held.input_ids_NT, held.attention_mask_NT
    ctx = cl.context_labels(ids, am, held.is_chat_N, pair.tokenizer)
    dec = cl.decoder_features(model.W_dec_FSD, live)
    seed_view, pairs = None, []
    models, cols = [model], [live]
    if other is not None:
        live_b = torch.nonzero(other_alive_F).squeeze(1)
        models, cols = [model, other], [live, live_b]
    f, *f_other = (latent_acts_from_rows(models, rows, tuple(ids.shape), cols) if rows is not None else
                   latent_acts_many(models, pair, ids, am, cols))  # one pass of the LMs for both seeds
    if other is not None:
        f_b = f_other[0]
        m = match_latents(model, other, live, live_b)
        col_b = {int(j): c for c, j in enumerate(live_b.tolist())}
        pairs = [(a, col_b[int(b)]) for a, (b, cos) in enumerate(zip(m.best_latent.tolist(), m.best_cos.tolist()))
                 if cos >= match_cos]
        seed_view = cl.SeedView(f_b, cl.decoder_features(other.W_dec_FSD, live_b), pairs)
    choice = cl.select_clustering(f, ctx, decoder=dec, other=seed_view, ks=ks, n_boot=n_boot, seed=seed)
    N, T, J = f.shape
    flat, ctx_flat, pos = f.reshape(-1, J), ctx.reshape(-1), torch.arange(T).expand(N, T).reshape(-1)

    def signature_of(v: dict[str, np.ndarray], acts: Tensor) -> np.ndarray:  # the view's own, when it is one
        return v["signature"] if choice.method == "signature" else cl.context_signature(acts, ctx_flat, pos)

    view = cl.features(choice.method, flat, ctx_flat, pos, dec)
    labels = cl.cluster(choice.method, choice.k, **view)
    signature, mass = signature_of(view, flat), flat.sum(0).double().numpy()
    facts = cl.cluster_facts(labels, signature, mass)
    null = cl.shuffle_activations(flat, seed=seed)
    null_view = cl.features(choice.method, null, ctx_flat, pos, dec)
    null_labels = cl.cluster(choice.method, choice.k, **null_view) if choice.method != "decoder" else labels
    null_sig = signature_of(null_view, null)
    null_facts = cl.cluster_facts(null_labels, null_sig, mass)
    row = next(r for r in choice.table if r["method"] == choice.method and r["k"] == choice.k)
    summary = {"method": choice.method, "k": choice.k, "seed_ari": row["seed_ari"], "bootstrap_ari": row["bootstrap_ari"],
               "effective_clusters": row["effective_clusters"],
               "matched_latents": len(pairs) if other is not None else None, "clustered_latents": J,
               "context_ari": cl.label_ari(labels, signature), "null_context_ari": cl.label_ari(null_labels, null_sig),
               **{f"purity_{k}": v for k, v in cl.purity_by_label(facts).items()},
               **{f"null_purity_{k}": v for k, v in cl.purity_by_label(null_facts).items()},
               **{f"own_family_purity_{k}": v for k, v in cl.dominated_purity(facts).items()},
               **{f"null_own_family_purity_{k}": v for k, v in cl.dominated_purity(null_facts).items()}}
    return Families(live, choice, labels, facts, null_facts, summary, view, f, ctx, ids)


def clustered_acts(fam: Families, latents: list[int]) -> Tensor:
    """Activations [N, T, J] of ``latents`` (clustered ones, e.g. a sample of live latents) on the
    held-out sequences, read from ``fam`` instead of running the language models again."""
    column = {j: c for c, j in enumerate(fam.latents.tolist())}
    missing = [j for j in latents if j not in column]
    if missing:
        raise ValueError(f"latents {missing[:5]} were not clustered (dead on the held-out set?)")
    return fam.f_NTJ[..., [column[j] for j in latents]]


def measured(summary: dict, key: str) -> bool:
    """Whether ``find_families``' summary has a number for ``key`` (None or NaN: not measured)."""
    v = summary.get(key)
    return v is not None and v == v


def seed_phrase(summary: dict) -> str:
    """The seed comparison of ``find_families``' summary, as a phrase: its ARI, or why there is none."""
    matched = summary.get("matched_latents")
    if matched is None:
        return "no second seed in this profile"
    if not measured(summary, "seed_ari"):
        return f"a second seed shares only {matched:,} latents with this one, too few for a seed ARI"
    return f"seed ARI {summary['seed_ari']:.2f} on {matched:,} latents matched across two seeds"


def summary_finding(summary: dict, threshold: float = 0.7) -> str:
    """What the chosen clustering shows, in two sentences read from ``find_families``' summary."""
    def num(key: str) -> str:
        return f"{summary[key]:.2f}" if measured(summary, key) else "not measured"

    chat = ("template", "user", "model")
    seed = seed_phrase(summary)
    own = {c: summary[f"own_family_purity_{c}"] for c in chat}
    have, lack = [c for c in chat if own[c] >= threshold], [c for c in chat if own[c] < threshold]
    verdict = ("the chat template, user turns and model turns each have a family of their own" if not lack else
               f"{_listed(lack)} {'has' if len(lack) == 1 else 'have'} no family of {cl.MIN_FAMILY}+ latents with "
               f"purity ≥ {threshold}" + (f" ({_listed(have)} {'does' if len(have) == 1 else 'do'})" if have else ""))
    boot = (f"bootstrap ARI {num('bootstrap_ari')} over resampled held-out sequences" if measured(summary, "bootstrap_ari")
            else "no bootstrap (this view does not depend on the tokens)")
    return (f"**{summary['k']} families by the {summary['method']} view.** Reproducibility: {boot}; {seed}. "
            f"Against the token contexts: ARI {num('context_ari')} with each latent's dominant context, "
            f"{num('null_context_ari')} for the same method on shuffled activations. By their purest family of at "
            f"least {cl.MIN_FAMILY} latents ({', '.join(f'{c} {own[c]:.2f}' for c in chat)}; null: "
            + ", ".join(f"{summary[f'null_own_family_purity_{c}']:.2f}" for c in chat) + f"), {verdict}.")


def _listed(words: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} and {words[-1]}"


def family_name(fam: Families, c: int, tokenizer, n_tokens: int = 3) -> str:
    """A name from the family's dominant context and the tokens its members fire on most."""
    mass_NT = fam.f_NTJ[..., torch.from_numpy(fam.labels == c)].sum(-1)
    by_id = torch.zeros(int(fam.input_ids_NT.max()) + 1, dtype=torch.float64)
    by_id.index_add_(0, fam.input_ids_NT.reshape(-1), mass_NT.reshape(-1).double())
    top = [t for t in by_id.topk(min(n_tokens, len(by_id))).indices.tolist() if by_id[t] > 0]
    facts = next(f for f in fam.facts if f.cluster == c)
    return f"{facts.dominant_context}: " + " ".join(repr(tokenizer.decode([t])) for t in top)


def family_table(fam: Families, model: Crosscoder, pair: ModelPair, classes: list[str], geo: DiffGeometry,
                 nu_error: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """One card row per family: name, size, Δnorm class mix, dominant context and purity, median ν^ε
    of its chat-only members (when given), the tokens its mean chat decoder promotes, and both
    models' view: median decoder norm in each model, median Δnorm and base/chat decoder cosine."""
    rows = []
    for facts in fam.facts:
        sel = torch.from_numpy(fam.labels == facts.cluster)
        members = fam.latents[sel]
        mix = [classes[j] for j in members.tolist()]
        chat_dir = model.W_dec_FSD.detach()[members, 1].mean(0)
        nus = [nu_error[j] for j in members.tolist() if nu_error and j in nu_error]
        rows.append({
            "family": facts.cluster, "name": family_name(fam, facts.cluster, pair.tokenizer), "size": facts.size,
            **{k: mix.count(k) for k in ("chat-only", "base-only", "shared", "other")},
            "fires on": facts.dominant_context, "purity": facts.purity,
            "median ν^ε (chat-only)": float(np.median(nus)) if nus else float("nan"),
            "promotes (chat)": " ".join(promoted_tokens(pair.chat, chat_dir, pair.tokenizer, k=5)),
            "median ‖d_base‖": float(geo.norm_base_F[members].median()),
            "median ‖d_chat‖": float(geo.norm_chat_F[members].median()),
            "median Δnorm": float(geo.delta_norm_F[members].median()),
            "median cos(d_base, d_chat)": float(geo.cosine_F[members].median()),
        })
    return rows


def family_examples_html(fam: Families, tokens: list[list[str]], c: int, n: int = 2) -> str:
    """The ``n`` held-out contexts where family ``c`` fires most (summed over members), shaded."""
    sel = torch.from_numpy(fam.labels == c)
    mass_NT = fam.f_NTJ[..., sel].sum(-1)
    best_N, pos_N = mass_NT.max(1)
    rows = best_N.topk(min(n, len(best_N))).indices.tolist()
    return "".join(context_html(tokens[r], mass_NT[r].tolist(), int(pos_N[r])) for r in rows if best_N[r] > 0)


def map_coordinates(fam: Families, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates of the clustered latents in the geometry the chosen view clustered in
    (cosine for signatures and decoders, 1 - Jaccard for co-occurrence); for figures only."""
    if "similarity" in fam.view:
        dist = np.clip(1.0 - fam.view["similarity"], 0.0, None)
        np.fill_diagonal(dist, 0.0)
        return cl.embed_2d(dist, seed=seed, metric="precomputed")
    return cl.embed_2d(next(iter(fam.view.values())), seed=seed)
