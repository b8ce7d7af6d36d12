"""Keys, state, planning and papermill execution of the runs of a profile."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import nbformat
from crosscoder.atomic import write_text_atomic
from report.record import (
    REPRO_PAGE,
    hardware_summary,
    rss_label,
    now_utc,
    collect_environment,
    write_reproducibility,
)
from report.spec import (
    PlannedRun,
    ResolvedRun,
    RunFailed,
    RunsConfig,
    RunsConfigError,
    rel_path,
    validate,
)

STATE_FILE = ".state.json"
KERNEL_NAME = "python3"
# Bump when the meaning of a key changes (e.g. post-processing of outputs) so old state is ignored.
KEY_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Keys, state and planning
# ----------------------------------------------------------------------------------------------


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def notebook_source_hash(notebook: Path) -> str:
    """Hash of what the notebook *does*: cell types, sources and tags; outputs, execution counts
    and other metadata are ignored so re-saving a notebook in Jupyter does not re-run it."""
    nb = nbformat.read(notebook, as_version=4)
    cells = [
        [c.cell_type, c.source, sorted(c.get("metadata", {}).get("tags", []))] for c in nb.cells
    ]
    return _sha(cells)


def sources_hash(config: RunsConfig) -> str:
    """Hash of every file under ``source_dirs`` (bytecode caches excluded)."""
    h = hashlib.sha256()
    for d in config.source_dirs:
        base = config.root / d
        if not base.is_dir():
            raise RunsConfigError(f"source_dirs entry {d!r} is not a folder under {config.root}")
        for f in sorted(p for p in base.rglob("*") if p.is_file()):
            if "__pycache__" in f.parts or f.suffix in (".pyc", ".pyo"):
                continue
            h.update(rel_path(f, config.root).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def read_state(config: RunsConfig) -> dict[str, dict]:
    path = config.runs_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        # A corrupt state only costs re-execution; it is rewritten atomically below.
        return {}
    return state.get("runs", {}) if state.get("version") == KEY_VERSION else {}


def _write_state(config: RunsConfig, runs: dict[str, dict]) -> None:
    write_text_atomic(config.runs_dir / STATE_FILE,
                  json.dumps({"version": KEY_VERSION, "runs": runs}, indent=2, sort_keys=True))


def plan(config: RunsConfig, profile: str, only: list[str] | None = None,
         force: bool = False) -> list[PlannedRun]:
    """Validate the profile and decide, per run, whether it executes. ``only`` selects runs; stale
    runs they depend on are executed too (their outputs are inputs)."""
    runs = validate(config, profile)
    names = [r.name for r in runs]
    for name in only or ():
        if name not in names:
            raise RunsConfigError(f"--only {name!r}: no such run; runs are {names}")
    selected = set(only or names)
    # Close the selection over dependencies so a selected run never reads stale inputs.
    by_name = {r.name: r for r in runs}
    stack = list(selected)
    while stack:
        for dep in by_name[stack.pop()].depends_on:
            if dep not in selected:
                selected.add(dep)
                stack.append(dep)
    state = read_state(config)
    src_hash = sources_hash(config)
    keys: dict[str, str] = {}
    out = []
    for run in runs:
        if not run.in_profile:
            keys[run.name] = _sha(["not-in-profile", profile, run.name])
            out.append(PlannedRun(run, keys[run.name], "not-in-profile",
                                  f"profile {profile!r} skips this run"))
            continue
        keys[run.name] = _sha({
            "key_version": KEY_VERSION,
            "notebook": notebook_source_hash(run.notebook),
            "parameters": run.parameters,
            "profile": profile,
            "sources": src_hash,
            "upstream": {d: keys[d] for d in run.depends_on},
        })
        prev = state.get(run.name, {})
        fresh = prev.get("key") == keys[run.name] and run.output.is_file()
        if run.name not in selected:
            action, reason = "not-selected", "up to date" if fresh else "stale, not selected"
        elif force:
            action, reason = "execute", "--force"
        elif fresh:
            action, reason = "up-to-date", "inputs unchanged"
        else:
            action = "execute"
            reason = ("never executed" if not prev else
                      "output missing" if not run.output.is_file() else "inputs changed")
        if action == "execute" and only and run.name not in only:
            reason += f" (dependency of {', '.join(only)})"
        out.append(PlannedRun(run, keys[run.name], action, reason))
    return out


# ----------------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(config: RunsConfig) -> Iterator[None]:
    """One runner per book tree: two would overwrite each other's notebooks and state."""
    config.runs_dir.mkdir(parents=True, exist_ok=True)
    with open(config.runs_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise RunsConfigError(
                f"another python -m report process is executing into {config.runs_dir}; wait for it"
            ) from err
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _title(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", c.source, flags=re.M)
            if m:
                return m.group(1).strip()
    return notebook.stem


def _write_stub(config: RunsConfig, planned: PlannedRun, profile: str) -> None:
    """A profile that skips a run still gets a page at the stable path the toc references, and
    no outputs of an earlier execution."""
    run = planned.run
    nb = nbformat.v4.new_notebook()
    others = [p for p in config.profiles_running(run.name) if p != profile]
    where = (" It is part of " + ", ".join(f"`make book PROFILE={p}`" for p in others)
             + " (profile descriptions and time estimates: `runs.yaml`).") if others else ""
    nb.cells.append(nbformat.v4.new_markdown_cell(
        f"# {_title(run.notebook)}\n\nProfile `{profile}` does not execute this run "
        f"(`{rel_path(run.notebook, config.root)}`); it has no results in this build.{where}"
    ))
    nb.metadata["crosscoder_run"] = {"run": run.name, "profile": profile,
                                     "status": "not-in-profile"}
    write_text_atomic(run.output, nbformat.writes(nb))
    # what an earlier profile's execution left (figures, the files report.publish serves) goes too
    _reset_dir(run.output_dir, config, create=False)


PROVENANCE_TAG = "crosscoder-provenance"
"""Tag of the note ``_annotate`` adds to every executed page."""
PROVENANCE_HERE_TAG = "crosscoder-provenance-here"
"""Tag of a markdown cell (e.g. a closing heading) after which a page wants its provenance note and the
parameters it ran with, so that it leads with its content; pages without one get both after the title."""
INJECTED_TAG = "injected-parameters"  # papermill's tag of the cell holding the injected parameters


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _fenced(code: str, lang: str = "python") -> str:
    """``code`` as a Markdown code fence longer than any backtick run inside it."""
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", code)), default=0))
    return f"{fence}{lang}\n{code.rstrip()}\n{fence}"


def place_provenance(cells: list, note_head: str, repro_link: str) -> list:
    """The executed notebook's cells with the provenance note added. By default the note goes after
    the title (or first) and papermill's injected-parameters cell stays where it ran, folded away
    (``hide-input``, like the pages' code cells: it fills a screen before any finding). A page with a
    cell tagged ``PROVENANCE_HERE_TAG`` gets the note after that cell instead, holding the injected
    parameters as a code block; the injected cell itself stays in place, so the notebook still runs top
    to bottom, but is tagged ``remove-cell`` (the page shows the parameters once, in the note)."""
    anchor = next((i for i, c in enumerate(cells) if PROVENANCE_HERE_TAG in _tags(c)), None)
    if anchor is None:
        for c in cells:
            if INJECTED_TAG in _tags(c) and "hide-input" not in _tags(c):
                c.metadata["tags"] = [*_tags(c), "hide-input"]
        note = nbformat.v4.new_markdown_cell(
            f":::{{note}}\n{note_head} The injected-parameters cell (folded) shows the values this run used; hardware, "
            f"package versions and wall time are in the {repro_link}.\n:::")
        note.metadata["tags"] = [PROVENANCE_TAG]
        at = 1 if cells and cells[0].cell_type == "markdown" else 0
        return cells[:at] + [note] + cells[at:]
    injected = [c for c in cells if INJECTED_TAG in _tags(c)]
    for c in injected:
        c.metadata["tags"] = [*_tags(c), "remove-cell"]
    params = "".join(f"\n\n{_fenced(c.source)}" for c in injected)
    note = nbformat.v4.new_markdown_cell(
        f":::{{note}}\n{note_head} "
        + ("It ran with these parameters:" if injected else "It ran with the notebook's default parameters.")
        + f"{params}\n\nHardware, package versions and wall time are in the {repro_link}.\n:::")
    note.metadata["tags"] = [PROVENANCE_TAG]
    return cells[:anchor + 1] + [note] + cells[anchor + 1:]


def _annotate(planned: PlannedRun, profile: str, config: RunsConfig, wall_time_s: float) -> None:
    """Record the run's provenance in the executed notebook (metadata + a visible note, placed by
    ``place_provenance``)."""
    run = planned.run
    nb = nbformat.read(run.output, as_version=4)
    nb.metadata["crosscoder_run"] = {
        "run": run.name, "profile": profile, "key": planned.key,
        "notebook": rel_path(run.notebook, config.root), "parameters": run.parameters,
        "wall_time_s": round(wall_time_s, 3),
    }
    head = (f"Executed by `python -m report --profile {profile}` as run `{run.name}` of "
            f"`{rel_path(run.notebook, config.root)}`.")
    nb.cells = place_provenance(nb.cells, head, f"[reproducibility appendix]({REPRO_PAGE})")
    write_text_atomic(run.output, nbformat.writes(nb))


def _failure_message(run: ResolvedRun, config: RunsConfig, err: Exception) -> str:
    from papermill.exceptions import PapermillExecutionError

    nb, out = rel_path(run.notebook, config.root), rel_path(run.output, config.root)
    if isinstance(err, PapermillExecutionError):
        first = next((ln for ln in err.source.splitlines() if ln.strip()), "")
        # Name the cell as the author sees it in the source notebook; the executed one has
        # papermill's injected-parameters cell in addition.
        source_cells = [c.source for c in nbformat.read(run.notebook, as_version=4).cells]
        number = (source_cells.index(err.source) + 1 if source_cells.count(err.source) == 1
                  else err.cell_index)
        return (
            f"run {run.name!r} failed in notebook {nb}, cell {number} (In [{err.exec_count}] in "
            f"the executed notebook), starting `{first.strip()}`: {err.ename}: {err.evalue}\n"
            f"The partially executed notebook is at {out}; the run is not marked done."
        )
    return (
        f"run {run.name!r} failed while executing notebook {nb}: {type(err).__name__}: {err}\n"
        f"Whatever was executed is at {out}; the run is not marked done."
    )


def execute_plan(config: RunsConfig, profile: str, planned: list[PlannedRun],
                 log_output: bool = False, echo=print) -> dict[str, dict]:
    """Execute the planned runs in order; stop at the first failure (RunFailed). Always rewrites
    the reproducibility record. Returns the new state."""
    import papermill

    env = collect_environment()
    hw = hardware_summary(env["hardware"])
    with _lock(config):
        state = read_state(config)
        executed: set[str] = set()
        try:
            for p in planned:
                run = p.run
                if p.action == "not-in-profile":
                    _write_stub(config, p, profile)
                    state[run.name] = {"key": p.key, "profile": profile, "status": "not-in-profile"}
                    _write_state(config, state)
                    continue
                if p.action != "execute":
                    echo(f"[skip] {run.name}: {p.reason}")
                    continue
                echo(f"[run ] {run.name}: {rel_path(run.notebook, config.root)} -> "
                     f"{rel_path(run.output, config.root)} ({p.reason})")
                # The old record goes first: from here on the output is not a valid result.
                state.pop(run.name, None)
                _write_state(config, state)
                _reset_dir(run.output_dir, config, create="output_dir" in run.parameters)
                rss_before = kernels_peak_rss_gib()
                t0 = time.perf_counter()
                try:
                    with ChildrenPeakRSS() as page_rss:
                        papermill.execute_notebook(
                            str(run.notebook), str(run.output), parameters=run.parameters,
                            kernel_name=KERNEL_NAME, progress_bar=True, log_output=log_output,
                            cwd=str(config.root),
                        )
                except Exception as err:  # noqa: BLE001 -- any failure stops the book; re-raised
                    raise RunFailed(_failure_message(run, config, err)) from err
                wall = time.perf_counter() - t0
                rss_after = kernels_peak_rss_gib()
                # This page's kernel's own high-water mark where /proc shows it; else the running
                # maximum over every kernel so far, exact only when this page raised it.
                exact = page_rss.peak_gib > 0 or rss_after > rss_before
                rss_page = page_rss.peak_gib if page_rss.peak_gib > 0 else rss_after
                _annotate(p, profile, config, wall)
                state[run.name] = {
                    "key": p.key, "profile": profile, "status": "done",
                    "notebook": rel_path(run.notebook, config.root),
                    "parameters": run.parameters, "wall_time_s": round(wall, 3),
                    "executed_at": now_utc(), "hardware": hw,
                    "peak_rss_gib": round(rss_page, 2),
                    "peak_rss_exact": exact,
                }
                _write_state(config, state)
                executed.add(run.name)
                echo(f"[done] {run.name}: {wall:.1f} s, {rss_label(state[run.name])}")
        finally:
            write_reproducibility(config, profile, planned, state, executed, env)
    return state


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (Linux /proc; [] where it is absent)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _hwm_kib(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM, KiB); 0 once it is gone or where /proc lacks it."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class ChildrenPeakRSS:
    """The largest peak resident memory (VmHWM) of any process below this one while the block runs,
    read from /proc every ``interval`` seconds by a background thread: one page's kernel on its own.
    ``getrusage(RUSAGE_CHILDREN)`` gives only the maximum over every kernel of the build so far, so
    after the largest page each later page would read "at most that". The high-water mark only
    grows, so sampling misses nothing but the last interval before a process exits. ``peak_gib`` is
    0 where /proc is not there (macOS, Windows)."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_gib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        todo, seen, peak = _children(os.getpid()), set(), 0
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            peak = max(peak, _hwm_kib(pid))
            todo += _children(pid)
        self.peak_gib = max(self.peak_gib, peak / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "ChildrenPeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def kernels_peak_rss_gib() -> float:
    """The largest peak resident memory of any finished child process (the notebooks' kernels), in
    GiB; 0 where the platform does not report it. Linux reports ru_maxrss in KiB, macOS in bytes."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _reset_dir(path: Path, config: RunsConfig, create: bool) -> None:
    """Empty a run's artifact folder so no figure of an earlier execution survives a re-run
    (created only for notebooks that declare ``output_dir``)."""
    import shutil

    if config.runs_dir not in path.parents:  # never delete outside the runs folder
        raise RunsConfigError(f"refusing to clear {path}: not under {config.runs_dir}")
    if path.exists():
        shutil.rmtree(path)
    if create:
        path.mkdir(parents=True)


