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


def _train_l1_and_batchtopk(train_NSD: Tensor, heldout_NSD: Tensor, scale_S: Tensor, *, n_latents: int, k: int,
                            l1_coeff: float, n_steps: int, lr: float, batch_size: int, seed: int, out_dir: str,
                            log_every: int, eval_every: int, progress: bool) -> tuple[dict, list]:
    """An L1 and a BatchTopK crosscoder ({"L1": ..., "BatchTopK": ...}, same initialisation seed and
    input scale) trained in lockstep on the same batches into ``out_dir/<name>``; their TrainResults."""
    from crosscoder.config import CrosscoderConfig, TrainConfig
    from crosscoder.model import Crosscoder
    from crosscoder.train import TensorBatches, train_many

    d = train_NSD.shape[-1]
    models = {
        "L1": Crosscoder(CrosscoderConfig(d_model=d, n_latents=n_latents, sparsity="l1"),
                         generator=torch.Generator().manual_seed(seed)),
        "BatchTopK": Crosscoder(CrosscoderConfig(d_model=d, n_latents=n_latents, sparsity="batchtopk", k=k),
                                generator=torch.Generator().manual_seed(seed)),
    }
    for m in models.values():
        m.input_scale_S.copy_(scale_S)
    tcfgs = [TrainConfig(n_steps=n_steps, batch_size=batch_size, lr=lr, l1_coeff=l1_coeff, log_every=log_every,
                         eval_every=eval_every),
             TrainConfig(n_steps=n_steps, batch_size=batch_size, lr=lr, log_every=log_every, eval_every=eval_every)]
    results = train_many(list(models.values()), TensorBatches(train_NSD, batch_size, seed=seed), tcfgs,
                         [f"{out_dir}/{name}" for name in models], heldout_raw_NSD=heldout_NSD, progress=progress)
    return models, results


def train_pair(cfg: SyntheticConfig, n_tokens: int, *, n_latents: int, k: int, l1_coeff: float, n_steps: int,
               lr: float, out_dir: str, batch_size: int = 512) -> PairRun:
    """Train an L1 and a BatchTopK crosscoder in lockstep on the same batches of ``n_tokens`` planted
    tokens (held-out and normalisation tokens drawn apart), and report how each recovered the atoms."""
    from crosscoder.data.normalise import estimate_input_scale

    train_data, heldout = sample(cfg, n_tokens), sample(cfg, 4096, seed_offset=1)
    scale = estimate_input_scale(sample(cfg, 4096, seed_offset=2).acts_NSD)
    models, results = _train_l1_and_batchtopk(
        train_data.acts_NSD, heldout.acts_NSD, scale, n_latents=n_latents, k=k, l1_coeff=l1_coeff, n_steps=n_steps,
        lr=lr, batch_size=batch_size, seed=cfg.seed, out_dir=out_dir, log_every=250, eval_every=1000, progress=True)
    reports, rows = {}, []
    for (name, m), res in zip(models.items(), results):
        reports[name] = rep = recovery_report(m, train_data)
        h = res.metrics["heldout"]
        rows.append({"crosscoder": name, "L0": h["l0"], "FVU base": h["fvu_base"], "FVU chat": h["fvu_chat"],
                     "dead": h["dead_frac"], "mean best cosine": rep["mean_best_cosine"],
                     "min best cosine": rep["min_best_cosine"], "bin accuracy": rep["bin_accuracy"]})
    return PairRun(models, train_data, reports, rows)


# ---------------------------------------------------------------------------------------------
# Chat offsets tied to one fixed context: why BatchTopK can miss a chat-only direction.
#
# On the organism, the chat model writes its decisions (refuse / answer) at one fixed position, the
# newline closing the ``<start_of_turn>model`` header, where the base model has its own, nearly
# constant, header representation. A latent that fires only there is free under BatchTopK to
# reconstruct the base header too (no decoder-norm penalty), which costs nothing in L0; the L1
# penalty charges for a base half. This toy plants exactly that, and the same offsets on varied
# text tokens instead, so the two placements can be compared on one objective.


TIED, VARIED = "tied to the header", "on varied text tokens"
"""The two designs of ``tied_offset_runs`` (the "offsets" column of its rows)."""


@dataclass
class TiedOffsetConfig(_DictMixin):
    """Shared sparse text plus two chat-only offsets (two "decisions"), either tied to a fixed
    context token or spread over varied text tokens."""

    d_model: int = 32
    """Width of each source."""
    n_shared: int = 64
    """Shared atoms of the text tokens (base and chat directions at ``shared_cosine``)."""
    shared_cosine: float = 0.9
    """Cosine between a shared atom's base and chat directions."""
    p_active: float = 0.04
    """Probability that a shared atom is active on a text token."""
    context_fraction: float = 0.15
    """Share of tokens that are the fixed context (the header)."""
    context_norm: float = 3.0
    """Norm of the context vector in each source (the chat one at ``context_cosine`` to the base one)."""
    context_cosine: float = 0.3
    """Cosine between the base and chat context vectors (the fine-tune rewrote the header)."""
    offset_norm: float = 3.0
    """Norm of each chat-only offset."""
    tied: bool = True
    """True: every context token carries one of the two offsets in chat (half each), as decisions
    at a header do. False: the context tokens carry none, and each offset lands on a random
    ``context_fraction / 2`` of the text tokens instead."""
    noise: float = 0.02
    """Std of Gaussian noise added to every source."""
    seed: int = 0
    """Seed of the directions and of the sampling."""

    def __post_init__(self) -> None:
        if not 0 < self.context_fraction < 0.5 or not 0 < self.p_active <= 1:
            raise ConfigError("context_fraction must lie in (0, 0.5) and p_active in (0, 1]")
        if not -1.0 <= min(self.shared_cosine, self.context_cosine) <= max(self.shared_cosine, self.context_cosine) <= 1.0:
            raise ConfigError("shared_cosine and context_cosine must lie in [-1, 1]")


