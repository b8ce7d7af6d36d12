"""Token sequences for activation extraction: a mix of pretraining text and chat conversations.

* Text: records with a ``text`` field (schema of ``monology/pile-uncopyrighted``).
* Chat: records with a ``conversation`` field, a list of {"role", "content"} (schema of
  ``lmsys/lmsys-chat-1m``), rendered with the tokenizer's REAL chat template (Gemma's
  ``<start_of_turn>user ... <end_of_turn>``), never as "User:/Assistant:" text.

Both load through Hugging Face ``datasets``: streaming from the hub for the Gemma profile, and the
same code on local JSONL/parquet files for the organism and the tests. A document goes to the held-out
split iff a hash of its content says so, which is stable under shuffling and streaming, so training
never sees a held-out document. Every sequence starts with BOS, is truncated to the context length
and padded (one document per sequence: no attention across documents); BOS and padding positions
are excluded from the activations (``body_mask``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from crosscoder.config import ConfigError, _DictMixin

ROLES = {"user": "user", "assistant": "assistant", "model": "assistant", "human": "user", "gpt": "assistant"}


@dataclass
class DataConfig(_DictMixin):
    """Where the token sequences come from and how they are mixed."""

    text_source: str
    """Hub dataset name (e.g. monology/pile-uncopyrighted), or a local .jsonl/.json/.parquet file or
    folder, with a text field."""
    chat_source: str
    """Hub dataset name (e.g. lmsys/lmsys-chat-1m) or local file/folder with a conversation field."""
    context_length: int
    """Tokens per sequence, BOS included (longer documents are cut; 1024 in the Gemma replication)."""
    heldout_text_source: str = ""
    """Optional separate held-out text (e.g. the organism's held-out chapters); "" = hash split."""
    heldout_chat_source: str = ""
    """Optional separate held-out conversations; "" = hash split of chat_source."""
    text_field: str = "text"
    """Field holding the document text."""
    chat_field: str = "conversation"
    """Field holding the list of {"role", "content"} turns."""
    chat_fraction: float = 0.5
    """Fraction of sequences drawn from the chat source (0 = text only, 1 = chat only)."""
    min_tokens: int = 8
    """Documents shorter than this (after tokenisation) are skipped."""
    split_documents: bool = True
    """Cut a long text document into several sequences (each starting with BOS) instead of
    keeping only its first context_length tokens. Chat conversations are always truncated."""
    heldout_permille: int = 20
    """Documents whose content hash falls below this (per 1000) form the held-out split."""
    shuffle_buffer: int = 1000
    """Documents in the streaming shuffle buffer of each source."""
    seed: int = 0
    """Seed of the shuffle and of the text/chat interleaving."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.chat_fraction <= 1.0:
            raise ConfigError(f"chat_fraction must lie in [0, 1], got {self.chat_fraction!r}")
        if isinstance(self.context_length, bool) or not isinstance(self.context_length, int) or self.context_length < 3:
            raise ConfigError(f"context_length must be an integer >= 3, got {self.context_length!r}")
        if not 0 < self.heldout_permille < 1000:
            raise ConfigError(f"heldout_permille must lie in (0, 1000), got {self.heldout_permille!r}")


def _is_local(source: str) -> bool:
    return os.path.exists(source)


def load_records(source: str, *, streaming: bool = True, split: str = "train"):
    """An iterable ``datasets`` dataset: hub name (streamed) or local file/folder (same code path)."""
    import datasets

    if _is_local(source):
        p = Path(source)
        files = sorted(str(f) for f in p.iterdir() if f.suffix in (".jsonl", ".json", ".parquet")) if p.is_dir() else [str(p)]
        if not files:
            raise ConfigError(f"{source} holds no .jsonl/.json/.parquet files")
        if all(os.path.getsize(f) == 0 for f in files):
            raise ConfigError(f"the dataset {source} is empty; point the source at data")
        kind = "parquet" if files[0].endswith(".parquet") else "json"
        return datasets.load_dataset(kind, data_files=files, split="train", streaming=streaming)
    return datasets.load_dataset(source, split=split, streaming=streaming)


def _heldout(key: str, permille: int) -> bool:
    return int(hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) % 1000 < permille


def start_id(tokenizer) -> int:
    """The token every sequence starts with: BOS, or EOS for tokenizers without one (Qwen2's
    ``<|endoftext|>``, the document separator of its pretraining). Its position is never used."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start sequences with; "
                          "set bos_token in its tokenizer_config.json")
    return tid


