"""The book: a smoke-profile build with warnings as errors, checked page by page in headless
Chromium.

The smoke build runs in a temporary copy of the project (runs.yaml, _config.yml, notebooks/, book/)
so it never touches the real book/_runs/ a developer is building, and is shared by all tests here
through a session-scoped fixture. Its organisms come prebuilt from the session's (tests/conftest.py),
which test_organism checks. The browser check is itself tested on a small book with planted
defects (missing image, broken link, broken anchor, notebook error cell) rendered by the same
toolchain.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import NamedTuple

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = (os.environ.get("CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))
if CHROMIUM and not Path(CHROMIUM).is_file():
    CHROMIUM = None
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# How myst-nb marks a notebook error: an error output becomes `.output.traceback`; papermill's
# banner above a failed cell carries the tag papermill-error-cell-tag (myst-nb adds tag_<tag>).
ERROR_SELECTORS = ".output.traceback, .output.error, .tag_papermill-error-cell-tag"
# Console errors the toolchain itself logs on every page of any Jupyter Book 1 build, including a
# two-page book with no content of ours (see the planted-defects test): sphinx-thebe's script
# declares THEBE_JS_URL twice, and pydata-sphinx-theme reports an unset theme mode under file://.
# Both are harmless; every other console error is a problem.
TOOLCHAIN_CONSOLE_NOISE = re.compile(r"Identifier 'THEBE_JS_URL' has already been declared|Got invalid theme mode")
# Sphinx's generated pages have no content of ours; every other page is checked.
SKIP_PAGES = {"genindex.html", "search.html"}


def _build_cmd(book: Path, config: Path, strict: bool = True) -> list[str]:
    cmd = [str(BIN / "jupyter-book"), "build", str(book), "--config", str(config)]
    return cmd + (["--warningiserror", "--keep-going"] if strict else [])


def _run(cmd: list[str], cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _copy_project(dest: Path) -> Path:
    """The files `make book` reads, minus build outputs; lib is linked (its hash feeds run keys).
    The vendored MathJax is fetched first where `make` has not (pytest run directly)."""
    from report.vendor import vendor_mathjax

    vendor_mathjax(ROOT / "book" / "_vendor")
    for name in ("runs.yaml", "_config.yml"):
        shutil.copy2(ROOT / name, dest / name)
    # latent_browser_data: the browser's data before it moved beside its run (a stale local folder)
    ignore = shutil.ignore_patterns("_build", "_runs", ".ipynb_checkpoints", "figures", "latent_browser_data")
    shutil.copytree(ROOT / "notebooks", dest / "notebooks", ignore=ignore)
    shutil.copytree(ROOT / "book", dest / "book", ignore=ignore)
    (dest / "lib").symlink_to(ROOT / "lib", target_is_directory=True)
    return dest


def _text(html_page: Path) -> str:
    """The page's text with tags removed (Sphinx splits inline code into one span per word)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html_page.read_text(encoding="utf-8")))


def _html_dir(project: Path) -> Path:
    # jupyter-book writes _build/ next to the _config.yml it finds (the project root here).
    for cand in (project / "_build" / "html", project / "book" / "_build" / "html"):
        if (cand / "index.html").is_file():
            return cand
    raise AssertionError(f"no built HTML under {project}")


class SmokeBook(NamedTuple):
    project: Path
    html: Path
    runs_log: str


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory, smoke_organism, smoke_null_organism) -> SmokeBook:
    project = _copy_project(tmp_path_factory.mktemp("smoke_book"))
    # The smoke profile's two organisms (smoke, and smoke_null for the controls) are the session's
    # (tests/conftest.py; test_organism checks them): their folders are keyed by config hash and a
    # build is deterministic, so the runs find them as a second `make book` would instead of
    # building them again. The notebooks still resolve and load them through the same code.
    for organism in (smoke_organism[2], smoke_null_organism):
        shutil.copytree(organism.root, project / "cache" / "organism" / organism.root.name)
    runs = _run([sys.executable, "-m", "report", "--profile", "smoke"], cwd=project)
    assert runs.returncode == 0, f"smoke runs failed:\n{runs.stdout}\n{runs.stderr}"
    build = _run(_build_cmd(project / "book", project / "_config.yml"), cwd=project)
    assert build.returncode == 0, f"book build failed (-W):\n{build.stdout[-4000:]}\n{build.stderr}"
    return SmokeBook(project, _html_dir(project), runs.stdout)


