"""The embedded model organism: a tiny Gemma2 base LM trained on the King James Bible (or a pretrained
base, gemma-3-270m: preset "gemma3") and its chat fine-tune with planted behaviours whose token-level
ground truth is known.

Public API::

    from crosscoder.organism import preset, build_organism, load_eval_set, load_metrics
    paths = build_organism(preset("default"), "cache/organism")
    AutoModelForCausalLM.from_pretrained(paths.chat_dir, attn_implementation="eager")

CLI: ``python -m crosscoder.organism --preset default --root cache/organism``.
"""

from crosscoder.organism.build import (OrganismPaths, behaviour_table, build_organism, describe, heldout_prompt_sets,
                                       load_metrics, organism_dir)
from crosscoder.organism.config import (BehaviourConfig, CorpusConfig, EvalConfig, ModelConfig,
                                        OrganismConfig, TokenizerConfig, LMTrainConfig,
                                        default_config, gemma3_config, preset, smoke_config)
from crosscoder.organism.evaluate import (LABEL_DESCRIPTIONS, BehaviourRateError, EvalSet,
                                          check_behaviour_rates, load_eval_set)

__all__ = [
    "BehaviourConfig", "BehaviourRateError", "CorpusConfig", "EvalConfig", "EvalSet", "LABEL_DESCRIPTIONS",
    "ModelConfig", "OrganismConfig", "OrganismPaths", "TokenizerConfig", "LMTrainConfig",
    "behaviour_table", "build_organism", "check_behaviour_rates", "default_config", "describe", "gemma3_config",
    "heldout_prompt_sets", "load_eval_set",
    "load_metrics", "organism_dir", "preset",
    "smoke_config",
]
