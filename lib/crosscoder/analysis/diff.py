"""Model diffing of trained crosscoders: decoder-norm classes, Latent Scaling of the chat-only
latents, and (on the organism) their recovery of the planted behaviours."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from crosscoder.analysis.ground_truth import decision_table, ground_truth_table, planted_precision
from crosscoder.analysis.latents import latent_acts, latent_acts_many
from crosscoder.analysis.metrics import DiffGeometry, class_counts, classify_latents, diff_geometry, evaluate
from crosscoder.analysis.probes import decision_tasks
from crosscoder.analysis.scaling import LatentScaling, latent_scaling
from crosscoder.data.pair import ModelPair
from crosscoder.model import Crosscoder


class DiffInfo(NamedTuple):
    geo: DiffGeometry
    """Decoder norms, r, Δnorm and cosines per latent."""
    alive_F: Tensor
    """Latents active on at least one held-out token."""
    by_r: list[str]
    """Class of each latent by Kissane's relative norm r."""
    by_delta_norm: list[str]
    """Class of each latent by Minder's Δnorm."""


def diff_info(model: Crosscoder, heldout_raw_NSD: Tensor) -> DiffInfo:
    """Decoder geometry and both class schemes of a crosscoder's live latents (held-out data)."""
    alive = evaluate(model, heldout_raw_NSD).freq_F > 0
    geo = diff_geometry(model)
    return DiffInfo(geo, alive, classify_latents(geo.rel_norm_F, "kissane", alive),
                    classify_latents(geo.delta_norm_F, "minder", alive))


def in_class(classes: list[str], name: str) -> Tensor:
    """Indices of the latents labelled ``name``."""
    return torch.tensor([j for j, c in enumerate(classes) if c == name], dtype=torch.long)


def class_count_table(infos: dict[str, DiffInfo]) -> dict[tuple[str, str], dict[str, int]]:
    """{(crosscoder, scheme): {class: count}} for both schemes of every crosscoder."""
    return {(name, scheme): class_counts(labels) for name, i in infos.items()
            for scheme, labels in (("r", i.by_r), ("Δnorm", i.by_delta_norm))}


class ScalingSummary(NamedTuple):
    scaling: LatentScaling
    """Latent Scaling of the chat-only latents active on enough tokens."""
    row: dict[str, Any]
    """Counts and medians for the summary table (and metrics.json)."""


def chat_only_scaling(name: str, model: Crosscoder, info: DiffInfo, heldout_raw_NSD: Tensor, *,
                      nu_threshold: float, min_active_tokens: int) -> ScalingSummary:
    """Latent Scaling of a crosscoder's chat-only latents (Δnorm > 0.9), those active on fewer than
    ``min_active_tokens`` held-out tokens dropped (their betas are noise); "truly chat-specific"
    means both ν^ε and ν^r below ``nu_threshold``."""
    chat_only = in_class(info.by_delta_norm, "chat-only")
    ls = latent_scaling(model, heldout_raw_NSD, chat_only)
    keep = ls.n_active >= min_active_tokens
    ls = ls._replace(**{f: getattr(ls, f)[keep] for f in ls._fields})
    specific = _confirmed_mask(ls, nu_threshold)
    fitted = len(ls.latents) > 0
    row = {"crosscoder": name, "chat-only (Δnorm)": int(len(chat_only)), "fitted": int(keep.sum()),
           "truly chat-specific": int(specific.sum()),
           # Minder et al.'s L1 artifacts: chat-only by decoder norm, yet present in the base model.
           "share in base (ν ≥ threshold)": float((~specific).float().mean()) if fitted else float("nan"),
           "median ν^ε": float(ls.nu_error.median()) if fitted else float("nan"),
           "median ν^r": float(ls.nu_recon.median()) if fitted else float("nan")}
    return ScalingSummary(ls, row)


def _confirmed_mask(scaling: LatentScaling, nu_threshold: float) -> Tensor:
    return (scaling.nu_error < nu_threshold) & (scaling.nu_recon < nu_threshold)


