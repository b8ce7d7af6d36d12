"""CrosscoderConfig.centre_inputs: each source's mean (from the norm split) is subtracted before the
encoder and added back after the decoder, for residual streams whose mean is most of their norm."""

from __future__ import annotations

import pytest
import torch

from crosscoder.analysis.scaling import latent_scaling
from crosscoder.checkpoint import load_crosscoder, save_crosscoder
from crosscoder.config import ConfigError, CrosscoderConfig
from crosscoder.model import Crosscoder


def _data(seed=1, n=256):
    g = torch.Generator().manual_seed(seed)
    mean_SD = torch.randn(2, 8, generator=g) * 10  # the mean dominates every token's norm
    return mean_SD, mean_SD + torch.randn(n, 2, 8, generator=g) * torch.tensor([1.0, 3.0])[None, :, None]


def _model(centre, sparsity="batchtopk", seed=0):
    cfg = CrosscoderConfig(d_model=8, n_latents=32, sparsity=sparsity, k=4, centre_inputs=centre)
    m = Crosscoder(cfg, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # biases away from zero, so that folding them is exercised
        m.b_enc_F.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        m.b_dec_SD.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 2))
    return m


def test_normalisation_centres_and_scales_on_the_centred_split():
    mean_SD, x = _data()
    m = _model(True).fit_normalisation_(x)
    torch.testing.assert_close(m.input_mean_SD, x.mean(0))
    z = m.normalise(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(2, 8), atol=1e-5, rtol=0)
    # E||x_s|| = sqrt(D) holds for the centred activations (without centring, for the raw ones)
    torch.testing.assert_close(z.norm(dim=-1).mean(0), torch.full((2,), 8 ** 0.5), rtol=1e-5, atol=0)
    torch.testing.assert_close(m.denormalise(z), x, rtol=1e-5, atol=1e-4)
    plain = _model(False).fit_normalisation_(x)
    assert torch.equal(plain.input_mean_SD, torch.zeros(2, 8))
    torch.testing.assert_close(plain.normalise(x).norm(dim=-1).mean(0), torch.full((2,), 8 ** 0.5))
    # the raw scale is several times smaller: the mean, not the signal, sets it
    assert (m.input_scale_S > 2 * plain.input_scale_S).all()
    with pytest.raises(ConfigError, match="centre_inputs needs activations"):
        _model(True).fit_normalisation_(None)


@pytest.mark.parametrize("sparsity", ["l1", "batchtopk"])
def test_fold_bakes_the_mean_into_the_biases(sparsity):
    _, x = _data()
    m = _model(True, sparsity).fit_normalisation_(x)
    if sparsity == "batchtopk":
        m.threshold.fill_(0.05)  # per-token inference, so that a batch's composition does not matter
    m.eval()
    out = m(m.normalise(x))
    folded = m.fold()
    fout = folded(folded.normalise(x))
    torch.testing.assert_close(fout.f_BF, out.f_BF, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fout.recon_BSD, m.denormalise(out.recon_BSD), rtol=1e-4, atol=1e-3)
    assert (out.f_BF > 0).any()
    # Latent Scaling's betas are computed in the unfolded space whether or not the model is folded
    J = torch.nonzero((out.f_BF > 0).sum(0) >= 3).flatten()[:5]
    a, b = latent_scaling(m, x, J), latent_scaling(folded, x, J)
    torch.testing.assert_close(b.beta_recon_S, a.beta_recon_S, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b.beta_error_S, a.beta_error_S, rtol=1e-3, atol=1e-4)


def test_the_mean_round_trips_and_old_folders_load_uncentred(tmp_path):
    _, x = _data()
    m = _model(True).fit_normalisation_(x)
    save_crosscoder(m, tmp_path / "cc")
    back = load_crosscoder(tmp_path / "cc")
    assert back.cfg.centre_inputs and torch.equal(back.input_mean_SD, m.input_mean_SD)
    torch.testing.assert_close(back.normalise(x), m.normalise(x))
    # a state dict written before the mean existed loads with zeros: what it computed then
    plain = _model(False).fit_normalisation_(x)
    state = {k: v for k, v in plain.state_dict().items() if k != "input_mean_SD"}
    again = Crosscoder(plain.cfg)
    again.load_state_dict(state)
    assert torch.equal(again.input_mean_SD, torch.zeros(2, 8))
    torch.testing.assert_close(again.normalise(x), plain.normalise(x))


def test_fresh_training_model_is_centred_on_the_norm_split(tmp_path):
    """Every path that makes a training model from in-memory activations (``experiment.splits_from``,
    as the scoreboard's null and seed copies do) centres it: a second seed of a centred run trains."""
    from crosscoder import experiment
    from crosscoder.config import TrainConfig

    _, norm = _data(seed=2, n=64)
    splits = experiment.splits_from(norm.half(), norm, norm)
    cfg = CrosscoderConfig(d_model=8, n_latents=32, sparsity="batchtopk", k=4, centre_inputs=True)
    tcfg = TrainConfig(n_steps=4, batch_size=16, eval_every=4, log_every=2)
    model = experiment._fresh_model(cfg, tcfg, splits, "cpu")
    torch.testing.assert_close(model.input_mean_SD, norm.mean(0))
    torch.testing.assert_close(model.normalise(norm).mean(0), torch.zeros(2, 8), atol=1e-5, rtol=0)
    experiment.train_crosscoder(splits, cfg, tcfg, tmp_path / "run", progress=False)
    assert experiment.seed_replicas(tmp_path, "run", [], splits, progress=False) == {}  # no seed: nothing trained
    again = experiment.seed_replicas(tmp_path, "run", [1], splits, progress=False)[1]
    assert again.cfg.centre_inputs and not torch.equal(again.W_dec_FSD, model.W_dec_FSD)
    torch.testing.assert_close(again.input_mean_SD, norm.mean(0))
