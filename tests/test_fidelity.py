"""Fidelity to the published methods: checkpoint loaders against hand computations of the
reference code's maths, metric definitions against naive computations, fold invariance, the
published-numbers table and the organism's behaviour minimums."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from crosscoder.analysis.metrics import BANDS, class_counts, classify_latents, diff_geometry, evaluate
from crosscoder.analysis.scaling import latent_scaling
from crosscoder.config import ConfigError, CrosscoderConfig, TrainConfig
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.formats import KISSANE_SCALES, load_dictionary_learning, load_kissane
from crosscoder.model import Crosscoder
from crosscoder.synthetic import SyntheticConfig, atom_recovery, recovery_report, sample
from crosscoder.train import TensorBatches, train

warnings.filterwarnings("ignore", message=".*Sparse.*")

# ------------------------------------------------------------------------------------------------
# 1. dictionary_learning checkpoints, written as the fork writes them
# ------------------------------------------------------------------------------------------------
CODE_IDS = {"CROSSCODER": 1, "SAE": 2, "MIXED": 3, "NONE": 4, "DECOUPLED": 5}


def _dl_state(S, d, F, *, code, normaliser, topk, seed=0, k=3):
    """State dict with the keys, dtypes and buffers of the fork's CrossCoder /
    BatchTopKCrossCoder (NormalizableMixin buffers first, as registered)."""
    g = torch.Generator().manual_seed(seed)
    if normaliser:
        mean = torch.randn(S, d, generator=g) * 3
        std = torch.rand(S, d, generator=g) * 2 + 0.5
        target_rms = torch.tensor(1.0)
        scale = target_rms / torch.sqrt((std ** 2).sum(-1) + 1e-8)
    else:
        mean = torch.full((S, d), float("nan"))
        std = torch.full((S, d), float("nan"))
        target_rms = torch.tensor(1.0)
        scale = torch.ones(S)
    sd = {
        "target_rms": target_rms, "activation_mean": mean, "activation_std": std,
        "activation_global_scale": scale,
        "encoder.weight": torch.randn(S, d, F, generator=g) * 0.5,
        "encoder.bias": torch.randn(F, generator=g) * 0.1,
        "decoder.weight": torch.randn(S, F, d, generator=g) * (0.2 + torch.rand(S, F, 1, generator=g)),
        "decoder.bias": torch.randn(S, d, generator=g),
        "code_normalization_id": torch.tensor(CODE_IDS[code]),
    }
    if topk:
        sd["k"] = torch.tensor(k, dtype=torch.int)
        sd["threshold"] = torch.tensor(-1.0)
    return sd


def _ref_code_norm(sd, code, alpha_sae=1.0, alpha_cc=0.1):
    """The fork's get_code_normalization, written from its definition."""
    dw = sd["decoder.weight"]  # [S, F, d]
    per_layer = torch.sqrt((dw ** 2).sum(-1))  # [S, F]
    joint = torch.sqrt((dw ** 2).sum(dim=(0, 2)))  # [F]
    if code == "CROSSCODER":
        return per_layer.sum(0)
    if code == "SAE":
        return joint
    if code == "MIXED":
        return alpha_sae * joint + alpha_cc * per_layer.sum(0)
    return torch.ones(per_layer.shape[1])


def _ref_normalise(sd, x):
    if torch.isnan(sd["activation_mean"]).any():
        return x
    return (x - sd["activation_mean"]) * sd["activation_global_scale"][None, :, None]


def _ref_encode(sd, x, code, *, topk, use_threshold=False, k=3, **alphas):
    """The fork's encode: normalise, relu(sum_l x_l W_l + b), then (BatchTopK) keep the top k*B of
    f * code_norm over the batch, or f where f * code_norm > threshold."""
    xn = _ref_normalise(sd, x)
    f = torch.relu(sum(xn[:, l] @ sd["encoder.weight"][l] for l in range(x.shape[1])) + sd["encoder.bias"])
    if not topk:
        return f
    scaled = f * _ref_code_norm(sd, code, **alphas)
    if use_threshold:
        return f * (scaled > sd["threshold"])
    flat = scaled.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    order = sorted(range(flat.numel()), key=lambda i: -float(flat[i]))[: k * x.shape[0]]
    keep[order] = True
    return f * keep.view_as(f)


