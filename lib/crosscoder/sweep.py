"""The sparsity-fidelity frontier: crosscoders over a range of lambda (L1) or k (BatchTopK), each with
one SAE per source (per model, or per layer for a cross-layer crosscoder) of the same total dictionary
size (F/S latents each), all trained in lockstep on one stream of batches (``train_many``) and
evaluated on held-out activations.

The SAE set's L0 is the sum of its SAEs' L0 (all are needed to reconstruct every source, as one
crosscoder does); BatchTopK SAEs get k/S each so the set's total budget matches the crosscoder's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from crosscoder.config import ConfigError, CrosscoderConfig, TrainConfig
from crosscoder.analysis.metrics import evaluate
from crosscoder.model import Crosscoder
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.train import BatchSource, train_many


def frontier(
    data: BatchSource,
    heldout_raw_NSD: Tensor,
    norm_raw_NSD: Tensor,
    base_cfg: CrosscoderConfig,
    tcfg: TrainConfig,
    values: list[float],
    out_root: str | Path,
    *,
    with_sae: bool = True,
    extra_eval: Callable[[str, Crosscoder, list[int] | None], dict[str, Any]] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Train one crosscoder (and an SAE pair) per value of lambda (``base_cfg.sparsity == "l1"``) or k
    (``"batchtopk"``) and return one row per trained dictionary.

    ``extra_eval(kind, model, sources)`` may add columns (e.g. CE recovered) for each model.
    """
    if not values:
        raise ConfigError("frontier needs at least one lambda / k value")
    topk = base_cfg.sparsity == "batchtopk"
    S = base_cfg.n_sources
    if with_sae and base_cfg.n_latents % S:
        raise ConfigError(f"n_latents must be divisible by {S}: each SAE baseline gets n_latents / {S}")
    out_root = Path(out_root)
    scale_S = estimate_input_scale(norm_raw_NSD)
    models, tcfgs, dirs, sources, meta = [], [], [], [], []
    for v in values:
        cc_cfg = dataclasses.replace(base_cfg, k=int(v)) if topk else base_cfg
        tc = tcfg if topk else dataclasses.replace(tcfg, l1_coeff=float(v))
        tag = f"k{int(v)}" if topk else f"lam{v:g}"
        cc = Crosscoder(cc_cfg, generator=torch.Generator().manual_seed(seed))
        cc.input_scale_S.copy_(scale_S)
        models.append(cc), tcfgs.append(tc), dirs.append(out_root / f"crosscoder-{tag}"), sources.append(None)
        meta.append(("crosscoder", v, None))
        if with_sae:
            for s, name in enumerate(base_cfg.source_names):
                # An SAE is a 1-source crosscoder; BatchTopK k halves so the pair's total matches.
                sae_cfg = dataclasses.replace(
                    cc_cfg, n_sources=1, n_latents=base_cfg.n_latents // S, source_names=(name,),
                    k=max(1, int(v) // S) if topk else cc_cfg.k,
                )
                sae = Crosscoder(sae_cfg, generator=torch.Generator().manual_seed(seed + 1 + s))
                sae.input_scale_S.copy_(scale_S[s : s + 1])
                models.append(sae), tcfgs.append(tc), dirs.append(out_root / f"sae-{name}-{tag}")
                sources.append([s]), meta.append(("sae", v, s))
    results = train_many(models, data, tcfgs, dirs, heldout_raw_NSD=heldout_raw_NSD, progress=progress,
                         sources=sources)
    rows: list[dict[str, Any]] = []
    by_value: dict[float, dict[str, Any]] = {}
    for (kind, v, s), res, src in zip(meta, results, sources):
        ho = heldout_raw_NSD if src is None else heldout_raw_NSD[:, src]
        ev = evaluate(res.model, ho)
        param = "k" if topk else "lambda"
        if kind == "crosscoder":
            row = {"kind": "crosscoder", param: v, "l0": ev.l0, "dead_frac": ev.dead_frac,
                   **{f"fvu_{n}": f for n, f in zip(base_cfg.source_names, ev.fvu_S)}}
            if extra_eval:
                row.update(extra_eval("crosscoder", res.model, None))
            rows.append(row)
        else:
            pair = by_value.setdefault(v, {"kind": "sae-pair", param: v, "l0": 0.0, "dead_frac": 0.0})
            name = base_cfg.source_names[s]
            pair["l0"] += ev.l0
            pair[f"l0_{name}"] = ev.l0
            pair[f"fvu_{name}"] = ev.fvu_S[0]
            pair["dead_frac"] += ev.dead_frac / S
            if extra_eval:
                pair.update({f"{k}": val for k, val in extra_eval("sae", res.model, [s]).items()})
            if s == S - 1:
                rows.append(pair)
    for r in rows:
        fvus = [r[f"fvu_{n}"] for n in base_cfg.source_names if f"fvu_{n}" in r]
        r["fvu_mean"] = sum(fvus) / len(fvus)
    return rows
