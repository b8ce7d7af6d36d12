"""Model construction, sequence packing and the plain-torch training loop of the organism."""

from __future__ import annotations

import math
import time
import weakref
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from crosscoder.progress import progress_bar
from transformers import Gemma2Config, Gemma2ForCausalLM

from crosscoder.organism.config import ModelConfig, LMTrainConfig


class Document(NamedTuple):
    """A token sequence to pack and which of its tokens are training targets."""

    ids: list[int]
    target: list[bool]
    """target[i]: token i is predicted (from position i - 1) in the loss."""


class Packed(NamedTuple):
    """Rows of packed documents (right-padded with <pad>, which is never a target)."""

    ids_NT: torch.Tensor
    target_NT: torch.Tensor


def gemma2_config(cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int]) -> Gemma2Config:
    """A tiny Gemma2 with the real architecture: GQA, soft-capping, sandwich norms, tied embeddings."""
    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        query_pre_attn_scalar=cfg.head_dim,
        max_position_embeddings=cfg.context_length,
        # The window equals the context so the alternating "sliding" layers attend globally too.
        sliding_window=cfg.context_length,
        pad_token_id=special_ids["<pad>"],
        bos_token_id=special_ids["<bos>"],
        eos_token_id=special_ids["<eos>"],
        tie_word_embeddings=True,
        attn_implementation="eager",
    )


def new_model(cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int],
              seed: int) -> Gemma2ForCausalLM:
    """Randomly initialised base model (seeded)."""
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(gemma2_config(cfg, vocab_size, special_ids))


def fragments(ids: Sequence[int], bos_id: int, seq_len: int) -> list[Document]:
    """Cut one document's tokens into <bos>-prefixed pieces of at most ``seq_len`` tokens.

    Every piece starts with <bos>, like every sequence the activation pipeline feeds the models, so
    the models see position 0 = <bos> in training exactly as in extraction.
    """
    step = seq_len - 1
    return [Document([bos_id] + list(ids[i:i + step]), [False] + [True] * len(ids[i:i + step]))
            for i in range(0, len(ids), step)]


def pack(docs: Sequence[Document], seq_len: int, pad_id: int) -> Packed:
    """Greedy in-order packing: append documents to the current row while they fit.

    Documents longer than ``seq_len`` are truncated (callers pass fragments that fit).
    """
    rows_ids: list[list[int]] = []
    rows_tgt: list[list[bool]] = []
    cur_ids: list[int] = []
    cur_tgt: list[bool] = []
    for d in docs:
        ids, tgt = d.ids[:seq_len], d.target[:seq_len]
        if cur_ids and len(cur_ids) + len(ids) > seq_len:
            rows_ids.append(cur_ids)
            rows_tgt.append(cur_tgt)
            cur_ids, cur_tgt = [], []
        cur_ids = cur_ids + ids
        cur_tgt = cur_tgt + tgt
    if cur_ids:
        rows_ids.append(cur_ids)
        rows_tgt.append(cur_tgt)
    ids_NT = torch.full((len(rows_ids), seq_len), pad_id, dtype=torch.long)
    target_NT = torch.zeros((len(rows_ids), seq_len), dtype=torch.bool)
    for i, (ids, tgt) in enumerate(zip(rows_ids, rows_tgt)):
        ids_NT[i, :len(ids)] = torch.tensor(ids)
        target_NT[i, :len(tgt)] = torch.tensor(tgt)
    return Packed(ids_NT, target_NT)


