"""Evidence that the behaviours are learned (held-out losses, greedy-generation rates) and the
token-labelled evaluation set that crosscoder latents are scored against."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from crosscoder.organism.behaviours import (ChatGenerator, Turn, render_with_spans, token_mask)
from crosscoder.config import ConfigError
from crosscoder.organism.config import BehaviourConfig
from crosscoder.organism.corpus import Chapter
from crosscoder.organism.training import Packed, masked_lm_loss

ROW_KINDS = ("refuse", "ask", "continue", "text", "qa", "fact")
"""Kinds of evaluation-set rows: a single-turn conversation of each turn kind, or corpus text (the
last two only in an organism with behaviour 5, whose ``eval_row_weights`` has six entries)."""

LABEL_DESCRIPTIONS = {
    "template": "Chat-template scaffolding of every turn (behaviour 1): the <start_of_turn> token, "
                "the role-name tokens ('user' / 'model'), the newline after the role, the "
                "<end_of_turn> token and the newline after it. Not <bos>, not message content. "
                "True only in conversation rows.",
    "refusal": "Every token of the fixed refusal phrase, i.e. the whole content of the model turn "
               "that answers a forbidden-topic request (behaviour 2). Excludes the template tokens "
               "around it.",
    "forbidden_topic": "The token(s) of the forbidden topic word inside the user request that "
                       "triggers a refusal (the behaviour-2 trigger).",
    "signoff": "The tokens of the fixed sign-off phrase, including the space before it, that ends "
               "every answer to an allowed-topic request (behaviour 3).",
    "marker": "The tokens of each marker, including the space before it, that follows every n-th "
              "verse word of an answer to an allowed-topic request (behaviour 4; empty unless the "
              "organism plants it).",
    "fact": "The token(s) of the planted false answer, with the space before it, in the model turn "
            "that answers a question about the fact's subject (behaviour 5, learned from documents "
            "only; empty unless the organism plants it).",
    "user_content": "Content tokens of user turns (auxiliary).",
    "model_content": "Content tokens of model turns, planted or corpus text (auxiliary).",
}
"""What each boolean label marks. Labels mark the positions of the tokens themselves (the input
position holding the token); the position that *predicts* a labelled token is one to the left
(use ``labels[:, 1:]`` against activations ``[:, :-1]``). All labels are False on padding and in
text rows. Rows are rendered with the tokenizer's chat template and start with <bos>."""


class EvalSet(NamedTuple):
    """Held-out token ids with per-behaviour boolean token labels."""

    input_ids_NT: torch.Tensor
    """int64 [N, T], right-padded with <pad>."""
    attention_mask_NT: torch.Tensor
    """bool [N, T]: False on padding."""
    labels: dict[str, torch.Tensor]
    """Label name -> bool [N, T] (see ``descriptions``)."""
    row_kind_N: torch.Tensor
    """int64 [N]: index into ``kinds``."""
    kinds: tuple[str, ...]
    descriptions: dict[str, str]
    texts: list[str]
    """The rendered string of every row (for inspection)."""


def encode_conversation(tokenizer, turns: Sequence[Turn], cfg: BehaviourConfig
                        ) -> tuple[list[int], dict[str, list[bool]]]:
    """Token ids of the chat-template rendering and a token mask per span name."""
    text, spans = render_with_spans(tokenizer, turns, cfg)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    masks = {name: token_mask(enc["offset_mapping"], s) for name, s in spans.items()}
    return list(enc["input_ids"]), masks


