"""What the crosscoder methods share: a ``Crosscoder`` trained by ``crosscoder.train`` on the pair's
activations (normalised by the norm split's factors), its latents as the items, by default flagged by
Minder et al.'s rule as the model-diff page applies it (``analysis.diff``): chat-only by Δnorm (> 0.9)
and confirmed by Latent Scaling (ν^ε and ν^r below ``nu_threshold``, on latents active on at least
``min_active_tokens`` held-out tokens). A variant changes the crosscoder's config, prepares the fresh
model, keeps a structure of the weights exact through training (a ``Constraint``) or flags differently
by overriding one class method.

``from_crosscoder`` wraps a crosscoder the training pages already trained (``experiment.train_stage``'s
artifact folder) as the fitted L1 or BatchTopK method, flagged here: the same result as fitting that
config, without training it again."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from crosscoder.config import ConfigError, CrosscoderConfig, TrainConfig, _check_float, _check_int
from crosscoder.data.normalise import input_stats
from crosscoder.distributed import resolve_device
from crosscoder.methods.base import (CHAT, METHOD_DIR, Cost, Intervention, Method, MethodConfig, MethodData, check_data,
                                     get)
from crosscoder.model import Crosscoder
from crosscoder.train import Constraint, TensorBatches, train


@dataclass
class CrosscoderMethodConfig(MethodConfig):
    """A crosscoder trained on the pair (the fields every crosscoder method shares)."""

    n_latents: int = 4096
    """Dictionary size F."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation (``TrainConfig``; its l1_coeff is the L1 objective's lambda)."""
    min_active_tokens: int = 5
    """A latent active on fewer held-out tokens is not flagged (its statistics are noise;
    ``DiffOptions.min_active_tokens``)."""
    centre_inputs: bool = False
    """``CrosscoderConfig.centre_inputs``: subtract the norm split's mean before the encoder."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("n_latents", self.n_latents, 1)
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig (or its dict), got {type(self.train).__name__}")
        _check_int("min_active_tokens", self.min_active_tokens, 1)


@dataclass
class ScaledCrosscoderConfig(CrosscoderMethodConfig):
    """A crosscoder whose chat-only latents (Δnorm > 0.9) are flagged when Latent Scaling confirms them."""

    nu_threshold: float = 0.3
    """A chat-only latent is flagged when both Latent Scaling ratios ν^ε and ν^r are below this (the
    model-diff page's ``DiffOptions.nu_threshold``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_float("nu_threshold", self.nu_threshold, 0.0, low_open=True)


def check_objective(cfg: CrosscoderMethodConfig, sparsity: str, k: int) -> None:
    """One set of errors for a crosscoder method's objective: the sparsity name, k for BatchTopK, lambda
    for L1."""
    if sparsity not in ("l1", "batchtopk"):
        raise ConfigError(f"sparsity must be 'l1' or 'batchtopk', got {sparsity!r}")
    _check_int("k", k, 1)
    if sparsity == "batchtopk" and k > cfg.n_latents:
        raise ConfigError(f"k = {k} exceeds n_latents = {cfg.n_latents}; choose k <= n_latents")
    if sparsity == "l1" and cfg.train.l1_coeff == 0:
        raise ConfigError("an L1 crosscoder with train.l1_coeff = 0 has no sparsity penalty; set train.l1_coeff "
                          "> 0 (e.g. 2.0, Kissane et al.'s)")


class CrosscoderMethod(Method):
    """A fitted crosscoder method: the trained ``Crosscoder`` (in eval mode, on the CPU) and its latents."""

    sparsity: ClassVar[str] = "batchtopk"
    """The objective, for configs without a ``sparsity`` field."""

    def __init__(self, cfg: MethodConfig, d_model: int, flagged_J: Tensor, metrics: dict[str, Any],
                 model: Crosscoder):
        super().__init__(cfg, d_model, flagged_J, metrics)
        self.model = model.eval()

    @property
    def n_items(self) -> int:
        return self.model.cfg.n_latents

    def _scores(self, acts_NSD: Tensor, positions_N: Tensor | None) -> Tensor:
        # The latent activations; a BatchTopK model uses its inference threshold (eval mode), so a
        # token's scores do not depend on the rest of its batch.
        return self.model.encode(self.model.normalise(acts_NSD))

    def intervention(self, items_J: Tensor) -> Intervention:
        """Remove the items' chat decoder contribution, sum_j f_j(x) d_j^chat (raw units), from the chat
        residual, f_j read from the token's pair of activations (the base model in lockstep): what
        ``analysis.causal.edit_latents`` does with ``coeff`` -1 on the chat model."""
        return latent_removal(self.model, items_J, lambda pair: self.model.normalise(pair), CHAT,
                              f"f_j d_j^chat of {len(items_J)} latent{'s' if len(items_J) != 1 else ''}")

    def tensors(self) -> dict[str, Tensor]:
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.model.penalty_scale_F is not None:
            out["penalty_scale_F"] = self.model.penalty_scale_F
        return out

    @classmethod
    def _from_tensors(cls, cfg, d_model, flagged_J, tensors, metrics):
        return cls(cfg, d_model, flagged_J, metrics, cls.model_from_tensors(cfg, d_model, tensors))

    @classmethod
    def model_from_tensors(cls, cfg: MethodConfig, d_model: int, tensors: dict[str, Tensor]) -> Crosscoder:
        """The crosscoder saved by ``tensors``."""
        model = Crosscoder(cls.crosscoder_config(cfg, d_model))
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        if "penalty_scale_F" in tensors:
            model.penalty_scale_F = tensors["penalty_scale_F"]
        return model

    # ------------------------------------------------------------------ what a variant overrides
    @classmethod
    def crosscoder_config(cls, cfg: CrosscoderMethodConfig, d_model: int) -> CrosscoderConfig:
        """The crosscoder's architecture for ``cfg`` on activations of width ``d_model``."""
        sparsity = getattr(cfg, "sparsity", cls.sparsity)
        return CrosscoderConfig(d_model=d_model, n_latents=cfg.n_latents, sparsity=sparsity,
                                k=getattr(cfg, "k", CrosscoderConfig.k), centre_inputs=cfg.centre_inputs)

    @classmethod
    def prepare(cls, cfg: CrosscoderMethodConfig, model: Crosscoder) -> None:
        """Adjust the fresh seeded model before training (e.g. set a per-latent cost multiplier)."""

    @classmethod
    def constraint(cls, cfg: CrosscoderMethodConfig, n_latents: int) -> Constraint | None:
        """The structure training must keep exact (None: a plain crosscoder)."""
        return None

    @classmethod
    def flag(cls, cfg: ScaledCrosscoderConfig, model: Crosscoder, data: MethodData) -> tuple[Tensor, dict[str, Any]]:
        """(flagged latents, a JSON summary): chat-only by Δnorm and confirmed by Latent Scaling on the
        held-out split, as ``analysis.diff.chat_only_scaling`` does it."""
        from crosscoder.analysis.diff import chat_only_scaling, confirmed_latents, diff_info
        from crosscoder.analysis.metrics import class_counts

        info = diff_info(model, data.heldout_NSD)
        sc = chat_only_scaling(cls.name, model, info, data.heldout_NSD, nu_threshold=cfg.nu_threshold,
                               min_active_tokens=cfg.min_active_tokens)
        flagged = confirmed_latents(sc.scaling, cfg.nu_threshold).sort().values
        summary = {"classes_delta_norm": class_counts(info.by_delta_norm),
                   **{k: v for k, v in sc.row.items() if k != "crosscoder"}}
        return flagged, summary

    # ------------------------------------------------------------------ fit
    @classmethod
    def _fit(cls, cfg, data, out_dir: Path, *, progress: bool):
        d_model = data.train_NSD.shape[-1]
        cc_cfg = cls.crosscoder_config(cfg, d_model)
        model = Crosscoder(cc_cfg, generator=torch.Generator().manual_seed(cfg.train.seed))
        model.fit_normalisation_(data.norm_NSD)
        cls.prepare(cfg, model)
        model = model.to(resolve_device("auto"))
        res = train(model, TensorBatches(data.train_NSD, cfg.train.batch_size, seed=cfg.train.seed), cfg.train,
                    out_dir, heldout_raw_NSD=data.heldout_NSD.float(), progress=progress,
                    constraint=cls.constraint(cfg, cc_cfg.n_latents))
        # Flag and score on the CPU: the held-out statistics stream from the host anyway.
        model = res.model.cpu().eval()
        flagged, summary = cls.flag(cfg, model, data)
        metrics = {"train_tokens": cfg.train.n_steps * cfg.train.batch_size,
                   "heldout": res.metrics.get("heldout", {}), "flagging": summary}
        return cls(cfg, d_model, flagged, metrics, model)


def latent_removal(model: Crosscoder, items_J: Tensor, read: Callable[[Tensor], Tensor], write_source: int,
                   what: str) -> Intervention:
    """The ``Intervention`` subtracting sum_j f_j d_j from the chat residual: f = ``model.encode(read(pair))``
    (``read``: the pair [N, 2, D] -> the model's input), d_j = latent j's decoder row of ``write_source`` in
    raw units (``analysis.causal.raw_decoder_directions``)."""
    from crosscoder.analysis.causal import raw_decoder_directions

    J = torch.as_tensor(items_J, dtype=torch.long).reshape(-1)
    model.eval()
    dirs_JD = raw_decoder_directions(model, J, write_source)

    def delta(_h_ND: Tensor, pair_NSD: Tensor) -> Tensor:
        dev = model.W_dec_FSD.device
        fJ = model.encode(read(pair_NSD.to(dev)))[:, J.to(dev)]
        return -(fJ @ dirs_JD.to(dev))

    return Intervention(delta, True, f"remove {what}")


SPARSITY_METHOD = {"l1": "crosscoder_l1", "batchtopk": "crosscoder_batchtopk"}
"""The method a trained two-source crosscoder of each objective is."""


def from_crosscoder(folder: str | os.PathLike, data: MethodData, *, nu_threshold: float = 0.3,
                    min_active_tokens: int = 5, out_dir: str | os.PathLike | None = None) -> CrosscoderMethod:
    """A crosscoder trained by ``crosscoder.train`` (its artifact folder, e.g. ``<artifacts_dir>/l1/crosscoder``)
    as the fitted ``crosscoder_l1`` / ``crosscoder_batchtopk`` method on ``data``, flagged here as ``fit``
    flags: the config ``fit`` would take (the run's dictionary size, k and ``TrainConfig``; the given
    flagging options), the same flagged latents and scores, without training again.

    ``data`` must be the activations it was trained on (its normalisation factors must equal the ones
    estimated from ``data.norm_NSD``). The cost is the run's recorded training seconds (NaN when it was
    resumed: the first session's time is not recorded) plus the flagging's, its tokens the run's.
    ``out_dir``: also save the method artifact to ``out_dir/method`` (``methods.load`` reads it back)."""
    from crosscoder import checkpoint as ckpt
    from crosscoder.config import RunConfig

    folder = Path(folder)
    meta = ckpt.read_config(folder)
    if "run" not in meta.get("extra", {}):
        raise ConfigError(f"{folder} has no training run config (config.json extra.run): wrap a crosscoder saved by "
                          f"crosscoder.train, or fit the method with methods.fit")
    run = RunConfig.from_dict(meta["extra"]["run"])
    d_model = check_data(data)
    if run.model.n_sources != 2 or run.model.d_model != d_model:
        raise ConfigError(f"{folder} holds a crosscoder of {run.model.n_sources} sources of width {run.model.d_model}; "
                          f"the data are [tokens, 2, {d_model}]: wrap a base/chat crosscoder of this pair")
    cls = get(SPARSITY_METHOD[run.model.sparsity])
    extra = {"k": run.model.k} if run.model.sparsity == "batchtopk" else {}
    cfg = cls.Config(n_latents=run.model.n_latents, train=run.train, nu_threshold=nu_threshold,
                     min_active_tokens=min_active_tokens, centre_inputs=run.model.centre_inputs, **extra)
    want = cls.crosscoder_config(cfg, d_model)
    # k is unused by the L1 objective (the training stage passes its BatchTopK k to both runs)
    have = dataclasses.replace(run.model, k=want.k) if run.model.sparsity == "l1" else run.model
    if have != want:
        raise ConfigError(f"the crosscoder in {folder} was trained with settings the {cls.name!r} method does not "
                          f"build ({have} vs {want}); fit the method instead")
    model = Crosscoder(want)
    model.load_state_dict(ckpt.load_crosscoder(folder).state_dict())
    model.eval()
    scale = input_stats(data.norm_NSD, want.centre_inputs)[0]
    if not torch.allclose(model.input_scale_S, scale, rtol=1e-5):
        raise ConfigError(f"the crosscoder in {folder} normalises by {model.input_scale_S.tolist()} but data.norm_NSD "
                          f"gives {scale.tolist()}: it was trained on other activations; pass the MethodData of its "
                          f"own activation cache")
    t0 = time.perf_counter()
    flagged, summary = cls.flag(cfg, model, data)
    flag_seconds = time.perf_counter() - t0
    trained = ckpt.read_metrics(folder)
    seconds = (float(trained["wall_seconds_this_session"]) if trained.get("resumed_from_step", 1) == 0
               and "wall_seconds_this_session" in trained else math.nan)
    fitted = cls(cfg, d_model, flagged, {"heldout": trained.get("heldout", {}), "flagging": summary,
                                         "trained_in": folder.as_posix()}, model)
    nbytes = sum(t.numel() * t.element_size() for t in fitted.tensors().values())
    fitted.metrics["cost"] = Cost(seconds + flag_seconds, None, nbytes, run.train.n_steps * run.train.batch_size)._asdict()
    if out_dir is not None:
        fitted.save(Path(out_dir) / METHOD_DIR)
    return fitted
