"""The parameter schema: every parameter of every notebook, declared once.

A notebook's parameters are the fields of a few config dataclasses (``ExperimentConfig``, the core
``CrosscoderConfig`` / ``TrainConfig``, and one small options class per notebook for what only it
uses). A :class:`Stage` names those fields, and states the stage's default where it differs from the
owning class's (e.g. the organism's training runs use ``lr`` 5e-4 where ``TrainConfig`` follows
Kissane et al.'s 5e-5). Everything else is derived from it:

* the notebook's ``parameters`` cell (``render_parameters_cell``; a test keeps the notebooks equal
  to it, ``python -m crosscoder.schema --write`` rewrites them),
* the check of ``runs.yaml`` and of ``crosscoder.cli --set`` values (``Stage.check``),
* the configs handed to the library (``Params.build``).

Adding a hyperparameter is one field in its config class, plus a stage default where it differs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import crosscoder.progress  # noqa: F401  (first: silences tqdm.auto's widget warning before libraries import it)
from crosscoder.config import (ConfigError, CrosscoderConfig, TrainConfig, _check_float, _check_int, _DictMixin,
                               default_of, field_docs)
from crosscoder.experiment import ExperimentConfig
from crosscoder.synthetic import SyntheticConfig


class Parameter(NamedTuple):
    name: str
    """The notebook variable."""
    default: Any
    """Its default in this stage (JSON-like: tuples become lists)."""
    annotation: str
    """The owning field's type, as written in its class."""
    doc: str
    """First sentence of the owning field's docstring."""
    owner: type
    """The config class the parameter is a field of."""


# ------------------------------------------------------------------------------ per-notebook options
@dataclass
class ArtifactOptions(_DictMixin):
    """Where a profile's trained crosscoders live."""

    artifacts_dir: str = "artifacts/default"
    """Folder of the trained crosscoders (relative to the repository root)."""
    reference_dir: str = ""
    """Folder of another profile's crosscoders whose results are shown beside (e.g. artifacts/default, the toy)."""


@dataclass
class EnvironmentOptions(_DictMixin):
    """Preflight checks of the machine the book runs on."""

    require_gpu: bool = False
    """Stop unless torch sees a CUDA GPU."""
    min_gpu_memory_gib: float = 0.0
    """Stop unless the largest GPU has this much memory (GiB)."""


@dataclass
class SyntheticRunOptions(_DictMixin):
    """The synthetic planted-dictionary check (notebook 01)."""

    n_tokens: int = 60_000
    """Training tokens drawn from the planted dictionary."""
    n_exclusive: int = default_of(SyntheticConfig, "n_base_only")
    """Planted atoms only in base, and as many only in chat."""
    offset_steps: int = 3000
    """Optimiser steps of the second experiment, chat-only offsets tied to one context token vs
    spread over text tokens (0 skips it)."""

    def __post_init__(self) -> None:
        _check_int("offset_steps", self.offset_steps, 0)


@dataclass
class TrainRunOptions(_DictMixin):
    """One crosscoder training run (notebook 03)."""

    run_name: str = "l1"
    """Name of this crosscoder: its folder under artifacts_dir."""
    ce_sequences: int = 64
    """Held-out sequences for CE loss recovered."""
    stream_training: bool = False
    """Train on freshly extracted activations instead of the cache (the Gemma-scale path)."""


@dataclass
class SweepOptions(_DictMixin):
    """A sparsity sweep: one crosscoder (and SAE baseline) per lambda or k (notebooks 04 and 07)."""

    l1_values: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    """Lambda values of the L1 sweep."""
    k_values: tuple[int, ...] = (8, 16, 32, 64)
    """k values of the BatchTopK sweep (an SAE baseline of S sources gets k/S each)."""
    ce_sequences: int = 32
    """Held-out sequences for CE loss recovered (0 skips it)."""


