"""Truncated extraction vs a full forward with output_hidden_states (same process, same inputs).

A 26-layer Gemma2-shaped model (small width, a large vocabulary so the unembedding costs what it
does in Gemma) read at layer 13: the reference implementations run all 26 blocks, the final norm and
the unembedding to read hidden_states[14]; ``residual_after`` stops after block 13.
"""

from __future__ import annotations

import torch
from crosscoder.data.pair import residual_after
from transformers import Gemma2Config, Gemma2ForCausalLM

from bench._timing import best_time
from bench.projection import truncated_forward_flop_per_token


def run(quick: bool = False) -> list[dict]:
    hidden, vocab, B, T = (64, 4096, 2, 64) if quick else (256, 32768, 4, 256)
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=26,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                       max_position_embeddings=T, attn_implementation="eager")
    lm = Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, vocab, (B, T))
    with torch.no_grad():
        full = lambda: lm(input_ids=ids, output_hidden_states=True).hidden_states[14]  # noqa: E731
        trunc = lambda: residual_after(lm, ids, 13)  # noqa: E731
        assert torch.equal(full(), trunc())
        reps = 2 if quick else 3
        t_full, t_trunc = best_time(full, 1, reps), best_time(trunc, 1, reps)
    shape = f"26 layers, d={hidden}, vocab={vocab}, {B}x{T} tokens"
    # the truncated forward's useful work (blocks 0..13), the figure the Gemma projection scales
    flop = B * T * truncated_forward_flop_per_token(cfg, 13, T)
    return [
        {"shape": shape, "variant": "full forward, output_hidden_states", "ms": t_full * 1e3,
         "tokens_per_s": B * T / t_full, "speedup": 1.0, "gflops": flop / t_full / 1e9},
        {"shape": shape, "variant": "truncated after block 13 (ours)", "ms": t_trunc * 1e3,
         "tokens_per_s": B * T / t_trunc, "speedup": t_full / t_trunc, "note": "target >= 2x",
         "gflops": flop / t_trunc / 1e9},
    ]


def format_rows(rows: list[dict]) -> str:
    head = f"{'shape':<46} {'variant':<38} {'ms':>8} {'tok/s':>9} {'GFLOP/s':>8} {'speedup':>8}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['shape']:<46} {r['variant']:<38} {r['ms']:>8.1f} {r['tokens_per_s']:>9.0f} {r['gflops']:>8.1f} "
                   f"{r['speedup']:>8.2f}"
                   + (f"  <- {r['note']}" if "note" in r else ""))
    return "\n".join(out)


if __name__ == "__main__":
    print(format_rows(run()))
