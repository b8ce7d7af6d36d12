"""Execute the book's parameterised notebooks with papermill, as declared in ``runs.yaml``.

``python -m report --profile P [--dry-run] [--only NAME] [--force]``

* The runs (name + notebook + base parameters) and the profiles (``smoke``, ``default``,
  ``gemma-2-2b``: per-run parameter overrides, optionally ``extends`` another profile) live in ONE
  YAML file at the repository root; its schema is documented at the top of that file.
* Every profile executes the same set of runs into the same stable paths
  ``book/_runs/<name>.ipynb`` (a run a profile ``skip``s gets a one-cell stub there), so
  ``book/_toc.yml`` never depends on the profile. The profile is recorded in each executed notebook
  (metadata + a note cell) and in the reproducibility appendix.
* Parameters are validated against each notebook's ``parameters`` cell
  (``papermill.inspect_notebook``) before anything executes: unknown names and incompatible types
  fail with one error naming the run, notebook and parameter.
* A run is skipped when its key -- a hash of the notebook source without outputs, its parameters,
  the profile, the package sources (``source_dirs``) and the keys of the runs it ``depends_on`` --
  equals the key recorded in ``book/_runs/.state.json`` (written atomically, after success only).
* The first failing run stops everything with a message naming the notebook and cell; the partially
  executed notebook stays at its output path for inspection and the run is not marked done.
* At the end (also after a failure) ``book/_runs/reproducibility.json`` and the appendix page
  ``book/_runs/reproducibility.md`` are regenerated: git commit, profile, parameters, wall times,
  package versions, hardware.
"""

from __future__ import annotations

import argparse
import logging
import sys

from report.execute import execute_plan, plan
from report.spec import (
    PlannedRun,
    RunFailed,
    RunsConfig,
    RunsConfigError,
    load_config,
    rel_path,
)

# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _print_plan(config: RunsConfig, profile: str, planned: list[PlannedRun], echo=print) -> None:
    echo(f"profile {profile!r}: {len(planned)} run(s) into {rel_path(config.runs_dir, config.root)}/")
    for p in planned:
        r = p.run
        echo(f"  {p.action:<14} {r.name:<28} {rel_path(r.notebook, config.root)} -> "
             f"{rel_path(r.output, config.root)}  [{p.reason}]  key {p.key[:12]}")
        if p.action != "not-in-profile" and r.parameters:
            echo("  " + " " * 15 + ", ".join(f"{k}={v!r}" for k, v in sorted(r.parameters.items())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m report",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True, help="profile of runs.yaml to execute")
    ap.add_argument("--config", default="runs.yaml",
                    help="path to runs.yaml (default: ./runs.yaml)")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate every run of the profile and print the plan; execute nothing")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="execute only this run (repeatable); stale dependencies run too")
    ap.add_argument("--force", action="store_true", help="execute even runs whose key is unchanged")
    ap.add_argument("--log-output", action="store_true",
                    help="stream cell outputs (e.g. tqdm bars) to the terminal")
    args = ap.parse_args(argv)
    if args.log_output:
        # papermill streams cell outputs through the "papermill" logger.
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config)
        planned = plan(config, args.profile, only=args.only, force=args.force)
        _print_plan(config, args.profile, planned)
        if args.dry_run:
            print("dry run: parameters valid; nothing executed")
            return 0
        execute_plan(config, args.profile, planned, log_output=args.log_output)
    except RunsConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n = sum(p.action == "execute" for p in planned)
    print(f"profile {args.profile!r}: {n} run(s) executed, "
          f"{sum(p.action == 'up-to-date' for p in planned)} up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
