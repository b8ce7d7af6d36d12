"""The acausal crosscoder (Anthropic, Oct 2024) with L1 and BatchTopK sparsity.

    f(x)   = ReLU( sum_s W_enc[s] x_s + b_enc )                 (BatchTopK: keep top k*B of the batch)
    x̂_s    = W_dec[:, s]^T f + b_dec[s]
    L_L1   = sum_s ||x_s - x̂_s||^2 + lambda * sum_i f_i * sum_s ||W_dec[i, s]||      (mean over tokens)

Shapes (suffix convention): B batch tokens, S sources, D d_model, F latents, K = S*D.
This file does no I/O (see ``checkpoint.py``) and holds the readable reference maths; the fused
training kernels that must agree with it live in ``kernels.py``.

Normalisation: each source s is multiplied by a scalar ``input_scale_S[s]`` so that E||x_s|| = sqrt(D);
with ``cfg.centre_inputs`` its mean ``input_mean_SD[s]`` is subtracted first (and the scale estimated on
the centred activations), as the dictionary_learning fork normalises. An unfolded model works in that
normalised space (call ``normalise`` on raw activations first); a folded model (``fold()``) has the
scales and means baked into its weights and biases and works on raw activations. Decoder
norms used by the L1 penalty, the BatchTopK ranking and the model-diff analysis are always reported
in normalised space, so folding changes no latent's statistics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F_nn
from torch import Tensor, nn

from crosscoder.config import ConfigError, CrosscoderConfig


class CrosscoderOutput(NamedTuple):
    recon_BSD: Tensor
    """Reconstruction of every source, in the model's input space."""
    f_BF: Tensor
    """Latent activations (non-negative; zero for inactive latents)."""


class LossOutput(NamedTuple):
    loss: Tensor
    """Total objective that is differentiated."""
    recon_loss: Tensor
    """sum over sources and dims of squared error, mean over tokens."""
    sparsity_loss: Tensor
    """Decoder-norm-weighted L1 (mean over tokens, before lambda); 0 for BatchTopK."""
    f_BF: Tensor
    """Latent activations of the batch (detached)."""


