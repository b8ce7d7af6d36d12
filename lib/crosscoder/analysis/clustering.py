"""Latent clustering of decoder directions and of activation co-occurrence (scikit-learn)."""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np
from torch import Tensor

class Clustering(NamedTuple):
    labels: np.ndarray
    """Cluster of each latent."""
    n_clusters: int
    """Chosen number of clusters."""
    silhouette_by_k: dict[int, float]
    """Silhouette score for each candidate k (the choice is its argmax)."""
    embedding_2d: np.ndarray
    """2-D embedding of the latents for plotting."""


def cluster_latents(
    features_LX: np.ndarray,
    k_range: Iterable[int] = range(2, 13),
    *,
    metric: str = "cosine",
    seed: int = 0,
    embed: str = "pca",
) -> Clustering:
    """KMeans on L2-normalised feature rows (so Euclidean ~ cosine distance), k chosen by the
    silhouette score, plus a PCA or t-SNE embedding for the map."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import normalize

    X = normalize(np.asarray(features_LX, dtype=np.float64)) if metric == "cosine" else np.asarray(features_LX)
    ks = [k for k in k_range if 2 <= k < X.shape[0]]
    if not ks:
        raise ValueError(f"need more latents ({X.shape[0]}) than the smallest k in k_range")
    scores, fits = {}, {}
    for k in ks:
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(X)
        fits[k] = km.labels_
        scores[k] = float(silhouette_score(X, km.labels_, metric="euclidean"))
    best = max(scores, key=scores.get)
    if embed == "tsne" and X.shape[0] > 5:
        emb = TSNE(n_components=2, random_state=seed, perplexity=min(30, X.shape[0] - 1), init="pca").fit_transform(X)
    else:
        emb = PCA(n_components=2, random_state=seed).fit_transform(X)
    return Clustering(fits[best], best, scores, emb)


def cooccurrence_features(f_NF: Tensor, latents: Tensor) -> np.ndarray:
    """Rows = latents, columns = tokens: binary firing patterns, whose cosine similarity is the
    normalised co-occurrence of two latents (clustered like decoder directions)."""
    return (f_NF[:, latents] > 0).float().T.numpy()


def cluster_summary(labels_L: np.ndarray, n_clusters: int, latents_L: Tensor, classes: list[str],
                    describe) -> list[dict]:
    """One row per cluster: size, class mix and ``describe(member latent ids)`` (e.g. the tokens the
    members' mean chat decoder direction promotes)."""
    import torch

    rows = []
    names = ("chat-only", "base-only", "shared", "other")
    for c in range(n_clusters):
        members = latents_L[torch.from_numpy(labels_L == c)]
        mix = [classes[j] for j in members.tolist()]
        rows.append({"cluster": c, "size": len(members), **{k: mix.count(k) for k in names}, **describe(members)})
    return rows


def cooccurrence_clusters(f_NJ: Tensor, *, max_k: int = 8, seed: int = 0, min_latents: int = 6
                          ) -> tuple[int, Clustering] | None:
    """Latents that fire on the same tokens, clustered by the cosine of their binary firing patterns;
    latents that never fire are left out. None when fewer than ``min_latents`` fire."""
    import torch

    feats = cooccurrence_features(f_NJ, torch.arange(f_NJ.shape[1]))
    live = feats.sum(1) > 0
    n_live = int(live.sum())
    if f_NJ.shape[1] < min_latents or n_live < 3:
        return None
    return n_live, cluster_latents(feats[live], range(2, min(max_k, n_live - 1) + 1), seed=seed)
