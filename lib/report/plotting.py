"""The one plotting module: a consistent figure style and ``save_figure``.

Every figure of the book is made in a notebook by a function here (added as the science grows) and
saved with ``save_figure(fig, path, params)``, which writes ``<path>.png``, ``<path>.svg`` and a
sidecar ``<path>.json`` holding the parameters that produced the figure, so any image can be traced
back to its run. The colours of the model-diffing categories are fixed here so that "chat-only" has
the same colour on every page.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import seaborn as sns

from crosscoder.atomic import replace_atomically, write_json_atomic

# Colour-blind-safe (seaborn "colorblind") colours for the categories every model-diff figure uses.
_CB = sns.color_palette("colorblind")
CATEGORY_COLORS: dict[str, tuple[float, float, float]] = {
    "base": _CB[0],  # base model / base-only latents (blue)
    "chat": _CB[1],  # chat model / chat-only latents (orange: distinct from blue for all CVD types)
    "shared": _CB[7],  # shared latents (neutral grey)
    "other": _CB[4],  # latents between the category thresholds (purple)
    "dead": (0.85, 0.85, 0.85),  # never-active latents (light grey, recedes behind the rest)
}
FIGURE_FORMATS = ("png", "svg")
DPI = 150  # PNG resolution: sharp in the HTML book at a moderate file size


class SavedFigure(NamedTuple):
    """Paths written by ``save_figure``."""

    png: Path
    svg: Path | None
    params: Path

    def _ipython_display_(self) -> None:
        """Nothing: the figure is on the page already, and a notebook cell ending in ``save_figure(...)``
        would otherwise print these paths under it."""


def set_style(context: str = "notebook") -> None:
    """Apply the book's figure style (call once at the top of a notebook)."""
    sns.set_theme(context=context, style="whitegrid", palette="colorblind")
    plt.rcParams.update({
        "figure.figsize": (6.4, 4.0),
        "figure.dpi": 100,
        "savefig.dpi": DPI,
        "savefig.bbox": "tight",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titleweight": "bold",
        "legend.frameon": False,
        # Deterministic SVGs: fixed ids and no creation date, so unchanged figures diff clean.
        "svg.hashsalt": "crosscoder",
        "svg.fonttype": "none",
    })


