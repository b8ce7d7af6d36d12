"""The book's first page: this build's headline findings, each a sentence built from numbers the runs
wrote into their crosscoders' ``metrics.json`` and the synthetic run's (never typed in), with a link to the
page it comes from."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, NamedTuple

from crosscoder.analysis.diff import varied_decision_sentence
from crosscoder.checkpoint import read_metrics
from crosscoder.synthetic import TIED, VARIED, chat_only_offsets

SYNTHETIC_RUN = "synthetic_crosscoder"
"""The run (and stage) of the synthetic check."""
SCOREBOARD_RUN = "scoreboard"
"""The run of the scoreboard of diffing methods (its metrics under ``<artifacts_dir>/scoreboard``)."""


class Verdict(NamedTuple):
    text: str
    """Two or three sentences: the scoreboard's recommendation and what it was measured on."""
    figure: Path | None
    """The scoreboard's figure (PNG), when its run wrote one."""


VERDICT_CAPTION = ("*Figure.* The scoreboard (its own page has the tables): each method against each planted "
                   "decision, the best held-out AUROC among the items the method flags, ticked where it reaches 0.9; "
                   "the last row, where the profile fits it, counts what each method flags on the null fine-tune.")


def verdict(artifacts_dir: str | Path, output_dir: str | Path) -> Verdict:
    """The first page's answer to the book's question, from the scoreboard's ``metrics.json``
    (``scoreboard_run.write_board_metrics``) and its figure; when the profile did not run the
    scoreboard, a sentence saying so."""
    m = read_metrics(Path(artifacts_dir) / SCOREBOARD_RUN)
    if not m or not m.get("rows"):
        return Verdict("The scoreboard of diffing methods did not run in this build (the profile skips it, or it has "
                       "no planted ground truth); the crosscoder findings below stand alone.", None)
    rows = m["rows"]
    n = rows[0]["n_behaviours"]
    null = ("Their false positives are counted on a null fine-tune, where nothing was planted."
            if m.get("null_measured") else "This build fits no null pair (profile full does).")
    fig = run_folder(output_dir, SCOREBOARD_RUN) / "scoreboard.png"
    return Verdict(f"{len(rows)} model-diffing methods, scored against the token-level ground truth of {n} planted "
                   f"decisions on held-out conversations: {m['recommendation']} {null}", fig if fig.is_file() else None)


