"""Synthetic paired activations from a known sparse dictionary, for tests and the first notebook.

Each ground-truth atom is either shared (present in every source, with per-source directions of a
chosen cosine) or exclusive to one source (zero decoder in the others). Tokens are sparse
non-negative combinations of atoms plus small Gaussian noise, so a crosscoder that works must
recover the atoms and sort them into the right relative-decoder-norm bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from crosscoder.config import ConfigError, _DictMixin


@dataclass
class SyntheticConfig(_DictMixin):
    """Ground truth for two sources (base = 0, chat = 1)."""

    d_model: int = 32
    """Width of each source."""
    n_shared: int = 48
    """Atoms present in both sources."""
    n_base_only: int = 8
    """Atoms present only in the base source."""
    n_chat_only: int = 8
    """Atoms present only in the chat source."""
    shared_cosine: float = 0.9
    """Cosine between a shared atom's base and chat directions."""
    p_active: float = 0.04
    """Probability that an atom is active on a token."""
    noise: float = 0.01
    """Std of isotropic Gaussian noise added to every source."""
    seed: int = 0
    """Seed of the dictionary and of the sampling."""

    def __post_init__(self) -> None:
        if min(self.d_model, self.n_shared) < 1 or min(self.n_base_only, self.n_chat_only) < 0:
            raise ConfigError("d_model and n_shared must be >= 1; exclusive atom counts >= 0")
        if not -1.0 <= self.shared_cosine <= 1.0 or not 0 < self.p_active <= 1:
            raise ConfigError("shared_cosine must lie in [-1, 1] and p_active in (0, 1]")


class SyntheticData(NamedTuple):
    acts_NSD: Tensor
    """Activations [N, 2, d]."""
    atoms_ASD: Tensor
    """Ground-truth atoms [A, 2, d]; an exclusive atom is zero in the other source."""
    kinds: list[str]
    """"shared", "base-only" or "chat-only" for each atom."""
    codes_NA: Tensor
    """The sparse codes that generated the activations."""


def make_atoms(cfg: SyntheticConfig) -> tuple[Tensor, list[str]]:
    g = torch.Generator().manual_seed(cfg.seed)
    d = cfg.d_model
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)  # noqa: E731
    base = unit(cfg.n_shared)
    # chat direction = c * base + sqrt(1 - c^2) * (a random direction orthogonal to base)
    other = unit(cfg.n_shared)
    other = torch.nn.functional.normalize(other - (other * base).sum(-1, keepdim=True) * base, dim=-1)
    c = cfg.shared_cosine
    chat = c * base + (1 - c * c) ** 0.5 * other
    shared = torch.stack([base, chat], dim=1)
    b_only = torch.stack([unit(cfg.n_base_only), torch.zeros(cfg.n_base_only, d)], dim=1)
    c_only = torch.stack([torch.zeros(cfg.n_chat_only, d), unit(cfg.n_chat_only)], dim=1)
    atoms = torch.cat([shared, b_only, c_only])
    kinds = ["shared"] * cfg.n_shared + ["base-only"] * cfg.n_base_only + ["chat-only"] * cfg.n_chat_only
    return atoms, kinds


def sample(cfg: SyntheticConfig, n_tokens: int, *, seed_offset: int = 0) -> SyntheticData:
    """Draw ``n_tokens`` activations (a different ``seed_offset`` gives an independent split)."""
    atoms, kinds = make_atoms(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 7919 * (seed_offset + 1))
    A = atoms.shape[0]
    on = torch.rand(n_tokens, A, generator=g) < cfg.p_active
    mags = torch.rand(n_tokens, A, generator=g) * 1.5 + 0.5
    codes = on * mags
    acts = torch.einsum("na,asd->nsd", codes, atoms)
    acts += cfg.noise * torch.randn(acts.shape, generator=g)
    return SyntheticData(acts, atoms, kinds, codes)


def atom_recovery(W_dec_raw_FSD: Tensor, atoms_ASD: Tensor) -> tuple[Tensor, Tensor]:
    """For each true atom, the best cosine with any learned latent (on the concatenated [S*d]
    decoder vector) and that latent's index.

    Both must be in the same space: the atoms live in raw activation space, so pass the decoder
    in raw space too (``Crosscoder.decoder_raw_FSD()``); with unequal input scales a
    normalised-space decoder points elsewhere in the concatenated space.
    """
    dec = torch.nn.functional.normalize(W_dec_raw_FSD.reshape(W_dec_raw_FSD.shape[0], -1), dim=-1)
    tru = torch.nn.functional.normalize(atoms_ASD.reshape(atoms_ASD.shape[0], -1), dim=-1)
    cos_AF = tru @ dec.T
    best, idx = cos_AF.max(dim=1)
    return best, idx