def confirmed_latents(scaling: LatentScaling, nu_threshold: float) -> Tensor:
    """The "truly chat-specific" latents: both ν^ε and ν^r below ``nu_threshold``."""
    return scaling.latents[_confirmed_mask(scaling, nu_threshold)]


PLANTED_LABELS = ("template", "refusal", "signoff", "forbidden_topic", "marker", "fact")
"""The evaluation set's token labels of planted behaviours (the others, user and model content, are
auxiliary)."""


def planted_labels(eval_set) -> list[str]:
    """The ``PLANTED_LABELS`` this organism's evaluation set marks anywhere (the marker and the fact
    only where planted; older eval sets lack their labels)."""
    return [n for n in PLANTED_LABELS if n in eval_set.labels and bool(eval_set.labels[n].any())]


def planted_positions(eval_set, tasks: dict) -> Tensor:
    """bool [N, T]: tokens where the organism planted something (its ``planted_labels`` and every
    decision position of ``tasks``)."""
    out = torch.zeros_like(eval_set.attention_mask_NT, dtype=torch.bool)
    for name in planted_labels(eval_set):
        out |= eval_set.labels[name].bool()
    for t in tasks.values():
        out |= t.label_NT
    return out


def decision_recovery(model: Crosscoder, pair: ModelPair, eval_set, info: DiffInfo, scaling: LatentScaling,
                      nu_threshold: float, *, top_n: int = 20, live_acts: Tensor | None = None
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Does model diffing find the organism's planted decisions?

    For each decision task (``probes.decision_tasks``) the best AUROC, over the task's comparable
    positions, of three candidate sets: the confirmed chat-specific latents (chat-only by Δnorm and
    both ν below ``nu_threshold``), all chat-only latents, and every live latent (with the class of
    the best one). The summary counts the behaviours each set recovers (AUROC >= 0.9) and the
    *precision* of the confirmed set: the share of its latents whose ``top_n`` activations fall
    mostly (>= half) on planted tokens (``planted_positions``). ``live_acts``: the activations of
    every live latent on the eval set (``live_latent_acts``), when already computed."""

    tasks = decision_tasks(eval_set)
    live = torch.nonzero(info.alive_F).squeeze(1)
    f = live_latent_acts(model, pair, eval_set, info) if live_acts is None else live_acts
    norms_FS = model.decoder_norms_FS().detach()
    column = {int(j): i for i, j in enumerate(live)}
    sets = {"confirmed": confirmed_latents(scaling, nu_threshold),
            "chat-only": in_class(info.by_delta_norm, "chat-only"), "any live": live}
    rows, summary = {}, {}
    for set_name, J in sets.items():
        J = torch.tensor([int(j) for j in J if int(j) in column], dtype=torch.long)
        cols = torch.tensor([column[int(j)] for j in J], dtype=torch.long)
        table, auc = decision_table(f[..., cols], tasks, J)
        if set_name == "confirmed":  # the latents a causal check removes, per decision
            summary["confirmed: recovering latents"] = {
                name: J[auc[:, k].nan_to_num(0) >= 0.9].tolist() for k, name in enumerate(tasks)}
        for r in table:
            row = rows.setdefault(r["behaviour"], {"behaviour": r["behaviour"], "decisions": r["label_tokens"]})
            row[f"{set_name}: AUROC"] = r["best_auroc"]
            row[f"{set_name}: latent"] = r["best_latent"]
            if set_name == "any live" and r["best_latent"] >= 0:
                row["any live: class"] = info.by_delta_norm[r["best_latent"]]
                row["any live: Δnorm"] = float(info.geo.delta_norm_F[r["best_latent"]])
                row["any live: decoder cos"] = float(info.geo.cosine_F[r["best_latent"]])
                row["any live: ‖d_base‖"] = float(norms_FS[r["best_latent"], 0])
                row["any live: ‖d_chat‖"] = float(norms_FS[r["best_latent"], 1])
        summary[f"{set_name}: latents"] = len(J)
        summary[f"{set_name}: behaviours recovered"] = sum(r["recovered"] for r in table)
        if set_name == "confirmed":
            mask = eval_set.attention_mask_NT.bool().clone()
            mask[:, 0] = False
            _, summary["confirmed: precision"] = planted_precision(
                f[..., cols], planted_positions(eval_set, tasks), mask, top_n=top_n)
    summary["behaviours"] = len(tasks)
    return list(rows.values()), summary


def live_latent_acts(model: Crosscoder, pair: ModelPair, eval_set, info: DiffInfo) -> Tensor:
    """Activations [N, T, J] of every live latent (``info.alive_F``, in index order) on the eval set."""
    return live_latent_acts_many({"": model}, pair, eval_set, {"": info})[""]


def live_latent_acts_many(models: dict[str, Crosscoder], pair: ModelPair, eval_set,
                          infos: dict[str, DiffInfo]) -> dict[str, Tensor]:
    """``live_latent_acts`` of several crosscoders of the same pair, from one pass of the language
    models over the eval set (the pass is nearly all of the cost; the encoders are cheap)."""
    names = list(models)
    got = latent_acts_many([models[n] for n in names], pair, eval_set.input_ids_NT, eval_set.attention_mask_NT,
                           [torch.nonzero(infos[n].alive_F).squeeze(1) for n in names])
    return dict(zip(names, got))


def behaviour_recovery(model: Crosscoder, pair: ModelPair, eval_set, candidates: Tensor,
                       behaviours: list[str], classes: list[str] | None = None, *, acts: Tensor | None = None
                       ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """AUROC of ``candidates`` against each planted behaviour on the organism's evaluation set
    (rows per behaviour, summary); with ``classes``, each row names its best latent's class.
    ``acts``: the candidates' activations [N, T, J] on the eval set, when already computed."""
    f = latent_acts(model, pair, eval_set.input_ids_NT, eval_set.attention_mask_NT, candidates) if acts is None else acts
    rows, summary, _ = ground_truth_table(f, eval_set, candidates, behaviours)
    if classes is not None:
        rows = [dict(r, best_latent_class=classes[r["best_latent"]] if r["best_latent"] >= 0 else "")
                for r in rows]
    return rows, summary


def write_diff_metrics(artifacts_dir: str, scaling_rows: dict[str, dict[str, Any]], recovery_rows: list[dict],
                       recovery_summary: dict[str, dict[str, Any]], causal_rows: list[dict],
                       probe_rows: list[dict]) -> None:
    """Merge the model-diff page's results into each crosscoder's metrics.json (the first page of the
    book reads them from there): Latent Scaling row, decision recovery, causal rows, probes."""
    from crosscoder.checkpoint import update_metrics

    for name, row in scaling_rows.items():
        update_metrics(f"{artifacts_dir}/{name}/crosscoder", {
            "latent_scaling": row, "probes_at_layer": probe_rows,
            "decisions": {"rows": [r for r in recovery_rows if r["crosscoder"] == name],
                          **recovery_summary.get(name, {})},
            "causal": [r for r in causal_rows if r["crosscoder"] == name]})


def diff_row(name: str, model: Crosscoder, heldout_raw_NSD: Tensor, *, nu_threshold: float, min_active_tokens: int,
             pair: ModelPair | None = None, eval_set=None) -> tuple[dict[str, Any], Tensor]:
    """One crosscoder's model-diff summary: Δnorm class counts, Latent Scaling of its chat-only
    latents and, with an organism ``eval_set``, its decision recovery (counts and the best AUROC of
    chat-only latents per decision). Returns (row, confirmed chat-specific latents)."""
    info = diff_info(model, heldout_raw_NSD)
    sc = chat_only_scaling(name, model, info, heldout_raw_NSD, nu_threshold=nu_threshold,
                           min_active_tokens=min_active_tokens)
    row = {**{f"{k} (Δnorm)": v for k, v in class_counts(info.by_delta_norm).items()}, **sc.row}
    if eval_set is not None:
        rows, summary = decision_recovery(model, pair, eval_set, info, sc.scaling, nu_threshold)
        row.update({k: v for k, v in summary.items() if k != "confirmed: recovering latents"})
        row.update({f"chat-only AUROC: {r['behaviour']}": r["chat-only: AUROC"] for r in rows})
    return row, confirmed_latents(sc.scaling, nu_threshold)


SEED_COLUMNS = ("chat-only (Δnorm)", "truly chat-specific", "share in base (ν ≥ threshold)",
                "confirmed: behaviours recovered", "chat-only: behaviours recovered", "any live: behaviours recovered",
                "confirmed: precision", "chat-only AUROC: refusal_decision", "chat-only AUROC: answer_decision",
                "chat-only AUROC: signoff_decision", "chat-only AUROC: end_of_turn_decision")
"""The columns of ``seed_table`` rows the controls page shows per seed and as a spread over seeds."""


def seed_table(replicas: dict[str, dict[int, Crosscoder]], heldout_raw_NSD: Tensor, *, nu_threshold: float,
               min_active_tokens: int, match_cos: float, pair: ModelPair | None = None, eval_set=None
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``diff_row`` of every seed of every objective (``replicas[objective][seed]``), and per
    objective how many confirmed chat-specific latents of each seed reappear, as confirmed latents,
    in every other seed (``seeds.reappearance`` at decoder cosine >= ``match_cos``)."""
    from crosscoder.analysis.seeds import reappearance

    rows, reappear = [], []
    for objective, by_seed in replicas.items():
        confirmed = {}
        for seed, model in by_seed.items():
            row, confirmed[f"seed {seed}"] = diff_row(objective, model, heldout_raw_NSD, nu_threshold=nu_threshold,
                                                      min_active_tokens=min_active_tokens, pair=pair, eval_set=eval_set)
            rows.append({"objective": objective, "seed": seed, **{k: v for k, v in row.items() if k != "crosscoder"}})
        if len(by_seed) > 1:
            runs = {f"seed {s}": m for s, m in by_seed.items()}
            reappear += [dict(r, objective=objective) for r in reappearance(runs, confirmed, threshold=match_cos)
                         if r["other"] == "all others"]
    return rows, reappear


def pair_recovery(models: dict[str, Crosscoder], pair: ModelPair, eval_set, heldout_raw_NSD: Tensor, *,
                  nu_threshold: float, min_active_tokens: int) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """``decision_recovery`` of every crosscoder, with its decoder-norm classes and Latent Scaling
    computed on ``heldout_raw_NSD``: the model-diff page's recovery table for another pair (e.g. an
    organism variant). Returns rows tagged "crosscoder" and each crosscoder's summary."""
    rows, summaries = [], {}
    for name, model in models.items():
        info = diff_info(model, heldout_raw_NSD)
        sc = chat_only_scaling(name, model, info, heldout_raw_NSD, nu_threshold=nu_threshold,
                               min_active_tokens=min_active_tokens)
        found, summary = decision_recovery(model, pair, eval_set, info, sc.scaling, nu_threshold)
        summaries[name] = {**{f"{k} (Δnorm)": v for k, v in class_counts(info.by_delta_norm).items()},
                           **{k: v for k, v in sc.row.items() if k != "crosscoder"},
                           **{k: v for k, v in summary.items() if k != "confirmed: recovering latents"}}
        rows += [dict(r, crosscoder=name) for r in found]
    return rows, summaries


def varied_decision_sentence(rows: list[dict[str, Any]], decision: str = "marker_decision",
                             threshold: float = 0.9) -> str:
    """For one crosscoder's ``decision_recovery`` rows: the AUROC, Δnorm and class of its best live
    latent for ``decision`` (a decision on varied words), beside the Δnorm of its best live latents
    for the other decisions it represents (AUROC >= ``threshold``)."""
    label = decision.removesuffix("_decision")
    hit = [r for r in rows if r["behaviour"] == decision and "any live: Δnorm" in r]
    if not hit:
        return f"no live latent fires on the {label} decision."
    m = hit[0]
    text = (f"the best live latent for the {label} decision has AUROC {m['any live: AUROC']:.3f}, "
            f"Δnorm {m['any live: Δnorm']:.2f} ({m['any live: class']})")
    fixed = [r["any live: Δnorm"] for r in rows if r["behaviour"] != decision and r.get("any live: AUROC", 0) >= threshold]
    if fixed:
        text += (f"; for the {len(fixed)} fixed-position decisions it represents at AUROC ≥ {threshold}, "
                 f"Δnorm {min(fixed):.2f}–{max(fixed):.2f}")
    return text + "."


def varied_decision_finding(rows: list[dict[str, Any]], decision: str = "marker_decision",
                            threshold: float = 0.9) -> str:
    """``varied_decision_sentence`` of every crosscoder of ``decision_recovery`` rows tagged
    "crosscoder", one after the other."""
    names = dict.fromkeys(r["crosscoder"] for r in rows)
    return " ".join(f"{n}: " + varied_decision_sentence([r for r in rows if r["crosscoder"] == n], decision, threshold)
                    for n in names)


def write_control_metrics(artifacts_dir: str, null_rows: dict[str, dict[str, Any]], seed_rows: list[dict],
                          reappear: list[dict], variant: dict[str, Any] | None = None) -> None:
    """Merge the controls page's results into each crosscoder's metrics.json: its null-diff row,
    every seed's row of its objective with the reappearance counts and, with ``variant`` ({"preset",
    "rows", "summaries"} from ``pair_recovery``), its diff of an organism variant."""
    from crosscoder.checkpoint import update_metrics

    for name, row in null_rows.items():
        extra = {}
        if variant is not None:
            extra["variant_diff"] = {"preset": variant["preset"], "summary": variant["summaries"].get(name, {}),
                                     "rows": [r for r in variant["rows"] if r["crosscoder"] == name]}
        update_metrics(f"{artifacts_dir}/{name}/crosscoder", {
            "null_diff": row, "seeds": {"rows": [r for r in seed_rows if r["objective"] == name],
                                        "reappear": [r for r in reappear if r["objective"] == name]}, **extra})


HALF_COLUMNS = ("any live: AUROC", "any live: class", "any live: Δnorm", "any live: ‖d_base‖", "any live: ‖d_chat‖",
                "any live: decoder cos")
"""The columns of ``decision_recovery`` rows that describe each decision's best live latent."""


def decision_halves_finding(rows: list[dict[str, Any]], threshold: float = 0.9) -> str:
    """One sentence per crosscoder on the decoder halves of its best live latent for each decision it
    represents (AUROC >= ``threshold``), read from ``decision_recovery`` rows tagged "crosscoder"."""
    out = []
    for name in dict.fromkeys(r["crosscoder"] for r in rows):
        hit = [r for r in rows if r["crosscoder"] == name and r.get("any live: AUROC", 0) >= threshold]
        if not hit:
            out.append(f"{name}: no live latent reaches AUROC {threshold} on any decision.")
            continue
        rng = lambda k: f"{min(r[k] for r in hit):.2f}–{max(r[k] for r in hit):.2f}"  # noqa: E731
        n_chat = sum(r["any live: class"] == "chat-only" for r in hit)
        out.append(f"{name}: {len(hit)} decisions have a live latent at AUROC ≥ {threshold}, {n_chat} of them labelled "
                   f"chat-only; their Δnorm is {rng('any live: Δnorm')}, base-decoder norm {rng('any live: ‖d_base‖')} "
                   f"against chat-decoder norm {rng('any live: ‖d_chat‖')}, decoder cosine {rng('any live: decoder cos')}.")
    return " ".join(out)
