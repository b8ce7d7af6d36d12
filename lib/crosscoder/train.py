"""Crosscoder training: Adam, lr constant then linear decay, lambda warm-up, grad-norm clipping,
held-out evaluation, a JSONL log, and checkpoints that resume bit-identically on CPU.

The data comes from a ``BatchSource``: ``batches(start_step)`` yields raw [B, S, D] activations for
steps start_step, start_step + 1, ... and must give the same batch for the same step whatever the
start (so a resumed run sees exactly the batches the uninterrupted run would have seen).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Protocol

import torch
from torch import Tensor
from crosscoder.progress import progress_bar

from crosscoder import checkpoint as ckpt
from crosscoder.atomic import write_json_atomic
from crosscoder.config import ConfigError, RunConfig, TrainConfig
from crosscoder.distributed import rank_and_world, rank_share
from crosscoder.kernels import training_step
from crosscoder.analysis.metrics import classify_latents, class_counts, diff_geometry, evaluate
from crosscoder.model import Crosscoder

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "crosscoder"
LOG = "log.jsonl"


class BatchSource(Protocol):
    def batches(self, start_step: int) -> Iterator[Tensor]:
        """Raw [B, S, D] activation batches for steps start_step, start_step + 1, ..."""
        ...


class Constraint(Protocol):
    """A structure of the weights that training keeps exactly (a designated-shared crosscoder's tied
    decoder rows, a Dedicated Feature Crosscoder's zero blocks). The trainer calls
    ``project_grads_`` after the backward pass (and the data-parallel all-reduce), before clipping,
    and ``project_weights_`` after every optimiser step and once on a fresh start. Projecting the
    weights after the step is what keeps the structure exact: a gradient mask alone holds only while
    the optimiser adds nothing after the mask (no Adam moment from before it, no decay or regulariser
    term applied inside the step, no rounding that differs between tied copies)."""

    def project_grads_(self, model: Crosscoder) -> None:
        """Replace the gradients in place by those of the constrained parametrisation."""
        ...

    def project_weights_(self, model: Crosscoder) -> None:
        """Map the weights in place onto the constraint set (a no-op on weights already there)."""
        ...


class TensorBatches:
    """Batches drawn from an in-memory [N, S, D] tensor: a fresh seeded permutation each epoch.

    The permutation of epoch e depends only on (seed, e), so any step can be produced directly.
    With ``world > 1`` (data parallel), rank r yields only its contiguous 1/world slice of each
    global batch of ``batch_size`` tokens, so the ranks together see exactly the 1-rank batches.
    ``rank``/``world`` default to those of the torch.distributed group (0 and 1 without one).
    """

    def __init__(self, acts_NSD: Tensor, batch_size: int, seed: int = 0, *, rank: int | None = None,
                 world: int | None = None):
        if acts_NSD.ndim != 3:
            raise ConfigError(f"acts must be [N, S, D], got shape {tuple(acts_NSD.shape)}")
        if acts_NSD.shape[0] < batch_size:
            raise ConfigError(
                f"only {acts_NSD.shape[0]} activations for batch_size {batch_size}; "
                f"extract more tokens or lower batch_size"
            )
        rank, world, local = rank_share(batch_size, rank, world)
        self.acts = acts_NSD
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = acts_NSD.shape[0] // batch_size
        self._slice = slice(rank * local, (rank + 1) * local)

    def _perm(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.acts.shape[0], generator=g)

    def batches(self, start_step: int) -> Iterator[Tensor]:
        step = start_step
        epoch, perm = -1, None
        while True:
            e, j = divmod(step, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            idx = perm[j * self.batch_size : (j + 1) * self.batch_size]
            yield self.acts[idx[self._slice]]
            step += 1


class TrainResult(NamedTuple):
    model: Crosscoder
    """The trained crosscoder (unfolded; input scales in ``input_scale_S``)."""
    model_dir: Path
    """Folder with model.safetensors + config.json + metrics.json."""
    metrics: dict[str, Any]
    """Final held-out metrics (also in metrics.json)."""
    resumed_from: int
    """Step the run resumed from (0 for a fresh run, n_steps for a cached result)."""


# ---------------------------------------------------------------------------- data parallel
def _all_reduce_(tensors: list[Tensor], op: str = "mean") -> None:
    """In-place all-reduce of a few tensors as one flat buffer (one collective per step)."""
    dist = torch.distributed
    flat = torch.cat([t.reshape(-1) for t in tensors])  # callers pass tensors of one dtype
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if op == "mean":
        flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


# ---------------------------------------------------------------------------- optimiser
def make_optimizer(params: list[Tensor], tcfg: TrainConfig) -> torch.optim.Adam:
    """The trainer's Adam. On the CPU it is torch's fused kernel (one pass per parameter): the
    default there is a Python loop of several passes, 0.92 s against 0.14 s per step for the
    Gemma-shape crosscoder's 151M parameters (bench/README.md, "Sparse L1"), which would otherwise
    be most of a sparse step. Other devices keep torch's default (not measured here)."""
    on_cpu = all(p.device.type == "cpu" for p in params)
    return torch.optim.Adam(params, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), fused=True if on_cpu else None)


