"""The runs spec: ``runs.yaml`` (runs, profiles, parameters) and each notebook's ``parameters`` cell,
validated together before anything executes."""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import nbformat
import yaml

# Parameters the runner fills in itself when a notebook's parameters cell declares them. Giving
# them in runs.yaml is an error: they must always describe the actual execution.
RESERVED_PARAMETERS = {
    "profile": "name of the runs.yaml profile executing the notebook",
    "output_dir": "folder (relative to the repository root) for the run's figures and artifacts",
}
RUNS_SUBDIR = "_runs"  # executed notebooks land in <book_dir>/_runs/ (git-ignored build output)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SCALAR_TYPES = (type(None), bool, int, float, str)


class RunsConfigError(ValueError):
    """runs.yaml (or a notebook it names) is invalid. The message names the problem and the fix."""


class ParameterError(RunsConfigError):
    """A run's parameters do not match its notebook's ``parameters`` cell."""


class RunFailed(RuntimeError):
    """A notebook raised while executing; the message names the run, notebook and cell."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def _check_value(value: Any, where: str) -> None:
    """Parameters must be JSON-like so they hash stably and papermill can inject them."""
    if isinstance(value, _SCALAR_TYPES):
        if isinstance(value, float) and value != value:  # NaN breaks equality-based hashing
            raise RunsConfigError(f"{where}: NaN is not a valid parameter value")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise RunsConfigError(f"{where}: mapping keys must be strings, got {k!r}")
            _check_value(item, f"{where}.{k}")
        return
    raise RunsConfigError(
        f"{where}: value {value!r} has YAML type {type(value).__name__}; only null, bool, int, "
        f"float, str, lists and mappings are allowed (quote dates and other special scalars)"
    )


def _check_keys(mapping: Any, allowed: set[str], where: str,
                required: set[str] = frozenset()) -> dict:
    if not isinstance(mapping, dict):
        raise RunsConfigError(f"{where} must be a mapping, got {type(mapping).__name__}")
    unknown = sorted(k for k in mapping if k not in allowed)
    if unknown:
        raise RunsConfigError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
    missing = sorted(required - set(mapping))
    if missing:
        raise RunsConfigError(f"{where}: missing required key(s) {missing}")
    return mapping


@dataclass(frozen=True)
class RunSpec:
    """One papermill run: a notebook executed with a parameter set into ``_runs/<name>.ipynb``."""

    name: str
    """Unique id; the executed notebook is ``<book_dir>/_runs/<name>.ipynb``, listed in _toc.yml."""
    notebook: str
    """Source notebook, relative to the root (the folder holding runs.yaml)."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Base parameters shared by all profiles; profiles override single keys."""
    depends_on: tuple[str, ...] = ()
    """Earlier runs whose outputs this run reads; their keys feed this run's key."""
    optional_depends_on: tuple[str, ...] = ()
    """Members of ``depends_on`` a profile may skip while running this run: its notebook reads their
    outputs when they ran and says so when they did not (a skipped run's folder is emptied)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise RunsConfigError(
                f"run name {self.name!r} must match {_NAME_RE.pattern} (it becomes a file name)"
            )
        if not isinstance(self.notebook, str) or not self.notebook.endswith(".ipynb"):
            raise RunsConfigError(f"run {self.name!r}: notebook must be a path to an .ipynb file")
        if Path(self.notebook).is_absolute():
            raise RunsConfigError(f"run {self.name!r}: notebook path must be relative to the root")
        _check_value(self.parameters, f"run {self.name!r} parameters")
        if not isinstance(self.parameters, dict):
            raise RunsConfigError(f"run {self.name!r}: parameters must be a mapping")
        stray = [d for d in self.optional_depends_on if d not in self.depends_on]
        if stray:
            raise RunsConfigError(
                f"run {self.name!r}: optional_depends_on lists {stray}, which are not in its depends_on; "
                f"an optional dependency is still a dependency (its key feeds this run's), so list it in both")


@dataclass(frozen=True)
class ProfileSpec:
    """A named parameter set over all runs (e.g. smoke / default / gemma-2-2b)."""

    name: str
    """Profile id, passed as ``--profile``."""
    description: str
    """One paragraph for people: what this profile is for."""
    extends: str | None = None
    """Parent profile whose overrides and skips apply first."""
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-run overrides: ``{run name: {parameter: value}}``."""
    skip: tuple[str, ...] = ()
    """Runs this profile does not execute (they get a stub page); accumulates along ``extends``."""
    expected: dict[str, str] = field(default_factory=dict)
    """Declared estimates for people (wall_time, memory, hardware, access): rendered in the
    appendix and labelled as estimates, never as measurements."""
    target: dict[str, Any] = field(default_factory=dict)
    """The setting this profile replicates (e.g. hub names, layer, latents); rendered in the
    appendix. Runs consume it through YAML anchors, so it is declared once."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise RunsConfigError(f"profile name {self.name!r} must match {_NAME_RE.pattern}")
        if not isinstance(self.description, str) or not self.description.strip():
            raise RunsConfigError(f"profile {self.name!r}: give a non-empty description")
        if not isinstance(self.parameters, dict):
            raise RunsConfigError(
                f"profile {self.name!r}: parameters must map run names to mappings")
        for run, overrides in self.parameters.items():
            if not isinstance(overrides, dict):
                raise RunsConfigError(
                    f"profile {self.name!r}: parameters of run {run!r} must be a mapping"
                )
            _check_value(overrides, f"profile {self.name!r} parameters of run {run!r}")
        _check_value(self.target, f"profile {self.name!r} target")
        for k, v in self.expected.items():
            if not isinstance(v, str):
                raise RunsConfigError(
                    f"profile {self.name!r}: expected.{k} must be a string (an estimate for people)"
                )


class ResolvedRun(NamedTuple):
    """A run with its parameters resolved for one profile."""

    name: str
    notebook: Path  # absolute source notebook
    output: Path  # absolute executed notebook
    output_dir: Path  # absolute folder for the run's figures/artifacts
    given: dict[str, Any]  # parameters from runs.yaml after profile overrides
    parameters: dict[str, Any]  # the notebook's defaults, then given, then the reserved ones it declares (injected)
    in_profile: bool
    depends_on: tuple[str, ...]


class PlannedRun(NamedTuple):
    run: ResolvedRun
    key: str
    action: str  # "execute" | "up-to-date" | "not-in-profile" | "not-selected"
    reason: str


@dataclass(frozen=True)
class RunsConfig:
    """The parsed runs.yaml."""

    root: Path
    """Folder holding runs.yaml; notebook paths are relative to it; notebooks run with it as cwd."""
    runs: tuple[RunSpec, ...]
    """All runs, in execution order."""
    profiles: dict[str, ProfileSpec]
    """Profiles by name."""
    book_dir: str = "book"
    """Jupyter Book source folder, relative to the root."""
    source_dirs: tuple[str, ...] = ("lib/crosscoder",)
    """Folders whose files feed every run's key (the library the notebooks call)."""

    def __post_init__(self) -> None:
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RunsConfigError(f"duplicate run name(s) {dup} in runs.yaml")
        if not self.runs:
            raise RunsConfigError("runs.yaml declares no runs")
        seen: set[str] = set()
        for r in self.runs:
            for dep in r.depends_on:
                if dep not in names:
                    raise RunsConfigError(f"run {r.name!r} depends on unknown run {dep!r}")
                if dep not in seen:
                    raise RunsConfigError(
                        f"run {r.name!r} depends on {dep!r}, which comes later; runs execute in "
                        f"file order, so move {dep!r} above {r.name!r}"
                    )
            seen.add(r.name)
        for p in self.profiles.values():
            if p.extends is not None and p.extends not in self.profiles:
                raise RunsConfigError(f"profile {p.name!r} extends unknown profile {p.extends!r}")
            for run in list(p.parameters) + list(p.skip):
                if run not in names:
                    raise RunsConfigError(
                        f"profile {p.name!r} refers to unknown run {run!r}; runs are {names}"
                    )
        for p in self.profiles:
            self._chain(p)  # detects cycles
        for r in self.runs:
            if r.parameters.keys() & RESERVED_PARAMETERS.keys():
                raise ParameterError(self._reserved_msg(r.name, "runs", r.parameters))
        for p in self.profiles.values():
            for run, overrides in p.parameters.items():
                if overrides.keys() & RESERVED_PARAMETERS.keys():
                    raise ParameterError(self._reserved_msg(run, f"profile {p.name!r}", overrides))

    @staticmethod
    def _reserved_msg(run: str, where: str, params: dict) -> str:
        bad = sorted(params.keys() & RESERVED_PARAMETERS.keys())
        return (
            f"run {run!r} ({where}): parameter(s) {bad} are reserved -- python -m report injects "
            f"them ({'; '.join(f'{k}: {RESERVED_PARAMETERS[k]}' for k in bad)}); remove them"
        )

    @property
    def runs_dir(self) -> Path:
        return self.root / self.book_dir / RUNS_SUBDIR

    def _chain(self, profile: str) -> list[ProfileSpec]:
        """The profile and its ancestors, root ancestor first."""
        if profile not in self.profiles:
            raise RunsConfigError(
                f"unknown profile {profile!r}; runs.yaml declares {sorted(self.profiles)}"
            )
        chain: list[ProfileSpec] = []
        name: str | None = profile
        while name is not None:
            if any(p.name == name for p in chain):
                raise RunsConfigError(
                    f"profile {profile!r}: 'extends' forms a cycle through {name!r}")
            chain.append(self.profiles[name])
            name = self.profiles[name].extends
        return chain[::-1]

    def profiles_running(self, run: str) -> list[str]:
        """Names of the profiles that execute ``run`` (do not skip it along their ``extends`` chain)."""
        return [name for name in self.profiles
                if run not in {s for p in self._chain(name) for s in p.skip}]

    def resolve(self, profile: str) -> list[ResolvedRun]:
        """All runs with the profile's overrides applied (no notebook is read)."""
        chain = self._chain(profile)
        skip = {s for p in chain for s in p.skip}
        out = []
        for r in self.runs:
            given = dict(r.parameters)
            for p in chain:
                given.update(p.parameters.get(r.name, {}))
            out_dir = self.runs_dir / r.name
            for dep in r.depends_on:
                if r.name not in skip and dep in skip and dep not in r.optional_depends_on:
                    raise RunsConfigError(
                        f"profile {profile!r} skips run {dep!r} but runs {r.name!r}, which depends "
                        f"on it; skip {r.name!r} too, stop skipping {dep!r}, or list {dep!r} in the "
                        f"optional_depends_on of {r.name!r} if its notebook copes without it"
                    )
            out.append(
                ResolvedRun(
                    name=r.name,
                    notebook=self.root / r.notebook,
                    output=self.runs_dir / f"{r.name}.ipynb",
                    output_dir=out_dir,
                    given=given,
                    parameters=dict(given),
                    in_profile=r.name not in skip,
                    depends_on=r.depends_on,
                )
            )
        return out


