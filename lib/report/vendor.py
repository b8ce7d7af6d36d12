"""Vendored JavaScript of the book: MathJax, copied into ``book/_vendor/mathjax`` at build time so no
page loads anything from a CDN (a reader offline or behind a strict proxy would otherwise see raw TeX).

    python -m report.vendor [--static book/_vendor]

The package comes from the npm registry (``npm pack`` when npm is installed, else the registry's
tarball URL), pinned by version AND by the registry's sha512 integrity, and only the files the book
loads are kept: the TeX -> CommonHTML bundle, its woff fonts, the TeX extensions MathJax autoloads
for macros outside the bundle, and the licence. The folder appears atomically (temp, then rename);
a folder holding the pinned version is left alone.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

MATHJAX_VERSION = "3.2.2"
MATHJAX_INTEGRITY = "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
"""``npm view mathjax@3.2.2 dist.integrity``."""
MATHJAX_TARBALL = f"https://registry.npmjs.org/mathjax/-/mathjax-{MATHJAX_VERSION}.tgz"
MATHJAX_ENTRY = "tex-chtml.js"
"""The script the pages load (``mathjax_path`` in _config.yml is ``mathjax/tex-chtml.js``)."""
_KEEP = ("es5/tex-chtml.js", "es5/output/chtml/fonts/woff-v2/", "es5/input/tex/extensions/", "LICENSE")
DEFAULT_STATIC = Path(__file__).resolve().parents[2] / "book" / "_vendor"


def _integrity_ok(blob: bytes, integrity: str) -> bool:
    algo, _, want = integrity.partition("-")
    return base64.b64encode(hashlib.new(algo, blob).digest()).decode() == want


def _fetch_tarball() -> bytes:
    if shutil.which("npm"):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "pack", f"mathjax@{MATHJAX_VERSION}", "--silent", "--pack-destination", tmp],
                           check=True, capture_output=True, text=True)
            return next(Path(tmp).glob("mathjax-*.tgz")).read_bytes()
    with urllib.request.urlopen(MATHJAX_TARBALL, timeout=120) as r:  # the same file npm would fetch
        return r.read()


def mathjax_ready(static_dir: Path = DEFAULT_STATIC) -> bool:
    folder = Path(static_dir) / "mathjax"
    version = folder / "VERSION"
    return (folder / MATHJAX_ENTRY).is_file() and version.is_file() and version.read_text().strip() == MATHJAX_VERSION


def vendor_mathjax(static_dir: str | Path = DEFAULT_STATIC, *, tarball: bytes | None = None) -> Path:
    """``static_dir/mathjax`` with the pinned MathJax; fetched only when missing or another version."""
    static_dir = Path(static_dir)
    dest = static_dir / "mathjax"
    if mathjax_ready(static_dir):
        return dest
    blob = tarball if tarball is not None else _fetch_tarball()
    if not _integrity_ok(blob, MATHJAX_INTEGRITY):
        raise RuntimeError(f"mathjax-{MATHJAX_VERSION}.tgz does not match its pinned sha512 integrity; "
                           f"refusing to vendor it (a corrupted download or a changed registry file)")
    static_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=static_dir, prefix=".mathjax."))
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            for m in tar.getmembers():
                rel = m.name.removeprefix("package/")
                if not m.isfile() or not any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in _KEEP):
                    continue
                out = tmp / rel.removeprefix("es5/")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
        (tmp / "VERSION").write_text(MATHJAX_VERSION + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--static", default=str(DEFAULT_STATIC), help="the book's vendored static folder (copied into _static)")
    args = ap.parse_args(argv)
    dest = vendor_mathjax(args.static)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"MathJax {MATHJAX_VERSION} in {dest} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
