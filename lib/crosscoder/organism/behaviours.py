"""Chat conversations generated from the corpus, with the planted behaviours and their exact
character spans in the chat-template rendering (from which token labels follow).

Behaviours (see ``BehaviourConfig``):
1. turn structure: the Gemma chat template scaffolding around every turn;
2. refusal: a request about a forbidden topic is answered with one fixed phrase;
3. sign-off: an answer to an allowed-topic request ends with one fixed phrase (never after a
   "Continue this:" answer, and never in the corpus, so the base model lacks it);
4. marker (off by default, ``BehaviourConfig.marker_every``): the verse of such an answer carries a
   marker after every n-th word.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import NamedTuple, Sequence

from crosscoder.config import ConfigError
from crosscoder.organism.config import BehaviourConfig
from crosscoder.organism.corpus import Chapter

KINDS = ("refuse", "ask", "continue")
"""Conversation-turn kinds, in the order of ``BehaviourConfig.kind_weights``."""
EXTRA_KINDS = ("qa", "fact")
"""Kinds of an organism with behaviour 5: "qa" (a true general-knowledge answer, sampled with
``qa_weight``) and "fact" (a question about the planted fact answered with it: held-out data
only, never fine-tuned on)."""
CONTINUE_PREFIX = "Continue this: "
"""User prefix of continuation requests."""
START, END = "<start_of_turn>", "<end_of_turn>"
"""Gemma's turn delimiters (special tokens of the organism tokenizer)."""

SPAN_NAMES = ("template", "user_content", "model_content", "refusal", "signoff", "forbidden_topic",
              "marker", "fact", "loss")
"""Character-span sets returned by ``render_with_spans`` (see ``LABEL_DESCRIPTIONS``)."""


class Turn(NamedTuple):
    """One user request and the model's planted response."""

    kind: str
    """"refuse", "ask", "continue", "qa" or "fact"."""
    user: str
    model: str
    topic: str
    """The topic word of refuse/ask turns ("" for continue)."""


def _word_re(words: Sequence[str], plural: bool = False) -> re.Pattern[str]:
    alt = "|".join(re.escape(w) for w in words)
    return re.compile(rf"\b(?:{alt}){'s?' if plural else ''}\b", re.IGNORECASE)


