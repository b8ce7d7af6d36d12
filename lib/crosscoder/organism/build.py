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

import contextlib
import copy
import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from transformers import GenerationConfig

from crosscoder.atomic import write_json_atomic
from crosscoder.config import ConfigError, config_hash
from crosscoder.organism import corpus as corpus_mod
from crosscoder.progress import hide_library_bars
from crosscoder.organism.behaviours import ChatGenerator, fact_documents, messages, write_chat_jsonl
from crosscoder.organism.config import FORMAT_VERSION, OrganismConfig
from crosscoder.organism.evaluate import (behaviour_rates, build_eval_set, encode_conversation,
                                          heldout_loss, prompt_sets, residual_drift, save_eval_set)
from crosscoder.organism.tokenizer import SPECIAL_TOKENS, train_tokenizer
from crosscoder.organism.training import (Document, Packed, fragments, new_model, pack, train_lm,
                                         use_bf16_autocast)


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
    """The cache folder of ``cfg`` under ``root``.

    A training run with ``bf16_autocast: "auto"`` trains in bf16 on a CPU with bf16 arithmetic and
    in float32 elsewhere (an AVX2-only CPU), which gives other weights from the same config: such a
    float32 build is keyed apart (the runs named in the hash). Builds that resolved to bf16 keep the
    config's plain hash, the one every published build of those presets has."""
    key = cfg.config_hash(corpus_mod.corpus_version())
    runs = ["chat_train"] + ([] if cfg.base_model else ["base_train"])
    float32 = [r for r in runs if getattr(cfg, r).bf16_autocast == "auto"]
    if float32 and not use_bf16_autocast("auto", torch.device("cpu")):
        key = config_hash({"config": key, "auto_resolved_to_float32": float32}, 12)
    return Path(root) / f"{cfg.name}-{key}"


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
    out = {"corpus": f"{c['package']} {c['version']}: {c['file']}", "training chapters": c["train_chapters"],
           "held-out chapters": c["heldout_chapters"], "training tokens": c["train_tokens"],
           "held-out tokens": c["heldout_tokens"], "parameters per model": info["n_parameters"],
           "vocabulary": info["vocab_size"]}
    base = info["config"].get("base_model", "")
    if base:  # a pretrained base: say whose weights, in which form, under which licence
        from crosscoder.organism.pretrained import read_provenance

        folder = resolve_base_model(OrganismConfig.from_dict(info["config"]), paths.root.parent)
        # a user's own folder has no provenance record: name the folder
        prov = read_provenance(folder) if (folder / "provenance.json").is_file() else {
            "converted_from": str(base), "source": "folder", "licence": "see the folder",
            "licence_url": str(base)}
        form = (f"{prov['quantisation']} GGUF from PyPI {prov['package']}=={prov['package_version']} "
                f"(sha256 {prov['sha256'][:12]}…), dequantised to {prov['dtype']}"
                if prov["source"] == "gguf-package" else f"{prov['source']}, {prov.get('dtype', 'as saved')}")
        out = {"base model": f"{prov.get('converted_from', prov.get('hub_name', base))}: {form}",
               "licence": f"{prov['licence']} ({prov['licence_url']})",
               "chat model": "our fine-tune of the base (planted behaviours)",
               **{k.replace("corpus", "fine-tune text corpus"): v for k, v in out.items()}}
    return out


PRETRAINED_BASES = {"gemma-3-270m-gguf": "gguf", "gemma-3-270m-hub": "hub"}
"""``OrganismConfig.base_model`` names of the pretrained bases ``organism.pretrained`` provides."""


def pretrained_root(root: str | Path) -> Path:
    """Where pretrained bases are cached beside an organism cache root (``cache/organism`` ->
    ``cache/pretrained``)."""
    return Path(root).parent / "pretrained"


def resolve_base_model(cfg: OrganismConfig, root: str | Path) -> Path:
    """The Hugging Face folder of ``cfg.base_model`` (built and cached on first use for the named
    pretrained bases; a missing package or bad file stops here, before any fine-tuning)."""
    from crosscoder.organism.pretrained import pretrained_base

    name = cfg.base_model
    if name in PRETRAINED_BASES:
        return pretrained_base(PRETRAINED_BASES[name], pretrained_root(root))
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"base_model {name!r} is neither one of {sorted(PRETRAINED_BASES)} nor a folder "
                          "with a Hugging Face config.json; save the model with save_pretrained first")
    return folder