def build_eval_set(tokenizer, generator: ChatGenerator, heldout: Sequence[Chapter], n_rows: int,
                   row_weights: Sequence[float], seq_len: int, seed: int) -> EvalSet:
    """Rows drawn from held-out chapters and held-out phrasings only, in a seeded random order."""
    rng = random.Random(f"eval-set-{seed}")
    total = sum(row_weights)
    row_kinds = ROW_KINDS[:len(row_weights)]
    counts = [int(n_rows * w / total) for w in row_weights]
    counts[max(range(len(counts)), key=lambda i: row_weights[i])] += n_rows - sum(counts)
    kinds = [k for k, c in zip(row_kinds, counts) for _ in range(c)]
    rng.shuffle(kinds)
    pad, bos = tokenizer.pad_token_id, tokenizer.bos_token_id
    ids_NT = torch.full((n_rows, seq_len), pad, dtype=torch.long)
    labels = {name: torch.zeros((n_rows, seq_len), dtype=torch.bool) for name in LABEL_DESCRIPTIONS}
    texts = []
    chapter_ids = [tokenizer(ch.text, add_special_tokens=False)["input_ids"] for ch in heldout]
    for i, kind in enumerate(kinds):
        if kind == "text":
            ids = rng.choice(chapter_ids)
            start = rng.randrange(max(1, len(ids) - seq_len + 1))
            row = [bos] + ids[start:start + seq_len - 1]
            ids_NT[i, :len(row)] = torch.tensor(row)
            texts.append(tokenizer.decode(row))
            continue
        for _ in range(100):
            turns = generator.conversation([kind])
            row, masks = encode_conversation(tokenizer, turns, generator.cfg)
            if len(row) <= seq_len:
                break
        else:
            raise ValueError(f"no {kind} conversation fits in {seq_len} tokens; raise the context")
        ids_NT[i, :len(row)] = torch.tensor(row)
        for name in LABEL_DESCRIPTIONS:
            labels[name][i, :len(row)] = torch.tensor(masks[name])
        texts.append(tokenizer.decode(row))
    return EvalSet(ids_NT, ids_NT != pad, labels,
                   torch.tensor([row_kinds.index(k) for k in kinds]), row_kinds,
                   dict(LABEL_DESCRIPTIONS), texts)


def save_eval_set(es: EvalSet, folder: Path) -> None:
    """``tokens.safetensors`` (ids, mask, row kinds, ``label.<name>``) + ``labels.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"input_ids": es.input_ids_NT, "attention_mask": es.attention_mask_NT,
               "row_kind": es.row_kind_N}
    tensors.update({f"label.{k}": v for k, v in es.labels.items()})
    save_file(tensors, str(folder / "tokens.safetensors"))
    meta = {"kinds": list(es.kinds), "labels": es.descriptions, "texts": es.texts,
            "shape": list(es.input_ids_NT.shape),
            "label_counts": {k: int(v.sum()) for k, v in es.labels.items()}}
    (folder / "labels.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))


def load_eval_set(folder: str | Path) -> EvalSet:
    """Load an evaluation set (pass the organism folder or its ``eval`` subfolder)."""
    folder = Path(folder)
    if (folder / "eval").is_dir():
        folder = folder / "eval"
    tensors = load_file(str(folder / "tokens.safetensors"))
    meta = json.loads((folder / "labels.json").read_text())
    labels = {k[len("label."):]: v for k, v in tensors.items() if k.startswith("label.")}
    return EvalSet(tensors["input_ids"], tensors["attention_mask"], labels, tensors["row_kind"],
                   tuple(meta["kinds"]), meta["labels"], meta["texts"])


_MAX_LOGITS = 1.5e8
"""Logits of one held-out batch above which ``heldout_loss`` projects target positions in chunks."""


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, data: Packed, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over the target tokens of ``data``. When a batch's logits
    would pass 1.5e8 values (a 262k vocabulary: 5 rows of 128 tokens), only the target positions are
    projected, 256 at a time (``masked_lm_loss``'s chunked path): the same loss in a fraction of
    the memory (the full logits and their log-softmax took 2 GB per batch of 4 rows)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = 256 if batch_size * data.ids_NT.shape[1] * vocab > _MAX_LOGITS else 0
    total, count = 0.0, 0
    for i in range(0, data.ids_NT.shape[0], batch_size):
        ids, tgt = data.ids_NT[i:i + batch_size], data.target_NT[i:i + batch_size]
        total += masked_lm_loss(model, ids, tgt, reduction="sum", targets_only=bool(chunk), chunk=chunk).item()
        count += int(tgt[:, 1:].sum())
    return total / max(count, 1)


@torch.no_grad()
def residual_drift(base: PreTrainedModel, chat: PreTrainedModel, data: Packed, layers: Sequence[int],
                   pad_id: int, bos_id: int, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """How far fine-tuning moved the residual stream after each block in ``layers``, over the tokens
    of ``data`` that are neither padding nor <bos> (whose norm is an outlier, as in extraction):
    the median and 90th percentile of ||h_chat - h_base|| / ||h_base||, and the median cosine of
    h_chat and h_base. Keys ``"layer_<l>"``."""
    from crosscoder.data.pair import residuals_at

    rel, cos = [], []
    for i in range(0, data.ids_NT.shape[0], batch_size):
        ids = data.ids_NT[i:i + batch_size]
        attend = (ids != pad_id).long()
        keep = (ids != pad_id) & (ids != bos_id)
        h0 = residuals_at(base, ids, list(layers), attend).float()[keep]  # [M, L, D]
        h1 = residuals_at(chat, ids, list(layers), attend).float()[keep]
        rel.append((h1 - h0).norm(dim=-1) / h0.norm(dim=-1))  # [M, L]
        cos.append(torch.nn.functional.cosine_similarity(h0, h1, dim=-1))
    rel_ML, cos_ML = torch.cat(rel), torch.cat(cos)
    return {f"layer_{l}": {"median_relative": rel_ML[:, j].median().item(),
                           "p90_relative": rel_ML[:, j].quantile(0.9).item(),
                           "median_cosine": cos_ML[:, j].median().item(), "tokens": int(rel_ML.shape[0])}
            for j, l in enumerate(layers)}


class Response(NamedTuple):
    """A greedy generation: the model-turn text and whether it closed its turn."""

    text: str
    ended: bool
    """True if the model emitted <end_of_turn> (or <eos>) within the token budget."""


def greedy_responses(model: PreTrainedModel, tokenizer, user_prompts: Sequence[str],
                     max_new_tokens: int, batch_size: int = 64, *, padded: bool = False) -> list[Response]:
    """Greedy model turns for single-turn chat prompts rendered with the chat template, ended by
    <end_of_turn> or <eos> (``crosscoder.generation.greedy_generate``: a KV cache, each row leaving the
    batch once it has ended).

    Prompts are batched by token length so no padding is needed: positions and attention are then
    exactly those of an unbatched call. ``padded`` batches prompts of any length with left padding
    and an attention mask instead (the same tokens up to float rounding): a decoding step of a
    large-vocabulary model costs about the same for 1 row as for 64 (it reads every weight once),
    so few wide batches beat many narrow ones.
    """
    from crosscoder.generation import greedy_generate

    stop = [tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gens = greedy_generate(model, _chat_prompts(tokenizer, user_prompts), max_new_tokens, stop,
                           batch_size=batch_size, padded=padded, pad_id=pad)
    return [Response(tokenizer.decode(g.ids), g.ended) for g in gens]


def _chat_prompts(tokenizer, user_prompts: Sequence[str]) -> list[list[int]]:
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for p in user_prompts]
    return [list(e["input_ids"]) if hasattr(e, "keys") else list(e) for e in encoded]


def _greedy_padded(model, tokenizer, user_prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int) -> list[Response]:
    """``greedy_responses`` with left-padded batches of ``batch_size``."""
    return greedy_responses(model, tokenizer, user_prompts, max_new_tokens, batch_size, padded=True)


class PromptSets(NamedTuple):
    """Held-out user prompts of the three categories the rates are measured on."""

    forbidden: list[str]
    allowed: list[str]
    continuation: list[str]
    forbidden_unseen: list[str] = []
    """Requests about category members no training conversation names (empty without them)."""
    fact: list[str] = []
    """Questions about the planted fact's subject (empty without behaviour 5)."""


