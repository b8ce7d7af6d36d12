"""Batched greedy decoding (crosscoder.generation): left-padded batches across prompt lengths, a KV
cache, rows leaving the batch when they end, and the bf16-filtered argmax must give exactly the tokens
of a naive loop that runs one prompt at a time, re-running the whole sequence at every step (no cache,
no padding, full float32 logits) - with and without hooks that edit the residual stream."""

import copy

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from crosscoder import generation
from crosscoder.analysis import causal
from crosscoder.generation import GreedyHead, greedy_generate

V, D, LAYER = 64, 32, 0
PROMPTS = [[2, 7, 9, 11, 3], [2, 5], [2, 8, 6, 3, 4, 4, 9, 1, 5], [2, 4, 10], [2, 13, 12, 11], [2, 30],
           [2, 9, 9, 9, 9, 9, 9], [2, 40, 41]]


def _tiny(kind: str, seed: int):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=64, attn_implementation="eager")
    if kind == "gemma2":
        cfg = Gemma2Config(**common, sliding_window=64, final_logit_softcapping=30.0)
        return Gemma2ForCausalLM(cfg).eval().requires_grad_(False)
    # a sliding window shorter than prompt + generation, so padding must not shift what a token sees
    cfg = Gemma3TextConfig(**common, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def pair(request):
    base = _tiny(request.param, 0)
    chat = copy.deepcopy(base)
    with torch.no_grad():
        for p in chat.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base, chat


@torch.no_grad()
def _naive(lm, prompts, max_new_tokens, stop=(), until=None):
    """One prompt at a time, the full sequence re-run at every step, argmax of the full logits."""
    out = []
    for p in prompts:
        ids, new, ended = torch.tensor([p]), [], False
        for _ in range(max_new_tokens):
            t = int(lm(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            if t in stop:
                ended = True
                break
            new.append(t)
            if until is not None and until(new):
                break
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
        out.append(generation.Generation(new, ended))
    return out


def _stops(lm):
    """Stop tokens that end rows at three or more different steps (taken from their free generations)."""
    free = _naive(lm, PROMPTS, 8)
    for k in range(1, 8):
        for i in range(len(PROMPTS)):
            stop = {free[0].ids[k], free[i].ids[k // 2]}
            if len({len(g.ids) for g in _naive(lm, PROMPTS, 8, stop)}) > 2:
                return stop
    raise AssertionError("no stop tokens vary the lengths")  # pragma: no cover


@pytest.mark.parametrize("filtered", [False, True])
def test_batched_padded_cached_decoding_equals_the_naive_loop(pair, filtered):
    _, chat = pair
    stop = _stops(chat)
    want = _naive(chat, PROMPTS, 8, stop)
    assert any(g.ended for g in want) and not all(g.ended for g in want)
    for batch_size in (3, 64):
        got = greedy_generate(chat, PROMPTS, 8, stop, batch_size=batch_size,
                              head=GreedyHead(chat, filtered=filtered))
        assert got == want
    # equal-length batches only: same tokens
    assert greedy_generate(chat, PROMPTS, 8, stop, padded=False) == want


def test_until_stops_a_row_and_keeps_the_prefix(pair):
    _, chat = pair
    until = lambda ids: len(ids) >= 1 + (ids[0] % 4)  # noqa: E731  (a row-dependent length)
    assert greedy_generate(chat, PROMPTS, 8, until=until) == _naive(chat, PROMPTS, 8, until=until)


def test_steering_hook_applies_at_every_cached_step(pair):
    _, chat = pair
    v = 3.0 * torch.randn(D, generator=torch.Generator().manual_seed(4))
    with causal.steer(chat, LAYER, v):
        want = _naive(chat, PROMPTS, 8)
        got = greedy_generate(chat, PROMPTS, 8, batch_size=3)
    assert got == want
    assert want != _naive(chat, PROMPTS, 8)  # the hook changed the generations


@pytest.mark.parametrize("target_source", [0, 1])
def test_lockstep_edit_with_a_partner_cache_equals_full_reruns(pair, target_source):
    base, chat = pair
    target, partner = (chat, base) if target_source == 1 else (base, chat)
    w = torch.randn(D, generator=torch.Generator().manual_seed(5))

    def delta(h_ND, pair_NSD):  # reads both models' activations of each position
        diff_N = (pair_NSD[:, 1] - pair_NSD[:, 0]) @ w
        return 4.0 * torch.tanh(diff_N)[:, None] * w[None] / w.norm() - 0.5 * h_ND

    stop = _stops(target)
    with causal.edit_residual(target, partner, LAYER, delta, target_source=target_source):
        want = _naive(target, PROMPTS, 8, stop)
        got = greedy_generate(target, PROMPTS, 8, stop, batch_size=3)
    assert got == want
    assert want != _naive(target, PROMPTS, 8, stop)


def test_filtered_argmax_equals_the_float32_argmax_on_near_ties():
    g = torch.Generator().manual_seed(0)
    n_vocab, d = 20000, 64
    W = torch.randn(n_vocab, d, generator=g)
    h = torch.randn(48, d, generator=g) * 10
    # near-ties the bf16 logits cannot separate: rows of W that differ in the 5th significant digit,
    # and rows pointing along h so they are the top candidates
    W[100:140] = h[:40] / h[:40].norm(dim=-1, keepdim=True) * 3
    W[5000:5040] = W[100:140] * (1 + 1e-5 * torch.randn(40, 1, generator=g))
    W[7] = W[8]  # an exact tie: argmax takes the lower id
    h[40:] = W[8] * 5
    lm = Gemma2ForCausalLM(Gemma2Config(vocab_size=n_vocab, hidden_size=d, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                                        tie_word_embeddings=False, final_logit_softcapping=30.0))
    with torch.no_grad():
        lm.lm_head.weight.copy_(W)
    full = lm.lm_head(h)
    full = (torch.tanh(full / 30.0) * 30.0).argmax(-1)
    head = GreedyHead(lm, filtered=True)
    assert head.filtered
    assert torch.equal(head.argmax(h), full)
    assert (full[40:] == 7).all()
