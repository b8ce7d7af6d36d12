"""Published artifacts of the diffing methods, loaded and checked against the reference code's maths:
dictionary_learning's ``BatchTopKSAE`` (the diff-SAE's format) and the Dedicated Feature Crosscoder
fork's checkpoints. Each test writes a checkpoint in the fork's exact layout from random tensors and
compares our loaded model with the fork's encode / decode written naively here."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from crosscoder import methods
from crosscoder.config import ConfigError
from crosscoder.formats import load_dfc, load_dictionary_learning, load_dictionary_learning_sae
from crosscoder.methods import diff_sae, dfc
from crosscoder.methods.base import MethodData
from crosscoder.methods.dfc import DedicatedFeatureCrosscoder, ExclusiveBlocks

EPS = 1e-8  # NormalizableMixin adds it to the scale when denormalising


# ------------------------------------------------------------------------------------------------
# 1. BatchTopKSAE
# ------------------------------------------------------------------------------------------------
def _sae_state(d, F, *, normaliser, k=3, threshold=-1.0, seed=0):
    """The fork's BatchTopKSAE state dict (NormalizableMixin buffers first, then k, threshold and the
    nn.Linear weights). ``normaliser``: "absent" (saprmarks' original: no buffers), "nan" (the fork
    without one) or "fitted". Decoder columns of unequal norms, so ranking f and ranking f * ||d||
    differ."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    if normaliser == "fitted":
        std = torch.rand(d, generator=g) * 2 + 0.5
        sd.update(target_rms=torch.tensor(1.0), activation_mean=torch.randn(d, generator=g) * 3,
                  activation_std=std, activation_global_scale=1.0 / torch.sqrt((std ** 2).sum() + 1e-8))
    elif normaliser == "nan":
        sd.update(target_rms=torch.tensor(1.0), activation_mean=torch.full((d,), float("nan")),
                  activation_std=torch.full((d,), float("nan")), activation_global_scale=torch.tensor(1.0))
    sd.update({
        "k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(threshold),
        "decoder.weight": torch.randn(d, F, generator=g) * (0.3 + torch.rand(1, F, generator=g)),
        "encoder.weight": torch.randn(F, d, generator=g) * 0.5,
        "encoder.bias": torch.randn(F, generator=g) * 0.1,
        "b_dec": torch.randn(d, generator=g),
    })
    return sd


def _between(values, q):
    """A threshold halfway between two neighbouring distinct positive values near quantile q, so no
    activation sits on it (the last bit of float rounding would decide a tie)."""
    v = values[values > 0].flatten().unique()  # sorted
    i = min(int(q * (len(v) - 1)), len(v) - 2)
    return (v[i] + v[i + 1]) / 2


def _has_normaliser(sd):
    return "activation_mean" in sd and not torch.isnan(sd["activation_mean"]).any()


