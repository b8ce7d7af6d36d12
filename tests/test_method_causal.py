"""Each diffing method's causal check (``Method.intervention`` / ``control``, ``scoreboard_run.causal_checks``)
and ADL's sign chosen on validation data (``scoreboard.tune_signs``).

The model pair is test_causal's: "chat" is "base" with a direction u added at a trigger token, whose
unembedding row of token Z reads u, so chat emits Z after the trigger and base does not. Each method
gets an item that carries u (a crosscoder latent with chat decoder u, a difference-SAE latent reading
and writing u, an ADL mean difference along u): removing it must remove the behaviour, its control
must not. Separately, every method's edit is compared with the same removal written out by hand from
the two models' residuals.
"""

from __future__ import annotations

import math

import pytest
import torch
from fakes import StandInMethod
from test_causal import D, LAYER, Z, planted  # noqa: F401  (planted: the shared fixture)
from torch import Tensor

from crosscoder import methods
from crosscoder.analysis import causal
from crosscoder.analysis.probes import ProbeTask
from crosscoder.config import ConfigError, CrosscoderConfig, TrainConfig
from crosscoder.data.pair import residual_after
from crosscoder.methods.adl import MeanDifferences
from crosscoder.methods.diff_sae import DiffStats
from crosscoder.model import Crosscoder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _emits_z(ids):
    return ids[:1] == [Z]


def _crosscoder_method(name: str, cc: Crosscoder):
    """The registered crosscoder-family method ``name`` around ``cc`` (all latents flagged)."""
    cls = methods.get(name)
    extra = {"crosscoder_batchtopk": {"k": 2}, "dfc": {"k": 2, "base_exclusive_frac": 0.34, "chat_exclusive_frac": 0.34},
             "designated_shared": {"designated_frac": 0.34}}.get(name, {})
    cfg = cls.Config(n_latents=cc.cfg.n_latents, train=TrainConfig(l1_coeff=1.0), **extra)
    return cls(cfg, D, torch.arange(cc.cfg.n_latents), {}, cc)


def _diff_sae(sae: Crosscoder):
    F = sae.cfg.n_latents
    z = torch.zeros(F)
    stats = DiffStats(z, torch.zeros(2, F), z, torch.zeros(F, dtype=torch.long))
    return methods.get("diff_sae")(methods.get("diff_sae").Config(n_latents=F, k=2), D, torch.arange(F), {}, sae, stats)


def _adl(dirs_PD: Tensor, score_on: str = "difference"):
    P = dirs_PD.shape[0]
    means = MeanDifferences(dirs_PD, torch.zeros(P, D), dirs_PD, torch.ones(P), torch.full((P,), 10), torch.tensor(1.0))
    cfg = methods.get("adl").Config(positions=tuple(range(1, P + 1)), score_on=score_on)
    return methods.get("adl")(cfg, D, torch.arange(P), {}, means)


def _edited(base, chat, iv, ids):
    """The chat residual after block LAYER under ``iv`` (a hook registered after the edit sees its output)."""
    got = []
    with causal.intervened(chat, base, LAYER, iv):
        h = chat.model.layers[LAYER].register_forward_hook(lambda m, i, o: got.append(o[0] if isinstance(o, tuple)
                                                                                       else o))
        try:
            chat(input_ids=ids, use_cache=False)
        finally:
            h.remove()
    return got[0][0]


def _random_crosscoder(sparsity: str, n_sources: int, seed: int, centre: bool = False) -> Crosscoder:
    g = torch.Generator().manual_seed(seed)
    cc = Crosscoder(CrosscoderConfig(d_model=D, n_latents=6, n_sources=n_sources, sparsity=sparsity, k=2,
                                     centre_inputs=centre,
                                     source_names=("base", "chat") if n_sources == 2 else ("chat-base",)))
    with torch.no_grad():
        for p in (cc.W_enc_SDF, cc.W_dec_FSD, cc.b_dec_SD):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        cc.b_enc_F.copy_(torch.randn(cc.b_enc_F.shape, generator=g) * 0.1 + 0.2)
        cc.input_scale_S.copy_(0.5 + torch.rand(n_sources, generator=g))
        if centre:
            cc.input_mean_SD.copy_(torch.randn(n_sources, D, generator=g) * 0.2)
        cc.threshold.fill_(0.0)  # BatchTopK at inference: f > 0, which the hand computation below mirrors
    return cc.eval()


