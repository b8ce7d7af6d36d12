"""Any decoder-only pair: the pair loader, truncated extraction, the CE splice, chat templates and pair
validation on tiny randomly initialised configs of Gemma2, Gemma3, Llama (SmolLM2) and Qwen2, and
single-file GGUF checkpoints (written here with the ``gguf`` package in llama.cpp's layout) of Llama
and Qwen2, whose activations must equal the safetensors original's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

from crosscoder.config import ConfigError
from crosscoder.data.pair import ModelPairConfig, decoder_layers, load_pair, residual_after, residual_hook, residuals_at
from crosscoder.data.text import DataConfig, pad_id, render_chat, start_id, take_sequences
from crosscoder.organism.tokenizer import train_tokenizer

WORDS = ("the cat sat on a mat while the dog ran far away from home and the bird sang a song of "
         "light over hills rivers and seas where people live work and rest").split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + i % 9)) for i in range(300)]

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# family -> (config class, extra config kwargs, tokenizer specials as on the hub for that family)
FAMILIES = {
    # Gemma 2 / 3: <bos>, Gemma's turn template (the organism's tokenizer reproduces it)
    "gemma2": (Gemma2Config, {"head_dim": 16}, None),
    "gemma3": (Gemma3TextConfig, {"head_dim": 16, "sliding_window": 4}, None),
    # SmolLM2 (Llama architecture): ChatML, BOS <|im_start|> (as SmolLM2-Instruct), no pad token
    "llama": (LlamaConfig, {"head_dim": 16}, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
    # Qwen2: ChatML, NO BOS token (sequences start with EOS), q/k/v biases
    "qwen2": (Qwen2Config, {}, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
}
N_LAYERS = 4


def _chatml_tokenizer(specials: dict) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    wrapped.chat_template = CHATML
    return wrapped


def _tokenizer(family: str):
    specials = FAMILIES[family][2]
    return train_tokenizer(TEXTS, vocab_size=200) if specials is None else _chatml_tokenizer(specials)


def _build(family: str, folder, seed: int, hidden: int = 32, tok=None):
    cls, extra, _ = FAMILIES[family]
    tok = tok or _tokenizer(family)
    torch.manual_seed(seed)
    cfg = cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=N_LAYERS,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
              tie_word_embeddings=False, **extra)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for family in FAMILIES:
        tok = _tokenizer(family)
        out[family] = {"base": _build(family, root / f"{family}-base", 0, tok=tok),
                       "chat": _build(family, root / f"{family}-chat", 1, tok=tok)}
    return out


def _pair(zoo, family, layer=1, **kw):
    return ModelPairConfig(base=str(zoo[family]["base"]), chat=str(zoo[family]["chat"]), layer=layer,
                           dtype="float32", device="cpu", **kw)


def _ids(pair, B=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(pair.tokenizer), (B, T), generator=g)
    ids[:, 0] = start_id(pair.tokenizer)
    return ids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_truncated_extraction_equals_hidden_state(zoo, family):
    pair = load_pair(_pair(zoo, family))
    ids = _ids(pair)
    for lm in pair.models:
        full = lm(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(decoder_layers(lm)) == N_LAYERS
        for L in range(N_LAYERS - 1):
            torch.testing.assert_close(residual_after(lm, ids, L), full[L + 1])
        torch.testing.assert_close(residuals_at(lm, ids, [0, 2]), torch.stack([full[1], full[3]], 2))
    # stops after block L: no later block, no unembedding
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(decoder_layers(pair.base))]
    hooks.append(pair.base.get_output_embeddings().register_forward_hook(lambda *a: calls.append("unembed")))
    residual_after(pair.base, ids, 1)
    for h in hooks:
        h.remove()
    assert calls == [0, 1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_splice_of_clean_activation_leaves_loss_unchanged(zoo, family):
    pair = load_pair(_pair(zoo, family, layer=2))
    ids = _ids(pair, seed=1)
    for lm in pair.models:
        clean = lm(input_ids=ids, labels=ids).loss
        cap: list = []
        with residual_hook(lm, 2, capture=cap):
            lm(input_ids=ids)
        with residual_hook(lm, 2, replace=cap[0].clone()):
            spliced = lm(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(spliced, clean)
        with residual_hook(lm, 2, replace=torch.zeros_like(cap[0])):  # the hook really replaces
            assert not torch.isclose(lm(input_ids=ids, labels=ids).loss, clean)
        # skip_earlier: blocks 0..2 do not run, the logits are those of the full spliced forward
        other = torch.randn_like(cap[0])
        with residual_hook(lm, 2, replace=other):
            want = lm(input_ids=ids).logits
        ran = []
        hooks = [b.mlp.register_forward_pre_hook(lambda m, a, k=k: ran.append(k)) for k, b in enumerate(decoder_layers(lm))]
        with residual_hook(lm, 2, replace=other, skip_earlier=True):
            got = lm(input_ids=ids).logits
        for h in hooks:
            h.remove()
        assert ran == list(range(3, N_LAYERS)) and torch.equal(got, want)
        assert torch.equal(lm(input_ids=ids, labels=ids).loss, clean)  # the blocks run again afterwards


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chat_template_and_data_stream(zoo, family, tmp_path):
    pair = load_pair(_pair(zoo, family))
    tok = pair.tokenizer
    ids = render_chat(tok, [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"}])
    text = tok.decode(ids)
    assert ids[0] == start_id(tok) and ids.count(start_id(tok)) == (2 if family == "llama" else 1)
    if family.startswith("gemma"):
        assert text.startswith("<bos><start_of_turn>user\n") and "<start_of_turn>model\n" in text
    else:
        assert "<|im_start|>user\nthe cat<|im_end|>" in text and "<|im_start|>assistant\na dog" in text
    with open(tmp_path / "pile.jsonl", "w") as fh:
        for t in TEXTS[:80]:
            fh.write(json.dumps({"text": t}) + "\n")
    with open(tmp_path / "chat.jsonl", "w") as fh:
        for a, b in zip(TEXTS[80:160], TEXTS[160:240]):
            fh.write(json.dumps({"conversation": [{"role": "user", "content": a},
                                                  {"role": "assistant", "content": b}]}) + "\n")
    seqs = take_sequences(DataConfig(text_source=str(tmp_path / "pile.jsonl"), chat_source=str(tmp_path / "chat.jsonl"),
                                     context_length=16, shuffle_buffer=10), tok, 12)
    assert (seqs.input_ids_NT[:, 0] == start_id(tok)).all() and seqs.is_chat_N.any() and (~seqs.is_chat_N).any()
    assert (seqs.input_ids_NT[seqs.attention_mask_NT == 0] == pad_id(tok)).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pair_validation_per_architecture(zoo, family, tmp_path):
    with pytest.raises(ConfigError, match=f"layer {N_LAYERS} is out of range"):
        load_pair(_pair(zoo, family, layer=N_LAYERS))
    wide = _build(family, tmp_path / "wide", 2, hidden=48)
    with pytest.raises(ConfigError, match="different d_model"):
        load_pair(ModelPairConfig(base=str(zoo[family]["base"]), chat=str(wide), layer=1))
    other = "qwen2" if family.startswith("gemma") else "gemma2"  # another vocabulary, same width
    with pytest.raises(ConfigError, match="different tokenizers"):
        load_pair(ModelPairConfig(base=str(zoo[family]["base"]), chat=str(zoo[other]["chat"]), layer=1))


# --- GGUF -------------------------------------------------------------------------------------------

def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama GGUFs (convert_hf_to_gguf.LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder, path) -> None:
    """A float32 single-file GGUF of a tiny Llama or Qwen2 checkpoint, in llama.cpp's layout."""
    import gguf

    lm = AutoModelForCausalLM.from_pretrained(folder)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    cfg, arch = lm.config, lm.config.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = {t.content for t in tok.added_tokens_decoder.values()} | set(tok.all_special_tokens)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    names = {"embed_tokens": "token_embd", "lm_head": "output", "norm": "output_norm",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for key, t in lm.state_dict().items():
        parts = [p for p in key.split(".") if p not in ("model", "self_attn", "mlp")]
        leaf = parts[-2] if parts[0] == "layers" else parts[0]
        name = ".".join((["blk", parts[1]] if parts[0] == "layers" else []) + [names[leaf], parts[-1]])
        arr = t.float().numpy()
        if arch == "llama" and leaf in ("q_proj", "k_proj"):
            arr = _llama_permute(arr, cfg.num_attention_heads if leaf == "q_proj" else cfg.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_pair_loads_and_matches_safetensors(zoo, family, tmp_path):
    pytest.importorskip("gguf")
    for which in ("base", "chat"):
        write_gguf(zoo[family][which], tmp_path / f"{which}.gguf")
    ref = load_pair(_pair(zoo, family, layer=2))
    got = load_pair(ModelPairConfig(base=str(tmp_path / "base.gguf"), chat=str(tmp_path / "chat.gguf"), layer=2,
                                    dtype="float32", device="cpu"))
    assert got.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    assert got.tokenizer.chat_template == ref.tokenizer.chat_template
    conv = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a mat"}]
    assert render_chat(got.tokenizer, conv) == render_chat(ref.tokenizer, conv)
    ids = _ids(ref, seed=2)
    for a, b in zip(ref.models, got.models):
        torch.testing.assert_close(residual_after(b, ids, 2), residual_after(a, ids, 2))
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits)


def test_gguf_source_splits_folder_and_file():
    cfg = ModelPairConfig(base="owner/repo/model-f16.gguf", chat="some/folder/chat.gguf", layer=0)
    assert cfg.source("base") == ("owner/repo", {"gguf_file": "model-f16.gguf"})
    assert cfg.source("chat") == ("some/folder", {"gguf_file": "chat.gguf"})
    assert ModelPairConfig(base="google/gemma-2-2b", chat="x", layer=0).source("base") == ("google/gemma-2-2b", {})
