"""One GPU session's checks and figures, in one run (every section guarded; results written as they come).

1. CUDA correctness of the trainer's step: ``train.Trainer.step`` (normalise, ``kernels.training_step``,
   backward, grad-norm clip, Adam, threshold EMA, accumulators) on CUDA against the same steps on the CPU
   from the same initial state and batches, for an L1 and a BatchTopK crosscoder (AuxK active: half the
   latents start dead). Then the CUDA fast path against the readable reference (``Crosscoder.loss``)
   and the tests' naive loops (``tests/test_core.py``: ``naive_loss``, ``naive_auxk``).
2. Gemma-2-2B-shaped timings (random weights): the library's truncated extraction (``residual_after``,
   ``extract_pair``, and the streaming buffer's per-forward-batch work ``shard_rows`` to the host) in
   bf16 with eager attention, 1024-token sequences; ``Trainer.step`` at the gemma-2-2b profile's shapes
   (L1 at B = 4,096, BatchTopK k = 100 at B = 2,048; fp32); peak GPU memory of each; the host cost of
   ``StreamingBuffer.batches`` (its concatenations and shuffles); a projection of the profile's runs.
3. Environment facts.
4. Only when asked (``--crossover``, or ``--only crossover,rows``): the L1 step's dense against sparse
   path at the Gemma shape over active fractions 0.2-16% (the crossover ``kernels.L1_SPARSE_MAX_DENSITY``
   records for CUDA), and ``shard_rows`` on the device tensor against ``.cpu()`` first (time, equality).

    PYTHONPATH=lib:. python3 bench/bench_gpu.py            # on a CUDA machine (writes $OUT/gpu.json)
    PYTHONPATH=lib:. python3 bench/bench_gpu.py --quick    # tiny shapes, any device (a smoke check)
    PYTHONPATH=lib:. python3 bench/bench_gpu.py --crossover   # section 4 alone

Times: torch.cuda.synchronize() + perf_counter around each call, after warm-up; the median of the reps.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from crosscoder import kernels
from crosscoder.config import CrosscoderConfig, TrainConfig
from crosscoder.data.buffer import StreamingBuffer
from crosscoder.data.cache import shard_rows
from crosscoder.data.pair import ModelPair, extract_pair, residual_after
from crosscoder.data.text import Sequences
from crosscoder.model import Crosscoder
from crosscoder.train import Trainer

warnings.filterwarnings("ignore", message=".*Sparse.*")
warnings.filterwarnings("ignore", message=".*TF32.*")

T0 = time.perf_counter()
RESULTS: dict = {"sections": {}, "errors": {}}
OUT_PATH: Path | None = None

# runs.yaml, profile gemma-2-2b
L1_TOKENS, L1_BATCH, L1_LR, L1_LAMBDA = 400_000_000, 4096, 5e-5, 2.0
TOPK_TOKENS, TOPK_BATCH, TOPK_LR, TOPK_K = 100_000_000, 2048, 1e-4, 100
GEMMA = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
             num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
             query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
             hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6)
LAYER, CONTEXT = 13, 1024
FORWARD_BATCH = 16  # CacheConfig.forward_batch default: sequences per model forward (StreamingBuffer too)
STREAM_BUFFER_TOKENS = 1 << 20  # experiment.train_crosscoder_streaming's default buffer_tokens


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def save() -> None:
    RESULTS["elapsed_s"] = time.perf_counter() - T0
    if OUT_PATH is not None:
        OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
        OUT_PATH.write_text(json.dumps(RESULTS, indent=1, default=str))


def record_failure(rows: dict, key: str, e: Exception, label: str | None = None) -> None:
    """Record a failed measurement under ``key`` (its error and trace) and log it; the script goes on."""
    rows[key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    log(f"  {label or key}: FAILED {type(e).__name__}: {e}")


def section(name: str):
    """Decorator: run a section, record its result or its error, save, and go on."""
    def wrap(fn):
        def run(*a, **kw):
            log(f"== {name}")
            try:
                out = fn(*a, **kw)
                RESULTS["sections"][name] = out
                return out
            except Exception as e:  # noqa: BLE001 - a failing section must not cost the others
                RESULTS["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                log(f"!! {name} failed: {type(e).__name__}: {e}")
                traceback.print_exc()
                return None
            finally:
                save()
                free()
        return run
    return wrap


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn, dev: torch.device, warmup: int, reps: int) -> dict:
    for _ in range(warmup):
        fn()
    sync(dev)
    ts = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "reps": reps, "warmup": warmup}


def reset_peak(dev: torch.device) -> None:
    free()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")


def cur_gib(dev: torch.device) -> float:
    return torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")


# ============================================================================ 3. environment
@section("environment")
def environment(dev: torch.device) -> dict:
    import transformers

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": str(dev), "cpu_threads": torch.get_num_threads(),
           "cuda_available": torch.cuda.is_available(), "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=p.total_memory / 2**30,
                   multiprocessors=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   cuda_runtime=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    for k, v in env.items():
        log(f"  {k}: {v}")
    return env


# ============================================================================ 1. correctness
def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """|a - b| against the reference b (both moved to float64 on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    d = (a - b).abs()
    ref = float(b.abs().max()) if b.numel() else 0.0
    mx = float(d.max()) if d.numel() else 0.0
    elem_rel = float((d / b.abs().clamp_min(1e-30)).max()) if b.numel() else 0.0
    return {"max_abs": mx, "max_ref": ref, "rel_to_max": mx / ref if ref > 0 else (0.0 if mx == 0 else math.inf),
            "max_elem_rel": elem_rel, "numel": b.numel()}


def _perturbed_model(cfg: CrosscoderConfig, seed: int) -> Crosscoder:
    """A crosscoder moved off the symmetric init (so every gradient term matters) and with
    non-unit input scales (so the trainer's normalisation matters), as tests/test_core.py does."""
    m = Crosscoder(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    S, D, F = cfg.n_sources, cfg.d_model, cfg.n_latents
    with torch.no_grad():
        m.b_enc_F.copy_(0.1 * torch.randn(F, generator=g))
        m.b_dec_SD.copy_(torch.randn(S, D, generator=g))
        m.W_dec_FSD.mul_(1 + 3 * torch.rand(F, S, 1, generator=g))
        m.W_enc_SDF.add_(0.05 * torch.randn(S, D, F, generator=g))
        m.input_scale_S.copy_(torch.linspace(0.7, 1.3, S))
    return m


def _trainer_run(state: dict, cfg: CrosscoderConfig, tcfg: TrainConfig, raws: list[torch.Tensor],
                 dev: torch.device, dead_F: torch.Tensor | None) -> list[dict]:
    """Trainer.step on ``dev`` from ``state`` over ``raws`` (CPU tensors); a snapshot after each step."""
    m = Crosscoder(cfg)
    m.load_state_dict(state)
    m = m.to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(m, tcfg, tmp, resume=False)
        if dead_F is not None:  # these latents have not fired for auxk_dead_tokens tokens: AuxK's dead set
            tr.acc.since_fired_F[dead_F.to(dev)] = tcfg.auxk_dead_tokens
        snaps = []
        for raw in raws:
            before = {n: p.detach().clone() for n, p in m.named_parameters()}
            tr.step(raw)
            sync(dev)
            snaps.append({
                "acc": {k: getattr(tr.acc, k).detach().cpu().clone() for k in
                        ("loss", "recon", "sparsity", "l0", "aux", "since_fired_F", "active_F")},
                "grad": {n: p.grad.detach().cpu().clone() for n, p in m.named_parameters()},
                "param": {n: p.detach().cpu().clone() for n, p in m.named_parameters()},
                "update": {n: (p.detach() - before[n]).cpu() for n, p in m.named_parameters()},
                "threshold": m.threshold.detach().cpu().clone(),
            })
        return snaps


def _compare_runs(cuda: list[dict], cpu: list[dict], lr: float) -> list[dict]:
    steps = []
    for i, (a, b) in enumerate(zip(cuda, cpu)):
        row = {"step": i}
        for k in ("loss", "recon", "sparsity", "l0", "aux"):
            row[f"acc_{k}"] = _diff(a["acc"][k], b["acc"][k])
        row["since_fired_equal"] = bool(torch.equal(a["acc"]["since_fired_F"], b["acc"]["since_fired_F"]))
        row["active_F_equal"] = bool(torch.equal(a["acc"]["active_F"], b["acc"]["active_F"]))
        row["active_F_abs_diff_sum"] = int((a["acc"]["active_F"] - b["acc"]["active_F"]).abs().sum())
        row["threshold"] = _diff(a["threshold"], b["threshold"])
        row["grad"] = {n: _diff(a["grad"][n], b["grad"][n]) for n in b["grad"]}
        row["param"] = {n: _diff(a["param"][n], b["param"][n]) for n in b["param"]}
        # Adam's first steps move each weight by about lr * sign(grad): compare updates in units of lr
        row["update_max_abs_diff_over_lr"] = max(float((a["update"][n] - b["update"][n]).abs().max()) / lr
                                                 for n in b["update"])
        row["grad_max_rel_to_max"] = max(v["rel_to_max"] for v in row["grad"].values())
        row["param_max_abs"] = max(v["max_abs"] for v in row["param"].values())
        steps.append(row)
    return steps


def _loss_and_grads(m: Crosscoder, fn) -> tuple[torch.Tensor, dict]:
    m.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def _naive_helpers():
    """tests/test_core.py's naive per-source loss and per-token AuxK (None when not importable)."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        import test_core  # noqa: PLC0415

        return test_core.naive_loss, test_core.naive_auxk, None
    except Exception as e:  # noqa: BLE001
        return None, None, f"{type(e).__name__}: {e}"


@section("correctness")
def correctness(dev: torch.device, quick: bool) -> dict:
    d, F, B, k, n_steps = (16, 64, 64, 4, 2) if quick else (64, 512, 512, 16, 3)
    out: dict = {"shape": {"d": d, "F": F, "B": B, "S": 2, "k": k, "steps": n_steps}, "device": str(dev)}
    g = torch.Generator().manual_seed(123)
    raws = [torch.randn(B, 2, d, generator=g) * torch.tensor([1.0, 2.5])[None, :, None] for _ in range(n_steps)]
    naive_loss, naive_auxk, naive_err = _naive_helpers()
    out["naive_import_error"] = naive_err
    cpu = torch.device("cpu")
    for sparsity in ("l1", "batchtopk"):
        cfg = CrosscoderConfig(d_model=d, n_latents=F, sparsity=sparsity, k=k)
        lr = 5e-5 if sparsity == "l1" else 1e-4
        tcfg = TrainConfig(n_steps=1000, batch_size=B, lr=lr, l1_coeff=2.0, l1_warmup_frac=0.0, log_every=1000,
                           eval_every=1000, auxk_dead_tokens=2 * B)
        state = _perturbed_model(cfg, seed=7).state_dict()
        dead_F = None
        if sparsity == "batchtopk":
            dead_F = torch.zeros(F, dtype=torch.bool)
            dead_F[torch.randperm(F, generator=torch.Generator().manual_seed(3))[: F // 2]] = True
        t = time.perf_counter()
        ref = _trainer_run(copy.deepcopy(state), cfg, tcfg, raws, cpu, dead_F)
        got = _trainer_run(copy.deepcopy(state), cfg, tcfg, raws, dev, dead_F)
        res = {"trainer_steps_vs_cpu": _compare_runs(got, ref, lr), "aux_loss_sum_cpu": float(ref[-1]["acc"]["aux"]),
               "wall_s": time.perf_counter() - t}
        s0 = res["trainer_steps_vs_cpu"][0]
        log(f"  {sparsity}: Trainer.step {dev} vs cpu, step 0: loss rel {s0['acc_loss']['rel_to_max']:.2e}, "
            f"grad max rel-to-max {s0['grad_max_rel_to_max']:.2e}, update diff/lr {s0['update_max_abs_diff_over_lr']:.2e}, "
            f"since_fired equal {s0['since_fired_equal']}, aux sum (cpu) {res['aux_loss_sum_cpu']:.4g}")
        last = res["trainer_steps_vs_cpu"][-1]
        log(f"  {sparsity}: after {n_steps} steps: loss-sum rel {last['acc_loss']['rel_to_max']:.2e}, "
            f"grad rel {last['grad_max_rel_to_max']:.2e}, params max abs diff {last['param_max_abs']:.2e}, "
            f"threshold rel {last['threshold']['rel_to_max']:.2e}")

        # the fast path on dev against the readable reference and the tests' naive loop, same state and batch
        m = Crosscoder(cfg)
        m.load_state_dict(copy.deepcopy(state))
        m = m.to(dev)
        x = m.normalise(raws[0].to(dev))
        lam = 2.0 if sparsity == "l1" else 0.0
        fast = {}
        out_step = None

        def fast_fn():
            nonlocal out_step
            out_step = kernels.training_step(m, x, lam)
            return out_step.loss

        fast["loss"], fast["grad"] = _loss_and_grads(m, fast_fn)
        refs = {"reference Crosscoder.loss": lambda: m.loss(x, lam).loss}
        if naive_loss is not None:
            refs["naive loop (tests)"] = lambda: naive_loss(m, x, lam)
        vs = {}
        for name, fn in refs.items():
            loss, grads = _loss_and_grads(m, fn)
            vs[name] = {"loss": _diff(fast["loss"], loss), "grad": {n: _diff(fast["grad"][n], grads[n]) for n in grads}}
            vs[name]["grad_max_rel_to_max"] = max(v["rel_to_max"] for v in vs[name]["grad"].values())
            log(f"  {sparsity}: fast step on {dev} vs {name}: loss rel {vs[name]['loss']['rel_to_max']:.2e}, "
                f"grad max rel-to-max {vs[name]['grad_max_rel_to_max']:.2e}")
        with torch.no_grad():
            f_ref = m.encode(x, use_threshold=False)
        vs["active_set_equal_to_reference"] = bool(torch.equal(out_step.n_active_F.cpu(), (f_ref > 0).sum(0).cpu()))
        log(f"  {sparsity}: active counts per latent equal to the reference's: {vs['active_set_equal_to_reference']}")
        res["fast_vs_reference_on_device"] = vs
        out[sparsity] = res

    # AuxK on dev against the tests' per-token loop (its shapes: the loop is per token and per latent)
    if naive_auxk is not None:
        cfg = CrosscoderConfig(d_model=12, n_latents=40, sparsity="batchtopk", k=4)
        m = _perturbed_model(cfg, seed=0).to(dev)
        gx = torch.Generator().manual_seed(5)
        x = (torch.randn(24, 2, 12, generator=gx) * 2).to(dev)
        residual = torch.randn(24, 2, 12, generator=gx).to(dev)
        dead = torch.zeros(40, dtype=torch.bool)
        dead[torch.randperm(40, generator=torch.Generator().manual_seed(1))[:15]] = True
        dead = dead.to(dev)
        params = [m.W_enc_SDF, m.b_enc_F, m.W_dec_FSD]
        aux = {}
        for k_aux in (3, 15):
            got = kernels.auxk_loss(m, x, residual, dead, k_aux)
            g_got = torch.autograd.grad(got, params)
            want = naive_auxk(m, x, residual, dead, k_aux)
            g_want = torch.autograd.grad(want, params)
            aux[f"k_aux={k_aux}"] = {"loss": _diff(got, want),
                                     "grad_max_rel_to_max": max(_diff(a, b)["rel_to_max"] for a, b in zip(g_got, g_want))}
        # the whole step with AuxK: its gradients equal the plain step's plus alpha * the naive AuxK's
        with torch.no_grad():
            recon = m.decode(m.encode(x, use_threshold=False))
        p4 = params + [m.b_dec_SD]
        got = torch.autograd.grad(kernels.training_step(m, x, 0.0, dead_F=dead, k_aux=5, auxk_alpha=0.5).loss, p4)
        want = torch.autograd.grad(kernels.training_step(m, x, 0.0).loss
                                   + 0.5 * naive_auxk(m, x, (x - recon).detach(), dead, 5), p4)
        aux["step_with_auxk_grad_max_rel_to_max"] = max(_diff(a, b)["rel_to_max"] for a, b in zip(got, want))
        log(f"  AuxK on {dev} vs naive loop: {json.dumps({k: v if not isinstance(v, dict) else v.get('grad_max_rel_to_max') for k, v in aux.items()})}")
        out["auxk_vs_naive_on_device"] = aux

    # verdict: float32 tolerances (summation order differs between devices and kernels)
    bad = []
    for sp in ("l1", "batchtopk"):
        if sp not in out:
            continue
        for s in out[sp]["trainer_steps_vs_cpu"]:
            if s["acc_loss"]["rel_to_max"] > 1e-5 or s["grad_max_rel_to_max"] > 1e-4 or not s["since_fired_equal"]:
                bad.append(f"{sp} step {s['step']}")
        for name, v in out[sp]["fast_vs_reference_on_device"].items():
            if isinstance(v, dict) and (v["loss"]["rel_to_max"] > 1e-5 or v["grad_max_rel_to_max"] > 1e-4):
                bad.append(f"{sp} vs {name}")
    out["tolerance"] = "loss rel <= 1e-5, grad max|diff|/max|ref| <= 1e-4 per tensor, identical dead/active counts"
    out["failures"] = bad
    out["pass"] = not bad
    log(f"  correctness pass: {out['pass']} {bad}")
    return out


# ============================================================================ 2b. crosscoder steps
def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _trainer_timing(dev, cfg: CrosscoderConfig, tcfg: TrainConfig, raw: torch.Tensor, warmup: int, reps: int,
                    dead_frac: float = 0.0) -> dict:
    reset_peak(dev)
    m = Crosscoder(cfg, generator=torch.Generator().manual_seed(0)).to(dev)
    model_gib = cur_gib(dev)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(m, tcfg, tmp, resume=False)
        dead_idx = None
        if dead_frac > 0:
            dead_idx = torch.randperm(cfg.n_latents, generator=torch.Generator().manual_seed(3))[
                : int(dead_frac * cfg.n_latents)].to(dev)

        def step():
            if dead_idx is not None:  # hold the dead set (latents that fire are revived by the step)
                tr.acc.since_fired_F[dead_idx] = tcfg.auxk_dead_tokens
            tr.step(raw)

        r = time_fn(step, dev, warmup, reps)
        r["aux_loss_mean"] = float(tr.acc.aux) / max(1, int(tr.acc.n))
        r["l0_mean"] = float(tr.acc.l0) / max(1, int(tr.acc.n))
    r["peak_gib"] = peak_gib(dev)
    r["model_gib"] = model_gib
    r["tokens_per_s"] = raw.shape[0] / r["median_s"]
    return r


@section("crosscoder_steps")
def crosscoder_steps(dev: torch.device, quick: bool) -> dict:
    d, F = (64, 512) if quick else (2304, 16384)
    b_l1, b_tk, k = (256, 128, 8) if quick else (L1_BATCH, TOPK_BATCH, TOPK_K)
    warmup, reps = (1, 2) if quick else (3, 10)
    big = 10**7
    rows: dict = {"shape": {"d": d, "F": F, "S": 2, "B_l1": b_l1, "B_topk": b_tk, "k": k}}
    g = torch.Generator().manual_seed(0)
    raw_l1 = torch.randn(b_l1, 2, d, generator=g)
    raw_tk = raw_l1[:b_tk].clone()
    l1_cfg = CrosscoderConfig(d_model=d, n_latents=F, sparsity="l1")
    tk_cfg = CrosscoderConfig(d_model=d, n_latents=F, sparsity="batchtopk", k=k)
    l1_tcfg = TrainConfig(n_steps=big, batch_size=b_l1, lr=L1_LR, l1_coeff=L1_LAMBDA, log_every=big, eval_every=big)
    tk_tcfg = TrainConfig(n_steps=big, batch_size=b_tk, lr=TOPK_LR, log_every=big, eval_every=big,
                          auxk_dead_tokens=10_000_000)

    def run(name, *a, **kw):
        try:
            r = _trainer_timing(dev, *a, **kw)
            rows[name] = r
            log(f"  {name}: {1e3 * r['median_s']:.1f} ms/step (min {1e3 * r['min_s']:.1f}, max {1e3 * r['max_s']:.1f}), "
                f"{r['tokens_per_s']:.0f} tok/s, peak {r['peak_gib']:.2f} GiB, L0 {r['l0_mean']:.1f}")
        except Exception as e:  # noqa: BLE001
            record_failure(rows, name, e)
        save()

    raw_l1_dev, raw_tk_dev = raw_l1.to(dev), raw_tk.to(dev)
    # the trainer as streamed training runs it: batches come from the host buffer (pageable CPU memory)
    run("L1 Trainer.step, batch from host", l1_cfg, l1_tcfg, raw_l1, warmup, reps)
    run("L1 Trainer.step, batch on device", l1_cfg, l1_tcfg, raw_l1_dev, warmup, reps)
    run("BatchTopK Trainer.step, batch from host, no dead", tk_cfg, tk_tcfg, raw_tk, warmup, reps)
    run("BatchTopK Trainer.step, batch on device, no dead", tk_cfg, tk_tcfg, raw_tk_dev, warmup, reps)
    run("BatchTopK Trainer.step, batch on device, half dead (AuxK)", tk_cfg, tk_tcfg, raw_tk_dev, warmup, reps,
        dead_frac=0.5)
    if dev.type == "cuda":  # what-if: TF32 tensor-core GEMMs (torch's default keeps fp32 matmuls exact)
        try:
            _set_tf32(True)
            run("what-if TF32: L1 Trainer.step, batch on device", l1_cfg, l1_tcfg, raw_l1_dev, warmup, reps)
            run("what-if TF32: BatchTopK Trainer.step, batch on device, no dead", tk_cfg, tk_tcfg, raw_tk_dev,
                warmup, reps)
        except Exception as e:  # noqa: BLE001
            rows["what-if TF32"] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            try:
                _set_tf32(False)
            except Exception:  # noqa: BLE001
                pass

    # what-if: the L1 step's sparse path on this device at a trained L0 of ~80 (kernels sends CUDA dense)
    try:
        from bench.bench_sparse_l1 import l1_model_at_density
        from bench.bench_train import train_step_fn

        l0 = 80 if not quick else 8
        m_cpu = l1_model_at_density(d, F, raw_l1, l0 / F)  # built on the CPU (the helper works there)
        paths = {}
        for path in ("dense", "sparse"):
            reset_peak(dev)
            m = copy.deepcopy(m_cpu).to(dev)
            l0s = []

            def loss(m_, x_, p=path):
                o = kernels.l1_step(m_, x_, L1_LAMBDA, path=p)
                l0s.append(o.l0)
                return o.loss

            step = train_step_fn(m, loss, raw_l1_dev, 1e-7)
            r = time_fn(step, dev, warmup, reps)
            r["l0"] = float(torch.stack(l0s).mean())
            r["peak_gib"] = peak_gib(dev)
            paths[path] = r
            del m, step
            free()
        paths["sparse_speedup_over_dense"] = paths["dense"]["median_s"] / paths["sparse"]["median_s"]
        rows["what-if L1 at L0~80: dense vs sparse path (loss+backward+clip+Adam)"] = paths
        log(f"  L1 at L0~{paths['sparse']['l0']:.0f}: dense {1e3 * paths['dense']['median_s']:.1f} ms, sparse "
            f"{1e3 * paths['sparse']['median_s']:.1f} ms ({paths['sparse_speedup_over_dense']:.2f}x)")
    except Exception as e:  # noqa: BLE001
        record_failure(rows, "what-if L1 at L0~80", e, "L1 sparse what-if")
    return rows


# ============================================================================ 2a. extraction
def _gemma(dev: torch.device, quick: bool, seed: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    kw = dict(GEMMA)
    if quick:
        kw.update(vocab_size=1024, hidden_size=64, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
    cfg = Gemma2Config(**kw, attn_implementation="eager")
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        with torch.device(dev):
            lm = Gemma2ForCausalLM(cfg)
    except Exception as e:  # noqa: BLE001 - fall back to building on the host
        log(f"  building on {dev} failed ({type(e).__name__}: {e}); building on the CPU")
        lm = Gemma2ForCausalLM(cfg).to(dtype).to(dev)
    return lm.to(dtype).eval().requires_grad_(False), cfg


@section("extraction")
def extraction(dev: torch.device, quick: bool) -> dict:
    T = 64 if quick else CONTEXT
    batches = (2,) if quick else (FORWARD_BATCH, 32)
    warmup, reps = (1, 2) if quick else (2, 5)
    out: dict = {"context": T, "layer": LAYER}
    reset_peak(dev)
    t = time.perf_counter()
    base, cfg = _gemma(dev, quick, 0)
    chat, _ = _gemma(dev, quick, 1)
    sync(dev)
    out["build_s"] = time.perf_counter() - t
    out["config"] = {k: getattr(cfg, k) for k in GEMMA} | {"attn_implementation": cfg._attn_implementation,
                                                         "layer_types[:4]": cfg.layer_types[:4]}
    out["params_per_model"] = sum(p.numel() for p in base.parameters())
    out["dtype"] = str(next(base.parameters()).dtype)
    out["models_gib"] = cur_gib(dev)
    log(f"  built 2 models ({out['params_per_model'] / 1e9:.3f}B params each, {out['dtype']}) in {out['build_s']:.1f} s, "
        f"{out['models_gib']:.1f} GiB")
    pair = ModelPair(base, chat, None, LAYER, cfg.hidden_size)
    V = cfg.vocab_size

    # the truncated forward reads what the full forward's hidden_states[layer + 1] holds
    ids = torch.randint(0, V, (1, min(T, 128)), device=dev)
    with torch.no_grad():
        full = base(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[LAYER + 1]
        trunc = residual_after(base, ids, LAYER)
    out["truncated_equals_full_hidden_states"] = _diff(trunc, full)
    log(f"  truncated vs full hidden_states[{LAYER + 1}]: max abs diff {out['truncated_equals_full_hidden_states']['max_abs']:.3g}")
    del full, trunc

    rows = {}
    for nb in batches:
        g = torch.Generator().manual_seed(nb)
        ids_cpu = torch.randint(0, V, (nb, T), generator=g)
        ids_cpu[:, 0] = 2  # BOS first, as the data stream makes them
        am_cpu = torch.ones(nb, T, dtype=torch.long)
        seqs = Sequences(ids_cpu, am_cpu, torch.zeros(nb, dtype=torch.bool))
        ids, am = ids_cpu.to(dev), am_cpu.to(dev)
        body = nb * (T - 1)  # rows a forward batch yields (BOS excluded)
        variants = {
            "one model: residual_after": lambda: residual_after(base, ids, LAYER, am),
            "pair: extract_pair": lambda: extract_pair(pair, ids_cpu, am_cpu),
            # StreamingBuffer._rows' per-forward-batch work: the pair, rows without BOS as fp32 to the
            # host (shard_rows picks them on the device since 2026-11-30; before, .cpu() came first)
            "pair + StreamingBuffer rows: shard_rows(seqs, extract_pair(...))": lambda: shard_rows(
                seqs, extract_pair(pair, ids_cpu, am_cpu), 0, torch.float32),
        }
        if nb == batches[0]:  # the reference implementations' way: every block, the norm, the unembedding
            variants["one model: full forward, output_hidden_states (reference)"] = lambda: base(
                input_ids=ids, attention_mask=am, output_hidden_states=True, use_cache=False).hidden_states[LAYER + 1]
        for name, fn in variants.items():
            key = f"{name}, {nb}x{T}"
            try:
                reset_peak(dev)
                with torch.no_grad():
                    r = time_fn(fn, dev, warmup, reps)
                r["peak_gib"] = peak_gib(dev)
                r["tokens_per_s"] = nb * T / r["median_s"]
                r["body_tokens_per_s"] = body / r["median_s"]
                rows[key] = r
                log(f"  {key}: {1e3 * r['median_s']:.1f} ms, {r['tokens_per_s']:.0f} tok/s "
                    f"({r['body_tokens_per_s']:.0f} rows/s), peak {r['peak_gib']:.1f} GiB")
            except Exception as e:  # noqa: BLE001
                record_failure(rows, key, e)
            free()
            save()
    out["rows"] = rows
    # FLOP/s achieved (matmul FLOP of blocks 0..layer plus causal attention, bench/projection.py's count)
    try:
        from bench.projection import truncated_forward_flop_per_token

        fpt = truncated_forward_flop_per_token(cfg, LAYER, T)
        out["flop_per_token_one_model"] = fpt
        for key, r in rows.items():
            if "tokens_per_s" in r and "full forward" not in key:
                r["tflops"] = (2 if key.startswith("pair") else 1) * fpt * r["tokens_per_s"] / 1e12
    except Exception as e:  # noqa: BLE001
        out["flop_error"] = str(e)
    return out


# ============================================================================ 2d. streaming buffer (host)
class _ReplayRows(StreamingBuffer):
    """StreamingBuffer whose rows are one pre-made forward batch, replayed: times ``batches()`` alone
    (its concatenations, permutations and slicing), without the models or the data stream."""

    def __init__(self, acts: torch.Tensor, batch_size: int, buffer_tokens: int):
        super().__init__(None, None, batch_size, buffer_tokens=buffer_tokens)  # type: ignore[arg-type]
        self._acts = acts
        self._ids = torch.zeros(acts.shape[0], 2, dtype=torch.int64)

    def _rows(self):
        while True:
            yield self._acts, self._ids


@section("streaming_buffer_host")
def streaming_buffer(quick: bool, deadline_s: float) -> dict:
    d = 64 if quick else 2304
    rows_per_forward = FORWARD_BATCH * ((64 if quick else CONTEXT) - 1)
    sizes = (1 << 12, 1 << 13) if quick else (1 << 17, 1 << 18)
    batch = 256 if quick else L1_BATCH
    acts = torch.randn(rows_per_forward, 2, d)
    out: dict = {"rows_per_forward_batch": rows_per_forward, "batch": batch, "threads": torch.get_num_threads()}
    for size in sizes:
        if time.perf_counter() - T0 > deadline_s:
            out[f"buffer_tokens={size}"] = "skipped: time budget"
            continue
        buf = _ReplayRows(acts, batch, size)
        it = buf.batches(0)
        t = time.perf_counter()
        next(it)
        first = time.perf_counter() - t
        per_cycle = max(1, (size // 2) // batch)  # batches served between refills
        n = 2 * per_cycle
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        dt = time.perf_counter() - t
        r = {"first_batch_s (initial fill)": first, "batches_timed": n, "steady_s": dt, "s_per_batch": dt / n,
             "us_per_token": 1e6 * dt / (n * batch), "buffer_gib": size * 2 * d * 4 / 2**30}
        out[f"buffer_tokens={size}"] = r
        log(f"  StreamingBuffer.batches, buffer {size} rows ({r['buffer_gib']:.1f} GiB fp32): initial fill {first:.2f} s, "
            f"steady {1e3 * r['s_per_batch']:.1f} ms/batch = {r['us_per_token']:.2f} us/token")
        del buf, it
        gc.collect()
        save()
    return out


# ============================================================================ 2e. L1 sparse/dense crossover
CROSSOVER_DENSITIES = [0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16]  # active fraction of the [B, F] latents


def crossover_point(rows: list[dict]) -> float:
    """The active fraction where the sparse path stops being faster: the first bracketing pair of
    the sweep, interpolated linearly in log density and log speed-up (bench_sparse_l1's rule);
    nan when the sparse path wins or loses everywhere."""
    for lo, hi in zip(rows, rows[1:]):
        if lo["sparse_speedup"] >= 1 > hi["sparse_speedup"]:
            a, b = math.log(lo["density"]), math.log(hi["density"])
            ya, yb = math.log(lo["sparse_speedup"]), math.log(hi["sparse_speedup"])
            return math.exp(a + (b - a) * ya / (ya - yb))
    return float("nan")


@section("l1_crossover")
def l1_crossover(dev: torch.device, quick: bool, deadline_s: float) -> dict:
    """``kernels.l1_step(path="dense")`` against ``path="sparse"`` in the full training step (loss,
    backward, grad-norm clip, Adam: train_step_fn, as bench_sparse_l1), fp32, at the Gemma shape,
    over active fractions set through b_enc: each latent's bias sits midway between its n-th and
    (n + 1)-th largest pre-activation on the batch, so every latent fires on n = density * B tokens
    (lr 1e-7 keeps it there while timing; the density column is what the timed steps measured)."""
    from bench.bench_train import train_step_fn

    d, F, B = (64, 512, 1024) if quick else (2304, 16384, L1_BATCH)
    warmup, reps = (1, 3) if quick else (3, 10)
    K = 2 * d
    x = torch.randn(B, 2, d, generator=torch.Generator().manual_seed(0)).to(dev)
    base = Crosscoder(CrosscoderConfig(d_model=d, n_latents=F, sparsity="l1"),
                      generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        pre_BF = x.reshape(B, K) @ base.W_enc_SDF.reshape(K, F)  # without the bias
    out: dict = {"shape": {"d": d, "S": 2, "F": F, "B": B}, "warmup": warmup, "reps": reps,
                 "step": "kernels.l1_step(path=...) + backward + clip_grad_norm_ + Adam (lr 1e-7), fp32",
                 "tf32": torch.backends.cuda.matmul.allow_tf32 if dev.type == "cuda" else None, "rows": []}

    def model_at(rho: float) -> Crosscoder:
        n_on = max(1, round(rho * B))
        with torch.no_grad():
            top = pre_BF.topk(n_on + 1, dim=0).values
            m = copy.deepcopy(base)
            m.b_enc_F.copy_(-(top[-1] + top[-2]) / 2)
        return m

    def timed(m: Crosscoder, path: str) -> dict:
        l0s: list[torch.Tensor] = []

        def loss(m_, x_):
            o = kernels.l1_step(m_, x_, L1_LAMBDA, path=path)
            l0s.append(o.l0.detach())
            return o.loss

        r = time_fn(train_step_fn(m, loss, x, 1e-7), dev, warmup, reps)
        r["density"] = float(torch.stack(l0s[-reps:]).mean()) / F
        return r

    # the two paths' loss and gradients agree on this device at this shape (one density)
    m = model_at(0.005)
    grads = {}
    for path in ("dense", "sparse"):
        m.zero_grad(set_to_none=True)
        o = kernels.l1_step(m, x, L1_LAMBDA, path=path)
        o.loss.backward()
        grads[path] = (o.loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()})
    out["sparse_vs_dense_at_0.5%"] = {
        "loss": _diff(grads["sparse"][0], grads["dense"][0]),
        "grad_max_rel_to_max": max(_diff(grads["sparse"][1][n], g)["rel_to_max"] for n, g in grads["dense"][1].items())}
    log(f"  sparse vs dense on {dev} at 0.5%: loss rel {out['sparse_vs_dense_at_0.5%']['loss']['rel_to_max']:.1e}, "
        f"grad rel {out['sparse_vs_dense_at_0.5%']['grad_max_rel_to_max']:.1e}")
    del m, grads
    free()

    for rho in CROSSOVER_DENSITIES:
        if time.perf_counter() - T0 > deadline_s:
            out["rows"].append({"target": rho, "skipped": "time budget"})
            continue
        row: dict = {"target": rho}
        for path in ("dense", "sparse"):
            reset_peak(dev)
            m = model_at(rho)
            r = timed(m, path)
            r["peak_gib"] = peak_gib(dev)
            row[path] = r
            del m
            free()
        row["density"] = row["sparse"]["density"]
        row["sparse_speedup"] = row["dense"]["median_s"] / row["sparse"]["median_s"]
        out["rows"].append(row)
        log(f"  density {100 * row['density']:6.2f}% (target {100 * rho:g}%): dense {1e3 * row['dense']['median_s']:7.1f} ms, "
            f"sparse {1e3 * row['sparse']['median_s']:7.1f} ms, sparse x{row['sparse_speedup']:.2f}")
        save()
    done = [r for r in out["rows"] if "sparse_speedup" in r]
    out["crossover_density"] = crossover_point(done)
    log(f"  crossover (sparse = dense): {100 * out['crossover_density']:.2f}% active")

    # the auto path's price on this device: count_nonzero's host sync, with the sparse path forced by
    # a limit of 1.0 (kernels.L1_SPARSE_MAX_DENSITY restored afterwards)
    if time.perf_counter() - T0 < deadline_s:
        had = kernels.L1_SPARSE_MAX_DENSITY.get(dev.type)
        kernels.L1_SPARSE_MAX_DENSITY[dev.type] = 1.0
        try:
            m = model_at(0.005)
            out["auto_forced_sparse_at_0.5%"] = timed(m, "auto")
            log(f"  auto path (count + sync, then sparse) at 0.5%: "
                f"{1e3 * out['auto_forced_sparse_at_0.5%']['median_s']:.1f} ms")
            del m
        finally:
            if had is None:
                kernels.L1_SPARSE_MAX_DENSITY.pop(dev.type)
            else:
                kernels.L1_SPARSE_MAX_DENSITY[dev.type] = had
    return out


def format_crossover(sec: dict) -> str:
    lines = [f"L1 step, dense vs sparse path on {sec['shape']} ({sec['step']}; median of {sec['reps']}):",
             "| target % | measured % | dense ms | sparse ms | sparse speed-up | peak GiB dense / sparse |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in sec["rows"]:
        if "sparse_speedup" in r:
            lines.append(f"| {100 * r['target']:g} | {100 * r['density']:.2f} | {1e3 * r['dense']['median_s']:.1f} | "
                         f"{1e3 * r['sparse']['median_s']:.1f} | {r['sparse_speedup']:.2f} | "
                         f"{r['dense']['peak_gib']:.2f} / {r['sparse']['peak_gib']:.2f} |")
    lines.append(f"crossover: {100 * sec.get('crossover_density', float('nan')):.2f}% active")
    return "\n".join(lines)


# ============================================================================ 2f. rows to the host
def _shard_rows_on_host(seqs: Sequences, acts_BTSD: torch.Tensor, seq_offset: int, dtype: torch.dtype) -> dict:
    """``cache.shard_rows`` before the change, on acts already moved to the host (the baseline)."""
    body = seqs.body_mask()
    b, p = body.nonzero(as_tuple=True)
    acts = acts_BTSD[b, p].float()
    if not torch.isfinite(acts).all():
        raise RuntimeError("non-finite activations")
    return {"acts": acts.to(dtype), "token": seqs.input_ids_NT[b, p].to(torch.int32),
            "seq": (b + seq_offset).to(torch.int64), "pos": p.to(torch.int32)}


@section("rows_to_host")
def rows_to_host(dev: torch.device, quick: bool) -> dict:
    """StreamingBuffer._rows' per-forward-batch work, before (``extract_pair(...).cpu()``, then the
    gather and casts on the host) and after (``shard_rows`` on the device tensor: rows picked and cast
    there, only they copied), on the pair of Gemma-2-2B-shaped models; and the rows' equality."""
    T = 64 if quick else CONTEXT
    nb = 2 if quick else FORWARD_BATCH
    warmup, reps = (1, 2) if quick else (2, 5)
    base, cfg = _gemma(dev, quick, 0)
    chat, _ = _gemma(dev, quick, 1)
    pair = ModelPair(base, chat, None, LAYER, cfg.hidden_size)
    g = torch.Generator().manual_seed(nb)
    ids = torch.randint(3, cfg.vocab_size, (nb, T), generator=g)
    ids[:, 0] = 2
    am = torch.ones(nb, T, dtype=torch.long)
    am[1, T - T // 4:] = 0  # one padded sequence: padding rows are dropped too
    seqs = Sequences(ids, am, torch.zeros(nb, dtype=torch.bool))
    out: dict = {"batch": f"{nb}x{T}", "body_rows": int(seqs.body_mask().sum()), "equal": {}, "rows": {}}
    with torch.no_grad():
        acts = extract_pair(pair, ids, am)
        for name, dt in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
            want = _shard_rows_on_host(seqs, acts.cpu(), 7, dt)
            got = shard_rows(seqs, acts, 7, dt)
            out["equal"][name] = all(got[k].device.type == "cpu" and got[k].dtype == want[k].dtype
                                     and torch.equal(got[k], want[k]) for k in want)
        log(f"  rows equal to the host path (storage dtype: equal): {out['equal']}")
        del acts
        variants = {
            "pair: extract_pair only (rows stay on the device)": lambda: extract_pair(pair, ids, am),
            "before: extract_pair(...).cpu() + shard_rows on host": lambda: _shard_rows_on_host(
                seqs, extract_pair(pair, ids, am).cpu(), 0, torch.float32),
            # the library since 2026-11-30 (that day's run named it "alt: rows picked on device in bf16,
            # .cpu(), widened on host", and "after" the variant below)
            "after: shard_rows(seqs, extract_pair(...)) (library: picked on device, cast on host)": lambda: shard_rows(
                seqs, extract_pair(pair, ids, am), 0, torch.float32),
            "alt: rows picked and cast to float32 on the device, then .cpu()": lambda: _rows_cast_on_device(
                seqs, extract_pair(pair, ids, am)),
        }
        for name, fn in variants.items():
            r = time_fn(fn, dev, warmup, reps)
            r["rows_per_s"] = out["body_rows"] / r["median_s"]
            out["rows"][name] = r
            log(f"  {name}: {1e3 * r['median_s']:.1f} ms ({r['rows_per_s']:.0f} rows/s)")
            save()
    return out


def _rows_cast_on_device(seqs: Sequences, acts_BTSD: torch.Tensor) -> torch.Tensor:
    """The rows picked and widened to float32 on the device, then copied (twice the bytes of bf16)."""
    b, p = seqs.body_mask().nonzero(as_tuple=True)
    dev = acts_BTSD.device
    rows = acts_BTSD[b.to(dev), p.to(dev)].float()
    if not torch.isfinite(rows).all():
        raise RuntimeError("non-finite activations")
    return rows.cpu()


# ============================================================================ projection
def _g(d: dict, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


@section("projection")
def projection(quick: bool) -> dict:
    S = RESULTS["sections"]
    steps, ext, buf = S.get("crosscoder_steps") or {}, S.get("extraction") or {}, S.get("streaming_buffer_host") or {}
    T = ext.get("context", CONTEXT)
    fb = (2,) if quick else (FORWARD_BATCH,)
    rows_ext = ext.get("rows", {})
    pair_rows = _g(rows_ext, f"pair + StreamingBuffer rows: shard_rows(seqs, extract_pair(...)), {fb[0]}x{T}", "body_tokens_per_s")
    pair_gpu = _g(rows_ext, f"pair: extract_pair, {fb[0]}x{T}", "body_tokens_per_s")
    one = _g(rows_ext, f"one model: residual_after, {fb[0]}x{T}", "body_tokens_per_s")
    # buffer host cost per token grows with the buffer (each refill concatenates chunk by chunk):
    # scale the largest measured size linearly to the streaming default of 2^20 rows
    # (a refill concatenates ~buffer/2 rows chunk by chunk, each cat copying the whole buffer: the copies
    # per served token grow linearly with the buffer). Fit us = a + b * size through the two sizes
    # measured; with one, scale it linearly.
    buf_meas = sorted((int(k.split("=")[1]), v["us_per_token"]) for k, v in buf.items()
                      if k.startswith("buffer_tokens=") and isinstance(v, dict))
    buf_us_default = None
    if len(buf_meas) >= 2:
        (s1, u1), (s2, u2) = buf_meas[-2:]
        b_ = (u2 - u1) / (s2 - s1)
        buf_us_default = u2 + b_ * (STREAM_BUFFER_TOKENS - s2)
    elif buf_meas:
        size, us = buf_meas[-1]
        buf_us_default = us * STREAM_BUFFER_TOKENS / size
    runs = [("L1, 400M tokens, B=4096", L1_TOKENS, L1_BATCH, "L1 Trainer.step, batch from host"),
            ("BatchTopK k=100, 100M tokens, B=2048", TOPK_TOKENS, TOPK_BATCH,
             "BatchTopK Trainer.step, batch from host, no dead")]
    table = []
    for name, tokens, B, key in runs:
        step_s = _g(steps, key, "median_s")
        n = tokens // B
        r = {"run": name, "steps": n, "step_s": step_s}
        if step_s is not None:
            r["train_h"] = n * step_s / 3600
        if pair_rows:
            r["extract_pair_h"] = tokens / pair_rows / 3600
        if pair_gpu:
            r["extract_pair_gpu_only_h"] = tokens / pair_gpu / 3600
        if buf_us_default is not None:
            r["buffer_host_h (2^20-row buffer, extrapolated)"] = tokens * buf_us_default / 1e6 / 3600
        if step_s is not None and pair_rows:
            r["total_h (extract+rows+step, no buffer)"] = r["train_h"] + r["extract_pair_h"]
            if buf_us_default is not None:
                r["total_h (with StreamingBuffer host cost)"] = (r["total_h (extract+rows+step, no buffer)"]
                                                                 + r["buffer_host_h (2^20-row buffer, extrapolated)"])
        table.append(r)
    out = {"one_model_rows_per_s": one, "pair_rows_per_s (gpu only)": pair_gpu,
           "pair_rows_per_s (incl. shard_rows to host)": pair_rows,
           "buffer_us_per_token_at_2^20 (extrapolated linearly)": buf_us_default, "table": table,
           "note": "serial: the library extracts and trains in one process, one after the other; rows = tokens "
                   "without BOS (1023 of 1024 per sequence)"}
    log("  projection (hours): " + json.dumps(table, indent=1, default=lambda v: round(v, 3)))
    return out


def print_table() -> None:
    S = RESULTS["sections"]
    lines = ["", "=" * 100, "SUMMARY"]
    env = S.get("environment") or {}
    lines.append(f"{env.get('gpu', env.get('device'))} | torch {env.get('torch')} | transformers {env.get('transformers')}")
    c = S.get("correctness")
    if c:
        lines.append(f"correctness on {c['device']}: pass={c['pass']} failures={c['failures']}")
        for sp in ("l1", "batchtopk"):
            if sp in c:
                for s in c[sp]["trainer_steps_vs_cpu"]:
                    lines.append(f"  {sp:9} step {s['step']}: loss rel {s['acc_loss']['rel_to_max']:.1e} | grad rel "
                                 f"{s['grad_max_rel_to_max']:.1e} | params max abs {s['param_max_abs']:.1e} | update diff "
                                 f"{s['update_max_abs_diff_over_lr']:.1e} lr | aux rel {s['acc_aux']['rel_to_max']:.1e} | "
                                 f"dead/active counts equal {s['since_fired_equal'] and s['active_F_equal']}")
                for name, v in c[sp]["fast_vs_reference_on_device"].items():
                    if isinstance(v, dict):
                        lines.append(f"  {sp:9} fast vs {name}: loss rel {v['loss']['rel_to_max']:.1e}, grad rel "
                                     f"{v['grad_max_rel_to_max']:.1e}")
    st = S.get("crosscoder_steps") or {}
    lines.append(f"{'crosscoder step (Gemma shape)':<66} {'ms':>8} {'tok/s':>10} {'peak GiB':>9}")
    for k, v in st.items():
        if isinstance(v, dict) and "median_s" in v:
            lines.append(f"{k:<66} {1e3 * v['median_s']:>8.1f} {v['tokens_per_s']:>10.0f} {v['peak_gib']:>9.2f}")
    ex = (S.get("extraction") or {}).get("rows", {})
    lines.append(f"{'extraction (bf16, eager, to block 13)':<66} {'ms':>8} {'tok/s':>10} {'peak GiB':>9}")
    for k, v in ex.items():
        if "median_s" in v:
            lines.append(f"{k:<66} {1e3 * v['median_s']:>8.1f} {v['tokens_per_s']:>10.0f} {v['peak_gib']:>9.2f}")
    pr = S.get("projection") or {}
    for r in pr.get("table", []):
        lines.append("  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if RESULTS["errors"]:
        lines.append(f"ERRORS in: {list(RESULTS['errors'])}")
    lines.append(f"elapsed {time.perf_counter() - T0:.1f} s")
    print("\n".join(lines), flush=True)


def main() -> None:
    global OUT_PATH
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on any device (a smoke check, not a figure)")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu.json, else bench_gpu.json here)")
    ap.add_argument("--budget", type=float, default=210.0, help="seconds after which optional parts are skipped")
    ap.add_argument("--only", default="", help="comma list of sections: correctness,steps,extraction,buffer,"
                                                 "crossover,rows (the last two run only when named)")
    ap.add_argument("--crossover", action="store_true", help="only the L1 dense/sparse crossover and the rows "
                                                            "check (--only crossover,rows)")
    args = ap.parse_args()
    if args.crossover:
        args.only = "crossover,rows"
    OUT_PATH = Path(args.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else "bench_gpu.json"))
    dev = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if args.device == "auto" else args.device))
    RESULTS["args"] = vars(args)
    only = set(filter(None, args.only.split(",")))
    environment(dev)
    if not only or "correctness" in only:
        correctness(dev, args.quick)
    if not only or "steps" in only:
        crosscoder_steps(dev, args.quick)
    if not only or "extraction" in only:
        extraction(dev, args.quick)
    if not only or "buffer" in only:
        streaming_buffer(args.quick, args.budget)
    if "crossover" in only:
        sec = l1_crossover(dev, args.quick, args.budget)
        if sec:
            print(format_crossover(sec), flush=True)
    if "rows" in only:
        rows_to_host(dev, args.quick)
    if only and not only & {"steps", "extraction", "buffer"}:  # nothing for the projection
        save()
        log(f"results in {OUT_PATH}")
        return
    projection(args.quick)
    print_table()
    save()
    log(f"results in {OUT_PATH}")


if __name__ == "__main__":
    main()
