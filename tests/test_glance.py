"""The book's first page: findings are built from the metrics the runs wrote, and only from them."""

import json

from report import glance


def _write(tmp_path, name, metrics):
    folder = tmp_path / name / "crosscoder"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_findings_read_every_number_from_metrics(tmp_path):
    _write(tmp_path, "l1", {
        "heldout": {"l0": 34.17, "fvu_base": 0.1212, "fvu_chat": 0.1483},
        "latent_scaling": {"chat-only (Δnorm)": 111, "fitted": 111, "truly chat-specific": 21, "share in base (ν ≥ threshold)": 0.811},
        "decisions": {"behaviours": 4, "confirmed: latents": 21, "confirmed: behaviours recovered": 2, "chat-only: behaviours recovered": 4,
                      "any live: behaviours recovered": 4, "confirmed: precision": 0.714},
        "causal": [{"behaviour": "refusal", "condition": c, "hits": h, "n": 36, "latents": 3}
                   for c, h in (("chat", 36), ("chat − latents", 7), ("chat − random live latents", 35))],
        "null_diff": {"chat-only (Δnorm)": 9, "truly chat-specific": 1},
        "seeds": {"rows": [{"truly chat-specific": 21, "confirmed: behaviours recovered": 2},
                           {"truly chat-specific": 17, "confirmed: behaviours recovered": 1}],
                  "reappear": [{"reappear": 3}, {"reappear": 4}]},
        "variant_diff": {"preset": "default_marker", "rows": [
            {"crosscoder": "l1", "behaviour": "refusal_decision", "any live: AUROC": 1.0, "any live: Δnorm": 0.934,
             "any live: class": "chat-only"},
            {"crosscoder": "l1", "behaviour": "marker_decision", "any live: AUROC": 0.983, "any live: Δnorm": 0.9996,
             "any live: class": "chat-only"}]},
        "families": {"method": "signature", "k": 16, "seed_ari": 0.8709, "bootstrap_ari": 0.9039, "matched_latents": 1032,
                     "own_family_purity_template": 0.967, "own_family_purity_user": 0.7505, "own_family_purity_model": 0.912,
                     "null_own_family_purity_template": 0.0, "null_own_family_purity_user": 0.0,
                     "null_own_family_purity_model": 0.0, "page": "latents_l1"}})
    _write(tmp_path, "batchtopk", {"heldout": {"l0": 32.3, "fvu_base": 0.057, "fvu_chat": 0.072},
                                   "latent_scaling": {"chat-only (Δnorm)": 0, "fitted": 0, "truly chat-specific": 0},
                                   "decisions": {"behaviours": 4, "confirmed: latents": 0, "any live: behaviours recovered": 4},
                                   "families": {"method": "cooccurrence", "k": 8, "seed_ari": float("nan"), "bootstrap_ari": 0.86,
                                                "matched_latents": None, "own_family_purity_template": 0.85,
                                                "own_family_purity_user": 0.39, "own_family_purity_model": 0.86,
                                                "null_own_family_purity_template": 0.1, "null_own_family_purity_user": 0.0,
                                                "null_own_family_purity_model": 0.0, "page": "latents"}})
    items = glance.findings(tmp_path, ["l1", "batchtopk", "not_trained"])
    text = " ".join(f.text for f in items)
    for piece in ("L0 34.2", "0.121 (base) / 0.148 (chat)", "111 latents chat-only", "confirms 21", "81%",
                  "recover 2 of the 4", "71% of the confirmed", "is 36/36, and 7/36", "random live latents removed: 35/36",
                  "9 latents are chat-only", "17–21 confirmed",
                  "l1, on the default_marker organism (a planted decision on varied words, the marker): the best live "
                  "latent for the marker decision has AUROC 0.983, Δnorm 1.00 (chat-only); for the 1 fixed-position "
                  "decisions it represents at AUROC ≥ 0.9, Δnorm 0.93–0.93.", "recovering 1–2 decisions", "3–4 of each seed's",
                  "batchtopk: L0 32.3", "batchtopk: 0 latents chat-only by decoder norm (Δnorm > 0.9).",
                  "batchtopk: no confirmed chat-specific latent; its live latents recover 4 of the 4",
                  "l1: 16 latent families by the signature view (seed ARI 0.87 on 1,032 latents matched across two seeds; "
                  "bootstrap ARI 0.90); the chat template, user turns and model turns each have a family of their own",
                  "template / user / model 0.97 / 0.75 / 0.91; shuffled activations 0.00 / 0.00 / 0.00",
                  "batchtopk: 8 latent families by the cooccurrence view (no second seed in this profile; bootstrap ARI "
                  "0.86); user turns have no family of their own", "0.85 / 0.39 / 0.86"):
        assert piece in text, piece
    assert {f.page for f in items} == {"train_l1", "model_diff", "controls", "train_batchtopk", "latents", "latents_l1"}
    assert not any("not_trained" in f.text for f in items)
    html = glance.findings_html(items)
    assert html.count("<li>") == len(items) and 'href="model_diff.html"' in html
    assert "No run" in glance.findings_html([])
    assert not any(f.text.startswith("Not in this build") for f in items)
    # Without the controls run, one line says where its findings are.
    _write(tmp_path, "l1_alone", {"heldout": {"l0": 3.0, "fvu_base": 0.1, "fvu_chat": 0.1}})
    items = glance.findings(tmp_path, ["l1_alone"])
    assert items[-1].page == "controls" and items[-1].text.startswith("Not in this build: the null diff")
    assert glance.findings(tmp_path, ["not_trained"]) == []