@dataclass
class DiffOptions(_DictMixin):
    """Model diffing of trained crosscoders (notebook 05)."""

    crosscoders: tuple[str, ...] = ("l1", "batchtopk")
    """Run names (folders under artifacts_dir) to compare."""
    nu_threshold: float = 0.3
    """A chat-only latent is "truly chat-specific" when both nu_eps and nu_r are below this."""
    min_active_tokens: int = 5
    """Skip the Latent Scaling fit of latents active on fewer held-out tokens."""
    causal_prompts: int = 48
    """Held-out prompts per behaviour in the causal check (organism only; capped by the number of
    held-out phrasing x topic pairs: 36 forbidden ones in the default organism)."""
    causal_max_new_tokens: int = 64
    """Greedy token budget per prompt in the causal check (generation stops at <end_of_turn>, or as
    soon as the behaviour test is settled); the organism's own budget, room for an answer and its
    sign-off."""

    def __post_init__(self) -> None:
        _check_int("causal_prompts", self.causal_prompts, 1)
        _check_int("causal_max_new_tokens", self.causal_max_new_tokens, 1)


@dataclass
class ControlsOptions(_DictMixin):
    """The null diff and the crosscoder seeds (notebook 11)."""

    seeds: tuple[int, ...] = (1, 2)
    """Initialisation seeds trained beside each run's own (in lockstep on its batch stream)."""
    match_cos: float = 0.9
    """Decoder cosine at which a latent of another seed counts as the same latent."""
    variant: str = "marker"
    """Organism variant diffed with the same crosscoder configs (preset ``<organism_preset>_<variant>``;
    "marker" plants behaviour 4, a decision on varied words); empty to skip."""

    def __post_init__(self) -> None:
        if not isinstance(self.variant, str) or not re.match(r"^[a-z_]*$", self.variant):
            raise ConfigError(f"variant must be a preset suffix such as 'marker' (or empty), got {self.variant!r}")
        self.seeds = tuple(self.seeds)
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of non-negative integers, got {self.seeds!r}")
        _check_float("match_cos", self.match_cos, -1.0, 1.0)


@dataclass
class ScoreboardOptions(_DictMixin):
    """The scoreboard of model-diffing methods (notebook 12)."""

    methods: tuple[str, ...] = ("crosscoder_l1", "crosscoder_batchtopk", "designated_shared", "dfc", "diff_sae", "adl")
    """Diffing methods scored (``crosscoder.methods`` names); the two crosscoders are the training pages'."""
    fit_steps: int = 0
    """Optimiser steps of each method trained on the page (designated-shared, DFC, diff-SAE) at the
    crosscoders' batch size; 0: the crosscoders' own steps, so every trained method sees their tokens."""
    validation_rows: int = 512
    """Rows of the organism's validation set (training chapters and phrasings) that choose the methods'
    free flagging cuts; the held-out set only reports."""
    n_boot: int = 500
    """Bootstrap resamples of the held-out rows for each best AUROC's interval."""
    null_pair: bool = False
    """Fit every method on the null pair too (base vs a text-only fine-tune) and count what it flags there;
    the crosscoders' null copies are the controls page's (profile full)."""
    seeds: tuple[int, ...] = ()
    """More initialisation seeds per trained method, for seed agreement (the crosscoders' copies are the
    controls page's); empty: one seed."""
    causal_prompts: int = 12
    """Held-out prompts per behaviour in each method's causal check (0 skips the check); capped by the
    organism's held-out phrasing x topic pairs. Few, for the default book's budget: on its organism 16
    prompts took 26 s for the seven recovered (method, decision) pairs (one thread, a loaded machine)."""
    causal_max_new_tokens: int = 64
    """Greedy token budget per prompt in the causal check (generation stops at <end_of_turn>, or once
    the behaviour test is settled); the organism's own budget, room for an answer and its sign-off."""
    causal_unrecovered: bool = False
    """Also check the decisions a method does not recover, on its best flagged item (off: only recovered
    decisions are checked, the default book's time budget)."""

    def __post_init__(self) -> None:
        from crosscoder import methods

        self.methods = tuple(self.methods)
        unknown = sorted(set(self.methods) - set(methods.names()))
        if not self.methods or unknown or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must be distinct names of {methods.names()}, got {list(self.methods)}")
        self.seeds = tuple(self.seeds)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.seeds) or \
                len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct positive integers (0 is the training runs' own), got "
                              f"{list(self.seeds)}")
        _check_int("fit_steps", self.fit_steps, 0)
        _check_int("validation_rows", self.validation_rows, 8)
        _check_int("n_boot", self.n_boot, 0)
        _check_int("causal_prompts", self.causal_prompts, 0)
        _check_int("causal_max_new_tokens", self.causal_max_new_tokens, 1)


