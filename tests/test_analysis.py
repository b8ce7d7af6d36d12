"""Latent scaling, AUROC / ground-truth recovery and clustering on synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crosscoder.analysis.ground_truth import auroc, ground_truth_table
from crosscoder.analysis.scaling import latent_scaling, scaling_beta
from crosscoder.config import CrosscoderConfig
from crosscoder.model import Crosscoder


def test_scaling_beta_recovers_known_beta():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(16, generator=g)
    f = torch.relu(torch.randn(5000, generator=g))
    for beta in (0.0, 0.3, 1.7):
        y = beta * f[:, None] * d + 0.05 * torch.randn(5000, 16, generator=g)
        assert scaling_beta(f, d, y) == pytest.approx(beta, abs=0.01)


@torch.no_grad()
def _naive_latent_scaling(model, x_raw, j, m, src):
    """Per-latent reference: explicit targets, then the closed form."""
    x = model.normalise(x_raw)
    recon, f = model(x)
    d = model.W_dec_FSD[j, src]
    err_wo_j = x[:, m] - recon[:, m] + f[:, j, None] * model.W_dec_FSD[j, m]
    return scaling_beta(f[:, j], d, recon[:, m]), scaling_beta(f[:, j], d, err_wo_j)


def test_latent_scaling_matches_per_latent_reference_and_known_answer():
    D, F = 8, 16
    torch.manual_seed(0)
    m = Crosscoder(CrosscoderConfig(d_model=D, n_latents=F))
    with torch.no_grad():
        m.b_enc_F.fill_(0.05)
    x = torch.randn(3000, 2, D)
    J = torch.tensor([0, 3, 7])
    ls = latent_scaling(m, x, J, batch_size=700)
    for row, j in enumerate(J.tolist()):
        for src in range(2):
            br, be = _naive_latent_scaling(m, x, j, src, 1)
            assert ls.beta_recon_S[row, src].item() == pytest.approx(br, rel=1e-4, abs=1e-6)
            assert ls.beta_error_S[row, src].item() == pytest.approx(be, rel=1e-4, abs=1e-6)

    # Known answer: a latent whose chat decoder is d and base decoder is 0, but whose concept is
    # present in the base activations with strength 0.6 (a "shared concept mislabelled chat-only").
    # beta^eps_base must find the 0.6 that the crosscoder failed to put in its base decoder.
    m2 = Crosscoder(CrosscoderConfig(d_model=D, n_latents=2))
    g = torch.Generator().manual_seed(1)
    d = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    with torch.no_grad():
        m2.W_enc_SDF.zero_()
        m2.W_enc_SDF[1, :, 0] = d
        m2.W_dec_FSD.zero_()
        m2.W_dec_FSD[0, 1] = d
        m2.b_enc_F.zero_()
        m2.b_dec_SD.zero_()
    a = torch.relu(torch.randn(4000, generator=g)) * 2
    xb = 0.6 * a[:, None] * d
    xc = 1.0 * a[:, None] * d
    ls2 = latent_scaling(m2, torch.stack([xb, xc], 1), [0])
    assert ls2.beta_error_S[0, 0].item() == pytest.approx(0.6, abs=1e-4)
    assert ls2.beta_error_S[0, 1].item() == pytest.approx(1.0, abs=1e-4)
    assert ls2.nu_error[0].item() == pytest.approx(0.6, abs=1e-4)
    assert ls2.nu_recon[0].item() == pytest.approx(0.0, abs=1e-6)  # the recon has no base part


def test_auroc_equals_sklearn_and_extremes():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    labels = torch.rand(500, generator=g) < 0.2
    scores = torch.stack([
        labels.float(),                                   # the latent *is* the label
        torch.rand(500, generator=g),                     # noise
        torch.randint(0, 3, (500,), generator=g).float(),  # heavy ties
        -labels.float() + 0.1 * torch.rand(500, generator=g),
    ], 1)
    ours = auroc(scores, labels)
    ref = [roc_auc_score(labels.numpy(), scores[:, j].numpy()) for j in range(4)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6)
    assert ours[0] == 1.0 and abs(ours[1] - 0.5) < 0.08 and ours[3] == 0.0
    # several label sets against one ranking, in small latent chunks: the same numbers
    multi = auroc(scores, torch.stack([labels, ~labels], 1), chunk=3)
    torch.testing.assert_close(multi[:, 0], ours)
    torch.testing.assert_close(multi[:, 1], 1 - ours)


def test_auroc_sparse_path_equals_dense_ranks_and_sklearn():
    """Latent activations (non-negative, mostly zero) take the path that ranks only the nonzeros: it
    must give the dense ranking's numbers, ties among nonzeros and all-zero columns included."""
    from sklearn.metrics import roc_auc_score

    from crosscoder.analysis.ground_truth import _average_ranks, _rank_sums_sparse

    g = torch.Generator().manual_seed(1)
    N = 800
    labels = torch.stack([torch.rand(N, generator=g) < p for p in (0.05, 0.3, 0.6)], 1)
    fires = torch.rand(N, 7, generator=g) < torch.tensor([0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.02])
    values = torch.randint(1, 4, (N, 7), generator=g).float()  # heavy ties among the nonzeros
    values[:, 3:] = torch.rand(N, 4, generator=g)
    scores = torch.where(fires, values, torch.zeros(()))
    scores[:, 6] = torch.where(labels[:, 0] & fires[:, 6].logical_not(), 2.0, scores[:, 6])  # mostly the label
    assert float((scores > 0).double().mean()) < 0.5  # the sparse path is the one auroc takes here
    dense = _average_ranks(scores.double()).T @ labels.double()
    torch.testing.assert_close(_rank_sums_sparse(scores.double(), labels), dense)
    ours = auroc(scores, labels, chunk=3)
    ref = [[roc_auc_score(labels[:, b].numpy(), scores[:, j].numpy()) for b in range(3)] for j in range(7)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6)
    assert (ours[0] == 0.5).all() and ours[6, 0] > 0.9
    torch.testing.assert_close(auroc(scores, labels, sparse=False), ours)  # the forced dense path agrees
    with pytest.raises(ValueError, match="non-negative"):
        auroc(scores - 1.0, labels, sparse=True)


