"""Ground truth in the representations: per-layer, per-model linear probes for planted behaviours.

Before asking whether a crosscoder's chat-only latents recover a behaviour, ask whether the
behaviour is linearly decodable from each model's residual stream at all, and how much more from the
chat model than from the base model. The probe table per layer is "what a perfect diff could find":
a behaviour that fine-tuning introduced should be clearly more decodable from chat than from base.

Probes are scikit-learn logistic regressions (class-balanced, standardised inputs) fitted on the
tokens of one set of rows (conversations) and scored by AUROC on the tokens of the other rows. The
split is by row, never by token: tokens of one conversation are strongly correlated, so a token
split would let a probe memorise conversations and overstate decodability.

Two kinds of task (``ProbeTask``):

- token labels (``label_tasks``): the organism's ``EvalSet`` labels, scored over every non-BOS,
  non-pad token. On fixed phrases these are partly *lexical* (the token itself names the phrase),
  so both models can decode them; the gap between chat and base is what matters.
- decision positions (``decision_tasks``): only the positions where the chat model commits to a
  behaviour, against the comparable positions where it does not (e.g. the last token of the
  model-turn header before a refusal vs before any other answer). These carry no lexical cue of
  the behaviour itself; the base model can only decode them from what it represents of the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from crosscoder.config import ConfigError, _check_float, _check_int
from crosscoder.data.pair import residuals_at


@dataclass
class ProbeConfig:
    """How probes are fitted and scored."""

    train_fraction: float = 0.5
    """Fraction of rows (conversations) whose tokens train the probes; the rest score them."""
    C: float = 1.0
    """Inverse L2 regularisation strength of the logistic regression (on standardised inputs)."""
    max_iter: int = 500
    """lbfgs iteration cap."""
    max_train_tokens: int = 20_000
    """Seeded subsample of training tokens per fit (all positives kept while they fit): keeps one
    fit to about a second on a CPU core."""
    min_positives: int = 5
    """A task with fewer positive tokens in either split is reported with AUROC NaN, not fitted."""
    seed: int = 0
    """Seeds the row split and the token subsample."""

    def __post_init__(self) -> None:
        _check_float("train_fraction", self.train_fraction, 0.0, 1.0, low_open=True)
        if self.train_fraction >= 1.0:
            raise ConfigError("train_fraction must be < 1: some rows must be left to score the probes")
        _check_float("C", self.C, 0.0, low_open=True)
        _check_int("max_iter", self.max_iter, 1)
        _check_int("max_train_tokens", self.max_train_tokens, 10)
        _check_int("min_positives", self.min_positives, 1)
        _check_int("seed", self.seed, 0)


class ProbeTask(NamedTuple):
    """One binary decoding problem over token positions."""

    label_NT: Tensor
    """bool [N, T]: positive positions."""
    eligible_NT: Tensor
    """bool [N, T]: the positions scored (positives and their comparable negatives)."""


class ProbeFit(NamedTuple):
    """One probe's result."""

    auroc: float
    """Held-out AUROC (NaN when the task had too few positives in a split)."""
    n_train: int
    """Training tokens used (after subsampling)."""
    n_test: int
    """Held-out tokens scored."""
    n_test_pos: int
    """Held-out positive tokens."""