def load_config(path: str | os.PathLike) -> RunsConfig:
    """Parse and validate runs.yaml (structure only; notebooks are checked by ``validate``)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise RunsConfigError(f"{path.name} not found at {path}; pass --config PATH")
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    top = {"version", "book_dir", "source_dirs", "runs", "profiles"}
    if not isinstance(raw, dict):
        raise RunsConfigError(f"{path.name}: top level must be a mapping")
    # Top-level keys starting with "x-" hold YAML anchors shared by several entries.
    _check_keys({k: v for k, v in raw.items() if not str(k).startswith("x-")}, top, path.name,
                required={"version", "runs", "profiles"})
    if raw["version"] != 1:
        raise RunsConfigError(f"{path.name}: unsupported version {raw['version']!r}; expected 1")
    if not isinstance(raw["runs"], list):
        raise RunsConfigError(
            f"{path.name}: 'runs' must be a list of {{name, notebook, parameters}}")
    runs = []
    for i, r in enumerate(raw["runs"]):
        _check_keys(r, {"name", "notebook", "parameters", "depends_on", "optional_depends_on"}, f"runs[{i}]",
                    required={"name", "notebook"})
        runs.append(RunSpec(
            name=r["name"], notebook=r["notebook"], parameters=dict(r.get("parameters") or {}),
            depends_on=tuple(r.get("depends_on") or ()),
            optional_depends_on=tuple(r.get("optional_depends_on") or ()),
        ))
    if not isinstance(raw["profiles"], dict) or not raw["profiles"]:
        raise RunsConfigError(f"{path.name}: 'profiles' must be a non-empty mapping")
    profiles = {}
    for name, p in raw["profiles"].items():
        _check_keys(p, {"description", "extends", "parameters", "skip", "expected", "target"},
                    f"profiles.{name}", required={"description"})
        profiles[name] = ProfileSpec(
            name=name, description=p["description"], extends=p.get("extends"),
            parameters={k: dict(v) if isinstance(v, dict) else v
                        for k, v in (p.get("parameters") or {}).items()},
            skip=tuple(p.get("skip") or ()), expected=dict(p.get("expected") or {}),
            target=dict(p.get("target") or {}),
        )
    return RunsConfig(
        root=path.parent, runs=tuple(runs), profiles=profiles,
        book_dir=raw.get("book_dir", "book"),
        source_dirs=tuple(raw.get("source_dirs", ("lib/crosscoder",))),
    )


# ----------------------------------------------------------------------------------------------
# Notebook parameters and validation
# ----------------------------------------------------------------------------------------------


class NotebookParameter(NamedTuple):
    name: str
    default: Any  # the literal value of the default
    annotation: str | None  # the type annotation as written, if any
    help: str  # the trailing comment


def inspect_parameters(notebook: Path) -> dict[str, NotebookParameter]:
    """The notebook's ``parameters`` cell, parsed by papermill; defaults must be flat literals."""
    import papermill  # deferred: papermill pulls in nbclient/jupyter machinery

    if not notebook.is_file():
        raise RunsConfigError(f"notebook {notebook} does not exist")
    nb = nbformat.read(notebook, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise RunsConfigError(
            f"notebook {notebook.name} has {len(tagged)} cells tagged 'parameters'; it needs "
            f"exactly one (flat literals, one per line, each with a comment)"
        )
    out = {}
    for name, info in papermill.inspect_notebook(str(notebook)).items():
        try:
            default = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError) as err:
            raise RunsConfigError(
                f"notebook {notebook.name}: parameter {name!r} has default {info['default']!r}, "
                f"which is not a Python literal; the parameters cell must hold flat literals"
            ) from err
        ann = info.get("inferred_type_name")
        out[name] = NotebookParameter(
            name=name, default=default, annotation=None if ann in (None, "None") else ann,
            help=info.get("help") or "",
        )
    return out


