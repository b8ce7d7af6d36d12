"""Model pair loading, truncated extraction, data mixing with the real chat template, the sharded
cache (resume, corruption) and the streaming buffer, on tiny random Gemma2 models and local files
in the schemas of pile-uncopyrighted and lmsys-chat-1m."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

from crosscoder import checkpoint as ckpt
from crosscoder import cli
from crosscoder.data.pair import ModelPairConfig, load_pair, residual_after, residuals_at
from crosscoder.data import cache as cache_mod
from crosscoder.data.buffer import StreamingBuffer
from crosscoder.data.cache import ActivationCache, CacheConfig, build_activation_cache
from crosscoder.config import ConfigError
from crosscoder.organism.tokenizer import train_tokenizer
from crosscoder.data.text import DataConfig, render_chat, take_sequences

WORDS = ("the cat sat on a mat while the dog ran far away from home and the bird sang a song of "
         "light over hills rivers and seas where people live work and rest").split()


def _sentences(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(6, 20, (1,), generator=g)),),
                                                     generator=g).tolist()) for _ in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    tok = train_tokenizer(_sentences(300, 0), vocab_size=300)
    dirs = {}
    for name, seed, hidden in (("base", 0, 32), ("chat", 1, 32), ("wide", 2, 48)):
        torch.manual_seed(seed)
        cfg = Gemma2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=1)
        lm = Gemma2ForCausalLM(cfg)
        dirs[name] = root / name
        lm.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    # the same architecture with a different vocabulary
    tok2 = train_tokenizer(_sentences(300, 5)[:50], vocab_size=280)
    dirs["othervocab"] = root / "othervocab"
    Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok2), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(dirs["othervocab"])
    tok2.save_pretrained(dirs["othervocab"])
    data = root / "data"
    data.mkdir()
    with open(data / "pile.jsonl", "w") as fh:
        for s in _sentences(400, 1):
            fh.write(json.dumps({"text": s, "meta": {"pile_set_name": "Synthetic"}}) + "\n")
    with open(data / "lmsys.jsonl", "w") as fh:
        for i, (q, a) in enumerate(zip(_sentences(300, 2), _sentences(300, 3))):
            fh.write(json.dumps({"conversation_id": str(i), "model": "x", "language": "English",
                                 "conversation": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]}) + "\n")
    return dirs, data


def _pair_cfg(dirs, **kw):
    return ModelPairConfig(base=str(dirs["base"]), chat=str(dirs["chat"]), layer=kw.pop("layer", 1),
                           dtype="float32", device="cpu", **kw)


def _data_cfg(data, **kw):
    return DataConfig(text_source=str(data / "pile.jsonl"), chat_source=str(data / "lmsys.jsonl"),
                      context_length=kw.pop("context_length", 24), heldout_permille=kw.pop("heldout_permille", 100),
                      shuffle_buffer=50, **kw)


def test_truncated_extraction_equals_full_forward_hidden_state(world):
    dirs, _ = world
    lm = AutoModelForCausalLM.from_pretrained(dirs["base"], attn_implementation="eager").eval()
    ids = torch.randint(3, 200, (3, 11))
    full = lm(input_ids=ids, output_hidden_states=True).hidden_states
    for L in range(3):
        torch.testing.assert_close(residual_after(lm, ids, L), full[L + 1])
    torch.testing.assert_close(residuals_at(lm, ids, [0, 2]), torch.stack([full[1], full[3]], 2))
    # HF's last hidden state has the final norm applied; the residual after the last block does not
    last = residual_after(lm, ids, 3)
    assert not torch.allclose(last, full[4])
    torch.testing.assert_close(lm.model.norm(last), full[4])


def test_truncated_forward_runs_no_later_block(world):
    dirs, _ = world
    lm = AutoModelForCausalLM.from_pretrained(dirs["base"], attn_implementation="eager").eval()
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(lm.model.layers)]
    hooks.append(lm.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    residual_after(lm, torch.randint(3, 200, (1, 5)), 1)
    for h in hooks:
        h.remove()
    assert calls == [0, 1]


def test_chat_rendering_uses_gemma_template(world):
    dirs, data = world
    pair = load_pair(_pair_cfg(dirs))
    ids = render_chat(pair.tokenizer, [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"}])
    text = pair.tokenizer.decode(ids)
    assert text.startswith("<bos><start_of_turn>user\n") and "<start_of_turn>model\n" in text
    assert "User:" not in text and text.count("<end_of_turn>") == 2
    assert ids.count(pair.tokenizer.bos_token_id) == 1
    with pytest.raises(ConfigError, match="unknown chat role"):
        render_chat(pair.tokenizer, [{"role": "narrator", "content": "x"}])


def test_local_loaders_mix_and_split(world):
    dirs, data = world
    pair = load_pair(_pair_cfg(dirs))
    cfg = _data_cfg(data, chat_fraction=0.5)
    train = take_sequences(cfg, pair.tokenizer, 120)
    held = take_sequences(cfg, pair.tokenizer, 20, heldout=True)
    frac = train.is_chat_N.float().mean().item()
    assert 0.3 < frac < 0.7
    assert (train.input_ids_NT[:, 0] == pair.tokenizer.bos_token_id).all()
    assert train.input_ids_NT.shape[1] <= 24
    as_rows = lambda s: {tuple(r[m.bool()].tolist()) for r, m in zip(s.input_ids_NT, s.attention_mask_NT)}  # noqa: E731
    assert not as_rows(train) & as_rows(held)  # no held-out document in training
    text_only = take_sequences(_data_cfg(data, chat_fraction=0.0), pair.tokenizer, 30)
    assert not text_only.is_chat_N.any()


@pytest.mark.parametrize("case", ["d_model", "vocab", "layer", "template", "empty", "field"])
def test_bad_inputs_fail_before_compute(world, tmp_path, case):
    dirs, data = world
    if case == "d_model":
        with pytest.raises(ConfigError, match="different d_model"):
            load_pair(ModelPairConfig(base=str(dirs["base"]), chat=str(dirs["wide"]), layer=1))
    elif case == "vocab":
        with pytest.raises(ConfigError, match="different tokenizers"):
            load_pair(ModelPairConfig(base=str(dirs["base"]), chat=str(dirs["othervocab"]), layer=1))
    elif case == "layer":
        with pytest.raises(ConfigError, match="layer 4 is out of range"):
            load_pair(_pair_cfg(dirs, layer=4))
    elif case == "template":
        from transformers import AutoTokenizer

        t = AutoTokenizer.from_pretrained(dirs["chat"])
        t.chat_template = None
        nodir = tmp_path / "chat_notemplate"
        AutoModelForCausalLM.from_pretrained(dirs["chat"]).save_pretrained(nodir)
        t.save_pretrained(nodir)
        (nodir / "chat_template.jinja").unlink(missing_ok=True)
        with pytest.raises(ConfigError, match="no chat template"):
            load_pair(ModelPairConfig(base=str(dirs["base"]), chat=str(nodir), layer=1))
        load_pair(ModelPairConfig(base=str(dirs["base"]), chat=str(nodir), layer=1), need_chat_template=False)
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        pair = load_pair(_pair_cfg(dirs))
        cfg = DataConfig(text_source=str(tmp_path / "empty.jsonl"), chat_source=str(data / "lmsys.jsonl"),
                         chat_fraction=0.0, context_length=24)
        with pytest.raises(ConfigError, match="is empty"):
            take_sequences(cfg, pair.tokenizer, 4)
    elif case == "field":
        pair = load_pair(_pair_cfg(dirs))
        cfg = DataConfig(text_source=str(data / "pile.jsonl"), chat_source=str(data / "pile.jsonl"), chat_fraction=1.0,
                         context_length=24)
        with pytest.raises(ConfigError, match="no 'conversation' field"):
            take_sequences(cfg, pair.tokenizer, 4)


def _cache_cfgs(world, **kw):
    dirs, data = world
    cc = CacheConfig(n_train_sequences=48, n_heldout_sequences=16, n_norm_sequences=8, sequences_per_shard=16,
                     forward_batch=8, **kw)
    return _pair_cfg(dirs), _data_cfg(data), cc


def test_cache_build_resume_and_corruption(world, tmp_path, monkeypatch):
    p, d, c = _cache_cfgs(world)
    ref = build_activation_cache(p, d, c, tmp_path / "ref", progress=False)
    acts, tok, seq, pos = ref.load("train", with_index=True)
    assert acts.shape[1:] == (2, 32) and acts.dtype == torch.float16
    assert (pos > 0).all()  # BOS excluded
    assert ref.manifest["splits"]["train"]["n_tokens"] == acts.shape[0]
    # crash after 2 shards, rerun: finished shards kept, result identical
    with monkeypatch.context() as mp, pytest.raises(RuntimeError, match="simulated crash"):
        mp.setattr(cache_mod, "_shard_written", _crash_after(2))
        build_activation_cache(p, d, c, tmp_path / "run", progress=False)
    folder = next((tmp_path / "run").iterdir())
    first = (folder / "train-00000.safetensors").stat().st_mtime_ns
    again = build_activation_cache(p, d, c, tmp_path / "run", progress=False)
    assert (folder / "train-00000.safetensors").stat().st_mtime_ns == first  # not re-extracted
    for s in ("train", "heldout", "norm"):
        assert [x["sha256"] for x in again.manifest["splits"][s]["shards"]] == \
               [x["sha256"] for x in ref.manifest["splits"][s]["shards"]]
    # corrupt one shard: readers refuse it, a rebuild re-extracts it
    bad = folder / "train-00001.safetensors"
    raw = bytearray(bad.read_bytes())
    raw[-10] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CorruptArtifactError, match="train-00001"):
        ActivationCache(folder).load("train")
    fixed = build_activation_cache(p, d, c, tmp_path / "run", progress=False)
    torch.testing.assert_close(fixed.load("train"), acts)
    # truncated shard too
    bad.write_bytes(bad.read_bytes()[:100])
    fixed = build_activation_cache(p, d, c, tmp_path / "run", progress=False)
    torch.testing.assert_close(fixed.load("train"), acts)
    held = fixed.heldout_sequences()
    assert held.input_ids_NT.shape[0] == 16


def test_nan_activations_rejected(world, tmp_path, monkeypatch):

    p, d, c = _cache_cfgs(world)
    real = cache_mod.extract_pair
    monkeypatch.setattr(cache_mod, "extract_pair", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(ConfigError, match="NaN/Inf"):
        build_activation_cache(p, d, c, tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_streaming_buffer_serves_distinct_fresh_tokens(world):
    dirs, data = world
    pair = load_pair(_pair_cfg(dirs))
    sb = StreamingBuffer(pair, _data_cfg(data), batch_size=64, buffer_tokens=256, forward_batch=8, track_ids=True)
    it = sb.batches()
    n_batches = 20
    for _ in range(n_batches):
        b = next(it)
        assert b.shape == (64, 2, 32)
    ids = torch.cat(sb.served_ids)
    assert ids.shape[0] == 64 * n_batches
    assert len({tuple(r) for r in ids.tolist()}) == ids.shape[0]  # every token served once
    # resume: batches(start) replays the same stream
    sb2 = StreamingBuffer(pair, _data_cfg(data), batch_size=64, buffer_tokens=256, forward_batch=8)
    it2 = sb2.batches(start_step=5)
    sb3 = StreamingBuffer(pair, _data_cfg(data), batch_size=64, buffer_tokens=256, forward_batch=8)
    it3 = sb3.batches()
    for _ in range(5):
        next(it3)
    torch.testing.assert_close(next(it2), next(it3))



@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shard_rows_matches_host_reference(model_dtype):
    """shard_rows picks the rows first and casts after the copy to the host: the same rows, dtypes and
    values as gathering after a cast to float32 (its first version), whatever the models' dtype."""
    from crosscoder.data.cache import shard_rows
    from crosscoder.data.text import Sequences

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (3, 7), generator=g)
    am = torch.ones(3, 7, dtype=torch.long)
    am[1, 4:] = 0  # a padded sequence
    seqs = Sequences(ids, am, torch.tensor([False, True, False]))
    scale = 1e4 if model_dtype == torch.float16 else 3e4  # fp16 storage of the others overflows some
    acts = (torch.randn(3, 7, 2, 5, generator=g) * scale).to(model_dtype)
    b, p = seqs.body_mask().nonzero(as_tuple=True)
    overflowed = False
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        want = acts[b, p].float().to(dtype)
        if not want.isfinite().all():  # float16 storage of values beyond 65504: refused, not stored as inf
            overflowed = True
            with pytest.raises(ConfigError, match="overflows the float16 storage dtype"):
                shard_rows(seqs, acts, 11, dtype)
            fits = acts.float().clamp(-6e4, 6e4).to(model_dtype)
            want = fits[b, p].float().to(dtype)
            got = shard_rows(seqs, fits, 11, dtype)
        else:
            got = shard_rows(seqs, acts, 11, dtype)
        assert got["acts"].dtype == dtype and torch.equal(got["acts"], want)
        assert torch.equal(got["seq"], b + 11) and torch.equal(got["pos"], p.to(torch.int32))
        assert torch.equal(got["token"], ids[b, p].to(torch.int32)) and got["acts"].shape[0] == 3 * 6 - 3
    assert overflowed == (model_dtype != torch.float16)  # the refusal was exercised
    bad = acts.clone()
    bad[2, 3, 1, 0] = float("inf")
    with pytest.raises(ConfigError, match="NaN/Inf"):
        shard_rows(seqs, bad, 0, torch.float32)
    bad[2, 3, 1, 0] = 0.0
    bad[0, 0, 0, 0] = float("nan")  # a BOS position: not a row, not checked (as before)
    assert shard_rows(seqs, bad, 0, torch.float32)["acts"].isfinite().all()