def recovery_report(model, data: SyntheticData) -> dict:
    """How well a trained crosscoder (a ``Crosscoder``) recovered the planted dictionary: mean / min
    best cosine per atom (raw-space decoders vs atoms), and how often the best-matching latent's
    Δnorm class (Minder et al.'s bands: base-only < 0.1, shared 0.4-0.6, chat-only > 0.9) equals
    the atom's kind. Call ``recovery_report(model, data)``.
    """
    from crosscoder.analysis.metrics import classify_latents, diff_geometry
    from crosscoder.model import Crosscoder

    if isinstance(model, Crosscoder):
        with torch.no_grad():
            best, idx = atom_recovery(model.decoder_raw_FSD().detach(), data.atoms_ASD)
            got = classify_latents(diff_geometry(model).delta_norm_F[idx], "minder")
    else:
        raise TypeError(
            f"recovery_report needs the Crosscoder (to compare its raw-space decoders with the "
            f"raw-space atoms), got {type(model).__name__}; call recovery_report(model, data)"
        )
    per_kind = {}
    for kind in ("shared", "base-only", "chat-only"):
        sel = [i for i, k in enumerate(data.kinds) if k == kind]
        if sel:
            per_kind[kind] = {
                "atoms": len(sel),
                "mean_best_cosine": float(best[sel].mean()),
                "bin_accuracy": sum(got[i] == kind for i in sel) / len(sel),
            }
    return {
        "mean_best_cosine": float(best.mean()),
        "min_best_cosine": float(best.min()),
        "bin_accuracy": sum(g == k for g, k in zip(got, data.kinds)) / len(got),
        "per_kind": per_kind,
        "best_cosine_A": best,
    }


class PairRun(NamedTuple):
    models: dict
    """{"L1": Crosscoder, "BatchTopK": Crosscoder}, trained."""
    data: SyntheticData
    """The training data (its atoms are the ground truth)."""
    reports: dict
    """recovery_report of each crosscoder."""
    rows: list
    """One summary row per crosscoder: held-out L0, FVU, dead fraction and recovery."""


def train_pair(cfg: SyntheticConfig, n_tokens: int, *, n_latents: int, k: int, l1_coeff: float, n_steps: int,
               lr: float, out_dir: str, batch_size: int = 512) -> PairRun:
    """Train an L1 and a BatchTopK crosscoder in lockstep on the same batches of ``n_tokens`` planted
    tokens (held-out and normalisation tokens drawn apart), and report how each recovered the atoms."""
    from crosscoder.config import CrosscoderConfig, TrainConfig
    from crosscoder.data.normalise import estimate_input_scale
    from crosscoder.model import Crosscoder
    from crosscoder.train import TensorBatches, train_many

    train_data, heldout = sample(cfg, n_tokens), sample(cfg, 4096, seed_offset=1)
    models = {
        "L1": Crosscoder(CrosscoderConfig(d_model=cfg.d_model, n_latents=n_latents, sparsity="l1"),
                         generator=torch.Generator().manual_seed(cfg.seed)),
        "BatchTopK": Crosscoder(CrosscoderConfig(d_model=cfg.d_model, n_latents=n_latents, sparsity="batchtopk", k=k),
                                generator=torch.Generator().manual_seed(cfg.seed)),
    }
    scale = estimate_input_scale(sample(cfg, 4096, seed_offset=2).acts_NSD)
    for m in models.values():
        m.input_scale_S.copy_(scale)
    tcfgs = [TrainConfig(n_steps=n_steps, batch_size=batch_size, lr=lr, l1_coeff=l1_coeff, log_every=250,
                         eval_every=1000),
             TrainConfig(n_steps=n_steps, batch_size=batch_size, lr=lr, log_every=250, eval_every=1000)]
    results = train_many(list(models.values()), TensorBatches(train_data.acts_NSD, batch_size, seed=cfg.seed), tcfgs,
                         [f"{out_dir}/{name}" for name in models], heldout_raw_NSD=heldout.acts_NSD)
    reports, rows = {}, []
    for (name, m), res in zip(models.items(), results):
        reports[name] = rep = recovery_report(m, train_data)
        h = res.metrics["heldout"]
        rows.append({"crosscoder": name, "L0": h["l0"], "FVU base": h["fvu_base"], "FVU chat": h["fvu_chat"],
                     "dead": h["dead_frac"], "mean best cosine": rep["mean_best_cosine"],
                     "min best cosine": rep["min_best_cosine"], "bin accuracy": rep["bin_accuracy"]})
    return PairRun(models, train_data, reports, rows)