_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "list": list, "tuple": list,
          "dict": dict}


def _annotation_info(annotation: str | None) -> tuple[tuple[type, ...] | None, bool]:
    """(the annotation's types, or None if any is unknown; whether None is allowed) from an
    annotation string: one type ("float"), Optional[...], or a union ("bool | str", and
    "Union[bool, str]", the form the schema writes so that papermill's parser reads it)."""
    if not annotation:
        return None, False
    ann = annotation.strip().strip("'\"").replace(" ", "")
    allows_none = False
    m = re.fullmatch(r"(?:typing\.)?Optional\[(.*)\]", ann)
    if m:
        ann, allows_none = m.group(1), True
    m = re.fullmatch(r"(?:typing\.)?Union\[(.*)\]", ann)
    parts = m.group(1).split(",") if m else ann.split("|")
    if "None" in parts:
        allows_none = True
        parts = [p for p in parts if p != "None"]
    types = tuple(_TYPES.get(p.split("[")[0].lower()) for p in parts)
    return (types if types and all(types) else None), allows_none


def _is_instance(value: Any, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int subclass; True is never a count or a rate
        return False
    if expected is float:
        return isinstance(value, (int, float))
    if expected is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, expected)


def type_problem(value: Any, param: NotebookParameter) -> str | None:
    """Why ``value`` cannot replace the notebook default (None if it can)."""
    expected, ann_none = _annotation_info(param.annotation)
    if expected is None and param.default is not None:
        expected = (list if isinstance(param.default, tuple) else type(param.default),)
    names = " or ".join(t.__name__ for t in expected or ())
    if value is None:
        if param.default is None or ann_none or expected is None:
            return None
        return f"is null but the notebook expects {names}"
    if expected is None or any(_is_instance(value, t) for t in expected):
        return None
    return (
        f"has type {type(value).__name__} ({value!r}) but the notebook expects "
        f"{names} (default {param.default!r})"
    )


