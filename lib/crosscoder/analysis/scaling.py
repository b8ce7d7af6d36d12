"""Latent Scaling (Minder, Dumas et al. 2025): is a "chat-only" latent really absent from the base
model, or a shared concept mislabelled by the L1 artifacts (Complete Shrinkage, Latent Decoupling)?"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
from torch import Tensor

from crosscoder.model import Crosscoder

def scaling_beta(f_N: Tensor, d_D: Tensor, y_ND: Tensor) -> float:
    """beta = argmin_b sum_x ||b f(x) d - y(x)||^2 = d . sum f y / (||d||^2 sum f^2)."""
    num = torch.dot(d_D.double(), (f_N.double()[:, None] * y_ND.double()).sum(0))
    den = d_D.double().pow(2).sum() * f_N.double().pow(2).sum()
    return float(num / den)


class LatentScaling(NamedTuple):
    latents: Tensor
    """Latent indices analysed."""
    beta_recon_S: Tensor
    """[J, S] beta^r per source: fit of f_j d_j to the source's reconstruction."""
    beta_error_S: Tensor
    """[J, S] beta^eps per source: fit to the reconstruction error with latent j removed."""
    nu_recon: Tensor
    """beta^r_base / beta^r_chat (near 0: truly chat-specific; near 1: shared concept)."""
    nu_error: Tensor
    """beta^eps_base / beta^eps_chat."""
    n_active: Tensor
    """Tokens on which each latent fired (betas of rarely active latents are noisy)."""


@torch.no_grad()
def latent_scaling(
    model: Crosscoder,
    acts_raw: Iterable[Tensor] | Tensor,
    latents: Tensor | list[int],
    *,
    direction_source: int = 1,
    batch_size: int = 4096,
) -> LatentScaling:
    """Latent Scaling for ``latents`` using each latent's decoder direction in ``direction_source``
    (chat = 1 for chat-only latents) as d_j.

    Streams over the data accumulating, per latent j and source m, sum f_j y_m (a [J, D] GEMM per
    batch) and sum f_j^2, so no per-latent pass is needed. The "error with latent j removed" is
    eps_m + f_j W_dec[j, m] with eps_m = x_m - x̂_m, hence
    sum f_j (eps_m + f_j W_dec[j, m]) = (F^T eps_m)_j + (sum f_j^2) W_dec[j, m].

    Everything is computed in the normalised space (activations times ``input_scale_S``), whether
    or not the model is folded: in raw space beta_m picks up a factor c_chat / c_m, so the ratios
    nu would change by c_chat / c_base under ``fold()``.
    """
    J = torch.as_tensor(latents, dtype=torch.long)
    S, D = model.cfg.n_sources, model.cfg.d_model
    fy_rec = torch.zeros(len(J), S, D, dtype=torch.float64)
    fy_err = torch.zeros(len(J), S, D, dtype=torch.float64)
    ff = torch.zeros(len(J), dtype=torch.float64)
    n_active = torch.zeros(len(J), dtype=torch.long)
    was = model.training
    model.eval()
    batches = acts_raw.split(batch_size) if isinstance(acts_raw, Tensor) else acts_raw
    # A folded model works on raw activations; its inputs, outputs and decoder rows are mapped
    # into the normalised space (x * c_s) so the betas do not depend on folding.
    c_S = model.input_scale_S.double() if model.folded else torch.ones(S, dtype=torch.float64)
    for raw in batches:
        x = model.normalise(raw.float())
        recon, f = model(x)
        if model.folded:  # into the unfolded model's space: (x - m) * c (m = 0 without centring)
            m_SD = model.input_mean_SD.double() if model.cfg.centre_inputs else 0.0
            x = (x.double() - m_SD) * c_S[None, :, None]
            recon = (recon.double() - m_SD) * c_S[None, :, None]
        fJ = f[:, J].double()
        err = (x - recon).double()
        fy_rec += torch.einsum("nj,nsd->jsd", fJ, recon.double())
        fy_err += torch.einsum("nj,nsd->jsd", fJ, err)
        ff += fJ.pow(2).sum(0)
        n_active += (fJ > 0).sum(0)
    model.train(was)
    W = model.W_dec_FSD[J].double() * c_S[None, :, None]  # [J, S, D], normalised space
    fy_err += ff[:, None, None] * W
    d = W[:, direction_source]  # [J, D]
    den = d.pow(2).sum(-1) * ff  # [J]
    den = torch.where(den > 0, den, torch.full_like(den, float("nan")))
    beta_r = torch.einsum("jd,jsd->js", d, fy_rec) / den[:, None]
    beta_e = torch.einsum("jd,jsd->js", d, fy_err) / den[:, None]
    other = 1 - direction_source if S == 2 else 0
    return LatentScaling(
        J, beta_r.float(), beta_e.float(),
        (beta_r[:, other] / beta_r[:, direction_source]).float(),
        (beta_e[:, other] / beta_e[:, direction_source]).float(),
        n_active,
    )