def test_frontier_is_monotone_on_synthetic_data(tmp_path):
    from crosscoder.config import TrainConfig
    from crosscoder.synthetic import SyntheticConfig, sample
    from crosscoder.sweep import frontier
    from crosscoder.train import TensorBatches

    sc = SyntheticConfig(d_model=16, n_shared=24, n_base_only=4, n_chat_only=4, p_active=0.06)
    tr, ho = sample(sc, 16384), sample(sc, 2048, seed_offset=1)
    cfg = CrosscoderConfig(d_model=16, n_latents=64)
    tc = TrainConfig(n_steps=300, batch_size=256, lr=1e-2, log_every=100, eval_every=300)
    rows = frontier(TensorBatches(tr.acts_NSD, 256), ho.acts_NSD, ho.acts_NSD, cfg, tc,
                    [0.1, 0.5, 2.0], tmp_path, progress=False)
    cc = [r for r in rows if r["kind"] == "crosscoder"]
    sae = [r for r in rows if r["kind"] == "sae-pair"]
    assert len(cc) == len(sae) == 3
    for rs in (cc, sae):
        l0s = [r["l0"] for r in rs]
        fvus = [r["fvu_base"] + r["fvu_chat"] for r in rs]
        assert l0s == sorted(l0s, reverse=True), l0s  # more penalty, fewer active latents
        assert fvus == sorted(fvus), fvus  # ... and worse reconstruction
    # a crosscoder shares latents across the two models: fewer active latents than the SAE pair
    assert cc[1]["l0"] < sae[1]["l0"]


def test_ground_truth_table_alignment_and_summary():
    from types import SimpleNamespace


    g = torch.Generator().manual_seed(0)
    N, T = 40, 12
    lab = torch.rand(N, T, generator=g) < 0.1
    lab[:, 0] = False
    es = SimpleNamespace(attention_mask_NT=torch.ones(N, T, dtype=torch.bool), labels={"x": lab, "y": lab.roll(3, 1)})
    f = torch.zeros(N, T, 3)
    f[:, :-1, 0] = lab[:, 1:].float()  # fires one position BEFORE the labelled token
    f[..., 1] = torch.rand(N, T, generator=g)
    f[..., 2] = lab.float() * 0.5  # fires ON the token
    rows, summary, auc = ground_truth_table(f, es, torch.tensor([5, 6, 7]), ["x", "y"])
    assert auc[0, 0] == 1.0 and auc[2, 0] == 1.0 and abs(auc[1, 0] - 0.5) < 0.1
    assert rows[0]["recovered"] and rows[0]["best_latent"] in (5, 7)
    assert not rows[1]["recovered"]
    assert summary["recovered_frac"] == 0.5 and summary["matched_latent_frac"] == pytest.approx(2 / 3)


def test_decision_table_scores_only_comparable_positions():
    from crosscoder.analysis.ground_truth import decision_table
    from crosscoder.analysis.probes import ProbeTask

    g = torch.Generator().manual_seed(1)
    N, T = 30, 10
    eligible = torch.zeros(N, T, dtype=torch.bool)
    eligible[:, 4] = True  # one comparable position per row (a "header end")
    label = eligible & (torch.rand(N, T, generator=g) < 0.4)
    label[0, 4], label[1, 4] = True, False
    f = torch.zeros(N, T, 3)
    f[..., 0] = label.float()            # fires exactly on the decisions: 1.0
    f[..., 1] = eligible.float()         # fires on every header alike: 0.5 (all-token AUROC would be ~1)
    f[..., 2] = (~label).float() * eligible.float()  # fires on the other headers: 0.0
    rows, auc = decision_table(f, {"d": ProbeTask(label, eligible)}, torch.tensor([3, 4, 5]))
    assert auc[:, 0].tolist() == [1.0, 0.5, 0.0]
    assert rows[0]["recovered"] and rows[0]["best_latent"] == 3 and rows[0]["label_tokens"] == int(label.sum())
    assert auroc(f[..., 1].flatten()[:, None], label.flatten())[0] > 0.9  # why the eligible mask matters
    rows, auc = decision_table(f[..., :0], {"d": ProbeTask(label, eligible)}, torch.tensor([], dtype=torch.long))
    assert math.isnan(rows[0]["best_auroc"]) and not rows[0]["recovered"]


