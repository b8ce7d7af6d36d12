"""The crosscoder maths: loss vs a naive per-source loop, fused kernels vs autograd, BatchTopK,
folding, save/load and published formats, synthetic recovery, bit-identical resume, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from crosscoder import checkpoint as ckpt
from crosscoder.config import ConfigError, CrosscoderConfig, RunConfig, TrainConfig
from crosscoder.formats import load_kissane
from crosscoder.kernels import auxk_loss, select_batch_topk, training_step
from crosscoder.analysis.metrics import evaluate
from crosscoder.model import Crosscoder
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.synthetic import SyntheticConfig, recovery_report, sample
from crosscoder.train import TensorBatches, train
from crashing import Crash, CrashingBatches, crash_and_resume

warnings.filterwarnings("ignore", message=".*Sparse.*")


def _model(sparsity="l1", S=2, D=12, F=40, k=4, decoder_norm="sum", seed=0) -> Crosscoder:
    cfg = CrosscoderConfig(d_model=D, n_latents=F, n_sources=S, sparsity=sparsity, k=k,
                           decoder_norm=decoder_norm)
    m = Crosscoder(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move away from the symmetric init so every term matters
        m.b_enc_F.copy_(0.1 * torch.randn(F, generator=g))
        m.b_dec_SD.copy_(torch.randn(S, D, generator=g))
        m.W_dec_FSD.mul_(1 + 3 * torch.rand(F, S, 1, generator=g))
        m.W_enc_SDF.add_(0.05 * torch.randn(S, D, F, generator=g))
    return m


def naive_loss(m: Crosscoder, x_BSD: torch.Tensor, lam: float) -> torch.Tensor:
    """The paper's formula written as an explicit loop over sources and latents."""
    S = m.cfg.n_sources
    pre = m.b_enc_F.clone()
    pre = pre + sum(x_BSD[:, s] @ m.W_enc_SDF[s] for s in range(S))
    f = torch.relu(pre)
    if m.cfg.sparsity == "batchtopk":
        f = f * m.batch_topk_mask(f)
    recon = 0.0
    penalty = 0.0
    for s in range(S):
        xhat = f @ m.W_dec_FSD[:, s] + m.b_dec_SD[s]
        recon = recon + (x_BSD[:, s] - xhat).pow(2).sum(-1)
    norms = torch.stack([m.W_dec_FSD[:, s].norm(dim=-1) for s in range(S)], -1)
    w = {"sum": norms.sum(-1), "joint": norms.pow(2).sum(-1).sqrt(),
         "mixed": m.cfg.mixed_weight_joint * norms.pow(2).sum(-1).sqrt() + m.cfg.mixed_weight_sum * norms.sum(-1),
         "none": torch.ones(norms.shape[0])}[m.cfg.decoder_norm]
    if m.cfg.sparsity == "l1":
        penalty = (f * w).sum(-1)
    return (recon + lam * penalty).mean()


@pytest.mark.parametrize("sparsity", ["l1", "batchtopk"])
@pytest.mark.parametrize("decoder_norm", ["sum", "joint", "mixed", "none"])
@pytest.mark.parametrize("S", [2, 3])
def test_vectorised_and_fused_losses_match_naive_loop(sparsity, decoder_norm, S):
    m = _model(sparsity, S=S, decoder_norm=decoder_norm)
    x = torch.randn(24, S, 12)
    lam = 0.7
    naive = naive_loss(m, x, lam)
    naive.backward()
    g_naive = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref = m.loss(x, lam)
    torch.testing.assert_close(ref.loss, naive, rtol=1e-5, atol=1e-5)
    fused = training_step(m, x, lam)
    torch.testing.assert_close(fused.loss, naive, rtol=1e-5, atol=1e-5)
    fused.loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g_naive[n], rtol=1e-4, atol=1e-5, msg=n)


def test_forward_equals_decode_of_encode():
    for sp in ("l1", "batchtopk"):
        m = _model(sp)
        x = torch.randn(16, 2, 12)
        out = m(x, use_threshold=False)
        f = m.encode(x, use_threshold=False)
        torch.testing.assert_close(out.f_BF, f)
        torch.testing.assert_close(out.recon_BSD, m.decode(f))


