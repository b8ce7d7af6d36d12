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
from crosscoder.data.cache import ActivationCache, CacheConfig, build_activation_cache, cache_folder
from crosscoder.config import ConfigError, CrosscoderConfig, TrainConfig, _DictMixin, default_of
from crosscoder.distributed import resolve_device
from crosscoder.model import Crosscoder
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.data.text import DataConfig
from crosscoder.train import TensorBatches, TrainResult, train


# The hub sources a non-organism experiment reads when text_source / chat_source are left empty.
HUB_TEXT = "monology/pile-uncopyrighted"
HUB_CHAT = "lmsys/lmsys-chat-1m"


@dataclass
class ExperimentConfig(_DictMixin):
    """The models, layer and data that every stage of one profile shares (the embedded organism by
    default). Fields that mirror a library config take its default; the others are declared here."""

    organism_preset: str = "default"
    """Embedded organism preset ("default", "smoke"); empty to use base_model and chat_model."""
    organism_root: str = "cache/organism"
    """Cache root of organism builds (relative to the repository root)."""
    base_model: str = ""
    """Hub name or folder of the base model, e.g. google/gemma-2-2b (ignored with an organism)."""
    chat_model: str = ""
    """Hub name or folder of the chat model, e.g. google/gemma-2-2b-it (ignored with an organism)."""
    layer: int = 3
    """Read the residual stream after this block; 3 (the last) for the default organism, where its
    chat model writes the planted decisions (probe table, model-diff page), 13 for Gemma."""
    dtype: str = default_of(ModelPairConfig, "dtype")
    """Model dtype for extraction ("auto": bf16 on GPU, fp32 on CPU)."""
    text_source: str = ""
    """Pretraining text, hub name or file; empty for the organism's text (or the Pile on the hub)."""
    chat_source: str = ""
    """Chat conversations, hub name or file; empty for the organism's chats (or LMSYS-Chat-1M)."""
    chat_fraction: float = default_of(DataConfig, "chat_fraction")
    """Share of chat sequences in the data mix."""
    context_length: int = 128
    """Tokens per sequence, BOS included; 1024 for Gemma."""
    n_train_sequences: int = 4096
    """Sequences extracted for training."""
    n_heldout_sequences: int = default_of(CacheConfig, "n_heldout_sequences")
    """Held-out sequences for evaluation."""
    n_norm_sequences: int = default_of(CacheConfig, "n_norm_sequences")
    """Held-out sequences for the normalisation factors."""
    cache_root: str = "cache/activations"
    """Cache root of activation stores."""
    cache_dtype: str = default_of(CacheConfig, "dtype")
    """Storage dtype of cached activations."""
    seed: int = default_of(DataConfig, "seed")
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
    data_cfg = DataConfig(text_source=text or HUB_TEXT, chat_source=chats or HUB_CHAT, chat_fraction=cfg.chat_fraction,
                          heldout_text_source=held_text, heldout_chat_source=held_chat,
                          context_length=cfg.context_length, seed=cfg.seed)
    cache_cfg = CacheConfig(n_train_sequences=cfg.n_train_sequences, n_heldout_sequences=cfg.n_heldout_sequences,
                            n_norm_sequences=cfg.n_norm_sequences, dtype=cfg.cache_dtype, layers=layers or [])
    return Experiment(cfg, pair_cfg, data_cfg, cache_cfg, org)


def model_pair(exp: Experiment) -> ModelPair:
    """The experiment's two models; their activations on evaluation sets (``sequence_acts``) are kept
    in the activation cache's folder, so that later pages read them instead of running the models."""
    pair = load_pair(exp.pair_cfg, need_chat_template=exp.data_cfg.chat_fraction > 0)
    folder = cache_folder(exp.pair_cfg, exp.data_cfg, exp.cache_cfg, exp.cfg.cache_root)
    return pair._replace(acts_dir=str(folder / "sequences"))


def activation_cache(exp: Experiment, *, pair: ModelPair | None = None, progress: bool = True,
                     base_from: Experiment | None = None) -> ActivationCache:
    """The experiment's activation cache, extracted when missing. ``base_from``: another experiment with
    the same base model and data (a chat fine-tune beside its null fine-tune): when its cache is built,
    its base rows are copied and only this pair's chat model runs (``data.cache.base_donor``)."""
    donor = None if base_from is None else cache_folder(base_from.pair_cfg, base_from.data_cfg, base_from.cache_cfg,
                                                        base_from.cfg.cache_root)
    return build_activation_cache(exp.pair_cfg, exp.data_cfg, exp.cache_cfg, exp.cfg.cache_root, pair=pair,
                                  progress=progress, base_from=donor)


