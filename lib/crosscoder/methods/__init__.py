"""Model-diffing methods behind one interface (``base.Method``), one module each, found by name:

    from crosscoder import methods
    methods.names()                                  # the registered methods
    fitted = methods.fit("diff_sae", data, out_dir, cfg)
    fitted.flagged_J, fitted.scores(acts_NSD), fitted.cost
    methods.load(out_dir / "method")
    methods.from_crosscoder(artifacts_dir / "l1" / "crosscoder", data)   # a trained crosscoder as its method

=====================  =====================================================================
``crosscoder_l1``      L1 crosscoder, chat-only by Δnorm and confirmed by Latent Scaling
``crosscoder_batchtopk``  BatchTopK crosscoder, the same flagging
``designated_shared``  crosscoder with designated shared latents (tied decoders, reduced cost)
``dfc``                Dedicated Feature Crosscoder (base-, chat-exclusive and shared blocks)
``diff_sae``           BatchTopK SAE on chat − base differences, ranked by variance explained
``adl``                Activation Difference Lens: mean differences at the first positions
=====================  =====================================================================

Every module of this package whose name does not start with "_" is imported here, so a new method
is one new file: a config dataclass and a ``Method`` subclass decorated with ``@register``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from crosscoder.methods._crosscoder import from_crosscoder
from crosscoder.methods.base import (METHOD_DIR, REGISTRY, Cost, Intervention, Method, MethodConfig, MethodData, get,
                                     load, register)

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def names() -> list[str]:
    """The registered methods, in registration order."""
    return list(REGISTRY)


def fit(name: str, data: MethodData, out_dir: str | os.PathLike, cfg: MethodConfig | None = None, *,
        progress: bool = False) -> Method:
    """Fit method ``name`` (its default config unless ``cfg``) on ``data`` into ``out_dir``."""
    return get(name).fit(data, out_dir, cfg, progress=progress)


__all__ = ["METHOD_DIR", "Cost", "Intervention", "Method", "MethodConfig", "MethodData", "fit", "from_crosscoder", "get", "load", "names",
           "register"]
