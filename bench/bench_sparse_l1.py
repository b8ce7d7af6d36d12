"""The L1 training step at trained sparsity (same process, same inputs): the trainer's step
(``kernels.training_step``, sparse below ``L1_SPARSE_MAX_DENSITY``) vs the fused dense L1 step, the
readable autograd reference and a plain GEMM; and the density at which the sparse and dense paths
cost the same, re-measured (the crossover that ``L1_SPARSE_MAX_DENSITY`` records).

The density is set, not trained: each latent's encoder bias is placed at the matching quantile of its
pre-activations on the benchmark batch, so that latent fires on that fraction of the tokens (a trained
crosscoder's frequencies are skewed, with the same total). Adam's lr is small enough that the
density stays put over the timed steps; the L0 column is what the timed steps measured.

Rows per shape: plain GEMM, reference L1 (autograd, einsum), fused L1 (dense), sparse L1 (the
trainer's step, auto path). Every step is loss + backward + grad-norm clip + Adam, fp32.
"""

from __future__ import annotations

import argparse
import itertools
import math
import warnings

import torch
from crosscoder import kernels
from crosscoder.config import CrosscoderConfig, TrainConfig
from crosscoder.kernels import l1_step
from crosscoder.model import Crosscoder
from crosscoder.train import make_optimizer

from bench._timing import best_times_interleaved
from bench.bench_train import _reference_l1_loss, gemm_row, train_step_fn

warnings.filterwarnings("ignore", message=".*Sparse.*")

LAMBDA = 2.0
CROSSOVER_SWEEP = [0.005, 0.02, 0.05, 0.1, 0.2, 0.35]  # active fractions
LR = 1e-7  # Adam moves every weight by ~lr per step: small, so the set density holds while timing


@torch.no_grad()
def l1_model_at_density(d: int, F: int, x_BSD: torch.Tensor, density: float) -> Crosscoder:
    """A freshly initialised L1 crosscoder whose latents each fire on ``density`` of ``x_BSD``."""
    torch.manual_seed(1)
    m = Crosscoder(CrosscoderConfig(d_model=d, n_latents=F, sparsity="l1"))
    B = x_BSD.shape[0]
    n_on = max(1, round(density * B))
    pre_BF = m.pre_acts(x_BSD)
    # the bias sits midway between each latent's n_on-th and (n_on + 1)-th largest pre-activation
    # (torch.quantile refuses more than 2^24 elements), so small weight updates leave L0 put
    top = pre_BF.topk(n_on + 1, dim=0).values
    m.b_enc_F.copy_(-(top[-1] + top[-2]) / 2)
    return m


def _variants(m_of, x_BSD):
    """(name, step) pairs; ``m_of()`` gives a fresh model at the benchmark density."""
    l0s: list[float] = []

    def trainer_loss(m, x):
        out = kernels.training_step(m, x, LAMBDA)
        l0s.append(float(out.l0))
        return out.loss

    return l0s, [
        ("reference L1 (autograd, einsum)", train_step_fn(m_of(), lambda m, x: _reference_l1_loss(m, x, LAMBDA), x_BSD, LR)),
        ("fused L1, dense path", train_step_fn(m_of(), lambda m, x: l1_step(m, x, LAMBDA, path="dense").loss, x_BSD, LR)),
        ("sparse L1 (trainer, auto path)", train_step_fn(m_of(), trainer_loss, x_BSD, LR)),
    ]


def _extra_variants(d: int, F: int, x_BSD: torch.Tensor, k: int):
    """For the projection: the BatchTopK step at the same shape, and the per-step fixed cost (Adam
    and the grad-norm clip over every parameter, gradients already in place)."""
    tk = Crosscoder(CrosscoderConfig(d_model=d, n_latents=F, sparsity="batchtopk", k=k))
    m = Crosscoder(CrosscoderConfig(d_model=d, n_latents=F))
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt = make_optimizer(list(m.parameters()), TrainConfig(lr=LR))

    def adam_clip():
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    return [(f"sparse BatchTopK k={k} (trainer)", train_step_fn(tk, lambda m_, x: kernels.training_step(m_, x, 0.0).loss,
                                                               x_BSD, LR)),
            ("Adam + clip only (fixed per step)", adam_clip)]