def test_batch_topk_keeps_exactly_k_times_batch():
    m = _model("batchtopk", F=64, k=5)
    x = torch.randn(33, 2, 12) * 3
    f = m.encode(x, use_threshold=False)
    assert int((f > 0).sum()) == 5 * 33
    out = training_step(m, x, 0.0)
    assert out.l0.item() == pytest.approx(5.0)
    # tokens differ in how many latents they get: that is the point of *batch* top-k
    per_token = (f > 0).sum(1)
    assert per_token.min() != per_token.max()


def naive_auxk(m: Crosscoder, x_BSD, residual_BSD, dead_F, k_aux):
    """AuxK written per token: the k_aux dead latents with the largest ReLU pre-activation times
    sum of decoder norms (dictionary_learning ranks by activation x code normalisation) decode (no
    bias) the residual; squared error averaged over tokens, over the residual's variance."""
    dead = [i for i in range(m.cfg.n_latents) if dead_F[i]]
    w = [float(sum(m.W_dec_FSD[i, s].detach().norm() for s in range(m.cfg.n_sources))) for i in dead]
    sq = []
    for b in range(x_BSD.shape[0]):
        pre = [torch.relu((x_BSD[b] * m.W_enc_SDF[:, :, i]).sum() + m.b_enc_F[i]) for i in dead]
        order = sorted(range(len(dead)), key=lambda j: -float(pre[j].detach()) * w[j])[:k_aux]
        e_hat = sum(pre[j] * m.W_dec_FSD[dead[j]] for j in order)
        sq.append((residual_BSD[b] - e_hat).pow(2).sum())
    e = residual_BSD.reshape(x_BSD.shape[0], -1)
    return torch.stack(sq).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()


def test_auxk_matches_naive_loop_and_trains_only_dead_latents():
    m = _model("batchtopk", F=40, k=4)
    x = torch.randn(24, 2, 12) * 2
    dead_F = torch.zeros(40, dtype=torch.bool)
    dead_F[torch.randperm(40, generator=torch.Generator().manual_seed(1))[:15]] = True
    residual = torch.randn(24, 2, 12)
    # k_aux above the number of dead latents uses them all; the sparse and the dense path (float32)
    for k_aux, dense in ((3, False), (15, False), (50, False), (3, True), (15, True), (50, True)):
        got = auxk_loss(m, x, residual, dead_F, k_aux, dense=dense)
        grads = torch.autograd.grad(got, [m.W_enc_SDF, m.b_enc_F, m.W_dec_FSD])
        ref = naive_auxk(m, x, residual, dead_F, k_aux)
        ref_grads = torch.autograd.grad(ref, [m.W_enc_SDF, m.b_enc_F, m.W_dec_FSD])
        torch.testing.assert_close(got, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
        assert grads[0][:, :, ~dead_F].abs().max() == 0 and grads[2][~dead_F].abs().max() == 0
    assert float(auxk_loss(m, x, residual, torch.zeros(40, dtype=torch.bool), 6)) == 0.0
    # in the step: no dead latents -> the plain BatchTopK loss; some -> plus alpha * AuxK
    plain = training_step(m, x, 0.0)
    none_dead = training_step(m, x, 0.0, dead_F=torch.zeros(40, dtype=torch.bool), auxk_alpha=0.5)
    assert torch.equal(plain.loss, none_dead.loss)
    with_aux = training_step(m, x, 0.0, dead_F=dead_F, k_aux=5, auxk_alpha=0.5)
    recon = m.decode(m.encode(x, use_threshold=False))
    torch.testing.assert_close(with_aux.aux_loss, naive_auxk(m, x, (x - recon).detach(), dead_F, 5).detach())
    torch.testing.assert_close(with_aux.loss, plain.loss + 0.5 * with_aux.aux_loss)
    # and its gradients (the step hands AuxK its own ranking scores) equal the naive loop's
    params = [m.W_enc_SDF, m.b_enc_F, m.W_dec_FSD, m.b_dec_SD]
    got = torch.autograd.grad(training_step(m, x, 0.0, dead_F=dead_F, k_aux=5, auxk_alpha=0.5).loss, params)
    ref = torch.autograd.grad(training_step(m, x, 0.0).loss + 0.5 * naive_auxk(m, x, (x - recon).detach(), dead_F, 5),
                              params)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


def test_auxk_in_bfloat16_is_the_float32_loss_to_bf16_precision():
    """With bfloat16 GEMMs the step's AuxK term runs as dense bf16 products over the dead latents:
    the same loss and gradients as the naive float32 loop up to bf16 rounding, none outside them."""
    m = _model("batchtopk", F=64, k=4)
    x = torch.randn(48, 2, 12) * 2
    dead_F = torch.zeros(64, dtype=torch.bool)
    dead_F[torch.randperm(64, generator=torch.Generator().manual_seed(2))[:30]] = True
    residual = torch.randn(48, 2, 12)
    # the scores from the float32 encoder, so that both pick the same latents; only the GEMMs differ
    with torch.no_grad():
        rank = (x.reshape(48, -1) @ m.W_enc_SDF.reshape(24, 64)[:, dead_F] + m.b_enc_F[dead_F]).relu()
        rank *= m.rank_weights_F()[dead_F]
    params = [m.W_enc_SDF, m.b_enc_F, m.W_dec_FSD]
    got = auxk_loss(m, x, residual, dead_F, 8, rank_BJ=rank, gemm_dtype=torch.bfloat16)
    grads = torch.autograd.grad(got, params)
    ref = naive_auxk(m, x, residual, dead_F, 8)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)
    for g, r in zip(grads, ref_grads):
        assert float((g - r).norm() / r.norm()) < 2e-2
    assert grads[0][:, :, ~dead_F].abs().max() == 0 and grads[2][~dead_F].abs().max() == 0
    assert not torch.equal(got, ref)  # the bf16 products did run


