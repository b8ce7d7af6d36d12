"""The scoreboard (``analysis.scoreboard``): best flagged AUROC and precision against a naive per-item loop
(sklearn's AUROC), an unflagged detector never counts, the row bootstrap against a naive resampling,
seed agreement on duplicated vs independent items, the recommendation's sentence from planted rows, clear
errors, and end to end on two methods fitted on the synthetic planted dictionary."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from sklearn.metrics import roc_auc_score

from crosscoder import methods
from crosscoder.analysis.probes import ProbeTask
from crosscoder.analysis.scoreboard import (Flags, ItemScores, ScoreRow, bootstrap_best, bootstrap_rows, eval_scores,
                                            flagged_auroc, rank, recommendation, score_method, seed_agreement, table)
from crosscoder.config import ConfigError, TrainConfig
from crosscoder.methods import Cost, MethodData
from crosscoder.synthetic import SyntheticConfig, sample

warnings.filterwarnings("ignore", message=".*Sparse.*")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_case(seed: int = 0, N: int = 30, T: int = 12, J: int = 20):
    """Sparse, tied scores (rounded, half zeros), a padding mask, three tasks with eligible subsets, and one
    item that leans towards task "b" so that some flagged items match."""
    g = torch.Generator().manual_seed(seed)
    s = torch.relu(torch.randn(N, T, J, generator=g)).mul(4).round() / 4
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[:, T - 3:] = torch.rand(N, 3, generator=g) < 0.3  # ragged padding
    tasks = {}
    for name, p in (("a", 1.0), ("b", 0.5), ("c", 0.2)):
        elig = torch.rand(N, T, generator=g) < p
        tasks[name] = ProbeTask(elig & (torch.rand(N, T, generator=g) < 0.25), elig)
    s[..., 4] += 1.5 * tasks["b"].label_NT
    return s, mask, tasks


def _naive(s_NTJ, mask, tasks, flagged, items, match):
    """Per flagged item and task, sklearn's AUROC over eligible non-pad positions, in plain Python."""
    col = {j: c for c, j in enumerate(items)}
    best, item, per_item = {}, {}, {j: [] for j in flagged}
    for name, t in tasks.items():
        elig = t.eligible_NT & mask
        y = t.label_NT[elig].numpy()
        for j in flagged:
            a = roc_auc_score(y, s_NTJ[..., col[j]][elig].numpy())
            per_item[j].append(a)
            if name not in best or a > best[name]:
                best[name], item[name] = a, j
    matched = sum(max(v) >= match for v in per_item.values())
    return best, item, matched


def test_best_flagged_auroc_and_precision_equal_a_naive_loop():
    s, mask, tasks = _random_case()
    items = torch.randperm(20, generator=torch.Generator().manual_seed(3)) + 100  # column c holds item items[c]
    flagged = [int(items[4]), int(items[7]), int(items[0]), int(items[13])]
    res = score_method("m", Flags(torch.tensor(flagged)), s, tasks, mask, items_J=items, match=0.6, n_boot=20)
    best, item, matched = _naive(s, mask, tasks, flagged, items.tolist(), 0.6)
    for b in res.behaviours:
        assert b.best_auroc == pytest.approx(best[b.behaviour], abs=1e-6)
        assert b.best_item == item[b.behaviour]
        elig = tasks[b.behaviour].eligible_NT & mask
        assert (b.positives, b.eligible) == (int(tasks[b.behaviour].label_NT[elig].sum()), int(elig.sum()))
    assert 0 < matched < len(flagged)  # the case exercises both outcomes
    assert res.row.n_matched == matched and res.row.n_flagged == 4
    assert res.row.precision == pytest.approx(matched / 4)
    assert res.row.recovered == tuple(k for k, v in best.items() if v >= 0.9)
    assert res.auroc_JK.shape == (4, 3)


def test_an_unflagged_detector_does_not_count():
    s, mask, tasks = _random_case(1)
    tasks = {"A": tasks["a"], "B": tasks["b"]}
    s[..., 2] = tasks["A"].label_NT.float()  # flagged, perfect for A
    s[..., 5] = tasks["B"].label_NT.float()  # perfect for B, not flagged
    res = score_method("m", Flags(torch.tensor([2, 9, 11])), s, tasks, mask, n_boot=50)
    a, b = res.behaviours
    assert (a.best_auroc, a.best_item, a.recovered) == (1.0, 2, True)
    assert not b.recovered and b.best_auroc < 0.9 and b.best_item != 5
    assert res.row.recovered == ("A",) and res.row.behaviours_recovered == 1
    # the same scores with item 5 flagged recover B
    assert score_method("m", Flags(torch.tensor([2, 5])), s, tasks, mask, n_boot=0).row.behaviours_recovered == 2


