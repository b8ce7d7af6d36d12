"""The latent browser at Gemma's dictionary size: page weight and load time in headless Chromium.

A 16,384-latent crosscoder over a tiny Gemma2 pair (random weights; a 16,384-token BPE vocabulary
trained on Zipf-distributed pseudo-words), its browser data written by the real writer
(``browser_payload`` + ``write_browser``) with the default profile's settings: 5 contexts per
latent (10 tokens before, 4 after), 8 promoted tokens per model, chunks of 512 latents, 256
held-out sequences of 128 tokens. The crosscoder is an untrained L1 one, so every latent fires and
every latent has its 5 dense contexts: an upper bound on the chunks of a trained, sparse dictionary.
The index carries the organism's columns (Δnorm, both decoder norms, cosine, density, ν^ε and ν^r
for 5% of the latents, AUROC) and the decision label, with values drawn from plausible ranges.

The page (the browser's fragment, its vendored CSS/JS) is served from a local HTTP server
(127.0.0.1) and opened in headless Chromium with a cold cache, ``reps`` times: bytes are the
response bodies the browser's Resource Timing reports, times the page's own performance marks
("latent-browser-ready": navigation start to the filterable list shown; "latent-browser-shown":
latent picked to its contexts shown, its chunk not loaded before), plus one filter change (AUROC
≥ 0.9, synchronous). Medians over the reps. Without Chromium/Playwright only the data sizes print.
"""

from __future__ import annotations

import gzip
import http.server
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import torch

from bench._timing import main

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "book" / "_vendor" / "latent_browser"


def _chromium() -> str | None:
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        return None
    return exe if exe and Path(exe).is_file() else None


def _pair(vocab: int, n_seq: int, T: int):
    """A tiny random Gemma2 pair on a trained BPE tokenizer, and held-out sequences of Zipf text."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from crosscoder.data.pair import ModelPair
    from crosscoder.organism.tokenizer import train_tokenizer

    rng = random.Random(0)
    syl = [a + b for a in "bcdfghjklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou", "ea")]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(60_000)]
    texts = [" ".join(words[int(len(words) ** rng.random()) - 1] for _ in range(200)) for _ in range(2_000)]
    tok = train_tokenizer(texts, vocab)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(Gemma2ForCausalLM(Gemma2Config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, attn_implementation="eager")).eval().requires_grad_(False))
    ids = torch.tensor([tok(t)["input_ids"][:T] for t in texts[:n_seq]])
    return ModelPair(models[0], models[1], tok, 0, 32), ids, torch.ones_like(ids)


def write_data(folder: Path, n_latents: int, n_seq: int = 256, T: int = 128, vocab: int = 16_384) -> dict:
    """The browser data of a random ``n_latents`` crosscoder written under ``folder``; its sizes and
    the writer's time."""
    from crosscoder.analysis.browser import browser_html, browser_payload, write_browser
    from crosscoder.config import CrosscoderConfig
    from crosscoder.model import Crosscoder

    pair, ids, am = _pair(vocab, n_seq, T)
    torch.manual_seed(0)
    model = Crosscoder(CrosscoderConfig(d_model=32, n_latents=n_latents, n_sources=2, sparsity="l1")).eval()
    g = torch.Generator().manual_seed(0)
    F = n_latents
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(F, generator=g)  # noqa: E731
    sparse = lambda: torch.where(torch.rand(F, generator=g) < 0.05, torch.rand(F, generator=g), float("nan"))  # noqa: E731
    cols = {"Δnorm": u(0, 1), "‖d_base‖": u(0, 2), "‖d_chat‖": u(0, 2), "cosine": u(-1, 1),
            "density": 10 ** u(-5, -1), "ν^ε": sparse(), "ν^r": sparse(), "AUROC": u(0.2, 1)}
    classes = [("chat-only", "base-only", "shared", "other", "dead")[i]
               for i in torch.randint(0, 5, (F,), generator=g).tolist()]
    labels = {"decision": (["refusal", "answer", "signoff", "end_of_turn"], torch.randint(0, 4, (F,), generator=g))}
    t0 = time.perf_counter()
    index, chunks = browser_payload(model, pair, ids, am, classes, cols, labels_F=labels, title=f"bench/{F}")
    sizes = write_browser(folder / "data", "bench", index, chunks)
    writer_s = time.perf_counter() - t0
    for f in ("latent_browser.css", "latent_browser.js"):
        shutil.copy2(STATIC / f, folder / f)
    (folder / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>bench</title><link rel='icon' href='data:,'></head><body>"
        f"{browser_html('bench', 'data/', '')}</body></html>", encoding="utf-8")
    chunk_sizes = [v for k, v in sizes.items() if k != "index.js"]
    return {"n_latents": F, "writer_s": writer_s, "index_bytes": sizes["index.js"],
            "index_gzip_bytes": len(gzip.compress((folder / "data" / "index.js").read_bytes())),
            "n_chunks": len(chunk_sizes), "chunk_bytes_mean": statistics.mean(chunk_sizes),
            "chunk_bytes_max": max(chunk_sizes),
            "chunk_gzip_bytes_max": max(len(gzip.compress(p.read_bytes())) for p in (folder / "data").glob("chunk-*"))}