class Splits(NamedTuple):
    train: torch.Tensor
    """Raw training activations [N, S, D] (storage dtype)."""
    heldout: torch.Tensor
    """Raw held-out activations, float32."""
    scale_S: torch.Tensor
    """Normalisation factors estimated on the norm split (BOS excluded)."""
    norm: torch.Tensor | None = None
    """Raw norm split, float32: the statistics a model's normalisation is fitted on
    (``Crosscoder.fit_normalisation_``; with ``centre_inputs``, its mean and centred scale)."""


def splits_from(train_NSD: torch.Tensor, heldout_NSD: torch.Tensor, norm_NSD: torch.Tensor) -> Splits:
    """``Splits`` of activations in memory: the normalisation statistics from ``norm_NSD``."""
    norm = norm_NSD.float()
    return Splits(train_NSD, heldout_NSD.float(), estimate_input_scale(norm), norm)


def load_splits(cache: ActivationCache) -> Splits:
    return splits_from(cache.load("train"), cache.load("heldout"), cache.load("norm"))


def _fresh_model(cc_cfg: CrosscoderConfig, tcfg: TrainConfig, splits: Splits, device: str) -> Crosscoder:
    """The seeded initial crosscoder with the splits' normalisation factors, on ``device``."""
    model = Crosscoder(cc_cfg, generator=torch.Generator().manual_seed(tcfg.seed))
    if splits.norm is None:
        model.input_scale_S.copy_(splits.scale_S)
    model.fit_normalisation_(splits.norm)
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


def load_crosscoders(artifacts_dir: str | Path, names) -> dict[str, Crosscoder]:
    """The finished crosscoders of training runs ``names`` (folders under ``artifacts_dir``), in eval mode."""
    from crosscoder.checkpoint import load_crosscoder

    return {name: load_crosscoder(Path(artifacts_dir) / name / "crosscoder").eval() for name in names}


def train_stage(p, exp: Experiment, pair: ModelPair, splits: Splits, *, progress: bool = True,
                device: str = "auto") -> TrainResult:
    """The training run of a train_crosscoder stage's parameters ``p`` (cached or streamed), in the
    folder ``artifacts_dir/run_name`` that the CLI's ``train --profile`` uses too."""
    cc_cfg, tcfg = p.configs(splits.heldout.shape[-1])
    out = f"{p.artifacts_dir}/{p.run_name}"
    if p.stream_training:
        return train_crosscoder_streaming(exp, pair, splits, cc_cfg, tcfg, out, progress=progress, device=device)
    return train_crosscoder(splits, cc_cfg, tcfg, out, progress=progress, device=device)


