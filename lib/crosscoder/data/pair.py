"""The model pair and truncated residual-stream extraction.

The same code loads any decoder-only pair that ``transformers`` loads: Gemma-2-2B / -it from the
hub, the embedded organism from local folders, SmolLM2 (Llama), Gemma 3 and Qwen2 pairs,
single-file GGUF checkpoints (a ``base`` / ``chat`` ending in ``.gguf``), and a chat model published
as a PEFT adapter (folder or hub name with an ``adapter_config.json``): its base model is loaded, the
adapter applied and merged, so the hooks see a plain model.
Everything that can be checked from configs and tokenizers is checked BEFORE any weights are
loaded, with one clear error per problem.

Extraction reads the residual stream after block L (== HF ``hidden_states[L + 1]``) and stops the
forward there: a hook on block L raises, so no later block, no final norm and no unembedding run
(the reference implementation ran all 26 layers and the 256k-vocabulary unembedding to read layer 13).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from crosscoder.config import ConfigError, _DictMixin
from crosscoder.distributed import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelPairConfig(_DictMixin):
    """Which two models to diff and where to read them."""

    base: str
    """Hub name or local folder of the base model (e.g. google/gemma-2-2b), or a single-file GGUF
    checkpoint: a local ``folder/model.gguf`` or a hub ``owner/repo/model.gguf``."""
    chat: str
    """The chat fine-tune, in the same forms (e.g. google/gemma-2-2b-it), or a PEFT adapter (a folder
    or hub name holding ``adapter_config.json``, as the diffing-toolkit publishes its organisms): the
    adapter is applied to its base model and merged."""
    layer: int
    """Read the residual stream after this block (HF hidden_states[layer + 1]; 13 for Gemma-2-2B)."""
    dtype: str = "auto"
    """"float32", "bfloat16", "float16", or "auto" (bf16 on GPU, fp32 on CPU)."""
    device: str = "auto"
    """"cpu", "cuda", "cuda:N" or "auto" (cuda when available)."""
    chat_adapter_base: str = ""
    """When ``chat`` is a PEFT adapter: the model to apply it to, in the forms of ``base`` (e.g. a local
    copy of the adapter's base). "" = the adapter's own ``base_model_name_or_path``."""

    def __post_init__(self) -> None:
        if not self.base or not self.chat:
            raise ConfigError("ModelPairConfig needs both a base and a chat model (hub name or folder)")
        if not isinstance(self.chat_adapter_base, str):
            raise ConfigError(f"chat_adapter_base must be a hub name or folder ('' = the adapter's own base), "
                              f"got {self.chat_adapter_base!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ConfigError(f"layer must be a non-negative integer, got {self.layer!r}")
        if self.dtype not in (*DTYPES, "auto"):
            raise ConfigError(f"dtype must be one of {[*DTYPES, 'auto']}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        # Left out at its default so that the cache keys of every pair without an adapter base (all
        # caches written before the field existed) stay as they were.
        if not d["chat_adapter_base"]:
            del d["chat_adapter_base"]
        return d

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def source(self, which: str) -> tuple[str, dict]:
        """(name or folder, extra ``from_pretrained`` kwargs) of the "base" or "chat" model, the
        same for its config, tokenizer and weights: a name ending in .gguf is split into the folder
        or hub repo and ``gguf_file=`` (transformers dequantises GGUF weights to ``dtype``)."""
        return split_source(getattr(self, which))

    def chat_adapter(self) -> ChatAdapter | None:
        """The chat model's adapter and the model it applies to, when ``chat`` is a PEFT adapter."""
        if self.chat.endswith(".gguf"):
            return None
        from transformers.utils.peft_utils import find_adapter_config_file

        # The same look-up transformers' from_pretrained makes for every model it loads: a local file
        # check for a folder, one cached hub request for a hub name.
        if find_adapter_config_file(self.chat) is None:
            return None
        try:
            from peft import PeftConfig
        except ImportError:
            raise ConfigError(f"{self.chat} is a PEFT adapter, and loading it needs peft: "
                              "`.venv/bin/pip install -r requirements.txt`") from None
        declared = PeftConfig.from_pretrained(self.chat).base_model_name_or_path
        base = self.chat_adapter_base or declared
        if not base:
            raise ConfigError(f"the adapter {self.chat} does not name its base model "
                              "(base_model_name_or_path); set chat_adapter_base to the model it applies to")
        return ChatAdapter(self.chat, base)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]


