"""Shared timers for the benchmarks: best of ``reps`` after ``warmup`` untimed calls."""

from __future__ import annotations

import time
from typing import Callable


def best_time(fn: Callable[[], object], warmup: int = 1, reps: int = 3) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_times_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 1, reps: int = 3) -> dict[str, float]:
    """Best time of each function, timed in turns (a, b, c, a, b, c, ...): on a shared machine a
    burst of outside load then hits every variant alike, so their ratios stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def main(run: Callable[[bool], list[dict]], format_rows: Callable[[list[dict]], str], doc: str) -> None:
    """The command line of a benchmark module: ``--quick`` for tiny shapes, the rows printed."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke check, not a figure)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(format_rows(run(args.quick)))
