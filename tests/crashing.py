"""A batch source that dies at a chosen step: the kill of the resume tests (shared by test files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crosscoder.train import TensorBatches, train


class Crash(RuntimeError):
    pass


class CrashingBatches(TensorBatches):
    def __init__(self, *a, crash_at: int, **kw):
        super().__init__(*a, **kw)
        self.crash_at = crash_at

    def batches(self, start_step):
        for i, b in enumerate(super().batches(start_step)):
            if start_step + i == self.crash_at:
                raise Crash("simulated kill")
            yield b


def crash_and_resume(fresh, acts, heldout, tc, root: Path, *, crash_at: int = 27, batch_size: int = 256):
    """Train ``fresh()`` uninterrupted in ``root/ref``; train it again in ``root/run``, killed at step
    ``crash_at`` (no finished folder left) and resumed: the resumed run must end with the
    uninterrupted run's exact weights and log. Returns (uninterrupted, resumed) results."""
    ref = train(fresh(), TensorBatches(acts, batch_size), tc, root / "ref", heldout_raw_NSD=heldout, progress=False)
    with pytest.raises(Crash):
        train(fresh(), CrashingBatches(acts, batch_size, crash_at=crash_at), tc, root / "run",
              heldout_raw_NSD=heldout, progress=False)
    assert not (root / "run" / "crosscoder").exists()
    res = train(fresh(), TensorBatches(acts, batch_size), tc, root / "run", heldout_raw_NSD=heldout, progress=False)
    for (k, v), (_, v2) in zip(ref.model.state_dict().items(), res.model.state_dict().items()):
        assert torch.equal(v, v2), k
    assert (root / "ref" / "log.jsonl").read_text() == (root / "run" / "log.jsonl").read_text()
    return ref, res
