"""CrosscoderConfig.b_dec_init = "data_mean": the biases start at the data's mean, so every latent
first reads the centred activation (residual streams whose mean is most of their norm)."""

from __future__ import annotations

import pytest
import torch

from crosscoder.config import ConfigError, CrosscoderConfig
from crosscoder.model import Crosscoder


def _model(init, seed=0):
    m = Crosscoder(CrosscoderConfig(d_model=8, n_latents=32, sparsity="batchtopk", k=4, b_dec_init=init),
                   generator=torch.Generator().manual_seed(seed))
    m.input_scale_S.copy_(torch.tensor([0.5, 2.0]))
    return m


def test_data_mean_init_centres_encoder_and_decoder():
    g = torch.Generator().manual_seed(1)
    mean_SD = torch.randn(2, 8, generator=g) * 10
    x_raw = mean_SD + torch.randn(64, 2, 8, generator=g)
    zero, centred = _model("zero"), _model("data_mean")
    assert centred.centre_on_(mean_SD) is centred and zero.centre_on_(mean_SD) is zero  # zero: a no-op
    assert torch.equal(zero.b_dec_SD, torch.zeros(2, 8)) and torch.equal(zero.b_enc_F, torch.zeros(32))
    x = centred.normalise(x_raw)
    m = centred.normalise(mean_SD[None])
    # same seeded weights; pre-activations read x - mean, and an all-zero code decodes to the mean
    assert torch.equal(centred.W_enc_SDF, zero.W_enc_SDF)
    torch.testing.assert_close(centred.pre_acts(x), zero.pre_acts(x - m), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(centred.decode(torch.zeros(1, 32)), m)
    with pytest.raises(ConfigError, match="needs activations"):
        _model("data_mean").centre_on_(None)
    with pytest.raises(ConfigError, match="b_dec_init"):
        CrosscoderConfig(d_model=8, n_latents=32, b_dec_init="median")


def test_fresh_training_model_is_centred_on_the_norm_split(tmp_path):
    """Every path that makes a training model from in-memory activations (``experiment.splits_from``,
    as the scoreboard's null and seed copies do) centres it: a second seed of a centred run trains."""
    from crosscoder import experiment
    from crosscoder.config import TrainConfig

    g = torch.Generator().manual_seed(2)
    norm = 5 + torch.randn(64, 2, 8, generator=g)
    splits = experiment.splits_from(norm.half(), norm, norm)
    torch.testing.assert_close(splits.mean_SD, norm.mean(0))
    cfg = CrosscoderConfig(d_model=8, n_latents=32, sparsity="batchtopk", k=4, b_dec_init="data_mean")
    tcfg = TrainConfig(n_steps=4, batch_size=16, eval_every=4, log_every=2)
    model = experiment._fresh_model(cfg, tcfg, splits, "cpu")
    torch.testing.assert_close(model.b_dec_SD, model.normalise(norm.mean(0)[None])[0])
    experiment.train_crosscoder(splits, cfg, tcfg, tmp_path / "run", progress=False)
    again = experiment.seed_replicas(tmp_path, "run", [1], splits, progress=False)[1]
    assert again.cfg.b_dec_init == "data_mean" and not torch.equal(again.W_dec_FSD, model.W_dec_FSD)
