"""The BatchTopK step's fast paths (issue #25, "Speed"): the encoder gradient formed row-major and
copied once into W_enc's layout, the 1-D gathers by index_select, and AuxK's dead columns by their
indices. Each is checked against the plain formulation it replaced (same values); the step's losses
and gradients against the readable reference are tested in test_core.py and test_sparse_l1.py."""

from __future__ import annotations

import warnings

import torch

from crosscoder.config import CrosscoderConfig
from crosscoder.kernels import _Active, _sparse_dW_enc, auxk_loss, select_batch_topk, training_step
from crosscoder.model import Crosscoder

warnings.filterwarnings("ignore", message=".*Sparse.*")


def test_sparse_encoder_gradient_equals_dense_product_in_w_enc_layout():
    g = torch.Generator().manual_seed(0)
    B, K, F, k = 64, 24, 96, 5
    x_BK = torch.randn(B, K, generator=g)
    idx_N = select_batch_topk(torch.randn(B, F, generator=g).relu_(), k * B)
    act = _Active.index(idx_N // F, idx_N % F, B, F)
    g_N = torch.randn(idx_N.numel(), generator=g)
    G_BF = torch.zeros(B * F).index_put_((idx_N,), g_N).view(B, F)
    dW_enc_KF, db_enc_F = _sparse_dW_enc(act, g_N, x_BK)
    assert dW_enc_KF.shape == (K, F) and dW_enc_KF.is_contiguous()  # autograd keeps it (no copy)
    torch.testing.assert_close(dW_enc_KF, x_BK.t() @ G_BF)
    torch.testing.assert_close(db_enc_F, G_BF.sum(0))


def test_selection_equals_flat_topk():
    g = torch.Generator().manual_seed(1)
    for B, F, k in ((64, 96, 5), (128, 40, 3), (16, 8, 8)):
        score = torch.randn(B, F, generator=g).relu_()
        n_keep = min(k * B, B * F)
        got = select_batch_topk(score, n_keep)
        assert torch.equal(torch.sort(score.view(-1)[got]).values,
                           torch.sort(torch.topk(score.view(-1), n_keep).values).values)
        assert torch.equal(got, got.sort().values) and got.unique().numel() == n_keep


def test_step_gradients_have_the_parameters_layout_and_auxk_uses_the_dead_columns():
    cfg = CrosscoderConfig(d_model=12, n_latents=80, sparsity="batchtopk", k=4)
    m = Crosscoder(cfg, generator=torch.Generator().manual_seed(2))
    x = torch.randn(48, 2, 12, generator=torch.Generator().manual_seed(3))
    dead_F = torch.arange(80) % 3 == 1
    out = training_step(m, x, 0.0, dead_F=dead_F, k_aux=6, auxk_alpha=0.5)
    out.loss.backward()
    for p in m.parameters():
        assert p.grad.stride() == p.stride()
    # AuxK with the step's ranking scores equals AuxK recomputing them (the column gather is exact)
    recon = m.decode(m.encode(x, use_threshold=False)).detach()
    with torch.no_grad():
        torch.testing.assert_close(out.aux_loss, auxk_loss(m, x, x - recon, dead_F, 6), rtol=1e-5, atol=1e-6)
