"""The interface every model-diffing method implements, its input, its artifact folder and the registry.

A method is fitted on cached activations of a (base, chat) pair (``MethodData``: raw [N, 2, D], source
0 = base, 1 = chat) and yields *items* -- latents of a dictionary, or directions -- of which it flags
some as fine-tune-specific (chat-specific). Each item scores every token, so the same ground-truth
evaluation (AUROC against token labels) applies to every method:

    fitted = methods.fit("dfc", data, out_dir, cfg)   # or methods.get("dfc").fit(...)
    fitted.flagged_J                                  # long [J]: the items it flags
    fitted.scores(acts_NSD)                           # [N, n_items]: each item's score per token
    fitted.cost                                       # training seconds, memory
    methods.load(out_dir / "method")                  # the same fitted method, from its artifact
    fitted.intervention(items_J)                      # its edit of the chat model's residual stream

The causal check (``analysis.scoreboard_run.causal_checks``) asks each method for an
``Intervention`` on the chat model's residual stream at the diffed layer that removes some of its
items, and for a control of the same size (``control``); ``analysis.causal.edit_residual`` runs
either during generation. A method without a meaningful intervention keeps ``Method.intervention``,
which refuses with ``no_intervention``, and the check reports that reason instead of a rate.

A method is one module of this package: a config dataclass (``MethodConfig``) and a ``Method``
subclass decorated with ``@register``; the package imports every module in it, so a new method is one
new file. Artifacts are folders written atomically (``weights.safetensors`` with its sha256 in
``config.json``, and ``metrics.json``), read back only through ``load``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor

from crosscoder import checkpoint as ckpt
from crosscoder.atomic import write_json_atomic
from crosscoder.config import ConfigError, TrainConfig, _DictMixin

FORMAT = "diffing-method/1"
"""``config.json`` format tag of a method artifact."""
WEIGHTS = "weights.safetensors"
METHOD_DIR = "method"
"""The artifact's folder inside a fit's ``out_dir`` (training runs keep their log and checkpoints
beside it)."""
STAMP = "method.json"
"""The method and config a fit's ``out_dir`` belongs to, written before training starts: a resumed
checkpoint must come from the same method config, which the trainer's own run config cannot tell."""
BASE, CHAT = 0, 1
"""Source indices of the two models in every [N, S, D] tensor."""


class MethodData(NamedTuple):
    """The activations a method is fitted on (raw, as cached): like ``experiment.Splits``, with the
    normalisation split itself (a method that normalises something other than the two models'
    activations, e.g. their difference, estimates its own scale from it) and token positions."""

    train_NSD: Tensor
    """Raw training activations [N, 2, D] (any float dtype; cast to float32 per batch)."""
    heldout_NSD: Tensor
    """Raw held-out activations [M, 2, D]: evaluation, dead-latent and Latent Scaling statistics."""
    norm_NSD: Tensor
    """Raw activations [P, 2, D] apart from both, for normalisation factors (BOS excluded)."""
    train_pos_N: Tensor | None = None
    """Position of each training token in its document (BOS = 0, as the cache's ``pos``), or -1 for a
    token a position-based method must ignore (e.g. chat text, where ADL wants plain text only)."""
    heldout_pos_N: Tensor | None = None
    """Positions of the held-out tokens, same convention."""

    @classmethod
    def from_cache(cls, cache, *, chat_marker_id: int | None = None) -> "MethodData":
        """The train, held-out and norm splits of an ``ActivationCache`` with their positions.
        ``chat_marker_id``: the token that opens every chat sequence right after BOS (Gemma's
        ``<start_of_turn>``); the tokens of those sequences get position -1 (``text_only_positions``),
        so a position-based method (ADL) reads plain text only."""
        train, train_tok, train_seq, train_pos = cache.load("train", with_index=True)
        held, held_tok, held_seq, held_pos = cache.load("heldout", with_index=True)
        if chat_marker_id is not None:
            train_pos = text_only_positions(train_tok, train_seq, train_pos, chat_marker_id)
            held_pos = text_only_positions(held_tok, held_seq, held_pos, chat_marker_id)
        return cls(train, held.float(), cache.load("norm").float(), train_pos.long(), held_pos.long())


