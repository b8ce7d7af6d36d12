"""The model-diffing methods (``crosscoder.methods``): each recovers planted chat-only atoms of the synthetic
dictionary through the items it flags; DFC's exclusive blocks stay exactly zero and the designated-shared
decoders exactly tied; the maths of ADL's means, the diff-SAE's ranking and Latent Scaling and the
per-latent cost multiplier against naive references; artifacts round-trip; bad configs fail clearly."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from crosscoder import methods
from crosscoder.analysis.ground_truth import auroc
from crosscoder.analysis.scaling import scaling_beta
from crosscoder.config import ConfigError, CrosscoderConfig, TrainConfig
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.kernels import batchtopk_step, l1_step
from crosscoder.methods import MethodData
from crosscoder.methods.adl import mean_differences
from crosscoder.methods.designated_shared import TiedDecoders
from crosscoder.methods.dfc import ExclusiveBlocks
from crosscoder.methods.diff_sae import diff_stats
from crosscoder.model import Crosscoder
from crosscoder.synthetic import SyntheticConfig, sample
from crosscoder.train import TensorBatches, train
from crashing import Crash, CrashingBatches

warnings.filterwarnings("ignore", message=".*Sparse.*")

# The planted dictionary: 24 shared atoms (base and chat directions at cosine 0.9), 4 base-only and 4
# chat-only. Its seed differs from the methods' initialisation seed (0): both draw from
# torch.Generator().manual_seed(seed), so equal seeds would start every decoder on the atoms.
TOY = SyntheticConfig(d_model=16, n_shared=24, n_base_only=4, n_chat_only=4, seed=1)
STEPS = 500
TRAIN = TrainConfig(n_steps=STEPS, batch_size=256, lr=1e-2, l1_coeff=0.5, log_every=STEPS, eval_every=STEPS,
                    auxk_dead_tokens=5000)  # ~20 steps without firing = dead, so AuxK acts in a short run
CONFIGS = {
    "crosscoder_l1": lambda C: C(n_latents=48, train=TRAIN),
    # BatchTopK has no decoder-norm penalty, so a chat-only latent's base half shrinks slowly: it gets
    # twice the steps to reach Δnorm > 0.9 (test_batchtopk_misses_only_at_the_delta_norm_gate).
    "crosscoder_batchtopk": lambda C: C(n_latents=48, k=2, train=dataclasses.replace(TRAIN, n_steps=2 * STEPS,
                                                                                     eval_every=2 * STEPS)),
    "designated_shared": lambda C: C(n_latents=48, train=TRAIN, designated_frac=0.25),
    # exclusive blocks of 12 latents for 4 planted atoms each, a shared block of 24 for 24 shared atoms
    "dfc": lambda C: C(n_latents=48, k=3, train=TRAIN, base_exclusive_frac=0.25, chat_exclusive_frac=0.25),
    "diff_sae": lambda C: C(n_latents=64, k=3, train=TRAIN),  # 4 x d_model
}
SIX = {"crosscoder_l1", "crosscoder_batchtopk", "designated_shared", "dfc", "diff_sae", "adl"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These shapes are tiny: a second thread costs more in synchronisation than it gives (3-8x slower fits
    on the shared 2-core test machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy():
    tr, ho, nm = sample(TOY, 16384), sample(TOY, 4000, seed_offset=1), sample(TOY, 2000, seed_offset=2)
    return tr, ho, MethodData(tr.acts_NSD, ho.acts_NSD, nm.acts_NSD)


@pytest.fixture(scope="module")
def fitted(toy, tmp_path_factory):
    """Each trained method fitted once per module (lazily), with its out_dir."""
    root = tmp_path_factory.mktemp("methods")
    cache: dict = {}

    def get(name):
        if name not in cache:
            cfg = CONFIGS[name](methods.get(name).Config)
            cache[name] = (methods.fit(name, toy[2], root / name, cfg), root / name)
        return cache[name]

    return get


def _recovered(m, ho, kind: str, threshold: float = 0.9) -> list[float]:
    """Best AUROC, among the method's flagged items, for each planted atom of ``kind`` (held-out tokens)."""
    atoms = [a for a, k in enumerate(ho.kinds) if k == kind]
    if len(m.flagged_J) == 0:
        return [0.5] * len(atoms)
    labels = torch.stack([ho.codes_NA[:, a] > 0 for a in atoms], 1)
    return auroc(m.scores(ho.acts_NSD)[:, m.flagged_J], labels).max(0).values.tolist()


# ---------------------------------------------------------------------------- recovery of the planted atoms
@pytest.mark.parametrize("name, n_chat", [("crosscoder_l1", 4), ("crosscoder_batchtopk", 3), ("designated_shared", 4),
                                          ("dfc", 4), ("diff_sae", 4)])