@pytest.mark.parametrize("name", ["crosscoder_l1", "crosscoder_batchtopk", "designated_shared", "dfc"])
def test_crosscoder_family_removes_f_times_chat_decoder_as_computed_by_hand(planted, name):  # noqa: F811
    base, chat, _, _, prompts = planted
    sparsity = "batchtopk" if name in ("crosscoder_batchtopk", "dfc") else "l1"
    cc = _random_crosscoder(sparsity, 2, seed=len(name), centre=name == "crosscoder_l1")
    fit = _crosscoder_method(name, cc)
    ids = torch.tensor([prompts[2]])
    xb, xc = residual_after(base, ids, LAYER)[0], residual_after(chat, ids, LAYER)[0]
    J = [1, 4]
    mean = cc.input_mean_SD if cc.cfg.centre_inputs else torch.zeros(2, D)
    s = cc.input_scale_S
    pre = ((xb - mean[0]) * s[0]) @ cc.W_enc_SDF[0] + ((xc - mean[1]) * s[1]) @ cc.W_enc_SDF[1] + cc.b_enc_F
    f = torch.relu(pre)
    want = xc - sum(f[:, j:j + 1] * cc.W_dec_FSD[j, 1] / s[1] for j in J)
    iv = fit.intervention(torch.tensor(J))
    assert iv.needs_base and fit.intervenes
    got = _edited(base, chat, iv, ids)
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, xc, atol=1e-3)  # the latents fired: the check is not vacuous


def test_diff_sae_removes_its_latents_contribution_to_delta_as_computed_by_hand(planted):  # noqa: F811
    base, chat, _, _, prompts = planted
    sae = _random_crosscoder("batchtopk", 1, seed=7)
    fit = _diff_sae(sae)
    ids = torch.tensor([prompts[0]])
    xb, xc = residual_after(base, ids, LAYER)[0], residual_after(chat, ids, LAYER)[0]
    s = sae.input_scale_S[0]
    f = torch.relu(((xc - xb) * s) @ sae.W_enc_SDF[0] + sae.b_enc_F)
    J = [0, 3, 5]
    want = xc - sum(f[:, j:j + 1] * sae.W_dec_FSD[j, 0] / s for j in J)
    got = _edited(base, chat, fit.intervention(torch.tensor(J)), ids)
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, xc, atol=1e-3)


@pytest.mark.parametrize("score_on", ["difference", "chat"])
def test_adl_removes_the_span_of_its_directions_as_computed_by_hand(planted, score_on):  # noqa: F811
    base, chat, _, _, prompts = planted
    dirs = torch.randn(4, D, generator=torch.Generator().manual_seed(2))
    fit = _adl(dirs, score_on)
    ids = torch.tensor([prompts[1]])
    xb, xc = residual_after(base, ids, LAYER)[0], residual_after(chat, ids, LAYER)[0]
    U = torch.nn.functional.normalize(dirs[[0, 2]], dim=1).double()  # [2, D]
    P = U.t() @ torch.linalg.inv(U @ U.t()) @ U  # projector on their span, by the normal equations
    x = (xc - xb) if score_on == "difference" else xc
    want = xc - (x.double() @ P).float()
    iv = fit.intervention(torch.tensor([0, 2]))
    assert iv.needs_base == (score_on == "difference")
    assert torch.allclose(_edited(base, chat, iv, ids), want, atol=1e-4)
    # the sign of an item's score does not change what removing it removes
    flipped = fit.with_signs(torch.tensor([-1.0, 1.0, -1.0, 1.0])).intervention(torch.tensor([0, 2]))
    assert torch.allclose(_edited(base, chat, flipped, ids), want, atol=1e-4)


def _planted_methods(cc, u):
    """The three kinds of method, each with item 0 carrying the planted direction u."""
    g = torch.Generator().manual_seed(11)
    sae = Crosscoder(CrosscoderConfig(d_model=D, n_latents=4, n_sources=1, sparsity="batchtopk", k=1,
                                      source_names=("chat-base",)))
    with torch.no_grad():
        for p in (sae.W_enc_SDF, sae.W_dec_FSD, sae.b_enc_F, sae.b_dec_SD):
            p.zero_()
        sae.input_scale_S.fill_(1.0)
        sae.threshold.fill_(0.0)
        sae.W_enc_SDF[0, :, 0] = u
        sae.W_dec_FSD[0, 0] = u
        for j in (1, 2, 3):  # other live latents: random directions, firing a little on every difference
            r = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
            sae.W_enc_SDF[0, :, j] = 0.1 * r
            sae.W_dec_FSD[j, 0] = r
            sae.b_enc_F[j] = 0.01
    adl_dirs = torch.cat([u[None], torch.randn(2, D, generator=g)])
    return {"crosscoder_l1": _crosscoder_method("crosscoder_l1", cc), "diff_sae": _diff_sae(sae.eval()),
            "adl": _adl(adl_dirs)}


