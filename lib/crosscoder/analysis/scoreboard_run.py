"""The scoreboard page's stage: every model-diffing method on one organism, the free flagging cuts
chosen on validation data, each method scored against the held-out ground truth (``analysis.scoreboard``),
with the null pair and more seeds when the profile asks for them.

    board = scoreboard_stage(p, exp)      # the notebook's one call (p: the "scoreboard" stage's parameters)
    board.recommendation, board.rows      # the sentence and the ranked ScoreRows
    ranked_table(board), causal_table(board), behaviour_table(board), cut_table(board), sign_table(board), grid(board)

What is trained and what is reused. The L1 and BatchTopK crosscoders are the training pages' runs
(``methods.from_crosscoder``: flagged here, not retrained), and their null-pair and seed copies are the
controls page's (``experiment.null_replicas`` / ``seed_replicas``: loaded when that page trained them).
The designated-shared crosscoder, DFC and diff-SAE are fitted here with the crosscoders' optimisation and
dictionary sizes (``method_configs``), all three for ``fit_steps`` steps at the crosscoders' batch size
(by default the crosscoders' own steps): one token budget for all five trained methods. ADL averages the plain-text tokens of the training split.

Which data choose what. The cuts that the methods leave free (``Method.cut_field``) are set by
``scoreboard.tune_cut`` on ``organism.build.validation_eval_set`` (training chapters and phrasings,
design-only topics), and so are the signs of the items whose orientation the fit leaves free
(``scoreboard.tune_signs``: ADL), before the cut; the held-out evaluation set only reports. The null
pair's fits get the same cut and signs.

The causal check (``causal_checks``). Per method and planted decision with a generation test, the
method's own intervention (``Method.intervention``: each method removes its items from the chat
model's residual stream at the diffed layer, as it reads them) on the items ``scoreboard.causal_items``
names (its recovering items, or its best flagged item, marked), and the method's control
(``Method.control``: as many random live items of its dictionary; random directions for ADL): the
behaviour's rate in greedy generations of held-out prompts before, after and under the control, with
``analysis.causal``'s generation and behaviour tests.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from crosscoder import methods
from crosscoder.analysis.scoreboard import (CutChoice, MethodScore, ScoreRow, SignChoice, causal_items, eval_scores,
                                            rank, recommendation, score_method, seed_agreement, table, tune_cut,
                                            tune_signs)
from crosscoder.config import ConfigError, RunConfig
from crosscoder.methods import Method, MethodConfig, MethodData

SIX = ("crosscoder_l1", "crosscoder_batchtopk", "designated_shared", "dfc", "diff_sae", "adl")
"""The six methods, in the order the issue lists them."""
REUSED = {"l1": "crosscoder_l1", "batchtopk": "crosscoder_batchtopk"}
"""Method of a training page's crosscoder, by its objective."""
CHAT_MARKER = "<start_of_turn>"
"""The token that opens every chat sequence after BOS (Gemma's template): ADL's means skip those sequences."""


# ---------------------------------------------------------------------------- inputs
class EvalRows(NamedTuple):
    """A labelled set's paired activations, the tokens scored and the behaviours' tasks."""

    acts_NTSD: Tensor
    """Activations [rows, tokens, 2 (base, chat), D], float32."""
    mask_NT: Tensor
    """bool [rows, tokens]: real tokens other than BOS (the tokens every item is scored on)."""
    tasks: dict[str, Any]
    """{behaviour: ProbeTask}: ``probes.decision_tasks`` of the set."""


@torch.no_grad()
def eval_rows(pair, eval_set, *, batch: int = 16) -> EvalRows:
    """``EvalRows`` of an organism's ``EvalSet`` (held-out or validation): both models' activations at
    the pair's layer, extracted ``batch`` rows at a time."""
    from crosscoder.analysis.probes import decision_tasks
    from crosscoder.data.sequence_acts import sequence_acts

    ids, am = eval_set.input_ids_NT, eval_set.attention_mask_NT
    acts = sequence_acts(pair, ids, am, batch=batch)  # read from the pair's cache when a page ran it
    mask = am.bool().clone()
    mask[:, 0] = False
    return EvalRows(acts, mask, decision_tasks(eval_set))