def test_flagged_items_recover_the_chat_only_atoms(fitted, toy, name, n_chat):
    m, _ = fitted(name)
    chat = _recovered(m, toy[1], "chat-only")
    assert sum(a >= 0.9 for a in chat) >= n_chat, chat
    # flagged means chat-specific: no flagged item tracks a base-only atom
    assert max(_recovered(m, toy[1], "base-only")) < 0.9
    assert m.scores(toy[1].acts_NSD[:10]).shape == (10, m.n_items)


def test_batchtopk_misses_only_at_the_delta_norm_gate(fitted, toy):
    """The BatchTopK dictionary holds a latent for every chat-only atom (AUROC >= 0.9); an atom it does not
    flag is lost at the Δnorm > 0.9 gate: its latent leans chat (Δnorm > 0.6) but kept part of its base
    decoder, which no decoder-norm penalty shrinks."""
    from crosscoder.analysis.metrics import diff_geometry

    m, _ = fitted("crosscoder_batchtopk")
    ho = toy[1]
    s = m.scores(ho.acts_NSD)
    delta_F = diff_geometry(m.model).delta_norm_F
    for a in [a for a, k in enumerate(ho.kinds) if k == "chat-only"]:
        auc = auroc(s, ho.codes_NA[:, a] > 0)
        j = int(auc.argmax())
        assert auc[j] >= 0.9
        if j not in m.flagged_J.tolist():
            assert 0.6 < float(delta_F[j]) <= 0.9


def test_flag_rules_equal_their_definitions_latent_by_latent(fitted, toy):
    """Each method's flagged set recomputed one latent at a time from its documented rule."""
    from crosscoder.analysis.metrics import diff_geometry
    from crosscoder.analysis.scaling import latent_scaling

    ho = toy[1].acts_NSD
    for name in ("crosscoder_l1", "designated_shared"):  # chat-only by Δnorm, confirmed by Latent Scaling
        m, _ = fitted(name)
        delta_F, fires_F = diff_geometry(m.model).delta_norm_F, (m.scores(ho) > 0).sum(0)
        want = []
        for j in range(m.n_items):
            if delta_F[j] > 0.9 and fires_F[j] >= m.cfg.min_active_tokens:
                ls = latent_scaling(m.model, ho, [j])
                if ls.nu_error[0] < m.cfg.nu_threshold and ls.nu_recon[0] < m.cfg.nu_threshold:
                    want.append(j)
        assert m.flagged_J.tolist() == want and want, name
    m, _ = fitted("dfc")  # the chat-exclusive block's latents that fire on enough held-out tokens
    fires_F = (m.scores(ho) > 0).sum(0)
    a, b = m.cfg.n_base_exclusive, m.cfg.n_chat_exclusive
    assert m.flagged_J.tolist() == [j for j in range(a, a + b) if fires_F[j] >= m.cfg.min_active_tokens]
    m, _ = fitted("diff_sae")  # by variance explained, among chat-side latents that explain enough
    st = m.stats
    ok = [j for j in range(m.n_items) if st.explained_F[j] >= m.cfg.min_explained
          and abs(float(st.nu_F[j])) < m.cfg.nu_threshold and st.n_active_F[j] >= m.cfg.min_active_tokens]
    assert m.flagged_J.tolist() == sorted(ok, key=lambda j: -float(st.explained_F[j])) and ok


def _positional(n_docs: int, T: int, plant_pos: int, seed_offset: int):
    """Documents of T tokens from a shared-only planted dictionary (chat = base rotated, cosine 0.9),
    where the chat model adds one extra direction v at position ``plant_pos`` of 90% of documents."""
    cfg = SyntheticConfig(d_model=16, n_shared=24, n_base_only=0, n_chat_only=0, seed=1)
    d = sample(cfg, n_docs * T, seed_offset=seed_offset)
    g = torch.Generator().manual_seed(100 + seed_offset)
    v = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(99)), dim=0)
    pos = torch.arange(T).repeat(n_docs)
    planted = (pos == plant_pos) & (torch.rand(n_docs * T, generator=g) < 0.9)
    acts = d.acts_NSD.clone()
    acts[:, 1] += planted[:, None] * (0.5 + 1.5 * torch.rand(n_docs * T, 1, generator=g)) * v
    return acts, pos, planted, v