def test_auxk_revives_dead_latents(tmp_path):
    """Half the latents of a BatchTopK crosscoder start with encoder columns 100x too small: their
    positive scores never reach the batch top-k, so the main loss never trains them. AuxK is the
    only gradient they get, and it brings them back."""
    sc = SyntheticConfig(d_model=16, n_shared=24, n_base_only=4, n_chat_only=4)
    acts, ho = sample(sc, 16384).acts_NSD, sample(sc, 2048, seed_offset=1).acts_NSD
    dead_frac, fvu = {}, {}
    for alpha in (0.0, 0.25):
        m = Crosscoder(CrosscoderConfig(d_model=16, n_latents=64, sparsity="batchtopk", k=4),
                       generator=torch.Generator().manual_seed(0))
        m.input_scale_S.copy_(estimate_input_scale(ho))
        with torch.no_grad():
            m.W_enc_SDF[:, :, 32:] *= 0.01  # half the dictionary starts out-competed
        tc = TrainConfig(n_steps=300, batch_size=256, lr=5e-3, log_every=50, eval_every=300,
                         auxk_alpha=alpha, auxk_dead_tokens=1024)
        res = train(m, TensorBatches(acts, 256), tc, tmp_path / f"a{alpha}", heldout_raw_NSD=ho, progress=False)
        dead_frac[alpha] = res.metrics["heldout"]["dead_frac"]
        fvu[alpha] = res.metrics["heldout"]["fvu_base"]
    assert dead_frac[0.0] >= 0.5, dead_frac  # without AuxK nothing moves them
    assert dead_frac[0.25] <= 0.35, dead_frac
    assert fvu[0.25] <= fvu[0.0] * 1.1, fvu  # and reviving them costs no reconstruction

def test_fast_selection_equals_topk():
    g = torch.Generator().manual_seed(3)
    for B, F, k in [(256, 512, 7), (64, 100, 50), (10, 10, 10), (128, 300, 1)]:
        score = torch.relu(torch.randn(B, F, generator=g))
        idx = select_batch_topk(score, k * B if k * B <= B * F else B * F)
        ref = torch.topk(score.flatten(), min(k * B, B * F)).indices.sort().values
        assert torch.equal(idx, ref)


def test_threshold_inference_after_training_matches_k(tmp_path):
    sc = SyntheticConfig(seed=1)
    tr, ho = sample(sc, 20000), sample(sc, 4000, seed_offset=1)
    m = Crosscoder(CrosscoderConfig(d_model=32, n_latents=96, sparsity="batchtopk", k=3),
                   generator=torch.Generator().manual_seed(0))
    m.input_scale_S.copy_(estimate_input_scale(ho.acts_NSD))
    tc = TrainConfig(n_steps=600, batch_size=512, lr=1e-2, log_every=100, eval_every=600)
    train(m, TensorBatches(tr.acts_NSD, 512), tc, tmp_path, resume=False, progress=False)
    assert float(m.threshold) > 0
    ev = evaluate(m, ho.acts_NSD)  # uses the threshold: batch-independent activations
    # k = 3: the learned threshold must give about k active latents per held-out token (measured
    # 3.01; a threshold off by a factor that matters would leave this band)
    assert 2.7 < ev.l0 < 3.3