def _reference_batches(sb, rows, start_step=0):
    """StreamingBuffer.batches as first written (one torch.cat per fresh forward batch), on the
    chunks ``rows``: the reference the single-concatenation refill must match bit for bit.
    Yields (batch, ids); ends with the same ConfigError when the stream runs dry."""
    rng = torch.Generator().manual_seed(sb.seed + 7919 * sb.rank)
    rows, buf_a, buf_i, exhausted, step = iter(rows), None, None, False, 0
    while True:
        while not exhausted and (buf_a is None or buf_a.shape[0] < sb.buffer_tokens):
            try:
                a, ids = next(rows)
            except StopIteration:
                exhausted = True
                break
            buf_a = a if buf_a is None else torch.cat([buf_a, a])
            buf_i = ids if buf_i is None else torch.cat([buf_i, ids])
        if buf_a is None or buf_a.shape[0] < sb.batch_size:
            raise ConfigError("exhausted")
        perm = torch.randperm(buf_a.shape[0], generator=rng)
        buf_a, buf_i = buf_a[perm], buf_i[perm]
        floor = 0 if exhausted else sb.buffer_tokens // 2
        while buf_a.shape[0] >= sb.batch_size and buf_a.shape[0] - sb.batch_size >= floor:
            if step >= start_step:
                yield buf_a[: sb.batch_size], buf_i[: sb.batch_size]
            buf_a, buf_i = buf_a[sb.batch_size:], buf_i[sb.batch_size:]
            step += 1