def method_configs(runs: Mapping[str, RunConfig], *, fit_steps: int, nu_threshold: float = 0.3,
                   min_active_tokens: int = 5) -> dict[str, MethodConfig]:
    """The configs of the methods fitted on the scoreboard, from the training pages' runs (``runs``: run
    name -> ``RunConfig``; one L1 and one BatchTopK run): the designated-shared crosscoder takes the L1
    run's dictionary size and optimisation (its lambda too; Anthropic's variant is L1), DFC and the
    diff-SAE the BatchTopK run's k and optimisation (the diff-SAE's dictionary: 4 x d_model); each
    trains ``fit_steps`` steps at its run's batch size (0: its run's own steps, the crosscoders' token
    budget), one evaluation at the end. ADL: its defaults."""
    by = {r.model.sparsity: r for r in runs.values()}
    missing = [s for s in ("l1", "batchtopk") if s not in by]
    if missing:
        raise ConfigError(f"method_configs needs an L1 and a BatchTopK training run, got objectives "
                          f"{sorted(by)}; add the missing run to the scoreboard's crosscoders")

    def budget(run: RunConfig):
        n = fit_steps or run.train.n_steps
        return dataclasses.replace(run.train, n_steps=n, eval_every=n, checkpoint_every=max(1, n // 4),
                                   log_every=min(run.train.log_every, n))

    l1, btk = by["l1"], by["batchtopk"]
    flag = {"nu_threshold": nu_threshold, "min_active_tokens": min_active_tokens}
    return {
        "designated_shared": methods.get("designated_shared").Config(
            n_latents=l1.model.n_latents, train=budget(l1), sparsity="l1", centre_inputs=l1.model.centre_inputs, **flag),
        "dfc": methods.get("dfc").Config(n_latents=btk.model.n_latents, k=btk.model.k, train=budget(btk),
                                         min_active_tokens=min_active_tokens, centre_inputs=btk.model.centre_inputs),
        "diff_sae": methods.get("diff_sae").Config(k=btk.model.k, train=budget(btk), **flag),
        "adl": methods.get("adl").Config(),
    }


def fit_methods(names: Sequence[str], data: MethodData, out_dir: str | Path, crosscoders: Mapping[str, str | Path],
                cfgs: Mapping[str, MethodConfig], *, nu_threshold: float = 0.3, min_active_tokens: int = 5,
                progress: bool = False) -> dict[str, Method]:
    """The fitted methods ``names`` on ``data``: a crosscoder method wraps the trained crosscoder of its
    objective in ``crosscoders`` ({artifact folder of a training run, any name: folder}) with the given
    flagging options; any other is fitted with ``cfgs[name]`` into ``out_dir/<name>`` (or loaded from
    there when finished)."""
    wrapped = {}
    for folder in crosscoders.values():
        m = methods.from_crosscoder(folder, data, nu_threshold=nu_threshold, min_active_tokens=min_active_tokens)
        wrapped[m.name] = m
    out = {}
    for name in names:
        if name in REUSED.values():
            if name not in wrapped:
                raise ConfigError(f"method {name!r} comes from a training page's crosscoder, and none of "
                                  f"{sorted(map(str, crosscoders.values()))} is one; add its run to crosscoders")
            out[name] = wrapped[name]
        else:
            out[name] = methods.fit(name, data, Path(out_dir) / name, cfgs[name], progress=progress)
    return out


# ---------------------------------------------------------------------------- the board
class Board(NamedTuple):
    """The scoreboard of one organism."""

    results: dict[str, MethodScore]
    """Each method's ``score_method`` result, in the order fitted."""
    rows: list[ScoreRow]
    """The ranked rows (``scoreboard.rank``)."""
    cuts: dict[str, CutChoice]
    """The cut chosen on validation data, for each method that has one."""
    fits: dict[str, Method]
    """The methods as scored (with their tuned cuts)."""
    null_measured: bool
    """Whether the methods were fitted on the null pair."""
    n_seeds: int
    """Fits per method compared for seed agreement (1: not measured)."""
    recommendation: str
    """``scoreboard.recommendation`` of the rows."""
    signs: dict[str, SignChoice] = {}
    """The item signs chosen on validation data, for each method whose signs are free."""
    causal: list[dict[str, Any]] | None = None
    """``causal_checks``' rows; None when the check was not run."""


def mean_seed_agreement(fit: Method, others: Sequence[Method], rows: EvalRows) -> float:
    """``seed_agreement`` of ``fit`` with each other seed's fit, both ways, averaged (NaN when no term
    is defined), on the scored tokens of ``rows``."""
    a = eval_scores(fit, rows.acts_NTSD, rows.mask_NT).scores_NTJ[rows.mask_NT]
    vals = []
    for other in others:
        b = eval_scores(other, rows.acts_NTSD, rows.mask_NT).scores_NTJ[rows.mask_NT]
        vals += [seed_agreement(a, b).agreement, seed_agreement(b, a).agreement]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def score_board(fits: Mapping[str, Method], heldout: EvalRows, validation: EvalRows, *,
                null_fits: Mapping[str, Method] | None = None, seed_fits: Mapping[str, Sequence[Method]] | None = None,
                n_boot: int = 500, seed: int = 0, threshold: float = 0.9, match: float = 0.8) -> Board:
    """Score every fitted method: its free item signs and then its free cut tuned on ``validation``
    (``tune_signs``, ``tune_cut``; applied to its null and seed fits too), then ``score_method`` on
    ``heldout`` with the null pair's flagged count and the seeds' agreement when given. ``validation`` and ``heldout`` must be different sets: only the first
    chooses anything."""
    if validation is heldout:
        raise ConfigError("score_board needs a validation set apart from the held-out set: the held-out labels "
                          "must choose nothing (organism.build.validation_eval_set makes one)")
    results, cuts, scored, signs = {}, {}, {}, {}
    for name, fit in fits.items():
        null = None if null_fits is None else null_fits.get(name)
        others = list((seed_fits or {}).get(name, ()))
        if getattr(fit, "free_sign", False):  # before the cut: the cut compares oriented items
            fit, signs[name] = tune_signs(fit, validation.acts_NTSD, validation.mask_NT, validation.tasks)
            sign_J = torch.tensor(signs[name].signs, dtype=torch.float32)
            null = None if null is None else null.with_signs(sign_J)
            others = [o.with_signs(sign_J) for o in others]
        if fit.cut_field is not None:
            fit, cuts[name] = tune_cut(fit, validation.acts_NTSD, validation.mask_NT, validation.tasks,
                                       threshold=threshold, match=match)
            null = None if null is None else null.with_cut(cuts[name].value)
            others = [o.with_cut(cuts[name].value) for o in others]
        agree = mean_seed_agreement(fit, others, heldout) if others else None
        scores = eval_scores(fit, heldout.acts_NTSD, heldout.mask_NT)
        results[name] = score_method(name, fit, scores, heldout.tasks, heldout.mask_NT, null=null,
                                     seed_agreement=agree, threshold=threshold, match=match, n_boot=n_boot, seed=seed)
        scored[name] = fit
    rows = rank([r.row for r in results.values()])
    n_seeds = 1 + max((len(v) for v in (seed_fits or {}).values()), default=0)
    return Board(results, rows, cuts, scored, null_fits is not None, n_seeds, recommendation(rows), signs)


# ---------------------------------------------------------------------------- the stage
def scoreboard_stage(p, exp, *, progress: bool = False) -> Board:
    """The scoreboard of the organism experiment ``exp`` with the "scoreboard" stage's parameters ``p``
    (``schema.STAGES["scoreboard"]``): fits (reusing the training pages' crosscoders and the controls'
    copies of them), validation and held-out activations, tuning and scoring; the board's metrics are
    written to ``<artifacts_dir>/scoreboard/metrics.json``."""
    from crosscoder import experiment, organism
    from crosscoder.checkpoint import read_config
    from crosscoder.organism.build import validation_eval_set

    if exp.organism is None:
        raise ConfigError("the scoreboard scores methods against an organism's planted behaviours; set "
                          "organism_preset (hub model pairs have no ground truth)")
    art, root = Path(p.artifacts_dir), Path(p.artifacts_dir) / "scoreboard"
    # The null organism is built (when missing) before this pair's models are loaded, and its activations
    # are read without its models: on gemma-3-270m each pair is 2.1 GB in float32, a fine-tune several.
    nexp = experiment.resolve(p.null_experiment(), progress=progress) if p.null_pair else None
    pair = experiment.model_pair(exp)
    marker = pair.tokenizer.convert_tokens_to_ids(CHAT_MARKER)
    data = MethodData.from_cache(experiment.activation_cache(exp, pair=pair, progress=progress), chat_marker_id=marker)
    heldout = eval_rows(pair, organism.load_eval_set(exp.organism.eval_set))
    validation = eval_rows(pair, validation_eval_set(organism.preset(exp.cfg.organism_preset), pair.tokenizer,
                                                     p.validation_rows))
    runs = {n: RunConfig.from_dict(read_config(art / n / "crosscoder")["extra"]["run"]) for n in p.crosscoders}
    cfgs = method_configs(runs, fit_steps=p.fit_steps, nu_threshold=p.nu_threshold,
                          min_active_tokens=p.min_active_tokens)
    opts = {"nu_threshold": p.nu_threshold, "min_active_tokens": p.min_active_tokens, "progress": progress}
    folders = {n: art / n / "crosscoder" for n in p.crosscoders}
    fits = fit_methods(p.methods, data, root / "fits", folders, cfgs, **opts)
    null_fits = None
    if nexp is not None:
        ndata = MethodData.from_cache(experiment.activation_cache(nexp, progress=progress, base_from=exp),
                                      chat_marker_id=marker)
        nsplits = experiment.splits_from(ndata.train_NSD, ndata.heldout_NSD, ndata.norm_NSD)
        experiment.null_replicas(art, p.crosscoders, nsplits, art / "null", progress=progress)  # the controls' folders
        null_fits = fit_methods(p.methods, ndata, root / "null", {n: art / "null" / n / "crosscoder"
                                                                  for n in p.crosscoders}, cfgs, **opts)
    seed_fits = seed_fits_of(p, data, cfgs, art, root, opts) if p.seeds else None
    board = score_board(fits, heldout, validation, null_fits=null_fits, seed_fits=seed_fits, n_boot=p.n_boot)
    if p.causal_prompts:
        from crosscoder.analysis.causal import organism_probes

        org_cfg = organism.preset(p.organism_preset)
        probes = organism_probes(pair.tokenizer, org_cfg.behaviour,
                                 organism.heldout_prompt_sets(org_cfg, p.causal_prompts))
        board = board._replace(causal=causal_checks(board, pair.base, pair.chat, pair.layer, probes, heldout,
                                                    max_new_tokens=p.causal_max_new_tokens,
                                                    unrecovered=p.causal_unrecovered))
    write_board_metrics(root, board, {"parameters": dict(p.values), "configs": {n: c.to_dict() for n, c in cfgs.items()}})
    return board


def seed_fits_of(p, data: MethodData, cfgs: Mapping[str, MethodConfig], art: Path, root: Path,
                 opts: Mapping[str, Any]) -> dict[str, list[Method]]:
    """Each method's fits at the initialisation seeds ``p.seeds``: the crosscoders' the controls page's
    replicas (``experiment.seed_replicas``: another initialisation on the run's own batch order), the
    fitted methods' refits with ``train.seed`` = s (another initialisation and batch order). ADL has no
    seed (its means are deterministic), so none."""
    from crosscoder import experiment

    splits = experiment.splits_from(data.train_NSD, data.heldout_NSD, data.norm_NSD)
    out: dict[str, list[Method]] = {}
    for s in p.seeds:
        for n in p.crosscoders:
            experiment.seed_replicas(art, n, [s], splits, progress=opts["progress"])
        seeded = {n: dataclasses.replace(c, train=dataclasses.replace(c.train, seed=s))
                  for n, c in cfgs.items() if hasattr(c, "train")}
        fits = fit_methods([n for n in p.methods if n in seeded or n in REUSED.values()], data, root / f"seed{s}",
                           {n: art / f"{n}-seed{s}" / "crosscoder" for n in p.crosscoders}, seeded, **opts)
        for n, f in fits.items():
            out.setdefault(n, []).append(f)
    return out


# ---------------------------------------------------------------------------- the causal check
@torch.no_grad()
def live_items(fit: Method, rows: EvalRows, *, chunk: int = 4096) -> Tensor:
    """The items of ``fit`` that score > 0 on at least one scored token of ``rows`` (the pool of the
    random-item control), counted ``chunk`` tokens at a time (a 4k-latent dictionary's [tokens, F]
    scores are never held whole)."""
    acts = rows.acts_NTSD[rows.mask_NT]
    count = torch.zeros(fit.n_items, dtype=torch.long)
    for i in range(0, acts.shape[0], chunk):
        count += (fit.scores(acts[i:i + chunk]) > 0).sum(0)
    return torch.nonzero(count).squeeze(1)


def causal_checks(board: Board, base_lm, chat_lm, layer: int, probes: Mapping[str, Any], heldout: EvalRows, *,
                  max_new_tokens: int, unrecovered: bool = False, threshold: float | None = None,
                  seed: int = 0) -> list[dict[str, Any]]:
    """The causal check of every scored method (in the ranked order): for each decision with a
    generation test (``probes``: {decision task: ``causal.Probe``}, e.g. ``causal.organism_probes``), the
    behaviour's rate in greedy generations of the chat model before, with the method's items for it
    removed (``Method.intervention`` of ``scoreboard.causal_items``) and under the method's control
    (``Method.control``, drawn from the items live on ``heldout``'s tokens, seeded per check).

    Checked: the decisions a method recovers; with ``unrecovered`` also the others, on their best flagged
    item (marked "best flagged, not recovered"). A method that flags nothing has no row; a method
    without an intervention gets one row that says why (``Method.no_intervention``). The rate before is
    measured once per decision. Rows: method, decision, behaviour, items, removed, control, prompts,
    before / after / control hits and rates (None where not measured)."""
    from crosscoder.analysis.causal import intervened

    thr = threshold if threshold is not None else (board.rows[0].threshold if board.rows else 0.9)
    before: dict[str, Any] = {}
    out = []
    for m, r in enumerate(board.rows):
        fit = board.fits[r.method]
        if not fit.intervenes:
            out.append({"method": r.method, "decision": None, "behaviour": None, "items": None, "removed": None,
                        "control": None, "note": f"no intervention: {fit.no_intervention}"})
            continue
        chosen = causal_items(board.results[r.method], fit.flagged_J, threshold=thr)
        live = None
        for k, (task, probe) in enumerate(probes.items()):
            pick = chosen.get(task)
            if pick is None or not (pick.recovered or unrecovered):
                continue
            if live is None:
                live = live_items(fit, heldout)
            if task not in before:
                before[task] = probe.rate(chat_lm, max_new_tokens)
            iv = fit.intervention(pick.items_J)
            with intervened(chat_lm, base_lm, layer, iv):
                after = probe.rate(chat_lm, max_new_tokens)
            ctrl = fit.control(pick.items_J, live, seed=seed + 1000 * m + k)
            cafter = None
            if ctrl is not None:
                with intervened(chat_lm, base_lm, layer, ctrl):
                    cafter = probe.rate(chat_lm, max_new_tokens)
            out.append({"method": r.method, "decision": task, "behaviour": probe.behaviour,
                        "items": len(pick.items_J), "item ids": pick.items_J.tolist(),
                        "chosen": "recovering" if pick.recovered else "best flagged, not recovered",
                        "removed": iv.what, "control": None if ctrl is None else ctrl.what,
                        "prompts": before[task].n, "before hits": before[task].hits, "before": before[task].rate,
                        "after hits": after.hits, "after": after.rate,
                        "control hits": None if cafter is None else cafter.hits,
                        "control after": None if cafter is None else cafter.rate,
                        "note": "" if ctrl is not None else "no other live item for a control"})
    return out


def causal_table(board: Board) -> list[dict[str, Any]]:
    """The causal check for the page: per method and decision checked, the items removed and the
    behaviour's rate (hits / prompts) before, after and under the control."""
    def rate(hits, n):
        return "" if hits is None else f"{hits / n:.2f} ({hits}/{n})"

    rows = []
    for c in board.causal or []:
        if c["decision"] is None:
            rows.append({"method": c["method"], "behaviour": "", "items removed": "", "before": "", "after": "",
                         "control": "", "after control": c["note"]})
            continue
        n = c["prompts"]
        mark = "" if c["chosen"] == "recovering" else " (best flagged, not recovered)"
        rows.append({"method": c["method"], "behaviour": c["behaviour"], "items removed": f"{c['items']}{mark}",
                     "before": rate(c["before hits"], n), "after": rate(c["after hits"], n),
                     "control": c["control"] or "", "after control": rate(c["control hits"], n) or c["note"]})
    return rows


def causal_note(board: Board) -> str:
    """What the page says about the causal check: not run, nothing to check, or which decisions it covers."""
    if board.causal is None:
        return "The causal check is off in this profile (causal_prompts = 0)."
    checked = [c for c in board.causal if c["decision"] is not None]
    if not checked:
        return ("No method recovers a decision that has a generation test, so there is nothing to remove "
                "(set causal_unrecovered to check each method's best flagged item anyway).")
    unrec = any(c["chosen"] != "recovering" for c in checked)
    return ("Checked, per method: each decision with a generation test (the end-of-turn decision has none) that "
            "the method recovers" + (", and the others on its best flagged item (marked)." if unrec else
                                     "; decisions it does not recover are not checked in this profile "
                                     "(causal_unrecovered)."))


# ---------------------------------------------------------------------------- what the page shows
def ranked_table(board: Board) -> list[dict[str, Any]]:
    """The ranked rows for the page: behaviours recovered (and with the whole bootstrap interval above the
    threshold), precision, null false positives (None: not measured), seed agreement (None: one seed),
    cost, and the cut."""
    out = []
    for r in board.rows:
        fit, cut = board.fits[r.method], board.cuts.get(r.method)
        cost = fit.cost
        out.append({
            "method": r.method, "recovered": f"{r.behaviours_recovered} of {r.n_behaviours}",
            "recovered, whole 95% CI ≥ threshold": r.recovered_ci, "behaviours recovered": ", ".join(r.recovered),
            "precision": r.precision, "matched / flagged": f"{r.n_matched} / {r.n_flagged}",
            "null false positives": r.null_false_positives,
            "seed agreement": None if math.isnan(r.seed_agreement) else r.seed_agreement,
            "train seconds": r.train_seconds, "train tokens": cost.train_tokens,
            "peak memory (MiB)": None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**20,
            "parameters (MiB)": cost.param_bytes / 2**20,
            "cut (validation)": "" if cut is None else f"{cut.field} = {cut.value:.4g}"})
    return out


def behaviour_table(board: Board) -> list[dict[str, Any]]:
    """Per method and behaviour: the best flagged AUROC with its bootstrap interval, whether it is
    recovered and in what share of the resamples, and the item that reaches it."""
    return [{"method": b.method, "behaviour": b.behaviour, "best AUROC": b.best_auroc, "95% CI low": b.ci_low,
             "95% CI high": b.ci_high, "recovered": b.recovered, "share of resamples recovered": b.recovered_share,
             "best item": b.best_item, "positives": b.positives, "eligible": b.eligible}
            for res in board.results.values() for b in res.behaviours]


def null_note(board: Board) -> str:
    """What the page says of the null pair and the seeds: the null pair's false positives when measured,
    else where to find them (profile full); likewise seed agreement."""
    if board.null_measured:
        fp = {r.method: r.null_false_positives for r in board.rows}
        clean = [m for m, n in fp.items() if n == 0]
        null = ("On the null pair (base vs a text-only fine-tune with the chat fine-tune's recipe, where nothing "
                "was planted) the methods flag " + ", ".join(f"{m} {n}" for m, n in fp.items()) + " items; "
                + (f"{_and(clean)} flag{'s' if len(clean) == 1 else ''} nothing there." if clean
                   else "every method flags something there."))
    else:
        null = ("The null pair (base vs a text-only fine-tune with the chat fine-tune's recipe, where nothing was "
                "planted) is not fitted in this profile: the methods' false positives there are on this page in "
                "profile `full` (`make book PROFILE=full`), beside the controls page's null diff.")
    seeds = (f"Seed agreement compares {board.n_seeds} initialisation seeds per trained method." if board.n_seeds > 1
             else "Seed agreement needs a second seed of every method: profile `full` fits one.")
    from crosscoder import methods

    left_out = [m for m in methods.names() if m not in board.results]
    absent = (f" Not fitted in this profile (its time budget): {_and(left_out)}; profile `full` fits every method."
              if left_out else "")
    return f"{null} {seeds}{absent}"


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"


def cut_table(board: Board) -> list[dict[str, Any]]:
    """The cuts chosen on validation data: field, fitted and chosen value, and the validation numbers."""
    return [c._asdict() for c in board.cuts.values()]


def sign_table(board: Board) -> list[dict[str, Any]]:
    """The item signs chosen on validation data: per method and item, the sign and the item's best
    validation AUROC with the fitted and with the flipped sign."""
    return [{"method": c.method, "item": j, "sign": sgn, "best validation AUROC, fitted sign": a,
             "flipped": b} for c in board.signs.values()
            for j, (sgn, a, b) in enumerate(zip(c.signs, c.best_auroc_fitted, c.best_auroc_flipped))]


def grid(board: Board) -> tuple[list[dict[str, Any]], dict[str, int] | None]:
    """The figure's data: (per method (ranked) and behaviour the best flagged AUROC and whether recovered,
    {method: items flagged on the null pair} or None when the null pair was not fitted)."""
    cells = [{"method": r.method, "behaviour": b.behaviour, "best_auroc": b.best_auroc, "recovered": b.recovered}
             for r in board.rows for b in board.results[r.method].behaviours]
    null = {r.method: r.null_false_positives for r in board.rows} if board.null_measured else None
    return cells, null


def write_board_metrics(folder: str | Path, board: Board, extra: Mapping[str, Any]) -> Path:
    """``folder/metrics.json``: the ranked table (``scoreboard.table``), the per-behaviour results, the
    cuts and signs, the causal check's rows, the recommendation and ``extra`` (the parameters and method configs)."""
    from crosscoder.atomic import write_json_atomic

    def plain(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    rows = [{k: plain(v) for k, v in r.items()} for r in table(board.rows)]
    beh = [{k: plain(v) for k, v in r.items()} for r in behaviour_table(board)]
    cuts = [{k: plain(v) for k, v in c.items()} for c in cut_table(board)]
    signs = [{k: plain(v) for k, v in c.items()} for c in sign_table(board)]
    caus = None if board.causal is None else [{k: plain(v) for k, v in c.items()} for c in board.causal]
    costs = {n: f.cost._asdict() for n, f in board.fits.items()}
    path = Path(folder) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"rows": rows, "behaviours": beh, "cuts": cuts, "signs": signs, "causal": caus,
                             "recommendation": board.recommendation,
                             "null_measured": board.null_measured, "n_seeds": board.n_seeds,
                             "costs": {n: {k: plain(v) for k, v in c.items()} for n, c in costs.items()}, **extra})
    return path