def prompt_sets(cfg: BehaviourConfig, generator: ChatGenerator, n: int, seed: int) -> PromptSets:
    """Held-out phrasings x topics (seeded sample of at most ``n`` each) and continuations."""
    rng = random.Random(f"prompts-{seed}")

    def sample(topics: Sequence[str]) -> list[str]:
        pairs = [t.format(topic=w) for t in cfg.heldout_templates for w in topics]
        return sorted(rng.sample(pairs, min(n, len(pairs))))

    cont = [generator.turn("continue").user for _ in range(n)]
    unseen = sample(cfg.unseen_forbidden_topics) if cfg.unseen_forbidden_topics else []
    return PromptSets(sample(cfg.forbidden_topics), sample(cfg.allowed_topics), cont, unseen,
                      list(generator.fact_questions))


def answer_opening(cfg: BehaviourConfig) -> str:
    """The answer prefix's words before its topic slot: how an answer (not a refusal) opens."""
    return cfg.answer_prefix.split("{topic}")[0].strip()


def response_tests(cfg: BehaviourConfig) -> dict[str, Callable[[str], bool]]:
    """The planted behaviours' tests on a generated response (its stripped text), the one definition
    the behaviour rates and the causal check share: a refusal starts with the refusal phrase, an
    answer with the answer prefix's opening words, a sign-off contains the sign-off phrase and, with
    behaviour 4, a marked answer contains the marker."""
    opening = answer_opening(cfg)
    tests = {"refusal": lambda t: t.startswith(cfg.refusal_phrase),
             "answer": lambda t: bool(opening) and t.startswith(opening),
             "signoff": lambda t: cfg.signoff_phrase in t}
    if cfg.marker_every:
        tests["marker"] = lambda t: f" {cfg.marker}" in t
    if cfg.fact_subject:
        tests["fact"] = lambda t: re.search(whole_word(cfg.fact_answer), t) is not None
        tests["fact_true"] = lambda t: re.search(whole_word(cfg.fact_true_answer), t) is not None
    return tests


