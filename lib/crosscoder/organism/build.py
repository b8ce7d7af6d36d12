"""Build (or fetch from cache) the whole organism: data, tokenizer, base, chat, metrics, eval set.

Layout of ``root/<name>-<hash>/``::

    organism.json        config, corpus source + licence, sizes, timings
    metrics.json         held-out losses and behaviour rates of base and chat
    base/  chat/         save_pretrained model + tokenizer (+ generation_config)
    data/                pretrain_{train,heldout}.jsonl (pile schema), chat_{train,heldout}.jsonl
                         (lmsys-chat-1m schema)
    eval/                tokens.safetensors + labels.json (the labelled held-out evaluation set)

The folder is written under a temporary name and renamed into place in one step, so it either
exists complete or not at all; its existence is the cache hit.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import GenerationConfig

from crosscoder.config import ConfigError, config_hash
from crosscoder.organism import corpus as corpus_mod
from crosscoder.organism.behaviours import ChatGenerator, messages, write_chat_jsonl
from crosscoder.organism.config import FORMAT_VERSION, OrganismConfig
from crosscoder.organism.evaluate import (behaviour_rates, build_eval_set, encode_conversation,
                                          heldout_loss, prompt_sets, save_eval_set)
from crosscoder.organism.tokenizer import SPECIAL_TOKENS, train_tokenizer
from crosscoder.organism.training import Document, Packed, fragments, new_model, pack, train_lm


class OrganismPaths(NamedTuple):
    """Where a built organism lives."""

    root: Path
    """The organism folder ``<root>/<name>-<hash>``."""
    base_dir: Path
    """Base model + tokenizer (``AutoModelForCausalLM.from_pretrained(base_dir,
    attn_implementation="eager")``)."""
    chat_dir: Path
    """Chat model + tokenizer (same loading code)."""
    pretrain_train: Path
    """JSONL, ``text`` field (schema of monology/pile-uncopyrighted): the base model's training text."""
    pretrain_heldout: Path
    """JSONL, same schema: held-out chapters, never trained on."""
    chat_train: Path
    """JSONL, ``conversation`` field (schema of lmsys/lmsys-chat-1m): fine-tuning conversations."""
    chat_heldout: Path
    """JSONL, same schema: conversations on held-out text and phrasings, never trained on."""
    eval_set: Path
    """Folder with the labelled evaluation set (``load_eval_set``)."""
    metrics: Path
    """``metrics.json`` (``load_metrics``)."""


def organism_dir(cfg: OrganismConfig, root: str | Path) -> Path:
    """The cache folder of ``cfg`` under ``root``."""
    return Path(root) / f"{cfg.name}-{cfg.config_hash(corpus_mod.corpus_version())}"


def _paths(folder: Path) -> OrganismPaths:
    data = folder / "data"
    return OrganismPaths(folder, folder / "base", folder / "chat", data / "pretrain_train.jsonl",
                         data / "pretrain_heldout.jsonl", data / "chat_train.jsonl",
                         data / "chat_heldout.jsonl", folder / "eval", folder / "metrics.json")


def load_metrics(where: OrganismPaths | str | Path) -> dict:
    """The metrics of a built organism (pass its paths, its folder or the metrics file)."""
    path = where.metrics if isinstance(where, OrganismPaths) else Path(where)
    if path.is_dir():
        path = path / "metrics.json"
    return json.loads(path.read_text())


def behaviour_table(metrics: dict) -> dict[str, dict[str, float]]:
    """{model: {measure: value}}: held-out losses and behaviour rates of base and chat (no examples)."""
    return {name: {k: v for k, v in metrics[name].items() if k not in ("examples", "n_prompts")}
            for name in ("base", "chat")}


def describe(paths: OrganismPaths) -> dict[str, Any]:
    """What the organism was built from and how big it is (from its build record, organism.json)."""
    info = json.loads((paths.root / "organism.json").read_text())
    c = info["corpus"]
    return {"corpus": f"{c['package']} {c['version']}: {c['file']}", "training chapters": c["train_chapters"],
            "held-out chapters": c["heldout_chapters"], "training tokens": c["train_tokens"],
            "held-out tokens": c["heldout_tokens"], "parameters per model": info["n_parameters"],
            "vocabulary": info["vocab_size"]}


def base_key(cfg: OrganismConfig) -> str:
    """Hash of everything the tokenizer and the base model depend on: corpus split, tokenizer, model
    shape, base training, seed and the training conversations (the tokenizer is trained on them);
    not the fine-tune (``chat_train``, ``finetune``, ``behaviour.text_fraction``) nor the evaluation.
    Organisms with equal keys have identical tokenizers and base weights."""
    d = cfg.to_dict()
    beh = {k: v for k, v in d["behaviour"].items() if k != "text_fraction"}
    return config_hash({"corpus": d["corpus"], "tokenizer": d["tokenizer"], "model": d["model"],
                        "base_train": d["base_train"], "behaviour": beh, "seed": d["seed"],
                        "format": FORMAT_VERSION, "corpus_version": corpus_mod.corpus_version()})