def _ref_sae_encode(sd, x_BD, *, use_threshold, k=3):
    """BatchTopKSAE.encode: normalise, ReLU(encoder(x - b_dec)), then f * (f > threshold) or the
    batch's k*B largest f (by an independent sort)."""
    if _has_normaliser(sd):
        x_BD = (x_BD - sd["activation_mean"]) * sd["activation_global_scale"]
    f = torch.relu((x_BD - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    if use_threshold:
        return f * (f > sd["threshold"])
    flat = f.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[sorted(range(flat.numel()), key=lambda i: -float(flat[i]))[: k * x_BD.shape[0]]] = True
    return f * keep.view_as(f)


def _ref_sae_decode(sd, f_BF):
    out = f_BF @ sd["decoder.weight"].T + sd["b_dec"]
    if not _has_normaliser(sd):
        return out
    return out / (sd["activation_global_scale"] + EPS) + sd["activation_mean"]


def _write_sae(folder, sd, layout, *, d, F, k=3):
    """``layout``: "trainer" (saprmarks: ae.pt + {"trainer": ..., "buffer": ...}), "fork" (Minder et
    al.'s trainer: model_final.pt, same config) or "hub" (save_pretrained: model.safetensors + flat)."""
    trainer = {"trainer_class": "BatchTopKTrainer", "dict_class": "BatchTopKSAE", "activation_dim": d,
               "dict_size": F, "k": k, "lr": 1e-4, "layer": 13, "lm_name": "toy"}
    if layout == "hub":
        save_file(sd, str(folder / "model.safetensors"))
        cfg = {"activation_dim": d, "dict_size": F, "k": k}
    else:
        torch.save(sd, folder / ("ae.pt" if layout == "trainer" else "model_final.pt"))
        cfg = {"trainer": trainer, "buffer": {"ctx_len": 128}}
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("normaliser,layout", [("absent", "trainer"), ("nan", "fork"), ("fitted", "fork"),
                                               ("fitted", "hub")])
def test_batchtopk_sae_checkpoint_encodes_like_the_fork(tmp_path, normaliser, layout):
    d, F, k = 6, 16, 3
    x = torch.randn(9, d, generator=torch.Generator().manual_seed(4)) * 3 + 1
    sd = _sae_state(d, F, normaliser=normaliser, k=k)
    _write_sae(tmp_path, sd, layout, d=d, F=F, k=k)
    sae = load_dictionary_learning_sae(tmp_path).eval()
    assert (sae.cfg.n_sources, sae.cfg.k, sae.cfg.sparsity, sae.cfg.topk_by_decoder_norm) == (1, k, "batchtopk", False)
    # batch top-k (threshold never estimated: the eval-mode default is the exact top-k)
    want = _ref_sae_encode(sd, x, use_threshold=False, k=k)
    for got in (sae.encode(sae.normalise(x[:, None]), use_threshold=False), sae.encode(sae.normalise(x[:, None]))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(sae.denormalise(sae.decode(want))[:, 0], _ref_sae_decode(sd, want), rtol=1e-4, atol=1e-4)
    # the inference threshold compares f itself
    dense = _ref_sae_encode(sd, x, use_threshold=True)  # threshold -1: every positive f
    sd["threshold"] = _between(dense, 0.5)
    _write_sae(tmp_path, sd, layout, d=d, F=F, k=k)
    sae = load_dictionary_learning_sae(tmp_path).eval()
    want = _ref_sae_encode(sd, x, use_threshold=True)
    assert 0 < int((want > 0).sum()) < int((dense > 0).sum())
    got = sae.encode(sae.normalise(x[:, None]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got > 0, want > 0)


def test_batchtopk_sae_refusals(tmp_path):
    d, F = 5, 8

    def write(sd, cfg=None):
        torch.save(sd, tmp_path / "ae.pt")
        (tmp_path / "config.json").write_text(json.dumps(cfg or {"trainer": {"dict_class": "BatchTopKSAE"}}))

    good = _sae_state(d, F, normaliser="fitted")
    cases = [
        ({k: v for k, v in good.items() if k != "b_dec"}, None, "key 'b_dec' missing"),
        (dict(good, b_dec=torch.zeros(d + 1)), None, r"b_dec has shape \(6,\), expected \(5,\)"),
        (dict(good, **{"decoder.weight": torch.zeros(F, d)}), None, "decoder.weight has shape"),
        ({k: v for k, v in good.items() if k != "activation_std"}, None,
         r"normaliser buffers \['activation_std'\] missing"),
        (dict(good, **{"encoder.weight": torch.zeros(2, d, F)}), None, "a 3-d .* is a crosscoder"),
        (good, {"trainer": {"dict_class": "BatchTopKCrossCoder"}}, "dict_class 'BatchTopKCrossCoder'"),
        (good, {"trainer": {"dict_size": 2 * F}}, f"dict_size = {2 * F}"),
        (good, {"trainer": {"k": 4}}, "k = 4 but the state dict holds k = 3"),
        ({k: v for k, v in good.items() if k != "k"}, {}, "no k"),
        (dict(good, k=torch.tensor(F + 1, dtype=torch.int)), {}, "k = 9 must lie in"),
        ({"step": 100, "ae": good, "config": {}}, None, "training backup"),
    ]
    for sd, cfg, match in cases:
        write(sd, cfg)
        with pytest.raises(ConfigError, match=match):
            load_dictionary_learning_sae(tmp_path)
    # and the crosscoder loader points an SAE to the SAE loader
    write(good)
    with pytest.raises(ConfigError, match="is an SAE: load it with load_dictionary_learning_sae"):
        load_dictionary_learning(tmp_path)


def _pair_data(d, n=96, seed=1):
    """Random base/chat activations with a planted chat-only direction on some tokens."""
    g = torch.Generator().manual_seed(seed)

    def split(m):
        base = torch.randn(m, d, generator=g) + 2
        chat = base + 0.3 * torch.randn(m, d, generator=g)
        chat[: m // 3] += 4 * torch.eye(d)[0]
        return torch.stack([base, chat], 1)

    return MethodData(split(n), split(n), split(n))


@pytest.mark.parametrize("target", ["difference_ftb", "difference_bft"])
def test_diff_sae_from_published_scores_like_the_fork_and_round_trips(tmp_path, target):
    d, F, k = 6, 16, 3
    data = _pair_data(d)
    delta_ND = data.heldout_NSD[:, 1] - data.heldout_NSD[:, 0]
    sign = 1.0 if target == "difference_ftb" else -1.0
    sd = _sae_state(d, F, normaliser="fitted", k=k)
    sd["threshold"] = _between(_ref_sae_encode(sd, sign * delta_ND, use_threshold=True), 0.6)
    (tmp_path / "sae").mkdir()
    _write_sae(tmp_path / "sae", sd, "fork", d=d, F=F, k=k)
    fitted = diff_sae.from_published(tmp_path / "sae", data, target=target, min_explained=0.0, nu_threshold=10.0,
                                     min_active_tokens=1, out_dir=tmp_path / "out")
    # the method reads δ = chat − base; the fork's SAE read sign * δ
    want = _ref_sae_encode(sd, sign * delta_ND, use_threshold=True)
    got = fitted.scores(data.heldout_NSD)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got > 0, want > 0)
    m = fitted.model
    torch.testing.assert_close(m.denormalise(m.decode(want))[:, 0], sign * _ref_sae_decode(sd, want),
                               rtol=1e-4, atol=1e-4)
    # flagged by the method's own rule on its held-out statistics
    stats = diff_sae.diff_stats(m, data.heldout_NSD)
    torch.testing.assert_close(fitted.stats.explained_F, stats.explained_F)
    assert torch.equal(fitted.flagged_J, diff_sae.flag_latents(stats, fitted.cfg))
    assert math.isnan(fitted.cost.train_seconds) and fitted.cost.train_tokens == 0
    # the artifact keeps the rank rule, so the reloaded method is the same encoder
    back = methods.load(tmp_path / "out" / methods.METHOD_DIR)
    assert isinstance(back, diff_sae.DiffSAE) and back.model.cfg.topk_by_decoder_norm is False
    torch.testing.assert_close(back.scores(data.heldout_NSD), got)
    assert torch.equal(back.flagged_J, fitted.flagged_J)
    assert torch.equal(back.with_cut(0.05).flagged_J, fitted.with_cut(0.05).flagged_J)


def test_diff_sae_from_published_refusals(tmp_path):
    data = _pair_data(6)
    _write_sae(tmp_path, _sae_state(7, 16, normaliser="nan"), "fork", d=7, F=16)
    with pytest.raises(ConfigError, match="width 7"):
        diff_sae.from_published(tmp_path, data)
    with pytest.raises(ConfigError, match="target must be one of"):
        diff_sae.from_published(tmp_path, data, target="chat")


# ------------------------------------------------------------------------------------------------
# 2. Dedicated Feature Crosscoders (superkaiba/dfc_learning)
# ------------------------------------------------------------------------------------------------
def _dfc_state(d, F, pct_a, pct_b, *, k=3, threshold=-1.0, seed=0, normaliser=True):
    """``DedicatedFeatureBatchTopKCrossCoder.state_dict()``: the BatchTopKCrossCoder buffers and
    weights (per-layer global scale, as in the DFC fork), the forbidden blocks zeroed by a 0/1 mask
    multiply as the fork initialises them, and ``_partition_config``."""
    g = torch.Generator().manual_seed(seed)
    S = 2
    n_a, n_b = int(F * pct_a), int(F * pct_b)
    allowed_SF = torch.ones(S, F)
    allowed_SF[0, n_a:n_a + n_b] = 0  # layer 0 (model A) may not touch B-exclusive latents
    allowed_SF[1, :n_a] = 0
    if normaliser:
        mean = torch.randn(S, d, generator=g) * 3
        std = torch.rand(S, d, generator=g) * 2 + 0.5
        scale = 1.0 / torch.sqrt((std ** 2).sum(-1) + 1e-8)
    else:
        mean = std = torch.full((S, d), float("nan"))
        scale = torch.ones(S)
    return {
        "target_rms": torch.tensor(1.0), "activation_mean": mean, "activation_std": std,
        "activation_global_scale": scale,
        "encoder.weight": torch.randn(S, d, F, generator=g) * 0.5 * allowed_SF[:, None, :],
        "encoder.bias": torch.randn(F, generator=g) * 0.1,
        "decoder.weight": torch.randn(S, F, d, generator=g) * (0.2 + torch.rand(S, F, 1, generator=g))
        * allowed_SF[:, :, None],
        "decoder.bias": torch.randn(S, d, generator=g),
        "code_normalization_id": torch.tensor(1),  # CROSSCODER, the fork's default
        "k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(threshold),
        "_partition_config": {"dict_size": F, "model_a_exclusive_pct": pct_a, "model_b_exclusive_pct": pct_b},
    }


def _ref_dfc_encode(sd, x_BSD, *, use_threshold, k=3):
    """BatchTopKCrossCoder.encode with CROSSCODER code normalisation: normalise each layer, ReLU of the
    summed per-layer encoders, score f * sum_l ||decoder[l, j]||, the batch's k*B largest scores or
    score > threshold."""
    if not torch.isnan(sd["activation_mean"]).any():
        x_BSD = (x_BSD - sd["activation_mean"]) * sd["activation_global_scale"][None, :, None]
    f = torch.relu(sum(x_BSD[:, l] @ sd["encoder.weight"][l] for l in range(2)) + sd["encoder.bias"])
    score = f * sd["decoder.weight"].norm(dim=-1).sum(0)
    if use_threshold:
        return f * (score > sd["threshold"])
    flat = score.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[sorted(range(flat.numel()), key=lambda i: -float(flat[i]))[: k * x_BSD.shape[0]]] = True
    return f * keep.view_as(f)


def _ref_dfc_decode(sd, f_BF):
    out = torch.stack([f_BF @ sd["decoder.weight"][l] for l in range(2)], 1) + sd["decoder.bias"]
    if torch.isnan(sd["activation_mean"]).any():
        return out
    return out / (sd["activation_global_scale"][None, :, None] + EPS) + sd["activation_mean"]


def _write_dfc(folder, sd, where, *, d, F):
    """``where`` the partition is recorded: "state" (model_final.pt's _partition_config, the trainer's
    config.json beside it), "kwargs" (only the trainer config's dict_class_kwargs, as strings: a
    torch.compile'd model's state dict), "flat" (a flat config; safetensors) or "none"."""
    for old in ("model_final.pt", "model.safetensors"):  # the loader would read a stale file first
        (folder / old).unlink(missing_ok=True)
    part = sd["_partition_config"]
    tensors = {k: v for k, v in sd.items() if k != "_partition_config"}
    trainer = {"trainer_class": "BatchTopKCrossCoderTrainer", "dict_class": "BatchTopKCrossCoder",
               "activation_dim": d, "dict_size": F, "k": int(sd["k"]),
               "code_normalization": "CodeNormalization.CROSSCODER"}
    if where == "state":
        torch.save(sd, folder / "model_final.pt")
        cfg = {"trainer": trainer}
    elif where == "kwargs":
        torch.save({f"_orig_mod.{k}": v for k, v in tensors.items()}, folder / "model_final.pt")
        cfg = {"trainer": dict(trainer, dict_class_kwargs={k: str(v) for k, v in part.items() if k != "dict_size"})}
    else:
        save_file(tensors, str(folder / "model.safetensors"))
        cfg = {"activation_dim": d, "dict_size": F, "num_layers": 2, "k": int(sd["k"])}
        if where == "flat":
            cfg.update({k: v for k, v in part.items() if k != "dict_size"})
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("where,pcts", [("state", (0.1, 0.15)), ("kwargs", (0.15, 0.1)), ("flat", (0.1, 0.1)),
                                        ("none", (0.05, 0.05))])
def test_dfc_checkpoint_keeps_its_partition_and_encodes_like_the_fork(tmp_path, where, pcts):
    d, F, k = 6, 40, 3
    sd = _dfc_state(d, F, *pcts, k=k)
    _write_dfc(tmp_path, sd, where, d=d, F=F)
    pub = load_dfc(tmp_path)
    n_a, n_b = int(F * pcts[0]), int(F * pcts[1])
    assert (pub.partition.n_base_exclusive, pub.partition.n_chat_exclusive) == (n_a, n_b)
    assert pub.partition.source == {"state": "_partition_config", "kwargs": "config.json dict_class_kwargs",
                                    "flat": "config.json", "none": "the fork's default"}[where]
    # the partition is the dfc method's: same blocks, same forbidden weights, all exactly zero
    forbidden_SF = pub.partition.forbidden_SF(F)
    assert torch.equal(forbidden_SF, ExclusiveBlocks(n_a, n_b, F).forbidden_SF)
    blocks = pub.partition.blocks(F)
    assert torch.equal(blocks["chat"], torch.arange(n_a, n_a + n_b))
    cc = pub.model.eval()
    assert (cc.W_enc_SDF.permute(0, 2, 1)[forbidden_SF] == 0).all()
    assert (cc.W_dec_FSD.permute(1, 0, 2)[forbidden_SF] == 0).all()
    assert int(forbidden_SF.sum()) == n_a + n_b
    # the fork's maths on raw activations
    x = torch.randn(8, 2, d, generator=torch.Generator().manual_seed(3)) * 3 + 1
    want = _ref_dfc_encode(sd, x, use_threshold=False, k=k)
    got = cc.encode(cc.normalise(x), use_threshold=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got > 0, want > 0)
    recon = cc.denormalise(cc.decode(want))
    torch.testing.assert_close(recon, _ref_dfc_decode(sd, want), rtol=1e-4, atol=1e-4)
    # exclusivity holds in use: a base-exclusive latent writes nothing into the chat reconstruction
    one = torch.zeros(1, F)
    one[0, blocks["base"][0]] = 5.0
    torch.testing.assert_close(cc.decode(one)[0, 1], cc.decode(torch.zeros(1, F))[0, 1], rtol=0, atol=0)


def test_dfc_checkpoint_refusals(tmp_path):
    d, F = 5, 40

    def load(sd, where="state"):
        _write_dfc(tmp_path, sd, where, d=d, F=F)
        return load_dfc(tmp_path)

    sd = _dfc_state(d, F, 0.1, 0.1)
    leak = {**sd, "decoder.weight": sd["decoder.weight"].clone()}
    leak["decoder.weight"][0, 5] = 1e-7  # latent 5 is chat-exclusive (n_A = 4): base may not decode it
    match = r"0 encoder and 1 decoder latent blocks .* nonzero \(first: latent 5, layer 0\)"
    with pytest.raises(ConfigError, match=match):
        load(leak)
    nan = {**sd, "encoder.weight": sd["encoder.weight"].clone()}
    nan["encoder.weight"][1, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match="1 encoder and 0 decoder"):
        load(nan)
    # a plain crosscoder (no partition recorded, nothing zero) is no DFC of the fork's default partition
    plain = {**_dfc_state(d, F, 0.0, 0.0), "_partition_config": {"dict_size": F, "model_a_exclusive_pct": 0.05,
                                                                  "model_b_exclusive_pct": 0.05}}
    with pytest.raises(ConfigError, match="fork's default.*no DFC|no DFC"):
        load(plain, "none")
    with pytest.raises(ConfigError, match="_partition_config says dict_size = 80"):
        load({**sd, "_partition_config": {**sd["_partition_config"], "dict_size": 80}})
    with pytest.raises(ConfigError, match="expected a dict with"):
        load({**sd, "_partition_config": {"dict_size": F}})
    with pytest.raises(ConfigError, match=r"give 24 \+ 24 exclusive latents of 40"):
        load({**sd, "_partition_config": {"dict_size": F, "model_a_exclusive_pct": 0.6, "model_b_exclusive_pct": 0.6}})
    bad = {"trainer": {"dict_class_kwargs": {"model_a_exclusive_pct": "five", "model_b_exclusive_pct": "0.1"}}}
    _write_dfc(tmp_path, sd, "kwargs", d=d, F=F)
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="are not numbers"):
        load_dfc(tmp_path)
    three = {**sd, "encoder.weight": torch.zeros(3, d, F), "decoder.weight": torch.zeros(3, F, d),
             "decoder.bias": torch.zeros(3, d), "activation_mean": torch.full((3, d), float("nan")),
             "activation_std": torch.full((3, d), float("nan")), "activation_global_scale": torch.ones(3)}
    with pytest.raises(ConfigError, match="this crosscoder has 3 layers"):
        load(three)
    with pytest.raises(ConfigError, match="key 'decoder.bias' missing"):
        load({k: v for k, v in sd.items() if k != "decoder.bias"})


def test_dfc_from_published_is_the_fitted_dfc_method(tmp_path):
    d, F, k = 6, 40, 3
    data = _pair_data(d)
    sd = _dfc_state(d, F, 0.1, 0.1, k=k)
    # on the ranking score f * sum_l ||decoder[l, j]||
    dense_NF = _ref_dfc_encode({**sd, "threshold": torch.tensor(-1.0)}, data.heldout_NSD, use_threshold=True)
    sd["threshold"] = _between(dense_NF * sd["decoder.weight"].norm(dim=-1).sum(0), 0.7)
    (tmp_path / "dfc").mkdir()
    _write_dfc(tmp_path / "dfc", sd, "state", d=d, F=F)
    fitted = dfc.from_published(tmp_path / "dfc", data, min_active_tokens=1, out_dir=tmp_path / "out")
    assert (fitted.cfg.n_base_exclusive, fitted.cfg.n_chat_exclusive, fitted.cfg.k) == (4, 4, k)
    got = fitted.scores(data.heldout_NSD)
    want = _ref_dfc_encode(sd, data.heldout_NSD, use_threshold=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got > 0, want > 0)
    # flagged: the chat-exclusive latents active on >= min_active_tokens held-out tokens
    live = [j for j in range(4, 8) if int((want[:, j] > 0).sum()) >= 1]
    assert fitted.flagged_J.tolist() == live
    flagged, _ = DedicatedFeatureCrosscoder.flag(fitted.cfg, fitted.model, data)
    assert torch.equal(flagged, fitted.flagged_J)
    back = methods.load(tmp_path / "out" / methods.METHOD_DIR)
    assert isinstance(back, DedicatedFeatureCrosscoder)
    torch.testing.assert_close(back.scores(data.heldout_NSD), got)
    assert torch.equal(back.flagged_J, fitted.flagged_J)
    # a DFC ranked by another code normalisation is not the dfc method's crosscoder
    _write_dfc(tmp_path / "dfc", {**sd, "code_normalization_id": torch.tensor(2)}, "state", d=d, F=F)
    with pytest.raises(ConfigError, match="decoder norm 'joint'"):
        dfc.from_published(tmp_path / "dfc", data)
    with pytest.raises(ConfigError, match="width 6"):
        dfc.from_published(tmp_path / "dfc", _pair_data(5))


def test_crosscoder_with_one_global_scale_loads(tmp_path):
    """Minder et al.'s fork at 48debb2 keeps one activation_global_scale for all layers (a scalar, from
    the variance summed over layers and dims); the DFC fork keeps one per layer. Both load."""
    d, F = 5, 40
    sd = _dfc_state(d, F, 0.0, 0.0)
    del sd["_partition_config"]
    sd["activation_global_scale"] = 1.0 / torch.sqrt((sd["activation_std"] ** 2).sum() + 1e-8)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"activation_dim": d, "dict_size": F, "num_layers": 2}))
    cc = load_dictionary_learning(tmp_path)
    ref = {**sd, "activation_global_scale": sd["activation_global_scale"].expand(2)}
    x = torch.randn(6, 2, d) * 2 + 1
    want = _ref_dfc_encode(ref, x, use_threshold=False)
    torch.testing.assert_close(cc.encode(cc.normalise(x), use_threshold=False), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cc.denormalise(cc.decode(want)), _ref_dfc_decode(ref, want), rtol=1e-4, atol=1e-4)
