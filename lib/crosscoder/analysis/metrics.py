"""Held-out metrics of a crosscoder and the decoder geometry used for model diffing.

Definitions (see the book's Methods chapter):
* L0: mean number of active latents per token.
* FVU_s = sum ||x_s - x̂_s||^2 / sum ||x_s - mean(x_s)||^2 over held-out tokens (a ratio of sums,
  per source, not the biased per-token ratio averaged over a batch).
* dead: never active over the evaluated tokens.
* r_i = ||d_chat|| / (||d_base|| + ||d_chat||) (Kissane et al.; shared 0.3 < r < 0.7, the outer
  bands "not shared").
* Δnorm_i = ½((||d_chat|| - ||d_base||) / max(||d_chat||, ||d_base||) + 1) (Minder et al.;
  chat-only > 0.9, base-only < 0.1, shared 0.4-0.6, the rest "other").
  Both class schemes are defined once, in ``BANDS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor

from crosscoder.model import Crosscoder


class EvalMetrics(NamedTuple):
    n_tokens: int
    """Tokens evaluated."""
    l0: float
    """Mean active latents per token."""
    mse: float
    """Mean over tokens of sum_s ||x_s - x̂_s||^2 (normalised space)."""
    fvu_S: list[float]
    """Fraction of variance unexplained per source (ratio of sums)."""
    dead_frac: float
    """Fraction of latents never active on these tokens."""
    freq_F: Tensor
    """Activation frequency of each latent (fraction of tokens)."""

    def as_dict(self, source_names: Iterable[str]) -> dict:
        names = list(source_names)
        d = {"n_tokens": self.n_tokens, "l0": self.l0, "mse": self.mse, "dead_frac": self.dead_frac}
        for name, v in zip(names, self.fvu_S):
            d[f"fvu_{name}"] = v
            d[f"explained_variance_{name}"] = 1.0 - v
        return d


@torch.no_grad()
def evaluate(
    model: Crosscoder,
    acts_raw_NSD: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 4096,
    use_threshold: bool | None = None,
) -> EvalMetrics:
    """Evaluate on held-out RAW activations (normalised here with the model's own scales).

    Streams over batches, accumulating sums in float64 so the result does not depend on the batch
    size. FVU uses a two-pass-free formula: sum||x - mean||^2 = sum||x||^2 - N ||mean||^2.
    BatchTopK models use their inference threshold when it exists (``use_threshold=None``).
    """
    was_training = model.training
    model.eval()
    if isinstance(acts_raw_NSD, Tensor):
        batches: Iterable[Tensor] = acts_raw_NSD.split(batch_size)
    else:
        batches = acts_raw_NSD
    S, F = model.cfg.n_sources, model.cfg.n_latents
    dev = model.W_dec_FSD.device  # held-out sets stay on the host; each batch goes to the model
    sse_S = torch.zeros(S, dtype=torch.float64, device=dev)
    sum_SD = torch.zeros(S, model.cfg.d_model, dtype=torch.float64, device=dev)
    sumsq_S = torch.zeros(S, dtype=torch.float64, device=dev)
    count_F = torch.zeros(F, dtype=torch.float64, device=dev)
    n = 0
    if use_threshold is None and model.cfg.sparsity == "batchtopk":
        use_threshold = float(model.threshold) >= 0
    for raw in batches:
        model.check_input(raw)
        x = model.normalise(raw.to(dev, non_blocking=True).float())
        recon, f = model(x, use_threshold=use_threshold)
        sse_S += (recon - x).double().pow(2).sum(dim=(0, 2))
        sum_SD += x.double().sum(0)
        sumsq_S += x.double().pow(2).sum(dim=(0, 2))
        count_F += (f > 0).sum(0).double()
        n += x.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got no activations; pass a non-empty held-out set")
    active_total = float(count_F.sum())  # one host sync, not one per batch
    var_S = sumsq_S - sum_SD.pow(2).sum(-1) / n
    fvu = (sse_S / var_S).tolist()
    freq_F = (count_F / n).float().cpu()
    return EvalMetrics(
        n_tokens=n,
        l0=active_total / n,
        mse=float(sse_S.sum() / n),
        fvu_S=fvu,
        dead_frac=float((count_F == 0).double().mean()),
        freq_F=freq_F,
    )


# ---------------------------------------------------------------------------- decoder geometry
class DiffGeometry(NamedTuple):
    norm_base_F: Tensor
    """||W_dec[i, base]|| (normalised space)."""
    norm_chat_F: Tensor
    """||W_dec[i, chat]||."""
    rel_norm_F: Tensor
    """Kissane's r = ||d_chat|| / (||d_base|| + ||d_chat||)."""
    delta_norm_F: Tensor
    """Minder's Δnorm = ½((||d_chat|| - ||d_base||)/max + 1)."""
    cosine_F: Tensor
    """cos(W_dec[i, base], W_dec[i, chat])."""


def diff_geometry(model: Crosscoder, base: int = 0, chat: int = 1) -> DiffGeometry:
    """Per-latent decoder statistics for model diffing (sources ``base`` and ``chat``)."""
    with torch.no_grad():
        n_FS = model.decoder_norms_FS()
        nb, nc = n_FS[:, base], n_FS[:, chat]
        total = (nb + nc).clamp_min(1e-12)
        rel = nc / total
        delta = 0.5 * ((nc - nb) / torch.maximum(nb, nc).clamp_min(1e-12) + 1.0)
        W = model.W_dec_FSD
        cos = torch.nn.functional.cosine_similarity(W[:, base], W[:, chat], dim=-1, eps=1e-12)
    return DiffGeometry(nb, nc, rel, delta, cos)


@dataclass(frozen=True)
class Band:
    """One labelled interval of r or Δnorm."""

    label: str
    """Class name given to latents in the band."""
    low: float
    """Lower end."""
    high: float
    """Upper end."""
    low_closed: bool
    """Whether ``low`` itself belongs to the band."""
    high_closed: bool
    """Whether ``high`` itself belongs to the band."""

    def contains_N(self, v_N: Tensor) -> Tensor:
        above = v_N >= self.low if self.low_closed else v_N > self.low
        below = v_N <= self.high if self.high_closed else v_N < self.high
        return above & below


BANDS: dict[str, tuple[Band, ...]] = {
    # Kissane et al.'s analysis defines only the shared band (0.3 < r < 0.7) on the relative norm
    # r; the outer bands are "not shared", not "exclusive": r = 0.25 is a latent whose chat decoder
    # is a third of its base decoder, far from base-only.
    "kissane": (
        Band("not shared (base side)", 0.0, 0.3, True, True),
        Band("shared", 0.3, 0.7, False, False),
        Band("not shared (chat side)", 0.7, 1.0, True, True),
    ),
    # Minder et al.'s bands on Δnorm: exclusive < 0.1 / > 0.9, shared 0.4-0.6, the rest "other".
    "minder": (
        Band("base-only", 0.0, 0.1, True, False),
        Band("shared", 0.4, 0.6, True, True),
        Band("chat-only", 0.9, 1.0, False, True),
    ),
}
"""The one definition of the class thresholds: scheme -> bands ("kissane" on r, "minder" on
Δnorm). A value in no band is "other"; a dead latent is "dead"."""


def classify_latents(values_F: Tensor, scheme: str, alive_F: Tensor | None = None) -> list[str]:
    """Class of each latent from r (scheme "kissane") or Δnorm (scheme "minder"), by ``BANDS``.

    Latents with ``alive_F`` False are labelled "dead" (their decoders carry no information).
    """
    if scheme not in BANDS:
        raise ValueError(f"scheme must be one of {sorted(BANDS)}, got {scheme!r}")
    v_F = values_F.detach().float().cpu()
    code_F = torch.full(v_F.shape, -1, dtype=torch.long)  # -1: other
    for i, band in enumerate(BANDS[scheme]):
        code_F[band.contains_N(v_F) & (code_F < 0)] = i
    if alive_F is not None:
        code_F[~alive_F.detach().bool().cpu()] = -2
    names = {-2: "dead", -1: "other", **{i: b.label for i, b in enumerate(BANDS[scheme])}}
    return [names[c] for c in code_F.tolist()]


def class_counts(labels: list[str], scheme: str | None = None) -> dict[str, int]:
    """Count of each class, in band order; with ``scheme`` every band is listed (0 if empty),
    "other" and "dead" only when present."""
    keys: list[str] = [b.label for b in BANDS[scheme]] if scheme else []
    if scheme is None:
        order = [b.label for bands in BANDS.values() for b in bands]
        keys = [k for k in dict.fromkeys(order) if k in labels]
    keys += [k for k in ("other", "dead") if k in labels]
    keys += sorted(set(labels) - set(keys))
    return {k: labels.count(k) for k in keys}


def fidelity_table(heldout: dict[str, Any], ce: dict[str, dict[str, float]],
                   sources: Iterable[str] = ("base", "chat")) -> dict[str, dict[str, float]]:
    """{source: {measure: value}}: held-out L0, FVU, explained variance and dead fraction beside the
    CE-recovered measures of each model (the training page's fidelity table)."""
    return {s: {"L0 (both models)": heldout["l0"], "FVU": heldout[f"fvu_{s}"],
                "explained variance": heldout[f"explained_variance_{s}"], "dead latents": heldout["dead_frac"],
                **ce.get(s, {})} for s in sources}
