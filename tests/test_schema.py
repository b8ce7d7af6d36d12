"""The parameter schema: one declaration per parameter, from which the notebooks' parameters cells,
the runs.yaml check, the CLI's --set and the library configs are derived."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import report
from crosscoder.config import ConfigError, TrainConfig, default_of, field_docs
from crosscoder.data.cache import CacheConfig
from crosscoder.data.pair import ModelPairConfig
from crosscoder.data.text import DataConfig
from crosscoder.experiment import ExperimentConfig
from crosscoder.schema import STAGES, render_parameters_cell, setup, stage_of, sync_notebooks

ROOT = Path(__file__).resolve().parents[1]


def test_every_notebook_parameters_cell_is_the_schema():
    # A notebook whose cell was edited by hand (or a schema field added without
    # `python -m crosscoder.schema --write`) fails here.
    assert sync_notebooks(ROOT) == []
    for stage in STAGES.values():
        declared = report.inspect_parameters(ROOT / stage.notebook)
        params = stage.parameters()
        assert {k: v.default for k, v in declared.items() if k not in stage.reserved} == \
            {k: p.default for k, p in params.items()}, stage.name


def test_every_run_of_every_profile_passes_the_schema():
    config = report.load_config(ROOT / "runs.yaml")
    for profile in config.profiles:
        for run in report.validate(config, profile):
            stage_of(run.notebook).check(run.parameters, f"{profile}/{run.name}")


def test_stage_defaults_override_only_what_differs():
    """A stage default equal to its owner's default would be a second declaration of one value."""
    for stage in STAGES.values():
        params = stage.parameters()
        for name, value in stage.defaults.items():
            owner = params[name].owner
            try:
                inherited = default_of(owner, name)
            except ConfigError:  # the owner has no default (e.g. n_latents): the stage must give one
                continue
            assert inherited != value, f"{stage.name}: {name} = {value!r} repeats {owner.__name__}'s default"


@pytest.mark.parametrize("mirror, owner", [
    ("dtype", (ModelPairConfig, "dtype")), ("chat_fraction", (DataConfig, "chat_fraction")),
    ("seed", (DataConfig, "seed")), ("n_heldout_sequences", (CacheConfig, "n_heldout_sequences")),
    ("n_norm_sequences", (CacheConfig, "n_norm_sequences")), ("cache_dtype", (CacheConfig, "dtype")),
])
def test_experiment_takes_the_library_defaults_it_mirrors(mirror, owner):
    assert default_of(ExperimentConfig, mirror) == default_of(*owner)


@pytest.mark.parametrize("cls, name", [(ModelPairConfig, "layer"), (ModelPairConfig, "base"),
                                       (DataConfig, "context_length"), (DataConfig, "text_source"),
                                       (CacheConfig, "n_train_sequences")])
def test_fields_the_experiment_declares_have_no_second_default_below(cls, name):
    with pytest.raises(ConfigError, match="has no default"):
        default_of(cls, name)


def test_load_checks_types_and_names_and_builds_the_library_configs():
    p = setup("train_crosscoder", {"lr": 1e-3, "sparsity": "batchtopk", "k": 8, "unrelated_global": object()})
    cc, tc = p.configs(d_model=16)
    assert (cc.sparsity, cc.k, cc.n_latents, cc.d_model) == ("batchtopk", 8, 2048, 16)
    assert (tc.lr, tc.n_steps, tc.batch_size) == (1e-3, 1500, 1024)
    assert tc.beta1 == default_of(TrainConfig, "beta1")  # fields the stage does not expose keep theirs
    assert p.experiment() == ExperimentConfig()
    with pytest.raises(ConfigError, match=r"lr = 'fast' is not a float"):
        setup("train_crosscoder", {"lr": "fast"})
    with pytest.raises(ConfigError, match="unknown parameter 'lr_typo'"):
        STAGES["train_crosscoder"].check({"lr_typo": 1.0})
    with pytest.raises(ConfigError, match="k_values = \\[8, 'x'\\]"):
        STAGES["frontier"].check({"k_values": [8, "x"]})


def test_parameters_cell_documents_every_parameter_from_its_field_docstring():
    cell = render_parameters_cell(STAGES["train_crosscoder"])
    docs = field_docs(TrainConfig)
    assert f"lr = 0.0005  # {docs['lr'].split('(')[0].strip()}" in cell
    assert 'output_dir = "artifacts/figures/train_crosscoder"' in cell  # a direct papermill run writes ignored files
    for stage in STAGES.values():
        for p in stage.parameters().values():
            assert p.doc, f"{stage.name}.{p.name} has no documentation"


def test_a_new_field_becomes_a_parameter_with_one_declaration():
    @dataclasses.dataclass
    class Extra:
        gain: float = 0.25
        """A new knob."""

    from crosscoder.schema import Group, Stage

    stage = Stage("tmp", "notebooks/none.ipynb", (Group(Extra, ("gain",)),))
    assert stage.parameters()["gain"].default == 0.25 and "gain = 0.25  # A new knob" in render_parameters_cell(stage)
    with pytest.raises(ConfigError, match="no field 'gian'"):
        Stage("tmp", "notebooks/none.ipynb", (Group(Extra, ("gian",)),))


def test_controls_experiments_name_their_organism_presets_or_say_why_not():
    p = STAGES["controls"].load({})
    assert p.null_experiment().organism_preset == "default_null"
    assert p.variant_experiment().organism_preset == "default_marker"
    assert p.variant_experiment().layer == p.experiment().layer
    q = STAGES["controls"].load({"organism_preset": "smoke_null", "variant": "nope"})
    with pytest.raises(ConfigError, match="has no null fine-tune .*'smoke_null_null' is not a preset"):
        q.null_experiment()
    with pytest.raises(ConfigError, match="has no variant 'nope' .*set variant to '' to skip it"):
        q.variant_experiment()
