"""Downstream fidelity: CE loss recovered when the crosscoder's reconstruction replaces the residual
stream of each model, with zero- and mean-ablation baselines and the KL to the clean distribution.

    CE recovered_s = (CE_zero - CE_splice) / (CE_zero - CE_clean)

Two definitions of which positions are ablated and scored (``definition=``):

* ``"ours"`` (default): the residual after block L is replaced at every position except BOS (which
  the crosscoder is never trained on) in the splice AND in the zero / mean ablations, and
  next-token losses are averaged over the predictions made from those positions, so the
  BOS-position prediction (unchanged by any splice) does not dilute the numbers.
* ``"kissane"``: as in Kissane et al.'s public code (``get_ce_recovered_metrics``): the splice
  replaces every position but BOS, the zero ablation zeroes EVERY position including BOS, and the
  loss is the mean over all next-token predictions of the sequence (TransformerLens
  ``return_type="loss"``; padding excluded here). Zeroing BOS makes the zero baseline much worse,
  so the recovered fraction is higher than ours for the same reconstruction. Use it only to
  compare with the published number. The mean ablation keeps BOS clean in both definitions.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F_nn
from torch import Tensor

from crosscoder.data.pair import residual_hook
from crosscoder.model import Crosscoder

CE_DEFINITIONS = ("ours", "kissane")
"""Valid ``definition`` values of ``ce_recovered``."""


def _head(lm):
    """h [M, D] after the final norm -> logits [M, V] in float32, as the LM's own forward makes them
    (its unembedding, then Gemma 2's logit soft-capping where the config has it)."""
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None)

    def logits(h_MD: Tensor) -> Tensor:
        z = head(h_MD).float()
        return torch.tanh(z / cap) * cap if cap else z
    return logits


def _final_hidden(lm, ids_BT: Tensor, am_BT: Tensor) -> Tensor:
    """The last hidden state (after the final norm) of every position: what the unembedding reads."""
    return lm.model(input_ids=ids_BT, attention_mask=am_BT.long()).last_hidden_state


def _position_losses(lm, hidden: dict[str, Tensor], ids_BT: Tensor, mask_BT: Tensor, chunk: int,
                     kl_of: dict[str, str]) -> dict[str, Tensor]:
    """Next-token CE [M] of each entry of ``hidden`` ({"clean": h, variant: h}, [B, T, D] each) and
    KL(clean || variant) [M] of the variants in ``kl_of`` (stored under ``kl_of[variant]``), at the
    M predictions made from positions where ``mask`` is True (and the next token is real), in
    row-major order; ``chunk`` positions are projected at a time: a 262k vocabulary makes one
    batch's full logits ~1 GB per copy, and a variant needs several."""
    m_BT = mask_BT[:, :-1] & mask_BT[:, 1:]
    y_M = ids_BT[:, 1:][m_BT]
    h = {k: v[:, :-1][m_BT] for k, v in hidden.items()}  # [M, D]
    logits = _head(lm)
    out: dict[str, list[Tensor]] = {k: [] for k in [*hidden, *kl_of.values()]}
    for i in range(0, y_M.shape[0], chunk):
        y = y_M[i:i + chunk, None]
        p = F_nn.log_softmax(logits(h["clean"][i:i + chunk]), dim=-1)
        p_exp = p.exp()
        out["clean"].append(-p.gather(-1, y)[:, 0])
        for k in hidden:
            if k != "clean":
                q = F_nn.log_softmax(logits(h[k][i:i + chunk]), dim=-1)
                out[k].append(-q.gather(-1, y)[:, 0])
                if k in kl_of:
                    out[kl_of[k]].append((p_exp * (p - q)).sum(-1))
    return {k: torch.cat(v) if v else y_M.new_zeros(0, dtype=torch.float32) for k, v in out.items()}


@torch.no_grad()
def ce_recovered(
    lms: Sequence,
    crosscoder: Crosscoder,
    input_ids_NT: Tensor,
    layer: int,
    *,
    attention_mask_NT: Tensor | None = None,
    mean_raw_SD: Tensor | None = None,
    batch_size: int = 8,
    source_names: Sequence[str] | None = None,
    definition: str = "ours",
    position_chunk: int = 256,
) -> dict[str, dict[str, float]]:
    """CE recovered per model (``lms[s]`` is source s of the crosscoder) on held-out sequences.

    ``definition``: "ours" or "kissane" (module docstring).

    ``mean_raw_SD``: mean activation per source for the mean-ablation baseline (estimated on other
    data); omitted, the batch mean of non-BOS positions is used. ``position_chunk`` positions are
    projected through the unembedding at a time (the full logits are never held).
    Returns {source: {ce_clean, ce_splice, ce_zero, ce_mean, ce_recovered, ce_recovered_vs_mean,
    kl_splice, kl_zero, n_predictions}}.
    """
    return ce_recovered_definitions(lms, crosscoder, input_ids_NT, layer, attention_mask_NT=attention_mask_NT,
                                    mean_raw_SD=mean_raw_SD, batch_size=batch_size, source_names=source_names,
                                    definitions=(definition,), position_chunk=position_chunk)[definition]


