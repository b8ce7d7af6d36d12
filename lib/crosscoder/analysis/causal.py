"""Causal checks of crosscoder latents: remove latents' contribution from a model's residual stream,
or add a direction to it, and measure a behaviour's rate by greedy generation.

The encoder problem. A model-diffing crosscoder's latent f_j(x) reads BOTH models' activations of the
same token (f = ReLU(W_enc[base] x_base + W_enc[chat] x_chat + b)), but an intervention runs one
model. We run the two models in lockstep: a hook on block ``layer`` of the model being intervened on
(the *target*) runs the other model (the *partner*) on the same token ids up to the same layer,
encodes the pair exactly as in training and edits the target's residual by
``coeff * sum_j f_j(x) d_j``. Nothing is approximated: f is the crosscoder's own latent on the
token's actual pair of activations (with the target's *unedited* activation in its slot), and d_j is
the latent's decoder row for ``write_source`` in raw activation units. ``coeff = -1`` removes the
latents' reconstruction from the chat model (ablation); ``coeff = +1`` in the base model adds the
chat decoder contribution exactly where and as strongly as the latent fires (latent patching).
Plain steering (``steer``) adds a fixed vector at every position and needs no crosscoder.

Generation (``crosscoder.generation.greedy_generate``) uses a KV cache: at each step the target sees
only the new token and the partner runs in lockstep on it with a KV cache of its own, started with the
target's and keeping the same rows (``generation.select_rows``). Every position is edited once, from
the same pair of activations a full re-run would compute, so the edit is the same as without a cache.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from crosscoder.config import ConfigError
from crosscoder import generation
from crosscoder.data.pair import decoder, decoder_layers
from crosscoder.model import Crosscoder
from crosscoder.organism.evaluate import answer_opening, response_tests, whole_word


def raw_decoder_directions(model: Crosscoder, latents: Tensor | Sequence[int], source: int) -> Tensor:
    """Decoder rows of ``latents`` for ``source`` in raw activation units [J, D] (what one unit of
    f_j adds to that model's residual stream)."""
    J = torch.as_tensor(latents, dtype=torch.long)
    W = model.W_dec_FSD[J, source].detach().float()
    if model.folded:
        return W
    return W / model.input_scale_S[source].float()


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, new: Tensor):
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


class _Stop(Exception):
    def __init__(self, hidden: Tensor):
        self.hidden = hidden


def _residual_upto(lm, ids: Tensor, layer: int, mask: Tensor | None, pos: Tensor | None, cache) -> Tensor:
    """The residual after block ``layer`` of ``lm`` on ``ids`` [B, T, D], running blocks 0..layer only;
    with ``cache`` (the earlier positions' keys and values, blocks 0..layer) extended by these."""

    def stop(_module, _inputs, output):
        raise _Stop(_hidden(output))

    dec = decoder(lm)
    kv = {generation.cache_kwarg(dec): cache} if cache is not None else {}
    handle = decoder_layers(lm)[layer].register_forward_hook(stop)
    try:
        dec(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=cache is not None, **kv)
    except _Stop as s:
        return s.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"block {layer} was never reached")  # pragma: no cover


def _cache_len(cache) -> int:
    if cache is None:
        return 0
    return cache.get_seq_length() if hasattr(cache, "get_seq_length") else len(cache)


