"""The interactive latent browser's data: every latent's statistics, its top-activating held-out
contexts and the tokens its decoder promotes in each model (and, for the organism, its best decision
AUROC), written as small JavaScript files beside the run's page (``window.LATENT_BROWSER``) so a page
opened from ``file://`` loads them with plain ``<script>`` tags (``fetch`` of local JSON fails
there) and nothing comes from a CDN.

Scale: the per-latent statistics (one small index file) load with the page; contexts and promoted
tokens are split into chunks of ``chunk_size`` latents, loaded only when a latent of the chunk is
picked, so a 16,384-latent dictionary costs the reader one index file and one chunk at a time
(page weight and load time measured by ``bench/bench_browser.py``, recorded in bench/README.md).
Top contexts are found in one streaming pass (``top_windows``) without holding the [N, T, F]
activations of all latents.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from crosscoder.analysis.ground_truth import decision_table
from crosscoder.atomic import write_text_atomic
from crosscoder.analysis.latents import TokenRows, heldout_rows
from crosscoder.data.pair import ModelPair, extract_pair
from crosscoder.model import Crosscoder

ACT_LEVELS = 99
"""Context activations are stored as integers 0..ACT_LEVELS of the context's own maximum."""


class TopWindows(NamedTuple):
    rows_FK: Tensor
    """Held-out sequence of the k-th strongest context of each latent (-1 where fewer than k)."""
    pos_FK: Tensor
    """Token position of the activation maximum in that sequence."""
    vals_FK: Tensor
    """The maximum (0 where the latent fired in fewer than k sequences)."""
    acts_FKW: Tensor
    """The latent's activations on the window pos - before .. pos + after (0 outside the sequence)."""


@torch.no_grad()
def top_windows(model: Crosscoder, pair: ModelPair | None, input_ids_NT: Tensor, attention_mask_NT: Tensor, *,
                k: int = 5, before: int = 10, after: int = 4, batch: int = 8,
                rows: TokenRows | None = None) -> TopWindows:
    """For every latent, its k strongest held-out sequences (one context per sequence, at the
    sequence's maximum) and its activations around that token, in one streaming pass: equal to
    ``top_contexts(latent_acts(...), k)`` without the [N, T, F] tensor. BOS and padding count 0.

    ``rows``: the sequences' cached activations (``latents.heldout_rows``, what the page's density
    and Δnorm columns are computed from) to encode instead of running the language models (``pair``
    is then unused). The same contexts up to the cache's float16 storage: on 64 gemma3-organism
    held-out sequences, 4,063 of the L1 crosscoder's 4,096 latents kept their top-5 sequences in
    order, 99.9% of contexts their token and 93% every shown number (the maximum to 3 digits, the
    0..99 levels; the rest differ by one level or in the third digit), 48x faster than the two
    forwards per sequence."""
    model.eval()
    F, W = model.cfg.n_latents, before + 1 + after
    N, T = input_ids_NT.shape
    if rows is not None:
        batch = max(batch, 64)  # no forward to hold: bigger batches mean fewer top-k merges
        order = torch.sort(rows.seq_R, stable=True).indices
        seq_R, pos_R = rows.seq_R[order], rows.pos_R[order]
        bounds = torch.searchsorted(seq_R, torch.arange(0, N + batch, batch).clamp_max(N)).tolist()
    rows_FK = torch.full((F, 0), -1, dtype=torch.long)
    pos = torch.zeros((F, 0), dtype=torch.long)
    vals = torch.zeros((F, 0))
    wins = torch.zeros((F, 0, W))
    offs_W = torch.arange(-before, after + 1)
    for b, i in enumerate(range(0, N, batch)):
        am = attention_mask_NT[i: i + batch].long()
        B = am.shape[0]
        if rows is None:
            acts = extract_pair(pair, input_ids_NT[i: i + batch], am).float().to(model.W_dec_FSD.device)
            f_BTF = model.encode(model.normalise(acts.reshape(B * T, *acts.shape[2:]))).view(B, T, F).cpu()
        else:
            sel = order[bounds[b]: bounds[b + 1]]
            x = rows.acts_RSD[sel].to(model.W_dec_FSD.device).float()
            f_BTF = torch.zeros(B, T, F)
            f_BTF[seq_R[bounds[b]: bounds[b + 1]] - i, pos_R[bounds[b]: bounds[b + 1]]] = \
                model.encode(model.normalise(x)).cpu()
        body = am.bool().clone()
        body[:, 0] = False
        f_BTF = f_BTF * body[..., None]
        v_BF, p_BF = f_BTF.max(dim=1)
        idx_BFW = p_BF[..., None] + offs_W
        ok_BFW = (idx_BFW >= 0) & (idx_BFW < T)
        w_BFW = f_BTF.permute(0, 2, 1).gather(2, idx_BFW.clamp(0, T - 1)) * ok_BFW
        # candidates: the running top k, then this batch's sequences (ties keep the earlier sequence)
        rows_FK = torch.cat([rows_FK, (torch.arange(B) + i).expand(F, B)], 1)
        pos = torch.cat([pos, p_BF.T], 1)
        vals = torch.cat([vals, v_BF.T], 1)
        wins = torch.cat([wins, w_BFW.permute(1, 0, 2)], 1)
        kk = min(k, vals.shape[1])
        top = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :kk]
        rows_FK, pos, vals = rows_FK.gather(1, top), pos.gather(1, top), vals.gather(1, top)
        wins = wins.gather(1, top[..., None].expand(-1, -1, W))
    rows_FK = torch.where(vals > 0, rows_FK, torch.full_like(rows_FK, -1))
    return TopWindows(rows_FK, pos, vals, wins)


