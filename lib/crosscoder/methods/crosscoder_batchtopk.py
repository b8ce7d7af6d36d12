"""Method 2: the BatchTopK crosscoder (Minder, Dumas et al. 2025: ranking by f_j * sum_m ||W_dec[j, m]||),
flagged by Δnorm and confirmed by Latent Scaling, as the model-diff page does."""

from __future__ import annotations

from dataclasses import dataclass

from crosscoder.methods._crosscoder import CrosscoderMethod, ScaledCrosscoderConfig, check_objective
from crosscoder.methods.base import register


@dataclass
class BatchTopKCrosscoderConfig(ScaledCrosscoderConfig):
    """A BatchTopK crosscoder (train.l1_coeff is unused)."""

    k: int = 100
    """Mean active latents per token."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_objective(self, "batchtopk", self.k)


@register
class BatchTopKCrosscoder(CrosscoderMethod):
    """The trained BatchTopK crosscoder; items = its latents, flagged = chat-only and Latent-Scaling confirmed."""

    name = "crosscoder_batchtopk"
    Config = BatchTopKCrosscoderConfig
    sparsity = "batchtopk"
