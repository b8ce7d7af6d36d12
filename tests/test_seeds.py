"""Seed matching (crosscoder.analysis.seeds) on crosscoders with planted shared decoder rows."""

import pytest
import torch

from crosscoder.analysis import seeds
from crosscoder.config import ConfigError, CrosscoderConfig
from crosscoder.model import Crosscoder

D, F = 16, 32


def _cc(W_FSD, scale=(1.0, 1.0)):
    cc = Crosscoder(CrosscoderConfig(d_model=D, n_latents=W_FSD.shape[0], sparsity="l1"))
    with torch.no_grad():
        cc.W_dec_FSD.copy_(W_FSD)
        cc.input_scale_S.copy_(torch.tensor(scale))
    return cc


@pytest.fixture()
def runs():
    g = torch.Generator().manual_seed(0)
    W_a = torch.randn(F, 2, D, generator=g)
    W_a[:4, 0] = 0.0  # latents 0-3 are chat-only
    perm = torch.randperm(F, generator=g)
    W_b = W_a[perm] + 0.05 * torch.randn(F, 2, D, generator=g)  # same dictionary, permuted + noise
    W_b[perm == 2] = torch.randn(1, 2, D, generator=g)  # ...except latent 2 of A, which B lacks
    W_c = torch.randn(F, 2, D, generator=g)  # an unrelated dictionary
    return _cc(W_a), _cc(W_b), _cc(W_c), perm


def test_match_finds_the_permuted_latents(runs):
    a, b, c, perm = runs
    m = seeds.match_latents(a, b, [0, 1, 2, 3])
    inv = torch.argsort(perm)  # A's latent i sits at B index inv[i]
    assert m.best_latent[[0, 1, 3]].tolist() == inv[[0, 1, 3]].tolist()
    assert (m.best_cos[[0, 1, 3]] > 0.95).all()
    assert m.best_cos[2] < 0.9
    assert (seeds.match_latents(a, c, [0, 1, 2, 3]).best_cos < 0.9).all()


def test_concatenated_decoder_tells_chat_only_from_shared_with_the_same_chat_direction():
    g = torch.Generator().manual_seed(1)
    W_a = torch.randn(2, 2, D, generator=g)
    W_a[0, 0] = 0.0  # A's latent 0: chat-only
    W_b = W_a.clone()
    W_b[0, 0] = torch.randn(D, generator=g) * W_a[0, 1].norm()  # B's latent 0: same chat half, shared
    a, b = _cc(W_a), _cc(W_b)
    assert seeds.match_latents(a, b, [0], [0], source=1).best_cos[0] > 0.99
    assert seeds.match_latents(a, b, [0], [0]).best_cos[0] < 0.9


def test_folding_does_not_change_matches(runs):
    a, b, _, _ = runs
    a2 = _cc(a.W_dec_FSD.detach().clone(), scale=(0.5, 2.0))
    folded = a2.fold()
    assert torch.allclose(seeds.decoder_rows(folded), seeds.decoder_rows(a2), atol=1e-5)


def test_reappearance_counts(runs):
    a, b, c, perm = runs
    inv = torch.argsort(perm)
    models = {"s0": a, "s1": b, "s2": c}
    sel = {"s0": [0, 1, 2, 3], "s1": inv[[0, 1, 2, 3]].tolist(), "s2": [0, 1]}
    rows = {(r["run"], r["other"]): r for r in seeds.reappearance(models, sel)}
    assert rows[("s0", "s1")]["reappear"] == 3
    assert rows[("s1", "s0")]["reappear"] == 3
    assert rows[("s0", "s2")]["reappear"] == 0
    assert rows[("s0", "all others")]["reappear"] == 0
    two = {(r["run"], r["other"]): r for r in seeds.reappearance({"s0": a, "s1": b}, sel)}
    assert two[("s0", "all others")]["reappear"] == 3
    # among_all: B's selected set excludes its copy of A's latent 1 -> found only when searching all.
    sel_b = {"s0": [1], "s1": [int(inv[0])]}
    assert seeds.reappearance({"s0": a, "s1": b}, sel_b)[0]["reappear"] == 0
    assert seeds.reappearance({"s0": a, "s1": b}, sel_b, among_all=True)[0]["reappear"] == 1
    with pytest.raises(ConfigError):
        seeds.reappearance({"s0": a}, sel)