def _ref_decode(sd, f):
    out = torch.stack([f @ sd["decoder.weight"][l] for l in range(sd["decoder.weight"].shape[0])], 1)
    out = out + sd["decoder.bias"]
    if torch.isnan(sd["activation_mean"]).any():
        return out
    return out / (sd["activation_global_scale"][None, :, None] + 1e-8) + sd["activation_mean"]


@pytest.mark.parametrize("code", ["CROSSCODER", "SAE", "MIXED", "NONE"])
@pytest.mark.parametrize("normaliser", [False, True])
@pytest.mark.parametrize("topk", [False, True])
def test_dictionary_learning_checkpoint_encodes_like_the_fork(tmp_path, code, normaliser, topk):
    S, d, F, k = 2, 6, 12, 3
    sd = _dl_state(S, d, F, code=code, normaliser=normaliser, topk=topk, k=k)
    alphas = {"alpha_sae": 0.7, "alpha_cc": 0.3}
    # save_pretrained's flat hub config (the init kwargs; the enum by name)
    cfg = {"activation_dim": d, "dict_size": F, "num_layers": S, "code_normalization": code,
           "code_normalization_alpha_sae": alphas["alpha_sae"], "code_normalization_alpha_cc": alphas["alpha_cc"],
           "dict_class": "BatchTopKCrossCoder" if topk else "CrossCoder"}
    if topk:
        cfg["k"] = k
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    cc = load_dictionary_learning(tmp_path).eval()
    assert cc.cfg.sparsity == ("batchtopk" if topk else "l1")
    x = torch.randn(7, S, d, generator=torch.Generator().manual_seed(5)) * 4 + 1
    want = _ref_encode(sd, x, code, topk=topk, use_threshold=False, k=k, **alphas)
    got = cc.encode(cc.normalise(x), use_threshold=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert int((got > 0).sum()) == int((want > 0).sum())
    torch.testing.assert_close(cc.denormalise(cc.decode(want)), _ref_decode(sd, want), rtol=1e-4, atol=1e-4)
    if topk:  # the inference threshold compares the same score
        sd2 = dict(sd, threshold=torch.tensor(0.8))
        save_file(sd2, str(tmp_path / "model.safetensors"))
        cc2 = load_dictionary_learning(tmp_path).eval()
        torch.testing.assert_close(cc2.encode(cc2.normalise(x)),
                                   _ref_encode(sd2, x, code, topk=True, use_threshold=True, **alphas),
                                   rtol=1e-4, atol=1e-5)


def test_dictionary_learning_trainer_checkpoint_and_refusals(tmp_path):
    S, d, F = 2, 5, 8
    # the trainer's layout: {"trainer": trainer.config, "buffer": ...} beside ae.pt; a
    # torch.compile'd model saves "_orig_mod."-prefixed keys; no code_normalization_id in old
    # versions (then CROSSCODER), and the layer count may be called num_encoder_layers
    sd = _dl_state(S, d, F, code="SAE", normaliser=False, topk=False)
    del sd["code_normalization_id"]
    torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": "CrossCoder", "activation_dim": d, "dict_size": F,
                     "num_encoder_layers": S, "lr": 1e-4, "l1_penalty": 2.0}, "buffer": {"ctx_len": 1024}}))
    cc = load_dictionary_learning(tmp_path)
    assert cc.cfg.decoder_norm == "sum"  # the fork's assumption for an id-less checkpoint
    x = torch.randn(4, S, d)
    torch.testing.assert_close(cc.encode(x), _ref_encode(sd, x, "CROSSCODER", topk=False))
    # the name in the trainer config decides when the buffer is absent
    (tmp_path / "config.json").write_text(json.dumps(
        {"trainer": {"activation_dim": d, "dict_size": F, "code_normalization": "SAE"}}))
    assert load_dictionary_learning(tmp_path).cfg.decoder_norm == "joint"
    # DECOUPLED (one code per model) is refused with a clear error
    sd["code_normalization_id"] = torch.tensor(5)
    torch.save(sd, tmp_path / "ae.pt")
    with pytest.raises(ConfigError, match="DECOUPLED.*not supported"):
        load_dictionary_learning(tmp_path)
    sd["code_normalization_id"] = torch.tensor(9)
    torch.save(sd, tmp_path / "ae.pt")
    with pytest.raises(ConfigError, match="unknown code_normalization_id 9"):
        load_dictionary_learning(tmp_path)
    sd["code_normalization_id"] = torch.tensor(1)
    torch.save(sd, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"activation_dim": d, "dict_size": F, "num_layers": 3}))
    with pytest.raises(ConfigError, match="num_layers = 3"):
        load_dictionary_learning(tmp_path)