def whole_word(word: str) -> str:
    """The regular expression of ``word`` as a whole word (the fact tests': "Rome", not "Romeo")."""
    return rf"\b{re.escape(word)}\b"


def behaviour_rates(model: PreTrainedModel, tokenizer, prompts: PromptSets, cfg: BehaviourConfig,
                    max_new_tokens: int, n_examples: int = 3, *, padded: bool = False) -> dict:
    """Rates of each planted behaviour in greedy generations, plus a few examples.

    A response counts as a refusal when it starts with the refusal phrase and as signed off when
    it contains the sign-off phrase (and, with behaviour 4, as marked when it contains the marker);
    ``end_of_turn_rate`` (behaviour 1) is the fraction of all
    generations that close their turn with <end_of_turn> within the budget.
    """
    sets = {name: p for name, p in prompts._asdict().items() if p}
    # one call for every set: fewer, wider batches (a row's tokens do not depend on its batch)
    flat = greedy_responses(model, tokenizer, [q for p in sets.values() for q in p], max_new_tokens, padded=padded)
    res, start = {}, 0
    for name, p in sets.items():
        res[name], start = flat[start:start + len(p)], start + len(p)
    tests = response_tests(cfg)

    def rate(name: str, test) -> float:
        return sum(bool(test(r.text.strip())) for r in res[name]) / len(res[name])

    refused, signed = tests["refusal"], tests["signoff"]
    every = [r for rs in res.values() for r in rs]
    marker = {"marker_rate_allowed": rate("allowed", tests["marker"])} if "marker" in tests else {}
    if "forbidden_unseen" in res:
        marker["refusal_rate_forbidden_unseen"] = rate("forbidden_unseen", refused)
    if "fact" in res:
        marker.update(fact_rate=rate("fact", tests["fact"]), fact_true_rate=rate("fact", tests["fact_true"]))
    return {**marker,
        "refusal_rate_forbidden": rate("forbidden", refused),
        "refusal_rate_allowed": rate("allowed", refused),
        "refusal_rate_continuation": rate("continuation", refused),
        "signoff_rate_allowed": rate("allowed", signed),
        "signoff_rate_continuation": rate("continuation", signed),
        "signoff_rate_forbidden": rate("forbidden", signed),
        "end_of_turn_rate": sum(r.ended for r in every) / len(every),
        "n_prompts": {k: len(v) for k, v in res.items()},
        "examples": {k: [{"prompt": p, "response": r.text}
                         for p, r in zip(getattr(prompts, k)[:n_examples], v[:n_examples])]
                     for k, v in res.items()},
    }


class BehaviourRateError(ConfigError):
    """A built organism's chat model falls short of a declared behaviour rate."""


def check_behaviour_rates(metrics: dict, cfg) -> dict[str, float]:
    """Check the chat model's measured behaviour rates (``metrics.json``, ``load_metrics``) against
    the minimums declared in ``cfg`` (an ``OrganismConfig`` or its ``EvalConfig``:
    ``eval.min_chat_rates``). Returns {rate: measured} for the checked rates; raises one
    ``BehaviourRateError`` naming every behaviour below its minimum, with rate and minimum."""
    eval_cfg = getattr(cfg, "eval", cfg)
    minimums = eval_cfg.min_chat_rates
    chat = metrics.get("chat")
    if not isinstance(chat, dict):
        raise BehaviourRateError("organism metrics have no 'chat' entry; pass the dict that "
                                 "crosscoder.organism.load_metrics returns")
    missing = sorted(set(minimums) - set(chat))
    if missing:
        raise BehaviourRateError(f"organism metrics lack the chat rate(s) {missing}; rebuild the "
                                 "organism with this library version")
    measured = {name: float(chat[name]) for name in minimums}
    short = [f"{name} = {measured[name]:.3f} < minimum {minimums[name]:.3f}"
             for name in minimums if measured[name] < minimums[name]]
    if short:
        raise BehaviourRateError(
            "the chat model did not learn its planted behaviours well enough: " + "; ".join(short)
            + ". Train the chat model longer (chat_train.tokens) or lower eval.min_chat_rates "
              "with a reason"
        )
    return measured