def ce_recovered_both(exp: Experiment, pair: ModelPair, crosscoder: Crosscoder, input_ids_NT: torch.Tensor,
                      attention_mask_NT: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """CE recovered under both definitions (``analysis.ce.ce_recovered_definitions``) of a crosscoder
    of this experiment's pair on these held-out sequences. The sums that do not depend on the
    crosscoder (clean, zero- and mean-ablated losses) are kept in the activation cache's folder,
    keyed by the sequences and settings, so the next crosscoder of the pair (the BatchTopK page after
    the L1 page) runs only its splice: on gemma-3-270m 2 of the 5 262k-vocabulary unembeddings."""
    import hashlib
    import json

    from crosscoder.analysis.ce import CE_DEFINITIONS, baseline_sums, ce_ratios, ce_sums
    from crosscoder.atomic import write_json_atomic
    from crosscoder.config import config_hash

    ids, am = input_ids_NT.cpu().contiguous(), attention_mask_NT.cpu().contiguous()
    batch_size = 8  # batches change the float64 sums' order: part of the key
    key = config_hash({"ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest(), "shape": list(ids.shape),
                       "mask": hashlib.sha256(am.to(torch.uint8).numpy().tobytes()).hexdigest(),
                       "layer": exp.pair_cfg.layer, "definitions": list(CE_DEFINITIONS),
                       "sources": list(crosscoder.cfg.source_names), "batch_size": batch_size, "mean": "batch"}, 16)
    path = cache_folder(exp.pair_cfg, exp.data_cfg, exp.cache_cfg, exp.cfg.cache_root) / "ce_baselines" / f"{key}.json"
    known = json.loads(path.read_text()) if path.is_file() else None
    sums = ce_sums(pair.models, crosscoder, ids, exp.pair_cfg.layer, attention_mask_NT=am, batch_size=batch_size,
                   definitions=CE_DEFINITIONS, baselines=known)
    if known is None:
        write_json_atomic(path, baseline_sums(sums))
    return ce_ratios(sums)


def sparsity_frontier(p, exp: Experiment, pair: ModelPair, cache: ActivationCache, splits: Splits, *,
                      progress: bool = True) -> list[dict[str, Any]]:
    """The frontier stage: an L1 sweep over ``l1_values`` and a BatchTopK sweep over ``k_values``,
    each crosscoder beside its per-model SAE pair, with held-out FVU, L0 and CE recovered (on
    ``ce_sequences`` held-out sequences); rows also written to ``artifacts_dir/frontier/metrics.json``."""
    from crosscoder.analysis.ce import ce_recovered
    from crosscoder.atomic import write_json_atomic
    from crosscoder.sweep import frontier

    held = cache.heldout_sequences()
    ids, am = held.input_ids_NT[:p.ce_sequences], held.attention_mask_NT[:p.ce_sequences]

    def with_ce(kind, model, sources):
        lms = pair.models if sources is None else [pair.models[s] for s in sources]
        res = ce_recovered(lms, model, ids, exp.cfg.layer, attention_mask_NT=am)
        return {f"ce_recovered_{name}": r["ce_recovered"] for name, r in res.items()}

    tcfg = p.sweep_train_config()
    rows = []
    for sparsity, values in (("l1", p.l1_values), ("batchtopk", p.k_values)):
        cfg = CrosscoderConfig(d_model=splits.train.shape[-1], n_latents=p.n_latents, sparsity=sparsity,
                               k=max(p.k_values))
        got = frontier(TensorBatches(splits.train, tcfg.batch_size), splits.heldout, cache.load("norm").float(), cfg,
                       tcfg, list(values), f"{p.artifacts_dir}/frontier/{sparsity}",
                       extra_eval=with_ce if p.ce_sequences else None, progress=progress)
        rows += [dict(r, sparsity=sparsity) for r in got]
    write_json_atomic(f"{p.artifacts_dir}/frontier/metrics.json",
                      {"rows": rows, "train": tcfg.to_dict(), "n_latents": p.n_latents})
    return rows


def crosslayer_frontier(p, exp: Experiment, *, progress: bool = True) -> tuple[list[dict[str, Any]], list[int]]:
    """The cross-layer stage: BatchTopK crosscoders over every layer of the base model (one per
    k in ``k_values``) beside per-layer SAEs of the same total size; rows also written to
    ``artifacts_dir/crosslayer/metrics.json``. Returns (rows, layers)."""
    from transformers import AutoConfig

    from crosscoder.atomic import write_json_atomic
    from crosscoder.data.pair import text_config
    from crosscoder.sweep import frontier

    name, kw = exp.pair_cfg.source("base")
    n_layers = text_config(AutoConfig.from_pretrained(name, **kw)).num_hidden_layers
    layers = list(range(n_layers))
    cache = activation_cache(resolve(exp.cfg, layers=layers, progress=progress), progress=progress)
    splits = load_splits(cache)
    cfg = CrosscoderConfig(d_model=splits.train.shape[-1], n_latents=p.n_latents - p.n_latents % n_layers,
                           n_sources=n_layers, sparsity="batchtopk", k=max(p.k_values))
    tcfg = p.sweep_train_config()
    rows = frontier(TensorBatches(splits.train, tcfg.batch_size), splits.heldout, cache.load("norm").float(), cfg,
                    tcfg, list(p.k_values), f"{p.artifacts_dir}/crosslayer", progress=progress)
    write_json_atomic(f"{p.artifacts_dir}/crosslayer/metrics.json",
                      {"rows": rows, "layers": layers, "train": tcfg.to_dict()})
    return rows, layers


def cache_summary(cache: ActivationCache, splits: Splits) -> dict[str, Any]:
    """Token and sequence counts per split, and per source the mean raw norm and the normalisation
    factor, with the mean cosine between the two models' activations of the same token."""
    man = cache.manifest
    h = splits.heldout
    out = {
        "counts": {s: {"tokens": man["splits"][s]["n_tokens"], "sequences": man["splits"][s]["n_sequences"]}
                   for s in ("train", "heldout", "norm")},
        "sources": {name: {"mean ||x|| (raw)": float(h[:, s].norm(dim=-1).mean()),
                           "input scale": float(splits.scale_S[s])} for s, name in enumerate(man["sources"])},
    }
    if h.shape[1] == 2:
        out["cosine_N"] = torch.nn.functional.cosine_similarity(h[:, 0], h[:, 1], dim=-1)
    return out


def _run_config(artifacts_dir: str | Path, run_name: str):
    """The ``RunConfig`` (crosscoder + training configs) a finished training run was written with."""
    from crosscoder.checkpoint import read_config
    from crosscoder.config import RunConfig

    return RunConfig.from_dict(read_config(Path(artifacts_dir) / run_name / "crosscoder")["extra"]["run"])


def seed_replicas(artifacts_dir: str | Path, run_name: str, seeds, splits: Splits, *,
                  progress: bool = True) -> dict[int, Crosscoder]:
    """Copies of a finished training run that differ only in their initialisation seed, trained in
    lockstep on the run's own batch stream (same data order), into ``<run_name>-seed<s>``.
    Finished replicas are loaded, not retrained."""
    import dataclasses

    from crosscoder.train import train_many

    if not seeds:  # a profile that repeats no seed (gemma3-organism's controls)
        return {}
    run = _run_config(artifacts_dir, run_name)
    tcfgs = [dataclasses.replace(run.train, seed=s) for s in seeds]
    models = [_fresh_model(run.model, t, splits, "auto") for t in tcfgs]
    dirs = [Path(artifacts_dir) / f"{run_name}-seed{s}" for s in seeds]
    results = train_many(models, TensorBatches(splits.train, run.train.batch_size, seed=run.train.seed), tcfgs, dirs,
                         heldout_raw_NSD=splits.heldout, progress=progress)
    return {s: r.model.eval() for s, r in zip(seeds, results)}


class OtherPair(NamedTuple):
    """Another pair's experiment, cached activations, the training runs repeated on them and, when
    asked for, its loaded models (``other_pair``)."""

    exp: Experiment
    pair: ModelPair | None
    """The pair's language models; None unless ``other_pair(..., with_models=True)``."""
    splits: Splits
    models: dict[str, Crosscoder]


def other_pair(cfg: ExperimentConfig, artifacts_dir: str | Path, run_names, out_dir: str | Path, *,
               with_models: bool = False, progress: bool = True, base_from: Experiment | None = None) -> OtherPair:
    """The finished runs ``run_names`` of ``artifacts_dir`` repeated on the pair of ``cfg`` (e.g. base vs a
    null fine-tune, or an organism variant): resolve it, extract (or load) its activations and train (or
    load) the replicas into ``out_dir`` (``null_replicas``).

    The pair's language models are loaded only for the extraction (and freed after it) unless
    ``with_models``: on gemma-3-270m they are 2.1 GB in float32, and the controls page, which held
    them beside its own pair's while the null organism was fine-tuned, peaked at 10.6 GiB. ``base_from``:
    the experiment whose cache lends its base rows when the two pairs share a base (``activation_cache``)."""
    exp = resolve(cfg, progress=progress)
    splits = load_splits(activation_cache(exp, progress=progress, base_from=base_from))
    pair = model_pair(exp) if with_models else None
    return OtherPair(exp, pair, splits, null_replicas(artifacts_dir, run_names, splits, out_dir, progress=progress))


def null_replicas(artifacts_dir: str | Path, run_names, null_splits: Splits, out_dir: str | Path, *,
                  progress: bool = True) -> dict[str, Crosscoder]:
    """The finished training runs ``run_names`` (their crosscoder and training configs, seeds included)
    repeated on another pair's cached activations, e.g. base vs a null fine-tune, into
    ``out_dir/<run_name>``; finished ones are loaded, not retrained."""
    out = {}
    for name in run_names:
        run = _run_config(artifacts_dir, name)
        res = train_crosscoder(null_splits, run.model, run.train, Path(out_dir) / name, progress=progress)
        out[name] = res.model.eval()
    return out
