"""The report build system (python -m report): validation before execution, hash-based skipping, failure reporting, the
reproducibility record, and the conventions every notebook in notebooks/ must follow.

Execution tests use a throw-away project in tmp_path with tiny notebooks that append their run name
to ``executions.log`` (in the notebooks' working directory, the project root), so the tests count
real kernel executions rather than trusting the runner's own report.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import yaml

import report
from report.__main__ import main as run_main

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _notebook(path: Path, params: str, body: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    cell = nbformat.v4.new_code_cell(textwrap.dedent(params).strip())
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), cell]
    nb.cells += [nbformat.v4.new_code_cell(src) for src in body]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


LOG = 'with open("executions.log", "a") as fh:\n    fh.write(run_name + "\\n")'


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """Runs a -> b (b depends on a) -> c; profile `fast` extends `base` and overrides b."""
    _notebook(tmp_path / "nb" / "a.ipynb", """
        run_name = "a"  # written to the log
        n = 1  # an int
        rate = 0.5  # a float
        profile = "none"  # injected
        """, [LOG])
    _notebook(tmp_path / "nb" / "b.ipynb", """
        run_name = "b"  # written to the log
        label = "x"  # a string
        flag = False  # a bool
        maybe: "Optional[int]" = None  # optional
        output_dir = "out"  # injected
        """, [LOG, 'import pathlib\npathlib.Path(output_dir, "artifact.txt").write_text(label)'])
    _notebook(tmp_path / "nb" / "c.ipynb", 'run_name = "c"  # written to the log', [LOG])
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lib.py").write_text("VALUE = 1\n")
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n"
        "  - file: _runs/a\n  - file: _runs/b\n  - file: _runs/c\n"
        "  - file: _runs/reproducibility\n")
    _write_config(tmp_path, {
        "version": 1, "book_dir": "book", "source_dirs": ["src"],
        "runs": [
            {"name": "a", "notebook": "nb/a.ipynb", "parameters": {"n": 2}},
            {"name": "b", "notebook": "nb/b.ipynb", "parameters": {"label": "hello"},
             "depends_on": ["a"]},
            {"name": "c", "notebook": "nb/c.ipynb"},
        ],
        "profiles": {
            "base": {"description": "all runs"},
            "fast": {"description": "overrides b", "extends": "base",
                     "parameters": {"b": {"flag": True}}},
        },
    })
    return tmp_path


def _write_config(root: Path, config: dict) -> Path:
    path = root / "runs.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _edit_config(root: Path, edit) -> None:
    config = yaml.safe_load((root / "runs.yaml").read_text())
    edit(config)
    _write_config(root, config)


def _executions(root: Path) -> list[str]:
    log = root / "executions.log"
    return log.read_text().split() if log.exists() else []


def _main(root: Path, *args: str) -> int:
    return run_main(["--config", str(root / "runs.yaml"), *args])


# ----------------------------------------------------------------------------------------------
# Validation happens before anything executes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ({"b": {"lable": "typo"}},
     r"run 'b' \(nb/b.ipynb\), profile 'base': unknown parameter 'lable'"),
    ({"a": {"n": "3"}}, r"run 'a' \(nb/a.ipynb\).*parameter 'n' has type str .* expects int"),
    ({"a": {"n": 2.5}}, r"parameter 'n' has type float .* expects int"),
    ({"a": {"n": True}}, r"parameter 'n' has type bool .* expects int"),
    ({"b": {"flag": 1}}, r"parameter 'flag' has type int .* expects bool"),
    ({"b": {"maybe": "x"}}, r"parameter 'maybe' has type str .* expects int"),
    ({"a": {"rate": None}}, r"parameter 'rate' is null but the notebook expects float"),
])
def test_bad_parameter_fails_before_any_execution(project, capsys, override, expected):
    _edit_config(project, lambda c: c["profiles"]["base"].update(parameters=override))
    with pytest.raises(report.ParameterError, match=expected):
        report.plan(report.load_config(project / "runs.yaml"), "base")
    assert _main(project, "--profile", "base") == 2
    assert re.search(expected, capsys.readouterr().err)
    assert _executions(project) == [] and not (project / "book" / "_runs" / "a.ipynb").exists()


def test_compatible_types_are_accepted(project):
    _edit_config(project, lambda c: c["profiles"]["base"].update(
        parameters={"a": {"rate": 2}, "b": {"maybe": None, "flag": True}}))
    planned = report.plan(report.load_config(project / "runs.yaml"), "base")
    # every parameter is injected, the notebook's defaults included
    assert planned[0].run.parameters == {"run_name": "a", "n": 2, "rate": 2, "profile": "base"}
    assert planned[1].run.parameters["output_dir"] == "book/_runs/b"


def test_all_problems_are_reported_together(project):
    _edit_config(project, lambda c: c["profiles"]["base"].update(
        parameters={"a": {"nn": 1}, "c": {"x": 1}}))
    with pytest.raises(report.ParameterError) as err:
        report.plan(report.load_config(project / "runs.yaml"), "base")
    assert "unknown parameter 'nn'" in str(err.value) and "unknown parameter 'x'" in str(err.value)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["runs"][0]["parameters"].update(profile="x"), r"reserved.*profile"),
    (lambda c: c["runs"].reverse(), r"depends on 'a', which comes later"),
    (lambda c: c["profiles"]["base"].update(extends="fast"), r"cycle"),
    (lambda c: c["profiles"]["base"].update(skip=["a"]), r"skips run 'a' but runs 'b'"),
    (lambda c: c["runs"][0].update(paramters={}), r"runs\[0\]: unknown key\(s\) \['paramters'\]"),
    (lambda c: c["profiles"]["fast"].update(parameters={"zz": {}}), r"unknown run 'zz'"),
    (lambda c: c["runs"].append(dict(c["runs"][2])), r"duplicate run name"),
    (lambda c: c["runs"][2].update(name="d"), r"_toc.yml does not list '_runs/d'"),
    (lambda c: c["runs"][1].update(optional_depends_on=["c"]),
     r"run 'b': optional_depends_on lists \['c'\], which are not in its depends_on"),
])
def test_config_errors_name_the_problem(project, edit, expected):
    _edit_config(project, edit)
    with pytest.raises(report.RunsConfigError, match=expected):
        report.plan(report.load_config(project / "runs.yaml"), "base")


def test_unknown_profile_is_a_clear_error(project, capsys):
    assert _main(project, "--profile", "nope", "--dry-run") == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("profile", ["smoke", "default", "gemma-2-2b", "smollm2-135m", "gemma-3-270m"])
def test_dry_run_validates_every_real_profile(profile, capsys):
    assert run_main(["--config", str(ROOT / "runs.yaml"), "--profile", profile, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: parameters valid" in out
    assert f"profile={profile!r}" in out  # the profile is injected into the notebooks


def test_gemma_profile_targets_the_published_setting():
    config = report.load_config(ROOT / "runs.yaml")
    target = config.profiles["gemma-2-2b"].target
    assert target["base_model"] == "google/gemma-2-2b"
    assert target["chat_model"] == "google/gemma-2-2b-it"
    assert (target["layer"], target["n_latents"], target["l1_coeff"]) == (13, 16384, 2.0)
    assert (target["batchtopk_k"], target["n_tokens"]) == (100, 400_000_000)
    expected = config.profiles["gemma-2-2b"].expected
    assert {"wall_time", "gpu_memory"} <= set(expected)


@pytest.mark.parametrize("profile, base, chat, layer", [
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct", 15),  # 30 blocks
    ("gemma-3-270m", "google/gemma-3-270m", "google/gemma-3-270m-it", 9),  # 18 blocks
])
def test_cpu_profiles_read_a_real_pair_at_its_middle_layer(profile, base, chat, layer):
    config = report.load_config(ROOT / "runs.yaml")
    runs = {r.name: r for r in report.validate(config, profile)}
    for name in ("models_and_activations", "train_l1", "train_batchtopk", "model_diff", "latents"):
        params = runs[name].parameters
        assert (params["base_model"], params["chat_model"], params["layer"]) == (base, chat, layer), name
        assert params["organism_preset"] == "" and params["artifacts_dir"] == f"artifacts/{profile}"
    expected = config.profiles[profile].expected
    assert {"wall_time", "memory"} <= set(expected)
    assert all(text.startswith("estimate") for text in expected.values())  # declared, not measured


# ----------------------------------------------------------------------------------------------
# Keys and skipping
# ----------------------------------------------------------------------------------------------


def _actions(root: Path, profile: str = "base", **kw) -> dict[str, str]:
    planned = report.plan(report.load_config(root / "runs.yaml"), profile, **kw)
    return {p.run.name: p.action for p in planned}


def test_second_run_executes_nothing_and_a_changed_parameter_reruns_only_its_run(project):
    assert _main(project, "--profile", "base") == 0
    assert _executions(project) == ["a", "b", "c"]
    assert (project / "book" / "_runs" / "b" / "artifact.txt").read_text() == "hello"

    assert _main(project, "--profile", "base") == 0
    assert _executions(project) == ["a", "b", "c"]

    # Giving a parameter its default value changes nothing that is injected: no rerun ...
    _edit_config(project, lambda c: c["runs"][2].update(parameters={"run_name": "c"}))
    assert _main(project, "--profile", "base") == 0
    assert _executions(project) == ["a", "b", "c"]
    # ... another value reruns that run only.
    _edit_config(project, lambda c: c["runs"][2].update(parameters={"run_name": "c2"}))
    assert _main(project, "--profile", "base") == 0
    assert _executions(project) == ["a", "b", "c", "c2"]

    state = json.loads((project / "book" / "_runs" / ".state.json").read_text())
    assert set(state["runs"]) == {"a", "b", "c"}
    assert all(r["wall_time_s"] > 0 and r["status"] == "done" for r in state["runs"].values())
    # every kernel's peak memory is recorded: a kernel holds at least its interpreter (> 10 MiB)
    assert all(r["peak_rss_gib"] > 0.01 for r in state["runs"].values())
    nb = nbformat.read(project / "book" / "_runs" / "a.ipynb", 4)
    assert nb.metadata["crosscoder_run"]["profile"] == "base"
    assert any("--profile base" in c.source for c in nb.cells if c.cell_type == "markdown")


def test_keys_follow_inputs_not_noise(project):
    assert _main(project, "--profile", "base") == 0
    assert set(_actions(project).values()) == {"up-to-date"}

    # Re-saving a notebook with outputs and execution counts changes nothing ...
    nb_path = project / "nb" / "c.ipynb"
    nb = nbformat.read(nb_path, 4)
    nb.cells[2].execution_count = 7
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="noise")]
    nbformat.write(nb, nb_path)
    assert set(_actions(project).values()) == {"up-to-date"}
    # ... editing its source re-runs it, and editing an upstream notebook re-runs its dependants.
    nb.cells[2].source += "\n# edited"
    nbformat.write(nb, nb_path)
    assert _actions(project) == {"a": "up-to-date", "b": "up-to-date", "c": "execute"}
    a = nbformat.read(project / "nb" / "a.ipynb", 4)
    a.cells[2].source += "\n# edited"
    nbformat.write(a, project / "nb" / "a.ipynb")
    assert _actions(project) == {"a": "execute", "b": "execute", "c": "execute"}
    # A profile change, a library change, --force, a deleted output: all re-execute.
    assert _main(project, "--profile", "base") == 0
    assert set(_actions(project, "fast").values()) == {"execute"}
    (project / "src" / "lib.py").write_text("VALUE = 2\n")
    assert set(_actions(project).values()) == {"execute"}
    assert _main(project, "--profile", "base") == 0
    assert set(_actions(project, force=True).values()) == {"execute"}
    (project / "book" / "_runs" / "c.ipynb").unlink()
    assert _actions(project)["c"] == "execute"


def test_only_runs_the_selection_and_its_stale_dependencies(project):
    assert _actions(project, only=["c"]) == {"a": "not-selected", "b": "not-selected",
                                             "c": "execute"}
    assert _actions(project, only=["b"]) == {"a": "execute", "b": "execute", "c": "not-selected"}
    assert _main(project, "--profile", "base", "--only", "c") == 0
    assert _executions(project) == ["c"]
    with pytest.raises(report.RunsConfigError, match="--only 'zz': no such run"):
        _actions(project, only=["zz"])


def test_skipped_run_gets_a_stub_page_and_is_not_executed(project):
    _edit_config(project, lambda c: c["profiles"]["fast"].update(skip=["c"]))
    assert _main(project, "--profile", "fast") == 0
    assert _executions(project) == ["a", "b"]
    stub = nbformat.read(project / "book" / "_runs" / "c.ipynb", 4)
    assert "Profile `fast` does not execute this run" in stub.cells[0].source
    repro = json.loads((project / "book" / "_runs" / "reproducibility.json").read_text())
    assert [r["status"] for r in repro["runs"]] == ["executed", "executed", "not in profile"]
    # skipping b now: its folder (figures, files report.publish copies into the book) goes with it
    assert (project / "book" / "_runs" / "b" / "artifact.txt").read_text() == "hello"
    _edit_config(project, lambda c: c["profiles"]["fast"].update(skip=["b"]))
    assert _main(project, "--profile", "fast") == 0
    assert _executions(project) == ["a", "b", "c"] and not (project / "book" / "_runs" / "b").exists()


def test_an_optional_dependency_may_be_skipped(project):
    """A profile may skip a run another depends on when that dependency is optional: the dependent
    executes, and finds the skipped run's folder emptied (its notebook must say so)."""
    assert _main(project, "--profile", "base") == 0
    assert (project / "book" / "_runs" / "b" / "artifact.txt").is_file()
    _edit_config(project, lambda c: (c["runs"][1].update(depends_on=["a"], optional_depends_on=["a"]),
                                     c["runs"][1]["parameters"].update(run_name="b2"),
                                     c["runs"].append({"name": "d", "notebook": "nb/c.ipynb", "depends_on": ["b"],
                                                       "optional_depends_on": ["b"]}),
                                     c["profiles"]["fast"].update(skip=["a", "b"])))
    toc = project / "book" / "_toc.yml"
    toc.write_text(toc.read_text() + "  - file: _runs/d\n")
    assert _actions(project, "fast") == {"a": "not-in-profile", "b": "not-in-profile", "c": "execute",
                                         "d": "execute"}
    assert _main(project, "--profile", "fast") == 0
    assert _executions(project)[3:] == ["c", "c"]  # c, then d (the same notebook)
    assert not (project / "book" / "_runs" / "b").exists()


