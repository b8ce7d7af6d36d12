"""The scoreboard: which model-diffing method finds what fine-tuning planted?

Every method of ``crosscoder.methods`` flags some of its items (latents or directions) as
fine-tune-specific and scores every token with every item. Against the organism's token-level ground
truth (``probes.ProbeTask``: a behaviour's positive positions among its comparable, *eligible* ones)
the scoreboard asks, per method:

* **recovery** -- for each behaviour, the best AUROC over the task's eligible positions among the
  items the method *flags* (an unflagged item that detects the behaviour does not count: a
  researcher reading the method's output would never look at it); recovered = best AUROC >=
  ``threshold`` (0.9), with a bootstrap interval over evaluation rows;
* **precision** -- the share of flagged items that match some behaviour (their best AUROC over all
  behaviours >= ``match``, 0.8); undefined (NaN) when the method flags nothing;
* **false positives** -- the items the same method flags when fitted on a base-vs-*null*-fine-tune
  pair, where nothing was planted (measured by the caller, passed in);
* **seed agreement** -- ``seed_agreement``: how many of one seed's flagged items another seed finds
  again, by their held-out scores (method-agnostic: no decoder geometry needed);
* **cost** -- training seconds and peak memory, from ``Method.cost``.

A method whose flagging has a free cut (``Method.cut_field``: ADL's ``min_relative_norm``, the
diff-SAE's ``min_explained``) gets it from a *validation* set (``tune_cut``), never from the
held-out labels the scoreboard reports; so does the sign of each item's score where the fit leaves it
free (``Method.free_sign``: ADL's mean differences; ``tune_signs``). ``causal_items`` names the items
the causal check removes per behaviour (``scoreboard_run.causal_checks``).

    scores = eval_scores(fitted, acts_NTSD, mask_NT)              # flagged items' scores per token
    res = score_method("dfc", fitted, scores, tasks, mask_NT, null=null_fit)
    rows = rank([res.row for res in results])                      # the ranked table
    recommendation(rows)                                           # one paragraph, from the numbers

AUROC is ``ground_truth.auroc`` (Mann-Whitney with average ranks for ties, equal to sklearn's).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from crosscoder.analysis.ground_truth import auroc
from crosscoder.config import ConfigError


# ---------------------------------------------------------------------------- inputs
class Flags(NamedTuple):
    """What the scoreboard needs of a fitted method when no ``Method`` object is at hand (a stored
    result, a test): the flagged items and, if known, the fit's cost. A ``Method`` works as is."""

    flagged_J: Tensor
    """Indices of the items the method flags."""
    cost: Any = None
    """``methods.Cost`` (or anything with ``train_seconds`` and ``peak_memory_bytes``), or None."""


class ItemScores(NamedTuple):
    """Scores of some of a method's items on the evaluation rows, with the item each column holds."""

    scores_NTJ: Tensor
    """[N rows, T tokens, J columns]; 0 on padding."""
    items_J: Tensor
    """The item index of each column (for ``eval_scores``' default: the flagged items, in order)."""


@torch.no_grad()
def eval_scores(fitted, acts_NTSD: Tensor, mask_NT: Tensor, items_J: Tensor | Sequence[int] | None = None
                ) -> ItemScores:
    """Scores of ``items_J`` (default: the method's flagged items) on the evaluation set's paired
    activations [N rows, T, 2 (base, chat), D]; tokens outside ``mask_NT`` (padding) are not scored
    and hold 0. Only the flagged items are needed for the scoreboard, so the default keeps a
    4k-item dictionary's [N, T, J] small; the columns' items travel with the scores, so
    ``score_method`` cannot read them as items 0..J-1."""
    if acts_NTSD.ndim != 4 or tuple(mask_NT.shape) != tuple(acts_NTSD.shape[:2]):
        raise ConfigError(f"eval_scores needs activations [rows, tokens, 2, D] and a mask [rows, tokens] of the "
                          f"same rows and tokens, got {tuple(acts_NTSD.shape)} and {tuple(mask_NT.shape)}")
    items = torch.as_tensor(fitted.flagged_J if items_J is None else items_J, dtype=torch.long).reshape(-1)
    mask = mask_NT.bool()
    s = fitted.scores(acts_NTSD[mask])[:, items]
    out = torch.zeros(*mask.shape, len(items), dtype=s.dtype)
    out[mask] = s
    return ItemScores(out, items)


def _unpack(scores, items_J):
    """(scores_NTJ, items_J) from a tensor (with ``items_J`` or None) or an ``ItemScores``."""
    if isinstance(scores, ItemScores):
        if items_J is not None:
            raise ConfigError("pass items_J only with a plain scores tensor: ItemScores carries its own")
        return scores.scores_NTJ, scores.items_J
    return scores, items_J


