"""The L1 step's sparse path (decode and gradients from the active latents only) against its fused
dense path and the readable autograd loss, on both sides of the density switch, and a training run
that crosses the switch resuming bit-identically."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from crosscoder import kernels
from crosscoder.config import CrosscoderConfig, TrainConfig
from crosscoder.kernels import l1_step, training_step
from crosscoder.model import Crosscoder
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.synthetic import SyntheticConfig, sample
from crosscoder.train import TensorBatches, train
from crashing import crash_and_resume

warnings.filterwarnings("ignore", message=".*Sparse.*")

B, D, F = 48, 12, 64


def _model_at_density(density: float, S: int = 2, decoder_norm: str = "sum", seed: int = 0):
    """A perturbed L1 crosscoder and a batch on which ``density`` of its [B, F] latents fire: each
    latent's bias puts its threshold at the matching quantile of its pre-activations."""
    cfg = CrosscoderConfig(d_model=D, n_latents=F, n_sources=S, decoder_norm=decoder_norm)
    m = Crosscoder(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    x_BSD = torch.randn(B, S, D, generator=g)
    with torch.no_grad():  # move away from the symmetric init so every gradient term matters
        m.b_dec_SD.copy_(torch.randn(S, D, generator=g))
        m.W_dec_FSD.mul_(1 + 3 * torch.rand(F, S, 1, generator=g))
        m.W_enc_SDF.add_(0.05 * torch.randn(S, D, F, generator=g))
        pre_BF = m.pre_acts(x_BSD)
        n_on = round(density * B)
        if n_on == 0:
            m.b_enc_F.fill_(-1e3)
        elif n_on == B:
            m.b_enc_F.fill_(1e3)
        else:  # midway between the n_on-th and (n_on+1)-th largest pre-activation of each latent
            top = pre_BF.topk(n_on + 1, dim=0).values
            m.b_enc_F.copy_(-(top[-1] + top[-2]) / 2)
    return m, x_BSD


def _loss_and_grads(m: Crosscoder, x_BSD, lam: float, path: str):
    m.zero_grad(set_to_none=True)
    out = l1_step(m, x_BSD, lam, path=path) if path != "reference" else m.loss(x_BSD, lam)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("density", [0.0, 1 / 48, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("S, decoder_norm", [(2, "sum"), (2, "joint"), (2, "mixed"), (2, "none"), (3, "sum")])
def test_sparse_and_dense_paths_agree(density, S, decoder_norm):
    m, x = _model_at_density(density, S, decoder_norm)
    lam = 0.7
    dense, g_dense = _loss_and_grads(m, x, lam, "dense")
    sparse, g_sparse = _loss_and_grads(m, x, lam, "sparse")
    ref, g_ref = _loss_and_grads(m, x, lam, "reference")
    assert dense.l0.item() == pytest.approx(round(density * B) / B * F, abs=1e-5)  # per latent: whole tokens
    assert torch.equal(sparse.n_active_F, dense.n_active_F) and torch.equal(sparse.l0, dense.l0)
    for a, b in [(sparse, dense), (dense, ref)]:
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.recon_loss, b.recon_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.sparsity_loss, b.sparsity_loss, rtol=1e-5, atol=1e-6)
    for n in g_dense:
        torch.testing.assert_close(g_sparse[n], g_dense[n], rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(g_dense[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)
    if density == 0.0:  # nothing fires: no encoder gradient, and no penalty gradient either
        assert g_sparse["W_enc_SDF"].abs().max() == 0 and g_sparse["b_enc_F"].abs().max() == 0
        assert sparse.sparsity_loss.item() == 0.0


def test_sparse_path_includes_the_decoder_norm_penalty_gradient():
    """With lambda alone (no reconstruction gradient to hide behind) the decoder gradient is
    the penalty's: only latents that fired get one, and the sparse path matches the dense one."""
    m, x = _model_at_density(0.05)
    with torch.no_grad():
        m.b_enc_F[::2] = -1e3  # half the latents never fire
    grads = {}
    for path in ("dense", "sparse"):
        m.zero_grad(set_to_none=True)
        full = l1_step(m, x, 1.0, path=path).loss
        recon_only = l1_step(m, x, 0.0, path=path).loss
        (full - recon_only).backward()  # lambda * l1 alone
        grads[path] = m.W_dec_FSD.grad.clone()
    fired_F = (m.encode(x) > 0).any(0)
    assert 0 < int(fired_F.sum()) < F
    assert grads["sparse"][fired_F].abs().amax(dim=(1, 2)).min() > 0
    assert grads["sparse"][~fired_F].abs().max() == 0
    torch.testing.assert_close(grads["sparse"], grads["dense"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("decoder_norm", ["sum", "joint"])
def test_folded_model_paths_agree_with_reference(decoder_norm):
    """A folded model weights its penalty by norms in normalised space (scaled per source)."""
    m, x = _model_at_density(0.1, decoder_norm=decoder_norm)
    with torch.no_grad():
        m.input_scale_S.copy_(torch.tensor([0.4, 2.5]))
    m = m.fold().train()
    if decoder_norm == "sum":  # (the joint norm's reference gradient is NaN at a zero row)
        with torch.no_grad():
            m.W_dec_FSD[3].zero_()  # a zero decoder row: its norm has no gradient
    grads = {path: _loss_and_grads(m, x, 0.7, path)[1] for path in ("dense", "sparse", "reference")}
    for n in grads["reference"]:
        torch.testing.assert_close(grads["dense"][n], grads["reference"][n], rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(grads["sparse"][n], grads["reference"][n], rtol=1e-4, atol=1e-5, msg=n)


def test_auto_switches_at_the_measured_density(monkeypatch):
    m, x = _model_at_density(0.25)
    taken = []
    for name in ("_l1_dense", "_l1_sparse"):
        inner = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=inner, _n=name: taken.append(_n) or _f(*a))
    for max_density, expect in [(0.25, "_l1_sparse"), (0.2, "_l1_dense"), (-1.0, "_l1_dense")]:
        monkeypatch.setitem(kernels.L1_SPARSE_MAX_DENSITY, "cpu", max_density)
        training_step(m, x, 0.5)
        assert taken.pop() == expect, max_density
    monkeypatch.delitem(kernels.L1_SPARSE_MAX_DENSITY, "cpu")  # an unmeasured device: always dense
    training_step(m, x, 0.5)
    assert taken.pop() == "_l1_dense"
    with pytest.raises(ValueError, match="path must be"):
        l1_step(m, x, 0.5, path="csr")


def test_measured_crossover_is_a_density():
    assert 0.0 < kernels.L1_SPARSE_MAX_DENSITY["cpu"] < 1.0


def test_run_across_the_switch_resumes_bit_identically_and_tracks_dense(tmp_path, monkeypatch):
    """The switch sits between the init density and the trained one, so the run takes both paths;
    killed and resumed it ends bit-identical, and it stays close to the dense-only run."""
    sc = SyntheticConfig(d_model=16, n_shared=20, n_base_only=4, n_chat_only=4)
    acts, ho = sample(sc, 8192).acts_NSD, sample(sc, 1024, seed_offset=1).acts_NSD
    cfg = CrosscoderConfig(d_model=16, n_latents=48)
    tc = TrainConfig(n_steps=40, batch_size=256, lr=3e-3, l1_coeff=0.5, log_every=5, checkpoint_every=10,
                     eval_every=20)

    def fresh():
        m = Crosscoder(cfg, generator=torch.Generator().manual_seed(0))
        m.input_scale_S.copy_(estimate_input_scale(ho))
        return m

    monkeypatch.setitem(kernels.L1_SPARSE_MAX_DENSITY, "cpu", -1.0)
    dense = train(fresh(), TensorBatches(acts, 256), tc, tmp_path / "dense", heldout_raw_NSD=ho, progress=False)
    log = [line for line in (tmp_path / "dense" / "log.jsonl").read_text().splitlines() if '"train"' in line]
    l0s = [json.loads(line)["l0"] / cfg.n_latents for line in log]
    switch = (l0s[0] + l0s[-1]) / 2
    assert l0s[-1] < switch < l0s[0], l0s
    monkeypatch.setitem(kernels.L1_SPARSE_MAX_DENSITY, "cpu", switch)
    ref, res = crash_and_resume(fresh, acts, ho, tc, tmp_path)
    assert res.resumed_from == 20
    # Summation order differs, so not bit-equal to dense-only, but the same optimisation.
    for k, v in dense.model.state_dict().items():
        torch.testing.assert_close(ref.model.state_dict()[k], v, rtol=1e-3, atol=1e-4, msg=k)