def _offset_rows(tied_delta, varied_delta, auroc=0.99):
    """``synthetic.tied_offset_runs`` rows (two objectives, two offsets each) with the given Δnorms."""
    from crosscoder.synthetic import TIED, VARIED

    return [{"offsets": design, "crosscoder": objective, "chat-only latents (Δnorm > 0.9)": 2,
             "offset latents' Δnorm": list(delta), "offset latents' AUROC": [auroc, 1.0]}
            for design, deltas in ((TIED, tied_delta), (VARIED, varied_delta))
            for objective, delta in zip(("L1", "BatchTopK"), deltas)]


def test_synthetic_findings_read_the_synthetic_runs_metrics(tmp_path):
    from crosscoder.synthetic import write_metrics

    folder = glance.run_folder(tmp_path / "_runs" / "at_a_glance", glance.SYNTHETIC_RUN)
    assert folder == tmp_path / "_runs" / "synthetic_crosscoder"
    recovery = [{"crosscoder": "L1", "mean best cosine": 0.9912, "bin accuracy": 0.97},
                {"crosscoder": "BatchTopK", "mean best cosine": 0.9854, "bin accuracy": 0.875}]
    rows = _offset_rows(tied_delta=[(0.95, 0.61), (0.52, 0.55)], varied_delta=[(0.97, 0.98), (0.99, 0.88)], auroc=0.964)
    write_metrics(str(folder), recovery, rows, offset_steps=100)
    assert not list(folder.glob("*.tmp"))  # written atomically
    items = glance.synthetic_findings(folder)
    assert {f.page for f in items} == {"synthetic_crosscoder"} and len(items) == 2
    text = " ".join(f.text for f in items)
    for piece in ("0.991 (L1) / 0.985 (BatchTopK)", "97% (L1) / 88% (BatchTopK)",
                  "in 3 of 4 cases when the offsets land on varied tokens, and in 1 of 4 when they are tied to one context",
                  "L1 and BatchTopK, 2 offsets each", "lowest AUROC of a best latent 0.96"):
        assert piece in text, piece
    assert 'href="synthetic_crosscoder.html"' in glance.findings_html(items)


def test_synthetic_findings_say_what_did_not_run(tmp_path):
    from crosscoder.synthetic import write_metrics

    # skipped by the profile: the runner emptied the folder
    (gone,) = glance.synthetic_findings(tmp_path / "synthetic_crosscoder")
    assert "no results in this build" in gone.text and gone.page == "synthetic_crosscoder"
    # offset_steps = 0: the recovery finding, and a sentence instead of the tied-offset one
    write_metrics(str(tmp_path / "s"), [{"crosscoder": "L1", "mean best cosine": 0.99, "bin accuracy": 1.0}], [],
                  offset_steps=0)
    recovered, no_offsets = glance.synthetic_findings(tmp_path / "s")
    assert "0.990 (L1) on average, and 100% (L1)" in recovered.text
    assert "tied-offset experiment did not run (offset_steps = 0)" in no_offsets.text