def test_nothing_flagged_gives_undefined_precision():
    s, mask, tasks = _random_case(2)
    res = score_method("m", Flags(torch.zeros(0, dtype=torch.long)), s, tasks, mask, null=0)
    assert math.isnan(res.row.precision) and res.row.n_flagged == 0 and res.row.behaviours_recovered == 0
    assert all(math.isnan(b.best_auroc) and b.best_item == -1 and math.isnan(b.ci_low) for b in res.behaviours)
    assert table([res.row])[0]["recovered"] == "" and math.isnan(table([res.row])[0]["precision"])


def test_bootstrap_equals_a_naive_resampling_of_rows():
    s, mask, tasks = _random_case(3)
    flagged = torch.tensor([4, 1, 8, 17])
    boot = bootstrap_best(s, flagged, tasks, mask, n_boot=6, seed=5, top=None)
    for b, rows in enumerate(bootstrap_rows(s.shape[0], 6, seed=5)):
        for k, t in enumerate(tasks.values()):
            elig = (t.eligible_NT & mask)[rows]  # the resampled rows, duplicates kept
            y = t.label_NT[rows][elig].numpy()
            want = max(roc_auc_score(y, s[rows][..., j][elig].numpy()) for j in flagged.tolist())
            assert float(boot[b, k]) == pytest.approx(want, abs=1e-6)
    # top >= the flagged count changes nothing; a smaller top gives a lower bound
    assert torch.equal(bootstrap_best(s, flagged, tasks, mask, n_boot=6, seed=5, top=4), boot)
    assert (bootstrap_best(s, flagged, tasks, mask, n_boot=6, seed=5, top=1) <= boot + 1e-7).all()


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    g = torch.Generator().manual_seed(7)
    N, T = 60, 20
    label = torch.rand(N, T, generator=g) < 0.2
    tasks = {"x": ProbeTask(label, torch.ones(N, T, dtype=torch.bool))}
    s = (label.float() + 0.9 * torch.randn(N, T, generator=g))[..., None]  # a noisy detector, AUROC ~0.8
    s = torch.cat([s, torch.randn(N, T, 3, generator=g)], -1)
    one = score_method("m", Flags(torch.arange(4)), s, tasks, n_boot=300, seed=1).behaviours[0]
    assert 0.7 < one.best_auroc < 0.9 and one.best_item == 0
    assert one.ci_low < one.best_auroc < one.ci_high and one.ci_high - one.ci_low < 0.2
    again = score_method("m", Flags(torch.arange(4)), s, tasks, n_boot=300, seed=1).behaviours[0]
    other = score_method("m", Flags(torch.arange(4)), s, tasks, n_boot=300, seed=2).behaviours[0]
    assert (again.ci_low, again.ci_high) == (one.ci_low, one.ci_high)
    assert (other.ci_low, other.ci_high) != (one.ci_low, one.ci_high)
    assert one.recovered_share < 0.5


def test_seed_agreement_on_duplicates_and_on_independent_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(2000, 6, generator=g))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    b = torch.cat([2.0 * a[:, perm] + 0.01 * torch.randn(2000, 6, generator=g), torch.randn(2000, 3, generator=g)], 1)
    dup = seed_agreement(a, b)
    assert dup.agreement == 1.0
    assert dup.best_match_J.tolist() == perm.argsort().tolist()  # each item found at its own column
    indep = seed_agreement(a, torch.relu(torch.randn(2000, 8, generator=g)))
    assert indep.agreement == 0.0 and float(indep.best_corr_J.max()) < 0.15
    # a dead (constant) item matches nothing; an empty side is said plainly
    dead = seed_agreement(torch.cat([a[:, :2], torch.zeros(2000, 1)], 1), a[:, :2])
    assert dead.agreement == pytest.approx(2 / 3) and math.isnan(float(dead.best_corr_J[2]))
    assert dead.best_match_J[2] == -1
    assert math.isnan(seed_agreement(a[:, :0], a).agreement) and seed_agreement(a, a[:, :0]).agreement == 0.0


def _row(method, rec, n=3, precision=1.0, n_flagged=4, fp=0, names=None):
    matched = 0 if math.isnan(precision) else round(precision * n_flagged)
    names = names or tuple("abcdef"[:rec])
    return ScoreRow(method, rec, n, names, rec, precision, matched, n_flagged, fp, math.nan, 1.0, None, 0.9, 0.8)