@torch.no_grad()
def ce_recovered_definitions(
    lms: Sequence,
    crosscoder: Crosscoder,
    input_ids_NT: Tensor,
    layer: int,
    *,
    attention_mask_NT: Tensor | None = None,
    mean_raw_SD: Tensor | None = None,
    batch_size: int = 8,
    source_names: Sequence[str] | None = None,
    definitions: Sequence[str] = CE_DEFINITIONS,
    position_chunk: int = 256,
) -> dict[str, dict[str, dict[str, float]]]:
    """``ce_recovered`` of several ``definitions`` at once: {definition: {source: {...}}}.

    The definitions differ only in the zero ablation and in whether the BOS position's prediction
    is scored, so the clean, splice and mean-ablation forwards and their logits are shared: both
    definitions cost 5 forwards and unembeddings per model and batch instead of 8 (the gemma3
    organism's 262k-token unembedding made the two separate calls most of a training page's CE
    cell). Equal to separate calls up to float32 summation order. ``ce_sums`` with ``baselines``
    reuses another crosscoder's ablation sums."""
    return ce_ratios(ce_sums(lms, crosscoder, input_ids_NT, layer, attention_mask_NT=attention_mask_NT,
                             mean_raw_SD=mean_raw_SD, batch_size=batch_size, source_names=source_names,
                             definitions=definitions, position_chunk=position_chunk))


BASELINE_SUMS = ("clean", "zero", "mean", "kl_zero", "n")
"""The sums of ``ce_sums`` that do not depend on the crosscoder (the clean, zero- and mean-ablated
losses, KL of the zero ablation, the number of predictions scored)."""


def baseline_sums(sums: dict) -> dict[str, dict[str, dict[str, float]]]:
    """The crosscoder-independent part of ``ce_sums``' result, to pass as ``baselines`` (JSON-able)."""
    return {d: {name: {k: acc[k] for k in BASELINE_SUMS} for name, acc in by_source.items()}
            for d, by_source in sums.items()}


