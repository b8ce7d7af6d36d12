"""One end-to-end check of the Gemma-scale *streaming* training path (``train_crosscoder_streaming``)
on a GPU, which the tests (pinned to the CPU) do not cover.

On a tiny random Gemma2 base/chat pair with the Gemma-style tokenizer and local data files in the
schemas of pile-uncopyrighted and lmsys-chat-1m, laid out as a hub-style (non-organism) experiment:

1. an L1 crosscoder, trained streaming with a large lambda, counting the steps that took the sparse
   and the dense L1 path (``kernels.L1_SPARSE_MAX_DENSITY``) and the batch densities;
2. a BatchTopK crosscoder with AuxK on (a short dead window so AuxK engages);
3. resume: each run is repeated, interrupted right after its mid-run checkpoint and resumed; the
   final parameters are compared with the uninterrupted run (max abs difference, reported only).

Writes summary.json / summary.md (and the runs' logs) to ``--out`` (default ``$OUT``).

    PYTHONPATH=lib:. python3 bench/gpu_stream_check.py                    # GPU ("auto")
    PYTHONPATH=lib:. python3 bench/gpu_stream_check.py --device cpu --tiny  # seconds-long dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _helpers():
    """WORDS / _sentences of tests/test_activations.py, loaded by file path (no ``tests`` package)."""
    spec = importlib.util.spec_from_file_location("_test_activations_helpers", ROOT / "tests" / "test_activations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_world(root: Path, n_text: int, text_words: int, n_chat: int) -> dict[str, Path]:
    """Tokenizer + random Gemma2 base/chat folders + local text/chat JSONL files (as the test's fixture)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from crosscoder.organism.tokenizer import train_tokenizer

    h = _helpers()
    tok = train_tokenizer(h._sentences(300, 0), vocab_size=300)
    out = {}
    for name, seed in (("base", 0), ("chat", 1)):
        torch.manual_seed(seed)
        cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                           max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=1)
        cfg._attn_implementation = "eager"
        lm = Gemma2ForCausalLM(cfg)
        out[name] = root / name
        lm.save_pretrained(out[name])
        tok.save_pretrained(out[name])
    rng = random.Random(0)
    words = h.WORDS
    data = root / "data"
    data.mkdir()
    out["text_file"], out["chat_file"] = data / "pile.jsonl", data / "lmsys.jsonl"
    with open(out["text_file"], "w") as fh:
        for _ in range(n_text):
            n = rng.randint(text_words // 2, text_words * 3 // 2)
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n)),
                                 "meta": {"pile_set_name": "Synthetic"}}) + "\n")
    with open(out["chat_file"], "w") as fh:
        for i in range(n_chat):
            q, a = (" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) for _ in range(2))
            fh.write(json.dumps({"conversation_id": str(i), "model": "x", "language": "English",
                                 "conversation": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]}) + "\n")
    return out


class _Interrupted(Exception):
    pass


def _interrupting(base_cls, stop_step: int):
    """A StreamingBuffer that dies when asked for batch ``stop_step`` (after the checkpoint there)."""

    class Interrupting(base_cls):
        def batches(self, start_step: int = 0):
            for step, b in enumerate(super().batches(start_step), start_step):
                if step >= stop_step:
                    raise _Interrupted(f"simulated kill before step {stop_step}")
                yield b

    return Interrupting