def base_key(cfg: OrganismConfig) -> str:
    """Hash of everything the tokenizer and the base model depend on: corpus split, tokenizer, model
    shape, base training, seed and the training conversations (the tokenizer is trained on them);
    not the fine-tune (``chat_train``, ``finetune``, ``behaviour.text_fraction``, behaviour 4's
    marker, which the tokenizer never sees) nor the evaluation. Organisms with equal keys have
    identical tokenizers and base weights."""
    d = cfg.to_dict()
    if cfg.base_model:  # a pretrained base depends on nothing the organism trains
        return config_hash({"base_model": cfg.base_model, "format": FORMAT_VERSION})
    beh = {k: v for k, v in d["behaviour"].items() if k not in ("text_fraction", "marker_every", "marker")}
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
    pretrained = resolve_base_model(cfg, root) if cfg.base_model else None
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        # A pretrained base lends its tokenizer and weights the way a finished organism's base does.
        donor = pretrained if cfg.base_model else (_find_base(cfg, final.parent) if reuse_base else None)
        _build_into(cfg, tmp, progress, donor)
        _return_freed_heap()
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


def _return_freed_heap() -> None:
    """Hand the fine-tune's freed memory back to the operating system (glibc ``malloc_trim``). Its
    activations and optimiser state are freed when it returns, but glibc keeps large freed blocks in
    the process heap, so the resident size stays near the fine-tune's peak and whatever the page
    loads next (on gemma-3-270m: the activation cache, another pair's models) stacks on top of it.
    A no-op where the C library has no malloc_trim (macOS, Windows, musl)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


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
    hide_library_bars()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class _Data(NamedTuple):
    split: Any
    """The chapter-level train / held-out split of the corpus."""
    train_convs: list
    """Training conversations (fine-tune data; also seen by the tokenizer)."""
    heldout_convs: list
    """Held-out conversations (from held-out chapters and phrasings)."""
    fact_docs: list = []
    """Fine-tuning documents stating the planted fact (behaviour 5; empty without it)."""


class _Rows(NamedTuple):
    text_train: Packed
    text_heldout: Packed
    chat_train: Packed
    n_dropped: int
    """Training conversations too long for the context (left out rather than truncated)."""
    heldout_text: Packed
    """``loss_rows`` rows spread over the held-out text (for the held-out loss)."""
    heldout_chat: Packed
    fact_train: Packed | None
    """Fact documents (behaviour 5), or None."""


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t


def _corpus_split(cfg: OrganismConfig):
    """The organism's seeded chapter-level train / held-out split of the corpus."""
    return corpus_mod.split_corpus(corpus_mod.chapters(corpus_mod.load_verses()),
                                   cfg.corpus.heldout_fraction, cfg.corpus.max_chapters, cfg.seed)


def _heldout_generator(cfg: OrganismConfig, split, purpose: str) -> ChatGenerator:
    """Held-out chapters and phrasings; refusals also about unseen category members, and the planted
    fact's held-out questions."""
    b = cfg.behaviour
    return ChatGenerator(b, split.heldout, b.heldout_templates, f"{purpose}-{cfg.seed}",
                         forbidden=b.forbidden_topics + b.unseen_forbidden_topics,
                         fact_questions=b.fact_heldout_questions)


def validation_generator(cfg: OrganismConfig, purpose: str = "validation", split=None) -> ChatGenerator:
    """Design-time data: training chapters, the validation phrasings' stand-in (the training
    templates) and only the validation category members and fact questions, never the held-out
    ones. The organism's recipe is tuned on prompts from here."""
    b = cfg.behaviour
    split = split or _corpus_split(cfg)
    return ChatGenerator(b, split.train, b.train_templates, f"{purpose}-{cfg.seed}",
                         forbidden=b.validation_forbidden_topics or b.forbidden_topics,
                         fact_questions=b.fact_validation_questions)


def heldout_prompt_sets(cfg: OrganismConfig, n: int, purpose: str = "prompts"):
    """Held-out request phrasings x topics (forbidden / allowed, at most ``n`` each) and ``n``
    continuations of held-out verses: the prompts the build's behaviour rates are measured on (with
    the default ``purpose``). Only held-out chapters and phrasings: for reports, not for design."""
    split = _corpus_split(cfg)
    return prompt_sets(cfg.behaviour, _heldout_generator(cfg, split, purpose), n, cfg.seed)


