"""Command line, also under ``torchrun`` for data parallel work.

Extract an activation cache, sharded over ranks (shard i -> rank i % world, one merged manifest)::

    torchrun --standalone --nproc_per_node 8 -m crosscoder.cli extract --profile gemma-2-2b
    python -m crosscoder.cli extract --configs extract.json --root cache/activations

``--profile`` takes the experiment of a runs.yaml profile (the ``models_and_activations`` run's
parameters, overridable with ``--set key=value``) and writes the cache the notebooks then open; paths
are relative to the folder of runs.yaml. ``--configs`` takes a JSON file
``{"pair": ModelPairConfig, "data": DataConfig, "cache": CacheConfig}``. Rerunning resumes.

Train a crosscoder, data parallel, either a training run of a profile (same configs, cache and output
folder as its notebook, which then finds the finished run), or on an activations file::

    torchrun --standalone --nproc_per_node 8 -m crosscoder.cli train --profile gemma-2-2b --run train_l1
    torchrun --nproc_per_node 2 -m crosscoder.cli train --run-config run.json \\
        --acts acts.safetensors --out runs/cc

The activations file is a safetensors file with ``train`` [N, S, D] raw activations and optionally
``heldout`` and ``norm`` (the split the normalisation factors are estimated on; defaults to
``heldout``). Under torchrun each rank takes its slice of every global batch, gradients are averaged
with ``torch.distributed`` (gloo on CPU, NCCL on GPU, one GPU per rank), and rank 0 writes the log,
the checkpoints and the final folder. Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from crosscoder.config import ConfigError, RunConfig
from crosscoder.distributed import resolve_device
from crosscoder.model import Crosscoder
from crosscoder.train import TensorBatches, train


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():  # one GPU per rank; "auto" devices resolve to this one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def cmd_train_profile(args: argparse.Namespace) -> int:
    """The training run of a runs.yaml profile, data parallel: the same configs, cache and output
    folder as its notebook, which then finds the finished run instead of training it."""
    from crosscoder import experiment

    p = _profile_parameters(args)
    if p.stage.name != "train_crosscoder":
        raise ConfigError(f"run {args.run!r} is not a training run (its notebook is {p.stage.notebook})")
    rank, world = _init_distributed()
    exp = _resolve_on_ranks(p.experiment(), rank, world, args.quiet)
    pair = experiment.model_pair(exp)
    progress = rank == 0 and not args.quiet
    splits = experiment.load_splits(experiment.activation_cache(exp, pair=pair, progress=progress))
    res = experiment.train_stage(p, exp, pair, splits, progress=progress, device=args.device)
    if rank == 0:
        print(json.dumps({"model_dir": str(res.model_dir), "world_size": world,
                          "resumed_from": res.resumed_from, "heldout": res.metrics.get("heldout", {})},
                         default=str))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.profile:
        return cmd_train_profile(args)
    if not (args.run_config and args.acts and args.out):
        raise ConfigError("train needs --profile, or all of --run-config, --acts and --out")
    run_cfg_path = Path(args.run_config)
    if not run_cfg_path.exists():
        raise ConfigError(f"--run-config {run_cfg_path} does not exist")
    run_cfg = RunConfig.from_dict(json.loads(run_cfg_path.read_text()))
    if not Path(args.acts).exists():
        raise ConfigError(f"--acts {args.acts} does not exist; write one with safetensors (key 'train')")
    tensors = load_file(args.acts)
    if "train" not in tensors:
        raise ConfigError(f"{args.acts} has no 'train' tensor (found {sorted(tensors)})")
    rank, world = _init_distributed()
    heldout = tensors.get("heldout")
    norm = tensors.get("norm", heldout)
    torch.manual_seed(run_cfg.train.seed)
    model = Crosscoder(run_cfg.model, generator=torch.Generator().manual_seed(run_cfg.train.seed))
    model.fit_normalisation_(norm)
    model.to(resolve_device(args.device))  # NCCL all-reduces GPU tensors: one GPU per rank
    data = TensorBatches(tensors["train"], run_cfg.train.batch_size, seed=run_cfg.train.seed,
                         rank=rank, world=world)
    res = train(model, data, run_cfg.train, args.out, heldout_raw_NSD=heldout,
                progress=rank == 0 and not args.quiet)
    if rank == 0:
        print(json.dumps({"model_dir": str(res.model_dir), "world_size": world,
                          "heldout": res.metrics.get("heldout", {})}, default=str))
    return 0


def _profile_parameters(args: argparse.Namespace):
    """The parameters of run ``args.run`` under ``args.profile`` (its stage's defaults, then
    runs.yaml, then --set overrides), checked against the schema like the runner checks them; then
    cd to runs.yaml's folder, where the notebooks run, so relative paths (and cache keys) agree."""
    import yaml

    from crosscoder.schema import stage_of
    from report import RunsConfigError, load_config, validate

    try:
        runs = load_config(args.runs)
        resolved = {r.name: r for r in validate(runs, args.profile)}
    except RunsConfigError as err:
        raise ConfigError(str(err)) from None
    if args.run not in resolved:
        raise ConfigError(f"--run {args.run!r} is not a run of {args.runs} (runs: {sorted(resolved)})")
    stage = stage_of(resolved[args.run].notebook)
    values = dict(resolved[args.run].given)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        values[key] = yaml.safe_load(value)  # typed like runs.yaml: 100, 0.5, true, text
    stage.check(values, f"run {args.run!r} (--set)")
    os.chdir(runs.root)
    return stage.load(values)


