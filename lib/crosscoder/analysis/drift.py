"""How far fine-tuning moved the residual stream the crosscoder reads: per held-out token, the drift
||h_chat - h_base|| / ||h_base|| and the cosine of h_chat and h_base, summarised separately for plain
text and chat conversations. A narrow fine-tune (a real chat tune that keeps the base's knowledge)
moves text tokens little; the toy organism's fine-tune moves almost everything.

Read from an activation cache's held-out split (BOS excluded there), so it costs no forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crosscoder.data.cache import ActivationCache

def drift_rows(acts_NSD: Tensor, is_chat_N: Tensor, mean_SD: Tensor | None = None) -> list[dict[str, Any]]:
    """One row per token kind ("text", "chat", then "all") of held-out activations ``acts_NSD``
    (source 0 the base model, source 1 the chat model) whose tokens come from chat conversations
    where ``is_chat_N``: the number of tokens, the median and 90th percentile of the relative drift
    ||h_chat - h_base|| / ||h_base||, and the median cosine. A kind with no tokens is left out.

    ``mean_SD`` (each model's mean activation, e.g. over the norm split) adds "median drift
    (centred)": the same difference over ||h_base - mean_base||. Where one direction carries most of
    the residual's norm (gemma-3-270m after block 9: the mean is 99% of it) the plain ratio
    measures the drift against that constant and looks small; against the token-varying part it
    does not (there, 7% of the norm is 33% of the centred norm)."""
    if acts_NSD.ndim != 3 or acts_NSD.shape[1] != 2:
        raise ValueError(f"acts_NSD must be [N, 2, D] (base, chat), got {tuple(acts_NSD.shape)}")
    if is_chat_N.shape != acts_NSD.shape[:1]:
        raise ValueError(f"is_chat_N must be [{acts_NSD.shape[0]}], got {tuple(is_chat_N.shape)}")
    h0, h1 = acts_NSD[:, 0].float(), acts_NSD[:, 1].float()
    if mean_SD is not None and tuple(mean_SD.shape) != (2, acts_NSD.shape[-1]):
        raise ValueError(f"mean_SD must be [2, {acts_NSD.shape[-1]}] (base, chat), got {tuple(mean_SD.shape)}")
    diff_N = (h1 - h0).norm(dim=-1)
    rel_N = diff_N / h0.norm(dim=-1)
    cen_N = diff_N / (h0 - mean_SD[0].float()).norm(dim=-1) if mean_SD is not None else None
    cos_N = torch.nn.functional.cosine_similarity(h0, h1, dim=-1)
    rows = []
    for kind, keep in (("text", ~is_chat_N), ("chat", is_chat_N), ("all", torch.ones_like(is_chat_N))):
        if keep.any():
            row = {"kind": kind, "tokens": int(keep.sum()), "median drift": rel_N[keep].median().item(),
                   "p90 drift": rel_N[keep].quantile(0.9).item(), "median cosine": cos_N[keep].median().item()}
            if cen_N is not None:
                row["median drift (centred)"] = cen_N[keep].median().item()
            rows.append(row)
    return rows


def cache_drift(cache: ActivationCache) -> list[dict[str, Any]]:
    """``drift_rows`` of a two-model cache's held-out split, each token labelled by its sequence, with
    the centred column against the norm split's mean of each model."""
    acts_NSD, _, seq_N, _ = cache.load("heldout", with_index=True)
    mean_SD = cache.load("norm").float().mean(0)
    return drift_rows(acts_NSD, cache.heldout_sequences().is_chat_N[seq_N.long()], mean_SD)


METRICS_FOLDER = "activations"
"""The folder under a profile's artifacts_dir whose metrics.json holds its pair's drift."""


def write_metrics(artifacts_dir: str | Path, layer: int, rows: list[dict[str, Any]]) -> None:
    """Record a pair's drift rows (read after block ``layer``) in ``<artifacts_dir>/activations/
    metrics.json``, where another profile's page finds them (``reference``)."""
    from crosscoder.checkpoint import update_metrics

    folder = Path(artifacts_dir) / METRICS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    update_metrics(folder, {"drift": {"layer": layer, "rows": rows}})


def reference(reference_dir: str | Path) -> tuple[int, list[dict[str, Any]]] | None:
    """Another profile's drift ``(layer, drift_rows)`` as its models page recorded it under
    ``reference_dir`` (``write_metrics``); None when that profile was not built in this checkout.
    Shown beside a real LM's so the reader sees how much narrower a fine-tune of a pretrained model
    is. Not built here when missing: the toy organism's build and cache cost the gemma3 profile 6.4 of
    its 60 minutes (session 13) for one row of context, which the default book (and the hosted
    report, which builds both) records anyway."""
    from crosscoder.checkpoint import read_metrics

    rec = read_metrics(Path(reference_dir) / METRICS_FOLDER).get("drift") if reference_dir else None
    return (rec["layer"], rec["rows"]) if rec else None


def reference_note(reference_dir: str | Path) -> str:
    """What the page says when ``reference`` found nothing under ``reference_dir``."""
    return (f"The toy organism's drift is not beside it: nothing is recorded under `{reference_dir}` in this "
            f"checkout. Build the default book first (`make book`) and rebuild this page to see it; the hosted "
            f"report builds both.")


def organism_drift_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an organism's ``metrics["drift"]`` (``evaluate.residual_drift`` of its held-out
    text and chat at ``eval.drift_layers``), one per (kind, block); empty without drift layers."""
    return [{"kind": kind, "block": int(layer.removeprefix("layer_")), "tokens": r["tokens"],
             "median drift": r["median_relative"], "p90 drift": r["p90_relative"],
             "median cosine": r["median_cosine"]}
            for kind, by_layer in metrics.get("drift", {}).items() for layer, r in by_layer.items()]


def finding(pairs: dict[str, tuple[int, list[dict[str, Any]]]]) -> str:
    """One sentence per pair ``{name: (layer, drift_rows)}``: the median drift of its text and chat
    tokens after the block the crosscoders read."""
    parts = []
    for name, (layer, rows) in pairs.items():
        by = {r["kind"]: r for r in rows}
        kinds = [f"{k} tokens a median {by[k]['median drift']:.1%}" for k in ("text", "chat") if k in by]
        part = f"{name}, after block {layer}: fine-tuning moved " + " and ".join(kinds) + " of their norm"
        cen = [f"{by[k]['median drift (centred)']:.1%}" for k in ("text", "chat")
               if "median drift (centred)" in by.get(k, {})]
        if cen:
            part += " (" + " and ".join(cen) + " of the norm with the mean activation removed)"
        parts.append(part)
    return "; ".join(parts) + "."