# ----------------------------------------------------------------------------------------------
# The browser check
# ----------------------------------------------------------------------------------------------

_PAGE_JS = """
async (errorSelectors) => {
  // Math is typeset asynchronously after load: wait for MathJax where the page loads it.
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const imgs = Array.from(document.images);
  // Lazy images below the fold would never load in a headless viewport; load them all.
  imgs.forEach(i => { i.loading = "eager"; });
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => {
    i.addEventListener("load", r); i.addEventListener("error", r); })));
  return {
    images: imgs.map(i => ({src: i.getAttribute("src"), url: i.currentSrc || i.src,
                           ok: i.complete && i.naturalWidth > 0})),
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    ids: Array.from(document.querySelectorAll("[id]")).map(e => e.id)
           .concat(Array.from(document.querySelectorAll("a[name]")).map(a => a.name)),
    errors: Array.from(document.querySelectorAll(errorSelectors))
           .map(e => e.innerText.trim().split("\\n")[0].slice(0, 160)),
    // Sphinx wraps each formula in .math; MathJax puts an mjx-container inside once it rendered it
    math: document.querySelectorAll(".math").length,
    untypeset: Array.from(document.querySelectorAll(".math")).filter(e => !e.querySelector("mjx-container"))
           .map(e => e.textContent.trim().slice(0, 60)),
    mathErrors: document.querySelectorAll("mjx-merror").length,
  };
}
"""


_REFRESH_RE = re.compile(r"""<meta[^>]+http-equiv=["']refresh["'][^>]+url=([^"'>\s]+)""", re.I)


def _local_path(url: str) -> tuple[Path, str] | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file":
        return None  # external links cannot be checked offline
    return Path(urllib.parse.unquote(parts.path)), parts.fragment


