"""The reproducibility record: environment, hardware, git state and per-run parameters and wall
times, as JSON and as the book's appendix page."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from crosscoder.atomic import write_text_atomic
from report.spec import PlannedRun, RunsConfig, rel_path

REPRO_JSON = "reproducibility.json"
REPRO_PAGE = "reproducibility.md"
PACKAGES = (
    "crosscoder", "torch", "transformers", "datasets", "tokenizers", "safetensors", "einops",
    "numpy", "scikit-learn", "matplotlib", "seaborn", "papermill", "nbclient", "ipykernel",
    "jupyter-book", "myst-nb", "sphinx", "pyyaml",
)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ----------------------------------------------------------------------------------------------
# Environment and the reproducibility record
# ----------------------------------------------------------------------------------------------


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect_environment() -> dict[str, Any]:
    """Versions and hardware of this process (imports torch for threads and GPUs, if present)."""
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus_usable = os.cpu_count()
    mem_gib = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    hw: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "cpus_usable": cpus_usable, "memory_gib": mem_gib,
        "torch_threads": None, "gpus": [],
    }
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        hw["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                prop = torch.cuda.get_device_properties(i)
                hw["gpus"].append({"name": prop.name,
                                   "memory_gib": round(prop.total_memory / 2**30, 1)})
    return {"python": sys.version.split()[0], "packages": package_versions(), "hardware": hw}


def check_requirements(env: dict[str, Any], require_gpu: bool, min_gpu_memory_gib: float) -> None:
    """Preflight for a profile: fail in the first cell, not hours later, when the hardware the
    profile declares is missing."""
    if min_gpu_memory_gib < 0:
        raise ValueError(f"min_gpu_memory_gib must be >= 0, got {min_gpu_memory_gib}")
    gpus = env["hardware"]["gpus"]
    if (require_gpu or min_gpu_memory_gib > 0) and not gpus:
        raise RuntimeError(
            "this profile needs a CUDA GPU but torch sees none; run it on a GPU machine or pick "
            "a CPU profile (--profile default)"
        )
    largest = max((g["memory_gib"] for g in gpus), default=0.0)
    if largest < min_gpu_memory_gib:
        raise RuntimeError(
            f"this profile needs a GPU with >= {min_gpu_memory_gib} GiB; the largest visible one "
            f"has {largest} GiB"
        )


def hardware_summary(hw: dict[str, Any]) -> str:
    gpus = ", ".join(g["name"] for g in hw["gpus"]) or "no GPU"
    return f"{hw['cpus_usable']} CPU cores, {hw['machine']}, {gpus}"


def git_info(root: Path) -> dict[str, Any] | None:
    """Commit and dirtiness of the checkout, or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty.strip())}


def write_reproducibility(config: RunsConfig, profile: str, planned: list[PlannedRun],
                          state: dict[str, dict], executed: set[str],
                          env: dict[str, Any]) -> dict[str, Any]:
    runs = []
    for p in planned:
        rec = state.get(p.run.name, {})
        if p.action == "not-in-profile":
            status = "not in profile"
        elif rec.get("key") == p.key and rec.get("status") == "done":
            status = "executed" if p.run.name in executed else "up to date (cached)"
        elif rec:
            status = "stale (recorded inputs differ)"
        else:
            status = "not executed"
        runs.append({
            "name": p.run.name, "notebook": rel_path(p.run.notebook, config.root),
            "status": status, "key": p.key[:16], "parameters": p.run.parameters,
            "wall_time_s": rec.get("wall_time_s"), "executed_at": rec.get("executed_at"),
            "hardware": rec.get("hardware"),
            "peak_rss_gib": rec.get("peak_rss_gib"), "peak_rss_exact": rec.get("peak_rss_exact"),
        })
    record = {
        "profile": profile, "generated_at": now_utc(), "git": git_info(config.root),
        "command": f"python -m report --profile {profile}",
        "runs": runs, "python": env["python"], "packages": env["packages"],
        "hardware": env["hardware"],
        "profiles": {n: {"description": p.description, "extends": p.extends,
                         "expected": p.expected, "target": p.target}
                     for n, p in config.profiles.items()},
    }
    write_text_atomic(config.runs_dir / REPRO_JSON, json.dumps(record, indent=2, sort_keys=True))
    write_text_atomic(config.runs_dir / REPRO_PAGE, render_reproducibility(record))
    return record