def test_fold_equivalence(tmp_path):
    for sp in ("l1", "batchtopk"):
        m = _model(sp)
        with torch.no_grad():
            m.input_scale_S.copy_(torch.tensor([0.3, 2.5]))
            m.threshold.fill_(0.2)
        m.eval()
        raw = torch.randn(20, 2, 12) * 4
        folded = m.fold()
        assert folded.is_folded.item() == 1
        out_u = m(m.normalise(raw))
        out_f = folded(folded.normalise(raw))
        torch.testing.assert_close(out_f.f_BF, out_u.f_BF, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_f.recon_BSD, m.denormalise(out_u.recon_BSD), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.decoder_norms_FS(), m.decoder_norms_FS(), rtol=1e-5, atol=1e-6)
        reloaded = ckpt.load_crosscoder(ckpt.save_crosscoder(folded, tmp_path / sp)).eval()
        assert reloaded.folded
        torch.testing.assert_close(reloaded(raw).recon_BSD, out_f.recon_BSD)


def test_save_load_round_trip(tmp_path):
    m = _model("batchtopk")
    with torch.no_grad():
        m.input_scale_S.copy_(torch.tensor([0.5, 2.0]))
        m.threshold.fill_(0.3)
    ckpt.save_crosscoder(m, tmp_path / "cc", metrics={"l0": 1.0})
    m2 = ckpt.load_crosscoder(tmp_path / "cc")
    assert m2.cfg == m.cfg
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert json.loads((tmp_path / "cc" / "metrics.json").read_text()) == {"l0": 1.0}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_truncated_checkpoint_is_refused(tmp_path):
    m = _model()
    folder = ckpt.save_crosscoder(m, tmp_path / "cc")
    w = folder / ckpt.WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ckpt.CorruptArtifactError, match="sha256"):
        ckpt.load_crosscoder(folder)


def test_config_round_trip_and_unknown_keys():
    cfg = CrosscoderConfig(d_model=8, n_latents=16, sparsity="batchtopk", k=3)
    assert CrosscoderConfig.from_json(cfg.to_json()) == cfg
    rc = RunConfig(model=cfg, train=TrainConfig(n_steps=5))
    assert RunConfig.from_dict(json.loads(json.dumps(rc.to_dict()))) == rc
    with pytest.raises(ConfigError, match="unknown CrosscoderConfig key.*'lamda'"):
        CrosscoderConfig.from_dict({**cfg.to_dict(), "lamda": 1})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=8, n_latents=16, sparsity="batchtopk", k=17), "k = 17 exceeds n_latents"),
        (dict(d_model=0, n_latents=16), "d_model"),
        (dict(d_model=8, n_latents=16, sparsity="topk"), "sparsity"),
        (dict(d_model=8, n_latents=16, n_sources=3, source_names=("a", "b")), "source_names"),
    ],
)
def test_bad_model_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CrosscoderConfig(**kwargs)


def test_bad_train_config():
    with pytest.raises(ConfigError, match="l1_coeff"):
        TrainConfig(l1_coeff=-1.0)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=float("nan"))