# ----------------------------------------------------------------------------------------------
# The provenance note
# ----------------------------------------------------------------------------------------------


def _tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


def test_provenance_note_follows_the_title_or_the_cell_tagged_for_it(project):
    """By default the note comes after the title and the injected parameters show where papermill put
    them; a notebook with a cell tagged crosscoder-provenance-here leads with its content: the note
    follows that cell and holds the parameters, whose executed cell stays in place but off the page."""
    from report.execute import PROVENANCE_HERE_TAG, PROVENANCE_TAG

    path = project / "nb" / "c.ipynb"
    nb = nbformat.read(path, 4)
    nb.cells.append(nbformat.v4.new_markdown_cell("## How this page was made", metadata={"tags": [PROVENANCE_HERE_TAG]}))
    nb.cells.append(nbformat.v4.new_markdown_cell("The end."))
    nbformat.write(nb, path)
    _edit_config(project, lambda c: c["runs"][2].update(parameters={"run_name": "c```run```"}))
    assert _main(project, "--profile", "base") == 0

    a = nbformat.read(project / "book" / "_runs" / "a.ipynb", 4)
    assert [c.cell_type for c in a.cells[:2]] == ["markdown", "markdown"] and _tags(a.cells[1]) == [PROVENANCE_TAG]
    assert "Executed by `python -m report --profile base` as run `a`" in a.cells[1].source
    injected = next(c for c in a.cells if "injected-parameters" in _tags(c))
    assert "remove-cell" not in _tags(injected) and a.cells.index(injected) > 1
    assert "hide-input" in _tags(injected)  # folded away like the code cells

    c = nbformat.read(project / "book" / "_runs" / "c.ipynb", 4)
    tags = [_tags(cell) for cell in c.cells]
    assert [PROVENANCE_TAG] not in tags[:-3] and tags[-3] == [PROVENANCE_HERE_TAG] and tags[-2] == [PROVENANCE_TAG]
    note = c.cells[-2].source
    assert "Executed by `python -m report --profile base` as run `c`" in note
    injected = next(cell for cell in c.cells if "injected-parameters" in _tags(cell))
    assert "remove-cell" in _tags(injected) and c.cells.index(injected) < c.cells.index(c.cells[-3])
    # the parameters, verbatim in a fence no backtick run of theirs closes
    assert "\n````python\n" + injected.source.rstrip() + "\n````\n" in note
    assert "run_name = " in injected.source and c.cells[-1].source == "The end."
    assert _executions(project)[-1] == "c```run```"  # the run read its injected value