def test_recommendation_names_a_clear_winner_with_its_numbers():
    rows = [_row("adl", 1, precision=1.0, n_flagged=2, fp=0), _row("dfc", 3, precision=0.75, n_flagged=4, fp=1),
            _row("diff_sae", 3, precision=0.5, n_flagged=8, fp=0)]
    assert [r.method for r in rank(rows)] == ["dfc", "diff_sae", "adl"]
    text = recommendation(rows)
    assert text.startswith("dfc recovers all 3 behaviours (best flagged AUROC ≥ 0.9) with precision 0.75 (3 of 4 "
                           "flagged items match a behaviour at AUROC ≥ 0.8), 1 item flagged on the null pair.")
    assert "No method recovers all" not in text and "tie" not in text
    # the trade-offs the ranking hides are said, with their numbers
    assert "diff_sae has fewer null false positives (0) but recovers 3 of 3." in text
    assert "adl has higher precision (1.00) and fewer null false positives (0) but recovers 1 of 3." in text
    assert [d["method"] for d in table(rows)] == ["dfc", "diff_sae", "adl"]


def test_recommendation_says_when_methods_tie():
    rows = [_row("l1", 2, precision=0.5, n_flagged=6, fp=2, names=("a", "c")),
            _row("batchtopk", 2, precision=0.5, n_flagged=6, fp=2, names=("b", "c")), _row("adl", 0, fp=None)]
    text = recommendation(rows)
    assert text.startswith("l1 and batchtopk tie: each recovers 2 of 3 behaviours (a, c) (best flagged AUROC ≥ 0.9).")
    assert "l1: precision 0.50 (3 of 6 flagged items match a behaviour at AUROC ≥ 0.8), 2 items flagged on the " \
           "null pair." in text
    assert "batchtopk: precision 0.50" in text and "No method recovers all 3 behaviours." in text


def test_recommendation_when_nobody_recovers_everything_or_anything():
    rows = [_row("a", 2, n=5, precision=0.25, n_flagged=8, fp=None), _row("b", 1, n=5, precision=float("nan"),
                                                                           n_flagged=0, fp=0)]
    text = recommendation(rows)
    assert text.startswith("a recovers 2 of 5 behaviours (a, b)") and "precision 0.25 (2 of 8" in text
    assert "false positives on the null pair not measured" in text and "No method recovers all 5 behaviours." in text
    assert "b has fewer null false positives (0) but recovers 1 of 5." in text
    none = recommendation([_row("a", 0, n=4), _row("b", 0, n=4)])
    assert none == ("No method recovers any of the 4 planted behaviours (no flagged item reaches AUROC ≥ 0.9); "
                    "the scoreboard recommends none.")
    with pytest.raises(ConfigError, match="at least one ScoreRow"):
        recommendation([])


def test_bad_input_fails_clearly():
    s, mask, tasks = _random_case(4)
    f = Flags(torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match=r"scores_NTJ must be \[rows, tokens, items\]"):
        score_method("m", f, s.reshape(-1, 20), tasks, mask)
    with pytest.raises(ConfigError, match="pass the evaluation set's attention mask"):
        score_method("m", f, s, tasks, mask[:, :5])
    with pytest.raises(ConfigError, match="build the tasks and the scores from the same evaluation set"):
        score_method("m", f, s, {"a": ProbeTask(tasks["a"].label_NT[:5], tasks["a"].eligible_NT[:5])}, mask)
    empty = ProbeTask(torch.zeros_like(mask), tasks["a"].eligible_NT)
    with pytest.raises(ConfigError, match="task 'gone' has 0 positive .* drop the task or use an evaluation set"):
        score_method("m", f, s, {**tasks, "gone": empty}, mask)
    with pytest.raises(ConfigError, match=r"flagged items \[40\] have no column in scores_NTJ"):
        score_method("m", Flags(torch.tensor([1, 40])), s, tasks, mask)
    with pytest.raises(ConfigError, match="holds NaN"):
        score_method("m", f, s.masked_fill(torch.rand(s.shape) < 0.01, float("nan")), tasks)
    with pytest.raises(ConfigError, match="no behaviour tasks"):
        score_method("m", f, s, {}, mask)
    with pytest.raises(ConfigError, match="null must be the method fitted on the null pair"):
        score_method("m", f, s, tasks, mask, null="3")
    with pytest.raises(ConfigError, match="ItemScores carries its own"):
        score_method("m", f, ItemScores(s, torch.arange(20)), tasks, mask, items_J=torch.arange(20))
    with pytest.raises(ConfigError, match="same tokens"):
        seed_agreement(s[0], s[1, :5])


# ---------------------------------------------------------------------------- end to end on planted atoms
TOY = SyntheticConfig(d_model=16, n_shared=24, n_base_only=4, n_chat_only=4, seed=1)
NULL = SyntheticConfig(d_model=16, n_shared=24, n_base_only=0, n_chat_only=0, shared_cosine=1.0, seed=1)
STEPS = 300


