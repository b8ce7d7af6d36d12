"""Top-activating contexts and their HTML."""

from __future__ import annotations

import torch

from crosscoder.analysis.latents import context_html, latent_card_html, top_contexts


def test_top_contexts_matches_naive_sort():
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(20, 7, 3, generator=g))
    tc = top_contexts(acts, k=4, one_per_sequence=False)
    for j in range(3):
        flat = sorted(((float(acts[n, t, j]), n, t) for n in range(20) for t in range(7)), reverse=True)[:4]
        assert [v for v, _, _ in flat] == tc.vals_JK[j].tolist()
        assert [(n, t) for _, n, t in flat] == list(zip(tc.rows_JK[j].tolist(), tc.pos_JK[j].tolist()))
    tc1 = top_contexts(acts, k=5)
    for j in range(3):
        assert len(set(tc1.rows_JK[j].tolist())) == 5  # five different sequences
        best = sorted(((float(acts[n, :, j].max()), n) for n in range(20)), reverse=True)[:5]
        assert [n for _, n in best] == tc1.rows_JK[j].tolist()


def test_context_html_escapes_and_shades():
    toks = ["<b>", "a", "&", "\n", "z"]
    out = context_html(toks, [0, 1, 2, 0, 0], centre=2, window=4)
    assert "&lt;b&gt;" in out and "&amp;" in out and "⏎" in out and "<b><span" in out
    assert "rgba(230,120,0,1.00)" in out and "rgba(230,120,0,0.50)" in out
    card = latent_card_html("latent 7 <chat-only>", {"density": "0.1%"}, {"chat": ["<x>"]}, [out])
    assert "latent 7 &lt;chat-only&gt;" in card and "<code>&lt;x&gt;</code>" in card
