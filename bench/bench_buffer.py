"""Host cost of ``StreamingBuffer.batches`` (refill, shuffle, slicing), without the models: the
refill as first written (one ``torch.cat`` of the whole buffer per fresh forward batch, quadratic in
the buffer size) against the library's (the forward batches collected, one ``torch.cat`` per refill),
in the same process on the same replayed rows.

The rows are one pre-made forward batch (``FORWARD_BATCH`` sequences of ``T - 1`` body tokens),
replayed forever, so the figure is the buffer's own work per served token. Both variants serve the
same batches (checked on the last timed batch; tests/test_activations.py checks every batch).
Figures: us per served token in steady state (two refill cycles after the initial fill) and the
initial fill. The cost per token scales with the row's bytes (2 * d * 4 for fp32 rows); the
Gemma shape has d = 2,304 (18 KiB per row), the benchmark d = 256 to fit the 2-core bench machine.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from crosscoder.data.buffer import StreamingBuffer

FORWARD_BATCH = 16  # StreamingBuffer's default sequences per forward batch


class _Replay(StreamingBuffer):
    """A StreamingBuffer whose forward batches are one pre-made chunk of rows, replayed."""

    def __init__(self, acts: Tensor, batch_size: int, buffer_tokens: int):
        super().__init__(None, None, batch_size, buffer_tokens=buffer_tokens, rank=0, world=1)  # type: ignore[arg-type]
        self._acts = acts
        self._ids = torch.stack([torch.zeros(acts.shape[0], dtype=torch.int64),
                                 torch.arange(acts.shape[0], dtype=torch.int64)], 1)

    def _rows(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self._acts, self._ids


def batches_one_cat_per_chunk() -> Callable[[StreamingBuffer, int], Iterator[Tensor]]:
    """``StreamingBuffer.batches`` before the fix, the in-process baseline: the short copy of the old
    loop that tests/test_activations.py checks the library against (``_reference_batches``)."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from test_activations import _reference_batches  # noqa: PLC0415

    return lambda sb, start_step=0: (a for a, _ in _reference_batches(sb, sb._rows(), start_step))


def variants() -> dict[str, Callable[[StreamingBuffer, int], Iterator[Tensor]]]:
    return {"before: one cat per forward batch": batches_one_cat_per_chunk(),
            "after: one cat per refill (library)": StreamingBuffer.batches}


def _time_variant(fn, acts: Tensor, batch: int, size: int) -> tuple[dict, Tensor]:
    it = fn(_Replay(acts, batch, size), 0)
    t = time.perf_counter()
    next(it)
    first = time.perf_counter() - t
    n = 2 * max(1, (size // 2) // batch)  # two refill cycles
    t = time.perf_counter()
    for _ in range(n):
        last = next(it)
    dt = time.perf_counter() - t
    last = last.clone()
    del it
    gc.collect()
    return {"initial_fill_s": first, "batches_timed": n, "us_per_token": 1e6 * dt / (n * batch)}, last


def bench_buffer(d: int, T: int, batch: int, sizes: list[int]) -> list[dict]:
    torch.manual_seed(0)
    acts = torch.randn(FORWARD_BATCH * (T - 1), 2, d)
    rows = []
    for size in sizes:
        by, lasts = {}, []
        for name, fn in variants().items():
            r, last = _time_variant(fn, acts, batch, size)
            lasts.append(last)
            r.update(shape=f"d={d} buffer={size} B={batch}", variant=name,
                     chunks_per_refill=-(-(size // 2) // acts.shape[0]), buffer_mib=size * acts[0].nbytes / 2**20)
            by[name] = r
            rows.append(r)
        before, after = by.values()
        after["speedup"] = before["us_per_token"] / after["us_per_token"]
        after["same_batches"] = before["same_batches"] = bool(torch.equal(*lasts))
        if not after["same_batches"]:
            raise AssertionError(f"buffer {size}: the two refills served different batches")
    return rows


def run(quick: bool = False) -> list[dict]:
    if quick:  # 16 x 127-row forward batches, 4 and 8 of them per refill
        return bench_buffer(64, 128, 256, [1 << 13, 1 << 14])
    # 16 x 1023-row forward batches (the Gemma profile's context), 2 to 16 per refill, batch 4,096
    return bench_buffer(256, 1024, 4096, [1 << 17, 1 << 18, 1 << 19])


def format_rows(rows: list[dict]) -> str:
    head = (f"{'shape':<30} {'variant':<36} {'chunks/refill':>13} {'MiB':>6} {'fill s':>7} {'us/token':>9} "
            f"{'speed-up':>8} {'same':>5}")
    out = [head, "-" * len(head)]
    for r in rows:
        sp = f"{r['speedup']:>8.2f}" if "speedup" in r else f"{'':>8}"
        out.append(f"{r['shape']:<30} {r['variant']:<36} {r['chunks_per_refill']:>13} {r['buffer_mib']:>6.0f} "
                   f"{r['initial_fill_s']:>7.3f} {r['us_per_token']:>9.3f} {sp} {str(r['same_batches']):>5}")
    return "\n".join(out)


if __name__ == "__main__":
    from bench._timing import main

    main(run, format_rows, __doc__)