# ----------------------------------------------------------------------------------------------
# Failure
# ----------------------------------------------------------------------------------------------


def test_failure_stops_and_names_notebook_and_cell(project, capsys):
    assert _main(project, "--profile", "base") == 0
    _notebook(project / "nb" / "b.ipynb", """
        run_name = "b"  # written to the log
        label = "x"  # a string
        """, [LOG, "x = 1", "raise ValueError('planted failure')"])
    _edit_config(project, lambda c: c["runs"][2].update(parameters={"run_name": "c2"}))
    assert _main(project, "--profile", "base") == 1
    err = capsys.readouterr().err
    # Cell 5 of the source notebook; In [5] because papermill's injected cell executes too.
    assert "run 'b' failed in notebook nb/b.ipynb, cell 5 (In [5] in the executed notebook" in err
    assert "raise ValueError('planted failure')" in err and "ValueError: planted failure" in err
    assert "book/_runs/b.ipynb" in err
    # a was up to date, b failed after logging, c (changed, but after the failure) never ran.
    assert _executions(project) == ["a", "b", "c", "b"]
    partial = nbformat.read(project / "book" / "_runs" / "b.ipynb", 4)
    assert any(o.get("ename") == "ValueError" for c in partial.cells for o in c.get("outputs", []))
    state = json.loads((project / "book" / "_runs" / ".state.json").read_text())["runs"]
    assert "b" not in state and "a" in state
    repro = json.loads((project / "book" / "_runs" / "reproducibility.json").read_text())
    assert [r["status"] for r in repro["runs"]] == [
        "up to date (cached)", "not executed", "stale (recorded inputs differ)"]
    # Once the notebook is fixed, the failed run executes again (it was never marked done).
    _notebook(project / "nb" / "b.ipynb", 'run_name = "b"  # log\nlabel = "x"  # str', [LOG])
    assert _actions(project)["b"] == "execute"


