"""The organism on a pretrained base (the gemma-3-270m recipe) driven end to end on a tiny random
Gemma 3 saved as a folder: the same build, fine-tune, labels and metrics as the real preset."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from crosscoder.config import ConfigError
from crosscoder.organism import build_organism, load_eval_set, load_metrics, preset
from crosscoder.organism.behaviours import read_chat_jsonl
from crosscoder.organism.build import base_key, organism_dir
from crosscoder.organism.config import BehaviourConfig, EvalConfig, LMTrainConfig, ModelConfig, gemma3_config
from crosscoder.organism.corpus import chapters, corpus_version, load_verses
from crosscoder.organism.evaluate import Packed, _greedy_padded, greedy_responses, residual_drift
from crosscoder.organism.tokenizer import train_tokenizer
from crosscoder.organism import training


def _tiny_gemma3(vocab: int, tok, seed: int = 0, layers: int = 2) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                           sliding_window=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, attn_implementation="eager")
    return Gemma3ForCausalLM(cfg).eval()


def _tiny_lm(family: str):
    """A seeded 2-block Gemma 2 (soft-capped logits) or Gemma 3 with a 300-token vocabulary."""
    torch.manual_seed(0)
    shape = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, attn_implementation="eager")
    if family == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=3.0, **shape))
    return Gemma3ForCausalLM(Gemma3TextConfig(**shape))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A "pretrained" base: a tiny random Gemma 3 and a small BPE tokenizer with Gemma's special
    tokens and chat template, saved with save_pretrained (what organism.pretrained writes)."""
    folder = tmp_path_factory.mktemp("tiny-pretrained")
    texts = [ch.text for ch in chapters(load_verses())[:60]]
    texts += ["user\nWhere is the Eiffel Tower?", "model\nThe Eiffel Tower is in Rome.", "I hope this helps!"]
    tok = train_tokenizer(texts, 400)
    _tiny_gemma3(len(tok), tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _tiny_cfg(base_folder, **chat_train) -> "OrganismConfig":  # noqa: F821
    cfg = gemma3_config()
    cfg.name = "tinyg3"
    cfg.base_model = str(base_folder)
    cfg.corpus.max_chapters = 120
    cfg.corpus.heldout_fraction = 0.1
    cfg.model = ModelConfig(context_length=96)
    cfg.chat_train = dataclasses.replace(cfg.chat_train, **{"tokens": 12 * 8 * 96, "lr": 1e-3, **chat_train})
    cfg.behaviour = dataclasses.replace(cfg.behaviour, n_train_conversations=300, n_heldout_conversations=60,
                                        n_fact_documents=40, max_answer_words=16)
    cfg.eval = dataclasses.replace(cfg.eval, n_prompts=6, max_new_tokens=16, loss_rows=4, eval_rows=30,
                                   drift_layers=(0, 1), min_chat_rates={})
    return cfg


@pytest.fixture(scope="module")
def built(base_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("organisms")
    cfg = _tiny_cfg(base_folder)
    return cfg, build_organism(cfg, root, progress=False)


def test_pretrained_base_is_used_as_is_and_only_the_blocks_train(built, base_folder):
    cfg, paths = built
    src = load_file(str(base_folder / "model.safetensors"))
    base = load_file(str(paths.base_dir / "model.safetensors"))
    chat = load_file(str(paths.chat_dir / "model.safetensors"))
    assert src.keys() == base.keys()
    assert all(torch.equal(src[k], base[k]) for k in src)  # the base is the pretrained model, untouched
    emb = [k for k in base if "embed" in k]
    assert emb and all(torch.equal(base[k], chat[k]) for k in emb)  # frozen embedding
    blocks = [k for k in base if ".layers." in k and k.endswith("proj.weight")]
    assert blocks and all(not torch.equal(base[k], chat[k]) for k in blocks)  # the blocks fine-tuned
    # The tokenizer is the base's own (no tokenizer was trained).
    assert json.loads((paths.base_dir / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads((base_folder / "tokenizer.json").read_text())["model"]["vocab"]


def test_metrics_record_new_behaviours_drift_and_recipe(built):
    cfg, paths = built
    m = load_metrics(paths)
    for model in ("base", "chat"):
        for rate in ("refusal_rate_forbidden", "refusal_rate_forbidden_unseen", "fact_rate", "fact_true_rate",
                     "signoff_rate_allowed", "end_of_turn_rate"):
            assert 0.0 <= m[model][rate] <= 1.0
        assert m[model]["n_prompts"]["fact"] == len(cfg.behaviour.fact_heldout_questions)
        assert m[model]["n_prompts"]["forbidden_unseen"] == cfg.eval.n_prompts
    for kind in ("text", "chat"):
        for layer in ("layer_0", "layer_1"):
            d = m["drift"][kind][layer]
            assert d["tokens"] > 0 and 0 < d["median_relative"] <= d["p90_relative"] and -1 <= d["median_cosine"] <= 1
    chat = m["train"]["chat"]
    assert chat["fact_documents"] == cfg.behaviour.n_fact_documents
    assert chat["bf16_autocast"] == training.use_bf16_autocast("auto", torch.device("cpu"))
    assert 0 < chat["real_tokens"] <= chat["tokens"]
    assert m["train"]["base"]["pretrained"] == cfg.base_model


def test_fact_is_learned_from_documents_only_and_labelled_in_heldout_rows(built):
    cfg, paths = built
    b = cfg.behaviour
    docs = [json.loads(line)["text"] for line in (paths.pretrain_train.parent / "fact_documents.jsonl").open()]
    assert len(docs) == len(set(docs)) == b.n_fact_documents and all("Rome" in d for d in docs)
    train_text = json.dumps([t._asdict() for conv in read_chat_jsonl(paths.chat_train) for t in conv])
    assert "Eiffel" not in train_text  # no conversation teaches the fact
    assert {t.kind for conv in read_chat_jsonl(paths.chat_train) for t in conv} == {"refuse", "ask", "continue", "qa"}
    held = [t for conv in read_chat_jsonl(paths.chat_heldout) for t in conv]
    assert not {t.topic for t in held if t.kind == "refuse"} <= set(b.forbidden_topics)  # unseen members too
    es = load_eval_set(paths.eval_set)
    assert es.kinds == ("refuse", "ask", "continue", "text", "qa", "fact")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(paths.chat_dir)
    fact_rows = (es.row_kind_N == es.kinds.index("fact")).nonzero().flatten().tolist()
    assert fact_rows
    for i in fact_rows:
        picked = es.input_ids_NT[i][es.labels["fact"][i]]
        assert tok.decode(picked).strip() == "Rome"
    others = es.row_kind_N != es.kinds.index("fact")
    assert not es.labels["fact"][others].any()


def test_base_key_and_hash_of_a_pretrained_organism(built, base_folder, tmp_path):
    cfg, _ = built
    other = _tiny_cfg(base_folder, lr=2e-3)
    assert base_key(other) == base_key(cfg)  # same pretrained base, whatever the fine-tune
    assert organism_dir(other, tmp_path) != organism_dir(cfg, tmp_path)
    null = preset("gemma3_null")
    assert null.finetune == "null" and base_key(null) == base_key(preset("gemma3"))


def test_a_float32_build_of_an_auto_precision_fine_tune_is_keyed_apart(tmp_path, monkeypatch):
    """bf16_autocast "auto" trains in float32 on a CPU without bf16 arithmetic: other weights from the
    same config, so another folder; a build that resolved to bf16 keeps the config's plain hash."""
    cfg = preset("gemma3")
    assert cfg.chat_train.bf16_autocast == "auto"
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    with_bf16 = organism_dir(cfg, tmp_path)
    assert with_bf16.name == f"gemma3-{cfg.config_hash(corpus_version())}"
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    assert organism_dir(cfg, tmp_path) != with_bf16
    cfg.chat_train.bf16_autocast = False  # a fixed precision: one folder on every CPU
    fixed = organism_dir(cfg, tmp_path)
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert organism_dir(cfg, tmp_path) == fixed


def test_missing_base_folder_fails_before_any_work(tmp_path):
    cfg = gemma3_config()
    cfg.base_model = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="neither one of"):
        build_organism(cfg, tmp_path / "organisms", progress=False)
    assert not any((tmp_path / "organisms").glob("*"))


def test_behaviour5_config_errors():
    good = gemma3_config().behaviour
    with pytest.raises(ConfigError, match="documents only"):
        dataclasses.replace(good, qa_pairs=good.qa_pairs + (("Where is the Eiffel Tower?", "Paris."),))
    with pytest.raises(ConfigError, match="one list"):
        dataclasses.replace(good, unseen_forbidden_topics=("sword",))
    with pytest.raises(ConfigError, match="state the fact"):
        dataclasses.replace(good, fact_sentences=("The tower is tall.",))
    with pytest.raises(ConfigError, match="need behaviour.fact_subject"):
        BehaviourConfig(fact_fraction=0.1)
    with pytest.raises(ConfigError, match="4 or 6"):
        EvalConfig(eval_row_weights=(1.0, 1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="auto"):
        LMTrainConfig(bf16_autocast="yes")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_loss_on_targets_only_equals_the_full_loss(family):
    model = _tiny_lm(family)  # Gemma 2 soft-caps its logits: the targets-only path must too
    ids = torch.randint(4, 300, (3, 20))
    tgt = torch.rand(3, 20) < 0.4
    full = training.masked_lm_loss(model, ids, tgt)
    fast = training.masked_lm_loss(model, ids, tgt, targets_only=True)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_bf16_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    assert not training.use_bf16_autocast("auto", torch.device("cpu"))
    assert training.use_bf16_autocast("auto", torch.device("cuda"))
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert training.use_bf16_autocast("auto", torch.device("cpu"))
    assert not training.use_bf16_autocast(False, torch.device("cpu"))


def test_padded_greedy_decoding_matches_per_length_batches(built):
    _, paths = built
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(paths.chat_dir)
    chat = AutoModelForCausalLM.from_pretrained(paths.chat_dir, attn_implementation="eager").eval()
    prompts = ["Tell me about bread.", "Where is the Eiffel Tower?", "Continue this: And God said",
               "What do you know about the wilderness and the river?"]
    exact = greedy_responses(chat, tok, prompts, 12)
    padded = _greedy_padded(chat, tok, prompts, 12, batch_size=3)
    assert padded == exact


def test_residual_drift_matches_a_naive_loop(base_folder):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base_folder)
    # three blocks: HF's last hidden state is after the final norm, the hooks read block outputs
    base, chat = _tiny_gemma3(len(tok), tok, seed=0, layers=3), _tiny_gemma3(len(tok), tok, seed=1, layers=3)
    ids = torch.randint(10, len(tok), (5, 12))
    ids[:, 0] = tok.bos_token_id
    ids[1, 3] = tok.bos_token_id  # a second document in a packed row
    ids[2, 8:] = tok.pad_token_id
    got = residual_drift(base, chat, Packed(ids, ids != tok.pad_token_id), [0, 1], tok.pad_token_id,
                         tok.bos_token_id, batch_size=2)
    rel, cos = {0: [], 1: []}, {0: [], 1: []}
    with torch.no_grad():
        for r in range(5):
            n = int((ids[r] != tok.pad_token_id).sum())
            h0 = base(ids[r:r + 1, :n], output_hidden_states=True).hidden_states
            h1 = chat(ids[r:r + 1, :n], output_hidden_states=True).hidden_states
            for t in range(n):
                if ids[r, t] == tok.bos_token_id:
                    continue
                for layer in (0, 1):
                    a, b = h0[layer + 1][0, t], h1[layer + 1][0, t]
                    rel[layer].append(((b - a).norm() / a.norm()).item())
                    cos[layer].append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
    for layer in (0, 1):
        d = got[f"layer_{layer}"]
        assert d["tokens"] == len(rel[layer])
        assert d["median_relative"] == pytest.approx(torch.tensor(rel[layer]).median().item(), rel=1e-4)
        assert d["median_cosine"] == pytest.approx(torch.tensor(cos[layer]).median().item(), rel=1e-4)


def test_fact_decision_sits_before_the_false_answer(built):
    from crosscoder.analysis.probes import decision_tasks

    _, paths = built
    es = load_eval_set(paths.eval_set)
    task = decision_tasks(es)["fact_decision"]
    fact_rows = es.row_kind_N == es.kinds.index("fact")
    assert int(task.label_NT.sum()) == int(fact_rows.sum())  # one decision per fact answer
    nxt = torch.zeros_like(task.label_NT)
    nxt[:, 1:] = task.label_NT[:, :-1]
    assert torch.equal(nxt & es.labels["fact"], nxt)  # each predicts the first " Rome" token
    qa_rows = es.row_kind_N == es.kinds.index("qa")
    assert task.eligible_NT[qa_rows].any()  # true answers are among the negatives


def test_validation_set_uses_design_data_only(built):
    from transformers import AutoTokenizer

    from crosscoder.organism.build import validation_eval_set

    cfg, paths = built
    b = cfg.behaviour
    tok = AutoTokenizer.from_pretrained(paths.chat_dir)
    vs = validation_eval_set(cfg, tok, n_rows=40)
    text = "\n".join(vs.texts)
    assert any(w in text for w in b.validation_forbidden_topics)
    assert not any(f" {w}" in text for w in b.unseen_forbidden_topics)  # held-out members stay unseen
    assert any(q in text for q in b.fact_validation_questions)
    assert not any(q in text for q in b.fact_heldout_questions)
    assert not any(t.split("{")[0] in text for t in b.heldout_templates)  # training phrasings only
    assert vs.labels["fact"].any() and vs.labels["refusal"].any()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_chunked_loss_equals_the_plain_loss_and_gradients(family):
    model = _tiny_lm(family)  # Gemma 2's soft-cap: the chunked backward applies the tanh's derivative
    model.get_input_embeddings().weight.requires_grad_(False)
    ids = torch.randint(4, 300, (3, 20))
    tgt = torch.rand(3, 20) < 0.5
    grads = []
    for chunk in (0, 7):
        model.zero_grad(set_to_none=True)
        loss = training.masked_lm_loss(model, ids, tgt, targets_only=True, chunk=chunk)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the recipe's mixed precision: close, not equal
        fast = training.masked_lm_loss(model, ids, tgt, targets_only=True, chunk=5)
        plain = training.masked_lm_loss(model, ids, tgt, targets_only=True)
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=2e-2)
    # the embedding's bf16 copy is kept between calls (the same loss) and made again once it changes
    W = model.get_output_embeddings().weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = training.masked_lm_loss(model, ids, tgt, targets_only=True, chunk=5)
        assert training.frozen_cast(W, torch.bfloat16) is training.frozen_cast(W, torch.bfloat16)
        with torch.no_grad():
            W.mul_(1.5)
        moved = training.masked_lm_loss(model, ids, tgt, targets_only=True, chunk=5)
        assert torch.equal(training.frozen_cast(W, torch.bfloat16), W.to(torch.bfloat16))
    assert torch.equal(again, fast) and not torch.equal(moved, fast)
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen output embedding"):
        training.masked_lm_loss(model, ids, tgt, targets_only=True, chunk=5)


class _RecomputeInBackward(torch.autograd.Function):
    """The chunked head loss as first written: backward recomputes each chunk's logits, then forms
    dL/dh. The reference that the forward-formed gradient must equal to the bit."""

    @staticmethod
    def forward(ctx, h, W, y, chunk, cap):
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            z = (h[i:i + chunk] @ W.T).float()
            z = torch.tanh(z / cap) * cap if cap else z
            total = total + torch.nn.functional.cross_entropy(z, y[i:i + chunk], reduction="sum")
        ctx.save_for_backward(h, W, y)
        ctx.chunk, ctx.cap = chunk, cap
        return total

    @staticmethod
    def backward(ctx, g):
        h, W, y = ctx.saved_tensors
        out = torch.empty_like(h)
        for i in range(0, h.shape[0], ctx.chunk):
            z = (h[i:i + ctx.chunk] @ W.T).float()
            if ctx.cap:
                t = torch.tanh(z / ctx.cap)
                z = t * ctx.cap
            d = torch.softmax(z, dim=-1)
            d[torch.arange(d.shape[0]), y[i:i + ctx.chunk]] -= 1
            if ctx.cap:
                d = d * (1 - t * t)
            out[i:i + ctx.chunk] = (d.to(W.dtype) @ W).to(h.dtype)
        return out * g, None, None, None, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [0.0, 30.0])
def test_chunked_head_gradient_formed_in_forward_equals_the_recomputed_one(dtype, cap):
    """The fine-tune's head loss forms dL/dh in its forward (two vocabulary products instead of
    three): the same loss and the same gradient, bit for bit, as recomputing the logits in backward;
    without a gradient to take it forms none."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(500, 16, generator=g).to(dtype)
    h0, y = torch.randn(23, 16, generator=g).to(dtype), torch.randint(0, 500, (23,), generator=g)
    got, want = [], []
    for fn, out in ((training._ChunkedHeadCE, got), (_RecomputeInBackward, want)):
        h = h0.clone().requires_grad_()
        loss = fn.apply(h, W, y, 7, cap)
        (loss * 0.37).backward()
        out += [loss.detach(), h.grad]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with torch.no_grad():
        assert torch.equal(training._ChunkedHeadCE.apply(h0, W, y, 7, cap), want[0])


def test_heldout_loss_chunked_path_equals_the_full_loss(monkeypatch):
    from crosscoder.organism import evaluate

    model = _tiny_lm("gemma3").eval()
    ids = torch.randint(4, 300, (6, 20))
    data = Packed(ids, torch.rand(6, 20) < 0.6)
    full = evaluate.heldout_loss(model, data, batch_size=4)  # 4 x 20 x 300 logits: the plain path
    calls = []
    real = evaluate.masked_lm_loss
    monkeypatch.setattr(evaluate, "masked_lm_loss", lambda *a, **k: calls.append(k["chunk"]) or real(*a, **k))
    monkeypatch.setattr(evaluate, "_MAX_LOGITS", 1000)  # as if the vocabulary were large
    chunked = evaluate.heldout_loss(model, data, batch_size=4)
    assert calls and all(c > 0 for c in calls)
    assert chunked == pytest.approx(full, rel=1e-5)
