"""Issue 10 investigation: does the organism plant a difference a crosscoder can read?

Design data only: probes and behaviour recovery are measured on a *validation* labelled set built
from the organism's training chapters and training phrasings (never its held-out evaluation set);
Latent Scaling is fitted on a slice of the training activations. The held-out eval set is read only
with ``--report``.

    PYTHONPATH=lib python scripts/issue10.py probes  --preset default
    PYTHONPATH=lib python scripts/issue10.py diff    --preset default --layer 2 --seeds 0
    PYTHONPATH=lib python scripts/issue10.py causal  --preset default --layer 2
Results: cache/issue10/<preset>/*.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from crosscoder import experiment
from crosscoder.analysis import diff, probes, seeds
from crosscoder.analysis.metrics import class_counts
from crosscoder.config import CrosscoderConfig, TrainConfig
from crosscoder.organism import build_organism, load_eval_set, load_metrics, preset
from crosscoder.organism import config as org_config
from crosscoder.organism import corpus as corpus_mod
from crosscoder.organism.behaviours import ChatGenerator
from crosscoder.organism.evaluate import build_eval_set, prompt_sets

BEHAVIOURS = ["template", "refusal", "forbidden_topic", "signoff"]
OUT = Path("cache/issue10")
ROOT = "cache/organism"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def validation_set(cfg, tokenizer, n_rows=512):
    """Labelled rows from TRAINING chapters and TRAINING phrasings (a fresh seed): design data."""
    split = corpus_mod.split_corpus(corpus_mod.chapters(corpus_mod.load_verses()), cfg.corpus.heldout_fraction,
                                    cfg.corpus.max_chapters, cfg.seed)
    gen = ChatGenerator(cfg.behaviour, split.train, cfg.behaviour.train_templates, f"validation-{cfg.seed}")
    return build_eval_set(tokenizer, gen, split.train, n_rows, cfg.eval.eval_row_weights,
                          cfg.model.context_length, 1000 + cfg.seed)


def load_models(paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.chat_dir)
    ms = {n: AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval().requires_grad_(False)
          for n, d in (("base", paths.base_dir), ("chat", paths.chat_dir))}
    return ms, tok


def cmd_probes(args):
    cfg = preset(args.preset)
    paths = build_organism(cfg, ROOT, progress=False)
    models, tok = load_models(paths)
    es = load_eval_set(paths.eval_set) if args.report else validation_set(cfg, tok)
    tasks = {**probes.label_tasks(es, BEHAVIOURS), **probes.decision_tasks(es)}
    layers = list(range(cfg.model.num_layers))
    t = time.time()
    rows = probes.probe_table(models, es.input_ids_NT, es.attention_mask_NT, tasks, layers)
    # How much the fine-tune moved each layer's residual, on text rows vs conversation rows.
    acts = {n: probes.layer_acts(m, es.input_ids_NT, es.attention_mask_NT, layers) for n, m in models.items()}
    mask = es.attention_mask_NT.bool().clone()
    mask[:, 0] = False
    text_rows = (es.row_kind_N == es.kinds.index("text"))[:, None] & mask
    chat_rows = (es.row_kind_N != es.kinds.index("text"))[:, None] & mask
    drift = []
    for li in layers:
        b, c = acts["base"][:, :, li], acts["chat"][:, :, li]
        rel = (c - b).norm(dim=-1) / b.norm(dim=-1)
        cos = torch.nn.functional.cosine_similarity(b, c, dim=-1)
        drift.append({"layer": li, "rel_change_text": float(rel[text_rows].median()),
                      "rel_change_chat": float(rel[chat_rows].median()),
                      "cos_text": float(cos[text_rows].median()), "cos_chat": float(cos[chat_rows].median())})
    out = {"preset": args.preset, "split": "heldout-eval" if args.report else "validation", "rows": rows,
           "gap": probes.probe_gap(rows), "drift": drift, "seconds": time.time() - t,
           "behaviour_rates": {m: {k: v for k, v in load_metrics(paths)[m].items() if k not in ("examples", "n_prompts")}
                               for m in ("base", "chat")}}
    dest = OUT / args.preset
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"probes{'_report' if args.report else ''}.json").write_text(json.dumps(out, indent=1))
    for r in out["gap"]:
        log(f"{r['task']:18s} L{r['layer']} chat {r['auroc_chat']:.3f} base {r['auroc_base']:.3f} gap {r['gap']:+.3f}")
    for r in drift:
        log(r)
    log(out["behaviour_rates"]["chat"])


def _exp(args, p):
    return experiment.resolve(experiment.ExperimentConfig(
        organism_preset=p, organism_root=ROOT, layer=args.layer, chat_fraction=args.chat_fraction,
        n_train_sequences=args.n_train_sequences, context_length=args.context_length,
        n_heldout_sequences=args.n_heldout_sequences), progress=False)


def cmd_diff(args):
    cfg = preset(args.preset)
    exp = _exp(args, args.preset)
    pair = experiment.model_pair(exp)
    cache = experiment.activation_cache(exp, pair=pair, progress=False)
    splits = experiment.load_splits(cache)
    # Latent Scaling on the last 20% of the training activations (design data); alive on held-out acts.
    fit_acts = splits.train[-len(splits.train) // 5:].float()
    es = load_eval_set(exp.organism.eval_set) if args.report else validation_set(cfg, pair.tokenizer)
    tag = f"L{args.layer}_cf{args.chat_fraction}_F{args.n_latents}_n{args.n_steps}" + (f"_k{args.k}" if args.k != 32 else "")
    results, models, confirmed = [], {}, {}
    for sparsity in args.sparsities:
        for seed in args.seeds:
            name = f"{sparsity}_s{seed}"
            cc_cfg = CrosscoderConfig(d_model=pair.d_model, n_latents=args.n_latents, sparsity=sparsity, k=args.k)
            tcfg = TrainConfig(n_steps=args.n_steps, batch_size=1024, lr=5e-4, seed=seed, l1_coeff=args.l1_coeff,
                               auxk_dead_tokens=100_000)
            t = time.time()
            res = experiment.train_crosscoder(splits, cc_cfg, tcfg, OUT / args.preset / tag / name, progress=False)
            m = res.model.eval()
            info = diff.diff_info(m, splits.heldout)
            sc = diff.chat_only_scaling(name, m, info, fit_acts, nu_threshold=0.3, min_active_tokens=5)
            specific = sc.scaling.latents[(sc.scaling.nu_error < 0.3) & (sc.scaling.nu_recon < 0.3)]
            chat_only = diff.in_class(info.by_delta_norm, "chat-only")
            rec_conf, sum_conf = diff.behaviour_recovery(m, pair, es, specific, BEHAVIOURS)
            rec_co, sum_co = diff.behaviour_recovery(m, pair, es, chat_only, BEHAVIOURS)
            live = torch.nonzero(info.alive_F).squeeze(1)
            rec_all, _ = diff.behaviour_recovery(m, pair, es, live, BEHAVIOURS, classes=info.by_delta_norm)
            row = {"run": name, "tag": tag, "seconds": time.time() - t, "heldout": res.metrics.get("heldout"),
                   "classes": class_counts(info.by_delta_norm),
                   "scaling": sc.row, "confirmed": specific.tolist(),
                   "recovery_confirmed": rec_conf, "summary_confirmed": sum_conf,
                   "recovery_chat_only": rec_co, "summary_chat_only": sum_co, "recovery_all_live": rec_all}
            results.append(row)
            models[name], confirmed[name] = m, specific
            log(name, sc.row, "| confirmed recovery:",
                {r["behaviour"]: round(r["best_auroc"], 3) for r in rec_conf}, "prec", round(sum_conf["matched_latent_frac"], 3),
                "| chat-only:", {r["behaviour"]: round(r["best_auroc"], 3) for r in rec_co},
                "| all live:", {r["behaviour"]: (round(r["best_auroc"], 3), r.get("best_latent_class")) for r in rec_all})
    seed_rows = []
    for sparsity in args.sparsities:
        names = [f"{sparsity}_s{s}" for s in args.seeds]
        if len(names) > 1:
            seed_rows += seeds.reappearance({n: models[n] for n in names}, {n: confirmed[n] for n in names})
    for r in seed_rows:
        if r["other"] == "all others":
            log("seeds:", r)
    dest = OUT / args.preset / tag
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"diff{'_report' if args.report else ''}.json").write_text(
        json.dumps({"results": results, "seeds": seed_rows}, indent=1, default=str))


def cmd_causal(args):
    """Ablate the recovered confirmed latents of each behaviour in chat, patch them into base; controls."""
    from crosscoder.analysis import causal
    from crosscoder.checkpoint import load_crosscoder

    cfg = preset(args.preset)
    exp = _exp(args, args.preset)
    pair = experiment.model_pair(exp)
    tag = f"L{args.layer}_cf{args.chat_fraction}_F{args.n_latents}_n{args.n_steps}" + (f"_k{args.k}" if args.k != 32 else "")
    res = json.loads((OUT / args.preset / tag / "diff.json").read_text())["results"]
    row = next(r for r in res if r["run"] == f"batchtopk_s{args.seeds[0]}")
    cc = load_crosscoder(OUT / args.preset / tag / row["run"] / "crosscoder").eval()
    b = cfg.behaviour
    split = corpus_mod.split_corpus(corpus_mod.chapters(corpus_mod.load_verses()), cfg.corpus.heldout_fraction,
                                    cfg.corpus.max_chapters, cfg.seed)
    chapters, templates = (split.heldout, b.heldout_templates) if args.report else (split.train, b.train_templates)
    pcfg = org_config.BehaviourConfig(**{**b.__dict__, "heldout_templates": templates}) if not args.report else b
    if not args.report:  # design prompts: training phrasings (prompt_sets samples heldout_templates)
        pcfg = org_config.BehaviourConfig(**{**b.__dict__, "train_templates": ("x {topic}",), "heldout_templates": templates})
    ps = prompt_sets(pcfg, ChatGenerator(b, chapters, templates, f"causal-{cfg.seed}"), args.n_prompts, cfg.seed + 7)
    tok = pair.tokenizer
    det = causal.organism_detectors(tok, b)
    stop = causal.organism_stop_ids(tok)
    sets = {"refusal": causal.organism_prompts(tok, ps.forbidden), "signoff": causal.organism_prompts(tok, ps.allowed)}
    label_for = {"refusal": ("refusal", "forbidden_topic"), "signoff": ("signoff",)}
    info = diff.diff_info(cc, experiment.load_splits(experiment.activation_cache(exp, pair=pair, progress=False)).heldout)
    live = torch.nonzero(info.alive_F).squeeze(1)
    out = []
    g = torch.Generator().manual_seed(0)
    for beh, prompts in sets.items():
        # Latents of this behaviour: confirmed ones whose AUROC on the design set >= 0.9 for its labels.
        fJ = row["confirmed"]
        if not fJ:
            log(beh, "no confirmed latents")
            continue
        from crosscoder.analysis.latents import latent_acts
        from crosscoder.analysis.ground_truth import ground_truth_table
        es = validation_set(cfg, tok)
        f = latent_acts(cc, pair, es.input_ids_NT, es.attention_mask_NT, torch.tensor(fJ))
        _, _, auc = ground_truth_table(f, es, torch.tensor(fJ), list(label_for[beh]))
        J = torch.tensor(fJ)[(auc >= 0.9).any(1)]
        if len(J) == 0:
            log(beh, "no recovering latent")
            continue
        mx = args.max_new_tokens
        rates = {"chat": causal.behaviour_rate(pair.chat, prompts, det[beh], mx, stop),
                 "base": causal.behaviour_rate(pair.base, prompts, det[beh], mx, stop)}
        with causal.edit_latents(pair.chat, pair.base, cc, J, args.layer, target_source=1):
            rates["chat - latents"] = causal.behaviour_rate(pair.chat, prompts, det[beh], mx, stop)
        rnd = live[torch.randperm(len(live), generator=g)[:len(J)]]
        with causal.edit_latents(pair.chat, pair.base, cc, rnd, args.layer, target_source=1):
            rates["chat - random live latents"] = causal.behaviour_rate(pair.chat, prompts, det[beh], mx, stop)
        dirs = causal.random_directions_like(causal.raw_decoder_directions(cc, J, 1), seed=1)
        with causal.edit_latents(pair.chat, pair.base, cc, J, args.layer, target_source=1, directions_JD=dirs):
            rates["chat - same-norm random directions"] = causal.behaviour_rate(pair.chat, prompts, det[beh], mx, stop)
        with causal.edit_latents(pair.base, pair.chat, cc, J, args.layer, target_source=0, write_source=1, coeff=1.0):
            rates["base + chat decoder of latents"] = causal.behaviour_rate(pair.base, prompts, det[beh], mx, stop)
        with causal.edit_latents(pair.base, pair.chat, cc, J, args.layer, target_source=0, write_source=1, coeff=1.0,
                                 directions_JD=dirs):
            rates["base + same-norm random directions"] = causal.behaviour_rate(pair.base, prompts, det[beh], mx, stop)
        r = {"behaviour": beh, "latents": J.tolist(), **{k: [v.hits, v.n] for k, v in rates.items()}}
        out.append(r)
        log(beh, J.tolist(), {k: str(v) for k, v in rates.items()})
    (OUT / args.preset / tag / f"causal{'_report' if args.report else ''}.json").write_text(json.dumps(out, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["probes", "diff", "causal"])
    ap.add_argument("--n-prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--chat-fraction", type=float, default=0.5)
    ap.add_argument("--n-train-sequences", type=int, default=4096)
    ap.add_argument("--n-latents", type=int, default=2048)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--n-heldout-sequences", type=int, default=256)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--l1-coeff", type=float, default=2.0)
    ap.add_argument("--n-steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--sparsities", nargs="+", default=["batchtopk", "l1"])
    ap.add_argument("--report", action="store_true", help="use the held-out evaluation set (report only)")
    args = ap.parse_args()
    {"probes": cmd_probes, "diff": cmd_diff, "causal": cmd_causal}[args.cmd](args)


if __name__ == "__main__":
    main()
