"""The report side: the notebook build system that executes the book's papermill runs, and the
figure module the notebooks plot with.

``python -m report --profile P [--dry-run] [--only NAME] [--force]`` executes the runs of a
``runs.yaml`` profile (see ``report.__main__``). Modules: ``spec`` (runs.yaml and the notebooks'
parameters cells, validated before anything executes), ``execute`` (keys, state, planning,
papermill execution), ``record`` (the reproducibility appendix), ``plotting`` (every figure).

The public names of the build system are re-exported here.
"""

from report.execute import execute_plan, notebook_source_hash, plan, read_state, sources_hash
from report.record import collect_environment, package_versions, render_reproducibility, write_reproducibility
from report.spec import (RESERVED_PARAMETERS, NotebookParameter, ParameterError, PlannedRun, ResolvedRun,
                         RunFailed, RunsConfig, RunsConfigError, inspect_parameters, load_config, type_problem,
                         validate)

__all__ = ["RESERVED_PARAMETERS", "NotebookParameter", "ParameterError", "PlannedRun", "ResolvedRun", "RunFailed",
           "RunsConfig", "RunsConfigError", "collect_environment", "execute_plan", "inspect_parameters",
           "load_config", "notebook_source_hash", "package_versions", "plan", "read_state",
           "render_reproducibility", "sources_hash", "type_problem", "validate", "write_reproducibility"]
