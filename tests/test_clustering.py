"""Latent clustering: planted families of latents are recovered, shuffled activations are not, the
stability criterion picks the planted size, and clusters are read against token context labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from crosscoder.analysis import clustering as cl


def _planted(n_seq=48, T=32, per_group=6, seed=0):
    """Latents in len(CONTEXTS) families: family c fires (jointly, on a shared token-level event)
    only on tokens of context c. Returns f [N, T, J], context [N, T], true family per latent."""
    g = torch.Generator().manual_seed(seed)
    C = len(cl.CONTEXTS)
    ctx = torch.randint(C, (n_seq, T), generator=g)
    ctx[:, 0] = -1  # BOS
    event = torch.rand(n_seq, T, generator=g) < 0.5
    truth = np.repeat(np.arange(C), per_group)
    f = torch.zeros(n_seq, T, C * per_group)
    for j, fam in enumerate(truth):
        fires = (ctx == int(fam)) & event & (torch.rand(n_seq, T, generator=g) < 0.9)
        f[..., j] = fires * (0.5 + torch.rand(n_seq, T, generator=g))
    return f, ctx, truth


@pytest.mark.parametrize("method", ["signature", "cooccurrence"])
def test_planted_families_are_recovered_and_shuffled_ones_are_not(method):
    f, ctx, truth = _planted()
    N, T, J = f.shape
    pos = torch.arange(T).expand(N, T).reshape(-1)
    view = cl.features(method, f.reshape(-1, J), ctx.reshape(-1), pos)
    assert adjusted_rand_score(truth, cl.cluster(method, 4, **view)) >= 0.9
    null = cl.shuffle_activations(f.reshape(-1, J), seed=1)
    null_view = cl.features(method, null, ctx.reshape(-1), pos)
    assert abs(adjusted_rand_score(truth, cl.cluster(method, 4, **null_view))) < 0.15


def test_shuffle_keeps_each_latents_activations_and_breaks_cooccurrence():
    f, _, _ = _planted()
    flat = f.reshape(-1, f.shape[-1])
    null = cl.shuffle_activations(flat, seed=0)
    assert torch.equal(null.sort(0).values, flat.sort(0).values)  # same values per latent
    within = cl.jaccard_similarity(flat)[0, 1:6].mean()
    assert within > 0.5 and cl.jaccard_similarity(null)[0, 1:6].mean() < 0.2


def _naive_signature(f_TJ, context_T, position_T):
    """The dense definition: [J, T] @ [T, C] one-hot products over the valid tokens."""
    valid = context_T >= 0
    f, ctx, pos = f_TJ[valid].double(), context_T[valid], position_T[valid]
    C = torch.nn.functional.one_hot(ctx, len(cl.CONTEXTS)).double()
    band = torch.bucketize(pos, torch.tensor(cl.POSITION_BANDS[1:]), right=True)
    P = torch.nn.functional.one_hot(band, len(cl.POSITION_BANDS)).double()
    mass = f.sum(0).clamp_min(1e-12)[:, None]
    return torch.cat([f.T @ C / mass, f.T @ P / mass], 1).numpy()


def test_sparse_views_equal_the_dense_definitions():
    f, ctx, _ = _planted()
    N, T, J = f.shape
    flat = torch.cat([f.reshape(-1, J), torch.zeros(N * T, 1)], 1)  # plus a latent that never fires
    pos = torch.arange(T).expand(N, T).reshape(-1)
    np.testing.assert_allclose(cl.context_signature(flat, ctx.reshape(-1), pos),
                               _naive_signature(flat, ctx.reshape(-1), pos), rtol=1e-12, atol=1e-12)
    b = (flat > 0).double()
    inter = b.T @ b
    naive = (inter / (b.sum(0)[:, None] + b.sum(0)[None, :] - inter).clamp_min(1e-12)).numpy()
    np.testing.assert_array_equal(cl.jaccard_similarity(flat), naive)


def test_shuffle_places_a_latents_activation_uniformly():
    """One nonzero among 8 tokens: over many seeds it lands on every token about equally often
    (a uniform permutation), and two nonzeros never collide."""
    f = torch.zeros(8, 2)
    f[3, 0], f[[1, 6], 1] = 1.0, torch.tensor([2.0, 3.0])
    hits = np.zeros(8)
    for s in range(800):
        null = cl.shuffle_activations(f, seed=s)
        hits[int(null[:, 0].argmax())] += 1
        assert sorted(null[:, 1].tolist()) == [0.0] * 6 + [2.0, 3.0]
    assert hits.min() > 60 and hits.max() < 140  # expected 100 each; a 5-sigma band is 50-150


def test_stability_selects_the_planted_number_of_families():
    f, ctx, truth = _planted()
    choice = cl.select_clustering(f, ctx, methods=("signature",), ks=(2, 4, 8), n_boot=3)
    assert choice.k == 4 and choice.stability >= 0.9
    by_k = {r["k"]: r["stability"] for r in choice.table}
    assert by_k[8] < 0.75  # splitting a family in two is not reproducible across resamples


def test_seed_stability_on_matched_latents():
    f, ctx, truth = _planted()
    J = f.shape[-1]
    perm = torch.randperm(J, generator=torch.Generator().manual_seed(3))
    # a "second seed": the same families in another latent order, with fresh firing noise
    keep = torch.rand(f.shape, generator=torch.Generator().manual_seed(4)) > 0.2  # a fifth of the firings differ
    f2 = (f * keep)[..., perm]
    other = cl.SeedView(f2, None, [(int(perm[i]), i) for i in range(J)])
    assert cl.seed_stability("cooccurrence", [4], f, ctx, None, other)[4] >= 0.9
    shuffled = cl.SeedView(cl.shuffle_activations(f2.reshape(-1, J)).reshape(f2.shape), None, other.pairs)
    assert cl.seed_stability("cooccurrence", [4], f, ctx, None, shuffled)[4] < 0.2
    choice = cl.select_clustering(f, ctx, other=other, methods=("signature", "cooccurrence"), ks=(2, 4, 8), n_boot=2,
                                  min_pairs=10)
    assert all(np.isnan(r["seed_ari"]) for r in cl.select_clustering(f, ctx, other=other, ks=(4,), n_boot=1).table)
    assert choice.k == 4 and all(not np.isnan(r["seed_ari"]) for r in choice.table)


def test_matched_ari_is_invariant_to_renaming_and_uses_only_matched_latents():
    a = np.array([0, 0, 1, 1, 2, 2])
    perm = [4, 0, 5, 1, 3, 2]  # a-latent i is b-latent perm[i]
    b = np.full(8, 9)  # b has two unmatched latents (ids 6, 7) in a cluster of their own
    for i, j in enumerate(perm):
        b[j] = {0: 7, 1: 3, 2: 5}[int(a[i])]  # the same partition under other cluster ids
    pairs = list(enumerate(perm))
    assert cl.matched_ari(a, b, pairs) == pytest.approx(1.0)
    b[perm[0]], b[perm[2]] = b[perm[2]], b[perm[0]]  # two latents swap families
    assert cl.matched_ari(a, b, pairs) < 0.5
    assert np.isnan(cl.matched_ari(a, b, pairs[:1]))


def test_cluster_facts_purity_is_activation_mass_weighted():
    C = len(cl.CONTEXTS)
    sig = np.zeros((4, C + len(cl.POSITION_BANDS)))
    sig[0, 1] = 1.0  # all template
    sig[1, 1], sig[1, 2] = 0.5, 0.5  # half template, half user
    sig[2, 3] = 1.0  # all model
    sig[3, 2] = 1.0  # all user, but fired on almost nothing
    facts = cl.cluster_facts(np.array([0, 0, 1, 2]), sig, mass_J=np.array([3.0, 1.0, 2.0, 0.01]))
    assert facts[0].dominant_context == "template" and facts[0].purity == pytest.approx(3.5 / 4)
    assert facts[1].dominant_context == "model" and facts[1].purity == 1.0
    assert facts[2].purity == 1.0 and facts[2].mass == pytest.approx(0.01)
    # each class is read in the family that carries most of it: the tiny pure family does not win
    assert cl.purity_by_label(facts) == {"text": 0.0, "template": pytest.approx(0.875), "user": pytest.approx(0.125),
                                         "model": 1.0}


class _Tok:
    """The few tokenizer calls context_labels makes, over a toy vocabulary."""

    vocab = ["<bos>", "<start_of_turn>", "<end_of_turn>", "user", "model", "\n", "hi", "there", "<pad>"]

    def convert_tokens_to_ids(self, t):
        return self.vocab.index(t)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_context_labels_parse_the_chat_template():
    v = _Tok.vocab.index
    chat = ["<bos>", "<start_of_turn>", "user", "\n", "hi", "<end_of_turn>", "\n", "<start_of_turn>", "model",
            "\n", "there", "there", "<end_of_turn>", "\n", "<pad>"]
    text = ["<bos>", "hi", "there", "hi"] + ["<pad>"] * 11
    ids = torch.tensor([[v(t) for t in chat], [v(t) for t in text]])
    mask = ids != v("<pad>")
    got = cl.context_labels(ids, mask, torch.tensor([True, False]), _Tok())
    TEXT, TPL, USER, MODEL = range(4)
    assert got[0].tolist() == [-1, TPL, TPL, TPL, USER, TPL, TPL, TPL, TPL, TPL, MODEL, MODEL, TPL, TPL, -1]
    assert got[1].tolist() == [-1, TEXT, TEXT, TEXT] + [-1] * 11


def test_one_cluster_plus_crumbs_is_flagged_and_chosen_only_when_nothing_else_is():
    assert cl.effective_clusters(np.array([0, 0, 1, 1, 2, 2, 3, 3])) == pytest.approx(4.0)
    assert cl.effective_clusters(np.array([0] * 97 + [1, 2, 3])) < 1.2
    f, ctx, truth = _planted()
    choice = cl.select_clustering(f, ctx, methods=("signature",), ks=(2, 4), n_boot=2)
    assert choice.k == 4 and next(r for r in choice.table if r["k"] == 4)["effective_clusters"] > 3.5
    # 30 latents firing together on every token and 3 rare loners: every clustering is one big
    # cluster plus singletons; the most stable is returned only because nothing better exists,
    # and its effective number of clusters says so
    N, T = f.shape[:2]
    dense = torch.ones(N, T, 30) * torch.rand(N, T, 1, generator=torch.Generator().manual_seed(5))
    loners = torch.zeros(N, T, 3)
    for j in range(3):
        loners[j, 1 + j, j] = 1.0
    f_deg = torch.cat([dense, loners], -1)
    deg = cl.select_clustering(f_deg, ctx, methods=("signature", "cooccurrence"), ks=(4,), n_boot=2)
    assert all(r["effective_clusters"] < 1.5 for r in deg.table)
    assert deg.stability == max(r["stability"] for r in deg.table)


def test_a_real_clustering_beats_an_equally_stable_degenerate_one():
    """Dense latents in four families that fire on every token but put their mass on different
    contexts, plus three rare loners: co-occurrence sees one block plus crumbs (degenerate, stable
    for a trivial reason), the context signature sees the four families. The degenerate view must
    not win, however stable it is."""
    g = torch.Generator().manual_seed(3)
    N, T, C, per = 48, 32, len(cl.CONTEXTS), 6
    ctx = torch.randint(C, (N, T), generator=g)
    ctx[:, 0] = -1
    truth = np.repeat(np.arange(C), per)
    f = torch.empty(N, T, C * per)
    for j, fam in enumerate(truth):
        home = (ctx == int(fam)).float()
        f[..., j] = 0.05 + 0.95 * home + 0.02 * torch.rand(N, T, generator=g)
    loners = torch.zeros(N, T, 3)
    for j in range(3):
        loners[j, 1 + j, j] = 1.0
    f = torch.cat([f, loners], -1)
    choice = cl.select_clustering(f, ctx, methods=("cooccurrence", "signature"), ks=(4,), n_boot=3)
    rows = {r["method"]: r for r in choice.table}
    assert rows["cooccurrence"]["effective_clusters"] < 2.0  # one block plus the three loners: degenerate
    assert rows["cooccurrence"]["stability"] >= rows["signature"]["stability"] - 0.02  # as stable, or more
    assert choice.method == "signature" and rows["signature"]["effective_clusters"] > 3.5
    labels = cl.cluster("signature", 4, **cl.features("signature", f.reshape(-1, f.shape[-1]), ctx.reshape(-1),
                                                      torch.arange(T).expand(N, T).reshape(-1)))
    assert adjusted_rand_score(truth, labels[:len(truth)]) >= 0.9


def test_dominated_purity_finds_each_planted_familys_own_cluster():
    from crosscoder.analysis import families

    f, ctx, truth = _planted()
    N, T, J = f.shape
    flat, pos = f.reshape(-1, J), torch.arange(T).expand(N, T).reshape(-1)
    labels = cl.cluster("signature", 4, **cl.features("signature", flat, ctx.reshape(-1), pos))
    facts = cl.cluster_facts(labels, cl.context_signature(flat, ctx.reshape(-1), pos), flat.sum(0).double().numpy())
    own = cl.dominated_purity(facts, min_size=6)
    assert all(v > 0.95 for v in own.values())  # each context's family fires only there
    assert all(v == 0.0 for v in cl.dominated_purity(facts, min_size=7).values())  # families of 6 are too small
    null = cl.shuffle_activations(flat, seed=1)
    null_labels = cl.cluster("signature", 4, **cl.features("signature", null, ctx.reshape(-1), pos))
    null_facts = cl.cluster_facts(null_labels, cl.context_signature(null, ctx.reshape(-1), pos),
                                  flat.sum(0).double().numpy())
    assert max(cl.dominated_purity(null_facts, min_size=6).values()) < 0.5  # shuffled: no context has its own
    summary = {"method": "signature", "k": 4, "bootstrap_ari": 1.0, "seed_ari": float("nan"), "matched_latents": None,
               "context_ari": 1.0, "null_context_ari": 0.0,
               **{f"own_family_purity_{c}": v for c, v in own.items()},
               **{f"null_own_family_purity_{c}": 0.0 for c in cl.CONTEXTS}}
    text = families.summary_finding(summary)
    assert "each have a family of their own" in text and "no second seed" in text
    summary["own_family_purity_user"] = 0.5
    assert "user has no family of 5+ latents" in families.summary_finding(summary)
    summary["matched_latents"] = 3
    assert "shares only 3 latents" in families.summary_finding(summary)
    summary.update(matched_latents=40, seed_ari=0.6, bootstrap_ari=float("nan"), own_family_purity_template=0.1,
                   own_family_purity_model=0.2)
    text = families.summary_finding(summary)
    assert "seed ARI 0.60 on 40 latents" in text and "no bootstrap" in text
    assert "template, user and model have no family" in text


@pytest.mark.parametrize("method", ["signature", "cooccurrence", "decoder"])
def test_one_tree_cut_at_every_k_equals_a_fit_per_k(method):
    """``cluster_ks`` fits once and cuts the tree at each k: the labels of a fit per k, numbering
    included (the page names families by their label)."""
    g = torch.Generator().manual_seed(4)
    f = (torch.rand(400, 60, generator=g) < 0.15) * torch.rand(400, 60, generator=g)
    ctx, pos = torch.randint(len(cl.CONTEXTS), (400,), generator=g), torch.randint(1, 128, (400,), generator=g)
    view = cl.features(method, f, ctx, pos, torch.randn(60, 12, generator=g).numpy())
    ks = [2, 4, 7, 12, 30]
    got = cl.cluster_ks(method, ks, **view)
    for k in ks:
        np.testing.assert_array_equal(got[k], cl.cluster(method, k, **view))


def test_jaccard_is_exact_on_the_sparse_and_the_dense_path():
    """Sparse latents (BatchTopK) take scipy's sparse product, dense ones (L1: ~12% of latents fire
    per token) a BLAS product of the tokens where anything fires: both give the naive counts."""
    g = torch.Generator().manual_seed(2)
    for density, dense in ((0.01, False), (0.3, True)):
        f = (torch.rand(300, 80, generator=g) < density) * torch.rand(300, 80, generator=g)
        f[::7] = 0.0  # tokens where nothing fires (BOS, padding)
        assert cl._dense_is_faster((f > 0).sum(1), 80) is dense
        b = (f > 0).double()
        inter = b.T @ b
        naive = (inter / (b.sum(0)[:, None] + b.sum(0)[None, :] - inter).clamp_min(1e-12)).numpy()
        np.testing.assert_array_equal(cl.jaccard_similarity(f), naive)
