"""`make bench`: every benchmark of the project, each printing its table."""

from __future__ import annotations

import argparse
import importlib
import os
import platform

import torch

from bench import projection

MODULES = ["bench.bench_train", "bench.bench_extraction", "bench.bench_gemma3", "bench.bench_buffer",
           "bench.bench_sparse_l1", "bench.bench_time_to_quality", "bench.bench_browser", "bench.bench_auroc",
           "bench.bench_methods", "bench.bench_batchtopk_step"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(f"# {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    results = {}
    for name in MODULES:
        mod = importlib.import_module(name)
        print(f"\n## {name}  (load average {os.getloadavg()[0]:.1f} at start)\n", flush=True)
        rows = results[name] = mod.run(quick=args.quick)
        print(mod.format_rows(rows) if hasattr(mod, "format_rows") else "\n".join(map(str, rows)), flush=True)
    if not args.quick:  # the projection needs the Gemma-shape rows
        print("\n## projected CPU wall time of the gemma-2-2b profile's runs\n")
        print(projection.format_rows(projection.project(results)))
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