# ---------------------------------------------------------------------------- accumulators
@dataclass
class Accumulators:
    """What the trainer sums between log lines and counts per latent; tensors beside the weights,
    so a step never waits for the host. Checkpointed (as ``acc.<field>``) for bit-identical resume."""

    loss: Tensor
    """Sum of the step losses in the current log window (float64 scalar)."""
    recon: Tensor
    """Sum of the reconstruction losses in the window."""
    sparsity: Tensor
    """Sum of the sparsity penalties in the window."""
    l0: Tensor
    """Sum of the per-step L0 in the window."""
    aux: Tensor
    """Sum of the AuxK losses in the window."""
    n: Tensor
    """Steps in the window (int64 scalar)."""
    nonfinite: Tensor
    """Steps whose batch held a NaN/Inf (int64 scalar; checked on logging steps)."""
    active_F: Tensor
    """Training batches in which each latent fired, since the start of the run."""
    since_fired_F: Tensor
    """Training tokens since each latent last fired (AuxK's dead set)."""

    WINDOW = ("loss", "recon", "sparsity", "l0", "aux")

    @classmethod
    def zeros(cls, n_latents: int) -> "Accumulators":
        f64, i64 = torch.float64, torch.int64
        return cls(*(torch.zeros((), dtype=f64) for _ in range(5)), torch.zeros((), dtype=i64),
                   torch.zeros((), dtype=i64), torch.zeros(n_latents, dtype=i64), torch.zeros(n_latents, dtype=i64))

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> "Accumulators":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def to(self, device: torch.device) -> "Accumulators":
        return Accumulators(**{k: v.to(device) for k, v in self.as_dict().items()})

    def reset_window(self) -> None:
        for k in self.WINDOW:
            getattr(self, k).zero_()
        self.n.zero_()


# ---------------------------------------------------------------------------- checkpoints
def _as_json(run_cfg: RunConfig) -> dict[str, Any]:
    """The config as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(run_cfg.to_dict()))


def _same_run(stored: Any, run_cfg: RunConfig) -> bool:
    """Whether a stored run config (JSON) is ``run_cfg``. Compared as configs, not as JSON, so a
    run saved before a field existed matches the config that has that field at its default."""
    if not isinstance(stored, dict):
        return False
    try:
        return RunConfig.from_dict(stored) == run_cfg
    except (ConfigError, TypeError, KeyError):
        return False


NORMALISATION_BUFFERS = ("input_scale_S", "input_mean_SD")
"""The buffers a model's normalisation is fitted into before training (``fit_normalisation_``)."""


def _check_same_data(stored: dict[str, Tensor], model: Crosscoder, where: Path) -> None:
    """Refuse a stored run whose normalisation was fitted on other activations than ``model``'s.

    The run config names the crosscoder and the optimisation, not the data: the same config read at
    another layer (gemma3-organism moved from block 9 to 12) or from another cache would otherwise
    load the old weights as this run's. The fitted scale and mean are a fingerprint of the norm
    split; recomputed from the same cache they agree to float rounding."""
    for name in NORMALISATION_BUFFERS:
        mine = getattr(model, name, None)
        theirs = stored.get(name)
        if mine is None or theirs is None or theirs.shape != mine.shape:
            continue
        if not torch.allclose(theirs.float().cpu(), mine.float().cpu(), rtol=1e-4, atol=1e-6):
            raise ConfigError(
                f"{where} holds a run with this config trained on other activations (its fitted "
                f"{name} differs: another layer, model pair or cache); use another out_dir or delete it"
            )


