"""Model diffing of trained crosscoders: decoder-norm classes, Latent Scaling of the chat-only
latents, and (on the organism) their recovery of the planted behaviours."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from crosscoder.analysis.ground_truth import ground_truth_table
from crosscoder.analysis.latents import latent_acts
from crosscoder.analysis.metrics import DiffGeometry, class_counts, classify_latents, diff_geometry, evaluate
from crosscoder.analysis.scaling import LatentScaling, latent_scaling
from crosscoder.data.pair import ModelPair
from crosscoder.model import Crosscoder


class DiffInfo(NamedTuple):
    geo: DiffGeometry
    """Decoder norms, r, Δnorm and cosines per latent."""
    alive_F: Tensor
    """Latents active on at least one held-out token."""
    by_r: list[str]
    """Class of each latent by Kissane's relative norm r."""
    by_delta_norm: list[str]
    """Class of each latent by Minder's Δnorm."""


def diff_info(model: Crosscoder, heldout_raw_NSD: Tensor) -> DiffInfo:
    """Decoder geometry and both class schemes of a crosscoder's live latents (held-out data)."""
    alive = evaluate(model, heldout_raw_NSD).freq_F > 0
    geo = diff_geometry(model)
    return DiffInfo(geo, alive, classify_latents(geo.rel_norm_F, "kissane", alive),
                    classify_latents(geo.delta_norm_F, "minder", alive))


def in_class(classes: list[str], name: str) -> Tensor:
    """Indices of the latents labelled ``name``."""
    return torch.tensor([j for j, c in enumerate(classes) if c == name], dtype=torch.long)


def class_count_table(infos: dict[str, DiffInfo]) -> dict[tuple[str, str], dict[str, int]]:
    """{(crosscoder, scheme): {class: count}} for both schemes of every crosscoder."""
    return {(name, scheme): class_counts(labels) for name, i in infos.items()
            for scheme, labels in (("r", i.by_r), ("Δnorm", i.by_delta_norm))}


class ScalingSummary(NamedTuple):
    scaling: LatentScaling
    """Latent Scaling of the chat-only latents active on enough tokens."""
    row: dict[str, Any]
    """Counts and medians for the summary table (and metrics.json)."""


def chat_only_scaling(name: str, model: Crosscoder, info: DiffInfo, heldout_raw_NSD: Tensor, *,
                      nu_threshold: float, min_active_tokens: int) -> ScalingSummary:
    """Latent Scaling of a crosscoder's chat-only latents (Δnorm > 0.9), those active on fewer than
    ``min_active_tokens`` held-out tokens dropped (their betas are noise); "truly chat-specific"
    means both ν^ε and ν^r below ``nu_threshold``."""
    chat_only = in_class(info.by_delta_norm, "chat-only")
    ls = latent_scaling(model, heldout_raw_NSD, chat_only)
    keep = ls.n_active >= min_active_tokens
    ls = ls._replace(**{f: getattr(ls, f)[keep] for f in ls._fields})
    specific = (ls.nu_error < nu_threshold) & (ls.nu_recon < nu_threshold)
    fitted = len(ls.latents) > 0
    row = {"crosscoder": name, "chat-only (Δnorm)": int(len(chat_only)), "fitted": int(keep.sum()),
           "truly chat-specific": int(specific.sum()),
           "median ν^ε": float(ls.nu_error.median()) if fitted else float("nan"),
           "median ν^r": float(ls.nu_recon.median()) if fitted else float("nan")}
    return ScalingSummary(ls, row)


def behaviour_recovery(model: Crosscoder, pair: ModelPair, eval_set, candidates: Tensor,
                       behaviours: list[str], classes: list[str] | None = None
                       ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """AUROC of ``candidates`` against each planted behaviour on the organism's evaluation set
    (rows per behaviour, summary); with ``classes``, each row names its best latent's class."""
    f = latent_acts(model, pair, eval_set.input_ids_NT, eval_set.attention_mask_NT, candidates)
    rows, summary, _ = ground_truth_table(f, eval_set, candidates, behaviours)
    if classes is not None:
        rows = [dict(r, best_latent_class=classes[r["best_latent"]] if r["best_latent"] >= 0 else "")
                for r in rows]
    return rows, summary


def record_recovery(models: dict[str, Crosscoder], infos: dict[str, DiffInfo], pair: ModelPair, eval_set,
                    behaviours: list[str], scaling_rows: dict[str, dict[str, Any]], artifacts_dir: str
                    ) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """``behaviour_recovery`` of every crosscoder's chat-only latents, written with its Latent Scaling
    row into the crosscoder's metrics.json; returns all rows (tagged by crosscoder) and summaries."""
    from crosscoder.checkpoint import update_metrics

    all_rows, summaries = [], {}
    for name, m in models.items():
        rows, summaries[name] = behaviour_recovery(m, pair, eval_set, in_class(infos[name].by_delta_norm, "chat-only"),
                                                   behaviours)
        all_rows += [dict(r, crosscoder=name) for r in rows]
        update_metrics(f"{artifacts_dir}/{name}/crosscoder",
                       {"ground_truth": {"rows": rows, **summaries[name]}, "latent_scaling": scaling_rows[name]})
    return all_rows, summaries