def _outside(url: str, html_dir: Path) -> bool:
    """Whether a request leaves the book's folder (any network request, or a file outside it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return False
    if parts.scheme != "file":
        return True
    path = Path(urllib.parse.unquote(parts.path)).resolve()
    return not path.is_relative_to(html_dir.resolve())


def check_site(html_dir: Path, screenshot_dir: Path) -> list[str]:
    """Open every page of a built book in headless Chromium, screenshot its viewport, and return one line per
    missing image, broken internal link or anchor, failed local resource, notebook error cell,
    request leaving the book's folder (CDN script, web font, file outside the build: all blocked),
    console error, or formula MathJax did not render."""
    from playwright.sync_api import sync_playwright

    pages = sorted(p for p in html_dir.rglob("*.html")
                   if not {"_static", "_sources", "_downloads"} & set(p.relative_to(html_dir).parts)
                   and p.name not in SKIP_PAGES)
    problems: list[str] = []
    ids: dict[Path, set[str]] = {}
    links: list[tuple[str, str]] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            failed: list[str] = []
            outside: list[str] = []
            console: list[str] = []

            def route(r):  # every request passes here; the ones leaving the book are refused
                if _outside(r.request.url, html_dir):
                    outside.append(r.request.url)
                    return r.abort()
                return r.continue_()

            page.route("**/*", route)
            page.on("requestfailed", lambda r: failed.append(r.url) if r.url.startswith("file:")
                    and r.url not in outside else None)
            def log(text: str) -> None:
                if not TOOLCHAIN_CONSOLE_NOISE.search(text):
                    console.append(text[:160])

            page.on("console", lambda m: log(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: log(f"uncaught {e}"))
            for path in pages:
                rel = path.relative_to(html_dir).as_posix()
                redirect = _REFRESH_RE.search(path.read_text(encoding="utf-8"))
                if redirect:  # e.g. the index.html jupyter-book writes: only its target matters
                    links.append((rel, urllib.parse.urljoin(path.as_uri(), redirect.group(1))))
                    continue
                failed.clear()
                outside.clear()
                console.clear()
                page.goto(path.as_uri(), wait_until="load")
                info = page.evaluate(_PAGE_JS, ERROR_SELECTORS)
                shot = screenshot_dir / f"{rel}.png"
                shot.parent.mkdir(parents=True, exist_ok=True)
                # the viewport, not the full page: the checks above read the whole page's DOM, and a
                # full-page capture of the long pages took ~40% of the browser check (18 s vs 11 s)
                page.screenshot(path=str(shot))
                ids[path.resolve()] = set(info["ids"])
                problems += [f"{rel}: image not loaded: {im['src']}" for im in info["images"]
                             if not im["ok"]]
                problems += [f"{rel}: notebook error cell: {e}" for e in info["errors"]]
                image_urls = {im["url"] for im in info["images"]}  # reported above already
                problems += [f"{rel}: local resource failed to load: {u}" for u in failed
                             if u not in image_urls]
                problems += [f"{rel}: request outside the book's folder: {u}" for u in dict.fromkeys(outside)]
                # a failed or blocked load logs its own console error; it is reported above already
                problems += [f"{rel}: console error: {c}" for c in console
                             if not c.startswith("Failed to load resource")]
                problems += [f"{rel}: formula not rendered by MathJax: {t}" for t in info["untypeset"]]
                if info["mathErrors"]:
                    problems.append(f"{rel}: {info['mathErrors']} MathJax error(s)")
                links += [(rel, href) for href in info["links"]]
        finally:
            browser.close()
    for rel, href in links:
        local = _local_path(href)
        if local is None:
            continue
        target, fragment = local
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            problems.append(f"{rel}: broken link to {href}")
        elif fragment and target.suffix == ".html":
            known = ids.get(target.resolve())
            if known is not None and fragment not in known:
                problems.append(f"{rel}: link to missing anchor #{fragment} in {target.name}")
    return problems


def _need_browser() -> None:
    """Skip the browser checks where Chromium or Playwright is missing, except under CI
    (CI=true), where a missing browser must fail the run rather than silently drop the check."""
    under_ci = os.environ.get("CI", "").lower() == "true"
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing = "python package playwright is not installed (pip install playwright)"
    else:
        missing = "" if CHROMIUM else "headless Chromium not found (Debian: apt-get install chromium)"
    if missing:
        if under_ci:
            pytest.fail(f"CI=true but {missing}: the browser checks of the book cannot run")
        pytest.skip(missing)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_smoke_book_renders_every_run_with_its_profile(smoke_book):
    import yaml

    config = yaml.safe_load((ROOT / "runs.yaml").read_text())
    for run in config["runs"]:
        page = smoke_book.html / "_runs" / f"{run['name']}.html"
        assert page.is_file(), f"run {run['name']} has no page in the built book"
        nb = nbformat.read(smoke_book.project / "book" / "_runs" / f"{run['name']}.ipynb", 4)
        assert nb.metadata["crosscoder_run"]["profile"] == "smoke"
        assert "Executed by python -m report --profile smoke" in _text(page)
    repro = json.loads((smoke_book.project / "book" / "_runs" / "reproducibility.json").read_text())
    assert repro["profile"] == "smoke"
    assert {r["name"] for r in repro["runs"]} == {r["name"] for r in config["runs"]}
    assert all(r["status"] == "executed" and r["wall_time_s"] > 0 for r in repro["runs"])
    page = _text(smoke_book.html / "_runs" / "reproducibility.html")
    assert "Profile smoke" in page
    for package in ("torch", "transformers", "papermill"):
        assert package in page
    # The figure of the synthetic run reached the page as an image, and its files + sidecar exist.
    assert "<img" in (smoke_book.html / "_runs" / "synthetic_crosscoder.html").read_text()
    sidecar = smoke_book.project / "book" / "_runs" / "synthetic_crosscoder" / "relative_norms_L1.json"
    assert json.loads(sidecar.read_text())["params"]["n_steps"] == \
        config["profiles"]["smoke"]["parameters"]["synthetic_crosscoder"]["n_steps"]


def test_first_page_leads_with_its_findings(smoke_book):
    """The book's first page: its title and findings come first (the synthetic run's among them, read
    from its metrics.json and linking to its page), then the provenance note with the parameters the
    run used, shown once."""
    import yaml

    html = (smoke_book.html / "_runs" / "at_a_glance.html").read_text(encoding="utf-8")
    html = html[html.index("<article"):html.index("</article>")]  # the page, not the navigation around it
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))
    order = [text.index(s) for s in ("Results at a glance", "l1: L0", "Synthetic check: the latent that best detects",
                                     "How this page was made", "Executed by python -m report --profile smoke")]
    assert order == sorted(order), order
    artifacts_dir = yaml.safe_load((ROOT / "runs.yaml").read_text())["profiles"]["smoke"]["parameters"][
        "at_a_glance"]["artifacts_dir"]
    assert text.count(artifacts_dir) == 1 and text.index(artifacts_dir) > order[-1]
    assert 'href="synthetic_crosscoder.html"' in html and "tied to one context" in text
    assert (smoke_book.project / "book" / "_runs" / "synthetic_crosscoder" / "metrics.json").is_file()


_PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[\d|it/s|step/s|shard/s|IProgress")


def test_pages_read_as_a_report(smoke_book):
    """No progress bars or library warnings in the pages (they go to the terminal), the notebook's
    defaults cell is dropped (the injected parameters show once), no figure's file paths are printed
    and every figure has a caption."""
    for nb_path in sorted((smoke_book.project / "book" / "_runs").glob("*.ipynb")):
        nb = nbformat.read(nb_path, 4)
        streams = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream"]
        progress = [o["text"][:80] for o in streams if _PROGRESS.search(o["text"])]
        assert len(progress) <= 1, f"{nb_path.name}: {len(progress)} progress outputs, e.g. {progress[:3]}"
        assert all(o["name"] != "stderr" for o in streams), \
            f"{nb_path.name}: stderr in the page: {[o['text'][:120] for o in streams if o['name'] == 'stderr']}"
        html = smoke_book.html / "_runs" / f"{nb_path.stem}.html"
        if "stub" in nb.metadata.get("crosscoder_run", {}).get("status", ""):
            continue
        text = _text(html)
        assert "Defaults from crosscoder.schema" not in text, f"{html.name} shows the defaults cell"
        assert "SavedFigure(" not in text, f"{html.name} prints a figure's file paths"
        n_images = html.read_text().count("<img")
        n_captions = text.count("Figure.") + text.count("Figures.")
        assert n_images == 0 or n_captions >= 1, f"{html.name}: {n_images} images and no caption"


def test_second_make_book_executes_nothing(smoke_book):
    again = _run([sys.executable, "-m", "report", "--profile", "smoke"],
                 cwd=smoke_book.project)
    assert again.returncode == 0, again.stderr
    assert "[run ]" not in again.stdout and "0 run(s) executed" in again.stdout


def test_build_fails_on_a_sphinx_warning(smoke_book, tmp_path):
    """-W is really on: a page with a broken cross-reference fails the `make book` command."""
    project = tmp_path / "p"
    shutil.copytree(smoke_book.project, project, symlinks=True,
                    ignore=shutil.ignore_patterns("_build"))
    limitations = project / "book" / "limitations.md"
    limitations.write_text(limitations.read_text() + "\nSee {ref}`no-such-label`.\n")
    build = _run(_build_cmd(project / "book", project / "_config.yml"), cwd=project)
    assert build.returncode != 0
    assert "no-such-label" in build.stdout + build.stderr


@pytest.mark.browser
def test_every_page_loads_cleanly_in_chromium(smoke_book):
    _need_browser()
    shots = smoke_book.project / "screenshots"
    problems = check_site(smoke_book.html, shots)
    assert problems == [], "\n".join(problems)
    pngs = list(shots.rglob("*.png"))
    assert len(pngs) >= 6 and all(p.stat().st_size > 5_000 for p in pngs)
    methods = (smoke_book.html / "methods.html").read_text()
    assert 'class="math' in methods and "_static/mathjax/tex-chtml.js" in methods and "cdn." not in methods


@pytest.fixture(scope="module")
def defective_site(tmp_path_factory) -> Path:
    """A tiny book with one planted defect of each kind, rendered by jupyter-book/myst-nb."""
    _need_browser()
    root = tmp_path_factory.mktemp("defective")
    book = root / "book"
    book.mkdir()
    (root / "_config.yml").write_text(
        'title: defects\nexecute:\n  execute_notebooks: "off"\nonly_build_toc_files: true\n')
    (book / "_toc.yml").write_text(
        "format: jb-book\nroot: index\nchapters:\n  - file: ok\n  - file: nb\n")
    (book / "index.md").write_text(
        "# Index\n\n<img src='missing.png' alt='gone'>\n\n"
        "<script src='https://cdn.example.org/lib.js'></script>\n\n"
        "<a href='nowhere.html'>dead link</a> <a href='ok.html#no-such-anchor'>dead anchor</a> "
        "<a href='ok.html#fine'>good anchor</a> <a href='https://example.org/x'>external</a>\n")
    (book / "ok.md").write_text("# OK\n\n(fine)=\n## Fine\n\nNothing wrong here.\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    cell = nbformat.v4.new_code_cell("1 / 0", execution_count=1)
    cell.outputs = [nbformat.v4.new_output(
        "error", ename="ZeroDivisionError", evalue="division by zero",
        traceback=["ZeroDivisionError: division by zero"])]
    nb.cells = [nbformat.v4.new_markdown_cell("# A failed notebook"), cell]
    nbformat.write(nb, book / "nb.ipynb")
    build = _run(_build_cmd(book, root / "_config.yml", strict=False), cwd=root)
    assert build.returncode == 0, build.stdout + build.stderr
    return _html_dir(root)


@pytest.mark.browser
def test_check_site_reports_each_planted_defect(defective_site, tmp_path):
    _need_browser()
    problems = check_site(defective_site, tmp_path / "shots")
    text = "\n".join(problems)
    assert any("image not loaded: missing.png" in p for p in problems), text
    assert any("broken link" in p and "nowhere.html" in p for p in problems), text
    assert any("missing anchor #no-such-anchor" in p for p in problems), text
    assert any(p.startswith("nb.html: notebook error cell") for p in problems), text
    assert any("request outside the book's folder: https://cdn.example.org/lib.js" in p for p in problems), text
    # Nothing else: the good anchor, the external link and the clean page pass.
    assert len(problems) == 5, text
    assert (tmp_path / "shots" / "ok.html.png").is_file()


# ----------------------------------------------------------------------------------------------
# plotting.save_figure
# ----------------------------------------------------------------------------------------------


def test_save_figure_writes_png_svg_and_sidecar_deterministically(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from report import plotting

    plotting.set_style()
    params = {"n": np.int64(3), "lr": np.float32(0.5), "dims": (2, 3), "path": Path("a/b")}

    def draw(stem: Path) -> plotting.SavedFigure:
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [1, 0, 1], color=plotting.CATEGORY_COLORS["chat"])
        saved = plotting.save_figure(fig, stem, params)
        plt.close(fig)
        return saved

    a = draw(tmp_path / "x" / "fig.png")
    draw(tmp_path / "y" / "fig")
    assert a.png == tmp_path / "x" / "fig.png" and a.svg.suffix == ".svg"
    assert a.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(a.params.read_text())["params"] == {
        "n": 3, "lr": 0.5, "dims": [2, 3], "path": "a/b"}
    for f in ("fig.png", "fig.svg", "fig.json"):  # same inputs, same bytes
        assert (tmp_path / "x" / f).read_bytes() == (tmp_path / "y" / f).read_bytes(), f
    assert not list(tmp_path.rglob("*.tmp"))

    fig, _ = plt.subplots()
    with pytest.raises(TypeError, match="params.model has type object"):
        plotting.save_figure(fig, tmp_path / "z", {"model": object()})
    with pytest.raises(ValueError, match="not finite"):
        plotting.save_figure(fig, tmp_path / "z", {"loss": float("nan")})
    plt.close(fig)


def test_cli_profile_commands_name_the_notebooks_artifacts(smoke_book, monkeypatch, capsys):
    """`crosscoder.cli extract/train --profile` (the torchrun entry points of the Gemma profile)
    resolve a run's parameters exactly as its notebook did: they find the notebook's cache and its
    finished crosscoder instead of extracting or training again (2 ranks for the extraction; the
    one-rank training in this process, which creates no process group: the code path of a plain
    `python -m crosscoder.cli train`, without another interpreter importing transformers)."""
    import torch

    from crosscoder import cli

    project = smoke_book.project
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    caches = {p: p.stat().st_mtime_ns for p in (project / "cache" / "activations").glob("*/manifest.json")}
    ex = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "-m", "crosscoder.cli", "extract", "--profile", "smoke", "--quiet"],
                        cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert ex.returncode == 0, ex.stderr[-3000:]
    folder = Path(json.loads(ex.stdout.strip().splitlines()[-1])["cache"])
    assert (project / folder / "manifest.json").resolve() in {p.resolve() for p in caches}
    weights = project / "artifacts" / "smoke" / "l1" / "crosscoder" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert "WORLD_SIZE" not in os.environ
    monkeypatch.chdir(project)  # where the subprocess ran; the command itself cds to runs.yaml's folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OMP_NUM_THREADS=1, as the ranks
    capsys.readouterr()
    try:
        assert cli.main(["train", "--profile", "smoke", "--run", "train_l1", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(out["model_dir"]) == Path("artifacts/smoke/l1/crosscoder")
    assert out["resumed_from"] == 60  # the smoke profile's n_steps: found finished, not retrained
    assert weights.stat().st_mtime_ns == before
    assert {p: p.stat().st_mtime_ns for p in caches} == caches  # no cache rewritten


def test_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but headless Chromium not found"):
        _need_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="Chromium not found"):
        _need_browser()


def _browser_index(js: Path) -> dict:
    return json.loads(js.read_text(encoding="utf-8").split("] = ", 1)[1].rstrip(";\n"))


@pytest.mark.browser
def test_latent_browser_filters_picks_and_shows_contexts(smoke_book):
    """The browser page of each crosscoder: filter by class, pick a latent, its highlighted contexts
    and promoted tokens appear; filter by AUROC (the organism's decisions) and by decision, and the
    page lists exactly the latents the data says; no console error and no request outside the
    book's folder. The data comes from the run's own folder and the build holds only this profile's."""
    _need_browser()
    from playwright.sync_api import sync_playwright

    html = smoke_book.html
    assert not list(html.rglob("latent_browser_data")), "a browser data folder outside the runs' folders"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for run in ("browser_batchtopk", "browser_l1"):
                data = html / "_runs" / run / "public"
                idx = _browser_index(data / "index.js")
                assert idx["title"] == f"smoke/{run.removeprefix('browser_')}"
                page = browser.new_page()
                errors, outside, loaded = [], [], []
                page.route("**/*", lambda r: (outside.append(r.request.url), r.abort()) if _outside(r.request.url, html)
                           else r.continue_())
                page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                        and not TOOLCHAIN_CONSOLE_NOISE.search(m.text) else None)
                page.on("pageerror", lambda e: errors.append(str(e)) if not TOOLCHAIN_CONSOLE_NOISE.search(str(e))
                        else None)
                page.on("requestfinished", lambda r: loaded.append(r.url))
                page.goto((html / "_runs" / f"{run}.html").as_uri(), wait_until="load")
                load_ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
                page.wait_for_selector(".latent-browser tr.lb-row")
                shared = page.eval_on_selector(".lb-class", "s => [...s.options].find(o => o.text === 'shared').value")
                page.select_option(".lb-class", shared)
                classes = page.eval_on_selector_all("tr.lb-row td:nth-child(2)", "tds => tds.map(t => t.textContent)")
                assert classes and set(classes) == {"shared"}
                first = page.eval_on_selector("tr.lb-row", "r => r.dataset.latent")
                page.click("tr.lb-row")
                page.wait_for_selector(".lb-context span.lb-centre")
                assert page.inner_text(".lb-detail h4").startswith(f"latent {first} · shared")
                assert page.locator(".lb-context").count() >= 1 and page.locator(".lb-prom code").count() >= 2
                # AUROC: at the median of the scored latents, the page lists exactly those at or above it
                page.select_option(".lb-class", "")
                auc = idx["columns"]["AUROC"]
                scored = sorted(v for v in auc if v is not None)
                thr = scored[len(scored) // 2]
                want = {j for j, v in enumerate(auc) if v is not None and v >= thr}
                assert 0 < len(want) < idx["n_latents"]
                page.fill("input.lb-min[data-col='AUROC']", str(thr))
                assert page.inner_text(".lb-count").startswith(f"{len(want)} of {idx['n_latents']} latents match")
                rows = {int(j) for j in page.eval_on_selector_all("tr.lb-row", "rs => rs.map(r => r.dataset.latent)")}
                assert rows and rows <= want and len(rows) == min(len(want), 200)
                # ... and by the decision of that AUROC
                names, of = idx["labels"]["decision"]["names"], idx["labels"]["decision"]["of"]
                pick = of[min(want)]
                page.select_option("select.lb-label[data-label='decision']", str(pick))
                want_d = {j for j in want if of[j] == pick}
                assert page.inner_text(".lb-count").startswith(f"{len(want_d)} of {idx['n_latents']} latents match")
                col = page.eval_on_selector_all("tr.lb-row td:nth-child(3)", "tds => tds.map(t => t.textContent)")
                assert set(col) == {names[pick]}
                page.close()
                assert errors == [] and outside == [], (errors, outside)
                files = {Path(urllib.parse.unquote(urllib.parse.urlsplit(u).path)) for u in loaded if u.startswith("file:")}
                assert data / "index.js" in files and any(f.parent == data and f.name.startswith("chunk-") for f in files)
                weight = sum(f.stat().st_size for f in files if f.is_file())
                print(f"{run}: {len(files)} files, {weight / 1e6:.2f} MB loaded, load event at {load_ms:.0f} ms")
                assert weight < 5_000_000, f"{run}: {weight} bytes"
        finally:
            browser.close()


def test_publish_copies_only_the_current_runs_public_files(tmp_path):
    """report.publish: each run's public/ folder lands beside its page; a folder an earlier build
    published for a run that no longer has one is removed; other run outputs are not copied."""
    from report.publish import public_url, publish_run_files

    src, out = tmp_path / "book", tmp_path / "html"
    (src / "_runs" / "a" / "public").mkdir(parents=True)
    (src / "_runs" / "a" / "public" / "index.js").write_text("x")
    (src / "_runs" / "b").mkdir(parents=True)
    (src / "_runs" / "b" / "fig.png").write_text("png")
    (out / "_runs" / "old" / "public").mkdir(parents=True)
    (out / "_runs" / "old" / "public" / "stale.js").write_text("y")
    (out / "_runs" / "old.html").write_text("page")
    assert publish_run_files(src, out) == [out / "_runs" / "a" / "public"]
    assert (out / "_runs" / "a" / "public" / "index.js").read_text() == "x"
    assert not (out / "_runs" / "old" / "public").exists() and (out / "_runs" / "old.html").exists()
    assert not (out / "_runs" / "b").exists()
    assert public_url("book/_runs/browser_l1") == "browser_l1/public/"
