"""Organisms that differ only in their fine-tune (a preset and its null) measure their common base
model once (organism.build.base_eval_key)."""

from __future__ import annotations

import dataclasses
import json

from crosscoder.organism import build as build_mod
from crosscoder.organism import load_metrics, preset


def test_null_build_reuses_the_base_models_measured_numbers(smoke_organism, smoke_null_organism):
    cfg, root, paths, _ = smoke_organism
    key = build_mod.base_eval_key(cfg)
    assert build_mod.base_eval_key(preset("smoke_null")) == key  # only the fine-tune differs
    # anything else the base's numbers depend on changes the key
    assert build_mod.base_eval_key(dataclasses.replace(cfg, seed=cfg.seed + 1)) != key
    assert build_mod.base_eval_key(dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, max_new_tokens=cfg.eval.max_new_tokens + 1))) != key
    assert build_mod.base_eval_key(dataclasses.replace(
        cfg, behaviour=dataclasses.replace(cfg.behaviour, refusal_phrase="No."))) != key
    record = json.loads((root / build_mod.BASE_EVAL_DIR / f"{key}.json").read_text())
    assert record == load_metrics(paths)["base"] == load_metrics(smoke_null_organism)["base"]
    assert record["n_prompts"] and "examples" in record
