"""The latent browser's data: streaming top contexts equal the naive [N, T, F] reference, batched
promoted tokens equal the one-by-one reading, planted latents get their decision AUROC, and the
written files round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from crosscoder.analysis.browser import (ACT_LEVELS, best_decisions, browser_payload, promoted_token_ids, top_windows,
                                         write_browser)
from crosscoder.analysis.latents import latent_acts, promoted_tokens, top_contexts
from crosscoder.analysis.probes import ProbeTask
from crosscoder.config import CrosscoderConfig
from crosscoder.data.pair import extract_pair
from crosscoder.model import Crosscoder
from fakes import padded_ids, tiny_pair


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pair = tiny_pair(tmp_path_factory.mktemp("browser"))
    torch.manual_seed(0)
    model = Crosscoder(CrosscoderConfig(d_model=32, n_latents=24, n_sources=2, sparsity="batchtopk", k=6)).eval()
    ids, am = padded_ids(pair.tokenizer)
    return pair, model, ids, am


def _per_token(model: Crosscoder, threshold: float = 0.05) -> Crosscoder:
    """A copy with an inference threshold: its activations of a token do not depend on the rest of
    the batch (BatchTopK without one does), so differently batched passes can be compared."""
    import copy

    out = copy.deepcopy(model).eval()
    out.threshold.fill_(threshold)
    return out


def _cached_rows(pair, ids, am, dtype=torch.float32, seed=0):
    """What an activation cache holds for these sequences: the body tokens' activations, in a
    shuffled row order (readers must not rely on it)."""
    from crosscoder.analysis.latents import TokenRows

    acts = extract_pair(pair, ids, am).float()
    body = am.bool().clone()
    body[:, 0] = False
    seq, pos = body.nonzero(as_tuple=True)
    perm = torch.randperm(len(seq), generator=torch.Generator().manual_seed(seed))
    return TokenRows(acts[seq, pos][perm].to(dtype), seq[perm], pos[perm])


def test_top_windows_equal_naive_reference(setup):
    pair, model, ids, am = setup
    model = _per_token(model)  # latent_acts batches by length, top_windows in row order
    tw = top_windows(model, pair, ids, am, k=4, before=3, after=2, batch=3)
    f_NTF = latent_acts(model, pair, ids, am, batch=3)
    tc = top_contexts(f_NTF, k=4)
    fired = tw.vals_FK > 0
    assert fired.any()
    torch.testing.assert_close(tw.vals_FK, tc.vals_JK)
    assert (tw.rows_FK[fired] == tc.rows_JK[fired]).all() and (tw.pos_FK[fired] == tc.pos_JK[fired]).all()
    assert (tw.rows_FK[~fired] == -1).all()
    for j, kk in fired.nonzero().tolist():
        r, p = int(tw.rows_FK[j, kk]), int(tw.pos_FK[j, kk])
        want = torch.stack([f_NTF[r, t, j] if 0 <= t < ids.shape[1] else torch.tensor(0.0) for t in range(p - 3, p + 3)])
        torch.testing.assert_close(tw.acts_FKW[j, kk], want)


def test_latent_acts_of_several_crosscoders_equal_one_at_a_time(setup):
    """One pass of the language models serves two crosscoders (e.g. two seeds) exactly as two passes do."""
    from crosscoder.analysis.latents import latent_acts_many

    pair, model, ids, am = setup
    torch.manual_seed(1)
    other = Crosscoder(CrosscoderConfig(d_model=32, n_latents=16, n_sources=2, sparsity="l1")).eval()
    picked = [3, 0, 7]
    got = latent_acts_many([model, other], pair, ids, am, [None, picked], batch=4)
    torch.testing.assert_close(got[0], latent_acts(model, pair, ids, am, batch=4), rtol=0, atol=0)
    torch.testing.assert_close(got[1], latent_acts(other, pair, ids, am, picked, batch=4), rtol=0, atol=0)
    assert got[1].shape == (*ids.shape, 3) and bool((got[1] > 0).any())


def test_length_batches_equal_one_full_width_batch(setup):
    """Sequences run in length-sorted batches cut at their longest one give the activations of one
    full-width batch of every sequence (0 on BOS and padding), in the callers' row order."""
    from crosscoder.analysis.latents import latent_acts_many
    from crosscoder.data.sequence_acts import length_batches

    pair, model, ids, am = setup
    am = am.clone()
    am[7, 4:], am[9, 8:] = 0, 0  # three lengths
    model = _per_token(model)
    x = extract_pair(pair, ids, am).float()
    body = am.bool().clone()
    body[:, 0] = False
    want = model.encode(model.normalise(x.reshape(-1, *x.shape[2:]))).view(*ids.shape, -1) * body[..., None]
    got = latent_acts_many([model], pair, ids, am, [None], batch=4)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    batches = length_batches(am, 4)
    assert [(r.tolist(), L) for r, L in batches] == [([0, 1, 2, 4], 9), ([5, 6, 8, 10], 9), ([9, 3, 7], 8)]
    with pytest.raises(ValueError, match="right-padded"):
        latent_acts_many([model], pair, ids, am.flip(1), [None])


