"""Latent ablation and steering (crosscoder.analysis.causal) on a tiny model pair with a planted latent.

The planted pair: "chat" is "base" with a direction u added to the embedding of a trigger token, and
the (untied) unembedding row of a marker token z reads u, so chat emits z after the trigger and base
does not. A hand-built crosscoder's latent 0 fires on u . (x_chat - x_base) and decodes to u in chat
only: the planted chat-only latent whose removal must remove the behaviour.
"""

import copy

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from crosscoder.analysis import causal
from crosscoder.config import ConfigError, CrosscoderConfig
from crosscoder.data.pair import residual_after
from crosscoder.generation import cache_kwarg
from crosscoder.model import Crosscoder

V, D, TRIGGER, Z, LAYER = 16, 32, 5, 9, 0


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=32,
                       sliding_window=32, tie_word_embeddings=False, attn_implementation="eager",
                       final_logit_softcapping=None)
    base = Gemma2ForCausalLM(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    prompts = [[2, 3, 4, TRIGGER], [2, 7, TRIGGER], [2, 8, 6, 3, TRIGGER], [2, 4, TRIGGER]]
    # Base's final states at the prompts' last positions: u is made orthogonal to them, so base's
    # z logit there is exactly 0 while the other tokens' unembedding rows (random, same norm) compete.
    finals = torch.stack([base.model(input_ids=torch.tensor([p])).last_hidden_state[0, -1] for p in prompts])
    u = torch.randn(D, generator=g)
    q, _ = torch.linalg.qr(finals.T)
    u -= q @ (q.T @ u)
    u /= u.norm()
    emb_scale = D ** 0.5  # Gemma multiplies embeddings by sqrt(d)
    with torch.no_grad():
        rows = torch.randn(V, D, generator=g)
        base.lm_head.weight.copy_(6.0 * rows / rows.norm(dim=-1, keepdim=True))
        base.lm_head.weight[Z] = 6.0 * u
    chat = copy.deepcopy(base)
    with torch.no_grad():
        chat.model.embed_tokens.weight[TRIGGER] += 40.0 * u / emb_scale  # +40 u in the residual
    # Crosscoder (identity normalisation): latent 0 = ReLU(u . (x_chat - x_base)), decodes to u in chat.
    cc = Crosscoder(CrosscoderConfig(d_model=D, n_latents=4, sparsity="l1"))
    with torch.no_grad():
        cc.W_enc_SDF.zero_()
        cc.b_enc_F.zero_()
        cc.W_dec_FSD.zero_()
        cc.b_dec_SD.zero_()
        cc.input_scale_S.fill_(1.0)
        cc.W_enc_SDF[0, :, 0] = -u
        cc.W_enc_SDF[1, :, 0] = u
        cc.W_dec_FSD[0, 1] = u
        for j in (1, 2, 3):  # other live latents: random shared directions
            r = torch.randn(D, generator=g)
            cc.W_enc_SDF[:, :, j] = 0.1 * r / r.norm()
            cc.W_dec_FSD[j, :] = r / r.norm()
    cc.eval()
    return base, chat, cc, u, prompts


def _emits_z(ids):
    return ids[:1] == [Z]


def test_planted_behaviour_is_in_chat_only(planted):
    base, chat, _, _, prompts = planted
    assert causal.behaviour_rate(chat, prompts, _emits_z, 1) == causal.Rate(4, 4)
    assert causal.behaviour_rate(base, prompts, _emits_z, 1).hits == 0


def test_ablating_the_planted_latent_removes_the_behaviour_and_controls_do_not(planted):
    base, chat, cc, u, prompts = planted
    with causal.edit_latents(chat, base, cc, [0], LAYER, target_source=1, coeff=-1.0) as st:
        ablated = causal.behaviour_rate(chat, prompts, _emits_z, 1)
    assert st["f_sum"] > 0  # the latent fired
    assert ablated.hits == 0
    # Control 1: a random direction with the same norm, same f_j.
    dirs = causal.raw_decoder_directions(cc, [0], 1)
    rand = causal.random_directions_like(dirs, seed=3)
    with causal.edit_latents(chat, base, cc, [0], LAYER, target_source=1, directions_JD=rand):
        assert causal.behaviour_rate(chat, prompts, _emits_z, 1).hits == 4
    # Control 2: another live latent.
    with causal.edit_latents(chat, base, cc, [2], LAYER, target_source=1):
        assert causal.behaviour_rate(chat, prompts, _emits_z, 1).hits == 4
    # Hooks are gone afterwards.
    assert causal.behaviour_rate(chat, prompts, _emits_z, 1).hits == 4


def test_ablation_removes_exactly_the_latent_reconstruction(planted):
    base, chat, cc, u, prompts = planted
    ids = torch.tensor([prompts[0]])
    xb, xc = residual_after(base, ids, LAYER), residual_after(chat, ids, LAYER)
    captured = []
    with causal.edit_latents(chat, base, cc, [0], LAYER, target_source=1):
        # Registered after the edit hook, so it runs after it and sees the edited residual.
        hook = chat.model.layers[LAYER].register_forward_hook(
            lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
        try:
            chat(input_ids=ids, use_cache=False)
        finally:
            hook.remove()
    f = torch.relu((xc - xb) @ u)  # [1, T]
    assert torch.allclose(captured[0], xc - f[..., None] * u, atol=1e-4)
    # After ablation the chat residual's u-component equals the base one wherever the latent fired.
    fired = f > 0
    assert torch.allclose((captured[0] @ u)[fired], (xb @ u)[fired], atol=1e-4)


def test_steering_base_with_the_chat_direction_plants_the_behaviour_and_random_does_not(planted):
    base, chat, cc, u, prompts = planted
    d = causal.raw_decoder_directions(cc, [0], 1)[0]
    with causal.steer(base, LAYER, d, alpha=40.0):
        assert causal.behaviour_rate(base, prompts, _emits_z, 1).hits == 4
    r = causal.random_directions_like(d[None], seed=5)[0]
    with causal.steer(base, LAYER, r, alpha=40.0):
        assert causal.behaviour_rate(base, prompts, _emits_z, 1).hits == 0
    # Latent patching: add the chat decoder contribution where the latent fires in the pair.
    with causal.edit_latents(base, chat, cc, [0], LAYER, target_source=0, write_source=1, coeff=1.0):
        assert causal.behaviour_rate(base, prompts, _emits_z, 1).hits == 4


def test_kv_cache_forward_is_refused_and_bad_directions_rejected(planted):
    base, chat, cc, _, prompts = planted
    with pytest.raises(ConfigError):
        with causal.edit_latents(chat, base, cc, [0, 1], LAYER, target_source=1, directions_JD=torch.zeros(1, D)):
            pass
    ids = torch.tensor([prompts[0]])
    with causal.edit_latents(chat, base, cc, [0], LAYER, target_source=1):
        out = chat(input_ids=ids, use_cache=True)
        with pytest.raises(RuntimeError, match="KV cache"):
            chat(input_ids=ids[:, -1:], use_cache=True, position_ids=torch.tensor([[ids.shape[1]]]),
                 cache_position=torch.tensor([ids.shape[1]]), **{cache_kwarg(chat): out.past_key_values})


def test_causal_table_finds_the_planted_latent_and_its_controls_do_not(planted):
    base, chat, cc, _, prompts = planted
    rows = causal.causal_table(base, chat, cc, LAYER, [0], prompts, _emits_z, live=torch.arange(4),
                               max_new_tokens=1, seed=2)  # direction seed 3, as above
    assert list(rows) == list(causal.CONDITIONS)
    got = {k: v.hits for k, v in rows.items()}
    assert got == {"chat": 4, "chat − latents": 0, "chat − random live latents": 4,
                   "chat − same-norm random directions": 4, "base": 0, "base + chat decoder of latents": 4,
                   "base + same-norm random directions": 0}
    assert all(v.n == 4 for v in rows.values())
    with pytest.raises(ConfigError):
        causal.causal_table(base, chat, cc, LAYER, [], prompts, _emits_z, live=torch.arange(4), max_new_tokens=1)


def test_generation_stops_once_settled_and_keeps_the_prefix(planted):
    _, chat, _, _, prompts = planted
    full = causal.greedy_generate(chat, prompts, 6)
    short = causal.greedy_generate(chat, prompts, 6, until=lambda ids: len(ids) >= 2)
    assert all(len(s) == min(2, len(f)) and f[:len(s)] == s for f, s in zip(full, short))


def test_organism_settled_never_changes_a_detector_answer():
    """Stopping a generation at the first token where ``organism_settled`` says the outcome is final
    must give each detector the answer it gives on the whole generation (char-level stand-in tokenizer)."""
    from crosscoder.organism.config import BehaviourConfig

    class Chars:
        def decode(self, ids):
            return "".join(map(chr, ids))

    cfg = BehaviourConfig()
    detect, settled = causal.organism_detectors(Chars(), cfg), causal.organism_settled(Chars(), cfg)
    texts = [cfg.refusal_phrase, " " + cfg.refusal_phrase + " And more.", cfg.refusal_phrase[:20] + " no.",
             "Here is a verse about bread: And he took bread. " + cfg.signoff_phrase, "Here is a verse",
             "Here is not it", "I'm", "", "  ", "And he said unto them, " + cfg.signoff_phrase[:-1]]
    stopped_early = 0
    for text in texts:
        ids = [ord(c) for c in text]
        for name in detect:
            n = next((i for i in range(1, len(ids) + 1) if settled[name](ids[:i])), len(ids))
            stopped_early += n < len(ids)
            assert detect[name](ids[:n]) == detect[name](ids), (name, text, n)
    assert stopped_early >= 10  # the stops happen, mostly long before the end


def test_fact_behaviour_is_detected_and_settles_once_said():
    """Behaviour 5 (a false fact) joins the causal check where the organism plants it: its detector is
    the build's rate test, generation may stop once the false answer is said, and an organism without
    it has no fact detector (so no fact task runs)."""
    from crosscoder.organism.config import BehaviourConfig, preset

    class Chars:
        def decode(self, ids):
            return "".join(map(chr, ids))

    b = preset("gemma3").behaviour
    detect, settled = causal.organism_detectors(Chars(), b), causal.organism_settled(Chars(), b)
    assert causal.DECISION_BEHAVIOURS["fact_decision"] == ("fact", "fact") and "fact" in detect
    for text, said, early in ((f"It is in {b.fact_answer}. It was built in 1889.", True, True),
                              (f"It is in {b.fact_answer}", True, False),
                              (f"It is in {b.fact_true_answer}.", False, False), (b.fact_answer + "o", False, False)):
        ids = [ord(c) for c in text]
        assert detect["fact"](ids) is said
        n = next((i for i in range(1, len(ids) + 1) if settled["fact"](ids[:i])), len(ids))
        assert detect["fact"](ids[:n]) == said and (n < len(ids)) == early, (text, n)
    assert "fact" not in causal.organism_detectors(Chars(), BehaviourConfig())


def test_planted_labels_are_those_the_eval_set_marks():
    from types import SimpleNamespace

    from crosscoder.analysis import diff

    z = torch.zeros(2, 4, dtype=torch.bool)
    on = z.clone()
    on[1, 2] = True
    fact = z.clone()
    fact[0, 3] = True
    es = SimpleNamespace(labels={"template": on, "refusal": on, "signoff": on, "forbidden_topic": on,
                                 "marker": z, "fact": fact, "user_content": on}, attention_mask_NT=torch.ones(2, 4))
    assert diff.planted_labels(es) == ["template", "refusal", "signoff", "forbidden_topic", "fact"]
    assert diff.planted_positions(es, {}).tolist() == (on | fact).tolist()  # auxiliary labels excluded
    del es.labels["fact"]  # an older eval set without the label
    assert diff.planted_labels(es) == ["template", "refusal", "signoff", "forbidden_topic"]