class Finding(NamedTuple):
    text: str
    """One sentence, plain text."""
    page: str
    """The executed page it summarises (run name under book/_runs/)."""


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def findings(artifacts_dir: str | Path, crosscoders: list[str]) -> list[Finding]:
    """Headline findings of every crosscoder that has metrics; what a run did not compute is left out,
    except the controls, whose absence is said in one closing line (they run in profile ``full``)."""
    out: list[Finding] = []
    controls_ran = False
    for name in crosscoders:
        m = read_metrics(Path(artifacts_dir) / name / "crosscoder")
        held = m.get("heldout")
        if not held:
            continue
        train_page = f"train_{name}"
        out.append(Finding(
            f"{name}: L0 {_fmt(held.get('l0'), '.1f')} active latents per token, held-out FVU "
            f"{_fmt(held.get('fvu_base'), '.3f')} (base) / {_fmt(held.get('fvu_chat'), '.3f')} (chat).", train_page))
        ls = m.get("latent_scaling")
        if ls:
            text = f"{name}: {ls['chat-only (Δnorm)']} latents chat-only by decoder norm (Δnorm > 0.9)"
            if ls.get("fitted"):
                text += (f"; of the {ls['fitted']} active enough to fit, Latent Scaling confirms "
                         f"{ls['truly chat-specific']} as absent from the base model and finds the other "
                         f"{_fmt(ls.get('share in base (ν ≥ threshold)'), '.0%')} present in the base model's "
                         f"activations too (ν^ε or ν^r at or above the threshold: chat-only by decoder norm only)")
            out.append(Finding(text + ".", "model_diff"))
        dec = m.get("decisions")
        if dec and "behaviours" in dec and dec.get("confirmed: latents"):
            out.append(Finding(
                f"{name}: its confirmed chat-specific latents recover {dec['confirmed: behaviours recovered']} of "
                f"the {dec['behaviours']} planted decisions at AUROC ≥ 0.9 (chat-only latents: "
                f"{dec['chat-only: behaviours recovered']}; any live latent: {dec['any live: behaviours recovered']}); "
                f"{_fmt(dec.get('confirmed: precision'), '.0%')} of the confirmed latents fire mostly on planted "
                f"tokens (precision).", "model_diff"))
        elif dec and "behaviours" in dec:
            out.append(Finding(
                f"{name}: no confirmed chat-specific latent; its live latents recover "
                f"{dec['any live: behaviours recovered']} of the {dec['behaviours']} planted decisions at AUROC ≥ 0.9, "
                f"none of them labelled chat-only by the decoder norms.", "model_diff"))
        by_beh: dict[str, dict[str, dict]] = {}
        for r in m.get("causal", []):
            by_beh.setdefault(r["behaviour"], {})[r["condition"]] = r
        for beh, conds in by_beh.items():
            c, a, rl = conds.get("chat"), conds.get("chat − latents"), conds.get("chat − random live latents")
            if c and a and rl:
                out.append(Finding(
                    f"{name}: the chat model's {beh} rate on held-out prompts is {c['hits']}/{c['n']}, and "
                    f"{a['hits']}/{a['n']} with the {a['latents']} confirmed latent(s) that recover the {beh} decision "
                    f"removed (as many random live latents removed: {rl['hits']}/{rl['n']}).", "model_diff"))
        null = m.get("null_diff")
        if null and ls:
            out.append(Finding(
                f"{name}: on the null diff (base vs a text-only fine-tune of the same length) "
                f"{null['chat-only (Δnorm)']} latents are chat-only by decoder norm and "
                f"{null['truly chat-specific']} confirmed, against {ls['chat-only (Δnorm)']} and "
                f"{ls['truly chat-specific']} on the real diff.", "controls"))
        seeds = m.get("seeds", {}).get("rows", [])
        if len(seeds) > 1:
            conf = [r["truly chat-specific"] for r in seeds]
            rec = [r.get("confirmed: behaviours recovered") for r in seeds if "confirmed: behaviours recovered" in r]
            again = [r["reappear"] for r in m["seeds"].get("reappear", [])]
            out.append(Finding(
                f"{name}: over {len(seeds)} seeds, {min(conf)}–{max(conf)} confirmed chat-specific latents"
                + (f", recovering {min(rec)}–{max(rec)} decisions" if rec else "")
                + (f"; {min(again)}–{max(again)} of each seed's reappear in every other seed" if again else "")
                + ".", "controls"))
        var = m.get("variant_diff")
        if var and var.get("rows"):
            out.append(Finding(
                f"{name}, on the {var['preset']} organism (a planted decision on varied words, the marker): "
                + varied_decision_sentence(var["rows"]), "controls"))
        fam = m.get("families")
        if fam:
            out.append(Finding(families_sentence(name, fam), fam.get("page", "latents")))
        controls_ran = controls_ran or "null_diff" in m
    if out and not controls_ran:
        out.append(Finding(
            "Not in this build: the null diff (the false-positive baseline), the spread over crosscoder seeds and "
            "the marker variant (a planted decision on varied words) run in profile full, on the controls page.",
            "controls"))
    return out


def _recovery(m: dict) -> str | None:
    """"X of N planted decisions (C confirmed chat-specific latents, K chat-only by Δnorm)" from one
    crosscoder's metrics; None when its model-diff page has not run."""
    dec, ls = m.get("decisions"), m.get("latent_scaling")
    if not dec or "behaviours" not in dec or not ls:
        return None
    return (f"{dec['confirmed: behaviours recovered'] if dec.get('confirmed: latents') else 0} of "
            f"{dec['behaviours']} planted decisions ({ls['truly chat-specific']} confirmed chat-specific latents, "
            f"{ls['chat-only (Δnorm)']} chat-only by Δnorm)")


def beside_findings(artifacts_dir: str | Path, reference_dir: str | Path, crosscoders: list[str],
                    this: str, reference: str) -> list[Finding]:
    """Per crosscoder, how many planted decisions its confirmed chat-specific latents recover at AUROC ≥
    0.9 on this build's pair (``this``) and on another profile's (``reference``, read from
    ``reference_dir``), side by side; one sentence saying how to get the reference when it has no
    results in this checkout."""
    out: list[Finding] = []
    for name in crosscoders:
        here = _recovery(read_metrics(Path(artifacts_dir) / name / "crosscoder"))
        there = _recovery(read_metrics(Path(reference_dir) / name / "crosscoder"))
        if here is None:
            continue
        if there is None:
            return [Finding(f"The {reference}'s results are not in this checkout (no model-diff metrics under "
                            f"{reference_dir}/); build its profile first to see them beside these.", "model_diff")]
        out.append(Finding(f"{name}, confirmed chat-specific latents recovering a planted decision at AUROC ≥ 0.9: "
                           f"{this}: {here}; {reference}: {there}.", "model_diff"))
    return out