def validate(config: RunsConfig, profile: str) -> list[ResolvedRun]:
    """Resolve a profile and check every run against its notebook; raise one ParameterError
    listing all problems, before anything executes. Returns the runs with reserved parameters
    added."""
    runs = config.resolve(profile)
    problems: list[str] = []
    resolved = []
    toc = _toc_files(config)
    for run in runs:
        rel_nb = rel_path(run.notebook, config.root)
        if toc is not None and f"{RUNS_SUBDIR}/{run.name}" not in toc:
            problems.append(
                f"run {run.name!r}: {config.book_dir}/_toc.yml does not list "
                f"'{RUNS_SUBDIR}/{run.name}'; add it so the executed notebook appears in the book"
            )
        try:
            declared = inspect_parameters(run.notebook)
        except RunsConfigError as err:
            problems.append(f"run {run.name!r} ({rel_nb}): {err}")
            resolved.append(run)
            continue
        # Every parameter is injected, defaults included, so each executed page shows the complete
        # set it ran with once (the notebook's own defaults cell is removed from the book).
        params = {k: p.default for k, p in declared.items() if k not in RESERVED_PARAMETERS}
        params.update(run.given)
        if "profile" in declared:
            params["profile"] = profile
        if "output_dir" in declared:
            params["output_dir"] = rel_path(run.output_dir, config.root)
        for key, value in params.items():
            if key not in declared:
                problems.append(
                    f"run {run.name!r} ({rel_nb}), profile {profile!r}: unknown parameter {key!r}; "
                    f"the notebook's parameters cell declares {sorted(declared)}"
                )
                continue
            why = type_problem(value, declared[key])
            if why:
                problems.append(
                    f"run {run.name!r} ({rel_nb}), profile {profile!r}: parameter {key!r} {why}"
                )
        resolved.append(run._replace(parameters=params))
    if problems:
        raise ParameterError(
            f"{len(problems)} problem(s) in profile {profile!r}, found before executing anything:"
            "\n  - " + "\n  - ".join(problems)
        )
    return resolved


def _toc_files(config: RunsConfig) -> set[str] | None:
    """Every ``file:`` entry of the book's _toc.yml (without suffix), or None without a toc."""
    toc = config.root / config.book_dir / "_toc.yml"
    if not toc.is_file():
        return None
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("file", "root") and isinstance(v, str):
                    found.add(re.sub(r"\.(md|ipynb)$", "", v))
                walk(v)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(toc.read_text(encoding="utf-8")))
    return found


def rel_path(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:
        return path.as_posix()