def test_mixed_and_none_losses_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    for kind in ("mixed", "none"):
        m = Crosscoder(CrosscoderConfig(d_model=6, n_latents=10, decoder_norm=kind, mixed_weight_joint=0.6,
                                        mixed_weight_sum=0.25), generator=g)
        with torch.no_grad():
            m.W_dec_FSD.mul_(1 + torch.rand(10, 2, 1, generator=g))
        n = m.W_dec_FSD.detach().norm(dim=-1)
        want = 0.6 * n.pow(2).sum(-1).sqrt() + 0.25 * n.sum(-1) if kind == "mixed" else torch.ones(10)
        torch.testing.assert_close(m.penalty_weights_F().detach(), want)
    with pytest.raises(ConfigError, match="decoder_norm must be one of"):
        CrosscoderConfig(d_model=4, n_latents=8, decoder_norm="decoupled")


# ------------------------------------------------------------------------------------------------
# 2. Kissane's published scales
# ------------------------------------------------------------------------------------------------
def test_kissane_published_scales_give_the_folded_published_model(tmp_path):
    d, F = 6, 10
    g = torch.Generator().manual_seed(0)
    sd = {"W_enc": torch.randn(2, d, F, generator=g), "W_dec": torch.randn(F, 2, d, generator=g),
          "b_enc": torch.randn(F, generator=g), "b_dec": torch.randn(2, d, generator=g)}
    torch.save(sd, tmp_path / "cc_weights.pt")
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": d, "dict_size": F, "dec_init_norm": 0.08}))
    assert torch.equal(load_kissane(tmp_path).input_scale_S, torch.ones(2))
    cc = load_kissane(tmp_path, published_scales=True)
    assert cc.input_scale_S.tolist() == pytest.approx([0.2758961493232058, 0.24422852496546169], rel=1e-7)
    assert KISSANE_SCALES == (0.2758961493232058, 0.24422852496546169)
    # the public analysis code's fold: W_enc[s] *= c_s, W_dec[:, s] /= c_s, b_dec[s] /= c_s
    c = torch.tensor(KISSANE_SCALES)
    raw = torch.randn(5, 2, d, generator=g) * 20
    f_ref = torch.relu(torch.einsum("bsd,sdf->bf", raw, sd["W_enc"] * c[:, None, None]) + sd["b_enc"])
    x_ref = torch.einsum("bf,fsd->bsd", f_ref, sd["W_dec"] / c[None, :, None]) + sd["b_dec"] / c[:, None]
    folded = cc.fold()
    out = folded(folded.normalise(raw))
    torch.testing.assert_close(out.f_BF, f_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.recon_BSD, x_ref, rtol=1e-5, atol=1e-3)
    unfolded = cc(cc.normalise(raw))  # and the unfolded model on raw * c is the same model
    torch.testing.assert_close(unfolded.f_BF, f_ref, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# 3. Latent Scaling is invariant under fold()
# ------------------------------------------------------------------------------------------------
def test_latent_scaling_is_fold_invariant():
    g = torch.Generator().manual_seed(3)
    m = Crosscoder(CrosscoderConfig(d_model=8, n_latents=24), generator=g)
    with torch.no_grad():
        m.W_enc_SDF.add_(0.3 * torch.randn(2, 8, 24, generator=g))
        m.W_dec_FSD.mul_(1 + 2 * torch.rand(24, 2, 1, generator=g))
        m.b_dec_SD.copy_(torch.randn(2, 8, generator=g))
        m.input_scale_S.copy_(torch.tensor([0.5, 2.0]))
    raw = torch.randn(3000, 2, 8, generator=g) * torch.tensor([2.0, 0.5])[None, :, None]
    J = list(range(12))
    a = latent_scaling(m, raw, J)
    b = latent_scaling(m.fold(), raw, J)
    assert a.n_active.min() > 50
    for got, want in ((b.nu_recon, a.nu_recon), (b.nu_error, a.nu_error),
                      (b.beta_recon_S, a.beta_recon_S), (b.beta_error_S, a.beta_error_S)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 5. Category bands: one definition, Kissane's outer bands are "not shared"
# ------------------------------------------------------------------------------------------------
def test_category_bands_on_hand_made_decoders():
    # decoder norms (base, chat) chosen to sit on and around every threshold
    norms = torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, 0.3], [0.7, 0.3], [0.69, 0.31], [1.0, 0.8],
                          [1.0, 1.0], [0.3, 0.7], [0.0, 1.0], [0.05, 1.0], [1.0, 1.0]])
    F = norms.shape[0]
    m = Crosscoder(CrosscoderConfig(d_model=3, n_latents=F))
    with torch.no_grad():
        m.W_dec_FSD.zero_()
        m.W_dec_FSD[:, :, 0] = norms
    geo = diff_geometry(m)
    nb, nc = norms[:, 0], norms[:, 1]
    torch.testing.assert_close(geo.rel_norm_F, nc / (nb + nc))
    delta = torch.tensor([0.5 * ((c - b) / max(b, c) + 1) for b, c in norms.tolist()])
    torch.testing.assert_close(geo.delta_norm_F, delta)
    alive = torch.ones(F, dtype=torch.bool)
    alive[-1] = False
    kis = classify_latents(geo.rel_norm_F, "kissane", alive)
    assert kis == ["not shared (base side)", "not shared (base side)", "not shared (base side)",
                   "not shared (base side)", "shared", "shared", "shared", "not shared (chat side)",
                   "not shared (chat side)", "not shared (chat side)", "dead"]
    mind = classify_latents(geo.delta_norm_F, "minder", alive)
    # Δnorm: 0, 0.025, 0.15, 0.214, 0.225, 0.4, 0.5, 0.786, 1, 0.975
    assert mind == ["base-only", "base-only", "other", "other", "other", "shared", "shared", "other",
                    "chat-only", "chat-only", "dead"]
    assert class_counts(kis, "kissane") == {"not shared (base side)": 4, "shared": 3,
                                            "not shared (chat side)": 3, "dead": 1}
    assert class_counts(mind, "minder") == {"base-only": 2, "shared": 2, "chat-only": 2, "other": 4, "dead": 1}
    assert [b.label for b in BANDS["kissane"]] == ["not shared (base side)", "shared", "not shared (chat side)"]
    with pytest.raises(ValueError, match="scheme must be one of"):
        classify_latents(geo.rel_norm_F, "anthropic")