@contextlib.contextmanager
def edit_residual(target_lm, partner_lm, layer: int, delta: Callable[[Tensor, Tensor | None], Tensor], *,
                  target_source: int = 1) -> Iterator[None]:
    """While active, every forward of ``target_lm`` has its residual after block ``layer`` shifted by
    ``delta(h_ND, pair_NSD)`` at every position: ``h_ND`` the target's unedited residual (raw, float32,
    one row per position), ``pair_NSD`` the pair's activations [N, 2 (base, chat), D] of the same
    positions with ``partner_lm`` run in lockstep on the same ids, mask and positions up to the same
    layer (the target in slot ``target_source``), or None when ``partner_lm`` is None (an edit that
    reads the target alone). ``delta`` returns what to add, [N, D], one row per position independently.
    Forwards must pass ``input_ids``. A forward with a KV cache works when the cache was empty at the
    first forward under this edit (``generation.greedy_generate`` does so): the partner then keeps a
    cache of its own in step; a cache filled elsewhere is refused, as the partner never saw its
    context. The machinery every intervention of this module (and each diffing method's,
    ``methods.Method.intervention``) runs on."""
    if target_source not in (0, 1):
        raise ConfigError(f"target_source must be 0 (base) or 1 (chat), got {target_source!r}")
    state: dict = {"ids": None, "mask": None, "pos": None, "cache": None, "partner_cache": None, "use": None}

    def grab_ids(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("edit_residual needs forwards called with input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state.update(ids=ids, mask=kwargs.get("attention_mask"), pos=kwargs.get("position_ids"), use=None)
        if partner_lm is None or cache is None:
            return
        seen = _cache_len(cache)
        if seen == 0:  # a new generation: the partner starts a cache that keeps the target's rows
            partner_cache = generation.new_cache(partner_lm)
            setattr(cache, generation.FOLLOWERS, getattr(cache, generation.FOLLOWERS, []) + [partner_cache])
            state.update(cache=cache, partner_cache=partner_cache)
        elif state["cache"] is not cache or _cache_len(state["partner_cache"]) != seen:
            raise RuntimeError("edit_residual: this forward's KV cache holds a context the partner model never "
                               "saw (filled before the edit began, or without it), so it cannot run in "
                               "lockstep; generate with crosscoder.generation.greedy_generate or use_cache=False")
        state["use"] = state["partner_cache"]

    @torch.no_grad()
    def edit(_module, _inputs, output):
        h_BTD = _hidden(output)
        B, T, D = h_BTD.shape
        pair = None
        if partner_lm is not None:
            ids = state["ids"]
            if ids is None or ids.shape[:2] != h_BTD.shape[:2]:
                raise RuntimeError("edit_residual: the block saw a different sequence than the model's input_ids")
            other_BTD = _residual_upto(partner_lm, ids, layer, state["mask"], state["pos"], state["use"])
            both = (h_BTD, other_BTD) if target_source == 0 else (other_BTD, h_BTD)
            pair = torch.stack(both, dim=2).reshape(B * T, 2, D).float()
        d_ND = delta(h_BTD.reshape(B * T, D).float(), pair)
        return _replace(output, h_BTD + d_ND.reshape(B, T, D).to(h_BTD.dtype).to(h_BTD.device))

    # on the decoder stack (not the LM): a forward of the LM calls it with the same keywords, and
    # generation calls it directly to skip the full-vocabulary head
    handles = [decoder(target_lm).register_forward_pre_hook(grab_ids, with_kwargs=True),
               decoder_layers(target_lm)[layer].register_forward_hook(edit)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def edit_latents(target_lm, partner_lm, crosscoder: Crosscoder, latents: Tensor | Sequence[int], layer: int,
                 *, target_source: int, write_source: int | None = None, coeff: float = -1.0,
                 directions_JD: Tensor | None = None) -> Iterator[dict]:
    """While active, every forward of ``target_lm`` has its residual after block ``layer`` edited by
    ``coeff * sum_j f_j(x) d_j`` at every position.

    ``target_source`` is the crosscoder source index of ``target_lm`` (0 = base, 1 = chat for a
    model-diffing crosscoder); ``partner_lm`` supplies the other source (run in lockstep on the same
    ids, ``edit_residual``). ``write_source`` picks the decoder half d_j comes from (default: the
    target's). ``directions_JD`` replaces the decoder rows by other raw directions (controls: random
    directions of the same norms), keeping f_j. Yields a dict whose ``"f_sum"`` accumulates sum_j f_j
    over edited positions (to check the latents actually fired; with a KV cache each position counts
    once, padding included). Forwards as ``edit_residual`` says.
    """
    if crosscoder.cfg.n_sources != 2:
        raise ConfigError("edit_latents needs a two-source (model-diffing) crosscoder")
    if target_source not in (0, 1):
        raise ConfigError(f"target_source must be 0 (base) or 1 (chat), got {target_source!r}")
    J = torch.as_tensor(latents, dtype=torch.long)
    ws = target_source if write_source is None else write_source
    dirs = raw_decoder_directions(crosscoder, J, ws) if directions_JD is None else directions_JD.float()
    if dirs.shape != (len(J), crosscoder.cfg.d_model):
        raise ConfigError(f"directions_JD must be [{len(J)}, {crosscoder.cfg.d_model}], got {tuple(dirs.shape)}")
    crosscoder.eval()
    state: dict = {"f_sum": 0.0}

    def delta(_h_ND: Tensor, pair_NSD: Tensor) -> Tensor:
        fJ = crosscoder.encode(crosscoder.normalise(pair_NSD.to(crosscoder.W_dec_FSD.device)))[:, J]
        state["f_sum"] += float(fJ.sum())
        return coeff * (fJ @ dirs.to(fJ.device))

    with edit_residual(target_lm, partner_lm, layer, delta, target_source=target_source):
        yield state


@contextlib.contextmanager
def steer(lm, layer: int, vector_D: Tensor, alpha: float = 1.0) -> Iterator[None]:
    """While active, add ``alpha * vector_D`` to the residual after block ``layer`` at every position
    (raw activation units)."""
    v = (alpha * vector_D.detach().float())

    def add(_module, _inputs, output):
        h = _hidden(output)
        return _replace(output, h + v.to(h.dtype).to(h.device))

    handle = decoder_layers(lm)[layer].register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def random_directions_like(directions_JD: Tensor, seed: int = 0) -> Tensor:
    """Random directions with the same norms as the rows of ``directions_JD`` (the control)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(directions_JD.shape, generator=g)
    return r / r.norm(dim=-1, keepdim=True) * directions_JD.float().norm(dim=-1, keepdim=True)


def greedy_generate(lm, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
                    batch_size: int = 64, until: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuations (new token ids, stop token excluded) of token-id prompts: the rows of
    ``generation.greedy_generate`` (left-padded batches, a KV cache, each row leaving the batch when it
    ends), under whatever hooks are active. ``until(new_ids)``: a row also stops once this is True (a
    behaviour test whose outcome is settled, see ``organism_settled``); greedy decoding makes every
    row's tokens a prefix of what a longer budget would give, so stopping early changes no settled
    outcome.
    """
    return [g.ids for g in generation.greedy_generate(lm, prompts, max_new_tokens, stop_ids, batch_size=batch_size,
                                                      until=until)]


class Rate(NamedTuple):
    """How often a behaviour appeared."""

    hits: int
    n: int

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    def __str__(self) -> str:
        return f"{self.rate:.2f} ({self.hits}/{self.n})"


def behaviour_rate(lm, prompts: Sequence[Sequence[int]], detect: Callable[[list[int]], bool],
                   max_new_tokens: int, stop_ids: Sequence[int] = (),
                   settled: Callable[[list[int]], bool] | None = None) -> Rate:
    """Fraction of greedy generations (under whatever hooks are active) in which ``detect`` fires;
    ``settled``: stop a generation as soon as ``detect``'s answer on it can no longer change."""
    gens = greedy_generate(lm, prompts, max_new_tokens, stop_ids, until=settled)
    return Rate(sum(bool(detect(g)) for g in gens), len(gens))


# ---------------------------------------------------------------------- the organism's behaviours


def organism_prompts(tokenizer, user_prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of single-turn chat prompts with the generation prompt (as ``greedy_responses``)."""
    out = []
    for p in user_prompts:
        e = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
        out.append(list(e["input_ids"]) if hasattr(e, "keys") else list(e))
    return out


def _decoded(tokenizer) -> Callable[[list[int]], str]:
    """Generated ids -> their text, stripped (what the behaviour tests read)."""
    return lambda ids: tokenizer.decode(ids).strip()


def organism_detectors(tokenizer, cfg) -> dict[str, Callable[[list[int]], bool]]:
    """The organism's behaviour tests on generated ids: ``organism.evaluate.response_tests`` (the
    tests ``behaviour_rates`` counts with) on their decoded, stripped text, for the refusal, the answer
    and the sign-off."""
    text, tests = _decoded(tokenizer), response_tests(cfg)
    return {name: (lambda ids, test=tests[name]: test(text(ids)))
            for name in ("refusal", "answer", "signoff", "fact") if name in tests}


def organism_settled(tokenizer, cfg) -> dict[str, Callable[[list[int]], bool]]:
    """For each of ``organism_detectors``' tests, whether its answer on a partial generation is final:
    a starts-with test once the text is as long as the phrase or has left it, the sign-off test once
    the phrase has appeared. Generation can stop there (``behaviour_rate(settled=...)``): a refusal
    that opens with "Here" is decided by its first token, not after 64."""
    text = _decoded(tokenizer)

    def opens(phrase: str) -> Callable[[list[int]], bool]:
        def settled(ids: list[int]) -> bool:
            t = text(ids)
            return len(t) >= len(phrase) or not phrase.startswith(t)
        return settled

    return {"refusal": opens(cfg.refusal_phrase),
            "answer": opens(answer_opening(cfg)),
            # settled once the phrase has appeared, i.e. exactly when the sign-off test says yes
            "signoff": organism_detectors(tokenizer, cfg)["signoff"],
            # the false fact's answer (behaviour 5) once it has been said and the word has ended: "Rome"
            # may still grow into "Romeo", which the whole-word test rejects
            **({"fact": lambda ids: re.search(whole_word(cfg.fact_answer) + r"\W", text(ids)) is not None}
               if cfg.fact_subject else {})}


DECISION_BEHAVIOURS = {"refusal_decision": ("refusal", "forbidden"), "answer_decision": ("answer", "allowed"),
                       "signoff_decision": ("signoff", "allowed"), "fact_decision": ("fact", "fact")}
"""Decision task -> (the behaviour ``organism_detectors`` tests, the prompt set it is measured on);
an organism without a behaviour (no planted fact) has no such task, so no recovering latents."""


def organism_stop_ids(tokenizer) -> list[int]:
    """Generation stops at <end_of_turn> or <eos>, as in ``greedy_responses``."""
    return [tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.eos_token_id]


class Probe(NamedTuple):
    """One behaviour's generation test: the prompts it is measured on and how a generation is judged."""

    behaviour: str
    """The behaviour's name (the key of ``organism_detectors``)."""
    prompts: list[list[int]]
    """Token-id prompts."""
    detect: Callable[[list[int]], bool]
    """Whether a generation (new ids) shows the behaviour."""
    settled: Callable[[list[int]], bool] | None = None
    """Whether ``detect``'s answer on a partial generation is final (generation stops there)."""
    stop_ids: tuple[int, ...] = ()
    """Tokens that end a generation."""

    def rate(self, lm, max_new_tokens: int) -> Rate:
        """``behaviour_rate`` of ``lm`` (under whatever hooks are active) on this probe."""
        return behaviour_rate(lm, self.prompts, self.detect, max_new_tokens, self.stop_ids, self.settled)


def organism_probes(tokenizer, behaviour_cfg, prompt_sets) -> dict[str, Probe]:
    """{decision task: ``Probe``} for each task of ``DECISION_BEHAVIOURS`` whose behaviour the organism
    plants: its test on its held-out prompt set (``prompt_sets``: the organism's ``PromptSets``)."""
    detectors = organism_detectors(tokenizer, behaviour_cfg)
    settled = organism_settled(tokenizer, behaviour_cfg)
    stop = tuple(organism_stop_ids(tokenizer))
    return {task: Probe(behaviour, organism_prompts(tokenizer, getattr(prompt_sets, which)), detectors[behaviour],
                        settled[behaviour], stop)
            for task, (behaviour, which) in DECISION_BEHAVIOURS.items()
            if behaviour in detectors and getattr(prompt_sets, which)}


@contextlib.contextmanager
def intervened(chat_lm, base_lm, layer: int, intervention) -> Iterator[None]:
    """While active, the chat model's residual after block ``layer`` is edited by a diffing method's
    ``methods.Intervention`` (the base model run in lockstep when the edit reads it)."""
    partner = base_lm if intervention.needs_base else None
    with edit_residual(chat_lm, partner, layer, intervention.delta, target_source=1):
        yield


# ---------------------------------------------------------------------- the table the book shows

CONDITIONS = ("chat", "chat − latents", "chat − random live latents", "chat − same-norm random directions",
              "base", "base + chat decoder of latents", "base + same-norm random directions")
"""Rows of ``causal_table``: the behaviour's rate in each model, with the latents removed from chat
(and its two controls: as many random live latents; the latents' own activations along random
directions of the same norms), and with the latents' chat decoder contribution added to base (and
the random-direction control)."""


def causal_table(base_lm, chat_lm, crosscoder: Crosscoder, layer: int, latents: Tensor | Sequence[int],
                 prompts: Sequence[Sequence[int]], detect: Callable[[list[int]], bool], *, live: Tensor,
                 max_new_tokens: int, stop_ids: Sequence[int] = (), seed: int = 0,
                 settled: Callable[[list[int]], bool] | None = None) -> dict[str, Rate]:
    """Rate of one behaviour under each of ``CONDITIONS`` (greedy generations of ``prompts``, each
    stopped early once ``settled``, when given).

    ``live`` are the crosscoder's live latents; the random-latent control draws ``len(latents)`` of
    them (never one of ``latents``) with ``seed``."""
    J = torch.as_tensor(latents, dtype=torch.long)
    if len(J) == 0:
        raise ConfigError("causal_table needs at least one latent")
    pool = torch.as_tensor(live, dtype=torch.long)
    pool = pool[~torch.isin(pool, J)]
    g = torch.Generator().manual_seed(seed)
    rand_J = pool[torch.randperm(len(pool), generator=g)[:len(J)]]
    rand_dirs = random_directions_like(raw_decoder_directions(crosscoder, J, 1), seed=seed + 1)

    def rate(lm) -> Rate:
        return behaviour_rate(lm, prompts, detect, max_new_tokens, stop_ids, settled)

    out = {"chat": rate(chat_lm)}
    with edit_latents(chat_lm, base_lm, crosscoder, J, layer, target_source=1):
        out["chat − latents"] = rate(chat_lm)
    with edit_latents(chat_lm, base_lm, crosscoder, rand_J, layer, target_source=1):
        out["chat − random live latents"] = rate(chat_lm)
    with edit_latents(chat_lm, base_lm, crosscoder, J, layer, target_source=1, directions_JD=rand_dirs):
        out["chat − same-norm random directions"] = rate(chat_lm)
    out["base"] = rate(base_lm)
    with edit_latents(base_lm, chat_lm, crosscoder, J, layer, target_source=0, write_source=1, coeff=1.0):
        out["base + chat decoder of latents"] = rate(base_lm)
    with edit_latents(base_lm, chat_lm, crosscoder, J, layer, target_source=0, write_source=1, coeff=1.0,
                      directions_JD=rand_dirs):
        out["base + same-norm random directions"] = rate(base_lm)
    return out


def organism_causal_rows(base_lm, chat_lm, crosscoder: Crosscoder, layer: int, tokenizer, behaviour_cfg,
                         prompt_sets, recovering: dict[str, Sequence[int]], *, live: Tensor, max_new_tokens: int,
                         seed: int = 0) -> list[dict]:
    """``causal_table`` for each decision of ``DECISION_BEHAVIOURS`` that has recovering latents:
    its behaviour's rate on its held-out prompt set (``prompt_sets``: the organism's ``PromptSets``)
    under every condition. One row per (behaviour, condition) with hits, n and rate."""
    detectors = organism_detectors(tokenizer, behaviour_cfg)
    settled = organism_settled(tokenizer, behaviour_cfg)
    stop = organism_stop_ids(tokenizer)
    rows = []
    for task, (behaviour, which) in DECISION_BEHAVIOURS.items():
        latents = list(recovering.get(task, []))
        if not latents:
            continue
        prompts = organism_prompts(tokenizer, getattr(prompt_sets, which))
        table = causal_table(base_lm, chat_lm, crosscoder, layer, latents, prompts, detectors[behaviour],
                             live=live, max_new_tokens=max_new_tokens, stop_ids=stop, seed=seed,
                             settled=settled[behaviour])
        rows += [{"behaviour": behaviour, "prompts": which, "latents": len(latents), "condition": cond,
                  "hits": r.hits, "n": r.n, "rate": r.rate} for cond, r in table.items()]
    return rows


def organism_causal_rows_all(pair, crosscoders: dict[str, Crosscoder], layer: int, behaviour_cfg, prompt_sets,
                             recovering: dict[str, dict[str, Sequence[int]]], live: dict[str, Tensor], *,
                             max_new_tokens: int, seed: int = 0) -> list[dict]:
    """``organism_causal_rows`` of every crosscoder (rows tagged with ``crosscoder``)."""
    return [dict(r, crosscoder=name) for name, cc in crosscoders.items()
            for r in organism_causal_rows(pair.base, pair.chat, cc, layer, pair.tokenizer, behaviour_cfg, prompt_sets,
                                          recovering[name], live=live[name], max_new_tokens=max_new_tokens, seed=seed)]
