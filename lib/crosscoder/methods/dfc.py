"""Method 4: the Dedicated Feature Crosscoder (Jiralerspong & Bricken, arXiv 2602.11729; reference code
superkaiba/dfc_learning, ``dictionary_learning/feature_partition.py``).

The dictionary is partitioned: latents [0, n_A) are exclusive to the base model, [n_A, n_A + n_B) to
the chat model, the rest shared (default 5% / 5% / 90%, n = int(frac x F) as the reference's
``from_percentages``). An exclusive latent neither reads nor writes the other model: its encoder
block W_enc[other, :, j] and decoder block W_dec[j, other, :] are exactly zero, from the start and
through training. The trainer zeroes their gradients (so clipping and Adam see only the allowed
weights) and zeroes the blocks again after every optimiser step (``ExclusiveBlocks``): a gradient
mask alone relies on the optimiser adding nothing after it (an Adam moment from before the mask, a
decay term applied inside the step), the projection makes the zeros exact whatever the optimiser.

BatchTopK ranks by f_j x sum_m ||W_dec[j, m]|| (the crosscoder's "sum" rule; an exclusive latent's
sum is its one decoder norm). Flagged: the live latents of the chat-exclusive block (active on at
least ``min_active_tokens`` held-out tokens); the partition, not the decoder norms, says which
latents are chat-specific.

``from_published`` wraps a checkpoint of the reference code (``formats.load_dfc``: weights, partition,
exclusivity zeros checked) as this fitted method, flagged here without training.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crosscoder.analysis.metrics import evaluate
from crosscoder.config import ConfigError, _check_float
from crosscoder.methods._crosscoder import CrosscoderMethod, CrosscoderMethodConfig, check_objective
from crosscoder.methods.base import BASE, CHAT, METHOD_DIR, Cost, MethodData, check_data, register
from crosscoder.model import Crosscoder


@dataclass
class DFCConfig(CrosscoderMethodConfig):
    """A crosscoder with base-exclusive, chat-exclusive and shared latent blocks."""

    sparsity: str = "batchtopk"
    """"batchtopk" (the reference's) or "l1" (``train.l1_coeff`` is lambda)."""
    k: int = 100
    """BatchTopK only: mean active latents per token."""
    base_exclusive_frac: float = 0.05
    """Share of the dictionary exclusive to the base model: latents [0, n_A)."""
    chat_exclusive_frac: float = 0.05
    """Share exclusive to the chat model: latents [n_A, n_A + n_B)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_objective(self, self.sparsity, self.k)
        _check_float("base_exclusive_frac", self.base_exclusive_frac, 0.0, 1.0)
        _check_float("chat_exclusive_frac", self.chat_exclusive_frac, 0.0, 1.0, low_open=True)
        if self.n_chat_exclusive < 1:
            raise ConfigError(f"chat_exclusive_frac = {self.chat_exclusive_frac} of n_latents = {self.n_latents} "
                              f"reserves no chat-exclusive latent, so nothing could be flagged; raise "
                              f"chat_exclusive_frac or n_latents")
        if self.n_base_exclusive + self.n_chat_exclusive >= self.n_latents:
            raise ConfigError(f"the exclusive blocks ({self.n_base_exclusive} + {self.n_chat_exclusive} latents) "
                              f"leave no shared latent of n_latents = {self.n_latents}; lower the exclusive fractions")

    @property
    def n_base_exclusive(self) -> int:
        """n_A = int(base_exclusive_frac x n_latents)."""
        return int(self.base_exclusive_frac * self.n_latents)

    @property
    def n_chat_exclusive(self) -> int:
        """n_B = int(chat_exclusive_frac x n_latents)."""
        return int(self.chat_exclusive_frac * self.n_latents)


class ExclusiveBlocks:
    """``train.Constraint``: latents [0, n_a) are zero in the chat blocks, [n_a, n_a + n_b) in the base
    blocks, of both the encoder and the decoder."""

    def __init__(self, n_a: int, n_b: int, n_latents: int):
        self.forbidden_SF = torch.zeros(2, n_latents, dtype=torch.bool)
        """True where latent j may not touch source s."""
        self.forbidden_SF[CHAT, :n_a] = True
        self.forbidden_SF[BASE, n_a:n_a + n_b] = True

    def _masks(self, model: Crosscoder) -> tuple[Tensor, Tensor]:
        m_SF = self.forbidden_SF.to(model.W_dec_FSD.device)
        return m_SF[:, None, :], m_SF.t()[:, :, None]  # [S, 1, F] for W_enc_SDF, [F, S, 1] for W_dec_FSD

    def project_grads_(self, model: Crosscoder) -> None:
        enc, dec = self._masks(model)
        for p, m in ((model.W_enc_SDF, enc), (model.W_dec_FSD, dec)):
            if p.grad is not None:
                p.grad.masked_fill_(m, 0.0)

    def project_weights_(self, model: Crosscoder) -> None:
        enc, dec = self._masks(model)
        # masked_fill writes +0.0 (a multiply by a 0/1 mask would leave -0.0 and keep NaN)
        model.W_enc_SDF.masked_fill_(enc, 0.0)
        model.W_dec_FSD.masked_fill_(dec, 0.0)


@register
class DedicatedFeatureCrosscoder(CrosscoderMethod):
    """The trained DFC; items = its latents, flagged = the live chat-exclusive latents."""

    name = "dfc"
    Config = DFCConfig

    @classmethod
    def constraint(cls, cfg: DFCConfig, n_latents: int) -> ExclusiveBlocks:
        return ExclusiveBlocks(cfg.n_base_exclusive, cfg.n_chat_exclusive, n_latents)

    @classmethod
    def flag(cls, cfg: DFCConfig, model: Crosscoder, data: MethodData) -> tuple[Tensor, dict[str, Any]]:
        ev = evaluate(model, data.heldout_NSD)
        block = cls.blocks(cfg)
        count_F = (ev.freq_F * ev.n_tokens).round()
        live = {name: idx[count_F[idx] >= cfg.min_active_tokens] for name, idx in block.items()}
        return live["chat"], {f"live {name}-exclusive" if name != "shared" else "live shared": int(len(v))
                              for name, v in live.items()}

    @staticmethod
    def blocks(cfg: DFCConfig) -> dict[str, Tensor]:
        """Latent indices of each block: "base", "chat" (exclusive) and "shared"."""
        a, b = cfg.n_base_exclusive, cfg.n_chat_exclusive
        return {"base": torch.arange(0, a), "chat": torch.arange(a, a + b), "shared": torch.arange(a + b, cfg.n_latents)}



def from_published(folder: str | os.PathLike, data: MethodData, *, min_active_tokens: int = 5,
                   out_dir: str | os.PathLike | None = None) -> DedicatedFeatureCrosscoder:
    """A Dedicated Feature Crosscoder of superkaiba/dfc_learning (its folder: ``model_final.pt`` /
    ``ae.pt`` beside ``config.json``; ``formats.load_dfc``) as the fitted ``dfc`` method on ``data``:
    its partition as the config's exclusive fractions, flagged here as ``fit`` flags (the live
    chat-exclusive latents). The fork's layer 0 is the base model, layer 1 the chat model.

    BatchTopK checkpoints must rank by the sum of per-model decoder norms (the fork's CROSSCODER
    code normalisation, its default), the rule this method's crosscoder uses. The crosscoder carries
    its own normalisation, so ``data`` only needs the same width. The cost has NaN seconds and 0
    tokens: the training happened elsewhere. ``out_dir``: also save the method artifact to
    ``out_dir/method`` (``methods.load`` reads it back)."""
    from crosscoder.formats import load_dfc

    d_model = check_data(data)
    folder = Path(folder)
    pub = load_dfc(folder)
    have, part = pub.model.cfg, pub.partition
    if have.d_model != d_model:
        raise ConfigError(f"the DFC in {folder} reads activations of width {have.d_model}; the data are "
                          f"[tokens, 2, {d_model}]: wrap a DFC of this pair")
    if have.sparsity == "batchtopk" and (have.decoder_norm != "sum" or not have.topk_by_decoder_norm):
        raise ConfigError(f"the DFC in {folder} ranks latents by decoder norm {have.decoder_norm!r}; the dfc method "
                          f"ranks by their sum over the models (the fork's CROSSCODER code normalisation); load "
                          f"its weights with crosscoder.formats.load_dfc instead")
    extra = {"k": have.k} if have.sparsity == "batchtopk" else {}
    cfg = DFCConfig(n_latents=have.n_latents, sparsity=have.sparsity, base_exclusive_frac=part.base_exclusive_frac,
                    chat_exclusive_frac=part.chat_exclusive_frac, min_active_tokens=min_active_tokens, **extra)
    # int(frac * F) both sides; a mismatch would put the blocks elsewhere than the checkpoint's zeros
    assert (cfg.n_base_exclusive, cfg.n_chat_exclusive) == (part.n_base_exclusive, part.n_chat_exclusive)
    cls = DedicatedFeatureCrosscoder
    model = Crosscoder(cls.crosscoder_config(cfg, d_model))
    model.load_state_dict(pub.model.state_dict())
    model.eval()
    t0 = time.perf_counter()
    flagged, summary = cls.flag(cfg, model, data)
    metrics: dict[str, Any] = {"published": {"folder": folder.as_posix(), "partition": part._asdict()},
                               "flag_seconds": time.perf_counter() - t0, "flagging": summary}
    fitted = cls(cfg, d_model, flagged, metrics, model)
    nbytes = sum(t.numel() * t.element_size() for t in fitted.tensors().values())
    fitted.metrics["cost"] = Cost(math.nan, None, nbytes, 0)._asdict()
    if out_dir is not None:
        fitted.save(Path(out_dir) / METHOD_DIR)
    return fitted