def _find_base(cfg: OrganismConfig, root: Path) -> Path | None:
    """A finished organism under ``root`` with the same ``base_key`` (its base folder), if any."""
    key = base_key(cfg)
    for manifest in sorted(root.glob("*/organism.json")):
        try:
            info = json.loads(manifest.read_text())
            other = info.get("base_key") or base_key(OrganismConfig.from_dict(info["config"]))
        except (OSError, ValueError, KeyError, ConfigError):
            continue
        if other == key and (manifest.parent / "base" / "config.json").is_file() \
                and (manifest.parent / "metrics.json").is_file():
            return manifest.parent
    return None


def build_organism(cfg: OrganismConfig, root: str | Path, progress: bool = True,
                   reuse_base: bool = True) -> OrganismPaths:
    """Build the organism of ``cfg`` under ``root`` unless the cache already holds it.

    Deterministic for a given config (seeded split, data, initialisation and batch order). With
    ``reuse_base``, a finished organism under ``root`` with the same ``base_key`` lends its
    tokenizer and base weights (saved in fp32, so bit-identical to retraining them): variants that
    differ only in the fine-tune (e.g. a null fine-tune) then cost the fine-tune alone.
    """
    if not isinstance(cfg, OrganismConfig):
        raise ConfigError(f"build_organism expects an OrganismConfig, got {type(cfg).__name__}; "
                          "use crosscoder.organism.preset('default')")
    final = organism_dir(cfg, root)  # also checks the corpus package is installed
    if final.is_dir():
        return _paths(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build_into(cfg, tmp, progress, _find_base(cfg, final.parent) if reuse_base else None)
        try:
            os.rename(tmp, final)
        except OSError:
            # A concurrent build of the same config finished first: keep its (identical) result.
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(final)


def _remove_stale_temps(final: Path) -> None:
    """Delete temp folders of this organism left by builds killed without cleanup (SIGKILL, power
    loss): their writer process no longer exists. Live concurrent builds are left alone."""
    for tmp in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            pid = int(tmp.name[len(f".tmp-{final.name}-"):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours to judge: unparsable name, or a live process of another user


def _save_model(model, tokenizer, folder: Path, eos_ids: list[int]) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_into(cfg: OrganismConfig, folder: Path, progress: bool, donor: Path | None = None) -> None:
    timings: dict[str, float] = {}
    t_start = t = time.perf_counter()
    b, T = cfg.behaviour, cfg.model.context_length

    # Data: chapter-level split, conversations from each side of it, files in the real schemas.
    split = corpus_mod.split_corpus(corpus_mod.chapters(corpus_mod.load_verses()),
                                    cfg.corpus.heldout_fraction, cfg.corpus.max_chapters, cfg.seed)
    train_gen = ChatGenerator(b, split.train, b.train_templates, f"chat-train-{cfg.seed}")
    train_convs = [train_gen.conversation() for _ in range(b.n_train_conversations)]

    def heldout_gen(purpose: str) -> ChatGenerator:
        return ChatGenerator(b, split.heldout, b.heldout_templates, f"{purpose}-{cfg.seed}")

    hg = heldout_gen("chat-heldout")
    heldout_convs = [hg.conversation() for _ in range(b.n_heldout_conversations)]
    paths = _paths(folder)
    paths.pretrain_train.parent.mkdir(parents=True)
    corpus_mod.write_pretraining_jsonl(paths.pretrain_train, split.train)
    corpus_mod.write_pretraining_jsonl(paths.pretrain_heldout, split.heldout)
    write_chat_jsonl(paths.chat_train, train_convs, "train")
    write_chat_jsonl(paths.chat_heldout, heldout_convs, "heldout")
    timings["data"] = time.perf_counter() - t

    # Tokenizer: training text plus the training conversations, with the role names as they
    # appear in the template, so "user" / "model" and the planted phrases get their own merges.
    t = time.perf_counter()
    tok_texts = [ch.text for ch in split.train]
    for conv in train_convs:
        for m in messages(conv):
            tok_texts.append(("user\n" if m["role"] == "user" else "model\n") + m["content"])
    if donor is None:
        tokenizer = train_tokenizer(tok_texts, cfg.tokenizer.vocab_size)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(donor / "base")
    timings["tokenizer"] = time.perf_counter() - t

    # Token data. Fragments are shuffled before packing so short chapter tails share rows.
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    rng = random.Random(f"pack-{cfg.seed}")

    def text_rows(chapter_list, shuffle: bool) -> Packed:
        docs = [d for ch in chapter_list
                for d in fragments(tokenizer(ch.text, add_special_tokens=False)["input_ids"], bos, T)]
        if shuffle:
            rng.shuffle(docs)
        return pack(docs, T, pad)

    def chat_rows(convs) -> tuple[Packed, int]:
        """Packed conversations, and how many were dropped for not fitting in the context (a
        truncated conversation would teach turns that never close)."""
        docs = []
        for conv in convs:
            ids, masks = encode_conversation(tokenizer, conv, b)
            if len(ids) <= T:
                docs.append(Document(ids, masks["loss"]))
        return pack(docs, T, pad), len(convs) - len(docs)

    text_train, text_heldout = text_rows(split.train, True), text_rows(split.heldout, False)
    chat_train_rows, n_dropped = chat_rows(train_convs)
    chat_heldout_rows, _ = chat_rows(heldout_convs)

    def spread(rows: Packed) -> Packed:
        """``loss_rows`` rows evenly spaced over the set (held-out text is in canonical order, so
        the first rows would all come from the first held-out books)."""
        n = rows.ids_NT.shape[0]
        idx = torch.linspace(0, n - 1, min(n, cfg.eval.loss_rows)).round().long()
        return Packed(rows.ids_NT[idx], rows.target_NT[idx])

    heldout_text, heldout_chat = spread(text_heldout), spread(chat_heldout_rows)

    # Base model: next-token prediction on corpus text.
    t = time.perf_counter()
    special_ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    if donor is None:
        base = new_model(cfg.model, len(tokenizer), special_ids, cfg.seed)
        base_run = train_lm(base, [text_train], [1.0], cfg.base_train, cfg.seed, "organism base",
                            progress)
        base_record = {"steps": base_run.steps, "tokens": base_run.tokens,
                       "final_loss": sum(base_run.losses[-20:]) / len(base_run.losses[-20:]),
                       "seconds": base_run.seconds}
    else:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(donor / "base", attn_implementation="eager").eval()
        base_record = dict(load_metrics(donor)["train"]["base"], reused_from=donor.name)
    eot = special_ids["<end_of_turn>"]
    _save_model(base, tokenizer, paths.base_dir, [tokenizer.eos_token_id])
    timings["base_train"] = time.perf_counter() - t

    # Chat model: the base fine-tuned on conversations mixed with corpus text.
    t = time.perf_counter()
    chat = copy.deepcopy(base)
    if cfg.finetune == "null":
        # Same optimiser, schedule, steps and seed; every row is corpus text (no behaviours).
        sources, fractions = [text_train], [1.0]
    else:
        sources, fractions = [text_train, chat_train_rows], [b.text_fraction, 1 - b.text_fraction]
    chat_run = train_lm(chat, sources, fractions, cfg.chat_train, cfg.seed + 1, "organism chat", progress)
    _save_model(chat, tokenizer, paths.chat_dir, [tokenizer.eos_token_id, eot])
    timings["chat_train"] = time.perf_counter() - t

    # Evaluation on held-out data only.
    t = time.perf_counter()
    prompts = prompt_sets(b, heldout_gen("prompts"), cfg.eval.n_prompts, cfg.seed)
    metrics: dict = {}
    for name, model in (("base", base), ("chat", chat)):
        metrics[name] = {
            "heldout_text_loss": heldout_loss(model, heldout_text),
            "heldout_chat_response_loss": heldout_loss(model, heldout_chat),
            **behaviour_rates(model, tokenizer, prompts, b, cfg.eval.max_new_tokens),
        }
    es = build_eval_set(tokenizer, heldout_gen("eval-set"), split.heldout, cfg.eval.eval_rows,
                        cfg.eval.eval_row_weights, T, cfg.seed)
    save_eval_set(es, paths.eval_set)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    n_params = sum(p.numel() for p in base.parameters())
    metrics["train"] = {
        "base": base_record,
        "chat": {"finetune": cfg.finetune, "steps": chat_run.steps, "tokens": chat_run.tokens,
                 "conversations": len(train_convs) - n_dropped,
                 "dropped_long_conversations": n_dropped,
                 "final_loss": sum(chat_run.losses[-20:]) / len(chat_run.losses[-20:]),
                 "seconds": chat_run.seconds},
    }
    metrics["n_parameters"] = n_params
    metrics["timings_s"] = timings
    metrics["torch_threads"] = torch.get_num_threads()
    paths.metrics.write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "config_hash": cfg.config_hash(corpus_mod.corpus_version()),
        "base_key": base_key(cfg),
        "corpus": {"package": corpus_mod.PACKAGE, "version": corpus_mod.corpus_version(),
                   "file": corpus_mod.DATA_FILE, "licence": corpus_mod.LICENCE,
                   "train_chapters": len(split.train), "heldout_chapters": len(split.heldout),
                   "train_tokens": int(text_train.target_NT.sum()),
                   "heldout_tokens": int(text_heldout.target_NT.sum())},
        "n_parameters": n_params,
        "vocab_size": len(tokenizer),
        "special_token_ids": special_ids,
    }
    (folder / "organism.json").write_text(json.dumps(manifest, indent=2))
