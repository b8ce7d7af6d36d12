"""Sphinx extension: run outputs the built book serves as plain files.

A run that writes files for its page to read at run time (the latent browser's data: JavaScript
loaded by ``<script>`` tags, which Sphinx does not see) puts them under
``<book>/_runs/<run>/public/``; after each HTML build this extension copies every such folder to
``_runs/<run>/public/`` of the output, beside the run's page, which finds them at the relative URL
``<run>/public/``. The runner empties a run's folder before executing it (and when a profile skips
the run), so a build carries exactly its own profile's files; folders an earlier build published
are removed first. Enabled in ``_config.yml`` (``sphinx.extra_extensions``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from report.spec import RUNS_SUBDIR

PUBLIC = "public"
"""Subfolder of a run's output folder copied into the built book."""


def public_url(output_dir: str | Path) -> str:
    """The URL of a run's ``public/`` folder relative to the run's page (``_runs/<run>.html``)."""
    return f"{Path(output_dir).name}/{PUBLIC}/"


def publish_run_files(srcdir: str | Path, outdir: str | Path) -> list[Path]:
    """Replace every ``<outdir>/_runs/*/public/`` by the current ``<srcdir>/_runs/*/public/``;
    returns the folders copied."""
    src, out = Path(srcdir) / RUNS_SUBDIR, Path(outdir) / RUNS_SUBDIR
    for old in out.glob(f"*/{PUBLIC}"):
        shutil.rmtree(old)
    copied = []
    for folder in sorted(src.glob(f"*/{PUBLIC}")):
        if folder.is_dir():
            dest = out / folder.parent.name / PUBLIC
            shutil.copytree(folder, dest)
            copied.append(dest)
    return copied


def _build_finished(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        publish_run_files(app.srcdir, app.outdir)


def setup(app) -> dict:
    app.connect("build-finished", _build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