class _ChunkedHeadCE(torch.autograd.Function):
    """Sum over rows of cross_entropy(cap(h_M @ W.T), y_M), ``chunk`` rows at a time, without keeping
    the [M, V] logits (a 262k vocabulary makes them the largest tensors of a fine-tuning step: 0.75 GB
    in float32 for 700 targets, several copies). ``cap`` > 0 applies Gemma 2's soft-capping
    cap * tanh(z / cap). The embedding ``W`` gets no gradient here (the recipe that uses this freezes it).

    The loss is a scalar, so dL/dh (softmax - onehot, through the cap, times W) is formed in the
    forward while each chunk's logits are at hand, and backward only scales it: two [M, V, D]
    products per step instead of three (the logits were computed again in backward), [M, D] kept
    instead of h. The same operations on the same values as computing them in backward, so the same
    gradient to the bit (tests/test_organism_pretrained.py)."""

    @staticmethod
    def forward(ctx, h_MD, W_VD, y_M, chunk: int, cap: float):
        total = h_MD.new_zeros((), dtype=torch.float32)
        grad_MD = torch.empty_like(h_MD) if ctx.needs_input_grad[0] else None
        for i in range(0, h_MD.shape[0], chunk):
            y = y_M[i:i + chunk]
            z = (h_MD[i:i + chunk] @ W_VD.T).float()
            if cap:
                t = torch.tanh(z / cap)
                z = t * cap
            total = total + F.cross_entropy(z, y, reduction="sum")
            if grad_MD is not None:
                d = torch.softmax(z, dim=-1)  # d CE / d logits = softmax - onehot
                d[torch.arange(d.shape[0]), y] -= 1
                if cap:
                    d = d * (1 - t * t)
                grad_MD[i:i + chunk] = (d.to(W_VD.dtype) @ W_VD).to(h_MD.dtype)
        ctx.save_for_backward(grad_MD)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad_MD,) = ctx.saved_tensors
        return grad_MD * g, None, None, None, None


_CAST_CACHE: dict[int, tuple[weakref.ref, int, torch.dtype, torch.Tensor]] = {}
"""id(weight) -> (weak reference to it, its version, dtype, the cast copy); an entry goes with its weight."""


