"""Activation store: a sharded, resumable, checksummed on-disk cache of both models' activations.

Cache layout (``root/<hash of the configs>/``)::

    manifest.json                    configs, models, layer(s), dtype, token counts, per-shard sha256
    train-00000.safetensors ...      acts [n, S, D] (fp16/bf16), token [n], seq [n], pos [n]
    heldout-00000.safetensors ...    the same for held-out documents (never trained on)
    norm-00000.safetensors ...       held-out documents reserved for the normalisation factors
    heldout_sequences.safetensors    the held-out token sequences (for CE recovered and contexts)

Extraction is resumable: the manifest is rewritten atomically after every shard; a rerun verifies
the finished shards' checksums, keeps the good ones, and re-extracts missing, truncated or corrupted
ones (the data stream is deterministic, so shard i always holds the same sequences). Readers verify
checksums too and refuse a bad shard with one clear message.

Under ``torch.distributed`` (``torchrun ... -m crosscoder.cli extract``) shard i of every split is
extracted by rank ``i % world_size``: each rank runs the models on its own slice of the data and writes
its own shards, recording them in ``.progress-rank<r>.json`` after each one; at the end of every split
the ranks exchange their shard lists and rank 0 alone writes the merged ``manifest.json``. Every rank
reads the (cheap, deterministic) token stream to find its slice, so the cache is byte-identical
whatever the world size, and a run interrupted under one world size resumes under any other.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor
from crosscoder.progress import progress_bar

from crosscoder import checkpoint as ckpt
from crosscoder.atomic import replace_atomically, write_json_atomic
from crosscoder.config import ConfigError, _DictMixin, config_hash
from crosscoder.data.pair import ModelPair, ModelPairConfig, extract_pair, load_pair
from crosscoder.data.text import DataConfig, Sequences, batch_sequences, iter_sequences, pad_id
from crosscoder.distributed import rank_and_world

SPLITS = ("train", "heldout", "norm")
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CacheConfig(_DictMixin):
    """How many sequences to extract and how to store them."""

    n_train_sequences: int
    """Training sequences (tokens = their non-BOS, non-pad positions)."""
    n_heldout_sequences: int = 256
    """Held-out sequences for evaluation."""
    n_norm_sequences: int = 64
    """Further held-out sequences for the normalisation factors."""
    sequences_per_shard: int = 256
    """Sequences per shard file (the unit of resume)."""
    forward_batch: int = 16
    """Sequences per model forward."""
    dtype: str = "float16"
    """Storage dtype: "float16", "bfloat16" or "float32"."""
    layers: list[int] = field(default_factory=list)
    """Cross-layer mode: read these layers of the BASE model instead of (base, chat) at one layer."""
    bf16_autocast: bool = False
    """Run the forwards under ``torch.autocast(bfloat16)`` (matmuls in bf16, the residual adds stay in
    the models' float32). About 2x faster on a CPU with bf16 arithmetic (``training.cpu_has_bf16``;
    without it bf16 is emulated and several times slower), but not the same activations: on the
    gemma3 organism (gemma-3-270m pair, blocks 9 and 12) the chat-minus-base difference that model
    diffing reads came out with a median per-token relative error of 5% and cosine 0.9987-0.9989 against
    float32 (float16 storage alone: 0.24%), so it is off by default and never chosen automatically. Part
    of the cache key when on, so float32 and bf16 caches never mix. No effect on models already
    loaded in bf16 (``ModelPairConfig.dtype``)."""

    def __post_init__(self) -> None:
        for name in ("n_train_sequences", "n_heldout_sequences", "n_norm_sequences", "sequences_per_shard", "forward_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.dtype not in CACHE_DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(CACHE_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.bf16_autocast, bool):
            raise ConfigError(f"bf16_autocast must be true or false, got {self.bf16_autocast!r}")
        self.layers = list(self.layers)

    def to_dict(self) -> dict:
        d = super().to_dict()
        # Left out when off so that every cache written before the field existed keeps its key.
        if not d["bf16_autocast"]:
            del d["bf16_autocast"]
        return d

    def n_sequences(self, split: str) -> int:
        return {"train": self.n_train_sequences, "heldout": self.n_heldout_sequences,
                "norm": self.n_norm_sequences}[split]


def cache_key(pair_cfg: ModelPairConfig, data_cfg: DataConfig, cache_cfg: CacheConfig) -> str:
    """The cache folder's name: a hash of every config that determines its contents."""
    return config_hash({"pair": pair_cfg.to_dict(), "data": data_cfg.to_dict(), "cache": cache_cfg.to_dict()}, 16)


