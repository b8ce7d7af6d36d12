"""Families of latents: clustering that is chosen by its stability, not by a silhouette score.

Three views of a latent can be clustered (scikit-learn does the clustering):

* ``signature``: *where* it fires -- the share of its activation mass on each context class
  (pretraining text, chat-template tokens, user turns, model turns) and position band;
* ``cooccurrence``: *with whom* it fires -- the Jaccard similarity of binary firing patterns over
  held-out tokens;
* ``decoder``: *what it writes* -- the cosine of the concatenated decoder directions.

A clustering worth reading comes out (nearly) the same when the held-out sequences are resampled
(``bootstrap_stability``) and when a second crosscoder seed is clustered (``matched_ari``); the
method and the number of clusters are picked by that stability (``select_clustering``). A null
baseline (``shuffle_activations``: every latent's activations permuted over tokens independently)
keeps each latent's density and destroys all structure, so scores on it say what chance gives.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

CONTEXTS = ("text", "template", "user", "model")
"""Context classes of a token: a pretraining-text sequence, the chat template's scaffolding
(<start_of_turn>, role header, <end_of_turn> and the newline after it), a user turn's content,
a model turn's content."""
POSITION_BANDS = (1, 8, 32, 128)
"""Lower edges of the position bands of a context signature (BOS, position 0, is never counted)."""
METHODS = ("signature", "cooccurrence", "decoder")


# ---------------------------------------------------------------------------- token context labels
def context_labels(input_ids_NT: Tensor, attention_mask_NT: Tensor, is_chat_N: Tensor, tokenizer) -> Tensor:
    """Index into CONTEXTS of every token ([N, T] int64; -1 on BOS and padding).

    Chat sequences are parsed from the template tokens themselves (Gemma's format, which the
    organism shares): ``<start_of_turn>`` + role header up to its newline, content, ``<end_of_turn>``
    + the newline after it. The role is read from the header text ("user" / anything else = model).
    """
    start = tokenizer.convert_tokens_to_ids("<start_of_turn>")
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    out = torch.full(input_ids_NT.shape, -1, dtype=torch.long)
    T_TEXT, T_TEMPLATE, T_USER, T_MODEL = range(4)
    for n, row in enumerate(input_ids_NT.tolist()):
        valid = attention_mask_NT[n].bool().tolist()
        if not bool(is_chat_N[n]):
            out[n] = torch.tensor([T_TEXT if v else -1 for v in valid])
            out[n, 0] = -1
            continue
        state, role, header = "outside", T_MODEL, ""
        for t, (tok, v) in enumerate(zip(row, valid)):
            if t == 0 or not v:
                continue
            piece = tokenizer.decode([tok])
            if tok == start:
                state, header = "header", ""
                out[n, t] = T_TEMPLATE
            elif state == "header":
                out[n, t] = T_TEMPLATE
                header += piece
                if "\n" in piece:
                    role = T_USER if "user" in header else T_MODEL
                    state = "content"
            elif tok == end:
                out[n, t] = T_TEMPLATE
                state = "after_end"
            elif state == "after_end" and piece.strip() == "":
                out[n, t] = T_TEMPLATE
                state = "outside"
            else:
                out[n, t] = role if state == "content" else T_TEMPLATE
    return out


# ---------------------------------------------------------------------------- latent features
def context_signature(f_TJ: Tensor, context_T: Tensor, position_T: Tensor) -> np.ndarray:
    """[J, C + P] per latent: the share of its activation mass on each context class, then on each
    position band (each half sums to 1 for a latent that fires; zeros for one that never does).

    Sums over the nonzero activations only: latents fire on ~1% of tokens, so this is ~50x less
    work than the dense [J, T] @ [T, C] products (``tests/test_clustering.py`` checks it against them)."""
    t, j = (f_TJ != 0).nonzero(as_tuple=True)
    ctx = context_T[t]
    keep = ctx >= 0
    t, j, ctx = t[keep], j[keep], ctx[keep]
    v = f_TJ[t, j].double()
    band = torch.bucketize(position_T[t], torch.tensor(POSITION_BANDS[1:]), right=True)
    J, C, P = f_TJ.shape[1], len(CONTEXTS), len(POSITION_BANDS)
    out = torch.zeros(J, C + P, dtype=torch.float64)
    out.index_put_((j, ctx), v, accumulate=True)
    out.index_put_((j, C + band), v, accumulate=True)
    mass = torch.zeros(J, dtype=torch.float64).index_add_(0, j, v).clamp_min(1e-12)
    return (out / mass[:, None]).numpy()