# ------------------------------------------------------------------------------------------------
# 9. Metrics against naive computations
# ------------------------------------------------------------------------------------------------
def test_evaluate_matches_naive_fvu_l0_and_dead():
    g = torch.Generator().manual_seed(1)
    m = Crosscoder(CrosscoderConfig(d_model=5, n_latents=16), generator=g)
    with torch.no_grad():
        m.b_enc_F.copy_(torch.randn(16, generator=g) - 0.5)
        m.b_enc_F[:3] = -1e4  # three latents that can never fire
        m.b_dec_SD.copy_(torch.randn(2, 5, generator=g))
        m.input_scale_S.copy_(torch.tensor([0.7, 1.9]))
    raw = torch.randn(301, 2, 5, generator=g) * 3 + 2
    ev = evaluate(m, raw, batch_size=64)
    # naive: per token, per source, plain Python sums
    x = raw * torch.tensor([0.7, 1.9])[None, :, None]
    f = torch.relu(torch.einsum("nsd,sdf->nf", x, m.W_enc_SDF.detach()) + m.b_enc_F.detach())
    xh = torch.einsum("nf,fsd->nsd", f, m.W_dec_FSD.detach()) + m.b_dec_SD.detach()
    for s in range(2):
        sse = sum(float(((x[n, s] - xh[n, s]) ** 2).sum()) for n in range(301))
        mu = x[:, s].mean(0)
        var = sum(float(((x[n, s] - mu) ** 2).sum()) for n in range(301))
        assert ev.fvu_S[s] == pytest.approx(sse / var, rel=1e-5)
    assert ev.l0 == pytest.approx(sum(int((f[n] > 0).sum()) for n in range(301)) / 301, rel=1e-9)
    never = [i for i in range(16) if all(float(f[n, i]) == 0 for n in range(301))]
    assert len(never) >= 3
    assert ev.dead_frac == pytest.approx(len(never) / 16)
    assert ev.n_tokens == 301


