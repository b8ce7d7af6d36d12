"""gemma-3-270m rows (issue #24): extraction against the plain truncated forward, the organism's
fine-tune step, and the crosscoder step at d_model 640. Each against a baseline in the same process.

The model is gemma-3-270m (``Gemma3ForCausalLM``: d_model 640, 18 blocks, a 262,144-token
vocabulary), read after block 9, as the ``gemma3-organism`` profile reads it. The real weights are
used when this checkout has them: ``cache/pretrained/gemma-3-270m-gguf-*/`` (the organism's copy of
the base), else the organism's own ``cache/organism/gemma3-*/base`` (the same weights); the chat
model is the organism's fine-tune ``cache/organism/gemma3-*/chat`` when present, else the base
again. Without them: randomly initialised Gemma 3 models of gemma-3-270m's shape. The rows say
which. ``--quick`` always uses a tiny random Gemma 3 (4 blocks, d 128, vocabulary 4,096) and tiny
batches (a smoke check, not a figure).

Rows:

* **extraction**: ``crosscoder.data.pair.extract_pair`` on a (base, chat) ``ModelPair`` as the
  activation cache calls it (``load_pair``; the cache's ``batch_sequences`` inputs, padded to the
  longest, with their attention mask: 8 documents, up to 128 tokens). Baseline: the plain truncated
  forward of the same two models: embedding, the two attention masks and the rotary tables, blocks
  0..LAYER by hand, nothing else. Timed interleaved (best of 3), asserted to give the same activations.
  Also ``extract_pair`` + ``shard_rows`` (the rest of the cache's per-batch work: body rows picked,
  cast to the profile's float32 storage dtype). Unit: positions (B x T, padding included: what the forwards
  compute) / s through both models. Target: >= 0.90 x the plain forward. float32, and bfloat16 when
  the CPU has bf16 arithmetic (``training.cpu_has_bf16``).
* **extraction (shard)**: ``crosscoder.data.cache.extract_rows``, the cache's whole per-shard work, on
  32 documents in forward batches of 8, float32 weights. Baseline: forward batches taken in stream order,
  each padded to its longest row (the cache before length sorting). Against it: batches of similar
  length (the cache's default), and the same under bf16 autocast (``CacheConfig.bf16_autocast``) when
  the CPU has bf16 arithmetic. Timed interleaved; the sorted rows are asserted equal to the stream-order
  ones (float rounding). Unit: real tokens / s through both models.
* **fine-tune**: ``organism.training.train_lm`` with the ``gemma3`` preset's ``chat_train`` recipe
  (frozen embeddings, logits on targets only, chunked loss, bf16 autocast "auto"), one step per
  call, on 8 rows of 128 tokens packed as the organism packs them (``training.pack``). Baseline: a
  plain fine-tune step on the same rows: float32, full logits, every weight trained (AdamW, clip
  1.0). Both share one model (the recipe freezes the embedding, the baseline thaws it), are timed
  interleaved (best of 2 after one untimed call) and create their AdamW per call, so each timed
  step includes its optimiser state's allocation (a long run pays it once; a few % of a step). Their
  losses are checked equal first. When "auto" resolves to bf16 the recipe in float32 is timed too.
  Unit: non-padding tokens / s (``TrainResult.real_tokens``).
* Documents: the organism's evaluation rows (``eval/tokens.safetensors``, a seeded shuffle: text
  rows of 128 tokens and conversations of 25-55) when present, else random ids of random lengths.
  Targets: the model's turns of a conversation; a seeded 25% of a text row's tokens (the recipe's
  ``text_loss_fraction``).
* **CE recovered**: ``crosscoder.analysis.ce.ce_recovered_definitions`` (both definitions, as the
  training pages call it) of a random 4,096-latent crosscoder on 8 of the documents, batch 8.
  Baseline: the same call with every ablated forward run from the embedding (the hook overwriting
  block LAYER's output, before ``residual_hook(skip_earlier=True)``). Timed interleaved (best of
  reps); the numbers are asserted equal. Unit: positions (B x T) / s.
* **crosscoder**: ``bench.bench_train.bench_shape`` at d 640, F 4,096, B 1,024, k 32 (the
  gemma3-organism's 4,096 latents): reference L1 (autograd), fused L1, dense and sparse BatchTopK,
  + AuxK, against a plain GEMM, all in the same process.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import torch
from crosscoder.data.cache import extract_rows, shard_rows
from crosscoder.data.pair import ModelPair, ModelPairConfig, decoder_layers, extract_pair, load_pair
from crosscoder.data.text import batch_sequences
from crosscoder.organism.config import preset
from crosscoder.organism.training import (Document, Packed, cpu_has_bf16, masked_lm_loss, pack, train_lm,
                                         use_bf16_autocast)
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from bench._timing import best_times_interleaved

LAYER = 12
"""gemma3-organism reads the residual stream after block 12 of 18 (where its fine-tune writes the
planted decisions), stored as float32: values there reach 86,508, past float16's range."""
STORAGE = torch.float32
PAD, BOS = 0, 2