def test_adl_finds_the_planted_position_and_scores_its_tokens(tmp_path):
    acts, pos, _, v = _positional(600, 8, 2, 0)
    held, held_pos, planted, _ = _positional(300, 8, 2, 1)
    data = MethodData(acts, held, acts[:1000], train_pos_N=pos, heldout_pos_N=held_pos)
    cfg = methods.get("adl").Config(positions=(1, 2, 3, 4, 5), min_relative_norm=0.2)
    m = methods.fit("adl", data, tmp_path, cfg)
    assert m.flagged_J.tolist() == [1]  # item 1 = position 2, and only it
    assert torch.nn.functional.cosine_similarity(m.means.mean_delta_PD[1], v, dim=0) > 0.95
    assert float(auroc(m.scores(held)[:, 1], planted)) > 0.95
    # the steering vector points along δ̄_2 at the chat activations' mean norm
    sv = m.steering_vector(1, strength=2.0)
    assert torch.isclose(sv.norm(), 2.0 * acts[pos >= 0, 1].norm(dim=-1).mean(), rtol=1e-4)


# ---------------------------------------------------------------------------- structure kept exactly
def test_dfc_exclusive_blocks_are_exactly_zero_after_training(fitted):
    m, _ = fitted("dfc")
    blocks = m.blocks(m.cfg)
    W_enc, W_dec = m.model.W_enc_SDF.detach(), m.model.W_dec_FSD.detach()
    base_only, chat_only = blocks["base"], blocks["chat"]
    assert torch.all(W_enc[1][:, base_only] == 0) and torch.all(W_dec[base_only, 1] == 0)
    assert torch.all(W_enc[0][:, chat_only] == 0) and torch.all(W_dec[chat_only, 0] == 0)
    # and the allowed blocks trained (not a model that is zero everywhere)
    assert W_dec[chat_only, 1].norm(dim=-1).min() > 0 and W_dec[blocks["shared"]].norm(dim=-1).min() > 0
    assert set(m.flagged_J.tolist()) <= set(chat_only.tolist())


def test_designated_shared_decoders_are_tied_bit_exactly(fitted, toy, tmp_path):
    m, _ = fitted("designated_shared")
    n = m.cfg.n_designated
    W = m.model.W_dec_FSD.detach()
    assert n == 12 and torch.equal(W[:n, 0], W[:n, 1])
    assert not torch.equal(W[n:, 0], W[n:, 1])  # the other latents differ between the models
    init = Crosscoder(m.model.cfg, generator=torch.Generator().manual_seed(0)).W_dec_FSD[:n, 0]
    assert not torch.allclose(W[:n, 0], init)  # the tied rows trained
    assert torch.equal(m.model.penalty_scale_F[:n], torch.full((n,), 0.15))
    # the BatchTopK variant too (its designated latents ranked by f * w / s)
    cfg = methods.get("designated_shared").Config(n_latents=48, k=3, sparsity="batchtopk", designated_frac=0.25,
                                                  train=dataclasses.replace(TRAIN, n_steps=60))
    b = methods.fit("designated_shared", toy[2], tmp_path, cfg)
    Wb = b.model.W_dec_FSD.detach()
    assert torch.equal(Wb[:12, 0], Wb[:12, 1]) and not torch.equal(Wb[12:, 0], Wb[12:, 1])


def test_constraint_hooks_resume_bit_identically(tmp_path):
    """A DFC-constrained run killed mid-way and resumed equals the uninterrupted run, and tied rows stay
    tied: the trainer's hooks keep the structure through checkpoints."""
    sc = SyntheticConfig(d_model=8, n_shared=10, n_base_only=2, n_chat_only=2, seed=3)
    acts, ho = sample(sc, 4096).acts_NSD, sample(sc, 512, seed_offset=1).acts_NSD
    cfg = CrosscoderConfig(d_model=8, n_latents=24, sparsity="batchtopk", k=3)
    tc = TrainConfig(n_steps=30, batch_size=128, lr=3e-3, log_every=5, checkpoint_every=10, eval_every=30)

    def fresh():
        m = Crosscoder(cfg, generator=torch.Generator().manual_seed(0))
        m.input_scale_S.copy_(estimate_input_scale(ho))
        return m

    for constraint in (ExclusiveBlocks(4, 4, 24), TiedDecoders(6)):
        out = tmp_path / type(constraint).__name__
        ref = train(fresh(), TensorBatches(acts, 128), tc, out / "ref", heldout_raw_NSD=ho, progress=False,
                    constraint=constraint)
        with pytest.raises(Crash):
            train(fresh(), CrashingBatches(acts, 128, crash_at=17), tc, out / "run", heldout_raw_NSD=ho,
                  progress=False, constraint=constraint)
        res = train(fresh(), TensorBatches(acts, 128), tc, out / "run", heldout_raw_NSD=ho, progress=False,
                    constraint=constraint)
        assert res.resumed_from == 10
        for (k, v), (_, v2) in zip(ref.model.state_dict().items(), res.model.state_dict().items()):
            assert torch.equal(v, v2), k
    W = res.model.W_dec_FSD.detach()
    assert torch.equal(W[:6, 0], W[:6, 1])


