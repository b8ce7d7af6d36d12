"""Loaders for published crosscoder checkpoints, converted into ``Crosscoder``.

Kissane et al. (HF ``ckkissane/crosscoder-gemma-2-2b-model-diff``)
    A folder with ``cfg.json`` (keys ``d_in``, ``dict_size``, ``dec_init_norm``, ``l1_coeff``, ...)
    and a torch state dict (``cc_weights.pt``) holding W_enc [2, d, F], W_dec [F, 2, d], b_enc [F],
    b_dec [2, d]. The crosscoder was trained on activations multiplied by one fixed factor per model
    (``KISSANE_SCALES``, estimated with BOS included). The factors are not in the checkpoint; the
    public analysis code for this crosscoder multiplies them into W_enc and divides them out of
    W_dec and b_dec ("folds" them) before applying the model to raw activations.
    ``load_kissane(folder, published_scales=True)`` gives exactly that setup (``fold()`` it to work
    on raw activations); without it the scales are 1 and the caller sets ``input_scale_S``.
    Re-estimating them with our BOS-excluded estimator would feed the published weights inputs of
    another scale than the ones they were trained on.

dictionary_learning ``CrossCoder`` / ``BatchTopKCrossCoder`` (Minder et al.'s fork)
    A state dict (``model.safetensors`` from ``save_pretrained``, or a torch file such as
    ``ae.pt`` / ``model_final.pt`` from the trainer; a ``_orig_mod.`` prefix from torch.compile is
    stripped) with ``encoder.weight`` [S, d, F], ``encoder.bias`` [F], ``decoder.weight`` [S, F, d],
    ``decoder.bias`` [S, d], and the buffers

    * ``code_normalization_id``: how decoder norms weight a latent in the L1 penalty and the top-k
      score. 1 CROSSCODER (sum of per-model norms) -> ``decoder_norm="sum"``; 2 SAE (norm of the
      concatenated decoder) -> ``"joint"``; 3 MIXED (alpha_sae * joint + alpha_cc * sum) ->
      ``"mixed"`` with the alphas from the config (defaults 1.0 and 0.1); 4 NONE -> ``"none"``;
      5 DECOUPLED (a separate code and threshold per model) is refused: ``Crosscoder`` has one code.
      Absent (older versions), the fork assumes CROSSCODER, and so do we.
    * newer versions: ``activation_mean`` [S, d], ``activation_std`` [S, d], ``target_rms`` and
      ``activation_global_scale`` [S] (all-NaN mean/std = no normaliser). The model then encodes
      (x - mean_s) * scale_s and decodes x̂ / (scale_s + 1e-8) + mean_s. We set ``input_scale_S`` to
      scale_s and fold the means into the biases (b_enc -= sum_s W_enc[s]^T scale_s mean_s,
      b_dec[s] += scale_s mean_s) and the 1e-8 into W_dec / b_dec, so ``normalise`` + ``encode``
      on raw activations gives the fork's codes and ``denormalise(decode)`` its reconstructions.
    * BatchTopK: ``k`` (scalar) and ``threshold`` (scalar; per-model only for DECOUPLED).

    The layer count is read from the config as ``num_layers`` or ``num_encoder_layers`` and must
    match the weights; a config may be flat (``save_pretrained``) or nested under ``"trainer"``
    (the trainer's ``config.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from crosscoder.config import ConfigError, CrosscoderConfig
from crosscoder.model import Crosscoder

KISSANE_SCALES = (0.2758961493232058, 0.24422852496546169)
"""(base, chat) factors Kissane et al.'s crosscoder was trained with: activations are multiplied
by them (BOS included in their estimate). Source: the public analysis code of that crosscoder,
which folds them into the published weights (recorded in the project's shared notes)."""

CODE_NORMALIZATION = {1: "sum", 2: "joint", 3: "mixed", 4: "none"}
"""dictionary_learning ``CodeNormalization`` value (``code_normalization_id``) -> decoder_norm."""
CODE_NORMALIZATION_NAMES = {"CROSSCODER": 1, "SAE": 2, "MIXED": 3, "NONE": 4, "DECOUPLED": 5}
"""The enum's names (as written in configs) -> its values (``enum.auto()``: 1, 2, ...)."""
_DECOUPLED = 5
_NORMALISER_EPS = 1e-8  # dictionary_learning's NormalizableMixin adds it to the scale when decoding


def _load_state(folder: Path, candidates: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in candidates:
        p = folder / name
        if p.exists():
            if p.suffix == ".safetensors":
                return load_file(str(p))
            return torch.load(p, map_location="cpu", weights_only=True)
    pts = sorted(folder.glob("*.pt")) + sorted(folder.glob("*.safetensors"))
    if len(pts) == 1:
        return _load_state(folder, (pts[0].name,))
    raise FileNotFoundError(f"no weights file ({', '.join(candidates)}) in {folder}")


def _expect(state: dict, key: str, shape: tuple[int, ...], origin: str) -> torch.Tensor:
    if key not in state:
        raise ConfigError(f"{origin}: key {key!r} missing; found {sorted(state)}")
    t = state[key]
    if tuple(t.shape) != shape:
        raise ConfigError(f"{origin}: {key} has shape {tuple(t.shape)}, expected {shape}")
    return t.float()


def load_kissane(folder: str | os.PathLike, *, published_scales: bool = False) -> Crosscoder:
    """Kissane et al.'s crosscoder as an unfolded ``Crosscoder``.

    ``published_scales=True`` sets ``input_scale_S`` to ``KISSANE_SCALES``, the factors the weights
    were trained with, so ``model.normalise(raw)`` feeds them what they expect (and ``fold()``
    gives the folded model of the public analysis code). Otherwise the scales are 1.
    """
    folder = Path(folder)
    with open(folder / "cfg.json") as fh:
        cfg = json.load(fh)
    d, F = int(cfg["d_in"]), int(cfg["dict_size"])
    state = _load_state(folder, ("cc_weights.pt",))
    cc = Crosscoder(
        CrosscoderConfig(d_model=d, n_latents=F, n_sources=2, sparsity="l1",
                         dec_init_norm=float(cfg.get("dec_init_norm", 0.08)))
    )
    with torch.no_grad():
        cc.W_enc_SDF.copy_(_expect(state, "W_enc", (2, d, F), str(folder)))
        cc.W_dec_FSD.copy_(_expect(state, "W_dec", (F, 2, d), str(folder)))
        cc.b_enc_F.copy_(_expect(state, "b_enc", (F,), str(folder)))
        cc.b_dec_SD.copy_(_expect(state, "b_dec", (2, d), str(folder)))
        if published_scales:
            cc.input_scale_S.copy_(torch.tensor(KISSANE_SCALES, dtype=torch.float64).float())
    return cc


def _dl_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        return {}
    with open(path) as fh:
        cfg = json.load(fh)
    if isinstance(cfg.get("trainer"), dict):  # the trainer's {"trainer": ..., "buffer": ...}
        cfg = {**cfg["trainer"], **{k: v for k, v in cfg.items() if k not in ("trainer", "buffer")}}
    return cfg


def _code_normalization(state: dict, cfg: dict, origin: str) -> int:
    if "code_normalization_id" in state:
        value = int(state["code_normalization_id"].item())
    elif "code_normalization" in cfg:
        name = str(cfg["code_normalization"]).split(".")[-1].upper()
        if name not in CODE_NORMALIZATION_NAMES:
            raise ConfigError(f"{origin}: unknown code_normalization {cfg['code_normalization']!r}; "
                              f"known: {sorted(CODE_NORMALIZATION_NAMES)}")
        value = CODE_NORMALIZATION_NAMES[name]
    else:
        value = 1  # older versions saved no id; the fork then assumes CROSSCODER
    if value == _DECOUPLED:
        raise ConfigError(
            f"{origin}: code normalisation DECOUPLED (one code and threshold per model) is not "
            f"supported: Crosscoder has one shared code; load it with dictionary_learning instead"
        )
    if value not in CODE_NORMALIZATION:
        raise ConfigError(f"{origin}: unknown code_normalization_id {value}; supported: "
                          f"{ {v: k for k, v in CODE_NORMALIZATION_NAMES.items()} }")
    return value


def _alpha(cfg: dict, key: str, default: float) -> float:
    """A MIXED weight from the config; absent or null means the fork's constructor default."""
    value = cfg.get(key)
    return default if value is None else float(value)


def load_dictionary_learning(folder: str | os.PathLike) -> Crosscoder:
    """A dictionary_learning (Minder et al.'s fork) ``CrossCoder`` / ``BatchTopKCrossCoder`` as an
    unfolded ``Crosscoder`` whose ``normalise`` / ``encode`` / ``decode`` / ``denormalise``
    reproduce the fork's ``encode`` / ``decode`` on raw activations (see the module docstring)."""
    folder = Path(folder)
    origin = str(folder)
    cfg = _dl_config(folder)
    state = _load_state(folder, ("model.safetensors", "ae.pt", "model_final.pt", "model.pt"))
    if "encoder.weight" not in state and any(k.startswith("_orig_mod.") for k in state):
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if "encoder.weight" not in state:
        raise ConfigError(f"{origin}: no 'encoder.weight' in the state dict; found {sorted(state)}")
    S, d, F = (int(n) for n in state["encoder.weight"].shape)
    for key, want in (("activation_dim", d), ("dict_size", F), ("num_layers", S), ("num_encoder_layers", S)):
        if key in cfg and cfg[key] is not None and int(cfg[key]) != want:
            raise ConfigError(f"{origin}: config says {key} = {cfg[key]} but encoder.weight has "
                              f"shape {tuple(state['encoder.weight'].shape)} ([layers, d, F])")
    if cfg.get("encoder_layers") not in (None, list(range(S))):
        raise ConfigError(f"{origin}: encoder_layers {cfg['encoder_layers']} selects a subset of the "
                          f"input layers; only crosscoders that read every layer are supported")
    code_id = _code_normalization(state, cfg, origin)
    is_topk = "k" in state or "k" in cfg or "BatchTopK" in str(cfg.get("dict_class", ""))
    k = int(state["k"].item()) if "k" in state else int(cfg.get("k", 1))
    cc = Crosscoder(
        CrosscoderConfig(
            d_model=d, n_latents=F, n_sources=S, sparsity="batchtopk" if is_topk else "l1",
            k=min(max(k, 1), F), decoder_norm=CODE_NORMALIZATION[code_id],
            mixed_weight_joint=_alpha(cfg, "code_normalization_alpha_sae", 1.0),
            mixed_weight_sum=_alpha(cfg, "code_normalization_alpha_cc", 0.1),
        )
    )
    W_enc_SDF = _expect(state, "encoder.weight", (S, d, F), origin)
    b_enc_F = _expect(state, "encoder.bias", (F,), origin)
    W_dec_FSD = _expect(state, "decoder.weight", (S, F, d), origin).permute(1, 0, 2)
    b_dec_SD = _expect(state, "decoder.bias", (S, d), origin)
    mean = state.get("activation_mean")
    if mean is not None and not torch.isnan(mean).any():
        # Normaliser: the fork's model space is (x - mean) * c; ours is x * c. Same encoder input
        # up to a constant, absorbed by b_enc; the decoder's output in our space is
        # (W_dec f + b_dec) * c / (c + eps) + c * mean.
        mean_SD = _expect(state, "activation_mean", (S, d), origin).double()
        std_SD = _expect(state, "activation_std", (S, d), origin).double()
        if "activation_global_scale" in state:
            c_S = _expect(state, "activation_global_scale", (S,), origin).double()
        else:
            rms = float(state["target_rms"]) if "target_rms" in state else 1.0
            c_S = rms / torch.sqrt(std_SD.pow(2).sum(-1) + 1e-8)
        shrink_S = c_S / (c_S + _NORMALISER_EPS)
        b_enc_F = (b_enc_F.double() - torch.einsum("sdf,sd->f", W_enc_SDF.double(),
                                                   c_S[:, None] * mean_SD)).float()
        W_dec_FSD = (W_dec_FSD.double() * shrink_S[None, :, None]).float()
        b_dec_SD = (b_dec_SD.double() * shrink_S[:, None] + c_S[:, None] * mean_SD).float()
        input_scale_S = c_S.float()
    else:
        input_scale_S = torch.ones(S)
    with torch.no_grad():
        cc.W_enc_SDF.copy_(W_enc_SDF)
        cc.b_enc_F.copy_(b_enc_F)
        cc.W_dec_FSD.copy_(W_dec_FSD)
        cc.b_dec_SD.copy_(b_dec_SD)
        cc.input_scale_S.copy_(input_scale_S)
        if is_topk and "threshold" in state:
            th = state["threshold"].float()
            if th.numel() != 1:
                raise ConfigError(f"{origin}: per-layer thresholds (decoupled code) are not supported")
            cc.threshold.fill_(float(th))
    return cc