def _jsonable(value: Any, where: str) -> Any:
    """Convert parameters to JSON (numpy/torch scalars, paths, tuples); refuse anything else, so a
    sidecar never silently stores a repr that cannot be read back."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"save_figure params: {where} = {value!r} is not finite")
        return float(value)
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and tuple(getattr(value, "shape", (None,))) == ():
        return _jsonable(value.item(), where)  # numpy scalars, 0-d numpy arrays / torch tensors
    raise TypeError(
        f"save_figure params: {where} has type {type(value).__name__}; pass plain numbers, "
        f"strings, lists or dicts (e.g. config.to_dict()) so the sidecar JSON can be read back"
    )


def save_figure(fig: plt.Figure, path: str | os.PathLike, params: Mapping[str, Any],
                formats: tuple[str, ...] = FIGURE_FORMATS) -> SavedFigure:
    """Write ``fig`` as ``<path>.png`` (+ ``.svg``) and ``<path>.json`` with ``params``.

    ``path`` is the file stem (a ``.png``/``.svg`` suffix is dropped); folders are created. Each
    file is written to a temp name and renamed, so a crashed notebook never leaves half an image.
    The figure stays open so the notebook still displays it.
    """
    if "png" not in formats or not set(formats) <= set(FIGURE_FORMATS):
        raise ValueError(f"formats must include 'png' and be a subset of {FIGURE_FORMATS}")
    if not isinstance(params, Mapping):
        raise TypeError("save_figure params must be a mapping of the parameters behind the figure")
    stem = Path(path)
    if stem.suffix in (".png", ".svg", ".json"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {"params": _jsonable(dict(params), "params"),
               "files": [f"{stem.name}.{fmt}" for fmt in formats]}
    out = {}
    for fmt in formats:
        target = stem.parent / f"{stem.name}.{fmt}"
        # No date / software-version metadata: identical inputs give identical bytes.
        meta = {"Date": None} if fmt == "svg" else {"Software": None}
        replace_atomically(target, lambda tmp, fmt=fmt, meta=meta: fig.savefig(
            tmp, format=fmt, dpi=DPI, metadata=meta, bbox_inches="tight"))
        out[fmt] = target
    params_path = write_json_atomic(stem.parent / f"{stem.name}.json", sidecar)
    return SavedFigure(png=out["png"], svg=out.get("svg"), params=params_path)


# ---------------------------------------------------------------------------- science figures
# Each function draws one figure of the book from arrays a lib analysis returned, and returns the
# matplotlib Figure (the notebook saves it with ``save_figure`` and the parameters of its run).

CLASS_COLORS = {
    "base-only": CATEGORY_COLORS["base"],
    "chat-only": CATEGORY_COLORS["chat"],
    "not shared (base side)": CATEGORY_COLORS["base"],  # Kissane's r bands (only "shared" is his)
    "not shared (chat side)": CATEGORY_COLORS["chat"],
    "shared": CATEGORY_COLORS["shared"],
    "other": CATEGORY_COLORS["other"],
    "dead": CATEGORY_COLORS["dead"],
}


def _np(x: Any):
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def relative_norm_hist(rel_norm_F: Any, delta_norm_F: Any, alive_F: Any | None = None, bins: int = 60) -> plt.Figure:
    """Histograms of Kissane's r (shared band 0.3-0.7) and Minder's Δnorm (bands <0.1, 0.4-0.6, >0.9)."""
    r, dn = _np(rel_norm_F), _np(delta_norm_F)
    if alive_F is not None:
        keep = _np(alive_F).astype(bool)
        r, dn = r[keep], dn[keep]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    from crosscoder.analysis.metrics import BANDS

    for ax, v, title, scheme in [
        (axes[0], r, r"relative norm $r = \|d_{chat}\| / (\|d_{base}\| + \|d_{chat}\|)$", "kissane"),
        (axes[1], dn, r"$\Delta$norm (Minder et al.)", "minder"),
    ]:
        for band in BANDS[scheme]:
            ax.axvspan(band.low, band.high, color=CLASS_COLORS[band.label], alpha=0.15, lw=0, label=band.label)
        ax.hist(v, bins=bins, range=(0, 1), color="0.25")
        ax.set(xlabel=title, ylabel="latents", xlim=(0, 1), yscale="log")
    for ax in axes:
        ax.legend(loc="upper center", fontsize="x-small")
    fig.tight_layout()
    return fig


def decoder_cosine_hist(cosine_F: Any, classes: list[str], bins: int = 50) -> plt.Figure:
    """Cosine between the base and chat decoder vectors of each shared latent."""
    import numpy as np

    cos = _np(cosine_F)
    shared = np.array([c == "shared" for c in classes])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.hist(cos[shared], bins=bins, range=(-1, 1), color=CLASS_COLORS["shared"], edgecolor="0.3")
    ax.set(xlabel=r"cos($d_{base}$, $d_{chat}$)", ylabel="shared latents", yscale="log",
           title=f"{int(shared.sum())} shared latents")
    fig.tight_layout()
    return fig


def activation_frequency_hist(freq_F: Any, bins: int = 50) -> plt.Figure:
    """log10 activation frequency of live latents; dead ones counted in the title."""
    import numpy as np

    f = _np(freq_F)
    live = f > 0
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.hist(np.log10(f[live]), bins=bins, color="0.3")
    ax.set(xlabel="log10 activation frequency", ylabel="latents",
           title=f"{int((~live).sum())} dead of {len(f)} latents")
    fig.tight_layout()
    return fig


def training_curves(log_records: list[dict[str, Any]], label: str = "") -> plt.Figure:
    """Training loss / L0 and held-out FVU against steps from a run's log.jsonl records."""
    train = [r for r in log_records if r.get("split") == "train"]
    held = [r for r in log_records if r.get("split") == "heldout"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], color="0.2")
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log", title=label)
    axes[1].plot([r["step"] for r in train], [r["l0"] for r in train], color="0.2")
    axes[1].set(xlabel="step", ylabel="L0 (train batches)")
    for key, color in [("fvu_base", CATEGORY_COLORS["base"]), ("fvu_chat", CATEGORY_COLORS["chat"])]:
        if held and key in held[0]:
            axes[2].plot([r["step"] for r in held], [r[key] for r in held], marker="o", color=color,
                         label=key.replace("fvu_", ""))
    axes[2].set(xlabel="step", ylabel="held-out FVU", yscale="log")
    axes[2].legend()
    fig.tight_layout()
    return fig