def _complete(folder: str) -> bool:
    """A saved model folder: its config and weights are there (not a folder being written)."""
    has_weights = bool(glob.glob(os.path.join(folder, "*.safetensors")))
    return has_weights and os.path.isfile(os.path.join(folder, "config.json"))


def find_weights(root: str = "cache") -> tuple[str, str, str] | None:
    """(base folder, chat folder, description) of the real gemma-3-270m weights in this checkout."""
    pre = sorted(p for p in glob.glob(os.path.join(root, "pretrained", "gemma-3-270m-gguf-*")) if _complete(p))
    org = sorted(p for p in glob.glob(os.path.join(root, "organism", "gemma3-*")) if "null" not in os.path.basename(p))
    chat = next((os.path.join(p, "chat") for p in org if _complete(os.path.join(p, "chat"))), None)
    org_base = next((os.path.join(p, "base") for p in org if _complete(os.path.join(p, "base"))), None)
    base = pre[0] if pre else org_base
    if base is None:
        return None
    what = f"real weights: base {base}, chat {chat or base + ' (the base again)'}"
    return base, chat or base, what


def _organism_dir(root: str = "cache") -> str | None:
    """The gemma3 organism's folder holding its evaluation rows (not the null organism's)."""
    for p in sorted(glob.glob(os.path.join(root, "organism", "gemma3-*"))):
        if "null" not in os.path.basename(p) and os.path.isfile(os.path.join(p, "eval", "tokens.safetensors")):
            return p
    return None


def gemma3_config(quick: bool, folder: str | None = None) -> Gemma3TextConfig:
    """gemma-3-270m's shape (from ``folder``'s config when given), or a tiny one for --quick."""
    if quick:
        return Gemma3TextConfig(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                                sliding_window=16, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=1,
                                tie_word_embeddings=True, attn_implementation="eager")
    if folder and os.path.isfile(os.path.join(folder, "config.json")):
        cfg = Gemma3TextConfig.from_pretrained(folder)
        cfg._attn_implementation = "eager"
        return cfg
    return Gemma3TextConfig(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=512, max_position_embeddings=32_768, pad_token_id=PAD, bos_token_id=BOS,
                            eos_token_id=1, tie_word_embeddings=True, attn_implementation="eager")


def random_model(cfg: Gemma3TextConfig, seed: int) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


