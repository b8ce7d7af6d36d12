"""Both models' activations on a fixed set of token sequences (an organism's evaluation set, its
validation set), from one pass of the language models, kept on disk so that every page of a book
reads them instead of running the models again.

On the gemma3 organism one pass over the 308-row evaluation set through blocks 0-12 of both float32
models took ~1-2 min on 2 cores, and six pages (model diff, controls, scoreboard, families, the two
browsers) each ran it. The file sits in the pair's activation-cache folder (``ModelPair.acts_dir``,
set by ``experiment.model_pair``), whose name is already the hash of the pair, layer and data
configs, under a name hashed from the token ids and attention mask themselves: another set, or the
same set tokenised differently, is another file. Written to a temporary sibling and renamed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from crosscoder.data.pair import ModelPair, extract_pair

VERSION = 1
"""Bumped when what is stored changes, so that older files are not read as the new kind."""


def length_batches(attention_mask_NT: Tensor, batch: int) -> list[tuple[Tensor, int]]:
    """(rows, length) batches of right-padded sequences for a forward: the rows sorted by length
    (longest first, ties in row order) and cut into ``batch``-sized groups, each run only up to its
    longest sequence. A causal model's outputs at real tokens do not depend on later (padding)
    columns, so this gives the same activations as full-width batches while running only the real
    tokens: the gemma3 organism's evaluation set is 43% real tokens, its held-out set 62%."""
    lengths = attention_mask_NT.long().sum(1)
    order = torch.sort(lengths, descending=True, stable=True).indices
    return [(rows, max(1, int(lengths[rows[0]]))) for rows in order.split(batch)]


def check_right_padded(attention_mask_NT: Tensor) -> None:
    lengths = attention_mask_NT.long().sum(1)
    if not bool((attention_mask_NT.bool() == (torch.arange(attention_mask_NT.shape[1]) < lengths[:, None])).all()):
        raise ValueError("sequences must be right-padded (attention mask 1...1 0...0)")


def sequences_key(input_ids_NT: Tensor, attention_mask_NT: Tensor, layer: int) -> str:
    """16 hex digits naming a set of sequences read at ``layer``: the hash of its ids and mask."""
    h = hashlib.sha256(f"v{VERSION} layer {layer} shape {tuple(input_ids_NT.shape)}".encode())
    h.update(input_ids_NT.to(torch.int64).contiguous().numpy().tobytes())
    h.update(attention_mask_NT.to(torch.int8).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute(pair: ModelPair, input_ids_NT: Tensor, attention_mask_NT: Tensor, *, batch: int = 16) -> Tensor:
    """Activations [N, T, 2 (base, chat), D] float32 at ``pair.layer``, 0 at padding; the forwards in
    ``length_batches`` (the real tokens only)."""
    check_right_padded(attention_mask_NT)
    N, T = input_ids_NT.shape
    out = torch.zeros(N, T, 2, pair.d_model)
    for rows, L in length_batches(attention_mask_NT, batch):
        am = attention_mask_NT[rows, :L].long()
        acts = extract_pair(pair, input_ids_NT[rows, :L], am).float().cpu()
        out[rows, :L] = acts * am[..., None, None]
    return out


def sequence_acts(pair: ModelPair, input_ids_NT: Tensor, attention_mask_NT: Tensor, *, batch: int = 16) -> Tensor:
    """``compute``, read from ``pair.acts_dir`` when a pass over the same sequences at the same layer
    was stored there, else computed and stored (no storing when the pair has no ``acts_dir``)."""
    from safetensors.torch import load_file

    from crosscoder.atomic import replace_atomically
    from crosscoder.checkpoint import save_tensors_checked

    if pair.acts_dir is None:
        return compute(pair, input_ids_NT, attention_mask_NT, batch=batch)
    path = Path(pair.acts_dir) / f"{sequences_key(input_ids_NT, attention_mask_NT, pair.layer)}.safetensors"
    if path.exists():
        acts = load_file(str(path))["acts"]
        if tuple(acts.shape) == (*input_ids_NT.shape, 2, pair.d_model):
            return acts
    acts = compute(pair, input_ids_NT, attention_mask_NT, batch=batch)
    replace_atomically(path, lambda tmp: save_tensors_checked({"acts": acts}, tmp.parent, tmp.name))
    return acts