def _check_inputs(scores_NTJ: Tensor, tasks: Mapping[str, Any], mask_NT: Tensor | None) -> Tensor:
    """One clear error per bad input; returns the padding mask (all True when None)."""
    if not isinstance(scores_NTJ, Tensor) or scores_NTJ.ndim != 3:
        shape = tuple(scores_NTJ.shape) if isinstance(scores_NTJ, Tensor) else type(scores_NTJ).__name__
        raise ConfigError(f"scores_NTJ must be [rows, tokens, items], got {shape}; reshape a method's [tokens, "
                          f"items] scores to the evaluation set's rows (eval_scores does)")
    N, T, _ = scores_NTJ.shape
    mask = torch.ones(N, T, dtype=torch.bool) if mask_NT is None else mask_NT.bool()
    if tuple(mask.shape) != (N, T):
        raise ConfigError(f"mask_NT has shape {tuple(mask.shape)} but scores_NTJ covers {N} rows x {T} tokens; "
                          f"pass the evaluation set's attention mask")
    if not tasks:
        raise ConfigError("no behaviour tasks; pass {name: ProbeTask} (e.g. probes.decision_tasks(eval_set))")
    for name, t in tasks.items():
        if tuple(t.label_NT.shape) != (N, T) or tuple(t.eligible_NT.shape) != (N, T):
            raise ConfigError(f"task {name!r} has label {tuple(t.label_NT.shape)} / eligible "
                              f"{tuple(t.eligible_NT.shape)} masks, not the scores' {N} rows x {T} tokens; build "
                              f"the tasks and the scores from the same evaluation set")
        elig = t.eligible_NT.bool() & mask
        y = t.label_NT.bool()[elig]
        if int(y.sum()) == 0 or int((~y).sum()) == 0:
            raise ConfigError(f"task {name!r} has {int(y.sum())} positive and {int((~y).sum())} negative eligible "
                              f"(non-pad) positions; AUROC needs both: drop the task or use an evaluation set in "
                              f"which the behaviour occurs (and a label inside its eligible mask)")
    if scores_NTJ.numel() and bool(torch.isnan(scores_NTJ[mask]).any()):
        raise ConfigError("scores_NTJ holds NaN on unmasked tokens; score every evaluation token (or mask it)")
    return mask


def _columns(flagged_J: Tensor, items_J: Tensor | None, n_cols: int) -> Tensor:
    """Column of ``scores_NTJ`` holding each flagged item."""
    items = torch.arange(n_cols) if items_J is None else torch.as_tensor(items_J, dtype=torch.long)
    if len(items) != n_cols:
        raise ConfigError(f"items_J names {len(items)} items but scores_NTJ has {n_cols} columns; pass one item "
                          f"index per column")
    col = {int(j): c for c, j in enumerate(items)}
    missing = [int(j) for j in flagged_J if int(j) not in col]
    if missing:
        raise ConfigError(f"flagged items {missing[:5]} have no column in scores_NTJ; score every flagged item "
                          f"(eval_scores(fitted, ...) scores exactly the flagged ones) and pass items_J if the "
                          f"columns are not items 0..J-1")
    return torch.tensor([col[int(j)] for j in flagged_J], dtype=torch.long)


# ---------------------------------------------------------------------------- AUROC of the flagged items
def flagged_auroc(scores_NTJ: "Tensor | ItemScores", flagged_J: Tensor, tasks: Mapping[str, Any],
                  mask_NT: Tensor | None = None, *, items_J: Tensor | None = None) -> Tensor:
    """AUROC [J_flagged, K] of every flagged item for every task, over the task's eligible non-pad
    positions (in ``flagged_J`` order; [0, K] when nothing is flagged). ``scores_NTJ``: a tensor
    whose column c holds item ``items_J[c]`` (default c), or ``eval_scores``' ``ItemScores``."""
    scores_NTJ, items_J = _unpack(scores_NTJ, items_J)
    mask = _check_inputs(scores_NTJ, tasks, mask_NT)
    flagged_J = torch.as_tensor(flagged_J, dtype=torch.long).reshape(-1)
    cols = _columns(flagged_J, items_J, scores_NTJ.shape[2])
    auc = torch.zeros(len(cols), len(tasks))
    if len(cols):
        s = scores_NTJ[..., cols]
        for k, t in enumerate(tasks.values()):
            elig = t.eligible_NT.bool() & mask
            auc[:, k] = auroc(s[elig], t.label_NT.bool()[elig])
    return auc