def jaccard_similarity(f_TJ: Tensor) -> np.ndarray:
    """[J, J] Jaccard similarity of the latents' binary firing patterns over tokens.

    The co-firing counts are a sparse product (scipy) when latents fire on few tokens: its cost
    grows with the square of the latents firing per token, not with T x J^2. Above ~10% density (an
    L1 crosscoder: L0 474 of 4,096 on the gemma3 organism) scipy's sparse product is slower than a
    dense float32 BLAS product of the tokens where anything fires (measured 2.8x on that shape), so
    that is used there. Both are exact: float32 holds integers below 2^24."""
    import scipy.sparse as sp

    if f_TJ.shape[0] >= 2 ** 24:
        raise ValueError(f"{f_TJ.shape[0]} tokens: float32 co-firing counts are exact only below 2^24; "
                         "pass fewer held-out tokens")
    fires = f_TJ > 0
    per_token = fires.sum(1)
    if _dense_is_faster(per_token, f_TJ.shape[1]):
        b = fires[per_token > 0].float()
        inter = (b.T @ b).double().numpy()
        count = b.sum(0).double().numpy()
    else:
        b = sp.csr_matrix(fires.numpy(), dtype=np.float32)
        inter = (b.T @ b).toarray().astype(np.float64)
        count = np.asarray(b.sum(0), dtype=np.float64).ravel()
    return inter / np.maximum(count[:, None] + count[None, :] - inter, 1e-12)


def _dense_is_faster(per_token_T: Tensor, n_latents: int, speed_ratio: float = 100.0) -> bool:
    """Whether the dense product (T' x J^2 multiply-adds over the T' tokens where something fires)
    beats the sparse one (sum over tokens of the square of the latents firing there), given that
    BLAS does ~``speed_ratio`` times more of them per second than scipy's sparse product (about 200
    measured on one core)."""
    live = per_token_T[per_token_T > 0].double()
    return float((live ** 2).sum()) * speed_ratio > len(live) * float(n_latents) ** 2


def decoder_features(W_dec_FSD: Tensor, latents: Tensor) -> np.ndarray:
    """Concatenated decoder directions of ``latents``, unit-normalised (cosine geometry)."""
    W = W_dec_FSD.detach()[latents].reshape(len(latents), -1).double()
    return torch.nn.functional.normalize(W, dim=-1).numpy()


def shuffle_activations(f_TJ: Tensor, seed: int = 0) -> Tensor:
    """The null baseline: each latent's activations permuted over tokens independently (density
    kept, co-occurrence and context destroyed).

    Only the nonzero entries move: under a uniform permutation of the T tokens, a column's m nonzero
    values land on a uniformly random ordered m-tuple of distinct tokens, which is what
    ``Generator.choice(T, m, replace=False)`` draws -- no sort of all T x J entries."""
    rng = np.random.default_rng(seed)
    T, J = f_TJ.shape
    j, t = (f_TJ.T != 0).nonzero(as_tuple=True)  # grouped by latent
    counts = torch.bincount(j, minlength=J).tolist()
    rows = np.concatenate([rng.choice(T, size=m, replace=False) for m in counts]) if t.numel() else np.zeros(0, int)
    out_JT = torch.zeros(J, T, dtype=f_TJ.dtype)
    out_JT[j, torch.from_numpy(rows).long()] = f_TJ[t, j]
    return out_JT.T.contiguous()