def test_bad_inputs_fail_before_training(tmp_path):
    m = _model()
    tc = TrainConfig(n_steps=3, batch_size=8, log_every=1)
    with pytest.raises(ConfigError, match=r"shape \[batch, 2 sources, 12\]"):
        train(m, TensorBatches(torch.randn(64, 2, 11), 8), tc, tmp_path / "a", progress=False)
    bad = torch.randn(64, 2, 12)
    bad[5, 1, 3] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        train(m, TensorBatches(bad, 64), TrainConfig(n_steps=1, batch_size=64), tmp_path / "b",
              progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        train(m, TensorBatches(torch.randn(64, 2, 12), 16), tc, tmp_path / "c", progress=False)
    assert not (tmp_path / "b" / "crosscoder").exists()  # nothing half-written
    with pytest.raises(ConfigError, match="NaN or Inf"):
        estimate_input_scale(bad)


def test_kissane_format_loader(tmp_path):
    d, F = 6, 10
    g = torch.Generator().manual_seed(0)
    sd = {"W_enc": torch.randn(2, d, F, generator=g), "W_dec": torch.randn(F, 2, d, generator=g),
          "b_enc": torch.randn(F, generator=g), "b_dec": torch.randn(2, d, generator=g)}
    torch.save(sd, tmp_path / "cc_weights.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(
        {"d_in": d, "dict_size": F, "l1_coeff": 2, "dec_init_norm": 0.08, "lr": 5e-5,
         "hook_point": "blocks.14.hook_resid_pre", "model_name": "gemma-2-2b"}))
    cc = load_kissane(tmp_path)
    x = torch.randn(5, 2, d, generator=g)
    # Kissane's forward: relu(einsum(x, W_enc) + b_enc), einsum(f, W_dec) + b_dec
    f_ref = torch.relu(torch.einsum("bsd,sdf->bf", x, sd["W_enc"]) + sd["b_enc"])
    x_ref = torch.einsum("bf,fsd->bsd", f_ref, sd["W_dec"]) + sd["b_dec"]
    out = cc(x)
    torch.testing.assert_close(out.f_BF, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recon_BSD, x_ref, rtol=1e-5, atol=1e-5)


# L1 recovers every atom and bin by 1,000 steps (measured: mean best cosine 1.000, every bin right, FVU
# 0.011), so it trains 1,500; BatchTopK still misbins base-only atoms at 1,500 steps and keeps 3,000.
@pytest.mark.parametrize("sparsity, lam, k, n_steps", [("l1", 0.5, 1, 1500), ("batchtopk", 0.0, 3, 3000)])
def test_synthetic_recovery_and_diff_bins(tmp_path, sparsity, lam, k, n_steps):
    sc = SyntheticConfig()
    tr, ho = sample(sc, 60000), sample(sc, 4000, seed_offset=1)
    m = Crosscoder(CrosscoderConfig(d_model=32, n_latents=128, sparsity=sparsity, k=k),
                   generator=torch.Generator().manual_seed(0))
    m.input_scale_S.copy_(estimate_input_scale(ho.acts_NSD))
    tc = TrainConfig(n_steps=n_steps, batch_size=512, lr=1e-2, l1_coeff=lam, log_every=500, eval_every=n_steps)
    res = train(m, TensorBatches(tr.acts_NSD, 512), tc, tmp_path, heldout_raw_NSD=ho.acts_NSD,
                progress=False)
    rep = recovery_report(m, tr)  # raw-space decoders vs atoms; Minder's Δnorm bands
    assert rep["mean_best_cosine"] > 0.9
    assert rep["bin_accuracy"] >= 0.95, rep["per_kind"]
    # and every exclusive atom lands in its own band
    assert rep["per_kind"]["base-only"]["bin_accuracy"] == 1.0
    assert rep["per_kind"]["chat-only"]["bin_accuracy"] == 1.0
    assert res.metrics["heldout"]["fvu_base"] < 0.1 and res.metrics["heldout"]["fvu_chat"] < 0.1


@pytest.mark.parametrize("sparsity", ["l1", "batchtopk"])
def test_resume_is_bit_identical(tmp_path, sparsity):
    sc = SyntheticConfig(d_model=16, n_shared=20, n_base_only=4, n_chat_only=4)
    acts = sample(sc, 8192).acts_NSD
    ho = sample(sc, 1024, seed_offset=1).acts_NSD
    # BatchTopK: enough latents that some go dead, and a short AuxK dead window, so the resumed
    # run must restore each latent's tokens-since-fired
    cfg = CrosscoderConfig(d_model=16, n_latents=96 if sparsity == "batchtopk" else 48, sparsity=sparsity, k=3)
    tc = TrainConfig(n_steps=40, batch_size=256, lr=3e-3, l1_coeff=0.5, log_every=5,
                     checkpoint_every=10, eval_every=20, auxk_dead_tokens=512)

    def fresh():
        m = Crosscoder(cfg, generator=torch.Generator().manual_seed(0))
        m.input_scale_S.copy_(estimate_input_scale(ho))
        return m

    ref, res = crash_and_resume(fresh, acts, ho, tc, tmp_path)
    assert res.resumed_from == 20
    log_ref = (tmp_path / "ref" / "log.jsonl").read_text()
    if sparsity == "batchtopk":  # the AuxK term was live across the resume point
        recs = [json.loads(line) for line in log_ref.splitlines() if '"train"' in line]
        assert any(r["dead_latents"] > 0 and r["aux_loss"] > 0 for r in recs if r["step"] > 20)
    # a finished run is returned from disk, not retrained
    again = train(fresh(), TensorBatches(acts, 256), tc, tmp_path / "run", heldout_raw_NSD=ho, progress=False)
    assert again.resumed_from == tc.n_steps