def documents(T: int, vocab: int, n: int = 64) -> tuple[list[Document], str]:
    """``n`` BOS-started documents of at most ``T`` tokens with their loss targets, in a seeded order:
    the organism's evaluation rows when present (text rows of 128 tokens, conversations of 25-55),
    else random ids of random lengths. Targets: the model's turns of a conversation; a seeded 25% of
    a text row's tokens (the gemma3 recipe's ``text_loss_fraction``)."""
    g = torch.Generator().manual_seed(0)
    org = _organism_dir()
    if org is not None and T == 128 and vocab == 262_144:
        from safetensors.torch import load_file

        d = load_file(os.path.join(org, "eval", "tokens.safetensors"))
        pick = torch.randperm(d["input_ids"].shape[0], generator=g)[:n]
        ids, real = d["input_ids"][pick], d["attention_mask"][pick].bool()
        turn = d["label.model_content"][pick].bool() if "label.model_content" in d else torch.zeros_like(real)
        what = f"evaluation rows of {org}"
    else:
        ids = torch.randint(4, vocab, (n, T), generator=g)
        ids[:, 0] = BOS
        lengths = torch.randint(T // 4, T + 1, (n,), generator=g)
        lengths[::4] = T  # every fourth a full-length text row
        real = torch.arange(T)[None] < lengths[:, None]
        turn = real & (torch.arange(T)[None] >= lengths[:, None] // 2)
        turn[::4] = False
        what = "random ids"
    text_keep = torch.rand(ids.shape, generator=g) < 0.25
    target = torch.where(turn.any(1, keepdim=True), turn, text_keep) & real
    target[:, 0] = False
    return [Document(i[m].tolist(), t[m].tolist()) for i, m, t in zip(ids, real, target)], what


@torch.no_grad()
def plain_truncated(lm, ids_BT: torch.Tensor, mask_BT: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream after block ``layer`` by hand: what Gemma3TextModel.forward does for
    blocks 0..layer (scaled embedding, the full and sliding causal masks, the rotary tables), with
    no hook, no exception and no final norm."""
    m = lm.model
    h = m.embed_tokens(ids_BT)
    pos = torch.arange(ids_BT.shape[1], device=ids_BT.device)[None]
    kw = {"config": m.config, "inputs_embeds": h, "attention_mask": mask_BT, "cache": None, "position_ids": pos}
    types = m.config.layer_types[: layer + 1]
    masks = {"full_attention": create_causal_mask(**kw), "sliding_attention": create_sliding_window_causal_mask(**kw)}
    rope = {t: m.rotary_emb(h, pos, t) for t in set(types)}
    for i, t in enumerate(types):
        h = m.layers[i](h, attention_mask=masks[t], position_embeddings=rope[t], position_ids=pos, cache=None)
    return h


def extraction_rows(pair: ModelPair, docs: list[Document], what: str, weights: str, reps: int) -> list[dict]:
    seqs = batch_sequences([(d.ids, False) for d in docs], PAD)  # the cache's inputs: padded to the longest
    n_real, (B, T) = int(seqs.attention_mask_NT.sum()), seqs.input_ids_NT.shape
    layer, dtype = pair.layer, next(pair.base.parameters()).dtype
    ours = extract_pair(pair, seqs.input_ids_NT, seqs.attention_mask_NT, None)
    plain = torch.stack([plain_truncated(lm, seqs.input_ids_NT, seqs.attention_mask_NT, layer)
                         for lm in pair.models], 2)
    diff = float((ours.float() - plain.float()).abs().max())
    assert torch.allclose(ours.float(), plain.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2), diff
    fns = {
        "plain": lambda: [plain_truncated(lm, seqs.input_ids_NT, seqs.attention_mask_NT, layer) for lm in pair.models],
        "ours": lambda: extract_pair(pair, seqs.input_ids_NT, seqs.attention_mask_NT, None),
        "ours+rows": lambda: shard_rows(seqs, extract_pair(pair, seqs.input_ids_NT, seqs.attention_mask_NT, None),
                                        0, STORAGE),
    }
    with torch.no_grad():
        t = best_times_interleaved(fns, warmup=1, reps=reps)
    shape = f"{str(dtype).removeprefix('torch.')}, {B}x{T} ({n_real} real), block {layer}"
    names = {"plain": "plain truncated forward, both models (by hand)",
             "ours": "extract_pair (ours)", "ours+rows": "extract_pair + shard_rows (cache's batch)"}
    rows = []
    for k, name in names.items():
        rows.append({"section": "extraction", "shape": shape, "variant": name, "ms": t[k] * 1e3,
                     "tokens_per_s": B * T / t[k], "vs_plain": t["plain"] / t[k], "weights": weights,
                     "inputs": f"{B} {what}", "max_abs_diff": diff})
    rows[1]["note"] = "target >= 0.90 x plain"
    return rows


def shard_extraction_rows(pair: ModelPair, docs: list[Document], what: str, weights: str, reps: int,
                          forward_batch: int = 8) -> list[dict]:
    """The cache's per-shard extraction: stream-order batches vs length-sorted, and + bf16 autocast."""
    if pair.tokenizer is None:  # random models: only the padding id is read
        from types import SimpleNamespace

        pair = pair._replace(tokenizer=SimpleNamespace(pad_token_id=PAD))
    items = [(d.ids, False) for d in docs]
    n_real = sum(len(d.ids) for d in docs)
    stream_pos = sum(len(items[j : j + forward_batch]) * max(len(x) for x, _ in items[j : j + forward_batch])
                     for j in range(0, len(items), forward_batch))
    lens = sorted(len(x) for x, _ in items)
    sorted_pos = sum(len(lens[j : j + forward_batch]) * lens[j : j + forward_batch][-1]
                     for j in range(0, len(lens), forward_batch))
    kw = {"forward_batch": forward_batch}
    fns = {
        "stream": lambda: extract_rows(pair, items, 0, torch.float32, by_length=False, **kw),
        "sorted": lambda: extract_rows(pair, items, 0, torch.float32, **kw),
    }
    if cpu_has_bf16():
        fns["sorted+bf16"] = lambda: extract_rows(pair, items, 0, torch.float32, bf16_autocast=True, **kw)
    ref, got = fns["stream"](), fns["sorted"]()
    diff = float((got["acts"] - ref["acts"]).abs().max())
    assert torch.equal(got["seq"], ref["seq"]) and torch.equal(got["pos"], ref["pos"])
    assert torch.allclose(got["acts"], ref["acts"], rtol=1e-5, atol=1e-5 * float(ref["acts"].abs().max())), diff
    with torch.no_grad():
        t = best_times_interleaved(fns, warmup=1, reps=reps)
    shape = f"float32, {len(docs)} docs, batches of {forward_batch}, block {pair.layer}"
    names = {"stream": f"stream-order batches ({stream_pos} positions)",
             "sorted": f"length-sorted batches ({sorted_pos} positions)",
             "sorted+bf16": "length-sorted + bf16 autocast"}
    return [{"section": "extraction (shard)", "shape": shape, "variant": names[k], "ms": t[k] * 1e3,
             "tokens_per_s": n_real / t[k], "vs_plain": t["stream"] / t[k], "weights": weights,
             "inputs": f"{len(docs)} {what}, {n_real} real tokens", "max_abs_diff": diff} for k in fns]


def finetune_rows(model, docs: list[Document], B: int, T: int, what: str, weights: str, steps: int,
                  reps: int) -> list[dict]:
    ids, target = pack(docs, T, PAD)  # packed as the organism packs its training rows
    ids, target = ids[:B], target[:B]
    recipe = dataclasses.replace(preset("gemma3").chat_train, tokens=steps * B * T, batch_size=B)
    packed = Packed(ids, target)
    n_real = steps * int((ids != PAD).sum())
    auto_bf16 = use_bf16_autocast(recipe.bf16_autocast, next(model.parameters()).device)

    # The two losses agree (float32): the recipe's targets-only chunked head is the same loss.
    with torch.no_grad():
        full = masked_lm_loss(model, ids, target)
        chunked = masked_lm_loss(model, ids, target, targets_only=True, chunk=recipe.loss_chunk)
    assert torch.allclose(full, chunked, rtol=1e-4), (float(full), float(chunked))

    def run_recipe(cfg):
        return lambda: train_lm(model, [packed], [1.0], cfg, 0, "bench", progress=False)

    def plain():
        model.requires_grad_(True)  # train_lm froze the embedding; a plain fine-tune trains every weight
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95))
        for _ in range(steps):
            loss = masked_lm_loss(model, ids, target)  # full [B, T, V] logits, float32
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    fns = {"plain": plain, "recipe": run_recipe(recipe)}
    if auto_bf16:
        fns["recipe32"] = run_recipe(dataclasses.replace(recipe, bf16_autocast=False))
    t = best_times_interleaved(fns, warmup=1, reps=reps)
    model.requires_grad_(False)
    names = {"plain": "plain fine-tune: fp32, full logits, all weights",
             "recipe": f"gemma3 recipe (train_lm{', bf16 autocast' if auto_bf16 else ', fp32'})",
             "recipe32": "gemma3 recipe, autocast off (fp32)"}
    shape = f"{B}x{T} ({n_real // steps} real, {int(target.sum())} targets), {steps} step(s)/call"
    return [{"section": "fine-tune", "shape": shape, "variant": names[k], "ms": t[k] / steps * 1e3,
             "tokens_per_s": n_real / t[k], "vs_plain": t["plain"] / t[k], "weights": weights,
             "inputs": f"{what}, packed"}
            for k in fns]


def crosscoder_rows(quick: bool) -> list[dict]:
    from bench.bench_train import bench_shape

    d, F, B, k = (640, 512, 256, 16) if quick else (640, 4096, 1024, 32)
    rows = bench_shape(d, F, B, k, reps=1 if quick else 3)
    for r in rows:
        r["section"] = "crosscoder"
    return rows


def ce_rows(pair: ModelPair, docs: list[Document], what: str, weights: str, reps: int) -> list[dict]:
    """CE recovered with blocks 0..LAYER skipped in the ablated forwards, against running them."""
    import contextlib

    import crosscoder.analysis.ce as ce
    from crosscoder.model import Crosscoder, CrosscoderConfig

    seqs = batch_sequences([(d.ids, False) for d in docs], PAD)
    (B, T), d = seqs.input_ids_NT.shape, pair.base.config.hidden_size
    cc = Crosscoder(CrosscoderConfig(d_model=d, n_latents=4096, sparsity="batchtopk", k=32),
                    generator=torch.Generator().manual_seed(0)).eval()
    hook = ce.residual_hook

    @contextlib.contextmanager
    def full_forward(lm, layer, **kw):  # the baseline: every block runs
        kw.pop("skip_earlier", None)
        with hook(lm, layer, **kw):
            yield

    def call(skip: bool):
        ce.residual_hook = hook if skip else full_forward
        try:
            return ce.ce_recovered_definitions(pair.models, cc, seqs.input_ids_NT, pair.layer,
                                               attention_mask_NT=seqs.attention_mask_NT, batch_size=B)
        finally:
            ce.residual_hook = hook
    assert call(True) == call(False)
    t = best_times_interleaved({"full": lambda: call(False), "skip": lambda: call(True)}, warmup=0, reps=reps)
    shape = f"{B}x{T}, block {pair.layer} of {len(decoder_layers(pair.base))}, both definitions"
    names = {"full": "ablated forwards from the embedding (before)", "skip": "blocks 0..layer skipped (ours)"}
    return [{"section": "CE recovered", "shape": shape, "variant": name, "ms": t[k] * 1e3,
             "tokens_per_s": B * T / t[k], "vs_plain": t["full"] / t[k], "weights": weights,
             "inputs": f"{B} {what}"} for k, name in names.items()]


PARTS = ("extraction", "fine-tune", "CE recovered", "crosscoder")


def run(quick: bool = False, only: str | None = None) -> list[dict]:
    """Every row (``only``: one of ``PARTS``)."""
    parts = PARTS if only is None else (only,)
    B, T = (2, 32) if quick else (8, 128)
    reps = 1 if quick else 3
    found = None if quick else find_weights()
    rows: list[dict] = []
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_bf16() else [])
    if "extraction" not in parts:
        dtypes = [torch.float32] if {"fine-tune", "CE recovered"} & set(parts) else []
    for dt in dtypes:
        if found is not None:
            base_dir, chat_dir, weights = found
            pair = load_pair(ModelPairConfig(base=base_dir, chat=chat_dir, layer=LAYER, device="cpu",
                                             dtype=str(dt).removeprefix("torch.")), need_chat_template=False)
            vocab = pair.base.config.vocab_size
        else:
            cfg = gemma3_config(quick)
            weights = ("random init, tiny Gemma 3 (4 blocks, d 128, vocab 4,096)" if quick else
                       "random init, gemma-3-270m's shape (d 640, 18 blocks, vocab 262,144)")
            models = [random_model(cfg, s).to(dt) for s in (0, 1)]
            layer = 1 if quick else LAYER
            pair = ModelPair(models[0], models[1], None, layer, cfg.hidden_size)
            vocab, models = cfg.vocab_size, None
        docs, what = documents(T, vocab)
        if "extraction" in parts:
            rows += extraction_rows(pair, docs[:B], what, weights, reps)
            if dt == torch.float32:  # the cache's shard path, against its stream-order batches
                rows += shard_extraction_rows(pair, docs[: 4 * B], what, weights, reps, forward_batch=B)
        if dt == torch.float32 and "CE recovered" in parts:  # the training pages' float32 models
            rows += ce_rows(pair, docs[:B], what, weights, reps)
        if dt == torch.float32 and "fine-tune" in parts:  # the organism fine-tunes the float32 base
            base = pair.base
            del pair
            rows += finetune_rows(base, docs, B, T, what, weights, steps=1, reps=1 if quick else 2)
            del base
        else:
            del pair
    if "crosscoder" in parts:
        rows += crosscoder_rows(quick)
    return rows