def rss_gib(rec: dict) -> str:
    """A run's recorded peak memory in GiB as text: "1.23" (exact), "<= 1.23" (a bound), or "" for
    records written before it existed."""
    if rec.get("peak_rss_gib") is None:
        return ""
    return f"{'' if rec.get('peak_rss_exact') else '<= '}{rec['peak_rss_gib']:.2f}"


def rss_label(rec: dict) -> str:
    """``rss_gib`` for the console."""
    return f"peak RSS {rss_gib(rec)} GiB" if rss_gib(rec) else "peak RSS not recorded"


def _cell(value: Any) -> str:
    """A value as a Markdown table cell (pipes escaped, code-formatted)."""
    text = json.dumps(value) if not isinstance(value, str) else value
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_reproducibility(rec: dict[str, Any]) -> str:
    """The appendix page (MyST Markdown) rendering reproducibility.json."""
    git = rec["git"]
    commit = (f"`{git['commit']}`" + (" with uncommitted changes" if git["dirty"] else "")
              if git else "not a git checkout")
    hw = rec["hardware"]
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in hw["gpus"]) or "none"
    parts = [
        "# Reproducibility",
        "This page is generated by `python -m report` at the end of every `make runs` from "
        f"{{download}}`reproducibility.json <{REPRO_JSON}>`. Every result page of this book is a "
        "notebook executed by papermill with the parameters listed here.",
        _table(("", ""), [
            ("Profile", f"`{rec['profile']}`"), ("Command", f"`{rec['command']}`"),
            ("Git commit", commit), ("Generated at (UTC)", rec["generated_at"]),
            ("Python", rec["python"]),
        ]),
        "## Runs",
        "Wall time is measured around papermill's execution of the notebook, kernel start "
        "included. A run marked *up to date* was not re-executed by this build because its inputs "
        "are unchanged; its wall time is that of the execution that produced its page. Peak memory "
        "is the kernel's largest resident set (the operating system's maximum over the build's "
        "finished kernels): exact where it rose during that run, else a bound (<=).",
        _table(("Run", "Status", "Wall time (s)", "Peak RSS (GiB)"), [
            (f"[{r['name']}]({r['name']}.ipynb)", r["status"],
             "" if r["wall_time_s"] is None else f"{r['wall_time_s']:.1f}", rss_gib(r))
            for r in rec["runs"]
        ]),
        "## Parameters",
        "Values injected by papermill; notebook defaults apply to everything else.",
    ]
    for r in rec["runs"]:
        parts.append(f"### Run `{r['name']}`")
        where = f"Notebook `{r['notebook']}`"
        if r["executed_at"]:
            where += f", executed at {r['executed_at']} (UTC) on {r['hardware']}"
        parts.append(where + ".")
        parts.append(_table(("Parameter", "Value"), [(f"`{k}`", _cell(v))
                                                     for k, v in sorted(r["parameters"].items())])
                     if r["parameters"] else "No parameters.")
    parts += [
        "## Hardware",
        "The machine that generated this page (per-run hardware is listed with each run above).",
        _table(("", ""), [
            ("Platform", f"`{hw['platform']}`"), ("CPU cores (usable / total)",
                                                  f"{hw['cpus_usable']} / {hw['cpu_count']}"),
            ("Memory (GiB)", hw["memory_gib"]), ("Torch threads", hw["torch_threads"]),
            ("GPUs", gpus),
        ]),
        "## Package versions",
        _table(("Package", "Version"),
               [(f"`{k}`", f"`{v}`" if v else "not installed")
                for k, v in rec["packages"].items()]),
        "## Profiles",
        "Declared in `runs.yaml`. Expected times and memory are the estimates written there, "
        "not measurements; the measured wall times of this build are in the table above.",
    ]
    for name, p in rec["profiles"].items():
        parts.append(f"### Profile `{name}`")
        if p["extends"]:
            parts.append(f"Extends `{p['extends']}`.")
        parts.append(" ".join(p["description"].split()))
        if p["expected"]:
            parts.append(_table(("Estimate", "Declared value"),
                                [(k.replace("_", " "), " ".join(v.split()).replace("|", "\\|"))
                                 for k, v in p["expected"].items()]))
        if p["target"]:
            parts.append(_table(("Target setting", "Value"),
                                [(f"`{k}`", _cell(v)) for k, v in p["target"].items()]))
    return "\n\n".join(parts) + "\n"