def validation_eval_set(cfg: OrganismConfig, tokenizer, n_rows: int = 512):
    """A labelled set like the evaluation set, for design work: training chapters, training phrasings,
    the design-only category members and fact questions (``validation_generator``) and a seed of its
    own. Probes, recovery tables and recipe choices are tuned on this; the held-out evaluation set is
    read only to report."""
    split = _corpus_split(cfg)
    return build_eval_set(tokenizer, validation_generator(cfg, split=split), split.train, n_rows, cfg.eval.eval_row_weights,
                          cfg.model.context_length, 1000 + cfg.seed)


def _make_data(cfg: OrganismConfig, paths: OrganismPaths) -> _Data:
    """Chapter-level split, conversations from each side of it, files in the real schemas."""
    b = cfg.behaviour
    split = _corpus_split(cfg)
    train_gen = ChatGenerator(b, split.train, b.train_templates, f"chat-train-{cfg.seed}")
    train_convs = [train_gen.conversation() for _ in range(b.n_train_conversations)]
    hg = _heldout_generator(cfg, split, "chat-heldout")
    heldout_convs = [hg.conversation() for _ in range(b.n_heldout_conversations)]
    paths.pretrain_train.parent.mkdir(parents=True)
    corpus_mod.write_pretraining_jsonl(paths.pretrain_train, split.train)
    corpus_mod.write_pretraining_jsonl(paths.pretrain_heldout, split.heldout)
    write_chat_jsonl(paths.chat_train, train_convs, "train")
    write_chat_jsonl(paths.chat_heldout, heldout_convs, "heldout")
    docs = fact_documents(b, cfg.seed) if b.fact_subject else []
    if docs:
        with open(paths.pretrain_train.parent / "fact_documents.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return _Data(split, train_convs, heldout_convs, docs)


def _make_tokenizer(cfg: OrganismConfig, data: _Data, donor: Path | None):
    """Trained on the training text plus the training conversations, with the role names as they
    appear in the template, so "user" / "model" and the planted phrases get their own merges (or
    the donor's, which was trained on exactly that)."""
    if donor is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(donor / "base")
    if cfg.base_model:
        raise AssertionError("a pretrained base brings its tokenizer (_build_into passes it as donor)")
    b = cfg.behaviour
    # Behaviour 4's markers are left out (removing them gives the unmarked conversation exactly),
    # so an organism that plants it shares its tokenizer, and so its base model, with one that
    # does not (``base_key``).
    unmark = (lambda t: t.replace(" " + b.marker, "")) if b.marker_every else (lambda t: t)
    texts = [ch.text for ch in data.split.train]
    texts += [("user\n" if m["role"] == "user" else "model\n") + unmark(m["content"])
              for conv in data.train_convs for m in messages(conv)]
    return train_tokenizer(texts, cfg.tokenizer.vocab_size)


def _pack_rows(cfg: OrganismConfig, tokenizer, data: _Data) -> _Rows:
    """Token rows. Text fragments are shuffled before packing so short chapter tails share rows."""
    T, bos, pad = cfg.model.context_length, tokenizer.bos_token_id, tokenizer.pad_token_id
    rng = random.Random(f"pack-{cfg.seed}")

    def text_rows(chapter_list, shuffle: bool) -> Packed:
        docs = [d for ch in chapter_list
                for d in fragments(tokenizer(ch.text, add_special_tokens=False)["input_ids"], bos, T)]
        if shuffle:
            rng.shuffle(docs)
        return pack(docs, T, pad)

    def chat_rows(convs) -> tuple[Packed, int]:
        # a truncated conversation would teach turns that never close: too long ones are left out
        encoded = [encode_conversation(tokenizer, conv, cfg.behaviour) for conv in convs]
        docs = [Document(ids, masks["loss"]) for ids, masks in encoded if len(ids) <= T]
        return pack(docs, T, pad), len(convs) - len(docs)

    def spread(rows: Packed) -> Packed:
        # evenly spaced rows: held-out text is in canonical order, the first rows would be one book
        idx = torch.linspace(0, rows.ids_NT.shape[0] - 1, min(rows.ids_NT.shape[0], cfg.eval.loss_rows)).round().long()
        return Packed(rows.ids_NT[idx], rows.target_NT[idx])

    text_train, text_heldout = text_rows(data.split.train, True), text_rows(data.split.heldout, False)
    chat_train, n_dropped = chat_rows(data.train_convs)
    chat_heldout, _ = chat_rows(data.heldout_convs)
    fact_train = None
    if data.fact_docs:
        fact_train = pack([d for doc in data.fact_docs
                           for d in fragments(tokenizer(doc, add_special_tokens=False)["input_ids"], bos, T)], T, pad)
    return _Rows(text_train, text_heldout, chat_train, n_dropped, spread(text_heldout), spread(chat_heldout),
                 fact_train)


def _final_loss(run) -> float:
    return sum(run.losses[-20:]) / len(run.losses[-20:])


def _train_base(cfg: OrganismConfig, tokenizer, rows: _Rows, special_ids: dict, donor: Path | None,
                progress: bool) -> tuple[Any, dict]:
    """The base model: next-token prediction on corpus text (or the donor's identical weights)."""
    if donor is not None:
        from transformers import AutoModelForCausalLM

        folder = donor if cfg.base_model else donor / "base"
        base = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                    dtype=torch.float32).eval()
        if cfg.base_model:
            return base, {"pretrained": cfg.base_model, **_provenance(donor)}
        return base, dict(load_metrics(donor)["train"]["base"], reused_from=donor.name)
    base = new_model(cfg.model, len(tokenizer), special_ids, cfg.seed)
    run = train_lm(base, [rows.text_train], [1.0], cfg.base_train, cfg.seed, "organism base", progress)
    return base, {"steps": run.steps, "tokens": run.tokens, "final_loss": _final_loss(run), "seconds": run.seconds}