def bootstrap_rows(n_rows: int, n_boot: int, seed: int) -> Tensor:
    """Row indices [n_boot, n_rows] of ``n_boot`` seeded resamples with replacement (the draws every
    bootstrap of this module uses, so a naive recomputation can repeat them)."""
    return torch.randint(n_rows, (n_boot, n_rows), generator=torch.Generator().manual_seed(seed))


def _boot_auroc(s_M: Tensor, y_M: Tensor, row_M: Tensor, counts_BR: Tensor, chunk: int) -> Tensor:
    """AUROC [B] of one item on resampled rows: a token of row r counts ``counts_BR[b, r]`` times.

    Exact weighted Mann-Whitney: sort the tokens once; per resample, sum over positives of their
    weight x (the weight of negatives strictly below + half the weight of those tied), over
    (positive weight x negative weight). Equals the AUROC of the resampled, duplicated tokens; the
    sort and the tie groups do not depend on the weights, so only cumulative sums run per resample."""
    s_sorted, order = torch.sort(s_M.double())
    new = torch.ones(len(s_sorted), dtype=torch.bool)
    new[1:] = s_sorted[1:] != s_sorted[:-1]
    gid = new.long().cumsum(0) - 1  # tie group of each token, ascending
    # Tokens of one tie group, row and label are interchangeable: keep one entry each with its
    # multiplicity (a sparse latent's zeros collapse to <= 2 entries per row).
    R, y_s, r_s = counts_BR.shape[1], y_M[order].long(), row_M[order]
    key, mult = torch.unique((gid * R + r_s) * 2 + y_s, return_counts=True)  # sorted, so groups stay ascending
    pos, rows, gid = (key % 2).bool(), (key // 2) % R, key // (2 * R)
    # per positive entry: the negative entries strictly below it and those tied with it (by tie group)
    neg_gid = gid[~pos]
    lo = torch.searchsorted(neg_gid, gid[pos], right=False)
    hi = torch.searchsorted(neg_gid, gid[pos], right=True)
    rows_p, m_p = rows[pos], mult[pos].double()
    rows_n, m_n = rows[~pos], mult[~pos].double()
    out = []
    for b in range(0, counts_BR.shape[0], chunk):
        c = counts_BR[b:b + chunk].double()
        wneg = c[:, rows_n] * m_n  # [b, M_neg]
        cum = torch.nn.functional.pad(wneg.cumsum(1), (1, 0))  # negative weight before each entry
        below = cum[:, lo]
        tied = cum[:, hi] - below
        wpos = c[:, rows_p] * m_p  # [b, M_pos]
        num = (wpos * (below + 0.5 * tied)).sum(1)
        den = wpos.sum(1) * cum[:, -1]
        out.append(torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, math.nan)))
    return torch.cat(out)