def test_cached_rows_give_the_language_models_activations(setup):
    """Held-out latent activations and top windows read from cached activations equal those of a
    fresh pass of the language models (exactly with a float32 cache; to float16 precision with the
    cache's usual dtype), and the browser's contexts are the same."""
    from crosscoder.analysis.latents import latent_acts_from_rows, latent_acts_many

    pair, model, ids, am = setup
    model = _per_token(model)
    torch.manual_seed(1)
    other = Crosscoder(CrosscoderConfig(d_model=32, n_latents=16, n_sources=2, sparsity="l1")).eval()
    rows = _cached_rows(pair, ids, am)
    want = latent_acts_many([model, other], pair, ids, am, [None, [3, 0, 7]])
    got = latent_acts_from_rows([model, other], rows, tuple(ids.shape), [None, [3, 0, 7]], chunk=10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    lm_tw = top_windows(model, pair, ids, am, k=3, before=3, after=2, batch=3)
    for cached in (rows, _cached_rows(pair, ids, am, torch.float16, seed=1)):
        tw = top_windows(model, None, ids, am, k=3, before=3, after=2, batch=3, rows=cached)
        tol = 1e-5 if cached.acts_RSD.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(tw.vals_FK, lm_tw.vals_FK, atol=tol, rtol=tol)
        torch.testing.assert_close(tw.acts_FKW, lm_tw.acts_FKW, atol=tol, rtol=tol)
        if cached is rows:
            assert torch.equal(tw.rows_FK, lm_tw.rows_FK) and torch.equal(tw.pos_FK, lm_tw.pos_FK)
    classes, cols = ["shared"] * 24, {"Δnorm": torch.linspace(0, 1, 24)}
    kw = dict(n_contexts=3, before=3, after=2, chunk_size=10)
    assert browser_payload(model, pair, ids, am, classes, cols, rows=rows, **kw) == \
        browser_payload(model, pair, ids, am, classes, cols, **kw)


def test_promoted_token_ids_equal_one_by_one(setup):
    pair, model, _, _ = setup
    for s, lm in enumerate(pair.models):
        got = promoted_token_ids(lm, model.W_dec_FSD[:, s].detach(), k=5, chunk=7)
        for j in (0, 5, 23):
            want = promoted_tokens(lm, model.W_dec_FSD[j, s].detach(), pair.tokenizer, k=5)
            assert [pair.tokenizer.decode([t]) for t in got[j].tolist()] == want


def test_payload_and_files_round_trip(setup, tmp_path):
    pair, model, ids, am = setup
    classes = ["chat-only", "shared", "dead"] * 8
    cols = {"Δnorm": torch.linspace(0, 1, 24), "ν^ε": torch.full((24,), float("nan")),
            "density": torch.linspace(0, 1, 24) * 3.14159e-5}
    index, chunks = browser_payload(model, pair, ids, am, classes, cols, n_contexts=3, before=3, after=2,
                                    chunk_size=10, title="t")
    assert index["n_chunks"] == 3 and len(chunks) == 3 and index["classes"] == ["chat-only", "shared", "dead"]
    assert [index["classes"][c] for c in index["class"]] == classes
    assert index["columns"]["ν^ε"] == [None] * 24 and index["columns"]["Δnorm"][-1] == 1.0
    assert index["columns"]["density"][-1] == 3.142e-5  # 4 significant digits, not decimals
    tw = top_windows(model, pair, ids, am, k=3, before=3, after=2)
    j = int(tw.vals_FK[:, 0].argmax())
    ch = chunks[j // 10]
    ctx = ch["latents"][j]["ctx"][0]
    r, p = int(tw.rows_FK[j, 0]), int(tw.pos_FK[j, 0])
    lo = max(1, p - 3)
    assert [ch["tokens"][t] for t in ctx["t"]] == [pair.tokenizer.convert_tokens_to_string([x]) for x in
                                                   pair.tokenizer.convert_ids_to_tokens(ids[r, lo: min(9, p + 3)].tolist())]
    assert ctx["a"][ctx["c"]] == ACT_LEVELS and max(ctx["a"]) == ACT_LEVELS and ctx["seq"] == r
    assert len(ch["latents"][j]["prom"]["chat"]) == 8
    sizes = write_browser(tmp_path / "b", "run/x", index, chunks)
    assert set(sizes) == {"index.js", "chunk-0000.js", "chunk-0001.js", "chunk-0002.js"}
    text = (tmp_path / "b" / "index.js").read_text()
    assert json.loads(text.split("] = ", 1)[1].rstrip(";\n")) == json.loads(json.dumps(index))
    chunk = (tmp_path / "b" / "chunk-0001.js").read_text()
    assert chunk.startswith('latentBrowserChunk("run/x", ')
    assert not list((tmp_path / "b").glob("*.tmp"))


def test_best_decisions_of_planted_latents():
    """Four scored latents of seven, two decision tasks on their own positions (columns 1 and 3 of
    six sequences) and a third task with no positive (not scorable): each latent gets its best
    AUROC over the scorable tasks and that task's index; unscored latents get NaN / -1."""
    N, T = 6, 5
    col = torch.zeros(N, T, dtype=torch.bool)
    a_elig, b_elig, c_elig = col.clone(), col.clone(), col.clone()
    a_elig[:, 1], b_elig[:, 3], c_elig[:, 4] = True, True, True
    a_lab, b_lab = a_elig & (torch.arange(N) < 3)[:, None], b_elig & (torch.arange(N) >= 3)[:, None]
    tasks = {"a": ProbeTask(a_lab, a_elig), "b": ProbeTask(b_lab, b_elig), "c": ProbeTask(col.clone(), c_elig)}
    f = torch.zeros(N, T, 4)
    f[..., 0] = a_lab.float()                  # fires exactly on a's decisions: AUROC 1 for a
    f[..., 1] = b_lab.float() * 3              # b's decisions: AUROC 1 for b
    f[..., 2] = (a_elig & ~a_lab).float()      # fires on a's *other* positions: a 0, b 0.5 -> b, 0.5
    f[[0, 1], 1, 3], f[3, 1, 3] = 1.0, 2.0     # a: 5 of 9 pairs ordered (ties half) -> 5/9
    best = best_decisions(f, tasks, torch.tensor([0, 2, 3, 5]), n_latents=7)
    torch.testing.assert_close(best.auroc_F[[0, 2, 3, 5]], torch.tensor([1.0, 1.0, 0.5, 5 / 9]))
    assert best.decision_F.tolist() == [0, -1, 1, 1, -1, 0, -1]
    assert best.auroc_F[[1, 4, 6]].isnan().all()
    none = best_decisions(torch.zeros(N, T, 0), tasks, torch.zeros(0, dtype=torch.long), n_latents=3)
    assert none.auroc_F.isnan().all() and none.decision_F.tolist() == [-1, -1, -1]


def test_payload_labels_and_bad_columns(setup):
    """The decision label reaches the index as names + one index per latent (-1: none); the AUROC
    column keeps None where a latent was not scored; a label or column of the wrong size fails
    before any work, naming it."""
    pair, model, ids, am = setup
    classes = ["shared"] * 24
    auc = torch.full((24,), float("nan"))
    auc[[2, 5]] = torch.tensor([0.91234, 0.5])
    which = torch.full((24,), -1)
    which[[2, 5]] = torch.tensor([1, 0])
    index, _ = browser_payload(model, pair, ids, am, classes, {"AUROC": auc},
                               labels_F={"decision": (["refusal", "signoff"], which)}, n_contexts=1, chunk_size=24)
    assert index["labels"] == {"decision": {"names": ["refusal", "signoff"], "of": which.tolist()}}
    assert index["columns"]["AUROC"][2] == pytest.approx(0.9123, abs=1e-4) and index["columns"]["AUROC"][0] is None
    plain, _ = browser_payload(model, pair, ids, am, classes, {"Δnorm": torch.zeros(24)}, n_contexts=1, chunk_size=24)
    assert plain["labels"] == {} and "AUROC" not in plain["columns"]
    with pytest.raises(ValueError, match="label 'decision' needs one index in -1..1"):
        browser_payload(model, pair, ids, am, classes, {}, labels_F={"decision": (["a", "b"], which + 1)})
    with pytest.raises(ValueError, match="column 'AUROC' has shape \\(23,\\)"):
        browser_payload(model, pair, ids, am, classes, {"AUROC": auc[:23]})


@pytest.mark.browser
def test_page_has_an_auroc_filter_only_with_ground_truth(setup, tmp_path):
    """The vendored page on the writer's data, in headless Chromium: a hub pair's data (no decision
    labels) gives no AUROC filter and no decision column; an organism's gives both, and the AUROC
    bound lists exactly the latents at or above it."""
    import shutil

    from test_book import CHROMIUM, CHROMIUM_ARGS, ROOT, _need_browser

    from crosscoder.analysis.browser import browser_html

    _need_browser()
    from playwright.sync_api import sync_playwright

    pair, model, ids, am = setup
    auc = torch.linspace(0.3, 1.0, 24)
    variants = {"hub": ({"Δnorm": torch.linspace(0, 1, 24)}, {}),
                "organism": ({"Δnorm": torch.linspace(0, 1, 24), "AUROC": auc},
                             {"decision": (["refusal", "signoff"], torch.arange(24) % 2)})}
    indexes = {}
    for name, (cols, labels) in variants.items():
        indexes[name], chunks = browser_payload(model, pair, ids, am, ["shared"] * 24, cols, labels_F=labels, n_contexts=2,
                                        chunk_size=10)
        write_browser(tmp_path / name / "data", name, indexes[name], chunks)
        shutil.copytree(ROOT / "book" / "_vendor" / "latent_browser", tmp_path / name / "static")
        (tmp_path / name / "page.html").write_text(
            f"<!doctype html><meta charset='utf-8'><body>{browser_html(name, 'data/', 'static/')}</body>", encoding="utf-8")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            seen = {}
            for name in variants:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.goto((tmp_path / name / "page.html").as_uri(), wait_until="load")
                page.wait_for_selector("tr.lb-row")
                seen[name] = {"auroc inputs": page.locator("input[data-col='AUROC']").count(),
                              "label selects": page.locator("select.lb-label").count(),
                              "headers": page.eval_on_selector_all("th", "ths => ths.map(t => t.textContent)")}
                if name == "organism":
                    page.fill("input.lb-min[data-col='AUROC']", "0.8")
                    want = sum(v >= 0.8 for v in indexes[name]["columns"]["AUROC"])
                    assert page.inner_text(".lb-count").startswith(f"{want} of 24 latents match")
                    page.fill("input.lb-pick", "23")
                    page.dispatch_event("input.lb-pick", "change")
                    assert page.inner_text(".lb-detail h4").startswith("latent 23 · shared")
                    assert "decision signoff" in page.inner_text(".lb-facts")
                page.close()
                assert errors == [], errors
        finally:
            browser.close()
    assert seen["hub"] == {"auroc inputs": 0, "label selects": 0, "headers": ["latent", "class", "Δnorm"]}
    assert seen["organism"] == {"auroc inputs": 2, "label selects": 1,
                                "headers": ["latent", "class", "decision", "Δnorm", "AUROC"]}


def test_families_hand_back_the_activations_of_clustered_latents(setup):
    """The latents page's cards read their latents' held-out activations from the families'
    clustering pass (``families.clustered_acts``): those of a fresh ``latent_acts`` pass."""
    from crosscoder.analysis import families
    from crosscoder.data.text import Sequences

    pair, model, ids, am = setup
    model = _per_token(model, 0.0)
    held = Sequences(ids, am, torch.zeros(len(ids), dtype=torch.bool))
    alive = latent_acts(model, pair, ids, am).amax(dim=(0, 1)) > 0
    fam = families.find_families(model, None, pair, held, alive, None, ks=(2, 3), n_boot=2)
    live = torch.nonzero(alive).squeeze(1).tolist()
    picked = [live[-1], live[0], live[2]]
    torch.testing.assert_close(families.clustered_acts(fam, picked), latent_acts(model, pair, ids, am, picked))
    dead = [j for j in range(model.cfg.n_latents) if j not in live]
    if dead:
        with pytest.raises(ValueError, match="not clustered"):
            families.clustered_acts(fam, dead[:1])
