"""Method 1: the L1 crosscoder (Anthropic, Oct 2024; Kissane et al.'s replication), flagged as the
model-diff page does: chat-only by Δnorm, confirmed by Latent Scaling (Minder, Dumas et al. 2025)."""

from __future__ import annotations

from dataclasses import dataclass

from crosscoder.methods._crosscoder import CrosscoderMethod, ScaledCrosscoderConfig, check_objective
from crosscoder.methods.base import register


@dataclass
class L1CrosscoderConfig(ScaledCrosscoderConfig):
    """An L1 crosscoder: ReLU latents, decoder-norm-weighted L1 penalty of weight ``train.l1_coeff``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_objective(self, "l1", 1)


@register
class L1Crosscoder(CrosscoderMethod):
    """The trained L1 crosscoder; items = its latents, flagged = chat-only and Latent-Scaling confirmed."""

    name = "crosscoder_l1"
    Config = L1CrosscoderConfig
    sparsity = "l1"
