"""AUROC of every latent against planted labels (``analysis.ground_truth.auroc``): the path that ranks
only the nonzero activations vs the dense ranking of every token, on the same inputs in the same
process. The shape is the default organism's evaluation set: 512 rows x 128 tokens (about 65k
tokens), 2,048 latents at the trained L0 of about 32 (1.6% density), four label sets (the model-diff
page's planted behaviours). Activation values are continuous, as a trained crosscoder's are.
"""

from __future__ import annotations

import torch
from crosscoder.analysis.ground_truth import auroc

from bench._timing import best_times_interleaved, main


def bench_shape(N: int, J: int, density: float, B: int = 4, reps: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(N, J, generator=g) * (torch.rand(N, J, generator=g) < density)
    lab = torch.rand(N, B, generator=g) < 0.1
    sparse, dense = auroc(s, lab, sparse=True), auroc(s, lab, sparse=False)
    err = float((sparse - dense).abs().max())
    t = best_times_interleaved({"dense": lambda: auroc(s, lab, sparse=False), "sparse": lambda: auroc(s, lab)}, reps=reps)
    shape = f"{N:,} tokens x {J:,} latents, density {density:.1%}"
    return [{"shape": shape, "variant": "dense ranks (baseline)", "s": t["dense"], "speedup": 1.0, "max_abs_diff": 0.0},
            {"shape": shape, "variant": "nonzeros only (auroc)", "s": t["sparse"], "speedup": t["dense"] / t["sparse"],
             "max_abs_diff": err}]


def run(quick: bool = False) -> list[dict]:
    if quick:
        return bench_shape(4096, 128, 0.016, reps=1)
    return bench_shape(512 * 128, 2048, 32 / 2048) + bench_shape(512 * 128, 2048, 0.1, reps=2)


def format_rows(rows: list[dict]) -> str:
    out = [f"{'shape':<44} {'variant':<24} {'seconds':>8} {'x dense':>8} {'max |diff|':>10}"]
    for r in rows:
        out.append(f"{r['shape']:<44} {r['variant']:<24} {r['s']:>8.2f} {r['speedup']:>8.1f} {r['max_abs_diff']:>10.1e}")
    return "\n".join(out)


if __name__ == "__main__":
    main(run, format_rows, __doc__)