def _resolve_on_ranks(exp_cfg, rank: int, world: int, quiet: bool):
    """Rank 0 builds the organism (when the profile uses one) before the other ranks read it."""
    from crosscoder.experiment import resolve

    exp = resolve(exp_cfg, progress=not quiet) if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
    return exp if exp is not None else resolve(exp_cfg, progress=False)


def _add_profile_args(p: argparse.ArgumentParser, run: str | None) -> None:
    p.add_argument("--runs", default="runs.yaml", help="runs.yaml for --profile (default ./runs.yaml)")
    p.add_argument("--run", default=run, help=f"the run whose parameters to take (default {run})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter of that run")


def cmd_extract(args: argparse.Namespace) -> int:
    from crosscoder.data.pair import ModelPairConfig
    from crosscoder.data.cache import CacheConfig, build_activation_cache
    from crosscoder.data.text import DataConfig

    # Validate everything before the process group and the models start.
    if args.configs:
        path = Path(args.configs)
        if not path.exists():
            raise ConfigError(f"--configs {path} does not exist")
        blob = json.loads(path.read_text())
        missing = {"pair", "data", "cache"} - set(blob)
        if missing:
            raise ConfigError(f"--configs {path} lacks {sorted(missing)}; it needs pair, data and cache")
        pair_cfg, data_cfg = ModelPairConfig.from_dict(blob["pair"]), DataConfig.from_dict(blob["data"])
        cache_cfg, root, exp_cfg = CacheConfig.from_dict(blob["cache"]), args.root or "cache/activations", None
    else:
        exp_cfg = _profile_parameters(args).experiment()
        root = args.root or exp_cfg.cache_root
    rank, world = _init_distributed()
    if exp_cfg is not None:
        exp = _resolve_on_ranks(exp_cfg, rank, world, args.quiet)
        pair_cfg, data_cfg, cache_cfg = exp.pair_cfg, exp.data_cfg, exp.cache_cfg
    cache = build_activation_cache(pair_cfg, data_cfg, cache_cfg, root, progress=rank == 0 and not args.quiet)
    if rank == 0:
        print(json.dumps({"cache": str(cache.folder), "world_size": world,
                          "tokens": {s: v["n_tokens"] for s, v in cache.manifest["splits"].items()}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crosscoder.cli", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="build an activation cache (sharded over ranks under torchrun)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="take the experiment of this runs.yaml profile")
    src.add_argument("--configs", help="JSON {'pair': ..., 'data': ..., 'cache': ...}")
    _add_profile_args(e, "models_and_activations")
    e.add_argument("--root", help="cache root (default: the experiment's cache_root, or cache/activations)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    t = sub.add_parser("train", help="train a crosscoder (data parallel under torchrun)")
    t.add_argument("--profile", help="train run --run of this runs.yaml profile, as its notebook would")
    _add_profile_args(t, "train_l1")
    t.add_argument("--run-config", help="JSON of RunConfig: {'model': {...}, 'train': {...}}")
    t.add_argument("--acts", help="safetensors with 'train' [N,S,D] (+ 'heldout', 'norm')")
    t.add_argument("--out", help="run folder (resumed if it holds a checkpoint)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (this rank's GPU if any)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        return cmd_extract(args) if args.cmd == "extract" else cmd_train(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:  # every command may have joined a process group (torchrun)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
