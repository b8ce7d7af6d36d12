"""Numbers published by the work this project replicates, each with the definition it uses and
where exactly it is published. The book quotes them from here (never as ours), next to our numbers
computed with the same definition where one exists.

Only numbers with a precise source belong here. Removed: Δnorm class counts of Kissane et al.'s
crosscoder (265 / 98 / 14,652 / 1,369) once attributed to Minder et al.; no table or figure of that
paper could be found for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from crosscoder.config import ConfigError

KISSANE_POST = ("Kissane, Krzyzanowski, Conmy, Nanda (2024), \"Open Source Replication of Anthropic's "
                "Crosscoder paper for model-diffing\", LessWrong / Alignment Forum post "
                "(lesswrong.com/posts/srt6JXsRMtmqAJavD)")


@dataclass(frozen=True)
class PublishedNumber:
    """One published number, quoted as published."""

    key: str
    """Stable identifier the notebooks look entries up by."""
    quantity: str
    """What was measured, in words (a table row label)."""
    value: str
    """The value exactly as published (a string: "≈ 81", not a float we might re-round)."""
    definition: str
    """How the publication computes it, and how that differs from our definition."""
    source: str
    """Where it is published: work, and section / table / figure or repository file."""
    about: str
    """Which model the number describes (e.g. the published Gemma-2-2B L1 crosscoder)."""
    ours: str = ""
    """How to compute our number with the same definition ("" when no same-definition number
    exists); names the library function and its arguments."""

    def __post_init__(self) -> None:
        for name in ("key", "quantity", "value", "definition", "source", "about"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"published number {self.key!r}: field {name!r} must not be empty")


_KISSANE_CC = "Kissane et al.'s L1 crosscoder, Gemma-2-2B / -it, layer 13 residual, 16,384 latents"

PUBLISHED: tuple[PublishedNumber, ...] = (
    PublishedNumber(
        key="kissane_l0",
        quantity="L0 (active latents per token)",
        value="≈ 81",
        definition="mean number of active latents per token, averaged over their evaluation batches "
                   "(same quantity as our L0; theirs is not on a held-out split)",
        source=f"{KISSANE_POST}, TLDR, bullet on standard SAE-style evals",
        about=_KISSANE_CC,
        ours="crosscoder.analysis.metrics.evaluate(model, heldout).l0",
    ),
    PublishedNumber(
        key="kissane_explained_variance",
        quantity="explained variance",
        value="≈ 77%",
        definition="per-token ratio 1 - ||x - x̂||² / ||x - mean||² averaged over a training batch "
                   "(biased; not 1 - FVU). Ours is 1 - FVU_s, a ratio of sums per model over "
                   "held-out tokens; the two are not interchangeable",
        source=f"{KISSANE_POST}, TLDR, bullet on standard SAE-style evals",
        about=_KISSANE_CC,
        ours="",
    ),
    PublishedNumber(
        key="kissane_ce_recovered",
        quantity="CE loss recovered",
        value="≈ 96%",
        definition="(CE_zero - CE_splice) / (CE_zero - CE_clean) with the reconstruction spliced in "
                   "at every position but BOS, the zero ablation applied to EVERY position "
                   "including BOS, and the loss averaged over all next-token predictions "
                   "(the replication's get_ce_recovered_metrics)",
        source=f"{KISSANE_POST}, TLDR, bullet on standard SAE-style evals",
        about=_KISSANE_CC,
        ours="crosscoder.analysis.ce.ce_recovered(lms, model, ids, layer, definition=\"kissane\")"
             "[source][\"ce_recovered\"]",
    ),
)
"""Every published number the book quotes."""


def published(key: str) -> PublishedNumber:
    """The entry with ``key``; a clear error lists the valid keys."""
    for entry in PUBLISHED:
        if entry.key == key:
            return entry
    raise KeyError(f"no published number {key!r}; known: {[e.key for e in PUBLISHED]}")


def published_table() -> list[dict[str, str]]:
    """PUBLISHED as rows (quantity, value, definition, source, about, ours) for a DataFrame."""
    return [{"key": e.key, "quantity": e.quantity, "published value": e.value,
             "definition": e.definition, "source": e.source, "about": e.about,
             "ours (same definition)": e.ours} for e in PUBLISHED]


def ours_same_definition(key: str, metrics: dict) -> str:
    """Our number for published entry ``key``, from a crosscoder's metrics.json, computed with the
    published definition; where no same-definition number exists, says so and gives ours with its
    own definition named."""
    h, ce_k = metrics.get("heldout", {}), metrics.get("ce_kissane", {})
    if key == "kissane_l0":
        return f"{h['l0']:.1f} (held-out)" if "l0" in h else "not run"
    if key == "kissane_explained_variance":
        if "explained_variance_base" not in h:
            return "not run"
        return (f"not computed with their definition; ours (1 − FVU, held-out): "
                f"{100 * h['explained_variance_base']:.1f}% base / {100 * h['explained_variance_chat']:.1f}% chat")
    if key == "kissane_ce_recovered":
        if not ce_k:
            return "not run"
        return f"{100 * ce_k['base']['ce_recovered']:.1f}% base / {100 * ce_k['chat']['ce_recovered']:.1f}% chat"
    raise KeyError(f"no rule for our value of {key!r}")


def comparison_table(metrics_by_run: dict[str, dict]) -> list[dict[str, str]]:
    """One row per published number: the quantity, the published value and where it is, and our
    same-definition value for each run (name -> its metrics.json)."""
    return [{"quantity": e.quantity, "published": e.value, "source": e.source, "about": e.about,
             **{f"ours: {run}": ours_same_definition(e.key, m) for run, m in metrics_by_run.items()}}
            for e in PUBLISHED]


def diff_table(metrics_by_run: dict[str, dict]) -> list[dict[str, object]]:
    """Our model-diff results per run (name -> its metrics.json, as notebook 05 wrote them): the
    quantities Minder et al.'s argument is about (chat-only by decoder norm, how many Latent Scaling
    confirms, the share it places in the base model) and, on the organism, the planted decisions
    recovered. Missing entries (a run without the model-diff page) are left empty."""
    rows = []
    for run, m in metrics_by_run.items():
        ls, dec = m.get("latent_scaling", {}), m.get("decisions", {})
        rows.append({"run": run, "chat-only (Δnorm > 0.9)": ls.get("chat-only (Δnorm)"),
                     "confirmed by Latent Scaling": ls.get("truly chat-specific"),
                     "share placed in base": ls.get("share in base (ν ≥ threshold)"),
                     "decisions recovered (confirmed / any live)":
                         f"{dec['confirmed: behaviours recovered']} / {dec['any live: behaviours recovered']} "
                         f"of {dec['behaviours']}" if "behaviours" in dec else None})
    return rows
