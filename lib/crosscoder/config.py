"""Configuration dataclasses for the crosscoder and its training.

Every config validates itself in ``__post_init__`` (so a bad value fails before any tensor is
allocated) and round-trips through plain dicts / JSON, which is how checkpoints and papermill
parameters carry them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T", bound="_DictMixin")


class ConfigError(ValueError):
    """A configuration or input is invalid. The message names the problem and the fix."""


class _DictMixin:
    """dict/JSON round trip with a clear error for unknown keys."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} key(s) {unknown}; valid keys are {sorted(names)}"
            )
        kwargs = dict(d)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            # JSON has no tuples; restore them so that equality after a round trip holds.
            if f.name in kwargs and isinstance(kwargs[f.name], list) and "tuple" in str(f.type):
                kwargs[f.name] = tuple(kwargs[f.name])
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[T], s: str) -> T:
        return cls.from_dict(json.loads(s))

    def config_hash(self) -> str:
        """Short stable hash of the config: the key of caches and run folders it produces."""
        return config_hash(self.to_dict())


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable hex hash of a JSON-able object (key order ignored): the one way caches and artifact
    folders are keyed by the configs that produced them."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low) or value > high:
        lo = "(" if low_open else "["
        raise ConfigError(f"{name} must be a finite number in {lo}{low}, {high}], got {value!r}")


DECODER_NORMS = ("sum", "joint", "mixed", "none")
"""Valid ``CrosscoderConfig.decoder_norm`` values."""


@dataclass
class CrosscoderConfig(_DictMixin):
    """Architecture of an acausal crosscoder over S sources (models or layers)."""

    d_model: int
    """Width of each source's activation vector (2304 for Gemma-2-2B)."""
    n_latents: int
    """Dictionary size F (16,384 in the Gemma replication)."""
    n_sources: int = 2
    """S: 2 for base/chat model diffing, or the number of layers for a cross-layer crosscoder."""
    source_names: tuple[str, ...] = ()
    """One name per source; defaults to ("base", "chat") for S = 2, else ("layer0", ...)."""
    sparsity: str = "l1"
    """"l1": ReLU + decoder-norm-weighted L1 penalty; "batchtopk": top k*B over the batch."""
    decoder_norm: str = "sum"
    """How decoder norms weight a latent in the L1 penalty and the BatchTopK ranking score:
    "sum" = sum_s ||W_dec[i,s]|| (the paper's; favours exclusive latents; dictionary_learning's
    CROSSCODER), "joint" = (sum_s ||W_dec[i,s]||^2)^1/2 (an SAE on the concatenation; SAE),
    "mixed" = mixed_weight_joint * joint + mixed_weight_sum * sum (Anthropic's Jan 2025 update;
    MIXED), "none" = 1 (no decoder-norm weighting; NONE)."""
    mixed_weight_joint: float = 1.0
    """decoder_norm "mixed" only: weight of the joint norm (dictionary_learning's default 1.0)."""
    mixed_weight_sum: float = 0.1
    """decoder_norm "mixed" only: weight of the sum of norms (dictionary_learning's default 0.1)."""
    k: int = 100
    """BatchTopK only: mean number of active latents per token."""
    topk_by_decoder_norm: bool = True
    """BatchTopK only: rank pre-activations by f_i * sum_s ||W_dec[i,s]|| (Minder et al.'s
    crosscoder variant), so selection reflects each latent's contribution to the reconstruction."""
    dec_init_norm: float = 0.08
    """Initial norm of every decoder row per source; W_enc is initialised as W_dec transposed."""
    centre_inputs: bool = False
    """Subtract each source's mean activation (estimated on the norm split) before the encoder and add
    it back after the decoder, with the input scale estimated on the centred activations (as the
    dictionary_learning fork normalises). For residual streams whose mean is most of their norm
    (gemma-3-270m after block 9: 99%), where the encoder's gradient is dominated by the mean direction
    and most BatchTopK latents die."""

    def __post_init__(self) -> None:
        _check_int("d_model", self.d_model, 1)
        _check_int("n_latents", self.n_latents, 1)
        _check_int("n_sources", self.n_sources, 1)
        if not self.source_names:
            names = ("base", "chat") if self.n_sources == 2 else tuple(
                f"layer{i}" for i in range(self.n_sources)
            )
            self.source_names = names
        self.source_names = tuple(self.source_names)
        if len(self.source_names) != self.n_sources or len(set(self.source_names)) != self.n_sources:
            raise ConfigError(
                f"source_names {self.source_names} must hold {self.n_sources} distinct names "
                f"(one per source)"
            )
        if self.sparsity not in ("l1", "batchtopk"):
            raise ConfigError(f"sparsity must be 'l1' or 'batchtopk', got {self.sparsity!r}")
        if self.decoder_norm not in DECODER_NORMS:
            raise ConfigError(
                f"decoder_norm must be one of {DECODER_NORMS}, got {self.decoder_norm!r}"
            )
        _check_float("mixed_weight_joint", self.mixed_weight_joint, 0.0)
        _check_float("mixed_weight_sum", self.mixed_weight_sum, 0.0)
        if self.decoder_norm == "mixed" and self.mixed_weight_joint + self.mixed_weight_sum == 0:
            raise ConfigError("decoder_norm 'mixed' needs mixed_weight_joint + mixed_weight_sum > 0")
        _check_int("k", self.k, 1)
        if self.sparsity == "batchtopk" and self.k > self.n_latents:
            raise ConfigError(
                f"k = {self.k} exceeds n_latents = {self.n_latents}; choose k <= n_latents"
            )
        _check_float("dec_init_norm", self.dec_init_norm, 0.0, low_open=True)