def test_chat_only_offsets_counts_each_designs_best_latents():
    from crosscoder.synthetic import TIED, VARIED, chat_only_offsets, tied_offset_finding

    rows = _offset_rows(tied_delta=[(0.95, 0.61), (0.52, 0.55)], varied_delta=[(0.97, 0.98), (0.99, 0.88)])
    assert chat_only_offsets(rows, TIED) == (1, 4) and chat_only_offsets(rows, VARIED) == (3, 4)
    assert chat_only_offsets([], TIED) == (0, 0)
    rows = [dict(r, **{"offset latents' base-decoder norm": [0.1, 0.2], "cos(base decoder, base context)": [0.5, 0.6]})
            for r in rows]
    text = tied_offset_finding(rows)
    assert "On varied text tokens, 3 of 4 offset latents are chat-only" in text and "Tied to the one context, 1 of 4" in text


def test_beside_findings_put_two_profiles_side_by_side(tmp_path):
    def diff_metrics(recovered, confirmed, chat_only, n_latents=1):
        return {"heldout": {"l0": 1.0}, "latent_scaling": {"truly chat-specific": confirmed, "chat-only (Δnorm)": chat_only},
                "decisions": {"behaviours": 5, "confirmed: behaviours recovered": recovered,
                              "confirmed: latents": n_latents}}

    _write(tmp_path / "g3", "batchtopk", diff_metrics(3, 7, 12))
    _write(tmp_path / "toy", "batchtopk", diff_metrics(2, 0, 0, n_latents=0))  # no confirmed latent: 0 recovered
    items = glance.beside_findings(tmp_path / "g3", tmp_path / "toy", ["l1", "batchtopk"], "gemma-3-270m", "toy")
    assert [f.text for f in items] == [
        "batchtopk, confirmed chat-specific latents recovering a planted decision at AUROC ≥ 0.9: gemma-3-270m: 3 of 5 "
        "planted decisions (7 confirmed chat-specific latents, 12 chat-only by Δnorm); toy: 0 of 5 planted decisions "
        "(0 confirmed chat-specific latents, 0 chat-only by Δnorm)."]
    missing = glance.beside_findings(tmp_path / "g3", tmp_path / "nothing", ["batchtopk"], "gemma-3-270m", "toy")
    assert len(missing) == 1 and "not in this checkout" in missing[0].text and "nothing/" in missing[0].text


def test_verdict_reads_the_scoreboard_and_says_when_it_did_not_run(tmp_path):
    out = tmp_path / "book" / "_runs" / "at_a_glance"
    none = glance.verdict(tmp_path / "artifacts", out)
    assert none.figure is None and "did not run in this build" in none.text
    board = tmp_path / "artifacts" / "scoreboard"
    board.mkdir(parents=True)
    rows = [{"method": "diff_sae", "n_behaviours": 4}, {"method": "adl", "n_behaviours": 4}]
    (board / "metrics.json").write_text(json.dumps({"rows": rows, "recommendation": "diff_sae recovers all 4.",
                                                    "null_measured": False}))
    v = glance.verdict(tmp_path / "artifacts", out)
    assert v.text == ("2 model-diffing methods, scored against the token-level ground truth of 4 planted decisions on "
                      "held-out conversations: diff_sae recovers all 4. This build fits no null pair (profile full "
                      "does).") and v.figure is None
    fig = tmp_path / "book" / "_runs" / "scoreboard" / "scoreboard.png"  # the scoreboard run's sibling folder
    fig.parent.mkdir(parents=True)
    fig.write_bytes(b"png")
    (board / "metrics.json").write_text(json.dumps({"rows": rows, "recommendation": "x.", "null_measured": True}))
    v = glance.verdict(tmp_path / "artifacts", out)
    assert v.figure == fig and v.text.endswith("x. Their false positives are counted on a null fine-tune, where "
                                               "nothing was planted.")