def bootstrap_best(scores_NTJ: "Tensor | ItemScores", flagged_J: Tensor, tasks: Mapping[str, Any],
                   mask_NT: Tensor | None = None, *, items_J: Tensor | None = None, n_boot: int = 500,
                   seed: int = 0, top: int | None = 16, auc_JK: Tensor | None = None) -> Tensor:
    """The best flagged AUROC of each task in each of ``n_boot`` resamples of the evaluation rows,
    [n_boot, K] (NaN in a resample without a positive or a negative; all NaN with no flagged item).

    Rows, not tokens, are resampled: tokens of one conversation are correlated. All tasks share the
    same resamples. ``top``: per task, only the flagged items with the ``top`` highest AUROCs on the
    full data enter the maximum (a lower bound on the exact maximum, which an item far below the
    best almost never exceeds; it makes the bootstrap cost independent of how many items a method
    flags); None = every flagged item. A maximum over items is biased upward under resampling
    (whichever item is luckiest wins each resample): where several flagged items are near-equal and
    weak, the interval may sit above the full-data estimate; with one clear detector it does not.
    ``auc_JK``: ``flagged_auroc``'s result, when computed.
    ``scores_NTJ``, ``items_J``: as ``flagged_auroc``."""
    scores_NTJ, items_J = _unpack(scores_NTJ, items_J)
    mask = _check_inputs(scores_NTJ, tasks, mask_NT)
    flagged_J = torch.as_tensor(flagged_J, dtype=torch.long).reshape(-1)
    cols = _columns(flagged_J, items_J, scores_NTJ.shape[2])
    out = torch.full((n_boot, len(tasks)), math.nan)
    if not len(cols) or n_boot == 0:
        return out
    if auc_JK is None:
        auc_JK = flagged_auroc(scores_NTJ, flagged_J, tasks, mask, items_J=items_J)
    N, T = mask.shape
    counts_BR = torch.zeros(n_boot, N).scatter_add_(1, bootstrap_rows(N, n_boot, seed), torch.ones(n_boot, N))
    row_NT = torch.arange(N)[:, None].expand(N, T)
    for k, t in enumerate(tasks.values()):
        elig = t.eligible_NT.bool() & mask
        y, rows = t.label_NT.bool()[elig], row_NT[elig]
        cand = cols if top is None else cols[auc_JK[:, k].argsort(descending=True, stable=True)[:top]]
        chunk = max(1, 4_000_000 // max(1, len(y)))
        per = torch.stack([_boot_auroc(scores_NTJ[..., c][elig], y, rows, counts_BR, chunk) for c in cand.tolist()])
        out[:, k] = per.nan_to_num(-math.inf).max(0).values.float()
        out[per.isnan().all(0), k] = math.nan
    return out


# ---------------------------------------------------------------------------- seed agreement
class SeedAgreement(NamedTuple):
    """How many of seed A's flagged items seed B finds again."""

    agreement: float
    """Share of A's flagged items whose best match among B's flagged items has Pearson correlation >=
    the threshold (NaN when A flags nothing)."""
    best_corr_J: Tensor
    """Per flagged item of A, its highest correlation with a flagged item of B (NaN: B flags nothing,
    or one of the two is constant on the held-out tokens)."""
    best_match_J: Tensor
    """Per flagged item of A, the column of B's scores it matches best (-1 when none)."""


def seed_agreement(scores_a_MJ: Tensor, scores_b_MK: Tensor, threshold: float = 0.9) -> SeedAgreement:
    """Method-agnostic seed agreement: the fraction of seed A's flagged items that have a flagged item
    of seed B whose held-out score vector correlates >= ``threshold`` (Pearson over tokens).

    ``scores_a_MJ`` / ``scores_b_MK``: the held-out scores [tokens, items] of each fit's flagged items
    on the *same* tokens (e.g. ``eval_scores(...)[mask_NT]`` of each seed). Matching by what an item
    does on data, not by decoder geometry, applies to every method alike (ADL directions, SAE
    latents, crosscoder latents). Not symmetric: A's items found in B; call it both ways and report
    both (or their mean) when the seeds flag different numbers of items. A constant item (dead on
    these tokens) has no correlation and matches nothing."""
    if scores_a_MJ.ndim != 2 or scores_b_MK.ndim != 2 or scores_a_MJ.shape[0] != scores_b_MK.shape[0]:
        raise ConfigError(f"seed_agreement needs [tokens, items] scores of both fits on the same tokens, got "
                          f"{tuple(scores_a_MJ.shape)} and {tuple(scores_b_MK.shape)}; flatten [N, T, J] scores "
                          f"with scores_NTJ[mask_NT]")
    J, K = scores_a_MJ.shape[1], scores_b_MK.shape[1]
    if J == 0:
        return SeedAgreement(math.nan, torch.zeros(0), torch.zeros(0, dtype=torch.long))
    if K == 0:
        return SeedAgreement(0.0, torch.full((J,), math.nan), torch.full((J,), -1, dtype=torch.long))

    def standardise(x: Tensor) -> Tensor:
        x = x.double() - x.double().mean(0)
        norm = x.norm(dim=0)
        return torch.where(norm > 0, x / norm.clamp(min=1e-300), torch.full_like(x, math.nan))

    corr_JK = standardise(scores_a_MJ).T @ standardise(scores_b_MK)
    best, idx = corr_JK.nan_to_num(-math.inf).max(1)
    none = torch.isinf(best)
    best = torch.where(none, torch.full_like(best, math.nan), best).float()
    idx = torch.where(none, torch.full_like(idx, -1), idx)
    return SeedAgreement(float((best >= threshold).float().mean()), best, idx)


# ---------------------------------------------------------------------------- one method's result
class BehaviourScore(NamedTuple):
    """One method x one behaviour."""

    method: str
    behaviour: str
    best_auroc: float
    """Best AUROC among the flagged items on the task's eligible positions (NaN: nothing flagged)."""
    best_item: int
    """The item that reaches it (-1: nothing flagged)."""
    recovered: bool
    """best_auroc >= threshold."""
    ci_low: float
    """Lower end of the bootstrap percentile interval of best_auroc (resampled rows)."""
    ci_high: float
    """Upper end."""
    recovered_share: float
    """Share of bootstrap resamples in which best_auroc >= threshold."""
    positives: int
    """Positive eligible (non-pad) positions."""
    eligible: int
    """Eligible (non-pad) positions."""


class ScoreRow(NamedTuple):
    """One method's line of the scoreboard."""

    method: str
    behaviours_recovered: int
    """Behaviours whose best flagged AUROC >= threshold."""
    n_behaviours: int
    recovered: tuple[str, ...]
    """Their names."""
    recovered_ci: int
    """Behaviours recovered with the whole bootstrap interval >= threshold."""
    precision: float
    """Flagged items matching some behaviour (best AUROC over behaviours >= match) / flagged; NaN when
    nothing is flagged (precision is undefined then, not 0 or 1)."""
    n_matched: int
    """Flagged items matching some behaviour."""
    n_flagged: int
    null_false_positives: int | None
    """Items the method flags on the base-vs-null-fine-tune pair; None when not measured."""
    seed_agreement: float
    """``seed_agreement(...).agreement`` when given, else NaN."""
    train_seconds: float
    """From the fit's cost (NaN when unknown)."""
    peak_memory_bytes: int | None
    """From the fit's cost (None on the CPU or when unknown)."""
    threshold: float
    """AUROC for a behaviour to count as recovered."""
    match: float
    """AUROC for a flagged item to count as matching a behaviour."""


class MethodScore(NamedTuple):
    row: ScoreRow
    behaviours: list[BehaviourScore]
    """One per task, in the tasks' order."""
    auroc_JK: Tensor
    """AUROC of every flagged item [J_flagged, K] (rows in ``flagged_J`` order)."""
    boot_BK: Tensor
    """Best flagged AUROC per bootstrap resample [n_boot, K]."""


def score_method(name: str, fitted, scores_NTJ: "Tensor | ItemScores", tasks: Mapping[str, Any],
                 mask_NT: Tensor | None = None, *, items_J: Tensor | None = None, null=None,
                 seed_agreement: float | SeedAgreement | None = None, threshold: float = 0.9, match: float = 0.8,
                 n_boot: int = 500, ci: float = 0.95, seed: int = 0, top: int | None = 16) -> MethodScore:
    """One method's scoreboard row and per-behaviour results.

    ``fitted``: a fitted ``Method`` (or ``Flags``): its ``flagged_J`` and ``cost``. ``scores_NTJ``:
    the items' scores on the evaluation rows: ``eval_scores``' ``ItemScores``, or a tensor whose
    column c holds item ``items_J[c]`` (default c); every flagged item needs a column. ``tasks``:
    {behaviour: ProbeTask} on the same rows and tokens; ``mask_NT``: the padding mask (intersected
    with every task's eligible mask). ``null``: the same method fitted on the null pair (its
    ``flagged_J`` is counted), or that count. ``seed_agreement``: ``seed_agreement(...)`` of this
    fit against another seed's (or its ``agreement``). ``n_boot`` row resamples give a ``ci``
    percentile interval (``bootstrap_best``, ``top``).
    """
    if not 0 < ci < 1:
        raise ConfigError(f"ci must lie in (0, 1), got {ci}")
    scores_NTJ, items_J = _unpack(scores_NTJ, items_J)
    flagged_J = torch.as_tensor(fitted.flagged_J, dtype=torch.long).reshape(-1)
    mask = _check_inputs(scores_NTJ, tasks, mask_NT)
    auc = flagged_auroc(scores_NTJ, flagged_J, tasks, mask, items_J=items_J)
    boot = bootstrap_best(scores_NTJ, flagged_J, tasks, mask, items_J=items_J, n_boot=n_boot, seed=seed, top=top,
                          auc_JK=auc)
    q = torch.tensor([(1 - ci) / 2, 1 - (1 - ci) / 2], dtype=torch.float64)
    behaviours = []
    for k, (bname, t) in enumerate(tasks.items()):
        elig = t.eligible_NT.bool() & mask
        col, ok = boot[:, k].double(), ~boot[:, k].isnan()
        lo, hi = (torch.quantile(col[ok], q).tolist() if bool(ok.any()) else (math.nan, math.nan))
        has = len(flagged_J) > 0
        best = float(auc[:, k].max()) if has else math.nan
        behaviours.append(BehaviourScore(
            name, bname, best, int(flagged_J[auc[:, k].argmax()]) if has else -1, has and best >= threshold,
            float(lo), float(hi), float((col[ok] >= threshold).double().mean()) if bool(ok.any()) else math.nan,
            int(t.label_NT.bool()[elig].sum()), int(elig.sum())))
    matched = int((auc.max(1).values >= match).sum()) if len(flagged_J) else 0
    if null is None or isinstance(null, numbers.Integral):
        n_null = None if null is None else int(null)
    elif hasattr(null, "flagged_J"):
        n_null = int(len(torch.as_tensor(null.flagged_J).reshape(-1)))
    else:
        raise ConfigError(f"null must be the method fitted on the null pair (with flagged_J), its flagged count, or "
                          f"None (not measured); got {type(null).__name__}")
    agree = seed_agreement.agreement if isinstance(seed_agreement, SeedAgreement) else seed_agreement
    cost = getattr(fitted, "cost", None)
    rec = tuple(b.behaviour for b in behaviours if b.recovered)
    row = ScoreRow(
        method=name, behaviours_recovered=len(rec), n_behaviours=len(tasks), recovered=rec,
        recovered_ci=sum(b.recovered and b.ci_low >= threshold for b in behaviours),
        precision=matched / len(flagged_J) if len(flagged_J) else math.nan, n_matched=matched,
        n_flagged=len(flagged_J), null_false_positives=n_null,
        seed_agreement=math.nan if agree is None else float(agree),
        train_seconds=float(cost.train_seconds) if cost is not None else math.nan,
        peak_memory_bytes=None if cost is None or cost.peak_memory_bytes is None else int(cost.peak_memory_bytes),
        threshold=threshold, match=match)
    return MethodScore(row, behaviours, auc, boot)


# ---------------------------------------------------------------------------- the flagging cut, on validation data
class CutChoice(NamedTuple):
    """A method's flagging cut chosen on a validation set (``tune_cut``)."""

    method: str
    field: str
    """The config field of the cut (``Method.cut_field``)."""
    value: float
    """The cut chosen (the fitted one when ``tuned`` is False)."""
    fitted_value: float
    """The cut the method was fitted with (its config's)."""
    tuned: bool
    """False when no candidate cut recovers a behaviour or matches one item on the validation set (or
    there is no candidate): the fitted cut is kept, since the validation data say nothing."""
    n_flagged: int
    """Items flagged at the chosen cut."""
    recovered: int
    """Behaviours recovered on the validation set at the chosen cut (best flagged AUROC >= threshold)."""
    precision: float
    """Precision on the validation set at the chosen cut (NaN when it flags nothing)."""
    n_candidates: int
    """Distinct cuts compared."""


def choose_cut(stat_C: Tensor, auc_CK: Tensor, *, threshold: float = 0.9, match: float = 0.8
               ) -> tuple[int, int, float] | None:
    """The rule ``tune_cut`` applies, on candidates sorted by decreasing statistic ``stat_C`` with their
    validation AUROC per behaviour ``auc_CK``: a cut at candidate c's statistic flags candidates 0..c (and
    any tied with c), so the cuts are the prefixes ending where the statistic drops. Chosen: the prefix
    that recovers the most behaviours (best AUROC >= ``threshold``), then at the highest precision (share
    of its items whose best AUROC >= ``match``), then the smallest (the highest cut) -- the scoreboard's
    own ranking, on validation data. Returns (prefix length, behaviours recovered, precision), or None
    when no prefix recovers or matches anything (or there is no candidate)."""
    C = len(stat_C)
    if C == 0:
        return None
    auc = auc_CK.double().nan_to_num(0.0)
    ends = [c + 1 for c in range(C) if c == C - 1 or bool(stat_C[c] != stat_C[c + 1])]
    best_so_far_CK = auc.cummax(0).values
    matched_C = (auc.max(1).values >= match).long().cumsum(0) if auc.shape[1] else torch.zeros(C, dtype=torch.long)
    best = None
    for n in ends:
        rec, prec = int((best_so_far_CK[n - 1] >= threshold).sum()), float(matched_C[n - 1]) / n
        if best is None or (rec, prec) > best[1:]:
            best = (n, rec, prec)
    if best[1] == 0 and best[2] == 0:
        return None
    return best


def tune_cut(fitted, acts_NTSD: Tensor, mask_NT: Tensor, tasks: Mapping[str, Any], *, threshold: float = 0.9,
             match: float = 0.8, max_items: int = 64):
    """Choose the flagging cut of a method with a ``cut_field`` on a labelled *validation* set
    (activations [N, T, 2, D], padding mask, {behaviour: ProbeTask}): returns (the method flagged at
    that cut, ``CutChoice``).

    Candidates: the items that pass the method's other flagging rules with a non-negative statistic
    (cuts are non-negative), the ``max_items`` with the highest statistic; the rule is ``choose_cut``.
    When the validation set gives no signal, the fitted cut is kept (``CutChoice.tuned`` False). Pass
    the validation set here and only the held-out set to ``score_method``: the held-out labels must
    choose nothing."""
    stat_J, gate_J = fitted.cut_statistic()
    stat_J = stat_J.float()
    ok = gate_J.bool() & torch.isfinite(stat_J) & (stat_J >= 0)
    idx = torch.nonzero(ok).squeeze(1)
    idx = idx[stat_J[idx].argsort(descending=True, stable=True)][:max_items]
    fitted_value = float(getattr(fitted.cfg, fitted.cut_field))
    auc = torch.zeros(0, len(tasks))
    if len(idx):
        scores = eval_scores(fitted, acts_NTSD, mask_NT, items_J=idx)
        auc = flagged_auroc(scores, idx, tasks, mask_NT)
    got = choose_cut(stat_J[idx], auc, threshold=threshold, match=match)
    if got is not None:
        tuned = fitted.with_cut(float(stat_J[idx[got[0] - 1]]))
        _, rec, prec = got
    else:  # no signal: the fitted cut, described on the same validation set
        tuned = fitted.with_cut(fitted_value)
        n = len(tuned.flagged_J)
        auc_f = flagged_auroc(eval_scores(tuned, acts_NTSD, mask_NT), tuned.flagged_J, tasks, mask_NT)
        rec = int((auc_f.max(0).values >= threshold).sum()) if n else 0
        prec = float((auc_f.max(1).values >= match).double().mean()) if n else math.nan
    value = float(getattr(tuned.cfg, fitted.cut_field))
    return tuned, CutChoice(fitted.name, fitted.cut_field, value, fitted_value, got is not None, len(tuned.flagged_J),
                            rec, prec, len(idx))


# ---------------------------------------------------------------------------- the sign of each item, on validation data
class SignChoice(NamedTuple):
    """The signs of a ``free_sign`` method's item scores, chosen on a validation set (``tune_signs``)."""

    method: str
    signs: tuple[int, ...]
    """+1 (as fitted) or -1 per item."""
    best_auroc_fitted: tuple[float, ...]
    """Per item, its best validation AUROC over the behaviours with the fitted sign."""
    best_auroc_flipped: tuple[float, ...]
    """The same with the score negated (1 - each AUROC: Mann-Whitney with average ranks for ties)."""


def choose_signs(auc_JK: Tensor) -> Tensor:
    """The rule ``tune_signs`` applies to the items' validation AUROCs with their fitted sign [J, K]: an
    item is flipped (-1) when its best AUROC over the behaviours with the score negated (1 - AUROC) is
    strictly higher than with the fitted one; ties and undefined AUROCs (NaN) keep +1. The scoreboard's
    own criterion (an item counts by its best AUROC), per item."""
    auc = auc_JK.double().nan_to_num(0.5)
    if auc.shape[1] == 0:
        return torch.ones(auc.shape[0])
    fitted, flipped = auc.max(1).values, (1 - auc).max(1).values
    return torch.where(flipped > fitted, -1.0, 1.0).float()


def tune_signs(fitted, acts_NTSD: Tensor, mask_NT: Tensor, tasks: Mapping[str, Any]):
    """Choose the sign of every item's score of a ``free_sign`` method on a labelled *validation* set
    (activations [N, T, 2, D], padding mask, {behaviour: ProbeTask}): returns (the method with those
    signs, ``SignChoice``). Every item is oriented (not only the flagged ones), so a cut tuned after it
    compares oriented items. Pass the validation set here and only the held-out set to
    ``score_method``: the held-out labels must choose nothing."""
    if not getattr(fitted, "free_sign", False):
        raise ConfigError(f"method {fitted.name!r} has no free sign (free_sign is False)")
    fitted = fitted.with_signs(torch.ones(fitted.n_items))  # AUROCs of the fitted orientation
    items = torch.arange(fitted.n_items)
    auc = flagged_auroc(eval_scores(fitted, acts_NTSD, mask_NT, items_J=items), items, tasks, mask_NT).double()
    signs = choose_signs(auc)
    clean = auc.nan_to_num(0.5)
    best = clean.max(1).values if auc.shape[1] else torch.full((len(items),), math.nan, dtype=torch.float64)
    flip = (1 - clean).max(1).values if auc.shape[1] else best
    return fitted.with_signs(signs), SignChoice(fitted.name, tuple(int(s) for s in signs.tolist()),
                                                tuple(best.tolist()), tuple(flip.tolist()))


# ---------------------------------------------------------------------------- the items the causal check removes
class CausalItems(NamedTuple):
    """The items of one method that the causal check removes for one behaviour."""

    items_J: Tensor
    """The flagged items whose held-out AUROC for the behaviour is >= threshold (recovering items), or
    the one best flagged item when none is."""
    recovered: bool
    """True: recovering items; False: the best flagged item of a behaviour the method does not recover."""


def causal_items(result: MethodScore, flagged_J: Tensor, *, threshold: float = 0.9) -> dict[str, CausalItems]:
    """{behaviour: ``CausalItems``} of one scored method (``score_method``'s result and the flagged items it
    was scored with, in the same order as ``result.auroc_JK``'s rows); empty when nothing is flagged."""
    flagged_J = torch.as_tensor(flagged_J, dtype=torch.long).reshape(-1)
    if result.auroc_JK.shape[0] != len(flagged_J):
        raise ConfigError(f"the result scores {result.auroc_JK.shape[0]} flagged items, not {len(flagged_J)}; pass "
                          f"the flagged items it was scored with")
    out = {}
    if not len(flagged_J):
        return out
    for k, b in enumerate(result.behaviours):
        auc = result.auroc_JK[:, k]
        hit = auc >= threshold
        out[b.behaviour] = (CausalItems(flagged_J[hit], True) if bool(hit.any()) else
                            CausalItems(flagged_J[auc.nan_to_num(-1.0).argmax()].reshape(1), False))
    return out


# ---------------------------------------------------------------------------- the table and its sentence
def _key(r: ScoreRow) -> tuple:
    """Most behaviours recovered, then highest precision (undefined last), then fewest null false
    positives (unmeasured last)."""
    prec = -1.0 if math.isnan(r.precision) else r.precision
    fp = math.inf if r.null_false_positives is None else r.null_false_positives
    return (-r.behaviours_recovered, -prec, fp)


def rank(rows: Sequence[ScoreRow]) -> list[ScoreRow]:
    """The scoreboard: rows sorted by behaviours recovered (most first), then precision (highest
    first; undefined last), then false positives on the null pair (fewest first; unmeasured last);
    equal rows keep their given order."""
    return sorted(rows, key=_key)


def _fmt(x: float) -> str:
    return "undefined" if math.isnan(x) else f"{x:.2f}"


def _describe(r: ScoreRow) -> str:
    # only rows that recover something are described, so they flag something: precision is defined
    prec = (f"precision {_fmt(r.precision)} ({r.n_matched} of {r.n_flagged} flagged items match a behaviour at "
            f"AUROC ≥ {r.match:g})")
    fp = ("false positives on the null pair not measured" if r.null_false_positives is None else
          f"{r.null_false_positives} item{'s' if r.null_false_positives != 1 else ''} flagged on the null pair")
    return f"{prec}, {fp}"


def recommendation(rows: Sequence[ScoreRow]) -> str:
    """A plain recommendation that follows the numbers of ``rows`` (any order; ranked as ``rank``).

    Names the method that recovers the most behaviours at the best precision with the fewest null
    false positives, with those numbers; says when methods tie on all three, when no method
    recovers every behaviour (or any), and which other method beats the leader on precision or
    false positives at the cost of behaviours."""
    if not rows:
        raise ConfigError("recommendation needs at least one ScoreRow (score_method(...).row)")
    ranked = rank(rows)
    best = ranked[0]
    n = best.n_behaviours
    if any(r.n_behaviours != n for r in ranked):
        raise ConfigError("rows score different numbers of behaviours; score every method on the same tasks")
    thr = best.threshold
    if best.behaviours_recovered == 0:
        return (f"No method recovers any of the {n} planted behaviours (no flagged item reaches AUROC ≥ {thr:g}); "
                f"the scoreboard recommends none.")
    tied = [r for r in ranked if _key(r) == _key(best)]
    names = [r.method for r in tied]
    what = (f"all {n} behaviours" if best.behaviours_recovered == n else
            f"{best.behaviours_recovered} of {n} behaviours ({', '.join(best.recovered)})")
    if len(tied) > 1:
        who = ", ".join(names[:-1]) + f" and {names[-1]}"
        out = [f"{who} tie: each recovers {what} (best flagged AUROC ≥ {thr:g})."]
        out += [f"{r.method}: {_describe(r)}." for r in tied]
    else:
        out = [f"{best.method} recovers {what} (best flagged AUROC ≥ {thr:g}) with {_describe(best)}."]
    if best.behaviours_recovered < n:
        out.append(f"No method recovers all {n} behaviours.")
    # the trade-offs the ranking hides: a lower-ranked method that is better on precision or false positives
    for r in ranked[len(tied):]:
        better = []
        if not math.isnan(r.precision) and (math.isnan(best.precision) or r.precision > best.precision):
            better.append(f"higher precision ({_fmt(r.precision)})")
        if r.null_false_positives is not None and (best.null_false_positives is None
                                                   or r.null_false_positives < best.null_false_positives):
            better.append(f"fewer null false positives ({r.null_false_positives})")
        if better:
            out.append(f"{r.method} has {' and '.join(better)} but recovers {r.behaviours_recovered} of {n}.")
    return " ".join(out)


def table(rows: Sequence[ScoreRow]) -> list[dict[str, Any]]:
    """The ranked rows as dicts (for a DataFrame or metrics.json), recovered names joined by ", "."""
    return [{**r._asdict(), "recovered": ", ".join(r.recovered)} for r in rank(rows)]
