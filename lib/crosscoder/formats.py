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
    (the trainer's ``config.json``). ``activation_global_scale`` is one factor per layer in the DFC
    fork and one factor for all layers (a scalar, from the summed variance) in Minder et al.'s fork
    at 48debb2; both load.

dictionary_learning ``BatchTopKSAE`` (saprmarks' original and Minder et al.'s fork; the diffing
toolkit's ``sae_difference`` trains it on fine-tuned − base differences)
    The trainer writes ``ae.pt`` (original) or ``model_final.pt`` (fork) beside ``config.json``
    (``{"trainer": {"dict_class": "BatchTopKSAE", "activation_dim", "dict_size", "k", ...}, ...}``).
    The state dict holds nn.Linear weights ``encoder.weight`` [F, d], ``encoder.bias`` [F],
    ``decoder.weight`` [d, F] (no bias), ``b_dec`` [d] and the buffers ``k`` and ``threshold``;
    the fork adds ``target_rms``, ``activation_mean`` [d], ``activation_std`` [d] and
    ``activation_global_scale`` (a scalar), all four or none (all-NaN mean: no normaliser). The
    fork's maths, with x_n = (x - mean) * scale (x itself without a normaliser):

        f = ReLU(encoder.weight (x_n - b_dec) + encoder.bias)
            then the batch's k*B largest f, or (inference, ``use_threshold``) f * (f > threshold)
        x̂ = (decoder.weight f + b_dec) / (scale + 1e-8) + mean      (x̂ = decoder.weight f + b_dec)

    The ranking and the threshold compare f itself, not f times a decoder norm (the trainer keeps
    decoder columns at unit norm). ``load_dictionary_learning_sae`` gives a one-source
    ``Crosscoder`` with ``topk_by_decoder_norm=False``, ``input_scale_S`` = scale and b_dec and the
    mean folded into b_enc (b_enc - W_enc (scale * mean + b_dec)), the decoder as for the crosscoder
    above. A threshold never estimated (-1) is kept: our eval-mode ``encode`` then takes the exact
    batch top-k (the fork's ``use_threshold=False``); the fork's default ``use_threshold=True``
    would keep every positive activation. The original's ``normalize_activations`` option rescales
    the biases and threshold before saving (``scale_biases``), so its ``ae.pt`` already reads raw
    activations. A mid-training backup (``{"step", "ae", "optimizer", ...}``) is refused.

Dedicated Feature Crosscoder (superkaiba/dfc_learning, ``DedicatedFeatureBatchTopKCrossCoder`` /
``DedicatedFeatureCrossCoder``)
    A ``BatchTopKCrossCoder`` / ``CrossCoder`` state dict as above plus ``_partition_config``
    (``{"dict_size", "model_a_exclusive_pct", "model_b_exclusive_pct"}``, a plain dict inside the
    torch file). Model A (layer 0, the base model: the fork's paired cache stacks the first store,
    the base model's, first) owns latents [0, n_A), model B (layer 1, chat) [n_A, n_A + n_B), the
    rest are shared, n = int(dict_size * pct) (``FeaturePartition.from_percentages``). The forbidden
    blocks (encoder[1][:, A], decoder[1][A, :], encoder[0][:, B], decoder[0][B, :]) are zero by
    construction (masked at initialisation, masked gradients and Adam moments). The trainer's
    ``config.json`` names the class ``BatchTopKCrossCoder`` and records the fractions only as strings
    in ``dict_class_kwargs``; a torch.compile'd model's state dict lacks ``_partition_config``.
    ``load_dfc`` reads the fractions from ``_partition_config``, else ``dict_class_kwargs``, else
    flat config keys, else assumes the fork's defaults (5% / 5%) as its ``from_pretrained`` does, and
    refuses a checkpoint whose forbidden blocks are not exactly zero (another partition, or no DFC).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

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


_DL_WEIGHTS = ("model.safetensors", "ae.pt", "model_final.pt", "model.pt")
"""Weights file names of the dictionary_learning forks: ``save_pretrained``, the original trainer,
Minder et al.'s trainer, ours for hand-made folders."""


def _dl_state(folder: Path, origin: str) -> dict[str, Any]:
    """The state dict of a dictionary_learning folder, ``_orig_mod.`` (torch.compile) stripped."""
    state = _load_state(folder, _DL_WEIGHTS)
    if isinstance(state.get("ae"), dict) and "encoder.weight" not in state:
        raise ConfigError(f"{origin}: this is a training backup (step {state.get('step')}; keys "
                          f"{sorted(state)}), not a finished dictionary: the trainer overwrites ae.pt "
                          f"with the final weights when training ends")
    if "encoder.weight" not in state and any(k.startswith("_orig_mod.") for k in state):
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if "encoder.weight" not in state:
        raise ConfigError(f"{origin}: no 'encoder.weight' in the state dict; found {sorted(state)}")
    return state


def _global_scale(state: dict, n: int, origin: str) -> torch.Tensor:
    """``activation_global_scale`` as [n]: one per layer, or one scalar for all (broadcast)."""
    c = state["activation_global_scale"]
    if c.numel() == 1:
        return c.double().reshape(1).expand(n).clone()
    if tuple(c.shape) != (n,):
        raise ConfigError(f"{origin}: activation_global_scale has shape {tuple(c.shape)}, expected () or ({n},)")
    return c.double()


def load_dictionary_learning(folder: str | os.PathLike) -> Crosscoder:
    """A dictionary_learning (Minder et al.'s fork) ``CrossCoder`` / ``BatchTopKCrossCoder`` as an
    unfolded ``Crosscoder`` whose ``normalise`` / ``encode`` / ``decode`` / ``denormalise``
    reproduce the fork's ``encode`` / ``decode`` on raw activations (see the module docstring)."""
    folder = Path(folder)
    return _dl_crosscoder(_dl_state(folder, str(folder)), _dl_config(folder), str(folder))


def _dl_crosscoder(state: dict[str, Any], cfg: dict[str, Any], origin: str) -> Crosscoder:
    if state["encoder.weight"].ndim != 3:
        raise ConfigError(f"{origin}: encoder.weight has shape {tuple(state['encoder.weight'].shape)}, expected "
                          f"[layers, d, F]; a 2-d [F, d] weight is an SAE: load it with load_dictionary_learning_sae")
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
            c_S = _global_scale(state, S, origin)
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


# ------------------------------------------------------------------------------------------------
# dictionary_learning BatchTopKSAE (a diff-SAE's format)
# ------------------------------------------------------------------------------------------------
_SAE_NORMALISER = ("target_rms", "activation_mean", "activation_std", "activation_global_scale")
"""The fork's ``NormalizableMixin`` buffers: its ``from_pretrained`` takes all four or none."""


def load_dictionary_learning_sae(folder: str | os.PathLike) -> Crosscoder:
    """A dictionary_learning ``BatchTopKSAE`` folder as an unfolded one-source BatchTopK ``Crosscoder``
    whose ``normalise`` / ``encode`` / ``decode`` / ``denormalise`` reproduce the SAE's ``encode`` /
    ``decode`` on its raw inputs (see the module docstring). The input is whatever the SAE was
    trained on; ``methods.diff_sae.from_published`` wraps a difference SAE as the diff-SAE method."""
    folder = Path(folder)
    origin = str(folder)
    cfg = _dl_config(folder)
    # checked before the weights are read: a crosscoder or another SAE class has other maths
    if cfg.get("dict_class") not in (None, "BatchTopKSAE"):
        raise ConfigError(f"{origin}: config.json says dict_class {cfg['dict_class']!r}; this loader reads "
                          f"BatchTopKSAE (a crosscoder loads with load_dictionary_learning)")
    state = _dl_state(folder, origin)
    if state["encoder.weight"].ndim != 2:
        raise ConfigError(f"{origin}: encoder.weight has shape {tuple(state['encoder.weight'].shape)}, expected "
                          f"[dict_size, activation_dim] (nn.Linear); a 3-d [layers, d, F] weight is a "
                          f"crosscoder: load it with load_dictionary_learning")
    F, d = (int(n) for n in state["encoder.weight"].shape)
    for key, want in (("activation_dim", d), ("dict_size", F)):
        if cfg.get(key) is not None and int(cfg[key]) != want:
            raise ConfigError(f"{origin}: config says {key} = {cfg[key]} but encoder.weight has shape ({F}, {d}) "
                              f"([dict_size, activation_dim])")
    if "k" in state:
        k = int(state["k"].item())
        if cfg.get("k") is not None and int(cfg["k"]) != k:
            raise ConfigError(f"{origin}: config says k = {cfg['k']} but the state dict holds k = {k}")
    elif cfg.get("k") is not None:
        k = int(cfg["k"])
    else:
        raise ConfigError(f"{origin}: no k in the state dict or config.json; a BatchTopKSAE saves its k buffer")
    if not 1 <= k <= F:
        raise ConfigError(f"{origin}: k = {k} must lie in [1, dict_size = {F}]")
    W_enc_DF = _expect(state, "encoder.weight", (F, d), origin).double().t()
    b_enc_F = _expect(state, "encoder.bias", (F,), origin).double()
    W_dec_FD = _expect(state, "decoder.weight", (d, F), origin).double().t()
    b_dec_D = _expect(state, "b_dec", (d,), origin).double()
    present = [key for key in _SAE_NORMALISER if key in state]
    if present and len(present) != len(_SAE_NORMALISER):
        raise ConfigError(f"{origin}: normaliser buffers {[k for k in _SAE_NORMALISER if k not in present]} "
                          f"missing (found {present}); the fork saves all four or none")
    c, mean_D, shrink = 1.0, torch.zeros(d, dtype=torch.float64), 1.0
    if present and not torch.isnan(state["activation_mean"]).any():
        mean_D = _expect(state, "activation_mean", (d,), origin).double()
        _expect(state, "activation_std", (d,), origin)
        if state["activation_global_scale"].numel() != 1:
            raise ConfigError(f"{origin}: activation_global_scale has shape "
                              f"{tuple(state['activation_global_scale'].shape)}, expected a scalar")
        c = float(state["activation_global_scale"].double())
        shrink = c / (c + _NORMALISER_EPS)
    # The fork encodes W (c(x - m) - b_dec) + b_enc; ours W (c x) + b_enc', so b_enc' absorbs
    # -W (c m + b_dec). It decodes (W_dec f + b_dec) / (c + eps) + m; our denormalise divides by c.
    b_enc_F = b_enc_F - W_enc_DF.t() @ (c * mean_D + b_dec_D)
    W_dec_FD = W_dec_FD * shrink
    b_dec_D = b_dec_D * shrink + c * mean_D
    # topk_by_decoder_norm=False: the fork ranks and thresholds f itself
    cc = Crosscoder(CrosscoderConfig(d_model=d, n_latents=F, n_sources=1, sparsity="batchtopk", k=k,
                                     topk_by_decoder_norm=False))
    with torch.no_grad():
        cc.W_enc_SDF.copy_(W_enc_DF[None].float())
        cc.b_enc_F.copy_(b_enc_F.float())
        cc.W_dec_FSD.copy_(W_dec_FD[:, None].float())
        cc.b_dec_SD.copy_(b_dec_D[None].float())
        cc.input_scale_S.fill_(c)
        if "threshold" in state:
            if state["threshold"].numel() != 1:
                raise ConfigError(f"{origin}: threshold has shape {tuple(state['threshold'].shape)}, expected a scalar")
            cc.threshold.fill_(float(state["threshold"]))
    return cc


# ------------------------------------------------------------------------------------------------
# Dedicated Feature Crosscoder (superkaiba/dfc_learning)
# ------------------------------------------------------------------------------------------------
DFC_DEFAULT_FRACS = (0.05, 0.05)
"""The fractions the DFC fork's ``from_pretrained`` assumes when a checkpoint records none."""


class DFCPartition(NamedTuple):
    """A DFC's latent blocks: [0, n_A) base-exclusive, [n_A, n_A + n_B) chat-exclusive, the rest shared."""

    n_base_exclusive: int
    """n_A = int(dict_size * model_a_exclusive_pct): the fork's model A, layer 0, the base model."""
    n_chat_exclusive: int
    """n_B = int(dict_size * model_b_exclusive_pct): model B, layer 1, the chat model."""
    base_exclusive_frac: float
    """model_a_exclusive_pct as recorded (``methods.dfc.DFCConfig.base_exclusive_frac``)."""
    chat_exclusive_frac: float
    """model_b_exclusive_pct as recorded (``DFCConfig.chat_exclusive_frac``)."""
    source: str
    """Where the fractions were read: "_partition_config", "config.json dict_class_kwargs",
    "config.json", or "the fork's default" (none recorded)."""

    def blocks(self, n_latents: int) -> dict[str, torch.Tensor]:
        """Latent indices of each block: "base", "chat" (exclusive) and "shared"."""
        a, b = self.n_base_exclusive, self.n_chat_exclusive
        return {"base": torch.arange(0, a), "chat": torch.arange(a, a + b), "shared": torch.arange(a + b, n_latents)}

    def forbidden_SF(self, n_latents: int) -> torch.Tensor:
        """[2, F] True where latent j may not read or write source s (0 base, 1 chat)."""
        a, b = self.n_base_exclusive, self.n_chat_exclusive
        m = torch.zeros(2, n_latents, dtype=torch.bool)
        m[1, :a] = True
        m[0, a:a + b] = True
        return m


class PublishedDFC(NamedTuple):
    model: Crosscoder
    """The crosscoder, as ``load_dictionary_learning`` loads it (forbidden blocks exactly zero)."""
    partition: DFCPartition


def _dfc_fractions(part: Any, cfg: dict, F: int, origin: str) -> tuple[float, float, str]:
    keys = ("model_a_exclusive_pct", "model_b_exclusive_pct")
    if part is not None:
        if not isinstance(part, dict) or not all(k in part for k in keys):
            raise ConfigError(f"{origin}: _partition_config is {part!r}; expected a dict with {list(keys)}")
        if part.get("dict_size") is not None and int(part["dict_size"]) != F:
            raise ConfigError(f"{origin}: _partition_config says dict_size = {part['dict_size']} but the "
                              f"weights have {F} latents")
        found, source = part, "_partition_config"
    elif isinstance(cfg.get("dict_class_kwargs"), dict) and all(k in cfg["dict_class_kwargs"] for k in keys):
        found, source = cfg["dict_class_kwargs"], "config.json dict_class_kwargs"  # the trainer writes str(v)
    elif all(cfg.get(k) is not None for k in keys):
        found, source = cfg, "config.json"
    else:
        return (*DFC_DEFAULT_FRACS, "the fork's default")
    try:
        a, b = (float(found[k]) for k in keys)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: partition fractions {[found[k] for k in keys]} ({source}) are not "
                          f"numbers") from None
    return a, b, source


def load_dfc(folder: str | os.PathLike) -> PublishedDFC:
    """A Dedicated Feature Crosscoder checkpoint of superkaiba/dfc_learning: the crosscoder (as
    ``load_dictionary_learning``: the fork's encode / decode on raw activations) and its partition,
    refused unless every forbidden encoder and decoder weight is exactly zero (see the module
    docstring). ``methods.dfc.from_published`` wraps it as the fitted ``dfc`` method."""
    folder = Path(folder)
    origin = str(folder)
    cfg = _dl_config(folder)
    state = _dl_state(folder, origin)
    part = state.pop("_partition_config", None)
    model = _dl_crosscoder(state, cfg, origin)
    S, F = model.cfg.n_sources, model.cfg.n_latents
    if S != 2:
        raise ConfigError(f"{origin}: a DFC diffs two models (layers 0 base, 1 chat); this crosscoder has {S} layers")
    a, b, source = _dfc_fractions(part, cfg, F, origin)
    n_a, n_b = int(F * a), int(F * b)  # FeaturePartition.from_percentages
    if n_a < 0 or n_b < 0 or n_a + n_b > F:
        raise ConfigError(f"{origin}: partition fractions {a}, {b} ({source}) give {n_a} + {n_b} exclusive "
                          f"latents of {F}; each must be >= 0 and their sum <= {F}")
    partition = DFCPartition(n_a, n_b, a, b, source)
    forbidden_SF = partition.forbidden_SF(F)
    # != 0 also catches NaN; the fork's construction leaves exact zeros (-0.0 compares equal)
    bad_enc_SF = (model.W_enc_SDF != 0).any(dim=1) & forbidden_SF
    bad_dec_SF = (model.W_dec_FSD != 0).any(dim=2).t() & forbidden_SF
    if bad_enc_SF.any() or bad_dec_SF.any():
        s, j = (bad_enc_SF | bad_dec_SF).nonzero()[0].tolist()
        raise ConfigError(f"{origin}: {int(bad_enc_SF.sum())} encoder and {int(bad_dec_SF.sum())} decoder latent "
                          f"blocks the partition forbids are nonzero (first: latent {j}, layer {s}), under the "
                          f"partition {n_a} base- / {n_b} chat-exclusive latents ({source}); the checkpoint is no "
                          f"DFC of that partition")
    return PublishedDFC(model, partition)
