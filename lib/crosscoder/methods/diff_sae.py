"""Method 5: the diff-SAE (Aranguri, Drori & Nanda 2025; the diffing-toolkit's ``sae_difference``): a
BatchTopK SAE trained on the activation difference δ = h_chat − h_base.

δ is normalised like any crosscoder input (one scalar so that E||δ|| = sqrt(D), estimated on the norm
split's differences); the SAE is a one-source ``Crosscoder`` trained by ``crosscoder.train``, so it
has the crosscoder's kernels, AuxK, inference threshold, checkpoints and resume.

Ranking. Each latent j is ranked by the fraction of the held-out difference's variance it explains
*alone*: the drop in squared error when f_j d_j is added to the decoder bias b, over the variance,

    e_j = ( sum_n ||x_n - b||^2 - sum_n ||x_n - b - f_nj d_j||^2 ) / sum_n ||x_n - mean(x)||^2
        = ( 2 sum_n f_nj <x_n - b, d_j> - ||d_j||^2 sum_n f_nj^2 ) / sum_n ||x_n - mean(x)||^2

(x = normalised δ; the second line is what is computed, one [B, F] GEMM per batch; the test compares
it with the first, one latent at a time). Latents that explain less than ``min_explained`` are not
flagged (the default 0.01 is a placeholder: the scoreboard sets the cut on validation data,
``analysis.scoreboard.tune_cut``).

Latent Scaling. A difference latent's direction may have been added by the fine-tune (present in
h_chat, absent from h_base) or removed by it (d_j points against a base-only direction); δ alone
cannot tell. For each latent, β_m = argmin_β sum_n ||β f_nj d_j − h_m,n||^2 fits its direction, at
its activations, to each model's raw activations (Minder et al.'s Latent Scaling with the
activations themselves as targets), and ν_j = β_base / β_chat. An added direction has ν ≈ 0, a removed
one |ν| → ∞, a shared direction whose norm or angle changed |ν| near 1. Flagged = the latents with
e_j ≥ ``min_explained``, |ν_j| < ``nu_threshold`` and at least ``min_active_tokens`` held-out
activations, in order of e_j.

Scores: each latent's activation on the token's δ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor

from crosscoder.config import ConfigError, CrosscoderConfig, TrainConfig, _check_float, _check_int
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.distributed import resolve_device
from crosscoder.methods._crosscoder import CrosscoderMethod
from crosscoder.methods.base import BASE, CHAT, MethodConfig, MethodData, register
from crosscoder.model import Crosscoder
from crosscoder.train import TensorBatches, train


@dataclass
class DiffSAEConfig(MethodConfig):
    """A BatchTopK SAE on chat − base activation differences."""

    n_latents: int = 0
    """Dictionary size (0: 4 x d_model; Aranguri et al. use 2-4 x d_model)."""
    k: int = 100
    """Mean active latents per token (as for the crosscoder)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation (``TrainConfig``; l1_coeff unused)."""
    min_explained: float = 0.01
    """Flag only latents that alone explain at least this fraction of the held-out difference's variance."""
    nu_threshold: float = 0.3
    """Flag only latents with |ν| = |β_base / β_chat| below this: directions the fine-tune added (present in
    the chat activations, absent from the base ones)."""
    min_active_tokens: int = 5
    """Flag only latents active on at least this many held-out tokens (their betas are noise otherwise)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("n_latents", self.n_latents, 0)
        _check_int("k", self.k, 1)
        if self.n_latents and self.k > self.n_latents:
            raise ConfigError(f"k = {self.k} exceeds n_latents = {self.n_latents}; choose k <= n_latents")
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig (or its dict), got {type(self.train).__name__}")
        _check_float("min_explained", self.min_explained, 0.0, 1.0)
        _check_float("nu_threshold", self.nu_threshold, 0.0, low_open=True)
        _check_int("min_active_tokens", self.min_active_tokens, 1)


def differences(acts_NSD: Tensor) -> Tensor:
    """δ = h_chat − h_base as a one-source activation tensor [N, 1, D] (float32)."""
    return (acts_NSD[:, CHAT].float() - acts_NSD[:, BASE].float())[:, None]


class DifferenceBatches:
    """``train.BatchSource`` of δ: the pair's ``TensorBatches`` (same order, same resume), differenced per batch,
    so no [N, D] copy of the training split is made."""

    def __init__(self, acts_NSD: Tensor, batch_size: int, seed: int = 0):
        self.pairs = TensorBatches(acts_NSD, batch_size, seed=seed)

    def batches(self, start_step: int) -> Iterator[Tensor]:
        for raw in self.pairs.batches(start_step):
            yield differences(raw)


class DiffStats(NamedTuple):
    explained_F: Tensor
    """e_j: fraction of the difference's variance latent j explains alone."""
    beta_SF: Tensor
    """[2, F] Latent Scaling β of each latent's direction against the base (0) and chat (1) activations."""
    nu_F: Tensor
    """β_base / β_chat (NaN for a latent that never fires)."""
    n_active_F: Tensor
    """Tokens on which each latent fired."""