def text_only_positions(token_N: Tensor, seq_N: Tensor, pos_N: Tensor, chat_marker_id: int) -> Tensor:
    """``pos_N`` with -1 on every token of a sequence whose token at position 1 (the first after BOS) is
    ``chat_marker_id``: the cache's rows (token, sequence, position) with the chat sequences masked out."""
    chat_seqs = seq_N[(pos_N == 1) & (token_N == chat_marker_id)]
    return torch.where(torch.isin(seq_N, chat_seqs), torch.full_like(pos_N, -1), pos_N)


def check_acts(name: str, acts_NSD: Tensor, d_model: int | None = None) -> None:
    """One clear error for activations that are not [N, 2, D] (of width ``d_model`` if given)."""
    ok = isinstance(acts_NSD, Tensor) and acts_NSD.ndim == 3 and acts_NSD.shape[1] == 2
    if ok and d_model is not None:
        ok = acts_NSD.shape[2] == d_model
    if not ok:
        shape = tuple(acts_NSD.shape) if isinstance(acts_NSD, Tensor) else type(acts_NSD).__name__
        width = d_model if d_model is not None else "d_model"
        raise ConfigError(f"{name} must have shape [tokens, 2 (base, chat), {width}], got {shape}; stack the "
                          f"base and chat activations of each token along dim 1")


def check_data(data: MethodData) -> int:
    """Validate ``data`` (shapes, widths, position lengths); returns d_model."""
    if not isinstance(data, MethodData):
        raise ConfigError(f"methods are fitted on a MethodData, got {type(data).__name__}; build one with "
                          f"MethodData(train_NSD, heldout_NSD, norm_NSD) or MethodData.from_cache(cache)")
    check_acts("train_NSD", data.train_NSD)
    D = data.train_NSD.shape[2]
    check_acts("heldout_NSD", data.heldout_NSD, D)
    check_acts("norm_NSD", data.norm_NSD, D)
    for split, acts, pos in (("train", data.train_NSD, data.train_pos_N), ("heldout", data.heldout_NSD,
                                                                          data.heldout_pos_N)):
        if pos is not None and (pos.ndim != 1 or pos.shape[0] != acts.shape[0]):
            raise ConfigError(f"{split}_pos_N must hold one position per {split} token ({acts.shape[0]}), got "
                              f"shape {tuple(pos.shape)}")
    return D


@dataclass
class MethodConfig(_DictMixin):
    """Base of every method's config. A field of type ``TrainConfig`` may be given as a dict (as it
    reads back from JSON); it is converted here."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "train" and isinstance(getattr(self, f.name), dict):
                setattr(self, f.name, TrainConfig.from_dict(getattr(self, f.name)))


class Cost(NamedTuple):
    """What fitting a method cost."""

    train_seconds: float
    """Wall-clock seconds of the fit (training and flagging), in the session that fitted it."""
    peak_memory_bytes: int | None
    """Peak device memory during the fit (CUDA only: ``torch.cuda.max_memory_allocated``); None on the
    CPU, where no per-fit figure is cheap to get (the process's peak RSS mixes in everything else)."""
    param_bytes: int
    """Bytes of the fitted method's tensors (parameters and statistics; Adam adds twice the
    parameters' bytes while training)."""
    train_tokens: int
    """Tokens the fit consumed (steps x batch for a trained dictionary, the tokens averaged for ADL)."""


class Intervention(NamedTuple):
    """An edit of the chat model's residual stream at the diffed layer (what
    ``analysis.causal.edit_residual`` applies at every position of every forward)."""

    delta: Callable[[Tensor, Tensor | None], Tensor]
    """(h_chat [N, D], pair [N, 2 (base, chat), D] or None) -> what to add to the chat residual [N, D];
    raw activation units, float32. The pair holds the base model's activation of the same token (run
    in lockstep) and the chat model's unedited one; None when ``needs_base`` is False."""
    needs_base: bool
    """Whether ``delta`` reads the base model's activation (then the base model runs in lockstep)."""
    what: str
    """What is removed, in words (the page's table shows it)."""


def random_other_items(items_J: Tensor, pool_J: Tensor, seed: int) -> Tensor:
    """As many items as ``items_J``, drawn without replacement (seeded) from ``pool_J`` minus
    ``items_J`` (fewer when the pool is smaller), ascending."""
    J = torch.as_tensor(items_J, dtype=torch.long).reshape(-1)
    pool = torch.as_tensor(pool_J, dtype=torch.long).reshape(-1).unique()
    pool = pool[~torch.isin(pool, J)]
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:len(J)]
    return pool[pick].sort().values