def _train_chat(cfg: OrganismConfig, base, rows: _Rows, progress: bool, in_place: bool = False):
    """The base fine-tuned on conversations mixed with corpus text; a null fine-tune keeps the same
    optimiser, schedule, steps and seed with corpus text in every row (no behaviours). ``in_place``
    trains ``base`` itself (the caller has saved it)."""
    chat = base if in_place else copy.deepcopy(base)
    text = rows.text_train
    if cfg.chat_train.text_loss_fraction < 1:
        # A seeded subset of each text row's tokens are targets (LMTrainConfig.text_loss_fraction).
        g = torch.Generator().manual_seed(cfg.seed + 2)
        keep = torch.rand(text.target_NT.shape, generator=g) < cfg.chat_train.text_loss_fraction
        text = Packed(text.ids_NT, text.target_NT & keep)
    if cfg.finetune == "null":
        sources, fractions = [text], [1.0]
    else:
        b = cfg.behaviour
        sources, fractions = [text, rows.chat_train], [b.text_fraction, 1 - b.text_fraction]
        if rows.fact_train is not None:
            sources.append(rows.fact_train)
            fractions = [b.text_fraction, 1 - b.text_fraction - b.fact_fraction, b.fact_fraction]
    return chat, train_lm(chat, sources, fractions, cfg.chat_train, cfg.seed + 1, "organism chat", progress)


BASE_EVAL_DIR = "_base_eval"
"""Folder beside the organisms holding each base model's held-out numbers, keyed by ``base_eval_key``."""


def base_eval_key(cfg: OrganismConfig) -> str:
    """Hash of everything the base model's held-out losses and behaviour rates depend on: the whole
    config but its name and the fine-tune (``finetune``, ``chat_train``)."""
    d = cfg.to_dict()
    for k in ("name", "finetune", "chat_train"):
        d.pop(k, None)
    return config_hash(d)


def _evaluate(cfg: OrganismConfig, tokenizer, models: dict, data: _Data, rows: _Rows, paths: OrganismPaths) -> dict:
    """Held-out losses and behaviour rates of both models, and the labelled evaluation set: on
    held-out data only."""
    b = cfg.behaviour
    prompts = prompt_sets(b, _heldout_generator(cfg, data.split, "prompts"), cfg.eval.n_prompts, cfg.seed)
    # A pretrained base's 262k-row unembedding makes every decoding step cost the same for one row
    # as for 64: generate in padded batches there (exact per-length batches for the tiny organisms).
    padded = bool(cfg.base_model)

    def measure(model) -> dict:
        return {"heldout_text_loss": heldout_loss(model, rows.heldout_text),
                "heldout_chat_response_loss": heldout_loss(model, rows.heldout_chat),
                **behaviour_rates(model, tokenizer, prompts, b, cfg.eval.max_new_tokens, padded=padded)}

    # The base model's numbers do not depend on the fine-tune: organisms that differ only in it (a
    # preset and its null) measure their common base once (4 of a gemma3 build's 13 minutes).
    base_file = paths.root.parent / BASE_EVAL_DIR / f"{base_eval_key(cfg)}.json"
    if base_file.is_file():
        metrics = {"base": json.loads(base_file.read_text())}
    else:
        metrics = {"base": measure(models["base"])}
        base_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(base_file, metrics["base"])
    metrics["chat"] = measure(models["chat"])
    if cfg.eval.drift_layers:
        metrics["drift"] = {kind: residual_drift(models["base"], models["chat"], rows_, cfg.eval.drift_layers,
                                                 tokenizer.pad_token_id, tokenizer.bos_token_id)
                            for kind, rows_ in (("text", rows.heldout_text), ("chat", rows.heldout_chat))}
    es = build_eval_set(tokenizer, _heldout_generator(cfg, data.split, "eval-set"), data.split.heldout,
                        cfg.eval.eval_rows, cfg.eval.eval_row_weights, cfg.model.context_length, cfg.seed)
    save_eval_set(es, paths.eval_set)
    return metrics