def test_removing_the_planted_direction_removes_the_behaviour_and_each_control_does_not(planted):  # noqa: F811
    base, chat, cc, u, prompts = planted
    assert causal.behaviour_rate(chat, prompts, _emits_z, 1).hits == 4
    for name, fit in _planted_methods(cc, u).items():
        with causal.intervened(chat, base, LAYER, fit.intervention(torch.tensor([0]))):
            assert causal.behaviour_rate(chat, prompts, _emits_z, 1).hits == 0, name
        for seed in range(3):
            ctrl = fit.control(torch.tensor([0]), torch.arange(fit.n_items), seed=seed)
            with causal.intervened(chat, base, LAYER, ctrl):
                assert causal.behaviour_rate(chat, prompts, _emits_z, 1).hits == 4, (name, seed, ctrl.what)
    # the control never draws an ablated item, and says so when there is no other live one
    fit = _planted_methods(cc, u)["crosscoder_l1"]
    assert fit.control(torch.tensor([0]), torch.tensor([0]), seed=0) is None
    assert methods.base.random_other_items(torch.tensor([0, 2]), torch.arange(4), 5).tolist() == [1, 3]


class _NoEdit(StandInMethod):
    """A method that defines no intervention."""

    name = "no_edit"
    no_intervention = "its items are not directions of the residual stream"

    def __init__(self):
        super().__init__(D, 1)

    def _scores(self, acts, positions):
        return acts[:, 1, :1]


def _board(fits, auroc, task="emit_decision"):
    """A Board whose results say which flagged items detect ``task`` (AUROC per flagged item)."""
    from crosscoder.analysis.scoreboard import BehaviourScore, MethodScore, ScoreRow
    from crosscoder.analysis.scoreboard_run import Board

    results, rows = {}, []
    for name, fit in fits.items():
        a = torch.tensor(auroc[name], dtype=torch.float32)[:, None]
        best = float(a.max())
        row = ScoreRow(name, int(best >= 0.9), 1, (task,) if best >= 0.9 else (), 0, 1.0, 1, len(a), None, math.nan,
                       1.0, None, 0.9, 0.8)
        beh = [BehaviourScore(name, task, best, int(fit.flagged_J[a[:, 0].argmax()]), best >= 0.9, best, best, 1.0, 4, 8)]
        results[name], rows = MethodScore(row, beh, a, torch.zeros(0, 1)), rows + [row]
    return Board(results, rows, {}, dict(fits), False, 1, "")