def split_source(name: str) -> tuple[str, dict]:
    """(folder or hub name, extra ``from_pretrained`` kwargs) of a model name: a name ending in
    .gguf is split into its folder or hub repo and ``gguf_file=``."""
    if not name.endswith(".gguf"):
        return name, {}
    folder, file = os.path.split(name)
    return folder or ".", {"gguf_file": file}


class ChatAdapter(NamedTuple):
    """A chat model given as a PEFT adapter on a base model."""

    adapter: str
    """Folder or hub name of the adapter (``adapter_config.json`` + weights)."""
    base: str
    """The model it is applied to (the adapter's ``base_model_name_or_path`` or ``chat_adapter_base``)."""


class ModelPair(NamedTuple):
    base: torch.nn.Module
    chat: torch.nn.Module
    tokenizer: object
    """The shared tokenizer (the chat model's, which carries the chat template)."""
    layer: int
    d_model: int
    acts_dir: str | None = None
    """Where ``sequence_acts`` keeps both models' activations on fixed sequence sets (evaluation
    sets) between pages: the pair's activation-cache folder (``experiment.model_pair``); None
    computes them every time."""

    @property
    def models(self) -> tuple:
        return (self.base, self.chat)


EAGER_ATTENTION = ("gemma2", "gemma3_text", "gemma3")
"""Model types loaded with eager attention: Gemma 2/3 soft-cap attention logits, which transformers'
sdpa path does not (and the reference replications use eager). Others keep transformers' default."""


def text_config(cfg):
    """The language-model part of a config (Gemma 3's multimodal config nests it as text_config)."""
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def validate_pair(cfg: ModelPairConfig, *, need_chat_template: bool = True):
    """Check configs and tokenizers (no weights): same width, same vocabulary, layer in range,
    a chat template when chat data will be rendered, a token to start sequences with.
    Returns (base_config, chat_config, tokenizer); the configs are the text (decoder) configs."""
    from transformers import AutoConfig, AutoTokenizer

    adapter = cfg.chat_adapter()
    (nb, kb), (nc, kc) = cfg.source("base"), split_source(adapter.base) if adapter else cfg.source("chat")
    cb, cc = text_config(AutoConfig.from_pretrained(nb, **kb)), text_config(AutoConfig.from_pretrained(nc, **kc))
    if adapter and cb.hidden_size != cc.hidden_size:
        raise ConfigError(
            f"the chat adapter {adapter.adapter} applies to {adapter.base} (d_model {cc.hidden_size}), but "
            f"the base model {cfg.base} has d_model {cb.hidden_size}; a model-diffing crosscoder needs two "
            f"models of the same width: use the adapter's base as the base model, or set chat_adapter_base")
    if cb.hidden_size != cc.hidden_size:
        raise ConfigError(
            f"the models have different d_model ({cfg.base}: {cb.hidden_size}, {cfg.chat}: "
            f"{cc.hidden_size}); a model-diffing crosscoder needs two models of the same width"
        )
    n_layers = min(cb.num_hidden_layers, cc.num_hidden_layers)
    if cfg.layer >= n_layers:
        raise ConfigError(
            f"layer {cfg.layer} is out of range: the models have {n_layers} blocks (0..{n_layers - 1})"
        )
    tb, tc = AutoTokenizer.from_pretrained(nb, **kb), _chat_tokenizer(adapter, nc, kc)
    if tb.get_vocab() != tc.get_vocab():
        raise ConfigError(
            f"{cfg.base} and {cfg.chat} have different tokenizers/vocabularies; both models must "
            f"read the same token ids"
        )
    if need_chat_template and not getattr(tc, "chat_template", None):
        raise ConfigError(
            f"the chat tokenizer ({cfg.chat}) has no chat template, but the data mix contains chat "
            f"conversations; set chat_fraction = 0 or use a tokenizer with a chat template"
        )
    if tc.bos_token_id is None and tc.eos_token_id is None:
        raise ConfigError(
            f"the chat tokenizer ({cfg.chat}) has neither a BOS nor an EOS token to start sequences "
            f"with; set tokenizer.bos_token in its tokenizer_config.json"
        )
    return cb, cc, tc