# ----------------------------------------------------------------------------------------------
# The reproducibility record
# ----------------------------------------------------------------------------------------------


def test_reproducibility_record_and_page(project):
    assert _main(project, "--profile", "fast") == 0
    repro = json.loads((project / "book" / "_runs" / "reproducibility.json").read_text())
    assert repro["profile"] == "fast" and repro["git"] is None  # tmp_path is no git checkout
    assert repro["packages"]["torch"] and repro["packages"]["papermill"]
    assert repro["hardware"]["cpu_count"] >= 1 and "platform" in repro["hardware"]
    b = next(r for r in repro["runs"] if r["name"] == "b")
    assert b["parameters"] == {"run_name": "b", "label": "hello", "flag": True, "maybe": None,
                               "output_dir": "book/_runs/b"}
    assert b["wall_time_s"] > 0 and b["status"] == "executed"
    page = (project / "book" / "_runs" / "reproducibility.md").read_text()
    assert "| `flag` | `true` |" in page and "extends `base`" in page.replace("Extends", "extends")


def test_type_problem_reads_annotations():
    p = report.NotebookParameter
    assert report.type_problem(None, p("x", None, "Optional[str]", "")) is None
    assert report.type_problem("s", p("x", None, "str | None", "")) is None
    assert report.type_problem(3, p("x", None, "str | None", "")) is not None
    assert report.type_problem([1, 2], p("x", (1,), None, "")) is None
    assert report.type_problem({"a": 1}, p("x", {}, None, "")) is None
    assert report.type_problem(1.0, p("x", 1, "float", "")) is None  # annotation wins over default
    # a union written as the schema renders it (TrainConfig.bf16_autocast: true, false or "auto")
    for ann in ("Union[bool, str]", "bool | str"):
        assert report.type_problem("auto", p("x", False, ann, "")) is None
        assert report.type_problem(True, p("x", False, ann, "")) is None
        assert "bool or str" in report.type_problem(3, p("x", False, ann, ""))