def families_sentence(name: str, fam: dict, threshold: float = 0.7) -> str:
    """One sentence on a crosscoder's latent families from the summary its latents page wrote
    (``crosscoder.analysis.families.find_families``): the chosen clustering, its reproducibility,
    and whether each chat context class has a family of its own, beside the shuffled null."""
    from crosscoder.analysis.clustering import MIN_FAMILY
    from crosscoder.analysis.families import measured, seed_phrase

    repro = [seed_phrase(fam)] + ([f"bootstrap ARI {fam['bootstrap_ari']:.2f}"] if measured(fam, "bootstrap_ari") else [])
    chat = ("template", "user", "model")
    own = [fam.get(f"own_family_purity_{c}", float("nan")) for c in chat]
    null = [fam.get(f"null_own_family_purity_{c}", float("nan")) for c in chat]
    words = {"template": "the chat template", "user": "user turns", "model": "model turns"}
    lacking = [words[c] for c, v in zip(chat, own) if not v >= threshold]
    single = lacking == [words["template"]]
    verdict = ("the chat template, user turns and model turns each have a family of their own" if not lacking
               else f"{' and '.join(lacking)} {'has' if single else 'have'} no family of {'its' if single else 'their'} own")
    return (f"{name}: {fam['k']} latent families by the {fam['method']} view ({'; '.join(repro)}); {verdict} "
            f"(purity ≥ {threshold} in a family of {MIN_FAMILY}+ latents: template / user / model "
            f"{' / '.join(_fmt(v) for v in own)}; shuffled activations {' / '.join(_fmt(v) for v in null)}).")


def run_folder(output_dir: str | Path, run: str) -> Path:
    """Another run's artifact folder, a sibling of this run's ``output_dir``: ``python -m report`` gives
    every run ``<book>/_runs/<run>/``, and a direct papermill run writes to ``artifacts/figures/<stage>/``
    (the synthetic run and its stage share a name)."""
    return Path(output_dir).parent / run


def _per_objective(rows: list[dict], key: str, spec: str) -> str:
    """``rows[i][key]`` of every row, formatted and named by its crosscoder: "0.991 (L1) / 0.985 (BatchTopK)"."""
    return " / ".join(f"{_fmt(r.get(key), spec)} ({r['crosscoder']})" for r in rows)


def synthetic_findings(folder: str | Path) -> list[Finding]:
    """The synthetic run's findings, from ``folder/metrics.json`` (``crosscoder.synthetic.write_metrics``):
    how its crosscoders recovered the planted dictionary, and how often the best latent of a planted
    chat-only offset is chat-only by decoder norm when the offset is on varied tokens and when it is tied
    to one context. A run that did not execute (a profile that skips it), or ran without the tied-offset
    experiment (``offset_steps = 0``), gets a sentence saying so."""
    m = read_metrics(folder)
    if not m:
        return [Finding("Synthetic check: no results in this build (the synthetic run was skipped or has not run), "
                        "so its planted-dictionary and tied-offset findings are not shown.", SYNTHETIC_RUN)]
    out: list[Finding] = []
    rec = m.get("recovery", [])
    if rec:
        out.append(Finding(
            f"Synthetic check: on activations built from a known dictionary, each planted atom's best-matching latent "
            f"has decoder cosine {_per_objective(rec, 'mean best cosine', '.3f')} on average, and "
            f"{_per_objective(rec, 'bin accuracy', '.0%')} of these latents fall in their atom's Δnorm class.",
            SYNTHETIC_RUN))
    tied = m.get("tied_offsets") or {}
    rows = tied.get("rows") or []
    if not rows:
        why = (f"offset_steps = {tied['offset_steps']}" if tied.get("offset_steps") == 0
               else "the run recorded no tied-offset rows")
        out.append(Finding(f"Synthetic check: the tied-offset experiment did not run ({why}), so there is no finding "
                           f"on chat-only offsets tied to one context vs on varied tokens.", SYNTHETIC_RUN))
        return out
    (varied, n), (on_tied, n_tied) = chat_only_offsets(rows, VARIED), chat_only_offsets(rows, TIED)
    objectives = " and ".join(dict.fromkeys(r["crosscoder"] for r in rows))
    per = len(rows[0]["offset latents' Δnorm"])
    lowest = min(v for r in rows for v in r["offset latents' AUROC"])
    out.append(Finding(
        f"Synthetic check: the latent that best detects a planted chat-only offset is chat-only by decoder norm "
        f"(Δnorm > 0.9) in {varied} of {n} cases when the offsets land on varied tokens, and in {on_tied} of {n_tied} "
        f"when they are tied to one context ({objectives}, {per} offsets each; lowest AUROC of a best latent "
        f"{lowest:.2f}).", SYNTHETIC_RUN))
    return out


def findings_html(items: list[Finding]) -> str:
    """A bulleted list; each item links to its page (a sibling of this page under _runs/)."""
    if not items:
        return "<p>No run of this profile has written metrics yet.</p>"
    lis = "".join(f'<li>{html.escape(f.text)} <a href="{html.escape(f.page)}.html">→ {html.escape(f.page)}</a></li>'
                  for f in items)
    return f"<ul>{lis}</ul>"
