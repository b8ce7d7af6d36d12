"""One-call stages for the notebooks: the experiment (models + data + cache) described by flat
parameters, resolved to the library's configs, with every artifact cached by its config hash.

``ExperimentConfig`` is what every notebook of a profile shares (runs.yaml passes the same block to
each): either the embedded organism (``organism_preset``) or two hub models (Gemma-2-2B / -it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from crosscoder.data.pair import ModelPair, ModelPairConfig, load_pair
from crosscoder.data.buffer import StreamingBuffer
from crosscoder.data.cache import ActivationCache, CacheConfig, build_activation_cache
from crosscoder.config import ConfigError, CrosscoderConfig, TrainConfig, _DictMixin
from crosscoder.distributed import resolve_device
from crosscoder.model import Crosscoder
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.data.text import DataConfig
from crosscoder.train import TensorBatches, TrainResult, train


@dataclass
class ExperimentConfig(_DictMixin):
    """The models, layer and data that every stage of one profile shares."""

    organism_preset: str = "default"
    """Build/use the embedded organism preset ("default", "smoke"); "" to use base_model/chat_model."""
    organism_root: str = "cache/organism"
    """Cache root of organism builds (relative to the repository root)."""
    base_model: str = ""
    """Hub name or folder of the base model (ignored when organism_preset is set)."""
    chat_model: str = ""
    """Hub name or folder of the chat model (ignored when organism_preset is set)."""
    layer: int = 2
    """Residual stream after this block (Gemma-2-2B: 13)."""
    dtype: str = "auto"
    """Model dtype for extraction ("auto": bf16 on GPU, fp32 on CPU)."""
    text_source: str = ""
    """Pretraining text (hub name or file); "" = the organism's pretraining split."""
    chat_source: str = ""
    """Chat conversations (hub name or file); "" = the organism's fine-tuning conversations."""
    chat_fraction: float = 0.5
    """Share of chat sequences in the mix."""
    context_length: int = 128
    """Tokens per sequence (BOS included; Gemma runs use 1024)."""
    n_train_sequences: int = 4096
    """Sequences extracted for training."""
    n_heldout_sequences: int = 256
    """Held-out sequences (evaluation)."""
    n_norm_sequences: int = 64
    """Held-out sequences reserved for the normalisation factors."""
    cache_root: str = "cache/activations"
    """Cache root of activation stores."""
    cache_dtype: str = "float16"
    """Storage dtype of cached activations."""
    seed: int = 0
    """Seed of the data order."""

    def __post_init__(self) -> None:
        if not self.organism_preset and not (self.base_model and self.chat_model):
            raise ConfigError("set organism_preset, or both base_model and chat_model")


class Experiment(NamedTuple):
    cfg: ExperimentConfig
    pair_cfg: ModelPairConfig
    data_cfg: DataConfig
    cache_cfg: CacheConfig
    organism: Any
    """OrganismPaths when the organism is used, else None."""


def resolve(cfg: ExperimentConfig, *, progress: bool = True, layers: list[int] | None = None) -> Experiment:
    """Configs of the experiment; builds the organism first when one is requested (cached)."""
    org = None
    base, chat, text, chats = cfg.base_model, cfg.chat_model, cfg.text_source, cfg.chat_source
    held_text = held_chat = ""
    if cfg.organism_preset:
        from crosscoder.organism import build_organism, preset

        org = build_organism(preset(cfg.organism_preset), cfg.organism_root, progress=progress)
        base, chat = str(org.base_dir), str(org.chat_dir)
        if not text:  # the organism ships its own held-out split: use it, not a hash split
            text, held_text = str(org.pretrain_train), str(org.pretrain_heldout)
        if not chats:
            chats, held_chat = str(org.chat_train), str(org.chat_heldout)
    pair_cfg = ModelPairConfig(base=base, chat=chat, layer=cfg.layer, dtype=cfg.dtype)
    data_cfg = DataConfig(text_source=text or "monology/pile-uncopyrighted",
                          chat_source=chats or "lmsys/lmsys-chat-1m", chat_fraction=cfg.chat_fraction,
                          heldout_text_source=held_text, heldout_chat_source=held_chat,
                          context_length=cfg.context_length, seed=cfg.seed)
    cache_cfg = CacheConfig(n_train_sequences=cfg.n_train_sequences, n_heldout_sequences=cfg.n_heldout_sequences,
                            n_norm_sequences=cfg.n_norm_sequences, dtype=cfg.cache_dtype, layers=layers or [])
    return Experiment(cfg, pair_cfg, data_cfg, cache_cfg, org)