def bench_density(d: int, F: int, B: int, density: float, reps: int, label: str = "", topk_k: int = 0) -> list[dict]:
    """The four rows at one shape and density, with speed-ups over dense and reference L1 (and,
    with ``topk_k``, a BatchTopK step and the optimiser's fixed cost for the projection)."""
    S, K = 2, 2 * d
    torch.manual_seed(0)
    x_BSD = torch.randn(B, S, d)
    shape = f"d={d} F={F} B={B} {label or f'{100 * density:g}%'}"
    rows = [gemm_row(shape, B, K, F, reps)]
    gemm_flops = rows[0]["gflops"] * 1e9
    step_flops = 10 * B * K * F  # credited with the dense count, as in bench_train
    l0s, variants = _variants(lambda: l1_model_at_density(d, F, x_BSD, density), x_BSD)
    if topk_k:
        variants += _extra_variants(d, F, x_BSD, topk_k)
    times = best_times_interleaved(dict(variants), 1, reps)
    for name, t in times.items():
        rows.append({"shape": shape, "variant": name, "ms": t * 1e3, "tokens_per_s": B / t,
                     "gflops": step_flops / t / 1e9, "roofline_pct": 100 * step_flops / t / gemm_flops})
    by = {r["variant"]: r for r in rows}
    ref, dense = by["reference L1 (autograd, einsum)"], by["fused L1, dense path"]
    for r in rows[1:]:
        if r["variant"].startswith("Adam"):  # not a step: no throughput to compare
            r["tokens_per_s"] = r["gflops"] = float("nan")
            continue
        r["vs_reference_L1"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["vs_dense_L1"] = r["tokens_per_s"] / dense["tokens_per_s"]
    sparse = by["sparse L1 (trainer, auto path)"]
    sparse["l0"] = sum(l0s) / len(l0s)
    sparse["density_pct"] = 100 * sparse["l0"] / F
    return rows


def bench_crossover(d: int, F: int, B: int, densities: list[float], reps: int) -> list[dict]:
    """Both paths over a sweep of densities; the crossover is where their ratio crosses 1
    (interpolated linearly in log density between the two bracketing points)."""
    S = 2
    torch.manual_seed(0)
    x_BSD = torch.randn(B, S, d)
    rows = []
    for rho in densities:
        steps = {path: train_step_fn(l1_model_at_density(d, F, x_BSD, rho),
                                     lambda m, x, p=path: l1_step(m, x, LAMBDA, path=p).loss, x_BSD, LR)
                 for path in ("dense", "sparse")}
        t = best_times_interleaved(steps, 1, reps)
        rows.append({"shape": f"d={d} F={F} B={B}", "density_pct": 100 * rho, "dense_ms": 1e3 * t["dense"],
                     "sparse_ms": 1e3 * t["sparse"], "sparse_speedup": t["dense"] / t["sparse"]})
    cross = float("nan")
    for lo, hi in itertools.pairwise(rows):
        if lo["sparse_speedup"] >= 1 > hi["sparse_speedup"]:
            a, b = math.log(lo["density_pct"]), math.log(hi["density_pct"])
            ya, yb = math.log(lo["sparse_speedup"]), math.log(hi["sparse_speedup"])
            cross = math.exp(a + (b - a) * ya / (ya - yb)) / 100
            break
    for r in rows:
        r["crossover"] = cross
    return rows


def run(quick: bool = False) -> list[dict]:
    if quick:
        rows = bench_crossover(64, 512, 1024, [0.01, 0.1, 0.5], reps=1)
        rows += bench_density(64, 512, 1024, 0.01, reps=1)
        return rows
    rows = bench_crossover(256, 4096, 4096, CROSSOVER_SWEEP, reps=2)
    for rho in (0.01, 0.05):
        rows += bench_density(256, 4096, 4096, rho, reps=3)
    # Gemma-2-2B layer 13 at Kissane et al.'s trained L0 of about 80 (B = 1,024 to fit 24 GiB).
    rows += bench_density(2304, 16384, 1024, 80 / 16384, reps=2, label="L0~80", topk_k=100)
    return rows


def format_rows(rows: list[dict]) -> str:
    out = []
    cross = [r for r in rows if "sparse_speedup" in r]
    if cross:
        head = f"{'shape':<24} {'density %':>9} {'dense ms':>9} {'sparse ms':>9} {'x dense':>8}"
        out += ["crossover sweep (full training step, both paths forced)", head, "-" * len(head)]
        for r in cross:
            out.append(f"{r['shape']:<24} {r['density_pct']:>9.2f} {r['dense_ms']:>9.1f} {r['sparse_ms']:>9.1f} "
                       f"{r['sparse_speedup']:>8.2f}")
        c = cross[0]["crossover"]
        out.append(f"measured crossover: {100 * c:.1f}% active (kernels.L1_SPARSE_MAX_DENSITY['cpu'] = "
                   f"{100 * kernels.L1_SPARSE_MAX_DENSITY.get('cpu', float('nan')):.1f}%)\n")
    steps = [r for r in rows if "variant" in r]
    if steps:
        head = (f"{'shape':<30} {'variant':<32} {'ms/step':>9} {'tok/s':>9} {'GFLOP/s':>8} {'L0':>6} "
                f"{'x ref':>6} {'x denseL1':>9}")
        out += [head, "-" * len(head)]
        for r in steps:
            l0 = f"{r['l0']:>6.1f}" if "l0" in r else f"{'':>6}"
            out.append(
                f"{r['shape']:<30} {r['variant']:<32} {r['ms']:>9.1f} {r['tokens_per_s']:>9.0f} {r['gflops']:>8.1f} {l0} "
                f"{r.get('vs_reference_L1', float('nan')):>6.2f} {r.get('vs_dense_L1', float('nan')):>9.2f}")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke check, not a figure)")
    ap.add_argument("--only", choices=["crossover", "d256", "gemma"], help="one part of the benchmark")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.only == "crossover":
        rows = bench_crossover(256, 4096, 4096, CROSSOVER_SWEEP, reps=2)
    elif args.only == "d256":
        rows = bench_density(256, 4096, 4096, 0.01, reps=3) + bench_density(256, 4096, 4096, 0.05, reps=3)
    elif args.only == "gemma":
        rows = bench_density(2304, 16384, 1024, 80 / 16384, reps=2, label="L0~80", topk_k=100)
    else:
        rows = run(args.quick)
    print(format_rows(rows))