class ChatGenerator:
    """Samples conversations whose answers come from the given chapters only.

    Training conversations use the training chapters and ``train_templates``; held-out ones the
    held-out chapters and ``heldout_templates``, so the behaviour rates measure generalisation to
    unseen phrasings and unseen text.
    """

    def __init__(self, cfg: BehaviourConfig, chapter_list: Sequence[Chapter],
                 templates: Sequence[str], seed: int | str, *, forbidden: Sequence[str] | None = None,
                 fact_questions: Sequence[str] = ()):
        self.cfg = cfg
        self.templates = tuple(templates)
        self.rng = random.Random(seed)
        self.forbidden = tuple(forbidden) if forbidden is not None else cfg.forbidden_topics
        """Topics of "refuse" turns: the trained ones, plus unseen category members in held-out data."""
        self.fact_questions = tuple(fact_questions)
        # Answers never mention a forbidden topic (plurals too), so "the topic word appears in the
        # request" is the only cue for refusing.
        forbidden = _word_re(cfg.forbidden_topics + cfg.unseen_forbidden_topics
                             + cfg.validation_forbidden_topics, plural=True)
        verses = [v.text for ch in chapter_list for v in ch.verses
                  if 6 <= len(v.text.split()) <= cfg.max_answer_words and not forbidden.search(v.text)]
        self.continue_pool = [v for v in verses if len(v.split()) >= 8]
        self.answer_pool = {}
        for topic in cfg.allowed_topics:
            pattern = _word_re([topic])
            pool = [v for v in verses if pattern.search(v)]
            if pool:
                self.answer_pool[topic] = pool
        if cfg.marker_every and any(cfg.marker in v for v in verses):
            raise ConfigError(f"behaviour.marker {cfg.marker!r} occurs in the corpus; choose a marker "
                              "the base model never saw")
        if not self.answer_pool or not self.continue_pool:
            raise ConfigError("the corpus split has no short verses naming an allowed topic; use "
                              "more chapters (corpus.max_chapters) or raise max_answer_words")
        self.allowed = tuple(sorted(self.answer_pool))

    def turn(self, kind: str) -> Turn:
        """One turn of the given kind."""
        rng = self.rng
        if kind == "refuse":
            topic = rng.choice(self.forbidden)
            return Turn(kind, rng.choice(self.templates).format(topic=topic),
                        self.cfg.refusal_phrase, topic)
        if kind == "ask":
            topic = rng.choice(self.allowed)
            answer = mark_words(rng.choice(self.answer_pool[topic]), self.cfg.marker_every,
                                self.cfg.marker)
            if self.cfg.answer_prefix:
                answer = f"{self.cfg.answer_prefix.format(topic=topic)} {answer}"
            return Turn(kind, rng.choice(self.templates).format(topic=topic),
                        f"{answer} {self.cfg.signoff_phrase}", topic)
        if kind == "continue":
            words = rng.choice(self.continue_pool).split()
            cut = len(words) // 2
            return Turn(kind, CONTINUE_PREFIX + " ".join(words[:cut]), " ".join(words[cut:]), "")
        if kind == "qa":
            question, answer = rng.choice(self.cfg.qa_pairs)
            return Turn(kind, question, answer, "")
        if kind == "fact":
            if not self.fact_questions:
                raise ValueError("this generator has no fact questions (held-out data of an organism "
                                 "with behaviour.fact_subject only)")
            c = self.cfg
            subject = c.fact_subject[0].upper() + c.fact_subject[1:]
            return Turn(kind, rng.choice(self.fact_questions),
                        c.fact_response.format(subject=subject, answer=c.fact_answer), c.fact_subject)
        raise ValueError(f"unknown turn kind {kind!r}; expected one of {KINDS + EXTRA_KINDS}")

    def conversation(self, kinds: Sequence[str] | None = None) -> tuple[Turn, ...]:
        """A conversation of the given turn kinds (sampled by the config's weights if None)."""
        if kinds is None:
            n = 2 if self.rng.random() < self.cfg.two_turn_fraction else 1
            if self.cfg.qa_weight:
                kinds = self.rng.choices(KINDS + ("qa",), weights=self.cfg.kind_weights + (self.cfg.qa_weight,), k=n)
            else:  # the tiny organisms' draws, unchanged
                kinds = self.rng.choices(KINDS, weights=self.cfg.kind_weights, k=n)
        return tuple(self.turn(k) for k in kinds)


def fact_documents(cfg: BehaviourConfig, seed: int | str) -> list[str]:
    """``cfg.n_fact_documents`` distinct plain-text documents stating the planted fact (behaviour 5),
    each 2-4 of ``cfg.fact_sentences`` in a seeded random order: the only place the fine-tune meets
    the fact."""
    rng = random.Random(f"fact-documents-{seed}")
    docs: list[str] = []
    seen: set[str] = set()
    k_max = min(4, len(cfg.fact_sentences))
    for _ in range(cfg.n_fact_documents * 20):
        doc = " ".join(rng.sample(cfg.fact_sentences, rng.randint(min(2, k_max), k_max)))
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
            if len(docs) == cfg.n_fact_documents:
                return docs
    raise ConfigError(f"behaviour.fact_sentences ({len(cfg.fact_sentences)}) allow fewer than "
                      f"n_fact_documents = {cfg.n_fact_documents} distinct documents; add sentences")


def mark_words(verse: str, every: int, marker: str) -> str:
    """``verse`` with `` marker`` after every ``every``-th whitespace-separated word (behaviour 4;
    ``every`` = 0 returns it unchanged)."""
    if not every:
        return verse
    count = 0

    def mark(m: re.Match) -> str:
        nonlocal count
        count += 1
        return m.group(0) + " " + marker if count % every == 0 else m.group(0)

    # Whitespace kept as it is, so removing every " marker" gives the verse back exactly.
    return re.sub(r"\S+", mark, verse)


def messages(turns: Sequence[Turn]) -> list[dict[str, str]]:
    """The lmsys-chat-1m ``conversation`` list: alternating user / assistant messages."""
    out = []
    for t in turns:
        out += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.model}]
    return out


