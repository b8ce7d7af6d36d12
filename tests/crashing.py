"""A batch source that dies at a chosen step: the kill of the resume tests (shared by test files)."""

from __future__ import annotations

from crosscoder.train import TensorBatches


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