def test_stored_run_on_other_activations_is_refused(tmp_path):
    """Same config, other data (as another read layer gives): neither the finished run nor an
    interrupted run's checkpoint is taken for this one; the fitted normalisation tells them apart."""
    sc = SyntheticConfig(d_model=16, n_shared=20, n_base_only=4, n_chat_only=4)
    acts, ho = sample(sc, 4096).acts_NSD, sample(sc, 1024, seed_offset=1).acts_NSD
    cfg = CrosscoderConfig(d_model=16, n_latents=48, sparsity="l1")
    tc = TrainConfig(n_steps=20, batch_size=256, lr=3e-3, l1_coeff=0.5, log_every=5, checkpoint_every=10,
                     eval_every=20)

    def fresh(data):
        m = Crosscoder(cfg, generator=torch.Generator().manual_seed(0))
        m.input_scale_S.copy_(estimate_input_scale(data))
        return m

    train(fresh(ho), TensorBatches(acts, 256), tc, tmp_path / "done", heldout_raw_NSD=ho, progress=False)
    with pytest.raises(ConfigError, match="other activations"):
        train(fresh(3 * ho), TensorBatches(3 * acts, 256), tc, tmp_path / "done", heldout_raw_NSD=3 * ho,
              progress=False)
    with pytest.raises(Crash):
        train(fresh(ho), CrashingBatches(acts, 256, crash_at=15), tc, tmp_path / "cut", heldout_raw_NSD=ho,
              progress=False)
    with pytest.raises(ConfigError, match="other activations"):
        train(fresh(3 * ho), TensorBatches(3 * acts, 256), tc, tmp_path / "cut", heldout_raw_NSD=3 * ho,
              progress=False)
    # the same data still resumes and is then found finished
    assert train(fresh(ho), TensorBatches(acts, 256), tc, tmp_path / "cut", heldout_raw_NSD=ho,
                 progress=False).resumed_from == 10


def test_train_many_shares_batches_and_equals_separate_runs(tmp_path):
    from crosscoder.train import train_many

    sc = SyntheticConfig(d_model=16, n_shared=20, n_base_only=4, n_chat_only=4)
    acts = sample(sc, 4096).acts_NSD

    class Counting(TensorBatches):
        calls = 0

        def batches(self, start_step):
            for b in super().batches(start_step):
                Counting.calls += 1
                yield b

    cfgs = [CrosscoderConfig(d_model=16, n_latents=32, sparsity="l1"),
            CrosscoderConfig(d_model=16, n_latents=32, sparsity="batchtopk", k=2)]
    tcs = [TrainConfig(n_steps=12, batch_size=128, lr=3e-3, l1_coeff=0.3, log_every=4),
           TrainConfig(n_steps=8, batch_size=128, lr=3e-3, log_every=4)]
    fresh = lambda c: Crosscoder(c, generator=torch.Generator().manual_seed(0))  # noqa: E731
    many = train_many([fresh(c) for c in cfgs], Counting(acts, 128), tcs,
                      [tmp_path / "a", tmp_path / "b"], progress=False)
    assert Counting.calls == 12  # one read per step, not one per run
    for c, t, r, name in zip(cfgs, tcs, many, "cd"):
        alone = train(fresh(c), TensorBatches(acts, 128), t, tmp_path / name, progress=False)
        for k, v in alone.model.state_dict().items():
            assert torch.equal(v, r.model.state_dict()[k]), k


def test_unwritable_output_folder(tmp_path, monkeypatch):
    m = _model()
    data = TensorBatches(torch.randn(64, 2, 12), 8)
    tc = TrainConfig(n_steps=2, batch_size=8)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot create output folder"):
        train(m, data, tc, blocker / "run", progress=False)
    # as a non-root user would see a read-only folder (root ignores permission bits)
    monkeypatch.setattr(ckpt.os, "access", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="not writable"):
        train(m, data, tc, tmp_path / "ro", progress=False)