def frontier_plot(rows: list[dict[str, Any]], metric: str = "fvu", sources=("base", "chat")) -> plt.Figure:
    """L0 vs ``metric`` per model (one panel each), crosscoder vs the per-model SAE pair."""
    fig, axes = plt.subplots(1, len(sources), figsize=(5.2 * len(sources), 3.8), squeeze=False)
    for ax, src in zip(axes[0], sources):
        for kind, style in [("crosscoder", dict(marker="o", color="0.15")),
                            ("sae-pair", dict(marker="s", color=CATEGORY_COLORS["other"], ls="--"))]:
            pts = sorted((r["l0"], r[f"{metric}_{src}"]) for r in rows
                         if r["kind"] == kind and f"{metric}_{src}" in r)
            if pts:
                ax.plot(*zip(*pts), label=kind, **style)
        ax.set(xlabel="L0 (active latents per token, both models)", ylabel=f"{metric} ({src})", xscale="log")
        if metric == "fvu":
            ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    return fig


def latent_scaling_scatter(results: dict[str, Any]) -> plt.Figure:
    """ν^ε vs ν^r for the chat-only latents of each crosscoder (Minder et al.'s Fig. 3 layout)."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, ls) in zip(axes[0], results.items()):
        ax.scatter(_np(ls.nu_recon), _np(ls.nu_error), s=14, color=CATEGORY_COLORS["chat"], alpha=0.8)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axvline(0, color="0.6", lw=0.8)
        ax.set(xlabel=r"$\nu^r = \beta^r_{base} / \beta^r_{chat}$",
               ylabel=r"$\nu^\epsilon = \beta^\epsilon_{base} / \beta^\epsilon_{chat}$",
               title=f"{name}: {len(_np(ls.latents))} chat-only latents")
    fig.tight_layout()
    return fig


def ground_truth_bars(table: list[dict[str, Any]], ylabel: str = "best AUROC (chat-only latents)") -> plt.Figure:
    """Best AUROC of a candidate set of latents per planted behaviour, one bar group per crosscoder."""
    import numpy as np

    behaviours = sorted({r["behaviour"] for r in table})
    models = sorted({r["crosscoder"] for r in table})
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(behaviours), 3.6))
    w = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        vals = [next((r["best_auroc"] for r in table if r["crosscoder"] == m and r["behaviour"] == b), np.nan)
                for b in behaviours]
        ax.bar(np.arange(len(behaviours)) + i * w, vals, width=w, label=m)
    ax.axhline(0.9, color="0.4", ls="--", lw=1, label="recovered (0.9)")
    ax.axhline(0.5, color="0.7", ls=":", lw=1, label="chance")
    ax.set_xticks(np.arange(len(behaviours)) + w * (len(models) - 1) / 2, behaviours, rotation=15)
    ax.set(ylabel=ylabel, ylim=(0, 1.02))
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return fig


def probe_layers(rows: list[dict[str, Any]], read_layer: int) -> plt.Figure:
    """Per decision task (one panel each): how strongly each model separates the decision (difference
    of class means over the mean activation norm) after every block, with the probe AUROC as labels;
    the block the crosscoders read is shaded."""
    import numpy as np

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.9 * len(tasks), 3.0), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for model, style in (("base", "--o"), ("chat", "-o")):
            rr = sorted((r for r in rows if r["task"] == task and r["model"] == model), key=lambda r: r["layer"])
            x = np.array([r["layer"] for r in rr])
            ax.plot(x, [r["separation"] for r in rr], style, label=model, ms=4)
            for r in rr:
                ax.annotate(f"{r['auroc']:.2f}", (r["layer"], r["separation"]), fontsize=7,
                            textcoords="offset points", xytext=(0, 5), ha="center")
        ax.axvspan(read_layer - 0.3, read_layer + 0.3, color="0.9", zorder=0)
        ax.set(title=task.replace("_", " "), xlabel="after block")
        ax.set_xticks(sorted({r["layer"] for r in rows}))
    axes[0][0].set_ylabel("separation (mean diff / mean norm)")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    return fig


def cluster_map(embedding_2d: Any, cluster_labels: Any, classes: list[str], title: str = "") -> plt.Figure:
    """2-D embedding of latents coloured by relative-norm class (left) and by cluster (right)."""
    import numpy as np

    emb = _np(embedding_2d)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for name in ["shared", "other", "base-only", "chat-only"]:
        sel = np.array([c == name for c in classes])
        if sel.any():
            axes[0].scatter(emb[sel, 0], emb[sel, 1], s=10, color=CLASS_COLORS[name], label=name, alpha=0.8)
    axes[0].legend(fontsize="small", markerscale=2)
    axes[0].set(title=title or "latents by class", xticks=[], yticks=[])
    labels = _np(cluster_labels)
    pal = sns.color_palette("tab20", int(labels.max()) + 1)
    axes[1].scatter(emb[:, 0], emb[:, 1], s=10, c=[pal[i] for i in labels], alpha=0.8)
    axes[1].set(title=f"{int(labels.max()) + 1} clusters", xticks=[], yticks=[])
    fig.tight_layout()
    return fig


def stability_curves(table: list[dict[str, Any]], chosen: tuple[str, int]) -> plt.Figure:
    """Stability (the smaller of bootstrap and seed ARI) of each clustering view against the number
    of clusters, with the chosen (view, k) marked."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, method in enumerate(sorted({r["method"] for r in table})):
        pts = sorted((r["k"], r["stability"]) for r in table if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method, color=sns.color_palette("colorblind")[i + 2])
    method, k = chosen
    best = next(r["stability"] for r in table if r["method"] == method and r["k"] == k)
    ax.scatter([k], [best], s=140, facecolors="none", edgecolors="0.1", zorder=5, label=f"chosen: {method}, k = {k}")
    ax.set(xlabel="number of clusters k", ylabel="stability (min of bootstrap and seed ARI)", ylim=(-0.05, 1.05))
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def atom_recovery_hist(best_cos_A: Any, kinds: list[str]) -> plt.Figure:
    """Synthetic check: best cosine between each planted atom and any learned decoder, by kind."""
    import numpy as np

    c = _np(best_cos_A)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for kind, color in [("shared", CLASS_COLORS["shared"]), ("base-only", CLASS_COLORS["base-only"]),
                        ("chat-only", CLASS_COLORS["chat-only"])]:
        sel = np.array([k == kind for k in kinds])
        if sel.any():
            ax.hist(c[sel], bins=30, range=(min(0.5, c.min()), 1.0), color=color, alpha=0.7, label=kind)
    ax.set(xlabel="max cosine(true atom, learned decoder)", ylabel="planted atoms")
    ax.legend()
    fig.tight_layout()
    return fig


