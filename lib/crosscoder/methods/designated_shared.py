"""Method 3: the designated-shared crosscoder (Anthropic, "Insights on Crosscoder Model Diffing", Feb 2025).

A set of latents, here the first ``n_designated`` = int(designated_frac x F), is *designated shared*:
each has ONE decoder vector for both models (the base and chat decoder rows are tied, bit-equal)
and a reduced sparsity cost, lambda_s = ``shared_penalty_ratio`` x lambda (Anthropic: 0.1-0.2). Shared
structure is then cheaper to explain with them, so the remaining latents, trained as in the plain
crosscoder, are left to what differs between the models instead of absorbing shared variance and
growing dense. Their encoders stay per model.

How the tie is kept: both rows start equal, the trainer sums the two rows' gradients into each
(the gradient of the one shared vector, as oli-clive-griffin/model-diffing's Feb-update trainer
does), so Adam moves them identically, and copies the base row onto the chat row after every step,
which makes the tie exact whatever the optimiser does. Gradient clipping sees the summed gradient
twice (once per row), a slightly smaller clip than a single shared parameter would get.

The reduced cost enters through ``Crosscoder.penalty_scale_F`` (s = ratio on the designated latents,
1 elsewhere): the L1 penalty weighs a latent by w x s; BatchTopK ranks by f x w / s, i.e. a latent
whose activation costs s times less is selected as if its contribution were 1/s times larger (the
reading of "reduced sparsity weight" that makes a designated latent cheaper under either objective).

Flagged: chat-only by Δnorm and confirmed by Latent Scaling, as the plain crosscoder (a designated
latent has Δnorm 0.5 exactly, so it is never flagged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosscoder.config import ConfigError, _check_float
from crosscoder.methods._crosscoder import CrosscoderMethod, ScaledCrosscoderConfig, check_objective
from crosscoder.methods.base import BASE, CHAT, register
from crosscoder.model import Crosscoder


@dataclass
class DesignatedSharedConfig(ScaledCrosscoderConfig):
    """A crosscoder with designated shared latents (tied decoders, reduced sparsity cost)."""

    sparsity: str = "l1"
    """"l1" (Anthropic's variant; ``train.l1_coeff`` is lambda of the other latents) or "batchtopk"."""
    k: int = 100
    """BatchTopK only: mean active latents per token."""
    designated_frac: float = 0.1
    """Share of the dictionary designated shared: latents [0, int(designated_frac x n_latents))."""
    shared_penalty_ratio: float = 0.15
    """lambda_s / lambda: the designated latents' sparsity cost relative to the others' (Anthropic:
    0.1-0.2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_objective(self, self.sparsity, self.k)
        _check_float("designated_frac", self.designated_frac, 0.0, 1.0, low_open=True)
        _check_float("shared_penalty_ratio", self.shared_penalty_ratio, 0.0, 1.0, low_open=True)
        if self.n_designated < 1:
            raise ConfigError(f"designated_frac = {self.designated_frac} of n_latents = {self.n_latents} designates "
                              f"no latent; raise designated_frac or n_latents")
        if self.n_designated == self.n_latents:
            raise ConfigError(f"designated_frac = {self.designated_frac} designates every latent, leaving none free "
                              f"to differ between the models; lower it below 1")

    @property
    def n_designated(self) -> int:
        """Number of designated shared latents (rounded down, like DFC's partition sizes)."""
        return int(self.designated_frac * self.n_latents)


class TiedDecoders:
    """``train.Constraint``: decoder rows [0, n) of the two sources are one vector."""

    def __init__(self, n: int):
        self.n = n

    def project_grads_(self, model: Crosscoder) -> None:
        g = model.W_dec_FSD.grad
        if g is None:
            return
        total = g[: self.n, BASE] + g[: self.n, CHAT]  # d loss / d shared row
        g[: self.n, BASE] = total
        g[: self.n, CHAT] = total

    def project_weights_(self, model: Crosscoder) -> None:
        model.W_dec_FSD[: self.n, CHAT] = model.W_dec_FSD[: self.n, BASE]


@register
class DesignatedSharedCrosscoder(CrosscoderMethod):
    """The trained crosscoder; items = its latents ([0, n_designated) the designated shared ones)."""

    name = "designated_shared"
    Config = DesignatedSharedConfig

    @classmethod
    def prepare(cls, cfg: DesignatedSharedConfig, model: Crosscoder) -> None:
        n = cfg.n_designated
        with torch.no_grad():
            # Start tied, with the encoder matched to the tied decoder (the usual W_enc = W_dec^T init).
            model.W_dec_FSD[:n, CHAT] = model.W_dec_FSD[:n, BASE]
            model.W_enc_SDF[:, :, :n] = model.W_dec_FSD[:n].permute(1, 2, 0)
        scale_F = torch.ones(cfg.n_latents)
        scale_F[:n] = cfg.shared_penalty_ratio
        model.penalty_scale_F = scale_F

    @classmethod
    def constraint(cls, cfg: DesignatedSharedConfig, n_latents: int) -> TiedDecoders:
        return TiedDecoders(cfg.n_designated)

    @property
    def designated_J(self) -> torch.Tensor:
        """The designated shared latents."""
        return torch.arange(self.cfg.n_designated)
