"""Time to quality: an L1 and a BatchTopK crosscoder trained by the real trainer on the same
activations until the held-out FVU reaches one target, wall time of the training steps for each.

The L1 run is timed twice, with the trainer's step (sparse below ``L1_SPARSE_MAX_DENSITY``) and
with the dense-only step (the baseline: the switch disabled), same seed, same batches. The data is a
planted dictionary from ``crosscoder.synthetic`` (self-contained, offline). Held-out evaluation
runs every ``EVAL_EVERY`` steps and is not timed; the L1 target counts only once lambda has warmed
up (before that the dense initial latents reconstruct well at an L0 in the hundreds).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from unittest import mock

import torch
from crosscoder import kernels
from crosscoder.analysis.metrics import evaluate
from crosscoder.config import CrosscoderConfig, TrainConfig
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.model import Crosscoder
from crosscoder.synthetic import SyntheticConfig, sample
from crosscoder.train import TensorBatches, Trainer

from bench._timing import main

warnings.filterwarnings("ignore", message=".*Sparse.*")

EVAL_EVERY = 25


def _fvu(m: Crosscoder, heldout_NSD: torch.Tensor) -> float:
    """Mean FVU over the two sources (held out)."""
    return sum(evaluate(m, heldout_NSD).fvu_S) / 2


class _Run:
    """One crosscoder in the race: its trainer, the wall time of its steps, where it stands."""

    def __init__(self, cfg: CrosscoderConfig, tcfg: TrainConfig, scale_S, out: str, dense_only: bool = False):
        self.model = Crosscoder(cfg, generator=torch.Generator().manual_seed(tcfg.seed))
        self.model.input_scale_S.copy_(scale_S)
        self.trainer = Trainer(self.model, tcfg, out, resume=False)
        self.tcfg, self.dense_only = tcfg, dense_only
        self.wall, self.fvu, self.steps, self.reached = 0.0, float("nan"), 0, False

    def step(self, raw: torch.Tensor, heldout_NSD: torch.Tensor, target: float) -> None:
        switch = {"cpu": -1.0} if self.dense_only else {}  # -1: the sparse path never taken
        with mock.patch.dict(kernels.L1_SPARSE_MAX_DENSITY, switch):
            t = time.perf_counter()
            self.trainer.step(raw)
            self.wall += time.perf_counter() - t
        self.steps += 1
        if self.steps % EVAL_EVERY == 0 and self.steps >= self.tcfg.n_steps * self.tcfg.l1_warmup_frac:
            self.fvu = _fvu(self.model, heldout_NSD)
            self.reached = self.fvu <= target


def race(runs: dict[str, _Run], acts_NSD, heldout_NSD, target: float) -> None:
    """Step every run on the same batches in turn (a burst of outside load hits them alike) until
    each reaches ``target`` or its n_steps."""
    B = next(iter(runs.values())).tcfg.batch_size
    for raw in TensorBatches(acts_NSD, B).batches(0):
        live = [r for r in runs.values() if not r.reached and r.steps < r.tcfg.n_steps]
        if not live:
            return
        for r in live:
            r.step(raw, heldout_NSD, target)


def run(quick: bool = False) -> list[dict]:
    if quick:
        sc = SyntheticConfig(d_model=32, n_shared=48, n_base_only=8, n_chat_only=8, p_active=0.04)
        F, B, n_steps, n_train, target = 256, 256, 100, 16384, 0.3
    else:
        # 256 planted atoms in 2 x 64 dims, ~5 active per token; F = 2,048 latents. The trained
        # L1 crosscoder sits at 2-3% density, below the crossover, after its first ~100 steps.
        sc = SyntheticConfig(d_model=64, n_shared=192, n_base_only=32, n_chat_only=32, p_active=0.02)
        F, B, n_steps, n_train, target = 2048, 1024, 1500, 131072, 0.115
    acts, held = sample(sc, n_train).acts_NSD, sample(sc, 4096, seed_offset=1).acts_NSD
    scale_S = estimate_input_scale(sample(sc, 4096, seed_offset=2).acts_NSD)
    l1_cfg = CrosscoderConfig(d_model=sc.d_model, n_latents=F, sparsity="l1")
    tk_cfg = CrosscoderConfig(d_model=sc.d_model, n_latents=F, sparsity="batchtopk", k=8)
    l1_tc = TrainConfig(n_steps=n_steps, batch_size=B, lr=3e-3, l1_coeff=1.5, log_every=10**6, eval_every=10**6)
    tk_tc = TrainConfig(n_steps=n_steps, batch_size=B, lr=3e-3, log_every=10**6, eval_every=10**6)
    shape = f"d={sc.d_model} F={F} B={B}, FVU<={target}"
    with tempfile.TemporaryDirectory() as out:
        runs = {
            "L1, dense-only step (baseline)": _Run(l1_cfg, l1_tc, scale_S, f"{out}/a", dense_only=True),
            "L1, trainer's step (sparse below crossover)": _Run(l1_cfg, l1_tc, scale_S, f"{out}/b"),
            "BatchTopK k=8, trainer's step": _Run(tk_cfg, tk_tc, scale_S, f"{out}/c"),
        }
        race(runs, acts, held, target)
    base = runs["L1, dense-only step (baseline)"].wall
    rows = []
    for name, r in runs.items():
        rows.append({"shape": shape, "variant": name, "steps": r.steps, "wall_s": r.wall, "fvu": r.fvu,
                     "reached": r.reached, "l0": evaluate(r.model, held).l0, "ms_per_step": 1e3 * r.wall / r.steps,
                     "speedup": base / r.wall})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'shape':<32} {'variant':<52} {'steps':>6} {'wall s':>8} {'ms/step':>8} {'FVU':>6} {'L0':>6} {'x base':>7}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['shape']:<32} {r['variant']:<52} {r['steps']:>6} {r['wall_s']:>8.1f} {r['ms_per_step']:>8.1f} "
                   f"{r['fvu']:>6.3f} {r['l0']:>6.1f} {r['speedup']:>7.2f}" + ("" if r["reached"] else "  (target not reached)"))
    return "\n".join(out)


if __name__ == "__main__":
    main(run, format_rows, __doc__)
