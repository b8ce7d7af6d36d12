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
"""

from __future__ import annotations

import warnings

import torch

from bench._timing import best_times_interleaved, main
from bench.bench_methods import _method_step
from crosscoder import methods
from crosscoder.kernels import _Active, _sparse_dW_enc, select_batch_topk

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


def run(quick: bool = False) -> list[dict]:
    shapes = [(64, 512, 1024, 16)] if quick else [(128, 2048, 4096, 32), (256, 4096, 4096, 100)]
    rows: list[dict] = []
    for d, F, B, k in shapes:
        rows += bench_shape(d, F, B, k, reps=2 if quick else 5)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'shape':<28} {'encoder gradient':<30} {'ms':>8} {'x the step path':>16} {'tok/s':>9}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['shape']:<28} {r['variant']:<30} {r['ms']:>8.2f} {r['vs_step_path']:>16.2f} "
                   f"{r['tokens_per_s']:>9.0f}")
    return "\n".join(out)


if __name__ == "__main__":
    main(run, format_rows, __doc__)
