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

A published difference SAE (dictionary_learning's ``BatchTopKSAE``, as the diffing toolkit's
``sae_difference`` trains it) is this method too: ``from_published`` loads it
(``formats.load_dictionary_learning_sae``) and flags it here, without training. Its BatchTopK ranks
the activations themselves, not activation x decoder norm; the artifact records that
(``RANK_BY_ACTIVATION``) so ``methods.load`` rebuilds the same encoder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor

from crosscoder.config import ConfigError, CrosscoderConfig, TrainConfig, _check_float, _check_int
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.distributed import resolve_device
from crosscoder.methods._crosscoder import CrosscoderMethod, latent_removal
from crosscoder.methods.base import (BASE, CHAT, METHOD_DIR, Cost, Intervention, MethodConfig, MethodData, check_data,
                                     register)
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


RANK_BY_ACTIVATION = "rank_by_activation"
"""Key of a method artifact whose SAE ranks and thresholds f itself (``topk_by_decoder_norm=False``), as
dictionary_learning's BatchTopKSAE does; absent, the SAE is one ``fit`` trained (f x decoder norm)."""

TARGETS = {"difference_ftb": 1.0, "difference_bft": -1.0}
"""The diffing toolkit's ``sae_difference`` training targets -> the sign of its input relative to δ:
"difference_ftb" = fine-tuned − base (its default, our δ), "difference_bft" = base − fine-tuned."""


def published_sae_config(cfg: DiffSAEConfig, d_model: int) -> CrosscoderConfig:
    """The SAE of a published diff-SAE: ``DiffSAE.crosscoder_config`` ranking on f itself."""
    return dataclasses.replace(DiffSAE.crosscoder_config(cfg, d_model), topk_by_decoder_norm=False)


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

    def intervention(self, items_J: Tensor) -> Intervention:
        """Remove the latents' contribution to δ, sum_j f_j(δ) d_j (raw units), from the chat residual: f
        read from the token's difference h_chat − h_base (the base model in lockstep), so the chat
        activation moves back towards the base one along what those latents reconstruct."""
        return latent_removal(self.model, items_J, lambda pair: self.model.normalise(differences(pair)), 0,
                              f"f_j d_j of {len(items_J)} difference latent{'s' if len(items_J) != 1 else ''}")

    def cut_statistic(self) -> tuple[Tensor, Tensor]:
        st, cfg = self.stats, self.cfg
        return st.explained_F, (st.nu_F.abs() < cfg.nu_threshold) & (st.n_active_F >= cfg.min_active_tokens)

    def flagged_under(self, cfg: DiffSAEConfig) -> Tensor:
        return flag_latents(self.stats, cfg)

    def tensors(self) -> dict[str, Tensor]:
        out = {**super().tensors(), **{f"stats.{k}": v for k, v in self.stats._asdict().items()}}
        if not self.model.cfg.topk_by_decoder_norm:  # a published SAE: see RANK_BY_ACTIVATION
            out[RANK_BY_ACTIVATION] = torch.ones((), dtype=torch.uint8)
        return out

    @classmethod
    def model_from_tensors(cls, cfg: DiffSAEConfig, d_model: int, tensors: dict[str, Tensor]) -> Crosscoder:
        if RANK_BY_ACTIVATION not in tensors:
            return super().model_from_tensors(cfg, d_model, tensors)
        model = Crosscoder(published_sae_config(cfg, d_model))
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        return model

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


def from_published(folder: str | os.PathLike, data: MethodData, *, target: str = "difference_ftb",
                   min_explained: float = 0.01, nu_threshold: float = 0.3, min_active_tokens: int = 5,
                   out_dir: str | os.PathLike | None = None) -> DiffSAE:
    """A dictionary_learning ``BatchTopKSAE`` trained on the pair's activation differences (its folder:
    ``ae.pt`` or ``model_final.pt`` beside ``config.json``) as the fitted ``diff_sae`` method on ``data``,
    flagged here with the given options as ``fit`` flags (held-out statistics, Latent Scaling).

    ``target``: what the SAE read, in the diffing toolkit's names: "difference_ftb" (chat − base, our δ) or
    "difference_bft" (base − chat; the encoder and decoder are negated so the method reads δ and its
    latents keep their activations). The SAE carries its own normalisation, so ``data`` only needs
    the same width. The cost has NaN seconds and 0 tokens: the training happened elsewhere.
    ``out_dir``: also save the method artifact to ``out_dir/method`` (``methods.load`` reads it back)."""
    from crosscoder.formats import load_dictionary_learning_sae

    if target not in TARGETS:
        raise ConfigError(f"target must be one of {sorted(TARGETS)} (the diffing toolkit's names), got {target!r}")
    d_model = check_data(data)
    folder = Path(folder)
    sae = load_dictionary_learning_sae(folder)
    if sae.cfg.d_model != d_model:
        raise ConfigError(f"the SAE in {folder} reads vectors of width {sae.cfg.d_model}; the data are "
                          f"[tokens, 2, {d_model}]: wrap an SAE of this pair's differences")
    cfg = DiffSAEConfig(n_latents=sae.cfg.n_latents, k=sae.cfg.k, min_explained=min_explained,
                        nu_threshold=nu_threshold, min_active_tokens=min_active_tokens)
    model = Crosscoder(published_sae_config(cfg, d_model))
    model.load_state_dict(sae.state_dict())
    with torch.no_grad():
        # reading -δ with W_enc is reading δ with -W_enc; reconstructing -δ̂ with (W_dec, b_dec) is
        # reconstructing δ̂ with their negatives
        for p in (model.W_enc_SDF, model.W_dec_FSD, model.b_dec_SD):
            p.mul_(TARGETS[target])
    model.eval()
    t0 = time.perf_counter()
    stats = diff_stats(model, data.heldout_NSD)
    flagged = flag_latents(stats, cfg)
    metrics: dict[str, Any] = {
        "published": {"folder": folder.as_posix(), "target": target},
        "flag_seconds": time.perf_counter() - t0,
        "flagging": {"flagged": int(len(flagged)),
                     "explained by the flagged latents": float(stats.explained_F[flagged].sum()),
                     "latents above min_explained": int((stats.explained_F >= cfg.min_explained).sum())}}
    fitted = DiffSAE(cfg, d_model, flagged, metrics, model, stats)
    nbytes = sum(t.numel() * t.element_size() for t in fitted.tensors().values())
    fitted.metrics["cost"] = Cost(math.nan, None, nbytes, 0)._asdict()
    if out_dir is not None:
        fitted.save(Path(out_dir) / METHOD_DIR)
    return fitted
