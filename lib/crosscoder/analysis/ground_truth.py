"""Ground truth: AUROC of latents against the organism's planted-behaviour token labels."""

from __future__ import annotations

import torch
from torch import Tensor

def _average_ranks(s_NJ: Tensor) -> Tensor:
    """1-based ranks of each column with ties given their average rank (float64 [N, J])."""
    order = s_NJ.argsort(dim=0)
    sorted_s = s_NJ.gather(0, order)
    n = s_NJ.shape[0]
    pos = torch.arange(1, n + 1, dtype=torch.float64)[:, None].expand_as(s_NJ)
    new_run = torch.ones_like(sorted_s, dtype=torch.bool)
    new_run[1:] = sorted_s[1:] != sorted_s[:-1]
    run_id = new_run.long().cumsum(0) - 1  # [n, J]
    first = torch.zeros_like(pos).scatter_reduce(0, run_id, pos, "amin", include_self=False)
    last = torch.zeros_like(pos).scatter_reduce(0, run_id, pos, "amax", include_self=False)
    avg = ((first + last) / 2).gather(0, run_id)
    return torch.empty_like(avg).scatter_(0, order, avg)


def auroc(scores_NJ: Tensor, labels: Tensor, *, chunk: int = 256, sparse: bool | None = None) -> Tensor:
    """AUROC of each column of ``scores_NJ`` for boolean labels (Mann-Whitney U with average ranks
    for ties, so it equals sklearn's roc_auc_score).

    ``labels`` is [N] (returns [J]) or [N, B] for B label sets scored against the same ranks
    (returns [J, B]); latents are ranked in chunks so memory stays O(N * chunk). Non-negative scores
    that are mostly zero -- latent activations -- take ``_rank_sums_sparse``, which ranks only the
    nonzero entries; any other input is ranked densely. ``sparse`` forces one path (True needs
    non-negative scores); None chooses.
    """
    lab = labels.bool()
    single = lab.ndim == 1
    lab_NB = lab[:, None] if single else lab
    P = lab_NB.sum(0).double()  # [B]
    Nn = lab_NB.shape[0] - P
    if (P == 0).any() or (Nn == 0).any():
        raise ValueError("AUROC needs both positive and negative labels")
    s = scores_NJ.double()
    if s.ndim == 1:
        s = s[:, None]
    if sparse is None:
        sparse = s.numel() > 0 and bool((s >= 0).all()) and float((s > 0).double().mean()) < 0.5
    elif sparse and bool((s < 0).any()):
        raise ValueError("auroc(sparse=True) needs non-negative scores (the zeros must rank lowest)")
    out = []
    for j in range(0, s.shape[1], chunk):
        if sparse:
            rank_pos = _rank_sums_sparse(s[:, j : j + chunk], lab_NB)
        else:
            ranks = _average_ranks(s[:, j : j + chunk])  # [N, c]
            rank_pos = ranks.T @ lab_NB.double()  # [c, B]: sum of positive ranks per label set
        out.append((rank_pos - P * (P + 1) / 2) / (P * Nn))
    res = torch.cat(out).float()
    return res[:, 0] if single else res


def _rank_sums_sparse(s_NC: Tensor, lab_NB: Tensor) -> Tensor:
    """Sum of the positives' average ranks [C, B], for non-negative scores: the z_c zeros of column c
    share rank (z_c + 1) / 2, and a nonzero entry's rank is z_c plus its average rank among the
    column's nonzeros -- so only the nonzeros are sorted. Equals ``_average_ranks(s).T @ lab``."""
    N, C = s_NC.shape
    lab = lab_NB.double()
    row, col = torch.nonzero(s_NC, as_tuple=True)
    val = s_NC[row, col]
    order = torch.argsort(val, stable=True)
    order = order[torch.argsort(col[order], stable=True)]  # by column, then by value
    row, col, val = row[order], col[order], val[order]
    nnz_C = torch.bincount(col, minlength=C)
    zeros_C = (N - nnz_C).double()
    start_C = torch.cumsum(nnz_C, 0) - nnz_C
    pos = torch.arange(1, len(val) + 1, dtype=torch.float64) - start_C[col].double()  # 1-based rank in column
    new_run = torch.ones_like(val, dtype=torch.bool)
    new_run[1:] = (val[1:] != val[:-1]) | (col[1:] != col[:-1])
    run_id = new_run.long().cumsum(0) - 1
    n_runs = int(run_id[-1]) + 1 if len(run_id) else 0
    first = torch.zeros(n_runs, dtype=torch.float64).scatter_reduce(0, run_id, pos, "amin", include_self=False)
    last = torch.zeros(n_runs, dtype=torch.float64).scatter_reduce(0, run_id, pos, "amax", include_self=False)
    rank = zeros_C[col] + ((first + last) / 2)[run_id]  # global average rank of each nonzero entry
    lab_nz = lab[row]  # [nnz, B]
    nz_rank_pos = torch.zeros(C, lab.shape[1], dtype=torch.float64).index_add_(0, col, rank[:, None] * lab_nz)
    nz_pos = torch.zeros(C, lab.shape[1], dtype=torch.float64).index_add_(0, col, lab_nz)
    zero_pos = lab.sum(0)[None, :] - nz_pos  # positives among the zeros
    return nz_rank_pos + zero_pos * ((zeros_C + 1) / 2)[:, None]