def test_disk_full_leaves_no_partial_artifact(tmp_path, monkeypatch):
    import errno

    m = _model()

    def full(tensors, filename):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.ArtifactWriteError, match="disk is full"):
        ckpt.save_crosscoder(m, tmp_path / "cc")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_leave_no_temp_and_get_the_mode_of_a_plain_write(tmp_path):
    import os

    from crosscoder.atomic import replace_atomically, write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "hello")
    (tmp_path / "plain.txt").write_text("hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "plain.txt").st_mode  # not mkstemp's 0600

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_atomically(tmp_path / "b.txt", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "plain.txt"]


def test_tied_offset_sample_places_the_chat_offsets():
    from dataclasses import replace

    from crosscoder.synthetic import TiedOffsetConfig, tied_offset_sample

    cfg = TiedOffsetConfig(d_model=16, n_shared=20, noise=0.0, shared_cosine=1.0, context_cosine=1.0)
    for tied in (True, False):
        d = tied_offset_sample(replace(cfg, tied=tied), 4000)
        carry = d.offset_N >= 0
        # With identical shared and context directions, chat - base is exactly the carried offset.
        diff = d.acts_NSD[:, 1] - d.acts_NSD[:, 0]
        torch.testing.assert_close(diff[carry], d.offsets_OD[d.offset_N[carry]], atol=1e-5, rtol=0)
        assert diff[~carry].abs().max() < 1e-5
        if tied:  # every context token carries one of the two offsets, nothing else does
            assert torch.equal(carry, d.context_N)
        else:  # no context token does; about context_fraction of the text tokens do
            assert not (carry & d.context_N).any()
            assert abs(float(carry[~d.context_N].float().mean()) - cfg.context_fraction) < 0.03
        assert set(d.offset_N[carry].tolist()) == {0, 1}


def test_offset_latents_finds_a_planted_offset_latent():
    from crosscoder.synthetic import TiedOffsetConfig, offset_latents, tied_offset_sample

    d = tied_offset_sample(TiedOffsetConfig(d_model=16, n_shared=20, tied=False), 4000)
    m = Crosscoder(CrosscoderConfig(d_model=16, n_latents=3, sparsity="l1"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # latent o reads offset o from chat only and writes it to chat only; latent 2 is noise
        m.W_enc_SDF.zero_(), m.W_dec_FSD.zero_(), m.b_enc_F.fill_(-0.5 * 3.0 ** 2), m.b_dec_SD.zero_()
        for o in range(2):
            u = d.offsets_OD[o]
            m.W_enc_SDF[1, :, o] = u
            m.W_dec_FSD[o, 1] = u / u.norm()
        m.W_enc_SDF[:, :, 2] = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
        m.W_dec_FSD[2] = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    found = offset_latents(m, d)
    assert [r["latent"] for r in found] == [0, 1]
    assert all(r["auroc"] > 0.99 and r["delta_norm"] == 1.0 and r["norm_base"] == 0.0 for r in found)


def test_a_chat_offset_tied_to_one_context_is_not_labelled_chat_only(tmp_path):
    """The organism's situation in miniature: the same chat-only offsets are chat-only latents when
    they land on varied text tokens, but not when tied to one context token (the latent carrying
    them also reconstructs that context's base side)."""
    from crosscoder.synthetic import TiedOffsetConfig, tied_offset_runs

    # 500 steps (measured: varied-text offset latents at Δnorm 1.00 for both objectives, the tied ones
    # at 0.34-0.75 with AUROC 1.00; at 1,000 steps 1.00 and 0.54-0.77): the varied design reaching
    # chat-only is what shows the training went far enough for the tied one's verdict to mean something.
    rows = tied_offset_runs(TiedOffsetConfig(n_shared=48), 30_000, n_latents=128, k=3, l1_coeff=0.5, n_steps=500,
                            lr=1e-2, out_dir=str(tmp_path))
    by = {(r["offsets"], r["crosscoder"]): r for r in rows}
    assert min(by["on varied text tokens", "L1"]["offset latents' Δnorm"]) > 0.9
    for objective in ("L1", "BatchTopK"):
        assert max(by["tied to the header", objective]["offset latents' Δnorm"]) < 0.9
        assert min(by["tied to the header", objective]["offset latents' AUROC"]) > 0.95