@dataclass
class TrainConfig(_DictMixin):
    """Optimisation of a crosscoder (defaults follow Kissane et al.'s Gemma-2-2B run)."""

    n_steps: int = 1000
    """Number of optimiser steps."""
    batch_size: int = 4096
    """Tokens per step (each token is one [S, d] activation)."""
    lr: float = 5e-5
    """Adam learning rate (constant, then linear decay)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    lr_decay_frac: float = 0.2
    """Fraction of steps at the end over which the lr decays linearly to 0."""
    l1_coeff: float = 2.0
    """lambda of the L1 penalty (L1 crosscoders only)."""
    l1_warmup_frac: float = 0.05
    """Fraction of steps at the start over which lambda rises linearly from 0."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    threshold_momentum: float = 0.99
    """BatchTopK: EMA momentum of the inference threshold (min selected score per batch).
    dictionary_learning uses 0.999 (memory ~1,000 steps); 0.99 (memory ~100 steps) suits runs of
    a few hundred steps, like the organism's."""
    threshold_start_step: int = 0
    """BatchTopK: steps before the threshold EMA starts (its first value is then that step's
    minimum score). 0 = from the first step; dictionary_learning updates only at steps > 1000."""
    auxk_alpha: float = 1 / 32
    """BatchTopK: weight of the AuxK loss that lets dead latents reconstruct the residual error
    (Gao et al. 2024; 1/32 as in dictionary_learning's BatchTopK trainers); 0 disables it."""
    auxk_dead_tokens: int = 10_000_000
    """BatchTopK: a latent inactive for this many training tokens is dead and enters the AuxK loss."""
    auxk_k: int = 0
    """BatchTopK: dead latents per token in the AuxK reconstruction (0 = d_model // 2, Gao et al.)."""
    eval_every: int = 200
    """Evaluate on held-out activations every N steps (and at the end)."""
    log_every: int = 50
    """Write a training-metrics line every N steps (host sync only then)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    seed: int = 0
    """Seed for initialisation and any sampling."""
    bf16_autocast: bool | str = False
    """Run the step's dense GEMMs on bfloat16 copies of their operands (the weights, Adam, gradients,
    losses and sums stay float32): True, False, or "auto" (on CUDA, or on a CPU with bfloat16
    arithmetic, AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower). The dense L1 step is 5
    GEMMs: 1.96x faster on the AVX512-BF16 CPU at d 640 x 2 / F 4,096 / B 1,024; BatchTopK has
    one dense GEMM (1.1-1.2x). The value used is recorded in metrics.json (``bf16_gemms``)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.bf16_autocast, bool) or self.bf16_autocast == "auto"):  # (1 == True: no ints)
            raise ConfigError(f"bf16_autocast must be true, false or 'auto', got {self.bf16_autocast!r}")
        _check_int("n_steps", self.n_steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_float("lr", self.lr, 0.0, low_open=True)
        _check_float("beta1", self.beta1, 0.0, 1.0)
        _check_float("beta2", self.beta2, 0.0, 1.0)
        _check_float("lr_decay_frac", self.lr_decay_frac, 0.0, 1.0)
        if not isinstance(self.l1_coeff, (int, float)) or self.l1_coeff < 0:
            raise ConfigError(f"l1_coeff (lambda) must be >= 0, got {self.l1_coeff!r}")
        _check_float("l1_coeff", self.l1_coeff, 0.0)
        _check_float("l1_warmup_frac", self.l1_warmup_frac, 0.0, 1.0)
        _check_float("grad_clip", self.grad_clip, 0.0)
        _check_float("threshold_momentum", self.threshold_momentum, 0.0, 1.0)
        _check_int("threshold_start_step", self.threshold_start_step, 0)
        if self.threshold_start_step >= self.n_steps:
            raise ConfigError(
                f"threshold_start_step = {self.threshold_start_step} leaves no step to estimate the "
                f"BatchTopK inference threshold in a run of n_steps = {self.n_steps}; lower it"
            )
        _check_float("auxk_alpha", self.auxk_alpha, 0.0)
        _check_int("auxk_dead_tokens", self.auxk_dead_tokens, 1)
        _check_int("auxk_k", self.auxk_k, 0)
        _check_int("eval_every", self.eval_every, 1)
        _check_int("log_every", self.log_every, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_int("seed", self.seed, 0)

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step``: constant, then linear decay to 0 over the last lr_decay_frac."""
        decay_start = self.n_steps * (1 - self.lr_decay_frac)
        if step < decay_start or self.lr_decay_frac == 0:
            return self.lr
        return self.lr * max(0.0, (self.n_steps - step) / (self.n_steps - decay_start))

    def l1_coeff_at(self, step: int) -> float:
        """lambda at ``step``: linear warm-up over the first l1_warmup_frac of steps."""
        warm = self.n_steps * self.l1_warmup_frac
        if warm == 0 or step >= warm:
            return self.l1_coeff
        return self.l1_coeff * step / warm


@dataclass
class RunConfig(_DictMixin):
    """A full training run: what the trainer writes to ``config.json`` beside the weights."""

    model: CrosscoderConfig
    """The crosscoder architecture."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation schedule."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        unknown = sorted(set(d) - {"model", "train"})
        if unknown:
            raise ConfigError(f"unknown RunConfig key(s) {unknown}; valid keys are ['model', 'train']")
        return cls(
            model=CrosscoderConfig.from_dict(d["model"]),
            train=TrainConfig.from_dict(d.get("train", {})),
        )


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``: lets a config that exposes another config's
    field take its default from there instead of declaring a second one."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ConfigError(f"{cls.__name__}.{name} has no default")
    raise ConfigError(f"{cls.__name__} has no field {name!r}")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (and its bases), by field name."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
