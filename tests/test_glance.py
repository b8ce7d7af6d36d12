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
                  "reappear": [{"reappear": 3}, {"reappear": 4}]}})
    _write(tmp_path, "batchtopk", {"heldout": {"l0": 32.3, "fvu_base": 0.057, "fvu_chat": 0.072},
                                   "latent_scaling": {"chat-only (Δnorm)": 0, "fitted": 0, "truly chat-specific": 0},
                                   "decisions": {"behaviours": 4, "confirmed: latents": 0, "any live: behaviours recovered": 4}})
    items = glance.findings(tmp_path, ["l1", "batchtopk", "not_trained"])
    text = " ".join(f.text for f in items)
    for piece in ("L0 34.2", "0.121 (base) / 0.148 (chat)", "111 latents chat-only", "confirms 21", "81%",
                  "recover 2 of the 4", "71% of the confirmed", "is 36/36, and 7/36", "random live latents removed: 35/36",
                  "9 latents are chat-only", "17–21 confirmed", "recovering 1–2 decisions", "3–4 of each seed's",
                  "batchtopk: L0 32.3", "batchtopk: 0 latents chat-only by decoder norm (Δnorm > 0.9).",
                  "batchtopk: no confirmed chat-specific latent; its live latents recover 4 of the 4"):
        assert piece in text, piece
    assert {f.page for f in items} == {"train_l1", "model_diff", "controls", "train_batchtopk"}
    assert not any("not_trained" in f.text for f in items)
    html = glance.findings_html(items)
    assert html.count("<li>") == len(items) and 'href="model_diff.html"' in html
    assert "No run" in glance.findings_html([])
