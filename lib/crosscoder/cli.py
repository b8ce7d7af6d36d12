"""Command line, also under ``torchrun`` for data parallel work.

Extract an activation cache, sharded over ranks (shard i -> rank i % world, one merged manifest)::

    torchrun --standalone --nproc_per_node 8 -m crosscoder.cli extract --profile gemma-2-2b
    python -m crosscoder.cli extract --configs extract.json --root cache/activations

``--profile`` takes the experiment of a runs.yaml profile (the ``models_and_activations`` run's
parameters, overridable with ``--set key=value``) and writes the cache the notebooks then open; paths
are relative to the folder of runs.yaml. ``--configs`` takes a JSON file
``{"pair": ModelPairConfig, "data": DataConfig, "cache": CacheConfig}``. Rerunning resumes.

Train a crosscoder, data parallel::

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
from crosscoder.model import Crosscoder
from crosscoder.normalise import estimate_input_scale
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


def cmd_train(args: argparse.Namespace) -> int:
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
    if norm is not None:
        model.input_scale_S.copy_(estimate_input_scale(norm))
    data = TensorBatches(tensors["train"], run_cfg.train.batch_size, seed=run_cfg.train.seed,
                         rank=rank, world=world)
    res = train(model, data, run_cfg.train, args.out, heldout_raw_NSD=heldout,
                progress=rank == 0 and not args.quiet)
    if rank == 0:
        print(json.dumps({"model_dir": str(res.model_dir), "world_size": world,
                          "heldout": res.metrics.get("heldout", {})}, default=str))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _experiment_from_profile(args: argparse.Namespace):
    """The ExperimentConfig of a runs.yaml profile's extraction run, with --set overrides."""
    import dataclasses

    import yaml

    from crosscoder.pipeline import ExperimentConfig
    from crosscoder.runs import RunsConfigError, load_config

    try:
        runs = load_config(args.runs)
        resolved = {r.name: r for r in runs.resolve(args.profile)}
    except RunsConfigError as err:
        raise ConfigError(str(err)) from None
    if args.run not in resolved:
        raise ConfigError(f"--run {args.run!r} is not a run of {args.runs} (runs: {sorted(resolved)})")
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    params = {k: v for k, v in resolved[args.run].given.items() if k in names}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(names)}")
        params[key] = yaml.safe_load(value)  # typed like runs.yaml: 100, 0.5, true, text
    os.chdir(runs.root)  # the notebooks run there, so relative paths (and cache keys) agree
    return ExperimentConfig.from_dict(params)


def cmd_extract(args: argparse.Namespace) -> int:
    from crosscoder.activations import ModelPairConfig
    from crosscoder.cache import CacheConfig, build_activation_cache
    from crosscoder.textdata import DataConfig

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
        exp_cfg = _experiment_from_profile(args)
        root = args.root or exp_cfg.cache_root
    rank, world = _init_distributed()
    if exp_cfg is not None:
        from crosscoder.pipeline import resolve

        # rank 0 builds the organism (when the profile uses one) before the others read it
        if rank == 0:
            exp = resolve(exp_cfg, progress=not args.quiet)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            exp = resolve(exp_cfg, progress=False)
        pair_cfg, data_cfg, cache_cfg = exp.pair_cfg, exp.data_cfg, exp.cache_cfg
    cache = build_activation_cache(pair_cfg, data_cfg, cache_cfg, root, progress=rank == 0 and not args.quiet)
    if rank == 0:
        print(json.dumps({"cache": str(cache.folder), "world_size": world,
                          "tokens": {s: v["n_tokens"] for s, v in cache.manifest["splits"].items()}}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crosscoder.cli", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="build an activation cache (sharded over ranks under torchrun)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="take the experiment of this runs.yaml profile")
    src.add_argument("--configs", help="JSON {'pair': ..., 'data': ..., 'cache': ...}")
    e.add_argument("--runs", default="runs.yaml", help="runs.yaml for --profile (default ./runs.yaml)")
    e.add_argument("--run", default="models_and_activations", help="the run whose parameters to take")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an experiment parameter")
    e.add_argument("--root", help="cache root (default: the experiment's cache_root, or cache/activations)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    t = sub.add_parser("train", help="train a crosscoder (data parallel under torchrun)")
    t.add_argument("--run-config", required=True, help="JSON of RunConfig: {'model': {...}, 'train': {...}}")
    t.add_argument("--acts", required=True, help="safetensors with 'train' [N,S,D] (+ 'heldout', 'norm')")
    t.add_argument("--out", required=True, help="run folder (resumed if it holds a checkpoint)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        return cmd_extract(args) if args.cmd == "extract" else cmd_train(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