class Crosscoder(nn.Module):
    """Acausal crosscoder over ``cfg.n_sources`` sources of width ``cfg.d_model``."""

    def __init__(self, cfg: CrosscoderConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        S, D, F = cfg.n_sources, cfg.d_model, cfg.n_latents
        self.W_enc_SDF = nn.Parameter(torch.empty(S, D, F))
        self.W_dec_FSD = nn.Parameter(torch.empty(F, S, D))
        self.b_enc_F = nn.Parameter(torch.zeros(F))
        self.b_dec_SD = nn.Parameter(torch.zeros(S, D))
        self.register_buffer("input_scale_S", torch.ones(S))
        # Raw-space mean subtracted before scaling (zeros unless cfg.centre_inputs); state dicts saved
        # before it existed load with zeros (``_add_missing_mean``), which is what they computed.
        self.register_buffer("input_mean_SD", torch.zeros(S, D))
        self.register_load_state_dict_pre_hook(Crosscoder._add_missing_mean)
        # 1 once the input scales are baked into the weights (then inputs are raw activations).
        self.register_buffer("is_folded", torch.zeros((), dtype=torch.uint8))
        # BatchTopK inference threshold on the ranking score; < 0 means "not yet estimated".
        self.register_buffer("threshold", torch.full((), -1.0))
        # Per-latent multiplier s_F of a latent's sparsity cost (None: 1 for every latent; see
        # ``penalty_weights_F`` and ``rank_weights_F``). Not in the state dict, so every crosscoder
        # saved before it existed loads unchanged: a diffing method that sets it (the designated-shared
        # crosscoder) saves and restores it itself.
        self.register_buffer("penalty_scale_F", None, persistent=False)
        # Python mirror of is_folded, so the hot path never reads a device tensor (a host sync).
        self.folded = False
        self.register_load_state_dict_post_hook(Crosscoder._sync_folded)
        self.reset_parameters(generator)

    @staticmethod
    def _sync_folded(module: "Crosscoder", _incompatible) -> None:
        module.folded = bool(module.is_folded)

    def _add_missing_mean(self, state_dict, prefix, *_args) -> None:
        state_dict.setdefault(prefix + "input_mean_SD", torch.zeros_like(self.input_mean_SD))

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Anthropic/Kissane init: random decoder rows of norm ``dec_init_norm`` per source, and
        W_enc = W_dec transposed, so that every latent starts as a matched read/write direction."""
        W = torch.randn(self.W_dec_FSD.shape, generator=generator)
        W *= self.cfg.dec_init_norm / W.norm(dim=-1, keepdim=True)
        self.W_dec_FSD.copy_(W)
        self.W_enc_SDF.copy_(W.permute(1, 2, 0))
        self.b_enc_F.zero_()
        self.b_dec_SD.zero_()

    @torch.no_grad()
    def fit_normalisation_(self, norm_raw_NSD: Tensor | None) -> "Crosscoder":
        """Set the input scales (and, with ``cfg.centre_inputs``, the means) from raw activations held
        apart from training (the norm split, BOS excluded). ``None`` keeps scales of 1 (no centring)."""
        from crosscoder.data.normalise import input_stats  # no I/O: plain tensor statistics

        if norm_raw_NSD is None:
            if self.cfg.centre_inputs:
                raise ConfigError("centre_inputs needs activations to take the mean of (a norm split)")
            return self
        scale_S, mean_SD = input_stats(norm_raw_NSD, self.cfg.centre_inputs)
        self.input_scale_S.copy_(scale_S)
        if mean_SD is not None:
            self.input_mean_SD.copy_(mean_SD)
        return self

    # ------------------------------------------------------------------ shapes / validation
    @property
    def n_sources(self) -> int:
        return self.cfg.n_sources

    def check_input(self, x_BSD: Tensor) -> None:
        """One clear error for activations of the wrong shape."""
        S, D = self.cfg.n_sources, self.cfg.d_model
        if x_BSD.ndim != 3 or x_BSD.shape[1] != S or x_BSD.shape[2] != D:
            raise ConfigError(
                f"activations must have shape [batch, {S} sources, {D}], got {tuple(x_BSD.shape)}; "
                f"stack one [batch, d_model] tensor per source along dim 1"
            )

    # ------------------------------------------------------------------ normalisation
    def normalise(self, x_raw_BSD: Tensor) -> Tensor:
        """Map raw activations into the model's input space."""
        if self.folded:
            return x_raw_BSD
        if self.cfg.centre_inputs:
            x_raw_BSD = x_raw_BSD - self.input_mean_SD.to(x_raw_BSD.dtype)
        return x_raw_BSD * self.input_scale_S[None, :, None].to(x_raw_BSD.dtype)

    def denormalise(self, x_BSD: Tensor) -> Tensor:
        """Map the model's outputs back to raw activation space."""
        if self.folded:
            return x_BSD
        x_BSD = x_BSD / self.input_scale_S[None, :, None].to(x_BSD.dtype)
        return x_BSD + self.input_mean_SD.to(x_BSD.dtype) if self.cfg.centre_inputs else x_BSD

    @torch.no_grad()
    def fold(self) -> "Crosscoder":
        """Return a copy with the input scales (and means) baked into the weights: folded(raw) equals
        denormalise(unfolded(normalise(raw))), with identical latent activations."""
        if self.folded:
            return self
        new = Crosscoder(self.cfg)
        new.load_state_dict(self.state_dict())
        c_S = self.input_scale_S
        new.W_enc_SDF.mul_(c_S[:, None, None])
        new.W_dec_FSD.div_(c_S[None, :, None])
        new.b_dec_SD.div_(c_S[:, None])
        if self.cfg.centre_inputs:
            # W_enc·(x - m)c = (cW_enc)·x - (cW_enc)·m;  x̂ = (W_dec f + b_dec)/c + m
            new.b_enc_F.sub_(torch.einsum("sd,sdf->f", self.input_mean_SD, new.W_enc_SDF))
            new.b_dec_SD.add_(self.input_mean_SD)
        new.is_folded.fill_(1)
        new.folded = True
        if self.penalty_scale_F is not None:
            new.penalty_scale_F = self.penalty_scale_F.clone()
        return new.train(self.training)

    # ------------------------------------------------------------------ decoder geometry
    def decoder_norms_FS(self) -> Tensor:
        """||W_dec[i, s]|| in normalised space (invariant under ``fold``)."""
        n_FS = self.W_dec_FSD.norm(dim=-1)
        if self.folded:
            n_FS = n_FS * self.input_scale_S[None, :]
        return n_FS

    def decoder_raw_FSD(self) -> Tensor:
        """W_dec in raw activation space (what the decoder writes into each model's residual)."""
        if self.folded:
            return self.W_dec_FSD
        return self.W_dec_FSD / self.input_scale_S[None, :, None]

    def penalty_weights_F(self) -> Tensor:
        """Per-latent weight of the L1 penalty: ``decoder_weights_F`` times the latent's cost
        multiplier ``penalty_scale_F`` when one is set."""
        w_F = self.decoder_weights_F()
        return w_F if self.penalty_scale_F is None else w_F * self.penalty_scale_F

    def rank_weights_F(self) -> Tensor | None:
        """Per-latent weight w_F of the BatchTopK ranking score f_F * w_F (None: rank on f itself).

        ``decoder_weights_F`` with ``cfg.topk_by_decoder_norm`` (else 1), divided by the cost
        multiplier ``penalty_scale_F`` when one is set: a latent whose activation costs s times less
        (the L1 penalty's w * s) is selected as if its contribution were 1/s times larger, so a
        reduced cost makes a latent easier to select in either objective."""
        w_F = self.decoder_weights_F() if self.cfg.topk_by_decoder_norm else None
        if self.penalty_scale_F is None:
            return w_F
        return 1.0 / self.penalty_scale_F if w_F is None else w_F / self.penalty_scale_F

    def decoder_weights_F(self) -> Tensor:
        """Per-latent weight from the normalised-space decoder norms as ``cfg.decoder_norm`` says
        (the L1 penalty's and the BatchTopK ranking's weight when no cost multiplier is set)."""
        n_FS = self.decoder_norms_FS()
        kind = self.cfg.decoder_norm
        if kind == "sum":
            return n_FS.sum(-1)
        if kind == "joint":
            return n_FS.pow(2).sum(-1).sqrt()
        if kind == "mixed":
            return (self.cfg.mixed_weight_joint * n_FS.pow(2).sum(-1).sqrt()
                    + self.cfg.mixed_weight_sum * n_FS.sum(-1))
        return torch.ones_like(n_FS[:, 0])  # "none"

    # ------------------------------------------------------------------ forward
    def pre_acts(self, x_BSD: Tensor) -> Tensor:
        """sum_s W_enc[s] x_s + b_enc, as one GEMM over the concatenated sources."""
        B = x_BSD.shape[0]
        K = self.cfg.n_sources * self.cfg.d_model
        return torch.addmm(self.b_enc_F, x_BSD.reshape(B, K), self.W_enc_SDF.reshape(K, -1))

    def topk_score(self, f_BF: Tensor) -> Tensor:
        """The quantity BatchTopK ranks (and thresholds) on."""
        w_F = self.rank_weights_F()
        return f_BF if w_F is None else f_BF * w_F

    def batch_topk_mask(self, f_BF: Tensor) -> Tensor:
        """Boolean mask of the k*B largest scores over the whole batch (exactly k*B entries)."""
        score = self.topk_score(f_BF).flatten()
        n_keep = min(self.cfg.k * f_BF.shape[0], score.numel())
        idx = torch.topk(score, n_keep, sorted=False).indices
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask[idx] = True
        return mask.view_as(f_BF)

    def encode(self, x_BSD: Tensor, *, use_threshold: bool | None = None) -> Tensor:
        """Latent activations f_BF.

        BatchTopK: ``use_threshold=None`` picks the learned inference threshold in eval mode once it
        has been estimated (so a token's latents do not depend on the rest of its batch), and the
        exact batch top-k otherwise.
        """
        f_BF = F_nn.relu(self.pre_acts(x_BSD))
        if self.cfg.sparsity == "l1":
            return f_BF
        if use_threshold is None:
            use_threshold = (not self.training) and float(self.threshold) >= 0
        if use_threshold:
            if float(self.threshold) < 0:
                raise ConfigError(
                    "this BatchTopK crosscoder has no inference threshold yet (it is estimated during "
                    "training); train it, set model.threshold, or pass use_threshold=False"
                )
            return f_BF * (self.topk_score(f_BF) > self.threshold)
        return f_BF * self.batch_topk_mask(f_BF)

    def decode(self, f_BF: Tensor) -> Tensor:
        B = f_BF.shape[0]
        S, D = self.cfg.n_sources, self.cfg.d_model
        out = torch.addmm(self.b_dec_SD.reshape(-1), f_BF, self.W_dec_FSD.reshape(-1, S * D))
        return out.view(B, S, D)

    def forward(self, x_BSD: Tensor, *, use_threshold: bool | None = None) -> CrosscoderOutput:
        f_BF = self.encode(x_BSD, use_threshold=use_threshold)
        return CrosscoderOutput(self.decode(f_BF), f_BF)

    # ------------------------------------------------------------------ reference loss
    def loss(self, x_BSD: Tensor, l1_coeff: float = 0.0) -> LossOutput:
        """Readable (autograd) loss; the trainer uses the fused kernels, tested against this."""
        self.check_input(x_BSD)
        recon_BSD, f_BF = self(x_BSD, use_threshold=False)
        recon_loss = (recon_BSD - x_BSD).pow(2).sum(dim=(1, 2)).mean()
        if self.cfg.sparsity == "l1":
            sparsity = (f_BF * self.penalty_weights_F()).sum(-1).mean()
        else:
            sparsity = recon_loss.new_zeros(())
        loss = recon_loss + l1_coeff * sparsity
        return LossOutput(loss, recon_loss, sparsity, f_BF.detach())