def ground_truth_table(f_NTJ: torch.Tensor, eval_set, latents: torch.Tensor, behaviours: list[str],
                       threshold: float = 0.9) -> tuple[list[dict], dict[str, float], torch.Tensor]:
    """AUROC of each candidate latent against each planted behaviour's token labels, over the
    non-BOS, non-pad tokens of the organism's evaluation set.

    A latent may represent a behaviour on the labelled token itself or one position earlier (where
    the model predicts it), so both alignments are scored and the better one is kept per
    (latent, behaviour). Returns one row per behaviour, the summary fractions, and AUROC [J, B].
    """
    mask = eval_set.attention_mask_NT.bool().clone()
    mask[:, 0] = False
    same = torch.stack([eval_set.labels[b] for b in behaviours], -1)  # [N, T, B]
    ahead = torch.zeros_like(same)
    ahead[:, :-1] = same[:, 1:]
    J = len(latents)
    if J == 0:
        auc = torch.zeros(0, len(behaviours))
    else:
        f = f_NTJ[mask]
        B = len(behaviours)
        both = auroc(f, torch.cat([same[mask], ahead[mask]], 1))  # one ranking for both alignments
        auc = torch.maximum(both[:, :B], both[:, B:])
    rows = []
    for b, name in enumerate(behaviours):
        best = float(auc[:, b].max()) if J else float("nan")
        rows.append({"behaviour": name, "best_auroc": best,
                     "best_latent": int(torch.as_tensor(latents)[auc[:, b].argmax()]) if J else -1,
                     "recovered": bool(J and best >= threshold), "label_tokens": int(same[..., b][mask].sum())})
    summary = {"n_candidates": J,
               "recovered_frac": sum(r["recovered"] for r in rows) / len(rows),
               "matched_latent_frac": float((auc >= threshold).any(1).float().mean()) if J else 0.0}
    return rows, summary, auc


def decision_table(f_NTJ: torch.Tensor, tasks: dict, latents: torch.Tensor, threshold: float = 0.9
                   ) -> tuple[list[dict], torch.Tensor]:
    """AUROC of each candidate latent for each decision task (``probes.decision_tasks``), scored only
    over the task's comparable positions: a latent recovers the refusal decision when, among the
    headers of all model turns, it fires more on those that open a refusal. A latent that fires on
    every header alike scores 0.5, not the near-1 a comparison against all tokens would give.

    Returns one row per task (best AUROC, its latent, whether >= ``threshold``) and AUROC [J, K]."""
    J = len(latents)
    auc = torch.full((J, len(tasks)), float("nan"))
    rows = []
    for k, (name, task) in enumerate(tasks.items()):
        y = task.label_NT[task.eligible_NT]
        if J and 0 < int(y.sum()) < len(y):
            auc[:, k] = auroc(f_NTJ[task.eligible_NT], y)
        col = auc[:, k]
        ok = J > 0 and not bool(col.isnan().all())
        best = float(col.nan_to_num(-1).max()) if ok else float("nan")
        rows.append({"behaviour": name, "best_auroc": best,
                     "best_latent": int(torch.as_tensor(latents)[col.nan_to_num(-1).argmax()]) if ok else -1,
                     "recovered": bool(ok and best >= threshold), "label_tokens": int(task.label_NT.sum())})
    return rows, auc


def planted_precision(f_NTJ: torch.Tensor, planted_NT: torch.Tensor, mask_NT: torch.Tensor, *,
                      top_n: int = 20, min_share: float = 0.5) -> tuple[torch.Tensor, float]:
    """How many latents fire where something was planted.

    For each latent, the share of its ``top_n`` highest activations (over ``mask_NT`` tokens, only
    tokens where it fires) that fall on ``planted_NT`` tokens; a latent counts as *on a planted
    behaviour* when that share is at least ``min_share``. Returns (share per latent [J], fraction of
    latents on a planted behaviour; NaN with no latents)."""
    J = f_NTJ.shape[-1]
    if J == 0:
        return torch.zeros(0), float("nan")
    f = f_NTJ[mask_NT]  # [M, J]
    planted = planted_NT[mask_NT]
    n = min(top_n, f.shape[0])
    vals, idx = f.topk(n, dim=0)  # [n, J]
    fired = vals > 0
    hits = (planted[idx] & fired).sum(0).float()
    share = hits / fired.sum(0).clamp(min=1).float()
    return share, float((share >= min_share).float().mean())