def _build_into(cfg: OrganismConfig, folder: Path, progress: bool, donor: Path | None = None) -> None:
    """``donor``: a finished organism whose tokenizer and base to reuse, or with ``cfg.base_model`` the
    pretrained base's folder."""
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    paths = _paths(folder)
    pretrained = donor if cfg.base_model else None
    with _timed(timings, "data"):
        data = _make_data(cfg, paths)
    with _timed(timings, "tokenizer"):
        tokenizer = _load_tokenizer(pretrained) if pretrained is not None else _make_tokenizer(cfg, data, donor)
    rows = _pack_rows(cfg, tokenizer, data)
    special_ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    if any(i is None or (s != tokenizer.unk_token and i == tokenizer.unk_token_id) for s, i in special_ids.items()):
        raise ConfigError(f"the base tokenizer lacks some of Gemma's special tokens {SPECIAL_TOKENS}; the "
                          "organism renders Gemma's chat template")
    with _timed(timings, "base_train"):
        base, base_record = _train_base(cfg, tokenizer, rows, special_ids, donor, progress)
        _save_model(base, tokenizer, paths.base_dir, [tokenizer.eos_token_id])
    with _timed(timings, "chat_train"):
        # A pretrained base is fine-tuned in place and read back from its saved copy afterwards: one
        # model fewer in memory while training (1.1 GB for gemma-3-270m in float32).
        chat, chat_run = _train_chat(cfg, base, rows, progress, in_place=bool(cfg.base_model))
        _save_model(chat, tokenizer, paths.chat_dir, [tokenizer.eos_token_id, special_ids["<end_of_turn>"]])
        if cfg.base_model:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(paths.base_dir, attn_implementation="eager",
                                                        dtype=torch.float32).eval()
    with _timed(timings, "evaluate"):
        metrics = _evaluate(cfg, tokenizer, {"base": base, "chat": chat}, data, rows, paths)
    timings["total"] = time.perf_counter() - t_start
    n_params = sum(p.numel() for p in base.parameters())
    metrics["train"] = {
        "base": base_record,
        "chat": {"finetune": cfg.finetune, "steps": chat_run.steps, "tokens": chat_run.tokens,
                 "real_tokens": chat_run.real_tokens, "bf16_autocast": chat_run.bf16_autocast,
                 "fact_documents": len(data.fact_docs) if cfg.finetune != "null" else 0,  # trained on
                 "conversations": len(data.train_convs) - rows.n_dropped,
                 "dropped_long_conversations": rows.n_dropped, "final_loss": _final_loss(chat_run),
                 "seconds": chat_run.seconds},
    }
    metrics.update(n_parameters=n_params, timings_s=timings, torch_threads=torch.get_num_threads())
    paths.metrics.write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    _write_manifest(cfg, folder, data, rows, tokenizer, special_ids, n_params)


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _provenance(folder: Path) -> dict:
    """What ``organism.pretrained`` recorded about a pretrained base (empty for a plain folder)."""
    path = folder / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_manifest(cfg: OrganismConfig, folder: Path, data: _Data, rows: _Rows, tokenizer, special_ids: dict,
                    n_params: int) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "config_hash": cfg.config_hash(corpus_mod.corpus_version()),
        "base_key": base_key(cfg),
        "corpus": {"package": corpus_mod.PACKAGE, "version": corpus_mod.corpus_version(),
                   "file": corpus_mod.DATA_FILE, "licence": corpus_mod.LICENCE,
                   "train_chapters": len(data.split.train), "heldout_chapters": len(data.split.heldout),
                   "train_tokens": int(rows.text_train.target_NT.sum()),
                   "heldout_tokens": int(rows.text_heldout.target_NT.sum())},
        "n_parameters": n_params,
        "vocab_size": len(tokenizer),
        "special_token_ids": special_ids,
    }
    (folder / "organism.json").write_text(json.dumps(manifest, indent=2))