def _train_state(model: Crosscoder, opt: torch.optim.Optimizer, acc: Accumulators) -> dict[str, Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, val in opt.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(val)
    tensors.update({f"acc.{k}": v for k, v in acc.as_dict().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors


def save_checkpoint(run_dir: Path, model, opt, acc, step: int, run_cfg: RunConfig) -> None:
    def fill(tmp: Path) -> None:
        digest = ckpt.save_tensors_checked(_train_state(model, opt, acc), tmp, "state.safetensors")
        write_json_atomic(
            tmp / "config.json",
            {"step": step, "run": run_cfg.to_dict(), "files": {"state.safetensors": digest}},
        )

    ckpt.write_folder_atomically(run_dir / CHECKPOINT_DIR, fill)


def load_checkpoint(run_dir: Path, model, opt, run_cfg: RunConfig) -> tuple[int, Accumulators]:
    folder = run_dir / CHECKPOINT_DIR
    with open(folder / "config.json") as fh:
        meta = json.load(fh)
    if not _same_run(meta["run"], run_cfg):
        raise ConfigError(
            f"{folder} was written by a run with a different config; use another out_dir, "
            f"or delete {run_dir} to start over"
        )
    state = ckpt.load_tensors_checked(folder, "state.safetensors", meta["files"]["state.safetensors"])
    stored = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
    _check_same_data(stored, model, run_dir)
    model.load_state_dict(stored)
    params = dict(model.named_parameters())
    for name, p in params.items():
        # Adam keeps "step" on the host and its moments beside the parameter
        entry = {k.split(".")[-1]: v if k.endswith(".step") else v.to(p.device)
                 for k, v in state.items() if k.startswith(f"optim.{name}.")}
        if entry:
            opt.state[p] = entry
    torch.set_rng_state(state["rng.torch"])
    acc = Accumulators.from_dict({k[4:]: v for k, v in state.items() if k.startswith("acc.")})
    return int(meta["step"]), acc


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = []
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- metrics
def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The training log of a run folder (one record per logged step or evaluation)."""
    path = Path(run_dir) / LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(model: Crosscoder, heldout_raw_NSD: Tensor, batch_size: int = 4096) -> dict[str, Any]:
    """Held-out metrics + model-diff class counts (both r and Δnorm) for ``metrics.json``."""
    ev = evaluate(model, heldout_raw_NSD, batch_size=batch_size)
    out = ev.as_dict(model.cfg.source_names)
    if model.cfg.n_sources == 2:
        geo = diff_geometry(model)
        alive = ev.freq_F > 0
        out["classes_rel_norm"] = class_counts(classify_latents(geo.rel_norm_F, "kissane", alive), "kissane")
        out["classes_delta_norm"] = class_counts(classify_latents(geo.delta_norm_F, "minder", alive), "minder")
    return out


def _finished_run(final_dir: Path, model: Crosscoder, run_cfg: RunConfig) -> TrainResult | None:
    """The finished run in ``final_dir`` loaded into ``model`` (None if there is none); a finished
    run with another config is refused rather than silently overwritten."""
    if not (final_dir / "config.json").exists():
        return None
    meta = ckpt.read_config(final_dir)
    if not _same_run(meta.get("extra", {}).get("run"), run_cfg):
        raise ConfigError(f"{final_dir.parent} holds a finished run with a different config; use another "
                          f"out_dir or delete it")
    stored = ckpt.load_crosscoder(final_dir).state_dict()
    _check_same_data(stored, model, final_dir.parent)
    model.load_state_dict(stored)
    with open(final_dir / "metrics.json") as fh:
        return TrainResult(model, final_dir, json.load(fh), run_cfg.train.n_steps)


# ---------------------------------------------------------------------------- training loop
class Trainer:
    """One crosscoder's optimisation state; ``step(raw)`` consumes one batch.

    Split from the loop so that a sweep (``train_many``) can feed the same batch to several
    crosscoders instead of re-reading the activations once per run.
    """

    def __init__(
        self,
        model: Crosscoder,
        tcfg: TrainConfig,
        out_dir: str | os.PathLike,
        *,
        heldout_raw_NSD: Tensor | None = None,
        resume: bool = True,
        sources: list[int] | None = None,
        constraint: Constraint | None = None,
    ):
        # ``sources`` picks a subset of the data's sources (e.g. [0] for a per-model SAE baseline
        # trained in the same sweep as the crosscoder on the same batches).
        self.sources = sources
        self.constraint = constraint
        if sources is not None and heldout_raw_NSD is not None:
            heldout_raw_NSD = heldout_raw_NSD[:, sources]
        self.model, self.tcfg, self.heldout = model, tcfg, heldout_raw_NSD
        # Data parallel (torchrun): every rank holds the same weights and optimiser state, sees
        # batch_size / world tokens per step, and averages gradients; rank 0 alone writes files.
        self.rank, self.world = rank_and_world()
        if tcfg.batch_size % self.world:
            raise ConfigError(
                f"batch_size {tcfg.batch_size} must be divisible by the world size {self.world}"
            )
        self.local_batch = tcfg.batch_size // self.world
        self.run_dir = Path(out_dir)
        self.run_cfg = RunConfig(model=model.cfg, train=tcfg)
        ckpt.ensure_writable_dir(self.run_dir)
        if heldout_raw_NSD is not None:
            model.check_input(heldout_raw_NSD)
        self.final_dir = self.run_dir / MODEL_DIR
        self.params = list(model.parameters())
        # Train where the model is (a GPU under torchrun/NCCL: cuda:LOCAL_RANK); batches come from
        # the host and are moved per step, accumulators live beside the weights (no per-step sync).
        self.device = model.W_dec_FSD.device
        self.opt = make_optimizer(self.params, tcfg)
        # Resolved once per run; "auto" asks the hardware (the LM fine-tune's rule: CUDA, or a CPU
        # with bf16 arithmetic), imported only then since its module loads transformers.
        self.bf16 = bool(tcfg.bf16_autocast)
        if tcfg.bf16_autocast == "auto":
            from crosscoder.organism.training import use_bf16_autocast
            self.bf16 = use_bf16_autocast("auto", self.device)
        self.gemm_dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.log_path = self.run_dir / LOG
        # A finished run with this config is loaded (no step left); else resume or start afresh.
        self.result = _finished_run(self.final_dir, model, self.run_cfg) if resume else None
        self.start, acc = 0, Accumulators.zeros(model.cfg.n_latents)
        if self.result is not None:
            self.start = tcfg.n_steps
        elif resume and (self.run_dir / CHECKPOINT_DIR / "config.json").exists():
            self.start, acc = load_checkpoint(self.run_dir, model, self.opt, self.run_cfg)
            _truncate_log(self.log_path, self.start)
        elif self.log_path.exists():
            self.log_path.unlink()
        if constraint is not None and self.start == 0:
            with torch.no_grad():
                constraint.project_weights_(model)
        self.acc = acc.to(self.device)
        self.step_idx = self.start
        self.t0 = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.step_idx >= self.tcfg.n_steps

    def _log(self, rec: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.log_path, "a") as log:
            log.write(json.dumps(rec) + "\n")

    def step(self, raw: Tensor) -> None:
        model, tcfg, acc, step = self.model, self.tcfg, self.acc, self.step_idx
        if self.sources is not None:
            raw = raw[:, self.sources]
        if step == self.start:
            model.check_input(raw)
            if raw.shape[0] != self.local_batch:
                raise ConfigError(
                    f"the data yields batches of {raw.shape[0]} tokens but TrainConfig.batch_size "
                    f"is {tcfg.batch_size} over {self.world} rank(s); make them agree"
                )
        x = model.normalise(raw.to(self.device, non_blocking=True).float())
        acc.nonfinite += (~torch.isfinite(x)).any()
        for g in self.opt.param_groups:
            g["lr"] = tcfg.lr_at(step)
        use_aux = model.cfg.sparsity == "batchtopk" and tcfg.auxk_alpha > 0
        dead_F = acc.since_fired_F >= tcfg.auxk_dead_tokens if use_aux else None
        out = training_step(model, x, tcfg.l1_coeff_at(step), dead_F=dead_F, k_aux=tcfg.auxk_k,
                            auxk_alpha=tcfg.auxk_alpha, gemm_dtype=self.gemm_dtype)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        n_active_F, min_score = out.n_active_F, out.min_score
        if self.world > 1:
            # Each rank's loss is a mean over its equal share of tokens, so the mean of the
            # gradients is the gradient of the global-batch loss.
            _all_reduce_([p.grad for p in self.params])
            n_active_F = n_active_F.clone()
            _all_reduce_([n_active_F], op="sum")
            torch.distributed.all_reduce(min_score, op=torch.distributed.ReduceOp.MIN)
        if self.constraint is not None:
            with torch.no_grad():
                self.constraint.project_grads_(model)
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, tcfg.grad_clip)
        self.opt.step()
        if self.constraint is not None:
            with torch.no_grad():
                self.constraint.project_weights_(model)
        if model.cfg.sparsity == "batchtopk" and step >= tcfg.threshold_start_step:
            with torch.no_grad():
                th, mom = model.threshold, tcfg.threshold_momentum
                th.copy_(torch.where(th < 0, min_score, mom * th + (1 - mom) * min_score))
        acc.loss += out.loss.detach()
        acc.recon += out.recon_loss
        acc.sparsity += out.sparsity_loss
        acc.l0 += out.l0
        acc.n += 1
        acc.active_F += n_active_F
        acc.aux += out.aux_loss
        # n_active_F is the global batch's (summed over ranks), so every rank agrees on the dead set
        acc.since_fired_F.add_(tcfg.batch_size).masked_fill_(n_active_F > 0, 0)
        done = self.step_idx = step + 1
        if done % tcfg.log_every == 0 or done == tcfg.n_steps:
            self._log_train(done, step)
        if self.rank == 0 and self.heldout is not None and (done % tcfg.eval_every == 0 or done == tcfg.n_steps):
            ev = evaluate(model, self.heldout).as_dict(model.cfg.source_names)
            self._log({"step": done, "split": "heldout", **ev})
        if tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0 and done < tcfg.n_steps:
            if self.rank == 0:
                save_checkpoint(self.run_dir, model, self.opt, acc, done, self.run_cfg)
            if self.world > 1:
                torch.distributed.barrier()

    def _log_train(self, done: int, step: int) -> None:
        acc, tcfg = self.acc, self.tcfg
        if self.world > 1:  # log the global-batch means
            _all_reduce_([getattr(acc, k) for k in acc.WINDOW])
            _all_reduce_([acc.nonfinite], op="sum")
        n = int(acc.n)  # the only host sync of the step, and only on logging steps
        if int(acc.nonfinite):
            raise ConfigError(
                f"non-finite activations in the training batches before step {done}; "
                f"check the extraction (dtype overflow?) and rebuild the cache"
            )
        rec = {
            "step": done,
            "split": "train",
            "loss": float(acc.loss) / n,
            "recon_loss": float(acc.recon) / n,
            "sparsity_loss": float(acc.sparsity) / n,
            "l0": float(acc.l0) / n,
            "lr": tcfg.lr_at(step),
            "l1_coeff": tcfg.l1_coeff_at(step),
            "dead_frac_so_far": float((acc.active_F == 0).double().mean()),
        }
        if self.model.cfg.sparsity == "batchtopk":
            rec["aux_loss"] = float(acc.aux) / n
            rec["dead_latents"] = int((acc.since_fired_F >= tcfg.auxk_dead_tokens).sum())
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"training diverged at step {done}: loss {rec['loss']}")
        self._log(rec)
        acc.reset_window()

    def finish(self) -> TrainResult:
        """Final held-out metrics and the artifact folder (written atomically)."""
        if self.result is not None:
            return self.result
        if not self.done:
            raise RuntimeError(f"finish() called at step {self.step_idx} of {self.tcfg.n_steps}")
        model, tcfg = self.model, self.tcfg
        metrics: dict[str, Any] = {
            "steps": tcfg.n_steps,
            "tokens_trained": tcfg.n_steps * tcfg.batch_size,
            "resumed_from_step": self.start,
            "wall_seconds_this_session": time.perf_counter() - self.t0,
            "train_dead_frac": float((self.acc.active_F == 0).double().mean()),
        }
        metrics["world_size"] = self.world
        metrics["bf16_gemms"] = self.bf16  # bf16_autocast as resolved on this machine
        if self.rank == 0:
            if self.heldout is not None:
                metrics["heldout"] = summarize(model, self.heldout)
            ckpt.save_crosscoder(model, self.final_dir, extra={"run": _as_json(self.run_cfg)}, metrics=metrics)
        if self.world > 1:
            torch.distributed.barrier()
        self.result = TrainResult(model, self.final_dir, metrics, self.start)
        return self.result


def train(
    model: Crosscoder,
    data: BatchSource,
    tcfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    heldout_raw_NSD: Tensor | None = None,
    resume: bool = True,
    progress: bool = True,
    constraint: Constraint | None = None,
) -> TrainResult:
    """Train ``model`` in place; write log, checkpoints and the final artifact under ``out_dir``.

    With ``resume`` a finished run with the same config is returned from disk, and an interrupted
    one continues from its last checkpoint (weights bit-identical to an uninterrupted run on CPU).
    ``model.input_scale_S`` must already hold the normalisation factors. ``constraint`` keeps a
    structure of the weights exact through training (``Constraint``); it is not part of the run's
    config, so the caller keys ``out_dir`` by it (``crosscoder.methods`` does).
    """
    return train_many([model], data, [tcfg], [out_dir], heldout_raw_NSD=heldout_raw_NSD,
                      resume=resume, progress=progress, constraints=[constraint])[0]


def train_many(
    models: list[Crosscoder],
    data: BatchSource,
    tcfgs: list[TrainConfig],
    out_dirs: list[str | os.PathLike],
    *,
    heldout_raw_NSD: Tensor | None = None,
    resume: bool = True,
    progress: bool = True,
    sources: list[list[int] | None] | None = None,
    constraints: list[Constraint | None] | None = None,
) -> list[TrainResult]:
    """Train several crosscoders in lockstep on ONE stream of batches (a sweep reads each batch
    once). The models may differ in anything but batch_size; each stops at its own n_steps, and
    each resumes independently. Its result equals training each one alone with ``train``.
    ``constraints``: one ``Constraint`` (or None) per model."""
    if not (len(models) == len(tcfgs) == len(out_dirs)) or not models:
        raise ConfigError("train_many needs one TrainConfig and one out_dir per model")
    if len({t.batch_size for t in tcfgs}) != 1:
        raise ConfigError("train_many: all runs must share batch_size (they share the batches)")
    sources = sources if sources is not None else [None] * len(models)
    constraints = constraints if constraints is not None else [None] * len(models)
    if len(constraints) != len(models):
        raise ConfigError("train_many needs one constraint (or None) per model")
    trainers = [Trainer(m, t, o, heldout_raw_NSD=heldout_raw_NSD, resume=resume, sources=src, constraint=c)
                for m, t, o, src, c in zip(models, tcfgs, out_dirs, sources, constraints)]
    pending = [tr for tr in trainers if not tr.done]
    if pending:
        start = min(tr.step_idx for tr in pending)
        end = max(tr.tcfg.n_steps for tr in pending)
        # mininterval keeps the executed notebooks short (each refresh is a line of output there).
        bar = progress_bar(total=end, initial=start, disable=not progress, desc="train", unit="step", mininterval=3.0)
        batches = data.batches(start)
        for step in range(start, end):
            raw = next(batches)
            for tr in pending:
                if tr.step_idx == step and not tr.done:
                    tr.step(raw)
            bar.update(1)
        bar.close()
    return [tr.finish() for tr in trainers]