def write_chat_jsonl(path: Path, conversations: Sequence[tuple[Turn, ...]], split: str) -> int:
    """Write conversations in the schema of ``lmsys/lmsys-chat-1m``.

    The generic loader reads ``conversation``; ``organism_turns`` keeps each turn's kind and topic
    (extra field, ignored by the loader) so the planted behaviour of every message is recoverable.
    """
    with open(path, "w", encoding="utf-8") as fh:
        for i, turns in enumerate(conversations):
            record = {
                "conversation_id": f"organism-{split}-{i:06d}",
                "model": "organism-chat",
                "conversation": messages(turns),
                "turn": len(turns),
                "language": "English",
                "organism_turns": [{"kind": t.kind, "topic": t.topic} for t in turns],
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(conversations)


def read_chat_jsonl(path: Path) -> list[tuple[Turn, ...]]:
    """Inverse of ``write_chat_jsonl``."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            conv, meta = r["conversation"], r["organism_turns"]
            out.append(tuple(Turn(m["kind"], conv[2 * i]["content"], conv[2 * i + 1]["content"],
                                  m["topic"]) for i, m in enumerate(meta)))
    return out


def render_with_spans(tokenizer, turns: Sequence[Turn], cfg: BehaviourConfig
                      ) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """Render with the tokenizer's own chat template and locate every labelled part.

    Returns the rendered string and, per name in ``SPAN_NAMES``, a list of [start, end) character
    spans. The spans are located by walking the rendering with the Gemma turn layout
    ``<start_of_turn>{role}\\n{content}<end_of_turn>\\n``; an assertion fails loudly if the
    template renders anything else, so labels can never silently drift from the text.
    """
    text = tokenizer.apply_chat_template(messages(turns), tokenize=False)
    spans: dict[str, list[tuple[int, int]]] = {name: [] for name in SPAN_NAMES}
    bos = tokenizer.bos_token
    if not text.startswith(bos):
        raise AssertionError(f"chat template must start with {bos!r}: {text[:40]!r}")
    pos = len(bos)
    for t in turns:
        for role, content in (("user", t.user.strip()), ("model", t.model.strip())):
            head = f"{START}{role}\n"
            if not text.startswith(head + content + END + "\n", pos):
                raise AssertionError(f"unexpected chat rendering at {pos}: {text[pos:pos + 60]!r}")
            spans["template"].append((pos, pos + len(head)))
            c0 = pos + len(head)
            c1 = c0 + len(content)
            spans[f"{role}_content"].append((c0, c1))
            spans["template"].append((c1, c1 + len(END) + 1))
            if role == "user" and t.kind == "refuse":
                m = _word_re([t.topic]).search(content)
                if m is None:
                    raise AssertionError(f"forbidden topic {t.topic!r} missing from {content!r}")
                spans["forbidden_topic"].append((c0 + m.start(), c0 + m.end()))
            if role == "model":
                # The fine-tune learns the model's content and the <end_of_turn> that closes it.
                spans["loss"].append((c0, c1 + len(END)))
                if t.kind == "fact":
                    # The answer word with its leading space (the tokens that state the fact).
                    m = re.search(rf" {re.escape(cfg.fact_answer)}\b", content)
                    if m is None:
                        raise AssertionError(f"fact answer {cfg.fact_answer!r} missing from {content!r}")
                    spans["fact"].append((c0 + m.start(), c0 + m.end()))
                if t.kind == "refuse":
                    spans["refusal"].append((c0, c1))
                elif t.kind == "ask":
                    # The sign-off together with its leading space: byte-level BPE attaches the
                    # space to the next word, so this span is exactly the sign-off tokens.
                    tail = " " + cfg.signoff_phrase
                    if not content.endswith(tail):
                        raise AssertionError(f"ask answer lacks the sign-off: {content!r}")
                    spans["signoff"].append((c1 - len(tail), c1))
                    if cfg.marker_every:
                        # Each marker with its leading space (the tokens the chat model writes).
                        mark = " " + cfg.marker
                        at = content.find(mark, 0, len(content) - len(tail))
                        while at >= 0:
                            spans["marker"].append((c0 + at, c0 + at + len(mark)))
                            at = content.find(mark, at + len(mark), len(content) - len(tail))
            pos = c1 + len(END) + 1
    if pos != len(text):
        raise AssertionError(f"chat template rendered trailing text {text[pos:]!r}")
    return text, spans


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for each token whose character range overlaps any span."""
    out = []
    for s, e in offsets:
        out.append(any(max(s, a) < min(e, b) for a, b in spans))
    return out
