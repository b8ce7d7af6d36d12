"""Method 6: the Activation Difference Lens (Minder et al., arXiv 2510.13900; the diffing-toolkit's
``activation_difference_lens``, docs/ADL_PIPELINE.md).

A narrow fine-tune shifts the chat model's activations on *any* text, most visibly at the first few
positions. ADL takes, for each of a few positions p (default 1-5, counted from BOS = 0 as the cache's
``pos``), the mean difference over documents

    δ̄_p = mean_{tokens n at position p} (h_chat,n − h_base,n)          (raw activation space)

and reads it three ways:

* through the chat model's logit lens (final norm + unembedding, ``logit_lens``; any callable that
  maps [P, D] to logits [P, V], so the maths is testable without a language model),
* as a steering direction (``steering_vector``: δ̄_p scaled to the mean norm of the chat activations),
* as an item scored per token like a latent (the scoreboard's view): the projection of the token's
  difference h_chat − h_base (``score_on`` "difference") or of h_chat ("chat") onto the unit
  direction δ̄_p / ||δ̄_p||.

Flagged: the positions whose mean difference is large against the activations, ||δ̄_p|| / mean
||h_chat|| at p ≥ ``min_relative_norm`` (a null fine-tune's differences are small). The default 0.05 is a
placeholder: the scoreboard sets the cut on validation data (``Method.with_cut``,
``analysis.scoreboard.tune_cut``).

Sign. δ̄_p's orientation is the fine-tune's mean shift, not a detector's: a behaviour may sit where
tokens shift *less* than average (AUROC near 0 with the fitted sign). Each item's score is therefore
multiplied by a sign, +1 as fitted, which the scoreboard chooses on validation data (``free_sign``,
``with_signs``, ``analysis.scoreboard.tune_signs``); the artifact stores it.

Intervention (the causal check). Removing item p removes the token's score along its direction:
with score_on "difference", h_chat ← h_chat − <h_chat − h_base, u> u (the chat residual's component
along u set to the base model's, the base run in lockstep); with "chat", h_chat ← h_chat −
<h_chat, u> u (directional ablation, Arditi et al. 2024). Several items: the same on the span of
their directions (orthonormalised). Independent of the sign. Control: as many random directions.

Pass only plain-text tokens for the means (the paper's setting): a token whose position is -1 in
``MethodData.train_pos_N`` is ignored, so marking chat tokens -1 excludes them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from crosscoder.config import ConfigError, _check_float, _check_int
from crosscoder.methods.base import BASE, CHAT, Intervention, Method, MethodConfig, MethodData, register

SCORE_ON = ("difference", "chat")
CONTROL_STREAM = 0x5AD1_0000
"""Offset of the seeds of ``control``'s random directions."""
"""Valid ``ADLConfig.score_on`` values."""