def test_causal_checks_loop_over_methods_with_their_own_interventions(planted):  # noqa: F811
    from crosscoder.analysis import scoreboard_run as sb

    base, chat, cc, u, prompts = planted
    fits = {**_planted_methods(cc, u), "no_edit": _NoEdit()}
    # item 0 detects the behaviour for every method; the others do not (ADL's item 2: 0.85, not recovered)
    auroc = {"crosscoder_l1": [0.95, 0.5, 0.6, 0.4], "diff_sae": [0.99, 0.5, 0.5, 0.5], "adl": [0.97, 0.5, 0.85],
             "no_edit": [0.5]}
    board = _board(fits, auroc)
    # held-out rows for the live items: the prompts' activations, padded
    T = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    mask = torch.tensor([[t < len(p) for t in range(T)] for p in prompts])
    acts = torch.stack([residual_after(base, ids, LAYER), residual_after(chat, ids, LAYER)], dim=2)
    held = sb.EvalRows(acts, mask, {"emit_decision": ProbeTask(mask, mask)})
    probes = {"emit_decision": causal.Probe("emit", prompts, _emits_z), "other_decision": causal.Probe(
        "never", prompts, lambda ids: False)}
    rows = sb.causal_checks(board, base, chat, LAYER, probes, held, max_new_tokens=1)
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["crosscoder_l1", "diff_sae", "adl", "no_edit"]  # one check each
    for name in ("crosscoder_l1", "diff_sae", "adl"):
        r = by[name]
        assert (r["decision"], r["items"], r["item ids"], r["chosen"]) == ("emit_decision", 1, [0], "recovering")
        assert (r["before hits"], r["after hits"], r["control hits"], r["prompts"]) == (4, 0, 4, 4), name
    assert by["adl"]["control"] == "1 random direction" and by["diff_sae"]["control"] == "1 random live item"
    assert by["no_edit"]["note"] == "no intervention: its items are not directions of the residual stream"
    with pytest.raises(ConfigError, match="has no intervention"):
        fits["no_edit"].intervention(torch.tensor([0]))
    # with unrecovered decisions too: the best flagged item of a behaviour nobody recovers, marked
    board2 = _board({"adl": fits["adl"]}, {"adl": [0.6, 0.5, 0.85]})
    rows2 = sb.causal_checks(board2, base, chat, LAYER, probes, held, max_new_tokens=1)
    assert rows2 == []  # not recovered, not checked by default
    rows3 = sb.causal_checks(board2, base, chat, LAYER, probes, held, max_new_tokens=1, unrecovered=True)
    assert [(r["item ids"], r["chosen"]) for r in rows3] == [([2], "best flagged, not recovered")]
    table = sb.causal_table(board._replace(causal=rows))
    assert table[0]["before"] == "1.00 (4/4)" and table[0]["after"] == "0.00 (0/4)"
    assert table[-1]["after control"].startswith("no intervention")
    assert "not recovered" in sb.causal_table(board2._replace(causal=rows3))[0]["items removed"]
    assert "off in this profile" in sb.causal_note(board) and "recovers" in sb.causal_note(board._replace(causal=rows))


def test_crosscoder_method_intervention_equals_edit_latents(planted):  # noqa: F811
    """The method's edit is causal.edit_latents' ablation (coeff -1 on the chat model), not a second copy."""
    base, chat, cc, u, prompts = planted
    fit = _crosscoder_method("crosscoder_l1", cc)
    ids = torch.tensor([prompts[3]])
    got = _edited(base, chat, fit.intervention(torch.tensor([0, 2])), ids)
    ref = []
    with causal.edit_latents(chat, base, cc, [0, 2], LAYER, target_source=1):
        h = chat.model.layers[LAYER].register_forward_hook(lambda m, i, o: ref.append(o[0] if isinstance(o, tuple)
                                                                                       else o))
        try:
            chat(input_ids=ids, use_cache=False)
        finally:
            h.remove()
    assert torch.allclose(got, ref[0][0], atol=1e-5)


# ---------------------------------------------------------------------------- ADL's sign, on validation data
def test_choose_signs_flips_only_when_the_negated_score_is_strictly_better():
    from crosscoder.analysis.scoreboard import choose_signs

    auc = torch.tensor([[0.06, 0.5], [0.95, 0.02], [0.5, 0.5], [math.nan, 0.3], [0.2, 0.8]])
    # item 0: 1-0.06 = 0.94 > 0.5 -> flip; item 1: 0.98 > 0.95 -> flip; tie -> keep; NaN as 0.5: 0.7 > 0.5 -> flip;
    # item 4: 0.8 both ways -> keep
    assert choose_signs(auc).tolist() == [-1.0, -1.0, 1.0, -1.0, 1.0]
    for trial in range(20):  # brute force: the sign that gives the higher best AUROC
        a = torch.rand(6, 3, generator=torch.Generator().manual_seed(trial))
        want = [(-1.0 if max(1 - x for x in row) > max(row) else 1.0) for row in a.tolist()]
        assert choose_signs(a).tolist() == want


def _negated_rows(n_docs: int, seed_offset: int, shuffle_labels: bool = False):
    """Documents of 8 tokens (shared-only planted dictionary) where chat adds +c v at position 2 of 70% of
    documents and -c v at position 2 of the other 30%, which carry the label: the mean difference at
    position 2 points along +v, so the behaviour sits at the *lowest* scores of ADL's item for it."""
    from crosscoder.analysis.scoreboard_run import EvalRows
    from crosscoder.methods import MethodData
    from crosscoder.synthetic import SyntheticConfig, sample

    T = 8
    d = sample(SyntheticConfig(d_model=16, n_shared=24, n_base_only=0, n_chat_only=0, seed=1), n_docs * T,
               seed_offset=seed_offset)
    g = torch.Generator().manual_seed(200 + seed_offset)
    v = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(99)), dim=0)
    pos = torch.arange(T).repeat(n_docs)
    label = (pos == 2) & (torch.rand(n_docs * T, generator=g) < 0.3)
    c = 0.5 + 1.5 * torch.rand(n_docs * T, 1, generator=g)
    acts = d.acts_NSD.clone()
    acts[:, 1] += (pos == 2)[:, None] * torch.where(label[:, None], -c, c) * v
    mask = torch.ones(n_docs, T, dtype=torch.bool)
    mask[:, 0] = False
    y = label.reshape(n_docs, T) & mask
    if shuffle_labels:  # the same number of positives, anywhere among the eligible positions
        flat = y[mask]
        y = torch.zeros_like(y)
        y[mask] = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(7))]
    return EvalRows(acts.reshape(n_docs, T, 2, 16), mask, {"planted": ProbeTask(y, mask)}), \
        MethodData(acts, acts, acts, train_pos_N=pos)


