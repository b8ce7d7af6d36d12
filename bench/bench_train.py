"""Training-step throughput of the crosscoder vs a plain GEMM of the same shapes (same process).

FLOP convention: a dense step is 5 GEMMs of B x K x F (encode, decode, dW_dec, dL/df, dW_enc;
K = S * d), i.e. 10 * B * K * F FLOP; "roofline %" = achieved FLOP/s of the step / FLOP/s of one plain
[B, K] @ [K, F] GEMM. The BatchTopK step is credited with the same dense FLOP count, so its
"roofline %" above 100 shows the work it skips by staying sparse.

Rows:
* reference L1: the readable autograd loss (einsum per source, as in the public replications).
* fused L1: ``crosscoder.kernels.l1_step`` (what the trainer runs).
* dense BatchTopK: autograd through a dense top-k mask and dense decode.
* sparse BatchTopK: ``crosscoder.kernels.batchtopk_step`` (what the trainer runs).
* sparse BatchTopK + AuxK: the same with half the latents dead, so the AuxK loss (a dense encode
  and decode over the dead latents) runs too: what the trainer pays while latents are dead.
* bf16 GEMMs (``TrainConfig.bf16_autocast``): the trainer's fused L1 (dense path), sparse BatchTopK
  and BatchTopK + AuxK steps with ``gemm_dtype`` float32 and bfloat16, timed in turns in one process at
  the real-LM profile's shape (d 640 x 2, F 4,096, B 1,024, k 32); only on a CPU with bf16 arithmetic
  (elsewhere torch emulates it and the comparison says nothing about the setting "auto" would pick).
Each step includes backward, grad-norm clipping and the Adam update.
"""

from __future__ import annotations

import warnings

import torch
from crosscoder.config import CrosscoderConfig, TrainConfig
from crosscoder.kernels import training_step
from crosscoder.model import Crosscoder
from crosscoder.train import make_optimizer

from bench._timing import best_time, best_times_interleaved, main

warnings.filterwarnings("ignore", message=".*Sparse.*")


def _reference_l1_loss(m: Crosscoder, x_BSD: torch.Tensor, lam: float) -> torch.Tensor:
    # The formulation of the public replication: einsum encode/decode, autograd everything.
    f = torch.relu(torch.einsum("bsd,sdf->bf", x_BSD, m.W_enc_SDF) + m.b_enc_F)
    recon = torch.einsum("bf,fsd->bsd", f, m.W_dec_FSD) + m.b_dec_SD
    l2 = (recon - x_BSD).pow(2).sum(dim=(1, 2)).mean()
    l1 = (f * m.W_dec_FSD.norm(dim=-1).sum(-1)).sum(-1).mean()
    return l2 + lam * l1