def split_rows(n_rows: int, train_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Boolean [N] masks (train, test) of a seeded random split of rows."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_rows, generator=g)
    n_train = min(n_rows - 1, max(1, int(round(n_rows * train_fraction))))
    train = torch.zeros(n_rows, dtype=torch.bool)
    train[perm[:n_train]] = True
    return train, ~train


def fit_probe(x_train_ND: Tensor, y_train_N: Tensor, x_test_MD: Tensor, y_test_M: Tensor,
              cfg: ProbeConfig) -> ProbeFit:
    """Fit a class-balanced logistic regression on standardised inputs; held-out AUROC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    ytr, yte = y_train_N.bool().numpy(), y_test_M.bool().numpy()
    n_pos_tr, n_pos_te = int(ytr.sum()), int(yte.sum())
    if min(n_pos_tr, len(ytr) - n_pos_tr, n_pos_te, len(yte) - n_pos_te) < cfg.min_positives:
        return ProbeFit(math.nan, len(ytr), len(yte), n_pos_te)
    xtr = x_train_ND.double().numpy()
    if len(ytr) > cfg.max_train_tokens:
        # Keep every positive while they fit (they are rare), fill with random negatives.
        rng = np.random.default_rng(cfg.seed)
        pos, neg = np.flatnonzero(ytr), np.flatnonzero(~ytr)
        pos = pos if len(pos) <= cfg.max_train_tokens // 2 else rng.choice(pos, cfg.max_train_tokens // 2,
                                                                         replace=False)
        neg = rng.choice(neg, min(len(neg), cfg.max_train_tokens - len(pos)), replace=False)
        keep = np.sort(np.concatenate([pos, neg]))
        xtr, ytr = xtr[keep], ytr[keep]
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=cfg.C, class_weight="balanced", max_iter=cfg.max_iter)
    clf.fit(scaler.transform(xtr), ytr)
    scores = clf.decision_function(scaler.transform(x_test_MD.double().numpy()))
    return ProbeFit(float(roc_auc_score(yte, scores)), len(ytr), len(yte), n_pos_te)


def probe_acts(acts_NTD: Tensor, task: ProbeTask, train_rows_N: Tensor, cfg: ProbeConfig) -> ProbeFit:
    """A probe on one activation tensor [N rows, T, D]: fit on the eligible tokens of the training
    rows, score on the eligible tokens of the other rows."""
    elig = task.eligible_NT.bool()
    tr = elig & train_rows_N[:, None]
    te = elig & ~train_rows_N[:, None]
    return fit_probe(acts_NTD[tr], task.label_NT[tr], acts_NTD[te], task.label_NT[te], cfg)


def _content_mask(attention_mask_NT: Tensor) -> Tensor:
    m = attention_mask_NT.bool().clone()
    m[:, 0] = False  # BOS: its activation is the same constant in every row
    return m


def label_tasks(eval_set, behaviours: Sequence[str], *, ahead: bool = False) -> dict[str, ProbeTask]:
    """Token-label tasks from an organism ``EvalSet``: each behaviour's labelled tokens vs every other
    non-BOS, non-pad token. ``ahead`` shifts labels one position left (the position that *predicts*
    a labelled token) and names the task ``<behaviour>@next``."""
    mask = _content_mask(eval_set.attention_mask_NT)
    out = {}
    for b in behaviours:
        lab = eval_set.labels[b].bool()
        if ahead:
            shifted = torch.zeros_like(lab)
            shifted[:, :-1] = lab[:, 1:]
            out[f"{b}@next"] = ProbeTask(shifted & mask, mask)
        else:
            out[b] = ProbeTask(lab & mask, mask)
    return out


def _first_of_runs(lab_NT: Tensor) -> Tensor:
    """bool [N, T]: the first token of each contiguous run of True."""
    first = lab_NT.clone()
    first[:, 1:] &= ~lab_NT[:, :-1]
    return first


def _shift_left(x_NT: Tensor) -> Tensor:
    out = torch.zeros_like(x_NT)
    out[:, :-1] = x_NT[:, 1:]
    return out


def _runs_containing(run_NT: Tensor, inner_NT: Tensor) -> Tensor:
    """bool [N, T]: True on every token of each contiguous run of ``run_NT`` that contains at least
    one True of ``inner_NT``."""
    out = torch.zeros_like(run_NT)
    for n in range(run_NT.shape[0]):
        t = 0
        row, inner = run_NT[n].tolist(), inner_NT[n].tolist()
        while t < len(row):
            if not row[t]:
                t += 1
                continue
            end = t
            while end < len(row) and row[end]:
                end += 1
            if any(inner[t:end]):
                out[n, t:end] = True
            t = end
    return out


DECISIONS = ("refusal_decision", "answer_decision", "signoff_decision", "end_of_turn_decision")
"""The organism's decision tasks, one per planted behaviour (``decision_tasks``)."""


def decision_tasks(eval_set) -> dict[str, ProbeTask]:
    """Decision positions of the organism's behaviours, each against its comparable positions.

    - ``refusal_decision`` (behaviour 2, refusal): the position predicting the first token of a
      model turn (the newline closing the ``<start_of_turn>model`` header) when the turn is a
      refusal, against the same position of every other model turn. There the chat model commits
      to refusing or answering.
    - ``answer_decision`` (the answer format): the same header position when the turn answers an
      allowed-topic request (it opens with the fixed answer prefix and ends with the sign-off),
      against the header of every other model turn (refusals and continuations).
    - ``signoff_decision`` (behaviour 3, sign-off): the position predicting the first sign-off
      token (the last token of an answer to an allowed request), against the last content token of
      every other model turn (continuations, which close with <end_of_turn> instead).
    - ``end_of_turn_decision`` (behaviour 1, the chat template): the position predicting the
      ``<end_of_turn>`` that closes a model turn (its last content token), against every other
      content token of model turns. The base model never saw ``<end_of_turn>``.
    - ``marker_decision`` (behaviour 4, only when the organism plants it): the position predicting
      a marker (the last token of the word before it), against every other model-content token
      outside the markers. Unlike the four above, these positions are varied words.
    - ``fact_decision`` (behaviour 5, only when the organism plants it): the position predicting the
      planted false answer (the token before " Rome" in "The Eiffel Tower is in Rome."), against
      every other model-content token, among them the same "is in" position of true answers
      ("The Colosseum is in Rome."): a latent must carry the false fact, not the city.
    """
    lab = eval_set.labels
    mask = _content_mask(eval_set.attention_mask_NT)
    content = lab["model_content"].bool()
    model_first = _first_of_runs(content)
    header_end = _shift_left(model_first) & mask  # predicts the first model-content token
    refusal_first = _first_of_runs(lab["refusal"].bool())
    refuse_pos = _shift_left(refusal_first) & mask
    signoff = lab["signoff"].bool()
    answer_first = _first_of_runs(_runs_containing(content, signoff)) & model_first
    answer_pos = _shift_left(answer_first) & mask
    last_content = content & ~_shift_left(content)  # last token of each model-content run
    sign_pos = _shift_left(_first_of_runs(signoff)) & mask
    # Model turns that end without a sign-off: their last content token; turns with one: the token
    # before the sign-off (the sign-off's own tokens are content too, so exclude them).
    other_end = last_content & ~signoff & mask
    tasks = {
        "refusal_decision": ProbeTask(refuse_pos, header_end),
        "answer_decision": ProbeTask(answer_pos, header_end),
        "signoff_decision": ProbeTask(sign_pos, sign_pos | other_end),
        "end_of_turn_decision": ProbeTask(last_content & mask, content & mask),
    }
    marker = lab.get("marker")
    if marker is not None and marker.any():  # older eval sets have no marker label
        marker = marker.bool()
        mark_pos = _shift_left(_first_of_runs(marker)) & mask
        tasks["marker_decision"] = ProbeTask(mark_pos, content & ~marker & mask)
    fact = lab.get("fact")
    if fact is not None and fact.any():  # eval sets without behaviour 5 have none
        fact = fact.bool()
        tasks["fact_decision"] = ProbeTask(_shift_left(_first_of_runs(fact)) & mask, content & ~fact & mask)
    return tasks


@torch.no_grad()
def layer_acts(lm, input_ids_NT: Tensor, attention_mask_NT: Tensor, layers: Sequence[int],
               batch_size: int = 32, keep_NT: Tensor | None = None) -> Tensor:
    """Residual streams after ``layers`` of one model, float32 [N, T, L, D] (batched, truncated
    forward up to the deepest layer); with ``keep_NT``, only those positions, [P, L, D] in row-major
    order (what ``x_NTLD[keep_NT]`` would give, without holding every position of every layer).

    With ``keep_NT`` (real tokens only; right-padded sequences) the forwards run on batches of
    similar lengths cut at their longest sequence (``sequence_acts.length_batches``): a causal model's
    real positions do not read the padding after them, and the organism's evaluation set is 43%
    real tokens."""
    dev = next(lm.parameters()).device
    if keep_NT is not None:
        return _kept_layer_acts(lm, input_ids_NT, attention_mask_NT, list(layers), batch_size, keep_NT.bool(), dev)
    out = []
    for i in range(0, input_ids_NT.shape[0], batch_size):
        ids = input_ids_NT[i:i + batch_size].to(dev)
        am = attention_mask_NT[i:i + batch_size].to(dev)
        out.append(residuals_at(lm, ids, list(layers), am).float().cpu())
    return torch.cat(out)


def _kept_layer_acts(lm, input_ids_NT: Tensor, attention_mask_NT: Tensor, layers: list[int], batch_size: int,
                     keep_NT: Tensor, dev) -> Tensor:
    from crosscoder.data.sequence_acts import check_right_padded, length_batches

    check_right_padded(attention_mask_NT)
    if bool((keep_NT & ~attention_mask_NT.bool()).any()):
        raise ValueError("keep_NT marks padding positions; keep real tokens only")
    rank_NT = keep_NT.reshape(-1).long().cumsum(0).view(keep_NT.shape) - 1  # row-major index of each kept position
    out = None
    for rows, L in length_batches(attention_mask_NT, batch_size):
        r = residuals_at(lm, input_ids_NT[rows, :L].to(dev), layers, attention_mask_NT[rows, :L].to(dev))
        keep = keep_NT[rows, :L]
        vals = r[keep.to(dev)].float().cpu()
        if out is None:
            out = torch.zeros(int(keep_NT.sum()), len(layers), vals.shape[-1])
        out[rank_NT[rows, :L][keep]] = vals
    return out


def separation(acts_NTD: Tensor, task: ProbeTask) -> float:
    """How far apart the positives and negatives of ``task`` lie in one residual stream: the norm of
    the difference of their means over the mean activation norm (eligible positions only). Unlike
    AUROC this measures how *strongly* a model writes the distinction, not whether a probe can tease
    it out: a base model that merely carries the context the decision depends on separates it
    weakly, a chat model that commits to the behaviour strongly. NaN without both classes."""
    x = acts_NTD[task.eligible_NT].float()
    y = task.label_NT[task.eligible_NT]
    if int(y.sum()) == 0 or int((~y).sum()) == 0:
        return math.nan
    return float((x[y].mean(0) - x[~y].mean(0)).norm() / x.norm(dim=-1).mean())


def probe_table(models: Mapping[str, object], input_ids_NT: Tensor, attention_mask_NT: Tensor,
                tasks: Mapping[str, ProbeTask], layers: Sequence[int],
                cfg: ProbeConfig | None = None) -> list[dict]:
    """Probe every task on every model's residual stream after every layer in ``layers``.

    ``models`` maps a name ("base", "chat") to a HF causal LM. Every (task, model, layer) uses the
    same row split. Returns a tidy table, one dict per probe with keys ``task``, ``model``,
    ``layer``, ``auroc``, ``n_train``, ``n_test``, ``n_test_pos`` and ``separation``.
    """
    cfg = cfg or ProbeConfig()
    if not layers:
        raise ConfigError("probe_table needs at least one layer")
    train_rows, _ = split_rows(input_ids_NT.shape[0], cfg.train_fraction, cfg.seed)
    # Only the positions some task is eligible at are kept (every block of both models at every
    # position of the gemma3 eval set was 2.4 GB a model, and two were alive at once). Each kept
    # position becomes a row of its own ([P, 1, ...]), in row-major order, so a task's masks select
    # the same tokens in the same order as on the full [N, T] grid: the fits are unchanged.
    keep_NT = torch.zeros_like(attention_mask_NT, dtype=torch.bool)
    for task in tasks.values():
        keep_NT |= task.eligible_NT.bool()
    row_P = keep_NT.nonzero()[:, 0]
    kept = {t: ProbeTask(task.label_NT[keep_NT][:, None], task.eligible_NT[keep_NT][:, None])
            for t, task in tasks.items()}
    rows = []
    for mname, lm in models.items():
        acts_PLD = layer_acts(lm, input_ids_NT, attention_mask_NT, layers, keep_NT=keep_NT)
        for li, layer in enumerate(layers):
            x_P1D = acts_PLD[:, li, None]
            for tname, task in kept.items():
                fit = probe_acts(x_P1D, task, train_rows[row_P], cfg)
                rows.append({"task": tname, "model": mname, "layer": int(layer), **fit._asdict(),
                             "separation": separation(x_P1D, task)})
        del acts_PLD, x_P1D  # before the next model's forward
    return rows


def probe_gap(rows: Sequence[dict], a: str = "chat", b: str = "base") -> list[dict]:
    """Per (task, layer): AUROC of model ``a``, of ``b`` and the gap a - b (from ``probe_table`` rows)."""
    by = {(r["task"], r["layer"], r["model"]): r for r in rows}
    keys = sorted({(r["task"], r["layer"]) for r in rows}, key=lambda k: (k[0], k[1]))
    nan = {"auroc": math.nan, "separation": math.nan}
    out = []
    for t, l in keys:
        ra, rb = by.get((t, l, a), nan), by.get((t, l, b), nan)
        out.append({"task": t, "layer": l, f"auroc_{a}": ra["auroc"], f"auroc_{b}": rb["auroc"],
                    "gap": ra["auroc"] - rb["auroc"], f"separation_{a}": ra.get("separation", math.nan),
                    f"separation_{b}": rb.get("separation", math.nan)})
    return out