@dataclass
class LatentsOptions(_DictMixin):
    """Latent views and clustering of one crosscoder (notebook 06)."""

    crosscoder: str = "batchtopk"
    """Run name (folder under artifacts_dir) to inspect."""
    n_per_class: int = 4
    """Latents shown per class."""
    n_contexts: int = 5
    """Contexts shown per latent."""
    cluster_sizes: tuple[int, ...] = (4, 6, 8, 12, 16)
    """Numbers of latent families tried; the most stable (then the largest) is kept."""
    n_boot: int = 5
    """Bootstrap resamples of the held-out sequences per clustering tried."""
    replica_seed: int = -1
    """Initialisation seed of a second crosscoder (same data stream) the families are compared with;
    -1 trains none and judges stability by the bootstrap alone (profile default, whose time budget
    the second training does not fit, and the hub profiles; profile full uses seed 1)."""
    match_cos: float = 0.9
    """Decoder cosine at which a latent of the second seed counts as the same latent."""
    seed: int = 0
    """Seed of the sampling of latents, the bootstrap and the map."""


@dataclass
class PublishedOptions(_DictMixin):
    """The published-vs-ours table (notebook 08)."""

    crosscoders: tuple[str, ...] = ("l1", "batchtopk")
    """Run names (folders under artifacts_dir) to report."""


# ------------------------------------------------------------------------------ stages
class Group(NamedTuple):
    owner: type
    """A config dataclass."""
    names: tuple[str, ...]
    """Its fields that are parameters of the stage (in notebook order)."""


EXPERIMENT = (Group(ExperimentConfig, ("organism_preset", "base_model", "chat_model", "layer", "text_source",
                                       "chat_source", "chat_fraction", "context_length", "n_train_sequences",
                                       "n_heldout_sequences", "n_norm_sequences", "cache_dtype")),
              Group(ArtifactOptions, ("artifacts_dir",)))