@torch.no_grad()
def promoted_token_ids(lm, W_dec_FD: Tensor, k: int = 8, chunk: int = 1024) -> Tensor:
    """Token ids [F, k] each decoder direction promotes most through ``lm``'s unembedding, with the
    final norm's gain applied, batched over latents (equal to ``promoted_tokens`` one by one)."""
    W_U = lm.get_output_embeddings().weight
    norm = getattr(getattr(lm, "model", lm), "norm", None)
    gain = None
    if norm is not None and hasattr(norm, "weight"):
        gain = norm.weight.float()
        if "gemma" in getattr(lm.config, "model_type", ""):
            gain = 1.0 + gain
    out = []
    for s in range(0, W_dec_FD.shape[0], chunk):
        d = W_dec_FD[s: s + chunk].to(W_U.dtype).to(W_U.device)
        if gain is not None:
            d = d * gain.to(d.dtype).to(d.device)
        out.append((d @ W_U.T).topk(k, dim=-1).indices.cpu())
    return torch.cat(out)


class BestDecision(NamedTuple):
    auroc_F: Tensor
    """Each latent's best AUROC over the decision tasks (NaN: not scored, or no task scorable)."""
    decision_F: Tensor
    """Index (into the tasks, in order) of that best decision; -1 where the AUROC is NaN."""


def best_decisions(f_NTJ: Tensor, tasks: dict, latents: Tensor, n_latents: int) -> BestDecision:
    """Every latent's best decision AUROC and which decision it is, for the browser's AUROC filter.

    ``f_NTJ``: activations of ``latents`` (e.g. the live ones) on the organism's evaluation set;
    ``tasks``: ``probes.decision_tasks(eval_set)``. Each latent is scored by
    ``ground_truth.decision_table`` (over each task's comparable positions, as the model-diff page
    does); latents not in ``latents`` get NaN / -1. Ties go to the earlier task."""
    latents = torch.as_tensor(latents, dtype=torch.long)
    _, auc_JK = decision_table(f_NTJ, tasks, latents)
    auroc_F = torch.full((n_latents,), float("nan"))
    decision_F = torch.full((n_latents,), -1, dtype=torch.long)
    if len(latents) and auc_JK.shape[1]:
        best, which = auc_JK.nan_to_num(-1.0).max(dim=1)
        scored = ~auc_JK.isnan().all(dim=1)
        auroc_F[latents[scored]] = best[scored]
        decision_F[latents[scored]] = which[scored]
    return BestDecision(auroc_F, decision_F)


def _num(x: float, digits: int = 4) -> float | None:
    """``x`` to ``digits`` significant digits (not decimals: a density of 3e-5 stays 3e-5, not 0);
    None for NaN / inf."""
    return None if x is None or not math.isfinite(x) else float(f"{float(x):.{digits}g}")


