"""The scoreboard (``analysis.scoreboard``): best flagged AUROC and precision against a naive per-item loop
(sklearn's AUROC), an unflagged detector never counts, the row bootstrap against a naive resampling,
seed agreement on duplicated vs independent items, the recommendation's sentence from planted rows, clear
errors, and end to end on two methods fitted on the synthetic planted dictionary."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from fakes import StandInMethod
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


# ---------------------------------------------------------------------------- cuts chosen on validation data
def test_choose_cut_equals_a_brute_force_over_every_cut():
    """``choose_cut`` against every distinct cut tried in plain Python: the cut that recovers the most, then
    at the highest precision, then flags the fewest."""
    from crosscoder.analysis.scoreboard import choose_cut

    for trial in range(30):
        g = torch.Generator().manual_seed(trial)
        C, K = int(torch.randint(1, 12, (1,), generator=g)), 3
        stat = (torch.rand(C, generator=g) * 4).round().sort(descending=True).values  # ties
        auc = 0.5 + 0.5 * torch.rand(C, K, generator=g)
        best = None
        for t in sorted(set(stat.tolist()), reverse=True):
            sel = stat >= t
            n = int(sel.sum())
            rec = int((auc[sel].max(0).values >= 0.9).sum())
            prec = float((auc[sel].max(1).values >= 0.8).float().sum()) / n
            if best is None or (rec, prec) > (best[1], best[2]):
                best = (n, rec, prec)
        got = choose_cut(stat, auc)
        if best[1] == 0 and best[2] == 0:
            assert got is None
        else:
            assert got[0] == best[0] and got[1] == best[1] and got[2] == pytest.approx(best[2])
    assert choose_cut(torch.zeros(0), torch.zeros(0, 2)) is None


def _positional_rows(n_docs: int, seed_offset: int, plant: bool = True):
    """Documents of 8 tokens from a shared-only planted dictionary where the chat model adds one direction v
    at position 2 of 90% of documents: rows [n_docs, 8, 2, 16] with a label task (v added) per row, and
    the flat MethodData of the same tokens with their positions."""
    from crosscoder.analysis.scoreboard_run import EvalRows

    T = 8
    d = sample(SyntheticConfig(d_model=16, n_shared=24, n_base_only=0, n_chat_only=0, seed=1), n_docs * T,
               seed_offset=seed_offset)
    g = torch.Generator().manual_seed(100 + seed_offset)
    v = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(99)), dim=0)
    pos = torch.arange(T).repeat(n_docs)
    planted = (pos == 2) & (torch.rand(n_docs * T, generator=g) < 0.9)
    acts = d.acts_NSD.clone()
    if plant:
        acts[:, 1] += planted[:, None] * (0.5 + 1.5 * torch.rand(n_docs * T, 1, generator=g)) * v
    mask = torch.ones(n_docs, T, dtype=torch.bool)
    mask[:, 0] = False
    tasks = {"planted": ProbeTask(planted.reshape(n_docs, T) & mask, mask)}
    return EvalRows(acts.reshape(n_docs, T, 2, 16), mask, tasks), MethodData(acts, acts, acts, train_pos_N=pos)


def test_tune_cut_flags_the_planted_position_on_validation_data(tmp_path):
    """ADL fitted with cut 0 flags all five positions; the cut chosen on a validation set keeps the one whose
    direction detects the plant (position 2, item 1). With nothing planted the validation set gives no
    signal and the fitted cut stays."""
    from crosscoder.analysis.scoreboard import tune_cut

    _, train = _positional_rows(400, 0)
    val, _ = _positional_rows(200, 1)
    fit = methods.fit("adl", train, tmp_path / "adl", methods.get("adl").Config(min_relative_norm=0.0))
    assert fit.flagged_J.tolist() == [0, 1, 2, 3, 4]
    tuned, choice = tune_cut(fit, val.acts_NTSD, val.mask_NT, val.tasks)
    assert tuned.flagged_J.tolist() == [1] and choice.tuned and choice.n_flagged == 1
    assert (choice.recovered, choice.precision, choice.fitted_value, choice.n_candidates) == (1, 1.0, 0.0, 5)
    assert choice.value == pytest.approx(float(fit.cut_statistic()[0][1])) and tuned.cfg.min_relative_norm == choice.value
    blank, _ = _positional_rows(200, 2, plant=False)
    blank = blank._replace(tasks={"planted": ProbeTask(torch.rand(200, 8, generator=torch.Generator().manual_seed(3))
                                                       < 0.02, blank.mask_NT)})
    blank.tasks["planted"].label_NT[:, 0] = False
    kept, none = tune_cut(fit, blank.acts_NTSD, blank.mask_NT, blank.tasks)
    assert not none.tuned and none.value == 0.0 and kept.flagged_J.tolist() == [0, 1, 2, 3, 4]
    assert none.recovered == 0 and none.precision == 0.0


class _Fixed(StandInMethod):
    """A method with fixed items (the chat − base projection on fixed unit directions), all flagged, no cut:
    a stand-in next to ADL on the board."""

    name = "fixed"

    def __init__(self, directions_JD, seconds=1.0):
        super().__init__(directions_JD.shape[1], len(directions_JD), seconds=seconds, tokens=1000)
        self.directions_JD = directions_JD

    def _scores(self, acts, positions):
        return (acts[:, 1] - acts[:, 0]) @ self.directions_JD.t()


def test_score_board_tunes_on_validation_and_reports_on_heldout(tmp_path):
    from crosscoder.analysis import scoreboard_run as sb

    _, train = _positional_rows(400, 0)
    val, _ = _positional_rows(200, 1)
    held, _ = _positional_rows(200, 2)
    adl = methods.fit("adl", train, tmp_path / "adl", methods.get("adl").Config(min_relative_norm=0.0))
    rand = torch.nn.functional.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(5)), dim=1)
    fits = {"adl": adl, "fixed": _Fixed(rand)}
    with pytest.raises(ConfigError, match="validation set apart from the held-out set"):
        sb.score_board(fits, held, held)
    _, null_data = _positional_rows(400, 3, plant=False)
    null = {"adl": methods.fit("adl", null_data, tmp_path / "null", adl.cfg), "fixed": _Fixed(rand[:2])}
    board = sb.score_board(fits, held, val, null_fits=null, seed_fits={"fixed": [_Fixed(rand)]}, n_boot=50)
    assert [r.method for r in board.rows] == ["adl", "fixed"]
    top = board.rows[0]
    assert top.recovered == ("planted",) and (top.n_flagged, top.precision) == (1, 1.0)
    assert board.cuts["adl"].tuned and board.fits["adl"].flagged_J.tolist() == [1]
    # the null fit is flagged with the validation cut: its position-2 mean difference is small
    assert top.null_false_positives == len(null["adl"].with_cut(board.cuts["adl"].value).flagged_J) == 0
    assert board.rows[1].null_false_positives == 2 and board.rows[1].seed_agreement == 1.0
    assert math.isnan(top.seed_agreement) and board.n_seeds == 2 and board.null_measured
    assert board.recommendation.startswith("adl recovers all 1 behaviours")
    # the page's tables and figure data
    ranked = sb.ranked_table(board)
    assert [r["method"] for r in ranked] == ["adl", "fixed"] and ranked[0]["cut (validation)"].startswith(
        "min_relative_norm = ")
    assert ranked[1]["seed agreement"] == 1.0 and ranked[0]["seed agreement"] is None
    assert len(sb.behaviour_table(board)) == 2 and sb.cut_table(board)[0]["method"] == "adl"
    cells, null_counts = sb.grid(board)
    assert [c["method"] for c in cells] == ["adl", "fixed"] and null_counts == {"adl": 0, "fixed": 2}
    assert "adl and fixed flag nothing" not in sb.null_note(board) and "adl flags nothing there" in sb.null_note(board)
    path = sb.write_board_metrics(tmp_path / "board", board, {"parameters": {"n_boot": 50}})
    import json

    back = json.loads(path.read_text())  # valid JSON: no NaN
    assert back["rows"][0]["method"] == "adl" and back["rows"][1]["seed_agreement"] == 1.0
    assert back["rows"][0]["seed_agreement"] is None and back["parameters"] == {"n_boot": 50}
    one = sb.score_board({"fixed": _Fixed(rand)}, held, val, n_boot=0)
    assert "profile `full`" in sb.null_note(one) and one.rows[0].null_false_positives is None
    # the registered methods this board did not fit are named (here all six: only a stand-in was fitted)
    assert "Not fitted in this profile (its time budget): adl, crosscoder_batchtopk, crosscoder_l1, " \
           "designated_shared, dfc and diff_sae;" in sb.null_note(one)
    assert "(its time budget): crosscoder_batchtopk, crosscoder_l1, designated_shared, dfc and diff_sae;" \
        in sb.null_note(board)  # adl was fitted


def test_method_configs_follow_the_training_runs(tmp_path):
    from crosscoder.analysis.scoreboard_run import fit_methods, method_configs
    from crosscoder.config import CrosscoderConfig, RunConfig

    l1 = RunConfig(CrosscoderConfig(d_model=16, n_latents=64, sparsity="l1", k=8),
                   TrainConfig(n_steps=900, batch_size=128, lr=1e-3, l1_coeff=1.5, seed=0))
    btk = RunConfig(CrosscoderConfig(d_model=16, n_latents=96, sparsity="batchtopk", k=6),
                    TrainConfig(n_steps=900, batch_size=256, lr=2e-3, auxk_dead_tokens=777))
    cfgs = method_configs({"l1": l1, "batchtopk": btk}, fit_steps=50, nu_threshold=0.25, min_active_tokens=3)
    ds, dfc, sae = cfgs["designated_shared"], cfgs["dfc"], cfgs["diff_sae"]
    assert (ds.n_latents, ds.sparsity, ds.train.l1_coeff, ds.train.lr, ds.nu_threshold) == (64, "l1", 1.5, 1e-3, 0.25)
    assert (dfc.n_latents, dfc.k, dfc.train.lr, dfc.train.auxk_dead_tokens, dfc.min_active_tokens) == (96, 6, 2e-3, 777, 3)
    assert (sae.n_latents, sae.k, sae.train.batch_size) == (0, 6, 256)  # 0: 4 x d_model
    # one token budget: fit_steps at each run's batch size, evaluated once at the end
    assert {c.train.n_steps for c in (ds, dfc, sae)} == {50} and {c.train.eval_every for c in (ds, dfc, sae)} == {50}
    own = method_configs({"l1": l1, "batchtopk": btk}, fit_steps=0)  # 0: the runs' own steps
    assert {c.train.n_steps for c in (own["designated_shared"], own["dfc"], own["diff_sae"])} == {900}
    with pytest.raises(ConfigError, match="needs an L1 and a BatchTopK training run"):
        method_configs({"l1": l1}, fit_steps=50)
    with pytest.raises(ConfigError, match="comes from a training page's crosscoder"):
        fit_methods(["crosscoder_l1"], MethodData(*(torch.zeros(8, 2, 16) for _ in range(3))), tmp_path, {}, cfgs)


def test_scoreboard_options_fail_clearly():
    from crosscoder.schema import STAGES, ScoreboardOptions

    assert set(ScoreboardOptions().methods) == set(methods.names()) - {"test_norm_diff"}
    with pytest.raises(ConfigError, match="methods must be distinct names"):
        ScoreboardOptions(methods=("adl", "nope"))
    with pytest.raises(ConfigError, match="seeds must be distinct positive integers"):
        ScoreboardOptions(seeds=(0,))
    assert STAGES["scoreboard"].load({"seeds": [1, 2], "null_pair": True}).seeds == [1, 2]


def test_scoreboard_grid_draws_every_cell_and_the_null_row():
    from report import plotting

    cells = [{"method": m, "behaviour": b, "best_auroc": a, "recovered": a >= 0.9}
             for m, row in (("dfc", (0.95, 0.7)), ("adl", (math.nan, math.nan))) for b, a in zip(("x", "y"), row)]
    fig = plotting.scoreboard_grid(cells, {"dfc": 3, "adl": None})
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("none\nflagged") == 2 and "0.95 ✓" in texts and "0.70" in texts and {"3", "—"} <= set(texts)
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["dfc", "adl"]
    plain = plotting.scoreboard_grid(cells)
    assert len([t for ax in plain.axes for t in ax.texts]) == 4
    import matplotlib.pyplot as plt

    plt.close("all")
