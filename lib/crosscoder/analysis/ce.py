"""Downstream fidelity: CE loss recovered when the crosscoder's reconstruction replaces the residual
stream of each model, with zero- and mean-ablation baselines and the KL to the clean distribution.

    CE recovered_s = (CE_zero - CE_splice) / (CE_zero - CE_clean)

Two definitions of which positions are ablated and scored (``definition=``):

* ``"ours"`` (default): the residual after block L is replaced at every position except BOS (which
  the crosscoder is never trained on) in the splice AND in the zero / mean ablations, and
  next-token losses are averaged over the predictions made from those positions, so the
  BOS-position prediction (unchanged by any splice) does not dilute the numbers.
* ``"kissane"``: as in Kissane et al.'s public code (``get_ce_recovered_metrics``): the splice
  replaces every position but BOS, the zero ablation zeroes EVERY position including BOS, and the
  loss is the mean over all next-token predictions of the sequence (TransformerLens
  ``return_type="loss"``; padding excluded here). Zeroing BOS makes the zero baseline much worse,
  so the recovered fraction is higher than ours for the same reconstruction. Use it only to
  compare with the published number. The mean ablation keeps BOS clean in both definitions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F_nn
from torch import Tensor

from crosscoder.data.pair import residual_hook
from crosscoder.model import Crosscoder

CE_DEFINITIONS = ("ours", "kissane")
"""Valid ``definition`` values of ``ce_recovered``."""


def _head(lm):
    """h [M, D] after the final norm -> logits [M, V] in float32, as the LM's own forward makes them
    (its unembedding, then Gemma 2's logit soft-capping where the config has it)."""
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None)

    def logits(h_MD: Tensor) -> Tensor:
        z = head(h_MD).float()
        return torch.tanh(z / cap) * cap if cap else z
    return logits


def _final_hidden(lm, ids_BT: Tensor, am_BT: Tensor) -> Tensor:
    """The last hidden state (after the final norm) of every position: what the unembedding reads."""
    return lm.model(input_ids=ids_BT, attention_mask=am_BT.long()).last_hidden_state


def _scores(lm, hidden: dict[str, Tensor], ids_BT: Tensor, mask_BT: Tensor, chunk: int,
            kl_of: Sequence[str]) -> dict[str, Tensor]:
    """Summed next-token CE of each entry of ``hidden`` ({"clean": h, variant: h}, [B, T, D] each) and
    the summed KL(clean || variant) of the variants ``kl_of`` (``kl_<variant>``), over the predictions
    made from positions where ``mask`` is True
    (and the next token is real), projecting ``chunk`` positions at a time: a 262k vocabulary makes
    one batch's full logits ~1 GB per copy, and a variant needs several."""
    m_BT = mask_BT[:, :-1] & mask_BT[:, 1:]
    y_M = ids_BT[:, 1:][m_BT]
    h = {k: v[:, :-1][m_BT] for k, v in hidden.items()}  # [M, D]
    logits = _head(lm)
    out = {k: torch.zeros((), dtype=torch.float64, device=ids_BT.device) for k in hidden}
    out.update({f"kl_{k}": torch.zeros_like(out["clean"]) for k in kl_of})
    for i in range(0, y_M.shape[0], chunk):
        y = y_M[i:i + chunk, None]
        p = F_nn.log_softmax(logits(h["clean"][i:i + chunk]), dim=-1)
        p_exp = p.exp()
        out["clean"] -= p.gather(-1, y).sum().double()
        for k in hidden:
            if k != "clean":
                q = F_nn.log_softmax(logits(h[k][i:i + chunk]), dim=-1)
                out[k] -= q.gather(-1, y).sum().double()
                if k in kl_of:
                    out[f"kl_{k}"] += (p_exp * (p - q)).sum().double()
    out["n"] = m_BT.sum().double()
    return out