class TiedOffsetData(NamedTuple):
    acts_NSD: Tensor
    """Activations [N, 2, d]."""
    offset_N: Tensor
    """int [N]: which chat offset the token carries (0 or 1), -1 for none."""
    context_N: Tensor
    """bool [N]: the token is the fixed context."""
    offsets_OD: Tensor
    """The two chat-only offset vectors [2, d] (raw space)."""
    context_SD: Tensor
    """The context vector in each source [2, d] (raw space)."""


def tied_offset_sample(cfg: TiedOffsetConfig, n_tokens: int, *, seed_offset: int = 0) -> TiedOffsetData:
    """Draw ``n_tokens`` activations of the tied or untied design (same directions for every split)."""
    atoms, _ = make_atoms(SyntheticConfig(d_model=cfg.d_model, n_shared=cfg.n_shared, n_base_only=0,
                                          n_chat_only=0, shared_cosine=cfg.shared_cosine, seed=cfg.seed))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, cfg.d_model, generator=g), dim=-1)  # noqa: E731
    ctx_b, other, offsets = unit(1)[0], unit(1)[0], unit(2)
    other = torch.nn.functional.normalize(other - (other @ ctx_b) * ctx_b, dim=0)
    c = cfg.context_cosine
    ctx_S = torch.stack([ctx_b, c * ctx_b + (1 - c * c) ** 0.5 * other]) * cfg.context_norm

    g = torch.Generator().manual_seed(cfg.seed + 7919 * (seed_offset + 1))
    codes = (torch.rand(n_tokens, cfg.n_shared, generator=g) < cfg.p_active) * (
        torch.rand(n_tokens, cfg.n_shared, generator=g) * 1.5 + 0.5)
    acts = torch.einsum("na,asd->nsd", codes, atoms)
    context = torch.rand(n_tokens, generator=g) < cfg.context_fraction
    which = torch.randint(0, 2, (n_tokens,), generator=g)
    if cfg.tied:
        offset = torch.where(context, which, -1)
    else:
        offset = torch.where(~context & (torch.rand(n_tokens, generator=g) < cfg.context_fraction), which, -1)
    # Context tokens: the context vector plus a little shared text (the header sees its turn).
    acts[context] = 0.3 * acts[context] + ctx_S
    acts[:, 1] += (offset >= 0)[:, None] * cfg.offset_norm * offsets[offset.clamp(min=0)]
    acts += cfg.noise * torch.randn(acts.shape, generator=g)
    return TiedOffsetData(acts, offset, context, offsets * cfg.offset_norm, ctx_S)


def offset_latents(model, data: TiedOffsetData) -> list[dict]:
    """For each planted chat offset, the latent whose activation best separates the tokens that
    carry it from comparable tokens (the other context tokens when tied, the other text tokens
    when not: a latent firing on every header scores 0.5), that latent's Δnorm and decoder norms,
    and the cosine of its base decoder with the base context vector (raw space). Call on held-out
    data."""
    from crosscoder.analysis.ground_truth import auroc
    from crosscoder.analysis.metrics import diff_geometry

    with torch.no_grad():
        f_NF = model.encode(model.normalise(data.acts_NSD))
        norms_FS = model.decoder_norms_FS()
        delta_F = diff_geometry(model).delta_norm_F
        ctx_cos_F = torch.nn.functional.cosine_similarity(model.decoder_raw_FSD()[:, 0], data.context_SD[0][None], dim=-1)
    live = torch.nonzero((f_NF > 0).any(0)).squeeze(1)
    tied = bool((data.offset_N[data.context_N] >= 0).all())
    eligible_N = data.context_N if tied else ~data.context_N
    out = []
    for o in range(data.offsets_OD.shape[0]):
        auc_J = auroc(f_NF[eligible_N][:, live], data.offset_N[eligible_N] == o)
        j = int(live[auc_J.nan_to_num(0.0).argmax()])
        out.append({"offset": o, "latent": j, "auroc": float(auc_J.nan_to_num(0.0).max()),
                    "delta_norm": float(delta_F[j]), "norm_base": float(norms_FS[j, 0]),
                    "norm_chat": float(norms_FS[j, 1]), "base_context_cos": float(ctx_cos_F[j])})
    return out


