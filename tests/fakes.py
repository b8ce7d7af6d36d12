"""Stand-in diffing methods for tests of the code around ``crosscoder.methods`` (shared by test files)."""

from __future__ import annotations

import torch

from crosscoder import methods


class StandInMethod(methods.Method):
    """A method with fixed items, built in the test: ``_scores`` is the subclass's; it cannot be
    trained or loaded (not registered), and it saves no tensors."""

    def __init__(self, d_model: int, n_items: int, seconds: float = 1.0, tokens: int = 1):
        super().__init__(methods.MethodConfig(), d_model, torch.arange(n_items),
                         {"cost": methods.Cost(seconds, None, 8, tokens)._asdict()})
        self._n_items = n_items

    n_items = property(lambda self: self._n_items)

    def tensors(self):
        return {}

    @classmethod
    def _from_tensors(cls, *a):
        raise NotImplementedError("a stand-in method is built in the test, never loaded")

    @classmethod
    def _fit(cls, *a, **k):
        raise NotImplementedError("a stand-in method is built in the test, never trained")