def base_chat_cosine_hist(cosine_N: Any, bins: int = 60) -> plt.Figure:
    """Cosine between the base and chat residual of the same held-out token."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(_np(cosine_N), bins=bins, color="0.3")
    ax.set(xlabel="cosine(base residual, chat residual) of the same token", ylabel="held-out tokens")
    return fig


def crosslayer_frontier(rows: list[dict[str, Any]]) -> plt.Figure:
    """Total L0 against mean FVU over layers: a cross-layer crosscoder vs per-layer SAEs."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for kind, label, style in (("crosscoder", "crosscoder", dict(marker="o", color="0.15")),
                               ("sae-pair", "per-layer SAEs", dict(marker="s", ls="--", color=CATEGORY_COLORS["other"]))):
        sub = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["l0"])
        ax.plot([r["l0"] for r in sub], [r["fvu_mean"] for r in sub], label=label, **style)
    ax.set(xlabel="total L0 (active latents per token, all layers)", ylabel="mean FVU over layers",
           xscale="log", yscale="log")
    ax.legend()
    return fig


def frontier_figures(rows: list[dict[str, Any]]) -> dict[str, plt.Figure]:
    """The frontier page's four figures, by file stem: L0 against FVU and against CE recovered,
    for the L1 sweep and for the BatchTopK sweep."""
    figs = {}
    for sparsity in ("l1", "batchtopk"):
        sub = [r for r in rows if r["sparsity"] == sparsity]
        for metric in ("fvu", "ce_recovered"):
            fig = frontier_plot(sub, metric)
            fig.suptitle(f"{sparsity}: L0 vs {metric}", y=1.02)
            figs[f"frontier_{sparsity}_{metric}"] = fig
    return figs