def _chat_tokenizer(adapter: ChatAdapter | None, name: str, kw: dict):
    """The chat tokenizer: the chat model's; for an adapter, the adapter's own when it ships one (its
    chat template may differ from the base's), else its base model's."""
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    if adapter is not None and cached_file(adapter.adapter, "tokenizer_config.json",
                                           _raise_exceptions_for_missing_entries=False) is not None:
        return AutoTokenizer.from_pretrained(adapter.adapter)
    return AutoTokenizer.from_pretrained(name, **kw)


def load_pair(cfg: ModelPairConfig, *, need_chat_template: bool = True) -> ModelPair:
    """Validate, then load both models (eval mode, no grad) on ``cfg.device`` in ``cfg.dtype``; a chat
    adapter is applied to its base and merged into it."""
    from transformers import AutoModelForCausalLM

    from crosscoder.progress import hide_library_bars

    cb, cc, tok = validate_pair(cfg, need_chat_template=need_chat_template)
    adapter = cfg.chat_adapter()
    hide_library_bars()
    dev, dt = cfg.resolved_device(), cfg.resolved_dtype()
    models = []
    for which, c in (("base", cb), ("chat", cc)):
        name, kw = split_source(adapter.base) if which == "chat" and adapter else cfg.source(which)
        if c.model_type in EAGER_ATTENTION:
            kw = {**kw, "attn_implementation": "eager"}
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=dt, **kw)
        if which == "chat" and adapter:
            lm = merge_adapter(lm, adapter.adapter)
        models.append(lm.to(dev).eval().requires_grad_(False))
    return ModelPair(models[0], models[1], tok, cfg.layer, cb.hidden_size)


def merge_adapter(lm, adapter: str):
    """``lm`` with the PEFT adapter ``adapter`` applied and merged into its weights: a plain model of
    the same class, so the extraction hooks and ``decoder_layers`` see no adapter wrappers."""
    from peft import PeftModel

    return PeftModel.from_pretrained(lm, adapter).merge_and_unload()


class _Stop(Exception):
    def __init__(self, hidden: Tensor):
        self.hidden = hidden


@torch.no_grad()
def residual_after(lm, input_ids_BT: Tensor, layer: int, attention_mask_BT: Tensor | None = None) -> Tensor:
    """Residual stream after block ``layer`` [B, T, D], running blocks 0..layer only."""

    def stop(_module, _inputs, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(lm)[layer].register_forward_hook(stop)
    try:
        decoder(lm)(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False)
    except _Stop as s:
        return s.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"block {layer} was never reached")  # pragma: no cover


@torch.no_grad()
def extract_pair(pair: ModelPair, input_ids_BT: Tensor, attention_mask_BT: Tensor | None = None,
                 layers: list[int] | None = None, sources: tuple[str, ...] = ("base", "chat")) -> Tensor:
    """Activations [B, T, S, D]: S = 2 (base, chat) at ``pair.layer``, or only the models named in
    ``sources``; or, with ``layers``, S = the listed layers of the BASE model (for a cross-layer
    crosscoder), one forward up to the deepest."""
    dev = next(pair.base.parameters()).device
    ids = input_ids_BT.to(dev)
    am = attention_mask_BT.to(dev) if attention_mask_BT is not None else None
    if layers is None:
        lms = {"base": pair.base, "chat": pair.chat}
        outs = [residual_after(lms[s], ids, pair.layer, am) for s in sources]
        return torch.stack(outs, dim=2)
    return residuals_at(pair.base, ids, layers, am)