def train_step_fn(m: Crosscoder, loss_fn, x_BSD: torch.Tensor, lr: float = 1e-4):
    """One full training step of ``m`` on ``x_BSD`` as the trainer runs it: loss, backward,
    grad-norm clip, the trainer's Adam."""
    opt = make_optimizer(list(m.parameters()), TrainConfig(lr=lr))

    def step():
        loss = loss_fn(m, x_BSD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    return step


def gemm_row(shape: str, B: int, K: int, F: int, reps: int) -> dict:
    """The roofline: one plain [B, K] @ [K, F] GEMM, timed in the calling process."""
    a, w = torch.randn(B, K), torch.randn(K, F) / K**0.5
    t = best_time(lambda: a @ w, 1, reps + 2)
    return {"shape": shape, "variant": "plain GEMM [B,K]@[K,F]", "ms": t * 1e3, "tokens_per_s": float("nan"),
            "gflops": 2 * B * K * F / t / 1e9, "roofline_pct": 100.0}


def bench_shape(d: int, F: int, B: int, k: int, reps: int = 3) -> list[dict]:
    S, K = 2, 2 * d
    torch.manual_seed(0)
    x = torch.randn(B, S, d)
    rows = [gemm_row(f"d={d} F={F} B={B}", B, K, F, reps)]
    gemm_flops = rows[0]["gflops"] * 1e9
    step_flops = 5 * 2 * B * K * F

    def make_step(sparsity: str, loss_fn):
        m = Crosscoder(CrosscoderConfig(d_model=d, n_latents=F, sparsity=sparsity, k=k))
        with torch.no_grad():
            m.b_enc_F.fill_(-0.02)  # a realistic L1 regime (about a third of latents active at init)
        return train_step_fn(m, loss_fn, x)

    half_dead_F = torch.arange(F) % 2 == 1

    def dense_topk_loss(m, x_BSD):
        f = m.encode(x_BSD, use_threshold=False)
        return (m.decode(f) - x_BSD).pow(2).sum(dim=(1, 2)).mean()

    variants = [
        ("reference L1 (autograd, einsum)", make_step("l1", lambda m, x_: _reference_l1_loss(m, x_, 2.0))),
        ("fused L1 (trainer)", make_step("l1", lambda m, x_: training_step(m, x_, 2.0).loss)),
        (f"dense BatchTopK k={k} (autograd)", make_step("batchtopk", dense_topk_loss)),
        (f"sparse BatchTopK k={k} (trainer)", make_step("batchtopk", lambda m, x_: training_step(m, x_, 0.0).loss)),
        ("  + AuxK, half the latents dead", make_step("batchtopk", lambda m, x_: training_step(
            m, x_, 0.0, dead_F=half_dead_F, auxk_alpha=1 / 32).loss)),
    ]
    for name, fn in variants:
        t = best_time(fn, 1, reps)
        rows.append({"shape": f"d={d} F={F} B={B}", "variant": name, "ms": t * 1e3, "tokens_per_s": B / t,
                     "gflops": step_flops / t / 1e9, "roofline_pct": 100 * step_flops / t / gemm_flops})
    by = {r["variant"]: r for r in rows}
    ref, fused = by["reference L1 (autograd, einsum)"], by["fused L1 (trainer)"]
    sparse = by[f"sparse BatchTopK k={k} (trainer)"]
    for r in rows[1:]:
        r["vs_reference_L1"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["vs_fused_L1"] = r["tokens_per_s"] / fused["tokens_per_s"]
    sparse["note"] = "target >= 2.5x fused L1"
    fused["note"] = "target >= 80% roofline"
    return rows


def bf16_rows(d: int, F: int, B: int, k: int, reps: int = 5) -> list[dict]:
    """The trainer's steps with float32 and with bfloat16 GEMMs, in turns; "x fusedL1" holds the
    float32 time over the bfloat16 time of the same step (the speed-up)."""
    from crosscoder.organism.training import cpu_has_bf16  # (loads transformers: only here)

    shape = f"d={d} F={F} B={B}"
    if not cpu_has_bf16():
        return [{"shape": shape, "variant": "bf16 GEMMs: skipped (no bf16 in this CPU)", "ms": float("nan"),
                 "tokens_per_s": float("nan"), "gflops": float("nan"), "roofline_pct": float("nan")}]
    torch.manual_seed(0)
    x = torch.randn(B, 2, d)
    half_dead_F = torch.arange(F) % 2 == 1
    steps = {"fused L1, dense": lambda m, x_, dt: training_step(m, x_, 2.0, gemm_dtype=dt).loss,
             f"sparse BatchTopK k={k}": lambda m, x_, dt: training_step(m, x_, 0.0, gemm_dtype=dt).loss,
             "  + AuxK, half dead": lambda m, x_, dt: training_step(m, x_, 0.0, dead_F=half_dead_F,
                                                                     auxk_alpha=1 / 32, gemm_dtype=dt).loss}
    fns = {}
    for name, loss in steps.items():
        for dt in (torch.float32, torch.bfloat16):
            m = Crosscoder(CrosscoderConfig(d_model=d, n_latents=F, sparsity="l1" if "L1" in name else "batchtopk",
                                            k=k))
            with torch.no_grad():
                m.b_enc_F.fill_(-0.02)  # as bench_shape: dense L1 regime (the profile's L1 runs keep 12-46% active)
            fns[(name, dt)] = train_step_fn(m, lambda m_, x_, f=loss, dt=dt: f(m_, x_, dt), x)
    t = best_times_interleaved(fns, warmup=1, reps=reps)
    rows = []
    for (name, dt), sec in t.items():
        lp = dt == torch.bfloat16
        rows.append({"shape": shape, "variant": f"{name} ({'bf16' if lp else 'fp32'} GEMMs)", "ms": sec * 1e3,
                     "tokens_per_s": B / sec, "gflops": float("nan"), "roofline_pct": float("nan"),
                     **({"vs_fused_L1": t[(name, torch.float32)] / sec, "note": "x = fp32 time / bf16 time"}
                        if lp else {})})
    return rows


def run(quick: bool = False) -> list[dict]:
    shapes = [(64, 512, 1024, 16)] if quick else [(256, 4096, 4096, 100), (512, 8192, 4096, 100)]
    rows: list[dict] = []
    for d, F, B, k in shapes:
        rows += bench_shape(d, F, B, k, reps=2 if quick else 3)
    rows += bf16_rows(64, 512, 1024, 16, reps=2) if quick else bf16_rows(640, 4096, 1024, 32)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'shape':<22} {'variant':<34} {'ms/step':>9} {'tok/s':>9} {'GFLOP/s':>8} {'roofl%':>7} {'x ref':>6} {'x fusedL1':>9}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['shape']:<22} {r['variant']:<34} {r['ms']:>9.1f} {r['tokens_per_s']:>9.0f} {r['gflops']:>8.1f} "
            f"{r['roofline_pct']:>7.1f} {r.get('vs_reference_L1', float('nan')):>6.2f} {r.get('vs_fused_L1', float('nan')):>9.2f}"
            + (f"  <- {r['note']}" if "note" in r else "")
        )
    return "\n".join(out)


if __name__ == "__main__":
    main(run, format_rows, __doc__)