def _drain(it):
    """Every batch of ``it`` until the stream's ConfigError (which every case here reaches)."""
    out = []
    with pytest.raises(ConfigError, match="exhausted"):
        for b in it:
            out.append(b)
    return out


@pytest.fixture(scope="module")
def recorded_rows(world):
    """StreamingBuffer._rows' forward batches over two epochs, per (rank, world), recorded once."""
    dirs, data = world
    pair, cache = load_pair(_pair_cfg(dirs)), {}

    def rows(rank, n_ranks):
        if (rank, n_ranks) not in cache:
            sb = StreamingBuffer(pair, _data_cfg(data), 64, forward_batch=8, epochs=2, rank=rank, world=n_ranks)
            cache[rank, n_ranks] = list(sb._rows())
        return pair, cache[rank, n_ranks]

    return rows


@pytest.mark.parametrize("batch_size,buffer_tokens,start_step,seed,rank", [
    (64, 256, 0, 0, 0),  # buffer a multiple of the batch
    (48, 200, 0, 3, 0),  # neither divides: refills overshoot by part of a forward batch
    (64, 256, 5, 0, 0),  # resume: batches(start_step) skips exactly the first steps
    (16, 1000, 7, 1, 0),  # buffer larger than several forward batches: many chunks per refill
    (32, 64, 0, 0, 1),  # rank 1 of 2: its own generator seed, half the global batch
])
def test_streaming_buffer_single_concat_matches_reference(world, recorded_rows, batch_size, buffer_tokens,
                                                          start_step, seed, rank):
    _, data = world
    n_ranks = 2 if rank else 1
    pair, chunks = recorded_rows(rank, n_ranks)
    assert len({c[0].shape[0] for c in chunks}) > 1  # forward batches of differing sizes
    kw = dict(buffer_tokens=buffer_tokens, forward_batch=8, seed=seed, epochs=2, rank=rank, world=n_ranks)
    sb = StreamingBuffer(pair, _data_cfg(data), batch_size * n_ranks, track_ids=True, **kw)
    sb._rows = lambda: iter(chunks)
    want = _drain(_reference_batches(sb, chunks, start_step))
    got = _drain(sb.batches(start_step))  # to the end of the second epoch, where both raise
    assert len(got) == len(want) > 10
    for g, (w, _) in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert all(torch.equal(g, w) for g, (_, w) in zip(sb.served_ids, want))
    if start_step:  # the live stream (the models run again) resumes on the same batches
        live = StreamingBuffer(pair, _data_cfg(data), batch_size * n_ranks, **kw).batches(start_step)
        for _, (w, _) in zip(range(3), want):
            assert torch.equal(next(live), w)


