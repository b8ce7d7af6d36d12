"""Method 2: the BatchTopK crosscoder (Minder, Dumas et al. 2025: ranking by f_j * sum_m ||W_dec[j, m]||),
flagged by Δnorm and confirmed by Latent Scaling, as the model-diff page does."""

from __future__ import annotations

from dataclasses import dataclass

from crosscoder.config import ConfigError, _check_int
from crosscoder.methods._crosscoder import CrosscoderMethod, CrosscoderMethodConfig
from crosscoder.methods.base import register


@dataclass
class BatchTopKCrosscoderConfig(CrosscoderMethodConfig):
    """A BatchTopK crosscoder (train.l1_coeff is unused)."""

    k: int = 100
    """Mean active latents per token."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("k", self.k, 1)
        if self.k > self.n_latents:
            raise ConfigError(f"k = {self.k} exceeds n_latents = {self.n_latents}; choose k <= n_latents")


@register
class BatchTopKCrosscoder(CrosscoderMethod):
    """The trained BatchTopK crosscoder; items = its latents, flagged = chat-only and Latent-Scaling confirmed."""

    name = "crosscoder_batchtopk"
    Config = BatchTopKCrosscoderConfig
    sparsity = "batchtopk"
