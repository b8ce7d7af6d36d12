"""Data-parallel training under torchrun (2 gloo processes on CPU) and kill -9 / resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crosscoder import cli
from crosscoder.checkpoint import load_crosscoder
from crosscoder.config import CrosscoderConfig, RunConfig, TrainConfig
from crosscoder.data.normalise import estimate_input_scale
from crosscoder.kernels import training_step
from crosscoder.model import Crosscoder
from crosscoder.synthetic import SyntheticConfig, sample
from crosscoder.train import TensorBatches

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _write_inputs(tmp: Path, **train_kw) -> tuple[Path, Path]:
    sc = SyntheticConfig(d_model=16, n_shared=20, n_base_only=4, n_chat_only=4)
    save_file({"train": sample(sc, 8192).acts_NSD.contiguous(),
               "heldout": sample(sc, 1024, seed_offset=1).acts_NSD.contiguous()}, str(tmp / "acts.safetensors"))
    rc = RunConfig(model=CrosscoderConfig(d_model=16, n_latents=48),
                   train=TrainConfig(**{"n_steps": 30, "batch_size": 256, "lr": 3e-3, "l1_coeff": 0.5,
                                        "log_every": 5, "eval_every": 30, **train_kw}))
    (tmp / "run.json").write_text(rc.to_json())
    return tmp / "run.json", tmp / "acts.safetensors"


def _torchrun(nproc: int, run: Path, acts: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "crosscoder.cli", "train", "--run-config", str(run), "--acts", str(acts),
            "--out", str(out), "--quiet"]


def _cli_in_process(args: list[str]) -> None:
    """``python -m crosscoder.cli`` run in this process, on one thread like the subprocesses
    (OMP_NUM_THREADS=1). One rank creates no process group (cli._init_distributed), so this is the
    code path of a one-rank torchrun or a plain run, without paying for two more interpreters."""
    assert "WORLD_SIZE" not in os.environ
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)


def _train_on_one_and_two_ranks(run: Path, acts: Path, tmp: Path):
    """The crosscoders of ``run`` trained with 1 rank (in process) and with 2 gloo ranks (torchrun)."""
    _cli_in_process(["train", "--run-config", str(run), "--acts", str(acts), "--out", str(tmp / "w1"), "--quiet"])
    r = subprocess.run(_torchrun(2, run, acts, tmp / "w2"), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_crosscoder(tmp / "w1" / "crosscoder"), load_crosscoder(tmp / "w2" / "crosscoder")


def test_two_ranks_match_one_rank(tmp_path):
    run, acts = _write_inputs(tmp_path)
    m1, m2 = _train_on_one_and_two_ranks(run, acts, tmp_path)
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # and the two-rank run logged global-batch metrics like the one-rank run
    l1 = [json.loads(x) for x in (tmp_path / "w1" / "log.jsonl").read_text().splitlines()]
    l2 = [json.loads(x) for x in (tmp_path / "w2" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in l1] == [r["step"] for r in l2]
    t1 = [r for r in l1 if r["split"] == "train"]
    t2 = [r for r in l2 if r["split"] == "train"]
    for a, b in zip(t1, t2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert json.loads((tmp_path / "w2" / "crosscoder" / "metrics.json").read_text())["world_size"] == 2


def _per_rank_batchtopk_reference(run_cfg: RunConfig, tensors: dict, world: int) -> Crosscoder:
    """What a data-parallel BatchTopK run computes, in one process: each rank selects the top k*B
    of ITS share of the batch (B = batch_size / world), the gradients are averaged, the threshold
    EMA takes the smallest selected score over the ranks, and the dead set counts activations
    summed over ranks."""
    tcfg, F = run_cfg.train, run_cfg.model.n_latents
    model = Crosscoder(run_cfg.model, generator=torch.Generator().manual_seed(tcfg.seed))
    model.input_scale_S.copy_(estimate_input_scale(tensors["heldout"]))
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    shards = [TensorBatches(tensors["train"], tcfg.batch_size, seed=tcfg.seed, rank=r, world=world).batches(0)
              for r in range(world)]
    since_F = torch.zeros(F, dtype=torch.int64)
    for step in range(tcfg.n_steps):
        dead_F = since_F >= tcfg.auxk_dead_tokens
        grads = [torch.zeros_like(p) for p in params]
        mins, count_F = [], torch.zeros(F, dtype=torch.int64)
        for shard in shards:
            out = training_step(model, model.normalise(next(shard).float()), 0.0, dead_F=dead_F,
                                k_aux=tcfg.auxk_k, auxk_alpha=tcfg.auxk_alpha)
            for acc, g in zip(grads, torch.autograd.grad(out.loss, params)):
                acc += g / world
            mins.append(float(out.min_score))
            count_F += out.n_active_F
        for p, g in zip(params, grads):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = tcfg.lr_at(step)
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        with torch.no_grad():
            th, mom, m = model.threshold, tcfg.threshold_momentum, min(mins)
            th.fill_(m if float(th) < 0 else mom * float(th) + (1 - mom) * m)
        since_F += tcfg.batch_size
        since_F[count_F > 0] = 0
    return model


def test_two_rank_batchtopk_selects_per_rank(tmp_path):
    """BatchTopK under data parallelism selects the top k*B of each rank's share of the batch (not
    the global top k*B): the 2-rank run equals a one-process simulation of exactly that, and so
    differs from the 1-rank run with the same global batch."""
    run, acts = _write_inputs(tmp_path, auxk_alpha=0.25, auxk_dead_tokens=512, n_steps=20)
    rc = RunConfig.from_json(run.read_text())
    rc = RunConfig(model=CrosscoderConfig(d_model=16, n_latents=48, sparsity="batchtopk", k=4), train=rc.train)
    run.write_text(rc.to_json())
    m1, m2 = _train_on_one_and_two_ranks(run, acts, tmp_path)
    ref = _per_rank_batchtopk_reference(rc, load_file(str(acts)), world=2)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert float(m2.threshold) > 0
    diff = max(float((m1.state_dict()[k] - v).abs().max()) for k, v in m2.state_dict().items()
               if v.is_floating_point())
    assert diff > 1e-4  # per-rank selection is not the global selection


def test_kill_9_then_rerun_is_bit_identical(tmp_path):
    run, acts = _write_inputs(tmp_path, n_steps=400, checkpoint_every=20, batch_size=512)
    cmd = [sys.executable, "-m", "crosscoder.cli", "train", "--run-config", str(run), "--acts", str(acts),
           "--quiet"]
    # the uninterrupted reference, in process (the same code on one thread); the killed and the
    # resumed runs are real processes
    _cli_in_process(cmd[3:] + ["--out", str(tmp_path / "ref")])
    out = tmp_path / "run"
    proc = subprocess.Popen(cmd + ["--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "config.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "crosscoder").exists():
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    killed_at = json.loads((out / "checkpoint" / "config.json").read_text())["step"]
    assert 0 < killed_at < 400
    again = subprocess.run(cmd + ["--out", str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    a = load_crosscoder(tmp_path / "ref" / "crosscoder")
    b = load_crosscoder(out / "crosscoder")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert json.loads((out / "crosscoder" / "metrics.json").read_text())["resumed_from_step"] >= killed_at