def synthetic_recovery_figures(models: dict[str, Any], reports: dict[str, dict], kinds: list[str]) -> dict[str, plt.Figure]:
    """The synthetic page's figures, by file stem: per crosscoder, the best cosine of each planted
    atom, and the relative decoder norms of its latents."""
    from crosscoder.analysis.metrics import diff_geometry

    figs = {}
    for name, m in models.items():
        fig = atom_recovery_hist(reports[name]["best_cosine_A"], kinds)
        fig.axes[0].set_title(f"{name} crosscoder")
        figs[f"atom_recovery_{name}"] = fig
        geo = diff_geometry(m)
        fig = relative_norm_hist(geo.rel_norm_F, geo.delta_norm_F, bins=40)
        fig.suptitle(f"{name} crosscoder", y=1.02)
        figs[f"relative_norms_{name}"] = fig
    return figs


def scoreboard_grid(cells: list[dict[str, Any]], null: Mapping[str, int | None] | None = None,
                    threshold: float = 0.9) -> plt.Figure:
    """The scoreboard: one column per method (in the given order), one row per planted behaviour, each
    cell the best AUROC among the method's flagged items (a tick when it reaches ``threshold``: recovered;
    "none flagged" when the method flags nothing); with ``null``, a last row of the items each method
    flags on the null pair, where nothing was planted ("—": not measured)."""
    import numpy as np

    methods = list(dict.fromkeys(c["method"] for c in cells))
    behaviours = list(dict.fromkeys(c["behaviour"] for c in cells))
    cell = {(c["method"], c["behaviour"]): c for c in cells}
    A = np.array([[cell[(m, b)]["best_auroc"] for m in methods] for b in behaviours], dtype=float)
    fig = plt.figure(figsize=(2.2 + 1.25 * len(methods), 1.0 + 0.55 * (len(behaviours) + (null is not None))))
    if null is None:
        axes = [fig.add_subplot()]
    else:
        g = fig.add_gridspec(2, 1, height_ratios=[len(behaviours), 1], hspace=0.08)
        axes = [fig.add_subplot(g[0]), fig.add_subplot(g[1])]
    ax = axes[0]
    im = ax.imshow(np.ma.masked_invalid(A), cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto")
    ax.set_facecolor("0.92")  # methods that flag nothing
    for (i, b), (j, m) in ((ib, jm) for ib in enumerate(behaviours) for jm in enumerate(methods)):
        a, rec = A[i, j], cell[(m, b)]["recovered"]
        text = "none\nflagged" if math.isnan(a) else f"{a:.2f}" + (" ✓" if rec else "")
        ax.text(j, i, text, ha="center", va="center", fontsize=8, fontweight="bold" if rec else "normal",
                color="white" if not math.isnan(a) and a < 0.8 else "black")
    ax.set_yticks(range(len(behaviours)), [b.replace("_decision", "").replace("_", " ") for b in behaviours])
    if null is not None:
        counts = np.array([[np.nan if null.get(m) is None else null[m] for m in methods]], dtype=float)
        top = float(np.nanmax(counts)) if np.isfinite(counts).any() else 1.0
        axes[1].imshow(np.ma.masked_invalid(counts), cmap="Reds", vmin=0, vmax=max(1.0, 2 * top), aspect="auto")
        for j, m in enumerate(methods):
            axes[1].text(j, 0, "—" if null.get(m) is None else str(null[m]), ha="center", va="center", fontsize=8)
        axes[1].set_yticks([0], ["null pair:\nitems flagged"])
        ax.set_xticks(range(len(methods)), [])
    for a in axes:
        a.grid(False)
    axes[-1].set_xticks(range(len(methods)), methods, rotation=20, ha="right")
    fig.colorbar(im, ax=axes, fraction=0.04, pad=0.02, label=f"best flagged AUROC (✓ ≥ {threshold:g})")
    return fig