def format_rows(rows: list[dict]) -> str:
    from bench.bench_train import format_rows as train_format

    out = []
    for section, unit in (("extraction", "tok/s"), ("extraction (shard)", "real tok/s"), ("fine-tune", "real tok/s"),
                          ("CE recovered", "tok/s")):
        sec = [r for r in rows if r["section"] == section]
        if not sec:
            continue
        ms = "ms/step" if section == "fine-tune" else "ms"
        vs = {"extraction (shard)": "x stream", "CE recovered": "x before"}.get(section, "x plain")
        head = f"{'shape':<46} {'variant':<48} {ms:>9} {unit:>10} {vs:>8}"
        out += [f"### {section}: {sec[0]['weights']}; {sec[0]['inputs']}", head, "-" * len(head)]
        for r in sec:
            out.append(f"{r['shape']:<46} {r['variant']:<48} {r['ms']:>9.1f} {r['tokens_per_s']:>10.1f} "
                       f"{r['vs_plain']:>8.2f}" + (f"  <- {r['note']}" if "note" in r else ""))
        if section == "extraction":
            out.append("max |extract_pair - plain| = "
                       + ", ".join(f"{r['max_abs_diff']:.2g} ({r['shape'].split(',')[0]})" for r in sec[::3]))
        if section == "extraction (shard)":
            out.append(f"max |length-sorted - stream-order| = {sec[0]['max_abs_diff']:.2g} (float32)")
        out.append("")
    cc = [r for r in rows if r["section"] == "crosscoder"]
    if cc:
        out += ["### crosscoder step at d 640 (bench_train.bench_shape)", train_format(cc)]
    return "\n".join(out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke check, not a figure)")
    ap.add_argument("--only", choices=PARTS, help="one part of the benchmark")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(format_rows(run(args.quick, args.only)))