@dataclass
class ADLConfig(MethodConfig):
    """Mean activation differences at the first positions of plain text."""

    positions: tuple[int, ...] = (1, 2, 3, 4, 5)
    """Token positions (BOS = 0) whose mean difference is one item each."""
    score_on: str = "difference"
    """What a token's score projects onto a direction: "difference" (h_chat − h_base) or "chat" (h_chat)."""
    min_relative_norm: float = 0.05
    """Flag position p when ||δ̄_p|| / mean ||h_chat|| at p is at least this."""
    min_tokens: int = 10
    """Fewest training tokens at each position (fewer: the mean is noise, and the fit refuses)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.positions = tuple(self.positions)
        if not self.positions or len(set(self.positions)) != len(self.positions) or any(
                isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in self.positions):
            raise ConfigError(f"positions must be distinct integers >= 0 (BOS = 0), at least one, got "
                              f"{self.positions!r}")
        if self.score_on not in SCORE_ON:
            raise ConfigError(f"score_on must be one of {SCORE_ON}, got {self.score_on!r}")
        _check_float("min_relative_norm", self.min_relative_norm, 0.0)
        _check_int("min_tokens", self.min_tokens, 1)


class MeanDifferences(NamedTuple):
    mean_delta_PD: Tensor
    """δ̄_p = mean of h_chat − h_base over the tokens at each position (float32, raw space)."""
    mean_base_PD: Tensor
    """Mean base activation at each position."""
    mean_chat_PD: Tensor
    """Mean chat activation at each position."""
    chat_norm_P: Tensor
    """Mean ||h_chat|| at each position."""
    count_P: Tensor
    """Tokens averaged at each position."""
    chat_norm: Tensor
    """Mean ||h_chat|| over every token with a position (>= 0): the steering scale."""


@torch.no_grad()
def mean_differences(acts_NSD: Tensor, pos_N: Tensor, positions: tuple[int, ...], *,
                     batch_size: int = 65536) -> MeanDifferences:
    """Per-position means (float64 sums over batches of tokens) of the pair's activations."""
    P, D = len(positions), acts_NSD.shape[-1]
    # slot of each position value (-1: not one of ``positions``)
    top = max(max(positions), int(pos_N.max()) if pos_N.numel() else 0) + 1
    slot_of = torch.full((top + 1,), -1, dtype=torch.long)
    slot_of[torch.tensor(positions)] = torch.arange(P)
    sums = torch.zeros(2, P, D, dtype=torch.float64)
    norm_sum_P = torch.zeros(P, dtype=torch.float64)
    count_P = torch.zeros(P, dtype=torch.long)
    all_norm, all_count = 0.0, 0
    for i in range(0, acts_NSD.shape[0], batch_size):
        x = acts_NSD[i:i + batch_size].double()
        p = pos_N[i:i + batch_size].long()
        keep = p >= 0
        chat_norm_N = x[:, CHAT].norm(dim=-1)
        all_norm += float(chat_norm_N[keep].sum())
        all_count += int(keep.sum())
        slot = torch.where(keep, slot_of[p.clamp(min=0, max=top)], -1)
        sel = slot >= 0
        s = slot[sel]
        sums.index_add_(1, s, x[sel].transpose(0, 1))
        norm_sum_P.index_add_(0, s, chat_norm_N[sel])
        count_P += torch.bincount(s, minlength=P)
    n = count_P.clamp(min=1).double()
    mean_SPD = sums / n[None, :, None]
    return MeanDifferences((mean_SPD[CHAT] - mean_SPD[BASE]).float(), mean_SPD[BASE].float(), mean_SPD[CHAT].float(),
                           (norm_sum_P / n).float(), count_P, torch.tensor(all_norm / max(all_count, 1)))


def relative_norms(means: MeanDifferences) -> Tensor:
    """||δ̄_p|| / mean ||h_chat|| at p, per position."""
    return means.mean_delta_PD.norm(dim=-1) / means.chat_norm_P.clamp_min(1e-30)


def flag_positions(rel_P: Tensor, cfg: ADLConfig) -> Tensor:
    """The items ADL flags: the positions whose relative norm is at least ``cfg.min_relative_norm``."""
    return torch.nonzero(rel_P >= cfg.min_relative_norm).squeeze(1)


class LensReading(NamedTuple):
    top_ids_PK: Tensor
    """Token ids the lens ranks highest for each direction."""
    top_probs_PK: Tensor
    """Their probabilities (softmax of the lens logits)."""


