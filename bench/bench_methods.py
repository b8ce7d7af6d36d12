"""Training-step throughput of each model-diffing method (``crosscoder.methods``) beside the plain BatchTopK
crosscoder step at the same shape, timed in turns in one process (``best_times_interleaved``), so a burst
of outside load hits every row alike and the "x BatchTopK" ratios stay meaningful.

A step is what ``crosscoder.train.Trainer.step`` runs per batch, minus logging: the fused loss
(``kernels.training_step``), backward, the method's gradient projection (``Constraint``), grad-norm
clipping, the trainer's Adam, the method's weight projection. Every dictionary has the same F latents
(the diff-SAE too, though its default is 4 x d), so the rows differ only in what the method adds:

* BatchTopK crosscoder: the reference.
* L1 crosscoder: the fused L1 step (dense or sparse by density; at initialisation about a third of the
  latents fire, as in bench_train.py).
* designated-shared (L1 / BatchTopK): a per-latent cost multiplier in the penalty or the ranking, and
  the tied rows' gradient sum and copy.
* DFC: the BatchTopK step plus zeroing the exclusive blocks' gradients and weights.
* diff-SAE: a one-source BatchTopK step on chat - base (half the encoder's input width).
* ADL: no training; its one pass of per-position means, in tokens/s.
"""

from __future__ import annotations

import warnings

import torch

from bench._timing import best_times_interleaved, main
from crosscoder import methods
from crosscoder.config import TrainConfig
from crosscoder.kernels import training_step
from crosscoder.methods.adl import mean_differences
from crosscoder.methods.diff_sae import differences
from crosscoder.model import Crosscoder
from crosscoder.train import make_optimizer

warnings.filterwarnings("ignore", message=".*Sparse.*")

LAMBDA = 2.0


def _step_fn(model: Crosscoder, x_BSD: torch.Tensor, constraint=None, lam: float = LAMBDA, **step_kw):
    """One trainer step of ``model`` on ``x_BSD`` with the method's ``constraint`` hooks (``step_kw``:
    ``training_step``'s dead latents, AuxK and GEMM dtype)."""
    params = list(model.parameters())
    opt = make_optimizer(params, TrainConfig(lr=1e-4))
    if constraint is not None:
        with torch.no_grad():
            constraint.project_weights_(model)

    def step():
        loss = training_step(model, x_BSD, lam, **step_kw).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if constraint is not None:
            with torch.no_grad():
                constraint.project_grads_(model)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if constraint is not None:
            with torch.no_grad():
                constraint.project_weights_(model)

    return step


def _method_step(name: str, cfg, d: int, x_BSD: torch.Tensor):
    """The training step of crosscoder method ``name`` with ``cfg``, built as its ``fit`` builds the model."""
    cls = methods.get(name)
    model = Crosscoder(cls.crosscoder_config(cfg, d), generator=torch.Generator().manual_seed(0))
    cls.prepare(cfg, model)
    if model.cfg.sparsity == "l1":
        with torch.no_grad():
            model.b_enc_F.fill_(-0.02)  # a realistic L1 regime (about a third of latents active at init)
    return _step_fn(model, x_BSD, cls.constraint(cfg, model.cfg.n_latents))


def bench_shape(d: int, F: int, B: int, k: int, reps: int = 3) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(B, 2, d)
    C = {n: methods.get(n).Config for n in methods.names()}
    steps = {
        "crosscoder_batchtopk": _method_step("crosscoder_batchtopk", C["crosscoder_batchtopk"](n_latents=F, k=k), d, x),
        "crosscoder_l1": _method_step("crosscoder_l1", C["crosscoder_l1"](n_latents=F), d, x),
        "designated_shared (L1)": _method_step("designated_shared", C["designated_shared"](n_latents=F, k=k), d, x),
        "designated_shared (BatchTopK)": _method_step(
            "designated_shared", C["designated_shared"](n_latents=F, k=k, sparsity="batchtopk"), d, x),
        "dfc": _method_step("dfc", C["dfc"](n_latents=F, k=k), d, x),
        "diff_sae": _method_step("diff_sae", C["diff_sae"](n_latents=F, k=k), d, differences(x)),
        "adl (per-position means)": lambda: mean_differences(x, torch.arange(B) % 8, (1, 2, 3, 4, 5)),
    }
    t = best_times_interleaved(steps, warmup=1, reps=reps)
    ref = B / t["crosscoder_batchtopk"]
    return [{"shape": f"d={d} F={F} B={B} k={k}", "method": name, "ms": s * 1e3, "tokens_per_s": B / s,
             "vs_batchtopk": B / s / ref} for name, s in t.items()]


def run(quick: bool = False) -> list[dict]:
    # the two shapes (#25, "Speed"): d 128 / F 2,048 / k 32 and d 256 / F 4,096 / k 100, batch 4,096
    shapes = [(64, 512, 1024, 16)] if quick else [(128, 2048, 4096, 32), (256, 4096, 4096, 100)]
    rows: list[dict] = []
    for d, F, B, k in shapes:
        rows += bench_shape(d, F, B, k, reps=2 if quick else 3)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'shape':<28} {'method':<30} {'ms/step':>9} {'tok/s':>10} {'x BatchTopK':>12}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['shape']:<28} {r['method']:<30} {r['ms']:>9.1f} {r['tokens_per_s']:>10.0f} "
                   f"{r['vs_batchtopk']:>12.2f}")
    return "\n".join(out)


if __name__ == "__main__":
    main(run, format_rows, __doc__)