def pad_id(tokenizer) -> int:
    """The padding id (padding is masked out; tokenizers without a pad token pad with the start id)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_id(tokenizer)


def render_chat(tokenizer, conversation, field: str = "conversation") -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, starting with the start
    token (Gemma's template writes BOS itself; ChatML templates such as SmolLM2's and Qwen2's do not,
    and get it prepended so every sequence starts the same way)."""
    if not isinstance(conversation, list) or not conversation:
        raise ConfigError(f"the {field!r} field must be a non-empty list of {{'role', 'content'}} turns")
    msgs = []
    for turn in conversation:
        role = ROLES.get(str(turn.get("role", "")).lower())
        if role is None:
            raise ConfigError(f"unknown chat role {turn.get('role')!r}; expected one of {sorted(ROLES)}")
        msgs.append({"role": role, "content": str(turn.get("content", ""))})
    out = tokenizer.apply_chat_template(msgs, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    out, first = list(out), start_id(tokenizer)
    return out if out and out[0] == first else [first, *out]


def render_text(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [start_id(tokenizer), *ids]


class Sequences(NamedTuple):
    input_ids_NT: Tensor
    """Token ids, BOS first, right-padded with the pad id."""
    attention_mask_NT: Tensor
    """1 on real tokens (BOS included), 0 on padding."""
    is_chat_N: Tensor
    """Whether each sequence came from the chat source."""

    def body_mask(self) -> Tensor:
        """Positions whose activations are used: real tokens except BOS."""
        m = self.attention_mask_NT.bool().clone()
        m[:, 0] = False
        return m


def _documents(cfg: DataConfig, tokenizer, which: str, heldout: bool) -> Iterator[list[int]]:
    source = cfg.text_source if which == "text" else cfg.chat_source
    separate = cfg.heldout_text_source if which == "text" else cfg.heldout_chat_source
    if heldout and separate:
        source = separate
    field = cfg.text_field if which == "text" else cfg.chat_field
    ds = load_records(source)
    ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
    seen = 0
    for rec in ds:
        seen += 1
        if field not in rec:
            raise ConfigError(
                f"{source} has no {field!r} field (fields: {sorted(rec)}); set "
                f"{'text_field' if which == 'text' else 'chat_field'} to the right name"
            )
        value = rec[field]
        key = value if isinstance(value, str) else repr(value)
        if not separate and _heldout(key, cfg.heldout_permille) != heldout:
            continue
        if which == "chat":
            ids = render_chat(tokenizer, value, field)
            if len(ids) >= cfg.min_tokens:
                yield ids[: cfg.context_length]
            continue
        ids = render_text(tokenizer, value)
        if not cfg.split_documents:
            if len(ids) >= cfg.min_tokens:
                yield ids[: cfg.context_length]
            continue
        body, n = ids[1:], cfg.context_length - 1
        for j in range(0, len(body), n):
            piece = [ids[0], *body[j : j + n]]
            if len(piece) >= cfg.min_tokens:
                yield piece
    if seen == 0:
        raise ConfigError(f"the dataset {source} is empty; point {which}_source at data")


def iter_sequences(cfg: DataConfig, tokenizer, *, heldout: bool = False) -> Iterator[tuple[list[int], bool]]:
    """Endless-until-exhausted stream of (token ids, is_chat), text and chat interleaved at random
    with probability ``chat_fraction`` (seeded). Stops when a needed source runs out."""
    import random

    rng = random.Random(cfg.seed + (7 if heldout else 0))
    text = _documents(cfg, tokenizer, "text", heldout) if cfg.chat_fraction < 1 else None
    chat = _documents(cfg, tokenizer, "chat", heldout) if cfg.chat_fraction > 0 else None
    while True:
        use_chat = chat is not None and (text is None or rng.random() < cfg.chat_fraction)
        try:
            yield next(chat if use_chat else text), use_chat  # type: ignore[arg-type]
        except StopIteration:
            return


def batch_sequences(items: list[tuple[list[int], bool]], pad_id: int, context_length: int | None = None) -> Sequences:
    T = context_length or max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    am = torch.zeros((len(items), T), dtype=torch.long)
    for i, (seq, _) in enumerate(items):
        ids[i, : len(seq)] = torch.tensor(seq[:T])
        am[i, : len(seq)] = 1
    return Sequences(ids, am, torch.tensor([c for _, c in items]))


def take_sequences(cfg: DataConfig, tokenizer, n: int, *, heldout: bool = False, skip: int = 0) -> Sequences:
    """The first ``n`` sequences of the stream (after ``skip``), padded to the longest."""
    out = []
    for i, item in enumerate(iter_sequences(cfg, tokenizer, heldout=heldout)):
        if i < skip:
            continue
        out.append(item)
        if len(out) == n:
            break
    if not out:
        raise ConfigError("the data stream yielded no sequences; check the sources and min_tokens")
    return batch_sequences(out, pad_id(tokenizer))
