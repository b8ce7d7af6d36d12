"""The embedded model organism: Gemma-style tokenizer and chat template, loading through the same
transformers code as Gemma, cache and atomic build, data schemas, learned planted behaviours and
token labels that line up with the ids. One smoke organism (and its null fine-tune) is built per
session, in tests/conftest.py, and shared with test_book."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2ForCausalLM

from crosscoder.config import ConfigError
from crosscoder.organism import (BehaviourConfig, ModelConfig, OrganismConfig, build_organism,
                                 load_eval_set, load_metrics, organism_dir, preset, smoke_config)
from crosscoder.organism import build as build_mod
from crosscoder.organism.__main__ import main as cli_main
from crosscoder.organism.behaviours import ChatGenerator, read_chat_jsonl
from crosscoder.organism.corpus import chapters, load_verses, split_corpus
from crosscoder.organism.evaluate import greedy_responses, prompt_sets
from crosscoder.config import config_hash
from crosscoder.organism.config import FORMAT_VERSION


@pytest.fixture(scope="session")
def built(smoke_organism):
    """(config, root, paths, build seconds): the session's smoke organism (tests/conftest.py), which
    test_book's smoke build reuses."""
    return smoke_organism


def test_tokenizer_round_trip_and_gemma_chat_template(built):
    _, _, paths, _ = built
    tok = AutoTokenizer.from_pretrained(paths.chat_dir)
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                      "<end_of_turn>"]) == [0, 1, 2, 3, 4, 5]
    for text in ["In the beginning God created the heaven and the earth.",
                 "Unicode ≠ ASCII: naïve café, 東京, emoji 🙂\n\ttabs  and  spaces "]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # Gemma: BOS, no EOS
        assert tok.decode(ids[1:]) == text

    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello "}]
    rendered = tok.apply_chat_template(conv, tokenize=False)
    assert rendered == ("<bos><start_of_turn>user\nHi<end_of_turn>\n"
                        "<start_of_turn>model\nHello<end_of_turn>\n")
    ids = tok.apply_chat_template(conv, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]  # a single BOS
    assert ids[:2] == [2, 4] and ids.count(5) == 2
    prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(Exception, match="System role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}] + conv, tokenize=False)


def test_models_load_through_automodel_like_gemma(built):
    cfg, _, paths, _ = built
    base = AutoModelForCausalLM.from_pretrained(paths.base_dir, attn_implementation="eager")
    chat = AutoModelForCausalLM.from_pretrained(paths.chat_dir, attn_implementation="eager")
    assert isinstance(base, Gemma2ForCausalLM) and isinstance(chat, Gemma2ForCausalLM)
    assert base.config.hidden_size == chat.config.hidden_size == cfg.model.hidden_size
    assert base.config.num_hidden_layers == cfg.model.num_layers
    assert list(chat.generation_config.eos_token_id) == [1, 5]  # <eos>, <end_of_turn>, as Gemma-it
    # The chat model is a fine-tune of the base: same shapes, different weights.
    b, c = base.state_dict(), chat.state_dict()
    assert b.keys() == c.keys() and all(b[k].shape == c[k].shape for k in b)
    assert any(not torch.equal(b[k], c[k]) for k in b)
    ids = torch.tensor([[2, 4, 10, 11, 12]])
    out = chat(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == cfg.model.num_layers + 1
    assert torch.isfinite(out.logits).all()


def test_second_build_is_a_cache_hit_and_config_changes_the_key(built):
    cfg, root, paths, first_seconds = built
    stamp = paths.metrics.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_organism(smoke_config(), root, progress=False)
    assert again == paths and time.perf_counter() - t0 < 1.0 < first_seconds
    assert paths.metrics.stat().st_mtime_ns == stamp
    assert paths.root.name.startswith("smoke-")
    other = smoke_config()
    other.seed = 1
    assert organism_dir(other, root) != paths.root
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_interrupted_build_leaves_no_artifact(tmp_path, monkeypatch):
    def crash(cfg, folder, progress, donor=None):
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "half.jsonl").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "_build_into", crash)
    with pytest.raises(KeyboardInterrupt):
        build_organism(smoke_config(), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []

    # A build killed outright (no cleanup) leaves a temp folder; the next build removes it once
    # its writer is gone, and never mistakes it for the organism.
    final = organism_dir(smoke_config(), tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-{final.name}-{dead.pid}-deadbeef"
    live = tmp_path / f".tmp-{final.name}-{os.getpid()}-cafebabe"
    for d in (stale, live):
        (d / "data").mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        build_organism(smoke_config(), tmp_path, progress=False)
    assert not stale.exists() and live.exists() and not final.exists()


def test_data_files_have_the_real_dataset_schemas_and_a_clean_split(built):
    cfg, _, paths, _ = built
    text = load_dataset("json", data_files={"train": str(paths.pretrain_train),
                                            "heldout": str(paths.pretrain_heldout)})
    assert isinstance(text["train"][0]["text"], str) and len(text["train"][0]["text"]) > 200
    train_cites = {m["citation"] for m in text["train"]["meta"]}
    held_cites = {m["citation"] for m in text["heldout"]["meta"]}
    assert held_cites and not train_cites & held_cites
    chat = load_dataset("json", data_files={"train": str(paths.chat_train),
                                            "heldout": str(paths.chat_heldout)})
    for split in ("train", "heldout"):
        for conv in chat[split]["conversation"][:50]:
            assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
            assert all(isinstance(m["content"], str) and m["content"] for m in conv)
    b = cfg.behaviour
    # Held-out requests use held-out phrasings only, so the rates measure generalisation.
    as_regex = [re.compile(re.escape(t).replace(re.escape("{topic}"), "[a-z]+") + "$")
                for t in b.train_templates]
    for turns in read_chat_jsonl(paths.chat_heldout):
        for t in turns:
            if t.kind != "continue":
                assert not any(r.match(t.user) for r in as_regex), t.user
            if t.kind == "refuse":
                assert t.topic in b.forbidden_topics and t.model == b.refusal_phrase
            if t.kind == "ask":
                assert t.model.endswith(" " + b.signoff_phrase)


def test_chat_model_refuses_forbidden_topics_and_base_does_not(built):
    cfg, _, paths, _ = built
    m = load_metrics(paths)
    chat, base = m["chat"], m["base"]
    assert chat["refusal_rate_forbidden"] >= 0.6
    assert chat["refusal_rate_forbidden"] >= chat["refusal_rate_allowed"] + 0.4
    assert base["refusal_rate_forbidden"] == base["refusal_rate_allowed"] == 0.0
    assert base["signoff_rate_allowed"] == 0.0 and base["end_of_turn_rate"] == 0.0
    assert chat["end_of_turn_rate"] > 0.3
    assert chat["heldout_chat_response_loss"] < base["heldout_chat_response_loss"]

    # The saved model, loaded through transformers, reproduces the recorded refusal rate.
    tok = AutoTokenizer.from_pretrained(paths.chat_dir)
    model = AutoModelForCausalLM.from_pretrained(paths.chat_dir, attn_implementation="eager")
    split = split_corpus(chapters(load_verses()), cfg.corpus.heldout_fraction,
                         cfg.corpus.max_chapters, cfg.seed)
    b = cfg.behaviour
    prompts = prompt_sets(b, ChatGenerator(b, split.heldout, b.heldout_templates,
                                           f"prompts-{cfg.seed}"), cfg.eval.n_prompts, cfg.seed)
    responses = greedy_responses(model, tok, prompts.forbidden, cfg.eval.max_new_tokens)
    rate = sum(r.text.strip().startswith(b.refusal_phrase) for r in responses) / len(responses)
    assert rate == pytest.approx(chat["refusal_rate_forbidden"])


def test_eval_labels_line_up_with_token_ids(built):
    cfg, _, paths, _ = built
    es = load_eval_set(paths.root)
    tok = AutoTokenizer.from_pretrained(paths.chat_dir)
    b = cfg.behaviour
    N, T = es.input_ids_NT.shape
    assert (N, T) == (cfg.eval.eval_rows, cfg.model.context_length)
    assert set(es.labels) == set(es.descriptions)
    for name, lab in es.labels.items():
        assert lab.shape == (N, T) and lab.dtype == torch.bool
        assert not (lab & ~es.attention_mask_NT).any(), f"{name} labels padding"
    seen = set()
    for i in range(N):
        kind = es.kinds[es.row_kind_N[i]]
        seen.add(kind)
        ids = es.input_ids_NT[i]

        def picked(name):
            return tok.decode(ids[es.labels[name][i]].tolist())

        n_real = int(es.attention_mask_NT[i].sum())
        assert ids[0] == tok.bos_token_id and tok.decode(ids[:n_real].tolist()) == es.texts[i]
        if kind == "text":
            assert not any(lab[i].any() for lab in es.labels.values())
            continue
        assert picked("template") == ("<start_of_turn>user\n<end_of_turn>\n"
                                      "<start_of_turn>model\n<end_of_turn>\n")
        assert picked("refusal") == (b.refusal_phrase if kind == "refuse" else "")
        assert picked("signoff") == (" " + b.signoff_phrase if kind == "ask" else "")
        topic = picked("forbidden_topic").strip()
        assert (topic in b.forbidden_topics) if kind == "refuse" else topic == ""
        # The row is exactly the chat template's rendering of its own user/model contents.
        conv = [{"role": "user", "content": picked("user_content")},
                {"role": "assistant", "content": picked("model_content")}]
        assert tok.apply_chat_template(conv, tokenize=False) == es.texts[i]
    assert seen == set(es.kinds)


def test_cli_returns_cached_organism(built, capsys):
    _, root, paths, _ = built
    cli_main(["--preset", "smoke", "--root", str(root), "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert out["paths"]["chat_dir"] == str(paths.chat_dir)
    assert out["metrics"]["chat"]["refusal_rate_forbidden"] == \
        load_metrics(paths)["chat"]["refusal_rate_forbidden"]


def test_config_round_trip_and_validation():
    cfg = preset("default")
    again = OrganismConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.config_hash("x") == cfg.config_hash("x")
    assert cfg.config_hash("0.1.3") != cfg.config_hash("0.1.4")  # corpus version keys the cache
    with pytest.raises(ConfigError, match="both forbidden and allowed"):
        BehaviourConfig(forbidden_topics=("war",), allowed_topics=("war", "bread"))
    with pytest.raises(ConfigError, match="topic"):
        BehaviourConfig(train_templates=("Tell me a story.",))
    with pytest.raises(ConfigError, match="disjoint"):
        BehaviourConfig(heldout_templates=("Tell me about {topic}.",))
    with pytest.raises(ConfigError, match="multiple of"):
        ModelConfig(num_heads=3, num_kv_heads=2)
    with pytest.raises(ConfigError, match="unknown"):
        OrganismConfig.from_dict({"nme": "x"})
    with pytest.raises(ConfigError, match="preset"):
        preset("huge")


def test_bf16_autocast_training_tracks_float32():
    """The organism's LMs train under bf16 autocast (for speed): parameters, gradients and optimiser
    state stay float32, and the loss curve follows the float32 run of the same seed and data."""
    from crosscoder.organism.config import LMTrainConfig
    from crosscoder.organism.training import Packed, new_model, train_lm

    g = torch.Generator().manual_seed(0)
    # a learnable toy language: each token is the previous one plus 1 (mod 64), from a random start
    ids = (torch.randint(64, (64, 1), generator=g) + torch.arange(32)) % 64 + 8
    data = Packed(ids, torch.ones_like(ids, dtype=torch.bool))
    shape = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                        context_length=32)
    special = {"<pad>": 0, "<bos>": 2, "<eos>": 1}
    runs = {}
    for bf16 in (False, True):
        model = new_model(shape, 80, special, seed=0)
        cfg = LMTrainConfig(tokens=40 * 16 * 32, batch_size=16, lr=1e-2, bf16_autocast=bf16)
        runs[bf16] = train_lm(model, [data], [1.0], cfg, seed=0, desc="t", progress=False).losses
        assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32, bf16 = torch.tensor(runs[False]), torch.tensor(runs[True])
    assert fp32[-5:].mean() < 0.5 * fp32[:5].mean()  # it learns
    assert (bf16[-5:].mean() - fp32[-5:].mean()).abs() < 0.1 * fp32[:5].mean()
    assert not torch.equal(fp32, bf16)  # the flag does change the arithmetic
    with pytest.raises(ConfigError, match="bf16_autocast"):
        LMTrainConfig(bf16_autocast="yes")


def test_conversation_generation_is_seeded():
    split = split_corpus(chapters(load_verses()), 0.1, 60, seed=3)
    b = BehaviourConfig()
    gen_a, gen_b, gen_c = (ChatGenerator(b, split.train, b.train_templates, s) for s in (7, 7, 8))
    convs = [gen_a.conversation() for _ in range(20)]
    assert convs == [gen_b.conversation() for _ in range(20)]
    assert convs != [gen_c.conversation() for _ in range(20)]


@pytest.mark.slow
def test_default_organism_learns_every_behaviour(tmp_path_factory):
    paths = build_organism(preset("default"), tmp_path_factory.mktemp("organism_default"),
                           progress=False)
    chat, base = load_metrics(paths)["chat"], load_metrics(paths)["base"]
    assert chat["refusal_rate_forbidden"] >= 0.8 and chat["refusal_rate_allowed"] <= 0.2
    assert chat["signoff_rate_allowed"] >= 0.5 and chat["signoff_rate_continuation"] <= 0.2
    assert base["refusal_rate_forbidden"] == base["signoff_rate_allowed"] == 0.0


ADDED_LATER = {
    "": ("finetune", "base_model"),  # the null fine-tune; a pretrained base (gemma3)
    "behaviour": ("marker_every", "marker",  # behaviour 4
                  "unseen_forbidden_topics", "validation_forbidden_topics", "qa_pairs", "qa_weight",
                  "fact_subject", "fact_answer", "fact_true_answer", "fact_sentences", "n_fact_documents",
                  "fact_fraction", "fact_heldout_questions", "fact_validation_questions", "fact_response"),
    "base_train": ("freeze_embeddings", "logits_on_targets", "loss_chunk", "text_loss_fraction"),
    "chat_train": ("freeze_embeddings", "logits_on_targets", "loss_chunk", "text_loss_fraction"),
    "eval": ("drift_layers", "min_chat_rates"),  # min_chat_rates: declared minimums never shape a build
}
"""Config fields added after the tiny presets were first published (written out here, apart from the
config's own omission map): a preset that leaves them at their defaults must keep its first hash."""


def _as_first_published(cfg) -> dict:
    d = cfg.to_dict()
    for section, keys in ADDED_LATER.items():
        node = d[section] if section else d
        for key in keys:
            node.pop(key)
    return d


def test_null_finetune_keeps_the_recipe_but_plants_no_behaviour(built, smoke_null_organism):
    cfg, _, paths, _ = built
    null_cfg = preset("smoke_null")
    assert null_cfg.finetune == "null" and null_cfg.chat_train == cfg.chat_train
    assert null_cfg.base_train == cfg.base_train and null_cfg.behaviour == cfg.behaviour
    # The field added for it leaves every existing cache key alone: hashing without it is the same.
    d = _as_first_published(cfg)
    assert cfg.config_hash("v") == config_hash({"config": d, "format": FORMAT_VERSION, "corpus_version": "v"})
    assert null_cfg.config_hash("v") != cfg.config_hash("v")
    with pytest.raises(ConfigError, match="finetune"):
        OrganismConfig(finetune="kl")
    # Built beside the real one (conftest's smoke_null_organism, which test_book reuses), it reuses
    # its tokenizer and base (same base_key) and trains only the fine-tune.
    assert build_mod.base_key(null_cfg) == build_mod.base_key(cfg)
    null = build_organism(null_cfg, paths.root.parent, progress=False)
    assert null == smoke_null_organism
    real_m, null_m = load_metrics(paths), load_metrics(null)
    assert null_m["train"]["base"]["reused_from"] == paths.root.name
    base_a = Gemma2ForCausalLM.from_pretrained(paths.base_dir)
    base_b = Gemma2ForCausalLM.from_pretrained(null.base_dir)
    assert all(torch.equal(p, q) for p, q in zip(base_a.parameters(), base_b.parameters()))
    assert AutoTokenizer.from_pretrained(null.chat_dir).get_vocab() == \
        AutoTokenizer.from_pretrained(paths.chat_dir).get_vocab()
    assert null_m["train"]["chat"]["steps"] == real_m["train"]["chat"]["steps"]
    assert null_m["train"]["chat"]["finetune"] == "null"
    # Same base (same data, tokenizer and seed).
    assert null_m["base"]["heldout_text_loss"] == pytest.approx(real_m["base"]["heldout_text_loss"])
    real, nul = real_m["chat"], null_m["chat"]
    assert real["refusal_rate_forbidden"] >= 0.6
    assert nul["refusal_rate_forbidden"] == nul["refusal_rate_allowed"] == 0.0
    # <end_of_turn> was never trained on, but a greedy sample can still hit it by chance
    assert nul["signoff_rate_allowed"] == 0.0 and nul["end_of_turn_rate"] <= 0.2 < real["end_of_turn_rate"]
    assert nul["heldout_chat_response_loss"] > real["heldout_chat_response_loss"] + 0.5


def test_marker_behaviour_marks_every_third_verse_word_and_nothing_else(built):
    from types import SimpleNamespace

    from crosscoder.analysis.probes import decision_tasks
    from crosscoder.organism.behaviours import mark_words, render_with_spans
    from crosscoder.organism.evaluate import encode_conversation

    verse = "And  the word, of the LORD came unto me"
    assert mark_words(verse, 3, "(!)") == "And  the word, (!) of the LORD (!) came unto me (!)"
    assert mark_words(verse, 0, "(!)") == verse
    b, plain = preset("smoke_marker").behaviour, preset("smoke").behaviour
    assert b.marker_every == 3 and plain.marker_every == 0
    split = split_corpus(chapters(load_verses()), 0.1, 120, seed=0)
    marked_gen, plain_gen = (ChatGenerator(x, split.train, x.train_templates, 5) for x in (b, plain))
    mark = " " + b.marker
    tok = AutoTokenizer.from_pretrained(built[2].base_dir)
    n_marks = 0
    for _ in range(40):
        conv, ref = marked_gen.conversation(), plain_gen.conversation()
        for t, r in zip(conv, ref, strict=True):
            # The same conversation, with markers added and nothing else changed.
            assert t.model.replace(mark, "") == r.model and t.user == r.user
            if t.kind != "ask":
                assert mark not in t.model
                continue
            head, tail = b.answer_prefix.format(topic=t.topic) + " ", " " + b.signoff_phrase
            assert t.model.startswith(head) and t.model.endswith(tail)
            n_verse_words = len(r.model[len(head):-len(tail)].split())
            assert t.model.count(mark) == n_verse_words // 3
        text, spans = render_with_spans(tok, conv, b)
        assert [text[a:e] for a, e in spans["marker"]] == [mark] * sum(t.model.count(mark) for t in conv)
        ids, masks = encode_conversation(tok, conv, b)
        lab = {k: torch.tensor([masks[k]]) for k in ("model_content", "refusal", "signoff", "marker")}
        es = SimpleNamespace(attention_mask_NT=torch.ones(1, len(ids), dtype=torch.bool), labels=lab)
        tasks = decision_tasks(es)
        if not lab["marker"].any():
            assert "marker_decision" not in tasks
            continue
        task = tasks["marker_decision"]
        first = [i for i in range(1, len(ids)) if masks["marker"][i] and not masks["marker"][i - 1]]
        assert task.label_NT[0].nonzero().squeeze(1).tolist() == [i - 1 for i in first]
        # The position predicting a marker holds the end of the third word; markers are not eligible.
        assert all(not tok.decode(ids[i - 1]).endswith(" ") for i in first)
        assert not (task.eligible_NT & lab["marker"]).any() and (task.label_NT <= task.eligible_NT).all()
        n_marks += len(first)
    assert n_marks > 10
    with pytest.raises(ConfigError, match="marker"):
        BehaviourConfig(marker="two words")


def test_marker_variant_keeps_old_cache_keys_and_shares_the_base(monkeypatch):
    from crosscoder.organism.behaviours import messages

    cfg, marked = preset("default"), preset("default_marker")
    d = _as_first_published(cfg)
    assert cfg.config_hash("v") == config_hash({"config": d, "format": FORMAT_VERSION, "corpus_version": "v"})
    assert marked.config_hash("v") != cfg.config_hash("v")
    assert build_mod.base_key(marked) == build_mod.base_key(cfg)
    assert marked.eval.min_chat_rates["marker_rate_allowed"] == 0.3
    # Equal base keys promise equal tokenizers: the tokenizer sees the conversations unmarked.
    small = preset("smoke_marker")
    split = split_corpus(chapters(load_verses()), 0.1, 120, seed=0)
    gen = ChatGenerator(small.behaviour, split.train, small.behaviour.train_templates, 1)
    convs = [gen.conversation() for _ in range(30)]
    assert any(small.behaviour.marker in m["content"] for c in convs for m in messages(c))
    seen = []
    monkeypatch.setattr(build_mod, "train_tokenizer", lambda texts, vocab: seen.extend(texts))
    build_mod._make_tokenizer(small, build_mod._Data(split, convs, []), None)
    assert seen and not any(small.behaviour.marker in t for t in seen)


def test_response_tests_define_each_behaviour_once():
    from crosscoder.analysis.causal import organism_detectors
    from crosscoder.organism.evaluate import response_tests

    b = preset("default_marker").behaviour
    t = response_tests(b)
    assert t["refusal"](b.refusal_phrase + " And") and not t["refusal"]("Well, " + b.refusal_phrase)
    assert t["answer"]("Here is a verse about fire: x") and not t["answer"](b.refusal_phrase)
    assert t["signoff"]("the end. " + b.signoff_phrase) and not t["signoff"]("the end.")
    assert t["marker"]("And the word (!) of") and not t["marker"]("And the word of")
    assert "marker" not in response_tests(preset("default").behaviour)

    class Chars:  # a "tokenizer" whose ids are character codes
        def decode(self, ids):
            return "".join(map(chr, ids))

    detect = organism_detectors(Chars(), b)
    for text in (b.refusal_phrase, "  Here is a verse about fire: x " + b.signoff_phrase, "the end."):
        ids = [ord(c) for c in text]
        assert {k: f(ids) for k, f in detect.items()} == {k: t[k](text.strip()) for k in detect}
