"""CE recovered: 1 for a perfect reconstruction, 0 for zero-ablation; the capture hook reads
HF hidden_states[L + 1]."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from crosscoder.config import CrosscoderConfig
from crosscoder.analysis.ce import ce_recovered
from crosscoder.data.pair import residual_hook
from crosscoder.model import Crosscoder

D, L = 16, 3


def _lm(seed):
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=64, hidden_size=D, intermediate_size=32, num_hidden_layers=L,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                       attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).eval()


def _identity_crosscoder(S=2):
    # f = [relu(x), relu(-x)] per coordinate; decoding +e and -e gives back x exactly.
    K = S * D
    cc = Crosscoder(CrosscoderConfig(d_model=D, n_latents=2 * K, n_sources=S))
    eye = torch.eye(K)
    with torch.no_grad():
        cc.W_enc_SDF.copy_(torch.cat([eye, -eye], 1).view(S, D, 2 * K))
        cc.W_dec_FSD.copy_(torch.cat([eye, -eye], 0).view(2 * K, S, D))
        cc.b_enc_F.zero_()
        cc.b_dec_SD.zero_()
    return cc


def test_capture_hook_reads_hidden_states_after_block():
    lm = _lm(0)
    ids = torch.randint(0, 64, (2, 10))
    cap = []
    with residual_hook(lm, 1, capture=cap):
        out = lm(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(cap[0], out.hidden_states[2])


def test_ce_recovered_perfect_and_zero():
    lms = [_lm(0), _lm(1)]
    ids = torch.randint(0, 64, (6, 12))
    ids[:, 0] = 2  # a BOS-like first token
    perfect = ce_recovered(lms, _identity_crosscoder(), ids, 1, batch_size=4)
    for r in perfect.values():
        assert r["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
        assert r["kl_splice"] == pytest.approx(0.0, abs=1e-6)
        assert r["ce_zero"] != pytest.approx(r["ce_clean"], abs=1e-3)  # the ablation matters
    zero = _identity_crosscoder()
    with torch.no_grad():
        zero.W_dec_FSD.zero_()
    res = ce_recovered(lms, zero, ids, 1, batch_size=4)
    for r in res.values():
        assert r["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
        assert r["kl_splice"] == pytest.approx(r["kl_zero"], rel=1e-5)
    # padding is excluded: appending pads to one row changes nothing
    am = torch.ones_like(ids)
    ids_p = torch.cat([ids, torch.zeros(6, 3, dtype=ids.dtype)], 1)
    am_p = torch.cat([am, torch.zeros(6, 3, dtype=am.dtype)], 1)
    pad = ce_recovered(lms, _identity_crosscoder(), ids_p, 1, attention_mask_NT=am_p, batch_size=4)
    for name in perfect:
        assert pad[name]["n_predictions"] == perfect[name]["n_predictions"]
        assert pad[name]["ce_clean"] == pytest.approx(perfect[name]["ce_clean"], rel=1e-5)


def _hand_ce(lm, ids, layer, resid=None):
    """Mean next-token CE over ALL predictions of the sequences (TransformerLens's
    return_type="loss"), with the block-``layer`` residual optionally replaced."""
    import torch.nn.functional as F_nn
    if resid is None:
        logits = lm(input_ids=ids).logits
    else:
        with residual_hook(lm, layer, replace=resid):
            logits = lm(input_ids=ids).logits
    return float(F_nn.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_ce_recovered_kissane_definition_matches_hand_computation_and_differs_from_ours():
    lms = [_lm(0), _lm(1)]
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    cc = _identity_crosscoder()
    with torch.no_grad():  # a lossy reconstruction: half of every decoder row
        cc.W_dec_FSD.mul_(0.5)
    ours = ce_recovered(lms, cc, ids, 1, batch_size=4)
    kis = ce_recovered(lms, cc, ids, 1, batch_size=4, definition="kissane")
    for s, name in enumerate(("base", "chat")):
        lm = lms[s]
        cap = []
        with torch.no_grad(), residual_hook(lm, 1, capture=cap):
            lm(input_ids=ids)
        clean_resid = cap[0]
        with torch.no_grad():
            splice = clean_resid.clone()
            splice[:, 1:] *= 0.5  # the reconstruction at every position but BOS
            clean = _hand_ce(lm, ids, 1)
            ce_splice = _hand_ce(lm, ids, 1, splice)
            ce_zero = _hand_ce(lm, ids, 1, torch.zeros_like(clean_resid))  # BOS zeroed too
        r = kis[name]
        assert r["ce_clean"] == pytest.approx(clean, rel=1e-5)
        assert r["ce_splice"] == pytest.approx(ce_splice, rel=1e-5)
        assert r["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
        assert r["ce_recovered"] == pytest.approx((ce_zero - ce_splice) / (ce_zero - clean), rel=1e-3)
        assert r["n_predictions"] == 6 * 11 and ours[name]["n_predictions"] == 6 * 10
        # same reconstruction, different definitions: different numbers
        assert abs(r["ce_recovered"] - ours[name]["ce_recovered"]) > 1e-3
    with pytest.raises(ValueError, match="definition must be one of"):
        ce_recovered(lms, cc, ids, 1, definition="published")


def test_ce_recovered_is_the_same_projected_in_chunks_of_any_size():
    """The unembedding reads a few positions at a time (a 262k vocabulary's logits would not fit):
    any chunk size gives the numbers of one chunk holding every position."""
    lms = [_lm(0), _lm(1)]
    ids = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    am[2, 9:] = 0  # padding too
    cc = _identity_crosscoder()
    with torch.no_grad():
        cc.W_dec_FSD.mul_(0.7)
    whole = ce_recovered(lms, cc, ids, 1, attention_mask_NT=am, batch_size=4, position_chunk=10_000)
    for chunk in (1, 7):
        part = ce_recovered(lms, cc, ids, 1, attention_mask_NT=am, batch_size=4, position_chunk=chunk)
        for name in whole:
            for k, v in whole[name].items():
                # float32 sums in another order: ~1e-6 relative on each CE, more on the ratios of their differences
                tol = 1e-3 if k.startswith("ce_recovered") else 1e-5
                assert part[name][k] == pytest.approx(v, rel=tol, abs=1e-6), (chunk, name, k)


def test_both_definitions_at_once_equal_one_at_a_time_and_ours_by_hand():
    """The training page asks for both definitions: one pass shares the clean, splice and mean
    forwards and their logits, and must give each definition's numbers as a call of its own does
    (padding and a given mean included); ours is checked by hand too (body zeroed, BOS prediction
    not scored)."""
    import torch.nn.functional as F_nn

    from crosscoder.analysis.ce import ce_recovered_definitions

    lms = [_lm(0), _lm(1)]
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(5))
    ids[:, 0] = 2
    am = torch.ones_like(ids)
    am[1, 8:] = 0
    cc = _identity_crosscoder()
    with torch.no_grad():
        cc.W_dec_FSD.mul_(0.6)
    for mean in (None, torch.randn(2, D, generator=torch.Generator().manual_seed(1))):
        both = ce_recovered_definitions(lms, cc, ids, 1, attention_mask_NT=am, mean_raw_SD=mean, batch_size=4,
                                        position_chunk=7)
        for d in ("ours", "kissane"):
            alone = ce_recovered(lms, cc, ids, 1, attention_mask_NT=am, mean_raw_SD=mean, batch_size=4, definition=d)
            for name in alone:
                for k, v in alone[name].items():
                    # the CE values themselves to float32 rounding; the recovered fractions, ratios of
                    # differences of them, amplify that rounding (1.3e-4 relative seen with 2 threads,
                    # where batch shapes change the reduction order), as in the chunking test above
                    tol = 1e-3 if k.startswith("ce_recovered") else 1e-5
                    assert both[d][name][k] == pytest.approx(v, rel=tol, abs=1e-7), (d, name, k)
    lm, name = lms[1], "chat"
    full = ids[am.bool().all(1)]  # the unpadded rows, by hand
    with torch.no_grad():
        cap = []
        with residual_hook(lm, 1, capture=cap):
            lm(input_ids=full)
        zeroed = cap[0].clone()
        zeroed[:, 1:] = 0.0
        with residual_hook(lm, 1, replace=zeroed):
            logits = lm(input_ids=full).logits
    want = F_nn.cross_entropy(logits[:, 1:-1].reshape(-1, 64), full[:, 2:].reshape(-1))
    ours = ce_recovered_definitions(lms, cc, full, 1, batch_size=4, definitions=("ours",))["ours"][name]
    assert ours["ce_zero"] == pytest.approx(float(want), rel=1e-5)


def test_ce_with_another_crosscoders_baselines_equals_the_full_computation(tmp_path):
    """The BatchTopK page reuses the L1 page's ablation baselines (same models and sequences): only
    its splice runs, and its numbers are those of the full computation; baselines of other models
    are refused."""
    from crosscoder.analysis.ce import baseline_sums, ce_ratios, ce_recovered_definitions, ce_sums

    lms = [_lm(0), _lm(1)]
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(7))
    ids[:, 0] = 2
    am = torch.ones_like(ids)
    am[2, 9:] = 0
    first, second = _identity_crosscoder(), _identity_crosscoder()
    with torch.no_grad():
        first.W_dec_FSD.mul_(0.6)
        second.W_dec_FSD.mul_(0.8)
    known = baseline_sums(ce_sums(lms, first, ids, 1, attention_mask_NT=am, batch_size=4))
    unembedded = []
    hook = lms[0].get_output_embeddings().register_forward_hook(lambda m, i, o: unembedded.append(o.shape[0]))
    fast = ce_ratios(ce_sums(lms, second, ids, 1, attention_mask_NT=am, batch_size=4, baselines=known))
    n_fast = sum(unembedded)
    unembedded.clear()
    full = ce_recovered_definitions(lms, second, ids, 1, attention_mask_NT=am, batch_size=4)
    hook.remove()
    assert n_fast * 5 == sum(unembedded) * 2  # clean and splice only, instead of 5 projections
    for d in full:
        for name in full[d]:
            for k, v in full[d][name].items():
                assert fast[d][name][k] == pytest.approx(v, rel=1e-12, abs=1e-12), (d, name, k)
    assert fast["ours"]["base"]["ce_splice"] != pytest.approx(  # the splice is this crosscoder's
        ce_recovered_definitions(lms, first, ids, 1, attention_mask_NT=am, batch_size=4)["ours"]["base"]["ce_splice"])
    with pytest.raises(ValueError, match="not of these models"):
        ce_sums([_lm(2), _lm(1)], second, ids, 1, attention_mask_NT=am, batch_size=4, baselines=known)


def test_experiment_keeps_the_ce_baselines_beside_the_cache(tmp_path, monkeypatch):
    """experiment.ce_recovered_both: the first crosscoder's call writes the baselines, the next one's
    reads them (only clean and splice projected) and gives the full computation's numbers; other
    sequences get their own file."""
    from types import SimpleNamespace

    from crosscoder import experiment
    from crosscoder.analysis.ce import ce_recovered_definitions
    from crosscoder.data.pair import ModelPair

    monkeypatch.setattr(experiment, "cache_folder", lambda *a: tmp_path)
    exp = SimpleNamespace(pair_cfg=SimpleNamespace(layer=1), data_cfg=None, cache_cfg=None,
                          cfg=SimpleNamespace(cache_root=str(tmp_path)))
    lms = [_lm(0), _lm(1)]
    pair = ModelPair(lms[0], lms[1], None, 1, D)
    ids = torch.randint(0, 64, (5, 10), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 2
    am = torch.ones_like(ids)
    first, second = _identity_crosscoder(), _identity_crosscoder()
    with torch.no_grad():
        first.W_dec_FSD.mul_(0.5)
        second.W_dec_FSD.mul_(0.9)
    experiment.ce_recovered_both(exp, pair, first, ids, am)
    assert len(list((tmp_path / "ce_baselines").glob("*.json"))) == 1
    calls = []
    hook = lms[0].get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    got = experiment.ce_recovered_both(exp, pair, second, ids, am)
    hook.remove()
    assert len(calls) == 2  # one batch of 5 rows: clean and splice projected, no ablation
    want = ce_recovered_definitions(lms, second, ids, 1, attention_mask_NT=am)
    assert got["ours"]["chat"]["ce_recovered"] == pytest.approx(want["ours"]["chat"]["ce_recovered"], rel=1e-12)
    assert got["kissane"]["base"]["kl_zero"] == pytest.approx(want["kissane"]["base"]["kl_zero"], rel=1e-12)
    experiment.ce_recovered_both(exp, pair, second, ids[:4], am[:4])
    assert len(list((tmp_path / "ce_baselines").glob("*.json"))) == 2