@torch.no_grad()
def ce_sums(
    lms: Sequence,
    crosscoder: Crosscoder,
    input_ids_NT: Tensor,
    layer: int,
    *,
    attention_mask_NT: Tensor | None = None,
    mean_raw_SD: Tensor | None = None,
    batch_size: int = 8,
    source_names: Sequence[str] | None = None,
    definitions: Sequence[str] = CE_DEFINITIONS,
    position_chunk: int = 256,
    baselines: dict | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Summed losses behind ``ce_recovered_definitions``: {definition: {source: {clean, splice, zero,
    mean, kl_splice, kl_zero, n}}} (float64 sums over the scored predictions; ``ce_ratios`` turns
    them into the metrics).

    Only the splice depends on the crosscoder. With ``baselines`` (``baseline_sums`` of an earlier
    call on the same models, sequences and settings) the zero and mean ablations are not run: per
    model and batch 2 unembeddings (clean, for the splice's KL, and splice) instead of 5, and one
    ablated forward instead of 4. The clean forward runs either way (it gives the crosscoder's
    input), and its sums must match the baselines' (else ValueError: not the same models or data)."""
    for d in definitions:
        if d not in CE_DEFINITIONS:
            raise ValueError(f"definition must be one of {CE_DEFINITIONS}, got {d!r}")
    definitions = list(dict.fromkeys(definitions))
    S = crosscoder.cfg.n_sources
    if len(lms) != S:
        raise ValueError(f"got {len(lms)} language models for a {S}-source crosscoder")
    names = list(source_names or crosscoder.cfg.source_names)
    if baselines is not None and sorted(baselines) != sorted(definitions):
        raise ValueError(f"baselines hold definitions {sorted(baselines)}, not {sorted(definitions)}")
    dev = next(lms[0].parameters()).device
    cc_dev = crosscoder.W_dec_FSD.device  # may differ from the LMs' (e.g. LMs on GPU, crosscoder on CPU)
    sums = {d: {n: {k: torch.zeros((), dtype=torch.float64, device=dev) for k in
                    ("clean", "splice", "zero", "mean", "kl_splice", "kl_zero", "n")} for n in names}
            for d in definitions}
    was = crosscoder.training
    crosscoder.eval()
    for start in range(0, input_ids_NT.shape[0], batch_size):
        ids = input_ids_NT[start : start + batch_size].to(dev)
        am = (attention_mask_NT[start : start + batch_size].to(dev).bool()
              if attention_mask_NT is not None else torch.ones_like(ids, dtype=torch.bool))
        # columns that are padding in every row of the batch: nothing is scored or ablated there and a
        # causal model's other positions do not read them, so they are not run
        width = int(am.any(0).nonzero().max()) + 1 if am.any() else 1
        ids, am = ids[:, :width], am[:, :width]
        clean_hidden, acts = [], []
        for lm in lms:
            cap: list[Tensor] = []
            with residual_hook(lm, layer, capture=cap):
                clean_hidden.append(_final_hidden(lm, ids, am))
            acts.append(cap[0].float())
        acts_BTSD = torch.stack(acts, dim=2)
        body = am.clone()
        body[:, 0] = False  # BOS (and padding) keep their clean residual
        x = acts_BTSD[body]  # [n, S, D] raw
        recon = crosscoder.denormalise(crosscoder(crosscoder.normalise(x.to(cc_dev))).recon_BSD).to(dev)
        # per definition: the positions whose predictions are scored and those the zero ablation
        # replaces (kissane: every position, BOS included; ours: the body)
        where = {"ours": body, "kissane": am}
        union = am if "kissane" in definitions else body
        sub = {d: (where[d][:, :-1] & where[d][:, 1:])[union[:, :-1] & union[:, 1:]] for d in definitions}
        for s, (lm, name) in enumerate(zip(lms, names)):
            base_resid = acts_BTSD[:, :, s]
            hidden = {"clean": clean_hidden[s]}
            variants = [("splice", body, recon[:, s])]
            if baselines is None:
                mean_D = mean_raw_SD[s].to(dev).float() if mean_raw_SD is not None else x[:, s].mean(0)
                variants += [("mean", body, mean_D.expand_as(recon[:, s]))]
                variants += [(f"zero_{d}", where[d], 0.0) for d in definitions]
            for kind, replaced, values in variants:
                resid = base_resid.clone()
                resid[replaced] = values
                # blocks 0..layer are not rerun: their output is overwritten at every position
                with residual_hook(lm, layer, replace=resid, skip_earlier=True):
                    hidden[kind] = _final_hidden(lm, ids, am)
            kl_of = {"splice": "kl_splice"}
            if baselines is None:
                kl_of.update({f"zero_{d}": f"kl_zero_{d}" for d in definitions})
            got = _position_losses(lm, hidden, ids, union, position_chunk, kl_of)
            for d in definitions:
                acc, m = sums[d][name], sub[d]
                for k, src in (("clean", "clean"), ("splice", "splice"), ("zero", f"zero_{d}"), ("mean", "mean"),
                               ("kl_splice", "kl_splice"), ("kl_zero", f"kl_zero_{d}")):
                    if src in got:
                        acc[k] += got[src][m].double().sum()
                acc["n"] += m.sum()
    crosscoder.train(was)
    out = {d: {n: {k: float(v) for k, v in acc.items()} for n, acc in by_source.items()} for d, by_source in sums.items()}
    if baselines is not None:
        for d in definitions:
            for name in names:
                got, known = out[d][name], baselines[d][name]
                if got["n"] != known["n"] or not math.isclose(got["clean"], known["clean"], rel_tol=1e-6):
                    raise ValueError(f"the CE baselines are not of these models and sequences ({d}, {name}: "
                                     f"{got['n']:.0f} predictions and clean sum {got['clean']:.6g} here, "
                                     f"{known['n']:.0f} and {known['clean']:.6g} in the baselines); "
                                     "compute them again without baselines=")
                got.update({k: float(known[k]) for k in ("zero", "mean", "kl_zero")})
    return out


def ce_ratios(sums: dict) -> dict[str, dict[str, dict[str, float]]]:
    """``ce_sums``' sums -> {definition: {source: {ce_clean, ce_splice, ..., n_predictions}}}."""
    return {d: _ratios(by_source) for d, by_source in sums.items()}


def _ratios(sums: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, acc in sums.items():
        n = acc["n"]
        if n == 0:
            raise ValueError("no predictions to score: sequences need at least 3 non-pad tokens")
        r = {f"ce_{k}": float(acc[k]) / n for k in ("clean", "splice", "zero", "mean")}
        r["ce_recovered"] = (r["ce_zero"] - r["ce_splice"]) / (r["ce_zero"] - r["ce_clean"])
        r["ce_recovered_vs_mean"] = (r["ce_mean"] - r["ce_splice"]) / (r["ce_mean"] - r["ce_clean"])
        r["kl_splice"] = float(acc["kl_splice"]) / n
        r["kl_zero"] = float(acc["kl_zero"]) / n
        r["n_predictions"] = int(n)
        out[name] = r
    return out
