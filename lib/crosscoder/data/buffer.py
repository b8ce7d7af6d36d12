"""A streaming activation buffer for runs too big to cache (the Gemma-scale path)."""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch import Tensor

from crosscoder.config import ConfigError
from crosscoder.data.cache import shard_rows
from crosscoder.data.pair import ModelPair, extract_pair
from crosscoder.data.text import DataConfig, batch_sequences, iter_sequences, pad_id
from crosscoder.distributed import rank_share


class StreamingBuffer:
    """Activations extracted on the fly from fresh sequences, for runs too big to cache.

    Holds up to ``buffer_tokens`` rows; when it falls to half, it refills from NEW sequences of the
    data stream (never recycling tokens; when the stream is exhausted it raises, or starts a new
    pass over the data if ``epochs`` allows), and serves shuffled batches. ``batches(start)``
    replays the stream deterministically, so a resumed run sees the same batches.

    Data parallel (``rank``/``world``, by default those of the torch.distributed group): rank r runs
    the models only on forward batches j with j % world == r, keeps its own buffer and serves its
    share, ``batch_size / world`` rows per step, so the ranks together see ``batch_size`` fresh
    tokens per step and never the same sequence.
    """

    def __init__(self, pair: ModelPair, data_cfg: DataConfig, batch_size: int, *, buffer_tokens: int = 65536,
                 forward_batch: int = 16, seed: int = 0, epochs: int = 1, track_ids: bool = False,
                 layers: list[int] | None = None, rank: int | None = None, world: int | None = None):
        self.rank, self.world, batch_size = rank_share(batch_size, rank, world)  # this rank's share
        if buffer_tokens < 2 * batch_size:
            raise ConfigError("buffer_tokens must hold at least two batches")
        self.pair, self.data_cfg, self.batch_size = pair, data_cfg, batch_size
        self.buffer_tokens, self.forward_batch, self.seed, self.epochs = buffer_tokens, forward_batch, seed, epochs
        self.layers = layers
        self.track_ids = track_ids
        self.served_ids: list[Tensor] = []

    def _rows(self) -> Iterator[tuple[Tensor, Tensor]]:
        seq_base = 0
        for epoch in range(self.epochs):
            stream = iter_sequences(self.data_cfg, self.pair.tokenizer)
            for j in itertools.count():
                items = [x for _, x in zip(range(self.forward_batch), stream)]
                if not items:
                    break
                if j % self.world != self.rank:  # another rank's forward batch
                    seq_base += len(items)
                    continue
                seqs = batch_sequences(items, pad_id(self.pair.tokenizer))
                acts = extract_pair(self.pair, seqs.input_ids_NT, seqs.attention_mask_NT, self.layers)
                r = shard_rows(seqs, acts, seq_base, torch.float32)  # rows picked on the device, then to host
                seq_base += len(items)
                yield r["acts"], torch.stack([r["seq"], r["pos"].long()], 1)
        return

    def batches(self, start_step: int = 0) -> Iterator[Tensor]:
        rng = torch.Generator().manual_seed(self.seed + 7919 * self.rank)
        rows = self._rows()
        buf_a: Tensor | None = None
        buf_i: Tensor | None = None
        exhausted = False
        step = 0
        while True:
            # refill with fresh rows up to capacity: collect the forward batches, then concatenate
            # once (one cat per fresh chunk would copy the whole buffer each time: quadratic in its size)
            parts_a = [] if buf_a is None else [buf_a]
            parts_i = [] if buf_i is None else [buf_i]
            n = 0 if buf_a is None else buf_a.shape[0]
            while not exhausted and (not parts_a or n < self.buffer_tokens):
                try:
                    a, ids = next(rows)
                except StopIteration:
                    exhausted = True
                    break
                parts_a.append(a)
                parts_i.append(ids)
                n += a.shape[0]
            if len(parts_a) > 1:
                buf_a, buf_i = torch.cat(parts_a), torch.cat(parts_i)
            elif parts_a:
                buf_a, buf_i = parts_a[0], parts_i[0]
            del parts_a, parts_i  # the buffer alone holds the rows (the chunks are freed)
            if buf_a is None or buf_a.shape[0] < self.batch_size:
                raise ConfigError(
                    f"the data stream is exhausted after {step} batches; add data or raise epochs"
                )
            perm = torch.randperm(buf_a.shape[0], generator=rng)
            buf_a, buf_i = buf_a[perm], buf_i[perm]
            # serve down to half full (everything, once the stream is exhausted), then refill
            floor = 0 if exhausted else self.buffer_tokens // 2
            while buf_a.shape[0] >= self.batch_size and buf_a.shape[0] - self.batch_size >= floor:
                a, ids = buf_a[: self.batch_size], buf_i[: self.batch_size]
                buf_a, buf_i = buf_a[self.batch_size :], buf_i[self.batch_size :]
                if step >= start_step:
                    if self.track_ids:
                        self.served_ids.append(ids)
                    yield a
                step += 1