def frozen_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, kept from one call to the next while the weight is unchanged (same
    in-place version counter). The chunked loss's frozen 262k-row embedding cast to bf16 took
    0.17-0.56 s per fine-tune step of ~4 s on 2 cores (a 335 MB allocation and copy each step);
    an optimiser step or any in-place write bumps the version and the copy is made again."""
    if weight.dtype == dtype:
        return weight
    key, version = id(weight), weight._version
    hit = _CAST_CACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == version and hit[2] == dtype:
        return hit[3]
    cast = weight.detach().to(dtype)
    _CAST_CACHE[key] = (weakref.ref(weight, lambda _ref: _CAST_CACHE.pop(key, None)), version, dtype, cast)
    return cast


def masked_lm_loss(model: Gemma2ForCausalLM, ids_BT: torch.Tensor, target_BT: torch.Tensor,
                   reduction: str = "mean", *, targets_only: bool = False, chunk: int = 0) -> torch.Tensor:
    """Next-token cross-entropy over the target tokens (position t predicts token t + 1).

    Right padding needs no attention mask: a causal model's real tokens never see later pads.
    ``targets_only`` runs the decoder without its head and projects only the positions that
    predict a target onto the vocabulary (the same loss, up to float rounding); ``chunk`` > 0 also
    computes those logits ``chunk`` positions at a time, in forward and backward (``_ChunkedHeadCE``;
    the output embedding must be frozen).
    """
    if targets_only:
        keep_BT = target_BT[:, 1:]
        hidden = model.get_decoder()(input_ids=ids_BT).last_hidden_state[:, :-1][keep_BT]
        head = model.get_output_embeddings()
        cap = getattr(model.config, "final_logit_softcapping", None) or 0.0
        y = ids_BT[:, 1:][keep_BT]
        if chunk:
            if head.weight.requires_grad and torch.is_grad_enabled():
                raise ValueError("a chunked loss needs a frozen output embedding (LMTrainConfig.freeze_embeddings)")
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
            if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
                dtype = torch.get_autocast_dtype("cuda")
            total = _ChunkedHeadCE.apply(hidden.to(dtype), frozen_cast(head.weight, dtype), y, chunk, float(cap))
            return total if reduction == "sum" else total / max(1, y.shape[0])
        logits = head(hidden).float()
        if cap:  # Gemma 2 soft-caps its logits; the full forward does it inside the model
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits, y, reduction=reduction)
    logits_BTV = model(input_ids=ids_BT).logits
    # float32 log-softmax even when the forward ran under bf16 autocast
    logits = logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float()
    tgt = ids_BT[:, 1:].reshape(-1)
    keep = target_BT[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(logits[keep], tgt[keep], reduction="sum")
    if reduction == "sum":
        return loss_sum
    return loss_sum / keep.sum().clamp(min=1)


class RowSampler:
    """Endless seeded shuffles of a row set (epoch after epoch, new order each epoch)."""

    def __init__(self, n_rows: int, generator: torch.Generator):
        self.n, self.g = n_rows, generator
        self.perm = torch.randperm(n_rows, generator=generator)
        self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
            n = min(k, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + n])
            self.pos += n
            k -= n
        return torch.cat(out)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16). Without it torch
    emulates bf16 and autocast runs several times slower than float32 (measured: a gemma-3-270m
    fine-tuning step at 4 tok/s under autocast against 38 tok/s in float32 on an AVX2-only CPU)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:  # not Linux: do not assume bf16
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16_autocast(setting: bool | str, device: torch.device) -> bool:
    """Resolve ``LMTrainConfig.bf16_autocast`` ("auto": on CUDA, or on a CPU with bf16 arithmetic)."""
    if setting == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return bool(setting)


def lr_at(cfg: LMTrainConfig, step: int, n_steps: int) -> float:
    """Linear warm-up, then cosine decay to ``lr * final_lr_fraction`` at the last step."""
    warm = int(n_steps * cfg.warmup_fraction)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, n_steps - 1 - warm)
    floor = cfg.final_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class TrainResult(NamedTuple):
    """What a training run reports."""

    steps: int
    tokens: int
    losses: list[float]
    """Training loss of every step."""
    seconds: float
    bf16_autocast: bool = False
    """Whether the forward ran under bf16 autocast (``LMTrainConfig.bf16_autocast`` resolved)."""
    real_tokens: int = 0
    """Non-padding tokens processed (``tokens`` counts padding too)."""


def train_lm(model: Gemma2ForCausalLM, sources: Sequence[Packed], fractions: Sequence[float],
             cfg: LMTrainConfig, seed: int, desc: str, progress: bool = True) -> TrainResult:
    """AdamW on batches that draw ``fractions[i]`` of their rows from ``sources[i]``.

    The batch composition is fixed per step (e.g. 16 text rows + 16 chat rows) rather than sampled,
    so the mix is exact and the run deterministic.
    """
    seq_len = sources[0].ids_NT.shape[1]
    n_steps = max(1, cfg.tokens // (cfg.batch_size * seq_len))
    counts = [round(cfg.batch_size * f) for f in fractions]
    counts[-1] = cfg.batch_size - sum(counts[:-1])
    g = torch.Generator().manual_seed(seed)
    samplers = [RowSampler(s.ids_NT.shape[0], g) for s in sources]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if cfg.freeze_embeddings and "embed" in name:
            p.requires_grad_(False)
            continue
        # Decay only the block matrices: embeddings (tied with the unembedding) and norm gains
        # are left alone, the usual LM practice.
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    autocast = use_bf16_autocast(cfg.bf16_autocast, next(model.parameters()).device)
    pad_id = model.config.pad_token_id
    real = 0
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    model.train()
    losses = []
    t0 = time.perf_counter()
    bar = progress_bar(range(n_steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        ids, tgt = [], []
        for src, sampler, k in zip(sources, samplers, counts):
            if k:
                rows = sampler.take(k)
                ids.append(src.ids_NT[rows])
                tgt.append(src.target_NT[rows])
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, n_steps)
        batch, target = torch.cat(ids), torch.cat(tgt)
        if cfg.logits_on_targets:
            # Packing leaves padding at the right; drop the columns that are padding in every row.
            # (Only on this path, so the tiny organisms' float32 runs stay bit for bit as built.)
            width = int((batch != pad_id).any(0).nonzero().max()) + 1 if pad_id is not None else batch.shape[1]
            batch, target = batch[:, :width], target[:, :width]
        real += int((batch != pad_id).sum()) if pad_id is not None else batch.numel()
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = masked_lm_loss(model, batch, target, targets_only=cfg.logits_on_targets, chunk=cfg.loss_chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # frozen ones have no grad
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    opt.zero_grad(set_to_none=True)  # the gradients are spent: free them (400 MB for gemma-3-270m)
    model.eval()
    return TrainResult(n_steps, n_steps * cfg.batch_size * seq_len, losses,
                       time.perf_counter() - t0, autocast, real)
