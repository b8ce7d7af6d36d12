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