def cache_folder(pair_cfg: ModelPairConfig, data_cfg: DataConfig, cache_cfg: CacheConfig, root: str | Path) -> Path:
    """Where the cache of these configs lives under ``root`` (``cache_key``), whether built or not."""
    return Path(root) / cache_key(pair_cfg, data_cfg, cache_cfg)


class ActivationCache:
    """Read side of a finished cache folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: {self.folder} is not an activation cache")
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        for split in SPLITS:
            if not self.manifest["splits"].get(split, {}).get("complete"):
                raise ConfigError(
                    f"the cache {self.folder} is incomplete ({split} split unfinished); rerun "
                    f"build_activation_cache with the same configs to finish it"
                )

    @property
    def n_sources(self) -> int:
        return int(self.manifest["n_sources"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def _shards(self, split: str) -> list[dict[str, Any]]:
        return self.manifest["splits"][split]["shards"]

    def load(self, split: str, *, with_index: bool = False):
        """All activations of a split [N, S, D] in the storage dtype (checksums verified);
        ``with_index`` also returns (token, seq, pos) of every row."""
        parts: dict[str, list[Tensor]] = {"acts": [], "token": [], "seq": [], "pos": []}
        for sh in self._shards(split):
            t = ckpt.load_tensors_checked(self.folder, sh["file"], sh["sha256"])
            for k in parts:
                parts[k].append(t[k])
        out = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
        if with_index:
            return out["acts"], out["token"], out["seq"], out["pos"]
        return out["acts"]

    def heldout_sequences(self) -> Sequences:
        t = ckpt.load_tensors_checked(self.folder, "heldout_sequences.safetensors",
                                      self.manifest["files"]["heldout_sequences.safetensors"])
        return Sequences(t["input_ids"], t["attention_mask"], t["is_chat"].bool())


def _verify(folder: Path, sh: dict[str, Any]) -> bool:
    p = folder / sh["file"]
    return p.exists() and ckpt.sha256_file(p) == sh["sha256"]


def shard_rows(seqs: Sequences, acts_BTSD: Tensor, seq_offset: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """The rows of a forward batch's body positions (real tokens but BOS) as CPU tensors: acts
    [n, S, D] in ``dtype``, token, seq (+ ``seq_offset``) and pos. ``acts_BTSD`` may stay on the
    models' device: the rows are picked (an exact copy) and checked there and cross to the host in
    the models' dtype (the fewest bytes), then are cast on the host exactly as before. On one H200
    (bench/bench_gpu.py --crossover, 2026-11-30, 16 x 1,024 tokens, bf16 pair) that took the work
    after the 256 ms forward from 218 ms (all of [B, T, S, D] to the host, gathered there) to 130 ms;
    the rest is the pageable device-to-host copy and the host cast. Casting to float32 on the device
    first doubled the bytes copied and saved only 13 ms."""
    body = seqs.body_mask()
    b, p = body.nonzero(as_tuple=True)
    dev = acts_BTSD.device
    rows = acts_BTSD[b.to(dev), p.to(dev)]
    if not torch.isfinite(rows).all():  # the same verdict as on the float32 cast (widening keeps inf/nan)
        raise ConfigError(
            "the models produced NaN/Inf activations; use dtype float32 or bfloat16 (float16 "
            "overflows in Gemma's residual stream) and check the model weights"
        )
    acts = rows.cpu().float().to(dtype)
    # Narrowing can overflow where the models did not: gemma-3-270m's residual after block 12 reaches
    # 84,000 on some body tokens (block 9: 61,664 at most over the gemma3 organism's 193k cached tokens),
    # beyond float16's 65,504, and those rows would be stored as inf.
    if dtype == torch.float16 and not torch.isfinite(acts).all():
        raise ConfigError(
            f"an activation of magnitude {float(rows.abs().max()):.0f} overflows the float16 storage dtype "
            f"(largest finite 65504); use CacheConfig dtype bfloat16 or float32 for these models and layer"
        )
    return {"acts": acts, "token": seqs.input_ids_NT[b, p].to(torch.int32),
            "seq": (b + seq_offset).to(torch.int64), "pos": p.to(torch.int32)}


def _length_order(items: list[tuple[list[int], bool]]) -> list[int]:
    """Indices of ``items`` by sequence length (stable): the order ``extract_rows`` cuts into forward batches."""
    return sorted(range(len(items)), key=lambda i: len(items[i][0]))


def extract_rows(pair: ModelPair, items: list[tuple[list[int], bool]], seq_start: int, dtype: torch.dtype, *,
                 forward_batch: int = 16, layers: list[int] | None = None, by_length: bool = True,
                 bf16_autocast: bool = False, sources: tuple[str, ...] = ("base", "chat")) -> dict[str, Tensor]:
    """The cache rows (``shard_rows``) of the sequences ``items``, numbered from ``seq_start``, in
    stream order: sequence by sequence, each one's positions in order. ``sources``: the models run
    (``extract_pair``; one of them when the other's rows come from elsewhere).

    ``by_length``: the forward batches hold sequences of similar length (sorted by length, then cut
    into ``forward_batch``-row batches), each padded only to its own longest row, and the rows are put
    back in stream order after. Batches taken in stream order are padded to their longest row, and
    in the gemma3 organism's mix (43% text rows of the full 128 tokens, conversations of 25-55)
    every batch of 16 held a full row: 35% of the forward positions were padding, 4% when sorted
    within a shard of 256. A row's activations do not depend on the padding after it (causal
    attention, padded keys masked), so the cache holds the same values up to float rounding of the
    different batch shapes.
    """
    order = _length_order(items) if by_length else list(range(len(items)))
    dev = next(pair.base.parameters()).device
    parts: dict[str, list[Tensor]] = {"acts": [], "token": [], "seq": [], "pos": []}
    for j in range(0, len(order), forward_batch):
        idx = order[j : j + forward_batch]
        seqs = batch_sequences([items[i] for i in idx], pad_id(pair.tokenizer))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16_autocast):
            acts = extract_pair(pair, seqs.input_ids_NT, seqs.attention_mask_NT, layers, sources)
        r = shard_rows(seqs, acts, 0, dtype)  # rows to the host
        r["seq"] = torch.tensor(idx, dtype=torch.int64)[r["seq"]] + seq_start  # batch row -> stream number
        for k, v in r.items():
            parts[k].append(v)
    out = {k: torch.cat(v) for k, v in parts.items()}
    if by_length:  # back to stream order; a stable sort keeps each sequence's positions in order
        perm = torch.sort(out["seq"], stable=True).indices
        out = {k: v[perm] for k, v in out.items()}
    return out


def model_fingerprint(name: str) -> str:
    """What identifies a model's weights: the sha256 of its folder's weight and config files (or of a
    single checkpoint file); a hub name stands for itself."""
    path = Path(name)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.name == "config.json" or f.suffix in (".safetensors", ".bin"))
    else:
        return f"hub:{name}"
    return config_hash({f.name: ckpt.sha256_file(f) for f in files}, 64)


def base_donor(folder: str | Path | None, pair_cfg: ModelPairConfig, data_cfg: DataConfig,
               cache_cfg: CacheConfig) -> ActivationCache | None:
    """The finished cache at ``folder`` when its base-model rows can stand in for this cache's, else None.

    Two pairs with one base model (a chat fine-tune and its null fine-tune, or an organism variant)
    read the same base activations on the same data: the base half of a cache is the same bytes in
    both. Required here: a finished (base, chat) cache at the same layer, with the same model dtype,
    storage dtype and extraction settings, and base weights with the same ``model_fingerprint``. The
    extraction then also checks, shard by shard, that the donor holds the same tokens at the same
    positions, and once that the base model reproduces the donor's rows of a forward batch;
    otherwise it runs the base model as usual."""
    if folder is None or cache_cfg.layers:
        return None
    try:
        donor = ActivationCache(folder)
    except (FileNotFoundError, ConfigError):
        return None
    m = donor.manifest
    same = (m.get("layers") is None and m["layer"] == pair_cfg.layer and m["configs"]["cache"] == cache_cfg.to_dict()
            and m["configs"]["pair"]["dtype"] == pair_cfg.dtype
            and all(m["configs"]["data"].get(k) == v for k, v in data_cfg.to_dict().items()
                    if k in ("context_length", "chat_fraction", "seed")))
    if not same or model_fingerprint(m["models"]["base"]) != model_fingerprint(pair_cfg.base):
        return None
    return donor


def _rows_with_donor_base(pair: ModelPair, items: list, seq_start: int, dtype: torch.dtype, cache_cfg: CacheConfig,
                          donor_rows: dict[str, Tensor], check_base: bool) -> dict[str, Tensor] | None:
    """``extract_rows`` of both models with the base model's rows taken from ``donor_rows`` (a donor
    cache's shard of the same sequences) and only the chat model run; None when the donor's tokens
    differ or (``check_base``) the base model does not reproduce the donor's rows of the first forward
    batch (the same batch as in the donor's extraction, so equal up to rounding across machines)."""
    kw = dict(forward_batch=cache_cfg.forward_batch, bf16_autocast=cache_cfg.bf16_autocast)
    chat = extract_rows(pair, items, seq_start, dtype, sources=("chat",), **kw)
    if any(chat[k].shape != donor_rows[k].shape or not torch.equal(chat[k], donor_rows[k].to(chat[k].dtype))
           for k in ("token", "seq", "pos")):
        return None
    if check_base:
        first = sorted(_length_order(items)[: cache_cfg.forward_batch])  # extract_rows' first batch, stream order
        own = extract_rows(pair, [items[i] for i in first], 0, dtype, sources=("base",), **kw)
        want = torch.isin(donor_rows["seq"], torch.tensor(first, dtype=torch.int64) + seq_start)
        theirs = donor_rows["acts"][want, 0].float()
        tol = max(1e-4, 2 * torch.finfo(dtype).eps) * float(theirs.abs().max())
        if own["acts"].shape[0] != theirs.shape[0] or float((own["acts"][:, 0].float() - theirs).abs().max()) > tol:
            return None
    return {**chat, "acts": torch.stack([donor_rows["acts"][:, 0], chat["acts"][:, 0]], dim=1)}


def build_activation_cache(
    pair_cfg: ModelPairConfig,
    data_cfg: DataConfig,
    cache_cfg: CacheConfig,
    root: str | Path,
    *,
    pair: ModelPair | None = None,
    progress: bool = True,
    base_from: str | Path | None = None,
) -> ActivationCache:
    """Extract (or finish extracting, or just open) the cache for these configs under ``root``.

    ``base_from``: the folder of another pair's finished cache with the same base model and data
    (``base_donor``): its base rows are copied and only the chat model runs, half the extraction;
    ignored when it does not qualify. The cache holds the same activations either way.

    Inside a ``torch.distributed`` process group every rank must call it with the same arguments;
    each extracts the shards ``i % world_size == rank`` (see the module docstring).
    """
    rank, world = rank_and_world()
    folder = cache_folder(pair_cfg, data_cfg, cache_cfg, root)
    if rank == 0:
        ckpt.ensure_writable_dir(folder)
    _barrier(world)  # the other ranks write into the folder rank 0 checked
    manifest = _read_manifest(folder)
    if _is_complete(folder, manifest):
        return ActivationCache(folder)
    if pair is None:
        pair = load_pair(pair_cfg, need_chat_template=data_cfg.chat_fraction > 0)
    run = _Extraction(folder, manifest or _new_manifest(folder.name, pair_cfg, data_cfg, cache_cfg, pair.d_model),
                      pair, data_cfg, cache_cfg, rank, world, progress,
                      base_donor(base_from, pair_cfg, data_cfg, cache_cfg))
    for split in SPLITS:
        run.split(split)
    if rank == 0:
        for p in folder.glob(".progress-rank*.json"):  # everything is in the manifest now
            p.unlink()
    _barrier(world)  # the other ranks open the manifest rank 0 has just written
    return ActivationCache(folder)


def _read_manifest(folder: Path) -> dict[str, Any]:
    mpath = folder / "manifest.json"
    return json.loads(mpath.read_text()) if mpath.exists() else {}


def _is_complete(folder: Path, manifest: dict[str, Any]) -> bool:
    """Every split finished, every shard matching its checksum, the held-out sequences saved."""
    if not manifest or not all(manifest["splits"][s]["complete"] for s in SPLITS):
        return False
    shards_ok = all(_verify(folder, sh) for s in SPLITS for sh in manifest["splits"][s]["shards"])
    return shards_ok and "heldout_sequences.safetensors" in manifest.get("files", {})


def _new_manifest(key: str, pair_cfg: ModelPairConfig, data_cfg: DataConfig, cache_cfg: CacheConfig,
                  d_model: int) -> dict[str, Any]:
    layers = cache_cfg.layers or None
    return {
        "format": "crosscoder-activation-cache/1",
        "key": key,
        "configs": {"pair": pair_cfg.to_dict(), "data": data_cfg.to_dict(), "cache": cache_cfg.to_dict()},
        "models": {"base": pair_cfg.base, "chat": pair_cfg.chat},
        "layer": pair_cfg.layer,
        "layers": layers,
        "sources": [f"layer{l}" for l in layers] if layers else ["base", "chat"],
        "n_sources": len(layers) if layers else 2,
        "d_model": d_model,
        "dtype": cache_cfg.dtype,
        "bos_excluded": True,
        "splits": {s: {"shards": [], "complete": False, "n_tokens": 0, "n_sequences": 0} for s in SPLITS},
        "files": {},
    }


def _shard_written(n_written: int) -> None:
    """Called after each shard this process writes (the resume tests replace it to simulate a crash)."""


class _Extraction:
    """One (possibly resumed, possibly distributed) extraction into a cache folder: this rank's
    shards of each split, recorded in the manifest (one process) or a per-rank progress file."""

    def __init__(self, folder: Path, manifest: dict[str, Any], pair: ModelPair, data_cfg: DataConfig,
                 cache_cfg: CacheConfig, rank: int, world: int, progress: bool,
                 donor: ActivationCache | None = None):
        self.folder, self.manifest, self.pair, self.donor = folder, manifest, pair, donor
        self.base_checked = False
        self.data_cfg, self.cache_cfg, self.rank, self.world, self.progress = data_cfg, cache_cfg, rank, world, progress
        self.mpath = folder / "manifest.json"
        self.progress_path = folder / f".progress-rank{rank}.json"
        self.dtype = CACHE_DTYPES[cache_cfg.dtype]
        self.layers = cache_cfg.layers or None
        # Shards finished by any earlier run, under any world size: the manifest plus the per-rank
        # progress files of an interrupted distributed run (each entry is checked against its sha256).
        self.earlier = _progress_entries(folder)
        self.mine_all: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self.written = 0

    def _stream(self, split: str) -> Iterator[tuple[list[int], bool]]:
        stream = iter_sequences(self.data_cfg, self.pair.tokenizer, heldout=split != "train")
        if split == "norm":  # norm documents follow the held-out ones in the same held-out stream
            for _ in range(self.cache_cfg.n_heldout_sequences):
                next(stream, None)
        return stream

    def split(self, split: str) -> None:
        info = self.manifest["splits"][split]
        n_seq, sps = self.cache_cfg.n_sequences(split), self.cache_cfg.sequences_per_shard
        n_shards = -(-n_seq // sps)
        stream = self._stream(split)
        known = {sh["file"]: sh for sh in self.earlier.get(split, [])}
        known.update({sh["file"]: sh for sh in info["shards"]})
        mine, held_items = self.mine_all[split], []
        bar = progress_bar(total=len(range(self.rank, n_shards, self.world)), desc=f"extract {split}",
                           disable=not self.progress or self.rank != 0, unit="shard")
        for i in range(n_shards):
            items = [x for _, x in zip(range(min(sps, n_seq - i * sps)), stream)]
            if not items:
                raise ConfigError(f"the data ran out after {i * sps} {split} sequences; lower "
                                  f"n_{split}_sequences or add data")
            held_items += items if split == "heldout" else []
            if i % self.world != self.rank:  # another rank's slice
                continue
            name = f"{split}-{i:05d}.safetensors"
            if name in known and _verify(self.folder, known[name]):
                mine.append(known[name])
            else:
                mine.append(self._write_shard(name, items, i * sps, split))
                self._record(info, mine)
            bar.update(1)
        bar.close()
        self._finish_split(split, info, mine, n_seq, held_items)

    def _donor_shard(self, split: str, name: str) -> dict[str, Tensor] | None:
        if self.donor is None:
            return None
        sh = next((sh for sh in self.donor.manifest["splits"][split]["shards"] if sh["file"] == name), None)
        return None if sh is None else ckpt.load_tensors_checked(self.donor.folder, name, sh["sha256"])

    def _write_shard(self, name: str, items: list, seq_start: int, split: str) -> dict[str, Any]:
        tensors, base_from = None, None
        donor_rows = self._donor_shard(split, name)
        if donor_rows is not None:
            tensors = _rows_with_donor_base(self.pair, items, seq_start, self.dtype, self.cache_cfg, donor_rows,
                                            check_base=not self.base_checked)
            if tensors is None:
                warnings.warn(f"{self.donor.folder} does not hold this cache's base rows of {name} (other tokens, "
                              "or the base model does not reproduce them): no longer copying its base rows",
                              stacklevel=2)
                self.donor = None
            else:
                self.base_checked, base_from = True, self.donor.manifest["key"]
        if tensors is None:
            tensors = extract_rows(self.pair, items, seq_start, self.dtype, forward_batch=self.cache_cfg.forward_batch,
                                   layers=self.layers, bf16_autocast=self.cache_cfg.bf16_autocast)
        digest = _save_shard(tensors, self.folder, name)
        entry = {"file": name, "sha256": digest, "n_tokens": int(tensors["acts"].shape[0]),
                 "seq_start": seq_start, "seq_end": seq_start + len(items)}
        if base_from is not None:
            entry["base_rows_from"] = base_from  # provenance: the base half was copied from that cache
        return entry

    def _record(self, info: dict[str, Any], mine: list[dict[str, Any]]) -> None:
        if self.world == 1:
            redone = {sh["file"] for sh in mine}
            info["shards"] = mine + [sh for sh in info["shards"] if sh["file"] not in redone]
            write_json_atomic(self.mpath, self.manifest)
        else:  # only rank 0 writes the manifest; the others record their progress here
            write_json_atomic(self.progress_path, self.mine_all)
        self.written += 1
        _shard_written(self.written)

    def _finish_split(self, split: str, info: dict[str, Any], mine: list[dict[str, Any]], n_seq: int,
                      held_items: list) -> None:
        shards = _gather_shards(mine, self.world)
        info.update(shards=shards, n_tokens=sum(sh["n_tokens"] for sh in shards), n_sequences=n_seq, complete=True)
        if split == "heldout" and self.rank == 0:
            seqs = batch_sequences(held_items, pad_id(self.pair.tokenizer))
            self.manifest["files"]["heldout_sequences.safetensors"] = _save_shard(
                {"input_ids": seqs.input_ids_NT, "attention_mask": seqs.attention_mask_NT,
                 "is_chat": seqs.is_chat_N.to(torch.uint8)}, self.folder, "heldout_sequences.safetensors")
        if self.rank == 0:
            write_json_atomic(self.mpath, self.manifest)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _gather_shards(mine: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Every rank's shard entries of a split, merged in shard order."""
    if world == 1:
        return sorted(mine, key=lambda sh: sh["file"])
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return sorted((sh for part in parts for sh in part), key=lambda sh: sh["file"])


def _progress_entries(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Shard entries recorded by the ranks of an interrupted distributed extraction."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for p in sorted(folder.glob(".progress-rank*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:  # written atomically, so only a foreign file lands here
            continue
        for split in SPLITS:
            out[split] += rec.get(split, [])
    return out


def _save_shard(tensors: dict[str, Tensor], folder: Path, name: str) -> str:
    """Write one shard atomically; returns its sha256."""
    digest: list[str] = []
    replace_atomically(folder / name, lambda tmp: digest.append(ckpt.save_tensors_checked(tensors, tmp.parent, tmp.name)))
    return digest[0]