def tied_offset_runs(cfg: TiedOffsetConfig, n_tokens: int, *, n_latents: int, k: int, l1_coeff: float,
                     n_steps: int, lr: float, out_dir: str, batch_size: int = 512) -> list[dict]:
    """Train an L1 and a BatchTopK crosscoder in lockstep on the tied design and on the untied one,
    and report, per design and objective, the best latent of each offset (``offset_latents``) and
    the number of chat-only latents (Δnorm > 0.9)."""
    from dataclasses import replace

    from crosscoder.data.normalise import estimate_input_scale

    rows = []
    for tied in (True, False):
        dcfg = replace(cfg, tied=tied)
        data, heldout = tied_offset_sample(dcfg, n_tokens), tied_offset_sample(dcfg, 8192, seed_offset=1)
        scale = estimate_input_scale(tied_offset_sample(dcfg, 4096, seed_offset=2).acts_NSD)
        models, results = _train_l1_and_batchtopk(
            data.acts_NSD, heldout.acts_NSD, scale, n_latents=n_latents, k=k, l1_coeff=l1_coeff, n_steps=n_steps,
            lr=lr, batch_size=batch_size, seed=cfg.seed, out_dir=f"{out_dir}/{'tied' if tied else 'untied'}",
            log_every=n_steps, eval_every=n_steps, progress=False)
        design = TIED if tied else VARIED
        for (name, m), res in zip(models.items(), results):
            found = offset_latents(m.eval(), heldout)
            rows.append({"offsets": design, "crosscoder": name,
                         # the run's own held-out class counts (live latents, Minder's Δnorm bands)
                         "chat-only latents (Δnorm > 0.9)": res.metrics["heldout"]["classes_delta_norm"].get("chat-only", 0),
                         "offset latents' Δnorm": [round(r["delta_norm"], 2) for r in found],
                         "offset latents' AUROC": [round(r["auroc"], 3) for r in found],
                         "offset latents' base-decoder norm": [round(r["norm_base"], 2) for r in found],
                         "offset latents' chat-decoder norm": [round(r["norm_chat"], 2) for r in found],
                         "cos(base decoder, base context)": [round(r["base_context_cos"], 2) for r in found]})
    return rows


def chat_only_offsets(rows: list[dict], design: str) -> tuple[int, int]:
    """Of the best offset latents of one design in ``tied_offset_runs`` rows (one per offset and
    objective), how many are chat-only (Δnorm > 0.9), and how many there are."""
    vals = [v for r in rows if r["offsets"] == design for v in r["offset latents' Δnorm"]]
    return sum(v > 0.9 for v in vals), len(vals)


def tied_offset_finding(rows: list[dict]) -> str:
    """One paragraph stating what ``tied_offset_runs`` measured (every number read from ``rows``)."""
    BASE_NORM, AUROC, COS = "offset latents' base-decoder norm", "offset latents' AUROC", "cos(base decoder, base context)"

    def span(design: str, objective: str, key: str = "offset latents' Δnorm") -> str:
        vals = next(r[key] for r in rows if r["offsets"] == design and r["crosscoder"] == objective)
        lo, hi = min(vals), max(vals)
        return f"{lo:.2f}" if lo == hi else f"{lo:.2f}–{hi:.2f}"

    objectives = list(dict.fromkeys(r["crosscoder"] for r in rows))
    (on_varied, _), (on_tied, n) = chat_only_offsets(rows, VARIED), chat_only_offsets(rows, TIED)
    each = lambda d, key="offset latents' Δnorm": ", ".join(f"{o} {span(d, o, key)}" for o in objectives)  # noqa: E731
    head = ("**Where a chat-only direction appears decides whether the decoder norms can see it.**"
            if on_tied < on_varied else "**In this run the placement made no difference.**")
    return (f"{head} On varied text tokens, {on_varied} of {n} offset latents are chat-only (Δnorm: "
            f"{each(VARIED)}). Tied to the one context, {on_tied} of {n} are (Δnorm: {each(TIED)}); "
            f"their base decoders have norm {each(TIED, BASE_NORM)} (untied: {each(VARIED, BASE_NORM)}) and "
            f"cosine {each(TIED, COS)} with the base model's context vector: the latent that carries a decision "
            f"also reconstructs the base side of the context it is tied to. Every offset is still found: the "
            f"lowest AUROC of a best latent is {min(v for r in rows for v in r[AUROC]):.2f}.")


def write_metrics(out_dir: str, recovery_rows: list[dict], offset_rows: list[dict], *, offset_steps: int) -> dict:
    """Merge the synthetic page's headline numbers into ``out_dir/metrics.json`` (atomic rewrite; the
    book's first page reads them from there): each crosscoder's ``train_pair`` row under "recovery",
    and the ``tied_offset_runs`` rows with the steps they trained under "tied_offsets" (no rows when
    ``offset_steps`` is 0, which skips that experiment). Returns the whole file."""
    from crosscoder.checkpoint import update_metrics

    return update_metrics(out_dir, {"recovery": recovery_rows,
                                    "tied_offsets": {"offset_steps": offset_steps, "rows": offset_rows}})