@torch.no_grad()
def ce_recovered(
    lms: Sequence,
    crosscoder: Crosscoder,
    input_ids_NT: Tensor,
    layer: int,
    *,
    attention_mask_NT: Tensor | None = None,
    mean_raw_SD: Tensor | None = None,
    batch_size: int = 8,
    source_names: Sequence[str] | None = None,
    definition: str = "ours",
    position_chunk: int = 256,
) -> dict[str, dict[str, float]]:
    """CE recovered per model (``lms[s]`` is source s of the crosscoder) on held-out sequences.

    ``definition``: "ours" or "kissane" (module docstring).

    ``mean_raw_SD``: mean activation per source for the mean-ablation baseline (estimated on other
    data); omitted, the batch mean of non-BOS positions is used. ``position_chunk`` positions are
    projected through the unembedding at a time (the full logits are never held).
    Returns {source: {ce_clean, ce_splice, ce_zero, ce_mean, ce_recovered, ce_recovered_vs_mean,
    kl_splice, kl_zero, n_predictions}}.
    """
    if definition not in CE_DEFINITIONS:
        raise ValueError(f"definition must be one of {CE_DEFINITIONS}, got {definition!r}")
    kissane = definition == "kissane"
    S = crosscoder.cfg.n_sources
    if len(lms) != S:
        raise ValueError(f"got {len(lms)} language models for a {S}-source crosscoder")
    names = list(source_names or crosscoder.cfg.source_names)
    dev = next(lms[0].parameters()).device
    cc_dev = crosscoder.W_dec_FSD.device  # may differ from the LMs' (e.g. LMs on GPU, crosscoder on CPU)
    sums = {n: {k: torch.zeros((), dtype=torch.float64, device=dev) for k in
                ("clean", "splice", "zero", "mean", "kl_splice", "kl_zero", "n")} for n in names}
    was = crosscoder.training
    crosscoder.eval()
    for start in range(0, input_ids_NT.shape[0], batch_size):
        ids = input_ids_NT[start : start + batch_size].to(dev)
        am = (attention_mask_NT[start : start + batch_size].to(dev).bool()
              if attention_mask_NT is not None else torch.ones_like(ids, dtype=torch.bool))
        B, T = ids.shape
        clean_hidden, acts = [], []
        for lm in lms:
            cap: list[Tensor] = []
            with residual_hook(lm, layer, capture=cap):
                clean_hidden.append(_final_hidden(lm, ids, am))
            acts.append(cap[0].float())
        acts_BTSD = torch.stack(acts, dim=2)
        body = am.clone()
        body[:, 0] = False  # BOS (and padding) keep their clean residual
        x = acts_BTSD[body]  # [n, S, D] raw
        recon = crosscoder.denormalise(crosscoder(crosscoder.normalise(x.to(cc_dev))).recon_BSD).to(dev)
        # positions whose predictions are scored, and those the zero ablation replaces
        scored = am if kissane else body
        zeroed = am if kissane else body
        for s, (lm, name) in enumerate(zip(lms, names)):
            base_resid = acts_BTSD[:, :, s]
            mean_D = mean_raw_SD[s].to(dev).float() if mean_raw_SD is not None else x[:, s].mean(0)
            hidden = {"clean": clean_hidden[s]}
            for kind, where, values in (("splice", body, recon[:, s]), ("zero", zeroed, 0.0),
                                        ("mean", body, mean_D.expand_as(recon[:, s]))):
                resid = base_resid.clone()
                resid[where] = values
                with residual_hook(lm, layer, replace=resid):
                    hidden[kind] = _final_hidden(lm, ids, am)
            got = _scores(lm, hidden, ids, scored, position_chunk, kl_of=("splice", "zero"))
            acc = sums[name]
            for k in ("clean", "splice", "zero", "mean", "kl_splice", "kl_zero", "n"):
                acc[k] += got[k]
    crosscoder.train(was)
    out = {}
    for name, acc in sums.items():
        n = float(acc["n"])
        if n == 0:
            raise ValueError("no predictions to score: sequences need at least 3 non-pad tokens")
        r = {f"ce_{k}": float(acc[k]) / n for k in ("clean", "splice", "zero", "mean")}
        r["ce_recovered"] = (r["ce_zero"] - r["ce_splice"]) / (r["ce_zero"] - r["ce_clean"])
        r["ce_recovered_vs_mean"] = (r["ce_mean"] - r["ce_splice"]) / (r["ce_mean"] - r["ce_clean"])
        r["kl_splice"] = float(acc["kl_splice"]) / n
        r["kl_zero"] = float(acc["kl_zero"]) / n
        r["n_predictions"] = int(n)
        out[name] = r
    return out