@register
class ActivationDifferenceLens(Method):
    """The fitted ADL; items = one direction δ̄_p per position."""

    name = "adl"
    Config = ADLConfig
    cut_field = "min_relative_norm"
    free_sign = True

    def __init__(self, cfg: ADLConfig, d_model: int, flagged_J: Tensor, metrics: dict[str, Any], means: MeanDifferences,
                 sign_P: Tensor | None = None):
        super().__init__(cfg, d_model, flagged_J, metrics)
        self.means = means
        norm_P1 = means.mean_delta_PD.norm(dim=-1, keepdim=True)
        self.unit_PD = means.mean_delta_PD / norm_P1.clamp_min(1e-30)
        """δ̄_p / ||δ̄_p||: the direction each item projects onto."""
        P = means.mean_delta_PD.shape[0]
        self.sign_P = torch.ones(P) if sign_P is None else torch.as_tensor(sign_P, dtype=torch.float32).reshape(-1)
        """+1 or -1 per item: the sign of its score (fitted: +1; chosen on validation data by the scoreboard)."""
        if self.sign_P.shape != (P,) or not bool(((self.sign_P == 1) | (self.sign_P == -1)).all()):
            raise ConfigError(f"sign_P must hold +1 or -1 for each of the {P} items, got {self.sign_P.tolist()}")

    @property
    def n_items(self) -> int:
        return len(self.cfg.positions)

    def relative_norms(self) -> Tensor:
        """||δ̄_p|| / mean ||h_chat|| at p, per item: the statistic ``min_relative_norm`` cuts."""
        return relative_norms(self.means)

    def cut_statistic(self) -> tuple[Tensor, Tensor]:
        rel_P = self.relative_norms()
        return rel_P, torch.ones_like(rel_P, dtype=torch.bool)

    def flagged_under(self, cfg: ADLConfig) -> Tensor:
        return flag_positions(self.relative_norms(), cfg)

    def _scores(self, acts_NSD: Tensor, positions_N: Tensor | None) -> Tensor:
        return self._projections(acts_NSD) * self.sign_P

    def _projections(self, acts_NSD: Tensor) -> Tensor:
        """[N, P] projections of what ``score_on`` reads onto each unit direction (unsigned)."""
        x_ND = acts_NSD[:, CHAT] - acts_NSD[:, BASE] if self.cfg.score_on == "difference" else acts_NSD[:, CHAT]
        return x_ND @ self.unit_PD.t()

    def with_signs(self, signs_J: Tensor) -> "ActivationDifferenceLens":
        out = copy.copy(self)
        out.sign_P = torch.as_tensor(signs_J, dtype=torch.float32).reshape(-1).clone()
        if out.sign_P.shape != self.sign_P.shape or not bool(((out.sign_P == 1) | (out.sign_P == -1)).all()):
            raise ConfigError(f"signs must hold +1 or -1 for each of the {self.n_items} items, got "
                              f"{out.sign_P.tolist()}")
        out.metrics = {**self.metrics, "signs": out.sign_P.tolist()}
        return out

    # ------------------------------------------------------------------ the causal check
    def intervention(self, items_J: Tensor) -> Intervention:
        """Remove the items' scores along their directions from the chat residual (module docstring)."""
        J = torch.as_tensor(items_J, dtype=torch.long).reshape(-1)
        return self._span_removal(self.unit_PD[J], f"the chat residual's {self._read()} along {len(J)} ADL "
                                                   f"direction{'s' if len(J) != 1 else ''}")

    def control(self, items_J: Tensor, live_J: Tensor, seed: int = 0) -> Intervention:
        """The same removal along as many random directions (seeded): ADL's other items are the mean
        differences of neighbouring positions, nearly parallel to the ablated ones, so they would not
        be a control."""
        n = len(torch.as_tensor(items_J).reshape(-1))
        # a stream of its own: seed s must not replay torch.randn of manual_seed(s), which may have made
        # the very direction under test (as in the tests' planted pairs)
        r_JD = torch.randn(n, self.d_model, generator=torch.Generator().manual_seed(CONTROL_STREAM + seed))
        return self._span_removal(r_JD, "")._replace(what=f"{n} random direction{'s' if n != 1 else ''}")

    def _read(self) -> str:
        return "difference from base" if self.cfg.score_on == "difference" else "component"

    def _span_removal(self, dirs_JD: Tensor, what: str) -> Intervention:
        """h_chat -= Q Q^T x: x = h_chat − h_base ("difference") or h_chat ("chat"), Q an orthonormal basis of
        the directions' span."""
        # the span's basis from the SVD, not QR: a zero direction (a position without a mean shift) or
        # two parallel ones must not add an arbitrary basis vector to what is removed
        q_DJ = torch.zeros(self.d_model, 0)
        if len(dirs_JD):
            u_DJ, s_J, _ = torch.linalg.svd(dirs_JD.double().t(), full_matrices=False)
            q_DJ = u_DJ[:, s_J > 1e-6 * float(s_J.max()) + 1e-30].float()
        diff = self.cfg.score_on == "difference"

        def delta(h_ND: Tensor, pair_NSD: Tensor | None) -> Tensor:
            x_ND = pair_NSD[:, CHAT] - pair_NSD[:, BASE] if diff else h_ND
            q = q_DJ.to(x_ND.device)
            return -((x_ND @ q) @ q.t())

        return Intervention(delta, diff, f"remove {what}")

    @torch.no_grad()
    def logit_lens(self, lens: Callable[[Tensor], Tensor], top_k: int = 20) -> LensReading:
        """The tokens each δ̄_p promotes through ``lens`` ([P, D] -> logits [P, V], e.g. the chat model's
        final norm and unembedding: ``lm_logit_lens(chat_lm)``), top ``top_k`` by probability."""
        logits_PV = lens(self.means.mean_delta_PD).float()
        if logits_PV.ndim != 2 or logits_PV.shape[0] != self.n_items:
            raise ConfigError(f"the lens must map the [{self.n_items}, d_model] directions to [{self.n_items}, "
                              f"vocab] logits, got shape {tuple(logits_PV.shape)}")
        probs_PV = logits_PV.softmax(-1)
        top = probs_PV.topk(min(top_k, probs_PV.shape[-1]), dim=-1)
        return LensReading(top.indices, top.values)

    def steering_vector(self, item: int, strength: float = 1.0) -> Tensor:
        """δ̄ of item ``item`` (its index in ``positions``) rescaled to ``strength`` x the mean norm of the
        chat activations (ADL steers with the direction at the activations' own scale), raw space [D]."""
        return strength * float(self.means.chat_norm) * self.unit_PD[item]

    def tensors(self) -> dict[str, Tensor]:
        return {**{f"means.{k}": v for k, v in self.means._asdict().items()}, "sign_P": self.sign_P}

    @classmethod
    def _from_tensors(cls, cfg, d_model, flagged_J, tensors, metrics):
        # an artifact written before the sign existed has none: its scores were the fitted (+1) ones
        return cls(cfg, d_model, flagged_J, metrics, MeanDifferences(**{k: tensors[f"means.{k}"]
                                                                         for k in MeanDifferences._fields}),
                   tensors.get("sign_P"))

    @classmethod
    def _fit(cls, cfg: ADLConfig, data: MethodData, out_dir: Path, *, progress: bool) -> "ActivationDifferenceLens":
        if data.train_pos_N is None:
            raise ConfigError("ADL needs the position of each training token: pass MethodData(..., train_pos_N=...) "
                              "(MethodData.from_cache reads them from the cache)")
        means = mean_differences(data.train_NSD, data.train_pos_N, cfg.positions)
        short = [p for p, c in zip(cfg.positions, means.count_P.tolist()) if c < cfg.min_tokens]
        if short:
            raise ConfigError(f"positions {short} have fewer than min_tokens = {cfg.min_tokens} training tokens; "
                              f"use longer documents, more of them, or drop those positions")
        rel_P = relative_norms(means)
        flagged = flag_positions(rel_P, cfg)
        metrics = {"train_tokens": int(means.count_P.sum()),
                   "flagging": {"relative_norm": dict(zip(map(str, cfg.positions), rel_P.tolist())),
                                "tokens": dict(zip(map(str, cfg.positions), means.count_P.tolist()))}}
        return cls(cfg, data.train_NSD.shape[-1], flagged, metrics, means)


def lm_logit_lens(lm) -> Callable[[Tensor], Tensor]:
    """The logit lens of a Hugging Face causal LM: its final norm, then its unembedding (a final logit
    soft-cap, as Gemma 2's, is left out: it is monotone, so the top tokens are the same)."""
    from crosscoder.data.pair import decoder

    norm = getattr(decoder(lm), "norm", None)
    if norm is None:
        raise ConfigError(f"cannot find the final norm of {type(lm).__name__} (looked for decoder.norm); pass "
                          f"your own lens callable")
    head = lm.get_output_embeddings()
    p = next(head.parameters())

    def lens(v_PD: Tensor) -> Tensor:
        with torch.no_grad():
            return head(norm(v_PD.to(device=p.device, dtype=p.dtype))).float().cpu()

    return lens