# ---------------------------------------------------------------------------- maths against naive references
def test_adl_means_equal_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(500, 2, 6, generator=g)
    pos = torch.randint(-1, 9, (500,), generator=g)  # -1: ignored tokens
    positions = (1, 3, 4)
    got = mean_differences(acts, pos, positions, batch_size=64)  # several batches
    for i, p in enumerate(positions):
        rows = [n for n in range(500) if int(pos[n]) == p]
        want = sum(acts[n, 1].double() - acts[n, 0].double() for n in rows) / len(rows)
        torch.testing.assert_close(got.mean_delta_PD[i].double(), want, rtol=1e-5, atol=1e-6)
        assert int(got.count_P[i]) == len(rows)
        torch.testing.assert_close(float(got.chat_norm_P[i]), float(sum(acts[n, 1].norm() for n in rows) / len(rows)),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float(got.chat_norm), float(acts[pos >= 0, 1].norm(dim=-1).mean()), rtol=1e-5, atol=1e-6)


def test_adl_logit_lens_and_scores_match_their_definitions(tmp_path):
    g = torch.Generator().manual_seed(0)
    acts, pos = torch.randn(400, 2, 6, generator=g), torch.arange(4).repeat(100)
    from crosscoder.methods.adl import ADLConfig

    m = methods.fit("adl", MethodData(acts, acts, acts, train_pos_N=pos), tmp_path, ADLConfig(positions=(1, 2),
                                                                                             min_tokens=1))
    W_U = torch.randn(6, 11, generator=g)
    gain = torch.rand(6, generator=g) + 0.5
    lens = lambda v: (v / v.pow(2).mean(-1, keepdim=True).sqrt() * gain) @ W_U  # noqa: E731  (RMSNorm + unembed)
    read = m.logit_lens(lens, top_k=3)
    for i, p in enumerate((1, 2)):
        delta = (acts[pos == p, 1] - acts[pos == p, 0]).mean(0)
        probs = lens(delta[None])[0].softmax(-1)
        assert read.top_ids_PK[i].tolist() == probs.topk(3).indices.tolist()
        torch.testing.assert_close(read.top_probs_PK[i], probs.topk(3).values, rtol=1e-4, atol=1e-6)
        u = delta / delta.norm()
        torch.testing.assert_close(m.scores(acts)[:, i], (acts[:, 1] - acts[:, 0]) @ u, rtol=1e-4, atol=1e-5)


def test_diff_sae_ranking_and_latent_scaling_equal_a_naive_per_latent_loop():
    g = torch.Generator().manual_seed(0)
    D, F = 6, 10
    sae = Crosscoder(CrosscoderConfig(d_model=D, n_latents=F, n_sources=1, sparsity="batchtopk", k=3),
                     generator=g)
    with torch.no_grad():
        sae.b_dec_SD.normal_(generator=g)
        sae.b_enc_F.fill_(0.05)
        sae.input_scale_S.fill_(1.7)
        sae.threshold.fill_(0.01)
    acts = torch.randn(300, 2, D, generator=g)
    st = diff_stats(sae, acts, batch_size=64)
    x = ((acts[:, 1] - acts[:, 0]) * sae.input_scale_S).double()  # the normalised difference, as the method forms it
    f = sae.eval().encode(x.float()[:, None]).detach().double()
    d_FD, b = sae.W_dec_FSD[:, 0].detach().double(), sae.b_dec_SD[0].detach().double()
    variance = (x - x.mean(0)).pow(2).sum()
    for j in range(F):
        if f[:, j].sum() == 0:
            continue
        err_alone = (x - b - f[:, j:j + 1] * d_FD[j]).pow(2).sum()
        want = ((x - b).pow(2).sum() - err_alone) / variance
        assert abs(float(st.explained_F[j]) - float(want)) < 1e-5
        betas = [scaling_beta(f[:, j].float(), d_FD[j].float(), acts[:, s]) for s in (0, 1)]
        torch.testing.assert_close(st.beta_SF[:, j], torch.tensor(betas), rtol=1e-4, atol=1e-6)
        assert int(st.n_active_F[j]) == int((f[:, j] > 0).sum())
    assert (st.n_active_F > 0).sum() >= 3  # the loop above compared something