class PathCounter:
    """Wraps kernels._l1_sparse / _l1_dense / auxk_loss (l1_step and batchtopk_step look them up
    at call time) to count which path each training step took and the batch's active fraction."""

    def __init__(self):
        from crosscoder import kernels

        self.k = kernels
        self.orig = {n: getattr(kernels, n) for n in ("_l1_sparse", "_l1_dense", "auxk_loss")}
        self.reset()

    def reset(self):
        self.paths: list[str] = []
        self.density: list[float] = []
        self.auxk_calls = 0
        self.auxk_dead: list[int] = []

    def install(self):
        k, o = self.k, self.orig

        def wrap(name, fn):
            def inner(model, x_BK, f_BF, pen):
                self.paths.append(name)
                self.density.append(float(torch.count_nonzero(f_BF)) / f_BF.numel())
                return fn(model, x_BK, f_BF, pen)
            return inner

        def aux(model, x_BSD, residual_BSD, dead_F, k_aux, **kw):
            self.auxk_calls += 1
            self.auxk_dead.append(int(dead_F.sum()))
            return o["auxk_loss"](model, x_BSD, residual_BSD, dead_F, k_aux, **kw)

        k._l1_sparse, k._l1_dense, k.auxk_loss = wrap("sparse", o["_l1_sparse"]), wrap("dense", o["_l1_dense"]), aux

    def summary(self) -> dict:
        out = {}
        if self.paths:
            first_sparse = next((i for i, p in enumerate(self.paths) if p == "sparse"), None)
            d = self.density
            out.update(flips_after_first_sparse=sum(a != b for a, b in zip(self.paths[first_sparse or 0:],
                                                                          self.paths[(first_sparse or 0) + 1:])))
            out.update(l1_steps=len(self.paths), sparse_steps=self.paths.count("sparse"),
                       dense_steps=self.paths.count("dense"), first_sparse_step=first_sparse,
                       density_first=d[0], density_min=min(d), density_last=d[-1],
                       density_at=[round(d[i], 4) for i in range(0, len(d), max(1, len(d) // 10))])
        if self.auxk_calls:
            out.update(auxk_calls=self.auxk_calls, auxk_dead_max=max(self.auxk_dead),
                       auxk_dead_last=self.auxk_dead[-1])
        return out


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _log_summary(run_dir: Path) -> dict:
    from crosscoder.train import read_log

    recs = read_log(run_dir)
    tr = [r for r in recs if r.get("split") == "train"]
    he = [r for r in recs if r.get("split") == "heldout"]
    finite = all(isinstance(v, (int, float)) and math.isfinite(v)
                 for r in recs for v in r.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
    keys = ("step", "loss", "recon_loss", "sparsity_loss", "l0", "l1_coeff", "aux_loss", "dead_latents")
    pick = lambda r: {k: (round(r[k], 5) if isinstance(r[k], float) else r[k]) for k in keys if k in r}  # noqa: E731
    out = {"log_records": len(recs), "log_all_finite": finite, "first": pick(tr[0]) if tr else None,
           "last": pick(tr[-1]) if tr else None}
    if tr:
        # loss after lambda's warm-up (it rises with lambda) vs the last logged window
        warm = next((r for r in tr if r.get("l1_coeff", 0) == tr[-1].get("l1_coeff", 0)), tr[0])
        out["after_warmup"] = pick(warm)
        out["loss_decreased"] = tr[-1]["loss"] < warm["loss"]
        out["recon_decreased_from_first_log"] = tr[-1]["recon_loss"] < tr[0]["recon_loss"]
        out["recon_decreased_after_warmup"] = tr[-1]["recon_loss"] < warm["recon_loss"]
    if he:
        out["heldout_last"] = {k: v for k, v in he[-1].items() if k in ("step", "fvu", "l0", "mse", "dead_frac")
                               or k.startswith("fvu")}
    return out


def _params_finite(model) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _max_diff(a, b) -> dict:
    sa, sb = a.state_dict(), b.state_dict()
    per = {k: float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point()}
    worst = max(per, key=per.get)
    return {"max_abs_diff": per[worst], "worst_tensor": worst,
            "max_abs_param": float(sa[worst].abs().max()), "bit_identical": all(v == 0 for v in per.values()),
            "per_tensor": {k: float(f"{v:.3e}") for k, v in per.items()}}


def _ckpt_model(run_dir: Path) -> dict:
    from crosscoder import checkpoint as ckpt

    folder = run_dir / "checkpoint"
    meta = json.loads((folder / "config.json").read_text())
    st = ckpt.load_tensors_checked(folder, "state.safetensors", meta["files"]["state.safetensors"])
    return {"step": meta["step"], **{k: v for k, v in st.items() if k.startswith("model.")}}


def _dict_diff(a: dict, b: dict) -> dict:
    keys = [k for k in a if k != "step" and torch.is_tensor(a[k]) and a[k].is_floating_point()]
    per = {k: float((a[k].double() - b[k].double()).abs().max()) for k in keys}
    worst = max(per, key=per.get)
    return {"steps": [a["step"], b["step"]], "max_abs_diff": per[worst], "worst_tensor": worst,
            "bit_identical": all(v == 0 for v in per.values())}


def _stream_replay(E, exp, pair, B: int, buffer_tokens: int, seed: int, step: int) -> dict:
    """Whether the stream serves the same batch at ``step`` when iterated from 0 twice (run-to-run
    determinism of the extraction on this device) and when started at ``step`` (what resume does)."""
    mk = lambda: E.StreamingBuffer(pair, exp.data_cfg, B, buffer_tokens=max(buffer_tokens, 4 * B),  # noqa: E731
                                   forward_batch=exp.cache_cfg.forward_batch, seed=seed)

    def nth(it, n):
        for _ in range(n):
            next(it)
        return next(it)

    a0 = mk().batches(0)
    first_a = next(a0)
    at_a = nth(a0, step - 1)
    b0 = mk().batches(0)
    first_b = next(b0)
    at_b = nth(b0, step - 1)
    at_c = next(mk().batches(step))
    d = lambda x, y: float((x.double() - y.double()).abs().max())  # noqa: E731
    return {"step": step, "first_batch_equal_2runs": bool(torch.equal(first_a, first_b)),
            "batch_at_step_equal_2runs": bool(torch.equal(at_a, at_b)), "max_diff_2runs": d(at_a, at_b),
            "batch_at_step_equal_started_there": bool(torch.equal(at_a, at_c)), "max_diff_started_there": d(at_a, at_c)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="seconds-long dry run sizes")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_stream_check")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--l1-coeff", type=float, default=0.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    from crosscoder import experiment as E
    from crosscoder.config import CrosscoderConfig, TrainConfig
    from crosscoder.distributed import resolve_device
    from crosscoder.kernels import L1_SPARSE_MAX_DENSITY

    dev = resolve_device(args.device)
    if args.tiny:
        sz = dict(ctx=32, n_text=120, text_words=60, n_chat=700, n_held=12, n_norm=6, F=256, B=128, k=8,
                  steps=args.steps or 40, l1=args.l1_coeff or 5.0, lr=3e-3)
    else:
        sz = dict(ctx=128, n_text=900, text_words=400, n_chat=4000, n_held=32, n_norm=16, F=1024, B=512, k=16,
                  steps=args.steps or 400, l1=args.l1_coeff or 3.0, lr=3e-3)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_stream_check_"))
    S: dict = {"device": str(dev), "sizes": sz, "errors": [], "stages": {}}
    try:
        import datasets, pyarrow, transformers  # noqa: E401
        S["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                         "datasets": datasets.__version__, "pyarrow": pyarrow.__version__, "python": sys.version.split()[0]}
    except Exception as e:  # noqa: BLE001
        S["versions"] = {"torch": torch.__version__, "import_error": repr(e)}
    if dev.type == "cuda":
        S["gpu"] = torch.cuda.get_device_name(dev)
    S["L1_SPARSE_MAX_DENSITY"] = dict(L1_SPARSE_MAX_DENSITY)
    t_all = time.perf_counter()
    counter = PathCounter()
    counter.install()
    results: dict = {}

    def stage(name, fn):
        t0 = time.perf_counter()
        try:
            val = fn()
            ok = True
        except Exception as e:  # noqa: BLE001
            val, ok = None, False
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            S["errors"].append({"stage": name, "error": repr(e), "traceback_tail": tb[-2500:]})
        S["stages"][name] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 2)}
        print(f"[{name}] ok={ok} {time.perf_counter() - t0:.1f}s", flush=True)
        return val

    try:
        world = stage("build_world", lambda: build_world(tmp, sz["n_text"], sz["text_words"], sz["n_chat"]))
        if world is None:
            raise SystemExit(1)
        ecfg = E.ExperimentConfig(organism_preset="", base_model=str(world["base"]), chat_model=str(world["chat"]),
                                  layer=1, text_source=str(world["text_file"]), chat_source=str(world["chat_file"]),
                                  context_length=sz["ctx"], n_train_sequences=16, n_heldout_sequences=sz["n_held"],
                                  n_norm_sequences=sz["n_norm"], cache_root=str(tmp / "cache"))
        exp = E.resolve(ecfg, progress=False)
        if args.device != "auto":  # the pair follows --device too (resolve leaves it on "auto")
            exp = exp._replace(pair_cfg=dataclasses.replace(exp.pair_cfg, device=str(dev)))
        pair = stage("model_pair", lambda: E.model_pair(exp))
        cache = stage("activation_cache", lambda: E.activation_cache(exp, pair=pair, progress=False))
        splits = stage("load_splits", lambda: E.load_splits(cache))
        if splits is None:
            raise SystemExit(1)
        S["pair"] = {"model_device": str(next(pair.base.parameters()).device),
                     "model_dtype": str(next(pair.base.parameters()).dtype),
                     "attn": getattr(pair.base.config, "_attn_implementation", None), "d_model": pair.d_model,
                     "heldout_tokens": int(splits.heldout.shape[0]), "scale_S": splits.scale_S.tolist()}
        N, B = sz["steps"], sz["B"]
        buffer_tokens = 16 * B
        common = dict(n_steps=N, batch_size=B, lr=sz["lr"], eval_every=N, log_every=max(1, N // 20),
                      checkpoint_every=N // 2, seed=0)
        runs = {
            "l1": (CrosscoderConfig(d_model=pair.d_model, n_latents=sz["F"], sparsity="l1"),
                   TrainConfig(l1_coeff=sz["l1"], **common)),
            "batchtopk": (CrosscoderConfig(d_model=pair.d_model, n_latents=sz["F"], sparsity="batchtopk", k=sz["k"]),
                          TrainConfig(auxk_alpha=1 / 32, auxk_dead_tokens=10 * B, **common)),
        }
        S["stream_replay"] = stage("stream_replay", lambda: _stream_replay(E, exp, pair, B, buffer_tokens, 0, N // 2))
        for name, (cc, tc) in runs.items():
            def full(name=name, cc=cc, tc=tc):
                counter.reset()
                _sync(dev)
                t0 = time.perf_counter()
                res = E.train_crosscoder_streaming(exp, pair, splits, cc, tc, tmp / f"{name}_full",
                                                   buffer_tokens=buffer_tokens, progress=False, device=args.device)
                _sync(dev)
                wall = time.perf_counter() - t0
                info = {"wall_s": round(wall, 2), "ms_per_step_incl_extraction": round(1000 * wall / N, 2),
                        "model_device": str(res.model.W_dec_FSD.device), "params_finite": _params_finite(res.model),
                        "resumed_from": res.resumed_from, **counter.summary(), **_log_summary(tmp / f"{name}_full")}
                hm = res.metrics.get("heldout", {})
                info["heldout_metrics"] = {k: v for k, v in hm.items() if isinstance(v, (int, float))}
                results[name] = res
                shutil.copy(tmp / f"{name}_full" / "log.jsonl", out_dir / f"log_{name}_full.jsonl")
                return info

            S[f"{name}_full"] = stage(f"{name}_full", full)

            def resume(name=name, cc=cc, tc=tc):
                d = tmp / f"{name}_resume"
                real = E.StreamingBuffer
                E.StreamingBuffer = _interrupting(real, N // 2)
                interrupted = None
                try:
                    E.train_crosscoder_streaming(exp, pair, splits, cc, tc, d, buffer_tokens=buffer_tokens,
                                                 progress=False, device=args.device)
                except _Interrupted as e:
                    interrupted = str(e)
                finally:
                    E.StreamingBuffer = real
                ck = json.loads((d / "checkpoint" / "config.json").read_text())["step"]
                counter.reset()
                res = E.train_crosscoder_streaming(exp, pair, splits, cc, tc, d, buffer_tokens=buffer_tokens,
                                                   progress=False, device=args.device)
                info = {"interrupted": interrupted, "checkpoint_step": ck, "resumed_from": res.resumed_from,
                        "l1_steps_after_resume": counter.summary().get("l1_steps"),
                        "params_finite": _params_finite(res.model)}
                if name in results:
                    info.update(_max_diff(results[name].model, res.model))
                    info["checkpoint_full_vs_interrupted"] = _dict_diff(_ckpt_model(tmp / f"{name}_full"),
                                                                        _ckpt_model(d))
                    la = _log_summary(tmp / f"{name}_full")["last"]
                    lb = _log_summary(d)["last"]
                    info["last_log_full_vs_resumed"] = {"full": la, "resumed": lb}
                return info

            S[f"{name}_resume"] = stage(f"{name}_resume", resume)

            def repeat(name=name, cc=cc, tc=tc):
                """A second uninterrupted run: the device's run-to-run difference, the baseline of resume's."""
                res = E.train_crosscoder_streaming(exp, pair, splits, cc, tc, tmp / f"{name}_repeat",
                                                   buffer_tokens=buffer_tokens, progress=False, device=args.device)
                info = _max_diff(results[name].model, res.model)
                info["checkpoint_full_vs_repeat"] = _dict_diff(_ckpt_model(tmp / f"{name}_full"),
                                                               _ckpt_model(tmp / f"{name}_repeat"))
                return info

            S[f"{name}_repeat"] = stage(f"{name}_repeat", repeat)
            if name == "l1" and not (S.get("l1_full") or {}).get("sparse_steps"):
                # lambda too small to reach the CUDA sparse threshold here: once more with 3x lambda
                cc3, tc3 = cc, dataclasses.replace(tc, l1_coeff=3 * tc.l1_coeff)
                S["l1_3x_full"] = stage("l1_3x_full", lambda: full("l1_3x", cc3, tc3))
    except SystemExit:
        pass
    finally:
        S["total_s"] = round(time.perf_counter() - t_all, 2)
        if dev.type == "cuda":
            S["cuda_max_mem_MiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        (out_dir / "summary.json").write_text(json.dumps(S, indent=1))
        (out_dir / "summary.md").write_text(_markdown(S))
        print(_markdown(S), flush=True)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("kept", tmp)
    return 1 if S["errors"] else 0


def _markdown(S: dict) -> str:
    lines = [f"# streaming check on {S.get('gpu', S['device'])}", "",
             f"versions: {S.get('versions')}", f"sizes: {S['sizes']}", f"pair: {S.get('pair')}",
             f"stages: {S['stages']}", f"total {S.get('total_s')} s, cuda max mem {S.get('cuda_max_mem_MiB')} MiB", ""]
    for key in ("stream_replay", "l1_full", "l1_resume", "l1_repeat", "l1_3x_full", "batchtopk_full", "batchtopk_resume", "batchtopk_repeat"):
        v = S.get(key)
        if v is None:
            continue
        v = {k: x for k, x in v.items() if k != "per_tensor"}
        lines.append(f"## {key}")
        lines += [f"- {k}: {x}" for k, x in v.items()]
        lines.append("")
    for e in S["errors"]:
        lines += [f"## ERROR in {e['stage']}: {e['error']}", "```", e["traceback_tail"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