def test_adl_sign_is_chosen_on_validation_data_and_recovers_a_negated_direction(tmp_path):
    from crosscoder.analysis import scoreboard_run as sb
    from crosscoder.analysis.scoreboard import eval_scores, flagged_auroc, tune_signs

    _, train = _negated_rows(400, 0)
    val, _ = _negated_rows(200, 1)
    held, _ = _negated_rows(200, 2)
    adl = methods.fit("adl", train, tmp_path / "adl", methods.get("adl").Config(min_relative_norm=0.0))
    items = torch.arange(adl.n_items)
    auc_fitted = flagged_auroc(eval_scores(adl, held.acts_NTSD, held.mask_NT, items), items, held.tasks, held.mask_NT)
    assert float(auc_fitted[1, 0]) < 0.1  # the fitted orientation points away from the behaviour
    signed, choice = tune_signs(adl, val.acts_NTSD, val.mask_NT, val.tasks)
    assert choice.signs == (1, -1, 1, 1, 1) and choice.best_auroc_flipped[1] > 0.9 > choice.best_auroc_fitted[1]
    assert signed.sign_P.tolist() == [1, -1, 1, 1, 1] and adl.sign_P.tolist() == [1] * 5  # a copy
    assert torch.allclose(signed.scores(held.acts_NTSD[0]), adl.scores(held.acts_NTSD[0]) * signed.sign_P)
    board = sb.score_board({"adl": adl}, held, val, n_boot=0)
    assert board.signs["adl"].signs == (1, -1, 1, 1, 1)
    assert board.rows[0].recovered == ("planted",) and board.fits["adl"].flagged_J.tolist() == [1]
    assert board.results["adl"].behaviours[0].best_auroc > 0.9
    # the held-out labels choose nothing: shuffled, the signs and the cut are the same
    shuffled, _ = _negated_rows(200, 2, shuffle_labels=True)
    assert not torch.equal(shuffled.tasks["planted"].label_NT, held.tasks["planted"].label_NT)
    other = sb.score_board({"adl": adl}, shuffled, val, n_boot=0)
    assert other.signs == board.signs and other.cuts["adl"].value == board.cuts["adl"].value
    assert other.fits["adl"].sign_P.tolist() == board.fits["adl"].sign_P.tolist()
    assert sb.sign_table(board)[1] == {"method": "adl", "item": 1, "sign": -1,
                                       "best validation AUROC, fitted sign": choice.best_auroc_fitted[1],
                                       "flipped": choice.best_auroc_flipped[1]}
    # the sign travels with the artifact
    signed.save(tmp_path / "signed")
    assert methods.load(tmp_path / "signed").sign_P.tolist() == [1, -1, 1, 1, 1]
    with pytest.raises(ConfigError, match="has no free sign"):
        tune_signs(_NoEdit(), val.acts_NTSD, val.mask_NT, val.tasks)
    with pytest.raises(ConfigError, match="must hold \\+1 or -1"):
        adl.with_signs(torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))


def test_scoreboard_stage_has_the_causal_check_parameters():
    from crosscoder.schema import STAGES, ScoreboardOptions

    p = STAGES["scoreboard"].load({"causal_prompts": 0})
    assert (p.causal_prompts, p.causal_max_new_tokens, p.causal_unrecovered) == (0, 64, False)  # 0: no check
    with pytest.raises(ConfigError, match="causal_prompts"):
        ScoreboardOptions(causal_prompts=-1)
    with pytest.raises(ConfigError, match="causal_max_new_tokens"):
        ScoreboardOptions(causal_max_new_tokens=0)