def _scaled_model(sparsity: str, seed: int = 0) -> Crosscoder:
    cfg = CrosscoderConfig(d_model=6, n_latents=20, sparsity=sparsity, k=3)
    m = Crosscoder(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        m.b_enc_F.copy_(0.1 * torch.randn(20, generator=g))
        m.W_dec_FSD.mul_(1 + 3 * torch.rand(20, 2, 1, generator=g))
    m.penalty_scale_F = torch.where(torch.arange(20) < 5, 0.15, 1.0)
    return m


def test_penalty_scale_enters_the_l1_loss_and_gradients_as_the_naive_formula():
    m = _scaled_model("l1")
    x = torch.randn(64, 2, 6, generator=torch.Generator().manual_seed(5))
    lam = 0.7
    f = torch.relu(sum(x[:, s] @ m.W_enc_SDF[s] for s in range(2)) + m.b_enc_F)
    recon = sum((x[:, s] - (f @ m.W_dec_FSD[:, s] + m.b_dec_SD[s])).pow(2).sum(-1) for s in range(2))
    w = (m.W_dec_FSD[:, 0].norm(dim=-1) + m.W_dec_FSD[:, 1].norm(dim=-1)) * m.penalty_scale_F
    naive = (recon + lam * (f * w).sum(-1)).mean()  # _naive_l1_loss with the cost multiplier
    want = torch.autograd.grad(naive, list(m.parameters()))
    for path in ("dense", "sparse"):
        out = l1_step(m, x, lam, path=path)
        got = torch.autograd.grad(out.loss, list(m.parameters()))
        torch.testing.assert_close(out.loss, naive, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_penalty_scale_divides_the_batchtopk_ranking_score():
    m = _scaled_model("batchtopk")
    x = torch.randn(32, 2, 6, generator=torch.Generator().manual_seed(6))
    out = batchtopk_step(m, x)
    f = torch.relu(m.pre_acts(x)).detach()
    w = (m.W_dec_FSD[:, 0].norm(dim=-1) + m.W_dec_FSD[:, 1].norm(dim=-1)).detach() / m.penalty_scale_F
    keep = torch.zeros(32 * 20, dtype=torch.bool)
    keep[(f * w).flatten().topk(3 * 32).indices] = True
    assert torch.equal(out.n_active_F, keep.view(32, 20).sum(0))
    torch.testing.assert_close(out.min_score, (f * w).flatten().topk(3 * 32).values.min())
    # the folded model keeps the multiplier, so its scores and threshold agree
    assert torch.equal(m.fold().penalty_scale_F, m.penalty_scale_F)


# ---------------------------------------------------------------------------- artifacts, caching, registry
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_artifact_round_trip(fitted, toy, name):
    m, out = fitted(name)
    back = methods.load(out / methods.METHOD_DIR)
    assert type(back) is type(m) and back.cfg == m.cfg and back.cost == m.cost
    assert torch.equal(back.flagged_J, m.flagged_J)
    assert torch.equal(back.scores(toy[1].acts_NSD), m.scores(toy[1].acts_NSD))
    meta = json.loads((out / methods.METHOD_DIR / "metrics.json").read_text())
    assert meta["flagged"] == m.flagged_J.tolist() and meta["cost"]["train_seconds"] > 0
    assert meta["cost"]["train_tokens"] == m.cfg.train.n_steps * m.cfg.train.batch_size


def test_refit_loads_the_artifact_and_refuses_another_config(fitted, toy):
    m, out = fitted("crosscoder_l1")
    again = methods.fit("crosscoder_l1", toy[2], out, m.cfg)
    assert again.cost == m.cost  # loaded, not refitted (a refit would time itself anew)
    other = dataclasses.replace(m.cfg, n_latents=32)
    with pytest.raises(ConfigError, match="another config"):
        methods.fit("crosscoder_l1", toy[2], out, other)
    with pytest.raises(ConfigError, match="another config"):
        methods.fit("dfc", toy[2], out)


def test_a_seventh_method_is_one_class(tmp_path):
    from dataclasses import dataclass

    from crosscoder.methods.base import REGISTRY, Method, MethodConfig, register

    @dataclass
    class NormDiffConfig(MethodConfig):
        """The chat − base norm difference as one item."""

    @register
    class NormDiff(Method):
        name = "test_norm_diff"
        Config = NormDiffConfig
        n_items = 1

        def _scores(self, acts, positions):
            return (acts[:, 1].norm(dim=-1) - acts[:, 0].norm(dim=-1))[:, None]

        def tensors(self):
            return {}

        @classmethod
        def _from_tensors(cls, cfg, d_model, flagged, tensors, metrics):
            return cls(cfg, d_model, flagged, metrics)

        @classmethod
        def _fit(cls, cfg, data, out_dir, *, progress):
            return cls(cfg, data.train_NSD.shape[-1], torch.tensor([0]), {"train_tokens": len(data.train_NSD)})

    try:
        assert "test_norm_diff" in methods.names()
        acts = torch.randn(50, 2, 4)
        m = methods.fit("test_norm_diff", MethodData(acts, acts, acts), tmp_path)
        back = methods.load(tmp_path / methods.METHOD_DIR)
        assert torch.equal(back.scores(acts), m.scores(acts)) and back.cost.train_tokens == 50
    finally:
        REGISTRY.pop("test_norm_diff", None)


def test_registry_holds_the_six_methods():
    assert SIX <= set(methods.names())
    with pytest.raises(ConfigError, match="unknown diffing method 'nope'; choose one of"):
        methods.get("nope")
    from crosscoder.methods.base import register

    class Impostor(methods.get("adl")):
        name = "adl"

    with pytest.raises(ValueError, match="method name 'adl' is taken by crosscoder.methods.adl"):
        register(Impostor)
    assert methods.get("adl").__name__ == "ActivationDifferenceLens"


@pytest.mark.parametrize("name, kwargs, match", [
    ("crosscoder_batchtopk", {"n_latents": 8, "k": 9}, "k = 9 exceeds n_latents = 8"),
    ("crosscoder_l1", {"train": {"l1_coeff": 0.0}}, "no sparsity penalty; set train.l1_coeff > 0"),
    ("crosscoder_l1", {"train": {"bogus": 1}}, r"unknown TrainConfig key\(s\) \['bogus'\]"),
    ("crosscoder_l1", {"nu_threshold": 0.0}, r"nu_threshold must be a finite number in \(0"),
    ("designated_shared", {"n_latents": 8, "designated_frac": 0.05}, "designates no latent; raise designated_frac"),
    ("designated_shared", {"designated_frac": 1.0}, "designates every latent"),
    ("designated_shared", {"shared_penalty_ratio": 0.0}, r"shared_penalty_ratio must be a finite number in \(0"),
    ("designated_shared", {"sparsity": "topk"}, "sparsity must be 'l1' or 'batchtopk'"),
    ("dfc", {"n_latents": 10, "k": 2, "chat_exclusive_frac": 0.05}, "reserves no chat-exclusive latent"),
    ("dfc", {"n_latents": 10, "k": 2, "base_exclusive_frac": 0.5, "chat_exclusive_frac": 0.5}, "leave no shared latent"),
    ("diff_sae", {"n_latents": 4, "k": 5}, "k = 5 exceeds n_latents = 4"),
    ("diff_sae", {"min_explained": 2.0}, r"min_explained must be a finite number in \[0.0, 1.0\]"),
    ("adl", {"positions": ()}, "positions must be distinct integers >= 0"),
    ("adl", {"positions": (1, 1)}, "positions must be distinct integers >= 0"),
    ("adl", {"score_on": "base"}, r"score_on must be one of \('difference', 'chat'\)"),
])
def test_bad_configs_name_the_problem_and_the_fix(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        methods.get(name).Config.from_dict(kwargs)


def test_bad_data_fails_before_fitting(tmp_path):
    good = torch.randn(64, 2, 4)
    with pytest.raises(ConfigError, match=r"train_NSD must have shape \[tokens, 2 \(base, chat\), d_model\]"):
        methods.fit("adl", MethodData(torch.randn(64, 3, 4), good, good), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"heldout_NSD must have shape \[tokens, 2 \(base, chat\), 4\]"):
        methods.fit("adl", MethodData(good, torch.randn(64, 2, 5), good), tmp_path / "b")
    with pytest.raises(ConfigError, match="ADL needs the position of each training token"):
        methods.fit("adl", MethodData(good, good, good), tmp_path / "c")
    with pytest.raises(ConfigError, match=r"positions \[5\] have fewer than min_tokens = 10"):
        methods.fit("adl", MethodData(good, good, good, train_pos_N=torch.arange(64) % 5), tmp_path / "d")
    with pytest.raises(ConfigError, match="takes a ADLConfig"):
        methods.fit("adl", MethodData(good, good, good), tmp_path / "e", methods.get("dfc").Config())



def _naive_l1_loss(m: Crosscoder, x, lam: float, W_dec_FSD) -> torch.Tensor:
    """The L1 crosscoder loss as an explicit loop over sources, with the decoder given."""
    f = torch.relu(sum(x[:, s] @ m.W_enc_SDF[s] for s in range(2)) + m.b_enc_F)
    recon = sum((x[:, s] - (f @ W_dec_FSD[:, s] + m.b_dec_SD[s])).pow(2).sum(-1) for s in range(2))
    w = W_dec_FSD[:, 0].norm(dim=-1) + W_dec_FSD[:, 1].norm(dim=-1)
    return (recon + lam * (f * w).sum(-1)).mean()


def test_tied_rows_get_the_gradient_of_one_shared_vector():
    """TiedDecoders.project_grads_ gives both tied rows d loss / d v of the model whose rows [0, n) of both
    sources ARE one parameter v (autograd on that parametrisation), and leaves the other rows' gradients."""
    m = _scaled_model("l1")
    m.penalty_scale_F = None
    n = 5
    with torch.no_grad():
        m.W_dec_FSD[:n, 1] = m.W_dec_FSD[:n, 0]
    x = torch.randn(64, 2, 6, generator=torch.Generator().manual_seed(7))
    l1_step(m, x, 0.7).loss.backward()
    plain = m.W_dec_FSD.grad.clone()
    with torch.no_grad():
        TiedDecoders(n).project_grads_(m)
    v = m.W_dec_FSD[:n, 0].detach().clone().requires_grad_()
    W = torch.cat([torch.stack([v, v], 1), m.W_dec_FSD[n:].detach()])
    (g_v,) = torch.autograd.grad(_naive_l1_loss(m, x, 0.7, W), v)
    g = m.W_dec_FSD.grad
    torch.testing.assert_close(g[:n, 0], g_v, rtol=1e-4, atol=1e-6)
    assert torch.equal(g[:n, 0], g[:n, 1]) and torch.equal(g[n:], plain[n:])
    assert not torch.allclose(plain[:n, 0], g_v)  # the projection changed something


def test_method_data_from_cache_reads_every_split_with_positions():
    class Cache:  # the two calls MethodData.from_cache makes of an ActivationCache
        def load(self, split, *, with_index=False):
            n = {"train": 6, "heldout": 4, "norm": 3}[split]
            acts = torch.full((n, 2, 5), float(n), dtype=torch.bfloat16)
            idx = (torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int64), torch.arange(1, n + 1,
                                                                                                     dtype=torch.int32))
            return (acts, *idx) if with_index else acts

    d = MethodData.from_cache(Cache())
    assert d.train_NSD.dtype == torch.bfloat16  # the training split stays in its storage dtype
    assert d.heldout_NSD.dtype == d.norm_NSD.dtype == torch.float32
    assert d.train_pos_N.tolist() == [1, 2, 3, 4, 5, 6] and d.heldout_pos_N.tolist() == [1, 2, 3, 4]
    assert d.norm_NSD.shape == (3, 2, 5)


def test_adl_scores_on_the_chat_activations_and_lm_logit_lens(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from crosscoder.methods.adl import ADLConfig, lm_logit_lens

    g = torch.Generator().manual_seed(0)
    acts, pos = torch.randn(400, 2, 8, generator=g), torch.arange(4).repeat(100)
    m = methods.fit("adl", MethodData(acts, acts, acts, train_pos_N=pos), tmp_path,
                    ADLConfig(positions=(1, 2), min_tokens=1, score_on="chat"))
    torch.testing.assert_close(m.scores(acts), acts[:, 1] @ m.unit_PD.t())
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)).eval()
    with torch.no_grad():
        lm.model.norm.weight.uniform_(0.5, 1.5)  # a gain that matters
        want = lm.lm_head(lm.model.norm(m.means.mean_delta_PD))
    torch.testing.assert_close(lm_logit_lens(lm)(m.means.mean_delta_PD), want)
    assert m.logit_lens(lm_logit_lens(lm), top_k=4).top_ids_PK.tolist() == want.topk(4).indices.tolist()


# ---------------------------------------------------------------------------- reusing trained crosscoders, cuts
@pytest.mark.parametrize("name", ["crosscoder_l1", "crosscoder_batchtopk"])
def test_a_trained_crosscoder_wraps_as_the_method_fitted_with_its_config(fitted, toy, tmp_path, name):
    """The training pages' crosscoder (``experiment.train_crosscoder`` with the run's configs) wrapped by
    ``methods.from_crosscoder`` equals ``methods.fit`` of the same config: config, flagged latents, scores,
    held-out metrics; its cost is the run's recorded seconds plus the flagging's."""
    from crosscoder import experiment

    m, _ = fitted(name)
    # the training stage gives the L1 run the BatchTopK k too (unused by L1): the wrap must ignore it
    k = m.cfg.k if name == "crosscoder_batchtopk" else 7
    cc = CrosscoderConfig(d_model=16, n_latents=m.cfg.n_latents, sparsity=m.model.cfg.sparsity, k=k)
    splits = experiment.splits_from(toy[2].train_NSD, toy[2].heldout_NSD, toy[2].norm_NSD)
    res = experiment.train_crosscoder(splits, cc, m.cfg.train, tmp_path / "run", progress=False)
    w = methods.from_crosscoder(res.model_dir, toy[2], nu_threshold=m.cfg.nu_threshold, out_dir=tmp_path / "wrap")
    assert type(w) is type(m) and w.cfg == m.cfg
    assert torch.equal(w.flagged_J, m.flagged_J) and len(w.flagged_J) > 0
    assert torch.equal(w.scores(toy[1].acts_NSD), m.scores(toy[1].acts_NSD))
    assert w.metrics["heldout"] == m.metrics["heldout"] and w.metrics["flagging"] == m.metrics["flagging"]
    assert w.cost.train_tokens == m.cost.train_tokens and w.cost.param_bytes == m.cost.param_bytes
    assert w.cost.train_seconds >= res.metrics["wall_seconds_this_session"] > 0
    back = methods.load(tmp_path / "wrap" / methods.METHOD_DIR)  # saved like any fitted method
    assert torch.equal(back.flagged_J, w.flagged_J) and back.cfg == w.cfg


def test_a_crosscoder_of_other_data_or_settings_is_not_wrapped(toy, tmp_path):
    from crosscoder import experiment

    tc = dataclasses.replace(TRAIN, n_steps=20, eval_every=20)
    splits = experiment.splits_from(toy[2].train_NSD, toy[2].heldout_NSD, toy[2].norm_NSD)
    run = experiment.train_crosscoder(splits, CrosscoderConfig(d_model=16, n_latents=48), tc, tmp_path / "a",
                                      progress=False)
    other = toy[2]._replace(norm_NSD=3.0 * toy[2].norm_NSD)
    with pytest.raises(ConfigError, match="trained on other activations"):
        methods.from_crosscoder(run.model_dir, other)
    joint = experiment.train_crosscoder(splits, CrosscoderConfig(d_model=16, n_latents=48, decoder_norm="joint"), tc,
                                        tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="settings the 'crosscoder_l1' method does not build"):
        methods.from_crosscoder(joint.model_dir, toy[2])
    with pytest.raises(ConfigError, match="width 16; the data are"):
        methods.from_crosscoder(run.model_dir, MethodData(*(torch.zeros(8, 2, 4) for _ in range(3))))


def test_with_cut_reflags_by_the_rule_the_fit_flags_by(fitted, toy):
    """``with_cut`` recomputes the flagged set from stored statistics: the items that pass the method's
    other rules with statistic >= the cut (its own order kept), and nothing else changes."""
    m, _ = fitted("diff_sae")
    stat, gate = m.cut_statistic()
    assert m.flagged_J.tolist() == [j for j in stat.argsort(descending=True).tolist()
                                    if gate[j] and stat[j] >= m.cfg.min_explained]
    for cut in (0.0, 0.05, float(stat[m.flagged_J[0]])):
        c = m.with_cut(cut)
        want = [j for j in stat.argsort(descending=True).tolist() if gate[j] and stat[j] >= cut]
        assert c.flagged_J.tolist() == want and c.cfg.min_explained == cut
        assert c.cost == m.cost and c.metrics["cut"] == {"field": "min_explained", "value": cut, "fitted with": 0.01}
    assert len(m.with_cut(1.0).flagged_J) == 0 and m.cfg.min_explained == 0.01  # the original is untouched
    with pytest.raises(ConfigError, match=r"min_explained must be a finite number in \[0.0, 1.0\]"):
        m.with_cut(-0.5)
    with pytest.raises(ConfigError, match="has no tunable flagging cut"):
        fitted("dfc")[0].with_cut(0.1)


def test_adl_cut_statistic_is_the_relative_norm(tmp_path):
    acts, pos, _, _ = _positional(200, 8, 2, 0)
    m = methods.fit("adl", MethodData(acts, acts, acts, train_pos_N=pos), tmp_path,
                    methods.get("adl").Config(min_relative_norm=0.0))
    rel, gate = m.cut_statistic()
    for i, p in enumerate(m.cfg.positions):
        d = acts[pos == p, 1] - acts[pos == p, 0]
        assert float(rel[i]) == pytest.approx(float(d.mean(0).norm() / acts[pos == p, 1].norm(dim=-1).mean()), rel=1e-4)
    assert gate.all() and m.flagged_J.tolist() == list(range(5))
    assert m.with_cut(float(rel.max())).flagged_J.tolist() == [int(rel.argmax())] == [1]  # position 2: the plant


def test_text_only_positions_mask_the_chat_sequences():
    from crosscoder.methods.base import text_only_positions

    # three sequences: 0 text, 1 chat (marker 9 right after BOS), 2 text that contains 9 later
    token = torch.tensor([5, 6, 9, 4, 4, 7, 9])
    seq = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    pos = torch.tensor([1, 2, 1, 2, 3, 1, 2])
    assert text_only_positions(token, seq, pos, 9).tolist() == [1, 2, -1, -1, -1, 1, 2]