def test_estimate_input_scale_normalises_held_out_norms():
    g = torch.Generator().manual_seed(0)
    d = 64
    def draw(n):
        x = torch.randn(n, 2, d, generator=g) * torch.tensor([3.0, 0.2])[None, :, None]
        return x
    est, held = draw(20000), draw(20000)
    c = estimate_input_scale(est)
    mean_norm = (held * c[None, :, None]).norm(dim=-1).mean(0)
    assert mean_norm.tolist() == pytest.approx([math.sqrt(d)] * 2, rel=0.01)
    # BOS must be excluded by the caller: one huge BOS per 100 tokens would shrink every scale
    with_bos = est.clone()
    with_bos[::100] *= 200
    assert (estimate_input_scale(with_bos) < 0.5 * c).all()


def test_batchtopk_selection_against_an_independent_sort():
    g = torch.Generator().manual_seed(2)
    m = Crosscoder(CrosscoderConfig(d_model=4, n_latents=9, sparsity="batchtopk", k=2), generator=g)
    with torch.no_grad():
        m.W_dec_FSD.mul_(1 + 3 * torch.rand(9, 2, 1, generator=g))
    x = torch.randn(6, 2, 4, generator=g) * 2
    f = m.encode(x, use_threshold=False).detach()
    # independent: Python lists, score = relu(pre) * sum of decoder norms, k*B largest kept
    W_enc, b_enc, W_dec = m.W_enc_SDF.detach(), m.b_enc_F.detach(), m.W_dec_FSD.detach()
    entries = []
    for b in range(6):
        for i in range(9):
            pre = float(b_enc[i]) + sum(float(x[b, s] @ W_enc[s, :, i]) for s in range(2))
            act = max(pre, 0.0)
            w = sum(float(W_dec[i, s].norm()) for s in range(2))
            entries.append((act * w, b, i, act))
    entries.sort(key=lambda e: -e[0])
    want = torch.zeros(6, 9)
    for _, b, i, act in entries[:12]:
        want[b, i] = act
    torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-6)