@torch.no_grad()
def residuals_at(lm, input_ids_BT: Tensor, layers: list[int], attention_mask_BT: Tensor | None = None) -> Tensor:
    """Residual streams after several blocks [B, T, len(layers), D] from one truncated forward."""
    got: dict[int, Tensor] = {}
    handles = []
    blocks = decoder_layers(lm)
    for l in sorted(set(layers)):
        handles.append(blocks[l].register_forward_hook(
            lambda _m, _i, out, l=l: got.__setitem__(l, out[0] if isinstance(out, tuple) else out)))
    last = max(layers)

    def stop(_module, _inputs, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    handles.append(blocks[last].register_forward_hook(stop))
    try:
        decoder(lm)(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return torch.stack([got[l] for l in layers], dim=2)


_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
                "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers", "h")
"""Where transformers' decoder-only families keep their blocks (Llama, Gemma 2/3, Qwen2, Mistral, ...:
``model.layers``; Gemma 3 multimodal: ``model.language_model.layers``; GPT-2: ``transformer.h``; ...)."""


def decoder(lm) -> torch.nn.Module:
    """The decoder stack without the LM head (called for truncated forwards)."""
    if hasattr(lm, "get_decoder"):
        try:
            dec = lm.get_decoder()
            if dec is not None:
                return dec
        except (AttributeError, NotImplementedError):
            pass
    return getattr(lm, "base_model", lm)


def decoder_layers(lm) -> torch.nn.ModuleList:
    """The list of transformer blocks of a HF causal LM, found by the known attribute paths, else as
    the ModuleList whose length is the config's ``num_hidden_layers``."""
    for path in _LAYER_PATHS:
        obj = lm
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    n = getattr(text_config(lm.config), "num_hidden_layers", None) if hasattr(lm, "config") else None
    for name, mod in lm.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and n is not None and len(mod) == n and "vision" not in name:
            return mod
    raise TypeError(f"cannot find the decoder layers of {type(lm).__name__}; looked at "
                    f"{', '.join(_LAYER_PATHS)} and for a ModuleList of num_hidden_layers blocks")


_RETURNS_TUPLE: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
"""Whether a block returns a tuple (older transformers, GPT-2) or the hidden tensor (transformers 5's
Llama / Gemma families), as seen by ``residual_hook`` the last time the block ran: what a skipped
block must return in its place."""


@contextlib.contextmanager
def residual_hook(lm, layer: int, *, capture: list | None = None, replace: Tensor | None = None,
                  skip_earlier: bool = False) -> Iterator[None]:
    """While active: record (``capture``) and/or overwrite (``replace``) the output of block ``layer``
    (the residual stream after it, == HF ``hidden_states[layer + 1]``).

    ``skip_earlier`` (with ``replace`` of every position): blocks 0..``layer`` are not run, since
    their output is overwritten anyway; the model still embeds the tokens and builds its masks and
    rotary tables, and the later blocks see exactly what a full forward with the replacement gives
    them (so the outputs are identical). Only for full-sequence forwards (no KV cache, which the
    skipped blocks would leave empty). Until the block has been seen running once (its output
    form is unknown) the full forward runs."""
    if skip_earlier and replace is None:
        raise ValueError("skip_earlier needs replace: the skipped blocks' output must be overwritten")
    blocks = decoder_layers(lm)

    def hook(module, _inputs, output):
        _RETURNS_TUPLE[module] = isinstance(output, tuple)
        hidden = output[0] if isinstance(output, tuple) else output
        if capture is not None:
            capture.append(hidden.detach())
        if replace is not None:
            new = replace.to(hidden.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return None

    skipped = []
    if skip_earlier and blocks[layer] in _RETURNS_TUPLE:
        as_tuple = _RETURNS_TUPLE[blocks[layer]]

        def passthrough(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) if as_tuple else hidden
        skipped = list(blocks[: layer + 1])
        for block in skipped:
            block.forward = passthrough  # an instance attribute: nn.Module.__call__ looks it up first
    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        for block in skipped:
            del block.forward
