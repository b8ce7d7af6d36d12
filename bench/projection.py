"""Projected CPU wall time of the gemma-2-2b profile's training runs, from figures measured in the
same ``make bench``: the Gemma-shape crosscoder steps (bench_sparse_l1, B = 1,024) and the truncated
extraction's achieved FLOP/s (bench_extraction). Nothing here is measured on Gemma itself or on a GPU.

* Training: a step at batch B costs the per-step fixed part (Adam + clip, measured alone at the
  Gemma shape) plus the rest scaled linearly from B = 1,024 (the products are linear in B).
  The L1 run's first 5% of steps (lambda warm-up) are costed dense, the rest at trained sparsity.
* Extraction: both models' forwards to block 13 (14 blocks) per token, at the FLOP/s our truncated
  extraction reached on the 26-block stand-in (fp32; matmul FLOPs plus causal attention).
"""

from __future__ import annotations

from transformers import Gemma2Config

# google/gemma-2-2b's published config (the profile reads the residual after block 13).
GEMMA_2_2B = Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=256, vocab_size=256000)
GEMMA_LAYER, GEMMA_CONTEXT = 13, 1024
L1_TOKENS, L1_BATCH = 400_000_000, 4096          # runs.yaml: gemma-2-2b train_l1
TOPK_TOKENS, TOPK_BATCH = 100_000_000, 2048      # runs.yaml: gemma-2-2b train_batchtopk
L1_DENSE_FRACTION = 0.05                         # lambda warm-up: latents still dense


def truncated_forward_flop_per_token(cfg: Gemma2Config, layer: int, context: int) -> float:
    """FLOP per token of a forward through blocks 0..layer: 2 x the block's matmul weights, plus
    causal attention scores and mixing at the mean position context / 2."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn_w = d * h * hd * 2 + d * kv * hd * 2          # q, o; k, v
    mlp_w = 3 * d * cfg.intermediate_size             # gate, up, down
    attn_mix = 2 * 2 * h * hd * (context / 2)         # QK^T and AV
    return (layer + 1) * (2 * (attn_w + mlp_w) + attn_mix)


def _step_s(rows: list[dict], variant: str, batch: int, fixed_s: float) -> float:
    r = next(r for r in rows if r.get("variant") == variant and "L0~80" in r["shape"])
    return fixed_s + (r["ms"] / 1e3 - fixed_s) * batch / 1024


def project(results: dict[str, list[dict]]) -> list[dict]:
    steps = results["bench.bench_sparse_l1"]
    ext = next(r for r in results["bench.bench_extraction"] if r["variant"].startswith("truncated"))
    fixed = next(r for r in steps if r.get("variant", "").startswith("Adam + clip"))["ms"] / 1e3
    flop_tok = 2 * truncated_forward_flop_per_token(GEMMA_2_2B, GEMMA_LAYER, GEMMA_CONTEXT)  # base + chat
    ext_tok_s = ext["gflops"] * 1e9 / flop_tok
    l1_sparse = _step_s(steps, "sparse L1 (trainer, auto path)", L1_BATCH, fixed)
    l1_dense = _step_s(steps, "fused L1, dense path", L1_BATCH, fixed)
    topk = _step_s(steps, "sparse BatchTopK k=100 (trainer)", TOPK_BATCH, fixed)
    n_l1, n_topk = L1_TOKENS // L1_BATCH, TOPK_TOKENS // TOPK_BATCH
    l1_train = n_l1 * (L1_DENSE_FRACTION * l1_dense + (1 - L1_DENSE_FRACTION) * l1_sparse)
    rows = [
        {"run": "L1, 400M tokens (dense-only step)", "steps": n_l1, "step_s": l1_dense,
         "train_h": n_l1 * l1_dense / 3600, "extract_h": L1_TOKENS / ext_tok_s / 3600},
        {"run": "L1, 400M tokens (trainer: sparse after warm-up)", "steps": n_l1, "step_s": l1_sparse,
         "train_h": l1_train / 3600, "extract_h": L1_TOKENS / ext_tok_s / 3600},
        {"run": "BatchTopK k=100, 100M tokens", "steps": n_topk, "step_s": topk,
         "train_h": n_topk * topk / 3600, "extract_h": TOPK_TOKENS / ext_tok_s / 3600},
    ]
    for r in rows:
        r["total_days"] = (r["train_h"] + r["extract_h"]) / 24
        r["extract_tok_s"] = ext_tok_s
        r["extract_gflop_per_tok"] = flop_tok / 1e9
        r["fixed_s"] = fixed
    return rows


def format_rows(rows: list[dict]) -> str:
    r0 = rows[0]
    out = [(f"extraction: {r0['extract_gflop_per_tok']:.2f} GFLOP/token (both models to block 13) at the truncated "
            f"bench's FLOP/s -> {r0['extract_tok_s']:.0f} tokens/s; per-step fixed cost (Adam + clip) {r0['fixed_s']:.2f} s"),
           f"{'run':<48} {'steps':>7} {'s/step':>7} {'train h':>8} {'extract h':>9} {'total days':>10}"]
    out.append("-" * len(out[-1]))
    for r in rows:
        out.append(f"{r['run']:<48} {r['steps']:>7} {r['step_s']:>7.2f} {r['train_h']:>8.0f} {r['extract_h']:>9.0f} "
                   f"{r['total_days']:>10.1f}")
    out.append("CPU projections from measured figures; GPU figures (runs.yaml) are estimates, not measured.")
    return "\n".join(out)