_SELECT_JS = """
async (j) => {
  performance.clearMarks("latent-browser-shown");
  const before = performance.getEntriesByType("resource").length;
  const shown = new Promise(r => new PerformanceObserver((list, obs) => {
    if (list.getEntriesByName("latent-browser-shown").length) { obs.disconnect(); r(); } }).observe({type: "mark"}));
  const t0 = performance.now();
  const pick = document.querySelector(".lb-pick");
  pick.value = String(j); pick.dispatchEvent(new Event("change"));
  await shown;
  const ms = performance.getEntriesByName("latent-browser-shown")[0].startTime - t0;
  const bytes = performance.getEntriesByType("resource").slice(before).reduce((s, e) => s + e.encodedBodySize, 0);
  return {ms, bytes, contexts: document.querySelectorAll(".lb-context").length};
}
"""

_LOAD_JS = """
() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const res = performance.getEntriesByType("resource");
  return {ready_ms: performance.getEntriesByName("latent-browser-ready")[0].startTime,
          load_ms: nav.loadEventEnd, bytes: nav.encodedBodySize + res.reduce((s, e) => s + e.encodedBodySize, 0),
          files: 1 + res.length, rows: document.querySelectorAll("tr.lb-row").length};
}
"""

_FILTER_JS = """
() => {
  const inp = document.querySelector("input.lb-min[data-col='AUROC']");
  const t0 = performance.now();
  inp.value = "0.9"; inp.dispatchEvent(new Event("input"));
  return {ms: performance.now() - t0, count: document.querySelector(".lb-count").textContent};
}
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def measure_page(folder: Path, chromium: str, reps: int) -> dict:
    """Cold-cache loads of ``folder/index.html`` over local HTTP: medians of the page's figures."""
    from playwright.sync_api import sync_playwright

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    runs = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
            try:
                for _ in range(reps):
                    ctx = browser.new_context()  # a fresh profile: nothing cached
                    page = ctx.new_page()
                    errors = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.goto(url, wait_until="load")
                    page.wait_for_function("performance.getEntriesByName('latent-browser-ready').length > 0")
                    load = page.evaluate(_LOAD_JS)
                    n = page.evaluate("window.LATENT_BROWSER.bench.n_latents")
                    first = page.evaluate(_SELECT_JS, n - 1)       # last chunk: loaded now
                    second = page.evaluate(_SELECT_JS, 0)          # the first chunk
                    again = page.evaluate(_SELECT_JS, n - 2)       # the last chunk again: cached
                    filt = page.evaluate(_FILTER_JS)
                    if errors or min(first["contexts"], second["contexts"]) == 0:
                        raise RuntimeError(f"the page failed: {errors or 'no contexts shown'}")
                    runs.append({"load": load, "first": first, "second": second, "again": again, "filter": filt})
                    ctx.close()
            finally:
                browser.close()
    finally:
        server.shutdown()
    med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
    return {"reps": reps, "first_load_bytes": med(lambda r: r["load"]["bytes"]), "first_load_files": runs[0]["load"]["files"],
            "ready_ms": med(lambda r: r["load"]["ready_ms"]), "load_event_ms": med(lambda r: r["load"]["load_ms"]),
            "select_bytes": med(lambda r: r["first"]["bytes"]), "select_ms": med(lambda r: r["first"]["ms"]),
            "select2_ms": med(lambda r: r["second"]["ms"]), "select_cached_ms": med(lambda r: r["again"]["ms"]),
            "select_cached_bytes": med(lambda r: r["again"]["bytes"]),
            "filter_ms": med(lambda r: r["filter"]["ms"]), "filter_count": runs[0]["filter"]["count"],
            "rows": runs[0]["load"]["rows"]}


def run(quick: bool = False) -> list[dict]:
    n_latents, reps = (1024, 1) if quick else (16_384, 5)
    chromium = _chromium()
    with tempfile.TemporaryDirectory(prefix="bench_browser_") as tmp:
        row = write_data(Path(tmp), n_latents, n_seq=32 if quick else 256, vocab=2048 if quick else 16_384)
        if chromium is None:
            row["note"] = "no headless Chromium / playwright: page not measured"
        else:
            row.update(measure_page(Path(tmp), chromium, reps))
    return [row]


def format_rows(rows: list[dict]) -> str:
    out = []
    for r in rows:
        out.append(f"latent browser, {r['n_latents']:,} latents (writer {r['writer_s']:.1f} s)")
        out.append(f"  index.js           {r['index_bytes'] / 1e3:>9,.0f} kB  (gzip {r['index_gzip_bytes'] / 1e3:,.0f} kB)")
        out.append(f"  chunks             {r['n_chunks']:>9} x {r['chunk_bytes_mean'] / 1e3:,.0f} kB mean, "
                   f"{r['chunk_bytes_max'] / 1e3:,.0f} kB max (gzip {r['chunk_gzip_bytes_max'] / 1e3:,.0f} kB)")
        if "note" in r:
            out.append(f"  {r['note']}")
            continue
        out.append(f"  headless Chromium, local HTTP, cold cache, median of {r['reps']}:")
        out.append(f"  first load         {r['first_load_bytes'] / 1e3:>9,.0f} kB in {r['first_load_files']} files; "
                   f"list shown at {r['ready_ms']:,.0f} ms (load event {r['load_event_ms']:,.0f} ms), {r['rows']} rows")
        out.append(f"  select a latent    {r['select_bytes'] / 1e3:>9,.0f} kB more; contexts shown after "
                   f"{r['select_ms']:,.0f} ms (another chunk {r['select2_ms']:,.0f} ms; same chunk again "
                   f"{r['select_cached_ms']:,.0f} ms, {r['select_cached_bytes'] / 1e3:,.0f} kB)")
        out.append(f"  filter AUROC>=0.9  {r['filter_ms']:>9,.1f} ms ({r['filter_count']})")
    return "\n".join(out)


if __name__ == "__main__":
    main(run, format_rows, __doc__)