@dataclass(frozen=True)
class Stage:
    """The parameters of one notebook: fields of config classes, with this stage's defaults."""

    name: str
    """Key of the stage (also the notebook's file stem without its number)."""
    notebook: str
    """The notebook, relative to the repository root."""
    groups: tuple[Group, ...]
    """Where each parameter is declared."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """This stage's defaults where they differ from the owning field's."""
    reserved: tuple[str, ...] = ()
    """Parameters the runner injects (``output_dir``, ``profile``), declared in the notebook only."""

    def __post_init__(self) -> None:
        seen: dict[str, type] = {}
        for g in self.groups:
            docs = field_docs(g.owner)
            names = {f.name for f in dataclasses.fields(g.owner)}
            for n in g.names:
                if n not in names:
                    raise ConfigError(f"stage {self.name!r}: {g.owner.__name__} has no field {n!r}")
                if n in seen:
                    raise ConfigError(f"stage {self.name!r}: parameter {n!r} declared by both "
                                      f"{seen[n].__name__} and {g.owner.__name__}")
                if n not in docs:
                    raise ConfigError(f"stage {self.name!r}: {g.owner.__name__}.{n} has no docstring")
                seen[n] = g.owner
        unknown = sorted(set(self.defaults) - set(seen))
        if unknown:
            raise ConfigError(f"stage {self.name!r}: defaults for unknown parameter(s) {unknown}")

    def parameters(self) -> dict[str, Parameter]:
        """Every parameter of the stage, in notebook order."""
        out: dict[str, Parameter] = {}
        for g in self.groups:
            docs = field_docs(g.owner)
            types = {f.name: f.type for f in dataclasses.fields(g.owner)}
            for n in g.names:
                value = self.defaults[n] if n in self.defaults else default_of(g.owner, n)
                out[n] = Parameter(n, _plain(value), str(types[n]), _first_sentence(docs[n]), g.owner)
        return out

    def check(self, values: Mapping[str, Any], where: str = "") -> None:
        """One error listing every unknown or ill-typed parameter in ``values``."""
        params = self.parameters()
        problems = []
        for k, v in values.items():
            if k in self.reserved:
                continue
            if k not in params:
                problems.append(f"unknown parameter {k!r} (valid: {', '.join(params)})")
            elif not _type_ok(v, params[k]):
                problems.append(f"{k} = {v!r} is not a {params[k].annotation}")
        if problems:
            raise ConfigError(f"{where or self.name}: " + "; ".join(problems))

    def load(self, values: Mapping[str, Any]) -> "Params":
        """This stage's parameter values: the defaults, overridden by ``values`` (e.g. a notebook's
        globals after papermill injected its parameters; names that are not parameters are ignored)."""
        params = self.parameters()
        chosen = {n: values.get(n, p.default) for n, p in params.items()}
        self.check(chosen)
        return Params(self, chosen)


@dataclass(frozen=True)
class Params:
    """A stage's parameter values, and the configs built from them."""

    stage: Stage
    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def build(self, cls: type, **extra: Any) -> Any:
        """An instance of config class ``cls`` from the parameters it owns (plus ``extra`` fields)."""
        params = self.stage.parameters()
        owned = {n: v for n, v in self.values.items() if params[n].owner is cls}
        try:
            return cls.from_dict({**owned, **extra}) if issubclass(cls, _DictMixin) else cls(**owned, **extra)
        except TypeError as err:
            raise ConfigError(f"cannot build {cls.__name__} from stage {self.stage.name!r}: {err}") from None

    def experiment(self) -> ExperimentConfig:
        return self.build(ExperimentConfig)

    def _preset_experiment(self, suffix: str, missing: str) -> ExperimentConfig:
        """The same experiment on the organism preset ``<organism_preset>_<suffix>``; ``missing`` ends
        the error when there is no such preset."""
        from crosscoder.organism.config import PRESETS

        name = f"{self.values['organism_preset']}_{suffix}"
        if not suffix or name not in PRESETS:
            raise ConfigError(f"organism preset {self.values['organism_preset']!r} has no {missing}")
        return dataclasses.replace(self.experiment(), organism_preset=name)

    def null_experiment(self) -> ExperimentConfig:
        """The same experiment on the organism's null fine-tune (``<preset>_null``: base vs a model
        fine-tuned with the same recipe on corpus text only)."""
        name = f"{self.values['organism_preset']}_null"
        return self._preset_experiment("null", f"null fine-tune ({name!r} is not a preset); the null diff "
                                               "needs an organism")

    def variant_experiment(self) -> ExperimentConfig:
        """The same experiment on an organism variant (preset ``<organism_preset>_<variant>``)."""
        variant = self.values["variant"]
        name = f"{self.values['organism_preset']}_{variant}"
        return self._preset_experiment(variant, f"variant {variant!r} ({name!r} is not a preset); set variant "
                                                "to '' to skip it")

    def sweep_train_config(self) -> TrainConfig:
        """The training config of every run of a sweep stage (one evaluation, at the end)."""
        return dataclasses.replace(self.build(TrainConfig), log_every=100, eval_every=self.values["n_steps"])

    def configs(self, d_model: int) -> tuple[CrosscoderConfig, TrainConfig]:
        """The crosscoder and training configs of a training stage (eval / checkpoint cadence derived
        from n_steps), for activations of width ``d_model``."""
        n = self.values["n_steps"]
        return (self.build(CrosscoderConfig, d_model=d_model),
                self.build(TrainConfig, log_every=50, eval_every=max(1, n // 10), checkpoint_every=max(1, n // 4)))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _first_sentence(doc: str) -> str:
    head = re.split(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z(])", doc)[0].rstrip(".")
    return head if len(head) <= 110 else head[:107].rstrip() + "..."


def _type_ok(value: Any, p: Parameter) -> bool:
    ann = p.annotation.replace(" ", "")
    if ann.startswith("tuple[") or ann.startswith("list["):
        inner = ann[ann.index("[") + 1:].split(",")[0].rstrip("]")
        return isinstance(value, (list, tuple)) and all(_scalar_ok(v, inner) for v in value)
    return _scalar_ok(value, ann)


def _scalar_ok(value: Any, ann: str) -> bool:
    if ann == "bool":
        return isinstance(value, bool)
    if ann == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if ann == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann == "str":
        return isinstance(value, str)
    return True


# Training stages share these: the organism experiment's choices where they differ from the
# library's Gemma-scale defaults (Kissane et al.; Minder et al. for k).
_ORGANISM_TRAINING = {"n_latents": 2048, "k": 32, "n_steps": 1500, "batch_size": 1024, "lr": 5e-4}
_SWEEP_TRAINING = {"n_latents": 1024, "n_steps": 800, "batch_size": 1024, "lr": 5e-4, "auxk_alpha": 0.0}

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("environment", "notebooks/00_environment.ipynb",
          (Group(EnvironmentOptions, ("require_gpu", "min_gpu_memory_gib")),), reserved=("profile",)),
    Stage("synthetic_crosscoder", "notebooks/01_synthetic_crosscoder.ipynb",
          (Group(SyntheticRunOptions, ("n_tokens",)),
           Group(SyntheticConfig, ("d_model", "n_shared")),
           Group(SyntheticRunOptions, ("n_exclusive", "offset_steps")),
           Group(SyntheticConfig, ("shared_cosine",)),
           Group(CrosscoderConfig, ("n_latents", "k")),
           Group(TrainConfig, ("l1_coeff", "n_steps", "lr", "seed"))),
          {"n_latents": 128, "l1_coeff": 0.5, "k": 3, "n_steps": 3000, "lr": 0.01}, reserved=("output_dir",)),
    Stage("models_and_activations", "notebooks/02_models_and_activations.ipynb",
          (*EXPERIMENT, Group(ArtifactOptions, ("reference_dir",))), reserved=("output_dir",)),
    Stage("train_crosscoder", "notebooks/03_train_crosscoder.ipynb",
          (*EXPERIMENT, Group(TrainRunOptions, ("run_name",)),
           Group(CrosscoderConfig, ("sparsity", "n_latents", "k", "centre_inputs")),
           Group(TrainConfig, ("l1_coeff", "auxk_alpha", "auxk_dead_tokens", "n_steps", "batch_size", "lr", "seed",
                               "bf16_autocast")),
           Group(TrainRunOptions, ("ce_sequences", "stream_training"))),
          _ORGANISM_TRAINING, reserved=("output_dir",)),
    Stage("frontier", "notebooks/04_frontier.ipynb",
          (*EXPERIMENT, Group(CrosscoderConfig, ("n_latents",)), Group(SweepOptions, ("l1_values", "k_values")),
           Group(TrainConfig, ("n_steps", "batch_size", "lr", "auxk_alpha")), Group(SweepOptions, ("ce_sequences",))),
          _SWEEP_TRAINING, reserved=("output_dir",)),
    Stage("model_diff", "notebooks/05_model_diff.ipynb",
          (*EXPERIMENT, Group(DiffOptions, ("crosscoders", "nu_threshold", "min_active_tokens", "causal_prompts",
                                            "causal_max_new_tokens"))),
          reserved=("output_dir",)),
    Stage("latents", "notebooks/06_latents.ipynb",
          (*EXPERIMENT, Group(LatentsOptions, ("crosscoder", "n_per_class", "n_contexts", "cluster_sizes", "n_boot",
                                               "replica_seed", "match_cos", "seed"))),
          reserved=("output_dir",)),
    Stage("crosslayer", "notebooks/07_crosslayer.ipynb",
          (*EXPERIMENT, Group(CrosscoderConfig, ("n_latents",)), Group(SweepOptions, ("k_values",)),
           Group(TrainConfig, ("n_steps", "batch_size", "lr", "auxk_alpha"))),
          _SWEEP_TRAINING, reserved=("output_dir",)),
    Stage("latent_browser", "notebooks/09_latent_browser.ipynb",
          (*EXPERIMENT, Group(LatentsOptions, ("crosscoder", "n_contexts"))), reserved=("output_dir", "profile")),
    Stage("controls", "notebooks/11_controls.ipynb",
          (*EXPERIMENT, Group(DiffOptions, ("crosscoders", "nu_threshold", "min_active_tokens")),
           Group(ControlsOptions, ("seeds", "match_cos", "variant"))), reserved=("output_dir",)),
    Stage("scoreboard", "notebooks/12_scoreboard.ipynb",
          (*EXPERIMENT, Group(DiffOptions, ("crosscoders", "nu_threshold", "min_active_tokens")),
           Group(ScoreboardOptions, ("methods", "fit_steps", "validation_rows", "n_boot", "null_pair", "seeds",
                                     "causal_prompts", "causal_max_new_tokens", "causal_unrecovered"))),
          reserved=("output_dir",)),
    Stage("at_a_glance", "notebooks/10_at_a_glance.ipynb",
          (Group(ArtifactOptions, ("artifacts_dir", "reference_dir")), Group(DiffOptions, ("crosscoders",))),
          reserved=("output_dir", "profile")),  # output_dir: its sibling folders are the other runs'
    Stage("published_vs_ours", "notebooks/08_published_vs_ours.ipynb",
          (Group(ArtifactOptions, ("artifacts_dir",)), Group(PublishedOptions, ("crosscoders",))),
          reserved=("profile",)),
)}

RESERVED_DOCS = {  # {stage} is the stage name: a direct papermill run writes under the ignored artifacts/
    "output_dir": 'output_dir = "artifacts/figures/{stage}"  # folder of this run\'s figures (injected by python -m report)',
    "profile": 'profile = "interactive"  # runs.yaml profile running this notebook (injected by python -m report)',
}


def stage_of(notebook: str | Path) -> Stage:
    """The stage whose notebook is ``notebook`` (by file name)."""
    name = Path(notebook).name
    for s in STAGES.values():
        if Path(s.notebook).name == name:
            return s
    raise ConfigError(f"{notebook} is not a stage notebook (stages: {[s.notebook for s in STAGES.values()]})")


def setup(stage: str, namespace: Mapping[str, Any]) -> Params:
    """A notebook's first call: its parameter values (defaults overridden by the injected ones)."""
    return STAGES[stage].load(namespace)


# ------------------------------------------------------------------------------ parameters cells
def render_parameters_cell(stage: Stage) -> str:
    """The ``parameters`` cell of the stage's notebook: one line per parameter, default and doc."""
    lines = [f"# Defaults from crosscoder.schema.STAGES[{stage.name!r}]; runs.yaml and papermill -p override them."]
    for p in stage.parameters().values():
        # a union (e.g. ``bool | str`` for true / false / "auto") is written out, as a string (never
        # evaluated) in the ``Union[...]`` form papermill's parameter parser reads: the runner checks a
        # profile's value against it, else against the default's type alone
        members = [m.strip() for m in p.annotation.split("|")]
        ann = f': "Union[{", ".join(members)}]"' if len(members) > 1 else ""
        lines.append(f"{p.name}{ann} = {_literal(p.default)}  # {p.doc}")
    lines += [RESERVED_DOCS[r].format(stage=stage.name) for r in stage.reserved]
    return "\n".join(lines)


def _literal(value: Any) -> str:
    if isinstance(value, (str, list)):
        return json.dumps(value)
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:_}"
    return repr(value)


def sync_notebooks(root: str | Path = ".", write: bool = False) -> list[str]:
    """Notebooks whose ``parameters`` cell differs from the schema (rewritten when ``write``)."""
    import nbformat

    stale = []
    for stage in STAGES.values():
        path = Path(root) / stage.notebook
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        if len(cells) != 1:
            raise ConfigError(f"{path} must have exactly one cell tagged 'parameters'")
        want = render_parameters_cell(stage)
        # The page shows the values the runner injected; the defaults cell is dropped from the book.
        tags = ["parameters", "remove-cell"]
        if cells[0].source != want or cells[0].metadata.get("tags") != tags:
            stale.append(stage.notebook)
            if write:
                cells[0].source = want
                cells[0].metadata["tags"] = tags
                nbformat.write(nb, path)
    return stale


def main(argv: Iterable[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stale = sync_notebooks(".", write="--write" in argv)
    verb = "rewrote" if "--write" in argv else "out of date (run python -m crosscoder.schema --write)"
    for s in stale:
        print(f"{verb}: {s}")
    return 1 if stale and "--write" not in argv else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["STAGES", "Stage", "Group", "Params", "Parameter", "setup", "stage_of", "render_parameters_cell",
           "sync_notebooks"]