@torch.no_grad()
def diff_stats(sae: Crosscoder, acts_NSD: Tensor, *, batch_size: int = 4096) -> DiffStats:
    """Ranking and Latent Scaling statistics of a difference SAE on raw pair activations [N, 2, D]
    (one streaming pass, float64 sums)."""
    F, D = sae.cfg.n_latents, sae.cfg.d_model
    W_FD = sae.W_dec_FSD[:, 0].double()
    b_D = sae.b_dec_SD[0].double()
    gain_F = torch.zeros(F, dtype=torch.float64)  # sum_n f_nj <x_n - b, d_j>
    ff_F = torch.zeros(F, dtype=torch.float64)  # sum_n f_nj^2
    fh_SFD = torch.zeros(2, F, D, dtype=torch.float64)  # sum_n f_nj h_m,n (raw)
    n_active_F = torch.zeros(F, dtype=torch.long)
    sum_D = torch.zeros(D, dtype=torch.float64)
    sumsq, n = 0.0, 0
    was = sae.training
    sae.eval()
    for raw in acts_NSD.split(batch_size):
        x_BD = sae.normalise(differences(raw))[:, 0]
        f_BF = sae.encode(x_BD[:, None]).double()
        x_BD = x_BD.double()
        gain_F += (f_BF * ((x_BD - b_D) @ W_FD.t())).sum(0)
        ff_F += f_BF.pow(2).sum(0)
        fh_SFD += torch.einsum("bf,bsd->sfd", f_BF, raw.double())
        n_active_F += (f_BF > 0).sum(0)
        sum_D += x_BD.sum(0)
        sumsq += float(x_BD.pow(2).sum())
        n += x_BD.shape[0]
    sae.train(was)
    variance = sumsq - float(sum_D.pow(2).sum()) / n
    explained_F = (2 * gain_F - W_FD.pow(2).sum(-1) * ff_F) / variance
    # β_m = <d, sum f h_m> / (||d||^2 sum f^2): the direction's scale cancels in ν, so d may stay normalised.
    den_F = W_FD.pow(2).sum(-1) * ff_F
    den_F = torch.where(den_F > 0, den_F, torch.full_like(den_F, float("nan")))
    beta_SF = torch.einsum("fd,sfd->sf", W_FD, fh_SFD) / den_F
    return DiffStats(explained_F.float(), beta_SF.float(), (beta_SF[BASE] / beta_SF[CHAT]).float(), n_active_F)


def flag_latents(stats: DiffStats, cfg: DiffSAEConfig) -> Tensor:
    """The latents the diff-SAE flags (the module docstring's rule), in decreasing order of e_j."""
    ok = ((stats.explained_F >= cfg.min_explained) & (stats.nu_F.abs() < cfg.nu_threshold)
          & (stats.n_active_F >= cfg.min_active_tokens))
    order = stats.explained_F.argsort(descending=True)
    return order[ok[order]]


@register
class DiffSAE(CrosscoderMethod):
    """The trained difference SAE; items = its latents, flagged = the top latents by variance explained
    that Latent Scaling places on the chat side."""

    name = "diff_sae"
    Config = DiffSAEConfig
    cut_field = "min_explained"

    def __init__(self, cfg, d_model, flagged_J, metrics, model, stats: DiffStats):
        super().__init__(cfg, d_model, flagged_J, metrics, model)
        self.stats = stats

    @classmethod
    def crosscoder_config(cls, cfg: DiffSAEConfig, d_model: int) -> CrosscoderConfig:
        return CrosscoderConfig(d_model=d_model, n_latents=cfg.n_latents or 4 * d_model, n_sources=1,
                                source_names=("chat-base",), sparsity="batchtopk", k=cfg.k)

    def _scores(self, acts_NSD: Tensor, positions_N: Tensor | None) -> Tensor:
        return self.model.encode(self.model.normalise(differences(acts_NSD)))

    def cut_statistic(self) -> tuple[Tensor, Tensor]:
        st, cfg = self.stats, self.cfg
        return st.explained_F, (st.nu_F.abs() < cfg.nu_threshold) & (st.n_active_F >= cfg.min_active_tokens)

    def flagged_under(self, cfg: DiffSAEConfig) -> Tensor:
        return flag_latents(self.stats, cfg)

    def tensors(self) -> dict[str, Tensor]:
        return {**super().tensors(), **{f"stats.{k}": v for k, v in self.stats._asdict().items()}}

    @classmethod
    def _from_tensors(cls, cfg, d_model, flagged_J, tensors, metrics):
        stats = DiffStats(**{k: tensors[f"stats.{k}"] for k in DiffStats._fields})
        return cls(cfg, d_model, flagged_J, metrics, cls.model_from_tensors(cfg, d_model, tensors), stats)

    @classmethod
    def _fit(cls, cfg: DiffSAEConfig, data: MethodData, out_dir: Path, *, progress: bool) -> "DiffSAE":
        d_model = data.train_NSD.shape[-1]
        sae = Crosscoder(cls.crosscoder_config(cfg, d_model), generator=torch.Generator().manual_seed(cfg.train.seed))
        sae.input_scale_S.copy_(estimate_input_scale(differences(data.norm_NSD)))
        sae = sae.to(resolve_device("auto"))
        if sae.cfg.k > sae.cfg.n_latents:
            raise ConfigError(f"k = {cfg.k} exceeds the dictionary of 4 x d_model = {sae.cfg.n_latents} latents; "
                              f"lower k or set n_latents")
        res = train(sae, DifferenceBatches(data.train_NSD, cfg.train.batch_size, seed=cfg.train.seed), cfg.train,
                    out_dir, heldout_raw_NSD=differences(data.heldout_NSD), progress=progress)
        sae = res.model.cpu().eval()
        stats = diff_stats(sae, data.heldout_NSD)
        flagged = flag_latents(stats, cfg)
        metrics: dict[str, Any] = {
            "train_tokens": cfg.train.n_steps * cfg.train.batch_size, "heldout": res.metrics.get("heldout", {}),
            "flagging": {"flagged": int(len(flagged)),
                         "explained by the flagged latents": float(stats.explained_F[flagged].sum()),
                         "latents above min_explained": int((stats.explained_F >= cfg.min_explained).sum())}}
        return cls(cfg, d_model, flagged, metrics, sae, stats)