def _cfg(name: str, seed: int = 0):
    train = TrainConfig(n_steps=STEPS, batch_size=256, lr=1e-2, l1_coeff=0.5, log_every=STEPS, eval_every=STEPS,
                        auxk_dead_tokens=5000, seed=seed)
    C = methods.get(name).Config
    if name == "dfc":
        return C(n_latents=48, k=3, train=train, base_exclusive_frac=0.25, chat_exclusive_frac=0.25)
    return C(n_latents=64, k=3, train=train)


def test_end_to_end_on_the_synthetic_planted_dictionary(tmp_path):
    """DFC and the diff-SAE on the planted dictionary: each chat-only atom is a behaviour (its token labels:
    the atom is active), each base-only atom a control that flagged chat-specific items must not recover.
    Held-out tokens are cut into 40 "rows" of 100 for the bootstrap."""
    tr, ho, nm = sample(TOY, 16384), sample(TOY, 4000, seed_offset=1), sample(TOY, 2000, seed_offset=2)
    data = MethodData(tr.acts_NSD, ho.acts_NSD, nm.acts_NSD)
    N, T = 40, 100
    acts_NTSD = ho.acts_NSD.reshape(N, T, 2, -1)
    mask = torch.ones(N, T, dtype=torch.bool)
    everywhere = torch.ones(N, T, dtype=torch.bool)
    chat = [a for a, k in enumerate(ho.kinds) if k == "chat-only"]
    base = [a for a, k in enumerate(ho.kinds) if k == "base-only"][:2]
    tasks = {f"{kind}{a}": ProbeTask((ho.codes_NA[:, a] > 0).reshape(N, T), everywhere)
             for kind, atoms in (("chat", chat), ("base", base)) for a in atoms}
    pad = torch.rand(N, T, generator=torch.Generator().manual_seed(0)) < 0.8
    scores_all = lambda fit: fit.scores(ho.acts_NSD)[:, [0, 5]].reshape(N, T, 2)  # noqa: E731
    null_data = MethodData(sample(NULL, 16384).acts_NSD, sample(NULL, 4000, seed_offset=1).acts_NSD,
                           sample(NULL, 2000, seed_offset=2).acts_NSD)

    results = {}
    for name in ("dfc", "diff_sae"):
        fit = methods.fit(name, data, tmp_path / name, _cfg(name))
        scores = eval_scores(fit, acts_NTSD, mask)
        assert scores.scores_NTJ.shape == (N, T, len(fit.flagged_J)) and torch.equal(scores.items_J, fit.flagged_J)
        assert torch.allclose(scores.scores_NTJ.reshape(N * T, -1), fit.scores(ho.acts_NSD)[:, fit.flagged_J])
        padded = eval_scores(fit, acts_NTSD, pad, items_J=[0, 5])  # padding is not scored: 0 there
        assert (padded.scores_NTJ[~pad] == 0).all() and torch.allclose(padded.scores_NTJ[pad], scores_all(fit)[pad])
        extra = {}
        if name == "dfc":
            extra["null"] = methods.fit(name, null_data, tmp_path / "null", _cfg(name))
        else:  # a second seed: its flagged items' held-out scores against the first seed's
            fit2 = methods.fit(name, data, tmp_path / "seed2", _cfg(name, seed=2))
            extra["seed_agreement"] = seed_agreement(scores.scores_NTJ[mask],
                                                     eval_scores(fit2, acts_NTSD, mask).scores_NTJ[mask])
            extra["null"] = 3
        results[name] = res = score_method(name, fit, scores, tasks, mask, n_boot=200, **extra)
        row = res.row
        assert row.recovered == tuple(f"chat{a}" for a in chat), res.behaviours  # every planted atom, no control
        assert all(b.ci_low >= 0.85 for b in res.behaviours[:4])
        assert row.n_flagged == len(fit.flagged_J) and row.precision >= 0.5
        assert row.train_seconds == fit.cost.train_seconds and row.peak_memory_bytes == fit.cost.peak_memory_bytes
        if name == "dfc":
            assert row.null_false_positives == len(extra["null"].flagged_J)
        else:
            # short fits: some flagged items are seed-specific, but the seeds share some
            assert row.null_false_positives == 3 and row.seed_agreement == extra["seed_agreement"].agreement > 0
    rows = [r.row for r in results.values()]
    text = recommendation(rows)
    top = rank(rows)[0]
    assert top.method in text and f"{top.behaviours_recovered} of 6 behaviours" in text
    assert f"precision {top.precision:.2f} ({top.n_matched} of {top.n_flagged}" in text
