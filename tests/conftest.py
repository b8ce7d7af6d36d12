"""Fixtures shared across test files.

The smoke organism (preset ``smoke``) and its null fine-tune (``smoke_null``) are built once per
session and shared: test_organism checks them, and test_book's smoke build starts from copies of
them instead of building the same two organisms again (their folders are keyed by config hash, and a
pytest build is bit-identical to the one a notebook makes).
"""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def smoke_organism(tmp_path_factory):
    """(config, root, paths, build seconds) of the smoke organism, built once per session."""
    from crosscoder.organism import build_organism, smoke_config

    root = tmp_path_factory.mktemp("organism")
    cfg = smoke_config()
    t0 = time.perf_counter()
    paths = build_organism(cfg, root, progress=False)
    return cfg, root, paths, time.perf_counter() - t0


@pytest.fixture(scope="session")
def smoke_null_organism(smoke_organism):
    """Paths of the smoke organism's null fine-tune, built beside it (so it reuses its base)."""
    from crosscoder.organism import build_organism, preset

    _, root, _, _ = smoke_organism
    return build_organism(preset("smoke_null"), root, progress=False)