def test_streaming_buffer_ranks_take_disjoint_slices(world):
    dirs, data = world
    pair = load_pair(_pair_cfg(dirs))
    served = []
    for rank in (0, 1):
        sb = StreamingBuffer(pair, _data_cfg(data), batch_size=64, buffer_tokens=128, forward_batch=8,
                             track_ids=True, rank=rank, world=2)
        it = sb.batches()
        for _ in range(10):
            assert next(it).shape == (32, 2, 32)  # each rank serves its half of the global batch
        ids = torch.cat(sb.served_ids)
        assert ((ids[:, 0] // 8) % 2 == rank).all()  # only its own forward batches of the stream
        served.append({tuple(r) for r in ids.tolist()})
    assert not served[0] & served[1]
    with pytest.raises(ConfigError, match="split evenly"):
        StreamingBuffer(pair, _data_cfg(data), batch_size=63, rank=0, world=2)

# ---------------------------------------------------------------------------- sharded extraction
_CRASHING_RANK = """
import json, sys
import torch.distributed as dist
from crosscoder.data.pair import ModelPairConfig
from crosscoder.data import cache
from crosscoder.data.cache import CacheConfig, build_activation_cache
from crosscoder.data.text import DataConfig

dist.init_process_group("gloo")
blob = json.load(open(sys.argv[1]))
if dist.get_rank() == 1:  # rank 1 dies after writing its first shard; torchrun then stops rank 0 too
    def crash(n):
        raise RuntimeError("simulated crash during extraction")
    cache._shard_written = crash
build_activation_cache(ModelPairConfig.from_dict(blob["pair"]), DataConfig.from_dict(blob["data"]),
                       CacheConfig.from_dict(blob["cache"]), sys.argv[2], progress=False)
"""


def _crash_after(n_shards: int):
    def hook(n_written: int) -> None:
        if n_written >= n_shards:
            raise RuntimeError("simulated crash during extraction")
    return hook


def _cli(*args: str, nproc: int = 0) -> list[str]:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    return [sys.executable, *launch, *args]


def _cache_files(root) -> dict[str, str]:
    """sha256 of every file (shards, manifest, held-out sequences) of the one cache folder under root."""
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return {p.name: ckpt.sha256_file(p) for p in sorted(folder.iterdir())}


def test_two_rank_extraction_equals_one_rank_and_resumes_across_world_sizes(world, tmp_path):
    dirs, data = world
    p, d = _pair_cfg(dirs), _data_cfg(data)
    # 6 train, 2 held-out and 1 norm shard: both ranks get shards of every split but norm
    c = CacheConfig(n_train_sequences=48, n_heldout_sequences=16, n_norm_sequences=8, sequences_per_shard=8,
                    forward_batch=8)
    cfg = tmp_path / "extract.json"
    cfg.write_text(json.dumps({"pair": p.to_dict(), "data": d.to_dict(), "cache": c.to_dict()}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run(cmd):
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    def in_process(*args):
        """The one-rank runs: crosscoder.cli in this process, on one thread like the ranks. One rank
        creates no process group, so this is the code path of a plain `python -m crosscoder.cli`."""
        assert "WORLD_SIZE" not in os.environ
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert cli.main(list(args)) == 0
        finally:
            torch.set_num_threads(threads)

    extract = ("-m", "crosscoder.cli", "extract", "--configs", str(cfg), "--quiet", "--root")
    in_process(*extract[2:], str(tmp_path / "w1"))
    two = run(_cli(*extract, str(tmp_path / "w2"), nproc=2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout.strip().splitlines()[-1])["world_size"] == 2
    ref = _cache_files(tmp_path / "w1")
    assert {n for n in ref if n.startswith("train-")} == {f"train-{i:05d}.safetensors" for i in range(6)}
    assert _cache_files(tmp_path / "w2") == ref  # every shard and the manifest, byte for byte

    # a 2-rank run dies (rank 1 after its first shard), a 1-rank run finishes it
    script = tmp_path / "crash.py"
    script.write_text(_CRASHING_RANK)
    crashed = run(_cli(str(script), str(cfg), str(tmp_path / "w3"), nproc=2))
    assert crashed.returncode != 0
    (folder,) = [q for q in (tmp_path / "w3").iterdir() if q.is_dir()]
    assert (folder / ".progress-rank1.json").exists()
    kept = folder / "train-00001.safetensors"  # rank 1's first shard, recorded only in its progress file
    before = kept.stat().st_mtime_ns
    in_process(*extract[2:], str(tmp_path / "w3"))
    assert kept.stat().st_mtime_ns == before  # not re-extracted
    assert _cache_files(tmp_path / "w3") == ref  # no progress file left, nothing lost or duplicated


def _tiny_gemma3_pair(tok, layer=2):
    """A (base, chat) pair of tiny random Gemma 3 models (sliding and full attention layers) on ``tok``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from crosscoder.data.pair import ModelPair

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                               eos_token_id=1, attn_implementation="eager")
        models.append(Gemma3ForCausalLM(cfg).eval().requires_grad_(False))
    return ModelPair(models[0], models[1], tok, layer, 32)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_length_sorted_forward_batches_store_the_stream_order_rows(world, arch, monkeypatch):
    """extract_rows batching by length (each batch padded to its own longest row) stores the rows of
    batching in stream order and of a naive unpadded forward of each sequence alone, in stream order,
    while the forwards see fewer positions."""
    from crosscoder.data import pair as pair_mod
    from crosscoder.data.cache import extract_rows
    from crosscoder.data.text import iter_sequences

    dirs, data = world
    pair = load_pair(_pair_cfg(dirs, layer=2))
    if arch == "gemma3":
        pair = _tiny_gemma3_pair(pair.tokenizer)
    items = [x for _, x in zip(range(30), iter_sequences(_data_cfg(data), pair.tokenizer))]
    lengths = [len(ids) for ids, _ in items]
    assert len(set(lengths)) > 5 and max(lengths) == 24  # full text rows and shorter conversations

    positions = []
    real_extract = cache_mod.extract_pair
    monkeypatch.setattr(cache_mod, "extract_pair", lambda p, ids, *a: positions.append(ids.numel()) or real_extract(p, ids, *a))
    got = extract_rows(pair, items, 100, torch.float32, forward_batch=4)
    sorted_positions, positions[:] = sum(positions), []
    old = extract_rows(pair, items, 100, torch.float32, forward_batch=4, by_length=False)
    assert sorted_positions < sum(positions)

    naive: dict[str, list] = {"acts": [], "token": [], "seq": [], "pos": []}
    for i, (ids, _) in enumerate(items):
        x = torch.tensor([ids])
        h = torch.stack([pair_mod.residual_after(lm, x, pair.layer) for lm in pair.models], 2)[0, 1:]
        naive["acts"].append(h)
        naive["token"].append(torch.tensor(ids[1:], dtype=torch.int32))
        naive["seq"].append(torch.full((len(ids) - 1,), 100 + i, dtype=torch.int64))
        naive["pos"].append(torch.arange(1, len(ids), dtype=torch.int32))
    naive = {k: torch.cat(v) for k, v in naive.items()}
    for ref in (old, naive):
        for k in ("token", "seq", "pos"):
            assert torch.equal(got[k], ref[k]), k
        torch.testing.assert_close(got["acts"], ref["acts"], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_cache_option(world, tmp_path):
    """bf16_autocast: validated, left out of the key when off (older caches keep theirs), a separate
    cache when on, whose activations are the float32 ones to bf16 precision but not the same."""
    import dataclasses

    from crosscoder.config import config_hash
    from crosscoder.data.cache import cache_key

    with pytest.raises(ConfigError, match="bf16_autocast must be true or false"):
        CacheConfig(n_train_sequences=8, bf16_autocast="auto")
    p, d, off = _cache_cfgs(world, dtype="float32")
    assert "bf16_autocast" not in off.to_dict() and CacheConfig.from_dict(off.to_dict()) == off
    before = {k: v for k, v in dataclasses.asdict(off).items() if k != "bf16_autocast"}  # the dict before the field
    assert cache_key(p, d, off) == config_hash({"pair": p.to_dict(), "data": d.to_dict(), "cache": before}, 16)
    on = CacheConfig.from_dict({**off.to_dict(), "bf16_autocast": True})
    assert on.bf16_autocast and cache_key(p, d, on) != cache_key(p, d, off)
    a32 = build_activation_cache(p, d, off, tmp_path, progress=False).load("heldout")
    c16 = build_activation_cache(p, d, on, tmp_path, progress=False)
    assert c16.manifest["configs"]["cache"]["bf16_autocast"] is True
    a16 = c16.load("heldout")
    assert a16.shape == a32.shape and not torch.equal(a16, a32)
    rel = (a16 - a32).norm(dim=-1) / a32.norm(dim=-1)
    assert float(rel.median()) < 0.03


def _load_all(cache):
    return {s: cache.load(s, with_index=True) for s in ("train", "heldout", "norm")}


def test_base_rows_copied_from_a_cache_of_the_same_base(world, tmp_path, monkeypatch):
    """A pair that shares its base model and data with a finished cache (a fine-tune beside its null
    fine-tune) copies that cache's base rows and runs only its chat model, bar one checking batch; the
    cache it writes is identical to one extracted in full. A donor of another base model, or other
    tokens, or a base that does not reproduce its rows, is not used, with the same result."""
    import shutil
    import warnings

    dirs, data = world
    _, d, c = _cache_cfgs(world)
    base2 = tmp_path / "base2"  # the same weights in another folder (an organism's own copy of its base)
    shutil.copytree(dirs["base"], base2)
    chat2 = AutoModelForCausalLM.from_pretrained(dirs["chat"])
    with torch.no_grad():
        for w in chat2.parameters():
            w.add_(0.01 * torch.randn_like(w))
    chat2.save_pretrained(tmp_path / "chat2")
    for f in dirs["chat"].iterdir():  # the tokenizer's files (chat template included)
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp_path / "chat2")
    p2 = ModelPairConfig(base=str(base2), chat=str(tmp_path / "chat2"), layer=1, dtype="float32", device="cpu")
    donor = build_activation_cache(_pair_cfg(dirs), d, c, tmp_path / "donor", progress=False)
    plain = _load_all(build_activation_cache(p2, d, c, tmp_path / "plain", progress=False))

    runs = []
    real = cache_mod.extract_pair
    monkeypatch.setattr(cache_mod, "extract_pair", lambda pair, ids, am, layers, sources:
                        runs.append((sources, ids.shape[0])) or real(pair, ids, am, layers, sources))
    shared = build_activation_cache(p2, d, c, tmp_path / "shared", progress=False, base_from=donor.folder)
    for split, want in plain.items():
        for got, ref in zip(shared.load(split, with_index=True), want):
            assert torch.equal(got, ref), split
    assert {sh.get("base_rows_from") for s in ("train", "heldout", "norm")
            for sh in shared.manifest["splits"][s]["shards"]} == {donor.manifest["key"]}
    base_rows = sum(n for s, n in runs if "base" in s)
    assert base_rows == c.forward_batch and sum(n for s, n in runs if s == ("chat",)) == 48 + 16 + 8

    def unused(donor_folder, *, fingerprint=None, expect_warning=None):
        if fingerprint is not None:
            monkeypatch.setattr(cache_mod, "model_fingerprint", fingerprint)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = build_activation_cache(p2, d, c, tmp_path / f"try{len(list(tmp_path.iterdir()))}", progress=False,
                                         base_from=donor_folder)
        assert not any("base_rows_from" in sh for s in ("train", "heldout", "norm")
                       for sh in out.manifest["splits"][s]["shards"])
        for split, want in plain.items():
            for got, ref in zip(out.load(split, with_index=True), want):
                assert torch.equal(got, ref), split
        if expect_warning:
            assert any(expect_warning in str(w.message) for w in caught)

    # another base model: its fingerprint differs, so the donor is not even opened for rows
    other_base = build_activation_cache(ModelPairConfig(base=str(dirs["chat"]), chat=str(dirs["base"]), layer=1, dtype="float32",
                                                        device="cpu"), d, c,
                                        tmp_path / "swapped", progress=False)
    unused(other_base.folder)
    # other tokens (another held-out share, so another training stream): caught shard by shard
    other_data = build_activation_cache(_pair_cfg(dirs), _data_cfg(data, heldout_permille=300), c,
                                        tmp_path / "otherdata", progress=False)
    unused(other_data.folder, expect_warning="does not hold this cache's base rows")
    # a base model that passes the fingerprint but does not reproduce the rows: the checking batch
    unused(other_base.folder, fingerprint=lambda name: "same", expect_warning="does not hold this cache's base rows")
    unused(tmp_path / "nowhere")  # no cache there