def test_planted_precision_counts_latents_whose_top_activations_are_planted():
    from crosscoder.analysis.ground_truth import planted_precision

    g = torch.Generator().manual_seed(2)
    N, T = 20, 8
    planted = torch.rand(N, T, generator=g) < 0.2
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[:, 0] = False
    f = torch.zeros(N, T, 3)
    f[..., 0] = planted.float() * (1 + torch.rand(N, T, generator=g))   # fires only on planted tokens
    f[..., 1] = (~planted).float() * torch.rand(N, T, generator=g)      # only elsewhere
    f[..., 2] = planted.float() * 2 + (~planted).float() * 1.0          # top activations planted
    share, prec = planted_precision(f, planted, mask, top_n=10)
    assert share.tolist() == [1.0, 0.0, 1.0] and prec == pytest.approx(2 / 3)
    share, prec = planted_precision(f[..., :0], planted, mask)
    assert len(share) == 0 and math.isnan(prec)


def _planted_diff_crosscoder(base_strength: float):
    """Latent 0 is chat-only by decoder (base half 0); the data carries its concept in chat at strength
    1 and in base at ``base_strength``. Latent 1 is a shared latent."""
    D = 8
    g = torch.Generator().manual_seed(4)
    d, s = torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=1)
    m = Crosscoder(CrosscoderConfig(d_model=D, n_latents=2))
    with torch.no_grad():
        for t in (m.W_enc_SDF, m.W_dec_FSD, m.b_enc_F, m.b_dec_SD):
            t.zero_()
        m.W_enc_SDF[1, :, 0] = d
        m.W_dec_FSD[0, 1] = d
        m.W_enc_SDF[:, :, 1] = s / 2
        m.W_dec_FSD[1, :] = s
    a, b = torch.relu(torch.randn(2, 3000, generator=g)) * 2
    x = torch.stack([base_strength * a[:, None] * d + b[:, None] * s, a[:, None] * d + b[:, None] * s], 1)
    return m, x


def test_seed_table_counts_confirmed_latents_and_their_reappearance():
    import copy

    from crosscoder.analysis.diff import seed_table

    real, x = _planted_diff_crosscoder(0.0)      # concept absent from base: confirmed
    fake, x_fake = _planted_diff_crosscoder(0.9)  # concept in base too: chat-only by norm, not confirmed
    replicas = {"real": {0: real, 1: copy.deepcopy(real)}}
    rows, reappear = seed_table(replicas, x, nu_threshold=0.3, min_active_tokens=5, match_cos=0.9)
    assert [(r["objective"], r["seed"]) for r in rows] == [("real", 0), ("real", 1)]
    assert all(r["chat-only (Δnorm)"] == 1 and r["truly chat-specific"] == 1 and r["shared (Δnorm)"] == 1
               for r in rows)
    assert [r["reappear"] for r in reappear] == [1, 1]  # the same latent in both seeds
    rows, reappear = seed_table({"fake": {0: fake}}, x_fake, nu_threshold=0.3, min_active_tokens=5, match_cos=0.9)
    assert rows[0]["chat-only (Δnorm)"] == 1 and rows[0]["truly chat-specific"] == 0 and reappear == []
    assert rows[0]["share in base (ν ≥ threshold)"] == 1.0


def test_varied_decision_finding_reads_the_marker_row_beside_the_fixed_ones():
    from crosscoder.analysis.diff import varied_decision_finding

    def row(name, behaviour, auc, dn, cls):
        return {"crosscoder": name, "behaviour": behaviour, "any live: AUROC": auc, "any live: Δnorm": dn,
                "any live: class": cls}

    rows = [row("l1", "refusal_decision", 0.95, 0.70, "other"), row("l1", "signoff_decision", 0.80, 0.99, "chat-only"),
            row("l1", "end_of_turn_decision", 0.92, 0.60, "shared"), row("l1", "marker_decision", 0.991, 0.97, "chat-only"),
            row("btk", "refusal_decision", 0.5, 0.5, "shared")]
    text = varied_decision_finding(rows)
    assert text.startswith("l1: the best live latent for the marker decision has AUROC 0.991, Δnorm 0.97 (chat-only); "
                           "for the 2 fixed-position decisions it represents at AUROC ≥ 0.9, Δnorm 0.60–0.70.")
    assert text.endswith("btk: no live latent fires on the marker decision.")