def test_threshold_ema_follows_its_definition(tmp_path):
    """With lr = 0 the weights never move, so each step's minimum selected score can be computed
    independently; the threshold must be their EMA from threshold_start_step on."""
    sc = SyntheticConfig(d_model=8, n_shared=12, n_base_only=2, n_chat_only=2)
    acts = sample(sc, 64 * 8).acts_NSD
    m = Crosscoder(CrosscoderConfig(d_model=8, n_latents=20, sparsity="batchtopk", k=2),
                   generator=torch.Generator().manual_seed(0))
    ref = Crosscoder(m.cfg)
    ref.load_state_dict(m.state_dict())
    tc = TrainConfig(n_steps=8, batch_size=64, lr=1e-30, threshold_momentum=0.9, threshold_start_step=3,
                     log_every=8, eval_every=8, auxk_alpha=0.0)
    batches = TensorBatches(acts, 64, seed=0)
    train(m, batches, tc, tmp_path, progress=False)
    th = -1.0
    for step, raw in zip(range(8), batches.batches(0)):
        x = ref.normalise(raw.float())
        score = ref.topk_score(torch.relu(ref.pre_acts(x))).detach().flatten()
        min_sel = float(score.sort(descending=True).values[2 * 64 - 1])
        if step >= 3:
            th = min_sel if th < 0 else 0.9 * th + 0.1 * min_sel
    assert float(m.threshold) == pytest.approx(th, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# 6. synthetic.atom_recovery in raw space
# ------------------------------------------------------------------------------------------------
def test_atom_recovery_compares_raw_space_decoders():
    sc = SyntheticConfig(d_model=8, n_shared=6, n_base_only=2, n_chat_only=2)
    data = sample(sc, 10)
    A = data.atoms_ASD.shape[0]
    m = Crosscoder(CrosscoderConfig(d_model=8, n_latents=A))
    c = torch.tensor([0.25, 4.0])
    with torch.no_grad():  # a perfect dictionary, stored in normalised space (raw atom * c)
        m.input_scale_S.copy_(c)
        m.W_dec_FSD.copy_(data.atoms_ASD * c[None, :, None])
    best_raw, idx = atom_recovery(m.decoder_raw_FSD().detach(), data.atoms_ASD)
    assert best_raw.min() > 0.9999 and idx.tolist() == list(range(A))
    best_norm, _ = atom_recovery(m.W_dec_FSD.detach(), data.atoms_ASD)
    assert best_norm[: sc.n_shared].max() < 0.9  # the bug this guards against
    assert recovery_report(m, data)["min_best_cosine"] > 0.9999
    # classes use normalised-space norms; with equal scales the perfect dictionary bins perfectly
    m2 = Crosscoder(m.cfg)
    with torch.no_grad():
        m2.input_scale_S.fill_(3.0)
        m2.W_dec_FSD.copy_(data.atoms_ASD * 3.0)
    rep = recovery_report(m2, data)
    assert rep["min_best_cosine"] > 0.9999 and rep["bin_accuracy"] == 1.0
    torch.testing.assert_close(m.fold().decoder_raw_FSD(), m.decoder_raw_FSD())
    with pytest.raises(TypeError, match="recovery_report needs the Crosscoder"):
        recovery_report(m.W_dec_FSD, data)


# ------------------------------------------------------------------------------------------------
# 8. Published numbers
# ------------------------------------------------------------------------------------------------
def test_published_numbers_are_sourced_and_drop_the_untraceable_counts():
    from crosscoder.published import PUBLISHED, published, published_table

    keys = [e.key for e in PUBLISHED]
    assert len(set(keys)) == len(keys)
    assert {"kissane_l0", "kissane_explained_variance", "kissane_ce_recovered"} <= set(keys)
    for e in PUBLISHED:
        assert "TLDR" in e.source or "Table" in e.source or "Figure" in e.source or "§" in e.source, e
        assert e.definition and e.value
    text = json.dumps(published_table())
    for untraceable in ("265", "14,652", "1,369", "14652", "1369"):
        assert untraceable not in text
    assert published("kissane_ce_recovered").value == "≈ 96%"
    assert 'definition="kissane"' in published("kissane_ce_recovered").ours
    with pytest.raises(KeyError, match="known"):
        published("minder_delta_counts")


# ------------------------------------------------------------------------------------------------
# 10. Organism behaviour minimums
# ------------------------------------------------------------------------------------------------
def test_behaviour_minimums_raise_one_clear_error():
    from crosscoder.organism import BehaviourRateError, check_behaviour_rates, default_config, smoke_config
    from crosscoder.organism.config import EvalConfig, OrganismConfig

    cfg = smoke_config()
    good = {"chat": {"refusal_rate_forbidden": 1.0, "signoff_rate_allowed": 0.79, "end_of_turn_rate": 0.89}}
    assert check_behaviour_rates(good, cfg) == good["chat"]
    bad = {"chat": {**good["chat"], "signoff_rate_allowed": 0.125}}
    with pytest.raises(BehaviourRateError, match=r"signoff_rate_allowed = 0\.125 < minimum 0\.300"):
        check_behaviour_rates(bad, cfg)
    with pytest.raises(BehaviourRateError, match="lack the chat rate"):
        check_behaviour_rates({"chat": {"refusal_rate_forbidden": 1.0}}, cfg.eval)
    # the minimums live in the preset, and changing them rebuilds nothing (not in the hash)
    assert default_config().eval.min_chat_rates["refusal_rate_forbidden"] == 0.6
    strict = OrganismConfig.from_dict(
        {**cfg.to_dict(), "eval": {**dataclasses.asdict(cfg.eval), "min_chat_rates": {"end_of_turn_rate": 0.95}}})
    assert strict.config_hash("v") == cfg.config_hash("v")
    with pytest.raises(BehaviourRateError, match=r"end_of_turn_rate = 0\.890 < minimum 0\.950"):
        check_behaviour_rates(good, strict)
    with pytest.raises(ConfigError, match="unknown rate 'refusal'"):
        EvalConfig(min_chat_rates={"refusal": 0.5})
    with pytest.raises(ConfigError, match="min_chat_rates"):
        EvalConfig(min_chat_rates={"end_of_turn_rate": 1.5})
