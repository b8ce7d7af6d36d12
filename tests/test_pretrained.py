"""A pretrained Gemma 3 base from a GGUF file as a plain HF folder (crosscoder.organism.pretrained),
and a chat model given as a PEFT adapter (crosscoder.data.pair), on a tiny Gemma 3 that the ``gguf``
package writes here the way llama.cpp's converter does (tensor names from gguf's own name map, Gemma's
norms stored as 1 + w, Q8_0 blocks, a SentencePiece vocabulary in the metadata). No network."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import types

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from crosscoder.config import ConfigError
from crosscoder.data.pair import ModelPairConfig, load_pair, residual_after
from crosscoder.organism import pretrained as P

SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")
WORDS = ("the", "cat", "sat", "on", "mat", "user", "model", "hello", "hi", "be", "brief")
N_LAYERS, D, D_FF, HEADS, HEAD_DIM, WINDOW, CONTEXT = 2, 64, 128, 2, 32, 16, 256


def _vocab() -> tuple[list[str], list[int]]:
    """A Gemma-shaped SentencePiece vocabulary: control tokens first (Gemma's ids 0-3), 256 byte
    tokens, single characters, then whole words (token types: 3 control, 6 byte, 1 normal)."""
    tokens, kinds = list(SPECIAL), [3] * len(SPECIAL)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    kinds += [6] * 256
    for piece in ["\n", "\u2581", *map(chr, range(97, 123)), *map(chr, range(65, 91)),
                  *("\u2581" + w for w in WORDS), *WORDS]:
        if piece not in tokens:
            tokens.append(piece)
            kinds.append(1)
    return tokens, kinds


def write_tiny_gguf(path, seed: int = 0) -> Gemma3ForCausalLM:
    """Write a tiny Gemma 3 GGUF as llama.cpp's convert_hf_to_gguf.py would, and return the
    Gemma3ForCausalLM holding exactly the weights a correct reader recovers (Q8_0 round trip)."""
    tokens, kinds = _vocab()
    ref = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=D, intermediate_size=D_FF, num_hidden_layers=N_LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HEAD_DIM, max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-6, sliding_window=WINDOW, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        attn_implementation="eager")).eval()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(D)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(D_FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(1)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(ref.config.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(WINDOW)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(kinds)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, N_LAYERS)
    g = torch.Generator().manual_seed(seed)
    recovered = {}
    for name, p in ref.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding; llama.cpp writes no output.weight then
            continue
        stem, suffix = name.rsplit(".", 1)
        gname = f"{names.get_name(stem)}.{suffix}"
        # Random norms too (Gemma initialises them to 0), so a reader that forgot the +1 offset fails.
        value = (torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.1)).numpy()
        if "norm" in name:
            w.add_tensor(gname, value + 1.0)  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
            recovered[name] = torch.from_numpy((value + 1.0) - 1.0)
        else:
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            recovered[name] = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    missing, unexpected = ref.load_state_dict(recovered, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    ref.tie_weights()
    return ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny-gemma3.gguf"
    ref = write_tiny_gguf(path)
    folder = P.gguf_to_hf_folder(path, P.sha256_file(path), root / "cache")
    return types.SimpleNamespace(path=path, ref=ref, sha=P.sha256_file(path), folder=folder, root=root)


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(lm, ids):
    return lm(input_ids=ids).logits


def _folders(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_gguf_to_hf_folder_reloads_bit_identically(tiny):
    ids = _ids(tiny.ref.config.vocab_size)
    from_gguf = AutoModelForCausalLM.from_pretrained(str(tiny.path.parent), gguf_file=tiny.path.name,
                                                     dtype=torch.float32, attn_implementation="eager").eval()
    saved = AutoModelForCausalLM.from_pretrained(tiny.folder, attn_implementation="eager").eval()
    assert type(saved) is Gemma3ForCausalLM and saved.dtype == torch.float32
    assert getattr(saved, "hf_quantizer", None) is None and not hasattr(saved.config, "quantization_config")
    a, b = _logits(from_gguf, ids), _logits(saved, ids)
    assert torch.equal(a, b)
    # ... and both equal a Gemma3ForCausalLM built directly from the same float weights: the reader
    # mapped every tensor to its HF name and undid the norms' +1 offset.
    torch.testing.assert_close(b, _logits(tiny.ref, ids), rtol=1e-5, atol=1e-5)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "sliding_window", "vocab_size", "tie_word_embeddings"):
        assert getattr(saved.config, key) == getattr(tiny.ref.config, key), key


def test_folder_contents_provenance_and_cache_hit(tiny):
    prov = P.read_provenance(tiny.folder)
    assert prov["sha256"] == tiny.sha and prov["source"] == "gguf-file" and prov["format_version"] == P.FORMAT_VERSION
    tok = AutoTokenizer.from_pretrained(tiny.folder)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    gen = json.loads((tiny.folder / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted([tok.eos_token_id, eot]) and eot != tok.unk_token_id
    umask = os.umask(0)
    os.umask(umask)
    for f in tiny.folder.iterdir():
        if f.suffix in (".json", ".jinja"):  # no path of this machine in the artifact
            assert str(tiny.root) not in f.read_text(), f.name
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name  # readable like any plain file
    t0 = time.perf_counter()
    again = P.gguf_to_hf_folder(tiny.path, tiny.sha, tiny.root / "cache")
    assert again == tiny.folder and time.perf_counter() - t0 < 1.0
    assert _folders(tiny.root / "cache") == [tiny.folder.name]  # no temp folder left


def test_chat_template_renders_gemma_format(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.folder)
    conv = [{"role": "user", "content": "hello cat"}, {"role": "assistant", "content": " hi "},
            {"role": "user", "content": "be brief"}, {"role": "assistant", "content": "the mat"}]
    assert tok.apply_chat_template(conv, tokenize=False) == (
        "<bos><start_of_turn>user\nhello cat<end_of_turn>\n<start_of_turn>model\nhi<end_of_turn>\n"
        "<start_of_turn>user\nbe brief<end_of_turn>\n<start_of_turn>model\nthe mat<end_of_turn>\n")
    assert tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nhello cat<end_of_turn>\n<start_of_turn>model\n")
    # A system turn is prepended to the first user turn, as in Gemma 3's template.
    system = [{"role": "system", "content": "be brief"}, *conv[:2]]
    assert tok.apply_chat_template(system, tokenize=False) == (
        "<bos><start_of_turn>user\nbe brief\n\nhello cat<end_of_turn>\n<start_of_turn>model\nhi<end_of_turn>\n")
    ids = tok.apply_chat_template(conv[:2], tokenize=True, return_dict=True)["input_ids"]
    sot, eot = tok.convert_tokens_to_ids("<start_of_turn>"), tok.convert_tokens_to_ids("<end_of_turn>")
    assert ids[0] == tok.bos_token_id and ids.count(sot) == 2 and ids.count(eot) == 2
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([conv[0], conv[0]], tokenize=False)


def test_wrong_sha256_stops_and_leaves_nothing(tiny, tmp_path):
    root = tmp_path / "cache"
    with pytest.raises(P.PretrainedError, match=f"sha256 {tiny.sha}, expected {'0' * 64}"):
        P.gguf_to_hf_folder(tiny.path, "0" * 64, root)
    assert _folders(root) == []


@pytest.mark.parametrize("cut_at", [300, -1000, -1], ids=["in the header", "in the tensors", "last byte"])
def test_truncated_gguf_stops_and_leaves_nothing(tiny, tmp_path, cut_at):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.path.read_bytes()[:cut_at])
    root = tmp_path / "cache"
    # The right sha256 of the cut file, so the reader's check, not the checksum, has to catch it.
    with pytest.raises(P.PretrainedError, match="truncated or corrupt"):
        P.gguf_to_hf_folder(cut, P.sha256_file(cut), root)
    assert _folders(root) == []


def _fake_package(tmp_path, gguf_file, damage=False):
    """A stand-in for the PyPI package with its API (MODEL_NAME, EXPECTED_SHA256, verify_chunks,
    assemble) whose chunks join to the tiny GGUF (one byte flipped when ``damage``)."""
    home = tmp_path / "fakepkg"
    (home / "data").mkdir(parents=True)
    (home / "data" / P.LICENCE_FILE).write_text("<html>Gemma Terms of Use</html>")
    mod = types.ModuleType(P.GGUF_MODULE)
    mod.__file__ = str(home / "__init__.py")
    mod.MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
    mod.EXPECTED_SHA256 = P.sha256_file(gguf_file)
    mod.verify_chunks = lambda: None

    def assemble(output_path, overwrite=False):
        blob = bytearray(gguf_file.read_bytes())
        if damage:
            blob[-5] ^= 0xFF
        open(output_path, "wb").write(blob)
        return output_path

    mod.assemble = assemble
    return mod


def test_package_path_builds_the_same_folder_with_licence(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, P.GGUF_MODULE, _fake_package(tmp_path, tiny.path))
    monkeypatch.setattr(P, "GGUF_SHA256", tiny.sha)
    root = tmp_path / "cache"
    # A temp folder of a killed build (its pid no longer exists) is cleaned up.
    final = P.PretrainedBase().folder(root)
    stale = root / f".tmp-{final.name}-{2 ** 30}-deadbeef"
    stale.mkdir(parents=True)
    folder = P.pretrained_base("gguf", root)
    assert folder == final and _folders(root) == [final.name]
    prov = P.read_provenance(folder)
    assert prov["source"] == "gguf-package" and prov["licence"] == P.LICENCE and prov["sha256"] == tiny.sha
    assert prov["licence_source"] == f"{P.GGUF_MODULE}/data/{P.LICENCE_FILE}"
    assert (folder / prov["licence_file"]).read_text() == "<html>Gemma Terms of Use</html>"
    ids = _ids(tiny.ref.config.vocab_size)
    same = AutoModelForCausalLM.from_pretrained(tiny.folder, attn_implementation="eager")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager"), ids),
                       _logits(same, ids))


def test_package_path_wrong_sha256_names_the_fix(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, P.GGUF_MODULE, _fake_package(tmp_path, tiny.path, damage=True))
    monkeypatch.setattr(P, "GGUF_SHA256", tiny.sha)
    root = tmp_path / "cache"
    with pytest.raises(P.PretrainedError, match=f"expected {tiny.sha}.*--force-reinstall"):
        P.pretrained_base("gguf", root)
    assert _folders(root) == []


@pytest.mark.parametrize("how", ["not installed", "chunks missing"])
def test_missing_package_gives_the_install_command(tmp_path, monkeypatch, how):
    if how == "not installed":
        monkeypatch.setitem(sys.modules, P.GGUF_MODULE, None)  # import raises ImportError
    else:
        mod = types.ModuleType(P.GGUF_MODULE)

        def verify_chunks():
            raise FileNotFoundError("Missing chunk files: gemma-3-270m-q4_k_m.gguf.part02")

        mod.verify_chunks, mod.EXPECTED_SHA256 = verify_chunks, P.GGUF_SHA256
        monkeypatch.setitem(sys.modules, P.GGUF_MODULE, mod)
    root = tmp_path / "cache"
    with pytest.raises(P.PretrainedError) as err:
        P.pretrained_base("gguf", root)
    assert f"`{P.INSTALL_COMMAND}`" in str(err.value)
    assert _folders(root) == []


def test_bad_source_is_a_config_error():
    with pytest.raises(ConfigError, match="source must be one of"):
        P.PretrainedBase(source="huggingface")


def test_hub_source_shares_the_save_steps(tiny, tmp_path):
    # A local folder stands in for the hub checkpoint: the same from_pretrained call.
    folder = P.pretrained_base(P.PretrainedBase(source="hub", hub_name=str(tiny.folder)), tmp_path / "cache")
    prov = P.read_provenance(folder)
    assert prov["source"] == "hub" and prov["hub_name"] == tiny.folder.name and prov["licence"] == P.LICENCE
    assert str(tiny.root) not in (folder / "config.json").read_text()
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == P.GEMMA_CHAT_TEMPLATE
    ids = _ids(tiny.ref.config.vocab_size)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager"), ids),
                       _logits(AutoModelForCausalLM.from_pretrained(tiny.folder, attn_implementation="eager"), ids))


# ---- a chat model given as a PEFT adapter --------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lm = AutoModelForCausalLM.from_pretrained(tiny.folder, attn_implementation="eager")
    # init_lora_weights=False: random A and B, so the adapter changes the model from the first step.
    peft_lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    peft_lm.save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny.folder)
    return folder


def _pair_cfg(base, chat, **kw):
    return ModelPairConfig(base=str(base), chat=str(chat), layer=1, dtype="float32", device="cpu", **kw)


def test_adapter_chat_model_is_merged_plain_model(tiny, adapter):
    from peft import PeftModel

    cfg = _pair_cfg(tiny.folder, adapter)
    assert cfg.chat_adapter() == (str(adapter), str(tiny.folder))
    assert _pair_cfg(tiny.folder, tiny.folder).chat_adapter() is None
    pair = load_pair(cfg)
    assert type(pair.chat) is Gemma3ForCausalLM
    assert not any("lora" in n for n, _ in pair.chat.named_parameters())
    ids = _ids(tiny.ref.config.vocab_size)
    chat = _logits(pair.chat, ids)
    fresh = lambda: AutoModelForCausalLM.from_pretrained(tiny.folder, attn_implementation="eager").eval()
    assert torch.equal(chat, _logits(PeftModel.from_pretrained(fresh(), adapter).merge_and_unload().eval(), ids))
    # The unmerged adapter (LoRA computed beside each layer) gives the same function.
    torch.testing.assert_close(chat, _logits(PeftModel.from_pretrained(fresh(), adapter).eval(), ids),
                               rtol=1e-4, atol=1e-4)
    assert (chat - _logits(pair.base, ids)).abs().max() > 1e-2
    assert torch.equal(_logits(pair.base, ids), _logits(fresh(), ids))
    h = residual_after(pair.chat, ids, 1)
    assert h.shape == (3, 24, D)


def test_adapter_with_explicit_base(tiny, adapter, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    conf = json.loads((moved / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = "someone/not-on-this-machine"
    (moved / "adapter_config.json").write_text(json.dumps(conf))
    cfg = _pair_cfg(tiny.folder, moved, chat_adapter_base=str(tiny.folder))
    assert cfg.chat_adapter().base == str(tiny.folder)
    ids = _ids(tiny.ref.config.vocab_size)
    assert torch.equal(_logits(load_pair(cfg).chat, ids), _logits(load_pair(_pair_cfg(tiny.folder, adapter)).chat, ids))
    # The field is left out of the config dict at its default, so existing cache keys do not change.
    assert "chat_adapter_base" not in _pair_cfg(tiny.folder, adapter).to_dict()
    assert cfg.to_dict()["chat_adapter_base"] == str(tiny.folder)
    assert ModelPairConfig.from_dict(cfg.to_dict()) == cfg


def test_adapter_of_another_width_fails_before_any_weights(tiny, adapter, tmp_path, monkeypatch):
    wide = tmp_path / "wide"
    cfg = Gemma3TextConfig(vocab_size=tiny.ref.config.vocab_size, hidden_size=2 * D, intermediate_size=D_FF,
                           num_hidden_layers=N_LAYERS, num_attention_heads=HEADS, num_key_value_heads=1,
                           head_dim=HEAD_DIM)
    Gemma3ForCausalLM(cfg).save_pretrained(wide)
    AutoTokenizer.from_pretrained(tiny.folder).save_pretrained(wide)

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the pair was validated")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ConfigError, match=r"chat adapter .* applies to .*d_model 64.*d_model 128"):
        load_pair(_pair_cfg(wide, adapter))


def test_makefile_installs_the_pinned_gguf_package_for_the_gemma3_profile():
    """`make book PROFILE=gemma3-organism` installs exactly the package version the loader checks."""
    from pathlib import Path

    from crosscoder.organism import pretrained

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    want = f"PROFILE_PACKAGES_gemma3-organism := {pretrained.GGUF_PACKAGE}=={pretrained.GGUF_PACKAGE_VERSION}"
    assert want in makefile.splitlines()