def browser_payload(model: Crosscoder, pair: ModelPair, input_ids_NT: Tensor, attention_mask_NT: Tensor,
                    classes: Sequence[str], columns_F: dict[str, Tensor], *,
                    labels_F: dict[str, tuple[Sequence[str], Tensor]] | None = None, n_contexts: int = 5,
                    before: int = 10, after: int = 4, n_promoted: int = 8, chunk_size: int = 512,
                    title: str = "", rows: TokenRows | None = None) -> tuple[dict, list[dict]]:
    """(index, chunks) of the browser for one crosscoder.

    ``classes``: Δnorm class per latent; ``columns_F``: per-latent numbers shown and filterable
    (e.g. Δnorm, decoder norms, cosine, density, ν^ε, ν^r, AUROC; NaN = not computed for that
    latent); ``labels_F``: per-latent categories shown and filterable, as (names, index per latent
    into names, -1 for none), e.g. the decision of the best decision AUROC.
    The index holds the classes, columns and labels; chunk c holds latents c*chunk_size.. with their
    contexts (token strings of the chunk's own table, activations as 0..ACT_LEVELS of the
    context's maximum) and promoted tokens per model. ``rows``: the sequences' cached activations,
    read instead of running the language models (``top_windows``)."""
    F = model.cfg.n_latents
    labels_F = labels_F or {}
    if len(classes) != F:
        raise ValueError(f"classes has {len(classes)} entries for {F} latents")
    for name, col in columns_F.items():
        if col.shape != (F,):
            raise ValueError(f"column {name!r} has shape {tuple(col.shape)}, expected ({F},)")
    for name, (label_names, of_F) in labels_F.items():
        if of_F.shape != (F,) or bool((of_F < -1).any() | (of_F >= len(label_names)).any()):
            raise ValueError(f"label {name!r} needs one index in -1..{len(label_names) - 1} per latent ({F})")
    tw = top_windows(model, pair, input_ids_NT, attention_mask_NT, k=n_contexts, before=before, after=after,
                     rows=rows)
    W = model.W_dec_FSD.detach()
    names = list(model.cfg.source_names)
    prom = {names[s]: promoted_token_ids(lm, W[:, s], n_promoted) for s, lm in enumerate(pair.models)}
    class_names = sorted(set(classes), key=lambda c: ["chat-only", "base-only", "shared", "other", "dead"].index(c)
                         if c in ("chat-only", "base-only", "shared", "other", "dead") else 9)
    index = {
        "title": title, "n_latents": F, "sources": names, "chunk_size": chunk_size, "n_chunks": -(-F // chunk_size),
        "classes": class_names, "class": [class_names.index(c) for c in classes],
        "columns": {name: [_num(v) for v in col.detach().float().cpu().tolist()] for name, col in columns_F.items()},
        "labels": {name: {"names": list(label_names), "of": of_F.tolist()}
                   for name, (label_names, of_F) in labels_F.items()},
        "window": [before, after],
    }
    # Python lists up front: indexing tensors element by element cost seconds over 4,096 latents
    ids_NT, length_N = input_ids_NT.tolist(), attention_mask_NT.long().sum(1).tolist()
    rows_FK, pos_FK, vals_FK, acts_FKW = tw.rows_FK.tolist(), tw.pos_FK.tolist(), tw.vals_FK.tolist(), tw.acts_FKW.tolist()
    prom = {m: ids.tolist() for m, ids in prom.items()}
    chunks = []
    for c in range(index["n_chunks"]):
        table: dict[int, int] = {}
        latents = {}
        for j in range(c * chunk_size, min(F, (c + 1) * chunk_size)):
            ctx = []
            for r, p, v, a_W in zip(rows_FK[j], pos_FK[j], vals_FK[j], acts_FKW[j]):
                if r < 0:
                    continue
                # the window, without BOS and padding (right-padded sequences: cut at the length)
                lo, hi = max(1, p - before), min(length_N[r], p + after + 1)
                toks = [table.setdefault(t, len(table)) for t in ids_NT[r][lo:hi]]
                a = a_W[lo - p + before: hi - p + before]
                ctx.append({"t": toks, "a": [round(ACT_LEVELS * x / v) for x in a], "c": p - lo,
                            "max": _num(v, 3), "seq": r})
            promoted = {m: [table.setdefault(t, len(table)) for t in ids[j]] for m, ids in prom.items()}
            latents[j] = {"ctx": ctx, "prom": promoted}
        strings = pair.tokenizer.convert_ids_to_tokens(list(table))
        chunks.append({"chunk": c, "tokens": [pair.tokenizer.convert_tokens_to_string([s]) for s in strings],
                       "latents": latents})
    return index, chunks


def write_browser(folder: str | Path, key: str, index: dict, chunks: list[dict]) -> dict[str, int]:
    """Write the browser's data as ``folder/index.js`` and ``folder/chunk-XXXX.js`` (each file atomic;
    the folder's earlier files are removed first). Returns the bytes of each file."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    sizes = {}
    js_key = json.dumps(key)
    text = f"window.LATENT_BROWSER = window.LATENT_BROWSER || {{}};\nLATENT_BROWSER[{js_key}] = " \
           f"{json.dumps(index, separators=(',', ':'), ensure_ascii=False)};\n"
    sizes["index.js"] = write_text_atomic(folder / "index.js", text).stat().st_size
    for ch in chunks:
        name = f"chunk-{ch['chunk']:04d}.js"
        text = f"latentBrowserChunk({js_key}, {json.dumps(ch, separators=(',', ':'), ensure_ascii=False)});\n"
        sizes[name] = write_text_atomic(folder / name, text).stat().st_size
    return sizes



def browser_html(key: str, data_url: str, static_url: str) -> str:
    """The page fragment: the browser's container, its vendored CSS/JS and its index, all by
    relative URL inside the book (``data_url`` / ``static_url`` end with "/")."""
    return (f'<link rel="stylesheet" href="{static_url}latent_browser.css">'
            f'<div class="latent-browser" data-key="{key}" data-base="{data_url}"></div>'
            f'<script src="{data_url}index.js"></script><script src="{static_url}latent_browser.js"></script>')


def build_browser(p, exp, data_dir: str | Path, data_url: str, key: str,
                  static_url: str = "../_static/latent_browser/") -> tuple[str, dict[str, int]]:
    """The browser of crosscoder ``p.crosscoder`` for a notebook run: statistics on the held-out
    activations (Δnorm class, decoder norms, cosine, density; ν^ε / ν^r of the chat-only latents
    Latent Scaling fits), contexts from the held-out sequences; with an organism (planted ground
    truth), each live latent's best decision AUROC on its evaluation set and which decision it is
    (``best_decisions``). Hub pairs have no decision labels: no AUROC column, no decision label.

    The data goes to ``data_dir`` (its earlier files removed), which the page reads at ``data_url``
    under ``key``; in the book that is the run's own folder (``report.publish``: copied beside the
    run's page, so a build holds only its own profile's data), the script and CSS are the vendored
    ones at ``static_url``. Returns the page fragment and the bytes of each data file."""
    from crosscoder import experiment, organism
    from crosscoder.analysis import diff
    from crosscoder.analysis.metrics import evaluate
    from crosscoder.analysis.probes import decision_tasks

    pair = experiment.model_pair(exp)
    cache = experiment.activation_cache(exp, pair=pair)
    splits = experiment.load_splits(cache)
    model = experiment.load_crosscoders(p.artifacts_dir, [p.crosscoder])[p.crosscoder]
    ev, info = evaluate(model, splits.heldout), diff.diff_info(model, splits.heldout)
    ls = diff.chat_only_scaling(p.crosscoder, model, info, splits.heldout, nu_threshold=0.3, min_active_tokens=5).scaling
    nan = torch.full((model.cfg.n_latents,), float("nan"))
    nu_e, nu_r = nan.clone(), nan.clone()
    nu_e[ls.latents], nu_r[ls.latents] = ls.nu_error.float(), ls.nu_recon.float()
    g = info.geo
    cols = {"Δnorm": g.delta_norm_F, "‖d_base‖": g.norm_base_F, "‖d_chat‖": g.norm_chat_F, "cosine": g.cosine_F,
            "density": ev.freq_F, "ν^ε": nu_e, "ν^r": nu_r}
    labels = {}
    if exp.organism is not None:
        es = organism.load_eval_set(exp.organism.eval_set)
        tasks, live = decision_tasks(es), torch.nonzero(info.alive_F).squeeze(1)
        best = best_decisions(diff.live_latent_acts(model, pair, es, info), tasks, live, model.cfg.n_latents)
        cols["AUROC"] = best.auroc_F
        labels["decision"] = ([t.removesuffix("_decision") for t in tasks], best.decision_F)
    held = cache.heldout_sequences()
    index, chunks = browser_payload(model, pair, held.input_ids_NT, held.attention_mask_NT, info.by_delta_norm, cols,
                                    labels_F=labels, n_contexts=p.n_contexts, title=key, rows=heldout_rows(cache))
    sizes = write_browser(data_dir, key, index, chunks)
    return browser_html(key, data_url, static_url), sizes