# ---------------------------------------------------------------------------- clustering
def cluster(method: str, k: int, *, signature: np.ndarray | None = None, similarity: np.ndarray | None = None,
            decoder: np.ndarray | None = None) -> np.ndarray:
    """Agglomerative clustering (average linkage) of latents into ``k`` clusters by one view:
    ``signature`` (cosine between signatures), ``cooccurrence`` (1 - Jaccard) or ``decoder`` (cosine)."""
    from sklearn.cluster import AgglomerativeClustering

    if method == "cooccurrence":
        if similarity is None:
            raise ValueError("method 'cooccurrence' needs similarity")
        return AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(
            np.clip(1.0 - similarity, 0.0, None))
    X = {"signature": signature, "decoder": decoder}.get(method)
    if X is None:
        raise ValueError(f"method must be one of {METHODS} with its view given, got {method!r}")
    return AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(X + 1e-12)


def cluster_ks(method: str, ks: Sequence[int], *, signature: np.ndarray | None = None,
               similarity: np.ndarray | None = None, decoder: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """``cluster`` for every k of ``ks``, from one tree: without a connectivity constraint
    scikit-learn builds the full merge tree on every fit and only cuts it at k, so one fit and a cut
    per k give each k's labels exactly (``tests/test_clustering.py`` compares them with a fit per k)
    at a fifth of the cost for five sizes."""
    try:
        from sklearn.cluster._agglomerative import _hc_cut
    except ImportError:  # pragma: no cover - a scikit-learn without it: one fit per k
        return {k: cluster(method, k, signature=signature, similarity=similarity, decoder=decoder) for k in ks}
    if not ks:
        return {}
    from sklearn.cluster import AgglomerativeClustering

    if method == "cooccurrence":
        if similarity is None:
            raise ValueError("method 'cooccurrence' needs similarity")
        fit = AgglomerativeClustering(n_clusters=ks[0], metric="precomputed", linkage="average").fit(
            np.clip(1.0 - similarity, 0.0, None))
    else:
        X = {"signature": signature, "decoder": decoder}.get(method)
        if X is None:
            raise ValueError(f"method must be one of {METHODS} with its view given, got {method!r}")
        fit = AgglomerativeClustering(n_clusters=ks[0], metric="cosine", linkage="average").fit(X + 1e-12)
    return {k: _hc_cut(k, fit.children_, fit.n_leaves_) for k in ks}


def features(method: str, f_TJ: Tensor, context_T: Tensor, position_T: Tensor,
             decoder: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The view ``method`` clusters on, computed from activations (the decoder view is fixed)."""
    if method == "signature":
        return {"signature": context_signature(f_TJ, context_T, position_T)}
    if method == "cooccurrence":
        return {"similarity": jaccard_similarity(f_TJ)}
    return {"decoder": decoder}


def _labels_for_ks(method: str, ks: Sequence[int], f_NTJ: Tensor, context_NT: Tensor,
                   decoder: np.ndarray | None) -> dict[int, np.ndarray]:
    N, T, J = f_NTJ.shape
    pos = torch.arange(T).expand(N, T).reshape(-1)
    view = features(method, f_NTJ.reshape(-1, J), context_NT.reshape(-1), pos, decoder)
    return cluster_ks(method, ks, **view)


def effective_clusters(labels_J: np.ndarray) -> float:
    """exp(entropy) of the cluster sizes: k for k equal clusters, near 1 when one cluster holds
    nearly everything."""
    p = np.bincount(np.asarray(labels_J)) / len(labels_J)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def bootstrap_stability(method: str, ks: Sequence[int], f_NTJ: Tensor, context_NT: Tensor, *,
                        n_boot: int = 5, seed: int = 0, full: dict[int, np.ndarray] | None = None
                        ) -> dict[int, float]:
    """Per k: the mean adjusted Rand index between the clustering on all held-out sequences
    (``full``, computed when not given) and clusterings on bootstrap resamples of the sequences
    (with replacement). Views computed from activations only (the decoder view does not depend on
    the tokens: see ``seed_stability``)."""
    from sklearn.metrics import adjusted_rand_score

    full = _labels_for_ks(method, ks, f_NTJ, context_NT, None) if full is None else full
    g = torch.Generator().manual_seed(seed)
    aris: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(n_boot):
        rows = torch.randint(f_NTJ.shape[0], (f_NTJ.shape[0],), generator=g)
        boot = _labels_for_ks(method, ks, f_NTJ[rows], context_NT[rows], None)
        for k in ks:
            aris[k].append(adjusted_rand_score(full[k], boot[k]))
    return {k: float(np.mean(v)) for k, v in aris.items()}


class SeedView(NamedTuple):
    """The same analysis on a second crosscoder seed, and which of its latents match ours."""

    f_NTJ: Tensor
    """Its latents' activations on the same held-out sequences."""
    decoder: np.ndarray | None
    """Its latents' decoder features (for the decoder view)."""
    pairs: list[tuple[int, int]]
    """(our latent's column, its latent's column) for every matched pair."""


def seed_stability(method: str, ks: Sequence[int], f_NTJ: Tensor, context_NT: Tensor, decoder: np.ndarray | None,
                   other: SeedView, *, ours: dict[int, np.ndarray] | None = None) -> dict[int, float]:
    """Per k: ARI between our clustering (``ours``, computed when not given) and the second seed's,
    over matched latents."""
    ours = _labels_for_ks(method, ks, f_NTJ, context_NT, decoder) if ours is None else ours
    theirs = _labels_for_ks(method, ks, other.f_NTJ, context_NT, other.decoder)
    return {k: matched_ari(ours[k], theirs[k], other.pairs) for k in ks}


class Choice(NamedTuple):
    method: str
    """The chosen view."""
    k: int
    """The chosen number of clusters."""
    stability: float
    """Its stability: the smaller of its bootstrap and its seed ARI (whichever were measured)."""
    table: list[dict[str, Any]]
    """Bootstrap ARI, seed ARI and stability of every (method, k) tried."""


def select_clustering(f_NTJ: Tensor, context_NT: Tensor, *, decoder: np.ndarray | None = None,
                      other: SeedView | None = None, methods: Sequence[str] = METHODS,
                      ks: Iterable[int] = (4, 6, 8, 12, 16), tolerance: float = 0.02, n_boot: int = 5,
                      min_pairs: int = 30, min_effective: float = 2.0, seed: int = 0) -> Choice:
    """The most stable clustering, and among those within ``tolerance`` of it the most finely
    resolved (largest k): a k that splits a real family in two is less reproducible than the k
    that keeps it whole, so the planted number of families wins over both coarser and finer ones.

    Stability is the smaller of the bootstrap ARI (resampled sequences) and, with ``other``, the
    ARI against a second crosscoder seed on matched latents; the decoder view, which does not depend
    on the tokens, is judged by the seed ARI alone (and needs ``other``). With fewer than
    ``min_pairs`` matched latents the seed ARI is too noisy to judge by and is not used.

    A *degenerate* clustering -- one cluster holding nearly every latent, the rest crumbs, fewer
    than ``min_effective`` effective clusters (``effective_clusters``) -- is perfectly stable for a
    trivial reason and is not rated, unless every clustering tried is degenerate: then the most
    stable of them is returned and its ``effective_clusters`` in the table says so."""
    ks = [k for k in ks if 2 <= k < f_NTJ.shape[2]]
    if other is not None and len(other.pairs) < min_pairs:
        other = None
    table = []
    for method in methods:
        if method == "decoder" and (decoder is None or other is None):
            continue
        full = _labels_for_ks(method, ks, f_NTJ, context_NT, decoder)
        boot = bootstrap_stability(method, ks, f_NTJ, context_NT, n_boot=n_boot, seed=seed, full=full) \
            if method != "decoder" else {}
        by_seed = seed_stability(method, ks, f_NTJ, context_NT, decoder, other, ours=full) if other is not None else {}
        for k in ks:
            parts = [v for v in (boot.get(k), by_seed.get(k)) if v is not None and not np.isnan(v)]
            n_eff = effective_clusters(full[k])
            table.append({"method": method, "k": k, "bootstrap_ari": boot.get(k, float("nan")),
                          "seed_ari": by_seed.get(k, float("nan")), "effective_clusters": n_eff,
                          "stability": min(parts) if parts else float("nan")})
    rated = [r for r in table if not np.isnan(r["stability"])]
    if not rated:
        raise ValueError("no (method, k) could be rated: need more latents than the smallest k")
    rated = [r for r in rated if r["effective_clusters"] >= min_effective] or rated
    top = max(r["stability"] for r in rated)
    best = max((r for r in rated if r["stability"] >= top - tolerance), key=lambda r: (r["k"], r["stability"]))
    return Choice(best["method"], best["k"], best["stability"], table)


def matched_ari(labels_a: np.ndarray, labels_b: np.ndarray, pairs: Sequence[tuple[int, int]]) -> float:
    """ARI between two clusterings (e.g. of two crosscoder seeds) over matched latent pairs
    (index in a, index in b)."""
    from sklearn.metrics import adjusted_rand_score

    if len(pairs) < 2:
        return float("nan")
    a, b = zip(*pairs)
    return float(adjusted_rand_score(labels_a[list(a)], labels_b[list(b)]))


# ---------------------------------------------------------------------------- reading the clusters
class ClusterFacts(NamedTuple):
    cluster: int
    size: int
    dominant_context: str
    """The context class holding most of the members' activation mass."""
    purity: float
    """That class's share of the members' activation mass (1 = the cluster fires only there)."""
    context_mass: dict[str, float]
    """Share of the members' activation mass on every context class."""
    mass: float
    """The members' total activation mass (which family carries a context class most)."""


def cluster_facts(labels_J: np.ndarray, signature_JX: np.ndarray, mass_J: np.ndarray) -> list[ClusterFacts]:
    """Per cluster: size, dominant context class and its purity (activation-mass weighted)."""
    C = len(CONTEXTS)
    out = []
    for c in sorted(set(labels_J.tolist())):
        sel = labels_J == c
        ctx = (signature_JX[sel, :C] * mass_J[sel, None]).sum(0)
        share = ctx / max(ctx.sum(), 1e-12)
        top = int(share.argmax())
        out.append(ClusterFacts(int(c), int(sel.sum()), CONTEXTS[top], float(share[top]),
                                {name: float(v) for name, v in zip(CONTEXTS, share)}, float(mass_J[sel].sum())))
    return out


def label_ari(labels_J: np.ndarray, signature_JX: np.ndarray) -> float:
    """ARI between the clusters and each latent's own dominant context class."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(signature_JX[:, :len(CONTEXTS)].argmax(1), labels_J))


def purity_by_label(facts: list[ClusterFacts]) -> dict[str, float]:
    """For each context class, its share of the activation of the family that carries most of it
    (0 if no family fires on it). Asking for the *carrier* -- not the purest family -- keeps a
    one-latent family that fired on a handful of tokens from scoring 1.0 by chance."""
    out = {}
    for name in CONTEXTS:
        carrier = max(facts, key=lambda f: f.mass * f.context_mass[name], default=None)
        fires = carrier is not None and carrier.mass * carrier.context_mass[name] > 0
        out[name] = carrier.context_mass[name] if fires else 0.0
    return out


MIN_FAMILY = 5
"""Latents a family needs before ``dominated_purity`` counts it (a family of one or two latents that
fired on a handful of tokens would otherwise score 1.0 by chance)."""


def dominated_purity(facts: list[ClusterFacts], min_size: int = MIN_FAMILY) -> dict[str, float]:
    """For each context class, the highest purity among families of at least ``min_size`` latents
    that the class dominates (0 if there is none): does the class have a family of its own? A
    complement to ``purity_by_label``, which asks how pure the family carrying most of the class's
    activation is -- for user turns that is usually a large text family, since user requests are
    ordinary English."""
    return {name: max((f.purity for f in facts if f.dominant_context == name and f.size >= min_size), default=0.0)
            for name in CONTEXTS}


def embed_2d(X: np.ndarray, seed: int = 0, metric: str = "cosine") -> np.ndarray:
    """A 2-D t-SNE map of the latents (for figures only; distances on it are not analysed). With
    ``metric="precomputed"``, ``X`` is the square distance matrix."""
    from sklearn.manifold import TSNE

    n = X.shape[0]
    # a zero row has no cosine direction: a tiny offset keeps it defined
    X = X if metric == "precomputed" else X + 1e-12
    return TSNE(n_components=2, random_state=seed, perplexity=float(min(30, max(2, (n - 1) // 3))),
                init="random", metric=metric).fit_transform(X)