def model_pair(exp: Experiment) -> ModelPair:
    return load_pair(exp.pair_cfg, need_chat_template=exp.data_cfg.chat_fraction > 0)


def activation_cache(exp: Experiment, *, pair: ModelPair | None = None, progress: bool = True) -> ActivationCache:
    return build_activation_cache(exp.pair_cfg, exp.data_cfg, exp.cache_cfg, exp.cfg.cache_root, pair=pair,
                                  progress=progress)


class Splits(NamedTuple):
    train: torch.Tensor
    """Raw training activations [N, S, D] (storage dtype)."""
    heldout: torch.Tensor
    """Raw held-out activations, float32."""
    scale_S: torch.Tensor
    """Normalisation factors estimated on the norm split (BOS excluded)."""


def load_splits(cache: ActivationCache) -> Splits:
    norm = cache.load("norm").float()
    return Splits(cache.load("train"), cache.load("heldout").float(), estimate_input_scale(norm))


def run_configs(d_model: int, *, sparsity: str = "l1", n_latents: int = 2048, l1_coeff: float = 2.0,
                k: int = 32, n_steps: int = 1500, batch_size: int = 1024, lr: float = 5e-4,
                seed: int = 0, auxk_alpha: float = 1 / 32,
                auxk_dead_tokens: int = 10_000_000) -> tuple[CrosscoderConfig, TrainConfig]:
    """The crosscoder and training configs of a training run's flat parameters (the training
    notebook and ``crosscoder.cli train --profile`` both use this, so they name the same run)."""
    cc_cfg = CrosscoderConfig(d_model=d_model, n_latents=n_latents, sparsity=sparsity, k=k)
    tcfg = TrainConfig(n_steps=n_steps, batch_size=batch_size, lr=lr, l1_coeff=l1_coeff, seed=seed,
                       auxk_alpha=auxk_alpha, auxk_dead_tokens=auxk_dead_tokens, log_every=50,
                       eval_every=max(1, n_steps // 10), checkpoint_every=max(1, n_steps // 4))
    return cc_cfg, tcfg


def _fresh_model(cc_cfg: CrosscoderConfig, tcfg: TrainConfig, splits: Splits, device: str) -> Crosscoder:
    """The seeded initial crosscoder with the splits' normalisation factors, on ``device``."""
    model = Crosscoder(cc_cfg, generator=torch.Generator().manual_seed(tcfg.seed))
    model.input_scale_S.copy_(splits.scale_S)
    return model.to(resolve_device(device))


def train_crosscoder(splits: Splits, cc_cfg: CrosscoderConfig, tcfg: TrainConfig, out_dir: str | Path, *,
                     progress: bool = True, device: str = "auto") -> TrainResult:
    """Train (or load the finished / resume the interrupted) crosscoder on the cached splits, on
    ``device`` ("auto": the GPU when there is one; the model stays there)."""
    model = _fresh_model(cc_cfg, tcfg, splits, device)
    return train(model, TensorBatches(splits.train, tcfg.batch_size, seed=tcfg.seed), tcfg, out_dir,
                 heldout_raw_NSD=splits.heldout, progress=progress)


def train_crosscoder_streaming(exp: Experiment, pair: ModelPair, splits: Splits, cc_cfg: CrosscoderConfig,
                               tcfg: TrainConfig, out_dir: str | Path, *, buffer_tokens: int = 1 << 20,
                               progress: bool = True, device: str = "auto") -> TrainResult:
    """Train on activations extracted on the fly from fresh sequences (the Gemma-scale path: the
    cache holds only the held-out and norm splits). Resume replays the stream deterministically."""
    model = _fresh_model(cc_cfg, tcfg, splits, device)
    data = StreamingBuffer(pair, exp.data_cfg, tcfg.batch_size, buffer_tokens=max(buffer_tokens, 4 * tcfg.batch_size),
                           forward_batch=exp.cache_cfg.forward_batch, seed=tcfg.seed)
    return train(model, data, tcfg, out_dir, heldout_raw_NSD=splits.heldout, progress=progress)