M = TypeVar("M", bound="Method")
REGISTRY: dict[str, type["Method"]] = {}
"""Method name -> class, filled by ``@register`` as the package imports its modules."""


def register(cls: type[M]) -> type[M]:
    """Class decorator: make a ``Method`` subclass available under ``cls.name``."""
    if not getattr(cls, "name", "") or not isinstance(cls.name, str):
        raise TypeError(f"{cls.__name__} needs a class attribute name (the method's registry key)")
    old = REGISTRY.get(cls.name)
    # the same class defined again (a reloaded module, autoreload in a notebook) replaces itself
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}; choose another")
    REGISTRY[cls.name] = cls
    return cls


class Method(ABC):
    """A fitted model-diffing method: its items, the ones it flags, their scores per token, its cost.

    Subclasses set ``name`` and ``Config`` and implement ``_fit``, ``n_items``, ``_scores``,
    ``tensors`` and ``_from_tensors``; ``fit``, ``save`` and ``load`` are shared.
    """

    name: ClassVar[str] = ""
    """Registry key (also the artifact's "method" in config.json)."""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    """The method's config dataclass."""
    cut_field: ClassVar[str | None] = None
    """The config field of the method's flagging cut, a threshold on ``cut_statistic`` that flags an
    item when its statistic is >= the cut (ADL: ``min_relative_norm``; diff-SAE: ``min_explained``),
    which validation data may set (``with_cut``, ``analysis.scoreboard.tune_cut``); None: no such cut."""
    free_sign: ClassVar[bool] = False
    """True when an item's orientation is not fixed by the fit (ADL: a mean difference may point away
    from a behaviour it detects), so validation data choose the sign of each item's score
    (``with_signs``, ``analysis.scoreboard.tune_signs``)."""
    no_intervention: ClassVar[str] = ("the method defines no edit of the chat model's residual stream "
                                      "(Method.intervention)")
    """Why the method has no causal check: shown in its place when ``intervention`` is not overridden."""

    def __init__(self, cfg: MethodConfig, d_model: int, flagged_J: Tensor, metrics: dict[str, Any]):
        self.cfg = cfg
        self.d_model = d_model
        self.flagged_J = torch.as_tensor(flagged_J, dtype=torch.long).reshape(-1)
        """Indices of the items the method flags as chat-specific: in the method's order of importance
        where it has one (diff-SAE: variance explained), else ascending."""
        self.metrics = metrics
        """Everything ``metrics.json`` holds: the cost, the flagged items, the method's own summary."""

    # ------------------------------------------------------------------ the interface
    @property
    @abstractmethod
    def n_items(self) -> int:
        """Number of items (latents or directions) the method scores."""

    @abstractmethod
    def _scores(self, acts_NSD: Tensor, positions_N: Tensor | None) -> Tensor:
        """[N, n_items] scores of one batch of raw float32 activations."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """What the artifact must store to rebuild the method (besides cfg, d_model and flagged_J)."""

    @classmethod
    @abstractmethod
    def _from_tensors(cls: type[M], cfg: MethodConfig, d_model: int, flagged_J: Tensor, tensors: dict[str, Tensor],
                      metrics: dict[str, Any]) -> M:
        """The fitted method rebuilt from ``tensors()`` (the inverse of ``tensors``)."""

    @classmethod
    @abstractmethod
    def _fit(cls: type[M], cfg: MethodConfig, data: MethodData, out_dir: Path, *, progress: bool) -> M:
        """Fit on ``data`` (already checked); training state may go under ``out_dir``. The returned
        method's metrics need not hold the cost: ``fit`` adds it."""

    # ------------------------------------------------------------------ the flagging cut
    def cut_statistic(self) -> tuple[Tensor, Tensor]:
        """(stat_J, gate_J) of a method with a ``cut_field``: each item's statistic that the cut
        thresholds, and whether the item passes the method's other flagging rules. Under a cut c the
        method flags exactly the items with gate_J and stat_J >= c (``flagged_under``)."""
        raise ConfigError(f"method {self.name!r} has no tunable flagging cut (cut_field is None)")

    def flagged_under(self, cfg: MethodConfig) -> Tensor:
        """The items this fitted method flags under ``cfg`` (its config with another cut), recomputed from
        what the fit stored, without refitting; the rule ``_fit`` flags by."""
        raise ConfigError(f"method {self.name!r} has no tunable flagging cut (cut_field is None)")

    def with_cut(self, value: float) -> "Method":
        """A copy of this fitted method flagged with ``cut_field`` = ``value`` (the same items, scores
        and cost; no refit). Its metrics record the cut under "cut"."""
        if self.cut_field is None:
            raise ConfigError(f"method {self.name!r} has no tunable flagging cut (cut_field is None)")
        cfg = dataclasses.replace(self.cfg, **{self.cut_field: float(value)})  # validated by __post_init__
        out = copy.copy(self)
        out.cfg = cfg
        out.flagged_J = torch.as_tensor(self.flagged_under(cfg), dtype=torch.long).reshape(-1)
        out.metrics = {**self.metrics, "cut": {"field": self.cut_field, "value": float(value),
                                               "fitted with": getattr(self.cfg, self.cut_field)}}
        return out

    # ------------------------------------------------------------------ the sign of each item's score
    def with_signs(self, signs_J: Tensor) -> "Method":
        """A copy of this fitted method whose item j scores ``signs_J[j]`` (+1 or -1) times its fitted
        score (the same items, flags and cost; no refit). Only for ``free_sign`` methods."""
        raise ConfigError(f"method {self.name!r} has no free sign (free_sign is False): its scores are oriented by "
                          f"the fit")

    # ------------------------------------------------------------------ the causal check
    @property
    def intervenes(self) -> bool:
        """Whether the method defines ``intervention`` (else ``no_intervention`` says why not)."""
        return type(self).intervention is not Method.intervention

    def intervention(self, items_J: Tensor) -> Intervention:
        """The edit of the chat model's residual stream at the diffed layer that removes items
        ``items_J`` (their contribution, as the method reads it, where they are present)."""
        raise ConfigError(f"method {self.name!r} has no intervention: {self.no_intervention}")

    def control(self, items_J: Tensor, live_J: Tensor, seed: int = 0) -> Intervention | None:
        """The control of ``intervention(items_J)``: the same edit of as many random live items
        (``live_J``: the items active on some held-out token; never one of ``items_J``), the standard
        random-latent control (it measures what removing that many of the dictionary's reconstruction
        terms does by itself). None when no other live item exists. A method whose items are not a
        dictionary overrides it (ADL: random directions)."""
        rand = random_other_items(items_J, live_J, seed)
        if not len(rand):
            return None
        iv = self.intervention(rand)
        return iv._replace(what=f"{len(rand)} random live item{'s' if len(rand) != 1 else ''}")

    @torch.no_grad()
    def scores(self, acts_NSD: Tensor, positions_N: Tensor | None = None, *, batch_size: int = 4096) -> Tensor:
        """Each item's score on each token of raw activations [N, 2, D] -> float32 [N, n_items]
        (higher = more of the item; what AUROC against token labels ranks). ``positions_N``: only
        for methods whose scores depend on the position (none of the six do)."""
        check_acts("acts_NSD", acts_NSD, self.d_model)
        out = [self._scores(acts_NSD[i:i + batch_size].float(),
                            None if positions_N is None else positions_N[i:i + batch_size])
               for i in range(0, acts_NSD.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.n_items)

    @property
    def cost(self) -> Cost:
        return Cost(**self.metrics["cost"])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.n_items} items, {len(self.flagged_J)} flagged>"

    # ------------------------------------------------------------------ fit (with caching) and I/O
    @classmethod
    def fit(cls: type[M], data: MethodData, out_dir: str | os.PathLike, cfg: MethodConfig | None = None, *,
            progress: bool = False) -> M:
        """Fit on ``data`` into ``out_dir`` (the artifact goes to ``out_dir/method``). A finished fit
        with this config is loaded instead; an interrupted training run resumes from its checkpoint;
        ``out_dir`` of another method or config is refused."""
        cfg = cls.Config() if cfg is None else cfg
        if not isinstance(cfg, cls.Config):
            raise ConfigError(f"method {cls.name!r} takes a {cls.Config.__name__}, got {type(cfg).__name__}")
        d_model = check_data(data)
        out_dir = ckpt.ensure_writable_dir(out_dir)
        stamp = {"method": cls.name, "config": json.loads(cfg.to_json()), "d_model": d_model}
        stamp_path = out_dir / STAMP
        if stamp_path.exists():
            old = json.loads(stamp_path.read_text())
            if old != stamp:
                raise ConfigError(f"{out_dir} holds a fit of {old.get('method')!r} with another config or data "
                                  f"width; use another out_dir, or delete it to start over")
            if (out_dir / METHOD_DIR / "config.json").exists():
                return load(out_dir / METHOD_DIR)  # type: ignore[return-value]
        else:
            write_json_atomic(stamp_path, stamp)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fitted = cls._fit(cfg, data, out_dir, progress=progress)
        seconds = time.perf_counter() - t0
        nbytes = sum(t.numel() * t.element_size() for t in fitted.tensors().values())
        fitted.metrics.setdefault("train_tokens", 0)
        fitted.metrics["cost"] = Cost(seconds, int(torch.cuda.max_memory_allocated()) if cuda else None, nbytes,
                                      int(fitted.metrics.pop("train_tokens")))._asdict()
        fitted.save(out_dir / METHOD_DIR)
        return fitted

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact folder ``path`` atomically: weights.safetensors, config.json, metrics.json."""
        flagged = self.flagged_J

        def fill(tmp: Path) -> None:
            tensors = {**self.tensors(), "flagged_J": flagged}
            digest = ckpt.save_tensors_checked(tensors, tmp, WEIGHTS)
            write_json_atomic(tmp / "config.json", {"format": FORMAT, "method": self.name, "d_model": self.d_model,
                                                    "config": json.loads(self.cfg.to_json()),
                                                    "files": {WEIGHTS: digest}})
            write_json_atomic(tmp / "metrics.json", {**self.metrics, "n_items": self.n_items,
                                                     "flagged": flagged.tolist()})

        return ckpt.write_folder_atomically(path, fill)


def load(path: str | os.PathLike) -> Method:
    """A fitted method from its artifact folder (checksum verified), whatever the method."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not a method artifact (fit writes it to "
                                f"out_dir/{METHOD_DIR})")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{cfg_path} has format {meta.get('format')!r}, expected {FORMAT!r}; a crosscoder folder "
                          f"loads with crosscoder.checkpoint.load_crosscoder")
    cls = get(meta["method"])
    tensors = ckpt.load_tensors_checked(path, WEIGHTS, meta["files"][WEIGHTS])
    flagged = tensors.pop("flagged_J")
    metrics = json.loads((path / "metrics.json").read_text())
    for key in ("n_items", "flagged"):
        metrics.pop(key, None)
    return cls._from_tensors(cls.Config.from_dict(meta["config"]), int(meta["d_model"]), flagged, tensors, metrics)


def get(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown diffing method {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]
