"""The BatchTopK step's sparse encoder gradient, three ways, timed in turns in one process (issue #25).

The encoder gradient of the sparse step is x^T @ G [K, F] for G the [B, F] pre-activation gradient
at the k*B active entries (``kernels._sparse_dW_enc``). W_enc's layout is [K, F], the CPU sparse
kernel's natural output [F, K]:

* row-major + copy: the sparse product G^T @ x into an [F, K] buffer, then one copy into [K, F]
  (what the step runs).
* column-major into [K, F]: the product written straight into W_enc's layout (e0f528d to 6e3463d):
  5-6x slower at these shapes, which cost the whole step 16-24%.
* torch.sparse.mm + autograd's copy: a fresh zero-filled result, returned transposed (aca0440).

Beside them, the full BatchTopK crosscoder step (fused loss, backward, clip, the trainer's Adam) at
the same shape, so the share of the step is visible.

Then the whole step with AuxK at the gemma3 profile's shape (d 640, F 4,096, k 32, ~60% of latents dead,
k_aux 320): float32, where AuxK is sparse products over the selected entries, against bfloat16 GEMMs,
where AuxK is dense products over the dead latents (``kernels.auxk_loss``), and against no AuxK.
"""

from __future__ import annotations

import warnings

import torch

from bench._timing import best_times_interleaved, main
from bench.bench_methods import _method_step, _step_fn
from crosscoder import methods
from crosscoder.config import CrosscoderConfig
from crosscoder.kernels import _Active, _sparse_dW_enc, select_batch_topk
from crosscoder.model import Crosscoder

warnings.filterwarnings("ignore", message=".*Sparse.*")


def bench_shape(d: int, F: int, B: int, k: int, reps: int = 5) -> list[dict]:
    K = 2 * d
    torch.manual_seed(0)
    x_BK = torch.randn(B, K)
    idx_N = select_batch_topk(torch.randn(B, F).relu_(), k * B)
    act = _Active.index(idx_N // F, idx_N % F, B, F)
    g_N = torch.randn(idx_N.numel())
    out_KF = torch.empty(K, F)

    def column_major():
        out_KF.t().addmm_(act.csr_t(g_N), x_BK, beta=0.0)
        return out_KF

    fns = {
        "row-major + copy (the step)": lambda: _sparse_dW_enc(act, g_N, x_BK)[0],
        "column-major into [K,F]": column_major,
        "sparse.mm + copy (aca0440)": lambda: torch.sparse.mm(act.csr_t(g_N), x_BK).t().contiguous(),
        "full BatchTopK step": _method_step("crosscoder_batchtopk",
                                            methods.get("crosscoder_batchtopk").Config(n_latents=F, k=k), d,
                                            x_BK.view(B, 2, d)),
    }
    ref = fns["row-major + copy (the step)"]()
    for name in ("column-major into [K,F]", "sparse.mm + copy (aca0440)"):
        torch.testing.assert_close(fns[name](), ref, rtol=1e-4, atol=1e-4, msg=name)
    t = best_times_interleaved(fns, warmup=1, reps=reps)
    base = t["row-major + copy (the step)"]
    return [{"shape": f"d={d} F={F} B={B} k={k}", "variant": name, "ms": s * 1e3, "vs_step_path": s / base,
             "tokens_per_s": B / s if name == "full BatchTopK step" else float("nan")} for name, s in t.items()]


def bench_auxk(d: int, F: int, B: int, k: int, dead_frac: float, reps: int = 5) -> list[dict]:
    """The whole BatchTopK training step (the trainer's fused Adam, clip) with AuxK over a fixed set
    of dead latents, its GEMMs in float32 (AuxK as sparse products over the B * k_aux selected
    entries) and in bfloat16 (the encoder, and AuxK as dense products over the dead latents), and
    without AuxK, from the same weights and batch."""
    torch.manual_seed(0)
    x = torch.randn(B, 2, d)
    dead_F = torch.rand(F, generator=torch.Generator().manual_seed(1)) < dead_frac

    def step_fn(gemm_dtype, aux):
        model = Crosscoder(CrosscoderConfig(d_model=d, n_latents=F, sparsity="batchtopk", k=k),
                           generator=torch.Generator().manual_seed(0))
        return _step_fn(model, x, lam=0.0, dead_F=dead_F if aux else None, k_aux=d // 2,
                        auxk_alpha=1 / 32 if aux else 0.0, gemm_dtype=gemm_dtype)

    fns = {"AuxK, float32 (sparse AuxK)": step_fn(torch.float32, True),
           "AuxK, bfloat16 GEMMs (dense AuxK)": step_fn(torch.bfloat16, True),
           "no AuxK, float32": step_fn(torch.float32, False)}
    t = best_times_interleaved(fns, warmup=1, reps=reps)
    base = t["AuxK, float32 (sparse AuxK)"]
    shape = f"d={d} F={F} B={B} k={k} dead={dead_frac:.0%} k_aux={d // 2}"
    return [{"shape": shape, "variant": name, "ms": s * 1e3, "vs_step_path": s / base, "tokens_per_s": B / s}
            for name, s in t.items()]


def run(quick: bool = False) -> list[dict]:
    shapes = [(64, 512, 1024, 16)] if quick else [(128, 2048, 4096, 32), (256, 4096, 4096, 100)]
    rows: list[dict] = []
    for d, F, B, k in shapes:
        rows += bench_shape(d, F, B, k, reps=2 if quick else 5)
    # the gemma3 profile's BatchTopK crosscoder: d 640, 4,096 latents, k 32, batch 1,024, ~60% dead late in training
    rows += bench_auxk(64, 512, 256, 16, 0.6, reps=2) if quick else bench_auxk(640, 4096, 1024, 32, 0.6)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'shape':<46} {'variant':<36} {'ms':>8} {'x first row':>12} {'tok/s':>9}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['shape']:<46} {r['variant']:<36} {r['ms']:>8.2f} {r['vs_step_path']:>12.2f} "
                   f"{r['tokens_per_s']:>9.0f}")
    return "\n".join(out)


if __name__ == "__main__":
    main(run, format_rows, __doc__)
