"""Per-source normalisation factors (one scalar per source so that E||x_s|| = sqrt(d))."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from crosscoder.config import ConfigError


def estimate_input_scale(acts_NSD: Tensor) -> Tensor:
    """scale_s = sqrt(d) / mean_n ||x_ns||.

    Pass activations WITHOUT BOS positions (BOS residuals are huge outliers that would shrink the
    scale of every other token) and from data outside the training batches.
    """
    if acts_NSD.ndim != 3 or acts_NSD.shape[0] == 0:
        raise ConfigError(
            f"estimate_input_scale needs a non-empty [N, S, d] tensor, got {tuple(acts_NSD.shape)}"
        )
    if not torch.isfinite(acts_NSD).all():
        raise ConfigError("activations contain NaN or Inf; fix the extraction before estimating scales")
    mean_norm_S = acts_NSD.double().norm(dim=-1).mean(0)
    if (mean_norm_S == 0).any():
        raise ConfigError("a source has all-zero activations; its normalisation is undefined")
    return (math.sqrt(acts_NSD.shape[-1]) / mean_norm_S).float()


def input_stats(acts_NSD: Tensor, centre: bool) -> tuple[Tensor, Tensor | None]:
    """(scale_S, mean_SD or None) of raw norm-split activations: with ``centre``, the mean of each
    source and the scale of the centred activations (``CrosscoderConfig.centre_inputs``)."""
    x = acts_NSD.float()
    mean_SD = x.mean(0) if centre else None
    return estimate_input_scale(x - mean_SD if centre else x), mean_SD