def test_union_parameter_is_declared_so_the_runner_reads_it():
    """papermill's parser reads the annotation the schema writes for a union, and the cell still runs."""
    from crosscoder import schema

    cell = schema.render_parameters_cell(schema.STAGES["train_crosscoder"])
    line = next(ln for ln in cell.splitlines() if ln.startswith("bf16_autocast"))
    assert line.startswith('bf16_autocast: "Union[bool, str]" = False')
    ns: dict = {}
    exec(cell, ns)  # noqa: S102 - the notebook's own parameters cell
    assert ns["bf16_autocast"] is False
    params = report.inspect_parameters(ROOT / "notebooks" / "03_train_crosscoder.ipynb")
    assert params["bf16_autocast"].annotation == "Union[bool, str]"
    assert report.type_problem("auto", params["bf16_autocast"]) is None


# ----------------------------------------------------------------------------------------------
# Conventions of the notebooks in notebooks/
# ----------------------------------------------------------------------------------------------


def test_notebooks_exist_and_every_one_is_a_run():
    assert NOTEBOOKS, "notebooks/ holds no notebooks"
    declared = {r["notebook"] for r in yaml.safe_load((ROOT / "runs.yaml").read_text())["runs"]}
    assert {f"notebooks/{p.name}" for p in NOTEBOOKS} == declared


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_stripped_with_a_documented_parameters_cell(path):
    nb = nbformat.read(path, 4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{path.name}: outputs are not stripped (clear them before committing)"
    params = report.inspect_parameters(path)  # exactly one tagged cell, literal defaults
    assert params, f"{path.name}: the parameters cell declares nothing"
    for p in params.values():
        assert p.help.strip(), f"{path.name}: parameter {p.name!r} has no comment"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), \
        f"{path.name}: the first cell must be the page title"
    for cell in nb.cells:
        if cell.cell_type == "code" and re.search(r"save_figure\(|plt\.subplots\(", cell.source):
            assert "hide-input" in cell.metadata.get("tags", []), \
                f"{path.name}: plotting cell is not tagged hide-input:\n{cell.source}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_narrative_plus_short_calls(path):
    """Loops, comprehensions and functions longer than 5 lines belong in lib (with a test); every
    plotting cell is followed by a caption (a markdown cell starting "*Figure")."""
    import ast

    nb = nbformat.read(path, 4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
            continue
        tree = ast.parse("\n".join(line for line in cell.source.splitlines() if not line.startswith(("%", "!"))))
        for node in ast.walk(tree):
            if isinstance(node, (ast.For, ast.While, ast.FunctionDef, ast.ListComp, ast.DictComp, ast.SetComp,
                                 ast.GeneratorExp)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 5, f"{path.name} cell {i}: a {type(node).__name__} of {n} lines belongs in lib"
        if "save_figure(" in cell.source:
            nxt = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
            assert nxt is not None and nxt.cell_type == "markdown" and nxt.source.startswith("*Figure"), \
                f"{path.name} cell {i}: a figure without a caption cell after it"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_each_page_records_its_own_kernels_peak_memory():
    """The runner's per-page peak is that page's process alone: a large child first, then a small
    one reads small (getrusage(RUSAGE_CHILDREN) would report the large one's peak for both)."""
    import subprocess

    from report.execute import ChildrenPeakRSS

    code = "import time; b = bytearray({n} << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)"
    with ChildrenPeakRSS(interval=0.05) as big:
        subprocess.run([sys.executable, "-c", code.format(n=300)], check=True)
    with ChildrenPeakRSS(interval=0.05) as small:
        subprocess.run([sys.executable, "-c", code.format(n=20)], check=True)
    assert 300 / 1024 <= big.peak_gib < 0.6
    assert 0.005 < small.peak_gib < 100 / 1024
